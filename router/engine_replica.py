"""The router deployment: each replica owns one engine whose scheduler batches everything it admits.

Admission is bounded: when the requests waiting for a batch slot reach `max_queued`, a new request
is refused at once (Overloaded) instead of queueing forever. A cancelled or abandoned stream aborts
its request in the engine, which frees its KV blocks; so does a cancel notice its ingress posts to the stats
board (the backstop for a cancel Ray lost), read as the replica posts its load.

Streams are coalesced: a request's committed tokens go out at most every `stream_interval_ms` (its first
tokens and its last at once), one Ray message for several decode steps, each step's statistics kept; when
the replica's streams together would send more than `stream_messages_per_s`, each one waits longer. A
request whose client does not stream gets two messages: its first tokens (errors and time to first token
show at once) and the rest with its totals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator

import ray
from opentelemetry import trace
from ray.exceptions import RayError

from router import telemetry
from router.caller_watch import CallerWatch
from router.errors import Overloaded
from router.events import EngineRequest, ReplicaInfo, StreamEvent
from router.stats import ReplicaLoad, StatsBoard
from workers.async_engine import AsyncEngine
from workers.backends import create_engine
from workers.config import EngineConfig

REPORT_TIMEOUT_S = 5.0
log = logging.getLogger("ray.serve")


class EngineReplica:
    def __init__(self, engine_config: dict, max_queued: int, stream_interval_ms: float = 0.0,
                 stream_messages_per_s: float = math.inf):
        telemetry.setup_tracing()
        self.config = EngineConfig(**engine_config)
        self.engine = create_engine(self.config)  # native, or vLLM with our plugin
        self.async_engine = AsyncEngine(self.engine)
        self.max_queued = max_queued
        self.stream_interval_s = stream_interval_ms / 1000
        self.stream_messages_per_s = stream_messages_per_s
        self.streams = 0  # streaming requests in flight: together they send about streams / interval messages a s
        self.replica_id = f"{os.getpid()}-{id(self)}"
        self.finished = self.drafted = self.accepted = self.verify_steps = 0  # totals over every request
        self.callers = CallerWatch()
        self.open_tickets: set[str] = set()  # the requests streaming from this replica (EngineRequest.ticket)
        self.cancelled: set[str] = set()  # of them, those whose client went away (a notice from the board)
        self._background: list[asyncio.Task] | None = None  # the load reports and the caller watch, held

    async def generate(self, request: EngineRequest) -> AsyncIterator[StreamEvent]:
        """Yields the tokens of one or more decode steps per event (each step's accept statistics kept), the
        first and the last at once; the request's totals ride on the last event only."""
        self._ensure_background()
        if self.async_engine.waiting() >= self.max_queued:  # counts adds the engine thread has not applied yet
            raise Overloaded(f"replica queue is full ({self.max_queued} waiting); retry later")
        params = request.sampling
        span = telemetry.tracer().start_span("engine", context=telemetry.extract(request.trace))
        first, last, pending, sent_at = True, None, None, 0.0
        loop = asyncio.get_running_loop()
        stream = self.async_engine.generate(request.prompt, params, request.request_id)
        caller = request.caller
        if caller is not None:
            self.callers.hold(caller)
        self.streams += request.stream
        self.open_tickets.add(request.ticket)
        try:
            async for out in stream:
                if caller is not None and caller.actor_id in self.callers.dead:
                    break  # its ingress died: nobody reads on, so abort it (in `finally`) instead of decoding on
                if request.ticket in self.cancelled:
                    break  # its client went away, and Ray's cancel did not reach us: abort it likewise
                self._account(out)
                if span.is_recording():
                    self._trace(span, out, first)
                pending = self._event(out, pending)
                if first or out.finished or loop.time() - sent_at >= self._interval(request.stream):
                    yield pending
                    pending, sent_at = None, loop.time()
                first, last = False, out
        finally:
            self.streams -= request.stream
            self.open_tickets.discard(request.ticket)
            self.cancelled.discard(request.ticket)
            await stream.aclose()  # on cancellation: aborts the request and frees its KV now, not at GC time
            if caller is not None:
                self.callers.release(caller)
            if span.is_recording() and last is not None:
                span.set_attribute("tidal.finish_reason", last.finish_reason or "cancelled")
                if last.stats is not None:
                    span.set_attributes({f"tidal.{k}": v for k, v in last.stats.as_dict().items()
                                         if isinstance(v, (int, float))})
            span.end()

    def _interval(self, streamed: bool) -> float:
        """Seconds between a stream's messages: stream_interval_ms, longer when the replica's streams together
        would send more than stream_messages_per_s (each message costs the replica, the ingress and the
        proxy CPU). A request whose client does not stream gets its first and its last message only."""
        return max(self.stream_interval_s, self.streams / self.stream_messages_per_s) if streamed else math.inf

    @staticmethod
    def _trace(span, out, first: bool) -> None:
        """Queue and prefill as child spans (from the engine's timestamps), each step as an event."""
        t = out.times
        if first:
            parent = trace.set_span_in_context(span)
            tracer = telemetry.tracer()
            for name, start, end in (("queue", t.arrival, t.first_scheduled),
                                     ("prefill", t.first_scheduled, t.first_token)):
                if start is not None and end is not None:
                    tracer.start_span(name, context=parent, start_time=telemetry.ns(start)).end(telemetry.ns(end))
        if out.step is not None:
            s = out.step
            span.add_event("decode_step", {
                "tidal.drafts_offered": s.drafted, "tidal.drafts_accepted": s.accepted,
                "tidal.acceptance_by_position": [int(i < s.accepted) for i in range(s.drafted)],
                "tidal.proposal_level": -1 if s.level is None else s.level,
                "tidal.tokens_committed": s.committed, "tidal.batch_size": s.batch_size})

    @staticmethod
    def _event(out, pending: StreamEvent | None) -> StreamEvent:
        """The event for `out`, carrying the tokens and steps of the `pending` one not yet sent."""
        event = StreamEvent(out.request_id, list(out.new_token_ids), len(out.prompt_token_ids),
                            [out.step] if out.step else [], out.finished, out.finish_reason,
                            out.stats, out.error, out.logprobs)
        return pending.merged_into(event) if pending is not None else event

    def _account(self, out) -> None:
        self.finished += out.finished
        if out.step and out.step.drafted:
            self.drafted += out.step.drafted
            self.accepted += out.step.accepted
            self.verify_steps += 1

    def load(self) -> ReplicaLoad:
        e = self.engine.load()
        return ReplicaLoad(e.waiting, e.running, e.kv_usage, e.steps, self.finished, self.drafted, self.accepted,
                           self.verify_steps, e.prefix_cache_usage)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every metrics interval; router/autoscaling.py sizes the deployment from it."""
        load = self.load()
        return {"queue_depth": float(load.queue_depth), "running": float(load.running), "kv_usage": load.kv_usage}

    def model_info(self) -> ReplicaInfo:
        c, info, rule = self.config, self.engine.info, self.config.tidar
        return ReplicaInfo(info.architecture, info.vocab_size, info.max_model_len, c.mode, rule.block_size,
                           tuple(rule.levels), rule.sampler, c.ep_size, tuple(info.eos_token_ids))

    def _ensure_background(self) -> None:
        # the board is a Ray actor: outside Ray (a replica used in process) there is nowhere to report, and
        # creating the actor would auto-start a local Ray cluster from inside the event loop
        if self._background is None and ray.is_initialized():
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._report_loop()), loop.create_task(self.callers.run())]

    def cancel_notices(self, tickets: list[str]) -> None:
        """Requests whose clients went away (read from the board): those streaming here stop at their next step."""
        self.cancelled.update(t for t in tickets if t in self.open_tickets)

    async def _report_loop(self) -> None:
        board = StatsBoard.get()
        seen = 0
        while True:
            try:
                # asyncio.wait, not wait_for: cancelling this task (replica or event loop shutting down) must not
                # wait for a Ray reply to acknowledge its own cancellation (wait_for hung there in CI)
                reply = asyncio.wrap_future(board.report.remote(self.replica_id, self.load(), seen).future())
                done, _ = await asyncio.wait([reply], timeout=REPORT_TIMEOUT_S)
                if done:
                    seen, tickets = reply.result()
                    self.cancel_notices(tickets)
            except RayError:  # the board restarting: post again next period
                pass
            except Exception:  # never let the reports stop: the autoscaler and the cancel backstop need them
                log.exception("posting this replica's load failed")
            await asyncio.sleep(0.5)

    def __del__(self):
        self.async_engine.shutdown()
