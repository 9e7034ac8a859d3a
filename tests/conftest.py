"""Tiny random HF checkpoints, written by `transformers.save_pretrained`, and reference helpers.

The reference for every test is HuggingFace `transformers` (which we did not write): each family is
built as a transformers model, perturbed so that it is far from its degenerate initialisation, saved
with `save_pretrained`, and kept in memory so tests can ask it for logits and greedy generations.

Families (each a different checkpoint shape; both ZAYA ones route some tokens to the skip expert):
  zaya        ZAYA1, tie_word_embeddings=True (the ZAYA default)
  zaya_untied ZAYA1, untied lm_head with bias, attention biases, rope theta 10k, sharded save
  qwen3       Qwen3 dense, untied
  qwen3_tied  Qwen3 dense, tie_word_embeddings=True
  qwen3_moe   Qwen3-MoE top-2 of 4 experts, layer 1 dense (mlp_only_layers), sharded save

Shared helpers (imported by test modules with `from conftest import ...`): `make_engine`, `assert_engine_idle`,
`free_port` and `wait_ready`. They import workers/ and proto/ only when called, so importing this file loads
neither.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import (
    GenerationConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ZayaConfig,
    ZayaForCausalLM,
)

if TYPE_CHECKING:
    from workers.engine import LLMEngine

FAMILIES = ("zaya", "zaya_untied", "qwen3", "qwen3_tied", "qwen3_moe")

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


@dataclass
class Checkpoint:
    name: str
    path: str  # HF-format directory written by save_pretrained
    hf: torch.nn.Module  # the transformers model that wrote it (fp32, eval)
    _greedy: dict = field(default_factory=dict, repr=False)  # (prompt, n) -> transformers greedy tokens

    @property
    def config(self):
        return self.hf.config

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    def kv_bytes_per_block(self, block_size: int, elem_bytes: int = 4) -> int:
        """Pool bytes per KV block: K and V, and with the prefix cache (on by default) ZAYA's CCA snapshot."""
        from workers.models import state_snapshot_bytes

        c = self.hf.config
        kv = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * elem_bytes
        return kv + state_snapshot_bytes(c, {4: torch.float32, 2: torch.bfloat16}[elem_bytes])

    # ---- reference computations (transformers) --------------------------------------------------

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, V] fp32 logits of transformers' full-sequence forward (no cache)."""
        return self.hf(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers `generate(do_sample=False)` with EOS disabled: exactly max_new_tokens new tokens."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
                                   pad_token_id=0, bos_token_id=None)
            out = self.hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   generation_config=gen)
            new = out[0, len(prompt):].tolist()
            assert len(new) == max_new_tokens, f"transformers stopped early: {len(new)} of {max_new_tokens}"
            self._greedy[key] = new
        return list(self._greedy[key])

    def prompt(self, length: int, seed: int) -> list[int]:
        """Random prompt token ids (deterministic per seed)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (length,), generator=g).tolist()


def _config(name: str):
    if name == "zaya":
        return ZayaConfig(vocab_size=160, num_hidden_layers=2, moe_intermediate_size=48, num_experts=4,
                          router_hidden_size=32, initializer_range=0.3, **COMMON)
    if name == "zaya_untied":
        return ZayaConfig(vocab_size=200, num_hidden_layers=3, moe_intermediate_size=32, num_experts=3,
                          router_hidden_size=24, initializer_range=0.5, tie_word_embeddings=False,
                          lm_head_bias=True, attention_bias=True,
                          rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}},
                          **COMMON)
    if name == "qwen3":
        return Qwen3Config(vocab_size=192, num_hidden_layers=2, intermediate_size=96, initializer_range=0.3,
                           tie_word_embeddings=False, **COMMON)
    if name == "qwen3_tied":
        return Qwen3Config(vocab_size=128, num_hidden_layers=2, intermediate_size=80, initializer_range=0.5,
                           tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                           **COMMON)
    if name == "qwen3_moe":
        return Qwen3MoeConfig(vocab_size=176, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True,
                              initializer_range=0.3, tie_word_embeddings=False, **COMMON)
    raise KeyError(name)


_MODEL_CLASS = {"zaya": ZayaForCausalLM, "zaya_untied": ZayaForCausalLM, "qwen3": Qwen3ForCausalLM,
                "qwen3_tied": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}
_SHARDED = {"zaya_untied", "qwen3_moe"}


@torch.no_grad()
def _perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """Move every initialise-to-constant parameter off its constant, so no path is an identity.

    Norm weights and scales start at 1, biases at 0 and ZAYA's qk_norm.temp at 0 (which makes
    attention uniform); left like that, a random tiny model repeats one token forever.
    """

    def noise(p, std):
        return torch.randn(p.shape, generator=g, dtype=p.dtype) * std

    for name, p in model.named_parameters():
        if name.endswith("qk_norm.temp"):
            p.copy_(torch.empty(p.shape).uniform_(1.0, 2.5, generator=g))
        elif p.ndim == 1 and torch.all(p == 1):
            p.copy_(1.0 + noise(p, 0.2))
        elif p.ndim == 1 and torch.all(p == 0):
            p.copy_(noise(p, 0.2))
    for name, b in model.named_buffers():
        if name.endswith("balancing_biases"):
            # Make ZAYA's skip expert (last class) reachable. Its bias stays -1.0: transformers'
            # from_pretrained re-applies `balancing_biases[-1] = -1.0` after loading, whatever the
            # checkpoint says, so any other value would make its reloaded model disagree with the file.
            # Lowering the real experts' biases instead lets "skip" win when its probability leads by ~0.15.
            b.copy_(-0.85 + noise(b, 0.05))
            b[-1] = -1.0


def _build(name: str, root: Path, seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = _config(name)
    model = _MODEL_CLASS[name](cfg).eval()
    _perturb(model, torch.Generator().manual_seed(seed + 1000))
    path = root / name
    if name in _SHARDED:
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
        assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    else:
        model.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
    # The saved generation_config keeps the model's EOS (the engine reads it; tests pass ignore_eos).
    # The in-memory reference must never stop early: a GenerationConfig passed to generate() with
    # eos_token_id=None does not override the model's own, so clear that one.
    model.generation_config.eos_token_id = None
    return Checkpoint(name, str(path), model)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The models here are tiny: intra-op threads only add synchronisation, and on a shared 2-core
    machine a busy neighbour makes OpenMP spin-waits 20-50x slower. One thread keeps the suite fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
    """family name -> Checkpoint(path, hf model); all five built once per session (well under a second)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {name: _build(name, root, seed) for seed, name in enumerate(FAMILIES)}


