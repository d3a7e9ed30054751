"""One ladder engine: the live cascade and the replay walk the same rungs with the same rule.

The live path draws votes from models (`escalate.LiveVotes`), the replay draws the votes the
outcome store recorded (`replay.RecordedVotes`); both go through `ladder.walk` and
`ladder.judge`. Here the same fake models answer both ways, and every step of every query
is compared field by field, for the agreement check and for the deferral check, whose top
rung used to take a majority live and the greedy answer in replay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from crecli import config, grading
from crecli.costs import CostModel
from crecli.errors import PromptTooLong
from crecli.ladder import AGREEMENT, DEFERRAL, GREEDY, Climb, Draw, Policy, Rung, Score, checking, judge, walk
from crecli.outcomes import OutcomeStore, collect
from crecli.quality import Deferral, DeferralCheck, QualityCheck, feature_names
from crecli.replay import Replay
from support.ladder import (LADDER, STARTS, SUMS, bare_router, sum_answer, sum_records, sum_signals, too_long_for,
                            walk_live)


@pytest.fixture
def both(tiny_models_toml: Path, fake_backends: Callable[..., Any], tmp_path: Path) -> tuple[Any, ...]:
    fake_backends({m: sum_answer(m) for m in LADDER}, signals=sum_signals)
    settings = config.load(tiny_models_toml)
    records = sum_records()
    quality = QualityCheck(k=5)
    with OutcomeStore(tmp_path / "store.sqlite") as store:
        found = collect(records, settings, store, quality)
    return settings, records, quality, found


@pytest.mark.parametrize("check", ["agreement", "deferral"])
def test_live_and_replay_take_the_same_steps(both: tuple[Any, ...], check: str) -> None:
    settings, records, quality, found = both
    router, thresholds, deferral = _router(check, quality)
    live = walk_live(router, settings, records)

    costs = CostModel.build(found.values(), settings.ladder_specs())
    replay = Replay.build(found, records, LADDER, costs)
    p_table = None
    if deferral is not None:
        p_table = {}
        for record in records:
            for model, rule in deferral.models.items():
                entry = replay.entries[(record.id, model)]
                p_table[(record.id, model)] = rule.p_correct(entry.features(1, router.prior(-1, model)))
    replayed = replay.simulate({r.id: s for r, s in zip(records, STARTS)}, thresholds, quality,
                               p_correct=p_table, votes=1).traces

    assert any(len(t.steps) > 1 for t in live), "some query must escalate for the test to mean anything"
    for trace, sim in zip(live, replayed):
        assert [s.model for s in trace.steps] == [s.model for s in sim.steps], trace.id
        for step, s in zip(trace.steps, sim.steps):
            assert (step.used, step.accepted, step.agreement) == (s.used, s.accept, s.agreement), (trace.id, step.model)
        assert grading.normalize(trace.answer, "numeric") == sim.answer
        assert trace.correct == sim.correct
    if deferral is not None:
        # The top rung answers greedily with one vote, whatever its threshold.
        tops = [t.steps[-1] for t in live if t.steps[-1].model == "large"]
        assert tops and all(s.used == 1 and s.accepted and s.why == "greedy answer of the top rung" for s in tops)


@pytest.mark.parametrize("check", ["agreement", "deferral"])
def test_a_rung_whose_context_a_prompt_does_not_fit_is_passed_over_live_and_in_replay(
    tiny_models_toml: Path, fake_backends: Callable[..., Any], tmp_path: Path, check: str
) -> None:
    # q0 does not fit small's context; q3 neither small's nor medium's; q4, which starts on
    # the top rung, not large's. Collecting stopped at the first with the backend's error.
    too_long = {"small": {SUMS[0], SUMS[3]}, "medium": {SUMS[3]}, "large": {SUMS[4]}}
    fake_backends({m: too_long_for(sum_answer(m), too_long[m]) for m in LADDER}, signals=sum_signals)
    settings = config.load(tiny_models_toml)
    records = sum_records()
    quality = QualityCheck(k=5)
    with OutcomeStore(tmp_path / "store.sqlite") as store:
        found = collect(records, settings, store, quality)
        # Not recorded: raising `context` in models.toml must take effect on the next run.
        assert store.count() == 3 * len(records) - 4
    assert {key for key, o in found.items() if o.source == "too_long"} == {
        ("q0", "small"), ("q3", "small"), ("q3", "medium"), ("q4", "large")}
    assert "shorten it or raise `context` in models.toml" in found[("q0", "small")].reason

    router, thresholds, deferral = _router(check, quality)
    costs = CostModel.build(found.values(), settings.ladder_specs())
    replay = Replay.build(found, records, LADDER, costs)
    p_table = None
    if deferral is not None:
        # As `deferral.deferral_p`: only an answer there is can be judged.
        p_table = {(r.id, m): rule.p_correct(e.features(1, router.prior(-1, m)))
                   for r in records for m, rule in deferral.models.items()
                   if (e := replay.entries[(r.id, m)]).answers}
    replayed = {t.query_id: t for t in replay.simulate({r.id: s for r, s in zip(records, STARTS)}, thresholds, quality,
                                                       p_correct=p_table, votes=1).traces}

    others = [r for r in records if r.id != "q4"]
    live = walk_live(router, settings, others, [s for r, s in zip(records, STARTS) if r.id != "q4"])
    for trace in live:
        sim = replayed[trace.id]
        assert [s.model for s in trace.steps] == [s.model for s in sim.steps], trace.id
        for step, s in zip(trace.steps, sim.steps):
            assert (step.used, step.accepted, step.agreement) == (s.used, s.accept, s.agreement), (trace.id, step.model)
        assert grading.normalize(trace.answer, "numeric") == sim.answer
        assert trace.correct == sim.correct
    assert [s.model for s in replayed["q0"].steps][:2] == ["small", "medium"]
    assert [s.model for s in replayed["q3"].steps] == ["small", "medium", "large"]
    assert [(s.used, s.cost) for s in replayed["q3"].steps[:2]] == [(0, 0.0), (0, 0.0)]  # no vote drawn, none paid
    assert replayed["q3"].correct  # large answers what the rungs below could not take
    # On the top rung nothing is above it: `cre ask` fails, and the replay counts it wrong, at no cost.
    with pytest.raises(PromptTooLong):
        walk_live(router, settings, [records[4]], ["large"])
    q4 = replayed["q4"]
    assert ([s.model for s in q4.steps], q4.correct, q4.cost, q4.answer) == (["large"], False, 0.0, "")


class _Scripted:
    """Votes from a list; records how many were drawn."""

    def __init__(self, votes: list[str], p: float = 0.5) -> None:
        self.votes, self.drawn, self.p = votes, 0, p

    def more(self, count: int) -> list[str]:
        out = self.votes[self.drawn : self.drawn + count]
        self.drawn += len(out)
        return out

    def p_correct(self, rung: Rung, answers: Any) -> float:
        return self.p


def test_judge_draws_only_the_votes_the_decision_needs() -> None:
    agree = Rung("m", AGREEMENT, 0.6, False, k=5)
    votes = _Scripted(["4", "4", "4", "5", "5"])
    v = judge(agree, votes)
    assert (v.accept, v.kept, v.used, votes.drawn, v.answer) == (True, True, 3, 3, "4")
    split = _Scripted(["4", "5", "6", "7", "4"])
    v = judge(agree, split)
    assert (v.accept, v.kept, split.drawn) == (False, False, 4)  # after 4, no answer can reach 3 of 5
    top = Rung("m", AGREEMENT, 0.6, True, k=5)
    v = judge(top, _Scripted(["4", "5", "6", "4", "5"]))
    assert v.accept and not v.kept  # the top rung's answer is final even when unsure
    defer = Rung("m", DEFERRAL, 0.5, False, votes=1)
    assert judge(defer, _Scripted(["4"], p=0.7)).kept and not judge(defer, _Scripted([""], p=0.9)).kept
    greedy = judge(Rung("m", GREEDY, 0.9, True), _Scripted(["", "4"]))
    assert greedy.accept and greedy.used == 1 and greedy.answer == ""


def _converse(rung: Rung, script: list[str], p: float | None = 0.5) -> tuple[list[object], object]:
    """Drive `rung`'s check by hand: what it asked for, in order, and its verdict."""
    check, asked, drawn = checking(rung), [], 0
    need = next(check)
    try:
        while True:
            asked.append(need)
            if isinstance(need, Draw):
                got: object = script[drawn : drawn + need.count]
                drawn += need.count
            else:
                got = p
            need = check.send(got)
    except StopIteration as finished:
        return asked, finished.value


