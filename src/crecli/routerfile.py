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

The file comes from someone else, and whoever edits it can recompute `body_sha256`, so the
checksum proves nothing about intent: every manifest field is type- and range-checked on
load, zip members are bounded by fixed caps before anything is inflated, and each `.npy`
header is checked against its member's real size before an array is allocated.

Models are identified by sha256, not by path: a router fitted on one machine works on
another that has the same model files anywhere, under the same names in its models.toml.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, NoReturn, Sequence, TypeVar

from crecli import __version__, console, paths
from crecli.costs import UNITS, CostUnit
from crecli.errors import RouterFileError
from crecli.models.prompting import shots_of
from crecli.models.pull import model_identity
from crecli.quality import (
    MAX_TEMPERATURE, MAX_VOTES, Deferral, DeferralCheck, QualityCheck, blend_prior, feature_names, trust,
)
from crecli.querylog import FORMATS, FieldMap, LogOptions

if TYPE_CHECKING:
    import numpy as np

    from crecli.assign import Assigner
    from crecli.config import ModelConfig
    from crecli.embed import Embedder

SCHEMA_VERSION = 1
FORMAT = "crecli-router"
MANIFEST = "manifest.json"
# A router fitted on 1,400 queries into 40 clusters on 4 models, with --shots 0,1,3 and
# prompts of up to 90 words, has a 117 KB manifest (its arrays are separate members). 8 MiB
# leaves room for some thousands of clusters, and bounds what parsing, checking and showing
# a hostile manifest costs: 64 MiB made `cre inspect` take 13.6 s and 409 MB.
MAX_MANIFEST_BYTES = 8 << 20
# Caps on what a router file may make us inflate. The manifest's own sizes cannot be
# trusted (its checksum is recomputable), so these are fixed. A TF-IDF router on a large
# log holds tens of MB of arrays; 512 MiB per member and 1 GiB in all leave ample room
# while keeping a hostile file from exhausting memory.
MAX_MEMBER_BYTES = 512 << 20
MAX_ARRAY_BYTES = 1 << 30
MAX_MEMBERS = 64
# Real manifests nest about six levels deep; the bound keeps later recursive code safe.
MAX_MANIFEST_DEPTH = 32
# Arrays live under one folder per owner; names are plain words so no path tricks apply.
_MEMBER = re.compile(r"^(embedder|assigner)/([A-Za-z0-9_]{1,64})\.npy$")
# Fixed timestamps make two saves of the same router byte-identical.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
EXAMPLES_PER_CLUSTER = 3
EXAMPLE_CHARS = 200
# Answered examples (`cre fit --shots`): a cluster carries at most this many, and a model
# is shown one of SHOT_COUNTS of them. Longer exemplars are never chosen (`calibrate.pick_exemplars`).
SHOT_COUNTS = (0, 1, 3)
MAX_SHOTS = max(SHOT_COUNTS)
SHOT_PROMPT_CHARS = 1000
SHOT_ANSWER_CHARS = 200


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


@dataclass(frozen=True)
class Expected:
    """In-sample figures of the chosen cluster models (greedy answers, shrunk accuracy)."""

    accuracy: float
    cost: float
    reference_accuracy: float  # always the strongest model
    reference_cost: float


# Fields of the fit record this crecli reads back (and so types); others are kept as found.
_FIT_FIELDS = ("log", "log_sha256", "reader", "date", "crecli_version", "cost_unit", "seed", "n_queries",
               "n_labelled", "n_measured", "n_bad_lines", "n_clusters", "n_unclustered", "cluster_params",
               "truth", "expected", "simulated", "simulated_reference", "budget_met", "calibration")


