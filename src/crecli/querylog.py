"""Reading query logs (JSONL, CSV, plain text) into records, with `path:line:` errors.

A log is read line by line (its sha256 taken on the way), so a file of 100k+ queries is
never held in memory as text, only as records. Each bad line either stops the read with
an InputError naming `path:line`, or, with `skip_bad`, is collected in `LogRead.bad` and
left out. A reference that cannot be matched under its match type (a choice reference
with no option letter, a numeric one with no number, a bad regex) is a bad line, so a
broken label fails at its line rather than grading every answer wrong later.

JSONL: one object per line; blank lines are skipped. Fields are named by a `FieldMap`
(`prompt`, `reference`, `match`, `id`, `labels`); the `meta` object's contents and every
other field go to `Record.meta` (a field of the `meta` object wins over a top-level field
of the same name). A reference is a string, a number (kept as its JSON text) or a
non-empty list of those.
CSV: a header row, then one record per row; columns are named by the same `FieldMap`. A
reference cell holds a plain string or, when it reads `[...]`, a JSON list; a labels cell
holds a JSON object. Other columns go to `Record.meta` as strings.
Plain text: one prompt per non-blank line.

Hostile input stays a bad line: a line over `FieldMap.max_line_bytes` (1 MiB by default) is
read in chunks and dropped, never held whole, because parsing and embedding one huge prompt
costs hundreds of times its size in memory; JSON nested too deeply for Python's parser,
integers longer than Python converts, and lone surrogates (a `\\ud800` escape, which no
UTF-8 output can hold) are reported at their line like any other bad JSON (`safejson`
reads every JSON value here). A UTF-8 byte order mark at the start of a file is ignored.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from crecli import grading, safejson
from crecli.errors import InputError
from crecli.safejson import json_type

FORMATS = ("jsonl", "csv", "text")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

# The default cap on one input line (and so on one prompt): far above any real prompt (the
# longest line of the bundled logs is about 530 bytes) and far below what hurts memory.
MAX_LINE_BYTES = 1 << 20
# The most --max-prompt-bytes may raise it to: a router records the cap (`schema` checks it
# against this), so a larger one was refused only when the router was saved, after the fit.
MAX_LINE_CAP = 1 << 40
_BOM = b"\xef\xbb\xbf"
# How a line meant as a JSON object starts: a key's quote, or an empty object.
_MEANT_AS_JSON = re.compile(r'\s*\{\s*["}]')
_CHUNK = 1 << 16  # how much of an over-cap line is in memory at once while it is skipped


@dataclass
class Record:
    id: str
    prompt: str
    reference: list[str] | None = None
    match: str | None = None
    labels: dict[str, bool] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def labelled(self) -> bool:
        return self.reference is not None or bool(self.labels)


@dataclass(frozen=True)
class FieldMap:
    """How to read the user's log: our fields' names in it (the CLI's --prompt-field and
    friends) and the longest line accepted (--max-prompt-bytes)."""

    prompt: str = "prompt"
    reference: str = "reference"
    match: str = "match"
    id: str = "id"
    labels: str = "labels"
    max_line_bytes: int = MAX_LINE_BYTES
    # True where the names come from a router file (`cre calibrate` and `cre eval` read a
    # log as its fit read its own), not from this command's options: a missing prompt field
    # is then no cue for a --prompt-field those commands lack (`rename_hint`). Not part of
    # how the log is read, nor of the router file.
    recorded: bool = field(default=False, compare=False, repr=False)

    def names(self) -> set[str]:
        return {self.prompt, self.reference, self.match, self.id, self.labels}

    def rename_hint(self, what: str = "field") -> str:
        """How to make a log whose prompts are not under `prompt` readable: name the right
        `what` ("field", "column") with the command's --prompt-field, or, where the names
        are the router's, give the log the name the router's fit was given."""
        if self.recorded:
            return (f"this command reads the field names the router was fitted with: name the prompt {what} "
                    f"{self.prompt!r}, as `cre fit` was told")
        return f"name the prompt {what} with --prompt-field"


@dataclass(frozen=True)
class LogOptions:
    """How a log is read: its format (None: by extension), field names and line cap, and
    whether bad lines are skipped. `cre fit` records them in the router, so `cre calibrate`
    and `cre eval` read a log as the fit read it."""

    fmt: str | None = None
    fields: FieldMap = FieldMap()
    skip_bad: bool = False

    def read(self, path: Path) -> "LogRead":
        return read_log(path, fmt=self.fmt, fields=self.fields, skip_bad=self.skip_bad)

    def as_read_at(self, path: Path | None) -> "LogOptions":
        """These options with the format they picked for a log read at `path` made fixed
        (None: by `path`'s extension, `format_for`), so a copy of that log under another name
        (`cre eval --fit-log dev.jsonl.bak`) is read as it was, not as its new name says;
        unchanged where the format is given, or `path` is None."""
        from dataclasses import replace

        return self if self.fmt is not None or path is None else replace(self, fmt=format_for(path))

    def overridden(self, skip_bad: bool | None = None, max_line_bytes: int | None = None) -> "LogOptions":
        """These options with what a command was given instead (`cre calibrate` and `cre
        eval`'s --skip-bad/--no-skip-bad and --max-prompt-bytes); None keeps the fit's."""
        from dataclasses import replace

        out = self if skip_bad is None else replace(self, skip_bad=skip_bad)
        if max_line_bytes is not None:
            out = replace(out, fields=replace(out.fields, max_line_bytes=max_line_bytes))
        return out

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self.fields).items() if k != "recorded"}
        return {"format": self.fmt, "skip_bad": self.skip_bad, "fields": fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LogOptions":
        # Only router files hold these options written out (`cre calibrate`'s record).
        fields = FieldMap(**data.get("fields", {}), recorded=True)
        return cls(fmt=data.get("format"), fields=fields, skip_bad=bool(data.get("skip_bad")))


@dataclass(frozen=True)
class LongLine:
    """A line over the cap, in place of its bytes: they were hashed and dropped unread."""

    size: int  # bytes, without the line ending


@dataclass
class BadLine:
    source: str
    reason: str


@dataclass
class LogRead:
    path: Path
    sha256: str
    records: list[Record]
    bad: list[BadLine]


# (line number, builder): the builder turns the line into a Record given its "path:line",
# raising _Bad, so one loop in read_log handles errors the same way for every format.
_Row = tuple[int, Callable[[str], Record]]
_Lines = Iterator[tuple[int, "bytes | LongLine"]]


class _Bad(Exception):
    """A problem with one line; read_log decides whether it stops the read."""


def read_log(
    path: Path, fmt: str | None = None, fields: FieldMap = FieldMap(), skip_bad: bool = False
) -> LogRead:
    """Read a query log; `fmt` None picks the format from the file's extension."""
    path = Path(path)
    fmt = fmt or format_for(path)
    if fmt not in FORMATS:
        raise InputError(unknown_format(fmt))
    handle = open_named(path, LOG_FILE)

    digest = hashlib.sha256()
    records: list[Record] = []
    bad: list[BadLine] = []
    seen: dict[str, str] = {}
    with handle, _csv_field_limit(fields.max_line_bytes):
        lines = _hashed_lines(handle, digest, fields.max_line_bytes)
        rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "text": _text_rows}[fmt](lines, path, fields)
        for line_no, build in rows:
            source = f"{path}:{line_no}"
            try:
                record = build(source)
                if record.id in seen:
                    raise _Bad(f"duplicate id {record.id!r} (first at {seen[record.id]})")
            except _Bad as exc:
                if not skip_bad:
                    raise InputError(f"{source}: {exc}; fix the line or pass --skip-bad") from None
                bad.append(BadLine(source, str(exc)))
                continue
            seen[record.id] = source
            records.append(record)
    return LogRead(path=path, sha256=digest.hexdigest(), records=records, bad=bad)


def format_for(path: Path) -> str:
    """The format of a log at `path` read without one given: by its extension, else text."""
    return _EXTENSIONS.get(Path(path).suffix.lower(), "text")


def unknown_format(fmt: str) -> str:
    """What is said of a log format that is not one of FORMATS (`--format`, or a router's)."""
    return f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}"


