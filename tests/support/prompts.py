"""Prompts, vote tables and canned traces shared by the batch, serve and log tests.

A vote table is {model: {prompt: votes}} for `support.ladder.install`; the prompts fall in
the topics router's clusters (`support.routers.make_router`).
"""

from __future__ import annotations

import json
from typing import Any

from crecli.escalate import Trace
from support.routers import FAR

ADD = "What is 7 plus 5?"
HARD = "What is 8 plus 9?"  # small disagrees with itself: escalates to medium
PERU = "What is the capital city of Peru?"
FRUIT = "Which of these is a fruit? (A) stone (B) fruit-like thing (C) chair"

# The batch tests' table: ADD and FRUIT settle on small, HARD escalates to medium, PERU
# starts on medium, FAR goes to the fallback, large.
TABLE = {
    "small": {ADD: ["12"] * 5, HARD: ["17", "16", "15", "14", "13"], FRUIT: ["(B)"] * 5},
    "medium": {PERU: ["Lima"] * 5, HARD: ["17"] * 5},
    "large": {FAR: ["?"] * 5},
}
# Each rung sure of the prompt its cluster starts it on: ADD on small, PERU on medium.
SURE_TABLE = {"small": {ADD: ["12"] * 5}, "medium": {PERU: ["Lima"] * 5}}


def jl(**fields: Any) -> bytes:
    """One JSON line of a batch input or query log."""
    return (json.dumps(fields) + "\n").encode()


# A batch input of every kind of line: answered, bad JSON, no prompt, bad UTF-8, blank,
# plain text, far from every cluster.
MIXED = [
    jl(id="a1", prompt=ADD, reference=["12"], match="numeric"),
    b"{not json\n",
    jl(id="x", text="no prompt field"),
    b"\xff\xfe\n",
    b"\n",
    (PERU + "\n").encode(),
    jl(id="far", prompt=FAR),
]


def trace(answer: str = "12", model: str = "small", cluster: int = 0) -> Trace:
    """A one-rung trace, as the served-query log records it."""
    return Trace(id=None, cluster=cluster, distance=0.1, route_reason="nearest cluster", route_seconds=0.001,
                 answer_type="numeric", start_model="small", answer=answer, model=model, agreement=1.0)
