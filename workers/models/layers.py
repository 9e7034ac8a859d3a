"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearGroup:
    """nn.Linear layers that read the same input, run as one matmul.

    The layers stay the model's modules, so HF names on disk, in checkpoints and in training are unchanged;
    `freeze` (at load, for inference) keeps the concatenated weight, while training concatenates per call
    so gradients reach each named weight.
    """

    def __init__(self, *layers: nn.Linear):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.frozen: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.frozen is not None:
            return self.frozen
        biases = [layer.bias for layer in self.layers]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        return torch.cat([layer.weight for layer in self.layers]), bias

    def freeze(self, input_major: bool = False) -> None:
        """Build the fused weight once; the layers' own weights become views of it, so each is held once."""
        self.frozen = None
        weight, bias = (t.detach() if t is not None else None for t in self.weights())
        weight = as_input_major(weight) if input_major else weight
        for i, (layer, w) in enumerate(zip(self.layers, weight.split(self.sizes), strict=True)):
            layer.weight.data = w
            if bias is not None:
                layer.bias.data = bias.split(self.sizes)[i]
        self.frozen = weight, bias

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [T, H] -> one [T, out_i] per layer
        weight, bias = self.weights()
        return F.linear(x, weight, bias).split(self.sizes, dim=-1)


def as_input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [..., out, in] values stored input-major (each [in, out] matrix contiguous): on CPU, MKL's
    matmul for the few rows of a decode step runs 1.4-2x faster on this layout (docs/benchmarks.md)."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def prepare_for_inference(model: nn.Module, input_major: bool) -> None:
    """Once after loading: build every LinearGroup's fused weight and what modules freeze for inference
    (`freeze_for_inference`), and with `input_major` (on CPU) store linear and expert weights input-major.
    Names, shapes and values stay; a weight shared with the embedding (tied head) keeps its layout, which
    the embedding's row lookups need."""
    grouped: set[int] = set()  # layers whose weights are now views of a group's fused weight
    for module in model.modules():
        if hasattr(module, "freeze_for_inference"):  # e.g. ZAYA's conv weight in its matmul layout
            module.freeze_for_inference()
        for value in vars(module).values():
            if isinstance(value, LinearGroup):
                value.freeze(input_major)
                grouped.update(id(layer) for layer in value.layers)
    if not input_major:
        return
    embedding = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not embedding and id(module) not in grouped:
            module.weight.data = as_input_major(module.weight.data)
        elif isinstance(module, Experts):
            module.gate_up_proj.data = as_input_major(module.gate_up_proj.data)
            module.down_proj.data = as_input_major(module.down_proj.data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE on the first `rotary_dim` channels of each head (all of them unless partial).

    Written as x * cos + x[..., perm] * sin with per-step tables padded to the head dim (cos 1, sin 0 on
    the channels RoPE leaves alone, the rotate-half sign folded into sin): four ops per tensor, the same
    products and sums as the rotate-half form, so the same rounding."""

    def __init__(self, head_dim: int, theta: float, partial_factor: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_factor)
        self.theta = theta
        # plain attributes, not buffers: inv_freq must stay fp32 when the model moves to bf16
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device="cpu")
                                         / self.rotary_dim))
        half, r = self.rotary_dim // 2, self.rotary_dim
        cpu = dict(device="cpu")  # models are built on the meta device; this table is not a weight
        self.perm = torch.cat([torch.arange(half, r, **cpu), torch.arange(half, **cpu),
                               torch.arange(r, head_dim, **cpu)])

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, shared: dict | None = None):
        # positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D]. `shared`: the step's per-layer cache (tables once)
        key = ("rotary", self.rotary_dim, self.theta, q.dtype)
        if shared is not None and key in shared:
            cos, sin = shared[key]
        else:
            cos, sin = self.tables(positions, q.dtype)
            if shared is not None:
                shared[key] = cos, sin
        if self.perm.device != q.device:
            self.perm = self.perm.to(q.device)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and signed sin, padded with 1 and 0 past rotary_dim."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq  # [T, rotary_dim / 2]
        rest = self.head_dim - self.rotary_dim
        c, s = freqs.cos(), freqs.sin()
        cos = torch.cat([c, c, freqs.new_ones(len(freqs), rest)], dim=-1)
        sin = torch.cat([-s, s, freqs.new_zeros(len(freqs), rest)], dim=-1)
        return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.index_select(-1, self.perm) * sin


def rope_settings(cfg, layer_type: str | None = None) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from `rope_parameters` (per layer type or flat) or legacy fields."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported yet (only 'default')")
    return float(theta), float(partial)


class SwiGLU(nn.Module):
    """Dense gated MLP with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up = LinearGroup(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """E SwiGLU experts stored fused, as 3D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I].

    `forward` runs only the experts that received tokens; a token routed to index -1 (ZAYA's skip
    expert) is not computed at all. Expert parallelism replaces this module's `forward`.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        expert_ids: torch.Tensor,  # [N, k] long, -1 = none
        weights: torch.Tensor,  # [N, k]
    ) -> torch.Tensor:  # [N, H]
        out = torch.zeros_like(x)
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids.clamp_min(-1) + 1, minlength=self.num_experts + 1).tolist()
        token_of = order // expert_ids.shape[1]
        start = counts[0]  # skip tokens routed nowhere
        for e in range(self.num_experts):
            n = counts[e + 1]
            if n == 0:
                continue
            rows = order[start : start + n]
            tokens = token_of[start : start + n]
            start += n
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            y = y * weights.reshape(-1)[rows, None].to(y.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
