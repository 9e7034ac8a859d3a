"""What one request feeds a forward (StepLayout), and how a step's layouts become one flat batch (build_inputs).

The native step, the TiDAR layouts (workers/masks.py) and the trainer (training/batches.py) all go through
here, so inference and training share one definition of positions, masks, KV slots and CCA branches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from workers.attention import AttentionGroup, AttentionMetadata, PastView, plan_groups

# Past read in place (PastView) instead of copied: runs of at least VIEW_MIN_TOKENS, in pieces of at most
# VIEW_PIECE_TOKENS, for requests of at most VIEW_MAX_QUERY new tokens (decode and TiDAR steps: their score
# rows are few, so a piece's scores stay small, and the copy is most of their attention's cost), and only
# when the step would read at least VIEW_MIN_STEP_TOKENS so: below that, copy + SDPA is as fast or faster
# (the copy stays in cache, and each piece costs a dozen small ops a layer). Measured: bench.vllm_compare
# --contexts; docs/benchmarks.md, "Step time vs context length".
VIEW_MIN_TOKENS = 1024
VIEW_PIECE_TOKENS = 4096
VIEW_MAX_QUERY = 128
VIEW_MIN_STEP_TOKENS = 16384


@dataclass
class StepLayout:
    """What one request feeds into a forward.

    Tokens sit at `positions`; the first `num_write` of them enter the KV cache (the rest are scratch,
    e.g. TiDAR proposals). `parent[i]` is the local index of the token one back on token i's branch
    (-1 = the last committed token): it drives ZAYA's convolution and delayed value. `mask[i, j]` says
    whether new token i may see new token j (None = causal). Every new token sees the whole cached prefix.
    The last `num_draft_rows` of `logit_rows` are proposal (mask) slots: their logits come from the draft
    head, not the LM head (see ModelRunner.forward).
    """

    token_ids: list[int]
    positions: list[int]
    parent: list[int]
    num_write: int
    logit_rows: list[int]  # local indices whose logits are returned
    mask: torch.Tensor | None = None  # [q, q] bool
    num_draft_rows: int = 0

    @staticmethod
    def causal(token_ids: list[int], start: int, want_logits: bool) -> StepLayout:
        q = len(token_ids)
        return StepLayout(token_ids, list(range(start, start + q)), list(range(-1, q - 1)), q,
                          [q - 1] if want_logits else [])


def past_views(full_blocks: list[int], min_blocks: int, piece_blocks: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Split a request's full past blocks into pool ranges read in place, as (first block, count) pieces, and
    the blocks left to copy. Every new token sees all of them, so their order does not matter: a run is any
    set of consecutive block ids, ascending or not in the table (the prefix cache hands blocks back tail first).
    """
    views: list[tuple[int, int]] = []
    rest: list[int] = []
    ids = sorted(full_blocks)
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        if j - i >= min_blocks:
            end = ids[j - 1] + 1
            views.extend((a, min(piece_blocks, end - a)) for a in range(ids[i], end, piece_blocks))
        else:
            rest.extend(ids[i:j])
        i = j
    return views, rest


