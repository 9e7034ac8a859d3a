"""Held-out metrics: AR loss / accuracy, diffusion loss / accuracy per block slot, and a draft-agreement proxy.

The proxy: for each full mask block starting at position s, drafts are its slots 1..K (slot 0 is the
position the AR sampler fills itself); count the leading drafts whose argmax equals the AR argmax of the
clean row before them. With ground-truth prefixes this is a teacher-forced stand-in for the greedy
accepted length; the serving benchmarks measure the real thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.batches import ar_batch, row_logits, tidar_batch


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, block_len: int, mask_token_id: int, batch_size: int = 8,
             tidar: bool = True) -> dict:
    """windows: [N, S + 1]. Offsets cycle 0..block_len-1 over the windows so every block phase is covered."""
    was_training = model.training
    model.eval()
    k = block_len - 1
    ar_nll = ar_ok = ar_n = 0.0
    d_nll = d_ok = d_n = 0.0
    slot_ok = torch.zeros(block_len)
    slot_n = torch.zeros(block_len)
    runs: list[int] = []
    for i in range(0, len(windows), batch_size):
        seqs = windows[i : i + batch_size]
        b, s = seqs.shape[0], seqs.shape[1] - 1
        if not tidar:
            batch = ar_batch(seqs)
            logits = row_logits(model, batch)
            ar_nll += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            ar_ok += (logits.argmax(-1) == batch.targets).sum().item()
            ar_n += len(batch.targets)
            continue
        offsets = [(i + j) % block_len for j in range(b)]
        batch = tidar_batch(seqs, block_len, mask_token_id, offsets, chain_block_len=model.dspark_block_len)
        logits = row_logits(model, batch).view(b, 2, s, -1)
        targets = batch.targets.view(b, 2, s)
        nll = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(b, 2, s)
        pred = logits.argmax(-1)  # [B, 2, S]
        ok = pred == targets
        ar_nll += nll[:, 0].sum().item()
        ar_ok += ok[:, 0].sum().item()
        ar_n += b * s
        d_nll += nll[:, 1].sum().item()
        d_ok += ok[:, 1].sum().item()
        d_n += b * s
        for j, o in enumerate(offsets):
            for start in range(o, s - block_len + 1, block_len):  # full blocks only
                slot_ok += ok[j, 1, start : start + block_len].float()
                slot_n += 1
                # draft i at position start + i vs the AR argmax for it (clean row start + i - 1)
                agree = (pred[j, 1, start + 1 : start + block_len] == pred[j, 0, start : start + k]).tolist()
                runs.append(next((n for n, a in enumerate(agree) if not a), k))
    if was_training:
        model.train()
    out = {"ar_loss": ar_nll / ar_n, "ar_ppl": math.exp(ar_nll / ar_n), "ar_acc": ar_ok / ar_n,
           "tokens": int(ar_n)}
    if tidar:
        out.update({"diff_loss": d_nll / d_n, "diff_acc": d_ok / d_n,
                    "diff_acc_by_slot": [round(x, 4) for x in (slot_ok / slot_n.clamp_min(1)).tolist()],
                    "draft_agree_run": sum(runs) / max(1, len(runs)),
                    "tf_accepted_len": 1 + sum(runs) / max(1, len(runs))})
    return out
