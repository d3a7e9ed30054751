"""How often parallel decoding answers differently from decoding one sequence at a time.

`cre batch --parallel` decodes many prompts' greedy answers as parallel sequences, and the
quality check decodes one prompt's sampled votes together (`LlamaBackend.sample_many`).
Batched decoding adds floating-point sums in another order, so on some CPUs a token near a
tie (greedy) or a seeded draw near a probability boundary (sampling) comes out otherwise.
The tests assert only what holds on every CPU (tests/test_real_parallel.py); this measures
the rate on this machine, for each model, on the first N prompts of a log:

  greedy   each prompt's greedy answer, one at a time, against `generate_many(..., parallel)`;
           a difference is "contested" when some step of either answer chose a token of
           probability under about one half (a near-tie), as the tests allow;
  votes    each prompt's k-1 sampled votes (the quality check's seeds and temperature),
           one at a time against `sample_many` after the greedy vote.

Run it alone (it loads real models):

    flock /tmp/cre-cpu.lock .venv/bin/python bench/parallel_agreement.py [--model NAME ...] [--queries 48] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from crecli import config, grading, querylog
from crecli.models.llama import LlamaBackend
from crecli.quality import QualityCheck, vote_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOG = ROOT / "examples" / "querylog.jsonl"
sys.path.insert(0, str(ROOT / "tests"))
from support.real import CONTESTED_LOGPROB  # noqa: E402 - the tests' bound (tests/support/real.py)


def cpu() -> str:
    """This machine's CPU model, and whether it has AMX (where llama.cpp runs other kernels)."""
    from crecli.models.runtime import cpu_has_amx

    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace")
                 if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{name}{' (AMX)' if cpu_has_amx() else ''}"


def measure(name: str, prompts: list[tuple[str, str | None]], parallel: int, k: int) -> dict[str, object]:
    settings = config.load()
    quality = QualityCheck(k=k)
    backend = LlamaBackend(settings.get(name))
    try:
        greedy_params = [vote_params(quality, 0, grading.max_tokens_for(m), p, option_letters=grading.option_letters(m, p))
                         for p, m in prompts]
        one = [backend.generate(p, g) for (p, _), g in zip(prompts, greedy_params)]
        many = backend.generate_many([p for p, _ in prompts], greedy_params, parallel)
        differ = contested = 0
        for a, b in zip(one, many):
            if isinstance(b, Exception) or a.text != b.text:
                differ += 1
                lows = [g.signals.min_logprob for g in (a, b) if not isinstance(g, Exception) and g.signals]
                contested += bool(lows) and min(lows) < CONTESTED_LOGPROB
        votes = votes_differ = prompts_differ = 0
        for (p, m), g in zip(prompts, greedy_params):
            sampled = [vote_params(quality, i, g.max_tokens, p) for i in range(1, k)]
            backend.generate(p, g)  # the greedy vote leaves the prompt cached, as in the check
            together = [v.text for v in backend.sample_many(p, sampled)]
            alone = [backend.generate(p, s).text for s in sampled]
            changed = sum(x != y for x, y in zip(together, alone))
            votes += len(sampled)
            votes_differ += changed
            prompts_differ += changed > 0
    finally:
        backend.close()
    return {
        "model": name, "prompts": len(prompts), "parallel": parallel, "k": k,
        "greedy_differ": differ, "greedy_differ_contested": contested,
        "votes": votes, "votes_differ": votes_differ, "prompts_with_a_vote_differing": prompts_differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model name (repeatable; default: the ladder)")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG)
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    records = querylog.LogOptions().read(args.log).records[: args.queries]
    prompts = [(r.prompt, r.match) for r in records]
    names = args.model or config.load().ladder
    rows = []
    for name in names:
        print(f"{name}: {len(prompts)} prompts...", file=sys.stderr)
        rows.append(measure(name, prompts, args.parallel, args.k))
    result = {"cpu": cpu(), "log": str(args.log), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'model':30} {'greedy differ':>14} {'of which contested':>19} {'votes differ':>14} {'prompts':>8}")
    for r in rows:
        print(f"{r['model']:30} {r['greedy_differ']:>6}/{r['prompts']:<7} {r['greedy_differ_contested']:>19} "
              f"{r['votes_differ']:>6}/{r['votes']:<7} {r['prompts_with_a_vote_differing']:>8}")


if __name__ == "__main__":
    main()
