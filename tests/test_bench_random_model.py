"""The Qwen3 that the served family comparison runs beside the shipped ZAYA: same tokenizer, same size."""

import json
from pathlib import Path

from safetensors.torch import load_file

from bench.random_model import make_qwen3_like
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "zaya-code-tiny"


def ar_parameters(ckpt: Path) -> int:
    """Parameters an AR step uses: the shipped model's TiDAR draft heads (`diffusion_*`) left out."""
    weights = load_file(str(ckpt / "model.safetensors"))
    return sum(t.numel() for name, t in weights.items() if not name.startswith("diffusion_"))


def test_a_qwen3_like_the_shipped_model_serves_its_text_at_its_size(tmp_path):
    out = make_qwen3_like(SHIPPED, tmp_path / "qwen3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3"
    assert (out / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()
    assert 0.8 <= ar_parameters(out) / ar_parameters(SHIPPED) <= 1.25
    engine = LLMEngine(EngineConfig(model=str(out), mode="ar", kv_cache_bytes=1 << 24))
    result = engine.generate(["def fib(n):"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(result.output_token_ids) == 8
