"""Bad input gets a clear error, and the engine keeps serving afterwards.

- SamplingParams / EngineConfig from untrusted input: InvalidRequest naming the offending field.
- Model directories that are missing, incomplete or not ours: ModelLoadError saying what is wrong.
- add_request with a bad prompt or a duplicate id: InvalidRequest, nothing queued, nothing leaked,
  and a valid request still completes on the same engine.
- Aborting a running request frees its KV while its neighbours run on to their full length.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import assert_engine_idle
from conftest import make_engine as conftest_make_engine
from safetensors.torch import load_file, save_file

from workers.backends import EngineStartError
from workers.config import EngineConfig, InvalidRequest, SamplingParams
from workers.engine import LLMEngine
from workers.loader import ModelLoadError

VOCAB = 64
MAX_MODEL_LEN = 16



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 written by transformers (no EOS, so every request runs to its max_tokens)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("err-qwen3")
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


make_engine = partial(conftest_make_engine, block_size=4, max_model_len=MAX_MODEL_LEN)


@pytest.fixture
def engine(model_dir) -> LLMEngine:
    return make_engine(model_dir)


def assert_still_serves(engine: LLMEngine) -> None:
    """A valid request completes with its full length, and the engine is left with nothing held."""
    assert_engine_idle(engine)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5))[0]
    assert out.finished and out.finish_reason == "length" and len(out.output_token_ids) == 5
    assert_engine_idle(engine)


# ---- sampling parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": 1 << 64}, "seed"),  # torch.Generator.manual_seed cannot take it
    ({"stop_token_ids": "abc"}, "stop_token_ids"),
    ({"foo": 1}, "foo"),
    ({"maxtokens": 5}, "maxtokens"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams.make(**kwargs)
    msg = str(info.value)
    assert msg.startswith("invalid sampling parameters: ")
    assert field in msg
    assert "\n" not in msg  # one readable line, not pydantic's report
    assert isinstance(info.value, ValueError)


def test_several_bad_sampling_params_are_all_named():
    with pytest.raises(InvalidRequest) as info:
        SamplingParams.make(max_tokens=0, top_p=2.0, bogus=True)
    msg = str(info.value)
    assert "max_tokens" in msg and "top_p" in msg and "bogus" in msg


def test_valid_sampling_params_and_none_means_default():
    p = SamplingParams.make(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=None)
    assert p == SamplingParams(max_tokens=1)
    assert p.greedy
    q = SamplingParams.make(max_tokens=None, temperature=0.7, top_p=0.9, top_k=5, seed=-1)
    assert q.max_tokens == SamplingParams().max_tokens and not q.greedy


@pytest.mark.parametrize("kwargs,field", [
    ({"block_size": 0}, "block_size"),
    ({"kv_cache_bytes": 1024}, "kv_cache_bytes"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 4}, "max_num_batched_tokens"),
    ({"max_model_len": 1}, "max_model_len"),
    ({"dtype": "float64"}, "dtype"),
    ({"mode": "beam"}, "mode"),
    ({"blocksize": 16}, "blocksize"),
])
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(InvalidRequest) as info:
        EngineConfig.make(model="/nowhere", **kwargs)
    assert str(info.value).startswith("invalid engine configuration: ") and field in str(info.value)


def test_kv_pool_too_small_for_two_blocks(model_dir):
    # 64 KiB of KV, but 2 layers x 1 kv head x 16 dims x fp32 x 512-token blocks = 128 KiB per block
    with pytest.raises(EngineStartError, match="fewer than 2 KV blocks"):
        make_engine(model_dir, block_size=512, kv_cache_bytes=1 << 16)


# ---- model directories -------------------------------------------------------------------------------


@pytest.fixture
def broken_dir(model_dir, tmp_path) -> Path:
    """A private copy of the good checkpoint, to break."""
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    return path


def edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def load_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        LLMEngine(EngineConfig(model=str(path)))
    return str(info.value)


def test_missing_directory(tmp_path):
    msg = load_error(tmp_path / "no-such-model")
    assert "not found" in msg and "no-such-model" in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = load_error(tmp_path / "empty")
    assert "config.json" in msg


def test_malformed_config_json(broken_dir):
    (broken_dir / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], ')
    msg = load_error(broken_dir)
    assert "config.json" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{}", '{"architectures": []}', '"Qwen3ForCausalLM"'])
def test_config_json_naming_no_architecture(broken_dir, content):
    (broken_dir / "config.json").write_text(content)
    assert "architectures" in load_error(broken_dir)


def test_unsupported_architecture(broken_dir):
    edit_config(broken_dir, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    msg = load_error(broken_dir)
    assert "LlamaForCausalLM" in msg and "not supported" in msg
    assert "Qwen3ForCausalLM" in msg  # and says what is


def test_architectures_must_be_a_list(broken_dir):
    edit_config(broken_dir, lambda c: c.update(architectures="Qwen3ForCausalLM"))
    assert "architectures" in load_error(broken_dir)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads"])
def test_config_missing_a_required_field(broken_dir, key):
    edit_config(broken_dir, lambda c: c.pop(key))
    assert key in load_error(broken_dir)


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 0), ("num_key_value_heads", 0), ("vocab_size", "64"),
                                       ("hidden_size", -32)])
def test_config_with_a_nonsense_size(broken_dir, key, value):
    edit_config(broken_dir, lambda c: c.update({key: value}))
    assert key in load_error(broken_dir)


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(use_sliding_window=True, sliding_window=8), "sliding-window"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}), "yarn"),
])
def test_config_features_we_do_not_support(broken_dir, edit, words):
    edit_config(broken_dir, edit)
    msg = load_error(broken_dir)
    assert words in msg and "Qwen3ForCausalLM" in msg


def test_missing_safetensors(broken_dir):
    (broken_dir / "model.safetensors").unlink()
    msg = load_error(broken_dir)
    assert "model.safetensors" in msg


def test_sharded_checkpoint_missing_a_shard(broken_dir):
    weights = load_file(broken_dir / "model.safetensors")
    (broken_dir / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, broken_dir / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (broken_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    LLMEngine(EngineConfig(model=str(broken_dir)))  # the sharded copy loads

    (broken_dir / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(broken_dir)
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg

    (broken_dir / "model.safetensors.index.json").write_text("{ not json")
    assert "malformed" in load_error(broken_dir)


def test_checkpoint_missing_a_weight(broken_dir):
    weights = load_file(broken_dir / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken_dir / "model.safetensors", metadata={"format": "pt"})
    msg = load_error(broken_dir)
    assert "lacks 1 weights" in msg and "model.layers.1.mlp.down_proj.weight" in msg


def test_checkpoint_weight_with_the_wrong_shape(broken_dir):
    weights = load_file(broken_dir / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(31)
    save_file(weights, broken_dir / "model.safetensors", metadata={"format": "pt"})
    msg = load_error(broken_dir)
    assert "model.norm.weight" in msg and "(31,)" in msg and "(32,)" in msg


def test_checkpoint_weight_that_belongs_to_another_model(broken_dir):
    weights = load_file(broken_dir / "model.safetensors")
    weights["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(weights, broken_dir / "model.safetensors", metadata={"format": "pt"})
    msg = load_error(broken_dir)
    assert "model.layers.7.self_attn.q_proj.weight" in msg and "does not belong" in msg


def test_config_that_disagrees_with_the_weights(broken_dir):
    edit_config(broken_dir, lambda c: c.update(hidden_size=48))
    assert "shape" in load_error(broken_dir)


@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_corrupt_safetensors(broken_dir, corrupt):
    f = broken_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"not a safetensors file" * 4 if corrupt == "garbage" else data[: len(data) // 2])
    msg = load_error(broken_dir)
    assert "cannot read" in msg and "model.safetensors" in msg


def test_a_good_directory_loads_after_bad_ones(model_dir, tmp_path):
    with pytest.raises(ModelLoadError):
        LLMEngine(EngineConfig(model=str(tmp_path / "missing")))
    assert_still_serves(make_engine(model_dir))


# ---- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,words", [
    ([], "empty"),
    ([VOCAB], "out of range"),
    ([1, 2, -1], "out of range"),
    ([1, 10**12], "out of range"),
    ([1.5, 2], "out of range"),
    (["a", 2], "out of range"),
    ("hello", "tokenizer"),  # this directory has no tokenizer.json: text prompts cannot be encoded
    (list(range(MAX_MODEL_LEN)), "context"),  # no room for a single generated token
    (list(range(40)), "context"),
])
def test_bad_prompt_is_refused_and_the_engine_keeps_serving(engine, prompt, words):
    # a request in flight must not be disturbed by the refusal
    live = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4), request_id="live")
    engine.step()
    before = (engine.blocks.num_free_blocks, len(engine.scheduler.waiting), len(engine.scheduler.running))
    with pytest.raises(InvalidRequest) as info:
        engine.add_request(prompt, SamplingParams(max_tokens=3), request_id="bad")
    assert words in str(info.value)
    assert "bad" not in engine.requests  # nothing was queued ...
    assert (engine.blocks.num_free_blocks, len(engine.scheduler.waiting), len(engine.scheduler.running)) == before

    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert set(outs) == {live} and len(outs[live].output_token_ids) == 4
    assert_still_serves(engine)
    engine.add_request([1], SamplingParams(max_tokens=1), request_id="bad")  # ... so the id is still free
    engine.generate([[2]], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    assert_engine_idle(engine)


def test_prompt_at_the_context_limit(engine):
    """max_model_len - 1 prompt tokens leave room for exactly one generated token."""
    out = engine.generate([list(range(MAX_MODEL_LEN - 1))], SamplingParams(max_tokens=10))[0]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 1
    out = engine.generate([list(range(MAX_MODEL_LEN - 4))], SamplingParams(max_tokens=10))[0]
    assert len(out.output_token_ids) == 4 and len(out.prompt_token_ids) + 4 == MAX_MODEL_LEN
    assert_engine_idle(engine)


def test_tiny_temperature_does_not_break_the_step(engine):
    """A legal but tiny temperature must neither crash sampling (inf / NaN) nor stall its batch."""
    other = engine.add_request([1, 2, 3], SamplingParams(max_tokens=6), request_id="other")
    for t in (1e-30, 1e-40, 5e-324):
        engine.add_request([1, 2, 3], SamplingParams.make(max_tokens=6, temperature=t, seed=0), request_id=f"t{t}")
    outs = {}
    for _ in range(100):
        if not engine.has_unfinished():
            break
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert len(outs) == 4 and all(len(o.output_token_ids) == 6 for o in outs.values())
    # near zero temperature is greedy
    assert all(o.output_token_ids == outs[other].output_token_ids for o in outs.values())
    assert_still_serves(engine)


def test_generate_with_one_bad_prompt_leaves_nothing_behind(engine):
    with pytest.raises(InvalidRequest):
        engine.generate([[1, 2, 3], [4, 5], [VOCAB + 1]], SamplingParams(max_tokens=3))
    assert_still_serves(engine)  # the two valid prompts were withdrawn, not left running unowned


def test_invalid_sampling_params_leave_the_engine_untouched(engine):
    with pytest.raises(InvalidRequest):
        engine.add_request([1, 2, 3], SamplingParams.make(max_tokens=-5))
    assert_still_serves(engine)


def test_duplicate_request_id_is_refused(engine):
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=5), request_id="dup")
    assert rid == "dup"
    engine.step()
    with pytest.raises(InvalidRequest, match="'dup' is already in use"):
        engine.add_request([7, 8], SamplingParams(max_tokens=2), request_id="dup")
    assert engine.requests["dup"].prompt_token_ids == [1, 2, 3]  # the first one is untouched
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.prompt_token_ids, len(o.output_token_ids)) for o in outs] == [("dup", [1, 2, 3], 5)]
    assert_engine_idle(engine)
    # once finished the id is free again
    engine.add_request([7, 8], SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(InvalidRequest):
        engine.add_request([9], SamplingParams(max_tokens=2), request_id="dup")  # waiting counts as in use too
    while engine.has_unfinished():
        engine.step()
    assert_still_serves(engine)


# ---- abort -----------------------------------------------------------------------------------------


def held_blocks(engine: LLMEngine) -> set[int]:
    """Blocks some request holds (a cached block nobody holds is not held: it is evictable)."""
    return {b for b, refs in enumerate(engine.blocks.ref_counts) if refs}


@pytest.mark.parametrize("mode", ["ar", "tidar"])
def test_abort_mid_generation_frees_blocks_while_the_other_request_completes(model_dir, mode):
    kw = ({"mode": "tidar", "tidar": {"block_size": 2, "levels": (0, 1), "mask_token_id": VOCAB - 1}}
          if mode == "tidar" else {})
    engine = make_engine(model_dir, max_model_len=64, **kw)
    a = engine.add_request(list(range(10, 19)), SamplingParams(max_tokens=40), request_id="a")
    b = engine.add_request([3, 1, 4, 1, 5], SamplingParams(max_tokens=30, temperature=0.8, seed=7), request_id="b")
    req_a, req_b = engine.requests[a], engine.requests[b]
    outs: dict[str, list] = {a: [], b: []}
    for _ in range(6):
        for o in engine.step():
            outs[o.request_id].append(o)
    assert not req_a.finished and len(req_a.output_token_ids) >= 6
    a_blocks, b_blocks = set(req_a.block_table), set(req_b.block_table)
    assert a_blocks and b_blocks and held_blocks(engine) == a_blocks | b_blocks

    engine.abort(a)
    assert req_a.finished and req_a.finish_reason == "abort"
    assert req_a.block_table == [] and req_a.state_slot == -1
    assert held_blocks(engine) == b_blocks  # exactly a's blocks came back
    assert all(engine.blocks.ref_counts[x] == 0 for x in a_blocks)
    assert a not in engine.requests and engine.scheduler.running == [req_b]
    engine.abort(a)  # aborting again, or an unknown id, is a no-op
    engine.abort("never-existed")
    assert held_blocks(engine) == b_blocks

    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert all(o.request_id == b for o in outs[b])
    final = outs[b][-1]
    assert final.finished and final.finish_reason == "length" and len(final.output_token_ids) == 30
    assert sum(len(o.new_token_ids) for o in outs[b]) == 30  # the stream adds up to the total
    assert not any(o.finished for o in outs[a])  # a never reported a finish of its own
    assert_still_serves(engine)


def test_abort_of_a_waiting_request(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)
    first = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    queued = engine.add_request([4, 5, 6], SamplingParams(max_tokens=4))
    engine.step()
    assert engine.requests[queued] in engine.scheduler.waiting
    engine.abort(queued)
    assert not engine.scheduler.waiting and queued not in engine.requests
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == [first] and len(outs[0].output_token_ids) == 4
    assert_still_serves(engine)


def test_abort_everything_then_serve_again(model_dir):
    engine = make_engine(model_dir, max_num_seqs=2, max_model_len=48)
    ids = [engine.add_request([i + 1] * (i + 2), SamplingParams(max_tokens=20)) for i in range(5)]
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    for rid in ids:
        engine.abort(rid)
    assert_still_serves(engine)
