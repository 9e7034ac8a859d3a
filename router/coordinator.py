"""What the ingress replicas share: the drain state, their in-flight counts and their metrics.

Several ingress replicas serve the same ports (HTTP through Serve's proxies, gRPC on one port with
SO_REUSEPORT), so a Drain or SIGTERM that reaches one of them must stop new work on all, and /metrics on
any of them must count what all of them served. The coordinator is a one-replica Serve deployment of the
application: it lives and dies with the app (unlike the detached stats board), so a redeployed app starts
undrained.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

STALE_S = 5.0  # an ingress silent this long is gone; its counters still count in /metrics
ACK_TIMEOUT_S = 5.0  # how long a drain waits for every live ingress to say it refuses new work

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (Prometheus sample name, sorted label pairs)


@dataclass
class IngressReport:
    """An ingress replica's state, posted every half second and on demand."""

    ingress_id: str
    in_flight: int  # requests it is streaming now
    samples: dict[Sample, float] = field(default_factory=dict)  # its counters and histograms, cumulative


class Coordinator:
    def __init__(self):
        self.draining = asyncio.Event()
        self.reports: dict[str, tuple[float, IngressReport]] = {}  # ingress id -> (received at, report)
        self.acked: set[str] = set()  # ingresses that have stopped taking work

    def report(self, report: IngressReport) -> bool:
        """Keep the report; answers whether the server is draining."""
        self.reports[report.ingress_id] = (time.monotonic(), report)
        return self.draining.is_set()

    async def wait_drain(self) -> None:
        """Returns when a drain begins (a long poll: every ingress keeps one open)."""
        await self.draining.wait()

    def ack_drain(self, report: IngressReport) -> None:
        """The ingress of `report` refuses new work from now on; its report is fresh."""
        self.report(report)
        self.acked.add(report.ingress_id)

    async def drain(self) -> int:
        """Start the drain, wait (bounded) until every live ingress refuses new work, return the requests
        in flight across them (as they reported it when they stopped taking work)."""
        self.draining.set()
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while not self._live() <= self.acked and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.in_flight()

    def in_flight(self) -> int:
        return sum(self.reports[i][1].in_flight for i in self._live())

    def samples(self, fresh: IngressReport) -> list[dict[Sample, float]]:
        """Every ingress's metric samples, `fresh` (the asking ingress's own, just taken) included."""
        self.report(fresh)
        return [r.samples for _, r in self.reports.values()]

    def _live(self) -> set[str]:
        now = time.monotonic()
        return {i for i, (at, _) in self.reports.items() if now - at < STALE_S}
