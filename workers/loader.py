"""Reads HF-format model directories exactly as `transformers.save_pretrained` writes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open


class ModelLoadError(ValueError):
    """The model directory is missing, incomplete or not a model we can run."""


def load_hf_config(model_dir: str | Path) -> SimpleNamespace:
    """config.json as attributes; nested dicts stay dicts."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; expected an HF-format model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw.get("architectures"):
        raise ModelLoadError(f"{cfg_file} names no 'architectures'")
    arch = raw["architectures"]
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise ModelLoadError(f"{cfg_file}: 'architectures' must be a list of class names, got {arch!r}")
    # the engine sizes the KV pool from these before any model code runs
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        value = raw.get(key)
        if type(value) is not int or value < 1:
            raise ModelLoadError(f"{cfg_file}: {key!r} must be a positive integer, got {value!r}")
    return SimpleNamespace(**raw)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: single file, or shards listed in the index."""
    path = Path(model_dir)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is malformed: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"checkpoint shards missing: {', '.join(missing)}")
        return files
    raise ModelLoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as e:  # unreadable, truncated or not a safetensors file
            raise ModelLoadError(f"cannot read {file}: {e}") from None


def weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape by name, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from None
    return shapes


def load_tokenizer(model_dir: str | Path):
    """The `tokenizers` tokenizer from tokenizer.json, or None when the directory has none."""
    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))
