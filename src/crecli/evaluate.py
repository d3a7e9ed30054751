"""`cre eval`: measure a router on a labelled log against baselines.

The cascade is replayed on recorded votes (`replay.Replay`), which walks the same ladder
engine as `cre ask` on the same seeded votes; outcomes missing from the store are
collected first (that does run models, once). The baselines are replayed on the same votes:
each model alone, the strongest model with a k-vote majority (when the fit recorded k > 1 votes
and the log holds them, not only labels), random routing at equal cost,
cluster routing without the quality check, the cascade without clusters (every query from
the smallest model, a deferral check given the prior of a prompt in no cluster), and the oracle.
`--live` also runs the real cascade (`live`), to check the replay against it. `pool` pools
reports on disjoint held-out sets into figures over all their queries (`bench/headline`
cross-fits with it).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from crecli import console
from crecli.deferral import deferral_p
from crecli.replay import Data, SimResult, greedy, greedy_cost

if TYPE_CHECKING:
    from crecli.calibrate import LogCheck
    from crecli.config import ModelConfig
    from crecli.querylog import LogOptions
    from crecli.routerfile import RouterFile


# Point names that `pool` (and readers of `cre eval --json`) pick points out by.
CASCADE = "cascade (this router)"
RANDOM = "random routing at equal cost"
SINGLE_SUFFIX = " only"  # "<model> only": one model answers every query greedily


@dataclass
class Point:
    name: str
    accuracy: float
    mean_cost: float
    escalation_rate: float | None = None
    note: str = ""


# ---------------------------------------------------------------- eval and baselines


@dataclass
class EvalReport:
    n: int
    unit: str
    cascade: dict[str, Any]
    reference: dict[str, float]
    retained: float | None  # cascade accuracy / strongest model's accuracy; None when that is 0
    cost_share: float | None  # cascade cost / strongest model's cost; None when that is 0
    oracle_gap: float  # oracle accuracy - cascade accuracy
    baselines: list[Point]
    per_cluster: list[dict[str, Any]]
    # Output tokens, and model seconds per output token (None unless costs are in seconds).
    tokens: dict[str, float | None]
    live: dict[str, Any] | None = None
    points: list[Point] = field(default_factory=list)
    # Hours since the speeds pricing bench-seconds were measured (`bench.speeds_age_hours`).
    speeds_age_hours: float | None = None
    # How many of the n queries are in the router's fit log (same `outcomes.prompt_sha256`).
    # None where the fit log could not be read to tell (`fit_log_prompts`); n where the log
    # is the fit log itself (same sha256).
    n_in_fit_log: int | None = None
    # How many are in its fit log or the log it was last calibrated on (which tuned its
    # cluster models and thresholds: `calibration_log_prompts`): their figures are in sample.
    # None where neither could be read to tell; n where the log is one of them itself.
    n_in_sample: int | None = None
    # Every query is in one of those logs: all the figures are in sample.
    in_sample: bool = False
    # Labelled queries of the log left out, not among the n: too long for every rung's context.
    n_skipped_too_long: int = 0


def _greedy_point(data: Data, name: str, starts: Mapping[str, str]) -> Point:
    return Point(name, *greedy(data, range(len(data.records)), lambda i: starts[data.records[i].id]))


def _oracle(data: Data, ladder: list[str]) -> Point:
    """The cheapest model whose greedy answer is right; the cheapest model when none is. A
    model the prompt is too long for is never picked (its answer costs nothing because there
    is none) while another can take it (`replay.prepare` leaves out those none can)."""
    n = len(data.records)
    correct = 0.0
    picks = []
    for r in data.records:
        every = [data.replay.entries[(r.id, m)] for m in ladder]
        entries = sorted([e for e in every if not e.too_long] or every, key=lambda e: e.cumcost[0])
        right = [e for e in entries if e.correct[0]]
        picks.append(right[0] if right else entries[0])
        correct += bool(right)
    return Point("oracle (cheapest correct model)", correct / n, greedy_cost(picks), note="ceiling; needs the answer key")


def random_at_cost(singles: Sequence[Point], target_cost: float, name: str = RANDOM) -> Point:
    """Expected accuracy of routing each query to a random model, at most at cost `target_cost`.

    The most accurate random routing that costs no more: a mixture of two single models whose
    costs bracket the target, mixed to cost it exactly (no mixture of more models does better
    at one cost), or a single model that costs less and is right more often than any such
    mixture. It was the two models next to each other in cost, which reads low where a dearer
    model is the less accurate for its price: on the default ladder the 0.5B lies under the
    line from gemma to the 1.5B. An analytic expectation, so no seed makes it look better or
    worse than it is.
    """
    by_cost = sorted(singles, key=lambda p: p.mean_cost)
    if target_cost < by_cost[0].mean_cost:
        return replace(by_cost[0], name=name, note="cascade is cheaper than every model")
    options = [replace(p, name=name, note=f"all {p.name.split(' ')[0]}") for p in by_cost if p.mean_cost <= target_cost]
    for lo in by_cost:
        for hi in by_cost:
            if lo.mean_cost <= target_cost <= hi.mean_cost and lo.mean_cost < hi.mean_cost:
                share = (target_cost - lo.mean_cost) / (hi.mean_cost - lo.mean_cost)
                note = f"{1 - share:.0%} {lo.name.split(' ')[0]}, {share:.0%} {hi.name.split(' ')[0]}"
                options.append(Point(name, (1 - share) * lo.accuracy + share * hi.accuracy, target_cost, note=note))
    # The first best: a single model at the target's cost is listed before its mixtures.
    return max(options, key=lambda option: option.accuracy)


def pool(held_out: Sequence[tuple[int, Sequence[Point]]]) -> list[Point]:
    """The points of `cre eval` reports on disjoint query sets, pooled over all their queries.

    `held_out` holds each report's query count and points (`cre eval --json` "n" and
    "points"; each point's fields as `Point`). Accuracy, cost and escalation rate are means
    over queries, so each pools as sum over sets of n x mean, divided by the total n: pooled
    accuracy is the share of all queries answered right. Random routing at equal cost is the
    exception: a mean of per-set mixtures is not a mixture at the pooled cost, so it is
    recomputed from the pooled single models at the pooled cascade cost. Every report must
    have the same points in the same order (one router recipe, one ladder).
    """
    if not held_out:
        raise ValueError("nothing to pool")
    names = [p.name for p in held_out[0][1]]
    for _, points in held_out:
        if [p.name for p in points] != names:
            raise ValueError(f"reports to pool have different points: {names} vs {[p.name for p in points]}")
    total = sum(n for n, _ in held_out)
    if total <= 0:
        raise ValueError("reports to pool hold no queries")
    pooled = []
    for i, name in enumerate(names):
        rows = [(n, points[i]) for n, points in held_out]
        escalates = all(p.escalation_rate is not None for _, p in rows)
        pooled.append(Point(
            name,
            sum(n * p.accuracy for n, p in rows) / total,
            sum(n * p.mean_cost for n, p in rows) / total,
            sum(n * (p.escalation_rate or 0.0) for n, p in rows) / total if escalates else None,
            rows[0][1].note,
        ))
    singles = [p for p in pooled if p.name.endswith(SINGLE_SUFFIX)]
    cascade = next(p for p in pooled if p.name == CASCADE)
    return [random_at_cost(singles, cascade.mean_cost) if p.name == RANDOM else p for p in pooled]


def replay_cascade(router: "RouterFile", data: Data) -> "SimResult":
    """The router's cascade replayed on every query: each starts where `cre ask` routes it."""
    starts = {r.id: route.model for r, route in zip(data.records, data.routes)}
    overrides = {r.id: info.thresholds for r, route in zip(data.records, data.routes)
                 if route.cluster >= 0 and (info := router.cluster(route.cluster)) and info.thresholds}
    return _replay(router, data, starts, overrides or None)


