"""What the quality checks cost, as a multiple of one greedy answer, on a real model.

Six ways to answer the same prompts, measured side by side in one run:
  (a) one greedy answer, without reading its signals (log-probs, option margin);
  (a') the same greedy answer with its signals read, as every greedy answer is by default;
  (e) the calibrated deferral check (`cre calibrate --check deferral`, one vote): the
      greedy answer with its signals and one P(correct) from them;
  (b) the quality check at k votes as the cascade runs it (crecli.escalate.check): prompt
      processed once, samples reuse its KV cache, early stop, answer-type output caps;
      Its sampled votes are decoded as parallel sequences over the prompt (waves, see
      `quality.wave`);
  (b') the same check with its sampled votes drawn one after another (the path before
      parallel votes; `Backend.sample_many`'s default);
  (c) the same check with early stop disabled (always k votes), and (c') one at a time;
  (d) a naive loop: k votes with the cache reset before each, so every vote pays for the
      prompt again.
Every method starts from an empty KV cache, so each pays for its prompt at least once.
All four use the same answer-type caps, so the multiples isolate the cost of voting.

Run it alone (it loads a real model; nothing else should compute at the same time):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/quality_check.py [--model NAME] [--queries N]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from crecli import config, grading, querylog
from crecli.escalate import check
from crecli.models.backend import Backend
from crecli.models.llama import LlamaBackend
from crecli.quality import Deferral, QualityCheck, feature_names, vote_params

# examples/ in the repository.
DEFAULT_LOG = Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl"


def spread(records: list[querylog.Record], n: int) -> list[querylog.Record]:
    """n records at evenly spaced positions, so a log sorted by task yields many tasks."""
    if n >= len(records):
        return records
    return [records[i * len(records) // n] for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.6, help="agreement needed to accept (early stop)")
    parser.add_argument("--models", type=Path, default=None, help="an extra models.toml")
    args = parser.parse_args()

    settings = config.load(args.models)
    records = spread([r for r in querylog.read_log(args.log).records], args.queries)
    quality = QualityCheck(k=args.k)
    no_early = replace(quality, early_stop=False)
    backend = LlamaBackend(settings.get(args.model))
    llm = backend.llm
    backend.generate("Warm-up: say OK.", vote_params(quality, 0, 4, "Warm-up: say OK."))  # first decode allocates buffers

    names = ["(a) greedy", "(b) check, as implemented", "(c) check, no early stop", "(d) naive loop, cache reset",
             "(a') greedy, signals read", "(e) deferral check, 1 vote", "(b') check, votes one at a time",
             "(c') no early stop, one at a time"]
    parallel_votes = backend.sample_many

    def sequential_votes(prompt: str, params: list) -> list:  # type: ignore[type-arg]
        return Backend.sample_many(backend, prompt, params)

    # The check's cost does not depend on the weights: any model of the right shape will do.
    deferral = Deferral(feature_names(1), (0.0,) * 5, 0.0, (0.0,) * 5, 0.5)
    seconds = dict.fromkeys(names, 0.0)
    votes = dict.fromkeys(names, 0)
    tokens = dict.fromkeys(names, 0)
    same_greedy = 0
    same_votes = total_votes = 0
    for n, record in enumerate(records, start=1):
        cap = grading.max_tokens_for(record.match)
        letters = grading.option_letters(record.match, record.prompt)  # as the check ends its greedy vote

        llm.reset()
        backend.read_signals = False
        start = time.perf_counter()
        greedy = backend.generate(record.prompt, vote_params(quality, 0, cap, record.prompt, option_letters=letters))
        seconds[names[0]] += time.perf_counter() - start
        backend.read_signals = True
        votes[names[0]] += 1
        tokens[names[0]] += greedy.output_tokens

        llm.reset()
        start = time.perf_counter()
        signalled = backend.generate(record.prompt, vote_params(quality, 0, cap, record.prompt, option_letters=letters))
        seconds[names[4]] += time.perf_counter() - start
        votes[names[4]] += 1
        tokens[names[4]] += signalled.output_tokens

        llm.reset()
        start = time.perf_counter()
        step = check(backend, record.prompt, quality, 0.5, cap, record.match, deferral=deferral, votes_wanted=1)
        seconds[names[5]] += time.perf_counter() - start
        votes[names[5]] += step.used
        tokens[names[5]] += step.output_tokens

        drawn = {}
        for name, qs, sampler in ((names[1], quality, parallel_votes), (names[2], no_early, parallel_votes),
                                  (names[6], quality, sequential_votes), (names[7], no_early, sequential_votes)):
            backend.sample_many = sampler  # type: ignore[method-assign]
            llm.reset()
            start = time.perf_counter()
            step = check(backend, record.prompt, qs, args.threshold, cap, record.match)
            seconds[name] += time.perf_counter() - start
            votes[name] += step.used
            tokens[name] += step.output_tokens
            drawn[name] = step.votes
            if name == names[1]:
                same_greedy += step.votes[0] == greedy.text
                summary = f"{step.used} votes, agreement {step.agreement:.2f}, answer {step.answer[:30]!r}"
        backend.sample_many = parallel_votes  # type: ignore[method-assign]
        # Sampled votes: parallel against one at a time, same seeds; only float order differs.
        same_votes += sum(a == b for a, b in zip(drawn[names[2]][1:], drawn[names[7]][1:]))
        total_votes += len(drawn[names[2]]) - 1

        start = time.perf_counter()
        for i in range(args.k):
            llm.reset()
            gen = backend.generate(record.prompt, vote_params(quality, i, cap, record.prompt, option_letters=letters))
            tokens[names[3]] += gen.output_tokens
        seconds[names[3]] += time.perf_counter() - start
        votes[names[3]] += args.k
        print(f"[{n}/{len(records)}] {record.id} ({record.match}, cap {cap}): {summary}", file=sys.stderr, flush=True)
    backend.close()

    base = seconds[names[0]]
    print(f"model {args.model}, {len(records)} prompts from {args.log.name}, k={args.k}, "
          f"threshold {args.threshold}, {backend.n_threads} threads")
    print(f"{'method':32} {'seconds':>8} {'x greedy':>9} {'votes':>6} {'out tokens':>11}")
    for name in names:
        print(f"{name:32} {seconds[name]:8.2f} {seconds[name] / base:8.2f}x {votes[name]:6d} {tokens[name]:11d}")
    print(f"greedy vote of (b) identical to (a) on {same_greedy}/{len(records)} prompts")
    print(f"sampled votes of (c) identical to (c') on {same_votes}/{total_votes}")
    print("Goal (issue 10): the quality check at most 1.6x one greedy answer; (issue 11): k=5 at most 1.25x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
