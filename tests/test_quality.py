from __future__ import annotations

import itertools

import pytest

from crecli.quality import QualityCheck, blend_prior, decide, done, first_vote_decides, needed, threshold_grid, trust


@pytest.mark.parametrize(
    "votes, threshold, early, answer, used, accept, agreement",
    [
        (["7", "7", "7", "9", "9"], 0.6, True, "7", 3, True, 1.0),  # 3 of 5 reached after 3 votes
        (["7", "7", "7", "9", "9"], 0.6, False, "7", 5, True, 0.6),
        (["7", "9", "8", "7", "9"], 0.6, True, "7", 5, False, 0.4),  # 3 stays reachable until the end
        (["7", "9", "8", "6", "5"], 0.6, True, "7", 4, False, 0.25),  # after 4 votes, 1 + 1 < 3: escalate
        (["7"], 0.0, True, "7", 1, True, 1.0),  # threshold 0: greedy only
        (["9", "7", "7", "9", "8"], 1.0, True, "9", 2, False, 0.5),  # unanimity broken at vote 2
        (["9", "7", "9", "7", "8"], 0.2, False, "9", 5, True, 0.4),  # tie 2-2: greedy's answer wins
        (["", "", "", "", ""], 0.6, False, "", 5, False, 1.0),  # five empty answers agree on nothing
        (["", "B", "B", "", "B"], 0.6, False, "B", 5, True, 0.6),
        (["", "B", "", "B", ""], 0.2, False, "B", 5, True, 0.4),  # empty answers never win
        (["", "", "", "", ""], 0.0, True, "", 1, False, 1.0),
        (["", "B", "", "B", ""], 0.2, True, "B", 2, True, 0.5),
    ],
)
def test_decide(votes: list[str], threshold: float, early: bool, answer: str, used: int, accept: bool, agreement: float) -> None:
    d = decide(votes, 5, threshold, early)
    assert (d.answer, d.used, d.accept) == (answer, used, accept)
    assert d.agreement == pytest.approx(agreement)
    assert votes[d.index] == d.answer


def test_empty_greedy_answer_escalates_even_at_threshold_zero() -> None:
    d = decide(["", "7"], 5, 0.0)
    assert d.used == 1 and not d.accept


def test_done_matches_decide() -> None:
    votes = ["7", "9", "8", "7", "9"]
    for n in range(1, 6):
        assert done(votes[:n], 5, 0.6) == (n >= decide(votes, 5, 0.6).used)
    assert not done(["7", "7"], 5, 0.6, early_stop=False)


def test_the_first_vote_decides_only_where_no_later_vote_can_change_the_answer() -> None:
    # What `ladder.streams_final` streams on: a threshold one vote meets (0.2 of 5) is not
    # enough, as an empty greedy answer is outvoted there; nor is threshold 0 without early
    # stopping, where all k votes are drawn and the majority wins.
    assert first_vote_decides(5, 0.0) and first_vote_decides(1, 0.6) and first_vote_decides(1, 0.6, early_stop=False)
    assert not first_vote_decides(5, 0.2) and not first_vote_decides(5, 0.6)
    assert not first_vote_decides(5, 0.0, early_stop=False)
    assert decide(["", "7"], 5, 0.2).answer == "7" and decide(["8", "7", "7"], 3, 0.0, early_stop=False).answer == "7"
    # Where it says so, `decide` answers with the first vote after it alone, whatever the votes.
    for k in range(1, 5):
        for threshold, early in itertools.product([*threshold_grid(k), 0.5 / k], (True, False)):
            if first_vote_decides(k, threshold, early):
                for votes in itertools.product(("", "a", "b"), repeat=k):
                    d = decide(votes, k, threshold, early)
                    assert (d.used, d.index) == (1, 0), (k, threshold, early, votes)


def test_needed_is_robust_to_float_error() -> None:
    assert needed(0.6, 5) == 3 and needed(0.61, 5) == 4 and needed(0.0, 5) == 0 and needed(1.0, 5) == 5


def test_settings_key_changes_with_what_changes_a_vote() -> None:
    base = QualityCheck()
    assert base.key() == QualityCheck().key()
    assert base.key() != QualityCheck(temperature=0.5).key()
    assert base.key() != QualityCheck(k=3).key()
    assert base.key() == QualityCheck(early_stop=False).key()  # early stop only reads fewer votes


def test_trust_in_a_cluster_falls_from_its_radius_to_the_far_threshold() -> None:
    assert trust(0.1, 0.2, 0.8) == 1.0
    assert trust(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert trust(0.8, 0.2, 0.8) == 0.0 and trust(1.5, 0.2, 0.8) == 0.0
    assert trust(0.5, 0.9, 0.8) == 1.0  # inside a radius wider than the threshold
    # Unknown distance or radius (a router written before radii were kept): trusted, as before.
    assert trust(None, 0.2, 0.8) == 1.0 and trust(0.7, None, 0.8) == 1.0
    assert blend_prior(0.9, 0.3, 1.0) == 0.9 and blend_prior(0.9, 0.3, 0.0) == 0.3
    assert blend_prior(0.9, 0.3, 0.5) == pytest.approx(0.6)


@pytest.mark.parametrize("k,threshold", [(5, 0.6), (5, 1.0), (5, 0.4), (3, 0.67), (7, 0.6), (5, 0.0)])
def test_a_wave_draws_only_votes_that_one_at_a_time_would_draw(k: int, threshold: float) -> None:
    """Over every sequence of answers: drawing in waves stops at the same vote as drawing lazily."""
    import itertools

    from crecli.quality import wave

    for answers in itertools.product(["a", "b", ""], repeat=k):
        lazy = 1
        while not done(list(answers[:lazy]), k, threshold):
            lazy += 1
        drawn = 1
        while (w := wave(list(answers[:drawn]), k, threshold)) > 0:
            assert drawn + w <= lazy, (answers, drawn, w)  # never past where lazy drawing stops
            drawn += w
        assert drawn == lazy, answers
