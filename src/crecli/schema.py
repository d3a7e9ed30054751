"""The router manifest's body: what it holds, each field checked for type and range.

The body carries the ladder (name, sha256, size and the settings each answered with:
prompt_format, context, repeat_penalty; smallest first), the embedder (kind,
identity, params) and assigner params, every array member's listing (`archive`), the
clusters (starting model, per-model stats, examples, answered examples and how many each
model is shown, answer type), the fallback model, the budget, the quality settings and
thresholds, the calibrated deferral check if any, and the fit record (log sha256, date,
counts). Its checksum can be recomputed by whoever edits the file, so every field is
checked here (`fields.Field`), once, and the rest of crecli can trust a loaded router.

`check_body` returns the body as checked plain values (with the quality and deferral
checks and the log reader's options built); `routerfile` makes its records from them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from crecli.archive import MAX_MEMBERS, SCHEMA_VERSION
from crecli.config import ANSWER_SETTINGS, MAX_INT32, MAX_REPEAT_PENALTY, MIN_CONTEXT, PROMPT_FORMATS
from crecli.costs import MAX_RETAIN, UNITS
from crecli.fields import Field, FieldError
from crecli.quality import MAX_TEMPERATURE, MAX_VOTES, Deferral, DeferralCheck, QualityCheck, feature_names
from crecli.querylog import FORMATS, MAX_LINE_CAP, FieldMap, LogOptions

EXAMPLES_PER_CLUSTER = 3
EXAMPLE_CHARS = 200
# Answered examples (`cre fit --shots`): a cluster carries at most this many, and a model
# is shown one of SHOT_COUNTS of them. Longer exemplars are never chosen (`shots.pick_exemplars`).
SHOT_COUNTS = (0, 1, 3)
MAX_SHOTS = max(SHOT_COUNTS)
SHOT_PROMPT_CHARS = 1000
SHOT_ANSWER_CHARS = 200
# Fields of the fit record this crecli reads back (and so types); others are kept as found.
FIT_FIELDS = ("log", "log_sha256", "reader", "date", "crecli_version", "cost_unit", "seed", "n_queries",
              "n_labelled", "n_measured", "sample_per_cluster", "n_bad_lines", "n_clusters", "n_unclustered",
              "cluster_params", "truth", "expected", "simulated", "simulated_reference", "budget_met", "calibration")
# Bounds of the fields themselves: far above what any fit writes, low enough that a hostile
# manifest cannot make checking or showing it expensive.
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_IDENTITY = re.compile(r"^(?:[0-9a-fA-F]{64}|remote:.+)$")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_STAT_KEYS = ("n", "correct", "accuracy", "shrunk_accuracy", "mean_cost", "mean_output_tokens")
MAX_TEXT_CHARS = 4096
MAX_LADDER = 64
MAX_CLUSTERS = 100_000


@dataclass
class Body:
    """The checked manifest body. Ladder entries, clusters and the fit record are plain
    values, keyed as the fields of routerfile's LadderEntry, ClusterInfo and FitRecord
    (the fit record's `expected` as Expected's, or None)."""

    ladder: list[dict[str, Any]]
    embedder_identity: str
    embedder_params: dict[str, Any]
    assigner_params: dict[str, Any]
    arrays: dict[str, dict[str, dict[str, Any]]]  # owner -> array name -> listing
    clusters: list[dict[str, Any]]
    fallback_model: str
    budget: dict[str, Any]
    quality: QualityCheck
    thresholds: dict[str, float]
    fit: dict[str, Any]
    deferral: DeferralCheck | None

    def listed(self) -> dict[str, dict[str, Any]]:
        """Every array member the body lists, with its listing (`archive.Archive.arrays`)."""
        return {entry["member"]: entry for owned in self.arrays.values() for entry in owned.values()}


def _sha256(f: Field) -> str:
    return f.as_str(64, pattern=_HEX64, want="a sha256 (64 hex digits)")


def _model_identity(f: Field) -> str:
    # models.pull.model_identity: a file's sha256, or `remote:URL#MODEL` for a remote rung.
    return f.as_str(MAX_TEXT_CHARS, pattern=_IDENTITY, want='a sha256 (64 hex digits) or "remote:URL#MODEL"')


def check_body(body: dict[str, Any]) -> Body:
    """The manifest's body with every field checked, in order; a FieldError names the first
    that fails. The arrays it lists are checked by `archive`, its models against the local
    models.toml by `routerfile`."""
    from crecli.costs import BUDGET_KINDS

    root = Field(body, "")
    root.as_object(keys=("schema_version", "crecli_version", "ladder", "embedder", "assigner", "clusters",
                         "fallback_model", "budget", "quality", "thresholds", "fit", "deferral"),
                   optional=("deferral",))
    root["schema_version"].as_int(SCHEMA_VERSION, SCHEMA_VERSION)
    root["crecli_version"].as_str(64)
    ladder = [_ladder_entry(e) for e in root["ladder"].as_list(MAX_LADDER, min_items=1)]
    twice = sorted(n for n, c in Counter(e["name"] for e in ladder).items() if c > 1)
    if twice:
        raise FieldError(f"manifest field ladder names model {twice[0]!r} twice")
    emb = root["embedder"]
    emb.as_object(keys=("kind", "identity", "params", "arrays"))
    kind = emb["kind"].as_str(choices=("tfidf", "llama"))
    identity = emb["identity"].as_str(512)
    assigner = root["assigner"]
    assigner.as_object(keys=("params", "arrays"))
    arrays = {"embedder": _array_entries(emb["arrays"], "embedder"),
              "assigner": _array_entries(assigner["arrays"], "assigner")}
    clusters = [_cluster(c) for c in root["clusters"].as_list(MAX_CLUSTERS)]
    twice_ids = sorted(i for i, c in Counter(c["id"] for c in clusters).items() if c > 1)
    if twice_ids:
        raise FieldError(f"manifest field clusters lists cluster {twice_ids[0]} twice")
    budget = root["budget"]
    budget.as_object(keys=("kind", "value"))
    budget_kind = budget["kind"].as_str(choices=BUDGET_KINDS)
    # `Budget`'s own ranges, the CLI's too: retain is a share of the strongest model's accuracy
    # (up to MAX_RETAIN: a little over 1 asks for better than it), max_cost a share of its cost.
    budget_value = budget["value"].as_float(0, MAX_RETAIN if budget_kind == "retain" else 1.0, above=True)
    q = root["quality"]
    q.as_object(keys=("k", "temperature", "top_p", "top_k", "early_stop"))
    quality = QualityCheck(
        k=q["k"].as_int(1, MAX_VOTES),
        temperature=q["temperature"].as_float(0, MAX_TEMPERATURE),
        top_p=q["top_p"].as_float(0, 1),
        top_k=q["top_k"].as_int(0, 1 << 20),
        early_stop=q["early_stop"].as_bool(),
    )
    return Body(
        ladder=ladder,
        embedder_identity=identity,
        embedder_params=_embedder_params(emb["params"], kind),
        assigner_params=_assigner_params(assigner["params"]),
        arrays=arrays,
        clusters=clusters,
        fallback_model=root["fallback_model"].as_str(),
        budget={"kind": budget_kind, "value": budget_value},
        quality=quality,
        thresholds={m: t.as_float(0, 1) for m, t in root["thresholds"].items(MAX_LADDER)},
        fit=_fit(root["fit"]),
        deferral=_deferral(root["deferral"]) if root.has("deferral") else None,
    )


# A logistic weight past this is no calibrated model; it would only overflow.
_MAX_WEIGHT = 1e4


def _deferral(f: Field) -> DeferralCheck:
    f.as_object(keys=("votes", "models", "agreement"), optional=("agreement",))
    votes = f["votes"].as_int(1, MAX_VOTES)
    names = feature_names(votes)
    models = {}
    for model, m in f["models"].items(MAX_LADDER):
        m.as_object(keys=("features", "weights", "bias", "fill", "prior"))
        features = tuple(x.as_str(32) for x in m["features"].as_list(len(names), len(names)))
        if features != names:
            raise FieldError(f"manifest field {m.where}.features must be {list(names)} for {votes} vote(s), got {list(features)}")
        models[model] = Deferral(
            features=features,
            weights=tuple(w.as_float(-_MAX_WEIGHT, _MAX_WEIGHT) for w in m["weights"].as_list(len(names), len(names))),
            bias=m["bias"].as_float(-_MAX_WEIGHT, _MAX_WEIGHT),
            fill=tuple(v.as_float(-_MAX_WEIGHT, _MAX_WEIGHT) for v in m["fill"].as_list(len(names), len(names))),
            prior=m["prior"].as_float(0, 1),
        )
    agreement = tuple(x.as_str() for x in f["agreement"].as_list(MAX_LADDER)) if f.has("agreement") else ()
    both = sorted(set(agreement) & set(models))
    if both:
        raise FieldError(f"manifest field {f.where}.agreement names {both[0]!r}, which also has a deferral model")
    return DeferralCheck(votes, models, agreement)


def _ladder_entry(f: Field) -> dict[str, Any]:
    # The settings the rung answered with (`config.ModelSpec.answer_settings`) are optional:
    # routers before them lack them (prompt_format came first). null: not recorded, or a
    # remote rung's server's own.
    f.as_object(keys=("name", "sha256", "size", *ANSWER_SETTINGS), optional=ANSWER_SETTINGS)
    checks = {
        "prompt_format": lambda g: g.as_str(choices=PROMPT_FORMATS),
        "context": lambda g: g.as_int(MIN_CONTEXT, MAX_INT32),
        "repeat_penalty": lambda g: g.as_float(0, MAX_REPEAT_PENALTY, above=True),
    }
    return {"name": f["name"].as_str(), "sha256": f["sha256"].or_none(_model_identity),
            "size": f["size"].or_none(lambda g: g.as_int(0)),
            **{key: f[key].or_none(checks[key]) if f.has(key) else None for key in ANSWER_SETTINGS}}


def _array_entries(f: Field, owner: str) -> dict[str, dict[str, Any]]:
    listed = {}
    for name, e in f.items(MAX_MEMBERS, pattern=_ARRAY_NAME):
        e.as_object(keys=("member", "sha256", "size", "dtype", "shape"))
        listed[name] = {
            "member": e["member"].as_str(choices=(f"{owner}/{name}.npy",)),
            "sha256": _sha256(e["sha256"]),
            "size": e["size"].as_int(0),  # capped where the member is read, with the zip's own size
            "dtype": e["dtype"].as_str(32),
            "shape": [n.as_int(0) for n in e["shape"].as_list(32)],
        }
    return listed


def _embedder_params(f: Field, kind: str) -> dict[str, Any]:
    if kind == "llama":
        f.as_object(keys=("kind", "model", "sha256"))
        return {"kind": f["kind"].as_str(choices=(kind,)), "model": f["model"].as_str(),
                "sha256": f["sha256"].or_none(_sha256)}
    from crecli.tfidf import MAX_TFIDF_DIMS, TFIDF_ANALYZERS

    f.as_object(keys=("kind", "dims", "analyzer", "min_df", "mask_digits", "seed", "dims_"))
    dims = f["dims"].as_int(2, MAX_TFIDF_DIMS)
    return {
        "kind": f["kind"].as_str(choices=(kind,)),
        "dims": dims,
        "analyzer": f["analyzer"].as_str(choices=TFIDF_ANALYZERS),
        "min_df": f["min_df"].as_int(1, 1 << 31),
        "mask_digits": f["mask_digits"].as_bool(),
        "seed": f["seed"].as_int(-(1 << 63), 1 << 64),
        "dims_": f["dims_"].as_int(1, dims),
    }


def _assigner_params(f: Field) -> dict[str, Any]:
    from crecli.assign import ASSIGN_METHODS

    f.as_object(keys=("method", "k", "max_distance", "k_", "threshold_"))
    return {
        "method": f["method"].as_str(choices=ASSIGN_METHODS),
        "k": f["k"].as_int(1, 1 << 31),
        "max_distance": f["max_distance"].or_none(lambda g: g.as_float(0, 2)),
        "k_": f["k_"].as_int(1, 1 << 31),
        # A cosine distance, in [0, 2] but for float32 rounding.
        "threshold_": f["threshold_"].as_float(-1, 3),
    }


def _cluster(f: Field) -> dict[str, Any]:
    from crecli.grading import MATCH_TYPES

    f.as_object(keys=("id", "size", "model", "answer_type", "examples", "stats", "thresholds", "exemplars", "shots"),
                optional=("thresholds", "exemplars", "shots"))
    exemplars = []
    if f.has("exemplars"):
        for pair in f["exemplars"].as_list(MAX_SHOTS):
            q, a = pair.as_list(2, 2)
            # Prompts keep their newlines; whatever prints them escapes control characters.
            exemplars.append([q.as_str(SHOT_PROMPT_CHARS, text=True), a.as_str(SHOT_ANSWER_CHARS, text=True)])
    shots = {}
    if f.has("shots"):
        for m, n in f["shots"].items(MAX_LADDER):
            shots[m] = n.as_int(0, len(exemplars))
            if shots[m] not in SHOT_COUNTS:
                n.fail("one of " + ", ".join(str(c) for c in SHOT_COUNTS if c <= len(exemplars)))
    return dict(
        id=f["id"].as_int(-1, (1 << 31) - 1),
        size=f["size"].as_int(0),
        model=f["model"].as_str(),
        answer_type=f["answer_type"].or_none(lambda g: g.as_str(choices=MATCH_TYPES)),
        # Prompts keep their newlines and tabs; whatever prints them escapes control characters.
        examples=[x.as_str(EXAMPLE_CHARS, text=True) for x in f["examples"].as_list(EXAMPLES_PER_CLUSTER)],
        stats={m: _stats(s) for m, s in f["stats"].items(MAX_LADDER)},
        thresholds={m: t.as_float(0, 1) for m, t in f["thresholds"].items(MAX_LADDER)} if f.has("thresholds") else {},
        exemplars=exemplars,
        shots=shots,
    )


def _stats(f: Field) -> dict[str, float]:
    # mean_output_tokens is optional: routers written before it was recorded still load
    # (the batch summary then estimates the strongest model's output from the answer).
    f.as_object(keys=_STAT_KEYS, optional=("mean_output_tokens",))
    stats = {
        "n": f["n"].as_float(0),
        "correct": f["correct"].as_float(0),
        "accuracy": f["accuracy"].as_float(0, 1),
        "shrunk_accuracy": f["shrunk_accuracy"].as_float(0, 1),
        "mean_cost": f["mean_cost"].as_float(0),
    }
    if f.has("mean_output_tokens"):
        stats["mean_output_tokens"] = f["mean_output_tokens"].as_float(0, 1_000_000)
    return stats


def _fit(f: Field) -> dict[str, Any]:
    """The fit record: every field crecli reads back is typed; others are kept as found.

    Routers written before the reader options were recorded read their log with the
    defaults, as they were fitted (unless fitted with other options, which they did not
    record).
    """
    fit = f.as_object(max_items=256)

    def count(key: str) -> int:
        return f[key].as_int(0) if key in fit else 0

    def obj(key: str) -> dict[str, Any] | None:
        return None if fit.get(key) is None else dict(f[key].as_object())

    expected = None
    if fit.get("expected") is not None:
        e = f["expected"]
        e.as_object(keys=("accuracy", "cost", "reference_accuracy", "reference_cost"))
        expected = {"accuracy": e["accuracy"].as_float(0, 1), "cost": e["cost"].as_float(0),
                    "reference_accuracy": e["reference_accuracy"].as_float(0, 1),
                    "reference_cost": e["reference_cost"].as_float(0)}
    return dict(
        # A path is free text (a no-break space in a folder's name, a tab), escaped wherever
        # it is shown: printable-only refused routers whose fit read such a log.
        log=f["log"].or_none(lambda h: h.as_str(MAX_TEXT_CHARS, text=True)) if "log" in fit else None,
        log_sha256=f["log_sha256"].or_none(_sha256) if "log_sha256" in fit else None,
        reader=_reader(f["reader"]) if fit.get("reader") is not None else LogOptions(),
        date=f["date"].or_none(lambda h: h.as_str(64)) if "date" in fit else None,
        crecli_version=f["crecli_version"].as_str(64) if "crecli_version" in fit else "unknown",
        cost_unit=f["cost_unit"].as_str(choices=UNITS) if "cost_unit" in fit else "seconds",
        seed=f["seed"].as_int(-(1 << 63), 1 << 64) if "seed" in fit else 0,
        n_queries=count("n_queries"), n_labelled=count("n_labelled"), n_measured=count("n_measured"),
        # Absent in routers written before it was kept: their fit's sample is not known.
        sample_per_cluster=f["sample_per_cluster"].or_none(lambda g: g.as_int(1)) if "sample_per_cluster" in fit else None,
        n_bad_lines=count("n_bad_lines"), n_clusters=count("n_clusters"), n_unclustered=count("n_unclustered"),
        cluster_params=obj("cluster_params") or {},
        truth=obj("truth"),
        expected=expected,
        simulated=obj("simulated"),
        simulated_reference=obj("simulated_reference"),
        budget_met=f["budget_met"].or_none(lambda g: g.as_bool()) if "budget_met" in fit else None,
        calibration=_calibration(f["calibration"]) if fit.get("calibration") is not None else None,
        extra={k: v for k, v in fit.items() if k not in FIT_FIELDS},
    )


def _calibration(f: Field) -> dict[str, Any]:
    """The last calibration's record: the log it read (path, sha256, how it read it: what
    `cre eval` reads back) typed; the figures it reports are kept as found. Routers
    calibrated before the log was recorded have none of the three."""
    cal = dict(f.as_object())
    if "log" in cal:
        cal["log"] = f["log"].or_none(lambda h: h.as_str(MAX_TEXT_CHARS, text=True))
    if "log_sha256" in cal:
        cal["log_sha256"] = f["log_sha256"].or_none(_sha256)
    if "reader" in cal:
        cal["reader"] = f["reader"].or_none(lambda h: _reader(h).to_dict())
    return cal


def _reader(f: Field) -> LogOptions:
    f.as_object(keys=("format", "skip_bad", "fields"))
    fields = f["fields"]
    names = ("prompt", "reference", "match", "id", "labels")
    fields.as_object(keys=(*names, "max_line_bytes"))
    return LogOptions(
        fmt=f["format"].or_none(lambda g: g.as_str(choices=FORMATS)),
        skip_bad=f["skip_bad"].as_bool(),
        fields=FieldMap(**{n: fields[n].as_str() for n in names},
                        max_line_bytes=fields["max_line_bytes"].as_int(1, MAX_LINE_CAP), recorded=True),
    )
