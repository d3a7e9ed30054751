"""Issue 25, part 3: a remote rung with several servers (replicas), and what faults do.

Requests go to the least busy healthy replica; a replica that refuses, times out, dies
holding a request or answers 5xx is taken out for a back-off and the request is tried on
another; 429/503 with Retry-After are honoured; a rung whose every server failed is passed
over for the next rung, and only when nothing is left does the client get an error, in
OpenAI's shape, naming the rung and why. Real HTTP servers in threads stand in for engines.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from typer.testing import CliRunner

from crecli import cancel, config
from crecli.cli import app
from crecli.config import ModelSpec
from crecli.errors import ConfigError
from crecli.escalate import Cascade
from crecli.models.backend import GenParams
from crecli.models.openai import OpenAIBackend, RemoteError, RungUnavailable
from crecli.models.replicas import ReplicaSet
from support.fake_openai import FakeOpenAI
from support.routers import ADDITIONS, FAR, make_router
from support.scale import (at_once, dead_url, dead_urls, fresh_remote, ladder_toml, pooled_transport, post,
                           server_log_lines, use_models)
from support.serving import serving_cascade
from support.waiting import until

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_remote(monkeypatch)


# ---------------------------------------------------------------- models.toml

def _load(tmp_path: Path, body: str) -> config.ModelConfig:
    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["big"]\n[models.big]\napi_model = "m"\n' + body)
    return config.load(toml)


def test_url_takes_one_server_or_an_array_of_replicas_and_max_in_flight_is_checked(tmp_path: Path) -> None:
    one = _load(tmp_path, 'url = "http://a:1/v1"\n').get("big")
    assert (one.url, one.urls, one.max_in_flight) == ("http://a:1/v1", ("http://a:1/v1",), None)
    many = _load(tmp_path, 'url = ["http://a:1/v1", "http://b:2/v1/"]\nmax_in_flight = 4\n').get("big")
    assert (many.url, many.urls, many.max_in_flight) == ("http://a:1/v1", ("http://a:1/v1", "http://b:2/v1/"), 4)
    for body, words in [
        ('url = []\n', "array of 1 to 64 URLs"),
        ('url = ["http://a:1/v1", 5]\n', "models.big.url[1] must be an http:// or https:// URL"),
        ('url = ["http://a:1/v1", "ftp://b/v1"]\n', "url[1] must be an http"),
        ('url = ["http://a:1/v1", "http://a:1/v1/"]\n', "more than once"),
        ('url = "http://a:1/v1"\nmax_in_flight = 0\n', "max_in_flight must be an integer >= 1"),
        ('url = "http://a:1/v1"\nmax_in_flight = true\n', "max_in_flight must be an integer"),
        ('url = "http://a:1/v1"\nmax_in_flight = 5000\n', "<= 4096"),
        ('path = "/x.gguf"\nmax_in_flight = 2\n', "sets `max_in_flight`, which bounds a remote rung"),
        ('url = "http://a:1/v1"\nurls = ["http://b/v1"]\n', "unknown field(s): urls"),
    ]:
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, body)
        assert words in str(info.value), (body, str(info.value))


def test_url_and_urls_stay_one_fact_however_a_spec_is_built() -> None:
    # Code (tests, the library API) builds specs with either field; `url` is always the first replica.
    by_url = config.ModelSpec(name="r", url="http://a:1/v1")
    by_urls = config.ModelSpec(name="r", urls=("http://a:1/v1", "http://b:1/v1"))
    assert by_url.urls == ("http://a:1/v1",) and by_urls.url == "http://a:1/v1"
    assert config.ModelSpec(name="local").urls == () and config.ModelSpec(name="local").url is None
    with pytest.raises(ValueError, match="not the first of its urls"):
        config.ModelSpec(name="r", url="http://b:1/v1", urls=("http://a:1/v1",))


def test_a_later_file_replaces_the_replicas_not_merges_them(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text('ladder = ["big"]\n[models.big]\nurl = ["http://a:1/v1", "http://b:1/v1"]\n')
    import os

    user = Path(os.environ["CRE_HOME"])
    user.mkdir(parents=True, exist_ok=True)
    from crecli import paths

    paths.user_models_toml().parent.mkdir(parents=True, exist_ok=True)
    paths.user_models_toml().write_text(first.read_text())
    second = tmp_path / "b.toml"
    second.write_text('[models.big]\nurl = "http://c:1/v1"\n')
    spec = config.load(second).get("big")
    assert spec.urls == ("http://c:1/v1",)


# ---------------------------------------------------------------- the replica set

def test_the_least_busy_healthy_replica_takes_a_request() -> None:
    rs = ReplicaSet("big", ["http://a/v1", "http://b/v1", "http://c/v1"], max_in_flight=2)
    a = rs.acquire()
    b = rs.acquire()
    c = rs.acquire()
    assert [r.url for r in (a, b, c)] == ["http://a/v1", "http://b/v1", "http://c/v1"]  # type: ignore[union-attr]
    rs.release(b, "connection refused")  # type: ignore[arg-type]
    d = rs.acquire()
    assert d is not None and d.url in ("http://a/v1", "http://c/v1")  # b is out for its back-off
    assert rs.states()["http://b/v1"].startswith("out: connection refused")
    # Nothing else left: the one out for a back-off is tried rather than none at all.
    e = rs.acquire(frozenset({"http://a/v1", "http://c/v1"}))
    assert e is not None and e.url == "http://b/v1"
    rs.release(e, "HTTP 503", out_for=30)  # its server asks for 30 s, more than the request has
    # Not sent more before it said (back-pressure): the request fails, its Retry-After passed on.
    assert rs.acquire(frozenset({"http://a/v1", "http://c/v1"}), wait_until=time.monotonic() + 5) is None
    assert rs.acquire(frozenset({"http://a/v1", "http://b/v1", "http://c/v1"})) is None


def test_a_server_asked_for_quiet_is_passed_over_for_one_out_for_a_back_off_and_stays_asked() -> None:
    # With every server out, the first due back asked for quiet (Retry-After) the request
    # cannot wait out: the request failed, though another was out only for a back-off. And a
    # later timeout of a request already in flight turned its asked-for quiet into a back-off.
    rs = ReplicaSet("big", ["http://a/v1", "http://b/v1"], max_in_flight=4)
    a, b = rs.acquire(), rs.acquire()
    assert a is not None and b is not None and {a.url, b.url} == {"http://a/v1", "http://b/v1"}
    late = rs.acquire()  # a second request in flight to the first
    assert late is not None and late.url == a.url
    rs.release(a, "HTTP 503", out_for=20)  # asked for 20 s
    rs.release(b, "timeout")  # out for a back-off (1 s), due back before a
    rs.release(late, "timeout")  # the in-flight one times out: a's asked-for 20 s stands
    assert a.asked and a.out_until - time.monotonic() > 15
    b.out_until = a.out_until + 5  # now the backed-off one is due back after the asked one
    got = rs.acquire(wait_until=time.monotonic() + 1)
    assert got is not None and got.url == b.url  # not refused: the backed-off one is tried


def test_a_replica_past_its_back_off_is_tried_but_reported_out_until_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # /health read "up" once the back-off timer ran out, with no news from the server: a dead
    # replica flickered back into "remote" between requests (and a CI run caught it).
    from types import SimpleNamespace

    from crecli.models import replicas

    clock = [1000.0]  # a clock of its own: a slow machine cannot move it between two lines
    monkeypatch.setattr(replicas, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    rs = ReplicaSet("big", ["http://a/v1", "http://b/v1"])
    b = rs.acquire(frozenset({"http://a/v1"}))
    rs.release(b, "connection refused")  # type: ignore[arg-type]
    assert rs.states()["http://b/v1"] == "out: connection refused (back in 1 s)" and rs.up() == 1
    clock[0] += 1.5
    assert rs.states()["http://b/v1"] == "out: connection refused (the next request tries it)" and rs.up() == 1
    again = rs.acquire(frozenset({"http://a/v1"}))  # past its back-off, so a request tries it
    assert again is b
    rs.release(again)  # type: ignore[arg-type]  # and it answered
    assert rs.states()["http://b/v1"] == "up" and rs.up() == 2


def test_a_try_that_gave_up_says_nothing_of_the_server_and_health_recovers_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # A try cut short by its request (cancelled, out of time, refused by policy) counted as
    # an answer: a server that never answered was put back "up". And once every server had
    # failed, /health stayed 503 until one answered, which a load balancer that stopped
    # sending on the 503 would never let happen.
    from types import SimpleNamespace

    from crecli.models import replicas
    from crecli.serve_app import rung_state

    clock = [1000.0]
    monkeypatch.setattr(replicas, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    spec = ModelSpec(name="big", urls=("http://a/v1", "http://b/v1"), api_model="m")
    rs = replicas.replica_set(spec)
    for url in ("http://a/v1", "http://b/v1"):
        r = rs.acquire(frozenset({"http://a/v1", "http://b/v1"} - {url}))
        rs.release(r, "connection refused")  # type: ignore[arg-type]
    assert rung_state(spec) == ("remote, every server out", False)
    clock[0] += 1.5  # both back-offs passed: the next request tries them
    assert rung_state(spec) == ("remote, every server out, retrying", True)
    r = rs.acquire()
    assert r is not None
    rs.abandon(r)  # its request gave up before the server said anything
    assert not r.healthy and r.failures == 1 and r.served == 0
    assert rs.states()[r.url] == "out: connection refused (the next request tries it)"


def test_an_answer_to_a_request_sent_before_the_server_asked_for_quiet_does_not_end_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A request already in flight when its server answered another 429 with Retry-After: 20
    # came back 2xx and put the server back at once: it was sent more before it said.
    from types import SimpleNamespace

    from crecli.models import replicas

    clock = [1000.0]
    monkeypatch.setattr(replicas, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    rs = ReplicaSet("big", ["http://a/v1"], max_in_flight=4)
    first, second = rs.acquire(), rs.acquire()
    assert first is second is not None
    rs.release(first, "HTTP 429", out_for=20)  # type: ignore[arg-type]
    rs.release(second)  # type: ignore[arg-type]  # sent before the 429, answered after it
    assert second.out_until - clock[0] == pytest.approx(20) and second.asked  # type: ignore[union-attr]
    assert rs.acquire(wait_until=clock[0] + 1) is None  # not sent more before it said
    assert rs.states()["http://a/v1"] == "out: HTTP 429 (back in 20 s)" and rs.up() == 0
    clock[0] += 20  # the wait it asked for is over: tried, and its answer puts it back
    again = rs.acquire(wait_until=clock[0] + 1)
    assert again is first
    rs.release(again)  # type: ignore[arg-type]
    assert rs.states()["http://a/v1"] == "up" and rs.up() == 1


def test_a_replica_past_its_back_off_is_tried_by_one_request_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past its back-off, a failed replica was free capacity and the least busy: it took every
    # request that came until one of them ended, each waiting the whole timeout on a hung server.
    from types import SimpleNamespace

    from crecli.models import replicas

    clock = [1000.0]
    monkeypatch.setattr(replicas, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    rs = ReplicaSet("big", ["http://a/v1", "http://b/v1"], max_in_flight=8)
    a = rs.acquire()
    assert a is not None and a.url == "http://a/v1"
    rs.release(a, "timed out")  # out for its back-off (1 s)
    held = [rs.acquire() for _ in range(3)]
    assert [r.url for r in held] == ["http://b/v1"] * 3  # type: ignore[union-attr]
    clock[0] += 1.5  # a's back-off has passed
    trial = rs.acquire()
    assert trial is a  # the next request tries it
    later = [rs.acquire() for _ in range(2)]
    assert [r.url for r in later] == ["http://b/v1"] * 2  # type: ignore[union-attr]  # not while its trial is out
    more = [rs.acquire() for _ in range(3)]  # b is full now (8)
    assert [r.url for r in more] == ["http://b/v1"] * 3 and rs.replicas[1].in_flight == 8  # type: ignore[union-attr]
    extra = rs.acquire()
    assert extra is a  # no healthy replica has room: a takes more
    rs.release(extra)  # type: ignore[arg-type]  # and answers: up again, least busy, takes the next
    rs.release(trial)  # type: ignore[arg-type]
    for r in more:
        rs.release(r)  # type: ignore[arg-type]
    assert rs.states()["http://a/v1"] == "up"  # back for good: the least busy, it takes requests again
    assert rs.acquire() is a and rs.acquire() is a


def test_a_full_replica_set_makes_a_request_wait_for_a_slot() -> None:
    rs = ReplicaSet("big", ["http://a/v1"], max_in_flight=1)
    held = rs.acquire()
    got: list[float] = []
    start = time.monotonic()
    t = threading.Thread(target=lambda: got.append(rs.acquire() is not None and time.monotonic() - start))
    t.start()
    time.sleep(0.3)
    rs.release(held)  # type: ignore[arg-type]
    t.join(30)  # it gets the slot at once; only a slow, loaded machine takes more than a moment
    assert got and got[0] >= 0.3


def test_requests_waiting_for_a_slot_get_it_first_come_first_served() -> None:
    rs = ReplicaSet("big", ["http://a/v1", "http://b/v1"], max_in_flight=1)
    held = [rs.acquire(), rs.acquire()]
    order: list[str] = []

    def wait(name: str, exclude: frozenset[str] = frozenset()) -> None:
        replica = rs.acquire(exclude)
        order.append(name)
        time.sleep(0.05)
        rs.release(replica)  # type: ignore[arg-type]

    threads = []
    # "skip-a" may not use a; it came first, but must not hold up those behind it when a frees.
    for name, exclude in (("skip-a", frozenset({"http://a/v1"})), ("first", frozenset()), ("second", frozenset()),
                          ("third", frozenset())):
        threads.append(threading.Thread(target=wait, args=(name, exclude), daemon=True))
        threads[-1].start()
        # Each is queued before the next arrives.
        until(lambda n=len(threads): rs.waiting == n, f"{name!r} did not wait for a slot")
    rs.release(held[0])  # type: ignore[arg-type]  # a frees: "skip-a" cannot use it, "first" takes it
    # b stays held until a has gone to someone: freed before that, b would go to "skip-a" (first
    # in the queue), which could then come first in `order` though "first" rightly took a.
    # Polled, not slept: a loaded machine may be slow to wake the waiter.
    until(lambda: order != [], "a freed slot went to no one: the waiter that cannot use it held up the rest")
    rs.release(held[1])  # type: ignore[arg-type]
    for t in threads:
        t.join(30)
    assert order[0] == "first" and order.index("second") < order.index("third")
    assert sorted(order) == ["first", "second", "skip-a", "third"] and rs.waiting == 0


# ---------------------------------------------------------------- one backend, several servers

def _spec(urls: list[str], **kw: Any) -> ModelSpec:
    return ModelSpec(name="big", url=urls[0], urls=tuple(urls), api_model="served", prompt_format="chat",
                     defined_in="test.toml", **kw)


def test_a_refusing_replica_is_skipped_and_the_request_answered_by_another() -> None:
    with FakeOpenAI() as alive:
        backend = OpenAIBackend(_spec([dead_url(), alive.url]))
        for _ in range(3):
            assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        states = backend.replicas.states()
    assert len(alive.requests) == 3  # the dead one was tried once, then left out for its back-off
    assert list(states.values())[0].startswith("out: connection refused") and list(states.values())[1] == "up"


def test_5xx_and_a_server_dying_holding_the_request_move_it_to_another_replica() -> None:
    with FakeOpenAI() as failing, FakeOpenAI() as dying, FakeOpenAI() as alive:
        failing.status = 500
        dying.die = True
        backend = OpenAIBackend(_spec([failing.url, dying.url, alive.url]))
        gen = backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert gen.text == "42" and len(failing.requests) == len(dying.requests) == len(alive.requests) == 1
        states = list(backend.replicas.states().values())
    assert states[0].startswith("out: HTTP 500") and states[1].startswith("out: connection broke") and states[2] == "up"


@pytest.mark.parametrize("status", [408, 425])
def test_a_request_at_a_bad_moment_moves_to_another_replica(status: int) -> None:
    # A proxy's 408 (it timed out waiting for the request) reached the client as its own
    # 400 `request_refused`; another replica may well take the request now.
    with FakeOpenAI() as busy, FakeOpenAI() as alive:
        busy.status = status
        backend = OpenAIBackend(_spec([busy.url, alive.url]))
        assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        states = backend.replicas.states()
    assert states[busy.url].startswith(f"out: HTTP {status}") and states[alive.url] == "up"


def test_the_try_after_a_server_that_hung_has_the_whole_timeout() -> None:
    # The rung's timeout was spent as the request's: after a 1 s try on a hung server, the
    # healthy one (0.3 s to answer) got 0.1 s, and was taken out too. `cre ask` and `cre
    # batch` give a request no time of its own: each try has the whole timeout.
    with FakeOpenAI() as hung, FakeOpenAI() as slow:
        hung.delay, slow.delay = 3.0, 0.3
        backend = OpenAIBackend(_spec([hung.url, slow.url]), timeout=1.0)
        assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        states = backend.replicas.states()
        assert states[hung.url].startswith("out: timed out") and states[slow.url] == "up"
        # A try cut short by the request's own time (`cre serve`'s deadline) says nothing of
        # its server, which stays in rotation.
        backend = OpenAIBackend(_spec([slow.url]), timeout=1.0)
        # Its error says so: "no answer within 0 s; check that the server is not overloaded" misled.
        with cancel.scope(cancel.Token(deadline=time.monotonic() + 0.15)), \
                pytest.raises(RemoteError, match=r"the request's own time ran out \(0\.1 s were left for this try\)$"):
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert backend.replicas.states()[slow.url] == "up"


@pytest.mark.parametrize("pooled", [False, True])
def test_a_hung_replica_is_taken_out_though_the_requests_time_is_below_the_rungs_timeout(pooled: bool) -> None:
    """`cre serve --timeout` at or below a rung's `timeout` (60 s against 120) cut every try
    short, and a cut try says nothing of its server: a hung replica stayed in rotation for
    good, and about 1 in n requests waited for it until their 504. A try that had at least
    half the rung's timeout counts (`FAIR_SHARE`), whether its own timeout or the request's
    deadline (which fall together) ends it; a client that leaves before the deadline does not."""
    from contextlib import nullcontext

    def ask(backend: OpenAIBackend, deadline: float, gives_up: float) -> None:
        token = cancel.Token(deadline=time.monotonic() + deadline)
        # As `cre serve` gives a request up: at its deadline, or when its client leaves.
        timer = threading.Timer(gives_up, token.cancel, kwargs={"expired": gives_up >= deadline})
        timer.start()
        try:
            with cancel.scope(token), pytest.raises((RemoteError, cancel.Cancelled)):
                backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        finally:
            timer.cancel()

    with pooled_transport() if pooled else nullcontext(), FakeOpenAI() as hung, FakeOpenAI() as left:
        hung.delay = left.delay = 3.0
        backend = OpenAIBackend(_spec([hung.url]), timeout=1.0)
        ask(backend, 0.7, 0.7)
        assert backend.replicas.states()[hung.url].startswith("out: timed out")
        if pooled:  # urllib's call is not cancelled: it runs to its own time
            backend = OpenAIBackend(_spec([left.url]), timeout=1.0)
            ask(backend, 0.7, 0.2)
            assert backend.replicas.states()[left.url] == "up"


def test_a_client_that_left_is_told_from_the_deadline_by_its_cause_not_the_clock() -> None:
    """A try ended by the request's cancellation blames its server as hung only when the
    deadline was the cause. It was told by the clock: a client that left a few milliseconds
    before the deadline was handled once the deadline had passed, and its server was taken
    out as hung. Here both are handled after the deadline: only the expired one counts."""
    past = time.monotonic() - 0.01
    for expired in (False, True):
        token = cancel.Token(deadline=past)
        token.cancel(expired=expired)
        with cancel.scope(token):
            assert OpenAIBackend._hung_to_deadline(None) is expired
    # A stream whose first event had come is never a hung server's, whatever the cause.
    began = type("Stream", (), {"began": True})()
    with cancel.scope(token):
        assert OpenAIBackend._hung_to_deadline(began) is False  # type: ignore[arg-type]
    assert OpenAIBackend._hung_to_deadline(None) is False  # no request (`cre ask`): never


@contextmanager
def _pool_failing_with(error: type[Exception]) -> Iterator[None]:
    """`cre serve`'s transport whose every request fails in httpx with `error` (as a connect
    that times out, or a request this side refuses to send) before it reaches a server."""
    import asyncio

    from crecli.models import http as transport

    def fail(request: httpx.Request) -> httpx.Response:
        raise error("as the test says", request=request)

    with pooled_transport():
        pool = transport.current()
        assert isinstance(pool, transport.LoopTransport)
        real, pool.client = pool.client, httpx.AsyncClient(transport=httpx.MockTransport(fail))
        asyncio.run_coroutine_threadsafe(real.aclose(), pool.loop).result(5)
        yield


def test_a_request_the_http_client_refuses_to_send_is_no_fault_of_the_server() -> None:
    """httpx's LocalProtocolError (a fault on this side, before the server had the request)
    was read as a connection that broke: the server was taken out, every replica in turn."""
    urls = ["http://127.0.0.1:9/v1", "http://127.0.0.1:11/v1"]
    with _pool_failing_with(httpx.LocalProtocolError):
        backend = OpenAIBackend(_spec(urls))
        with pytest.raises(RemoteError, match="not sent: the HTTP client refused it .LocalProtocolError.") as info:
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert not isinstance(info.value, RungUnavailable) and "as the test says" not in str(info.value)
        assert set(backend.replicas.states().values()) == {"up"}
        assert [r.in_flight for r in backend.replicas.replicas] == [0, 0]


def test_a_connect_cut_short_by_the_requests_own_time_keeps_its_server() -> None:
    """httpx's ConnectTimeout read as a refused connection: a try that the request's own
    deadline cut short while connecting took its server out, as no slow answer did."""
    url = "http://127.0.0.1:9/v1"
    with _pool_failing_with(httpx.ConnectTimeout):
        backend = OpenAIBackend(_spec([url]), timeout=1.0)
        with cancel.scope(cancel.Token(deadline=time.monotonic() + 0.3)), \
                pytest.raises(RemoteError, match="own time ran out .* while connecting") as info:
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert not isinstance(info.value, RungUnavailable) and backend.replicas.states()[url] == "up"
        # With the whole timeout, a connect that times out is the server's failure.
        with pytest.raises(RungUnavailable, match="cannot connect \\(timed out connecting\\)"):
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert backend.replicas.states()[url].startswith("out: timed out connecting")


@pytest.mark.parametrize("fault", [401, 403, 404, 405, 302, "page"])
def test_a_replica_that_does_not_serve_the_rung_fails_over_and_is_taken_out(fault: int | str) -> None:
    """A wrong key, path or model on one server, or a page that is no completion, is that
    server's failure: the request goes to another replica, and where every one fails the
    rung is unavailable (a rung below the top is passed over), not answered by an error."""
    with FakeOpenAI() as wrong, FakeOpenAI() as alive:
        if fault == "page":
            wrong.page = b"<html>502 bad gateway</html>"
        else:
            wrong.status = int(fault)
        backend = OpenAIBackend(_spec([wrong.url, alive.url]))
        for _ in range(3):
            assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        assert len(wrong.requests) == 1 and len(alive.requests) == 3  # out for its back-off since
        assert backend.replicas.states()[wrong.url].startswith("out: ")
        with pytest.raises(RungUnavailable) as info:
            OpenAIBackend(_spec([wrong.url])).generate("hi", GenParams(max_tokens=4, temperature=0.5))
    assert (str(fault) if fault != "page" else "not an OpenAI-style completion") in str(info.value)


@pytest.mark.parametrize(("page", "page_type"), [
    (b"<html>captive portal: sign in</html>", "text/html"),  # a proxy's page
    (b'{"error": {"message": "no such route"}}', "application/json"),  # a plain JSON error
    (b"<html>502 bad gateway</html>\n", "text/event-stream"),  # an event stream with no event
    (b": keep-alive\n\n", "text/event-stream; charset=utf-8"),
    (b"", "text/event-stream"),
])
def test_a_streamed_reply_that_is_no_event_stream_fails_over_before_any_word(page: bytes, page_type: str) -> None:
    """A 200 to a streamed request that is not an event stream, or ends before its first
    event, is judged whole before a word goes out: no completion, so the replica's failure,
    as for a request not streamed. It ended the request in an error with the next replica
    never tried, and a rung below the top was not passed over."""
    with pooled_transport(), FakeOpenAI() as wrong, FakeOpenAI() as alive:
        wrong.page, wrong.page_type = page, page_type
        backend = OpenAIBackend(_spec([wrong.url, alive.url]))
        got: list[str] = []
        gen = backend.generate_streaming("hi", GenParams(max_tokens=4), got.append)
        assert gen.text == "".join(got) == "42" and len(wrong.requests) == len(alive.requests) == 1
        assert backend.replicas.states()[wrong.url].startswith("out: reply not a completion")
        assert alive.requests[0]["body"]["stream"] is True
        got.clear()
        with pytest.raises(RungUnavailable, match="not an OpenAI-style completion") as info:
            OpenAIBackend(_spec([wrong.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
    assert got == [] and info.value.public == "rung 'big' could not answer: its server failed (reply not a completion)"


def test_an_event_stream_sent_under_another_content_type_still_streams() -> None:
    # Its lines decide, not its header: a server or proxy that streams events as text/plain
    # (or none) was read whole and failed over, its words lost, when the header decided.
    with pooled_transport(), FakeOpenAI() as plain, FakeOpenAI() as other:
        plain.answer, plain.stream_type = (lambda prompt, body: "forty two"), "text/plain"
        got: list[str] = []
        gen = OpenAIBackend(_spec([plain.url, other.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
    assert gen.text == "forty two" and len(got) > 1 and "".join(got) == "forty two" and other.requests == []


def test_a_stream_cut_short_after_its_first_words_is_not_tried_again() -> None:
    # Words already went to the client: another replica would send them again.
    from crecli.models.openai import RemoteError

    with pooled_transport(), FakeOpenAI() as cut, FakeOpenAI() as other:
        cut.answer, cut.stream_done = (lambda prompt, body: "forty two"), False
        got: list[str] = []
        with pytest.raises(RemoteError, match=r"without `data: \[DONE\]`") as info:
            OpenAIBackend(_spec([cut.url, other.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
    assert not isinstance(info.value, RungUnavailable) and got and other.requests == []


def _fail_stream(engine: FakeOpenAI, fault: str) -> None:
    """Make `engine`'s streams fail by `fault`, after the tokens of its answer."""
    if fault == "error event":
        engine.stream_error = "CUDA out of memory"
    elif fault == "no [DONE]":
        engine.stream_done = False
    elif fault == "connection breaks":
        engine.stream_break = True
    else:
        engine.stream_event = {"choices": 5}


