"""A remote rung: any OpenAI-compatible server (llama.cpp server, vLLM, Ollama).

models.toml names the server with `url` (the API root, e.g. http://127.0.0.1:8080/v1),
the model with `api_model`, and optionally `api_key_env`, the environment variable that
holds the API key (the key itself never goes into a file). Completion-style formats post
the rendered prompt to `{url}/completions`, so every sample of one prompt sends identical
text and the server's prompt cache can serve samples 2..k; prompt_format "chat" posts
messages to `{url}/chat/completions` and lets the server apply its own template.

Greedy requests ask for log-probabilities (`logprobs.py` reads the same `Signals` from them
that the llama.cpp backend reads from its logits) when the rung's server returns usable ones.
Whether it does is found out once per (url, model) and process by a one-token probe
(`signal_support`), which `cre models list` shows; a server that returns none (Ollama's
OpenAI endpoint) is not asked again, and its rung's answers carry no signals.

Only the standard library talks HTTP, so a remote rung adds no dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from crecli.errors import BackendError, ConfigError
from crecli.models import logprobs as lp
from crecli.models.backend import Backend, Generation, GenParams
from crecli.models.prompting import Rendered, chat_messages

if TYPE_CHECKING:
    from crecli.config import ModelSpec

DEFAULT_TIMEOUT = 120.0


# A completion is a few KB; a reply far larger than any answer is a broken or hostile server.
MAX_REPLY_BYTES = 16 * 2**20


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would follow one to another host (or to ftp://) and send the
    Authorization header there, so a `url` rung answers only from the address it names."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(
            req.full_url, code, f"redirect to {newurl[:200]} refused; set `url` to the final address", headers, fp
        )


_OPENER = urllib.request.build_opener(_NoRedirect)

# The probe's prompt: one token of an answer to a lettered question, so a server that returns
# log-probabilities shows its top list where it matters most (the option-letter margin).
PROBE_QUESTION = "Which is a colour? (A) red (B) seven. Answer with the letter."
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class SignalSupport:
    """Whether a rung's server returns usable log-probabilities (`signal_support`).

    `kind` is "logprobs" (it does; `top` alternatives a token are asked for), "none" (it
    answers without them, or refuses to give them) or "unknown" (it could not be asked:
    `detail` says why; asked again next time)."""

    kind: str
    top: int = 0
    detail: str = ""

    @property
    def label(self) -> str:
        """What `cre models list` shows: "logprobs", "none" or "unknown (why)"."""
        return self.kind if self.kind != "unknown" else f"unknown ({self.detail or 'not reached'})"


# The statuses of a server refusing a request for log-probabilities rather than failing.
REFUSALS = (400, 422, 500)


class RemoteError(BackendError):
    """A remote rung's server did not answer: `status` is its HTTP status (None when no reply
    came: refused connection, timeout, broken reply), `retry_after` its Retry-After in seconds."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


# (url, api model) -> what its server was found to do, for this process.
_SUPPORT: dict[tuple[str, str], SignalSupport] = {}
_SUPPORT_LOCK = threading.Lock()


def forget_signal_support() -> None:
    """Forget every rung's probed support (tests; a long-running process after a redeploy)."""
    with _SUPPORT_LOCK:
        _SUPPORT.clear()


