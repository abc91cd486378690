"""Bootstrap intervals on known cases: the interval holds the truth at about the stated rate, and shrinks with n."""

from __future__ import annotations

import numpy as np
import pytest

from medlsdm.evaluation.stats import bootstrap_mean, bootstrap_ratio, paired_gain, ratio_with_interval, with_interval


def test_bootstrap_mean_covers_the_true_mean_at_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        x = rng.normal(0.8, 0.1, size=20)
        ci = bootstrap_mean(x, n=500, seed=trial)
        assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == 20
        hits += ci["lo"] <= 0.8 <= ci["hi"]
    assert 0.88 <= hits / 200 <= 0.99  # percentile bootstrap on n = 20 undercovers slightly
    # the half-width follows 1.96 sigma / sqrt(n)
    ci = bootstrap_mean(rng.normal(0.8, 0.1, size=400))
    assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(1.96 * 0.1 / 20, rel=0.2)


def test_missing_values_single_values_and_ratios() -> None:
    assert bootstrap_mean([None, float("nan")]) == dict(mean=None, lo=None, hi=None, n=0)
    assert bootstrap_mean([0.5, None]) == dict(mean=0.5, lo=0.5, hi=0.5, n=1)
    r = bootstrap_ratio([0.4, 0.5, 0.6] * 5, [0.8, 1.0, 1.2] * 5)
    assert r["ratio"] == pytest.approx(0.5) and r["lo"] < 0.5 < r["hi"]
    assert bootstrap_ratio([0.5], [0.0])["ratio"] is None


def test_paired_gain_sees_a_small_consistent_gain_that_unpaired_spread_would_hide() -> None:
    base = np.array([0.60, 0.70, 0.65, 0.72, 0.58])  # seed-to-seed spread 0.06
    gain = paired_gain(base + 0.02 + np.array([0.002, -0.001, 0.001, -0.002, 0.0]), base)
    assert gain["mean"] == pytest.approx(0.02) and gain["lo"] > 0.015
    with pytest.raises(ValueError):
        paired_gain([1.0], [1.0, 2.0])


def test_class_mean_interval_is_around_the_same_statistic() -> None:
    """The mean over classes of per-class means (absent classes skipped) and an interval that contains it."""
    from medlsdm.evaluation.stats import bootstrap_class_mean

    rows = [[0.9, None], [0.8, 0.2], [0.95, None], [0.85, 0.4]]
    r = bootstrap_class_mean(rows)
    assert r["mean"] == pytest.approx((0.875 + 0.3) / 2) and r["lo"] <= r["mean"] <= r["hi"] and r["n"] == 4
    assert bootstrap_class_mean([[None, None]])["mean"] is None


def test_interval_formatting_is_the_one_every_report_uses():
    assert with_interval(0.91234, [0.8812, 0.9449]) == "0.912 [0.88, 0.94]"
    assert with_interval(0.5, None) == "0.500" and with_interval(0.5, [None, None]) == "0.500"
    assert with_interval(None, [0.1, 0.2]) == "-" and with_interval(None, missing="n/a") == "n/a"
    assert ratio_with_interval({"ratio": 0.9, "lo": 0.84, "hi": 0.961}) == "0.90 [0.84, 0.96]"
    assert ratio_with_interval({"ratio": None, "lo": None, "hi": None}) == "-" and ratio_with_interval(None) == "-"
