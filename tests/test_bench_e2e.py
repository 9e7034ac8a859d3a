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
