"""Zyphra's checkpoint-only draft heads ("DSpark"), shared by every model family.

- `diffusion_output_layer.weight` [V, H]: the draft logits of proposal (mask) slots. Verify rows always
  use `lm_head`, so the AR distribution, hence the lossless sampler, never depends on these heads.
- `diffusion_markov_head.w1` [V, R], `.w2` [R, V]: a rank-R bigram bias that chains each draft on the
  token before it (`w1[prev] @ w2`); see workers/draft_chain.py for the walk.

Both are optional and used only when the checkpoint carries them. config.json may set `dspark_block_len`
(default 16: `prev` resets to token 0 at absolute positions that are multiples of it) and
`dspark_markov_enabled: false` (the Markov head is loaded but not used).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.loader import ModelLoadError

DRAFT_LAYER = "diffusion_output_layer.weight"
MARKOV_W1 = "diffusion_markov_head.w1"
MARKOV_W2 = "diffusion_markov_head.w2"


class MarkovHead(nn.Module):
    """The low-rank bigram bias of a draft given the token before it."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(vocab_size, rank))
        self.w2 = nn.Parameter(torch.zeros(rank, vocab_size))

    def forward(self, prev: torch.Tensor) -> torch.Tensor:  # [N] long -> [N, V] fp32
        return (self.w1[prev] @ self.w2).float()


class DraftHeads:
    """Mixin for the top-level model classes (`lm_head` and `cfg` attributes): the optional heads."""

    def init_draft_heads(self, cfg) -> None:
        """No heads yet (call in __init__); `add_draft_heads` gives the model those a checkpoint carries."""
        self.diffusion_output_layer: nn.Linear | None = None
        self.diffusion_markov_head: MarkovHead | None = None
        self.dspark_block_len = int(getattr(cfg, "dspark_block_len", 16))
        self.dspark_markov_enabled = bool(getattr(cfg, "dspark_markov_enabled", True))
        if self.dspark_block_len < 1:
            raise ValueError(f"dspark_block_len must be >= 1, got {self.dspark_block_len}")

    def add_draft_heads(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Create the heads named in `shapes` (a checkpoint's tensor shapes); R comes from w1's shape.

        Raises ModelLoadError, naming the tensor, for a head of the wrong shape or half a Markov head.
        """
        v, h = self.cfg.vocab_size, self.cfg.hidden_size
        if DRAFT_LAYER in shapes:
            if shapes[DRAFT_LAYER] != (v, h):
                raise ModelLoadError(f"weight {DRAFT_LAYER!r} has shape {shapes[DRAFT_LAYER]}, expected {(v, h)}")
            self.diffusion_output_layer = nn.Linear(h, v, bias=False)
        w1, w2 = shapes.get(MARKOV_W1), shapes.get(MARKOV_W2)
        if w1 is None and w2 is None:
            return
        if w1 is None or w2 is None:
            raise ModelLoadError(f"checkpoint has {MARKOV_W1 if w1 else MARKOV_W2!r} without "
                                 f"{MARKOV_W2 if w1 else MARKOV_W1!r}")
        if len(w1) != 2 or w1[0] != v or w1[1] < 1:
            raise ModelLoadError(f"weight {MARKOV_W1!r} has shape {w1}, expected ({v}, R)")
        if w2 != (w1[1], v):
            raise ModelLoadError(f"weight {MARKOV_W2!r} has shape {w2}, expected {(w1[1], v)}")
        self.diffusion_markov_head = MarkovHead(v, w1[1])

    @property
    def markov_head(self) -> MarkovHead | None:
        """The Markov head when the checkpoint has one and config.json leaves it enabled."""
        return self.diffusion_markov_head if self.dspark_markov_enabled else None

    def compute_draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        """Proposal rows' logits before the Markov chain: the draft output layer, else the LM head."""
        head = self.diffusion_output_layer if self.diffusion_output_layer is not None else self.lm_head
        return head(hidden).float()
