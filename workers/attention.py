"""Attention over the paged KV cache for a flat batch of new tokens from many requests.

Every request attends to its cached prefix plus the new tokens of this step under a per-request boolean
mask. That one rule covers prefill chunks, AR decode and TiDAR's structured verify/proposal layout; only
the mask differs. New tokens left out of `write_index` (TiDAR proposals) are attended to but never
written to the cache.

Keys are read block by block: each layer first copies the step's new K/V into scratch blocks at the end
of the pool (block-aligned per request), then gathers [past blocks..., scratch blocks...] per request with
one `index_select` of whole blocks. No per-slot gather and no concatenation: the step copies each past
block once per layer, and the mask hides the unused slots. The pool is head-major, [Hkv, blocks, block_size,
D], so a KV head's keys over consecutive blocks are one contiguous [tokens, D] matrix: SDPA's CPU flash kernel
read such pieces 1.7x faster than token-major ones in bf16 (micro-benchmark, cold pool; the same in fp32).

A request's long runs of consecutive past blocks are not copied at all (PastView): at 4k tokens of
context the copy was over a quarter of a decode step's attention. Each piece is attended in place with its
own log-sum-exp and merged with the group's part (softmax over a union of key sets is the LSE-weighted
mix of the softmaxes over each). On CPU both parts run SDPA's CPU flash kernel, which returns the log-sum-exp
(fp32 accumulation, any cache dtype); elsewhere plain matmuls, whose scores round to the cache's dtype, so
there only fp32 caches use views.

Requests are attended in groups, each a padded batch of its own (`plan_groups`): one padded batch pads
every request to the longest query and key of the step, so a single 256-token prefill chunk made 31 decode
rows cost 256 query rows each; served traffic mixes a prefill into nearly every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Fixed per-layer work of one more attention group (index_select, gathers, SDPA, copies), in attention
# cells (query rows x key columns) of padded work it must save to pay for itself.
GROUP_OVERHEAD_CELLS = 4096


@dataclass
class PastView:
    """Pool blocks [start, start + blocks) of one group member's cached past, read in place."""

    row: int  # the member's row in its group
    queries: int  # its new tokens
    start: int
    blocks: int


@dataclass
class AttentionGroup:
    """Requests attended together as one padded batch; built once per step, used by every layer."""

    query_index: torch.Tensor  # [Bg, Qmax] long: flat token index of each padded query row
    query_valid: torch.Tensor  # [Bg, Qmax] bool
    key_blocks: torch.Tensor  # [Bg, Nb] long: past blocks (padded), then the request's scratch blocks
    mask: torch.Tensor  # [Bg, 1, Qmax, Nb * block_size] bool: True = may attend
    views: list[PastView] = field(default_factory=list)  # past outside key_blocks, attended in place
    additive: dict = field(default_factory=dict)  # (heads per KV head, dtype) -> the mask as 0 / -inf rows


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch; built once by the model runner, shared by all layers."""

    write_index: torch.Tensor  # [W] long: flat indices of the new tokens whose K/V enter the cache
    write_slots: torch.Tensor  # [W] long: their cache slots
    starts: torch.Tensor  # [B] long: flat index of each request's first new token
    groups: list[AttentionGroup]  # a partition of the requests (plan_groups)
    order: torch.Tensor | None  # [T] long: row of flat token t in the groups' concatenated outputs (None: one group)
    scratch_slots: torch.Tensor  # [T] long: slot of each new token in the scratch blocks
    scratch_blocks: int  # scratch blocks the step uses (the pool must have at least this many)
    # ZAYA CCA: for each new token, indices of (two tokens back, one token back, itself) in the
    # extended table [zero, (older, newer) state per request..., new tokens...]
    conv_index: torch.Tensor | None = None  # [T, 3] long
    state_slots: torch.Tensor | None = None  # [B] long: CCA state slot of each request
    shared: dict = field(default_factory=dict)  # values the first layer computes and the others reuse (RoPE)

    @property
    def num_requests(self) -> int:
        return self.starts.shape[0]


def plan_groups(q_lens: list[int], key_lens: list[int]) -> list[list[int]]:
    """Partition requests (by index) into attention groups that minimise padded work: a group costs
    members x longest query x longest key, plus GROUP_OVERHEAD_CELLS. Requests are bucketed by query
    length (powers of two) and adjacent buckets merged by dynamic programming, so a step of decodes alone is
    one group and a prefill chunk gets a group of its own. Each group lists its requests in step order."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(q_lens)), key=q_lens.__getitem__):
        if buckets and q_lens[buckets[-1][0]].bit_length() == q_lens[i].bit_length():
            buckets[-1].append(i)
        else:
            buckets.append([i])
    if len(buckets) == 1:
        return [list(range(len(q_lens)))]
    longest_key = [max(key_lens[i] for i in b) for b in buckets]
    best, cut = [0.0] + [float("inf")] * len(buckets), [0] * (len(buckets) + 1)  # over buckets[:j]
    for j in range(1, len(buckets) + 1):
        q_max, members, s_max = q_lens[buckets[j - 1][-1]], 0, 0
        for i in range(j - 1, -1, -1):  # last group = buckets[i:j]
            members, s_max = members + len(buckets[i]), max(s_max, longest_key[i])
            cost = best[i] + members * q_max * s_max + GROUP_OVERHEAD_CELLS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(buckets)
    while j:
        groups.append(sorted(r for b in buckets[cut[j]:j] for r in b))
        j = cut[j]
    return groups[::-1]


