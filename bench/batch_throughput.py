"""`cre batch` throughput: prompts one at a time against greedy votes decoded in parallel.

For each model, the same prompts are answered as `cre batch` answers the prompts of one
rung, side by side in one run:
  sequential   today's path (`--parallel 1`): per prompt, the quality check
               (`escalate.check`): greedy vote, then sampled votes while the decision is open;
  parallel N   (`--parallel N`): the greedy votes of all prompts decoded N sequences at a
               time (`Backend.generate_many`), then each prompt's check with that vote, its
               sampled votes drawn as in the sequential path.
It prints prompts/s and the speed-up over the sequential path, split into the greedy
phase and the sampled votes (a wave of them decoded as parallel sequences; after a parallel
greedy wave they load the prompt's KV cells it kept), the share of greedy answers identical to the
sequential path's, the share of checked answers identical to its answers (sampled votes
after a wave run on KV cells the parallel context computed, so they too can differ where
floating-point order tips a token), and the accuracy of the greedy and checked answers.

`--threshold 0` makes every check stop at its greedy vote (what a rung whose threshold
calibrated to 0 does), so it measures the parallel greedy engine alone.

Run it alone (it loads real models; nothing else should compute at the same time):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/batch_throughput.py [--model NAME ...] [--queries 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from crecli import config, grading, querylog
from crecli.errors import CreError
from crecli.escalate import Step, check
from crecli.models.backend import Generation, GenParams
from crecli.models.llama import LlamaBackend
from crecli.quality import QualityCheck, vote_params
from quality_check import DEFAULT_LOG, spread  # bench/ is on sys.path when run as a script

LADDER = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]


@dataclass
class Run:
    name: str
    seconds: float = 0.0  # wall time of the whole run
    greedy_seconds: float = 0.0  # the greedy votes: their calls, or the parallel wave's wall time
    vote_seconds: float = 0.0  # the sampled votes' calls
    votes: int = 0
    greedy: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


class Timed:
    """Wraps a backend's `generate` and `sample_many` to add each answer's seconds to the
    greedy or the vote total; everything else is the backend's."""

    def __init__(self, backend: LlamaBackend, run: Run) -> None:
        self.backend, self.run, self.spec = backend, run, backend.spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _count(self, gens: Sequence[Generation], params: Sequence[GenParams]) -> None:
        for gen, p in zip(gens, params):
            if p.temperature == 0.0:
                self.run.greedy_seconds += gen.seconds
            else:
                self.run.vote_seconds += gen.seconds

    def generate(self, prompt: str, params: GenParams) -> Generation:
        gen = self.backend.generate(prompt, params)
        self._count([gen], [params])
        return gen

    def sample_many(self, prompt: str, params: Sequence[GenParams]) -> list[Generation]:
        # The sampled votes, a wave at a time (`ParallelVotes`): each answer's seconds hold its
        # share of the wave's decode steps and of loading the prompt's cells.
        gens = self.backend.sample_many(prompt, params)
        self._count(gens, params)
        return gens


def answer(backend: LlamaBackend, records: list[querylog.Record], quality: QualityCheck, threshold: float,
           parallel: int) -> Run:
    run = Run("sequential" if parallel == 1 else f"parallel {parallel}")
    timed = Timed(backend, run)
    caps = [grading.max_tokens_for(r.match) for r in records]
    backend.llm.reset()  # every run starts from an empty cache
    start = time.perf_counter()
    firsts: list[Generation | None] = [None] * len(records)
    if parallel > 1:
        params = [vote_params(quality, 0, cap, r.prompt, option_letters=grading.option_letters(r.match, r.prompt))
                  for r, cap in zip(records, caps)]
        gens = backend.generate_many([r.prompt for r in records], params, parallel)
        firsts = [None if isinstance(g, CreError) else g for g in gens]
        run.greedy_seconds = time.perf_counter() - start
    for record, cap, first in zip(records, caps, firsts):
        step = check(timed, record.prompt, quality, threshold, cap, record.match, first)  # type: ignore[arg-type]
        run.steps.append(step)
        run.greedy.append(step.votes[0])
        run.votes += step.used
    run.seconds = time.perf_counter() - start
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model(s) to measure (default: the whole ladder)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--parallel", type=int, action="append", help="N values (default: 2, 4, 8)")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.6, help="agreement needed to accept (0: greedy vote only)")
    parser.add_argument("--models", type=Path, default=None, help="an extra models.toml")
    args = parser.parse_args()

    settings = config.load(args.models)
    records = spread(list(querylog.read_log(args.log).records), args.queries)
    quality = QualityCheck(k=args.k)
    ns = args.parallel or [2, 4, 8]
    for name in args.model or LADDER:
        backend = LlamaBackend(settings.get(name))
        warm = records[:2]
        warm_params = [vote_params(quality, 0, 4, r.prompt) for r in warm]
        backend.generate(warm[0].prompt, warm_params[0])  # the first decode allocates buffers
        runs = [answer(backend, records, quality, args.threshold, 1)]
        for n in ns:
            backend.generate_many([r.prompt for r in warm], warm_params, n)  # builds the n-sequence context
            runs.append(answer(backend, records, quality, args.threshold, n))
            print(f"{name}: {runs[-1].name} done", file=sys.stderr, flush=True)
        backend.close()

        base = runs[0]
        print(f"model {name}, {len(records)} prompts from {args.log.name}, k={args.k}, threshold {args.threshold}, "
              f"{backend.n_threads} threads")
        print(f"{'run':12} {'prompts/s':>9} {'speed-up':>8} {'greedy s':>8} {'votes s':>8} {'votes':>6} "
              f"{'same greedy':>11} {'same answer':>11} {'greedy acc':>10} {'answer acc':>10}")
        for run in runs:
            same = sum(a == b for a, b in zip(run.greedy, base.greedy))
            same_answer = sum(a.answer == b.answer for a, b in zip(run.steps, base.steps))
            greedy_ok = sum(grading.grade(g.strip(), r.reference or [], r.match or "exact") for g, r in zip(run.greedy, records))
            answer_ok = sum(grading.grade(s.answer, r.reference or [], r.match or "exact") for s, r in zip(run.steps, records))
            print(f"{run.name:12} {len(records) / run.seconds:9.3f} {base.seconds / run.seconds:7.2f}x "
                  f"{run.greedy_seconds:8.1f} {run.vote_seconds:8.1f} {run.votes:6d} "
                  f"{same:5d}/{len(records):<5d} {same_answer:5d}/{len(records):<5d} {greedy_ok / len(records):10.3f} {answer_ok / len(records):10.3f}")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
