"""Where one decode step's time goes: model ops, attention, input/mask building, sampling and acceptance,
bookkeeping; then torch.profiler's top operators.

    python -m bench.step_profile [--model models/zaya-code-tiny] [--batches 1,8] [--steps 30] [--threads 1]

Each phase is timed by wrapping the function that owns it (wall clock, one thread): `tidar.layout` +
`build_inputs` (input and mask building), `paged_attention` (attention, all layers), the model's forward and
its LM / draft heads minus attention (model ops), `tidar.accept` + `tidar.set_drafts` (sampling and
acceptance; AR steps sample inside `accept` too), and the rest
of `LLMEngine.step` (scheduling, KV bookkeeping, outputs). TiDAR runs K = 16 drafts with one level-0 block
(`--modes ar,tidar:4` for K = 4).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from workers import model_runner, tidar
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

PHASES = ("model ops", "attention", "inputs and masks", "sampling and acceptance", "bookkeeping")


class PhaseClock:
    """Accumulates wall time per phase by wrapping module-level functions in place."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append((owner, name, inner))

    def restore(self) -> None:
        for owner, name, inner in reversed(self._undo):
            setattr(owner, name, inner)


def make_engine(model: str, mode: str, batch: int, prompt_len: int) -> LLMEngine:
    """`mode`: "ar", "tidar" (K = 16) or "tidar:K"; TiDAR runs one level-0 block of K drafts at every step."""
    mode, _, k = mode.partition(":")
    block, levels = int(k or 16), (0,)
    tidar_cfg = dict(block_size=block, levels=levels,
                     schedule=[dict(max_batch=10_000, block_size=block, levels=levels)])
    engine = LLMEngine(EngineConfig(model=model, mode=mode, max_num_seqs=batch, max_num_batched_tokens=100_000,
                                    kv_cache_bytes=1 << 30, tidar=tidar_cfg))
    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    for _ in range(batch):
        engine.add_request(torch.randint(4, vocab, (prompt_len,), generator=g).tolist(),
                           SamplingParams(max_tokens=100_000, ignore_eos=True))
    for _ in range(3):  # prefill, then warm-up decode steps
        engine.step()
    return engine


def attention_modules() -> list:
    """Every module that imported `paged_attention` by name (the model families)."""
    from workers.models import qwen3, zaya

    return [zaya, qwen3]


def breakdown(model: str, mode: str, batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    """Milliseconds per step for each phase."""
    engine = make_engine(model, mode, batch, prompt_len)
    clock = PhaseClock()
    runner_model = engine.runner.model
    clock.wrap(runner_model, "forward", "_forward")
    clock.wrap(runner_model, "compute_logits", "_forward")
    clock.wrap(runner_model, "compute_draft_logits", "_forward")
    for mod in attention_modules():
        clock.wrap(mod, "paged_attention", "attention")
    clock.wrap(model_runner, "build_inputs", "inputs and masks")
    clock.wrap(tidar, "layout", "inputs and masks")
    clock.wrap(tidar, "accept", "sampling and acceptance")
    clock.wrap(tidar, "set_drafts", "sampling and acceptance")
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    finally:
        clock.restore()
    s = clock.seconds
    ms = {
        "model ops": s["_forward"] - s["attention"],
        "attention": s["attention"],
        "inputs and masks": s["inputs and masks"],
        "sampling and acceptance": s["sampling and acceptance"],
    }
    ms["bookkeeping"] = wall - sum(ms.values())
    return {k: 1000 * v / steps for k, v in ms.items()} | {"step": 1000 * wall / steps}


def top_ops(model: str, mode: str, batch: int, steps: int, prompt_len: int, rows: int) -> str:
    engine = make_engine(model, mode, batch, prompt_len)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="ar,tidar")
    ap.add_argument("--ops", type=int, default=0, help="also print torch.profiler's top N operators per cell")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model {args.model}; prompt {args.prompt_len}; {args.steps} decode steps; {args.threads} thread(s); "
          "ms per step")
    print("| mode | batch | step | " + " | ".join(PHASES) + " |")
    print("|---" * (3 + len(PHASES)) + "|")
    for b in [int(x) for x in args.batches.split(",")]:
        for mode in args.modes.split(","):
            r = breakdown(args.model, mode, b, args.steps, args.prompt_len)
            cells = " | ".join(f"{r[p]:.2f} ({100 * r[p] / r['step']:.0f}%)" for p in PHASES)
            print(f"| {mode} | {b} | {r['step']:.2f} | {cells} |", flush=True)
            if args.ops:
                print(top_ops(args.model, mode, b, args.steps, args.prompt_len, args.ops))


if __name__ == "__main__":
    main()
