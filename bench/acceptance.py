"""TiDAR on a trained model: acceptance per sampler, and decode speed vs AR of the same model.

    python -m bench.acceptance [--model models/zaya-code-tiny] [--source stdlib|outside] [--prompts 8]
                               [--context 256] [--max-tokens 128] [--batches 1,8] [--layouts ...]
                               [--json out.json] [--plot out.png]

Prompts (bench/prompts.py): held-out standard-library files (the trainer's split) or code from outside the
standard library, cut to `context` tokens and ended mid-line. At batch b the prompts run in groups of b.
Every configuration runs the whole workload twice on one engine and times the second pass (warm allocator,
and a warm adaptive policy, as in a long-running server); tokens/s is wall clock over the decode, prefill
excluded, in the same process.
- "levels": K = 16, levels (0, 4, 8, 16) on every step, single forward (the engine's default levels).
- "dense": K = 16 with every level 0..16 on every step: the model's mean acceptance length at K = 16.
- "two-forward": K = 16, a verify pass then a draft pass over [anchor, K masks] (tidar.two_forward): drafts
  that know the anchor, for two forwards per step.
- "adaptive": the engine's default load-aware policy (what `tidal generate` / `tidal serve` do).
- "k<K>" (e.g. k2), "k<K>-<levels>" (e.g. k4-0+2), "tf<K>" (e.g. tf4): a static small layout on every step,
  single forward with those levels (default level 0), or two-forward: what each costs against what it is
  accepted, at the K the adaptive policy chooses among.
- "AR": plain autoregressive decoding of the same model and prompts: the baseline of every ratio.
With --rounds N the whole sequence (AR, then every layout) runs N times, interleaved, and the table gives
each layout's median tokens/s and its TiDAR / AR ratio per round: the machine's drift falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.prompts import SOURCES, code_prompts
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

K = 16
SAMPLERS = {  # name: (tidar options, sampling temperature)
    "greedy": ({"sampler": "lossless"}, 0.0),
    "lossless T=1": ({"sampler": "lossless"}, 1.0),
    "mix w=0.5 T=1": ({"sampler": "mix", "mix_weight": 0.5}, 1.0),
    "mix w=0.25 T=1": ({"sampler": "mix", "mix_weight": 0.25}, 1.0),
}
DENSE = tuple(range(K + 1))
LEVELS = (0, 4, 8, 16)
LAYOUTS = ("levels", "dense", "two-forward", "adaptive")


def static_layout(layout: str) -> dict | None:
    """TidarConfig options of a "k<K>[-<levels>]" or "tf<K>" layout name; None for the named layouts."""
    two_forward = layout.startswith("tf")
    spec = layout[2:] if two_forward else layout[1:] if layout.startswith("k") else ""
    k, _, levels = spec.partition("-")
    if not k.isdigit():
        return None
    lv = tuple(int(x) for x in levels.split("+")) if levels else (0,)
    return dict(block_size=int(k), levels=lv, two_forward=two_forward,
                schedule=[dict(max_batch=1024, block_size=int(k), levels=lv)])


def engine_for(model: str, mode: str, batch: int, layout: str, tidar: dict) -> LLMEngine:
    if mode == "ar":
        return LLMEngine(EngineConfig(model=model, mode="ar", max_num_seqs=batch, max_num_batched_tokens=8192))
    options, static = dict(block_size=K, **tidar), static_layout(layout)
    if static is not None:
        options.update(static)
    elif layout in ("dense", "levels"):
        levels = DENSE if layout == "dense" else LEVELS
        options.update(levels=levels, schedule=[dict(max_batch=1024, block_size=K, levels=levels)])
    elif layout == "two-forward":
        options.update(two_forward=True, schedule=[dict(max_batch=1024, block_size=K, levels=(0,))])
    return LLMEngine(EngineConfig(model=model, mode="tidar", max_num_seqs=batch,
                                  max_num_batched_tokens=max(8192, batch * (K + 1) * (len(DENSE) + 1)), tidar=options))


def decode(engine: LLMEngine, group: list[list[int]], params: SamplingParams, record: dict | None) -> tuple[int, float]:
    """Run one group to completion; returns (tokens generated, decode seconds) and records per-step stats."""
    for p in group:
        engine.add_request(p, params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()  # prefill, untimed
    generated, start = 0, time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.new_token_ids)
            if record is not None and out.step:
                record["steps"] += 1
                record["layouts"][out.step.drafted] = record["layouts"].get(out.step.drafted, 0) + 1
                if out.step.drafted:
                    record["verifies"].append((out.step.drafted, out.step.accepted))
    return generated, time.perf_counter() - start


def measure(model: str, mode: str, layout: str, prompts_: list[list[int]], batch: int, params: SamplingParams,
            tidar: dict) -> dict:
    engine = engine_for(model, mode, batch, layout, tidar)
    groups = [prompts_[i : i + batch] for i in range(0, len(prompts_), batch)]
    for g in groups:  # warm-up pass
        decode(engine, g, params, None)
    record = {"steps": 0, "layouts": {}, "verifies": []}
    tokens = seconds = 0.0
    for g in groups:
        n, s = decode(engine, g, params, record)
        tokens, seconds = tokens + n, seconds + s
    v = record["verifies"]
    accepted = sum(a for _, a in v)
    by_pos = []
    for i in range(1, K + 1):  # draft i is tried when >= i drafts were offered and drafts 1..i-1 were accepted
        tried = sum(1 for d, a in v if d >= i and a >= i - 1)
        by_pos.append(round(sum(1 for d, a in v if d >= i and a >= i) / tried, 4) if tried else None)
    return {"tok_s": tokens / seconds, "tokens": int(tokens), "verify_steps": len(v),
            "mean_acceptance_length": 1 + accepted / len(v) if v else 1.0,
            "drafting_share": len(v) / max(1, record["steps"]), "acceptance_by_position": by_pos}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in results["rows"]:
        if row["batch"] == 1 and row["layout"] in ("levels", "two-forward"):
            reach, run = [], 1.0  # P(drafts 1..i all accepted): the product of the per-position rates
            for r in row["acceptance_by_position"]:
                run *= r if r is not None else 0.0
                reach.append(run)
            name = row["sampler"] + (" two-forward" if row["layout"] == "two-forward" else "")
            left.plot(range(1, K + 1), reach, marker="o", label=f"{name} (MAL {row['mean_acceptance_length']:.2f})")
    left.set(xlabel="draft position i", ylabel="P(drafts 1..i all accepted)", ylim=(0, 1),
             title="How far a step's drafts are accepted (K=16, batch 1)")
    left.legend(fontsize=8)
    greedy = [r for r in results["rows"] if r["sampler"] == "greedy"]
    batches = sorted({r["batch"] for r in greedy})
    width = 0.2
    shown = ["ar"] + [lay for lay in LAYOUTS if any(r["layout"] == lay for r in greedy)]
    for j, layout in enumerate(shown):
        ys = [next((r["tok_s"] if layout != "ar" else r["ar_tok_s"]) for r in greedy
                   if r["batch"] == b and (layout == "ar" or r["layout"] == layout)) for b in batches]
        label = "AR" if layout == "ar" else f"TiDAR {layout}"
        right.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(batches))], ys, width, label=label)
    right.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    right.set(ylabel="decode tokens/s (1 CPU thread)", title="Greedy decode speed, same model and prompts")
    right.legend(fontsize=8)
    fig.suptitle(results["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--source", default="stdlib", choices=SOURCES, help="prompt files (bench/prompts.py)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help="greedy layouts, from: " + ", ".join(LAYOUTS) + ", k<K>, k<K>-<l1>+<l2>..., tf<K>")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats; medians are reported")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated names from: " + ", ".join(SAMPLERS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG here (needs matplotlib: the 'bench' extra)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe = LLMEngine(EngineConfig(model=args.model))
    all_prompts = code_prompts(probe.tokenizer, args.prompts, args.context, args.source)
    print(f"model {args.model}; {len(all_prompts)} {args.source} prompts of <= {args.context} tokens; "
          f"{args.max_tokens} generated; K={K}; 1 thread; second of two passes timed; {args.rounds} round(s)")
    print("| sampler | batch | layout | mean acceptance length | drafting steps | TiDAR tok/s | AR tok/s "
          "| TiDAR / AR |")
    print("|---|---|---|---|---|---|---|---|")
    results = {"model": args.model, "source": args.source, "prompts": len(all_prompts), "context": args.context,
               "max_tokens": args.max_tokens, "rows": []}
    for name in args.samplers.split(","):
        tidar, temperature = SAMPLERS[name]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=0, ignore_eos=True)
        for b in [int(x) for x in args.batches.split(",")]:
            layouts = args.layouts.split(",") if name == "greedy" else [l for l in ("levels", "two-forward")
                                                                        if l in args.layouts.split(",")]
            rounds = []  # per round: AR's tok/s, then each layout's measurement
            for _ in range(args.rounds):
                ar = measure(args.model, "ar", "", all_prompts, b, params, {})["tok_s"]
                rounds.append((ar, [measure(args.model, "tidar", layout, all_prompts, b, params, tidar)
                                    for layout in layouts]))
            for i, layout in enumerate(layouts):
                td = dict(rounds[len(rounds) // 2][1][i])  # acceptance statistics: the middle round's
                td["tok_s"] = statistics.median(r[1][i]["tok_s"] for r in rounds)
                ratios = [r[1][i]["tok_s"] / r[0] for r in rounds]
                row = {"sampler": name, "batch": b, "layout": layout, **td,
                       "ar_tok_s": statistics.median(r[0] for r in rounds), "speedup": statistics.median(ratios),
                       "speedup_per_round": [round(x, 3) for x in ratios]}
                results["rows"].append(row)
                print(f"| {name} | {b} | {layout} | {td['mean_acceptance_length']:.2f} | "
                      f"{td['drafting_share']:.0%} | {td['tok_s']:.0f} | {row['ar_tok_s']:.0f} | {row['speedup']:.2f}x"
                      + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "") + " |",
                      flush=True)
    for row in results["rows"]:
        if row["layout"] in ("levels", "dense", "two-forward") and row["batch"] == 1:
            print(f"acceptance by position, {row['sampler']} {row['layout']}: {row['acceptance_by_position']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
