"""`cre batch` in a process of its own on the fake ladder, for what a test process cannot
share: a signal that would kill it, or a real stdout.

`batch_child(stop, args, stdout)` runs `cre batch ARGS` through `cli.main()`; the rungs answer
from `support.prompts.TABLE`, except that the medium rung, where `stop` names a signal
("SIGTERM"), sends it to its own process instead of answering.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO


def batch_child(stop: str | None, args: list[str], stdout: IO[str] | int = subprocess.PIPE,
                timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    """The finished child: its exit code (negative for a signal that killed it), stdout where
    it was a pipe, and stderr."""
    return subprocess.run([sys.executable, __file__, stop or "", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def _main() -> None:
    import os
    import signal

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `support`
    from crecli import cli
    from crecli.models import registry
    from crecli.models.backend import GenParams
    from crecli.models.fake import FakeBackend
    from support.ladder import scripted
    from support.prompts import TABLE

    stop = sys.argv[1]
    # As in a terminal, though the tests may run under nohup (SIGHUP ignored, and inherited).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def stopped(text: str, params: GenParams) -> str:
        os.kill(os.getpid(), getattr(signal, stop))
        raise AssertionError(f"{stop} did not stop the batch")

    answers = {m: scripted(TABLE.get(m, {})) for m in ("small", "medium", "large")}
    if stop:
        answers["medium"] = stopped
    registry.make_backend = lambda spec: FakeBackend(spec, answers[spec.name])  # type: ignore[assignment]
    registry.reports_signals = lambda spec: False  # type: ignore[assignment]
    sys.argv = ["cre", "batch", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":
    _main()
