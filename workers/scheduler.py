"""Continuous batching under a per-step token budget.

Each step: running requests first (FIFO), each fed its next chunk of uncomputed tokens (a prefill
chunk, or the one new token of a decode); then waiting requests are admitted in arrival order while
the budget, a running slot and free KV blocks allow. When blocks run out, the most recently arrived
running request is preempted (its blocks freed; it is recomputed later from its tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.block_manager import BlockManager
from workers.request import Request, Status


@dataclass
class Scheduled:
    request: Request
    num_tokens: int  # tokens fed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so its last row yields the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.can_allocate(req, req.num_computed_tokens + n):
                self._preempt(self.running[-1])
                if req.status is not Status.RUNNING:
                    break
            if req.status is not Status.RUNNING:
                break  # req itself was the last one and got preempted
            self.blocks.allocate(req, req.num_computed_tokens + n)
            out.append(Scheduled(req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.can_allocate(req, req.num_computed_tokens + n):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(req, req.num_computed_tokens + n)
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(Scheduled(req, n))
            budget -= n
        return out

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
        req.status = Status.WAITING
        req.stats.preemptions += 1
        self.waiting.appendleft(req)
