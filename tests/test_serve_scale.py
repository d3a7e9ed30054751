"""Issue 25, part 2: `cre serve` answers many requests at once.

Each request's cascade runs on a thread of its own: in-process models compute one request
at a time each, so a small model's answer never waits behind a large one's; remote rungs
are called through one pooled async client, at most `max_in_flight` requests a server;
a request that gives up stops its job (its remote call abandoned); the timeout covers the
whole ladder; and a streamed answer's tokens go out as they are generated, when the rung
generating them is final. The servers here are real HTTP servers in threads
(`support.fake_openai.FakeOpenAI`) and the in-process models are fakes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from crecli import config
from crecli.cancel import Cancelled, Gate, Token, scope
from crecli.config import ModelSpec
from crecli.escalate import Cascade
from crecli.models import registry, replicas
from crecli.models.backend import Generation, GenParams, held_back
from crecli.models.fake import FakeBackend
from crecli.openai_wire import StreamText
from support.fake_openai import FakeOpenAI
from support.routers import ADDITIONS, FAR, make_router
from support.scale import WordByWord, at_once, fresh_remote, ladder_toml, post, slow, use_models
from support.serving import serving_cascade
from support.waiting import until

CHAT = [{"role": "user", "content": "What is 3 plus 4?"}]


def _held(answer: str, release: threading.Event, started: threading.Event | None = None,
          log: dict[str, list[int]] | None = None, name: str = "") -> Callable[..., str]:
    """An answer (a fake's or a FakeOpenAI's) that computes until `release` is set (60 s at
    most): work held there would be held until the test ends. Sets `started` on entry and
    records in `log[name]` how many ran at once."""
    lock, running = threading.Lock(), [0]

    def answerer(*_: object) -> str:
        with lock:
            running[0] += 1
            if log is not None:
                log.setdefault(name, []).append(running[0])
        if started is not None:
            started.set()
        release.wait(60)
        with lock:
            running[0] -= 1
        return answer

    return answerer


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_remote(monkeypatch)


# ---------------------------------------------------------------- in-process models

def test_a_small_models_answer_does_not_wait_behind_a_large_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    active: dict[str, list[int]] = {}
    release, large_busy = threading.Event(), threading.Event()
    use_models(monkeypatch, {"small": slow("7", 0.0, active, "small"), "large": _held("7", release, large_busy, active, "large")})
    settings = config.load(ladder_toml(tmp_path))
    cascade = Cascade(make_router(), settings)
    gate = cascade.pool.gate(settings.get("large"))
    assert gate is not None
    with serving_cascade(cascade) as url:
        replies: dict[str, httpx.Response] = {}

        def ask(key: str) -> None:
            replies[key] = post(url, "large")

        threads = [threading.Thread(target=ask, args=(key,)) for key in ("first", "second")]
        try:
            threads[0].start()
            assert large_busy.wait(30), "the large model never started"
            threads[1].start()
            # The large model computes for one request at a time: the second waits for it.
            until(lambda: gate.waiting == 1, "the second large request did not wait for the large model")
            # The small model answers while the large one computes, which it does until the test
            # releases it: a small answer behind the large ones would time out here.
            small = httpx.post(f"{url}/v1/chat/completions", json={"model": "small", "messages": CHAT}, timeout=30)
            large_still_busy = not release.is_set() and gate.waiting == 1
        finally:
            release.set()
            for t in threads:
                t.join(60)
    assert small.status_code == 200 and large_still_busy
    assert [replies[key].status_code for key in ("first", "second")] == [200, 200]
    assert max(active["large"]) == 1 and max(active["small"]) == 1


def test_a_loaded_model_in_use_is_never_closed_to_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.models.registry import ModelPool

    closed: list[str] = []

    class Sized(FakeBackend):
        def close(self) -> None:
            closed.append(self.spec.name)

    specs = {n: ModelSpec(name=n, path=f"/x/{n}.gguf", size=60) for n in ("a", "b")}
    monkeypatch.setattr(registry, "make_backend", lambda spec: Sized(spec))
    pool = ModelPool(memory_budget_bytes=100)
    order: list[str] = []
    with pool.lease(specs["a"]):
        def other() -> None:
            with pool.lease(specs["b"]):
                order.append("b loaded")

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        assert closed == [] and order == []  # b waits: a is in use and both do not fit
        order.append("a done")
    t.join(30)  # b loads as soon as a is free: only a slow, loaded machine takes more than a moment
    assert order == ["a done", "b loaded"] and closed == ["a"]


def _leases_while_held(pool: Any, held: ModelSpec, wanted: ModelSpec) -> bool:
    """Whether another thread leases `wanted` from `pool` while this one holds `held` (within
    30 s; had it waited for `held`, it would have until this one let go, after the answer)."""
    got = threading.Event()

    def other() -> None:
        with pool.lease(wanted):
            got.set()

    with pool.lease(held):
        t = threading.Thread(target=other, daemon=True)
        t.start()
        leased = got.wait(30)
    t.join(30)
    return leased


# Over the budget alone (a local model larger than it loads anyway), and one holding no memory.
BIG = ModelSpec(name="big", path="/x/big.gguf", size=150)
FAR_RUNG = ModelSpec(name="far", url="http://far/v1", api_model="served", prompt_format="chat")


def test_a_model_waits_for_room_only_on_models_that_hold_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from crecli.models.registry import ModelPool

    monkeypatch.setattr(registry, "make_backend", lambda spec: FakeBackend(spec))
    # The busy remote rung will free no memory, so the local model does not wait for it.
    assert _leases_while_held(ModelPool(memory_budget_bytes=100), FAR_RUNG, BIG), \
        "the local model waited for a remote rung to free memory"


def test_a_remote_rung_neither_waits_for_nor_closes_a_local_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Over the budget (a local model larger than it loads alone), a remote rung, which holds no
    # memory, waited for the local model's decode and then closed it, to load again next time.
    from crecli.models.registry import ModelPool

    closed: list[str] = []

    class Closing(FakeBackend):
        def close(self) -> None:
            closed.append(self.spec.name)

    monkeypatch.setattr(registry, "make_backend", lambda spec: Closing(spec))
    pool = ModelPool(memory_budget_bytes=100)
    assert _leases_while_held(pool, BIG, FAR_RUNG), "the remote rung waited for the local model's decode"
    with pool.lease(BIG):
        pass
    assert closed == []


def test_a_gate_admits_in_order_and_a_cancelled_waiter_leaves() -> None:
    gate = Gate(1)
    gate.acquire()
    tokens = [Token() for _ in range(3)]
    admitted: list[int] = []
    cancelled: list[int] = []

    def wait(i: int) -> None:
        with scope(tokens[i]):
            try:
                gate.acquire()
            except Cancelled:
                cancelled.append(i)
                return
        admitted.append(i)  # holding the only slot: the next is admitted after the release
        gate.release()

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
    for i, t in enumerate(threads):  # one at a time, so that the queue's order is 0, 1, 2
        t.start()
        until(lambda n=i + 1: gate.waiting == n, f"waiter {i} did not queue")
    tokens[1].cancel()
    threads[1].join(10)
    assert cancelled == [1] and admitted == [] and gate.waiting == 2 and gate.held == 1
    gate.release()
    for t in threads:
        t.join(10)
    assert admitted == [0, 2] and cancelled == [1]
    assert gate.waiting == 0 and gate.held == 0


# ---------------------------------------------------------------- remote rungs

def test_remote_rung_requests_run_at_once_within_max_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        for bound in (2, 6):
            # The engine answers a request only once `bound` are in at once (a barrier; one that
            # waits 30 s breaks, and its requests fail): the six requests go in waves of `bound`,
            # each wave at once, and never more than `bound` at once (most_in_flight).
            wave = threading.Barrier(bound, timeout=30)

            def answer(prompt: str, body: dict[str, Any], wave: threading.Barrier = wave) -> str:
                wave.wait()
                return "42"

            engine.answer = answer
            engine.most_in_flight = 0
            folder = tmp_path / str(bound)
            folder.mkdir()
            replicas.forget()
            settings = config.load(ladder_toml(folder, {"large": engine.url}, max_in_flight=bound))
            with serving_cascade(Cascade(make_router(), settings)) as url:
                codes = [r.status_code for r in at_once(*[lambda: post(url, "large")] * 6)]
            assert codes == [200] * 6 and not wave.broken, bound
            assert engine.most_in_flight == bound, (bound, engine.most_in_flight)


def test_a_client_that_leaves_cancels_its_remote_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    release = threading.Event()
    with FakeOpenAI() as engine:
        engine.answer = _held("42", release)  # the engine holds the call until the test ends
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            try:
                body = json.dumps({"model": "large", "messages": CHAT}).encode()
                with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as conn:
                    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    until(lambda: engine.in_flight == 1, "the remote call never started")
                # The client has left while the engine holds its call: the job stops only if the
                # call is abandoned.
                until(lambda: httpx.get(f"{url}/health").json()["running"] == 0,
                      "the job still runs: its remote call was not abandoned")
                still_held = not release.is_set()
            finally:
                release.set()
    assert still_held and len(engine.requests) == 1


def test_a_ladder_model_asked_by_name_passes_its_servers_refusal_on_as_a_400(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every refusal not about the context was a 500 model_error, though the fields the
    # server refused (top_p here) were the client's own. Through the cascade the request is
    # cre's own: its refusal stays the model's error.
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.status = 400
        engine.status_message = f"top_p must be in (0, 1],\n got 0 ({engine.url}/chat/completions)"
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            by_name = post(url, "large", "hi", top_p=0)
            through = post(url, "cre", FAR, top_p=0)
            health = httpx.get(f"{url}/health").json()
    error = by_name.json()["error"]
    assert by_name.status_code == 400 and (error["type"], error["code"]) == ("invalid_request_error", "request_refused")
    assert error["message"] == "model 'large' refused the request: HTTP 400: top_p must be in (0, 1], got 0 (.../chat/completions)"
    assert through.status_code == 500 and through.json()["error"]["code"] == "model_error"
    assert health["status"] == "ok"  # the server answered: it stays in rotation


def test_a_refusal_through_the_cascade_stays_the_models_error_when_a_ladder_model_is_named_cre(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `result` told a refusal met through the cascade from one of a model asked by name by
    # `query.model not in self.ladder`: with a ladder model named "cre", a request for "cre"
    # (the cascade: `job` asks `cascade_names` first) got its rung's refusal as the client's 400.
    from dataclasses import replace

    use_models(monkeypatch, {})
    router = make_router()
    swap = {"large": "cre"}
    router.ladder = [replace(e, name=swap.get(e.name, e.name)) for e in router.ladder]
    router.fallback_model = swap.get(router.fallback_model, router.fallback_model)
    router.thresholds = {swap.get(k, k): v for k, v in router.thresholds.items()}
    for cluster in router.clusters:
        cluster.model = swap.get(cluster.model, cluster.model)
        cluster.stats = {swap.get(k, k): v for k, v in cluster.stats.items()}
    with FakeOpenAI() as engine:
        engine.status = 400
        engine.status_message = "top_p must be in (0, 1]"
        toml = ladder_toml(tmp_path, {"large": engine.url})
        toml.write_text(toml.read_text().replace('"large"]', '"cre"]').replace("[models.large]", "[models.cre]"))
        settings = config.load(toml)
        assert settings.ladder == ["small", "medium", "cre"]
        with serving_cascade(Cascade(router, settings)) as url:
            through = post(url, "cre", FAR, top_p=0)  # far from every cluster: the top rung answers
    assert len(engine.requests) == 1  # the rung named "cre" was asked, and refused
    assert through.status_code == 500 and through.json()["error"]["code"] == "model_error"


def test_the_timeout_covers_the_whole_ladder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout of 6 s over two remote rungs: medium's four votes take 3 s (they disagree:
    it escalates), large would hold its call until the test ends. The request gets a 504
    before the large rung alone has had 6 s (the time medium spent counts), and its job stops.

    Medium's votes take half the timeout, so that the other half is left both for medium's
    answer to come within the timeout and for the 504 to reach the test: with 1.5 s of a 3 s
    timeout, a slow, loaded CI machine could spend that half on overhead alone."""
    use_models(monkeypatch, {})
    timeout, release, large_asked = 6.0, threading.Event(), threading.Event()
    asked_at: list[float] = []
    with FakeOpenAI() as medium, FakeOpenAI() as large:
        medium.delay = 0.75  # a vote; medium's four run one after another
        votes = iter(range(1000))
        medium.answer = lambda prompt, body: str(next(votes))  # every vote differs: medium escalates
        hold = _held("7", release, large_asked)
        large.answer = lambda prompt, body: (asked_at.append(time.monotonic()), hold())[1]
        settings = config.load(ladder_toml(tmp_path, {"medium": medium.url, "large": large.url}))
        router = make_router(starts=("medium", "medium", "medium"))
        with serving_cascade(Cascade(router, settings), timeout=timeout) as url:
            try:
                reply = post(url, "cre", ADDITIONS[0])
                replied_at = time.monotonic()
                until(lambda: httpx.get(f"{url}/health").json()["running"] == 0, "the job went on after its 504")
                still_held = not release.is_set()
            finally:
                release.set()
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    assert asked_at and still_held, "medium's answer did not come within the timeout"
    # Timestamps compared with each other: a timeout per rung would answer no sooner than
    # `timeout` after the large rung was asked. The margin the right code has is medium's
    # 3 s (large is asked at least that long after the request) for the 504 to reach us.
    assert replied_at < asked_at[0] + timeout, (replied_at - asked_at[0])


