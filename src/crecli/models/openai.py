"""A remote rung: any OpenAI-compatible server (llama.cpp's llama-server, vLLM, SGLang, Ollama).

models.toml names the server with `url` (the API root, e.g. http://127.0.0.1:8080/v1; an
array of them for replicas of the same model), the model with `api_model`, optionally
`api_key_env`, the environment variable that holds the API key (the key itself never goes
into a file; whitespace around it, such as a file's last newline, is dropped, and a key
holding what no HTTP header carries is refused, never shown), and `max_in_flight`, the
requests each server holds at once. Completion-style
formats post the rendered prompt to `{url}/completions`, so every sample of one prompt sends
identical text and the server's prompt cache can serve samples 2..k; prompt_format "chat"
posts messages to `{url}/chat/completions` and lets the server apply its own template.

Greedy requests ask for log-probabilities (`logprobs.py` reads the same `Signals` from them
that the llama.cpp backend reads from its logits) when the rung's server returns usable ones.
Whether it does is found out once per (url, model) and process (`signal_support`), which
`cre models list` shows; a server that returns none (Ollama's OpenAI endpoint) is not asked
again, and its rung's answers carry no signals.

Token counts, which costs price (`costs.Pricing`), are the server's `usage`; a server that
sends none, or a 0 no text can take (`tokens.known`), has them estimated (`_tokens`, by
`tokens.estimate_output`'s rule), so its answers are not priced as free.

Each request goes to the least busy healthy replica and is tried on another when one fails
(`replicas.ReplicaSet`); the rung fails (`RungUnavailable`) only when every replica has.
Requests travel by the process's transport (`http`): the standard library's, or the pooled
async client `cre serve` installs, which also passes a server's token stream through.
"""

from __future__ import annotations

import http as _http
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from crecli import cancel, safejson
from crecli.errors import BackendError, ConfigError, PromptTooLong
from crecli.models import http as transport
from crecli.models import logprobs as lp
from crecli.models.backend import Backend, Generation, GenParams, StopSafeEmitter, cut_at_stop
from crecli.models.prompting import Rendered, completion_prompt, request_prompt
from crecli.models.replicas import Replica, ReplicaSet, replica_set
from crecli.models.tokens import output_count, prompt_count, sent_text_of

if TYPE_CHECKING:
    from crecli.config import ModelSpec

DEFAULT_TIMEOUT = 120.0


# A completion is a few KB; a reply far larger than any answer is a broken or hostile server.
MAX_REPLY_BYTES = 16 * 2**20
# A request tried on this many replicas (a Retry-After wait counts as a try) is given up.
MAX_TRIES = 8
# What a failed try is called where addresses must not show (`cre serve`'s errors, /health).
SHORT = {"connect": "connection refused", "connect_timeout": "timed out connecting", "timeout": "timed out",
         "broken": "connection broke", "too_large": "reply too large"}
# A try that the request's own time (`cre serve --timeout`) cut below the rung's `timeout`
# still counts against its server when it had at least this share of that timeout: a server
# that gives nothing in half the time models.toml allows it is hung or far overloaded, not
# slow. Without it, a `--timeout` at or below the rung's (60 s against the default 120) cut
# every try, so a hung replica was never taken out and held about 1 in n requests until their
# 504. Under it, the request's time, not the server, may be why the try ran out (`_try_limit`).
FAIR_SHARE = 0.5
# The failed tries (`http.TransportError.kind`) whose time ran out, connecting or waiting for
# the answer: where the request's own time set it (`cut`), they say nothing of the server.
TIMED_OUT = ("timeout", "connect_timeout")

# The probe's prompt: one token of an answer to a lettered question, so a server that returns
# log-probabilities shows its top list where it matters most (the option-letter margin).
PROBE_QUESTION = "Which is a colour? (A) red (B) seven. Answer with the letter."
# A quick probe's time (`signal_support(timeout=PROBE_TIMEOUT)`), for a listing that must not
# wait a rung's whole `timeout` on each hung server. What it decides (`cre calibrate`, `cre
# fit`) is asked with the rung's own `timeout`: a slow server cut off at 10 s was taken for
# one not reached, and its rung calibrated without signals. A try cut by the shorter time
# says nothing of its server (`_try_limit`).
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class SignalSupport:
    """Whether a rung's server returns usable log-probabilities (`signal_support`).

    `kind` is "logprobs" (it does; `top` alternatives a token are asked for), "none" (it
    answers without them, or refuses to give them) or "unknown" (it could not be asked:
    `detail` says why, such as "not reached", "no API key" or "unusable API key"; asked
    again next time)."""

    kind: str
    top: int = 0
    detail: str = ""

    @property
    def label(self) -> str:
        """What `cre models list` shows: "logprobs", "none" or "unknown (why)"."""
        return self.kind if self.kind != "unknown" else f"unknown ({self.detail or 'not reached'})"


# The statuses of a server refusing a request for log-probabilities rather than failing: 400
# or 422, and a 500 whose error message says they are not supported (`_REFUSES_LOGPROBS`:
# llama-cpp-python without `logits_all` says "logprobs is not supported for models created
# with logits_all=False"). Any other 5xx ("CUDA error: out of memory"), like a 429 or a
# timeout, is the server failing, and the same request goes to another replica. A 500 that
# says so may still be a passing fault: it is taken for a refusal only when the same server
# gives it again (`_refuses`).
REFUSALS = (400, 422, 500)
# Searched for in the error's message alone (`_error_text`), never the whole body, which
# may echo the request: a prompt that mentions log-probabilities must not turn a failing
# server's 500 into a refusal (no failover, and the rung marked as giving no signals).
_REFUSES_LOGPROBS = re.compile(r"\b(top_)?log-?probs?\b[^.\n]{0,40}\bnot supported|"
                               r"\bnot supported\b[^.\n]{0,40}\b(top_)?log-?probs?\b", re.IGNORECASE)
