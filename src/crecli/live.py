"""The live side of the ladder engine: votes drawn from models, and the trace they leave.

`LiveVotes` draws a rung's votes from its model for `ladder.walk`: vote 0 is the greedy
answer (or one decoded ahead, `escalate.Cascade.decode_greedy`), later votes are sampled a
wave at a time (`quality.wave`) in one `Backend.sample_many` call, which the llama.cpp
backend decodes as parallel sequences over the prompt's KV cells. `LiveSource` is what the
engine walks a pending prompt with (`hold`, `votes_for`, `after`): it holds the rung's model
while the rung is judged (`ModelPool.lease`), passes over a remote rung below the top whose
every server failed, records each rung's `Step` in the prompt's `Trace`, and once the answer
is final, its totals and its cost, priced once (`costs.price_steps`). On the rung whose
answer is final as it is generated (`ladder.streams_final`), the greedy answer's text goes
to `Pending.stream` as it comes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from crecli import grading
from crecli.costs import Pricing, price_steps
from crecli.ladder import AGREEMENT, DEFERRAL, GREEDY, Climb, Rung, Verdict, judge, streams_final
from crecli.models.registry import option_letters_for
from crecli.quality import judge_deferral, vote_params, was_cut
from crecli.trace import Step, Trace

if TYPE_CHECKING:
    from crecli.config import ModelSpec
    from crecli.models.backend import Backend, Generation, GenParams, Signals
    from crecli.models.registry import ModelPool
    from crecli.quality import Deferral, QualityCheck


def greedy_params(quality: "QualityCheck", rung: Rung, prompt: str) -> "GenParams":
    """The parameters of `rung`'s greedy vote on `prompt`, drawn here or decoded ahead for a
    batch (`Cascade.decode_greedy`). Only the deferral check reads the greedy pass's signals;
    other rungs do not ask for them."""
    return replace(vote_params(quality, 0, rung.max_tokens, prompt, rung.shots, rung.option_letters),
                   signals=rung.check == DEFERRAL)


_SAID: set[tuple[str, ...]] = set()
_SAID_LOCK = threading.Lock()


def _say_once(key: tuple[str, ...], message: str) -> None:
    """Warn `message` once per process per `key` (what, which model): a condition every
    answer would otherwise repeat on stderr."""
    with _SAID_LOCK:
        if key in _SAID:
            return
        _SAID.add(key)
    from crecli.console import warn

    warn(message)


def _say_unchecked(model: str, k: int) -> None:
    """Warn once per process that `model`'s answers go unchecked: a deferral rung that gets
    no log-probabilities (a server that gives none, such as Ollama's) falls back to the
    agreement check, and with one vote an answer always agrees with itself (only an empty one
    escalates). The trace's `why` says it too, but only `--explain` shows it."""
    _say_once(("unchecked", model),
              f"{model} gave no log-probabilities, so its deferral check fell back to self-consistency, which on "
              f"{k} vote accepts every non-empty answer: its answers are not escalated. Run `cre calibrate` with "
              "this setup, or serve the model where it returns log-probabilities")


class LiveVotes:
    """A rung's votes for one prompt, generated on demand by a model backend (`ladder.Votes`).

    Vote 0 is the greedy answer (or `greedy`, already decoded ahead by `Cascade.decode_greedy`
    with the same parameters); later votes are sampled, a wave at a time in one
    `Backend.sample_many` call, which the llama.cpp backend decodes as parallel sequences.
    It keeps what a `Step` reports: the raw texts, tokens, seconds and the greedy signals.
    """

    def __init__(self, backend: "Backend", prompt: str, quality: "QualityCheck", rung: Rung,
                 answer_type: str | None, greedy: "Generation | None" = None,
                 emit: "Callable[[str], None] | None" = None) -> None:
        self.backend, self.prompt, self.quality = backend, prompt, quality
        self.emit = emit  # the greedy answer's text as it is generated (`Backend.generate_streaming`)
        self.max_tokens, self.answer_type, self.shots = rung.max_tokens, answer_type, rung.shots
        self.greedy = greedy
        self._greedy_params = greedy_params(quality, rung, prompt)
        self.texts: list[str] = []
        self.lengths: list[bool] = []  # each vote's finish_reason was "length" (`Step.cut`)
        self.normalized: list[str] = []
        self.prompt_tokens = self.output_tokens = self.greedy_output_tokens = 0
        self.seconds = 0.0
        self.signals: "Signals | None" = None
        self.cut = False

    def _params(self, index: int) -> "GenParams":
        if index == 0:
            return self._greedy_params
        return vote_params(self.quality, index, self.max_tokens, self.prompt, self.shots)

    def more(self, count: int) -> list[str]:
        start = len(self.texts)
        if start == 0:
            if self.greedy is not None:
                gens = [self.greedy]
            elif self.emit is not None:
                gens = [self.backend.generate_streaming(self.prompt, self._params(0), self.emit)]
            else:
                gens = [self.backend.generate(self.prompt, self._params(0))]
            gens += self.backend.sample_many(self.prompt, [self._params(i) for i in range(1, count)]) if count > 1 else []
        else:
            gens = self.backend.sample_many(self.prompt, [self._params(start + j) for j in range(count)])
        for gen in gens:
            self.texts.append(gen.text)
            self.lengths.append(gen.finish_reason == "length")
            self.normalized.append(grading.normalize(gen.text, self.answer_type))
            if len(self.texts) == 1:
                self.prompt_tokens, self.greedy_output_tokens = gen.prompt_tokens, gen.output_tokens
                # From token counts, as the replay judges recorded votes (`quality.was_cut`).
                self.signals = gen.signals
                self.cut = was_cut(gen.output_tokens, self.max_tokens, gen.prompt_tokens,
                                   self.backend.spec.context_window)
            self.output_tokens += gen.output_tokens
            self.seconds += gen.seconds
        return self.normalized[start:]

    def p_correct(self, rung: Rung, answers: Sequence[str]) -> float | None:
        assert rung.deferral is not None, "a deferral rung carries its P(correct) model"
        p = judge_deferral(rung.deferral, self.signals, answers, self.cut, rung.prior)
        if p is None and self.signals is None and rung.k <= 1:
            _say_unchecked(rung.model, rung.k)
        return p

    def step(self, rung: Rung, verdict: Verdict) -> "Step":
        """What the rung did, for the trace; `why` says why it kept the answer or not."""
        # A deferral rung whose answer came without log-probabilities runs the agreement check.
        threshold = rung.fallback if verdict.check == AGREEMENT and rung.check == DEFERRAL else rung.threshold
        if rung.check == GREEDY:
            why = "greedy answer of the top rung"
        elif verdict.check == DEFERRAL:
            p = verdict.p_correct if verdict.p_correct is not None else 0.0
            why = (f"P(correct) {p:.2f} {'>=' if p >= rung.threshold else '<'} threshold {rung.threshold:.2f}"
                   + ("" if verdict.answer else "; the answer is empty"))
        else:
            majority = Counter(self.normalized[: verdict.used])[verdict.answer]
            share = f"agreement {verdict.agreement:.2f} ({majority}/{verdict.used})"
            if verdict.kept:
                why = f"{share} >= threshold {threshold:.2f}"
            elif not verdict.answer:
                # Never kept, however many agree ("I think the sum is" holds no number): "1.00
                # (3/3) < threshold 0.60" read as nonsense.
                why = f"{share}, but no answer could be read from it"
            else:
                why = f"{share} < threshold {threshold:.2f}"
            if rung.check == DEFERRAL:
                why = f"no log-probabilities from {rung.model}, so the agreement check: {why}"
        params = self._params(0)
        prefix = self.backend.shot_tokens(self.prompt, params, self.prompt_tokens) if self.shots else 0
        return Step(
            model=self.backend.spec.name, votes=self.texts, normalized=self.normalized, agreement=verdict.agreement,
            used=verdict.used, threshold=threshold, accepted=verdict.kept, answer=self.texts[verdict.index].strip(),
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
            greedy_output_tokens=self.greedy_output_tokens, seconds=self.seconds, why=why, p_correct=verdict.p_correct,
            prefix_tokens=prefix, cut=self.lengths[verdict.index] if verdict.index < len(self.lengths) else False,
        )


def check(
    backend: "Backend",
    prompt: str,
    settings: "QualityCheck",
    threshold: float,
    max_tokens: int,
    answer_type: str | None,
    greedy: "Generation | None" = None,
    deferral: "Deferral | None" = None,
    votes_wanted: int = 1,
    prior: float = 0.5,
    shots: Sequence[tuple[str, str]] = (),
) -> Step:
    """One rung's check of `prompt` on `backend`, as the cascade runs it below the top
    (`ladder.judge` on `LiveVotes`, a one-rung walk): self-consistency, or with `deferral`
    the P(correct) check on `votes_wanted` votes and the cluster `prior`. For the benches
    and tests."""
    shown = tuple((str(q), str(a)) for q, a in shots)
    letters = option_letters_for(backend.spec, answer_type, prompt)
    if deferral is not None:
        # k and early stopping as `Policy.rungs` gives them: an answer without log-probabilities
        # falls back to the agreement check on k votes, as in the cascade.
        rung = Rung(backend.spec.name, DEFERRAL, threshold, False, settings.k, settings.early_stop,
                    votes=max(1, votes_wanted), deferral=deferral, prior=prior, shots=shown, max_tokens=max_tokens,
                    option_letters=letters)
    else:
        rung = Rung(backend.spec.name, AGREEMENT, threshold, False, settings.k, settings.early_stop,
                    shots=shown, max_tokens=max_tokens, option_letters=letters)
    votes = LiveVotes(backend, prompt, settings, rung, answer_type, greedy)
    return votes.step(rung, judge(rung, votes))


@dataclass
class Pending:
    """A prompt partway up the ladder; `Cascade.advance` moves it one rung."""

    prompt: str
    match: str | None
    reference: list[str] | None
    climb: Climb  # where the ladder engine stands, each rung's policy resolved once
    trace: Trace
    greedy: "Generation | None" = None  # vote 0 on the current rung, decoded ahead (`decode_greedy`)
    # Takes the final answer's text as it is generated, once the ladder stands on a rung whose
    # greedy answer is final (`ladder.streams_final`); `cre serve` streams it to the client.
    stream: "Callable[[str], None] | None" = None

    @property
    def rung(self) -> int:
        return self.climb.rung

    @property
    def done(self) -> bool:
        return self.climb.done


class LiveSource:
    """What the ladder engine walks one pending prompt with, live: each rung's votes drawn
    from its model (`votes_for`), each judged rung recorded as a `Step` (`after`), and once
    the answer is final the trace's totals, its grade and its cost (priced once)."""

    def __init__(self, pending: Pending, pool: "ModelPool", specs: Mapping[str, "ModelSpec"], quality: "QualityCheck",
                 pricing: Pricing, pass_over_unloadable: bool = False) -> None:
        self.pending, self.pool, self.specs, self.quality, self.pricing = pending, pool, specs, quality, pricing
        self.pass_over_unloadable = pass_over_unloadable
        self._held: "Backend | None" = None

    @contextmanager
    def hold(self, rung: Rung) -> Iterator[None]:
        """Hold the rung's model while its votes are drawn and judged (`ModelPool.lease`):
        callers on other threads wait for a model in use, not for the whole pool.

        A remote rung below the top whose every server failed (`RungUnavailable`) is passed
        over: the step records why, the details go to stderr once, and the prompt moves up to
        the next rung, whose answer is at least as good. So is a rung whose context the
        prompt does not fit (`PromptTooLong`: a higher rung, a remote one say, may have a
        larger context), said in its step only: the prompt's, not the rung's, fault. So is an
        in-process rung whose model cannot be loaded, where `pass_over_unloadable` (`cre
        serve`); its details go to stderr once, not to the client. On the top rung the
        failure stands: nothing is above it."""
        from crecli.errors import ModelLoadError, ModelNotAvailable, PromptTooLong
        from crecli.models.openai import RungUnavailable

        start = time.perf_counter()
        passed: tuple[type[Exception], ...] = (RungUnavailable, PromptTooLong)
        if self.pass_over_unloadable:
            passed += (ModelNotAvailable, ModelLoadError)
        try:
            with self.pool.lease(self.specs[rung.model]) as backend:
                self._held = backend
                try:
                    yield
                finally:
                    self._held = None
        except passed as exc:
            climb = self.pending.climb
            if rung.top or climb.done or climb.current is not rung:
                raise
            if isinstance(exc, PromptTooLong):
                why = "prompt too long for its context"
            elif isinstance(exc, RungUnavailable):
                why = f"unavailable ({exc.public})"
                # Said once, with the servers' own words: a wrong `api_model` or key (404, 401)
                # on a cheap rung otherwise sent every prompt up without a word, exit 0.
                # Once per cause (its status; None for connections): a passing 503 said first
                # must not silence a 401 from a rotated key later in a long `cre serve`.
                _say_once(("unavailable", rung.model, str(exc.status)),
                          f"{exc}; prompts pass over {rung.model} to the next rung while it cannot answer")
            else:
                why = "unavailable (its model could not be loaded)"
                _say_once(("unloadable", rung.model),
                          f"{exc}; prompts pass over {rung.model} to the next rung until it can be loaded")
            climb.rung += 1
            self.pending.greedy = None
            self.pending.trace.steps.append(Step(
                model=rung.model, votes=[], normalized=[], agreement=0.0, used=0, threshold=rung.threshold,
                accepted=False, answer="", prompt_tokens=0, output_tokens=0, greedy_output_tokens=0,
                seconds=time.perf_counter() - start,
                why=f"{why}: escalate to {climb.current.model}",
            ))

    def votes_for(self, rung: Rung) -> LiveVotes:
        pending = self.pending
        greedy, pending.greedy = pending.greedy, None
        backend = self._held
        if backend is None:  # the engine draws votes only inside `hold` (`ladder.walk`)
            raise RuntimeError(f"votes for {rung.model} asked for outside `LiveSource.hold`")
        emit = pending.stream if pending.stream is not None and streams_final(rung) else None
        return LiveVotes(backend, pending.prompt, self.quality, rung, pending.trace.answer_type, greedy, emit)

    def after(self, rung: Rung, verdict: Verdict, votes: Any) -> None:
        pending = self.pending
        step = votes.step(rung, verdict)
        if not verdict.kept:
            step.why += "; top rung, so its answer is final" if rung.top else f": escalate to {pending.climb.current.model}"
        pending.trace.steps.append(step)
        if pending.done:
            self._finish(step)

    def _finish(self, step: Step) -> None:
        pending, trace = self.pending, self.pending.trace
        trace.answer = step.answer
        trace.model = step.model
        trace.cut = step.cut
        trace.agreement = step.agreement
        trace.p_correct = step.p_correct
        trace.escalations = len(trace.steps) - 1
        trace.prompt_tokens = sum(s.prompt_tokens for s in trace.steps)
        trace.output_tokens = sum(s.output_tokens for s in trace.steps)
        trace.seconds = trace.route_seconds + sum(s.seconds for s in trace.steps)
        # Priced alone: each rung's votes and its cluster's answered examples in full
        # (`cre batch` shares the examples over its answers: `costs.RunTotal`).
        trace.cost = price_steps(self.pricing, [(trace.cluster, trace.steps)])[0]
        trace.cost_unit = self.pricing.unit
        if pending.reference is not None:
            trace.correct = grading.grade(trace.answer, pending.reference, grading_match(pending, trace))


def grading_match(pending: "Pending", trace: Trace) -> str:
    """How a live answer's reference is graded: by the line's own `match`; without one, as
    the prompt was answered, by its cluster's answer type (a query log's rows get exact text
    when they are read). A reference that type cannot read ("Paris" for a numeric cluster)
    is compared as exact text, so it grades the answer rather than throw it away as an
    error record."""
    if pending.match:
        return pending.match
    answered = trace.answer_type or "exact"
    references = [pending.reference] if isinstance(pending.reference, str) else list(pending.reference or ())
    if any(grading.reference_problem(ref, answered) for ref in references):
        return "exact"
    return answered
