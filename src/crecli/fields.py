"""Field-by-field checks of a JSON document that came from someone else.

A document whose checksum anyone can recompute, such as a router file's manifest, proves
nothing by its checksum: every value has to be checked for type and range, once, before
the rest of crecli trusts it. `Field` holds a value and where it sits (`quality.k`,
`clusters[3].model`), so each check is one line and a failure names the field:
`manifest field quality.k must be an integer from 1 to 64, got "x"`. The caller puts
the file's path and the fix in front and behind (`routerfile.load`).

`show` and `clean` make values and text from such a document safe to print.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, NoReturn, Sequence, TypeVar

from crecli.errors import CreError
from crecli.safejson import finite

MISSING: Any = object()  # the value of a field the document lacks
BIG = 2**53  # the largest integer every JSON reader keeps exact; no count comes near it
MAX_NAME_CHARS = 128
_T = TypeVar("_T")


class FieldError(CreError):
    """A field of the wrong type or range; the caller names the file. `unknown`: a field this
    crecli does not know, which a newer crecli may have written."""

    def __init__(self, message: str, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


def clean(text: str, limit: int = 200) -> str:
    """Text from a hostile file, safe for a terminal: non-printables escaped, shortened."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: Any, limit: int = 60) -> str:
    """A document's value for an error message: JSON, ASCII-only (so no terminal escapes), short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        value = value[: limit + 1]
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _span(kind: str, lo: float, hi: float) -> str:
    if hi >= BIG:
        return f"{kind} >= {lo}"
    return f"{kind} from {lo} to {hi}"


class Field:
    """A value of the document and where it sits (`quality.k`, `clusters[3].model`), so each
    field is checked in one line and an error names it.

    Messages call the document `document` and its top level `root`; a subclass for another
    kind of file names its own, and every field it hands out is of its class.
    """

    __slots__ = ("value", "where")
    document = "manifest"
    root = "body"

    def __init__(self, value: Any, where: str) -> None:
        self.value = value
        self.where = where

    def fail(self, want: str) -> NoReturn:
        if self.value is MISSING:
            raise FieldError(f"the {self.document} is malformed: field {self.where!r} is missing")
        raise FieldError(f"{self.document} field {self.where} must be {want}, got {show(self.value)}")

    def __getitem__(self, key: str) -> "Field":
        obj = self.as_object()
        return type(self)(obj.get(key, MISSING), f"{self.where}.{key}" if self.where else key)

    def has(self, key: str) -> bool:
        return key in self.as_object()

    def or_none(self, check: Callable[["Field"], _T]) -> _T | None:
        return None if self.value is None else check(self)

    def as_int(self, lo: int, hi: int = BIG) -> int:
        # bool is an int subclass: JSON true must not pass as 1.
        if type(self.value) is not int or not lo <= self.value <= hi:
            self.fail(_span("an integer", lo, hi))
        return self.value

    def as_float(self, lo: float, hi: float = math.inf, *, above: bool = False) -> float:
        value = finite(self.value)
        if value is None or not (value > lo if above else value >= lo) or value > hi:
            if hi == math.inf:
                self.fail(f"a finite number {'>' if above else '>='} {lo}")
            self.fail(f"a number {'>' if above else '>='} {lo} and <= {hi}")
        return value

    def as_bool(self) -> bool:
        if type(self.value) is not bool:
            self.fail("true or false")
        return self.value

    def as_str(self, max_chars: int = MAX_NAME_CHARS, *, choices: Sequence[str] | None = None,
               pattern: "re.Pattern[str] | None" = None, want: str = "", text: bool = False) -> str:
        """A string: non-empty, printable and at most `max_chars` long; `text` allows any
        characters (and empty), for prompts, which are escaped wherever they are printed."""
        value = self.value
        if choices is not None:
            if value not in choices or not isinstance(value, str):
                self.fail("one of " + ", ".join(json.dumps(c) for c in choices))
            return value
        ok = isinstance(value, str) and len(value) <= max_chars and (text or (value != "" and value.isprintable()))
        if ok and pattern is not None and not pattern.match(value):
            ok = False
        if not ok:
            self.fail(want or (f"a string of at most {max_chars} characters" if text
                               else f"a printable string of 1 to {max_chars} characters"))
        return value

    def as_list(self, max_items: int, min_items: int = 0) -> list["Field"]:
        if not isinstance(self.value, list) or not min_items <= len(self.value) <= max_items:
            self.fail(f"a list of {min_items} to {max_items} entries")
        return [type(self)(v, f"{self.where}[{i}]") for i, v in enumerate(self.value)]

    def as_object(self, keys: Sequence[str] | None = None, optional: Sequence[str] = (), max_items: int = 4096) -> dict[str, Any]:
        if not isinstance(self.value, dict) or len(self.value) > max_items:
            self.fail(f"an object of at most {max_items} fields")
        if keys is not None:
            for key in keys:
                if key not in self.value and key not in optional:
                    type(self)(MISSING, f"{self.where}.{key}" if self.where else key).fail("")
            unknown = sorted(set(self.value) - set(keys))
            if unknown:
                raise FieldError(
                    f"{self.document} field {self.where or self.root} has an unexpected field {show(unknown[0])}, "
                    "so this crecli did not write it", unknown=True
                )
        return self.value

    def items(self, max_items: int, pattern: "re.Pattern[str] | None" = None) -> list[tuple[str, "Field"]]:
        """An object's entries, keyed by names (model or array names) checked like `as_str`."""
        out = []
        for key, value in self.as_object(max_items=max_items).items():
            type(self)(key, f"{self.where} key").as_str(pattern=pattern, want="letters, digits or _" if pattern else "")
            out.append((key, type(self)(value, f"{self.where}[{show(key)}]")))
        return out
