"""Expert parallelism: each rank keeps a contiguous share of every MoE layer's experts.

Every rank runs the same batch (attention and routers are replicated), so dispatch costs nothing:
each rank already holds every token. A rank computes only the tokens routed to its own experts
(tokens routed to ZAYA's skip expert are computed nowhere), and one all-reduce per MoE layer sums the
partial outputs. With replicated activations this moves H floats per token per layer, the same as an
all-to-all dispatch + combine would for top-1 routing, in one collective instead of two.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from workers.models.layers import Experts


class ShardedExperts(Experts):
    def __init__(self, full: Experts, rank: int, world_size: int):
        nn.Module.__init__(self)
        e = full.num_experts
        if world_size > e:
            raise ValueError(f"expert parallelism of {world_size} exceeds the {e} experts per layer")
        self.lo, self.hi = e * rank // world_size, e * (rank + 1) // world_size
        self.num_experts = self.hi - self.lo
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.data[self.lo : self.hi].clone(), requires_grad=False)
        self.down_proj = nn.Parameter(full.down_proj.data[self.lo : self.hi].clone(), requires_grad=False)
        self.comm_seconds = 0.0

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [N, H]; expert_ids: [N, k] global ids (-1 = none) -> [N, H]
        mine = (expert_ids >= self.lo) & (expert_ids < self.hi)
        out = super().forward(x, torch.where(mine, expert_ids - self.lo, -1), weights)
        t = time.perf_counter()
        dist.all_reduce(out)
        self.comm_seconds += time.perf_counter() - t
        return out


def shard_experts(model: nn.Module, rank: int, world_size: int) -> None:
    """Replace every Experts module of `model` by this rank's share."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Experts:
                setattr(module, child_name, ShardedExperts(child, rank, world_size))


def comm_seconds(model: nn.Module) -> float:
    return sum(m.comm_seconds for m in model.modules() if isinstance(m, ShardedExperts))
