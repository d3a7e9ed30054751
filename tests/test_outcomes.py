from __future__ import annotations

import json
from pathlib import Path

import pytest

from crecli import config, grading
from crecli.errors import ConfigError, CreError
from crecli.models import bench
from crecli.models.backend import GenParams
from crecli.costs import CostModel
from crecli.outcomes import (
    Outcome,
    OutcomeStore,
    Vote,
    collect,
    graded,
    prompt_sha256,
    sample_records,
    settings_key,
)
from crecli.quality import QualityCheck, vote_seed
from crecli.querylog import Record

Q3 = QualityCheck(k=3)


def rec(i: int, prompt: str | None = None, ref: str | None = None, match: str = "numeric") -> Record:
    return Record(id=f"q{i}", prompt=prompt or f"What is {i} plus {i}?", reference=[ref or str(2 * i)], match=match)


@pytest.fixture
def settings(tiny_models_toml: Path) -> config.ModelConfig:
    return config.load(tiny_models_toml)


@pytest.fixture
def store(tmp_path: Path) -> OutcomeStore:
    with OutcomeStore(tmp_path / "outcomes.sqlite") as s:
        yield s


def test_collect_runs_each_query_and_model_once(settings, store, fake_backends) -> None:
    records = [rec(i) for i in range(4)]
    created = fake_backends({"small": lambda text, p: "4", "large": lambda text, p: "four"})
    results = collect(records, settings, store, Q3)
    assert sorted(results) == sorted((r.id, m) for r in records for m in ("small", "medium", "large"))
    # greedy + k-1 samples per query, all through one backend per model
    assert {m: len(b.calls) for m, b in created.items()} == {"small": 12, "medium": 12, "large": 12}
    assert store.count() == 12
    o = results[("q1", "small")]
    assert o.source == "run" and o.label is None and len(o.votes) == 3
    assert o.prompt_sha256 == prompt_sha256(records[1].prompt)
    # "-s": small answers in the "completion" format, whose newline stop ends answers as text
    assert o.settings_key == settings_key(Q3, grading.max_tokens_for("numeric"), text_stops=True)
    assert o.prompt_tokens > 0 and o.votes[0].text == "4"
    assert graded(o, records[1]) == [False, False, False]  # 1 + 1 is not 4
    assert graded(results[("q2", "small")], records[2]) == [True, True, True]
    assert graded(results[("q2", "large")], records[2]) == [True, True, True]  # "four" == 4
    assert graded(results[("q2", "medium")], records[2]) == [False, False, False]  # "I don't know"

    created.clear()
    again = collect(records, settings, store, Q3)
    assert created == {}  # nothing pending: no model is even loaded
    assert again == results


def test_votes_recorded_without_signals_rerun_only_the_greedy_vote(settings, store, fake_backends, monkeypatch) -> None:
    from crecli.models.backend import Signals

    created = fake_backends()
    records = [rec(1, match="numeric", ref="2"), rec(2, match="numeric", ref="4")]
    first = collect(records, settings, store, Q3, models=["small"])
    assert first[("q1", "small")].votes[0].signals is None
    created.clear()

    # A runtime that reports signals finds the rows without them and re-runs vote 0 only.
    from crecli.models import registry
    from crecli.models.fake import FakeBackend

    calls: list[tuple[str, object]] = []

    class WithSignals(FakeBackend):
        def complete(self, text, params):  # type: ignore[no-untyped-def]
            gen = super().complete(text, params)
            calls.append((text, params))
            gen.signals = Signals(-0.5, -0.25, None) if params.temperature == 0.0 else None
            return gen

    monkeypatch.setattr(registry, "make_backend", lambda spec: WithSignals(spec, answers=lambda text, p: "2"))
    monkeypatch.setattr(registry, "reports_signals", lambda spec: True)
    again = collect(records, settings, store, Q3, models=["small"])
    assert len(calls) == 2 and all(p.temperature == 0.0 for _, p in calls)  # one greedy vote per query
    for r in records:
        old, new = first[(r.id, "small")], again[(r.id, "small")]
        assert new.votes[0].signals == Signals(-0.5, -0.25, None)
        assert new.votes[1:] == old.votes[1:]  # the sampled votes are kept
    calls.clear()
    third = collect(records, settings, store, Q3, models=["small"])
    assert calls == [] and third[("q1", "small")].votes[0].signals == Signals(-0.5, -0.25, None)


