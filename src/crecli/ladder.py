"""The ladder engine: a query's walk up the ladder, one rung at a time, live or replayed.

A query starts on the rung its route chose. On each rung the rung's check draws votes from
a source and decides by the shared rules of `quality`: keep the answer, or move up; the top
rung's answer is final. Two sources drive the same engine:

- the live cascade (`escalate.Cascade`) draws votes from a model backend (`escalate.LiveVotes`);
- the replay (`replay.Replay`, for `cre calibrate`, `cre eval` and the benches) draws the
  votes the outcome store recorded (`replay.RecordedVotes`).

So whatever rule a rung follows, the top rung included, the replay and the live path cannot
disagree: `checking` is the one decision and `walk` the one loop, and the one place a
check's votes are drawn (`cre batch` walks many prompts one rung at a time). Each rung's
policy (`Rung`: model, check, threshold, votes, deferral model, prior) is resolved once per
query (`Policy.rungs`), and a trace is priced once at the end (`costs`).

The checks:
- "agreement": self-consistency. Vote 0 is greedy; sampled votes come in waves
  (`quality.wave`, exactly the votes drawing one at a time would draw) until
  `quality.done`; `quality.decide` keeps the majority when its share reaches the threshold.
- "deferral": `votes` votes (the greedy one first); the greedy answer is kept when the
  rung's P(correct) reaches the threshold and the answer is not empty
  (`quality.accept_deferral`). When the rung's deferral model weighs log-probabilities and
  the answer came without them (`quality.judge_deferral` gives None: a server that returns
  none), the rung runs the agreement check instead, on k votes at `Rung.fallback`, and its
  verdict says so (`Verdict.check`): never a P(correct) made up from training means.
- "greedy": the greedy answer, kept: the top rung of a router with the deferral check.

A deferral router's rungs whose runtime gives no log-probabilities at all are calibrated as
agreement rungs from the start (`Policy.agreement_rungs`, `cre calibrate` says which).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Generator, Mapping, Protocol, Sequence

from crecli.quality import DEFAULT_THRESHOLD, accept_deferral, decide, done, first_vote_decides, greedy_agreement, wave

if TYPE_CHECKING:
    from crecli.quality import Deferral, QualityCheck

AGREEMENT, DEFERRAL, GREEDY = "agreement", "deferral", "greedy"


@dataclass(frozen=True)
class Rung:
    """One rung's policy for one query."""

    model: str
    check: str  # AGREEMENT, DEFERRAL or GREEDY
    threshold: float
    top: bool
    k: int = 1  # agreement: votes at most
    early_stop: bool = True  # agreement: stop once more votes cannot change the decision
    votes: int = 1  # deferral: votes drawn (1: the greedy answer alone)
    deferral: "Deferral | None" = None  # deferral: the rung's P(correct) model
    prior: float = 0.5  # deferral: the query's cluster prior for this model
    # deferral: the agreement threshold (on k votes) for an answer its model cannot judge
    fallback: float = DEFAULT_THRESHOLD
    # What the rung's model is shown and may write: its cluster's answered examples and the
    # answer type's token cap. A live source uses them; recorded votes already reflect them.
    shots: tuple[tuple[str, str], ...] = ()
    max_tokens: int = 0
    # The option letters at which its greedy answer ends (`registry.option_letters_for`; ""
    # for a model that writes on, a remote rung's).
    option_letters: str = ""


@dataclass(frozen=True)
class Verdict:
    """What a rung's check decided."""

    used: int  # votes drawn
    agreement: float  # majority share (agreement); share agreeing with the greedy answer (deferral)
    accept: bool  # the rung keeps the answer (always true on the top rung: its answer is final)
    index: int  # the vote whose text is the answer
    answer: str  # the normalised answer
    p_correct: float | None = None  # deferral only
    kept: bool = False  # the check itself passed (`accept` also holds on the top rung when it did not)
    # The check that decided: the rung's own, or AGREEMENT for a deferral rung whose answer
    # came without the log-probabilities its model reads.
    check: str = ""


