"""TiDAR on a trained model: acceptance per sampler, and decode speed vs AR of the same model.

    python -m bench.acceptance [--model models/zaya-code-tiny] [--prompts 8] [--context 256] [--max-tokens 128]

Prompts are held-out standard-library files (the trainer's split, training/data.py), cut to `context`
tokens and ended mid-line. For each sampler the same prompts run through TiDAR with K = 16 and the full
levels on every step (a static schedule, so the numbers describe the model, not the load policy), and
through plain AR; tokens/s is wall clock over the decode of the whole batch, in the same process.
"""

from __future__ import annotations

import argparse
import time

import torch

from training.data import find_corpus, texts
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

SAMPLERS = {  # name: (tidar options, sampling temperature)
    "greedy": ({"sampler": "lossless"}, 0.0),
    "lossless T=1": ({"sampler": "lossless"}, 1.0),
    "mix w=0.5 T=1": ({"sampler": "mix", "mix_weight": 0.5}, 1.0),
    "mix w=0.25 T=1": ({"sampler": "mix", "mix_weight": 0.25}, 1.0),
}
LEVELS = (0, 4, 8, 12, 16)


def prompts(engine: LLMEngine, n: int, context: int) -> list[list[int]]:
    corpus = find_corpus()
    out = []
    for text in texts(corpus, corpus.heldout):
        ids = engine.tokenizer.encode(text).ids
        if len(ids) < context + 32:
            continue
        cut = ids[:context]
        while cut and "\n" in engine.decode(cut[-1:]):  # end mid-line: the tokenizer splits code there
            cut = cut[:-1]
        out.append(cut)
        if len(out) == n:
            break
    return out


def run(model: str, mode: str, batch: list[list[int]], params: SamplingParams, tidar: dict) -> tuple[float, dict]:
    schedule = [dict(max_batch=1024, block_size=16, levels=LEVELS)]
    engine = LLMEngine(EngineConfig(model=model, mode=mode, max_num_seqs=len(batch), max_num_batched_tokens=8192,
                                    tidar=dict(block_size=16, levels=LEVELS, schedule=schedule, **tidar)))
    for p in batch:
        engine.add_request(p, params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()  # prefill, untimed
    generated, start = 0, time.perf_counter()
    stats = {"accepted": 0, "verify_steps": 0}
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.new_token_ids)
            if out.step and out.step["drafted"]:
                stats["accepted"] += out.step["accepted"]
                stats["verify_steps"] += 1
    wall = time.perf_counter() - start
    mal = 1 + stats["accepted"] / stats["verify_steps"] if stats["verify_steps"] else 1.0
    return generated / wall, {"mean_acceptance_length": mal}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe = LLMEngine(EngineConfig(model=args.model))
    all_prompts = prompts(probe, args.prompts, args.context)
    print(f"model {args.model}; {len(all_prompts)} held-out prompts of <= {args.context} tokens; "
          f"{args.max_tokens} generated; K=16, levels {list(LEVELS)}; 1 thread")
    print("| sampler | batch | mean acceptance length | TiDAR tok/s | AR tok/s | TiDAR / AR |")
    print("|---|---|---|---|---|---|")
    for name, (tidar, temperature) in SAMPLERS.items():
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=0, ignore_eos=True)
        for b in [int(x) for x in args.batches.split(",")]:
            batch = all_prompts[:b]
            ar_tps, _ = run(args.model, "ar", batch, params, {})
            td_tps, st = run(args.model, "tidar", batch, params, tidar)
            print(f"| {name} | {len(batch)} | {st['mean_acceptance_length']:.2f} | {td_tps:.0f} | {ar_tps:.0f} | "
                  f"{td_tps / ar_tps:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
