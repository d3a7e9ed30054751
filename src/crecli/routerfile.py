"""The portable router file: everything `cre ask --router` needs, in one file that is safe to open.

A router file is a zip archive of `manifest.json` and `.npy` arrays (`archive`), whose
manifest body holds the ladder, the clusters, the checks and the fit record (`schema`).
It is sent to teammates, so loading it never runs code, and every byte of it is checked
before it is used. This module holds the records a router is made of (`RouterFile`,
`ClusterInfo`, `LadderEntry`, `FitRecord`, `Expected`) and the two ways in and out:
`save` and `load`. `fit.build` assembles a new router at fit time.

Models are identified by sha256, not by path: a router fitted on one machine works on
another that has the same model files anywhere, under the same names in its models.toml.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crecli import __version__, archive, console
from crecli.archive import SCHEMA_VERSION
from crecli.costs import CostUnit
from crecli.errors import RouterFileError
from crecli.fields import FieldError, clean
from crecli.models.prompting import shots_of
from crecli.models.pull import model_identity
from crecli.quality import DeferralCheck, QualityCheck, blend_priors, trust
from crecli.querylog import LogOptions
from crecli.schema import FIT_FIELDS, Body, check_body

if TYPE_CHECKING:
    import numpy as np

    from crecli.assign import Assigner
    from crecli.config import ModelConfig, ModelSpec
    from crecli.ladder import Policy
    from crecli.vectors import Embedder


@dataclass
class ClusterInfo:
    id: int
    size: int
    model: str
    answer_type: str | None
    examples: list[str]
    stats: dict[str, dict[str, float]]  # per model: n, correct, accuracy, shrunk_accuracy, mean_cost
    thresholds: dict[str, float] = field(default_factory=dict)  # per-model override of RouterFile.thresholds
    # Answered examples from the cluster's labelled queries, as [prompt, answer] pairs, and
    # how many of them (from the first) each model is shown before a prompt; a model not
    # listed is shown none. Both are empty unless `cre fit --shots` chose some.
    exemplars: list[list[str]] = field(default_factory=list)
    shots: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Written only when used, so a router without shots reads as before.
        for key in ("exemplars", "shots"):
            if not data[key]:
                del data[key]
        return data


@dataclass(frozen=True)
class LadderEntry:
    name: str
    sha256: str | None  # `models.pull.model_identity`: None when nothing identified the file
    size: int | None
    # The settings it answered with (`config.ANSWER_SETTINGS`, `ModelSpec.answer_settings`):
    # None where a router from before did not record them, and for a remote rung's context
    # and unset repeat_penalty, its server's own (unknown, so never compared).
    prompt_format: str | None = None
    context: int | None = None
    repeat_penalty: float | None = None

    @classmethod
    def of(cls, spec: "ModelSpec") -> "LadderEntry":
        """The entry of the model `spec` is here: what `cre fit` and `cre calibrate` record as
        the file their figures were measured on, and the settings it answered with."""
        return cls(spec.name, model_identity(spec), spec.size, **spec.answer_settings())

    def otherwise_here(self, spec: "ModelSpec") -> list[tuple[str, Any, Any]]:
        """Each recorded setting that `spec` answers with otherwise (`ModelSpec.answer_settings`),
        as (setting, fitted value, value here): same weights, other answers, so the checks
        tuned on the fitted ones may not hold. Only settings known on both sides are
        compared: routers from before they were recorded are taken as they are, and so is a
        remote rung's server's own context or repetition penalty (unknown here; a rung moved
        behind a server, as docs/scale.md describes, is not warned about on every load for
        what nobody can tell). A larger context than the fit's changes no answer (it only
        leaves room for longer prompts), so only a smaller one counts."""
        from crecli.config import ANSWER_SETTINGS

        here = spec.answer_settings()
        changes = []
        for key in ANSWER_SETTINGS:
            fitted, local = getattr(self, key), here[key]
            if fitted is None or local is None or local == fitted or (key == "context" and local > fitted):
                continue
            changes.append((key, fitted, local))
        return changes


def _setting(key: str, value: Any) -> str:
    """A recorded answer setting in a message."""
    return f"{key} {value!r}"


def settings_phrase(changes: list[tuple[str, Any, Any]]) -> str:
    """`LadderEntry.otherwise_here`'s changes in words: what the fit had, and what is here."""
    fitted = ", ".join(_setting(key, old) for key, old, _ in changes)
    here = ", ".join(_setting(key, new) for key, _, new in changes)
    return f"fitted with {fitted}, and has {here} here"


