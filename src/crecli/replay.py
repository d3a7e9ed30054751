"""The replay: the ladder engine (`ladder`) driven by recorded votes instead of models.

`cre calibrate`, `cre eval` and the benches compare thousands of settings on the same
recorded outcomes. A `Replay` holds every (query, model)'s recorded votes, normalised,
graded and priced once (`costs.CostModel`); `Replay.simulate` walks each query up the ladder
with `ladder.walk`, the same walk and the same decision (`ladder.checking`) `cre ask` runs, its
votes drawn from the record (`RecordedVotes`) instead of a model. `Data` is a labelled log
prepared for it (`prepare`): its records, routes as `cre ask` routes them, and outcomes.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import Counter
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Container, Mapping, Sequence

from crecli import console, grading
from crecli.costs import CostModel, Pricing, TokenCounts, mean_greedy_cost, share_prefixes
from crecli.errors import CreError
from crecli.ladder import DEFERRAL, Climb, Policy, Rung, Verdict, walk
from crecli.outcomes import graded, prompt_sha256
from crecli.quality import deferral_features, needed, was_cut
from crecli.shots import resolve_shots

if TYPE_CHECKING:
    from crecli.config import ModelConfig, ModelSpec
    from crecli.models.backend import Signals
    from crecli.outcomes import Outcome, OutcomeKey
    from crecli.quality import QualityCheck
    from crecli.querylog import LogOptions, Record
    from crecli.route import RouteDecision
    from crecli.routerfile import RouterFile


@dataclass(frozen=True)
class SimStep:
    model: str
    agreement: float
    used: int  # votes drawn
    accept: bool
    cost: float


@dataclass
class QueryTrace:
    query_id: str
    start: str
    steps: list[SimStep]
    answer: str  # normalised majority answer of the final step ("" for a label-only outcome)
    correct: bool
    cost: float

    @property
    def model(self) -> str:
        return self.steps[-1].model

    @property
    def escalated(self) -> bool:
        return len(self.steps) > 1


@dataclass
class SimResult:
    traces: list[QueryTrace]
    unit: str
    accuracy: float = 0.0
    cost: float = 0.0  # total over all queries
    mean_cost: float = 0.0
    escalation_rate: float = 0.0
    answered_by: dict[str, int] = field(default_factory=dict)  # model -> final answers
    # Each answered-examples key the run visited, with what processing them once costs: the
    # part of `cost` the run shares (`_with_prefixes`), so runs priced apart can be joined
    # as one run would pay (`join_runs`).
    prefixes: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.traces)
        if n:
            self.accuracy = sum(t.correct for t in self.traces) / n
            self.cost = sum(t.cost for t in self.traces)
            self.mean_cost = self.cost / n
            self.escalation_rate = sum(t.escalated for t in self.traces) / n
        self.answered_by = dict(Counter(t.model for t in self.traces))

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.traces),
            "accuracy": self.accuracy,
            "cost": self.cost,
            "mean_cost": self.mean_cost,
            "unit": self.unit,
            "escalation_rate": self.escalation_rate,
            "answered_by": self.answered_by,
        }


@dataclass(frozen=True)
class _Entry:
    answers: tuple[str, ...]  # normalised votes; () for a label-only outcome
    correct: tuple[bool, ...]  # per vote (one entry for a label)
    cumcost: tuple[float, ...]  # cumcost[i]: cost of votes 0..i
    signals: "Signals | None" = None  # of the greedy vote
    cut: bool = False  # the greedy vote ran out of room: its token cap or the context (`quality.was_cut`)
    prefix_key: str = ""  # the shared answered examples, whose cost `cumcost` leaves out
    prefix_cost: float = 0.0  # processing them once (`CostModel.prefix`)
    # The prompt does not fit the model's context (`outcomes`' "too_long"): no answers, one
    # wrong one at no cost offered to the engine, which never accepts it (`RecordedVotes.more`).
    too_long: bool = False

    def features(self, votes: int, prior: float) -> list[float | None]:
        """The deferral model's inputs for this recorded answer, as the live check builds them."""
        return deferral_features(self.signals, self.answers[:votes], self.cut, prior)


@functools.lru_cache(maxsize=1 << 16)
def _normalize(text: str, match: str | None) -> str:
    return grading.normalize(text, match)


