"""The served-query log: every prompt `cre ask`, `cre batch` and `cre serve` answered through
a router, with its answer and trace, for `cre log` to show and `cre fit --served` to refit on.

The one home of the log's format, place, appending, rotation and reading. The log is
`served.jsonl` in the user data dir (under `CRE_HOME` when set), one JSON object a line:

    {"schema": 1, "time": "2025-01-31T12:00:00.123Z", "command": "ask", "prompt": ...,
     "answer": ..., "model": ..., "cluster": ..., "escalations": ..., "agreement": ...,
     "cost": ..., "cost_unit": ..., "router": ..., "router_sha256": ..., "trace": {...}}

`trace` is `Trace.to_dict()` whole (steps, votes, tokens, seconds); the top-level copies of
its main fields are there so that people and `jq` need not dig for them. `router_sha256` is
the sha256 of the router file as the cascade loaded it (`RouterFile.file_sha256`).

Appending is one `os.write` of one whole line to a file opened with O_APPEND, under a
lock file shared by `cre` processes, so their lines never interleave. A line cut short (a
full disk, a killed process) is ended by the next append before it writes, so the next
entry starts a line of its own; the reader skips and counts the cut line, never fatal, and
reads an entry that an older crecli glued onto one. A number no JSON output may hold (NaN,
Infinity, or one too large for a float such as 1e999) is read as null. Past `MAX_BYTES` the file
becomes `served.1.jsonl` (and `.1` becomes `.2`, up to `GENERATIONS`; the oldest goes)
before the next append; a generation missing (a rotation cut off between its renames) is
filled first, and then nothing goes. Logging never fails an answer: a write that fails
warns once on stderr and the command goes on; an entry that cannot be logged (too large,
not encodable) is skipped with a warning of its own each time.

Only the standard library is imported here: `cre ask` loads this module on every call.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from crecli import paths
from crecli.errors import ConfigError, InputError, UsageError
from crecli.safejson import has_surrogate, replace_surrogates

if TYPE_CHECKING:
    from crecli.escalate import Cascade
    from crecli.trace import Trace

SCHEMA = 1
# Where the log lives is `paths`' to say (it lists every file crecli keeps).
FILE_NAME, LOCK_NAME, GENERATIONS = paths.SERVED_LOG, paths.SERVED_LOCK, paths.SERVED_GENERATIONS
# 16 MiB holds some thousands of entries (a trace with five votes on two rungs is ~2 KB); four
# files keep a bounded 64 MiB of history.
MAX_BYTES = 16 << 20
# One entry is never more than this: a longer line is not written, and is skipped when read,
# so a corrupt file can't make the reader hold a huge line.
MAX_ENTRY_BYTES = 4 << 20
# An entry crecli writes nests about five levels (entry, trace, steps, a step, its votes);
# json.loads reads ~1000, deeper than the recursive code that shows entries (`cre log
# --json`) can walk, so a deeper line is read as not an entry.
MAX_ENTRY_DEPTH = 32
# How long a writer waits for the lock: a `cre` holding it writes one line, so a longer hold
# is a stopped process (Ctrl-Z), and an answer must not wait on it; its entry goes unlogged.
# After such a wait, for LOCK_RETRY_SECONDS the lock is tried once without waiting, so a
# stopped holder costs one answer 10 s, not every answer (`cre serve` writes one at a time).
LOCK_WAIT_SECONDS = 10.0
LOCK_RETRY_SECONDS = 60.0
SETTING = paths.LOG_QUERIES  # in settings.toml; false turns the log off
COMMANDS = ("ask", "batch", "serve")
DEFAULT_LAST = 20

log_path = paths.served_log_file
generation_path = paths.served_generation


def setting_enabled() -> bool:
    """settings.toml's `log_queries`, true when absent.

    A broken settings.toml or a value that is not a boolean stops the command before any
    work, as a broken default router setting does: guessing could log what the user asked
    not to log.
    """
    value = paths.read_user_settings().get(SETTING, True)
    if not isinstance(value, bool):
        raise ConfigError(
            f"{paths.user_settings_file()}: {SETTING} must be true or false, got {value!r}; fix or delete the line"
        )
    return value


def for_command(command: str, no_log: bool = False, router: Path | None = None) -> "ServedLog":
    """The log a command writes to: off with `--no-log` or `log_queries = false`.

    Called before the command's work, so a settings problem stops it before any answer.
    """
    if command not in COMMANDS:  # pragma: no cover - a programming error
        raise ValueError(f"unknown command {command!r}")
    enabled = not no_log and setting_enabled()
    return ServedLog(log_path(), command, router=router, enabled=enabled)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(entry: dict[str, Any]) -> bytes:
    """One entry as one UTF-8 JSON line.

    Lone surrogates (undecodable bytes of a command-line prompt) can't be written as UTF-8
    and would come back as prompts the query log refuses, so they become U+FFFD.
    """
    text = json.dumps(entry, ensure_ascii=False, allow_nan=False, default=str)
    return (replace_surrogates(text) + "\n").encode("utf-8")


def _ends_a_line(fd: int) -> bool:
    """Whether the file is empty or its last byte ends a line (O_APPEND writes go to the end
    whatever the offset this moves)."""
    if os.fstat(fd).st_size == 0:
        return True
    os.lseek(fd, -1, os.SEEK_END)
    return os.read(fd, 1) == b"\n"


@dataclass
class ServedLog:
    """Appends entries for one command; `enabled` False makes `record` do nothing."""

    path: Path
    command: str
    router: Path | None = None
    enabled: bool = True
    max_bytes: int = MAX_BYTES
    generations: int = GENERATIONS
    written: int = 0
    failed: bool = False  # a write failed (and was warned about); later write failures stay quiet
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lock_busy_until: float = field(default=0.0, repr=False)  # time.monotonic(): try the lock once until then

    def record(self, prompt: str, trace: "Trace", cascade: "Cascade | None" = None) -> None:
        """Append the entry for one answered prompt; never raises."""
        if not self.enabled:
            return
        try:
            entry = self.entry(prompt, trace, cascade)
        except Exception as exc:  # noqa: BLE001 - a log entry must never cost the answer
            _skipped(f"could not build the served-query log entry ({type(exc).__name__}: {exc}); it was not logged")
            return
        self.append(entry)

    def entry(self, prompt: str, trace: "Trace", cascade: "Cascade | None" = None) -> dict[str, Any]:
        """The log entry for one answered prompt. Its cost is the trace's own, priced once when
        its answer was final (`live.Trace.cost`), the figure `cre serve` also answers with."""
        return {
            "schema": SCHEMA,
            "time": _now(),
            "command": self.command,
            "prompt": prompt,
            "answer": trace.answer,
            "model": trace.model,
            "cluster": trace.cluster,
            "escalations": trace.escalations,
            "agreement": trace.agreement,
            "cost": trace.cost,
            "cost_unit": trace.cost_unit or None,
            "router": str(self.router.resolve()) if self.router is not None else None,
            # The digest of the bytes the cascade loaded at startup, not of whatever the path
            # holds now: a router replaced while `cre serve` runs must not get the credit.
            "router_sha256": cascade.router.file_sha256 if cascade is not None else None,
            "trace": trace.to_dict(),
        }

    def append(self, entry: dict[str, Any]) -> bool:
        """Write one entry as one line; False (after a warning, once for write failures) when
        it could not be written."""
        if not self.enabled:
            return False
        try:
            data = _line(entry)
        except (TypeError, ValueError) as exc:
            _skipped(f"could not encode a served-query log entry ({exc}); it was not logged")
            return False
        if len(data) > MAX_ENTRY_BYTES:
            _skipped(f"an entry of {len(data):,} bytes is over the served-query log's {MAX_ENTRY_BYTES:,}-byte limit; "
                     "it was not logged")
            return False
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # One lock between `cre` processes for rotating and appending: the check for a
                # cut last line and the write after it must see the same end of file.
                busy = time.monotonic() < self._lock_busy_until
                with paths.exclusive(self.path.with_name(LOCK_NAME), 0.0 if busy else LOCK_WAIT_SECONDS):
                    self._rotate_if_full()
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                    try:
                        if not _ends_a_line(fd):
                            # A crash or a full disk cut the last line: end it first, or this
                            # entry would be glued onto it and both lost to the reader.
                            data = b"\n" + data
                        wrote = os.write(fd, data)
                        if wrote != len(data):
                            raise OSError(f"only {wrote} of {len(data)} bytes written")
                    finally:
                        os.close(fd)
            except paths.LockBusy as exc:
                # A lock held by a stopped process passes: said each time a whole wait ran out
                # (at most once a LOCK_RETRY_SECONDS), and not latched as a lasting failure
                # (`failed`), which would silence a full disk later.
                self._lock_busy_until = time.monotonic() + LOCK_RETRY_SECONDS
                if not busy:
                    from crecli.console import warn

                    warn(f"the served-query log {self.path} was not written: {exc.strerror or exc}; entries are "
                         f"skipped while it is held (tried again each time, waited for in {LOCK_RETRY_SECONDS:.0f} s)")
                return False
            except OSError as exc:
                self._warn(f"cannot write the served-query log {self.path} ({exc.strerror or exc}); "
                           "answering goes on without it (turn it off with --no-log)")
                return False
        self.written += 1
        return True

    def _rotate_if_full(self) -> None:
        """Rotate a full live file; called under the lock, so two processes that both saw a
        full file rotate it once, not twice (which would push a generation out early).

        Only the run of files from the live one up to the first missing generation moves
        up one place, into that gap; the oldest is replaced only when no place is free. A
        rotation cut off between its renames (Ctrl-C, a kill, a failing rename) leaves such
        a gap below the generations it already moved, and shifting every file that exists
        would then delete one that was not the oldest. Each rename keeps the order (a
        higher number is older), which is all `log_files` reads by, gap or none."""
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        gap = next((n for n in range(1, self.generations + 1) if not generation_path(self.path, n).exists()),
                   self.generations)
        for n in range(gap, 0, -1):
            os.replace(generation_path(self.path, n - 1), generation_path(self.path, n))

    def _warn(self, message: str) -> None:
        """Warn of a write that failed, once: the next write most likely fails the same way
        (a full disk, an unwritable folder), and a warning per answer would bury the answers.
        Only write failures latch `failed`; an entry skipped for itself (`_skipped`) does not,
        or a full disk after it would go unsaid."""
        if self.failed:
            return
        self.failed = True
        from crecli.console import warn

        warn(message)


def _skipped(message: str) -> None:
    """Warn of one entry not logged for itself (too large, not encodable), each time: the
    next entry may well be written, so this says nothing of the log as a whole."""
    from crecli.console import warn

    warn(message)


# ---------------------------------------------------------------- reading


@dataclass
class LogReading:
    """Entries read (oldest first) from the files read, and how many lines were skipped."""

    entries: list[dict[str, Any]]
    bad: int
    files: list[Path]
    total: int  # good entries in the files
    matched: int = 0  # of those, at or after --since (before --last)
    live: Path = field(default_factory=log_path)
    enabled: bool | None = None  # settings.toml's log_queries; None when it could not be read
    output: Path | None = None  # where `cre log -o` wrote the entries
    # Per file of `files`: (good entries, unreadable lines), so a reader can tell a file
    # that holds no entry at all from one whose entries were all filtered out.
    per_file: list[tuple[int, int]] = field(default_factory=list)


def log_files(live: Path | None = None) -> list[Path]:
    """The log's files that exist, oldest generation first (a higher number is older; a
    generation missing after a cut-off rotation is skipped, the order holds)."""
    live = live or log_path()
    return [p for p in (generation_path(live, n) for n in range(GENERATIONS, -1, -1)) if p.is_file()]


def parse_since(text: str) -> datetime:
    """`--since`: a date (2025-01-31, midnight UTC) or an ISO date and time (UTC unless it says)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--since {text!r}: give a date such as 2025-01-31 or a time such as 2025-01-31T14:00") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _entry_time(entry: dict[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(entry["time"]))
    except (KeyError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _within_depth(value: Any, limit: int) -> bool:
    """Whether `value` nests no more than `limit` containers deep; a loop, not recursion, so
    the check cannot overflow the stack it protects."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _valid(entry: Any) -> bool:
    """An entry this crecli understands: an object of a known schema with a prompt and a
    time, nested no deeper than an entry crecli writes (`MAX_ENTRY_DEPTH`)."""
    return (
        isinstance(entry, dict)
        and entry.get("schema") == SCHEMA
        and isinstance(entry.get("prompt"), str)
        and bool(entry["prompt"].strip())
        and not has_surrogate(entry["prompt"])  # only a hand-edited file has one; no UTF-8 output can hold it
        and _entry_time(entry) is not None
        and _within_depth(entry, MAX_ENTRY_DEPTH)
    )


def _open(path: Path) -> "BinaryIO | None":
    """`path` open for reading; None where it has gone (rotated away since it was listed)."""
    from crecli.querylog import open_input

    try:
        return open_input(path, "a file written by `cre log -o`")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _open_generations() -> list[tuple[Path, "BinaryIO | None"]]:
    """This user's log files, oldest first, all opened under the writers' lock: a rotation
    between listing and opening would otherwise have one file read twice and another
    never. Read after the lock is released, the open files stay the generations they were."""
    live = log_path()
    try:
        guard = paths.exclusive(live.with_name(LOCK_NAME), LOCK_WAIT_SECONDS) if live.parent.is_dir() else nullcontext()
        with guard:
            return [(path, _open(path)) for path in log_files(live)]
    except OSError:  # a log folder this user may read but not lock (read-only): as before, unlocked
        return [(path, _open(path)) for path in log_files(live)]


def _read_file(fh: "BinaryIO | None") -> Iterator[dict[str, Any] | None]:
    """Each line's entry, or None for a line that is not one (cut short, corrupt, too long)."""
    from crecli.querylog import LongLine, read_lines

    if fh is None:
        return
    with fh:
        for raw in read_lines(fh, MAX_ENTRY_BYTES):
            if isinstance(raw, LongLine):
                yield None
                continue
            if not raw.strip():
                continue
            try:
                entry = _loads(raw)
            except (ValueError, RecursionError):
                # Only the damaged bytes are lost: an entry glued onto a cut line (written
                # before appends ended cut lines) still starts with its own `{"schema": `.
                yield None
                glued = _glued_entry(raw)
                if glued is not None:
                    yield glued
                continue
            yield entry if _valid(entry) else None


# How every entry's line begins (`_line` writes "schema" first). Inside a JSON string a
# quote is escaped, so these bytes past a line's start begin another entry.
_ENTRY_START = b'{"schema": '


def _glued_entry(raw: bytes) -> dict[str, Any] | None:
    """The last whole entry inside a line that does not parse, or None."""
    start = raw.rfind(_ENTRY_START)
    return _entry_of(raw[start:]) if start > 0 else None


def _entry_of(raw: bytes) -> dict[str, Any] | None:
    """The entry one line holds, or None where it holds none (not JSON, not a valid entry)."""
    try:
        entry = _loads(raw)
    except (ValueError, RecursionError):
        return None
    return entry if _valid(entry) else None


def _loads(raw: bytes) -> Any:
    """One line's JSON, with every number a JSON output may hold: an entry holding another
    could be neither shown, exported nor compared with an earlier export (`_entry_key`)."""
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)


