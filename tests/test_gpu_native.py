"""The prepared accelerator benchmark runs end to end (here on the CPU, tiny model): the script a session with a
lent GPU runs once must not fail there for a reason a CPU run would have shown."""

from bench import gpu_native


def test_gpu_native_script_runs_on_cpu_and_checks_logits():
    out = gpu_native.main(["--tiny", "--device", "cpu", "--layers", "1", "--batches", "1,2", "--steps", "1",
                           "--prompt-len", "16"])
    assert out["logits"]["float32_ok"]  # same device and dtype as the reference: must agree
    assert out["logits"]["bfloat16"]["greedy_agree"] > 0.5
    assert [c["batch"] for c in out["steps"]] == [1, 2]
    assert all(c[k] > 0 for c in out["steps"] for k in ("ar", "tidar_0", "tidar_0_4_8_16"))
