"""The app of `cre serve`: an ASGI app (Starlette) whose handlers answer OpenAI's API through a cascade.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
each a method of `App`. Model "cre" (or the router file's stem) answers through the
cascade; a ladder model's name answers with that model alone (greedily unless the request
sets a temperature).

The event loop only reads, parses, checks and hands over; each request's answer is a job on
a thread of `serve_worker`'s worker (routing included), and jobs run at once, waiting only
for the model or server they need. Remote rungs are called through one pooled async HTTP
client on this event loop (`models.http.LoopTransport`, installed at startup). A request
beyond what the ladder computes at once plus `max_queue` waiting is refused with 429 at once
rather than left to wait for a timeout, and a request beyond `max_requests` past its body
(parsing, queued, running or streaming) with 503, both in OpenAI's error shape (`Limits`), and
in the server's log at most once a second of each kind (`RefusalLog`). Each
request's timeout counts from its arrival and covers the whole ladder; on expiry (or when
its client leaves) its job stops where it stands: a wait ends, a remote call is abandoned,
an in-process decode stops at its next token (or mid-prompt), no later rung starts. A streamed request gets the final rung's tokens as they are generated
(`serve_worker.cascade_job`); the response starts with the first of them, and the job runs
no more than `Backlog.LIMIT` ahead of a client that reads slowly or not at all. A body still
arriving takes no place among the requests in flight, and has its own deadline
(`--body-timeout`); /health runs on the event loop alone. Every response carries an
X-Request-Id (`request_ids`), the one its error message and log lines quote.

Bodies are parsed and answers shaped by `openai_wire`; the socket, the HTTP protocol and
the signals are `serve`'s. Starlette is imported inside functions only, so that importing
this module needs no `serve` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from crecli.cancel import POLL_SECONDS
from crecli.errors import CreError, PromptTooLong
from crecli.openai_wire import (
    Answer, ApiError, Query, cut_name, parse_chat, parse_completion, parse_json, response_body, stream_chunk, stream_end,
    stream_error, stream_events,
)
from crecli.serve_options import ServeOptions  # noqa: F401 (re-exported)
from crecli.serve_worker import Ticket, Worker, cascade_job, model_job

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from crecli.config import ModelSpec
    from crecli.escalate import Cascade
    from crecli.models.backend import Backend
    from crecli.servedlog import ServedLog

CASCADE_MODEL = "cre"
# Parsing a large body holds the event loop; past this size it runs on a thread, so that
# /health and other clients are answered meanwhile.
THREAD_PARSE_BYTES = 64 << 10

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: stderr, with its format




# ---------------------------------------------------------------- health


class RungState(NamedTuple):
    """What /health says of a rung (`word`), and whether it can answer now."""

    word: str
    usable: bool


def rung_state(spec: "ModelSpec", backend: "Backend | None" = None) -> RungState:
    """Whether a rung can answer, by cheap checks only (a stat and 4 bytes; no model runs, no
    server is called): "ready" (a GGUF file of the pinned size, which its `backend`, where
    the pool holds one, has no standing refusal to load: else "refused by llama.cpp", until
    it is tried again, `Backend.refusal`); "remote" (every server of a
    remote rung in rotation), "remote, 1 of 2 servers out" or "remote, every server out" (from
    what its requests found, `replicas`: a server whose last request failed is out until one
    succeeds), with ", retrying" once a back-off has passed, when the rung counts as usable
    again; or what is wrong.

    No path or address is named: /health answers anyone who can connect.
    """
    import stat

    from crecli.models.pull import is_gguf

    if spec.url:
        from crecli.models.replicas import replica_set

        servers = replica_set(spec)
        up, n = servers.up(), len(servers.replicas)
        if up == n:
            return RungState("remote", True)
        if up:
            return RungState(f"remote, {n - up} of {n} servers out", True)
        # Usable again once a back-off has passed: the next request tries that server.
        return RungState("remote, every server out, retrying", True) if servers.in_rotation() else \
            RungState("remote, every server out", False)
    path = spec.file
    assert path is not None
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return RungState("missing", False)
        if spec.size is not None and info.st_size != spec.size:
            return RungState("wrong size", False)
        if not is_gguf(path):
            return RungState("not a GGUF file", False)
        if backend is not None and backend.refusal() is not None:
            return RungState("refused by llama.cpp", False)
        return RungState("ready", True)
    except FileNotFoundError:
        return RungState("missing", False)
    except OSError:
        return RungState("unreadable", False)


def health_report(states: Mapping[str, RungState]) -> tuple[int, str]:
    """The HTTP status and word for /health: 200 "ok" when every rung can answer, 200
    "degraded" when some can, 503 "unavailable" when none can (a load balancer's signal)."""
    usable = sum(state.usable for state in states.values())
    if usable == len(states):
        return 200, "ok"
    return (200, "degraded") if usable else (503, "unavailable")


# ---------------------------------------------------------------- the app


# The id of the request being answered, set where it enters the app (`request_ids`) and read
# wherever a message quotes it, so that the message and the X-Request-Id header always agree.
# A context variable reaches the handler, its exception handlers and its stream's task alike.
_request_id: "ContextVar[str]" = ContextVar("cre_request_id")
# An id a client sent is echoed (and logged) only when it is short and printable: no spaces,
# no control characters, nothing a log line or a response header could be forged with.
_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def request_id() -> str:
    """The id of the request being answered (the X-Request-Id header its response carries)."""
    return _request_id.get()


def request_ids(app: Any) -> Any:
    """`app` (ASGI) with an X-Request-Id on every response: the client's own when it sent a
    safe one (`_CLIENT_ID`), else a new one; `request_id()` says which while it is answered.

    Outside every Starlette middleware, so that the 500 of a crash carries it too."""

    async def with_id(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        sent = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        rid = sent.decode("ascii") if _CLIENT_ID.fullmatch(sent) else new_request_id()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        token = _request_id.set(rid)
        try:
            await app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)

    return with_id


class _ClientGone(ApiError):
    """The client closed its connection; the response is never sent (uvicorn drops it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", code="client_closed")


def request_bound(options: ServeOptions, worker: Worker) -> int:
    """Requests past their body at once (`Limits.max_requests`): the options' bound, raised to
    twice what the worker admits (`Worker.limit`: the ladder's capacity plus the queue), so
    that a full worker answers 429 before this bound answers 503. A remote rung with
    `max_in_flight = 128` admits 144 at the default queue; the options' 64 alone refused the
    65th with 503 and left the engine's capacity unused."""
    return max(options.max_requests, 2 * worker.limit)


class Limits:
    """What the app holds at once. Requests past their body (parsing, queued, running) are
    counted against `max_requests`; bodies still arriving, against `body_budget` bytes.

    Only the event loop's thread touches it, so there is no lock.
    """

    def __init__(self, options: ServeOptions, worker: Worker) -> None:
        self.max_requests, self.budget, self.worker = request_bound(options, worker), options.body_budget, worker
        self.active = 0
        self.buffered = 0

    def overloaded(self, why: str) -> ApiError:
        # Closing the connection, unread body and all, frees it for a client that can be served.
        return ApiError(503, f"the server is overloaded: {why}; retry later", type="server_error", code="overloaded",
                        headers={"Retry-After": self.worker.retry_after(), "Connection": "close"})

    def take_bytes(self, n: int) -> None:
        if self.buffered + n > self.budget:
            raise self.overloaded(f"{self.buffered:,} bytes of request bodies are arriving, the most it holds")
        self.buffered += n

    def give_bytes(self, n: int) -> None:
        self.buffered -= n

    def admit(self) -> Callable[[], None]:
        """Counts a request in, until the call it returns (later calls do nothing). A streamed
        request gives its place back when its job ends, not when its response starts: it
        computes for as long as it streams."""
        if self.active >= self.max_requests:
            raise self.overloaded(f"{self.active} requests are in flight, the most it takes at once")
        self.active += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.active -= 1

        return release


class RefusalLog:
    """A line in the server's log for each refusal of a request to a full server (429
    `queue_full`, 503 `overloaded`), with its request id, client and reason, and for each 503
    of a rung none of whose servers could answer (`rung_unavailable`, with the details); but
    at most one a `period` per kind, so that a storm of refusals (or an outage of a remote
    rung) cannot flood the log: those folded in between are counted in the kind's next line,
    or in a line of their own once a `period` has passed since its last (`flush(due_only=True)`,
    once a period from `App.lifespan`) or at shutdown. `clock` is injectable for tests. Only
    the event loop's thread uses it, so there is no lock."""

    KINDS = ("queue_full", "overloaded")
    PERIOD = 1.0  # seconds between two lines of a kind

    def __init__(self, period: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.period, self.clock = self.PERIOD if period is None else period, clock
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def admit(self, kind: str) -> str | None:
        """None when a line of `kind` was written less than a `period` ago (this one is
        counted in the next); else what the line to write now adds about those folded in."""
        now = self.clock()
        if kind in self._last and now - self._last[kind] < self.period:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return None
        self._last[kind] = now
        folded = self._folded.pop(kind, 0)
        return f" (and {self._more(folded, kind)})" if folded else ""

    @staticmethod
    def _more(folded: int, kind: str) -> str:
        """The words for refusals of `kind` folded since its last line, in it or in their own."""
        return f"{folded} more {kind} refusals since the last such line"

    def note(self, rid: str, client: str, exc: ApiError) -> None:
        """Log the refusal `exc` of request `rid`, or count it in the next line; other errors pass."""
        kind = exc.code
        if kind not in self.KINDS:
            return
        folded = self.admit(kind)
        if folded is not None:
            log.warning("%s: refused %s with %d %s: %s%s", rid, client, exc.status, kind, exc.message, folded)

    def flush(self, due_only: bool = False) -> None:
        """Log the refusals folded since each kind's last line; with `due_only`, only the
        kinds whose last line is a `period` old (what `App.lifespan` calls once a period, so
        that a storm's count is told once it ends, not at the next refusal, maybe days on)."""
        now = self.clock()
        for kind in list(self._folded):
            if due_only and now - self._last.get(kind, now) < self.period:
                continue
            log.warning("%s", self._more(self._folded.pop(kind), kind))
            self._last[kind] = now


def _job_stream(events: Any, give_up: Callable[[], None]) -> "Response":
    """A streamed answer's response, which gives its job up once it is over, however it
    ended: a client gone before the first event was sent never started `events`, whose own
    `finally` gives the job up, and the job ran on and was logged as served."""
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                give_up()  # a job that is done, or has claimed its answer, is left alone

    return JobStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Backlog:
    """The pieces of a streamed answer that its job has generated and its response has not
    yet taken: how far the job may run ahead of its client. A client that reads slower than
    the model generates, or stops reading, no longer lets the job run on to its natural end
    holding the model, its pieces piling up in memory: past `LIMIT`, the job waits (`put`)
    until the response takes a piece, its request gives up (its deadline, `App.stream`'s
    timer, or its client gone: the piece is dropped, and the job stops at its next token),
    the response has ended (`close`), or its deadline has passed with the answer claimed
    (it is being recorded and will be sent: its rest goes in, whatever the client reads).

    `LIMIT` is small (64 KiB: a few thousand tokens) because the socket's buffers already
    hold more in front of it, so a client that reads never makes the model wait; each piece
    is counted with `PIECE` more for what holding it costs, so that tokens of a character or
    two stay bounded too. A remote rung's pieces come on the event loop's thread, which must
    not wait: they are counted but never held back, bounded by the reply's own cap
    (`models.openai.MAX_REPLY_BYTES`) and the request's deadline.
    """

    LIMIT = 64 << 10  # characters
    PIECE = 64

    def __init__(self, loop: asyncio.AbstractEventLoop, ticket: Ticket) -> None:
        self.loop, self.ticket = loop, ticket
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self._room = threading.Condition()
        self._held = 0
        self._closed = False

    def put(self, text: str) -> None:
        """Hand `text` to the response, on the job's thread (or the loop's, for a remote stream)."""
        cost = len(text) + self.PIECE
        with self._room:
            if threading.get_ident() != self._loop_thread:
                # A piece always goes in when nothing is held: one over the limit goes alone.
                while self._held and self._held + cost > self.LIMIT:
                    if self._closed or self.ticket.is_set():
                        return  # nobody will send it; the job stops at its next token
                    left = None if self.ticket.deadline is None else self.ticket.deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break  # a claimed answer's rest: it will be sent
                    # Polled: the ticket has no way to wake this wait when its request gives up.
                    self._room.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, left))
            self._held += cost
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    def _taken(self, text: str) -> str:
        with self._room:
            self._held -= len(text) + self.PIECE
            self._room.notify_all()
        return text

    async def get(self) -> str:
        return self._taken(await self.queue.get())

    def get_nowait(self) -> str:
        return self._taken(self.queue.get_nowait())

    def empty(self) -> bool:
        return self.queue.empty()

    def close(self) -> None:
        """The response has ended: a job waiting for room stops waiting, and nothing more is held."""
        with self._room:
            self._closed = True
            self._room.notify_all()


def _give_up(ticket: Ticket, job: "asyncio.Future[Answer]", expired: bool = False) -> None:
    """Cancel a streamed request's job (`expired`: at its deadline; else its response ended
    or its client left), unless it is done or has claimed its answer (which is being
    recorded, so it will be sent)."""
    if not job.done() and ticket.cancel(expired):
        job.cancel()


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Returns when the client has gone; only called once the request's body is all read."""
    while (await receive())["type"] != "http.disconnect":
        pass


def client_address(client: Any) -> str:
    """A client's (host, port) as the log shows it."""
    return "%s:%d" % tuple(client) if client else "a client"



def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)",
                    code="request_too_large")