def settings_advice(changes: list[tuple[str, Any, Any]]) -> str:
    """What to do about `LadderEntry.otherwise_here`'s changes. A smaller context is mended
    in models.toml, not by recalibrating: the outcome store keys answers by prompt format and
    penalty, not context, so `cre calibrate` would reuse the answers of the fitted context."""
    todo = []
    if any(key != "context" for key, _, _ in changes):
        todo.append("recalibrate with `cre calibrate` on this setup")
    todo += [f"give it context = {fitted} or more in models.toml (a prompt and answer that fit {fitted} "
             "tokens may be cut or refused here)" for key, fitted, _ in changes if key == "context"]
    return "; and ".join(todo)


@dataclass(frozen=True)
class Expected:
    """In-sample figures of the chosen cluster models (greedy answers, shrunk accuracy)."""

    accuracy: float
    cost: float
    reference_accuracy: float  # always the strongest model
    reference_cost: float


@dataclass(frozen=True)
class FitRecord:
    """What `cre fit` (and the last `cre calibrate`) recorded about how the router was made."""

    # The query log's path: absolute, or relative to the router file's folder (`log_record`).
    log: str | None = None
    log_sha256: str | None = None
    reader: LogOptions = LogOptions()  # how the log was read, so calibrate and eval read it alike
    date: str | None = None
    crecli_version: str = __version__
    cost_unit: CostUnit = "seconds"  # of every cost in the router: cluster stats, expected, simulated
    seed: int = 0
    n_queries: int = 0
    n_labelled: int = 0
    n_measured: int = 0
    # `cre fit --sample-per-cluster N`: the models ran on at most N labelled queries per
    # cluster, drawn with `seed` (`outcomes.sample_records`); `cre calibrate` draws the same
    # (`replay.fit_sample`). None: on every labelled query (and in routers written before it was kept).
    sample_per_cluster: int | None = None
    n_bad_lines: int = 0
    n_clusters: int = 0
    n_unclustered: int = 0
    cluster_params: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, float] | None = None  # NMI/ARI against --truth-field
    expected: Expected | None = None
    simulated: dict[str, Any] | None = None  # calibrate.SimResult.summary() of the chosen setting
    simulated_reference: dict[str, Any] | None = None
    budget_met: bool | None = None
    # The last `cre calibrate`: budget, held-out figures, date, and the log it read (`log`,
    # recorded as the fit's is: `calibration_log_path`; `log_sha256`; `reader`, how it read it).
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields another crecli wrote, kept as found

    def to_dict(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in FIT_FIELDS}
        data["reader"] = self.reader.to_dict()
        data["expected"] = asdict(self.expected) if self.expected is not None else None
        return {**self.extra, **data}


@dataclass(frozen=True)
class QuerySettings:
    """What a router says about one query, per model (`RouterFile.settings_for`)."""

    thresholds: dict[str, float]  # the cluster's own, over the router's
    priors: dict[str, float]  # the deferral check's prior per model (empty without one)
    shots: dict[str, tuple[tuple[str, str], ...]]  # answered examples shown, per model (none: absent)
    answer_type: str | None  # the cluster's


