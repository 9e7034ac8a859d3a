"""Prefix caching in process: TTFT and tokens/s of requests that share a long prompt prefix, cache on vs off.

    python -m bench.prefix_cache [--model models/zaya-code-tiny] [--prefix 1024] [--concurrency 1,8]
                                 [--requests 8] [--max-tokens 64] [--rounds 3] [--json out.json]

Every request is a --prefix-token prefix of real code (bench/prompts.py, outside the training data) and a
32-token suffix of its own (greedy, ignore_eos, --max-tokens). A cell is one variant (cache on or off) and
one concurrency c: a fresh engine (default mode: TiDAR), one warm-up request with the shared prefix (with
the cache on it fills the cache: a miss), then --requests requests in waves of c submitted together. Per
cell: TTFT (submit to first token) p50 of the measured requests, completion tokens/s over their wall time,
the prefix-cache hit rate (tokens found / prompt tokens looked up), and whether every output equals the other
variant's. Rounds interleave the variants (on, off, on, off, ...) and medians over rounds are quoted; one
compute thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.prompts import code_prompts
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine
from workers.loader import load_tokenizer


def run_wave(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
             ) -> tuple[list[float], list[list[int]]]:
    """Submit `prompts` together and run them to the end: (TTFT of each, output tokens of each)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    while len(outputs) < len(ids):
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
    return [first[i] for i in ids], [outputs[i] for i in ids]


def cell(model: str, prefix_caching: bool, c: int, prefix: list[int], suffixes: list[list[int]],
         params: SamplingParams) -> dict:
    engine = LLMEngine(EngineConfig(model=model, mode="tidar", prefix_caching=prefix_caching))
    run_wave(engine, [prefix + suffixes[0]], params)  # warm-up: with the cache on, it caches the prefix
    queries, hits = engine.blocks.queries, engine.blocks.hits
    ttfts, outputs = [], []
    start = time.perf_counter()
    rest = suffixes[1:]
    for w in range(0, len(rest), c):
        t, o = run_wave(engine, [prefix + s for s in rest[w : w + c]], params)
        ttfts += t
        outputs += o
    wall = time.perf_counter() - start
    looked_up = engine.blocks.queries - queries
    return {"ttft_p50_s": statistics.median(ttfts), "tokens_per_s": sum(map(len, outputs)) / wall,
            "hit_rate": (engine.blocks.hits - hits) / looked_up if looked_up else 0.0, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--prefix", type=int, default=1024, help="tokens of the shared prefix")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=8, help="measured requests per cell")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tokenizer = load_tokenizer(args.model)
    prefix = code_prompts(tokenizer, 1, args.prefix, source="outside")[0]
    suffixes = code_prompts(tokenizer, args.requests + 1 + 40, 32, source="outside")[40:]  # other files
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    runs: dict[tuple[int, bool], list[dict]] = {(c, on): [] for c in levels for on in (True, False)}
    for r in range(args.rounds):
        for c in levels:
            for on in (True, False):
                res = cell(args.model, on, c, prefix, suffixes, params)
                runs[(c, on)].append(res)
                print(f"round {r} c={c} cache={'on' if on else 'off'}: TTFT p50 {1000 * res['ttft_p50_s']:.0f} ms, "
                      f"{res['tokens_per_s']:.0f} tokens/s, hit rate {res['hit_rate']:.2f}", flush=True)
    table = []
    for c in levels:
        on, off = runs[(c, True)], runs[(c, False)]
        med = {name: {k: statistics.median(x[k] for x in rs) for k in ("ttft_p50_s", "tokens_per_s", "hit_rate")}
               for name, rs in (("on", on), ("off", off))}
        same = all(a["outputs"] == b["outputs"] for a, b in zip(on, off, strict=True))
        ratio = statistics.median(b["ttft_p50_s"] / a["ttft_p50_s"] for a, b in zip(on, off, strict=True))
        table.append({"concurrency": c, "cache_on": med["on"], "cache_off": med["off"],
                      "ttft_miss_over_hit": ratio, "outputs_identical": same})
        print(f"c={c}: TTFT on {1000 * med['on']['ttft_p50_s']:.0f} ms / off {1000 * med['off']['ttft_p50_s']:.0f} ms "
              f"({ratio:.1f}x), tokens/s on {med['on']['tokens_per_s']:.0f} / off {med['off']['tokens_per_s']:.0f}, "
              f"hit rate {med['on']['hit_rate']:.2f}, outputs identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cells": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
