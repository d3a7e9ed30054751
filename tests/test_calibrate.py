from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from crecli import config
from crecli.calibrate import WEIGHT_GRID, Figures, estimate
from crecli.choice import PRIOR_STRENGTH, Choice, ClusterStats, ModelStats, StatsTable, assignments_for, choose_by_weight, choose_models, cluster_stats
from crecli.costs import Budget
from crecli.fit import plan, tune_thresholds
from crecli.quality import default_thresholds, threshold_grid
from crecli.replay import Replay, simulate
from crecli.errors import CreError
from crecli.costs import CostModel
from crecli.outcomes import Outcome, OutcomeStore, Vote, collect
from crecli.quality import QualityCheck
from crecli.querylog import Record

K3 = QualityCheck(k=3)


def rec(qid: str, ref: str = "1") -> Record:
    return Record(id=qid, prompt=f"prompt {qid}", reference=[ref], match="numeric")


def run(qid: str, model: str, texts: list[str], seconds: list[float] | None = None) -> Outcome:
    seconds = seconds or [1.0] * len(texts)
    return Outcome(qid, "sha", model, "m", "key", "run", 10, [Vote(t, 1, s) for t, s in zip(texts, seconds)])


def label(qid: str, model: str, ok: bool) -> Outcome:
    return Outcome(qid, "sha", model, "m", "label", "label", 0, [], ok)


def table(ladder: list[str], rows: dict[int, tuple[int, dict[str, tuple[float, float]]]]) -> StatsTable:
    """rows: cluster -> (size, model -> (shrunk accuracy, mean cost))."""
    clusters = {
        cid: ClusterStats(cid, size, {m: ModelStats(size, 0, acc, acc, cost) for m, (acc, cost) in models.items()})
        for cid, (size, models) in rows.items()
    }
    return StatsTable(clusters, ClusterStats(-1, 0, {}), ladder, PRIOR_STRENGTH)


# --- cluster_stats -----------------------------------------------------------------------

def test_cluster_stats_shrinks_toward_the_global_accuracy() -> None:
    ladder = ["small", "large"]
    records = [rec(f"q{i}") for i in range(6)]
    labels = [0, 0, 0, 1, 1, -1]
    small_ok = [True, True, False, False, False, True]
    outcomes = {}
    for r, ok in zip(records, small_ok):
        outcomes[(r.id, "small")] = run(r.id, "small", ["1" if ok else "2"], [0.5])
        outcomes[(r.id, "large")] = run(r.id, "large", ["1"], [2.0])
    t = cluster_stats(labels, records, outcomes, ladder, CostModel.build(outcomes.values()))
    assert sorted(t.clusters) == [-1, 0, 1]
    g = 3 / 6
    s0 = t.clusters[0].models["small"]
    assert (s0.n, s0.correct, s0.accuracy) == (3, 2, pytest.approx(2 / 3))
    assert s0.shrunk_accuracy == pytest.approx((2 + PRIOR_STRENGTH * g) / (3 + PRIOR_STRENGTH))
    assert t.clusters[1].models["small"].shrunk_accuracy == pytest.approx((0 + 5 * g) / (2 + 5))
    assert t.clusters[1].models["large"].shrunk_accuracy == pytest.approx(1.0)
    assert s0.mean_cost == 0.5 and t.clusters[0].models["large"].mean_cost == 2.0
    assert t.clusters[0].size == 3 and t.overall.size == 6
    assert t.overall.models["small"].accuracy == g
    assert s0.to_dict()["shrunk_accuracy"] == s0.shrunk_accuracy


def test_empirical_strength_is_the_method_of_moments_within_its_bounds() -> None:
    from crecli.choice import STRENGTH_BOUNDS, empirical_strength

    lo, hi = STRENGTH_BOUNDS
    # Two 30-answer clusters at 0.3 and 0.7 around 0.5: spread 2.4, of which one cluster's
    # worth of sampling (0.25), over 60 - 1800/60 - 2 + 1 = 29 answers' room.
    tau2 = (2.4 - 0.25) / 29
    assert empirical_strength([(30, 9), (30, 21)]) == pytest.approx(0.25 / tau2 - 1)
    # Simulated: 400 clusters of 10 from a Beta prior worth 5 answers come out near 5.
    rng = np.random.default_rng(0)
    rates = rng.beta(0.4 * 5, 0.6 * 5, size=400)
    assert 4.0 < empirical_strength([(10, int(rng.binomial(10, r))) for r in rates]) < 6.0
    # Clusters no more spread than sampling gives: the log-wide figure speaks for them all.
    assert empirical_strength([(30, 15), (30, 15), (30, 16)]) == hi
    # A model right in one task and wrong in another: the record is trusted, within the bound.
    assert empirical_strength([(100, 0), (100, 100)]) == lo
    # Nothing to estimate from: the fixed strength.
    assert empirical_strength([(30, 3)]) == PRIOR_STRENGTH
    assert empirical_strength([(30, 0), (30, 0)]) == PRIOR_STRENGTH


