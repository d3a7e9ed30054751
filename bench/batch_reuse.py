"""How many prompt tokens a model evaluated in `cre batch` runs, after llama.cpp's prefix reuse.

llama-cpp-python keeps a model's last prompt in its KV cache and evaluates only what a new
prompt does not share with it, so what a batch pays for prompts depends on their order.
Prices leave out only the head every prompt of a model shares (`cre models bench`'s
`head_tokens`). This rebuilds the order in which `cre batch` gave `--model` its prompts,
from each run's output lines (chunks of `batch.CHUNK_LINES` lines, each chunk's prompts on a
rung taken by cluster, as `batch.run_batch` does; `--parallel 1`), counts each prompt's
tokens with the model's own tokenizer and prompt format (answered examples from `--router`,
where it shows them), and prints, per run, the tokens evaluated after reuse, over all its
prompts and over the prompts every run gave the model. Tokenizing only: no model runs.

    .venv/bin/python bench/batch_reuse.py --log test.jsonl [--router router.cre] [--model NAME] cascade.jsonl alone.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence


def model_order(rows: Sequence[dict[str, Any]], model: str, chunk: int) -> list[dict[str, Any]]:
    """The output lines whose trace has a step on `model`, in the order `cre batch` ran them:
    chunk by chunk, each chunk's by cluster (`batch.by_cluster`, the batch's own rule)."""
    from crecli.batch import by_cluster

    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), chunk):
        here = [r for r in rows[start:start + chunk] if any(s["model"] == model for s in r.get("trace", {}).get("steps", []))]
        out += by_cluster(here, lambda r: r["trace"]["cluster"])
    return out


def evaluated(sequence: Sequence[tuple[str, Sequence[int]]]) -> dict[str, int]:
    """Per prompt id, the tokens evaluated after what it shares with the prompt before it."""
    from crecli.models.tokens import shared_prefix

    out: dict[str, int] = {}
    previous: Sequence[int] | None = None
    for key, tokens in sequence:
        out[key] = len(tokens) - (len(shared_prefix([previous, tokens])) if previous is not None else 0)
        previous = tokens
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`cre batch` output files")
    parser.add_argument("--log", type=Path, required=True, help="the log the runs answered (for the prompts)")
    parser.add_argument("--router", type=Path, help="the router whose answered examples the prompts were shown")
    parser.add_argument("--model", help="default: the ladder's strongest model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config, querylog, routerfile
    from crecli.batch import CHUNK_LINES
    from crecli.models.backend import GenParams
    from crecli.models.registry import backend_for
    from crecli.models.tokens import prompt_tokens

    settings = config.load()
    model = args.model or settings.ladder[-1]
    router = routerfile.load(args.router) if args.router else None
    backend: Any = backend_for(settings.get(model))
    prompts = {r.id: r.prompt for r in querylog.read_log(args.log).records}
    counted: dict[tuple[str, int], list[int]] = {}

    def tokens(row: dict[str, Any]) -> list[int]:
        key = (row["id"], row["trace"]["cluster"])
        if key not in counted:
            shots = router.shots(key[1], model) if router is not None else ()
            rendered = backend.prepare(prompts[row["id"]], GenParams(shots=shots))[0]
            counted[key] = prompt_tokens(backend._tokenizer(), rendered)
        return counted[key]

    per_run = []
    for path in args.runs:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # Every output line, error lines too: they took their place in cre batch's chunks.
        order = model_order(rows, model, CHUNK_LINES)
        per_run.append((path, evaluated([(r["id"], tokens(r)) for r in order])))
    common = set.intersection(*(set(ev) for _, ev in per_run))
    result = {"model": model, "common_prompts": len(common), "runs": [
        {"run": str(path), "prompts": len(ev), "evaluated": sum(ev.values()),
         "evaluated_common": sum(ev[i] for i in common),
         "mean_evaluated_common": statistics.mean(ev[i] for i in common) if common else None}
        for path, ev in per_run]}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{model}: prompt tokens evaluated after prefix reuse ({len(common)} prompts in every run)")
    for row in result["runs"]:
        mean = row["mean_evaluated_common"]
        print(f"  {row['run']}: {row['evaluated']} over its {row['prompts']} prompts; {row['evaluated_common']} over the common ones"
              + (f" ({mean:.1f} a prompt)" if mean is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
