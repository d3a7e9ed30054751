"""Is the strongest model priced alike on the prompts the cascade gives it and on the rest?

Reads JSON files that `bench/cost_vs_clock.py --json` wrote and runs nothing. Each of their
rounds timed the strongest model's answers to the prompts the cascade sent it twice: in the
cascade's batch, and inside the strongest model's own batch of every prompt (`rounds_by_drift`).
Their price is the same answers' (`by_model`), so per round this splits the strongest model's
own batch into the cascade's prompts and the rest, each with its seconds per priced second.

If the rest run at fewer seconds per priced second than the cascade's prompts, the price
over-charges the answers the cascade keeps away from the strongest model, and `cre batch`'s
reported ratio (and `cre eval`'s share) overstate the saving against the clock. The script
also prints the reported ratio with the rest priced at the cascade's prompts' rate (the
cascade's own cost as reported): what the ratio would read if the price erred alike on both.

    .venv/bin/python bench/clock_subsets.py bench/results/cost-vs-clock-*.json [--json]

A file written before shared starts were free (2357e31) priced `by_model` in full, as its
batches' summaries did; cost-vs-clock-default-amd-seed0.json was written after, but by the
code before by_model priced them (12b2173, the summary with them, `by_model` without), so
its "repriced" column mixes the two and reads nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def split(result: dict[str, Any]) -> dict[str, Any]:
    """Per round of one cost_vs_clock result: the strongest model's seconds per priced second
    on the cascade's prompts and on the rest, and the reported ratio repriced (see above)."""
    top = result["runs"]["strongest"][0]["strongest_model"]
    rounds = []
    for cascade, alone, drift in zip(result["runs"]["cascade"], result["runs"]["strongest"], result["rounds_by_drift"]):
        sub_priced = cascade["by_model"][top]["priced"]
        sub_seconds = drift["strongest_seconds"]
        all_priced, all_seconds = alone["by_model"][top]["priced"], alone["by_model"][top]["seconds"]
        sub_rate = sub_seconds / sub_priced
        rest_rate = (all_seconds - sub_seconds) / (all_priced - sub_priced)
        repriced = cascade["cascade_cost"] / (sub_priced + (all_priced - sub_priced) * rest_rate / sub_rate)
        rounds.append({"cascade_prompts": sub_rate, "rest": rest_rate, "repriced_ratio": repriced})
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {"strongest": top, "rounds": rounds, "median": median,
            "reported_ratio": result["batch_reported_ratio"], "eval_cost_share": result["eval_cost_share"],
            "wall_ratio": result["wall_ratio"], "corrected_wall_ratio": result["corrected_wall_ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of bench/cost_vs_clock.py --json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = {str(path): split(json.loads(path.read_text())) for path in args.results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'result':48s} {'cascade':>8s} {'rest':>6s} {'reported':>9s} {'repriced':>9s} {'wall':>6s} {'corr.':>6s}")
    for path, s in out.items():
        m = s["median"]
        print(f"{Path(path).name[:48]:48s} {m['cascade_prompts']:8.3f} {m['rest']:6.3f} {s['reported_ratio']:9.3f} "
              f"{m['repriced_ratio']:9.3f} {s['wall_ratio']:6.3f} {s['corrected_wall_ratio']:6.3f}")
    print("cascade / rest: the strongest model's seconds per priced second on the prompts the cascade gave it and on "
          "the others, in its own batch (medians of the rounds); repriced: the reported ratio with the rest priced at "
          "the cascade's prompts' rate; corr.: the wall ratio corrected for drift (cost_vs_clock.py)")


if __name__ == "__main__":
    main()