class Replay:
    """Recorded votes, normalised, graded and costed once, for fast repeated `simulate` calls."""

    def __init__(self, entries: dict[OutcomeKey, _Entry], records: Sequence["Record"], ladder: Sequence[str], unit: str) -> None:
        self.entries = entries
        self.records = list(records)
        self.ladder = list(ladder)
        self.unit = unit

    @classmethod
    def build(
        cls,
        outcomes: Mapping[OutcomeKey, Outcome],
        records: Sequence["Record"],
        ladder: Sequence[str],
        costs: CostModel | None = None,
        specs: Sequence["ModelSpec"] = (),
    ) -> "Replay":
        """`specs`, the ladder models' settings, give each one's context window
        (`ModelSpec.context_window`), which decides with the recorded tokens whether a greedy
        vote was cut (`quality.was_cut`) as the live check decides it; a model without a
        spec here is judged by its token cap alone."""
        costs = costs or CostModel.build(outcomes.values())
        windows = {spec.name: spec.context_window for spec in specs}
        entries: dict[OutcomeKey, _Entry] = {}
        for record in records:
            for model in ladder:
                outcome = outcomes.get((record.id, model))
                if outcome is None:
                    continue
                per = costs.votes(outcome)
                cum = tuple(itertools.accumulate(per))
                answers = tuple(_normalize(v.text, record.match) for v in outcome.votes)
                first = outcome.votes[0] if outcome.votes else None
                entries[(record.id, model)] = _Entry(
                    answers, tuple(graded(outcome, record)), cum,
                    first.signals if first is not None else None,
                    first is not None and was_cut(first.output_tokens, grading.max_tokens_for(record.match),
                                                  outcome.prompt_tokens, windows.get(model)),
                    outcome.prefix_key, costs.prefix_of(outcome), outcome.source == "too_long",
                )
        return cls(entries, records, ladder, costs.unit)

    def simulate(
        self,
        assignments: Mapping[str, str],
        thresholds: Mapping[str, float],
        quality: "QualityCheck",
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        p_correct: Mapping[OutcomeKey, float] | None = None,
        votes: int = 1,
        agreement: Sequence[str] = (),
    ) -> SimResult:
        """Walk every record up the ladder on its recorded votes (`ladder.walk`): see the
        module function `simulate`.

        With `p_correct` (each (query, model)'s deferral estimate, `deferral.deferral_p`),
        the rungs below the top run the deferral check on `votes` votes and the top rung
        answers greedily, as a router calibrated with it does; `agreement` rungs run the
        agreement check (`ladder.Policy.agreement_rungs`), and so does a deferral rung on an
        answer `p_correct` has no estimate for (recorded without log-probabilities).
        """
        policy = Policy(tuple(self.ladder), thresholds, quality, deferral_votes=votes if p_correct is not None else None,
                        agreement_rungs=frozenset(agreement))
        shared = policy.rungs()
        traces = []
        visited: list[_Entry] = []  # the entry of every step, in order, for the examples' shares
        for record in self.records:
            start = assignments.get(record.id)
            if start is None:
                raise CreError(f"query {record.id!r} has no starting model in the assignments")
            try:
                rung = self.ladder.index(start)
            except ValueError:
                raise CreError(f"query {record.id!r} starts on {start!r}, which is not on the ladder") from None
            local = overrides.get(record.id) if overrides else None
            climb = Climb(policy.rungs(local) if local else shared, rung)
            steps: list[SimStep] = []
            drawn: list[RecordedVotes] = []

            def votes_for(r: Rung, qid: str = record.id) -> RecordedVotes:
                drawn.append(RecordedVotes(self._entry(qid, r.model), qid, r, p_correct))
                return drawn[-1]

            def after(r: Rung, v: Verdict, recorded: Any, steps: list[SimStep] = steps) -> None:
                # Every vote drawn is paid for, as the live step pays them: a wave may draw more
                # than the decision used (`quality.decide` stops early on the first of them).
                paid = recorded.entry.cumcost[max(recorded.drawn, v.used) - 1]
                if recorded.entry.too_long:  # passed over: no vote drawn, as the live step of one says
                    steps.append(SimStep(r.model, 0.0, 0, False, paid))
                else:
                    steps.append(SimStep(r.model, v.agreement, v.used, v.kept, paid))
                visited.append(recorded.entry)

            walk(climb, votes_for, after)
            rung_, verdict = climb.verdicts[-1]
            entry = drawn[-1].entry
            answer = "" if verdict.answer == LABEL else verdict.answer
            traces.append(QueryTrace(record.id, start, steps, answer, entry.correct[verdict.index], sum(s.cost for s in steps)))
        return SimResult(_with_prefixes(traces, visited), self.unit,
                         prefixes={e.prefix_key: e.prefix_cost for e in visited if e.prefix_key})

    def _entry(self, qid: str, model: str) -> "_Entry":
        entry = self.entries.get((qid, model))
        if entry is None:
            raise CreError(
                f"no recorded outcome for query {qid!r} on {model!r}: collect outcomes "
                "for every ladder model first (`cre fit` does)"
            )
        return entry