@dataclass
class RouterFile:
    schema_version: int
    ladder: list[LadderEntry]  # smallest first
    embedder: "Embedder"
    assigner: "Assigner"
    clusters: list[ClusterInfo]
    fallback_model: str  # for unclustered (-1) and far-from-every-cluster prompts
    budget: dict[str, Any]  # {"kind": "retain" | "max_cost", "value": float}
    quality: QualityCheck
    thresholds: dict[str, float]  # per model: agreement (or, with `deferral`, P(correct)) needed to accept
    fit: FitRecord
    deferral: DeferralCheck | None = None  # the calibrated check; None: self-consistency
    # The sha256 of the file `load` read (None for a router built in memory): what served-log
    # entries credit, so a file replaced after loading does not get the credit.
    file_sha256: str | None = field(default=None, compare=False, repr=False)
    # Where `load` read it (absolute; None in memory): what a relative `fit.log` is relative to.
    file_path: Path | None = field(default=None, compare=False, repr=False)

    @property
    def ladder_names(self) -> list[str]:
        return [entry.name for entry in self.ladder]

    def cluster(self, cid: int) -> ClusterInfo | None:
        return next((c for c in self.clusters if c.id == cid), None)

    def threshold(self, cid: int, model: str) -> float:
        info = self.cluster(cid) if cid >= 0 else None
        if info is not None and model in info.thresholds:
            return info.thresholds[model]
        return self.thresholds[model]

    def prior(self, cid: int, model: str, distance: float | None = None) -> float:
        """The deferral model's prior for `model` in cluster `cid` (`priors`)."""
        return self.priors(cid, distance, (model,))[model]

    def priors(self, cid: int, distance: float | None = None, models: Sequence[str] | None = None) -> dict[str, float]:
        """The deferral model's prior for each of `models` (default: the ladder's) in cluster
        `cid`: the cluster's shrunk accuracy, else the model's accuracy over the log (0.5
        without a deferral model).

        With the prompt's `distance` to its nearest exemplar, a prompt beyond the cluster's
        radius gets a blend of the two (`quality.blend_priors`).
        """
        models = self.ladder_names if models is None else models
        overall: dict[str, float] = {}
        for model in models:
            rules = self.deferral.models.get(model) if self.deferral is not None else None
            overall[model] = rules.prior if rules is not None else 0.5
        info = self.cluster(cid) if cid >= 0 else None
        if info is None:
            return overall
        own = {model: float(info.stats[model]["shrunk_accuracy"]) for model in models if model in info.stats}
        return blend_priors(own, overall, self.cluster_trust(cid, distance))

    def cluster_trust(self, cid: int, distance: float | None) -> float:
        """How much cluster `cid`'s record speaks for a prompt `distance` from its nearest
        exemplar (`quality.trust`, by the cluster's radius); the live priors and calibration's
        replay of them (`replay.Data.trust`) both weigh by it."""
        if cid < 0:
            return 0.0
        return trust(distance, self.assigner.radius(cid), self.assigner.threshold_)

    def typical_output(self, cid: int, model: str) -> float | None:
        """Tokens `model` wrote, on average, in one greedy answer to cluster `cid`'s fit
        queries (`choice.ModelStats.mean_output_tokens`); for an unclustered prompt, the
        size-weighted mean over the clusters. None for a router that did not record it."""
        infos = [self.cluster(cid)] if cid >= 0 else list(self.clusters)
        found = [(info.size, info.stats[model]["mean_output_tokens"]) for info in infos
                 if info is not None and "mean_output_tokens" in info.stats.get(model, {})]
        total = sum(size for size, _ in found)
        return sum(size * tokens for size, tokens in found) / total if total else None

    def settings_for(self, cid: int, distance: float | None = None) -> "QuerySettings":
        """Everything the router says about a query of cluster `cid` at `distance`, per model,
        in one call: the cluster's own thresholds, its deferral priors (`prior`), the answered
        examples each model is shown (`shots`) and the cluster's answer type."""
        info = self.cluster(cid) if cid >= 0 else None
        shots: dict[str, tuple[tuple[str, str], ...]] = {}
        if info is not None and any(info.shots.values()):
            # Each model is shown the first n of the same exemplars: rendered once, sliced per model.
            every = shots_of(info.exemplars, max(info.shots.values()))
            for m in self.ladder_names:
                shown = every[: info.shots.get(m, 0)]
                if shown:
                    shots[m] = shown
        return QuerySettings(
            thresholds=dict(info.thresholds) if info is not None else {},
            priors=self.priors(cid, distance) if self.deferral is not None else {},
            shots=shots,
            answer_type=info.answer_type if info is not None else None,
        )

    def policy(self, quality: QualityCheck | None = None) -> "Policy":
        """How this router's rungs check their answers (`ladder.Policy`), with `quality`'s
        self-consistency settings (default: the router's own)."""
        from crecli.ladder import Policy

        rules = self.deferral
        return Policy(
            tuple(self.ladder_names), self.thresholds, quality or self.quality,
            deferral_votes=rules.votes if rules is not None else None,
            deferral_models=rules.models if rules is not None else {},
            agreement_rungs=frozenset(rules.agreement) if rules is not None else frozenset(),
        )

    def shots(self, cid: int, model: str) -> tuple[tuple[str, str], ...]:
        """The answered examples `model` is shown before a prompt of cluster `cid` (none when unclustered)."""
        info = self.cluster(cid) if cid >= 0 else None
        return shots_of(info.exemplars, info.shots.get(model, 0)) if info is not None else ()


