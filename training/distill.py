"""Self-distillation data for the last phase: the converted model's own greedy continuations.

Greedy TiDAR accepts a draft only when it equals the model's own greedy token, so drafts trained on text
the model itself writes are accepted far more often than drafts trained on human code alone (the
self-distillation of Medusa-2 / EAGLE, applied to TiDAR's mask slots). The objective is unchanged; only the
data of the distilled half of each batch differs, and its AR rows are left out so that the AR model keeps
learning from real code only (the verifier's quality, hence the output, is not trained on its own text).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from training.windows import WindowSampler


def generate(model_dir: Path, stream: torch.Tensor, count: int, seq_len: int, seed: int, path: Path,
             batch: int = 64, quiet: bool = False) -> torch.Tensor:
    """[count, seq_len + 1] sequences: a train-stream prompt (a quarter to three quarters of seq_len; 64..192
    tokens at 256) + the model's greedy continuation.

    Resumable: finished chunks of `batch` sequences are saved to `path` and skipped on the next call.
    """
    from workers.config import EngineConfig, SamplingParams  # the serving engine writes the data
    from workers.engine import LLMEngine

    done = (torch.load(path, weights_only=True) if Path(path).is_file()
            else torch.zeros(0, seq_len + 1, dtype=torch.long))
    if len(done) >= count:
        return done[:count]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len - 1, (count,), generator=g).tolist()
    lengths = torch.randint(seq_len // 4, 3 * seq_len // 4 + 1, (count,), generator=g).tolist()
    engine = LLMEngine(EngineConfig(model=str(model_dir), mode="ar", max_num_seqs=batch,
                                    max_num_batched_tokens=max(4096, batch * 64), max_model_len=seq_len + 1))
    bar = tqdm(total=count, initial=len(done), desc="distill data", unit="seq", disable=quiet)
    for lo in range(len(done), count, batch):
        chunk = range(lo, min(lo + batch, count))
        prompts = [stream[starts[i] : starts[i] + lengths[i]].tolist() for i in chunk]
        params = [SamplingParams(max_tokens=seq_len + 1 - len(p), ignore_eos=True) for p in prompts]
        outs = engine.generate(prompts, params)
        rows = torch.tensor([o.prompt_token_ids + o.output_token_ids for o in outs], dtype=torch.long)
        done = torch.cat([done, rows])
        torch.save(done, Path(path).with_suffix(".tmp"))
        Path(path).with_suffix(".tmp").replace(path)
        bar.update(len(chunk))
    bar.close()
    return done


class MixedSampler:
    """Batches whose first `share` part are distilled sequences (fresh permutation per epoch), the rest real
    windows; a pure function of (seed, step) like WindowSampler."""

    def __init__(self, real: WindowSampler, distilled: torch.Tensor, share: float, seed: int):
        self.real, self.distilled, self.seed = real, distilled, seed
        self.b = real.b
        self._epoch, self._perm = -1, None
        self.n_distilled = max(1, min(self.b - 1, round(self.b * share)))
        if len(distilled) < self.n_distilled:
            raise ValueError(f"{len(distilled)} distilled sequences cannot fill {self.n_distilled} rows per batch")

    def batch(self, step: int) -> torch.Tensor:
        """[B, S + 1]: rows [0, n_distilled) distilled, the rest real."""
        rows = []
        for i in range(step * self.n_distilled, (step + 1) * self.n_distilled):
            epoch, k = divmod(i, len(self.distilled))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._epoch, self._perm = epoch, torch.randperm(len(self.distilled), generator=g)
            rows.append(self.distilled[int(self._perm[k])])
        real = self.real.batch(step)[: self.b - self.n_distilled]
        return torch.cat([torch.stack(rows), real])

    def ar_rows(self) -> torch.Tensor:
        """[B] bool: which sequences train the AR rows (the real ones)."""
        return torch.arange(self.b) >= self.n_distilled

    def offsets(self, step: int, block_len: int) -> list[int]:
        return self.real.offsets(step, block_len)

    def epochs(self, step: int) -> float:
        return step * self.n_distilled / len(self.distilled)
