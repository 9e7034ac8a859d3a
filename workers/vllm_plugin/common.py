"""What every model class of the plugin shares: vLLM's paged attention, weight loading by HF name, logits.

The classes are built from our own modules (workers/models): the same parameter names as the HF
checkpoint and the same arithmetic as the native engine. Only the attention core (vLLM's `Attention`,
over vLLM's paged KV) and, for ZAYA, where the CCA state lives differ. Tensor parallelism is not
supported (plain nn.Linear weights).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

# HF checkpoints store Qwen3-MoE experts one by one; our Experts module keeps them fused (as ZAYA's are).
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def check_parallel(vllm_config) -> None:
    p = vllm_config.parallel_config
    if p.tensor_parallel_size != 1 or p.pipeline_parallel_size != 1:
        raise ValueError("the tidal vLLM models run unsharded: tensor_parallel_size and pipeline_parallel_size "
                         f"must be 1 (got {p.tensor_parallel_size}, {p.pipeline_parallel_size})")
    if getattr(p, "enable_expert_parallel", False):
        raise ValueError("the tidal vLLM models do not support vLLM expert parallelism; use the native backend "
                         "(EngineConfig.ep_size) for expert-parallel serving")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def make_attention(num_heads: int, head_dim: int, scale: float, num_kv_heads: int, vllm_config, prefix: str):
    """vLLM's attention layer over its paged KV cache (registers itself under `prefix`)."""
    from vllm.model_executor.layers.attention import Attention

    return Attention(num_heads, head_dim, scale, num_kv_heads=num_kv_heads,
                     cache_config=vllm_config.cache_config, prefix=prefix)


class TidalVllmModel(nn.Module):
    """Mixin for the top-level classes: `self.model.embed_tokens`, `self.lm_head`, `self.tie_word_embeddings`."""

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        return self.lm_head(hidden_states).float()

    def enable_tidar(self, vllm_config, hybrid: bool) -> None:
        """TiDAR configured (hf_config.tidal_tidar, set by the vllm backend on GPU): hand Model Runner V2 our
        ModelState. Defined only then: for plain AR, vLLM picks its own default state."""
        from workers.vllm_plugin.tidar_gpu import TidarShape, model_state_cls

        if TidarShape.of(vllm_config.model_config.hf_config) is not None:
            self.get_model_state_cls = lambda: model_state_cls(hybrid)

    def _tie(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names -> our parameters (fused experts for per-expert checkpoints); returns what was loaded."""
        params = dict(self.named_parameters())
        params.update(dict(self.named_buffers()))
        loaded: set[str] = set()
        for name, tensor in weights:
            if m := _PER_EXPERT.match(name):
                prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
                if kind == "down_proj":
                    key, target, rows = f"{prefix}.down_proj", params[f"{prefix}.down_proj"][e], slice(None)
                else:
                    key = f"{prefix}.gate_up_proj"
                    target = params[key][e]
                    half = target.shape[0] // 2
                    rows = slice(0, half) if kind == "gate_proj" else slice(half, None)
                with torch.no_grad():
                    target[rows].copy_(tensor)
                loaded.add(key)
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"checkpoint weight {name!r} does not belong to {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        expected = {n for n, _ in self.named_parameters()}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        return loaded