@dataclass(frozen=True)
class FitRecord:
    """What `cre fit` (and the last `cre calibrate`) recorded about how the router was made."""

    log: str | None = None  # the query log's absolute path when it was fitted
    log_sha256: str | None = None
    reader: LogOptions = LogOptions()  # how the log was read, so calibrate and eval read it alike
    date: str | None = None
    crecli_version: str = __version__
    cost_unit: CostUnit = "seconds"  # of every cost in the router: cluster stats, expected, simulated
    seed: int = 0
    n_queries: int = 0
    n_labelled: int = 0
    n_measured: int = 0
    n_bad_lines: int = 0
    n_clusters: int = 0
    n_unclustered: int = 0
    cluster_params: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, float] | None = None  # NMI/ARI against --truth-field
    expected: Expected | None = None
    simulated: dict[str, Any] | None = None  # calibrate.SimResult.summary() of the chosen setting
    simulated_reference: dict[str, Any] | None = None
    budget_met: bool | None = None
    calibration: dict[str, Any] | None = None  # the last `cre calibrate`: budget, held-out figures
    extra: dict[str, Any] = field(default_factory=dict)  # fields another crecli wrote, kept as found

    def to_dict(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in _FIT_FIELDS}
        data["reader"] = self.reader.to_dict()
        data["expected"] = asdict(self.expected) if self.expected is not None else None
        return {**self.extra, **data}


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
        """The deferral model's prior for `model` in cluster `cid`: the cluster's shrunk
        accuracy, else the model's accuracy over the log (0.5 without a deferral model).

        With the prompt's `distance` to its nearest exemplar, a prompt beyond the cluster's
        radius gets a blend of the two (`quality.trust`, `quality.blend_prior`).
        """
        rules = self.deferral.models.get(model) if self.deferral is not None else None
        overall = rules.prior if rules is not None else 0.5
        info = self.cluster(cid) if cid >= 0 else None
        if info is None or model not in info.stats:
            return overall
        weight = trust(distance, self.assigner.radius(cid), self.assigner.threshold_)
        return blend_prior(info.stats[model]["shrunk_accuracy"], overall, weight)

    def shots(self, cid: int, model: str) -> tuple[tuple[str, str], ...]:
        """The answered examples `model` is shown before a prompt of cluster `cid` (none when unclustered)."""
        info = self.cluster(cid) if cid >= 0 else None
        return shots_of(info.exemplars, info.shots.get(model, 0)) if info is not None else ()


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
    """Write the router file atomically (`paths.atomic_write`): a temp file in the same
    folder, fsynced, then a rename.

    The temp file (`.NAME.PID.RANDOM.tmp`) is removed on any failure, and orphans that a
    killed save left are removed by the next save to the same path.
    """
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
            "arrays": _pack("embedder", e_arrays, blobs),
        },
        "assigner": {"params": a_params, "arrays": _pack("assigner", a_arrays, blobs)},
        "clusters": [c.to_dict() for c in router.clusters],
        "fallback_model": router.fallback_model,
        "budget": router.budget,
        "quality": router.quality.to_dict(),
        "thresholds": router.thresholds,
        "fit": router.fit.to_dict(),
        **({"deferral": router.deferral.to_dict()} if router.deferral is not None else {}),
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
    entries = {MANIFEST: json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False).encode(), **blobs}

    def write_zip(fh: BinaryIO) -> None:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Router files are shared: the umask decides their mode, as for any file a user makes.
        paths.atomic_write(path, write_zip, clean_stale=True)
    except OSError as exc:
        raise RouterFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def load(path: Path, settings: "ModelConfig | None" = None, force: bool = False) -> RouterFile:
    """Read and verify a router file; never executes anything from it.

    Checks, in order: a zip archive of at most MAX_MEMBERS plain (stored or deflated,
    unencrypted) members, only expected member names, the format marker, the schema
    version, the manifest's sha256, the type and range of every manifest field, every
    array's size (under the fixed caps), sha256 and .npy header (plain dtype, shape that
    fits the member's bytes); then that each ladder model is in the local models.toml with
    the same sha256. A sha256 mismatch is an error unless `force`, which turns it into a
    warning. Every failure is a RouterFileError.
    """
    path = Path(path)
    if settings is None:
        from crecli import config

        settings = config.load()
    try:
        body, arrays, digest = _read(path)
        router = _assemble(path, body, arrays, settings, force)
        router.file_sha256 = digest
        return router
    except _FieldError as exc:
        raise RouterFileError(f"{path}: {exc}; refusing to load it (refit it with `cre fit`)") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        # A safety net: the field checks should leave nothing for the rebuild to trip on.
        raise RouterFileError(
            f"{path}: the router file's manifest is malformed ({type(exc).__name__}: {_clean(str(exc))}); "
            "refit it with `cre fit`"
        ) from None


