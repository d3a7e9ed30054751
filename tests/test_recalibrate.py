"""`cre calibrate` and `cre eval` on a router from `cre fit`: they read the log as the fit
read it, find it from any folder, price every stored cost afresh, and `eval --force --live`
answers with the router as loaded. Fake models; the fits are real (TF-IDF, UMAP, HDBSCAN)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config, routerfile
from crecli.cli import app
from crecli.errors import CreError
from crecli.models.backend import GenParams
from crecli.models.fake import FakeBackend

runner = CliRunner()
TOPICS = ["What is {a} plus {b}?", "Add {a} and {b}: what is the sum?", "Compute {a} + {b} please."]


def _sum(text: str, params: GenParams) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", text.rsplit("Q:", 1)[-1].split("<|im_start|>user")[-1])]
    return str(sum(numbers[-2:])) if len(numbers) >= 2 else "?"


@pytest.fixture
def fakes(fake_backends: Callable[..., dict[str, FakeBackend]]) -> dict[str, FakeBackend]:
    return fake_backends({m: _sum for m in ("small", "medium", "large")})


def rows(n: int = 30, **names: str) -> list[dict[str, Any]]:
    f = {"id": "id", "prompt": "prompt", "reference": "reference", "match": "match", **names}
    return [
        {f["id"]: f"q{i}", f["prompt"]: TOPICS[i % 3].format(a=i, b=i + 1), f["reference"]: str(2 * i + 1), f["match"]: "numeric"}
        for i in range(n)
    ]


def write(path: Path, items: list[dict[str, Any]], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items) + extra)
    return path


def cre(*args: str | Path) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    return result


def ok(*args: str | Path) -> str:
    result = cre(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def fitted(tmp_path: Path, m: tuple[str, Path]) -> Path:
    """A router fitted on `rows()` (q0..q29) at tmp_path/router.cre."""
    router = tmp_path / "router.cre"
    ok("fit", write(tmp_path / "log.jsonl", rows()), "-o", router, *m)
    return router


SPEEDS = {"small": (400.0, 40.0), "medium": (200.0, 20.0), "large": (100.0, 10.0)}


def test_calibrate_and_eval_read_the_log_as_fit_read_it(fakes, tiny_models_toml: Path, tmp_path: Path) -> None:
    names = {"id": "key", "prompt": "question", "reference": "gold", "match": "kind"}
    long_line = json.dumps({"key": "long", "question": "What is 1 plus 2? " + "x" * 300, "gold": "3", "kind": "numeric"})
    # A .txt name, so only --format says it is JSONL; one bad line, one over the cap.
    log = write(tmp_path / "log.txt", rows(**names), "{not json\n" + long_line + "\n")
    router = tmp_path / "router.cre"
    m = ("--models", tiny_models_toml)
    ok("fit", log, "-o", router, *m, "--format", "jsonl", "--prompt-field", "question", "--reference-field", "gold",
       "--match-field", "kind", "--id-field", "key", "--skip-bad", "--max-prompt-bytes", "200")
    cal = json.loads(ok("calibrate", router, *m, "--folds", "2", "--json"))
    assert cal["n"] == 30  # the bad line and the long one skipped, as in the fit
    fit = routerfile.load(router, config.load(tiny_models_toml)).fit
    assert fit.reader.fmt == "jsonl" and fit.reader.skip_bad and fit.reader.fields.prompt == "question"
    assert fit.reader.fields.max_line_bytes == 200 and fit.n_bad_lines == 2
    # --max-prompt-bytes overrides the recorded cap: the long line is read now.
    cal = json.loads(ok("calibrate", router, *m, "--folds", "2", "--max-prompt-bytes", "1000", "--json"))
    assert cal["n"] == 31
    report = json.loads(ok("eval", log, "--router", router, *m, "--json"))
    assert report["n"] == 30 and report["cascade"]["accuracy"] == 1.0
    assert json.loads(ok("eval", log, "--router", router, *m, "--max-prompt-bytes", "1000", "--json"))["n"] == 31


def test_calibrate_finds_the_log_from_another_folder_and_says_when_it_moved_or_changed(
    fakes, tiny_models_toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    log = write(work / "log.jsonl", rows())
    monkeypatch.chdir(work)
    ok("fit", "log.jsonl", "-o", "router.cre", "--models", tiny_models_toml)  # a relative path
    router = work / "router.cre"

    monkeypatch.chdir(elsewhere)
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    # Given relatively, kept relative to the router file: no home folder's name in a file
    # meant for teammates, and found from any folder.
    assert loaded.fit.log == "log.jsonl" and routerfile.fit_log_path(loaded) == log

    # Changed since: only with --log naming it. A router file from someone else must not
    # choose which file every model runs over; it can name only the bytes it was fitted on.
    write(log, rows(32))
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    assert result.exit_code == 1 and f"pass --log {log.resolve()}" in str(result.exception) + result.output
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--log", log)
    assert result.exit_code == 0, result.output
    assert f"{log} has changed since the router was fitted on it" in result.stderr
    # Named relatively, from its folder: the same file, so the same warning (it compared
    # the recorded absolute path with the path as typed).
    monkeypatch.chdir(work)
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--log", "log.jsonl")
    assert result.exit_code == 0, result.output
    assert "log.jsonl has changed since the router was fitted on it" in result.stderr
    monkeypatch.chdir(elsewhere)

    log.rename(work / "moved.jsonl")
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    assert result.exit_code == 1
    assert f"fitted on {log.resolve()}, which is not there any more" in str(result.exception) + result.output
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--log", work / "moved.jsonl")


def test_a_fit_log_given_relatively_travels_with_its_router(
    fakes, tiny_models_toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shipped router recorded /work/main/examples/...: in any other clone its fit log was
    # "not there", so `cre eval` of a bundled log (all in it) said nothing of in-sample figures.
    repo = tmp_path / "repo"
    (repo / "examples").mkdir(parents=True)
    (repo / "routers").mkdir()
    log = write(repo / "examples" / "log.jsonl", rows())
    monkeypatch.chdir(repo)
    ok("fit", "examples/log.jsonl", "-o", tmp_path / "fitted.cre", "--models", tiny_models_toml)
    # Written elsewhere by calibrate -o: rebased to where that file is.
    ok("calibrate", tmp_path / "fitted.cre", "-o", "routers/r.cre", "--models", tiny_models_toml, "--folds", "2")
    settings = config.load(tiny_models_toml)
    assert routerfile.load(repo / "routers" / "r.cre", settings).fit.log == "../examples/log.jsonl"
    clone = tmp_path / "clone"
    repo.rename(clone)  # another clone, elsewhere
    monkeypatch.chdir(tmp_path)
    moved = routerfile.load(clone / "routers" / "r.cre", settings)
    assert routerfile.fit_log_path(moved) == clone / "examples" / "log.jsonl"
    part = write(tmp_path / "part.jsonl", rows()[:8])  # not the fit log's bytes: looked up in it
    report = json.loads(ok("eval", part, "--router", clone / "routers" / "r.cre", "--models", tiny_models_toml, "--json"))
    assert report["n_in_fit_log"] == report["n"] == 8 and report["in_sample"]
    # An absolute path given stays absolute.
    ok("fit", log.parent.parent.parent / "clone" / "examples" / "log.jsonl", "-o", tmp_path / "abs.cre",
       "--models", tiny_models_toml)
    assert routerfile.load(tmp_path / "abs.cre", settings).fit.log == str(clone / "examples" / "log.jsonl")


def test_calibrate_does_not_read_a_recorded_log_the_router_records_no_sha256_of(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # A router file from someone else naming a local file without its digest chose which of
    # this machine's files every model ran over (the sha256 check was skipped when null).
    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    loaded.fit = replace(loaded.fit, log_sha256=None)
    routerfile.save(loaded, router)
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    assert result.exit_code == 1
    assert "records no sha256 of it" in str(result.exception) + result.output
    assert f"pass --log {log.resolve()}" in str(result.exception) + result.output
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--log", log)


def test_eval_force_live_answers_with_the_router_as_loaded(fakes, tiny_models_toml: Path, tmp_path: Path) -> None:
    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    settings = config.load(tiny_models_toml)
    loaded = routerfile.load(router, settings)
    # The router says it was fitted with another small model file: only --force uses it.
    loaded.ladder[0] = replace(loaded.ladder[0], sha256="ab" * 32)
    routerfile.save(loaded, router)
    assert cre("eval", log, "--router", router, "--models", tiny_models_toml).exit_code == 1

    report = json.loads(ok("eval", log, "--router", router, "--models", tiny_models_toml, "--force", "--live", "--json"))
    live = report["live"]
    assert live["n"] == 30 and live["accuracy"] == 1.0
    assert live["replay"]["accuracy"] == report["cascade"]["accuracy"] and live["agreement"] == 1.0


def test_calibrate_force_on_other_model_files_records_the_files_it_calibrated_on(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # `cre calibrate --force` on a teammate's other model file kept the fitted file's sha256
    # in the ladder: the router claimed files it was not calibrated on, and needed --force
    # for good on the machine that calibrated it.
    mine = "cd" * 32
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(tiny_models_toml.read_text().replace("[models.small]\n", f'[models.small]\nsha256 = "{mine}"\n'))
    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", pinned)
    loaded = routerfile.load(router, config.load(pinned))
    assert loaded.ladder[0].sha256 == mine
    loaded.ladder[0] = replace(loaded.ladder[0], sha256="ab" * 32)  # fitted on another small file
    routerfile.save(loaded, router)
    assert cre("calibrate", router, "--models", pinned, "--folds", "2").exit_code == 1
    ok("calibrate", router, "--models", pinned, "--folds", "2", "--force")
    assert routerfile.load(router, config.load(pinned)).ladder[0].sha256 == mine  # no --force needed now
    # Where nothing identifies the local file (unpinned, not on disk), the router's pin stays:
    # a None would let any file pass for that rung from then on.
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--force")
    assert routerfile.load(router, config.load(pinned)).ladder[0].sha256 == mine


def test_calibrate_records_the_settings_each_rung_answered_with_here(
    fakes, tiny_models_toml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The warning for a rung that answers with other settings here says to recalibrate: the
    # calibrated router records this setup's settings (`LadderEntry.of`), so it stops, also
    # for a rung nothing identifies here, whose pin the router keeps.
    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    assert [e.context for e in routerfile.load(router, config.load(tiny_models_toml)).ladder] == [2048] * 3
    mine = tmp_path / "mine.toml"
    mine.write_text(tiny_models_toml.read_text().replace("[models.small]\n", "[models.small]\ncontext = 512\n"))
    capsys.readouterr()
    routerfile.load(router, config.load(mine))
    assert "model 'small' was fitted with context 2048, and has context 512 here" in capsys.readouterr().err
    ok("calibrate", router, "--models", mine, "--folds", "2")
    loaded = routerfile.load(router, config.load(mine))
    assert [e.context for e in loaded.ladder] == [512, 2048, 2048] and loaded.ladder[0].sha256 is None
    assert "fitted with" not in capsys.readouterr().err


def test_calibrate_prices_every_stored_cost_afresh(fakes, tiny_models_toml: Path, tmp_path: Path, bench_speeds) -> None:
    bench_speeds(SPEEDS)
    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    # Calibrated once at the fit's speeds first: calibration counts each cluster's queries
    # as the router assigns them (`route.route`), which may differ from the fit's
    # HDBSCAN labels for a few (seen on an AMX Xeon: a cluster of 10 counted 7), so only
    # two calibrations are sure to average the same queries.
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    settings = config.load(tiny_models_toml)
    before = routerfile.load(router, settings)
    assert before.fit.cost_unit == "bench-seconds"

    bench_speeds({m: (pp / 2, tg / 2) for m, (pp, tg) in SPEEDS.items()})  # a re-bench: half as fast as the fit believed
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    after = routerfile.load(router, settings)
    assert after.fit.cost_unit == "bench-seconds"
    compared = 0
    for old, new in zip(before.clusters, after.clusters):
        assert old.id == new.id
        for model, stats in old.stats.items():
            if stats["n"]:
                assert new.stats[model]["mean_cost"] == pytest.approx(2 * stats["mean_cost"])
                compared += 1
    assert compared
    assert before.fit.expected is not None and after.fit.expected is not None
    assert after.fit.expected.reference_cost == pytest.approx(2 * before.fit.expected.reference_cost)
    assert after.fit.simulated is not None and after.fit.simulated["unit"] == "bench-seconds"


def _only(*words: str) -> Callable[[str, GenParams], str]:
    """A fake model that adds right only in prompts worded with one of `words`."""

    def answer(text: str, params: GenParams) -> str:
        asked = text.rsplit("Q:", 1)[-1].split("<|im_start|>user")[-1]
        return _sum(text, params) if any(w in asked for w in words) else "0"

    return answer


def test_calibrate_replays_each_distinct_choice_once_and_chooses_on_the_estimate(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, bench_speeds,
) -> None:
    from crecli import calibrate, choice, replay

    bench_speeds(SPEEDS)
    fake_backends({"small": _only("plus"), "medium": _only("plus", "Add"), "large": _sum})
    log = write(tmp_path / "log.jsonl", rows(60))
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    settings = config.load(tiny_models_toml)
    loaded = routerfile.load(router, settings)
    ladder = loaded.ladder_names
    data = replay.prepare(loaded, settings, log)
    everything = list(range(len(data.records)))
    table = calibrate._table(data, everything, ladder)
    combos = [{m: 0.0 for m in ladder}, {**{m: 0.6 for m in ladder[:-1]}, ladder[-1]: 0.0}]

    real = calibrate._simulate
    calls: list[float] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "_simulate", counted)
    swept = calibrate._replay_grid(data, table, everything, combos, loaded.quality)
    distinct = {tuple(sorted(choice.choose_by_weight(table, w).models.items())) for w in calibrate.WEIGHT_GRID}
    assert len(distinct) > 1  # the prices do choose differently here
    assert len(calls) == len(distinct) * len(combos) < len(calibrate.WEIGHT_GRID) * len(combos)
    assert len(swept) == len(calibrate.WEIGHT_GRID) * len(combos)
    for setting, result in swept:  # a reused replay is the one its own price would give
        direct = real(data, everything, choice.choose_by_weight(table, setting.weight), dict(setting.thresholds),
                      loaded.quality)
        assert (result.accuracy, result.mean_cost) == (direct.accuracy, direct.mean_cost)

    cal = json.loads(ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "--json"))
    for key in ("accuracy", "mean_cost", "escalation_rate"):
        assert cal["estimate"][key] == pytest.approx((cal["held_out"][key] + cal["in_sample"][key]) / 2)
    chosen = [p for p in cal["frontier"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["setting"] == cal["setting"]
    assert chosen[0]["accuracy"] == pytest.approx(cal["held_out"]["accuracy"])


def test_eval_counts_the_queries_that_are_in_the_fit_log(fakes, tiny_models_toml: Path, tmp_path: Path) -> None:
    # Only a log that was the whole fit log was said to be in sample: a part of it, or one
    # with fit queries mixed in, printed in-sample figures that read as held out. The fit
    # read other field names, so the fit log is read with the router's recorded reader.
    names = {"id": "key", "prompt": "question", "reference": "gold"}
    fit_log = write(tmp_path / "log.jsonl", rows(**names))
    router = tmp_path / "router.cre"
    m = ("--models", tiny_models_toml)
    ok("fit", fit_log, "-o", router, *m, "--prompt-field", "question", "--reference-field", "gold", "--id-field", "key")
    subset = write(tmp_path / "subset.jsonl", rows(**names)[:12])
    mixed = write(tmp_path / "mixed.jsonl", rows(40, **names)[20:])  # q20..q29 in the fit log, q30..q39 not
    disjoint = write(tmp_path / "disjoint.jsonl", rows(40, **names)[30:])

    result = cre("eval", mixed, "--router", router, *m)
    assert result.exit_code == 0, result.output
    assert "10 of 20 queries are in the router's fit or calibration log: their figures are in sample" in result.stderr
    assert "10 in the router's fit or calibration log, in sample" in result.stdout  # the report says it too
    report = json.loads(ok("eval", mixed, "--router", router, *m, "--json"))
    assert (report["n"], report["n_in_fit_log"], report["in_sample"]) == (20, 10, False)
    whole = cre("eval", fit_log, "--router", router, *m, "--json")
    assert json.loads(whole.stdout)["n_in_fit_log"] == 30 and json.loads(whole.stdout)["in_sample"] is True
    assert "30 of 30 queries are in the router's fit or calibration log" in whole.stderr
    result = cre("eval", subset, "--router", router, *m, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["n"], report["n_in_fit_log"], report["in_sample"]) == (12, 12, True)
    assert "12 of 12 queries are in the router's fit or calibration log" in result.stderr
    # --held-out-only scores the others alone.
    result = cre("eval", mixed, "--router", router, *m, "--held-out-only", "--json")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["n"], json.loads(result.stdout)["n_in_fit_log"]) == (10, 0)
    assert "Left out 10 queries that are in the router's fit or calibration log" in result.stderr
    assert "fit or calibration log; none is held out" in str(cre("eval", subset, "--router", router, *m, "--held-out-only").exception)

    result = cre("eval", disjoint, "--router", router, *m, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_in_fit_log"] == 0 and json.loads(result.stdout)["in_sample"] is False
    assert "fit log" not in result.stderr


def test_eval_finds_a_moved_fit_log_only_by_fit_log_with_its_bytes(fakes, tiny_models_toml: Path, tmp_path: Path) -> None:
    fit_log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    m = ("--models", tiny_models_toml)
    ok("fit", fit_log, "-o", router, *m)
    subset = write(tmp_path / "subset.jsonl", rows()[:12])
    moved = fit_log.rename(tmp_path / "moved.jsonl")

    # Not where the fit found it: nothing to tell by, so nothing said (no false warning).
    result = cre("eval", subset, "--router", router, *m, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_in_fit_log"] is None and json.loads(result.stdout)["in_sample"] is False
    assert "fit log" not in result.stderr
    result = cre("eval", subset, "--router", router, *m, "--held-out-only")
    assert result.exit_code == 1 and "--held-out-only needs the router's fit log" in str(result.exception)
    assert "not there any more" in str(result.exception)

    result = cre("eval", subset, "--router", router, *m, "--fit-log", moved, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_in_fit_log"] == 12
    assert "12 of 12 queries are in the router's fit or calibration log" in result.stderr
    # Other bytes than the fit's: an error that says so, before any model runs (these
    # queries' answers are not in the store yet).
    other = write(tmp_path / "other.jsonl", rows(31))
    new = write(tmp_path / "new.jsonl", rows(40)[30:])
    calls = sum(len(b.calls) for b in fakes.values())
    result = cre("eval", new, "--router", router, *m, "--fit-log", other)
    assert result.exit_code == 1
    assert f"--fit-log {other} is not the log the router was fitted on" in str(result.exception)
    assert sum(len(b.calls) for b in fakes.values()) == calls
    result = cre("eval", subset, "--router", router, *m, "--fit-log", tmp_path / "nowhere.jsonl")
    assert result.exit_code == 1 and "not found" in str(result.exception)


def test_eval_says_nothing_is_known_in_sample_when_the_fit_log_moved_and_no_other_log_adds_prompts(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # Never calibrated, or calibrated on the fit log itself, the calibration adds no prompts
    # (an empty set): beside a fit log that cannot be read, that counted 0 in sample, where
    # nothing can be told (n_in_fit_log None).
    m = ("--models", tiny_models_toml)
    fit_log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", fit_log, "-o", router, *m)
    subset = write(tmp_path / "subset.jsonl", rows()[:12])
    moved = fit_log.rename(tmp_path / "moved.jsonl")
    for calibrate in (False, True):
        if calibrate:
            moved.rename(fit_log)
            ok("calibrate", router, *m, "--folds", "2")  # on the fit log: recorded as the fit records it
            fit_log.rename(moved)
        result = cre("eval", subset, "--router", router, *m, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["n_in_fit_log"], report["n_in_sample"], report["in_sample"]) == (None, None, False), calibrate
        assert "fit or calibration log" not in result.stderr
        human = cre("eval", subset, "--router", router, *m)
        assert human.exit_code == 0 and "in sample" not in human.output


def test_eval_finds_a_moved_calibration_log_by_calibration_log_with_its_bytes(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # A moved fit log could be named with --fit-log, but a moved calibration log could not
    # be named at all: --held-out-only refused, with nothing to pass but a recalibration.
    m = ("--models", tiny_models_toml)
    router = tmp_path / "router.cre"
    ok("fit", write(tmp_path / "log.jsonl", rows()), "-o", router, *m)  # q0..q29
    dev = write(tmp_path / "dev.jsonl", rows(60)[30:])  # q30..q59
    mixed = write(tmp_path / "mixed.jsonl", rows(70)[50:])  # q50..q59 from dev, q60..q69 in neither
    # Not calibrated yet: the router records no calibration log to check a file against.
    result = cre("eval", mixed, "--router", router, *m, "--calibration-log", dev)
    assert result.exit_code == 1
    assert (f"--calibration-log {dev}: the router was never calibrated (`cre calibrate`), so it has no calibration "
            "log to check a file against; leave --calibration-log out") in str(result.exception)
    ok("calibrate", router, "--log", dev, *m, "--folds", "2")
    moved = dev.rename(tmp_path / "moved.jsonl")

    result = cre("eval", mixed, "--router", router, *m, "--held-out-only")
    assert result.exit_code == 1 and "not there any more" in str(result.exception)
    assert "--calibration-log FILE" in str(result.exception)
    result = cre("eval", mixed, "--router", router, *m, "--calibration-log", moved, "--held-out-only", "--json")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["n"], json.loads(result.stdout)["n_in_sample"]) == (10, 0)
    assert "Left out 10 queries that are in the router's fit or calibration log" in result.stderr
    report = json.loads(ok("eval", mixed, "--router", router, *m, "--calibration-log", moved, "--json"))
    assert (report["n"], report["n_in_fit_log"], report["n_in_sample"]) == (20, 0, 10)
    # Checked by the recorded sha256 as --fit-log is, before any model runs.
    other = write(tmp_path / "other.jsonl", rows(61)[30:])
    new = write(tmp_path / "new.jsonl", rows(80)[70:])
    calls = sum(len(b.calls) for b in fakes.values())
    result = cre("eval", new, "--router", router, *m, "--calibration-log", other)
    assert result.exit_code == 1
    assert f"--calibration-log {other} is not the log the router was last calibrated on" in str(result.exception)
    assert sum(len(b.calls) for b in fakes.values()) == calls
    result = cre("eval", mixed, "--router", router, *m, "--calibration-log", tmp_path / "nowhere.jsonl")
    assert result.exit_code == 1 and "not found" in str(result.exception)


def test_eval_reads_a_renamed_log_named_by_fit_log_in_its_recorded_format(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # The router records no format where the fit and calibration took it from the file's
    # extension: dev.jsonl renamed dev.jsonl.bak was read as plain text, each JSON line a
    # prompt, so nothing was in sample and --held-out-only kept every in-sample query.
    m = ("--models", tiny_models_toml)
    router = tmp_path / "router.cre"
    fit_log = write(tmp_path / "log.jsonl", rows())  # q0..q29
    ok("fit", fit_log, "-o", router, *m)
    dev = write(tmp_path / "dev.jsonl", rows(60)[30:])  # q30..q59
    ok("calibrate", router, "--log", dev, *m, "--folds", "2")
    assert routerfile.load(router, config.load(tiny_models_toml)).fit.reader.fmt is None
    fit_bak = fit_log.rename(tmp_path / "log.jsonl.bak")
    dev_bak = dev.rename(tmp_path / "dev.jsonl.bak")
    mixed = write(tmp_path / "mixed.jsonl", [*rows(5), *rows(70)[50:]])  # 5 fitted, 10 calibrated, 10 in neither

    named = ("--fit-log", fit_bak, "--calibration-log", dev_bak)
    report = json.loads(ok("eval", mixed, "--router", router, *m, *named, "--json"))
    assert (report["n"], report["n_in_fit_log"], report["n_in_sample"]) == (25, 5, 15)
    report = json.loads(ok("eval", mixed, "--router", router, *m, *named, "--held-out-only", "--json"))
    assert (report["n"], report["n_in_sample"]) == (10, 0)


def test_eval_counts_the_queries_calibrate_tuned_on_as_in_sample(
    fakes, tiny_models_toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `cre calibrate --log dev.jsonl` tuned the router's cluster models and thresholds on
    # dev's queries, and `cre eval dev.jsonl` then reported them as held out: the router
    # did not record which log it was calibrated on, and eval looked in the fit log alone.
    import hashlib

    from support.routers import edit_manifest

    m = ("--models", tiny_models_toml)
    work = tmp_path / "work"
    work.mkdir()
    write(work / "log.jsonl", rows())  # q0..q29
    dev = write(work / "dev.jsonl", rows(60)[30:])  # q30..q59
    mixed = write(work / "mixed.jsonl", rows(70)[50:])  # q50..q59 from dev, q60..q69 in neither
    (work / "sub").mkdir()
    monkeypatch.chdir(work)
    ok("fit", "log.jsonl", "-o", "router.cre", *m)
    # Given relatively, recorded as the fit log is: relative to the router, wherever -o writes it.
    ok("calibrate", "router.cre", "--log", "dev.jsonl", "-o", "sub/tuned.cre", *m, "--folds", "2")
    router = work / "sub" / "tuned.cre"
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    cal = loaded.fit.calibration
    assert cal is not None and cal["log"] == "../dev.jsonl" and routerfile.calibration_log_path(loaded) == dev
    assert cal["log_sha256"] == hashlib.sha256(dev.read_bytes()).hexdigest() and cal["reader"]["skip_bad"] is False

    monkeypatch.chdir(tmp_path)
    result = cre("eval", dev, "--router", router, *m, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["n"], report["n_in_fit_log"], report["n_in_sample"], report["in_sample"]) == (30, 0, 30, True)
    assert "30 of 30 queries are in the router's fit or calibration log, so these figures are in sample" in result.stderr
    result = cre("eval", mixed, "--router", router, *m, "--json")
    report = json.loads(result.stdout)
    assert (report["n"], report["n_in_fit_log"], report["n_in_sample"], report["in_sample"]) == (20, 0, 10, False)
    assert "10 of 20 queries are in the router's fit or calibration log: their figures are in sample" in result.stderr
    # --held-out-only leaves out the calibration log's queries too.
    result = cre("eval", mixed, "--router", router, *m, "--held-out-only", "--json")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["n"], json.loads(result.stdout)["n_in_sample"]) == (10, 0)
    assert "Left out 10 queries that are in the router's fit or calibration log" in result.stderr

    # Changed since: not read (a router file must not choose which files are read), so its
    # queries cannot be told apart, and --held-out-only says why it cannot keep its word.
    write(dev, rows(61)[30:])
    report = json.loads(ok("eval", mixed, "--router", router, *m, "--json"))
    assert (report["n_in_fit_log"], report["n_in_sample"]) == (0, 0)
    result = cre("eval", mixed, "--router", router, *m, "--held-out-only")
    assert result.exit_code == 1
    assert "needs the log the router was last calibrated on" in str(result.exception)
    assert "has changed since the router was calibrated on it" in str(result.exception)

    # A router calibrated before the log was recorded loads, and counts its fit log alone;
    # the new fields are checked like every other.
    edit_manifest(router, lambda man: [man["body"]["fit"]["calibration"].pop(k) for k in ("log", "log_sha256", "reader")])
    report = json.loads(ok("eval", mixed, "--router", router, *m, "--json"))
    assert (report["n_in_fit_log"], report["n_in_sample"]) == (0, 0)
    edit_manifest(router, lambda man: man["body"]["fit"]["calibration"].update(log="dev.jsonl", log_sha256="nope"))
    result = cre("eval", mixed, "--router", router, *m)
    assert result.exit_code != 0 and "fit.calibration.log_sha256" in str(result.exception) + result.output

    # Calibrated on the fit log itself (no --log): recorded as the fit records it, adding nothing.
    ok("calibrate", work / "router.cre", *m, "--folds", "2")
    loaded = routerfile.load(work / "router.cre", config.load(tiny_models_toml))
    assert loaded.fit.calibration is not None
    assert (loaded.fit.calibration["log"], loaded.fit.calibration["log_sha256"]) == (loaded.fit.log, loaded.fit.log_sha256)


def test_eval_and_calibrate_refuse_a_row_whose_labels_leave_a_ladder_model_unmeasured(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # A row with labels for some ladder models and no reference has no outcome on the others:
    # `cre fit` refuses it up front, but `cre eval` and `cre calibrate` kept it and crashed
    # with a raw KeyError after collecting every other outcome.
    m = ("--models", tiny_models_toml)
    router = fitted(tmp_path, m)
    partial = {"id": "odd", "prompt": "What is 5 plus 6 today?", "labels": {"small": True, "medium": True}}
    log = write(tmp_path / "dev.jsonl", [*rows(40)[30:], partial])
    calls = sum(len(b.calls) for b in fakes.values())
    for args in (("eval", log, "--router", router), ("calibrate", router, "--log", log, "--folds", "2")):
        result = cre(*args, *m)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, CreError), result.exception
        assert (f"{log}:11: labels medium, small but no reference, so large cannot be measured on it; "
                "add a `reference`, or a label for every model of the ladder") in str(result.exception)
    assert sum(len(b.calls) for b in fakes.values()) == calls  # said before any model ran


def test_calibrate_says_a_log_is_too_small_for_its_folds_before_any_model_runs(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # A 2-query log with --folds 2 first ran every model on it (a fresh store: "1 queries to
    # run"), then advised "use --folds 2", the value given.
    m = ("--models", tiny_models_toml)
    router = fitted(tmp_path, m)
    calls = sum(len(b.calls) for b in fakes.values())
    small = write(tmp_path / "lab.jsonl", rows(32)[30:])
    result = cre("calibrate", router, "--log", small, "--folds", "2", *m)
    assert result.exit_code == 1, result.output
    assert sum(len(b.calls) for b in fakes.values()) == calls  # said before any model ran
    assert isinstance(result.exception, CreError), result.exception
    assert str(result.exception) == ("only 2 labelled queries: too few for 2-fold cross-validation, which needs at "
                                     "least 2 a fold (4); give a log of at least 4 labelled queries")
    result = cre("calibrate", router, "--log", write(tmp_path / "five.jsonl", rows(35)[30:]), "--folds", "3", *m)
    assert result.exit_code == 1 and str(result.exception).endswith("use --folds 2 or a larger log")
    assert sum(len(b.calls) for b in fakes.values()) == calls


def test_eval_and_calibrate_say_which_rows_they_leave_out_unlabelled(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    # A row with neither a reference nor labels is scored by no command (`cre fit` clusters
    # it); `cre eval` left it out unsaid, reporting "1 labelled queries" of a 2-row log.
    m = ("--models", tiny_models_toml)
    router = fitted(tmp_path, m)
    labelled = rows(34)[30:]
    bare = [{"id": f"bare{i}", "prompt": f"What is {i} plus 9, roughly?"} for i in range(2)]
    log = write(tmp_path / "dev.jsonl", [labelled[0], bare[0], *labelled[1:], bare[1]])
    said = (f"{log}: 2 rows have neither a 'reference' nor a 'labels' field, so no model is scored on them: "
            "left out (lines 2, 6); add a reference, or a label for every model of the ladder, to score them")
    result = cre("eval", log, "--router", router, *m, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 4
    assert said in " ".join(result.stderr.split())
    result = cre("calibrate", router, "--log", log, "--folds", "2", *m, "-o", tmp_path / "cal.cre")
    assert result.exit_code == 0, result.output
    assert said in " ".join(result.stderr.split())


def test_calibrate_in_place_does_not_overwrite_a_router_written_meanwhile(
    fakes, tiny_models_toml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `cre fit -o ROUTER` that finished during a long calibrate was overwritten by the
    # calibration of the router it had replaced.
    from crecli import calibrate

    log = write(tmp_path / "log.jsonl", rows())
    router = tmp_path / "router.cre"
    ok("fit", log, "-o", router, "--models", tiny_models_toml)
    newer = router.read_bytes() + b"\n"  # zip readers ignore a trailing byte: any other router will do
    real = calibrate.recalibrate

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        # Other bytes each time: the -o run below must meet a changed file too.
        router.write_bytes(router.read_bytes() + b"\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "recalibrate", meanwhile)
    result = cre("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    assert result.exit_code == 1
    message = str(result.exception)
    assert f"{router} changed while it was being calibrated" in message and "was not saved over it" in message
    assert f"Run `cre calibrate {router}` again" in message
    assert router.read_bytes() == newer
    # Saved elsewhere with -o, it is no matter; unchanged in place, it is saved.
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2", "-o", tmp_path / "other.cre")
    monkeypatch.setattr(calibrate, "recalibrate", real)
    ok("calibrate", router, "--models", tiny_models_toml, "--folds", "2")
    assert router.read_bytes() != newer


def test_calibrate_runs_no_model_on_the_queries_a_sampled_fit_skipped(
    fake_backends: Callable[..., dict[str, FakeBackend]], tiny_models_toml: Path, tmp_path: Path
) -> None:
    # `cre fit --sample-per-cluster N` ran the models on N queries per cluster ("caps
    # calibration cost"), but the router kept no N, and `cre calibrate` then ran every model
    # on every labelled query of the log: hours on the big logs the option is for.
    from support.logs import write_sums_log
    from support.routers import edit_manifest

    asked: list[str] = []

    def answer(text: str, params: GenParams) -> str:
        asked.append(text)
        return _sum(text, params)

    fake_backends({m: answer for m in ("small", "medium", "large")})
    m = ("--models", tiny_models_toml)
    log = write_sums_log(tmp_path / "sums.jsonl", 40)
    router = tmp_path / "r.cre"
    ok("fit", log, "-o", router, *m, "--sample-per-cluster", "5")
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    fit = loaded.fit
    assert fit.sample_per_cluster == 5 and fit.n_labelled == 40
    assert fit.n_measured <= 5 * (len(loaded.clusters) + 1) < 40 and asked
    ran = len(asked)
    result = cre("calibrate", router, *m, "--folds", "2", "--json")
    assert result.exit_code == 0, result.output
    assert len(asked) == ran  # the fit's own sample: every answer is in the store already
    assert json.loads(result.stdout)["n"] == fit.n_measured
    assert (f"Calibrating on the queries the fit sampled, at most 5 per cluster (--sample-per-cluster 5): "
            f"{fit.n_measured} of 40 labelled queries") in result.stderr
    # The calibrated router keeps the fit's sample, and a second calibration runs nothing either.
    assert routerfile.load(router, config.load(tiny_models_toml)).fit.sample_per_cluster == 5
    ok("calibrate", router, *m, "--folds", "2")
    assert len(asked) == ran

    # Another log is capped alike: at most 5 of its labelled queries per cluster.
    other = write_sums_log(tmp_path / "other.jsonl", 40, offset=1)
    result = cre("calibrate", router, *m, "--folds", "2", "--log", other, "-o", tmp_path / "other.cre", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] <= 5 * (len(loaded.clusters) + 1) < 40
    assert "Calibrating on at most 5 labelled queries per cluster, as the fit sampled its log" in result.stderr

    # A router written before the fit recorded its sample loads, and calibrates on every
    # labelled query (its sample is not known); the field is checked like every other.
    edit_manifest(router, lambda man: man["body"]["fit"].pop("sample_per_cluster"))
    assert routerfile.load(router, config.load(tiny_models_toml)).fit.sample_per_cluster is None
    assert json.loads(ok("calibrate", router, *m, "--folds", "2", "--json"))["n"] == 40
    edit_manifest(router, lambda man: man["body"]["fit"].update(sample_per_cluster=0))
    result = cre("calibrate", router, *m, "--folds", "2")
    assert result.exit_code != 0 and "fit.sample_per_cluster" in str(result.exception) + result.output


def test_a_missing_prompt_field_in_eval_or_calibrate_names_the_routers_field_not_an_option_they_lack(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    """`cre eval` and `cre calibrate` read a log with the field names the fit was given, and
    take no --prompt-field: their error told users to pass one."""
    m = ("--models", tiny_models_toml)
    router = tmp_path / "router.cre"
    ok("fit", write(tmp_path / "log.jsonl", rows(prompt="question")), "-o", router, *m, "--prompt-field", "question")
    plain = write(tmp_path / "plain.jsonl", rows())  # its prompts under "prompt"
    table = tmp_path / "plain.csv"
    table.write_text("id,prompt,reference\nq1,What is 1 plus 2?,3\n")
    for args in (("eval", plain, "--router", router), ("calibrate", router, "--log", plain),
                 ("eval", table, "--router", router)):
        result = cre(*args, *m)
        assert isinstance(result.exception, CreError), result.output
        said = str(result.exception)
        assert "'question'" in said and "fitted with" in said, said
        assert "with --prompt-field" not in said, said
    # `cre fit` still points at its option.
    result = cre("fit", write(tmp_path / "q.jsonl", rows(prompt="question")), "-o", tmp_path / "r2.cre", *m)
    assert isinstance(result.exception, CreError) and "with --prompt-field" in str(result.exception)


def test_a_store_path_with_no_store_is_warned_about_before_any_model_runs(
    fakes, tiny_models_toml: Path, tmp_path: Path
) -> None:
    """A router does not record its fit's store: a mistyped --store ran every model again,
    silently, into a new store."""
    m = ("--models", tiny_models_toml)
    store = tmp_path / "outcomes.sqlite"
    router = tmp_path / "router.cre"
    log = write(tmp_path / "log.jsonl", rows())
    ok("fit", log, "-o", router, *m, "--store", store)
    quiet = cre("eval", log, "--router", router, *m, "--store", store)
    assert quiet.exit_code == 0 and "no outcome store is there" not in quiet.stderr
    for args in (("eval", log, "--router", router), ("calibrate", router)):
        typo = tmp_path / f"outcome.{args[0]}.sqlite"
        result = cre(*args, *m, "--store", typo)
        assert result.exit_code == 0, result.output
        said = " ".join(result.stderr.split())
        assert f"--store {typo}: no outcome store is there" in said and "every model runs on the 30 queries" in said


def test_calibrate_says_before_the_work_that_o_replaces_another_router(fakes, tiny_models_toml: Path, tmp_path: Path) -> None:
    # `cre fit` warns so; `cre calibrate a.cre -o b.cre` replaced b.cre without a word.
    m = ("--models", tiny_models_toml)
    log = write(tmp_path / "log.jsonl", rows())
    first, second = tmp_path / "a.cre", tmp_path / "b.cre"
    ok("fit", log, "-o", first, *m)
    ok("fit", log, "-o", second, *m)
    result = cre("calibrate", first, "-o", second, *m, "--folds", "2")
    assert result.exit_code == 0 and "another router file is there; this calibration replaces it" in " ".join(result.stderr.split())
    in_place = cre("calibrate", first, *m, "--folds", "2")
    assert in_place.exit_code == 0 and "another router file is there" not in in_place.stderr


def test_calibrate_json_lists_every_cluster_model_the_router_is_written_with(fakes, tiny_models_toml: Path,
                                                                             tmp_path: Path) -> None:
    # A cluster with no labelled query in --log keeps its model in the router; the JSON's
    # cluster_models left it out.
    m = ("--models", tiny_models_toml)
    router = fitted(tmp_path, m)
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    if len(loaded.clusters) < 2:
        pytest.skip("the fit made one cluster: nothing can be left out")
    one = loaded.clusters[0]
    part = [r for r in rows() if r["prompt"] in set(one.examples) or TOPICS.index(
        next(t for t in TOPICS if r["prompt"].startswith(t.split("{")[0]))) == 0]
    partial = write(tmp_path / "partial.jsonl", part)
    cal = json.loads(ok("calibrate", router, *m, "--folds", "2", "--log", partial, "--json"))
    written = routerfile.load(router, config.load(tiny_models_toml))
    assert cal["cluster_models"] == {str(c.id): c.model for c in sorted(written.clusters, key=lambda c: c.id)}
    assert set(cal["kept_models"]) <= set(cal["cluster_models"])