LOG_FILE = "a query log file (.jsonl, .csv or .txt)"  # what a log that cannot be opened should be


def check_log_file(path: Path) -> None:
    """Refuse a log `read_log` could not open, in its words, before the work that comes
    before reading it: `cre eval missing.jsonl` loaded the router, and printed its
    warnings, before it said the log was not there."""
    open_named(path, LOG_FILE).close()


def open_named(path: Path, want: str, pipes: bool = False) -> BinaryIO:
    """`open_input`, with what a user named that cannot be opened said as an InputError that
    names the fix: the one wording of `cre fit`, `cre eval` and `cre batch`."""
    try:
        return open_input(path, want, pipes)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; pass {want}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def open_input(path: Path, want: str, pipes: bool = False) -> BinaryIO:
    """`path` opened for reading, refused (InputError) unless it is a regular file, or with
    `pipes` also a pipe; OSError as `open` raises it.

    A device never ends: `/dev/zero` is one endless line, which the line cap skips a
    chunk at a time forever, and `/dev/urandom` the same. A log is read more than once
    (`cre calibrate` reads the fitted log again and checks its sha256), so it must be a
    file; `cre batch` input may come through a pipe (`<(zcat prompts.gz)`). The check is
    made on the opened file, so the path cannot be swapped between check and read.
    """
    handle = Path(path).open("rb")
    try:
        refuse_endless(handle.fileno(), str(path), want, pipes)
    except InputError:
        handle.close()
        raise
    return handle


