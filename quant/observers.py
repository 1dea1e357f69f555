"""Observers: stream over calibration data in bounded memory and choose a quantization range.

  minmax      running min / max                                  any granularity
  ema         moving-average min / max (PyTorch's update rule)   any granularity
  percentile  clip at the p-th percentile of |x| / of each tail   histogram (per-tensor) or exact per row
  mse         clip range that minimizes the quantization MSE      histogram (per-tensor) or exact per row
              (FP8: the scale that aligns E4M3's grid best with the values, clipping none)
  entropy     clip threshold minimizing KL divergence (TensorRT)  per-tensor only

Per-tensor histogram observers keep a fixed number of bins whose range grows with the data, so
memory does not depend on how much is observed. In per-channel / per-group mode (weights) the
percentile and MSE observers compute the exact optimum for each observed tensor and average it
over calls: exact for a weight, which is observed once.
"""
import math

import numpy as np
import torch

from . import distributed
from .fake_quant import fake_quantize
from .formats import fake_quantize_format
from .scheme import QScheme, check_finite, qparams_from_range

HIST_BINS = 2048
MSE_STEP = 0.01  # the MSE search tries the clip ratios min_ratio, min_ratio + 0.01, ..., 1
FP8_RATIOS = 32  # ... and for FP8 the widening ratios 1, 1 + 1/32, ..., 2 - 1/32


class Observer:
    def __init__(self, scheme: QScheme):
        if scheme.dynamic:
            raise ValueError("dynamic per-token quantization computes its range on every call; it has no observer")
        self.scheme = scheme
        self.shape = None  # scale / zero point shape, fixed by the first tensor seen
        self.count = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, "observed tensor")
        self.scheme.check_shape(x.shape)
        xl = self.scheme.to_layout(x.detach())
        shape = self.scheme.param_shape(xl)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"observer saw a tensor whose scale shape {shape} differs from the first one {self.shape}")
        self.count += 1
        return self.scheme.rows(xl).float()

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reduce(self) -> None:
        """Combine what every rank of a data-parallel run observed (quant.distributed), exactly."""
        if distributed.world() > 1:
            raise ValueError(f"{type(self).__name__} cannot be reduced exactly across ranks")

    def range(self):
        """(min, max) clip range, each of shape (rows,)."""
        raise NotImplementedError

    def qparams(self):
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data; run calibration first")
        lo, hi = self.range()
        scale, zp = qparams_from_range(lo, hi, self.scheme)
        return scale.reshape(self.shape), zp.reshape(self.shape)


