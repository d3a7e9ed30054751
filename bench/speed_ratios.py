#!/usr/bin/env python3
"""How steady are the ladder's speed ratios from one `cre models bench` to the next?

Costs compare models, so what calibration needs from the bench is the ratio of each
model's cost to the top rung's, and that it comes out the same when measured again. This
bench measures the ladder several times, alternating two orders in one run:

- one model after another (each model's rounds back to back, as `cre models bench` did
  until 2026-11-30);
- interleaved rounds (`bench.measure_all`: every model once per round, what it does now).

Each measurement prices a typical query (PROMPT new prompt tokens after the cached head
and OUTPUT generated tokens, the 1,400-query log's means) on every rung, as a share of the
top rung's price; per order it prints each run's shares and their spread across runs
((max - min) / median). Nothing else may run meanwhile: llama.cpp's threads spin.

    .venv/bin/python bench/speed_ratios.py                 # 3 runs of each order
    .venv/bin/python bench/speed_ratios.py --runs 4 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from crecli import config
from crecli.costs import token_cost
from crecli.models import bench

# The 1,400-query log's mean new prompt tokens after the cached head, and mean output tokens.
PROMPT = 42
OUTPUT = 3


def shares(speeds: list[bench.Speed]) -> list[float]:
    """Each model's cost of a typical query as a share of the last (top) model's."""
    cost = [token_cost("bench-seconds", PROMPT, OUTPUT, speed=s.rates) or 0.0 for s in speeds]
    return [c / cost[-1] for c in cost]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="measurements of each order, alternating")
    ap.add_argument("--repeats", type=int, default=bench.REPEATS, help="rounds per measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    settings = config.load()
    specs = [settings.get(m) for m in settings.ladder if settings.get(m).backend == "llama"]
    orders = {
        "one model after another": lambda: [bench.measure(s, repeats=args.repeats) for s in specs],
        "interleaved rounds": lambda: bench.measure_all(specs, repeats=args.repeats),
    }
    seen: dict[str, list[list[float]]] = {name: [] for name in orders}
    for run in range(args.runs):
        for name, measure in orders.items():
            print(f"run {run + 1}/{args.runs}: {name}...", file=sys.stderr, flush=True)
            seen[name].append(shares(measure()))
    names = [s.name for s in specs]
    result = {
        name: {"shares": runs, "spread": {m: bench.spread([r[j] for r in runs]) for j, m in enumerate(names)}}
        for name, runs in seen.items()
    }
    if args.json:
        print(json.dumps({"models": names, "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "orders": result}, indent=2))
        return
    print(f"cost of a typical query ({PROMPT} prompt tokens after the head, {OUTPUT} generated) "
          f"as a share of {names[-1]}'s, per run; spread = (max - min) / median across runs")
    for name, row in result.items():
        print(f"\n{name}:")
        for j, m in enumerate(names[:-1]):
            values = ", ".join(f"{r[j]:.3f}" for r in row["shares"])
            print(f"  {m:32} {values}   spread {row['spread'][m]:.0%}")


if __name__ == "__main__":
    main()
