"""Prefix caching in process: TTFT and tokens/s of requests that share a long prompt prefix, cache on vs off.

    python -m bench.prefix_cache [--model models/zaya-code-tiny] [--prefix 1024] [--concurrency 1,8]
                                 [--requests 8] [--max-tokens 64] [--rounds 3] [--served] [--json out.json]

Every request is a --prefix-token prefix of real code (bench/prompts.py, outside the training data) and a
32-token suffix of its own (greedy, ignore_eos, --max-tokens). A cell is one variant (cache on or off) and
one concurrency c: a fresh engine (default mode: TiDAR), one warm-up request with the shared prefix (with
the cache on it fills the cache: a miss), then --requests requests in waves of c submitted together. Per
cell: TTFT (submit to first token) p50 of the measured requests, completion tokens/s over their wall time,
the prefix-cache hit rate (tokens found / prompt tokens looked up), and whether every output equals the other
variant's. Rounds interleave the variants (on, off, on, off, ...) and medians over rounds are quoted; one
compute thread. With --served the same cells run end to end: a fresh `tidal serve` per cell (default, or
--no-prefix-caching), streamed completions through the official openai client from c threads, TTFT = submit
to the first chunk with text, the hit rate from `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def served_cell(model: str, prefix_caching: bool, c: int, prefix: list[int], suffixes: list[list[int]],
                max_tokens: int, port: int) -> dict:
    """`cell` through `tidal serve` and the openai client (token-id prompts, streamed completions)."""
    import openai

    from bench.e2e import Server

    server = Server("tidal", model, port, () if prefix_caching else ("--no-prefix-caching",),
                    name=f"tidal-cache-{'on' if prefix_caching else 'off'}")
    server.start(Path(tempfile.mkdtemp()))
    client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=300)

    def one(suffix: list[int]) -> tuple[float, list[str], int, int]:
        start, first, text, usage = time.perf_counter(), None, [], None
        for chunk in client.completions.create(model="tidal", prompt=prefix + suffix, max_tokens=max_tokens,
                                               stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - start
            text += [ch.text for ch in chunk.choices]
            usage = chunk.usage or usage
        return first, text, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens

    try:
        one(suffixes[0])  # warm-up: with the cache on, it caches the prefix
        start, results = time.perf_counter(), []
        with ThreadPoolExecutor(c) as pool:
            rest = suffixes[1:]
            for w in range(0, len(rest), c):
                results += list(pool.map(one, rest[w : w + c]))
        wall = time.perf_counter() - start
    finally:
        server.stop()
    prompt_tokens = sum(len(prefix) + len(x) for x in suffixes[1:])
    return {"ttft_p50_s": statistics.median(r[0] for r in results), "tokens_per_s": sum(r[2] for r in results) / wall,
            "hit_rate": sum(r[3] for r in results) / prompt_tokens, "outputs": ["".join(r[1]) for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--prefix", type=int, default=1024, help="tokens of the shared prefix")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=8, help="measured requests per cell")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--served", action="store_true", help="through `tidal serve` and the openai client")
    ap.add_argument("--port", type=int, default=8600)
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
                res = (served_cell(args.model, on, c, prefix, suffixes, args.max_tokens, args.port) if args.served
                       else cell(args.model, on, c, prefix, suffixes, params))
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