class KVCache:
    """A preallocated pool of fixed-size blocks per layer, head-major: [kv_heads, num_blocks + scratch_blocks,
    block_size, head_dim]. Blocks 0..num_blocks-1 belong to the block manager, the rest are the per-step
    scratch."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, scratch_blocks: int = 0):
        shape = (kv_heads, num_blocks + scratch_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_blocks = scratch_blocks
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # reused flat K / V read buffers

    def read_buffers(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Persistent contiguous [kv_heads, blocks, block_size, head_dim] buffers for one layer's gathered K and
        V, grown to the largest step so far: a fresh tens-of-MB tensor per layer and step costs more in page
        faults than the copy itself (measured 26 ms vs 2-3 ms for 2 x 17 MB on this machine)."""
        heads, _, block_size, head_dim = self.k[0].shape
        shape = (heads, blocks, block_size, head_dim)
        numel = heads * blocks * block_size * head_dim
        if self._gathered is None or self._gathered[0].numel() < numel:
            self._gathered = (self.k[0].new_empty(numel), self.v[0].new_empty(numel))
        return self._gathered[0][:numel].view(shape), self._gathered[1][:numel].view(shape)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @staticmethod
    def scratch_blocks_for(max_step_tokens: int, max_requests: int, block_size: int) -> int:
        """Scratch blocks a step of at most `max_step_tokens` new tokens over `max_requests` requests may use."""
        return -(-max_step_tokens // block_size) + max_requests


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    k_cache, v_cache = kv.k[layer], kv.v[layer]  # [Hkv, blocks, block_size, D]
    hkv, d = k_cache.shape[0], k_cache.shape[3]
    k_slots, v_slots = k_cache.view(hkv, -1, d), v_cache.view(hkv, -1, d)  # [Hkv, slots, D]
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
    k_slots[:, meta.scratch_slots] = k
    v_slots[:, meta.scratch_slots] = v
    outs = [_attend_group(q, k_cache, v_cache, kv, g, scale) for g in meta.groups]
    k_slots[:, meta.write_slots] = k[:, meta.write_index]
    v_slots[:, meta.write_slots] = v[:, meta.write_index]
    return outs[0] if meta.order is None else torch.cat(outs).index_select(0, meta.order)


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv: KVCache, g: AttentionGroup,
                  scale: float) -> torch.Tensor:  # [Tg, Hq, D]: the group's tokens, request after request
    b, n = g.key_blocks.shape
    blocks = g.key_blocks.flatten()
    if torch.is_grad_enabled() and q.requires_grad:  # training: out= buffers would cut the autograd graph
        keys, vals = k_cache.index_select(1, blocks), v_cache.index_select(1, blocks)
    else:  # groups run one after another, so they share the read buffers
        keys, vals = kv.read_buffers(len(blocks))
        torch.index_select(k_cache, 1, blocks, out=keys)
        torch.index_select(v_cache, 1, blocks, out=vals)
    hkv, block_size, d = k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]
    keys = keys.view(hkv, b, n * block_size, d).transpose(0, 1)  # [Bg, Hkv, S, D]
    vals = vals.view(hkv, b, n * block_size, d).transpose(0, 1)
    # grouped-query attention as plain attention: the G query heads sharing a KV head become G query rows
    heads = q.shape[1] // hkv
    q_max = g.query_index.shape[1]
    qp = q[g.query_index].view(b, q_max, hkv, heads, d).transpose(1, 2).reshape(b, hkv, q_max * heads, d)
    if g.views:
        out = _attend_with_views(qp, keys, vals, k_cache, v_cache, g, additive_mask(g, heads, q.dtype), heads, scale)
    else:
        out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=additive_mask(g, heads, q.dtype), scale=scale)
    out = out.view(b, hkv, q_max, heads, d).transpose(1, 2).reshape(b, q_max, hkv * heads, d)
    return out[g.query_valid]  # rows are row-major, so each request's tokens stay in order


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       additive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns each row's log-sum-exp: q [B, H, R, D], k / v [B, H, S, D] ->
    (out [B, H, R, D], lse [B, H, R, 1])."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if additive is not None:
        scores.add_(additive)
    peak = scores.amax(dim=-1, keepdim=True)  # finite: every row sees at least one key
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v).div_(total), total.log_().add_(peak)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        additive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """_softmax_attention's contract; on CPU through SDPA's CPU flash kernel, which returns the log-sum-exp
    too: the hand matmuls ran 3x slower on gathered [Bg, S, Hkv, D] buffers and 15-30% slower on pieces."""
    if q.device.type != "cpu":
        return _softmax_attention(q, k, v, scale, additive)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive, scale=scale)
    return out, lse.unsqueeze(-1)


