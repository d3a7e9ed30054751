"""The cascade: route a prompt, answer on its cluster's model, escalate while unsure.

On each rung the quality check draws votes lazily: vote 0 is the greedy answer, votes
1..k-1 are samples at the router's temperature with seeds from `quality.vote_seed`, and drawing stops as soon
as `quality.done` says more votes cannot change the decision. Sampled votes are asked for
in waves (`quality.wave`: the votes no outcome could make unnecessary), which the llama.cpp
backend decodes as parallel sequences over the prompt's KV cells; the greedy vote leaves
the prompt cached, so only it pays for prompt processing. A majority share
below the (cluster, model) threshold moves the prompt to the next larger rung; the top
rung's answer is final.

`Cascade.decode_greedy` lets a batch decode the greedy votes of many prompts on one rung
together (`cre batch --parallel`); each check then starts from its prompt's vote.

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
from crecli.costs import Pricing
from crecli.errors import CreError, RouterFileError
from crecli.models.prompting import render
from crecli.models.registry import ModelPool
from crecli.quality import accept_deferral, decide, deferral_features, done, greedy_agreement, vote_params, wave
from crecli.route import RouteDecision, route, route_many

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.models.backend import Backend, Generation
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
    """Run the quality check for `prompt` on one model.

    Self-consistency (no `deferral`): votes are drawn lazily until `quality.done`.
    With `deferral`, exactly `votes_wanted` votes are drawn and the greedy answer is kept
    when the model's P(correct) (`quality.deferral_features` with the cluster `prior`)
    reaches `threshold`. `greedy`, when given, is vote 0 already decoded
    (`Cascade.decode_greedy`) with the same parameters; sampled votes are drawn here.
    `shots` are the answered examples shown before the prompt (`RouterFile.shots`).
    """
    votes: list[str] = []
    normalized: list[str] = []
    prompt_tokens = output_tokens = greedy_output_tokens = 0
    seconds = 0.0
    signals = None
    cut = False

    def more() -> bool:
        if deferral is not None:
            return len(votes) < max(1, votes_wanted)
        return not done(normalized, settings.k, threshold, settings.early_stop)

    while more():
        if not votes:
            gens = [greedy if greedy is not None else backend.generate(prompt, vote_params(settings, 0, max_tokens, prompt, shots))]
        else:
            # Sampled votes come in waves (`quality.wave`: as many as drawing one at a time
            # would surely draw), which a backend may decode as parallel sequences.
            count = max(1, votes_wanted - len(votes)) if deferral is not None else wave(
                normalized, settings.k, threshold, settings.early_stop)
            gens = backend.sample_many(
                prompt, [vote_params(settings, len(votes) + j, max_tokens, prompt, shots) for j in range(count)])
        for gen in gens:
            votes.append(gen.text)
            normalized.append(grading.normalize(gen.text, answer_type))
            if len(votes) == 1:
                prompt_tokens, greedy_output_tokens = gen.prompt_tokens, gen.output_tokens
                # As the replay judges recorded votes, which keep token counts, not finish reasons.
                signals, cut = gen.signals, gen.output_tokens >= max_tokens
            output_tokens += gen.output_tokens
            seconds += gen.seconds
    prefix = backend.shot_tokens(prompt, vote_params(settings, 0, max_tokens, prompt, shots), prompt_tokens) if shots else 0
    if deferral is not None:
        p = deferral.p_correct(deferral_features(signals, normalized, cut, prior))
        accepted = accept_deferral(p, threshold, normalized[0])
        why = (f"P(correct) {p:.2f} {'>=' if p >= threshold else '<'} threshold {threshold:.2f}"
               + ("" if normalized[0] else "; the answer is empty"))
        return Step(
            model=backend.spec.name, votes=votes, normalized=normalized, agreement=greedy_agreement(normalized),
            used=len(votes), threshold=threshold, accepted=accepted, answer=votes[0].strip(),
            prompt_tokens=prompt_tokens, output_tokens=output_tokens,
            greedy_output_tokens=greedy_output_tokens, seconds=seconds, why=why, p_correct=p,
            prefix_tokens=prefix,
        )
    decision = decide(normalized, settings.k, threshold, settings.early_stop)
    majority = Counter(normalized[: decision.used])[decision.answer]
    share = f"agreement {decision.agreement:.2f} ({majority}/{decision.used})"
    why = f"{share} >= threshold {threshold:.2f}" if decision.accept else f"{share} < threshold {threshold:.2f}"
    return Step(
        model=backend.spec.name,
        votes=votes,
        normalized=normalized,
        agreement=decision.agreement,
        used=decision.used,
        threshold=threshold,
        accepted=decision.accept,
        answer=votes[decision.index].strip(),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        greedy_output_tokens=greedy_output_tokens,
        seconds=seconds,
        why=why,
        prefix_tokens=prefix,
    )


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
    """A prompt partway down the ladder; `Cascade.advance` moves it one rung."""

    prompt: str
    match: str | None
    reference: list[str] | None
    rung: int
    trace: Trace
    done: bool = False
    greedy: "Generation | None" = None  # vote 0 on the current rung, decoded ahead (`decode_greedy`)


def _reused(step: Step, cluster: int, paid: set[tuple[str, int]] | None) -> int:
    """The step's example tokens that need no processing because `paid` already holds its
    (model, cluster); records the pair otherwise (see `Cascade.cost_of`)."""
    if not step.prefix_tokens or paid is None:
        return 0
    key = (step.model, cluster)
    if key in paid:
        return step.prefix_tokens
    paid.add(key)
    return 0


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

    def cost_of(self, trace: Trace, paid: set[tuple[str, int]] | None = None) -> float | None:
        """What answering `trace` cost, in `self.pricing.unit`; None when a model has no price.

        Per rung, the prompt once and every vote's output tokens, as calibration prices
        recorded votes; in "seconds", the model-seconds the votes took. `paid`, where given,
        holds the (model, cluster) pairs whose answered examples this run has already
        processed (`cre batch` answers a cluster's prompts on a rung together, so llama.cpp
        keeps them cached): a step of such a pair is charged without its examples, and the
        first one of a pair adds it. Without `paid`, every step pays for its examples.
        """
        if not self.pricing.by_tokens:
            return sum(step.seconds for step in trace.steps)
        total = 0.0
        for step in trace.steps:
            cost = self.pricing.tokens(step.model, step.prompt_tokens - _reused(step, trace.cluster, paid),
                                       step.output_tokens)
            if cost is None:
                return None
            total += cost
        return total

    def strongest_cost_of(self, trace: Trace, prompt: str, paid: set[tuple[str, int]] | None = None) -> float | None:
        """What the strongest model's greedy answer to `prompt` costs, priced as `cost_of` prices.

        When the strongest model ran, its own prompt tokens and first vote's output tokens
        (its answered examples once per (model, cluster) in `paid`, as in `cost_of`; pass a
        set of its own, since this prices another run); otherwise the answering model's
        counts without its examples, with the prompt scaled by how much longer the strongest
        model's prompt format renders it (the few-shot preamble of a base model is longer than
        a chat template). None in "seconds": a model that did not run took no time to
        measure, and only a token-priced unit can price it (`cre models bench` gives one).
        """
        if not self.pricing.by_tokens or not trace.steps:
            return None
        top = self.strongest
        ran = next((step for step in trace.steps if step.model == top), None)
        if ran is not None:
            return self.pricing.tokens(top, ran.prompt_tokens - _reused(ran, trace.cluster, paid), ran.greedy_output_tokens)
        last = trace.steps[-1]
        theirs = len(render(self.specs[last.model].prompt_format, prompt).text)
        ours = len(render(self.specs[top].prompt_format, prompt).text)
        return self.pricing.tokens(top, (last.prompt_tokens - last.prefix_tokens) * ours / max(1, theirs),
                                   last.greedy_output_tokens)

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
        """Place `prompt` on its starting rung, routing it unless `decision` is given."""
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
        return Pending(
            prompt=prompt,
            match=match,
            reference=list(reference) if reference is not None else None,
            rung=self.ladder.index(decision.model),
            trace=trace,
        )

    @property
    def parallel(self) -> int:
        return self.pool.parallel

    def decode_greedy(self, pendings: Sequence[Pending]) -> None:
        """Decode vote 0 of every pending prompt on its current rung ahead of its check,
        up to `parallel` prompts of one rung at a time (`Backend.generate_many`).

        Each vote uses the parameters `check` would give it, so the check then goes on
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

    def advance(self, pending: Pending) -> bool:
        """Run the check on the pending prompt's current rung; True once its answer is final."""
        trace = pending.trace
        name = self.ladder[pending.rung]
        backend = self.pool.get(self.specs[name])
        greedy, pending.greedy = pending.greedy, None
        rules = self.router.deferral
        top = pending.rung == len(self.ladder) - 1
        step = check(
            backend,
            pending.prompt,
            self.quality,
            self.router.threshold(trace.cluster, name),
            grading.max_tokens_for(trace.answer_type),
            trace.answer_type,
            greedy,
            # The top rung's answer is final, so a deferral router draws it greedily.
            deferral=rules.models.get(name) if rules is not None and not top else None,
            votes_wanted=rules.votes if rules is not None else 1,
            prior=self.router.prior(trace.cluster, name, trace.distance),
            shots=self.router.shots(trace.cluster, name),
        )
        if rules is not None and top:
            step.accepted, step.why = True, "greedy answer of the top rung"
        if not step.accepted:
            step.why += "; top rung, so its answer is final" if top else f": escalate to {self.ladder[pending.rung + 1]}"
        trace.steps.append(step)
        if step.accepted or top:
            self._finish(pending, step)
        else:
            pending.rung += 1
        return pending.done

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
        pending.done = True

    def ask(
        self,
        prompt: str,
        match: str | None = None,
        reference: Sequence[str] | str | None = None,
        *,
        id: str | None = None,
    ) -> Trace:
        """Answer one prompt through the cascade and return the trace of every step."""
        pending = self.begin(prompt, match, reference, id=id)
        while not self.advance(pending):
            pass
        return pending.trace

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
