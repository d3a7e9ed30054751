"""`cre batch`: answer a stream of prompts, one JSONL result per input line, in input order.

Work is reordered to keep models loaded: lines are taken in chunks, and within a chunk
every prompt on the lowest pending rung is checked before any prompt moves up, so each
model is used in one run of consecutive calls per chunk instead of being swapped in and
out as prompts escalate. Results are buffered and the complete prefix is written (and
flushed) as soon as it exists, so output order is input order and an interrupted batch
leaves whole lines behind for `--resume`.

With `--parallel N` (the cascade's `parallel`), the greedy votes of a chunk's prompts on
one rung are decoded together, N sequences at a time (`Cascade.decode_greedy`), before
their checks run one by one; the checks' sampled votes are drawn as without it.

A bad line (not JSON, no prompt, not UTF-8, empty, over the --max-prompt-bytes cap, JSON
that Python cannot hold: too deep, an over-long integer, a lone surrogate) gets an error
record in its place: N lines in, N lines out (minus lines skipped by --resume). A stream is
read with `querylog.read_lines`, so an over-cap line is skipped in chunks, never held whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Literal, Mapping, Protocol, TextIO, TypeVar

from crecli.console import progress, strict_json
from crecli.costs import CHUNK_LINES, RunTotal, previous_prompts
from crecli.errors import CreError, InputError, ModelLoadError, ModelNotAvailable, UsageError
from crecli.querylog import FieldMap, LongLine, Record, parse_batch_line, read_lines
from crecli.safejson import has_surrogate, replace_surrogates

if TYPE_CHECKING:
    from crecli.escalate import Cascade
    from crecli.live import Pending
    from crecli.trace import Trace
    from crecli.servedlog import ServedLog


# Lines taken and reordered together (see the module docstring) are `costs.CHUNK_LINES`, the
# chunks its pricing assumes; bench/batch_reuse.py rebuilds the order models saw prompts in
# from it and `by_cluster`.
T = TypeVar("T")


def by_cluster(items: Iterable[T], cluster: Callable[[T], int]) -> list[T]:
    """A chunk's prompts in the order a rung answers them: cluster by cluster, input order
    within one (a stable sort). A cluster's prompts then come one after another and share
    the rendered head and the cluster's answered examples, which llama.cpp reuses from its
    KV cache."""
    return sorted(items, key=cluster)


@dataclass
class BatchSummary:
    lines: int = 0  # input lines read
    skipped: int = 0  # already answered in the --resume file
    answered: int = 0
    errors: int = 0
    graded: int = 0  # answers to lines with a reference
    correct: int = 0
    escalated: int = 0  # answers that needed at least one escalation
    seconds: float = 0.0  # model-seconds: generation time of every vote drawn
    route_seconds: float = 0.0
    # Seconds each model took to load (`ModelPool.load_seconds` says why they matter), in
    # neither side's cost below.
    load_seconds: dict[str, float] = field(default_factory=dict)
    # Both sides of the comparison with always using the strongest model are priced by the
    # cascade's one `Pricing` on the same answers, as one run (`Cascade.cost_parts` and
    # `strongest_parts`, summed by `costs.RunTotal`): the strongest model's greedy answer is priced from its own
    # token counts, so it needs a token-priced unit ("bench-seconds" or "price"); in
    # "seconds" nothing is estimated.
    unit: str = "seconds"
    strongest_model: str = ""
    strongest_cost: float = 0.0  # the estimate, over the answers counted in `estimated`
    cascade_cost: float = 0.0  # what the cascade spent on those same answers, same unit
    estimated: int = 0
    models: dict[str, int] = field(default_factory=dict)  # answers per final model
    # In "bench-seconds": hours since the oldest run behind the ladder's speeds
    # (`bench.speeds_age_hours`). Speeds drift, and the comparison with the clock drifts
    # with them (`bench.STALE_HOURS`).
    speeds_age_hours: float | None = None
    interrupted: bool = False  # Ctrl-C, SIGTERM, SIGHUP: the lines not yet answered are for `--resume`
    # Lines whose id an earlier line of the input already had (a line without an id gets its
    # line number, which an explicit id may equal): `--resume` can tell such lines apart only
    # by their prompts and line numbers (two with the same prompt are one answer; see `_answer_all`).
    repeated_ids: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.answered if self.answered else None

    @property
    def cost_ratio(self) -> float | None:
        """Cascade cost as a share of the estimated always-strongest cost."""
        return self.cascade_cost / self.strongest_cost if self.strongest_cost > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(accuracy=self.accuracy, escalation_rate=self.escalation_rate, cost_ratio=self.cost_ratio)
        return data


_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}


def parse_size(text: str) -> int:
    """'4GB', '512MB', '1.5G', '2GiB' or a byte count, in binary units: 1GB, 1G and 1GiB are
    all 1024**3 bytes, as `--memory-budget`'s help says (and as `cre models list` labels
    sizes: MiB, GiB)."""
    value = text.strip().upper().replace(" ", "").removesuffix("IB").removesuffix("I")
    number = value.rstrip("KMGB")
    unit = value[len(number):]
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise UsageError(f"--memory-budget {text!r}: give a size such as 4GB, 512MB or 1.5G") from None
    # float() also reads "inf", "nan" and "1e999"; none of them is an amount of memory.
    if not math.isfinite(size):
        raise UsageError(f"--memory-budget {text!r}: give a finite size such as 4GB, or leave the option out for no limit")
    if size < 1:
        raise UsageError(f"--memory-budget {text!r}: the budget must be positive")
    return int(size)


def prompt_digest(prompt: str) -> str:
    """The sha256 of a prompt as it was read: what an output record keeps of it
    (`prompt_sha256`), so `--resume` can tell an answer to this prompt from an answer to
    another one that took its id."""
    import hashlib

    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Answered:
    """What an earlier output file (`read_done_ids`) says of one id, by input line: records
    name the line they answer, and an unchanged input has the same lines at the same numbers."""

    prompts: set[str | None] = field(default_factory=set)  # digests answered (None: an answer before `prompt_sha256`)
    at: set[int] = field(default_factory=set)  # the lines they were answered at
    failed: set[int] = field(default_factory=set)  # lines whose error record says they were tried and failed


def read_done_ids(path: Path) -> dict[str, Answered]:
    """Ids that already have an answer in an earlier output file, each with the digests of
    the prompts answered under it (`prompt_digest`) and the lines they were answered at: an
    input may repeat an id, and each of its lines was answered. An error record's line is kept
    too, unless it says the input changed (`input_changed`, or before that was written, the
    words of `changed_since`): that line was tried and is tried again, and `_answer_all`
    answers it though the id was answered at another line.

    Error records are not counted as done, so their lines are tried again; unreadable lines
    (such as a last line cut short by a crash) are ignored. A file whose whole lines hold no
    record at all (the prompts given for the output) is an InputError. NUL bytes that start a line are
    dropped: a run writing with '>' into a file the shell emptied under it (a second run's
    `> out.jsonl`) goes on at its old offset, and the gap reads back as NULs before its next
    answer.
    """
    from crecli.querylog import open_input

    done: dict[str, Answered] = {}
    records = 0  # lines that are a batch's answer or error records
    whole = False  # whether a whole line (its newline read) holds anything
    try:
        with open_input(path, "an earlier output file of `cre batch`", pipes=True) as fh:
            # A line at a time: a long run's output (each record carries its trace) can be
            # larger than the memory a resumed run has to spare.
            for line in _resume_lines(fh):
                whole = whole or (line.endswith(b"\n") and bool(line.strip(b"\0 \t\r\n")))
                records += _read_done_line(line, done)
    except FileNotFoundError:
        raise InputError(f"{path}: --resume file not found; drop --resume for a first run") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the --resume file: {exc.strerror}") from None
    # Whole lines (a last one cut by a crash aside) of which none is a record: the input given
    # where the earlier output was meant (`--resume prompts.jsonl`), which would answer every
    # line again after the first run's answers, as if nothing were amiss.
    if not records and whole:
        raise InputError(f"{path}: --resume file holds no `cre batch` answer or error records; --resume takes "
                         "the earlier run's output: cre batch --resume answers.jsonl prompts.jsonl >> answers.jsonl")
    # An id's errors count only where it has answers too.
    return {id: answered for id, answered in done.items() if answered.prompts}


# A --resume file is read in pieces of this many bytes, and a line held up to RESUME_LINE_CAP
# (a record is a few KiB, its trace included); past it only its start is kept, which reads as
# no record.
RESUME_PIECE = 1 << 16
RESUME_LINE_CAP = 64 << 20


def _resume_lines(fh: BinaryIO) -> Iterator[bytes]:
    """The lines of a --resume file, each without the NULs before it, in bounded memory.

    Read in pieces (`RESUME_PIECE`), NULs that start a line dropped as they come: the gap a
    shell's '>' leaves under a run still writing (`read_done_ids`) is as long as all that run
    had written and holds no newline, so `for line in fh` held it whole, gigabytes for a long
    run. A line over `RESUME_LINE_CAP` keeps its start only."""
    kept: list[bytes] = []
    size = 0
    while True:
        piece = fh.readline(RESUME_PIECE)
        if not piece:
            if kept:
                yield b"".join(kept)
            return
        if not kept:
            piece = piece.lstrip(b"\0")
            if not piece:
                continue
        if size < RESUME_LINE_CAP:
            kept.append(piece)
            size += len(piece)
        if piece.endswith(b"\n"):
            yield b"".join(kept)[:RESUME_LINE_CAP]
            kept, size = [], 0


def _read_done_line(line: bytes, done: dict[str, "Answered"]) -> int:
    """One line of a --resume file (`_resume_lines`: its leading NULs dropped) into `done`;
    1 where it is an answer or error record."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(row, dict) or ("answer" not in row and "error" not in row):
        return 0
    if row.get("id") is None:
        return 1
    id = str(row["id"])
    number = row.get("line")
    at = number if isinstance(number, int) and not isinstance(number, bool) and number > 0 else 0
    if "error" in row:
        if at and row.get("input_changed") is not True and not _says_changed(row["error"], id, at):
            done.setdefault(id, Answered()).failed.add(at)
        return 1
    digest = row.get("prompt_sha256")
    key = digest if isinstance(digest, str) else None
    answered = done.setdefault(id, Answered())
    answered.prompts.add(key)  # every answer adds one: an id with none has only errors
    if at:
        answered.at.add(at)
    return 1