def build_inputs(layouts: list[StepLayout], computed: list[int], block_tables: list[list[int]], state_slots: list[int],
                 block_size: int, device, scratch_base: int = 0, view_past: bool = False
                 ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-request layouts into (metadata, input_ids [T], positions [T], logit row indices [N]).

    `scratch_base` is the pool's first scratch block (KVCache.num_blocks). `view_past`: read long contiguous
    runs of past blocks in place (PastView) rather than copying them. The trainer calls this too (no cached
    prefix, empty block tables, a pool of scratch blocks only), so training and inference share one definition
    of masks, positions and CCA branches.
    """
    dev, bs, b = torch.device(device), block_size, len(layouts)
    q_lens = [len(l.token_ids) for l in layouts]
    offsets = list(itertools.accumulate(q_lens, initial=0))
    total = offsets[-1]

    def longs(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=dev)

    input_ids = longs([t for l in layouts for t in l.token_ids])
    positions = longs([p for l in layouts for p in l.positions])
    q_len_t, start_t = longs(q_lens), longs(offsets[:-1])
    req_of = torch.repeat_interleave(torch.arange(b, device=dev), q_len_t)  # [T]

    # keys: each request's past blocks (less those read in place), then its own block-aligned scratch blocks
    views: list[list[tuple[int, int]]] = [[] for _ in layouts]
    rest: dict[int, list[int]] = {}  # full past blocks left to copy, of requests with views
    viewable = [i for i, (c, q) in enumerate(zip(computed, q_lens, strict=True))
                if view_past and q <= VIEW_MAX_QUERY and c >= VIEW_MIN_TOKENS]
    if sum(computed[i] for i in viewable) < VIEW_MIN_STEP_TOKENS:  # an upper bound: skip the block scan
        viewable = []
    for i in viewable:
        views[i], rest[i] = past_views(block_tables[i][: computed[i] // bs], VIEW_MIN_TOKENS // bs,
                                       VIEW_PIECE_TOKENS // bs)
    if sum(n for v in views for _, n in v) * bs < VIEW_MIN_STEP_TOKENS:
        views = [[] for _ in layouts]
    past, past_len = [], []  # blocks to copy (a partial last block stays last, its unused slots masked), tokens
    for i, (t, c) in enumerate(zip(block_tables, computed, strict=True)):
        full = c // bs
        past.append(rest[i] + t[full : -(-c // bs)] if views[i] else t[: -(-c // bs)])
        past_len.append(c - (full - len(rest[i])) * bs if views[i] else c)
    past_n = [len(p) for p in past]
    scratch_n = [-(-q // bs) for q in q_lens]
    scratch_at = list(itertools.accumulate(scratch_n, initial=scratch_base))
    scratch_slots = (longs(scratch_at[:-1]) * bs - start_t)[req_of] + torch.arange(total, device=dev)

    def group(members: list[int]) -> AttentionGroup:
        """The padded batch of `members`: queries, key blocks (past padded with block 0) and the mask."""
        g_q = [q_lens[i] for i in members]
        q_max, g_q_t = max(g_q), longs(g_q)
        ar = torch.arange(q_max, device=dev)
        query_valid = ar[None, :] < g_q_t[:, None]  # [Bg, Qmax]
        query_index = torch.where(query_valid, longs([offsets[i] for i in members])[:, None] + ar, 0)
        p_blocks, s_blocks = max(past_n[i] for i in members), max(scratch_n[i] for i in members)
        key_blocks = longs([past[i] + [0] * (p_blocks - past_n[i])
                            + list(range(scratch_at[i], scratch_at[i] + scratch_n[i]))
                            + [scratch_at[i]] * (s_blocks - scratch_n[i]) for i in members])
        cols = torch.arange(s_blocks * bs, device=dev)
        new_mask = (cols[None, None, :] <= ar[None, :, None]) & query_valid[:, :, None]  # causal [Bg, Qmax, S]
        for j, i in enumerate(members):
            if layouts[i].mask is not None:
                new_mask[j, : q_lens[i], : q_lens[i]] = layouts[i].mask.to(dev)
        past_valid = torch.arange(p_blocks * bs, device=dev)[None, :] < longs([past_len[i] for i in members])[:, None]
        mask = torch.cat([past_valid[:, None, :].expand(-1, q_max, -1), new_mask], dim=2)
        mask[~query_valid] = True  # padding rows attend to everything: finite, and their output is dropped
        in_place = [PastView(j, q_lens[i], a, n) for j, i in enumerate(members) for a, n in views[i]]
        return AttentionGroup(query_index, query_valid, key_blocks, mask[:, None], in_place)

    # requests with views get groups of their own: only those groups pay for attention with merged pieces
    key_lens = [(p + s) * bs for p, s in zip(past_n, scratch_n, strict=True)]
    plan = []
    for part in ([i for i in range(b) if not views[i]], [i for i in range(b) if views[i]]):
        if part:
            plan += [[part[j] for j in g] for g in plan_groups([q_lens[i] for i in part], [key_lens[i] for i in part])]
    groups = [group(members) for members in plan]
    order = None
    if len(plan) > 1:  # concatenated group outputs back to flat order
        concat = longs([offsets[i] + j for members in plan for i in members for j in range(q_lens[i])])
        order = torch.empty(total, dtype=torch.long, device=dev)
        order[concat] = torch.arange(total, device=dev)

    table = longs([t + [0] * (max(map(len, block_tables), default=0) - len(t)) for t in block_tables])
    write_index = longs([offsets[i] + j for i, l in enumerate(layouts) for j in range(l.num_write)])
    write_pos, write_req = positions[write_index], req_of[write_index]
    write_slots = table[write_req, write_pos // bs] * bs + write_pos % bs

    # ZAYA conv windows: ext table = [zero, (older, newer) state of each request, new tokens]
    base = 1 + 2 * b
    cold = longs(computed) == 0
    older = torch.where(cold, 0, 1 + 2 * torch.arange(b, device=dev))[req_of]  # [T]
    newer = torch.where(cold, 0, 2 + 2 * torch.arange(b, device=dev))[req_of]
    parent = longs([p for l in layouts for p in l.parent])  # [T] local, -1 = the last committed token
    start = start_t[req_of]
    grand = parent[start + parent.clamp_min(0)]
    one_back = torch.where(parent >= 0, base + start + parent, newer)
    two_back = torch.where(parent >= 0, torch.where(grand >= 0, base + start + grand, newer), older)
    conv_index = torch.stack([two_back, one_back, base + torch.arange(total, device=dev)], dim=1)

    rows = longs([offsets[i] + r for i, l in enumerate(layouts) for r in l.logit_rows])
    meta = AttentionMetadata(
        write_index=write_index,
        write_slots=write_slots,
        starts=start_t,
        groups=groups,
        order=order,
        scratch_slots=scratch_slots,
        scratch_blocks=scratch_at[-1] - scratch_base,
        conv_index=conv_index,
        state_slots=longs(state_slots),
    )
    return meta, input_ids, positions, rows
