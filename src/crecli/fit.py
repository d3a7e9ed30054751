"""`cre fit`: the whole offline pipeline, from a labelled query log to a router file.

log -> embed -> reduce + cluster -> outcomes (run and grade every model) -> calibrate
(each cluster's cheapest adequate model, quality-check thresholds) -> router file
(`build` assembles it from the fitted pieces; `routerfile.save` writes it).

Running the models is the expensive step, and it is the one that resumes: outcomes are
stored by (prompt, model sha256, settings) in a SQLite store that commits after every
query, so a fit that is interrupted and run again runs no model twice. The rest is redone
on every run: reading the log, embedding it (the default TF-IDF embedder is fitted on the
log each time and skips the embedding cache; only a llama.cpp embedder caches vectors by
text hash), UMAP and HDBSCAN, and calibration.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from crecli import __version__, archive, console, paths
from crecli.choice import Choice, StatsTable, assignments_for, choose_models, cluster_stats
from crecli.console import status
from crecli.costs import BUDGET_EPS, Budget, CostModel
from crecli.fields import Field
from crecli.quality import DEFAULT_FIT_VOTES, DEFAULT_THRESHOLD, QualityCheck, default_thresholds, threshold_grid
from crecli.replay import Replay, SimResult, run_reuse

if TYPE_CHECKING:
    from crecli.assign import Assigner
    from crecli.config import ModelConfig
    from crecli.vectors import Embedder
    from crecli.outcomes import Outcome, OutcomeKey
    from crecli.querylog import FieldMap, LogOptions, Record
    from crecli.routerfile import FitRecord, RouterFile


@dataclass
class FitOptions:
    seed: int = 0
    n_components: int = 8
    n_neighbors: int | None = None
    min_cluster_size: int | None = None
    min_samples: int | None = None
    max_fit_rows: int = 20000
    sample_per_cluster: int | None = None
    # The votes `cre fit --k` records (DEFAULT_FIT_VOTES: the greedy answer alone).
    quality: QualityCheck = field(default_factory=lambda: QualityCheck(k=DEFAULT_FIT_VOTES))
    fmt: str | None = None
    fields: "FieldMap | None" = None
    skip_bad: bool = False
    store: Path | None = None
    truth_field: str | None = None  # e.g. "meta.source": report NMI/ARI against it; never used to route
    set_default: bool = False  # make the router the default for ask and batch (settings.toml)
    # Prompts of the served-query log (`--served`: this user's; `--served-log FILE`: exports)
    # join the embedding and clustering only: they carry no labels, so they choose no model.
    served: bool = False
    served_logs: list[Path] = field(default_factory=list)
    # Answered examples to try per (cluster, model) (`shots.choose_shots`); (0,): none.
    shots: tuple[int, ...] = (0,)

    @property
    def reader(self) -> "LogOptions":
        from crecli.querylog import FieldMap, LogOptions

        return LogOptions(fmt=self.fmt, fields=self.fields or FieldMap(), skip_bad=self.skip_bad)


@dataclass
class FitReport:
    router_path: Path
    n_records: int
    n_labelled: int
    n_bad: int
    n_clusters: int
    n_unclustered: int
    seconds: dict[str, float]
    model_seconds: float  # recorded model time of every outcome used, including reused ones
    outcomes_run: int
    outcomes_reused: int  # found recorded in the outcome store
    outcomes_labelled: int  # correctness labels from the log: neither run nor in the store
    truth: dict[str, float] | None
    clusters: list[dict[str, Any]]
    n_served: int = 0  # prompts from the served-query log that joined the clustering
    # With --shots: per cluster, model and number of examples, [right, scored] over the
    # cluster's queries other than its exemplars (what `shots.choose_shots` compared).
    shots: dict[str, dict[str, dict[str, list[int]]]] | None = None
    # Labelled queries left out of the measuring: too long for every rung's context.
    n_skipped_too_long: int = 0


def _truth_value(record: Any, dotted: str) -> str | None:
    """The record's value of --truth-field `dotted` as text ("meta.source" and "source"
    both name `meta`'s source), or None where the record has none (absent, or null)."""
    value: Any = {"meta": record.meta, **record.meta}
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def truth_labels(records: Sequence[Any], dotted: str, log_path: Path) -> list[str | None]:
    """Each record's --truth-field value (None where it has none), checked before any work.

    A field no record has is refused: a misspelt field was the text "None" on every row,
    which scored NMI 0 and ARI 0 as if the clusters were worthless. Rows that lack it are
    left out of the score, with a warning saying how many (a missing value is no class).
    """
    gold = [_truth_value(r, dotted) for r in records]
    missing = gold.count(None)
    if missing == len(gold):
        from crecli.errors import InputError

        # The names rows do have, spelt as the option takes them (`meta.source`), one level deep.
        have: set[str] = set()
        for r in records:
            for key, value in r.meta.items():
                have.update([f"meta.{key}.{sub}" for sub in value] if isinstance(value, dict) else [f"meta.{key}"])
        names = sorted(have)
        fields = (f"fields its rows have: {', '.join(names[:8])}" + (", ..." if len(names) > 8 else "")
                  if names else "its rows carry no field besides the query's own")
        raise InputError(f"--truth-field {dotted}: no row of {log_path} has that field ({fields}); "
                         "check the name, or leave --truth-field out")
    if missing:
        console.warn(f"--truth-field {dotted}: {missing} of {len(gold)} rows of {log_path} have no such field; "
                     f"NMI and ARI are over the other {len(gold) - missing}")
    return gold


