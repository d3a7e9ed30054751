"""The model work of `cre serve`: what a request's job computes, and the worker that runs it.

A job answers one checked `Query` off the event loop and returns its `Answer`, priced once
(the response and the served-query log carry the same figure): `cascade_job` walks the
router's ladder and records the answer it will send, `model_job` asks one ladder model by
name. `sampling` says which of a request's fields reach a model.

Every job runs on one `Worker` thread, in arrival order: llama.cpp's threads spin, so two
computations at once on a CPU slow both down more than they gain. At most `max_queue` jobs
wait behind the running one; one more is a 429. A `Ticket` settles who has the last word on
a job: its request giving up (a timeout, a client gone) or the job delivering its answer.

The app knows a job only as a callable that returns an Answer, and the worker only by
`submit`, `running`, `queued`, `retry_after` and `close`, so that other ways of running
jobs (a worker per loaded model, calls to remote rungs) can come in here without the
request handlers changing.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from crecli.openai_wire import Answer, ApiError, Query, cascade_answer, direct_answer

if TYPE_CHECKING:
    from crecli.escalate import Cascade
    from crecli.models.backend import Generation, GenParams
    from crecli.servedlog import ServedLog

DEFAULT_MAX_TOKENS = 256  # a ladder model asked directly, when the request names none


class _Abandoned(Exception):
    """The request timed out while its job waited or ran; the worker drops the job."""


def sampling(query: Query) -> "GenParams":
    """The generation parameters of a ladder model asked by name: greedy unless `temperature` says
    otherwise, with the request's top_p, seed, stop and max_tokens.

    The cascade ("cre") applies only `stop` (`cut_at_stop`): its votes are drawn at the
    router's temperature with the router's seeds, the ones its thresholds were calibrated on,
    so temperature, top_p and seed are checked but do not change a cascade's answer.
    """
    from dataclasses import replace

    from crecli.models.backend import GenParams

    params = GenParams(max_tokens=query.max_tokens or DEFAULT_MAX_TOKENS, temperature=query.temperature or 0.0,
                       seed=query.seed, stop=query.stop)
    return params if query.top_p is None else replace(params, top_p=query.top_p)


class Ticket:
    """Who has the last word on a job: its request giving up, or the job delivering its answer.

    Whichever comes first wins, under a lock, so that an answer the client never gets is never
    recorded as served, and one that is recorded is always sent. `cancel` (the request timed
    out or its client left) is False when the job has already claimed its answer; `claim`
    (the job is about to record it) is False when the request has given up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "open"

    def cancel(self) -> bool:
        with self._lock:
            if self._state == "open":
                self._state = "cancelled"
            return self._state == "cancelled"

    def claim(self) -> bool:
        with self._lock:
            if self._state == "open":
                self._state = "claimed"
            return self._state == "claimed"

    def is_set(self) -> bool:
        """The request gave up: a job not started is dropped, a running cascade stops at its next rung."""
        with self._lock:
            return self._state == "cancelled"


class Worker:
    """One thread for every model computation; at most `max_queue` requests wait behind it."""

    def __init__(self, max_queue: int) -> None:
        self.limit = max_queue + 1  # waiting plus the one running
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cre-model")
        self._lock = threading.Lock()
        self._admitted = 0
        self.running = 0
        self._mean_seconds = 1.0  # of recent jobs, for Retry-After

    @property
    def queued(self) -> int:
        with self._lock:
            return self._admitted - self.running

    def retry_after(self) -> str:
        """Seconds until the admitted jobs are likely done, for a refusal's Retry-After."""
        with self._lock:
            return self._retry_after()

    def _retry_after(self) -> str:  # with the lock held
        return str(max(1, math.ceil(self._mean_seconds * self._admitted)))

    def submit(self, job: Callable[[], Any], ticket: Ticket) -> "Future[Any]":
        with self._lock:
            if self._admitted >= self.limit:
                raise ApiError(
                    429, f"the server is busy: {self._admitted - 1} requests are waiting, the most it queues; retry later",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": self._retry_after()},
                )
            self._admitted += 1

        def run() -> Any:
            if ticket.is_set():
                raise _Abandoned
            with self._lock:
                self.running += 1
            start = time.monotonic()
            try:
                return job()
            finally:
                with self._lock:
                    self.running -= 1
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - start)

        future = self._executor.submit(run)
        # The slot frees when the job really ends (or is dropped unstarted), not when its
        # request gives up: a timed-out job still holds the thread until its rung finishes.
        future.add_done_callback(self._release)
        return future

    def _release(self, _: "Future[Any]") -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- jobs


def cascade_job(cascade: "Cascade", query: Query, ticket: Ticket, served: "ServedLog | None" = None) -> Answer:
    """The cascade's answer to `query`, recorded in `served` when its request will send it."""
    pending = cascade.begin(query.prompt)
    while not cascade.advance(pending):
        if ticket.is_set():
            raise _Abandoned
    # Only an answer its request will send is served: one that came after the request gave
    # up (a 504, a client gone) is dropped here, unrecorded.
    if not ticket.claim():
        raise _Abandoned
    trace = pending.trace
    if served is not None:
        # On the worker thread, so the event loop never waits on the disk.
        served.record(query.prompt, trace, cascade)
    # Priced once when the answer was final (`live.Trace.cost`), for the response and the log alike.
    return cascade_answer(trace, trace.cost, trace.cost_unit, query.stop)


def model_job(cascade: "Cascade", query: Query) -> Answer:
    """Ladder model `query.model`'s own answer to `query` (the router is skipped; nothing is logged)."""
    gen = cascade.pool.get(cascade.specs[query.model]).generate(query.prompt, sampling(query))
    return direct_answer(query.model, gen, generation_cost(cascade, query.model, gen), cascade.pricing.unit,
                         query.stop)


def generation_cost(cascade: "Cascade", name: str, gen: "Generation") -> float | None:
    """What one generation of ladder model `name` cost, in the cascade's pricing unit (one vote,
    priced by `costs.Pricing.price_votes`)."""
    votes = cascade.pricing.price_votes(name, gen.prompt_tokens, [gen.output_tokens], [gen.seconds])
    return None if votes is None else sum(votes)
