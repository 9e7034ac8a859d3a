"""Chained drafting: the next drafts from the kept slots of the selected proposal, left to right.

Without a Markov head every slot drafts on its own: argmax of its logits (a point-mass draft) or a sample
of softmax(z / T_D). With one (workers/models/draft_heads.py) slot k's logits are

    z_k + w1[prev] @ w2,   prev = the token drafted at slot k - 1 (the new anchor for the first kept slot),

and prev is token 0 wherever the slot's absolute position is a multiple of `dspark_block_len` (Zyphra's
"global reset", the first kept slot included). The chained row is the draft's exact q (sampled drafts) and
its z_D (logit mixing): the verifier reads it back from `Request.draft_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.models.draft_heads import MarkovHead
from workers.sampler import draft


def reset_prev(prev: torch.Tensor, positions: torch.Tensor, block_len: int) -> torch.Tensor:
    """prev [N] long, the token before each slot; positions [N] the slots' absolute positions -> prev with
    token 0 wherever the position is a multiple of `block_len` (the rule the trainer uses too)."""
    return torch.where(positions % block_len == 0, torch.zeros_like(prev), prev)


@dataclass
class DraftChain:
    head: MarkovHead
    block_len: int  # dspark_block_len: prev resets to token 0 at positions that are multiples of it


@dataclass
class DraftInput:
    """One request's kept proposal slots."""

    rows: torch.Tensor  # [m, V] draft-head logits, slot by slot (m <= K)
    anchor: int  # the token the AR sampler just produced, at position first_pos - 1
    first_pos: int  # absolute position of rows[0]
    generator: torch.Generator | None  # the request's RNG (None: greedy)


def walk(items: list[DraftInput], chain: DraftChain | None, temperature: float
         ) -> list[tuple[list[int], torch.Tensor]]:
    """Per item: (drafts [m], the logits each was drawn from [m, V]). Vectorised over the batch."""
    if chain is None:
        return [(draft(it.rows, temperature, it.generator), it.rows) for it in items]
    lengths = [len(it.rows) for it in items]
    b, m = len(items), max(lengths, default=0)
    if m == 0:
        return [([], it.rows) for it in items]
    dev = items[0].rows.device
    base = torch.zeros(b, m, items[0].rows.shape[-1], device=dev)
    for i, it in enumerate(items):
        base[i, : lengths[i]] = it.rows
    prev = torch.tensor([it.anchor for it in items], dtype=torch.long, device=dev)  # [B]
    pos = torch.tensor([it.first_pos for it in items], dtype=torch.long, device=dev)  # [B]
    chained = torch.empty_like(base)  # [B, m, V]
    tokens = torch.empty(b, m, dtype=torch.long, device=dev)
    sampled = temperature > 0.0 and any(it.generator is not None for it in items)
    with torch.no_grad():
        for k in range(m):
            prev = reset_prev(prev, pos + k, chain.block_len)
            z = base[:, k] + chain.head(prev)  # [B, V]
            chained[:, k] = z
            prev = z.argmax(dim=-1)
            if sampled:  # each request draws only for its own slots, so its RNG stream ignores the batch
                prev = torch.tensor([draft(z[i : i + 1], temperature, it.generator)[0] if k < lengths[i]
                                     else int(prev[i]) for i, it in enumerate(items)],
                                    dtype=torch.long, device=dev)
            tokens[:, k] = prev
    drafted = tokens.tolist()
    return [(drafted[i][: lengths[i]], chained[i, : lengths[i]]) for i in range(b)]
