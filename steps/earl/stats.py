"""Confidence intervals for the tables: 95 % percentile bootstrap (scipy), for one mean and for a paired difference.

The paper reports bare means; a reader comparing two rows needs to know whether the gap is larger than the noise
of a few hundred sampled edits. A paired difference (same rows, same sample index) cancels the row difficulty,
which is most of the variance, so it resolves much smaller gaps than two separate intervals do.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95


def mean_ci(values, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high", "n"}`` of the values; the interval is NaN for fewer than two values."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    if len(array) < 2 or np.all(array == array[0]):  # no spread: the bootstrap interval is the point itself
        low = high = float(array.mean()) if len(array) > 1 else math.nan
    else:
        result = stats.bootstrap((array,), np.mean, confidence_level=LEVEL, n_resamples=resamples,
                                 method="percentile", rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return {"mean": float(array.mean()), "ci_low": low, "ci_high": high, "n": int(len(array))}


def paired_difference(after, before, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``after - before`` over paired observations, with its bootstrap interval."""
    after, before = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"paired difference needs equal lengths, got {after.shape} and {before.shape}")
    return mean_ci(after - before, resamples, seed)
