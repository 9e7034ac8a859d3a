"""A named Ray actor where engine replicas post their load; the ingress and autoscaling read it."""

from __future__ import annotations

import time

import ray

BOARD_NAME = "tidal-stats-board"
STALE_S = 5.0  # a replica silent this long is gone (scaled down or dead)


class _Board:
    def __init__(self):
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, stats: dict) -> None:
        self.reports[replica_id] = (time.monotonic(), stats)

    def summary(self) -> dict:
        now = time.monotonic()
        live = [s for t, s in self.reports.values() if now - t < STALE_S]
        total = {k: sum(s.get(k, 0) for s in live) for k in
                 ("queue_depth", "running", "drafted", "accepted", "verify_steps", "finished", "steps")}
        total["replicas"] = len(live)
        total["kv_usage"] = sum(s["kv_usage"] for s in live) / len(live) if live else 0.0
        total["mean_acceptance_length"] = (1 + total["accepted"] / total["verify_steps"] if total["verify_steps"]
                                           else 1.0)
        return total


class StatsBoard:
    @staticmethod
    def get():
        """The cluster's one board, created on first use (detached: it outlives any replica)."""
        return ray.remote(_Board).options(name=BOARD_NAME, namespace="tidal", get_if_exists=True, lifetime="detached",
                                          num_cpus=0).remote()
