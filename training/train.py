"""The step loop of one phase: batch -> loss -> backward -> clip -> AdamW -> balance; periodic checkpoints."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training import checkpoint, losses, optim
from training.balance import LoadBalancer
from training.batches import ar_batch, tidar_batch
from training.windows import WindowSampler

STOP = {"requested": False}  # set by the pipeline's SIGTERM / SIGINT handler; honoured between steps


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def phase_steps(phase: dict, plan: dict) -> int:
    """Optimizer steps of a phase: its token budget over the clean tokens of one batch."""
    return max(1, math.ceil(phase["tokens"] / (plan["batch_size"] * plan["seq_len"])))


def make_batch(kind: str, sampler: WindowSampler, step: int, plan: dict, mask_token_id: int, chain_block_len: int):
    """kind 'ar': next-token rows only; 'tidar': the conversion objective; 'distill': the same objective on a
    MixedSampler's batch, AR rows only from its real windows."""
    seqs = sampler.batch(step)
    if kind == "ar":
        return ar_batch(seqs)
    ar_seqs = sampler.ar_rows() if kind == "distill" else None
    return tidar_batch(seqs, plan["block_len"], mask_token_id, sampler.offsets(step, plan["block_len"]), ar_seqs,
                       chain_block_len)


def run_phase(model, opt, plan: dict, phase_index: int, state: checkpoint.TrainState, sampler: WindowSampler,
              mask_token_id: int, run_dir: Path, eval_fn=None, stop_at: int | None = None,
              checkpoint_every_s: float | None = None) -> bool:
    """Train phase `phase_index` from state.step until its last step (or `stop_at` steps, for tests).

    Returns True when the phase finished. Checkpoints every `checkpoint_every_s` seconds of wall time and
    when stopping; appends one JSON line per logged step to metrics.jsonl.
    """
    phase = plan["phases"][phase_index]
    total = phase_steps(phase, plan)
    end = total if stop_at is None else min(total, stop_at)
    every = plan.get("checkpoint_minutes", 5) * 60 if checkpoint_every_s is None else checkpoint_every_s
    balancer = LoadBalancer(model, plan.get("balance_rate", 1e-3))
    model.train()
    tokens_per_step = plan["batch_size"] * plan["seq_len"]
    metrics = open(Path(run_dir) / "metrics.jsonl", "a")
    bar = tqdm(total=total, initial=state.step, desc=phase["name"], dynamic_ncols=True, file=sys.stdout,
               mininterval=1.0 if sys.stdout.isatty() else 30.0, disable=plan.get("quiet", False))
    last_ckpt, rate, ema = time.time(), None, None
    try:
        while state.step < end and not STOP["requested"]:
            t0 = time.time()
            lr = optim.lr_at(state.step, total, phase["lr"], phase["warmup"], plan.get("final_lr_ratio", 0.1))
            optim.set_lr(opt, lr)
            batch = make_batch(phase["kind"], sampler, state.step, plan, mask_token_id, model.dspark_block_len)
            out = losses.compute(model, batch, plan.get("alpha", 1.0))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), plan.get("grad_clip", 1.0)).item()
            opt.step()
            loads = balancer.update()
            state.step += 1
            state.tokens += tokens_per_step
            dt = time.time() - t0
            state.elapsed += dt
            rate = tokens_per_step / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_step / dt
            ema = out.loss.item() if ema is None else 0.98 * ema + 0.02 * out.loss.item()
            bar.update(1)
            shown = {"loss": f"{ema:.3f}", "ar": f"{out.ar:.3f}", "diff": f"{out.diff:.3f}", "tok_s": f"{rate:.0f}"}
            bar.set_postfix({k: v for k, v in shown.items() if v != "nan"}, refresh=False)
            if state.step % plan.get("log_every", 10) == 0 or state.step == end:
                metrics.write(json.dumps({"phase": phase["name"], "step": state.step, "loss": round(out.loss.item(), 4),
                                          "ar": _num(out.ar), "diff": _num(out.diff), "lr": lr,
                                          "grad_norm": round(grad_norm, 3), "tok_s": round(rate),
                                          "tokens": state.tokens, "epoch": round(sampler.epochs(state.step), 3),
                                          "expert_load": [[round(x, 3) for x in l] for l in loads]}) + "\n")
                metrics.flush()
            if eval_fn is not None and plan.get("eval_every") and state.step % plan["eval_every"] == 0 \
                    and state.step < total:
                balancer.active = False
                result = eval_fn()
                balancer.active = True
                metrics.write(json.dumps({"phase": phase["name"], "step": state.step, "eval": result}) + "\n")
                metrics.flush()
                bar.write(f"[eval {phase['name']} step {state.step}] " + ", ".join(
                    f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
            if time.time() - last_ckpt >= every and state.step < end:
                checkpoint.save(run_dir, model, opt, state)
                last_ckpt = time.time()
    finally:
        bar.close()
        metrics.close()
        balancer.remove()
    checkpoint.save(run_dir, model, opt, state)
    return state.step >= total
