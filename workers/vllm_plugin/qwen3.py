"""Qwen3 and Qwen3-MoE for vLLM, on our modules (workers/models/qwen3.py, qwen3_moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from workers.models.layers import RMSNorm, SwiGLU
from workers.models.qwen3 import Qwen3Attention, check_full_attention
from workers.models.qwen3_moe import Qwen3MoeForCausalLM as _NativeQwen3Moe
from workers.vllm_plugin.common import TidalVllmModel, check_parallel, join, make_attention


class VllmQwen3Attention(Qwen3Attention):
    """Our Qwen3 attention (q/k norm, RoPE) with vLLM's paged attention core."""

    def __init__(self, cfg, layer: int, vllm_config, prefix: str):
        super().__init__(cfg, layer)
        self.attn = make_attention(self.hq, self.d, self.scale, self.hkv, vllm_config, f"{prefix}.attn")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.hq, self.d))
        k = self.k_norm(self.k_proj(x).view(t, self.hkv, self.d))
        v = self.v_proj(x)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v))


class VllmQwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int, mlp: nn.Module, vllm_config, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = VllmQwen3Attention(cfg, layer, vllm_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class VllmQwen3Model(nn.Module):
    def __init__(self, cfg, make_mlp, vllm_config, prefix: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            VllmQwen3DecoderLayer(cfg, i, make_mlp(i), vllm_config, f"{prefix}.layers.{i}")
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TidalQwen3ForCausalLM(TidalVllmModel):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        check_parallel(vllm_config)
        cfg = vllm_config.model_config.hf_config
        check_full_attention(cfg)
        self.cfg = cfg
        self.model = VllmQwen3Model(cfg, self.make_mlp, vllm_config, join(prefix, "model"))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_word_embeddings = getattr(cfg, "tie_word_embeddings", False)
        self._tie()
        self.draft_heads_of_checkpoint(vllm_config)
        self.enable_tidar(vllm_config, hybrid=False)

    def make_mlp(self, layer: int) -> nn.Module:
        return SwiGLU(self.cfg.hidden_size, self.cfg.intermediate_size)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, positions)
        return self.model.norm(h)


class TidalQwen3MoeForCausalLM(TidalQwen3ForCausalLM):
    def make_mlp(self, layer: int) -> nn.Module:
        return _NativeQwen3Moe.make_mlp(self, layer)  # the native rule: dense on mlp_only_layers, MoE elsewhere
