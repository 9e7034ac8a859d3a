"""The native engine on one accelerator: logits against a CPU run, then TiDAR / AR step time by batch.

Made for the lent GPU machine (its own Python 3.12 and PyTorch; no vLLM, Ray or pydantic; 64 MiB carried
per call). Here, once, fetch pydantic's wheels into the ignored `.whl/` (docs/benchmarks.md has the line);
there, one command:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m bench.gpu_native --device cuda --json $OUT/gpu_native.json

The model is random ZAYA weights of ZAYA1-8B's layer width (hidden 2048, 8 / 2 heads of 128, 16 experts +
skip, vocab 262272) with fewer layers, written by our own classes (transformers there predates ZAYA).
1. Logits: a prefill and a chunked (paged) continuation on the device against the same on the CPU in fp32:
   fp32 on the device must agree closely; bf16 is reported (max error, greedy agreement).
2. Step time in bf16: AR, and TiDAR K = 16 with levels [0] and [0, 4, 8, 16], at batch 1, 8, 32, 64 (random
   weights accept nothing, so every TiDAR step verifies 16 drafts: the cost side of the premise).
On a CPU, `--tiny` runs the same stages on a small model in seconds (tests/test_gpu_native.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine
from workers.layout import StepLayout
from workers.model_runner import DTYPES, ModelRunner

ZAYA1_WIDTH = dict(hidden_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                   moe_intermediate_size=2048, num_experts=16, router_hidden_size=256, vocab_size=262272)
TINY_WIDTH = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  moe_intermediate_size=256, num_experts=4, router_hidden_size=32, vocab_size=512)


def write_random_zaya(out: Path, width: dict, layers: int, seed: int = 0) -> Path:
    """A random ZAYA checkpoint in HF layout, written with our classes (names as transformers saves them)."""
    from safetensors.torch import save_file

    from workers.loader import load_hf_config
    from workers.models.zaya import ZayaForCausalLM

    config = dict(architectures=["ZayaForCausalLM"], model_type="zaya", num_hidden_layers=layers,
                  num_experts_per_tok=1, rms_norm_eps=1e-5, max_position_embeddings=8192,
                  rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}},
                  layer_types=["hybrid"] * layers, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                  pad_token_id=0, mask_token_id=3, cca_time0=2, cca_time1=2, dtype="float32", **width)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    model = ZayaForCausalLM(load_hf_config(out))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(1.0 + torch.rand_like(p))  # 0 would make attention uniform
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(tensors, str(out / "model.safetensors"))
    return out


def chunked_logits(model_dir: Path, device: str, dtype: torch.dtype, prompt: list[int], split: int) -> torch.Tensor:
    """[len(prompt), V] fp32 logits: prompt[:split] as a prefill, then prompt[split:] reading it from the paged
    cache (out-of-order blocks, so the block table matters)."""
    block = 16
    runner = ModelRunner(str(model_dir), dtype=dtype, device=device, block_size=block, num_blocks=64,
                         num_state_slots=1, max_step_tokens=len(prompt))
    table = list(range(63, 63 - (len(prompt) + block - 1) // block, -1))
    first = StepLayout.causal(prompt[:split], 0, True)
    first.logit_rows = list(range(split))
    a = runner.forward([first], [0], [table], [0])
    runner.commit([split - 1])
    rest = StepLayout.causal(prompt[split:], split, True)
    rest.logit_rows = list(range(len(prompt) - split))
    b = runner.forward([rest], [split], [table], [0])
    return torch.cat([a, b]).float().cpu()


def check_logits(model_dir: Path, device: str, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, vocab, (48,), generator=g).tolist()
    ref = chunked_logits(model_dir, "cpu", torch.float32, prompt, 29)
    out = {}
    for name in ("float32", "bfloat16"):
        got = chunked_logits(model_dir, device, DTYPES[name], prompt, 29)
        err = (got - ref).abs().max().item()
        out[name] = {"max_abs_err": err, "ref_max_abs": ref.abs().max().item(),
                     "greedy_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    scale = max(out["float32"]["ref_max_abs"], 1e-6)
    out["float32_ok"] = out["float32"]["max_abs_err"] <= 1e-3 * scale + 1e-4
    return out


def step_ms(model_dir: Path, device: str, dtype: str, mode: str, batch: int, levels: tuple[int, ...],
            steps: int, prompt_len: int, vocab: int) -> float:
    """Median wall time of one decode step (the engine syncs every step: it reads tokens back)."""
    tidar = dict(block_size=16, levels=levels, schedule=[dict(max_batch=100_000, block_size=16, levels=levels)])
    engine = LLMEngine(EngineConfig(model=str(model_dir), mode=mode, device=device, dtype=dtype, max_num_seqs=batch,
                                    max_num_batched_tokens=batch * (prompt_len + 16 * 6), kv_cache_bytes=4 << 30,
                                    tidar=tidar))
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(4, vocab, (prompt_len,), generator=g).tolist(),
                           SamplingParams(max_tokens=100_000, ignore_eos=True))
    for _ in range(3):  # prefill, then warm-up decode steps
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU check of this script)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    width = TINY_WIDTH if args.tiny else ZAYA1_WIDTH
    result: dict = {"device": args.device, "torch": torch.__version__, "layers": args.layers, "width": width}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as d:
        model_dir = write_random_zaya(Path(d) / "zaya", width, args.layers)
        result["logits"] = check_logits(model_dir, args.device, width["vocab_size"])
        print(json.dumps(result["logits"]), flush=True)
        rows = []
        print("| batch | AR ms | TiDAR [0] ms | TiDAR [0,4,8,16] ms | [0] / AR | [0,4,8,16] / AR |", flush=True)
        for b in [int(x) for x in args.batches.split(",")]:
            cell = {"batch": b}
            for key, mode, levels in (("ar", "ar", (0,)), ("tidar_0", "tidar", (0,)),
                                      ("tidar_0_4_8_16", "tidar", (0, 4, 8, 16))):
                cell[key] = step_ms(model_dir, args.device, "bfloat16", mode, b, levels, args.steps,
                                    args.prompt_len, width["vocab_size"])
            rows.append(cell)
            print(f"| {b} | {cell['ar']:.2f} | {cell['tidar_0']:.2f} | {cell['tidar_0_4_8_16']:.2f} | "
                  f"{cell['tidar_0'] / cell['ar']:.2f} | {cell['tidar_0_4_8_16'] / cell['ar']:.2f} |", flush=True)
        result["steps"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