@pytest.fixture(params=FAMILIES)
def ckpt(request, checkpoints) -> Checkpoint:
    """Parametrizes a test over every model family."""
    return checkpoints[request.param]


def add_draft_heads(path: str | Path, heads: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Write Zyphra's optional draft-head tensors (workers/models/draft_heads.py names) into a saved checkpoint,
    as one more safetensors file (listed in the shard index when there is one), and merge `config` into
    config.json."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        save_file(heads, str(path / "draft_heads.safetensors"), metadata={"format": "pt"})
        idx = json.loads(index.read_text())
        idx["weight_map"].update({name: "draft_heads.safetensors" for name in heads})
        index.write_text(json.dumps(idx))
    else:
        file = path / "model.safetensors"
        save_file({**load_file(str(file)), **heads}, str(file), metadata={"format": "pt"})
    if config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps(cfg))


def random_draft_heads(lm_head: torch.Tensor, rank: int, seed: int, noise: float = 0.5, chain: float = 1.0
                       ) -> dict[str, torch.Tensor]:
    """Random heads of the right shapes: the draft layer a noisy copy of `lm_head` [V, H] (so drafts are
    sometimes right and acceptance is not vacuous), a Markov head whose bias has about `chain` spread."""
    g = torch.Generator().manual_seed(seed)
    v, h = lm_head.shape
    return {
        "diffusion_output_layer.weight": (lm_head.detach()
                                          + noise * lm_head.detach().std() * torch.randn(v, h, generator=g)),
        "diffusion_markov_head.w1": torch.randn(v, rank, generator=g),
        "diffusion_markov_head.w2": chain / rank**0.5 * torch.randn(rank, v, generator=g),
    }


# ---- engines -------------------------------------------------------------------------------------------


def make_engine(model, **config) -> LLMEngine:
    """`LLMEngine(EngineConfig(model=..., **config))` for a Checkpoint (anything with `.path`) or a path.
    Modules bind their own defaults with `functools.partial(make_engine, ...)`; callers can override them."""
    from workers.config import EngineConfig
    from workers.engine import LLMEngine

    path = model if isinstance(model, str | os.PathLike) else model.path
    return LLMEngine(EngineConfig(model=str(path), **config))


def assert_engine_idle(engine: LLMEngine) -> None:
    """Nothing left to run and nothing held: no unfinished work, no request known to the engine, every KV
    block free exactly once with reference count 0 (free, or cached and evictable), every recurrent-state
    slot free."""
    bm = engine.blocks
    assert not engine.has_unfinished()
    assert not engine.requests
    assert bm.num_free_blocks == bm.num_blocks and bm.usage() == 0
    assert sorted([*bm.free_blocks, *bm.evictable]) == list(range(bm.num_blocks))
    assert all(c == 0 for c in bm.ref_counts)
    assert sorted(bm.cached.values()) == sorted(bm.evictable)  # every cached block is evictable now
    assert sorted(bm.free_state_slots) == list(range(engine.config.max_num_seqs))


def stop_by_prefixes(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, int]:
    """The reference: decode ever longer prefixes of the output; the first whose text holds a stop string
    ends it there (text before the earliest-starting match, tokens up to this one). (text, tokens kept)."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        found = [i for s in stop if (i := text.find(s)) >= 0]
        if found:
            return text[: min(found)], n
    return tokenizer.decode(ids), len(ids)


# ---- servers -------------------------------------------------------------------------------------------

READY_PROMPT = "Hello tidal"  # text: the served test models have a (byte-level) tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(gen, metadata, timeout_s: float, alive=lambda: True) -> None:
    """Poll `gen` (a proto GenerationStub) with a 1-token Generate until the server answers; `alive()` false
    (the server process exited) or `timeout_s` passed fails the test."""
    import grpc

    from proto import tidal_pb2 as pb

    req = pb.GenerateRequest(text=READY_PROMPT, sampling=pb.SamplingParams(max_tokens=1, ignore_eos=True))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            gen.Generate(req, metadata=metadata, timeout=20)
            return
        except grpc.RpcError as e:
            assert alive(), "the server exited while starting"
            assert time.monotonic() < deadline, f"server not ready after {timeout_s} s: {e.code()} {e.details()}"
            time.sleep(1.0)
