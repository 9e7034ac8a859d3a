"""How much to draft each step: K and the proposal levels as a function of load, down to plain AR.

A TiDAR step with k drafts commits E(k) = 1 + sum_i prod_{j<=i} a_j tokens per request, where a_j is
the measured rate at which draft j is accepted given drafts 1..j-1 were; k itself depends on the
levels (see expected_drafts). It costs t(slots), the measured step time for that many token slots: a
least-squares fit over recent steps of t = c0 + c1 * logit rows + c2 * other slots, because a decode slot
(every TiDAR slot returns logits) costs more than a prefill token (whose logits nobody reads); fitting
one line through both let cheap prefill tokens make drafting look cheap at large batches. The adaptive
policy picks, for the current batch size b, the candidate that maximises b * E(k) / t(b * slots),
AR (E = 1, one slot) included, but drafts only where that beats AR by DRAFT_MARGIN: the fit is linear and
the serving processes share the CPU, so a layout the model puts a few percent above AR often ran below it
(end to end at c = 8, one run in three drafted and lost 12%). AR's own step time is measured (a moving mean
of plain AR steps per batch size), not fitted: the fit's constant carries the work drafting steps do off the
forward, which made AR look ~20% dearer than it was. The candidates lower the number of levels first,
then K. AR steps teach it nothing about acceptance, so it retries the cheapest TiDAR layout now and then
(two steps: one proposes drafts, the next verifies them), half as often each time drafting still loses at the batch size
of the probe. A probe drafts for at most PROBE_REQUESTS of the step's requests (`width`), the rest decode
as AR: drafting the whole batch made a probe at batch 32 two steps of about 3x the AR cost, and in process
TiDAR ran ~3% below AR at c = 32, most of it in probes. A falling load needs no probe: `choose` decides from the
acceptance already learnt. The model decides what to try; what a layout realizes decides whether it stays:
once a layout has drafted for the whole batch MIN_REALIZED times at a batch size, it is judged by its
measured tokens per second there (committed tokens over step time, moving means) against AR's, measured at
the same batch size (a few AR steps are run first where none were): a layout that does not beat AR by
REALIZED_MARGIN is barred at that batch size for BAR_STEPS steps, twice as long each time it loses again.
In process at c = 1 the model alone drafted on a fifth of one run's steps and lost 7%.
A static schedule (explicit rules by batch size) is also available.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.config import DraftRule, TidarConfig

NEVER = 1 << 30
PROBE_REQUESTS = 2  # requests a probe drafts for; a few acceptance samples per probe are enough
DRAFT_MARGIN = 0.10  # drafting must promise this much more than AR's tokens per second to be chosen
AR_RATE = 0.1  # weight of a new measured AR step time in its moving mean
MIN_REALIZED = 8  # whole-batch steps of a layout before its measured rate, not the model, judges it
AR_SAMPLES = 4  # AR steps measured at a batch size before a measured layout is judged against them
REALIZED_MARGIN = 0.02  # a measured layout must beat AR's measured tokens per second by this much to stay
BAR_STEPS = 256  # steps a layout that lost is not tried at that batch size (doubling per loss, to MAX_BAR_STEPS)
MAX_BAR_STEPS = 16384


def ladder(block_size: int, levels: tuple[int, ...]) -> list[DraftRule]:
    """Candidate layouts from the richest to the leanest: fewer levels, then smaller K."""
    out, lv = [], sorted(levels)
    while True:
        out.append(DraftRule(max_batch=NEVER, block_size=block_size, levels=tuple(lv)))
        if len(lv) == 1:
            break
        lv.pop()  # drop the highest level
    k = block_size // 2
    while k >= 1:
        out.append(DraftRule(max_batch=NEVER, block_size=k, levels=(0,)))
        k //= 2
    return out


def slots(rule: DraftRule | None, two_forward: bool) -> int:
    if rule is None:
        return 1
    if two_forward:  # verify pass + draft pass [anchor, K+1 masks]
        return (rule.block_size + 1) + (rule.block_size + 2)
    return (rule.block_size + 1) * (len(rule.levels) + 1)


@dataclass
class Realized:
    """What one layout gave at one batch size, over the steps it drafted for the whole batch."""

    steps: int = 0
    seconds: float = 0.0  # moving mean of the step time
    tokens: float = 0.0  # moving mean of the tokens committed per request per step (accepted drafts + 1)

    def add(self, seconds: float, tokens: float) -> None:
        self.steps += 1
        rate = max(AR_RATE, 1.0 / self.steps)  # a running mean over the first 1 / AR_RATE steps
        self.seconds += rate * (seconds - self.seconds)
        self.tokens += rate * (tokens - self.tokens)

    def tokens_per_second(self, batch: int) -> float:
        return batch * self.tokens / max(self.seconds, 1e-12)


Key = tuple[int, int, tuple[int, ...]]  # (batch, K, levels)


class StaticSchedule:
    """The first rule whose batch limit holds and whose whole-batch cost fits the token budget."""

    width = None  # every request of the step drafts by the chosen rule

    def __init__(self, rules: tuple[DraftRule, ...], budget: int, two_forward: bool = False):
        self.rules, self.budget, self.two_forward = rules, budget, two_forward

    def choose(self, batch: int, budget: int | None = None) -> DraftRule | None:
        budget = self.budget if budget is None else budget
        for rule in self.rules:
            if batch <= rule.max_batch and batch * slots(rule, self.two_forward) <= budget:
                return rule
        return None

    def observe(self, num_slots: int, seconds: float, verifies: list[tuple[int, int]],
                logit_rows: int | None = None) -> None:
        pass


class AdaptivePolicy:
    DECAY = 0.98  # weight of past step-time samples per new sample
    RATE = 0.05  # acceptance-rate learning rate once a position has been tried 1 / RATE times

    def __init__(self, cfg: TidarConfig, budget: int):
        self.two_forward = cfg.two_forward
        self.budget = budget
        self.candidates = ladder(cfg.block_size, cfg.levels)
        self.accept = [0.5] * cfg.block_size  # a prior worth one trial per position
        self.tried = [0] * cfg.block_size
        # decayed sums of x x^T and x t for x = (1, logit rows, other slots): the step-time fit
        self.sums = [[0.0] * 4 for _ in range(3)]
        self._fit: tuple[float, float] | None = None  # (c0, seconds per decode slot), solved once per step
        self._determined: tuple[float, float] | None = None  # the last fit the steps seen determined
        self.explore_every, self.since_tidar, self.exploring = 16, 0, False
        self.probe_left = 0  # steps the current probe still drafts
        self.probe_batch = 1  # batch size of the current probe
        self.width: int | None = None  # how many of the step's requests the chosen rule is for (None: all)
        self.ar_seconds: dict[int, float] = {}  # batch -> measured time of a plain AR decode step (moving mean)
        self.ar_steps: dict[int, int] = {}  # batch -> AR steps measured
        self.ar_asked: dict[int, int] = {}  # batch -> AR steps run to measure AR for a verdict
        self.last: tuple[int, DraftRule | None, int | None] = (0, None, None)  # (batch, rule, width) of the last
        # choice, which the next observed step ran
        self.realized: dict[Key, Realized] = {}  # measured whole-batch drafting per (batch, layout)
        self.barred: dict[Key, tuple[int, int]] = {}  # (batch, layout) -> (barred until step, bar length)
        self.steps = 0  # steps observed
        self._ran: Key | None = None  # the layout the last observed step drafted by for its whole batch
        self._expected: tuple[tuple[float, ...], list[float]] | None = None  # (acceptance, tokens per candidate)

    def step_time(self, num_slots: int) -> float:
        """Fitted seconds for a decode step of `num_slots` slots, all of them logit rows. Fits with all three
        terms when the steps seen allow it, else (1, rows); when recent steps do not determine even that,
        the last fit they did; before two distinct sizes, time ~ rows."""
        if self._fit is None:
            for features in ((0, 1, 2), (0, 1)):
                c = solve(self.sums, features)
                if c is not None and min(c) >= 0.0:
                    self._fit = self._determined = (c[0], c[1])
                    break
            else:  # recent steps all of one size (a steady batch): the last determined fit still holds
                rows, t = self.sums[0][1], self.sums[0][3]
                self._fit = self._determined or (0.0, t / rows if rows else 1.0)
        c0, per_slot = self._fit
        return c0 + per_slot * num_slots

    def expected_tokens(self, k: float) -> float:
        """1 + sum_{i <= k} prod_{j <= i} a_j; a fractional k takes that share of the next term."""
        total, run = 1.0, 1.0
        for i, a in enumerate(self.accept):
            if i >= k:
                break
            run *= a
            total += run * min(1.0, k - i)
        return total

    def expected_drafts(self, rule: DraftRule) -> float:
        """Drafts the next step will have: after n accepted, the proposal at level p = max{p <= n} gives
        K - (n - p) of them, so sparse levels trade drafts for a smaller forward."""
        k, total, reach = rule.block_size, 0.0, 1.0  # reach = P(first n drafts all accepted)
        for n in range(k + 1):
            stop = 1.0 - self.accept[n] if n < k else 1.0
            p = max(level for level in rule.levels if level <= n)
            total += reach * stop * (k - (n - p))
            reach *= self.accept[n] if n < k else 0.0
        return total

    def explain(self, batch: int, budget: int | None = None) -> list[dict]:
        """Tokens per second for AR and every candidate that fits and is not barred: measured where the layout
        has run for the whole batch at this batch size (MIN_REALIZED steps), else expected by the model."""
        budget = self.budget if budget is None else budget
        ar_time = self.ar_seconds.get(batch) or self.step_time(batch)  # measured where AR ran at this batch
        rows = [{"block_size": 0, "levels": [], "expected_tokens": 1.0, "tokens_per_time": batch / max(ar_time, 1e-12),
                 "measured": batch in self.ar_seconds}]
        accept = tuple(self.accept)
        if self._expected is None or self._expected[0] != accept:  # every step asks; acceptance moves on verifies
            self._expected = (accept, [self.expected_tokens(self.expected_drafts(c)) for c in self.candidates])
        for c, e in zip(self.candidates, self._expected[1], strict=True):
            key = (batch, c.block_size, c.levels)
            if batch * slots(c, self.two_forward) > budget or self.barred.get(key, (0, 0))[0] > self.steps:
                continue
            seen = self.realized.get(key)
            if seen is not None and seen.steps >= MIN_REALIZED:  # measured here: what it gave, not the model
                rows.append({"block_size": c.block_size, "levels": list(c.levels), "expected_tokens": seen.tokens,
                             "tokens_per_time": seen.tokens_per_second(batch), "measured": True})
                continue
            rows.append({"block_size": c.block_size, "levels": list(c.levels), "expected_tokens": e,
                         "tokens_per_time": batch * e / max(self.step_time(batch * slots(c, self.two_forward)), 1e-12),
                         "measured": False})
        return rows

    @staticmethod
    def best(rows: list[dict]) -> dict:
        """Of `explain`'s rows (AR first), the drafting layout with the most tokens per second once its margin
        over AR is asked (REALIZED_MARGIN where measured, DRAFT_MARGIN where only the model says so), else AR."""
        def discounted(r: dict) -> float:
            return r["tokens_per_time"] / (1 + (REALIZED_MARGIN if r["measured"] else DRAFT_MARGIN))

        ar, drafting = rows[0], max(rows[1:], key=discounted, default=None)
        if drafting is not None and discounted(drafting) >= ar["tokens_per_time"]:
            return drafting
        return ar

    def choose(self, batch: int, budget: int | None = None) -> DraftRule | None:
        """The layout for a step of `batch` decoding requests whose drafting may use `budget` token slots
        (default: the whole step budget)."""
        rule = self._choose(batch, budget)
        self.last = (batch, rule, self.width)
        return rule

    def _choose(self, batch: int, budget: int | None) -> DraftRule | None:
        budget = self.budget if budget is None else budget
        width = min(batch, PROBE_REQUESTS)
        probes = [c for c in self.candidates if width * slots(c, self.two_forward) + batch - width <= budget]
        if self.probe_left and probes:  # a probe drafts for two steps: one proposes, the next verifies
            self.probe_left -= 1
            self.width = width
            return probes[-1]
        self.exploring, self.probe_left, self.width = False, 0, None
        rows = self.explain(batch, budget)
        if (any(r["measured"] for r in rows[1:]) and self.ar_steps.get(batch, 0) < AR_SAMPLES
                and self.ar_asked.get(batch, 0) < 4 * AR_SAMPLES):  # (bounded: prefill may keep AR steps impure)
            self.ar_asked[batch] = self.ar_asked.get(batch, 0) + 1
            return None  # a measured layout is judged against AR measured at the same batch size: measure it
        best = self.best(self._verdicts(batch, rows))
        if best["block_size"] == 0:
            self.since_tidar += 1
            if not probes or self.since_tidar < self.explore_every:
                return None
            self.exploring, self.since_tidar, self.probe_left, self.probe_batch = True, 0, 1, batch
            self.width = width
            return probes[-1]  # the cheapest layout, to refresh the acceptance estimates
        self.since_tidar = 0
        return DraftRule(max_batch=NEVER, block_size=best["block_size"], levels=tuple(best["levels"]))

    def observe(self, num_slots: int, seconds: float, verifies: list[tuple[int, int]],
                logit_rows: int | None = None) -> None:
        """One finished step: its token slots, its time, (offered, accepted) per request, and how many of
        the slots returned logits (default: all, as in a decode step)."""
        rows = num_slots if logit_rows is None else logit_rows
        if self.last[1] is None and len(verifies) == rows == num_slots and not any(d for d, _ in verifies):
            # a plain AR decode step of num_slots requests: its time measured, not fitted (the fit's constant
            # carries drafting steps' work off the forward, which made AR look ~20% dearer than it was)
            prev = self.ar_seconds.get(num_slots)
            self.ar_seconds[num_slots] = seconds if prev is None else prev + AR_RATE * (seconds - prev)
            self.ar_steps[num_slots] = self.ar_steps.get(num_slots, 0) + 1
        x = (1.0, float(rows), float(num_slots - rows), seconds)
        for i in range(3):
            for j in range(4):
                self.sums[i][j] = self.DECAY * self.sums[i][j] + x[i] * x[j]
        self._fit = None
        self.steps += 1
        self._judge(num_slots == rows, seconds, verifies)
        for offered, accepted in verifies:
            for i in range(min(offered, accepted + 1)):  # position i was tried only if all before it passed
                self.tried[i] += 1
                rate = max(self.RATE, 1.0 / (self.tried[i] + 1))  # a running mean until it has 1 / RATE trials
                self.accept[i] += rate * ((i < accepted) - self.accept[i])
        if self.exploring and not self.probe_left:  # the probe's verify step: does drafting win now?
            self.exploring = False
            self.since_tidar = 0
            lost = self.best(self.explain(self.probe_batch))["block_size"] == 0
            self.explore_every = min(self.explore_every * 2, 1024) if lost else 16

    def _judge(self, decode_only: bool, seconds: float, verifies: list[tuple[int, int]]) -> None:
        """Record a step that drafted for the whole batch (no prefill beside it) by the same layout as the step
        before it: what that layout realizes at this batch size."""
        batch, rule, width = self.last
        whole = rule is not None and decode_only and len(verifies) == batch and (width is None or width >= batch)
        key, after = ((batch, rule.block_size, rule.levels) if whole else None), self._ran
        self._ran = key
        if key is None or after != key:  # the first step of a layout verifies no drafts of its own: not counted
            return
        self.realized.setdefault(key, Realized()).add(seconds, sum(accepted + 1 for _, accepted in verifies) / batch)

    def _verdicts(self, batch: int, rows: list[dict]) -> list[dict]:
        """`explain`'s rows less the measured layouts that do not beat AR's measured rate by REALIZED_MARGIN:
        those are barred at this batch size (BAR_STEPS, doubling each time one loses again) and forgotten, so
        that they are tried afresh when the bar ends (the content or the load may have moved)."""
        kept = [rows[0]]
        for r in rows[1:]:
            if r["measured"] and r["tokens_per_time"] < (1 + REALIZED_MARGIN) * rows[0]["tokens_per_time"]:
                key = (batch, r["block_size"], tuple(r["levels"]))
                bar = min(2 * self.barred[key][1], MAX_BAR_STEPS) if key in self.barred else BAR_STEPS
                self.barred[key] = (self.steps + bar, bar)
                del self.realized[key]
            else:
                kept.append(r)
        return kept


def solve(sums: list[list[float]], features: tuple[int, ...]) -> list[float] | None:
    """Least squares from decayed normal-equation sums, on a subset of the features: Gaussian elimination
    with partial pivoting; None when the steps seen do not determine the fit (e.g. no prefill yet)."""
    a = [[sums[i][j] for j in features] + [sums[i][3]] for i in features]
    n = len(features)
    scale = max(abs(a[i][i]) for i in range(n)) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= 1e-9 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def make_policy(cfg) -> StaticSchedule | AdaptivePolicy:
    """cfg: EngineConfig in tidar mode."""
    t = cfg.tidar
    if t.schedule is not None:
        return StaticSchedule(t.schedule, cfg.max_num_batched_tokens, t.two_forward)
    return AdaptivePolicy(t, cfg.max_num_batched_tokens)
