"""Greedy generation through the whole engine (scheduler, paged KV, chunked prefill, preemption)
equals transformers' `generate(do_sample=False)`, token for token."""

from __future__ import annotations

from functools import partial

from conftest import make_engine as conftest_make_engine

from workers.config import SamplingParams

BLOCK = 4
MIN_DISTINCT = 5  # a reference with fewer distinct tokens would make the comparison weak


make_engine = partial(conftest_make_engine, block_size=BLOCK, kv_cache_bytes=1 << 20, max_num_batched_tokens=16)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_reference_is_not_degenerate(ckpt):
    """The tiny random checkpoints produce varied greedy text under transformers."""
    for seed, length in ((10, 5), (11, 12)):
        ref = ckpt.greedy(ckpt.prompt(length, seed), 20)
        assert len(set(ref)) >= MIN_DISTINCT, ref


def test_batched_generate_matches_transformers(ckpt):
    """Prompts of different lengths submitted together; the 16-token budget chunks the long prompts
    and mixes their prefill with the others' decode."""
    prompts = [ckpt.prompt(n, seed=20 + n) for n in (1, 6, 13, 27)]
    lengths = [14, 20, 9, 17]
    engine = make_engine(ckpt)
    outs = engine.generate(prompts, [greedy(n) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, outs, strict=False):
        ref = ckpt.greedy(prompt, n)
        assert out.finished and out.finish_reason == "length"
        assert out.prompt_token_ids == prompt
        assert out.output_token_ids == ref
    assert len(set(ckpt.greedy(prompts[3], 17))) >= MIN_DISTINCT


def test_staggered_arrivals_match_transformers(ckpt):
    """Requests arrive while others are mid-prefill or decoding; only two run at once (so ZAYA state
    slots and KV blocks are reused by later requests); streamed deltas add up to transformers' output."""
    engine = make_engine(ckpt, max_num_seqs=2)
    plan = {  # step index -> requests added before that step: (prompt length, seed, max_tokens)
        0: [(19, 30, 12)],
        2: [(7, 31, 15)],
        3: [(3, 32, 10), (22, 33, 8)],
        9: [(11, 34, 16)],
    }
    prompts, lengths, streamed, final = {}, {}, {}, {}
    step = 0
    while step <= max(plan) or engine.has_unfinished():
        for length, seed, n in plan.get(step, []):
            prompt = ckpt.prompt(length, seed)
            rid = engine.add_request(prompt, greedy(n))
            prompts[rid], lengths[rid], streamed[rid] = prompt, n, []
        outputs = engine.step()
        for out in outputs:
            assert out.request_id not in final, "no output after finishing"
            streamed[out.request_id] += out.new_token_ids
            assert out.output_token_ids == streamed[out.request_id]
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 500
    assert set(final) == set(prompts)
    for rid, out in final.items():
        ref = ckpt.greedy(prompts[rid], lengths[rid])
        assert streamed[rid] == out.output_token_ids == ref, rid


def test_preemption_under_tiny_kv_pool_matches_transformers(ckpt):
    """A KV pool of 64 KiB (the smallest allowed: 21-32 blocks of 4 tokens here) that four requests
    outgrow together: running requests get preempted, recomputed from their tokens, and still
    produce transformers' tokens."""
    kv_bytes = 1 << 16
    engine = make_engine(ckpt, kv_cache_bytes=kv_bytes, max_num_batched_tokens=32)
    num_blocks = kv_bytes // ckpt.kv_bytes_per_block(BLOCK)
    assert engine.blocks.num_blocks == num_blocks
    capacity = num_blocks * BLOCK  # tokens the whole pool holds
    # each request alone needs about half the pool; all four together need about twice of it
    plen, n = capacity // 4, capacity // 4
    prompts = [ckpt.prompt(plen + i, seed=40 + i) for i in range(4)]
    assert all(len(p) + n <= engine.max_model_len for p in prompts)
    ids = [engine.add_request(p, greedy(n)) for p in prompts]
    requests = [engine.requests[i] for i in ids]  # kept: finished requests leave engine.requests
    final = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        assert engine.blocks.num_free_blocks >= 0
        steps += 1
        assert steps < 1000
    preemptions = sum(r.stats.preemptions for r in requests)
    assert preemptions > 0, "the pool was meant to be too small for all requests at once"
    for rid, prompt in zip(ids, prompts, strict=True):
        assert final[rid].output_token_ids == ckpt.greedy(prompt, n), rid
    # everything was given back
    assert engine.blocks.num_free_blocks == num_blocks


def test_tidal_generate_runs_the_shipped_model_with_tidar_and_matches_transformers(tmp_path, capsys):
    """The README's main job: `tidal generate` on the shipped TiDAR model decodes with TiDAR by default
    (the model names a mask token), and its greedy output is transformers' AR greedy output."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tidal import cli

    assert cli.auto_mode(str(cli.DEFAULT_MODEL), None) == "tidar"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert cli.auto_mode(str(tmp_path), None) == "ar" and cli.auto_mode(str(tmp_path), 7) == "tidar"

    assert cli.main(["generate", "--prompt", "def fib(n):", "--max-tokens", "40", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 40 and out["stats"]["generated_tokens"] == 40

    hf = AutoModelForCausalLM.from_pretrained(str(cli.DEFAULT_MODEL)).eval()
    prompt = out["prompt_token_ids"]
    gen = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      generation_config=gen)[0, len(prompt):].tolist()
    assert out["token_ids"] == ref

    # --stop: the text ends before the stop string, at the token the reference (every prefix decoded) names
    from conftest import stop_by_prefixes

    from workers.loader import load_tokenizer

    tokenizer = load_tokenizer(cli.DEFAULT_MODEL)
    full = tokenizer.decode(ref)
    stop = full[20:23]
    want_text, want_tokens = stop_by_prefixes(tokenizer, ref, (stop,))
    args = ["generate", "--prompt", "def fib(n):", "--max-tokens", "40", "--ignore-eos", "--json", "--stop", stop,
            "--logprobs", "2"]
    assert cli.main(args) == 0
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == want_text
    assert stopped["token_ids"] == ref[:want_tokens]
    # --logprobs: greedy picks each row's most likely token, so it leads its own alternatives
    assert [e["token_id"] for e in stopped["logprobs"]] == stopped["token_ids"]
    assert all(e["top"][0] == [e["token_id"], e["logprob"]] and len(e["top"]) == 2 for e in stopped["logprobs"])
