"""The one safe JSON reader: every failure a message, every string valid Unicode."""

from __future__ import annotations

import json
import sys

import pytest

from crecli import safejson


@pytest.mark.parametrize(("text", "message"), [
    ("[1 2]", "bad (Expecting ',' delimiter at column 4)"),
    ("[" * 100_000 + "]" * 100_000, "bad (nested too deeply to read); flatten it"),
    ("1" * 5000, f"bad (a number longer than {sys.get_int_max_str_digits():,} digits); quote it as a string"),
    ('"\\ud800"', "lone surrogate \\ud800 is not valid Unicode; pair it or remove it"),
    ('{"meta": {"a": ["\\udc00"]}}', "lone surrogate \\udc00 in 'meta' is not valid Unicode; pair it or remove it"),
    ('{"a": 1, "b": {"a": 2, "a": 3}}', "bad (the key 'a' appears twice in one object; keep one)"),
    ('{"\\ud800": 1}', "lone surrogate \\ud800 in '\\ud800' is not valid Unicode; pair it or remove it"),
    # A server's reply, read as bytes: a byte that is no UTF-8 was called a number too long.
    (b'["\xc3("]', "bad (not valid utf-8 text at byte 3)"),
])
def test_loads_turns_every_failure_into_a_message(text: str | bytes, message: str) -> None:
    with pytest.raises(safejson.JsonError) as refused:
        safejson.loads(text, "bad")
    assert str(refused.value) == message
    assert isinstance(refused.value, ValueError)


def test_loads_reads_valid_json_and_paired_surrogates() -> None:
    assert safejson.loads('{"a": ["\\ud83d\\ude00", 1, null]}', "bad") == {"a": ["\U0001f600", 1, None]}
    assert safejson.loads('{"a": "\u00e9"}'.encode("utf-16"), "bad") == {"a": "\u00e9"}


def test_a_servers_reply_is_read_tolerantly_refusing_only_what_cannot_be_read() -> None:
    """A server's reply (`strict=False`): a key given twice keeps its last value and a lone
    surrogate stays, as `json.loads` reads them; deep nesting and over-long numbers are still
    a JsonError, never a RecursionError or a bare ValueError."""
    assert safejson.loads('{"a": "caf\\ud83d", "a": "x\\ud800"}', "bad", strict=False) == {"a": "x\ud800"}
    for text, why in [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("1" * 5000, "a number longer"),
                      ("[1 2]", "Expecting")]:
        with pytest.raises(safejson.JsonError, match=why):
            safejson.loads(text, "bad", strict=False)


def test_surrogates_are_found_and_mended_into_valid_utf8_json() -> None:
    text = json.dumps({"answer": "bad \ud800 answer", "ok": "\U0001f600"}, ensure_ascii=False)
    assert safejson.has_surrogate(text) and not safejson.has_surrogate("\U0001f600")
    mended = safejson.replace_surrogates(text)
    assert json.loads(mended.encode("utf-8")) == {"answer": "bad \ufffd answer", "ok": "\U0001f600"}


@pytest.mark.parametrize(("value", "word"), [
    (None, "null"), (True, "a boolean"), (1, "a number"), (1.5, "a number"), ("", "a string"), ([], "an array"),
    ({}, "an object"),
])
def test_json_type_names_a_value_for_messages(value: object, word: str) -> None:
    assert safejson.json_type(value) == word
