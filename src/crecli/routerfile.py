"""The portable router file: everything `cre ask --router` needs, in one file that is safe to open.

A router file is a zip archive of `manifest.json` and `.npy` arrays (the embedder's and
the assigner's fitted state). It is sent to teammates, so loading it must never run code:
no pickle, no eval; arrays are read with `np.load(..., allow_pickle=False)`, object arrays
are refused, and member names are checked against a fixed pattern before anything is read.

manifest.json holds `format` ("crecli-router"), `schema_version`, `body_sha256` and
`body`. The body carries the ladder (name, sha256, size; smallest first), the embedder
(kind, identity, params) and assigner params, every array member's sha256, size, dtype and
shape, the clusters (starting model, per-model stats, examples, answer type), the fallback
model, the budget, the quality settings and thresholds, and fit metadata (log sha256,
date, counts). `body_sha256` is the sha256 of the body's canonical JSON, so changing any
byte of the manifest or of an array, or truncating the file, is detected on load.

Models are identified by sha256, not by path: a router fitted on one machine works on
another that has the same model files anywhere, under the same names in its models.toml.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crecli import __version__, console
from crecli.errors import RouterFileError
from crecli.outcomes import model_identity
from crecli.quality import QualitySettings

if TYPE_CHECKING:
    import numpy as np

    from crecli.calibrate import Budget, Plan
    from crecli.cluster import Assigner
    from crecli.config import Settings
    from crecli.embed import Embedder
    from crecli.querylog import Record

SCHEMA_VERSION = 1
FORMAT = "crecli-router"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
# Arrays live under one folder per owner; names are plain words so no path tricks apply.
_MEMBER = re.compile(r"^(embedder|assigner)/([A-Za-z0-9_]{1,64})\.npy$")
# Fixed timestamps make two saves of the same router byte-identical.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
EXAMPLES_PER_CLUSTER = 3
EXAMPLE_CHARS = 200


@dataclass
class ClusterInfo:
    id: int
    size: int
    model: str
    answer_type: str | None
    examples: list[str]
    stats: dict[str, dict[str, float]]  # per model: n, correct, accuracy, shrunk_accuracy, mean_cost
    thresholds: dict[str, float] = field(default_factory=dict)  # per-model override of RouterFile.thresholds


@dataclass
class RouterFile:
    schema_version: int
    ladder: list[dict[str, Any]]  # [{"name", "sha256", "size"}], smallest first
    embedder: "Embedder"
    assigner: "Assigner"
    clusters: list[ClusterInfo]
    fallback_model: str  # for unclustered (-1) and far-from-every-cluster prompts
    budget: dict[str, Any]  # {"kind": "retain" | "max_cost", "value": float}
    quality: QualitySettings
    thresholds: dict[str, float]  # per model: agreement needed to accept its answer
    fit: dict[str, Any]  # log_sha256, date, counts, crecli version, seed, ...

    def cluster(self, cid: int) -> ClusterInfo | None:
        return next((c for c in self.clusters if c.id == cid), None)

    def threshold(self, cid: int, model: str) -> float:
        info = self.cluster(cid) if cid >= 0 else None
        if info is not None and model in info.thresholds:
            return info.thresholds[model]
        return self.thresholds[model]


def build(
    settings: "Settings",
    embedder: "Embedder",
    assigner: "Assigner",
    records: Sequence["Record"],
    labels: Sequence[int],
    plan: "Plan",
    budget: "Budget",
    quality: QualitySettings,
    fit_meta: dict[str, Any],
) -> RouterFile:
    """A router from a fitted embedder and assigner and a calibration plan.

    `labels[i]` is the cluster of `records[i]` (every record of the log, measured or not).
    A cluster the plan has no model for (none of its records was labelled, as in a
    plain-text log) is kept, with no statistics, and starts on the fallback model: the
    router still shows the log's clusters, and a later fit with labels can fill them in.
    """
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
        ))
    fit = {
        **fit_meta,
        "crecli_version": __version__,
        "cost_unit": plan.unit,
        "expected": {
            "accuracy": plan.choice.expected_accuracy,
            "cost": plan.choice.expected_cost,
            "reference_accuracy": plan.choice.reference_accuracy,
            "reference_cost": plan.choice.reference_cost,
        },
        "simulated": plan.result.summary() if plan.result is not None else None,
        "simulated_reference": plan.reference.summary() if plan.reference is not None else None,
        "budget_met": plan.budget_met,
    }
    ladder = [
        {"name": spec.name, "sha256": model_identity(spec), "size": spec.size}
        for spec in settings.ladder_specs()
    ]
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


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _npy(array: "np.ndarray", where: str) -> bytes:
    import numpy as np

    array = np.asarray(array)
    if array.dtype.hasobject:
        raise RouterFileError(f"cannot store {where}: object arrays would need pickle; store numbers or strings")
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _pack(owner: str, arrays: dict[str, "np.ndarray"], blobs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    listed = {}
    for name, array in sorted(arrays.items()):
        member = f"{owner}/{name}.npy"
        if not _MEMBER.match(member):
            raise RouterFileError(f"cannot store array {name!r} of the {owner}: names must be letters, digits or _")
        data = _npy(array, member)
        blobs[member] = data
        listed[name] = {
            "member": member,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }
    return listed


def save(router: RouterFile, path: Path) -> None:
    """Write the router file atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    blobs: dict[str, bytes] = {}
    e_params, e_arrays = router.embedder.state()
    a_params, a_arrays = router.assigner.state()
    body = {
        "schema_version": router.schema_version,
        "crecli_version": __version__,
        "ladder": router.ladder,
        "embedder": {
            "kind": router.embedder.kind,
            "identity": router.embedder.identity,
            "params": e_params,
            "arrays": _pack("embedder", e_arrays, blobs),
        },
        "assigner": {"params": a_params, "arrays": _pack("assigner", a_arrays, blobs)},
        "clusters": [asdict(c) for c in router.clusters],
        "fallback_model": router.fallback_model,
        "budget": router.budget,
        "quality": router.quality.to_dict(),
        "thresholds": router.thresholds,
        "fit": router.fit,
    }
    try:
        canonical = _canonical(body)
    except (TypeError, ValueError) as exc:
        raise RouterFileError(f"cannot write {path}: the router holds a value JSON cannot store ({exc})") from None
    manifest = {
        "format": FORMAT,
        "schema_version": router.schema_version,
        "body_sha256": hashlib.sha256(canonical).hexdigest(),
        "body": json.loads(canonical),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                entries = {MANIFEST: json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False).encode(), **blobs}
                for name, data in entries.items():
                    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; a router is meant to be shared, so apply the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, settings: "Settings | None" = None, force: bool = False) -> RouterFile:
    """Read and verify a router file; never executes anything from it.

    Checks, in order: a zip archive, only expected member names, the format marker, the
    schema version, the manifest's sha256, every array's size and sha256, plain (non-object)
    arrays; then that each ladder model is in the local models.toml with the same sha256.
    A sha256 mismatch is an error unless `force`, which turns it into a warning.
    """
    path = Path(path)
    if settings is None:
        from crecli import config

        settings = config.load()
    try:
        body, arrays = _read(path)
        return _assemble(path, body, arrays, settings, force)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RouterFileError(
            f"{path}: the router file's manifest is malformed ({type(exc).__name__}: {exc}); refit it with `cre fit`"
        ) from None


