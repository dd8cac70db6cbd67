"""Paired comparisons: McNemar's exact test, the sign-flip test and the bootstrap interval over the
right unit, against direct computations; Holm's correction and the decision rule; input checks."""

import itertools
import math

import numpy as np
import pytest

from heft.stats import SHARED, WITHIN_SEED, decide, holm, mcnemar_exact, paired_comparison, sign_flip_exact


def test_mcnemar_exact_by_hand():
    # 10 vs 2 discordant pairs: p = 2 * P(Binomial(12, 1/2) <= 2)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def test_identical_arms_differ_by_nothing():
    c = "0110101110" * 20
    result = paired_comparison([c], [c])
    assert (result.difference, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)
    assert (result.unit, result.resamples, result.bootstrap_seed) == (WITHIN_SEED, 10_000, 0)


def test_difference_counts_and_interval_match_a_direct_bootstrap():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.7).astype(int)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)  # correlated with a, as two arms on one set are
    result = paired_comparison(["".join(map(str, a))], [b.tolist()], resamples=20_000)
    assert result.difference == pytest.approx(a.mean() - b.mean())
    assert (result.a_only, result.b_only) == (int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
    index = rng.integers(0, 400, size=(20_000, 400))  # resampling examples directly
    direct = (a[index] - b[index]).mean(axis=1)
    assert result.low == pytest.approx(np.percentile(direct, 2.5), abs=0.006)
    assert result.high == pytest.approx(np.percentile(direct, 97.5), abs=0.006)
    assert result.low < result.difference < result.high


def test_seeds_are_pooled_and_resampled_within_each_seed():
    s1a, s1b = "1" * 60 + "0" * 40, "1" * 50 + "0" * 50  # +10 points on seed 1
    s2a, s2b = "1" * 30 + "0" * 20, "1" * 30 + "0" * 20  # 0 points on seed 2 (half the examples)
    result = paired_comparison([s1a, s2a], [s1b, s2b])
    assert result.per_seed == pytest.approx([0.10, 0.0])
    assert result.difference == pytest.approx(10 / 150)
    assert result.seed_std == pytest.approx(math.sqrt(0.005))
    assert (result.examples, result.seeds, result.a_only, result.b_only) == (150, 2, 10, 0)

    # a always right on seed 1, b always right on seed 2: resampled within each seed, every draw keeps
    # the +50 and -50; drawn from the pool of 100, the interval would be about ±20 points wide
    opposite = paired_comparison(["1" * 50, "0" * 50], ["0" * 50, "1" * 50])
    assert opposite.difference == opposite.low == opposite.high == 0


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same evaluation examples"):
        paired_comparison(["0101"], ["010"])
    with pytest.raises(ValueError, match="number of seeds"):
        paired_comparison(["0101"], ["0101", "1111"])


def test_outcomes_must_be_zeros_and_ones():
    # a stray space counted as 0x20 - 0x30 = -16 before: '01 1' against '0101' gave a difference of -4.0
    with pytest.raises(ValueError, match=r"arm a, seed 0: position 2 holds ' '; expected a string of 0s and 1s"):
        paired_comparison(["01 1"], ["0101"])
    with pytest.raises(ValueError, match="arm b, seed 1: position 1 holds 2; expected 0 or 1"):
        paired_comparison(["01", "01"], ["01", [0, 2]])
    with pytest.raises(ValueError, match="position 0 holds 0.5"):
        paired_comparison([[0.5, 1]], ["01"])
    assert paired_comparison([[True, False]], ["01"]).difference == 0.0


def test_sign_flip_is_exact_against_enumeration_and_is_mcnemar_for_single_examples():
    sums = [2, 1, 1, -1, 0, 2, -2, 1, 1, 2, -1, 1]
    t = abs(sum(sums))
    flips = [sum(e * s for e, s in zip(signs, sums)) for signs in itertools.product((1, -1), repeat=len(sums))]
    assert sign_flip_exact(sums) == pytest.approx(sum(abs(x) >= t for x in flips) / len(flips), rel=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(100):  # each question scored once: the sign-flip test is McNemar's
        d = rng.integers(-1, 2, size=rng.integers(1, 60))
        assert sign_flip_exact(d) == pytest.approx(mcnemar_exact(int((d == 1).sum()), int((d == -1).sum())), rel=1e-12)
    assert sign_flip_exact([0, 0]) == 1.0


def shared_questions(rng, n: int = 300) -> tuple[list[str], list[str]]:
    """Two seeds scoring the same n questions: which arm wins a question mostly repeats across seeds."""
    a1 = rng.random(n) < 0.6
    b1 = np.where(rng.random(n) < 0.7, a1, ~a1)
    a2 = np.where(rng.random(n) < 0.9, a1, ~a1)  # seed 2 repeats seed 1's outcomes on most questions
    b2 = np.where(rng.random(n) < 0.9, b1, ~b1)
    to = lambda x: "".join("1" if v else "0" for v in x)  # noqa: E731
    return [to(a1), to(a2)], [to(b1), to(b2)]


def test_seeds_sharing_questions_resample_questions_with_all_their_outcomes():
    rng = np.random.default_rng(5)
    a, b = shared_questions(rng)
    n = len(a[0])
    shared = paired_comparison(a, b, example_ids=[range(n), range(n)], resamples=20_000)
    pooled = paired_comparison(a, b, resamples=20_000)  # as if each seed had its own questions
    assert shared.unit == SHARED and pooled.unit == WITHIN_SEED
    assert (shared.difference, shared.a_only, shared.b_only) == (pooled.difference, pooled.a_only, pooled.b_only)
    assert (shared.examples, shared.questions, shared.seeds) == (2 * n, n, 2)
    assert shared.high - shared.low > 1.2 * (pooled.high - pooled.low), "correlated seeds: a wider interval"
    assert shared.p > pooled.p

    # against a direct bootstrap of questions, each carrying its difference in both seeds
    d = sum(np.frombuffer(x.encode(), np.uint8).astype(int) - np.frombuffer(y.encode(), np.uint8) for x, y in zip(a, b))
    index = rng.integers(0, n, size=(20_000, n))
    direct = d[index].sum(axis=1) / (2 * n)
    assert shared.low == pytest.approx(np.percentile(direct, 2.5), abs=0.005)
    assert shared.high == pytest.approx(np.percentile(direct, 97.5), abs=0.005)
    assert shared.p == pytest.approx(sign_flip_exact(d))


def test_ids_decide_the_unit_and_partial_overlap_clusters_by_question():
    a, b = ["1100", "1010"], ["1000", "0110"]
    disjoint = paired_comparison(a, b, example_ids=[["q1", "q2", "q3", "q4"], ["q5", "q6", "q7", "q8"]])
    assert disjoint.unit == WITHIN_SEED and disjoint.p == mcnemar_exact(2, 1)
    partial = paired_comparison(a, b, example_ids=[["q1", "q2", "q3", "q4"], ["q1", "q6", "q7", "q8"]])
    assert partial.unit == SHARED and partial.questions == 7 and partial.examples == 8
    # q1's differences (0 and +1) sum to +1; q2 +1, q6 -1: the totals over questions and examples agree
    assert partial.difference == pytest.approx(1 / 8) and partial.p == sign_flip_exact([1, 1, -1])
    with pytest.raises(ValueError, match="one id per scored example"):
        paired_comparison(a, b, example_ids=[["q1"], ["q2"]])


def test_holm_on_a_known_table():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # 0.9 alone, but never below a smaller p's adjustment
    assert holm([]) == []


def test_one_decision_rule_with_holm_or_a_declared_primary_comparison():
    def row(a, b, p, difference=0.02):
        return {"a": a, "b": b, "key": [a, b], "p": p, "difference": difference}

    rows = [row("x", "base", 0.0048), row("y", "base", 0.0117), row("z", "base", 0.2, -0.01), row("x", "base", 0.0048)]
    decide(rows)  # the last row repeats the first hypothesis (same key): a family of three
    assert [r["p_adjusted"] for r in rows] == pytest.approx([0.0144, 0.0234, 0.2, 0.0144])
    assert [r["verdict"] for r in rows] == ["x better", "y better", "no resolved difference", "x better"]
    assert rows[0]["rule"] == "Holm over 3 comparisons"
    rows = [row("x", "base", 0.03), row("y", "base", 0.03), row("z", "base", 0.01, -0.01)]
    decide(rows, primary=("x", "base"))
    assert rows[0]["p_adjusted"] == 0.03 and rows[0]["verdict"] == "x better" and "primary" in rows[0]["rule"]
    assert rows[1]["p_adjusted"] == pytest.approx(0.03) and rows[2]["verdict"] == "base better"
