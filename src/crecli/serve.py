"""`cre serve`: the cascade behind an OpenAI-compatible HTTP API (Starlette, served by uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
Model "cre" (or the router file's stem) answers through the cascade; a ladder model's name
answers with that model alone (greedily unless the request sets a temperature).

Every model computation runs on one worker thread, in arrival order: llama.cpp's threads
spin, so two computations at once on a CPU slow both down more than they gain. The event
loop only reads, parses, checks and queues; a request beyond `max_queue` waiting ones is
refused with 429 at once rather than left to wait for a timeout, and a request beyond
`max_requests` past its body (parsing, queued or running) with 503, both in OpenAI's error
shape. Each request's timeout counts from its arrival, queue time included; on expiry (or
when its client leaves) a queued job is dropped and a running cascade stops at its next rung.

Slow clients cannot hold the server: headers and bodies have their own short deadlines
(`guarded_protocol`, `--header-timeout`, `--body-timeout`), a body still arriving takes
no place among the requests in flight (`Limits`), and /health runs on the event loop alone.

`create_app` builds the app without a socket (tests use it through a client); `run` is
`cre serve`. Starlette and uvicorn are imported only here, inside functions, so `cre --help`
stays fast and the rest of crecli runs without the `serve` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from crecli.errors import CreError, InputError, PromptTooLong
from crecli.querylog import MAX_LINE_BYTES
from crecli.safejson import JsonError, json_type, loads

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from crecli.config import ModelSpec
    from crecli.escalate import Cascade, Trace
    from crecli.models.backend import Generation, GenParams
    from crecli.servedlog import ServedLog

CASCADE_MODEL = "cre"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
DEFAULT_TIMEOUT = 300.0
# A client's request line and headers, then its body, get their own short deadlines, so that
# a slow or stalled client holds a connection for seconds, not for the answer's --timeout.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
# A prompt may be as long as a query-log line (one cap for both); the body also carries the
# conversation before it and JSON escaping, hence the headroom.
MAX_PROMPT_BYTES = MAX_LINE_BYTES
DEFAULT_MAX_BODY = 4 * MAX_LINE_BYTES
DEFAULT_MAX_TOKENS = 256  # a ladder model asked directly, when the request names none
MAX_TOKENS_LIMIT = 8192
MAX_SEED = 2**31 - 1  # what every runtime takes (llama.cpp's is 32-bit; its all-ones seed means "random")
MAX_STOP = 4  # stop strings, as OpenAI allows
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Parsing a large body holds the event loop; past this size it runs on a thread, so that
# /health and other clients are answered meanwhile.
THREAD_PARSE_BYTES = 64 << 10

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: stderr, with its format


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting behind the running one
    timeout: float = DEFAULT_TIMEOUT  # seconds from arrival to answer, queue time included
    max_body: int = DEFAULT_MAX_BODY  # bytes
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds for a request line and its headers
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds for a body, once its headers are in

    @property
    def max_requests(self) -> int:
        """Requests past their body (parsing, queued, running) at once; more get 503.

        Well above the queue's own limit (max_queue + 1 admitted), so that a full queue
        answers 429. A request still sending its body does not count: slow uploads must not
        lock out the clients that have sent theirs (`body_budget` bounds them instead).
        """
        return max(64, 4 * (self.max_queue + 1))

    @property
    def body_budget(self) -> int:
        """Bytes of request bodies being received at once; a body that would go past it gets 503.

        As many whole bodies as requests may be in flight: memory stays bounded however many
        clients upload at once, while a thousand slow uploads, holding little each, do not
        keep anyone else out.
        """
        return self.max_requests * self.max_body


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
    # Sampling, applied where the answering model can (`sampling` says where): None is unset.
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
#
# Pure functions of the request body: every field a request may carry is named below, in one
# place, and each is checked for type and range before anything runs.

# Fields cre applies; `_common` and the parsers check them.
APPLIED = {
    "chat": ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
             "temperature", "top_p", "seed", "stop"),
    "completion": ("model", "prompt", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p",
                   "seed", "stop"),
}
# Harmless metadata: checked for type, then not used.
METADATA: dict[str, tuple[tuple[type, ...], str]] = {
    "user": ((str,), "a string"),
    "metadata": ((dict,), "an object"),
}
# Fields cre cannot honour: a 400 that names the field, unless the value is the one that asks
# for nothing (what some clients send by default); null is always absent.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: v == [], "cre's models answer in text; they do not call tools"),
    "tool_choice": (lambda v: v == "none", "cre's models answer in text; they do not call tools"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "cre's models do not call tools"),
    "functions": (lambda v: v == [], "cre's models answer in text; they do not call functions"),
    "function_call": (lambda v: v == "none", "cre's models answer in text; they do not call functions"),
    "response_format": (lambda v: v == {"type": "text"}, "only {\"type\": \"text\"} answers are supported"),
    "logprobs": (lambda v: v is False or (v == 0 and not isinstance(v, bool) and isinstance(v, int)),
                 "cre does not return log-probabilities yet"),
    "top_logprobs": (lambda v: v == 0 and isinstance(v, int) and not isinstance(v, bool),
                     "cre does not return log-probabilities yet"),
    "frequency_penalty": (lambda v: v == 0 and isinstance(v, (int, float)) and not isinstance(v, bool),
                          "cre's models sample without penalties"),
    "presence_penalty": (lambda v: v == 0 and isinstance(v, (int, float)) and not isinstance(v, bool),
                         "cre's models sample without penalties"),
    "logit_bias": (lambda v: v == {}, "cre's models sample without logit biases"),
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "cre returns one answer per request"),
    "echo": (lambda v: v is False, "cre does not echo the prompt"),
    "suffix": (lambda v: v == "", "cre's models do not insert text"),
    "modalities": (lambda v: v == ["text"], "cre's models read and write text only"),
    "audio": (lambda v: False, "cre's models read and write text only"),
    "prediction": (lambda v: False, "cre does not take predicted outputs"),
    "reasoning_effort": (lambda v: False, "cre's models do not take a reasoning effort"),
    "web_search_options": (lambda v: False, "cre's models do not search the web"),
}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8 text (byte {exc.start})") from None
    try:
        # Refuses deep nesting, huge integers and lone surrogates, as every reader of outside JSON does.
        value = loads(text, "the request body is not valid JSON")
    except JsonError as exc:
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


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = _expect(body, name, (int, float), f"a number from {low:g} to {high:g}")
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise ApiError(400, f"'{name}' must be from {low:g} to {high:g}, got {value}", param=name, code="invalid_value")
    return None if value is None else float(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = _expect(body, "stop", (str, list), f"a string or an array of up to {MAX_STOP} strings")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or an array of 1 to {MAX_STOP} non-empty strings",
                       param="stop", code="invalid_value")
    return tuple(stops)


def check_fields(body: dict[str, Any], kind: str) -> None:
    """A 400 naming the first field cre cannot honour, or does not know, or whose metadata type is wrong."""
    for name, value in body.items():
        if value is None or name in APPLIED[kind]:
            continue
        if name in METADATA:
            kinds, what = METADATA[name]
            _expect(body, name, kinds, what)
        elif name in UNSUPPORTED:
            neutral, why = UNSUPPORTED[name]
            if not neutral(value):
                raise ApiError(400, f"'{name}' is not supported: {why}; leave it out", param=name,
                               code="unsupported_parameter")
        else:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ApiError(400, f"{shown!r} is not a field cre serve knows; it takes "
                           f"{', '.join(APPLIED[kind])} (and {', '.join(METADATA)})", param=shown[:64],
                           code="unknown_parameter")


def _common(body: dict[str, Any], kind: str, prompt: str) -> Query:
    check_fields(body, kind)
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
    seed = _expect(body, "seed", (int,), f"an integer from 0 to {MAX_SEED}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"'seed' must be from 0 to {MAX_SEED}, got {seed}", param="seed", code="invalid_value")
    query = Query(kind=kind, model=model, prompt=prompt, stream=stream, include_usage=include_usage,
                  max_tokens=max_tokens, temperature=_number(body, "temperature", 0, 2),
                  top_p=_number(body, "top_p", 0, 1), seed=seed, stop=_stop(body))
    if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise ApiError(
            400, f"the prompt is over {MAX_PROMPT_BYTES:,} bytes; shorten it", param="messages" if kind == "chat" else "prompt",
            code="prompt_too_long",
        )
    if not prompt.strip():
        raise ApiError(400, "the prompt is empty", param="messages" if kind == "chat" else "prompt")
    return query


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
            shown = role[:32] if isinstance(role, str) else json_type(role)
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


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first place any stop string starts, and whether it was cut.

    The one rule for `stop` on every answer: a ladder model also stops generating there, and
    a cascade's answer, decided by its check on whole answers, is cut after the fact.
    """
    ends = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


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


