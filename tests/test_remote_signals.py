"""Issue 25, part 1: a remote rung carries the confidence signals an in-process rung does.

The remote backend asks its server for log-probabilities and reads from them the `Signals`
the llama.cpp backend reads from logits (checked against `SignalMeter` on the same logits);
whether a server gives them is found out once per (url, model) and shown by `cre models
list`; and a rung without them is never judged by a blind deferral model: `cre calibrate`
gives it the agreement check (and says so), `cre inspect` shows it, and a deferral rung
whose answer comes without them falls back to the agreement check, live and in replay alike.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

from crecli import config, grading
from crecli.cli import app
from crecli.config import ModelSpec
from crecli.costs import CostModel
from crecli.ladder import AGREEMENT, DEFERRAL
from crecli.models import logprobs as lp
from crecli.models import registry
from crecli.models.backend import GenParams, Signals
from crecli.models.openai import OpenAIBackend, RungUnavailable, forget_signal_support
from crecli.models.tokens import SignalMeter, letter_index
from crecli.outcomes import OutcomeStore, collect
from crecli.quality import Deferral, DeferralCheck, QualityCheck, feature_names, judge_deferral
from crecli.replay import Replay
from support.fake_openai import FakeOpenAI, Tok
from support.hostile import refused_models_tables
from support.ladder import LADDER, STARTS, bare_router, sum_answer, sum_records, sum_signals, walk_live
from support.logs import write_sums_log
from support.scale import fresh_remote

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fresh_remote(monkeypatch)
    yield
    forget_signal_support()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as srv:
        yield srv


def _spec(url: str, fmt: str = "completion", name: str = "remote") -> ModelSpec:
    return ModelSpec(name=name, url=url, api_model="served", prompt_format=fmt, defined_in="test.toml")


# ---------------------------------------------------------------- the same signals as llama.cpp's

VOCAB = [*(f.format(c) for c in "ABCD" for f in ("{}", " {}", "({}", " ({}")), "The", " answer", " is", ".", ")",
         " 4", " 42", "\n", " yes", " no", " maybe", " it", " because", " of", " x", " y", " z", " w", " v", " u"]


def _steps(seed: int, n: int = 6, letter_at: int | None = 2) -> list[np.ndarray]:
    """Logits over VOCAB for `n` greedy steps; at step `letter_at` a letter is the argmax."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logits = rng.normal(0, 2, len(VOCAB)).astype(np.float32)
        if i == letter_at:
            logits[VOCAB.index(" (B")] += 6
            logits[VOCAB.index("A")] += 4
        elif letter_at is not None and i < letter_at:
            for j, t in enumerate(VOCAB):  # no letter wins before the letter step
                if letter_index(t) is not None:
                    logits[j] -= 8
        out.append(logits)
    return out


def _remote_tokens(steps: list[np.ndarray], top: int) -> list[Tok]:
    """What a server returns for these steps: the argmax, its log-prob, the `top` best."""
    toks = []
    for logits in steps:
        logp = logits.astype(np.float64) - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
        order = np.argsort(-logp)[:top]
        best = int(order[0])
        toks.append((VOCAB[best], float(logp[best]), {VOCAB[int(j)]: float(logp[int(j)]) for j in order}))
    return toks


def _meter(steps: list[np.ndarray]) -> Signals | None:
    meter = SignalMeter({i: letter_index(t) for i, t in enumerate(VOCAB) if letter_index(t) is not None})  # type: ignore[misc]
    for logits in steps:
        meter.observe(logits)
    return meter.signals()


@pytest.mark.parametrize("shape", ["legacy", "content"])
def test_signals_read_from_log_probabilities_match_the_in_process_meter(shape: str) -> None:
    for seed in range(20):
        steps = _steps(seed)
        local = _meter(steps)
        # Every letter in the top list: the same figures, to rounding.
        full = lp.signals(lp.steps(FakeOpenAI._logprobs(_shape(shape), _remote_tokens(steps, len(VOCAB)), len(VOCAB), False)))
        assert local is not None and full is not None and local.margin is not None and full.margin is not None
        assert full.min_logprob == pytest.approx(local.min_logprob, abs=1e-5)
        assert full.mean_logprob == pytest.approx(local.mean_logprob, abs=1e-5)
        assert full.margin == pytest.approx(local.margin, abs=1e-6)
        # The 20 a server sends: letters outside them weigh almost nothing.
        top20 = lp.signals(lp.steps(FakeOpenAI._logprobs(_shape(shape), _remote_tokens(steps, 20), 20, False)))
        assert top20 is not None and top20.margin is not None
        assert (top20.min_logprob, top20.mean_logprob) == (full.min_logprob, full.mean_logprob)
        assert top20.margin == pytest.approx(local.margin, abs=0.01)


def _shape(shape: str) -> Any:
    """A stand-in `self` for `FakeOpenAI._logprobs` that picks the reply shape."""
    return type("S", (), {"logprobs": shape})()


