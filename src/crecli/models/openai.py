"""A remote rung: any OpenAI-compatible server (llama.cpp server, vLLM, Ollama).

models.toml names the server with `url` (the API root, e.g. http://127.0.0.1:8080/v1),
the model with `api_model`, and optionally `api_key_env`, the environment variable that
holds the API key (the key itself never goes into a file). Completion-style formats post
the rendered prompt to `{url}/completions`, so every sample of one prompt sends identical
text and the server's prompt cache can serve samples 2..k; prompt_format "chat" posts
messages to `{url}/chat/completions` and lets the server apply its own template.

Only the standard library talks HTTP, so a remote rung adds no dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from crecli.errors import BackendError, ConfigError
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


class OpenAIBackend(Backend):
    def __init__(self, spec: "ModelSpec", timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(spec)
        if not spec.url:
            raise ConfigError(f"{spec.defined_in}: model {spec.name!r} has no `url` for its server")
        self.url = spec.url.rstrip("/")
        self.timeout = timeout

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

    def _post(self, endpoint: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POST JSON to the server; redirects are refused (see _NoRedirect)."""
        url = f"{self.url}/{endpoint}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=self._headers(), method="POST")
        where = f"model {self.spec.name!r} at {url}"
        start = time.perf_counter()
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
                # read(n) returns a body cut short by a closed connection without complaint;
                # the bytes its Content-Length still promised tell that the server went away.
                missing = response.length if len(raw) <= MAX_REPLY_BYTES else None
            if len(raw) > MAX_REPLY_BYTES:
                raise BackendError(f"{where}: the reply is over {MAX_REPLY_BYTES // 2**20} MiB; refusing it")
            if missing:
                raise http.client.IncompleteRead(raw, missing)
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace").strip()
            raise BackendError(f"{where}: HTTP {exc.code} {exc.reason}: {detail or 'no details'}; {_advice(exc.code, self.spec)}") from None
        except (TimeoutError, socket.timeout):
            raise BackendError(
                f"{where}: no answer within {self.timeout:.0f} s; check that the server is not overloaded"
            ) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise BackendError(
                    f"{where}: no answer within {self.timeout:.0f} s; check that the server is not overloaded"
                ) from None
            raise BackendError(
                f"{where}: cannot connect ({exc.reason}); start the server or fix `url` in {self.spec.defined_in}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            # urllib wraps only a failed connect in URLError: a server that dies after taking
            # the request (a crash, an OOM kill, a restart) surfaces as a raw reset or a
            # truncated reply, which would otherwise end `cre` with a traceback.
            raise BackendError(
                f"{where}: the connection broke before the reply was complete ({type(exc).__name__}: {exc}); "
                "the server may have crashed or restarted, check its log"
            ) from None
        seconds = time.perf_counter() - start
        try:
            data = json.loads(raw)
            data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(
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
    def _generation(data: dict[str, Any], text: str, seconds: float) -> Generation:
        usage = data.get("usage") or {}
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            finish_reason=str(data["choices"][0].get("finish_reason") or "stop"),
        )

    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        # The server parses special tokens in the text it is sent, so user text goes with its
        # control-token spellings defused (`Rendered.escaped`).
        data, seconds = self._post("completions", {**self._body(params), "prompt": rendered.escaped()})
        return self._generation(data, str(data["choices"][0].get("text") or ""), seconds)

    def generate(self, prompt: str, params: GenParams = GenParams()) -> Generation:
        if self.spec.prompt_format != "chat":
            return super().generate(prompt, params)
        messages = chat_messages(prompt, shots=params.shots)
        data, seconds = self._post("chat/completions", {**self._body(params), "messages": messages})
        message = data["choices"][0].get("message") or {}
        return self._generation(data, str(message.get("content") or ""), seconds)


def _advice(code: int, spec: "ModelSpec") -> str:
    if code in (401, 403):
        return f"check the API key in ${spec.api_key_env}" if spec.api_key_env else f"the server wants an API key: set `api_key_env` in {spec.defined_in}"
    if code == 404:
        return f"check `url` (the API root, usually ending in /v1) and `api_model` in {spec.defined_in}"
    if code == 429 or code >= 500:
        return "the server is busy or failing; try again later"
    return f"check the model's settings in {spec.defined_in}"
