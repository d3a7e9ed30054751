#!/usr/bin/env python3
"""How far could any router and quality check go on this ladder? Bounds from recorded answers.

Issue 10 asks, when the goal (98% of the strongest model's accuracy at 80% of its cost) is
missed, to name the next limiting factor with figures. This bench prices the recorded greedy
answers of a labelled log (what `cre fit` records; anything missing is run first, as `cre
fit` would) exactly as calibration does (`costs.CostModel`, bench-seconds by default), and
prints three IN-SAMPLE bounds, each chosen on the very queries it is scored on. They are
ceilings for held-out results, never results themselves:

1. **One model per task** (perfect clusters, no quality check): for each task, the model
   that minimises cost - lambda x accuracy, swept over lambda. Held-out cluster routing
   cannot beat it.
2. **A cascade with a perfect quality check** (an answer is accepted exactly when it is
   right; the top rung always answers), per task: every ordered subset of the ladder ending
   at the top rung, plus each small rung alone, each query paying for every rung it visits.
   No signal can do better than perfect, so no cascade of these rungs can beat this curve.
3. **Cross-fitted, one model per task, by two rules** (the only figures here that are held
   out): on four folds, each task's model is chosen by calibrate's own rules, with the tasks
   as clusters and its shrunk accuracies: the per-task share rule (`choose_models` with
   `Budget("retain", r)`: the cheapest model with at least r x the strongest model's
   accuracy on that task) or one price of accuracy (`choose_by_weight`), r or the price
   being the cheapest setting that keeps `--retain` of the strongest model's accuracy on
   those four folds; the fifth fold is scored. 5 folds, seeds 0-2. A third line keeps the
   per-task models chosen on four folds but picks the one price for all folds in hindsight,
   on the scored queries: the cheapest that keeps `--retain` held out. No way of choosing
   the price can beat it, so it separates the noise of choosing the price from the noise of
   choosing each task's model.
4. **A per-query prior before any model runs**: the within-task AUROC of the k nearest
   neighbours' mean correctness (the router's own embedder, fitted on the log) for each
   model. 0.5 means the prompt's wording says nothing about which queries of a task a model
   gets right, beyond what the task (cluster) already says; only running a rung can tell.
   In sample (leave-one-out) this reads below 0.5 even on data with no signal, so it is
   also given held out (`held_out_auroc`: estimated from four folds, ranked within each task
   and fold) for the neighbours and for a logistic model on the prompt's own features
   (`prompt_features`: length, digits, answer options, lines).
5. **Routing per query, cross-fitted** (held out, with 3.): each query's model chosen by one
   price of accuracy from its estimated accuracy per model, by its neighbours or by its
   features (`cross_fit_per_query`), the price chosen on four folds as in 3. Whether
   routing finer than a task could pay on this log, before a rung is built for it.

It also prints, per model, the mean cost per answer as a share of the strongest model's,
and the share of that cost spent on prompt processing.

    .venv/bin/python bench/frontier_bound.py examples/querylog-large.jsonl
    .venv/bin/python bench/frontier_bound.py LOG --unit seconds --retain 0.98 --json
    .venv/bin/python bench/frontier_bound.py LOG --headline H.json --plot frontier.svg

`--plot FILE.svg` draws the two in-sample curves, the goal, and, with `--headline` (the
`--json` output of `bench/headline` on the same log), each seed's held-out points.

Prompt processing and generation are what the answers cost at `cre models bench` speeds;
bench-seconds need every ladder model measured. Nothing here loads a model unless some
answer is missing from the outcome store.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from crecli import choice, config, costs, deferral, embed, querylog
from crecli.outcomes import OutcomeStore, collect, default_store_path, graded, leave_out_too_long
from crecli.quality import QualityCheck
from crecli.replay import run_reuse

LAMBDAS = np.concatenate([np.linspace(0.0, 0.5, 51), np.linspace(0.5, 5.0, 46), np.linspace(5.0, 40.0, 36)])


@dataclass
class Recorded:
    """A labelled log's recorded greedy answers, priced: `C[i, j]` is 1 where ladder model j
    answered record i right, `K[i, j]` what that answer cost."""

    records: list[querylog.Record]
    settings: Any
    ladder: list[str]
    found: dict
    model: costs.CostModel
    C: np.ndarray
    K: np.ndarray


def recorded(log: Path, unit: str | None) -> Recorded:
    """Read `log`, collect every ladder model's greedy answer (running what is missing, as
    `cre fit` would) and price them as calibration does. A query too long for every rung's
    context is left out with a warning, as `cre fit` leaves it out (`leave_out_too_long`); one
    too long for some is wrong there at no cost."""
    records = [r for r in querylog.read_log(log).records if r.reference is not None]
    settings = config.load()
    ladder = list(settings.ladder)
    with OutcomeStore(default_store_path()) as store:
        found = collect(records, settings, store, QualityCheck(k=1), models=ladder)
    records = leave_out_too_long(records, found, ladder, log)
    specs = [settings.get(m) for m in ladder]
    # Each task as one cluster: what a prompt shares with the previous of its task is free,
    # as calibration frees what it shares with the previous of its cluster (`replay.run_reuse`).
    tasks = {t: i for i, t in enumerate(dict.fromkeys(str(r.meta.get("source", "")) for r in records))}
    reused = run_reuse(records, [tasks[str(r.meta.get("source", ""))] for r in records], specs, unit)
    model = costs.CostModel.build(found.values(), specs, unit, reused)
    C = np.array([[graded(found[(r.id, m)], r)[0] for m in ladder] for r in records], dtype=float)
    K = np.array([[model.of(found[(r.id, m)]) for m in ladder] for r in records], dtype=float)
    return Recorded(records, settings, ladder, found, model, C, K)


def task_of(record: querylog.Record, field: str) -> str:
    value: Any = {"meta": record.meta, "id": record.id}
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        sys.exit(f"record {record.id!r} has no {field} field; pass --task-field")
    return str(value)


def frontier(options: dict[str, list[tuple[float, float]]], n: int, ref_acc: float, ref_cost: float) -> list[tuple[float, float]]:
    """Lagrangian sweep: per task, the option minimising cost - lambda x correct answers.
    `options[task]` are (correct answers, total cost) pairs. Returns (accuracy share, cost
    share) points of the strongest model, deduplicated, cheapest first."""
    points = set()
    for lam in LAMBDAS:
        correct = cost = 0.0
        for opts in options.values():
            a, c = min(opts, key=lambda o: o[1] - lam * o[0])
            correct += a
            cost += c
        points.add((round(correct / n / ref_acc, 4), round(cost / n / ref_cost, 4)))
    # Keep the upper-left hull in the cost order: a point is kept if nothing cheaper is as accurate.
    kept: list[tuple[float, float]] = []
    for acc, cost in sorted(points, key=lambda p: (p[1], -p[0])):
        if not kept or acc > kept[-1][0]:
            kept.append((acc, cost))
    return kept


def cost_at(points: Sequence[tuple[float, float]], retain: float) -> float | None:
    """The cheapest cost share on the curve that keeps `retain` of the accuracy, interpolated."""
    for (a0, c0), (a1, c1) in zip(points, points[1:]):
        if a0 < retain <= a1:
            return c0 + (c1 - c0) * (retain - a0) / (a1 - a0)
    return points[0][1] if points and points[0][0] >= retain else None


def cascade_paths(n_models: int) -> list[tuple[int, ...]]:
    top = n_models - 1
    paths = [p for size in range(1, n_models + 1) for p in itertools.combinations(range(n_models), size) if p[-1] == top]
    return paths + [(j,) for j in range(top)]


def perfect_cascade(C: np.ndarray, K: np.ndarray, path: Sequence[int]) -> tuple[float, float]:
    """Correct answers and total cost of `path` when each rung's answer is accepted exactly
    when it is right (the last rung always answers)."""
    done = np.zeros(len(C), bool)
    correct = cost = 0.0
    for i, rung in enumerate(path):
        cost += K[~done, rung].sum()
        take = ~done & (C[:, rung].astype(bool) | (i == len(path) - 1))
        correct += C[take, rung].sum()
        done |= take
    return correct, cost


def within_task_knn(X: np.ndarray, C: np.ndarray, tasks: np.ndarray, k: int) -> list[float | None]:
    """Per model: `within_task_auroc` of the k nearest neighbours' (leave-one-out, any task)
    mean correctness, in sample: biased below 0.5 on data with no signal (`held_out_auroc`)."""
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :k]
    return within_task_auroc(C[nearest].mean(axis=1), C, tasks)

def knn_estimates(sims: np.ndarray, C: np.ndarray, K: np.ndarray, prior_acc: np.ndarray, k: int,
                  strength: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-query accuracy and cost of each model from the `k` most similar labelled queries
    (columns of `sims`): their mean correctness shrunk toward `prior_acc` (per row: the
    query's task's accuracy, with `strength` queries' weight), and their mean cost."""
    nearest = np.argsort(-sims, axis=1)[:, :k]
    return (C[nearest].sum(axis=1) + strength * prior_acc) / (k + strength), K[nearest].mean(axis=1)


