"""A remote rung's servers: which one takes a request, how many it holds, and which are out.

A rung names one server (`url`) or several serving the same model (`urls`). Every backend
of the rung in this process shares one `ReplicaSet` (`replica_set`), so the bounds and the
health it keeps are the process's:

- a request goes to the least busy healthy replica (fewest requests in flight; ties to the
  one listed first), and waits, first come first served (`acquire`), while every healthy
  replica holds `max_in_flight` requests, so no server is flooded;
- a replica that refuses the connection, times out, breaks a reply off, fails a stream,
  answers 5xx or does not serve the rung (a redirect, 401, 403, 404, 405, a reply that is
  no completion) is taken out for a back-off (1 s, doubling with each failure in a row, at
  most 30 s), and the request is tried on another; 429 and 503 take it out for their
  Retry-After, at most `MAX_RETRY_WAIT` (a server that asks for a day is not out for a
  day: /health would call the rung down, and clients be told to come back tomorrow);
- when every replica is out, a request waits for one whose server asked it to (a
  Retry-After of at most `MAX_RETRY_WAIT`) if its time allows; else it tries the first due
  back of those out for a back-off (a server that is back is found at once). A server that
  asked for quiet longer than the request has is not sent more before it said, and when
  every one asked so the request fails at once, that Retry-After passed on (back-pressure).
  An answer to a request sent before the server asked does not end the wait it asked for;
- a replica whose back-off has passed is tried again by the next request (its success puts
  it back for good), one request at a time while a healthy replica has room: a server that
  hangs holds one request for its timeout, not every one that came meanwhile. Until one of
  its requests succeeds it is reported out (`state`, `up`): a passed back-off is no news
  that its server is back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from crecli import cancel

if TYPE_CHECKING:
    from crecli.config import ModelSpec

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# The longest Retry-After honoured: waited for, and kept out of rotation for. A server that
# asks for more is out this long (not a day: /health would call the rung down).
MAX_RETRY_WAIT = 60.0
DEFAULT_MAX_IN_FLIGHT = 16


@dataclass
class Replica:
    url: str  # the API root, without a trailing slash
    in_flight: int = 0
    out_until: float = 0.0  # time.monotonic(); out of rotation until then
    failures: int = 0  # in a row, for the back-off
    last_error: str = ""
    served: int = 0
    asked: bool = False  # out because its server asked (a Retry-After), not for a back-off
    asked_long: bool = False  # and for longer than `MAX_RETRY_WAIT`: refused, never waited for
    trial: bool = False  # a request tries it again after its back-off (it failed, and has not answered since)

    @property
    def healthy(self) -> bool:
        """Whether its last request did not fail (or it has had none). A replica past its
        back-off is tried again, but is not known to be back until it answers: /health
        flipping to "up" on a timer would call a dead server healthy."""
        return self.failures == 0

    def state(self, now: float) -> str:
        """What /health shows: "up", "out: why (back in N s)" while it is out of rotation, or
        "out: why (the next request tries it)" once its back-off has passed."""
        if self.healthy:
            return "up"
        if self.out_until > now:
            return f"out: {self.last_error} (back in {self.out_until - now:.0f} s)"
        return f"out: {self.last_error} (the next request tries it)"


class ReplicaSet:
    """The replicas of one rung, with `max_in_flight` requests each at most."""

    def __init__(self, name: str, urls: Sequence[str], max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.name = name
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.max_in_flight = max(1, max_in_flight)
        self._cond = threading.Condition()
        # Requests waiting for a slot, in arrival order, each with the replicas it may not use.
        self._waiting: list[tuple[object, frozenset[str]]] = []

    @property
    def capacity(self) -> int:
        """Requests the rung takes at once when every replica is up."""
        return self.max_in_flight * len(self.replicas)

    def acquire(self, exclude: frozenset[str] = frozenset(), wait_until: float | None = None) -> Replica | None:
        """The least busy healthy replica not in `exclude`, its slot taken; None when none is
        left to try. A replica past its back-off counts among them, but takes one request at
        a time (`Replica.trial`) while a healthy one has a free slot. Waits while every usable
        replica is full, first come first served: a free slot goes to the earliest waiter
        that may use it (one that excludes it does not hold up those behind). When all are
        out: waits for the first due back if its server asked for the wait and it ends in
        time (`waits_for` `wait_until`, time.monotonic()); else the first due back of those
        out for a back-off, tried now; None where every one asked for a wait that does not
        end in time (back-pressure: none is sent more before it said)."""
        me, queued = object(), False
        # A job waiting here for a slot or a server computes nothing: queued, not running, on /health.
        with self._cond, cancel.waiting():
            try:
                while True:
                    now = time.monotonic()
                    usable = [r for r in self.replicas if r.url not in exclude]
                    if not usable:
                        return None
                    up = [r for r in usable if r.out_until <= now]
                    if not up:
                        soonest = min(usable, key=lambda r: r.out_until)
                        if self._waits_for(soonest, wait_until):
                            self._cond.wait(min(cancel.POLL_SECONDS, max(0.0, soonest.out_until - now)))
                            cancel.check()
                            continue
                        # Servers that asked for quiet longer than this request has are not
                        # sent more; one out for a back-off is tried, the first due back.
                        backed_off = [r for r in usable if not r.asked]
                        if not backed_off:
                            return None
                        up = [min(backed_off, key=lambda r: r.out_until)]
                    free = [r for r in up if r.in_flight < self.max_in_flight]
                    if any(r.healthy for r in free):
                        # A replica on trial takes one request at a time while a healthy one
                        # has room: being least busy, it took every request that came until
                        # its trial ended, each waiting the whole timeout on a hung server.
                        free = [r for r in free if r.healthy or not r.trial]
                    if free and not self._ahead_of(me, free):
                        best = min(free, key=lambda r: r.in_flight)  # min keeps the first of equals
                        best.in_flight += 1
                        best.trial = not best.healthy
                        return best
                    if not queued:
                        self._waiting.append((me, exclude))
                        queued = True
                    self._cond.wait(cancel.POLL_SECONDS)  # a release wakes it at once
                    cancel.check()
            finally:
                if queued:
                    self._waiting = [w for w in self._waiting if w[0] is not me]
                    self._cond.notify_all()  # the next in line may take a slot now

    def waits_for(self, replica: Replica, wait_until: float | None) -> bool:
        """Whether a request that may wait until `wait_until` (time.monotonic(); None: not at
        all) waits for `replica` to be back, rather than trying it (or another) now: its
        server asked for the wait (a Retry-After honoured), and the wait ends in time."""
        with self._cond:
            return self._waits_for(replica, wait_until)

    @staticmethod
    def _waits_for(replica: Replica, wait_until: float | None) -> bool:
        return (replica.asked and not replica.asked_long and wait_until is not None
                and replica.out_until <= wait_until)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        with self._cond:
            return len(self._waiting)

    def _ahead_of(self, me: object, free: Sequence[Replica]) -> bool:
        """Whether a request that began waiting before `me` may use one of the `free` replicas."""
        for waiter, excluded in self._waiting:
            if waiter is me:
                return False
            if any(r.url not in excluded for r in free):
                return True
        return False

    def release(self, replica: Replica, failure: str | None = None, out_for: float | None = None) -> None:
        """Give back `replica`'s slot: it answered (`failure` None), or it failed and is out for
        `out_for` seconds (its Retry-After, at most `MAX_RETRY_WAIT`) or its back-off."""
        with self._cond:
            replica.in_flight -= 1
            # A slot does not say which request held it: any slot given back ends a trial (at
            # worst, a request sent before the failure lets a second try go out early).
            replica.trial = False
            if failure is None:
                replica.served += 1
                now = time.monotonic()
                # While the wait its server asked for lasts, no request is sent to it (`acquire`):
                # this one was in flight before it asked, and its answer neither ends that wait
                # (the server said when to send more) nor clears the failure that set it.
                if not (replica.asked and replica.out_until > now):
                    replica.failures = 0
                    if replica.out_until > now:
                        replica.out_until = 0.0  # an answer is better news than an old failure
            else:
                replica.failures += 1
                replica.last_error = failure
                if out_for is not None:
                    wait = min(out_for, MAX_RETRY_WAIT)
                else:
                    wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (replica.failures - 1))
                until = time.monotonic() + wait
                if until >= replica.out_until:  # this failure sets when it is back, and why
                    replica.out_until = until
                    replica.asked = out_for is not None  # its server asked: not sent more before it said
                    replica.asked_long = out_for is not None and out_for > MAX_RETRY_WAIT
                # Else an earlier, longer wait stands, with its reason: a timeout of a request
                # already in flight does not turn a server's asked-for quiet into a back-off.
            self._cond.notify_all()

    def abandon(self, replica: Replica) -> None:
        """Give back `replica`'s slot after a try that says nothing of its server: the request
        gave up (cancelled, or out of its own time) or was refused by policy. Neither an
        answer (which would put a replica that never answered back in rotation) nor a
        failure."""
        with self._cond:
            replica.in_flight -= 1
            replica.trial = False  # as in `release`
            self._cond.notify_all()

    def states(self) -> dict[str, str]:
        now = time.monotonic()
        with self._cond:
            return {r.url: r.state(now) for r in self.replicas}

    def up(self) -> int:
        """Replicas whose last request did not fail (`Replica.healthy`)."""
        with self._cond:
            return sum(r.healthy for r in self.replicas)

    def back_in(self) -> float:
        """Seconds until the first replica is back in rotation (0 when one is now): when a
        request that every replica failed is worth sending again."""
        now = time.monotonic()
        with self._cond:
            return max(0.0, min(r.out_until for r in self.replicas) - now)

    def in_rotation(self) -> int:
        """Replicas the next request may try: up, or past their back-off. /health's status
        counts these, so a rung whose servers all failed once is not reported unusable for
        good: a load balancer that stopped sending on a 503 would bring no request to try
        them again."""
        now = time.monotonic()
        with self._cond:
            return sum(r.out_until <= now for r in self.replicas)


# id(spec) -> (spec, its set): one set per loaded spec, the spec kept so its id is not reused.
_SETS: dict[int, tuple[object, ReplicaSet]] = {}
_SETS_LOCK = threading.Lock()


def replica_set(spec: "ModelSpec") -> ReplicaSet:
    """The one `ReplicaSet` of a remote rung's spec (as models.toml was loaded), shared by
    every backend built from it: `cre serve`'s pool and the probes alike."""
    with _SETS_LOCK:
        found = _SETS.get(id(spec))
        if found is None or found[0] is not spec:
            found = _SETS[id(spec)] = (spec, ReplicaSet(spec.name, spec.urls, spec.max_in_flight or DEFAULT_MAX_IN_FLIGHT))
        return found[1]


def forget() -> None:
    """Forget every rung's health and counts (tests)."""
    with _SETS_LOCK:
        _SETS.clear()
