"""Paired comparisons of two arms scored on the same examples, and one decision rule for a report.

Two arms evaluated on one evaluation set make correlated errors, so their accuracies are compared
example by example: the difference is the mean of per-example differences (−1, 0, +1).

Which unit is resampled depends on how the seeds drew their examples:
- Seeds that evaluate the *same* questions (the whole test split in every seed) give one question
  several correlated outcomes. The question is then the unit: the bootstrap resamples questions with
  their outcomes in every seed together, and the test flips the sign of each question's difference
  summed over the seeds (exact). Pooling such seeds as if independent makes the interval too narrow.
  Seeds that share only some examples are handled the same way, clustered by example id.
- Seeds that draw their own examples are independent samples: the bootstrap resamples within each
  seed, and McNemar's exact test counts the discordant examples (the sign-flip test on clusters of
  one example).

A report's verdicts use one rule (`decide`): Holm's correction over the comparisons it lists, or a
primary comparison declared in advance, uncorrected. The interval is shown, not used as a second test.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

SHARED = "questions"
"""Unit: every example resampled with its outcomes in every seed that scored it."""
WITHIN_SEED = "examples within each seed"
"""Unit: each seed's examples resampled on their own (the seeds drew different examples)."""


@dataclass
class PairedComparison:
    """Accuracy of `a` minus accuracy of `b` on the same examples, in fractions (0.01 = 1 point)."""

    difference: float
    """Mean over all scored examples of every seed (the seed mean when seeds have equal sizes)."""
    low: float
    high: float
    """95 % percentile-bootstrap interval of the difference, resampling `unit`."""
    p: float
    """Two-sided p-value of `test` (uncorrected)."""
    test: str
    unit: str
    a_only: int
    """Scored examples (over all seeds) `a` got right and `b` wrong."""
    b_only: int
    examples: int
    """Scored examples over all seeds."""
    questions: int
    """Distinct resampled units: questions when seeds share them, else equal to `examples`."""
    seeds: int
    per_seed: list[float]
    """The difference within each seed's evaluation set."""
    seed_std: float | None
    """Standard deviation of the per-seed differences (None with one seed)."""
    resamples: int
    bootstrap_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def outcomes(correct: str | Sequence[int | bool], where: str = "outcomes") -> np.ndarray:
    """'0110…' strings (as in metrics.jsonl) or 0/1 sequences → int8 array; anything else is refused
    with the first offending position (a stray space would otherwise count as −16)."""
    if isinstance(correct, str):
        bad = next((i for i, ch in enumerate(correct) if ch not in "01"), None)
        if bad is not None:
            raise ValueError(f"{where}: position {bad} holds {correct[bad]!r}; expected a string of 0s and 1s")
        return np.frombuffer(correct.encode(), dtype=np.uint8).astype(np.int8) - ord("0")
    values = list(correct)
    bad = next((i for i, v in enumerate(values) if v not in (0, 1) or isinstance(v, float)), None)
    if bad is not None:
        raise ValueError(f"{where}: position {bad} holds {values[bad]!r}; expected 0 or 1")
    return np.asarray(values, dtype=np.int8)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs against Binomial(n, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def sign_flip_exact(sums: Sequence[int]) -> float:
    """Two-sided exact p-value of the total of integer per-question differences when each
    question's sign is flipped at random (the arms exchangeable under the null): P(|T| ≥ |t|).

    Questions with the same |difference| v contribute v·(2·Binomial(k, 1/2) − k); the null
    distribution is the convolution of those, computed term by term so that small tails stay exact.
    """
    sums = np.asarray(sums, dtype=np.int64)
    observed = abs(int(sums.sum()))
    values, counts = np.unique(np.abs(sums[sums != 0]), return_counts=True)
    pmf, offset = np.ones(1), 0
    for v, k in zip(values.tolist(), counts.tolist()):
        step = np.zeros(2 * v * k + 1)
        step[:: 2 * v] = [math.comb(k, j) / 2**k for j in range(k + 1)]
        pmf, offset = np.convolve(pmf, step), offset + v * k
    support = np.abs(np.arange(len(pmf)) - offset)
    return float(min(1.0, pmf[support >= observed].sum()))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _per_seed_differences(a: Sequence, b: Sequence) -> list[np.ndarray]:
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of seeds for both arms (got {len(a)} and {len(b)})")
    diffs = []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = outcomes(x, f"arm a, seed {i}"), outcomes(y, f"arm b, seed {i}")
        if x.shape != y.shape or not x.size:
            raise ValueError(
                f"seed {i}: the arms scored {x.size} and {y.size} examples; a paired comparison "
                "needs the same evaluation examples"
            )
        diffs.append(x.astype(np.int16) - y)
    return diffs


def _within_seed_bootstrap(diffs: list[np.ndarray], rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Resampling examples within a seed only changes its counts of −1, 0 and +1: draw those counts."""
    boot = np.zeros(resamples)
    for d in diffs:
        counts = np.array([(d == v).sum() for v in (-1, 0, 1)])
        draws = rng.multinomial(d.size, counts / d.size, size=resamples)
        boot += draws[:, 2] - draws[:, 0]
    return boot / sum(d.size for d in diffs)


def _clusters(diffs: list[np.ndarray], ids: Sequence[Sequence[Hashable]]) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct example id: its difference summed over the seeds that scored it, and how many did."""
    if len(ids) != len(diffs) or any(len(i) != d.size for i, d in zip(ids, diffs)):
        raise ValueError("example ids: one id per scored example of every seed is needed")
    sums: dict[Hashable, list[int]] = {}
    for seed_ids, d in zip(ids, diffs):
        for key, value in zip(seed_ids, d.tolist()):
            sums.setdefault(key, [0, 0])
            sums[key][0] += value
            sums[key][1] += 1
    table = np.array(list(sums.values()), dtype=np.int64)
    return table[:, 0], table[:, 1]


def _cluster_bootstrap(sums: np.ndarray, sizes: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Resample questions with replacement, each with all its outcomes; the difference of a draw is its
    summed differences over its scored examples. Only the counts of each distinct (sum, size) matter."""
    kinds, inverse = np.unique(np.stack([sums, sizes], axis=1), axis=0, return_inverse=True)
    counts = np.bincount(inverse.ravel(), minlength=len(kinds))
    draws = rng.multinomial(len(sums), counts / len(sums), size=resamples)
    return (draws @ kinds[:, 0]) / (draws @ kinds[:, 1])


def paired_comparison(
    a: Sequence[str | Sequence[int]],
    b: Sequence[str | Sequence[int]],
    example_ids: Sequence[Sequence[Hashable]] | None = None,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedComparison:
    """Compare arms `a` and `b` given, per seed, which evaluation examples each got right.

    `a[i]` and `b[i]` must score the same examples in the same order (seed i's evaluation set).
    `example_ids[i]` names seed i's examples: where an id recurs across seeds, the question is the
    unit (see the module docstring). None: each seed drew its own examples.
    """
    diffs = _per_seed_differences(a, b)
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(diffs)
    a_only, b_only = int((pooled == 1).sum()), int((pooled == -1).sum())
    sums, sizes = _clusters(diffs, example_ids) if example_ids is not None else (pooled, np.ones_like(pooled))
    if sizes.max() > 1:
        boot, p = _cluster_bootstrap(sums, sizes, rng, resamples), sign_flip_exact(sums)
        unit, test = SHARED, "sign-flip (exact) on per-question differences summed over seeds"
    else:
        boot, p = _within_seed_bootstrap(diffs, rng, resamples), mcnemar_exact(a_only, b_only)
        unit, test = WITHIN_SEED, "McNemar (exact)"
    per_seed = [float(d.mean()) for d in diffs]
    return PairedComparison(
        difference=float(pooled.mean()),
        low=float(np.percentile(boot, 2.5)),
        high=float(np.percentile(boot, 97.5)),
        p=p,
        test=test,
        unit=unit,
        a_only=a_only,
        b_only=b_only,
        examples=int(pooled.size),
        questions=int(sums.size),
        seeds=len(diffs),
        per_seed=per_seed,
        seed_std=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
        resamples=resamples,
        bootstrap_seed=seed,
    )


def decide(comparisons: Sequence[dict], primary: tuple[str, str] | None = None) -> None:
    """One decision rule for a report's comparisons, written into each dict: `p_adjusted` (Holm over
    the family, or the primary comparison's own p), `rule`, and `verdict` ("<arm> better" when the
    adjusted p is below ALPHA, else "no resolved difference").

    The family is every listed comparison but a declared primary one; dicts with the same `key`
    are one hypothesis listed twice (e.g. a last stage's gain that is also an arm-vs-arm row).
    """
    family = {tuple(c["key"]): c["p"] for c in comparisons if tuple(c["key"]) != primary}
    adjusted = dict(zip(family, holm(list(family.values()))))
    for c in comparisons:
        if tuple(c["key"]) == primary:
            c["p_adjusted"], c["rule"] = c["p"], "primary comparison, declared in the config: uncorrected"
        else:
            c["p_adjusted"], c["rule"] = adjusted[tuple(c["key"])], f"Holm over {len(family)} comparisons"
        winner = c["a"] if c["difference"] > 0 else c["b"]
        c["verdict"] = f"{winner} better" if c["p_adjusted"] < ALPHA else "no resolved difference"
