"""The trainer (training/): optimisation works, training layouts agree with inference, exports load
in our engine and in transformers with the same logits, and an interrupted run resumes exactly.

Everything runs on a tiny ZAYA (hidden 64, head_dim 64, 2 layers, 2 experts) in a few seconds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training import batches, distill, losses, optim, pipeline, train
from training.export import write_model_dir
from training.model import build_model, make_config
from training.windows import WindowSampler
from workers.config import EngineConfig, SamplingParams
from workers.engine import LLMEngine

SPECIAL = {"<pad>": 256, "<bos>": 257, "<eos>": 258, "<mask>": 259}  # bench.random_model.byte_tokenizer ids
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            moe_intermediate_size=64, num_experts=2, router_hidden_size=16, max_position_embeddings=256)
BLOCK = 17


def tiny_model(seed: int = 0, perturb: bool = True):
    config = make_config(260, SPECIAL, **TINY)
    model = build_model(config, seed)
    if perturb:  # move constant-initialised parameters off their constants so no path is an identity
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
                elif "embed_tokens" in name:
                    p.mul_(10)
    return config, model


def windows(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s + 1), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(torch.get_num_threads(), 2))


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    config, model = tiny_model(perturb=False)
    seqs = windows(4, 40)
    batch = batches.tidar_batch(seqs, BLOCK, SPECIAL["<mask>"], [0, 5, 11, 16])
    opt = optim.make_optimizer(model, 3e-3)
    first = None
    for _ in range(6):
        out = losses.compute(model, batch)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses.compute(model, batch).loss.item() < first - 0.05


def test_gradient_reaches_every_parameter():
    _, model = tiny_model()
    batch = batches.tidar_batch(windows(3, 40, seed=1), BLOCK, SPECIAL["<mask>"], [3, 9, 0])
    losses.compute(model, batch).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_clean_half_logits_equal_a_plain_causal_forward():
    """training_layout's clean rows see exactly what a causal forward sees (masks, positions, CCA branches)."""
    _, model = tiny_model()
    seqs = windows(3, 50, seed=2)
    with torch.no_grad():
        tb = batches.tidar_batch(seqs, BLOCK, SPECIAL["<mask>"], [0, 7, 13])
        tidar = model.compute_logits(batches.forward_hidden(model, tb)[tb.rows]).view(3, 2, 50, -1)
        ab = batches.ar_batch(seqs)
        ar = model.compute_logits(batches.forward_hidden(model, ab)[ab.rows]).view(3, 50, -1)
    assert ar.std() > 0.5
    torch.testing.assert_close(tidar[:, 0], ar, atol=1e-4, rtol=1e-5)
    # and the masked half is not a copy of it
    assert (tidar[:, 1] - ar).abs().max() > 0.1


def test_cca_conv_equals_torch_conv1d_forward_and_backward():
    """ZayaCCAProjection.conv rewrites the two kernel-2 Conv1d modules as multiply-adds and a batched matmul."""
    _, model = tiny_model()
    proj = model.model.layers[0].self_attn.qkv_proj
    window = torch.randn(37, 3, proj.conv_qk_depthwise.in_channels, generator=torch.Generator().manual_seed(2))
    mine = proj.conv(window)
    stock = proj.conv_qk_grouped(proj.conv_qk_depthwise(window.transpose(1, 2))).squeeze(-1)
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (mine, stock):
        params = [proj.conv_qk_depthwise.weight, proj.conv_qk_depthwise.bias, proj.conv_qk_grouped.weight,
                  proj.conv_qk_grouped.bias]
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params))
    for g_mine, g_stock in zip(*grads, strict=True):
        torch.testing.assert_close(g_mine, g_stock, atol=1e-5, rtol=1e-4)


def test_export_loads_in_our_engine_and_in_transformers_with_the_same_logits(tmp_path):
    from transformers import ZayaForCausalLM as HFZaya

    from bench.random_model import byte_tokenizer
    from workers.config import EngineConfig, SamplingParams
    from workers.engine import LLMEngine
    from workers.layout import StepLayout

    config, model = tiny_model()
    with torch.no_grad():  # real experts' balancing biases are trained too: make sure they survive the export
        for m in model.modules():
            if hasattr(m, "balancing_biases"):
                m.balancing_biases[:-1] = torch.tensor([0.03, -0.03])
    tok_file = tmp_path / "tok.json"
    byte_tokenizer().save(str(tok_file))
    out = write_model_dir(tmp_path / "model", config, model.state_dict(), tok_file, SPECIAL["<mask>"], "# card\n")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == SPECIAL["<mask>"]

    ids = windows(1, 40, seed=4)[0, :40].tolist()
    with torch.no_grad():
        b = batches.ar_batch(torch.tensor([ids + [0]]))
        ours = model.compute_logits(batches.forward_hidden(model, b)[b.rows])
        hf = HFZaya.from_pretrained(str(out)).eval()
        theirs = hf(torch.tensor([ids])).logits[0].float()
    engine = LLMEngine(EngineConfig(model=str(out), kv_cache_bytes=1 << 20))
    lay = StepLayout.causal(ids, 0, True)
    lay.logit_rows = list(range(len(ids)))
    served = engine.runner.forward([lay], [0], [[0, 1, 2]], [0])
    assert ours.std() > 0.5
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(served, ours, atol=1e-4, rtol=1e-5)

    tidar = LLMEngine(EngineConfig(model=str(out), mode="tidar", kv_cache_bytes=1 << 20))
    assert tidar.mask_token_id == SPECIAL["<mask>"]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    assert (tidar.generate([ids[:10]], greedy)[0].output_token_ids
            == engine.generate([ids[:10]], greedy)[0].output_token_ids)


