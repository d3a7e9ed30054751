"""A real HTTP server in a thread that speaks enough of OpenAI's API to stand in for a rung's
serving engine: canned completions with log-probabilities in the shapes vLLM, OpenAI and
llama.cpp's server send, streams, and the faults a fleet of engines shows (refusals, 5xx,
503 with Retry-After, a server that dies holding a request, one that hangs).

Tests set its attributes between requests; each request reads them once.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Tok = tuple[str, float, dict[str, float]]  # (token text, its log-prob, the top alternatives)
Answer = Callable[[str, dict[str, Any]], "str | list[Tok]"]


def tokens_of(text: str, logprob: float = -0.05) -> list[Tok]:
    """`text` cut into word tokens, each chosen at `logprob` over one runner-up."""
    pieces = re.findall(r"\s*\S+", text) or [text]
    return [(p, logprob, {p: logprob, " zz": math.log(max(1e-12, 1 - math.exp(logprob)))}) for p in pieces]


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1: `url` is its API root (ending in /v1).

    - `answer(prompt, body)`: the reply's text, or its tokens with log-probabilities;
    - `logprobs`: "legacy" (completions as OpenAI and vLLM send them), "content" (as chat,
      and llama.cpp's server on both endpoints), "drop" (none, as Ollama's OpenAI endpoint),
      "reject" (a 400 for any request asking for them), "fail" (a 500 for any request asking
      for them, as llama-cpp-python's server without `logits_all`);
    - `status` / `retry_after`: answer every request with this HTTP error (503, 500, 429...);
      with `status_once`, only the next request: `status` clears as that request reads it,
      before its reply, so the client's next request is answered (no timer to race it);
      `status_message`: what that error's message says (else "fake status N");
    - `page`: answer every request 200 with these bytes as `page_type` (text/html: a proxy's
      or another service's page where the API should be: no completion);
    - `ignore_max_tokens`: answer with every token, whatever `max_tokens` asks;
    - `usage` False: no `usage` in a reply, nor in a stream however it is asked for (some
      proxies and older engines leave it out); a dict: these counts in place of the true
      ones (older Ollama sends a cached prompt's `prompt_tokens` as 0);
    - `finish`: the finish reason a reply (or a stream's last event) gives ("stop"; "length"
      for an answer its engine stopped at `max_tokens`);
    - `ignore_stream`: answer a streamed request with a whole JSON completion (a server or
      proxy that ignores `stream: true`); `stream_type`: the Content-Type a stream is sent as;
    - `die`: close the connection holding the request, with no reply (a crashed server);
    - `delay`: seconds before answering (a slow or hung server); `token_delay` between streamed tokens;
    - `stream_error`: a stream sends this error event after its tokens (an engine failing
      mid-answer); `stream_done` False: a stream ends without `data: [DONE]` (cut short);
    - `stream_event`: a stream sends this event, as it is, after its tokens (a malformed one);
    - `stream_break`: a stream's connection breaks after its tokens (an engine that crashed);
    - `stream_raw`: a stream sends these bytes, as they are, after its tokens (lines that are
      not `data:`, such as the `error:` line some versions of llama.cpp's server send);
    - `hold_last`: an Event a stream waits for (up to 30 s) before sending its last token, so
      a test can see the first token arrive while the rest is still to come;
    - `token_sent_at`: when (time.monotonic()) each streamed token was sent, in order.
    """

    def __init__(self, answer: Answer | None = None, model: str = "served") -> None:
        self.answer: Answer = answer or (lambda prompt, body: "42")
        self.model = model
        self.logprobs = "legacy"
        self.status: int | None = None
        self.retry_after: str | None = None
        self.status_once = False
        self.status_message: str | None = None
        self.page: bytes | None = None
        self.page_type = "text/html"
        self.ignore_stream = False
        self.ignore_max_tokens = False
        self.usage = True
        self.finish = "stop"
        self.stream_type = "text/event-stream"
        self.die = False
        self.delay = 0.0
        self.token_delay = 0.0
        self.stream_error: str | None = None
        self.stream_done = True
        self.stream_event: Any = None
        self.stream_break = False
        self.stream_raw: bytes | None = None
        self.hold_last: threading.Event | None = None
        self.token_sent_at: list[float] = []
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as engines serve it, so clients pool connections

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    server._handle(self, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args: object) -> None:
                pass

        self._handler = Handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ answering

    def _handle(self, h: Any, body: dict[str, Any]) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.die:
            # A crash: the request was taken, no reply comes, the connection goes.
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.status is not None:
            status = self.status
            if self.status_once:
                self.status = None  # before the reply: the request it prompts is answered
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            message = self.status_message or f"fake status {status}"
            h._send(status, {"error": {"message": message, "type": "server_error"}}, headers)
            return
        if self.page is not None:
            h.send_response(200)
            h.send_header("Content-Type", self.page_type)
            h.send_header("Content-Length", str(len(self.page)))
            h.end_headers()
            h.wfile.write(self.page)
            return
        chat = h.path.endswith("/chat/completions")
        wants = body.get("logprobs") not in (None, False, 0)
        if wants and self.logprobs == "reject":
            h._send(400, {"error": {"message": "logprobs are not supported", "type": "invalid_request_error"}})
            return
        if wants and self.logprobs == "fail":
            h._send(500, {"error": {"message": "logprobs is not supported for models created with logits_all=False",
                                    "type": "internal_server_error", "param": None, "code": None}})
            return
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        got = self.answer(prompt, body)
        toks = tokens_of(got) if isinstance(got, str) else got
        if not self.ignore_max_tokens:
            toks = toks[: int(body.get("max_tokens") or 16)]
        text = "".join(t for t, _, _ in toks)
        for stop in body.get("stop") or []:
            if stop in text:
                text = text[: text.index(stop)]
        top = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
        logprobs = self._logprobs(toks, top, chat) if wants and self.logprobs != "drop" else None
        usage = {"prompt_tokens": max(1, len(prompt.split())), "completion_tokens": len(toks),
                 "total_tokens": max(1, len(prompt.split())) + len(toks)}
        if isinstance(self.usage, dict):
            usage.update(self.usage)
        if body.get("stream") and not self.ignore_stream:
            self._stream(h, toks, chat, usage, self.usage and bool((body.get("stream_options") or {}).get("include_usage")))
            return
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish, "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        reply = {"id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
                 "model": body.get("model"), "choices": [choice]}
        h._send(200, {**reply, "usage": usage} if self.usage else reply)

    def _logprobs(self, toks: list[Tok], top: int, chat: bool) -> dict[str, Any]:
        def ranked(alts: dict[str, float]) -> list[tuple[str, float]]:
            return sorted(alts.items(), key=lambda kv: -kv[1])[:top]

        if chat or self.logprobs == "content":
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                                                  for a, v in ranked(alts)]} for t, lp, alts in toks]}
        return {"tokens": [t for t, _, _ in toks], "token_logprobs": [lp for _, lp, _ in toks],
                "top_logprobs": [dict(ranked(alts)) for _, _, alts in toks],
                "text_offset": [sum(len(t) for t, _, _ in toks[:i]) for i in range(len(toks))]}

    def _stream(self, h: Any, toks: list[Tok], chat: bool, usage: dict[str, int], include_usage: bool) -> None:
        h.send_response(200)
        h.send_header("Content-Type", self.stream_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def event(data: Any) -> None:
            raw = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            h.wfile.flush()

        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            for i, (t, _, _) in enumerate(toks):
                if self.token_delay:
                    time.sleep(self.token_delay)
                if self.hold_last is not None and i == len(toks) - 1:
                    self.hold_last.wait(30)
                delta = {"delta": {"content": t}} if chat else {"text": t}
                event({"id": "s", "object": obj, "choices": [{"index": 0, "finish_reason": None, **delta}]})
                self.token_sent_at.append(time.monotonic())
            if self.stream_event is not None:
                event(self.stream_event)
            if self.stream_raw is not None:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(self.stream_raw), self.stream_raw))
            if self.stream_break:
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            if self.stream_error is not None:
                event({"error": {"message": self.stream_error, "type": "server_error"}})
            elif self.stream_done:
                last = {"delta": {}} if chat else {"text": ""}
                event({"id": "s", "object": obj, "choices": [{"index": 0, "finish_reason": self.finish, **last}]})
                if include_usage:
                    event({"id": "s", "object": obj, "choices": [], "usage": usage})
            if self.stream_done:
                event("[DONE]")
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def close(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
