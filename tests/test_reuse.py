"""Prompt starts a run's prompts share, which llama.cpp keeps in its cache: the rule
(`costs.previous_prompts`), their price (`Pricing.price_votes`), their counts (`TokenCounts`),
and the replay that prices a log as `cre batch` would answer it (`replay.run_reuse`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from crecli import config
from crecli.costs import CostModel, Pricing, TokenCounts, previous_prompts
from crecli.errors import CreError
from crecli.models.bench import Rates
from crecli.outcomes import Outcome, Vote
from crecli.querylog import Record
from crecli.replay import run_reuse

PLAUSIBLE = "Is the following sentence plausible? "


def test_a_prompt_follows_the_previous_prompt_of_its_cluster_only() -> None:
    prompts = [PLAUSIBLE + "Messi kicked a goal.", "What is 7 plus 5?", PLAUSIBLE + "Brady shot a three.",
               "What is 8 plus 9?", PLAUSIBLE + "Messi kicked a goal."]
    assert previous_prompts(prompts, [1, 2, 1, 2, 1]) == ["", "", prompts[0], prompts[1], prompts[2]]
    assert previous_prompts(prompts[:3], [1, 2, 3]) == ["", "", ""]


def test_each_chunk_starts_afresh_as_cre_batch_takes_its_lines() -> None:
    prompts = [PLAUSIBLE + "A.", PLAUSIBLE + "B.", PLAUSIBLE + "C.", PLAUSIBLE + "D."]
    assert previous_prompts(prompts, [0] * 4, chunk=2) == ["", prompts[0], "", prompts[2]]
    assert previous_prompts(prompts, [0] * 4, chunk=4) == ["", *prompts[:3]]
    assert previous_prompts(prompts, [0] * 4, chunk=None) == ["", *prompts[:3]]


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



def test_a_remote_rungs_every_vote_pays_its_prompt_a_local_rungs_only_its_first() -> None:
    """Each vote of a remote rung is a request of its own: a provider bills its prompt each
    time. Priced once, a k=5 agreement rung on a paid API looked a fifth as dear as it is."""
    local = config.ModelSpec(name="local", path="m.gguf", price_per_1k_tokens=1000.0)
    remote = config.ModelSpec(name="remote", url="http://127.0.0.1:9/v1", api_model="m", price_per_1k_tokens=1000.0)
    pricing = Pricing.for_models([local, remote])
    assert pricing.unit == "price"
    assert pricing.price_votes("local", 60, [10, 4, 4], [0.0] * 3) == pytest.approx([70.0, 4.0, 4.0])
    assert pricing.price_votes("remote", 60, [10, 4, 4], [0.0] * 3) == pytest.approx([70.0, 64.0, 64.0])
    # The replay's prices (`CostModel`) are the same rule: calibration sees what the bill says.
    outcome = Outcome(query_id="q", prompt_sha256="p", model="remote", model_sha256="", settings_key="k",
                      source="run", prompt_tokens=60, votes=[Vote("a", 10, 0.0), Vote("a", 4, 0.0)])
    assert CostModel.build([outcome], [local, remote]).votes(outcome) == pytest.approx([70.0, 64.0])
    # Measured seconds are what they are.
    assert Pricing("seconds", {}, remote=frozenset({"remote"})).price_votes("remote", 60, [10, 4], [2.0, 1.0]) == [2.0, 1.0]


class Words:
    """A backend's tokenizer, a word a token."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.asked = fail, 0

    def text_tokens(self, text: str) -> list[str] | None:
        self.asked += 1
        if self.fail:
            raise CreError("no vocabulary here")
        return text.split()


def test_prompts_share_the_common_start_of_their_tokens_tokenized_once() -> None:
    ok, broken = Words(), Words(fail=True)
    counts = TokenCounts(lambda model: ok if model == "ok" else broken)
    a, b = PLAUSIBLE + "Messi kicked a goal.", PLAUSIBLE + "Messi shot a three."
    assert counts.shared("ok", a, b) == 6 and counts.shared("ok", b, a) == 6 and ok.asked == 2
    # A prompt held whole shares all of it (`Pricing.price_votes` still evaluates one token).
    assert counts.shared("ok", a, a) == 9
    assert counts.shared("broken", a, b) == 0 and counts.shared("ok", "", b) == 0
    ids, prompts = ["a", "b", "c"], [a, b, "Other."]
    assert counts.of_run(ids, prompts, [0, 0, 0], ["ok", "broken"]) == {("b", "ok"): 6}