def refuse_endless(fd: int, name: str, want: str, pipes: bool = False) -> None:
    """Refuse (InputError, naming the input `name`) reading `fd` unless it is a regular file,
    or with `pipes` also a pipe or a socket, which end when their writer closes them: the
    rule of `open_input`, and of `cre batch -` for stdin (`cre batch - < /dev/zero` read
    until killed). A path cannot be opened as a socket, so that counts for stdin only.
    /dev/null is let through: it ends at once (`cre batch < /dev/null` from cron or
    systemd is an empty input, warned about as one)."""
    import stat

    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISREG(mode) or (pipes and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))):
        return
    if stat.S_ISCHR(mode) and _is_devnull(st):
        return
    kind = "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    fix = "save it to a file first" if stat.S_ISFIFO(mode) else f"pass {want}"
    raise InputError(f"{name}: is {kind}, not a regular file, so reading it might never end; {fix}")


def _is_devnull(st: os.stat_result) -> bool:
    """Whether `st` is the null device's (the same device number as `os.devnull`)."""
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return st.st_rdev == null.st_rdev


@contextmanager
def _csv_field_limit(cap: int) -> Iterator[None]:
    # The csv module's own field limit (128 KiB by default) would stop the read at a prompt
    # the cap allows; it is process-wide, so it is put back when the read ends.
    saved = csv.field_size_limit(cap)
    try:
        yield
    finally:
        csv.field_size_limit(saved)


def parse_batch_line(
    raw: "bytes | LongLine", line_no: int, source: str, fields: FieldMap = FieldMap()
) -> Record:
    """One line of `cre batch` input: a JSON object with a prompt, or the prompt itself.

    Empty lines are errors, not skipped, because batch writes one output per input line.
    `raw` is a line as `read_lines` gives it (or any bytes: the cap is checked here too).
    """
    where = f"{source}:{line_no}"
    try:
        if isinstance(raw, LongLine):
            raise _Bad(_too_long(raw.size, fields.max_line_bytes))
        body = raw.rstrip(b"\r\n")
        # Any line's, not only the first: `cat a.jsonl b.jsonl | cre batch` keeps b's.
        body = body.removeprefix(_BOM)
        if len(body) > fields.max_line_bytes:
            raise _Bad(_too_long(len(body), fields.max_line_bytes))
        text = _decode(body)
        if text.lstrip().startswith("{"):
            try:
                obj = _object_line(text)
            except _Bad as exc:
                if _MEANT_AS_JSON.match(text):
                    raise
                # A plain prompt that opens with a brace ("{2,3} has how many elements?"):
                # say why it was read as JSON, and how to give it.
                raise _Bad(f"{exc}. A line that starts with '{{' is read as a JSON object; give a prompt "
                           'that opens with a brace as JSONL: {"prompt": "{x} ..."}') from None
            # No `match` of its own: the prompt's cluster decides how it is answered and graded,
            # so a line answers the same with a reference as without one.
            return _record_from_object(obj, fields, str(line_no), where, default_match=None)
        text = _text_line(text)
        if not text.strip():
            raise _Bad("empty line; every input line needs a prompt")
        return Record(id=str(line_no), prompt=text.strip(), source=where)
    except _Bad as exc:
        raise InputError(f"{where}: {exc}") from None


