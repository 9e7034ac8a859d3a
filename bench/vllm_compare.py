"""AR decode tokens/s: our native engine vs vLLM (with the tidal plugin) on the same weights, same run.

    python -m bench.vllm_compare [--families zaya,qwen3] [--batches 1,8,32] [--steps 32] [--threads 1]
    python -m bench.vllm_compare --contexts 256,1024,4096,8192 --batches 1,8 [--families zaya] [--dtype bfloat16]
        [--rounds 4]
    python -m bench.vllm_compare --demo models/zaya-code-tiny [--batches 1,8] [--prompts 8] [--max-tokens 128]

Needs the vllm-cpu extra (or vllm-gpu; then both engines run on the GPU with --device cuda). For each
family a random checkpoint is written by transformers (head_dim 64: vLLM's CPU attention rejects 16),
one vLLM engine is started and kept, and for each batch size the native engine and vLLM decode the same
prompts alternately. Tokens/s counts decode steps only (prefill done and one warm-up step taken), timed
in this process around `step()`: for vLLM that includes the round trip to its engine-core process, as
in serving. Greedy tokens of both engines are compared as a sanity check.

--contexts 256,1024,4096,8192: decode step time by context length (prompt length) at each batch instead,
both engines on the same random checkpoints (max positions 16384).

--demo: a trained model on held-out prompts (bench.acceptance's), greedy, each engine running the whole
workload twice and timing the second pass (decode only): TiDAR on the native engine (its default adaptive
policy), AR on the native engine, AR on vLLM.

vLLM's CPU worker runs one torch thread bound to one core (it reserves the other for its front end on a
2-core machine); --threads sets the native engine's torch threads (default 1, the same compute).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 32


def make_checkpoint(family: str, out: Path, hidden: int, layers: int) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM, ZayaConfig, ZayaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=16384, initializer_range=0.05)
    if family == "zaya":
        cfg, cls = (ZayaConfig(moe_intermediate_size=2 * hidden, num_experts=4, router_hidden_size=64, **common),
                    ZayaForCausalLM)
    elif family == "qwen3":
        cfg, cls = Qwen3Config(intermediate_size=3 * hidden, **common), Qwen3ForCausalLM
    else:
        raise SystemExit(f"unknown family {family!r} (zaya, qwen3)")
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.fill_(1.5)
    path = out / family
    model.save_pretrained(path)
    return str(path)


def decode_rate(engine, batch: int, steps: int, seed: int, prompt_len: int = PROMPT_LEN) -> tuple[float, list[int]]:
    from workers.config import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    ids = [engine.add_request(torch.randint(0, engine.vocab_size, (prompt_len,), generator=g).tolist(), params)
           for _ in range(batch)]
    first: dict[str, list[int]] = {i: [] for i in ids}
    started: set[str] = set()
    while len(started) < batch:  # prefill (possibly chunked) until every request has its first token
        for o in engine.step():
            started.add(o.request_id)
            first[o.request_id].extend(o.new_token_ids)
    for o in engine.step():  # one warm-up decode step
        first[o.request_id].extend(o.new_token_ids)
    generated, t = 0, time.perf_counter()
    for _ in range(steps):
        for o in engine.step():
            generated += len(o.new_token_ids)
            first[o.request_id].extend(o.new_token_ids)
    wall = time.perf_counter() - t
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    return generated / wall, first[ids[0]][:8]


def workload_rate(engine, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s over `prompts` in groups of `batch` (prefill and first tokens untimed); greedy tokens of
    the first prompt."""
    from workers.config import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    generated, seconds, first = 0, 0.0, []
    for lo in range(0, len(prompts), batch):
        ids = [engine.add_request(p, params) for p in prompts[lo : lo + batch]]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while any(not t for t in tokens.values()):
            for o in engine.step():
                tokens[o.request_id].extend(o.new_token_ids)
        t = time.perf_counter()
        while engine.has_unfinished():
            for o in engine.step():
                generated += len(o.new_token_ids)
                tokens[o.request_id].extend(o.new_token_ids)
        seconds += time.perf_counter() - t
        first = first or tokens[ids[0]]
    return generated / seconds, first