def test_cluster_stats_can_shrink_each_model_by_its_own_empirical_strength() -> None:
    from crecli.choice import EMPIRICAL, empirical_strength

    ladder = ["small", "large"]
    records = [rec(f"q{i}") for i in range(40)]
    labels = [i // 10 for i in range(40)]  # four clusters of ten
    outcomes = {}
    for i, r in enumerate(records):
        small_ok = labels[i] in (0, 1) and i % 10 < 9  # 9 of 10 in two clusters, none in the others
        large_ok = i % 10 < 6  # 6 of 10 everywhere
        outcomes[(r.id, "small")] = run(r.id, "small", ["1" if small_ok else "2"], [0.5])
        outcomes[(r.id, "large")] = run(r.id, "large", ["1" if large_ok else "2"], [2.0])
    t = cluster_stats(labels, records, outcomes, ladder, CostModel.build(outcomes.values()), prior_strength=EMPIRICAL)
    m_small = empirical_strength([(10, 9), (10, 9), (10, 0), (10, 0)])
    assert t.strength("small") == pytest.approx(m_small) and t.strength("large") == 50.0
    assert t.clusters[2].models["small"].shrunk_accuracy == pytest.approx((0 + m_small * 18 / 40) / (10 + m_small))
    # Less pull toward 0.45 than the fixed strength gives a cluster the small model never gets right.
    assert t.clusters[2].models["small"].shrunk_accuracy < (0 + PRIOR_STRENGTH * 18 / 40) / (10 + PRIOR_STRENGTH)


def test_cluster_stats_without_outcomes_falls_back_to_global_figures() -> None:
    records = [rec("a"), rec("b")]
    outcomes = {("a", "small"): run("a", "small", ["1"], [0.25]), ("b", "small"): run("b", "small", ["1"], [0.75])}
    outcomes[("a", "large")] = label("a", "large", True)
    outcomes[("b", "large")] = label("b", "large", False)
    costs = CostModel("seconds", {}, {"large": 3.0})
    t = cluster_stats([0, 1], [records[0], records[1]], {k: v for k, v in outcomes.items() if k != ("b", "small")},
                      ["small", "large"], costs, prior_strength=1.0)
    empty = t.clusters[1].models["small"]
    assert empty.n == 0 and empty.accuracy == 1.0 and empty.shrunk_accuracy == 1.0 and empty.mean_cost == 0.25
    assert t.clusters[1].models["large"].shrunk_accuracy == pytest.approx((0 + 1 * 0.5) / 2)
    assert t.clusters[0].models["large"].mean_cost == 3.0


def test_cluster_stats_keep_each_models_output_length_per_cluster() -> None:
    # How long a model's answers run depends on the task: the batch summary prices the
    # strongest model's answer to an unseen prompt at its cluster's mean.
    ladder = ["small", "large"]
    records = [rec(f"q{i}") for i in range(4)]
    outcomes = {}
    for r, tokens in zip(records, [2, 4, 9, 11]):
        outcomes[(r.id, "large")] = Outcome(r.id, "sha", "large", "m", "key", "run", 10, [Vote("1", tokens, 1.0)])
        outcomes[(r.id, "small")] = label(r.id, "small", True)  # a label has no tokens
    t = cluster_stats([0, 0, 1, 1], records, outcomes, ladder, CostModel("seconds", {}, {"small": 1.0}))
    assert t.clusters[0].models["large"].mean_output_tokens == 3.0
    assert t.clusters[1].models["large"].mean_output_tokens == 10.0
    assert t.overall.models["large"].mean_output_tokens == 6.5
    assert t.clusters[0].models["small"].mean_output_tokens == 0.0  # labels only: nothing measured
    assert t.clusters[1].models["large"].to_dict()["mean_output_tokens"] == 10.0


def too_long(qid: str, model: str) -> Outcome:
    return Outcome(qid, "sha", model, "m", "key", "too_long", 0, [], reason="prompt fills the context")


def test_a_prompt_too_long_for_a_model_is_wrong_but_no_part_of_its_mean_cost() -> None:
    # A too-long outcome costs nothing (the model never ran); averaged in, it halved small's
    # mean cost in cluster 0 (the stored mean_cost, what choose_by_weight weighs), its "small
    # alone" baseline's, and the oracle picked it, free, where no model was right.
    from types import SimpleNamespace

    from crecli.evaluate import _oracle
    from crecli.replay import greedy

    ladder = ["small", "large"]
    records = [rec("a"), rec("b"), rec("c")]
    outcomes = {("a", "small"): run("a", "small", ["1"], [2.0]), ("b", "small"): too_long("b", "small"),
                ("c", "small"): run("c", "small", ["1"], [2.0]),
                **{(r.id, "large"): run(r.id, "large", ["2"], [5.0]) for r in records}}
    costs = CostModel.build(outcomes.values())
    t = cluster_stats([0, 0, 1], records, outcomes, ladder, costs, prior_strength=1.0)
    small = t.clusters[0].models["small"]
    assert (small.n, small.correct, small.accuracy, small.mean_cost) == (2, 1, 0.5, 2.0)
    assert t.overall.models["small"].mean_cost == 2.0 and t.overall.models["large"].mean_cost == 5.0
    only_long = cluster_stats([0, 1, 1], records, outcomes, ladder, costs, prior_strength=1.0)
    assert only_long.clusters[0].models["small"].mean_cost == 2.0  # none priced there: the model's log-wide mean

    data = SimpleNamespace(records=records, replay=Replay.build(outcomes, records, ladder, costs))
    assert greedy(data, range(3), lambda i: "small") == (pytest.approx(2 / 3), 2.0)  # type: ignore[arg-type]
    oracle = _oracle(data, ladder)  # type: ignore[arg-type]
    # b: no model is right, and small cannot answer it: the cheapest that can, large.
    assert (oracle.accuracy, oracle.mean_cost) == (pytest.approx(2 / 3), pytest.approx(3.0))


# --- choose_models -----------------------------------------------------------------------

LADDER = ["s", "m", "l"]
ROWS = {
    0: (10, {"s": (0.5, 1.0), "m": (0.89, 2.0), "l": (0.9, 4.0)}),
    1: (10, {"s": (0.2, 1.0), "m": (0.5, 2.0), "l": (0.9, 4.0)}),
}


def test_retain_picks_the_cheapest_model_close_enough_to_the_top() -> None:
    choice = choose_models(table(LADDER, ROWS), Budget("retain", 0.98))
    assert choice.models == {0: "m", 1: "l"}
    assert choice.fallback == "l"
    assert choice.expected_accuracy == pytest.approx((8.9 + 9) / 20)
    assert choice.expected_cost == pytest.approx(3.0)
    assert (choice.reference_accuracy, choice.reference_cost) == (pytest.approx(0.9), pytest.approx(4.0))
    assert choose_models(table(LADDER, ROWS), Budget("retain", 0.5)).models == {0: "s", 1: "m"}


def test_retain_above_one_takes_the_most_accurate_when_none_qualifies() -> None:
    rows = {0: (4, {"s": (0.95, 1.0), "m": (0.6, 2.0), "l": (0.9, 4.0)})}
    assert choose_models(table(LADDER, rows), Budget("retain", 1.05)).models == {0: "s"}
    assert choose_models(table(LADDER, rows), Budget("retain", 1.2)).models == {0: "s"}


def test_choose_by_weight_prices_accuracy_alike_in_every_cluster() -> None:
    # Both clusters lose the same accuracy for the same saving on a smaller model; only the
    # strongest model's accuracy there differs. A share of it per cluster treats them apart,
    # one price of accuracy alike.
    rows = {
        0: (10, {"s": (0.05, 1.0), "m": (0.08, 2.0), "l": (0.1, 4.0)}),
        1: (10, {"s": (0.85, 1.0), "m": (0.88, 2.0), "l": (0.9, 4.0)}),
        -1: (2, {"s": (0.1, 1.0), "m": (0.2, 2.0), "l": (0.5, 4.0)}),
    }
    t = table(LADDER, rows)
    t.overall = ClusterStats(-1, 22, {m: ModelStats(22, 0, a, a, c) for m, (a, c) in
                                      {"s": (0.4, 1.0), "m": (0.45, 2.0), "l": (0.5, 4.0)}.items()})
    assert choose_models(t, Budget("retain", 0.9)).models == {0: "l", 1: "s"}
    # weight x accuracy / 0.5 - cost / 4: s wins below w = 25/6, m up to 12.5, l above.
    assert choose_by_weight(t, 2.0).models == {0: "s", 1: "s"}
    assert choose_by_weight(t, 8.0).models == {0: "m", 1: "m"}
    assert choose_by_weight(t, 20.0).models == {0: "l", 1: "l"}
    assert choose_by_weight(t, 0.0).models == {0: "s", 1: "s"}  # the cheapest
    choice = choose_by_weight(t, 8.0)
    assert choice.fallback == "l"  # unclustered prompts start on the strongest model
    assert choice.expected_cost == pytest.approx((10 * 2 + 10 * 2 + 2 * 4) / 22)
    assert choice.reference_accuracy == pytest.approx((1 + 9 + 1) / 22)
    # Equal scores go to the cheaper model.
    tie = table(["s", "l"], {0: (5, {"s": (0.5, 1.0), "l": (1.0, 2.0)})})
    tie.overall = ClusterStats(-1, 5, {"s": ModelStats(5, 0, 0.5, 0.5, 1.0), "l": ModelStats(5, 0, 1.0, 1.0, 2.0)})
    assert choose_by_weight(tie, 1.0).models == {0: "s"}  # 0.5 - 0.5 == 1.0 - 1.0


def test_max_cost_is_a_greedy_knapsack_by_accuracy_per_cost() -> None:
    assert choose_models(table(LADDER, ROWS), Budget("max_cost", 0.5)).models == {0: "m", 1: "m"}
    assert choose_models(table(LADDER, ROWS), Budget("max_cost", 0.75)).models == {0: "m", 1: "l"}
    assert choose_models(table(LADDER, ROWS), Budget("max_cost", 1.0)).models == {0: "l", 1: "l"}
    assert choose_models(table(LADDER, ROWS), Budget("max_cost", 0.1)).models == {0: "s", 1: "s"}


def test_max_cost_charges_unclustered_queries_the_fallback() -> None:
    rows = {**ROWS, -1: (5, {"s": (0.1, 1.0), "m": (0.2, 2.0), "l": (0.3, 4.0)})}
    choice = choose_models(table(LADDER, rows), Budget("max_cost", 0.5))
    assert choice.models == {0: "m", 1: "s"}  # budget 50: 20 for the fallback, 20 + 10 for the clusters
    assert choice.expected_cost == pytest.approx((20 + 10 + 20) / 25)


def test_budget_validates_its_kind_and_value() -> None:
    with pytest.raises(CreError, match="retain, max_cost"):
        Budget("cheap", 0.5)
    # One home for the ranges, which the CLI and the router loader both use.
    for kind, value in (("retain", 0), ("retain", 1.6), ("max_cost", 1.01), ("max_cost", -0.1), ("retain", float("nan"))):
        with pytest.raises(CreError, match="--retain|--max-cost"):
            Budget(kind, value)
    assert Budget("retain", 1.5).value == 1.5 and Budget("max_cost", 1.0).value == 1.0
    assert Budget().to_dict() == {"kind": "retain", "value": 0.98}


# --- simulate ----------------------------------------------------------------------------

def sim_fixture() -> tuple[list[Record], dict, dict[str, str]]:
    records = [rec(q) for q in ("q0", "q1", "q2", "q3")]
    outcomes = {
        ("q0", "small"): run("q0", "small", ["1", "1", "2"], [1.0, 0.25, 0.25]),
        ("q1", "small"): run("q1", "small", ["2", "3", "1"], [1.0, 0.25, 0.25]),
        ("q2", "small"): run("q2", "small", ["2", "two", "1"], [1.0, 0.25, 0.25]),
        ("q3", "small"): run("q3", "small", ["1", "1", "1"], [1.0, 0.25, 0.25]),
    }
    for q, text in (("q0", "1"), ("q1", "The answer is 1."), ("q2", "1"), ("q3", "3")):
        outcomes[(q, "large")] = run(q, "large", [text, "1", "1"], [2.0, 0.5, 0.5])
    starts = {"q0": "small", "q1": "small", "q2": "small", "q3": "large"}
    return records, outcomes, starts


def test_simulate_replays_the_cascade_exactly() -> None:
    records, outcomes, starts = sim_fixture()
    result = simulate(starts, outcomes, records, ["small", "large"], {"small": 0.6, "large": 0.0}, K3)
    t = {tr.query_id: tr for tr in result.traces}
    # q0: two agreeing votes settle it; q1: no majority, escalates; q2: "2" and "two" agree, wrongly
    assert [(s.model, s.used, s.accept) for s in t["q0"].steps] == [("small", 2, True)]
    assert [(s.model, s.used, s.accept) for s in t["q1"].steps] == [("small", 3, False), ("large", 1, True)]
    assert (t["q2"].answer, t["q2"].correct, t["q2"].cost) == ("2", False, 1.25)
    assert (t["q3"].model, t["q3"].correct, t["q3"].cost) == ("large", False, 2.0)
    assert t["q1"].answer == "1" and t["q1"].correct and t["q1"].cost == 3.5
    assert result.accuracy == 0.5
    assert result.cost == 8.0 and result.mean_cost == 2.0
    assert result.escalation_rate == 0.25
    assert result.answered_by == {"small": 2, "large": 2}
    assert result.summary()["unit"] == "seconds"


def test_simulate_top_threshold_draws_votes_for_a_majority() -> None:
    records, outcomes, starts = sim_fixture()
    result = simulate({"q3": "large"}, outcomes, records[3:], ["small", "large"], {"small": 0.6, "large": 0.6}, K3)
    step = result.traces[0].steps[0]
    # "3", "1", "1": the greedy answer is outvoted once a third vote is drawn
    assert (step.used, step.accept, result.traces[0].answer, result.accuracy, result.cost) == (3, True, "1", 1.0, 3.0)
    # at 1.0 no unanimity is possible after "3", "1": two votes, and the tie goes to the greedy answer
    result = simulate({"q3": "large"}, outcomes, records[3:], ["small", "large"], {"small": 0.6, "large": 1.0}, K3)
    step = result.traces[0].steps[0]
    assert (step.used, step.accept, result.traces[0].answer, result.accuracy, result.cost) == (2, False, "3", 0.0, 2.5)


def test_simulate_without_early_stop_draws_every_vote() -> None:
    records, outcomes, starts = sim_fixture()
    no_stop = QualityCheck(k=3, early_stop=False)
    result = simulate(starts, outcomes, records[:1], ["small", "large"], {"small": 0.6, "large": 0.0}, no_stop)
    step = result.traces[0].steps[0]
    assert (step.used, step.agreement, result.cost) == (3, pytest.approx(2 / 3), 1.5)


def test_simulate_with_per_query_threshold_overrides() -> None:
    records, outcomes, starts = sim_fixture()
    thresholds = {"small": 0.6, "large": 0.0}
    result = simulate(starts, outcomes, records, ["small", "large"], thresholds, K3, overrides={"q2": {"small": 1.0}})
    q2 = result.traces[2]
    assert [s.model for s in q2.steps] == ["small", "large"] and q2.correct
    assert result.accuracy == 0.75


def test_simulate_label_only_outcomes_replay_only_single_vote_checks() -> None:
    records = [rec("a")]
    outcomes = {("a", "small"): label("a", "small", True), ("a", "large"): run("a", "large", ["2"])}
    costs = CostModel("seconds", {}, {"small": 0.5})
    ok = simulate({"a": "small"}, outcomes, records, ["small", "large"], {"small": 0.0, "large": 0.0}, K3, costs)
    assert (ok.accuracy, ok.cost, ok.traces[0].model) == (1.0, 0.5, "small")
    with pytest.raises(CreError, match="only a correctness label"):
        simulate({"a": "small"}, outcomes, records, ["small", "large"], {"small": 0.6, "large": 0.0}, K3, costs)


def test_simulate_reports_missing_outcomes_and_starts() -> None:
    records, outcomes, starts = sim_fixture()
    del outcomes[("q1", "large")]
    thresholds = {"small": 0.6, "large": 0.0}
    with pytest.raises(CreError, match="no recorded outcome for query 'q1' on 'large'"):
        simulate(starts, outcomes, records, ["small", "large"], thresholds, K3)
    with pytest.raises(CreError, match="no starting model"):
        simulate({}, outcomes, records, ["small", "large"], thresholds, K3)
    with pytest.raises(CreError, match="not on the ladder"):
        simulate({"q0": "huge"}, outcomes, records[:1], ["small", "large"], thresholds, K3)
    with pytest.raises(CreError, match="fewer than the k=5"):
        simulate(starts, outcomes, records[:1], ["small", "large"], thresholds, QualityCheck(k=5))


def test_simulate_replays_a_log_sized_run_at_every_threshold() -> None:
    """A trace for each of 480 queries at each threshold (how fast: bench/replay_speed.py)."""
    rng = random.Random(0)
    ladder = ["s", "m", "l"]
    records = [rec(f"q{i}", ref=str(i % 3)) for i in range(480)]
    outcomes = {
        (r.id, m): run(r.id, m, [str(rng.randrange(3)) for _ in range(5)], [rng.random() for _ in range(5)])
        for r in records for m in ladder
    }
    replay = Replay.build(outcomes, records, ladder)
    starts = {r.id: rng.choice(ladder) for r in records}
    quality = QualityCheck(k=5)
    for t in (0.2, 0.4, 0.6, 0.8, 1.0):
        result = replay.simulate(starts, {"s": t, "m": t, "l": 0.0}, quality)
        assert len(result.traces) == 480


# --- thresholds --------------------------------------------------------------------------

def tune_fixture() -> Replay:
    records = [rec(q) for q in "abcd"]
    small = {"a": ["1", "1", "1"], "b": ["2", "1", "3"], "c": ["2", "2", "1"], "d": ["1", "1", "2"]}
    large = {"a": "1", "b": "1", "c": "1", "d": "2"}
    outcomes = {}
    for q in "abcd":
        outcomes[(q, "small")] = run(q, "small", small[q], [1.0, 1.0, 1.0])
        outcomes[(q, "large")] = run(q, "large", [large[q], "1", "1"], [4.0, 1.0, 1.0])
    return Replay.build(outcomes, records, ["small", "large"])


def test_default_thresholds_and_grid() -> None:
    assert default_thresholds(["s", "m", "l"]) == {"s": 0.6, "m": 0.6, "l": 0.0}
    assert threshold_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "budget, threshold, accuracy, cost, met",
    [
        (Budget("retain", 1.0), 2 / 3, 0.75, 13.0, True),  # 1.0 reaches it too, at cost 23
        (Budget("retain", 0.6), 0.0, 0.5, 4.0, True),
        (Budget("retain", 1.2), 2 / 3, 0.75, 13.0, False),  # unreachable: the most accurate, cheapest
        (Budget("max_cost", 0.5), 0.0, 0.5, 4.0, True),
        (Budget("max_cost", 1.0), 2 / 3, 0.75, 13.0, True),
        (Budget("max_cost", 0.1), 0.0, 0.5, 4.0, False),  # unreachable: the cheapest
    ],
)
def test_tune_thresholds_meets_the_budget(budget: Budget, threshold: float, accuracy: float, cost: float, met: bool) -> None:
    replay = tune_fixture()
    tuning = tune_thresholds(replay, {q: "small" for q in "abcd"}, K3, budget)
    assert tuning.thresholds == {"small": pytest.approx(threshold), "large": 0.0}
    assert (tuning.result.accuracy, tuning.result.cost, tuning.met) == (accuracy, cost, met)
    assert (tuning.reference.accuracy, tuning.reference.cost) == (0.75, 16.0)
    assert tuning.tried == 4


