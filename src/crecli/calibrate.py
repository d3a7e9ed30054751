"""From recorded outcomes to each cluster's cheapest adequate model and each model's threshold.

Three steps, all pure functions of recorded outcomes (no model runs here):

1. `cluster_stats`: per cluster and model, how often the greedy answer is right and what
   it costs. Small clusters are noisy, so accuracies are shrunk toward the model's
   accuracy over the whole log (empirical Bayes, prior strength PRIOR_STRENGTH).
2. `choose_models`: the cluster -> starting model map for a `Budget` (what `cre fit`
   uses); `choose_by_weight`: the same map for one price of accuracy (what `cre calibrate`
   sweeps).
3. `simulate` / `tune_thresholds`: replay the cascade on the recorded votes to measure
   accuracy, cost and escalations for given thresholds, and pick thresholds for a budget.

`plan` runs the three in-sample for `cre fit`. `recalibrate` is `cre calibrate`: the same
choices, scored by cross-validation (cluster models chosen on the other folds, the cascade
replayed on the held-out fold), so the chosen setting is judged on queries it was not chosen
on. Choosing the best of many settings still flatters the winner a little; `bench/headline`
scores every query with a router fitted and calibrated without it. Replays run the same decision
procedure as `cre ask` on the same seeded votes, so thousands of settings are compared in
seconds; only outcomes missing from the store are collected first (that runs models, once).
"""

from __future__ import annotations

import functools
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from crecli import console, grading
from crecli.errors import CreError
from crecli.models.prompting import shots_of
from crecli.costs import BUDGET_EPS, BUDGET_KINDS, DEFAULT_RETAIN, Budget, CostModel  # noqa: F401 (re-exported)
from crecli.quality import (  # noqa: F401 (CHECKS re-exported)
    CHECKS, DEFAULT_CHECK, DeferralCheck, Deferral, accept_deferral, decide, deferral_features, done, feature_names, greedy_agreement,
    needed,
)

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.models.backend import Signals
    from crecli.outcomes import Outcome, OutcomeKey, OutcomeStore
    from crecli.quality import QualityCheck
    from crecli.querylog import LogOptions, Record
    from crecli.route import RouteDecision
    from crecli.routerfile import RouterFile

# How many queries' worth of belief the model's log-wide accuracy carries in a cluster.
# With 5, a cluster needs about 5 queries before its own record counts as much as the
# log-wide figure: enough to stop a 2-for-2 cluster from looking perfect, little enough
# that a 30-query cluster speaks for itself.
PRIOR_STRENGTH = 5.0
# Agreement needed below the top rung: 3 of 5 votes.
DEFAULT_THRESHOLD = 0.6
# Ratios are compared with this slack, so a budget met exactly is not missed by rounding.
_EPS = BUDGET_EPS


@dataclass(frozen=True)
class ModelStats:
    n: int  # queries with an outcome for this model
    correct: int  # of which the greedy answer (or the label) is right
    accuracy: float  # correct / n; the model's log-wide accuracy when n == 0
    shrunk_accuracy: float  # (correct + m * global) / (n + m)
    mean_cost: float  # of one greedy answer; the model's log-wide mean when n == 0

    def to_dict(self) -> dict[str, float]:
        return {
            "n": float(self.n),
            "correct": float(self.correct),
            "accuracy": self.accuracy,
            "shrunk_accuracy": self.shrunk_accuracy,
            "mean_cost": self.mean_cost,
        }


@dataclass
class ClusterStats:
    cluster: int
    size: int  # records in the cluster
    models: dict[str, ModelStats]


@dataclass
class StatsTable:
    clusters: dict[int, ClusterStats]  # includes -1 (unclustered) when any record is
    overall: ClusterStats  # all records together; cluster id -1 is not special here
    ladder: list[str]
    prior_strength: float


def cluster_stats(
    labels: Sequence[int],
    records: Sequence["Record"],
    outcomes: Mapping[OutcomeKey, Outcome],
    ladder: Sequence[str],
    costs: CostModel,
    prior_strength: float = PRIOR_STRENGTH,
) -> StatsTable:
    """Greedy-answer accuracy and cost per cluster and model.

    `labels[i]` is the cluster of `records[i]`. Shrunk accuracy is
    (correct + m * global) / (n + m), where global is the model's accuracy over all records
    and m = `prior_strength`. Mean cost is that of one greedy answer, the cost of routing
    without a quality check; `simulate` prices the cascade's extra votes.
    """
    if len(labels) != len(records):
        raise ValueError(f"{len(records)} records but {len(labels)} cluster labels")
    # (cluster -> model -> [n, correct, cost sum])
    sums: dict[int, dict[str, list[float]]] = {}
    total: dict[str, list[float]] = {m: [0, 0, 0.0] for m in ladder}
    sizes: Counter[int] = Counter()
    for record, label in zip(records, labels):
        cid = int(label)
        sizes[cid] += 1
        per = sums.setdefault(cid, {m: [0, 0, 0.0] for m in ladder})
        for model in ladder:
            outcome = outcomes.get((record.id, model))
            if outcome is None:
                continue
            ok = outcome.correct(record)[0]
            cost = costs.of(outcome, 1)
            for acc in (per[model], total[model]):
                acc[0] += 1
                acc[1] += ok
                acc[2] += cost
    glob = {m: _raw(total[m], None, None) for m in ladder}

    def stats(row: dict[str, list[float]]) -> dict[str, ModelStats]:
        out = {}
        for model in ladder:
            g_acc, g_cost = glob[model]
            n, correct, _ = row[model]
            acc, mean_cost = _raw(row[model], g_acc, g_cost)
            shrunk = shrink(correct, n, g_acc, prior_strength)
            out[model] = ModelStats(int(n), int(correct), acc, shrunk, mean_cost)
        return out

    clusters = {cid: ClusterStats(cid, sizes[cid], stats(sums[cid])) for cid in sorted(sums)}
    overall = ClusterStats(-1, len(records), stats(total))
    return StatsTable(clusters, overall, list(ladder), prior_strength)


def shrink(correct: float, n: float, glob: float, strength: float) -> float:
    """Empirical-Bayes accuracy: `correct` of `n` shrunk toward `glob`, worth `strength` answers."""
    return (correct + strength * glob) / (n + strength) if n + strength > 0 else glob


def _raw(row: list[float], acc_default: float | None, cost_default: float | None) -> tuple[float, float]:
    n, correct, cost = row
    if n:
        return correct / n, cost / n
    return acc_default or 0.0, cost_default or 0.0


@dataclass
class Choice:
    models: dict[int, str]  # cluster id (>= 0) -> starting model
    fallback: str  # unclustered and far-from-every-cluster prompts start here
    expected_accuracy: float  # mean shrunk accuracy over the records, by the choice
    expected_cost: float  # mean greedy cost per record, by the choice
    reference_accuracy: float  # the same, always using the strongest model
    reference_cost: float


def choose_models(table: StatsTable, budget: Budget) -> Choice:
    """Each cluster's starting model for `budget` (see `Budget` for the two rules).

    The fallback is always the strongest model: a prompt unlike anything in the log has no
    evidence that a weaker model is good enough for it. Unclustered records (-1) are
    therefore charged the strongest model's cost against a "max_cost" budget.
    """
    ladder = table.ladder
    real = {cid: c for cid, c in table.clusters.items() if cid >= 0}
    if budget.kind == "retain":
        models = {cid: _retain(c, ladder, budget.value) for cid, c in real.items()}
    else:
        models = _max_cost(table, real, budget.value)
    return _choice_of(table, models)


