"""Resumable training state: model, optimizer, phase, step, RNG, written atomically to the run dir."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

CKPT = "checkpoint.pt"


@dataclass
class TrainState:
    phase: int = 0  # index into plan["phases"]
    step: int = 0  # optimizer steps done within the phase
    tokens: int = 0  # clean tokens trained on, all phases
    elapsed: float = 0.0  # training seconds, all phases (wall clock, excluding evaluation)
    history: list[dict] = field(default_factory=list)  # per-phase summaries and evals


def save(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, state: TrainState) -> Path:
    path = Path(run_dir) / CKPT
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict() if opt is not None else None,
                "state": state.__dict__, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    return path


def load(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CKPT
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def restore(ckpt: dict, model: torch.nn.Module) -> TrainState:
    """Load weights and RNG; returns the state. The caller restores the optimizer of the current phase."""
    model.load_state_dict(ckpt["model"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    return TrainState(**ckpt["state"])
