"""Paired comparisons of two arms scored on the same examples.

Two arms evaluated on one evaluation set make correlated errors, so their accuracies must be
compared example by example: the difference is the mean of per-example differences (−1, 0, +1),
its interval a bootstrap over examples, and its test McNemar's exact test on the discordant pairs.
With several seeds (each with its own evaluation subsample) the examples are pooled and the
bootstrap resamples within each seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PairedComparison:
    """Accuracy of `a` minus accuracy of `b` on the same examples, in fractions (0.01 = 1 point)."""

    difference: float
    low: float
    high: float
    """95 % percentile-bootstrap interval of the difference."""
    a_only: int
    """Examples `a` got right and `b` wrong."""
    b_only: int
    mcnemar_p: float
    """Two-sided exact McNemar test on the discordant pairs."""
    examples: int
    seeds: int
    per_seed: list[float]
    """The difference within each seed's evaluation set."""
    seed_std: float | None
    """Standard deviation of the per-seed differences (None with one seed)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _as_array(correct: str | Sequence[int | bool]) -> np.ndarray:
    """'0110…' strings (as in metrics.jsonl) or 0/1 sequences → int8 array."""
    if isinstance(correct, str):
        return np.frombuffer(correct.encode(), dtype=np.uint8).astype(np.int8) - ord("0")
    return np.asarray(correct, dtype=np.int8)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs against Binomial(n, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(
    a: Sequence[str | Sequence[int]], b: Sequence[str | Sequence[int]], resamples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Compare arms `a` and `b` given, per seed, which evaluation examples each got right.

    `a[i]` and `b[i]` must score the same examples in the same order (seed i's evaluation set).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of seeds for both arms (got {len(a)} and {len(b)})")
    diffs = []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = _as_array(x), _as_array(y)
        if x.shape != y.shape or not x.size:
            raise ValueError(
                f"seed {i}: the arms scored {x.size} and {y.size} examples; a paired comparison "
                "needs the same evaluation examples"
            )
        diffs.append(x.astype(np.int16) - y)
    rng = np.random.default_rng(seed)
    total = sum(d.size for d in diffs)
    # Resampling examples within a seed only changes the counts of -1, 0 and +1: draw those counts.
    boot = np.zeros(resamples)
    for d in diffs:
        counts = np.array([(d == v).sum() for v in (-1, 0, 1)])
        draws = rng.multinomial(d.size, counts / d.size, size=resamples)
        boot += draws[:, 2] - draws[:, 0]
    boot /= total
    pooled = np.concatenate(diffs)
    per_seed = [float(d.mean()) for d in diffs]
    a_only, b_only = int((pooled == 1).sum()), int((pooled == -1).sum())
    return PairedComparison(
        difference=float(pooled.mean()),
        low=float(np.percentile(boot, 2.5)),
        high=float(np.percentile(boot, 97.5)),
        a_only=a_only,
        b_only=b_only,
        mcnemar_p=mcnemar_exact(a_only, b_only),
        examples=total,
        seeds=len(diffs),
        per_seed=per_seed,
        seed_std=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
    )