def test_no_letter_means_no_margin_and_no_tokens_mean_no_signals() -> None:
    steps = _steps(3, letter_at=None)
    for logits in steps:
        for j, t in enumerate(VOCAB):
            if letter_index(t) is not None:
                logits[j] -= 20
    got = lp.signals(lp.steps(FakeOpenAI._logprobs(_shape("legacy"), _remote_tokens(steps, 20), 20, False)))
    local = _meter(steps)
    assert got is not None and got.margin is None and local is not None and local.margin is None
    assert (got.min_logprob, got.mean_logprob) == pytest.approx((local.min_logprob, local.mean_logprob), abs=1e-5)
    assert lp.signals(lp.steps(None)) is None and lp.signals(lp.steps({"content": []})) is None
    # Not numbers: no signals, never made-up ones.
    assert lp.steps({"content": [{"token": "a", "logprob": "high"}]}) is None
    assert lp.steps({"tokens": ["a"], "token_logprobs": [float("nan")]}) is None
    assert letter_index("\u2581(C") == 2 and letter_index("\u0120B") == 1 and letter_index("AB") is None


def _content(logprob: Any, top: Any) -> dict[str, Any]:
    return {"content": [{"token": "A", "logprob": logprob, "top_logprobs": top}]}


@pytest.mark.parametrize("logprobs", [
    _content(-0.1, 5),  # top_logprobs not a list: a TypeError
    _content(800.0, [{"token": "A", "logprob": 800.0}, {"token": "B", "logprob": -1.0}]),  # exp: an OverflowError
    _content(-0.1, [{"token": "A", "logprob": 0.5}, {"token": "B", "logprob": -1.0}]),  # above 0: no probability
    _content(10**400, []),  # past a float's range
    _content(-0.1, ["A", "B"]),
    _content(-0.1, [{"token": 7, "logprob": -1.0}]),
    _content(-0.1, [{"token": "A", "logprob": "-1"}]),
    _content(-0.1, {"A": -0.1}),
    {"content": ["A"]},
    {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": 5},
    {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [["A"]]},
    {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": 900.0, "B": -1.0}]},
    {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": -0.1}, {"B": -1.0}]},  # one list too many
    {"tokens": ["A"], "token_logprobs": [3.0]},
    {"tokens": ["A"], "token_logprobs": [float("-inf")]},
    _content(-0.1, [{"token": "A", "logprob": -0.1}, {"token": "B", "logprob": float("nan")}]),
    {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": -0.1, "B": float("inf")}]},
], ids=["top-int", "above-0-overflows", "alt-above-0", "past-float", "alts-not-objects", "alt-token-not-str",
        "alt-logprob-str", "alts-an-object", "item-not-object", "legacy-top-int", "legacy-alts-a-list",
        "legacy-alt-above-0", "legacy-tops-too-many", "legacy-above-0", "legacy-minus-inf", "alt-nan",
        "legacy-alt-plus-inf"])
def test_malformed_log_probabilities_give_no_signals_never_an_error(logprobs: Any) -> None:
    """Wrong types crashed the answer (`cre ask`, the probe in `cre models list`) and a value
    above 0 overflowed or made up a probability above 1: a reply's log-probabilities are
    read whole, each a finite number at most 0, or not at all."""
    assert lp.steps(logprobs) is None and lp.signals(lp.steps(logprobs)) is None


def test_log_probabilities_a_hair_above_0_are_a_servers_rounding_and_read_as_0() -> None:
    got = lp.steps(_content(4e-7, [{"token": "A", "logprob": 4e-7}, {"token": "B", "logprob": -16.0}]))
    assert got == [("A", 0.0, [("A", 0.0), ("B", -16.0)])]
    # Left out where a server has none to give: vLLM's null entries, a null top list.
    assert lp.steps({"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [None]}) == [("A", -0.1, [])]
    assert lp.steps(_content(-0.1, None)) == [("A", -0.1, [])]


def test_an_alternative_at_minus_infinity_is_left_out_not_the_whole_replys_signals() -> None:
    """One alternative a server sent as -Infinity (a token its sampler ruled out) threw away
    every signal of the reply; it is a probability of 0, left out of its top list."""
    ruled_out = [{"token": "A", "logprob": -0.1}, {"token": "B", "logprob": -2.5}, {"token": "C", "logprob": -math.inf}]
    assert lp.steps(_content(-0.1, ruled_out)) == [("A", -0.1, [("A", -0.1), ("B", -2.5)])]
    legacy = {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": -0.1, "B": -2.5, "C": -math.inf}]}
    assert lp.steps(legacy) == [("A", -0.1, [("A", -0.1), ("B", -2.5)])]
    # As a server sends it: JSON's -Infinity, which the reply's reader accepts.
    reply = {"choices": [{"message": {"content": "A"}, "finish_reason": "stop", "logprobs": _content(-0.1, ruled_out)}]}
    with FakeOpenAI() as server:
        server.page, server.page_type = json.dumps(reply).encode(), "application/json"
        assert b"-Infinity" in server.page
        gen = OpenAIBackend(_spec(server.url, "chat")).generate("Which? (A) x (B) y", GenParams(max_tokens=8))
    assert gen.signals is not None and gen.signals.min_logprob == -0.1 and gen.signals.margin is not None


def test_a_reply_with_malformed_log_probabilities_is_answered_without_signals(tmp_path: Path) -> None:
    reply = {"choices": [{"message": {"content": "Paris"}, "finish_reason": "stop",
                          "logprobs": {"content": [{"token": "Paris", "logprob": -0.1, "top_logprobs": 5}]}}]}
    with FakeOpenAI() as server:
        server.page, server.page_type = json.dumps(reply).encode(), "application/json"
        gen = OpenAIBackend(_spec(server.url, "chat")).generate("Capital of France?", GenParams(max_tokens=8))
        assert gen.text == "Paris" and gen.signals is None
        forget_signal_support()
        toml = tmp_path / "models.toml"
        toml.write_text(f'[models.big]\nurl = "{server.url}"\napi_model = "served"\nprompt_format = "chat"\n')
        listed = runner.invoke(app, ["models", "list", "--models", str(toml), "--json"])
    assert listed.exit_code == 0, listed.output
    assert {r["name"]: r["signals"] for r in json.loads(listed.stdout)}["big"] == "none"


# ---------------------------------------------------------------- asking a server

def test_greedy_answers_ask_for_log_probabilities_and_carry_signals(server: FakeOpenAI) -> None:
    server.answer = lambda prompt, body: [(" (B", -0.2, {" (B": -0.2, " (A": -1.9, " the": -4.0}), (")", -0.01, {")": -0.01})]
    for fmt, endpoint in (("completion", "/v1/completions"), ("chat", "/v1/chat/completions")):
        backend = OpenAIBackend(_spec(server.url, fmt))
        gen = backend.generate("Which? (A) x (B) y", GenParams(max_tokens=8))
        sampled = backend.generate("Which? (A) x (B) y", GenParams(max_tokens=8, temperature=0.7, seed=3))
        pa, pb = math.exp(-1.9), math.exp(-0.2)
        assert gen.signals is not None
        assert gen.signals.to_list() == pytest.approx([-0.2, -0.105, (pb - pa) / (pa + pb)])
        assert sampled.signals is None
        greedy_body, sampled_body = (r["body"] for r in server.requests[-2:])
        assert server.requests[-1]["path"] == endpoint
        wanted = {"logprobs": True, "top_logprobs": lp.TOP_LOGPROBS} if fmt == "chat" else {"logprobs": lp.TOP_LOGPROBS}
        assert {k: greedy_body[k] for k in wanted} == wanted
        assert "logprobs" not in sampled_body and "top_logprobs" not in sampled_body
        assert backend.signal_support(probe=False).label == "logprobs"


def test_repeat_penalty_is_sent_only_when_models_toml_sets_it(server: FakeOpenAI, tmp_path: Path) -> None:
    # llama-cpp-python's server and Ollama penalise repeats (1.1) unless told: their greedy
    # answers then differ from in-process ones. OpenAI's API refuses the field: never by default.
    OpenAIBackend(_spec(server.url)).generate("hi", GenParams(max_tokens=4))
    assert "repeat_penalty" not in server.requests[-1]["body"]
    toml = tmp_path / "models.toml"
    toml.write_text(f'ladder = ["remote"]\n[models.remote]\nurl = "{server.url}"\napi_model = "m"\nrepeat_penalty = 1.0\n')
    spec = config.load(toml).get("remote")
    assert spec.repeat_penalty == 1.0
    OpenAIBackend(spec).generate("hi", GenParams(max_tokens=4))
    OpenAIBackend(spec).generate("hi", GenParams(max_tokens=4, temperature=0.7, seed=1))
    assert [r["body"]["repeat_penalty"] for r in server.requests[-2:]] == [1.0, 1.0]
    refused_models_tables(toml, [
        (f'url = "{server.url}"\nrepeat_penalty = 0\n', "above 0 and at most 10"),
        (f'url = "{server.url}"\nrepeat_penalty = "1"\n', "repeat_penalty must be a finite number"),
        ('path = "/x.gguf"\nrepeat_penalty = 1.0\n', "sets `repeat_penalty`, which is sent to a remote rung"),
    ])


def test_a_server_that_drops_log_probabilities_is_found_out_once_and_shown(server: FakeOpenAI, tmp_path: Path) -> None:
    server.logprobs = "drop"  # as Ollama's OpenAI endpoint does
    spec = _spec(server.url)
    assert registry.signal_support(spec) == "none" and registry.reports_signals(spec) is False
    probes = len(server.requests)
    assert probes == 1 and server.requests[0]["body"]["max_tokens"] == 1
    gen = OpenAIBackend(spec).generate("hi", GenParams(max_tokens=4))
    assert gen.signals is None and gen.text == "42"
    # Known for the process: no second probe, and greedy requests no longer ask.
    assert registry.signal_support(spec) == "none" and len(server.requests) == probes + 1
    assert "logprobs" not in server.requests[-1]["body"]


def test_a_server_that_refuses_log_probabilities_still_answers(server: FakeOpenAI) -> None:
    server.logprobs = "reject"  # a 400 for any request that asks
    backend = OpenAIBackend(_spec(server.url))
    gen = backend.generate("hi", GenParams(max_tokens=4))
    assert gen.text == "42" and gen.signals is None
    asked = [r["body"].get("logprobs") for r in server.requests]
    assert asked == [lp.TOP_LOGPROBS, lp.FEWER_LOGPROBS, None]  # fewer, then none, then remembered
    backend.generate("again", GenParams(max_tokens=4))
    assert len(server.requests) == 4 and "logprobs" not in server.requests[-1]["body"]
    assert backend.signal_support().kind == "none"


def test_a_500_is_a_refusal_of_log_probabilities_only_when_the_same_server_repeats_it(server: FakeOpenAI) -> None:
    # llama-cpp-python's server without `logits_all` fails every request that asks (500).
    server.logprobs = "fail"
    backend = OpenAIBackend(_spec(server.url))
    for _ in range(3):
        assert backend.generate("hi", GenParams(max_tokens=4)).text == "42"
    asked = [r["body"].get("logprobs") for r in server.requests]
    # Once could be a passing fault: asked again on the next request, then known.
    assert asked == [lp.TOP_LOGPROBS, lp.FEWER_LOGPROBS, None] * 2 + [None]
    assert backend.signal_support(probe=False).detail == "refuses log-probabilities (HTTP 500)"


def test_a_500_that_does_not_name_log_probabilities_is_the_servers_failure_not_a_refusal(server: FakeOpenAI) -> None:
    # A passing fault (out of memory, a restart) was asked again for 5 alternatives, then
    # for none, on the same failing server, and not counted as its failure until the third.
    base, failures = server._handle, [1]

    def restarting(h: Any, body: dict[str, Any]) -> None:
        if failures[0]:
            failures[0] -= 1
            return h._send(500, {"error": {"message": "transient", "type": "server_error"}})
        return base(h, body)

    server._handle = restarting  # type: ignore[method-assign]
    backend = OpenAIBackend(_spec(server.url))
    with pytest.raises(RungUnavailable, match="HTTP 500"):
        backend.generate("hi", GenParams(max_tokens=4))
    assert [r["body"].get("logprobs") for r in server.requests] == [lp.TOP_LOGPROBS]
    assert backend.signal_support(probe=False).kind == "unknown"
    assert backend.replicas.states()[server.url].startswith("out: HTTP 500")
    assert backend.generate("hi", GenParams(max_tokens=4)).signals is not None  # its back-off is tried
    assert backend.signal_support(probe=False).kind == "logprobs"


def test_a_failing_server_sends_the_same_request_for_log_probabilities_on_to_another() -> None:
    # A server failing every request with 500 was taken for one refusing log-probabilities:
    # each greedy request tried it three times (20 alternatives, 5, then none; the first two
    # not counted as its failures) before a healthy replica got it, asked for none, so every
    # answer came back without signals.
    with FakeOpenAI() as failing, FakeOpenAI() as other:
        def out_of_memory(h: Any, body: dict[str, Any]) -> None:
            h._send(500, {"error": {"message": "CUDA error: out of memory", "type": "server_error"}})

        failing._handle = out_of_memory  # type: ignore[method-assign]
        spec = ModelSpec(name="remote", url=failing.url, urls=(failing.url, other.url), api_model="served",
                         prompt_format="completion", defined_in="test.toml")
        backend = OpenAIBackend(spec)
        gen = backend.generate("hi", GenParams(max_tokens=4))
        assert gen.text == "42" and gen.signals is not None
        assert len(failing.requests) == 1 and failing.requests[0]["body"]["logprobs"] == lp.TOP_LOGPROBS
        assert [r["body"].get("logprobs") for r in other.requests] == [lp.TOP_LOGPROBS]  # the same request
        assert backend.replicas.states()[failing.url].startswith("out: HTTP 500")
        assert backend.signal_support(probe=False).kind == "logprobs"


ASKS = "Why are logprobs not supported by my server? Answer in one word."


@pytest.mark.parametrize("echo", [
    {"error": {"message": "CUDA error: out of memory", "type": "server_error"}, "request": {"prompt": ASKS}},
    {"detail": [{"msg": "internal error", "input": {"prompt": ASKS}}]},
    f"Internal Server Error while answering {ASKS!r}",
], ids=["beside-message", "pydantic-input", "plain-text"])
def test_a_prompt_about_log_probabilities_echoed_in_a_500_is_no_refusal(echo: Any) -> None:
    """The whole body of a 500 was searched for "logprob", and a body may echo the request:
    a prompt that named them made a failing server's 500 a refusal of log-probabilities (no
    failover, and later the rung shown as giving none). Only the error's message counts."""
    with FakeOpenAI() as failing, FakeOpenAI() as other:
        def echoing(h: Any, body: dict[str, Any]) -> None:
            data = echo.encode() if isinstance(echo, str) else json.dumps(echo).encode()
            h.send_response(500)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)

        failing._handle = echoing  # type: ignore[method-assign]
        spec = ModelSpec(name="remote", url=failing.url, urls=(failing.url, other.url), api_model="served",
                         prompt_format="completion", defined_in="test.toml")
        backend = OpenAIBackend(spec)
        gen = backend.generate(ASKS, GenParams(max_tokens=4))
        assert gen.signals is not None and len(failing.requests) == 1
        assert [r["body"].get("logprobs") for r in other.requests] == [lp.TOP_LOGPROBS]
        assert backend.replicas.states()[failing.url].startswith("out: HTTP 500")


def test_a_server_capped_at_five_alternatives_is_asked_for_five(server: FakeOpenAI) -> None:
    base = server._handle

    def capped(h: Any, body: dict[str, Any]) -> None:
        if (body.get("logprobs") or 0) > 5:
            return h._send(400, {"error": {"message": "logprobs must be at most 5"}})
        return base(h, body)

    server._handle = capped  # type: ignore[method-assign]
    backend = OpenAIBackend(_spec(server.url))
    assert backend.generate("hi", GenParams(max_tokens=4)).signals is not None
    assert backend.signal_support(probe=False) .top == lp.FEWER_LOGPROBS


def test_an_unreachable_server_is_unknown_and_asked_again_later(tmp_path: Path) -> None:
    with FakeOpenAI() as gone:
        url = gone.url
    spec = _spec(url)
    assert registry.signal_support(spec) == "unknown (not reached)" and not registry.reports_signals(spec)
    with FakeOpenAI() as back:
        spec = _spec(back.url)
        assert registry.signal_support(spec) == "logprobs"


def test_calibrate_and_fit_ask_a_slow_server_with_the_rungs_own_timeout(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe behind `cre calibrate` and `cre fit` (`registry.reports_signals`) had 10 s,
    not the rung's `timeout`: a server slower than that was "not reached", its rung
    calibrated without signals, and the healthy server taken out as hung."""
    from crecli.models import openai

    monkeypatch.setattr(openai, "PROBE_TIMEOUT", 0.2)
    server.delay = 0.6  # slower than the probe's short time, well within the rung's 120 s
    spec = _spec(server.url)
    assert registry.reports_signals(spec) is True
    assert OpenAIBackend(spec).replicas.states()[server.url] == "up"


def test_a_quick_probe_cut_by_its_own_short_time_leaves_the_server_in_rotation(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crecli.models import openai

    monkeypatch.setattr(openai, "PROBE_TIMEOUT", 0.2)
    server.delay = 0.6
    backend = OpenAIBackend(_spec(server.url))
    assert backend.signal_support(timeout=openai.PROBE_TIMEOUT).label == "unknown (not reached)"
    replica = backend.replicas.replicas[0]
    assert replica.healthy and replica.in_flight == 0 and backend.replicas.states()[server.url] == "up"
    server.delay = 0.0
    assert backend.signal_support(timeout=openai.PROBE_TIMEOUT).kind == "logprobs"  # asked again, and known
    # A probe that had half the rung's time or more and got nothing counts, as any try does
    # (`FAIR_SHARE`): that server is hung, not slow.
    server.delay = 0.6
    tight = OpenAIBackend(_spec(server.url, name="tight"), timeout=0.3)
    forget_signal_support()
    assert tight.signal_support(timeout=openai.PROBE_TIMEOUT).label == "unknown (not reached)"
    assert tight.replicas.states()[server.url].startswith("out: timed out")


def test_models_list_shows_each_rungs_signal_support(tmp_path: Path) -> None:
    with FakeOpenAI() as good, FakeOpenAI() as ollama, FakeOpenAI() as dead:
        ollama.logprobs = "drop"
        dead_url = dead.url
        dead.close()
        toml = tmp_path / "models.toml"
        toml.write_text(
            'ladder = ["local", "good", "ollama", "dead"]\n'
            '[models.local]\npath = "/nonexistent/local.gguf"\n'
            f'[models.good]\nurl = "{good.url}"\napi_model = "served"\n'
            f'[models.ollama]\nurl = "{ollama.url}"\napi_model = "served"\n'
            f'[models.dead]\nurl = "{dead_url}"\napi_model = "served"\n'
        )
        rows = json.loads(runner.invoke(app, ["models", "list", "--models", str(toml), "--json"]).stdout)
        table = runner.invoke(app, ["models", "list", "--models", str(toml)])
    shown = {r["name"]: r["signals"] for r in rows if r["on_ladder"]}
    assert shown == {"local": "logprobs", "good": "logprobs", "ollama": "none", "dead": "unknown (not reached)"}
    assert "signals" in table.stdout and "unknown (not" in table.stdout


def test_one_rungs_unusable_api_key_does_not_stop_models_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key holding a line break raised ConfigError, which the probe let out (it caught the
    unset key's BackendError only): `cre models list` exited 1 with no table. It shows the
    rung as unknown, as an unset key; asking it still names the variable."""
    monkeypatch.setenv("CRE_TEST_KEY", "sk-SEC\nRET")
    with FakeOpenAI() as good:
        toml = tmp_path / "models.toml"
        toml.write_text(
            'ladder = ["good", "keyed"]\n'
            f'[models.good]\nurl = "{good.url}"\napi_model = "served"\n'
            f'[models.keyed]\nurl = "{good.url}"\napi_model = "other"\napi_key_env = "CRE_TEST_KEY"\n'
        )
        listed = runner.invoke(app, ["models", "list", "--models", str(toml), "--json"])
        asked = runner.invoke(app, ["ask", "hi", "--models", str(toml), "--model", "keyed"])
    assert listed.exit_code == 0, listed.output
    shown = {r["name"]: r["signals"] for r in json.loads(listed.stdout) if r["on_ladder"]}
    assert shown == {"good": "logprobs", "keyed": "unknown (unusable API key)"}
    assert asked.exit_code != 0 and "$CRE_TEST_KEY holds a control character" in str(asked.exception)
    assert "SEC" not in listed.output + str(asked.exception)


# ---------------------------------------------------------------- a rung without signals is never judged blind

def _needs_signals() -> DeferralCheck:
    names = feature_names(1)
    rule = Deferral(names, (2.0, 3.0, 0.0, -4.0, 1.0), 0.5, (0.0,) * len(names), 0.6)
    return DeferralCheck(1, {"small": rule, "medium": rule})


def test_a_model_that_weighs_signals_cannot_judge_an_answer_without_them() -> None:
    rule = _needs_signals().models["small"]
    assert rule.uses_signals
    assert judge_deferral(rule, None, ["4"], False, 0.7) is None
    assert judge_deferral(rule, Signals(-0.1, -0.05, None), ["4"], False, 0.7) is not None
    # A model fitted where no answer had them weighs them 0, and judges on what it has.
    blind = Deferral(rule.features, (0.0, 0.0, 0.0, -4.0, 1.0), 0.5, rule.fill, 0.6)
    assert not blind.uses_signals and judge_deferral(blind, None, ["4"], False, 0.7) is not None


def test_a_deferral_rung_whose_answers_lack_signals_falls_back_to_agreement_live_and_in_replay(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from crecli.models.fake import FakeBackend

    # small's server returns no log-probabilities; medium's and large's do.
    monkeypatch.setattr(registry, "make_backend", lambda spec: FakeBackend(
        spec, sum_answer(spec.name), signals=None if spec.name == "small" else sum_signals))
    settings = config.load(tiny_models_toml)
    records = sum_records()
    quality = QualityCheck(k=5)
    with OutcomeStore(tmp_path / "store.sqlite") as store:
        found = collect(records, settings, store, quality)
    deferral = _needs_signals()
    thresholds = {"small": 0.55, "medium": 0.45, "large": 0.8}
    router = bare_router(quality, thresholds, deferral)
    live = walk_live(router, settings, records)

    costs = CostModel.build(found.values(), settings.ladder_specs())
    replay = Replay.build(found, records, LADDER, costs)
    p_table: dict[Any, float] = {}
    for record in records:
        for model, rule in deferral.models.items():
            entry = replay.entries[(record.id, model)]
            p = judge_deferral(rule, entry.signals, entry.answers[:1], entry.cut, router.prior(-1, model))
            if p is not None:
                p_table[(record.id, model)] = p
    replayed = replay.simulate({r.id: s for r, s in zip(records, STARTS)}, thresholds, quality,
                               p_correct=p_table, votes=1).traces

    small_steps = [s for t in live for s in t.steps if s.model == "small"]
    assert small_steps and all(s.p_correct is None and "no log-probabilities from small" in s.why for s in small_steps)
    assert all(s.threshold == 0.6 for s in small_steps)  # the agreement fallback's threshold
    assert any(s.used > 1 for s in small_steps)  # it drew votes to agree on
    medium = [s for t in live for s in t.steps if s.model == "medium"]
    assert medium and all(s.p_correct is not None for s in medium)
    for trace, sim in zip(live, replayed):
        assert [s.model for s in trace.steps] == [s.model for s in sim.steps], trace.id
        for step, s in zip(trace.steps, sim.steps):
            assert (step.used, step.accepted, step.agreement) == (s.used, s.accept, s.agreement), (trace.id, step.model)
        assert grading.normalize(trace.answer, "numeric") == sim.answer


def _small(text: str, params: GenParams) -> str:
    import re

    numbers = [int(n) for n in re.findall(r"\d+", text.split("<|im_start|>user")[-1])]
    total = sum(numbers[-2:]) if len(numbers) >= 2 else 0
    if params.temperature:  # votes: right on small numbers, scattered on the others
        return str(total) if numbers and numbers[-2] < 15 else str(random.Random(params.seed).randint(0, 99))
    return str(total) if numbers and numbers[-2] < 15 else "0"


def _two_of_three(text: str, params: GenParams) -> str:
    """Right on the greedy vote and vote 1, wrong on vote 2: three votes agree 2 to 1."""
    from crecli.quality import vote_seed
    from support.ladder import user_prompt

    right = _small(text, GenParams())
    prompt = user_prompt(text)
    return right if not params.seed or params.seed == vote_seed(prompt, 1) else right + "1"


def test_calibrate_gives_a_rung_without_signals_the_agreement_check_and_says_so(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def confidence(text: str, params: GenParams, answer: str) -> Signals:
        return Signals(-0.05 if answer != "0" else -3.0, -0.02 if answer != "0" else -1.5, None)

    fake_backends({"small": _small, "medium": _two_of_three, "large": _small}, signals=confidence)
    # medium is served by an engine that returns no log-probabilities.
    monkeypatch.setattr(registry, "reports_signals", lambda spec: spec.name != "medium")
    log = write_sums_log(tmp_path / "log.jsonl", 30, offset=1)
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    assert runner.invoke(app, ["fit", str(log), "-o", str(router), *m, "--k", "3"]).exit_code == 0
    result = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "deferral", "--json"])
    assert result.exit_code == 0, result.output
    assert "rung 'medium' gives no log-probabilities" in " ".join(result.stderr.split())
    cal = json.loads(result.stdout)
    assert set(cal["deferral"]["models"]) == {"small"} and cal["deferral"]["agreement"] == ["medium"]
    assert cal["thresholds"]["medium"] in [j / 3 for j in range(4)]  # an agreement threshold of 3 votes

    loaded = config.load(tiny_models_toml)
    from crecli import routerfile

    saved = routerfile.load(router, loaded)
    assert saved.deferral is not None and saved.deferral.agreement == ("medium",)
    shown = json.loads(runner.invoke(app, ["inspect", str(router), *m, "--json"]).stdout)
    assert shown["checks"] == {"small": DEFERRAL, "medium": AGREEMENT, "large": "greedy"}
    text = " ".join(runner.invoke(app, ["inspect", str(router), *m]).stdout.split())
    assert "agreement-only (no log-probabilities" in text and "medium" in text.split("agreement-only")[1]

    # Live and replay agree on the mixed ladder.
    report = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(router), *m, "--live", "--json"]).stdout)
    assert report["live"]["agreement"] == 1.0

    # Every query through medium, whose 3 votes agree 2 to 1, at its threshold 1.0: it keeps
    # nothing, live and in `cre eval`'s replay (not the 0.6 of a deferral rung's fallback).
    from dataclasses import replace

    strict = tmp_path / "strict.cre"
    routerfile.save(replace(saved, thresholds={**saved.thresholds, "small": 1.0, "medium": 1.0}, fallback_model="small",
                            clusters=[replace(c, model="small", thresholds={}) for c in saved.clusters]), strict)
    report = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(strict), *m, "--live", "--json"]).stdout)
    assert report["live"]["agreement"] == 1.0 and report["cascade"]["answered_by"].get("medium", 0) == 0
    ask = json.loads(runner.invoke(app, ["ask", "What is 30 plus 31?", "--router", str(strict), *m, "--json",
                                         "--no-log"]).stdout)
    medium = next(s for s in ask["steps"] if s["model"] == "medium")
    assert medium["p_correct"] is None and medium["why"].startswith("agreement 0.67 (2/3) < threshold 1.00")


def test_a_router_file_names_its_agreement_rungs_and_refuses_a_rung_with_both(tmp_path: Path) -> None:
    from crecli.fields import Field, FieldError
    from crecli.schema import _deferral

    rules = _needs_signals()
    body = {**rules.to_dict(), "agreement": ["large"]}
    parsed = _deferral(Field(body, "deferral"))
    assert parsed.agreement == ("large",) and set(parsed.models) == {"small", "medium"}
    assert "agreement" not in rules.to_dict()  # nothing written when there is none
    with pytest.raises(FieldError, match="also has a deferral model"):
        _deferral(Field({**rules.to_dict(), "agreement": ["small"]}, "deferral"))


def test_only_a_deferral_rung_asks_its_server_for_log_probabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FakeOpenAI
) -> None:
    """Signals cost the server a sort of its vocabulary a token; a rung whose check reads
    none (agreement, the top rung's greedy answer) does not ask for them."""
    from crecli.escalate import Cascade
    from crecli.models.fake import FakeBackend
    from support.routers import FAR, make_router

    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["small", "medium", "large"]\n[embedder]\nkind = "tfidf"\ndims = 16\n'
                    '[models.small]\npath = "/x/s.gguf"\n[models.medium]\npath = "/x/m.gguf"\n'
                    f'[models.large]\nurl = "{server.url}"\napi_model = "served"\nprompt_format = "chat"\n')
    monkeypatch.setattr(registry, "make_backend", lambda spec: OpenAIBackend(spec) if spec.url else FakeBackend(spec))
    with Cascade(make_router(), config.load(toml)) as cascade:
        trace = cascade.ask(FAR)  # far from every cluster: the top rung, greedy, answers
    assert trace.model == "large" and server.requests
    assert all("logprobs" not in r["body"] for r in server.requests)


