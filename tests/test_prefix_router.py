"""Replica choice: requests sharing a prompt prefix go to one replica unless its queue is too long."""

from router.prefix_router import prefix_key, rank

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]


def preferred(prompt, lens=(0, 0, 0, 0), replicas=REPLICAS, imbalance=4):
    ranks = rank(prefix_key(prompt, 8), list(replicas), list(lens), imbalance)
    return replicas[ranks[0][0]] if len(ranks[0]) == 1 else None


def test_same_prefix_same_replica_and_prefixes_spread():
    shared = list(range(100, 108))
    assert len({preferred(shared + [i, i + 1]) for i in range(20)}) == 1  # only the first 8 tokens count
    assert len({preferred([i] * 8) for i in range(40)}) == len(REPLICAS)  # different prefixes use every replica


def test_scale_out_moves_only_prefixes_to_the_new_replica():
    prompts = [[i, i * 7 % 13] * 4 for i in range(60)]
    before = {tuple(p): preferred(p) for p in prompts}
    after = {tuple(p): preferred(p, lens=(0,) * 5, replicas=REPLICAS + ["r-e"]) for p in prompts}
    moved = [p for p in prompts if before[tuple(p)] != after[tuple(p)]]
    assert moved and all(after[tuple(p)] == "r-e" for p in moved)


def test_load_beats_affinity_past_the_imbalance():
    prompt = [5] * 8
    home = preferred(prompt)
    lens = [0, 0, 0, 0]
    lens[REPLICAS.index(home)] = 3
    assert preferred(prompt, lens) == home  # 3 more queued than the shortest: still affine
    lens[REPLICAS.index(home)] = 4
    ranks = rank(prefix_key(prompt, 8), REPLICAS, lens, 4)
    assert len(ranks) == 1 and REPLICAS[ranks[0][-1]] == home  # overloaded: by load, home last
    assert REPLICAS[ranks[0][0]] != home
