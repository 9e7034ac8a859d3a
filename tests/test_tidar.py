"""TiDAR decoding against references we did not write.

References: transformers' own models (`generate(do_sample=False)` and full-sequence logits) for the
greedy path, and exact output distributions computed here from transformers' logits (temperature and
top-p written from their definitions) for the sampled path. Nothing under test is mocked.

Random weights accept almost no drafts, which would make "TiDAR output == AR output" trivially true.
Two complementary remedies:
  * tiny vocabularies (8 tokens), so natural drafts often agree; every run asserts acceptance > 0;
  * injected drafts: between engine steps the test overwrites `request.drafts` / `request.draft_logits`
    with the reference AR continuation, corrupted at a chosen position. That only changes which
    tokens the engine proposes; the forward, the verifier, the commit, the KV trim and the ZAYA CCA
    state commit are the real ones, so long accepted runs, stops inside accepted blocks and rollback
    after every possible number of accepted drafts are exercised, and the exact accept count is known.

The checkpoints are built here (module-scoped) with transformers and saved with save_pretrained, with
"mask_token_id" written into config.json (transformers does not know the key; our loader reads it).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import assert_engine_idle, make_engine
from transformers import (
    GenerationConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ZayaConfig,
    ZayaForCausalLM,
)

from workers.backends import EngineStartError
from workers.config import DraftRule, EngineConfig, InvalidRequest, SamplingParams, TidarConfig
from workers.engine import LLMEngine
from workers.layout import StepLayout
from workers.models import state_snapshot_bytes
from workers.request import Status
from workers.sampler import verify
from workers.tidar import resolve_mask_token

V = 8  # tiny vocabulary: natural drafts agree often enough to matter
MASK_ID = V - 1
BLOCK = 4  # KV block size (tokens)
FAMILIES = ("zaya", "qwen3", "qwen3_moe")
# hidden 64, 2 layers, 2 KV heads of 32: 1 KiB of fp32 KV per token, so the smallest pool EngineConfig
# accepts (64 KiB) holds 64 tokens and a few requests already force preemption
DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2,
            max_position_embeddings=256, initializer_range=1.0, eos_token_id=None, bos_token_id=None,
            pad_token_id=0)


# ---- checkpoints -----------------------------------------------------------------------------------


def _hf_model(family: str, vocab: int, seed: int, dims: dict) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "zaya":
        model = ZayaForCausalLM(ZayaConfig(vocab_size=vocab, moe_intermediate_size=32, num_experts=3,
                                           router_hidden_size=16, **dims))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, intermediate_size=64, tie_word_embeddings=False,
                                             **dims))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=vocab, intermediate_size=64, moe_intermediate_size=32,
                                                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                                   tie_word_embeddings=False, **dims))
    model.eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # move constant-initialised parameters off their constants (no identity paths)
        for name, p in model.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 2.5, generator=g))
            elif p.ndim == 1 and bool(torch.all(p == 1)):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim == 1 and bool(torch.all(p == 0)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("balancing_biases"):  # make ZAYA's skip expert reachable; keep [-1] = -1 as HF does
                b.copy_(-0.85 + torch.randn(b.shape, generator=g) * 0.05)
                b[-1] = -1.0
    return model


class Ckpt:
    def __init__(self, family: str, path: Path, hf: torch.nn.Module):
        self.family, self.path, self.hf = family, str(path), hf
        self.vocab = hf.config.vocab_size
        self._greedy: dict = {}

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        return self.hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int], n: int, eos=None) -> list[int]:
        """transformers generate(do_sample=False): n new tokens, or up to and including the first of `eos`."""
        key = (tuple(prompt), n, eos if not isinstance(eos, list) else tuple(eos))
        if key not in self._greedy:
            gen = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                                   bos_token_id=None)
            out = self.hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   generation_config=gen)
            self._greedy[key] = out[0, len(prompt):].tolist()
        return list(self._greedy[key])


def prompt_of(length: int, seed: int, vocab: int = V) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def save(model, path: Path, **extra) -> None:
    model.save_pretrained(path)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(extra)
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Ckpt]:
    """One tiny-vocabulary checkpoint per family, with a mask token in config.json.

    The first seed whose greedy continuations are not a single repeated token is used (random tiny
    models often collapse into repeating one token, which would make equality checks weak).
    """
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    root = tmp_path_factory.mktemp("tidar_ckpts")
    out = {}
    for family in FAMILIES:
        for seed in range(20):
            hf = _hf_model(family, V, seed, DIMS)
            ck = Ckpt(family, root / family, hf)
            conts = [ck.greedy(prompt_of(n, n), 24) for n in (5, 9)]
            if all(len(set(c)) >= 3 and sum(a != b for a, b in zip(c, c[1:], strict=False)) >= 8 for c in conts):
                break
        else:
            raise AssertionError(f"no varied {family} model found")
        save(hf, root / family, mask_token_id=MASK_ID)
        out[family] = ck
    return out


def static(k: int, levels: tuple[int, ...], two_forward: bool = False, fallback: bool = False, **kw) -> dict:
    """A TidarConfig with a fixed draft schedule (K, levels) for any batch, so the layout of every step is
    known (the default adaptive policy picks K and levels from measured step times). With `fallback`,
    when the whole batch's layout does not fit the token budget, K/2 with level 0, then K = 1."""
    rules = [DraftRule(max_batch=64, block_size=k, levels=levels)]
    if fallback:
        rules += [DraftRule(max_batch=64, block_size=max(1, k // 2), levels=(0,)),
                  DraftRule(max_batch=64, block_size=1, levels=(0,))]
    return dict(block_size=k, levels=levels, two_forward=two_forward, schedule=tuple(rules), **kw)


engine_for = partial(make_engine, mode="tidar", block_size=BLOCK, kv_cache_bytes=1 << 20)


def pool_bytes(ck: Ckpt, blocks: int) -> int:
    """kv_cache_bytes of a pool of `blocks` blocks: fp32 K/V (1 KiB a token), and ZAYA's CCA snapshot per
    block (the prefix cache's)."""
    return blocks * (BLOCK * 1024 + state_snapshot_bytes(ck.hf.config, torch.float32))


def check_rollback(engine: LLMEngine, req, ck: Ckpt) -> None:
    """After a sampling step: every token but the anchor is in the KV, exactly as many blocks as that
    needs are held, and a forward of the anchor over the kept KV + CCA state gives transformers'
    logits for the next position (a direct check of KV and CCA rollback; nothing is written)."""
    n = req.num_computed_tokens
    assert n == len(req.prompt_token_ids) + len(req.output_token_ids) - 1
    assert len(req.block_table) == -(-n // BLOCK)
    anchor = req.all_token_ids[-1]
    lay = StepLayout([anchor], [n], [-1], 0, [0])
    ours = engine.runner.forward([lay], [n], [req.block_table], [req.state_slot])[0]
    torch.testing.assert_close(ours, ck.logits(req.all_token_ids)[-1], atol=1e-4, rtol=1e-5)


def prompt_with_late_token(ck: Ckpt, length: int, seed: int, n: int, late: int) -> tuple[list[int], int]:
    """A prompt whose greedy continuation contains a token that first appears at index >= late."""
    for s in range(seed, seed + 200):
        p = prompt_of(length, s)
        cont = ck.greedy(p, n)
        late_tokens = [t for i, t in enumerate(cont) if i >= late and t not in cont[:late]]
        if late_tokens:
            return p, late_tokens[0]
    raise AssertionError("no prompt with a late first occurrence")


# ---- 1. greedy TiDAR == greedy AR (transformers) -----------------------------------------------------

DENSE8 = tuple(range(9))
# (K, levels, two_forward, token budget). With a budget of 64 the K = 8 layouts (36 or 90 slots per
# request) do not fit the whole batch, so the static schedule falls back to K = 4 or 1 with level 0
# while the load is high: K changes between steps, and drafts left over from a larger K are cut.
CONFIGS = {
    "zaya": [(3, (0,), False, 512), (3, (0, 1, 2, 3), True, 512), (8, (0, 2, 4), False, 512),
             (8, (0, 2, 4), True, 64), (8, DENSE8, False, 64), (8, DENSE8, True, 512)],
    "qwen3": [(3, (0,), True, 512), (8, (0, 2, 4), False, 64), (8, DENSE8, True, 512)],
    "qwen3_moe": [(3, (0, 1, 2, 3), False, 512), (8, (0, 2, 4), True, 512), (8, DENSE8, False, 64)],
}
GREEDY_CASES = [(f, *c) for f, cs in CONFIGS.items() for c in cs]


def run_with_arrivals(engine: LLMEngine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]
                      ) -> dict[str, tuple]:
    """Add requests at the given step numbers; run to completion. rid -> (Request, final output)."""
    reqs, final, step = {}, {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, params in arrivals.get(step, []):
            rid = engine.add_request(prompt, params)
            reqs[rid] = engine.requests[rid]
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 2000
    return {rid: (reqs[rid], final[rid]) for rid in reqs}


@pytest.mark.parametrize("family,k,levels,two_forward,budget", GREEDY_CASES,
                         ids=[f"{c[0]}-K{c[1]}-L{len(c[2])}-{'2f' if c[3] else '1f'}-b{c[4]}" for c in GREEDY_CASES])
def test_greedy_tidar_equals_transformers_generate(ckpts, family, k, levels, two_forward, budget):
    """Mixed requests arriving at different steps (different prompt lengths and max_tokens, one sampled
    neighbour that shares the batch) produce exactly transformers' greedy tokens."""
    ck = ckpts[family]
    engine = engine_for(ck, max_num_batched_tokens=budget,
                        tidar=static(k, levels, two_forward, fallback=budget < 512))
    greedy = [(prompt_of(5, 1), 21), (prompt_of(11, 2), 17), (prompt_of(3, 3), 25), (prompt_of(8, 4), 12)]
    sampled = SamplingParams(max_tokens=9, temperature=1.0, seed=7)
    arrivals = {0: [(greedy[0][0], SamplingParams(max_tokens=greedy[0][1])),
                    (greedy[1][0], SamplingParams(max_tokens=greedy[1][1]))],
                2: [(prompt_of(6, 9), sampled)],
                3: [(greedy[2][0], SamplingParams(max_tokens=greedy[2][1]))],
                7: [(greedy[3][0], SamplingParams(max_tokens=greedy[3][1]))]}
    done = list(run_with_arrivals(engine, arrivals).values())
    accepted = 0
    for (req, out) in done:
        if req.params.greedy:
            prompt, n = next(g for g in greedy if g[0] == req.prompt_token_ids)
            assert out.output_token_ids == ck.greedy(prompt, n)
            assert out.finish_reason == "length"
            accepted += out.stats.accepted
        else:
            assert len(out.output_token_ids) == 9 and out.finish_reason == "length"
    assert accepted > 0, "no draft was ever accepted: the comparison would be vacuous"
    assert_engine_idle(engine)


def streamed_logprobs(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[tuple]:
    """Run prompts together; per request (output tokens, the logprob entries of every step in order, accepted)."""
    rids = [engine.add_request(p, params) for p in prompts]
    tokens, entries, accepted = {r: [] for r in rids}, {r: [] for r in rids}, {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids)
            tokens[out.request_id] += out.new_token_ids
            entries[out.request_id] += out.logprobs
            if out.finished:
                accepted[out.request_id] = out.stats.accepted
    assert_engine_idle(engine)
    return [(tokens[r], entries[r], accepted[r]) for r in rids]


def assert_raw_logprobs(ck: Ckpt, prompt: list[int], tokens: list[int], entries: list, top: int) -> None:
    """Each entry is the log-softmax of transformers' logits at its position: the chosen token's value and
    the `top` most likely tokens of that row, in order."""
    rows = torch.log_softmax(ck.logits(prompt + tokens)[len(prompt) - 1 : -1], dim=-1)
    for row, t, e in zip(rows, tokens, entries, strict=True):
        assert e.token_id == t
        assert math.isclose(e.logprob, float(row[t]), abs_tol=1e-4)
        values, ids = row.topk(top)
        assert [i for i, _ in e.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in e.top]), values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_the_ar_rows_whether_drafts_are_accepted_or_not(ckpts, family):
    """Greedy TiDAR reports for each token, also the ones taken as accepted drafts, the log-probabilities of
    its verify row: what AR mode reports for the same tokens, and transformers' log-softmax at that position."""
    ck = ckpts[family]
    prompts, top = [prompt_of(5, 1), prompt_of(9, 2)], 3
    params = SamplingParams(max_tokens=16, logprobs=top)
    tidar = streamed_logprobs(engine_for(ck, tidar=static(4, (0, 2, 4))), prompts, params)
    ar = streamed_logprobs(make_engine(ck, mode="ar", block_size=BLOCK, kv_cache_bytes=1 << 20), prompts, params)
    assert sum(a for _, _, a in tidar) > 0, "no draft accepted: every token would come from a bonus row"
    for prompt, (t_tokens, t_entries, _), (a_tokens, a_entries, _) in zip(prompts, tidar, ar, strict=True):
        assert t_tokens == a_tokens == ck.greedy(prompt, 16)
        for t, a in zip(t_entries, a_entries, strict=True):
            assert t.token_id == a.token_id and math.isclose(t.logprob, a.logprob, abs_tol=1e-4)
            assert [i for i, _ in t.top] == [i for i, _ in a.top]
        assert_raw_logprobs(ck, prompt, t_tokens, t_entries, top)


def test_logprobs_under_sampling_and_logit_mixing_are_the_raw_ar_distribution(ckpts):
    """At T = 1.3 with top-k 2 and the mix sampler, a token may lie outside what the sampler could pick from a
    row's AR alone; what is reported is still the raw AR row (before temperature, top-k, mixing), finite."""
    ck = ckpts["zaya"]
    engine = engine_for(ck, tidar=static(4, (0, 2, 4), sampler="mix", mix_weight=0.5))
    params = SamplingParams(max_tokens=16, temperature=1.3, top_k=2, seed=3, logprobs=0)
    for prompt, (tokens, entries, _) in zip([prompt_of(7, 5)], streamed_logprobs(engine, [prompt_of(7, 5)], params),
                                            strict=True):
        assert all(math.isfinite(e.logprob) and e.top == () for e in entries)
        assert_raw_logprobs(ck, prompt, tokens, entries, 0)


def test_seeded_sampled_request_is_the_same_alone_and_in_a_greedy_batch(ckpts):
    """Verification runs batched (one argmax for the greedy requests, the sampled ones per request): a seeded
    T > 0 request must draw exactly the same tokens whether it runs alone or beside greedy requests."""
    ck = ckpts["zaya"]
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=11)
    alone = engine_for(ck, tidar=static(4, (0, 2))).generate([prompt_of(7, 5)], sampled)[0]
    batch = engine_for(ck, tidar=static(4, (0, 2))).generate(
        [prompt_of(9, 1), prompt_of(7, 5), prompt_of(4, 2)],
        [SamplingParams(max_tokens=20), sampled, SamplingParams(max_tokens=20)])
    assert batch[1].output_token_ids == alone.output_token_ids
    assert batch[0].output_token_ids == ck.greedy(prompt_of(9, 1), 20)


@pytest.mark.parametrize("family,two_forward", [("zaya", False), ("zaya", True), ("qwen3_moe", False)])
def test_greedy_equality_through_preemption(ckpts, family, two_forward):
    """A 64-token KV pool for four requests that each need ~30: requests are preempted (blocks and CCA
    state slot freed, recomputed later from their tokens, drafts kept) and still match transformers."""
    ck = ckpts[family]
    engine = engine_for(ck, kv_cache_bytes=pool_bytes(ck, 16), tidar=static(4, (0, 2, 4), two_forward))
    assert engine.blocks.num_blocks == 16
    jobs = [(prompt_of(9, 11), 20), (prompt_of(7, 12), 22), (prompt_of(10, 13), 18), (prompt_of(6, 14), 21)]
    arrivals = {0: [(p, SamplingParams(max_tokens=n)) for p, n in jobs[:3]],
                4: [(jobs[3][0], SamplingParams(max_tokens=jobs[3][1]))]}
    done = list(run_with_arrivals(engine, arrivals).values())
    assert sum(req.stats.preemptions for req, _ in done) > 0, "the pool was meant to force preemption"
    for (_req, out), (prompt, n) in zip(sorted(done, key=lambda d: d[0].arrival), jobs, strict=False):
        assert out.output_token_ids == ck.greedy(prompt, n)
    assert sum(out.stats.accepted for _, out in done) > 0
    assert_engine_idle(engine)


@pytest.mark.parametrize("family,two_forward", [("zaya", False), ("zaya", True), ("qwen3", False)])
def test_greedy_equality_with_the_past_read_in_place(ckpts, family, two_forward, monkeypatch):
    """TiDAR verify/proposal layouts attended with runs of past blocks read in place (PastView, thresholds
    shrunk to runs of >= 2 blocks and pieces of <= 3), in a pool small enough that trims and preemption
    scatter the blocks: greedy output is still transformers'."""
    import workers.layout

    monkeypatch.setattr(workers.layout, "VIEW_MIN_TOKENS", 2 * BLOCK)
    monkeypatch.setattr(workers.layout, "VIEW_PIECE_TOKENS", 3 * BLOCK)
    monkeypatch.setattr(workers.layout, "VIEW_MIN_STEP_TOKENS", 2 * BLOCK)
    ck = ckpts[family]
    engine = engine_for(ck, kv_cache_bytes=pool_bytes(ck, 16), tidar=static(4, (0, 2, 4), two_forward))
    jobs = [(prompt_of(19, 41), 20), (prompt_of(13, 42), 22), (prompt_of(24, 43), 18)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=n)) for p, n in jobs]
    reqs = [engine.requests[rid] for rid in rids]
    outs, views = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
        views += sum(len(g.views) for g in engine.runner._meta.groups)
    assert views >= 10, "the in-place path was meant to run"
    assert sum(req.stats.preemptions for req in reqs) > 0, "the pool was meant to force preemption"
    for rid, (prompt, n) in zip(rids, jobs, strict=True):
        assert outs[rid].output_token_ids == ck.greedy(prompt, n)
    assert sum(outs[rid].stats.accepted for rid in rids) > 0
    assert_engine_idle(engine)