def fit_log_path(router: RouterFile) -> Path | None:
    """Where the log the router was fitted on is, by its record (`FitRecord.log`): a relative
    record is relative to the folder of the router file (`RouterFile.file_path`; the current
    folder for a router not read from a file), as a symlink's relative target is to its link.
    So a router shipped beside its log (the package's, fitted on the repository's examples)
    finds it in any clone. None when it records no log."""
    return _recorded_path(router, router.fit.log)


def calibration_log_path(router: RouterFile) -> Path | None:
    """Where the log the router was last calibrated on is, by its record (the `log` of
    `FitRecord.calibration`), found as `fit_log_path` finds the fit log. None when it
    records none (not calibrated, or calibrated by a crecli that did not record it)."""
    return _recorded_path(router, (router.fit.calibration or {}).get("log"))


def log_record(given: Path, router: RouterFile | None = None) -> str:
    """How a router records a log read at `given` (a path as typed): an absolute path stays
    absolute (resolved); a relative one is recorded relative to the router file's folder
    (the current folder for a router not read from a file, or none), and `save` re-expresses
    it from the folder it writes the router to. So a router kept beside its log finds it in
    any clone, and no home folder's name is written into a file meant for teammates."""
    if given.is_absolute():
        return str(given.resolve())
    return os.path.relpath(os.path.abspath(given), _base(router))


def _base(router: RouterFile | None) -> Path:
    """The folder a router's relative log records are relative to."""
    return router.file_path.parent if router is not None and router.file_path is not None else Path.cwd()


def _recorded_path(router: RouterFile, recorded: str | None) -> Path | None:
    """Where a log path the router records (`log_record`) is; None for none recorded."""
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_absolute():
        return path
    return Path(os.path.normpath(_base(router) / path))


def _fit_record_at(router: RouterFile, path: Path) -> FitRecord:
    """The fit record as a file at `path` holds it: a relative log path (the fit log's and the
    calibration log's) re-expressed from that file's folder, so that it names the same log
    wherever the router is written."""
    fit = router.fit
    log = _rebased(router, fit.log, path)
    calibration = fit.calibration
    if calibration is not None and calibration.get("log"):
        calibration = {**calibration, "log": _rebased(router, calibration["log"], path)}
    return replace(fit, log=log, calibration=calibration)