def _no_constant(name: str) -> None:
    """NaN and Infinity (which no JSON output may hold) are read as null."""
    return None


def _finite_float(text: str) -> float | None:
    """A number too large for a float (1e999, which float() reads as inf) is read as null,
    as Infinity is (`_no_constant`)."""
    value = float(text)
    return value if math.isfinite(value) else None


def read(
    files: list[Path] | None = None, since: datetime | None = None, last: int | None = None
) -> LogReading:
    """The entries of `files` (default: every generation of this user's log), oldest first.

    `since` keeps entries at or after it; `last` keeps the newest `last` of those. Lines
    that are not valid entries are skipped and counted in `bad`.
    """
    opened = _open_generations() if files is None else [(path, _open(path)) for path in files]
    files = [path for path, _ in opened]
    # A deque's maxlen is a C ssize_t: `--last 99999999999999999999` was an OverflowError,
    # and no log holds sys.maxsize entries, so such a `last` keeps every one.
    kept: deque[dict[str, Any]] = deque(maxlen=last if last is None or last < sys.maxsize else None)
    bad = total = matched = 0
    per_file = []
    for _, fh in opened:
        good_before, bad_before = total, bad
        for entry in _read_file(fh):
            if entry is None:
                bad += 1
                continue
            total += 1
            if since is not None:
                when = _entry_time(entry)
                if when is None or when < since:
                    continue
            matched += 1
            kept.append(entry)
        per_file.append((total - good_before, bad - bad_before))
    return LogReading(entries=list(kept), bad=bad, files=files, total=total, matched=matched, per_file=per_file)


