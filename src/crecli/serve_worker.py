"""The model work of `cre serve`: what a request's job computes, and the worker that runs it.

A job answers one checked `Query` on a thread of its own and returns its `Answer`, priced
once (the response and the served-query log carry the same figure): `cascade_job` routes
the prompt and walks the router's ladder, and records the answer it will send; `model_job`
asks one ladder model by name. `sampling` says which of a request's fields reach a model.

Jobs run at once, each on its own thread, and wait only where they must: a loaded model
computes for one job at a time (`registry.ModelPool.lease`, first come first served), and a
remote rung's servers each hold at most its `max_in_flight` requests (`replicas`), so a
270M's answer never waits behind a 1.5B's and remote rungs answer many requests at once.
The `Worker` admits as many jobs as the ladder can compute at once (its `capacity`: one a
loaded model, `max_in_flight` a remote server) plus `max_queue` waiting; one more is a 429.

A `Ticket` settles who has the last word on a job: its request giving up (a timeout, a client
gone) or the job delivering its answer. While the job runs, the ticket's `cancel.Token` is
its thread's cancel scope, so a request that gives up stops its job where it stands: a wait
for a model ends, a remote call in flight is abandoned (its connection closed), and no later
rung starts.

A streamed request's job hands the answer's text to `emit` as it is generated, once the
ladder stands on a rung whose answer will be final (`ladder.streams_final`): the top rung
answering greedily, or a ladder model asked by name; `StreamText` applies `stop` and the
whitespace rules of the whole answer to the pieces.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from crecli import cancel
from crecli.openai_wire import Answer, ApiError, Query, StreamText, cascade_answer, direct_answer

if TYPE_CHECKING:
    from crecli.escalate import Cascade
    from crecli.models.backend import Generation, GenParams
    from crecli.servedlog import ServedLog

DEFAULT_MAX_TOKENS = 256  # a ladder model asked directly, when the request names none


class _Abandoned(Exception):
    """The request gave up while its job waited or ran; the job stops."""


def sampling(query: Query) -> "GenParams":
    """The generation parameters of a ladder model asked by name: greedy unless `temperature` says
    otherwise, with the request's top_p, seed, stop and max_tokens.

    The cascade ("cre") applies only `stop` (`cut_at_stop`): its votes are drawn at the
    router's temperature with the router's seeds, the ones its thresholds were calibrated on,
    so temperature, top_p and seed are checked but do not change a cascade's answer.
    """
    from dataclasses import replace

    from crecli.models.backend import GenParams

    # No signals: nothing reads them for an answer that is already final.
    params = GenParams(max_tokens=query.max_tokens or DEFAULT_MAX_TOKENS, temperature=query.temperature or 0.0,
                       seed=query.seed, stop=query.stop, signals=False)
    return params if query.top_p is None else replace(params, top_p=query.top_p)


class Ticket:
    """Who has the last word on a job: its request giving up, or the job delivering its answer.

    Whichever comes first wins, under a lock, so that an answer the client never gets is never
    recorded as served, and one that is recorded is always sent. `cancel` (the request timed
    out or its client left) is False when the job has already claimed its answer, and else
    cancels the running job's `cancel.Token`; `claim` (the job is about to record it) is False
    when the request has given up. `deadline` (time.monotonic()) bounds the whole ladder:
    remote calls get only the time left.

    The ticket's state is the one record of who won; the token exists only while the job
    runs (`running`), as its thread's cancel scope, and is cancelled when the ticket is.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self._lock = threading.Lock()
        self._state = "open"
        self.deadline = deadline
        self._token: cancel.Token | None = None

    def cancel(self, expired: bool = False) -> bool:
        """`expired`: the request's deadline is why (else its client left, or the server is
        stopping), as its token tells the job's remote calls (`cancel.Token.expired`)."""
        with self._lock:
            if self._state == "open":
                self._state = "cancelled"
            cancelled = self._state == "cancelled"
            token = self._token
        if cancelled and token is not None:
            token.cancel(expired)  # outside the lock: its callbacks close connections
        return cancelled

    def claim(self) -> bool:
        with self._lock:
            if self._state == "open":
                self._state = "claimed"
            return self._state == "claimed"

    def is_set(self) -> bool:
        """The request gave up: a job not started is dropped, a running one stops where it stands."""
        with self._lock:
            return self._state == "cancelled"

    def computing(self) -> bool:
        """The job has started and waits for nothing (a model, memory, a server's slot:
        `cancel.waiting`), as /health counts it running."""
        token = self._token  # one read: set once, when the job starts
        return token is not None and not token.is_waiting()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Run the job's block in a cancel scope (`cancel.scope`) that this ticket cancels when
        its request gives up; `_Abandoned` at once when it already has."""
        token = cancel.Token(self.deadline)
        with self._lock:
            if self._state == "cancelled":
                raise _Abandoned
            self._token = token
        with cancel.scope(token):
            yield


class Worker:
    """Runs jobs at once on threads: up to `capacity` computing plus `max_queue` waiting.

    `capacity` is what the ladder computes at once (one job a loaded model, `max_in_flight`
    a remote server); jobs past it wait at the model or server they need. At most
    `capacity + max_queue` are admitted; one more is a 429 with a Retry-After.
    """

    def __init__(self, max_queue: int, capacity: int = 1) -> None:
        self.capacity = max(1, capacity)
        self.limit = self.capacity + max_queue  # computing plus waiting
        # A thread for every admitted job: a job waits for its model on its own thread, so a
        # job for a free model is never stuck behind one waiting for a busy model.
        self._executor = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="cre-job")
        self._lock = threading.Lock()
        # The admitted jobs' tickets (each request makes its own): their count, and what `stop`
        # cancels.
        self._tickets: set[Ticket] = set()
        self._mean_seconds = 1.0  # of recent jobs, for Retry-After

    def counts(self) -> tuple[int, int]:
        """The admitted jobs running (computing on a model or with a server) and queued (not
        started, or waiting for a model, for memory within the budget, or for a server's
        slot), as /health reports them. Told by each job's own waits, not inferred from the
        ladder's capacity, which a memory budget or jobs that all need one model leave unused."""
        with self._lock:
            running = sum(ticket.computing() for ticket in self._tickets)
            return running, len(self._tickets) - running

    def retry_after(self) -> str:
        """Seconds until the admitted jobs are likely done, for a refusal's Retry-After."""
        with self._lock:
            return self._retry_after()

    def _retry_after(self) -> str:  # with the lock held
        return str(max(1, math.ceil(self._mean_seconds * math.ceil(len(self._tickets) / self.capacity))))

    def submit(self, job: Callable[[], Any], ticket: Ticket) -> "Future[Any]":
        with self._lock:
            if len(self._tickets) >= self.limit:
                raise ApiError(
                    429, f"the server is busy: {len(self._tickets) - self.capacity} requests are waiting, the most it "
                    "queues; retry later", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": self._retry_after()},
                )
            self._tickets.add(ticket)

        def run() -> Any:
            if ticket.is_set():
                raise _Abandoned  # dropped unstarted: no time to count
            start = time.monotonic()
            try:
                with ticket.running():
                    return job()
            except cancel.Cancelled:
                raise _Abandoned from None
            finally:
                with self._lock:
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - start)

        future = self._executor.submit(run)
        # The slot frees when the job really ends (or is dropped unstarted), not when its
        # request gives up: a cancelled job still holds its place until it has stopped.
        future.add_done_callback(lambda _: self._release(ticket))
        return future

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    def close(self) -> None:
        """Wait for the jobs admitted (after a drain, none is left)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """Give up every admitted job and wait for each to stop where it stands: the models
        they compute on are closed next, and a model freed under a running decode crashes
        the process (`cre serve` on a second Ctrl-C, which skips the drain)."""
        with self._lock:
            tickets = list(self._tickets)
        for ticket in tickets:
            ticket.cancel()
        self.close()


# ---------------------------------------------------------------- jobs


def cascade_job(cascade: "Cascade", query: Query, ticket: Ticket, served: "ServedLog | None" = None,
                emit: Callable[[str], None] | None = None) -> Answer:
    """The cascade's answer to `query`, recorded in `served` when its request will send it.

    With `emit`, the final rung's text goes to it as it is generated (`StreamText`), when the
    ladder stands on a rung whose answer will be final; the rest of the answer, if any, at
    the end. Routing runs here, on the job's thread."""
    text = StreamText(query.stop, emit) if emit is not None else None
    pending = cascade.begin(query.prompt)
    if text is not None:
        pending.stream = text.add
    # The whole climb, stopping before a rung once the request has given up.
    if not cascade.advance(pending, rungs=None, stop=ticket.is_set):
        raise _Abandoned
    # Only an answer its request will send is served: one that came after the request gave
    # up (a 504, a client gone) is dropped here, unrecorded.
    if not ticket.claim():
        raise _Abandoned
    trace = pending.trace
    if served is not None:
        # On the job's thread, so the event loop never waits on the disk.
        served.record(query.prompt, trace, cascade)
    # Priced once when the answer was final (`live.Trace.cost`), for the response and the log alike.
    answer = cascade_answer(trace, trace.cost, trace.cost_unit, query.stop)
    if text is not None and text.sent:
        # Only the rung that streamed it finishes a stream. Any other answer goes out whole
        # with its job's result (`stream_events`), under the model that gave it: as pieces it
        # would be sent under the top rung's name, the only one that streams.
        text.finish(answer.text)
    return answer


def model_job(cascade: "Cascade", query: Query, emit: Callable[[str], None] | None = None) -> Answer:
    """Ladder model `query.model`'s own answer to `query` (the router is skipped; nothing is
    logged), its text handed to `emit` as it is generated when given."""
    spec = cascade.specs[query.model]
    text = StreamText(query.stop, emit) if emit is not None else None
    with cascade.pool.lease(spec) as backend:
        if text is not None:
            gen = backend.generate_streaming(query.prompt, sampling(query), text.add)
        else:
            gen = backend.generate(query.prompt, sampling(query))
    answer = direct_answer(query.model, gen, generation_cost(cascade, query.model, gen), cascade.pricing.unit,
                           query.stop)
    if text is not None:
        text.finish(answer.text)
    return answer


def generation_cost(cascade: "Cascade", name: str, gen: "Generation") -> float | None:
    """What one generation of ladder model `name` cost, in the cascade's pricing unit (one vote,
    priced by `costs.Pricing.price_votes`)."""
    votes = cascade.pricing.price_votes(name, gen.prompt_tokens, [gen.output_tokens], [gen.seconds])
    return None if votes is None else sum(votes)