# The statuses (with every redirect, which is refused) of a server that does not serve the rung
# as models.toml describes it, whatever the request: it wants another key (401, 403), has no
# such endpoint or model (404, 405). That server's failure, so the request is tried on another
# replica, unlike 400, 413 or 422, which say the request itself is bad and would be refused
# by every replica alike.
MISDIRECTED = (401, 403, 404, 405)
# 4xx statuses that say the request came at a bad moment, not that it is bad: a proxy or
# server that timed out waiting for it (408), or would not take it yet (425). Another replica
# may take it now, so they fail over as a 5xx does, rather than reach a client as its fault.
TRANSIENT = (408, 425)

# How serving engines word a prompt longer than the model's context in a 400 (or 413)'s
# message (`_said`: its own words, not its `type` or `code` fields): vLLM "This model's
# maximum context length is 4096 tokens", llama.cpp's server "the request exceeds the
# available context size". The client's to fix, like a local rung's `PromptTooLong`, not the
# server's failure or a refusal of logprobs.
_TOO_LONG = re.compile(rb"context[ _-]?(length|size|window)|maximum context|exceeds? (the )?(available )?context",
                       re.IGNORECASE)


def _tokens(usage: dict[str, Any], body: dict[str, Any], text: str, finish: str,
            counted: int | None = None, exact: bool = False) -> tuple[int, int]:
    """(prompt, output) tokens of the answer `text` to the request `body`: each the server's
    `usage` where it can be real, else estimated (a server that sends none, or a 0 for
    text, still read the prompt and wrote the answer, which are not free): the prompt from
    the text sent (`tokens.prompt_count`), the output by `tokens.output_count` from
    `finish`, the text and `counted`, the pieces the reply
    showed it in where it did: a greedy reply's log-probability steps (`exact`, one a
    token) or a stream's events (at least a token each)."""
    return (prompt_count(usage.get("prompt_tokens"), sent_text_of(body)),
            output_count(usage.get("completion_tokens"), text, int(body["max_tokens"]), finish, counted, exact))


def _completion_shape(data: Any, chat: bool) -> str | None:
    """What makes `data` no OpenAI-style completion (None when it is one): its first choice,
    and the usage and message read from it, must be objects where present."""
    if not isinstance(data, dict):
        return "the reply is not a JSON object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "the reply has no `choices` list of objects"
    if data.get("usage") is not None and not isinstance(data["usage"], dict):
        return "its `usage` is not an object"
    if chat and choices[0].get("message") is not None and not isinstance(choices[0]["message"], dict):
        return "its `message` is not an object"
    return None


def _read(raw: str | bytes, what: str) -> Any:
    """A server's JSON (a reply, an event, an error), read as `json.loads` reads it, but with
    every failure a `ValueError` (`safejson.JsonError`): JSON nested too deeply or with a
    number too long is unreadable, not a crash. Not strict (`safejson.loads`): a key given
    twice or a lone surrogate (`"caf\\ud83d"`, a token cut mid-character) is a valid reply
    all the same, whose server must not be taken out for it; the answer's text is mended
    (`_text`)."""
    return safejson.loads(raw, what, strict=False)