def _replay(router: "RouterFile", data: Data, starts: Mapping[str, str],
            overrides: Mapping[str, Mapping[str, float]] | None = None, clustered: bool = True) -> "SimResult":
    """The router's quality check (self-consistency or its deferral models) from `starts`.

    Not `clustered`, every query gets the deferral prior the router gives a prompt in no
    cluster (`RouterFile.priors` of cluster -1: each model's accuracy over the whole fit),
    so a baseline "without clusters" reads no prior or threshold of the query's cluster. Its
    recorded answers are those of `data`, though: with a router that shows answered examples,
    recorded after the examples of the query's cluster (`replay.prepare`), not without them."""
    rules = router.deferral
    if rules is None:
        return data.replay.simulate(starts, router.thresholds, router.quality, overrides)
    routes = data.routes
    p = deferral_p(data, range(len(data.records)), rules.models,
                   (lambda i, m: router.prior(routes[i].cluster, m, routes[i].distance)) if clustered
                   else (lambda i, m: router.prior(-1, m)), rules.votes)
    return data.replay.simulate(starts, router.thresholds, router.quality, overrides, p_correct=p, votes=rules.votes,
                                agreement=rules.agreement)


def evaluate(router: "RouterFile", data: Data) -> EvalReport:
    ladder = router.ladder_names
    quality = router.quality
    records = data.records
    starts = {r.id: route.model for r, route in zip(records, data.routes)}
    cascade = replay_cascade(router, data)

    singles = [_greedy_point(data, f"{m}{SINGLE_SUFFIX}", {r.id: m for r in records}) for m in ladder]
    # The top model's k-vote majority needs its votes: a log of correctness labels has none
    # to replay, and the whole eval failed on this one baseline (the cascade replays fine).
    # With k = 1 it is "<top> only" under a majority's name (its cost differing only where
    # prompts too long for the top cost nothing), so it is left out too.
    labels_only = any(data.outcomes[(r.id, ladder[-1])].source == "label" for r in records)
    top_vote = None if labels_only or quality.k < 2 else data.replay.simulate(
        {r.id: ladder[-1] for r in records}, {ladder[-1]: 1.0}, replace(quality, early_stop=False))
    no_qc = _greedy_point(data, "cluster routing, no quality check", starts)
    no_clusters = _replay(router, data, {r.id: ladder[0] for r in records}, clustered=False)
    oracle = _oracle(data, ladder)
    baselines = [
        *singles,
        *([Point(f"{ladder[-1]} with {quality.k}-vote majority", top_vote.accuracy, top_vote.mean_cost)]
          if top_vote is not None else []),
        random_at_cost(singles, cascade.mean_cost),
        no_qc,
        Point("cascade without clusters (start at the smallest)", no_clusters.accuracy, no_clusters.mean_cost,
              no_clusters.escalation_rate),
        oracle,
    ]
    ref = singles[-1]

    per: dict[int, list[Any]] = {}
    # Where each query started: a prompt beyond its cluster's reach starts on the fallback
    # model, not the cluster's (the column showed the cluster's for all).
    started: dict[int, Counter[str]] = defaultdict(Counter)
    for trace, c, r in zip(cascade.traces, data.clusters, records):
        per.setdefault(c, []).append(trace)
        started[c][starts[r.id]] += 1
    per_cluster = []
    for cid in sorted(per):
        traces = per[cid]
        info = router.cluster(cid) if cid >= 0 else None
        per_cluster.append({
            "cluster": cid,
            "n": len(traces),
            "start_model": info.model if info else router.fallback_model,
            "started_on": {m: started[cid][m] for m in ladder if started[cid][m]},
            "accuracy": sum(t.correct for t in traces) / len(traces),
            "mean_cost": sum(t.cost for t in traces) / len(traces),
            "escalation_rate": sum(t.escalated for t in traces) / len(traces),
            "answered_by": {m: sum(t.model == m for t in traces) for m in ladder},
        })

    out_tokens = 0
    for trace in cascade.traces:
        for step in trace.steps:
            votes = data.outcomes[(trace.query_id, step.model)].votes
            out_tokens += sum(v.output_tokens for v in votes[: step.used])
    tokens = {
        "output_tokens": float(out_tokens),
        # Only measured seconds divide into seconds per token; it was NaN otherwise, which
        # the report printed as "nan ms" and --json wrote as a bare NaN.
        "seconds_per_output_token": (cascade.cost / out_tokens) if out_tokens and data.replay.unit == "seconds" else None,
    }
    point = Point(CASCADE, cascade.accuracy, cascade.mean_cost, cascade.escalation_rate)
    return EvalReport(
        n=len(records),
        unit=data.replay.unit,
        cascade=cascade.summary(),
        reference={"accuracy": ref.accuracy, "mean_cost": ref.mean_cost},
        retained=cascade.accuracy / ref.accuracy if ref.accuracy else None,
        cost_share=cascade.mean_cost / ref.mean_cost if ref.mean_cost else None,
        oracle_gap=oracle.accuracy - cascade.accuracy,
        baselines=baselines,
        per_cluster=per_cluster,
        tokens=tokens,
        points=[point, *baselines],
    )


