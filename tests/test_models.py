"""Our model implementations against transformers, logit for logit.

The runner is driven directly (no scheduler) so each test chooses exactly how tokens reach the model:
the whole prompt in one forward, prefill in chunks through the paged KV cache, or token-by-token
decode. Block tables are deliberately non-contiguous and interleaved between requests, and state
slots are not 0, so paging and per-request recurrent state are exercised. The reference is always
transformers' full-sequence forward of the same tokens.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import make_engine as conftest_make_engine
from transformers import AutoModelForCausalLM

from workers.config import SamplingParams
from workers.engine import LLMEngine
from workers.layout import StepLayout

BLOCK = 4
ATOL = 1e-4  # fp32 against fp32: observed differences are ~1e-5 at logit scale ~10


# kv_cache_bytes: >= 21 blocks of 4 tokens for every family (with the prefix cache's ZAYA snapshots)
make_engine = partial(conftest_make_engine, block_size=BLOCK, kv_cache_bytes=1 << 17)


def drive(engine: LLMEngine, seqs: list[dict], steps: list[dict[int, int]],
          groups: list[int] | None = None, views: list[int] | None = None) -> list[torch.Tensor]:
    """Feed each sequence's tokens in the given chunks; return the logits of every fed row, per sequence.

    seqs[i] = {"tokens": [...], "blocks": [...], "slot": s}; steps[k] = {seq index: tokens fed this step}.
    Every step is one `runner.forward` over all sequences that take part in it, then `runner.commit`.
    `groups` / `views`, when given, receive each step's number of attention groups / of past pieces read in place.
    """
    done = [0] * len(seqs)
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in steps:
        order = sorted(step)
        layouts = []
        for i in order:
            chunk = seqs[i]["tokens"][done[i] : done[i] + step[i]]
            assert len(chunk) == step[i] > 0
            layout = StepLayout.causal(chunk, done[i], True)
            layout.logit_rows = list(range(len(chunk)))
            layouts.append(layout)
        logits = engine.runner.forward(layouts, [done[i] for i in order], [seqs[i]["blocks"] for i in order],
                                       [seqs[i]["slot"] for i in order])
        engine.runner.commit([len(l.token_ids) - 1 for l in layouts])
        if groups is not None:
            groups.append(len(engine.runner._meta.groups))
        if views is not None:
            views.append(sum(len(g.views) for g in engine.runner._meta.groups))
        assert logits.dtype == torch.float32
        assert logits.shape == (sum(step.values()), engine.vocab_size)
        at = 0
        for i in order:
            rows[i].append(logits[at : at + step[i]])
            at += step[i]
            done[i] += step[i]
    for i, s in enumerate(seqs):
        assert done[i] == len(s["tokens"]), "the schedule must feed every token"
        assert len(s["blocks"]) * BLOCK >= len(s["tokens"])
    return [torch.cat(r) for r in rows]


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-5)
    # and the comparison is not vacuous: logits are far from constant
    assert ref.std() > 0.5


def test_weights_load_as_transformers_holds_them(ckpt):
    """Every weight of our model equals the transformers model's (fused experts, tied heads included)."""
    model = make_engine(ckpt).runner.model
    ours = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    theirs = ckpt.hf.state_dict()
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    missing = {k for k in theirs if "rotary_emb" not in k} - set(ours)
    assert not missing, sorted(missing)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], atol=0, rtol=0, msg=name)
    if ckpt.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fused_projections_hold_each_weight_once(ckpt):
    """The load-time fused q/k/v and gate/up weights are the only copy: each named weight is a view into its
    group's fused tensor, so fusing costs no memory (values: the test above)."""
    from workers.models.layers import LinearGroup

    model = make_engine(ckpt).runner.model
    groups = [v for m in model.modules() for v in vars(m).values() if isinstance(v, LinearGroup)]
    assert groups
    for group in groups:
        fused = group.frozen[0]
        for layer in group.layers:
            assert layer.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_prefill_whole_prompt_matches_transformers(ckpt):
    """(a) one forward over the whole prompt; logits of every row."""
    engine = make_engine(ckpt)
    tokens = ckpt.prompt(22, seed=1)
    [ours] = drive(engine, [{"tokens": tokens, "blocks": [5, 2, 7, 0, 11, 3], "slot": 2}], [{0: 22}])
    assert_logits_match(ours, ckpt.logits(tokens))


def test_chunked_prefill_through_paged_cache_matches_transformers(ckpt):
    """(b) two requests prefilled in 2-3 chunks each (chunk edges inside and on block edges), batched
    in the same forwards with different query and prefix lengths; the second then decodes while the
    first is still prefilling. Block ids are interleaved between the two requests."""
    engine = make_engine(ckpt)
    a = ckpt.prompt(21, seed=2)
    b = ckpt.prompt(17, seed=3)
    seqs = [
        {"tokens": a, "blocks": [5, 2, 7, 0, 9, 12], "slot": 1},
        {"tokens": b, "blocks": [3, 8, 1, 10, 6], "slot": 3},
    ]
    steps = [{0: 5}, {0: 7, 1: 8}, {1: 4}, {0: 9, 1: 3}, {1: 1}, {1: 1}]
    ours_a, ours_b = drive(engine, seqs, steps)
    assert_logits_match(ours_a, ckpt.logits(a))
    assert_logits_match(ours_b, ckpt.logits(b))


