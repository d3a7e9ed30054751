"""Reading query logs: formats, field mapping, and every bad-line message."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from crecli.errors import InputError
from crecli.querylog import FieldMap, Record, parse_batch_line, read_log

DATA = Path(__file__).resolve().parents[1] / "examples"
SKIP = "; fix the line or pass --skip-bad"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


def jsonl(*objs: object) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


# --- the real log --------------------------------------------------------------------


def test_real_querylog() -> None:
    path = DATA / "querylog.jsonl"
    log = read_log(path)
    assert len(log.records) == 480 and log.bad == []
    assert all(r.labelled for r in log.records)
    assert Counter(r.match for r in log.records) == {"choice": 210, "numeric": 180, "exact": 90}
    assert len({r.meta["source"] for r in log.records}) == 16
    assert log.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    first = log.records[0]
    assert first.id == "arithmetic.1_digit_addition-0"
    assert first.reference == ["10"] and first.source == f"{path}:1"
    # Choice references are plain strings in the file; records always hold lists.
    choice = next(r for r in log.records if r.match == "choice")
    assert isinstance(choice.reference, list) and len(choice.reference) == 1


def test_real_small_querylog() -> None:
    log = read_log(DATA / "querylog-small.jsonl")
    assert len(log.records) == 80 and all(r.labelled for r in log.records)


# --- JSONL ---------------------------------------------------------------------------


def test_jsonl_fields_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "log.jsonl",
        jsonl(
            {"prompt": "What is 2 plus 2?", "reference": "4", "match": "numeric"},
            {"id": 7, "prompt": "Capital of France?", "reference": "Paris"},
            {"id": "u", "prompt": "Unlabelled", "user": "bob", "meta": {"source": "web", "user": "alice"}},
            {"id": "n", "prompt": "2+2", "reference": [4, 4.5], "match": "NUMERIC "},
            {"id": "l", "prompt": "judged", "labels": {"small": False, "large": True}},
            {"id": "m", "prompt": "odd meta", "meta": "free text"},
        ),
    )
    recs = {r.id: r for r in read_log(path).records}
    assert list(recs) == ["log:1", "7", "u", "n", "l", "m"]
    assert recs["log:1"] == Record(
        id="log:1", prompt="What is 2 plus 2?", reference=["4"], match="numeric", source=f"{path}:1"
    )
    assert recs["7"].match == "exact" and recs["7"].reference == ["Paris"]
    assert recs["u"].reference is None and recs["u"].match is None and not recs["u"].labelled
    # The meta object's fields win over top-level unknown fields of the same name.
    assert recs["u"].meta == {"source": "web", "user": "alice"}
    assert recs["n"].reference == ["4", "4.5"] and recs["n"].match == "numeric"
    assert recs["l"].labels == {"small": False, "large": True} and recs["l"].labelled
    assert recs["l"].reference is None
    assert recs["m"].meta == {"meta": "free text"}


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", '\n{"prompt": "a"}\n   \n\r\n{"prompt": "b"}\n')
    log = read_log(path)
    assert [(r.id, r.source) for r in log.records] == [("log:2", f"{path}:2"), ("log:5", f"{path}:5")]
    assert log.bad == []


def test_field_map(tmp_path: Path) -> None:
    path = write(
        tmp_path / "log.jsonl",
        jsonl({"qid": "a", "question": "Q?", "answer": ["x"], "kind": "contains", "judged": {"m": True},
               "prompt": "not the prompt"}),
    )
    fields = FieldMap(prompt="question", reference="answer", match="kind", id="qid", labels="judged")
    (rec,) = read_log(path, fields=fields).records
    assert (rec.id, rec.prompt, rec.reference, rec.match, rec.labels) == ("a", "Q?", ["x"], "contains", {"m": True})
    assert rec.meta == {"prompt": "not the prompt"}


def test_missing_prompt_names_the_mapped_field(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"prompt": "Q?"}))
    with pytest.raises(InputError) as info:
        read_log(path, fields=FieldMap(prompt="question"))
    assert str(info.value) == f"{path}:1: missing 'question' field (name the prompt field with --prompt-field){SKIP}"


BAD_JSONL = [
    ('{"prompt": "a"', "invalid JSON (Expecting ',' delimiter at column 15)"),
    ("not json at all", "invalid JSON (Expecting value at column 1)"),
    ('["prompt"]', "expected a JSON object, got an array"),
    ("42", "expected a JSON object, got a number"),
    ('{"id": "x"}', "missing 'prompt' field (name the prompt field with --prompt-field)"),
    ('{"prompt": null}', "missing 'prompt' field (name the prompt field with --prompt-field)"),
    ('{"prompt": "  "}', "empty 'prompt'"),
    ('{"prompt": 12}', "'prompt' must be a string, got a number"),
    ('{"prompt": "a", "id": ""}', "empty 'id'"),
    ('{"prompt": "a", "id": [1]}', "'id' must be a string or an integer, got an array"),
    ('{"prompt": "a", "id": true}', "'id' must be a string or an integer, got a boolean"),
    (
        '{"prompt": "a", "reference": "x", "match": "fuzzy"}',
        "'match' must be one of exact, numeric, choice, contains, regex; got 'fuzzy'",
    ),
    (
        '{"prompt": "a", "reference": "x", "match": 3}',
        "'match' must be one of exact, numeric, choice, contains, regex; got 3",
    ),
    ('{"prompt": "a", "reference": true}', "'reference' must be a string, a number or a list of them; found a boolean"),
    ('{"prompt": "a", "reference": {"x": 1}}', "'reference' must be a string, a number or a list of them; found an object"),
    ('{"prompt": "a", "reference": ["x", null]}', "'reference' must be a string, a number or a list of them; found null"),
    ('{"prompt": "a", "reference": []}', "'reference' is an empty list; give at least one accepted answer or leave it out"),
    ('{"prompt": "a", "reference": "Invalid", "match": "choice"}', "reference 'Invalid' holds no option letter for match 'choice'"),
    ('{"prompt": "a", "reference": "many", "match": "numeric"}', "reference 'many' holds no number for match 'numeric'"),
    ('{"prompt": "a", "labels": ["small"]}', "'labels' must map model names to true/false, got an array"),
    ('{"prompt": "a", "labels": {"small": 1}}', "'labels' must map model names to true/false; 'small' has 1"),
    ('{"prompt": "a", "labels": {"small": "yes"}}', "'labels' must map model names to true/false; 'small' has 'yes'"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_JSONL)
def test_bad_jsonl_line(tmp_path: Path, line: str, reason: str) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"prompt": "fine"}, line))
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:2: {reason}{SKIP}"


def test_bad_regex_reference(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"prompt": "a", "reference": "(x", "match": "regex"}))
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value).startswith(f"{path}:1: reference '(x' is not a valid regular expression (")
    assert str(info.value).endswith(SKIP)


def test_non_utf8_line(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8{SKIP}"


def test_duplicate_id(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}))
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:3: duplicate id 'a' (first at {path}:1){SKIP}"


def test_default_id_can_collide_with_an_explicit_one(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"id": "log:2", "prompt": "x"}, {"prompt": "y"}))
    with pytest.raises(InputError, match="duplicate id 'log:2'"):
        read_log(path)


def test_skip_bad_collects_bad_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "log.jsonl",
        jsonl(
            {"id": "a", "prompt": "x"},
            "{oops",
            {"id": "b", "prompt": "y"},
            '{"prompt": ""}',
            {"id": "a", "prompt": "dup"},
            {"prompt": "no id"},
        ),
    )
    log = read_log(path, skip_bad=True)
    assert [r.id for r in log.records] == ["a", "b", "log:6"]
    assert [(b.source, b.reason) for b in log.bad] == [
        (f"{path}:2", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (f"{path}:4", "empty 'prompt'"),
        (f"{path}:5", f"duplicate id 'a' (first at {path}:1)"),
    ]


def test_skip_bad_with_invalid_bytes_still_hashes_the_whole_file(tmp_path: Path) -> None:
    data = b'{"prompt": "a"}\n\xff\xfe\n{"prompt": "b"}\n'
    path = write(tmp_path / "log.jsonl", data)
    log = read_log(path, skip_bad=True)
    assert [r.prompt for r in log.records] == ["a", "b"]
    assert [b.source for b in log.bad] == [f"{path}:2"]
    assert log.bad[0].reason.startswith("not valid UTF-8 (byte 0xff at column 1)")
    assert log.sha256 == hashlib.sha256(data).hexdigest()


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert read_log(path).records[0].prompt == "a"


def test_a_bom_that_starts_a_later_line_is_ignored_too(tmp_path: Path) -> None:
    # `cat a.jsonl b.jsonl > log.jsonl`, b saved with a BOM: its first line was bad JSON
    # in a log, and in `cre batch` a plain-text prompt, the JSON text itself, its id lost.
    path = write(tmp_path / "log.jsonl", b'{"prompt": "a"}\n\xef\xbb\xbf{"prompt": "b"}\n')
    assert [r.prompt for r in read_log(path).records] == ["a", "b"]
    record = parse_batch_line(b'\xef\xbb\xbf{"id": "q7", "prompt": "What is 2+2?"}\n', 2, "in")
    assert (record.id, record.prompt) == ("q7", "What is 2+2?")


def test_a_plain_batch_prompt_that_opens_with_a_brace_is_told_how_to_give_it() -> None:
    # "{2,3} has how many elements?" read as JSON: the error said "invalid JSON" only, to a
    # user who gave plain text.
    with pytest.raises(InputError, match=r"^q.txt:5: invalid JSON .*starts with '\{' is read as a JSON object; "
                                         r"give a prompt that opens with a brace as JSONL: \{\"prompt\""):
        parse_batch_line(b"{2,3} has how many elements?\n", 5, "q.txt")


# --- file-level errors ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}: no such file; check the path"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        read_log(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory; pass a query log file (.jsonl, .csv or .txt)"


def test_unknown_format(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", jsonl({"prompt": "a"}))
    with pytest.raises(InputError, match="unknown log format 'xml'; use one of jsonl, csv, text"):
        read_log(path, fmt="xml")


def test_empty_file(tmp_path: Path) -> None:
    for name in ("log.jsonl", "log.csv", "log.txt"):
        log = read_log(write(tmp_path / name, ""))
        assert log.records == [] and log.bad == []
        assert log.sha256 == hashlib.sha256(b"").hexdigest()


# --- format detection ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prompt"),
    [
        ("log.jsonl", "a"),
        ("log.ndjson", "a"),
        ("log.json", "a"),
        ("log.JSONL", "a"),
        ("log.txt", '{"prompt": "a"}'),
        ("log.log", '{"prompt": "a"}'),
    ],
)
def test_format_by_extension(tmp_path: Path, name: str, prompt: str) -> None:
    # Read as JSONL the object's prompt is "a"; read as text the whole line is the prompt.
    log = read_log(write(tmp_path / name, '{"prompt": "a"}\n'))
    assert [r.prompt for r in log.records] == [prompt]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "queries.log", '{"prompt": "a"}\n')
    assert read_log(path, fmt="jsonl").records[0].prompt == "a"


# --- plain text ----------------------------------------------------------------------


def test_text_log(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", "What is 2+2?\n\n  Capital of France?  \r\n")
    log = read_log(path)
    assert [(r.id, r.prompt, r.labelled, r.source) for r in log.records] == [
        ("prompts:1", "What is 2+2?", False, f"{path}:1"),
        ("prompts:3", "Capital of France?", False, f"{path}:3"),
    ]


@pytest.mark.parametrize("name, data", [
    ("prompts.txt", b"What is 2+2?\rCapital of France?\r"),
    ("log.jsonl", b'{"prompt": "a"}\r{"prompt": "b"}\r'),
])
def test_old_mac_line_endings_are_refused_not_read_as_one_prompt(tmp_path: Path, name: str, data: bytes) -> None:
    # A lone "\r" is no line break to readline: the whole file was one line, and a text log
    # made one prompt of every question in it.
    path = write(tmp_path / name, data)
    with pytest.raises(InputError, match=rf"{name}:1: .*carriage return.*tr '\\r' '\\n'"):
        read_log(path)
    with pytest.raises(InputError, match=r"in:1: .*carriage return"):
        parse_batch_line(data, 1, "in")


def test_a_carriage_return_between_json_tokens_is_whitespace(tmp_path: Path) -> None:
    # JSON's own whitespace: refusing it (with advice that would split the object) broke a
    # log that had read fine.
    line = b'{"prompt": "What is 2+2?",\r "reference": "4"}'
    assert read_log(write(tmp_path / "log.jsonl", line + b"\r\n")).records[0].reference == ["4"]
    assert parse_batch_line(line, 1, "in").prompt == "What is 2+2?"


def test_a_line_of_unicode_spaces_is_blank_not_an_empty_prompt(tmp_path: Path) -> None:
    # bytes.strip() keeps a no-break space: the line became a prompt that strips to "".
    path = write(tmp_path / "prompts.txt", "a\n\u00a0\u3000 \nb\n")
    assert [(r.id, r.prompt) for r in read_log(path).records] == [("prompts:1", "a"), ("prompts:3", "b")]


def test_a_key_given_twice_is_a_bad_line_not_a_lost_answer(tmp_path: Path) -> None:
    path = write(tmp_path / "log.jsonl", '{"prompt": "q", "reference": "A"}\n{"prompt": "r", "reference": "A", "reference": "B"}\n')
    with pytest.raises(InputError, match="log.jsonl:2.*'reference' appears twice"):
        read_log(path)


def test_text_log_non_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", b"ok\nbad \x80 byte\n")
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:2: not valid UTF-8 (byte 0x80 at column 5); save the file as UTF-8{SKIP}"
    assert len(read_log(path, skip_bad=True).records) == 1


# --- CSV -----------------------------------------------------------------------------


def test_csv_log(tmp_path: Path) -> None:
    path = write(
        tmp_path / "log.csv",
        "id,prompt,reference,match,labels,team\n"
        'a,"What is 2 plus 2?",4,numeric,,x\n'
        'b,"Unscramble ""renetpsre""","[""represent"", ""presenter""]",,,y\n'
        ',"Multi\nline prompt",,,"{""small"": true}",z\n'
        "\n"
        "d,No reference,,,,\n",
    )
    log = read_log(path)
    assert [(r.id, r.source) for r in log.records] == [
        ("a", f"{path}:2"), ("b", f"{path}:3"), ("log:4", f"{path}:4"), ("d", f"{path}:7"),
    ]
    a, b, c, d = log.records
    assert (a.prompt, a.reference, a.match, a.meta) == ("What is 2 plus 2?", ["4"], "numeric", {"team": "x"})
    assert (b.prompt, b.reference, b.match) == ('Unscramble "renetpsre"', ["represent", "presenter"], "exact")
    assert (c.prompt, c.reference, c.labels, c.labelled) == ("Multi\nline prompt", None, {"small": True}, True)
    assert (d.reference, d.match, d.labelled) == (None, None, False)
    assert log.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_field_map(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "question,answer\nQ?,Paris\n")
    (rec,) = read_log(path, fields=FieldMap(prompt="question", reference="answer")).records
    assert (rec.prompt, rec.reference, rec.match, rec.meta) == ("Q?", ["Paris"], "exact", {})