def _event(line: str) -> dict[str, Any] | str | None:
    """What a line of a server-sent event stream carries: "[DONE]", an event's JSON object, or
    None for any other line (a comment, another field, a blank line, data that is no object
    or that `_read` cannot read)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = _read(data, "an event")
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _error_text(body: bytes) -> str:
    """What an error reply's body says in its own words: OpenAI's `error.message` (or an
    `error` string), else FastAPI's `detail` (a string, or its entries' `msg`), else a
    top-level `message`; "" for anything else. Never another field (pydantic's `input`, a
    request echoed back), which may hold the prompt."""
    try:
        return _own_words(_read(body, "an error reply"))
    except ValueError:
        return ""


def _own_words(data: Any) -> str:
    """`_error_text` of a reply already read."""
    if not isinstance(data, dict):
        return ""
    error = data.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    detail = data.get("detail")
    if isinstance(detail, list):
        detail = " ".join(d["msg"] for d in detail if isinstance(d, dict) and isinstance(d.get("msg"), str))
    for said in (error, detail, data.get("message")):
        if isinstance(said, str) and said:
            return said
    return ""


def _said(body: bytes) -> str:
    """What an error reply says, to be searched for a cause: its own words (`_error_text`)
    where it is JSON, never an echoed field (a prompt about "the maximum context" made a
    server's unrelated 400 a prompt too long); a body that is no JSON, as a proxy's page,
    is read as it is."""
    try:
        data = _read(body, "an error reply")
    except ValueError:
        return body[:2000].decode("utf-8", "replace")
    # Mended: a tolerant read keeps a lone surrogate, which no UTF-8 encoding of it holds.
    return safejson.replace_surrogates(_own_words(data))


def _error_message(error: Any) -> str:
    """What a stream's error says: the `message` of an error object (or of the object under
    its `error`), else the error itself; at most 300 characters."""
    if isinstance(error, dict):
        error = error.get("error", error)
    if isinstance(error, dict):
        error = error.get("message", error)
    return safejson.replace_surrogates(str(error)[:300])


def _at_stop(answer: str, stop: Sequence[str], pieces: Sequence[str]) -> tuple[str, int | None, bool]:
    """`answer` cut at the first of its `stop` strings (`cut_at_stop`), for a server that
    ignores them; how many of `pieces` (its tokens in order: a greedy reply's log-probability
    steps, a stream's events) the cut answer keeps; and whether it was cut. Uncut, all of
    them; cut, the fewest whose joined text covers the cut answer (the one the stop string
    starts in among them): the steps of a made-up next turn are no part of the answer, and
    its signals and count are read from the rest. None where the pieces do not spell the
    answer's start (tokens shown as bytes, say): none is kept then, rather than a guess."""
    text, cut = cut_at_stop(answer, stop)
    if not cut:
        return text, len(pieces), False
    if not text:
        return text, 0, True
    at = 0
    for kept, piece in enumerate(pieces, 1):
        piece = safejson.replace_surrogates(piece)  # as the answer's text was (`_text`)
        if at + len(piece) >= len(text):
            return text, kept if piece.startswith(text[at:]) else None, True
        if not text.startswith(piece, at):
            return text, None, True
        at += len(piece)
    return text, None, True


def _answer_text(data: dict[str, Any], chat: bool) -> str:
    """The answer in a whole completion (`_completion_shape` passed): its first choice's
    message content (chat) or text."""
    choice = data["choices"][0]
    return _text((choice.get("message") or {}).get("content") if chat else choice.get("text"))


class _EventStream:
    """What a streamed request reads from its server's event stream, one try at a time: the
    answer's pieces, handed on as they come (through a `StopSafeEmitter`), its usage and
    finish reason, and how the stream ended. `OpenAIBackend._post` judges a try by
    `failure` before it gives its replica back, so a stream that fails before any of its
    text went out (an engine opens with a role-only chunk) is that replica's failure and is
    tried on another, as a refused connection is; once text went out, it is the request's
    error (another replica would send the text again).

    Each piece is handed on alone, at its own cost. A server that streams past the
    request's `max_tokens` (one that ignores it) is read no further: the answer ends there,
    with finish reason "length", pieces counted as tokens (one event a token, as engines
    stream them, so an engine that packs several in one event is never cut short)."""

    def __init__(self, chat: bool, stops: tuple[str, ...], max_tokens: int, emit: Callable[[str], None]) -> None:
        self.chat, self.stops, self.max_tokens, self.emit = chat, stops, max_tokens, emit
        self.retry()

    def retry(self) -> None:
        """Forget the last try's reading (only while none of its text went out)."""
        self.out = StopSafeEmitter(self.stops, self.emit)
        self.pieces: list[str] = []
        self.usage: dict[str, Any] = {}
        self.finish = "stop"
        self.ended: str | None = None  # "[DONE]", "max_tokens", or why the stream failed
        self.short = ""  # the same, without the server's words (`SHORT`)
        self.too_long = False  # the error says the prompt does not fit the model's context
        self.typed_error = False  # the event being read is typed `event: error`
        self.began = False  # an event came
        self.held: list[str] = []  # the lines before the first event, to judge a reply with none

    @property
    def sent(self) -> bool:
        """Whether any of the answer's text went out to `emit`."""
        return bool(self.out.sent)

    def failure(self) -> str | None:
        """Why the stream read is no complete answer (None when it is one)."""
        if self.ended in ("[DONE]", "max_tokens"):
            return None
        if self.ended is None:
            self.short = "stream cut short"
            return "the reply ended without `data: [DONE]` (not a complete event stream)"
        return self.ended

    def _fail(self, why: str, short: str) -> None:
        self.ended, self.short = why, short

    def _error(self, error: Any) -> None:
        message = _error_message(error)
        self.too_long = bool(_TOO_LONG.search(message.encode()))
        self._fail(f"the server reported an error mid-stream: {message}", "stream error")

    def line(self, line: str) -> bool:
        """Read one line of the stream (on the transport's loop: kept quick); True when the
        rest is not to be read (it failed, or went past `max_tokens`)."""
        if self.ended is not None:
            return self.ended != "[DONE]"  # after [DONE] or a failure, nothing more counts
        field, _, value = line.partition(":")
        if not line:
            self.typed_error = False  # a blank line ends an event, and its type with it
        elif field == "event":
            self.typed_error = value.strip() == "error"
        if field == "error" or (field == "data" and self.typed_error):
            # Some versions of llama.cpp's server report a failed stream on an `error:` line,
            # other servers as an event typed `error`, and both may still end with `data:
            # [DONE]`: a failure all the same, never the end of a (cut short) answer.
            self.began = True
            try:
                error = _read(value, "an error")
            except ValueError:
                error = value.strip() or "no details"
            self._error(error)
            return True
        event = _event(line)
        if event is None:
            if not self.began:
                # Skipped anyway; kept to judge a reply in which no event comes.
                self.held.append(line)
            return False
        self.began = True
        if isinstance(event, str):
            self.ended = event  # "[DONE]"
            return False
        if event.get("error") is not None and not event.get("choices"):
            # An engine that fails mid-stream says so in an event (vLLM, llama.cpp's server).
            self._error(event["error"])
            return True
        if isinstance(event.get("usage"), dict):
            self.usage.update(event["usage"])
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            self._fail("an event's `choices` is not a list (not an OpenAI-style stream)", "reply not a completion")
            return True
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = _text((delta.get("content") if isinstance(delta, dict) else None) if self.chat else choice.get("text"))
            if text:
                if len(self.pieces) >= self.max_tokens:
                    self.ended, self.finish = "max_tokens", "length"
                    return True
                self.pieces.append(text)
                self.out.add(text)
            if choice.get("finish_reason"):
                self.finish = _text(str(choice["finish_reason"]))
        return False


class RemoteError(BackendError):
    """A remote rung's server did not answer: `status` is its HTTP status (None when no reply
    came: refused connection, timeout, broken reply), `retry_after` its Retry-After in seconds."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 server: str = "") -> None:
        super().__init__(message)
        # `server`: the replica that answered so, for an HTTP error (`_ask` learns from it).
        self.status, self.retry_after, self.server = status, retry_after, server


class RungUnavailable(RemoteError):
    """Every replica of a remote rung failed this request (refused, timed out, broke off,
    5xx, busy past the time left, or does not serve the rung: a redirect, 401, 403, 404, 405,
    a reply that is no completion, to a streamed request neither an event stream nor a
    completion, or a stream that failed before any of its text went out): the cascade moves
    on to the next rung (`escalate.Cascade`). The message names the rung, each server and
    why; `public` says the same without addresses, for a client of `cre serve`;
    `retry_after` is the seconds until its first server is due back in rotation
    (`ReplicaSet.back_in`)."""

    def __init__(self, message: str, status: int | None = None, public: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message, status, retry_after)
        self.public = public or message


class RequestRefused(RemoteError):
    """A remote rung's server refused the request itself (a 4xx that is neither a wait, 429,
    nor a server that does not serve the rung, `MISDIRECTED`): every replica would refuse it
    alike. `public` says so with the server's own message, shortened, without its address or
    the API key: `cre serve` answers a client that asked the model by name (its fields went
    to the server, and may be what was refused) with a 400 quoting it."""

    def __init__(self, message: str, status: int, server: str, public: str) -> None:
        super().__init__(message, status, server=server)
        self.public = public


# (url, api model) -> what its server was found to do, for this process.
_SUPPORT: dict[tuple[str, str], SignalSupport] = {}
# (url, api model, replica): replicas that once failed a request for log-probabilities with a
# 500 and answered it without them, for `_refuses`.
_FAILED_ONCE: set[tuple[str, str, str]] = set()
_SUPPORT_LOCK = threading.Lock()


def forget_signal_support() -> None:
    """Forget every rung's probed support (tests; a long-running process after a redeploy)."""
    with _SUPPORT_LOCK:
        _SUPPORT.clear()
        _FAILED_ONCE.clear()


