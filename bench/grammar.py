"""Structured output, measured on the shipped model.

1. Grammar libraries on its tokenizer: compile time of a JSON schema and a regex, and the time to compute
   one token mask and to consume one token, walking a valid answer (medians over `--repeats` walks).
   llguidance is what workers/grammar.py uses; xgrammar is measured beside it when installed.
2. The engine (TiDAR, one thread; the default adaptive drafting, and K = 16 drafted at every step) with a
   JSON-schema grammar vs without, at batch 1 and 8 on held-out code prompts: tokens/s and tokens per
   forward, runs interleaved, medians.

    python -m bench.grammar [--repeats 20] [--engine-runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llguidance as llg
import torch
from tokenizers import Tokenizer

from bench.prompts import code_prompts
from tidal.cli import DEFAULT_MODEL
from workers.config import DraftRule, EngineConfig, SamplingParams, StructuredOutput, TidarConfig
from workers.engine import LLMEngine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = json.dumps({"name": "Bob the builder", "age": 42, "tags": ["a", "bb", "ccc", "dddd"] * 4},
                    separators=(",", ":"))
REGEX, REGEX_ANSWER = r"(def|class) [a-z_]{1,40}\(\):\n", "def parse_the_configuration_file():\n"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def llguidance_walk(tok: Tokenizer, grammar: str, ids: list[int]) -> tuple[float, float, float]:
    vocab = tok.get_vocab_size()
    lt = llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=2)
    start = time.perf_counter()
    m = llg.LLMatcher(lt, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    masks, consumes = [], []
    for t in ids:
        masks.append(timed(lambda: m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)))
        consumes.append(timed(lambda t=t: m.consume_token(t)))
    assert not m.is_error(), m.get_error()
    return compile_s, statistics.median(masks), statistics.median(consumes)


def xgrammar_walk(kind: str, source: str, ids: list[int]) -> tuple[float, float, float]:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)), cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(source) if kind == "json" else compiler.compile_regex(source)
    compile_s = time.perf_counter() - start
    m, bits = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, len(hf))
    masks, consumes = [], []
    for t in ids:
        masks.append(timed(lambda: m.fill_next_token_bitmask(bits)))
        consumes.append(timed(lambda t=t: m.accept_token(t)))
    return compile_s, statistics.median(masks), statistics.median(consumes)


# what a caller might ask of code: a few of its names and line numbers
OUTLINE = {"type": "object", "additionalProperties": False, "required": ["names"],
           "properties": {"names": {"type": "array", "minItems": 4, "maxItems": 4, "items": {
               "type": "object", "additionalProperties": False, "required": ["name", "line"],
               "properties": {"name": {"type": "string", "maxLength": 24}, "line": {"type": "integer"}}}}}}


def engine_run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(tokens/s, mean acceptance length: tokens per verify step) of one batch run to completion."""
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(o.stats.generated_tokens for o in outs)
    return tokens / wall, tokens / max(1, sum(o.stats.forwards for o in outs))


def engine_table(runs: int) -> None:
    always = TidarConfig(schedule=(DraftRule(max_batch=64, block_size=16, levels=(0, 4, 8, 16)),))
    engines = {"adaptive": LLMEngine(EngineConfig(model=str(DEFAULT_MODEL), mode="tidar")),
               "K=16, levels 0/4/8/16": LLMEngine(EngineConfig(model=str(DEFAULT_MODEL), mode="tidar", tidar=always))}
    prompts = code_prompts(engines["adaptive"].tokenizer, 8, 256)
    outline = StructuredOutput(json_schema=json.dumps(OUTLINE))
    variants = {"free text": SamplingParams(max_tokens=96, ignore_eos=True),
                "JSON schema": SamplingParams(max_tokens=96, structured=outline)}
    for engine in engines.values():
        engine_run(engine, prompts[:2], variants["free text"])  # warm-up
    print("| drafting | batch | output | tokens/s | tokens per forward | runs |")
    print("|---|---|---|---|---|---|")
    for drafting, engine in engines.items():
        for batch in (1, 8):
            results = {name: [] for name in variants}
            for _ in range(runs):
                for name, params in variants.items():  # interleaved: the machine's noise hits both alike
                    results[name].append(engine_run(engine, prompts[:batch], params))
            for name, rs in results.items():
                rate = statistics.median(r[0] for r in rs)
                per_forward = statistics.median(r[1] for r in rs)
                print(f"| {drafting} | {batch} | {name} | {rate:.0f} | {per_forward:.2f} | {runs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--engine-runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    cases = [("json schema", "json", json.dumps(SCHEMA), ANSWER), ("regex", "regex", REGEX, REGEX_ANSWER)]
    libraries = {"llguidance": lambda kind, source, ids: llguidance_walk(
        tok, llg.LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
        if kind == "json" else llg.LLMatcher.grammar_from_regex(source), ids)}
    try:
        import xgrammar  # noqa: F401

        libraries["xgrammar"] = xgrammar_walk
    except ImportError:
        pass
    print("| grammar | library | tokens | compile ms | mask us / token | consume us / token |")
    print("|---|---|---|---|---|---|")
    for name, kind, source, answer in cases:
        ids = tok.encode(answer).ids
        for lib, walk in libraries.items():
            runs = [walk(kind, source, ids) for _ in range(args.repeats)]
            c, m, k = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"| {name} | {lib} | {len(ids)} | {c * 1e3:.2f} | {m * 1e6:.1f} | {k * 1e6:.1f} |")
    print()
    engine_table(args.engine_runs)


if __name__ == "__main__":
    main()
