"""A request's life: prompt, generated tokens, KV ownership, and what it has cost."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from workers.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestStats:
    forwards: int = 0  # forward passes that emitted tokens for this request
    generated_tokens: int = 0
    preemptions: int = 0

    def as_dict(self) -> dict:
        tpf = self.generated_tokens / self.forwards if self.forwards else 0.0
        return {"forwards": self.forwards, "generated_tokens": self.generated_tokens, "tokens_per_forward": tpf}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # FIFO order
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    state_slot: int = -1  # recurrent-state slot (ZAYA CCA); -1 = none held
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stats: RequestStats = field(default_factory=RequestStats)
    generator: torch.Generator | None = None  # per-request RNG, seeded when params.seed is set

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the delta, and the totals when finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stats: dict
    error: str | None = None