@pytest.mark.parametrize("family,two_forward", [("zaya", False), ("qwen3_moe", True)])
def test_greedy_equality_under_the_adaptive_policy(ckpts, family, two_forward):
    """The default draft policy picks K and levels (down to AR) from measured timings, so the layouts
    differ from run to run; whatever it picks, greedy output is transformers'."""
    ck = ckpts[family]
    engine = engine_for(ck, tidar=dict(block_size=8, levels=(0, 2, 4, 8), two_forward=two_forward))
    jobs = [(prompt_of(5, 31), 24), (prompt_of(9, 32), 19), (prompt_of(4, 33), 30)]
    outs = engine.generate([p for p, _ in jobs], [SamplingParams(max_tokens=n) for _, n in jobs])
    for (p, n), out in zip(jobs, outs, strict=False):
        assert out.output_token_ids == ck.greedy(p, n)
    assert_engine_idle(engine)


def test_a_waiting_prompt_keeps_what_ar_would_give_it(ckpts):
    """Drafting only takes what a waiting prompt leaves of the step: with 128 tokens a step, K = 8 at
    levels (0, 4, 8) (36 slots per request, 72 for the two requests) would leave the 100-token prompt 92
    and prefill it over two steps; with the prompt's tokens kept for it, the schedule falls back to K = 2
    and the whole prompt goes in the step it arrives, as under AR, its tokens still transformers' greedy
    ones. A prompt longer than the step leaves nothing to draft with: that step is an AR step."""
    ck = ckpts["zaya"]
    rules = (DraftRule(max_batch=64, block_size=8, levels=(0, 4, 8)),
             DraftRule(max_batch=64, block_size=2, levels=(0,)))
    engine = engine_for(ck, max_num_batched_tokens=128, tidar=dict(block_size=8, levels=(0, 4, 8), schedule=rules))
    first, late = prompt_of(6, 41), prompt_of(100, 42)
    engine.add_request(first, SamplingParams(max_tokens=40))
    for _ in range(3):
        engine.step()  # the first request decodes, drafting at K = 8
    assert engine.scheduler.draft_rule(1, 128).block_size == 8
    b = engine.add_request(late, SamplingParams(max_tokens=8))
    batch = engine.scheduler.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in batch if s.request.request_id == b] == [(b, 100)]
    assert all(s.num_drafts <= 2 for s in batch)
    engine = engine_for(ck, max_num_batched_tokens=128, tidar=dict(block_size=8, levels=(0, 4, 8), schedule=rules))
    outs = engine.generate([first, late], [SamplingParams(max_tokens=40), SamplingParams(max_tokens=8)])
    assert [o.output_token_ids for o in outs] == [ck.greedy(first, 40), ck.greedy(late, 8)]

    engine = engine_for(ck, max_num_batched_tokens=128, tidar=dict(block_size=8, levels=(0, 4, 8), schedule=rules))
    engine.add_request(first, SamplingParams(max_tokens=40))
    for _ in range(3):
        engine.step()
    engine.add_request(prompt_of(200, 43), SamplingParams(max_tokens=8))
    batch = engine.scheduler.schedule()
    assert [s.num_tokens for s in batch] == [1, 127]  # one slot for the decode, the rest for the prompt
    assert all(s.num_drafts == 0 and not s.levels for s in batch)