def test_calibrate_finds_out_from_the_server_itself_that_a_rung_has_no_signals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: FakeOpenAI
) -> None:
    """The whole path with a real HTTP server in the middle rung that drops log-probabilities,
    as Ollama's OpenAI endpoint does: `cre calibrate` asks it and gives it the agreement check."""
    import re

    from crecli.models.fake import FakeBackend

    def sums(prompt: str, body: dict[str, Any]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        return str(sum(numbers[:2])) if numbers else "(A)"  # the probe asks a lettered question

    server.answer = sums
    server.logprobs = "drop"

    def confidence(text: str, params: GenParams, answer: str) -> Signals:
        return Signals(-0.05 if answer != "0" else -3.0, -0.02 if answer != "0" else -1.5, None)

    monkeypatch.setattr(registry, "make_backend", lambda spec: OpenAIBackend(spec) if spec.url else
                        FakeBackend(spec, _small, signals=confidence))
    toml = tmp_path / "models.toml"
    toml.write_text('ladder = ["small", "medium", "large"]\n[embedder]\nkind = "tfidf"\ndims = 16\n'
                    '[models.small]\npath = "/x/s.gguf"\nprompt_format = "completion"\n[models.large]\npath = "/x/l.gguf"\n'
                    f'[models.medium]\nurl = "{server.url}"\napi_model = "served"\nprompt_format = "chat"\n')
    log = write_sums_log(tmp_path / "log.jsonl", 24, offset=1)
    router = tmp_path / "router.cre"
    m = ("--models", str(toml))
    fitted = runner.invoke(app, ["fit", str(log), "-o", str(router), *m])
    assert fitted.exit_code == 0, fitted.output
    result = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "deferral", "--json"])
    assert result.exit_code == 0, result.output
    assert "rung 'medium' gives no log-probabilities (its server returns none)" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["deferral"]["agreement"] == ["medium"]
    listed = json.loads(runner.invoke(app, ["models", "list", *m, "--json"]).stdout)
    assert {r["name"]: r["signals"] for r in listed if r["on_ladder"]} == {"small": "logprobs", "medium": "none",
                                                                            "large": "logprobs"}


