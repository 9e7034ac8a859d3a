"""Structured output on the shipped model: every answer follows its grammar (checked by `json` and
`jsonschema`, and Python's `re`, not by the grammar library), and greedy TiDAR under a grammar is greedy
AR under the same grammar, token for token, while drafts the grammar refuses cut their blocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import assert_engine_idle, make_engine

from workers.config import DraftRule, InvalidRequest, SamplingParams, StructuredOutput, TidarConfig

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "zaya-code-tiny"
DRAFTING = TidarConfig(schedule=(DraftRule(max_batch=64, block_size=16, levels=(0, 4, 8, 16)),))  # fixed K
PET = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"],
       "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0},
                      "kind": {"enum": ["cat", "dog", "fish"]}}}
DEF = r"(def|class) [a-z_]{1,12}\(\):\n"
PROMPTS = ["pet = ", "import json\n\ndata = ", "def main():\n    return "]


@pytest.fixture(scope="module")
def engines():
    return {mode: make_engine(SHIPPED, mode=mode, kv_cache_bytes=1 << 22, tidar=DRAFTING) for mode in ("ar", "tidar")}


def constrained(n: int = 96, **shape) -> SamplingParams:
    return SamplingParams(max_tokens=n, structured=StructuredOutput(**shape))


def test_greedy_tidar_under_a_grammar_is_greedy_ar_under_it(engines):
    tok = engines["ar"].tokenizer
    cases = [constrained(json_schema=json.dumps(PET)), constrained(regex=DEF),
             constrained(grammar='start: "[" NUM ("," NUM)* "]"\nNUM: /[1-9][0-9]?/')]
    for params in cases:
        ar = engines["ar"].generate(PROMPTS, params)
        tidar = engines["tidar"].generate(PROMPTS, params)
        for a, t in zip(ar, tidar, strict=True):
            assert t.output_token_ids == a.output_token_ids
            assert t.finish_reason == a.finish_reason == "stop"  # the grammar completed: nothing more may follow
        texts = [tok.decode(o.output_token_ids) for o in ar]
        if params.structured.json_schema:
            for text in texts:
                jsonschema.validate(json.loads(text), PET)
        elif params.structured.regex:
            assert all(re.fullmatch(DEF, text) for text in texts), texts
        else:
            assert all(re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", text) for text in texts), texts
    assert_engine_idle(engines["tidar"])


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_a_draft_the_grammar_refuses_cuts_the_block_before_verification(engines, cut):
    """Drafts injected after the first token: the AR answer under the grammar, with EOS (which the grammar
    refuses until the JSON is complete) at draft `cut`. The step offers exactly the `cut` drafts before it
    for verification, accepts them all, and the answer is still AR's."""
    want = engines["ar"].generate([PROMPTS[0]], constrained(json_schema=json.dumps(PET)))[0].output_token_ids
    engine = engines["tidar"]
    rid = engine.add_request(PROMPTS[0], constrained(json_schema=json.dumps(PET)))
    req, records, injected = engine.requests[rid], [], False
    while engine.has_unfinished():
        if not injected and req.output_token_ids and req.num_computed_tokens == req.num_tokens - 1:
            drafts = want[1:9]
            drafts[cut] = min(engine.eos_token_ids)
            req.drafts, req.draft_logits = drafts, torch.zeros(len(drafts), engine.hf_config.vocab_size)
            injected = True
            records = []
        for out in engine.step():
            records.append(out)
    step = next(o.step for o in records if o.step is not None)  # the step that verified the injected drafts
    assert (step.drafted, step.accepted, step.committed) == (cut, cut, cut + 1)
    assert records[-1].output_token_ids == want
    assert_engine_idle(engine)


def test_the_next_drafts_are_cut_where_the_grammar_refuses_them(engines):
    """The engine's own drafts for the next step already stop before a token the grammar refuses, so the
    step verifies every draft it computed (verification never has to cut the block)."""
    engine = engines["tidar"]
    rid = engine.add_request(PROMPTS[1], constrained(json_schema=json.dumps(PET)))
    req, offered, cut = engine.requests[rid], [], 0
    while engine.has_unfinished():
        before = len(req.drafts)
        for out in engine.step():
            if out.step is not None and before:
                offered.append(before)
                cut += out.step.drafted < before
    assert offered and cut == 0
    assert_engine_idle(engine)


def test_sampled_answers_always_follow_the_schema(engines):
    outs = engines["tidar"].generate(PROMPTS * 4, [SamplingParams(max_tokens=96, temperature=1.0, seed=i,
                                                                  structured=StructuredOutput(json_schema=json.dumps(PET)))
                                                   for i in range(12)])
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(engines["tidar"].tokenizer.decode(out.output_token_ids)), PET)
    assert_engine_idle(engines["tidar"])


def test_bad_grammars_are_refused(engines, ckpt):
    for shape, message in (({"regex": "["}, "unclosed character class"),
                           ({"grammar": "start: missing_rule"}, "missing_rule"),
                           ({"json_schema": '{"type": "no such type"}'}, "no such type")):
        with pytest.raises(InvalidRequest, match="invalid structured output") as e:
            engines["tidar"].add_request("x", constrained(**shape))
        assert message in str(e.value)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput(regex="a", grammar='start: "a"')
    engine = make_engine(ckpt, kv_cache_bytes=1 << 20)  # a random checkpoint: no tokenizer.json
    with pytest.raises(InvalidRequest, match="tokenizer"):
        engine.add_request(ckpt.prompt(4, 0), constrained(regex="a"))
    assert_engine_idle(engines["tidar"])