class Votes(Protocol):
    """A rung's votes for one query, drawn on demand (greedy first)."""

    def more(self, count: int) -> Sequence[str]:
        """The next `count` votes, normalised."""

    def p_correct(self, rung: Rung, answers: Sequence[str]) -> float | None:
        """The rung's P(correct) for its greedy answer, given the votes drawn; None when its
        deferral model cannot judge it (`quality.judge_deferral`)."""


@dataclass(frozen=True)
class Draw:
    """What a check asks its source for next: `count` more votes."""

    count: int


@dataclass(frozen=True)
class Score:
    """What a check asks its source for next: the rung's P(correct) for the greedy answer,
    given the votes drawn so far (`Votes.p_correct`)."""

    answers: tuple[str, ...]


# A check's conversation with its source: it yields what it needs (`Draw`, `Score`), is sent
# the answer (the new votes; the P(correct) or None), and returns its `Verdict`.
Checking = Generator["Draw | Score", Any, Verdict]


def checking(rung: Rung) -> Checking:
    """`rung`'s check, the one decision of the live cascade and the replay, as a conversation
    with its votes' source (`walk` holds the other end).

    It draws no vote itself: it asks for each wave it needs and decides on what it is sent,
    so the decision stays a pure function of the votes while the source decides how they
    come (a model, a server, a record), and `walk` is the one place that draws them."""
    if math.isnan(rung.threshold):
        raise KeyError(f"no threshold for {rung.model!r}")
    answers = list((yield Draw(1)))
    if rung.check == GREEDY:
        return Verdict(1, 1.0, True, 0, answers[0], kept=True, check=GREEDY)
    threshold = rung.threshold
    if rung.check == DEFERRAL:
        if rung.votes > 1:
            answers += yield Draw(rung.votes - 1)
        p = yield Score(tuple(answers))
        if p is not None:
            kept = accept_deferral(p, rung.threshold, answers[0])
            return Verdict(len(answers), greedy_agreement(answers), kept or rung.top, 0, answers[0], p, kept, DEFERRAL)
        # No log-probabilities where the model reads them: self-consistency decides instead.
        threshold = rung.fallback
    # The agreement check at `threshold` on up to `rung.k` votes, waves drawn as needed.
    while not done(answers, rung.k, threshold, rung.early_stop):
        more = yield Draw(wave(answers, rung.k, threshold, rung.early_stop))
        if not more:  # a record with fewer votes than k: decide on those there are
            break
        answers += more
    d = decide(answers, rung.k, threshold, rung.early_stop)
    return Verdict(d.used, d.agreement, d.accept or rung.top, d.index, d.answer, None, d.accept, AGREEMENT)


def judge(rung: Rung, votes: Votes) -> Verdict:
    """Run `rung`'s check on `votes` alone (a one-rung `walk`): for tests and one-rung benches."""
    return walk(Climb([rung], 0), lambda _: votes, steps=1).verdicts[0][1]


def streams_final(rung: Rung) -> bool:
    """Whether the rung's greedy answer is the final answer while it is being generated, so
    it may be streamed, and nothing sent is ever taken back: the top rung answering greedily
    (a deferral router's top), or an agreement top rung whose first vote decides whatever it
    says (`quality.first_vote_decides`: threshold 0 with early stopping, or k = 1). One whose
    threshold one vote meets (0 < threshold <= 1/k) does not stream: its greedy answer may
    turn out empty ("I think the sum is", no number) and be outvoted by the votes drawn after it."""
    return rung.top and (rung.check == GREEDY or (
        rung.check == AGREEMENT and first_vote_decides(rung.k, rung.threshold, rung.early_stop)))


@dataclass
class Climb:
    """A query partway up the ladder: its rungs' policies, where it stands, what each rung decided."""

    rungs: list[Rung]
    rung: int  # the index of the current rung in `rungs`
    verdicts: list[tuple[Rung, Verdict]] = field(default_factory=list)
    done: bool = False

    @property
    def current(self) -> Rung:
        return self.rungs[self.rung]

    def settle(self, rung: Rung, verdict: Verdict) -> None:
        """Record the current rung's verdict, then stop there or move up."""
        self.verdicts.append((rung, verdict))
        if verdict.accept:
            self.done = True
        else:
            self.rung += 1


