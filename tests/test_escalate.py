"""The cascade: lazy votes, early stop, escalation iff agreement < threshold, traces, `cre ask`.

Models are FakeBackends on the tiny small/medium/large ladder; the router is built in
memory from a real TF-IDF embedder and k-NN assigner fitted on three topics of prompts
(`support.routers.make_router`, the conftest's `router`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config, grading, routerfile
from crecli.cli import app
from crecli.escalate import Cascade, check
from crecli.quality import vote_params
from crecli.models.backend import GenParams
from crecli.models.fake import FakeBackend
from crecli.quality import QualityCheck, vote_seed
from crecli.routerfile import RouterFile
from support.ladder import LADDER, install, scripted
from support.routers import ADDITIONS, FAR, make_router


@pytest.fixture
def settings(tiny_models_toml: Path) -> config.ModelConfig:
    return config.load(tiny_models_toml)


def test_agreeing_votes_are_accepted_on_the_start_model_with_the_fewest_votes(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    created = install(fake_backends, {"small": {"What is 7 plus 5?": ["12"] * 5}})
    trace = Cascade(router, settings).ask("What is 7 plus 5?")

    assert (trace.cluster, trace.start_model, trace.model, trace.answer) == (0, "small", "small", "12")
    assert trace.escalations == 0 and len(trace.steps) == 1
    step = trace.steps[0]
    assert (step.used, step.agreement, step.accepted, step.threshold) == (3, 1.0, True, 0.6)
    calls = [params for _, params in created["small"].calls]
    assert len(calls) == 3  # ceil(0.6 * 5) agreeing votes fix the decision
    cap = grading.max_tokens_for("numeric")  # the cluster's answer type
    seeds = [vote_seed("What is 7 plus 5?", i) for i in (1, 2)]
    assert [(p.temperature, p.seed, p.max_tokens) for p in calls] == [(0.0, 0, cap), (0.7, seeds[0], cap), (0.7, seeds[1], cap)]
    assert "medium" not in created and "large" not in created


@pytest.mark.parametrize(
    ("votes", "threshold", "used", "agreement"),
    [
        (["7", "7", "8", "7", "9"], 0.6, 4, 0.75),  # 3 of 4 reach need=3: accept
        (["7", "8", "9", "7", "6"], 0.6, 5, 0.4),  # the majority can no longer reach 3
        (["7", "8", "9", "7", "6"], 0.4, 4, 0.5),  # need=2: the 4th vote settles it
        (["7", "8", "9", "6", "5"], 0.4, 5, 0.2),  # all differ: the 5th vote could still pair up
        (["7", "7", "7", "7", "7"], 1.0, 5, 1.0),  # need=5: every vote
    ],
)
def test_escalation_happens_iff_agreement_is_below_the_threshold(
    fake_backends: Callable[..., dict[str, FakeBackend]], settings: config.ModelConfig,
    votes: list[str], threshold: float, used: int, agreement: float,
) -> None:
    install(fake_backends, {"small": {"What is 12 plus 30?": votes}, "medium": {"What is 12 plus 30?": ["42"] * 5}})
    router = make_router({"small": threshold, "medium": 0.6, "large": 0.0})
    trace = Cascade(router, settings).ask("What is 12 plus 30?")

    first = trace.steps[0]
    assert (first.model, first.used, first.agreement) == ("small", used, agreement)
    escalated = agreement < threshold
    assert first.accepted is not escalated
    assert trace.escalations == int(escalated)
    assert trace.model == ("medium" if escalated else "small")
    assert ("escalate to medium" in first.why) is escalated


def test_the_top_rung_answer_is_final_even_below_its_threshold(
    fake_backends: Callable[..., dict[str, FakeBackend]], settings: config.ModelConfig
) -> None:
    split = ["1", "2", "3", "4", "5"]
    prompt = "What is 8 plus 9?"
    install(fake_backends, {m: {prompt: split} for m in LADDER})
    router = make_router({"small": 0.6, "medium": 0.6, "large": 0.6})
    trace = Cascade(router, settings).ask(prompt)

    assert [s.model for s in trace.steps] == LADDER
    assert [s.accepted for s in trace.steps] == [False, False, False]
    assert (trace.model, trace.answer, trace.escalations) == ("large", "1", 2)
    assert "top rung" in trace.steps[-1].why


def test_an_empty_answer_is_explained_as_empty_not_as_agreement_below_the_threshold(
    fake_backends: Callable[..., dict[str, FakeBackend]], settings: config.ModelConfig
) -> None:
    # Every vote agreeing on nothing read "agreement 1.00 (3/3) < threshold 0.60".
    prompt = "What is 8 plus 9?"
    install(fake_backends, {"small": {prompt: ["", "", "", "", ""]}, "medium": {prompt: ["17"] * 5}})
    trace = Cascade(make_router({"small": 0.6, "medium": 0.6, "large": 0.6}), settings).ask(prompt)
    small = trace.steps[0]
    assert not small.accepted and small.why.startswith("agreement 1.00 (")
    assert ", but no answer could be read from it: escalate to medium" in small.why and "< threshold" not in small.why


def test_top_rung_threshold_zero_draws_only_the_greedy_vote(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    created = install(fake_backends, {"large": {FAR: ["a", "b", "c", "d", "e"]}})
    trace = Cascade(router, settings).ask(FAR)
    assert len(created["large"].calls) == 1
    assert (trace.model, trace.answer, trace.steps[0].used, trace.steps[0].accepted) == ("large", "a", 1, True)


@pytest.mark.parametrize(("early_stop", "calls"), [(True, 4), (False, 5)])
def test_early_stop_draws_the_fewest_votes(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig,
    early_stop: bool, calls: int,
) -> None:
    # Four different answers: after the 4th, no answer can reach 3 of 5 any more.
    created = install(fake_backends, {"small": {"What is 9 plus 1?": ["1", "2", "3", "4", "4"]}})
    cascade = Cascade(router, settings, quality=QualityCheck(early_stop=early_stop))
    trace = cascade.ask("What is 9 plus 1?")
    assert len(created["small"].calls) == calls == trace.steps[0].used


@pytest.mark.parametrize(
    ("top", "early_stop", "votes", "streamed"),
    [
        # Threshold 0: the greedy answer is final as it comes, so it streams.
        (0.0, True, ["I don't know", "7", "7", "7", "7"], "I don't know"),
        # One vote meets 0.2 of 5, but an empty one (no number) does not: vote 1 decides.
        (0.2, True, ["I don't know", "7", "7", "7", "7"], ""),
        # Without early stopping every vote is drawn, and the majority outvotes the greedy one.
        (0.0, False, ["8", "7", "7", "7", "7"], ""),
    ],
)
def test_the_top_rung_streams_only_an_answer_no_later_vote_can_outvote(
    fake_backends: Callable[..., dict[str, FakeBackend]], settings: config.ModelConfig,
    top: float, early_stop: bool, votes: list[str], streamed: str,
) -> None:
    # Streamed text is sent for good (`cre serve`): it once went out as the greedy vote's,
    # and the answer the later votes chose came after it, the client left with the wrong one.
    prompt = ADDITIONS[0]  # a numeric cluster, which starts on large here
    install(fake_backends, {"large": {prompt: votes}})
    router = make_router({"small": 0.6, "medium": 0.6, "large": top}, starts=("large", "medium", "small"))
    cascade = Cascade(router, settings, quality=QualityCheck(early_stop=early_stop))
    pending = cascade.begin(prompt)
    pieces: list[str] = []
    pending.stream = pieces.append
    cascade.advance(pending, rungs=None)
    assert [s.model for s in pending.trace.steps] == ["large"]
    assert "".join(pieces) == streamed
    assert pending.trace.answer == (streamed or "7")


def test_check_is_usable_on_its_own() -> None:
    spec = config.ModelSpec(name="m", path="/nonexistent")
    backend = FakeBackend(spec, scripted({"Pick one": ["B", "(B)", "b)", "C", "A"]}))
    step = check(backend, "Pick one", QualityCheck(), 0.6, 8, "choice")
    assert step.normalized == ["B", "B", "B"] and step.accepted and step.answer == "B"
    assert step.prompt_tokens == len(backend.calls[0][0].split())  # counted once, from vote 0
    assert step.output_tokens == 3


def test_trace_holds_raw_answer_tokens_seconds_and_correctness(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    prompt = "What is 15 plus 15?"
    install(fake_backends, {
        "small": {prompt: [" 31", "30", "29", "28", "27"]},  # escalates: all differ
        "medium": {prompt: [" 31\n", "The answer is 30.", "30", "thirty", "31"]},
    })
    trace = Cascade(router, settings).ask(prompt, reference=["30"])

    small, medium = trace.steps
    assert small.votes == [" 31", "30", "29", "28"] and not small.accepted
    assert "agreement 0.25 (1/4) < threshold 0.60: escalate to medium" == small.why
    assert medium.normalized == ["31", "30", "30", "30"] and medium.accepted
    # The raw text of the first vote that gave the majority, stripped.
    assert (trace.answer, trace.model, trace.agreement) == ("The answer is 30.", "medium", 0.75)
    assert trace.correct is True
    assert trace.prompt_tokens == small.prompt_tokens + medium.prompt_tokens
    assert trace.output_tokens == small.output_tokens + medium.output_tokens
    assert trace.seconds == pytest.approx(trace.route_seconds + small.seconds + medium.seconds)
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["steps"][1]["votes"][1] == "The answer is 30." and data["fallback"] is False
    assert data["correct"] is True and data["escalations"] == 1


def test_match_overrides_the_cluster_answer_type(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    created = install(fake_backends, {"small": {"What is 3 plus 4?": ["7"] * 5}})
    trace = Cascade(router, settings).ask("What is 3 plus 4?", match="exact", reference="7")
    assert trace.answer_type == "exact" and trace.correct is True
    assert created["small"].calls[0][1].max_tokens == grading.max_tokens_for("exact")


def test_per_cluster_threshold_override(
    fake_backends: Callable[..., dict[str, FakeBackend]], settings: config.ModelConfig
) -> None:
    prompt = "What is 21 plus 4?"
    install(fake_backends, {"small": {prompt: ["25", "25", "26", "27", "28"]}, "medium": {prompt: ["25"] * 5}})
    strict = make_router(cluster_thresholds={0: {"small": 1.0}})
    trace = Cascade(strict, settings).ask(prompt)
    assert trace.steps[0].threshold == 1.0 and trace.model == "medium"


def test_far_prompt_goes_to_the_fallback_model(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    install(fake_backends, {"large": {FAR: ["ok"] * 5}})
    trace = Cascade(router, settings).ask(FAR)
    assert (trace.cluster, trace.start_model, trace.model, trace.fallback) == (-1, "large", "large", True)
    assert "far from every cluster" in trace.route_reason
    assert trace.answer_type is None  # unknown: the generic normaliser and cap


def test_votes_for_one_prompt_on_one_model_are_consecutive(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig
) -> None:
    log: list[tuple[str, str, GenParams]] = []
    prompt = "What is 40 plus 2?"
    install(fake_backends, {"small": {prompt: ["1", "2", "3", "4", "5"]},
                            "medium": {prompt: ["42", "41", "40", "39", "38"]},
                            "large": {prompt: ["42"] * 5}}, log)
    Cascade(router, settings).ask(prompt)
    models = [m for m, _, _ in log]
    assert models == ["small"] * 4 + ["medium"] * 4 + ["large"]
    seeds = [0] + [vote_seed(prompt, i) for i in (1, 2, 3)]
    assert [p.seed for _, _, p in log] == seeds + seeds + [0]


def test_vote_params_match_the_recorded_outcomes() -> None:
    quality = QualityCheck(temperature=0.5, top_p=0.9, top_k=20)
    assert vote_params(quality, 0, 8, "q") == GenParams(max_tokens=8, temperature=0.0, top_p=0.9, top_k=20, seed=0)
    assert vote_params(quality, 3, 8, "q") == GenParams(max_tokens=8, temperature=0.5, top_p=0.9, top_k=20, seed=vote_seed("q", 3))
    # Seeds differ between prompts, so vote i's random draws are not shared by every query.
    assert vote_params(quality, 3, 8, "q").seed != vote_params(quality, 3, 8, "r").seed


def test_from_file_loads_a_saved_router(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, tmp_path: Path, tiny_models_toml: Path
) -> None:
    path = tmp_path / "router.cre"
    routerfile.save(router, path)
    install(fake_backends, {"medium": {"What is the capital city of Peru?": ["Lima"] * 5}})
    with Cascade.from_file(path, models_file=tiny_models_toml) as cascade:
        trace = cascade.ask("What is the capital city of Peru?")
    assert (trace.cluster, trace.model, trace.answer) == (1, "medium", "Lima")


# ---------------------------------------------------------------- cre ask


def _ask(args: list[str], models_toml: Path, input: str | None = None) -> Any:
    return CliRunner().invoke(app, ["ask", *args, "--models", str(models_toml)], input=input)


def test_cli_ask_routes_an_argument(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, {"small": {"What is 6 plus 6?": ["12"] * 5}})
    result = _ask(["What is 6 plus 6?", "--router", str(saved_router)], tiny_models_toml)
    assert result.exit_code == 0, result.output
    assert result.stdout == "12\n"
    assert "small" in result.stderr


def test_cli_ask_prints_the_answer_as_the_model_wrote_it(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    # Rich, even with markup off, printed `:100:` as an emoji and a tab as spaces.
    install(fake_backends, {"small": {"What is 6 plus 6?": ["a[1:100:2]\tb :x:"] * 5}})
    result = _ask(["What is 6 plus 6?", "--router", str(saved_router)], tiny_models_toml)
    assert result.exit_code == 0, result.output
    assert result.stdout == "a[1:100:2]\tb :x:\n"


def test_an_answer_on_a_terminal_shows_control_characters_as_escapes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from crecli import render

    render.answer_text("red\x1b[31m\tok\ud800")
    assert capsys.readouterr().out == "red\x1b[31m\tok?\n"  # piped: as written, bar what cannot be encoded
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    render.answer_text("red\x1b[31m\tok")
    assert capsys.readouterr().out == "red\\x1b[31m\tok\n"


def test_cli_ask_reads_stdin_and_explains_on_stderr(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    prompt = "What is 33 plus 32?"
    install(fake_backends, {"small": {prompt: ["65", "64", "63", "62", "61"]}, "medium": {prompt: ["65"] * 5}})
    result = _ask(["-", "--router", str(saved_router), "--explain"], tiny_models_toml, input=prompt + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "65\n"
    err = result.stderr
    assert "cluster 0" in err and "step 1 small" in err and "step 2 medium" in err
    assert "escalate to medium" in err and "agreement 0.25 (1/4)" in err and "1 escalation" in err


def test_cli_ask_json_prints_the_whole_trace(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, {"large": {FAR: ["fine"] * 5}})
    result = _ask([FAR, "--router", str(saved_router), "--json"], tiny_models_toml)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["answer"], data["model"], data["cluster"], data["fallback"]) == ("fine", "large", -1, True)
    assert data["steps"][0]["votes"] == ["fine"]


def test_cli_ask_uses_your_default_router_else_the_shipped_one(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from crecli import paths

    install(fake_backends, {"small": {"What is 6 plus 6?": ["12"] * 5}, "medium": {"What is 6 plus 6?": ["twelve"] * 5}})
    shipped = tmp_path / "shipped" / "default.cre"
    monkeypatch.setattr(paths, "shipped_router", lambda: shipped)
    # Nothing given, nothing set, nothing shipped: say what to do.
    result = _ask(["What is 6 plus 6?"], tiny_models_toml)
    assert result.exit_code == 1 and "--set-default" in str(result.exception) and "reinstall" in str(result.exception)

    # Right after setup: the router crecli ships answers.
    shipped.parent.mkdir()
    shutil.copy(saved_router, shipped)
    result = _ask(["What is 6 plus 6?"], tiny_models_toml)
    assert result.exit_code == 0 and result.stdout == "12\n"

    # Yours, once set, comes first.
    mine = tmp_path / "mine.cre"
    routerfile.save(make_router(starts=("medium", "medium", "medium")), mine)
    paths.ensure(paths.config_dir())
    paths.user_settings_file().write_text(f"default_router = {json.dumps(str(mine))}\n")
    result = _ask(["What is 6 plus 6?"], tiny_models_toml)
    assert result.exit_code == 0 and result.stdout == "twelve\n"


def test_cli_ask_explains_a_prompt_unlike_the_routers_log(
    fake_backends: Callable[..., dict[str, FakeBackend]], saved_router: Path, tiny_models_toml: Path
) -> None:
    install(fake_backends, {"large": {FAR: ["fine"] * 5}, "small": {"What is 6 plus 6?": ["12"] * 5}})
    far = _ask([FAR, "--router", str(saved_router), "--explain"], tiny_models_toml)
    assert far.exit_code == 0, far.output
    hint = " ".join(far.stderr.split())
    assert f"{saved_router} was fitted on a log with no queries like this one" in hint
    assert "strongest model, large" in hint and "cre fit LOG" in hint
    near = _ask(["What is 6 plus 6?", "--router", str(saved_router), "--explain"], tiny_models_toml)
    assert near.exit_code == 0 and "hint" not in near.stderr


def test_cli_ask_model_and_router_together_is_an_error(saved_router: Path, tiny_models_toml: Path) -> None:
    result = _ask(["hi", "--model", "small", "--router", str(saved_router)], tiny_models_toml)
    assert result.exit_code == 1 and "not both" in str(result.exception)


def test_the_answering_path_loads_no_fit_time_code(settings: config.ModelConfig, router: RouterFile, tmp_path: Path, tiny_models_toml: Path) -> None:
    """`cre ask` imports escalate, route and routerfile and loads a router: none of that may
    load the outcome store, fitting or calibration (checked in a fresh interpreter)."""
    import subprocess
    import sys

    path = tmp_path / "r.cre"
    routerfile.save(router, path)
    code = (
        "import sys\n"
        "import crecli.escalate, crecli.route, crecli.routerfile\n"
        "from pathlib import Path\nfrom crecli import config\n"
        f"router = crecli.routerfile.load({str(path)!r}, config.load(Path({str(tiny_models_toml)!r})))\n"
        f"cascade = crecli.escalate.Cascade(router, config.load(Path({str(tiny_models_toml)!r})))\n"
        "cascade.route('What is 7 plus 5?')\n"
        "print(' '.join(m for m in ('crecli.outcomes', 'crecli.fit', 'crecli.calibrate', 'crecli.evaluate',"
        " 'crecli.cluster', 'crecli.reduce', 'umap', 'hdbscan') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


class _Waves(FakeBackend):
    """Logs how many votes each `sample_many` call asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waves: list[int] = []

    def sample_many(self, prompt: str, params: Any) -> list[Any]:
        self.waves.append(len(params))
        return super().sample_many(prompt, params)


