"""From recorded outcomes to each cluster's cheapest adequate model and each model's threshold.

Three steps, all pure functions of recorded outcomes (no model runs here):

1. `cluster_stats`: per cluster and model, how often the greedy answer is right and what
   it costs. Small clusters are noisy, so accuracies are shrunk toward the model's
   accuracy over the whole log (empirical Bayes, prior strength PRIOR_STRENGTH).
2. `choose_models`: the cluster -> starting model map for a `Budget`.
3. `simulate` / `tune_thresholds`: replay the cascade on the recorded votes to measure
   accuracy, cost and escalations for given thresholds, and pick thresholds for a budget.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from crecli import console, grading
from crecli.errors import CreError
from crecli.outcomes import CostModel, Outcome, OutcomeKey
from crecli.quality import decide, done, needed

if TYPE_CHECKING:
    from crecli.config import Settings
    from crecli.quality import QualitySettings
    from crecli.querylog import Record

# How many queries' worth of belief the model's log-wide accuracy carries in a cluster.
# With 5, a cluster needs about 5 queries before its own record counts as much as the
# log-wide figure: enough to stop a 2-for-2 cluster from looking perfect, little enough
# that a 30-query cluster speaks for itself.
PRIOR_STRENGTH = 5.0
BUDGET_KINDS = ("retain", "max_cost")
DEFAULT_RETAIN = 0.98
# Agreement needed below the top rung: 3 of 5 votes.
DEFAULT_THRESHOLD = 0.6
# Ratios are compared with this slack, so a budget met exactly is not missed by rounding.
_EPS = 1e-9


@dataclass(frozen=True)
class Budget:
    """The one knob of calibration.

    - `Budget("retain", 0.98)`: keep quality. Each cluster starts on the cheapest model whose
      shrunk accuracy on that cluster is at least 0.98 x the strongest (top-rung) model's
      shrunk accuracy there; if none is (possible for values above 1), the most accurate one.
    - `Budget("max_cost", 0.5)`: cap cost. The most accurate assignment whose total cost stays
      within 0.5 x the cost of sending every query to the strongest model. Every cluster
      starts on its cheapest model; then, greedily, the upgrade (cluster, better model) with
      the most accuracy gained per unit of extra cost that still fits the budget is taken,
      until none fits.
    """

    kind: str = "retain"
    value: float = DEFAULT_RETAIN

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise CreError(f"unknown budget kind {self.kind!r}; use one of {', '.join(BUDGET_KINDS)}")
        if not self.value > 0:
            raise CreError(f"budget value must be positive, got {self.value}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


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
            shrunk = (correct + prior_strength * g_acc) / (n + prior_strength) if n + prior_strength > 0 else g_acc
            out[model] = ModelStats(int(n), int(correct), acc, shrunk, mean_cost)
        return out

    clusters = {cid: ClusterStats(cid, sizes[cid], stats(sums[cid])) for cid in sorted(sums)}
    overall = ClusterStats(-1, len(records), stats(total))
    return StatsTable(clusters, overall, list(ladder), prior_strength)


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
    top = ladder[-1]
    real = {cid: c for cid, c in table.clusters.items() if cid >= 0}
    if budget.kind == "retain":
        models = {cid: _retain(c, ladder, budget.value) for cid, c in real.items()}
    else:
        models = _max_cost(table, real, budget.value)
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
                entries[(record.id, model)] = _Entry(answers, tuple(outcome.correct(record)), cum)
        return cls(entries, records, ladder, costs.unit)

    def simulate(
        self,
        assignments: Mapping[str, str],
        thresholds: Mapping[str, float],
        quality: "QualitySettings",
        overrides: Mapping[str, Mapping[str, float]] | None = None,
    ) -> SimResult:
        """Replay the cascade for every record: see the module function `simulate`."""
        k, early = quality.k, quality.early_stop
        last = len(self.ladder) - 1
        traces = []
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
                if accept or rung == last:
                    traces.append(QueryTrace(record.id, start, steps, answer, entry.correct[index], total))
                    break
                rung += 1
        return SimResult(traces, self.unit)


def simulate(
    assignments: Mapping[str, str],
    outcomes: Mapping[OutcomeKey, Outcome],
    records: Sequence["Record"],
    ladder: Sequence[str],
    thresholds: Mapping[str, float],
    quality: "QualitySettings",
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
    quality: "QualitySettings",
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
        if budget.kind == "retain":
            met = result.accuracy >= budget.value * reference.accuracy - _EPS
            key = (met, -result.cost, result.accuracy) if met else (met, result.accuracy, -result.cost)
        else:
            met = result.cost <= budget.value * reference.cost + _EPS
            key = (met, result.accuracy, -result.cost) if met else (met, -result.cost, result.accuracy)
        candidates.append((key, thresholds, result, met))
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


def plan(
    records: Sequence["Record"],
    clusters: Mapping[str, int],
    outcomes: Mapping[OutcomeKey, Outcome],
    settings: "Settings",
    budget: Budget,
    quality: "QualitySettings",
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
