"""A request's life: prompt, generated tokens, KV ownership, and what it has cost."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from workers.config import InvalidRequest, SamplingParams
from workers.detokenizer import Detokenizer
from workers.grammar import RequestGrammar


def prompt_token_ids(prompt: str | list[int], tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    """Tokenize (text) and validate a prompt the same way for every engine backend."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequest("this model directory has no tokenizer.json; pass prompt token ids instead")
        ids = tokenizer.encode(prompt).ids
    else:
        ids = list(prompt)
    if not ids:
        raise InvalidRequest("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(ids) >= max_model_len:
        raise InvalidRequest(f"prompt has {len(ids)} tokens but the context holds {max_model_len} "
                             "(including at least one generated token)")
    return ids


def stop_watcher(params: SamplingParams, tokenizer) -> Detokenizer | None:
    """The detokenizer that finds a request's stop strings in its output (None: it has none)."""
    if not params.stop:
        return None
    if tokenizer is None:
        raise InvalidRequest("stop strings need the model's tokenizer.json; use stop_token_ids instead")
    return Detokenizer(tokenizer, params.stop)


def generate_all(engine, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None
                 ) -> list[RequestOutput]:
    """`generate` of every engine backend (add_request / abort / step): run prompts to completion together,
    results in prompt order, each with the logprobs of its whole output when asked. All or nothing: an invalid
    prompt aborts the ones already added and raises."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids: list[str] = []
    try:
        for p, sp in zip(prompts, plist, strict=False):
            ids.append(engine.add_request(p, sp))
    except InvalidRequest:
        for i in ids:  # don't leave the valid prompts running with no one to collect them
            engine.abort(i)
        raise
    final: dict[str, RequestOutput] = {}
    logprobs: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
    while len(final) < len(ids):
        for out in engine.step():
            if out.request_id not in logprobs:
                continue  # a request someone else added
            logprobs[out.request_id] += out.logprobs or ()
            if out.finished:
                final[out.request_id] = out
                if out.logprobs is not None:
                    out.logprobs = logprobs[out.request_id]
    return [final[i] for i in ids]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestStats:
    forwards: int = 0  # forward passes spent on decoding this request (incl. TiDAR draft passes)
    generated_tokens: int = 0
    preemptions: int = 0
    verify_steps: int = 0  # steps that verified at least one draft
    drafted: int = 0
    accepted: int = 0
    offered_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    levels_chosen: dict[int, int] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens its first start found in the prefix cache

    def record_verify(self, offered: int, accepted: int, level: int | None) -> None:
        if offered:
            self.verify_steps += 1
            self.drafted += offered
            self.accepted += accepted
            grow = offered - len(self.offered_by_position)
            if grow > 0:
                self.offered_by_position += [0] * grow
                self.accepted_by_position += [0] * grow
            for i in range(offered):
                self.offered_by_position[i] += 1
                self.accepted_by_position[i] += i < accepted
        if level is not None:
            self.levels_chosen[level] = self.levels_chosen.get(level, 0) + 1

    def totals(self) -> RequestTotals:
        return RequestTotals(
            self.forwards, self.generated_tokens, self.drafted, self.accepted, self.verify_steps,
            tuple(a / o for a, o in zip(self.accepted_by_position, self.offered_by_position, strict=True)),
            dict(sorted(self.levels_chosen.items())), self.cached_tokens)


@dataclass(frozen=True)
class RequestTotals:
    """A finished request's totals: its usage and accept statistics in the APIs, attributes of its trace."""

    forwards: int  # forward passes spent decoding it (TiDAR draft passes included)
    generated_tokens: int
    drafted: int = 0  # drafts offered for verification (0: AR decoding)
    accepted: int = 0  # drafts accepted
    verify_steps: int = 0  # steps that verified at least one draft
    acceptance_by_position: tuple[float, ...] = ()  # [i]: share of the i-th drafts of a block accepted
    levels_chosen: dict[int, int] = field(default_factory=dict)  # proposal level -> steps that chose it
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verify step (the accepted drafts and the AR token)."""
        return 1 + self.accepted / self.verify_steps if self.verify_steps else 1.0

    def as_dict(self) -> dict:
        """The JSON form (the HTTP answers' "tidal" field, `tidal generate --json`): the speculative
        figures only where drafts ran."""
        out = {"forwards": self.forwards, "generated_tokens": self.generated_tokens,
               "tokens_per_forward": self.tokens_per_forward, "cached_tokens": self.cached_tokens}
        if self.drafted or self.levels_chosen:
            out.update(drafted=self.drafted, accepted=self.accepted,
                       acceptance_by_position=list(self.acceptance_by_position),
                       mean_acceptance_length=self.mean_acceptance_length,
                       levels_chosen={str(k): v for k, v in self.levels_chosen.items()})
        return out


@dataclass(frozen=True)
class RequestTimes:
    """When a request passed each stage (unix seconds): its trace's queue and prefill spans."""

    arrival: float
    first_scheduled: float | None  # end of queueing (None: not known, as inside vLLM)
    first_token: float | None  # end of prefill (None: not yet)


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
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None  # end of queueing
    first_token_time: float | None = None  # end of prefill
    drafts: list[int] = field(default_factory=list)  # TiDAR drafts for the positions after the anchor
    draft_logits: torch.Tensor | None = None  # [len(drafts), V]: the diffusion logits behind them
    block_names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks of tokens
    num_named_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    restore_state_from: int | None = None  # cached block whose recurrent-state snapshot it resumes from
    stop_strings: Detokenizer | None = None  # watches the output's text when params.stop is set
    grammar: RequestGrammar | None = None  # the output's grammar state when params.structured is set

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability under the model's raw AR distribution (its verify row before
    temperature, top-k / top-p or logit mixing), and the row's most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class StepRecord:
    """One decode step of one request, as metrics and traces see it."""

    drafted: int  # drafts offered for verification (0: AR or a first step)
    accepted: int  # drafts accepted
    level: int | None  # proposal level chosen for the next drafts (None: no proposals)
    committed: int  # tokens emitted: the accepted drafts and the AR token, cut at a stop condition
    batch_size: int  # requests the engine ran together in this step


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the delta, and the totals when finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stats: RequestTotals | None  # on the finished output only
    error: str | None = None
    step: StepRecord | None = None  # this decode step's drafts and acceptance (None: a prefill chunk)
    times: RequestTimes | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs is set
