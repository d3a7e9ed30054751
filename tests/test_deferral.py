"""The calibrated deferral check: greedy-pass signals, one logistic P(correct) model per
rung, stored as plain numbers in the router, and the same decision live and in replay."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from crecli import config, routerfile
from crecli.deferral import auroc, fit_logistic, within_auroc
from crecli.cli import app
from crecli.errors import CreError, RouterFileError
from crecli.models.backend import GenParams, Signals
from crecli.outcomes import OutcomeStore, Vote, collect, prompt_sha256, settings_key
from crecli.quality import (
    LOGPROB_FLOOR, Deferral, DeferralCheck, QualityCheck, accept_deferral, deferral_features, feature_names,
)
from crecli.querylog import Record
from support.logs import write_sums_log

runner = CliRunner()


# ---------------------------------------------------------------- the pure pieces


def test_signals_round_trip_and_reject_what_they_did_not_write() -> None:
    s = Signals(-1.5, -0.25, 0.75)
    assert Signals.from_list(s.to_list()) == s
    assert Signals.from_list([-1.0, -0.5, None]) == Signals(-1.0, -0.5, None)
    for bad in (None, [], [1, 2], ["a", 0, 0], [True, 0.0, None], [0.0, 0.0, "x"], {"a": 1}):
        assert Signals.from_list(bad) is None


def test_deferral_features_order_floor_flags_prior_and_agreement() -> None:
    values = deferral_features(Signals(-100.0, -0.5, 0.4), ["A"], cut=False, prior=0.5)
    assert feature_names(1) == ("min_logprob", "mean_logprob", "margin", "empty_or_cut", "prior")
    assert values == [LOGPROB_FLOOR, -0.5, 0.4, 0.0, 0.0]  # logit(0.5) = 0
    assert deferral_features(None, [""], cut=False, prior=0.9)[:4] == [None, None, None, 1.0]
    assert deferral_features(None, ["7"], cut=True, prior=0.9)[3] == 1.0
    assert deferral_features(None, ["7"], cut=False, prior=1.0)[4] == pytest.approx(math.log(0.98 / 0.02))
    five = deferral_features(None, ["7", "7", "8", "7", ""], cut=False, prior=0.5)
    assert len(five) == len(feature_names(5)) == 6 and five[5] == pytest.approx(3 / 5)


def test_an_answer_is_cut_at_its_token_cap_or_where_it_fills_the_context() -> None:
    from crecli.quality import was_cut

    assert was_cut(16, 16) and was_cut(17, 16) and not was_cut(15, 16)
    # 2000 prompt tokens leave 48 of a 2048 context: an answer of 48 stopped there, not done.
    assert was_cut(48, 64, 2000, 2048) and was_cut(40, 64, 2008, 2048)
    assert not was_cut(47, 64, 2000, 2048)
    # A remote rung's window is unknown (None; 0 alike): only its cap tells.
    assert not was_cut(48, 64, 2000, None) and not was_cut(48, 64, 2000, 0) and was_cut(64, 64, 2000, None)


def test_a_nan_signal_is_a_missing_one_not_a_nan_p_correct() -> None:
    # A NaN margin made P(correct) NaN, under every threshold, so the answer went to the
    # top rung; a NaN log-probability read as the floor, the lowest confidence there is.
    nan = float("nan")
    assert deferral_features(Signals(nan, nan, nan), ["A"], cut=False, prior=0.5)[:3] == [None, None, None]
    assert deferral_features(Signals(-math.inf, -0.5, None), ["A"], cut=False, prior=0.5)[:3] == [LOGPROB_FLOOR, -0.5, None]
    d = Deferral(feature_names(1), (1.0, 0.0, 2.0, -3.0, 1.0), 0.5, (-1.0, 0.0, 0.25, 0.0, 0.0), 0.6)
    assert d.p_correct(deferral_features(Signals(-1.0, -0.5, nan), ["A"], cut=False, prior=0.5)) == pytest.approx(1 / (1 + math.exp(-0.0)))


def test_p_correct_fills_missing_values_and_never_overflows() -> None:
    d = Deferral(feature_names(1), (1.0, 0.0, 2.0, -3.0, 1.0), 0.5, (-1.0, 0.0, 0.25, 0.0, 0.0), 0.6)
    # None takes the fill value: 0.5 + (-1) + 2 * 0.25 = 0.
    assert d.p_correct([None, None, None, 0.0, 0.0]) == pytest.approx(0.5)
    assert d.p_correct([-1.0, 0.0, 0.25, 1.0, 0.0]) == pytest.approx(1 / (1 + math.exp(3)))
    big = Deferral(feature_names(1), (1e4,) * 5, 0.0, (0.0,) * 5, 0.5)
    assert big.p_correct([1e4] * 5) == 1.0 and big.p_correct([-1e4] * 5) == 0.0
    with pytest.raises(ValueError):
        d.p_correct([0.0])
    assert accept_deferral(0.7, 0.7, "7") and not accept_deferral(0.69, 0.7, "7")
    # An empty answer is never kept, not even at threshold 0, as the agreement check.
    assert accept_deferral(0.0, 0.0, "7") and not accept_deferral(1.0, 0.0, "")


def test_fit_logistic_finds_the_informative_feature_and_ignores_a_constant_one() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    x[:, 1] = 3.0  # constant: standardisation must not divide by zero
    y = (x[:, 0] + 0.3 * rng.normal(size=400)) > 0
    w, b = fit_logistic(x, y)
    assert w[0] > 1.0 and abs(w[1]) < 1e-6
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert auroc(list(p), list(y)) > 0.9
    # Every answer right: the bias stays finite and says so.
    w, b = fit_logistic(x, np.ones(400, dtype=bool))
    assert math.isfinite(b) and b > 2


def test_auroc_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auroc([0.1, 0.2], [True, True]) is None


def test_within_auroc_ranks_inside_each_group_and_skips_groups_of_one_class() -> None:
    # Group "a" ranks its 2 (right, wrong) pairs right (1.0), "b" its 1 pair backwards (0.0),
    # "c" is all right (no pairs, left out). Over all seven the ranking looks good (0.8),
    # mostly from "c" sitting high.
    scores = [0.9, 0.8, 0.85, 0.1, 0.2, 0.95, 0.96]
    labels = [True, False, True, True, False, True, True]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    assert auroc(scores, labels) == pytest.approx(0.8)
    assert within_auroc(scores, labels, groups) == (pytest.approx((1.0 * 2 + 0.0 * 1) / 3), 5)
    assert within_auroc(scores, labels, ["c"] * 7)[0] == pytest.approx(0.8)
    assert within_auroc([0.1, 0.2], [True, True], ["a", "b"]) == (None, 0)


def test_signal_report_ranks_inside_each_cluster_and_fold_and_leaves_unclustered_queries_out() -> None:
    from types import SimpleNamespace

    from crecli.deferral import signal_report
    from crecli.replay import _Entry

    # One cluster over two folds: each fold ranks its (right, wrong) pair right, but the
    # second fold sits higher as a whole (its prior), so pooled over the cluster the pair
    # across folds is ranked wrong: 3 of 4 pairs. A fifth, unclustered, wrong answer with the
    # highest P(correct) counts over all answers only.
    p = [0.3, 0.2, 0.9, 0.8, 0.95]
    right = [True, False, True, False, False]
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(5)]
    entries = {(r.id, "s"): _Entry(("1",), (y,), (1.0,), signals=Signals(x - 1.0, x - 1.0, None))
               for r, x, y in zip(records, p, right)}
    data = SimpleNamespace(records=records, clusters=[0, 0, 0, 0, -1], replay=SimpleNamespace(entries=entries))
    held = {(r.id, "s"): x for r, x in zip(records, p)}
    by_fold = signal_report(data, held, ["s"], 1, [0, 0, 1, 1, 0])["s"]
    assert by_fold["p_correct"]["within_cluster"] == 1.0 and by_fold["p_correct"]["within_cluster_n"] == 4
    assert by_fold["min_logprob"]["within_cluster"] == 1.0
    assert by_fold["p_correct"]["auroc"] == pytest.approx(3 / 6) and by_fold["p_correct"]["n"] == 5
    pooled = signal_report(data, held, ["s"], 1)["s"]
    assert pooled["p_correct"]["within_cluster"] == pytest.approx(3 / 4)


# ---------------------------------------------------------------- the outcome store


def test_votes_keep_their_signals_and_a_longer_recording_serves_fewer_votes(
    tiny_models_toml: Path, tmp_path: Path, fake_backends: Callable[..., Any]
) -> None:
    settings = config.load(tiny_models_toml)
    created = fake_backends({"small": {"2 + 2": "4"}}, signals=lambda text, params, answer: Signals(-0.1, -0.05, None))
    record = Record(id="q", prompt="What is 2 + 2?", reference=["4"], match="numeric")
    five = QualityCheck(k=5)
    with OutcomeStore(tmp_path / "o.sqlite") as store:
        first = collect([record], settings, store, five, models=["small"])[("q", "small")]
        assert [v.signals for v in first.votes] == [Signals(-0.1, -0.05, None)] + [None] * 4
        assert len(created["small"].calls) == 5
        created["small"].calls.clear()
        # The first vote of the 5-vote recording is what a greedy-only (k=1) run would draw.
        one = collect([record], settings, store, QualityCheck(k=1), models=["small"])[("q", "small")]
        assert created["small"].calls == [] and one.votes == first.votes[:1]
        found = store.get(prompt_sha256(record.prompt), "small", one.model_sha256, settings_key(five, 16, text_stops=True))
        assert found is not None and found[1][0] == Vote("4", 1, found[1][0].seconds, Signals(-0.1, -0.05, None))


# ---------------------------------------------------------------- the router file


def test_router_file_carries_the_deferral_check_as_plain_validated_numbers(tiny_models_toml: Path, tmp_path: Path) -> None:
    from support.routers import built_router, edit_manifest

    settings = config.load(tiny_models_toml)
    router = built_router(settings)
    names = feature_names(1)
    rules = DeferralCheck(1, {"small": Deferral(names, (0.5, 0.25, 1.0, -2.0, 1.0), -0.5, (-1.0, -0.5, 0.3, 0.1, 0.0), 0.4),
                              "medium": Deferral(names, (0.0,) * 5, 0.0, (0.0,) * 5, 0.6)})
    router.deferral = rules
    path = tmp_path / "router.cre"
    routerfile.save(router, path)
    again = routerfile.load(path, settings)
    assert again.deferral == rules
    assert again.prior(0, "small") == 0.5  # the cluster's shrunk accuracy
    assert again.prior(-1, "small") == 0.4  # outside every cluster: the model's log-wide accuracy
    assert again.prior(-1, "large") == 0.5  # no deferral model for it
    # A prompt far from its cluster's own queries (a task the log never had) gets the model's
    # log-wide prior; one inside the cluster's radius gets the cluster's.
    radius = again.assigner.radius(0)
    assert radius is not None and 0 <= radius <= again.assigner.threshold_
    assert again.prior(0, "small", distance=radius) == 0.5
    assert again.prior(0, "small", distance=again.assigner.threshold_) == 0.4

    def refused(change: Callable[[dict[str, Any]], None]) -> str:
        routerfile.save(router, path)
        edit_manifest(path, lambda m: change(m["body"]["deferral"]))
        with pytest.raises(RouterFileError) as err:
            routerfile.load(path, settings)
        return str(err.value)

    assert "weights" in refused(lambda d: d["models"]["small"].__setitem__("weights", [1e9] * 5))
    assert "weights" in refused(lambda d: d["models"]["small"].__setitem__("weights", ["1"] * 5))
    assert "features" in refused(lambda d: d["models"]["small"].__setitem__("features", list(names[::-1])))
    assert "features" in refused(lambda d: d.__setitem__("votes", 3))  # 3 votes need the agreement feature
    assert "prior" in refused(lambda d: d["models"]["small"].__setitem__("prior", 1.5))
    assert "unexpected" in refused(lambda d: d["models"]["small"].__setitem__("code", "import os"))
    assert "not on its ladder" in refused(lambda d: d["models"].__setitem__("ghost", d["models"]["small"]))
    # A rung below the top with neither a P(correct) model nor the agreement check stopped
    # `cre ask` on an assertion; the replay ran the agreement check instead.
    assert "medium below the top rung has no P(correct) model" in refused(lambda d: d["models"].pop("medium"))
    routerfile.save(router, path)
    edit_manifest(path, lambda m: (m["body"]["deferral"]["models"].pop("medium"),
                                   m["body"]["deferral"].__setitem__("agreement", ["medium"])))
    assert routerfile.load(path, settings).deferral.agreement == ("medium",)  # type: ignore[union-attr]


# ---------------------------------------------------------------- end to end: fit, calibrate, eval --live


def _sum(text: str, params: GenParams) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", text.split("<|im_start|>user")[-1])]
    return str(sum(numbers[-2:])) if len(numbers) >= 2 else "?"


def _small(text: str, params: GenParams) -> str:
    # Right on small numbers only, as a weak rung is.
    numbers = [int(n) for n in re.findall(r"\d+", text.split("<|im_start|>user")[-1])]
    return _sum(text, params) if numbers and numbers[-2] < 15 else "0"


def _confidence(text: str, params: GenParams, answer: str) -> Signals:
    # The fake is sure exactly where it is right: its log-probs say which answers to keep.
    return Signals(-0.05 if answer != "0" else -3.0, -0.02 if answer != "0" else -1.5, None)


def test_calibrated_deferral_live_matches_its_replay(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path
) -> None:
    # The small rungs cost a fifth and half of the large one: starting there pays only when
    # the check sends on exactly the answers that are wrong.
    fake_backends({"small": _small, "medium": _small, "large": _sum}, signals=_confidence,
                  seconds_per_token={"small": 0.0002, "medium": 0.0005, "large": 0.001})
    log = write_sums_log(tmp_path / "log.jsonl", 30, offset=1)
    router = tmp_path / "router.cre"
    m = ("--models", str(tiny_models_toml))
    assert runner.invoke(app, ["fit", str(log), "-o", str(router), *m]).exit_code == 0
    result = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "deferral", "--json"])
    assert result.exit_code == 0, result.output
    cal = json.loads(result.stdout)
    assert cal["check"] == "deferral" and set(cal["deferral"]["models"]) == {"small", "medium"}
    # The fake's log-probs separate right from wrong answers perfectly, held out too.
    assert cal["signals"]["small"]["min_logprob"]["auroc"] == 1.0
    assert cal["signals"]["small"]["p_correct"]["auroc"] > 0.9
    # Inside a cluster (and fold) they rank perfectly too, wherever a cluster has both.
    within = cal["signals"]["small"]["min_logprob"]
    assert within["within_cluster_n"] > 0 and within["within_cluster"] == 1.0
    loaded = routerfile.load(router, config.load(tiny_models_toml))
    assert loaded.deferral is not None and loaded.deferral.votes == 1
    shown = json.loads(runner.invoke(app, ["inspect", str(router), *m, "--json"]).stdout)
    assert shown["deferral"]["models"]["small"]["features"] == list(feature_names(1))
    assert "calibrated deferral" in runner.invoke(app, ["inspect", str(router), *m]).stdout

    report = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(router), *m, "--live", "--json"]).stdout)
    live = report["live"]
    assert live["agreement"] == 1.0 and live["accuracy"] == report["cascade"]["accuracy"]
    # Perfect signals: every query right, and the small numbers stay on the cheap rung.
    assert report["cascade"]["accuracy"] == 1.0
    assert report["cascade"]["answered_by"].get("small", 0) + report["cascade"]["answered_by"].get("medium", 0) > 0

    ask = runner.invoke(app, ["ask", "What is 3 plus 4?", "--router", str(router), *m, "--json", "--no-log"])
    trace = json.loads(ask.stdout)
    assert trace["answer"] == "7" and trace["p_correct"] is not None
    assert "P(correct)" in trace["steps"][0]["why"]
    shown = runner.invoke(app, ["ask", "What is 3 plus 4?", "--router", str(router), *m, "--no-log"])
    assert "P(correct)" in shown.stderr
    batch = runner.invoke(app, ["batch", "--router", str(router), *m, "--no-log"], input="What is 3 plus 4?\n")
    assert batch.exit_code == 0, batch.output
    assert 0.0 <= json.loads(batch.stdout.splitlines()[0])["p_correct"] <= 1.0


def _long_winded(text: str, params: GenParams) -> str:
    # The right sum, then more words than a tight context leaves room for, fewer than the cap.
    return _sum(text, params) + " is what the two numbers add up to here"


def test_an_answer_stopped_by_the_context_window_is_cut_live_and_replayed_alike(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path
) -> None:
    """Below its token cap, an answer that filled the rung's context (the runtime stops it
    there after a long prompt) is as truncated as one at the cap: the deferral check's
    empty_or_cut feature says so, in the live check and in the replay calibration and
    evaluation run on its recording."""
    from crecli import grading, replay
    from crecli.live import check
    from crecli.models.fake import FakeBackend
    from crecli.quality import SIGNAL_FEATURES, judge_deferral, vote_params

    prompt, cap = "What is 3 plus 1?", grading.max_tokens_for("numeric")
    probe = FakeBackend(config.load(tiny_models_toml).get("small"))
    n_prompt = probe.count_tokens(probe.prepare(prompt, vote_params(QualityCheck(k=1), 0, cap, prompt))[0])
    assert len(_long_winded(prompt, GenParams()).split()) < cap
    # Room for 3 answer tokens after the prompt; every prompt of the log below is as long.
    tight = tmp_path / "tight.toml"
    tight.write_text(tiny_models_toml.read_text().replace("[models.small]\n", f"[models.small]\ncontext = {n_prompt + 3}\n"))
    settings = config.load(tight)
    # P(correct) reads empty_or_cut alone: high for a whole answer, low for a cut one.
    rule = Deferral(SIGNAL_FEATURES, (0.0, 0.0, 0.0, -10.0, 0.0), 5.0, (0.0,) * 5, 0.5)
    uncut = rule.p_correct([None, None, None, 0.0, 0.0])

    live = check(FakeBackend(settings.get("small"), _long_winded), prompt, QualityCheck(k=1), 0.5, cap, "numeric",
                 deferral=rule)
    assert live.greedy_output_tokens == 3 < cap and live.answer.startswith("4")
    assert live.p_correct == pytest.approx(rule.p_correct([None, None, None, 1.0, 0.0])) and live.p_correct < uncut
    assert not live.accepted

    fake_backends({"small": _long_winded, "medium": _long_winded, "large": _sum})
    log, router, _ = _fitted(tmp_path, tight)
    data = replay.prepare(routerfile.load(router, settings), settings, log)
    record = next(r for r in data.records if r.prompt == prompt)
    small, medium = data.replay.entries[(record.id, "small")], data.replay.entries[(record.id, "medium")]
    assert small.cut and not medium.cut  # medium has its whole 2048-token context
    assert judge_deferral(rule, small.signals, small.answers[:1], small.cut, 0.5) == pytest.approx(live.p_correct)


def _fitted(tmp_path: Path, models_toml: Path, *fit_args: str) -> tuple[Path, Path, tuple[str, str]]:
    """A 20-query log and a router fitted on it: (log, router, the --models option)."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} plus 1?", "reference": str(i + 1),
                                       "match": "numeric"}) + "\n" for i in range(20)))
    router = tmp_path / "router.cre"
    m = ("--models", str(models_toml))
    assert runner.invoke(app, ["fit", str(log), "-o", str(router), *m, *fit_args]).exit_code == 0
    return log, router, m