# What a label-only outcome (a correctness label, no recorded answer) offers the engine as its
# one vote: an answer of known correctness that no model wrote, so never empty.
LABEL = "\x00label"


class RecordedVotes:
    """A rung's recorded votes for one query, drawn as the live check draws them (`ladder.Votes`)."""

    __slots__ = ("entry", "qid", "rung", "p_table", "drawn")

    def __init__(self, entry: "_Entry", qid: str, rung: Rung, p_table: Mapping[OutcomeKey, float] | None) -> None:
        self.entry, self.qid, self.rung, self.p_table = entry, qid, rung, p_table
        self.drawn = 0

    def more(self, count: int) -> Sequence[str]:
        entry, rung = self.entry, self.rung
        # Only a rung that runs the deferral check reads P(correct): the top rung's greedy
        # answer and a deferral router's agreement rungs take votes as the agreement check does.
        deferral = self.p_table is not None and rung.check == DEFERRAL
        if entry.too_long:
            # The prompt does not fit this rung's model: `cre ask` passes the rung over (on the
            # top rung it fails). An empty answer, graded wrong, is one no check keeps, so the
            # query moves up as it does live, or ends wrong on the top rung; and no more follow.
            out: Sequence[str] = () if self.drawn else ("",)
            self.drawn += len(out)
            return out
        if not entry.answers:
            if deferral:
                # `cre calibrate` (and `cre eval` of a router it calibrated) meets this on a
                # router fitted from labels alone, so the message says the two ways out.
                raise CreError(
                    f"query {self.qid!r} has only a correctness label for {rung.model!r}, no recorded "
                    "greedy answer, so the deferral check (which judges that answer) cannot be replayed on it. "
                    "Use the agreement check (`cre calibrate ROUTER --check agreement`), or give a log with a "
                    "reference answer for each query instead of labels, so the models run and their answers "
                    "are recorded"
                )
            if self.drawn or needed(rung.threshold, rung.k) > 1:
                # `cre calibrate --check agreement` never sweeps such a threshold for a model
                # with labels (`calibrate.label_only`), so it is the way to one that replays.
                raise CreError(
                    f"query {self.qid!r} has only a correctness label for {rung.model!r}, no recorded "
                    f"votes, so its quality check at threshold {rung.threshold} (more than one vote) cannot "
                    "be replayed. Collect votes for it (drop the label), or calibrate the router with "
                    "`cre calibrate ROUTER --check agreement`, which tunes that model's threshold among "
                    "those one vote decides"
                )
            # A label is one known vote; it decides only when one vote is enough.
            self.drawn = 1
            return (LABEL,)
        out = entry.answers[self.drawn : self.drawn + count]
        if not out and not deferral:
            raise CreError(
                f"query {self.qid!r} has {len(entry.answers)} recorded votes on {rung.model!r}, "
                f"fewer than the k={rung.k} this replay may need: collect outcomes with the "
                "same quality settings"
            )
        self.drawn += len(out)
        return out

    def p_correct(self, rung: Rung, answers: Sequence[str]) -> float | None:
        assert self.p_table is not None
        # Absent where the rung's model could not judge the answer (`quality.judge_deferral`).
        return self.p_table.get((self.qid, rung.model))