@pytest.mark.parametrize(("fault", "short"), [("error event", "stream error"), ("no [DONE]", "stream cut short"),
                                              ("choices not a list", "reply not a completion"),
                                              ("connection breaks", "connection broke")])
def test_a_stream_that_fails_before_any_text_fails_over_and_takes_its_server_out(fault: str, short: str) -> None:
    """An engine opens its stream with a chunk that has no text (the role), then fails: no
    text went out, so that server failed the try, as one that refused the connection. The
    first event counted as text sent: the request ended in an error with the next replica
    never tried, and the server, released as healthy, took the next request too."""
    with pooled_transport(), FakeOpenAI() as failing, FakeOpenAI() as alive:
        failing.answer = lambda prompt, body: ""  # one event with no text, as a role-only chunk
        _fail_stream(failing, fault)
        backend = OpenAIBackend(_spec([failing.url, alive.url]))
        got: list[str] = []
        for _ in range(2):
            gen = backend.generate_streaming("hi", GenParams(max_tokens=4), got.append)
            assert gen.text == "42"
        assert "".join(got) == "4242" and len(failing.requests) == 1 and len(alive.requests) == 2
        assert backend.replicas.states()[failing.url].startswith(f"out: {short}")
        got.clear()
        with pytest.raises(RungUnavailable) as info:  # no replica left: the rung's, not an answer's, failure
            OpenAIBackend(_spec([failing.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
    assert got == [] and info.value.public == f"rung 'big' could not answer: its server failed ({short})"


# How servers report a failed stream besides an error event, then still send `data: [DONE]`.
ERROR_LINES = {
    "error line": b'error: {"code": 500, "message": "CUDA out of memory", "type": "server_error"}\n\n',
    "typed event": b'event: error\ndata: {"error": {"message": "CUDA out of memory"}}\n\n',
}


@pytest.mark.parametrize("how", ERROR_LINES)
def test_an_error_line_or_an_event_typed_error_fails_the_stream_though_done_follows(how: str) -> None:
    """They were skipped as lines that are no data, and the `data: [DONE]` after them ended
    the stream as a complete answer: empty, or cut short with finish "stop"."""
    from crecli.errors import PromptTooLong
    from crecli.models.openai import RemoteError

    with pooled_transport(), FakeOpenAI() as failing, FakeOpenAI() as alive:
        failing.answer, failing.stream_raw = (lambda prompt, body: ""), ERROR_LINES[how]
        backend = OpenAIBackend(_spec([failing.url, alive.url]))
        got: list[str] = []
        assert backend.generate_streaming("hi", GenParams(max_tokens=4), got.append).text == "".join(got) == "42"
        assert len(failing.requests) == len(alive.requests) == 1  # nothing went out: tried on another
        assert backend.replicas.states()[failing.url].startswith("out: stream error")
        # After its first words: the request's error, with the server's words, not an answer.
        failing.answer = lambda prompt, body: "forty two"
        got.clear()
        with pytest.raises(RemoteError, match="error mid-stream: CUDA out of memory") as info:
            OpenAIBackend(_spec([failing.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
        assert not isinstance(info.value, RungUnavailable) and got
        # An error that says the prompt is too long is the prompt's, as in a 400 that says so.
        failing.answer = lambda prompt, body: ""
        failing.stream_raw = ERROR_LINES[how].replace(b"CUDA out of memory", b"the request exceeds the available "
                                                                             b"context size, try increasing it")
        backend = OpenAIBackend(_spec([failing.url, alive.url]))
        with pytest.raises(PromptTooLong):
            backend.generate_streaming("hi", GenParams(max_tokens=4), got.append)
        assert len(alive.requests) == 1 and backend.replicas.states()[failing.url] == "up"


# Deeper than Python's parser goes: `json.loads` raises RecursionError, not a ValueError.
DEEP = b"[" * 200_000


@pytest.mark.parametrize("pooled", [False, True])
def test_a_reply_nested_too_deeply_to_read_is_no_completion_and_gives_its_slot_back(pooled: bool) -> None:
    """`[[[...` raised a RecursionError that no branch expected: it came out as a traceback,
    and the replica's slot was never given back, so with `max_in_flight = 1` the rung's next
    request waited for good while /health said the server was up."""
    from contextlib import nullcontext

    with pooled_transport() if pooled else nullcontext(), FakeOpenAI() as deep, FakeOpenAI() as alive:
        deep.page, deep.page_type = DEEP, "application/json"
        backend = OpenAIBackend(_spec([deep.url, alive.url], max_in_flight=1))
        assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        assert len(deep.requests) == len(alive.requests) == 1
        assert [r.in_flight for r in backend.replicas.replicas] == [0, 0]
        assert backend.replicas.states()[deep.url].startswith("out: reply not a completion")


@pytest.mark.parametrize("field", [b"data", b"error"])
def test_a_stream_line_nested_too_deeply_is_read_as_any_unreadable_line(field: bytes) -> None:
    """An event (or an `error:` line) nested too deeply raised RecursionError on the
    transport's loop, out of `generate_streaming` raw. Now it is read as any line whose JSON
    is unreadable: a data line is skipped, an error line fails the stream with its text."""
    from crecli.models.openai import RemoteError

    with pooled_transport(), FakeOpenAI() as engine:
        engine.stream_raw = field + b": " + DEEP[:100_000] + b"\n\n"
        backend = OpenAIBackend(_spec([engine.url], max_in_flight=1))
        got: list[str] = []
        if field == b"data":
            assert backend.generate_streaming("hi", GenParams(max_tokens=4), got.append).text == "42"
        else:
            with pytest.raises(RemoteError, match=r"error mid-stream: \[\[\["):
                backend.generate_streaming("hi", GenParams(max_tokens=4), got.append)
        assert "".join(got) == "42" and [r.in_flight for r in backend.replicas.replicas] == [0]


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("reply", [
    b'{"choices": [{"message": {"content": "caf\\ud83d"}, "finish_reason": "stop"}]}',
    b'{"choices": [{"message": {"content": "no"}}], "choices": [{"message": {"content": "caf\xc3\xa9"}}]}',
])
def test_a_valid_reply_with_a_lone_surrogate_or_a_key_twice_is_an_answer_not_a_failed_server(
    pooled: bool, reply: bytes
) -> None:
    """A reply whose text holds a lone surrogate (a token cut mid-character) or whose object
    gives a key twice was refused as user input is: "the reply is not a JSON object", the
    healthy server taken out, and every replica in turn for the same greedy reply. Read
    as `json.loads` reads it, with the surrogate mended (no UTF-8 output can hold one)."""
    from contextlib import nullcontext

    with pooled_transport() if pooled else nullcontext(), FakeOpenAI() as engine:
        engine.page, engine.page_type = reply, "application/json"
        backend = OpenAIBackend(_spec([engine.url]))
        gen = backend.generate("hi", GenParams(max_tokens=4))
        assert gen.text in ("caf\ufffd", "caf\u00e9") and backend.replicas.states()[engine.url] == "up"
        gen.text.encode("utf-8")


def test_a_streamed_event_with_a_lone_surrogate_is_not_lost() -> None:
    """Such an event was skipped as unreadable: its token was lost from the answer."""
    with pooled_transport(), FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: ""
        engine.stream_raw = b'data: {"choices": [{"index": 0, "delta": {"content": "caf\\ud83d"}}]}\n\n'
        got: list[str] = []
        gen = OpenAIBackend(_spec([engine.url])).generate_streaming("hi", GenParams(max_tokens=4), got.append)
        assert gen.text == "".join(got) == "caf\ufffd"


def test_a_try_that_ends_in_an_exception_no_branch_expected_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever ends a try (here a bug in reading the reply), its replica's slot goes back,
    as a try that says nothing of the server: held, it blocked the server for good."""
    from crecli.models import openai

    def broken(data: Any, chat: bool) -> str | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai, "_completion_shape", broken)
    with FakeOpenAI() as engine:
        backend = OpenAIBackend(_spec([engine.url], max_in_flight=1))
        with pytest.raises(RuntimeError, match="a bug"):
            backend.generate("hi", GenParams(max_tokens=4))
        assert [r.in_flight for r in backend.replicas.replicas] == [0]
        assert backend.replicas.states()[engine.url] == "up"


@pytest.mark.parametrize(("status", "advice"), [(404, "`api_model`"), (401, "api_key_env")])
def test_a_lower_rung_passed_over_for_a_wrong_model_or_key_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, advice: str
) -> None:
    # Passed over without a word, exit 0: every prompt went to the dearer rung above, and the
    # advice the server's error carried (check api_model, set api_key_env) was never shown.
    from crecli import live, routerfile

    fresh_remote(monkeypatch)
    monkeypatch.setattr(live, "_SAID", set())
    use_models(monkeypatch, {"medium": lambda t, p: "7", "large": lambda t, p: "7"})
    with FakeOpenAI() as small:
        small.status = status
        toml = ladder_toml(tmp_path, {"small": small.url})
        router = tmp_path / "r.cre"
        routerfile.save(make_router(starts=("small", "small", "small")), router)
        first = runner.invoke(app, ["ask", ADDITIONS[0], "--router", str(router), "--models", str(toml), "--no-log"])
        again = runner.invoke(app, ["ask", ADDITIONS[0], "--router", str(router), "--models", str(toml), "--no-log"])
    assert first.exit_code == 0 and first.stdout.strip() == "7"
    assert f"HTTP {status}" in first.stderr and advice in first.stderr
    assert "prompts pass over small to the next rung" in first.stderr
    assert "prompts pass over small" not in again.stderr  # once a process
    # ... once a cause: a passing 503 said first does not silence a later wrong key.
    with FakeOpenAI() as small:
        small.status = 503 if status != 503 else 401
        toml = ladder_toml(tmp_path, {"small": small.url})
        other = runner.invoke(app, ["ask", ADDITIONS[0], "--router", str(router), "--models", str(toml), "--no-log"])
    assert "prompts pass over small to the next rung" in other.stderr


def test_every_replica_giving_one_status_keeps_it_for_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two servers refusing the key read as "not reached" in `cre models list`.
    fresh_remote(monkeypatch)
    with FakeOpenAI() as a, FakeOpenAI() as b:
        a.status = b.status = 401
        assert OpenAIBackend(_spec([a.url, b.url])).signal_support().detail == "HTTP 401"


def test_a_400_is_the_requests_fault_and_leaves_the_replica_in_rotation() -> None:
    from crecli.models.openai import RemoteError

    with FakeOpenAI() as strict, FakeOpenAI() as other:
        strict.status = 400
        backend = OpenAIBackend(_spec([strict.url, other.url]))
        with pytest.raises(RemoteError, match="HTTP 400") as info:
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert not isinstance(info.value, RungUnavailable) and other.requests == []
        assert backend.replicas.states()[strict.url] == "up"


def test_503_with_retry_after_is_honoured() -> None:
    with FakeOpenAI() as busy, FakeOpenAI() as other:
        busy.status, busy.retry_after = 503, "30"
        backend = OpenAIBackend(_spec([busy.url, other.url]))
        start = time.monotonic()
        for _ in range(3):
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert len(busy.requests) == 1 and len(other.requests) == 3  # not asked again for 30 s
        state = backend.replicas.states()[busy.url.rstrip("/")]
        elapsed = time.monotonic() - start
    # Out for the 30 s asked, less only the time spent since (rounded): a slow machine may
    # take over a second for the three requests, so the count is not always 30 or 29.
    back_in = re.search(r"\(back in (\d+) s\)", state)
    assert back_in and 30 - elapsed - 1 <= int(back_in.group(1)) <= 30, (state, elapsed)
    # A lone server that says "retry after 1 s" to one request: the request waits for it,
    # then is answered. Refused once, not for a while: a timer ending the refusals raced the
    # request on a loaded machine (late, it gave a second 503).
    with FakeOpenAI() as lone:
        lone.status, lone.retry_after, lone.status_once = 503, "1", True
        backend = OpenAIBackend(_spec([lone.url]))
        start = time.monotonic()
        assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        assert time.monotonic() - start >= 0.95 and len(lone.requests) == 2


@pytest.mark.parametrize("retry_after", ["100000", "86000", "30"])
def test_a_retry_after_keeps_a_server_out_a_minute_at_most_and_is_passed_on(retry_after: str) -> None:
    """A server that asked for a day was out for a day: /health called the rung down, and
    clients were told to come back tomorrow. It is out for a minute at most; within it, a
    request that cannot wait that long is refused at once with the wait passed on (the server
    is not sent more before it said), and once it is due back it is tried again."""
    from crecli.models.replicas import MAX_RETRY_WAIT

    with FakeOpenAI() as busy:
        busy.status, busy.retry_after, busy.status_once = 503, retry_after, True
        backend = OpenAIBackend(_spec([busy.url]), timeout=5.0)  # less time than a 30 s wait
        with pytest.raises(RungUnavailable) as info:
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert len(busy.requests) == 1  # not asked again at once: it would only ask to wait again
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= min(float(retry_after), MAX_RETRY_WAIT)
        assert backend.replicas.back_in() <= MAX_RETRY_WAIT
        with pytest.raises(RungUnavailable, match="asked to wait"):
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
        assert len(busy.requests) == 1
        for replica in backend.replicas.replicas:  # the minute has passed
            replica.out_until = time.monotonic()
        assert backend.generate("hi", GenParams(max_tokens=4, temperature=0.5)).text == "42"
        assert len(busy.requests) == 2 and backend.replicas.states()[busy.url] == "up"


def test_when_every_replica_fails_the_error_names_the_rung_and_each_server() -> None:
    dead = dead_url()
    with FakeOpenAI() as failing:
        failing.status = 502
        backend = OpenAIBackend(_spec([dead, failing.url]))
        with pytest.raises(RungUnavailable) as info:
            backend.generate("hi", GenParams(max_tokens=4, temperature=0.5))
    message = str(info.value)
    assert "model 'big': every server failed" in message and dead in message and failing.url in message
    assert "cannot connect" in message and "HTTP 502" in message
    assert info.value.public == ("rung 'big' could not answer: every one of its 2 servers failed or is out of "
                                 "rotation (connection refused; HTTP 502)")
    assert "127.0.0.1" not in info.value.public


def test_cre_ask_uses_the_replicas_too(tmp_path: Path) -> None:
    with FakeOpenAI() as alive:
        alive.answer = lambda prompt, body: "Paris"
        toml = tmp_path / "models.toml"
        toml.write_text(f'ladder = ["big"]\n[models.big]\nurl = ["{dead_url()}", "{alive.url}"]\n'
                        'api_model = "served"\nprompt_format = "chat"\n')
        result = runner.invoke(app, ["ask", "Capital of France?", "--model", "big", "--models", str(toml)])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


# ---------------------------------------------------------------- through cre serve

def test_a_replica_killed_under_load_loses_no_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as first, FakeOpenAI() as second:
        first.delay = second.delay = 0.05
        settings = config.load(ladder_toml(tmp_path, {"large": [first.url, second.url]}, max_in_flight=4))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            def kill_when_busy() -> None:
                deadline = time.monotonic() + 20
                while len(first.requests) < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
                first.die = True  # the requests it holds now get no reply
                time.sleep(0.1)
                first.close()  # and new connections are refused

            threading.Thread(target=kill_when_busy, daemon=True).start()
            results: list[int] = []
            lock = threading.Lock()

            def client() -> None:
                for _ in range(10):
                    code = post(url, "cre", FAR).status_code
                    with lock:
                        results.append(code)

            at_once(*[client] * 8)
            health = httpx.get(f"{url}/health").json()
    assert results == [200] * 80
    assert len(second.requests) > len(first.requests) >= 5
    assert health["models"]["large"] == "remote, 1 of 2 servers out"


def test_a_rung_whose_servers_all_fail_is_passed_over_and_the_trace_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_models(monkeypatch, {"large": lambda text, p: "7"})
    settings = config.load(ladder_toml(tmp_path, {"medium": dead_urls(2)}))  # two ports, never one twice
    router = make_router(starts=("medium", "medium", "medium"))
    with serving_cascade(Cascade(router, settings)) as url:
        reply = post(url, "cre", ADDITIONS[0])
        health = httpx.get(f"{url}/health").json()
    assert reply.status_code == 200, reply.text
    steps = reply.json()["cre"]["steps"]
    assert [s["model"] for s in steps] == ["medium", "large"] and reply.json()["choices"][0]["message"]["content"] == "7"
    assert steps[0]["why"].startswith("unavailable (rung 'medium' could not answer") and "escalate to large" in steps[0]["why"]
    assert health["models"]["medium"] == "remote, every server out" and health["status"] == "degraded"


def test_a_prompt_too_long_for_a_lower_rung_passes_it_over_and_stands_only_on_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small in-process rungs under a rung with a larger context (a remote one): the whole
    # cascade failed with 400 context_length_exceeded where the top rung could answer.
    from crecli.errors import PromptTooLong

    def too_long(text: str, params: GenParams) -> str:
        raise PromptTooLong("prompt is 3000 tokens, which fills the context of 2048",
                            public="the prompt does not fit model's context; shorten it")

    large_fits = [True]
    use_models(monkeypatch, {"small": too_long, "medium": too_long,
                             "large": lambda text, p: "7" if large_fits[0] else too_long(text, p)})
    settings = config.load(ladder_toml(tmp_path))
    with serving_cascade(Cascade(make_router(starts=("small", "small", "small")), settings)) as url:
        reply = post(url, "cre", ADDITIONS[0])
        large_fits[0] = False
        top = post(url, "cre", ADDITIONS[0])
    assert reply.status_code == 200, reply.text
    steps = reply.json()["cre"]["steps"]
    assert [s["model"] for s in steps] == ["small", "medium", "large"] and reply.json()["cre"]["model"] == "large"
    assert steps[0]["why"] == "prompt too long for its context: escalate to medium"
    assert steps[1]["why"] == "prompt too long for its context: escalate to large"
    assert top.status_code == 400 and top.json()["error"]["code"] == "context_length_exceeded", top.text


def test_when_nothing_is_left_the_client_gets_an_openai_error_naming_the_rung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from crecli.serve_app import RefusalLog

    use_models(monkeypatch, {})
    # An outage's 503s each wrote their detailed line: one a period now, the rest counted.
    monkeypatch.setattr(RefusalLog, "PERIOD", 3600.0)
    with FakeOpenAI() as failing:
        failing.status = 503  # no Retry-After
        settings = config.load(ladder_toml(tmp_path, {"large": [dead_url(), failing.url]}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            lines = server_log_lines(request)  # once uvicorn has configured its loggers
            reply = post(url, "cre", FAR)
            by_name = post(url, "large")
    outage = [line for line in lines if "could not answer" in line]
    assert len(outage) == 1 and outage[0].startswith(reply.headers["X-Request-Id"] + ": cre could not answer: "), lines
    assert "127.0.0.1" in outage[0]  # the operator's line has the servers the client is not shown
    for r in (reply, by_name):
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rung_unavailable"
        assert error["message"].startswith("rung 'large' could not answer") and "127.0.0.1" not in error["message"]
        assert r.headers["Retry-After"] and r.headers["X-Request-Id"] in error["message"]


def test_a_streamed_request_no_server_could_start_gets_503_rung_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a 500 model_error, as if a word had gone out: nothing had, and the rung could not answer.
    use_models(monkeypatch, {})
    with FakeOpenAI() as failing:
        failing.answer, failing.stream_error = (lambda prompt, body: ""), "CUDA out of memory"
        settings = config.load(ladder_toml(tmp_path, {"large": failing.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            body = {"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "rung_unavailable", reply.text
    assert reply.json()["error"]["message"].startswith("rung 'large' could not answer: its server failed (stream error)")
    assert int(reply.headers["Retry-After"]) >= 1


def test_the_clients_retry_after_is_when_the_first_server_is_due_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was always 1 s, while cre itself refused the rung for the 120 s its server asked.
    # A wait over a minute is honoured for a minute (`replicas.MAX_RETRY_WAIT`); within it,
    # cre refuses the rung itself, passing the wait on, and does not send its server more.
    use_models(monkeypatch, {})
    with FakeOpenAI() as busy:
        busy.status, busy.retry_after = 503, "120"
        settings = config.load(ladder_toml(tmp_path, {"large": busy.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            replies = [post(url, "large"), post(url, "cre", FAR)]  # asked, then refused by cre alone
    assert len(busy.requests) == 1
    for reply in replies:
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "rung_unavailable", reply.text
        assert 50 <= int(reply.headers["Retry-After"]) <= 60, reply.headers["Retry-After"]
