"""The OpenAI wire protocol of `cre serve`: request bodies in, response bodies and stream events out.

Pure functions and records, testable without a server:

- parsing and checking: `parse_json` reads a body (through `safejson`), `parse_chat` and
  `parse_completion` check every field for type and range and make a `Query`. Every field a
  request may carry is named in one place: `APPLIED` (cre uses them), `METADATA` (checked,
  then not used) and `UNSUPPORTED` (a 400 naming the field unless its value asks for
  nothing). A problem is an `ApiError`, which knows its HTTP status and OpenAI's error shape.
- shaping: an `Answer` (from a cascade's trace or one ladder model's generation, with its
  cost and the `cre` object) becomes a response body (`response_body`) or server-sent
  events (`stream_events`), with OpenAI's `usage`.

What answers a query (`serve_worker`), how requests are admitted and handled (`serve_app`)
and served (`serve`) is theirs: nothing here knows of a cascade object, a thread or a socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

# `cut_at_stop` is the one rule for `stop` on every answer: a ladder model also stops
# generating there, and a cascade's answer, decided by its check on whole answers, is cut
# after the fact (re-exported here, where callers have long found it).
from crecli.models.backend import StopSafeEmitter, cut_at_stop, held_back  # noqa: F401
from crecli.querylog import MAX_LINE_BYTES
from crecli.safejson import JsonError, finite, json_type, loads

if TYPE_CHECKING:
    from crecli.trace import Trace
    from crecli.models.backend import Generation

# A prompt may be as long as a query-log line (one cap for both).
MAX_PROMPT_BYTES = MAX_LINE_BYTES
MAX_TOKENS_LIMIT = 8192
# The largest max_tokens a request may give (a 32-bit count, as OpenAI's API takes); one
# over MAX_TOKENS_LIMIT is applied as that.
MAX_TOKENS_ASKED = 2**31 - 1
MAX_SEED = 2**31 - 1  # what every runtime takes (llama.cpp's is 32-bit; its all-ones seed means "random")
MAX_STOP = 4  # stop strings, as OpenAI allows
# Characters in one stop string. Streaming checks every token's text against each stop's
# prefixes (`held_back`), which costs its length squared: a megabyte of stop held a model
# for minutes a token. Stops in use are a few characters ("\n\n", "</answer>").
MAX_STOP_CHARS = 256
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


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
        if code is None and status == 400 and param is not None:
            code = "invalid_value"  # a refused field always has a code, which clients branch on
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
    # Sampling, applied where the answering model can (`serve_worker.sampling` says where): None is unset.
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Answer:
    """What a response says, whichever model answered and however it is sent."""

    text: str
    model: str  # the model that answered
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cre: dict[str, Any] = field(default_factory=dict)


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
    if value is None:
        return None
    number = finite(value)
    if number is None or not low <= number <= high:
        # A 4,000-digit integer is not quoted back whole.
        shown = value if number is not None else "a number past any float"
        raise ApiError(400, f"'{name}' must be from {low:g} to {high:g}, got {shown}", param=name, code="invalid_value")
    return number


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = _expect(body, "stop", (str, list), f"a string or an array of up to {MAX_STOP} strings")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or an array of 1 to {MAX_STOP} non-empty strings",
                       param="stop", code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' strings must be at most {MAX_STOP_CHARS} characters each",
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
            shown = cut_name(name)
            raise ApiError(400, f"{shown!r} is not a field cre serve knows; it takes "
                           f"{', '.join(APPLIED[kind])} (and {', '.join(METADATA)})", param=shown[:64],
                           code="unknown_parameter")


def cut_name(name: str, limit: int = 64) -> str:
    """A client's name (a field's, a model's) as an error shows it: up to `limit` characters
    and "...", so a multi-megabyte name does not come back whole."""
    return name if len(name) <= limit else name[:limit] + "..."


def _common(body: dict[str, Any], kind: str, prompt: str) -> Query:
    check_fields(body, kind)
    model = _expect(body, "model", (str,), "a model name such as \"cre\"", required=True)
    stream = _expect(body, "stream", (bool,), "true or false") or False
    options = _expect(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", param="stream_options",
                       code="invalid_type")
    # OpenAI and vLLM refuse it: a client that sent it expects a stream. An empty object asks
    # for nothing and passes, as vLLM lets it (and as `UNSUPPORTED` lets such values).
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    max_tokens = None
    # Both are checked; where both are given, `max_completion_tokens` (OpenAI's current name,
    # `max_tokens` being deprecated for chat) is the one applied, as vLLM applies it.
    # Any positive count is taken, and a larger one than MAX_TOKENS_LIMIT applied as it (the
    # model's context stops an answer sooner anyway): clients that send a large default
    # (16384, a model's whole window) were refused on every request, the cascade's too,
    # which does not use it.
    for name in ("max_tokens", "max_completion_tokens"):
        value = _expect(body, name, (int,), f"an integer from 1 to {MAX_TOKENS_ASKED}")
        if value is not None:
            if not 1 <= value <= MAX_TOKENS_ASKED:
                raise ApiError(400, f"'{name}' must be from 1 to {MAX_TOKENS_ASKED}, got {value}", param=name,
                               code="invalid_value")
            max_tokens = min(value, MAX_TOKENS_LIMIT)
    n = _expect(body, "n", (int,), "1")
    if n not in (None, 1):
        raise ApiError(400, "'n' must be 1: cre returns one answer per request", param="n", code="invalid_value")
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


class StreamText(StopSafeEmitter):
    """An answer's text as it is generated, turned into what the response will say: cut at
    the first `stop` string, leading whitespace dropped, trailing whitespace and the start of
    a possible stop string held back until more text shows what they are. The same rules
    `cut_at_stop` and `strip` apply to a whole answer, applied to its pieces, so what `emit`
    gets is always a prefix of the final text (`StopSafeEmitter.add` takes each piece, at
    its own cost; this strips what it lets out); `finish` sends the rest of it.
    """

    def __init__(self, stop: tuple[str, ...], emit: Callable[[str], None]) -> None:
        super().__init__(stop, emit)
        self._space: list[str] = []  # trailing whitespace, sent once text follows it

    def _out(self, safe: str) -> None:
        if not self._sent:
            safe = safe.lstrip()
        body = safe.rstrip()
        if body:
            self._emit("".join(self._space) + body)
            self._space = []
        if len(body) < len(safe):
            self._space.append(safe[len(body):])

    def finish(self, final: str) -> None:
        """Send whatever of `final`, the answer's whole text (already cut and stripped), is
        not sent yet."""
        self._rest(final)


# ---------------------------------------------------------------- answers


def _step_summary(step: Any) -> dict[str, Any]:
    return {
        "model": step.model, "agreement": step.agreement, "p_correct": step.p_correct, "votes": step.used,
        "threshold": step.threshold,
        "accepted": step.accepted, "prompt_tokens": step.prompt_tokens, "completion_tokens": step.output_tokens,
        "seconds": round(step.seconds, 4), "why": step.why,
    }


def cascade_answer(trace: "Trace", cost: float | None, unit: str, stop: tuple[str, ...] = ()) -> Answer:
    """The cascade's answer, cut at the first `stop` string; usage sums every rung (its prompt
    once) and every vote drawn. `cost` is the trace's, in `unit`, priced by the caller. Its
    finish_reason is "length" where the answering rung ran out of room (`Trace.cut`: a rung's
    answer-type token cap, or the context) and no stop string cut it first, as `direct_answer`'s."""
    text, cut = cut_at_stop(trace.answer, stop)
    return Answer(
        text=text.strip(),
        model=trace.model,
        finish_reason="length" if trace.cut and not cut else "stop",
        prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.output_tokens,
        cre={
            "model": trace.model, "cluster": trace.cluster, "fallback": trace.fallback,
            "start_model": trace.start_model, "escalations": trace.escalations, "agreement": trace.agreement,
            "p_correct": trace.p_correct, "answer_type": trace.answer_type, "cost": cost, "cost_unit": unit,
            "seconds": round(trace.seconds, 4), "steps": [_step_summary(s) for s in trace.steps],
        },
    )


