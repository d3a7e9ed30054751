"""A greedy choice answer ends at its option letter (`GenParams.option_letters`).

Issue 24: an answer's decode steps are a third of a rung's cost here, and on a choice
question the letter decides the grade. The 1.5B writes "(B" as one token, then ")" and the
end of its turn: two decode steps for nothing graded. It now ends once "(B" is out, before
that token is fed, where the prompt offers "(B)" as an option. The live cascade, the parallel
path and the recorded votes follow the same rule (`grading.option_letters`,
`grading.decided_option`); the real-model check is in test_real_parallel.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from crecli import config, grading
from crecli.config import ModelSpec
from crecli.escalate import Cascade, check
from crecli.models.backend import Generation, GenParams
from crecli.outcomes import OutcomeStore, Vote, collect, prompt_sha256, settings_key
from crecli.quality import QualityCheck
from crecli.querylog import Record
from crecli.route import RouteDecision
from crecli.trace import Trace
from support.routers import make_router

CHOICE = "Which of these is a fruit?\n(A) stone\n(B) apple\n(C) chair"


@pytest.mark.parametrize("match, prompt, letters", [
    ("choice", CHOICE, "ABC"),
    ("choice", "Pick one: (b) or (a)?", "ab"),
    ("choice", "Is a tomato a fruit? Answer yes or no.", ""),  # no options offered: no early end
    ("numeric", CHOICE, ""),
    ("exact", CHOICE, ""),
    (None, CHOICE, ""),
])
def test_only_a_choice_prompts_offered_letters_end_an_answer(match: str | None, prompt: str, letters: str) -> None:
    assert grading.option_letters(match, prompt) == letters


@pytest.mark.parametrize("text, decided", [
    ("(B", "(B)"),
    ("(B)", "(B)"),
    (" (B", " (B)"),
    ("\n(C)", "\n(C)"),
    ("", None),
    (" (", None),
    ("(D", None),  # not an option of the prompt
    ("(Be", None),
    ("(B) ", None),  # past the opening: a decode that would have ended sooner
    ("B", None),  # a bare letter may begin a word ("B because" is no option)
    ("Answer: (B", None),
])
def test_an_answer_is_decided_by_its_opening_option_alone(text: str, decided: str | None) -> None:
    assert grading.decided_option(text, "ABC") == decided
    assert grading.decided_option(text, "") is None
    if decided is not None:
        # The ended answer grades as the letter it opened with.
        assert grading.normalize(decided, "choice") == text.strip().strip("()")


# ---------------------------------------------------------------- the llama.cpp backend


def _generate(answer: Sequence[bytes | int], params: GenParams, stream: bool = False) -> tuple[Generation, list[str]]:
    from crecli.models.llama import LlamaBackend
    from support.fake_llama import FakeLlama

    pytest.importorskip("llama_cpp")
    backend = LlamaBackend(ModelSpec(name="fake", context=8192))
    backend._llm = FakeLlama(answer)
    pieces: list[str] = []
    if stream:
        return backend.generate_streaming(CHOICE, params, pieces.append), pieces
    return backend.generate(CHOICE, params), pieces


def test_the_token_that_decides_an_option_is_never_fed() -> None:
    from support.fake_llama import EOS

    # A chat model's "(B" token: ended before any decode step.
    gen, _ = _generate([b"(B", b")", EOS], GenParams(max_tokens=8, option_letters="ABC"))
    assert (gen.text, gen.output_tokens, gen.finish_reason) == ("(B)", 0, "stop")
    # A base model's " (" then "B": one step, for " (".
    gen, _ = _generate([b" (", b"B", b")", b"\n", b"Q"], GenParams(max_tokens=8, option_letters="ABC", stop=("\n",)))
    assert (gen.text, gen.output_tokens) == (" (B)", 1)
    # Written on as before: without the rule, where the letter is not offered, and for a sampled vote.
    for params in (GenParams(max_tokens=8), GenParams(max_tokens=8, option_letters="AC"),
                   GenParams(max_tokens=8, option_letters="ABC", temperature=0.7)):
        gen, _ = _generate([b"(B", b") because", EOS], params)
        assert (gen.text, gen.output_tokens) == ("(B) because", 2)


def test_a_streamed_ended_answer_hands_on_the_text_it_returns() -> None:
    from support.fake_llama import EOS

    gen, pieces = _generate([b" (", b"B", b")", EOS], GenParams(max_tokens=8, option_letters="ABC"), stream=True)
    assert "".join(pieces) == gen.text == " (B)"


# ---------------------------------------------------------------- recorded and live votes alike


@pytest.fixture
def settings(tiny_models_toml: Path) -> config.ModelConfig:
    return config.load(tiny_models_toml)


def test_recorded_and_live_greedy_votes_end_at_the_prompts_options(settings, tmp_path, fake_backends) -> None:
    quality = QualityCheck(k=3)
    record = Record(id="q1", prompt=CHOICE, reference=["B"], match="choice")
    created = fake_backends({"small": lambda text, p: "(B) because apples grow on trees"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        outcome = collect([record], settings, store, quality, models=["small"])[("q1", "small")]
    assert outcome.settings_key == settings_key(quality, grading.max_tokens_for("choice"), "ABC", text_stops=True)
    assert "-o" in outcome.settings_key
    recorded = [p for _, p in created["small"].calls]
    # The greedy vote ends at the letter; the sampled votes write on, as before.
    assert [p.option_letters for p in recorded] == ["ABC", "", ""]
    assert [v.text for v in outcome.votes] == ["(B)"] + ["(B) because apples grow on trees"] * 2
    assert outcome.votes[0].output_tokens == 0

    live = created["small"]
    live.calls.clear()
    check(live, CHOICE, quality, 1.0, grading.max_tokens_for("choice"), "choice")
    assert [p for _, p in live.calls] == recorded

    # The cascade resolves the same letters for the prompt and its answer type.
    with Cascade(make_router(), settings) as cascade:
        pending = cascade.begin(CHOICE, "choice", decision=RouteDecision(-1, "small", 0.0, "test", 0.0))
        assert {r.option_letters for r in pending.climb.rungs} == {"ABC"}
        assert {r.option_letters for r in cascade.begin(CHOICE, "numeric").climb.rungs} == {""}


CHOSEN = Record(id="q1", prompt=CHOICE, reference=["B"], match="choice")
K3 = QualityCheck(k=3)


def _recorded_before_the_rule(store: OutcomeStore, texts: Sequence[str], model: str = "medium") -> list[Vote]:
    """CHOSEN's k = 3 votes on `model`, stored as a fit before the rule stored them: under the
    key without "-o", the greedy vote written on past its letter. "medium" is chatml, whose
    keys never carry "-s" (it ends at its end-of-generation token), so only this rule tells
    them from a new recording; a completion rung's ("small") old key lacks "-s" too."""
    votes = [Vote(text, 2, 0.01, None) for text in texts]
    store.put(prompt_sha256(CHOSEN.prompt), model, "", settings_key(K3, grading.max_tokens_for("choice")), 12, votes)
    return votes


