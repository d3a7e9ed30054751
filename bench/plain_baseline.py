"""What a user runs without `cre`: one model on a plain prompt, its own chat template.

Issue 24's first reference: the strongest model answering every query of a labelled log
through llama-cpp-python's `create_chat_completion`, with the model's own chat template, no
system turn and no answered examples from `cre`, greedily, each answer capped at its answer
type's tokens (`grading.max_tokens_for`, as `cre` caps its own). Each answer is graded as
`cre` grades (`grading.grade`) and priced in bench-seconds at this machine's `cre models
bench` speeds, leaving out the tokens every prompt shares (the template's head), as `cre`'s
own costs do. Per query and in all, as JSON: `bench/against_plain.py` reports the
cascade against it.

Run it alone (it loads a real model; about an hour for the 1,400-query log on 2 cores):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/plain_baseline.py --log examples/querylog-large.jsonl \\
        --out bench/results/plain-1400.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBES = ("What is 2 plus 2?", "(A) yes (B) no")  # as `models.prompting.HEAD_PROBES`


def chat_tokens(llm: Any, prompt: str) -> list[int]:
    """The tokens `create_chat_completion` feeds the model for one user message: the GGUF's
    own chat template (llama-cpp-python's Jinja2 formatter, as its default chat handler)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog-large.jsonl")
    parser.add_argument("--model", default=None, help="default: the ladder's strongest model")
    parser.add_argument("--limit", type=int, help="only the first N queries")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from llama_cpp import Llama

    from crecli import config, grading, querylog
    from crecli.costs import token_cost
    from crecli.models import bench
    from crecli.models.pull import require_file
    from crecli.models.runtime import default_threads, model_params, quiet_stderr, use_extra_bufts
    from crecli.models.tokens import shared_prefix

    settings = config.load()
    name = args.model or settings.ladder[-1]
    spec = settings.get(name)
    speed = bench.speeds([spec]).get(name)
    if speed is None:
        sys.exit(f"no speed for {name}: run `cre models bench {name}` first")
    records = [r for r in querylog.LogOptions().read(args.log).records if r.reference is not None]
    if args.limit:
        records = records[: args.limit]
    with quiet_stderr(), model_params(use_extra_bufts()):
        llm = Llama(model_path=str(require_file(spec)), n_ctx=spec.context, n_threads=default_threads(),
                    n_threads_batch=default_threads(), verbose=False)
    head = len(shared_prefix([chat_tokens(llm, p) for p in PROBES]))
    rows = []
    start = time.perf_counter()
    for i, r in enumerate(records, start=1):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": r.prompt}], temperature=0.0, top_k=1,
            max_tokens=grading.max_tokens_for(r.match), seed=0,
        )
        seconds = time.perf_counter() - t0
        text = out["choices"][0]["message"]["content"] or ""
        usage = out.get("usage", {})
        pt, ot = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        cost = token_cost("bench-seconds", max(0, pt - head), ot, None, speed)
        rows.append({"id": r.id, "answer": text, "correct": grading.grade(text, r.reference, r.match or "exact"),
                     "prompt_tokens": pt, "output_tokens": ot, "seconds": seconds, "cost": cost})
        if i % 50 == 0:
            print(f"{i}/{len(records)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    llm.close()
    n = len(rows)
    summary = {
        "model": name, "log": str(args.log), "n": n, "unit": "bench-seconds", "speed": list(speed), "head_tokens": head,
        "accuracy": sum(x["correct"] for x in rows) / n, "mean_cost": sum(x["cost"] for x in rows) / n,
        "mean_output_tokens": sum(x["output_tokens"] for x in rows) / n, "seconds": time.perf_counter() - start,
        "threads": default_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