def walk(
    climb: Climb,
    votes_for: Callable[[Rung], Votes],
    after: Callable[[Rung, Verdict, Votes], None] | None = None,
    hold: Callable[[Rung], ContextManager[object]] | None = None,
    steps: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> Climb:
    """Judge rung after rung (`checking`) until the answer is final, for at most `steps`
    rungs (`cre batch` moves many prompts one rung at a time), or until `stop()` holds before
    a rung (`cre serve`: the request gave up). Each rung's votes come from `votes_for(rung)`;
    `after(rung, verdict, votes)` sees each rung once it is judged. `hold(rung)`, when given,
    is held while a rung's votes are drawn and judged (the live cascade holds the rung's
    model there, `registry.ModelPool.lease`).

    This is the one loop of the ladder, and the one place a check's votes are drawn."""
    taken = 0
    while not climb.done and (steps is None or taken < steps) and not (stop is not None and stop()):
        taken += 1
        rung = climb.current
        with hold(rung) if hold is not None else nullcontext():
            votes = votes_for(rung)
            check = checking(rung)
            try:
                need = next(check)
                while True:
                    got = votes.more(need.count) if isinstance(need, Draw) else votes.p_correct(rung, need.answers)
                    need = check.send(got)
            except StopIteration as finished:
                verdict: Verdict = finished.value
            climb.settle(rung, verdict)
            if after is not None:
                after(rung, verdict, votes)
    return climb


@dataclass(frozen=True)
class Policy:
    """How a router's rungs check their answers, before any query: the ladder, thresholds
    per model, the self-consistency settings, and the deferral check when calibrated.

    `deferral_votes` None: every rung runs the agreement check. Otherwise the rungs below
    the top run the deferral check with that many votes (`deferral_models` are their
    P(correct) models; a replay that looks P(correct) up instead may leave them out), and
    the top rung answers greedily: its answer is final, so drawing more would buy nothing.
    `agreement_rungs` of a deferral router run the agreement check (their runtime gives no
    log-probabilities; `quality.DeferralCheck.agreement`).
    """

    ladder: tuple[str, ...]
    thresholds: Mapping[str, float]
    quality: "QualityCheck"
    deferral_votes: int | None = None
    deferral_models: Mapping[str, "Deferral"] = field(default_factory=dict)
    agreement_rungs: frozenset[str] = frozenset()

    def rungs(
        self,
        overrides: Mapping[str, float] | None = None,
        priors: Mapping[str, float] | None = None,
        shots: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
        max_tokens: int = 0,
        option_letters: Mapping[str, str] | None = None,
    ) -> list[Rung]:
        """Every rung's policy for one query, resolved once: `overrides` are its cluster's own
        thresholds, `priors` its cluster priors per model for the deferral check, `shots` the
        answered examples each model is shown, `max_tokens` its answer type's cap and
        `option_letters` the letters each model's greedy answer ends at ("" for a model it
        does not name)."""
        last = len(self.ladder) - 1
        out = []
        for i, model in enumerate(self.ladder):
            # A rung below every start may have no threshold (a replay that starts all on the
            # top rung); judging one without a threshold is an error (`checking`).
            threshold = overrides.get(model, self.thresholds.get(model, math.nan)) if overrides else \
                self.thresholds.get(model, math.nan)
            shown = shots.get(model, ()) if shots else ()
            letters = option_letters.get(model, "") if option_letters else ""
            if self.deferral_votes is None or (i < last and model in self.agreement_rungs):
                out.append(Rung(model, AGREEMENT, threshold, i == last, self.quality.k, self.quality.early_stop,
                                shots=shown, max_tokens=max_tokens, option_letters=letters))
            elif i == last:
                out.append(Rung(model, GREEDY, threshold, True, shots=shown, max_tokens=max_tokens, option_letters=letters))
            else:
                out.append(Rung(model, DEFERRAL, threshold, False, self.quality.k, self.quality.early_stop,
                                votes=self.deferral_votes, deferral=self.deferral_models.get(model),
                                prior=priors.get(model, 0.5) if priors else 0.5, shots=shown, max_tokens=max_tokens, option_letters=letters))
        return out
