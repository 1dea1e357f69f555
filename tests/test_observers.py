"""Observers on data whose answer is known."""
import math

import pytest
import torch

from quant import QScheme, make_observer
from quant.observers import Histogram

A8 = QScheme(8, symmetric=False)


def gaussian(n=1_000_000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def heavy_tailed(n=200_000, seed=0):
    # Laplace bulk plus 0.05 % outliers of magnitude 20 to 50, like LLM activation outlier channels
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    idx = torch.randperm(n, generator=g)[: n // 2000]
    x[idx] = (20 + 30 * torch.rand(len(idx), generator=g)) * torch.sign(torch.randn(len(idx), generator=g))
    return x


def test_minmax_streams_exact_range():
    obs = make_observer("minmax", A8)
    for chunk in gaussian().chunk(10):
        obs.observe(chunk)
    lo, hi = obs.range()
    x = gaussian()
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())


def test_ema_update_rule_matches_torch():
    c = 0.1
    obs = make_observer("ema", A8, averaging_constant=c)
    ref = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=c)
    batches = [torch.randn(100, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(5)]
    mn, mx = None, None
    for b in batches:
        obs.observe(b)
        ref(b)
        bmin, bmax = float(b.min()), float(b.max())
        mn = bmin if mn is None else mn + c * (bmin - mn)
        mx = bmax if mx is None else mx + c * (bmax - mx)
    lo, hi = obs.range()
    assert math.isclose(float(lo), mn, rel_tol=1e-5) and math.isclose(float(hi), mx, rel_tol=1e-5)
    assert math.isclose(float(lo), float(ref.min_val), rel_tol=1e-5)
    assert math.isclose(float(hi), float(ref.max_val), rel_tol=1e-5)


@pytest.mark.parametrize("pct,z", [(99.9, 3.0902), (99.99, 3.7190)])
def test_percentile_of_gaussian(pct, z):
    obs = make_observer("percentile", A8, percentile=pct)
    for chunk in gaussian(2_000_000).chunk(20):  # streamed: the histogram grows as it goes
        obs.observe(chunk)
    lo, hi = obs.range()
    assert abs(float(hi) - z) < 0.03 and abs(float(lo) + z) < 0.03


def test_percentile_per_channel_exact():
    w = torch.stack([gaussian(100_000, 1), 2 * gaussian(100_000, 2)])
    obs = make_observer("percentile", QScheme(8, granularity="channel"), percentile=99.9)
    obs.observe(w)
    lo, hi = obs.range()
    assert torch.allclose(hi, torch.tensor([3.09, 6.18]), atol=0.06)
    assert obs.qparams()[0].shape == (2, 1)


@pytest.mark.parametrize("name,bits,kw", [("mse", 4, {}), ("entropy", 8, {}), ("percentile", 8, {"percentile": 99.9})])
def test_clipping_observers_clip_heavy_tails(name, bits, kw):
    x = heavy_tailed()
    obs = make_observer(name, QScheme(bits, symmetric=True), **kw)
    for chunk in x.chunk(8):
        obs.observe(chunk)
    lo, hi = obs.range()
    amax = float(x.abs().max())
    assert 0 < float(hi) < 0.5 * amax, (float(hi), amax)


def test_mse_clip_lowers_error_against_minmax():
    x = heavy_tailed()
    scheme = QScheme(4, symmetric=True)
    from quant import Quantizer
    errs = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, scheme)
        obs.observe(x)
        q = Quantizer(scheme)
        q.set_qparams(*obs.qparams())
        errs[name] = float((q(x) - x).pow(2).mean())
    assert errs["mse"] < 0.5 * errs["minmax"]


def test_mse_per_channel_exact_search():
    w = torch.stack([heavy_tailed(4096, 1), gaussian(4096, 2)])
    obs = make_observer("mse", QScheme(4, granularity="channel"))
    obs.observe(w)
    lo, hi = obs.range()
    assert hi.shape == (2,)
    assert float(hi[0]) < 0.5 * float(w[0].abs().max())  # heavy tail: clipped hard
    assert float(hi[1]) > 0.5 * float(w[1].max())  # gaussian: clipped mildly


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse"])
@pytest.mark.parametrize("gran,shape", [(dict(granularity="channel", axis=0), (6, 1)),
                                        (dict(granularity="channel", axis=1), (1, 20)),
                                        (dict(granularity="group", group_size=8), (6, 3, 1)),
                                        (dict(granularity="tensor"), ())])
