"""The cascade: route a prompt, answer on its cluster's model, escalate while unsure.

The walk up the ladder is the ladder engine's (`ladder`): each rung's policy is resolved
once when a prompt is placed (`Cascade.begin`), `ladder.checking` decides each rung on votes
that `LiveVotes` draws from the rung's model, and the top rung's answer is final. The
replay that calibration and evaluation run drives the same engine on recorded votes
(`replay`), so the two cannot decide differently.

Votes are drawn lazily: vote 0 is the greedy answer, votes 1..k-1 are samples at the
router's temperature with seeds from `quality.vote_seed`, asked for in waves
(`quality.wave`) that the llama.cpp backend decodes as parallel sequences over the prompt's
KV cells; the greedy vote leaves the prompt cached, so only it pays for prompt processing.

`Cascade.decode_greedy` lets a batch decode the greedy votes of many prompts on one rung
together (`cre batch --parallel`); each check then starts from its prompt's vote. Costs
come from `costs`: a finished answer carries its own (`Trace.cost`, priced alone when
it finishes); `cost_parts` and `strongest_parts` give each answer's share of a run
(`cre batch` sums them as they finish, `costs.RunTotal`), and `cost_of_run` and
`strongest_cost_of_run` price a whole run at once.

`Cascade` is also the library API:

    with Cascade.from_file("router.cre") as cascade:
        print(cascade.ask("What is 2+2?").answer)
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from crecli import grading
from crecli.costs import (
    CHUNK_LINES, Pricing, TokenCounts, Visit, estimate_strongest, prefix_key, previous_prompts, price_parts, price_steps,
    step_parts,
)
from crecli.errors import CreError, RouterFileError
from crecli.ladder import Climb, walk
# Re-exported: the live trace records and the one-rung check, where callers have long found them.
from crecli.live import LiveSource, LiveVotes, Pending, check, greedy_params  # noqa: F401
from crecli.trace import Step, Trace  # noqa: F401
from crecli.models.backend import GenParams
from crecli.models.prompting import render
from crecli.models.pull import naming_all_missing
from crecli.models.registry import ModelPool, option_letters_for
from crecli.route import RouteDecision, route, route_many

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.models.backend import Backend
    from crecli.quality import QualityCheck
    from crecli.routerfile import RouterFile


class Cascade:
    """Route, check, escalate; models stay in `pool`.

    One cascade may answer on many threads at once (`cre serve`): each prompt's walk holds
    only the rung it is on (`ModelPool.lease`), so prompts on different models compute at
    once and a loaded model computes for one prompt at a time.

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
        # A router this cascade loaded itself (`from_file`): its embedder, a whole model for
        # a llama.cpp one, outside the pool, is this cascade's to close.
        self._owns_router = False
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
        self.policy = router.policy(self.quality)
        # `cre serve` sets it: an in-process rung below the top whose model cannot be loaded
        # (missing, failing verification, refused by llama.cpp) is passed over as a remote
        # rung whose servers all failed is, so a server keeps answering from the rungs it
        # has. `cre ask` and `cre batch` stop instead: a missing model is theirs to fix.
        self.pass_over_unloadable = False
        self._counters: dict[str, "Backend"] = {}  # tokenizers of models not loaded, for estimates
        # What a prompt shares with the one before it, per model (`costs.TokenCounts`), for a run's prices.
        self.counts = TokenCounts(lambda model: self._counter(model))
        self._route_lock = threading.Lock()

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
        cascade._owns_router = True
        return cascade

    @property
    def strongest(self) -> str:
        return self.ladder[-1]

    def cost_of_run(self, traces: Sequence[Trace], prompts: Sequence[str] | None = None) -> list[float | None]:
        """Each trace's cost in a run of answers (a batch), its answered examples shared by
        the one rule of `costs.share_prefixes`, and with `prompts` (the traces', in the
        order the run gave them, as `strongest_cost_of_run` takes them) what each shares with
        the previous prompt of its cluster free (`run_reuse`). Alone, or without `prompts`, a
        trace pays in full: that is its own `Trace.cost`, set when it finished (`live`)."""
        reused = self.run_reuse(traces, prompts) if prompts is not None else None
        return price_steps(self.pricing, [(t.cluster, t.steps) for t in traces], reused)

    def run_reuse(self, traces: Sequence[Trace], prompts: Sequence[str]) -> list[dict[str, int]]:
        """Per trace of a run, `reuse_of` its prompt after the previous prompt of its cluster
        (`costs.previous_prompts`, in chunks of `cre batch`'s lines)."""
        before = previous_prompts(prompts, [t.cluster for t in traces], CHUNK_LINES)
        return [self.reuse_of(t, b, p) for t, b, p in zip(traces, before, prompts)]

    def reuse_of(self, trace: Trace, before: str, prompt: str) -> dict[str, int]:
        """The tokens `prompt` (`trace`'s) shares at its start with `before`, the previous
        prompt of its cluster in a run, for each model that answered it and for the strongest
        (`costs.TokenCounts`): what llama.cpp does not evaluate again; none in a unit where
        that is not free (`Pricing.reuses`)."""
        if not self.pricing.reuses:
            return {}
        return self.counts.per_model({*(step.model for step in trace.steps), self.strongest}, before, prompt)

    def strongest_tokens(self, trace: Trace, prompt: str) -> tuple[int | None, int, float]:
        """The strongest model's greedy answer to `prompt` in tokens: (prompt, answered
        examples among them, output). Its own counts where it ran; otherwise its prompt
        counted with its own tokenizer and prompt format (a base model's few-shot preamble is
        far longer than a chat template, so the answering model's counts would mislead), and
        its output what it wrote, on average, on the fit log's queries of the prompt's cluster
        (`RouterFile.typical_output`), else, for a router that did not record it, the final
        answer written bare (`grading.bare_answer`) in its tokens. A runtime that cannot count
        without running (a remote server) gives the answering model's counts, its prompt
        scaled by how much longer the strongest model's prompt format renders it, the
        strongest's answered examples included; prompt None when nothing ran. An option
        answer the strongest model would have ended at its letter (`grading.option_letters`)
        takes the decode steps of its opening "(B" less the deciding one, whatever the fit
        log's answers took (a router fitted before that rule recorded them written on), where
        that model ends there (`registry.option_letters_for`) and its tokens can be counted."""
        top = self.strongest
        ran = next((step for step in trace.steps if step.model == top), None)
        if ran is not None:
            return ran.prompt_tokens, ran.prefix_tokens, ran.greedy_output_tokens
        if not trace.steps:
            return None, 0, 0
        last = trace.steps[-1]
        shots = self.router.shots(trace.cluster, top)
        output = self.router.typical_output(trace.cluster, top)
        counted = None
        try:
            backend = self._counter(top)
            counted = backend.count_tokens(backend.prepare(prompt, GenParams(shots=shots))[0])
            bare = grading.bare_answer(trace.answer, trace.answer_type)
            if bare is not None and \
                    grading.decided_option(bare, option_letters_for(self.specs[top], trace.answer_type, prompt)) and \
                    (opening := backend.count_text_tokens(bare.rstrip(")"))) is not None:
                output = max(0, opening - 1)
            elif output is None:
                # The final answer as the strongest model, told to reply with the bare answer,
                # would write it ("(B)", the number, the text), not as a rambling base model did.
                output = backend.count_text_tokens(bare or trace.answer)
        except CreError:
            pass  # its file is not here to count with (an estimate must not end a finished batch)
        if counted is None or output is None:
            def chars(model: str, with_shots: bool) -> int:
                """How long `model`'s prompt format renders the prompt, its examples in or not
                (a "chat" rung's server applies its own template: its messages' text)."""
                fmt, examples = self.specs[model].prompt_format, self.router.shots(trace.cluster, model) if with_shots else ()
                if fmt == "chat":
                    return len(prompt) + sum(len(q) + len(a) for q, a in examples)
                return len(render(fmt, prompt, shots=examples).text)

            # Tokens a character of the answering rung's prompt, as its counts hold it: its
            # examples are in its prompt tokens where it does not keep them (prefix 0).
            per_char = (last.prompt_tokens - last.prefix_tokens) / max(1, chars(last.model, not last.prefix_tokens))
            whole = round(per_char * chars(top, True))
            # The strongest's own examples: apart where it keeps them, else in its prompt
            # (`ModelSpec.keeps_examples`), as its live answer and the replay count them.
            examples = whole - round(per_char * chars(top, False)) if self.specs[top].keeps_examples else 0
            return whole, max(0, examples), last.greedy_output_tokens
        plain = backend.count_tokens(backend.prepare(prompt, GenParams())[0]) if shots else counted
        return counted, max(0, counted - (plain or counted)), output

    def _counter(self, model: str) -> "Backend":
        """A backend of `model` for counting tokens: the pool's where it is loaded, else one of
        its own, which loads only the model's vocabulary to count."""
        loaded = self.pool.loaded(model)
        if loaded is not None:
            return loaded
        if model not in self._counters:
            from crecli.models.registry import backend_for

            self._counters[model] = backend_for(self.specs[model])
        return self._counters[model]

    def strongest_cost_of_run(self, traces: Sequence[Trace], prompts: Sequence[str]) -> list[float | None]:
        """What always answering with the strongest model's greedy answer would have cost,
        per trace of a run, priced as `cost_of_run` prices the cascade (`costs.estimate_strongest`,
        its examples shared by `costs.share_prefixes`, its shared starts free); None in "seconds"."""
        reused = self.run_reuse(traces, prompts)
        return price_parts([self.strongest_parts(t, self.strongest_tokens(t, p), r)
                            for t, p, r in zip(traces, prompts, reused)])

    def cost_parts(self, trace: Trace, reused: dict[str, int] | None = None) -> tuple[float | None, list[Visit]]:
        """`trace`'s own cost and its visits to answered examples (`costs.step_parts`), for a
        run priced as its answers finish (`costs.RunTotal`); `reused`: its `reuse_of`."""
        return step_parts(self.pricing, trace.cluster, trace.steps, reused)

    def strongest_parts(self, trace: Trace, counts: tuple[int | None, int, float],
                        reused: dict[str, int] | None = None) -> tuple[float | None, list[Visit]]:
        """`cost_parts` for the strongest model's greedy answer to `trace`'s prompt, from its
        `strongest_tokens` (`costs.estimate_strongest`; None in "seconds")."""
        top = self.strongest
        tokens, prefix, output = counts
        own = estimate_strongest(self.pricing, top, tokens, output, prefix, (reused or {}).get(top, 0))
        return own, [(prefix_key(top, trace.cluster), self.pricing.prefix(top, prefix)) if prefix else ("", 0.0)]

    def route(self, prompt: str) -> RouteDecision:
        with self._routing():
            return route(self.router, prompt)

    def route_many(self, prompts: Sequence[str]) -> list[RouteDecision]:
        """`route` for many prompts in one embedder call (see `route.route_many`)."""
        with self._routing():
            return route_many(self.router, prompts)

    def _routing(self) -> "threading.Lock | nullcontext[None]":
        # The TF-IDF embedder is plain arithmetic, safe on many threads (`cre serve` routes on
        # each request's own); a llama.cpp embedder is a model, which computes for one at a time.
        return nullcontext() if getattr(self.router.embedder, "kind", None) == "tfidf" else self._route_lock

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
        rung's policy for it (its cluster's thresholds and priors, the option letters its
        model's greedy answer ends at) is resolved here, once."""
        if decision is None:
            decision = self.route(prompt)
        settings = self.router.settings_for(decision.cluster, decision.distance)
        answer_type = match or settings.answer_type
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
        rungs = self.policy.rungs(settings.thresholds, settings.priors, settings.shots,
                                  grading.max_tokens_for(answer_type),
                                  {m: option_letters_for(self.specs[m], answer_type, prompt) for m in self.ladder})
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
                current = p.climb.current
                try:
                    params.append(greedy_params(self.quality, current, p.prompt))
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

    def _source(self, pending: Pending) -> LiveSource:
        return LiveSource(pending, self.pool, self.specs, self.quality, self.pricing, self.pass_over_unloadable)

    def advance(self, pending: Pending, rungs: int | None = 1, stop: Callable[[], bool] | None = None) -> bool:
        """Walk the pending prompt up the ladder (`ladder.walk`) for at most `rungs` rungs
        (None: until its answer is final), stopping before a rung once `stop()` holds; True
        once its answer is final. `cre batch` moves many prompts a rung at a time; `cre
        serve` walks a request's prompt whole, stopping when the request gives up. A remote
        rung whose servers all failed is passed over (`LiveSource.hold`)."""
        source = self._source(pending)
        # Every model of the ladder that a pull would mend, not the first one this prompt met.
        with naming_all_missing(list(self.specs.values())):
            walk(pending.climb, source.votes_for, source.after, source.hold, steps=rungs, stop=stop)
        return pending.climb.done

    def ask(self, prompt: str, match: str | None = None, reference: Sequence[str] | str | None = None, *,
            id: str | None = None) -> Trace:
        """Answer one prompt through the cascade (`ladder.walk`) and return the trace of every step."""
        pending = self.begin(prompt, match, reference, id=id)
        self.advance(pending, rungs=None)
        return pending.trace

    def close(self) -> None:
        for counter in self._counters.values():
            counter.close()
        self._counters.clear()
        if self._owns_pool:
            self.pool.close()
        if self._owns_router:
            close = getattr(self.router.embedder, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "Cascade":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