def test_token_by_token_decode_matches_transformers(ckpt):
    """(c) short prefill, then one token per forward through the paged cache; two requests decode
    side by side at different positions, each row compared with transformers on the full sequence."""
    engine = make_engine(ckpt)
    a = ckpt.prompt(19, seed=4)
    b = ckpt.prompt(14, seed=5)
    seqs = [
        {"tokens": a, "blocks": [9, 4, 0, 6, 2], "slot": 0},
        {"tokens": b, "blocks": [7, 1, 5, 3], "slot": 5},
    ]
    steps = [{0: 3}, {1: 1}] + [{0: 1, 1: 1}] * 13 + [{0: 1}] * 3
    ours_a, ours_b = drive(engine, seqs, steps)
    assert_logits_match(ours_a, ckpt.logits(a))
    assert_logits_match(ours_b, ckpt.logits(b))


def test_mixed_steps_in_several_attention_groups_match_transformers(ckpt, monkeypatch):
    """(d) prefill chunks of different lengths beside decodes, attended as separate padded groups (the
    group overhead set to 0 so even these small steps split): every row still equals transformers."""
    import workers.attention

    monkeypatch.setattr(workers.attention, "GROUP_OVERHEAD_CELLS", 0)
    engine = make_engine(ckpt)
    a, b, c = ckpt.prompt(20, seed=7), ckpt.prompt(26, seed=8), ckpt.prompt(9, seed=9)
    seqs = [
        {"tokens": a, "blocks": [4, 9, 1, 12, 6], "slot": 1},
        {"tokens": b, "blocks": [0, 7, 3, 11, 2, 14, 13], "slot": 4},
        {"tokens": c, "blocks": [8, 5, 10], "slot": 2},
    ]
    steps = [{0: 2, 2: 5}, {0: 1, 1: 17, 2: 3}, {0: 1, 1: 1, 2: 1}, {0: 16, 1: 8}]
    groups: list[int] = []
    ours = drive(engine, seqs, steps, groups)
    assert max(groups) >= 3, groups
    for tokens, logits in zip((a, b, c), ours, strict=False):
        assert_logits_match(logits, ckpt.logits(tokens))


def test_past_read_in_place_matches_transformers(ckpt, monkeypatch):
    """(e) long runs of consecutive past blocks are attended in place (PastView) and merged with the copied
    rest by log-sum-exp. Thresholds shrunk to this tiny cache (runs of >= 2 blocks, pieces of <= 3): runs
    ascending and descending in the table, split into pieces, beside scattered blocks and a partial last
    block; decodes and short chunks; a request with views shares steps with one without."""
    force_views(monkeypatch)
    prompts, seqs, steps = view_case(ckpt)
    views: list[int] = []
    ours = drive(make_engine(ckpt), seqs, steps, views=views)
    assert sum(v > 0 for v in views) >= 5 and max(views) >= 3, views  # the in-place path ran, in most steps
    for tokens, logits in zip(prompts, ours, strict=True):
        assert_logits_match(logits, ckpt.logits(tokens))


def force_views(monkeypatch) -> None:
    """Read-in-place thresholds shrunk to the tiny test cache: runs of >= 2 blocks, pieces of <= 3."""
    import workers.layout

    monkeypatch.setattr(workers.layout, "VIEW_MIN_TOKENS", 2 * BLOCK)
    monkeypatch.setattr(workers.layout, "VIEW_PIECE_TOKENS", 3 * BLOCK)
    monkeypatch.setattr(workers.layout, "VIEW_MIN_STEP_TOKENS", 2 * BLOCK)


def view_case(ckpt) -> tuple[list[list[int]], list[dict], list[dict[int, int]]]:
    """Three sequences whose block tables hold runs for views, and the steps that feed them."""
    a, b, c = ckpt.prompt(27, seed=10), ckpt.prompt(22, seed=11), ckpt.prompt(12, seed=12)
    seqs = [
        {"tokens": a, "blocks": [3, 4, 5, 6, 7, 0, 9], "slot": 1},  # a 5-block run (two pieces), then scattered
        {"tokens": b, "blocks": [15, 14, 13, 1, 11, 19], "slot": 3},  # a descending run of 3
        {"tokens": c, "blocks": [8, 17, 2], "slot": 0},  # no run: always copied
    ]
    steps = [{0: 10, 1: 9, 2: 5}, {0: 9, 1: 6, 2: 1}] + [{0: 1, 1: 1, 2: 1}] * 3 + [{0: 5, 1: 4, 2: 3}]
    return [a, b, c], seqs, steps


