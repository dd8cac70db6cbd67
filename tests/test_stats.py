"""Paired comparisons: McNemar's exact test and the bootstrap interval, against direct computations."""

import math

import numpy as np
import pytest

from heft.stats import mcnemar_exact, paired_comparison


def test_mcnemar_exact_by_hand():
    # 10 vs 2 discordant pairs: p = 2 * P(Binomial(12, 1/2) <= 2)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def test_identical_arms_differ_by_nothing():
    c = "0110101110" * 20
    result = paired_comparison([c], [c])
    assert (result.difference, result.low, result.high, result.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)


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
