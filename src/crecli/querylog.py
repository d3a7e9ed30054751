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
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from crecli import grading
from crecli.errors import InputError

FORMATS = ("jsonl", "csv", "text")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


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
    """Names of our fields in the user's log (the CLI's --prompt-field and friends)."""

    prompt: str = "prompt"
    reference: str = "reference"
    match: str = "match"
    id: str = "id"
    labels: str = "labels"

    def names(self) -> set[str]:
        return {self.prompt, self.reference, self.match, self.id, self.labels}


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


class _Bad(Exception):
    """A problem with one line; read_log decides whether it stops the read."""


def read_log(
    path: Path, fmt: str | None = None, fields: FieldMap = FieldMap(), skip_bad: bool = False
) -> LogRead:
    """Read a query log; `fmt` None picks the format from the file's extension."""
    path = Path(path)
    fmt = fmt or _EXTENSIONS.get(path.suffix.lower(), "text")
    if fmt not in FORMATS:
        raise InputError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass a query log file (.jsonl, .csv or .txt)")
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None

    digest = hashlib.sha256()
    records: list[Record] = []
    bad: list[BadLine] = []
    seen: dict[str, str] = {}
    with handle:
        lines = _hashed_lines(handle, digest)
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


def parse_batch_line(raw: bytes, line_no: int, source: str, fields: FieldMap = FieldMap()) -> Record:
    """One line of `cre batch` input: a JSON object with a prompt, or the prompt itself.

    Empty lines are errors, not skipped, because batch writes one output per input line.
    """
    where = f"{source}:{line_no}"
    try:
        text = _decode(raw.rstrip(b"\r\n"))
        if not text.strip():
            raise _Bad("empty line; every input line needs a prompt")
        if text.lstrip().startswith("{"):
            return _record_from_object(_parse_object(text), fields, str(line_no), where)
        return Record(id=str(line_no), prompt=text.strip(), source=where)
    except _Bad as exc:
        raise InputError(f"{where}: {exc}") from None


def _hashed_lines(handle: Any, digest: Any) -> Iterator[tuple[int, bytes]]:
    for line_no, raw in enumerate(handle, start=1):
        digest.update(raw)
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield line_no, raw


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        ) from None


def _text_rows(lines: Iterator[tuple[int, bytes]], path: Path, fields: FieldMap) -> Iterator[_Row]:
    for line_no, raw in lines:
        if not raw.strip():
            continue

        def build(source: str, raw: bytes = raw, line_no: int = line_no) -> Record:
            return Record(id=f"{path.stem}:{line_no}", prompt=_decode(raw).strip(), source=source)

        yield line_no, build


def _jsonl_rows(lines: Iterator[tuple[int, bytes]], path: Path, fields: FieldMap) -> Iterator[_Row]:
    for line_no, raw in lines:
        if not raw.strip():
            continue

        def build(source: str, raw: bytes = raw, line_no: int = line_no) -> Record:
            obj = _parse_object(_decode(raw.rstrip(b"\r\n")))
            return _record_from_object(obj, fields, f"{path.stem}:{line_no}", source)

        yield line_no, build


def _parse_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Bad(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _record_from_object(obj: dict[str, Any], fields: FieldMap, default_id: str, source: str) -> Record:
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
        prompt=_prompt(obj.get(fields.prompt), fields.prompt),
        reference=reference,
        match=_match(obj.get(fields.match), fields.match, reference),
        labels=_labels(obj.get(fields.labels), fields.labels),
        meta=meta,
        source=source,
    )


def _prompt(value: Any, name: str) -> str:
    if value is None:
        raise _Bad(f"missing {name!r} field (name another field with --prompt-field)")
    if not isinstance(value, str):
        raise _Bad(f"{name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _Bad(f"empty {name!r}")
    return value


def _id(value: Any, name: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f"{name!r} must be a string or an integer, got {_json_type(value)}")
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
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(json.dumps(item))
        else:
            raise _Bad(f"{name!r} must be a string, a number or a list of them; found {_json_type(item)}")
    return out


def _match(value: Any, name: str, reference: list[str] | None) -> str | None:
    if value is None:
        match = "exact" if reference is not None else None
    elif not isinstance(value, str) or value.strip().lower() not in grading.MATCH_TYPES:
        raise _Bad(f"{name!r} must be one of {', '.join(grading.MATCH_TYPES)}; got {value!r}")
    else:
        match = value.strip().lower()
    if reference is not None and match is not None:
        for ref in reference:
            problem = grading.reference_problem(ref, match)
            if problem:
                raise _Bad(problem)
    return match


def _labels(value: Any, name: str) -> dict[str, bool]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{name!r} must map model names to true/false, got {_json_type(value)}")
    for model, ok in value.items():
        if not isinstance(ok, bool):
            raise _Bad(f"{name!r} must map model names to true/false; {model!r} has {ok!r}")
    return dict(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _csv_rows(lines: Iterator[tuple[int, bytes]], path: Path, fields: FieldMap) -> Iterator[_Row]:
    # csv needs text; undecodable bytes ride along as surrogates and fail their own row.
    reader = csv.reader(raw.decode("utf-8", errors="surrogateescape") for _, raw in lines)
    header: list[str] | None = None
    start = 1  # first line of the next row; a quoted field may span lines
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader cannot resynchronise after this, so it stops the read.
            raise InputError(f"{path}:{start}: unreadable CSV ({exc}); fix the row") from None
        here, start = start, reader.line_num + 1
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
            "name the prompt column with --prompt-field"
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
        prompt=_prompt(cells[fields.prompt], fields.prompt),
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
    try:
        return json.loads(cell)
    except json.JSONDecodeError as exc:
        raise _Bad(f"{name!r} column is not valid JSON ({exc.msg} at column {exc.colno})") from None
