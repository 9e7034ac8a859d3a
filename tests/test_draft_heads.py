"""Chained draft heads (Zyphra's checkpoint format): a draft output layer and a low-rank Markov head.

References we did not write: transformers' greedy generation (TiDAR output must equal it token for token
whatever the heads say), the exact AR distribution from transformers' logits (chi-square), the fork's
position rule written out by hand in `expected_chain`, and transformers' own ZAYA1-8B module tree.
The heads are random (the shipped model's trained heads are measured by bench/, not asserted here).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import add_draft_heads, assert_engine_idle, random_draft_heads
from test_tidar import (  # noqa: F401  (ckpts, stat_ckpt and stat_rows are fixtures)
    FAMILIES,
    Ckpt,
    chi2_pvalue,
    ckpts,
    engine_for,
    exact_sequence_probs,
    prompt_of,
    sample_engine,
    stat_ckpt,
    stat_rows,
    static,
)

from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine
from workers.loader import ModelLoadError
from workers.models import load_weights

RANK = 4


def lm_head_of(ck: Ckpt) -> torch.Tensor:
    return ck.hf.get_output_embeddings().weight


def with_heads(ck: Ckpt, dest: Path, heads: dict[str, torch.Tensor], config: dict | None = None) -> Ckpt:
    """A copy of `ck`'s checkpoint with `heads` added (same transformers reference: heads never change AR)."""
    shutil.copytree(ck.path, dest)
    add_draft_heads(dest, heads, config)
    out = Ckpt(ck.family, dest, ck.hf)
    out._greedy = ck._greedy
    return out


@pytest.fixture(scope="module")
def chained(ckpts, tmp_path_factory) -> dict[str, Ckpt]:
    root = tmp_path_factory.mktemp("chained")
    return {f: with_heads(ck, root / f, random_draft_heads(lm_head_of(ck), RANK, seed=i, chain=2.0),
                          {"dspark_block_len": 5})
            for i, (f, ck) in enumerate(ckpts.items())}


def observe_drafts(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, list]:
    """Run to completion; returns (final outputs in prompt order, every (request, drafts, anchor, first
    position) seen after a step: the anchor is the last generated token, the first draft sits right after it)."""
    ids = [engine.add_request(p, params) for p in prompts]
    reqs = {i: engine.requests[i] for i in ids}
    final, seen = {}, []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        for rid, req in reqs.items():
            if not req.finished and req.drafts:
                seen.append((rid, list(req.drafts), req.output_token_ids[-1], req.num_tokens))
    return [final[i] for i in ids], seen


# ---- greedy TiDAR with chained heads == transformers greedy ------------------------------------------------

CASES = [(f, k, levels, tf) for f in FAMILIES
         for k, levels, tf in ((8, tuple(range(9)), False), (8, (0, 2, 4), False), (6, (0,), True))]


@pytest.mark.parametrize("family,k,levels,two_forward", CASES,
                         ids=[f"{c[0]}-K{c[1]}-L{len(c[2])}-{'2f' if c[3] else '1f'}" for c in CASES])
def test_greedy_with_chained_heads_equals_transformers(chained, family, k, levels, two_forward):
    ck = chained[family]
    engine = engine_for(ck, tidar=static(k, levels, two_forward))
    assert engine.runner.draft_chain is not None and engine.runner.model.diffusion_output_layer is not None
    prompts = [prompt_of(n, 40 + n) for n in (4, 9, 13)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=22))
    assert [o.output_token_ids for o in outs] == [ck.greedy(p, 22) for p in prompts]
    assert sum(o.stats.accepted for o in outs) > 0, "no draft accepted: the comparison would be vacuous"
    assert_engine_idle(engine)


# ---- the heads are what drafts -------------------------------------------------------------------------------

def forcing_heads(ck: Ckpt, token: int) -> dict[str, torch.Tensor]:
    """A Markov head whose bias puts every draft on `token`, whatever the token before it."""
    heads = random_draft_heads(lm_head_of(ck), RANK, seed=3)
    heads["diffusion_markov_head.w1"] = torch.ones(ck.vocab, RANK)
    heads["diffusion_markov_head.w2"] = torch.zeros(RANK, ck.vocab)
    heads["diffusion_markov_head.w2"][:, token] = 1e4
    return heads