def live(router: "RouterFile", settings: "ModelConfig", data: Data, limit: int | None = None) -> dict[str, Any]:
    """Run the real cascade (`cre ask`) on the queries, beside the replay's figures for them.

    `router` is the router as loaded (with `--force` when given), so the live run answers
    with exactly what was replayed. Returns the live accuracy and time and, under
    "replay", the replayed accuracy on the same queries; "agreement" is the share of
    queries whose live answer is as correct as the replayed one.
    """
    from crecli.errors import PromptTooLong
    from crecli.escalate import Cascade

    records = data.records[:limit] if limit else data.records
    replayed_correct = {t.query_id: t.correct for t in replay_cascade(router, data).traces}
    correct = same = 0
    seconds = 0.0
    start = time.perf_counter()
    with Cascade(router, settings) as cascade:
        with console.progress() as bar:
            task = bar.add_task("live cascade", total=len(records))
            for r in records:
                try:
                    trace = cascade.ask(r.prompt, match=r.match, reference=r.reference)
                except PromptTooLong:
                    # The top rung's context does not fit it (the query passed over up to it, or
                    # started there): no answer, which the replay counts wrong too
                    # (`replay.RecordedVotes.more`).
                    right = False
                else:
                    # A query known only by correctness labels has no reference to grade by: its
                    # label for the model that answered is the verdict, as in the replay (it was
                    # counted wrong, understating live accuracy and agreement).
                    right = bool(trace.correct if trace.correct is not None else (r.labels or {}).get(trace.model))
                    seconds += trace.seconds
                correct += right
                same += right == replayed_correct[r.id]
                bar.advance(task)
    n = len(records)
    return {
        "n": n,
        "accuracy": correct / n,
        "model_seconds": seconds,
        "wall_seconds": time.perf_counter() - start,
        "replay": {"accuracy": sum(replayed_correct[r.id] for r in records) / n},
        "agreement": same / n,
    }


