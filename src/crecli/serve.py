"""`cre serve`: the cascade behind an OpenAI-compatible HTTP API (Starlette, served by uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
Model "cre" (or the router file's stem) answers through the cascade; a ladder model's name
answers with that model alone, greedily.

Every model computation runs on one worker thread, in arrival order: llama.cpp's threads
spin, so two computations at once on a CPU slow both down more than they gain. The event
loop only parses, checks and queues; a request beyond `max_queue` waiting ones is refused
with 429 at once rather than left to wait for a timeout, and a request beyond
`max_requests` in flight (reading, parsing, queued or running) with 503, both in OpenAI's
error shape. Each request's timeout counts from its arrival, queue time included; on expiry
a queued job is dropped and a running cascade stops at its next rung.

`create_app` builds the app without a socket (tests use it through a client); `run` is
`cre serve`. Starlette and uvicorn are imported only here, inside functions, so `cre --help`
stays fast and the rest of crecli runs without the `serve` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from crecli.errors import CreError, InputError, PromptTooLong
from crecli.querylog import MAX_LINE_BYTES, _Bad, _loads, json_type

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from crecli.escalate import Cascade, Trace
    from crecli.models.backend import Generation
    from crecli.servedlog import ServedLog

CASCADE_MODEL = "cre"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
DEFAULT_TIMEOUT = 300.0
# A prompt may be as long as a query-log line (one cap for both); the body also carries the
# conversation before it and JSON escaping, hence the headroom.
MAX_PROMPT_BYTES = MAX_LINE_BYTES
DEFAULT_MAX_BODY = 4 * MAX_LINE_BYTES
DEFAULT_MAX_TOKENS = 256  # a ladder model asked directly, when the request names none
MAX_TOKENS_LIMIT = 8192
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting behind the running one
    timeout: float = DEFAULT_TIMEOUT  # seconds from arrival to answer, queue time included
    max_body: int = DEFAULT_MAX_BODY  # bytes
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`

    @property
    def max_requests(self) -> int:
        """HTTP requests in flight at once, on every endpoint; more get 503.

        Well above the queue's own limit (max_queue + 1 admitted), so that a full queue
        answers 429 and this only stops a flood of requests still sending their bodies.
        """
        return max(64, 4 * (self.max_queue + 1))


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Query:
    """A checked request: which model, what prompt, how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None


@dataclass
class Answer:
    text: str
    model: str  # the model that answered
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cre: dict[str, Any] = field(default_factory=dict)


class _Abandoned(Exception):
    """The request timed out while its job waited or ran; the worker drops the job."""


# ---------------------------------------------------------------- parsing and checking


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8 text (byte {exc.start})") from None
    try:
        # The query log's reader: refuses deep nesting, huge integers and lone surrogates.
        value = _loads(text, "the request body is not valid JSON")
    except _Bad as exc:
        raise ApiError(400, str(exc)) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(value)}")
    return value


