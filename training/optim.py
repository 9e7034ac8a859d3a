"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """Matrices (linears, convs, embeddings, experts) decay; norms, scales, biases and qk temps do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # the tied head appears once
        (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    """step in [0, total): linear warmup to `peak`, then cosine down to peak * final_ratio."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