def read_lines(handle: BinaryIO, cap: int = MAX_LINE_BYTES, digest: Any = None) -> Iterator["bytes | LongLine"]:
    """The lines of a binary stream, each with its line ending, or a LongLine for a line over
    `cap` bytes (not counting the ending, or a byte order mark that starts it: a file's first
    line, and in files joined with `cat`, each file's).

    A line is only read whole when it fits: readline(limit) stops at the limit, and the rest
    of a longer line is read a chunk at a time (into `digest`, when given) and dropped, so a
    50 MB line costs a chunk of memory, not 50 MB and the str and JSON built from it.
    """
    limit = cap + len(_BOM) + 2  # room for a BOM and "\r\n" on a line of exactly `cap`
    while True:
        raw = handle.readline(limit)
        if not raw:
            return
        if digest is not None:
            digest.update(raw)
        if raw.endswith(b"\n") or len(raw) < limit:
            size = len(raw.rstrip(b"\r\n")) - (len(_BOM) if raw.startswith(_BOM) else 0)
            yield raw if size <= cap else LongLine(size)
            continue
        size, tail = len(raw), raw[-2:]
        while not tail.endswith(b"\n"):
            chunk = handle.readline(_CHUNK)
            if not chunk:
                break
            if digest is not None:
                digest.update(chunk)
            size += len(chunk)
            tail = (tail + chunk)[-2:]
        ending = len(tail) - len(tail.rstrip(b"\r\n")) if tail.endswith(b"\n") else 0
        yield LongLine(size - ending)


def _hashed_lines(handle: BinaryIO, digest: Any, cap: int) -> _Lines:
    for line_no, raw in enumerate(read_lines(handle, cap, digest), start=1):
        if isinstance(raw, bytes):
            raw = raw.removeprefix(_BOM)  # any line's: files joined with `cat` keep theirs
        yield line_no, raw


def _too_long(size: int, cap: int) -> str:
    return f"line is {size:,} bytes, over the {_size_text(cap)} cap; raise it with --max-prompt-bytes"


def _size_text(n: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n:,}-byte"


# A lone carriage return is no line break to readline: a file with old Mac line endings
# reads as one line, and as a plain-text prompt it would run every question together.
_LONE_CR = ("a lone \"\\r\" is not a line break here (old Mac line endings?); convert the file with: "
            "tr '\\r' '\\n' < FILE > NEW")


def _text_line(text: str) -> str:
    """A plain-text line's prompt text (decoded, its ending already cut); a carriage return
    left inside is refused (`_LONE_CR`)."""
    if "\r" in text:
        raise _Bad(f"a carriage return inside the line: {_LONE_CR}")
    return text


def _object_line(text: str) -> dict[str, Any]:
    """A JSON line's object (decoded, its ending already cut). A carriage return between
    JSON tokens is whitespace, so the parser decides; where it fails, one inside says what
    it may be."""
    try:
        return _parse_object(text)
    except _Bad as exc:
        if "\r" in text:
            raise _Bad(f"{exc}; the line holds a carriage return: {_LONE_CR}") from None
        opening = text.strip()
        if opening == "[" or (opening.startswith("[") and opening[1:].lstrip().startswith("{")):
            # A .json file is most often one array, pretty-printed or not; --skip-bad, the
            # advice the reader adds, only led to "0 usable queries".
            raise _Bad(f"{exc}; the file looks like one JSON array, not JSON Lines (one object a line): "
                       "convert it with jq -c '.[]' FILE > FILE.jsonl") from None
        raise


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        ) from None


def _blank(raw: bytes) -> bool:
    """A line of whitespace only, Unicode's included (a no-break space would otherwise be a
    plain-text prompt that strips to nothing). Decoded only when it starts past ASCII."""
    text = raw.strip()
    if not text:
        return True
    if text[:1] < b"\x80":
        return False
    try:
        return not text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False  # a bad line, reported as one