TINY_RUN = ["--max-files", "4", "--vocab-size", "300", "--arch", json.dumps(TINY), "--seq-len", "32",
            "--batch-size", "2", "--ar-tokens", "320", "--tidar-tokens", "256", "--distill-tokens", "192",
            "--distill-seqs", "3", "--eval-windows", "2",
            "--eval-every", "0", "--quiet", "--export-dir", ""]
DATA_FILES = ["train_files.txt", "heldout_files.txt", "skipped_files.txt", "data_root.txt", "tokenizer.json",
              "train_tokens.pt", "heldout_tokens.pt"]


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert pipeline.main(["--out", str(whole), *TINY_RUN]) == 0
    assert (whole / "DONE").is_file() and (whole / "ar-export" / "model.safetensors").is_file()
    cut.mkdir()
    for f in DATA_FILES:  # same data, without re-scanning the stdlib
        shutil.copy(whole / f, cut / f)
    assert pipeline.main(["--out", str(cut), *TINY_RUN, "--stop-after-steps", "3"]) == 0
    state = torch.load(cut / "checkpoint.pt", weights_only=False)["state"]
    assert (state["phase"], state["step"]) == (0, 3) and not (cut / "DONE").exists()
    assert pipeline.main(["--out", str(cut), *TINY_RUN]) == 0  # resumes: same flags, no stop

    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert a["state"]["phase"] == b["state"]["phase"] == 3
    assert a["state"]["tokens"] == b["state"]["tokens"] == (5 + 4 + 3) * 2 * 32
    torch.testing.assert_close(torch.load(cut / "distill_tokens.pt"), torch.load(whole / "distill_tokens.pt"),
                               atol=0, rtol=0)
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, atol=0, rtol=0, msg=name)
    steps = [p["steps"] for p in json.loads((cut / "summary.json").read_text())["phases"] if p.get("done")]
    assert steps == [5, 4, 3]


def test_distill_batches_train_drafts_on_the_models_text_and_ar_rows_on_real_code(tmp_path):
    """The distilled rows are the engine's greedy continuation of a train-stream prompt; in a batch they
    train only the mask slots, while the real windows train both objectives."""
    from bench.random_model import byte_tokenizer

    config, model = tiny_model()
    byte_tokenizer().save(str(tmp_path / "tok.json"))
    write_model_dir(tmp_path / "m", config, model.state_dict(), tmp_path / "tok.json", SPECIAL["<mask>"])
    stream = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(5))
    seqs = distill.generate(tmp_path / "m", stream, 3, 32, seed=1, path=tmp_path / "d.pt", quiet=True)
    assert seqs.shape == (3, 33)
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "m"), mode="ar"))

    def in_stream(ids: list[int]) -> bool:
        return bool(stream.unfold(0, len(ids), 1).eq(torch.tensor(ids)).all(1).any())

    def greedy_tail(prompt: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=33 - len(prompt), ignore_eos=True)
        return engine.generate([prompt], params)[0].output_token_ids

    for row in seqs.tolist():  # some prompt length in [S/4, 3S/4] is a stream slice followed by greedy text
        assert any(in_stream(row[:n]) and row[:n] + greedy_tail(row[:n]) == row for n in range(8, 25))
    more = distill.generate(tmp_path / "m", stream, 4, 32, seed=1, path=tmp_path / "d.pt", quiet=True)
    torch.testing.assert_close(more[:3], seqs, atol=0, rtol=0)  # resumed: finished rows are kept

    sampler = distill.MixedSampler(WindowSampler(stream, 32, 4, seed=0), more, share=0.5, seed=0)
    batch = train.make_batch("distill", sampler, 0, {"block_len": BLOCK}, SPECIAL["<mask>"], 16)
    rows = sampler.batch(0)
    assert all(any(torch.equal(rows[i], r) for r in more) for i in (0, 1))
    assert batch.is_ar.sum() == 2 * 32 and (~batch.is_ar).sum() == 4 * 32  # AR rows of the 2 real windows only
    torch.testing.assert_close(batch.targets[batch.is_ar], rows[2:, 1:].reshape(-1), atol=0, rtol=0)
    torch.testing.assert_close(batch.targets[~batch.is_ar], rows[:, :32].reshape(-1), atol=0, rtol=0)


