"""Where would starting on a smaller rung and escalating pay? Per cluster, against the break-even.

Issue 24 asks, per cluster, for the share a start on a smaller rung must accept against its
break-even. Starting a cluster's queries on model m and escalating the answers the check
rejects to the strongest model t costs c_m + (1 - s) c_t a query for an accepted share s, so
it beats starting on t only when

    s > c_m / c_t                      (the break-even share)

and it keeps t's accuracy only if the accepted answers are right at least as often as t
would be on them. The best any check can do is a perfect one: accept exactly m's right
answers, s = a_m (m's accuracy in the cluster). So a cluster where a_m <= c_m / c_t cannot
gain from a start on m whatever the signal; where a_m > c_m / c_t, the margin is the most
a better check could save there.

Reads a router file's per-cluster statistics (accuracy and mean cost of each model's greedy
answer on the cluster's labelled queries, in the router's cost unit) and runs nothing:

    .venv/bin/python bench/break_even.py [--router src/crecli/routers/default.cre] [--json]

The shipped router was fitted on all 1,400 queries of examples/querylog-large.jsonl, so
these are figures of the log, in-sample: they bound what a check could do; they are not a
held-out result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def clusters(router: Any) -> list[dict[str, Any]]:
    """Per cluster: its size and start, and for each model below the strongest its accuracy,
    cost share of the strongest, break-even share and what a perfect check would save a query."""
    top = router.ladder_names[-1]
    out = []
    for info in router.clusters:
        t = info.stats.get(top)
        if t is None or not t["mean_cost"]:
            continue
        rungs = {}
        for model in router.ladder_names[:-1]:
            m = info.stats.get(model)
            if m is None:
                continue
            share = m["mean_cost"] / t["mean_cost"]
            # Per query, as a share of the strongest model's cost: a perfect check accepts m's
            # right answers (a_m of them) and sends the rest on, paying both rungs for those.
            perfect_cost = share + (1 - m["accuracy"])
            rungs[model] = {"accuracy": m["accuracy"], "cost_share": share, "break_even": share,
                            "margin": m["accuracy"] - share, "perfect_check_cost": perfect_cost}
        out.append({"cluster": info.id, "size": info.size, "start": info.model,
                    "start_cost": info.stats[info.model]["mean_cost"] if info.model in info.stats else t["mean_cost"],
                    "strongest_accuracy": t["accuracy"], "strongest_cost": t["mean_cost"], "rungs": rungs})
    return out


def summary(rows: list[dict[str, Any]], top: str) -> dict[str, Any]:
    """Queries in clusters that start on the strongest model, and of them those where a
    perfect check on some smaller rung would pay; the cost it would save, as a share of
    what the router's starts cost on the whole log (each start's mean cost, size-weighted)."""
    n = sum(r["size"] for r in rows)
    on_top = [r for r in rows if r["start"] == top]
    start_cost = sum(r["size"] * r["start_cost"] for r in rows)
    paying, saved = [], 0.0
    for r in on_top:
        best = min(r["rungs"].values(), key=lambda x: x["perfect_check_cost"], default=None)
        if best is not None and best["perfect_check_cost"] < 1.0:
            paying.append(r)
            saved += r["size"] * r["strongest_cost"] * (1.0 - best["perfect_check_cost"])
    return {"queries": n, "clusters": len(rows), "start_on_strongest": sum(r["size"] for r in on_top),
            "clusters_on_strongest": len(on_top),
            "perfect_check_pays": {"clusters": len(paying), "queries": sum(r["size"] for r in paying),
                                   "saved_share_of_start_cost": saved / start_cost if start_cost else 0.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", type=Path, default=ROOT / "src" / "crecli" / "routers" / "default.cre")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config, routerfile

    router = routerfile.load(args.router, config.load())
    rows = clusters(router)
    top = router.ladder_names[-1]
    result = {"router": str(args.router), "unit": router.fit.cost_unit, "strongest": top,
              "summary": summary(rows, top), "clusters": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    small = router.ladder_names[:-1]
    print(f"{'cluster':>7} {'size':>5} {'start':>28} {'top acc':>8} " +
          " ".join(f"{m[:18] + ' acc/break-even':>34}" for m in small))
    for r in sorted(rows, key=lambda r: -r["size"]):
        cells = " ".join(f"{r['rungs'][m]['accuracy']:>16.2f} / {r['rungs'][m]['break_even']:<15.2f}"
                         if m in r["rungs"] else f"{'-':>34}" for m in small)
        print(f"{r['cluster']:>7} {r['size']:>5} {r['start'][:28]:>28} {r['strongest_accuracy']:8.2f} {cells}")
    s = result["summary"]
    p = s["perfect_check_pays"]
    print(f"\n{s['start_on_strongest']} of {s['queries']} queries ({s['clusters_on_strongest']} of {s['clusters']} "
          f"clusters) start on {top}. A perfect check on a smaller rung would pay in {p['clusters']} of those "
          f"clusters ({p['queries']} queries), saving at most {100 * p['saved_share_of_start_cost']:.1f}% of what the "
          f"router's starts cost on the log.")


if __name__ == "__main__":
    main()
