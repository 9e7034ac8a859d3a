"""The TiDAR decode step for one request: lay out verify + proposals, accept drafts, pick the next drafts.

One forward holds [anchor, d1..dk] (causal, written to the KV cache) and one block of K+1 masks per
proposal level (scratch). Afterwards: n drafts are accepted plus one AR token (the next anchor); the
proposal with the largest level <= n supplies the next drafts, chained on the new anchor when the model
has a Markov head (workers/draft_chain.py); the KV and CCA state keep positions up to the last accepted
draft and everything after is rolled back (block_manager.trim / no CCA commit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import SamplingParams, TidarConfig
from workers.draft_chain import DraftChain, DraftInput, walk
from workers.layout import StepLayout
from workers.masks import step_layout
from workers.request import TokenLogprob
from workers.sampler import penalize, token_logprobs, verify
from workers.scheduler import Scheduled

# Checkpoint attributes that may name the mask token, in the order Zyphra's vLLM fork reads them.
MASK_TOKEN_ATTRS = (
    "tidar_mask_token_id",
    "parallel_drafting_mask_token_id",
    "draft_mask_token_id",
    "bidirectional_mask_token_id",
    "diffusion_mask_token_id",
    "mask_token_id",
)


def resolve_mask_token(hf_cfg, override: int | None) -> int | None:
    if override is not None:
        return override
    for name in MASK_TOKEN_ATTRS:
        value = getattr(hf_cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def proposal_block(levels: tuple[int, ...], accepted: int) -> int | None:
    """Which proposal block supplies the next drafts after `accepted` drafts passed: the one with the largest
    level <= accepted (levels need not be sorted; None when no level qualifies). Native step and vLLM GPU path."""
    fits = [j for j, p in enumerate(levels) if p <= accepted]
    return max(fits, key=lambda j: levels[j]) if fits else None


def layout(s: Scheduled, mask_token_id: int) -> StepLayout:
    req = s.request
    start = req.num_computed_tokens
    known = req.all_token_ids[start : start + s.num_tokens]
    return step_layout(known, req.drafts[: s.num_drafts], start, s.levels, s.block_len, mask_token_id)


def draft_pass_layout(s: Scheduled, mask_token_id: int) -> StepLayout:
    """Two-forward mode: [new anchor, K+1 masks] after the verify pass; nothing is written."""
    req = s.request
    return step_layout([req.output_token_ids[-1]], [], req.num_computed_tokens, (0,), s.block_len, mask_token_id,
                       write=False)


@dataclass
class Outcome:
    tokens: list[int]  # accepted drafts + the AR token
    last_kept: int  # local index of the last verify slot whose K/V and CCA state are kept
    drafted: int = 0
    accepted: int = 0
    level: int | None = None  # proposal level chosen for the next drafts
    proposal: DraftInput | None = None  # the kept slots of that level's block, for `set_drafts`
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asks for them


def mix_weight(params: SamplingParams, cfg: TidarConfig) -> float:
    """w of the logit-mixing sampler for this request (1: lossless): its own choice, else the engine's."""
    sampler = params.sampler or ("mix" if params.mix_weight is not None else cfg.sampler)
    if sampler == "lossless":
        return 1.0
    return params.mix_weight if params.mix_weight is not None else cfg.mix_weight


def accept(s: Scheduled, logits: torch.Tensor, cfg: TidarConfig, argmax: list[int] | None = None) -> Outcome:
    """logits: this request's rows of the forward: [k + 1 verify rows, then len(levels) * block_len];
    argmax: their argmax, when the engine took it for the whole batch at once (greedy requests)."""
    req, k = s.request, s.num_drafts
    offered = k  # drafts verified: fewer when the grammar refuses one
    allowed = None
    if req.grammar is not None:
        allowed, offered = req.grammar.row_masks(req.drafts[:k])
    drafts = req.drafts[:offered]
    d_logits = req.draft_logits[:offered] if req.draft_logits is not None else None
    rows = logits[: offered + 1]
    if req.params.penalized:
        rows = penalize(rows, req.params, req.prompt_token_ids, req.output_token_ids, drafts)
    if allowed is not None:  # a row after the grammar's end allows nothing: its token is never kept
        rows = rows.float().masked_fill(~allowed & allowed.any(dim=-1, keepdim=True), float("-inf"))
    n, token = verify(rows, drafts, d_logits, req.params, req.generator, cfg.draft_temperature,
                      mix_weight(req.params, cfg), argmax[: k + 1] if argmax else None)
    level, proposal = None, None
    req.drafts, req.draft_logits = [], None
    if s.levels:
        j = proposal_block(s.levels, n)
        level = s.levels[j]
        block = logits[k + 1 + j * s.block_len : k + 1 + (j + 1) * s.block_len]
        # the anchor sits at b; slot i of the block at b + level + 1 + i; the new anchor (`token`) at
        # b + n + 1, so the slots kept as drafts start at slot n - level + 1, position b + n + 2
        b = req.num_computed_tokens + s.num_tokens - 1
        proposal = DraftInput(block[n - level + 1 :][: s.block_len - 1], token, b + n + 2, req.generator)
    req.stats.record_verify(offered, n, level)
    tokens = drafts[:n] + [token]
    logprobs = token_logprobs(logits[: n + 1], tokens, req.params.logprobs) if req.params.logprobs is not None else None
    return Outcome(tokens, s.num_tokens - 1 + n, offered, n, level, proposal, logprobs)


def set_drafts(batch: list[tuple[Scheduled, DraftInput]], chain: DraftChain | None, cfg: TidarConfig) -> None:
    """Draft each request's next tokens from its kept proposal slots (chained when the model has a Markov
    head), all requests of the step at once. Under a grammar the drafts stop before the first one it refuses:
    the next step does not spend slots on drafts verification would cut."""
    for (s, _), (drafts, rows) in zip(batch, walk([p for _, p in batch], chain, cfg.draft_temperature), strict=True):
        if s.request.grammar is not None:
            n = s.request.grammar.valid_prefix(drafts)
            drafts, rows = drafts[:n], rows[:n]
        s.request.drafts, s.request.draft_logits = drafts, rows
