"""Does pricing the start a prompt shares with the one before it make prices fit the clock?

Reads the outcome store's recorded greedy answers of a log (running nothing that is
recorded; `collect` runs what is missing) and prices each one in bench-seconds twice: in
full, and with the tokens it shares at its start with the previous prompt of the log free
(`costs.TokenCounts.of_run` over the log's order as one run), as llama-cpp-python evaluated
them when `collect` recorded them one after another in that order. Per model and per task (the log's `meta.source`), it prints the
recorded seconds per priced second both ways, and their spread over tasks: a price that
fits the clock gives every kind of prompt the same ratio. The machine's drift over the
recording (minutes per model) is in every figure alike within a task, not between tasks.

    .venv/bin/python bench/reuse_by_task.py --log examples/querylog-large.jsonl [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=Path("examples/querylog-large.jsonl"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config, querylog
    from crecli.costs import CostModel, TokenCounts
    from crecli.outcomes import OutcomeStore, collect, default_store_path
    from crecli.quality import QualityCheck

    settings = config.load()
    ladder = list(settings.ladder)
    specs = [settings.get(m) for m in ladder]
    records = [r for r in querylog.read_log(args.log).records if r.reference is not None]
    with OutcomeStore(default_store_path()) as store:
        found = collect(records, settings, store, QualityCheck(k=1), models=ladder)
    # The recording's order: each model answered the log's queries one after another.
    with TokenCounts.for_specs(specs) as counts:
        reused = counts.of_run([r.id for r in records], [r.prompt for r in records], [0] * len(records), ladder,
                               chunk=None)
    full = CostModel.build(found.values(), specs, "bench-seconds")
    shared = CostModel.build(found.values(), specs, "bench-seconds", reused)
    out: dict[str, Any] = {"log": str(args.log), "n": len(records), "models": {}}
    for model in ladder:
        tasks: dict[str, list[float]] = {}
        for r in records:
            o = found.get((r.id, model))
            if o is None or o.source != "run" or not o.votes:
                continue
            task = str(r.meta.get("source", "")).split("/")[1] if "/" in str(r.meta.get("source", "")) else "?"
            row = tasks.setdefault(task, [0.0, 0.0, 0.0, 0.0])
            row[0] += o.votes[0].seconds
            row[1] += full.votes(o)[0]
            row[2] += shared.votes(o)[0]
            row[3] += 1
        per = {t: {"n": int(v[3]), "full": v[0] / v[1], "shared_free": v[0] / v[2]} for t, v in sorted(tasks.items())}

        def spread(key: str) -> dict[str, float]:
            xs = [p[key] for p in per.values()]
            return {"min": min(xs), "max": max(xs), "cv": statistics.pstdev(xs) / statistics.mean(xs)}

        out["models"][model] = {"tasks": per, "full": spread("full"), "shared_free": spread("shared_free"),
                                "reused_share": sum(n for (_, m), n in reused.items() if m == model)
                                / max(1, sum(o.prompt_tokens for (q, m), o in found.items() if m == model))}
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    for model, m in out["models"].items():
        f, s = m["full"], m["shared_free"]
        print(f"{model}: recorded s per priced s over {len(m['tasks'])} tasks: in full {f['min']:.3f}-{f['max']:.3f} "
              f"(cv {f['cv']:.3f}); shared starts free {s['min']:.3f}-{s['max']:.3f} (cv {s['cv']:.3f}); "
              f"{m['reused_share']:.1%} of prompt tokens shared")
        for task, p in m["tasks"].items():
            print(f"    {task:26s} n {p['n']:4d}  in full {p['full']:.3f}  shared free {p['shared_free']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
