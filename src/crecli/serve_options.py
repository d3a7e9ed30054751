"""`cre serve`'s options and their defaults: how it listens, admits and times requests.

Apart from the app so that the command line reads its defaults from here at import time,
which must stay cheap (shell completion imports the CLI on every Tab).
"""

from __future__ import annotations

from dataclasses import dataclass

from crecli.config import MAX_TIMEOUT
from crecli.querylog import MAX_LINE_BYTES as MAX_PROMPT_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
DEFAULT_TIMEOUT = 300.0
# A client's request line and headers, then its body, get their own short deadlines, so that
# a slow or stalled client holds a connection for seconds, not for the answer's --timeout;
# the body's deadline also bounds how long a response waits for a client taking none of it.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
# Seconds an idle keep-alive connection stays open (uvicorn's default). Behind a load
# balancer it must outlast the balancer's own idle timeout (AWS ALB: 60 s), or the balancer
# reuses a connection the server is closing and its client gets a 502.
DEFAULT_KEEP_ALIVE = 5.0
# The most seconds any of the time options may be: a day, as a remote rung's `timeout` in
# models.toml. Longer is no use to an HTTP client, and --timeout past threading.TIMEOUT_MAX
# (2^63 ns, about 292 years) turned every remote rung's streamed answer into a 500.
MAX_SECONDS = MAX_TIMEOUT
# The body carries the conversation before the prompt and JSON escaping too, hence the headroom.
DEFAULT_MAX_BODY = 4 * MAX_PROMPT_BYTES


@dataclass(frozen=True)
class ServeOptions:
    """How `cre serve` listens, admits and times requests (its command-line options)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting behind the running one
    timeout: float = DEFAULT_TIMEOUT  # seconds from arrival to answer, queue time included
    max_body: int = DEFAULT_MAX_BODY  # bytes
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds for a request line and its headers
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds for a body once its headers are in; for a response untaken
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds an idle keep-alive connection stays open

    @property
    def max_requests(self) -> int:
        """Requests past their body (parsing, queued, running) at once, at least; more get 503.
        `serve_app.request_bound` raises it to twice what the ladder admits at once.

        Well above the queue's own limit (max_queue + 1 admitted), so that a full queue
        answers 429. A request still sending its body does not count: slow uploads must not
        lock out the clients that have sent theirs (`body_budget` bounds them instead).
        """
        return max(64, 4 * (self.max_queue + 1))

    @property
    def body_budget(self) -> int:
        """Bytes of request bodies being received at once; a body that would go past it gets 503.

        As many whole bodies as `max_requests` (not the raised bound of a large ladder, which
        would grow it with remote capacity): memory stays bounded however many clients upload
        at once, while a thousand slow uploads, holding little each, do not keep anyone else out.
        """
        return self.max_requests * self.max_body