def test_votes_follow_the_cascade_protocol(settings, store, fake_backends) -> None:
    created = fake_backends()
    collect([rec(1, match="choice", ref="(A)")], settings, store, Q3, models=["medium"])
    params = [p for _, p in created["medium"].calls]
    max_tokens = grading.max_tokens_for("choice")
    assert params[0].temperature == 0.0 and params[0].max_tokens == max_tokens
    seeds = [vote_seed("What is 1 plus 1?", i) for i in (1, 2)]  # what the cascade draws for this prompt
    assert [(p.temperature, p.seed, p.max_tokens) for p in params[1:]] == [(0.7, seeds[0], max_tokens), (0.7, seeds[1], max_tokens)]


def test_interrupted_collect_resumes_without_recomputing(settings, store, fake_backends) -> None:
    records = [rec(i) for i in range(5)]
    calls = {"n": 0}

    def flaky(text: str, params: GenParams) -> str:
        calls["n"] += 1
        if calls["n"] == 8:  # the 3rd query's 2nd vote (k = 3)
            raise KeyboardInterrupt
        return "4"

    fake_backends({"small": flaky})
    with pytest.raises(KeyboardInterrupt):
        collect(records, settings, store, Q3)
    assert store.count() == 2  # two whole queries were committed, the one in flight was lost

    created = fake_backends()
    results = collect(records, settings, store, Q3)
    assert len(created["small"].calls) == 3 * 3  # the 3 queries left on small, and no more
    assert len(created["medium"].calls) == len(created["large"].calls) == 5 * 3
    assert len(results) == 15 and store.count() == 15


def test_store_survives_reopening(settings, tmp_path, fake_backends) -> None:
    path = tmp_path / "o.sqlite"
    fake_backends()
    with OutcomeStore(path) as s:
        first = collect([rec(1)], settings, s, Q3)
    created = fake_backends()
    created.clear()  # the fixture keeps one dict of every backend it made
    with OutcomeStore(path) as s:
        assert collect([rec(1)], settings, s, Q3) == first
    assert created == {}


def test_label_only_records_skip_the_model(settings, store, fake_backends) -> None:
    created = fake_backends()
    labelled = Record(id="lab", prompt="Is water wet?", reference=None, match=None, labels={"small": True, "large": False})
    results = collect([labelled, rec(1)], settings, store, Q3)
    assert results[("lab", "small")].source == "label" and results[("lab", "small")].label is True
    assert graded(results[("lab", "large")], labelled) == [False]
    assert ("lab", "medium") not in results  # no reference, no label: nothing to grade
    assert all("Is water wet?" not in text for b in created.values() for text, _ in b.calls)
    assert store.count() == 3  # labels are not stored: the log is their source of truth


def test_adding_a_model_runs_only_that_model(settings, store, fake_backends) -> None:
    records = [rec(i) for i in range(3)]
    fake_backends()
    collect(records, settings, store, Q3, models=["small", "medium"])
    created = fake_backends()
    created.clear()
    collect(records, settings, store, Q3)
    assert set(created) == {"large"}


def test_other_quality_settings_or_model_file_are_measured_afresh(settings, store, fake_backends) -> None:
    fake_backends()
    collect([rec(1)], settings, store, Q3, models=["small"])
    created = fake_backends()
    collect([rec(1)], settings, store, QualityCheck(k=3, temperature=0.9), models=["small"])
    assert len(created["small"].calls) == 3
    from dataclasses import replace

    settings.models["small"] = replace(settings.models["small"], sha256="ab" * 32)
    created = fake_backends()
    collect([rec(1)], settings, store, Q3, models=["small"])
    assert len(created["small"].calls) == 3


def test_a_recording_whose_prompt_no_longer_fits_a_lowered_context_is_too_long(settings, store, fake_backends) -> None:
    # The store key leaves `context` out: after it was lowered, the recorded answers were
    # replayed as answers while `cre ask` passes the rung over (the prompt fills its context).
    from dataclasses import replace

    fake_backends()
    recorded = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    tokens, longest = recorded.prompt_tokens, max(v.output_tokens for v in recorded.votes)
    created = fake_backends()
    created.clear()
    for context, source in [(tokens + longest, "run"), (tokens, "too_long"), (tokens - 1, "too_long")]:
        settings.models["small"] = replace(settings.models["small"], context=context)
        found = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
        assert found.source == source, context
    assert created == {}  # judged from the recording: no model loaded
    assert f"prompt is {tokens} tokens, which fills 'small''s context of {tokens - 1}" in found.reason
    assert (found.votes, graded(found, rec(1))) == ([], [False])
    assert store.count() == 1  # the recording stays, for a context raised again