class _Option(Field):
    """A command-line value a router records, checked by the rule its loader reads it with."""

    document = "option"


def _check_recordable(log_path: Path, out_path: Path, options: FitOptions) -> None:
    """What the router records of this fit, and settings.toml of its path, refused before any
    model runs where it could not be: each was refused only at the save, after the whole run."""
    from crecli.errors import InputError, UsageError
    from crecli.fields import FieldError
    from crecli.routerfile import log_record
    from crecli.safejson import has_surrogate

    fields = options.reader.fields
    for option, name in (("--prompt-field", fields.prompt), ("--reference-field", fields.reference),
                          ("--match-field", fields.match), ("--id-field", fields.id), ("--labels-field", fields.labels)):
        try:
            _Option(name, option).as_str()  # as `schema._reader` reads the router's field names
        except FieldError as exc:
            raise UsageError(f"{exc}: the router records the field names it was fitted with") from None
    if has_surrogate(log_record(log_path)):
        raise InputError(f"{os.fsencode(log_path)!r}: the log's name is not UTF-8, which the router, a JSON "
                         "manifest, records; rename the file")
    if options.set_default and has_surrogate(str(out_path.resolve())):
        raise UsageError(f"-o {os.fsencode(out_path)!r}: with --set-default settings.toml records the router's "
                         "path, and this one is not UTF-8; choose another name, or leave out --set-default")


def check_before_fit(log_path: Path, out_path: Path, settings: "ModelConfig", options: FitOptions) -> Path:
    """Everything a fit writes, checked before it starts; returns the outcome store's path.

    Each of these used to fail only when the router was written, after the whole run, or
    worse, succeed: `-o` naming the log replaced the log with the router.
    """
    _check_recordable(log_path, out_path, options)
    keep = [("the query log", log_path), (paths.KEEP_STORE, options.store)]
    keep += [("a served-query log", p) for p in options.served_logs]
    keep += [("a models.toml", Path(source)) for source in settings.sources]
    paths.check_output(out_path, "-o", keep)
    if archive.check_replaceable(out_path, "-o"):
        # Said before the work, not after: `-o` defaults to router.cre, so a refit in the
        # folder of a calibrated router replaced it with no word at the end of the run.
        console.warn(f"-o {out_path}: a router file is there; this fit replaces it when it ends "
                     "(stop now, or pass -o another.cre, to keep it)")
    if options.store is not None:
        paths.check_output(options.store, "--store", [("the query log", log_path), *keep[2:]],
                           example="outcomes.sqlite", allow=paths.OWNED_STORE)
    paths.writable_dir(paths.cache_dir())  # the embedding cache
    if options.set_default:
        paths.check_can_set_default()
    if options.store is not None:
        return options.store
    paths.writable_dir(paths.data_dir())
    return paths.outcome_store_file()


