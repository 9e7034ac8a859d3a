"""The whole run, resumable: data -> tokenizer -> model -> AR pretraining -> TiDAR conversion -> export.

    python -m training.pipeline --out runs/zaya-code [--hours H]
    python -m training.pipeline --out runs/chain --init-from models/zaya-code-tiny --markov-rank 64 --seq-len 512

With --init-from a run continues an exported model instead (its tokenizer, config and weights) with one
phase: more conversion and self-distillation on fresh greedy text of that model; --markov-rank adds
Zyphra's chained draft heads (workers/models/draft_heads.py), trained in the same loss.

Every stage leaves its product in the run directory and is skipped when that product exists; training
resumes from the last checkpoint (written every few minutes, and on SIGTERM / Ctrl-C between steps).
The plan (phase token budgets, batch, learning rates) is fixed in plan.json on the first start; later
starts reuse it whatever their flags say, so a resumed run is the run that was planned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from training import checkpoint, data, distill, evaluate, export, optim, tokenizer, train
from training import model as zmodel
from training.windows import WindowSampler, eval_windows
from workers.loader import iter_weights, weight_shapes

# Measured on this machine at batch 16 x 256, 1 thread: alone (CPU time) AR ~2.7k tokens/s and TiDAR ~1.3k clean
# tokens/s (2.6k slots/s); shared with the other work running here, about 1.4k and 0.65k of wall time.
# The defaults give ~1 h of AR and ~2 h of conversion on the shared machine (~1.5 h when it is idle).
DEFAULT_HOURS = 3.0
DEFAULT_AR_TOKENS = 5_000_000
DEFAULT_TIDAR_TOKENS = 4_500_000
DEFAULT_DISTILL_TOKENS = 5_000_000
DEFAULT_DISTILL_SEQS = 4096


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="run directory (created; resumed when it exists)")
    ap.add_argument("--hours", type=float, default=None,
                    help=f"scale the default phase budgets to about this many hours (default {DEFAULT_HOURS})")
    ap.add_argument("--ar-tokens", type=int, default=None,
                    help=f"AR pretraining tokens (default {DEFAULT_AR_TOKENS:,})")
    ap.add_argument("--tidar-tokens", type=int, default=None,
                    help=f"TiDAR conversion clean tokens (default {DEFAULT_TIDAR_TOKENS:,})")
    ap.add_argument("--distill-tokens", type=int, default=None,
                    help="self-distillation clean tokens, half of them the model's own text "
                         f"(default {DEFAULT_DISTILL_TOKENS:,})")
    ap.add_argument("--distill-seqs", type=int, default=None,
                    help=f"greedy continuations generated for it (default {DEFAULT_DISTILL_SEQS})")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ar-lr", type=float, default=2e-3)
    ap.add_argument("--tidar-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qk-temp", type=float, default=zmodel.QK_TEMP_INIT, help="initial qk_norm.temp (transformers: 0)")
    ap.add_argument("--balance-rate", type=float, default=5e-3, help="expert balancing-bias step per optimizer step")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--arch", type=json.loads, default={},
                    help='JSON overrides of model.DEFAULT_ARCH, e.g. {"hidden_size": 128}')
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N train / held-out files (tests)")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows of the phase-end evaluations")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between small held-out evaluations (0: never)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared: 1 is fastest)")
    ap.add_argument("--export-dir", default="models/zaya-code-tiny",
                    help="where the finished model is exported ('' to skip; the run dir's final-export/ is "
                         "always written)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue this exported model (tokenizer, config, weights): one distill phase")
    ap.add_argument("--markov-rank", type=int, default=None,
                    help="train the chained draft heads: draft output layer + a Markov head of this rank")
    ap.add_argument("--stop-after-steps", type=int, default=None, help="stop (checkpointed) after this many steps of "
                    "the current phase, as if killed (tests)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


# ---- stages ---------------------------------------------------------------------------------------------

def prepare_data(run: Path, args) -> dict:
    """Corpus lists, tokenizer and token streams in the run dir; returns the data/tokenizer summary."""
    if args.init_from and not (run / "tokenizer.json").is_file():
        shutil.copyfile(args.init_from / "tokenizer.json", run / "tokenizer.json")
    if not (run / "train_files.txt").is_file():
        corpus = data.find_corpus()
        if args.max_files:
            corpus.train, corpus.heldout = (corpus.train[: args.max_files],
                                            corpus.heldout[: max(2, args.max_files // 10)])
        data.write_lists(corpus, run)
    corpus = data.read_lists(run)
    if not (run / "tokenizer.json").is_file():
        print(f"training the tokenizer on {len(corpus.train)} files ...", flush=True)
        tok = tokenizer.train_tokenizer(data.texts(corpus, corpus.train), args.vocab_size)
        tok.save(str(run / "tokenizer.json"))
    tok = tokenizer.load(run / "tokenizer.json")
    special = tokenizer.special_ids(tok)
    (run / "special_tokens.json").write_text(json.dumps(special, indent=2) + "\n")
    streams = {}
    for split, files in (("train", corpus.train), ("heldout", corpus.heldout)):
        path = run / f"{split}_tokens.pt"
        if not path.is_file():
            print(f"encoding {split} ({len(files)} files) ...", flush=True)
            texts = data.texts(corpus, files)
            stream = tokenizer.encode_stream(tok, texts)
            torch.save({"tokens": stream, "chars": sum(map(len, texts))}, path)
        streams[split] = torch.load(path, weights_only=True)
    return {
        "data": {"root": str(corpus.root), "python_version": sys.version.split()[0],
                 "train_files": len(corpus.train), "heldout_files": len(corpus.heldout), "skipped": len(corpus.skipped),
                 "train_tokens": len(streams["train"]["tokens"]), "heldout_tokens": len(streams["heldout"]["tokens"]),
                 "includes_tests": True},
        "tokenizer": {"vocab_size": tok.get_vocab_size(), "special": special,
                      "chars_per_token": streams["train"]["chars"] / len(streams["train"]["tokens"])},
        "streams": {k: v["tokens"] for k, v in streams.items()},
    }


def make_plan(run: Path, args) -> dict:
    path = run / "plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    scale = (args.hours or DEFAULT_HOURS) / DEFAULT_HOURS
    plan = {
        "seed": args.seed, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "block_len": export.TIDAR_BLOCK_SIZE + 1,
        "alpha": 1.0, "grad_clip": 1.0, "weight_decay": 0.1, "final_lr_ratio": 0.1, "balance_rate": args.balance_rate,
        "qk_temp": args.qk_temp,
        "checkpoint_minutes": args.checkpoint_minutes, "eval_every": args.eval_every, "eval_windows": args.eval_windows,
        "eval_small_windows": 16, "log_every": 10, "threads": args.threads, "arch": args.arch,
        "phases": [
            {"name": "ar", "kind": "ar", "tokens": args.ar_tokens or int(DEFAULT_AR_TOKENS * scale),
             "lr": args.ar_lr, "warmup": 100},
            {"name": "tidar", "kind": "tidar", "tokens": args.tidar_tokens or int(DEFAULT_TIDAR_TOKENS * scale),
             "lr": args.tidar_lr, "warmup": 50},
            {"name": "distill", "kind": "distill", "tokens": args.distill_tokens or int(DEFAULT_DISTILL_TOKENS * scale),
             "lr": args.tidar_lr / 2, "warmup": 20, "sequences": args.distill_seqs or DEFAULT_DISTILL_SEQS,
             "share": 0.5},
        ],
        "init_from": str(args.init_from) if args.init_from else None,
        "markov_rank": args.markov_rank,
    }
    if args.init_from:  # a continued model: conversion + self-distillation only
        plan["phases"] = plan["phases"][2:]
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def distill_data(run: Path, args, plan: dict, phase: dict, stream: torch.Tensor) -> torch.Tensor:
    """The model's greedy continuations, written by the model as the previous phase left it (exported once;
    a continued run's teacher is the model it continues)."""
    teacher = Path(plan["init_from"]) if plan.get("init_from") else run / "distill-teacher"
    if not (teacher / "model.safetensors").is_file():
        export.export_run(run, teacher, "final")
    return distill.generate(teacher, stream, phase["sequences"], plan["seq_len"], plan["seed"] + 77,
                            run / "distill_tokens.pt", quiet=args.quiet)