def test_a_recording_whose_answer_overflows_a_lowered_context_is_run_again(settings, store, fake_backends) -> None:
    # Judged by its prompt alone, a recording whose answer overflows the room its prompt
    # leaves in a lowered context was replayed in full, while live the model stops the
    # answer where the context is full (`LlamaBackend._fit_max_tokens`).
    from dataclasses import replace

    from crecli.quality import was_cut

    answers = {"small": lambda text, p: "one two three four five six"}
    fake_backends(answers)
    recorded = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    tokens = recorded.prompt_tokens
    assert [v.output_tokens for v in recorded.votes] == [6, 6, 6]
    created = fake_backends(answers)
    created.clear()
    # An answer that fills the room exactly is what this context gives: replayed, not run.
    settings.models["small"] = replace(settings.models["small"], context=tokens + 6)
    assert collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")] == recorded
    assert created == {}
    settings.models["small"] = replace(settings.models["small"], context=tokens + 4)
    again = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    assert len(created["small"].calls) == 3 and again.source == "run"
    assert [v.output_tokens for v in again.votes] == [4, 4, 4]
    assert was_cut(again.votes[0].output_tokens, grading.max_tokens_for("numeric"), tokens, tokens + 4)
    created.clear()
    # Its cut answers are not stored (the full recording stays): run again on every run here.
    assert collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")] == again
    assert len(created["small"].calls) == 3 and store.count() == 1


def test_an_answer_the_context_cut_is_used_but_does_not_replace_the_full_recording(
    settings, store, fake_backends
) -> None:
    # Stored, the cut re-run replaced the full recording (the key leaves `context` out), and
    # once `context` was raised again it was replayed as complete: `was_cut` judges it by
    # the new window, which it no longer fills.
    from dataclasses import replace

    from crecli.models.pull import model_identity
    from crecli.quality import was_cut

    answers = {"small": lambda text, p: "one two three four five six"}
    fake_backends(answers)
    full = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    tokens, cap, big = full.prompt_tokens, grading.max_tokens_for("numeric"), settings.models["small"].context
    assert [v.output_tokens for v in full.votes] == [6, 6, 6]
    created = fake_backends(answers)
    settings.models["small"] = replace(settings.models["small"], context=tokens + 4)
    cut = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    # This run uses the cut answers, as live the model stops where the context is full...
    assert cut.source == "run" and [v.output_tokens for v in cut.votes] == [4, 4, 4]
    assert len(created["small"].calls) == 3
    assert was_cut(cut.votes[0].output_tokens, cap, tokens, tokens + 4)
    # ...but the store still holds the full answers.
    spec = settings.models["small"]
    stored = store.get(full.prompt_sha256, "small", model_identity(spec) or "", full.settings_key)
    assert stored is not None and [v.output_tokens for v in stored[1]] == [6, 6, 6] and store.count() == 1
    # It ran all the same: `cre fit`'s summary counts it as run now, not reused (`store.unstored`).
    assert (store.recorded, store.unstored) == (1, 1)
    # Raised again, the full answers are replayed, not run and not judged cut.
    created.clear()
    settings.models["small"] = replace(settings.models["small"], context=big)
    again = collect([rec(1)], settings, store, Q3, models=["small"])[("q1", "small")]
    assert created == {} and again == full
    assert not was_cut(again.votes[0].output_tokens, cap, tokens, big)


def test_duplicate_prompts_are_run_once(settings, store, fake_backends) -> None:
    created = fake_backends()
    results = collect([rec(1, prompt="same?"), rec(2, prompt="same?")], settings, store, Q3, models=["small"])
    assert len(created["small"].calls) == 3
    assert results[("q1", "small")].votes == results[("q2", "small")].votes


