"""The end-to-end benchmark's run order: its ratios are fair only if no server always runs first."""

from bench.e2e import run_order


def test_over_two_runs_every_server_and_api_has_the_same_mean_place():
    servers, apis = ["tidal", "tidal-ar", "vllm"], ["completions", "chat-stream"]
    (s0, a0), (s1, a1) = run_order(0, servers, apis), run_order(1, servers, apis)
    assert s0 == servers and a0 == apis  # the first run goes as asked
    assert sorted(s1) == sorted(servers) and sorted(a1) == sorted(apis)
    assert {s0.index(s) + s1.index(s) for s in servers} == {len(servers) - 1}
    assert {a0.index(a) + a1.index(a) for a in apis} == {len(apis) - 1}
    assert s0[0] != s1[0]


def test_the_in_process_loop_keeps_c_in_flight_and_counts_every_token(checkpoints):
    from bench.e2e import closed_loop
    from tests.conftest import make_engine
    from workers.config import SamplingParams

    engine = make_engine(checkpoints["zaya"].path, mode="ar", max_num_seqs=4)
    seen = []
    step = engine.step
    # observe the requests in the engine before each step; the step itself runs
    engine.step = lambda: (seen.append(engine.load().running + engine.load().waiting), step())[1]
    prompts = [[5 + i, 6, 7] for i in range(6)]
    assert closed_loop(engine, prompts, 3, SamplingParams(max_tokens=5, ignore_eos=True)) == 6 * 5
    assert seen[0] == 3 and max(seen) == 3  # c requests in the engine from the start, never more
    assert not engine.has_unfinished()