def test_token_counts_keep_a_bounded_number_of_tokenized_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cre batch` reads a stream of any length: what it keeps must not grow with it.
    monkeypatch.setattr(TokenCounts, "TOKENIZED", 4)
    words = Words()
    counts = TokenCounts(lambda model: words)
    for i in range(10):
        counts.shared("m", f"q {i}", f"q {i + 1}")
    assert len(counts._tokens) == 4


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


def test_a_prompt_after_answered_examples_pays_neither_them_nor_its_shared_start() -> None:
    bench = Pricing("bench-seconds", {}, {"m": Rates(100.0, 10.0, 0.5)}, {"m": 10})
    # 100 prompt tokens: a 10-token head, 40 of examples (priced apart), 30 shared: 20 paid.
    assert bench.price_votes("m", 100, [0], [0.0], prefix_tokens=40, reused_tokens=30) == pytest.approx([0.5 + 0.2])


def test_a_runtime_that_cannot_tokenize_pays_in_full() -> None:
    from crecli.models.backend import Backend

    class Remote:  # a remote rung's backend: the base class's answer
        text_tokens = Backend.text_tokens

    counts = TokenCounts(lambda model: Remote())  # type: ignore[arg-type,return-value]
    assert counts.shared("remote", PLAUSIBLE + "A.", PLAUSIBLE + "B.") == 0


def test_chunks_start_where_the_batchs_lines_do_when_rows_were_left_out() -> None:
    # Lines 1, 2 and 66 are left: 66 is in the second chunk of 64 lines, not after line 2.
    prompts = [PLAUSIBLE + "A.", PLAUSIBLE + "B.", PLAUSIBLE + "C."]
    assert previous_prompts(prompts, [0] * 3) == ["", prompts[0], prompts[1]]
    assert previous_prompts(prompts, [0] * 3, lines=[1, 2, 66]) == ["", prompts[0], ""]
    records = [Record(id=str(i), prompt=p, source=f"log.jsonl:{line}") for i, (p, line) in enumerate(zip(prompts, [1, 2, 66]))]
    from crecli.replay import _lines

    assert _lines(records) == [1, 2, 66]
    assert _lines([Record(id="x", prompt="p")]) is None


def test_a_long_prompt_is_compared_on_its_first_characters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TokenCounts, "COMPARED", 20)
    seen: list[str] = []

    class Chars:
        def text_tokens(self, text: str) -> list[str]:
            seen.append(text)
            return list(text)

    counts = TokenCounts(lambda model: Chars())  # type: ignore[arg-type,return-value]
    long = "x" * 1000
    # Cut at 20 characters, the 20th may be a longer token's start: 19 are counted.
    assert counts.shared("m", long, long + "y") == 19
    assert max(len(text) for text in seen) == 20


def test_a_run_priced_at_once_frees_what_it_shares_on_both_sides(
    tiny_models_toml: Path, fake_backends: Callable[..., Any], bench_speeds: Callable[..., None]
) -> None:
    from crecli.escalate import Cascade
    from crecli.route import RouteDecision
    from crecli.routerfile import SCHEMA_VERSION, FitRecord, LadderEntry, RouterFile
    from crecli.quality import QualityCheck

    fake_backends({"large": lambda text, p: "yes"})
    bench_speeds({"small": (400.0, 40.0), "medium": (100.0, 20.0), "large": (50.0, 10.0)})
    router = RouterFile(
        schema_version=SCHEMA_VERSION, ladder=[LadderEntry(m, None, None) for m in ("small", "medium", "large")],
        embedder=None, assigner=None, clusters=[], fallback_model="large",  # type: ignore[arg-type]
        budget={"kind": "retain", "value": 0.98}, quality=QualityCheck(k=1),
        thresholds={"small": 0.0, "medium": 0.6, "large": 0.0}, fit=FitRecord(),
    )
    prompts = [PLAUSIBLE + "Messi kicked a goal.", PLAUSIBLE + "Brady shot a three."]
    with Cascade(router, config.load(tiny_models_toml)) as cascade:
        traces = []
        for prompt in prompts:
            pending = cascade.begin(prompt, None, decision=RouteDecision(-1, "large", 0.0, "test", 0.0))
            while not cascade.advance(pending):
                pass
            traces.append(pending.trace)
        run = cascade.cost_of_run(traces, prompts)
        # The strongest answered both: its estimate is its own answers, priced alike.
        assert cascade.strongest_cost_of_run(traces, prompts) == run
        alone = cascade.cost_of_run(traces)
        assert run[0] == alone[0] and run[1] == pytest.approx(alone[1] - 5 / 50.0)  # five words shared


def test_a_live_step_pays_a_remote_rungs_prompt_once_a_vote_as_the_replay_does() -> None:
    """`cre ask`, `cre batch` and `cre serve` price a step as one figure: a remote rung's
    three agreement votes were charged its prompt once, where calibration charged it three times."""
    from crecli.costs import step_parts
    from crecli.trace import Step

    pricing = Pricing("price", {"remote": 1000.0, "local": 1000.0}, remote=frozenset({"remote"}))

    def step(model: str) -> Step:
        return Step(model=model, votes=["4"] * 3, normalized=["4"] * 3, agreement=1.0, used=3, threshold=0.6,
                    accepted=True, answer="4", prompt_tokens=60, output_tokens=3, greedy_output_tokens=1,
                    seconds=0.3, why="")

    assert step_parts(pricing, 0, [step("remote")])[0] == pytest.approx(sum(pricing.price_votes("remote", 60, [1, 1, 1], [0.1] * 3)))
    assert step_parts(pricing, 0, [step("remote")])[0] == pytest.approx(3 * 60 + 3)
    assert step_parts(pricing, 0, [step("local")])[0] == pytest.approx(60 + 3)


def test_a_rung_passed_over_costs_nothing_live_as_in_the_replay() -> None:
    """A pass-over step (no vote drawn) carried the seconds its model took to load or its lease
    to come, which the "seconds" unit charged; the replay prices a too-long outcome at 0."""
    from crecli.costs import step_parts
    from crecli.trace import Step

    passed = Step(model="small", votes=[], normalized=[], agreement=0.0, used=0, threshold=0.0, accepted=False,
                  answer="", prompt_tokens=0, output_tokens=0, greedy_output_tokens=0, seconds=2.5, why="too long")
    answered = Step(model="large", votes=["4"], normalized=["4"], agreement=1.0, used=1, threshold=0.0,
                    accepted=True, answer="4", prompt_tokens=60, output_tokens=1, greedy_output_tokens=1,
                    seconds=0.5, why="")
    assert step_parts(Pricing("seconds", {}), 0, [passed, answered])[0] == pytest.approx(0.5)
    assert step_parts(Pricing("seconds", {}), 0, [passed, answered])[1] == [("", 0.0), ("", 0.0)]
