"""The worker actor: one per accelerator, holding all non-expert weights and its share of the experts."""

from __future__ import annotations

import torch

from cluster import process_group
from workers.expert_parallel import comm_seconds
from workers.model_runner import ModelRunner


class Worker:
    """Runs as a Ray actor; the driver calls the same forward / commit on every rank each step."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.runner: ModelRunner | None = None

    def rendezvous(self) -> tuple[str, int]:
        return process_group.rendezvous_address()

    def start(self, address: tuple[str, int], model_dir: str, runner_args: dict, timeout_s: float) -> None:
        if runner_args["device"] == "cpu":
            torch.set_num_threads(1)  # N actors share the host's cores
        process_group.join(address, self.rank, self.world_size, runner_args["device"], timeout_s)
        self.runner = ModelRunner(model_dir, expert_shard=(self.rank, self.world_size), **runner_args)

    def forward(self, *args) -> torch.Tensor | None:
        logits = self.runner.forward(*args)
        return logits if self.rank == 0 else None

    def commit(self, last_kept: list[int], snapshots: list[tuple[int, int, int]] = ()) -> None:
        self.runner.commit(last_kept, snapshots)

    def draft_chain(self):
        return self.runner.draft_chain

    def comm_seconds(self) -> float:
        return comm_seconds(self.runner.model)

    def stop(self) -> None:
        process_group.leave()