def test_sample_records_caps_each_cluster() -> None:
    records = [rec(i) for i in range(10)] + [Record(id="u", prompt="no label")]
    labels = [0, 0, 0, 0, 1, 1, -1, -1, -1, 2, 0]
    picked = sample_records(records, labels, 2, seed=3)
    ids = [r.id for r in picked]
    assert ids == sorted(ids, key=lambda i: [r.id for r in records].index(i))  # log order kept
    groups = [labels[[r.id for r in records].index(i)] for i in ids]
    assert sorted(groups) == [-1, -1, 0, 0, 1, 1, 2]
    assert "u" not in ids  # unlabelled records are never measured
    assert sample_records(records, labels, 2, seed=3) == picked
    assert [r.id for r in sample_records(records, labels, 100, seed=0)] == [r.id for r in records[:10]]
    with pytest.raises(ValueError):
        sample_records(records, labels[:-1], 2)


def run_outcome(model: str, votes: list[tuple[str, int, float]], prompt_tokens: int = 10) -> Outcome:
    return Outcome("q", "sha", model, "m", "key", "run", prompt_tokens, [Vote(*v) for v in votes])


def test_outcome_cost_in_seconds_and_price() -> None:
    """An outcome is a plain record; `costs.CostModel` prices its votes."""
    o = run_outcome("small", [("4", 2, 0.5), ("4", 3, 0.25), ("5", 1, 0.125)])
    seconds = CostModel("seconds", {}, {})
    assert seconds.of(o, 1) == 0.5
    assert seconds.of(o, 3) == 0.875
    # vote 0 pays the 10 prompt tokens; later votes only their own output tokens
    assert CostModel("price", {"small": 2.0}, {}).of(o, 2) == pytest.approx((10 + 2 + 3) * 2.0 / 1000)
    assert CostModel("price", {"small": 1000.0}, {}).votes(o) == [12.0, 3.0, 1.0]
    with pytest.raises(ConfigError):
        CostModel("price", {}, {}).of(o, 1)
    label = Outcome("q", "sha", "small", "m", "label", "label", 0, [], True)
    assert CostModel("seconds", {}, {"small": 0.7}).votes(label) == [0.7]


def test_cost_model_fills_labels_from_measured_means() -> None:
    runs = [run_outcome("small", [("a", 1, 0.2), ("a", 1, 0.1)]), run_outcome("small", [("a", 1, 0.4)])]
    label = Outcome("q", "sha", "small", "m", "label", "label", 0, [], False)
    costs = CostModel.build(runs + [label])
    assert costs.unit == "seconds"
    assert costs.votes(label) == [pytest.approx(0.3)]  # mean greedy cost of small's runs
    assert costs.of(runs[0], 2) == pytest.approx(0.3)


def test_cost_model_uses_bench_speeds_for_a_model_never_run(settings, bench_speeds) -> None:
    spec = settings.get("large")
    label = Outcome("q", "sha", "large", "m", "label", "label", 0, [], True)
    with pytest.raises(CreError, match="cre models bench large"):
        CostModel.build([label], settings.ladder_specs())
    bench_speeds({"large": (100.0, 10.0)})
    runs = [run_outcome("small", [("a", 4, 9.0)], prompt_tokens=50)]
    costs = CostModel.build(runs + [label], settings.ladder_specs())
    # typical tokens come from the recorded outcomes of any model: 50 prompt, 4 output
    assert costs.votes(label) == [pytest.approx(50 / 100 + 4 / 10)]
    assert spec.sha256 is None


def test_cost_model_prices_when_every_model_has_one(settings) -> None:
    from dataclasses import replace

    specs = [replace(s, price_per_1k_tokens=p) for s, p in zip(settings.ladder_specs(), (1.0, 2.0, 4.0))]
    o = run_outcome("medium", [("a", 5, 1.0), ("a", 5, 1.0)], prompt_tokens=20)
    costs = CostModel.build([o], specs)
    assert costs.unit == "price"
    assert costs.of(o, 2) == pytest.approx((20 + 5 + 5) * 2.0 / 1000)
    assert CostModel.build([o], specs[:2] + [settings.get("large")]).unit == "seconds"
    with pytest.raises(ConfigError, match="price_per_1k_tokens"):
        CostModel.build([o], [settings.get("medium")], unit="price")


