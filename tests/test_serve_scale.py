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
from support.scale import at_once, fresh_remote, ladder_toml, post, slow, use_models
from support.serving import serving_cascade

CHAT = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_remote(monkeypatch)


# ---------------------------------------------------------------- in-process models

def test_a_small_models_answer_does_not_wait_behind_a_large_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    active: dict[str, list[float]] = {}
    use_models(monkeypatch, {"small": slow("7", 0.05, active, "small"), "large": slow("7", 1.0, active, "large")})
    settings = config.load(ladder_toml(tmp_path))
    with serving_cascade(Cascade(make_router(), settings)) as url:
        done: dict[str, float] = {}
        start = time.monotonic()

        def ask(model: str, delay: float) -> int:
            time.sleep(delay)
            reply = post(url, model)
            done[f"{model}-{delay}"] = time.monotonic() - start
            return reply.status_code

        codes = at_once(lambda: ask("large", 0.0), lambda: ask("large", 0.05), lambda: ask("small", 0.2))
    assert codes == [200, 200, 200]
    assert done["small-0.2"] < 0.8, done  # not behind the 1.0 s answers of the large model
    assert done["large-0.05"] >= 1.9, done  # the large model computes for one request at a time
    assert max(active["large"]) == 1 and max(active["small"]) == 1


def test_a_loaded_model_in_use_is_never_closed_to_make_room() -> None:
    from crecli.models.registry import ModelPool

    closed: list[str] = []

    class Sized(FakeBackend):
        def close(self) -> None:
            closed.append(self.spec.name)

    specs = {n: ModelSpec(name=n, path=f"/x/{n}.gguf", size=60) for n in ("a", "b")}
    original = registry.make_backend
    registry.make_backend = lambda spec: Sized(spec)  # type: ignore[assignment]
    try:
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
        t.join(5)
        assert order == ["a done", "b loaded"] and closed == ["a"]
    finally:
        registry.make_backend = original  # type: ignore[assignment]


def test_a_model_waits_for_room_only_on_models_that_hold_memory() -> None:
    from crecli.models.registry import ModelPool

    local = ModelSpec(name="big", path="/x/big.gguf", size=150)  # over the budget alone
    remote = ModelSpec(name="far", url="http://far/v1", api_model="served", prompt_format="chat")
    original = registry.make_backend
    registry.make_backend = lambda spec: FakeBackend(spec)  # type: ignore[assignment]
    try:
        pool = ModelPool(memory_budget_bytes=100)
        loaded: list[float] = []
        with pool.lease(remote):
            def other() -> None:
                start = time.monotonic()
                with pool.lease(local):
                    loaded.append(time.monotonic() - start)

            t = threading.Thread(target=other, daemon=True)
            t.start()
            t.join(2)
            # The busy remote rung will free no memory, so the local model does not wait for it.
            assert loaded and loaded[0] < 1.0
    finally:
        registry.make_backend = original  # type: ignore[assignment]


def test_a_gate_admits_in_order_and_a_cancelled_waiter_leaves() -> None:
    gate = Gate(1)
    gate.acquire()
    token = Token()
    failed: list[BaseException] = []

    def wait() -> None:
        with scope(token):
            try:
                gate.acquire()
            except Cancelled as exc:
                failed.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    assert gate.waiting == 1
    token.cancel()
    t.join(2)
    assert failed and gate.waiting == 0 and gate.held == 1
    gate.release()


# ---------------------------------------------------------------- remote rungs

def test_remote_rung_requests_run_at_once_within_max_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.delay = 0.3
        for bound, waves in ((2, 3), (6, 1)):
            engine.most_in_flight = 0
            folder = tmp_path / str(bound)
            folder.mkdir()
            replicas.forget()
            settings = config.load(ladder_toml(folder, {"large": engine.url}, max_in_flight=bound))
            with serving_cascade(Cascade(make_router(), settings)) as url:
                start = time.monotonic()
                codes = [r.status_code for r in at_once(*[lambda: post(url, "large")] * 6)]
                took = time.monotonic() - start
            assert codes == [200] * 6
            assert engine.most_in_flight == bound, (bound, engine.most_in_flight)
            assert waves * 0.3 <= took < waves * 0.3 + 0.8, (bound, took)


def test_a_client_that_leaves_cancels_its_remote_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.delay = 3.0
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json={"model": "large", "messages": CHAT}, timeout=0.5)
            start = time.monotonic()
            while httpx.get(f"{url}/health").json()["running"]:
                assert time.monotonic() - start < 1.5, "the job still runs: its remote call was not abandoned"
                time.sleep(0.05)


