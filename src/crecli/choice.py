"""Each cluster's starting model, from recorded outcomes: per-cluster statistics and the choice.

`cluster_stats` gives, per cluster and model, how often the greedy answer is right and what it
costs. Small clusters are noisy, so accuracies are shrunk toward the model's accuracy over
the whole log (empirical Bayes, prior strength PRIOR_STRENGTH). `choose_models` maps each
cluster to its starting model for a `Budget` (what `cre fit` uses); `choose_by_weight` does it
for one price of accuracy (what `cre calibrate` sweeps). Pure functions of recorded outcomes:
no model runs here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from crecli.costs import BUDGET_EPS as _EPS, Budget, CostModel, mean_greedy_cost
from crecli.outcomes import graded

if TYPE_CHECKING:
    from crecli.outcomes import Outcome, OutcomeKey
    from crecli.querylog import Record

# One outcome's greedy answer as a mean cost reads it: own cost, too long, examples' key and cost.
Spent = tuple[float, bool, str, float]


# How many queries' worth of belief the model's log-wide accuracy carries in a cluster.
# With 5, a cluster needs about 5 queries before its own record counts as much as the
# log-wide figure: enough to stop a 2-for-2 cluster from looking perfect, little enough
# that a 30-query cluster speaks for itself.
PRIOR_STRENGTH = 5.0
# `cluster_stats(prior_strength=EMPIRICAL)` estimates each model's from the log instead
# (`empirical_strength`), within these bounds.
EMPIRICAL = "empirical"
STRENGTH_BOUNDS = (0.5, 50.0)


@dataclass(frozen=True)
class ModelStats:
    n: int  # queries with an outcome for this model
    correct: int  # of which the greedy answer (or the label) is right
    accuracy: float  # correct / n; the model's log-wide accuracy when n == 0
    shrunk_accuracy: float  # (correct + m * global) / (n + m)
    mean_cost: float  # of one greedy answer (too-long prompts left out); the model's log-wide mean when none
    # Tokens the model wrote in one greedy answer, over the outcomes with votes (a label
    # has none); the log-wide mean where none. What `cre batch` prices the strongest model's
    # answer at on a prompt it never saw: how long a model's answers run depends on the
    # task (a product of two 3-digit numbers against a yes/no), so it is kept per cluster.
    mean_output_tokens: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "n": float(self.n),
            "correct": float(self.correct),
            "accuracy": self.accuracy,
            "shrunk_accuracy": self.shrunk_accuracy,
            "mean_cost": self.mean_cost,
            "mean_output_tokens": self.mean_output_tokens,
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
    # How many answers' worth the log-wide accuracy carries in a cluster: one for every
    # model, or each model's own (`empirical_strength`).
    prior_strength: "float | dict[str, float]"

    def strength(self, model: str) -> float:
        return strength_of(self.prior_strength, model)


def strength_of(strengths: "float | dict[str, float]", model: str) -> float:
    """`model`'s prior strength in `StatsTable.prior_strength`'s form: one for all, or each model's."""
    return strengths[model] if isinstance(strengths, dict) else strengths


def empirical_strength(rows: Sequence[tuple[float, float]]) -> float:
    """A model's prior strength from its record across clusters, by the method of moments.

    A Beta prior worth m answers spreads the clusters' true accuracies with variance
    tau2 = mu(1 - mu)/(m + 1), so m = mu(1 - mu)/tau2 - 1. With S the size-weighted spread
    of the observed accuracies around their mean y (N answers in K clusters),
    E[S] = tau2 (N - sum n^2/N - K + 1) + (K - 1) mu(1 - mu), which gives tau2. Tasks
    differ a lot (one a model never gets right beside one it always does), and a fixed
    strength shrinks a 30-query cluster's 0 of 30 toward the model's log-wide accuracy as if
    they did not; the bounds keep one noisy log from trusting a cluster's record wholly or
    not at all. `rows` are (answers, right answers) per cluster."""
    lo, hi = STRENGTH_BOUNDS
    sized = [(n, c) for n, c in rows if n > 0]
    total = sum(n for n, _ in sized)
    mean = sum(c for _, c in sized) / total if total else 0.0
    if len(sized) < 2 or not 0.0 < mean < 1.0:
        return PRIOR_STRENGTH
    spread = sum(n * (c / n - mean) ** 2 for n, c in sized)
    room = total - sum(n * n for n, _ in sized) / total - len(sized) + 1
    tau2 = (spread - (len(sized) - 1) * mean * (1 - mean)) / room if room > 0 else 0.0
    if tau2 <= 0:
        return hi
    return min(hi, max(lo, mean * (1 - mean) / tau2 - 1))