def _line_rows(lines: _Lines, path: Path, fields: FieldMap,
               parse: Callable[[bytes, str, str], Record]) -> Iterator[_Row]:
    """A row per non-blank line, built by `parse(raw, record id, source)`; a line over the
    cap is a bad line, never read whole."""
    for line_no, raw in lines:
        if isinstance(raw, bytes) and _blank(raw):
            continue

        def build(source: str, raw: bytes | LongLine = raw, line_no: int = line_no) -> Record:
            if isinstance(raw, LongLine):
                raise _Bad(_too_long(raw.size, fields.max_line_bytes))
            return parse(raw, f"{path.stem}:{line_no}", source)

        yield line_no, build


def _text_rows(lines: _Lines, path: Path, fields: FieldMap) -> Iterator[_Row]:
    return _line_rows(lines, path, fields,
                      lambda raw, rid, source: Record(id=rid, prompt=_text_line(_decode(raw.rstrip(b"\r\n"))).strip(), source=source))


def _jsonl_rows(lines: _Lines, path: Path, fields: FieldMap) -> Iterator[_Row]:
    return _line_rows(lines, path, fields, lambda raw, rid, source: _record_from_object(
        _object_line(_decode(raw.rstrip(b"\r\n"))), fields, rid, source))


def _parse_object(text: str) -> dict[str, Any]:
    obj = _loads(text, "invalid JSON")
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {json_type(obj)}")
    return obj


def _loads(text: str, what: str) -> Any:
    """`safejson.loads`, its every failure a bad line."""
    try:
        return safejson.loads(text, what)
    except safejson.JsonError as exc:
        raise _Bad(str(exc)) from None


def _record_from_object(obj: dict[str, Any], fields: FieldMap, default_id: str, source: str,
                        default_match: str | None = "exact") -> Record:
    """A record from a JSON object; a reference without a `match` gets `default_match` (a
    query log's rule is exact text; `cre batch` leaves it to the prompt's cluster)."""
    meta: dict[str, Any] = {k: v for k, v in obj.items() if k not in fields.names() and k != "meta"}
    if "meta" in obj and "meta" not in fields.names():
        inner = obj["meta"]
        if isinstance(inner, dict):
            meta.update(inner)
        else:
            meta["meta"] = inner
    reference = _reference(obj.get(fields.reference), fields.reference)
    return Record(
        id=_id(obj.get(fields.id), fields.id, default_id),
        prompt=_prompt(obj.get(fields.prompt), fields),
        reference=reference,
        match=_match(obj.get(fields.match), fields.match, reference, default_match),
        labels=_labels(obj.get(fields.labels), fields.labels),
        meta=meta,
        source=source,
    )


def _prompt(value: Any, fields: FieldMap) -> str:
    name = fields.prompt
    if value is None:
        raise _Bad(f"missing {name!r} field ({fields.rename_hint()})")
    if not isinstance(value, str):
        raise _Bad(f"{name!r} must be a string, got {json_type(value)}")
    if not value.strip():
        raise _Bad(f"empty {name!r}")
    return value


def _id(value: Any, name: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f"{name!r} must be a string or an integer, got {json_type(value)}")
    text = str(value)
    if not text.strip():
        raise _Bad(f"empty {name!r}")
    return text