def join_runs(runs: Sequence[tuple[float, Mapping[str, float]]]) -> float:
    """The total cost of runs priced apart, each given as (its `SimResult.cost`, its
    `SimResult.prefixes`), as one run of all their answers would pay it: each answered-examples
    key once, not once a run (`costs.share_prefixes`). Calibration replays each fold as a run
    of its own, and the reference it is a share of is one run of the whole log: a router with
    examples paid them once a fold."""
    joined: dict[str, float] = {}
    for _, prefixes in runs:
        joined.update(prefixes)
    return sum(cost - sum(prefixes.values()) for cost, prefixes in runs) + sum(joined.values())


def _with_prefixes(traces: list[QueryTrace], visited: Sequence[_Entry]) -> list[QueryTrace]:
    """`traces` with each step's share of its shared examples' cost added (`costs.share_prefixes`)."""
    shares = share_prefixes([(e.prefix_key, e.prefix_cost) for e in visited])
    if not any(shares):
        return traces
    it = iter(shares)
    out = []
    for t in traces:
        added = [next(it) for _ in t.steps]
        steps = [replace(step, cost=step.cost + extra) for step, extra in zip(t.steps, added)]
        out.append(replace(t, steps=steps, cost=t.cost + sum(added)))
    return out


def simulate(
    assignments: Mapping[str, str],
    outcomes: Mapping[OutcomeKey, Outcome],
    records: Sequence["Record"],
    ladder: Sequence[str],
    thresholds: Mapping[str, float],
    quality: "QualityCheck",
    costs: CostModel | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> SimResult:
    """Replay the cascade on recorded votes, as `cre ask --router` would run it (an answer cut
    by the context window counts as cut only with `Replay.build`'s `specs`, which this leaves out:
    the agreement check, all it is used for, does not read it).

    Each record starts on `assignments[record.id]`. On each rung its recorded votes are
    normalised with `grading.normalize(text, record.match)` and decided by
    `quality.decide(votes, k, threshold, early_stop)`: accept, or escalate to the next
    larger rung; the top rung's decision is final. The threshold is
    `overrides[query_id][model]` when given, else `thresholds[model]`. A query's cost is the
    sum of the costs of the votes actually drawn on every rung it visited (vote 0 carries
    prompt processing). `costs` defaults to measured seconds. For many threshold settings
    on the same outcomes, build a `Replay` once and call its `simulate`.
    """
    return Replay.build(outcomes, records, ladder, costs).simulate(assignments, thresholds, quality, overrides)


@dataclass
class Data:
    """A labelled log prepared for replay: records, their clusters, and outcomes."""

    records: list["Record"]
    routes: list["RouteDecision"]  # each record's cluster and starting model, as `cre ask` routes it
    outcomes: dict["OutcomeKey", "Outcome"]
    costs: CostModel
    replay: Replay
    log_sha256: str = ""
    # Per record, how much its cluster's record speaks for it (`RouterFile.cluster_trust`):
    # calibration blends its deferral priors by it, as the live check does. Empty: full trust.
    trust: list[float] = field(default_factory=list)
    # Labelled queries of the log left out: too long for every rung's context (`outcomes.leave_out_too_long`).
    n_skipped_too_long: int = 0
    # Each record's prompt identity where the caller has hashed them already (`prepare`, to
    # leave some out); None: hashed when `prompt_ids` is first read.
    known_prompt_ids: InitVar[list[str] | None] = None

    def __post_init__(self, known_prompt_ids: list[str] | None) -> None:
        if known_prompt_ids is not None:
            self.prompt_ids = known_prompt_ids  # fills the cached_property: it is not hashed again

    @functools.cached_property
    def clusters(self) -> list[int]:
        # Cached: a calibration sweep reads it once per replayed query, thousands of times,
        # and rebuilding it each time was two thirds of `cre calibrate`'s run time.
        return [r.cluster for r in self.routes]

    @functools.cached_property
    def prompt_ids(self) -> list[str]:
        """Each record's prompt identity (`outcomes.prompt_sha256`): copies of a prompt (the
        same text under other ids) share it, and share the answers the store recorded for it."""
        return [prompt_sha256(r.prompt) for r in self.records]


# Rows with neither a reference nor labels named by line number, at most; the rest are counted.
UNLABELLED_SHOWN = 5


def prepare(
    router: "RouterFile",
    settings: "ModelConfig",
    log: Path,
    store: Path | None = None,
    reader: "LogOptions | None" = None,
    unit: str | None = None,
    leave_out: Container[str] | None = None,
    check: Callable[[Sequence[Record]], None] | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> Data:
    """Read `log` with `reader` (default: as the router's fit read its log), route every
    labelled query as `cre ask` would, and collect the missing outcomes. Rows with neither
    a reference nor labels are left out with a warning naming their lines. Queries whose
    `outcomes.prompt_sha256` is in `leave_out` (the fit and calibration logs', `cre eval
    --held-out-only`) are left out, and so, with a warning, are those too long for every
    rung's context without the router's examples (`outcomes.leave_out_too_long`), as `cre
    fit` leaves them out; one only its examples make too long is scored wrong. `check`, when
    given, is called with the labelled queries left to score before any model runs (it
    raises to refuse them: `cre calibrate`'s too few for its folds).

    With `sample` (`cre calibrate` of a router fitted with `--sample-per-cluster`: the fit's
    N and `seed`), only the labelled queries `fit_sample` draws are scored, and said so on
    stderr: on the fit's own log, the ones the fit ran the models on, so no model runs on a
    query the fit skipped; on another log, as many per cluster. `check` then counts those.

    Costs are priced afresh (today's `cre models bench` speeds or prices), never taken from
    the router's stored statistics, in `unit` when given (else the ladder's default unit,
    see `costs`).
    """
    from crecli import outcomes as outcomes_mod
    from crecli.costs import check_unit
    from crecli.errors import UsageError

    if unit is not None:
        check_unit(unit, "--cost-unit", UsageError)

    reader = reader or router.fit.reader
    read = reader.read(log)
    if read.bad:
        console.status(f"Skipped {len(read.bad)} bad line(s), first: {read.bad[0].source}: {read.bad[0].reason}")
    records = [r for r in read.records if r.labelled]
    if not records:
        # Worded for `cre calibrate` and `cre eval` alike, in the field names the log is read with.
        raise CreError(f"{log}: no labelled queries (a {reader.fields.reference!r} or {reader.fields.labels!r} field), "
                       "so no model can be scored on it; give a log with reference answers or labels")
    unlabelled = [r for r in read.records if not r.labelled]
    if unlabelled:
        # Left out as `cre fit` leaves them unmeasured (it clusters them only), but said:
        # `cre eval` reported the labelled rows' count alone, as if the log held no others.
        many = len(unlabelled) > 1
        them = "them" if many else "it"
        lines = ", ".join(r.source.rsplit(":", 1)[-1] if r.source else repr(r.id) for r in unlabelled[:UNLABELLED_SHOWN])
        more = ", …" if len(unlabelled) > UNLABELLED_SHOWN else ""
        console.warn(f"{log}: {len(unlabelled)} {'rows have' if many else 'row has'} neither a "
                     f"{reader.fields.reference!r} nor a {reader.fields.labels!r} field, so no model is scored on "
                     f"{them}: left out ({'lines' if many else 'line'} {lines}{more}); add a reference, or a label "
                     f"for every model of the ladder, to score {them}")
    outcomes_mod.check_measurable(records, router.ladder_names)  # as `cre fit` does, before any model runs
    sha_of: dict[str, str] | None = None  # each record's prompt identity, where hashed here: `Data.prompt_ids` keeps them
    if leave_out is not None:
        sha_of = {r.id: prompt_sha256(r.prompt) for r in records}
        held_out = [r for r in records if sha_of[r.id] not in leave_out]
        if not held_out:
            raise CreError(f"{log}: every labelled query is in the router's fit or calibration log; none is held out")
        if len(held_out) < len(records):
            console.status(f"Left out {len(records) - len(held_out)} queries that are in the router's fit or calibration log")
        records = held_out
    routes: "list[RouteDecision] | None" = None  # fit_sample routes the rows it draws
    if sample:
        labelled = len(records)
        records, routes = fit_sample(router, read.records, records, sample, seed)
        if read.sha256 == router.fit.log_sha256 and reader == router.fit.reader:
            console.status(f"Calibrating on the queries the fit sampled, at most {sample} per cluster "
                           f"(--sample-per-cluster {sample}): {len(records)} of {labelled} labelled queries")
        else:
            console.status(f"Calibrating on at most {sample} labelled queries per cluster, as the fit sampled its "
                           f"log (--sample-per-cluster {sample}): {len(records)} of {labelled}")
    if check is not None:
        check(records)
    ladder = router.ladder_names
    missing = [m for m in ladder if m not in settings.models]
    if missing:
        raise CreError(f"the router's ladder has {', '.join(missing)}, which your models.toml lacks")
    if routes is None:
        routes = assign(router, [r.prompt for r in records])
    shown_prompts = {q for c in router.clusters for q, _ in c.exemplars}
    if shown_prompts:
        keep = [i for i, r in enumerate(records) if r.prompt.strip() not in shown_prompts]
        if len(keep) < len(records):
            console.status(f"Left out {len(records) - len(keep)} queries that the router shows as answered "
                           "examples: they would be answered after their own answer")
        if not keep:
            raise CreError(f"{log}: every labelled query is one of the router's answered examples")
        records, routes = [records[i] for i in keep], [routes[i] for i in keep]
    path = store or outcomes_mod.default_store_path()
    if store is not None and not os.path.lexists(store):
        # A router does not record its fit's store, so a mistyped --store read as a new, empty
        # one and ran every model on every query, hours of runs, without a word.
        console.warn(f"--store {store}: no outcome store is there, so a new one is made and every model runs on "
                     f"the {len(records)} queries; to reuse recorded answers, pass the --store `cre fit` was given, "
                     "or leave --store out for the default store")
    with outcomes_mod.OutcomeStore(path) as st:
        found = outcomes_mod.collect(records, settings, st, router.quality, models=ladder)
        # Left out on the prompts alone, as `cre fit` leaves them out before it chooses
        # examples: one that only the router's examples make too long for every rung is
        # kept, and scored wrong, as `cre ask` passes each rung over and fails on the top one.
        measurable = {r.id for r in outcomes_mod.leave_out_too_long(records, found, ladder, log)}
        skipped = len(records) - len(measurable)
        if skipped:
            keep = [i for i, r in enumerate(records) if r.id in measurable]
            records, routes = [records[i] for i in keep], [routes[i] for i in keep]
        every = {(r.id, m): router.shots(d.cluster, m) for r, d in zip(records, routes) for m in ladder}
        shots = {key: examples for key, examples in every.items() if examples}
        if shots:
            with_shots = {rid for rid, _ in shots}
            shown = outcomes_mod.collect([r for r in records if r.id in with_shots], settings, st, router.quality,
                                         models=ladder, shots=shots)
            found = resolve_shots(found, shown, shots, lambda model: settings.get(model).keeps_examples)
    specs = [settings.get(m) for m in ladder]
    costs = CostModel.build(found.values(), specs, unit,
                            run_reuse(records, [d.cluster for d in routes], specs, unit))
    replay = Replay.build(found, records, ladder, costs, specs)
    trust = [router.cluster_trust(d.cluster, d.distance) for d in routes]
    ids = None if sha_of is None else [sha_of[r.id] for r in records]
    return Data(records, routes, found, costs, replay, read.sha256, trust, skipped, ids)


def run_reuse(records: Sequence["Record"], clusters: Sequence[int], specs: Sequence["ModelSpec"],
              unit: str | None = None) -> dict[tuple[str, str], int]:
    """Per (query id, model), the tokens the query shares at its start with the previous query
    of its cluster, with the log replayed as `cre batch` would answer it in this order, its
    chunks where the batch's would be, by each record's line (`costs.previous_prompts`,
    `costs.TokenCounts`), for `CostModel.build`; none in a unit where that is not free
    (`costs.Pricing.reuses`)."""
    if not Pricing.for_models(specs, unit).reuses:
        return {}
    with TokenCounts.for_specs(specs) as counts:
        return counts.of_run([r.id for r in records], [r.prompt for r in records], clusters, [s.name for s in specs],
                             lines=_lines(records))


def _lines(records: Sequence["Record"]) -> list[int] | None:
    """Each record's line in its log (`Record.source`, "file:line"), increasing; None where a
    record does not say (the records are then taken as the lines)."""
    out: list[int] = []
    for record in records:
        tail = record.source.rsplit(":", 1)[-1]
        if not tail.isdigit() or (out and int(tail) <= out[-1]):
            return None
        out.append(int(tail))
    return out


def assign(router: "RouterFile", prompts: Sequence[str]) -> list["RouteDecision"]:
    """Routes exactly as `cre ask` decides them (embedded in batches, with a progress bar)."""
    from crecli.embed import embed_texts
    from crecli.route import route_vectors

    return route_vectors(router, embed_texts(router.embedder, list(prompts)))


# A row of a log this near (cosine distance) the exemplar the router keeps of it: the
# float16 a router file stores exemplars in moves a row by about 1e-7 (`assign.stored_rows`).
SAME_ROW = 1e-4


def fit_sample(router: "RouterFile", rows: Sequence["Record"], records: Sequence["Record"], n: int,
               seed: int = 0) -> tuple[list["Record"], list["RouteDecision"]]:
    """Of `records`, labelled rows of `rows` (a log's rows as read, in log order), those that
    `cre fit --sample-per-cluster n --seed seed` runs the models on: the fit's own rule
    (`outcomes.sample_records`) on the clusters the fit put them in (`fit_clusters`), each
    with its route as `cre ask` decides it (`assign`). On the log the router was fitted on,
    read as the fit read it, that is the fit's sample, so no model runs on a query the fit
    skipped; on another log, as many per cluster."""
    from crecli.embed import embed_texts
    from crecli.outcomes import sample_records
    from crecli.route import route_vectors

    vectors = embed_texts(router.embedder, [r.prompt for r in rows])
    routes = route_vectors(router, vectors)
    clusters = fit_clusters(router, vectors, routes)
    at = {id(r): i for i, r in enumerate(rows)}
    where = [at[id(r)] for r in records]
    drawn = {id(r) for r in sample_records(records, [clusters[i] for i in where], n, seed)}
    kept = [(r, routes[i]) for r, i in zip(records, where) if id(r) in drawn]
    return [r for r, _ in kept], [d for _, d in kept]


def fit_clusters(router: "RouterFile", vectors: Any, routes: Sequence["RouteDecision"]) -> list[int]:
    """Each row's cluster as `cre fit` labelled it (`QueryClusterer.labels_`), for `vectors`
    embedding the rows of a log in order, `routes` their routes.

    The rows the fit's clustering placed are the router's exemplars, kept in log order with
    their labels: a row that is the next exemplar takes its label, which the assigner's
    vote among the nearest exemplars (its route) need not give it. Copies of a template
    share an embedding and may sit in several clusters, so only the order tells which
    exemplar a row is. The fit gave every other row (noise, or left out of a big log's
    clustering) the cluster the assigner routes it to. On the fit's log, read as it read
    it, that is every row's label; on another, mostly its routes. The routes alone would
    not do: one label off redraws much of `outcomes.sample_records`' sample, which draws
    the clusters one after another from one seeded generator."""
    from crecli.assign import as_matrix

    out = [d.cluster for d in routes]
    exemplars, labels = router.assigner.exemplars_, router.assigner.exemplar_labels_
    at = 0
    for i, row in enumerate(as_matrix(vectors, "fit_clusters")):
        if at == len(exemplars):
            break
        if 1.0 - float(row @ exemplars[at]) <= SAME_ROW:
            out[i] = int(labels[at])
            at += 1
    return out


def greedy(data: Data, idx: Sequence[int], model_of: Callable[[int], str]) -> tuple[float, float]:
    """Accuracy and mean cost of the greedy answer of model `model_of(i)` for each query i in
    `idx`: a prompt too long for its model is a wrong answer, and in no mean cost
    (`costs.mean_answer_cost`)."""
    entries = [data.replay.entries[(data.records[i].id, model_of(i))] for i in idx]
    return sum(e.correct[0] for e in entries) / (len(entries) or 1), greedy_cost(entries)


def greedy_cost(entries: Sequence[_Entry]) -> float:
    """The mean cost of `entries`' greedy answers, each with its share of the answered
    examples it shares, too-long ones left out (`costs.mean_greedy_cost`)."""
    return mean_greedy_cost((e.cumcost[0], e.too_long, e.prefix_key, e.prefix_cost) for e in entries)


def reference(data: Data, idx: Sequence[int], ladder: list[str]) -> tuple[float, float]:
    """Accuracy and mean cost of always using the strongest model (its greedy answer)."""
    return greedy(data, idx, lambda i: ladder[-1])