def test_tune_thresholds_keeps_the_default_where_it_makes_no_difference() -> None:
    replay = tune_fixture()
    # every query starts on the top rung: small's threshold changes nothing
    tuning = tune_thresholds(replay, {q: "large" for q in "abcd"}, K3, Budget("retain", 1.0), grid=threshold_grid(5))
    assert tuning.thresholds == {"small": 0.6, "large": 0.0} and tuning.tried == 6


def test_tune_thresholds_needs_a_grid() -> None:
    with pytest.raises(ValueError):
        tune_thresholds(tune_fixture(), {q: "small" for q in "abcd"}, K3, Budget(), grid=[])


# --- the plan fit uses -------------------------------------------------------------------

def test_assignments_follow_clusters_with_fallback() -> None:
    choice = Choice({0: "s", 1: "m"}, "l", 0, 0, 0, 0)
    assert assignments_for([rec("a"), rec("b"), rec("c")], [1, -1, 0], choice) == {"a": "m", "b": "l", "c": "s"}


def test_plan_end_to_end_with_fake_models(tiny_models_toml: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import re

    from crecli.models import registry
    from crecli.models.fake import FakeBackend

    settings = config.load(tiny_models_toml)
    records = [Record(id=f"add{i}", prompt=f"add {i} and {i}", reference=[str(2 * i)], match="numeric") for i in range(6)]
    records += [Record(id=f"hard{i}", prompt=f"hard {i}", reference=["42"], match="numeric") for i in range(6)]
    clusters = {r.id: (0 if r.id.startswith("add") else 1) for r in records}

    def smart(text: str, params: object) -> str:
        found = re.search(r"add (\d+)", text)
        return str(2 * int(found.group(1))) if found else "42"

    answers = {"small": lambda text, p: smart(text, p) if "add" in text else "7", "medium": smart, "large": smart}
    speed = {"small": 0.001, "medium": 0.002, "large": 0.004}  # bigger models are slower per token
    monkeypatch.setattr(registry, "make_backend", lambda spec: FakeBackend(spec, answers[spec.name], speed[spec.name]))
    monkeypatch.setattr(registry, "reports_signals", lambda spec: False)
    with OutcomeStore(tmp_path / "o.sqlite") as store:
        outcomes = collect(records, settings, store, K3)
    p = plan(records, clusters, outcomes, settings, Budget("retain", 0.75), K3)
    # small is right on every "add" query, but shrinkage toward its 50% log-wide accuracy
    # leaves it at (6 + 5 * 0.5) / 11 = 0.77: enough for 0.75, not for 0.98
    assert p.choice.models == {0: "small", 1: "medium"}
    assert choose_models(p.table, Budget("retain", 0.98)).models == {0: "medium", 1: "medium"}
    assert p.unit == "seconds" and p.budget_met is True
    # every model agrees with itself here, so the cheapest thresholds (greedy only) keep accuracy
    assert p.thresholds == {"small": 0.0, "medium": 0.0, "large": 0.0}
    assert p.result is not None and p.result.accuracy == 1.0 and p.result.escalation_rate == 0.0

    lab = Record(id="lab", prompt="add 9 and 9", reference=None, labels={"small": True, "medium": True, "large": True})
    with OutcomeStore(tmp_path / "o.sqlite") as store:
        outcomes = collect(records + [lab], settings, store, K3)
    p = plan(records + [lab], {**clusters, "lab": 0}, outcomes, settings, Budget("retain", 0.98), K3)
    assert p.thresholds == default_thresholds(settings.ladder) and p.result is None and p.budget_met is None


def test_estimate_is_the_mean_of_held_out_and_in_sample_figures() -> None:
    got = estimate(Figures(0.5, 0.8, 0.1), Figures(0.7, 0.6, 0.3))
    assert (got.accuracy, got.mean_cost, got.escalation_rate) == pytest.approx((0.6, 0.7, 0.2))


def test_the_price_grid_is_fine_where_the_prices_that_keep_98_percent_fell() -> None:
    grid = list(WEIGHT_GRID)
    assert grid == sorted(set(grid)) and grid[0] == 0.0 and grid[-1] >= 1e6
    steps = [b - a for a, b in zip(grid, grid[1:]) if a < 12]
    assert max(steps) <= 0.25 and {3.0, 4.0, 6.0, 10.0} <= set(grid)


def test_calibration_starts_a_prompt_beyond_its_clusters_reach_where_cre_ask_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cre ask` starts a prompt farther from its cluster than the cluster's reach on the
    # fallback (`route.decide`); calibration replayed it from the cluster's model, so it
    # tuned thresholds and reported figures for starts that never happen (a new --log).
    from types import SimpleNamespace

    from crecli import calibrate
    from crecli.route import RouteDecision

    seen: dict[str, str] = {}

    class Capture:
        def __init__(self, *args: object) -> None:
            pass

        def simulate(self, starts: dict[str, str], *args: object, **kw: object) -> None:
            seen.update(starts)

    monkeypatch.setattr(calibrate, "Replay", Capture)
    records = [rec("near"), rec("far"), rec("none")]
    routes = [RouteDecision(0, "small", 0.1, "", 0.0, True), RouteDecision(0, "large", 0.9, "", 0.0, False),
              RouteDecision(-1, "large", 2.0, "", 0.0, False)]
    data = SimpleNamespace(records=records, routes=routes, clusters=[0, 0, -1],
                           replay=SimpleNamespace(entries={}, ladder=["small", "large"], unit="seconds"))
    choice = Choice({0: "small"}, "large", 0.0, 0.0, 0.0, 0.0)
    calibrate._simulate(data, [0, 1, 2], choice, {"small": 0.0, "large": 0.0}, K3)  # type: ignore[arg-type]
    assert seen == {"near": "small", "far": "large", "none": "large"}


def test_calibrations_deferral_prior_blends_by_distance_as_the_live_one_does() -> None:
    # Live, a prompt beyond its cluster's radius gets a blend of the cluster's accuracy and
    # the model's log-wide one (`RouterFile.priors`); calibration gave it the cluster's alone,
    # so P(correct) near a threshold differed from what `cre ask` computes.
    from types import SimpleNamespace

    from crecli.deferral import _table_prior
    from crecli.quality import blend_prior

    stats = table(["small", "large"], {0: (10, {"small": (0.9, 1.0), "large": (0.9, 2.0)})})
    stats.overall.models["small"] = ModelStats(40, 24, 0.6, 0.6, 1.0)
    data = SimpleNamespace(clusters=[0, 0, 0], trust=[1.0, 0.25, 0.0])
    prior = _table_prior(data, stats)  # type: ignore[arg-type]
    assert [prior(i, "small") for i in range(3)] == pytest.approx([0.9, blend_prior(0.9, 0.6, 0.25), 0.6])


def test_the_replay_pays_every_vote_drawn_as_the_live_step_does() -> None:
    # A deferral rung draws its votes up front; one without log-probabilities falls back to
    # the agreement check, which may decide on fewer of them. The live step pays every vote
    # drawn; the replay paid only those used.
    from crecli.replay import _Entry

    records = [rec("q0")]
    entries = {("q0", "small"): _Entry(("1", "1", "2"), (True, True, False), (1.0, 2.0, 3.0)),
               ("q0", "large"): _Entry(("1",), (True,), (8.0,))}
    replay = Replay(entries, records, ["small", "large"], "bench-seconds")
    result = replay.simulate({"q0": "small"}, {"small": 0.6, "large": 0.0}, K3, p_correct={}, votes=3)
    [step] = result.traces[0].steps
    assert step.used == 2 and step.cost == 3.0


# --- copies of a prompt (the same text under other ids) -----------------------------------

def _old_folds(n: int, k: int, seed: int) -> list[list[int]]:
    """The folds before copies of a prompt were kept together: the t-th row of the shuffle in fold t % k."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def test_a_log_without_repeated_prompts_gets_exactly_the_folds_it_always_got() -> None:
    # Keeping copies together must not move a published figure: same draws, same assignment.
    from crecli.calibrate import folds

    for n in (10, 11, 37, 200, 1400):
        for k in (2, 3, 5):
            for seed in (0, 1, 7):
                old = _old_folds(n, k, seed)
                assert folds(n, k, seed) == old
                assert folds(n, k, seed, [f"prompt {i}" for i in range(n)]) == old


def test_every_copy_of_a_prompt_lands_in_one_fold() -> None:
    from crecli.calibrate import fold_numbers, folds

    prompts = [f"p{(i * 7) % 13}" for i in range(40)]
    split = folds(40, 5, 3, prompts)
    assert sorted(i for fold in split for i in fold) == list(range(40))
    for p in set(prompts):
        assert sum(any(prompts[i] == p for i in fold) for fold in split) == 1
    # The distinct prompts are dealt out evenly: 13 over 5 folds.
    assert sorted(len({prompts[i] for i in fold}) for fold in split) == [2, 2, 3, 3, 3]
    # Each row's fold number names the fold that holds it.
    number = fold_numbers(split, 40)
    assert all(i in split[number[i]] for i in range(40))
    assert fold_numbers([[1, 2], [0]], 3) == [1, 0, 0]


@pytest.mark.parametrize("check", ["agreement", "deferral"])
def test_calibration_never_holds_out_a_query_whose_copy_chose_its_model(monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    # The store records one answer per prompt, so a copy in the training folds put the
    # held-out query's own answer into its cluster's model choice (and its deferral prior):
    # held-out figures were partly in sample.
    from types import SimpleNamespace

    from crecli import calibrate
    from support.replays import synthetic_data

    data = synthetic_data(30, {"s": [0.3, 0.9], "m": [0.6, 0.9], "l": [0.9, 0.9]}, copies=3)
    splits: list[tuple[list[int], list[int]]] = []
    for name in ("sweep", "sweep_deferral"):
        real = getattr(calibrate, name)

        def spy(data: object, fit_idx: list[int], eval_idx: list[int], *args: object, real: object = real, **kw: object) -> object:
            splits.append((list(fit_idx), list(eval_idx)))
            return real(data, fit_idx, eval_idx, *args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(calibrate, name, spy)
    router = SimpleNamespace(ladder_names=["s", "m", "l"], quality=QualityCheck(k=1))
    calibrate.recalibrate(router, data, Budget("retain", 0.98), check=check)  # type: ignore[arg-type]
    assert len(splits) == 5
    for fit_idx, eval_idx in splits:
        assert not {data.records[i].prompt for i in fit_idx} & {data.records[i].prompt for i in eval_idx}


def test_calibration_needs_enough_distinct_prompts_for_its_folds() -> None:
    from types import SimpleNamespace

    from crecli import calibrate
    from support.replays import synthetic_data

    data = synthetic_data(6, {"s": [0.5], "l": [0.9]}, copies=4)
    router = SimpleNamespace(ladder_names=["s", "l"], quality=QualityCheck(k=1))
    with pytest.raises(CreError, match="only 6 distinct prompts among 24 labelled queries"):
        calibrate.recalibrate(router, data, Budget(), check="agreement")  # type: ignore[arg-type]


@pytest.mark.parametrize(("distinct", "copies", "n_folds", "advice"), [
    # It advised "--folds 2" whatever --folds was, 2 included: the most the log allows.
    (2, 1, 2, "give a log of at least 4 labelled queries"),
    (3, 1, 2, "give a log of at least 4 labelled queries"),
    (5, 1, 3, "use --folds 2 or a larger log"),
    (6, 4, 5, "use --folds 3 or a larger log"),
    (3, 4, 2, "give a log of at least 4 distinct labelled prompts"),
    # Too few queries and copies among them: the advice was from the queries (4 // 2), and
    # --folds 2 then refused the 2 distinct prompts.
    (2, 2, 3, "give a log of at least 4 distinct labelled prompts"),
    (4, 2, 5, "use --folds 2 or a larger log"),
])
def test_too_small_a_log_for_its_folds_is_advised_the_most_folds_it_allows(
        distinct: int, copies: int, n_folds: int, advice: str) -> None:
    from types import SimpleNamespace

    from crecli import calibrate
    from support.replays import synthetic_data

    data = synthetic_data(distinct, {"s": [0.5], "l": [0.9]}, copies=copies)
    router = SimpleNamespace(ladder_names=["s", "l"], quality=QualityCheck(k=1))
    with pytest.raises(CreError) as raised:
        calibrate.recalibrate(router, data, Budget(), n_folds=n_folds, check="agreement")  # type: ignore[arg-type]
    assert str(raised.value).endswith(advice), raised.value
    # 2 distinct prompts a fold are enough.
    data = synthetic_data(2 * n_folds, {"s": [0.5], "l": [0.9]})
    calibrate.recalibrate(router, data, Budget(), n_folds=n_folds, check="agreement")  # type: ignore[arg-type]


def test_a_training_answers_deferral_prior_leaves_out_every_copy_of_its_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the row's own label was left out; its copies' labels (the same recorded answer)
    # still fed its prior, so the fitted model trusted the prior more than it deserves.
    from crecli import deferral
    from crecli.calibrate import _table
    from crecli.choice import shrink
    from support.replays import synthetic_data

    data = synthetic_data(24, {"s": [0.2, 0.5, 0.9], "l": [0.9, 0.9, 0.9]}, copies=3, seed=4)
    ladder = ["s", "l"]
    idx = [i for i in range(len(data.records)) if i % 5 != 0]  # some prompts keep fewer copies
    table = _table(data, idx, ladder)
    seen: dict[int, float] = {}
    real = deferral._blended

    def spy(data_: object, table_: object, i: int, model: str, cluster: float) -> float:
        seen[i] = cluster
        return real(data_, table_, i, model, cluster)  # type: ignore[arg-type]

    monkeypatch.setattr(deferral, "_blended", spy)
    deferral.train_deferral(data, idx, table, "s", 1)
    assert sorted(seen) == idx
    overall, strength = table.overall.models["s"].accuracy, table.strength("s")
    for i in idx:
        # The prior from the other prompts of its cluster alone, shrunk as the table shrinks.
        others = [j for j in idx if data.clusters[j] == data.clusters[i] and data.records[j].prompt != data.records[i].prompt]
        right = sum(data.replay.entries[(data.records[j].id, "s")].correct[0] for j in others)
        assert seen[i] == pytest.approx(shrink(right, len(others), overall, strength))


# --- label-only outcomes at more than one vote ------------------------------------------------

@pytest.mark.parametrize("labelled", [("s",), ("s", "m", "l")])
def test_agreement_calibration_sweeps_only_thresholds_a_label_can_be_replayed_at(
    labelled: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # A router fitted at --k 5 with any label-only outcome: the sweep included thresholds
    # needing more than one vote on the labelled models, and `cre calibrate --check
    # agreement` aborted on the first ("threshold 0.4 cannot be replayed").
    from types import SimpleNamespace

    from crecli import calibrate
    from support.replays import synthetic_data

    data = synthetic_data(40, {"s": [0.3, 0.9], "m": [0.6, 0.9], "l": [0.9, 0.9]}, k=5, labelled=labelled)
    router = SimpleNamespace(ladder_names=["s", "m", "l"], quality=QualityCheck(k=5))
    cal = calibrate.recalibrate(router, data, Budget("retain", 0.98), check="agreement")  # type: ignore[arg-type]
    assert all(cal.thresholds[m] <= 0.2 for m in labelled)
    # The labelled models keep to one vote's thresholds; the others keep the whole grid.
    combos = calibrate._agreement_combos(["s", "m", "l"], 5, labelled)
    for m in ("s", "m", "l"):
        values = {c[m] for c in combos}
        if m in labelled:
            assert values <= {0.0, 0.2}
        else:
            assert values == ({0.0, 0.6} if m == "l" else set(threshold_grid(5)))
    err = capsys.readouterr().err
    assert err.count("left out of the sweep") == 1
    assert f"{', '.join(labelled)}: some outcomes are correctness labels" in err and "thresholds above 0.2" in err


def test_labels_narrow_nothing_at_one_vote_and_only_agreement_rungs_under_deferral() -> None:
    from crecli import calibrate

    assert calibrate._agreement_combos(["s", "l"], 1, ("s", "l")) == calibrate._agreement_combos(["s", "l"], 1)
    assert calibrate._deferral_combos(["s", "m", "l"], ("s",), 5, ("s",)) == [
        {"s": s, "m": m, "l": 0.0} for s in (0.0, 0.2) for m in calibrate.DEFERRAL_GRID]


def test_calibration_draws_a_sampled_fit_by_the_clusters_the_fit_gave_its_rows() -> None:
    # `cre calibrate` of a `--sample-per-cluster` fit redraws the fit's sample by its rule,
    # so it needs each row's label as the fit gave it: the assigner's vote outvotes a row
    # HDBSCAN placed among another cluster's, and copies of one template may sit in two
    # clusters. The exemplars, kept in log order, tell them; a noise row keeps its route.
    from types import SimpleNamespace

    from crecli.assign import Assigner
    from crecli.replay import fit_clusters

    angles = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 1.5, 1.51, 1.52, 1.53, 1.54, 1.55, 1.45, 0.8, 0.7, 0.7]
    labels = [0] * 6 + [1] * 6 + [0, -1, 0, 1]
    X = np.array([[np.cos(a), np.sin(a)] for a in angles], dtype=np.float32)
    assigner = Assigner().fit(X, np.array(labels))
    routes = [SimpleNamespace(cluster=int(c)) for c in assigner.predict(X)[0]]
    fitted = [c if c >= 0 else routes[i].cluster for i, c in enumerate(labels)]
    assert [r.cluster for r in routes] != fitted  # the vote alone would not do
    assert fit_clusters(SimpleNamespace(assigner=assigner), X, routes) == fitted


