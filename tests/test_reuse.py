"""Prompt starts a run's prompts share, which llama.cpp keeps in its cache: the rule
(`costs.shared_starts`), their price (`Pricing.price_votes`), their counts (`TokenCounts`),
and the replay that prices a log as `cre batch` would answer it (`replay.run_reuse`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from crecli import config
from crecli.costs import CostModel, Pricing, TokenCounts, shared_starts
from crecli.errors import CreError
from crecli.models.bench import Rates
from crecli.outcomes import Outcome, Vote
from crecli.querylog import Record
from crecli.replay import run_reuse

PLAUSIBLE = "Is the following sentence plausible? "


def test_a_prompt_shares_its_start_with_the_previous_prompt_of_its_cluster_only() -> None:
    prompts = [PLAUSIBLE + "Messi kicked a goal.", "What is 7 plus 5?", PLAUSIBLE + "Brady shot a three.",
               "What is 8 plus 9?", PLAUSIBLE + "Messi kicked a goal."]
    starts = shared_starts(prompts, [1, 2, 1, 2, 1])
    # The first of each cluster shares nothing; a later one shares, cut back to the last
    # space, so "Messi"/"Brady" (whose first tokens differ) is not in it.
    assert starts == ["", "", PLAUSIBLE, "What is ", PLAUSIBLE]
    # The same prompts in another cluster share nothing with them.
    assert shared_starts(prompts[:3], [1, 2, 3]) == ["", "", ""]


def test_each_chunk_starts_afresh_as_cre_batch_takes_its_lines() -> None:
    prompts = [PLAUSIBLE + "A.", PLAUSIBLE + "B.", PLAUSIBLE + "C.", PLAUSIBLE + "D."]
    assert shared_starts(prompts, [0] * 4, chunk=2) == ["", PLAUSIBLE, "", PLAUSIBLE]
    assert shared_starts(prompts, [0] * 4, chunk=4) == ["", PLAUSIBLE, PLAUSIBLE, PLAUSIBLE]


def test_a_shared_start_is_free_in_bench_seconds_only_and_a_prompt_still_pays_a_pass() -> None:
    bench = Pricing("bench-seconds", {}, {"m": Rates(100.0, 10.0, 0.5)})
    full = bench.price_votes("m", 60, [10], [0.0])
    assert full == pytest.approx([0.5 + 0.6 + 1.0])
    assert bench.price_votes("m", 60, [10], [0.0], reused_tokens=20) == pytest.approx([0.5 + 0.4 + 1.0])
    # A prompt held whole still evaluates its last token, so it pays a pass and that token.
    assert bench.price_votes("m", 60, [10], [0.0], reused_tokens=99) == pytest.approx([0.5 + 0.01 + 1.0])
    # A provider's price and measured seconds are what they are.
    price = Pricing("price", {"m": 1000.0})
    assert price.price_votes("m", 60, [10], [0.0], reused_tokens=20) == price.price_votes("m", 60, [10], [0.0])
    assert Pricing("seconds", {}).price_votes("m", 60, [10], [2.5], reused_tokens=20) == [2.5]


class Counter:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.asked = fail, 0

    def count_text_tokens(self, text: str) -> int | None:
        self.asked += 1
        if self.fail:
            raise CreError("no vocabulary here")
        return len(text.split())


def test_token_counts_count_once_and_a_model_that_cannot_count_pays_in_full() -> None:
    ok, broken = Counter(), Counter(fail=True)
    counts = TokenCounts(lambda model: ok if model == "ok" else broken)
    assert counts("ok", PLAUSIBLE) == 5 and counts("ok", PLAUSIBLE) == 5 and ok.asked == 1
    assert counts("broken", PLAUSIBLE) == 0 and counts("ok", "") == 0
    ids, prompts = ["a", "b", "c"], [PLAUSIBLE + "A.", PLAUSIBLE + "B.", "Other."]
    assert counts.of_run(ids, prompts, [0, 0, 0], ["ok", "broken"]) == {("b", "ok"): 5}


def test_the_replay_prices_a_log_as_cre_batch_answers_it(
    tiny_models_toml: Path, fake_backends: Callable[..., Any], bench_speeds: Callable[..., None]
) -> None:
    fake_backends({})
    bench_speeds({"small": (100.0, 10.0), "medium": (50.0, 5.0), "large": (10.0, 1.0)})
    specs = config.load(tiny_models_toml).ladder_specs()
    records = [Record(id=str(i), prompt=PLAUSIBLE + text, reference=["yes"]) for i, text in enumerate(["A b.", "C d."])]
    reused = run_reuse(records, [3, 3], specs)
    # The fakes count a word a token: the second query shares the five words before "C".
    assert reused == {("1", s.name): 5 for s in specs}
    assert run_reuse(records, [3, 4], specs) == {}
    assert run_reuse(records, [3, 3], specs, unit="price") == {}

    def outcome(qid: str) -> Outcome:
        return Outcome(query_id=qid, prompt_sha256=qid, model="large", model_sha256="x", settings_key="k", source="run",
                       prompt_tokens=7, votes=[Vote("yes", 1, 0.1)])

    costs = CostModel.build([outcome("0"), outcome("1")], specs, reused=reused)
    assert costs.votes(outcome("0")) == pytest.approx([7 / 10 + 1.0])
    assert costs.votes(outcome("1")) == pytest.approx([2 / 10 + 1.0])
