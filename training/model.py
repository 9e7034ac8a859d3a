"""The model: a ZAYA1 config (HF `config.json` keys) and our `ZayaForCausalLM` initialised like HF does."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from workers.models.draft_heads import DRAFT_LAYER, MARKOV_W1, MARKOV_W2
from workers.models.zaya import ZayaForCausalLM, ZayaRouter

# Sized for CPU training and a <= 30 MB fp32 export (see README of the exported model).
DEFAULT_ARCH = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    moe_intermediate_size=384, num_experts=4, router_hidden_size=64, max_position_embeddings=2048)

QK_TEMP_INIT = 1.0  # HF initialises qk_norm.temp to 0 (all keys zero, uniform attention); see init_weights


def make_config(vocab_size: int, special: dict[str, int], **arch) -> dict:
    """The config.json dict (HF ZayaConfig keys). special: token name -> id (<pad>, <bos>, <eos>, <mask>)."""
    a = {**DEFAULT_ARCH, **arch}
    if a["head_dim"] < 64:
        raise ValueError("head_dim must be >= 64 (the vLLM plugin's attention kernels need it)")
    return {
        "architectures": ["ZayaForCausalLM"],
        "model_type": "zaya",
        "vocab_size": vocab_size,
        **a,
        "num_experts_per_tok": 1,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        "layer_types": ["hybrid"] * a["num_hidden_layers"],
        "tie_word_embeddings": True,
        "bos_token_id": special["<bos>"],
        "eos_token_id": special["<eos>"],
        "pad_token_id": special["<pad>"],
        "cca_time0": 2,
        "cca_time1": 2,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "lm_head_bias": False,
        "sliding_window": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": "float32",
    }


def namespace(config: dict) -> SimpleNamespace:
    """config.json dict -> the attribute namespace our model takes (what workers.loader gives the engine)."""
    return SimpleNamespace(**config)


@torch.no_grad()
def init_weights(model: ZayaForCausalLM, std: float = 0.02, qk_temp: float = QK_TEMP_INIT,
                 pad_id: int | None = None) -> None:
    """HF ZAYA's `_init_weights`: normal(std) linears / convs / embeddings / experts, zero biases, unit norms
    and scales, balancing biases 0 with the skip class at -1. One deliberate change: qk_norm.temp starts at
    `qk_temp` instead of 0 (0 zeroes every key, so attention starts uniform and q/k get no gradient)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("qk_norm.temp"):
            p.fill_(qk_temp)
        elif p.ndim >= 2:
            p.normal_(0.0, std)  # linears, convs, embeddings, fused experts
        elif leaf in ("bias", "hidden_states_bias", "residual_bias", "input_hidden_states_bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # norm weights, residual scales, router_states_scale
    if pad_id is not None:
        model.model.embed_tokens.weight[pad_id].zero_()  # nn.Embedding(padding_idx) in HF
    for m in model.modules():
        if isinstance(m, ZayaRouter):
            m.balancing_biases.zero_()
            m.balancing_biases[-1] = -1.0


def build_model(config: dict, seed: int = 0, qk_temp: float = QK_TEMP_INIT) -> ZayaForCausalLM:
    """A freshly initialised fp32 model with lm_head tied to the embeddings (as load_weights ties it)."""
    torch.manual_seed(seed)
    model = ZayaForCausalLM(namespace(config))
    model.lm_head.weight = model.model.embed_tokens.weight
    init_weights(model, config.get("initializer_range", 0.02), qk_temp, pad_id=config.get("pad_token_id"))
    return model


@torch.no_grad()
def add_chain_heads(model: ZayaForCausalLM, rank: int, seed: int = 0) -> None:
    """Zyphra's draft heads (workers/models/draft_heads.py), set up to start from the plain model: the draft
    output layer a copy of the LM head, w1 ~ N(0, 1) and w2 = 0, so the first drafts equal the model's own."""
    v, h = model.cfg.vocab_size, model.cfg.hidden_size
    shapes = {MARKOV_W1: (v, rank), MARKOV_W2: (rank, v)}
    if model.diffusion_output_layer is None:  # a trained one is kept
        shapes[DRAFT_LAYER] = (v, h)
    model.add_draft_heads(shapes)
    if DRAFT_LAYER in shapes:
        model.diffusion_output_layer.weight.copy_(model.lm_head.weight)
    model.diffusion_markov_head.w1.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.diffusion_markov_head.w2.zero_()


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (the tied head counted once)."""
    return sum(p.numel() for p in model.parameters())


def active_params(config: dict) -> int:
    """Rough parameters touched per token: everything except the experts not chosen."""
    c = config
    with torch.device("meta"):
        total = count_params(ZayaForCausalLM(namespace(config))) - c["vocab_size"] * c["hidden_size"]  # tied head
    expert = 3 * c["hidden_size"] * c["moe_intermediate_size"]
    return int(total - c["num_hidden_layers"] * (c["num_experts"] - 1) * expert)


def size_mb(n_params: int, bytes_per: int = 4) -> float:
    return n_params * bytes_per / 1e6


__all__ = ["DEFAULT_ARCH", "make_config", "namespace", "init_weights", "build_model", "add_chain_heads",
           "count_params", "size_mb", "active_params"]
