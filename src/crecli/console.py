"""Rich consoles: stdout carries data, stderr carries progress and status."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

# Seconds between plain progress lines when stderr is not a terminal (nohup, CI, `2> log`).
PROGRESS_INTERVAL_ENV = "CRE_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0

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
    """The console on stderr. A stderr that cannot take a write because its reader left (a
    broken pipe: `cre batch in.jsonl > answers.jsonl 2> >(grep -m1 x)`) is dropped: pointed
    at /dev/null, and the command carries on, its stdout and exit code its own."""
    global _err
    if _err is None:
        from rich.console import Console

        class StderrConsole(Console):
            def on_broken_pipe(self) -> None:
                # Rich's own, made for a console on stdout, points *stdout* at /dev/null and
                # exits 1: a batch's progress line sent its answers file there, answers lost.
                to_devnull(self.file)

        _err = StderrConsole(stderr=True, soft_wrap=True)
    return _err


def to_devnull(stream: "TextIO | None") -> None:
    """Point `stream`'s file descriptor at /dev/null, where writes and flushes succeed."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[union-attr]
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor behind it (a test's buffer)
        pass


# What a terminal acts on: C0 controls but newline and tab, DEL, C1 controls, the line
# separators, the bidi overrides that reorder what is shown, and lone surrogates (which
# cannot even be encoded). A router file comes from someone else, and messages quote log lines, field
# names and servers' replies: shown with these escaped, they cannot recolour, retitle or
# rewrite the reader's terminal (`status`, `warn` and cre's error line all pass through it).
_TERMINAL_ESCAPES = {
    c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
    for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029,
              *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000))
}


def terminal_safe(text: str) -> str:
    """`text` with terminal control characters shown as escapes (`\\x1b`), not acted on."""
    return text.translate(_TERMINAL_ESCAPES)


def status(message: str) -> None:
    """A line of progress or status, on stderr.

    Printed without markup: messages quote user text (log lines, prompts, file names), and
    `[/]` in a skipped log line must not be read as a Rich tag, nor their control characters
    act on the terminal (`terminal_safe`).
    """
    err().print(terminal_safe(message), highlight=False, markup=False)