class OpenAIBackend(Backend):
    def __init__(self, spec: "ModelSpec", timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(spec)
        if not spec.url:
            raise ConfigError(f"{spec.defined_in}: model {spec.name!r} has no `url` for its server")
        self.url = spec.url.rstrip("/")
        self.timeout = timeout
        # Greedy answers carry `Signals` where the server gives log-probabilities; off only
        # to measure what asking for them costs.
        self.read_signals = True

    @property
    def _support_key(self) -> tuple[str, str]:
        return (self.url, self.spec.api_model or self.spec.name)

    def signal_support(self, probe: bool = True) -> SignalSupport:
        """Whether this rung's server returns usable log-probabilities, found out once per
        process: by the replies to greedy requests, or by a probe (`probe` False: only what
        is known, "unknown" if nothing is). A failed probe is not remembered."""
        with _SUPPORT_LOCK:
            known = _SUPPORT.get(self._support_key)
        if known is not None or not probe:
            return known or SignalSupport("unknown", detail="not asked yet")
        chat = self.spec.prompt_format == "chat"
        body: dict[str, Any] = {"model": self.spec.api_model or self.spec.name, "max_tokens": 1, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": PROBE_QUESTION}]
        else:
            body["prompt"] = f"Q: {PROBE_QUESTION}\nA: ("
        try:
            self._ask("chat/completions" if chat else "completions", body, greedy=True, timeout=PROBE_TIMEOUT)
        except RemoteError as exc:
            return SignalSupport("unknown", detail="not reached" if exc.status is None else f"HTTP {exc.status}")
        except BackendError:  # no API key in the environment
            return SignalSupport("unknown", detail="no API key")
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
        if self.spec.prompt_format == "chat":
            return {"logprobs": True, "top_logprobs": top}
        return {"logprobs": top}

    def _ask(self, endpoint: str, body: dict[str, Any], greedy: bool,
             timeout: float | None = None) -> tuple[dict[str, Any], float]:
        """POST `body`, asking a greedy request for log-probabilities unless the server is known
        to give none, and learn from the reply what it gives (`signal_support`).

        A server that refuses the request for them (400, 422 or 500: some cap `top_logprobs`,
        llama-cpp-python without `logits_all` fails) is asked again with fewer alternatives,
        then without any; answering that one means it serves the rung but gives no signals.
        A reply without them is not taken as proof: an answer cut to nothing has none either.
        """
        known = self.signal_support(probe=False)
        if not greedy or not self.read_signals or known.kind == "none":
            return self._post(endpoint, body, timeout)
        tops = (known.top,) if known.kind == "logprobs" else (lp.TOP_LOGPROBS, lp.FEWER_LOGPROBS)
        refused: RemoteError | None = None
        for top in tops:
            try:
                data, seconds = self._post(endpoint, {**body, **self._logprob_fields(top)}, timeout)
            except RemoteError as exc:
                if exc.status not in REFUSALS:
                    raise
                refused = exc
                continue
            if known.kind != "logprobs" and lp.usable(lp.steps(data["choices"][0].get("logprobs"))):
                self._learn(SignalSupport("logprobs", top=top))
            return data, seconds
        data, seconds = self._post(endpoint, body, timeout)
        # It answers without them: it refused log-probabilities, not the request.
        self._learn(SignalSupport("none", detail=f"refuses log-probabilities (HTTP {refused.status if refused else '?'})"))
        return data, seconds

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        env = self.spec.api_key_env
        if env:
            key = os.environ.get(env)
            if not key:
                raise BackendError(
                    f"model {self.spec.name!r} needs an API key in ${env}, which is not set; "
                    f"export {env}=... (or remove `api_key_env` from {self.spec.defined_in})"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, endpoint: str, body: dict[str, Any], timeout: float | None = None) -> tuple[dict[str, Any], float]:
        """POST JSON to the server; redirects are refused (see _NoRedirect)."""
        timeout = self.timeout if timeout is None else timeout
        url = f"{self.url}/{endpoint}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self._headers(), method="POST")
        where = f"model {self.spec.name!r} at {url}"
        start = time.perf_counter()
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
                # read(n) returns a body cut short by a closed connection without complaint;
                # the bytes its Content-Length still promised tell that the server went away.
                missing = response.length if len(raw) <= MAX_REPLY_BYTES else None
            if len(raw) > MAX_REPLY_BYTES:
                raise RemoteError(f"{where}: the reply is over {MAX_REPLY_BYTES // 2**20} MiB; refusing it")
            if missing:
                raise http.client.IncompleteRead(raw, missing)
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace").strip()
            raise RemoteError(f"{where}: HTTP {exc.code} {exc.reason}: {detail or 'no details'}; {_advice(exc.code, self.spec)}",
                              exc.code, _retry_after(exc.headers)) from None
        except (TimeoutError, socket.timeout):
            raise RemoteError(
                f"{where}: no answer within {timeout:.0f} s; check that the server is not overloaded"
            ) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise RemoteError(
                    f"{where}: no answer within {timeout:.0f} s; check that the server is not overloaded"
                ) from None
            raise RemoteError(
                f"{where}: cannot connect ({exc.reason}); start the server or fix `url` in {self.spec.defined_in}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            # urllib wraps only a failed connect in URLError: a server that dies after taking
            # the request (a crash, an OOM kill, a restart) surfaces as a raw reset or a
            # truncated reply, which would otherwise end `cre` with a traceback.
            raise RemoteError(
                f"{where}: the connection broke before the reply was complete ({type(exc).__name__}: {exc}); "
                "the server may have crashed or restarted, check its log"
            ) from None
        seconds = time.perf_counter() - start
        try:
            data = json.loads(raw)
            data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteError(
                f"{where}: the reply is not an OpenAI-style completion ({raw[:200]!r}); "
                "check that `url` points at the API root (usually ending in /v1)"
            ) from None
        return data, seconds

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
        return body

    @staticmethod
    def _generation(data: dict[str, Any], text: str, seconds: float, greedy: bool) -> Generation:
        usage = data.get("usage") or {}
        choice = data["choices"][0]
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            signals=lp.signals(lp.steps(choice.get("logprobs"))) if greedy else None,
        )

    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        # The server parses special tokens in the text it is sent, so user text goes with its
        # control-token spellings defused (`Rendered.escaped`).
        greedy = params.temperature == 0.0
        data, seconds = self._ask("completions", {**self._body(params), "prompt": rendered.escaped()}, greedy)
        return self._generation(data, str(data["choices"][0].get("text") or ""), seconds, greedy)

    def generate(self, prompt: str, params: GenParams = GenParams()) -> Generation:
        if self.spec.prompt_format != "chat":
            return super().generate(prompt, params)
        messages = chat_messages(prompt, shots=params.shots)
        data, seconds = self._ask("chat/completions", {**self._body(params), "messages": messages},
                                  params.temperature == 0.0)
        message = data["choices"][0].get("message") or {}
        return self._generation(data, str(message.get("content") or ""), seconds, params.temperature == 0.0)


def _advice(code: int, spec: "ModelSpec") -> str:
    if code in (401, 403):
        return f"check the API key in ${spec.api_key_env}" if spec.api_key_env else f"the server wants an API key: set `api_key_env` in {spec.defined_in}"
    if code == 404:
        return f"check `url` (the API root, usually ending in /v1) and `api_model` in {spec.defined_in}"
    if code == 429 or code >= 500:
        return "the server is busy or failing; try again later"
    return f"check the model's settings in {spec.defined_in}"


def _retry_after(headers: Any) -> float | None:
    """A reply's Retry-After in seconds (the delay form; an HTTP date counts as unknown)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 86400 else None
