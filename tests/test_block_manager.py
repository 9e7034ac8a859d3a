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
from workers.loader import load_hf_config
from workers.models import state_snapshot_bytes
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
    # the prefix cache keeps ZAYA's CCA state beside each block
    per_block = BYTES_PER_BLOCK + state_snapshot_bytes(load_hf_config(model_dir), torch.float32)
    engine = conftest_make_engine(model_dir, block_size=BLOCK_SIZE, kv_cache_bytes=num_blocks * per_block,
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

    # blocks: free, cached and held by nobody (evictable), or held: ref count = live tables holding it;
    # a block shared by two tables is a named (cached) one, full of committed tokens of both
    free, evictable = list(bm.free_blocks), list(bm.evictable)
    assert len(set(free)) == len(free), f"a block is on the free list twice: {free}"
    holders: dict[int, list[Request]] = {}
    for r in live:
        assert len(set(r.block_table)) == len(r.block_table), f"{r.request_id} holds a block twice"
        for b in r.block_table:
            assert 0 <= b < bm.num_blocks
            holders.setdefault(b, []).append(r)
    assert not set(free) & set(holders), f"blocks both free and held: {set(free) & set(holders)}"
    assert not set(evictable) & set(holders), f"blocks both evictable and held: {set(evictable) & set(holders)}"
    assert not set(free) & set(evictable)
    assert len(free) + len(evictable) + len(holders) == bm.num_blocks, (
        f"leaked blocks: {set(range(bm.num_blocks)) - set(free) - set(evictable) - set(holders)}")
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == len(holders.get(b, [])), f"block {b}: ref count {bm.ref_counts[b]}"
    assert {b: n for n, b in bm.cached.items()} == {b: n for b, n in enumerate(bm.name_of) if n is not None}
    assert all(bm.name_of[b] is not None for b in evictable), "an unnamed block is evictable"
    for b, rs in holders.items():
        if len(rs) > 1:
            assert bm.name_of[b] is not None, f"block {b} is shared but not a cached prefix block"
        if bm.name_of[b] is not None:  # a named block holds committed tokens of every holder, at one index
            for r in rs:
                i = r.block_table.index(b)
                assert (i + 1) * bm.block_size <= r.num_computed_tokens or r.status is Status.WAITING
                assert r.block_names[i] == bm.name_of[b]

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


# ---- the prefix cache -----------------------------------------------------------------------------


def _commit(bm: BlockManager, r: Request, n: int) -> None:
    """What a step does to a request: `n` tokens computed (blocks allocated), the full ones named."""
    bm.allocate(r, n)
    r.num_computed_tokens = n
    bm.cache_committed(r)


def test_a_cached_prefix_is_shared_and_only_its_full_committed_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, num_state_slots=3)
    a = Request("a", list(range(10)), SamplingParams(), arrival=0)
    _commit(bm, a, 10)  # blocks 0-3, 4-7 full and named; 8-9 not
    assert sum(n is not None for n in bm.name_of) == 2
    b = Request("b", list(range(8)) + [50, 51, 52], SamplingParams(), arrival=1)  # shares 8 tokens
    assert bm.reuse_prefix(b) == 8
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    c = Request("c", [1, 2, 3, 4, 5], SamplingParams(), arrival=2)  # differs at token 0: no hit
    assert bm.reuse_prefix(c) == 0 and c.block_table == [] and c.num_computed_tokens == 0
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table] == [1, 1]  # b still holds the shared blocks
    assert len(bm.evictable) == 0 and bm.usage() == pytest.approx(2 / 8)
    bm.free(b)
    assert len(bm.evictable) == 2 and bm.usage() == 0 and bm.cached_free_usage() == pytest.approx(2 / 8)


def test_a_hit_on_the_whole_prompt_leaves_its_last_block_to_compute():
    """The last token's logits are the next token's, and its K/V must not be written into a shared block:
    a prompt of exactly two cached blocks reuses one."""
    bm = BlockManager(num_blocks=8, block_size=4, num_state_slots=2)
    a = Request("a", list(range(8)), SamplingParams(), arrival=0)
    _commit(bm, a, 8)
    b = Request("b", list(range(8)), SamplingParams(), arrival=1)
    assert bm.reuse_prefix(b) == 4 and b.block_table == a.block_table[:1]
    c = Request("c", list(range(9)), SamplingParams(), arrival=2)  # one token past both blocks: both reused
    assert bm.reuse_prefix(c) == 8