def test_a_probe_drafts_for_two_requests_and_output_stays_ar(ckpts):
    """When drafting loses, the adaptive policy's probe (propose, then verify) drafts for the first two
    requests of the step only; the others decode as AR in the same step, and every output is transformers'
    greedy one."""
    ck = ckpts["zaya"]
    engine = engine_for(ck, tidar=dict(block_size=4, levels=(0,)))
    jobs = [(prompt_of(5 + i, 60 + i), 12) for i in range(4)]
    for p, n in jobs:
        engine.add_request(p, SamplingParams(max_tokens=n))
    engine.step()  # the four prompts prefill
    policy, schedule, seen = engine.policy, engine.scheduler.schedule, []

    def recorded():  # which requests of each step draft (verify drafts or propose them)
        batch = schedule()
        seen.append([s.num_drafts + len(s.levels) > 0 for s in batch])
        return batch

    engine.scheduler.schedule = recorded
    while engine.has_unfinished():
        policy.accept = [0.0] * len(policy.accept)  # no draft is ever accepted: AR wins, probes refresh
        policy.since_tidar = max(policy.since_tidar, policy.explore_every)  # a probe is due now
        engine.step()
    probes = [d for d in seen if any(d)]
    assert probes and all(sum(d) <= 2 and d[:sum(d)] == [True] * sum(d) for d in probes), seen
    assert any(len(d) == 4 and sum(d) == 2 for d in probes), seen

    engine = engine_for(ck, tidar=dict(block_size=4, levels=(0,)))
    engine.policy.accept = [0.0] * 4
    outs = engine.generate([p for p, _ in jobs], [SamplingParams(max_tokens=n) for _, n in jobs])
    assert [o.output_token_ids for o in outs] == [ck.greedy(p, n) for p, n in jobs]
    assert_engine_idle(engine)


