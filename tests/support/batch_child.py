"""`cre batch` in a process of its own on the fake ladder, for what a test process cannot
share: a signal that would kill it, or a real stdout.

`batch_child(stop, args, stdout)` runs `cre batch ARGS` through `cli.main()`; the rungs answer
from `support.prompts.TABLE`, except that the medium rung, where `stop` names a signal
("SIGTERM"), sends it to its own process instead of answering. With `hang_up`, the child's
stderr is a terminal (a pty) that closes as the signal is sent, as when the ssh session that
ran the batch ends: every write to it fails (EIO) from then on. Until then a thread of the
child reads the terminal, as a terminal emulator would: unread, its small queue (macOS) could
block a drawing of the progress bar, which holds Rich's console lock, and the batch with it.

Rich's choice of a terminal is pinned, whatever the test's environment says (FORCE_COLOR,
TTY_COMPATIBLE, TERM=dumb): with `hang_up` the live bar, which the child checks (exit
`NOT_LIVE` otherwise), else plain progress lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Callable

# The child's copy of the terminal's master side, which it closes before signalling itself.
_TERMINAL_FD = "CRE_TEST_BATCH_CHILD_TERMINAL_FD"
# The child's exit code where its stderr was meant to be Rich's live terminal and is not.
NOT_LIVE = 70
# What Rich reads, besides isatty, to tell a terminal (and a Jupyter notebook) from the rest.
_RICH_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM", "DATABRICKS_RUNTIME_VERSION")


def _environment(added: dict[str, str], terminal: bool) -> dict[str, str]:
    """The test's environment with `added`, and Rich left to go by isatty alone: a terminal
    that is not a dumb one where `terminal`."""
    env = {name: value for name, value in os.environ.items() if name not in _RICH_TERMINAL_ENV}
    if terminal:
        env["TERM"] = "xterm-256color"
    return {**env, **added}


def batch_child(stop: str | None, args: list[str], stdout: IO[str] | int = subprocess.PIPE,
                timeout: float = 120, hang_up: bool = False, stderr: IO[str] | int = subprocess.PIPE,
                env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """The finished child: its exit code (negative for a signal that killed it), stdout where
    it was a pipe, and stderr where it was one ("" with `hang_up`: the terminal took it, and
    is gone). `env` is added to the test's environment."""
    command = [sys.executable, __file__, stop or "", *args]
    if not hang_up:
        return subprocess.run(command, stdout=stdout, stderr=stderr, text=True, timeout=timeout,
                              env=_environment(env or {}, terminal=False))
    master, slave = os.openpty()
    try:
        # Only the child holds the master from here, so its close hangs the terminal up.
        child = subprocess.Popen(command, stdout=stdout, stderr=slave, text=True, pass_fds=(master,),
                                 env=_environment({**(env or {}), _TERMINAL_FD: str(master)}, terminal=True))
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
    hang_up = _read_until_hung_up(int(terminal)) if terminal else None

    def stopped(text: str, params: GenParams) -> str:
        if hang_up is not None:
            from crecli.console import err

            if not (err().is_terminal and not err().is_dumb_terminal):  # the live bar's test (rich.live)
                os._exit(NOT_LIVE)
            hang_up()
        os.kill(os.getpid(), getattr(signal, stop))
        raise AssertionError(f"{stop} did not stop the batch")

    answers = {m: scripted(TABLE.get(m, {})) for m in ("small", "medium", "large")}
    if stop:
        answers["medium"] = stopped
    registry.make_backend = lambda spec: FakeBackend(spec, answers[spec.name])  # type: ignore[assignment]
    registry.reports_signals = lambda spec: False  # type: ignore[assignment]
    sys.argv = ["cre", "batch", *sys.argv[2:]]
    cli.main()


def _read_until_hung_up(master: int) -> Callable[[], None]:
    """Read the terminal's `master` side in a thread, as a terminal emulator would, until the
    returned call, which closes it: the terminal hangs up. Only that thread touches `master`,
    so no read of it blocks the close."""
    import select
    import threading

    closing = threading.Event()

    def read() -> None:
        try:
            while not closing.is_set():
                if select.select([master], [], [], 0.05)[0]:
                    os.read(master, 1 << 16)
        except OSError:  # the terminal has no other side left (EIO): nothing more to read
            pass
        finally:
            os.close(master)

    reader = threading.Thread(target=read, name="terminal-reader", daemon=True)
    reader.start()

    def hang_up() -> None:
        closing.set()
        reader.join()

    return hang_up


if __name__ == "__main__":
    _main()
