"""Qwen3 (dense): GQA attention with per-head q/k RMSNorm, SwiGLU MLP. Names mirror the HF checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import AttentionMetadata, KVCache, paged_attention
from workers.models.draft_heads import DraftHeads
from workers.models.layers import LinearGroup, RMSNorm, Rotary, SwiGLU, rope_settings


def check_full_attention(cfg) -> None:
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported yet (use_sliding_window is true)")


class Qwen3Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.layer = layer
        h = cfg.hidden_size
        self.d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        bias = getattr(cfg, "attention_bias", False)
        self.q_proj = nn.Linear(h, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(h, self.hkv * self.d, bias=bias)
        self.v_proj = nn.Linear(h, self.hkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.d, h, bias=bias)
        self.qkv = LinearGroup(self.q_proj, self.k_proj, self.v_proj)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        theta, partial = rope_settings(cfg)
        self.rotary = Rotary(self.d, theta, partial)
        self.scale = self.d**-0.5

    def forward(self, x, positions, meta: AttentionMetadata, kv: KVCache):
        t = x.shape[0]
        q, k, v = self.qkv(x)
        q = self.q_norm(q.view(t, self.hq, self.d))
        k = self.k_norm(k.view(t, self.hkv, self.d))
        v = v.view(t, self.hkv, self.d)
        q, k = self.rotary(positions, q, k, meta.shared)
        out = paged_attention(q, k, v, kv, self.layer, meta, self.scale)
        return self.o_proj(out.flatten(1))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, h, positions, meta, kv):
        h = h + self.self_attn(self.input_layernorm(h), positions, meta, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, cfg, make_mlp):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i, make_mlp(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(DraftHeads, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        check_full_attention(cfg)
        self.cfg = cfg
        self.model = Qwen3Model(cfg, self.make_mlp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_word_embeddings = getattr(cfg, "tie_word_embeddings", False)
        self.init_draft_heads(cfg)

    def make_mlp(self, layer: int) -> nn.Module:
        return SwiGLU(self.cfg.hidden_size, self.cfg.intermediate_size)

    def make_state(self, num_slots: int, dtype: torch.dtype, device, num_snapshots: int = 0) -> None:
        return None  # attention only: the paged KV is the whole state

    @staticmethod
    def state_snapshot_bytes(cfg, dtype: torch.dtype) -> int:
        return 0  # a cached prefix is its KV blocks alone

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv: KVCache,
        state: None = None,
    ) -> torch.Tensor:  # [T, H]
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, positions, meta, kv)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        return self.lm_head(hidden).float()