PENALTIES = dict(presence=0.4, frequency=0.3, repetition=1.5)


def penalty_params(penalties: dict) -> dict:
    """SamplingParams' names for them."""
    return {f"{name}_penalty": value for name, value in penalties.items()}


def penalized_logits(z: list[float], prompt: list[int], output: list[int], presence: float, frequency: float,
                     repetition: float) -> list[float]:
    """The penalties from their definitions (vLLM's, which the OpenAI ones follow): a token of the prompt or
    the output has a positive logit divided by `repetition`, a negative one multiplied; then each output
    token loses `frequency` per occurrence and `presence` once."""
    out = []
    for t, x in enumerate(z):
        if t in prompt or t in output:
            x = x / repetition if x > 0 else x * repetition
        c = output.count(t)
        out.append(x - frequency * c - presence * (c > 0))
    return out


@torch.no_grad()
def penalized_greedy(ck: Ckpt, prompt: list[int], n: int, **penalties) -> list[int]:
    """Greedy decoding under penalties, one transformers forward per token."""
    out: list[int] = []
    for _ in range(n):
        z = penalized_logits(ck.logits(prompt + out)[-1].tolist(), prompt, out, **penalties)
        out.append(max(range(len(z)), key=z.__getitem__))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tidar_with_penalties_equals_ar_and_the_definition(ckpts, family):
    """Presence, frequency and repetition penalties applied to every verify row with the counts of the tokens
    before it (earlier drafts of the block included): TiDAR's greedy tokens are AR's and those of greedy
    decoding written from the definitions over transformers' logits; the penalties do change the output."""
    ck = ckpts[family]
    prompts = [prompt_of(5, 1), prompt_of(9, 2)]
    params = SamplingParams(max_tokens=16, **penalty_params(PENALTIES))
    tidar = engine_for(ck, tidar=static(4, (0, 2, 4))).generate(prompts, params)
    ar = make_engine(ck, mode="ar", block_size=BLOCK, kv_cache_bytes=1 << 20).generate(prompts, params)
    assert sum(o.stats.accepted for o in tidar) > 0, "no draft accepted: no row would count an earlier draft"
    changed = 0
    for prompt, t, a in zip(prompts, tidar, ar, strict=True):
        want = penalized_greedy(ck, prompt, 16, **PENALTIES)
        assert t.output_token_ids == a.output_token_ids == want
        changed += want != ck.greedy(prompt, 16)
    assert changed, "the penalties never changed a greedy output: the check would be vacuous"


def test_per_request_sampler_and_mix_weight(ckpts):
    """In one batch on a lossless engine: a request asking for the mix sampler at w = 1 is the lossless one
    (same tokens, same acceptance), one at w = 0.2 accepts more drafts and leaves AR's output; the
    engine's own setting stays for the rest. mix_weight with sampler lossless is refused."""
    ck = ckpts["zaya"]
    engine = engine_for(ck, tidar=static(4, (0, 2, 4)))
    prompt = prompt_of(7, 3)
    lossless, w1, mixed = engine.generate([prompt] * 3, [
        SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, sampler="mix", mix_weight=1.0),
        SamplingParams(max_tokens=24, mix_weight=0.2)])
    assert lossless.output_token_ids == w1.output_token_ids == ck.greedy(prompt, 24)
    assert lossless.stats.accepted == w1.stats.accepted
    assert mixed.stats.accepted > lossless.stats.accepted and mixed.output_token_ids != lossless.output_token_ids
    assert_engine_idle(engine)
    with pytest.raises(ValueError, match="mix_weight applies to sampler 'mix'"):
        SamplingParams(sampler="lossless", mix_weight=0.5)


def test_ar_mode_equals_transformers_and_never_drafts(ckpts):
    ck = ckpts["zaya"]
    engine = engine_for(ck, mode="ar")
    prompts = [prompt_of(5, 21), prompt_of(8, 22)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=15))
    for p, out in zip(prompts, outs, strict=False):
        assert out.output_token_ids == ck.greedy(p, 15)
        assert out.stats.drafted == 0 and out.stats.forwards == 15
    assert_engine_idle(engine)


# ---- 1b/4. injected drafts: long accepted runs, mid-block stops, rollback at every n -------------------


