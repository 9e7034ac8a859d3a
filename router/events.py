"""What crosses the Ray hop between the ingress and an engine replica: the request, then typed stream events."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from workers.config import SamplingParams
from workers.request import RequestTotals, StepRecord, TokenLogprob


@dataclass(frozen=True)
class ReplicaInfo:
    """What an engine replica serves (the gRPC ModelInfo, less the served name the ingress adds)."""

    architecture: str  # the checkpoint's class, e.g. ZayaForCausalLM
    vocab_size: int
    max_model_len: int  # prompt plus output, in tokens
    mode: str  # tidar | ar
    block_size: int  # K: drafts verified per TiDAR step
    levels: tuple[int, ...]  # TiDAR proposal levels
    sampler: str  # lossless | mix
    expert_parallel: int  # worker actors per replica
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Caller:
    """The ingress replica that sent a request: the engine replica stops the request if it dies."""

    actor_id: str  # its Ray actor id (hex)
    handle: object  # its Ray actor handle, to probe


@dataclass
class EngineRequest:
    """One generation request as the ingress hands it to a replica (validated and tokenized at the edge)."""

    prompt: list[int]  # prompt token ids
    sampling: SamplingParams
    request_id: str | None = None  # the client's id, or None for a fresh one
    stream: bool = True  # the client reads tokens as they come; False: only the first and the last event matter
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context of the ingress span
    caller: Caller | None = None  # None: a caller outside Ray (tests, in process)
    ticket: str = field(default_factory=lambda: uuid.uuid4().hex)  # this attempt, unlike a client's reused id:
    # what a cancel notice names (router/stats.py)


@dataclass
class StreamEvent:
    """The tokens of one or more decode steps of one request (coalesced by the replica's stream interval)."""

    request_id: str
    token_ids: list[int]  # tokens committed since the previous event, in order
    prompt_tokens: int  # length of the prompt in tokens
    steps: list[StepRecord] = field(default_factory=list)  # every decode step these tokens came from, in order
    finished: bool = False  # the last event of the request
    finish_reason: str | None = None  # stop | length | abort | error, on the last event
    stats: RequestTotals | None = None  # the request's totals, on the last event only
    error: str | None = None  # the engine's failure message (finish_reason "error")
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them

    def merged_into(self, later: StreamEvent) -> StreamEvent:
        """This event's tokens and steps ahead of `later`'s: one message for both."""
        later.token_ids = self.token_ids + later.token_ids
        later.steps = self.steps + later.steps
        if self.logprobs is not None:
            later.logprobs = self.logprobs + (later.logprobs or [])
        return later