def test_calibrate_refuses_more_deferral_votes_than_recorded(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path
) -> None:
    # With signals: a rung without them runs the agreement check, with no deferral model.
    fake_backends({"small": _sum, "medium": _sum, "large": _sum}, signals=_confidence)
    _, router, m = _fitted(tmp_path, tiny_models_toml, "--k", "3")
    bad = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "deferral", "--votes", "4"])
    assert bad.exit_code == 1 and "--votes 4" in str(bad.exception)
    bad = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "vibes"])
    assert bad.exit_code == 1 and "vibes" in str(bad.exception)
    good = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--check", "deferral", "--votes", "3", "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["deferral"]["models"]["small"]["features"][-1] == "agreement"


def test_calibrate_and_eval_price_in_the_cost_unit_asked_for(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path
) -> None:
    fake_backends({"small": _small, "medium": _small, "large": _sum})
    log, router, m = _fitted(tmp_path, tiny_models_toml)
    cal = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--cost-unit", "seconds", "--json"])
    assert cal.exit_code == 0, cal.output
    assert routerfile.load(router, config.load(tiny_models_toml)).fit.cost_unit == "seconds"
    ev = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(router), *m, "--cost-unit", "seconds", "--json"]).stdout)
    assert ev["unit"] == "seconds"
    bad = runner.invoke(app, ["calibrate", str(router), *m, "--folds", "2", "--cost-unit", "dollars"])
    assert bad.exit_code == 1 and "dollars" in str(bad.exception)