def test_health_answers_at_once_while_every_slot_is_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    release = threading.Event()
    with FakeOpenAI() as engine:
        engine.answer = _held("42", release)  # the engine holds every call until the test ends
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}, max_in_flight=1))
        with serving_cascade(Cascade(make_router(), settings), max_queue=2) as url:
            replies: list[httpx.Response] = []
            # Every place: a capacity of 3 (the 2 in-process models and 1 remote slot) and a
            # queue of 2. All five want the one remote slot: one computes there, four wait for it.
            threads = [threading.Thread(target=lambda: replies.append(post(url, "large"))) for _ in range(5)]
            seen: list[dict[str, Any]] = []
            try:
                for t in threads:
                    t.start()
                # /health answers while they are all held: had it waited behind model work, it
                # would have until the test ends.
                def full() -> bool:
                    seen.append(httpx.get(f"{url}/health", timeout=10).json())
                    return (seen[-1]["running"], seen[-1]["queued"]) == (1, 4)

                until(full, "/health never showed every place taken")
                refused = post(url, "large")
                still_held = not release.is_set() and not replies
            finally:
                release.set()
                for t in threads:
                    t.join(60)
    assert seen[-1]["status"] == "ok" and still_held
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert [r.status_code for r in replies] == [200] * 5


# ---------------------------------------------------------------- streaming