def capacity(cascade: "Cascade") -> int:
    """How many answers the ladder computes at once: one a loaded model (a model computes for
    one request at a time), and a remote rung's `max_in_flight` for each of its servers."""
    from crecli.models.replicas import replica_set

    return sum(replica_set(spec).capacity if spec.url else 1 for spec in cascade.specs.values())


class App:
    """`cre serve`'s handlers over one cascade: a method an endpoint, and one an error kind.

    `name` (the router's stem) also means the cascade. Cascade answers are recorded in
    `served` (the served-query log) when given; answers of a ladder model asked by name skip
    the router and are not. The caller owns `cascade` and closes it; the app's shutdown
    stops its worker, after uvicorn has drained the requests in flight.
    """

    def __init__(
        self, cascade: "Cascade", options: ServeOptions = ServeOptions(), name: str | None = None,
        served: "ServedLog | None" = None,
    ) -> None:
        self.cascade, self.options, self.served = cascade, options, served
        self.worker = Worker(options.max_queue, capacity(cascade))
        self.limits = Limits(options, self.worker)
        self.refusals = RefusalLog()
        self.ladder = list(cascade.ladder)
        self.cascade_names = [CASCADE_MODEL] + (
            [name] if name and name != CASCADE_MODEL and name not in self.ladder else [])
        # Bytes, compared with the header's bytes: a key in UTF-8 (or any bytes the environment
        # held) authenticates as sent.
        self._key = options.api_key.encode("utf-8", "surrogateescape") if options.api_key else None

    def asgi(self) -> "Starlette":
        """The Starlette app routing to this object's handlers."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        class Served(Starlette):
            def build_middleware_stack(self) -> Any:
                return request_ids(super().build_middleware_stack())

        app = Served(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={ApiError: self.on_api_error, HTTPException: self.on_http_error,
                                Exception: self.on_crash},
            lifespan=self.lifespan,
        )
        app.state.worker = self.worker
        app.state.limits = self.limits
        return app

    # ------------------------------------------------------------ endpoints

    async def chat_completions(self, request: "Request") -> "Response":
        return await self.complete(request, parse_chat)

    async def completions(self, request: "Request") -> "Response":
        return await self.complete(request, parse_completion)

    async def models(self, request: "Request") -> "Response":
        from starlette.responses import JSONResponse

        self.check_key(request)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "cre", "cre": {"kind": "cascade"}}
                for n in self.cascade_names]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "cre", "cre": {"kind": "model", "rung": i}}
                 for i, n in enumerate(self.ladder)]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: "Request") -> "Response":
        from starlette.responses import JSONResponse

        # Unauthenticated, for load balancers, and on the event loop alone: it never waits
        # behind model work. Which models are which only with the key, when one is set.
        # The pool's backend, where it holds one, remembers a load its runtime refused.
        states = {n: rung_state(self.cascade.specs[n], self.cascade.pool.loaded(n)) for n in self.ladder}
        status, word = health_report(states)
        running, queued = self.worker.counts()
        body: dict[str, Any] = {"status": word, "running": running, "queued": queued,
                                "max_queue": self.options.max_queue}
        if self.key_ok(request):
            body["models"] = {n: state.word for n, state in states.items()}
        return JSONResponse(body, status_code=status)

    # ------------------------------------------------------------ answering

    async def complete(self, request: "Request", parse: Callable[[dict[str, Any]], Query]) -> "Response":
        """A completion endpoint: the key, the body, the checked query, its answer, the response."""
        from starlette.responses import JSONResponse

        # The timeout runs from arrival: a body that trickles in slowly spends it too.
        deadline = time.monotonic() + self.options.timeout
        self.check_key(request)
        wait = min(self.options.body_timeout, self.options.timeout)
        try:
            raw = await asyncio.wait_for(self.read_body(request), wait)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {wait:g} s (--body-timeout)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        # Counted from here, with its body read: a slow upload holds no place another client needs.
        release = self.limits.admit()
        try:
            if len(raw) > THREAD_PARSE_BYTES:
                # Its fields checked there too: 4 MiB of messages held the loop 73 ms each.
                query = await asyncio.get_running_loop().run_in_executor(None, lambda: parse(parse_json(raw)))
            else:
                query = parse(parse_json(raw))
            rid = ("chatcmpl-" if query.kind == "chat" else "cmpl-") + secrets.token_hex(12)
            created = int(time.time())
            if query.stream:
                events, job, give_up = await self.stream(request, query, deadline, rid, created)
                # Held until the job ends (done, failed or cancelled: a client that leaves
                # cancels it), which happens whether or not the response is ever iterated.
                job.add_done_callback(lambda _: release())
                return _job_stream(events, give_up)
            result = await self.answer(request, query, deadline)
        except BaseException:
            release()
            raise
        release()
        return JSONResponse(response_body(query, result, rid, created))

    def job(self, query: Query, ticket: Ticket, emit: Callable[[str], None] | None = None) -> Callable[[], Answer]:
        """What answering `query` computes off the event loop; a 404 for a model not served here."""
        if query.model in self.cascade_names:
            return partial(cascade_job, self.cascade, query, ticket, self.served, emit)
        if query.model in self.ladder:
            return partial(model_job, self.cascade, query, emit)
        # Shown cut, as field names are: a 3 MB name came back whole.
        raise ApiError(404, f"the model {cut_name(query.model)!r} does not exist here; GET /v1/models lists "
                       f"{', '.join(self.cascade_names + self.ladder)}", param="model", code="model_not_found")

    async def answer(self, request: "Request", query: Query, deadline: float) -> Answer:
        """`query`'s answer from the worker, by `deadline`, unless its client leaves first."""
        ticket = Ticket(deadline)
        future = asyncio.wrap_future(self.worker.submit(self.job(query, ticket), ticket))
        await self.settle(request, query, ticket, future, deadline)
        return await self.result(query, future)

    async def stream(self, request: "Request", query: Query, deadline: float, rid: str,
                     created: int) -> tuple[Any, "asyncio.Future[Answer]", Callable[[], None]]:
        """The events of a streamed answer: its final rung's text as it is generated (the
        response starts with the first piece), or the whole answer at once where no rung
        could stream it; its job; and what gives the job up. Errors before the first piece
        are plain error responses."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(deadline)
        pieces = Backlog(loop, ticket)
        future = asyncio.wrap_future(self.worker.submit(self.job(query, ticket, pieces.put), ticket))
        first = asyncio.ensure_future(pieces.get())
        try:
            await self.settle(request, query, ticket, future, deadline, first)
        except BaseException:
            first.cancel()
            pieces.close()
            raise
        if not first.done():
            first.cancel()
            pieces.close()
            answer = await self.result(query, future)
            return stream_events(query, answer, rid, created), future, lambda: None

        # The deadline, from here on, by a timer rather than by the events' own wait: a client
        # that stops reading holds them at a `yield` (a send that waits for room), and the job
        # (waiting for room in `pieces`, or generating) ran on past it, holding its model.
        expiry = loop.call_later(max(0.0, deadline - time.monotonic()), _give_up, ticket, future, True)
        future.add_done_callback(lambda _: expiry.cancel())

        def give_up() -> None:
            _give_up(ticket, future)
            pieces.close()

        # Pieces come only from the rung whose answer is final as it is generated: the top
        # rung (`ladder.streams_final`), or the ladder model asked by name.
        model = self.cascade.strongest if query.model in self.cascade_names else query.model
        events = self.stream_on(query, ticket, future, pieces, first.result(), rid, created, model)
        return events, future, give_up

    async def stream_on(self, query: Query, ticket: Ticket, future: "asyncio.Future[Answer]",
                        pieces: "Backlog", head: str, rid: str, created: int, model: str) -> Any:
        """The events after the first piece: each piece as it comes, then the end (or an error
        event). A client that leaves cancels this generator (Starlette), which gives the
        request up: its job stops. At its deadline `stream`'s timer gives it up, unless the job
        has claimed its answer (it is being recorded and will be sent): the job is cancelled,
        and the events end with the 504's error."""
        getter: "asyncio.Future[str] | None" = None
        try:
            yield stream_chunk(query, model, rid, created, head, role=True)
            while True:
                getter = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield stream_chunk(query, model, rid, created, getter.result())
                    continue
                getter.cancel()
                if getter.done() and not getter.cancelled():  # it took a piece as the job ended
                    yield stream_chunk(query, model, rid, created, getter.result())
                break
            if future.cancelled():  # only the deadline cancels the job of events still running
                for event in stream_error(self.timed_out(query)):
                    yield event
                return
            while not pieces.empty():  # pieces the job handed over before it ended
                yield stream_chunk(query, model, rid, created, pieces.get_nowait())
            try:
                answer = await self.result(query, future)
            except ApiError as exc:
                for event in stream_error(exc):
                    yield event
                return
            for event in stream_end(query, answer, rid, created):
                yield event
        finally:
            # A client that left while this waited cancels the wait, not the piece getter it
            # waited on: left pending, it was destroyed with the request, and asyncio logged
            # "Task was destroyed but it is pending!" for every such client.
            if getter is not None and not getter.done():
                getter.cancel()
            _give_up(ticket, future)

    async def settle(self, request: "Request", query: Query, ticket: Ticket, future: "asyncio.Future[Answer]",
                     deadline: float, first: "asyncio.Future[str] | None" = None) -> None:
        """Wait for the job's answer (or, streaming, its first piece) until `deadline`; a
        request that gives up first (a timeout, its client gone) cancels its job."""
        gone = asyncio.ensure_future(_disconnected(request.receive))
        waiting = {future, gone} | ({first} if first is not None else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if first is not None and first in done:
            return
        # Unless the job has claimed its answer (it is being recorded, and will be sent), a
        # request that gives up cancels its job: queued, it never runs; running, it stops
        # where it stands.
        if future not in done and ticket.cancel(expired=gone not in done):
            future.cancel()
            if gone in done:
                log.info("%s closed the connection before its answer; its job is dropped",
                         client_address(request.client))
                raise _ClientGone
            raise self.timed_out(query)

    def timed_out(self, query: Query) -> ApiError:
        """The 504 of a request that ran out of time, with a request id, and a line in the
        server's log with the same id: an operator told of a 504 can find it (the access line
        alone says neither which model nor how busy the server was)."""
        rid = request_id()
        log.warning("%s: no answer for model %s within %g s (running %d, queued %d)", rid, query.model,
                    self.options.timeout, *self.worker.counts())
        return ApiError(504, f"no answer within the server's timeout of {self.options.timeout:g} s; "
                        f"the server is busy or the prompt is slow to answer (request id {rid})",
                        type="timeout_error", code="timeout")

    async def result(self, query: Query, future: "asyncio.Future[Answer]") -> Answer:
        """The job's answer, or its error in OpenAI's shape."""
        from crecli.models.openai import RequestRefused, RungUnavailable

        try:
            return await future
        except PromptTooLong as exc:
            # The client's to fix (a shorter prompt), unlike the model errors below; the full
            # message (a remote rung's address and reply) goes to the server's log only.
            log.info("%s: %s", query.model, exc)
            raise ApiError(400, exc.public, param="messages" if query.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except RungUnavailable as exc:
            # Every server of every rung the request could use failed: say which and why.
            rid = request_id()
            folded = self.refusals.admit("rung_unavailable")
            if folded is not None:
                log.error("%s: %s could not answer: %s%s", rid, query.model, exc, folded)
            # Retry-After: until its first server is due back, when cre itself would try again.
            retry = max(1, math.ceil(exc.retry_after or 0))
            raise ApiError(503, f"{exc.public}; retry later (request id {rid})", type="server_error",
                           code="rung_unavailable", headers={"Retry-After": str(retry)}) from None
        except RequestRefused as exc:
            if query.model in self.cascade_names:  # as `job` decides: a ladder model may be named "cre"
                # cre's own request, not the client's: the model failed (as below).
                raise self.model_error(query, exc) from None
            # A model asked by name got the client's own fields (`serve_worker.sampling`), so
            # its server's refusal is the client's to fix, as that server says it.
            log.info("%s: %s", query.model, exc)
            raise ApiError(400, exc.public, code="request_refused") from None
        except CreError as exc:
            raise self.model_error(query, exc) from None
        except Exception as exc:
            # A bug, as `on_crash` answers one, but here also for a stream under way: it ends
            # with an error event and [DONE] instead of a dropped connection.
            rid = request_id()
            log.exception("%s: internal error (%s: %s)", rid, type(exc).__name__, exc)
            raise ApiError(500, f"internal error; the server's log has the details (request id {rid})",
                           type="server_error") from None

    def model_error(self, query: Query, exc: CreError) -> ApiError:
        """The 500 of a model that could not answer; the details (file paths, `cre models
        pull`, a remote server's address and reply) are for the server's operator, in its log."""
        rid = request_id()
        log.error("%s: %s could not answer: %s", rid, query.model, exc)
        return ApiError(500, f"the model could not answer; the server's log has the details (request id {rid})",
                        type="server_error", code="model_error")

    # ------------------------------------------------------------ the request

    def key_ok(self, request: "Request") -> bool:
        if self._key is None:
            return True
        # Starlette decodes header values as Latin-1, so encoding them back gives the bytes sent.
        given = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, token = given.partition(b" ")
        # Constant time, so a wrong key's timing says nothing about the right one.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    def check_key(self, request: "Request") -> None:
        if not self.key_ok(request):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: "Request") -> bytes:
        """The whole body, within `--max-body`, its bytes counted against the limits as they arrive."""
        from starlette.requests import ClientDisconnect

        max_body = self.options.max_body
        length = request.headers.get("content-length")
        declared = "unknown"
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ApiError(400, "the Content-Length header is not a number")
            # Compared without int() first: Python refuses to convert over 4,300 digits.
            digits = length.lstrip("0")
            if len(digits) > len(str(max_body)) or int(digits or "0") > max_body:
                raise _too_large(max_body)
            declared = f"{int(digits or '0'):,}"
        # Counted as it arrives too: a chunked body has no Content-Length to check first.
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise _too_large(max_body)
                self.limits.take_bytes(len(chunk))
                chunks.append(chunk)
        except ClientDisconnect:
            # A client that gives up mid-upload is routine, not a server error: one line.
            log.info("%s closed the connection after %s of its request body's %s bytes; nothing to answer",
                     client_address(request.client), f"{size:,}", declared)
            raise _ClientGone from None
        finally:
            self.limits.give_bytes(sum(map(len, chunks)))
        return b"".join(chunks)

    # ------------------------------------------------------------ errors and shutdown

    @staticmethod
    def error(exc: ApiError) -> "Response":
        from starlette.responses import JSONResponse

        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_api_error(self, request: "Request", exc: Exception) -> "Response":
        assert isinstance(exc, ApiError)
        # Every refusal of a full server comes through here: the one place that logs them.
        self.refusals.note(request_id(), client_address(request.client), exc)
        return self.error(exc)

    async def on_http_error(self, request: "Request", exc: Exception) -> "Response":
        from starlette.exceptions import HTTPException

        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return self.error(ApiError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}",
                                   code=code, headers=dict(exc.headers or {})))

    async def on_crash(self, request: "Request", exc: Exception) -> "Response":
        # A bug, not the client's fault: say so in OpenAI's shape; uvicorn logs the traceback.
        rid = request_id()
        log.error("%s: internal error (%s: %s); the traceback follows", rid, type(exc).__name__, exc)
        return self.error(ApiError(500, f"internal error; the server's log has the details (request id {rid})",
                                   type="server_error"))

    @asynccontextmanager
    async def lifespan(self, app: Any) -> Any:
        from crecli.models import http

        # Remote rungs' requests go through one pooled async client on this loop.
        pooled = http.LoopTransport(asyncio.get_running_loop(), max_connections=max(64, self.worker.limit))
        previous = http.use(pooled)

        async def tell_folded_refusals() -> None:
            while True:
                await asyncio.sleep(self.refusals.period)
                self.refusals.flush(due_only=True)

        teller = asyncio.create_task(tell_folded_refusals())
        try:
            yield
        finally:
            teller.cancel()
            self.refusals.flush()  # first: a failure closing what follows must not lose the counts
            await asyncio.get_running_loop().run_in_executor(None, self.worker.close)
            http.use(previous)
            await pooled.aclose()


def create_app(
    cascade: "Cascade", options: ServeOptions = ServeOptions(), name: str | None = None, served: "ServedLog | None" = None
) -> "Starlette":
    """The ASGI app answering through `cascade` (see `App`); tests use it through a client."""
    return App(cascade, options, name=name, served=served).asgi()
