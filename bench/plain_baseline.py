"""What a user runs without `cre`: one model on a plain prompt, its own chat template.

Issue 24's first reference: the strongest model answering every query of a labelled log
through llama-cpp-python's `create_chat_completion`, with the model's own chat template, no
system turn and no answered examples from `cre`, greedily, each answer capped at its answer
type's tokens (`grading.max_tokens_for`, as `cre` caps its own). Each answer is graded as
`cre` grades (`grading.grade`) and priced in bench-seconds at this machine's `cre models
bench` speeds, leaving out the tokens every prompt shares (the template's head) and the
tokens each prompt shares at its start with the one before it in the log
(`costs.TokenCounts`: llama-cpp-python keeps its last prompt, and this loop answers the log
in its order), as
`cre`'s own costs do. Per query and in all, as JSON: `bench/against_plain.py` reports the
cascade against it.

Run it alone (it loads a real model; about 20 minutes for the 1,400-query log on 2 cores):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/plain_baseline.py --log examples/querylog-large.jsonl \\
        --out bench/results/plain-1400.json [--speeds bench/results/speeds.json]

Costs compare only at the same speeds: --speeds prices with a kept bench.json (the one that
priced the headline) instead of this machine's current one. --reprice OLD.json re-prices an
earlier run's token counts at those speeds (with its --log) and runs no model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crecli.models.bench import Rates

ROOT = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--speeds", type=Path, help="a bench.json to price with (default: this machine's)")
    parser.add_argument("--reprice", type=Path, help="an earlier --out to re-price at --speeds; runs no model")
    args = parser.parse_args()
    if args.reprice:
        reprice(args)
        return

    from llama_cpp import Llama

    from crecli import config, grading, querylog
    from crecli.models.pull import require_file
    from crecli.models.runtime import default_threads, loading, model_params, use_extra_bufts
    from crecli.models.tokens import shared_prefix
    from crecli.models.prompting import HEAD_PROBES

    settings = config.load()
    name = args.model or settings.ladder[-1]
    spec = settings.get(name)
    speed = model_speed(spec, args.speeds)
    records = [r for r in querylog.LogOptions().read(args.log).records if r.reference is not None]
    if args.limit:
        records = records[: args.limit]
    # As `cre` loads a model: llama.cpp's log routed, the extra buffer types as `cre` sets them.
    with loading() as verbose, model_params(use_extra_bufts()):
        llm = Llama(model_path=str(require_file(spec)), n_ctx=spec.context, n_threads=default_threads(),
                    n_threads_batch=default_threads(), verbose=verbose)
    head = len(shared_prefix([chat_tokens(llm, p) for p in HEAD_PROBES]))
    reused = shared_tokens(spec, records)
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
        cost = price(pt, ot, head, speed, reused.get(r.id, 0))
        rows.append({"id": r.id, "answer": text, "correct": grading.grade(text, r.reference, r.match or "exact"),
                     "prompt_tokens": pt, "output_tokens": ot, "reused_tokens": reused.get(r.id, 0),
                     "seconds": seconds, "cost": cost})
        if i % 50 == 0:
            print(f"{i}/{len(records)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    llm.close()
    n = len(rows)
    summary = {
        "model": name, "log": str(args.log), "n": n, "unit": "bench-seconds", "speed": speed._asdict(), "head_tokens": head,
        "seconds": time.perf_counter() - start,
        "threads": default_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    write(args.out, summary, rows)


def model_speed(spec: Any, file: Path | None) -> "Rates":
    from crecli.models import bench

    speed = bench.speeds([spec], file).get(spec.name)
    if speed is None:
        where = file or "this machine's bench.json"
        sys.exit(f"no speed for {spec.name} in {where}: run `cre models bench {spec.name}` first")
    return speed


def shared_tokens(spec: Any, records: Any) -> dict[str, int]:
    """Per query id, the tokens its prompt shares at its start with the previous query's in
    the log (`costs.TokenCounts.of_run` over the whole log as one run)."""
    from crecli.costs import TokenCounts

    with TokenCounts.for_specs([spec]) as counts:
        found = counts.of_run([r.id for r in records], [r.prompt for r in records], [0] * len(records), [spec.name],
                              chunk=None)
    return {qid: n for (qid, _), n in found.items()}


def price(prompt_tokens: int, output_tokens: int, head: int, speed: "Rates", reused_tokens: int = 0) -> float:
    """One answer in bench-seconds, the template's shared head and the prompt's shared start
    left out: `Pricing.price_votes`, the rule cre prices its own answers with."""
    from crecli.costs import Pricing

    votes = Pricing("bench-seconds", {}, {"plain": speed}, {"plain": head}).price_votes(
        "plain", prompt_tokens, [output_tokens], [0.0], 0, reused_tokens)
    assert votes is not None  # a bench-seconds Pricing with the model's speed always prices it
    return votes[0]


def write(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The per-query rows and the summary (accuracy, mean cost and output) computed from them."""
    n = len(rows)
    summary = {**summary, "accuracy": sum(x["correct"] for x in rows) / n, "mean_cost": sum(x["cost"] for x in rows) / n,
               "mean_output_tokens": sum(x["output_tokens"] for x in rows) / n}
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


def reprice(args: argparse.Namespace) -> None:
    """An earlier run's answers, priced again from their token counts at --speeds, each
    prompt's shared start (with the previous query's of --log) counted afresh."""
    from crecli import config, querylog

    old = json.loads(args.reprice.read_text())
    summary = old["summary"]
    spec = config.load().get(summary["model"])
    speed = model_speed(spec, args.speeds)
    records = [r for r in querylog.LogOptions().read(args.log).records if r.reference is not None]
    if [r.id for r in records[:len(old["rows"])]] != [r["id"] for r in old["rows"]]:
        sys.exit(f"{args.reprice}: its queries are not the first of {args.log} in order; give the log it answered")
    reused = shared_tokens(spec, records[:len(old["rows"])])
    rows = [{**r, "reused_tokens": reused.get(r["id"], 0),
             "cost": price(r["prompt_tokens"], r["output_tokens"], summary["head_tokens"], speed, reused.get(r["id"], 0))}
            for r in old["rows"]]
    write(args.out, {**summary, "speed": speed._asdict(), "speeds_file": str(args.speeds) if args.speeds else None}, rows)


if __name__ == "__main__":
    main()
