"""A named Ray actor where engine replicas post their load (the ingress and autoscaling read it), and where
an ingress posts the requests whose clients went away (each replica reads them as it posts).

Why the second: the ingress cancels a replica's stream through Ray, and a cancel that lands while the
replica's side is between messages can be lost (the request then decodes on for nobody, holding its KV).
The notice through the board is the backstop: a replica running a cancelled request stops it within a
report period of the cancel, whatever became of Ray's.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import ray

BOARD_NAME = "tidal-stats-board"
STALE_S = 5.0  # a replica silent this long is gone (scaled down or dead)
CANCEL_KEEP_S = 60.0  # cancel notices older than this are dropped (every live replica has read them)


@dataclass(frozen=True)
class ReplicaLoad:
    """What one engine replica posts every half second (and what it reports to Serve's autoscaler)."""

    queue_depth: int  # admitted requests not yet running
    running: int  # requests in the running batch
    kv_usage: float  # share of KV blocks in use, 0..1
    steps: int  # engine steps so far
    finished: int = 0  # requests finished so far
    drafted: int = 0  # drafts offered for verification so far
    accepted: int = 0  # drafts accepted so far
    verify_steps: int = 0  # request steps that verified at least one draft
    prefix_cache_usage: float = 0.0  # share of KV blocks nobody holds that keep a cached prefix


@dataclass(frozen=True)
class ServerLoad(ReplicaLoad):
    """Every live replica's load: counts summed, KV usage averaged."""

    replicas: int = 0

    @classmethod
    def of(cls, loads: list[ReplicaLoad]) -> ServerLoad:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        return cls(queue_depth=sum(x.queue_depth for x in loads), running=sum(x.running for x in loads),
                   kv_usage=mean([x.kv_usage for x in loads]),
                   prefix_cache_usage=mean([x.prefix_cache_usage for x in loads]),
                   steps=sum(x.steps for x in loads), finished=sum(x.finished for x in loads),
                   drafted=sum(x.drafted for x in loads), accepted=sum(x.accepted for x in loads),
                   verify_steps=sum(x.verify_steps for x in loads), replicas=len(loads))

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.accepted / self.verify_steps if self.verify_steps else 1.0


class _Board:
    def __init__(self):
        self.reports: dict[str, tuple[float, ReplicaLoad]] = {}
        self.cancels: deque[tuple[int, float, str]] = deque()  # (number, posted at, ticket), oldest first
        self.cancel_count = 0  # notices posted since this board started

    def cancel(self, ticket: str) -> None:
        """An ingress's client went away from the request `ticket` (EngineRequest.ticket): whichever replica runs
        it stops it."""
        now = time.monotonic()
        self.cancel_count += 1
        self.cancels.append((self.cancel_count, now, ticket))
        while self.cancels and now - self.cancels[0][1] > CANCEL_KEEP_S:
            self.cancels.popleft()

    def report(self, replica_id: str, load: ReplicaLoad, seen: int = 0) -> tuple[int, list[str]]:
        """Posts a replica's load; returns `notices(seen)`."""
        self.reports[replica_id] = (time.monotonic(), load)
        return self.notices(seen)

    def notices(self, seen: int = 0) -> tuple[int, list[str]]:
        """(notices so far, the tickets cancelled after notice `seen`). A reader that has seen more notices than
        this board holds saw a board that restarted: all of them are new to it."""
        fresh = seen > self.cancel_count
        return self.cancel_count, [ticket for n, _, ticket in self.cancels if fresh or n > seen]

    def summary(self) -> ServerLoad:
        now = time.monotonic()
        return ServerLoad.of([load for t, load in self.reports.values() if now - t < STALE_S])


class StatsBoard:
    _handles: dict[str, object] = {}  # Ray session -> this process's handle, made once

    @classmethod
    def get(cls):
        """The cluster's one board, created on first use (detached: it outlives any replica; restarted by
        Ray if its process dies, so a handle stays good). Made once per process and Ray session: the
        ingress asks every second, and each `ray.remote(_Board)` built a new actor class that Ray kept (the
        ingress grew ~3 KB per call in the soak; docs/reliability.md)."""
        session = ray.get_runtime_context().get_session_name()
        if session not in cls._handles:
            cls._handles[session] = ray.remote(_Board).options(
                name=BOARD_NAME, namespace="tidal", get_if_exists=True, lifetime="detached", num_cpus=0,
                max_restarts=-1, max_task_retries=-1).remote()
        return cls._handles[session]