def choose_by_weight(table: StatsTable, weight: float) -> Choice:
    """Each cluster's starting model for one price of accuracy: the model with the highest
    `weight` x (its shrunk accuracy there / the strongest model's log-wide accuracy) -
    (its mean cost there / the strongest model's log-wide mean cost); ties go to the cheaper.

    This is the Lagrangian of "as accurate as possible over the whole log for this much
    cost": one exchange rate for every cluster, so a cluster where a small model loses a
    little accuracy for a large saving gives it up before one where it saves little. A
    per-cluster share (`Budget("retain", r)` in `choose_models`) holds every cluster to the
    same ratio instead, which spends cost where the strongest model is weak. On the 1,400-query
    log, choosing one model per task by each rule on four folds (for 98% there) and scoring
    the fifth, the ratio rule kept 97.9-98.9% of the strongest model's accuracy at 92.4-93.8%
    of its cost, this one 98.6-99.6% at 83.4-84.6% (`bench/frontier_bound.py`, seeds 0-2).
    0 picks each cluster's cheapest model; a very large weight its most accurate one.
    """
    ladder = table.ladder
    top = table.overall.models[ladder[-1]]
    acc_unit = top.accuracy if top.accuracy > 0 else 1.0
    cost_unit = top.mean_cost if top.mean_cost > 0 else 1.0

    def score(stats: ClusterStats, model: str) -> float:
        m = stats.models[model]
        return weight * m.shrunk_accuracy / acc_unit - m.mean_cost / cost_unit

    models = {}
    for cid, stats in table.clusters.items():
        if cid < 0:
            continue
        # max() keeps the first of equals, and _by_cost lists the cheapest first.
        models[cid] = max(_by_cost(stats, ladder), key=lambda m: score(stats, m))
    return _choice_of(table, models)


def _choice_of(table: StatsTable, models: dict[int, str]) -> Choice:
    """`models` as a Choice: unclustered prompts start on the strongest model, and the
    expected figures are the table's, by the choice and by always using the strongest."""
    top = table.ladder[-1]
    chosen = dict(models)
    if -1 in table.clusters:
        chosen[-1] = top
    n = sum(table.clusters[cid].size for cid in chosen) or 1

    def mean(pick: Mapping[int, str], attr: str) -> float:
        return sum(getattr(table.clusters[cid].models[m], attr) * table.clusters[cid].size for cid, m in pick.items()) / n

    always_top = {cid: top for cid in chosen}
    return Choice(
        models=models,
        fallback=top,
        expected_accuracy=mean(chosen, "shrunk_accuracy"),
        expected_cost=mean(chosen, "mean_cost"),
        reference_accuracy=mean(always_top, "shrunk_accuracy"),
        reference_cost=mean(always_top, "mean_cost"),
    )


def _by_cost(stats: ClusterStats, ladder: Sequence[str]) -> list[str]:
    # Cheapest first; equal costs keep ladder order (smaller models first).
    return sorted(ladder, key=lambda m: (stats.models[m].mean_cost, ladder.index(m)))


def _retain(stats: ClusterStats, ladder: Sequence[str], value: float) -> str:
    bar = value * stats.models[ladder[-1]].shrunk_accuracy
    for model in _by_cost(stats, ladder):
        if stats.models[model].shrunk_accuracy >= bar - _EPS:
            return model
    return max(_by_cost(stats, ladder), key=lambda m: stats.models[m].shrunk_accuracy)


def _max_cost(table: StatsTable, real: Mapping[int, ClusterStats], value: float) -> dict[int, str]:
    ladder = table.ladder
    top = ladder[-1]
    everything = list(real.values()) + ([table.clusters[-1]] if -1 in table.clusters else [])
    budget = value * sum(c.size * c.models[top].mean_cost for c in everything)
    spent = table.clusters[-1].size * table.clusters[-1].models[top].mean_cost if -1 in table.clusters else 0.0
    state = {cid: _by_cost(c, ladder)[0] for cid, c in real.items()}
    spent += sum(real[cid].size * real[cid].models[m].mean_cost for cid, m in state.items())
    while True:
        best: tuple[float, float, int, str] | None = None
        for cid, c in real.items():
            now = c.models[state[cid]]
            for model in ladder:
                new = c.models[model]
                gain = c.size * (new.shrunk_accuracy - now.shrunk_accuracy)
                extra = c.size * (new.mean_cost - now.mean_cost)
                if gain <= _EPS or spent + extra > budget + _EPS:
                    continue
                ratio = gain / extra if extra > 0 else float("inf")
                if best is None or (ratio, gain) > (best[0], best[1]):
                    best = (ratio, gain, cid, model)
        if best is None:
            return state
        _, _, cid, model = best
        spent += real[cid].size * (real[cid].models[model].mean_cost - real[cid].models[state[cid]].mean_cost)
        state[cid] = model


def default_thresholds(ladder: Sequence[str]) -> dict[str, float]:
    """0.6 (3 of 5 votes agree) below the top; 0 on the top rung.

    The top rung's answer is final whatever its agreement, so its threshold only sets how
    many votes it draws for its majority; 0 means its greedy answer alone, the cheapest.
    """
    return {name: (0.0 if i == len(ladder) - 1 else DEFAULT_THRESHOLD) for i, name in enumerate(ladder)}


@dataclass(frozen=True)
class SimStep:
    model: str
    agreement: float
    used: int  # votes drawn
    accept: bool
    cost: float


@dataclass
class QueryTrace:
    query_id: str
    start: str
    steps: list[SimStep]
    answer: str  # normalised majority answer of the final step ("" for a label-only outcome)
    correct: bool
    cost: float

    @property
    def model(self) -> str:
        return self.steps[-1].model

    @property
    def escalated(self) -> bool:
        return len(self.steps) > 1


@dataclass
class SimResult:
    traces: list[QueryTrace]
    unit: str
    accuracy: float = 0.0
    cost: float = 0.0  # total over all queries
    mean_cost: float = 0.0
    escalation_rate: float = 0.0
    answered_by: dict[str, int] = field(default_factory=dict)  # model -> final answers

    def __post_init__(self) -> None:
        n = len(self.traces)
        if n:
            self.accuracy = sum(t.correct for t in self.traces) / n
            self.cost = sum(t.cost for t in self.traces)
            self.mean_cost = self.cost / n
            self.escalation_rate = sum(t.escalated for t in self.traces) / n
        self.answered_by = dict(Counter(t.model for t in self.traces))

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.traces),
            "accuracy": self.accuracy,
            "cost": self.cost,
            "mean_cost": self.mean_cost,
            "unit": self.unit,
            "escalation_rate": self.escalation_rate,
            "answered_by": self.answered_by,
        }


@dataclass(frozen=True)
class _Entry:
    answers: tuple[str, ...]  # normalised votes; () for a label-only outcome
    correct: tuple[bool, ...]  # per vote (one entry for a label)
    cumcost: tuple[float, ...]  # cumcost[i]: cost of votes 0..i
    signals: "Signals | None" = None  # of the greedy vote
    cut: bool = False  # the greedy vote stopped at the token cap
    prefix_key: str = ""  # the shared answered examples, whose cost `cumcost` leaves out
    prefix_cost: float = 0.0  # processing them once (`CostModel.prefix`)

    def features(self, votes: int, prior: float) -> list[float | None]:
        """The deferral model's inputs for this recorded answer, as the live check builds them."""
        return deferral_features(self.signals, self.answers[:votes], self.cut, prior)


def prefix_shares(entries: Sequence[_Entry]) -> list[float]:
    """Each visit's share of its shared examples' cost: a prefix is processed once per
    batch, by the first prompt that needs it, and reused by the rest (llama.cpp's KV cache,
    with `cre batch` taking a cluster's prompts together), so its cost is split evenly
    over the visits in `entries` that share it. The one rule for replays and greedy points.
    """
    visits = Counter(e.prefix_key for e in entries if e.prefix_key)
    return [e.prefix_cost / visits[e.prefix_key] if e.prefix_key else 0.0 for e in entries]


@functools.lru_cache(maxsize=1 << 16)
def _normalize(text: str, match: str | None) -> str:
    return grading.normalize(text, match)


