#!/usr/bin/env python3
"""How a prompt's time grows with its length: a pass over the weights plus a time per token.

For each ladder model, loaded together, this times prompts of several lengths after the
cached head (as `cre models bench` and real prompts run: the head stays in the cache), in
interleaved rounds (each model and length once per round), and fits seconds = pass + n /
pp by least squares over the lengths' median times. It also times single-token decodes
(generation). It prints each model's pass, rate and the median time per length, so the
bench-seconds rule (`bench.Rates`: a pass, then tokens) can be checked against the clock:
where the pass is near 0, pricing by tokens alone would do.

Run it alone (it runs real models):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/prompt_pass.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

LENGTHS = (4, 8, 16, 24, 32, 48, 64, 96, 128)  # PP_TOKENS (48) among them


def fit(lengths: list[int], seconds: list[float]) -> tuple[float, float]:
    """(pass seconds, tokens/s) of the least-squares line seconds = pass + n / pp."""
    mean_n, mean_s = statistics.fmean(lengths), statistics.fmean(seconds)
    slope = sum((n - mean_n) * (s - mean_s) for n, s in zip(lengths, seconds)) / sum((n - mean_n) ** 2 for n in lengths)
    return mean_s - slope * mean_n, 1.0 / slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config
    from crecli.models.bench import _PROMPT, PP_TOKENS
    from crecli.models.llama import LlamaBackend
    from crecli.models.tokens import prompt_head

    settings = config.load()
    specs = settings.ladder_specs()
    backends = [LlamaBackend(spec) for spec in specs]
    times: dict[str, dict[Any, list[float]]] = {s.name: {n: [] for n in (*LENGTHS, "tg")} for s in specs}
    for _ in range(args.rounds):
        for spec, backend in zip(specs, backends):
            llm = backend.llm
            head = prompt_head(llm, spec.prompt_format)
            tokens = llm.tokenize((_PROMPT * 40).encode(), add_bos=not head)
            llm.reset()
            llm.eval(head)
            llm.eval(tokens[:8])  # warm-up: the first decode allocates buffers
            for n in LENGTHS:
                llm.n_tokens = len(head)  # as if the previous prompt had shared only the head
                start = time.perf_counter()
                llm.eval(tokens[:n])
                times[spec.name][n].append(time.perf_counter() - start)
            llm.n_tokens = len(head)
            llm.eval(tokens[:40])
            start = time.perf_counter()
            for i in range(16):
                llm.eval([tokens[40 + i]])
            times[spec.name]["tg"].append((time.perf_counter() - start) / 16)
    for backend in backends:
        backend.close()
    result: dict[str, Any] = {"rounds": args.rounds, "lengths": list(LENGTHS), "models": {}}
    for spec in specs:
        median = {n: statistics.median(times[spec.name][n]) for n in LENGTHS}
        fixed, pp = fit(list(LENGTHS), [median[n] for n in LENGTHS])
        result["models"][spec.name] = {
            "pass_seconds": fixed, "pp_tokens_per_s": pp,
            "tg_seconds_per_token": statistics.median(times[spec.name]["tg"]),
            "median_seconds": {str(n): median[n] for n in LENGTHS},
            f"mean_rate_at_{PP_TOKENS}": PP_TOKENS / median[PP_TOKENS],
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for name, m in result["models"].items():
        print(f"{name}: pass {m['pass_seconds'] * 1000:.0f} ms + {1000 / m['pp_tokens_per_s']:.2f} ms a token; "
              f"a generated token {m['tg_seconds_per_token'] * 1000:.0f} ms; {PP_TOKENS} tokens at "
              f"{m[f'mean_rate_at_{PP_TOKENS}']:.0f}/s")
        print("   ms by length: " + ", ".join(f"{n}: {s * 1000:.0f}" for n, s in m["median_seconds"].items()))


if __name__ == "__main__":
    main()
