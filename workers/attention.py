"""Attention over the paged KV cache for a flat batch of new tokens from many requests.

Every request attends to its cached prefix (gathered from its blocks) plus the new tokens of this
step under a per-request boolean mask. That one rule covers prefill chunks, AR decode and TiDAR's
structured verify/proposal layout; only the mask differs. New tokens left out of `write_index`
(TiDAR proposals) are attended to but never written to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch; built once by the model runner, shared by all layers."""

    write_index: torch.Tensor  # [W] long: flat indices of the new tokens whose K/V enter the cache
    write_slots: torch.Tensor  # [W] long: their cache slots
    query_index: torch.Tensor  # [B, Qmax] long: flat token index of each padded query row
    query_valid: torch.Tensor  # [B, Qmax] bool
    past_slots: torch.Tensor  # [B, Pmax] long: cache slots of each request's cached prefix
    mask: torch.Tensor  # [B, 1, Qmax, Pmax + Qmax] bool: True = may attend
    # ZAYA CCA: for each new token, indices of (two tokens back, one token back, itself) in the
    # extended table [zero, (older, newer) state per request..., new tokens...]
    conv_index: torch.Tensor | None = None  # [T, 3] long
    state_slots: torch.Tensor | None = None  # [B] long: CCA state slot of each request

    @property
    def num_requests(self) -> int:
        return self.query_index.shape[0]


class KVCache:
    """A preallocated pool of fixed-size blocks per layer: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,  # [slots, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    qi, valid = meta.query_index, meta.query_valid
    qp = q[qi].transpose(1, 2)  # [B, Hq, Qmax, D]
    keys = torch.cat([k_cache[meta.past_slots], k[qi]], dim=1).transpose(1, 2)  # [B, Hkv, S, D]
    vals = torch.cat([v_cache[meta.past_slots], v[qi]], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qp, keys, vals, attn_mask=meta.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    k_cache[meta.write_slots] = k[meta.write_index]
    v_cache[meta.write_slots] = v[meta.write_index]
    return out.transpose(1, 2)[valid]  # flat order: requests are contiguous, rows are row-major