def direct_answer(name: str, gen: "Generation", cost: float | None, unit: str, stop: tuple[str, ...] = ()) -> Answer:
    """Ladder model `name`'s answer, cut at the first `stop` string; `cost` is the generation's,
    in `unit`, priced by the caller."""
    # The model was asked to stop there too; cutting again covers a remote server that ignores it.
    text, cut = cut_at_stop(gen.text, stop)
    return Answer(
        text=text.strip(),
        model=name,
        finish_reason="length" if gen.finish_reason == "length" and not cut else "stop",
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.output_tokens,
        cre={"model": name, "cluster": None, "escalations": 0, "agreement": None, "p_correct": None, "cost": cost,
             "cost_unit": unit, "seconds": round(gen.seconds, 4), "steps": []},
    )


# ---------------------------------------------------------------- responses


def usage(answer: Answer) -> dict[str, int]:
    """OpenAI's `usage` object."""
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
            "usage": usage(answer), "cre": answer.cre}


def stream_events(query: Query, answer: Answer, rid: str, created: int) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format, for an answer already complete: the whole
    text in one content chunk, then `stream_end` (the cascade knew its answer only once a
    rung kept it, and that rung could not stream)."""
    yield stream_chunk(query, answer.model, rid, created, answer.text, role=True)
    yield from stream_end(query, answer, rid, created)


def stream_chunk(query: Query, model: str, rid: str, created: int, text: str, role: bool = False) -> str:
    """One content chunk of a stream (the first carries the assistant role, in chat)."""
    if query.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
        return _event(query, rid, created, model, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
    return _event(query, rid, created, model, [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])


def stream_end(query: Query, answer: Answer, rid: str, created: int) -> Iterator[str]:
    """A stream's last events: the finish reason with the `cre` trace, the usage when asked
    for (`stream_options.include_usage`), then `[DONE]`."""
    empty: dict[str, Any] = {"delta": {}} if query.kind == "chat" else {"text": ""}
    yield _event(query, rid, created, answer.model,
                 [{"index": 0, **empty, "logprobs": None, "finish_reason": answer.finish_reason}], cre=answer.cre)
    if query.include_usage:
        yield _event(query, rid, created, answer.model, [], usage=usage(answer))
    yield "data: [DONE]\n\n"


def stream_error(error: ApiError) -> Iterator[str]:
    """How a stream that has started ends when its answer fails: OpenAI's error object as an
    event, then `[DONE]` (the status line went out with the first token)."""
    yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _event(query: Query, rid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    obj = "chat.completion.chunk" if query.kind == "chat" else "text_completion"
    # With usage asked for, every chunk but the last carries `"usage": null`, as OpenAI's and
    # vLLM's do: a client may read the field on each chunk.
    empty_usage = {"usage": None} if query.include_usage else {}
    data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **empty_usage, **extra}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