def _reference(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _Bad(f"{name!r} is an empty list; give at least one accepted answer or leave it out")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        elif isinstance(item, float):
            # Written out, not in Python's exponent form: 0.00001 is "1e-05", which reads as 1.
            if not math.isfinite(item):
                raise _Bad(f"{name!r} holds {item!r}, which is no answer; give a finite number")
            out.append(format(Decimal(repr(item)), "f"))
        else:
            raise _Bad(f"{name!r} must be a string, a number or a list of them; found {json_type(item)}")
    return out


def _match(value: Any, name: str, reference: list[str] | None, default: str | None = "exact") -> str | None:
    if value is None:
        match = default if reference is not None else None
    elif (match := grading.match_type(value)) is None:
        raise _Bad(f"{name!r} must be one of {', '.join(grading.MATCH_TYPES)}; got {value!r}")
    if reference is not None:
        # A reference left to the cluster's answer type (`default` None) is still checked
        # here, as exact text, the type it falls back to (`live.grading_match`): a reference
        # nothing can match is a bad line before any model runs, as it was.
        for ref in reference:
            problem = grading.reference_problem(ref, match or "exact")
            if problem:
                raise _Bad(problem)
    return match


def _labels(value: Any, name: str) -> dict[str, bool]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{name!r} must map model names to true/false, got {json_type(value)}")
    for model, ok in value.items():
        if not isinstance(ok, bool):
            raise _Bad(f"{name!r} must map model names to true/false; {model!r} has {ok!r}")
    return dict(value)




def _csv_rows(lines: _Lines, path: Path, fields: FieldMap) -> Iterator[_Row]:
    long_lines: dict[int, int] = {}  # line number: size, of lines over the cap

    def texts() -> Iterator[str]:
        for line_no, raw in lines:
            if isinstance(raw, LongLine):
                # A blank line in its place keeps the reader's line count; its row is bad.
                long_lines[line_no] = raw.size
                yield "\n"
            else:
                # csv needs text; undecodable bytes ride along as surrogates and fail their own row.
                yield raw.decode("utf-8", errors="surrogateescape")

    reader = csv.reader(texts())
    header: list[str] | None = None
    start = 1  # first line of the next row; a quoted field may span lines
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader cannot resynchronise after this, so it stops the read.
            if "field limit" in str(exc):
                raise InputError(
                    f"{path}:{start}: a field is over the {_size_text(fields.max_line_bytes)} cap; "
                    "raise it with --max-prompt-bytes"
                ) from None
            raise InputError(f"{path}:{start}: unreadable CSV ({exc}); fix the row") from None
        here, start = start, reader.line_num + 1
        too_long = [long_lines.pop(n) for n in sorted(long_lines) if n <= reader.line_num]
        if too_long:
            reason = _too_long(too_long[0], fields.max_line_bytes)
            if header is None:
                raise InputError(f"{path}:{here}: header {reason}")

            def bad(source: str, reason: str = reason) -> Record:
                raise _Bad(reason)

            yield here, bad
            continue
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [name.strip() for name in row]
            _check_header(header, f"{path}:{here}", fields)
            continue

        def build(source: str, row: list[str] = row, here: int = here, names: list[str] = header) -> Record:
            return _record_from_row(row, names, fields, f"{path.stem}:{here}", source)

        yield here, build


def _check_header(header: list[str], where: str, fields: FieldMap) -> None:
    try:
        _check_utf8(header)
    except _Bad as exc:
        raise InputError(f"{where}: header is {exc}") from None
    if fields.prompt not in header:
        raise InputError(
            f"{where}: no {fields.prompt!r} column in the header (columns: {', '.join(header)}); "
            f"{fields.rename_hint('column')}"
        )
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise InputError(f"{where}: column {duplicates[0]!r} appears twice in the header; rename one")


def _record_from_row(
    row: list[str], header: list[str], fields: FieldMap, default_id: str, source: str
) -> Record:
    if len(row) != len(header):
        raise _Bad(
            f"row has {len(row)} fields but the header has {len(header)}; "
            "quote fields that hold commas and close every quote"
        )
    _check_utf8(row)
    cells = dict(zip(header, row))
    reference_cell = cells.get(fields.reference, "").strip()
    reference = None
    if reference_cell:
        reference = _reference(_csv_reference(reference_cell, fields.reference), fields.reference)
    labels_cell = cells.get(fields.labels, "").strip()
    return Record(
        # An empty id cell is CSV's way of leaving the id out.
        id=_id(cells.get(fields.id, "").strip() or None, fields.id, default_id),
        prompt=_prompt(cells[fields.prompt], fields),
        reference=reference,
        match=_match(cells.get(fields.match, "").strip() or None, fields.match, reference),
        labels=_labels(_csv_json(labels_cell, fields.labels), fields.labels) if labels_cell else {},
        meta={k: v for k, v in cells.items() if k not in fields.names()},
        source=source,
    )


def _check_utf8(cells: list[str]) -> None:
    # Lone surrogates (from surrogateescape) are the only thing strict UTF-8 cannot encode.
    text = "\x00".join(cells)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00
        raise _Bad(f"not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8") from None


def _csv_reference(cell: str, name: str) -> Any:
    if cell.startswith("[") and cell.endswith("]"):
        return _csv_json(cell, name)
    return cell


def _csv_json(cell: str, name: str) -> Any:
    return _loads(cell, f"{name!r} column is not valid JSON")