def _rebased(router: RouterFile, recorded: str | None, path: Path) -> str | None:
    found = _recorded_path(router, recorded)
    if found is None or Path(recorded or "").is_absolute():
        return recorded
    try:
        return os.path.relpath(found, Path(os.path.abspath(path)).parent)
    except ValueError:  # another drive (Windows): no relative path leads there
        return str(found)


def save(router: RouterFile, path: Path) -> None:
    """Write the router file atomically (`archive.write`): a temp file in the same folder,
    fsynced, then a rename. Two saves of the same router are byte-identical. A fit or
    calibration log recorded relative to the router is rebased to `path`'s folder (`log_record`)."""
    path = Path(path)
    blobs: dict[str, bytes] = {}
    e_params, e_arrays = router.embedder.state()
    a_params, a_arrays = router.assigner.state()
    body = {
        "schema_version": router.schema_version,
        "crecli_version": __version__,
        "ladder": [asdict(entry) for entry in router.ladder],
        "embedder": {
            "kind": router.embedder.kind,
            "identity": router.embedder.identity,
            "params": e_params,
            "arrays": archive.pack("embedder", e_arrays, blobs),
        },
        "assigner": {"params": a_params, "arrays": archive.pack("assigner", a_arrays, blobs)},
        "clusters": [c.to_dict() for c in router.clusters],
        "fallback_model": router.fallback_model,
        "budget": router.budget,
        "quality": router.quality.to_dict(),
        "thresholds": router.thresholds,
        "fit": _fit_record_at(router, path).to_dict(),
        **({"deferral": router.deferral.to_dict()} if router.deferral is not None else {}),
    }
    _check_before_write(path, body)
    archive.write(path, body, blobs)


def _check_before_write(path: Path, body: dict[str, Any]) -> None:
    """Refuse (RouterFileError) a body that `load` would refuse, before a byte is written: a
    router that saves but never loads replaced a working one in place (`cre calibrate`), and
    a refit wrote the same again. Checked as the loader checks it (`check_body`), on the
    JSON the file will hold. A value JSON cannot store is left to `archive.write` to say."""
    import json

    try:
        text = archive.canonical(body)
    except (TypeError, ValueError):
        return
    try:
        check_body(json.loads(text))
    except FieldError as exc:
        raise RouterFileError(f"cannot write {path}: {exc}, so no crecli could load it; nothing was written "
                              "(a router already there is kept)") from None


def load(path: Path, settings: "ModelConfig | None" = None, force: bool = False, check_ladder: bool = True) -> RouterFile:
    """Read and verify a router file; never executes anything from it.

    Checks, in order: a zip archive of at most MAX_MEMBERS plain (stored or deflated,
    unencrypted) members, only expected member names, the format marker, the schema
    version, the manifest's sha256 (`archive.read`), the type and range of every manifest
    field (`schema.check_body`), every array's size (under the fixed caps), sha256 and .npy
    header (plain dtype, shape that fits the member's bytes; `archive.Archive.arrays`);
    then that each ladder model is in the local models.toml with the same sha256. A sha256
    mismatch is an error unless `force`, which turns it into a warning; a local model the
    router pins no sha256 for is warned about, once a process (`_warn_unpinned`). Every
    failure is a RouterFileError. `check_ladder` False skips that last check (`cre
    inspect`, which shows each model's state here instead: `local_state`).
    """
    path = Path(path)
    if settings is None:
        from crecli import config

        settings = config.load()
    try:
        body, arrays, digest = _read(path)
        router = _assemble(path, body, arrays, settings, force, check_ladder)
        router.file_sha256, router.file_path = digest, Path(os.path.abspath(path))
        return router
    except FieldError as exc:
        # A field this crecli does not know is most likely a newer crecli's: a teammate who
        # was sent the file has no log to refit from.
        fix = (f"if a newer crecli wrote it, upgrade this one ({__version__}); else refit it with `cre fit`"
               if exc.unknown else "refit it with `cre fit`")
        raise RouterFileError(f"{path}: {exc}; refusing to load it ({fix})") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        # A safety net: the field checks should leave nothing for the rebuild to trip on.
        raise RouterFileError(
            f"{path}: the router file's manifest is malformed ({type(exc).__name__}: {clean(str(exc))}); "
            "refit it with `cre fit`"
        ) from None


