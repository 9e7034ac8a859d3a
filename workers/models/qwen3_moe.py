"""Qwen3-MoE: Qwen3 attention with a top-k softmax-routed MoE (dense MLP on `mlp_only_layers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.layers import Experts, SwiGLU
from workers.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeRouter(nn.Module):
    def __init__(self, cfg, num_experts: int):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = getattr(cfg, "norm_topk_prob", False)
        self.weight = nn.Parameter(torch.empty(num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor):
        # x: [N, H] -> expert ids [N, k], weights [N, k]
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(logits.dtype)


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg, num_experts: int):
        super().__init__()
        self.gate = Qwen3MoeRouter(cfg, num_experts)
        self.experts = Experts(num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        return self.experts(x, ids, weights)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, layer: int) -> nn.Module:
        cfg = self.cfg
        num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
        step = getattr(cfg, "decoder_sparse_step", 1)
        if layer in (getattr(cfg, "mlp_only_layers", None) or []) or num_experts == 0 or (layer + 1) % step:
            return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        return Qwen3MoeSparseMoeBlock(cfg, num_experts)
