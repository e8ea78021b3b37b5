"""Bootstrap intervals: they cover a known mean at about the stated rate, and a paired difference resolves a
shift that two separate intervals cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from earl.stats import mean_ci, paired_difference


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 300
    covered = 0
    for t in range(trials):
        draw = rng.normal(5.0, 2.0, 100)
        ci = mean_ci(draw, resamples=1000, seed=t)
        covered += ci["ci_low"] <= 5.0 <= ci["ci_high"]
        assert ci["mean"] == pytest.approx(draw.mean())
    # binomial(300, 0.95) lies in [272, 296] with probability > 99.9 %; the percentile bootstrap runs slightly narrow
    assert 272 <= covered <= 296, covered


def test_interval_width_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(1)
    width = {n: (lambda ci: ci["ci_high"] - ci["ci_low"])(mean_ci(rng.normal(0, 1, n))) for n in (100, 1600)}
    assert width[100] / width[1600] == pytest.approx(4.0, rel=0.2)
    assert width[100] == pytest.approx(2 * 1.96 / 10, rel=0.15)  # 2 z sigma / sqrt(n)


def test_paired_difference_sees_a_small_shift_hidden_in_row_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0, 10, 200)
    before, after = difficulty + rng.normal(0, 0.2, 200), difficulty + 0.3 + rng.normal(0, 0.2, 200)
    paired = paired_difference(after, before)
    assert paired["ci_low"] > 0.2 and paired["ci_high"] < 0.4
    separate = mean_ci(after), mean_ci(before)
    assert separate[0]["ci_low"] < separate[1]["ci_high"]  # unpaired intervals overlap
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_degenerate_inputs():
    assert math.isnan(mean_ci([])["mean"]) and mean_ci([])["n"] == 0
    one = mean_ci([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["ci_low"])
    assert mean_ci([2.0, 2.0, 2.0]) == {"mean": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 3}
