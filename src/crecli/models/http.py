"""How a remote rung's requests travel: the process's HTTP transport.

Two transports, one contract (`post` a JSON body, get a `Reply` back, or a `TransportError`
saying whether no connection was made, no answer came in time, or the reply broke off).
A post's `timeout` bounds the whole try, its reply's status line and headers as well as its
body, not only each read: a server that trickles its reply a byte at a time would otherwise
hold a try for as long as it likes.

- `UrllibTransport`, the default: the standard library, one connection per request, no
  redirects followed. `cre ask` and `cre batch` send one request at a time, so a pool
  would buy nothing there, and crecli's core needs no HTTP package.
- `LoopTransport`, which `cre serve` installs (`use`): httpx's async client on the
  server's event loop, one connection pool for every rung, called from the request threads.
  A call belongs to its request: when the request gives up (`cancel.Token`), the call is
  cancelled and its connection closed, so the engine stops generating for nobody. It can
  also stream a reply's server-sent events as they come (a remote rung's stream passed
  through to the client).

Status codes are the caller's to judge (`OpenAIBackend`): a 3xx comes back as a reply, never
followed, so an API key is never sent to an address the `url` did not name. Nor is a header
ever quoted in an error: a header value neither transport can send as it is (`header_fault`)
is refused before sending, naming the header, not its value (an API key). Nor is a URL the
client cannot send to (`INVALID_URL`): it may hold a password.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from crecli import cancel

if TYPE_CHECKING:
    import httpx


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class TransportError(Exception):
    """No usable reply: `kind` is "connect" (no connection: refused, no route),
    "connect_timeout" (no connection made within the try's time), "timeout" (no answer in
    time), "broken" (the connection broke before the reply was complete), "too_large", or
    "local" (this side refused to send the request: no fault of the server's)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind, self.detail = kind, detail


# What a try to a URL the HTTP client cannot send to says, in place of the client's message,
# which quotes the URL: urllib reads `http://user:password@host` as a port, "nonnumeric port:
# 'password@host'". models.toml refuses such a `url` (`config._url`); a spec built in code may not.
INVALID_URL = "InvalidURL: the HTTP client cannot send to this url (not quoted: it may hold a password)"


class Transport(Protocol):
    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int) -> Reply: ...


def header_fault(value: str) -> str | None:
    """What makes `value` no header value that both transports send as it is (None when it is
    one), said without the value, which may be an API key: urllib refuses a line break and
    sends Latin-1, httpx sends ASCII, so printable ASCII only."""
    for char in value:
        if char < " " or char == "\x7f":
            return "a control character (such as a line break)"
        if char > "~":
            return "a character outside ASCII"
    return None


def _check_headers(headers: dict[str, str]) -> None:
    """Refuse `headers` if one cannot be sent as it is: the libraries' own errors quote it."""
    for name, value in headers.items():
        if (fault := header_fault(value)) is not None:
            raise ValueError(f"the {name} header holds {fault}; not sent (its value is not shown)")


