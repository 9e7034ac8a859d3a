"""ZAYA1 for vLLM, on our modules (workers/models/zaya.py).

CCA needs, besides K/V, a per-sequence state: the pre-conv [q;k] of the last two tokens and the last
delayed value projection. vLLM keeps such state for hybrid models (mamba, short-conv) in a per-request
slot of its "mamba" cache, addressed by the request's state index in the attention metadata. Each CCA
layer therefore owns a state layer (`CCAStateCache`, a vLLM `MambaBase`) declaring two state tensors per
slot, [2, (Hq + Hkv) * D] and [Hkv * D / 2], and reusing vLLM's short-conv metadata (per request: state
slot, token range, whether a prior state exists). The state is read at the start of a request's tokens
and written after its last one, in the forward.

Under speculative decoding (vLLM's drafts, or TiDAR on GPU) the state must follow the accepted prefix: as
vLLM does for its recurrent layers, a decode row resumes from slot [r, num_accepted - 1] and writes the
state after each of its tokens to slot [r, t] (K+1 candidate states; vLLM's accepted count picks the one
to keep). TiDAR's proposal blocks branch off a verify slot: the model's `tidar_step.parents` says which.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

from workers.models.layers import RMSNorm
from workers.models.zaya import ZayaAttention, ZayaResidualScaling, ZayaSparseMoeBlock
from workers.vllm_plugin.common import TidalVllmModel, check_parallel, join, make_attention


def _cca_backend():
    """vLLM's short-conv state backend, with a builder that also hands the layer each request's full row of
    state slots and its draft count (vLLM's own metadata keeps only slot 0 for prompt rows)."""
    global _CCA_BACKEND
    if _CCA_BACKEND is None:
        from dataclasses import dataclass

        from vllm.v1.attention.backends.short_conv_attn import (
            ShortConvAttentionBackend,
            ShortConvAttentionMetadata,
            ShortConvAttentionMetadataBuilder,
        )
        from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor

        @dataclass
        class CCAStateMetadata(ShortConvAttentionMetadata):
            state_slots: torch.Tensor | None = None  # [num_reqs, 1 + num_spec] slots, batch order
            draft_counts: torch.Tensor | None = None  # [num_reqs] CPU: drafts of a "1 + drafts" row, else -1

        class CCAStateMetadataBuilder(ShortConvAttentionMetadataBuilder):
            metadata_cls = CCAStateMetadata

            def build(self, common_prefix_len, common_attn_metadata, fast_build=False, *,
                      num_accepted_tokens=None, num_decode_draft_tokens_cpu=None, **kwargs):
                m = super().build(common_prefix_len, common_attn_metadata, fast_build,
                                  num_accepted_tokens=num_accepted_tokens,
                                  num_decode_draft_tokens_cpu=num_decode_draft_tokens_cpu, **kwargs)
                m.state_slots = mamba_get_block_table_tensor(
                    common_attn_metadata.block_table_tensor, common_attn_metadata.seq_lens, self.kv_cache_spec,
                    self.vllm_config.cache_config.mamba_cache_mode)
                m.draft_counts = num_decode_draft_tokens_cpu
                return m

        class CCAStateBackend(ShortConvAttentionBackend):
            @staticmethod
            def get_builder_cls():
                return CCAStateMetadataBuilder

        _CCA_BACKEND = CCAStateBackend
    return _CCA_BACKEND


_CCA_BACKEND = None


def cca_state_shapes(cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(conv: last two pre-conv [q;k] vectors, v: last delayed value projection) per sequence."""
    return (2, (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim), \
        (cfg.num_key_value_heads * cfg.head_dim // 2,)


class CCAStateCache(MambaBase):
    """The per-sequence CCA state of one layer, as a vLLM state ("mamba") layer. Holds no weights."""

    def __init__(self, cfg, dtype: torch.dtype, vllm_config, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.shapes = cca_state_shapes(cfg)
        self.dtype = dtype
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"duplicate layer name: {prefix}")
        ctx[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    def get_state_shape(self):
        return self.shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (self.dtype, self.dtype)

    @property
    def mamba_type(self):
        from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

        return MambaAttentionBackendEnum.SHORT_CONV  # its metadata is what we need: slot, range, prior state

    def get_attn_backend(self):
        return _cca_backend()

    def metadata(self):
        from vllm.forward_context import get_forward_context

        meta = get_forward_context().attn_metadata
        return meta.get(self.prefix) if isinstance(meta, dict) else None


def request_layout(meta, device) -> tuple[torch.Tensor, ...]:
    """The batch as vLLM's state metadata describes it, requests in batch order (decodes, then prefills).

    Returns per request: first token, token count, the slot holding its state before this step, whether it
    has a prior state; and the writes to make after the forward: (token index, slot) pairs, the state after
    that token going to that slot. Without speculation a request's state is read from and written to its one
    slot, after its last token. With speculative decoding (drafts verified in the step) vLLM's convention for
    per-token states applies: decode request r resumes from slot [r, num_accepted - 1] and the state after its
    token t goes to slot [r, t], so the next step resumes after the last accepted token (the rollback).
    """
    nd, npf, ndt = meta.num_decodes, meta.num_prefills, meta.num_decode_tokens
    long = dict(dtype=torch.long, device=device)
    starts, lens, read, init, w_tok, w_slot = [], [], [], [], [], []
    if nd:
        qd = meta.query_start_loc_d
        qd = qd[: nd + 1].long() if qd is not None else torch.arange(nd + 1, **long)
        s, n = qd[:-1], qd[1:] - qd[:-1]
        idx = meta.state_indices_tensor_d[:nd].long()  # [nd, 1 + num_spec]
        acc = meta.num_accepted_tokens
        starts.append(s)
        lens.append(n)
        init.append(torch.ones(nd, dtype=torch.bool, device=device))
        if acc is None:  # one token each, one slot each
            read.append(idx[:, 0])
            w_tok.append(torch.where(n > 0, s + n - 1, -1))  # n == 0: a padding row, writes nothing
            w_slot.append(idx[:, 0])
        else:
            acc = acc[:nd].long()
            read.append(idx.gather(1, (acc - 1).clamp_min(0)[:, None])[:, 0])
            req = torch.repeat_interleave(torch.arange(nd, **long), n)
            j = torch.arange(int(n.sum().item()), **long) - s[req]
            w_tok.append(s[req] + j)
            w_slot.append(idx[req, j])
    if npf:
        qp = meta.query_start_loc_p[: npf + 1].long()
        s, n = qp[:-1] + ndt, qp[1:] - qp[:-1]
        has = meta.has_initial_states_p[:npf].bool()
        slots = getattr(meta, "state_slots", None)
        counts = getattr(meta, "draft_counts", None)
        rows = slots[nd : nd + npf].long() if slots is not None else meta.state_indices_tensor_p[:npf].long()[:, None]
        starts.append(s)
        lens.append(n)
        init.append(has)
        read.append(rows[:, 0])
        # A prompt row can carry drafts ("1 + drafts" rows: vLLM pads a one-token prompt tail with placeholder
        # drafts). Its drafts may be rejected, so it keeps per-token states like a speculative decode row.
        spec = torch.zeros(npf, dtype=torch.bool, device=device)
        if counts is not None and rows.shape[1] > 1:
            c = counts[nd : nd + npf].to(device=device, dtype=torch.long)
            spec = (c >= 0) & (n == c + 1) & (n <= rows.shape[1])
        plain = ~spec
        w_tok.append((s + n - 1)[plain])
        w_slot.append(rows[plain, 0])
        if bool(spec.any()):
            req = torch.repeat_interleave(torch.nonzero(spec)[:, 0], n[spec])
            j = torch.arange(req.shape[0], **long) - torch.repeat_interleave(
                torch.cumsum(n[spec], 0) - n[spec], n[spec])
            w_tok.append(s[req] + j)
            w_slot.append(rows[req, j])
    if not starts:
        e = torch.zeros(0, **long)
        return e, e, e, e.bool(), e, e
    cat = torch.cat
    return cat(starts), cat(lens), cat(read), cat(init), cat(w_tok), cat(w_slot)


def causal_parents(starts: torch.Tensor, lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] flat index of each token's predecessor in its request; -1 for a request's first token (and padding)."""
    parents = torch.full((num_tokens,), -1, dtype=torch.long, device=starts.device)
    n = int(lens.sum().item()) if starts.numel() else 0
    if n:
        req = torch.repeat_interleave(torch.arange(starts.shape[0], device=starts.device), lens)
        tok = torch.arange(n, device=starts.device)
        parents[:n] = torch.where(tok > starts[req], tok - 1, -1)
    return parents


def conv_index_for(starts, lens, init, parents: torch.Tensor) -> torch.Tensor:
    """[T, 3]: (two back, one back, itself) of each token in the table
    [zero, (older, newer) state per request..., tokens...] -- the native engine's `conv_index`.

    `parents[t]` is the flat index of the token t continues from, -1 when it continues its request's
    committed state (causal rows: the previous token; TiDAR proposal blocks: the verify slot they follow)."""
    device = parents.device
    t = parents.shape[0]
    r = starts.shape[0]
    base = 1 + 2 * r
    own = base + torch.arange(t, device=device)
    idx = torch.stack([torch.zeros_like(own), torch.zeros_like(own), own], dim=1)  # padding rows: cold
    n = int(lens.sum().item()) if r else 0
    if n == 0:
        return idx
    req = torch.repeat_interleave(torch.arange(r, device=device), lens)
    has = init[req]
    zero = torch.zeros(n, dtype=torch.long, device=device)
    older = torch.where(has, 1 + 2 * req, zero)
    newer = torch.where(has, 2 + 2 * req, zero)
    par = parents[:n]
    one = torch.where(par >= 0, base + par, newer)
    grand = parents[par.clamp_min(0)]
    two = torch.where(par >= 0, torch.where(grand >= 0, base + grand, newer[par.clamp_min(0)]), older)
    idx[:n] = torch.stack([two, one, own[:n]], dim=1)
    return idx


class VllmZayaAttention(ZayaAttention):
    """Our ZAYA CCA attention with vLLM's paged attention core and vLLM-managed CCA state."""

    def __init__(self, cfg, layer: int, vllm_config, prefix: str, ctx):
        super().__init__(cfg, layer)
        self._ctx = ctx  # shared with the model: the current TiDAR step, if any
        p = self.qkv_proj
        self.attn = make_attention(p.hq, p.d, self.scale, p.hkv, vllm_config, join(prefix, "attn"))
        self.cca_state = CCAStateCache(cfg, vllm_config.model_config.dtype, vllm_config, join(prefix, "cca_state"))

    def project(self, x: torch.Tensor):
        """CCA q/k/v for a flat batch, reading and then advancing each request's state (ZayaCCAProjection's
        arithmetic; only where the state rows come from and go to differs)."""
        p = self.qkv_proj
        t = x.shape[0]
        qk, q_res, k_res, current, delayed = p.project(x)  # [T, C], [T, Hq, D], [T, Hkv, D], 2 x [T, Hkv D / 2]

        meta = self.cca_state.metadata()
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        starts = lens = read = w_tok = w_slot = empty
        init = empty.bool()
        if meta is not None:  # None: profile / dummy run, no state, value unused
            starts, lens, read, init, w_tok, w_slot = request_layout(meta, x.device)
        r = starts.shape[0]
        if r:
            conv_state, v_state = self.cca_state.kv_cache
            safe = read.clamp_min(0)
            conv_rows, v_rows = conv_state[safe].to(qk.dtype), v_state[safe].to(qk.dtype)
        else:
            conv_rows, v_rows = qk.new_zeros(0, 2, qk.shape[1]), qk.new_zeros(0, p.v_proj_delayed.out_features)
        step = self._ctx.step  # TiDAR on GPU: the step's token tree (tidar_gpu.StepInfo); None: causal rows
        parents = step.parents[:t] if step is not None else causal_parents(starts, lens, t)
        conv_index = conv_index_for(starts, lens, init, parents)
        q, k, qk_ext = p.qk_conv(qk, conv_rows, conv_index, q_res, k_res)
        v, v_ext = p.values(current, delayed, v_rows, conv_index[:, 1])

        keep = (w_slot >= 0) & (w_tok >= 0) & (w_tok < t)
        if r and bool(keep.any()):  # the state after each written token: (its one-back and itself, its delayed v)
            tok, dst = w_tok[keep], w_slot[keep]
            own = 1 + 2 * r + tok
            conv_state[dst] = torch.stack([qk_ext[conv_index[tok, 1]], qk_ext[own]], dim=1).to(conv_state.dtype)
            v_state[dst] = v_ext[own].to(v_state.dtype)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.project(x)
        q, k = self.qk_norm(q, k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1))
        return self.o_proj(out)


class VllmZayaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int, vllm_config, prefix: str, ctx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = VllmZayaAttention(cfg, layer, vllm_config, join(prefix, "self_attn"), ctx)
        self.post_attention_residual_scale = ZayaResidualScaling(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ZayaSparseMoeBlock(cfg, layer)
        self.post_mlp_residual_scale = ZayaResidualScaling(cfg.hidden_size)

    def forward(self, residual, router_state, positions):
        dtype = self.input_layernorm.weight.dtype
        h = self.self_attn(self.input_layernorm(residual.to(dtype)), positions)
        residual = self.post_attention_residual_scale(h, residual)
        h, router_state = self.mlp(self.post_attention_layernorm(residual.to(dtype)), router_state)
        return self.post_mlp_residual_scale(h, residual), router_state


class VllmZayaModel(nn.Module):
    def __init__(self, cfg, vllm_config, prefix: str, ctx):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(VllmZayaDecoderLayer(cfg, i, vllm_config, join(prefix, f"layers.{i}"), ctx)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TidalZayaForCausalLM(TidalVllmModel, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        check_parallel(vllm_config)
        cfg = vllm_config.model_config.hf_config
        self.cfg = cfg
        self._ctx = SimpleNamespace(step=None)
        self.model = VllmZayaModel(cfg, vllm_config, join(prefix, "model"), self._ctx)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=getattr(cfg, "lm_head_bias", False))
        self.tie_word_embeddings = getattr(cfg, "tie_word_embeddings", True)
        self._tie()
        self.draft_heads_of_checkpoint(vllm_config)
        self.enable_tidar(vllm_config, hybrid=True)

    @property
    def tidar_step(self):
        return self._ctx.step

    @tidar_step.setter
    def tidar_step(self, info) -> None:  # set by the TiDAR ModelState before each forward (GPU)
        self._ctx.step = info

    # ---- vLLM's hybrid-state interface (IsHybrid) ----
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        return cca_state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        d = vllm_config.model_config.dtype
        return (d, d)

    @classmethod
    def get_mamba_state_copy_func(cls):
        # each state is "after the last token" (no time axis): copying a prefix-cache checkpoint copies the
        # whole slot of the right block. (Prefix caching is turned off for ZAYA by the plugin for now.)
        from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec

        return (get_temporal_copy_spec, get_temporal_copy_spec)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        m = self.model
        e = inputs_embeds if inputs_embeds is not None else m.embed_tokens(input_ids)
        h = ((e + m.input_hidden_states_bias) * m.input_hidden_states_scale).float()
        router_state = None
        for layer in m.layers:
            h, router_state = layer(h, router_state, positions)
        return m.norm(h.to(m.norm.weight.dtype))