class MinMaxObserver(Observer):
    def __init__(self, scheme):
        super().__init__(scheme)
        self.min = self.max = None

    def observe(self, x):
        rows = self._rows(x)
        lo, hi = rows.amin(1), rows.amax(1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def reduce(self):
        if distributed.world() > 1:  # (every rank has observed a batch: quantize_model's shard_batches)
            distributed.all_reduce_(self.min, "min")
            distributed.all_reduce_(self.max, "max")
            self.count = int(distributed.total(self.count))

    def range(self):
        return self.min, self.max


class EMAObserver(MinMaxObserver):
    """min <- min + c * (batch_min - min), the first batch initializing (c = averaging_constant)."""

    def __init__(self, scheme, averaging_constant: float = 0.01):
        super().__init__(scheme)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant

    reduce = Observer.reduce  # (a running average depends on the order of the batches)

    def observe(self, x):
        rows = self._rows(x)
        lo, hi = rows.amin(1), rows.amax(1)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min = self.min + self.c * (lo - self.min)
            self.max = self.max + self.c * (hi - self.max)


class Histogram:
    """Fixed-size histogram over [lo, hi] whose range widens as data arrives: old counts move to
    the new bin holding their old bin's centre (error under one new bin width)."""

    def __init__(self, bins: int = HIST_BINS):
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.lo = self.hi = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).float()
        # the range always holds 0, like every quantization range here
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if self.lo is None:
            self.lo, self.hi = lo, max(hi, lo + 1e-12)
        elif lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            centres = self.edges()[:-1] + self.width / 2
            idx = ((centres - new_lo) / ((new_hi - new_lo) / self.bins)).long().clamp_(0, self.bins - 1)
            counts = torch.zeros_like(self.counts).index_add_(0, idx, self.counts)
            self.counts, self.lo, self.hi = counts, new_lo, new_hi
        self.counts += torch.histc(x, self.bins, self.lo, self.hi).double().cpu()

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def centres(self) -> torch.Tensor:
        return (self.edges()[:-1] + self.width / 2).float()

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the mass lies (linear inside the bin)."""
        cdf = torch.cumsum(self.counts, 0)
        target = q * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        below = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - below) / max(float(self.counts[i]), 1e-30)
        return self.lo + (i + min(max(frac, 0.0), 1.0)) * self.width


SEARCHED_FORMATS = {"mse": ("int", "fp8"), "entropy": ("int",)}  # the grids each range search scores


def check_search_format(observer: str, fmt: str) -> None:
    """ValueError where `observer` searches ranges and cannot score the number format `fmt`."""
    if fmt not in SEARCHED_FORMATS.get(observer, (fmt,)):
        raise ValueError(f"the {observer} search scores {' and '.join(SEARCHED_FORMATS[observer])} grids, not {fmt} "
                         f"(MXFP4 and NVFP4 fix their scales by their own rule): take minmax, ema or percentile ranges")


def mse_grid(min_ratio: float = 0.05, fmt: str = "int") -> torch.Tensor:
    """The ratios the MSE search tries. An integer grid is uniform, so the search shrinks the range
    (clipping the tails buys a finer step). E4M3's grid is the same in every binade: the relative
    step does not change with the scale, only where the grid points fall between the values, and
    the largest values' absolute errors dominate the sum; so for FP8 the search widens the range by
    1 .. 2 (every alignment of the grid once), which clips nothing."""
    check_search_format("mse", fmt)
    if fmt == "fp8":
        if min_ratio != 0.05:
            raise ValueError("the FP8 MSE search widens the range (ratios 1 .. 2): it takes no min_ratio")
        return 1 + torch.arange(FP8_RATIOS) / FP8_RATIOS
    return torch.linspace(min_ratio, 1.0, round((1.0 - min_ratio) / MSE_STEP) + 1)


def _mse_best_ratio(values: torch.Tensor, weights: torch.Tensor | None, scheme: QScheme,
                    norm: float = 2.0, min_ratio: float = 0.05) -> torch.Tensor:
    """For each row of `values`, the ratio a in mse_grid(min_ratio) for which quantizing the row
    over [a * min, a * max] gives the least (weighted) sum of |error|^norm (the first such a on
    ties). Many ratios are tried in one pass (a leading ratio dimension: a few launches instead of a
    few per ratio, which is what a GPU needs); rows and ratios are chunked so that one pass
    holds at most 2^22 elements (2^26 on a GPU, where each pass's launches, not its arithmetic,
    are the cost)."""
    budget = 1 << (26 if values.is_cuda else 22)
    n_rows, n_cols = values.shape
    grid = mse_grid(min_ratio, scheme.format).to(values.device)
    per_pass = max(1, budget // max(n_cols, 1))  # (ratio, row) pairs per pass
    n_a = min(len(grid), per_pass)
    chunk = max(1, per_pass // n_a)
    best_ratio = torch.ones(n_rows, device=values.device)
    for start in range(0, n_rows, chunk):
        v = values[start:start + chunk]
        w = None if weights is None else weights[start:start + chunk]
        mn, mx = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        best = torch.full((v.shape[0],), math.inf, device=v.device)
        ratio = best_ratio[start:start + chunk]
        for a0 in range(0, len(grid), n_a):
            a = grid[a0:a0 + n_a].view(-1, 1, 1)
            scale, zp = qparams_from_range(a * mn, a * mx, scheme)  # (ratios, rows, 1)
            if scheme.format == "int":
                err = fake_quantize(v, scale, zp, scheme.qmin, scheme.qmax) - v
            else:
                err = fake_quantize_format(v, scale, scheme.format) - v
            err = err.pow_(2) if norm == 2 else err.abs_().pow_(norm)
            err = (err * w if w is not None else err).sum(-1)  # (ratios, rows)
            low, idx = err.min(0)  # first minimum on ties, as a strict < over the ratios in order
            better = low < best
            best = torch.where(better, low, best)
            ratio.copy_(torch.where(better, grid[a0:a0 + n_a][idx], ratio))
    return best_ratio


class _HistogramObserver(Observer):
    """Per-tensor: streams into a histogram. Per-row (channel / group): exact per observed
    tensor, averaged over calls."""

    def __init__(self, scheme):
        super().__init__(scheme)
        self.per_tensor = scheme.granularity == "tensor"
        self.hist = Histogram() if self.per_tensor else None
        self.min = self.max = None
        self.row_lo = self.row_hi = None  # running sums of per-row optima

    def observe(self, x):
        rows = self._rows(x)
        lo, hi = rows.amin(1), rows.amax(1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.per_tensor:
            self.hist.add(rows)
        else:
            lo, hi = self._rows_range(rows)
            self.row_lo = lo if self.row_lo is None else self.row_lo + lo
            self.row_hi = hi if self.row_hi is None else self.row_hi + hi

    def range(self):
        if self.per_tensor:
            lo, hi = self._hist_range()
            return torch.tensor([lo]), torch.tensor([hi])
        return self.row_lo / self.count, self.row_hi / self.count


class PercentileObserver(_HistogramObserver):
    """Clips each tail at the given percentile (e.g. 99.99: the top and bottom 0.01 % are
    clipped). Symmetric schemes then take the larger magnitude of the two."""

    def __init__(self, scheme, percentile: float = 99.99):
        super().__init__(scheme)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.p = percentile / 100

    def _hist_range(self):
        return self.hist.quantile(1 - self.p), self.hist.quantile(self.p)

    def _rows_range(self, rows):
        n = rows.shape[1]
        k_hi = min(n, max(1, math.ceil(self.p * n)))
        k_lo = max(1, n + 1 - k_hi)
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


class MSEObserver(_HistogramObserver):
    """Searches a shrink ratio a in [min_ratio, 1] of the observed range [min, max] minimizing the
    quantization error's sum of |e|^norm (norm 2: the MSE; llm-compressor's search is norm 2.4
    over ratios 0.81-1)."""

    def __init__(self, scheme, norm: float = 2.0, min_ratio: float = 0.05):
        super().__init__(scheme)
        if not norm > 0 or not 0 < min_ratio <= 1:
            raise ValueError(f"the mse observer needs norm > 0 and 0 < min_ratio <= 1, got norm={norm}, min_ratio={min_ratio}")
        self.search = dict(norm=norm, min_ratio=min_ratio)

    def _hist_range(self):
        values = self.hist.centres().unsqueeze(0)
        a = float(_mse_best_ratio(values, self.hist.counts.float().unsqueeze(0), self.scheme, **self.search)[0])
        return a * float(self.min.min()), a * float(self.max.max())

    def _rows_range(self, rows):
        a = _mse_best_ratio(rows, None, self.scheme, **self.search)
        return a * rows.amin(1), a * rows.amax(1)


class EntropyObserver(_HistogramObserver):
    """TensorRT's entropy calibration: a histogram of |x|, and the clip threshold whose
    quantized distribution has the least KL divergence from the clipped reference."""

    def __init__(self, scheme):
        if scheme.granularity != "tensor":
            raise ValueError("the entropy observer is per-tensor only (use minmax, percentile or mse per channel)")
        super().__init__(scheme)

    def observe(self, x):
        rows = self._rows(x)
        lo, hi = rows.amin(1), rows.amax(1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.hist.add(rows.abs())

    def _levels(self) -> int:
        one_sided = float(self.min.min()) >= 0 and not self.scheme.symmetric
        return 2 ** self.scheme.bits if one_sided else 2 ** (self.scheme.bits - 1)

    def _hist_range(self):
        t = entropy_threshold(self.hist.counts.numpy(), self._levels()) * self.hist.width + self.hist.lo
        return max(float(self.min.min()), -t), min(float(self.max.max()), t)


def entropy_threshold(hist: np.ndarray, levels: int) -> float:
    """Number of bins (as a float edge index) to keep so that KL(P || Q) is smallest, where P is
    the histogram clipped at that edge (outliers folded into the last bin) and Q is P merged into
    `levels` quantization bins and expanded back over P's non-empty bins."""
    nbins = len(hist)
    if levels >= nbins:
        return float(nbins)
    best_kl, best_i = math.inf, nbins
    for i in range(levels, nbins + 1):
        ref = hist[:i].astype(np.float64)
        p = ref.copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p != 0
        # merge the i reference bins into `levels` chunks, spread each chunk over its non-empty bins
        chunk_of = (np.arange(i) * levels) // i
        chunk_sum = np.bincount(chunk_of, weights=ref, minlength=levels)
        chunk_nz = np.bincount(chunk_of, weights=nonzero, minlength=levels)
        q = np.where(nonzero, chunk_sum[chunk_of] / np.maximum(chunk_nz[chunk_of], 1), 0.0)
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            continue
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i)


def _smooth(d: np.ndarray, eps: float = 1e-4):
    """Normalize, giving empty bins a little mass (then renormalizing) so that KL stays finite."""
    total = d.sum()
    if total <= 0:
        return None
    d = d / total + eps * (d == 0)
    return d / d.sum()


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, scheme: QScheme, **kwargs) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose from {sorted(OBSERVERS)}")
    check_search_format(name, scheme.format)
    return OBSERVERS[name](scheme, **kwargs)
