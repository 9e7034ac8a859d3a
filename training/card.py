"""The README.md model card of an exported model, rendered from the run's summary.json."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _eval_rows(evals: dict[str, dict]) -> list[str]:
    keys = [("ar_loss", "AR next-token loss (nats)"), ("ar_ppl", "AR perplexity"), ("ar_acc", "AR top-1 accuracy"),
            ("diff_loss", "diffusion mask->token loss (nats)"), ("diff_acc", "diffusion top-1 accuracy"),
            ("tf_accepted_len", "teacher-forced greedy accepted length (1 + agreeing drafts, K=16)")]
    names = list(evals)
    rows = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in keys:
        rows.append(f"| {label} | " + " | ".join(_fmt(evals[n].get(key)) for n in names) + " |")
    return rows


def model_card(run_dir: Path, which: str, out: Path | None = None) -> str:
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    if s["plan"].get("init_from"):
        return continued_card(s)
    d, t, m, plan = s["data"], s["tokenizer"], s["model"], s["plan"]
    phases = {p["name"]: p for p in s.get("phases", [])}
    evals = {}
    for name, label in (("init", "before training"), ("ar", "after AR pretraining"),
                        ("tidar", "after TiDAR conversion"), ("distill", "after self-distillation")):
        if name in phases and phases[name].get("eval"):
            evals[label] = phases[name]["eval"]
    finished = all(phases.get(p["name"], {}).get("done") for p in plan["phases"])
    this = "AR-only checkpoint (before TiDAR conversion)" if which == "ar" else (
        "TiDAR-converted model" if finished else "intermediate checkpoint (run not finished)")
    lines = [
        f"# {Path(out).name if out else 'zaya-code-tiny'}",
        "",
        "A tiny ZAYA1 (`model_type: zaya`, `ZayaForCausalLM`) code model trained from scratch on CPU by Tidal's",
        "`training` package: AR pretraining, then TiDAR block-diffusion conversion, then self-distillation of the",
        "drafts (the same objective; half of each batch is the model's own greedy text, whose AR rows are left",
        f"out so the AR model learns from real code only). This export: **{this}**.",
        "It exists to exercise the serving stack (drafting, verification, acceptance), not to write useful code.",
        "",
        "## Data",
        f"- The `.py` files of the CPython {d['python_version']} standard library (`{d['root']}`), site-packages",
        f"  excluded, the stdlib's own test packages included; {d['skipped']} files that are not UTF-8 skipped.",
        f"- Split by file: held out when sha256(relative path)[:8] < 5% of 2^64 -> {d['train_files']} train files",
        f"  ({d['train_tokens']:,} tokens), {d['heldout_files']} held-out files ({d['heldout_tokens']:,} tokens).",
        "  Lists: `train_files.txt`, `heldout_files.txt` in the run directory.",
        "- Documents are joined with `<eos>`; no `<bos>` is prepended (the engine does not add one either).",
        "",
        "## Tokenizer",
        f"Byte-level BPE (`tokenizers`), vocabulary {t['vocab_size']}, trained on the train split; "
        f"{t['chars_per_token']:.2f} characters per token. Special tokens: "
        + ", ".join(f"`{k}` = {v}" for k, v in t["special"].items()) + ".",
        "",
        "## Model",
        f"{m['params']:,} parameters ({m['params'] * 4 / 1e6:.1f} MB fp32), about {m['active_params']:,} active "
        f"per token. hidden {m['config']['hidden_size']}, {m['config']['num_hidden_layers']} layers, "
        f"{m['config']['num_attention_heads']} query / {m['config']['num_key_value_heads']} KV heads of "
        f"{m['config']['head_dim']}, CCA attention, top-1 MoE over {m['config']['num_experts']} SwiGLU experts "
        f"(intermediate {m['config']['moe_intermediate_size']}) + skip, router hidden "
        f"{m['config']['router_hidden_size']}, tied embeddings, partial RoPE (half the head, theta 1e4), max positions "
        f"{m['config']['max_position_embeddings']}. `mask_token_id` = {t['special']['<mask>']}, "
        "`tidar_block_size` = 16.",
        f"Initialisation as transformers' ZAYA except `qk_norm.temp` = {m['qk_temp_init']} (transformers uses 0, which "
        "zeroes every key). Expert load is balanced by updating the real experts' `balancing_biases` (no aux loss).",
        "",
        "## Training",
        f"Sequences of {plan['seq_len']} tokens, batch {plan['batch_size']}, AdamW (betas 0.9/0.95, weight decay "
        f"{plan.get('weight_decay', 0.1)} on matrices), linear warmup + cosine to 10%, gradient clip "
        f"{plan.get('grad_clip', 1.0)}, fp32, seed {plan['seed']}, {plan['threads']} CPU thread(s).",
        "",
        "| phase | objective | steps | tokens | peak lr | wall time | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in plan["phases"]:
        done = phases.get(p["name"], {})
        obj = "next-token" if p["kind"] == "ar" else (
            f"TiDAR: (a*L_AR + L_diff)/(1+a), a={plan.get('alpha', 1.0)}, mask blocks of {plan['block_len']}")
        if p["kind"] == "distill":
            obj += (f"; {p['share']:.0%} of each batch from {p['sequences']:,} greedy continuations of train prompts "
                    "(diffusion rows only)")
        lines.append(f"| {p['name']} | {obj} | {done.get('steps', '-')} | {done.get('tokens', '-'):,} | {p['lr']} | "
                     f"{done.get('elapsed_s', 0) / 3600:.2f} h | {_fmt(done.get('tok_s'), 0)} |"
                     if done else f"| {p['name']} | {obj} | (not run) | {p['tokens']:,} planned | {p['lr']} | - | - |")
    lines += ["", "Mask layout: `workers.masks.training_layout` (clean copy causal, masked copy in blocks that see the "
              "clean prefix before the block and themselves, random block phase per sequence), flattened by "
              "`workers.layout.build_inputs`: the same code that builds inference steps.", ""]
    if evals:
        n = next(iter(evals.values())).get("tokens")
        lines += [f"## Held-out results ({n:,} held-out tokens, sequences of {plan['seq_len']})", ""]
        lines += _eval_rows(evals)
        last = list(evals.values())[-1]
        if last.get("diff_acc_by_slot"):
            lines += ["", "Diffusion accuracy by block slot (slot 0 = the anchor's next position; drafts are 1..16): "
                      + ", ".join(f"{x:.2f}" for x in last["diff_acc_by_slot"]) + "."]
    lines += ["", "## Limits",
              "- Tiny and trained for hours on a CPU: it produces plausible-looking Python, not correct programs.",
              f"- Trained on sequences of {plan['seq_len']} tokens; longer contexts are untested.",
              "- Python only (stdlib style), no chat or instruction data.",
              "- The teacher-forced accepted length is a proxy; measure acceptance with the serving benchmarks.", ""]
    return "\n".join(lines)


def continued_card(s: dict) -> str:
    """A run that continued an exported model: that model's card (up to its measurements, which no longer
    hold) and a section on this run: the chained draft heads, the data, the phase and before / after."""
    plan, m = s["plan"], s["model"]
    readme = Path(plan["init_from"]) / "README.md"
    base = (readme.read_text().split("\n## Measured with the engine")[0].rstrip() if readme.is_file()
            else f"# {readme.parent.name}")
    phases = {p["name"]: p for p in s.get("phases", [])}
    p = plan["phases"][0]
    done = phases.get(p["name"], {})
    rank = plan.get("markov_rank")
    lines = [base, "", "## Continued training: chained draft heads (this export)", "",
             f"Continued from `{plan['init_from']}` (the model described above) with one phase, "
             f"{'finished' if done.get('done') else 'not finished'}: more TiDAR conversion and self-distillation in "
             f"one objective, on sequences of {plan['seq_len']} tokens (batch {plan['batch_size']}): {p['share']:.0%} "
             f"of each batch from {p['sequences']:,} fresh greedy continuations written by that model (diffusion rows "
             "only), the rest real train-split windows (both objectives)."]
    if rank:
        lines += ["", f"Zyphra's checkpoint-only draft heads were added and trained in the same loss: "
                  f"`diffusion_output_layer.weight` [V, H] (started as a copy of the LM head) and a rank-{rank} Markov "
                  "head `diffusion_markov_head.w1` [V, R] (normal init) / `w2` [R, V] (zero init), so training started "
                  "from the plain model. Mask slot t's logits are `W_d h_t + w1[prev] @ w2`, prev = the clean token at "
                  "t - 1 (teacher forcing), token 0 where t is a multiple of `dspark_block_len` = 16; at inference the "
                  "engine chains each draft on the one before it, starting from the anchor "
                  "(workers/draft_chain.py). Verify rows always use the LM head."]
    lines += ["", f"{m['params']:,} parameters ({m['params'] * 4 / 1e6:.1f} MB fp32) with the heads.", "",
              "| phase | steps | tokens | peak lr | wall time | tokens/s |", "|---|---|---|---|---|---|",
              f"| {p['name']} | {done.get('steps', '-')} | {done.get('tokens', 0):,} | {p['lr']} | "
              f"{done.get('elapsed_s', 0) / 3600:.2f} h | {_fmt(done.get('tok_s'), 0)} |"]
    evals = {label: phases[n]["eval"] for n, label in (("init", "before this run"), (p["name"], "after"))
             if phases.get(n, {}).get("eval")}
    if evals:
        n = next(iter(evals.values())).get("tokens")
        lines += ["", f"Held-out ({n:,} tokens, sequences of {plan['seq_len']}; drafts teacher-forced):", ""]
        lines += _eval_rows(evals)
    return "\n".join(lines) + "\n"
