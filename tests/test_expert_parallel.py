"""Expert parallelism on Ray actors (gloo on CPU) gives the same logits and tokens as one process."""

import json
import time

import pytest
import ray
import torch
from conftest import add_draft_heads, random_draft_heads

from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine
from workers.layout import StepLayout


def _save(model, path, mask_token_id):
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mask_token_id"] = mask_token_id
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, ZayaConfig, ZayaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ep")
    zaya = ZayaForCausalLM(ZayaConfig(vocab_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                      router_hidden_size=16, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2))
    with torch.no_grad():
        for name, p in zaya.named_parameters():
            if name.endswith("qk_norm.temp"):
                p.copy_(1 + torch.rand_like(p))
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=8, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             moe_intermediate_size=32, intermediate_size=64, num_experts=4,
                                             num_experts_per_tok=2, initializer_range=0.3))
    paths = {"zaya": _save(zaya, root / "zaya", 7), "qwen3_moe": _save(moe, root / "moe", 7)}
    add_draft_heads(paths["zaya"], random_draft_heads(zaya.get_output_embeddings().weight, 4, seed=0))  # chained
    yield paths
    ray.shutdown()


PROMPTS = [[3, 4, 5, 6, 3, 4], [5, 5, 6, 3, 4, 4, 4, 6, 3]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def _engines(model_dir, mode):
    tidar = dict(block_size=4, levels=(0, 2, 4))
    return (LLMEngine(EngineConfig(model=model_dir, mode=mode, tidar=tidar)),
            LLMEngine(EngineConfig(model=model_dir, mode=mode, tidar=tidar, ep_size=2, worker_timeout_s=30)))


@pytest.mark.parametrize("family", ["zaya", "qwen3_moe"])
def test_ep2_matches_ep1(checkpoints, family):
    one, two = _engines(checkpoints[family], "tidar")
    try:
        layout = StepLayout.causal(PROMPTS[1], 0, True)
        layout.logit_rows = list(range(len(PROMPTS[1])))
        args = ([layout], [0], [[0, 1, 2]], [0])
        torch.testing.assert_close(two.runner.forward(*args), one.runner.forward(*args), atol=1e-5, rtol=1e-5)
        one.runner.commit([len(PROMPTS[1]) - 1])
        two.runner.commit([len(PROMPTS[1]) - 1])

        assert (two.runner.draft_chain is not None) == (family == "zaya")  # rank 0's Markov head, for the engine
        tidar_one = [o.output_token_ids for o in one.generate(PROMPTS, GREEDY)]
        tidar_two = [o.output_token_ids for o in two.generate(PROMPTS, GREEDY)]
        assert tidar_two == tidar_one
        assert two.runner.comm_seconds() > 0  # the experts really were split across the actors
    finally:
        two.runner.shutdown()
    ar_one, ar_two = _engines(checkpoints[family], "ar")
    try:
        assert [o.output_token_ids for o in ar_two.generate(PROMPTS, GREEDY)] == tidar_one  # and TiDAR == AR
        assert [o.output_token_ids for o in ar_one.generate(PROMPTS, GREEDY)] == tidar_one
    finally:
        ar_two.runner.shutdown()


def test_ep2_prefix_cache_restores_cca_state_in_every_worker(checkpoints):
    """ZAYA with EP = 2 and the prefix cache: requests that start from cached blocks restore the CCA state
    kept with them in each worker actor (every worker holds its own copy), and produce the tokens of one
    process without the cache."""
    model = checkpoints["zaya"]
    tidar = dict(block_size=4, levels=(0, 2, 4))
    shared = [3, 4, 5, 6, 3, 4, 5, 5, 6, 3, 4, 4, 6]  # three full blocks of 4
    first = [shared + [5, 3]]
    later = [shared + [6], shared + [4, 4, 3, 5], shared[:8] + [6, 6, 6]]
    ref = LLMEngine(EngineConfig(model=model, mode="tidar", tidar=tidar, block_size=4, prefix_caching=False))
    two = LLMEngine(EngineConfig(model=model, mode="tidar", tidar=tidar, block_size=4, ep_size=2,
                                 worker_timeout_s=30))
    try:
        for prompts in (first, later):
            assert ([o.output_token_ids for o in two.generate(prompts, GREEDY)]
                    == [o.output_token_ids for o in ref.generate(prompts, GREEDY)])
        assert two.blocks.hits == 12 + 12 + 8  # every later prompt started from the first one's blocks
    finally:
        two.runner.shutdown()


def test_killed_worker_fails_requests_then_group_rebuilds(checkpoints):
    engine = LLMEngine(EngineConfig(model=checkpoints["zaya"], ep_size=2, worker_timeout_s=20))
    try:
        expected = [o.output_token_ids for o in engine.generate(PROMPTS, GREEDY)]
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True), request_id="doomed")
        engine.step()
        ray.kill(engine.runner.workers[1])
        start = time.monotonic()
        outputs = []
        while not outputs:
            outputs = engine.step()
        assert time.monotonic() - start < 25
        assert [(o.request_id, o.finish_reason) for o in outputs] == [("doomed", "error")]
        assert "worker group failed" in outputs[0].error
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        # the next requests succeed on a rebuilt group, with the same tokens as before
        assert [o.output_token_ids for o in engine.generate(PROMPTS, GREEDY)] == expected
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert len(live) == 1  # the dead group's placement group was removed
    finally:
        engine.runner.shutdown()


def test_a_killed_worker_under_load_ends_every_stream_with_an_error_then_serves(checkpoints):
    """The kill drill through an engine replica (the router's view, Ray Serve left out): three streams
    run on an EP = 2 group, one worker actor dies; every stream's last event is finish_reason 'error'
    with the group's failure (the ingress answers UNAVAILABLE / 503 for it), and the next request runs on a
    rebuilt group with the same tokens as before. Times go to docs/reliability.md; bounds catch a hang."""
    import asyncio

    from router.engine_replica import EngineReplica
    from router.events import EngineRequest

    config = EngineConfig(model=checkpoints["zaya"], ep_size=2, worker_timeout_s=20)
    replica = EngineReplica(config.model_dump(mode="json"), max_queued=8)

    async def drill():
        expected = [t for e in [e async for e in replica.generate(EngineRequest(PROMPTS[1], GREEDY))]
                    for t in e.token_ids]
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = [replica.generate(EngineRequest(p, long)) for p in (*PROMPTS, PROMPTS[0])]
        for s in streams:
            assert (await anext(s)).token_ids  # all three are decoding
        killed = time.monotonic()
        ray.kill(replica.engine.runner.workers[1])
        ended = []
        for s in streams:
            events = [e async for e in s]
            assert events and events[-1].finished and events[-1].finish_reason == "error", events[-1:]
            assert "worker group failed" in events[-1].error
            ended.append(time.monotonic() - killed)
        assert max(ended) < 60
        again = [t for e in [e async for e in replica.generate(EngineRequest(PROMPTS[1], GREEDY))] for t in e.token_ids]
        recovered = time.monotonic() - killed
        assert again == expected
        return ended, recovered

    try:
        ended, recovered = asyncio.run(drill())
        print(f"worker drill: streams ended after {[round(t, 2) for t in ended]} s, served again after "
              f"{recovered:.1f} s")
        assert replica.engine.load().kv_usage == 0.0
    finally:
        replica.async_engine.shutdown()
        replica.engine.runner.shutdown()
