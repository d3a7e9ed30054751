"""How long one replay of recorded votes over a log-sized run takes.

`cre fit`'s threshold tuning and `cre calibrate`'s sweep replay the log once per point of a
threshold grid (the sweep once per fold as well), so this time multiplies. Goal: under 0.5 s
a replay on a 2-core machine (a speed target lives here, not in the unit tests). The log is
synthetic, as tests/test_calibrate.py builds it: --queries queries (480, the size of the
example log) on a three-rung ladder, 5 recorded votes each with random answers and times.
One replay per threshold of 0.2, 0.4, ..., 1.0 (top rung 0), --repeats times; it prints the
median seconds per replay and whether the goal is met (exit status 1 when it is not). No
model runs.

    .venv/bin/python bench/replay_speed.py [--queries 480] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

GOAL_SECONDS = 0.5
THRESHOLDS = (0.2, 0.4, 0.6, 0.8, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli.outcomes import Outcome, Vote
    from crecli.quality import QualityCheck
    from crecli.querylog import Record
    from crecli.replay import Replay

    rng = random.Random(0)
    ladder = ["s", "m", "l"]
    records = [Record(id=f"q{i}", prompt=f"prompt q{i}", reference=[str(i % 3)], match="numeric") for i in range(args.queries)]
    outcomes = {
        (r.id, m): Outcome(r.id, "sha", m, "m", "key", "run", 10,
                           [Vote(str(rng.randrange(3)), 1, rng.random()) for _ in range(5)])
        for r in records for m in ladder
    }
    start = time.perf_counter()
    replay = Replay.build(outcomes, records, ladder)
    build_seconds = time.perf_counter() - start
    starts = {r.id: rng.choice(ladder) for r in records}
    quality = QualityCheck(k=5)
    per_replay = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for t in THRESHOLDS:
            result = replay.simulate(starts, {"s": t, "m": t, "l": 0.0}, quality)
            assert len(result.traces) == args.queries
        per_replay.append((time.perf_counter() - start) / len(THRESHOLDS))
    seconds = statistics.median(per_replay)
    report = {"queries": args.queries, "build_seconds": round(build_seconds, 4),
              "seconds_per_replay": round(seconds, 4), "goal_seconds": GOAL_SECONDS, "met": seconds < GOAL_SECONDS}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.queries} queries: build {build_seconds:.3f} s, one replay {seconds:.3f} s "
              f"(median of {args.repeats}; goal < {GOAL_SECONDS} s: {'met' if report['met'] else 'NOT met'})")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