def _read(path: Path) -> tuple[Body, dict[str, "np.ndarray"], str]:
    """The checked manifest body, the arrays it lists, and the sha256 of the file's bytes."""
    with archive.read(path) as box:
        body = check_body(box.body)
        return body, box.arrays(body.listed()), box.sha256


def _assemble(path: Path, body: Body, members: dict[str, "np.ndarray"], settings: "ModelConfig", force: bool,
              check_ladder: bool = True) -> RouterFile:
    from crecli import assign, embed

    ladder = [LadderEntry(**entry) for entry in body.ladder]
    clusters = [ClusterInfo(**info) for info in body.clusters]
    if check_ladder:
        _check_ladder(path, ladder, settings, force)
    names = [e.name for e in ladder]

    def arrays(owner: str) -> dict[str, "np.ndarray"]:
        return {name: members[entry["member"]] for name, entry in body.arrays[owner].items()}

    try:
        emb = embed.embedder_from_state(dict(body.embedder_params), arrays("embedder"), settings)
        assigner = assign.Assigner.from_state(dict(body.assigner_params), arrays("assigner"))
    except RouterFileError as exc:
        # Their messages quote array contents, which come from the file.
        raise RouterFileError(f"{path}: {clean(str(exc), 400)}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise RouterFileError(
            f"{path}: the router's fitted embedder or assigner cannot be rebuilt from its arrays "
            f"({type(exc).__name__}: {clean(str(exc))}); refit it with `cre fit`"
        ) from None
    width = emb.output_dims
    if width is not None and assigner.exemplars_.shape[1] != width:
        # Caught here, not at the first prompt routed, where the message named no file.
        raise RouterFileError(
            f"{path}: the router's embedder gives {width}-dimensional vectors and its clusters hold "
            f"{assigner.exemplars_.shape[1]}-dimensional ones; the router file is damaged, refit it with `cre fit`"
        )
    if emb.identity != body.embedder_identity:
        if emb.kind == "llama":
            # A model embeds: what differs is the model file here, not crecli.
            problem = (f"{path}: the router embeds prompts with {body.embedder_identity}, and this machine's "
                       f"{emb.identity}")
            fix = ("use the model file the router was fitted with (pin its sha256 in models.toml if it is "
                   "unpinned here) and the `context` it was fitted with: the router's `truncate=N` means N, and "
                   "none means 512 or more (llama.cpp embeds a prompt's first min(context, 512) tokens); or "
                   "refit the router")
        else:
            problem = (f"{path}: the rebuilt embedder is not the one the router was fitted with "
                       f"({emb.identity} != {body.embedder_identity})")
            fix = "refit the router with this crecli"
        if not force:
            raise RouterFileError(f"{problem}; {fix}, or pass --force to use it anyway")
        console.warn(f"{problem}; using it anyway (--force), so prompts may land in other clusters.")
    used = {
        body.fallback_model, *body.thresholds, *(body.deferral.models if body.deferral is not None else ()),
        *(body.deferral.agreement if body.deferral is not None else ()),
        *(m for c in clusters for m in (c.model, *c.thresholds, *c.stats, *c.shots)),
    }
    off = sorted(used - set(names))
    lacking = [n for n in names if n not in body.thresholds]
    if off or lacking:
        raise RouterFileError(
            f"{path}: the router is inconsistent: "
            + (f"models {', '.join(off)} are not on its ladder; " if off else "")
            + (f"no threshold for {', '.join(lacking)}; " if lacking else "")
            + "refit it with `cre fit`"
        )
    if body.deferral is not None:
        # Every rung below the top is judged by its P(correct) model or the agreement check;
        # one with neither stopped the live cascade mid-answer, and the replay quietly ran
        # the agreement check instead. More votes than the fit recorded (k) cannot be replayed.
        bare = [n for n in names[:-1] if n not in body.deferral.models and n not in body.deferral.agreement]
        if bare or body.deferral.votes > body.quality.k:
            raise RouterFileError(
                f"{path}: the router's deferral check is incomplete: "
                + (f"{', '.join(bare)} below the top rung {'has' if len(bare) == 1 else 'have'} no P(correct) "
                   "model and no agreement check; " if bare else "")
                + (f"it draws {body.deferral.votes} votes where the fit recorded {body.quality.k} (k); "
                   if body.deferral.votes > body.quality.k else "")
                + "recalibrate it with `cre calibrate`"
            )
    return RouterFile(
        schema_version=SCHEMA_VERSION,
        ladder=ladder,
        embedder=emb,
        assigner=assigner,
        clusters=clusters,
        fallback_model=body.fallback_model,
        budget=body.budget,
        quality=body.quality,
        thresholds=body.thresholds,
        fit=_fit_record(body.fit),
        deferral=body.deferral,
    )