def test_a_head_that_forces_one_token_collapses_acceptance_and_output_stays_ar(ckpts, chained, tmp_path):
    ck = ckpts["zaya"]
    prompts = [prompt_of(n, 60 + n) for n in (5, 8)]
    expected = [ck.greedy(p, 20) for p in prompts]
    never = next(t for t in range(ck.vocab) if all(t not in e for e in expected))
    forced = with_heads(ck, tmp_path / "forced", forcing_heads(ck, never))
    greedy = SamplingParams(max_tokens=20)
    outs, seen = observe_drafts(engine_for(forced, tidar=static(8, (0, 2, 4))), prompts, greedy)
    assert [o.output_token_ids for o in outs] == expected
    assert seen and all(set(d) == {never} for _, d, _, _ in seen)
    assert sum(o.stats.drafted for o in outs) > 0 and sum(o.stats.accepted for o in outs) == 0
    control = engine_for(chained["zaya"], tidar=static(8, (0, 2, 4))).generate(prompts, greedy)
    assert sum(o.stats.accepted for o in control) > 0  # the same layout accepts drafts with other heads


def expected_chain(anchor: int, first_pos: int, m: int, vocab: int, block_len: int) -> list[int]:
    """Drafts of a successor head (bias forces prev + 1), written from the fork's rule: prev starts at the
    anchor and is token 0 before every slot whose absolute position is a multiple of block_len."""
    out, prev = [], anchor
    for pos in range(first_pos, first_pos + m):
        if pos % block_len == 0:
            prev = 0
        prev = (prev + 1) % vocab
        out.append(prev)
    return out


@pytest.mark.parametrize("two_forward", [False, True], ids=["1f", "2f"])
def test_chain_starts_at_the_new_anchor_and_resets_at_block_boundaries(ckpts, tmp_path, two_forward):
    ck = ckpts["qwen3"]
    v, block_len = ck.vocab, 3
    heads = random_draft_heads(lm_head_of(ck), v, seed=5)
    heads["diffusion_markov_head.w1"] = torch.eye(v)
    heads["diffusion_markov_head.w2"] = 1e4 * torch.roll(torch.eye(v), 1, dims=1)  # row r -> token r + 1
    succ = with_heads(ck, tmp_path / "succ", heads, {"dspark_block_len": block_len})
    prompts = [prompt_of(n, 70 + n) for n in (4, 7, 11)]
    outs, seen = observe_drafts(engine_for(succ, tidar=static(6, (0, 1, 3), two_forward)), prompts,
                                SamplingParams(max_tokens=30))
    assert [o.output_token_ids for o in outs] == [ck.greedy(p, 30) for p in prompts]
    assert len(seen) > 20
    for _, drafts, anchor, first_pos in seen:
        assert drafts == expected_chain(anchor, first_pos, len(drafts), v, block_len)
    assert any(first_pos % block_len == 0 for _, _, _, first_pos in seen)  # a reset on the first kept slot


def test_markov_disabled_drafts_exactly_as_without_the_markov_head(ckpts, tmp_path):
    ck = ckpts["qwen3_moe"]
    heads = random_draft_heads(lm_head_of(ck), RANK, seed=8, chain=3.0)
    layer_only = {"diffusion_output_layer.weight": heads["diffusion_output_layer.weight"]}
    variants = {"layer": with_heads(ck, tmp_path / "layer", layer_only),
                "disabled": with_heads(ck, tmp_path / "disabled", heads, {"dspark_markov_enabled": False}),
                "enabled": with_heads(ck, tmp_path / "enabled", heads)}
    prompts = [prompt_of(n, 80 + n) for n in (3, 10)]
    runs = {}
    for name, c in variants.items():
        engine = engine_for(c, tidar=static(8, (0, 4)))
        assert (engine.runner.draft_chain is None) == (name != "enabled")
        runs[name] = observe_drafts(engine, prompts, SamplingParams(max_tokens=24))
    drafts = {name: [seen[1:] for seen in run[1]] for name, run in runs.items()}  # request ids differ
    assert drafts["disabled"] == drafts["layer"]
    assert drafts["enabled"] != drafts["layer"]  # the chain changes drafts when it is on
    for outs, _ in runs.values():
        assert [o.output_token_ids for o in outs] == [ck.greedy(p, 24) for p in prompts]


# ---- lossless sampling with sampled chained drafts -------------------------------------------------------

@pytest.mark.parametrize("draft_temperature", [1.0, 0.0], ids=["sampled", "point-mass"])
def test_lossless_with_chained_drafts_matches_exact_distribution(stat_ckpt, stat_rows, tmp_path, draft_temperature):
    """1500 seeded generations at T = 1 with the model's own chained drafts (q = each chained row) fit the
    exact AR distribution from transformers' logits (chi-square p > 0.001)."""
    heads = random_draft_heads(lm_head_of(stat_ckpt), RANK, seed=11, noise=0.3, chain=1.5)
    ck = with_heads(stat_ckpt, tmp_path / "stat", heads, {"dspark_block_len": 4})
    n = 1500
    counts, accepted, drafted = sample_engine(ck, None, n, 1.0, 1.0, draft_temperature=draft_temperature)
    exact = exact_sequence_probs(stat_rows, 1.0, 1.0)
    assert set(counts) <= set(exact)
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    assert chi2_pvalue(counts, exact, n) > 1e-3


