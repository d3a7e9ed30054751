"""A live `cre serve` in a thread of the test process, so the fakes installed there answer."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from crecli.escalate import Cascade

if TYPE_CHECKING:
    from crecli.servedlog import ServedLog


@contextmanager
def serving(cascade: Cascade, name: str | None = "team", log_level: str = "warning",
            served: "ServedLog | None" = None, **opts: Any) -> Iterator[str]:
    """A live server on a free loopback port, logging its cascade answers to `served` when
    given; yields its base URL."""
    from crecli.serve import listen, make_server
    from crecli.serve_app import ServeOptions, create_app

    options = ServeOptions(**opts)
    app = create_app(cascade, options, name=name, served=served)
    sock = listen("127.0.0.1", 0)
    server = make_server(app, options, log_level=log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@contextmanager
def serving_cascade(cascade: Cascade, **opts: Any) -> Iterator[str]:
    """`serving` on `cascade`, which is closed after the server stops; yields its base URL."""
    with cascade, serving(cascade, **opts) as url:
        yield url
