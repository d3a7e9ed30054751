"""Waiting for a condition in a test: polled, with a generous deadline, never a fixed sleep."""

from __future__ import annotations

import time
from typing import Callable


def until(condition: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    """Poll `condition` until it holds; fail with `what` after `seconds`. The deadline is
    generous: what is waited for happens at once on the code under test, and never (or only
    when the test ends) on the wrong code, so only a broken behaviour reaches it, however
    slow or loaded the machine (a fixed sleep guesses how long a step takes, and a slow CI
    machine guesses wrong)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