# ---- loading ----------------------------------------------------------------------------------------------

def test_heads_load_with_their_rank_and_without_them_nothing_changes(ckpts, chained):
    for family, ck in ckpts.items():
        plain = engine_for(ck).runner
        assert plain.model.diffusion_output_layer is None and plain.draft_chain is None
        heads = engine_for(chained[family]).runner
        assert heads.draft_chain.head.w1.shape == (ck.vocab, RANK) and heads.draft_chain.block_len == 5


@pytest.mark.parametrize("name,shape,match", [
    ("diffusion_output_layer.weight", (8, 3), r"weight 'diffusion_output_layer.weight' has shape \(8, 3\)"),
    ("diffusion_markov_head.w2", (5, 8), r"weight 'diffusion_markov_head.w2' has shape \(5, 8\), expected \(4, 8\)"),
    ("diffusion_markov_head.w1", (7, 4), r"weight 'diffusion_markov_head.w1' has shape \(7, 4\)"),
    ("diffusion_markov_head.w2", None, r"'diffusion_markov_head.w1' without 'diffusion_markov_head.w2'"),
])
def test_a_bad_head_is_a_one_line_error_naming_the_tensor(ckpts, tmp_path, name, shape, match):
    ck = ckpts["zaya"]
    heads = random_draft_heads(lm_head_of(ck), RANK, seed=1)
    if shape is None:
        del heads[name]
    else:
        heads[name] = torch.zeros(shape)
    bad = with_heads(ck, tmp_path / "bad", heads)
    with pytest.raises(ModelLoadError, match=match) as err:
        LLMEngine(EngineConfig(model=bad.path, mode="tidar", kv_cache_bytes=1 << 20))
    assert "\n" not in str(err.value)


def test_zaya1_8b_weights_by_name_and_shape_load_into_tidal_with_real_size_heads():
    """transformers' ZAYA1-8B module tree (its ZayaConfig defaults are the 8B's: 40 layers, hidden 2048,
    16 experts, vocab 262272), on the meta device: every tensor it has, by name and shape, is one our model
    loads, plus the draft heads at real size (R = 256, our choice: the fork's rank is not public)."""
    from transformers import ZayaConfig
    from transformers import ZayaForCausalLM as HFZaya

    from workers.models.zaya import ZayaForCausalLM

    cfg = ZayaConfig()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.vocab_size) == (40, 2048, 16, 262272)
    with torch.device("meta"):
        theirs = HFZaya(cfg)
        ours = ZayaForCausalLM(SimpleNamespace(**cfg.to_dict()))
    v, h, r = cfg.vocab_size, cfg.hidden_size, 256
    heads = {"diffusion_output_layer.weight": (v, h), "diffusion_markov_head.w1": (v, r),
             "diffusion_markov_head.w2": (r, v)}
    with torch.device("meta"):
        ours.add_draft_heads(heads)
    tensors = [(n, torch.empty(t.shape, device="meta")) for n, t in theirs.state_dict().items()]
    tensors += [(n, torch.empty(s, device="meta")) for n, s in heads.items()]
    loaded = load_weights(ours, tensors)  # raises on an unknown name, a wrong shape, or a weight left out
    assert set(heads) <= loaded and len(tensors) > 40 * 20
    assert ours.markov_head.w1.shape == (v, r)


def test_shipped_model_directory_loads_in_transformers(tmp_path):
    """models/zaya-code-tiny is a complete HF directory: transformers' AutoTokenizer tokenizes like the
    engine's tokenizer, and AutoModelForCausalLM gives the engine's logits (AR rows use the LM head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router.openai_api import ChatRequest
    from workers.layout import StepLayout

    model_dir = Path(__file__).resolve().parents[1] / "models" / "zaya-code-tiny"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=1 << 20))
    text = "def fib(n):\n    if n < 2:\n        return n\n"
    ids = tok(text).input_ids
    assert ids == engine.tokenizer.encode(text).ids and tok.decode(ids) == text
    assert tok.eos_token_id == engine.hf_config.eos_token_id and tok.mask_token_id == engine.mask_token_id
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    lay = StepLayout.causal(ids, 0, True)
    lay.logit_rows = list(range(len(ids)))
    ours = engine.runner.forward([lay], [0], [list(range(-(-len(ids) // 16)))], [0])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ChatRequest(messages=messages).prompt()  # what tidal serve sends the model for a chat
