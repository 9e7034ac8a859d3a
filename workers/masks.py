"""Token layout and attention mask of one request's forward: a verify segment plus proposal blocks.

verify   : [known tokens..., d1..dk]   causal over the cached prefix; the last known token is the anchor
proposal : one block of `block_len` mask tokens per level p, starting right after verify slot anchor + p;
           it sees the prefix, the verify slots up to anchor + p, and its own block (bidirectional).
Verify slots never see proposals, and proposals never see each other: this keeps the AR rows exact.
With no levels and no drafts this is plain causal (AR) decoding or a prefill chunk.
"""

from __future__ import annotations

import torch

from workers.layout import StepLayout


def step_layout(
    known: list[int],
    drafts: list[int],
    start: int,
    levels: tuple[int, ...],
    block_len: int,
    mask_token_id: int,
    write: bool = True,
) -> StepLayout:
    """known: tokens from position `start` whose last one is the anchor; drafts follow it.

    Logit rows: the verify rows from the anchor on (k + 1), then every proposal slot, block by block.
    """
    anchor = len(known) - 1
    verify = known + drafts
    v = len(verify)
    q = v + block_len * len(levels)
    mask = torch.zeros(q, q, dtype=torch.bool)
    mask[:v, :v] = torch.ones(v, v, dtype=torch.bool).tril()
    token_ids, positions, parent = list(verify), list(range(start, start + v)), list(range(-1, v - 1))
    for j, p in enumerate(levels):
        last_seen = anchor + p  # verify slot the block continues from
        lo = v + j * block_len
        mask[lo : lo + block_len, : last_seen + 1] = True
        mask[lo : lo + block_len, lo : lo + block_len] = True
        token_ids += [mask_token_id] * block_len
        positions += list(range(start + last_seen + 1, start + last_seen + 1 + block_len))
        parent += [last_seen] + list(range(lo, lo + block_len - 1))
    rows = list(range(anchor, v)) + list(range(v, q))
    return StepLayout(token_ids, positions, parent, v if write else 0, rows, mask, num_draft_rows=q - v)



def training_layout(tokens: list[int], block_len: int, mask_token_id: int, offset: int = 0) -> StepLayout:
    """The TiDAR training sequence: the clean tokens (causal) followed by a fully masked copy.

    The masked copy is cut into blocks of `block_len` slots starting at positions offset, offset + block_len, ...
    (positions before `offset` form a shorter first block). A block starting at position s sees the clean
    tokens before s and itself, and its slot at position t is trained to predict tokens[t]: exactly what
    a proposal block starting at s sees at inference, CCA branch included (slot 0 continues token s - 1).
    Rows: all 2S; clean row t predicts tokens[t + 1], masked row S + t predicts tokens[t].
    """
    s_len = len(tokens)
    starts = sorted({0, *range(offset % block_len or block_len, s_len, block_len)}) if s_len else []
    q = 2 * s_len
    mask = torch.zeros(q, q, dtype=torch.bool)
    mask[:s_len, :s_len] = torch.ones(s_len, s_len, dtype=torch.bool).tril()
    parent = list(range(-1, s_len - 1))
    for start, end in zip(starts, starts[1:] + [s_len], strict=True):
        lo, hi = s_len + start, s_len + end
        mask[lo:hi, :start] = True
        mask[lo:hi, lo:hi] = True
        parent += [start - 1] + list(range(lo, hi - 1))
    return StepLayout(tokens + [mask_token_id] * s_len, list(range(s_len)) * 2, parent, 0, list(range(q)), mask,
                      num_draft_rows=s_len)
