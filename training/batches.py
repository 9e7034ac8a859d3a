"""Model inputs of one training batch, built with the engine's own layout code.

`workers.masks.training_layout` (TiDAR) and `StepLayout` (AR) define masks, positions and CCA branches;
`workers.layout.build_inputs` flattens them exactly as at inference. Nothing here re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata, KVCache
from workers.draft_chain import reset_prev
from workers.layout import StepLayout, build_inputs
from workers.masks import training_layout


@dataclass
class Batch:
    meta: AttentionMetadata
    input_ids: torch.Tensor  # [T] T = B * slots per sequence (S for AR, 2S for TiDAR)
    positions: torch.Tensor  # [T]
    rows: torch.Tensor  # [N] flat rows whose logits the loss needs
    targets: torch.Tensor  # [N] target token of each row
    is_ar: torch.Tensor  # [N] bool: row is a next-token (clean) row, else a masked (diffusion) row
    num_seqs: int
    prev: torch.Tensor | None = None  # [N] long: for masked rows the Markov head's teacher-forced prev token


def ar_layout(tokens: list[int]) -> StepLayout:
    """Plain causal layout over a fresh sequence, every row returned; nothing is written to the KV cache."""
    lay = StepLayout.causal(tokens, 0, True)
    lay.num_write = 0  # training keeps no cache: writing would tie the dummy cache into the autograd graph
    lay.logit_rows = list(range(len(tokens)))
    return lay


def ar_batch(seqs: torch.Tensor) -> Batch:
    """seqs: [B, S + 1] token windows; rows 0..S-1 of each predict tokens 1..S."""
    b, s1 = seqs.shape
    s = s1 - 1
    layouts = [ar_layout(row[:s].tolist()) for row in seqs]
    meta, ids, pos, rows = build_inputs(layouts, [0] * b, [[]] * b, list(range(b)), block_size=16, device="cpu")
    targets = seqs[:, 1:].reshape(-1)  # [B * S]
    return Batch(meta, ids, pos, rows, targets, torch.ones(b * s, dtype=torch.bool), b)


def tidar_batch(seqs: torch.Tensor, block_len: int, mask_token_id: int, offsets: list[int],
                ar_seqs: torch.Tensor | None = None, chain_block_len: int = 16) -> Batch:
    """seqs: [B, S + 1]. Each sequence is training_layout(tokens[:S]) (2S slots): clean row t predicts
    tokens[t + 1] (so row S - 1 uses the extra token), masked row S + t predicts tokens[t].
    ar_seqs: [B] bool, which sequences also train the AR rows (default all; distilled text trains drafts only).
    Masked row S + t chains on tokens[t - 1] (teacher forcing), or token 0 where t is a multiple of
    `chain_block_len` (dspark_block_len), as drafting does at inference (workers/draft_chain.py)."""
    b, s1 = seqs.shape
    s = s1 - 1
    layouts = [training_layout(row[:s].tolist(), block_len, mask_token_id, offset=o)
               for row, o in zip(seqs, offsets, strict=False)]
    meta, ids, pos, rows = build_inputs(layouts, [0] * b, [[]] * b, list(range(b)), block_size=16, device="cpu")
    # rows are all 2S slots per sequence in order: [clean 0..S-1, masked 0..S-1]
    targets = torch.cat([seqs[:, 1:], seqs[:, :s]], dim=1)  # [B, 2S]
    is_ar = torch.cat([torch.ones(b, s, dtype=torch.bool), torch.zeros(b, s, dtype=torch.bool)], dim=1)
    before = torch.cat([torch.zeros(b, 1, dtype=seqs.dtype), seqs[:, : s - 1]], dim=1)  # [B, S]: tokens[t - 1]
    chained = reset_prev(before, torch.arange(s).expand(b, -1), chain_block_len)
    prev = torch.cat([torch.zeros_like(chained), chained], dim=1).reshape(-1)  # [B * 2S]
    keep = (~is_ar | ar_seqs[:, None]).reshape(-1) if ar_seqs is not None else slice(None)
    return Batch(meta, ids, pos, rows[keep], targets.reshape(-1)[keep], is_ar.reshape(-1)[keep], b, prev[keep])


def row_logits(model, batch: Batch) -> torch.Tensor:
    """[N, V] fp32 logits of the batch's rows: the LM head on AR rows; on masked rows the draft head
    (`compute_draft_logits`), plus the Markov head's bias of the row's prev token when the model has one."""
    hidden = forward_hidden(model, batch)[batch.rows]
    if model.diffusion_output_layer is None and model.markov_head is None:
        return model.compute_logits(hidden)
    diff = ~batch.is_ar
    logits = torch.empty(len(hidden), model.cfg.vocab_size)
    logits[batch.is_ar] = model.compute_logits(hidden[batch.is_ar])
    z = model.compute_draft_logits(hidden[diff])
    if model.markov_head is not None:
        z = z + model.markov_head(batch.prev[diff])
    logits[diff] = z
    return logits


def forward_hidden(model, batch: Batch) -> torch.Tensor:
    """[T, H] final hidden states; a throwaway KV pool of scratch blocks only and fresh CCA state (cold start)
    per call."""
    c = model.cfg
    kv = KVCache(c.num_hidden_layers, 0, 16, c.num_key_value_heads, c.head_dim, torch.float32, "cpu",
                 scratch_blocks=batch.meta.scratch_blocks)
    state = model.make_state(batch.num_seqs, torch.float32, "cpu")
    hidden = model(batch.input_ids, batch.positions, batch.meta, kv, state)
    state.pending = [None] * len(state.pending)  # holds graph tensors; training never commits
    return hidden
