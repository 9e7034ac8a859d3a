"""Deterministic training windows: step -> [B, S + 1] token windows and per-sequence block offsets.

The train stream is cut into non-overlapping windows of S + 1 tokens (start shifted per epoch); each epoch
visits them in a fresh permutation. Everything is a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import torch


class WindowSampler:
    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        self.stream, self.s, self.b, self.seed = stream, seq_len, batch_size, seed
        self.per_epoch = (len(stream) - 1) // (seq_len + 1) - 1  # leaves room for the epoch shift
        if self.per_epoch < batch_size:
            raise ValueError(f"stream of {len(stream)} tokens is too short for batches of {batch_size} x {seq_len + 1}")
        self._epoch, self._perm, self._shift = -1, None, 0

    def _prepare(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.per_epoch, generator=g)
            self._shift = int(torch.randint(0, self.s + 1, (1,), generator=g))
            self._epoch = epoch

    def batch(self, step: int) -> torch.Tensor:
        """[B, S + 1] int64 windows of step `step` (0-based, counted within the phase)."""
        out = []
        for i in range(step * self.b, (step + 1) * self.b):
            epoch, k = divmod(i, self.per_epoch)
            self._prepare(epoch)
            start = self._shift + int(self._perm[k]) * (self.s + 1)
            out.append(self.stream[start : start + self.s + 1])
        return torch.stack(out).long()

    def offsets(self, step: int, block_len: int) -> list[int]:
        """Per-sequence offset of the first full mask block, uniform in [0, block_len)."""
        g = torch.Generator().manual_seed(self.seed * 7_000_003 + step)
        return torch.randint(0, block_len, (self.b,), generator=g).tolist()

    def epochs(self, step: int) -> float:
        return step * self.b / self.per_epoch


def eval_windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """[count, S + 1] evenly spaced non-overlapping windows of the held-out stream (fixed across runs)."""
    n = (len(stream) - 1) // (seq_len + 1)
    idx = torch.linspace(0, n - 1, min(count, n)).long()
    return torch.stack([stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)] for i in idx.tolist()]).long()