def _waitable(seconds: float) -> float:
    """`seconds` as a thread or a socket can wait it: at most `threading.TIMEOUT_MAX` (about
    292 years), past which a wait raises OverflowError (a `cre serve` whose requests had a
    deadline that far off answered every remote rung's stream with a 500)."""
    return min(seconds, threading.TIMEOUT_MAX)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would follow one to another host (or to ftp://) and send the
    Authorization header there."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


class _Request(urllib.request.Request):
    """A POST whose reply is to be read by `deadline` (time.monotonic(), `_ByDeadline`)."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str], deadline: float) -> None:
        super().__init__(url, data=body, headers=headers, method="POST")
        self.deadline = deadline


class _TimedReads(io.RawIOBase):
    """`sock` read by `deadline` (time.monotonic()): each read waits only for the time left
    before it, and none begins after it. A socket timeout alone bounds each read, and with the
    try's whole timeout, a read begun just before the deadline would wait that long again; a
    reply's status line and headers (read line by line, in as many reads as the server takes
    to send them) and a chunked body's size lines would wait that long for every byte."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(_waitable(left))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _TimedSocket:
    """What an `http.client.HTTPResponse` is made from (it only calls `makefile`): `sock`,
    read by `deadline` (`_TimedReads`)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_TimedReads(self.sock, self.deadline))


class _TimedResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(_TimedSocket(sock, deadline), *args, **kwargs)  # type: ignore[arg-type]


class _ByDeadline(urllib.request.AbstractHTTPHandler):
    """An HTTP(S) handler whose connections read a `_Request`'s reply, headers and all, by its
    deadline (`_TimedResponse`)."""

    def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        if isinstance(req, _Request):
            http_class = functools.partial(_timed_connection, http_class, req.deadline)
        return super().do_open(http_class, req, **http_conn_args)


def _timed_connection(http_class: Any, deadline: float, host: str, **kwargs: Any) -> http.client.HTTPConnection:
    """A connection of `http_class` (HTTP or HTTPS) whose reply is read by `deadline`."""
    connection: http.client.HTTPConnection = http_class(host, **kwargs)
    connection.response_class = functools.partial(_TimedResponse, deadline=deadline)  # type: ignore[assignment]
    return connection


class _HTTPHandler(_ByDeadline, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_ByDeadline, urllib.request.HTTPSHandler):
    pass


class UrllibTransport:
    """The standard library's HTTP client: one connection per request. Its socket timeout
    bounds each read, so the reply (an error reply's too), from its status line on, is read
    against the try's deadline, each read's socket timeout cut to the time left before it
    (`_TimedReads`)."""

    def __init__(self) -> None:
        self._opener = urllib.request.build_opener(_NoRedirect, _HTTPHandler, _HTTPSHandler)

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int) -> Reply:
        _check_headers(headers)
        request = _Request(url, body, headers, time.monotonic() + timeout)
        try:
            with self._opener.open(request, timeout=_waitable(timeout)) as response:
                raw = _read_by(response, max_bytes + 1)
                # A read returns a body cut short by a closed connection without complaint;
                # the bytes its Content-Length still promised tell that the server went away.
                missing = response.length if len(raw) <= max_bytes else None
                status, got = response.status, dict(response.headers.items())
            if len(raw) > max_bytes:
                raise TransportError("too_large")
            if missing:
                raise http.client.IncompleteRead(raw, missing)
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, _error_body(exc), _lower(exc.headers))
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise TransportError("timeout") from None
            raise TransportError("connect", str(exc.reason)) from None
        except http.client.InvalidURL:
            raise TransportError("local", INVALID_URL) from None
        except (OSError, http.client.HTTPException) as exc:
            # urllib wraps only a failed connect in URLError: a server that dies after taking
            # the request (a crash, an OOM kill, a restart) surfaces as a raw reset or a
            # truncated reply.
            raise _read_failure(exc) from None
        return Reply(status, raw, _lower(got))


def _read_failure(exc: OSError | http.client.HTTPException) -> TransportError:
    """A read that failed once the server had the request: a timeout, else a broken reply
    (the rule for a 2xx body and an error reply's alike)."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return TransportError("timeout")
    return TransportError("broken", f"{type(exc).__name__}: {exc}")


def _error_body(exc: urllib.error.HTTPError) -> bytes:
    """The first 500 bytes of an error reply's body (its message), read by the try's deadline
    as any body is (`_TimedReads`): a proxy that sends 502's headers and then stalls would
    otherwise hold the try for another whole timeout. A read that times out or breaks is a
    `TransportError`, as it is for a 2xx body."""
    if exc.fp is None:
        return b""
    try:
        return _read_by(exc.fp, 500)
    except (OSError, http.client.HTTPException) as err:
        raise _read_failure(err) from None


def _read_by(response: Any, limit: int) -> bytes:
    """Up to `limit` bytes of `response`'s body (to its end), each read bounded by the try's
    deadline (`_TimedReads`), which gives up with a timeout."""
    chunks, size = [], 0
    while size < limit:
        chunk = response.read1(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _lines(raw: bytes, on_line: Callable[[str], bool]) -> bool:
    """The lines of `raw` (which held no newline) to `on_line`, until one returns True (then
    True): an event stream may end its lines with CR alone, and CRLF leaves a CR at the end."""
    return any(on_line(line) for line in raw.decode("utf-8", "replace").split("\r"))


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers.items() if headers is not None else ())}


class LoopTransport:
    """httpx's async client on a running event loop (`cre serve`'s), called from other threads.

    One pool of keep-alive connections serves every rung; each rung bounds its own requests
    in flight (`replicas.ReplicaSet`). A call made inside a `cancel.scope` is cancelled with
    its request, closing its connection.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_connections: int = 256) -> None:
        import httpx

        self.loop = loop
        # No redirects, no environment proxies for loopback engines is the caller's choice of
        # `url`; trust_env keeps HTTP(S)_PROXY working as urllib honours it.
        self.client: "httpx.AsyncClient" = httpx.AsyncClient(
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int) -> Reply:
        return self._run(self._within(self._post(url, body, headers, timeout, max_bytes, None), timeout), timeout)

    @staticmethod
    async def _within(call: Any, timeout: float) -> Reply:
        """`call` given up after `timeout` seconds in all: httpx's timeout bounds each read."""
        try:
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError:
            raise TransportError("timeout") from None

    def stream(self, url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int,
               on_line: Callable[[str], bool]) -> Reply:
        """POST, handing each line of a 2xx reply's body to `on_line` as it arrives (on the
        loop's thread: keep it quick), until it returns True: then the rest is not read and
        the connection is closed (the engine stops generating). The reply's body is left
        empty then, and an error reply's body is read whole. Whatever its Content-Type says: the caller tells an event
        stream from a page or a whole completion by its lines (`OpenAIBackend._post`), as a
        server may stream under another type. `timeout` bounds the wait for the reply's status line and
        headers in all, then each read, not the whole stream: a server that
        keeps sending tokens goes on until the request's deadline cancels it, if it has one."""
        return self._run(self._post(url, body, headers, timeout, max_bytes, on_line), timeout, whole=False)

    def _run(self, coro: Any, timeout: float, whole: bool = True) -> Reply:
        if getattr(self.loop, "_thread_id", None) == threading.get_ident():  # pragma: no cover - misuse
            raise RuntimeError("LoopTransport is for threads other than its loop's")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        token = cancel.current()
        remove = token.on_cancel(future.cancel) if token is not None else (lambda: None)
        deadline = cancel.deadline()
        if whole or deadline is None:
            # The coroutine bounds itself by `timeout` (a whole reply: in all, `_within`; a
            # stream: each read); the margin only guards a loop that stopped.
            wait = timeout + 30
        else:
            wait = max(0.0, deadline - time.monotonic()) + 30  # the token cancels it at the deadline
        try:
            return future.result(_waitable(wait))
        except concurrent.futures.CancelledError:
            raise cancel.Cancelled("the request gave up while its remote call was in flight") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransportError("timeout") from None
        finally:
            remove()

    async def _post(self, url: str, body: bytes, headers: dict[str, str], timeout: float, max_bytes: int,
                    on_line: Callable[[str], bool] | None) -> Reply:
        import httpx

        _check_headers(headers)
        try:
            # httpx's timeout bounds each read, and a server may send its headers a byte at a
            # time: they come within `timeout` in all (then a whole reply stays bounded by
            # `_within`, a stream's body read by read).
            async with asyncio.timeout(timeout) as headers_by, \
                    self.client.stream("POST", url, content=body, headers=headers, timeout=timeout) as response:
                headers_by.reschedule(None)
                got = _lower(response.headers)
                if on_line is not None and response.status_code < 300:
                    # Lines split here, from bytes counted as they come: httpx's aiter_lines
                    # would hold a reply with no newline whole, past `max_bytes`.
                    size, buf = 0, bytearray()
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise TransportError("too_large")
                        scan = len(buf)  # only the new bytes can hold the next newline
                        buf += chunk
                        while (end := buf.find(b"\n", scan)) >= 0:
                            if _lines(bytes(buf[:end]), on_line):
                                return Reply(response.status_code, b"", got)  # leaving closes it
                            del buf[: end + 1]
                            scan = 0
                    if buf:
                        _lines(bytes(buf), on_line)
                    return Reply(response.status_code, b"", got)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TransportError("too_large")
                    chunks.append(chunk)
                return Reply(response.status_code, b"".join(chunks), got)
        except httpx.ConnectTimeout:
            # Told apart from a refused connection: a try whose time ran out says nothing of its
            # server when the request's own deadline set that time (`OpenAIBackend._try_limit`).
            raise TransportError("connect_timeout", "timed out connecting") from None
        except (httpx.TimeoutException, TimeoutError):
            raise TransportError("timeout") from None
        except httpx.ConnectError as exc:
            raise TransportError("connect", str(exc) or "refused") from None
        except httpx.InvalidURL:
            raise TransportError("local", INVALID_URL) from None
        except httpx.LocalProtocolError as exc:
            # What this side sent was refused before the server had it; its message may quote a
            # header (the API key's), so only its type is kept.
            raise TransportError("local", type(exc).__name__) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise TransportError("broken", f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        await self.client.aclose()


_DEFAULT = UrllibTransport()
_current: Transport = _DEFAULT
_lock = threading.Lock()


def current() -> Transport:
    """The transport remote rungs use now: urllib, unless `cre serve` installed its pool."""
    return _current


def use(transport: Transport | None) -> Transport:
    """Make `transport` (None: the default) the process's; returns the one it replaces."""
    global _current
    with _lock:
        previous, _current = _current, transport or _DEFAULT
    return previous