def _expect(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required: give {what}", param=name, code="missing_required_parameter")
        return None
    # bool is an int in Python, but `"max_tokens": true` is a mistake, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json_type(value)}", param=name, code="invalid_type")
    return value


def _common(body: dict[str, Any], kind: str, prompt: str) -> Query:
    model = _expect(body, "model", (str,), "a model name such as \"cre\"", required=True)
    stream = _expect(body, "stream", (bool,), "true or false") or False
    options = _expect(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = _expect(body, name, (int,), f"an integer from 1 to {MAX_TOKENS_LIMIT}")
        if value is not None:
            if not 1 <= value <= MAX_TOKENS_LIMIT:
                raise ApiError(400, f"'{name}' must be from 1 to {MAX_TOKENS_LIMIT}, got {value}", param=name)
            max_tokens = value
    n = _expect(body, "n", (int,), "1")
    if n not in (None, 1):
        raise ApiError(400, "'n' must be 1: cre returns one answer per request", param="n")
    temperature = _expect(body, "temperature", (int, float), "a number from 0 to 2")
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise ApiError(400, f"'temperature' must be from 0 to 2, got {temperature}", param="temperature")
    if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise ApiError(
            400, f"the prompt is over {MAX_PROMPT_BYTES:,} bytes; shorten it", param="messages" if kind == "chat" else "prompt",
            code="prompt_too_long",
        )
    if not prompt.strip():
        raise ApiError(400, "the prompt is empty", param="messages" if kind == "chat" else "prompt")
    return Query(kind=kind, model=model, prompt=prompt, stream=stream, include_usage=include_usage, max_tokens=max_tokens)


def parse_chat(body: dict[str, Any]) -> Query:
    """A chat request's last user message becomes the prompt; earlier turns are not used."""
    messages = _expect(body, "messages", (list,), "a non-empty array of messages", required=True)
    if not messages:
        raise ApiError(400, "'messages' is empty: give at least one user message", param="messages")
    prompt = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object, got {json_type(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            shown = role if isinstance(role, str) else json_type(role)
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {shown!r}", param=f"{where}.role")
        text = _content(message.get("content"), f"{where}.content")
        if role == "user":
            prompt = text
    if prompt is None:
        raise ApiError(400, "'messages' holds no user message to answer", param="messages")
    return _common(body, "chat", prompt)


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or text parts (joined by newlines), or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}: "
                               "cre's models read text only", param=where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or an array of text parts, got {json_type(content)}", param=where)


def parse_completion(body: dict[str, Any]) -> Query:
    prompt = _expect(body, "prompt", (str, list), "a string", required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "'prompt' must be a string (or an array of exactly one string): one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    return _common(body, "completion", prompt)


# ---------------------------------------------------------------- answering


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

    def submit(self, job: Callable[[], Any], cancel: threading.Event) -> "Future[Any]":
        with self._lock:
            if self._admitted >= self.limit:
                raise ApiError(
                    429, f"the server is busy: {self._admitted - 1} requests are waiting, the most it queues; retry later",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": self._retry_after()},
                )
            self._admitted += 1

        def run() -> Any:
            if cancel.is_set():
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


def _cascade_job(
    cascade: "Cascade", prompt: str, cancel: threading.Event, served: "ServedLog | None" = None
) -> "Trace":
    pending = cascade.begin(prompt)
    while not cascade.advance(pending):
        if cancel.is_set():
            raise _Abandoned
    if served is not None:
        # On the worker thread, so the event loop never waits on the disk.
        served.record(prompt, pending.trace, cascade)
    return pending.trace


def _step_summary(step: Any) -> dict[str, Any]:
    return {
        "model": step.model, "agreement": step.agreement, "p_correct": step.p_correct, "votes": step.used,
        "threshold": step.threshold,
        "accepted": step.accepted, "prompt_tokens": step.prompt_tokens, "completion_tokens": step.output_tokens,
        "seconds": round(step.seconds, 4), "why": step.why,
    }


def cascade_answer(cascade: "Cascade", trace: "Trace") -> Answer:
    """The cascade's answer; usage sums every rung (its prompt once) and every vote drawn."""
    cost = cascade.cost_of(trace)
    return Answer(
        text=trace.answer,
        model=trace.model,
        finish_reason="stop",
        prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.output_tokens,
        cre={
            "model": trace.model, "cluster": trace.cluster, "fallback": trace.fallback,
            "start_model": trace.start_model, "escalations": trace.escalations, "agreement": trace.agreement,
            "p_correct": trace.p_correct, "answer_type": trace.answer_type, "cost": cost, "cost_unit": cascade.pricing.unit,
            "seconds": round(trace.seconds, 4), "steps": [_step_summary(s) for s in trace.steps],
        },
    )


def direct_answer(cascade: "Cascade", name: str, gen: "Generation") -> Answer:
    pricing = cascade.pricing
    cost = pricing.tokens(name, gen.prompt_tokens, gen.output_tokens) if pricing.by_tokens else gen.seconds
    return Answer(
        text=gen.text.strip(),
        model=name,
        finish_reason="length" if gen.finish_reason == "length" else "stop",
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.output_tokens,
        cre={"model": name, "cluster": None, "escalations": 0, "agreement": None, "p_correct": None, "cost": cost,
             "cost_unit": pricing.unit, "seconds": round(gen.seconds, 4), "steps": []},
    )


# ---------------------------------------------------------------- responses


def _usage(answer: Answer) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def response_body(query: Query, answer: Answer, rid: str, created: int) -> dict[str, Any]:
    if query.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                                  "logprobs": None, "finish_reason": answer.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": answer.model, "choices": [choice],
            "usage": _usage(answer), "cre": answer.cre}


def stream_events(query: Query, answer: Answer, rid: str, created: int) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format, for an answer already complete.

    The cascade knows its answer only once a rung accepts it, so the whole text comes in one
    content chunk, then a chunk with the finish reason (and the `cre` trace), then `[DONE]`.
    """
    chat = query.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": rid, "object": obj, "created": created, "model": answer.model, "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    if chat:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": answer.text}, "logprobs": None,
                      "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}], cre=answer.cre)
    else:
        yield chunk([{"index": 0, "text": answer.text, "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": answer.finish_reason}], cre=answer.cre)
    if query.include_usage:
        yield chunk([], usage=_usage(answer))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- the app


def create_app(
    cascade: "Cascade", options: ServeOptions = ServeOptions(), name: str | None = None, served: "ServedLog | None" = None
) -> "Starlette":
    """The ASGI app answering through `cascade`; `name` (the router's stem) also means the cascade.

    Cascade answers are recorded in `served` (the served-query log) when given; answers of a
    ladder model asked by name skip the router and are not.

    The caller owns `cascade` and closes it; the app's shutdown stops its worker thread,
    after uvicorn has drained the requests in flight.
    """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    worker = Worker(options.max_queue)
    ladder = list(cascade.ladder)
    cascade_names = [CASCADE_MODEL] + ([name] if name and name != CASCADE_MODEL and name not in ladder else [])
    key = options.api_key.encode("utf-8") if options.api_key else None

    def error(exc: ApiError) -> "Response":
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def check_key(request: "Request") -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Constant time, so a wrong key's timing says nothing about the right one.
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"), key)):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: "Request") -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "the Content-Length header is not a number")
            if int(length) > options.max_body:
                raise _too_large(options.max_body)
        # Counted as it arrives too: a chunked body has no Content-Length to check first.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body:
                raise _too_large(options.max_body)
            chunks.append(chunk)
        return b"".join(chunks)

    async def answer(query: Query, deadline: float) -> Answer:
        cancel = threading.Event()
        job: Callable[[], Any]
        convert: Callable[[Any], Answer]
        if query.model in cascade_names:
            job = lambda: _cascade_job(cascade, query.prompt, cancel, served)  # noqa: E731
            convert = lambda trace: cascade_answer(cascade, trace)  # noqa: E731
        elif query.model in ladder:
            from crecli.models.backend import GenParams

            spec, params = cascade.specs[query.model], GenParams(max_tokens=query.max_tokens or DEFAULT_MAX_TOKENS)
            job = lambda: cascade.pool.get(spec).generate(query.prompt, params)  # noqa: E731
            convert = lambda gen: direct_answer(cascade, query.model, gen)  # noqa: E731
        else:
            raise ApiError(404, f"the model {query.model!r} does not exist here; GET /v1/models lists "
                           f"{', '.join(cascade_names + ladder)}", param="model", code="model_not_found")
        future = worker.submit(job, cancel)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            cancel.set()  # a queued job is dropped; a running cascade stops at its next rung
            raise ApiError(504, f"no answer within the server's timeout of {options.timeout:g} s; "
                           "the server is busy or the prompt is slow to answer", type="timeout_error",
                           code="timeout") from None
        except PromptTooLong as exc:
            # The client's to fix (a shorter prompt), unlike the model errors below.
            raise ApiError(400, str(exc), param="messages" if query.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except CreError as exc:
            raise ApiError(500, str(exc), type="server_error", code="model_error") from None
        return convert(result)

    async def complete(request: "Request", parse: Callable[[dict[str, Any]], Query]) -> "Response":
        # The timeout runs from arrival: a body that trickles in slowly spends it too.
        deadline = time.monotonic() + options.timeout
        check_key(request)
        try:
            raw = await asyncio.wait_for(read_body(request), options.timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {options.timeout:g} s",
                           code="request_timeout") from None
        query = parse(parse_json(raw))
        result = await answer(query, deadline)
        rid = ("chatcmpl-" if query.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if query.stream:
            return StreamingResponse(stream_events(query, result, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(response_body(query, result, rid, created))

    async def chat_completions(request: "Request") -> "Response":
        return await complete(request, parse_chat)

    async def completions(request: "Request") -> "Response":
        return await complete(request, parse_completion)

    async def models(request: "Request") -> "Response":
        check_key(request)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "cre", "cre": {"kind": "cascade"}}
                for n in cascade_names]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "cre", "cre": {"kind": "model", "rung": i}}
                 for i, n in enumerate(ladder)]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: "Request") -> "Response":
        # Unauthenticated on purpose, for load balancers: it says nothing about the models.
        return JSONResponse({"status": "ok", "running": worker.running, "queued": worker.queued,
                             "max_queue": options.max_queue})

    async def on_api_error(request: "Request", exc: Exception) -> "Response":
        assert isinstance(exc, ApiError)
        return error(exc)

    async def on_http_error(request: "Request", exc: Exception) -> "Response":
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                              headers=dict(exc.headers or {})))

    async def on_crash(request: "Request", exc: Exception) -> "Response":
        # A bug, not the client's fault: say so in OpenAI's shape; uvicorn logs the traceback.
        return error(ApiError(500, f"internal error ({type(exc).__name__}); see the server's log", type="server_error"))

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.close)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
        middleware=[Middleware(_RequestLimit, limit=options.max_requests, worker=worker)],
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


class _RequestLimit:
    """ASGI middleware: an HTTP request beyond `limit` in flight gets 503 in OpenAI's shape.

    It replaces uvicorn's `limit_concurrency`, whose refusal is a plain-text 503 that OpenAI
    clients cannot read, and which counts idle keep-alive connections as load.
    """

    def __init__(self, app: Any, limit: int, worker: Worker) -> None:
        self.app, self.limit, self.worker = app, limit, worker
        self.active = 0  # only the event loop's thread touches it

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            from starlette.responses import JSONResponse

            exc = ApiError(503, f"the server is overloaded: {self.active} requests are in flight, the most it "
                           "takes at once; retry later", type="server_error", code="overloaded")
            # Closing the connection, unread body and all, frees it for a client that can be served.
            headers = {"Retry-After": self.worker.retry_after(), "Connection": "close"}
            await JSONResponse(exc.body(), status_code=503, headers=headers)(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)",
                    code="request_too_large")


# ---------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is a CreError rather than uvicorn's exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"--host {host!r}: not an address this machine can resolve ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening now, before the models and uvicorn are ready, lets early clients wait
        # in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CreError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    return sock


def make_server(app: "Starlette", options: ServeOptions, log_level: str = "info") -> Any:  # -> uvicorn.Server
    """uvicorn with its logs on stderr (stdout stays for data) and a drain bound for SIGTERM."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(
        app,
        log_config=log_config,
        log_level=log_level,
        server_header=False,
        # On SIGTERM uvicorn stops accepting, finishes the requests in flight, then exits;
        # none can outlive its own timeout, so that bounds the drain.
        timeout_graceful_shutdown=math.ceil(options.timeout) + 5,
        # Idle keep-alive connections are closed soon. No `limit_concurrency`: the app
        # refuses requests beyond `options.max_requests` itself, in OpenAI's shape
        # (`_RequestLimit`); uvicorn's limit would answer plain text first.
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


def read_api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise InputError(f"--api-key-env {env_name}: that environment variable is empty or unset; export the key in it")
    return value.strip()


def run(
    router: Path,
    models_file: Path | None = None,
    options: ServeOptions = ServeOptions(),
    *,
    force: bool = False,
    memory_budget_bytes: int | None = None,
    api_key_env: str | None = None,
    no_log: bool = False,
) -> None:
    """`cre serve`: load the router, bind, and answer until SIGTERM or Ctrl-C."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CreError("`cre serve` needs the serve extra: pip install 'crecli[serve]'") from None
    from dataclasses import replace

    from crecli import servedlog
    from crecli.console import status, warn
    from crecli.escalate import Cascade

    options = replace(options, api_key=read_api_key(api_key_env))
    served = servedlog.for_command("serve", no_log, router)
    if options.api_key is None and not is_loopback(options.host):
        warn(f"serving on {options.host}, which other machines can reach, with no API key: anyone who can "
             "connect can use your models; pass --api-key-env NAME")
    sock = listen(options.host, options.port)
    with sock, Cascade.from_file(router, models_file, force=force, memory_budget_bytes=memory_budget_bytes) as cascade:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        status(f"cre serve: {router} on http://{shown}:{port}/v1 (models: {CASCADE_MODEL}, {', '.join(cascade.ladder)})")
        if served.enabled:
            status(f"cre serve: logging answered prompts to {served.path} (--no-log to stop)")
        serve_forever(cascade, options, sock, name=router.stem, served=served)


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def serve_forever(
    cascade: "Cascade", options: ServeOptions, sock: socket.socket, name: str | None = None,
    served: "ServedLog | None" = None,
) -> None:
    """Answer on `sock` until SIGTERM (drain the requests in flight, then return) or Ctrl-C.

    uvicorn drains on SIGTERM and then raises the signal again, which by default kills the
    process before the cascade's models are closed; our handler turns it into a return,
    so the caller closes them and `cre serve` exits 0.
    """
    import signal

    server = make_server(create_app(cascade, options, name=name, served=served), options)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])  # signals reach only the main thread; the caller stops it
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
