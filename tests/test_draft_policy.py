"""Load-aware drafting: the policy picks K and levels by expected tokens per second, down to plain AR."""

from workers import draft_policy
from workers.config import DraftRule, EngineConfig, TidarConfig
from workers.draft_policy import PROBE_REQUESTS, AdaptivePolicy, StaticSchedule, ladder, make_policy, slots


def feed(policy, step_time, acceptance, steps=200, k=16):
    """Observe `steps` steps of a machine whose step time is step_time(slots) and whose requests accept
    round(acceptance * k) of k drafts each step."""
    for i in range(steps):
        n_slots = 1 + (i % 7) * 9  # varied step sizes, as prefill chunks and layouts give
        policy.observe(n_slots, step_time(n_slots), [(k, round(acceptance * k))])


def test_ladder_lowers_levels_then_block_size():
    rules = ladder(16, (0, 4, 8, 16))
    assert [(r.block_size, r.levels) for r in rules] == [
        (16, (0, 4, 8, 16)), (16, (0, 4, 8)), (16, (0, 4)), (16, (0,)), (8, (0,)), (4, (0,)), (2, (0,)), (1, (0,))]
    assert slots(rules[0], False) == 17 * 5 and slots(None, False) == 1


def test_no_acceptance_on_a_compute_bound_machine_means_ar():
    policy = AdaptivePolicy(TidarConfig(), budget=100_000)
    feed(policy, lambda s: 0.001 * s, acceptance=0.0)
    choices = [policy.choose(1) for _ in range(200)]
    tidar_steps = sum(c is not None for c in choices)
    assert tidar_steps <= 2 * (200 // 16)  # only the occasional cheapest-layout probe (propose, then verify)
    assert all(c is None or (c.block_size, c.levels) == (1, (0,)) for c in choices)


def test_cold_start_probes_learn_acceptance_and_switch_to_drafting():
    """Starting from AR, a probe drafts for two steps (one proposes, the next verifies its drafts); when the
    drafts are accepted and the step time says a draft is worth its slots, the policy starts drafting."""
    policy = AdaptivePolicy(TidarConfig(), budget=100_000)
    step_time = lambda s: 0.005 + 0.0005 * s  # a 4-slot step costs 1.3 AR steps
    drafted = None
    for step in range(200):
        rule = policy.choose(1)
        if rule is not None and drafted is not None:  # this step verifies last step's drafts: all accepted
            verifies = [(drafted, drafted)]
        else:  # as the engine reports a step without drafts to verify (AR, or a layout's first step)
            verifies = [(0, 0)]
        policy.observe(slots(rule, False), step_time(slots(rule, False)), verifies)
        drafted = rule.block_size if rule is not None else None
        if rule is not None and step > 40 and policy.choose(1) is not None:
            break
    else:
        raise AssertionError(f"never switched to drafting; acceptance {policy.accept[:3]}")
    assert policy.accept[0] > 0.9


def test_high_acceptance_on_a_memory_bound_machine_drafts_fully_at_batch_1():
    memory_bound = lambda s: 0.010 + 0.00001 * s  # extra slots almost free
    policy = AdaptivePolicy(TidarConfig(), budget=100_000)
    feed(policy, memory_bound, acceptance=1.0)  # every draft accepted: level 16 keeps K drafts coming
    rule = policy.choose(1)
    assert rule is not None and rule.block_size == 16 and rule.levels == (0, 4, 8, 16)

    policy = AdaptivePolicy(TidarConfig(), budget=100_000)
    feed(policy, memory_bound, acceptance=0.9)  # 14 of 16 accepted: level 16 is never selected, so it is dropped
    rule = policy.choose(1)
    assert rule is not None and rule.block_size == 16 and rule.levels == (0, 4, 8)


def test_growing_batch_lowers_levels_then_k_then_ar():
    policy = AdaptivePolicy(TidarConfig(), budget=1_000_000)
    feed(policy, lambda s: 0.010 + 0.0001 * s, acceptance=0.8)
    costs = []
    for batch in (1, 4, 16, 64, 256, 1024):
        rule = policy.choose(batch)
        costs.append(slots(rule, False))
        rows = policy.explain(batch)
        chosen = next(r for r in rows if (r["block_size"], tuple(r["levels"])) ==
                      ((rule.block_size, rule.levels) if rule else (0, ())))
        assert chosen["tokens_per_time"] >= rows[0]["tokens_per_time"]  # never worse than AR by the model
    assert costs == sorted(costs, reverse=True)  # never richer as the batch grows
    assert costs[0] > 1 and costs[-1] == 1  # full drafting alone, plain AR when compute bound


def test_drafting_must_beat_ar_by_a_margin():
    """Where the fit puts drafting a few percent above AR the policy stays AR (such steps often ran below AR
    end to end); a clear win still drafts."""
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=100_000)
    feed(policy, lambda s: 0.010 + 0.001 * s, acceptance=0.0, k=4)  # the step-time fit
    for a, drafts in ((0.45, False), (0.7, True)):  # per-position acceptance: the model says ~1.05x, ~1.25x AR
        policy.accept = [a] * 4
        rows = policy.explain(1)
        gain = max(r["tokens_per_time"] for r in rows[1:]) / rows[0]["tokens_per_time"]
        assert (gain >= 1 + draft_policy.DRAFT_MARGIN) == drafts and gain > 1.0, (a, gain)
        policy.since_tidar = 0  # not due for a probe
        assert (policy.choose(1) is not None) == drafts, (a, gain)