def prompt_features(prompts: Sequence[str]) -> np.ndarray:
    """What a prompt's text says of its difficulty before any model reads it: its length,
    its digits (long numbers are harder arithmetic), its answer options and its lines."""
    import re

    rows = [[np.log1p(len(p)), np.log1p(sum(c.isdigit() for c in p)), len(re.findall(r"\([A-Z]\)", p)),
             np.log1p(p.count("\n"))] for p in prompts]
    return np.array(rows, dtype=float)


def _task_means(values: np.ndarray, tasks: np.ndarray, tr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row of `idx`, the mean of `values` over the labelled rows `tr` of its task (all of
    `tr` for a task they lack)."""
    means = {t: values[tr][tasks[tr] == t].mean(axis=0) for t in np.unique(tasks[tr])}
    every = values[tr].mean(axis=0)
    return np.array([means.get(t, every) for t in tasks[idx]])


def per_query_estimates(how: str, X: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, K: np.ndarray, tasks: np.ndarray,
                        tr: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Estimated accuracy and cost of each model for the rows `idx`, learned from the labelled
    rows `tr` only (a row of `idx` that is in `tr` is left out of its own estimate for
    "neighbours"): "neighbours" (`knn_estimates` in the embedder's space), "features" (a
    ridge logistic regression per model on `prompt_features` and the logit of the task's
    accuracy; cost: the task's mean) or "prompt cost" (the task's accuracy, and what the
    query's own prompt costs each model, `P`, which its token count gives before any model
    runs, plus the task's mean cost of an answer beyond it)."""
    prior = _task_means(C, tasks, tr, idx)
    if how == "prompt cost":
        return prior, P[idx] + _task_means(K - P, tasks, tr, idx)
    if how == "neighbours":
        sims = X[idx] @ X[tr].T
        sims[idx[:, None] == tr[None, :]] = -np.inf
        return knn_estimates(sims, C[tr], K[tr], prior, k)
    acc = np.empty((len(idx), C.shape[1]))
    train_prior = _task_means(C, tasks, tr, tr)
    for j in range(C.shape[1]):
        def design(rows: np.ndarray, p: np.ndarray) -> np.ndarray:
            q = np.clip(p[:, j], 0.02, 0.98)
            return np.c_[F[rows], np.log(q / (1 - q))]
        w, b = deferral.fit_logistic(design(tr, train_prior), C[tr, j])
        acc[:, j] = 1.0 / (1.0 + np.exp(-(design(idx, prior) @ w + b)))
    return acc, _task_means(K, tasks, tr, idx)


PER_QUERY = ("neighbours", "features", "prompt cost")


def per_query_pick(price: float, acc: np.ndarray, cost: np.ndarray, C: np.ndarray, K: np.ndarray,
                   tr: np.ndarray) -> np.ndarray:
    """Each query's model at one price of accuracy: the highest `choice.weighted_value` of
    its estimated accuracy and cost per model (calibrate's per-cluster rule, per query), in
    units of the strongest model's figures on the labelled rows `tr`; ties go to the cheaper."""
    top = C.shape[1] - 1
    # argmax keeps the first of equals, and the ladder is smallest first.
    return np.argmax(choice.weighted_value(price, acc, cost, C[tr, top].mean() or 1.0, K[tr, top].mean() or 1.0), axis=1)


def cross_fit_per_query(how: str, X: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, K: np.ndarray, tasks: np.ndarray,
                        retain: float, seeds: Sequence[int], k: int = 10, n_folds: int = 5) -> list[tuple[float, float]]:
    """Held-out (accuracy share, cost share) per seed of choosing a model per query, not per
    task: the one minimising its estimated cost - price x estimated accuracy
    (`per_query_estimates`), the price the cheapest that keeps `retain` of the strongest
    model's accuracy on the four labelled folds (each of their queries estimated from the
    other three), scored on the fifth. The same folds as `cross_fit_rules`; ties go to the cheaper model."""
    top = C.shape[1] - 1
    out = []
    for seed in seeds:
        fold = np.random.default_rng(seed).permutation(len(C)) % n_folds
        correct = cost = 0.0
        for f in range(n_folds):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            # The price is chosen on estimates as honest as the scored fold's: each labelled
            # query estimated from the other labelled folds only (in sample, a logistic
            # model's or a task mean's own rows look better than new ones do).
            acc_tr, cost_tr = np.empty((len(tr), C.shape[1])), np.empty((len(tr), C.shape[1]))
            inner = fold[tr]
            for g in np.unique(inner):
                acc_tr[inner == g], cost_tr[inner == g] = per_query_estimates(
                    how, X, F, P, C, K, tasks, tr[inner != g], tr[inner == g], k)
            acc_te, cost_te = per_query_estimates(how, X, F, P, C, K, tasks, tr, te, k)
            best = None
            for lam in LAMBDAS:
                pick = per_query_pick(lam, acc_tr, cost_tr, C, K, tr)
                a, c = C[tr, pick].sum(), K[tr, pick].sum()
                if a >= retain * C[tr, top].sum() - 1e-9 and (best is None or c < best[0]):
                    best = (c, lam)
            # As `cross_fit_rules`: no price keeps `retain` there, so the strongest answers all.
            pick = per_query_pick(best[1], acc_te, cost_te, C, K, tr) if best else np.full(len(te), top)
            correct += C[te, pick].sum()
            cost += K[te, pick].sum()
        out.append((round(float(correct / C[:, top].sum()), 4), round(float(cost / K[:, top].sum()), 4)))
    return out


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(accuracy, cost) points kept when nothing cheaper is as accurate, cheapest first."""
    kept: list[tuple[float, float]] = []
    for acc, cost in sorted(points, key=lambda p: (p[1], -p[0])):
        if not kept or acc > kept[-1][0]:
            kept.append((acc, cost))
    return kept


def held_out_frontiers(records: Sequence[querylog.Record], found: dict, model: costs.CostModel, ladder: Sequence[str],
                       X: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, K: np.ndarray, tasks: np.ndarray,
                       seeds: Sequence[int], k: int = 10, n_folds: int = 5) -> dict[str, list[list[tuple[float, float]]]]:
    """Per rule and seed, the held-out (accuracy share, cost share) curve swept over the one
    price of accuracy: every fold's choice made from the other four at that price and the
    scored folds pooled. Routing per task (calibrate's `choose_by_weight` on the tasks, its
    accuracies shrunk by the fixed or the empirical prior strength, `choice.empirical_strength`)
    and per query (`per_query_estimates`) compared at equal accuracy, free of how a price is
    picked (which `cross_fit_rules` and `cross_fit_per_query` add, each its own way)."""
    top = C.shape[1] - 1
    names = sorted(set(tasks))
    labels = np.array([names.index(t) for t in tasks])
    strengths = {"per task": choice.PRIOR_STRENGTH, "per task, empirical prior strength": choice.EMPIRICAL}
    rules = (*strengths, *(f"per query, {how}" for how in PER_QUERY))
    out: dict[str, list[list[tuple[float, float]]]] = {r: [] for r in rules}
    for seed in seeds:
        fold = np.random.default_rng(seed).permutation(len(C)) % n_folds
        picks: dict[str, np.ndarray] = {r: np.zeros((len(LAMBDAS), len(C)), dtype=int) for r in rules}
        for f in range(n_folds):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            tables = {r: choice.cluster_stats(labels[tr].tolist(), [records[i] for i in tr], found, ladder, model,
                                              prior_strength=s) for r, s in strengths.items()}
            est = {how: per_query_estimates(how, X, F, P, C, K, tasks, tr, te, k) for how in PER_QUERY}
            for li, lam in enumerate(LAMBDAS):
                for r, table in tables.items():
                    models = choice.choose_by_weight(table, float(lam)).models
                    picks[r][li, te] = [ladder.index(models.get(c, ladder[top])) for c in labels[te]]
                for how, (acc, cost) in est.items():
                    picks[f"per query, {how}"][li, te] = per_query_pick(lam, acc, cost, C, K, tr)
        rows = np.arange(len(C))
        for r in rules:
            curve = [(float(C[rows, p].sum() / C[:, top].sum()), float(K[rows, p].sum() / K[:, top].sum()))
                     for p in picks[r]]
            out[r].append([(round(a, 4), round(c, 4)) for a, c in upper_hull(curve)])
    return out


def within_task_auroc(score: np.ndarray, C: np.ndarray, tasks: np.ndarray) -> list[float | None]:
    """Per model: the AUROC of `score[:, j]` for predicting whether model j answered right,
    inside each task, pooled over the tasks' pairs (`deferral.within_auroc`)."""
    return [deferral.within_auroc(score[:, j].tolist(), C[:, j].astype(bool).tolist(), tasks.tolist())[0]
            for j in range(C.shape[1])]


def held_out_auroc(how: str, X: np.ndarray, F: np.ndarray, P: np.ndarray, C: np.ndarray, K: np.ndarray, tasks: np.ndarray,
                   seed: int, k: int = 10, n_folds: int = 5) -> list[float | None]:
    """`within_task_auroc` of each query's estimated accuracy per model from the other folds
    only (`per_query_estimates`), within each (task, fold): there the task's prior is one
    number, so only what the estimate says of the query itself ranks. (Across a task's folds
    the prior moves against the fold's own answers, and a leave-one-out neighbours' mean
    against the query's: both push a task-wide AUROC below 0.5 on data with no signal.)"""
    fold = np.random.default_rng(seed).permutation(len(C)) % n_folds
    scores = np.empty(C.shape)
    for f in range(n_folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        scores[te] = per_query_estimates(how, X, F, P, C, K, tasks, tr, te, k)[0]
    return within_task_auroc(scores, C, np.char.add(tasks.astype(str), fold.astype(str)))

RATIOS = np.linspace(0.5, 1.2, 71)


def cross_fit_rules(records: Sequence[querylog.Record], found: dict, model: costs.CostModel, ladder: Sequence[str],
                    C: np.ndarray, K: np.ndarray, tasks: np.ndarray, retain: float, seeds: Sequence[int],
                    n_folds: int = 5) -> dict[str, list[tuple[float, float]]]:
    """Held-out (accuracy share, cost share) per seed of one model per task, chosen on the
    other folds by each of calibrate's rules (on `choice.cluster_stats` with the tasks
    as clusters) at its cheapest setting that keeps `retain` there."""
    top = C.shape[1] - 1
    names = sorted(set(tasks))
    labels = np.array([names.index(t) for t in tasks])
    rules = {
        "share of the strongest, per task": lambda table, r: choice.choose_models(table, costs.Budget("retain", r)),
        "one price of accuracy": choice.choose_by_weight,
    }
    grids = {"share of the strongest, per task": RATIOS, "one price of accuracy": LAMBDAS}
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in rules}

    def score(idx: np.ndarray, models: dict[int, str]) -> tuple[float, float]:
        rung = np.array([ladder.index(models[c]) for c in labels[idx]])
        return float(C[idx, rung].sum()), float(K[idx, rung].sum())

    hindsight = "one price of accuracy, the best price in hindsight"
    out[hindsight] = []
    for seed in seeds:
        fold = np.random.default_rng(seed).permutation(len(C)) % n_folds
        tables = []
        for f in range(n_folds):
            tr = np.flatnonzero(fold != f)
            tables.append(choice.cluster_stats(labels[tr].tolist(), [records[i] for i in tr], found, ladder, model))
        for name, rule in rules.items():
            correct = cost = 0.0
            for f in range(n_folds):
                tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                best: tuple[float, dict[int, str]] | None = None
                for value in grids[name]:
                    models = rule(tables[f], float(value)).models
                    a, c = score(tr, models)
                    if a >= retain * C[tr, top].sum() - 1e-9 and (best is None or c < best[0]):
                        best = (c, models)
                a, c = score(te, best[1] if best else {i: ladder[top] for i in range(len(names))})
                correct += a
                cost += c
            out[name].append((round(correct / C[:, top].sum(), 4), round(cost / K[:, top].sum(), 4)))
        # Each price's held-out figures over all folds, and the cheapest price that keeps
        # `retain` there: chosen on the scored queries, so it bounds what any way of
        # choosing the price can do with per-task models chosen on four folds.
        held = []
        for value in LAMBDAS:
            a = c = 0.0
            for f in range(n_folds):
                got = score(np.flatnonzero(fold == f), choice.choose_by_weight(tables[f], float(value)).models)
                a, c = a + got[0], c + got[1]
            held.append((a / C[:, top].sum(), c / K[:, top].sum()))
        kept = [(c, a) for a, c in held if a >= retain - 1e-9]
        c, a = min(kept) if kept else (1.0, 1.0)
        out[hindsight].append((round(a, 4), round(c, 4)))
    return out


PLOTTED = ("cascade, calibrated deferral", "cascade (this router)", "cluster routing, no quality check",
           "random routing at the deferral cascade's cost", "qwen2.5-coder-0.5b-instruct only",
           "gemma-3-270m only", "oracle (cheapest correct model)")


def held_out_points(path: Path) -> list[tuple[str, float, float]]:
    """(name, cost share, accuracy share) of each seed's systems in a `bench/headline --json` file."""
    report = json.loads(path.read_text())
    out = []
    for run in report["runs"]:
        for p in run["points"]:
            if p["name"] in PLOTTED:
                out.append((p["name"], float(p["cost_share"]), float(p["accuracy_share"])))
    return out


def svg(curves: dict[str, list[tuple[float, float]]], points: list[tuple[str, float, float]], title: str,
        retain: float, goal_cost: float, w: int = 760, h: int = 520, pad: int = 64) -> str:
    """Accuracy share against cost share, by hand (no plotting dependency)."""
    from html import escape

    x0, x1, y0, y1 = 0.4, 1.1, 0.3, 1.15

    def sx(x: float) -> float:
        return pad + (min(max(x, x0), x1) - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (min(max(y, y0), y1) - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 18}" text-anchor="middle">cost, share of the strongest model answering every query</text>',
        f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">accuracy, share of the strongest</text>',
        # The goal: at least `retain` of the accuracy at no more than `goal_cost` of the cost.
        f'<rect x="{pad}" y="{sy(y1):.1f}" width="{sx(goal_cost) - pad:.1f}" height="{sy(retain) - sy(y1):.1f}" '
        f'fill="#2a2" fill-opacity="0.08" stroke="#2a2" stroke-dasharray="4 3"/>',
        f'<text x="{sx(goal_cost) - 4:.1f}" y="{sy(y1) + 14:.1f}" text-anchor="end" fill="#2a2">goal</text>',
    ]
    for i in range(8):
        xv = x0 + (x1 - x0) * i / 7
        yv = y0 + (y1 - y0) * i / 7
        parts.append(f'<text x="{sx(xv):.1f}" y="{h - pad + 15}" text-anchor="middle">{xv:.2f}</text>')
        parts.append(f'<text x="{pad - 5}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
    colours = ["#888", "#c60"]
    for (name, curve), colour in zip(curves.items(), colours):
        line = " ".join(f"{sx(c):.1f},{sy(a):.1f}" for a, c in curve)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        a, c = next(((a, c) for a, c in curve if a >= 1.0), curve[-1])
        parts.append(f'<text x="{sx(c) + 6:.1f}" y="{sy(a) - 6:.1f}" fill="{colour}">{escape(name)}</text>')
    palette = dict(zip(PLOTTED, ["crimson", "purple", "steelblue", "#999", "#2a7", "#a72", "black"]))
    named: set[str] = set()
    for name, cost, acc in points:
        parts.append(f'<circle cx="{sx(cost):.1f}" cy="{sy(acc):.1f}" r="4" fill="{palette[name]}" fill-opacity="0.8"/>')
        named.add(name)
    for i, name in enumerate(n for n in PLOTTED if n in named):
        y = h - pad - 14 * (len(named) - i)
        parts.append(f'<circle cx="{w - pad - 250}" cy="{y - 4}" r="4" fill="{palette[name]}"/>')
        parts.append(f'<text x="{w - pad - 240}" y="{y}">{escape(name)} (held out)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--unit", choices=costs.UNITS, default=None, help="cost unit (default: the ladder's, as calibration picks)")
    ap.add_argument("--task-field", default="meta.source", help="where each record names its task")
    ap.add_argument("--retain", type=float, default=0.98, help="report each curve's cost at this accuracy share")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20], help="neighbours for the per-query prior")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fold seeds of the cross-fitted rules")
    ap.add_argument("--headline", type=Path, help="a `bench/headline --json` file of the same log: its held-out points")
    ap.add_argument("--plot", type=Path, help="write the curves (and --headline's points) to this .svg")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    rec = recorded(args.log, args.unit)
    records, settings, ladder, found, model, C, K = rec.records, rec.settings, rec.ladder, rec.found, rec.model, rec.C, rec.K
    share = np.array([[
        (costs.token_cost(model.unit, max(0, found[(r.id, m)].prompt_tokens - model.cached(m)), 0,
                          model.prices.get(m), model.speeds.get(m)) or 0.0) for m in ladder] for r in records])
    tasks = np.array([task_of(r, args.task_field) for r in records])
    n, top = len(records), len(ladder) - 1
    ref_acc, ref_cost = C[:, top].mean(), K[:, top].mean()

    per_task: dict[str, list[tuple[float, float]]] = {}
    perfect: dict[str, list[tuple[float, float]]] = {}
    for task in np.unique(tasks):
        sel = tasks == task
        per_task[task] = [(C[sel, j].sum(), K[sel, j].sum()) for j in range(len(ladder))]
        perfect[task] = [perfect_cascade(C[sel], K[sel], p) for p in cascade_paths(len(ladder))]
    one_model = frontier(per_task, n, ref_acc, ref_cost)
    perfect_curve = frontier(perfect, n, ref_acc, ref_cost)

    embedder = embed.make_embedder(settings.embedder, settings).fit([r.prompt for r in records])
    X = embedder.transform([r.prompt for r in records])
    knn = {k: within_task_knn(X, C, tasks, k) for k in args.k}
    crossed = cross_fit_rules(records, found, model, ladder, C, K, tasks, args.retain, args.seeds)
    F, P = prompt_features([r.prompt for r in records]), share
    for k in args.k:
        crossed[f"one price of accuracy, per query from its {k} nearest labelled queries"] = cross_fit_per_query(
            "neighbours", X, F, P, C, K, tasks, args.retain, args.seeds, k)
    crossed["one price of accuracy, per query from its prompt's features"] = cross_fit_per_query(
        "features", X, F, P, C, K, tasks, args.retain, args.seeds)
    held_auroc = {how: held_out_auroc(how, X, F, P, C, K, tasks, args.seeds[0]) for how in PER_QUERY}
    curves = held_out_frontiers(records, found, model, ladder, X, F, P, C, K, tasks, args.seeds)
    held_at = {r: {str(t): [cost_at(c, t) for c in per_seed] for t in (0.95, args.retain)} for r, per_seed in curves.items()}

    figures = {
        "log": str(args.log), "queries": n, "tasks": int(len(np.unique(tasks))), "unit": model.unit,
        "models": [
            {"model": m, "accuracy": round(float(C[:, j].mean()), 4),
             "cost_share": round(float(K[:, j].mean() / ref_cost), 4),
             "prompt_share_of_its_cost": round(float(share[:, j].sum() / K[:, j].sum()), 4) if K[:, j].sum() else None}
            for j, m in enumerate(ladder)
        ],
        "one_model_per_task": one_model,
        "perfect_check_cascade": perfect_curve,
        "retain": args.retain,
        "cost_at_retain": {"one_model_per_task": cost_at(one_model, args.retain),
                           "perfect_check_cascade": cost_at(perfect_curve, args.retain)},
        "cross_fitted_one_model_per_task": crossed,
        "within_task_knn_auroc": {str(k): dict(zip(ladder, v)) for k, v in knn.items()},
        "within_task_auroc_held_out": {how: dict(zip(ladder, v)) for how, v in held_auroc.items()},
        "held_out_frontiers": curves,
        "held_out_cost_at": held_at,
    }
    if args.plot:
        points = held_out_points(args.headline) if args.headline else []
        title = f"{args.log.name}: {n} queries, cost in {model.unit}; curves in-sample, points held out"
        args.plot.write_text(svg({"one model per task": one_model, "cascade with a perfect check": perfect_curve},
                                 points, title, args.retain, 0.8))
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{args.log}: {n} queries, {figures['tasks']} tasks; shares of {ladder[-1]} answering every query; "
          f"cost in {model.unit}; IN-SAMPLE bounds, not results")
    print("\nmodel | accuracy | cost share | prompt processing share of its cost")
    for row in figures["models"]:
        print(f"{row['model']} | {row['accuracy']:.3f} | {row['cost_share']:.3f} | {row['prompt_share_of_its_cost']}")
    for name, curve in (("one model per task", one_model), ("cascade with a perfect quality check, per task", perfect_curve)):
        print(f"\n{name}: accuracy share @ cost share")
        print("  " + ", ".join(f"{a:.3f}@{c:.3f}" for a, c in curve if a >= 0.8))
        at = figures["cost_at_retain"]["one_model_per_task" if name.startswith("one") else "perfect_check_cascade"]
        print(f"  cost at {args.retain:.0%} of the accuracy: " + ("not reached" if at is None else f"{at:.3f}"))
    print(f"\ncross-fitted, one model per task chosen on {5 - 1} of 5 folds for {args.retain:.0%} there, "
          "scored on the fifth (accuracy share @ cost share, per seed):")
    for name, values in crossed.items():
        print(f"  {name}: " + ", ".join(f"{a:.3f}@{c:.3f}" for a, c in values))
    print("\nheld out, swept over the price: cost share at an accuracy share, per seed (per task / per query)")
    for r, by in held_at.items():
        print(f"  {r}: " + "; ".join(f"{t}: " + ", ".join("-" if c is None else f"{c:.3f}" for c in v) for t, v in by.items()))
    print("\nper-query prior before any model runs: within-task AUROC of the k nearest neighbours' correctness")
    for k, values in knn.items():
        print(f"  k={k}: " + ", ".join(f"{m} {v:.3f}" if v is not None else f"{m} -" for m, v in zip(ladder, values)))
    print("  held out (estimated from the other 4 folds, AUROC within each task and fold, 10 neighbours, "
          "seed %d):" % args.seeds[0])
    for how, values in held_auroc.items():
        print(f"  {how}: " + ", ".join(f"{m} {v:.3f}" if v is not None else f"{m} -" for m, v in zip(ladder, values)))


if __name__ == "__main__":
    main()