def changed_since(resume: str, id: str) -> str:
    """The error of a line whose id the --resume file answered for another prompt."""
    return (f"id {id!r} was answered in {resume} for another prompt: the input changed since that run (a line "
            "edited, added or removed; a line without an id is known by its number). Answer this input into a "
            "new output file, without --resume, or give the line an id of its own")


def _says_changed(message: Any, id: str, line: int) -> bool:
    """Whether an error record's message is `changed_since`'s for `id` at input line `line`:
    records written before `input_changed` was written give that verdict only in these
    words, as "<input>:<line>: id ..." (`run_batch`), and must not be read as a line tried
    and failed. The words must follow the record's own line, the first ":<line>: " in the
    message (the input's name comes before it): an error that only quotes them (a server's
    message, another line's) is a line tried and failed."""
    head, tail = changed_since("\0", id).split("\0")
    if not isinstance(message, str) or not message.endswith(tail):
        return False
    at = message.find(f":{line}: ")
    return at > 0 and message.startswith(head, at + len(f":{line}: "))


def _writes_to(out: TextIO, resume: Path) -> bool:
    """Whether `out` is the --resume file itself (False where no file is behind `out`: a
    pipe, a test's buffer)."""
    import os

    try:
        return os.path.samestat(os.fstat(out.fileno()), os.stat(resume))
    except (OSError, ValueError, AttributeError):
        return False