def _attend_with_views(qp: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, g: AttentionGroup, additive: torch.Tensor, heads: int,
                       scale: float) -> torch.Tensor:  # [Bg, Hkv, Qmax * heads, D]
    """The group's gathered keys (qp [Bg, Hkv, Qmax * heads, D], keys / vals [Bg, Hkv, S, D]), then each view
    of a member's past in place, merged by log-sum-exp in fp32 (a bf16 merge would round every piece)."""
    out, lse = _attention_with_lse(qp, keys, vals, scale, additive)
    out = out.float()
    hkv, d = k_cache.shape[0], k_cache.shape[3]
    for view in g.views:
        rows = slice(0, view.queries * heads)
        k = k_cache[:, view.start : view.start + view.blocks].reshape(1, hkv, -1, d)  # [1, Hkv, S_v, D], a view
        v = v_cache[:, view.start : view.start + view.blocks].reshape(1, hkv, -1, d)
        out_v, lse_v = _attention_with_lse(qp[view.row : view.row + 1, :, rows], k, v, scale)
        o, l = out[view.row : view.row + 1, :, rows], lse[view.row : view.row + 1, :, rows]
        merged = torch.logaddexp(l, lse_v)
        o.mul_((l - merged).exp_()).add_(out_v.float().mul_((lse_v - merged).exp_()))
        l.copy_(merged)
    return out.to(qp.dtype)


def additive_mask(g: AttentionGroup, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """g.mask as 0 / -inf in `dtype`, each query row repeated for the `heads` that share a KV head:
    [Bg, 1, Qmax * heads, S]. Built by the first layer, reused by the others."""
    key = (heads, dtype)
    if key not in g.additive:
        rows = g.mask.repeat_interleave(heads, dim=2) if heads > 1 else g.mask
        g.additive[key] = torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill_(~rows, float("-inf"))
    return g.additive[key]
