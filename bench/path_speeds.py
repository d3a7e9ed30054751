"""Each model's speeds measured on the answering path, against `cre models bench`'s.

`cre models bench` times a microbenchmark (48 and 16 prompt tokens after the cached head, then 64
generated tokens, straight through llama.cpp's eval), and every bench-seconds cost is priced
at its figures. `bench/cost_vs_clock.py` found the rungs mispriced against each other on the
clock (the 1.5B's answers took 1.19-1.32x their price, gemma's 0.68-0.77x). This measures
the speeds the way answers run: for each model, a one-rung router (`cre fit` with a
models.toml whose ladder is that model) and `cre batch` over `--n` prompts of the log, in
interleaved rounds; then a least-squares fit of each answer's seconds on its prompt tokens
after the cached head and its output tokens (seconds = prompt / pp + output / tg).

With `--eval-log` and `--router`, it also prices `cre eval` of that router on that log with
the stored speeds and with these (a copy of CRE_HOME whose bench.json holds them), so one
run shows what the measured speeds would change in a cost share. Run it alone:

    flock /tmp/cre-cpu.lock .venv/bin/python bench/path_speeds.py [--n 60] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from cost_vs_clock import cre, home_copy  # bench/ is on the path when a script there runs

ROOT = Path(__file__).resolve().parents[1]


def _least_squares(rows: list[tuple[float, float, float]], constant: bool) -> list[float]:
    """Seconds per prompt token and per output token (after seconds per answer, with
    `constant`) fitted to (prompt tokens, output tokens, seconds) rows: the one matrix both
    fits below solve."""
    import numpy as np

    a = np.array([([1.0] if constant else []) + [p, o] for p, o, _ in rows], dtype=float)
    y = np.array([s for _, _, s in rows], dtype=float)
    return [float(x) for x in np.linalg.lstsq(a, y, rcond=None)[0]]


def fit_speeds(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(prompt, output) tokens/s from (prompt tokens, output tokens, seconds) rows:
    least squares of seconds = prompt / pp + output / tg."""
    per_prompt, per_output = _least_squares(rows, constant=False)
    if per_prompt <= 0 or per_output <= 0:
        sys.exit(f"the fit gave a non-positive cost per token ({per_prompt}, {per_output}); use more prompts")
    return 1.0 / per_prompt, 1.0 / per_output


def fit_with_constant(rows: list[tuple[float, float, float]]) -> dict[str, float]:
    """The same fit with a per-answer constant (seconds = c + prompt / pp + output / tg): a
    cost every answer pays whatever its length, such as the decode that yields the stop
    token, which no output count includes. Reported beside the two-speed fit, not stored."""
    c, per_prompt, per_output = _least_squares(rows, constant=True)
    return {"per_answer_seconds": c, "pp_tokens_per_s": 1 / per_prompt if per_prompt > 0 else float("inf"),
            "tg_tokens_per_s": 1 / per_output if per_output > 0 else float("inf")}


def sample(lines: list[str], n: int) -> list[str]:
    """`n` lines spread over the log, kept in its order (a batch sorted by cluster reads like it)."""
    step = max(1, len(lines) // n)
    return lines[::step][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog-large.jsonl")
    parser.add_argument("--n", type=int, default=60, help="prompts each model answers per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-log", type=Path, help="also price `cre eval` of --router on this log both ways")
    parser.add_argument("--router", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config
    from crecli.costs import Pricing
    from crecli.models import bench

    settings = config.load()
    specs = settings.ladder_specs()
    stored = bench.speeds(specs)
    pricing = Pricing.for_models(specs, "bench-seconds")  # the stored speeds, as cre prices with them
    lines = [line for line in args.log.read_text().splitlines() if line.strip()]
    rows: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in specs}
    with tempfile.TemporaryDirectory(prefix="cre-path-") as tmp:
        work = Path(tmp)
        (work / "fit.jsonl").write_text("\n".join(sample(lines, 300)) + "\n")
        (work / "ask.jsonl").write_text("\n".join(sample(lines[1:], args.n)) + "\n")
        for spec in specs:
            (work / f"{spec.name}.toml").write_text(f'ladder = ["{spec.name}"]\n')
            cre("fit", str(work / "fit.jsonl"), "-o", str(work / f"{spec.name}.cre"), "--models", str(work / f"{spec.name}.toml"))
        for _ in range(args.rounds):
            for spec in specs:
                out = work / f"{spec.name}.out.jsonl"
                cre("batch", str(work / "ask.jsonl"), "--router", str(work / f"{spec.name}.cre"), "--no-log",
                    "--models", str(work / f"{spec.name}.toml"), stdout=out)
                for line in out.read_text().splitlines():
                    for step in json.loads(line).get("trace", {}).get("steps", []):
                        rows[spec.name].append((max(0, step["prompt_tokens"] - pricing.cached(spec.name)),
                                                step["output_tokens"], step["seconds"]))
        measured = {name: fit_speeds(r) for name, r in rows.items()}
        result: dict[str, Any] = {
            "log": str(args.log), "n": args.n, "rounds": args.rounds,
            "models": {name: {"answers": len(rows[name]), "stored": stored[name]._asdict() if name in stored else None, "path": measured[name],
                              "with_constant": fit_with_constant(rows[name]),
                              "mean_prompt_tokens": sum(p for p, _, _ in rows[name]) / len(rows[name]),
                              "mean_output_tokens": sum(o for _, o, _ in rows[name]) / len(rows[name]),
                              "seconds": sum(s for _, _, s in rows[name]),
                              # rows hold the tokens after the cached head, which tokens() takes off again
                              "stored_price": sum(pricing.tokens(name, p + pricing.cached(name), o) or 0.0
                                                  for p, o, _ in rows[name]) if name in stored else None}
                       for name in rows},
        }
        if args.eval_log and args.router:
            env = home_copy(work)
            copied = Path(env["CRE_HOME"]) / "data" / "bench.json"
            data = json.loads(copied.read_text())
            for spec in specs:
                entry = bench.stored(spec)
                key = next(k for k, v in data.items() if v == entry)
                pp, tg = measured[spec.name]
                # The two-speed fit prices with no pass (`bench.Rates`).
                data[key] = {**entry, "pp_tokens_per_s": pp, "tg_tokens_per_s": tg, "pass_seconds": 0.0,
                             "pp_short_tokens": None, "runs": []}
            copied.write_text(json.dumps(data))
            before = json.loads(cre("eval", str(args.eval_log), "--router", str(args.router), "--json")[1])
            after = json.loads(cre("eval", str(args.eval_log), "--router", str(args.router), "--json", env=env)[1])
            result["eval"] = {"stored_speeds": before["cost_share"], "path_speeds": after["cost_share"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name, m in result["models"].items():
        s = m["stored"]
        print(f"{name}: answering path pp {m['path'][0]:.0f} tg {m['path'][1]:.1f} tokens/s over {m['answers']} answers; "
              f"(with a constant: {m['with_constant']['per_answer_seconds']:.3f} s an answer); stored pass "
              f"{s['pass_seconds']:.3f} s, {s['pp']:.0f} / {s['tg']:.1f}; took {m['seconds']:.1f} s for {m['stored_price']:.1f} priced" if s else "")
    if "eval" in result:
        print(f"cre eval cost share: {result['eval']['stored_speeds']:.3f} at the stored speeds, "
              f"{result['eval']['path_speeds']:.3f} at the answering path's (its two-speed fit, priced with no pass)")


if __name__ == "__main__":
    main()