def test_store_refuses_other_schema_and_garbage(tmp_path) -> None:
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CreError, match="garbage.sqlite: cannot open the outcome store: it is no SQLite database.*"
                       "if it is another file, give --store another file name"):
        OutcomeStore(bad)
    path = tmp_path / "old.sqlite"
    OutcomeStore(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(CreError, match="schema 99"):
        OutcomeStore(path)


def test_store_refuses_another_programs_database_and_leaves_it_alone(tmp_path) -> None:
    """`--store app.db` added meta and outcomes tables and a meta row to any SQLite database,
    even for `cre eval`, which only reads."""
    import sqlite3

    app = tmp_path / "app.db"
    with sqlite3.connect(app) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    before = app.read_bytes()
    with pytest.raises(CreError, match=r"app.db: a SQLite database holding other tables \(users\), not an outcome store"
                       r".*Give --store a new file name.*nothing was changed"):
        OutcomeStore(app)
    assert app.read_bytes() == before
    tagged = tmp_path / "tagged.db"
    with sqlite3.connect(tagged) as db:
        db.execute("PRAGMA application_id = 1234")
    with pytest.raises(CreError, match=r"another program \(application_id 0x4d2\)"):
        OutcomeStore(tagged)
    # A new store is marked as ours; one an older crecli made (unmarked) still opens.
    from crecli.outcomes import APPLICATION_ID

    new = tmp_path / "new.sqlite"
    OutcomeStore(new).close()
    with sqlite3.connect(new) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        db.execute("PRAGMA application_id = 0")
    OutcomeStore(new).close()
    # Another program's lone `meta(key, value)` table with a schema row of its own: refused
    # before anything is created (`outcomes` was added to it, and only then the schema read).
    lone = tmp_path / "lone.db"
    with sqlite3.connect(lone) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', '7.2')")
    before = lone.read_bytes()
    with pytest.raises(CreError, match=r"holding other tables \(meta\), not an outcome store"):
        OutcomeStore(lone)
    assert lone.read_bytes() == before
    # A store of another schema (a newer crecli's) is refused as such, and left as it is.
    newer = tmp_path / "newer.sqlite"
    OutcomeStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        db.execute("PRAGMA application_id = 0")
        db.execute("DROP TABLE outcomes")
        db.execute("CREATE TABLE outcomes (x TEXT)")
    before = newer.read_bytes()
    with pytest.raises(CreError, match="outcome store schema 99 is not the one"):
        OutcomeStore(newer)
    assert newer.read_bytes() == before


def test_store_refuses_a_database_whose_tables_have_the_stores_names_but_other_columns(tmp_path) -> None:
    """Another program's `outcomes(trial, result)` was taken for a store: marked with crecli's
    application_id, given `meta` and a schema row, then the first lookup failed with a
    traceback. Refused now by its columns, before anything is written."""
    import sqlite3

    for name, tables in (
        ("results.db", ["CREATE TABLE outcomes (trial INTEGER, result TEXT)", "INSERT INTO outcomes VALUES (1, 'win')"]),
        ("meta.db", ["CREATE TABLE meta (name TEXT, size INTEGER)"]),
        ("both.db", ["CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                     "CREATE TABLE outcomes (trial INTEGER, result TEXT)"]),
    ):
        path = tmp_path / name
        with sqlite3.connect(path) as db:
            for sql in tables:
                db.execute(sql)
        before = path.read_bytes()
        with pytest.raises(CreError, match=rf"{name}: a SQLite database whose (meta|outcomes) table has other columns"
                           r" \(.*\), not an outcome store.*Give --store a new file name.*nothing was changed"):
            OutcomeStore(path)
        assert path.read_bytes() == before, name
    # A store whose first open stopped after creating its tables (no schema row, not yet
    # marked) still opens: its columns are the store's.
    cut = tmp_path / "cut.sqlite"
    OutcomeStore(cut).close()
    with sqlite3.connect(cut) as db:
        db.execute("DELETE FROM meta")
        db.execute("PRAGMA application_id = 0")
    with OutcomeStore(cut) as again:
        assert again.count() == 0


def test_store_rows_are_plain_json(store) -> None:
    store.put("p", "small", "m", "k", 7, [Vote("x", 1, 0.5)])
    raw = store._db.execute("SELECT votes FROM outcomes").fetchone()[0]
    assert json.loads(raw) == [["x", 1, 0.5]]
    assert store.get("p", "small", "m", "k") == (7, [Vote("x", 1, 0.5)])
    assert store.get("p", "small", "other", "k") is None


def test_cost_in_bench_seconds_when_every_model_is_benchmarked(settings, bench_speeds) -> None:
    o = run_outcome("medium", [("a", 4, 9.0), ("a", 2, 7.0)], prompt_tokens=50)
    bench_speeds({"small": (400.0, 40.0), "medium": (100.0, 20.0)})
    assert CostModel.build([o], settings.ladder_specs()).unit == "seconds"  # large not benchmarked
    bench_speeds({"large": (25.0, 10.0)})
    costs = CostModel.build([o], settings.ladder_specs())
    assert costs.unit == "bench-seconds"
    # vote 0: 50 prompt tokens at 100/s and 4 output tokens at 20/s; vote 1: 2 tokens at 20/s.
    # The measured 9 and 7 seconds (a busy machine) play no part.
    assert costs.votes(o) == [pytest.approx(0.5 + 0.2), pytest.approx(0.1)]
    with pytest.raises(ConfigError, match="cre models bench medium"):
        CostModel("bench-seconds", {}, {}, {"small": bench.Rates(1.0, 1.0)}).votes(o)


def test_recorded_votes_and_live_votes_get_identical_parameters(settings, store, fake_backends) -> None:
    """Calibration replays recorded votes, so they must be drawn exactly as the cascade draws them."""
    from crecli.escalate import check

    quality = QualityCheck(k=4, temperature=0.4, top_p=0.8, top_k=12, early_stop=False)
    record = rec(3, match="choice", ref="(A)")
    created = fake_backends({"small": lambda text, p: "(B)"})
    collect([record], settings, store, quality, models=["small"])
    recorded = [p for _, p in created["small"].calls]
    live_backend = created["small"]
    live_backend.calls.clear()
    check(live_backend, record.prompt, quality, 1.0, grading.max_tokens_for("choice"), "choice")
    live = [p for _, p in live_backend.calls]
    assert len(recorded) == len(live) == 4
    # Seeds, temperature, top-p/top-k, max tokens and stop strings, vote by vote.
    assert recorded == live
    assert [p.seed for p in live] == [0] + [vote_seed(record.prompt, i) for i in (1, 2, 3)]
    assert live[0].temperature == 0.0 and {p.temperature for p in live[1:]} == {0.4}


def test_answers_recorded_under_another_prompt_format_are_not_reused(settings, store, fake_backends) -> None:
    # The rows' key leaves models.toml's prompt_format out: after changing it, a fit reused
    # every answer of the old rendering and measured a format the router no longer used.
    from dataclasses import replace

    records = [rec(i) for i in range(2)]
    fake_backends({})
    collect(records, settings, store, QualityCheck(k=1))
    collect(records, settings, store, QualityCheck(k=1))  # the same rendering: reused
    small = settings.get("small")
    changed = replace(small, prompt_format="completion" if small.prompt_format != "completion" else "chatml")
    settings.models["small"] = changed
    with pytest.raises(CreError, match="holds answers of small rendered as .*Give --store a new file"):
        collect(records, settings, store, QualityCheck(k=1))


@pytest.mark.parametrize("votes", ['[["4", 1, 0.5]', '[["4", "one", 0.5]]', '[["4"]]', "{}x", '[["4", 1]]', '[5]',
                                   '[["4", Infinity, 0.5]]', '[["4", 1, 1' + '0' * 400 + ']]'])
def test_a_row_damaged_inside_is_run_again_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            votes: str) -> None:
    # Damage in a row's bytes passes `quick_check` (the file's pages are whole); `get` ended
    # the run in a raw json.loads or int() error. The row reads as never recorded: its model
    # runs again and the new row replaces it.
    import sqlite3

    path = tmp_path / "s.sqlite"
    with OutcomeStore(path) as store:
        store.put("a" * 64, "small", "", "k", 5, [Vote("4", 1, 0.5)])
        store.put("b" * 64, "small", "", "k", 5, [Vote("5", 1, 0.5)])
    db = sqlite3.connect(path)
    db.execute("UPDATE outcomes SET votes = ? WHERE prompt_sha256 = ?", (votes, "a" * 64))
    db.commit()
    db.close()
    with OutcomeStore(path) as store:
        assert store.get("a" * 64, "small", "", "k") is None and store.unreadable == 1
        assert store.get("b" * 64, "small", "", "k") == (5, [Vote("5", 1, 0.5)])  # the others stay
        store.put("a" * 64, "small", "", "k", 5, [Vote("4", 1, 0.5)])
        assert store.get("a" * 64, "small", "", "k") == (5, [Vote("4", 1, 0.5)])
    assert "a recorded outcome could not be read (a damaged row)" in capsys.readouterr().err