# What marks a plot `reports.plot` wrote, so that a later `--plot` may replace it and no
# other picture: every SVG plot's title (since the first), and a PNG plot's Software text chunk.
PLOT_TITLE = "cre eval: "
PLOT_SOFTWARE = "crecli"
_SVG_START = b'<svg xmlns="http://www.w3.org/2000/svg"'
_PNG_START = b"\x89PNG\r\n\x1a\n"
# matplotlib's own Software text ("Matplotlib version3.8.4, https://matplotlib.org/"), all
# that a PNG plot of a crecli from before the mark carries: its title is pixels, and its size
# (7 x 5 inches at 120 dpi) is any chart's. It is told, so the refusal can say what to do.
_MATPLOTLIB_SOFTWARE = b"tEXtSoftware\x00Matplotlib"


def is_plot(data: bytes) -> bool:
    """Whether `data`, a file's bytes, is a plot `reports.plot` wrote. A PNG plot of a
    crecli from before PNG plots were marked is not: nothing in it tells it from any other
    chart matplotlib saved (`_MATPLOTLIB_SOFTWARE`), so it is refused, with how to proceed."""
    if data.startswith(_PNG_START):
        return b"tEXtSoftware\x00" + PLOT_SOFTWARE.encode() in data
    return data.startswith(_SVG_START) and f">{PLOT_TITLE}".encode() in data