# ---------------------------------------------------------------- answering


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


def _cascade_job(
    cascade: "Cascade", prompt: str, ticket: Ticket, served: "ServedLog | None" = None
) -> "Trace":
    pending = cascade.begin(prompt)
    while not cascade.advance(pending):
        if ticket.is_set():
            raise _Abandoned
    # Only an answer its request will send is served: one that came after the request gave
    # up (a 504, a client gone) is dropped here, unrecorded.
    if not ticket.claim():
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


def cascade_answer(cascade: "Cascade", trace: "Trace", stop: tuple[str, ...] = ()) -> Answer:
    """The cascade's answer, cut at the first `stop` string; usage sums every rung (its prompt
    once) and every vote drawn."""
    cost = cascade.cost_of(trace)
    return Answer(
        text=cut_at_stop(trace.answer, stop)[0].strip(),
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


def direct_answer(cascade: "Cascade", name: str, gen: "Generation", stop: tuple[str, ...] = ()) -> Answer:
    pricing = cascade.pricing
    cost = pricing.tokens(name, gen.prompt_tokens, gen.output_tokens) if pricing.by_tokens else gen.seconds
    # The model was asked to stop there too; cutting again covers a remote server that ignores it.
    text, cut = cut_at_stop(gen.text, stop)
    return Answer(
        text=text.strip(),
        model=name,
        finish_reason="length" if gen.finish_reason == "length" and not cut else "stop",
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


# ---------------------------------------------------------------- health


def rung_state(spec: "ModelSpec") -> str:
    """Whether a rung can answer, by cheap checks only (a stat and 4 bytes; no model runs):
    "remote" (a configured server), "ready" (a GGUF file of the pinned size), or what is wrong.

    No path is named: /health answers anyone who can connect.
    """
    import stat

    from crecli.models.pull import is_gguf

    if spec.url:
        return "remote"
    path = spec.file
    assert path is not None
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return "missing"
        if spec.size is not None and info.st_size != spec.size:
            return "wrong size"
        return "ready" if is_gguf(path) else "not a GGUF file"
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"


USABLE = ("ready", "remote")


def health_report(states: dict[str, str]) -> tuple[int, str]:
    """The HTTP status and word for /health: 200 "ok" when every rung can answer, 200
    "degraded" when some can, 503 "unavailable" when none can (a load balancer's signal)."""
    usable = sum(state in USABLE for state in states.values())
    if usable == len(states):
        return 200, "ok"
    return (200, "degraded") if usable else (503, "unavailable")


# ---------------------------------------------------------------- the app


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class _ClientGone(ApiError):
    """The client closed its connection; the response is never sent (uvicorn drops it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", code="client_closed")


class Limits:
    """What the app holds at once. Requests past their body (parsing, queued, running) are
    counted against `max_requests`; bodies still arriving, against `body_budget` bytes.

    Only the event loop's thread touches it, so there is no lock.
    """

    def __init__(self, options: ServeOptions, worker: Worker) -> None:
        self.max_requests, self.budget, self.worker = options.max_requests, options.body_budget, worker
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

    @contextmanager
    def admitted(self) -> Iterator[None]:
        if self.active >= self.max_requests:
            raise self.overloaded(f"{self.active} requests are in flight, the most it takes at once")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Returns when the client has gone; only called once the request's body is all read."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _address(client: Any) -> str:
    """A client's (host, port) as the log shows it."""
    return "%s:%d" % tuple(client) if client else "a client"


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
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    worker = Worker(options.max_queue)
    limits = Limits(options, worker)
    ladder = list(cascade.ladder)
    cascade_names = [CASCADE_MODEL] + ([name] if name and name != CASCADE_MODEL and name not in ladder else [])
    # Bytes, compared with the header's bytes: a key in UTF-8 (or any bytes the environment
    # held) authenticates as sent.
    key = options.api_key.encode("utf-8", "surrogateescape") if options.api_key else None

    def error(exc: ApiError) -> "Response":
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def key_ok(request: "Request") -> bool:
        if key is None:
            return True
        # Starlette decodes header values as Latin-1, so encoding them back gives the bytes sent.
        given = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, token = given.partition(b" ")
        # Constant time, so a wrong key's timing says nothing about the right one.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)

    def check_key(request: "Request") -> None:
        if not key_ok(request):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: "Request") -> bytes:
        length = request.headers.get("content-length")
        declared = "unknown"
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ApiError(400, "the Content-Length header is not a number")
            # Compared without int() first: Python refuses to convert over 4,300 digits.
            digits = length.lstrip("0")
            if len(digits) > len(str(options.max_body)) or int(digits or "0") > options.max_body:
                raise _too_large(options.max_body)
            declared = f"{int(digits or '0'):,}"
        # Counted as it arrives too: a chunked body has no Content-Length to check first.
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > options.max_body:
                    raise _too_large(options.max_body)
                limits.take_bytes(len(chunk))
                chunks.append(chunk)
        except ClientDisconnect:
            # A client that gives up mid-upload is routine, not a server error: one line.
            log.info("%s closed the connection after %s of its request body's %s bytes; nothing to answer",
                     _address(request.client), f"{size:,}", declared)
            raise _ClientGone from None
        finally:
            limits.give_bytes(sum(map(len, chunks)))
        return b"".join(chunks)

    async def answer(request: "Request", query: Query, deadline: float) -> Answer:
        ticket = Ticket()
        job: Callable[[], Any]
        convert: Callable[[Any], Answer]
        if query.model in cascade_names:
            job = lambda: _cascade_job(cascade, query.prompt, ticket, served)  # noqa: E731
            convert = lambda trace: cascade_answer(cascade, trace, query.stop)  # noqa: E731
        elif query.model in ladder:
            spec, params = cascade.specs[query.model], sampling(query)
            job = lambda: cascade.pool.get(spec).generate(query.prompt, params)  # noqa: E731
            convert = lambda gen: direct_answer(cascade, query.model, gen, query.stop)  # noqa: E731
        else:
            raise ApiError(404, f"the model {query.model!r} does not exist here; GET /v1/models lists "
                           f"{', '.join(cascade_names + ladder)}", param="model", code="model_not_found")
        future = asyncio.wrap_future(worker.submit(job, ticket))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({future, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        # Unless the job has claimed its answer (it is being recorded, and will be sent), a
        # request that gives up drops its job: queued, it never runs; running, a cascade
        # stops at its next rung.
        if future not in done and ticket.cancel():
            future.cancel()
            if gone in done:
                log.info("%s closed the connection before its answer; its job is dropped", _address(request.client))
                raise _ClientGone
            raise ApiError(504, f"no answer within the server's timeout of {options.timeout:g} s; "
                           "the server is busy or the prompt is slow to answer", type="timeout_error",
                           code="timeout")
        try:
            result = await future
        except PromptTooLong as exc:
            # The client's to fix (a shorter prompt), unlike the model errors below.
            raise ApiError(400, str(exc), param="messages" if query.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except CreError as exc:
            # The details (file paths, `cre models pull`) are for the server's operator.
            rid = new_request_id()
            log.error("%s: %s could not answer: %s", rid, query.model, exc)
            raise ApiError(500, f"the model could not answer; the server's log has the details (request id {rid})",
                           type="server_error", code="model_error", headers={"X-Request-Id": rid}) from None
        return convert(result)

    async def complete(request: "Request", parse: Callable[[dict[str, Any]], Query]) -> "Response":
        # The timeout runs from arrival: a body that trickles in slowly spends it too.
        deadline = time.monotonic() + options.timeout
        check_key(request)
        wait = min(options.body_timeout, options.timeout)
        try:
            raw = await asyncio.wait_for(read_body(request), wait)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {wait:g} s (--body-timeout)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        # Counted from here, with its body read: a slow upload holds no place another client needs.
        with limits.admitted():
            if len(raw) > THREAD_PARSE_BYTES:
                body = await asyncio.get_running_loop().run_in_executor(None, parse_json, raw)
            else:
                body = parse_json(raw)
            query = parse(body)
            result = await answer(request, query, deadline)
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
        # Unauthenticated, for load balancers, and on the event loop alone: it never waits
        # behind model work. Which models are which only with the key, when one is set.
        states = {n: rung_state(cascade.specs[n]) for n in ladder}
        status, word = health_report(states)
        body: dict[str, Any] = {"status": word, "running": worker.running, "queued": worker.queued,
                                "max_queue": options.max_queue}
        if key_ok(request):
            body["models"] = states
        return JSONResponse(body, status_code=status)

    async def on_api_error(request: "Request", exc: Exception) -> "Response":
        assert isinstance(exc, ApiError)
        return error(exc)

    async def on_http_error(request: "Request", exc: Exception) -> "Response":
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}", code=code,
                              headers=dict(exc.headers or {})))

    async def on_crash(request: "Request", exc: Exception) -> "Response":
        # A bug, not the client's fault: say so in OpenAI's shape; uvicorn logs the traceback.
        rid = new_request_id()
        log.error("%s: internal error (%s: %s); the traceback follows", rid, type(exc).__name__, exc)
        return error(ApiError(500, f"internal error; the server's log has the details (request id {rid})",
                              type="server_error", headers={"X-Request-Id": rid}))

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
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.limits = limits
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit:,} bytes (--max-body)",
                    code="request_too_large")


