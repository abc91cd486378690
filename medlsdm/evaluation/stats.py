"""Uncertainty of per-volume figures: percentile bootstrap intervals over volumes.

Written here rather than taken from a library: MONAI has none, and scipy (``scipy.stats.bootstrap``) would be a
dependency for twenty lines. Every Dice figure and every synthetic/real ratio is reported with one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_mean", "bootstrap_ratio", "bootstrap_class_mean", "paired_gain", "with_interval",
           "ratio_with_interval"]

N_RESAMPLES = 2000


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def bootstrap_mean(values: Sequence[float | None], level: float = 0.95, n: int = N_RESAMPLES,
                   seed: int = 0) -> dict:
    """Mean of ``values`` (None / NaN left out) with a percentile bootstrap interval over the values:
    ``dict(mean, lo, hi, n)``; lo = hi = mean for one value, all None for none."""
    x = _clean(values)
    if x.size == 0:
        return dict(mean=None, lo=None, hi=None, n=0)
    if x.size == 1:
        return dict(mean=float(x[0]), lo=float(x[0]), hi=float(x[0]), n=1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return dict(mean=float(x.mean()), lo=float(np.percentile(means, tail)), hi=float(np.percentile(means, 100 - tail)),
                n=int(x.size))


def bootstrap_ratio(num: Sequence[float | None], den: Sequence[float | None], level: float = 0.95,
                    n: int = N_RESAMPLES, seed: int = 0) -> dict:
    """mean(num) / mean(den) with a percentile bootstrap interval; the two sets are resampled independently
    (e.g. Dice on synthetic volumes over Dice on real test volumes): ``dict(ratio, lo, hi)``."""
    a, b = _clean(num), _clean(den)
    if a.size == 0 or b.size == 0 or b.mean() == 0:
        return dict(ratio=None, lo=None, hi=None)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, size=(n, a.size))].mean(axis=1)
    rb = b[rng.integers(0, b.size, size=(n, b.size))].mean(axis=1)
    ratios = ra / np.where(rb == 0, np.nan, rb)
    tail = 100 * (1 - level) / 2
    return dict(ratio=float(a.mean() / b.mean()), lo=float(np.nanpercentile(ratios, tail)),
                hi=float(np.nanpercentile(ratios, 100 - tail)))


def paired_gain(with_: Sequence[float], without: Sequence[float], level: float = 0.95, n: int = N_RESAMPLES,
                seed: int = 0) -> dict:
    """Mean of the paired differences ``with_[i] - without[i]`` (same seed, same split) with a bootstrap interval
    over the pairs: ``dict(mean, lo, hi, n)``."""
    if len(with_) != len(without):
        raise ValueError(f"paired_gain: {len(with_)} vs {len(without)} values")
    return bootstrap_mean([a - b for a, b in zip(with_, without)], level, n, seed)


def bootstrap_class_mean(rows: Sequence[Sequence[float | None]], level: float = 0.95, n: int = N_RESAMPLES,
                         seed: int = 0) -> dict:
    """The mean over classes of each class's mean over volumes (a volume without a class does not count for it),
    with a bootstrap interval resampling whole volumes (``rows``: one row per volume, one column per class,
    None / NaN where absent): ``dict(mean, lo, hi, n)``."""
    x = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    if x.size == 0 or np.isnan(x).all():
        return dict(mean=None, lo=None, hi=None, n=0)

    def stat(m: np.ndarray) -> float:
        present = ~np.isnan(m).all(axis=0)
        return float(np.mean([np.nanmean(m[:, c]) for c in np.flatnonzero(present)]))

    rng = np.random.default_rng(seed)
    stats = [stat(x[rng.integers(0, len(x), size=len(x))]) for _ in range(n)]
    tail = 100 * (1 - level) / 2
    return dict(mean=stat(x), lo=float(np.percentile(stats, tail)), hi=float(np.percentile(stats, 100 - tail)),
                n=int(len(x)))


def with_interval(value: float | None, bounds: Sequence[float | None] | None = None, digits: int = 3,
                  bound_digits: int = 2, missing: str = "-") -> str:
    """``"0.912 [0.88, 0.94]"``: a figure with its interval, as every report and bench writes it (``missing`` for
    None; the value alone when the bounds are unknown)."""
    if value is None:
        return missing
    text = f"{value:.{digits}f}"
    if bounds is not None and len(bounds) == 2 and bounds[0] is not None and bounds[1] is not None:
        text += f" [{bounds[0]:.{bound_digits}f}, {bounds[1]:.{bound_digits}f}]"
    return text


def ratio_with_interval(ratio: dict | None, digits: int = 2, missing: str = "-") -> str:
    """A :func:`bootstrap_ratio` result as ``"0.90 [0.84, 0.96]"``."""
    if not ratio or ratio.get("ratio") is None:
        return missing
    return with_interval(ratio["ratio"], (ratio["lo"], ratio["hi"]), digits, digits, missing)