def fit_files(own: bool, named: list[Path]) -> list[Path]:
    """The files `cre fit` reads served prompts from: this user's log (`--served`) and any
    `--served-log FILE`; a named file that does not exist is an error, not an empty log."""
    for path in named:
        what = paths.not_a_file(path)
        if what is not None:
            raise InputError(f"--served-log {path}: {what}; give a file written by `cre log -o FILE`")
    return (log_files() if own else []) + list(named)


def check_fit_reading(reading: LogReading, named: list[Path]) -> None:
    """After `read(fit_files(...))`: refuse a `--served-log FILE` none of whose lines is an
    entry, and warn of an empty one.

    A router or a query log given by mistake was read as a log of unreadable lines, and the
    fit went on with nothing from it, saying only "(92 unreadable line(s) left out)".
    """
    from crecli.console import warn

    counts = dict(zip(reading.files, reading.per_file))
    for path in named:
        good, bad = counts.get(path, (0, 0))
        if good:
            continue
        if bad:
            raise InputError(
                f"--served-log {path}: none of its {bad} line(s) is a served-query log entry; give a file "
                "written by `cre log -o FILE` (a query log to fit on is the LOG argument)"
            )
        warn(f"--served-log {path} holds no entries; nothing from it joins the clustering")


def _entry_key(entry: dict[str, Any]) -> bytes:
    """What tells one entry from another: there is no id, so the whole entry (its time,
    prompt, answer and trace), as a digest of its canonical JSON."""
    import hashlib

    text = json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _earlier_export(path: Path) -> tuple[str | None, list[bytes]]:
    """Why `path` is not an earlier export, for `export` to refuse it: None where it is
    absent, empty, or one (every line an entry); and the `_entry_key` of each entry it holds."""
    from crecli.querylog import LongLine, read_lines

    keys = []
    try:
        fh = _open(path)
        if fh is None:
            return None, []
        with fh:
            for number, raw in enumerate(read_lines(fh, MAX_ENTRY_BYTES), 1):
                if not isinstance(raw, LongLine) and not raw.strip():
                    continue
                entry = None if isinstance(raw, LongLine) else _entry_of(raw)
                if entry is None:
                    return f"line {number} is not a served-log entry", []
                try:
                    keys.append(_entry_key(entry))
                except (TypeError, ValueError) as exc:  # an entry `_entry_of` let through, yet JSON cannot hold
                    return f"line {number} holds a value JSON cannot hold ({exc})", []
    except InputError:  # `_open`'s: unreadable, so what it holds cannot be known
        return "it cannot be read to tell", []
    except OSError as exc:
        return f"it cannot be read to tell ({exc.strerror or exc})", []
    return None, keys