def test_eval_says_when_the_speeds_that_price_its_cost_share_are_hours_old(
    fake_backends: Callable[..., Any], tiny_models_toml: Path, tmp_path: Path, bench_speeds: Callable[..., None]
) -> None:
    fake_backends({"small": _small, "medium": _small, "large": _sum})
    speeds = {"small": (400.0, 40.0), "medium": (200.0, 20.0), "large": (100.0, 10.0)}
    bench_speeds(speeds, hours_ago=10)
    log, router, m = _fitted(tmp_path, tiny_models_toml)
    old = runner.invoke(app, ["eval", str(log), "--router", str(router), *m])
    assert old.exit_code == 0, old.output
    assert "measured 10 h ago" in old.stderr and "cre models bench --fresh" in old.stderr
    report = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(router), *m, "--json"]).stdout)
    assert report["unit"] == "bench-seconds" and 9.9 < report["speeds_age_hours"] < 10.5
    # Seconds are the clock's own: no speeds price them, so no age.
    seconds = json.loads(runner.invoke(app, ["eval", str(log), "--router", str(router), *m, "--cost-unit", "seconds",
                                             "--json"]).stdout)
    assert seconds["speeds_age_hours"] is None
    bench_speeds(speeds, hours_ago=1)
    recent = runner.invoke(app, ["eval", str(log), "--router", str(router), *m])
    assert recent.exit_code == 0 and "h ago" not in recent.stderr