def drive_with_injection(engine: LLMEngine, ck: Ckpt, jobs: list[dict], k: int, seed: str) -> dict:
    """Run `jobs` ({prompt, params, ref, arrive}), overwriting each decode-ready request's drafts with
    ref (the reference continuation) corrupted at a random position j (j = k: uncorrupted), and check
    after each step that exactly j drafts were accepted and the request is rolled back exactly.

    The corruption positions cycle through 0..k in a seeded random order, so every n in 0..k occurs,
    full acceptance with a bonus token (j = k) included."""
    rng = random.Random(seed)
    cycle: list[int] = []  # corruption positions: every j in 0..k, in a shuffled order, again and again
    reqs: dict[str, dict] = {}
    final = {}
    injected: dict[str, tuple[int, int, int, int]] = {}  # rid -> (corruption j, accepted, drafted, len(output))
    truncated_mid_block = 0
    seen_n: set[int] = set()
    step = 0
    while step <= max(j["arrive"] for j in jobs) or engine.has_unfinished():
        for job in jobs:
            if job["arrive"] == step:
                rid = engine.add_request(job["prompt"], job["params"])
                reqs[rid] = dict(job, req=engine.requests[rid])
        injected.clear()
        for rid, info in reqs.items():
            req = info["req"]
            if req.status is not Status.RUNNING or req.num_computed_tokens != req.num_tokens - 1:
                continue  # only requests whose next chunk is the anchor verify drafts
            have = len(req.output_token_ids)
            drafts = info["ref"][have : have + k]
            assert len(drafts) == k, "the reference must run K past max_tokens"
            if not cycle:
                cycle = list(range(k + 1))
                rng.shuffle(cycle)
            j = cycle.pop()
            if j < k:
                drafts[j] = (drafts[j] + 1 + rng.randrange(V - 1)) % V  # any other token
            req.drafts = drafts
            req.draft_logits = torch.nn.functional.one_hot(torch.tensor(drafts), V).float() * 5.0
            injected[rid] = (j, req.stats.accepted, req.stats.drafted, have)
        outputs = engine.step()
        for out in outputs:
            rid = out.request_id
            req, ref = reqs[rid]["req"], reqs[rid]["ref"]
            if rid in injected:
                j, acc0, drafted0, have = injected[rid]
                n, offered = req.stats.accepted - acc0, req.stats.drafted - drafted0
                # greedy verification accepts exactly the drafts before the corruption (all K are offered
                # unless the context is nearly full)
                assert offered == k or offered == engine.max_model_len - len(req.prompt_token_ids) - have
                assert n == min(j, offered), (rid, n, j, offered)
                seen_n.add(n)
                expect_new = ref[have : have + n + 1]
                if out.finished:
                    assert out.new_token_ids == expect_new[: len(out.new_token_ids)]
                    if len(out.new_token_ids) < len(expect_new):
                        truncated_mid_block += 1
                else:
                    assert out.new_token_ids == expect_new
                    check_rollback(engine, req, ck)
                    if not engine.config.tidar.two_forward:
                        # the proposal with the largest level <= n supplies K + p - n drafts
                        levels = [p for p in engine.config.tidar.levels if p <= offered]
                        p = max(l for l in levels if l <= n)
                        assert req.stats.levels_chosen.get(p, 0) > 0
                        assert len(req.drafts) == k + p - n, (n, p, len(req.drafts))
                    else:
                        assert len(req.drafts) == k  # the draft pass drafts a full block
            elif not out.finished and req.status is Status.RUNNING:
                check_rollback(engine, req, ck)
            if out.finished:
                final[rid] = out
        step += 1
        assert step < 1000
    return dict(reqs=reqs, final=final, truncated=truncated_mid_block, seen_n=seen_n)


INJECT_CASES = [("zaya", 8, (0, 2, 4), False, False), ("zaya", 5, tuple(range(6)), True, False),
                ("zaya", 6, (0, 4, 2), False, False), ("zaya", 6, (0, 2, 4), False, True),
                ("qwen3", 8, (0, 3, 8), False, False), ("qwen3_moe", 6, (0, 2, 4), True, False),
                ("qwen3_moe", 4, (0, 1, 2, 3, 4), True, True)]


@pytest.mark.parametrize("family,k,levels,two_forward,tiny_pool", INJECT_CASES,
                         ids=[f"{c[0]}-K{c[1]}-{'-'.join(map(str, c[2]))}-{'2f' if c[3] else '1f'}"
                              f"{'-preempt' if c[4] else ''}"
                              for c in INJECT_CASES])
def test_injected_drafts_accept_exactly_and_roll_back(ckpts, family, k, levels, two_forward, tiny_pool):
    """Reference drafts with a corruption at j: exactly j are accepted, the output is transformers'
    greedy continuation, stop tokens and max_tokens inside an accepted block end the request there
    (nothing past it is emitted, finish_reason right), KV + CCA state roll back to the last accepted
    draft (logit-exact), and every block is free at the end. Levels given out of order (0, 4, 2) must
    still pick the largest level <= n. With a 64-token pool, requests are also preempted and recomputed
    (their drafts survive) and drafts are cut when the context is nearly full."""
    ck = ckpts[family]
    pool = {"kv_cache_bytes": pool_bytes(ck, 16)} if tiny_pool else {}
    engine = engine_for(ck, tidar=static(k, levels, two_forward), **pool)
    jobs = []
    # plain length limits that fall inside blocks
    for i, (plen, n, arrive) in enumerate([(6, 29, 0), (9, 23, 0), (4, 17, 3)]):
        p = prompt_of(plen, 100 + i)
        jobs.append(dict(prompt=p, params=SamplingParams(max_tokens=n), ref=ck.greedy(p, n + k + 1), arrive=arrive,
                         expect=ck.greedy(p, n), reason="length"))
    # a stop token: transformers' generate with that token as EOS is the reference
    p, stop = prompt_with_late_token(ck, 7, 200, 40, late=5)
    jobs.append(dict(prompt=p, params=SamplingParams(max_tokens=40, stop_token_ids=(stop,)),
                     ref=ck.greedy(p, 40 + k + 1), arrive=1, expect=ck.greedy(p, 40, eos=stop), reason="stop"))
    assert jobs[-1]["expect"][-1] == stop and len(jobs[-1]["expect"]) >= 7
    res = drive_with_injection(engine, ck, jobs, k, seed=f"{family}-{k}-{levels}-{two_forward}")
    for rid, info in res["reqs"].items():
        out = res["final"][rid]
        assert out.output_token_ids == info["expect"], rid
        assert out.finish_reason == info["reason"]
    assert res["truncated"] > 0, "no request ended inside an accepted block"
    assert res["seen_n"] == set(range(k + 1)), res["seen_n"]
    if tiny_pool:
        assert sum(info["req"].stats.preemptions for info in res["reqs"].values()) > 0
    assert_engine_idle(engine)


