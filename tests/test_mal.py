"""MAL accounting: hand-counted cases for the pooled, per-request, per-position and per-category figures."""

import pytest

from sd2.mal import MalStats, Round, teacher_forced_rounds


def test_all_matching_gives_gamma_plus_one():
    rounds = teacher_forced_rounds([True] * 20, gamma=4)  # 20 = 4 rounds of 5
    assert rounds == [Round(4, 4, 5)] * 4
    s = MalStats()
    s.add_request(rounds)
    assert s.summary(4)["mal"] == 5.0 and s.summary(4)["acceptance_per_position"] == [1.0] * 4


def test_hand_counted_disagreement():
    # response of 8 tokens; drafter right on t=0,1, wrong on t=2, right on 3,4,5,6, wrong on 7
    match = [True, True, False, True, True, True, True, False]
    rounds = teacher_forced_rounds(match, gamma=3)
    # round 1 at j=0: accepts t0,t1, rejects t2 -> commits 3 (t0,t1 + correction t2)
    # round 2 at j=3: accepts t3,t4,t5 (gamma) -> commits 4 (+ bonus t6)
    # round 3 at j=7: drafts 1 (1 left), rejected -> commits 1
    assert rounds == [Round(3, 2, 3), Round(3, 3, 4), Round(1, 0, 1)]
    s = MalStats()
    s.add_request(rounds, "math")
    out = s.summary(3)
    assert out["mal"] == pytest.approx(8 / 3)
    assert out["acceptance_rate"] == pytest.approx(5 / 7)
    # position 1: accepted in rounds 1,2 of 3; position 2: rounds 1,2 of the 2 that drafted 2; position 3: round 2 of 2
    assert out["acceptance_per_position"] == pytest.approx([2 / 3, 1.0, 0.5])
    assert out["tokens"] == 8 and out["target_forwards"] == 3


def test_pooled_vs_per_request_and_categories():
    s = MalStats()
    s.add_request([Round(4, 4, 5)], "a")                       # MAL 5
    s.add_request([Round(4, 0, 1), Round(4, 0, 1)], "b")       # MAL 1
    out = s.summary(4)
    assert out["mal"] == pytest.approx(7 / 3)                  # pooled
    assert out["mal_per_request"] == pytest.approx(3.0)        # mean of 5 and 1
    assert out["mal_per_category"] == {"a": 5.0, "b": 1.0}


def test_gamma_must_be_positive():
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        teacher_forced_rounds([True], 0)


def test_budget_gives_the_engines_draft_lengths():
    """With the request's max_new_tokens, rounds draft what the engine asks for: at most
    budget - done - 1 (so a full-length answer's last round drafts nothing), and a draft that
    matches an EOS-ended answer to its end stops at the EOS."""
    full = [True] * 5                       # an answer cut at max_new_tokens = 5
    assert teacher_forced_rounds(full, 3, budget=5) == [Round(3, 3, 4), Round(0, 0, 1)]
    assert teacher_forced_rounds(full, 3) == [Round(3, 3, 4), Round(1, 1, 1)]
    # an answer ended by EOS after 4 tokens, under a budget of 10
    assert teacher_forced_rounds([True, True, False, True], 3, budget=10) == [Round(3, 2, 3), Round(1, 1, 1)]
    assert teacher_forced_rounds([True, False], 3, budget=10) == [Round(3, 1, 2)]
    # MAL (tokens per round) does not depend on the budget
    for match in ([True, False, True, True, False, True], [False] * 4, [True] * 7):
        for g in (1, 2, 4):
            a, b = teacher_forced_rounds(match, g), teacher_forced_rounds(match, g, budget=len(match))
            assert [r.committed for r in a] == [r.committed for r in b]