# A plot `reports.plot` writes is tens of KB; what is past this is no plot of ours.
MAX_PLOT_BYTES = 8 << 20


def check_plot(path: Path) -> None:
    """Refuse a plot `reports.plot` could not write, before the work whose result it would
    draw (`run` checks it first: `--live` answers every query before the plot).

    An existing file is replaced only when it is empty or a plot `cre eval` wrote
    (`is_plot`): `--plot diagram.svg` replaced any picture with no word, where
    `-o` never replaces a file that is not a router or an export. An unmarked matplotlib
    PNG, perhaps an older crecli's plot, is refused with the command that deletes it."""
    import importlib.util
    import shlex

    from crecli import paths
    from crecli.errors import CreError, UsageError

    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise UsageError(f"--plot {path}: plots are .svg or .png")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise CreError("PNG plots need matplotlib (`pip install matplotlib`); or write .svg, which needs nothing")
    if paths.not_a_file(path) is not None:
        return  # nothing there (what else is there, `paths.check_output` has judged)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PLOT_BYTES)
    except OSError as exc:
        why = f"it cannot be read to tell ({exc.strerror or exc})"
    else:
        if not data or is_plot(data):
            return
        why = "it is not a plot cre eval wrote"
        if data.startswith(_PNG_START) and _MATPLOTLIB_SOFTWARE in data:
            raise CreError(
                f"--plot {path} exists and {why}: matplotlib saved it with no crecli mark, as cre eval did "
                "before it marked its PNG plots, and as any other matplotlib chart is (nothing tells them "
                "apart), so writing the plot there would destroy it. If it is an old cre eval plot, delete it "
                f"(`rm -- {shlex.quote(str(path))}`) and run again; otherwise choose another file name"
            )
    raise CreError(f"--plot {path} exists and {why}; writing the plot there would destroy it. "
                   "Choose another file name, or delete the file first")


def given_log(given: Path, sha256: str | None, option: str, done: str, what: str, by: str,
              reader: "LogOptions | None" = None) -> "LogCheck":
    """What `calibrate.check_log_bytes` found at `given`, a log named by `option`
    (--fit-log, --calibration-log) where the router's recorded path is not, if it holds the
    bytes the router records (`sha256`): with `reader`, its read (read once, its own sha256
    the one checked). Else a CreError that says what to do (`done`: what the router was on
    that log, "fitted"; `what` the log is to it, "fit log"; `by`: the command that read it,
    "`cre fit`")."""
    from crecli.calibrate import check_log_bytes
    from crecli.errors import CreError

    # Said first, in the option's words: without a sha256 no file named can be checked.
    if not sha256:
        raise CreError(f"{option} {given}: the router records no sha256 of its {what}, so no file can be "
                       f"checked against it; leave {option} out")
    found = check_log_bytes(given, sha256, reader)
    if found.problem == "gone":
        raise CreError(f"{option} {given}: {found.detail}; pass the log {by} read, or leave {option} out")
    if found.problem == "unreadable":
        raise CreError(f"{option} {given}: cannot be read ({found.detail})")
    if found.problem == "changed":
        raise CreError(f"{option} {given} is not the log the router was {done} on (sha256 {found.now[:12]}…, the router "
                       f"records {sha256[:12]}…); pass the file {by} read, unchanged")
    return found


