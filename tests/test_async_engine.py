"""The asyncio front of the engine (what each engine replica streams through): an event loop never waits for
an engine step, so streams keep flowing while the engine computes; refusals and aborts reach only their own
request, and every stream still equals offline generation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import assert_engine_idle, make_engine

from bench.random_model import make_zaya
from workers.async_engine import AsyncEngine
from workers.config import InvalidRequest, SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ([5, 17, 200, 33], [7, 11, 13])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_zaya(tmp_path_factory.mktemp("async") / "zaya", hidden=64, layers=2, head_dim=16))


async def collect(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


def test_the_loop_runs_on_while_a_step_is_in_flight(model):
    """With the engine thread held inside a step, a second request is posted and the loop keeps running
    (before, adding a request took the engine's lock on the loop: every stream stopped until the step
    ended). Released, both streams give the offline tokens."""
    offline = [o.output_token_ids for o in make_engine(model).generate(list(PROMPTS), PARAMS)]
    engine = make_engine(model)
    in_step, release = threading.Event(), threading.Event()
    step = engine.step

    def held_step():
        in_step.set()
        release.wait()
        return step()

    engine.step = held_step
    front = AsyncEngine(engine)
    safety = threading.Timer(30, release.set)  # old behaviour would block the loop: end the test, do not hang
    safety.start()

    async def run():
        first = asyncio.ensure_future(collect(front.generate(PROMPTS[0], PARAMS)))
        while not in_step.is_set():
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(collect(front.generate(PROMPTS[1], PARAMS)))
        ticks = 0
        while ticks < 5:  # the loop goes round while the step is held
            await asyncio.sleep(0.01)
            ticks += 1
        ran_during_step = not release.is_set()
        admitted = front.waiting()  # both: the first not yet scheduled, the second posted to the engine thread
        release.set()
        engine.step = step
        return ran_during_step, admitted, await first, await second

    try:
        ran, admitted, a, b = asyncio.run(run())
    finally:
        safety.cancel()
        release.set()
        front.shutdown()
    assert ran, "the loop stopped while the engine stepped"
    assert admitted == 2  # what admission control counts (router/engine_replica.py)
    assert [a, b] == offline
    assert_engine_idle(engine)


def test_a_refused_request_fails_alone_and_an_abandoned_one_frees_its_kv(model):
    engine = make_engine(model)
    front = AsyncEngine(engine)

    async def run():
        good_stream = front.generate(PROMPTS[0], PARAMS, "good")
        first = await good_stream.__anext__()
        good = asyncio.ensure_future(collect(good_stream))
        with pytest.raises(InvalidRequest, match="already in use"):
            await collect(front.generate(PROMPTS[1], PARAMS, "good"))
        with pytest.raises(InvalidRequest):
            await collect(front.generate([], PARAMS))  # an empty prompt: refused by the engine thread
        stream = front.generate(PROMPTS[1], SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client went away after its first tokens
        return first.new_token_ids + await good

    try:
        tokens = asyncio.run(run())
        for _ in range(100):  # the abort is applied by the engine thread between steps
            if not engine.has_unfinished():
                break
            threading.Event().wait(0.05)
    finally:
        front.shutdown()
    assert tokens == make_engine(model).generate([PROMPTS[0]], PARAMS)[0].output_token_ids
    assert front.waiting() == 0
    assert_engine_idle(engine)