def test_ar_is_judged_by_its_measured_step_time():
    """A drafting step also does work off the forward (acceptance, the draft chain) that an AR step does not;
    a fit of time over slots puts that work in its constant and so overrates an AR step. Here drafting loses
    (K = 2 commits 2 tokens in 0.0088 s, AR 1 in 0.0043 s): judged by the fit alone the policy would draft;
    judged by the AR steps it measured, it stays AR."""
    ar_cost = 0.0043
    step_time = lambda rows, drafting: 0.004 + 0.0003 * rows + (0.003 if drafting else 0.0)
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=100_000)
    for i in range(300):  # drafting steps of every layout (position 0 always accepted, 1 never) and AR steps
        rule = ladder(4, (0,))[i % 3] if i % 2 else None
        n = slots(rule, False)
        policy.last = (1, rule, None)
        policy.observe(n, step_time(n, rule is not None), [(rule.block_size, 1) if rule else (0, 0)])
    assert abs(policy.ar_seconds[1] - ar_cost) < 0.05 * ar_cost
    policy.since_tidar = 0
    assert policy.choose(1) is None

    policy.ar_seconds.clear()  # the fit alone
    assert policy.step_time(1) > 1.08 * ar_cost
    policy.since_tidar = 0
    assert policy.choose(1) is not None


def run_closed_loop(policy, steps, cost, accepted):
    """Batch-1 decode on a simulated machine with level-0 layouts: a step drafting by `rule` costs
    cost(slots, drafting) seconds, verifies the drafts the step before proposed (accepting min(offered,
    accepted)) and proposes K - kept more, as level 0 does. Returns per step (rule, seconds, tokens committed)."""
    trace, proposed = [], 0
    for _ in range(steps):
        rule = policy.choose(1)
        offered = min(proposed, rule.block_size) if rule is not None else 0
        n = slots(rule, False)
        seconds, kept = cost(n, rule is not None), min(offered, accepted)
        policy.observe(n, seconds, [(offered, kept)])
        trace.append((rule, seconds, kept + 1))
        proposed = rule.block_size - kept if rule is not None else 0
    return trace


def test_a_layout_the_model_overrates_stops_on_what_it_realizes():
    """The model (acceptance learnt where two drafts of four passed, a fit without the drafting steps' own
    cost) promises 1.8x AR; the machine gives 2 tokens in 0.009 s against AR's 1 in 0.0043 s. The policy
    drafts by that layout for MIN_REALIZED + 1 steps, then bars it while the model still promises the win;
    over 2,000 steps, every retry included, the run stays within 2% of AR's tokens per second."""
    ar_cost = 0.0043
    cost = lambda n, drafting: 0.004 + 0.0003 * n + (0.002 if drafting else 0.0)
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=100_000)
    feed(policy, lambda n: 0.004 + 0.0003 * n, acceptance=0.5, k=4)
    first = run_closed_loop(policy, 30, cost, accepted=1)
    streak = [rule for rule, _, _ in first[: next(i for i, (r, _, _) in enumerate(first) if r is None)]]
    assert streak and all(r == streak[0] for r in streak) and len(streak) == draft_policy.MIN_REALIZED + 1
    key = (1, streak[0].block_size, streak[0].levels)
    assert key in policy.barred
    model = policy.expected_tokens(policy.expected_drafts(streak[0])) / policy.step_time(slots(streak[0], False))
    assert model > (1 + draft_policy.DRAFT_MARGIN) / policy.ar_seconds[1]  # the model alone would draft on

    trace = first + run_closed_loop(policy, 2000, cost, accepted=1)
    rate = sum(t for _, _, t in trace) / sum(s for _, s, _ in trace)
    assert rate >= 0.98 / ar_cost
    assert policy.barred[key][1] > draft_policy.BAR_STEPS  # it lost again after its bar ended: a longer bar


