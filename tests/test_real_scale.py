"""Issue 25 on a real engine: gemma-3-270m served by llama.cpp's llama-server (or
llama-cpp-python's server when no llama-server is built; `tests/support/engines.py`).

- Signal parity: the remote rung's deferral features and P(correct) against the in-process
  backend's on the same GGUF, on 50 prompts of examples/querylog.jsonl, through
  llama-cpp-python's server (see the test for why not llama-server). The measured
  differences are printed (run with -s) and written to $CRE_PARITY_OUT when it is set.
- A server without log-probabilities (llama-cpp-python's server without `logits_all`): the
  rung shows "none" and a deferral rung on it runs the agreement check.
- Two replicas of the top rung, one killed (SIGKILL) under load: no request is lost.

    CRE_REQUIRE_REAL=1 .venv/bin/python -m pytest tests/test_real_scale.py -m real -s
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from typer.testing import CliRunner

from crecli import config, grading, paths, routerfile
from crecli.cli import app
from crecli.config import ModelSpec
from crecli.escalate import Cascade
from crecli.models import replicas
from crecli.models.backend import GenParams
from crecli.models.llama import LlamaBackend
from crecli.models.openai import OpenAIBackend
from crecli.quality import DeferralCheck, QualityCheck, deferral_features, judge_deferral, vote_params, was_cut
from crecli.route import RouteDecision, route
from crecli.routerfile import FitRecord, LadderEntry, RouterFile
from support.engines import ALIAS, engine
from support.scale import fresh_remote
from support.serving import serving

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "examples" / "querylog.jsonl"
MODEL = "gemma-3-270m"

# The agreement asked of the two backends, per prompt whose answers are the same text (a
# different answer is a different generation; the test counts those apart). Measured on an
# AMX Xeon through llama-cpp-python's server, repeat penalty off (docs/scale.md): 50 of 50
# answers the same; P(correct) differed by at most 0.0014, the lowest log-prob by 0, the
# mean by 0.0003, the option margin by 0.017 (the server lists 20 alternatives a token, so
# its margin is renormalised over fewer letters; largest on answers that list many). The
# bounds leave room for other CPUs and engines: llama-server also leaves out the
# log-probabilities of a stop string's tokens it cut, which the in-process meter reads.
P_TOLERANCE = 0.01
MARGIN_TOLERANCE = 0.05
LOGPROB_TOLERANCE = 0.05
SAME_TEXT_AT_LEAST = 45  # of 50


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fresh_remote(monkeypatch)
    yield
    replicas.forget()


def fifty() -> list[dict[str, Any]]:
    """50 labelled queries spread over the log's tasks (every n-th line)."""
    lines = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    step = max(1, len(lines) // 50)
    return lines[::step][:50]


def test_a_remote_rungs_signals_match_the_in_process_backends_on_50_prompts(gemma: ModelSpec, tmp_path: Path) -> None:
    router = routerfile.load(paths.shipped_router(), config.load())
    assert router.deferral is not None and MODEL in router.deferral.models
    rule = router.deferral.models[MODEL]
    quality = QualityCheck()
    local = LlamaBackend(gemma)
    rows = []
    try:
        # llama-cpp-python's server, even where llama-server is built: llama-server's
        # log-probabilities differ from the in-process ones by more than cre's reading of
        # them can explain (docs/scale.md: measured, cause not found), so the bounds below
        # would test the engine, not cre.
        with engine(gemma.file, tmp_path / "engine.log", kind="python", parallel=1, context=gemma.context) as eng:  # type: ignore[arg-type]
            # repeat_penalty 1.0: llama-cpp-python's server (the fallback engine) penalises
            # repeats unless told, and its greedy answers then differ from in-process ones.
            remote = OpenAIBackend(ModelSpec(name="remote", url=eng.url, api_model=ALIAS, prompt_format=gemma.prompt_format,
                                             context=gemma.context, repeat_penalty=1.0, defined_in="test"), timeout=600)
            assert remote.signal_support().kind == "logprobs", eng.tail()
            for record in fifty():
                match = record.get("match")
                decision = route(router, record["prompt"])
                prior = router.prior(decision.cluster, MODEL, decision.distance)
                params = vote_params(quality, 0, grading.max_tokens_for(match), record["prompt"],
                                     router.shots(decision.cluster, MODEL))
                row: dict[str, Any] = {"id": record["id"], "match": match}
                for side, backend in (("local", local), ("remote", remote)):
                    gen = backend.generate(record["prompt"], params)
                    answer = grading.normalize(gen.text, match)
                    cut = was_cut(gen.output_tokens, params.max_tokens, gen.prompt_tokens, backend.spec.context_window)
                    row[side] = {"text": gen.text, "signals": gen.signals.to_list() if gen.signals else None,
                                 "features": deferral_features(gen.signals, [answer], cut, prior),
                                 "p_correct": judge_deferral(rule, gen.signals, [answer], cut, prior)}
                rows.append(row)
            kind = eng.kind
    finally:
        local.close()

    same = [r for r in rows if r["local"]["text"] == r["remote"]["text"]]

    def gap(key: str, i: int | None = None) -> list[float]:
        out = []
        for r in same:
            a, b = r["local"][key], r["remote"][key]
            if i is not None:
                a, b = a[i], b[i]
            if a is not None and b is not None:
                out.append(abs(a - b))
        return out

    report = {
        "engine": kind, "prompts": len(rows), "same_text": len(same),
        "p_correct": _summary(gap("p_correct")),
        "min_logprob": _summary(gap("features", 0)), "mean_logprob": _summary(gap("features", 1)),
        "margin": _summary(gap("features", 2)), "rows": rows,
    }
    print("\nsignal parity, |in-process - remote| over prompts with the same answer:")
    for key in ("p_correct", "min_logprob", "mean_logprob", "margin"):
        print(f"  {key:13s} {report[key]}")
    print(f"  same answer text: {len(same)}/{len(rows)} ({kind})")
    if os.environ.get("CRE_PARITY_OUT"):
        Path(os.environ["CRE_PARITY_OUT"]).write_text(json.dumps(report, indent=2))

    assert all(r["remote"]["signals"] is not None for r in rows), "the server returned no log-probabilities"
    assert len(same) >= SAME_TEXT_AT_LEAST, [(r["id"], r["local"]["text"], r["remote"]["text"]) for r in rows if r not in same]
    assert report["p_correct"]["max"] <= P_TOLERANCE, report["p_correct"]
    assert report["margin"]["n"] > 0 and report["margin"]["max"] <= MARGIN_TOLERANCE, report["margin"]
    assert report["min_logprob"]["max"] <= LOGPROB_TOLERANCE and report["mean_logprob"]["max"] <= LOGPROB_TOLERANCE


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "max": 0.0, "p50": 0.0, "p95": 0.0}
    ordered = sorted(values)
    return {"n": len(values), "max": round(ordered[-1], 5), "p50": round(statistics.median(ordered), 5),
            "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 5)}


def test_a_server_without_log_probabilities_is_shown_and_gets_the_agreement_check(
    gemma: ModelSpec, tmp_path: Path
) -> None:
    with engine(gemma.file, tmp_path / "engine.log", kind="python", logprobs=False) as eng:  # type: ignore[arg-type]
        toml = tmp_path / "models.toml"
        toml.write_text(f'ladder = ["remote", "{MODEL}"]\n[models.remote]\nurl = "{eng.url}"\napi_model = "{ALIAS}"\n'
                        'prompt_format = "completion"\n')
        listed = CliRunner().invoke(app, ["models", "list", "--models", str(toml), "--json"])
        assert listed.exit_code == 0, listed.output
        assert {r["name"]: r["signals"] for r in json.loads(listed.stdout)}["remote"] == "none", eng.tail()
        settings = config.load(toml)
        gen = OpenAIBackend(settings.get("remote")).generate("What is 2 plus 2?", GenParams(max_tokens=8))
        assert gen.text.strip() and gen.signals is None

        # A deferral router whose model for this rung reads log-probabilities: the rung
        # runs the agreement check instead, and its step says so.
        shipped = routerfile.load(paths.shipped_router(), config.load())
        assert shipped.deferral is not None
        rule = shipped.deferral.models[MODEL]
        router = RouterFile(
            schema_version=routerfile.SCHEMA_VERSION, ladder=[LadderEntry("remote", None, None), LadderEntry(MODEL, None, None)],
            embedder=None, assigner=None, clusters=[], fallback_model=MODEL,  # type: ignore[arg-type]
            budget={"kind": "retain", "value": 0.98}, quality=QualityCheck(k=3), thresholds={"remote": 0.5, MODEL: 0.0},
            fit=FitRecord(), deferral=DeferralCheck(1, {"remote": rule}),
        )
        with Cascade(router, settings) as cascade:
            pending = cascade.begin("What is 2 plus 2?", decision=RouteDecision(-1, "remote", 0.0, "test", 0.0))
            cascade.advance(pending)
        step = pending.trace.steps[0]
    assert step.model == "remote" and step.p_correct is None and "no log-probabilities from remote" in step.why
    assert step.threshold == 0.6 and 1 <= step.used <= 3  # the agreement check's fallback, on up to k=3 votes


def replicated_ladder(folder: Path, urls: list[str], prompts: list[str]) -> tuple[Path, Path]:
    """A ladder of gemma in process and a remote top rung on `urls`, and a router fitted on
    `prompts` as plain text (no model runs: every cluster starts on the strongest rung)."""
    toml = folder / "models.toml"
    toml.write_text(f'ladder = ["{MODEL}", "remote"]\n[models.remote]\nurl = {json.dumps(urls)}\napi_model = "{ALIAS}"\n'
                    'prompt_format = "completion"\nmax_in_flight = 2\nrepeat_penalty = 1.0\n')
    log = folder / "prompts.txt"
    log.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    router = folder / "remote.cre"
    fitted = CliRunner().invoke(app, ["fit", str(log), "-o", str(router), "--models", str(toml), "--json"])
    assert fitted.exit_code == 0, fitted.output
    return router, toml


def test_a_replica_killed_mid_load_loses_no_request(gemma: ModelSpec, tmp_path: Path) -> None:
    with engine(gemma.file, tmp_path / "a.log", parallel=2) as first, \
            engine(gemma.file, tmp_path / "b.log", parallel=2) as second:  # type: ignore[arg-type]
        prompts = [r["prompt"] for r in fifty()]
        router, toml = replicated_ladder(tmp_path, [first.url, second.url], prompts)
        prompts = prompts[:24]
        results: list[int] = []
        lock = threading.Lock()
        answered = threading.Event()
        with Cascade.from_file(router, toml) as cascade, serving(cascade) as url:
            def client(mine: list[str]) -> None:
                for prompt in mine:
                    code = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                                      json={"model": "cre", "messages": [{"role": "user", "content": prompt}]}).status_code
                    with lock:
                        results.append(code)
                        if len(results) >= 4:
                            answered.set()

            def killer() -> None:
                answered.wait(600)
                first.kill()

            threads = [threading.Thread(target=client, args=(prompts[i::4],)) for i in range(4)]
            threads.append(threading.Thread(target=killer))
            for t in threads:
                t.start()
            for t in threads:
                t.join(1200)
            health = httpx.get(f"{url}/health").json()
    assert first.proc.returncode is not None  # it was killed under load
    assert results == [200] * len(prompts), (results, second.tail())
    # Killed, it never answers again: out, whether or not its back-off has passed.
    assert health["models"]["remote"] == "remote, 1 of 2 servers out"


