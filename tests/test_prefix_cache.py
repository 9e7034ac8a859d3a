"""Prefix caching (issue 18): outputs are the same with and without the cache, and a request resumed from
cached blocks (and, for ZAYA, the CCA state kept with them) continues exactly as one that computed them.

References we did not write: transformers' greedy continuations and full-sequence logits (test_tidar's
tiny-vocabulary checkpoints, where TiDAR drafts are often accepted), and the same engine with the cache
off. The block manager's own properties (sharing, eviction, no leak) are in test_block_manager.py.
"""

from __future__ import annotations

import pytest
import test_tidar
import torch
from conftest import assert_engine_idle
from test_tidar import BLOCK, engine_for, pool_bytes, prompt_of, run_with_arrivals, static

from workers.config import SamplingParams
from workers.layout import StepLayout

ckpts = test_tidar.ckpts  # fixture: a tiny-vocabulary checkpoint per family, with a mask token
FAMILIES = ("zaya", "qwen3", "qwen3_moe")
SHARED = prompt_of(14, 77)  # three full blocks of 4 and two tokens: the prefix every request starts with


def workload() -> dict[int, list[tuple[list[int], SamplingParams]]]:
    """Requests sharing SHARED (and one sharing more of it with another), arriving while earlier ones run
    and after they finished, one prompt that is all cached blocks, and one unrelated prompt."""
    suffix = [prompt_of(n, 300 + n) for n in (3, 6, 1, 9)]
    return {0: [(SHARED + suffix[0], SamplingParams(max_tokens=14)), (prompt_of(7, 5), SamplingParams(max_tokens=9))],
            3: [(SHARED + suffix[1], SamplingParams(max_tokens=11))],
            9: [(SHARED + suffix[0] + suffix[2], SamplingParams(max_tokens=12))],
            30: [(SHARED[:12], SamplingParams(max_tokens=10)), (SHARED + suffix[3], SamplingParams(max_tokens=13)),
                 (SHARED + suffix[1], SamplingParams(max_tokens=8))]}


def outputs(engine, arrivals) -> list[list[int]]:
    done = run_with_arrivals(engine, arrivals)
    return [out.output_token_ids for _, out in sorted(done.values(), key=lambda d: d[0].arrival)]


@pytest.mark.parametrize("mode", ["ar", "tidar"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pool", ["roomy", "tiny"])
def test_greedy_outputs_are_the_same_with_and_without_the_cache(ckpts, family, mode, pool):
    """Greedy outputs with the cache equal those without it and transformers' own; later requests really
    hit (hits counted, cached tokens reported); with a pool of 16 blocks requests are also preempted and
    resume from the blocks they cached themselves, and cached blocks are evicted for new ones."""
    ck = ckpts[family]
    kw = dict(tidar=static(4, (0, 2, 4))) if mode == "tidar" else dict(mode="ar")
    if pool == "tiny":
        kw["kv_cache_bytes"] = pool_bytes(ck, 16)
    arrivals = workload()
    cached = engine_for(ck, **kw)
    uncached = engine_for(ck, prefix_caching=False, **kw)
    got = outputs(cached, arrivals)
    assert got == outputs(uncached, arrivals)
    prompts = [(p, sp.max_tokens) for step in sorted(arrivals) for p, sp in arrivals[step]]
    assert got == [ck.greedy(p, n) for p, n in prompts]
    assert cached.blocks.hits >= 3 * BLOCK * 3 and uncached.blocks.hits == 0
    assert cached.blocks.queries == sum(len(p) for p, _ in prompts)
    if pool == "tiny":
        assert cached.blocks.num_blocks == 16
    assert_engine_idle(cached)
    assert_engine_idle(uncached)


def test_preempted_and_aborted_requests_leave_the_cache_consistent(ckpts):
    """A pool of 12 blocks, TiDAR, requests aborted while they hold shared blocks: the others still produce
    transformers' tokens, and afterwards every block is free or cached and evictable."""
    ck = ckpts["zaya"]
    engine = engine_for(ck, kv_cache_bytes=pool_bytes(ck, 12), tidar=static(4, (0, 2, 4)))
    jobs = [(SHARED + prompt_of(n, 400 + n), 24 + n) for n in range(4)]
    ids = [engine.add_request(*jobs[0][:1], SamplingParams(max_tokens=jobs[0][1]))]
    finals = {}
    for out in engine.step() + engine.step():  # the first one's prompt is computed and cached
        assert not out.finished
    ids += [engine.add_request(p, SamplingParams(max_tokens=n)) for p, n in jobs[1:]]
    reqs = [engine.requests[i] for i in ids]
    for _ in range(1000):
        for r in reqs[1:3]:  # abort these two once they run on a block another request holds too
            if not r.finished and any(engine.blocks.ref_counts[b] > 1 for b in r.block_table):
                engine.abort(r.request_id)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished():
            break
    for i in (0, 3):
        assert finals[ids[i]].output_token_ids == ck.greedy(*jobs[i])
    assert reqs[1].finish_reason == reqs[2].finish_reason == "abort"
    assert sum(r.stats.preemptions for r in reqs) > 0 and engine.blocks.hits > 0
    assert_engine_idle(engine)


@pytest.mark.parametrize("family", ["zaya", "qwen3"])
def test_a_request_resumed_from_cached_blocks_continues_with_the_computed_logits(ckpts, family):
    """After its first step, a request that started from cached blocks (and for ZAYA from the CCA state
    kept with them) holds KV and state that give transformers' logits for its next token, as a request
    that computed its whole prompt does."""
    ck = ckpts[family]
    engines = {on: engine_for(ck, mode="ar", prefix_caching=on) for on in (True, False)}
    prompt = SHARED + prompt_of(5, 91)
    logits = {}
    for on, engine in engines.items():
        engine.generate([SHARED + prompt_of(2, 90)], SamplingParams(max_tokens=3))  # caches SHARED's blocks
        rid = engine.add_request(prompt, SamplingParams(max_tokens=4))
        req = engine.requests[rid]
        engine.step()  # the rest of the prompt; its first token
        assert req.stats.cached_tokens == (3 * BLOCK if on else 0)
        n = req.num_computed_tokens
        assert n == len(prompt)
        lay = StepLayout([req.all_token_ids[-1]], [n], [-1], 0, [0])
        logits[on] = engine.runner.forward([lay], [n], [req.block_table], [req.state_slot])[0]
        first = req.output_token_ids[0]
        engine.abort(rid)
        assert_engine_idle(engine)
    torch.testing.assert_close(logits[True], ck.logits(prompt + [first])[-1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