def test_past_read_in_place_in_bf16_is_as_close_to_transformers_as_the_copy(ckpt, monkeypatch):
    """bf16 caches read their past in place on CPU too: the same steps as above, with views forced and with
    every block copied, both in bf16. Against transformers' fp32 logits, the in-place read must be as close as
    the copy (bf16 rounding is the error both share; the merge by log-sum-exp runs in fp32)."""
    prompts, seqs, steps = view_case(ckpt)
    copied = drive(make_engine(ckpt, dtype="bfloat16"), seqs, steps)
    force_views(monkeypatch)
    views: list[int] = []
    in_place = drive(make_engine(ckpt, dtype="bfloat16"), seqs, steps, views=views)
    assert sum(v > 0 for v in views) >= 5, views
    for tokens, ours, base in zip(prompts, in_place, copied, strict=True):
        ref = ckpt.logits(tokens)
        err, base_err = (ours.float() - ref).abs().mean(), (base.float() - ref).abs().mean()
        assert err <= 1.25 * base_err + 1e-3, (err, base_err)
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("kernel", ["portable", "cpu_flash"])
def test_attention_with_log_sum_exp_equals_torch(kernel):
    """Both kernels that attend with a log-sum-exp (the portable one used off CPU, SDPA's CPU flash kernel on
    CPU) equal softmax attention written out, on strided keys, and the log-sum-exp torch.logsumexp of its scores."""
    from workers.attention import _attention_with_lse, _softmax_attention

    attend = _softmax_attention if kernel == "portable" else _attention_with_lse
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((3, 2, 5, 64), (3, 2, 40, 64), (3, 2, 40, 64)))
    keep = torch.rand(3, 1, 5, 40, generator=g) > 0.5
    keep[..., 0] = True  # every row sees a key
    additive = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    out, lse = attend(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, 0.125, additive)
    scores = q @ k.transpose(-1, -2) * 0.125 + additive  # the reference, written out (SDPA on CPU is the same kernel)
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1, keepdim=True))


def test_single_token_prompt_matches_transformers(ckpt):
    """A 1-token prefill (ZAYA's conv and delayed value start cold) then decode."""
    engine = make_engine(ckpt)
    tokens = ckpt.prompt(6, seed=6)
    [ours] = drive(engine, [{"tokens": tokens, "blocks": [4, 1], "slot": 1}], [{0: 1}] * 6)
    assert_logits_match(ours, ckpt.logits(tokens))


def test_bfloat16_loads_runs_and_tracks_transformers(ckpt):
    """bf16: logits track transformers loaded in bf16 and fed the same chunks through its own cache
    (bf16 GEMMs round differently for different row counts, so the chunking must be the same), stay
    loosely close to fp32, and generation runs."""
    engine = make_engine(ckpt, dtype="bfloat16")
    assert engine.runner.model.model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = ckpt.prompt(16, seed=7)
    [ours] = drive(engine, [{"tokens": tokens, "blocks": [3, 0, 2, 1], "slot": 0}], [{0: 10}, {0: 6}])

    hf_bf16 = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        first = hf_bf16(input_ids=torch.tensor([tokens[:10]]), use_cache=True)
        second = hf_bf16(input_ids=torch.tensor([tokens[10:]]), past_key_values=first.past_key_values, use_cache=True)
    ref_bf16 = torch.cat([first.logits[0], second.logits[0]]).float()
    # within two bf16 steps at the largest logit: CPUs differ in how their bf16 GEMM kernels round (AMX,
    # AVX512-BF16, emulation), and that shifts single logits by an ulp or so after a few layers
    ulp = 2.0 ** (math.floor(math.log2(ref_bf16.abs().max().item())) - 7)
    torch.testing.assert_close(ours, ref_bf16, atol=2 * ulp, rtol=0)

    ref_fp32 = ckpt.logits(tokens)
    cos = torch.nn.functional.cosine_similarity(ours, ref_fp32, dim=-1)
    assert cos.mean() > 0.98, cos
    assert (ours.argmax(-1) == ref_fp32.argmax(-1)).float().mean() >= 0.75

    [out] = engine.generate([tokens], SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out.output_token_ids) == 6 and all(0 <= t < ckpt.vocab_size for t in out.output_token_ids)


def test_zaya_skip_expert_is_exercised(checkpoints):
    """The ZAYA checkpoints really route some tokens to the skip expert under transformers (HF gives
    them routing weight 0), so the logit tests above cover that path too."""
    for name in ("zaya", "zaya_untied"):
        ck = checkpoints[name]
        weights = []
        hooks = [layer.mlp.gate.register_forward_hook(
                     lambda mod, inp, out, weights=weights: weights.append(out[1].flatten()))
                 for layer in ck.hf.model.layers]
        try:
            ck.logits(ck.prompt(40, seed=8))
        finally:
            for h in hooks:
                h.remove()
        skipped = int((torch.cat(weights) == 0).sum())
        assert 0 < skipped < torch.cat(weights).numel() // 2, (name, skipped)
