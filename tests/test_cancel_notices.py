"""The backstop for a cancel that Ray loses between an ingress and its engine replica: the ingress posts the
request's ticket to the stats board, the replica reads it as it posts its load, and the request stops at its
next step with its KV freed, while the replica's other requests run on. (Ray's own cancel is the fast path,
tested end to end in test_serving.py; this is what holds when it does not arrive.)"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import assert_engine_idle, make_engine

from bench.random_model import make_zaya
from router import stats
from router.engine_replica import EngineReplica
from router.events import EngineRequest
from router.stats import ReplicaLoad
from workers.config import EngineConfig, SamplingParams

LOAD = ReplicaLoad(queue_depth=0, running=0, kv_usage=0.0, steps=0)


def test_the_board_gives_each_replica_every_notice_once(monkeypatch):
    board = stats._Board()
    seen, got = board.report("r1", LOAD, 0)
    assert got == []
    board.cancel("a")
    board.cancel("b")
    seen, got = board.report("r1", LOAD, seen)
    assert got == ["a", "b"]
    assert board.report("r1", LOAD, seen)[1] == []  # read once
    assert board.report("r2", LOAD, 0)[1] == ["a", "b"]  # and by every replica

    restarted = stats._Board()  # Ray restarted the board: its count began again
    restarted.cancel("c")
    assert restarted.report("r1", LOAD, seen)[1] == ["c"]  # r1 had seen 2 notices: this board's are all new

    now = time.monotonic()
    monkeypatch.setattr(stats.time, "monotonic", lambda: now + stats.CANCEL_KEEP_S + 1)
    restarted.cancel("d")  # posting drops the notices every replica has had time to read
    assert restarted.report("r3", LOAD, 0)[1] == ["d"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_zaya(tmp_path_factory.mktemp("notices") / "zaya", hidden=64, layers=2, head_dim=16))


def test_a_cancel_notice_stops_its_request_and_frees_its_kv(model):
    replica = EngineReplica(EngineConfig(model=model, kv_cache_bytes=1 << 20).model_dump(mode="json"), max_queued=8)
    long = EngineRequest([5, 17, 200, 33], SamplingParams(max_tokens=400, ignore_eos=True))
    other = EngineRequest([7, 11, 13], SamplingParams(max_tokens=24, ignore_eos=True))

    async def go():
        async def read(request):
            return [ev async for ev in replica.generate(request)]

        others = asyncio.ensure_future(read(other))
        cancelled = []
        async for ev in replica.generate(long):  # its reader reads on: only the notice can stop it
            cancelled.append(ev)
            if len(cancelled) == 2:
                replica.cancel_notices(["a-request-not-here", long.ticket])
        return cancelled, await others

    try:
        cancelled, others = asyncio.run(go())
        for _ in range(100):  # the abort reaches the engine thread between steps
            if not replica.engine.has_unfinished():
                break
            time.sleep(0.05)
        assert not cancelled[-1].finished and sum(len(ev.token_ids) for ev in cancelled) < 400
        assert others[-1].finished and others[-1].finish_reason == "length"
        offline = make_engine(model).generate([other.prompt], other.sampling)[0].output_token_ids
        assert [t for ev in others for t in ev.token_ids] == offline
        assert replica.cancelled == set() and replica.open_tickets == set()  # nothing kept for the stray id
        assert_engine_idle(replica.engine)
    finally:
        replica.async_engine.shutdown()