@dataclass(frozen=True)
class Match:
    """How this machine's models.toml meets a ladder entry (`match`)."""

    spec: "ModelSpec | None"  # the model of the entry's name here; None: no models.toml defines it
    identity: str | None  # its file here (`model_identity`), looked up only when the entry pins one
    other_file: bool  # the entry pins a file and this is not it (None here: nothing identifies it)


def match(entry: LadderEntry, settings: "ModelConfig") -> Match:
    """The one rule of what counts as the entry's model here: the model of the same name in
    models.toml, holding the file the entry pins (any file when it pins none). `load`
    (`_check_ladder`) enforces it; `cre inspect` (`local_state`) shows it."""
    spec = settings.models.get(entry.name)
    if spec is None or entry.sha256 is None:
        return Match(spec, None, False)
    local = model_identity(spec)
    return Match(spec, local, local != entry.sha256)


def local_state(entry: LadderEntry, settings: "ModelConfig") -> tuple[str, str]:
    """How this machine meets a ladder entry (`cre inspect`): a stable code for scripts and
    what it means in words, what a teammate sent the router needs to do before using it.
    Codes: "ok", "remote", "any" (the router pins no file), "missing" (not on disk yet),
    "unverified", "other" (another file: refused without --force), "unknown" (nothing
    identifies it here), "absent" (no models.toml defines it). Which model is the entry's
    is `match`'s rule, which `_check_ladder` enforces when a router is used; a rung that
    answers with other settings here (`LadderEntry.otherwise_here`) says which, as loading
    warns."""
    from crecli.models.pull import file_state

    found = match(entry, settings)
    spec = found.spec
    if spec is None:
        return "absent", "not in models.toml: add it"
    changes = entry.otherwise_here(spec)
    otherwise = f"; {settings_phrase(changes)}: {settings_advice(changes)}" if changes else ""
    if found.other_file and found.identity is None:
        return "unknown", "unknown here (no sha256 pinned, no file on disk)" + otherwise
    if found.other_file:
        return "other", f"another file here ({_shown(found.identity or '')}): the router is refused without --force" + otherwise
    if spec.url:
        return "remote", ("served remotely, pinned to this file" if entry.sha256 else "served remotely") + otherwise
    state = file_state(spec)
    if not state.present:
        return "missing", "not on disk yet: cre models pull (or fix its path)" + otherwise
    if not state.verified:
        return "unverified", f"on disk, but {state.reason}" + otherwise
    if entry.sha256 is None:
        return "any", "any file (the router pins none)" + otherwise
    return "ok", "this file" + otherwise


def _shown(identity: str) -> str:
    """A model identity in a message: a sha256 by its first 12 digits; a remote rung's
    (`remote:URL#model`) whole, since two of them differ anywhere."""
    return identity if identity.startswith("remote:") else f"sha256 {identity[:12]}…"