def test_a_four_rung_replay_escalates_by_p_correct_and_the_remote_top_is_final() -> None:
    """A ladder of any length: a remote top rung above the 1.5B is asked only what every
    rung below doubts, and its greedy answer is final (it has no deferral model)."""
    from crecli.replay import Replay, _Entry

    ladder = ["tiny", "small", "big", "remote"]
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(3)]
    entries = {}
    for r in records:
        for j, m in enumerate(ladder):
            # Rung j is right on query i when j >= i + 1; costs 1, 2, 4, 8.
            right = j >= int(r.id[1:]) + 1
            entries[(r.id, m)] = _Entry(("1" if right else "2",), (right,), (float(2 ** j),), None, False)
    replay = Replay(entries, records, ladder, "bench-seconds")
    # P(correct) says "right" exactly where the rung is right.
    p = {key: (0.9 if e.correct[0] else 0.1) for key, e in entries.items()}
    thresholds = {"tiny": 0.5, "small": 0.5, "big": 0.5, "remote": 0.0}
    result = replay.simulate({r.id: "tiny" for r in records}, thresholds, QualityCheck(k=1), p_correct=p, votes=1)
    by = {t.query_id: t for t in result.traces}
    assert [len(by[f"q{i}"].steps) for i in range(3)] == [2, 3, 4]  # q2 climbs to the remote rung
    assert by["q2"].model == "remote" and by["q2"].cost == 1 + 2 + 4 + 8
    assert result.accuracy == 1.0
    # Remove the remote rung's signal entirely: its answer is still final, never deferred.
    p.pop(("q2", "remote"))
    assert replay.simulate({"q2": "remote", "q0": "tiny", "q1": "tiny"}, thresholds, QualityCheck(k=1),
                           p_correct=p, votes=1).traces[2].model == "remote"