def fit(log_path: Path, out_path: Path, settings: "ModelConfig", budget: "Budget", options: FitOptions) -> FitReport:
    from crecli import cluster, embed, outcomes, routerfile, shots

    store_path = check_before_fit(log_path, out_path, settings, options)
    # Opened now, not after embedding and clustering: a file that is no outcome store (or
    # of another schema) is refused before that work. Whether it can be written is asked
    # only if a model must run (`OutcomeStore.require_writable`). Closed once the models
    # have run (below), or with this frame on an error before.
    store = outcomes.OutcomeStore(store_path)
    # Built now, so a bad [embedder] table is said before the log is read, not after.
    embedder = embed.make_embedder(settings.embedder, settings, seed=options.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    log = options.reader.read(log_path)
    if log.bad:
        status(f"Skipped {len(log.bad)} bad line(s), first: {log.bad[0].source}: {log.bad[0].reason}")
    logged = log.records
    served = _served_records(options, logged) if options.served or options.served_logs else []
    # Log rows first: a cluster's example prompts, shown by `cre inspect`, come from them first.
    records = logged + served
    if len(records) < 10:
        from crecli.errors import InputError

        raise InputError(f"{log_path}: only {len(records)} usable queries; clustering needs at least 10")
    # Before embedding and clustering: a misspelt field is said before that work.
    gold = truth_labels(logged, options.truth_field, log_path) if options.truth_field else None
    prompts = [r.prompt for r in records]
    seconds["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    status(f"Embedding {len(prompts)} prompts ({settings.embedder.get('kind', 'tfidf')})...")
    embedder = embedder.fit(prompts)
    X = embed.embed_texts(embedder, prompts)
    # A llama.cpp embedding model would otherwise stay loaded while every ladder model runs:
    # `cre fit` loads one model at a time.
    embedder.close()
    seconds["embed"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    status("Clustering (UMAP + HDBSCAN)...")
    clusterer = cluster.QueryClusterer(
        n_components=options.n_components,
        n_neighbors=options.n_neighbors,
        min_cluster_size=options.min_cluster_size,
        min_samples=options.min_samples,
        seed=options.seed,
        max_fit_rows=options.max_fit_rows,
    ).fit(X)
    labels = [int(x) for x in clusterer.labels_]
    seconds["cluster"] = time.perf_counter() - t0
    n_clusters = int(clusterer.n_clusters_)
    status(f"{n_clusters} clusters; {labels.count(-1)} of {len(labels)} queries unclustered")

    truth = None
    if gold is not None:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        # Over the log's rows that have the field only: served prompts have no truth field
        # to compare with, and zip stops before them.
        scored = [(g, c) for g, c in zip(gold, labels) if g is not None]
        truth = {
            "nmi": float(normalized_mutual_info_score([g for g, _ in scored], [c for _, c in scored])),
            "ari": float(adjusted_rand_score([g for g, _ in scored], [c for _, c in scored])),
        }

    t0 = time.perf_counter()
    # Only the log's rows can be labelled; zip stops before the served prompts.
    labelled = [(r, c) for r, c in zip(logged, labels) if r.labelled]
    if not labelled:
        # A warning, not a status line: the router written is one that sends everything to
        # the top rung, and the usual cause is a log whose answers sit under another name.
        fields = options.reader.fields
        if options.reader.as_read_at(log_path).fmt == "text" and sum(r.prompt.lstrip().startswith("{") for r in logged) * 2 > len(logged):
            # `cre fit queries.log` holding JSONL: each JSON line, its reference too, was a
            # prompt, and the advice below (field names) led nowhere.
            why = ("--format text was given" if options.fmt is not None
                   else "its name does not end in .jsonl, .json, .ndjson or .csv")
            console.warn(
                f"{log_path} was read as plain text ({why}), "
                "so each line is a prompt and none has a reference, yet most lines look like JSON objects: "
                "if it is JSONL, say so with --format jsonl. Every cluster starts on the fallback model "
                f"({settings.ladder[-1]})."
            )
        else:
            console.warn(
                f"no query has a reference (field {fields.reference!r}) or labels (field {fields.labels!r}), so no "
                f"model is measured: every cluster starts on the fallback model ({settings.ladder[-1]}). If the log "
                "names them otherwise, say so with --reference-field and --labels-field; else add `reference` (and "
                "`match`) or `labels` to route by cluster."
            )
    measured = [r for r, _ in labelled]
    if options.sample_per_cluster:
        measured = outcomes.sample_records(
            measured, [c for _, c in labelled], options.sample_per_cluster, options.seed
        )
    outcomes.check_measurable(measured, settings.ladder)
    cluster_of = {r.id: c for r, c in zip(logged, labels)}
    shot_plan = None
    with store:
        # What this fit ran, from the rows it committed and the runs it used uncommitted
        # (`OutcomeStore.ran`): a row count misses a greedy answer re-run to record its
        # signals (it replaces its row) and counts a concurrent fit's.
        before = store.ran
        results = outcomes.collect(measured, settings, store, options.quality)
        kept = outcomes.leave_out_too_long(measured, results, settings.ladder, log_path)
        too_long = len(measured) - len(kept)
        measured = kept
        # Every outcome the fit looked up, the answers after examples included (`apply`
        # then keeps one a query and model, so `results` alone would undercount them).
        looked_up: list[Mapping[Any, Any]] = [results]
        if len(options.shots) > 1 and measured:
            shot_plan = shots.choose_shots(measured, cluster_of, settings, store, options.quality, results, options.shots)
            looked_up = list(shot_plan.answered.values())
            measured, results = shot_plan.apply(measured, cluster_of, settings.ladder)
        # A label is taken from the log, not the store: counted as reused, a fresh store
        # said "0 model runs now, 108 reused from the store". Looked up once per count of
        # examples compared (--shots), but one label a (query, model).
        label_keys = [key for found in looked_up for key, o in found.items() if o.source == "label"]
        # Nor is a prompt too long for a model: neither run nor recorded (`outcomes.collect`).
        unanswered = sum(o.source == "too_long" for found in looked_up for o in found.values())
        needed = sum(len(found) for found in looked_up) - len(label_keys) - unanswered
        from_labels = len(set(label_keys))
        ran = store.ran - before
    seconds["outcomes"] = time.perf_counter() - t0
    model_seconds = sum(sum(v.seconds for v in o.votes) for o in results.values())

    t0 = time.perf_counter()
    decided = plan(
        records=measured,
        clusters={r.id: cluster_of[r.id] for r in measured},
        outcomes=results,
        settings=settings,
        budget=budget,
        quality=options.quality,
    )
    if shot_plan is not None:
        # Only clusters that show some model examples carry them: a router file holds as
        # few of the log's prompts as it needs.
        decided.shots = shot_plan.counts
        decided.exemplars = {cid: shot_plan.exemplars[cid] for cid in shot_plan.counts}
        for cid, counts in sorted(shot_plan.counts.items()):
            status(f"cluster {cid}: " + ", ".join(f"{m} shown {n}" for m, n in counts.items()) + " answered example(s)")
    seconds["calibrate"] = time.perf_counter() - t0

    router = build(
        settings=settings,
        embedder=embedder,
        assigner=clusterer.assigner_,
        records=records,
        labels=labels,
        plan=decided,
        budget=budget,
        quality=options.quality,
        fit=routerfile.FitRecord(
            # As given: absolute, or relative to the router file (`routerfile.log_record`). The
            # sha256 tells when the log has changed since.
            log=routerfile.log_record(Path(log_path)),
            log_sha256=log.sha256,
            reader=options.reader,
            date=paths.stamp(),
            n_queries=len(records),
            n_labelled=len(labelled),
            n_measured=len(measured),
            sample_per_cluster=options.sample_per_cluster or None,
            n_bad_lines=len(log.bad),
            n_clusters=n_clusters,
            n_unclustered=labels.count(-1),
            seed=options.seed,
            cluster_params={
                "n_components": int(clusterer.n_components_),  # as used, not as asked for
                "n_neighbors": int(clusterer.n_neighbors_),
                "min_cluster_size": int(clusterer.min_cluster_size_),
                "min_samples": int(clusterer.min_samples_),
                "fit_rows": int(len(clusterer.fit_index_)),
            },
            truth=truth,
        ),
    )
    routerfile.save(router, out_path)
    if options.set_default:
        status(f"Default router is now {out_path.resolve()} (stored in {paths.set_default_router(out_path)})")
    return FitReport(
        router_path=out_path,
        n_records=len(records),
        n_labelled=len(labelled),
        n_bad=len(log.bad),
        n_clusters=n_clusters,
        n_unclustered=labels.count(-1),
        seconds=seconds,
        model_seconds=model_seconds,
        outcomes_run=ran,
        # A row another fit adds to a shared store meanwhile counts as run here: never below 0.
        outcomes_reused=max(0, needed - ran),
        outcomes_labelled=from_labels,
        truth=truth,
        clusters=[c.__dict__ for c in router.clusters],
        n_served=len(served),
        n_skipped_too_long=too_long,
        shots=None if shot_plan is None else {
            str(cid): {m: {str(n): list(t) for n, t in per.items()} for m, per in models.items()}
            for cid, models in shot_plan.accuracy.items()
        },
    )


def build(
    settings: "ModelConfig",
    embedder: "Embedder",
    assigner: "Assigner",
    records: Sequence["Record"],
    labels: Sequence[int],
    plan: "Plan",
    budget: "Budget",
    quality: QualityCheck,
    fit: "FitRecord",
) -> "RouterFile":
    """The router `cre fit` writes: a fitted embedder and assigner and a calibration plan, assembled.

    `labels[i]` is the cluster of `records[i]` (every record of the log, measured or not).
    A cluster the plan has no model for (none of its records was labelled, as in a
    plain-text log) is kept, with no statistics, and starts on the fallback model: the
    router still shows the log's clusters, and a later fit with labels can fill them in.
    """
    from crecli.archive import SCHEMA_VERSION
    from crecli.routerfile import ClusterInfo, Expected, LadderEntry, RouterFile
    from crecli.schema import EXAMPLE_CHARS, EXAMPLES_PER_CLUSTER

    members: dict[int, list["Record"]] = {}
    for record, label in zip(records, labels):
        members.setdefault(int(label), []).append(record)
    clusters = []
    for cid in sorted(set(plan.choice.models) | {c for c in members if c >= 0}):
        model = plan.choice.models.get(cid, plan.choice.fallback)
        group = members.get(cid, [])
        types = Counter(r.match for r in group if r.match is not None)
        clusters.append(ClusterInfo(
            id=cid,
            size=len(group),
            model=model,
            answer_type=types.most_common(1)[0][0] if types else None,
            examples=[r.prompt[:EXAMPLE_CHARS] for r in group[:EXAMPLES_PER_CLUSTER]],
            stats=(
                {m: s.to_dict() for m, s in plan.table.clusters[cid].models.items()}
                if cid in plan.table.clusters else {}
            ),
            exemplars=[list(pair) for pair in plan.exemplars.get(cid, [])],
            shots=dict(plan.shots.get(cid, {})),
        ))
    choice = plan.choice
    fit = replace(
        fit,
        crecli_version=__version__,
        cost_unit=plan.unit,
        expected=Expected(choice.expected_accuracy, choice.expected_cost, choice.reference_accuracy, choice.reference_cost),
        simulated=plan.result.summary() if plan.result is not None else None,
        simulated_reference=plan.reference.summary() if plan.reference is not None else None,
        budget_met=plan.budget_met,
    )
    ladder = [LadderEntry.of(spec) for spec in settings.ladder_specs()]
    return RouterFile(
        schema_version=SCHEMA_VERSION,
        ladder=ladder,
        embedder=embedder,
        assigner=assigner,
        clusters=clusters,
        fallback_model=plan.choice.fallback,
        budget=budget.to_dict(),
        quality=quality,
        thresholds=dict(plan.thresholds),
        fit=fit,
    )


def _served_records(options: FitOptions, logged: list[Any]) -> list[Any]:
    """The served-query log's prompts as unlabelled records, each distinct prompt once.

    A prompt already in the fit log, or seen earlier in the served log, is dropped: the log's
    row is the one that counts, and many copies of one prompt would pile up at a single
    point, which HDBSCAN reads as a dense cluster of its own. A prompt over the fit's line
    cap is dropped, as the log's reader would drop it.
    """
    from crecli import servedlog
    from crecli.querylog import Record

    files = servedlog.fit_files(options.served, options.served_logs)
    reading = servedlog.read(files)
    servedlog.check_fit_reading(reading, options.served_logs)
    seen = {r.prompt for r in logged}
    taken_ids = {r.id for r in logged}
    cap = options.reader.fields.max_line_bytes
    records: list[Any] = []
    duplicates = too_long = 0
    for n, entry in enumerate(reading.entries, start=1):
        prompt = entry["prompt"]
        if prompt in seen:
            duplicates += 1
            continue
        if len(prompt.encode("utf-8")) > cap:
            too_long += 1
            continue
        seen.add(prompt)
        rid = f"served-{n}"
        while rid in taken_ids:  # a log that happens to use the same ids
            rid = "_" + rid
        taken_ids.add(rid)
        # No reference and no labels: `Record.labelled` is False, so no model is run on it and
        # calibration never sees it.
        records.append(Record(id=rid, prompt=prompt, meta={"served": True, "command": entry.get("command"),
                                                            "time": entry.get("time")}, source="served"))
    if not files:
        status("The served-query log is empty: no served prompts to add (see `cre log`).")
    else:
        skipped = [f"{duplicates} repeated", f"{too_long} over the line cap", f"{reading.bad} unreadable line(s)"]
        shown = [text for text in skipped if not text.startswith("0 ")]
        status(f"Adding {len(records)} served prompts to the clustering"
               + (f" ({', '.join(shown)} left out)" if shown else "") + ".")
    return records


# ---------------------------------------------------------------- the in-sample plan of `cre fit`



@dataclass
class Tuning:
    thresholds: dict[str, float]
    result: SimResult
    reference: SimResult  # every query on the strongest model, at its threshold
    met: bool  # whether the budget was met; if not, the closest setting is returned
    tried: int



def tune_thresholds(
    replay: Replay,
    assignments: Mapping[str, str],
    quality: "QualityCheck",
    budget: Budget,
    top_threshold: float = 0.0,
    grid: Sequence[float] | None = None,
) -> Tuning:
    """Each non-top model's threshold from `grid` (default `threshold_grid(k)`) for `budget`.

    The reference is every query answered by the strongest model at `top_threshold`.
    "retain": the cheapest setting whose accuracy is at least value x the reference's
    (ties: the more accurate). "max_cost": the most accurate setting whose cost is at most
    value x the reference's (ties: the cheaper). Remaining ties keep the default threshold
    (DEFAULT_THRESHOLD), then the lower one. If no setting meets the budget, the closest
    is returned with `met=False`: the most accurate for "retain", the cheapest for
    "max_cost". The search is exhaustive: len(grid) ** (rungs - 1) replays.
    """
    ladder = replay.ladder
    top = ladder[-1]
    grid = list(grid) if grid is not None else threshold_grid(quality.k)
    if not grid:
        raise ValueError("tune_thresholds needs a non-empty threshold grid")
    reference = replay.simulate({r.id: top for r in replay.records}, {top: top_threshold}, quality)
    # Settings closest to the defaults come first, so that where thresholds make no
    # difference on these records (a rung no query visits) the defaults are kept.
    combos = sorted(
        itertools.product(grid, repeat=len(ladder) - 1),
        key=lambda combo: sum(abs(t - DEFAULT_THRESHOLD) > BUDGET_EPS for t in combo),
    )
    if len(combos) > 1000:
        status(f"Replaying {len(combos):,} threshold settings ({len(grid)} per rung below the top)...")
    # Only the best so far is kept: every setting's per-query traces at once would hold
    # len(grid) ** (rungs - 1) x queries of them (gigabytes at --k 10 on five rungs).
    best: tuple[tuple[float, ...], dict[str, float], SimResult] | None = None
    for combo in combos:
        thresholds = {**dict(zip(ladder[:-1], combo)), top: top_threshold}
        result = replay.simulate(assignments, thresholds, quality)
        key = budget.rank(result.accuracy, result.cost, reference.accuracy, reference.cost)
        # Strictly better only: of equal keys the first stays, the defaults, then lower
        # thresholds (fewer votes).
        if best is None or key > best[0]:
            best = (key, thresholds, result)
    assert best is not None  # the grid is not empty
    key, thresholds, result = best
    return Tuning(thresholds, result, reference, key[0], len(combos))



@dataclass
class Plan:
    """Everything calibration decided, and the evidence for it."""

    table: StatsTable
    choice: Choice
    thresholds: dict[str, float]
    unit: str  # of every cost figure in the plan
    result: SimResult | None  # the cascade replayed on the records; None without votes
    reference: SimResult | None  # every record on the strongest model
    budget_met: bool | None  # by `result`, per `tune_thresholds`; None when not replayed
    # Answered examples (`cre fit --shots`, `choose_shots`): cluster -> [[prompt, answer]],
    # and cluster -> model -> how many of them it is shown.
    exemplars: dict[int, list[list[str]]] = field(default_factory=dict)
    shots: dict[int, dict[str, int]] = field(default_factory=dict)



def plan(
    records: Sequence["Record"],
    clusters: Mapping[str, int],
    outcomes: Mapping[OutcomeKey, Outcome],
    settings: "ModelConfig",
    budget: Budget,
    quality: "QualityCheck",
) -> Plan:
    """Choose each cluster's model for `budget`, then tune the thresholds on the same records.

    `clusters` maps each record id to its cluster. Costs are in price units when every
    ladder model has a price, else measured seconds (see `CostModel`). Threshold tuning
    replays recorded votes, so when any outcome is a label only, the default thresholds
    are kept and nothing is replayed.
    """
    ladder = list(settings.ladder)
    specs = settings.ladder_specs()
    labels = [int(clusters[r.id]) for r in records]
    costs = CostModel.build(outcomes.values(), specs, reused=run_reuse(records, labels, specs))
    table = cluster_stats(labels, records, outcomes, ladder, costs)
    choice = choose_models(table, budget)
    if any(o.source == "label" for o in outcomes.values()):
        console.warn(
            "some outcomes are correctness labels without recorded votes, so the quality-check "
            f"thresholds keep their defaults ({DEFAULT_THRESHOLD} below the top rung) instead of being tuned"
        )
        return Plan(table, choice, default_thresholds(ladder), costs.unit, None, None, None)
    replay = Replay.build(outcomes, records, ladder, costs, specs)
    tuning = tune_thresholds(replay, assignments_for(records, labels, choice), quality, budget)
    return Plan(table, choice, tuning.thresholds, costs.unit, tuning.result, tuning.reference, tuning.met)