def test_unsorted_levels_pick_the_largest_level_not_above_n(ckpts):
    """Levels (0, 4, 2), K = 6, first draft corrupted at position 5: n = 5, so the level-4 block must
    supply the next K + 4 - 5 = 5 drafts (the level-2 block would give only 3)."""
    ck = ckpts["qwen3"]
    k = 6
    engine = engine_for(ck, tidar=static(k, (0, 4, 2)))
    p = prompt_of(6, 300)
    ref = ck.greedy(p, 20)
    rid = engine.add_request(p, SamplingParams(max_tokens=20))
    req = engine.requests[rid]
    engine.step()  # prefill -> first anchor
    have = len(req.output_token_ids)
    drafts = ref[have : have + k]
    drafts[5] = (drafts[5] + 1) % V
    req.drafts, req.draft_logits = drafts, torch.zeros(k, V)
    acc0 = req.stats.accepted
    [out] = engine.step()
    assert req.stats.accepted - acc0 == 5
    assert out.new_token_ids == ref[have : have + 6]
    assert req.stats.levels_chosen.get(4) == 1, req.stats.levels_chosen
    assert len(req.drafts) == k + 4 - 5


def test_eos_inside_an_accepted_block(ckpts, tmp_path):
    """config.json's eos_token_id ends a request inside an accepted block (transformers' generate with
    the same EOS is the reference); ignore_eos runs past it."""
    ck = ckpts["zaya"]
    p, eos = prompt_with_late_token(ck, 8, 400, 30, late=4)
    cont = ck.greedy(p, 30)
    path = tmp_path / "zaya_eos"
    shutil.copytree(ck.path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    engine = LLMEngine(EngineConfig(model=str(path), mode="tidar", block_size=BLOCK, tidar=static(8, (0, 4, 8))))
    assert eos in engine.eos_token_ids
    k = 8
    rid = engine.add_request(p, SamplingParams(max_tokens=30))
    rid2 = engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True))
    reqs = {rid: engine.requests[rid], rid2: engine.requests[rid2]}
    finals = {}
    while engine.has_unfinished():
        for r in reqs.values():  # uncorrupted reference drafts: whole blocks are accepted
            if r.status is Status.RUNNING and r.num_computed_tokens == r.num_tokens - 1:
                have = len(r.output_token_ids)
                r.drafts = ck.greedy(p, 30 + k + 1)[have : have + k]
                r.draft_logits = torch.zeros(k, V)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    expect = ck.greedy(p, 30, eos=eos)
    assert expect[-1] == eos and len(expect) < 30
    assert finals[rid].output_token_ids == expect and finals[rid].finish_reason == "stop"
    # the last step accepted a whole block of drafts but emitted only up to the EOS, which sits inside it
    last = finals[rid].new_token_ids
    assert 1 <= len(last) < k + 1 and last[-1] == eos, last
    assert reqs[rid].stats.accepted_by_position[-1] > 0  # some step accepted all K drafts
    assert finals[rid2].output_token_ids == cont and finals[rid2].finish_reason == "length"
    assert_engine_idle(engine)


# ---- 2. the lossless sampler is exact (statistics) ---------------------------------------------------


def chi2_sf(x: float, dof: int) -> float:
    """P(chi2_dof > x) = Q(dof/2, x/2), the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def chi2_pvalue(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
    """Pearson goodness of fit; cells with expected count < min_expected are pooled into one."""
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for key, p in probs.items():
        e = n * p
        o = counts.get(key, 0)
        if e < min_expected:
            pooled_obs += o
            pooled_exp += e
        else:
            cells.append((o, e))
    pooled_obs += sum(c for key, c in counts.items() if key not in probs)
    if pooled_exp > 0 or pooled_obs > 0:
        if pooled_exp == 0:
            return 0.0  # an impossible outcome was observed
        cells.append((pooled_obs, pooled_exp))
    if len(cells) == 1:  # a single possible outcome (e.g. after top-p): nothing to fit
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return chi2_sf(stat, len(cells) - 1)


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> list[float]:
    """Temperature then nucleus (top-p) filtering, from their definitions: keep the most probable tokens,
    in order, until their mass reaches top_p (the token that crosses it is kept), renormalise."""
    z = [float(x) / temperature for x in logits.double()]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    p = [x / s for x in e]
    if top_p < 1.0:
        keep, mass = set(), 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            if mass >= top_p:
                break
            keep.add(i)
            mass += p[i]
        p = [x if i in keep else 0.0 for i, x in enumerate(p)]
        s = sum(p)
        p = [x / s for x in p]
    return p


# -- unit level: workers.sampler.verify on fixed logits ----------------------------------------------

UNIT_V = 5


def _unit_logits():
    g = torch.Generator().manual_seed(2)
    ar = torch.randn(3, UNIT_V, generator=g) * 1.2  # rows for draft 1, draft 2, bonus
    dl = ar[:2] + torch.randn(2, UNIT_V, generator=g)  # diffusion logits behind the 2 drafts: a noisy AR
    return ar, dl


@pytest.mark.parametrize("temperature,top_p,draft_temperature", [(1.0, 1.0, 0.0), (1.0, 1.0, 1.0), (0.7, 0.8, 0.0),
                                                                  (1.0, 0.7, 1.3)])
def test_verify_unit_is_exact(temperature, top_p, draft_temperature):
    """With fixed AR rows p_0, p_1 (here independent of the drafts, a valid toy model) the first emitted
    token is distributed as p_0, the second (when draft 1 was accepted) as p_1, and draft 1 is accepted
    with probability p_0(d) (point-mass draft) or sum_x min(p_0, q_0)(x) (drafts sampled from q)."""
    ar, dl = _unit_logits()
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=4)
    p0, p1 = warp(ar[0], temperature, top_p), warp(ar[1], temperature, top_p)
    gen = torch.Generator().manual_seed(123)
    draft_gen = torch.Generator().manual_seed(321)
    sampled = draft_temperature > 0
    q = [torch.softmax(dl[i] / draft_temperature, -1) if sampled else None for i in range(2)]
    n_trials = 6000
    first, second, accepted_first, n_second = {}, {}, 0, 0
    for _ in range(n_trials):
        if sampled:
            drafts = [int(torch.multinomial(q[i], 1, generator=draft_gen)) for i in range(2)]
        else:
            drafts = dl.argmax(-1).tolist()
        n, tok = verify(ar, drafts, dl, params, gen, draft_temperature, 1.0)
        emitted = drafts[:n] + [tok]
        first[emitted[0]] = first.get(emitted[0], 0) + 1
        if n >= 1:
            accepted_first += 1
            if len(emitted) >= 2:
                second[emitted[1]] = second.get(emitted[1], 0) + 1
                n_second += 1
    probs0 = {t: p for t, p in enumerate(p0) if p > 0}
    probs1 = {t: p for t, p in enumerate(p1) if p > 0}
    assert set(first) <= set(probs0), "a token outside top-p was emitted"
    assert chi2_pvalue(first, probs0, n_trials) > 1e-3
    assert chi2_pvalue(second, probs1, n_second) > 1e-3
    if sampled:
        a = sum(min(p0[x], float(q[0][x])) for x in range(UNIT_V))
    else:
        a = p0[int(dl[0].argmax())]
    # accepted_first ~ Binomial(n_trials, a): within 4.5 sigma
    sd = math.sqrt(n_trials * a * (1 - a))
    assert abs(accepted_first - n_trials * a) < 4.5 * sd + 1, (accepted_first, n_trials * a)
    assert accepted_first > 0


def test_verify_unit_mix_departs_from_ar_and_follows_the_mixed_logits():
    """The mixing sampler (w = 0.25) is the same rule on w z_AR + (1 - w) z_D: the first token then
    follows softmax(mix), measurably not p_AR, so the exactness test above can fail."""
    ar, dl = _unit_logits()
    params = SamplingParams(temperature=1.0, max_tokens=4)
    gen = torch.Generator().manual_seed(9)
    drafts = dl.argmax(-1).tolist()
    n_trials, w = 4000, 0.25
    first = {}
    for _ in range(n_trials):
        n, tok = verify(ar, drafts, dl, params, gen, 0.0, w)
        t = (drafts[:n] + [tok])[0]
        first[t] = first.get(t, 0) + 1
    p_ar = dict(enumerate(warp(ar[0], 1.0, 1.0)))
    p_mix = dict(enumerate(warp(w * ar[0] + (1 - w) * dl[0], 1.0, 1.0)))
    assert chi2_pvalue(first, p_ar, n_trials) < 1e-3
    assert chi2_pvalue(first, p_mix, n_trials) > 1e-3


def test_verify_unit_greedy_accepts_up_to_the_first_mismatch():
    ar, _ = _unit_logits()
    best = ar.argmax(-1).tolist()
    params = SamplingParams(max_tokens=4)
    assert verify(ar, best[:2], None, params, None) == (2, best[2])
    assert verify(ar, [best[0], (best[1] + 1) % UNIT_V], None, params, None) == (1, best[1])
    assert verify(ar, [(best[0] + 1) % UNIT_V, best[1]], None, params, None) == (0, best[0])
    assert verify(ar[:1], [], None, params, None) == (0, best[0])


# -- end to end: the engine with a real model ----------------------------------------------------------

STAT_V = 5
STAT_PROMPT = [1, 3, 0, 2]
STAT_LEN = 3  # generated tokens
DRAFT_AR_WEIGHT, DRAFT_NOISE = 1.0, 1.5  # injected draft logits: a noisy, rescaled copy of the AR logits


@pytest.fixture(scope="module")
def stat_ckpt(tmp_path_factory) -> Ckpt:
    """A 1-layer ZAYA over 5 tokens (so every 3-token continuation can be enumerated) whose next-token
    distributions are spread (max prob ~0.5) and depend on the context."""
    dims = dict(DIMS, num_hidden_layers=1, initializer_range=0.3)
    path = tmp_path_factory.mktemp("tidar_stat") / "zaya5"
    hf = _hf_model("zaya", STAT_V, 2, dims)
    save(hf, path, mask_token_id=STAT_V - 1)
    return Ckpt("zaya", path, hf)


@pytest.fixture(scope="module")
def stat_rows(stat_ckpt) -> dict[tuple, torch.Tensor]:
    """transformers' next-token logits after the prompt + every generated prefix of length 0..2."""
    rows = {}
    n = len(STAT_PROMPT)
    for x1 in range(STAT_V):
        for x2 in range(STAT_V):
            logits = stat_ckpt.logits(STAT_PROMPT + [x1, x2])
            rows[()] = logits[n - 1]
            rows[(x1,)] = logits[n]
            rows[(x1, x2)] = logits[n + 1]
    return rows


