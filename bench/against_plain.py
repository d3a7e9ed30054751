"""The cross-fitted cascade against what a user runs without `cre` (issue 24's first reference).

Reads two files this folder's scripts wrote and runs nothing: `bench/headline --json` (a
cross-fitted run, every query of the log held out once per seed) and `bench/plain_baseline.py`
(the strongest model on every query of the same log with its own chat template, nothing of
`cre`'s). Both price in bench-seconds at this machine's `cre models bench` speeds, leaving out
the tokens every prompt shares, so their mean costs compare directly. Prints, per seed and as
mean [min-max] ± std across seeds, the cascade's accuracy and cost as shares of the plain
model's, and cre's own strongest-only arm beside it (what `cre`'s prompt alone changes):

    python bench/against_plain.py --headline bench/results/headline-1400.json \\
        --plain bench/results/plain-1400.json [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

CASCADE = "cascade (this router)"


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # as bench/headline reports it


def compare(headline: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Each seed's cascade and strongest-only arm as shares of the plain model's accuracy and
    mean cost. Refuses files that do not describe the same queries in the same unit."""
    base = plain["summary"]
    if headline.get("mode") != "cross-fitted":
        raise SystemExit("--headline: a leave-tasks-out run holds out tasks, not every query; use the cross-fitted run")
    runs = headline["runs"]
    for run in runs:
        if run["n"] != base["n"]:
            raise SystemExit(f"--headline scored {run['n']} queries, --plain {base['n']}: not the same log")
        if run["unit"] != base["unit"]:
            raise SystemExit(f"--headline priced in {run['unit']}, --plain in {base['unit']}")
    rows: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        points = {p["name"]: p for p in run["points"]}
        for name in (CASCADE, run["reference"]):
            if name not in points:
                continue
            p = points[name]
            rows.setdefault(name, []).append({
                "seed": run["seed"], "accuracy": p["accuracy"], "mean_cost": p["mean_cost"],
                "accuracy_share": p["accuracy"] / base["accuracy"], "cost_share": p["mean_cost"] / base["mean_cost"],
            })
    return {
        "plain": {k: base[k] for k in ("model", "n", "unit", "accuracy", "mean_cost", "mean_output_tokens")},
        "arms": {name: {"per_seed": per, **{key: spread([r[key] for r in per]) for key in ("accuracy_share", "cost_share")}}
                 for name, per in rows.items()},
    }


def reference_point(run: dict[str, Any]) -> dict[str, Any] | None:
    """The strongest-only arm over the whole log: the mean of its per-fold points, which each
    score an equal share of the log (the cross-fit's folds)."""
    folds = [next((p for p in f["points"] if p["name"] == run["reference"]), None) for f in run.get("folds", [])]
    if not folds or any(p is None for p in folds):
        return None
    sizes = [f["n_eval"] for f in run["folds"]]
    total = sum(sizes)
    return {"name": run["reference"],
            "accuracy": sum(p["accuracy"] * n for p, n in zip(folds, sizes)) / total,
            "mean_cost": sum(p["mean_cost"] * n for p, n in zip(folds, sizes)) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headline", type=Path, required=True, help="`bench/headline --json` output")
    parser.add_argument("--plain", type=Path, required=True, help="`bench/plain_baseline.py --out` output")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    headline = json.loads(args.headline.read_text())
    plain = json.loads(args.plain.read_text())
    for run in headline["runs"]:
        point = reference_point(run)
        if point is not None and all(p["name"] != point["name"] for p in run["points"]):
            run["points"].append(point)
    result = compare(headline, plain)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    base = result["plain"]
    print(f"plain {base['model']} (its own chat template, nothing of cre's): accuracy {base['accuracy']:.1%}, "
          f"mean cost {base['mean_cost']:.3f} {base['unit']}/query, {base['n']} queries", file=sys.stderr)
    for name, arm in result["arms"].items():
        acc, cost = arm["accuracy_share"], arm["cost_share"]
        seeds = ", ".join(f"seed {r['seed']} {r['accuracy_share']:.1%} at {r['cost_share']:.1%}" for r in arm["per_seed"])
        print(f"{name}: {acc['mean']:.1%} [{acc['min']:.1%}-{acc['max']:.1%}] ±{acc['std']:.1%} of its accuracy "
              f"at {cost['mean']:.1%} [{cost['min']:.1%}-{cost['max']:.1%}] ±{cost['std']:.1%} of its cost ({seeds})")


if __name__ == "__main__":
    main()