def build(config: dict, plan: dict):
    """The model a run starts from: fresh, or the model it continues; plus fresh chained draft heads when the
    plan trains them and that model has none."""
    model = zmodel.build_model(config, plan["seed"], plan.get("qk_temp", zmodel.QK_TEMP_INIT))
    if plan.get("init_from"):
        init = Path(plan["init_from"])
        model.add_draft_heads(weight_shapes(init))
        missing, unexpected = model.load_state_dict(dict(iter_weights(init)), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is not stored
            raise SystemExit(f"{init} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if plan.get("markov_rank") and model.diffusion_markov_head is None:
        zmodel.add_chain_heads(model, plan["markov_rank"], plan["seed"])
    return model


def write_summary(run: Path, summary: dict) -> None:
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "streams"}, indent=2) + "\n")


# ---- the run --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    run = args.out
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    summary = prepare_data(run, args)
    plan = make_plan(run, args)
    plan["threads"], plan["quiet"] = args.threads, args.quiet
    special = summary["tokenizer"]["special"]
    mask_id = special["<mask>"]

    if plan.get("init_from"):
        config = json.loads((Path(plan["init_from"]) / "config.json").read_text())
    else:
        config = zmodel.make_config(summary["tokenizer"]["vocab_size"], special, **plan["arch"])
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = build(config, plan)
    summary["model"] = {"config": config, "params": zmodel.count_params(model),
                        "active_params": zmodel.active_params(config),
                        "qk_temp_init": plan.get("qk_temp", zmodel.QK_TEMP_INIT)}
    summary["plan"] = plan
    old = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    summary["phases"] = old.get("phases", [])

    ckpt = checkpoint.load(run)
    state = checkpoint.restore(ckpt, model) if ckpt else checkpoint.TrainState()
    streams = summary["streams"]
    full_eval = eval_windows(streams["heldout"], plan["seq_len"], plan["eval_windows"])
    small_eval = eval_windows(streams["heldout"], plan["seq_len"], plan["eval_small_windows"])
    print(f"model: {summary['model']['params']:,} parameters ({summary['model']['params'] * 4 / 1e6:.1f} MB fp32); "
          f"train {summary['data']['train_tokens']:,} tokens; plan: " +
          ", ".join(f"{p['name']} {p['tokens']:,} tokens / {train.phase_steps(p, plan)} steps"
                    for p in plan["phases"]) +
          (f"; resuming at phase {state.phase} step {state.step}" if ckpt else ""), flush=True)

    def on_signal(signum, frame):
        train.STOP["requested"] = True
        print(f"signal {signum}: stopping after this step and checkpointing", flush=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(run, args, plan, summary, model, state, ckpt, full_eval, small_eval, mask_id, t_start)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        train.STOP["requested"] = False


def _train(run: Path, args, plan: dict, summary: dict, model, state, ckpt, full_eval, small_eval, mask_id: int,
           t_start: float) -> int:
    """The phases from where the state stands, then the exports."""
    streams = summary["streams"]

    if not any(p["name"] == "init" for p in summary["phases"]) and state.phase == 0 and state.step == 0:
        summary["phases"].append({"name": "init",
                                  "eval": evaluate.evaluate(model, full_eval, plan["block_len"], mask_id)})
        write_summary(run, summary)

    while state.phase < len(plan["phases"]):
        i = state.phase
        phase = plan["phases"][i]
        opt = optim.make_optimizer(model, phase["lr"], plan["weight_decay"])
        if ckpt and ckpt["state"]["phase"] == i and ckpt.get("optimizer"):
            opt.load_state_dict(ckpt["optimizer"])
        sampler = WindowSampler(streams["train"], plan["seq_len"], plan["batch_size"], plan["seed"] + 1000 * (i + 1))
        if phase["kind"] == "distill":
            sampler = distill.MixedSampler(sampler, distill_data(run, args, plan, phase, streams["train"]),
                                           phase["share"], plan["seed"] + 1000 * (i + 1) + 1)

        def eval_fn(kind=phase["kind"]):  # the periodic check: small, and AR-only during AR pretraining
            return evaluate.evaluate(model, small_eval, plan["block_len"], mask_id, tidar=kind != "ar")

        finished = train.run_phase(model, opt, plan, i, state, sampler, mask_id, run, eval_fn,
                                   stop_at=args.stop_after_steps)
        if not finished:
            print(f"stopped at phase {phase['name']} step {state.step}; rerun the same command to resume", flush=True)
            return 0
        print(f"phase {phase['name']} done: evaluating on {len(full_eval)} held-out windows ...", flush=True)
        result = evaluate.evaluate(model, full_eval, plan["block_len"], mask_id)
        summary["phases"] = [p for p in summary["phases"] if p["name"] != phase["name"]] + [{
            "name": phase["name"], "done": True, "steps": state.step,
            "tokens": state.step * plan["batch_size"] * plan["seq_len"], "elapsed_s": round(state.elapsed, 1),
            "tok_s": state.step * plan["batch_size"] * plan["seq_len"] / max(state.elapsed, 1e-9), "eval": result}]
        write_summary(run, summary)
        print(json.dumps({phase["name"]: result}), flush=True)
        if phase["kind"] == "ar":
            torch.save({k: v for k, v in model.state_dict().items()}, run / "ar_model.pt")
            export.export_run(run, run / "ar-export", "ar")
        state.phase, state.step, state.elapsed = i + 1, 0, 0.0
        checkpoint.save(run, model, None, state)
        ckpt = None

    if args.export_dir:
        print(f"exported: {export.export_run(run, Path(args.export_dir), 'final')}", flush=True)
    export.export_run(run, run / "final-export", "final")
    (run / "DONE").write_text(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    print(f"pipeline done in {(time.time() - t_start) / 3600:.2f} h (this start)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
