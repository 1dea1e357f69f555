"""Intervals for the numbers the tables compare: a percentile bootstrap over evaluation units
(windows of text), paired when two models are scored on the same units.

Windows, not tokens, are the units: the tokens of one window share its context, so their
losses are correlated and a per-token interval would be too narrow; windows of the test split do
not overlap, and are close to independent.
"""
import base64

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


def paired(a, b, **kw) -> tuple[float, float, float]:
    """(mean, low, high) of a - b over the same units: the interval of a difference between two
    models scored on the same windows, resampling the windows together."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return (float(d.mean()), *bootstrap_mean(d, **kw))


def verdict(low: float, high: float) -> str:
    """How a difference's interval reads: 'n.s.' when it contains zero (not significant at 95 %)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    return "n.s." if low <= 0 <= high else ("higher" if low > 0 else "lower")


def encode(units) -> str:
    """Per-unit values as text for a CSV cell (float32, base64): what a later paired comparison needs."""
    return base64.b64encode(np.asarray(units, dtype="<f4").tobytes()).decode("ascii")


def decode(text) -> np.ndarray | None:
    if not isinstance(text, str) or not text:
        return None
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)