def _read(path: Path) -> tuple["_Body", dict[str, "np.ndarray"], str]:
    """The checked manifest body, the arrays, and the sha256 of the file's bytes.

    One open file serves the hash and the zip, so the digest is that of the bytes loaded
    even if the path is replaced meanwhile (served-log entries credit it).
    """
    if not path.is_file():
        raise RouterFileError(f"{path}: no such router file; check the path, or make one with `cre fit`")
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise RouterFileError(f"{path}: cannot read the router file ({exc.strerror or exc})") from None
    with fh:
        return _read_open(path, fh)


def _read_open(path: Path, fh: BinaryIO) -> tuple["_Body", dict[str, "np.ndarray"], str]:
    try:
        head = fh.read(4)
        fh.seek(0)
        sha = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
        fh.seek(0)
        is_zip = zipfile.is_zipfile(fh)
        fh.seek(0)
    except OSError as exc:
        raise RouterFileError(f"{path}: cannot read the router file ({exc.strerror or exc})") from None
    if not is_zip:
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
        zf = zipfile.ZipFile(fh)
    except _ZIP_ERRORS as exc:
        raise RouterFileError(
            f"{path}: the router file is truncated or damaged ({_clean(str(exc))}). Copy it again, or refit with `cre fit`."
        ) from None
    with zf:
        body, arrays = _read_zip(path, zf)
    return body, arrays, sha.hexdigest()


# What zipfile and zlib raise on a damaged or hostile archive (bad headers, names that are
# not UTF-8, sizes that overflow, compression it cannot undo).
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
    RuntimeError, OverflowError, struct.error, zlib.error,
)


