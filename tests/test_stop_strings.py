"""Stop strings in the engine: TiDAR ends exactly where AR greedy decoding ends, also when the stop string
completes in the middle of an accepted block or spans a token boundary, and both end where decoding every
prefix of the unstopped output says (the reference in conftest, not the engine's detokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_engine_idle, make_engine, stop_by_prefixes

from workers.config import DraftRule, SamplingParams, TidarConfig
from workers.detokenizer import Detokenizer
from workers.request import InvalidRequest

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "zaya-code-tiny"  # trained drafts: blocks get accepted
PROMPTS = [
    'class Queue:\n    """A simple FIFO queue."""\n\n    def __init__(self, maxsize=0):\n'
    '        self.maxsize = maxsize\n        self.queue = []\n\n    def put(self, item):\n'
    '        if self.maxsize > 0 and len(self.queue) >= self.maxsize:\n'
    '            raise ValueError("queue is full")\n        self.queue.append(item)\n\n    def get(self):\n',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n    a, b = 0, 1\n'
    "    for _ in range(n - 1):\n        a, b = b, a + b\n    return b\n\n\ndef factorial(n):\n",
    'def read_config(filename):\n    result = {}\n    with open(filename) as f:\n        for line in f:\n'
    '            line = line.strip()\n            if not line or line.startswith("#"):\n                continue\n'
    '            key, _, value = line.partition("=")\n',
]
# A static drafting rule: the adaptive policy follows measured step times, so its blocks could differ between
# the unstopped run that picks a stop string and the stopped run that must cut a block at it.
DRAFTING = TidarConfig(schedule=(DraftRule(max_batch=64, block_size=16, levels=(0, 4, 8, 16)),))
N = 48


@pytest.fixture(scope="module")
def engines():
    return {mode: make_engine(SHIPPED, mode=mode, kv_cache_bytes=1 << 22, tidar=DRAFTING) for mode in ("ar", "tidar")}


def params(stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=N, ignore_eos=True, stop=stop)


def run(engine, prompt: str, stop: tuple[str, ...] = ()) -> list:
    """Every output the engine streams for one request, in order."""
    engine.add_request(prompt, params(stop))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert_engine_idle(engine)  # a stopped request holds no KV block and no state slot
    return outs


def ends(tokenizer, ids: list[int]) -> list[int]:
    """Characters of text after each prefix of the output: ends[n] is len(decode(ids[:n]))."""
    return [len(tokenizer.decode(ids[:n])) for n in range(len(ids) + 1)]


def spanning_stop(tokenizer, ids: list[int], last: int) -> tuple[str, ...] | None:
    """A stop string of the last character of token last - 1 and the first of token last (0-based), found
    nowhere earlier, so it completes inside token `last`; None where token `last` has under two characters."""
    e = ends(tokenizer, ids)
    if e[last] - e[last - 1] < 1 or e[last + 1] - e[last] < 2:
        return None
    text = tokenizer.decode(ids)
    stop = text[e[last] - 1 : e[last] + 1]
    if text.find(stop) != e[last] - 1 or "\ufffd" in stop:
        return None
    return (stop,)


def test_tidar_stops_where_ar_does_mid_block_and_across_token_boundaries(engines):
    """For each prompt: a stop string spanning two tokens, chosen to complete at a token TiDAR committed in
    the middle of a block (not the block's last token), so the stopping step cuts accepted drafts."""
    tok = engines["ar"].tokenizer
    mid_block_cuts = 0
    for prompt in PROMPTS:
        ar_ids = [t for o in run(engines["ar"], prompt) for t in o.new_token_ids]
        tidar_steps = run(engines["tidar"], prompt)
        assert [t for o in tidar_steps for t in o.new_token_ids] == ar_ids
        # 0-based output indices that TiDAR committed inside a block, with later tokens of that block after it
        inside, pos = [], 0
        for o in tidar_steps:
            inside += range(pos, pos + len(o.new_token_ids) - 1)
            pos += len(o.new_token_ids)
        candidates = [(i, s) for i in inside if i >= 1 and (s := spanning_stop(tok, ar_ids, i))]
        assert candidates, prompt
        last, stop = candidates[len(candidates) // 2]
        want_text, want_tokens = stop_by_prefixes(tok, ar_ids, stop)
        assert want_tokens == last + 1

        ar, tidar = run(engines["ar"], prompt, stop), run(engines["tidar"], prompt, stop)
        for outs in (ar, tidar):
            final = outs[-1]
            assert final.finished and final.finish_reason == "stop"
            assert final.output_token_ids == ar_ids[:want_tokens]  # the token completing the stop is the last
            assert [t for o in outs for t in o.new_token_ids] == final.output_token_ids
            assert final.stats.generated_tokens == want_tokens  # usage counts up to the completing token
            assert Detokenizer(tok, stop).add(final.output_token_ids, final=True) == want_text
        step = tidar[-1].step
        mid_block_cuts += step.accepted + 1 > step.committed
    assert mid_block_cuts == len(PROMPTS)  # every stopping step dropped tokens it had accepted


def test_batched_requests_with_several_stops_each_end_at_their_earliest_match(engines):
    """Requests with different stops run together, one of them with none; each stops as the reference says."""
    tok = engines["tidar"].tokenizer
    unstopped = engines["ar"].generate(PROMPTS, params())
    stops = []
    for out in unstopped:
        text = tok.decode(out.output_token_ids)
        stops.append((text[30:33], text[12:14], "\x00never"))  # the earlier match wins, wherever it is listed
    stops[-1] = ()
    for mode in ("ar", "tidar"):
        outs = engines[mode].generate(PROMPTS, [params(s) for s in stops])
        for ref, out, stop in zip(unstopped, outs, stops, strict=True):
            want_text, want_tokens = stop_by_prefixes(tok, ref.output_token_ids, stop)
            assert out.output_token_ids == ref.output_token_ids[:want_tokens]
            assert out.finish_reason == ("stop" if stop else "length")
            assert Detokenizer(tok, stop).add(out.output_token_ids, final=True) == want_text
        assert_engine_idle(engines[mode])


def test_stop_strings_are_validated():
    """Up to four stop strings of 1 to 1,000 characters, as OpenAI allows."""
    assert SamplingParams(stop=("a", "b", "c", "x" * 1000)).stop == ("a", "b", "c", "x" * 1000)
    for bad in (("",), ("a",) * 5, ("x" * 1001,)):
        with pytest.raises(ValueError):
            SamplingParams(stop=bad)


def test_stop_strings_need_a_tokenizer(ckpt):
    """A model directory without tokenizer.json: stop strings are refused with a message, not ignored."""
    engine = make_engine(ckpt, kv_cache_bytes=1 << 20)
    assert engine.tokenizer is None
    with pytest.raises(InvalidRequest, match="tokenizer"):
        engine.add_request(ckpt.prompt(4, 0), params(("x",)))
    assert_engine_idle(engine)