def demo(args) -> None:
    """TiDAR (native) vs AR (native and vLLM) on a trained model."""
    from bench.prompts import code_prompts
    from workers.config import EngineConfig
    from workers.engine import LLMEngine
    from workers.vllm_backend import VllmEngine

    batches = [int(b) for b in args.batches.split(",")]
    common = dict(model=args.demo, max_num_seqs=max(batches), device=args.device)
    engines = {"native TiDAR": LLMEngine(EngineConfig(mode="tidar", **common)),
               "native AR": LLMEngine(EngineConfig(mode="ar", **common)),
               "vLLM AR": VllmEngine(EngineConfig(backend="vllm", **common))}
    prompts = code_prompts(engines["native AR"].tokenizer, args.prompts, args.context)
    print(f"{args.demo}: {len(prompts)} held-out prompts of <= {args.context} tokens, {args.max_tokens} greedy tokens; "
          f"native torch threads {args.threads}, vLLM {__import__('vllm').__version__}")
    print("| batch | native TiDAR tok/s | native AR tok/s | vLLM AR tok/s | TiDAR / vLLM AR | same greedy tokens |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        rates, tokens = {}, {}
        for name, engine in engines.items():
            workload_rate(engine, prompts, b, args.max_tokens)  # warm-up pass (and the adaptive policy's learning)
            rates[name], tokens[name] = workload_rate(engine, prompts, b, args.max_tokens)
        same = len({tuple(t) for t in tokens.values()}) == 1
        print(f"| {b} | {rates['native TiDAR']:.0f} | {rates['native AR']:.0f} | {rates['vLLM AR']:.0f} | "
              f"{rates['native TiDAR'] / rates['vLLM AR']:.2f}x | {same} |", flush=True)
    engines["vLLM AR"].shutdown()


def by_context(args) -> None:
    """Decode step time vs context length, native and vLLM on the same checkpoints, alternately."""
    from workers.config import EngineConfig
    from workers.engine import LLMEngine
    from workers.vllm_backend import VllmEngine

    batches, contexts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")]
    print("| model | round | batch | context | native step ms | vLLM step ms | native / native at shortest | "
          "vLLM / vLLM at shortest |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = make_checkpoint(family, Path(tmp), args.hidden, args.layers)
            common = dict(model=path, max_num_seqs=max(batches), max_num_batched_tokens=2048,
                          kv_cache_bytes=2 << 30, device=args.device, dtype=args.dtype)
            engines = {"native": LLMEngine(EngineConfig(**common)),
                       "vllm": VllmEngine(EngineConfig(backend="vllm", **common))}
            for b in batches:
                for r in range(args.rounds):  # each round times every context afresh: ratios within a round
                    base = None
                    for c in contexts:
                        ms = {name: 1000 * b / decode_rate(e, b, args.steps, seed=c, prompt_len=c)[0]
                              for name, e in engines.items()}
                        base = base or ms
                        print(f"| {family} | {r + 1} | {b} | {c} | {ms['native']:.1f} | {ms['vllm']:.1f} | "
                              f"{ms['native'] / base['native']:.2f}x | {ms['vllm'] / base['vllm']:.2f}x |", flush=True)
            engines["vllm"].shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", help="decode step time at these prompt lengths instead (e.g. 256,1024,4096,8192)")
    ap.add_argument("--demo", help="a trained TiDAR model dir: TiDAR (native) vs AR (native, vLLM) on it")
    ap.add_argument("--prompts", type=int, default=8, help="--demo: held-out prompts")
    ap.add_argument("--context", type=int, default=256, help="--demo: prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=128, help="--demo: tokens generated per prompt")
    ap.add_argument("--families", default="zaya,qwen3")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the native engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1, help="--contexts: time every context this many times")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights, activations and KV cache of both engines")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    if args.demo:
        return demo(args)
    if args.contexts:
        return by_context(args)
    from workers.config import EngineConfig
    from workers.engine import LLMEngine
    from workers.vllm_backend import VllmEngine

    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = make_checkpoint(family, Path(tmp), args.hidden, args.layers)
            common = dict(model=path, max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * PROMPT_LEN,
                          kv_cache_bytes=256 << 20, device=args.device, dtype=args.dtype)
            native = LLMEngine(EngineConfig(**common))
            t = time.perf_counter()
            vllm = VllmEngine(EngineConfig(backend="vllm", **common))
            start_s = time.perf_counter() - t
            for b in batches:
                n_rate, n_tok = decode_rate(native, b, args.steps, seed=b)
                v_rate, v_tok = decode_rate(vllm, b, args.steps, seed=b)
                rows.append({"family": family, "batch": b, "native_tok_s": round(n_rate, 1),
                             "vllm_tok_s": round(v_rate, 1), "vllm_over_native": round(v_rate / n_rate, 2),
                             "same_greedy_tokens": n_tok == v_tok, "vllm_start_s": round(start_s, 1)})
                print(json.dumps(rows[-1]), flush=True)
            vllm.shutdown()
    print(f"\n{'family':<7} {'batch':>5} {'native tok/s':>13} {'vLLM tok/s':>11} {'vLLM/native':>12} "
          f"{'same tokens':>12}")
    for r in rows:
        print(f"{r['family']:<7} {r['batch']:>5} {r['native_tok_s']:>13} {r['vllm_tok_s']:>11} "
              f"{r['vllm_over_native']:>12} {str(r['same_greedy_tokens']):>12}")
    print(f"(hidden {args.hidden}, {args.layers} layers, head_dim 64, prompt {PROMPT_LEN}, {args.steps} decode steps, "
          f"native torch threads {args.threads}, vLLM {__import__('vllm').__version__})")


if __name__ == "__main__":
    main()
