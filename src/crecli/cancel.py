"""Giving up on a request's work: the cancel scope a thread runs it in, and waits that honour it.

`cre serve` runs each request's cascade on a thread of its own. When the request gives up (its
client left, its timeout passed) the work should stop where it stands: a wait for a model or a
server slot ends, and a call to a remote rung's server is abandoned (its connection closed, so
the engine stops generating). The cascade code knows nothing of requests: the serve job opens
a `scope` on its thread with its `Token`, and the places that wait or call out ask `current()`.
Outside `cre serve` no scope is open, and nothing is ever cancelled.

The places that wait also say so (`waiting`), so that `cre serve`'s /health counts a job that
waits for a model, for memory or for a server's slot as queued, not as running.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from crecli.errors import CreError

# How often a wait looks at its token: a release wakes a waiter at once, so this bounds
# only how long a cancelled waiter takes to notice.
POLL_SECONDS = 0.05


class Cancelled(CreError):
    """The request this work was for gave up; nothing is left to answer."""


class Token:
    """A request's cancellation: `cancel()` sets it and runs the callbacks work registered
    (`on_cancel`: close a connection, drop a queued call) once. `deadline` (time.monotonic())
    is when the request gives up, where it has one: a remote call gets only the time left.
    Whoever cancels it says whether the deadline was why (`expired`), since the clock cannot:
    a client that left a moment before the deadline is handled after it has passed."""

    def __init__(self, deadline: float | None = None) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._expired = False
        self._waits = 0  # `waiting` blocks open on the work's thread
        self._callbacks: list[Callable[[], object]] = []
        self.deadline = deadline

    def cancel(self, expired: bool = False) -> None:
        """Give the work up; `expired`: because its deadline passed (else its client left,
        or the server is stopping). The first cancellation's cause stands."""
        with self._lock:
            if self._set:
                return
            self._set, self._expired = True, expired
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        with self._lock:
            return self._set

    def expired(self) -> bool:
        """The work was given up because its deadline passed, not for any other cause."""
        with self._lock:
            return self._expired

    def is_waiting(self) -> bool:
        """The work is waiting for a model, memory or a server's slot (`waiting`), not computing."""
        with self._lock:
            return self._waits > 0

    def _count_wait(self, step: int) -> None:
        with self._lock:
            self._waits += step

    def on_cancel(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Run `callback` when the token is cancelled (now, if it is); returns its remover."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


_local = threading.local()


@contextmanager
def scope(token: Token) -> Iterator[Token]:
    """Run the block with `token` as this thread's cancellation (`current`)."""
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield token
    finally:
        _local.token = previous


def current() -> Token | None:
    """The cancellation of the work this thread runs, when a `scope` is open."""
    return getattr(_local, "token", None)


def deadline() -> float | None:
    """The deadline (`time.monotonic`) of the work this thread runs, where `cre serve` set one."""
    token = current()
    return token.deadline if token is not None else None


@contextmanager
def waiting() -> Iterator[None]:
    """Count this thread's work as waiting for the block (for a model, for memory within the
    budget, for a server's slot), not computing: `cre serve`'s /health counts its job as
    queued meanwhile (`serve_worker.Worker.counts`). Nothing outside a `scope`."""
    token = current()
    if token is None:
        yield
        return
    token._count_wait(1)
    try:
        yield
    finally:
        token._count_wait(-1)


def check() -> None:
    """Raise `Cancelled` when this thread's work has been given up."""
    token = current()
    if token is not None and token.is_set():
        raise Cancelled("the request gave up")


class Gate:
    """At most `slots` holders at once, admitted first come, first served; a waiter whose
    request gives up (`check`) stops waiting. Waiting and holding are counted; a waiter's job
    is queued, not running, on /health (`waiting`)."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = max(1, slots)
        self._cond = threading.Condition()
        self._held = 0
        self._queue: deque[object] = deque()

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def acquire(self) -> None:
        me = object()
        with self._cond, waiting():
            self._queue.append(me)
            try:
                while self._queue[0] is not me or self._held >= self.slots:
                    self._cond.wait(POLL_SECONDS)
                    check()
            except BaseException:
                self._queue.remove(me)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._held += 1
            self._cond.notify_all()  # the next in line may fit too

    def release(self) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()

    @contextmanager
    def held_by_me(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
