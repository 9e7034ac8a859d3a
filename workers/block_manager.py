"""Paged KV ownership: a pool of fixed-size blocks with reference counts, recurrent-state slots, and the
prefix cache.

Prefix cache (as vLLM's): a full block of committed tokens is named by a chain hash of every token up to its
end, so one name means one prefix. A request that starts (or restarts after preemption) takes the named
blocks of its longest cached prefix instead of computing them, one more reference each. A named block its
last holder lets go of stays cached but evictable; when no free block is left, the one released longest ago
is evicted (its name dropped) and reused, so eviction always comes before preemption and never touches a
block in use. Only committed tokens are named: TiDAR drafts and proposals live past `num_computed_tokens`,
in blocks no other request can hold.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from workers.request import Request


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a block: its tokens and the name of the block before it (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_state_slots: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unnamed, held by nobody
        self.free_state_slots: deque[int] = deque(range(num_state_slots))
        self.cached: dict[bytes, int] = {}  # block name -> block
        self.name_of: list[bytes | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks held by nobody, oldest first
        self.queries = self.hits = 0  # tokens looked up in / found in the cache (vLLM's prefix cache counters)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get: the free ones and the evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    def usage(self) -> float:
        """Share of blocks held by requests (cached blocks nobody holds count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def cached_free_usage(self) -> float:
        """Share of blocks that nobody holds but that keep a cached prefix (evicted on demand)."""
        return len(self.evictable) / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        if req.state_slot < 0 and not self.free_state_slots:
            return False
        return self.blocks_needed(req, num_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow the request's block table to hold `num_tokens` tokens (and give it a state slot)."""
        if not self.can_allocate(req, num_tokens):
            raise RuntimeError("allocate() called without can_allocate()")
        if req.state_slot < 0:
            req.state_slot = self.free_state_slots.popleft()
        for _ in range(self.blocks_needed(req, num_tokens)):
            block = self.free_blocks.popleft() if self.free_blocks else self._evict()
            self.ref_counts[block] = 1
            req.block_table.append(block)

    def reuse_prefix(self, req: Request) -> int:
        """Start a request that holds no KV on the cached blocks of its longest cached prefix; returns the
        tokens found. At least the last token is left to compute (its logits are the next token's), so a hit
        on the whole sequence stops a block short and nothing is ever written into a shared block."""
        assert not req.block_table and req.num_computed_tokens == 0
        if not self.prefix_caching:
            return 0
        names = self._names(req, (req.num_tokens - 1) // self.block_size)
        for name in names:
            block = self.cached.get(name)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            req.block_table.append(block)
        req.num_computed_tokens = len(req.block_table) * self.block_size
        req.num_named_blocks = len(req.block_table)
        return req.num_computed_tokens

    def cache_committed(self, req: Request) -> None:
        """Name the request's newly full blocks of committed tokens, so later requests can share them. A
        block whose prefix another block already names stays unnamed (freed as usual)."""
        if not self.prefix_caching:
            return
        full = req.num_computed_tokens // self.block_size
        names = self._names(req, full)
        for i in range(req.num_named_blocks, full):
            block, name = req.block_table[i], names[i]
            if self.name_of[block] is None and name not in self.cached:
                self.cached[name] = block
                self.name_of[block] = name
        req.num_named_blocks = max(req.num_named_blocks, full)

    def trim(self, req: Request, num_tokens: int) -> None:
        """Release blocks past `num_tokens` tokens: the KV rollback after rejected drafts. Those blocks hold
        uncommitted positions, so none of them is named or shared."""
        keep = -(-num_tokens // self.block_size)
        while len(req.block_table) > keep:
            self._release(req.block_table.pop())

    def free(self, req: Request) -> None:
        """Release everything the request holds (finish, abort, preemption). Tail blocks first, so the
        evictable order drops a prefix's tail before its head."""
        for block in reversed(req.block_table):
            self._release(block)
        req.block_table.clear()
        req.num_named_blocks = 0
        if req.state_slot >= 0:
            self.free_state_slots.append(req.state_slot)
            req.state_slot = -1

    def _names(self, req: Request, n: int) -> list[bytes]:
        """The names of the request's first `n` full blocks of tokens (memoised on the request: its tokens
        only grow)."""
        names, bs, tokens = req.block_names, self.block_size, None
        while len(names) < n:
            tokens = tokens or req.all_token_ids
            i = len(names)
            names.append(chain_hash(names[-1] if names else b"", tokens[i * bs : (i + 1) * bs]))
        return names

    def _evict(self) -> int:
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.name_of[block]]
        self.name_of[block] = None
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            if self.name_of[block] is not None:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)