def test_the_replayed_deferral_check_never_keeps_an_empty_answer_below_the_top() -> None:
    """Threshold 0 keeps every answer but an empty one, which escalates; the top rung's
    empty answer is still final."""
    from crecli.replay import Replay, _Entry

    ladder = ["small", "big"]
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(2)]
    entries = {
        ("q0", "small"): _Entry(("",), (False,), (1.0,), None, False),
        ("q0", "big"): _Entry(("1",), (True,), (4.0,), None, False),
        ("q1", "small"): _Entry(("1",), (True,), (1.0,), None, False),
        ("q1", "big"): _Entry(("",), (False,), (4.0,), None, False),
    }
    replay = Replay(entries, records, ladder, "bench-seconds")
    p = {key: 0.9 for key in entries}
    result = replay.simulate({"q0": "small", "q1": "big"}, {"small": 0.0, "big": 0.0}, QualityCheck(k=1),
                             p_correct=p, votes=1)
    by = {t.query_id: t for t in result.traces}
    assert [s.model for s in by["q0"].steps] == ["small", "big"] and by["q0"].correct
    assert by["q1"].model == "big" and not by["q1"].correct


def test_a_router_drawing_more_deferral_votes_than_its_fit_recorded_is_refused(tiny_models_toml: Path, tmp_path: Path) -> None:
    # The replay has k recorded votes a query; a router asking for more could not be
    # calibrated (`cre calibrate` refuses it), so one that does is damaged or forged.
    from dataclasses import replace

    from support.routers import built_router

    settings = config.load(tiny_models_toml)
    router = built_router(settings)
    names = feature_names(3)
    rule = Deferral(names, (0.0,) * len(names), 0.0, (0.0,) * len(names), 0.5)
    router.deferral = DeferralCheck(3, {"small": rule, "medium": rule})
    router.quality = replace(router.quality, k=1)
    path = tmp_path / "router.cre"
    routerfile.save(router, path)
    with pytest.raises(RouterFileError, match="draws 3 votes where the fit recorded 1"):
        routerfile.load(path, settings)