def _read(path: Path) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
    if not path.is_file():
        raise RouterFileError(f"{path}: no such router file; check the path, or make one with `cre fit`")
    with path.open("rb") as fh:
        head = fh.read(4)
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":
            why = "it looks like a Python pickle, which could run code when opened, so it was not opened"
        elif head == b"PK\x03\x04":
            why = "the zip archive is truncated or damaged"
        else:
            why = "it is not a zip archive"
        raise RouterFileError(
            f"{path}: not a usable crecli router file ({why}). Get the file `cre fit` wrote again, or refit."
        )
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_zip(path, zf)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise RouterFileError(
            f"{path}: the router file is truncated or damaged ({exc}). Copy it again, or refit with `cre fit`."
        ) from None


def _read_zip(path: Path, zf: zipfile.ZipFile) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
    names = zf.namelist()
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    strange = sorted(n for n in names if n != MANIFEST and not _MEMBER.match(n))
    if dupes or strange:
        raise RouterFileError(
            f"{path}: unexpected members in the router file ({', '.join(dupes + strange)}); "
            "it was not written by crecli or was tampered with. Refusing to load it."
        )
    if MANIFEST not in names:
        raise RouterFileError(f"{path}: the router file has no {MANIFEST}; it is not a crecli router file")
    if zf.getinfo(MANIFEST).file_size > MAX_MANIFEST_BYTES:
        raise RouterFileError(f"{path}: {MANIFEST} is implausibly large; refusing to load it")
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RouterFileError(f"{path}: {MANIFEST} is not valid JSON ({exc}); the file is damaged, refit it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RouterFileError(f"{path}: not a crecli router file (no '{FORMAT}' format marker)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        fix = "upgrade crecli to read it" if newer else "refit it with this crecli (`cre fit`)"
        raise RouterFileError(
            f"{path}: router schema version {version!r} is not supported (this crecli reads "
            f"version {SCHEMA_VERSION}); {fix}"
        )
    body = manifest.get("body")
    if not isinstance(body, dict):
        raise RouterFileError(f"{path}: {MANIFEST} has no body; the file is damaged, refit it")
    try:
        digest = hashlib.sha256(_canonical(body)).hexdigest()
    except ValueError:
        digest = ""
    if digest != manifest.get("body_sha256") or body.get("schema_version") != version:
        raise RouterFileError(
            f"{path}: the manifest does not match its sha256: the file was modified after "
            "`cre fit` wrote it. Get an unmodified copy, or refit."
        )
    listed: dict[str, dict[str, Any]] = {}
    arrays: dict[str, "np.ndarray"] = {}
    for owner in ("embedder", "assigner"):
        section = body.get(owner)
        if not isinstance(section, dict) or not isinstance(section.get("arrays"), dict):
            raise RouterFileError(f"{path}: the manifest lacks the {owner}'s arrays; the file is damaged, refit it")
        for entry in section["arrays"].values():
            listed[str(entry.get("member"))] = entry
    extra = sorted(set(names) - set(listed) - {MANIFEST})
    if extra:
        raise RouterFileError(f"{path}: members not listed in the manifest ({', '.join(extra)}); refusing to load it")
    for member, entry in listed.items():
        arrays[member] = _read_array(path, zf, member, entry)
    return body, arrays


def _read_array(path: Path, zf: zipfile.ZipFile, member: str, entry: dict[str, Any]) -> "np.ndarray":
    import numpy as np

    if not _MEMBER.match(member):
        raise RouterFileError(f"{path}: the manifest names an invalid array member {member!r}; refusing to load it")
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise RouterFileError(f"{path}: array {member} is missing; the file is truncated or damaged, copy it again") from None
    # Checked before reading, so a doctored member cannot make us inflate gigabytes.
    if info.file_size != entry.get("size"):
        raise RouterFileError(f"{path}: array {member} has the wrong size; the file was modified, get an unmodified copy")
    data = zf.read(member)
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise RouterFileError(f"{path}: array {member} does not match its sha256; the file was modified, get an unmodified copy")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RouterFileError(f"{path}: array {member} cannot be read without pickle ({exc}); refusing to load it") from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise RouterFileError(f"{path}: array {member} is not a plain array; refusing to load it")
    if array.dtype.str != entry.get("dtype") or list(array.shape) != entry.get("shape"):
        raise RouterFileError(f"{path}: array {member} is not the dtype and shape the manifest records; refit it")
    return array


def _assemble(path: Path, body: dict[str, Any], members: dict[str, "np.ndarray"], settings: "Settings", force: bool) -> RouterFile:
    from crecli import cluster, embed

    ladder = [{"name": str(e["name"]), "sha256": e.get("sha256"), "size": e.get("size")} for e in body["ladder"]]
    if not ladder:
        raise RouterFileError(f"{path}: the router's ladder is empty; refit it")
    _check_ladder(path, ladder, settings, force)
    names = [e["name"] for e in ladder]

    def arrays(owner: str) -> dict[str, "np.ndarray"]:
        return {name: members[entry["member"]] for name, entry in body[owner]["arrays"].items()}

    emb = embed.embedder_from_state(dict(body["embedder"]["params"]), arrays("embedder"), settings)
    if emb.identity != body["embedder"]["identity"]:
        problem = (
            f"{path}: the rebuilt embedder is not the one the router was fitted with "
            f"({emb.identity} != {body['embedder']['identity']})"
        )
        if not force:
            raise RouterFileError(f"{problem}; refit the router with this crecli, or pass --force to use it anyway")
        console.warn(f"{problem}; using it anyway (--force), so prompts may land in other clusters.")
    assigner = cluster.Assigner.from_state(dict(body["assigner"]["params"]), arrays("assigner"))
    clusters = [
        ClusterInfo(
            id=int(c["id"]),
            size=int(c["size"]),
            model=str(c["model"]),
            answer_type=None if c["answer_type"] is None else str(c["answer_type"]),
            examples=[str(x) for x in c["examples"]],
            stats={str(m): {str(k): float(v) for k, v in s.items()} for m, s in c["stats"].items()},
            thresholds={str(m): float(t) for m, t in c.get("thresholds", {}).items()},
        )
        for c in body["clusters"]
    ]
    thresholds = {str(m): float(t) for m, t in body["thresholds"].items()}
    fallback = str(body["fallback_model"])
    used = {fallback, *(c.model for c in clusters), *(m for c in clusters for m in c.thresholds)}
    off = sorted(used - set(names))
    lacking = [n for n in names if n not in thresholds]
    if off or lacking:
        raise RouterFileError(
            f"{path}: the router is inconsistent: "
            + (f"models {', '.join(off)} are not on its ladder; " if off else "")
            + (f"no threshold for {', '.join(lacking)}; " if lacking else "")
            + "refit it with `cre fit`"
        )
    quality = QualitySettings(**body["quality"])
    budget = dict(body["budget"])
    return RouterFile(
        schema_version=int(body["schema_version"]),
        ladder=ladder,
        embedder=emb,
        assigner=assigner,
        clusters=clusters,
        fallback_model=fallback,
        budget=budget,
        quality=quality,
        thresholds=thresholds,
        fit=dict(body["fit"]),
    )


def _check_ladder(path: Path, ladder: list[dict[str, Any]], settings: "Settings", force: bool) -> None:
    for entry in ladder:
        name, wanted = entry["name"], entry["sha256"]
        spec = settings.models.get(name)
        if spec is None:
            same = [s.name for s in settings.models.values() if wanted and s.sha256 == wanted]
            hint = f"; your model {same[0]!r} has that sha256, so rename it to {name!r}" if same else ""
            raise RouterFileError(
                f"{path}: the router's ladder needs model {name!r}"
                + (f" (sha256 {wanted[:12]}…)" if wanted else "")
                + f", which no models.toml defines{hint}. Add it to your models.toml "
                "(`cre models path` shows where)."
            )
        if wanted is None:
            continue
        local = model_identity(spec)
        if local != wanted:
            problem = (
                f"{path}: model {name!r} is not the file the router was fitted with: the router "
                f"pins sha256 {wanted[:12]}…, the local one is "
                + (f"{local[:12]}…" if local else "unknown (no sha256 pinned and no file on disk)")
                + f" ({spec.defined_in or 'models.toml'})"
            )
            if not force:
                raise RouterFileError(
                    f"{problem}. Use the same model file, refit the router on yours, or pass --force to use it anyway."
                )
            console.warn(f"{problem}; using it anyway (--force), so the router's choices may not hold.")