def test_votes_recorded_before_the_rule_keep_their_sampled_votes(settings, tmp_path, fake_backends) -> None:
    created = fake_backends({"medium": lambda text, p: "(B) because"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        _recorded_before_the_rule(store, ["(B) because", "(A) since", "(B) as"])
        outcome = collect([CHOSEN], settings, store, K3, models=["medium"])[("q1", "medium")]
    # Only the greedy vote ran again; the sampled ones were kept.
    assert [p.temperature for _, p in created["medium"].calls] == [0.0]
    assert [v.text for v in outcome.votes] == ["(B)", "(A) since", "(B) as"]


def test_a_completion_rungs_votes_recorded_before_both_rules_all_run_again(settings, tmp_path, fake_backends) -> None:
    # Before "-o" and "-s": each vote that ended on the newline stop counted a token never
    # fed, sampled ones too, so none is kept (`tokens.decoded_output`).
    created = fake_backends({"small": lambda text, p: "(B) because"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        _recorded_before_the_rule(store, ["(B) because", "(A) since", "(B) as"], model="small")
        outcome = collect([CHOSEN], settings, store, K3, models=["small"])[("q1", "small")]
    assert [p.temperature > 0 for _, p in created["small"].calls] == [False, True, True]
    assert outcome.settings_key == settings_key(K3, grading.max_tokens_for("choice"), "ABC", text_stops=True)
    assert outcome.votes[0].text == "(B)"


# ---------------------------------------------------------------- remote rungs write on


def test_a_remote_rung_is_asked_recorded_and_estimated_without_the_rule(settings, tmp_path, fake_backends) -> None:
    from dataclasses import replace

    from crecli.models.backend import Backend

    remote = replace(settings.models["small"], url="http://127.0.0.1:9/v1", prompt_format="chatml")
    settings.models["small"] = remote
    assert remote.backend == "openai"
    record = Record(id="q1", prompt=CHOICE, reference=["B"], match="choice")
    created = fake_backends({"small": lambda text, p: "(B) because", "medium": lambda text, p: "Apple, so (B)"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        outcome = collect([record], settings, store, QualityCheck(k=1), models=["small"])[("q1", "small")]
    # Its server decodes its own way: no letters asked, no "-o" key (old recordings still count).
    assert [p.option_letters for _, p in created["small"].calls] == [""]
    assert outcome.settings_key == settings_key(QualityCheck(k=1), grading.max_tokens_for("choice"))
    assert outcome.votes[0].text == "(B) because"
    with Cascade(make_router(), settings) as cascade:
        pending = cascade.begin(CHOICE, "choice", decision=RouteDecision(-1, "small", 0.0, "test", 0.0))
        assert {r.model: r.option_letters for r in pending.climb.rungs} == {"small": "", "medium": "ABC", "large": "ABC"}

        # A strongest rung that cannot count its tokens without running is estimated from the
        # answering rung's counts: in process (a counter that gives None), and remote, where
        # it writes on (`cre batch` crashed on both: None - 1).
        trace = _answered(cascade, "medium")
        assert trace.answer == "Apple, so (B)"  # an option answer, which the strongest would end
        class CannotCount(Backend):  # the base class's counts: None, as a runtime that cannot tell
            def complete(self, rendered: object, params: GenParams) -> Generation:
                raise AssertionError("an estimate runs no model")

        cascade._counter = lambda model: CannotCount(cascade.specs[model])  # type: ignore[method-assign]
        for large in (settings.models["large"],
                      replace(settings.models["large"], url="http://127.0.0.1:9/v1", prompt_format="chatml")):
            cascade.specs["large"] = large
            prompt, _, output = cascade.strongest_tokens(trace, CHOICE)
            assert prompt is not None and output == trace.steps[-1].greedy_output_tokens


def _answered(cascade: Cascade, start: str) -> Trace:
    pending = cascade.begin(CHOICE, "choice", decision=RouteDecision(-1, start, 0.0, "test", 0.0))
    while not cascade.advance(pending):
        pass
    return pending.trace


def test_a_recording_made_meanwhile_without_signals_counts_as_done(settings, tmp_path, fake_backends) -> None:
    # A greedy vote re-run only because it was recorded before the rule is done once any
    # "-o" recording of it exists, signals or not (a server that gives none, say).
    created = fake_backends({"medium": lambda text, p: "(B) because"})
    with OutcomeStore(tmp_path / "outcomes.sqlite") as store:
        votes = _recorded_before_the_rule(store, ["(B) because"] * 3)
        new = settings_key(K3, grading.max_tokens_for("choice"), "ABC")
        meanwhile = [Vote("(B)", 0, 0.01, None)] + votes[1:]
        running = store.running_models

        @contextmanager
        def another_command_recorded_it_first() -> Iterator[None]:
            # Between this command's look at the store and its run, under the store's lock.
            store.put(prompt_sha256(CHOSEN.prompt), "medium", "", new, 12, meanwhile)
            with running():
                yield

        store.running_models = another_command_recorded_it_first  # type: ignore[method-assign]
        outcome = collect([CHOSEN], settings, store, K3, models=["medium"])[("q1", "medium")]
    assert "medium" not in created  # nothing ran: the model was never even loaded
    assert [v.text for v in outcome.votes] == ["(B)", "(B) because", "(B) because"]
