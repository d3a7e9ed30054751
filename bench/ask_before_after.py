"""`cre ask` of two checkouts, interleaved run by run: the wall time less the model's time.

Each arm is a PYTHONPATH (a checkout's src/, optionally with another typer first on the
path). Each of --runs rounds runs the before arm, then the after arm, always in that order,
so a slow drift of the machine hits both alike (an effect of going first is not balanced).
Each arm's overhead is the median of its runs' wall less model time. Used for issue 21's
before/after of the typer cap and the dropped warm-up decode:

    git worktree add /tmp/before 61a8716
    pip install --target /tmp/typer29 --no-deps typer==0.29.2
    flock /tmp/cre-cpu.lock .venv/bin/python bench/ask_before_after.py \
        --before /tmp/typer29:/tmp/before/src --after src --runs 11 --json > bench/results/ask-before-after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="PYTHONPATH of the first arm")
    parser.add_argument("--after", required=True, help="PYTHONPATH of the second arm")
    parser.add_argument("--router", type=Path, default=ROOT / "src" / "crecli" / "routers" / "default.cre")
    parser.add_argument("--prompt", default="What is 12 plus 30?")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    arms = {"before": args.before, "after": args.after}
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in arms}
    for _ in range(args.runs):
        for name, path in arms.items():
            env = {**os.environ, "PYTHONPATH": path}
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "crecli", "ask", args.prompt, "--router", str(args.router),
                                   "--json", "--no-log"], capture_output=True, text=True, env=env, check=True)
            wall = time.perf_counter() - start
            out[name].append((wall, sum(s["seconds"] for s in json.loads(done.stdout)["steps"])))
    res = {k: {"wall_s": statistics.median(w for w, _ in v), "model_s": statistics.median(m for _, m in v),
               "overhead_s": statistics.median(w - m for w, m in v), "overheads_s": [round(w - m, 3) for w, m in v]}
           for k, v in out.items()}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for k, r in res.items():
        print(f"{k:7} wall {r['wall_s']:.3f} s, model {r['model_s']:.3f} s, overhead {r['overhead_s']:.3f} s (median of {args.runs})")


if __name__ == "__main__":
    main()
