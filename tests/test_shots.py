"""Answered examples per (cluster, model): `cre fit --shots`, the router file, the cascade.

The fakes answer by task, as `skilled_fakes` (conftest) do; here "small" is right on
multiple choice only when its prompt shows it at least one answered multiple-choice
example, so the fit must find that, store the examples, and the cascade must show them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crecli import config, costs, outcomes, routerfile
from crecli import shots as shot_choice
from crecli.cli import app
from crecli.config import ModelSpec
from crecli.models import bench, registry
from crecli.models.backend import Backend, GenParams
from crecli.models.fake import FakeBackend
from crecli.models.prompting import chat_messages, render
from crecli.querylog import Record
from support.logs import SMALL_LOG, small_log_answers

runner = CliRunner()


def _shown_choice_examples(text: str) -> int:
    # The completion format's fixed preamble already holds one "A: (B)".
    return text.count("\nA: (") - 1


@pytest.fixture
def shot_fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeBackend]:
    answers = small_log_answers()
    created: dict[str, FakeBackend] = {}

    def factory(spec: ModelSpec) -> Backend:
        def answer(text: str, params: GenParams) -> str:
            # The prompt is the last one in the text: examples come before it.
            prompt = max((p for p in answers if p in text), key=text.rfind, default=None)
            if prompt is None:
                return "I don't know"
            source, ref = answers[prompt]
            choice = "(A)" in prompt
            right = spec.name == "large" or "arithmetic" in source or (
                choice and spec.name == "small" and _shown_choice_examples(text) >= 1
            )
            if right:
                return ref if len(ref) > 1 or not ref.isalpha() else f"({ref})"
            return str(random.Random(f"{prompt}|{params.seed}|{spec.name}").randint(0, 9))

        created[spec.name] = FakeBackend(spec, answer, seconds_per_token={"small": 0.001, "medium": 0.003, "large": 0.01}[spec.name])
        return created[spec.name]

    monkeypatch.setattr(registry, "make_backend", factory)
    monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
    return created


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_fit_finds_the_examples_a_model_needs_and_the_cascade_shows_them(
    tmp_path: Path, tiny_models_toml: Path, shot_fakes: dict[str, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    report = json.loads(invoke("fit", str(SMALL_LOG), "-o", str(router), *m, "--k", "1", "--shots", "0,1,3",
                               "--retain", "0.5", "--json"))
    # Every answer with examples ran now: none of them counted as reused (it went negative).
    assert report["outcomes_run"] > 240 and report["outcomes_reused"] == 0
    again = json.loads(invoke("fit", str(SMALL_LOG), "-o", str(router), *m, "--k", "1", "--shots", "0,1,3",
                              "--retain", "0.5", "--json"))
    assert again["outcomes_run"] == 0 and again["outcomes_reused"] == report["outcomes_run"]
    info = json.loads(invoke("inspect", str(router), *m, "--json"))
    choice = [c for c in info["clusters"] if c["answer_type"] == "choice" and c.get("shots")]
    assert choice, info["clusters"]
    for c in choice:
        # One example is enough, and ties go to fewer examples.
        assert c["shots"] == {"small": 1}
        assert len(c["exemplars"]) == 3 and all(a.startswith("(") for _, a in c["exemplars"])
        # The evidence: right answers of the small model over the cluster's other queries.
        tally = report["shots"][str(c["id"])]["small"]
        assert tally["1"] == tally["3"] == [tally["1"][1], tally["1"][1]] and tally["0"][0] < tally["0"][1]
    # Arithmetic needs no examples: every model is right without them.
    assert not any(c.get("shots") for c in info["clusters"] if c["answer_type"] == "numeric")

    loaded = routerfile.load(router, config.load(tiny_models_toml))
    c = choice[0]
    shots = loaded.shots(c["id"], "small")
    assert shots == ((c["exemplars"][0][0], c["exemplars"][0][1]),)
    assert loaded.shots(c["id"], "large") == () and loaded.shots(-1, "small") == ()

    # The live cascade shows the same example: a choice prompt that is not an exemplar, asked
    # directly, is answered by the small model after it.
    rows = [json.loads(line) for line in SMALL_LOG.read_text().splitlines()]
    exemplar_prompts = {q for cl in info["clusters"] for q, _ in cl.get("exemplars", [])}
    row = next(r for r in rows if r["match"] == "choice" and r["prompt"].strip() not in exemplar_prompts
               and _cluster_of(loaded, r["prompt"]) == c["id"])
    trace = json.loads(invoke("ask", row["prompt"], "--router", str(router), *m, "--json"))
    assert trace["steps"][0]["model"] == "small"
    seen = shot_fakes["small"].calls[-1][0]
    assert c["exemplars"][0][0] in seen and seen.rfind(row["prompt"].strip()) > seen.find(c["exemplars"][0][0])

    # eval replays recorded answers with the router's examples: nothing new runs, and the
    # exemplar queries are left out of the scoring.
    calls = sum(len(b.calls) for b in shot_fakes.values())
    from crecli import replay

    kept_by: list[Any] = []
    monkeypatch.setattr(replay, "resolve_shots", lambda *a, **k: (kept_by.append(a[3]), shot_choice.resolve_shots(*a, **k))[1])
    ev = json.loads(invoke("eval", str(SMALL_LOG), "--router", str(router), *m, "--json"))
    assert sum(len(b.calls) for b in shot_fakes.values()) == calls
    assert ev["n"] == len(rows) - len(exemplar_prompts)
    # The replay asks each rung whether it keeps its examples, as the live cascade does.
    settings = config.load(tiny_models_toml)
    assert kept_by and all(kept_by[0](name) == settings.get(name).keeps_examples for name in settings.ladder)

    # A batch charges the cluster's examples once per chunk and rung: the first answer on
    # "small" pays for them, the others only for their own tokens (llama.cpp keeps them).
    from crecli.batch import run_batch
    from crecli.escalate import Cascade

    priced = tmp_path / "priced.toml"
    priced.write_text(tiny_models_toml.read_text().replace('.gguf"\n', '.gguf"\nprice_per_1k_tokens = 1.0\n'))
    same = [r for r in rows if r["match"] == "choice" and r["prompt"].strip() not in exemplar_prompts
            and _cluster_of(loaded, r["prompt"]) == c["id"]]
    assert len(same) >= 2
    with Cascade.from_file(router, priced) as cascade:
        assert cascade.pricing.unit == "price"
        traces = [cascade.ask(r["prompt"]) for r in same]
        prefix = [s.prefix_tokens for t in traces for s in t.steps if s.model == "small"]
        assert len(prefix) == len(same) and prefix[0] > 0 and len(set(prefix)) == 1
        # The examples' tokens are what the prompt gains from them, in the backend's own count.
        first = traces[0].steps[0]
        plain = shot_fakes["small"].count_tokens(render("completion", same[0]["prompt"]))
        assert first.prompt_tokens - plain == prefix[0]
        full = sum(t.cost for t in traces)
        summary = run_batch([json.dumps({"id": r["id"], "prompt": r["prompt"]}).encode() for r in same],
                            io.StringIO(), cascade)
    assert summary.answered == len(same)
    assert summary.cascade_cost == pytest.approx(full - (len(same) - 1) * prefix[0] / 1000)


def _cluster_of(router: routerfile.RouterFile, prompt: str) -> int:
    from crecli.route import route

    return route(router, prompt).cluster


def test_rendered_examples_sit_between_the_head_and_the_prompt() -> None:
    shots = (("What is 1 plus 1?", "2"), ("Pick one\n(A) x\n(B) y", "(B)"))
    chatml = render("chatml", "What is 3 plus 4?", shots=shots).text
    head = render("chatml", "What is 3 plus 4?").text.split("<|im_start|>user")[0]
    assert chatml.startswith(head)
    assert chatml.index("What is 1 plus 1?") < chatml.index("<|im_start|>assistant\n2<|im_end|>") < chatml.index("What is 3 plus 4?")
    completion = render("completion", "What is 3 plus 4?", shots=shots).text
    assert completion.endswith("Q: What is 1 plus 1?\nA: 2\n\nQ: Pick one\n(A) x\n(B) y\nA: (B)\n\nQ: What is 3 plus 4?\nA:")
    # No examples: the prompt renders exactly as before, so old recordings still match.
    assert render("completion", "x").text == render("completion", "x", shots=()).text
    roles = [msg["role"] for msg in chat_messages("What is 3 plus 4?", shots=shots)]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]


def test_recordings_are_keyed_by_their_examples() -> None:
    assert outcomes.prompt_sha256("q") == outcomes.prompt_sha256("q", ())
    assert outcomes.prompt_sha256("q", (("a", "b"),)) != outcomes.prompt_sha256("q")
    assert outcomes.prompt_sha256("q", (("a", "b"),)) != outcomes.prompt_sha256("q", (("a", "c"),))


def _record(i: int, answer: str, match: str = "choice", prompt: str | None = None) -> Record:
    return Record(id=f"r{i}", prompt=prompt or f"Question {i}?\n(A) x\n(B) y\n(C) z", reference=[answer], match=match)


def test_exemplars_prefer_distinct_answers_and_skip_what_cannot_be_shown() -> None:
    records = [_record(0, "A"), _record(1, "A"), _record(2, "B"), _record(3, "A", prompt="x" * 5000), _record(4, "C")]
    chosen = shot_choice.pick_exemplars(records, 3)
    assert [r.id for r in chosen] == ["r0", "r2", "r4"]
    assert [shot_choice.exemplar_answer(r) for r in chosen] == ["(A)", "(B)", "(C)"]
    assert [r.id for r in shot_choice.pick_exemplars(records[:2], 3)] == ["r0", "r1"]
    assert shot_choice.exemplar_answer(_record(5, "thirteen", "numeric")) == "13"
    assert shot_choice.exemplar_answer(_record(6, "^a+$", "regex")) is None


def _outcome(rid: str, model: str, prompt_tokens: int, text: str = "x") -> outcomes.Outcome:
    return outcomes.Outcome(rid, "sha", model, "", "k", "run", prompt_tokens, [outcomes.Vote(text, 2, 0.1)])


def test_shared_examples_are_priced_once_per_batch() -> None:
    """Answers after the same examples share their cost; without them nothing is added."""
    shots = {("a", "m"): (("q", "1"),), ("b", "m"): (("q", "1"),)}
    base = {(r, "m"): _outcome(r, "m", 10) for r in "abc"}
    shown = {(r, "m"): _outcome(r, "m", 40) for r in "ab"}
    resolved = shot_choice.resolve_shots(base, shown, shots)
    assert resolved[("a", "m")].prefix_tokens == 30 and resolved[("c", "m")].prefix_tokens == 0
    assert resolved[("a", "m")].prefix_key == resolved[("b", "m")].prefix_key != ""

    shares = costs.share_prefixes([("p", 3.0), ("p", 3.0), ("", 0.0), ("p", 3.0)])
    assert shares == [1.0, 1.0, 0.0, 1.0]
    # In "bench-seconds" a vote no longer pays the shared tokens in its own prompt.
    pricing = costs.CostModel("bench-seconds", {}, {}, {"m": bench.Rates(10.0, 1.0)})
    assert pricing.votes(resolved[("a", "m")]) == [pytest.approx(1.0 + 2.0)]
    assert pricing.prefix_of(resolved[("a", "m")]) == pytest.approx(3.0)


def test_a_prompt_its_examples_make_too_long_shares_no_examples_cost() -> None:
    # Live, a rung passed over for a prompt too long for its context processed no examples;
    # the replay counted that visit among those sharing them, so the two answers that ran
    # paid two thirds of the examples' one processing.
    from crecli.quality import QualityCheck
    from crecli.replay import Replay

    examples = (("q", "1"),)
    shots = {(r, "small"): examples for r in "abc"}
    base = {(r, "small"): _outcome(r, "small", 10) for r in "abc"}
    shown = {(r, "small"): _outcome(r, "small", 40) for r in "ab"}
    shown[("c", "small")] = outcomes.Outcome("c", "sha", "small", "", "k", "too_long", 0, [], reason="too long")
    resolved = shot_choice.resolve_shots(base, shown, shots)
    assert resolved[("c", "small")].source == "too_long"
    assert (resolved[("c", "small")].prefix_key, resolved[("c", "small")].prefix_tokens) == ("", 0)

    pricing = costs.CostModel("bench-seconds", {}, {}, {"small": bench.Rates(10.0, 1.0)})
    records = [Record(id=r, prompt=f"p{r}", reference=["x"], match="exact") for r in "abc"]
    replay = Replay.build(resolved, records, ["small"], pricing)
    sim = replay.simulate({r: "small" for r in "abc"}, {"small": 0.5}, QualityCheck(k=1))
    ran = sum(pricing.votes(resolved[(r, "small")])[0] for r in "ab")
    assert sum(t.cost for t in sim.traces) == pytest.approx(ran + pricing.prefix_of(resolved[("a", "small")]))


def test_a_remote_rungs_examples_are_charged_in_full_live_and_replayed_alike() -> None:
    # The live cascade charged a remote rung's examples in full (it cannot count them), and
    # the replay split them over the run as if a loaded model kept them: cre batch priced
    # 10 answers 42% above cre eval. A server may not keep them, and bills them if it does
    # not, so both sides now charge them in full; a local rung still shares them.
    remote, local = ModelSpec(name="far", url="http://127.0.0.1:9/v1"), ModelSpec(name="near")
    assert not remote.keeps_examples and local.keeps_examples
    params = GenParams(max_tokens=8, shots=(("What is 1 plus 1?", "2"),))
    assert FakeBackend(local).shot_tokens("What is 2 plus 2?", params, 40) > 0
    assert FakeBackend(remote).shot_tokens("What is 2 plus 2?", params, 40) == 0
    shots = {("a", "far"): (("q", "1"),), ("a", "near"): (("q", "1"),)}
    base = {("a", m): _outcome("a", m, 10) for m in ("far", "near")}
    shown = {("a", m): _outcome("a", m, 40) for m in ("far", "near")}
    resolved = shot_choice.resolve_shots(base, shown, shots, lambda m: {"far": remote, "near": local}[m].keeps_examples)
    assert (resolved[("a", "far")].prompt_tokens, resolved[("a", "far")].prefix_tokens) == (40, 0)
    assert not resolved[("a", "far")].prefix_key
    assert (resolved[("a", "near")].prompt_tokens, resolved[("a", "near")].prefix_tokens) == (40, 30)
    # The fit's shot plan passes it on: its `unkept` rungs are charged in full.
    plan = shot_choice.ShotPlan({0: [["q", "1"]]}, {0: {"far": 1, "near": 1}}, set(), {},
                                {0: base, 1: shown}, frozenset({"far"}))
    _, applied = plan.apply([Record(id="a", prompt="p")], {"a": 0}, ["far", "near"])
    assert (applied[("a", "far")].prefix_tokens, applied[("a", "near")].prefix_tokens) == (0, 30)


def test_a_query_with_an_exemplars_prompt_under_another_id_is_never_scored_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Held out by id only, a second line with an exemplar's prompt was scored right after
    # being shown its own question answered, inflating the count of examples it chose.
    from types import SimpleNamespace

    from crecli import outcomes
    from crecli.quality import QualityCheck
    from crecli.querylog import Record
    from crecli.shots import choose_shots

    asked: list[str] = []
    monkeypatch.setattr(outcomes, "collect", lambda scored, *a, **k: asked.extend(r.id for r in scored) or {})
    records = [Record(id=f"q{i}", prompt=f"What is {i} plus 1?", reference=[str(i + 1)], match="numeric") for i in range(5)]
    records.append(Record(id="again", prompt="What is 0 plus 1? ", reference=["1"], match="numeric"))
    settings = SimpleNamespace(ladder=["small"], get=lambda name: ModelSpec(name=name))
    plan = choose_shots(records, {r.id: 0 for r in records}, settings, None, QualityCheck(k=1), {}, [0, 1])  # type: ignore[arg-type]
    assert plan.exemplars[0][0][0] == "What is 0 plus 1?"
    assert "again" in plan.held_out and "again" not in asked and asked


def test_a_prompt_its_examples_make_too_long_for_a_model_counts_as_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A model that cannot take a prompt with its examples (its context) cannot answer it after
    # them: a wrong answer in the comparison, as the replay grades it, not one left uncounted.
    from types import SimpleNamespace

    from crecli.outcomes import Outcome, Vote
    from crecli.quality import QualityCheck
    from crecli.shots import choose_shots

    records = [Record(id=f"q{i}", prompt=f"What is {i} plus 1?", reference=[str(i + 1)], match="numeric") for i in range(4)]

    def outcome(r: Record, source: str, text: str = "") -> Outcome:
        return Outcome(r.id, "", "small", "", "", source, 5, [Vote(text, 1, 0.1)] if source == "run" else [])

    base = {(r.id, "small"): outcome(r, "run", "0") for r in records}  # wrong on every one without examples

    def after_examples(scored: list[Record], *a: Any, **k: Any) -> dict[Any, Outcome]:
        return {(r.id, "small"): outcome(r, "too_long") if r is scored[0] else outcome(r, "run", r.reference[0])  # type: ignore[index]
                for r in scored}

    monkeypatch.setattr(outcomes, "collect", after_examples)
    settings = SimpleNamespace(ladder=["small"], get=lambda name: ModelSpec(name=name))
    plan = choose_shots(records, {r.id: 0 for r in records}, settings, None, QualityCheck(k=1), base, [0, 1])  # type: ignore[arg-type]
    assert plan.accuracy[0]["small"] == {0: (0, 3), 1: (2, 3)}
    assert plan.counts == {0: {"small": 1}}


def test_held_out_scoring_of_a_router_with_examples_keeps_each_records_prompt_identity(
    tmp_path: Path, tiny_models_toml: Path, shot_fakes: dict[str, FakeBackend]
) -> None:
    # `replay.prepare` hashes the prompts once for --held-out-only and hands them to `Data`;
    # with answered examples it also gathers the records that show them, and the two must not
    # be mixed up (a set of record ids once took the prompt identities' place).
    from crecli import replay

    settings, loaded, rows = _fitted_with_examples(tmp_path, tiny_models_toml)
    assert any(c.shots for c in loaded.clusters)
    left_out = {outcomes.prompt_sha256(r["prompt"]) for r in rows[:5]}
    data = replay.prepare(loaded, settings, SMALL_LOG, store=tmp_path / "store.sqlite", leave_out=left_out)
    assert data.prompt_ids == [outcomes.prompt_sha256(r.prompt) for r in data.records]
    assert not left_out & set(data.prompt_ids) and len(data.records) < len(rows) - 5


def test_eval_leaves_out_as_too_long_only_what_no_rung_takes_without_the_routers_examples(
    tmp_path: Path, tiny_models_toml: Path, shot_fakes: dict[str, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cre fit` leaves out a query too long for every rung before it chooses examples, and
    # scores one the examples alone make too long as a wrong answer. `replay.prepare` decided
    # after adding the router's examples: a prompt small takes alone but not after its
    # examples (medium and large take it in no form) was left out of eval, with a warning to
    # shorten it, though `cre ask` answers it (wrongly, failing on the top rung) as fitted.
    from crecli import replay
    from crecli.errors import PromptTooLong

    settings, loaded, rows = _fitted_with_examples(tmp_path, tiny_models_toml)
    shown = {q for c in loaded.clusters for q, _ in c.exemplars}
    target = next(r["prompt"] for r in rows if r["prompt"].strip() not in shown
                  and loaded.shots(_cluster_of(loaded, r["prompt"]), "small"))
    made = registry.make_backend

    def refusing(spec: ModelSpec) -> Backend:
        backend = made(spec)
        answer = backend.answers  # type: ignore[attr-defined]

        def limited(text: str, params: GenParams) -> str:
            if target in text and (spec.name != "small" or any(q in text for q in shown)):
                raise PromptTooLong("prompt fills the model's context; shorten it or raise `context` in models.toml")
            return answer(text, params)

        backend.answers = limited  # type: ignore[attr-defined]
        return backend

    monkeypatch.setattr(registry, "make_backend", refusing)
    data = replay.prepare(loaded, settings, SMALL_LOG, store=tmp_path / "fresh.sqlite")
    assert data.n_skipped_too_long == 0
    (kept,) = [r for r in data.records if r.prompt == target]
    assert all(data.outcomes[(kept.id, name)].source == "too_long" for name in settings.ladder)
    sim = data.replay.simulate({r.id: "small" for r in data.records}, {m: 0.5 for m in settings.ladder}, loaded.quality)
    (trace,) = [t for t in sim.traces if t.query_id == kept.id]
    assert [s.model for s in trace.steps] == settings.ladder and not trace.correct


def _fitted_with_examples(tmp_path: Path, tiny_models_toml: Path) -> tuple[config.ModelConfig, routerfile.RouterFile, list[dict[str, Any]]]:
    """A router fitted on SMALL_LOG with up to one answered example, loaded; and the log's rows."""
    router = tmp_path / "router.cre"
    invoke("fit", str(SMALL_LOG), "-o", str(router), "--models", str(tiny_models_toml), "--k", "1",
           "--shots", "0,1", "--retain", "0.5", "--json")
    settings = config.load(tiny_models_toml)
    return settings, routerfile.load(router, settings), [json.loads(line) for line in SMALL_LOG.read_text().splitlines()]
