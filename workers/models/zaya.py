"""ZAYA1 (HF `model_type: zaya`): CCA attention, top-1 MoE with a skip expert and EDA router, fp32 residual.

Module and parameter names mirror the HF checkpoint, so weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import AttentionMetadata, KVCache, paged_attention
from workers.models.draft_heads import DraftHeads
from workers.models.layers import Experts, LinearGroup, RMSNorm, Rotary, rope_settings


class CCAState:
    """Per-request recurrent state of every CCA layer, kept in slots beside the paged KV.

    conv[l][slot] holds the pre-convolution [q;k] of the last two committed tokens (older, newer);
    v[l][slot] the delayed value projection of the last one. A forward only reads it; `commit`
    writes it once the step knows which token is the last one kept (rollback = not committing).
    With the prefix cache, the state after each full block's last token is also kept, by block id
    (snap_conv, snap_v), so a request resuming from a cached prefix restores it into its slot.
    """

    def __init__(self, num_layers: int, num_slots: int, conv_channels: int, v_dim: int,
                 dtype: torch.dtype, device, num_snapshots: int = 0):
        def zeros(*shape):
            return [torch.zeros(*shape, dtype=dtype, device=device) for _ in range(num_layers)]

        self.conv, self.v = zeros(num_slots, 2, conv_channels), zeros(num_slots, v_dim)
        self.snap_conv, self.snap_v = zeros(num_snapshots, 2, conv_channels), zeros(num_snapshots, v_dim)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = [None] * num_layers  # type: ignore[list-item]

    def commit(self, meta: AttentionMetadata, last_index: torch.Tensor, snap_index: torch.Tensor | None = None,
               snap_blocks: torch.Tensor | None = None) -> None:
        """last_index: [B] long, flat index of each request's last kept token in the last forward;
        snap_index / snap_blocks: [S] long, flat indices of tokens that end a full block, and those blocks."""
        snap = snap_index is not None and len(snap_index) > 0
        slots = meta.state_slots
        for layer, pending in enumerate(self.pending):
            self.conv[layer][slots], self.v[layer][slots] = _state_after(pending, meta, last_index)
            if snap:
                self.snap_conv[layer][snap_blocks], self.snap_v[layer][snap_blocks] = _state_after(pending, meta,
                                                                                                   snap_index)
        self.pending = [None] * len(self.pending)  # type: ignore[list-item]

    def restore(self, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """slots, blocks: [R] long: load the snapshot kept for blocks[i] into state slot slots[i]."""
        for layer in range(len(self.conv)):
            self.conv[layer][slots] = self.snap_conv[layer][blocks]
            self.v[layer][slots] = self.snap_v[layer][blocks]


def _state_after(pending: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The state after each token `index` ([N] flat indices) of the last forward: its [q;k] row and the one
    one back on its branch ([N, 2, C]), and its delayed value ([N, v_dim])."""
    qk_ext, v_ext = pending
    own = 1 + 2 * meta.num_requests + index
    return torch.stack([qk_ext[meta.conv_index[index, 1]], qk_ext[own]], dim=1), v_ext[own]


