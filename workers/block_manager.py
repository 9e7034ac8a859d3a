"""Paged KV ownership: a pool of fixed-size blocks with reference counts, and recurrent-state slots."""

from __future__ import annotations

from collections import deque

from workers.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_state_slots: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.free_state_slots: deque[int] = deque(range(num_state_slots))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        if req.state_slot < 0 and not self.free_state_slots:
            return False
        return self.blocks_needed(req, num_tokens) <= len(self.free_blocks)

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow the request's block table to hold `num_tokens` tokens (and give it a state slot)."""
        if not self.can_allocate(req, num_tokens):
            raise RuntimeError("allocate() called without can_allocate()")
        if req.state_slot < 0:
            req.state_slot = self.free_state_slots.popleft()
        for _ in range(self.blocks_needed(req, num_tokens)):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            req.block_table.append(block)

    def trim(self, req: Request, num_tokens: int) -> None:
        """Release blocks past `num_tokens` tokens: the KV rollback after rejected drafts."""
        keep = -(-num_tokens // self.block_size)
        while len(req.block_table) > keep:
            self._release(req.block_table.pop())

    def free(self, req: Request) -> None:
        """Release everything the request holds (finish, abort, preemption)."""
        for block in reversed(req.block_table):
            self._release(block)
        req.block_table.clear()
        if req.state_slot >= 0:
            self.free_state_slots.append(req.state_slot)
            req.state_slot = -1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)
