"""Answer normalisation and grading.

`normalize` gives the canonical form of an answer. It serves two purposes that must agree:
grading (an answer is right when its canonical form matches a reference's) and
self-consistency voting (two sampled answers vote together when their canonical forms are
equal). Models rarely answer with the bare answer, so the rule for finding it is explicit.

**The answer segment.** Full-width forms are read as ASCII (NFKC: "（Ｂ）" is "(B)") and
Markdown emphasis (`**`, `__`, backticks) is removed, then the
first rule that applies picks the segment of the text that holds the answer:
  1. the contents of the first LaTeX `\\boxed{...}`;
  2. after the first explicit marker, "the answer is", "answer:", "correct option is", ...
     (see `_MARKER`: "answer" in an explanation, "this answer is based on", is no marker),
     to the end of that line, or the next non-empty line when the marker ends its line
     ("Answer:\\nB"); a marker with nothing after it ("42 is the answer") falls to rule 3;
  3. otherwise the first non-empty line, or the second when the first only introduces it
     ("Here are the words sorted:"). When that line is a list item ("- x", "1. x"), the
     whole run of list items is the segment, bullets dropped, so a list of sorted words
     reads as one answer. A numbered list begins at 1: "42. She had 40." is no list.
Everything after the segment (explanations, a next question a base model invents) is
ignored, except by `contains` and `regex`, which look at the whole text.

**Per match type, within the segment:**
  - choice: the option letter, upper case. A leading "(B)", "[B]", "B)", "B.", "B:",
    "B" alone, "Option B" or lower-case "(b)"/"b)"; else the first parenthesised letter
    "(B)" anywhere in the segment; else "" (no letter found). A bare letter followed by
    a word is not read as an option ("A dog", "I think", so also "B because"), since "A"
    and "I" are English words. Two letters offered together where the letter read stands
    ("(A) or (B)", "(A)/(B)", "both (A) and (B)") are a hedge: "" (no one letter); a later
    mention of other letters ("(B) is right; (A) and (C) are not") is not.
  - numeric: the canonical number ("12", "-3", "0.5", "1000"). Digits (with `,` thousand
    separators, a sign before a currency symbol, "-$5", or a word, "minus 5"; "3/4" is
    0.75, but a date "12/25/2024" is 12, and "2 million" is 2000000) or English number
    words ("twenty-one", "one hundred and five"). A segment that opens with a number
    ending at a comma, a full stop or its end states it ("12, which is 3 more than 9.");
    otherwise the number right after the last "=", "is", "are", "equals", "was" or "were"
    wins ("The sum of 33 and 32 is 65."), else the first number in the segment; "" if none.
  - exact, contains, regex: normalised text (see `_text`): NFKC, accents dropped, lower
    case, a leading "answer:"/"the answer is" dropped, apostrophes deleted, a minus sign
    starting a number kept ("-5" is not "5"), other punctuation turned to spaces,
    whitespace collapsed. `exact` normalises the segment; `contains` and `regex` the whole
    text. A reference is normalised whole, never cut to a segment: it is the answer.
  - None (unlabelled traffic): within the segment, the option letter if the segment is
    plainly an option (the leading forms above, and no hedge), else the number if the whole
    segment is one number (digits or words, trailing punctuation allowed), else normalised
    text.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from functools import lru_cache
from typing import Sequence

from crecli.errors import InputError

MATCH_TYPES = ("exact", "numeric", "choice", "contains", "regex")


def match_type(value: object) -> str | None:
    """The answer type `value` names, in any case and spacing ("Numeric "), or None when it
    names none: how a log's `match` field and `cre ask --match` are read."""
    match = value.strip().lower() if isinstance(value, str) else None
    return match if match in MATCH_TYPES else None

# Short caps because answers are short and output tokens are most of the cost. Numbers
# get room for a sign, separators and a trailing period; text for a short phrase.
_MAX_TOKENS: dict[str | None, int] = {
    "choice": 8,
    "numeric": 16,
    "exact": 24,
    "contains": 48,
    "regex": 48,
    None: 64,
}

# Absolute tolerance for numeric grading; answers here are integers or short decimals.
NUMERIC_TOLERANCE = 1e-6
_TOLERANCE = Decimal(str(NUMERIC_TOLERANCE))