def is_stdout(out: Path) -> bool:
    """Whether `-o` names stdout: "-" (pathlib reads "./-" as "-" too; a file of that name
    is given by its absolute path)."""
    return str(out) == "-"


def export(entries: list[dict[str, Any]], out: Path, sources: list[Path], force: bool = False) -> Path:
    """Write `entries` as JSONL to `out`, in the log's own format, so `cre fit --served-log`
    reads it; `out` may not be one of the log's own files.

    An existing `out` is replaced only when it is empty or an earlier export: `-o
    queries.jsonl` replaced a query log (or notes) with no word, as `cre fit -o` once did
    (`archive.check_replaceable`). An earlier export holding entries that `entries` lacks
    is replaced only with `force`: once the log has rotated them away (past 64 MiB), or
    with a narrower --since, the old export may be their only copy. `out` "-" is stdout,
    as `cre batch` reads "-" as stdin."""
    if is_stdout(out):
        try:
            # Every line is encoded before the first is written, so an entry JSON cannot
            # hold leaves stdout empty, as it leaves a file unwritten.
            data = b"".join(_line(entry) for entry in entries)
        except (TypeError, ValueError) as exc:
            raise InputError(f"-o -: an entry cannot be written as JSON ({exc}); nothing was written") from None
        # A write that fails (a closed pipe, a full disk) is `cli.main`'s to report.
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return out
    paths.check_output(out, "-o", [("the served-query log", p) for p in sources], example="served-export.jsonl")
    why, held = _earlier_export(out)
    if why is not None:
        raise InputError(
            f"-o {out} exists and is not a `cre log` export ({why}); writing the entries there would destroy it. "
            "Choose another file name, or delete the file first"
        )
    if held and not force:
        try:
            kept = {_entry_key(entry) for entry in entries}
        except (TypeError, ValueError) as exc:  # as the write below would say of it
            raise InputError(f"-o {out}: an entry cannot be written as JSON ({exc}); nothing was written") from None
        lost = sum(key not in kept for key in held)
        if lost:
            raise InputError(
                f"-o {out} is an earlier export, and {lost} of its {len(held)} entries are not in this one "
                "(rotated out of the log since, or left out by --since or --last): replacing it would lose them. "
                "Write to another file name, or give --force to replace it"
            )

    def write(fh: BinaryIO) -> None:
        for entry in entries:
            fh.write(_line(entry))

    try:
        # The export holds the same prompts as the log, which is 0600: a new export is too
        # (whatever the umask), and an earlier one keeps the mode it has (`atomic_write`),
        # so one the user opened up to share stays shared.
        paths.atomic_write(out, write, mode=0o600)
    except OSError as exc:
        raise InputError(f"-o {out}: cannot write it ({exc.strerror or exc})") from None
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold; `read` gives none, callers might
        raise InputError(f"-o {out}: an entry cannot be written as JSON ({exc}); nothing was written") from None
    return out


def query(last: int | None = None, since: str | None = None, output: Path | None = None,
          force: bool = False) -> LogReading:
    """`cre log`: the newest `last` entries (default 20 when shown; every entry with
    `since` or `output`), at or after `since`, written to `output` when given (`export`,
    with `force`)."""
    if last is None and since is None and output is None:
        last = DEFAULT_LAST
    reading = read(since=parse_since(since) if since is not None else None, last=last)
    try:
        reading.enabled = setting_enabled()
    except ConfigError:
        reading.enabled = None  # `cre log` still shows the log; the answering commands will report it
    if output is not None:
        export(reading.entries, output, reading.files, force=force)
        reading.output = output
    return reading
