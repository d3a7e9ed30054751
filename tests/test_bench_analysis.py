"""Analysis scripts in bench/ that read files and run nothing: their arithmetic, on made-up
inputs whose answers are worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from crecli.costs import Pricing, TokenCounts
from crecli.models import bench

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cluster(cid: int, size: int, start: str, stats: dict[str, tuple[float, float]]) -> SimpleNamespace:
    return SimpleNamespace(id=cid, size=size, model=start,
                           stats={m: {"accuracy": a, "mean_cost": c} for m, (a, c) in stats.items()})


def test_break_even_is_the_cost_share_and_a_perfect_check_pays_only_above_it() -> None:
    be = _script("break_even")
    router = SimpleNamespace(ladder_names=["s", "t"], clusters=[
        # On t: s right 60% at 40% of t's cost. A perfect check costs 0.4 + 0.4 = 0.8 of t.
        _cluster(0, 10, "t", {"s": (0.6, 0.4), "t": (0.9, 1.0)}),
        # On t: s right 30% at 40%: below break-even, 0.4 + 0.7 = 1.1 of t, never pays.
        _cluster(1, 30, "t", {"s": (0.3, 0.4), "t": (0.8, 1.0)}),
        # Already starts on s.
        _cluster(2, 60, "s", {"s": (0.9, 0.5), "t": (0.9, 2.0)}),
    ])
    rows = be.clusters(router)
    first = rows[0]["rungs"]["s"]
    assert first["break_even"] == pytest.approx(0.4) and first["margin"] == pytest.approx(0.2)
    assert first["perfect_check_cost"] == pytest.approx(0.8)
    assert rows[1]["rungs"]["s"]["perfect_check_cost"] == pytest.approx(1.1)
    s = be.summary(rows, "t")
    assert s["start_on_strongest"] == 40 and s["clusters_on_strongest"] == 2
    assert s["perfect_check_pays"]["clusters"] == 1 and s["perfect_check_pays"]["queries"] == 10
    # Starts cost 10 x 1 + 30 x 1 + 60 x 0.5 = 70; a perfect check saves 10 x 1 x 0.2 = 2.
    assert s["perfect_check_pays"]["saved_share_of_start_cost"] == pytest.approx(2 / 70)


def test_break_even_with_the_real_check_replays_each_start_on_its_p_correct() -> None:
    from crecli.quality import QualityCheck
    from crecli.querylog import Record
    from crecli.replay import Replay, _Entry

    be = _script("break_even")
    # Cluster 0 starts on t (cost 10 an answer); s costs 2 and is right on q0-q5 of 10,
    # sure (P 0.9) of q0-q4 and of the wrong q9, unsure (0.1) of the rest; t is right on all
    # but q9. Cluster 1 already starts on s.
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(12)]
    entries, p = {}, {}
    for i, r in enumerate(records):
        s_right = i < 6 or i == 10
        entries[(r.id, "s")] = _Entry(("1" if s_right else "2",), (s_right,), (2.0,))
        entries[(r.id, "t")] = _Entry(("1" if i != 9 else "2",), (i != 9,), (10.0,))
        p[(r.id, "s")] = 0.9 if i < 5 or i == 9 else 0.1
    data = SimpleNamespace(records=records, clusters=[0] * 10 + [1, 1],
                           replay=Replay(entries, records, ["s", "t"], "seconds"))
    clusters = {0: SimpleNamespace(id=0, model="t"), 1: SimpleNamespace(id=1, model="s")}
    router = SimpleNamespace(ladder_names=["s", "t"], quality=QualityCheck(k=1), clusters=list(clusters.values()),
                             cluster=clusters.get)
    [row] = be.with_check(data, router, p)  # only the cluster that starts on t
    assert (row["cluster"], row["size"], row["strongest_accuracy"], row["strongest_cost"]) == (0, 10, 0.9, 10.0)
    at = {st["threshold"]: st for st in row["starts"]}
    # At 0.5: s keeps q0-q4 and q9 (5 of 6 right); t answers q5-q8, all right: 9 of 10, as
    # t alone. Cost 2 + 4 x 10 / 10 = 6 a query: 60% of t's.
    assert at[0.5]["accepted_share"] == 0.6 and at[0.5]["accepted_accuracy"] == pytest.approx(5 / 6)
    assert at[0.5]["accuracy_share"] == pytest.approx(1.0) and at[0.5]["cost_share"] == pytest.approx(0.6)
    assert at[0.9]["cost_share"] == pytest.approx(0.6)  # P 0.9 is still kept at 0.9
    assert row["best"]["cost_share"] == pytest.approx(0.6)
    # The router's starts: cluster 0 on t (10 x 10), cluster 1 on s (2 x 2) = 104; the start saves 10 x 10 x 0.4.
    assert be.starts_cost(data, router) == pytest.approx(104.0)
    assert be.check_summary([row], 104.0) == {"clusters": 1, "queries": 10, "saved_share_of_start_cost": pytest.approx(40 / 104)}


def test_cost_vs_clock_splits_a_batch_by_model_at_the_price_batch_uses(tmp_path: Path) -> None:
    cvc = _script("cost_vs_clock")
    pricing = Pricing("bench-seconds", {}, {"s": bench.Rates(100.0, 10.0), "t": bench.Rates(50.0, 5.0)}, {"s": 10, "t": 10})
    step = lambda model, pt, ot, sec: {"model": model, "prompt_tokens": pt, "output_tokens": ot, "seconds": sec}
    out = tmp_path / "batch.jsonl"
    out.write_text("\n".join(json.dumps({"line": line, "trace": {"cluster": 0, "steps": steps}}) for line, steps in (
        (1, [step("s", 110, 5, 2.0), step("t", 60, 5, 3.0)]),  # escalated: both rungs' steps count
        (2, [step("t", 110, 0, 1.0)]),
    )) + "\n")
    by = cvc.by_model(out, pricing, ["What is 7 plus 5?", "What is 8 plus 9?"], TokenCounts(lambda model: FakeWords()))
    # s: 100 tokens after its head at 100/s plus 5 at 10/s = 1.5. t: 50/50 + 5/5 = 2, and
    # line 2, after line 1 of its cluster, shares "What is" (two words): 98/50.
    assert by["s"] == pytest.approx({"steps": 1, "seconds": 2.0, "priced": 1.5, "seconds_per_priced": 2.0 / 1.5})
    assert by["t"] == pytest.approx({"steps": 2, "seconds": 4.0, "priced": 2.0 + 98 / 50, "seconds_per_priced": 4.0 / 3.96})


class FakeWords:
    def text_tokens(self, text: str) -> list[str]:
        return text.split()


def test_cost_vs_clock_measures_drift_on_the_prompts_both_batches_gave_the_strongest_model(tmp_path: Path) -> None:
    cvc = _script("cost_vs_clock")
    step = lambda model, pt, ot, sec: {"model": model, "prompt_tokens": pt, "output_tokens": ot, "seconds": sec}
    cascade, alone = tmp_path / "c.jsonl", tmp_path / "a.jsonl"
    cascade.write_text("\n".join(json.dumps({"id": i, "trace": {"steps": steps}}) for i, steps in (
        ("a", [step("s", 50, 2, 0.5)]),  # answered lower: not work both batches did
        ("b", [step("s", 50, 2, 0.5), step("t", 60, 4, 3.0)]),  # escalated to t
        ("c", [step("t", 70, 3, 2.5)]),
        ("d", [step("t", 70, 9, 9.0)]),  # t wrote another answer here: not the same work
    )) + "\n")
    alone.write_text("\n".join(json.dumps({"id": i, "trace": {"steps": [step("t", pt, ot, sec)]}}) for i, pt, ot, sec in (
        ("a", 40, 2, 1.0), ("b", 60, 4, 2.0), ("c", 70, 3, 2.0), ("d", 70, 3, 2.0),
    )) + "\n")
    got = cvc.same_work(cvc.steps_by_id(cascade, "t"), cvc.steps_by_id(alone, "t"))
    # Only b and c: 3.0 + 2.5 in the cascade's batch against 2.0 + 2.0 alone.
    assert got == pytest.approx({"prompts": 2, "cascade_seconds": 5.5, "strongest_seconds": 4.0, "ratio": 5.5 / 4.0})


def test_cost_vs_clock_splits_a_round_into_the_steps_and_the_time_outside_them() -> None:
    cvc = _script("cost_vs_clock")
    arm = lambda wall, *steps: {"wall_seconds": wall, "outside_steps_seconds": wall - sum(steps),
                                "by_model": {f"m{i}": {"seconds": sec} for i, sec in enumerate(steps)}}
    # Cascade: 60 s of steps on two models, 6 s outside; alone: 100 s of steps, 2 s outside.
    got = cvc.split_wall(arm(66.0, 50.0, 10.0), arm(102.0, 100.0))
    assert got["steps_ratio"] == pytest.approx(0.6)
    assert got["outside_points"] == pytest.approx(4.706, abs=1e-3)  # 66/102 = 0.6471: 4.7 points the steps do not explain
    assert got["outside_seconds"] == pytest.approx({"cascade": 6.0, "strongest": 2.0})
    assert got["load_seconds"] == {"cascade": 0, "strongest": 0}  # a summary from before it gave them
    loaded = cvc.split_wall({**arm(66.0, 60.0), "load_seconds": {"m0": 1.5, "m1": 0.5}}, arm(102.0, 100.0))
    assert loaded["load_seconds"] == pytest.approx({"cascade": 2.0, "strongest": 0})


def test_batch_reuse_rebuilds_the_order_a_model_saw_and_counts_what_reuse_leaves() -> None:
    br = _script("batch_reuse")
    row = lambda i, cluster, *models: {"id": i, "trace": {"cluster": cluster, "steps": [{"model": m} for m in models]}}
    rows = [row("a", 2, "t"), row("b", 1, "s"), row("c", 1, "s", "t"), row("d", 2, "t"), row("e", 0, "t")]
    # Chunks of 3 lines: a, b, c (t: a in cluster 2, c in 1, so c first), then d, e (e's cluster 0 first).
    assert [r["id"] for r in br.model_order(rows, "t", 3)] == ["c", "a", "e", "d"]
    # Each prompt evaluates what it does not share with the one before; the first, everything.
    got = br.evaluated([("c", [1, 2, 3, 4]), ("a", [1, 2, 9]), ("e", [1, 2, 9, 7, 7]), ("d", [5])])
    assert got == {"c": 4, "a": 1, "e": 2, "d": 1}


def test_against_plain_reports_every_budget_of_the_frontier_as_shares_of_the_plain_model() -> None:
    ap = _script("against_plain")
    ref = "t only"
    points = [{"name": ap.DEFERRAL, "accuracy": 0.5, "mean_cost": 0.6},
              {"name": ap.frontier_name(0.9), "accuracy": 0.45, "mean_cost": 0.4},
              {"name": ap.MATCHED, "accuracy": 0.41, "mean_cost": 0.35},
              {"name": ref, "accuracy": 0.55, "mean_cost": 0.8}]
    headline = {"mode": "cross-fitted", "retain": 0.98, "frontier": [0.9],
                "runs": [{"seed": 0, "n": 10, "unit": "bench-seconds", "reference": ref, "points": points}]}
    plain = {"summary": {"model": "t", "n": 10, "unit": "bench-seconds", "accuracy": 0.4, "mean_cost": 1.0,
                         "mean_output_tokens": 3.0}}
    result = ap.compare(headline, plain)
    assert result["retain"] == [0.98, 0.9]
    lower = result["arms"][ap.frontier_name(0.9)]
    assert lower["accuracy_share"]["mean"] == pytest.approx(0.45 / 0.4) and lower["cost_share"]["mean"] == pytest.approx(0.4)
    assert result["arms"][ap.DEFERRAL]["cost_share"]["mean"] == pytest.approx(0.6)
    matched = result["arms"][ap.MATCHED]  # the budget each fold set from the plain prompt (--match-plain)
    assert matched["accuracy_share"]["mean"] == pytest.approx(0.41 / 0.4) and matched["cost_share"]["mean"] == pytest.approx(0.35)
    with pytest.raises(SystemExit):  # another log
        ap.compare(headline, {"summary": {**plain["summary"], "n": 11}})


def test_against_plain_scores_the_plain_model_on_the_queries_a_held_out_split_scored(tmp_path: Path) -> None:
    ap = _script("against_plain")
    line = lambda i, task: json.dumps({"id": i, "prompt": "p", "meta": {"source": task}})
    log, test_log = tmp_path / "log.jsonl", tmp_path / "large.jsonl"
    log.write_text(line("a", "t") + "\n")
    # Beyond the log: b, c, d of task t and e, f of u; with --test-fit-every 2 the first, third...
    # of each task join the fit part (b, d, e), the others are scored.
    test_log.write_text("\n".join([line("a", "t"), line("b", "t"), line("c", "t"), line("d", "t"), line("e", "u"),
                                   line("f", "u")]) + "\n")
    ids = ap.scored_ids(log, test_log, 2)
    assert ids == ["c", "f"]
    rows = [{"id": i, "correct": ok, "cost": cost, "output_tokens": 2}
            for i, ok, cost in [("a", True, 9.0), ("b", True, 9.0), ("c", True, 1.0), ("d", False, 9.0),
                                ("e", True, 9.0), ("f", False, 3.0)]]
    plain = {"summary": {"model": "t", "n": 6, "unit": "bench-seconds", "accuracy": 0.67, "mean_cost": 6.7,
                         "mean_output_tokens": 2.0}, "rows": rows}
    ref = "t only"
    with_ex = [{"name": ap.DEFERRAL, "accuracy": 0.5, "mean_cost": 1.5}, {"name": ref, "accuracy": 1.0, "mean_cost": 4.0}]
    without = [{"name": ap.DEFERRAL, "accuracy": 0.5, "mean_cost": 1.0}, {"name": ref, "accuracy": 0.5, "mean_cost": 2.0}]
    headline = {"mode": "split", "retain": 0.98, "frontier": [], "shots": ["0,1,3"],
                "runs": [{"seed": 0, "n": 2, "unit": "bench-seconds", "reference": ref, "points": with_ex,
                          "plain": {"reference": ref, "points": without}}]}
    result = ap.compare(headline, plain, ids)
    # The plain model on c and f alone: one right of two, mean cost (1 + 3) / 2 = 2.
    assert result["plain"]["accuracy"] == pytest.approx(0.5) and result["plain"]["mean_cost"] == pytest.approx(2.0)
    arms = result["arms"]
    assert arms[ap.DEFERRAL]["accuracy_share"]["mean"] == pytest.approx(1.0)
    assert arms[ap.DEFERRAL]["cost_share"]["mean"] == pytest.approx(0.75)
    assert arms[ref]["accuracy_share"]["mean"] == pytest.approx(2.0)
    assert arms[ap.WITHOUT + ap.DEFERRAL]["cost_share"]["mean"] == pytest.approx(0.5)
    with pytest.raises(SystemExit):  # a split needs the ids it scored
        ap.compare(headline, plain)
    with pytest.raises(SystemExit):  # the plain run lacks a scored query
        ap.compare(headline, {**plain, "rows": rows[:2]}, ids)
    # The split the headline recorded is redone without being told; one given that differs
    # from it is refused, and a split given for a cross-fitted run too.
    recorded = {**headline, "split": {"log": str(log), "test_log": str(test_log), "test_fit_every": 2}}
    assert ap.split_of(recorded, None, None, None) == ["c", "f"]
    assert ap.split_of(headline, log, test_log, 2) == ["c", "f"]  # a file from before splits were recorded
    for bad in [lambda: ap.split_of(recorded, None, None, 3), lambda: ap.split_of(headline, None, None, None),
                lambda: ap.split_of({"mode": "cross-fitted"}, log, test_log, None)]:
        with pytest.raises(SystemExit):
            bad()


def test_path_speeds_recovers_the_speeds_and_the_per_answer_constant_that_made_the_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # path_speeds imports its sibling cost_vs_clock
    ps = _script("path_speeds")
    shapes = [(10, 1), (50, 3), (80, 9), (30, 2)]
    # 100 prompt tokens/s and 10 output tokens/s, then the same with 0.5 s on every answer.
    pp, tg = ps.fit_speeds([(p, o, p / 100 + o / 10) for p, o in shapes])
    assert (pp, tg) == (pytest.approx(100.0), pytest.approx(10.0))
    fit = ps.fit_with_constant([(p, o, 0.5 + p / 100 + o / 10) for p, o in shapes])
    assert fit["per_answer_seconds"] == pytest.approx(0.5)
    assert (fit["pp_tokens_per_s"], fit["tg_tokens_per_s"]) == (pytest.approx(100.0), pytest.approx(10.0))
    with pytest.raises(SystemExit):  # rows no positive speeds explain
        ps.fit_speeds([(p, o, 1.0 - p / 100) for p, o in shapes])


def test_price_choice_deals_every_copy_of_a_prompt_into_one_fold(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Its folds ignored repeated prompts: copies share one recorded answer, so a copy in
    # another fold put a held-out query's own answer among those that chose its model.
    import numpy as np

    from crecli import calibrate, costs
    from crecli.outcomes import Outcome, Vote, graded, prompt_sha256
    from crecli.querylog import Record

    pc = _script("price_choice")
    ladder = ["s", "t"]
    records = [Record(id=f"q{i}-{copy}", prompt=f"What is {i} plus 1?", reference=[str(i + 1)], match="numeric",
                      meta={"source": "odd" if i % 2 else "even"}) for i in range(12) for copy in range(3)]
    found = {(r.id, m): Outcome(r.id, "", m, "", "", "run", 10, [Vote(
        r.reference[0] if m == "t" or int(r.reference[0]) % 2 else "0", 1, 0.1 if m == "s" else 1.0)])  # type: ignore[index]
        for r in records for m in ladder}
    model = costs.CostModel.build(found.values())
    C = np.array([[graded(found[(r.id, m)], r)[0] for m in ladder] for r in records], dtype=float)
    K = np.array([[model.of(found[(r.id, m)]) for m in ladder] for r in records], dtype=float)
    rec = SimpleNamespace(records=records, ladder=ladder, found=found, model=model, C=C, K=K)
    identity = [prompt_sha256(r.prompt) for r in records]

    def one_home(folds: list[Any], prompts: list[str]) -> None:
        home: dict[str, int] = {}
        for f, fold in enumerate(folds):
            for i in fold:
                assert home.setdefault(prompts[i], f) == f, f"copies of {prompts[i][:8]} in folds {home[prompts[i]]} and {f}"

    drawn: list[int] = []
    real = calibrate.folds

    def folds(n: int, k: int, seed: int, prompts: Any = None) -> list[list[int]]:
        assert prompts is not None, "folds drawn without the prompts: copies of one may land in two folds"
        out = real(n, k, seed, prompts)
        one_home(out, prompts)
        drawn.append(n)
        return out

    monkeypatch.setattr(calibrate, "folds", folds)
    monkeypatch.setattr(pc, "recorded", lambda log, unit: rec)
    monkeypatch.setattr(sys, "argv", ["price_choice.py", "log.jsonl", "--seeds", "5", "--json"])
    pc.main()
    assert json.loads(capsys.readouterr().out)["queries"] == 36
    assert 36 in drawn and any(n < 36 for n in drawn)  # the outer folds and the inner ones
    # And the folds are of the right records: each outer fold's inner folds split its rest.
    h = pc.Harness(rec, [r.meta["source"] for r in records])
    outer = h.folds(np.arange(36), 5)
    one_home(outer, identity)
    assert sorted(np.concatenate(outer).tolist()) == list(range(36))
    train = np.setdiff1d(np.arange(36), outer[0])
    inner = h.folds(train, 7)
    one_home(inner, identity)
    assert sorted(np.concatenate(inner).tolist()) == train.tolist()


def test_frontier_bound_leaves_out_a_query_too_long_for_every_rung(
    tmp_path: Path, tiny_models_toml: Path, fake_backends: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    # `collect` stopped at a prompt too long for a model's context; since it gives a too-long
    # outcome instead, `recorded` (and price_choice) scored one that no rung can take as a
    # wrong answer at no cost on every rung, silently, where `cre fit` and `cre eval` leave it out.
    from support.ladder import too_long_for

    fb = _script("frontier_bound")
    log = tmp_path / "sums.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "reference": str(2 * i), "match": "numeric"} for i in range(4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_backends({m: too_long_for(lambda text, params: "0", {"What is 3 plus 3?"}) for m in ("small", "medium", "large")})
    monkeypatch.setenv("CRE_MODELS", str(tiny_models_toml))
    rec = fb.recorded(log, None)
    assert [r.id for r in rec.records] == ["q0", "q1", "q2"] and rec.C.shape == rec.K.shape == (3, 3)
    assert f"{log}:4: left out: its prompt is too long for every rung's context" in capsys.readouterr().err


def test_check_levers_cluster_correction_learns_a_signal_the_offset_does_not_carry() -> None:
    import numpy as np

    cl = _script("check_levers")
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]] * 5)
    right = (x[:, 0] > 0).astype(float)
    zero = np.zeros(len(x))
    # Right exactly where the signal is high: a positive weight; backwards, a negative one.
    assert cl._offset_logistic(x, right, zero, 1.0)[0] > 1.0
    assert cl._offset_logistic(x, 1.0 - right, zero, 1.0)[0] < -1.0
    # An offset that already says it all leaves little to correct, and a heavy ridge keeps
    # the shipped model (a correction of zero) whatever the data.
    sure = np.where(right > 0, 6.0, -6.0)
    assert abs(cl._offset_logistic(x, right, sure, 1.0)[0]) < 0.2
    assert np.abs(cl._offset_logistic(x, right, zero, 1e9)).max() < 1e-6


def test_headline_prints_the_within_cluster_auroc_and_reads_json_written_before_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.machinery import SourceFileLoader

    # bench/headline has no .py suffix, so its loader is named outright.
    loader = SourceFileLoader("bench_headline", str(BENCH / "headline"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    headline = importlib.util.module_from_spec(spec)
    loader.exec_module(headline)
    old = {"p_correct": {"auroc": 0.8, "n": 10}}
    new = {"p_correct": {"auroc": 0.9, "n": 10, "within_cluster": 0.6, "within_cluster_n": 8}}
    runs = [{"folds": [{"deferral": {"signals": {"s": old}}}, {"deferral": {"signals": {"s": new}}}]}]
    headline.print_signals(runs)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("s "))
    # Over all answers, both folds (0.85); within a cluster, the one fold that has it.
    assert row.split()[1:] == ["0.850", "/", "0.600"]


def test_check_levers_counts_answers_per_cluster_and_the_copies_of_each_prompt() -> None:
    from crecli.models.backend import Signals
    from crecli.querylog import Record
    from crecli.replay import _Entry

    cl = _script("check_levers")
    # Cluster 0: "A" three times (q0 and its copy q1 right, q2 wrong), "B" once (right);
    # q5's answer came without signals, so no deferral model reads it; q6 is another cluster's.
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="exact") for i in range(7)]
    answers = ["A", "A", "A", "B", "B", "A", "A"]
    right = [True, True, False, True, False, True, True]
    entries = {(r.id, "s"): _Entry((a,), (y,), (1.0,), signals=None if i == 5 else Signals(-1.0, -0.5, None))
               for i, (r, a, y) in enumerate(zip(records, answers, right))}
    data = SimpleNamespace(records=records, clusters=[0, 0, 0, 0, 1, 0, 2],
                           prompt_ids=["x", "x", "y", "z", "w", "v", "u"], replay=SimpleNamespace(entries=entries))
    by_answer, by_prompt = cl.answer_counts(data, range(6), "s")  # q6 is not a training record
    assert dict(by_answer) == {(0, "A"): [2.0, 3.0], (0, "B"): [1.0, 1.0], (1, "B"): [0.0, 1.0]}
    # q0's own answer, less its prompt's copies (q0 and q1): "A" right 0 of 1 among the others.
    assert by_prompt[(0, "x")] == [2.0, 2.0] and by_prompt[(0, "y")] == [0.0, 1.0]


def test_check_levers_witness_bound_pays_the_rung_below_and_takes_other_starts_from_the_shipped_check() -> None:
    from crecli.quality import QualityCheck
    from crecli.querylog import Record
    from crecli.replay import Replay, _Entry

    cl = _script("check_levers")
    # One cluster of 10 that starts on t (cost 10, right on all). w (cost 1) is wrong on all;
    # s (cost 2) is right on q0-q7. Read with the rung below's answer, s's P(correct) is 0.9
    # on q0-q7 and 0.1 on q8-q9; the shipped P says 0.5 on every one of s's answers.
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(10)]
    entries: dict[Any, Any] = {}
    witness, shipped = {}, {}
    for i, r in enumerate(records):
        entries[(r.id, "w")] = _Entry(("2",), (False,), (1.0,))
        entries[(r.id, "s")] = _Entry(("1" if i < 8 else "3",), (i < 8,), (2.0,))
        entries[(r.id, "t")] = _Entry(("1",), (True,), (10.0,))
        witness[(r.id, "w")] = shipped[(r.id, "w")] = 0.1
        witness[(r.id, "s")], shipped[(r.id, "s")] = (0.9 if i < 8 else 0.1), 0.5
    data = SimpleNamespace(records=records, clusters=[0] * 10, replay=Replay(entries, records, ["w", "s", "t"], "seconds"))
    info = SimpleNamespace(id=0, model="t")
    router = SimpleNamespace(ladder_names=["w", "s", "t"], quality=QualityCheck(k=1), clusters=[info],
                             cluster={0: info}.get)
    # The shipped P finds no start that keeps t's accuracy for less: kept at 0.5 or below, s's
    # 2 wrong answers stay (80%); above it, every query pays s and t (120%).
    assert cl.bound(data, router, shipped, None, 100.0, witness=False)["clusters"] == 0
    # The witness start pays w and s on every query and t on the 2 sent up: 1 + 2 + 2 = 5 of
    # t's 10, as right as t. It saves 10 x 10 x 0.5 of the starts' 100.
    assert cl.bound(data, router, witness, shipped, 100.0, witness=True) == {
        "clusters": 1, "queries": 10, "saved_share_of_start_cost": pytest.approx(0.5)}
    # What a start on s alone would give is priced at the shipped P: handing it the witness
    # P (as if w's answer were there for free) would claim 2 + 2 = 4.
    rows = cl.break_even.with_check(data, router, witness, {"s": cl.break_even.grid(["w", "s", "t"], "s")})
    assert min(st["cost_share"] for st in rows[0]["starts"] if st["accuracy_share"] >= 0.98) == pytest.approx(0.4)
