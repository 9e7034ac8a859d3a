"""Continuous batching under a per-step token budget.

Each step: running requests first (FIFO), each fed its next chunk of uncomputed tokens (a prefill
chunk, or the anchor of a decode); then waiting requests are admitted in arrival order while the
budget, a running slot and free KV blocks allow. When blocks run out, the most recently arrived
running request is preempted (its blocks freed; it is recomputed later from its tokens). A request that
starts takes the cached blocks of its longest cached prefix first (workers/block_manager.py), and computes
only the rest.

TiDAR: a chunk that reaches the anchor also carries up to K drafts to verify and one proposal block
of K+1 mask slots per level. K and the levels for the step come from the draft policy
(workers/draft_policy.py), which follows the load down to plain AR.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

from workers.block_manager import BlockManager
from workers.config import DraftRule
from workers.request import Request, Status


@dataclass
class Scheduled:
    request: Request
    num_tokens: int  # known tokens fed this step, starting at request.num_computed_tokens
    num_drafts: int = 0  # TiDAR drafts verified after them
    levels: tuple[int, ...] = ()  # TiDAR proposal blocks
    block_len: int = 0  # slots per proposal block (K + 1)

    @property
    def cost(self) -> int:
        return self.num_tokens + self.num_drafts + self.block_len * len(self.levels)

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so its last row yields the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 policy=None, two_forward: bool = False):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy  # None: plain AR
        self.two_forward = two_forward  # decode steps verify only; a second forward drafts
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def draft_rule(self, batch: int, budget: int) -> DraftRule | None:
        return self.policy.choose(batch, budget) if self.policy is not None else None

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        # prompts still to prefill keep for themselves all the step that AR would give them (everything
        # but one slot per running request): drafting only uses what they leave, so TiDAR's time to first
        # token is AR's. Half the step was not enough (c = 8 end to end: TTFT 918 vs 446 ms p50). Only
        # prompts that can start now count: not those waiting for a free sequence slot.
        admissible = itertools.islice(self.waiting, max(0, self.max_num_seqs - len(self.running)))
        pending = sum(max(0, r.num_tokens - r.num_computed_tokens - 1) for r in (*self.running, *admissible))
        reserve = min(pending, max(0, budget - len(self.running)))
        rule = self.draft_rule(min(self.max_num_seqs, len(self.running) + len(self.waiting)), budget - reserve)
        width = self.policy.width if self.policy is not None else None  # a probe drafts for `width` requests
        drafters = len(self.running) + len(self.waiting) if width is None else width
        out: list[Scheduled] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            s = self._plan(req, budget, rule if len(out) < drafters else None)
            if s.cost > budget:
                break  # it runs next step; the rule guarantees the first request always fits
            while not self.blocks.can_allocate(req, self._kv_need(s)):
                self._preempt(self.running[-1])
                if req.status is not Status.RUNNING:
                    break
            if req.status is not Status.RUNNING:
                break  # req itself was the last one and got preempted
            self.blocks.allocate(req, self._kv_need(s))
            out.append(s)
            budget -= s.cost
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = self.blocks.reuse_prefix(req)
            s = self._plan(req, budget, rule if len(out) < drafters else None)
            if s.cost > budget or not self.blocks.can_allocate(req, self._kv_need(s)):
                self.blocks.free(req)  # the cached blocks go back until it can start
                req.num_computed_tokens = 0
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(req, self._kv_need(s))
            req.restore_state_from = req.block_table[cached // self.blocks.block_size - 1] if cached else None
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
                req.stats.cached_tokens = cached
                self.blocks.queries += req.num_tokens
                self.blocks.hits += cached
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(s)
            budget -= s.cost
        return out

    def _plan(self, req: Request, budget: int, rule: DraftRule | None) -> Scheduled:
        left = req.num_tokens - req.num_computed_tokens
        n = min(left, budget)
        if n < left or rule is None:
            return Scheduled(req, n)
        room = self.max_model_len - req.num_tokens  # the drafts' K/V must fit the context
        k = max(0, min(len(req.drafts), rule.block_size, room))
        levels = () if self.two_forward and k else tuple(p for p in rule.levels if p <= k)
        s = Scheduled(req, n, k, levels, rule.block_size + 1)
        if s.cost > budget and left > 1:
            return Scheduled(req, min(left - 1, budget))  # stop short of the anchor; it fits next step
        return s

    @staticmethod
    def _kv_need(s: Scheduled) -> int:
        return s.request.num_computed_tokens + s.num_tokens + s.num_drafts

    def finish(self, req: Request, reason: str) -> None:
        """Free everything the request holds; safe to call in any state."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.restore_state_from = None
        req.status = Status.WAITING
        req.stats.preemptions += 1
        self.waiting.appendleft(req)
