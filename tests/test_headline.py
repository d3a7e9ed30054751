"""`bench/headline`, cross-fitted: folds that hold every query out once, held-out reports
pooled over all queries (`evaluate.pool`), and whole tasks held out for --leave-tasks-out.

The bench runs `cre` in a subprocess; here its runner is swapped for an in-process one, so
the fake models of `skilled_fakes` (conftest) answer and nothing real runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from crecli.cli import app
from crecli.evaluate import CASCADE, RANDOM, Point, pool
from support.logs import SMALL_LOG

HEADLINE = Path(__file__).resolve().parents[1] / "bench" / "headline"
runner = CliRunner()


def _bench() -> ModuleType:
    # bench/headline is a script without a .py suffix, so name its loader explicitly.
    loader = importlib.machinery.SourceFileLoader("headline", str(HEADLINE))
    spec = importlib.util.spec_from_loader("headline", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _in_process(models: Path):
    def run(*args: str) -> dict:
        result = runner.invoke(app, [*args, "--models", str(models), "--json"])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return json.loads(result.stdout)

    return run


def test_pool_weights_by_queries_and_reprices_random_routing_at_the_pooled_cost() -> None:
    def points(a: float, b: float, cascade: tuple[float, float], rnd: float) -> list[Point]:
        return [Point(CASCADE, *cascade, 0.5), Point("a only", a, 1.0), Point("b only", b, 3.0),
                Point(RANDOM, rnd, cascade[1]), Point("oracle", 1.0, 1.0, note="ceiling")]

    # 10 queries with the cascade at cost 2 (random: half "a", half "b", 0.4), 30 at cost 3
    # (random: all "b", 0.6).
    first, second = points(0.2, 0.6, (0.3, 2.0), 0.4), points(0.4, 0.6, (0.5, 3.0), 0.6)
    pooled = {p.name: p for p in pool([(10, first), (30, second)])}
    assert pooled["a only"].accuracy == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)
    assert pooled["b only"].accuracy == pytest.approx(0.6)
    assert pooled[CASCADE].accuracy == pytest.approx(0.45) and pooled[CASCADE].mean_cost == pytest.approx(2.75)
    assert pooled[CASCADE].escalation_rate == pytest.approx(0.5)
    assert pooled["a only"].escalation_rate is None and pooled["oracle"].note == "ceiling"
    # Random routing at the pooled cascade cost 2.75 mixes the pooled singles 12.5% "a", 87.5%
    # "b": 0.56875, not the query-weighted mean of the per-set mixtures (0.55).
    assert pooled[RANDOM].accuracy == pytest.approx(0.125 * 0.35 + 0.875 * 0.6)
    assert pooled[RANDOM].mean_cost == pytest.approx(2.75)
    with pytest.raises(ValueError):
        pool([(10, first), (10, first[:-1])])


def test_random_routing_at_a_cost_is_the_best_mixture_not_the_neighbours_in_cost() -> None:
    # The default ladder's shares: the 0.5B lies under the line from gemma to the 1.5B, so
    # mixing the two neighbours in cost (0.5B and 1.5B) read 0.8 points under the best
    # random mixture at the cascade's cost (gemma and the 1.5B).
    from crecli.evaluate import random_at_cost

    singles = [Point("gemma only", 0.332, 0.411), Point("0.5b only", 0.554, 0.620), Point("1.5b only", 1.0, 1.0)]
    best = random_at_cost(singles, 0.786)
    assert best.accuracy == pytest.approx(0.332 + (0.786 - 0.411) / (1.0 - 0.411) * (1.0 - 0.332))
    assert best.mean_cost == pytest.approx(0.786) and best.note.endswith("gemma, 64% 1.5b")
    assert best.accuracy > 0.554 + (0.786 - 0.620) / (1.0 - 0.620) * (1.0 - 0.554)  # the neighbours' mixture
    # A dearer, worse model is never mixed in: small 1.0 at 1.5, medium 0.0 at 4.5, large 1.0 at 15.
    ladder = [Point("small only", 1.0, 1.5), Point("medium only", 0.0, 4.5), Point("large only", 1.0, 15.0)]
    assert random_at_cost(ladder, 4.7).accuracy == pytest.approx(1.0)
    assert random_at_cost(ladder, 1.0).accuracy == 1.0 and random_at_cost(ladder, 20.0).mean_cost == 1.5
    # At most the target, below every model's cost as above it: no jump at the dearest model.
    steps = [Point("a only", 0.9, 1.0), Point("b only", 0.5, 2.0), Point("c only", 0.6, 3.0)]
    assert [random_at_cost(steps, c).accuracy for c in (2.99, 3.0, 3.5)] == [0.9, 0.9, 0.9]


def test_leave_tasks_out_folds_hold_whole_tasks() -> None:
    bench = _bench()
    lines = [json.dumps({"prompt": f"q{i}", "meta": {"source": f"task{i % 6}"}}) for i in range(30)]
    folds = bench.task_folds(lines, 2, seed=1)
    assert len(folds) == 3 and sorted(i for f in folds for i in f) == list(range(30))
    for fold in folds:
        held = {bench.task_of(lines[i]) for i in fold}
        assert len(held) == 2 and all(bench.task_of(l) not in held for j, l in enumerate(lines) if j not in fold)
    assert bench.task_folds(lines, 2, seed=1) == folds and bench.task_folds(lines, 2, seed=2) != folds


def test_cross_fitted_headline_holds_every_query_out_once_and_pools_over_all(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict  # noqa: F811
) -> None:
    bench = _bench()
    run = _in_process(tiny_models_toml)
    lines = [l for l in SMALL_LOG.read_text().splitlines() if l.strip()]
    result = bench.headline(run, lines, tmp_path, seeds=[0], n_folds=4, retain=0.98)

    [seed] = result["runs"]
    assert seed["n"] == len(lines) and len(seed["folds"]) == 4
    ids = [json.loads(l)["id"] for l in lines]
    held: list[str] = []
    for f in range(4):
        fit = {json.loads(l)["id"] for l in (tmp_path / "seed0" / f"fold{f}" / "fit.jsonl").read_text().splitlines()}
        test = [json.loads(l)["id"] for l in (tmp_path / "seed0" / f"fold{f}" / "test.jsonl").read_text().splitlines()]
        assert not fit & set(test) and len(fit) + len(test) == len(lines)  # fitted on the other folds only
        held += test
    assert sorted(held) == sorted(ids)  # every query held out exactly once

    # Figures that do not depend on the router (each model alone, the k-vote majority, the
    # oracle) pooled over the held-out folds equal those of the whole log evaluated at once.
    whole = run("eval", str(SMALL_LOG), "--router", str(tmp_path / "seed0" / "fold0" / "router.cre"))
    pooled = {p["name"]: p for p in seed["points"]}
    for p in whole["points"]:
        if p["name"].endswith(" only") or "majority" in p["name"] or p["name"].startswith("oracle"):
            assert pooled[p["name"]]["accuracy"] == pytest.approx(p["accuracy"]), p["name"]
            assert pooled[p["name"]]["mean_cost"] == pytest.approx(p["mean_cost"]), p["name"]
    ref = pooled[seed["reference"]]
    assert seed["reference"] == "large only" and ref["accuracy_share"] == 1.0 and ref["cost_share"] == 1.0
    cascade = pooled[CASCADE]
    assert cascade["cost_share"] < 1.0 and cascade["accuracy_share"] > 0.9
    assert pooled[RANDOM]["mean_cost"] == pytest.approx(cascade["mean_cost"])
    summary = {p["name"]: p for p in result["summary"]}
    assert summary[CASCADE]["accuracy"]["mean"] == cascade["accuracy"] and summary[CASCADE]["accuracy"]["std"] == 0.0


def test_further_budgets_recalibrate_each_folds_router_and_pool_as_a_frontier(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "FRONTIER", [0.5])
    run = _in_process(tiny_models_toml)
    lines = [l for l in SMALL_LOG.read_text().splitlines() if l.strip()]
    result = bench.headline(run, lines, tmp_path, seeds=[0], n_folds=2, retain=0.98)

    assert result["retain"] == 0.98 and result["frontier"] == [0.5]
    [seed] = result["runs"]
    pooled = {p["name"]: p for p in seed["points"]}
    lower, top = pooled[bench.frontier_name(0.5)], pooled[bench.DEFERRAL]
    held: list[tuple[int, list[Point]]] = []
    for f, fold in enumerate(seed["folds"]):
        reports = json.loads((tmp_path / "seed0" / f"fold{f}" / "reports.json").read_text())
        # The same fitted router, calibrated again for the further budget with the deferral check.
        cal = reports["calibrate-deferral-0.5"]
        assert cal["budget"] == {"kind": "retain", "value": 0.5} and reports["calibrate-deferral"]["budget"]["value"] == 0.98
        assert [r["retain"] for r in fold["frontier"]] == [0.5]
        assert fold["frontier"][0]["cost_share"] == reports["eval-deferral-0.5"]["cost_share"]
        ev = reports["eval-deferral-0.5"]
        held.append((ev["n"], [Point(**p) for p in ev["points"] if p["name"] == CASCADE]))
    [again] = pool(held)
    assert lower["accuracy"] == pytest.approx(again.accuracy) and lower["mean_cost"] == pytest.approx(again.mean_cost)
    # Half the strongest model's accuracy is cheaper to keep than 98% of it on these fakes.
    assert lower["mean_cost"] < top["mean_cost"]
    rnd = pooled[bench.random_name(0.5)]
    assert rnd["mean_cost"] == pytest.approx(lower["mean_cost"])
    assert {p["name"] for p in result["summary"]} >= {bench.frontier_name(0.5), bench.DEFERRAL}


def test_match_plain_sets_each_folds_budget_from_the_plain_prompt_on_its_fit_queries_alone(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    lines = [l for l in SMALL_LOG.read_text().splitlines() if l.strip()]
    ids = [json.loads(l)["id"] for l in lines]
    # A plain prompt right on every third query: well under what the fakes' strongest gets.
    monkeypatch.setattr(bench, "PLAIN", {i: n % 3 == 0 for n, i in enumerate(ids)})
    monkeypatch.setattr(bench, "FRONTIER", [0.5])
    result = bench.headline(_in_process(tiny_models_toml), lines, tmp_path, seeds=[0], n_folds=2, retain=0.98)

    assert result["matched"] is True
    [seed] = result["runs"]
    retains = []
    for f, fold in enumerate(seed["folds"]):
        reports = json.loads((tmp_path / "seed0" / f"fold{f}" / "reports.json").read_text())
        fit_ids = [json.loads(l)["id"] for l in (tmp_path / "seed0" / f"fold{f}" / "fit.jsonl").read_text().splitlines()]
        match = reports["match"]
        # The fold's own fit queries set its budget; the held-out fold never does.
        assert match["plain_accuracy"] == pytest.approx(sum(bench.PLAIN[i] for i in fit_ids) / len(fit_ids))
        assert match["reference_accuracy"] == reports["calibrate-deferral"]["reference"]["accuracy"]
        assert match["retain"] == pytest.approx(match["plain_accuracy"] / match["reference_accuracy"])
        assert reports["calibrate-deferral-matched"]["budget"] == {"kind": "retain", "value": match["retain"]}
        assert fold["matched"]["cost_share"] == reports["eval-deferral-matched"]["cost_share"]
        retains.append(match["retain"])
    assert retains[0] != retains[1]  # two folds, two fit parts, two budgets
    pooled = {p["name"]: p for p in seed["points"]}
    matched, top = pooled[bench.MATCHED], pooled[bench.DEFERRAL]
    assert matched["mean_cost"] < top["mean_cost"]  # a third right is cheaper to keep than 98% of the strongest
    assert pooled[bench.RANDOM_MATCHED]["mean_cost"] == pytest.approx(matched["mean_cost"])

    # The tables print every budget, the frontier's and the matched one, with each fold's own --retain.
    capsys.readouterr()
    bench.report_cross_fit(SMALL_LOG, result["runs"], result["summary"], 2, 0.98)
    table = capsys.readouterr().out
    assert "\n     0.5 " in table and "\n   plain " in table
    assert f"{min(retains):.3f}-{max(retains):.3f}" in table


def test_match_plain_refuses_a_plain_file_of_another_log(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "PLAIN", {"someone-else": True})
    with pytest.raises(SystemExit, match="no answer for 1 fit queries"):
        bench.matched_retain([json.dumps({"id": "q1"})], 0.5, 1)


def test_match_plain_refuses_accuracies_of_different_queries_or_a_budget_calibrate_refuses(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "PLAIN", {"q1": True, "q2": False})
    fit = [json.dumps({"id": "q1"}), json.dumps({"id": "q2"})]
    assert bench.matched_retain(fit, 0.5, 2)["retain"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="scored 1 of a fold's 2"):  # e.g. one fit query shown as an example
        bench.matched_retain(fit, 0.5, 1)
    monkeypatch.setattr(bench, "PLAIN", {"q1": False, "q2": False})
    with pytest.raises(SystemExit, match="at most"):  # a plain prompt that got none right: --retain 0
        bench.matched_retain(fit, 0.5, 2)


def test_leave_tasks_out_evaluates_on_tasks_the_router_never_saw(
    tmp_path: Path, tiny_models_toml: Path, skilled_fakes: dict  # noqa: F811
) -> None:
    bench = _bench()
    lines = [l for l in SMALL_LOG.read_text().splitlines() if l.strip()]
    result = bench.headline(_in_process(tiny_models_toml), lines, tmp_path, seeds=[0], n_folds=5, retain=0.98, tasks_out=8)
    [seed] = result["runs"]
    assert result["mode"] == "leave-tasks-out" and len(seed["folds"]) == 2 and seed["n"] == len(lines)
    for f, fold in enumerate(seed["folds"]):
        fit_tasks = {json.loads(l)["meta"]["source"] for l in (tmp_path / "seed0" / f"fold{f}" / "fit.jsonl").read_text().splitlines()}
        assert len(fold["held_out"]) == 8 and not fit_tasks & set(fold["held_out"])
    assert {p["name"] for p in seed["points"]} >= {CASCADE, RANDOM, "large only"}


def test_a_test_log_split_holds_out_only_queries_the_fit_log_lacks() -> None:
    bench = _bench()

    def line(i: int, task: str) -> str:
        return json.dumps({"id": f"{task}-{i}", "prompt": f"q{i}", "meta": {"source": task}})

    train = [line(i, t) for t in "ab" for i in range(2)]
    test = train + [line(i, t) for t in "ab" for i in range(2, 6)]
    lines, held = bench.split_lines(train, test)
    assert lines[:4] == train and held == list(range(4, 12))
    # Every other new query of each task joins the fit part, after the fit log.
    lines, held = bench.split_lines(train, test, 2)
    fitted = [json.loads(lines[i])["id"] for i in range(len(lines)) if i not in held]
    assert fitted == ["a-0", "a-1", "b-0", "b-1", "a-2", "a-4", "b-2", "b-4"]
    assert sorted(json.loads(lines[i])["id"] for i in held) == ["a-3", "a-5", "b-3", "b-5"]
