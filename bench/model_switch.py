"""Does the top model answer slower when smaller models share its process?

`cre batch` loads every rung of the ladder into one process and, within a chunk of lines,
runs each rung's prompts in one run of consecutive calls (batch.py), and `cre serve` answers
whatever rung each request needs. `bench/cost_vs_clock.py` found the 1.5B answering the same
prompts 0.96-1.20 times as long in the cascade's batch as in a batch of its own. This
separates what sharing a process could do from the machine's drift, on the same prompts, the
top rung (the ladder's last) timed alone in each arrangement:

  alone        only the top model is loaded;
  loaded       the smaller rungs are loaded too, and answer one prompt first, then idle;
  chunked      before each `--chunk` prompts, every smaller rung answers them, then the top
               model does: a few switches, as `cre batch` makes them;
  interleaved  every smaller rung answers each prompt just before the top model: a switch
               at every call, as a server whose requests land on different rungs could.

Each arrangement runs in a fresh process (`--child`), in rounds whose order turns round
every other round (alone, loaded, chunked, interleaved; then the reverse), so a machine that
slows steadily favours none. Prints each arrangement's median seconds of the top model's
calls and its ratio to `alone`. Every answer is greedy, and each run checks that the top
model decoded the same tokens. Run nothing else meanwhile:

    flock /tmp/cre-cpu.lock .venv/bin/python bench/model_switch.py [--n 60] [--chunk 20] [--rounds 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The same spread of the log's prompts as the bench beside it.
from models_at_once import prompts  # noqa: E402

MODES = ("alone", "loaded", "chunked", "interleaved")


def child(mode: str, texts: list[str], chunk: int, max_tokens: int) -> dict[str, Any]:
    """One arrangement in this process: the top model's seconds on `texts` and what it decoded."""
    from crecli import config
    from crecli.models.backend import GenParams
    from crecli.models.llama import LlamaBackend

    settings = config.load()
    specs = settings.ladder_specs()
    params = GenParams(max_tokens=max_tokens)
    top = LlamaBackend(specs[-1])
    small = [LlamaBackend(s) for s in specs[:-1]] if mode != "alone" else []
    for backend in (*small, top):  # each loaded model has answered once before the timing
        backend.generate("What is 2 plus 2?", params)
    seconds, tokens = 0.0, 0
    for i, text in enumerate(texts):
        if mode == "chunked" and i % chunk == 0:
            for backend in small:
                for other in texts[i:i + chunk]:
                    backend.generate(other, params)
        elif mode == "interleaved":
            for backend in small:
                backend.generate(text, params)
        start = time.perf_counter()
        out = top.generate(text, params)
        seconds += time.perf_counter() - start
        tokens += out.prompt_tokens + out.output_tokens
    return {"mode": mode, "seconds": seconds, "tokens": tokens, "model": specs[-1].name,
            "others": [s.name for s in specs[:-1]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog-large.jsonl")
    parser.add_argument("--n", type=int, default=60, help="prompts the top model answers per arrangement")
    parser.add_argument("--chunk", type=int, default=20, help="prompts per chunk in the chunked arrangement")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    texts = prompts(args.log, args.n)
    if args.child:
        print(json.dumps(child(args.child, texts, args.chunk, args.max_tokens)))
        return

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            print(f"round {r + 1}/{args.rounds}: {mode}...", file=sys.stderr, flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--log", str(args.log),
                   "--n", str(args.n), "--chunk", str(args.chunk), "--max-tokens", str(args.max_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    decoded = {run["tokens"] for done in runs.values() for run in done}
    if len(decoded) != 1:  # the arrangements must time the same work
        sys.exit(f"the top model decoded different token counts across arrangements: {sorted(decoded)}")
    medians = {m: statistics.median(run["seconds"] for run in runs[m]) for m in MODES}
    result = {"model": runs["alone"][0]["model"], "others": runs["loaded"][0]["others"], "prompts": args.n,
              "chunk": args.chunk, "rounds": args.rounds,
              "arrangements": {m: {"seconds": [round(run["seconds"], 3) for run in runs[m]],
                                   "median_seconds": medians[m], "vs_alone": medians[m] / medians["alone"]}
                               for m in MODES}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['model']} on {args.n} prompts, beside {', '.join(result['others'])} ({args.rounds} rounds):")
    for mode, row in result["arrangements"].items():
        print(f"  {mode:<12} median {row['median_seconds']:7.2f} s  x{row['vs_alone']:.3f}  "
              f"({', '.join(f'{s:.1f}' for s in row['seconds'])})")


if __name__ == "__main__":
    main()
