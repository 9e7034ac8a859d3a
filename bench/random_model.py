"""Small random HF checkpoints for benchmarks and the placeholder shipped model.

    python -m bench.random_model models/zaya-tiny-random --hidden 64 --layers 2
    python -m bench.random_model /tmp/qwen3-like --like models/zaya-code-tiny   # a Qwen3 to serve beside it
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from training.export import write_tokenizer_config


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens, then <pad>, <bos>, <eos>, <mask>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>", "<mask>"])
    return tok


def make_zaya(out_dir: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              head_dim: int = 16, experts: int = 4, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Random ZAYA weights with non-trivial norms/scales so outputs are not degenerate."""
    from transformers import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = ZayaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, moe_intermediate_size=2 * hidden,
                     num_experts=experts, router_hidden_size=max(16, hidden // 4), initializer_range=0.1,
                     pad_token_id=tok.token_to_id("<pad>"), bos_token_id=tok.token_to_id("<bos>"),
                     eos_token_id=tok.token_to_id("<eos>"), max_position_embeddings=4096)
    model = ZayaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(1.0 + torch.rand_like(p))  # 0 (the init) makes attention uniform
    out = Path(out_dir)
    model.save_pretrained(out)
    if with_tokenizer:
        tok.save(str(out / "tokenizer.json"))
        write_tokenizer_config(out, cfg.max_position_embeddings)
        config = json.loads((out / "config.json").read_text())
        config["mask_token_id"] = tok.token_to_id("<mask>")
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_qwen3_like(like: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A random Qwen3 with `like`'s width, depth, heads, vocabulary and tokenizer, and a dense MLP of as many
    parameters per layer as `like`'s experts: the same serving workload on the other family (AR only; random
    weights draft nothing worth accepting)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    src = json.loads((Path(like) / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id")
    mlp = src["moe_intermediate_size"] * src.get("num_experts", 1)
    cfg = Qwen3Config(intermediate_size=mlp, initializer_range=0.05, **{k: src[k] for k in keep if k in src})
    out = Path(out_dir)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(like) / name).is_file():
            shutil.copy(Path(like) / name, out / name)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--like", help="write a random Qwen3 shaped like this checkpoint instead (make_qwen3_like)")
    args = ap.parse_args()
    if args.like:
        print(make_qwen3_like(args.like, args.out_dir))
    else:
        print(make_zaya(args.out_dir, hidden=args.hidden, layers=args.layers, experts=args.experts))
