"""Hostile input (issue 8): no line ends in a traceback, a hang or lost data.

`cre batch` keeps N lines in, N lines out, in order, with an error record for each bad
line and exit code 3; the log readers turn every bad line into `file:line: reason` (or a
counted skip with --skip-bad). The cases: lone surrogates, JSON nested 100k deep, integers
past Python's digit limit, a byte order mark on line 1, huge lines, Rich markup in user
text, and --memory-budget values that are not sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config
from crecli.batch import Answered, parse_size, read_done_ids, run_batch
from crecli.cli import app
from crecli.errors import InputError, UsageError
from crecli.escalate import Cascade
from crecli.models.fake import FakeBackend
from crecli.querylog import MAX_LINE_BYTES, FieldMap, LongLine, Record, parse_batch_line, read_lines, read_log
from support.ladder import install
from support.prompts import ADD, PERU, jl
from support.routers import FAR

TABLE = {"small": {ADD: ["12"] * 5}, "medium": {PERU: ["Lima"] * 5}, "large": {FAR: ["?"] * 5}}
BOM = b"\xef\xbb\xbf"
DEEP = b"[" * 100_000 + b"]" * 100_000
DIGITS = b"1" * 5000
CAP = 256 << 10  # a --max-prompt-bytes under the default, above the 200 kB DEEP lines


# (input line, substring of its error) for every hostile batch line; None: answered.
BATCH_LINES: list[tuple[bytes, str | None]] = [
    (jl(id="a1", prompt=ADD, reference=["12"], match="numeric"), None),
    (b'{"id":"\\ud800", "prompt": "hi"}\n', "lone surrogate \\ud800 in 'id'"),
    (b'{"id":"s2", "prompt": "hi \\udc00 there"}\n', "lone surrogate \\udc00 in 'prompt'"),
    (b'{"id":"s3", "prompt": "hi", "reference": ["\\udbff"]}\n', "lone surrogate \\udbff in 'reference'"),
    (b'{"id":"deep", "prompt": "hi", "x": ' + DEEP + b"}\n", "nested too deeply"),
    (b'{"id": ' + DIGITS + b', "prompt": "hi"}\n', "longer than 4,300 digits"),
    (b'{"id":"n", "prompt": "hi", "n": ' + DIGITS + b"}\n", "longer than 4,300 digits"),
    (jl(id="huge", prompt="x" * (3 * CAP)), f"over the {CAP // 1024} KiB cap; raise it with --max-prompt-bytes"),
    (b"y" * (CAP + 1) + b"\r\n", f"line is {CAP + 1:,} bytes"),
    ((PERU + "\n").encode(), None),
    # Rich markup in user text is data, never markup: not in stdout, not in the summary.
    (jl(id="[/]", prompt="[bold red]zzqx[/] [/]"), None),
    (jl(id="[red]", prompt=ADD), None),
]


def _batch(args: list[str], models_toml: Path, input: bytes | None = None) -> Any:
    return CliRunner().invoke(app, ["batch", *args, "--models", str(models_toml)], input=input)


def _rows(result: Any) -> list[dict[str, Any]]:
    """The output lines; each must be strict UTF-8 and JSON on its own."""
    text = result.stdout_bytes.decode("utf-8")  # raises on a lone surrogate written as UTF-8
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _no_traceback(result: Any) -> None:
    # CliRunner keeps an escaped exception instead of printing it; only exits are allowed.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def _check_batch(result: Any, lines: list[tuple[bytes, str | None]], where: str) -> list[dict[str, Any]]:
    _no_traceback(result)
    assert result.exit_code == 3, result.output
    rows = _rows(result)
    assert len(rows) == len(lines)
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    for n, (row, (_, reason)) in enumerate(zip(rows, lines), start=1):
        if reason is None:
            assert "error" not in row and row["answer"], row
        else:
            assert row["error"].startswith(f"{where}:{n}: ") and reason in row["error"], row
    return rows


# ---------------------------------------------------------------- cre batch


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_batch_gives_every_hostile_line_its_own_record(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path,
    tmp_path: Path, via: str,
) -> None:
    install(fake_backends, TABLE)
    data = b"".join(line for line, _ in BATCH_LINES)
    args = ["--router", str(saved_router), "--max-prompt-bytes", str(CAP)]
    if via == "file":
        infile = tmp_path / "in.jsonl"
        infile.write_bytes(data)
        result = _batch([str(infile), *args], tiny_models_toml)
        where = str(infile)
    else:
        result = _batch(args, tiny_models_toml, data)
        where = "<stdin>"

    rows = _check_batch(result, BATCH_LINES, where)
    assert [r["id"] for r in rows] == [
        "a1", None, "s2", "s3", None, None, None, None, None, "10", "[/]", "[red]",
    ]
    assert rows[0]["correct"] is True and rows[9]["answer"] == "Lima" and rows[11]["answer"] == "12"
    assert rows[10]["model"] == "large"
    assert "12 lines: 4 answered, 8 errors" in result.stderr


def test_batch_strips_a_bom_so_line_1_keeps_its_id_and_reference(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path,
    tmp_path: Path,
) -> None:
    install(fake_backends, TABLE)
    data = BOM + jl(id="first", prompt=ADD, reference="12", match="numeric") + jl(id="second", prompt=PERU)
    infile = tmp_path / "bom.jsonl"
    infile.write_bytes(data)
    for result in (
        _batch([str(infile), "--router", str(saved_router)], tiny_models_toml),
        _batch(["--router", str(saved_router)], tiny_models_toml, data),
    ):
        _no_traceback(result)
        assert result.exit_code == 0, result.output
        rows = _rows(result)
        assert [(r["id"], r["answer"]) for r in rows] == [("first", "12"), ("second", "Lima")]
        assert rows[0]["correct"] is True


def test_batch_bom_alone_on_a_plain_text_line(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    install(fake_backends, TABLE)
    out = io.StringIO()
    run_batch([BOM + (ADD + "\n").encode(), BOM + b"\n"], out, cascade, source="in")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0]["answer"] == "12" and rows[0]["trace"]["id"] == "1"
    # Only line 1's BOM is a byte order mark; later ones are text (here: an invisible prompt).
    assert len(rows) == 2


def test_batch_output_is_valid_utf8_even_when_an_answer_is_not(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    fake_backends({m: (lambda text, params: "bad \ud800 answer") for m in ("small", "medium", "large")})
    out = io.StringIO()
    summary = run_batch([jl(id="q", prompt=ADD)], out, cascade, source="in")
    row = json.loads(out.getvalue().encode("utf-8").decode("utf-8"))
    assert row["id"] == "q" and "\ud800" not in out.getvalue() and summary.answered == 1


def test_batch_over_cap_line_from_a_stream_is_never_read_whole(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    install(fake_backends, TABLE)
    huge = b'{"id": "big", "prompt": "' + b"a" * (20 << 20) + b'"}\n'
    stream = io.BytesIO(jl(id="before", prompt=ADD) + huge + jl(id="after", prompt=PERU))
    out = io.StringIO()
    tracemalloc.start()
    try:
        summary = run_batch(stream, out, cascade, source="in")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("answer") for r in rows] == ["12", None, "Lima"]
    assert rows[1]["error"] == (
        f"in:2: line is {len(huge) - 1:,} bytes, over the 1 MiB cap; raise it with --max-prompt-bytes"
    )
    assert summary.errors == 1
    assert peak < 8 << 20, f"peak {peak:,} bytes for a 20 MiB line"


def test_batch_line_cap_applies_to_lines_given_as_bytes(cascade: Cascade) -> None:
    out = io.StringIO()
    summary = run_batch([b"z" * 11 + b"\n"], out, cascade, source="in", fields=FieldMap(max_line_bytes=10))
    assert json.loads(out.getvalue()) == {
        "line": 1, "id": None, "error": "in:1: line is 11 bytes, over the 10-byte cap; raise it with --max-prompt-bytes",
    }
    assert summary.errors == 1


def test_parse_batch_line_refuses_each_hostile_line() -> None:
    for n, (raw, reason) in enumerate(BATCH_LINES, start=1):
        if reason is None:
            assert isinstance(parse_batch_line(raw, n, "in", FieldMap(max_line_bytes=CAP)), Record)
        else:
            with pytest.raises(InputError, match=rf"^in:{n}: "):
                parse_batch_line(raw, n, "in", FieldMap(max_line_bytes=CAP))
    with pytest.raises(InputError, match=r"^in:3: line is 50,000,000 bytes, over the 1 MiB cap"):
        parse_batch_line(LongLine(50_000_000), 3, "in")


def test_resume_file_with_hostile_lines_is_read(tmp_path: Path) -> None:
    earlier = tmp_path / "out.jsonl"
    earlier.write_bytes(
        b'{"id": "ok", "answer": "1"}\n' + b'{"id": "d", "answer": ' + DEEP + b"}\n"
        + b'{"id": ' + DIGITS + b', "answer": "2"}\n'
    )
    assert read_done_ids(earlier) == {"ok": Answered(prompts={None})}


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "infinity", "1e999", "1e999GB", "-1", "-2GB", "0.5", "0", "", "GB", "lots", "4TB", "1..5G"])
def test_memory_budget_that_is_not_a_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="^--memory-budget"):
        parse_size(text)


def test_memory_budget_inf_is_one_error_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crecli", "batch", "--memory-budget", "inf"],
        capture_output=True, text=True, input="", timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: --memory-budget 'inf': give a finite size")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_max_prompt_bytes_must_be_positive(tiny_models_toml: Path) -> None:
    result = _batch(["--max-prompt-bytes", "0"], tiny_models_toml, b"")
    assert result.exit_code == 2 and "--max-prompt-bytes" in result.output


# ---------------------------------------------------------------- log readers


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GOOD = jl(id="g1", prompt="What is 1 plus 1?", reference="2", match="numeric")
JSONL_BAD: list[tuple[str, bytes, str]] = [
    ("surrogate id", b'{"id": "\\ud800", "prompt": "hi"}\n', "lone surrogate \\ud800 in 'id' is not valid Unicode"),
    ("surrogate prompt", b'{"prompt": "hi \\udfff"}\n', "lone surrogate \\udfff in 'prompt'"),
    ("surrogate key", b'{"prompt": "hi", "\\ud800": 1}\n', "lone surrogate \\ud800"),
    ("surrogate in labels", b'{"prompt": "hi", "labels": {"\\udc80": true}}\n', "lone surrogate \\udc80 in 'labels'"),
    ("surrogate in meta", b'{"prompt": "hi", "meta": {"a": ["\\ud800"]}}\n', "lone surrogate \\ud800 in 'meta'"),
    ("deep", b'{"prompt": "hi", "x": ' + DEEP + b"}\n", "invalid JSON (nested too deeply to read)"),
    ("deep, not an object", DEEP + b"\n", "nested too deeply"),
    ("digits", b'{"prompt": "hi", "id": ' + DIGITS + b"}\n", "a number longer than 4,300 digits"),
    ("over the cap", jl(prompt="p" * CAP), f"bytes, over the {CAP // 1024} KiB cap; raise it with --max-prompt-bytes"),
    ("markup", jl(prompt="hi", match="[/]"), "got '[/]'"),
]


@pytest.mark.parametrize(("case", "line", "reason"), JSONL_BAD, ids=[c for c, _, _ in JSONL_BAD])
def test_jsonl_hostile_line_is_a_file_line_error_or_a_counted_skip(
    tmp_path: Path, case: str, line: bytes, reason: str
) -> None:
    path = write(tmp_path / "log.jsonl", GOOD + line + jl(id="g3", prompt="What is 2 plus 2?"))
    fields = FieldMap(max_line_bytes=CAP)
    with pytest.raises(InputError) as caught:
        read_log(path, fields=fields)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and reason in message and message.endswith("pass --skip-bad")

    log = read_log(path, fields=fields, skip_bad=True)
    assert [r.id for r in log.records] == ["g1", "g3"]
    assert [b.source for b in log.bad] == [f"{path}:2"] and reason in log.bad[0].reason
    assert log.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_huge_jsonl_line_is_skipped_in_chunks_and_still_hashed(tmp_path: Path) -> None:
    huge = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'
    path = write(tmp_path / "log.jsonl", GOOD + huge + b"\r\n" + GOOD.replace(b"g1", b"g3"))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=rf"^{path}:2: line is {len(huge):,} bytes, over the 1 MiB cap; raise it with --max-prompt-bytes"):
            read_log(path)
        log = read_log(path, skip_bad=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.id for r in log.records] == ["g1", "g3"] and len(log.bad) == 1
    assert log.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 8 << 20, f"peak {peak:,} bytes for a 50 MiB line"


def test_max_line_bytes_can_be_raised(tmp_path: Path) -> None:
    prompt = "p" * (2 << 20)
    path = write(tmp_path / "log.jsonl", jl(prompt=prompt))
    with pytest.raises(InputError, match="over the 1 MiB cap"):
        read_log(path)
    assert read_log(path, fields=FieldMap(max_line_bytes=4 << 20)).records[0].prompt == prompt


def test_text_log_over_cap_line(tmp_path: Path) -> None:
    path = write(tmp_path / "log.txt", b"first\n" + b"x" * (CAP + 1) + b"\nthird\n")
    with pytest.raises(InputError, match=rf"^{path}:2: line is {CAP + 1:,} bytes"):
        read_log(path, fields=FieldMap(max_line_bytes=CAP))
    log = read_log(path, fields=FieldMap(max_line_bytes=CAP), skip_bad=True)
    assert [r.prompt for r in log.records] == ["first", "third"] and [b.source for b in log.bad] == [f"{path}:2"]


CSV_BAD: list[tuple[str, bytes, str]] = [
    ("surrogate in labels", b'x2,hi,,"{""\\ud800"": true}"\n', "lone surrogate \\ud800"),
    ("surrogate in reference list", b'x2,hi,"[""\\udc00""]",\n', "lone surrogate \\udc00"),
    ("deep reference list", b'x2,hi,"' + DEEP + b'",\n', "'reference' column is not valid JSON (nested too deeply"),
    ("digits in labels", b'x2,hi,,"{""m"": ' + DIGITS + b'}"\n', "a number longer than 4,300 digits"),
    ("over the cap", b"x2," + b"p" * CAP + b",,\n", f"over the {CAP // 1024} KiB cap"),
]


@pytest.mark.parametrize(("case", "row", "reason"), CSV_BAD, ids=[c for c, _, _ in CSV_BAD])
def test_csv_hostile_row_is_a_file_line_error_or_a_counted_skip(
    tmp_path: Path, case: str, row: bytes, reason: str
) -> None:
    path = write(tmp_path / "log.csv", b"id,prompt,reference,labels\nx1,hello,,\n" + row + b'x3,"two\nlines",,\n')
    fields = FieldMap(max_line_bytes=CAP)
    with pytest.raises(InputError) as caught:
        read_log(path, fields=fields)
    assert str(caught.value).startswith(f"{path}:3: ") and reason in str(caught.value)
    log = read_log(path, fields=fields, skip_bad=True)
    assert [r.id for r in log.records] == ["x1", "x3"] and log.records[1].prompt == "two\nlines"
    assert [b.source for b in log.bad] == [f"{path}:3"]


def test_csv_over_cap_line_inside_a_quoted_field_fails_its_row(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", b'id,prompt\n1,"start\n' + b"q" * (CAP + 5) + b'\nend"\n2,fine\n')
    log = read_log(path, fields=FieldMap(max_line_bytes=CAP), skip_bad=True)
    assert [r.id for r in log.records] == ["2"]
    assert [b.source for b in log.bad] == [f"{path}:2"] and f"line is {CAP + 5:,} bytes" in log.bad[0].reason


def test_csv_field_over_the_cap_across_lines_stops_with_the_cap_named(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", b'id,prompt\n1,"' + b"q\n" * CAP + b'"\n')
    with pytest.raises(InputError, match=rf"^{path}:2: a field is over the {CAP // 1024} KiB cap; raise it with --max-prompt-bytes"):
        read_log(path, fields=FieldMap(max_line_bytes=CAP))


def test_csv_prompts_up_to_the_cap_are_read(tmp_path: Path) -> None:
    # The csv module's own field limit is 128 KiB; the cap is the only limit.
    prompt = "w" * (512 << 10)
    path = write(tmp_path / "log.csv", f"id,prompt\n1,{prompt}\n".encode())
    assert read_log(path).records[0].prompt == prompt


def test_csv_header_over_the_cap_stops_the_read(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", b"prompt," + b"c" * CAP + b"\nhi,there\n")
    with pytest.raises(InputError, match=rf"^{path}:1: header line is"):
        read_log(path, fields=FieldMap(max_line_bytes=CAP), skip_bad=True)


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("log.jsonl", BOM + jl(id="first", prompt="hi", reference="2", match="numeric"), ("first", "hi", ["2"])),
        ("log.csv", BOM + b"id,prompt,reference\nfirst,hi,2\n", ("first", "hi", ["2"])),
        ("log.txt", BOM + b"hi\n", ("log:1", "hi", None)),
    ],
)
def test_bom_on_line_1_is_ignored_by_every_reader(tmp_path: Path, name: str, data: bytes, expected: tuple) -> None:
    path = write(tmp_path / name, data)
    log = read_log(path)
    record = log.records[0]
    assert (record.id, record.prompt, record.reference) == expected
    assert log.sha256 == hashlib.sha256(data).hexdigest()


def test_fit_reports_a_skipped_line_holding_markup(
    tmp_path: Path, tiny_models_toml: Path, four_fakes: dict[str, FakeBackend], capsys: pytest.CaptureFixture[str]
) -> None:
    from crecli.costs import Budget
    from crecli.fit import FitOptions, fit

    # Line 2 is bad (an unknown match rule) and spells Rich markup; 13 good lines to cluster.
    sums = b"".join(jl(id=f"q{i}", prompt=f"What is {i} plus {i}?", reference=str(2 * i), match="numeric")
                    for i in range(12))
    path = write(tmp_path / "log.jsonl", GOOD + jl(id="[/]", prompt="hi", match="[/]") + sums)
    options = FitOptions(skip_bad=True, store=tmp_path / "outcomes.sqlite")
    capsys.readouterr()
    report = fit(path, tmp_path / "router.cre", config.load(tiny_models_toml), Budget("retain", 0.98), options)
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("Skipped ")]
    # One line, with the file's line number and the markup as it was written, not read as tags.
    assert skipped == [f"Skipped 1 bad line(s), first: {path}:2: 'match' must be one of exact, numeric, "
                       "choice, contains, regex; got '[/]'"], err
    assert report.n_bad == 1 and (tmp_path / "router.cre").exists()


def test_fit_option_max_prompt_bytes_reaches_the_reader(tmp_path: Path, tiny_models_toml: Path) -> None:
    line = jl(prompt="p" * 200)
    path = write(tmp_path / "log.jsonl", GOOD + line)
    result = CliRunner().invoke(
        app, ["fit", str(path), "-o", str(tmp_path / "r.cre"), "--models", str(tiny_models_toml),
              "--store", str(tmp_path / "o.sqlite"), "--max-prompt-bytes", "100"],
    )
    assert isinstance(result.exception, InputError), result.output
    assert str(result.exception).startswith(f"{path}:2: line is {len(line) - 1} bytes, over the 100-byte cap")


# ---------------------------------------------------------------- read_lines


def test_read_lines_cap_boundaries() -> None:
    cap = 10
    data = BOM + b"a" * cap + b"\r\n" + b"b" * (cap + 1) + b"\n" + b"c" * cap + b"\n" + b"d" * (cap + 100) + b"\r\n" + b"e" * (cap + 1)
    lines = list(read_lines(io.BytesIO(data), cap))
    assert lines == [BOM + b"a" * cap + b"\r\n", LongLine(cap + 1), b"c" * cap + b"\n", LongLine(cap + 100), LongLine(cap + 1)]
    # A BOM that starts a later line (files joined with `cat`) is allowed for too, as it is
    # dropped there; one anywhere else in a line counts.
    assert list(read_lines(io.BytesIO(b"x\n" + BOM + b"a" * cap + b"\n"), cap)) == [b"x\n", BOM + b"a" * cap + b"\n"]
    assert list(read_lines(io.BytesIO(b"x\n" + b"a" + BOM + b"a" * (cap - 1) + b"\n"), cap)) == [b"x\n", LongLine(cap + 3)]
    assert list(read_lines(io.BytesIO(b""), cap)) == []


def test_read_lines_hashes_everything_it_drops() -> None:
    data = b"short\n" + b"L" * 300_000 + b"\nlast"
    digest = hashlib.sha256()
    lines = list(read_lines(io.BytesIO(data), 100, digest))
    assert lines == [b"short\n", LongLine(300_000), b"last"]
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_default_cap_is_far_above_the_real_logs() -> None:
    data = Path(__file__).resolve().parents[1] / "examples"
    longest = max(len(line) for f in data.glob("*.jsonl") for line in f.read_bytes().splitlines())
    assert longest * 100 < MAX_LINE_BYTES


# ---------------------------------------------------------------- fuzzing


HOSTILE_PIECES = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\u0000",
    DIGITS[:4301], b"1e999", b"NaN", b"-", b".", b"\xef\xbb\xbf", b"\xff", b"\xed\xa0\x80", b"\r", b"\n",
    b"\r\n", b"\x00", b"prompt", b"id", b"reference", b"match", b"labels", b"meta", b"true", b"null",
    b"numeric", b"choice", b"regex", b"(", b"[/]", b"[bold]", b" ", b"\t", b"a", "é".encode(),
    b'{"prompt": "', b'{"id": ', b'"reference": [', b"[" * 3000,
]


def _fuzz_bytes() -> Any:
    st = pytest.importorskip("hypothesis.strategies")
    return st.one_of(
        st.binary(max_size=400),
        st.lists(st.sampled_from(HOSTILE_PIECES), max_size=60).map(b"".join),
    )


@pytest.mark.parametrize("name", ["log.jsonl", "log.csv", "log.txt"])
def test_fuzz_readers_give_records_or_input_errors(tmp_path: Path, name: str) -> None:
    hypothesis = pytest.importorskip("hypothesis")

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(_fuzz_bytes(), _fuzz_bytes())
    def check(head: bytes, tail: bytes) -> None:
        path = write(tmp_path / name, head + b"\n" + tail)
        for skip_bad in (False, True):
            try:
                log = read_log(path, fields=FieldMap(max_line_bytes=8192), skip_bad=skip_bad)
            except InputError as exc:
                assert ":" in str(exc)
                continue
            for record in log.records:
                # Whatever a reader accepts must be writable as UTF-8 JSON later.
                json.dumps([record.id, record.prompt, record.reference, record.labels, record.meta],
                           ensure_ascii=False).encode("utf-8")

    check()


def test_fuzz_batch_keeps_n_lines_in_n_lines_out(
    fake_backends: Callable[..., dict[str, FakeBackend]], cascade: Cascade
) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    install(fake_backends, TABLE)
    line = _fuzz_bytes().map(lambda b: b.replace(b"\n", b" ") + b"\n")

    @hypothesis.settings(max_examples=60, deadline=None, database=None)
    @hypothesis.given(st.lists(line, min_size=1, max_size=6))
    def check(lines: list[bytes]) -> None:
        out = io.StringIO()
        summary = run_batch(io.BytesIO(b"".join(lines)), out, cascade, source="in", fields=FieldMap(max_line_bytes=8192))
        rows = [json.loads(r) for r in out.getvalue().encode("utf-8").decode("utf-8").splitlines()]
        assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
        assert summary.answered + summary.errors == len(lines)

    check()


# ---------------------------------------------------------------- cre serve: fields and keys


CHAT_BODY = {"model": "cre", "messages": [{"role": "user", "content": ADD}]}

# Issue 22: each was accepted silently, whatever its type. (field, value, words of the 400)
SERVE_FIELDS: list[tuple[str, Any, str]] = [
    ("tools", [{"type": "function", "function": {"name": "f"}}], "'tools' is not supported"),
    ("tool_choice", "required", "'tool_choice' is not supported"),
    ("functions", [{"name": "f"}], "'functions' is not supported"),
    ("response_format", {"type": "json_object"}, "'response_format' is not supported"),
    ("logprobs", True, "'logprobs' is not supported"),
    ("top_logprobs", 3, "'top_logprobs' is not supported"),
    ("frequency_penalty", 0.5, "'frequency_penalty' is not supported"),
    ("logit_bias", {"50256": -100}, "'logit_bias' is not supported"),
    ("n", 2, "'n' must be 1"),
    ("top_p", "x", "'top_p' must be a number from 0 to 1, got a string"),
    ("top_p", 1.5, "'top_p' must be from 0 to 1"),
    ("seed", {}, "'seed' must be an integer"),
    ("seed", 1.5, "'seed' must be an integer"),
    ("seed", -1, "'seed' must be from 0"),
    ("seed", True, "'seed' must be an integer"),
    ("temperature", "hot", "'temperature' must be a number"),
    # Past float's range: `math.isfinite` raised OverflowError, a 500 and a traceback.
    ("temperature", 10**400, "'temperature' must be from 0 to 2, got a number past any float"),
    ("top_p", -(10**400), "'top_p' must be from 0 to 1, got a number past any float"),
    ("stop", 5, "'stop' must be a string or an array"),
    ("stop", ["a", "b", "c", "d", "e"], "'stop' must be a non-empty string or an array of 1 to 4"),
    ("stop", [""], "'stop' must be a non-empty string"),
    ("stop", [1], "'stop' must be a non-empty string"),
    # Streaming checks each token against every prefix of each stop: a megabyte of stop held
    # the model for minutes a token.
    ("stop", ["x" * 257], "'stop' strings must be at most 256 characters each"),
    ("user", 5, "'user' must be a string"),
    ("metadata", "x", "'metadata' must be an object"),
    ("stream_options", [], "'stream_options' must be an object"),
    ("stream_options", {"include_usage": 1}, "'stream_options.include_usage' must be true or false"),
    # Without `stream: true` (here, none): OpenAI and vLLM refuse it; it was silently ignored.
    ("stream_options", {"include_usage": True}, "'stream_options' is only allowed when 'stream' is true"),
    ("max_tokens", 0, "'max_tokens' must be from 1"),
    ("made_up_field", 1, "'made_up_field' is not a field cre serve knows"),
    ("prompt", "hi", "'prompt' is not a field cre serve knows"),  # a completion's field in a chat
]

# What clients send by default, meaning "nothing": accepted, with nulls for anything.
SERVE_NEUTRAL: dict[str, Any] = {
    "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False,
    "top_logprobs": 0, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": 1,
    "parallel_tool_calls": True, "user": "u-1", "metadata": {"team": "a"}, "seed": 0, "top_p": 1,
    "temperature": 0.7, "stop": ["\n\n"], "functions": None, "audio": None, "stream": False,
    "stream_options": {},  # without a stream, as vLLM takes it
}


@pytest.fixture(params=[None], ids=["no key"])
def serve_client(request: pytest.FixtureRequest, fake_backends: Callable[..., dict[str, FakeBackend]],
                 cascade: Cascade) -> Any:
    from starlette.testclient import TestClient

    from crecli.serve_app import ServeOptions, create_app

    install(fake_backends, TABLE)
    with TestClient(create_app(cascade, ServeOptions(api_key=request.param))) as client:
        yield client


KEY = {"Authorization": "Bearer clé-🔑".encode()}  # the UTF-8 bytes, as a client sends them


@pytest.mark.parametrize(("name", "value", "words"), SERVE_FIELDS, ids=[f"{n}-{str(v)[:24]}" for n, v, _ in SERVE_FIELDS])
def test_serve_refuses_a_field_it_cannot_honour_or_a_wrong_type_naming_it(
    serve_client: Any, name: str, value: Any, words: str
) -> None:
    response = serve_client.post("/v1/chat/completions", json={**CHAT_BODY, name: value})
    error = response.json()["error"]
    assert response.status_code == 400 and words in error["message"], error
    assert error["param"] == name and set(error) == {"message", "type", "param", "code"}
    assert error["code"], error  # clients branch on it: max_tokens, n and include_usage had none


def test_max_completion_tokens_wins_over_max_tokens_as_in_vllm() -> None:
    # Both given: the loop kept the last one read, the deprecated `max_tokens`.
    from crecli import openai_wire as wire

    both = {**CHAT_BODY, "max_tokens": 5, "max_completion_tokens": 10}
    assert wire.parse_chat(both).max_tokens == 10
    assert wire.parse_chat({**CHAT_BODY, "max_tokens": 5}).max_tokens == 5
    with pytest.raises(wire.ApiError, match="'max_tokens' must be from 1"):
        wire.parse_chat({**both, "max_tokens": 0})  # the one not applied is still checked


def test_serve_every_refused_message_or_prompt_has_a_code(serve_client: Any) -> None:
    # Only the field table's refusals were checked for a code; the messages' and the prompt's
    # own 400s had none.
    for path, body in [
        ("/v1/chat/completions", {"model": "cre", "messages": []}),
        ("/v1/chat/completions", {"model": "cre", "messages": ["hi"]}),
        ("/v1/chat/completions", {"model": "cre", "messages": [{"role": "wizard", "content": "hi"}]}),
        ("/v1/chat/completions", {"model": "cre", "messages": [{"role": "system", "content": "hi"}]}),
        ("/v1/chat/completions", {"model": "cre", "messages": [{"role": "user", "content": 5}]}),
        ("/v1/completions", {"model": "cre", "prompt": ["a", "b"]}),
        ("/v1/completions", {"model": "cre", "prompt": ""}),
    ]:
        response = serve_client.post(path, json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] and error["code"], (body, error)


def test_serve_accepts_the_values_that_ask_for_nothing(serve_client: Any) -> None:
    response = serve_client.post("/v1/chat/completions", json={**CHAT_BODY, **SERVE_NEUTRAL})
    assert response.status_code == 200, response.text
    completion = serve_client.post("/v1/completions", json={
        "model": "cre", "prompt": ADD, "echo": False, "best_of": 1, "suffix": "", "logprobs": 0})
    assert completion.status_code == 200, completion.text


@pytest.mark.parametrize("serve_client", ["clé-🔑"], indirect=True, ids=["utf-8 key"])
def test_serve_a_non_ascii_api_key_authenticates_and_any_other_header_is_a_clean_401(serve_client: Any) -> None:
    """Issue 22: a non-ASCII key could never authenticate (the header came back as Latin-1)."""
    assert serve_client.post("/v1/chat/completions", json=CHAT_BODY, headers=KEY).status_code == 200
    for header in ("Bearer clé-🔑".encode("latin-1", "replace"), b"Bearer \xff\xfe\x80", "Bearer clé".encode(),
                   b"bearer", b"\xc3\xa9", "Bearer clé-🔑 x".encode()):
        response = serve_client.post("/v1/chat/completions", json=CHAT_BODY, headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert serve_client.get("/v1/models", headers=KEY).status_code == 200


@pytest.mark.parametrize(("length", "status", "words"), [
    ("9" * 5000, 413, "over the server's limit"),
    ("0" * 5000 + "2", 400, "'prompt' is required"),  # read: the body was the two bytes it said
    ("+2", 400, "not a number"),
    ("-1", 400, "not a number"),
    ("1e3", 400, "not a number"),
])
def test_serve_a_content_length_of_any_spelling_is_a_clean_answer(
    serve_client: Any, length: str, status: int, words: str
) -> None:
    """Found by tests/test_fuzz_http.py: 5,000 digits made int() raise, a 500."""
    response = serve_client.post("/v1/completions", content=b"{}", headers={"Content-Length": length.encode("latin-1")})
    assert response.status_code == status and words in response.json()["error"]["message"], response.text


def test_warnings_status_lines_and_errors_show_control_characters_as_escapes(capsys: pytest.CaptureFixture[str]) -> None:
    # Messages quote user text: a log's field names (`--truth-field`'s list), another
    # program's table names, a server's reply. An OSC sequence there retitled the terminal.
    from crecli import cli, console

    hostile = "meta.\x1b]0;owned\x07\x1b[2J"
    console.warn(hostile)
    console.status(hostile)
    cli._error(hostile)
    shown = capsys.readouterr().err
    assert "\x1b" not in shown and "\x07" not in shown and shown.count("meta.\\x1b]0;owned\\x07\\x1b[2J") == 3


@pytest.mark.parametrize("extra", [(), ("--json",), ("--model", "small")])
def test_ask_refuses_a_closed_stdout_before_any_model_runs(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Any], extra: tuple[str, ...],
) -> None:
    # `cre ask ... >&-` ran every model, logged the prompt, then ended in an AttributeError.
    from support.hostile import refused

    made = fake_backends({m: (lambda text, p: "4") for m in ("small", "medium", "large")})
    monkeypatch.setattr(sys, "stdout", None)
    routing = () if "--model" in extra else ("--router", saved_router)
    refused(cre("ask", ADD, *routing, "--models", tiny_models_toml, "--no-log", *extra), "stdout is closed", code=2)
    assert all(not backend.calls for backend in made.values())


def test_ask_writes_its_answer_as_utf8_whatever_the_locale(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cre: Callable[..., Any],
) -> None:
    # LANG=en_US.ISO-8859-1: the answer failed to encode, a traceback after the models ran.
    fake_backends({m: (lambda text, p: "12 \u2192 \u65e5\u672c") for m in ("small", "medium", "large")})
    out = tmp_path / "answer.txt"
    with open(out, "w", encoding="latin-1") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        run = cre("ask", ADD, "--router", saved_router, "--models", tiny_models_toml, "--no-log")
    assert run.code == 0, run.err
    assert "\u65e5\u672c" in out.read_bytes().decode("utf-8")


def test_ask_from_stdin_drops_a_byte_order_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli import cli
    from crecli.errors import CreError

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfWhat is 2 plus 2?\n")))
    assert cli._read_prompt("-") == "What is 2 plus 2?\n"
    # A file of a mark and a newline is an empty prompt, not one sent to the models.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbf\n")))
    with pytest.raises(CreError, match="the prompt is empty"):
        cli._read_prompt("-")
    # A bad byte's offset is the file's, mark included.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfab\xff")))
    with pytest.raises(CreError, match="byte 5"):
        cli._read_prompt("-")
