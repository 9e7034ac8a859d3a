"""Small random HF checkpoints for benchmarks and the placeholder shipped model.

    python -m bench.random_model models/zaya-tiny-random --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
import json
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    args = ap.parse_args()
    print(make_zaya(args.out_dir, hidden=args.hidden, layers=args.layers, experts=args.experts))
