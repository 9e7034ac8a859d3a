"""TiDAR decoding inside vLLM on GPU, through Model Runner V2 hooks. Written against vLLM 0.32.0.

STATUS: UNVERIFIED. Written on a CPU-only machine where Model Runner V2 does not run (it needs Triton and
a GPU). `bench/gpu_check.py` is the prepared check; until it passes, treat this path as a draft. The TiDAR
layout, mask and acceptance rule are the native engine's own functions (workers/masks.py, workers/tidar.py,
workers/sampler.py), not a second copy; verified on CPU (tests/test_vllm_plugin.py): the FlexAttention
mask_mod against the native mask, rows vLLM cuts short, and ZAYA's CCA state rollback under vLLM
speculative decoding (per-token candidate states, ngram drafts).

How one TiDAR step maps onto vLLM (single-forward layout, greedy):
  * Scheduling: `diffusion_config.canvas_length = W = K + P * (K + 1)` makes vLLM schedule, per decode
    request, the last sampled token (the anchor) plus W "draft" tokens: our K drafts, then P proposal
    blocks of K + 1 mask tokens. That is exactly the native layout [anchor, d1..dK | block_0 | ... ].
  * Positions: vLLM numbers the W + 1 tokens contiguously; `prepare_inputs` hands the model the TiDAR
    positions instead (proposal block j at b + p_j + 1 ..). KV slots stay vLLM's (positions after the
    verify segment: scratch that the rollback discards).
  * Attention: FLEX_ATTENTION; `prepare_attn` replaces the causal mask of TiDAR rows by the TiDAR mask
    (verify causal; block j sees the prefix, verify slots 0..p_j and itself).
  * CCA (ZAYA): the model reads the per-token `parent` map (block j's first slot continues verify slot p_j)
    and writes candidate states for the verify slots only; vLLM's num_accepted_tokens picks the committed one.
  * Sampling: `custom_sampler` returns TidarSampler: accept drafts while they equal the AR argmax, commit
    them plus the AR token (num_sampled = n + 1, num_rejected = the rest: vLLM rolls the KV back), and
    write the next step's drafts (from the proposal with the largest level <= n) into
    `req_states.draft_tokens`, which vLLM schedules next.
  * First drafts: a request leaving prefill gets W mask tokens as drafts; its first decode step commits one
    token (masks are rejected) and its level-0 proposal gives real drafts from then on.
Limits of this version: greedy only (temperature 0; the lossless T > 0 and logit-mixing samplers are not
ported), static K and levels (no adaptive schedule), single-forward only, no CUDA graphs, no prefix caching,
no async scheduling, TP = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import EngineConfig, InvalidRequest, TidarConfig
from workers.layout import StepLayout
from workers.masks import step_layout
from workers.sampler import greedy_accept
from workers.tidar import proposal_block


@dataclass(frozen=True)
class TidarShape:
    block_size: int  # K
    levels: tuple[int, ...]
    mask_token_id: int

    @property
    def width(self) -> int:
        """Draft tokens scheduled per decode step: K drafts + one block of K + 1 masks per level."""
        return self.block_size + len(self.levels) * (self.block_size + 1)

    def as_dict(self) -> dict:
        return {"block_size": self.block_size, "levels": list(self.levels), "mask_token_id": self.mask_token_id}

    @classmethod
    def of(cls, hf_config) -> TidarShape | None:
        d = getattr(hf_config, "tidal_tidar", None)
        if not d:
            return None
        return cls(int(d["block_size"]), tuple(int(x) for x in d["levels"]), int(d["mask_token_id"]))


# ---- engine configuration (main process; no GPU needed) -------------------------------------------------

def resolve_mask_token(hf_cfg, tidar: TidarConfig) -> int:
    from workers.tidar import MASK_TOKEN_ATTRS
    from workers.tidar import resolve_mask_token as native_resolve

    m = native_resolve(hf_cfg, tidar.mask_token_id)
    if m is None:
        raise InvalidRequest(f"tidar mode needs a mask token and config.json names none (looked for "
                             f"{', '.join(MASK_TOKEN_ATTRS)}); add one there or pass --mask-token-id")
    if not 0 <= m < hf_cfg.vocab_size:
        raise InvalidRequest(f"mask token id {m} is outside the vocabulary (size {hf_cfg.vocab_size})")
    return m


def check_tidar_config(t: TidarConfig) -> None:
    unsupported = []
    if t.sampler != "lossless" or t.draft_temperature != 0.0:
        unsupported.append("sampler 'lossless' with point-mass drafts (draft_temperature 0) only")
    if t.two_forward:
        unsupported.append("single-forward layout only (two_forward false)")
    if t.schedule is not None:
        unsupported.append("one static block_size/levels (no schedule table)")
    if unsupported:
        raise InvalidRequest("tidar with backend 'vllm' supports: " + "; ".join(unsupported))


def engine_kwargs(config: EngineConfig, hf_cfg, kwargs: dict) -> dict:
    """vLLM EngineArgs for TiDAR on GPU, from the ones the AR backend would use."""
    t = config.tidar
    check_tidar_config(t)
    shape = TidarShape(t.block_size, tuple(t.levels), resolve_mask_token(hf_cfg, t))
    out = dict(kwargs)
    overrides = dict(out.get("hf_overrides") or {})
    overrides["tidal_tidar"] = shape.as_dict()
    # canvas_length marks the model as a block-diffusion model for vLLM: its engine core then forwards the
    # drafts our sampler writes to the scheduler (requests must then carry temperature 1.0 and no seed:
    # the backend sends that, our sampler is greedy whatever they say).
    overrides["canvas_length"] = shape.width
    out.update(hf_overrides=overrides, diffusion_config={"canvas_length": shape.width},
               attention_backend="FLEX_ATTENTION", enforce_eager=True, enable_prefix_caching=False,
               async_scheduling=False)
    return out


# ---- the step layout and rules: the native ones (workers/masks.py, workers/tidar.py, workers/sampler.py) ----

def native_layout(shape: TidarShape, num_scheduled: int, base: int) -> tuple[StepLayout, int]:
    """The native layout of one decode row of `num_scheduled` tokens (anchor + drafts + masks) at position
    `base`, and how many trailing tokens it leaves out: a row vLLM cut short (near max_model_len) keeps the
    verify slots it got and whole proposal blocks only (token ids are placeholders: the layout's positions,
    parents and mask are what vLLM needs)."""
    k = shape.block_size
    verify = min(k + 1, num_scheduled)
    room = (num_scheduled - verify) // (k + 1) if verify == k + 1 else 0
    lay = step_layout([0], [0] * (verify - 1), base, shape.levels[:room], k + 1, shape.mask_token_id)
    return lay, num_scheduled - len(lay.token_ids)


def request_layout(shape: TidarShape, num_scheduled: int, base: int) -> tuple[list[int], list[int], int]:
    """(positions, parents, verify_len) of one decode row: the native layout; a partial trailing block (its
    drafts are never used) continues plainly after it."""
    lay, rest = native_layout(shape, num_scheduled, base)
    last = len(lay.positions)
    positions = lay.positions + list(range(base + last, base + last + rest))
    parents = lay.parent + list(range(last - 1, last - 1 + rest))
    return positions, parents, lay.num_write


def choose_next_drafts(shape: TidarShape, proposal_argmax: list[list[int]], accepted: int) -> list[int]:
    """K drafts for the positions after the new anchor, from the native choice of block (largest level <=
    accepted, among the blocks this row had); missing ones are mask tokens: rejected next step, never wrong."""
    k = shape.block_size
    j = proposal_block(shape.levels[: len(proposal_argmax)], accepted)
    drafts = [] if j is None else proposal_argmax[j][accepted - shape.levels[j] + 1 :][:k]
    return drafts + [shape.mask_token_id] * (k - len(drafts))


def tidar_mask_mod(base: torch.Tensor, is_tidar: torch.Tensor, k: int, levels: tuple[int, ...]):
    """The native TiDAR mask as a FlexAttention rule over vLLM's logical (slot) indices: may request `req`'s
    query slot `lq` see key slot `lkv`? vLLM numbers a row's tokens contiguously from base[req] (the anchor's
    slot); rows with is_tidar[req] False (prefill, plain decode) are causal. Every key before base[req] is
    the cached prefix, visible to all. Tensor ops only: FlexAttention vmaps it (tested on CPU against
    workers/masks.py)."""
    lv = torch.tensor(levels + (0,), dtype=torch.long, device=base.device)  # a partial block: sees the anchor

    def allowed(req, lq, lkv):
        i = lq - base[req]  # slot within the row: 0 = anchor, 1..k drafts, then blocks of k + 1
        blk = (i - (k + 1)).clamp_min(0) // (k + 1)
        lo = base[req] + (k + 1) + blk * (k + 1)
        seen = (lkv < base[req] + lv[blk.clamp_max(lv.shape[0] - 1)] + 1) | ((lkv >= lo) & (lkv < lo + k + 1))
        return torch.where(is_tidar[req] & (i > k), seen, lkv <= lq)

    return allowed


# ---- Model Runner V2 glue (GPU only) ---------------------------------------------------------------------

@dataclass
class StepInfo:
    """What the model reads during a TiDAR forward (set by the ModelState before each forward)."""

    parents: torch.Tensor  # [T] long: flat index of each token's CCA predecessor, -1: the request's state


def model_state_cls(hybrid: bool):
    """The ModelState class for a TiDAR model (mamba-hybrid base for ZAYA, default otherwise)."""
    if hybrid:
        from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState as Base
    else:
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState as Base

    class TidarModelState(Base):
        def __init__(self, vllm_config, model, encoder_cache, device):
            super().__init__(vllm_config, model, encoder_cache, device)
            self.shape = TidarShape.of(vllm_config.model_config.hf_config)
            assert self.shape is not None

        num_new_sampled_tokens_per_step: int = 1

        def custom_sampler(self, sampler):
            return TidarSampler(sampler, self), None

        def _decode_rows(self, input_batch):
            w = self.shape.width
            qsl = input_batch.query_start_loc_np
            rows = []
            for i in range(input_batch.num_reqs):
                n = int(qsl[i + 1] - qsl[i])
                is_decode = not bool(input_batch.is_prefilling_np[i]) and n > 1
                rows.append((int(input_batch.idx_mapping_np[i]), int(qsl[i]), n, is_decode and n <= 1 + w))
            return rows

        def prepare_inputs(self, input_batch, req_states):
            out = super().prepare_inputs(input_batch, req_states)
            positions = out.get("positions", input_batch.positions).clone()
            t = input_batch.num_tokens_after_padding
            parents = torch.arange(-1, t - 1, dtype=torch.long)
            parents[input_batch.num_tokens :] = -1
            computed = input_batch.num_computed_tokens_np
            pos_cpu = positions[: input_batch.num_tokens].cpu()
            for i, (_slot, lo, n, tidar_row) in enumerate(self._decode_rows(input_batch)):
                parents[lo] = -1
                if tidar_row:
                    pos, par, _verify = request_layout(self.shape, n, int(computed[i]))
                    pos_cpu[lo : lo + n] = torch.tensor(pos)
                    parents[lo : lo + n] = torch.tensor([lo + x if x >= 0 else -1 for x in par])
            positions[: input_batch.num_tokens] = pos_cpu.to(positions.device)
            self.model.tidar_step = StepInfo(parents.to(positions.device))
            out["positions"] = positions
            return out

        def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
            self.model.tidar_step = None  # profile / capture runs: plain causal rows
            return super().prepare_dummy_inputs(num_reqs, num_tokens)

        def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                         kv_cache_config, for_capture=False, ubatch_idx=0, **kwargs):
            metadata = super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                                            kv_cache_config, for_capture, ubatch_idx, **kwargs)
            if for_capture:
                return metadata
            install_tidar_masks(metadata, self.shape, input_batch, self._decode_rows(input_batch))
            return metadata

    return TidarModelState


def install_tidar_masks(metadata, shape: TidarShape, input_batch, rows) -> None:
    """Replace the causal mask of every FlexAttention metadata object by the TiDAR mask of this step."""
    from vllm.v1.attention.backends.flex_attention import FlexAttentionMetadata

    device = input_batch.positions.device
    num_reqs = input_batch.num_reqs
    computed = torch.as_tensor(input_batch.num_computed_tokens_np[:num_reqs], dtype=torch.long)
    is_tidar = torch.tensor([r[3] for r in rows], dtype=torch.bool)
    allowed = tidar_mask_mod(computed.to(device), is_tidar.to(device), shape.block_size, shape.levels)
    metas = metadata.values() if isinstance(metadata, dict) else [metadata]
    for m in {id(x): x for x in metas if isinstance(x, FlexAttentionMetadata)}.values():
        def mask_mod(b, h, q_idx, kv_idx, m=m):
            valid, lq, lkv = m._convert_physical_to_logical(m.doc_ids, q_idx, kv_idx)
            return valid & allowed(m.doc_ids[q_idx], lq, lkv)

        m.get_mask_mod = lambda mm=mask_mod: mm  # build_block_mask() asks for it
        m.mask_mod = mask_mod
        m.direct_build = False
        m.block_mask = m.build_block_mask()


class TidarSampler:
    """Greedy TiDAR acceptance over vLLM's logits rows; writes the next drafts into req_states.draft_tokens."""

    def __init__(self, sampler, state):
        self.base = sampler
        self.state = state
        self.shape: TidarShape = state.shape
        self.req_states = sampler.req_states
        self.sampling_states = sampler.sampling_states
        self.logprob_token_ids_state = getattr(sampler, "logprob_token_ids_state", None)
        self.penalties_state = getattr(sampler, "penalties_state", None)
        self.compute_nans = False

    def __getattr__(self, name):  # anything else the runner asks of a sampler
        return getattr(self.base, name)

    def __call__(self, logits: torch.Tensor, input_batch):
        from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        shape, k, w = self.shape, self.shape.block_size, self.shape.width
        num_reqs = input_batch.num_reqs
        cu = input_batch.cu_num_logits_np
        argmax = logits.argmax(dim=-1).tolist()
        input_ids = input_batch.input_ids[: input_batch.num_tokens].tolist()  # this step's drafts, as scheduled
        qsl = input_batch.query_start_loc_np
        sampled = torch.zeros(num_reqs, k + 1, dtype=torch.int64)
        num_sampled = torch.zeros(num_reqs, dtype=torch.int32)
        next_drafts = torch.full((num_reqs, w), shape.mask_token_id, dtype=torch.int64)
        for i in range(num_reqs):
            rows = argmax[int(cu[i]) : int(cu[i + 1])]
            if not rows:
                continue
            if len(rows) == 1:  # a prompt's last row (or a decode without drafts): plain AR
                sampled[i, 0] = rows[0]
                num_sampled[i] = 1
                continue
            verify = rows[: min(k + 1, len(rows))]
            first = int(qsl[i])
            drafts = input_ids[first + 1 : first + len(verify)]
            n, token = greedy_accept(verify, drafts)
            committed = drafts[:n] + [token]
            blocks = [rows[k + 1 + j * (k + 1) : k + 1 + (j + 1) * (k + 1)] for j in range(len(shape.levels))]
            blocks = [b for b in blocks if len(b) == k + 1]
            next_drafts[i, :k] = torch.tensor(choose_next_drafts(shape, blocks, n))
            sampled[i, : n + 1] = torch.tensor(committed)
            num_sampled[i] = n + 1
        device = logits.device
        slots = input_batch.idx_mapping[:num_reqs]
        self.req_states.draft_tokens[slots, :w] = next_drafts.to(device=device,
                                                                 dtype=self.req_states.draft_tokens.dtype)
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            num_sampled.to(device), input_batch.seq_lens, input_batch.cu_num_logits, input_batch.idx_mapping,
            self.req_states.prefill_len.gpu)
        return SamplerOutput(sampled_token_ids=sampled.to(device=device, dtype=torch.int64),
                             logprobs_tensors=None, num_nans=None, num_sampled=num_sampled, num_rejected=num_rejected)
