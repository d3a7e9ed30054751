"""Answer normalisation and grading, on the answer shapes the ladder's models really write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crecli.errors import InputError
from crecli.grading import MATCH_TYPES, grade, max_tokens_for, normalize, reference_problem

QUERYLOG = Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl"

NORMALIZE = [
    # choice: option letters in every form models use
    ("choice", "(B)", "B"),
    ("choice", " (B)", "B"),  # gemma after "A:"
    ("choice", "B)", "B"),
    ("choice", "B.", "B"),
    ("choice", "B", "B"),
    ("choice", "b", "B"),
    ("choice", "**B**", "B"),
    ("choice", "[D]", "D"),
    ("choice", "B - apple", "B"),
    ("choice", "(c) foo", "C"),
    ("choice", "b) apple", "B"),
    ("choice", "Answer: B", "B"),
    ("choice", "Answer:\nC", "C"),
    ("choice", "The answer is (b) apple", "B"),
    ("choice", "The correct answer is (B) Invalid.", "B"),
    ("choice", "The correct option is E", "E"),
    ("choice", "Option B", "B"),
    ("choice", "option c is correct", "C"),
    ("choice", "(J) Neptune", "J"),
    ("choice", "I think (C) is right", "C"),
    ("choice", "\\boxed{C}", "C"),
    ("choice", "(A)\n\nExplanation: (B) is wrong because", "A"),
    ("choice", "The answer is A.", "A"),
    # choice: no letter
    ("choice", "Invalid", ""),
    ("choice", "plausible", ""),
    ("choice", "A dog", ""),
    ("choice", "I think it is valid", ""),
    ("choice", "To determine whether the sequence is properly matched, we need", ""),
    ("choice", "", ""),
    # numeric: digits, separators, decimals, signs
    ("numeric", "12", "12"),
    ("numeric", " 7", "7"),
    ("numeric", "12.0", "12"),
    ("numeric", "0.50", "0.5"),
    ("numeric", "1,000", "1000"),
    ("numeric", "287,056", "287056"),
    ("numeric", "-3", "-3"),
    ("numeric", "\u2212800", "-800"),
    ("numeric", "The answer is 12.", "12"),
    ("numeric", "Answer: 6160", "6160"),
    ("numeric", "$\\boxed{65}$", "65"),
    ("numeric", "**65**", "65"),
    # numeric: number words
    ("numeric", "twelve", "12"),
    ("numeric", "Thirteen", "13"),
    ("numeric", "twenty-one", "21"),
    ("numeric", "forty two", "42"),
    ("numeric", "one hundred and five", "105"),
    ("numeric", "three hundred thousand", "300000"),
    ("numeric", "one million two thousand and five", "1002005"),
    ("numeric", "minus seven", "-7"),
    ("numeric", "one two", "1"),
    # numeric: which number in a sentence
    ("numeric", "The sum of 33 and 32 is 65.", "65"),
    ("numeric", "8 + 2 = 10", "10"),
    ("numeric", "There are thirteen objects.", "13"),
    ("numeric", "I have 13 objects in total.", "13"),
    ("numeric", "The result of op 5 is 11.", "11"),
    ("numeric", "1. 65", "65"),
    ("numeric", "65\n\nTo get 65 we add 33 and 32", "65"),
    ("numeric", "12-15", "12"),
    ("numeric", "someone", ""),
    ("numeric", "no idea", ""),
    # exact: normalised text of the answer segment
    ("exact", "Brussels.", "brussels"),
    ("exact", "The answer is Brussels", "brussels"),
    ("exact", "**Brussels**", "brussels"),
    ("exact", '"English"', "english"),
    ("exact", "Z\u00fcrich", "zurich"),
    ("exact", "don't stop", "dont stop"),
    ("exact", "  Multiple   spaces\there ", "multiple spaces here"),
    ("exact", "applaud, coloratura, gluey", "applaud coloratura gluey"),
    ("exact", "- applaud\n- coloratura\n- gluey", "applaud coloratura gluey"),
    ("exact", "1. fabian\n2. lacquer", "fabian lacquer"),
    ("exact", "Here are the words sorted alphabetically:\n\nfabian lacquer", "fabian lacquer"),
    ("exact", "Brussels\n\nBrussels is the capital of Belgium.", "brussels"),
    # contains / regex normalise the whole text
    ("contains", "Answer: It is Brussels.\nA city.", "it is brussels a city"),
    ("regex", "**Foo**, bar!", "foo bar"),
    # None: unlabelled traffic
    (None, "(B)", "B"),
    (None, "B", "B"),
    (None, "B) foo", "B"),
    (None, "12", "12"),
    (None, "12.", "12"),
    (None, "twelve", "12"),
    (None, "The answer is 12.", "12"),
    (None, "1,000", "1000"),
    (None, "Brussels.", "brussels"),
    (None, "Answer: London", "london"),
    (None, "A dog", "a dog"),
    (None, "twenty-one apples", "twenty one apples"),
    (None, "one two", "one two"),
    (None, "12 apples", "12 apples"),
]


@pytest.mark.parametrize(("match", "text", "expected"), NORMALIZE)
def test_normalize(match: str | None, text: str, expected: str) -> None:
    assert normalize(text, match) == expected


@pytest.mark.parametrize(("match", "text", "expected"), [row for row in NORMALIZE if row[2]])
def test_normalize_is_idempotent(match: str | None, text: str, expected: str) -> None:
    # The cascade grades its normalised majority answer, so normalising again must not change it.
    assert normalize(expected, match) == expected


GRADE = [
    # numeric
    ("12", "12", "numeric", True),
    ("12.0", "12", "numeric", True),
    ("twelve", "12", "numeric", True),
    ("13", ["thirteen", "13"], "numeric", True),
    ("thirteen", ["thirteen", "13"], "numeric", True),
    ("The answer is 65.", ["65"], "numeric", True),
    ("0.5000001", "0.5", "numeric", True),
    ("-800", "-800", "numeric", True),
    ("12", "120", "numeric", False),
    ("120", "12", "numeric", False),
    ("0.501", "0.5", "numeric", False),
    ("800", "-800", "numeric", False),
    ("I don't know", "12", "numeric", False),
    # choice
    ("(B)", "B", "choice", True),
    ("The answer is (b) apple", "B", "choice", True),
    ("(B)", "C", "choice", False),
    ("(B)", ["A", "C"], "choice", False),
    ("Invalid", "B", "choice", False),
    ("implausible", "B", "choice", False),
    # exact
    ("Brussels.", ["Brussels"], "exact", True),
    ("applaud, coloratura, gluey, shopworn, vogel", "applaud coloratura gluey shopworn vogel", "exact", True),
    ("presenter", ["represent", "presenter"], "exact", True),
    ("Brussels is the capital", "Brussels", "exact", False),
    ("Brussel", "Brussels", "exact", False),
    ("", "Brussels", "exact", False),
    # contains
    ("I think it is Brussels, in Belgium.", "brussels", "contains", True),
    ("New York City", "new york", "contains", True),
    ("concatenate", "cat", "contains", False),
    ("York", "new york", "contains", False),
    # regex on the answer stripped of surrounding whitespace (as live keeps it; the replay
    # grades raw recorded votes, which must grade alike)
    (" 42\n", r"^42$", "regex", True),
    ("Foo 123", r"\d+", "regex", True),
    ("FOO", r"^foo$", "regex", True),
    ("foo bar", r"^bar", "regex", False),
    ("x", [r"^y$", r"^x$"], "regex", True),
]


@pytest.mark.parametrize(("answer", "reference", "match", "expected"), GRADE)
def test_grade(answer: str, reference: str | list[str], match: str, expected: bool) -> None:
    assert grade(answer, reference, match) is expected


def test_votes_agree_across_answer_forms() -> None:
    # Self-consistency counts these as one answer, so they must normalise identically.
    assert {normalize(t, "choice") for t in ["(B)", "B) Invalid", "Answer: B", "**B**", " (B)"]} == {"B"}
    assert {normalize(t) for t in ["12", "twelve", "The answer is 12.", "12.0"]} == {"12"}
    assert normalize("(B)", "choice") != normalize("(C)", "choice")


def test_max_tokens_for() -> None:
    caps = {m: max_tokens_for(m) for m in (*MATCH_TYPES, None)}
    assert caps == {"choice": 8, "numeric": 16, "exact": 24, "contains": 48, "regex": 48, None: 64}
    with pytest.raises(InputError, match="unknown match type 'fuzzy'; use one of exact, numeric"):
        max_tokens_for("fuzzy")


def test_unknown_match_type_is_an_error() -> None:
    with pytest.raises(InputError, match="unknown match type 'fuzzy'"):
        normalize("x", "fuzzy")
    with pytest.raises(InputError, match="unknown match type 'fuzzy'"):
        grade("x", "x", "fuzzy")


@pytest.mark.parametrize(
    ("reference", "match", "problem"),
    [
        ("Invalid", "choice", "reference 'Invalid' holds no option letter for match 'choice'"),
        ("lots", "numeric", "reference 'lots' holds no number for match 'numeric'"),
        ("?!", "exact", "reference '?!' holds no text for match 'exact'"),
        ("(unclosed", "regex", "reference '(unclosed' is not a valid regular expression"),
    ],
)
def test_bad_references(reference: str, match: str, problem: str) -> None:
    found = reference_problem(reference, match)
    assert found is not None and found.startswith(problem)
    with pytest.raises(InputError, match="fix the reference in the query log"):
        grade("anything", reference, match)


@pytest.mark.parametrize(
    ("reference", "match"), [("B", "choice"), ("thirteen", "numeric"), ("x y", "exact"), ("a+", "regex")]
)
def test_good_references(reference: str, match: str) -> None:
    assert reference_problem(reference, match) is None


def _refs(row: dict[str, object]) -> list[str]:
    ref = row["reference"]
    return [ref] if isinstance(ref, str) else list(ref)  # type: ignore[arg-type]


def test_real_references_grade_themselves() -> None:
    # Every label in the real log is usable and a model that echoes it is right, while the
    # neighbouring row's different answer of the same type is wrong.
    rows = [json.loads(line) for line in QUERYLOG.read_text().splitlines()]
    for row in rows:
        for ref in _refs(row):
            assert reference_problem(ref, row["match"]) is None, row["id"]
            assert grade(ref, row["reference"], row["match"]), row["id"]
    compared = 0
    for a, b in zip(rows, rows[1:]):
        match = a["match"]
        if match != b["match"]:
            continue
        if {normalize(r, match) for r in _refs(a)} & {normalize(r, match) for r in _refs(b)}:
            continue
        assert not grade(_refs(a)[0], b["reference"], match), (a["id"], b["id"])
        compared += 1
    assert compared > 200


def test_numbers_past_a_floats_precision_and_pythons_int_text_limit_grade_exactly() -> None:
    # Compared as floats, 2**53 + 1 equalled 2**53, and two equal 400-digit numbers were both
    # infinite (their difference NaN: a right answer marked wrong).
    assert not grade("9007199254740992", "9007199254740993", "numeric")
    assert grade("9007199254740993", "9007199254740993", "numeric")
    big = "7" * 400
    assert grade(big, big, "numeric") and not grade(big[:-1] + "6", big, "numeric")
    # A reference of 5,000 digits: str(int(...)) refused it with a ValueError traceback.
    huge = "9" * 5000
    assert reference_problem(huge, "numeric") is None and normalize(huge, "numeric") == huge
    assert grade(huge, huge, "numeric")
    assert normalize("-0", "numeric") == "0" and normalize("1.000", "numeric") == "1"


def test_exact_keeps_a_numbers_sign_and_a_references_whole_text_and_full_width_forms_read() -> None:
    # Punctuation became spaces, the minus sign included: "-5" matched "5".
    assert not grade("5", "-5", "exact") and grade("-5", "-5", "exact")
    assert grade("well-known", "well known", "exact")  # a hyphen between words still separates
    # A reference is the answer, not a reply: it was cut to its first line like one.
    assert not grade("apple", "apple\nbanana", "exact")
    # Full-width forms (common in CJK output) gave no letter, and 1 for "１，０００".
    assert grade("（Ｂ）", "B", "choice") and grade("１，０００", "1000", "numeric")


@pytest.mark.parametrize(("answer", "reference", "match"), [
    # "answer" inside an explanation marked the rest of the line as the answer.
    ("(B)\nThis answer is based on the passage.", "B", "choice"),
    ("42 is the answer", "42", "numeric"),
    ("I double-checked this answer carefully: 12", "12", "numeric"),
    # What marks an answer still does.
    ("Answer B", "B", "choice"),
    ("Reasoning first. The answer is 12.", "12", "numeric"),
    ("Final answer: 7", "7", "numeric"),
    ("Hmm, the correct answer would be (C).", "C", "choice"),
    ("Answer:\nB", "B", "choice"),
    ("So my answer is: Paris", "paris", "exact"),
    ("the final answer\n9", "9", "numeric"),
])
def test_the_word_answer_marks_an_answer_only_where_it_is_said_to_be_one(answer: str, reference: str, match: str) -> None:
    assert grade(answer, reference, match)


@pytest.mark.parametrize(("answer", "reference", "match", "expected"), [
    # A marker's dash separator swallowed the sign: "The answer is -5" read as 5.
    ("The answer is -5", "-5", "numeric", True),
    ("The answer is -5", "5", "numeric", False),
    ("Answer -5", "-5", "exact", True),
    ("Answer - B", "B", "choice", True),
    # A sign after punctuation is a sign: "(-5)" is -5.
    ("(-5)", "-5", "exact", True),
    ("[-5]", "-5", "exact", True),
    # A numbered-list reference reads as its items, as an answer's list does.
    ("1. apple\n2. banana", "1. apple\n2. banana", "exact", True),
    # A marker ending its line with the answer before it keeps that line.
    ("42 is the answer\nExplanation: 6*7=42", "42", "numeric", True),
    ("42 is the answer\nbecause 6 times 7", "6", "numeric", False),
    # A segment opening with a number that stands alone states it; "is" later explains it.
    ("The answer is 12, which is 3 more than 9.", "12", "numeric", True),
    ("-5, which is below 0", "-5", "numeric", True),
    ("5 + 7 = 12", "12", "numeric", True),
    ("The sum of 5 and 7, which is 12.", "12", "numeric", True),
])
def test_signs_lists_and_markers_at_the_end_of_a_line(answer: str, reference: str, match: str, expected: bool) -> None:
    assert grade(answer, reference, match) is expected


@pytest.mark.parametrize(("answer", "reference", "match", "expected"), [
    # A numbered list begins at 1: a sentence that opens with its answer is no list, and its
    # answer was dropped for the next number ("42. She had 40" read as 40).
    ("42. She had 40 and got 2 more.", "42", "numeric", True),
    ("7) 3 red plus 4 blue", "7", "numeric", True),
    ("18. \n\nExplanation: 9*2", "18", "numeric", True),
    ("1. 65", "65", "numeric", True),
    ("1. 65", "1", "numeric", False),
    # Two letters offered together name no one answer: "(A) or (B)" was right for (A).
    ("(A) or (B)", "A", "choice", False),
    ("Both (A) and (B)", "A", "choice", False),
    ("(A)/(B)", "A", "choice", False),
    ("(A) and (C)", "A", "choice", False),
    ("I think (B), not (A)", "B", "choice", True),
    ("(B) or (B)", "B", "choice", True),
    # A sign before a currency symbol, or in words before digits, is the number's sign.
    ("-$5", "5", "numeric", False),
    ("-$5", "-5", "numeric", True),
    ("The result is negative 5", "5", "numeric", False),
    ("The result is minus 5", "-5", "numeric", True),
    # A fraction is one number, and so are digits with a scale word.
    ("3/4", "3", "numeric", False),
    ("3/4", "0.75", "numeric", True),
    ("1 million", "1", "numeric", False),
    ("2.5 million", "2500000", "numeric", True),
    ("1/0", "1", "numeric", False),
])
def test_numbered_sentences_hedged_letters_signs_and_fractions(answer: str, reference: str, match: str, expected: bool) -> None:
    assert grade(answer, reference, match) is expected


def test_hedged_letters_vote_as_text_and_a_hedged_reference_is_refused() -> None:
    # Unlabelled votes: a hedge is no option letter, so it does not vote with a plain (A).
    assert normalize("(A) or (B)") != normalize("(A)")
    problem = reference_problem("(A) or (B)", "choice")
    assert problem is not None and "more than one option letter" in problem
    assert reference_problem("3/4", "numeric") is None


@pytest.mark.parametrize(("answer", "reference", "match", "expected"), [
    # A hedge is two letters offered together where the letter read opens them; a later
    # mention of others, or a comma, leaves the answer standing (a review found these lost).
    ("Answer: (B), (A) is wrong", "B", "choice", True),
    ("(B) is correct; (A) and (C) are not.", "B", "choice", True),
    ("The correct answer is (B). (A) and (C) are wrong.", "B", "choice", True),
    ("B) apple, since (A) and (C) are fruits too", "B", "choice", True),
    ("Option (A) or (B)", "A", "choice", False),
    ("Either (A) or (B)", "A", "choice", False),
    ("I would say (A) or (B)", "A", "choice", False),
    # Dates are no fractions, and a scale word opening a compound is no scale.
    ("12/25/2024", "12", "numeric", True),
    ("3/4/5", "3", "numeric", True),
    ("5 thousand-year-old trees", "5", "numeric", True),
])
def test_hedges_only_where_the_letter_read_opens_them_and_dates_are_no_fractions(
    answer: str, reference: str, match: str, expected: bool
) -> None:
    assert grade(answer, reference, match) is expected
