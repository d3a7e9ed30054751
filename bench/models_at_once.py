"""Two in-process models answering at once, against the same answers one after the other.

`cre serve` lets different loaded models compute at once (`ModelPool.lease` gates each
model, not the CPU), and every model runs `CRE_THREADS` threads (default: every core).
llama.cpp's threads spin while they wait, so two models computing at once on the same
cores may slow each other far more than sharing would explain. This measures it on two
ladder models (by default the two smallest), in one run, rounds alternating the order:

  one after another   model A answers its prompts, then model B answers its prompts,
                      on one thread;
  at once             A and B answer the same prompts on two threads at the same time.

It prints each arrangement's wall time (median over rounds) and their ratio: at once / one
after another. Near 1.0, computing at once costs nothing in throughput (and the small
model's answers come sooner); well above 1.0, the cores are oversubscribed. Every answer is
greedy, so the two arrangements decode the same tokens. Run nothing else meanwhile.

    flock /tmp/cre-cpu.lock .venv/bin/python bench/models_at_once.py [--n 12] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prompts(log: Path, n: int) -> list[str]:
    """`n` prompts spread over the log."""
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    step = max(1, len(rows) // n)
    return [str(r["prompt"]) for r in rows[::step][:n]]


def answer_all(backend: Any, texts: list[str], params: Any, seconds: list[float]) -> None:
    for text in texts:
        start = time.perf_counter()
        backend.generate(text, params)
        seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog.jsonl")
    parser.add_argument("--models", nargs=2, metavar=("A", "B"), help="two ladder models (default: the two smallest)")
    parser.add_argument("--n", type=int, default=12, help="prompts each model answers per arrangement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config
    from crecli.models.backend import GenParams
    from crecli.models.registry import backend_for
    from crecli.models.runtime import default_threads

    settings = config.load()
    names = args.models or [m for m in settings.ladder if settings.get(m).backend == "llama"][:2]
    if len(names) != 2:
        sys.exit("need two in-process ladder models (--models A B)")
    backends = [backend_for(settings.get(n)) for n in names]
    texts = prompts(args.log, args.n)
    params = GenParams(max_tokens=args.max_tokens, temperature=0.0)
    for b in backends:  # loaded and warm before any timing
        b.generate(texts[0], params)

    def serial() -> tuple[float, list[list[float]]]:
        seconds: list[list[float]] = [[], []]
        start = time.perf_counter()
        for b, s in zip(backends, seconds):
            answer_all(b, texts, params, s)
        return time.perf_counter() - start, seconds

    def at_once() -> tuple[float, list[list[float]]]:
        seconds: list[list[float]] = [[], []]
        threads = [threading.Thread(target=answer_all, args=(b, texts, params, s)) for b, s in zip(backends, seconds)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, seconds

    arms = {"one after another": serial, "at once": at_once}
    walls: dict[str, list[float]] = {k: [] for k in arms}
    latency: dict[str, list[list[float]]] = {k: [[], []] for k in arms}
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            print(f"round {r + 1}/{args.rounds}: {name}...", file=sys.stderr, flush=True)
            wall, seconds = arms[name]()
            walls[name].append(wall)
            for i in (0, 1):
                latency[name][i] += seconds[i]
    for b in backends:
        b.close()

    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "models": names, "threads": default_threads(), "prompts": len(texts), "max_tokens": args.max_tokens,
        "rounds": args.rounds, "walls": walls, "median_wall": med,
        "ratio_at_once_over_serial": med["at once"] / med["one after another"],
        "median_answer_seconds": {k: {names[i]: statistics.median(latency[k][i]) for i in (0, 1)} for k in arms},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{names[0]} and {names[1]}, {len(texts)} prompts each, {default_threads()} threads a model, "
          f"{args.rounds} rounds")
    for k in arms:
        per = ", ".join(f"{n} {result['median_answer_seconds'][k][n]:.2f} s" for n in names)
        print(f"  {k:18} wall {med[k]:6.1f} s (median); median answer: {per}")
    print(f"  at once / one after another: {result['ratio_at_once_over_serial']:.2f}")


if __name__ == "__main__":
    main()