def test_a_check_asks_for_votes_and_draws_none_itself() -> None:
    # The decision is a conversation: it asks for waves of votes and for P(correct), and
    # decides on what it is sent, so `walk` is the one place votes are drawn.
    agree = Rung("m", AGREEMENT, 0.6, False, k=5)
    script = ["4", "4", "4", "5", "5"]
    asked, verdict = _converse(agree, script)
    assert all(isinstance(a, Draw) for a in asked) and asked[0] == Draw(1)
    assert sum(a.count for a in asked) == verdict.used == 3  # type: ignore[attr-defined]
    assert verdict == judge(agree, _Scripted(script))
    defer = Rung("m", DEFERRAL, 0.5, False, votes=2, deferral=None)
    asked, verdict = _converse(defer, ["4", "4"], p=0.7)
    assert asked == [Draw(1), Draw(1), Score(("4", "4"))] and verdict.kept and verdict.p_correct == 0.7
    # No P(correct) for the answer: the agreement check decides, asking for more votes.
    asked, verdict = _converse(defer, ["4", "4", "4", "4", "4"], p=None)
    assert asked[:3] == [Draw(1), Draw(1), Score(("4", "4"))] and verdict.check == AGREEMENT
    with pytest.raises(KeyError):
        next(checking(Rung("m", AGREEMENT, float("nan"), False)))


