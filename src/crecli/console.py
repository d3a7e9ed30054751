"""Rich consoles: stdout carries data, stderr carries progress and status."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Iterator
from contextlib import contextmanager

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

_out: "Console | None" = None
_err: "Console | None" = None


def out() -> "Console":
    global _out
    if _out is None:
        from rich.console import Console

        _out = Console(soft_wrap=True)
        if not _out.is_terminal and "COLUMNS" not in os.environ:
            # Piped tables are read by people too (in logs, `| less`): don't squash them to 80.
            _out = Console(soft_wrap=True, width=160)
    return _out


def err() -> "Console":
    global _err
    if _err is None:
        from rich.console import Console

        _err = Console(stderr=True, soft_wrap=True)
    return _err


def status(message: str) -> None:
    """A line of progress or status, on stderr."""
    err().print(message, highlight=False)


def warn(message: str) -> None:
    err().print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, no wrapping."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(transient: bool = True) -> Iterator["Progress"]:
    """A progress bar on stderr; Rich hides it itself when stderr is not a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err(),
        transient=transient,
        disable=not err().is_terminal,
    ) as bar:
        yield bar