def cluster_stats(
    labels: Sequence[int],
    records: Sequence["Record"],
    outcomes: Mapping[OutcomeKey, Outcome],
    ladder: Sequence[str],
    costs: CostModel,
    prior_strength: float | str = PRIOR_STRENGTH,
) -> StatsTable:
    """Greedy-answer accuracy and cost per cluster and model.

    `labels[i]` is the cluster of `records[i]`. Shrunk accuracy is
    (correct + m * global) / (n + m), where global is the model's accuracy over all records
    and m = `prior_strength` (`EMPIRICAL`: each model's own, `empirical_strength`, from the
    clusters of these records other than -1). Mean cost is that of one greedy answer, the cost of routing
    without a quality check; `simulate` prices the cascade's extra votes. A prompt too long for
    a model counts as a wrong answer, and in no mean cost; a model shown answered examples
    pays its share of them (`costs.mean_greedy_cost`, as the replay prices them).
    """
    if len(labels) != len(records):
        raise ValueError(f"{len(records)} records but {len(labels)} cluster labels")
    # (cluster -> model -> [n, correct, answers with votes, their output tokens])
    sums: dict[int, dict[str, list[float]]] = {}
    total: dict[str, list[float]] = {m: [0, 0, 0, 0.0] for m in ladder}
    # (cluster -> model -> each outcome's greedy cost, whether it is too long, and its answered
    # examples' key and cost: `mean_greedy_cost`)
    spent: dict[int, dict[str, list[Spent]]] = {}
    spent_total: dict[str, list[Spent]] = {m: [] for m in ladder}
    sizes: Counter[int] = Counter()
    for record, label in zip(records, labels):
        cid = int(label)
        sizes[cid] += 1
        per = sums.setdefault(cid, {m: [0, 0, 0, 0.0] for m in ladder})
        per_spent = spent.setdefault(cid, {m: [] for m in ladder})
        for model in ladder:
            outcome = outcomes.get((record.id, model))
            if outcome is None:
                continue
            ok = graded(outcome, record)[0]
            cost = (costs.of(outcome, 1), outcome.source == "too_long", outcome.prefix_key, costs.prefix_of(outcome))
            for acc in (per[model], total[model]):
                acc[0] += 1
                acc[1] += ok
                if outcome.votes:
                    acc[2] += 1
                    acc[3] += outcome.votes[0].output_tokens
            per_spent[model].append(cost)
            spent_total[model].append(cost)
    glob = {m: _raw(total[m], spent_total[m], None, None) for m in ladder}
    glob_out = {m: _output(total[m], 0.0) for m in ladder}
    strengths: float | dict[str, float] = (
        {m: empirical_strength([(row[m][0], row[m][1]) for cid, row in sums.items() if cid >= 0]) for m in ladder}
        if prior_strength == EMPIRICAL else float(prior_strength))

    def stats(row: dict[str, list[float]], costs_of: dict[str, list[Spent]]) -> dict[str, ModelStats]:
        out = {}
        for model in ladder:
            g_acc, g_cost = glob[model]
            n, correct = row[model][:2]
            acc, mean_cost = _raw(row[model], costs_of[model], g_acc, g_cost)
            shrunk = shrink(correct, n, g_acc, strength_of(strengths, model))
            out[model] = ModelStats(int(n), int(correct), acc, shrunk, mean_cost, _output(row[model], glob_out[model]))
        return out

    clusters = {cid: ClusterStats(cid, sizes[cid], stats(sums[cid], spent[cid])) for cid in sorted(sums)}
    overall = ClusterStats(-1, len(records), stats(total, spent_total))
    return StatsTable(clusters, overall, list(ladder), strengths)


def shrink(correct: float, n: float, glob: float, strength: float) -> float:
    """Empirical-Bayes accuracy: `correct` of `n` shrunk toward `glob`, worth `strength` answers."""
    return (correct + strength * glob) / (n + strength) if n + strength > 0 else glob


def _output(row: list[float], default: float) -> float:
    """Mean greedy output tokens of a stats row's outcomes with votes, else `default`."""
    return row[3] / row[2] if row[2] else default


def _raw(row: list[float], spent: list[Spent], acc_default: float | None,
         cost_default: float | None) -> tuple[float, float]:
    """A stats row's accuracy and mean greedy cost (`mean_greedy_cost` of its outcomes' `spent`:
    a too-long one is wrong, but no price of an answer; answered examples shared as the replay
    shares them), each its default where there is none."""
    n, correct = row[:2]
    return correct / n if n else acc_default or 0.0, mean_greedy_cost(spent, cost_default or 0.0)


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


def weighted_value(weight: float, accuracy: Any, cost: Any, acc_unit: float, cost_unit: float) -> Any:
    """What a model's answer is worth at one price of accuracy: `weight` x its accuracy, in
    units of the strongest model's, less its cost, in units of the strongest model's. The
    rule `choose_by_weight` maximises per cluster; numbers or numpy arrays alike, so that
    bench/frontier_bound.py applies the same rule per query."""
    return weight * accuracy / acc_unit - cost / cost_unit


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
        return weighted_value(weight, m.shrunk_accuracy, m.mean_cost, acc_unit, cost_unit)

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


def assignments_for(records: Iterable["Record"], labels: Sequence[int], choice: Choice) -> dict[str, str]:
    """Each record's starting model under `choice` (clustered by `labels`, aligned with records)."""
    return {r.id: choice.models.get(int(c), choice.fallback) for r, c in zip(records, labels)}


def cluster_prior(table: StatsTable, cid: int, model: str) -> float:
    """`model`'s shrunk accuracy in cluster `cid`; its log-wide accuracy outside every
    cluster. What `RouterFile.prior` reads back from the router this table goes into."""
    info = table.clusters.get(cid) if cid >= 0 else None
    if info is None:
        return table.overall.models[model].accuracy
    return info.models[model].shrunk_accuracy
