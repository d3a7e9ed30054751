"""`cre calibrate`: choose a router's cluster models and quality-check thresholds held out.

A setting is a price of accuracy for the per-cluster model choice (`choice.choose_by_weight`)
plus one threshold per rung. `recalibrate` scores every setting by cross-validation (cluster
models chosen on the other folds, the cascade replayed on the held-out fold with the ladder
engine, `replay`), and in sample; it chooses on `estimate`, the mean of the two, and
`apply` writes the result into the router with every cost priced afresh. With the deferral
check it also fits each rung's P(correct) model (`deferral`). Only outcomes missing from
the store are collected first (that runs models, once); for a router fitted with
`--sample-per-cluster N`, only on at most N queries per cluster, on the fit's own log the
ones the fit drew (`replay.fit_sample`).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Container, Literal, Mapping, Sequence

from crecli import archive, console, paths
from crecli.choice import Choice, StatsTable, choose_by_weight, cluster_stats
from crecli.costs import Budget
from crecli.deferral import _table_prior, deferral_p, signal_report, train_deferral
from crecli.errors import CreError, UsageError
from crecli.quality import CHECKS, DEFAULT_CHECK, DeferralCheck, needed, threshold_grid
from crecli.replay import Data, Replay, SimResult, join_runs, prepare, reference

if TYPE_CHECKING:
    from crecli.config import ModelConfig
    from crecli.outcomes import OutcomeKey
    from crecli.quality import QualityCheck
    from crecli.querylog import LogOptions, LogRead
    from crecli.routerfile import RouterFile


# Per-cluster model choices are swept over these prices of accuracy (`choose_by_weight`);
# the threshold grid is swept for each. 0 is every cluster's cheapest model, the last its
# most accurate, which may be better than the strongest. Steps of 0.125 up to 2 and 0.25 up
# to 12: on the 1,400-query log the cheapest price keeping 98% fell between 3 and 6, where
# an older grid (3, 4, 6, 10) could only overshoot it, by about 0.8 points of cost
# (per-task choices, held out, ten fold seeds).
WEIGHT_GRID = tuple([i / 8 for i in range(16)] + [2 + i / 4 for i in range(41)] + [16.0, 1e6])


@dataclass(frozen=True)
class Setting:
    weight: float  # per-cluster model choice: `choose_by_weight(table, weight)`
    thresholds: tuple[tuple[str, float], ...]

    def label(self) -> str:
        """e.g. "weight 1.5 | thresholds 0.8/0.6/0.0" (thresholds smallest rung first, each
        `threshold_text`)."""
        return f"weight {self.weight:g} | thresholds " + "/".join(threshold_text(v) for _, v in self.thresholds)


def threshold_text(value: float) -> str:
    """A threshold as a setting's label shows it: cut (not rounded) to 4 decimals, so an
    agreement threshold j/k reads as the vote count it asks for (2/3 as 0.6666, 2 of 3 votes:
    `quality.needed`; "0.7", as `.1f` showed it, asks for 3) and every j/k of one k up to 64
    reads apart; a deferral threshold of the grid reads as it is (0.0, 0.2, 0.5)."""
    text = f"{math.floor(value * 10_000 + 1e-6) / 10_000:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


@dataclass(frozen=True)
class LogCheck:
    """What `check_log_bytes` found at `path`: `problem` None where it holds the bytes asked
    for (`read`: the file as a reader read it, where one was given); else "gone" (no regular
    file there: `detail` says what is, `paths.not_a_file`), "unchecked" (a file, but no
    sha256 to check it by), "unreadable" (`detail`: the system's words) or "changed" (`now`:
    its sha256 now)."""

    path: Path
    problem: Literal["gone", "unchecked", "unreadable", "changed"] | None = None
    detail: str = ""
    now: str = ""
    read: "LogRead | None" = None


def recorded_log(router: "RouterFile", reader: "LogOptions | None" = None) -> tuple[LogCheck | None, str]:
    """The log the router was fitted on, where the fit found it: what `check_log_bytes` found
    there (with `reader`, its read), and why it is not read where that is not the bytes the
    fit recorded ("" where it is). None for the check where the router records no log.

    The fit records the log's path (absolute, or relative to the router file:
    `routerfile.fit_log_path`) and sha256. The recorded path is read only if it
    still holds those bytes (a router that records no sha256 names no file to read): a router
    file may come from someone else, and must not choose which of this machine's files every
    model runs over (`cre calibrate`) or which are read (`cre eval`'s in-sample count).
    """
    from crecli.routerfile import fit_log_path

    return _unchanged(fit_log_path(router), router.fit.log_sha256, "fitted", "fit log", reader)


def recorded_calibration_log(router: "RouterFile", reader: "LogOptions | None" = None) -> tuple[LogCheck | None, str]:
    """The log the router was last calibrated on (`routerfile.calibration_log_path`), on the
    terms `recorded_log` reads the fit log on: only while it holds the bytes recorded."""
    from crecli.routerfile import calibration_log_path

    return _unchanged(calibration_log_path(router), (router.fit.calibration or {}).get("log_sha256"),
                      "calibrated", "calibration log", reader)


def check_log_bytes(path: Path, sha256: str | None, reader: "LogOptions | None" = None) -> LogCheck:
    """Whether `path` is a file that holds the bytes of `sha256`: the one check of a log a
    router records (`recorded_log`, `recorded_calibration_log`) and of a log named for it
    (`cre eval --fit-log`, `--calibration-log`: `evaluate.given_log`), which each word what
    it found for its own reader.

    With `reader` the file is read with it, and the read's own sha256 (taken as it reads)
    checked: a log read for its prompts is read once, and is the bytes checked."""
    why_not = paths.not_a_file(path)
    if why_not is not None:
        return LogCheck(path, "gone", why_not)
    if not sha256:
        # Without the bytes to check, the file's name alone would pick what is read.
        return LogCheck(path, "unchecked")
    from crecli.models.pull import sha256_file

    read = None
    try:
        if reader is None:
            now = sha256_file(path)
        else:
            try:
                read = reader.read(path)
                now = read.sha256
            except (CreError, OSError):
                # A changed log may not read as the recorded one did (a bad line appended): that
                # it changed is what to say. Only a log that holds the recorded bytes and still
                # does not read says how it does not.
                now = sha256_file(path)
                if now == sha256:
                    raise
    except OSError as exc:
        return LogCheck(path, "unreadable", str(exc.strerror or exc))
    return LogCheck(path, "changed", now=now) if now != sha256 else LogCheck(path, read=read)


def _unchanged(path: Path | None, sha256: str | None, done: str, what: str,
               reader: "LogOptions | None" = None) -> tuple[LogCheck | None, str]:
    """What `check_log_bytes` found at `path` (read with `reader`, where given), and why it
    is not read where that is not the bytes of `sha256` (`done`: what the router was on that
    log, "fitted"; `what` the log is to it, "fit log"); None for it where `path` is None."""
    if path is None:
        return None, f"the router does not record the log it was {done} on"
    recorded = str(path)
    found = check_log_bytes(path, sha256, reader)
    if found.problem == "gone":
        why = "is not there any more (moved or deleted)" if found.detail == "not found" else found.detail
        return found, f"the router was {done} on {recorded}, which {why}"
    if found.problem == "unchecked":
        return found, f"the router names {recorded} as its {what} but records no sha256 of it, so it is not read unasked"
    if found.problem == "unreadable":
        return found, f"{path}: cannot be read ({found.detail})"
    if found.problem == "changed":
        return found, (f"{recorded} has changed since the router was {done} on it (sha256 "
                       f"{(sha256 or '')[:12]}… then, {found.now[:12]}… now)")
    return found, ""


def fitted_log(router: "RouterFile", log: Path | None = None) -> Path:
    """`log` when given, else the log the router was fitted on, where the fit found it, if
    it still holds the bytes the fit recorded (`recorded_log`).

    A log no longer there, changed since (appended to), or unchecked (no sha256 recorded) is
    an error that says to pass --log; with --log naming it, `check_log` warns instead.
    """
    if log is not None:
        return log
    found, why = recorded_log(router)
    if found is not None and not why:
        return found.path
    # Where the recorded file is still there (changed, unchecked or unreadable), it is what
    # --log would name.
    if found is not None and found.problem != "gone":
        raise CreError(f"{why}; pass --log {found.path} to calibrate on it as it is now")
    raise CreError(f"{why}; pass --log FILE to calibrate on the log where it is now")


def check_log(router: "RouterFile", log: Path, data: Data) -> None:
    """Warn when the router's own log changed since the fit (its sha256 differs)."""
    from crecli.routerfile import fit_log_path

    fit, recorded = router.fit, fit_log_path(router)
    # Resolved: --log may name the recorded file by another path.
    if fit.log_sha256 and data.log_sha256 and data.log_sha256 != fit.log_sha256 and recorded is not None \
            and recorded.resolve() == log.resolve():
        console.warn(
            f"{log} has changed since the router was fitted on it (sha256 {fit.log_sha256[:12]}… then, "
            f"{data.log_sha256[:12]}… now); calibrating on it as it is now"
        )


def _table(data: Data, idx: Sequence[int], ladder: list[str]) -> StatsTable:
    return cluster_stats([data.clusters[i] for i in idx], [data.records[i] for i in idx], data.outcomes, ladder, data.costs)


def _simulate(
    data: Data,
    idx: Sequence[int],
    choice: Choice,
    thresholds: Mapping[str, float],
    quality: "QualityCheck",
    p_correct: Mapping[OutcomeKey, float] | None = None,
    votes: int = 1,
    agreement: Sequence[str] = (),
) -> SimResult:
    sub = Replay(data.replay.entries, [data.records[i] for i in idx], data.replay.ladder, data.replay.unit)
    # Where `cre ask` would start each: a prompt beyond its cluster's reach (or in none) starts
    # on the fallback, whatever model the cluster gets (`route.decide`).
    starts = {data.records[i].id: choice.models.get(data.clusters[i], choice.fallback) if data.routes[i].familiar
              else choice.fallback for i in idx}
    return sub.simulate(starts, thresholds, quality, p_correct=p_correct, votes=votes, agreement=agreement)


def sweep(data: Data, fit_idx: Sequence[int], eval_idx: Sequence[int], ladder: list[str], quality: "QualityCheck",
          labelled: Container[str] = ()) -> list[tuple[Setting, SimResult]]:
    """Every (weight, thresholds) setting: cluster models chosen on `fit_idx`, replayed on `eval_idx`."""
    return _replay_grid(data, _table(data, fit_idx, ladder), eval_idx, _agreement_combos(ladder, quality.k, labelled), quality)


def label_only(data: Data, ladder: Sequence[str]) -> list[str]:
    """The ladder models with a label-only outcome (a correctness label, no recorded votes)
    for some query of `data`. A label is one vote of known correctness: only an agreement
    threshold that one vote decides can be replayed on it (`replay.RecordedVotes.more`)."""
    found = {m for (_, m), e in data.replay.entries.items() if not e.answers and not e.too_long}
    return [m for m in ladder if m in found]


def _agreement_grid(grid: Sequence[float], k: int, labelled: bool) -> list[float]:
    """`grid`'s agreement thresholds a rung can be replayed at: for a model with labels
    (`label_only`), those one vote decides (`quality.needed` at most 1)."""
    return [t for t in grid if not labelled or needed(t, k) <= 1]


def _agreement_combos(ladder: Sequence[str], k: int, labelled: Container[str] = ()) -> list[dict[str, float]]:
    """The agreement check's threshold settings: `threshold_grid(k)` for each rung below the
    top; the top rung either answers greedily or takes a 3-of-5 majority. A `labelled`
    model keeps to the thresholds a label can be replayed at (`_agreement_grid`)."""
    grids = [_agreement_grid(threshold_grid(k), k, m in labelled) for m in ladder[:-1]]
    return [{**dict(zip(ladder[:-1], combo)), ladder[-1]: top} for combo in itertools.product(*grids)
            for top in _agreement_grid((0.0, 0.6), k, ladder[-1] in labelled)]


def _deferral_combos(ladder: Sequence[str], agreement: Sequence[str] = (), k: int = 1,
                     labelled: Container[str] = ()) -> list[dict[str, float]]:
    """The deferral check's threshold settings: `DEFERRAL_GRID` for each rung below the top,
    whose greedy answer is final; `threshold_grid(k)` for the `agreement` rungs among them
    (those a `labelled` model can be replayed at, `_agreement_grid`)."""
    grids = [_agreement_grid(threshold_grid(k), k, m in labelled) if m in agreement else DEFERRAL_GRID
             for m in ladder[:-1]]
    return [{**dict(zip(ladder[:-1], combo)), ladder[-1]: 0.0} for combo in itertools.product(*grids)]


def _replay_grid(
    data: Data,
    table: StatsTable,
    eval_idx: Sequence[int],
    combos: Sequence[Mapping[str, float]],
    quality: "QualityCheck",
    p_correct: Mapping[OutcomeKey, float] | None = None,
    votes: int = 1,
    agreement: Sequence[str] = (),
) -> list[tuple[Setting, SimResult]]:
    """Every `WEIGHT_GRID` price x every thresholds in `combos`, cluster models chosen on
    `table` and the cascade replayed on `eval_idx`. Neighbouring prices often choose the
    same models; those reuse the first one's replays instead of repeating them."""
    out: list[tuple[Setting, SimResult]] = []
    done: dict[tuple[Any, ...], list[SimResult]] = {}
    for weight in WEIGHT_GRID:
        choice = choose_by_weight(table, weight)
        key = (tuple(sorted(choice.models.items())), choice.fallback)
        results = done.get(key)
        if results is None:
            results = done[key] = [_simulate(data, eval_idx, choice, t, quality, p_correct, votes, agreement)
                                   for t in combos]
        out.extend((Setting(weight, tuple(t.items())), r) for t, r in zip(combos, results))
    return out


@dataclass(frozen=True)
class Figures:
    accuracy: float
    mean_cost: float
    escalation_rate: float


def _pick(candidates: Sequence[tuple[Setting, Figures]], budget: Budget, ref: tuple[float, float]) -> tuple[Setting, Figures, bool]:
    """The setting that best meets `budget` (`Budget.rank`); if none meets it, the closest one."""
    ref_acc, ref_cost = ref
    # max() keeps the first of equal keys, so ties go to the earlier setting.
    setting, figures = max(candidates, key=lambda c: budget.rank(c[1].accuracy, c[1].mean_cost, ref_acc, ref_cost))
    return setting, figures, budget.rank(figures.accuracy, figures.mean_cost, ref_acc, ref_cost)[0]


def estimate(held_out: "Figures", in_sample: "SimResult | Figures") -> "Figures":
    """What calibration expects of a setting on new queries: the mean of its cross-validated
    and its in-sample figures.

    Held-out figures score cluster models chosen on four fifths of the log; the router keeps
    the models chosen on all of it. In-sample figures score those very models, on the
    queries they were chosen on. The first are noisier, the second flattering, most of all
    for a fitted deferral check and small clusters. With the tasks of the 1,400-query log as
    clusters (routing only, ten fold seeds, cross-fitted; `bench/price_choice.py`), picking
    the cheapest price that keeps 98% on held-out figures kept 98.0% [95.8-99.3] of the
    strongest model's accuracy at 80.9% [78.9-84.0] of its cost; on this mean, 98.1%
    [95.8-99.3] at 80.5% [78.9-82.7]; on in-sample figures, 98.1% at 80.0%. For 99%: 98.4% at
    86.3%, 98.4% at 83.2%, 98.9% at 82.6%. The mean is the hedge between the two: it gives
    up part of the in-sample rule's saving in exchange for never trusting a fitted model's
    score on its own training data alone. It flatters more as clusters shrink: on the
    480-query log (about 24 queries a cluster) in-sample figures overstated a price's
    accuracy by about 3 points and the mean by 1.5-2 (held-out figures: within about 0.8),
    so there calibration lands under its target. What a calibration reports as held out
    stays the cross-validated figures.
    """
    return Figures(
        (held_out.accuracy + in_sample.accuracy) / 2,
        (held_out.mean_cost + in_sample.mean_cost) / 2,
        (held_out.escalation_rate + in_sample.escalation_rate) / 2,
    )


def _with_chosen(front: list[tuple[Setting, Any]], setting: Setting, figures: Any) -> list[tuple[Setting, Any]]:
    """`front` with the chosen setting in it, in cost order, even where its held-out
    figures are beaten: it was chosen on `estimate`, not on those alone."""
    if any(s == setting for s, _ in front):
        return front
    return sorted([*front, (setting, figures)], key=lambda p: (p[1].mean_cost, -p[1].accuracy))


def frontier(points: Sequence[tuple[Setting, Any]]) -> list[tuple[Setting, Any]]:
    """The settings no other setting beats on both accuracy and cost, cheapest first."""
    ordered = sorted(points, key=lambda p: (p[1].mean_cost, -p[1].accuracy))
    front: list[tuple[Setting, Any]] = []
    for setting, result in ordered:
        if not front or result.accuracy > front[-1][1].accuracy + 1e-12:
            front.append((setting, result))
    return front


def folds(n: int, k: int, seed: int, prompts: Sequence[str] | None = None) -> list[list[int]]:
    """`k` folds of rows 0..n-1, drawn with `seed`: the t-th row of one shuffle goes to fold t % k.

    With `prompts` (each row's prompt identity, `Data.prompt_ids`), every copy of a prompt
    goes to the fold of its first copy in that shuffle, and the t-th distinct prompt to fold
    t % k. The outcome store records one answer per prompt, so copies in two folds would put
    a held-out query's own answer in the folds that choose its cluster's model, and the
    held-out figures would be partly in sample. A log without repeated prompts gets exactly
    the folds it got without `prompts`: the same shuffle, the same assignment.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if prompts is None:
        return [sorted(order[i::k]) for i in range(k)]
    fold_of: dict[str, int] = {}
    out: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        out[fold_of.setdefault(prompts[i], len(fold_of) % k)].append(i)
    return [sorted(fold) for fold in out]


def fold_numbers(parts: Sequence[Sequence[int]], n: int) -> list[int]:
    """Each of rows 0..n-1's fold in `parts` (`folds`' list): which fold held it out."""
    out = [0] * n
    for number, fold in enumerate(parts):
        for i in fold:
            out[i] = number
    return out


# The fewest queries a cross-validation fold may hold (`check_folds`).
MIN_PER_FOLD = 2


def check_folds(n: int, distinct: int, n_folds: int) -> None:
    """Refuse `n_folds`-fold cross-validation of `n` labelled queries with `distinct`
    distinct prompts unless each fold gets at least `MIN_PER_FOLD`; the advice is the most
    folds the log allows (at least 2), else the size of log it takes. `run` checks the log's
    labelled queries before any model runs, `recalibrate` the ones left to score (fewer,
    where some were left out)."""
    need = MIN_PER_FOLD * n_folds
    # Copies of a prompt share a fold (`folds`), so the distinct prompts are what is split.
    split, what = (n, f"{n} labelled queries") if n < need else (distinct, f"{distinct} distinct prompts among {n} "
                                                                             "labelled queries")
    if split >= need:
        return
    # Of the distinct prompts either way (never more than `n`): the folds split those, so
    # advice from `n` could name a count the distinct prompts then refuse.
    most = distinct // MIN_PER_FOLD
    fix = (f"use --folds {most} or a larger log" if most >= 2 else
           f"give a log of at least {2 * MIN_PER_FOLD} "
           + ("labelled queries" if n < 2 * MIN_PER_FOLD else "distinct labelled prompts"))
    raise CreError(f"only {what}: too few for {n_folds}-fold cross-validation, which "
                   + ("" if n < need else "keeps every copy of a prompt in one fold and ")
                   + f"needs at least {MIN_PER_FOLD} a fold ({need}); {fix}")


# P(correct) thresholds swept per rung below the top; 1.0 always escalates.
DEFERRAL_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def sweep_deferral(
    data: Data, fit_idx: Sequence[int], eval_idx: Sequence[int], ladder: list[str], quality: "QualityCheck", votes: int,
    agreement: Sequence[str] = (), labelled: Container[str] = (),
) -> tuple[list[tuple[Setting, SimResult]], dict[OutcomeKey, float]]:
    """Every (weight, P(correct) thresholds) setting of the deferral check, fitted on
    `fit_idx` and replayed on `eval_idx`; also the held-out P(correct) of `eval_idx`.
    The `agreement` rungs sweep agreement thresholds instead (`without_signals`)."""
    table = _table(data, fit_idx, ladder)
    # The top rung gets a model too, for the signal report only: its answer is final, but
    # its doubt is what a larger rung above it (a remote server) would act on.
    rules = {m: train_deferral(data, fit_idx, table, m, votes) for m in ladder}
    p = deferral_p(data, eval_idx, rules, _table_prior(data, table), votes)
    combos = _deferral_combos(ladder, agreement, quality.k, labelled)
    return _replay_grid(data, table, eval_idx, combos, quality, p, votes, agreement), p


def without_signals(data: Data, ladder: Sequence[str], runtime: Mapping[str, str] | None = None) -> dict[str, str]:
    """The rungs below the top that a deferral router runs with the agreement check, and why:
    their runtime gives no log-probabilities (`runtime`: model -> why, from
    `registry.reports_signals`), or none of their recorded greedy answers carries any. A
    deferral model for them would read the prior alone and judge every answer alike."""
    out = dict((runtime or {}).items())
    for model in ladder[:-1]:
        if model in out:
            continue
        recorded = [e for (_, m), e in data.replay.entries.items() if m == model and e.answers]
        if recorded and all(e.signals is None for e in recorded):
            out[model] = "none of its recorded answers has log-probabilities"
    return {m: out[m] for m in ladder[:-1] if m in out}


@dataclass
class Calibration:
    budget: Budget
    setting: Setting
    choice: Choice
    thresholds: dict[str, float]
    in_sample: dict[str, float]
    held_out: dict[str, float]
    estimate: dict[str, float]  # what the setting was chosen on (`estimate`)
    reference: dict[str, float]
    frontier: list[dict[str, Any]]
    n: int
    folds: int
    budget_met: bool
    seconds: float
    table: StatsTable | None = None  # every cluster's statistics on all queries, at today's costs
    unit: str = "seconds"  # of every cost figure
    result: SimResult | None = None  # the chosen setting replayed on all queries
    reference_result: SimResult | None = None  # every query on the strongest model
    deferral: DeferralCheck | None = None  # the fitted deferral check ("deferral" only)
    # Held-out AUROC per model and signal, over all answers and within clusters (`deferral.signal_report`).
    signals: dict[str, dict[str, Any]] | None = None
    check: str = DEFAULT_CHECK
    # The log calibrated on, as the router records it (`routerfile.log_record`), its sha256 and
    # how it was read: `cre eval` counts its queries as in sample. Set by `run`.
    log: str | None = None
    log_sha256: str | None = None
    reader: "LogOptions | None" = None
    n_skipped_too_long: int = 0  # labelled queries left out: too long for every rung's context
    # Clusters with no labelled query in the calibration log: the model each keeps from the
    # router (`apply`), so a report lists every cluster's model the router is written with.
    kept_models: dict[int, str] = field(default_factory=dict)


def recalibrate(
    router: "RouterFile",
    data: Data,
    budget: Budget,
    n_folds: int = 5,
    seed: int = 0,
    check: str = DEFAULT_CHECK,
    votes: int = 1,
    no_signals: Mapping[str, str] | None = None,
) -> Calibration:
    """Choose per-cluster models and the quality check's thresholds for `budget`, by cross-validation.

    A setting is a price of accuracy for the per-cluster model choice (`choose_by_weight`)
    plus one threshold per rung. Each setting is scored on held-out folds: its cluster models
    are chosen on the other folds and its cascade replayed on the fold, so a setting that
    merely fits the noise of small clusters scores badly. Its cluster models are then chosen
    once more on all queries for the router, and scored there too (in sample). The setting
    that meets the budget on `estimate` of the two at the least cost (or the best accuracy,
    for "max_cost") is chosen; the reported `held_out` figures stay the cross-validated ones.

    `check` "agreement" tunes self-consistency thresholds (votes needed). "deferral" fits
    one logistic deferral model per rung below the top on the other folds (greedy signals,
    the cluster prior and, with `votes` > 1, agreement), and tunes P(correct) thresholds;
    the final models are refitted on all queries. A rung without log-probabilities
    (`no_signals`: model -> why, its runtime gives none; or its recorded answers have none)
    gets the agreement check and agreement thresholds instead, with a warning naming it.
    """
    check_settings(router, check, votes)
    start = time.perf_counter()
    ladder = router.ladder_names
    quality = router.quality
    if check == "agreement" and quality.k == 1:
        console.warn("the router was fitted with one vote a query (--k 1), so the agreement check can only "
                     "escalate empty answers; use the default --check deferral, or refit with --k 5 to tune agreement")
    n = len(data.records)
    check_folds(n, len(set(data.prompt_ids)), n_folds)
    agreement: list[str] = []
    if check == "deferral":
        for model, why in without_signals(data, ladder, no_signals).items():
            agreement.append(model)
            console.warn(
                f"rung {model!r} gives no log-probabilities ({why}), so it runs the agreement check on "
                f"{quality.k} vote(s) instead of a deferral model"
                + ("; with one vote that check can only escalate empty answers: refit with --k 5 to give it votes"
                   if quality.k == 1 else "")
            )
    labelled = label_only(data, ladder)
    # With one vote a query every agreement threshold is one vote's; with more, those above
    # 1/k need more votes than a label is.
    narrowed = [m for m in labelled if check == "agreement" or m in agreement] if quality.k > 1 else []
    if narrowed:
        console.warn(
            f"{', '.join(narrowed)}: some outcomes are correctness labels without recorded votes, which only "
            f"a one-vote check can be replayed on, so thresholds above {1 / quality.k:g} are left out of the "
            "sweep for " + ("that model" if len(narrowed) == 1 else "those models")
        )
    totals: dict[Setting, list[float]] = {}
    runs: dict[Setting, list[tuple[float, dict[str, float]]]] = {}  # each fold's cost, joined as one run
    held_p: dict[OutcomeKey, float] = {}
    parts = folds(n, n_folds, seed, data.prompt_ids)
    fold_of = fold_numbers(parts, n)  # for the signal report's within-cluster AUROC
    for fold in parts:
        train = sorted(set(range(n)) - set(fold))
        if check == "deferral":
            swept, p = sweep_deferral(data, train, fold, ladder, quality, votes, agreement, labelled)
            held_p.update(p)
        else:
            swept = sweep(data, train, fold, ladder, quality, labelled)
        for setting, result in swept:
            t = totals.setdefault(setting, [0.0, 0.0])
            t[0] += result.accuracy * len(fold)
            t[1] += result.escalation_rate * len(fold)
            runs.setdefault(setting, []).append((result.cost, result.prefixes))
    # The folds' costs as one run of the log pays them, as the reference below is priced.
    held = [(setting, Figures(t[0] / n, join_runs(runs[setting]) / n, t[1] / n)) for setting, t in totals.items()]
    everything = list(range(n))
    ref = reference(data, everything, ladder)
    # The router's own cluster statistics and deferral models, from every query, replayed
    # on those same queries: the in-sample half of each setting's estimate.
    table = _table(data, everything, ladder)
    rules = None
    if check == "deferral":
        rules = DeferralCheck(votes, {m: train_deferral(data, everything, table, m, votes)
                                      for m in ladder[:-1] if m not in agreement}, tuple(agreement))
        p_all = deferral_p(data, everything, rules.models, _table_prior(data, table), votes)
        inside = dict(_replay_grid(data, table, everything, _deferral_combos(ladder, agreement, quality.k, labelled),
                                   quality, p_all, votes, agreement))
    else:
        inside = dict(_replay_grid(data, table, everything, _agreement_combos(ladder, quality.k, labelled), quality))
    estimates = [(setting, estimate(figures, inside[setting])) for setting, figures in held]
    setting, guess, met = _pick(estimates, budget, ref)
    figures = dict(held)[setting]
    choice = choose_by_weight(table, setting.weight)
    result = inside[setting]
    top_only = Choice({}, ladder[-1], 0.0, 0.0, 0.0, 0.0)
    reference_result = _simulate(data, everything, top_only, {ladder[-1]: 0.0}, quality)
    return Calibration(
        budget=budget,
        setting=setting,
        choice=choice,
        thresholds=dict(setting.thresholds),
        in_sample={"accuracy": result.accuracy, "mean_cost": result.mean_cost, "escalation_rate": result.escalation_rate},
        held_out={"accuracy": figures.accuracy, "mean_cost": figures.mean_cost, "escalation_rate": figures.escalation_rate},
        estimate={"accuracy": guess.accuracy, "mean_cost": guess.mean_cost, "escalation_rate": guess.escalation_rate},
        reference={"accuracy": ref[0], "mean_cost": ref[1]},
        frontier=[
            {"setting": s.label(), "accuracy": r.accuracy, "mean_cost": r.mean_cost,
             "escalation_rate": r.escalation_rate, "chosen": s == setting}
            for s, r in _with_chosen(frontier(held), setting, figures)
        ],
        n=n,
        folds=n_folds,
        budget_met=met,
        seconds=time.perf_counter() - start,
        table=table,
        unit=data.costs.unit,
        result=result,
        reference_result=reference_result,
        deferral=rules,
        check=check,
        signals=signal_report(data, held_p, ladder, votes, fold_of) if check == "deferral" else None,
    )


def apply(router: "RouterFile", cal: Calibration, settings: "ModelConfig | None" = None) -> "RouterFile":
    """The router with the calibrated cluster models, thresholds and budget, and every cost
    it stores priced afresh: each cluster's statistics, the cost unit and the expected and
    simulated figures all come from this calibration's costs, not from the fit's.

    With `settings`, the ladder's entries name the model files this calibration measured
    (`LadderEntry.of`): after `--force` on other files, the router no longer claims the ones
    it was fitted with, which it was not calibrated on.

    A cluster with no labelled query in the calibration log keeps its model, but its
    statistics are dropped: they cannot be re-priced, and stale costs must not stand
    beside fresh ones. The calibration record names that log (`Calibration.log`, its sha256
    and reader, where `run` set them), whose queries `cre eval` counts as in sample.
    """
    from crecli.routerfile import Expected, LadderEntry

    assert cal.table is not None and cal.result is not None and cal.reference_result is not None
    clusters = []
    stale = 0
    for c in router.clusters:
        fresh = cal.table.clusters.get(c.id)
        stale += fresh is None and bool(c.stats)
        stats = {m: s.to_dict() for m, s in fresh.models.items()} if fresh is not None else {}
        clusters.append(replace(c, model=cal.choice.models.get(c.id, c.model), thresholds={}, stats=stats))
    if stale:
        console.warn(f"{stale} cluster(s) have no labelled query in this log: their models are kept, their statistics dropped")
    fit = replace(
        router.fit,
        cost_unit=cal.unit,
        expected=Expected(cal.choice.expected_accuracy, cal.choice.expected_cost,
                          cal.choice.reference_accuracy, cal.choice.reference_cost),
        simulated=cal.result.summary(),
        simulated_reference=cal.reference_result.summary(),
        budget_met=cal.budget_met,
        calibration={
            "budget": cal.budget.to_dict(), "held_out": cal.held_out, "estimate": cal.estimate, "in_sample": cal.in_sample,
            "reference": cal.reference, "folds": cal.folds, "n": cal.n, "setting": cal.setting.label(),
            "check": cal.check, **({"votes": cal.deferral.votes} if cal.deferral is not None else {}),
            "date": paths.stamp(),
            **({"log": cal.log, "log_sha256": cal.log_sha256, "reader": cal.reader.to_dict() if cal.reader else None}
               if cal.log is not None else {}),
        },
    )
    ladder = router.ladder
    if settings is not None:
        # An entry nothing identifies here (an unpinned file not on disk, calibrated from
        # labels) keeps the router's pin: a None would let any file pass for it later.
        # The settings it answers with are the ones calibrated here all the same.
        ladder = [new if (new := LadderEntry.of(settings.get(e.name))).sha256 is not None
                  else replace(new, sha256=e.sha256, size=e.size) for e in router.ladder]
    return replace(router, clusters=clusters, thresholds=dict(cal.thresholds), budget=cal.budget.to_dict(), fit=fit,
                   deferral=cal.deferral, ladder=ladder)


def check_settings(router: "RouterFile", check: str, votes: int) -> None:
    """Refuse a quality check, or a vote count, that `router` cannot be calibrated with."""
    if check not in CHECKS:
        raise UsageError(f"--check {check!r}: unknown quality check; use one of {', '.join(CHECKS)}")
    k = router.quality.k
    if check == "deferral" and not 1 <= votes <= k:
        # Exit 1, not 2: the count is good in itself, only this router cannot take it (`UsageError`).
        raise CreError(f"--votes {votes}: the router records {k} vote(s) a query; use "
                       + (f"1 to {k}" if k > 1 else "1") + f", or refit with --k {votes} or more")


def run(
    router_path: Path,
    settings: "ModelConfig",
    budget: Budget,
    *,
    log: Path | None = None,
    output: Path | None = None,
    store: Path | None = None,
    skip_bad: bool | None = None,
    max_line_bytes: int | None = None,
    n_folds: int = 5,
    seed: int = 0,
    force: bool = False,
    check: str = DEFAULT_CHECK,
    votes: int = 1,
    unit: str | None = None,
) -> tuple[Calibration, Path]:
    """`cre calibrate`: load the router, read its log as the fit did (`skip_bad` and
    `max_line_bytes` override when given), recalibrate, write it.

    Outputs are checked before any work. Returns the calibration and where the router went.
    """
    from crecli import routerfile
    from crecli.querylog import check_log_file

    if log is not None:
        check_log_file(log)  # a wrong --log is said first, not after the router loads
    router = routerfile.load(router_path, settings, force=force)
    check_settings(router, check, votes)  # before `prepare`, which may run every model on a new log
    # The fit log found by its record is recorded as the fit records it; --log as given.
    recorded = routerfile.log_record(log, router) if log is not None else router.fit.log
    log = fitted_log(router, log)
    target = output or router_path
    if store is not None:
        paths.check_output(store, "--store", [("the query log", log), ("the router", router_path)], example="outcomes.sqlite",
                           allow=paths.OWNED_STORE)
    keep = [("the query log", log), (paths.KEEP_STORE, store), *[("a models.toml", Path(f)) for f in settings.sources]]
    paths.check_output(target, "-o", keep)
    if archive.check_replaceable(target, "-o") and not _same_router(target, router_path):
        # Said before the work, as `cre fit` says it: another router at -o went without a word.
        console.warn(f"-o {target}: another router file is there; this calibration replaces it when it ends "
                     "(stop now, or pass -o another.cre, to keep it)")
    reader = router.fit.reader.overridden(skip_bad, max_line_bytes)
    # The log's labelled queries are counted before `prepare` runs any model on them. A fit
    # with --sample-per-cluster ran the models on a sample of its log: calibration scores the
    # same sample (no model runs on what the fit skipped), and caps another log alike.
    data = prepare(router, settings, log, store, reader, unit,
                   check=lambda records: check_folds(len(records), len({r.prompt for r in records}), n_folds),
                   sample=router.fit.sample_per_cluster, seed=router.fit.seed)
    check_log(router, log, data)
    no_signals = {}
    if check == "deferral":
        from crecli.models import registry

        for name in router.ladder_names[:-1]:
            spec = settings.get(name)
            if not registry.reports_signals(spec):
                label = registry.signal_support(spec) if spec.backend == "openai" else "none"
                no_signals[name] = ("its runtime reports none" if spec.backend != "openai" else
                                    f"its server could not be asked: {label}; calibrate again when it answers"
                                    if label.startswith("unknown") else "its server returns none")
    cal = recalibrate(router, data, budget, n_folds=n_folds, seed=seed, check=check, votes=votes, no_signals=no_signals)
    cal = replace(cal, log=recorded, log_sha256=data.log_sha256 or None, reader=reader,
                  n_skipped_too_long=data.n_skipped_too_long,
                  kept_models={c.id: c.model for c in router.clusters if c.id not in cal.choice.models})
    check_unchanged(router_path, router.file_sha256, target)
    routerfile.save(apply(router, cal, settings), target)
    return cal, target


def _same_router(target: Path, router_path: Path) -> bool:
    """Whether writing `target` writes the router read from `router_path` (in place, by
    the same path or another to it)."""
    if target == router_path:
        return True
    try:
        return target.samefile(router_path)
    except OSError:  # one of them is not there: -o names another file
        return False


def check_unchanged(router_path: Path, loaded_sha256: str | None, target: Path) -> None:
    """Refuse to save a calibration in place (`target` is `router_path`, or another path to
    it) over a router file that is no longer the one loaded: a `cre fit -o ROUTER` that
    finished during a long calibrate was overwritten by the calibration of the router it
    replaced."""
    from crecli.models.pull import sha256_file

    if not _same_router(target, router_path):
        return
    try:
        now = sha256_file(router_path)
    except OSError:  # gone, or unreadable: not the file loaded either
        now = None
    if now is None or now != loaded_sha256:
        raise CreError(
            f"{router_path} changed while it was being calibrated (another `cre fit -o` or `cre calibrate` wrote "
            "it, or it was moved or deleted), so this calibration of the router it held was not saved over it. "
            f"Run `cre calibrate {router_path}` again to calibrate the router there now: the answers recorded in "
            "the outcome store are reused, not run again"
        )