# ---------------------------------------------------------------- the connection


def _raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's shape, for the protocol to write itself when
    no request reached the app; it closes the connection."""
    import http

    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def guarded_protocol(header_timeout: float, body_timeout: float) -> type:
    """uvicorn's h11 protocol with deadlines uvicorn lacks, one timer a connection:

    - a request line and headers must arrive within `header_timeout` of the connection
      opening or of their first byte (keep-alive idle time is uvicorn's own timer), else 408
      and the connection closes: a client cannot hold a connection by sending headers slowly;
    - a body must arrive within `body_timeout` of its headers. The app answers 408 for bodies
      it reads; this closes connections still sending a body nobody reads, after their
      answer (a 401, 404 or 413 sent early), a second later.

    uvicorn's plain-text 400 for a malformed request is JSON in OpenAI's shape here too.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _timer_for: tuple[str, int] | None = None
        _responses = 0  # completed on this connection: which request a deadline is for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            self._responses += 1
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            why = f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})"
            self.transport.write(_raw_error(400, why, "bad_request"))
            self.transport.close()

        def _watch(self) -> None:
            state = self.conn.their_state
            if self.transport.is_closing():
                self._disarm()
            elif state is h11.IDLE and (self._responses == 0 or self._started()):
                self._arm(("headers", self._responses), header_timeout)
            elif state is h11.SEND_BODY:
                self._arm(("body", self._responses), body_timeout + 1.0)
            else:  # a request is complete, or an idle keep-alive connection (uvicorn's timer)
                self._disarm()

        def _started(self) -> bool:
            """Bytes of a next request have come (blank lines between requests do not count)."""
            return bool(self.conn.trailing_data[0].strip())

        def _arm(self, what: tuple[str, int], seconds: float) -> None:
            if self._timer_for != what:
                self._disarm()
                self._timer, self._timer_for = self.loop.call_later(seconds, self._expired), what

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._timer_for = None

        def _expired(self) -> None:
            what, self._timer, self._timer_for = self._timer_for, None, None
            if self.transport.is_closing() or what is None:
                return
            if what[0] == "headers" and self._started():
                log.info("%s sent no complete request headers within %g s (--header-timeout); closed",
                         _address(self.client), header_timeout)
                self.transport.write(_raw_error(408, f"the request headers did not arrive within {header_timeout:g} s "
                                                "(--header-timeout)", "request_timeout"))
            self.transport.close()

    return GuardedH11Protocol


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
        # (`Limits`); uvicorn's limit would answer plain text first, and count slow clients.
        timeout_keep_alive=5,
        # h11 (pure Python, always installed) with deadlines for headers and bodies.
        http=guarded_protocol(options.header_timeout, options.body_timeout),
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
