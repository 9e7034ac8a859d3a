"""The block manager never leaks: plain unit tests, and property tests driving a real LLMEngine.

The engine runs a tiny random Qwen3 / ZAYA checkpoint (built here with transformers) on a KV pool of
only 8-12 blocks of 4 tokens, in AR and TiDAR mode (one- and two-forward), so random workloads hit
chunked prefill, the running-slot limit, draft KV rollback and preemption. After every operation the test
checks that each block is either free or in exactly one live request's block table, that reference counts
agree, that state slots are conserved, and that no request holds more blocks than its computed tokens
need. At the end everything must be free again.

EngineConfig refuses kv_cache_bytes below 64 KiB, so to get a pool of ~10 blocks the checkpoints use
head_dim 128 (2 layers x 1 KV head x 4 tokens x 128 x fp32 x K,V = 8 KiB per block); the models are
still a few tens of thousands of parameters and a fresh engine loads in a few milliseconds, so every
hypothesis example gets its own engine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_engine_idle
from conftest import make_engine as conftest_make_engine
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from workers.block_manager import BlockManager
from workers.config import DraftRule, SamplingParams, TidarConfig
from workers.engine import LLMEngine
from workers.request import Request, Status

VOCAB = 64
BLOCK_SIZE = 4
HEAD_DIM = 128
BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 1 * HEAD_DIM * 4  # K and V, 2 layers, 1 kv head, fp32


# ---- tiny checkpoints ----------------------------------------------------------------------------


def _save_qwen3(path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


def _save_zaya(path) -> None:
    from transformers import ZayaConfig, ZayaForCausalLM

    cfg = ZayaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=HEAD_DIM, moe_intermediate_size=32, num_experts=2,
                     router_hidden_size=16, max_position_embeddings=128,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    ZayaForCausalLM(cfg).save_pretrained(path)



@pytest.fixture(scope="module")
def bm_checkpoints(tmp_path_factory) -> dict[str, str]:
    out = {}
    for name, save in (("qwen3", _save_qwen3), ("zaya", _save_zaya)):
        path = tmp_path_factory.mktemp(f"bm-{name}")
        save(path)
        out[name] = str(path)
    return out


# TiDAR: drafts get KV blocks, are verified, and the rejected ones are trimmed back off every step. The
# draft schedule is static (by batch size, falling back to AR when the token budget is short) so that
# every hypothesis example is deterministic and replayable.
MODES = {
    "ar": {},
    "tidar": dict(mode="tidar", tidar=TidarConfig(
        block_size=3, levels=(0, 1, 3), mask_token_id=VOCAB - 1,
        schedule=(DraftRule(max_batch=2, block_size=3, levels=(0, 1, 3)),
                  DraftRule(max_batch=4, block_size=1, levels=(0,))))),
    "tidar2f": dict(mode="tidar", tidar=TidarConfig(
        block_size=3, levels=(0, 2), mask_token_id=VOCAB - 1, two_forward=True,
        schedule=(DraftRule(max_batch=4, block_size=3, levels=(0, 2)),))),
    # the default, adaptive policy times its steps, so it is not deterministic: plain tests only
    "tidar_adaptive": dict(mode="tidar", tidar=TidarConfig(block_size=3, levels=(0, 1, 3), mask_token_id=VOCAB - 1)),
}


def make_engine(model_dir: str, num_blocks: int = 10, max_num_seqs: int = 3,
                max_num_batched_tokens: int = 16, mode: str = "ar") -> LLMEngine:
    engine = conftest_make_engine(model_dir, block_size=BLOCK_SIZE, kv_cache_bytes=num_blocks * BYTES_PER_BLOCK,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  **MODES[mode])
    assert engine.blocks.num_blocks == num_blocks
    return engine


# ---- invariants ----------------------------------------------------------------------------------


def check_invariants(engine: LLMEngine, finished: list[Request] = ()) -> None:
    bm, sched = engine.blocks, engine.scheduler
    running, waiting = list(sched.running), list(sched.waiting)
    live = running + waiting

    # request bookkeeping: every live request is known to the engine exactly once, and vice versa
    assert len({id(r) for r in live}) == len(live), "a request is queued twice"
    assert {r.request_id for r in live} == set(engine.requests), "engine.requests disagrees with the scheduler"
    assert all(r.status is Status.RUNNING for r in running)
    assert all(r.status is Status.WAITING for r in waiting)
    assert len(running) <= sched.max_num_seqs

    # blocks: free, or in exactly one live request's table
    free = list(bm.free_blocks)
    assert len(set(free)) == len(free), f"a block is on the free list twice: {free}"
    owner: dict[int, str] = {}
    for r in live:
        for b in r.block_table:
            assert 0 <= b < bm.num_blocks
            assert b not in owner, f"block {b} held by both {owner[b]} and {r.request_id}"
            owner[b] = r.request_id
    assert not set(free) & set(owner), f"blocks both free and held: {set(free) & set(owner)}"
    assert len(free) + len(owner) == bm.num_blocks, (
        f"leaked blocks: {set(range(bm.num_blocks)) - set(free) - set(owner)}")
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == (1 if b in owner else 0), f"block {b}: ref count {bm.ref_counts[b]}"

    # recurrent-state slots: held by running requests only, each once, conserved
    held_slots = [r.state_slot for r in live if r.state_slot >= 0]
    free_slots = list(bm.free_state_slots)
    assert len(set(held_slots)) == len(held_slots), "a state slot is held twice"
    assert len(set(free_slots)) == len(free_slots), "a state slot is on the free list twice"
    assert not set(held_slots) & set(free_slots)
    assert len(held_slots) + len(free_slots) == engine.config.max_num_seqs
    assert set(held_slots) | set(free_slots) == set(range(engine.config.max_num_seqs))

    # no request holds more than its computed tokens need (between steps it is exactly that)
    for r in running:
        assert r.state_slot >= 0
        assert 0 < r.num_computed_tokens < r.num_tokens
        assert len(r.block_table) == -(-r.num_computed_tokens // bm.block_size), (
            f"{r.request_id}: {len(r.block_table)} blocks for {r.num_computed_tokens} computed tokens")
    for r in waiting:  # never admitted, or preempted: holds nothing, recomputes from scratch
        assert r.block_table == [] and r.state_slot == -1 and r.num_computed_tokens == 0

    # finished (completed or aborted) requests hold nothing
    for r in finished:
        assert r.finished and r.block_table == [] and r.state_slot == -1


# ---- plain BlockManager unit tests ---------------------------------------------------------------


def _req(rid: str, n_prompt: int = 5) -> Request:
    return Request(rid, list(range(n_prompt)), SamplingParams(), arrival=0)


def test_allocate_grows_table_and_takes_one_state_slot():
    bm = BlockManager(num_blocks=6, block_size=4, num_state_slots=2)
    r = _req("a")
    assert bm.blocks_needed(r, 0) == 0 and bm.blocks_needed(r, 1) == 1 and bm.blocks_needed(r, 4) == 1
    assert bm.blocks_needed(r, 5) == 2
    bm.allocate(r, 5)
    assert len(r.block_table) == 2 and r.state_slot >= 0
    assert bm.num_free_blocks == 4 and bm.usage() == pytest.approx(2 / 6)
    assert all(bm.ref_counts[b] == 1 for b in r.block_table)
    slot = r.state_slot
    bm.allocate(r, 8)  # still fits in two blocks: nothing new, same slot
    assert len(r.block_table) == 2 and r.state_slot == slot and len(bm.free_state_slots) == 1
    bm.allocate(r, 9)
    assert len(r.block_table) == 3 and bm.num_free_blocks == 3
    assert bm.blocks_needed(r, 9) == 0
    assert len(set(r.block_table)) == 3


def test_can_allocate_respects_blocks_and_state_slots():
    bm = BlockManager(num_blocks=4, block_size=4, num_state_slots=1)
    a, b = _req("a"), _req("b")
    assert not bm.can_allocate(a, 17)  # 5 blocks > 4
    with pytest.raises(RuntimeError):
        bm.allocate(a, 17)
    assert bm.num_free_blocks == 4 and a.block_table == [] and a.state_slot == -1  # a failed allocate takes nothing
    bm.allocate(a, 4)
    assert not bm.can_allocate(b, 1)  # blocks are free, but the only state slot is taken
    with pytest.raises(RuntimeError):
        bm.allocate(b, 1)
    assert b.block_table == [] and b.state_slot == -1
    assert bm.can_allocate(a, 16) and not bm.can_allocate(a, 17)
    bm.free(a)
    assert bm.can_allocate(b, 16)


def test_trim_releases_blocks_past_the_kept_tokens():
    bm = BlockManager(num_blocks=8, block_size=4, num_state_slots=1)
    r = _req("a")
    bm.allocate(r, 14)  # 4 blocks
    first_two = list(r.block_table[:2])
    tail = list(r.block_table[2:])
    bm.trim(r, 6)  # keep 2 blocks
    assert r.block_table == first_two
    assert all(bm.ref_counts[b] == 0 for b in tail) and all(b in bm.free_blocks for b in tail)
    assert bm.num_free_blocks == 6
    bm.trim(r, 8)  # nothing past 8 tokens: no-op
    assert r.block_table == first_two
    bm.trim(r, 0)
    assert r.block_table == [] and bm.num_free_blocks == 8
    assert r.state_slot >= 0  # trim keeps the state slot; only free() gives it back
    bm.free(r)
    assert r.state_slot == -1 and len(bm.free_state_slots) == 1


def test_free_returns_everything_and_is_idempotent():
    bm = BlockManager(num_blocks=6, block_size=2, num_state_slots=3)
    reqs = [_req(str(i)) for i in range(3)]
    for i, r in enumerate(reqs):
        bm.allocate(r, 2 * (i + 1) - 1)  # 1, 2, 3 blocks
    assert bm.num_free_blocks == 0 and not bm.free_state_slots
    assert sorted(b for r in reqs for b in r.block_table) == list(range(6))
    bm.free(reqs[1])
    assert reqs[1].block_table == [] and reqs[1].state_slot == -1
    assert bm.num_free_blocks == 2 and len(bm.free_state_slots) == 1
    bm.free(reqs[1])  # a second free of an emptied request is harmless
    assert bm.num_free_blocks == 2 and len(bm.free_state_slots) == 1
    for r in reqs:
        bm.free(r)
    assert sorted(bm.free_blocks) == list(range(6)) and bm.ref_counts == [0] * 6
    assert sorted(bm.free_state_slots) == [0, 1, 2]


def test_releasing_a_free_block_twice_is_caught():
    bm = BlockManager(num_blocks=2, block_size=4, num_state_slots=1)
    r = _req("a")
    bm.allocate(r, 4)
    block = r.block_table[0]
    bm.free(r)
    with pytest.raises(AssertionError, match="released twice"):
        bm._release(block)


@given(st.lists(st.tuples(st.sampled_from(["alloc", "trim", "free"]), st.integers(0, 3), st.integers(0, 24)),
                max_size=60))
@settings(max_examples=100, deadline=None)
def test_block_manager_random_ops_conserve_blocks(ops):
    bm = BlockManager(num_blocks=10, block_size=4, num_state_slots=3)
    reqs = [_req(str(i)) for i in range(4)]
    for op, i, n in ops:
        r = reqs[i]
        if op == "alloc":
            if bm.can_allocate(r, n):
                bm.allocate(r, n)
                assert len(r.block_table) >= -(-n // 4)
        elif op == "trim":
            bm.trim(r, n)
            assert len(r.block_table) <= -(-n // 4)
        else:
            bm.free(r)
        held = [b for q in reqs for b in q.block_table]
        assert len(set(held)) == len(held)
        assert sorted(held + list(bm.free_blocks)) == list(range(10))
        assert all(bm.ref_counts[b] == (1 if b in held else 0) for b in range(10))
        slots = [q.state_slot for q in reqs if q.state_slot >= 0]
        assert sorted(slots + list(bm.free_state_slots)) == [0, 1, 2]
    for r in reqs:
        bm.free(r)
    assert sorted(bm.free_blocks) == list(range(10)) and sorted(bm.free_state_slots) == [0, 1, 2]


# ---- the real engine under random workloads --------------------------------------------------------

add_op = st.tuples(
    st.just("add"),
    st.one_of(st.integers(1, 8), st.integers(1, 30)),  # prompt length: short ones grow into preemption
    st.integers(0, VOCAB - 1),  # prompt tokens are (first + 7 j) % VOCAB
    st.one_of(st.integers(1, 20), st.integers(12, 20)),  # max_tokens: long outputs grow into preemption
    st.one_of(st.none(), st.tuples(st.floats(0.5, 2.0), st.integers(0, 2**31 - 1), st.integers(0, 8),
                                   st.sampled_from([1.0, 0.9, 0.5]))),  # (temperature, seed, top_k, top_p)
)
step_op = st.tuples(st.just("step"), st.integers(1, 4))
abort_op = st.tuples(st.just("abort"), st.integers(0, 1000))  # index into the live requests
ops_strategy = st.lists(st.one_of(add_op, add_op, step_op, step_op, abort_op), min_size=4, max_size=30)


@pytest.mark.parametrize("arch,mode", [("qwen3", "ar"), ("zaya", "ar"), ("qwen3", "tidar"), ("zaya", "tidar2f")])
@given(
    ops=ops_strategy,
    num_blocks=st.integers(8, 12),
    max_num_seqs=st.sampled_from([1, 2, 3, 4, 4]),
    max_num_batched_tokens=st.sampled_from([16, 24, 64]),
    drain=st.sampled_from(["complete", "complete", "abort"]),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_engine_never_leaks_blocks(bm_checkpoints, arch, mode, ops, num_blocks, max_num_seqs, max_num_batched_tokens,
                                   drain):
    engine = make_engine(bm_checkpoints[arch], num_blocks, max_num_seqs, max_num_batched_tokens, mode)
    assert engine.max_model_len == num_blocks * BLOCK_SIZE  # the pool, not the model, bounds the context
    all_reqs: dict[str, Request] = {}
    expected_len: dict[str, int] = {}
    aborted: set[str] = set()
    finished_outputs = {}

    def record(outputs):
        for out in outputs:
            assert out.request_id in all_reqs
            assert out.request_id not in finished_outputs, "output after the request finished"
            if out.finished:
                finished_outputs[out.request_id] = out

    for k, op in enumerate(ops):
        if op[0] == "add":
            _, n_prompt, first, max_tokens, sampling = op
            prompt = [(first + 7 * j) % VOCAB for j in range(n_prompt)]
            if len(prompt) >= engine.max_model_len:
                prompt = prompt[: engine.max_model_len - 1]
            if sampling is None:
                params = SamplingParams(max_tokens=max_tokens)
            else:
                t, seed, top_k, top_p = sampling
                params = SamplingParams(max_tokens=max_tokens, temperature=t, seed=seed, top_k=top_k, top_p=top_p)
            rid = engine.add_request(prompt, params, request_id=f"r{k}")
            all_reqs[rid] = engine.requests[rid]
            expected_len[rid] = min(max_tokens, engine.max_model_len - len(prompt))
        elif op[0] == "step":
            for _ in range(op[1]):
                record(engine.step())
                check_invariants(engine, [r for r in all_reqs.values() if r.finished])
        else:
            live = sorted(engine.requests)
            if live:
                rid = live[op[1] % len(live)]
                engine.abort(rid)
                aborted.add(rid)
                assert all_reqs[rid].finish_reason == "abort"
        check_invariants(engine, [r for r in all_reqs.values() if r.finished])

    if drain == "abort":
        for rid in list(engine.requests):
            engine.abort(rid)
            aborted.add(rid)
            check_invariants(engine, [r for r in all_reqs.values() if r.finished])
    else:
        # every step makes progress, so this terminates well within the bound
        bound = 1 + sum(len(r.prompt_token_ids) + r.params.max_tokens for r in all_reqs.values()) * 8
        for _ in range(bound):
            if not engine.has_unfinished():
                break
            record(engine.step())
            check_invariants(engine, [r for r in all_reqs.values() if r.finished])
        assert not engine.has_unfinished(), "the engine stopped making progress"

    assert_engine_idle(engine)
    preemptions = sum(r.stats.preemptions for r in all_reqs.values())
    event(f"preempted: {preemptions > 0}")
    target(float(preemptions), label="preemptions")  # steer generation toward memory pressure
    event(f"aborted a request: {bool(aborted)}")
    for rid, req in all_reqs.items():
        assert req.finished and req.block_table == [] and req.state_slot == -1
        if rid in aborted:
            assert req.finish_reason == "abort" and rid not in finished_outputs
        else:
            out = finished_outputs[rid]
            assert out.finish_reason == "length"  # the checkpoints have no EOS
            assert len(out.output_token_ids) == expected_len[rid]
            assert all(0 <= t < VOCAB for t in out.output_token_ids)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["qwen3", "zaya"])
def test_preemption_happens_and_leaks_nothing(bm_checkpoints, arch, mode):
    """Four requests that each grow to 7 blocks cannot share a 10-block pool: some get preempted."""
    engine = make_engine(bm_checkpoints[arch], num_blocks=10, max_num_seqs=4, max_num_batched_tokens=64, mode=mode)
    ids = [engine.add_request([(7 * i + j) % VOCAB for j in range(10)], SamplingParams(max_tokens=18))
           for i in range(4)]
    reqs = [engine.requests[i] for i in ids]
    outs = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        check_invariants(engine, [r for r in reqs if r.finished])
    assert_engine_idle(engine)
    assert sum(r.stats.preemptions for r in reqs) > 0
    assert [len(outs[i].output_token_ids) for i in ids] == [18] * 4


@pytest.mark.parametrize("arch", ["qwen3", "zaya"])
def test_preempted_greedy_request_matches_an_unpreempted_run(bm_checkpoints, arch):
    """Recompute after preemption must reproduce the same greedy tokens as running alone."""
    prompts = [[(5 * i + 3 * j) % VOCAB for j in range(10)] for i in range(4)]
    params = SamplingParams(max_tokens=18)
    alone = [make_engine(bm_checkpoints[arch], num_blocks=10, max_num_seqs=1).generate([p], params)[0].output_token_ids
             for p in prompts]
    engine = make_engine(bm_checkpoints[arch], num_blocks=10, max_num_seqs=4, max_num_batched_tokens=64)
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = [engine.requests[i] for i in ids]
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert sum(r.stats.preemptions for r in reqs) > 0
    assert [outs[i].output_token_ids for i in ids] == alone
    assert_engine_idle(engine)
