"""What every model class of the plugin shares: vLLM's paged attention, weight loading by HF name, logits.

The classes are built from our own modules (workers/models): the same parameter names as the HF
checkpoint and the same arithmetic as the native engine. Only the attention core (vLLM's `Attention`,
over vLLM's paged KV) and, for ZAYA, where the CCA state lives differ. Tensor parallelism is not
supported (plain nn.Linear weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workers.loader import weight_shapes
from workers.models import load_weights as load_model_weights
from workers.models.draft_heads import DraftHeads
from workers.models.layers import prepare_for_inference


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


class TidalVllmModel(DraftHeads, nn.Module):
    """Mixin for the top-level classes: `self.model.embed_tokens`, `self.lm_head`, `self.tie_word_embeddings`."""

    def draft_heads_of_checkpoint(self, vllm_config) -> None:
        """The optional draft heads (workers/models/draft_heads.py) that the checkpoint directory carries, so
        that its weights load by name; vLLM builds the model before it reads any weight."""
        self.init_draft_heads(self.cfg)
        self.add_draft_heads(weight_shapes(vllm_config.model_config.model))

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
        """HF names -> our parameters (the native loader's rules); returns what was loaded, as vLLM wants.
        vLLM's own buffers (attention scales) are not in the checkpoint, so only parameters must be.
        Then the fused q/k/v and gate/up weights are built once, as the native runner does."""
        loaded = load_model_weights(self, weights, error=ValueError, buffers_required=False)
        prepare_for_inference(self, input_major=False)  # vLLM lays out its own weights
        return loaded