def _stream(url: str, model: str, content: str,
            first: threading.Event | None = None) -> list[tuple[float, dict[str, Any]]]:
    """The events of a streamed chat answer, each with its arrival time (time.monotonic());
    `first` is set once the first piece of content has arrived."""
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": content}]}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                events.append((time.monotonic(), event))
                if first is not None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first.set()
    return events


def _text(events: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for _, e in events if e.get("choices"))


def test_a_remote_top_rungs_stream_is_passed_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is forty two"
        # The engine sends its last token only once our first has come (or after 30 s).
        engine.hold_last = first = threading.Event()
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            try:
                events = _stream(url, "cre", FAR, first)  # far from every cluster: the top rung answers
            finally:
                first.set()
            last_sent = engine.token_sent_at[-1]
            plain = post(url, "cre", FAR).json()
    contents = [(t, e) for t, e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert _text(events) == plain["choices"][0]["message"]["content"] == "The answer is forty two"
    # Tokens as they came: the first reached the client before the engine sent its last.
    assert len(contents) >= 4 and contents[0][0] < last_sent, (contents[0][0], last_sent)
    assert engine.requests[0]["body"]["stream"] is True
    final = [e for _, e in events if e.get("choices") and e["choices"][0]["finish_reason"]][0]
    assert final["cre"]["model"] == "large" and final["cre"]["steps"][0]["model"] == "large"
    assert events[-1][1]["usage"]["completion_tokens"] == 5


def test_a_remote_stream_under_a_deadline_centuries_away_is_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Waiting for the stream until the deadline (plus a margin) overflowed threading's
    # longest wait: every streamed answer of a remote rung was a 500 with a traceback. The
    # command line bounds --timeout; the transport clamps its waits for any other caller.
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "one two three"
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings), timeout=1e10) as url:
            events = _stream(url, "cre", FAR)
    assert _text(events) == "one two three"


