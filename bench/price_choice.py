#!/usr/bin/env python3
"""How should `cre calibrate` pick its price of accuracy? Three rules, held out.

Calibration chooses each cluster's model by one price of accuracy (`choose_by_weight`) and
picks the cheapest price that keeps `--retain` of the strongest model's accuracy. What it
knows of a price before the router meets new queries is either

- its **held-out** figures: cluster models chosen on four fifths of the calibration log,
  scored on the fifth (5-fold cross-validation); or
- its **in-sample** figures: the models chosen on the whole calibration log, scored there; or
- their mean, `calibrate.estimate`, which `cre calibrate` uses.

This bench takes the tasks as clusters (no clustering noise, no quality check: routing
only) and cross-fits each rule: for each of 5 outer folds the price is picked on the other
four by the rule, the models are chosen there at that price, and the outer fold is scored.
Outer and inner folds come from `calibrate.folds`, as `cre calibrate` draws them: every copy
of a prompt in one fold, since the copies share one recorded answer. Per rule and price
grid (`calibrate.WEIGHT_GRID`, and the 15-price grid it replaced) it prints the mean and
range over the fold seeds of the accuracy and cost shares of the strongest model. It also
prints, at a few prices, how far each kind of figure sat from what that price's final
choices kept on the outer fold, averaged over every outer fold: the bias each rule carries.

    .venv/bin/python bench/price_choice.py examples/querylog-large.jsonl
    .venv/bin/python bench/price_choice.py LOG --retain 0.95 0.98 0.99 --seeds 5 6 7 8 9 --json

Nothing loads a model unless an answer is missing from the outcome store (then it runs, as
`cre fit` would). Costs are `cre models bench` seconds, as calibration prices them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from crecli import calibrate, choice, costs
from crecli.outcomes import prompt_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier_bound import recorded, task_of  # noqa: E402  (a sibling script, not a package)

OLD_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 1e6)
RULES = ("held out", "estimate", "in sample")
BIAS_PRICES = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


class Harness:
    """Per-task routing replayed from the recorded answers: `C` right or wrong, `K` cost."""

    def __init__(self, rec: Any, tasks: Sequence[str]) -> None:
        self.rec = rec
        names = sorted(set(tasks))
        self.labels = np.array([names.index(t) for t in tasks])
        self.top = len(rec.ladder) - 1
        # Each record's prompt identity (as `replay.Data.prompt_ids`): copies of a prompt share
        # one recorded answer, so copies dealt into two folds put a held-out query's own answer
        # among those that chose its task's model.
        self.prompts = [prompt_sha256(r.prompt) for r in rec.records]

    def folds(self, idx: np.ndarray, seed: int) -> list[np.ndarray]:
        """5 folds of the records `idx`, drawn by `calibrate.folds` as `cre calibrate` draws
        them: every copy of a prompt in the fold of its first copy."""
        return [idx[fold] for fold in calibrate.folds(len(idx), 5, seed, [self.prompts[i] for i in idx])]

    def models(self, idx: np.ndarray, grid: Sequence[float]) -> list[np.ndarray]:
        """Each task's ladder index at each price of `grid`, chosen on `idx` by calibrate's own rule."""
        table = choice.cluster_stats(self.labels[idx].tolist(), [self.rec.records[i] for i in idx], self.rec.found,
                                        self.rec.ladder, self.rec.model)
        out = []
        for weight in grid:
            chosen = choice.choose_by_weight(table, weight).models
            out.append(np.array([self.rec.ladder.index(chosen.get(t, self.rec.ladder[-1]))
                                 for t in range(self.labels.max() + 1)]))
        return out

    def score(self, idx: np.ndarray, models: np.ndarray) -> calibrate.Figures:
        rung = models[self.labels[idx]]
        return calibrate.Figures(float(self.rec.C[idx, rung].mean()), float(self.rec.K[idx, rung].mean()), 0.0)

    def figures(self, train: np.ndarray, grid: Sequence[float], final: Sequence[np.ndarray],
                seed: int) -> dict[str, list[calibrate.Figures]]:
        """Each price's held-out (inner 5-fold) and in-sample figures on `train`, and their
        estimate; `final` are the models chosen on all of `train` at each price of `grid`."""
        held = [[0.0, 0.0] for _ in grid]
        for test in self.folds(train, seed):
            for g, models in enumerate(self.models(np.setdiff1d(train, test), grid)):
                f = self.score(test, models)
                held[g][0] += f.accuracy * len(test)
                held[g][1] += f.mean_cost * len(test)
        out: dict[str, list[calibrate.Figures]] = {"held out": [], "in sample": [], "estimate": []}
        for g, models in enumerate(final):
            h = calibrate.Figures(held[g][0] / len(train), held[g][1] / len(train), 0.0)
            inside = self.score(train, models)
            out["held out"].append(h)
            out["in sample"].append(inside)
            out["estimate"].append(calibrate.estimate(h, inside))
        return out


def pick(grid: Sequence[float], figures: Sequence[calibrate.Figures], retain: float, ref: tuple[float, float]) -> float:
    """The price `cre calibrate` would take on these figures (`calibrate._pick`)."""
    candidates = [(calibrate.Setting(float(w), ()), f) for w, f in zip(grid, figures)]
    return calibrate._pick(candidates, costs.Budget("retain", retain), ref)[0].weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--retain", type=float, nargs="+", default=[0.98])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5, 15)), help="outer fold seeds")
    ap.add_argument("--task-field", default="meta.source")
    ap.add_argument("--unit", choices=costs.UNITS, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rec = recorded(args.log, args.unit)
    h = Harness(rec, [task_of(r, args.task_field) for r in rec.records])
    n, top = len(rec.records), h.top
    ref_acc, ref_cost = rec.C[:, top].sum(), rec.K[:, top].sum()
    grids = {"current grid": tuple(calibrate.WEIGHT_GRID), "old grid": OLD_GRID}
    result: dict[str, Any] = {"log": str(args.log), "queries": n, "seeds": args.seeds, "rules": {}, "bias": {}}
    bias = {rule: np.zeros((len(BIAS_PRICES), 2)) for rule in RULES}
    outer_folds = 0
    # (seed, retain, grid, rule) -> (correct answers, cost) over the outer folds
    totals: dict[tuple[int, float, str, str], list[float]] = {}
    for s, seed in enumerate(args.seeds):
        print(f"seed {seed} ({s + 1}/{len(args.seeds)})...", file=sys.stderr)
        for test in h.folds(np.arange(n), seed):
            train = np.setdiff1d(np.arange(n), test)
            ref = (float(rec.C[train, top].mean()), float(rec.K[train, top].mean()))
            for gname, grid in grids.items():
                final = h.models(train, grid)
                figs = h.figures(train, grid, final, seed * 100 + len(totals))
                for retain in args.retain:
                    for rule in RULES:
                        weight = pick(grid, figs[rule], retain, ref)
                        f = h.score(test, final[list(grid).index(weight)])
                        t = totals.setdefault((seed, retain, gname, rule), [0.0, 0.0])
                        t[0] += f.accuracy * len(test)
                        t[1] += f.mean_cost * len(test)
            final = h.models(train, BIAS_PRICES)
            figs = h.figures(train, BIAS_PRICES, final, seed * 100 + 99)
            for p, models in enumerate(final):
                truth = h.score(test, models)
                for rule in RULES:
                    bias[rule][p] += (figs[rule][p].accuracy - truth.accuracy) / ref[0], (figs[rule][p].mean_cost - truth.mean_cost) / ref[1]
            outer_folds += 1
    for retain in args.retain:
        for gname in grids:
            for rule in RULES:
                shares = np.array([(totals[(seed, retain, gname, rule)][0] / ref_acc, totals[(seed, retain, gname, rule)][1] / ref_cost)
                                   for seed in args.seeds])
                result["rules"][f"{retain} | {gname} | {rule}"] = {
                    "accuracy_share": {"mean": shares[:, 0].mean(), "min": shares[:, 0].min(), "max": shares[:, 0].max()},
                    "cost_share": {"mean": shares[:, 1].mean(), "min": shares[:, 1].min(), "max": shares[:, 1].max()},
                }
    for rule in RULES:
        result["bias"][rule] = {f"{w:g}": {"accuracy_points": 100 * b[0] / outer_folds, "cost_points": 100 * b[1] / outer_folds}
                                for w, b in zip(BIAS_PRICES, bias[rule])}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.log}: {n} queries, tasks as clusters, routing only; cross-fitted over fold seeds {args.seeds}; "
          "shares of the strongest model answering every query, mean [min-max] over the seeds")
    for key, r in result["rules"].items():
        a, c = r["accuracy_share"], r["cost_share"]
        print(f"  retain {key}: accuracy {a['mean']:.1%} [{a['min']:.1%}-{a['max']:.1%}], "
              f"cost {c['mean']:.1%} [{c['min']:.1%}-{c['max']:.1%}]")
    print("\nbias against what a price's final choices kept on the outer fold (points of the strongest model's "
          "accuracy / cost; mean over every outer fold):")
    for rule in RULES:
        print(f"  {rule}: " + ", ".join(f"{w}: {b['accuracy_points']:+.2f} / {b['cost_points']:+.2f}"
                                       for w, b in result["bias"][rule].items()))


if __name__ == "__main__":
    main()