def test_csv_missing_prompt_column(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "\nquestion,answer\nQ?,A\n")
    with pytest.raises(InputError) as info:
        read_log(path, skip_bad=True)
    assert str(info.value) == (
        f"{path}:2: no 'prompt' column in the header (columns: question, answer); "
        "name the prompt column with --prompt-field"
    )


def test_csv_duplicate_column(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "prompt,x,x\na,b,c\n")
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:1: column 'x' appears twice in the header; rename one"


BAD_CSV = [
    ("a,b,c,d", "row has 4 fields but the header has 3; quote fields that hold commas and close every quote"),
    (",B,choice", "empty 'prompt'"),
    ("a,Invalid,choice", "reference 'Invalid' holds no option letter for match 'choice'"),
    ("a,B,fuzzy", "'match' must be one of exact, numeric, choice, contains, regex; got 'fuzzy'"),
    ('a,"[""B"",]",choice', "'reference' column is not valid JSON (Expecting value at column 6)"),
    ("a,[],choice", "'reference' is an empty list; give at least one accepted answer or leave it out"),
]


@pytest.mark.parametrize(("row", "reason"), BAD_CSV)
def test_bad_csv_row(tmp_path: Path, row: str, reason: str) -> None:
    path = write(tmp_path / "log.csv", f"prompt,reference,match\nfine,A,choice\n{row}\n")
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value) == f"{path}:3: {reason}{SKIP}"


