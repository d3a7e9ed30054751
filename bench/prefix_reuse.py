"""Does llama.cpp really skip the head every prompt shares? Measured side by side in one run.

For each model, the same greedy answers to N prompts of the log, two ways:
  (a) cold: the KV cache reset before every prompt, so each pays for all its prompt tokens;
  (b) warm: prompts back to back, as `cre batch` and `cre serve` run them, so each reuses
      the cached head (`bench.cached_head_tokens`) of the one before.
It prints the head's length, the mean prompt length, the warm/cold time ratio, and the
ratio the bench-seconds cost model predicts when it leaves the head out, so the pricing
rule can be checked against the clock.

    flock /tmp/cre-cpu.lock .venv/bin/python bench/prefix_reuse.py [--queries 24] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crecli import config, grading, querylog
from crecli.costs import token_cost
from crecli.models import bench
from crecli.models.llama import LlamaBackend
from crecli.quality import QualityCheck, vote_params
from quality_check import DEFAULT_LOG, spread  # bench/ is on sys.path when run as a script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--models", nargs="*", help="default: the ladder")
    args = parser.parse_args()

    settings = config.load(None)
    records = spread(list(querylog.read_log(args.log).records), args.queries)
    quality = QualityCheck()
    print(f"{len(records)} prompts from {args.log.name}, greedy, each model alone")
    print(f"{'model':32} {'head':>5} {'prompt':>7} {'cold s':>8} {'warm s':>8} {'warm/cold':>10} {'predicted':>10}")
    for name in args.models or settings.ladder:
        spec = settings.get(name)
        backend = LlamaBackend(spec)
        llm = backend.llm
        head = bench.cached_head_tokens(llm, spec.prompt_format)
        speed = bench.speeds([spec]).get(name)
        times = {"cold": 0.0, "warm": 0.0}
        sizes: list[tuple[int, int]] = []  # each cold answer's (prompt, output) tokens
        for mode in ("cold", "warm"):
            for r in records:
                params = vote_params(quality, 0, grading.max_tokens_for(r.match), r.prompt,
                                     option_letters=grading.option_letters(r.match, r.prompt))
                if mode == "cold":
                    llm.reset()
                start = time.perf_counter()
                gen = backend.generate(r.prompt, params)
                times[mode] += time.perf_counter() - start
                if mode == "cold":
                    sizes.append((gen.prompt_tokens, gen.output_tokens))
        backend.close()
        predicted = "-"
        if speed is not None:
            # Each prompt priced by the one rule (`costs.token_cost`): a pass and its tokens,
            # all of them cold, after the head warm.
            full = sum(token_cost("bench-seconds", p, o, speed=speed) or 0.0 for p, o in sizes)
            warm = sum(token_cost("bench-seconds", max(0, p - head), o, speed=speed) or 0.0 for p, o in sizes)
            predicted = f"{warm / full:.2f}"
        n = len(records)
        print(f"{name:32} {head:5d} {sum(p for p, _ in sizes) / n:7.1f} {times['cold']:8.2f} {times['warm']:8.2f} "
              f"{times['warm'] / times['cold']:10.2f} {predicted:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