def test_llama_cpp_streams_the_top_rungs_tokens_as_it_generates_them(gemma: ModelSpec, tmp_path: Path) -> None:
    """The in-process backend hands on each token one step late (its logits processor sees
    a token when the next is computed): several content events, joined into the same
    answer as the one sent whole."""
    toml = tmp_path / "models.toml"
    toml.write_text(f'ladder = ["{MODEL}"]\n')
    log = tmp_path / "prompts.txt"
    log.write_text("\n".join(r["prompt"].replace("\n", " ") for r in fifty()) + "\n")
    router = tmp_path / "gemma.cre"
    fitted = CliRunner().invoke(app, ["fit", str(log), "-o", str(router), "--models", str(toml), "--json"])
    assert fitted.exit_code == 0, fitted.output
    question = "Name three primary colours."
    with Cascade.from_file(router, toml) as cascade, serving(cascade) as url:
        # The first request computes the whole prompt; later ones reuse its cached tokens,
        # which can tip a near-tie (measured: ' red, blue, yellow, green' first, then
        # ' red, blue, yellow' every time). So the answer compared is one made in the state
        # the stream is made in, after a first request.
        for _ in range(2):
            whole = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                               json={"model": "cre", "messages": [{"role": "user", "content": question}]}).json()
        pieces = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300,
                          json={"model": "cre", "stream": True, "messages": [{"role": "user", "content": question}]}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0]["delta"].get("content"):
                        pieces.append(event["choices"][0]["delta"]["content"])
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert len(pieces) >= 2, pieces