class Replay:
    """Recorded votes, normalised, graded and costed once, for fast repeated `simulate` calls."""

    def __init__(self, entries: dict[OutcomeKey, _Entry], records: Sequence["Record"], ladder: Sequence[str], unit: str) -> None:
        self.entries = entries
        self.records = list(records)
        self.ladder = list(ladder)
        self.unit = unit

    @classmethod
    def build(
        cls,
        outcomes: Mapping[OutcomeKey, Outcome],
        records: Sequence["Record"],
        ladder: Sequence[str],
        costs: CostModel | None = None,
    ) -> "Replay":
        costs = costs or CostModel.build(outcomes.values())
        entries: dict[OutcomeKey, _Entry] = {}
        for record in records:
            for model in ladder:
                outcome = outcomes.get((record.id, model))
                if outcome is None:
                    continue
                per = costs.votes(outcome)
                cum = tuple(itertools.accumulate(per))
                answers = tuple(_normalize(v.text, record.match) for v in outcome.votes)
                first = outcome.votes[0] if outcome.votes else None
                entries[(record.id, model)] = _Entry(
                    answers, tuple(outcome.correct(record)), cum,
                    first.signals if first is not None else None,
                    first is not None and first.output_tokens >= grading.max_tokens_for(record.match),
                    outcome.prefix_key, costs.prefix(outcome),
                )
        return cls(entries, records, ladder, costs.unit)

    def simulate(
        self,
        assignments: Mapping[str, str],
        thresholds: Mapping[str, float],
        quality: "QualityCheck",
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        p_correct: Mapping[OutcomeKey, float] | None = None,
        votes: int = 1,
    ) -> SimResult:
        """Replay the cascade for every record: see the module function `simulate`.

        With `p_correct` (each (query, model)'s deferral estimate, `deferral_p`), the rungs
        below the top run the deferral check instead: `votes` votes drawn, the greedy
        answer kept when `quality.accept_deferral(p, threshold, answer)`; the top rung answers
        greedily.
        """
        k, early = quality.k, quality.early_stop
        last = len(self.ladder) - 1
        traces = []
        visited: list[_Entry] = []  # the entry of every step, in order, for `prefix_shares`
        for record in self.records:
            start = assignments.get(record.id)
            if start is None:
                raise CreError(f"query {record.id!r} has no starting model in the assignments")
            try:
                rung = self.ladder.index(start)
            except ValueError:
                raise CreError(f"query {record.id!r} starts on {start!r}, which is not on the ladder") from None
            local = overrides.get(record.id, {}) if overrides else {}
            steps: list[SimStep] = []
            total = 0.0
            while True:
                model = self.ladder[rung]
                entry = self.entries.get((record.id, model))
                if entry is None:
                    raise CreError(
                        f"no recorded outcome for query {record.id!r} on {model!r}: collect outcomes "
                        "for every ladder model first (`cre fit` does)"
                    )
                threshold = local.get(model, thresholds[model])
                if p_correct is not None:
                    if not entry.answers:
                        raise CreError(
                            f"query {record.id!r} has only a correctness label for {model!r}, no recorded "
                            "greedy answer, so the deferral check cannot be replayed on it"
                        )
                    used = 1 if rung == last else min(votes, len(entry.answers))
                    accept = rung == last or accept_deferral(p_correct[(record.id, model)], threshold, entry.answers[0])
                    cost = entry.cumcost[used - 1]
                    total += cost
                    steps.append(SimStep(model, greedy_agreement(entry.answers[:used]), used, accept, cost))
                    visited.append(entry)
                    if accept:
                        traces.append(QueryTrace(record.id, start, steps, entry.answers[0], entry.correct[0], total))
                        break
                    rung += 1
                    continue
                if entry.answers:
                    if not done(entry.answers, k, threshold, early):
                        raise CreError(
                            f"query {record.id!r} has {len(entry.answers)} recorded votes on {model!r}, "
                            f"fewer than the k={k} this replay may need: collect outcomes with the "
                            "same quality settings"
                        )
                    d = decide(entry.answers, k, threshold, early)
                    agreement, used, accept, index, answer = d.agreement, d.used, d.accept, d.index, d.answer
                elif needed(threshold, k) <= 1:
                    # A label is one known vote; it decides only when one vote is enough.
                    agreement, used, accept, index, answer = 1.0, 1, True, 0, ""
                else:
                    raise CreError(
                        f"query {record.id!r} has only a correctness label for {model!r}, no recorded "
                        f"votes, so its quality check at threshold {threshold} cannot be replayed. "
                        "Collect votes for it (drop the label) or use threshold 0 for that model."
                    )
                cost = entry.cumcost[used - 1]
                total += cost
                steps.append(SimStep(model, agreement, used, accept, cost))
                visited.append(entry)
                if accept or rung == last:
                    traces.append(QueryTrace(record.id, start, steps, answer, entry.correct[index], total))
                    break
                rung += 1
        return SimResult(_with_prefixes(traces, visited), self.unit)


def _with_prefixes(traces: list[QueryTrace], visited: Sequence[_Entry]) -> list[QueryTrace]:
    """`traces` with each step's share of its shared examples' cost added (`prefix_shares`)."""
    shares = prefix_shares(visited)
    if not any(shares):
        return traces
    it = iter(shares)
    out = []
    for t in traces:
        added = [next(it) for _ in t.steps]
        steps = [replace(step, cost=step.cost + extra) for step, extra in zip(t.steps, added)]
        out.append(replace(t, steps=steps, cost=t.cost + sum(added)))
    return out