def test_bad_csv_labels_and_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", b'prompt,labels\nok,\nx,"{""m"": 1}"\ny,{oops\nz\xff,\n')
    log = read_log(path, skip_bad=True)
    assert [r.prompt for r in log.records] == ["ok"]
    assert [(b.source, b.reason) for b in log.bad] == [
        (f"{path}:3", "'labels' must map model names to true/false; 'm' has 1"),
        (f"{path}:4", "'labels' column is not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (f"{path}:5", "not valid UTF-8 (byte 0xff); save the file as UTF-8"),
    ]


def test_csv_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "id,prompt\na,x\na,y\n")
    log = read_log(path, skip_bad=True)
    assert len(log.records) == 1 and log.bad[0].source == f"{path}:3"


# --- batch lines ---------------------------------------------------------------------


def test_batch_plain_text() -> None:
    rec = parse_batch_line(b"  What is 2+2?\r", 3, "<stdin>")
    assert rec == Record(id="3", prompt="What is 2+2?", source="<stdin>:3")


def test_batch_json_object() -> None:
    rec = parse_batch_line(b'{"prompt": "Q?", "reference": "B", "match": "choice", "x": 1}', 5, "<stdin>")
    assert (rec.id, rec.prompt, rec.reference, rec.match, rec.meta) == ("5", "Q?", ["B"], "choice", {"x": 1})
    rec = parse_batch_line(b' {"id": "q9", "question": "Q?"}', 1, "in.jsonl", FieldMap(prompt="question"))
    assert (rec.id, rec.prompt, rec.source) == ("q9", "Q?", "in.jsonl:1")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "<stdin>:4: empty line; every input line needs a prompt"),
        (b"   \t", "<stdin>:4: empty line; every input line needs a prompt"),
        (b'{"prompt": "a"', "<stdin>:4: invalid JSON (Expecting ',' delimiter at column 15)"),
        (b'{"id": 1}', "<stdin>:4: missing 'prompt' field (name the prompt field with --prompt-field)"),
        (b'{"prompt": ""}', "<stdin>:4: empty 'prompt'"),
        (b"caf\xe9", "<stdin>:4: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"),
    ],
)
def test_batch_errors(raw: bytes, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_batch_line(raw, 4, "<stdin>")
    assert str(info.value) == message


def test_batch_line_that_is_not_an_object_is_a_prompt() -> None:
    assert parse_batch_line(b"[1, 2] is a list", 1, "<stdin>").prompt == "[1, 2] is a list"


def test_numeric_references_are_read_as_written_and_one_number_each(tmp_path: Path) -> None:
    # A JSON number 0.00001 became "1e-05" (Python's form), which grades as 1; "between 3
    # and 5" read as 3. A fraction is one number: "3/4" is 0.75.
    path = write(tmp_path / "log.jsonl", '{"prompt": "q", "reference": 0.00001, "match": "numeric"}\n'
                                         '{"prompt": "r", "reference": 12, "match": "numeric"}\n')
    assert [r.reference for r in read_log(path).records] == [["0.00001"], ["12"]]
    write(path, '{"prompt": "q", "reference": "3/4", "match": "numeric"}\n')
    assert [r.reference for r in read_log(path).records] == [["3/4"]]
    for bad, words in [('"between 3 and 5"', "more than one number"), ("NaN", "finite number")]:
        write(path, f'{{"prompt": "q", "reference": {bad}, "match": "numeric"}}\n')
        with pytest.raises(InputError, match=words):
            read_log(path)


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_told_apart_from_json_lines(tmp_path: Path, indent: int | None) -> None:
    # `--skip-bad`, the only advice, led to "0 usable queries".
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"prompt": f"q{i}", "reference": "a"} for i in range(12)], indent=indent))
    with pytest.raises(InputError, match=r"one JSON array, not JSON Lines .* jq -c"):
        read_log(log)
