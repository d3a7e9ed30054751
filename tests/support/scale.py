"""What the scale-out tests share (test_remote_signals, test_serve_scale, test_replicas,
test_real_scale): the fake ladder with some rungs on real HTTP servers (`ladder_toml`,
`use_models`), fakes that take time or stream, and clients that send at once."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from crecli.config import ModelSpec
from crecli.models import registry, replicas
from crecli.models.backend import Backend, Generation, GenParams, StopSafeEmitter, cut_at_stop
from crecli.models.fake import FakeBackend
from crecli.models.openai import OpenAIBackend, forget_signal_support

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def fresh_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy between the tests and their loopback servers, and no server's support or
    health remembered from another test (a port may be reused)."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    forget_signal_support()
    replicas.forget()


def ladder_toml(folder: Path, remote: dict[str, str | list[str]] | None = None, max_in_flight: int | None = None) -> Path:
    """The fake small/medium/large ladder, with the rungs in `remote` served by the URLs given
    (chat format) and the others GGUF-headed files /health finds ready."""
    text = 'ladder = ["small", "medium", "large"]\n[embedder]\nkind = "tfidf"\ndims = 16\n'
    for name in ("small", "medium", "large"):
        where = (remote or {}).get(name)
        if where is None:
            (folder / f"{name}.gguf").write_bytes(b"GGUF" + bytes(28))
            text += f'[models.{name}]\npath = "{folder / (name + ".gguf")}"\n'
        else:
            text += f"[models.{name}]\nurl = {json.dumps(where)}\napi_model = \"served\"\nprompt_format = \"chat\"\n"
            if max_in_flight is not None:
                text += f"max_in_flight = {max_in_flight}\n"
    (folder / "models.toml").write_text(text)
    return folder / "models.toml"


class WordByWord(FakeBackend):
    """A fake that generates its answer a word at a time, `pause` seconds apart, as llama.cpp
    streams tokens; it stops at its format's stop strings, as a real runtime does.

    `generated_at` holds when (time.monotonic()) each word was generated; with `hold_last`
    set, a stream waits (up to 30 s) for that Event before generating its last word."""

    def __init__(self, spec: ModelSpec, answers: Any, pause: float) -> None:
        super().__init__(spec, answers)
        self.pause = pause
        self.raw = ""
        self.generated_at: list[float] = []
        self.hold_last: threading.Event | None = None

    def complete(self, rendered: Any, params: GenParams) -> Generation:
        gen = super().complete(rendered, params)
        self.raw = gen.text
        gen.text = cut_at_stop(gen.text, params.stop)[0]
        return gen

    def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
        gen = self.generate(prompt, params)
        streamed = StopSafeEmitter(self.prepare(prompt, params)[1].stop, emit)
        words = self.raw.split(" ")
        for i in range(len(words)):
            time.sleep(self.pause)
            if self.hold_last is not None and i == len(words) - 1:
                self.hold_last.wait(30)
            streamed.add(words[i] if i == 0 else " " + words[i])
            self.generated_at.append(time.monotonic())
        streamed.finish(gen.text)
        return gen


def use_models(monkeypatch: pytest.MonkeyPatch, answers: dict[str, Callable[[str, GenParams], str]],
               streaming: dict[str, float] | None = None, hold_last: threading.Event | None = None
               ) -> dict[str, Backend]:
    """In-process rungs are fakes answering with `answers`; remote rungs the real backend. A
    rung in `streaming` hands its words over one by one, that many seconds apart, waiting for
    `hold_last` before its last (`WordByWord`). Returns the backends made, by model name,
    filled in as models are used."""
    made: dict[str, Backend] = {}

    def make(spec: ModelSpec) -> Backend:
        backend: Backend
        if spec.url:
            backend = OpenAIBackend(spec)
        elif streaming and spec.name in streaming:
            backend = WordByWord(spec, answers.get(spec.name), streaming[spec.name])
            backend.hold_last = hold_last
        else:
            backend = FakeBackend(spec, answers.get(spec.name))
        made[spec.name] = backend
        return backend

    monkeypatch.setattr(registry, "make_backend", make)
    monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
    return made


@contextmanager
def pooled_transport() -> Iterator[None]:
    """`cre serve`'s transport (`http.LoopTransport`, the one that streams) for the block, on
    an event loop of its own, as the process's; the default one again after."""
    import asyncio

    from crecli.models import http as transport

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pool = transport.LoopTransport(loop)
    previous = transport.use(pool)
    try:
        yield
    finally:
        transport.use(previous)
        asyncio.run_coroutine_threadsafe(pool.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def slow(answer: str, seconds: float, log: dict[str, list[int]] | None = None, name: str = "") -> Callable[..., str]:
    """An answerer that takes `seconds` a vote, recording in `log[name]` how many ran at once."""
    lock = threading.Lock()
    running = [0]

    def answerer(text: str, params: GenParams) -> str:
        with lock:
            running[0] += 1
            if log is not None:
                log.setdefault(name, []).append(running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return answer

    return answerer


def post(url: str, model: str, content: str = "What is 3 plus 4?", **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Each call on its own thread, all started together; their results in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def dead_url() -> str:
    """The API root of a server that is gone: connecting is refused."""
    return dead_urls(1)[0]


def dead_urls(n: int) -> list[str]:
    """The API roots of `n` different servers that are gone: connecting to each is refused.
    All `n` are started before any is closed, so that no two share a port: two calls of
    `dead_url` could both get the port the first one let go."""
    from contextlib import ExitStack

    from support.fake_openai import FakeOpenAI

    with ExitStack() as servers:
        return [servers.enter_context(FakeOpenAI()).url for _ in range(n)]


def server_log_lines(request: pytest.FixtureRequest) -> list[str]:
    """The lines the server logs from now on (`uvicorn.error`), until the test ends."""
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, server_log = Collect(), logging.getLogger("uvicorn.error")
    server_log.addHandler(handler)
    request.addfinalizer(lambda: server_log.removeHandler(handler))
    return lines