def test_a_layout_that_realizes_a_small_gain_keeps_drafting():
    """Where a layout measures 1.04x AR (above REALIZED_MARGIN, below the model's DRAFT_MARGIN) it stays:
    what it realizes, not the model, keeps it."""
    cost = lambda n, drafting: 0.004 + 0.0003 * n + (0.0025 if drafting else 0.0)  # K = 2: 2 tokens in 0.0083 s
    policy = AdaptivePolicy(TidarConfig(block_size=2, levels=(0,)), budget=100_000)
    feed(policy, lambda n: 0.004 + 0.0003 * n, acceptance=0.5, k=2)  # the model: 1.5x AR
    trace = run_closed_loop(policy, 600, cost, accepted=1)
    drafting = [rule for rule, _, _ in trace[100:] if rule is not None]
    assert len(drafting) == 500 and not policy.barred
    rows = policy.explain(1)
    assert rows[1]["measured"] and 1.02 < rows[1]["tokens_per_time"] / rows[0]["tokens_per_time"] < 1.1


def test_cheap_prefill_tokens_do_not_make_drafting_look_cheap():
    """A decode slot returns logits and a prefill token does not, so they cost differently; the policy fits
    both and decides by the decode cost: drafting at batch 1, where it pays, AR at batch 32, where it does
    not. (One line through prefill and decode steps would underrate a slot and keep drafting at 32.)"""
    cost = lambda rows, other: 0.010 + 0.0005 * rows + 0.00002 * other
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=100_000)
    for i in range(300):
        if i % 3 == 0:  # a prefill chunk (its last row returns logits) beside the batch's decode rows
            policy.observe(256 + 32, cost(33, 255), [], logit_rows=33)
        else:
            rows = 32 * (1 + (i % 5))
            policy.observe(rows, cost(rows, 0), [(4, 1)] * 32, logit_rows=rows)
    for batch, slots_per_request in ((1, 5), (32, 1), (32, 5)):
        true = cost(batch * slots_per_request, 0)
        assert abs(policy.step_time(batch * slots_per_request) - true) < 0.02 * true
    assert policy.choose(1) is not None
    assert policy.choose(32) is None


def test_probes_grow_rare_where_drafting_loses_even_when_drafts_are_accepted():
    """At batch 32 on a compute-bound machine drafting loses although half the drafts pass: the probes that
    refresh acceptance (two slow steps each) back off, so they cost under 2% of 2,000 steps; at batch 1 the
    same acceptance still makes the policy draft."""
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=100_000)
    step_time = lambda s: 0.010 + 0.0005 * s
    feed(policy, step_time, acceptance=0.5, k=4)  # varied step sizes: the fit knows the fixed cost
    drafted, probe_steps = None, 0
    for _ in range(2000):
        rule = policy.choose(32)
        n = 32 * slots(rule, False)
        if rule is not None and drafted:  # half the requests accept every draft, half none
            verifies = [(drafted, drafted), (drafted, 0)] * 16
        else:
            verifies = [(0, 0)] * 32 if rule is not None else []
        policy.observe(n, step_time(n), verifies)
        drafted = rule.block_size if rule is not None else None
        probe_steps += rule is not None
    assert 0 < probe_steps <= 40
    assert policy.choose(1) is not None


def test_a_probe_drafts_for_a_few_requests_and_drafting_for_all():
    """A probe at batch 32 drafts for PROBE_REQUESTS requests (width), so it fits a budget that the whole
    batch's drafting would not; once drafting wins, the rule is for every request again."""
    policy = AdaptivePolicy(TidarConfig(block_size=4, levels=(0,)), budget=40)
    feed(policy, lambda s: 0.010 + 0.001 * s, acceptance=0.0, k=4)  # drafting loses: AR, then a probe
    choices = [(policy.choose(32), policy.width) for _ in range(40)]
    probes = [(rule, width) for rule, width in choices if rule is not None]
    assert probes and all(width == PROBE_REQUESTS and (rule.block_size, rule.levels) == (1, (0,))
                          for rule, width in probes)  # 2 * 4 + 30 slots <= 40 < 32 * 4
    assert all(width is None for rule, width in choices if rule is None)

    policy = AdaptivePolicy(TidarConfig(), budget=100_000)
    feed(policy, lambda s: 0.010 + 0.00001 * s, acceptance=1.0)  # slots nearly free, all accepted
    assert policy.choose(32) is not None and policy.width is None


def test_static_schedule_follows_batch_limits_and_budget():
    rules = (DraftRule(max_batch=2, block_size=8, levels=(0, 4, 8)), DraftRule(max_batch=8, block_size=4, levels=(0,)))
    sched = StaticSchedule(rules, budget=64)
    assert sched.choose(1) == rules[0]
    assert sched.choose(2) is rules[1]  # 2 * 36 slots exceed the budget of 64
    assert sched.choose(8) is None  # 8 * 10 > 64 -> AR
    assert sched.choose(9) is None


def test_engine_config_picks_policy():
    adaptive = make_policy(EngineConfig(model="x", mode="tidar"))
    static = make_policy(EngineConfig(model="x", mode="tidar", tidar=dict(
        schedule=[dict(max_batch=4, block_size=4, levels=(0, 2))])))
    assert isinstance(adaptive, AdaptivePolicy) and isinstance(static, StaticSchedule)
