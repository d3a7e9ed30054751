"""`cre serve`: the cascade behind an OpenAI-compatible HTTP API, served by uvicorn.

`run` is the command: it loads the router, binds the socket and answers until SIGTERM or
Ctrl-C (`serve_forever`). Here is what stands between the app and the network:

- `listen` binds early, so that a port in use or a host not this machine's is a CreError
  naming the option to change, and early clients wait in the backlog while the models load;
- `make_server` is uvicorn with its logs on stderr (stdout stays for data), a drain bound
  for SIGTERM, and `guarded_protocol`: h11 with deadlines for a request's headers and body
  (`--header-timeout`, `--body-timeout`), and for a client to take its response (none of
  it taken for `--body-timeout`), so that slow clients cannot hold the server;
- `serve_forever` turns SIGTERM into a return after the drain, so that the caller closes
  the models and `cre serve` exits 0.

The app and its handlers are `serve_app`'s, the work on models `serve_worker`'s, and the
OpenAI request and response bodies `openai_wire`'s. Starlette and uvicorn are imported
inside functions only, so `cre --help` stays fast and the rest of crecli runs without the
`serve` extra.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import math
import os
import socket
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crecli.errors import CreError, InputError, UsageError
from crecli.openai_wire import ApiError
from crecli.serve_app import CASCADE_MODEL, ServeOptions, client_address, create_app, log

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from crecli.escalate import Cascade
    from crecli.servedlog import ServedLog


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
    """uvicorn's h11 protocol with deadlines uvicorn lacks:

    - a request line and headers must arrive within `header_timeout` of the connection
      opening or of their first byte (keep-alive idle time is uvicorn's own timer), else 408
      and the connection closes: a client cannot hold a connection by sending headers slowly;
    - a body must arrive within `body_timeout` of its headers. The app answers 408 for bodies
      it reads; this closes connections still sending a body nobody reads, after their
      answer (a 401, 404 or 413 sent early), a second later;
    - a response's bytes waiting for the client (its socket's buffers full) must be taken,
      some of them, every `body_timeout`, else the connection is reset. uvicorn has no write
      timeout: a client that never read kept its connection for ever, the bytes it left in
      this process's memory, since an asyncio transport closes only once its bytes are sent.
      A stream under way then ends as for a client that left, its job given up.

    uvicorn's plain-text 400 for a malformed request is JSON in OpenAI's shape here too.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _timer_for: tuple[str, int] | None = None
        _responses = 0  # completed on this connection: which request a deadline is for

        _stall: asyncio.TimerHandle | None = None
        _stalled_with = 0  # `_untaken()` when `_stall` was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Writing pauses once any byte waits here for the client's socket (its buffers
            # full), not only past asyncio's 64 KiB: a smaller rest left at the close of a
            # response would wait unwatched. The kernel's buffers still let a reader's
            # response flow without pausing.
            transport.set_write_buffer_limits(high=0)
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
            self._unstall()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            self._stall_from(self._untaken())

        def resume_writing(self) -> None:
            self._unstall()
            super().resume_writing()

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

        def _stall_from(self, untaken: int) -> None:
            self._unstall()
            self._stalled_with = untaken
            self._stall = self.loop.call_later(body_timeout, self._stalled)

        def _unstall(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
            self._stall = None

        def _untaken(self) -> int:
            """Bytes of the response the client has not taken: those held here, and those in
            the socket's send queue where the system tells (Linux). The kernel hands the
            transport room only once a third of its queue, megabytes, has gone, so bytes
            held here alone would stand still for a slow reader's many seconds of reads."""
            untaken = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            try:
                import fcntl
                import termios

                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
                untaken += struct.unpack("i", queued)[0]
            except (ImportError, AttributeError, OSError):
                pass  # no such count here: the bytes held here tell, more coarsely
            return untaken

        def _stalled(self) -> None:
            self._stall = None
            untaken = self._untaken()
            if untaken < self._stalled_with:  # some were taken: a slow reader, not a gone one
                self._stall_from(untaken)
                return
            log.info("%s took none of its response for %g s (--body-timeout); connection reset",
                     client_address(self.client), body_timeout)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # A reset, not a close: the kernel would go on offering the untaken bytes.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def _expired(self) -> None:
            what, self._timer, self._timer_for = self._timer_for, None, None
            if self.transport.is_closing() or what is None:
                return
            if what[0] == "headers" and self._started():
                log.info("%s sent no complete request headers within %g s (--header-timeout); closed",
                         client_address(self.client), header_timeout)
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


# (family, socket type, protocol, address) of what `resolve` found, as `listen` binds it.
Resolved = tuple[int, int, int, Any]


def resolve(host: str, port: int) -> Resolved:
    """The first address `host` resolves to; one no name service knows is bad usage (exit 2),
    a name service that could not answer now an error (exit 1). `run` resolves before its
    other checks and warnings: it warned that nosuchhost.invalid was reachable by other
    machines, then said it resolved to nothing."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise CreError(f"--host {host!r}: the name service could not resolve it now ({exc}); try again") from None
        raise UsageError(f"--host {host!r}: not an address this machine can resolve ({exc}); give an address "
                         "such as 127.0.0.1 or 0.0.0.0, or a name this machine resolves") from None
    except UnicodeError as exc:  # a label too long for IDNA, or empty
        raise UsageError(f"--host {host!r}: not an address this machine can resolve ({exc})") from None
    return family, kind, proto, address


def listen(host: str, port: int, resolved: Resolved | None = None) -> socket.socket:
    """A listening socket, so that a port in use or a host that is not this machine's is a
    CreError (`cannot_listen`) rather than uvicorn's exit.

    One socket, on the first address `host` resolves to (`resolved`, else `resolve`):
    `localhost` may give ::1 before 127.0.0.1. Documented (docs/reference.md, --host)
    rather than bound on every address, which would need one port for all (when --port is
    0) and a rule for an address that cannot be bound; `run` prints the address bound."""
    family, kind, proto, address = resolved if resolved is not None else resolve(host, port)
    try:
        # An address family this machine lacks (IPv6 turned off) fails here, not at bind.
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CreError(cannot_listen(host, port, exc)) from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening now, before the models and uvicorn are ready, lets early clients wait
        # in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CreError(cannot_listen(host, port, exc)) from None
    return sock


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why `host`:`port` could not be bound, with the option to change that its errno points
    at: `--host 8.8.8.8` was told to pick another --port, which could never help."""
    head = f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    if exc.errno == errno.EADDRINUSE:
        return f"{head}; pick another --port, or stop what holds it"
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return f"{head}; ports below 1024 need privileges: pick another --port (1024 or above)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{head}; {host} is not an address of this machine: give one of its addresses with --host "
                "(e.g. 127.0.0.1 or 0.0.0.0)")
    return f"{head}; check --host (an address of this machine) and --port"


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
        # Idle keep-alive connections close after --keep-alive. No `limit_concurrency`: the app
        # refuses requests beyond its bound itself (`serve_app.request_bound`), in OpenAI's shape
        # (`serve_app.Limits`); uvicorn's limit would answer plain text first, and count slow clients.
        timeout_keep_alive=options.keep_alive,  # type: ignore[arg-type]  # uvicorn's hint says int; call_later takes any
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
    """`cre serve`: load the router, bind, and answer until SIGTERM, SIGHUP or Ctrl-C."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        # crecli is installed from a clone (README), not from an index, where a package of that
        # name could be someone else's: the extra is installed from the clone too.
        raise CreError("`cre serve` needs the serve extra: in your clone of crecli, run pip install -e '.[serve]'") from None
    from dataclasses import replace

    from crecli import servedlog
    from crecli.console import status, warn
    from crecli.escalate import Cascade

    resolved = resolve(options.host, options.port)
    options = replace(options, api_key=read_api_key(api_key_env))
    served = servedlog.for_command("serve", no_log, router)
    if options.api_key is None and not is_loopback(options.host):
        warn(f"serving on {options.host}, which other machines can reach, with no API key: anyone who can "
             "connect can use your models; pass --api-key-env NAME")
    sock = listen(options.host, options.port, resolved)
    with sock, Cascade.from_file(router, models_file, force=force, memory_budget_bytes=memory_budget_bytes) as cascade:
        cascade.pass_over_unloadable = True  # a server answers from the rungs it has (`LiveSource.hold`)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        status(f"cre serve: {router} on http://{shown}:{port}/v1 (models: {CASCADE_MODEL}, {', '.join(cascade.ladder)})")
        # What /health would say, said once at start: a missing model otherwise shows only as
        # a 500 on every request that reaches it.
        from crecli.serve_app import rung_state

        for name in cascade.ladder:
            state = rung_state(cascade.specs[name])
            if not state.usable:
                then = ("requests that reach it fail" if name == cascade.ladder[-1] else
                        "prompts pass over it to the next rung")
                warn(f"model {name!r} cannot answer ({state.word}): {then} until it can; "
                     "`cre models list` says why, and `cre models pull` fetches the default models")
        if served.enabled:
            status(f"cre serve: logging answered prompts to {served.path} (--no-log to stop)")
        serve_forever(cascade, options, sock, name=router.stem, served=served)


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _hung_up(signum: int, frame: Any) -> None:
    """SIGHUP (the terminal or ssh session closed) drains as SIGTERM does: uvicorn handles
    only SIGINT and SIGTERM, and SIGHUP's default killed the process with requests in flight."""
    import signal

    signal.raise_signal(signal.SIGTERM)