def test_the_timeout_covers_the_whole_ladder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two remote rungs of 0.5 s each and a timeout of 0.7 s: the second rung gets the 0.2 s
    left, the request a 504 at 0.7 s, and its job stops."""
    use_models(monkeypatch, {})
    with FakeOpenAI() as medium, FakeOpenAI() as large:
        medium.delay = large.delay = 0.5
        votes = iter(range(1000))
        medium.answer = lambda prompt, body: str(next(votes))  # every vote differs: medium escalates
        settings = config.load(ladder_toml(tmp_path, {"medium": medium.url, "large": large.url}))
        router = make_router(starts=("medium", "medium", "medium"))
        with serving_cascade(Cascade(router, settings), timeout=0.7) as url:
            start = time.monotonic()
            reply = post(url, "cre", ADDITIONS[0])
            took = time.monotonic() - start
            time.sleep(0.3)
            health = httpx.get(f"{url}/health").json()
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    assert 0.65 <= took < 1.1, took
    assert health["running"] == 0


def test_health_answers_at_once_while_every_slot_is_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.delay = 1.0
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}, max_in_flight=1))
        with serving_cascade(Cascade(make_router(), settings), max_queue=2) as url:
            threads = [threading.Thread(target=post, args=(url, "large")) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            start = time.monotonic()
            health = httpx.get(f"{url}/health", timeout=5).json()
            took = time.monotonic() - start
            refused = post(url, "large")
            for t in threads:
                t.join(10)
    assert took < 0.3 and health["status"] == "ok"
    assert (health["running"], health["queued"]) == (3, 0)  # capacity: the 3 in-process models and 1 remote slot
    assert refused.status_code in (200, 429)


# ---------------------------------------------------------------- streaming

def _stream(url: str, model: str, content: str) -> tuple[list[tuple[float, dict[str, Any]]], float]:
    """The events of a streamed chat answer, each with its arrival time since the request."""
    events = []
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": content}]}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.monotonic() - start, json.loads(line[6:])))
    return events, time.monotonic() - start


def _text(events: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for _, e in events if e.get("choices"))


def test_a_remote_top_rungs_stream_is_passed_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is forty two"
        engine.token_delay = 0.25
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            events, took = _stream(url, "cre", FAR)  # far from every cluster: the top rung answers
            plain = post(url, "cre", FAR).json()
    contents = [(t, e) for t, e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert _text(events) == plain["choices"][0]["message"]["content"] == "The answer is forty two"
    assert len(contents) >= 4 and contents[0][0] < took - 0.5, (contents[0][0], took)  # tokens as they came
    assert engine.requests[0]["body"]["stream"] is True
    final = [e for _, e in events if e.get("choices") and e["choices"][0]["finish_reason"]][0]
    assert final["cre"]["model"] == "large" and final["cre"]["steps"][0]["model"] == "large"
    assert events[-1][1]["usage"]["completion_tokens"] == 5


def test_a_streamed_request_holds_its_place_until_its_answer_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream computes for as long as it runs; its place among the requests in flight was
    # given back when its response started, so any number of streams got past the 503 bound.
    from crecli.serve_options import ServeOptions

    monkeypatch.setattr(ServeOptions, "max_requests", property(lambda self: 1))
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is forty two"
        engine.token_delay = 0.3
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            body = {"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json=body) as reply:
                lines = reply.iter_lines()
                assert reply.status_code == 200
                assert next(line for line in lines if line.startswith("data: "))  # streaming now
                during = post(url, "cre", FAR)
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
    use_models(monkeypatch, answers, streaming={"small": 0.2, "large": 0.2})
    settings = config.load(ladder_toml(tmp_path))
    with serving_cascade(Cascade(make_router(), settings)) as url:
        streamed, took = _stream(url, "cre", FAR)  # the top rung answers: it streams
        climbed, _ = _stream(url, "cre", ADDITIONS[0])  # small doubts, then large: only large's words go out
    assert _text(streamed) == "seven is the sum"  # the format's stop string held back, never sent
    contents = [t for t, e in streamed if e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert len(contents) >= 3 and contents[0] < took - 0.3
    final = [e for _, e in climbed if e.get("choices") and e["choices"][0]["finish_reason"]][0]
    # medium's "I don't know" has no number (a numeric cluster): empty, so it escalates too.
    assert [s["model"] for s in final["cre"]["steps"]] == ["small", "medium", "large"]
    assert _text(climbed) == "seven is the sum" and "guess" not in json.dumps([e for _, e in climbed][:-2])


@pytest.mark.parametrize("fault", ["error event", "no [DONE]"])
def test_a_remote_stream_that_fails_midway_ends_in_an_error_not_an_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Both were read as a complete answer (an empty one where no token had come).
    use_models(monkeypatch, {})
    with FakeOpenAI() as engine:
        engine.answer = lambda prompt, body: "The answer is"
        if fault == "error event":
            engine.stream_error = "CUDA out of memory"
        else:
            engine.stream_done = False
        settings = config.load(ladder_toml(tmp_path, {"large": engine.url}))
        with serving_cascade(Cascade(make_router(), settings)) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              json={"model": "cre", "stream": True, "messages": [{"role": "user", "content": FAR}]}) as reply:
                lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and "error" in events[-1], events[-1]
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") == "stop" for e in events)


def test_a_crash_after_the_first_streamed_word_ends_the_stream_with_an_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only CreErrors were turned into an error event; anything else dropped the connection.
    from support.scale import WordByWord

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


def test_stream_text_applies_stop_and_whitespace_as_the_whole_answer_gets_them() -> None:
    got: list[str] = []
    text = StreamText(("END",), got.append)
    for piece in ["  The ", "answer", " is 4", "  ", "E", "N", "D and more"]:
        text.feed(piece)
    text.finish("The answer is 4")
    assert "".join(got) == "The answer is 4" and all(got)
    assert held_back("abc EN", ("END",)) == ("abc ", False) and held_back("abc END x", ("END",)) == ("abc ", True)
