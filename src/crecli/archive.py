"""The router file's container: a zip archive of `manifest.json` and `.npy` arrays.

The arrays are the embedder's and the assigner's fitted state, one member each under a
folder per owner (`embedder/idf.npy`, `assigner/exemplars.npy`). manifest.json holds
`format` ("crecli-router"), `schema_version`, `body_sha256` and `body`: `body_sha256` is
the sha256 of the body's canonical JSON, and the body lists every array member's sha256,
size, dtype and shape, so changing any byte of the manifest or of an array, or
truncating the file, is detected on load. What the body holds is `schema`'s to check.

A router file is sent to teammates, so reading it must never run code: no pickle, no
eval; arrays are read with `np.load(..., allow_pickle=False)`, object arrays are refused,
and member names are checked against a fixed pattern before anything is read. Whoever
edits the file can recompute `body_sha256`, so the checksum proves nothing about intent:
zip members are bounded by fixed caps before anything is inflated, and each `.npy` header
is checked against its member's real size before an array is allocated.

Writing is atomic (`paths.atomic_write`), and two saves of the same router are
byte-identical.
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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, NoReturn

from crecli import paths
from crecli.errors import RouterFileError
from crecli.fields import clean, show
from crecli.safejson import has_surrogate, unique_keys

if TYPE_CHECKING:
    import numpy as np

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


def canonical(body: dict[str, Any]) -> bytes:
    """The body's canonical JSON, whose sha256 the manifest records."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _npy(array: "np.ndarray", where: str) -> bytes:
    import numpy as np

    array = np.asarray(array)
    if array.dtype.hasobject:
        raise RouterFileError(f"cannot store {where}: object arrays would need pickle; store numbers or strings")
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def pack(owner: str, arrays: dict[str, "np.ndarray"], blobs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Store `owner`'s arrays as .npy members in `blobs`; their manifest listing (member, sha256, size, dtype, shape)."""
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


def check_replaceable(path: Path, option: str) -> bool:
    """Refuse, before any work, to write a router over a file that is not one: `-o
    test.jsonl` at the end of an hour's fit replaced a held-out log (or notes, or a
    models.toml not in use) with no word. A router file (a zip whose `manifest.json` says
    `"format": "crecli-router"`) may be replaced; that is what refitting is. Any zip with a
    manifest.json was, and browser extensions and other packages have one. True where a
    router file is there, to be replaced."""
    from crecli.errors import CreError

    try:
        if not path.is_file():
            return False  # nothing there (what else is there, `paths.check_output` has judged)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                info = zf.getinfo(MANIFEST)
                if info.file_size <= MAX_MANIFEST_BYTES:
                    manifest = json.loads(zf.read(info))
                    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
                        return True
    except (OSError, KeyError, ValueError, RecursionError, EOFError, zlib.error, zipfile.BadZipFile,
            NotImplementedError, RuntimeError):
        pass  # KeyError: no manifest; ValueError: not JSON; the rest: a member zipfile cannot read
    raise CreError(
        f"{option} {path} exists and is not a router file; writing the router there would destroy it. "
        "Choose another file name, or delete the file first"
    )


def write(path: Path, body: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """Write a router file: `body` in a manifest with the format marker, the schema version
    and the body's sha256, beside the array members `pack` put in `blobs`.

    Atomically (`paths.atomic_write`): a temp file `.NAME.PID@HOST.RANDOM.tmp` in the same
    folder, fsynced, then a rename; the temp file is removed on any failure, and orphans
    that a killed save left are removed by the next save to the same path.
    """
    try:
        text = canonical(body)
    except (TypeError, ValueError) as exc:
        raise RouterFileError(f"cannot write {path}: the router holds a value JSON cannot store ({exc})") from None
    manifest = {
        "format": FORMAT,
        "schema_version": body["schema_version"],
        "body_sha256": hashlib.sha256(text).hexdigest(),
        "body": json.loads(text),
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


class Archive:
    """An open router file whose container and manifest passed their checks (`read`): its
    `body`, unchecked beyond the sha256, and the sha256 of the file's bytes. Its arrays are
    read once the caller, having checked the body, says which members it lists (`arrays`).
    """

    def __init__(self, path: Path, zf: zipfile.ZipFile, body: dict[str, Any], sha256: str) -> None:
        self.path = path
        self.body = body
        self.sha256 = sha256
        self._zf = zf

    def arrays(self, listed: dict[str, dict[str, Any]]) -> dict[str, "np.ndarray"]:
        """The arrays of the members `listed` (member -> its manifest entry), each checked
        against its entry's size, sha256, dtype and shape; a member that the manifest does
        not list, or arrays over MAX_ARRAY_BYTES in all, are refused."""
        path, zf = self.path, self._zf
        names = [info.filename for info in zf.infolist()]
        extra = sorted(set(names) - set(listed) - {MANIFEST})
        if extra:
            raise RouterFileError(f"{path}: members not listed in the manifest ({', '.join(extra)}); refusing to load it")
        total = sum(zf.getinfo(member).file_size for member in listed if member in names)
        if total > MAX_ARRAY_BYTES:
            raise RouterFileError(
                f"{path}: the router's arrays would inflate to {total} bytes, over the limit of {MAX_ARRAY_BYTES >> 20} MiB "
                "in all; refusing to load it"
            )
        return {member: _read_array(path, zf, member, entry) for member, entry in listed.items()}


@contextmanager
def read(path: Path) -> Iterator[Archive]:
    """The router file at `path`, open and checked up to its manifest body; closed on leaving.

    Checks, in order: a zip archive of at most MAX_MEMBERS plain (stored or deflated,
    unencrypted) members, only expected member names, a manifest under MAX_MANIFEST_BYTES
    of plain JSON, the format marker, the schema version and the body's sha256. One open
    file serves the hash and the zip, so `Archive.sha256` is that of the bytes loaded even
    if the path is replaced meanwhile (served-log entries credit it).
    """
    what = paths.not_a_file(path)
    if what == "not found":
        raise RouterFileError(f"{path}: no such router file; check the path, or make one with `cre fit`")
    if what is not None:
        raise RouterFileError(f"{path}: {what}; pass a router file written by `cre fit`")
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise RouterFileError(f"{path}: cannot read the router file ({exc.strerror or exc})") from None
    with fh:
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
                f"{path}: the router file is truncated or damaged ({clean(str(exc))}). Copy it again, or refit with `cre fit`."
            ) from None
        with zf:
            yield Archive(path, zf, _manifest_body(path, zf), sha.hexdigest())


# What zipfile and zlib raise on a damaged or hostile archive (bad headers, names that are
# not UTF-8, sizes that overflow, compression it cannot undo).
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
    RuntimeError, OverflowError, struct.error, zlib.error,
)


def _member_bytes(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """A member's bytes, refused before inflating if it is encrypted, oddly compressed or too big."""
    name = show(info.filename)
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
            f"{path}: member {name} cannot be read ({clean(str(exc))}); the file is truncated or damaged, copy it again"
        ) from None
    if len(data) != info.file_size:
        raise RouterFileError(
            f"{path}: member {name} holds {'more' if len(data) > info.file_size else 'fewer'} bytes than its zip "
            "entry records; the file is damaged or was tampered with, refusing to load it"
        )
    return data


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number JSON allows")




def _tree_problem(value: Any, limit: int) -> str | None:
    """Why a parsed manifest cannot be one crecli wrote, or None.

    Iterative, so the check cannot overflow the stack it protects. Lone surrogates (JSON
    allows `\\ud800`) are refused because no UTF-8 text holds them and printing one fails.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if has_surrogate(item):
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


def _manifest_body(path: Path, zf: zipfile.ZipFile) -> dict[str, Any]:
    """The manifest's body, once the members, the manifest's size, JSON, nesting, format
    marker, schema version and sha256 have passed their checks."""
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
            f"{path}: unexpected members in the router file ({', '.join(show(n) for n in (dupes + strange)[:5])}); "
            "it was not written by crecli or was tampered with. Refusing to load it."
        )
    if MANIFEST not in names:
        raise RouterFileError(f"{path}: the router file has no {MANIFEST}; it is not a crecli router file")
    raw = _member_bytes(path, zf, zf.getinfo(MANIFEST), MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=unique_keys)
    except RecursionError:
        raise RouterFileError(
            f"{path}: {MANIFEST} is nested too deeply to be a router manifest; refusing to load it"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise RouterFileError(
            f"{path}: {MANIFEST} is not valid JSON ({clean(str(exc))}); the file is damaged, refit it"
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
            f"{path}: router schema version {show(version)} is not supported (this crecli reads "
            f"version {SCHEMA_VERSION}); {fix}"
        )
    body = manifest.get("body")
    if not isinstance(body, dict):
        raise RouterFileError(f"{path}: {MANIFEST} has no body; the file is damaged, refit it")
    try:
        digest = hashlib.sha256(canonical(body)).hexdigest()
    except (ValueError, TypeError, RecursionError):
        digest = ""
    if digest != manifest.get("body_sha256") or body.get("schema_version") != version:
        raise RouterFileError(
            f"{path}: the manifest does not match its sha256: the file was modified after "
            "`cre fit` wrote it. Get an unmodified copy, or refit."
        )
    return body


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
            f"{path}: array {member} has an unreadable .npy header ({clean(str(exc))}); refusing to load it"
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
            f"{path}: array {member} cannot be read without pickle ({clean(str(exc))}); refusing to load it"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise RouterFileError(f"{path}: array {member} is not a plain array; refusing to load it")
    # No fitted state holds NaN or infinity; one that does would fail at the first prompt.
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise RouterFileError(f"{path}: array {member} holds NaN or infinite values; refusing to load it")
    # Nor values past float32's range: the answering path computes in float32, where 1e300
    # turns infinite, then NaN, and a NaN centroid takes every prompt.
    big = float(np.finfo(np.float32).max)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and array.size and (array.max() > big or array.min() < -big):
        raise RouterFileError(f"{path}: array {member} holds values beyond float32's range; refusing to load it")
    return array