def serve_forever(
    cascade: "Cascade", options: ServeOptions, sock: socket.socket, name: str | None = None,
    served: "ServedLog | None" = None,
) -> None:
    """Answer on `sock` until SIGTERM or SIGHUP (drain the requests in flight, then return) or Ctrl-C.

    uvicorn drains on SIGTERM and then raises the signal again, which by default kills the
    process before the cascade's models are closed; our handler turns it into a return,
    so the caller closes them and `cre serve` exits 0.
    """
    import signal

    app = create_app(cascade, options, name=name, served=served)
    server = make_server(app, options)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])  # signals reach only the main thread; the caller stops it
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    # Only where SIGHUP would kill: under nohup it is ignored, and stays so.
    hup = signal.getsignal(signal.SIGHUP) if hasattr(signal, "SIGHUP") else None
    if hup == signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _hung_up)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        if hup == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, hup)  # first: no SIGHUP may become a default SIGTERM
        signal.signal(signal.SIGTERM, previous)
        # A second Ctrl-C skips uvicorn's drain and the app's shutdown: jobs may still be
        # computing, and the caller closes the models next. Stop them first, deaf to a
        # third Ctrl-C, which would otherwise leave the wait and close the models under them.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            app.state.worker.stop()
        finally:
            signal.signal(signal.SIGINT, interrupt)
