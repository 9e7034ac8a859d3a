"""Export a run as an HF-format model directory our engine and transformers both load.

    python -m training.export --run runs/zaya-code --out models/zaya-code-tiny [--which final|ar]

Writes config.json (+ mask_token_id, tidar_block_size), tokenizer.json, tokenizer_config.json (what
`transformers.AutoTokenizer` and `vllm serve` need besides tokenizer.json), model.safetensors (our
state_dict names, which are HF ZAYA's; the tied lm_head.weight is left out as transformers does),
generation_config.json and a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from training import card, checkpoint
from workers.models.draft_heads import MARKOV_W1

TIDAR_BLOCK_SIZE = 16  # K: drafts per step; training used blocks of K + 1 slots
DSPARK_BLOCK_LEN = 16  # the Markov chain's reset period (Zyphra's default)

# The transcript the OpenAI layer builds for chat requests (router/openai_api.py, ChatRequest.prompt), as a
# chat template, so that a server that applies the model's template (vLLM) sends the model the same text.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SPECIAL_ROLES = {"<pad>": "pad_token", "<bos>": "bos_token", "<eos>": "eos_token", "<mask>": "mask_token"}


def hf_config(config: dict, mask_token_id: int, chained: bool = False) -> dict:
    """config.json: the model's config, the mask token and K; `dspark_block_len` when it has a Markov head."""
    out = {**config, "mask_token_id": mask_token_id, "tidar_block_size": TIDAR_BLOCK_SIZE}
    if chained:
        out["dspark_block_len"] = config.get("dspark_block_len", DSPARK_BLOCK_LEN)
    return out


def write_tokenizer_config(model_dir: Path, max_length: int) -> Path:
    """tokenizer_config.json beside tokenizer.json: the fast-tokenizer class, the special tokens by role (our
    byte-level BPE has no unknown token, which transformers otherwise assumes) and the chat template."""
    tokens = json.loads((Path(model_dir) / "tokenizer.json").read_text())["added_tokens"]
    roles = {SPECIAL_ROLES[t["content"]]: t["content"] for t in tokens if t["content"] in SPECIAL_ROLES}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "unk_token": None, "model_max_length": max_length,
           "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    path = Path(model_dir) / "tokenizer_config.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def write_model_dir(out: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer_file: Path,
                    mask_token_id: int, readme: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings", True))}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    chained = MARKOV_W1 in tensors
    (out / "config.json").write_text(json.dumps(hf_config(config, mask_token_id, chained), indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    write_tokenizer_config(out, config["max_position_embeddings"])
    if readme is not None:
        (out / "README.md").write_text(readme)
    return out


def run_weights(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    """'ar': the weights at the end of AR pretraining; 'final' / 'latest': the newest checkpoint."""
    if which == "ar":
        return torch.load(Path(run_dir) / "ar_model.pt", map_location="cpu", weights_only=True)
    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir} has no {checkpoint.CKPT}")
    return ckpt["model"]


def export_run(run_dir: Path, out: Path, which: str = "final") -> Path:
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    special = json.loads((run_dir / "special_tokens.json").read_text())
    readme = card.model_card(run_dir, which, out)
    return write_model_dir(out, config, run_weights(run_dir, which), run_dir / "tokenizer.json", special["<mask>"],
                           readme)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--which", choices=["final", "ar"], default="final",
                    help="final: the newest checkpoint (the converted model once the run is done); ar: end of phase 1")
    args = ap.parse_args(argv)
    print(export_run(args.run, args.out, args.which))


if __name__ == "__main__":
    main()