def _in_logs(data: Data, n: int, shas: Sequence[str | None], prompts: set[str] | None) -> int | None:
    """How many of `data`'s `n` queries are in the logs of `shas` (their sha256s as the router
    records them) whose prompts are `prompts`: all of them where `data`'s log has those bytes,
    wherever the recorded file has gone; else those whose prompt is in `prompts`; None where
    neither can be told."""
    if data.log_sha256 and data.log_sha256 in shas:
        return n
    return None if prompts is None else sum(p in prompts for p in data.prompt_ids)


def fit_log_prompts(router: "RouterFile", given: Path | None = None) -> tuple[set[str] | None, str]:
    """The prompts of the log the router was fitted on (`outcomes.prompt_sha256` of each), read
    as the fit read it (its format too, whatever `given` is named); else None and why not.

    `given` (--fit-log) must hold the bytes the router records (its sha256): anything else is
    an error. Without it, the recorded log is read only where `calibrate.recorded_log` finds
    it unchanged; a router fitted on another machine gets None, and eval says nothing of it.
    Either is read once, and what was read is what was checked.
    """
    from crecli.calibrate import recorded_log
    from crecli.outcomes import prompt_sha256
    from crecli.routerfile import fit_log_path

    # The fit's own reader, not eval's overrides: these are the prompts the fit saw. In the
    # format the fit read (by the recorded name's extension where it was given none), not
    # the one `given`'s name would pick: the fit log renamed log.jsonl.bak read as text.
    reader = router.fit.reader.as_read_at(fit_log_path(router))
    if given is None:
        found, why = recorded_log(router, reader)
        if found is None or why:
            return None, why
    else:
        found = given_log(given, router.fit.log_sha256, "--fit-log", "fitted", "fit log", "`cre fit`", reader)
    assert found.read is not None  # checked with a reader, and unchanged
    return {prompt_sha256(r.prompt) for r in found.read.records}, ""


def calibration_log_prompts(router: "RouterFile", given: Path | None = None) -> tuple[set[str] | None, str]:
    """The prompts of the log the router was last calibrated on (`outcomes.prompt_sha256` of
    each), read as the calibration read it (its format too, whatever `given` is named), where
    `calibrate.recorded_calibration_log` finds it unchanged; else None and why not. An empty
    set where the router records no calibration log, or records its fit log (same sha256):
    that adds nothing to the fit's.

    `given` (--calibration-log) is read instead, and must hold the bytes the router records,
    as --fit-log must (`given_log`); for a router never calibrated it is an error that says
    so. Either is read once, and what was read is what was checked."""
    from crecli.calibrate import recorded_calibration_log
    from crecli.errors import CreError
    from crecli.outcomes import prompt_sha256
    from crecli.querylog import LogOptions
    from crecli.routerfile import calibration_log_path

    if given is not None and router.fit.calibration is None:
        # Not "records no sha256 of its calibration log": that read as a router calibrated
        # by an older crecli, whose recalibration would be the fix.
        raise CreError(f"--calibration-log {given}: the router was never calibrated (`cre calibrate`), so it has "
                       "no calibration log to check a file against; leave --calibration-log out")
    cal = router.fit.calibration or {}
    # Read (with the calibration's reader) only where it adds prompts to the fit's.
    adds = bool(cal.get("log")) and not (cal.get("log_sha256") is not None
                                         and cal.get("log_sha256") == router.fit.log_sha256)
    reader = None
    if adds:
        # In the format the calibration read, as the fit log's (`fit_log_prompts`).
        reader = (LogOptions.from_dict(cal["reader"]) if cal.get("reader") else router.fit.reader).as_read_at(
            calibration_log_path(router))
    # Checked even where it would add nothing: a wrong file named is said, not ignored (only
    # hashed then, with no reader: its prompts are not wanted).
    found = None if given is None else given_log(given, cal.get("log_sha256"), "--calibration-log", "last calibrated",
                                                 "calibration log", "`cre calibrate`", reader)
    if reader is None:
        return set(), ""
    if found is None:
        found, why = recorded_calibration_log(router, reader)
        if found is None or why:
            return None, why
    assert found.read is not None  # checked with a reader, and unchanged
    return {prompt_sha256(r.prompt) for r in found.read.records}, ""