def test_a_streamed_request_holds_its_place_until_its_answer_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream computes for as long as it runs; its place among the requests in flight was
    # given back when its response started, so any number of streams got past the 503 bound.
    from crecli import serve_app

    monkeypatch.setattr(serve_app, "request_bound", lambda options, worker: 1)
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is forty two"
        engine.hold_last = release = threading.Event()  # the stream runs until `during` is answered
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            body = {"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json=body) as reply:
                try:
                    lines = reply.iter_lines()
                    assert reply.status_code == 200
                    assert next(line for line in lines if line.startswith("data: "))  # streaming now
                    during = post(url, "cre", FAR)
                finally:
                    release.set()
                rest = list(lines)
            assert "data: [DONE]" in rest
            deadline = time.monotonic() + 10
            while (after := post(url, "cre", FAR)).status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.05)  # the place comes back as the job ends, on the event loop
    assert (during.status_code, during.json()["error"]["code"]) == (503, "overloaded")
    assert after.status_code == 200, after.text


def test_an_in_process_top_rung_streams_its_words_and_lower_rungs_never_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"small": lambda text, p: f"guess {p.seed}", "large": lambda text, p: "seven is the sum<|im_end|> next"}
    first = threading.Event()  # a streaming model generates its last word once our first has come
    made = use_models(monkeypatch, answers, streaming={"small": 0.05, "large": 0.05}, hold_last=first)
    settings = config.load(ladder_toml(tmp_path))
    with serving_cascade(Cascade(make_router(), settings)) as url:
        try:
            streamed = _stream(url, "cre", FAR, first)  # the top rung answers: it streams
        finally:
            first.set()
        large = made["large"]
        assert isinstance(large, WordByWord)
        last_generated = large.generated_at[-1]
        climbed = _stream(url, "cre", ADDITIONS[0])  # small doubts, then large: only large's words go out
    assert _text(streamed) == "seven is the sum"  # the format's stop string held back, never sent
    contents = [t for t, e in streamed if e.get("choices") and e["choices"][0]["delta"].get("content")]
    # Words as they came: the first reached the client before the model generated its last.
    assert len(contents) >= 3 and contents[0] < last_generated, (contents[0], last_generated)
    final = [e for _, e in climbed if e.get("choices") and e["choices"][0]["finish_reason"]][0]
    # medium's "I don't know" has no number (a numeric cluster): empty, so it escalates too.
    assert [s["model"] for s in final["cre"]["steps"]] == ["small", "medium", "large"]
    assert _text(climbed) == "seven is the sum" and "guess" not in json.dumps([e for _, e in climbed][:-2])


