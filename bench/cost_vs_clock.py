"""Does the saving `cre` reports match the clock?

Issue 24's goal 3: take the same prompts answered by a router and by a router whose ladder is
the strongest model alone; the ratio of their wall times, `cre batch`'s reported cost ratio
and `cre eval`'s cost share should agree within 3 points. This prints all three from one run:

1. splits a labelled log with a seed: `--test` queries to answer, the rest to fit on;
2. fits and calibrates a router on the rest (`cre fit`, `cre calibrate`: the defaults), and
   a router whose ladder is the strongest model alone (a models.toml with that ladder);
3. answers the test queries with `cre batch` through each, interleaved, the order turned
   round every other round (cascade, strongest; strongest, cascade; ...: `--rounds`), so a
   machine that slows or speeds up steadily through the run favours neither; timing each
   whole command;
4. replays the cascade on the same queries with `cre eval` for its cost share;
5. splits each batch's time by model from its output lines (`trace.steps`): the seconds each
   model's steps took against their bench-seconds price, and the wall time outside every
   step (loading models, routing, start-up). Where the first ratio differs between models,
   the stored speeds misprice one model against another; the rest is the clock's drift;
6. measures that drift on identical work: the strongest model answers the same prompts
   (same token counts) in both batches of a round, so the ratio of those steps' seconds is
   how much slower the machine ran the cascade's batch than the other (`same_work`). Each
   round's wall ratio divided by it is the wall ratio at one machine speed ("drift-corrected");
7. splits each round's wall ratio into the ratio of the models' steps and the points the
   time outside them adds (`split_wall`): a fixed cost per batch, which no per-answer price
   carries, against a price that runs ahead of or behind the clock.

The wall times include loading the models and routing, as a user's batch does. Outcomes
the store lacks for the fit part are collected first (that runs models, once).
Run it alone (it runs real models):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/cost_vs_clock.py [--log examples/querylog-large.jsonl] [--fresh-bench]
        [--test 200] [--rounds 4] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# The environment every `cre` runs with: os.environ, or with --fresh-bench a copy of CRE_HOME
# whose speeds were measured at the start of this run.
ENV: dict[str, str] | None = None


def home_copy(work: Path) -> dict[str, str]:
    """A copy of this CRE_HOME's outcome store and bench.json under `work`, and the
    environment that points `cre` at it (the models stay where they are): a run can measure
    and price speeds there without touching the user's."""
    import os
    import shutil

    from crecli import paths

    home = work / "home"
    (home / "data").mkdir(parents=True)
    for name in ("outcomes.sqlite", "bench.json"):
        if (paths.data_dir() / name).exists():
            shutil.copy(paths.data_dir() / name, home / "data" / name)
    return {**os.environ, "CRE_HOME": str(home), "CRE_MODELS_DIR": str(paths.models_dir())}