def exact_sequence_probs(rows: dict, temperature: float, top_p: float, **penalties) -> dict[tuple, float]:
    """P(x1 x2 x3 | prompt) = prod_t warp(transformers logits, penalised after the prefix)_t, by enumeration."""
    if penalties:
        rows = {prefix: torch.tensor(penalized_logits(z.tolist(), STAT_PROMPT, list(prefix), **penalties))
                for prefix, z in rows.items()}
    w = {prefix: warp(z, temperature, top_p) for prefix, z in rows.items()}
    out = {}
    for x1 in range(STAT_V):
        for x2 in range(STAT_V):
            for x3 in range(STAT_V):
                pr = w[()][x1] * w[(x1,)][x2] * w[(x1, x2)][x3]
                if pr > 0:
                    out[(x1, x2, x3)] = pr
    assert abs(sum(out.values()) - 1) < 1e-6
    return out


def draft_model(rows: dict, context: tuple) -> torch.Tensor:
    """Injected draft logits z_D for the token after `context`: a fixed function of the context (as a
    real draft model is), a rescaled copy of transformers' logits plus noise seeded by the context, so
    the drafts are systematically wrong in a different way in each context."""
    seed = sum((t + 1) * STAT_V**i for i, t in enumerate(context))
    noise = torch.randn(STAT_V, generator=torch.Generator().manual_seed(seed))
    return DRAFT_AR_WEIGHT * rows[context] + DRAFT_NOISE * noise


def sample_engine(ck: Ckpt, rows: dict | None, n: int, temperature: float, top_p: float, sampler="lossless",
                  draft_temperature=0.0, seed0=0, **penalties) -> tuple[dict, int, int]:
    """n seeded generations of STAT_LEN tokens, all in flight together (K = 2, dense levels, one rule
    for any batch size so every decode step verifies drafts). Returns (sequence counts, drafts
    accepted, drafts offered).

    With `rows`, drafts are injected before every decode step: a noisy copy of transformers' AR logits
    for the draft positions serves as the draft logits z_D, and each draft is argmax z_D (point mass,
    draft_temperature 0) or drawn from q = softmax(z_D / T_D) with the test's own RNG. The drafts are
    then right often enough that acceptance and rejection both happen at a high rate; the verifier,
    commit and rollback are the engine's own."""
    engine = LLMEngine(EngineConfig(
        model=ck.path, mode="tidar", block_size=BLOCK, max_num_seqs=64, max_num_batched_tokens=1024,
        kv_cache_bytes=4 << 20,
        tidar=dict(block_size=2, levels=(0, 1, 2), sampler=sampler, mix_weight=0.25,
                   draft_temperature=draft_temperature,
                   schedule=(DraftRule(max_batch=64, block_size=2, levels=(0, 1, 2)),))))
    reqs = []
    for i in range(n):
        rid = engine.add_request(STAT_PROMPT, SamplingParams(max_tokens=STAT_LEN, temperature=temperature, top_p=top_p,
                                                             seed=seed0 + i, ignore_eos=True, **penalties))
        reqs.append(engine.requests[rid])
    g = torch.Generator().manual_seed(seed0 + 777)
    final = {}
    while engine.has_unfinished():
        if rows is not None:
            for req in engine.scheduler.running:
                if req.num_computed_tokens != req.num_tokens - 1:
                    continue
                out = tuple(req.output_token_ids)
                drafts, zs = [], []
                for _ in range(min(2, STAT_LEN - len(out))):
                    z = draft_model(rows, out + tuple(drafts))
                    if draft_temperature > 0:
                        d = int(torch.multinomial(torch.softmax(z / draft_temperature, -1), 1, generator=g))
                    else:
                        d = int(z.argmax())
                    drafts.append(d)
                    zs.append(z)
                req.drafts, req.draft_logits = drafts, torch.stack(zs)
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    counts: dict = {}
    for req in reqs:
        key = tuple(final[req.request_id].output_token_ids)
        assert len(key) == STAT_LEN
        counts[key] = counts.get(key, 0) + 1
    assert_engine_idle(engine)
    return counts, sum(r.stats.accepted for r in reqs), sum(r.stats.drafted for r in reqs)


