"""Model registry: HF architecture name -> our implementation, and weight loading by name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from workers.loader import ModelLoadError, iter_weights, load_hf_config, weight_shapes


def _registry() -> dict[str, type[nn.Module]]:
    from workers.models.qwen3 import Qwen3ForCausalLM
    from workers.models.qwen3_moe import Qwen3MoeForCausalLM
    from workers.models.zaya import ZayaForCausalLM

    return {
        "ZayaForCausalLM": ZayaForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
        "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    }


SUPPORTED_ARCHITECTURES = ("ZayaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

# HF checkpoints store Qwen3-MoE experts one by one; we keep them fused like ZAYA's.
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *,
                 error: type[ValueError] = ModelLoadError, buffers_required: bool = True) -> set[str]:
    """Copy checkpoint tensors into `model` by HF name; returns the names loaded. Native and vLLM classes share it.

    Per-expert tensors (Qwen3-MoE checkpoints) go into our fused gate_up_proj / down_proj; a checkpoint's rotary
    inv_freq is skipped (computed, not loaded). lm_head: skipped when the head already is the embedding (the vLLM
    classes tie at construction); when the checkpoint has none and tie_word_embeddings is set, the head becomes
    the embedding (the native classes tie here). Raises `error` for a tensor the model lacks, a shape mismatch,
    or a parameter (and, with `buffers_required`, a buffer: vLLM layers carry their own) the checkpoint lacks.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    tied = _head_is_embedding(model)
    loaded: set[str] = set()
    for name, tensor in weights:
        if m := _PER_EXPERT.match(name):
            prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
            key = f"{prefix}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"
            target = params[key][e]
            if kind == "down_proj":
                rows = slice(None)
            else:
                half = target.shape[0] // 2
                rows = slice(0, half) if kind == "gate_proj" else slice(half, None)
            with torch.no_grad():
                target[rows].copy_(tensor)
            loaded.add(key)
            continue
        if name == "lm_head.weight" and tied:
            continue  # the embedding is the head
        if name not in params:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise error(f"checkpoint weight {name!r} does not belong to {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise error(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    if not tied and "lm_head.weight" not in loaded and getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    expected = set(dict(model.named_parameters()))
    if buffers_required:
        expected |= set(dict(model.named_buffers()))
    missing = sorted(expected - loaded)
    if missing:
        raise error(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    return loaded


def _head_is_embedding(model: nn.Module) -> bool:
    """lm_head already shares the embedding's weight (the vLLM classes tie at construction, the native ones don't)."""
    try:
        return model.lm_head.weight is model.model.embed_tokens.weight
    except AttributeError:
        return False


def state_snapshot_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of recurrent state the prefix cache keeps per KV block for this architecture (0: none; an
    unsupported one is refused by load_model, with the list of supported ones)."""
    model_class = _registry().get((getattr(cfg, "architectures", None) or [None])[0])
    return model_class.state_snapshot_bytes(cfg, dtype) if model_class is not None else 0


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[nn.Module, object]:
    """Instantiate the model named by config.json and load its weights; returns (model, hf_config)."""
    cfg = load_hf_config(model_dir)
    arch = cfg.architectures[0]
    registry = _registry()
    if arch not in registry:
        raise ModelLoadError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        with torch.device("meta"):
            model = registry[arch](cfg)
    except (AttributeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json does not describe a valid {arch}: {e}") from None
    with torch.device("meta"):
        model.add_draft_heads(weight_shapes(model_dir))  # optional: used when the checkpoint has them
    model = model.to_empty(device=device)
    load_weights(model, iter_weights(model_dir))
    return model.to(dtype).eval(), cfg