def simulate(
    assignments: Mapping[str, str],
    outcomes: Mapping[OutcomeKey, Outcome],
    records: Sequence["Record"],
    ladder: Sequence[str],
    thresholds: Mapping[str, float],
    quality: "QualityCheck",
    costs: CostModel | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> SimResult:
    """Replay the cascade on recorded votes, exactly as `cre ask --router` would run it.

    Each record starts on `assignments[record.id]`. On each rung its recorded votes are
    normalised with `grading.normalize(text, record.match)` and decided by
    `quality.decide(votes, k, threshold, early_stop)`: accept, or escalate to the next
    larger rung; the top rung's decision is final. The threshold is
    `overrides[query_id][model]` when given, else `thresholds[model]`. A query's cost is the
    sum of the costs of the votes actually drawn on every rung it visited (vote 0 carries
    prompt processing). `costs` defaults to measured seconds. For many threshold settings
    on the same outcomes, build a `Replay` once and call its `simulate`.
    """
    return Replay.build(outcomes, records, ladder, costs).simulate(assignments, thresholds, quality, overrides)


@dataclass
class Tuning:
    thresholds: dict[str, float]
    result: SimResult
    reference: SimResult  # every query on the strongest model, at its threshold
    met: bool  # whether the budget was met; if not, the closest setting is returned
    tried: int


def threshold_grid(k: int) -> list[float]:
    """Thresholds j/k, j = 0..k: one per distinct number of agreeing votes required."""
    return [j / k for j in range(k + 1)]


def tune_thresholds(
    replay: Replay,
    assignments: Mapping[str, str],
    quality: "QualityCheck",
    budget: Budget,
    top_threshold: float = 0.0,
    grid: Sequence[float] | None = None,
) -> Tuning:
    """Each non-top model's threshold from `grid` (default `threshold_grid(k)`) for `budget`.

    The reference is every query answered by the strongest model at `top_threshold`.
    "retain": the cheapest setting whose accuracy is at least value x the reference's
    (ties: the more accurate). "max_cost": the most accurate setting whose cost is at most
    value x the reference's (ties: the cheaper). Remaining ties keep the default threshold
    (DEFAULT_THRESHOLD), then the lower one. If no setting meets the budget, the closest
    is returned with `met=False`: the most accurate for "retain", the cheapest for
    "max_cost". The search is exhaustive: len(grid) ** (rungs - 1) replays.
    """
    ladder = replay.ladder
    top = ladder[-1]
    grid = list(grid) if grid is not None else threshold_grid(quality.k)
    if not grid:
        raise ValueError("tune_thresholds needs a non-empty threshold grid")
    reference = replay.simulate({r.id: top for r in replay.records}, {top: top_threshold}, quality)
    candidates: list[tuple[tuple[float, ...], dict[str, float], SimResult, bool]] = []
    # Settings closest to the defaults come first, so that where thresholds make no
    # difference on these records (a rung no query visits) the defaults are kept.
    combos = sorted(
        itertools.product(grid, repeat=len(ladder) - 1),
        key=lambda combo: sum(abs(t - DEFAULT_THRESHOLD) > _EPS for t in combo),
    )
    for combo in combos:
        thresholds = {**dict(zip(ladder[:-1], combo)), top: top_threshold}
        result = replay.simulate(assignments, thresholds, quality)
        key = budget.rank(result.accuracy, result.cost, reference.accuracy, reference.cost)
        candidates.append((key, thresholds, result, key[0]))
    # max() keeps the first of equal keys: the defaults, then lower thresholds (fewer votes).
    _, thresholds, result, met = max(candidates, key=lambda c: c[0])
    return Tuning(thresholds, result, reference, met, len(candidates))


def assignments_for(records: Iterable["Record"], labels: Sequence[int], choice: Choice) -> dict[str, str]:
    """Each record's starting model under `choice` (clustered by `labels`, aligned with records)."""
    return {r.id: choice.models.get(int(c), choice.fallback) for r, c in zip(records, labels)}


@dataclass
class Plan:
    """Everything calibration decided, and the evidence for it."""

    table: StatsTable
    choice: Choice
    thresholds: dict[str, float]
    unit: str  # of every cost figure in the plan
    result: SimResult | None  # the cascade replayed on the records; None without votes
    reference: SimResult | None  # every record on the strongest model
    budget_met: bool | None  # by `result`, per `tune_thresholds`; None when not replayed
    # Answered examples (`cre fit --shots`, `choose_shots`): cluster -> [[prompt, answer]],
    # and cluster -> model -> how many of them it is shown.
    exemplars: dict[int, list[list[str]]] = field(default_factory=dict)
    shots: dict[int, dict[str, int]] = field(default_factory=dict)


def plan(
    records: Sequence["Record"],
    clusters: Mapping[str, int],
    outcomes: Mapping[OutcomeKey, Outcome],
    settings: "ModelConfig",
    budget: Budget,
    quality: "QualityCheck",
) -> Plan:
    """Choose each cluster's model for `budget`, then tune the thresholds on the same records.

    `clusters` maps each record id to its cluster. Costs are in price units when every
    ladder model has a price, else measured seconds (see `CostModel`). Threshold tuning
    replays recorded votes, so when any outcome is a label only, the default thresholds
    are kept and nothing is replayed.
    """
    ladder = list(settings.ladder)
    costs = CostModel.build(outcomes.values(), settings.ladder_specs())
    labels = [int(clusters[r.id]) for r in records]
    table = cluster_stats(labels, records, outcomes, ladder, costs)
    choice = choose_models(table, budget)
    if any(o.source == "label" for o in outcomes.values()):
        console.warn(
            "some outcomes are correctness labels without recorded votes, so the quality-check "
            f"thresholds keep their defaults ({DEFAULT_THRESHOLD} below the top rung) instead of being tuned"
        )
        return Plan(table, choice, default_thresholds(ladder), costs.unit, None, None, None)
    replay = Replay.build(outcomes, records, ladder, costs)
    tuning = tune_thresholds(replay, assignments_for(records, labels, choice), quality, budget)
    return Plan(table, choice, tuning.thresholds, costs.unit, tuning.result, tuning.reference, tuning.met)


# ---------------------------------------------------------------- answered examples (cre fit --shots)

Shots = tuple[tuple[str, str], ...]


def exemplar_answer(record: "Record") -> str | None:
    """The answer an exemplar shows: its reference in the form the system prompt asks for
    ("(B)", a plain number, the text); None when it cannot be one (a regex, no reference)."""
    if not record.reference or record.match in (None, "regex"):
        return None
    ref = record.reference[0]
    if record.match == "choice":
        letter = grading.normalize(ref, "choice")
        return f"({letter})" if letter else None
    if record.match == "numeric":
        return grading.normalize(ref, "numeric") or None
    return ref.strip() or None


def pick_exemplars(records: Sequence["Record"], n: int) -> list["Record"]:
    """Up to `n` of a cluster's labelled `records` to show as answered examples, in log order.

    Distinct answers come first (different option letters, different numbers), so the
    examples do not teach one answer; prompts or answers over the router file's caps are
    never chosen.
    """
    from crecli.schema import SHOT_ANSWER_CHARS, SHOT_PROMPT_CHARS

    usable = []
    for r in records:
        answer = exemplar_answer(r)
        if answer is not None and len(r.prompt.strip()) <= SHOT_PROMPT_CHARS and len(answer) <= SHOT_ANSWER_CHARS:
            usable.append((r, answer))
    chosen: list["Record"] = []
    seen: set[str] = set()
    for r, answer in usable:
        if len(chosen) < n and answer not in seen:
            chosen.append(r)
            seen.add(answer)
    for r, _ in usable:
        if len(chosen) < n and r not in chosen:
            chosen.append(r)
    return chosen


def resolve_shots(
    base: Mapping[OutcomeKey, Outcome],
    shown: Mapping[OutcomeKey, Outcome],
    shots: Mapping[OutcomeKey, Shots],
) -> dict[OutcomeKey, Outcome]:
    """The outcome each (query, model) answers with: `shown[key]` (recorded after the
    examples `shots[key]`) where it has examples, else `base[key]`.

    An outcome with examples carries the tokens they add (its prompt tokens less the plain
    prompt's), and a key naming the model and the examples, so costs count the shared
    prefix once per batch (`prefix_shares`).
    """
    from crecli.outcomes import prompt_sha256

    out: dict[OutcomeKey, Outcome] = {}
    for key, outcome in base.items():
        examples = shots.get(key, ())
        if not examples or key not in shown:
            out[key] = outcome
            continue
        with_shots = shown[key]
        out[key] = replace(
            with_shots,
            prefix_tokens=max(0, with_shots.prompt_tokens - outcome.prompt_tokens),
            prefix_key=f"{key[1]}:{prompt_sha256('', examples)[:16]}",
        )
    return out


@dataclass
class ShotPlan:
    """What `choose_shots` decided: each cluster's exemplars and each model's count."""

    exemplars: dict[int, list[list[str]]]  # cluster -> [[prompt, answer], ...]
    counts: dict[int, dict[str, int]]  # cluster -> model -> shots shown (0 left out)
    held_out: set[str]  # ids of the exemplar queries: they never answer with examples of their own
    accuracy: dict[int, dict[str, dict[int, tuple[int, int]]]]  # cluster -> model -> shots -> (right, n)
    # shots -> the outcomes compared: 0 the plain ones, each other count those after that many examples
    answered: dict[int, Mapping[OutcomeKey, Outcome]] = field(default_factory=dict)

    def shots(self, cid: int, model: str) -> Shots:
        return shots_of(self.exemplars.get(cid, []), self.counts.get(cid, {}).get(model, 0))

    def apply(
        self, records: Sequence["Record"], clusters: Mapping[str, int], ladder: Sequence[str]
    ) -> tuple[list["Record"], dict[OutcomeKey, Outcome]]:
        """The records left once the exemplar queries are out, and the outcome each answers
        with under this plan (`resolve_shots`), from the outcomes the choice compared."""
        kept = [r for r in records if r.id not in self.held_out]
        wanted = {(r.id, m): self.shots(clusters[r.id], m) for r in kept for m in ladder}
        wanted = {key: examples for key, examples in wanted.items() if examples}
        base = {key: o for key, o in self.answered[0].items() if key[0] not in self.held_out}
        shown = {key: o for key, examples in wanted.items() if (o := self.answered[len(examples)].get(key)) is not None}
        return kept, resolve_shots(base, shown, wanted)


def choose_shots(
    records: Sequence["Record"],
    clusters: Mapping[str, int],
    settings: "ModelConfig",
    store: "OutcomeStore",
    quality: "QualityCheck",
    base: Mapping[OutcomeKey, Outcome],
    counts: Sequence[int],
) -> ShotPlan:
    """Per (cluster, model), how many answered examples (one of `counts`) to show, by held-out accuracy.

    Each cluster's exemplars are `pick_exemplars` of its records. Every other record of the
    cluster is answered with the first n of them for each n in `counts` (the store records
    these, grouped by cluster), and the n with the most right answers wins; ties go to
    fewer examples, the cheaper prompt. An exemplar query is never scored on its own
    examples; it is left out of the choice.
    """
    from crecli import outcomes as outcomes_mod

    ladder = list(settings.ladder)
    top = max(counts)
    members: dict[int, list["Record"]] = {}
    for r in records:
        if clusters[r.id] >= 0:
            members.setdefault(clusters[r.id], []).append(r)
    exemplars: dict[int, list[list[str]]] = {}
    held_out: set[str] = set()
    for cid, group in sorted(members.items()):
        chosen = pick_exemplars(group, top)
        # Too few examples to show the most, or too few queries left to score them on.
        if len(chosen) < top or len(group) - len(chosen) < 2:
            continue
        exemplars[cid] = [[r.prompt.strip(), str(exemplar_answer(r))] for r in chosen]
        held_out.update(r.id for r in chosen)
    scored = [r for r in records if clusters[r.id] in exemplars and r.id not in held_out]
    shown: dict[int, Mapping[OutcomeKey, Outcome]] = {0: base}
    for n in sorted(set(counts) - {0}):
        wanted = {(r.id, m): shots_of(exemplars[clusters[r.id]], n) for r in scored for m in ladder}
        console.status(f"Answering {len(scored)} queries after {n} answered example(s) of their cluster...")
        shown[n] = outcomes_mod.collect(scored, settings, store, quality, shots=wanted)
    accuracy: dict[int, dict[str, dict[int, tuple[int, int]]]] = {}
    chosen_counts: dict[int, dict[str, int]] = {}
    by_id = {r.id: r for r in scored}
    for cid in exemplars:
        ids = [r.id for r in scored if clusters[r.id] == cid]
        for m in ladder:
            tally: dict[int, tuple[int, int]] = {}
            for n, found in shown.items():
                runs = [found[(i, m)] for i in ids if (i, m) in found and found[(i, m)].source == "run"]
                tally[n] = (sum(o.correct(by_id[o.query_id])[0] for o in runs), len(runs))
            accuracy.setdefault(cid, {})[m] = tally
            if len({n for _, n in tally.values()}) != 1:
                continue  # some answers are labels only: no fair comparison
            best = max(sorted(tally), key=lambda n: tally[n][0])  # first of equals: fewer examples
            if best:
                chosen_counts.setdefault(cid, {})[m] = best
    return ShotPlan(exemplars, chosen_counts, held_out, accuracy, shown)


# ---------------------------------------------------------------- cre calibrate: cross-validated tuning

# Per-cluster model choices are swept over these prices of accuracy (`choose_by_weight`);
# the threshold grid is swept for each. 0 is every cluster's cheapest model, the last its
# most accurate, which may be better than the strongest. Steps of 0.125 up to 2 and 0.25 up
# to 12: on the 1,400-query log the cheapest price keeping 98% fell between 3 and 6, where
# an older grid (3, 4, 6, 10) could only overshoot it, by about 0.8 points of cost
# (per-task choices, held out, ten fold seeds).
WEIGHT_GRID = tuple([i / 8 for i in range(16)] + [2 + i / 4 for i in range(41)] + [16.0, 1e6])


@dataclass
class Data:
    """A labelled log prepared for replay: records, their clusters, and outcomes."""

    records: list["Record"]
    routes: list["RouteDecision"]  # each record's cluster and starting model, as `cre ask` routes it
    outcomes: dict["OutcomeKey", "Outcome"]
    costs: CostModel
    replay: Replay
    log_sha256: str = ""

    @functools.cached_property
    def clusters(self) -> list[int]:
        # Cached: a calibration sweep reads it once per replayed query, thousands of times,
        # and rebuilding it each time was two thirds of `cre calibrate`'s run time.
        return [r.cluster for r in self.routes]


def prepare(
    router: "RouterFile",
    settings: "ModelConfig",
    log: Path,
    store: Path | None = None,
    reader: "LogOptions | None" = None,
    unit: str | None = None,
) -> Data:
    """Read `log` with `reader` (default: as the router's fit read its log), route every
    labelled query as `cre ask` would, and collect the missing outcomes.

    Costs are priced afresh (today's `cre models bench` speeds or prices), never taken from
    the router's stored statistics, in `unit` when given (else the ladder's default unit,
    see `costs`).
    """
    from crecli import outcomes as outcomes_mod
    from crecli.costs import UNITS

    if unit is not None and unit not in UNITS:
        raise CreError(f"--cost-unit {unit!r}: use one of {', '.join(UNITS)}")

    reader = reader or router.fit.reader
    read = reader.read(log)
    if read.bad:
        console.status(f"Skipped {len(read.bad)} bad line(s), first: {read.bad[0].source}: {read.bad[0].reason}")
    records = [r for r in read.records if r.reference is not None or r.labels]
    if not records:
        raise CreError(f"{log}: no labelled queries (a `reference` or `labels` field) to evaluate on")
    ladder = router.ladder_names
    missing = [m for m in ladder if m not in settings.models]
    if missing:
        raise CreError(f"the router's ladder has {', '.join(missing)}, which your models.toml lacks")
    routes = assign(router, [r.prompt for r in records])
    shown_prompts = {q for c in router.clusters for q, _ in c.exemplars}
    if shown_prompts:
        keep = [i for i, r in enumerate(records) if r.prompt.strip() not in shown_prompts]
        if len(keep) < len(records):
            console.status(f"Left out {len(records) - len(keep)} queries that the router shows as answered "
                           "examples: they would be answered after their own answer")
        if not keep:
            raise CreError(f"{log}: every labelled query is one of the router's answered examples")
        records, routes = [records[i] for i in keep], [routes[i] for i in keep]
    every = {(r.id, m): router.shots(d.cluster, m) for r, d in zip(records, routes) for m in ladder}
    shots = {key: examples for key, examples in every.items() if examples}
    path = store or outcomes_mod.default_store_path()
    with outcomes_mod.OutcomeStore(path) as st:
        found = outcomes_mod.collect(records, settings, st, router.quality, models=ladder)
        if shots:
            ids = {rid for rid, _ in shots}
            shown = outcomes_mod.collect([r for r in records if r.id in ids], settings, st, router.quality,
                                         models=ladder, shots=shots)
            found = resolve_shots(found, shown, shots)
    costs = CostModel.build(found.values(), [settings.get(m) for m in ladder], unit)
    replay = Replay.build(found, records, ladder, costs)
    return Data(records, routes, found, costs, replay, read.sha256)


def assign(router: "RouterFile", prompts: Sequence[str]) -> list["RouteDecision"]:
    """Routes exactly as `cre ask` decides them (embedded in batches, with a progress bar)."""
    from crecli.embed import embed_texts
    from crecli.route import route_vectors

    return route_vectors(router, embed_texts(router.embedder, list(prompts)))


def fitted_log(router: "RouterFile", log: Path | None = None) -> Path:
    """`log` when given, else the log the router was fitted on, where the fit found it.

    The fit records the log's absolute path and sha256; a log that is no longer there is an
    error that says so (pass --log), and `check_log` warns when it changed since.
    """
    if log is not None:
        return log
    recorded = router.fit.log
    if not recorded:
        raise CreError("the router does not record the log it was fitted on; pass --log FILE")
    path = Path(recorded)
    if not path.is_file():
        raise CreError(
            f"the router was fitted on {recorded}, which is not there any more (moved or deleted); "
            "pass --log FILE to calibrate on it where it is now"
        )
    return path


def check_log(router: "RouterFile", log: Path, data: Data) -> None:
    """Warn when the router's own log changed since the fit (its sha256 differs)."""
    fit = router.fit
    if fit.log_sha256 and data.log_sha256 and data.log_sha256 != fit.log_sha256 and Path(fit.log or "") == log:
        console.warn(
            f"{log} has changed since the router was fitted on it (sha256 {fit.log_sha256[:12]}… then, "
            f"{data.log_sha256[:12]}… now); calibrating on it as it is now"
        )


@dataclass(frozen=True)
class Setting:
    weight: float  # per-cluster model choice: `choose_by_weight(table, weight)`
    thresholds: tuple[tuple[str, float], ...]

    def label(self) -> str:
        """e.g. "weight 1.5 | thresholds 0.8/0.6/0.0" (thresholds smallest rung first)."""
        return f"weight {self.weight:g} | thresholds " + "/".join(f"{v:.1f}" for _, v in self.thresholds)


def _table(data: Data, idx: Sequence[int], ladder: list[str]) -> StatsTable:
    return cluster_stats([data.clusters[i] for i in idx], [data.records[i] for i in idx], data.outcomes, ladder, data.costs)


def _simulate(
    data: Data,
    idx: Sequence[int],
    choice: Choice,
    thresholds: Mapping[str, float],
    quality: "QualityCheck",
    p_correct: Mapping[OutcomeKey, float] | None = None,
    votes: int = 1,
) -> SimResult:
    sub = Replay(data.replay.entries, [data.records[i] for i in idx], data.replay.ladder, data.replay.unit)
    starts = {data.records[i].id: choice.models.get(data.clusters[i], choice.fallback) for i in idx}
    return sub.simulate(starts, thresholds, quality, p_correct=p_correct, votes=votes)


def sweep(data: Data, fit_idx: Sequence[int], eval_idx: Sequence[int], ladder: list[str], quality: "QualityCheck") -> list[tuple[Setting, SimResult]]:
    """Every (weight, thresholds) setting: cluster models chosen on `fit_idx`, replayed on `eval_idx`."""
    return _replay_grid(data, _table(data, fit_idx, ladder), eval_idx, _agreement_combos(ladder, quality.k), quality)


def _agreement_combos(ladder: Sequence[str], k: int) -> list[dict[str, float]]:
    """The agreement check's threshold settings: `threshold_grid(k)` for each rung below the
    top; the top rung either answers greedily or takes a 3-of-5 majority."""
    return [{**dict(zip(ladder[:-1], combo)), ladder[-1]: top}
            for combo in itertools.product(threshold_grid(k), repeat=len(ladder) - 1) for top in (0.0, 0.6)]


def _deferral_combos(ladder: Sequence[str]) -> list[dict[str, float]]:
    """The deferral check's threshold settings: `DEFERRAL_GRID` for each rung below the top,
    whose greedy answer is final."""
    return [{**dict(zip(ladder[:-1], combo)), ladder[-1]: 0.0}
            for combo in itertools.product(DEFERRAL_GRID, repeat=len(ladder) - 1)]


def _replay_grid(
    data: Data,
    table: StatsTable,
    eval_idx: Sequence[int],
    combos: Sequence[Mapping[str, float]],
    quality: "QualityCheck",
    p_correct: Mapping[OutcomeKey, float] | None = None,
    votes: int = 1,
) -> list[tuple[Setting, SimResult]]:
    """Every `WEIGHT_GRID` price x every thresholds in `combos`, cluster models chosen on
    `table` and the cascade replayed on `eval_idx`. Neighbouring prices often choose the
    same models; those reuse the first one's replays instead of repeating them."""
    out: list[tuple[Setting, SimResult]] = []
    done: dict[tuple[Any, ...], list[SimResult]] = {}
    for weight in WEIGHT_GRID:
        choice = choose_by_weight(table, weight)
        key = (tuple(sorted(choice.models.items())), choice.fallback)
        results = done.get(key)
        if results is None:
            results = done[key] = [_simulate(data, eval_idx, choice, t, quality, p_correct, votes) for t in combos]
        out.extend((Setting(weight, tuple(t.items())), r) for t, r in zip(combos, results))
    return out


@dataclass(frozen=True)
class Figures:
    accuracy: float
    mean_cost: float
    escalation_rate: float


def greedy(data: Data, idx: Sequence[int], model_of: Callable[[int], str]) -> tuple[float, float]:
    """Accuracy and mean cost of the greedy answer of model `model_of(i)` for each query i in `idx`."""
    entries = [data.replay.entries[(data.records[i].id, model_of(i))] for i in idx]
    n = len(entries) or 1
    cost = sum(e.cumcost[0] for e in entries) + sum(prefix_shares(entries))
    return sum(e.correct[0] for e in entries) / n, cost / n


def reference(data: Data, idx: Sequence[int], ladder: list[str]) -> tuple[float, float]:
    """Accuracy and mean cost of always using the strongest model (its greedy answer)."""
    return greedy(data, idx, lambda i: ladder[-1])


def _pick(candidates: Sequence[tuple[Setting, Figures]], budget: Budget, ref: tuple[float, float]) -> tuple[Setting, Figures, bool]:
    """The setting that best meets `budget` (`Budget.rank`); if none meets it, the closest one."""
    ref_acc, ref_cost = ref
    # max() keeps the first of equal keys, so ties go to the earlier setting.
    setting, figures = max(candidates, key=lambda c: budget.rank(c[1].accuracy, c[1].mean_cost, ref_acc, ref_cost))
    return setting, figures, budget.rank(figures.accuracy, figures.mean_cost, ref_acc, ref_cost)[0]


def estimate(held_out: "Figures", in_sample: "SimResult | Figures") -> "Figures":
    """What calibration expects of a setting on new queries: the mean of its cross-validated
    and its in-sample figures.

    Held-out figures score cluster models chosen on four fifths of the log; the router keeps
    the models chosen on all of it. In-sample figures score those very models, on the
    queries they were chosen on. The first are noisier, the second flattering, most of all
    for a fitted deferral check and small clusters. With the tasks of the 1,400-query log as
    clusters (routing only, ten fold seeds, cross-fitted; `bench/price_choice.py`), picking
    the cheapest price that keeps 98% on held-out figures kept 98.0% [95.8-99.3] of the
    strongest model's accuracy at 80.9% [78.9-84.0] of its cost; on this mean, 98.1%
    [95.8-99.3] at 80.5% [78.9-82.7]; on in-sample figures, 98.1% at 80.0%. For 99%: 98.4% at
    86.3%, 98.4% at 83.2%, 98.9% at 82.6%. The mean is the hedge between the two: it gives
    up part of the in-sample rule's saving in exchange for never trusting a fitted model's
    score on its own training data alone. It flatters more as clusters shrink: on the
    480-query log (about 24 queries a cluster) in-sample figures overstated a price's
    accuracy by about 3 points and the mean by 1.5-2 (held-out figures: within about 0.8),
    so there calibration lands under its target. What a calibration reports as held out
    stays the cross-validated figures.
    """
    return Figures(
        (held_out.accuracy + in_sample.accuracy) / 2,
        (held_out.mean_cost + in_sample.mean_cost) / 2,
        (held_out.escalation_rate + in_sample.escalation_rate) / 2,
    )


def _with_chosen(front: list[tuple[Setting, Any]], setting: Setting, figures: Any) -> list[tuple[Setting, Any]]:
    """`front` with the chosen setting in it, in cost order, even where its held-out
    figures are beaten: it was chosen on `estimate`, not on those alone."""
    if any(s == setting for s, _ in front):
        return front
    return sorted([*front, (setting, figures)], key=lambda p: (p[1].mean_cost, -p[1].accuracy))


def frontier(points: Sequence[tuple[Setting, Any]]) -> list[tuple[Setting, Any]]:
    """The settings no other setting beats on both accuracy and cost, cheapest first."""
    ordered = sorted(points, key=lambda p: (p[1].mean_cost, -p[1].accuracy))
    front: list[tuple[Setting, Any]] = []
    for setting, result in ordered:
        if not front or result.accuracy > front[-1][1].accuracy + 1e-12:
            front.append((setting, result))
    return front


def folds(n: int, k: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


# ---------------------------------------------------------------- the calibrated deferral check

# P(correct) thresholds swept per rung below the top; 1.0 always escalates.
DEFERRAL_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Ridge penalty on the standardised weights: with a few hundred labelled answers per rung
# it barely moves a weight the data supports, and keeps a feature that is constant in the
# training folds (the margin on a log without choice queries) at zero.
L2 = 1.0


def fit_logistic(x: Any, y: Any, l2: float = L2, iterations: int = 50) -> tuple[Any, float]:
    """Ridge logistic regression by Newton's method; weights and bias on the raw features.

    Features are standardised for the fit (so one penalty suits every scale) and the
    weights mapped back, so the stored model is a plain dot product. The bias gets a
    token penalty, which keeps it finite when every training answer was right (or wrong).
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    mu = x.mean(axis=0) if n else np.zeros(d)
    sd = x.std(axis=0) if n else np.ones(d)
    sd[sd < 1e-9] = 1.0
    a = np.hstack([(x - mu) / sd, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-3
    beta = np.zeros(d + 1)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -30, 30)))
        grad = a.T @ (p - y) + reg * beta
        hess = a.T @ (a * (p * (1 - p))[:, None]) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    weights = beta[:d] / sd
    return weights, float(beta[d] - np.sum(beta[:d] * mu / sd))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for predicting `labels` (ties count half);
    None when either class is absent."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    # Mann-Whitney U from average ranks.
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2
        rank_sum += mean_rank * sum(1 for _, y in ranked[i:j] if y)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def cluster_prior(table: StatsTable, cid: int, model: str) -> float:
    """`model`'s shrunk accuracy in cluster `cid`; its log-wide accuracy outside every
    cluster. What `RouterFile.prior` reads back from the router this table goes into."""
    info = table.clusters.get(cid) if cid >= 0 else None
    if info is None:
        return table.overall.models[model].accuracy
    return info.models[model].shrunk_accuracy


def _table_prior(data: Data, table: StatsTable) -> Callable[[int, str], float]:
    """`deferral_p`'s prior for calibration: record i's cluster prior for a model in `table`."""
    return lambda i, model: cluster_prior(table, data.clusters[i], model)


def _loo_prior(table: StatsTable, cid: int, model: str, correct: bool) -> float:
    # A training answer's own label must not feed its prior, or the fitted model would
    # trust the prior more than it deserves on prompts it has not seen.
    info = table.clusters.get(cid) if cid >= 0 else None
    if info is None:
        return table.overall.models[model].accuracy
    st = info.models[model]
    return shrink(st.correct - correct, st.n - 1, table.overall.models[model].accuracy, table.prior_strength)


def train_deferral(data: Data, idx: Sequence[int], table: StatsTable, model: str, votes: int) -> Deferral:
    """`model`'s deferral model, fitted on the recorded answers of the records `idx`."""
    rows: list[list[float | None]] = []
    ys: list[bool] = []
    for i in idx:
        entry = data.replay.entries.get((data.records[i].id, model))
        if entry is None or not entry.answers:
            continue
        y = entry.correct[0]
        rows.append(entry.features(votes, _loo_prior(table, data.clusters[i], model, y)))
        ys.append(y)
    names = feature_names(votes)
    fill = []
    for j in range(len(names)):
        seen = [r[j] for r in rows if r[j] is not None]
        fill.append(sum(seen) / len(seen) if seen else 0.0)  # type: ignore[arg-type]
    filled = [[f if v is None else v for v, f in zip(r, fill)] for r in rows]
    weights, bias = fit_logistic(filled, ys) if rows else ([0.0] * len(names), 0.0)
    return Deferral(names, tuple(float(w) for w in weights), bias, tuple(fill), table.overall.models[model].accuracy)


def deferral_p(
    data: Data, idx: Sequence[int], rules: Mapping[str, Deferral], prior_of: Callable[[int, str], float], votes: int
) -> dict[OutcomeKey, float]:
    """Each (record, model)'s P(correct) under `rules`, as the live check computes it;
    `prior_of(i, model)` is record i's prior for `model`."""
    out: dict[OutcomeKey, float] = {}
    for i in idx:
        rid = data.records[i].id
        for model, rule in rules.items():
            entry = data.replay.entries.get((rid, model))
            if entry is not None and entry.answers:
                out[(rid, model)] = rule.p_correct(entry.features(votes, prior_of(i, model)))
    return out


def sweep_deferral(
    data: Data, fit_idx: Sequence[int], eval_idx: Sequence[int], ladder: list[str], quality: "QualityCheck", votes: int
) -> tuple[list[tuple[Setting, SimResult]], dict[OutcomeKey, float]]:
    """Every (weight, P(correct) thresholds) setting of the deferral check, fitted on
    `fit_idx` and replayed on `eval_idx`; also the held-out P(correct) of `eval_idx`."""
    table = _table(data, fit_idx, ladder)
    # The top rung gets a model too, for the signal report only: its answer is final, but
    # its doubt is what a larger rung above it (a remote server) would act on.
    rules = {m: train_deferral(data, fit_idx, table, m, votes) for m in ladder}
    p = deferral_p(data, eval_idx, rules, _table_prior(data, table), votes)
    return _replay_grid(data, table, eval_idx, _deferral_combos(ladder), quality, p, votes), p


def signal_report(data: Data, p_held_out: Mapping[OutcomeKey, float], ladder: Sequence[str], votes: int) -> dict[str, dict[str, Any]]:
    """Per model: held-out AUROC, for predicting that the greedy answer is right, of the
    deferral model's P(correct) and of each raw signal, beside vote agreement."""
    report: dict[str, dict[str, Any]] = {}
    for model in ladder:
        cols: dict[str, tuple[list[float], list[bool]]] = {}

        def add(name: str, value: float | None, y: bool) -> None:
            if value is not None:
                col = cols.setdefault(name, ([], []))
                col[0].append(value)
                col[1].append(y)

        for record in data.records:
            entry = data.replay.entries.get((record.id, model))
            if entry is None or not entry.answers:
                continue
            y = entry.correct[0]
            add("p_correct", p_held_out.get((record.id, model)), y)
            if entry.signals is not None:
                add("min_logprob", entry.signals.min_logprob, y)
                add("mean_logprob", entry.signals.mean_logprob, y)
                add("margin", entry.signals.margin, y)
            if len(entry.answers) > 1:
                add(f"agreement of {len(entry.answers)} votes", greedy_agreement(entry.answers), y)
        report[model] = {name: {"auroc": auroc(*col), "n": len(col[0])} for name, col in cols.items()}
        if "p_correct" in cols:
            # What acting on this rung's doubt could buy: how many answers fall below
            # P(correct) 0.5, and how often those are right, against the rest.
            ps, ys = cols["p_correct"]
            low = [y for p, y in zip(ps, ys) if p < 0.5]
            high = [y for p, y in zip(ps, ys) if p >= 0.5]
            report[model]["p_correct"].update(
                doubtful_share=len(low) / len(ps),
                doubtful_accuracy=sum(low) / len(low) if low else None,
                confident_accuracy=sum(high) / len(high) if high else None,
            )
    return report


@dataclass
class Calibration:
    budget: Budget
    setting: Setting
    choice: Choice
    thresholds: dict[str, float]
    in_sample: dict[str, float]
    held_out: dict[str, float]
    estimate: dict[str, float]  # what the setting was chosen on (`estimate`)
    reference: dict[str, float]
    frontier: list[dict[str, Any]]
    n: int
    folds: int
    budget_met: bool
    seconds: float
    table: StatsTable | None = None  # every cluster's statistics on all queries, at today's costs
    unit: str = "seconds"  # of every cost figure
    result: SimResult | None = None  # the chosen setting replayed on all queries
    reference_result: SimResult | None = None  # every query on the strongest model
    deferral: DeferralCheck | None = None  # the fitted deferral check ("deferral" only)
    signals: dict[str, dict[str, Any]] | None = None  # held-out AUROC per model and signal
    check: str = DEFAULT_CHECK


def recalibrate(
    router: "RouterFile",
    data: Data,
    budget: Budget,
    n_folds: int = 5,
    seed: int = 0,
    check: str = DEFAULT_CHECK,
    votes: int = 1,
) -> Calibration:
    """Choose per-cluster models and the quality check's thresholds for `budget`, by cross-validation.

    A setting is a price of accuracy for the per-cluster model choice (`choose_by_weight`)
    plus one threshold per rung. Each setting is scored on held-out folds: its cluster models
    are chosen on the other folds and its cascade replayed on the fold, so a setting that
    merely fits the noise of small clusters scores badly. Its cluster models are then chosen
    once more on all queries for the router, and scored there too (in sample). The setting
    that meets the budget on `estimate` of the two at the least cost (or the best accuracy,
    for "max_cost") is chosen; the reported `held_out` figures stay the cross-validated ones.

    `check` "agreement" tunes self-consistency thresholds (votes needed). "deferral" fits
    one logistic deferral model per rung below the top on the other folds (greedy signals,
    the cluster prior and, with `votes` > 1, agreement), and tunes P(correct) thresholds;
    the final models are refitted on all queries.
    """
    if check not in CHECKS:
        raise CreError(f"unknown quality check {check!r}; use one of {', '.join(CHECKS)}")
    start = time.perf_counter()
    ladder = router.ladder_names
    quality = router.quality
    if check == "deferral" and not 1 <= votes <= quality.k:
        raise CreError(f"--votes {votes}: the router records {quality.k} vote(s) a query; use 1 to {quality.k}")
    if check == "agreement" and quality.k == 1:
        console.warn("the router was fitted with one vote a query (--k 1), so the agreement check can only "
                     "escalate empty answers; use the default --check deferral, or refit with --k 5 to tune agreement")
    n = len(data.records)
    if n < 2 * n_folds:
        raise CreError(f"only {n} labelled queries: too few for {n_folds}-fold cross-validation (use --folds 2 or a larger log)")
    totals: dict[Setting, list[float]] = {}
    held_p: dict[OutcomeKey, float] = {}
    for fold in folds(n, n_folds, seed):
        train = sorted(set(range(n)) - set(fold))
        if check == "deferral":
            swept, p = sweep_deferral(data, train, fold, ladder, quality, votes)
            held_p.update(p)
        else:
            swept = sweep(data, train, fold, ladder, quality)
        for setting, result in swept:
            t = totals.setdefault(setting, [0.0, 0.0, 0.0])
            t[0] += result.accuracy * len(fold)
            t[1] += result.mean_cost * len(fold)
            t[2] += result.escalation_rate * len(fold)
    held = [(setting, Figures(t[0] / n, t[1] / n, t[2] / n)) for setting, t in totals.items()]
    everything = list(range(n))
    ref = reference(data, everything, ladder)
    # The router's own cluster statistics and deferral models, from every query, replayed
    # on those same queries: the in-sample half of each setting's estimate.
    table = _table(data, everything, ladder)
    rules = None
    if check == "deferral":
        rules = DeferralCheck(votes, {m: train_deferral(data, everything, table, m, votes) for m in ladder[:-1]})
        p_all = deferral_p(data, everything, rules.models, _table_prior(data, table), votes)
        inside = dict(_replay_grid(data, table, everything, _deferral_combos(ladder), quality, p_all, votes))
    else:
        inside = dict(_replay_grid(data, table, everything, _agreement_combos(ladder, quality.k), quality))
    estimates = [(setting, estimate(figures, inside[setting])) for setting, figures in held]
    setting, guess, met = _pick(estimates, budget, ref)
    figures = dict(held)[setting]
    choice = choose_by_weight(table, setting.weight)
    result = inside[setting]
    top_only = Choice({}, ladder[-1], 0.0, 0.0, 0.0, 0.0)
    reference_result = _simulate(data, everything, top_only, {ladder[-1]: 0.0}, quality)
    return Calibration(
        budget=budget,
        setting=setting,
        choice=choice,
        thresholds=dict(setting.thresholds),
        in_sample={"accuracy": result.accuracy, "mean_cost": result.mean_cost, "escalation_rate": result.escalation_rate},
        held_out={"accuracy": figures.accuracy, "mean_cost": figures.mean_cost, "escalation_rate": figures.escalation_rate},
        estimate={"accuracy": guess.accuracy, "mean_cost": guess.mean_cost, "escalation_rate": guess.escalation_rate},
        reference={"accuracy": ref[0], "mean_cost": ref[1]},
        frontier=[
            {"setting": s.label(), "accuracy": r.accuracy, "mean_cost": r.mean_cost,
             "escalation_rate": r.escalation_rate, "chosen": s == setting}
            for s, r in _with_chosen(frontier(held), setting, figures)
        ],
        n=n,
        folds=n_folds,
        budget_met=met,
        seconds=time.perf_counter() - start,
        table=table,
        unit=data.costs.unit,
        result=result,
        reference_result=reference_result,
        deferral=rules,
        check=check,
        signals=signal_report(data, held_p, ladder, votes) if check == "deferral" else None,
    )


def apply(router: "RouterFile", cal: Calibration) -> "RouterFile":
    """The router with the calibrated cluster models, thresholds and budget, and every cost
    it stores priced afresh: each cluster's statistics, the cost unit and the expected and
    simulated figures all come from this calibration's costs, not from the fit's.

    A cluster with no labelled query in the calibration log keeps its model, but its
    statistics are dropped: they cannot be re-priced, and stale costs must not stand
    beside fresh ones.
    """
    from crecli.routerfile import Expected

    assert cal.table is not None and cal.result is not None and cal.reference_result is not None
    clusters = []
    stale = 0
    for c in router.clusters:
        fresh = cal.table.clusters.get(c.id)
        stale += fresh is None and bool(c.stats)
        stats = {m: s.to_dict() for m, s in fresh.models.items()} if fresh is not None else {}
        clusters.append(replace(c, model=cal.choice.models.get(c.id, c.model), thresholds={}, stats=stats))
    if stale:
        console.warn(f"{stale} cluster(s) have no labelled query in this log: their models are kept, their statistics dropped")
    fit = replace(
        router.fit,
        cost_unit=cal.unit,
        expected=Expected(cal.choice.expected_accuracy, cal.choice.expected_cost,
                          cal.choice.reference_accuracy, cal.choice.reference_cost),
        simulated=cal.result.summary(),
        simulated_reference=cal.reference_result.summary(),
        budget_met=cal.budget_met,
        calibration={
            "budget": cal.budget.to_dict(), "held_out": cal.held_out, "estimate": cal.estimate, "in_sample": cal.in_sample,
            "reference": cal.reference, "folds": cal.folds, "n": cal.n, "setting": cal.setting.label(),
            "check": cal.check, **({"votes": cal.deferral.votes} if cal.deferral is not None else {}),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return replace(router, clusters=clusters, thresholds=dict(cal.thresholds), budget=cal.budget.to_dict(), fit=fit,
                   deferral=cal.deferral)


def run(
    router_path: Path,
    settings: "ModelConfig",
    budget: Budget,
    *,
    log: Path | None = None,
    output: Path | None = None,
    store: Path | None = None,
    max_line_bytes: int | None = None,
    n_folds: int = 5,
    seed: int = 0,
    force: bool = False,
    check: str = DEFAULT_CHECK,
    votes: int = 1,
    unit: str | None = None,
) -> tuple[Calibration, Path]:
    """`cre calibrate`: load the router, read its log as the fit did, recalibrate, write it.

    Outputs are checked before any work. Returns the calibration and where the router went.
    """
    from crecli import paths, routerfile

    router = routerfile.load(router_path, settings, force=force)
    log = fitted_log(router, log)
    target = output or router_path
    if store is not None:
        paths.check_output(store, "--store", [("the query log", log), ("the router", router_path)], example="outcomes.sqlite",
                           allow=paths.OWNED_STORE)
    keep = [("the query log", log), (paths.KEEP_STORE, store), *[("a models.toml", Path(f)) for f in settings.sources]]
    paths.check_output(target, "-o", keep)
    reader = router.fit.reader
    if max_line_bytes is not None:
        reader = replace(reader, fields=replace(reader.fields, max_line_bytes=max_line_bytes))
    data = prepare(router, settings, log, store, reader, unit)
    check_log(router, log, data)
    cal = recalibrate(router, data, budget, n_folds=n_folds, seed=seed, check=check, votes=votes)
    routerfile.save(apply(router, cal), target)
    return cal, target
