"""A faster CPU execution of ZAYA's two CCA convolutions for training (same parameters, same math).

The model applies `conv_qk_depthwise` (kernel 2, one group per channel) then `conv_qk_grouped` (kernel 2,
one group per head) to a [T, C, 3] window per token. oneDNN runs that as T tiny convolutions, and its
backward took ~25% of a training step. Here the depthwise conv is two fused multiply-adds and the grouped
conv one batched matmul per head group (about 2x faster, fwd + bwd). Only the modules' `forward` is replaced; parameters, names and
exported weights are untouched. tests/test_training.py checks equality with the stock modules.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from workers.models.zaya import ZayaCCAProjection


def _depthwise(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    # x: [T, C, 3] (the model's window, a transposed view of [T, 3, C]) -> [T, C, 2] (a view of [T, 2, C])
    xt = x.transpose(1, 2)  # [T, 3, C]
    w = self.weight[:, 0, :]  # [C, 2]
    y = xt[:, :-1] * w[:, 0] + xt[:, 1:] * w[:, 1] + self.bias  # [T, 2, C]
    return y.transpose(1, 2)


def _grouped(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    # x: [T, C, 2] -> [T, C, 1]; weight [C, C / G, 2] with G groups (one per head):
    # out[t, g, o] = bias[g, o] + sum_{k, i} x[t, g, i, k] * weight[g, o, i, k], one matmul per group
    t, c, k = x.shape
    g = self.groups
    ci = c // g
    w = self.weight.view(g, ci, ci, k).permute(0, 3, 2, 1).reshape(g, k * ci, ci)  # [G, (k, i), o]
    xg = x.transpose(1, 2).reshape(t, k, g, ci).permute(2, 0, 1, 3).reshape(g, t, k * ci)  # [G, T, (k, i)]
    out = torch.baddbmm(self.bias.view(g, 1, ci), xg, w)  # [G, T, ci]
    return out.transpose(0, 1).reshape(t, c, 1)


def install(model: nn.Module) -> int:
    """Swap the conv forwards of every CCA projection in `model`; returns how many were swapped."""
    n = 0
    for m in model.modules():
        if isinstance(m, ZayaCCAProjection):
            assert m.conv_qk_depthwise.kernel_size == (2,) and m.conv_qk_grouped.kernel_size == (2,)
            m.conv_qk_depthwise.forward = types.MethodType(_depthwise, m.conv_qk_depthwise)
            m.conv_qk_grouped.forward = types.MethodType(_grouped, m.conv_qk_grouped)
            n += 1
    return n