def test_a_label_for_the_top_rung_replays_under_the_deferral_check() -> None:
    """The top rung's answer is final and greedy: a correctness label is its one vote. The
    replay refused labels on every rung once P(correct) was in play, so a log labelling the
    strongest model could not be calibrated or evaluated with the default check."""
    from crecli.replay import Replay, _Entry

    ladder = ["small", "big"]
    records = [Record(id=f"q{i}", prompt=f"p{i}", reference=["1"], match="numeric") for i in range(2)]
    entries = {
        ("q0", "small"): _Entry(("2",), (False,), (1.0,), None, False),
        ("q0", "big"): _Entry((), (True,), (4.0,), None, False),  # a label: right
        ("q1", "small"): _Entry(("1",), (True,), (1.0,), None, False),
        ("q1", "big"): _Entry((), (False,), (4.0,), None, False),
    }
    replay = Replay(entries, records, ladder, "bench-seconds")
    p = {("q0", "small"): 0.1, ("q1", "small"): 0.9}
    result = replay.simulate({"q0": "small", "q1": "small"}, {"small": 0.5, "big": 0.0}, QualityCheck(k=1),
                             p_correct=p, votes=1)
    by = {t.query_id: t for t in result.traces}
    assert by["q0"].model == "big" and by["q0"].correct and by["q1"].model == "small" and result.accuracy == 1.0
    # A label below the top, where P(correct) must judge a recorded answer, is still refused.
    entries[("q1", "small")] = _Entry((), (True,), (1.0,), None, False)
    with pytest.raises(CreError, match="deferral check .*cannot be replayed") as refused:
        Replay(entries, records, ladder, "bench-seconds").simulate(
            {"q0": "small", "q1": "small"}, {"small": 0.5, "big": 0.0}, QualityCheck(k=1), p_correct=p, votes=1)
    # It said only what failed; a router fitted from labels has two ways out.
    assert "--check agreement" in str(refused.value) and "reference answer" in str(refused.value)