def test_walk_stops_before_a_rung_when_told() -> None:
    policy = Policy(tuple(LADDER), {"small": 0.6, "medium": 0.6, "large": 0.0}, QualityCheck(k=5))
    scripts = {"small": ["1", "2", "3", "4", "5"], "medium": ["7", "7", "7"], "large": ["9"]}
    climb = walk(Climb(policy.rungs(), 0), lambda rung: _Scripted(scripts[rung.model]), stop=lambda: True)
    assert climb.verdicts == [] and not climb.done
    judged: list[str] = []
    climb = walk(Climb(policy.rungs(), 0), lambda rung: _Scripted(scripts[rung.model]),
                 lambda rung, verdict, votes: judged.append(rung.model), stop=lambda: len(judged) >= 1)
    assert judged == ["small"] and climb.rung == 1 and not climb.done
    walk(climb, lambda rung: _Scripted(scripts[rung.model]), steps=1)
    assert climb.done and [v.answer for _, v in climb.verdicts] == ["1", "7"]


def test_walk_climbs_until_a_rung_keeps_its_answer() -> None:
    policy = Policy(tuple(LADDER), {"small": 0.6, "medium": 0.6, "large": 0.0}, QualityCheck(k=5))
    climb = Climb(policy.rungs(), 0)
    scripts = {"small": ["1", "2", "3", "4", "5"], "medium": ["7", "7", "7"], "large": ["9"]}
    seen: list[str] = []
    walk(climb, lambda rung: _Scripted(scripts[rung.model]), lambda rung, verdict, votes: seen.append(rung.model))
    assert seen == ["small", "medium"] and climb.done and climb.rung == 1
    assert [v.answer for _, v in climb.verdicts] == ["1", "7"]


def _router(check: str, quality: Any) -> tuple[Any, dict[str, float], DeferralCheck | None]:
    """A bare router of the three fake rungs for `check`, its thresholds and its deferral
    check (None for agreement). A top threshold above 0: a
    deferral router's top rung then decided by majority live and by its greedy answer in
    replay; the engine gives it one rule."""
    thresholds = {"small": 0.6, "medium": 0.6, "large": 0.8}
    deferral = None
    if check == "deferral":
        names = feature_names(1)
        rule = Deferral(names, (2.0, 3.0, 0.0, -4.0, 1.0), 0.5, (0.0,) * len(names), 0.6)
        deferral = DeferralCheck(1, {"small": rule, "medium": rule})
        thresholds = {"small": 0.55, "medium": 0.45, "large": 0.8}
    return bare_router(quality, thresholds, deferral), thresholds, deferral
