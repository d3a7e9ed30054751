"""`cre batch` in a process of its own on the fake ladder, for what a test process cannot
share: a signal that would kill it, or a real stdout.

`batch_child(stop, args, stdout)` runs `cre batch ARGS` through `cli.main()`; the rungs answer
from `support.prompts.TABLE`, except that the medium rung, where `stop` names a signal
("SIGTERM"), sends it to its own process instead of answering. With `hang_up`, the child's
stderr is a terminal (a pty) that closes as the signal is sent, as when the ssh session that
ran the batch ends: every write to it fails (EIO) from then on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

# The child's copy of the terminal's master side, which it closes before signalling itself.
_TERMINAL_FD = "CRE_TEST_BATCH_CHILD_TERMINAL_FD"


def batch_child(stop: str | None, args: list[str], stdout: IO[str] | int = subprocess.PIPE,
                timeout: float = 120, hang_up: bool = False, stderr: IO[str] | int = subprocess.PIPE,
                env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """The finished child: its exit code (negative for a signal that killed it), stdout where
    it was a pipe, and stderr where it was one ("" with `hang_up`: the terminal took it, and
    is gone). `env` is added to the test's environment."""
    command = [sys.executable, __file__, stop or "", *args]
    if not hang_up:
        return subprocess.run(command, stdout=stdout, stderr=stderr, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    master, slave = os.openpty()
    try:
        # Only the child holds the master from here, so its close hangs the terminal up.
        child = subprocess.Popen(command, stdout=stdout, stderr=slave, text=True, pass_fds=(master,),
                                 env={**os.environ, _TERMINAL_FD: str(master)})
    finally:
        os.close(slave)
        os.close(master)
    try:
        child.wait(timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(command, child.returncode, None, "")


def _main() -> None:
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

    terminal = os.environ.get(_TERMINAL_FD)

    def stopped(text: str, params: GenParams) -> str:
        if terminal:
            os.close(int(terminal))  # the terminal hangs up
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
