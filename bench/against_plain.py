"""The cascade against what a user runs without `cre` (issue 24's first reference).

Reads two files this folder's scripts wrote and runs nothing: `bench/headline --json` (a
cross-fitted run, every query of the log held out once per seed, or a held-out split) and
`bench/plain_baseline.py` (the strongest model on every query of the same log with its own
chat template, nothing of `cre`'s). Both price in bench-seconds at this machine's `cre
models bench` speeds, leaving out the tokens every prompt shares, so their mean costs
compare directly. Prints, per seed and as mean [min-max] ± std across seeds, the cascade's
accuracy and cost as shares of the plain model's, and cre's own strongest-only arm beside
it (what `cre`'s prompt alone changes). With `bench/headline --match-plain`, the cascade
whose budget each fold read off the plain prompt's accuracy on its own fit queries is
reported too:

    python bench/against_plain.py --headline bench/results/headline-1400.json \\
        --plain bench/results/plain-1400.json [--json]

A held-out split with answered examples (`bench/headline --test-log T --test-fit-every N
--shots ...`) scores only part of the log: the plain model is then scored on those queries
alone, redone with the headline's own rule (`split_lines`) from the logs and N the headline
recorded (or, for a file written before it recorded them, from --log, --test-log and
--test-fit-every given here). That split's arm fitted without examples is reported beside
the arm with them, both against the same plain model:

    python bench/against_plain.py --headline bench/results/headline-shots.json \\
        --plain bench/results/plain-1400.json
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
MATCHED = _HEADLINE.MATCHED  # the cascade whose budget each fold set from the plain prompt (--match-plain)
WITHOUT = "without examples: "  # the held-out split's arm fitted without --shots


def scored_ids(log: Path, test_log: Path, fit_every: int) -> list[str]:
    """The ids a held-out `bench/headline --test-log` run scored: its own split rule, rerun."""
    read = lambda path: [line for line in path.read_text().splitlines() if line.strip()]
    lines, held = _HEADLINE.split_lines(read(log), read(test_log), fit_every)
    ids = [json.loads(lines[i]).get("id") for i in held]
    if None in ids:
        raise SystemExit(f"{test_log}: a held-out line has no id, so the plain model's answer to it cannot be found")
    return ids


def split_of(headline: dict[str, Any], log: Path | None, test_log: Path | None, fit_every: int | None) -> list[str] | None:
    """The ids a held-out split scored, from the split the headline recorded or, for an older
    file, the one given here; None for a cross-fitted run, where any split given is refused."""
    if headline.get("mode") != "split":
        if log or test_log or fit_every is not None:
            raise SystemExit("--log, --test-log and --test-fit-every describe a held-out split; "
                             f"--headline is a {headline.get('mode')} run")
        return None
    recorded = headline.get("split") or {}
    given = {"log": log, "test_log": test_log, "test_fit_every": fit_every}
    for key, value in given.items():
        if value is not None and key in recorded and str(value) != str(recorded[key]):
            raise SystemExit(f"--{key.replace('_', '-')} {value}: the headline's split used {recorded[key]}")
    merged = {key: recorded.get(key) if value is None else value for key, value in given.items()}
    if merged["log"] is None or merged["test_log"] is None:
        raise SystemExit("--headline scored a held-out split it did not record: give its --log, --test-log and "
                         "--test-fit-every")
    return scored_ids(Path(merged["log"]), Path(merged["test_log"]), int(merged["test_fit_every"] or 0))


def plain_on(plain: dict[str, Any], ids: list[str] | None) -> dict[str, Any]:
    """The plain model's summary, or, given the ids a held-out run scored, its accuracy and
    mean cost on those queries alone (the same unit and speeds)."""
    base = plain["summary"]
    if ids is None:
        return base
    rows = {row["id"]: row for row in plain["rows"]}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise SystemExit(f"--plain has no answer for {len(missing)} scored queries (first: {missing[0]}): not the same log")
    chosen = [rows[i] for i in ids]
    return {**base, "n": len(chosen), "accuracy": sum(bool(r["correct"]) for r in chosen) / len(chosen),
            "mean_cost": sum(r["cost"] for r in chosen) / len(chosen),
            "mean_output_tokens": sum(r["output_tokens"] for r in chosen) / len(chosen)}


def compare(headline: dict[str, Any], plain: dict[str, Any], ids: list[str] | None = None) -> dict[str, Any]:
    """Each seed's cascade and strongest-only arm as shares of the plain model's accuracy and
    mean cost; for a held-out split (`ids`, the queries it scored) its arm without examples
    too. Refuses files that do not describe the same queries in the same unit."""
    mode = headline.get("mode")
    if mode == "split" and ids is None:
        raise SystemExit("--headline scored a held-out split: give its --log, --test-log and --test-fit-every")
    if mode not in ("cross-fitted", "split"):
        raise SystemExit("--headline: a leave-tasks-out run holds out tasks, not every query; use the cross-fitted "
                         "run or a held-out split (--test-log)")
    base = plain_on(plain, ids if mode == "split" else None)
    runs = headline["runs"]
    for run in runs:
        if run["n"] != base["n"]:
            raise SystemExit(f"--headline scored {run['n']} queries, --plain {base['n']}: not the same log"
                             + (" or not the same split (--test-fit-every?)" if ids is not None else ""))
        if run["unit"] != base["unit"]:
            raise SystemExit(f"--headline priced in {run['unit']}, --plain in {base['unit']}")
    rows: dict[str, list[dict[str, float]]] = {}
    frontier = [frontier_name(r) for r in headline.get("frontier", [])]
    for run in runs:
        arms = [("", run)] + ([(WITHOUT, run["plain"])] if "plain" in run else [])
        for prefix, arm in arms:
            points = {p["name"]: p for p in arm["points"]}
            for name in (DEFERRAL, *frontier, MATCHED, arm["reference"]):
                if name in points:
                    rows.setdefault(prefix + name, []).append(_share(run["seed"], points[name], base))
    return {
        "retain": [headline["retain"], *headline.get("frontier", [])],
        "shots": headline.get("shots", ["0"]),
        "plain": {k: base[k] for k in ("model", "n", "unit", "accuracy", "mean_cost", "mean_output_tokens")},
        "arms": {name: {"per_seed": per, **{key: spread([r[key] for r in per]) for key in ("accuracy_share", "cost_share")}}
                 for name, per in rows.items()},
    }


def _share(seed: int, p: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    return {
        "seed": seed, "accuracy": p["accuracy"], "mean_cost": p["mean_cost"],
        "accuracy_share": p["accuracy"] / base["accuracy"], "cost_share": p["mean_cost"] / base["mean_cost"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headline", type=Path, required=True, help="`bench/headline --json` output")
    parser.add_argument("--plain", type=Path, required=True, help="`bench/plain_baseline.py --out` output")
    parser.add_argument("--log", type=Path, help="a held-out split's --log (default: what the headline recorded)")
    parser.add_argument("--test-log", type=Path, help="a held-out split's --test-log (default: as recorded)")
    parser.add_argument("--test-fit-every", type=int, metavar="N", help="a held-out split's --test-fit-every (default: as recorded)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    headline = json.loads(args.headline.read_text())
    plain = json.loads(args.plain.read_text())
    result = compare(headline, plain, split_of(headline, args.log, args.test_log, args.test_fit_every))
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