def run(
    log: Path,
    router_path: Path,
    settings: "ModelConfig",
    *,
    store: Path | None = None,
    plot: Path | None = None,
    run_live: bool = False,
    skip_bad: bool | None = None,
    max_line_bytes: int | None = None,
    force: bool = False,
    unit: str | None = None,
    fit_log: Path | None = None,
    calibration_log: Path | None = None,
    held_out_only: bool = False,
) -> EvalReport:
    """`cre eval`: outputs checked first, then the router loaded once (with `force`), the log
    read as the router's fit read its own (field names, format, skipping bad lines or not,
    line cap; `skip_bad` and `max_line_bytes` override when given), replayed against the baselines, and with `run_live`
    answered for real by the same loaded router.

    Its queries are looked up in the router's fit log (`fit_log`, else where the fit found
    it: `fit_log_prompts`) and the log it was last calibrated on (`calibration_log`, else
    where the calibration found it: `calibration_log_prompts`) to count those in sample;
    `held_out_only` leaves them out."""
    from crecli import paths, replay, routerfile
    from crecli.errors import CreError
    from crecli.querylog import check_log_file

    check_log_file(log)  # a wrong path is said first, not after the router loads
    if store is not None:
        paths.check_output(store, "--store", [("the log", log), ("the router", router_path)], example="outcomes.sqlite",
                           allow=paths.OWNED_STORE)
    if plot is not None:
        keep = [("the log", log), ("the router", router_path), (paths.KEEP_STORE, store),
                *[("a models.toml", Path(f)) for f in settings.sources]]
        paths.check_output(plot, "--plot", keep, example="frontier.svg")
        check_plot(plot)  # before the replay (and --live's answers), not after
    router = routerfile.load(router_path, settings, force=force)
    # Before `prepare`, which may run every model: a wrong --fit-log or --calibration-log fails first.
    fitted, why = fit_log_prompts(router, fit_log)
    if held_out_only and fitted is None:
        raise CreError(f"--held-out-only needs the router's fit log: {why}; pass --fit-log FILE")
    calibrated, why = calibration_log_prompts(router, calibration_log)
    if held_out_only and calibrated is None:
        raise CreError(f"--held-out-only needs the log the router was last calibrated on: {why}; pass the "
                       "log as it was with --calibration-log FILE, or calibrate again on the log where it is now "
                       "(`cre calibrate ROUTER --log FILE`)")
    # Unknown (None) unless some log read adds prompts: a calibration on the fit log itself, or
    # none, reads as the empty set, which beside an unread fit log would count 0 in sample.
    seen = None if fitted is None and not calibrated else (fitted or set()) | (calibrated or set())
    reader = router.fit.reader.overridden(skip_bad, max_line_bytes)
    data = replay.prepare(router, settings, log, store, reader, unit, leave_out=seen if held_out_only else None)
    report = evaluate(router, data)
    report.n_skipped_too_long = data.n_skipped_too_long
    # Nothing said so before: an eval of the fit log, or of queries from it, printed in-sample
    # figures that read as a test; so did one of the log `cre calibrate` tuned on. A log with
    # the bytes of either is all in sample wherever the recorded file has gone.
    report.n_in_fit_log = _in_logs(data, report.n, (router.fit.log_sha256,), fitted)
    report.n_in_sample = _in_logs(data, report.n, (router.fit.log_sha256, (router.fit.calibration or {}).get("log_sha256")),
                                  seen)
    report.in_sample = report.n_in_sample == report.n
    from crecli.models.bench import speeds_age_hours

    report.speeds_age_hours = speeds_age_hours([settings.get(m) for m in router.ladder_names], data.replay.unit)
    if run_live:
        report.live = live(router, settings, data)
    return report