def test_per_channel_shapes(name, gran, shape):
    obs = make_observer(name, QScheme(8, **gran))
    obs.observe(torch.randn(6, 20))
    scale, zp = obs.qparams()
    assert scale.shape == shape and zp.shape == shape and torch.all(scale > 0)


def test_entropy_is_per_tensor_only():
    with pytest.raises(ValueError, match="per-tensor"):
        make_observer("entropy", QScheme(8, granularity="channel"))


def test_entropy_on_relu_activations_uses_one_sided_range():
    x = heavy_tailed().abs()
    obs = make_observer("entropy", QScheme(8, symmetric=False, signed=False))
    obs.observe(x)
    lo, hi = obs.range()
    scale, zp = obs.qparams()
    assert float(zp) == 0 and 0 < float(hi) < 0.5 * float(x.max())
    assert math.isclose(float(scale), float(hi) / 255, rel_tol=1e-5)


def test_unknown_observer_and_no_data():
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kmeans", A8)
    with pytest.raises(RuntimeError, match="observed no data"):
        make_observer("minmax", A8).qparams()
    with pytest.raises(ValueError, match="dynamic"):
        make_observer("minmax", QScheme(8, granularity="token"))


def test_observer_rejects_nan():
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_observer("mse", A8).observe(torch.tensor([1.0, float("nan")]))


def test_histogram_growth_keeps_mass_and_bounded_size():
    h = Histogram(bins=512)
    for i in range(1, 6):
        h.add(torch.randn(10_000) * i)
    assert h.counts.numel() == 512 and float(h.counts.sum()) == 50_000
    assert abs(h.quantile(0.5)) < 0.2


@pytest.mark.parametrize("bits,symmetric,weighted", [(4, False, False), (3, True, False), (8, False, True)])
@pytest.mark.parametrize("cols", [1, 64, 50_000])  # the last forces ratio chunks of fewer than the whole grid
@pytest.mark.parametrize("norm,min_ratio", [(2.0, 0.05), (2.4, 0.81)])
def test_mse_search_equals_one_ratio_at_a_time(bits, symmetric, weighted, cols, norm, min_ratio):
    """The batched grid search picks what trying each ratio in turn with a strict < picks (the
    first of equal errors too: rows of one repeated value tie across many ratios)."""
    from quant.fake_quant import fake_quantize
    from quant.observers import _mse_best_ratio
    from quant.scheme import qparams_from_range
    g = torch.Generator().manual_seed(cols)
    v = torch.randn(5, cols, generator=g) * torch.tensor([[1.0], [10.0], [0.1], [1.0], [1.0]])
    v[3] = 0.5  # constant row: ties
    v[4, :1] = 40.0  # an outlier
    w = torch.rand(5, cols, generator=g) if weighted else None
    scheme = QScheme(bits, symmetric=symmetric)
    best, want = torch.full((5,), math.inf), torch.ones(5)
    mn, mx = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    ratios = [min_ratio + k * 0.01 for k in range(round((1 - min_ratio) / 0.01) + 1)]
    assert ratios[0] == min_ratio and abs(ratios[-1] - 1) < 1e-9
    for a in torch.tensor(ratios).tolist():  # (float32 ratios, as the search's)
        s, z = qparams_from_range(a * mn, a * mx, scheme)
        err = (fake_quantize(v, s, z, scheme.qmin, scheme.qmax) - v).abs().pow(norm)
        err = (err * w if w is not None else err).sum(1)
        want = torch.where(err < best, a, want)
        best = torch.minimum(err, best)
    got = _mse_best_ratio(v, w, scheme, **({} if norm == 2.0 and min_ratio == 0.05 else dict(norm=norm, min_ratio=min_ratio)))
    assert torch.allclose(got, want, atol=1e-6)