STAT_CASES = [(1.0, 1.0, 0.0, True), (1.0, 1.0, 1.0, True), (1.0, 0.8, 0.0, True), (0.8, 0.9, 1.0, True),
              (1.0, 1.0, 0.0, False), (1.0, 1.0, 1.0, False)]


@pytest.mark.parametrize("temperature,top_p,draft_temperature,inject", STAT_CASES,
                         ids=[f"T{c[0]}-top_p{c[1]}-{'sampled' if c[2] else 'point-mass'}-"
                              f"{'injected' if c[3] else 'natural'}"
                              for c in STAT_CASES])
def test_lossless_end_to_end_matches_exact_distribution(stat_ckpt, stat_rows, temperature, top_p, draft_temperature,
                                                        inject):
    """1500 seeded 3-token generations through the engine fit the exact distribution computed from
    transformers' logits (chi-square p > 0.001). Injected drafts are accepted often (so the verifier's
    accept and resample rules decide most tokens); the model's own drafts are checked too."""
    n = 1500
    exact = exact_sequence_probs(stat_rows, temperature, top_p)
    counts, accepted, drafted = sample_engine(stat_ckpt, stat_rows if inject else None, n, temperature, top_p,
                                              draft_temperature=draft_temperature)
    assert set(counts) <= set(exact), "a sequence of probability 0 was generated"
    assert drafted >= n  # every request verified drafts at least once
    if inject:
        assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)  # both outcomes, often
    else:
        assert accepted > 0
    assert chi2_pvalue(counts, exact, n) > 1e-3


@pytest.mark.parametrize("draft_temperature", [0.0, 1.0], ids=["point-mass", "sampled"])
def test_lossless_with_penalties_matches_the_exact_penalised_distribution(stat_ckpt, stat_rows, draft_temperature):
    """At T = 1 with all three penalties, 1500 generations with injected drafts fit the distribution of
    penalised transformers logits (chi-square p > 0.001), and not the unpenalised one (p < 0.001)."""
    n, penalties = 1500, dict(presence=0.5, frequency=0.4, repetition=1.6)
    exact = exact_sequence_probs(stat_rows, 1.0, 1.0, **penalties)
    counts, accepted, drafted = sample_engine(
        stat_ckpt, stat_rows, n, 1.0, 1.0, draft_temperature=draft_temperature, seed0=20_000,
        **penalty_params(penalties))
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    assert chi2_pvalue(counts, exact, n) > 1e-3
    assert chi2_pvalue(counts, exact_sequence_probs(stat_rows, 1.0, 1.0), n) < 1e-3


@pytest.mark.parametrize("inject", [True, False], ids=["injected", "natural"])
def test_mix_sampler_end_to_end_departs_from_ar(stat_ckpt, stat_rows, inject):
    """The lossy mixing sampler (w = 0.25) on the same setup is rejected by the same test (p < 0.001):
    the statistical test can fail."""
    n = 1500
    exact = exact_sequence_probs(stat_rows, 1.0, 1.0)
    counts, accepted, _ = sample_engine(stat_ckpt, stat_rows if inject else None, n, 1.0, 1.0, sampler="mix",
                                        seed0=10_000)
    assert accepted > 0
    assert chi2_pvalue(counts, exact, n) < 1e-3


# ---- 5. mask token resolution and config validation ---------------------------------------------------


def test_mask_token_resolution(ckpts, tmp_path):
    ck = ckpts["qwen3"]
    bare = tmp_path / "no_mask"
    shutil.copytree(ck.path, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("mask_token_id")
    (bare / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(EngineStartError, match="--mask-token-id"):
        LLMEngine(EngineConfig(model=str(bare), mode="tidar"))
    # the override makes it run, and greedy output is still transformers'
    engine = LLMEngine(EngineConfig(model=str(bare), mode="tidar",
                                    tidar=dict(mask_token_id=3, block_size=4, levels=(0, 2))))
    assert engine.mask_token_id == 3
    p = prompt_of(5, 500)
    [out] = engine.generate([p], SamplingParams(max_tokens=10))
    assert out.output_token_ids == ck.greedy(p, 10)
    # AR mode never needs one
    [out] = LLMEngine(EngineConfig(model=str(bare), mode="ar")).generate([p], SamplingParams(max_tokens=10))
    assert out.output_token_ids == ck.greedy(p, 10)
    # an id outside the vocabulary is refused
    with pytest.raises(EngineStartError, match="outside the vocabulary"):
        LLMEngine(EngineConfig(model=str(bare), mode="tidar", tidar=dict(mask_token_id=V)))


def test_mask_token_lookup_order():
    from types import SimpleNamespace as NS

    assert resolve_mask_token(NS(mask_token_id=4, tidar_mask_token_id=9), None) == 9
    assert resolve_mask_token(NS(mask_token_id=4, diffusion_mask_token_id=6), None) == 6
    assert resolve_mask_token(NS(mask_token_id=4), None) == 4
    assert resolve_mask_token(NS(mask_token_id=4), 2) == 2
    assert resolve_mask_token(NS(mask_token_id=None), None) is None
    assert resolve_mask_token(NS(), None) is None


@pytest.mark.parametrize("tidar,match", [
    (dict(levels=(2, 4)), "levels must contain 0"),
    (dict(block_size=4, levels=(0, 5)), r"levels must be distinct values in \[0, block_size=4\]"),
    (dict(block_size=4, levels=(0, 2, 2)), "distinct"),
    (dict(block_size=0), "block_size"),
    (dict(mix_weight=0.0), "mix_weight"),
    (dict(sampler="fast"), "sampler"),
    (dict(schedule=[dict(max_batch=4, block_size=4, levels=(1,))]), "levels must contain 0"),
])
def test_bad_tidar_config_is_a_clear_error(tmp_path, tidar, match):
    with pytest.raises(InvalidRequest, match=match):
        EngineConfig.make(model=str(tmp_path), mode="tidar", tidar=tidar)
    with pytest.raises(ValueError, match=match):
        TidarConfig(**tidar)