def test_eval_of_a_log_of_labels_skips_the_top_models_vote_majority_instead_of_failing() -> None:
    # The k-vote baseline replays the top rung at threshold 1.0, which labels cannot be, and
    # the whole `cre eval` failed blaming the thresholds, though the cascade replays fine.
    from crecli import evaluate
    from crecli.costs import CostModel
    from crecli.outcomes import Outcome
    from crecli.replay import Data, Replay, assign
    from support.routers import ADDITIONS, CAPITALS, make_router

    router = make_router(thresholds={"small": 0.0, "medium": 0.0, "large": 0.0})
    assert router.quality.k > 1
    ladder = router.ladder_names
    records = [Record(id=f"q{i}", prompt=p, labels={m: True for m in ladder})
               for i, p in enumerate(ADDITIONS[:3] + CAPITALS[:3])]
    outcomes = {(r.id, m): Outcome(r.id, "sha", m, "m", "label", "label", 0, [], True) for r in records for m in ladder}
    costs = CostModel("price", {"small": 0.1, "medium": 0.3, "large": 1.0}, dict(zip(ladder, (0.1, 0.3, 1.0))))
    data = Data(records, assign(router, [r.prompt for r in records]), outcomes, costs,
                Replay.build(outcomes, records, ladder, costs), "", [1.0] * len(records))
    report = evaluate.evaluate(router, data)
    names = [p.name for p in report.points]
    assert report.cascade["accuracy"] == 1.0 and not any("vote majority" in n for n in names)
    assert any(n.startswith("oracle") for n in names)


def test_evals_cascade_without_clusters_reads_no_cluster_prior() -> None:
    # The baseline "cascade without clusters" started every query on the smallest model but
    # still fed each one's cluster prior to the deferral models, so it used the clusters it
    # is named without: here cluster 0's prior (0.9) kept its queries on `small`. Now every
    # query gets the prior of a prompt in no cluster (`Deferral.prior`), wherever it routes.
    from dataclasses import replace

    from crecli import evaluate
    from support.replays import synthetic_data
    from support.routers import make_router

    router = make_router(thresholds={"small": 0.6, "medium": 0.6, "large": 0.0})
    for c in router.clusters:
        for m in ("small", "medium"):
            c.stats[m]["shrunk_accuracy"] = 0.9 if c.id == 0 else 0.1
    names = feature_names(1)
    # P(correct) is the prior alone: weight 1 on its logit, none on the signals.
    rule = Deferral(names, (0.0, 0.0, 0.0, 0.0, 1.0), 0.0, (0.0,) * len(names), 0.5)
    router.deferral = DeferralCheck(1, {"small": rule, "medium": rule})
    router.quality = replace(router.quality, k=1)  # the votes the data records
    data = synthetic_data(30, {m: [0.5, 0.5, 0.5] for m in ("small", "medium", "large")})
    # Every query routed to start on `small`, as the baseline starts: only priors differ.
    data = replace(data, routes=[replace(r, model="small") for r in data.routes])
    assert set(data.clusters) == {0, 1, 2}
    all_in_0 = replace(data, routes=[replace(r, cluster=0) for r in data.routes])

    def no_clusters(d: Any) -> Any:
        return next(p for p in evaluate.evaluate(router, d).points if p.name.startswith("cascade without clusters"))

    point = no_clusters(data)
    assert no_clusters(all_in_0) == point
    # The overall prior (0.5) is under both thresholds: every query climbs to the top.
    assert point.escalation_rate == 1.0 and point.mean_cost == pytest.approx(1 + 3 + 5)
    # The cascade itself still reads its clusters' priors: cluster 0's queries stay on `small`.
    assert evaluate.evaluate(router, data).cascade["mean_cost"] == pytest.approx((10 * 1 + 20 * 9) / 30)
    assert evaluate.evaluate(router, all_in_0).cascade["mean_cost"] == pytest.approx(1)


def test_eval_leaves_out_the_top_models_vote_majority_when_the_fit_recorded_one_vote() -> None:
    # With the default `cre fit --k 1` the "k-vote majority" was the top model alone under a
    # majority's name: a baseline that only looked like another system.
    from dataclasses import replace

    from crecli import evaluate
    from support.replays import synthetic_data
    from support.routers import make_router

    accuracy = {m: [0.5, 0.7, 0.9] for m in ("small", "medium", "large")}
    router = make_router(thresholds={"small": 0.6, "medium": 0.6, "large": 0.0})
    one = replace(router, quality=replace(router.quality, k=1))
    names = [p.name for p in evaluate.evaluate(one, synthetic_data(30, accuracy, k=1)).points]
    assert not any("vote majority" in n for n in names) and "large only" in names
    # With several votes recorded it is a baseline of its own, and stays.
    k = router.quality.k
    assert k > 1
    names = [p.name for p in evaluate.evaluate(router, synthetic_data(30, accuracy, k=k)).points]
    assert f"large with {k}-vote majority" in names


