"""What a one-off `cre ask` spends around its model time, part by part.

Goal (issue 21): at most 1.5 s beyond the model's own generation time on a 2-core machine.
Each figure is the median of --repeats runs, measured side by side in one run:

  interpreter     `python -c pass`
  cli import      `python -c "import crecli.cli"` (what shell completion pays on every Tab)
  answer imports  `python -c "import numpy, llama_cpp, crecli.escalate, crecli.routerfile,
                  crecli.config"`: a fresh process's whole wall time, the interpreter's
                  start included
  router load     `routerfile.load` of the router, in a warm process
  routing         `route` of the prompt, first call in a process (embedder warm-up included)
  model load      `LlamaBackend.llm` of each model the prompt's trace used, in a warm process
  whole ask       `cre ask PROMPT --router R --json --no-log` wall time, and the model time
                  its trace reports (sum of the steps' seconds): the overhead is the median
                  of each run's difference, not the difference of the two medians

Run it alone (it loads real models):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/ask_overhead.py [--router R] [--prompt P] [--repeats 5] [--json]

Without --router it uses the router `cre ask` would use (yours, else the shipped default).
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
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def wall(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - start, done.stdout


def median(times: Callable[[], float], repeats: int) -> float:
    return statistics.median(times() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", type=Path, help="router file (default: the one cre ask would use)")
    parser.add_argument("--prompt", default="What is 12 plus 30?")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config, paths, routerfile
    from crecli.models.llama import LlamaBackend
    from crecli.route import route

    router_path = args.router or paths.router_in_use(None)[0]
    py = sys.executable
    cre = [py, "-m", "crecli"]
    figures: dict[str, Any] = {"router": str(router_path), "prompt": args.prompt, "repeats": args.repeats}

    figures["interpreter_s"] = median(lambda: wall([py, "-c", "pass"])[0], args.repeats)
    figures["cli_import_s"] = median(lambda: wall([py, "-c", "import crecli.cli"])[0], args.repeats)
    answer_imports = "import numpy, llama_cpp, crecli.escalate, crecli.routerfile, crecli.config"
    figures["answer_imports_s"] = median(lambda: wall([py, "-c", answer_imports])[0], args.repeats)

    settings = config.load()
    router = routerfile.load(router_path, settings)

    def load() -> float:
        start = time.perf_counter()
        routerfile.load(router_path, settings)
        return time.perf_counter() - start

    figures["router_load_s"] = median(load, args.repeats)
    figures["router_bytes"] = router_path.stat().st_size
    routing = [f"import time; from pathlib import Path; from crecli import config, routerfile; from crecli.route import route; "
               f"r = routerfile.load(Path({str(router_path)!r}), config.load()); t = time.perf_counter(); "
               f"route(r, {args.prompt!r}); print(time.perf_counter() - t)"]
    figures["routing_first_s"] = median(lambda: float(wall([py, "-c", routing[0]])[1]), args.repeats)
    start = time.perf_counter()
    route(router, args.prompt)
    figures["routing_warm_s"] = time.perf_counter() - start

    env = dict(os.environ)
    asks = []
    for _ in range(args.repeats):
        seconds, out = wall([*cre, "ask", args.prompt, "--router", str(router_path), "--json", "--no-log"], env)
        trace = json.loads(out)
        asks.append((seconds, sum(step["seconds"] for step in trace["steps"]), [s["model"] for s in trace["steps"]]))
    figures["ask_wall_s"] = statistics.median(a[0] for a in asks)
    figures["ask_model_s"] = statistics.median(a[1] for a in asks)
    figures["ask_overhead_s"] = statistics.median(a[0] - a[1] for a in asks)
    used = asks[0][2]
    loads = {}
    for name in dict.fromkeys(used):
        def model_load(name: str = name) -> float:
            backend = LlamaBackend(settings.get(name))
            start = time.perf_counter()
            backend.llm
            took = time.perf_counter() - start
            backend.close()
            return took

        loads[name] = median(model_load, args.repeats)
    figures["model_load_s"] = loads
    figures["models"] = used

    if args.json:
        print(json.dumps(figures, indent=1))
        return
    print(f"router {router_path} ({figures['router_bytes'] / 1e6:.2f} MB); prompt {args.prompt!r} answered by {' -> '.join(used)}")
    for key in ("interpreter_s", "cli_import_s", "answer_imports_s", "router_load_s", "routing_first_s", "routing_warm_s"):
        print(f"  {key[:-2].replace('_', ' '):18} {figures[key] * 1000:8.0f} ms")
    for name, took in loads.items():
        print(f"  model load {name:30} {took * 1000:6.0f} ms")
    print(f"  whole ask          {figures['ask_wall_s'] * 1000:8.0f} ms, of which model time {figures['ask_model_s'] * 1000:.0f} ms: "
          f"overhead {figures['ask_overhead_s'] * 1000:.0f} ms (goal: at most 1500 ms)")


if __name__ == "__main__":
    main()
