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

With `--check`, the real deferral check too, on the recorded answers to the router's fit
log (`--log` to name it; every model's answer must be in the outcome store, or they are
collected first): each answer's P(correct) comes from deferral models fitted on the other
four of five folds (calibration's split and fitting), and a start on each smaller rung m of
each cluster that starts on the strongest model is replayed with the ladder engine at each
P(correct) threshold t (for m and each rung after it below the top): the share m keeps, how
often those are right, and the cascade's accuracy and cost as shares of the strongest
model's there. Per cluster the cheapest such start that keeps 98% of the strongest model's
accuracy there is reported, if it pays.

The shipped router was fitted on all 1,400 queries of examples/querylog-large.jsonl, so
these are figures of the log, in-sample: they bound what a check could do; they are not a
held-out result. With `--check` the P(correct) are held out, but each cluster's threshold
is chosen on the queries it is scored on: a bound too, though one a real check could reach
only with that luck.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

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


# P(correct) thresholds a start on a smaller rung is replayed at (calibration's own grid, without
# 0, the rung alone, and 1, the rung skipped in effect).
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# A start pays in a cluster if it keeps this share of the strongest model's accuracy there.
KEEP = 0.98


# Another P(correct) model (`bench/check_levers.py`): given the training records, the fold's
# records, a model and the training records' cluster table, the fold's answers' P(correct).
Fitter = Callable[[Any, Sequence[int], Sequence[int], str, Any], dict[Any, float]]


def held_out_p(data: Any, ladder: list[str], folds: int = 5, seed: int = 0, votes: int = 1,
               fit: Fitter | None = None) -> dict[Any, float]:
    """Each recorded answer's P(correct) from deferral models fitted on the other folds, split
    and fitted as `cre calibrate` does (`calibrate.folds`, `deferral.train_deferral`), or by
    `fit` for each rung below the top."""
    from crecli import calibrate
    from crecli.deferral import _table_prior, deferral_p, train_deferral

    n = len(data.records)
    out: dict[Any, float] = {}
    for fold in calibrate.folds(n, folds, seed, data.prompt_ids):
        train = sorted(set(range(n)) - set(fold))
        table = calibrate._table(data, train, ladder)
        if fit is not None:
            for m in ladder[:-1]:
                out.update(fit(data, train, fold, m, table))
            continue
        rules = {m: train_deferral(data, train, table, m, votes) for m in ladder[:-1]}
        out.update(deferral_p(data, fold, rules, _table_prior(data, table), votes))
    return out


def grid(ladder: Sequence[str], m: str) -> list[dict[str, float]]:
    """A start on `m`'s thresholds: one t in `THRESHOLDS` for m and each later rung below the top."""
    return [{x: t for x in ladder[ladder.index(m):-1]} for t in THRESHOLDS]


def with_check(data: Any, router: Any, p: Mapping[Any, float],
               grids: Mapping[str, Sequence[Mapping[str, float]]] | None = None) -> list[dict[str, Any]]:
    """Per cluster that starts on the strongest model: for each smaller rung m and threshold,
    the replayed start on m (its answers and each later rung's below the top kept at
    P(correct) >= t, the rest sent up): m's accepted share and their accuracy, and the
    cascade's accuracy and cost as shares of the strongest model's on the same queries.
    `grids` (start model: threshold settings) replaces `grid`'s, and leaves out the starts
    it does not name."""
    ladder = list(router.ladder_names)
    top = ladder[-1]
    zeros = {m: 0.0 for m in ladder}
    members: dict[int, list[int]] = defaultdict(list)
    for i, cid in enumerate(data.clusters):
        if cid >= 0 and (info := router.cluster(cid)) is not None and info.model == top:
            members[cid].append(i)
    ids = [r.id for r in data.records]
    alone = data.replay.simulate({q: top for q in ids}, zeros, router.quality).traces
    rows: dict[int, dict[str, Any]] = {
        cid: {"cluster": cid, "size": len(idx), "strongest_accuracy": sum(alone[i].correct for i in idx) / len(idx),
              "strongest_cost": sum(alone[i].cost for i in idx) / len(idx), "starts": []}
        for cid, idx in members.items()}
    settings = grids if grids is not None else {m: grid(ladder, m) for m in ladder[:-1]}
    for m, owns in settings.items():
        for own in owns:
            traces = data.replay.simulate({q: m for q in ids}, zeros, router.quality, {q: own for q in ids},
                                          p_correct=p).traces
            for cid, idx in members.items():
                kept = [i for i in idx if len(traces[i].steps) == 1]
                row = rows[cid]
                acc = sum(traces[i].correct for i in idx) / len(idx)
                cost = sum(traces[i].cost for i in idx) / len(idx)
                row["starts"].append({
                    "model": m, "threshold": own[m], "thresholds": dict(own), "accepted_share": len(kept) / len(idx),
                    "accepted_accuracy": sum(traces[i].correct for i in kept) / len(kept) if kept else None,
                    "accuracy_share": acc / row["strongest_accuracy"] if row["strongest_accuracy"] else None,
                    "cost_share": cost / row["strongest_cost"] if row["strongest_cost"] else None})
    out = []
    for row in rows.values():
        keeps = [s for s in row["starts"] if s["accuracy_share"] is not None and s["accuracy_share"] >= KEEP
                 and s["cost_share"] is not None]
        row["best"] = min(keeps, key=lambda s: s["cost_share"], default=None)
        out.append(row)
    return sorted(out, key=lambda r: -r["size"])


def starts_cost(data: Any, router: Any) -> float:
    """What the router's starts cost on the clustered queries of `data`, each answered
    greedily by its cluster's model, priced as `with_check` prices (today's speeds)."""
    top = router.ladder_names[-1]
    zeros = {m: 0.0 for m in router.ladder_names}
    model_of = {c.id: c.model for c in router.clusters}
    traces = data.replay.simulate({r.id: model_of.get(c, top) for r, c in zip(data.records, data.clusters)}, zeros,
                                  router.quality).traces
    return sum(t.cost for t, c in zip(traces, data.clusters) if c in model_of)


def check_summary(rows: list[dict[str, Any]], start_cost: float) -> dict[str, Any]:
    """Clusters where the cheapest start that keeps `KEEP` of the strongest model's accuracy
    there costs less than the strongest model, and what those starts save as a share of
    what the router's starts cost on the log (`start_cost`, summed over its clusters)."""
    paying = [r for r in rows if r["best"] is not None and r["best"]["cost_share"] < 1.0]
    saved = sum(r["size"] * r["strongest_cost"] * (1.0 - r["best"]["cost_share"]) for r in paying)
    return {"clusters": len(paying), "queries": sum(r["size"] for r in paying),
            "saved_share_of_start_cost": saved / start_cost if start_cost else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", type=Path, default=ROOT / "src" / "crecli" / "routers" / "default.cre")
    parser.add_argument("--check", action="store_true",
                        help="also replay the real deferral check on the recorded answers (held-out P(correct))")
    parser.add_argument("--log", type=Path, help="the labelled log for --check (default: the router's fit log)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import calibrate, config, replay, routerfile

    settings = config.load()
    router = routerfile.load(args.router, settings)
    rows = clusters(router)
    top = router.ladder_names[-1]
    result = {"router": str(args.router), "unit": router.fit.cost_unit, "strongest": top,
              "summary": summary(rows, top), "clusters": rows}
    if args.check:
        data = replay.prepare(router, settings, calibrate.fitted_log(router, args.log))
        checked = with_check(data, router, held_out_p(data, router.ladder_names))
        start_cost = starts_cost(data, router)
        result["with_check"] = {"unit": data.costs.unit, "keep": KEEP, "summary": check_summary(checked, start_cost),
                                "clusters": checked}
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
    if args.check:
        w = result["with_check"]
        print(f"\nWith the deferral check (held-out P(correct)), the cheapest start keeping {KEEP:.0%} of {top}'s "
              "accuracy in each cluster on it:")
        for r in w["clusters"]:
            b = r["best"]
            print(f"{r['cluster']:>7} {r['size']:>5}  " + (
                f"{b['model'][:28]} at P >= {b['threshold']:.1f}: keeps {b['accepted_share']:.0%} "
                f"(right {b['accepted_accuracy'] or 0:.0%}), {b['accuracy_share']:.1%} of the accuracy at "
                f"{b['cost_share']:.1%} of the cost" if b and b["cost_share"] < 1.0 else
                f"no start that keeps it pays (the cheapest: {b['cost_share']:.1%} of the cost)" if b else
                "no start keeps it"))
        c = w["summary"]
        print(f"Such a start pays in {c['clusters']} clusters ({c['queries']} queries), saving at most "
              f"{100 * c['saved_share_of_start_cost']:.1f}% of what the router's starts cost on the log.")


if __name__ == "__main__":
    main()
