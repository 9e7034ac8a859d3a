"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE on the first `rotary_dim` channels of each head (all of them unless partial)."""

    def __init__(self, head_dim: int, theta: float, partial_factor: float = 1.0):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_factor)
        # a plain attribute, not a buffer: it must stay fp32 when the model moves to bf16
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device="cpu") / self.rotary_dim))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq  # [T, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def rope_settings(cfg, layer_type: str | None = None) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from `rope_parameters` (per layer type or flat) or legacy fields."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported yet (only 'default')")
    return float(theta), float(partial)


class SwiGLU(nn.Module):
    """Dense gated MLP with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts stored fused, as 3D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I].

    `forward` runs only the experts that received tokens; a token routed to index -1 (ZAYA's skip
    expert) is not computed at all. Expert parallelism replaces this module's `forward`.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, k] long, -1 = none
        weights: torch.Tensor,  # [N, k]
    ) -> torch.Tensor:  # [N, H]
        out = torch.zeros_like(x)
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids.clamp_min(-1) + 1, minlength=self.num_experts + 1).tolist()
        token_of = order // expert_ids.shape[1]
        start = counts[0]  # skip tokens routed nowhere
        for e in range(self.num_experts):
            n = counts[e + 1]
            if n == 0:
                continue
            rows = order[start : start + n]
            tokens = token_of[start : start + n]
            start += n
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            y = y * weights.reshape(-1)[rows, None].to(y.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
