"""Reading JSON that a stranger wrote, and writing text that may hold lone surrogates.

The one home of the rules every reader of outside JSON follows (query logs, `cre batch`
input, request bodies of `cre serve`, the served-query log):

- `loads` turns every way `json.loads` can fail into a `JsonError` whose message says
  what is wrong: bad JSON (with its column), nesting too deep for Python's parser (a
  RecursionError, not a crash), and integers longer than Python converts (CVE-2020-10735);
  and it refuses lone surrogates, which JSON's `\\ud800` escape decodes to and which no
  UTF-8 output (a result line, the router file, the outcome store) can hold, and a key
  given twice in one object. A server's reply is read with `strict=False`: only what
  cannot be read at all is refused there, as a valid reply must not take a healthy server
  out (a remote rung mends the answer's text it reads, `models.openai._text`).
- `has_surrogate` and `replace_surrogates` test and mend text that came from elsewhere (a
  model's answer, a file name with undecodable bytes) before it is written as UTF-8.
- `json_type` names a JSON value's type in error messages.
- `finite` reads a JSON number as a float, where `math.isfinite` would raise on an
  integer past float's range (JSON has no limit, and Python reads up to 4,300 digits).

Only the standard library is imported here: `cre ask` reaches this module on every call.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

# A lone surrogate: what Python holds for JSON's `\ud800` escape or for an undecodable byte
# (surrogateescape); no UTF-8 text can hold one.
SURROGATE = re.compile("[\ud800-\udfff]")


class JsonError(ValueError):
    """JSON text that cannot be read safely; the message says why, the caller says where."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's `object_pairs_hook` that refuses a key given twice in one object: `json.loads`
    keeps the last silently, so `{"reference": "A", "reference": "B"}` lost an answer, and
    a shared file could show one value to another reader and a different one to cre."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonError(f"the key {key!r} appears twice in one object; keep one")
        out[key] = value
    return out


def loads(text: str | bytes, what: str, strict: bool = True) -> Any:
    """`json.loads` whose every failure is a JsonError starting with `what`, whose objects
    give each key once (`unique_keys`), and whose strings are all valid Unicode. Bytes are
    decoded as `json.loads` decodes them (UTF-8, -16 or -32).

    `strict` False (a server's reply, which cre does not check but reads): a key given twice
    keeps its last value and a lone surrogate stays, as `json.loads` has them; only JSON that
    cannot be read (bad, nested too deeply, a number too long) is a JsonError."""
    try:
        value = json.loads(text, object_pairs_hook=unique_keys if strict else None)
    except JsonError as exc:
        raise JsonError(f"{what} ({exc})") from None
    except json.JSONDecodeError as exc:
        raise JsonError(f"{what} ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise JsonError(f"{what} (nested too deeply to read); flatten it") from None
    except UnicodeDecodeError as exc:  # bytes only
        raise JsonError(f"{what} (not valid {exc.encoding} text at byte {exc.start + 1})") from None
    except ValueError:
        # Python refuses to convert longer integers (CVE-2020-10735); no real id or answer is one.
        raise JsonError(
            f"{what} (a number longer than {sys.get_int_max_str_digits():,} digits); quote it as a string"
        ) from None
    if strict:
        check_unicode(value)
    return value


def check_unicode(value: Any) -> None:
    """Refuse lone surrogates: JSON's `\\ud800` escape decodes to one, and writing it anywhere
    as UTF-8 (a result line, the router file, the outcome store) fails later."""
    # A loop, not recursion: anything json.loads returned must be checkable.
    stack: list[tuple[Any, Any]] = [(value, None)]
    while stack:
        item, top = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                stack.append((key, key if top is None else top))
                stack.append((inner, key if top is None else top))
        elif isinstance(item, list):
            stack.extend((inner, top) for inner in item)
        elif isinstance(item, str) and (found := SURROGATE.search(item)):
            where = "" if top is None else f" in {top!r}"
            raise JsonError(
                f"lone surrogate \\u{ord(found.group()):04x}{where} is not valid Unicode; "
                "pair it or remove it"
            )


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate, and so cannot be written as UTF-8."""
    return SURROGATE.search(text) is not None


def replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate made U+FFFD, so that it can be written as UTF-8.

    In JSON text made with `ensure_ascii=False`, everything outside string literals is
    ASCII, so the result is still valid JSON.
    """
    return SURROGATE.sub("\ufffd", text)


def finite(value: Any) -> float | None:
    """`value` as a float where it is a finite JSON number; else None: a boolean, a string,
    NaN, infinity, or an integer too large for a float (`math.isfinite(10**400)` raises
    OverflowError, which a reader of a stranger's JSON must not let out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def json_type(value: Any) -> str:
    """A JSON value's type in words, for error messages about logs and request bodies."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