def test_a_deferral_rung_left_unchecked_by_a_server_without_logprobs_is_said_once(
    tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With a router fitted at --k 1 (the default), a rung moved to a server that gives no
    # log-probabilities falls back to agreement on one vote, which always agrees: every answer
    # was kept, and only --explain's `why` said so.
    from crecli import live as live_module
    from crecli.models.fake import FakeBackend

    monkeypatch.setattr(live_module, "_SAID", set())
    monkeypatch.setattr(registry, "make_backend", lambda spec: FakeBackend(
        spec, sum_answer(spec.name), signals=None if spec.name == "small" else sum_signals))
    settings = config.load(tiny_models_toml)
    records = sum_records()
    router = bare_router(QualityCheck(k=1), {"small": 0.55, "medium": 0.45, "large": 0.8}, _needs_signals())
    traces = walk_live(router, settings, records)
    assert any(s.model == "small" and s.accepted and s.p_correct is None for t in traces for s in t.steps)
    err = capsys.readouterr().err
    assert err.count("small gave no log-probabilities") == 1 and "on 1 vote accepts every non-empty answer" in err
    assert "medium gave no" not in err


def test_models_list_probes_quickly_and_calibration_with_the_rungs_own_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cre models list` must not wait a hung server's whole `timeout` (600 s in scale.md's
    example) per rung; `cre fit` and `cre calibrate` give a slow server all of it."""
    from crecli.models import catalog, openai, registry
    from crecli.models.openai import OpenAIBackend, SignalSupport

    asked: list[float | None] = []

    def probe(self: OpenAIBackend, probe: bool = True, timeout: float | None = None) -> SignalSupport:
        asked.append(timeout)
        return SignalSupport("unknown", detail="not reached")

    monkeypatch.setattr(OpenAIBackend, "signal_support", probe)
    spec = ModelSpec(name="remote", url="http://127.0.0.1:9/v1", api_model="m", timeout=600.0, defined_in="t.toml")
    registry.signal_support(spec)
    settings = config.ModelConfig(models={"remote": spec}, ladder=["remote"])
    catalog.rows(settings)
    assert asked == [None, openai.PROBE_TIMEOUT]
