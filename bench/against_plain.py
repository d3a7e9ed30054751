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
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any


def _headline() -> Any:
    """bench/headline, a script without a .py suffix, loaded as a module."""
    loader = importlib.machinery.SourceFileLoader("headline", str(Path(__file__).with_name("headline")))
    spec = importlib.util.spec_from_loader("headline", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# Mean [min-max] +-std across seeds, as bench/headline reports its own runs; its deferral
# cascade, and the same cascade at each further --retain of its frontier.
_HEADLINE = _headline()
spread, DEFERRAL, frontier_name = _HEADLINE.spread, _HEADLINE.DEFERRAL, _HEADLINE.frontier_name


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
        frontier = [frontier_name(r) for r in headline.get("frontier", [])]
        for name in (DEFERRAL, *frontier, run["reference"]):
            if name not in points:
                continue
            p = points[name]
            rows.setdefault(name, []).append({
                "seed": run["seed"], "accuracy": p["accuracy"], "mean_cost": p["mean_cost"],
                "accuracy_share": p["accuracy"] / base["accuracy"], "cost_share": p["mean_cost"] / base["mean_cost"],
            })
    return {
        "retain": [headline["retain"], *headline.get("frontier", [])],
        "plain": {k: base[k] for k in ("model", "n", "unit", "accuracy", "mean_cost", "mean_output_tokens")},
        "arms": {name: {"per_seed": per, **{key: spread([r[key] for r in per]) for key in ("accuracy_share", "cost_share")}}
                 for name, per in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headline", type=Path, required=True, help="`bench/headline --json` output")
    parser.add_argument("--plain", type=Path, required=True, help="`bench/plain_baseline.py --out` output")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    headline = json.loads(args.headline.read_text())
    plain = json.loads(args.plain.read_text())
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
