"""Export a run as an HF-format model directory our engine and transformers both load.

    python -m training.export --run runs/zaya-code --out models/zaya-code-tiny [--which final|ar]

Writes config.json (+ mask_token_id, tidar_block_size), tokenizer.json, model.safetensors (our state_dict
names, which are HF ZAYA's; the tied lm_head.weight is left out as transformers does),
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

TIDAR_BLOCK_SIZE = 16  # K: drafts per step; training used blocks of K + 1 slots


def hf_config(config: dict, mask_token_id: int) -> dict:
    return {**config, "mask_token_id": mask_token_id, "tidar_block_size": TIDAR_BLOCK_SIZE}


def write_model_dir(out: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer_file: Path,
                    mask_token_id: int, readme: str | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings", True))}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    (out / "config.json").write_text(json.dumps(hf_config(config, mask_token_id), indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
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