# The (router file, model) pairs `_check_ladder` has warned about as unpinned in this
# process: one warning a model, however often a command loads its router.
_warned_unpinned: set[tuple[str, str]] = set()


def _warn_unpinned(path: Path, entry: LadderEntry, spec: "ModelSpec") -> None:
    """Warn, once a process, that the router pins no file for a local rung: `cre fit` records
    none for a model neither pinned in models.toml nor on disk (a fit from labels alone), so
    whatever file models.toml names runs, maybe not the weights the fit's figures were
    measured on. A remote rung here is not warned about: no file of its server can be hashed
    here to pin, as `LadderEntry.otherwise_here` leaves a server's own settings alone."""
    key = (str(path), entry.name)
    if entry.sha256 is not None or spec.url or key in _warned_unpinned:
        return
    _warned_unpinned.add(key)
    get = f"`cre models pull {entry.name}`" if spec.pullable else "put it at its `path`"
    console.warn(
        f"{path}: the router pins no sha256 for model {entry.name!r} (it was fitted without its file), so it runs "
        f"whatever file {spec.set_in('path', 'chunks', 'requantize_from')} names for it here; to pin it, get the file ({get}, "
        "or pin its sha256 in models.toml) and refit with `cre fit` or recalibrate with `cre calibrate`, which "
        "record its sha256"
    )


def _check_ladder(path: Path, ladder: list[LadderEntry], settings: "ModelConfig", force: bool) -> None:
    """Refuse a ladder entry whose model is not here (`match`), or, unless `force`, is another
    file; warn about one the router pins no file for (`_warn_unpinned`)."""
    for entry in ladder:
        name, wanted = entry.name, entry.sha256
        found = match(entry, settings)
        spec = found.spec
        if spec is None:
            same = [s.name for s in settings.models.values() if wanted and s.sha256 == wanted]
            hint = f"; your model {same[0]!r} has that sha256, so rename it to {name!r}" if same else ""
            raise RouterFileError(
                f"{path}: the router's ladder needs model {name!r}"
                + (f" ({_shown(wanted)})" if wanted else "")
                + f", which no models.toml defines{hint}. Add it to your models.toml "
                "(`cre models path` shows where)."
            )
        _warn_unpinned(path, entry, spec)
        # E.g. a rung moved to a chat server with its own template, or given another context.
        changes = entry.otherwise_here(spec)
        if changes:
            # Each changed setting with the file that set it: they may come from several.
            source = spec.where_set(*(key for key, _, _ in changes))
            console.warn(
                f"{path}: model {name!r} was {settings_phrase(changes)} "
                f"({source}): its answers, and the checks tuned on them, may differ; "
                + settings_advice(changes)
            )
        if found.other_file:
            assert wanted is not None  # only a pinned entry is another file
            local = found.identity
            problem = (
                f"{path}: model {name!r} is not the file the router was fitted with: the router "
                f"pins {_shown(wanted)}, the local one is "
                + (_shown(local) if local else "unknown (no sha256 pinned and no file on disk)")
                + f" ({spec.set_in('sha256', 'path', 'chunks', 'url', 'requantize_from')})"
            )
            if not force:
                # A remote rung carries no file to hash: whoever knows it serves the same
                # weights says so by pinning the router's sha256 on it.
                remote = (f"; if {name!r}'s server serves that same model file, pin sha256 = \"{wanted}\" on "
                          f"[models.{name}]" if spec.url and not wanted.startswith("remote:") else "")
                raise RouterFileError(
                    f"{problem}{remote}. Use the same model file, refit the router on yours, or pass --force "
                    "to use it anyway."
                )
            console.warn(f"{problem}; using it anyway (--force), so the router's choices may not hold.")


def _fit_record(checked: dict[str, Any]) -> FitRecord:
    expected = checked["expected"]
    return FitRecord(**{**checked, "expected": None if expected is None else Expected(**expected)})
