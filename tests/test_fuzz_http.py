"""Fuzzing `cre serve`'s HTTP surface (issue 22), on the package's fake backend.

Request bodies (JSON of random shapes, OpenAI fields with random types and values, huge
and odd strings, bytes that are not UTF-8) and headers (Content-Length that lies,
Authorization and Content-Type variants, bodies split anywhere, clients that leave
mid-body) go straight into the ASGI app, as uvicorn would hand them over; raw bytes go to
a live server's connection, through the h11 protocol with its deadlines. The property:
every answer is OpenAI-shaped JSON (an error with exactly message/type/param/code, or a
success), never a 5xx and never a traceback, and the app never raises.

Each call has its own time bound, so Hypothesis's per-example deadline is off: the CPU
may be shared, and a slow example is not a failure here. The whole file runs in ~10 s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
pytest.importorskip("starlette")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402

from crecli import config  # noqa: E402
from crecli.escalate import Cascade  # noqa: E402
from crecli.models.fake import FakeBackend  # noqa: E402
from crecli.openai_wire import APPLIED, METADATA, UNSUPPORTED  # noqa: E402
from crecli.serve_app import ServeOptions, create_app  # noqa: E402
from support.ladder import install, ready_ladder  # noqa: E402
from support.prompts import SURE_TABLE  # noqa: E402
from support.routers import make_router  # noqa: E402
from support.serving import serving  # noqa: E402

KEY = "k€y-1"
MAX_BODY = 16 << 10  # small, so that 413 is reachable
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- an ASGI client


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "state": {}}


async def _call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes],
                leave: bool) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """One request as uvicorn hands it to the app: the body in `chunks`, then, with `leave`,
    the client gone before the last one. Returns the status (None if none was sent), the
    headers and the body."""
    pieces = chunks or [b""]
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": c, "more_body": i < len(pieces) - 1}
                                      for i, c in enumerate(pieces)]
    if leave:
        messages = messages[:-1] + [{"type": "http.disconnect"}]
    done = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await done.wait()  # the body is all in: nothing more until the response is sent
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await asyncio.wait_for(app(_scope(method, path, headers), receive, send), 20)
    if not sent:
        return None, {}, b""
    start = sent[0]
    return (start["status"], dict(start.get("headers", [])),
            b"".join(m.get("body", b"") for m in sent[1:] if m["type"] == "http.response.body"))


def _check(status: int | None, headers: dict[bytes, bytes], body: bytes, left: bool) -> Any:
    """The property every response must have; returns the decoded JSON (or SSE events)."""
    if status is None or status == 499:
        assert left, (status, body[:300])  # only a client that left gets no answer
        return None
    assert 200 <= status < 500, (status, body[:300])
    assert b"Traceback" not in body and b'File "' not in body, body[:300]
    if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        assert status == 200
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", body[:300]
        return [json.loads(e) for e in events[:-1]]
    assert headers.get(b"content-type") == b"application/json", (status, headers)
    data = json.loads(body)
    if status >= 400:
        assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    else:
        assert "error" not in data
    return data


@pytest.fixture
def apps(fake_backends: Callable[..., dict[str, FakeBackend]], tmp_path: Path) -> Iterator[dict[str, Any]]:
    install(fake_backends, SURE_TABLE)
    settings_ = config.load(ready_ladder(tmp_path))
    made = {"open": create_app(Cascade(make_router(), settings_), ServeOptions(max_body=MAX_BODY, timeout=20), name="team"),
            "keyed": create_app(Cascade(make_router(), settings_), ServeOptions(max_body=MAX_BODY, timeout=20,
                                                                                api_key=KEY))}
    loop = asyncio.new_event_loop()
    made["run"] = lambda *args: loop.run_until_complete(_call(*args))
    try:
        yield made
    finally:
        for name in ("open", "keyed"):
            made[name].state.worker.close()
        loop.close()


# ---------------------------------------------------------------- strategies


def _odd_text() -> Any:
    huge = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\u2028", "\x00", "🔑", "<|im_end|>"]),
                     st.integers(0, 40_000))
    return st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n", "cre", "small", "What is 7 plus 5?"]), huge)


# Integers past float's range too: `math.isfinite(10**400)` raises OverflowError.
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**400)]),
                      st.floats(allow_nan=False, allow_infinity=False), _odd_text())
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                    max_leaves=12)
KNOWN = sorted({*APPLIED["chat"], *APPLIED["completion"], *METADATA, *UNSUPPORTED})


@st.composite
def request_bodies(draw: Any) -> dict[str, Any]:
    """Mostly-valid requests with random fields of random types and values."""
    kind = draw(st.sampled_from(["chat", "completion"]))
    body: dict[str, Any] = {"model": draw(st.sampled_from(["cre", "team", "small", "large", "nope"]) | JSON)}
    if kind == "chat":
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]) | JSON,
                                         "content": _odd_text() | JSON})
        body["messages"] = draw(st.lists(message, max_size=3) | JSON)
    else:
        body["prompt"] = draw(_odd_text() | st.lists(_odd_text(), max_size=2) | JSON)
    for name in draw(st.lists(st.sampled_from(KNOWN), max_size=4, unique=True)):
        body[name] = draw(JSON)
    return {"kind": kind, "body": body}


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
AUTH = st.one_of(st.just(f"Bearer {KEY}".encode()), st.just(b"Bearer k\xe2\x82\xacy-1"), st.just(b"Bearer"),
                 st.just(f"bearer  {KEY} ".encode()), st.just(f"Basic {KEY}".encode()), st.binary(max_size=40))
CONTENT_TYPE = st.one_of(st.just(b"application/json"), st.just(b"text/plain"), st.just(b"application/x-www-form-urlencoded"),
                         st.just(b"application/json; charset=latin-1"), st.binary(max_size=30))
LENGTH = st.one_of(st.none(), st.just("true"), st.integers(-5, 2**80).map(str),
                   st.sampled_from(["", " 5", "5 ", "0x10", "\xb2", "\u0662", "1e3", "+5", "9" * 5000, "0" * 5000 + "9"]))


# ---------------------------------------------------------------- the fuzzers


def test_fuzz_bodies_get_openai_shaped_answers_never_5xx(apps: dict[str, Any]) -> None:
    @FUZZ
    @given(request_bodies(), st.lists(st.integers(0, 200), max_size=3))
    def check(request: dict[str, Any], cuts: list[int]) -> None:
        raw = _encode(request["body"])
        status, headers, body = apps["run"](apps["open"], "POST", PATHS[request["kind"]],
                                            [(b"content-type", b"application/json")], _split(raw, cuts), False)
        data = _check(status, headers, body, False)
        if status == 200 and isinstance(data, dict):
            assert data["choices"] and data["usage"]["total_tokens"] >= 0
        if len(raw) > MAX_BODY:
            assert status == 413

    check()


def test_fuzz_raw_bytes_and_json_shapes_are_400s(apps: dict[str, Any]) -> None:
    invalid_utf8 = st.builds(lambda a, b, c: a + b + c, st.binary(max_size=30),
                             st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]),
                             st.binary(max_size=30))
    body = st.one_of(st.binary(max_size=200), invalid_utf8, JSON.map(_encode),
                     st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                     st.sampled_from([b"", b"{", b"null", b'{"model": "cre", "messages": [{"role": "user", "content": "\\ud800"}]}']))

    @FUZZ
    @given(body, st.sampled_from(sorted(PATHS.values())))
    def check(raw: bytes, path: str) -> None:
        status, headers, data = apps["run"](apps["open"], "POST", path, [], [raw], False)
        _check(status, headers, data, False)
        assert status != 200 or raw.startswith(b"{")

    check()


def test_fuzz_headers_lies_and_leavers(apps: dict[str, Any]) -> None:
    body = st.one_of(st.just({"model": "cre", "messages": [{"role": "user", "content": "What is 7 plus 5?"}]}),
                     st.just({"model": "small", "prompt": "What is 7 plus 5?", "stream": True}), JSON)

    @FUZZ
    @given(body, st.none() | AUTH, CONTENT_TYPE, LENGTH, st.booleans(), st.lists(st.integers(0, 80), max_size=2),
           st.sampled_from(["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health",
                            "GET /v1/chat/completions", "POST /health", "DELETE /v1/models", "POST /nowhere/é"]),
           st.lists(st.tuples(st.sampled_from([b"x-a", b"accept", b"expect", b"transfer-encoding", b"connection"]),
                              st.binary(max_size=20)), max_size=3),
           st.sampled_from(["open", "keyed"]))
    # A client leaving mid-body after a Content-Length of 5,001 digits: the log line formatted
    # it with int(), which raises past 4,300 digits.
    @example({"model": "cre"}, None, b"application/json", "0" * 5000 + "99", True, [3], "POST /v1/completions", [],
             "open")
    def check(value: Any, auth: bytes | None, content_type: bytes, length: str | None, leave: bool,
              cuts: list[int], target: str, extra: list[tuple[bytes, bytes]], which: str) -> None:
        raw = _encode(value)
        headers = [(b"content-type", content_type), *extra]
        if auth is not None:
            headers.append((b"authorization", auth))
        if length is not None:
            # As sent: Latin-1 where it can be (b"\xb2" is a digit to str.isdigit), else UTF-8.
            headers.append((b"content-length", length.encode("latin-1") if length.isascii() or max(length) <= "\xff"
                            else length.encode("utf-8")))
        method, path = target.split(" ", 1)
        status, response_headers, data = apps["run"](apps[which], method, path, headers, _split(raw, cuts), leave)
        decoded = _check(status, response_headers, data, leave)
        keyed = which == "open" or (auth is not None and auth.partition(b" ")[0].lower() == b"bearer"
                                    and auth.partition(b" ")[2].strip() == KEY.encode())
        if path.startswith("/v1/") and status is not None and status not in (404, 405, 499):
            assert (status == 401) == (not keyed), (auth, status, decoded)
        if path == "/health" and method == "GET":
            assert status == 200 and ("models" in decoded) == keyed

    check()


def test_fuzz_raw_request_heads_on_a_live_connection(
    fake_backends: Callable[..., dict[str, FakeBackend]], tmp_path: Path
) -> None:
    """Bytes on the wire, through uvicorn's h11 and the protocol's deadlines: whatever comes
    back is a whole HTTP response with an OpenAI-shaped JSON body, or nothing (a closed
    connection); never a 5xx."""
    install(fake_backends, SURE_TABLE)
    line = st.sampled_from([b"GET /health HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1", b"GET / HTTP/1.0",
                            b"BREW /pot HTTP/1.1", b"GET /health HTTP/9.9", b"\x16\x03\x01\x02\x00", b""])
    header = st.one_of(st.binary(max_size=40),
                       st.builds(lambda n, v: n + b": " + v, st.sampled_from(
                           [b"Host", b"Content-Length", b"Transfer-Encoding", b"Authorization", b"Expect", b"X" * 300]),
                           st.binary(max_size=30)))
    tail = st.sampled_from([b"\r\n\r\n", b"\r\n", b"", b"\n\n", b"\r\n\r\n{}", b"\r\n\r\n" + b"x" * 5000])
    with serving(Cascade(make_router(), config.load(ready_ladder(tmp_path))), header_timeout=0.3, body_timeout=0.3,
                 max_body=MAX_BODY) as url:
        port = int(url.rsplit(":", 1)[1])

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(line, st.lists(header, max_size=4), tail)
        def check(first: bytes, headers: list[bytes], end: bytes) -> None:
            request = b"\r\n".join([first, *headers]) + end
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(request)
                reply = _read_response(conn)
            if not reply:
                return
            head, _, body = reply.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            assert 200 <= status < 500, reply[:300]
            if body:
                data = json.loads(body)
                assert status < 400 or set(data["error"]) == {"message", "type", "param", "code"}, data

        check()


def _read_response(conn: socket.socket) -> bytes:
    """One response (its head and a Content-Length body), or what came before the peer closed.

    A server that stays silent fails: 4 s is over ten times the header and body timeouts the
    server runs with here, by which it must have answered or closed the connection."""
    reply, deadline = b"", time.monotonic() + 4
    while (left := deadline - time.monotonic()) > 0:
        head, sep, body = reply.partition(b"\r\n\r\n")
        if sep:
            lengths = [int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")]
            if lengths and len(body) >= lengths[0]:
                return head + sep + body[: lengths[0]]
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return reply
        except socket.timeout:
            break  # silent, connection open: a hung server, not a closed connection
        if not chunk:
            return reply
        reply += chunk
    raise AssertionError(f"no whole response and no close within 4 s: {reply[:300]!r}")