class _Slot:
    """The slot a request holds on a replica (`ReplicaSet.acquire`), given back once: by
    `release` or `abandon` as its try ends, else by `close`, which abandons it (the try
    ended in an exception no branch expected: a cancellation, a bug). A slot never given
    back holds the replica at `max_in_flight` for good, while /health still says it is up."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas
        self.replica: Replica | None = None  # the replica whose slot is held, None when none is

    def hold(self, replica: Replica) -> None:
        self.replica = replica

    def _give(self) -> Replica:
        replica, self.replica = self.replica, None
        assert replica is not None, "no slot is held"
        return replica

    def release(self, failure: str | None = None, out_for: float | None = None) -> None:
        """`ReplicaSet.release`: the replica answered, or failed (`failure`)."""
        self.replicas.release(self._give(), failure, out_for)

    def abandon(self) -> None:
        """`ReplicaSet.abandon`: the try says nothing of the replica's server."""
        self.replicas.abandon(self._give())

    def close(self) -> None:
        if self.replica is not None:
            self.abandon()


class OpenAIBackend(Backend):
    def __init__(self, spec: "ModelSpec", timeout: float | None = None) -> None:
        super().__init__(spec)
        if not spec.url:
            raise ConfigError(f"{spec.set_in('url')}: model {spec.name!r} has no `url` for its server")
        self.url = spec.url.rstrip("/")
        # Per try: the argument (tests), else models.toml's `timeout`, else the default.
        self.timeout = timeout if timeout is not None else (spec.timeout or DEFAULT_TIMEOUT)
        self.replicas = replica_set(spec)

    @property
    def _support_key(self) -> tuple[str, str]:
        return (self.url, self.spec.api_model or self.spec.name)

    def signal_support(self, probe: bool = True, timeout: float | None = None) -> SignalSupport:
        """Whether this rung's server returns usable log-probabilities, found out once per
        process: by the replies to greedy requests, or by a probe (`probe` False: only what
        is known, "unknown" if nothing is). A failed probe is not remembered. The probe has
        the rung's own `timeout`, as any request, unless `timeout` gives it less
        (`PROBE_TIMEOUT`, for a quick listing): a try cut by that below `FAIR_SHARE` of the
        rung's time leaves its server in rotation, and the support unknown."""
        with _SUPPORT_LOCK:
            known = _SUPPORT.get(self._support_key)
        if known is not None or not probe:
            return known or SignalSupport("unknown", detail="not asked yet")
        chat = self._chat
        body: dict[str, Any] = {"model": self.spec.api_model or self.spec.name, "max_tokens": 1, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": PROBE_QUESTION}]
        else:
            body["prompt"] = f"Q: {PROBE_QUESTION}\nA: ("
        try:
            self._ask("chat/completions" if chat else "completions", body, greedy=True,
                      timeout=None if timeout is None else min(timeout, self.timeout))
        except RemoteError as exc:
            return SignalSupport("unknown", detail="not reached" if exc.status is None else f"HTTP {exc.status}")
        except BackendError:  # no API key in the environment
            return SignalSupport("unknown", detail="no API key")
        except ConfigError:
            # A key no HTTP header carries (`_headers`): one rung's, which must not stop a
            # listing of every rung (`cre models list`); asking or batching names it.
            return SignalSupport("unknown", detail="unusable API key")
        with _SUPPORT_LOCK:
            # The probe's one token was generated, so a reply without log-probabilities is proof.
            return _SUPPORT.setdefault(self._support_key, SignalSupport("none", detail="answers without log-probabilities"))

    def _learn(self, support: SignalSupport) -> None:
        with _SUPPORT_LOCK:
            _SUPPORT[self._support_key] = support

    def _logprob_fields(self, top: int) -> dict[str, Any]:
        """The request fields that ask for `top` alternatives a token (none for 0)."""
        if top <= 0:
            return {}
        if self._chat:
            return {"logprobs": True, "top_logprobs": top}
        return {"logprobs": top}

    def _ask(self, endpoint: str, body: dict[str, Any], greedy: bool,
             timeout: float | None = None) -> tuple[dict[str, Any], float]:
        """POST `body`, asking a greedy request for log-probabilities unless the server is known
        to give none, and learn from the reply what it gives (`signal_support`).

        A server that refuses the request for them (`REFUSALS`: a 400 or 422, some cap
        `top_logprobs`; a 500 whose error message says they are not supported, llama-cpp-python
        without `logits_all`) is asked again with fewer alternatives, then without any; the
        same server answering that one means it serves the rung but gives no signals
        (`_refuses`). A server that fails otherwise (another 5xx, 429, a timeout) fails as for
        any request: the same request, log-probabilities and all, goes to another replica
        (`_post`). A reply without them is not taken as proof: an answer cut to nothing has
        none either.
        """
        known = self.signal_support(probe=False)
        if not greedy or known.kind == "none":
            return self._post(endpoint, body, timeout)[:2]
        tops = (known.top,) if known.kind == "logprobs" else (lp.TOP_LOGPROBS, lp.FEWER_LOGPROBS)
        refused: dict[str, int] = {}  # replica -> the status it refused them with
        for top in tops:
            try:
                data, seconds, _ = self._post(endpoint, {**body, **self._logprob_fields(top)}, timeout,
                                              refusals=known.kind != "logprobs")
            except RemoteError as exc:
                if exc.status not in REFUSALS or isinstance(exc, RungUnavailable):
                    raise
                refused[exc.server] = exc.status
                continue
            if known.kind != "logprobs" and lp.usable(lp.steps(data["choices"][0].get("logprobs"))):
                self._learn(SignalSupport("logprobs", top=top))
            return data, seconds
        data, seconds, server = self._post(endpoint, body, timeout)
        if server in refused and self._refuses(server, refused[server]):
            # It answers without them: it refused log-probabilities, not the request.
            self._learn(SignalSupport("none", detail=f"refuses log-probabilities (HTTP {refused[server]})"))
        return data, seconds

    def _refuses(self, server: str, status: int) -> bool:
        """Whether replica `server`, which refused a request for log-probabilities with
        `status` and then answered it without them, refuses them for good. A 400 or 422 says
        so; a 500 may have been a passing fault, so only the second one counts (the first
        leaves support unknown, and the next greedy request asks again). Another replica's
        answer proves nothing of the one that refused."""
        if status != 500:
            return True
        key = (*self._support_key, server)
        with _SUPPORT_LOCK:
            if key in _FAILED_ONCE:
                return True
            _FAILED_ONCE.add(key)
            return False

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        env = self.spec.api_key_env
        if env:
            # The one read of the key. A key mounted from a file ends in a newline, never part of it.
            key = os.environ.get(env, "").strip()
            if not key:
                raise BackendError(
                    f"model {self.spec.name!r} needs an API key in ${env}, which is not set (or empty); "
                    f"export {env}=... (or remove `api_key_env` from {self.spec.set_in('api_key_env')})"
                )
            if (fault := transport.header_fault(key)) is not None:
                # Named, never shown: an error message ends up in logs.
                raise ConfigError(f"model {self.spec.name!r}: its API key in ${env} holds {fault}, which no "
                                  f"HTTP header carries; set {env} to the key alone")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, endpoint: str, body: dict[str, Any], timeout: float | None = None,
              refusals: bool = False, stream: _EventStream | None = None) -> tuple[dict[str, Any], float, str]:
        """POST JSON to the rung: to its least busy healthy replica, and on to another while one
        fails (`replicas`): by its connection or a 5xx, or by not serving the rung (a redirect,
        which is refused, a `MISDIRECTED` status, a reply that is no completion). With
        `refusals`, a 500 whose error message says log-probabilities are not supported (a
        server refusing them, `REFUSALS`) is the request's fault, not the replica's: it is
        raised at once naming the replica (`RemoteError.server`), which stays in rotation. Returns the reply, its seconds and the
        replica that answered. With `stream`, the reply is a server-sent event stream, read
        by `stream` as it comes (`stream` transports only); the dict returned is then empty.
        A stream that fails (`_EventStream.failure`) is judged in its try: the replica's
        failure, tried on another while none of its text went out, else raised as it is. A
        2xx reply in which no event comes (a page, a whole completion, an empty stream;
        whatever its Content-Type says) is judged whole as without `stream`: a completion (a
        server that ignored `stream`) is returned, anything else is the replica's failure.
        A try that ends in an exception no branch expected (a bug, a cancellation) gives its
        replica's slot back all the same (`_Slot`), as one that says nothing of the server."""
        slot = _Slot(self.replicas)
        try:
            return self._tries(endpoint, body, timeout, refusals, stream, slot)
        finally:
            slot.close()

    def _tries(self, endpoint: str, body: dict[str, Any], timeout: float | None, refusals: bool,
               stream: _EventStream | None, slot: _Slot) -> tuple[dict[str, Any], float, str]:
        """`_post`'s tries, each holding its replica's slot in `slot` until it gives it back."""
        timeout = self.timeout if timeout is None else timeout
        payload = json.dumps(body).encode()
        headers = self._headers()
        failed: dict[str, str] = {}  # replica -> why it failed this request
        short: list[str] = []  # the same, without addresses
        last: RemoteError | None = None  # the last HTTP error, for its status
        waited = False
        start = time.perf_counter()
        for attempt in range(MAX_TRIES):
            cancel.check()
            wait_until = time.monotonic() + self._time_left(timeout, start)  # for an asked wait
            replica = self.replicas.acquire(frozenset(failed), wait_until=wait_until)
            if replica is None:
                break
            slot.hold(replica)
            url = f"{replica.url}/{endpoint}"
            where = f"model {self.spec.name!r} at {url}"
            # A server that hangs past its try's time is taken out and the request tried
            # elsewhere, unless the request's own time (or a quick probe's) cut the try short
            # (`cut`, `FAIR_SHARE`).
            try_for, cut = self._try_limit(timeout, self.timeout)
            if stream is not None and attempt:
                # A later try reads afresh (nothing of a failed try went out, or it was
                # raised); the first reads the stream as it was built.
                stream.retry()
            try:
                reply = self._send(url, payload, headers, try_for, stream.line if stream is not None else None)
            except cancel.Cancelled:
                if not cut and self._hung_to_deadline(stream):
                    # The request's deadline, which this try's time ran to, ended it as the
                    # try's own timeout would have (whichever came first): its server hung.
                    slot.release(SHORT["timeout"])
                raise
            except transport.TransportError as exc:
                why = self._transport_failure(exc, where, try_for, cut, timeout)
                if exc.kind == "local" or (exc.kind in TIMED_OUT and cut):
                    # The request (or a quick probe) ran out of its own time, or this side
                    # would not send it: not the server's failure, and it stays in rotation.
                    slot.abandon()
                    raise RemoteError(why) from None
                slot.release(SHORT[exc.kind])
                if stream is not None and stream.sent:
                    # Text already went to the client: another replica would send it again.
                    raise RemoteError(why) from None
                failed[replica.url] = why
                short.append(SHORT[exc.kind])
                continue
            status = reply.status
            # Read once: what a 4xx says decides both a prompt too long and a refusal's words.
            said = _said(reply.body) if 400 <= status < 500 else ""
            if status in (400, 413) and _TOO_LONG.search(said.encode()):
                slot.release()
                raise self._too_long(where, f"HTTP {status}: {reply.body[:300].decode('utf-8', 'replace').strip()}",
                                     body.get("max_tokens"))
            if status in (429, 503) or status in TRANSIENT or status >= 500:
                error = self._status_error(reply, where, replica.url)
                retry_after = error.retry_after if status in (429, 503) else None
                if refusals and status in REFUSALS and _REFUSES_LOGPROBS.search(_error_text(reply.body)):
                    slot.abandon()
                    raise error
                slot.release(f"HTTP {status}", retry_after)
                # A server that asked for a wait this request can afford is waited for, once;
                # else it is done with for this request: asked again, it would only ask again.
                wait = not waited and self.replicas.waits_for(replica, wait_until)
                if not wait:
                    failed[replica.url] = str(error)
                short.append(f"HTTP {status}")
                waited = waited or wait
                last = error
                continue
            if status >= 400 and status not in MISDIRECTED:
                # The request's own fault (400, 413, 422...): every replica would refuse it
                # alike, and this one answered, so it stays in rotation.
                slot.release()
                raise self._refused(reply, said, where, replica.url, headers)
            if status < 300:
                seconds = time.perf_counter() - start
                if stream is not None and stream.began:
                    why = stream.failure()
                    if why is None:
                        slot.release()
                        return {}, seconds, replica.url
                    if stream.too_long and not stream.sent:
                        # As a 400 that says so: the prompt's fault, which every replica would find.
                        slot.release()
                        raise self._too_long(where, why, body.get("max_tokens"))
                    # An engine failing (out of memory, a crash behind a proxy) may fail every
                    # stream while it answers: its failure, so it leaves rotation.
                    slot.release(stream.short)
                    if stream.sent:
                        raise RemoteError(f"{where}: {why}")  # as for a connection that broke
                    failed[replica.url] = f"{where}: {why}"
                    short.append(stream.short)
                    continue
                # A streamed reply with no event in it: its lines, held back, judged whole.
                raw = reply.body or "\n".join(stream.held if stream is not None else ()).encode()
                try:
                    data = _read(raw, "the reply")  # nested too deeply, a number too long: no completion
                except ValueError:
                    data = None
                wrong = _completion_shape(data, chat=endpoint.startswith("chat"))
                if wrong is None:
                    slot.release()
                    return data, seconds, replica.url
                # A 200 that is no completion (a proxy's or another service's page): this
                # address serves something else, whatever was asked.
                error = RemoteError(
                    f"{where}: the reply is not an OpenAI-style completion"
                    f"{' nor an event stream' if stream is not None else ''} ({wrong}: {raw[:200]!r}); "
                    "check that `url` points at the API root (usually ending in /v1)"
                )
                why = "reply not a completion"
            else:
                error, why = self._status_error(reply, where, replica.url), f"HTTP {status}"
            # This server does not serve the rung as models.toml describes it: its failure, out
            # for a back-off like a dead one, and the request tried on another replica.
            slot.release(why)
            failed[replica.url] = str(error)
            short.append(why)
            last = error
        raise self._unavailable(failed, last, short)

    def _too_long(self, where: str, detail: str, max_tokens: Any = None) -> PromptTooLong:
        """The error of a prompt that the server says does not fit the model's context. An
        engine counts the answer's room in (vLLM refuses a prompt plus `max_tokens` over its
        context), so where the request set one, the message names it: a short prompt asked
        for a long answer is not fixed by shortening the prompt."""
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            what, fix = f"the prompt and max_tokens {max_tokens} do", "shorten the prompt or lower max_tokens"
        else:
            what, fix = "the prompt does", "shorten it"
        return PromptTooLong(f"{where}: {what} not fit the model's context ({detail})",
                             public=f"{what} not fit model {self.spec.name!r}'s context; {fix}")

    def _send(self, url: str, payload: bytes, headers: dict[str, str], timeout: float,
              on_line: Callable[[str], bool] | None) -> "transport.Reply":
        current = transport.current()
        if on_line is not None:
            return current.stream(url, payload, headers, timeout, MAX_REPLY_BYTES, on_line)  # type: ignore[attr-defined]
        return current.post(url, payload, headers, timeout, MAX_REPLY_BYTES)

    def _time_left(self, timeout: float, start: float) -> float:
        """Seconds this request may still wait for a server that asked for a wait (Retry-After):
        to its request's deadline where `cre serve` set one, else to the rung's timeout from
        the first try. (A try's own time is `_try_limit`'s.)"""
        deadline = cancel.deadline()
        if deadline is not None:
            return max(0.0, deadline - time.monotonic())
        return max(0.0, timeout - (time.perf_counter() - start))

    @staticmethod
    def _try_limit(timeout: float, rung_timeout: float) -> tuple[float, bool]:
        """The seconds the next try may take, and whether they were cut short (`cut`: a try
        that runs out of them says nothing of its server): `timeout`, the call's (the rung's
        `timeout`, or a quick probe's less, `PROBE_TIMEOUT`), or the time left before the
        request's deadline where `cre serve` set one and it is sooner (at least 0.1 s). Either
        cuts the try only below `FAIR_SHARE` of `rung_timeout`, the time models.toml allows its
        server. With no deadline (`cre ask`, `cre batch`), every try has the whole timeout,
        the one after a server that hung too."""
        deadline = cancel.deadline()
        left = None if deadline is None else deadline - time.monotonic()
        if left is None or left >= timeout:
            return timeout, timeout < rung_timeout * FAIR_SHARE
        return max(0.1, left), left < rung_timeout * FAIR_SHARE

    @staticmethod
    def _hung_to_deadline(stream: _EventStream | None) -> bool:
        """Whether a try that the request's cancellation ended was waiting for its server when
        the request gave up for its deadline, with no event of a stream come: the try's time
        ran to that deadline (`_try_limit`). The cancellation's cause says so
        (`cancel.Token.expired`), not the clock: a client that left a moment before the
        deadline is handled here after it has passed, and its server was blamed as hung."""
        token = cancel.current()
        return token is not None and token.expired() and (stream is None or not stream.began)

    def _transport_failure(self, exc: "transport.TransportError", where: str, timeout: float, cut: bool,
                           asked: float) -> str:
        """What a try that failed so says, where `timeout` was its time (`cut`: short of the
        rung's, `_try_limit`) and `asked` the call's (the rung's `timeout`, or a probe's less)."""
        if exc.kind in TIMED_OUT and cut:
            connecting = " while connecting" if exc.kind == "connect_timeout" else ""
            if timeout >= asked:
                # The call's own short time (a quick probe's), not the request's deadline.
                return (f"{where}: no answer within this probe's {timeout:.1f} s{connecting} (the rung's `timeout` "
                        f"is {self.timeout:.0f} s; the server is not taken out for it)")
            # Not the server's fault: "no answer within 0 s; check the server" misled.
            return f"{where}: the request's own time ran out ({timeout:.1f} s were left for this try){connecting}"
        if exc.kind == "timeout":
            return f"{where}: no answer within {timeout:.0f} s; check that the server is not overloaded"
        if exc.kind in ("connect", "connect_timeout"):
            return f"{where}: cannot connect ({exc.detail}); start the server or fix `url` in {self.spec.set_in('url')}"
        if exc.kind == "too_large":
            return f"{where}: the reply is over {MAX_REPLY_BYTES // 2**20} MiB; refusing it"
        if exc.kind == "local":
            return (f"{where}: the request was not sent: the HTTP client refused it ({exc.detail}), a fault "
                    "on this side, not the server's; please report it")
        return (f"{where}: the connection broke before the reply was complete ({exc.detail}); "
                "the server may have crashed or restarted, check its log")

    def _status_error(self, reply: "transport.Reply", where: str, server: str) -> RemoteError:
        status = reply.status
        try:
            phrase = _http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        if 300 <= status < 400:
            location = (reply.header("location") or "elsewhere")[:200]
            return RemoteError(f"{where}: HTTP {status} {phrase}: redirect to {location} refused; "
                               "set `url` to the final address", status, server=server)
        detail = reply.body[:500].decode("utf-8", "replace").strip()
        return RemoteError(f"{where}: HTTP {status} {phrase}: {detail or 'no details'}; {_advice(status, self.spec)}",
                           status, _retry_after(reply), server)

    def _refused(self, reply: "transport.Reply", said: str, where: str, server: str,
                 headers: dict[str, str]) -> RequestRefused:
        """The error of a request the server refused as bad (`RequestRefused`), which `said`
        (`_said` of its reply)."""
        # Its message may quote what it was sent: never the key, nor where the server is.
        secrets = [secret for secret in (headers.get("Authorization", "").partition(" ")[2], server) if secret]

        def hidden(text: str) -> str:
            for secret in secrets:
                text = text.replace(secret, "...")
            return text

        # Its own words only (`_said`: never an echoed field such as pydantic's `input`), read as
        # any reply is, hidden where they quote a secret, then cut: cut first, a secret at
        # the cut could show in part.
        said = hidden(" ".join(said.split()))
        said = said if len(said) <= 300 else said[:299] + "…"
        return RequestRefused(str(self._status_error(reply, where, server)), reply.status, server,
                              f"model {self.spec.name!r} refused the request: HTTP {reply.status}: {said or 'no details'}")

    def _unavailable(self, failed: dict[str, str], last: RemoteError | None, short: list[str]) -> RemoteError:
        """The error of a request no replica answered: the one failure where the rung has one
        server (its status kept), else every server's, under the rung's name, with when the
        first server is due back."""
        n = len(self.replicas.replicas)
        back_in = self.replicas.back_in()
        if not failed and last is None and not short:
            # Nothing was tried: every server asked for a wait (Retry-After) longer than the
            # request has, and is not sent more before it (`ReplicaSet.acquire`).
            states = "; ".join(f"{u}: {state}" for u, state in self.replicas.states().items())
            return RungUnavailable(f"model {self.spec.name!r}: every server asked to wait longer than the request "
                                   f"can ({states}); try again later",
                                   public=f"rung {self.spec.name!r} could not answer: its servers asked to wait (Retry-After)",
                                   retry_after=back_in)
        public = (f"rung {self.spec.name!r} could not answer: "
                  + (f"its server failed ({short[-1]})" if n == 1 and short else
                     f"every one of its {n} servers failed or is out of rotation"
                     + (f" ({'; '.join(dict.fromkeys(short))})" if short else "")))
        if len(failed) <= 1 and n == 1:
            why = next(iter(failed.values()), str(last) if last is not None else "")
            status = last.status if last is not None and why == str(last) else None
            return RungUnavailable(why or f"model {self.spec.name!r}: no server answered", status, public, back_in)
        shown = "; ".join(failed.values()) or (str(last) if last is not None else "")
        states = self.replicas.states()
        out = [u for u, state in states.items() if state != "up" and u not in failed]
        # One status that every server tried gave (all 401, say) is kept, as for one server:
        # the probe reports it (`signal_support`) instead of "not reached".
        status = last.status if last is not None and short and set(short) == {f"HTTP {last.status}"} else None
        return RungUnavailable(
            f"model {self.spec.name!r}: every server failed or is out"
            + (f": {shown}" if shown else "")
            + (f"; out of rotation: {', '.join(out)}" if out else ""),
            status, public=public, retry_after=back_in,
        )

    def _body(self, params: GenParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.spec.api_model or self.spec.name,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if self.spec.repeat_penalty is not None:
            body["repeat_penalty"] = self.spec.repeat_penalty
        return body

    @staticmethod
    def _generation(data: dict[str, Any], body: dict[str, Any], chat: bool, stop: tuple[str, ...], seconds: float,
                    greedy: bool) -> Generation:
        """The answer in a whole completion `data` (`chat`: a chat completion's) to the request
        `body`, cut at the first of its `stop` strings as a streamed answer is (`_at_stop`): a
        server that ignores `stop` would hand on a made-up next turn. Its signals are read from
        the log-probability steps the cut answer keeps, its finish reason is then "stop", and
        its tokens are counted as a stream's are: the server's `usage` where it sent one, else
        the steps kept, else estimated from the cut text."""
        choice = data["choices"][0]
        steps = lp.steps(choice.get("logprobs"))
        text, kept, cut = _at_stop(_answer_text(data, chat), stop, [token for token, _, _ in steps or ()])
        finish = "stop" if cut else _text(str(choice.get("finish_reason") or "stop"))
        if cut and steps is not None:
            steps = steps[:kept] if kept is not None else None
        # A reply with log-probabilities lists its tokens: without `usage`, their number is
        # the exact output count.
        prompt_tokens, output_tokens = _tokens(data.get("usage") or {}, body, text, finish,
                                               counted=len(steps) if steps else None, exact=True)
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            seconds=seconds,
            finish_reason=finish,
            signals=lp.signals(steps) if greedy else None,
        )

    def _request(self, prompt: str, params: GenParams) -> tuple[str, dict[str, Any], GenParams]:
        """The endpoint and body of the request for `prompt`, and `params` as it goes (a
        completion's with its format's stop strings added, `prepare`). The prompt fields are
        `request_prompt`'s, the one render of what is posted: a "chat" rung's turns (its server
        applies its own template, examples as turns), else the prompt in the rung's format with
        its control-token spellings defused."""
        if not self._chat:
            params = self.prepare(prompt, params)[1]
        fields = request_prompt(self.spec.prompt_format, prompt, params.shots)
        return ("chat/completions" if self._chat else "completions"), {**self._body(params), **fields}, params

    @property
    def _chat(self) -> bool:
        """Whether this rung posts chat turns (its server applies its own template)."""
        return self.spec.prompt_format == "chat"

    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        """`rendered` posted as given (the `Backend` interface); cre's own requests, `generate`'s,
        are built by `_request`."""
        return self._answer("completions", {**self._body(params), **completion_prompt(rendered)}, params)

    def generate(self, prompt: str, params: GenParams = GenParams()) -> Generation:
        return self._answer(*self._request(prompt, params))

    def _answer(self, endpoint: str, body: dict[str, Any], params: GenParams) -> Generation:
        """`body` posted to `endpoint` and its reply read as one answer, cut at `params.stop`
        (`_generation`): the one path of `complete` and `generate`."""
        greedy = params.temperature == 0.0 and params.signals
        data, seconds = self._ask(endpoint, body, greedy)
        return self._generation(data, body, endpoint == "chat/completions", params.stop, seconds, greedy)

    def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
        """`generate` with the server's own token stream passed through to `emit` (`stream:
        true`, usage asked for in the last event), where the transport streams (`cre
        serve`'s); else the whole answer at once, as it is where the server answers with a whole
        completion (one that ignores `stream`). A streamed answer carries no signals: only
        a rung whose answer is already final streams, and nothing reads them there."""
        if not hasattr(transport.current(), "stream"):
            return super().generate_streaming(prompt, params, emit)
        endpoint, body, params = self._request(prompt, params)
        body.update(stream=True, stream_options={"include_usage": True})
        # The server applies `stop` itself; held back here too, for one that streams a stop's start.
        stream = _EventStream(self._chat, params.stop, params.max_tokens, emit)
        whole, seconds, _ = self._post(endpoint, body, stream=stream)
        if whole:
            # No stream but a whole completion (`_post` judged it): nothing went out yet.
            gen = self._generation(whole, body, self._chat, params.stop, seconds, False)
            stream.out.finish(gen.text)
            return gen
        # A complete stream (`_post` judged it). Cut at a whole stop string, its events
        # counted to there (`_at_stop`); a tail that only starts one stays (the answer is complete).
        text, kept, cut = _at_stop("".join(stream.pieces), params.stop, stream.pieces)
        stream.out.finish(text)
        finish = "stop" if cut else stream.finish
        prompt_tokens, output_tokens = _tokens(stream.usage, body, text, finish,
                                               counted=len(stream.pieces) if kept is None else kept)
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            seconds=seconds,
            finish_reason=finish,
        )


