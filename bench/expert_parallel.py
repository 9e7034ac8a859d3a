"""Decode step time at EP = 1 (in-process) and EP = 2 (two Ray actors, gloo), and the communication share.

    python -m bench.expert_parallel [--batches 1,8] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.random_model import make_zaya
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine


def decode_step_ms(engine: LLMEngine, batch: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, engine.vocab_size - 4, (64,), generator=g).tolist(), params)
    engine.step()
    engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1000 * (time.perf_counter() - start) / steps
    for rid in list(engine.requests):
        engine.abort(rid)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)  # each EP actor uses one thread too
    with tempfile.TemporaryDirectory() as d:
        make_zaya(d, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=4)
        ep1 = LLMEngine(EngineConfig(model=d, kv_cache_bytes=1 << 28))
        ep2 = LLMEngine(EngineConfig(model=d, kv_cache_bytes=1 << 28, ep_size=2))
        print("| batch | EP=1 step ms | EP=2 step ms | EP=2 / EP=1 | EP=2 share in all-reduce |")
        print("|---|---|---|---|---|")
        for b in [int(x) for x in args.batches.split(",")]:
            one = decode_step_ms(ep1, b, args.steps)
            comm_before = ep2.runner.comm_seconds()
            t = time.perf_counter()
            two = decode_step_ms(ep2, b, args.steps)
            wall = time.perf_counter() - t
            share = (ep2.runner.comm_seconds() - comm_before) / wall
            print(f"| {b} | {one:.1f} | {two:.1f} | {two / one:.2f}x | {100 * share:.0f}% |", flush=True)
        ep2.runner.shutdown()


if __name__ == "__main__":
    main()