def _member_bytes(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """A member's bytes, refused before inflating if it is encrypted, oddly compressed or too big."""
    name = _show(info.filename)
    if info.flag_bits & 0x41:
        raise RouterFileError(f"{path}: member {name} is encrypted, which crecli never writes; refusing to load it")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise RouterFileError(
            f"{path}: member {name} uses zip compression method {info.compress_type}, not stored or deflated "
            "as crecli writes; refusing to load it"
        )
    if info.file_size > cap:
        raise RouterFileError(
            f"{path}: member {name} would inflate to {info.file_size} bytes, over the limit of {cap >> 20} MiB; "
            "refusing to load it"
        )
    try:
        with zf.open(info) as fh:
            # One byte past the recorded size: inflating more than the entry claims is refused,
            # whatever zipfile's own bookkeeping does.
            data = fh.read(info.file_size + 1)
    except _ZIP_ERRORS as exc:
        raise RouterFileError(
            f"{path}: member {name} cannot be read ({_clean(str(exc))}); the file is truncated or damaged, copy it again"
        ) from None
    if len(data) != info.file_size:
        raise RouterFileError(
            f"{path}: member {name} holds {'more' if len(data) > info.file_size else 'fewer'} bytes than its zip "
            "entry records; the file is damaged or was tampered with, refusing to load it"
        )
    return data


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _tree_problem(value: Any, limit: int) -> str | None:
    """Why a parsed manifest cannot be one crecli wrote, or None.

    Iterative, so the check cannot overflow the stack it protects. Lone surrogates (JSON
    allows `\\ud800`) are refused because no UTF-8 text holds them and printing one fails.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "holds text that is not valid Unicode (a lone surrogate)"
            continue
        if isinstance(item, dict):
            children: list[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return f"is nested more than {limit} levels deep, which no router manifest is"
        stack.extend((child, depth + 1) for child in children)
    return None


def _read_zip(path: Path, zf: zipfile.ZipFile) -> tuple["_Body", dict[str, "np.ndarray"]]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise RouterFileError(
            f"{path}: the router file has {len(infos)} members, more than the {MAX_MEMBERS} crecli ever writes; "
            "refusing to load it"
        )
    names = [info.filename for info in infos]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    strange = sorted(n for n in names if n != MANIFEST and not _MEMBER.match(n))
    if dupes or strange:
        raise RouterFileError(
            f"{path}: unexpected members in the router file ({', '.join(_show(n) for n in (dupes + strange)[:5])}); "
            "it was not written by crecli or was tampered with. Refusing to load it."
        )
    if MANIFEST not in names:
        raise RouterFileError(f"{path}: the router file has no {MANIFEST}; it is not a crecli router file")
    raw = _member_bytes(path, zf, zf.getinfo(MANIFEST), MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise RouterFileError(
            f"{path}: {MANIFEST} is nested too deeply to be a router manifest; refusing to load it"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise RouterFileError(
            f"{path}: {MANIFEST} is not valid JSON ({_clean(str(exc))}); the file is damaged, refit it"
        ) from None
    problem = _tree_problem(manifest, MAX_MANIFEST_DEPTH)
    if problem:
        raise RouterFileError(f"{path}: {MANIFEST} {problem}; refusing to load it")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RouterFileError(f"{path}: not a crecli router file (no '{FORMAT}' format marker)")
    version = manifest.get("schema_version")
    # `type(...) is int`: JSON true would otherwise pass as version 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        newer = type(version) is int and version > SCHEMA_VERSION
        fix = "upgrade crecli to read it" if newer else "refit it with this crecli (`cre fit`)"
        raise RouterFileError(
            f"{path}: router schema version {_show(version)} is not supported (this crecli reads "
            f"version {SCHEMA_VERSION}); {fix}"
        )
    body = manifest.get("body")
    if not isinstance(body, dict):
        raise RouterFileError(f"{path}: {MANIFEST} has no body; the file is damaged, refit it")
    try:
        digest = hashlib.sha256(_canonical(body)).hexdigest()
    except (ValueError, TypeError, RecursionError):
        digest = ""
    if digest != manifest.get("body_sha256") or body.get("schema_version") != version:
        raise RouterFileError(
            f"{path}: the manifest does not match its sha256: the file was modified after "
            "`cre fit` wrote it. Get an unmodified copy, or refit."
        )
    parsed = _check_body(body)
    listed = {entry["member"]: entry for owned in parsed.arrays.values() for entry in owned.values()}
    extra = sorted(set(names) - set(listed) - {MANIFEST})
    if extra:
        raise RouterFileError(f"{path}: members not listed in the manifest ({', '.join(extra)}); refusing to load it")
    total = sum(zf.getinfo(member).file_size for member in listed if member in names)
    if total > MAX_ARRAY_BYTES:
        raise RouterFileError(
            f"{path}: the router's arrays would inflate to {total} bytes, over the limit of {MAX_ARRAY_BYTES >> 20} MiB "
            "in all; refusing to load it"
        )
    arrays = {member: _read_array(path, zf, member, entry) for member, entry in listed.items()}
    return parsed, arrays


def _read_array(path: Path, zf: zipfile.ZipFile, member: str, entry: dict[str, Any]) -> "np.ndarray":
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise RouterFileError(f"{path}: array {member} is missing; the file is truncated or damaged, copy it again") from None
    # Checked before reading, so a doctored member cannot make us inflate gigabytes.
    if info.file_size != entry["size"]:
        raise RouterFileError(f"{path}: array {member} has the wrong size; the file was modified, get an unmodified copy")
    data = _member_bytes(path, zf, info, MAX_MEMBER_BYTES)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RouterFileError(f"{path}: array {member} does not match its sha256; the file was modified, get an unmodified copy")
    return _decode_npy(path, member, data, entry)


def _decode_npy(path: Path, member: str, data: bytes, entry: dict[str, Any]) -> "np.ndarray":
    """The array in `data`, after checking its header against the bytes that follow it.

    np.load allocates what the header's shape asks for before reading, so a header
    claiming a huge shape would exhaust memory; here the shape times the item size must be
    exactly the bytes left in the member.
    """
    import numpy as np
    from numpy.lib import format as npy_format

    buf = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]}, which crecli does not write")
    except Exception as exc:  # noqa: BLE001
        # numpy parses the header with tokenize and ast.literal_eval, which raise many
        # types (ValueError, SyntaxError, tokenize.TokenError, ...) on hostile text.
        raise RouterFileError(
            f"{path}: array {member} has an unreadable .npy header ({_clean(str(exc))}); refusing to load it"
        ) from None
    if dtype.hasobject:
        raise RouterFileError(
            f"{path}: array {member} holds Python objects, which cannot be read without pickle; refusing to load it"
        )
    if dtype.kind not in "biufcSU" or dtype.fields is not None or dtype.subdtype is not None:
        raise RouterFileError(f"{path}: array {member} is not a plain array of numbers or strings; refusing to load it")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise RouterFileError(f"{path}: array {member} has an invalid shape in its .npy header; refusing to load it")
    count = math.prod(shape)
    held = len(data) - buf.tell()
    if count * dtype.itemsize != held or (count and not dtype.itemsize):
        raise RouterFileError(
            f"{path}: array {member}'s .npy header claims shape {tuple(shape)} of {dtype.str} "
            f"({count * dtype.itemsize} bytes) but the member holds {held}; refusing to load it"
        )
    if dtype.str != entry["dtype"] or list(shape) != entry["shape"]:
        raise RouterFileError(f"{path}: array {member} is not the dtype and shape the manifest records; refit it")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RouterFileError(
            f"{path}: array {member} cannot be read without pickle ({_clean(str(exc))}); refusing to load it"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise RouterFileError(f"{path}: array {member} is not a plain array; refusing to load it")
    # No fitted state holds NaN or infinity; one that does would fail at the first prompt.
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise RouterFileError(f"{path}: array {member} holds NaN or infinite values; refusing to load it")
    return array


def _assemble(path: Path, body: "_Body", members: dict[str, "np.ndarray"], settings: "ModelConfig", force: bool) -> RouterFile:
    from crecli import assign, embed

    _check_ladder(path, body.ladder, settings, force)
    names = [e.name for e in body.ladder]

    def arrays(owner: str) -> dict[str, "np.ndarray"]:
        return {name: members[entry["member"]] for name, entry in body.arrays[owner].items()}

    try:
        emb = embed.embedder_from_state(dict(body.embedder_params), arrays("embedder"), settings)
        assigner = assign.Assigner.from_state(dict(body.assigner_params), arrays("assigner"))
    except RouterFileError as exc:
        # Their messages quote array contents, which come from the file.
        raise RouterFileError(f"{path}: {_clean(str(exc), 400)}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise RouterFileError(
            f"{path}: the router's fitted embedder or assigner cannot be rebuilt from its arrays "
            f"({type(exc).__name__}: {_clean(str(exc))}); refit it with `cre fit`"
        ) from None
    if emb.identity != body.embedder_identity:
        problem = (
            f"{path}: the rebuilt embedder is not the one the router was fitted with "
            f"({emb.identity} != {body.embedder_identity})"
        )
        if not force:
            raise RouterFileError(f"{problem}; refit the router with this crecli, or pass --force to use it anyway")
        console.warn(f"{problem}; using it anyway (--force), so prompts may land in other clusters.")
    used = {
        body.fallback_model, *body.thresholds, *(body.deferral.models if body.deferral is not None else ()),
        *(m for c in body.clusters for m in (c.model, *c.thresholds, *c.stats, *c.shots)),
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
    return RouterFile(
        schema_version=SCHEMA_VERSION,
        ladder=body.ladder,
        embedder=emb,
        assigner=assigner,
        clusters=body.clusters,
        fallback_model=body.fallback_model,
        budget=body.budget,
        quality=body.quality,
        thresholds=body.thresholds,
        fit=body.fit,
        deferral=body.deferral,
    )


def _check_ladder(path: Path, ladder: list[LadderEntry], settings: "ModelConfig", force: bool) -> None:
    for entry in ladder:
        name, wanted = entry.name, entry.sha256
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


# --- manifest field checks ------------------------------------------------------------------
#
# The body's checksum can be recomputed by whoever edits the file, so every field is checked
# for type and range here, once, and the rest of crecli can trust a loaded RouterFile.

_MISSING: Any = object()
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_IDENTITY = re.compile(r"^(?:[0-9a-fA-F]{64}|remote:.+)$")
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_STAT_KEYS = ("n", "correct", "accuracy", "shrunk_accuracy", "mean_cost")
_BIG = 2**53  # the largest integer every JSON reader keeps exact; no count comes near it
MAX_NAME_CHARS = 128
MAX_TEXT_CHARS = 4096
MAX_LADDER = 64
MAX_CLUSTERS = 100_000
_T = TypeVar("_T")


class _FieldError(RouterFileError):
    """A manifest field of the wrong type or range; `load` prefixes the file's path."""


def _clean(text: str, limit: int = 200) -> str:
    """Text from a hostile file, safe for a terminal: non-printables escaped, shortened."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any, limit: int = 60) -> str:
    """A manifest value for an error message: JSON, ASCII-only (so no terminal escapes), short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        value = value[: limit + 1]
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _span(kind: str, lo: float, hi: float) -> str:
    if hi >= _BIG:
        return f"{kind} >= {lo}"
    return f"{kind} from {lo} to {hi}"


class _Field:
    """A manifest value and where it sits (`quality.k`, `clusters[3].model`), so each field
    is checked in one line and an error names it."""

    __slots__ = ("value", "where")

    def __init__(self, value: Any, where: str) -> None:
        self.value = value
        self.where = where

    def fail(self, want: str) -> NoReturn:
        if self.value is _MISSING:
            raise _FieldError(f"the manifest is malformed: field {self.where!r} is missing")
        raise _FieldError(f"manifest field {self.where} must be {want}, got {_show(self.value)}")

    def __getitem__(self, key: str) -> "_Field":
        obj = self.as_object()
        return _Field(obj.get(key, _MISSING), f"{self.where}.{key}" if self.where else key)

    def has(self, key: str) -> bool:
        return key in self.as_object()

    def or_none(self, check: Callable[["_Field"], _T]) -> _T | None:
        return None if self.value is None else check(self)

    def as_int(self, lo: int, hi: int = _BIG) -> int:
        # bool is an int subclass: JSON true must not pass as 1.
        if type(self.value) is not int or not lo <= self.value <= hi:
            self.fail(_span("an integer", lo, hi))
        return self.value

    def as_float(self, lo: float, hi: float = math.inf, *, above: bool = False) -> float:
        value = self.value
        ok = type(value) in (int, float) and math.isfinite(value) and (value > lo if above else value >= lo) and value <= hi
        if not ok:
            if hi == math.inf:
                self.fail(f"a finite number {'>' if above else '>='} {lo}")
            self.fail(f"a number {'>' if above else '>='} {lo} and <= {hi}")
        return float(value)

    def as_bool(self) -> bool:
        if type(self.value) is not bool:
            self.fail("true or false")
        return self.value

    def as_str(self, max_chars: int = MAX_NAME_CHARS, *, choices: Sequence[str] | None = None,
               pattern: "re.Pattern[str] | None" = None, want: str = "", text: bool = False) -> str:
        """A string: non-empty, printable and at most `max_chars` long; `text` allows any
        characters (and empty), for prompts, which are escaped wherever they are printed."""
        value = self.value
        if choices is not None:
            if value not in choices or not isinstance(value, str):
                self.fail("one of " + ", ".join(json.dumps(c) for c in choices))
            return value
        ok = isinstance(value, str) and len(value) <= max_chars and (text or (value != "" and value.isprintable()))
        if ok and pattern is not None and not pattern.match(value):
            ok = False
        if not ok:
            self.fail(want or (f"a string of at most {max_chars} characters" if text
                               else f"a printable string of 1 to {max_chars} characters"))
        return value

    def as_list(self, max_items: int, min_items: int = 0) -> list["_Field"]:
        if not isinstance(self.value, list) or not min_items <= len(self.value) <= max_items:
            self.fail(f"a list of {min_items} to {max_items} entries")
        return [_Field(v, f"{self.where}[{i}]") for i, v in enumerate(self.value)]

    def as_object(self, keys: Sequence[str] | None = None, optional: Sequence[str] = (), max_items: int = 4096) -> dict[str, Any]:
        if not isinstance(self.value, dict) or len(self.value) > max_items:
            self.fail(f"an object of at most {max_items} fields")
        if keys is not None:
            for key in keys:
                if key not in self.value and key not in optional:
                    _Field(_MISSING, f"{self.where}.{key}" if self.where else key).fail("")
            unknown = sorted(set(self.value) - set(keys))
            if unknown:
                raise _FieldError(
                    f"manifest field {self.where or 'body'} has an unexpected field {_show(unknown[0])}, "
                    "so this crecli did not write it"
                )
        return self.value

    def items(self, max_items: int, pattern: "re.Pattern[str] | None" = None) -> list[tuple[str, "_Field"]]:
        """An object's entries, keyed by names (model or array names) checked like `as_str`."""
        out = []
        for key, value in self.as_object(max_items=max_items).items():
            _Field(key, f"{self.where} key").as_str(pattern=pattern, want="letters, digits or _" if pattern else "")
            out.append((key, _Field(value, f"{self.where}[{_show(key)}]")))
        return out


@dataclass
class _Body:
    """The checked manifest body, in the types the rest of the loader uses."""

    ladder: list[LadderEntry]
    embedder_identity: str
    embedder_params: dict[str, Any]
    assigner_params: dict[str, Any]
    arrays: dict[str, dict[str, dict[str, Any]]]  # owner -> array name -> listing
    clusters: list[ClusterInfo]
    fallback_model: str
    budget: dict[str, Any]
    quality: QualityCheck
    thresholds: dict[str, float]
    fit: FitRecord
    deferral: DeferralCheck | None


def _sha256(f: _Field) -> str:
    return f.as_str(64, pattern=_HEX64, want="a sha256 (64 hex digits)")


def _model_identity(f: _Field) -> str:
    # models.pull.model_identity: a file's sha256, or `remote:URL#MODEL` for a remote rung.
    return f.as_str(MAX_TEXT_CHARS, pattern=_IDENTITY, want='a sha256 (64 hex digits) or "remote:URL#MODEL"')


def _check_body(body: dict[str, Any]) -> _Body:
    from crecli.costs import BUDGET_KINDS

    root = _Field(body, "")
    root.as_object(keys=("schema_version", "crecli_version", "ladder", "embedder", "assigner", "clusters",
                         "fallback_model", "budget", "quality", "thresholds", "fit", "deferral"),
                   optional=("deferral",))
    root["schema_version"].as_int(SCHEMA_VERSION, SCHEMA_VERSION)
    root["crecli_version"].as_str(64)
    ladder = [_ladder_entry(e) for e in root["ladder"].as_list(MAX_LADDER, min_items=1)]
    twice = sorted(n for n, c in Counter(e.name for e in ladder).items() if c > 1)
    if twice:
        raise _FieldError(f"manifest field ladder names model {twice[0]!r} twice")
    emb = root["embedder"]
    emb.as_object(keys=("kind", "identity", "params", "arrays"))
    kind = emb["kind"].as_str(choices=("tfidf", "llama"))
    identity = emb["identity"].as_str(512)
    assigner = root["assigner"]
    assigner.as_object(keys=("params", "arrays"))
    arrays = {"embedder": _array_entries(emb["arrays"], "embedder"),
              "assigner": _array_entries(assigner["arrays"], "assigner")}
    clusters = [_cluster(c) for c in root["clusters"].as_list(MAX_CLUSTERS)]
    twice_ids = sorted(i for i, c in Counter(c.id for c in clusters).items() if c > 1)
    if twice_ids:
        raise _FieldError(f"manifest field clusters lists cluster {twice_ids[0]} twice")
    budget = root["budget"]
    budget.as_object(keys=("kind", "value"))
    budget_kind = budget["kind"].as_str(choices=BUDGET_KINDS)
    # The CLI's own ranges: retain is a share of the strongest model's accuracy (a little
    # over 1 asks for better than it), max_cost a share of its cost.
    budget_value = budget["value"].as_float(0, 2.0 if budget_kind == "retain" else 1.0, above=True)
    q = root["quality"]
    q.as_object(keys=("k", "temperature", "top_p", "top_k", "early_stop"))
    quality = QualityCheck(
        k=q["k"].as_int(1, MAX_VOTES),
        temperature=q["temperature"].as_float(0, MAX_TEMPERATURE),
        top_p=q["top_p"].as_float(0, 1),
        top_k=q["top_k"].as_int(0, 1 << 20),
        early_stop=q["early_stop"].as_bool(),
    )
    return _Body(
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


def _deferral(f: _Field) -> DeferralCheck:
    f.as_object(keys=("votes", "models"))
    votes = f["votes"].as_int(1, MAX_VOTES)
    names = feature_names(votes)
    models = {}
    for model, m in f["models"].items(MAX_LADDER):
        m.as_object(keys=("features", "weights", "bias", "fill", "prior"))
        features = tuple(x.as_str(32) for x in m["features"].as_list(len(names), len(names)))
        if features != names:
            raise _FieldError(f"manifest field {m.where}.features must be {list(names)} for {votes} vote(s), got {list(features)}")
        models[model] = Deferral(
            features=features,
            weights=tuple(w.as_float(-_MAX_WEIGHT, _MAX_WEIGHT) for w in m["weights"].as_list(len(names), len(names))),
            bias=m["bias"].as_float(-_MAX_WEIGHT, _MAX_WEIGHT),
            fill=tuple(v.as_float(-_MAX_WEIGHT, _MAX_WEIGHT) for v in m["fill"].as_list(len(names), len(names))),
            prior=m["prior"].as_float(0, 1),
        )
    return DeferralCheck(votes, models)


def _ladder_entry(f: _Field) -> LadderEntry:
    f.as_object(keys=("name", "sha256", "size"))
    return LadderEntry(f["name"].as_str(), f["sha256"].or_none(_model_identity), f["size"].or_none(lambda g: g.as_int(0)))


def _array_entries(f: _Field, owner: str) -> dict[str, dict[str, Any]]:
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


def _embedder_params(f: _Field, kind: str) -> dict[str, Any]:
    if kind == "llama":
        f.as_object(keys=("kind", "model", "sha256"))
        return {"kind": f["kind"].as_str(choices=(kind,)), "model": f["model"].as_str(),
                "sha256": f["sha256"].or_none(_sha256)}
    from crecli.embed import TFIDF_ANALYZERS

    f.as_object(keys=("kind", "dims", "analyzer", "min_df", "mask_digits", "seed", "dims_"))
    dims = f["dims"].as_int(2, 1 << 16)
    return {
        "kind": f["kind"].as_str(choices=(kind,)),
        "dims": dims,
        "analyzer": f["analyzer"].as_str(choices=TFIDF_ANALYZERS),
        "min_df": f["min_df"].as_int(1, 1 << 31),
        "mask_digits": f["mask_digits"].as_bool(),
        "seed": f["seed"].as_int(-(1 << 63), 1 << 64),
        "dims_": f["dims_"].as_int(1, dims),
    }


def _assigner_params(f: _Field) -> dict[str, Any]:
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


def _cluster(f: _Field) -> ClusterInfo:
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
    return ClusterInfo(
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


def _stats(f: _Field) -> dict[str, float]:
    f.as_object(keys=_STAT_KEYS)
    return {
        "n": f["n"].as_float(0),
        "correct": f["correct"].as_float(0),
        "accuracy": f["accuracy"].as_float(0, 1),
        "shrunk_accuracy": f["shrunk_accuracy"].as_float(0, 1),
        "mean_cost": f["mean_cost"].as_float(0),
    }


def _fit(f: _Field) -> FitRecord:
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
        expected = Expected(e["accuracy"].as_float(0, 1), e["cost"].as_float(0),
                            e["reference_accuracy"].as_float(0, 1), e["reference_cost"].as_float(0))
    return FitRecord(
        log=f["log"].or_none(lambda h: h.as_str(MAX_TEXT_CHARS)) if "log" in fit else None,
        log_sha256=f["log_sha256"].or_none(_sha256) if "log_sha256" in fit else None,
        reader=_reader(f["reader"]) if fit.get("reader") is not None else LogOptions(),
        date=f["date"].or_none(lambda h: h.as_str(64)) if "date" in fit else None,
        crecli_version=f["crecli_version"].as_str(64) if "crecli_version" in fit else "unknown",
        cost_unit=f["cost_unit"].as_str(choices=UNITS) if "cost_unit" in fit else "seconds",  # type: ignore[arg-type]
        seed=f["seed"].as_int(-(1 << 63), 1 << 64) if "seed" in fit else 0,
        n_queries=count("n_queries"), n_labelled=count("n_labelled"), n_measured=count("n_measured"),
        n_bad_lines=count("n_bad_lines"), n_clusters=count("n_clusters"), n_unclustered=count("n_unclustered"),
        cluster_params=obj("cluster_params") or {},
        truth=obj("truth"),
        expected=expected,
        simulated=obj("simulated"),
        simulated_reference=obj("simulated_reference"),
        budget_met=f["budget_met"].or_none(lambda g: g.as_bool()) if "budget_met" in fit else None,
        calibration=obj("calibration"),
        extra={k: v for k, v in fit.items() if k not in _FIT_FIELDS},
    )


def _reader(f: _Field) -> LogOptions:
    f.as_object(keys=("format", "skip_bad", "fields"))
    fields = f["fields"]
    names = ("prompt", "reference", "match", "id", "labels")
    fields.as_object(keys=(*names, "max_line_bytes"))
    return LogOptions(
        fmt=f["format"].or_none(lambda g: g.as_str(choices=FORMATS)),
        skip_bad=f["skip_bad"].as_bool(),
        fields=FieldMap(**{n: fields[n].as_str() for n in names},
                        max_line_bytes=fields["max_line_bytes"].as_int(1, 1 << 40)),
    )
