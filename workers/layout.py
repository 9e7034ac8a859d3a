"""What one request feeds a forward (StepLayout), and how a step's layouts become one flat batch (build_inputs).

The native step, the TiDAR layouts (workers/masks.py) and the trainer (training/batches.py) all go through
here, so inference and training share one definition of positions, masks, KV slots and CCA branches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from workers.attention import AttentionGroup, AttentionMetadata, plan_groups


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


def build_inputs(layouts: list[StepLayout], computed: list[int], block_tables: list[list[int]], state_slots: list[int],
                 block_size: int, device, scratch_base: int = 0
                 ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-request layouts into (metadata, input_ids [T], positions [T], logit row indices [N]).

    `scratch_base` is the pool's first scratch block (KVCache.num_blocks). The trainer calls this too (no
    cached prefix, empty block tables, a pool of scratch blocks only), so training and inference share one
    definition of masks, positions and CCA branches.
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

    # keys: each request's past blocks, then its own block-aligned scratch blocks
    past_n = [-(-c // bs) for c in computed]
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
        key_blocks = longs([block_tables[i][:past_n[i]] + [0] * (p_blocks - past_n[i])
                            + list(range(scratch_at[i], scratch_at[i] + scratch_n[i]))
                            + [scratch_at[i]] * (s_blocks - scratch_n[i]) for i in members])
        cols = torch.arange(s_blocks * bs, device=dev)
        new_mask = (cols[None, None, :] <= ar[None, :, None]) & query_valid[:, :, None]  # causal [Bg, Qmax, S]
        for j, i in enumerate(members):
            if layouts[i].mask is not None:
                new_mask[j, : q_lens[i], : q_lens[i]] = layouts[i].mask.to(dev)
        past_valid = torch.arange(p_blocks * bs, device=dev)[None, :] < longs([computed[i] for i in members])[:, None]
        mask = torch.cat([past_valid[:, None, :].expand(-1, q_max, -1), new_mask], dim=2)
        mask[~query_valid] = True  # padding rows attend to everything: finite, and their output is dropped
        return AttentionGroup(query_index, query_valid, key_blocks, mask[:, None])

    plan = plan_groups(q_lens, [(p + s) * bs for p, s in zip(past_n, scratch_n, strict=False)])
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