def warn(message: str) -> None:
    from rich.text import Text

    err().print(Text.assemble(("Warning:", "yellow"), " ", terminal_safe(message)), highlight=False)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, no wrapping.

    ASCII-only: text from router files and logs may hold C1 controls or bidi overrides,
    which JSON leaves raw otherwise and a terminal would act on. A figure that cannot be
    computed is null, never NaN or Infinity, which are not JSON and which strict parsers
    (jq among them) refuse.
    """
    sys.stdout.write(strict_json(data, indent=2, ensure_ascii=True, default=str) + "\n")
    sys.stdout.flush()


def utf8_stdout() -> None:
    """Write stdout as UTF-8 whatever the locale says: JSON text exchanged between systems is
    UTF-8 (RFC 8259), and `cre batch` writes its records' text as is (`ensure_ascii=False`),
    so a Latin-1 locale's stdout failed to encode the first answer outside Latin-1 and the
    run ended in a traceback. A stream that cannot be reconfigured (a test's) is left as it is."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.flush()
        sys.stdout.reconfigure(encoding="utf-8")


def strict_json(data: Any, **dumps: Any) -> str:
    """`data` as the JSON text every crecli output writes (`json.dumps` with `dumps`): a float
    that is not finite is null (`without_nan`), since NaN and Infinity are not JSON."""
    return json.dumps(without_nan(data), allow_nan=False, **dumps)


def without_nan(data: Any) -> Any:
    """`data` with every float that is not finite replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: without_nan(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [without_nan(value) for value in data]
    return data


def progress_interval() -> float:
    """Seconds between plain progress lines: CRE_PROGRESS_INTERVAL, else 30."""
    value = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        # Read when a long loop starts, often after minutes of work: a typo must not end the run.
        warn(f"{PROGRESS_INTERVAL_ENV}={value!r} is not a number of seconds >= 0; using {DEFAULT_PROGRESS_INTERVAL:g}")
        return DEFAULT_PROGRESS_INTERVAL
    return seconds


@contextmanager
def progress(
    transient: bool = True,
    *,
    interval: float | None = None,
    clock: Callable[[], float] | None = None,
) -> Iterator["Progress"]:
    """Progress on stderr: Rich's bars on a terminal, plain lines everywhere else.

    Rich draws nothing when stderr is not a terminal, so under nohup or in CI a 40-minute
    loop would be silent until it ends. There a line such as
    `gemma-3-270m: 120/299 queries, 2.1/s, about 1m25s left` goes out every `interval`
    seconds (default: CRE_PROGRESS_INTERVAL, else 30), and one more when the task
    completes. Loops shorter than the interval print nothing, so quick commands keep a
    clean stderr. Pass `unit="queries"` (or "bytes") to `add_task` to name what is counted.
    `clock` replaces the time source (tests).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    if err().is_terminal:
        with Progress(*columns, console=err(), transient=transient, get_time=clock) as bar:
            yield bar
        return
    plain = _plain_progress_class()(
        *columns,
        interval=progress_interval() if interval is None else interval,
        console=err(),
        disable=True,  # the bars; the plain lines are this class's own
        get_time=clock,
    )
    with plain as bar:
        yield bar


_PLAIN: Any = None


def _plain_progress_class() -> Any:
    """PlainProgress, built on first use so that importing this module imports no Rich."""
    global _PLAIN
    if _PLAIN is not None:
        return _PLAIN
    from rich.progress import Progress, TaskID

    class PlainProgress(Progress):
        """Rich's Progress with its display off, reporting plain lines through `status`."""

        def __init__(self, *columns: Any, interval: float, **kwargs: Any) -> None:
            super().__init__(*columns, **kwargs)
            self.interval = interval
            self._last_line: dict[TaskID, float] = {}  # when the task's last line went out
            self._lines: dict[TaskID, int] = {}
            self._closed: set[TaskID] = set()

        def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
            task_id = super().add_task(*args, **kwargs)
            self._last_line[task_id] = self.get_time()
            self._lines[task_id] = 0
            return task_id

        def advance(self, task_id: TaskID, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._report(task_id)

        def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
            super().update(task_id, **kwargs)
            self._report(task_id)

        def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
            if exc_type is None:
                # Tasks without a total never finish by themselves: close them here.
                for task_id in list(self._lines):
                    self._close(task_id)
            super().__exit__(exc_type, exc_val, exc_tb)

        def _report(self, task_id: TaskID) -> None:
            if task_id in self._closed:
                return
            task = self._tasks[task_id]
            if task.finished:
                self._close(task_id)
                return
            now = self.get_time()
            if now - self._last_line[task_id] >= self.interval:
                self._last_line[task_id] = now
                self._lines[task_id] += 1
                status(_running_line(task))

        def _close(self, task_id: TaskID) -> None:
            if task_id in self._closed:
                return
            self._closed.add(task_id)
            task = self._tasks[task_id]
            # A loop short enough to print no line while running needs no closing line either.
            if self._lines[task_id] or (task.elapsed or 0.0) >= self.interval:
                status(_done_line(task))

    _PLAIN = PlainProgress
    return _PLAIN


def _running_line(task: Any) -> str:
    """e.g. `gemma-3-270m: 120/299 queries, 2.1/s, about 1m25s left`."""
    unit = task.fields.get("unit", "")
    elapsed = task.elapsed or 0.0
    rate = task.completed / elapsed if elapsed > 0 else 0.0
    if task.total is None:
        line = f"{task.description}: {_amount(task.completed, unit)} so far"
    else:
        line = f"{task.description}: {_amount(task.completed, unit, task.total)}"
    if rate > 0:
        line += f", {_rate(rate, unit)}"
        if task.total is not None:
            line += f", about {_duration((task.total - task.completed) / rate)} left"
    elif task.completed == 0:
        line += f", none done in {_duration(elapsed)}"
    return line


def _done_line(task: Any) -> str:
    """e.g. `gemma-3-270m: 299/299 queries in 40m12s`."""
    unit = task.fields.get("unit", "")
    elapsed = task.finished_time if task.finished_time is not None else (task.elapsed or 0.0)
    if task.total is None:
        return f"{task.description}: {_amount(task.completed, unit)} in {_duration(elapsed)}"
    return f"{task.description}: {_amount(task.completed, unit, task.total)} in {_duration(elapsed)}"


def _amount(done: float, unit: str, total: float | None = None) -> str:
    if unit == "bytes":
        text = f"{done / 1e6:.0f}" if total is None else f"{done / 1e6:.0f}/{total / 1e6:.0f}"
        return text + " MB"
    text = _count(done) if total is None else f"{_count(done)}/{_count(total)}"
    return f"{text} {unit}" if unit else text


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _rate(per_second: float, unit: str) -> str:
    if unit == "bytes":
        return f"{per_second / 1e6:.1f} MB/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    return f"{1 / per_second:.1f} s each"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