def test_held_out_cost_pays_answered_examples_once_a_log_as_the_reference_does() -> None:
    """Each fold is replayed as a run of its own, sharing its examples over its own answers;
    the reference is one run of the log. Summed as they were, 5 folds paid a key's examples 5
    times where the reference paid them once, and a model shown examples looked dearer held
    out than it is."""
    from dataclasses import replace
    from types import SimpleNamespace

    from crecli import calibrate
    from crecli.quality import QualityCheck
    from support.replays import synthetic_data

    data = synthetic_data(40, {"s": [0.0, 0.0], "l": [0.9, 0.9]})
    for key, entry in list(data.replay.entries.items()):
        if key[1] == "l":  # l is shown one set of examples, 10 to process once
            data.replay.entries[key] = replace(entry, prefix_key="l:x", prefix_cost=10.0)
    router = SimpleNamespace(ladder_names=["s", "l"], quality=QualityCheck(k=1), fallback_model="l")
    cal = calibrate.recalibrate(router, data, Budget("retain", 0.98), check="agreement")
    assert set(cal.choice.models.values()) == {"l"}  # s is never right: every query on l
    assert cal.held_out["mean_cost"] == pytest.approx(cal.reference["mean_cost"])  # was 1 more: 4 x 10 / 40


def test_a_clusters_mean_cost_pays_its_share_of_the_examples_as_the_replay_does() -> None:
    """`cluster_stats` left the examples out of a model's mean cost, which chose cluster
    models (`choose_by_weight`), while the replay's baselines charged their share."""
    from crecli import costs, outcomes
    from crecli.models import bench
    from crecli.querylog import Record
    from crecli.replay import Replay, greedy_cost
    from crecli.shots import resolve_shots

    def made(rid: str, tokens: int) -> outcomes.Outcome:
        return outcomes.Outcome(rid, "sha", "m", "", "k", "run", tokens, [outcomes.Vote("1", 2, 0.1)])

    found = resolve_shots({(r, "m"): made(r, 10) for r in "ab"}, {(r, "m"): made(r, 40) for r in "ab"},
                          {(r, "m"): (("q", "1"),) for r in "ab"})
    model = costs.CostModel("bench-seconds", {}, {}, {"m": bench.Rates(10.0, 1.0)})
    records = [Record(id=r, prompt=f"p{r}", reference=["1"], match="exact") for r in "ab"]
    replay = Replay.build(found, records, ["m"], model)
    table = cluster_stats([0, 0], records, found, ["m"], model)
    # Each answer: 10 prompt tokens at 10/s and 2 output tokens at 1/s, 3; the examples' 30
    # tokens, 3, shared by the two: 1.5 each.
    assert table.clusters[0].models["m"].mean_cost == pytest.approx(4.5)
    assert table.clusters[0].models["m"].mean_cost == pytest.approx(greedy_cost([replay.entries[(r, "m")] for r in "ab"]))


def test_a_settings_label_shows_the_vote_counts_its_thresholds_ask_for() -> None:
    # With --k 3 the label said 0.7 for 2/3: 3 of 3 votes read back, where 2 was written; from
    # k = 11 two settings could print alike.
    from crecli.calibrate import Setting, threshold_text
    from crecli.quality import needed

    for k in (3, 4, 6, 7, 12, 64):
        shown = [float(threshold_text(j / k)) for j in range(k + 1)]
        assert [needed(v, k) for v in shown] == list(range(k + 1))
    assert len({Setting(1.0, (("s", j / 12), ("l", 0.0))).label() for j in range(13)}) == 13
    assert Setting(3.75, (("s", 0.0), ("m", 0.2), ("l", 0.0))).label() == "weight 3.75 | thresholds 0.0/0.2/0.0"