def test_eviction_takes_unheld_cached_blocks_tail_first_and_never_held_ones():
    bm = BlockManager(num_blocks=4, block_size=2, num_state_slots=3)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), arrival=0)
    _commit(bm, a, 5)  # 3 blocks, 2 named
    head, tail = a.block_table[:2]
    bm.free(a)
    assert list(bm.evictable) == [tail, head] and bm.num_free_blocks == 4  # tail released first
    b = Request("b", [1, 2, 9, 9, 9], SamplingParams(), arrival=1)
    assert bm.reuse_prefix(b) == 2 and b.block_table == [head]  # holds the head
    bm.allocate(b, 8)  # 3 more: the two free ones first, then the evicted tail
    assert b.block_table[-1] == tail and bm.name_of[tail] is None and tail not in bm.evictable
    assert bm.name_of[head] is not None and bm.ref_counts[head] == 1
    d = Request("d", [7, 7, 7], SamplingParams(), arrival=2)
    assert bm.num_free_blocks == 0 and not bm.can_allocate(d, 1)  # the held head is never evicted


def test_an_equal_prefix_computed_twice_is_named_once():
    """Two requests computed the same prefix at once: the second copy stays unnamed and is freed as usual."""
    bm = BlockManager(num_blocks=6, block_size=4, num_state_slots=2)
    a, b = (Request(x, list(range(6)), SamplingParams(), arrival=i) for i, x in enumerate("ab"))
    _commit(bm, a, 5)
    bm.allocate(b, 5)
    b.num_computed_tokens = 5
    bm.cache_committed(b)
    assert bm.name_of[a.block_table[0]] is not None and bm.name_of[b.block_table[0]] is None
    bm.free(b)
    assert b.block_table == [] and len(bm.free_blocks) == 4 and not bm.evictable


@given(st.lists(st.tuples(st.sampled_from(["start", "commit", "trim", "free"]), st.integers(0, 3),
                          st.integers(0, 24)), max_size=60),
       st.lists(st.integers(0, 2), min_size=4, max_size=4))
@settings(max_examples=150, deadline=None)
def test_prefix_cache_random_ops_never_leak_or_free_a_shared_block(ops, families):
    """Requests from three prompt families (equal prefixes within one) start from the cache, commit tokens,
    roll back and finish in any order: reference counts always equal the tables holding a block, a block
    in use is never evicted or free, and at the end every block is free or cached and evictable."""
    bm = BlockManager(num_blocks=10, block_size=4, num_state_slots=4)
    reqs = [Request(str(i), [f * 10 + j % (f + 2) for j in range(30)], SamplingParams(), arrival=i)
            for i, f in enumerate(families)]
    for op, i, n in ops:
        r = reqs[i]
        if op == "start" and not r.block_table:
            r.num_computed_tokens = 0
            bm.reuse_prefix(r)
            assert r.num_computed_tokens < r.num_tokens
        elif op == "commit":
            n = max(n, r.num_computed_tokens)
            if bm.can_allocate(r, n):
                _commit(bm, r, n)
        elif op == "trim":
            n = max(n, r.num_computed_tokens)  # only uncommitted positions are ever rolled back
            bm.trim(r, n)
        elif op == "free":
            bm.free(r)
            r.num_computed_tokens = 0
        holders: dict[int, int] = {}
        for q in reqs:
            for b in q.block_table:
                holders[b] = holders.get(b, 0) + 1
        assert all(bm.ref_counts[b] == holders.get(b, 0) for b in range(10))
        assert not set(holders) & (set(bm.free_blocks) | set(bm.evictable))
        assert sorted([*holders, *bm.free_blocks, *bm.evictable]) == list(range(10))
        for q in reqs:  # a named block a request holds is the one its own tokens name
            for k, b in enumerate(q.block_table):
                if bm.name_of[b] is not None:
                    assert q.block_names[k] == bm.name_of[b]
    for r in reqs:
        bm.free(r)
    assert sorted([*bm.free_blocks, *bm.evictable]) == list(range(10)) and bm.ref_counts == [0] * 10


# ---- the real engine under random workloads --------------------------------------------------------

add_op = st.tuples(
    st.just("add"),
    st.one_of(st.integers(1, 8), st.integers(1, 30)),  # prompt length: short ones grow into preemption
    # prompt tokens are (first + 7 j) % VOCAB: requests with equal firsts share a prefix
    st.one_of(st.integers(0, 2), st.integers(0, VOCAB - 1)),
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