def chained_model(tmp_path):
    """A tiny model with chained draft heads (add_chain_heads, then moved off their neutral start) and its export."""
    from bench.random_model import byte_tokenizer
    from training.model import add_chain_heads

    config, model = tiny_model()
    add_chain_heads(model, 8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.diffusion_markov_head.w2.normal_(0.0, 0.5, generator=g)
        model.diffusion_output_layer.weight.add_(torch.randn(model.diffusion_output_layer.weight.shape, generator=g))
    byte_tokenizer().save(str(tmp_path / "tok.json"))
    out = write_model_dir(tmp_path / "chained", config, model.state_dict(), tmp_path / "tok.json", SPECIAL["<mask>"])
    return model, out


def test_fresh_chain_heads_start_from_the_plain_model():
    """diffusion_output_layer = the LM head and w2 = 0: training continues from today's model unchanged."""
    from training.model import add_chain_heads

    _, model = tiny_model()
    batch = batches.tidar_batch(windows(2, 40, seed=2), BLOCK, SPECIAL["<mask>"], [0, 6])
    with torch.no_grad():
        before = batches.row_logits(model, batch)
        add_chain_heads(model, 8)
        torch.testing.assert_close(batches.row_logits(model, batch), before, atol=0, rtol=0)


def test_training_rows_are_the_chained_rows_the_engine_drafts_from(tmp_path):
    """Masked row t of a training block = the engine's proposal row for position t (draft head) plus the
    Markov bias of the clean token at t - 1, or of token 0 where t is a multiple of dspark_block_len (16);
    the clean rows are the engine's AR rows."""
    from workers.layout import StepLayout
    from workers.masks import step_layout

    model, out = chained_model(tmp_path)
    seq = windows(1, 40, seed=7)
    tokens = seq[0].tolist()
    batch = batches.tidar_batch(seq, BLOCK, SPECIAL["<mask>"], [0])  # blocks start at 0, 17, 34
    with torch.no_grad():
        train_rows = batches.row_logits(model, batch)  # [2S, V]: clean rows, then masked rows
    engine = LLMEngine(EngineConfig(model=str(out), mode="tidar", kv_cache_bytes=1 << 20))
    runner, table = engine.runner, [[0, 1, 2]]
    runner.forward([StepLayout.causal(tokens[:16], 0, False)], [0], table, [0])
    runner.commit([15])
    # anchor tokens[16] at position 16, one level-0 block of 17 mask slots at positions 17..33
    logits = runner.forward([step_layout([tokens[16]], [], 16, (0,), BLOCK, SPECIAL["<mask>"])], [16], table, [0])
    prev = torch.tensor([0 if t % 16 == 0 else tokens[t - 1] for t in range(17, 34)])
    served = logits[1:] + runner.draft_chain.head(prev)
    torch.testing.assert_close(served, train_rows[40 + 17 : 40 + 34], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], train_rows[16], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(served, logits[1:], atol=1e-2)  # the chain term is not negligible


def test_a_run_continues_an_exported_model_with_chain_heads_and_resumes(tmp_path):
    from bench.random_model import byte_tokenizer

    config, model = tiny_model()
    byte_tokenizer().save(str(tmp_path / "tok.json"))
    init = write_model_dir(tmp_path / "init", config, model.state_dict(), tmp_path / "tok.json", SPECIAL["<mask>"])
    run = ["--init-from", str(init), "--markov-rank", "8", "--max-files", "4", "--seq-len", "32", "--batch-size", "2",
           "--distill-tokens", "256", "--distill-seqs", "3", "--eval-windows", "2", "--eval-every", "0", "--quiet",
           "--export-dir", ""]
    assert pipeline.main(["--out", str(tmp_path / "run"), *run, "--stop-after-steps", "2"]) == 0
    assert not (tmp_path / "run" / "DONE").exists()
    assert pipeline.main(["--out", str(tmp_path / "run"), *run]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["tokens"] == 4 * 2 * 32  # the distill phase only, all of its 4 steps
    assert ckpt["model"]["diffusion_markov_head.w2"].abs().sum() > 0  # the chain was trained
    export = tmp_path / "run" / "final-export"
    assert json.loads((export / "config.json").read_text())["dspark_block_len"] == 16
    tidar = LLMEngine(EngineConfig(model=str(export), mode="tidar", kv_cache_bytes=1 << 20))
    ar = LLMEngine(EngineConfig(model=str(export), kv_cache_bytes=1 << 20))
    assert tidar.runner.draft_chain is not None
    greedy, prompt = SamplingParams(max_tokens=20, ignore_eos=True), windows(1, 12, seed=9)[0].tolist()
    assert tidar.generate([prompt], greedy)[0].output_token_ids == ar.generate([prompt], greedy)[0].output_token_ids