class ZayaCCAProjection(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        bias = getattr(cfg, "attention_bias", False)
        if (getattr(cfg, "cca_time0", 2), getattr(cfg, "cca_time1", 2)) != (2, 2):
            raise ValueError("ZAYA CCA is supported with cca_time0 = cca_time1 = 2 only")
        self.q_proj = nn.Linear(h, self.hq * d, bias=bias)
        self.k_proj = nn.Linear(h, self.hkv * d, bias=bias)
        self.v_proj_current = nn.Linear(h, self.hkv * d // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(h, self.hkv * d // 2, bias=bias)
        self.projections = LinearGroup(self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
        c = (self.hq + self.hkv) * d
        self.conv_qk_depthwise = nn.Conv1d(c, c, kernel_size=2, groups=c)
        self.conv_qk_grouped = nn.Conv1d(c, c, kernel_size=2, groups=self.hq + self.hkv)
        self.grouped_weight: torch.Tensor | None = None  # [G, 2 * C / G, C / G], built once for inference

    def freeze_for_inference(self) -> None:
        """The grouped conv's weight in the layout `conv` multiplies by, built once instead of every step
        (a strided copy of the whole weight per layer and step: ~6% of a batch-1 AR step)."""
        self.grouped_weight = self._grouped_weight().detach().contiguous()

    def _grouped_weight(self) -> torch.Tensor:
        gw = self.conv_qk_grouped
        g = gw.groups
        ci = gw.weight.shape[0] // g
        return gw.weight.view(g, ci, ci, 2).permute(0, 3, 2, 1).reshape(g, 2 * ci, ci)  # [G, (k, i), o]

    def conv(self, window: torch.Tensor) -> torch.Tensor:
        """window: [T, 3, C] (two back, one back, itself) -> [T, C]: the depthwise then the per-head grouped
        kernel-2 conv. In fp32 it is written as two multiply-adds and one batched matmul per head group:
        the same math as the two Conv1d modules, which CPU backends run as T tiny convolutions (several
        times slower, forward and backward). Half precision keeps the framework's conv kernels, whose
        rounding is what transformers (the reference) and vLLM produce."""
        dw, gw = self.conv_qk_depthwise, self.conv_qk_grouped
        if window.dtype != torch.float32:
            return gw(dw(window.transpose(1, 2))).squeeze(-1)
        t, _, c = window.shape
        y = window[:, :-1] * dw.weight[:, 0, 0] + window[:, 1:] * dw.weight[:, 0, 1] + dw.bias  # [T, 2, C]
        g = gw.groups
        ci = c // g
        w = self.grouped_weight if self.grouped_weight is not None else self._grouped_weight()
        yg = y.view(t, 2, g, ci).permute(2, 0, 1, 3).reshape(g, t, 2 * ci)  # [G, T, (k, i)]
        return torch.baddbmm(gw.bias.view(g, 1, ci), yg, w).transpose(0, 1).reshape(t, c)

    def project(self, x: torch.Tensor):
        """x: [T, H] -> (qk [T, C]: the [q; k] projections, the conv's input; q_res [T, Hq, D] and k_res
        [T, Hkv, D]: the residual added beside the conv; current and delayed [T, Hkv * D / 2]: the value
        projections). All four projections run as one matmul."""
        t, groups = x.shape[0], self.hq // self.hkv
        q, k, current, delayed = self.projections(x)
        q_res = (q.view(t, self.hq, self.d) + k.reshape(t, self.hkv, 1, self.d).expand(-1, -1, groups, -1)
                 .reshape(t, self.hq, self.d)) * 0.5
        k_res = q_res.view(t, self.hkv, groups, self.d).mean(dim=2)
        return torch.cat([q, k], dim=-1), q_res, k_res, current, delayed

    def qk_conv(
        self,
        qk: torch.Tensor,  # [T, C]
        conv_rows: torch.Tensor,  # [R, 2, C] each request's state (older, newer)
        conv_index: torch.Tensor,  # [T, 3] long: (two back, one back, itself) into qk_ext
        q_res: torch.Tensor,  # [T, Hq, D]
        k_res: torch.Tensor,  # [T, Hkv, D]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal conv (two kernel-2 convs) over each token's own branch, plus the residual:
        q [T, Hq, D], k [T, Hkv, D] and qk_ext [1 + 2R + T, C], the table conv_index reads (zero, states, qk)."""
        t = qk.shape[0]
        qk_ext = torch.cat([qk.new_zeros(1, qk.shape[1]), conv_rows.flatten(0, 1), qk])
        mixed = self.conv(qk_ext[conv_index])  # [T, C]
        q = mixed[:, : self.hq * self.d].view(t, self.hq, self.d) + q_res
        k = mixed[:, self.hq * self.d :].view(t, self.hkv, self.d) + k_res
        return q, k, qk_ext

    def values(
        self,
        current: torch.Tensor,  # [T, Hkv * D / 2] this token's value projection
        delayed: torch.Tensor,  # [T, Hkv * D / 2] its delayed projection (the next token's other half)
        v_rows: torch.Tensor,  # [R, Hkv * D / 2] each request's last delayed value
        one_back: torch.Tensor,  # [T] long: each token's one-back row in v_ext (conv_index[:, 1])
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values: half from this token, half (delayed projection) from the token one back. Returns
        v [T, Hkv, D] and v_ext [1 + 2R + T, Hkv * D / 2], laid out as qk_ext (a state row stands twice)."""
        bias = self.v_proj_delayed.bias  # a cold start's one-back token is all zeros: its projection is the bias
        cold = bias[None].to(delayed.dtype) if bias is not None else delayed.new_zeros(1, delayed.shape[1])
        v_ext = torch.cat([cold, v_rows.repeat_interleave(2, dim=0), delayed])
        v = torch.cat([current, v_ext[one_back]], dim=-1).view(current.shape[0], self.hkv, self.d)
        return v, v_ext

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, state: CCAState, layer: int):
        # x: [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]
        slots = meta.state_slots
        qk, q_res, k_res, current, delayed = self.project(x)
        q, k, qk_ext = self.qk_conv(qk, state.conv[layer][slots], meta.conv_index, q_res, k_res)
        v, v_ext = self.values(current, delayed, state.v[layer][slots], meta.conv_index[:, 1])
        state.pending[layer] = (qk_ext, v_ext)
        return q, k, v


class ZayaQKNorm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.scale = cfg.head_dim**0.5
        self.temp = nn.Parameter(torch.zeros(cfg.num_key_value_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, :, None]


class ZayaAttention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.layer = layer
        self.qkv_proj = ZayaCCAProjection(cfg)
        self.qk_norm = ZayaQKNorm(cfg)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                bias=getattr(cfg, "attention_bias", False))
        layer_type = cfg.layer_types[layer] if getattr(cfg, "layer_types", None) else "hybrid"
        if layer_type != "hybrid":
            raise ValueError(f"ZAYA layer type {layer_type!r} (sliding window) is not supported yet")
        theta, partial = rope_settings(cfg, layer_type)
        self.rotary = Rotary(cfg.head_dim, theta, partial)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, positions, meta: AttentionMetadata, kv: KVCache, state: CCAState):
        q, k, v = self.qkv_proj(x, meta, state, self.layer)
        q, k = self.qk_norm(q, k)
        q, k = self.rotary(positions, q, k, meta.shared)
        out = paged_attention(q, k, v, kv, self.layer, meta, self.scale)
        return self.o_proj(out.flatten(1))


class ZayaResidualScaling(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # residual stays fp32; the sum promotes to fp32
        return ((h + self.hidden_states_bias) * self.hidden_states_scale
                + (residual + self.residual_bias) * self.residual_scale)


class ZayaRouterMLP(nn.Module):
    def __init__(self, dim: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


class ZayaRouter(nn.Module):
    """Top-1 over E experts + 1 skip; the balancing biases steer the choice only (EDA: adds the
    previous layer's router state)."""

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.down_proj = nn.Linear(cfg.hidden_size, cfg.router_hidden_size)
        self.use_eda = layer != 0
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(cfg.router_hidden_size))
        self.router_mlp = ZayaRouterMLP(cfg.router_hidden_size, cfg.num_experts + 1, cfg.rms_norm_eps)
        biases = torch.zeros(cfg.num_experts + 1)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)

    def forward(self, x: torch.Tensor, prev_state: torch.Tensor | None):
        # x: [T, H] -> expert ids [T, 1] (-1 = skip), weights [T, 1], router state [T, R]
        r = self.down_proj(x)
        if self.use_eda and prev_state is not None:
            r = r + prev_state * self.router_states_scale
        probs = torch.softmax(self.router_mlp(r), dim=-1)
        choice = (probs.float() + self.balancing_biases.float()).argmax(dim=-1, keepdim=True)
        weights = probs.gather(1, choice)
        ids = torch.where(choice == self.num_experts, -1, choice)
        return ids, weights, r


class ZayaSparseMoeBlock(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        if getattr(cfg, "num_experts_per_tok", 1) != 1:
            raise ValueError("ZAYA supports num_experts_per_tok = 1 only")
        self.gate = ZayaRouter(cfg, layer)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor, prev_state: torch.Tensor | None):
        ids, weights, state = self.gate(x, prev_state)
        return self.experts(x, ids, weights), state


class ZayaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ZayaAttention(cfg, layer)
        self.post_attention_residual_scale = ZayaResidualScaling(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ZayaSparseMoeBlock(cfg, layer)
        self.post_mlp_residual_scale = ZayaResidualScaling(cfg.hidden_size)

    def forward(self, residual, router_state, positions, meta, kv, state):
        dtype = self.input_layernorm.weight.dtype
        h = self.self_attn(self.input_layernorm(residual.to(dtype)), positions, meta, kv, state)
        residual = self.post_attention_residual_scale(h, residual)
        h, router_state = self.mlp(self.post_attention_layernorm(residual.to(dtype)), router_state)
        return self.post_mlp_residual_scale(h, residual), router_state


class ZayaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(ZayaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ZayaForCausalLM(DraftHeads, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = ZayaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=getattr(cfg, "lm_head_bias", False))
        self.tie_word_embeddings = getattr(cfg, "tie_word_embeddings", True)
        self.init_draft_heads(cfg)

    def make_state(self, num_slots: int, dtype: torch.dtype, device, num_snapshots: int = 0) -> CCAState:
        c = self.cfg
        return CCAState(c.num_hidden_layers, num_slots, (c.num_attention_heads + c.num_key_value_heads) * c.head_dim,
                        c.num_key_value_heads * c.head_dim // 2, dtype, device, num_snapshots)

    @staticmethod
    def state_snapshot_bytes(cfg, dtype: torch.dtype) -> int:
        """Bytes of the CCA state the prefix cache keeps per KV block: per layer, as make_state lays it out,
        two [q;k] rows and one delayed value row."""
        c = (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim
        v = cfg.num_key_value_heads * cfg.head_dim // 2
        return cfg.num_hidden_layers * (2 * c + v) * torch.empty((), dtype=dtype).element_size()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv: KVCache,
        state: CCAState,
    ) -> torch.Tensor:  # [T, H]
        m = self.model
        h = ((m.embed_tokens(input_ids) + m.input_hidden_states_bias) * m.input_hidden_states_scale).float()
        router_state = None
        for layer in m.layers:
            h, router_state = layer(h, router_state, positions, meta, kv, state)
        return m.norm(h.to(m.norm.weight.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        return self.lm_head(hidden).float()