def cre(*args: str, stdin: Path | None = None, stdout: Path | None = None,
        env: dict[str, str] | None = None) -> tuple[float, str, str]:
    """Run `cre ARGS` (in `env`, else ENV); (wall seconds, stdout, stderr). Exits with the
    command's message on failure."""
    cmd = [sys.executable, "-m", "crecli", *args]
    print("$ cre " + " ".join(args), file=sys.stderr)
    start = time.perf_counter()
    with open(stdin, "rb") if stdin else open("/dev/null", "rb") as fin, \
            (open(stdout, "w") if stdout else tempfile.TemporaryFile("w+")) as fout:
        proc = subprocess.run(cmd, stdin=fin, stdout=fout, stderr=subprocess.PIPE, text=True, env=env or ENV)
        took = time.perf_counter() - start
        out = ""
        if stdout is None:
            fout.seek(0)
            out = fout.read()
    if proc.returncode not in (0, 3):
        sys.exit(f"cre {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took, out, proc.stderr


def batch_summary(stderr: str) -> dict[str, Any]:
    """The JSON summary `cre batch --json-summary` writes as its last stderr line."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("cre batch wrote no JSON summary")


def by_model(outputs: Path, pricing: Any, prompts: list[str], counts: Any) -> dict[str, dict[str, float]]:
    """Per model, over every step of `cre batch`'s output lines: steps, the seconds they took
    and their price as the batch's summary prices them (`Pricing.price_votes`, each prompt's
    start shared with the previous prompt of its cluster in its chunk free:
    `costs.previous_prompts`, `costs.TokenCounts` `counts`; `prompts`: the input's lines).
    The logs here carry no answered examples, so there is no prefix to share."""
    from crecli.costs import CHUNK_LINES, previous_prompts

    rows = [row for row in map(json.loads, outputs.read_text().splitlines()) if "trace" in row]
    asked = [prompts[row["line"] - 1] for row in rows]
    before = previous_prompts(asked, [row["trace"]["cluster"] for row in rows], CHUNK_LINES, [row["line"] for row in rows])
    out: dict[str, dict[str, float]] = {}
    for row, prompt, previous in zip(rows, asked, before):
        for step in row["trace"]["steps"]:
            reused = counts.shared(step["model"], previous, prompt) if pricing.reuses else 0
            priced = pricing.price_votes(step["model"], step["prompt_tokens"], [step["output_tokens"]], [0.0], 0, reused)
            stats = out.setdefault(step["model"], {"steps": 0, "seconds": 0.0, "priced": 0.0})
            stats["steps"] += 1
            stats["seconds"] += step["seconds"]
            stats["priced"] += priced[0] if priced else 0.0
    for row in out.values():
        row["seconds_per_priced"] = row["seconds"] / row["priced"] if row["priced"] else float("nan")
    return out


def steps_by_id(outputs: Path, model: str) -> dict[str, dict[str, Any]]:
    """`model`'s step of each answered line of `cre batch`'s output, by the line's id."""
    out: dict[str, dict[str, Any]] = {}
    for line in outputs.read_text().splitlines():
        record = json.loads(line)
        for step in record.get("trace", {}).get("steps", []):
            if step["model"] == model:
                out[record["id"]] = step
    return out


def same_work(cascade: dict[str, dict[str, Any]], strongest: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The machine's drift between two batches, on identical work: the seconds the strongest
    model's steps took in the cascade's batch over those it took in the other, summed over
    the prompts it answered in both with the same token counts (the same computation)."""
    same = [i for i, step in cascade.items() if i in strongest
            and (step["prompt_tokens"], step["output_tokens"]) == (strongest[i]["prompt_tokens"], strongest[i]["output_tokens"])]
    ours, theirs = sum(cascade[i]["seconds"] for i in same), sum(strongest[i]["seconds"] for i in same)
    return {"prompts": len(same), "cascade_seconds": ours, "strongest_seconds": theirs,
            "ratio": ours / theirs if theirs else float("nan")}


def split_wall(cascade: dict[str, Any], strongest: dict[str, Any]) -> dict[str, Any]:
    """One round's wall ratio in two parts: the ratio of the seconds the models' steps took
    (what bench-seconds price), and the points the time outside them adds (start-up, the
    router, loading models: `ModelPool.load_seconds`), which a per-answer price leaves out
    and which shrinks as a batch grows."""
    steps = {name: sum(row["seconds"] for row in arm["by_model"].values())
             for name, arm in (("cascade", cascade), ("strongest", strongest))}
    steps_ratio = steps["cascade"] / steps["strongest"] if steps["strongest"] else float("nan")
    wall_ratio = cascade["wall_seconds"] / strongest["wall_seconds"]
    return {"steps_ratio": steps_ratio, "outside_points": 100 * (wall_ratio - steps_ratio),
            "outside_seconds": {"cascade": cascade["outside_steps_seconds"],
                                "strongest": strongest["outside_steps_seconds"]},
            # Of those, loading the models (`cre batch`'s summary; absent before it said).
            "load_seconds": {"cascade": sum(cascade.get("load_seconds", {}).values()),
                             "strongest": sum(strongest.get("load_seconds", {}).values())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog-large.jsonl")
    parser.add_argument("--test", type=int, default=200, help="queries to answer (the rest are fitted on)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of both batches (even: each order as often)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh-bench", action="store_true",
                        help="price at speeds measured now: `cre models bench --fresh` first, in a copy of CRE_HOME "
                             "(the outcome store and bench.json copied; yours are left as they are)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config
    from crecli.costs import Pricing, TokenCounts

    lines = [line for line in args.log.read_text().splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(args.seed).shuffle(order)
    test_idx = set(order[: args.test])
    settings = config.load()
    strongest = settings.ladder[-1]
    pricing = Pricing.for_models(settings.ladder_specs(), "bench-seconds")
    global ENV
    with tempfile.TemporaryDirectory(prefix="cre-clock-") as tmp:
        work = Path(tmp)
        speeds: Any = None
        if args.fresh_bench:
            import os

            ENV = home_copy(work)
            _, out, _ = cre("models", "bench", "--fresh", "--json")
            speeds = json.loads(out)
            os.environ.update(ENV)  # this process prices the batches' steps at the same speeds
            pricing = Pricing.for_models(settings.ladder_specs(), "bench-seconds")
        fit_log, test_log = work / "fit.jsonl", work / "test.jsonl"
        test_prompts = [json.loads(l)["prompt"] for i, l in enumerate(lines) if i in test_idx]
        counts = TokenCounts.for_specs(settings.ladder_specs())
        fit_log.write_text("\n".join(l for i, l in enumerate(lines) if i not in test_idx) + "\n")
        test_log.write_text("\n".join(l for i, l in enumerate(lines) if i in test_idx) + "\n")
        top_toml = work / "top.toml"
        top_toml.write_text(f'ladder = ["{strongest}"]\n')
        router, top = work / "router.cre", work / "top.cre"
        cre("fit", str(fit_log), "-o", str(router), "--seed", str(args.seed))
        cre("calibrate", str(router), "--seed", str(args.seed))
        cre("fit", str(fit_log), "-o", str(top), "--seed", str(args.seed), "--models", str(top_toml))
        runs: dict[str, list[dict[str, Any]]] = {"cascade": [], "strongest": []}
        drift: list[dict[str, Any]] = []
        arms = [("cascade", router, []), ("strongest", top, ["--models", str(top_toml)])]
        for i in range(args.rounds):
            for name, path, extra in (arms if i % 2 == 0 else arms[::-1]):
                seconds, _, err = cre("batch", str(test_log), "--router", str(path), "--no-log", "--json-summary", *extra,
                                      stdout=work / f"{name}.jsonl")
                models = by_model(work / f"{name}.jsonl", pricing, test_prompts, counts)
                in_steps = sum(row["seconds"] for row in models.values())
                runs[name].append({**batch_summary(err), "wall_seconds": seconds, "by_model": models,
                                   "outside_steps_seconds": seconds - in_steps})
            same = same_work(steps_by_id(work / "cascade.jsonl", strongest), steps_by_id(work / "strongest.jsonl", strongest))
            wall_round = runs["cascade"][-1]["wall_seconds"] / runs["strongest"][-1]["wall_seconds"]
            drift.append({**same, "cascade_first": i % 2 == 0, "wall_ratio": wall_round,
                          "corrected_wall_ratio": wall_round / same["ratio"],
                          **split_wall(runs["cascade"][-1], runs["strongest"][-1])})
        counts.close()
        _, out, _ = cre("eval", str(test_log), "--router", str(router), "--json")
        report = json.loads(out)
    wall = {name: statistics.median(r["wall_seconds"] for r in rs) for name, rs in runs.items()}
    reported = statistics.median(r["cost_ratio"] for r in runs["cascade"])
    result = {
        "log": str(args.log), "test_queries": args.test, "rounds": args.rounds, "seed": args.seed,
        "wall_seconds": wall, "wall_ratio": wall["cascade"] / wall["strongest"],
        "batch_reported_ratio": reported, "eval_cost_share": report["cost_share"],
        "fresh_bench": speeds,
        "rounds_by_drift": drift,
        "corrected_wall_ratio": statistics.median(d["corrected_wall_ratio"] for d in drift),
        "steps_ratio": statistics.median(d["steps_ratio"] for d in drift),
        "outside_points": statistics.median(d["outside_points"] for d in drift),
        "accuracy": {name: rs[0]["accuracy"] for name, rs in runs.items()},
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.test} held-out queries of {args.log.name}, {args.rounds} interleaved rounds")
    print(f"  wall time: cascade {wall['cascade']:.1f} s, {strongest} alone {wall['strongest']:.1f} s: "
          f"ratio {result['wall_ratio']:.3f}")
    print(f"  cre batch's reported cost ratio {reported:.3f}; cre eval's cost share {report['cost_share']:.3f}")
    print(f"  accuracy: cascade {result['accuracy']['cascade']:.3f}, strongest alone {result['accuracy']['strongest']:.3f}")
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            parts = ", ".join(f"{m} {row['seconds']:.1f} s for {row['priced']:.1f} priced ({row['seconds_per_priced']:.2f})"
                              for m, row in r["by_model"].items())
            print(f"  {name} round {i + 1}: {parts}; {r['outside_steps_seconds']:.1f} s outside the steps")
    spread = max(result["wall_ratio"], reported, report["cost_share"]) - min(result["wall_ratio"], reported, report["cost_share"])
    print(f"  the three agree within {100 * spread:.1f} points (goal: 3)")
    for i, d in enumerate(drift):
        print(f"  round {i + 1}: {strongest} took {d['ratio']:.3f}x as long on the same {d['prompts']} prompts in the "
              f"cascade's batch; wall ratio {d['wall_ratio']:.3f}, corrected {d['corrected_wall_ratio']:.3f}")
    print(f"  the models' steps alone: ratio {result['steps_ratio']:.3f} (median of rounds); the time outside them "
          f"adds {result['outside_points']:.1f} points to the wall ratio")
    for i, d in enumerate(drift):
        out, loads = d["outside_seconds"], d["load_seconds"]
        print(f"  round {i + 1} outside the steps: cascade {out['cascade']:.1f} s ({loads['cascade']:.1f} s loading models), "
              f"{strongest} alone {out['strongest']:.1f} s ({loads['strongest']:.1f} s loading)")
    corrected = result["corrected_wall_ratio"]
    spread = max(corrected, reported, report["cost_share"]) - min(corrected, reported, report["cost_share"])
    print(f"  drift-corrected wall ratio (median of rounds) {corrected:.3f}: the three agree within {100 * spread:.1f} points")


if __name__ == "__main__":
    main()