@pytest.mark.parametrize("fault", ["error event", "no [DONE]", "choices not a list", "error line", "typed event"])
def test_a_remote_stream_that_fails_midway_ends_in_an_error_not_an_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Each was read as a complete answer (an empty one where no token had come).
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is"
        if fault == "error event":
            engine.stream_error = "CUDA out of memory"
        elif fault == "no [DONE]":
            engine.stream_done = False
        elif fault == "error line":  # some versions of llama.cpp's server, then data: [DONE]
            engine.stream_raw = b'error: {"code": 500, "message": "CUDA out of memory", "type": "server_error"}\n\n'
        elif fault == "typed event":
            engine.stream_raw = b'event: error\ndata: {"message": "CUDA out of memory"}\n\n'
        else:
            engine.stream_event = {"choices": 5}
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              json={"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}) as reply:
                lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "model_error"  # the server's fault, not a crash of cre's
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") == "stop" for e in events)


def test_a_crash_after_the_first_streamed_word_ends_the_stream_with_an_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only CreErrors were turned into an error event; anything else dropped the connection.
    class Crashes(WordByWord):
        def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
            emit("seven is")
            raise RuntimeError("a bug in native code")

    use_models(monkeypatch, {"large": lambda text, p: "seven"})
    made = registry.make_backend
    monkeypatch.setattr(registry, "make_backend",
                        lambda spec: Crashes(spec, None, 0.0) if spec.name == "large" else made(spec))
    settings = config.load(ladder_toml(tmp_path))
    with serving_cascade(Cascade(make_router(), settings)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert _text([(0.0, json.loads(line[6:])) for line in lines[:-2]]) == "seven is"
    assert json.loads(lines[-2][6:])["error"]["message"].startswith("internal error") and lines[-1] == "data: [DONE]"


class Chatty(FakeBackend):
    """Streams 4,000 pieces of 2,000 characters, 2 ms apart (8 s and more), stopping before
    its next piece once its request gives up, as llama.cpp stops at its next token. Records
    when (time.monotonic()) a stream ended."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, lambda text, params: "4")
        self.ended: list[float] = []

    def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
        from crecli import cancel

        try:
            for i in range(4000):
                cancel.check()
                time.sleep(0.002)
                emit(f"w{i} ".ljust(2000, "x") + " ")
        finally:
            self.ended.append(time.monotonic())
        return Generation("done", 5, 4000, 8.0)


def test_a_stream_whose_client_stops_reading_stops_at_its_deadline_and_frees_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job pushed its pieces into an unbounded queue, and the deadline was looked at only
    # while the events waited for a piece: a client that stopped reading held them at a send,
    # and the job ran to its natural end holding the model, so the next request got a 504.
    made: list[Chatty] = []
    monkeypatch.setattr(registry, "make_backend", lambda spec: made.append(Chatty(spec)) or made[-1])
    monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
    settings = config.load(ladder_toml(tmp_path))
    timeout = 3.0
    with serving_cascade(Cascade(make_router(), settings), timeout=timeout) as url:
        body = json.dumps({"model": "large", "prompt": "hi", "stream": True, "max_tokens": 8192}).encode()
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
            stalled.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
            sent = time.monotonic()
            time.sleep(1.5)
            # Its deadline comes 1.5 s after the stalled one's: it waits for the model meanwhile.
            second = post(url, "large", "hi", max_tokens=5)
            assert second.status_code == 200, second.text
            large = next(backend for backend in made if backend.spec.name == "large")
            assert large.ended and large.ended[0] - sent < timeout + 1.0, large.ended[0] - sent


def test_stream_text_applies_stop_and_whitespace_as_the_whole_answer_gets_them() -> None:
    got: list[str] = []
    text = StreamText(("END",), got.append)
    for piece in ["  The ", "answer", " is 4", "  ", "E", "N", "D and more"]:
        text.add(piece)
    text.finish("The answer is 4")
    assert "".join(got) == "The answer is 4" and all(got)
    assert held_back("abc EN", ("END",)) == ("abc ", False) and held_back("abc END x", ("END",)) == ("abc ", True)