def _file_ends_line(name: str | Path) -> bool:
    """Whether the file `name` is empty or its last byte is a newline (OSError when it cannot
    be read): where one more line can be written without gluing it onto a cut one."""
    import os

    with open(name, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def mend_cut_line(resume: Path, out: TextIO) -> None:
    """Start `out` on a line of its own when it appends to `resume` (`cre batch --resume
    answers.jsonl >> answers.jsonl`) and a crash cut that file's last line: the first new
    answer would otherwise be glued onto the cut one, and both lost to a JSON reader."""
    if not _writes_to(out, resume):
        return
    try:
        cut = not _file_ends_line(resume)
    except OSError:
        return
    if cut:
        out.write("\n")
        out.flush()


def emptied_by_redirect(resume: Path, out: TextIO) -> bool:
    """Whether `out` is the --resume file itself, emptied as it was opened: `> out.jsonl`
    where `>> out.jsonl` was meant, told by an empty file open to write only (`_opened_as`).
    The shell emptied the file before `cre` ran, so it holds no answers and every line is
    answered again; only a warning can say why."""
    return _writes_to(out, resume) and _opened_as(out) == "emptied"


def _opened_as(out: TextIO, busy: bool = False) -> Literal["append", "overwrite", "emptied", "end", "unknown"]:
    """Where writes to the file behind `out` land, told by its position: no flag says whether
    opening it emptied it. "append" (`>>`: at its end, wherever that is then); "overwrite"
    (before its end, over what it holds: `1<>` writes from its start, and so do systemd's
    `StandardOutput=file:`, which empties nothing, and an `exec 3>out.jsonl` descriptor once
    others appended); "emptied" (an empty file open to write only, as `>` leaves the file it
    emptied); "end" (at or past its end otherwise: a file opened read-write and sought to its
    end); "unknown" where that cannot be told (no file descriptor, no fcntl, a pipe or a
    terminal, which have no position).

    With `busy` (another run holds the file's lock, `lock_output`) its size is no sign: that
    run writes on at its old offset, so the file `>` emptied as this run started may hold its
    answers again by now. There, one open to write only, not appending, at its start is
    "emptied" (systemd's `StandardOutput=file:` is told from `>` by no flag either)."""
    import os

    try:
        import fcntl

        fd = out.fileno()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_APPEND:  # the shell's `>>` leaves the position at 0: it is not where writes go
            return "append"
        at, size = os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size
    except (OSError, ValueError, AttributeError, ImportError):  # no fd, no fcntl, no position (ESPIPE)
        return "unknown"
    if flags & os.O_ACCMODE == os.O_WRONLY and (size == 0 or busy and at == 0):
        return "emptied"
    return "overwrite" if at < size else "end"


def _file_name(fd: int, name: str) -> str:
    """`name`, or where it is a stream's ("<stdin>", "<stdout>"), the file the shell opened
    for it, where /proc says: what a message names."""
    import os

    if not name.startswith("<"):
        return name
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"{name.strip('<>')}'s file"


def refuse_own_output(input: BinaryIO, out: TextIO, source: str, resume: Path | None) -> None:
    """Refuse (UsageError) an input that is the file the answers go to (`cre batch in.jsonl
    >> in.jsonl`, or `< in.jsonl >> in.jsonl`, or `1<> in.jsonl`): each answer would be read
    back as a line to answer, and the file grow until the disk is full. And a --resume file
    that is the input: it is the output of an earlier run. And a --resume file that is stdout
    opened to write before its end (`1<>`, systemd's `StandardOutput=file:`): the answers would
    be written over those it holds (where `>` emptied it, `emptied_by_redirect` warns instead:
    nothing is left to lose; `lock_output`, called first, refuses a file another run writes to,
    saying whether `>` emptied it). And, with or without --resume, any stdout so opened over a
    file that holds something: the old records past this run's would stay, mixed in. Only
    regular files are compared: a terminal is stdin and stdout at once, rightly."""
    if resume is not None and _writes_to(out, resume) and _opened_as(out) == "overwrite":
        raise UsageError(f"stdout is the --resume file {resume}, opened to write before its end without appending "
                         "(as '1<>' and systemd's StandardOutput=file: open it): this run's answers would be written "
                         "over the ones it holds. Append to it (systemd: StandardOutput=append:): "
                         f"cre batch --resume {resume} prompts.jsonl >> {resume}")
    _refuse_input_as_output(input, out, source, resume)
    if _opened_as(out) == "overwrite":
        # Without --resume too: the records past this run's last would stay, read back by a
        # later --resume as answers, and the line cut where this run's writes end is garbage.
        name = _file_name(out.fileno(), "<stdout>")
        raise UsageError(f"stdout ({name}) is opened to write before its end without appending (as '1<>' and systemd's "
                         "StandardOutput=file: open a file): this run's answers would be written over the records it "
                         "holds, and those past them would stay, mixed in. Empty it or append to it (systemd: "
                         f"StandardOutput=truncate: or append:): cre batch prompts.jsonl > {name}")


def _refuse_input_as_output(input: BinaryIO, out: TextIO, source: str, resume: Path | None) -> None:
    """`refuse_own_output`'s refusals of an input that is stdout's file, or the --resume file."""
    import os
    import stat

    try:
        fd = input.fileno()
        read = os.fstat(fd)
    except (OSError, ValueError, AttributeError):  # no file behind the input (a test's lines)
        return
    if not stat.S_ISREG(read.st_mode):
        return
    path = _file_name(fd, source)
    try:
        written = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        written = None
    if written is not None and os.path.samestat(read, written):
        what = path if source == path else f"stdin ({path})"
        emptied = (f" ({path} is empty: the shell's '>' emptied it before cre started)"
                   if _opened_as(out) == "emptied" else "")
        raise UsageError(f"{what} is also stdout, where the answers go: each answer would be read back as a prompt, "
                         f"and the file grow until the disk is full{emptied}. Write the answers to another file: "
                         "cre batch prompts.jsonl > answers.jsonl")
    if resume is None:
        return
    try:
        kept = os.stat(resume)
    except OSError:  # `read_done_ids` says what is wrong with it
        return
    if os.path.samestat(read, kept):
        raise UsageError(f"--resume {resume} is the input too; --resume takes the output of the earlier run: "
                         "cre batch --resume answers.jsonl prompts.jsonl >> answers.jsonl")


def lock_output(out: TextIO) -> contextlib.AbstractContextManager[Any]:
    """Take an exclusive lock on the file `out` writes to, held until the context returned
    is left (or the process exits), or refuse (CreError) when another `cre batch` holds it:
    two runs appending to one file (`--resume out.jsonl >> out.jsonl` twice) read the same
    answered ids, answered the same lines twice, and a record longer than a write could land
    inside the other's. Nothing is locked where `out` is no regular file (a pipe, a
    terminal, a test's buffer).

    The lock is taken on a handle of this process's own, opened afresh on the same file: a
    flock belongs to an open file, not to a process, so one taken on stdout's own descriptor
    outlived the run wherever a parent kept that open file (a driver's
    `subprocess.run(..., stdout=fh)` twice on one `fh`, a shell's `exec 3>>out.jsonl`),
    which refused its next run as "another cre batch", and let two runs sharing it both
    hold it. Where the file cannot be opened afresh (no read permission), stdout's
    descriptor is locked as before."""
    import os
    import stat

    try:
        import fcntl

        fd = out.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return contextlib.nullcontext()
    except (OSError, ValueError, AttributeError, ImportError):  # no fd, no flock: nothing to lock
        return contextlib.nullcontext()
    try:
        own: BinaryIO | None = open(f"/proc/self/fd/{fd}", "rb")  # noqa: SIM115 (closed by the context returned)
    except OSError:
        own = None
    try:
        fcntl.flock(own.fileno() if own is not None else fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if own is not None:
            own.close()
        name = _file_name(fd, str(getattr(out, "name", "<stdout>")))
        if _opened_as(out, busy=True) == "emptied":
            # `> out.jsonl`: the shell emptied the file before cre could refuse, so the other
            # run's answers so far are gone; it writes on, and --resume finds those it writes.
            raise CreError(f"another cre batch is writing to {name} (it holds its lock), and this run's '>' emptied "
                           "it before cre could refuse: the answers that run wrote so far are gone. Let it finish, "
                           f"then answer the lines it lost: cre batch --resume {name} prompts.jsonl >> {name}") from None
        raise CreError(f"another cre batch is writing to {name} (it holds its lock): let it finish, or "
                       "write this run elsewhere; two runs would answer the same lines and mix their records") from None
    except OSError:  # a file system without flock: nothing to lock
        if own is not None:
            own.close()
        return contextlib.nullcontext()
    return contextlib.closing(own) if own is not None else contextlib.nullcontext()


def _id_of(raw: "bytes | LongLine", fields: FieldMap) -> str | None:
    """The id of a line that failed to parse, when it is JSON with a usable one (for the error record)."""
    # Never parse a line the cap refused (the slack is a byte order mark and "\r\n").
    if isinstance(raw, LongLine) or len(raw) > fields.max_line_bytes + 5:
        return None
    try:
        row = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers
        return None
    value = row.get(fields.id) if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    # A lone surrogate in the id is what made the line bad; it cannot go into the output either.
    return None if has_surrogate(text) else text


def result_record(line: int, trace: "Trace", prompt: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": trace.id,
        "line": line,
        "prompt_sha256": prompt_digest(prompt),
        "answer": trace.answer,
        "model": trace.model,
        "cluster": trace.cluster,
        "escalations": trace.escalations,
        "agreement": trace.agreement,
        "p_correct": trace.p_correct,  # with a router calibrated by `--check deferral`
        "prompt_tokens": trace.prompt_tokens,
        "output_tokens": trace.output_tokens,
        "seconds": round(trace.seconds, 6),
    }
    if trace.correct is not None:
        record["correct"] = trace.correct
    record["trace"] = trace.to_dict()
    return record


def error_record(line: int, id: str | None, message: str, input_changed: bool = False) -> dict[str, Any]:
    record: dict[str, Any] = {"line": line, "id": id, "error": message}
    if input_changed:
        # A verdict on the input (`changed_since`), not a line tried and failed: a later
        # --resume (`read_done_ids`) gives the line the same verdict instead of answering it.
        record["input_changed"] = True
    return record


class _Fail(Protocol):
    """`run_batch`'s `fail`: a line's error record, counted."""

    def __call__(self, line: int, id: str | None, message: str, input_changed: bool = False) -> None: ...


class _OrderedWriter:
    """Writes records in line order as soon as the prefix up to them is complete."""

    def __init__(self, out: TextIO, first: int) -> None:
        self.out = out
        self.next = first
        self.ready: dict[int, dict[str, Any] | None] = {}
        self.failed = False  # a write or flush of `out` failed
        self.writing = False  # a write of records began and did not return (see `_write`)

    def put(self, line: int, record: dict[str, Any] | None) -> None:
        """`record` None marks a line that produces no output (skipped by --resume)."""
        self.ready[line] = record
        text = []
        first = upto = self.next
        while upto in self.ready:
            rec = self.ready[upto]
            if rec is not None:
                text.append(_json_line(rec))
            upto += 1
        self._write("".join(text), upto)
        # Dropped once written (`flush_ready` skips them already: a stop in this loop cannot
        # have them written twice) and before the flush.
        for done in range(first, upto):
            del self.ready[done]
        if text:
            self._flush()

    def flush_ready(self) -> None:
        """Write every finished record still waiting for an earlier line (when the batch
        stops: that line will not come in this run, and `--resume` finds these by id).

        After a write the stop cut short (`_write`) they start on a line of their own: the
        cut record is a bad line to `--resume`, which answers its line again, and the next
        one is whole. Where `out` is a regular file that already ends a line (the write took
        none of the text, or all of it) no newline is added; a pipe cannot be read back, so
        there a write that was not in fact cut leaves a blank line."""
        text = ["\n"] if self.writing and not self._ends_line() else []
        text += [_json_line(rec) for line in sorted(self.ready)
                 if line >= self.next and (rec := self.ready[line]) is not None]
        self._write("".join(text), self.next)
        self.ready.clear()
        self._flush()

    def _ends_line(self) -> bool:
        """Whether `out` is a regular file, empty or whose last byte is a newline: read back
        (`_file_ends_line`, as `mend_cut_line` does) through the file's own descriptor,
        reopened for reading (`/dev/fd`), since `> out.jsonl` opens it write-only. False where
        that cannot be told: a pipe, a terminal, a system without `/dev/fd`, a test's buffer."""
        import os
        import stat

        try:
            self.out.flush()  # what Python still buffers is part of the file's end
            fd = self.out.fileno()
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return False
            if info.st_size == 0:
                return True  # told without reopening: so even where `/dev/fd` is missing
            return _file_ends_line(f"/dev/fd/{fd}")
        except (OSError, ValueError, AttributeError):
            return False

    def _write(self, text: str, upto: int) -> None:
        """Write `text`, the records of the lines before `upto` not written yet, and count
        those lines written: however a stop (KeyboardInterrupt, which `stop_on_signals` makes
        of SIGTERM and SIGHUP) falls, no record is written twice."""
        try:
            # Counted before the write, with no call and no loop between the two, where CPython
            # runs a signal's handler: a stop raised from inside the write (SIGTERM ending one
            # blocked on a slow pipe) comes after the file took none, some or all of the text,
            # and `flush_ready` must not write it again; a stop before this leaves it to
            # `flush_ready`. Where the write took only some, its last record is cut and the rest
            # of the text is lost: `writing`, still set then, has `flush_ready` start a new line
            # (`_ends_line`: unless the file is seen to end one).
            self.next = upto
            if text:
                self.writing = True
                self.out.write(text)
                self.writing = False
        except OSError as exc:
            raise self._failed(exc) from None

    def _flush(self) -> None:
        """A flush of the results, its failure phrased."""
        try:
            self.out.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> BaseException:
        """What a failed write or flush of the results raises: a broken pipe as it is (the
        reader left, `cre batch ... | head`: Typer ends the run quietly), any other failure
        phrased."""
        self.failed = True
        if exc.errno == errno.EPIPE:
            return exc
        # The lines written before stay; `--resume` starts a cut last line afresh.
        return CreError(
            f"cannot write the results ({exc.strerror or exc}); once that is fixed, "
            "`cre batch --resume` with the file they went to answers the lines not written"
        )


def _json_line(record: dict[str, Any]) -> str:
    """One output line, always valid UTF-8 JSON, so one odd record cannot end the batch.

    Input lines with lone surrogates are refused when parsed, but a model's answer or a file
    name (undecodable bytes in it become surrogates) can still carry one; outside string
    literals the JSON text is ASCII, so replacing surrogates keeps it valid.
    """
    # Strict JSON, as every --json: a float that is not finite is null, never a bare NaN.
    text = strict_json(record, ensure_ascii=False)
    return replace_surrogates(text) + "\n"


def _chunks(lines: Iterable["bytes | LongLine"], size: int) -> Iterator[list[tuple[int, "bytes | LongLine"]]]:
    numbered = enumerate(lines, start=1)
    while chunk := list(islice(numbered, size)):
        yield chunk


def run_batch(
    lines: "Iterable[bytes | LongLine] | BinaryIO",
    out: TextIO,
    cascade: "Cascade",
    resume_ids: "Mapping[str, Answered]" = MappingProxyType({}),
    source: str = "<stdin>",
    resume_name: str = "the --resume file",
    chunk_size: int = CHUNK_LINES,
    fields: FieldMap = FieldMap(),
    served: "ServedLog | None" = None,
) -> BatchSummary:
    """Answer every line of `lines` (JSONL objects or plain-text prompts) into `out`.

    `lines` is a binary stream (read a line at a time, capped at `fields.max_line_bytes`)
    or the lines themselves. Lines whose id and prompt are in `resume_ids` (`read_done_ids`,
    from `resume_name`) are skipped and write nothing. A line whose id was answered there
    only for other prompts never gets another prompt's answer; it is judged by the lines the
    earlier run answered or tried (`_answer_all` has the rule): answered at its own line, it
    was edited (an error record, `changed_since`); else it is answered where an earlier line
    of the input has the id or the earlier run left an error record at its line, waits for
    its chunk's later lines where one of them is where the id was answered, and otherwise
    gets the error record. A model file missing, failing verification or refused by llama.cpp stops the
    batch (every later line would fail the same way); any other problem with one line
    becomes that line's error record. However the batch stops, every answer finished by
    then is written first.
    Each answer is also recorded in `served` (the served-query log) when given.
    """
    if hasattr(lines, "readline"):
        lines = read_lines(lines, fields.max_line_bytes)  # type: ignore[arg-type]
    summary = BatchSummary(unit=cascade.pricing.unit, strongest_model=cascade.strongest,
                           speeds_age_hours=_speeds_age_hours(cascade))
    writer = _OrderedWriter(out, first=1)
    # The summary's costs: the batch is one run of answers, whose answered examples are
    # priced by the one rule of `costs.share_prefixes`, and whose prompts do not pay for the
    # tokens they share at their start with the previous prompt of their cluster in their
    # chunk, which llama.cpp kept (`costs.previous_prompts`). Each answer is priced as it finishes,
    # with the strongest model's token counts for it (not kept: a prompt may be a megabyte
    # and a stream endless; and not counted at the end, after the progress bar).
    spent, strongest = RunTotal(), RunTotal()

    def finish(line: int, trace: "Trace", prompt: str, before: str = "") -> None:
        # The answer is written first: a Ctrl-C during the slower bookkeeping below (the
        # first count of the strongest model's tokens loads its vocabulary) must not lose it.
        writer.put(line, result_record(line, trace, prompt))
        if served is not None:
            served.record(prompt, trace, cascade)
        summary.answered += 1
        summary.escalated += int(trace.escalations > 0)
        summary.seconds += sum(s.seconds for s in trace.steps)
        summary.route_seconds += trace.route_seconds
        summary.models[trace.model] = summary.models.get(trace.model, 0) + 1
        if trace.correct is not None:
            summary.graded += 1
            summary.correct += int(trace.correct)
        # Only a unit priced by tokens compares with the strongest model ("seconds" cannot):
        # otherwise counting would tokenize every prompt for nothing.
        counts = cascade.strongest_tokens(trace, prompt) if cascade.pricing.by_tokens else (None, 0, 0.0)
        reused = cascade.reuse_of(trace, before, prompt)
        ours, theirs = cascade.cost_parts(trace, reused), cascade.strongest_parts(trace, counts, reused)
        # Only answers both sides can price are compared; the others still share examples.
        counted = ours[0] is not None and theirs[0] is not None
        summary.estimated += int(counted)
        spent.add(*ours, counted=counted)
        strongest.add(*theirs, counted=counted)

    def fail(line: int, id: str | None, message: str, input_changed: bool = False) -> None:
        summary.errors += 1
        writer.put(line, error_record(line, id, message, input_changed))

    try:
        _answer_all(lines, cascade, resume_ids, resume_name, source, chunk_size, fields, summary, writer, finish, fail)
    except BaseException as exc:
        if not _stopped(exc):
            # Whatever else ends the batch (a model that cannot answer at all) would otherwise
            # take with it the answers of the chunk still waiting for an earlier line: up to 63 lost.
            if not writer.failed:  # after a failed write, another could land after a cut line
                with contextlib.suppress(CreError, OSError):  # the first error is the one to report
                    writer.flush_ready()
            raise
        # Ctrl-C, or SIGTERM or SIGHUP (`stop_on_signals`). What is answered is kept and
        # counted, as a resumed run expects; a line the stop cut short is left for --resume
        # to answer again, and nothing is written after it on its line (`flush_ready`).
        summary.interrupted = True
        writer.flush_ready()
    summary.cascade_cost, summary.strongest_cost = spent.total, strongest.total
    summary.load_seconds = cascade.pool.load_seconds()
    return summary


def _stopped(exc: BaseException) -> bool:
    """Whether `exc` is a stop (KeyboardInterrupt: Ctrl-C, SIGTERM, SIGHUP), or an OSError
    raised while one unwound: after SIGHUP the terminal that was stderr may be gone, and the
    progress bar erasing itself there fails (EIO). The stop, not that, ended the batch."""
    while isinstance(exc, OSError) and exc.__context__ is not None:
        exc = exc.__context__
    return isinstance(exc, KeyboardInterrupt)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While open, SIGTERM and SIGHUP (the terminal or ssh session closed) stop the batch as
    Ctrl-C does (KeyboardInterrupt): every finished answer written, the summary printed, exit
    130, where their default killed the process with a chunk's finished answers unwritten.
    As `cre serve` (`serve.serve_forever`): only in the main thread, where Python runs signal
    handlers, and only a signal that would kill: one ignored (SIGHUP under nohup) stays so."""
    import signal
    import threading

    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)  # no SIGHUP on Windows
            if number is not None and signal.getsignal(number) == signal.SIG_DFL:
                saved[number] = signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _answer_all(
    lines: "Iterable[bytes | LongLine]",
    cascade: "Cascade",
    resume_ids: "Mapping[str, Answered]",
    resume_name: str,
    source: str,
    chunk_size: int,
    fields: FieldMap,
    summary: BatchSummary,
    writer: _OrderedWriter,
    finish: Callable[[int, "Trace", str, str], None],
    fail: _Fail,
) -> None:
    """`run_batch`'s loop: each chunk of lines parsed, routed in one call, and answered a
    rung at a time; every line ends in `finish`, `fail` or a skip.

    A line whose id `resume_ids` answered only for other prompts is judged by the lines the
    earlier run answered or tried: answered at this very line (for another prompt), the line
    was edited (the input changed: an error record). Else it is answered when an earlier line
    of the input has the id, or the earlier run tried this line and failed (its error record:
    the id was there, and on another line that was answered). Else only a stop can explain an input
    unchanged: it writes the answers its chunk finished (`_OrderedWriter.flush_ready`), so a
    later line of the same chunk may hold the id's answer. The line waits for the chunk's
    later lines: answered when the id is on a line where it was answered, an error record
    when it is on none (the input changed). The chunks are the same lines in every run of an
    input, and nothing waits past its own chunk."""
    seen: set[str] = set()

    def changed(line: int, id: str) -> None:
        fail(line, id, f"{source}:{line}: {changed_since(resume_name, id)}", input_changed=True)
        bar.advance(task)

    with progress() as bar:
        task = bar.add_task("Answering", total=None)
        for chunk in _chunks(lines, chunk_size):
            summary.lines += len(chunk)
            last = chunk[-1][0]
            records: list[tuple[int, Record]] = []
            held: dict[str, tuple[int, Record]] = {}  # waiting for a later line of the chunk with its id
            for line, raw in chunk:
                try:
                    record = parse_batch_line(raw, line, source, fields)
                except InputError as exc:
                    fail(line, _id_of(raw, fields), str(exc))
                    bar.advance(task)
                    continue
                repeated = record.id in seen
                summary.repeated_ids += int(repeated)
                seen.add(record.id)
                answered = resume_ids.get(record.id)
                if answered is not None:  # always so for an id in `held`
                    if record.id in held and line in answered.at:
                        records.append(held.pop(record.id))  # its id is where it was answered: answered now
                    # Answers kept no digest before: those match by id alone, as they did.
                    if None in answered.prompts or prompt_digest(record.prompt) in answered.prompts:
                        summary.skipped += 1
                        writer.put(line, None)
                        bar.advance(task)
                        continue
                    # Its id was answered only for other prompts (see the docstring).
                    here = line in answered.at
                    apart = repeated or line in answered.failed  # a line of its own that shares the id
                    if not here and not apart and any(line < at <= last for at in answered.at):
                        held[record.id] = (line, record)
                        continue
                    if here or not apart:
                        changed(line, record.id)
                        continue
                    # Lines sharing an id are told apart by their prompts: this one is answered.
                records.append((line, record))
            for line, record in held.values():  # no later line of the chunk has its id
                changed(line, record.id)
            records.sort(key=lambda item: item[0])  # `by_cluster` keeps input order within a cluster
            pending: list[tuple[int, "Pending"]] = []
            try:
                # One routing call per chunk: per-call overhead dominates single prompts.
                decisions = cascade.route_many([record.prompt for _, record in records])
            except (ModelNotAvailable, ModelLoadError):
                # The router's embedder model cannot be loaded: it stops the batch as a ladder
                # model's does (below), not one error record a line for every line to come.
                raise
            except CreError as exc:
                for line, record in records:
                    fail(line, record.id, f"{source}:{line}: {exc}")
                    bar.advance(task)
                decisions = []
            # The prompt before each of its cluster in this chunk, which llama.cpp still holds.
            before = dict(zip((line for line, _ in records), previous_prompts(
                [record.prompt for _, record in records], [d.cluster for d in decisions], chunk=None)))
            for (line, record), decision in zip(records, decisions):
                pending.append(
                    (line, cascade.begin(record.prompt, record.match, record.reference, id=record.id, decision=decision))
                )
            while pending:
                # Lowest rung first: each model's calls stay together, and the prompts that
                # escalate are checked on the next model in one run.
                rung = min(p.rung for _, p in pending)
                cascade.decode_greedy([p for _, p in pending if p.rung == rung])
                still: list[tuple[int, "Pending"]] = []
                for line, p in by_cluster(pending, lambda item: item[1].trace.cluster):
                    if p.rung != rung:
                        still.append((line, p))
                        continue
                    try:
                        final = cascade.advance(p)
                    except (ModelNotAvailable, ModelLoadError):
                        # A file missing, or one llama.cpp refuses: every later line would
                        # fail alike, so the batch stops (it gave each line an error record).
                        raise
                    except CreError as exc:
                        fail(line, p.trace.id, f"{source}:{line}: {exc}")
                        bar.advance(task)
                        continue
                    if final:
                        finish(line, p.trace, p.prompt, before.get(line, ""))
                        bar.advance(task)
                    else:
                        still.append((line, p))
                pending = still


def _speeds_age_hours(cascade: "Cascade") -> float | None:
    """How old the speeds pricing the batch are. Read here, once a batch, rather than by
    every `Pricing`: only the summary needs it."""
    from crecli.models.bench import speeds_age_hours

    return speeds_age_hours(list(cascade.specs.values()), cascade.pricing.unit)

