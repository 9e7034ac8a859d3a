"""Drives a group of expert-parallel worker actors with the ModelRunner interface (forward / commit).

A dead actor or a step slower than the timeout tears the whole group down (actors killed, placement
group removed) and raises RunnerFailure; the engine fails the requests whose KV lived there, and the
next forward builds a fresh group.
"""

from __future__ import annotations

import ray

from cluster.placement import create_group_placement, in_bundle, remove_group_placement
from cluster.ray_cluster import ensure_ray
from workers.model_runner import RunnerFailure
from workers.worker import Worker


class WorkerGroup:
    def __init__(self, model_dir: str, size: int, runner_args: dict, timeout_s: float):
        self.model_dir, self.size, self.runner_args, self.timeout_s = model_dir, size, runner_args, timeout_s
        self.use_gpu = runner_args["device"] != "cpu"
        self.workers: list = []
        self.pg = None
        ensure_ray()
        self._build()

    def _build(self) -> None:
        self.pg = create_group_placement(self.size, self.use_gpu)
        actor = ray.remote(num_cpus=1, num_gpus=1 if self.use_gpu else 0)(Worker)
        self.workers = [actor.options(scheduling_strategy=in_bundle(self.pg, r)).remote(r, self.size)
                        for r in range(self.size)]
        try:
            address = ray.get(self.workers[0].rendezvous.remote(), timeout=self.timeout_s)
            ray.get([w.start.remote(address, self.model_dir, self.runner_args, self.timeout_s) for w in self.workers],
                    timeout=10 * self.timeout_s)
            self.draft_chain = ray.get(self.workers[0].draft_chain.remote(), timeout=self.timeout_s)
        except Exception:
            self.shutdown()
            raise

    def _call(self, method: str, *args):
        if not self.workers:
            self._build()
        try:
            return ray.get([getattr(w, method).remote(*args) for w in self.workers], timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as e:
            self.shutdown()
            raise RunnerFailure(f"expert-parallel worker group failed ({type(e).__name__}); "
                                "its requests were aborted and the group will be rebuilt") from e

    def forward(self, *args):
        return self._call("forward", *args)[0]

    def commit(self, last_kept: list[int], snapshots: list[tuple[int, int, int]] = ()) -> None:
        self._call("commit", last_kept, snapshots)

    def comm_seconds(self) -> float:
        return sum(self._call("comm_seconds")) / self.size

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self.pg is not None:
            remove_group_placement(self.pg)
            self.pg = None
