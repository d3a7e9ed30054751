"""`cre calibrate` and `cre eval`: tune a router offline, and measure it against baselines.

Both replay the cascade on recorded votes (calibrate.Replay), which runs the same decision
procedure as `cre ask` on the same seeded votes, so thousands of settings can be compared in
seconds without running a model. Outcomes missing from the store are collected first (that
does run models, once). `cre eval --live` runs the real cascade instead, to check the replay.

Held-out figures: `recalibrate` scores every setting by cross-validation (cluster models
chosen on the other folds, the cascade replayed on the held-out fold) and chooses among
those held-out scores. Choosing the best of many settings still flatters the winner a
little; `bench/headline` evaluates on a half of the log that calibration never saw.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from crecli import console
from crecli.calibrate import (
    Budget,
    Choice,
    Replay,
    SimResult,
    choose_models,
    cluster_stats,
    threshold_grid,
)
from crecli.errors import CreError
from crecli.outcomes import CostModel, Outcome, OutcomeKey

if TYPE_CHECKING:
    from crecli.config import Settings
    from crecli.querylog import Record
    from crecli.route import RouteDecision
    from crecli.routerfile import RouterFile

# Per-cluster model choices are swept over these "retain" values; the threshold grid is
# swept for each. Values above 1 let a cluster prefer a model better than the strongest.
RETAIN_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0, 1.02, 1.05, 1.1)


@dataclass
class Data:
    """A labelled log prepared for replay: records, their clusters, and outcomes."""

    records: list["Record"]
    routes: list["RouteDecision"]  # each record's cluster and starting model, as `cre ask` routes it
    outcomes: dict[OutcomeKey, Outcome]
    costs: CostModel
    replay: Replay

    @property
    def clusters(self) -> list[int]:
        return [r.cluster for r in self.routes]


def prepare(router: "RouterFile", settings: "Settings", log: Path, store: Path | None = None, skip_bad: bool = False) -> Data:
    from crecli import outcomes as outcomes_mod
    from crecli import querylog

    read = querylog.read_log(log, skip_bad=skip_bad)
    records = [r for r in read.records if r.reference is not None or r.labels]
    if not records:
        raise CreError(f"{log}: no labelled queries (a `reference` or `labels` field) to evaluate on")
    ladder = [m["name"] for m in router.ladder]
    missing = [m for m in ladder if m not in settings.models]
    if missing:
        raise CreError(f"the router's ladder has {', '.join(missing)}, which your models.toml lacks")
    routes = assign(router, [r.prompt for r in records])
    path = store or outcomes_mod.default_store_path()
    with outcomes_mod.OutcomeStore(path) as st:
        found = outcomes_mod.collect(records, settings, st, router.quality, models=ladder)
    costs = CostModel.build(found.values(), [settings.get(m) for m in ladder])
    replay = Replay.build(found, records, ladder, costs)
    return Data(records, routes, found, costs, replay)


def assign(router: "RouterFile", prompts: Sequence[str]) -> list["RouteDecision"]:
    """Routes exactly as `cre ask` decides them (embedded in batches, with a progress bar)."""
    from crecli.embed import embed_texts
    from crecli.route import route_vectors

    return route_vectors(router, embed_texts(router.embedder, list(prompts)))


# ---------------------------------------------------------------- settings and sweeps


@dataclass(frozen=True)
class Setting:
    retain: float  # per-cluster model choice: Budget("retain", retain)
    thresholds: tuple[tuple[str, float], ...]

    def label(self) -> str:
        """e.g. "retain 0.85 | thresholds 0.8/0.6/0.0" (thresholds smallest rung first)."""
        return f"retain {self.retain:.2f} | thresholds " + "/".join(f"{v:.1f}" for _, v in self.thresholds)


@dataclass
class Point:
    name: str
    accuracy: float
    mean_cost: float
    escalation_rate: float | None = None
    note: str = ""


def _choice(data: Data, idx: Sequence[int], ladder: list[str], retain: float) -> Choice:
    table = cluster_stats([data.clusters[i] for i in idx], [data.records[i] for i in idx], data.outcomes, ladder, data.costs)
    return choose_models(table, Budget("retain", retain) if retain > 0 else Budget("retain", 1e-9))


def _simulate(data: Data, idx: Sequence[int], choice: Choice, thresholds: Mapping[str, float], quality: Any) -> SimResult:
    sub = Replay(data.replay.entries, [data.records[i] for i in idx], data.replay.ladder, data.replay.unit)
    starts = {data.records[i].id: choice.models.get(data.clusters[i], choice.fallback) for i in idx}
    return sub.simulate(starts, thresholds, quality)


def sweep(data: Data, fit_idx: Sequence[int], eval_idx: Sequence[int], ladder: list[str], quality: Any) -> list[tuple[Setting, SimResult]]:
    """Every (retain, thresholds) setting: cluster models chosen on `fit_idx`, replayed on `eval_idx`."""
    import itertools

    grid = threshold_grid(quality.k)
    out = []
    for retain in RETAIN_GRID:
        choice = _choice(data, fit_idx, ladder, retain)
        for combo in itertools.product(grid, repeat=len(ladder) - 1):
            # The top rung either answers greedily or takes a 3-of-5 majority.
            for top in (0.0, 0.6):
                thresholds = {**dict(zip(ladder[:-1], combo)), ladder[-1]: top}
                result = _simulate(data, eval_idx, choice, thresholds, quality)
                out.append((Setting(retain, tuple(thresholds.items())), result))
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
    return sum(e.correct[0] for e in entries) / n, sum(e.cumcost[0] for e in entries) / n


def reference(data: Data, idx: Sequence[int], ladder: list[str]) -> tuple[float, float]:
    """Accuracy and mean cost of always using the strongest model (its greedy answer)."""
    return greedy(data, idx, lambda i: ladder[-1])


def _pick(candidates: Sequence[tuple[Setting, Any]], budget: Budget, ref: tuple[float, float]) -> tuple[Setting, Any, bool]:
    """The setting that best meets `budget`; if none meets it, the closest one."""
    ref_acc, ref_cost = ref
    best = None
    for setting, result in candidates:
        if budget.kind == "retain":
            met = result.accuracy >= budget.value * ref_acc - 1e-9
            key = (met, -result.mean_cost, result.accuracy) if met else (met, result.accuracy, -result.mean_cost)
        else:
            met = result.mean_cost <= budget.value * ref_cost + 1e-9
            key = (met, result.accuracy, -result.mean_cost) if met else (met, -result.mean_cost, result.accuracy)
        if best is None or key > best[0]:
            best = (key, setting, result, met)
    assert best is not None
    return best[1], best[2], best[3]


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


@dataclass
class Calibration:
    budget: Budget
    setting: Setting
    choice: Choice
    thresholds: dict[str, float]
    in_sample: dict[str, float]
    held_out: dict[str, float]
    reference: dict[str, float]
    frontier: list[dict[str, Any]]
    n: int
    folds: int
    budget_met: bool
    seconds: float


def recalibrate(router: "RouterFile", data: Data, budget: Budget, n_folds: int = 5, seed: int = 0) -> Calibration:
    """Choose per-cluster models and thresholds for `budget`, by cross-validation.

    A setting is a `retain` value for the per-cluster model choice plus one threshold per
    rung. Each setting is scored on held-out folds only: its cluster models are chosen on
    the other folds and its cascade replayed on the fold, so a setting that merely fits the
    noise of small clusters scores badly. The setting that meets the budget on these
    held-out figures at the least cost (or the best accuracy, for "max_cost") is chosen,
    and its cluster models are then chosen once more on all queries for the router.
    """
    start = time.perf_counter()
    ladder = [m["name"] for m in router.ladder]
    quality = router.quality
    n = len(data.records)
    if n < 2 * n_folds:
        raise CreError(f"only {n} labelled queries: too few for {n_folds}-fold cross-validation (use --folds 2 or a larger log)")
    totals: dict[Setting, list[float]] = {}
    for fold in folds(n, n_folds, seed):
        train = sorted(set(range(n)) - set(fold))
        for setting, result in sweep(data, train, fold, ladder, quality):
            t = totals.setdefault(setting, [0.0, 0.0, 0.0])
            t[0] += result.accuracy * len(fold)
            t[1] += result.mean_cost * len(fold)
            t[2] += result.escalation_rate * len(fold)
    held = [(setting, Figures(t[0] / n, t[1] / n, t[2] / n)) for setting, t in totals.items()]
    everything = list(range(n))
    ref = reference(data, everything, ladder)
    setting, figures, met = _pick(held, budget, ref)
    choice = _choice(data, everything, ladder, setting.retain)
    result = _simulate(data, everything, choice, dict(setting.thresholds), quality)
    return Calibration(
        budget=budget,
        setting=setting,
        choice=choice,
        thresholds=dict(setting.thresholds),
        in_sample={"accuracy": result.accuracy, "mean_cost": result.mean_cost, "escalation_rate": result.escalation_rate},
        held_out={"accuracy": figures.accuracy, "mean_cost": figures.mean_cost, "escalation_rate": figures.escalation_rate},
        reference={"accuracy": ref[0], "mean_cost": ref[1]},
        frontier=[
            {"setting": s.label(), "accuracy": r.accuracy, "mean_cost": r.mean_cost,
             "escalation_rate": r.escalation_rate, "chosen": s == setting}
            for s, r in frontier(held)
        ],
        n=n,
        folds=n_folds,
        budget_met=met,
        seconds=time.perf_counter() - start,
    )


def apply(router: "RouterFile", cal: Calibration) -> "RouterFile":
    """The router with the calibrated cluster models, thresholds and budget."""
    clusters = [replace(c, model=cal.choice.models.get(c.id, c.model), thresholds={}) for c in router.clusters]
    fit = {**router.fit, "calibration": {
        "budget": cal.budget.to_dict(), "held_out": cal.held_out, "in_sample": cal.in_sample,
        "reference": cal.reference, "folds": cal.folds, "n": cal.n, "setting": cal.setting.label(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }}
    return replace(router, clusters=clusters, thresholds=dict(cal.thresholds), budget=cal.budget.to_dict(), fit=fit)


# ---------------------------------------------------------------- eval and baselines


@dataclass
class EvalReport:
    n: int
    unit: str
    cascade: dict[str, Any]
    reference: dict[str, float]
    retained: float  # cascade accuracy / strongest model's accuracy
    cost_share: float  # cascade cost / strongest model's cost
    oracle_gap: float  # oracle accuracy - cascade accuracy
    baselines: list[Point]
    per_cluster: list[dict[str, Any]]
    tokens: dict[str, float]
    live: dict[str, Any] | None = None
    points: list[Point] = field(default_factory=list)


def _greedy_point(data: Data, name: str, starts: Mapping[str, str]) -> Point:
    return Point(name, *greedy(data, range(len(data.records)), lambda i: starts[data.records[i].id]))


def _oracle(data: Data, ladder: list[str]) -> Point:
    """The cheapest model whose greedy answer is right; the cheapest model when none is."""
    n = len(data.records)
    correct = cost = 0.0
    for r in data.records:
        entries = sorted((data.replay.entries[(r.id, m)] for m in ladder), key=lambda e: e.cumcost[0])
        right = [e for e in entries if e.correct[0]]
        pick = right[0] if right else entries[0]
        correct += bool(right)
        cost += pick.cumcost[0]
    return Point("oracle (cheapest correct model)", correct / n, cost / n, note="ceiling; needs the answer key")


def _random_at_cost(singles: list[Point], target_cost: float) -> Point:
    """Expected accuracy of routing each query to a random model, mixed to cost `target_cost`.

    The mixture of the two single models whose costs bracket the target: an analytic
    expectation, so no seed makes it look better or worse than it is.
    """
    by_cost = sorted(singles, key=lambda p: p.mean_cost)
    if target_cost <= by_cost[0].mean_cost:
        return replace(by_cost[0], name="random routing at equal cost", note="cascade is cheaper than every model")
    if target_cost >= by_cost[-1].mean_cost:
        return replace(by_cost[-1], name="random routing at equal cost", note="cascade costs more than every model")
    for lo, hi in zip(by_cost, by_cost[1:]):
        if lo.mean_cost <= target_cost <= hi.mean_cost:
            p = (target_cost - lo.mean_cost) / (hi.mean_cost - lo.mean_cost)
            return Point(
                "random routing at equal cost",
                (1 - p) * lo.accuracy + p * hi.accuracy,
                target_cost,
                note=f"{1 - p:.0%} {lo.name.split(' ')[0]}, {p:.0%} {hi.name.split(' ')[0]}",
            )
    raise AssertionError("unreachable")  # pragma: no cover


def evaluate(router: "RouterFile", data: Data) -> EvalReport:
    ladder = [m["name"] for m in router.ladder]
    quality = router.quality
    records = data.records
    starts = {r.id: route.model for r, route in zip(records, data.routes)}
    overrides = {r.id: info.thresholds for r, route in zip(records, data.routes)
                 if route.cluster >= 0 and (info := router.cluster(route.cluster)) and info.thresholds}
    cascade = data.replay.simulate(starts, router.thresholds, quality, overrides or None)

    singles = [_greedy_point(data, f"{m} only", {r.id: m for r in records}) for m in ladder]
    top_vote = data.replay.simulate({r.id: ladder[-1] for r in records}, {ladder[-1]: 1.0},
                                    replace(quality, early_stop=False))
    no_qc = _greedy_point(data, "cluster routing, no quality check", starts)
    no_clusters = data.replay.simulate({r.id: ladder[0] for r in records}, router.thresholds, quality)
    oracle = _oracle(data, ladder)
    baselines = [
        *singles,
        Point(f"{ladder[-1]} with {quality.k}-vote majority", top_vote.accuracy, top_vote.mean_cost),
        _random_at_cost(singles, cascade.mean_cost),
        no_qc,
        Point("cascade without clusters (start at the smallest)", no_clusters.accuracy, no_clusters.mean_cost,
              no_clusters.escalation_rate),
        oracle,
    ]
    ref = singles[-1]

    per: dict[int, list[Any]] = {}
    for trace, c in zip(cascade.traces, data.clusters):
        per.setdefault(c, []).append(trace)
    per_cluster = []
    for cid in sorted(per):
        traces = per[cid]
        info = router.cluster(cid) if cid >= 0 else None
        per_cluster.append({
            "cluster": cid,
            "n": len(traces),
            "start_model": info.model if info else router.fallback_model,
            "accuracy": sum(t.correct for t in traces) / len(traces),
            "mean_cost": sum(t.cost for t in traces) / len(traces),
            "escalation_rate": sum(t.escalated for t in traces) / len(traces),
            "answered_by": {m: sum(t.model == m for t in traces) for m in ladder},
        })

    out_tokens = 0
    for trace in cascade.traces:
        for step in trace.steps:
            votes = data.outcomes[(trace.query_id, step.model)].votes
            out_tokens += sum(v.output_tokens for v in votes[: step.used])
    tokens = {
        "output_tokens": float(out_tokens),
        "seconds_per_output_token": (cascade.cost / out_tokens) if out_tokens and data.replay.unit == "seconds" else float("nan"),
    }
    point = Point("cascade (this router)", cascade.accuracy, cascade.mean_cost, cascade.escalation_rate)
    return EvalReport(
        n=len(records),
        unit=data.replay.unit,
        cascade=cascade.summary(),
        reference={"accuracy": ref.accuracy, "mean_cost": ref.mean_cost},
        retained=cascade.accuracy / ref.accuracy if ref.accuracy else float("nan"),
        cost_share=cascade.mean_cost / ref.mean_cost if ref.mean_cost else float("nan"),
        oracle_gap=oracle.accuracy - cascade.accuracy,
        baselines=baselines,
        per_cluster=per_cluster,
        tokens=tokens,
        points=[point, *baselines],
    )


def live(router_path: Path, settings_file: Path | None, data: Data, limit: int | None = None) -> dict[str, Any]:
    """Run the real cascade (`cre ask`) on the queries and compare with the replay."""
    from crecli.escalate import Cascade

    records = data.records[:limit] if limit else data.records
    correct = 0
    seconds = 0.0
    start = time.perf_counter()
    with Cascade.from_file(router_path, models_file=settings_file) as cascade:
        with console.progress() as bar:
            task = bar.add_task("live cascade", total=len(records))
            for r in records:
                trace = cascade.ask(r.prompt, match=r.match, reference=r.reference)
                correct += bool(trace.correct)
                seconds += trace.seconds
                bar.advance(task)
    return {
        "n": len(records),
        "accuracy": correct / len(records),
        "model_seconds": seconds,
        "wall_seconds": time.perf_counter() - start,
    }
