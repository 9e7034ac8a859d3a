"""The two objectives on one forward: next-token (AR) on clean rows, mask -> token (diffusion) on masked rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.batches import Batch, row_logits


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar, what backward() uses
    ar: float  # mean AR cross-entropy (nats), nan when the batch has no AR rows
    diff: float  # mean diffusion cross-entropy, nan when none
    ar_correct: torch.Tensor  # [N_ar] bool: argmax == target
    diff_correct: torch.Tensor  # [N_diff] bool


def compute(model, batch: Batch, alpha: float = 1.0) -> LossOut:
    """TiDAR: (alpha * L_AR + L_diff) / (1 + alpha); AR-only or diffusion-only batches give that loss alone."""
    logits = row_logits(model, batch)  # [N, V] fp32
    ce = F.cross_entropy(logits, batch.targets.long(), reduction="none")  # [N]
    correct = logits.detach().argmax(-1) == batch.targets
    ar_rows, diff_rows = batch.is_ar, ~batch.is_ar
    l_ar = ce[ar_rows].mean() if ar_rows.any() else None
    l_diff = ce[diff_rows].mean() if diff_rows.any() else None
    if l_ar is not None and l_diff is not None:
        loss = (alpha * l_ar + l_diff) / (1 + alpha)
    else:
        loss = l_ar if l_ar is not None else l_diff
    nan = float("nan")
    return LossOut(loss, l_ar.item() if l_ar is not None else nan, l_diff.item() if l_diff is not None else nan,
                   correct[ar_rows], correct[diff_rows])
