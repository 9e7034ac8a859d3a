"""Decode step cost on a small random ZAYA: AR tokens/s and overhead share, TiDAR step cost vs AR.

    python -m bench.step_cost [--batches 1,8,32] [--steps 20]

AR and TiDAR layouts run interleaved in the same process, so ratios are fair even on a busy machine.
Random weights accept no drafts, so every TiDAR step verifies K drafts and runs every level's block:
this measures the cost of a step, not its speed-up (that needs the trained model, bench/acceptance.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.random_model import make_zaya
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

PROMPT_LEN = 64


class ForwardTimer:
    """Wraps the model's forward to split step time into model and everything else."""

    def __init__(self, model):
        self.seconds = 0.0
        self._inner = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def run(model_dir: str, batch: int, steps: int, mode: str, block_size: int = 16, levels=(0,)) -> dict:
    tidar = dict(block_size=block_size, levels=levels,
                 schedule=[dict(max_batch=10_000, block_size=block_size, levels=levels)])
    cfg = EngineConfig(model=model_dir, mode=mode, max_num_seqs=batch, max_num_batched_tokens=100_000,
                       kv_cache_bytes=1 << 30, tidar=tidar)
    engine = LLMEngine(cfg)
    timer = ForwardTimer(engine.runner.model)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, engine.vocab_size - 4, (PROMPT_LEN,), generator=g).tolist(), params)
    engine.step()  # prefill: all prompts fit one step
    engine.step()  # warm-up decode
    timer.seconds = 0.0
    generated = 0
    start = time.perf_counter()
    for _ in range(steps):
        generated += sum(len(o.new_token_ids) for o in engine.step())
    wall = time.perf_counter() - start
    return {"step_ms": 1000 * wall / steps, "tokens_per_s": generated / wall, "outside_model": 1 - timer.seconds / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    level_sets = [(0,), (0, 8, 16), (0, 4, 8, 16)]
    with tempfile.TemporaryDirectory() as d:
        make_zaya(d, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=4)
        print(f"model: random ZAYA hidden 256, 4 layers, 4 experts, head_dim 64; prompt {PROMPT_LEN}; "
              f"{args.steps} timed decode steps; {args.threads} threads")
        print("| batch | AR tok/s | AR step ms | AR share outside forward | "
              + " | ".join(f"TiDAR K=16 levels {list(l)}: step / AR step" for l in level_sets) + " |")
        print("|---" * (4 + len(level_sets)) + "|")
        for b in [int(x) for x in args.batches.split(",")]:
            ar = run(d, b, args.steps, "ar")
            ratios = [run(d, b, args.steps, "tidar", 16, lv)["step_ms"] / ar["step_ms"] for lv in level_sets]
            print(f"| {b} | {ar['tokens_per_s']:.0f} | {ar['step_ms']:.1f} | {100 * ar['outside_model']:.0f}% | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