_EMPHASIS = re.compile(r"\*\*|__|`+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_COPULA_WORDS = r"(?:is|would\s+be|should\s+be|will\s+be)\b"
_QUALIFIER = r"(?:final|correct|right|best)\s+"
# A marker's separator; a dash is one only when no number follows ("Answer -5" is -5).
_SEP = r"(?:[:=]|-(?!\s*[\d.]))"
# "answer" marks the answer only where it is said to be one: starting a line ("Answer: B",
# "Answer B", "Final answer\nB"), before ":" or "=", or after "the"/"my"/a qualifier with
# "is" ("The answer is 12", "the correct answer would be (B)"). Anywhere else it is a word
# of the explanation: "This answer is based on the passage" marks nothing.
_MARKER = re.compile(
    rf"^[ \t]*(?:{_QUALIFIER})?answer\b(?:\s+{_COPULA_WORDS})?\s*{_SEP}?[ \t]*"
    rf"|\b(?:{_QUALIFIER})?answer\s*[:=][ \t]*"
    rf"|\b(?:(?:the|my|our)\s+(?:{_QUALIFIER})?|{_QUALIFIER})answer(?:\s+{_COPULA_WORDS}\s*{_SEP}?|[ \t]*$)[ \t]*"
    rf"|\b(?:correct|right)\s+(?:option|choice|letter)\b(?:\s+is)?\s*{_SEP}?[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|(?P<number>\d{1,3})[.)])\s+(?P<item>.*)$")
_QUOTES = "\"'\u201c\u201d\u2018\u2019\u00ab\u00bb"

# Option letters. An optional "Option"/"choice"/"letter" word may precede the letter.
_OPTION_PREFIX = r"(?:(?i:option|choice|letter)\s+)?"
_LEADING_LETTER = [
    re.compile(rf"^{_OPTION_PREFIX}\(([A-Za-z])\)"),
    re.compile(rf"^{_OPTION_PREFIX}\[([A-Za-z])\]"),
    # Upper case only, and only before punctuation, a dash or the end: a bare letter
    # followed by a word is too often "A" or "I" starting a sentence.
    re.compile(rf"^{_OPTION_PREFIX}([A-Z])(?=[).:,\]]|\s*$|\s+[-\u2013\u2014]\s)"),
    re.compile(r"^(?i:option|choice|letter)\s+([A-Za-z])\b"),
    re.compile(r"^([a-z])(?=\)|\.?\s*$)"),
]
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
# Two option letters offered together, "(A) or (B)", "(A)/(B)", "both (A) and (B)": a hedge
# names no one answer. Read as its first letter, it was graded right for (A), which lifted a
# small model that hedged. Only where the letter read opens it (`_read_letter`): "(B) is right;
# (A) and (C) are not" answers (B). A comma is no hedge: "(B), (A) is wrong" answers (B).
_HEDGE_PAIR = r"[(\[]([A-Za-z])[)\]]\s*(?:/|\bor\b|\band\b)\s*[(\[]([A-Za-z])[)\]]"
_HEDGE = re.compile(_HEDGE_PAIR, re.IGNORECASE)
_LEADING_HEDGE = re.compile(rf"^(?:both\s+|either\s+)?{_OPTION_PREFIX}{_HEDGE_PAIR}", re.IGNORECASE)

# Number words. Values for units, teens and tens; scales multiply.
_SMALL = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_WORD = "|".join(sorted([*_SMALL, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_NUMBER = re.compile(
    # Digits: grouped thousands first so "1,000" is one number; no sign after a word
    # character, so "12-15" does not read as -15. A sign may stand before a currency symbol
    # ("-$5") or be a word ("minus 5", "negative 5"); "3/4" is one number, 0.75, and so is
    # "2 million", 2000000: each was read as its first digits, so a wrong answer ("-$5",
    # "3/4", "1 million") graded right against 5, 3 or 1. A date is no fraction: digits
    # next to a second "/" ("12/25/2024") read as its first number, 12, as before.
    rf"(?:(?P<neg>\b(?:minus|negative)\s+)|(?<![\w./]))"
    rf"(?P<digits>[-+]?[$\u20ac\u00a3]?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?![\d])"
    rf"(?:/(?P<den>\d+)(?![\d./]))?(?:\s+(?P<scale>thousand|million|billion)\b(?!-))?"
    rf"|\b(?P<words>(?:(?:minus|negative)\s+)?(?:{_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_WORD}))*)\b",
    re.IGNORECASE,
)
_NOT_DIGITS = re.compile("[,$\u20ac\u00a3]")
# A number opening a segment and ending at a clause break or the end: "12, which ...", "42."
_LEAD_NUMBER = re.compile(r"\s*(?P<n>[-+]?[\d.,]*\d)\s*(?:[,;]|\.(?!\d)|$)")
_COPULA = re.compile(r"(?:=|\bequals?|\bis|\bare|\bwas|\bwere)\s*:?\s*$", re.IGNORECASE)
_LEADING_ANSWER = re.compile(
    r"^(?:the\s+)?(?:(?:final|correct)\s+)?answer\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE
)


def max_tokens_for(match: str | None) -> int:
    """Output-token cap for an answer of this match type (None: unlabelled traffic)."""
    if match not in _MAX_TOKENS:
        raise InputError(_unknown_match(match))
    return _MAX_TOKENS[match]


def bare_answer(text: str, match: str | None) -> str | None:
    """`text` as the system prompt asks an answer to be written: "(B)" for an option letter,
    a plain number, else the text stripped; None when it holds no answer of that type (or
    the type, a regex, says nothing of the form). The one rule for the answered examples a
    router shows and for what the strongest model's answer is estimated to take."""
    if match == "regex":
        return None
    if match == "choice":
        letter = normalize(text, "choice")
        return f"({letter})" if letter else None
    if match == "numeric":
        return normalize(text, "numeric") or None
    return text.strip() or None


# A choice answer is decided once its option letter is out: "(B" (or "(B)"), after at most
# some whitespace. The greedy decode stops there (`GenParams.option_letters`) instead of
# spending a decode step on ")" and another on the end-of-turn token: on the 1.5B, whose
# tokenizer writes "(B" as one token, an option answer takes no decode step at all. Only
# for letters the prompt itself offers as "(B)", so "(Beijing" in a prompt with no "(B)"
# option, or "(B" in one without options, runs on.
_OPTION_OPENING = re.compile(r"\s*\(([A-Za-z])\)?")


def option_letters(match: str | None, prompt: str) -> str:
    """The option letters at which a greedy answer to `prompt` ends (`decided_option`): the
    letters the prompt offers as "(A)", "(B)", ... when its answer type is `choice`, else ""
    (no early end). Which models end there is `registry.option_letters_for`'s to say."""
    if match != "choice":
        return ""
    return "".join(sorted(set(_PAREN_LETTER.findall(prompt))))


def decided_option(text: str, letters: str) -> str | None:
    """`text` ended as a decided option answer, "(B)" with the spacing it was written in,
    when `text` (an answer being written) is nothing but an opening "(B" or "(B)" of one of
    `letters`; else None (write on). Decided this way, an answer reads as the letter it
    opened with, as `normalize` reads "(B) because ..."; only "(B) or (C)", which the whole
    answer would have hedged, reads otherwise."""
    found = _OPTION_OPENING.fullmatch(text) if letters else None
    if found is None or found.group(1) not in letters:
        return None
    return text if text.endswith(")") else text + ")"


def normalize(text: str, match: str | None = None) -> str:
    """Canonical answer for grading and voting; the rules are in the module docstring."""
    if match is not None and match not in MATCH_TYPES:
        raise InputError(_unknown_match(match))
    if match in ("contains", "regex"):
        return _text(_EMPHASIS.sub("", text))
    segment = _segment(text)
    if match == "choice":
        letter, hedged = _read_letter(segment, anywhere=True)
        return "" if hedged else letter
    if match == "numeric":
        value = _pick_number(segment)
        return "" if value is None else _canonical(value)
    if match == "exact":
        return _text(segment)
    letter, hedged = _read_letter(segment, anywhere=False)
    if letter and not hedged:
        return letter
    whole = _whole_number(segment)
    if whole is not None:
        return _canonical(whole)
    return _text(segment)


def grade(answer: str, reference: str | Sequence[str], match: str) -> bool:
    """True when `answer` matches any of the references under `match`.

    exact: equal normalised text. numeric: equal numbers within NUMERIC_TOLERANCE. choice:
    equal option letters. contains: the normalised reference occurs in the normalised
    answer on word boundaries ("cat" is not in "concatenate"). regex: `re.search` of the
    reference on the answer stripped of surrounding whitespace, ignoring case. An answer with no letter, number or text
    is never right. A reference that cannot match anything raises InputError.
    """
    if match not in MATCH_TYPES:
        raise InputError(_unknown_match(match))
    references = [reference] if isinstance(reference, str) else list(reference)
    for ref in references:
        problem = reference_problem(ref, match)
        if problem:
            raise InputError(f"{problem}; fix the reference in the query log")
    if match == "regex":
        # On the stripped answer, as the live cascade keeps it (`Step.answer`): a recorded
        # vote is raw text, and `^42$` must grade " 42\n" alike in the replay and live.
        return any(_compile(ref).search(answer.strip()) for ref in references)
    if match == "numeric":
        got = _pick_number(_segment(answer))
        if got is None:
            return False
        # In Decimal, not float: 9007199254740993 and ...992 are one float, and two equal
        # 400-digit numbers are both infinite, whose difference is NaN.
        return any(abs(got - _reference_number(ref)) <= _TOLERANCE for ref in references)
    canonical = normalize(answer, match)
    if not canonical:
        return False
    if match == "contains":
        padded = f" {canonical} "
        return any(f" {_reference_form(ref, match)} " in padded for ref in references)
    return any(canonical == _reference_form(ref, match) for ref in references)


# Cached: logs repeat the same few references ("A", "B", small numbers) many times.
@lru_cache(maxsize=4096)
def reference_problem(reference: str, match: str) -> str | None:
    """Why `reference` can never be matched under `match`, or None when it is usable.

    Query-log readers call this to reject a bad label at its line instead of grading
    every answer wrong later.
    """
    if match not in MATCH_TYPES:
        return _unknown_match(match)
    if match == "regex":
        try:
            _compile(reference)
        except (re.error, OverflowError, RecursionError) as exc:
            # Python's compiler raises more than re.error: a repeat over its limit
            # ("a{4294967296}") and a thousand nested groups got past here as tracebacks.
            return f"reference {reference!r} is not a valid regular expression ({exc or type(exc).__name__})"
        return None
    if match == "choice" and _read_letter(_segment(reference), anywhere=True)[1]:
        return (f"reference {reference!r} offers more than one option letter for match 'choice'; give "
                "several accepted answers as a list")
    if not _reference_form(reference, match):
        kind = {"choice": "option letter", "numeric": "number"}.get(match, "text")
        return f"reference {reference!r} holds no {kind} for match {match!r}"
    if match == "numeric" and len(_numbers(_segment(reference))) > 1:
        # "between 3 and 5" read as 3: an answer of 3 was graded right.
        return (f"reference {reference!r} holds more than one number for match 'numeric'; give the one "
                "number, or several accepted answers as a list")
    return None


@lru_cache(maxsize=4096)
def _reference_form(reference: str, match: str) -> str:
    # A reference is the answer itself, not a reply to pick one from: an exact reference is
    # its whole text ("apple\nbanana" must not match "apple", its first line).
    if match == "exact":
        text = _EMPHASIS.sub("", reference)
        lines = [line for line in text.splitlines() if line.strip()]
        items = _list_items(lines)
        # A list reads as its items, bullets dropped, as an answer's list does (`_first_line`).
        return _text(" ".join(items) if lines and len(items) == len(lines) else text)
    return normalize(reference, match)


@lru_cache(maxsize=4096)
def _reference_number(reference: str) -> Decimal:
    # reference_problem has already checked that the reference holds a number.
    value = _pick_number(_segment(reference))
    assert value is not None
    return value


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _unknown_match(match: object) -> str:
    return f"unknown match type {match!r}; use one of {', '.join(MATCH_TYPES)}"


def _segment(text: str) -> str:
    # NFKC: full-width forms ("（Ｂ）", "１，０００") read as their ASCII letters and digits.
    text = _EMPHASIS.sub("", unicodedata.normalize("NFKC", text)).replace("\u2212", "-")
    boxed = _BOXED.search(text)
    if boxed:
        return boxed.group(1).strip()
    marker = _MARKER.search(text)
    if marker:
        rest = text[marker.end():]
        line, _, after = rest.partition("\n")
        if line.strip():
            return line.strip()
        # Nothing after it on its line, but something before ("42 is the answer"): the marker
        # ended that answer, not began the next line's.
        start = text.rfind("\n", 0, marker.start()) + 1
        if text[start:marker.start()].strip():
            return text[start:marker.end()].strip()
        return _first_line(after) or _first_line(text)
    return _first_line(text)


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        lines = lines[1:]
    items = _list_items(lines)
    return " ".join(items) if items else lines[0].strip()


def _list_items(lines: Sequence[str]) -> list[str]:
    """The items of the run of list items ("- x", "1. x") that `lines` open with, bullets
    dropped; [] when the first line is no item."""
    items: list[str] = []
    for line in lines:
        item = _LIST_ITEM.match(line)
        if not item:
            break
        if not items and item.group("number") not in (None, "1"):
            # A numbered list begins at 1. "42. She had 40 and got 2 more." is a sentence
            # that opens with its answer; read as a list, its 42 was dropped for the 40.
            return []
        items.append(item.group("item").strip())
    return items


def _strip_wrapping(text: str) -> str:
    return text.strip().strip(_QUOTES).strip()


def _leading_letter(segment: str) -> str:
    segment = _strip_wrapping(segment)
    for pattern in _LEADING_LETTER:
        found = pattern.match(segment)
        if found:
            return found.group(1).upper()
    return ""


def _read_letter(segment: str, anywhere: bool) -> tuple[str, bool]:
    """The option letter `segment` is read by, a leading one (`_leading_letter`) or, with
    `anywhere`, else its first parenthesised one; and whether that letter is the first of two
    different letters offered together (`_HEDGE`), which name no one answer."""
    letter = _leading_letter(segment)
    if letter:
        found = _LEADING_HEDGE.match(_strip_wrapping(segment))
    else:
        first = _PAREN_LETTER.search(segment) if anywhere else None
        if first is None:
            return "", False
        letter, found = first.group(1).upper(), _HEDGE.match(segment, first.start())
    return letter, bool(found) and found.group(1).upper() != found.group(2).upper()


def _numbers(text: str) -> list[tuple[int, Decimal]]:
    """(start offset, value) of every number written in digits or words."""
    found = []
    for m in _NUMBER.finditer(text):
        value = _match_value(m, whole=False)
        if value is not None:
            found.append((m.start(), value))
    return found


def _match_value(m: re.Match[str], whole: bool) -> Decimal | None:
    if m.group("digits"):
        value = Decimal(_NOT_DIGITS.sub("", m.group("digits")))
        if m.group("den"):
            if not int(m.group("den")):
                return None  # "1/0" is no number
            value /= Decimal(m.group("den"))
        if m.group("scale"):
            value *= _SCALES[m.group("scale").lower()]
        return -value if m.group("neg") else value
    return _words_value(m.group("words"), whole)


def _pick_number(segment: str) -> Decimal | None:
    numbers = _numbers(segment)
    if not numbers:
        return None
    # A segment that opens with a number standing alone ("12, which is 3 more than 9.")
    # states it; the "is" rule below is for sentences that arrive at it ("The sum is 65").
    lead = _LEAD_NUMBER.match(segment)
    if lead and numbers[0][0] == lead.start("n"):
        return numbers[0][1]
    after_copula = [value for start, value in numbers if _COPULA.search(segment[:start])]
    return after_copula[-1] if after_copula else numbers[0][1]


def _whole_number(segment: str) -> Decimal | None:
    body = _strip_wrapping(segment).rstrip(" .!")
    m = _NUMBER.fullmatch(body)
    return _match_value(m, whole=True) if m else None


def _words_value(words: str, whole: bool) -> Decimal | None:
    """Value of the longest valid prefix of a run of number words.

    "one two" is two numbers, so parsing stops where a word cannot extend the number;
    with `whole`, a run that does not parse to its end is no number at all.
    """
    tokens = [t for t in re.split(r"[\s-]+", words.lower()) if t and t != "and"]
    sign = 1
    if tokens[0] in ("minus", "negative"):
        sign, tokens = -1, tokens[1:]
    total = current = 0
    last = ""  # kind of the previous word: "", small, tens, hundred or scale
    used = 0
    for token in tokens:
        fresh = current % 100 == 0 and last in ("", "hundred", "scale")
        if token in _SMALL:
            value = _SMALL[token]
            if not (fresh or (last == "tens" and 0 < value < 10)):
                break
            current += value
            last = "small"
        elif token in _TENS:
            if not fresh:
                break
            current += _TENS[token]
            last = "tens"
        elif token == "hundred":
            if last not in ("", "small", "tens") or current >= 100:
                break
            current = (current or 1) * 100
            last = "hundred"
        else:
            if last == "scale":
                break
            total += (current or 1) * _SCALES[token]
            current = 0
            last = "scale"
        used += 1
    if whole and used < len(tokens):
        return None
    return Decimal(sign * (total + current))


def _canonical(value: Decimal) -> str:
    if value == value.to_integral_value():
        # Not str(int(value)): Python refuses to write an int of over 4,300 digits, and a
        # query log's reference may hold one. "-0" is 0.
        return "0" if value == 0 else format(value.to_integral_value(), "f")
    return format(value.normalize(), "f")


def _text(text: str) -> str:
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text)).replace("\u2212", "-")
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = _LEADING_ANSWER.sub("", _strip_wrapping(text))
    out = []
    for i, ch in enumerate(text):
        if ch in "'\u2019":
            continue
        # A minus sign starting a number is part of it: "-5" is not "5". Other punctuation,
        # hyphens between words included, separates words.
        sign = ch == "-" and text[i + 1:i + 2].isdigit() and (i == 0 or not text[i - 1].isalnum())
        out.append(" " if unicodedata.category(ch).startswith("P") and not sign else ch)
    return " ".join("".join(out).split())