@pytest.mark.parametrize(("answers", "waves", "used"), [
    (["4", "4", "4", "4", "4"], [2], 3),  # 3 of 5 agree as soon as possible
    (["4", "5", "4", "4", "4"], [2, 1], 4),  # a dissent costs one more vote
    (["4", "5", "6", "7", "4"], [2, 1], 4),  # after 4 votes no answer can reach 3: reject
])
def test_sampled_votes_come_in_waves_of_votes_the_check_surely_needs(answers: list[str], waves: list[int], used: int) -> None:
    from crecli.config import ModelSpec

    backend = _Waves(ModelSpec(name="m", path="/x.gguf"), scripted({"What is 2 plus 2?": answers}))
    step = check(backend, "What is 2 plus 2?", QualityCheck(k=5), 0.6, 16, "numeric")
    assert backend.waves == waves and step.used == used
    assert step.votes == answers[:used]


@pytest.mark.parametrize("failure", ["missing", "unloadable"])
def test_serve_passes_over_an_in_process_rung_it_cannot_load_and_ask_does_not(
    fake_backends: Callable[..., dict[str, FakeBackend]], router: RouterFile, settings: config.ModelConfig,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, failure: str,
) -> None:
    # A small model missing on disk (or refused by llama.cpp) made every request routed to it
    # a 500 on a team's server, while remote rungs whose servers failed were passed over.
    from crecli import live
    from crecli.errors import ModelLoadError, ModelNotAvailable

    monkeypatch.setattr(live, "_SAID", set())
    error = (ModelNotAvailable("model 'small' is not on disk (/models/small.gguf): run `cre models pull`")
             if failure == "missing" else ModelLoadError("llama.cpp could not load 'small' from /models/small.gguf"))

    def broken(text: str, params: GenParams) -> str:
        raise error

    fake_backends({"small": broken, "medium": lambda text, params: "12", "large": lambda text, params: "12"})
    prompt = "What is 7 plus 5?"
    with pytest.raises(type(error)):
        Cascade(router, settings).ask(prompt)  # cre ask and cre batch: theirs to fix, so it stops
    serving = Cascade(router, settings)
    serving.pass_over_unloadable = True  # what cre serve sets
    traces = [serving.ask(prompt), serving.ask(prompt)]
    for trace in traces:
        assert (trace.start_model, trace.model, trace.answer) == ("small", "medium", "12")
        assert trace.steps[0].why == "unavailable (its model could not be loaded): escalate to medium"
        assert "/models" not in json.dumps(trace.to_dict())  # the client sees the trace: no path
    err = capsys.readouterr().err
    assert err.count("prompts pass over small to the next rung") == 1 and "/models/small.gguf" in err


def test_a_cascade_from_a_file_closes_its_routers_embedder(monkeypatch: pytest.MonkeyPatch, tiny_models_toml: Path,
                                                           tmp_path: Path) -> None:
    # A llama.cpp embedder loads a whole model outside the pool: leaving the cascade left it loaded.
    from dataclasses import replace

    closed: list[bool] = []

    class Embedder:
        kind = "llama"

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(routerfile, "load", lambda path, settings, force=False: replace(make_router(), embedder=Embedder()))
    with Cascade.from_file(tmp_path / "r.cre", models_file=tiny_models_toml):
        pass
    assert closed == [True]
    # A router handed in is the caller's to close.
    shared = replace(make_router(), embedder=Embedder())
    with Cascade(shared, config.load(tiny_models_toml)):
        pass
    assert closed == [True]
