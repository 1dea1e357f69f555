"""Intervals for the numbers the tables compare: a percentile bootstrap over evaluation units
(windows of text), paired when two models are scored on the same units.

Windows, not tokens, are the units: the tokens of one window share its context, so their
losses are correlated and a per-token interval would be too narrow; windows of the test split do
not overlap, and are close to independent.
"""
import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_mean(units, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) of the `level` percentile-bootstrap interval of the mean of `units` (1-D):
    resample the units with replacement, take each resample's mean, read off the quantiles.
    Seeded, so the same units give the same interval."""
    x = np.asarray(units, dtype=np.float64).reshape(-1)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # in slices: resamples x units indices stay small
        idx = rng.integers(0, len(x), size=(min(256, resamples - start), len(x)))
        means[start:start + len(idx)] = x[idx].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