def _text(value: Any) -> str:
    """An answer's text from a reply: a string, else nothing (a list of content parts or an
    object would otherwise become its Python spelling). A lone surrogate in it (`_read`)
    becomes U+FFFD: no UTF-8 output (`cre serve`'s reply, a result line) can hold one."""
    return safejson.replace_surrogates(value) if isinstance(value, str) else ""


def _advice(code: int, spec: "ModelSpec") -> str:
    if code in (401, 403):
        if spec.api_key_env:
            return f"check the API key in ${spec.api_key_env}"
        # Set by no file: named beside the `url` of the server that asked for it.
        return f"the server wants an API key: set `api_key_env` in {spec.set_in('url')}"
    if code == 404:
        return f"check {spec.where_set('url', 'api_model')} (`url` is the API root, usually ending in /v1)"
    if code == 429 or code >= 500:
        return "the server is busy or failing; try again later"
    return f"check the model's settings in {spec.set_in()}"


def _retry_after(reply: "transport.Reply") -> float | None:
    """A reply's Retry-After in seconds (the delay form; an HTTP date counts as unknown). Any
    finite wait, a day or more too: `ReplicaSet.release` caps how long it keeps the server
    out, and a wait that long is never waited for, only respected (`Replica.asked_long`)."""
    value = reply.header("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None
