"""The cascade: route a prompt, answer on its cluster's model, escalate while unsure.

The walk up the ladder is the ladder engine's (`ladder`): each rung's policy is resolved
once when a prompt is placed (`Cascade.begin`), `ladder.judge` decides each rung on votes
that `LiveVotes` draws from the rung's model, and the top rung's answer is final. The
replay that calibration and evaluation run drives the same engine on recorded votes
(`replay`), so the two cannot decide differently.

Votes are drawn lazily: vote 0 is the greedy answer, votes 1..k-1 are samples at the
router's temperature with seeds from `quality.vote_seed`, asked for in waves
(`quality.wave`) that the llama.cpp backend decodes as parallel sequences over the prompt's
KV cells; the greedy vote leaves the prompt cached, so only it pays for prompt processing.

`Cascade.decode_greedy` lets a batch decode the greedy votes of many prompts on one rung
together (`cre batch --parallel`); each check then starts from its prompt's vote. Costs
come from `costs` (`Cascade.cost_of`, `cost_of_run`, `strongest_cost_of_run`).

`Cascade` is also the library API:

    with Cascade.from_file("router.cre") as cascade:
        print(cascade.ask("What is 2+2?").answer)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crecli import grading
from crecli.costs import Pricing, estimate_strongest, prefix_key, price_steps, share_prefixes
from crecli.errors import CreError, RouterFileError
from crecli.ladder import AGREEMENT, DEFERRAL, GREEDY, Climb, Policy, Rung, Verdict, judge, step, walk
from crecli.models.backend import GenParams
from crecli.models.prompting import render
from crecli.models.registry import ModelPool
from crecli.quality import deferral_features, vote_params
from crecli.route import RouteDecision, route, route_many

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.models.backend import Backend, Generation, Signals
    from crecli.quality import Deferral, QualityCheck
    from crecli.routerfile import RouterFile


@dataclass
class Step:
    """One rung's quality check."""

    model: str
    votes: list[str]  # raw texts, in the order drawn (greedy first)
    normalized: list[str]  # what was voted on
    agreement: float  # majority share among the votes drawn
    used: int  # votes drawn before the decision was fixed
    threshold: float
    accepted: bool  # the majority reached the threshold
    answer: str  # raw text (stripped) of the first vote that gave the majority
    prompt_tokens: int  # the prompt is processed once per model, so counted once
    output_tokens: int  # of every vote drawn
    greedy_output_tokens: int  # of the greedy vote alone: an answer without the check
    seconds: float
    why: str  # why the cascade stopped here or moved on
    p_correct: float | None = None  # the deferral model's estimate (routers calibrated with it)
    # Of prompt_tokens, the cluster's answered examples (`Backend.shot_tokens`): every prompt
    # of the cluster on this model shares them, so a batch processes them once.
    prefix_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LiveVotes:
    """A rung's votes for one prompt, generated on demand by a model backend (`ladder.Votes`).

    Vote 0 is the greedy answer (or `greedy`, already decoded ahead by `Cascade.decode_greedy`
    with the same parameters); later votes are sampled, a wave at a time in one
    `Backend.sample_many` call, which the llama.cpp backend decodes as parallel sequences.
    It keeps what a `Step` reports: the raw texts, tokens, seconds and the greedy signals.
    """

    def __init__(self, backend: "Backend", prompt: str, quality: "QualityCheck", max_tokens: int,
                 answer_type: str | None, shots: Sequence[tuple[str, str]] = (), greedy: "Generation | None" = None) -> None:
        self.backend, self.prompt, self.quality = backend, prompt, quality
        self.max_tokens, self.answer_type, self.shots = max_tokens, answer_type, tuple(shots)
        self.greedy = greedy
        self.texts: list[str] = []
        self.normalized: list[str] = []
        self.prompt_tokens = self.output_tokens = self.greedy_output_tokens = 0
        self.seconds = 0.0
        self.signals: "Signals | None" = None
        self.cut = False

    def _params(self, index: int) -> "GenParams":
        return vote_params(self.quality, index, self.max_tokens, self.prompt, self.shots)

    def more(self, count: int) -> list[str]:
        start = len(self.texts)
        if start == 0:
            gens = [self.greedy if self.greedy is not None else self.backend.generate(self.prompt, self._params(0))]
            gens += self.backend.sample_many(self.prompt, [self._params(i) for i in range(1, count)]) if count > 1 else []
        else:
            gens = self.backend.sample_many(self.prompt, [self._params(start + j) for j in range(count)])
        for gen in gens:
            self.texts.append(gen.text)
            self.normalized.append(grading.normalize(gen.text, self.answer_type))
            if len(self.texts) == 1:
                self.prompt_tokens, self.greedy_output_tokens = gen.prompt_tokens, gen.output_tokens
                # As the replay judges recorded votes, which keep token counts, not finish reasons.
                self.signals, self.cut = gen.signals, gen.output_tokens >= self.max_tokens
            self.output_tokens += gen.output_tokens
            self.seconds += gen.seconds
        return self.normalized[start:]

    def p_correct(self, rung: Rung, answers: Sequence[str]) -> float:
        assert rung.deferral is not None, "a deferral rung carries its P(correct) model"
        return rung.deferral.p_correct(deferral_features(self.signals, answers, self.cut, rung.prior))

    def step(self, rung: Rung, verdict: Verdict) -> "Step":
        """What the rung did, for the trace; `why` says why it kept the answer or not."""
        if rung.check == GREEDY:
            why = "greedy answer of the top rung"
        elif rung.check == DEFERRAL:
            p = verdict.p_correct if verdict.p_correct is not None else 0.0
            why = (f"P(correct) {p:.2f} {'>=' if p >= rung.threshold else '<'} threshold {rung.threshold:.2f}"
                   + ("" if verdict.answer else "; the answer is empty"))
        else:
            majority = Counter(self.normalized[: verdict.used])[verdict.answer]
            share = f"agreement {verdict.agreement:.2f} ({majority}/{verdict.used})"
            why = f"{share} >= threshold {rung.threshold:.2f}" if verdict.kept else f"{share} < threshold {rung.threshold:.2f}"
        params = self._params(0)
        prefix = self.backend.shot_tokens(self.prompt, params, self.prompt_tokens) if self.shots else 0
        return Step(
            model=self.backend.spec.name, votes=self.texts, normalized=self.normalized, agreement=verdict.agreement,
            used=verdict.used, threshold=rung.threshold, accepted=verdict.kept, answer=self.texts[verdict.index].strip(),
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
            greedy_output_tokens=self.greedy_output_tokens, seconds=self.seconds, why=why, p_correct=verdict.p_correct,
            prefix_tokens=prefix,
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
    (`ladder.judge` on `LiveVotes`): self-consistency, or with `deferral` the P(correct)
    check on `votes_wanted` votes and the cluster `prior`. For the benches and tests."""
    if deferral is not None:
        rung = Rung(backend.spec.name, DEFERRAL, threshold, False, votes=max(1, votes_wanted), deferral=deferral, prior=prior)
    else:
        rung = Rung(backend.spec.name, AGREEMENT, threshold, False, settings.k, settings.early_stop)
    votes = LiveVotes(backend, prompt, settings, max_tokens, answer_type, shots, greedy)
    return votes.step(rung, judge(rung, votes))


@dataclass
class Trace:
    """Everything the cascade did for one prompt; `to_dict()` is JSON-ready."""

    id: str | None
    cluster: int
    distance: float
    route_reason: str
    route_seconds: float
    answer_type: str | None
    start_model: str
    familiar: bool = True  # `RouteDecision.familiar`: the router's log had queries like this prompt
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    model: str = ""
    agreement: float = 0.0
    p_correct: float | None = None  # of the answering rung, when the router has a deferral model
    escalations: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0  # routing plus generation; model loading is not counted
    correct: bool | None = None  # only when a reference was given

    @property
    def fallback(self) -> bool:
        return self.cluster < 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fallback"] = self.fallback
        return data


@dataclass
class Pending:
    """A prompt partway up the ladder; `Cascade.advance` moves it one rung."""

    prompt: str
    match: str | None
    reference: list[str] | None
    climb: Climb  # where the ladder engine stands, each rung's policy resolved once
    trace: Trace
    greedy: "Generation | None" = None  # vote 0 on the current rung, decoded ahead (`decode_greedy`)

    @property
    def rung(self) -> int:
        return self.climb.rung

    @property
    def done(self) -> bool:
        return self.climb.done


class Cascade:
    """Route, check, escalate. Model calls are strictly sequential; models stay in `pool`.

    `parallel` is how many greedy answers `decode_greedy` may decode at once on one model
    (`cre batch --parallel`); 1 decodes them one by one. It is the pool's setting, so the
    memory budget counts the larger KV cache it needs.
    """

    def __init__(
        self,
        router: "RouterFile",
        settings: "ModelConfig",
        pool: ModelPool | None = None,
        quality: "QualityCheck | None" = None,
    ) -> None:
        self.router = router
        self.settings = settings
        self.quality = quality or router.quality
        self._owns_pool = pool is None
        self.pool = pool if pool is not None else ModelPool()
        self.ladder = router.ladder_names
        self.specs = {name: settings.get(name) for name in self.ladder}
        self.pricing = Pricing.for_models([self.specs[name] for name in self.ladder])
        starts = {router.fallback_model, *(c.model for c in router.clusters)}
        off = sorted(starts - set(self.ladder))
        if off:
            raise RouterFileError(
                f"the router starts prompts on {', '.join(off)}, which is not on its ladder "
                f"({', '.join(self.ladder)}); refit it with `cre fit`"
            )
        rules = router.deferral
        self.policy = Policy(
            tuple(self.ladder), router.thresholds, self.quality,
            deferral_votes=rules.votes if rules is not None else None,
            deferral_models=rules.models if rules is not None else {},
        )
        self._counter: "Backend | None" = None  # the strongest model's tokenizer, for estimates

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        models_file: Path | None = None,
        force: bool = False,
        memory_budget_bytes: int | None = None,
        parallel: int = 1,
    ) -> "Cascade":
        """Load a router file (checked against the models.toml files) and get ready to answer."""
        from crecli import config, routerfile

        settings = config.load(models_file)
        router = routerfile.load(Path(path), settings, force=force)
        cascade = cls(router, settings, ModelPool(memory_budget_bytes, parallel=parallel))
        cascade._owns_pool = True
        return cascade

    @property
    def strongest(self) -> str:
        return self.ladder[-1]

    def cost_of(self, trace: Trace) -> float | None:
        """What answering `trace` alone cost, in `self.pricing.unit` (`costs.price_steps`:
        each rung's votes, and its cluster's answered examples in full); None when a model
        has no figure in the unit. `cost_of_run` prices many answers that shared examples."""
        return price_steps(self.pricing, [(trace.cluster, trace.steps)])[0]

    def cost_of_run(self, traces: Sequence[Trace]) -> list[float | None]:
        """Each trace's cost in a run of answers (a batch), its answered examples shared by
        the one rule of `costs.share_prefixes`."""
        return price_steps(self.pricing, [(t.cluster, t.steps) for t in traces])

    def strongest_tokens(self, trace: Trace, prompt: str) -> tuple[int | None, int, int]:
        """The strongest model's greedy answer to `prompt` in tokens: (prompt, answered
        examples among them, output). Its own counts where it ran; otherwise counted with its
        own tokenizer and prompt format (a base model's few-shot preamble is far longer than a
        chat template, so the answering model's counts would mislead), the output as the
        final answer's text in its tokens. A runtime that cannot count without running (a
        remote server) gives the answering model's counts, its prompt scaled by how much longer
        the strongest model's prompt format renders it; prompt None when nothing ran."""
        top = self.strongest
        ran = next((step for step in trace.steps if step.model == top), None)
        if ran is not None:
            return ran.prompt_tokens, ran.prefix_tokens, ran.greedy_output_tokens
        if not trace.steps:
            return None, 0, 0
        last = trace.steps[-1]
        backend = self._strongest_counter()
        shots = self.router.shots(trace.cluster, top)
        rendered = backend.prepare(prompt, GenParams(shots=shots))[0]
        counted = backend.count_tokens(rendered)
        answer = backend.count_text_tokens(trace.answer)
        if counted is None or answer is None:
            theirs = len(render(self.specs[last.model].prompt_format, prompt).text)
            ours = len(render(self.specs[top].prompt_format, prompt).text)
            return round((last.prompt_tokens - last.prefix_tokens) * ours / max(1, theirs)), 0, last.greedy_output_tokens
        bare = backend.count_tokens(backend.prepare(prompt, GenParams())[0]) if shots else counted
        return counted, max(0, counted - (bare or counted)), answer

    def _strongest_counter(self) -> "Backend":
        """A backend of the strongest model for counting tokens: the pool's where it is loaded,
        else one of its own, which loads only the model's vocabulary to count."""
        top = self.specs[self.strongest]
        loaded = self.pool.loaded(top.name)
        if loaded is not None:
            return loaded
        if self._counter is None:
            from crecli.models.registry import backend_for

            self._counter = backend_for(top)
        return self._counter

    def strongest_cost_of_run(self, traces: Sequence[Trace], prompts: Sequence[str]) -> list[float | None]:
        """What always answering with the strongest model's greedy answer would have cost,
        per trace of a run, priced as `cost_of_run` prices the cascade (`costs.estimate_strongest`,
        its examples shared by `costs.share_prefixes`); None in "seconds"."""
        top = self.strongest
        visits: list[tuple[str, float]] = []
        own: list[float | None] = []
        for trace, prompt in zip(traces, prompts):
            tokens, prefix, output = self.strongest_tokens(trace, prompt)
            cost = estimate_strongest(self.pricing, top, tokens, output, prefix)
            own.append(None if cost is None else cost - self.pricing.prefix(top, prefix))
            visits.append((prefix_key(top, trace.cluster), self.pricing.prefix(top, prefix)) if prefix else ("", 0.0))
        return [None if cost is None else cost + share for cost, share in zip(own, share_prefixes(visits))]

    def route(self, prompt: str) -> RouteDecision:
        return route(self.router, prompt)

    def route_many(self, prompts: Sequence[str]) -> list[RouteDecision]:
        """`route` for many prompts in one embedder call (see `route.route_many`)."""
        return route_many(self.router, prompts)

    def begin(
        self,
        prompt: str,
        match: str | None = None,
        reference: Sequence[str] | str | None = None,
        *,
        id: str | None = None,
        decision: RouteDecision | None = None,
    ) -> Pending:
        """Place `prompt` on its starting rung, routing it unless `decision` is given; each
        rung's policy for it (its cluster's thresholds and priors) is resolved here, once."""
        if decision is None:
            decision = self.route(prompt)
        info = self.router.cluster(decision.cluster) if decision.cluster >= 0 else None
        answer_type = match or (info.answer_type if info is not None else None)
        if isinstance(reference, str):
            reference = [reference]
        trace = Trace(
            id=id,
            cluster=decision.cluster,
            distance=decision.distance,
            route_reason=decision.reason,
            route_seconds=decision.seconds,
            answer_type=answer_type,
            start_model=decision.model,
            familiar=decision.familiar,
        )
        rungs = self.policy.rungs(
            info.thresholds if info is not None else None,
            lambda model: self.router.prior(decision.cluster, model, decision.distance),
        )
        return Pending(
            prompt=prompt,
            match=match,
            reference=list(reference) if reference is not None else None,
            climb=Climb(rungs, self.ladder.index(decision.model)),
            trace=trace,
        )

    @property
    def parallel(self) -> int:
        return self.pool.parallel

    def decode_greedy(self, pendings: Sequence[Pending]) -> None:
        """Decode vote 0 of every pending prompt on its current rung ahead of its check,
        up to `parallel` prompts of one rung at a time (`Backend.generate_many`).

        Each vote uses the parameters the check would give it, so the check then goes on
        exactly as if it had drawn the vote itself. A prompt whose vote fails here (or a
        rung whose model cannot be loaded) is left alone: its check draws the vote and
        reports the error in its own place.
        """
        if self.parallel <= 1:
            return
        by_rung: dict[int, list[Pending]] = {}
        for p in pendings:
            if not p.done and p.greedy is None:
                by_rung.setdefault(p.rung, []).append(p)
        for rung, group in sorted(by_rung.items()):
            members: list[Pending] = []
            params = []
            for p in group:
                try:
                    params.append(vote_params(self.quality, 0, grading.max_tokens_for(p.trace.answer_type), p.prompt,
                                              self.router.shots(p.trace.cluster, self.ladder[rung])))
                except CreError:
                    continue
                members.append(p)
            if len(members) < 2:
                continue
            try:
                backend = self.pool.get(self.specs[self.ladder[rung]])
                gens = backend.generate_many([p.prompt for p in members], params, self.parallel)
            except CreError:
                continue
            for p, gen in zip(members, gens):
                if not isinstance(gen, CreError):
                    p.greedy = gen

    def _votes(self, pending: Pending) -> LiveVotes:
        """The current rung's votes for `pending`, drawn from the rung's model."""
        trace = pending.trace
        name = pending.climb.current.model
        greedy, pending.greedy = pending.greedy, None
        return LiveVotes(self.pool.get(self.specs[name]), pending.prompt, self.quality,
                         grading.max_tokens_for(trace.answer_type), trace.answer_type,
                         self.router.shots(trace.cluster, name), greedy)

    def advance(self, pending: Pending) -> bool:
        """Run the check on the pending prompt's current rung (`ladder.step`); True once its
        answer is final."""
        votes = self._votes(pending)
        rung = pending.climb.current
        final = step(pending.climb, votes)
        self._record(pending, rung, pending.climb.verdicts[-1][1], votes)
        return final

    def _record(self, pending: Pending, rung: Rung, verdict: Verdict, votes: LiveVotes) -> None:
        s = votes.step(rung, verdict)
        if not verdict.kept:
            s.why += "; top rung, so its answer is final" if rung.top else f": escalate to {self.ladder[pending.rung]}"
        pending.trace.steps.append(s)
        if pending.done:
            self._finish(pending, s)

    def _finish(self, pending: Pending, step: Step) -> None:
        trace = pending.trace
        trace.answer = step.answer
        trace.model = step.model
        trace.agreement = step.agreement
        trace.p_correct = step.p_correct
        trace.escalations = len(trace.steps) - 1
        trace.prompt_tokens = sum(s.prompt_tokens for s in trace.steps)
        trace.output_tokens = sum(s.output_tokens for s in trace.steps)
        trace.seconds = trace.route_seconds + sum(s.seconds for s in trace.steps)
        if pending.reference is not None:
            # Like the query log, a reference without a match type is compared as exact text.
            match = pending.match or trace.answer_type or "exact"
            trace.correct = grading.grade(trace.answer, pending.reference, match)

    def ask(
        self,
        prompt: str,
        match: str | None = None,
        reference: Sequence[str] | str | None = None,
        *,
        id: str | None = None,
    ) -> Trace:
        """Answer one prompt through the cascade (`ladder.walk`) and return the trace of every step."""
        pending = self.begin(prompt, match, reference, id=id)
        walk(pending.climb, lambda rung: self._votes(pending),
             lambda rung, verdict, votes: self._record(pending, rung, verdict, votes))  # type: ignore[arg-type]
        return pending.trace

    def close(self) -> None:
        if self._counter is not None:
            self._counter.close()
            self._counter = None
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