def _price_report(cost: float) -> Any:
    """An eval report whose costs are in the price unit: about `cost` a query."""
    from crecli.evaluate import CASCADE, EvalReport, Point

    points = [Point(CASCADE, 0.8, cost, 0.3), Point("small only", 0.5, cost / 4), Point("large only", 0.85, cost * 3)]
    return EvalReport(
        n=10, unit="price", cascade={}, reference={"accuracy": 0.85, "mean_cost": cost * 3}, retained=0.8 / 0.85,
        cost_share=1 / 3, oracle_gap=0.1, baselines=points[1:],
        per_cluster=[{"cluster": 0, "n": 10, "start_model": "small", "started_on": {"small": 10}, "accuracy": 0.8,
                      "mean_cost": cost, "escalation_rate": 0.3, "answered_by": {"small": 7, "large": 3}}],
        tokens={"output_tokens": 100.0, "seconds_per_output_token": None}, points=points,
    )


def test_reports_print_a_price_per_query_in_significant_digits_not_as_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A price is about 1e-4 a query at 0.002 per 1k tokens: `cre eval`, `cre inspect`,
    # `cre calibrate` and the plots printed every cost as 0.000 or 0.00.
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from crecli import reports
    from support.routers import make_router

    screen = Console(file=io.StringIO(), width=250)
    monkeypatch.setattr(reports, "out", lambda: screen)
    report = _price_report(1.23e-4)
    reports.eval_report(report, as_json=False)
    shown = screen.file.getvalue()
    table, per_cluster = shown.split("Per cluster")
    assert "0.000123" in table and "0.000369" in table
    assert not re.search(r"\b0\.000?\b", shown.split("\naccuracy\n")[0]), shown  # the tables: no cost as 0
    assert "0.000123" in per_cluster
    scatter = reports._ascii_scatter(report.points, report.reference)
    assert re.search(r"0\.00\s+0\.000387  cost/query", scatter), scatter
    assert ">0.000101</text>" in reports._svg(report)  # a tick at a quarter of 1.1 x the dearest
    # Bench-seconds read as they did.
    assert reports.cost_text(0.512) == "0.512" and reports.cost_text(12.345) == "12.3"

    router = make_router()
    for c in router.clusters:
        for m, st in c.stats.items():
            st["mean_cost"] = 2.5e-4
    screen.file = io.StringIO()
    reports.inspect_router(router, as_json=False)
    assert "0.000250" in screen.file.getvalue()

    point = {"chosen": True, "setting": "weight 1 | thresholds 0.6/0.6/0.0", "accuracy": 0.8, "mean_cost": 1.5e-4,
             "escalation_rate": 0.2}
    cal = SimpleNamespace(
        reference={"accuracy": 0.85, "mean_cost": 4e-4}, frontier=[point], held_out=point, estimate=point,
        budget=SimpleNamespace(kind="retain", value=0.95), budget_met=True,
        setting=SimpleNamespace(label=lambda: point["setting"]), folds=2, n=10, signals={}, seconds=1.0)
    screen.file = io.StringIO()
    reports.calibration(cal, "router.cre", as_json=False)
    assert "0.000150" in screen.file.getvalue()
    capsys.readouterr()


def test_the_terminal_scatter_shows_the_cascade_and_labels_both_ends_of_its_accuracy_axis() -> None:
    # Random routing at equal cost shares the cascade's column, and at a like accuracy its
    # cell: drawn after it, its letter hid the cascade's. Only the top of the accuracy axis
    # was labelled, though the bottom is 0.05 under the lowest point, not 0.
    from crecli import reports
    from crecli.evaluate import CASCADE, RANDOM, Point

    points = [Point(CASCADE, 0.80, 2.0), Point("small only", 0.50, 1.0), Point("large only", 0.85, 5.0),
              Point(RANDOM, 0.801, 2.0)]
    lines = reports._ascii_scatter(points, {"accuracy": 0.85, "mean_cost": 5.0}).splitlines()
    grid = [line for line in lines if "|" in line]
    assert len(grid) == 14 and sum(line.count("A") for line in grid) == 1
    assert not any("D" in line for line in grid)
    assert "D random routing at equal cost (behind A)" in lines[-1]
    assert grid[0].split("|")[0].strip() == "0.90" and grid[-1].split("|")[0].strip() == "0.45"
    assert all(not line.split("|")[0].strip() for line in grid[1:-1])
