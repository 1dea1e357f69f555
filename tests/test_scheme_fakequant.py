"""Quantization math against independent references: PyTorch's fake-quantize kernels,
closed forms and property tests."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QScheme, Quantizer, dequantize, fake_quantize, lsq_fake_quantize, qparams_from_range, quantize

GRANULARITIES = [dict(granularity="tensor"), dict(granularity="channel", axis=0),
                 dict(granularity="channel", axis=1), dict(granularity="group", group_size=16),
                 dict(granularity="group", group_size=24), dict(granularity="token")]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 10.0), zp=st.integers(-128, 127),
       signed=st.booleans())
def test_8bit_per_tensor_matches_torch(seed, scale, zp, signed):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = min(max(zp + (0 if signed else 128), qmin), qmax)
    x = torch.randn(257, generator=g) * scale * 100
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    s = torch.tensor(scale, dtype=torch.float32)
    out = fake_quantize(x, s, torch.tensor(float(zp)), qmin, qmax)
    assert torch.equal(out, ref)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), axis=st.integers(0, 2))
def test_8bit_per_channel_matches_torch(seed, axis):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, generator=g) * 4
    n = x.shape[axis]
    scale = torch.rand(n, generator=g) * 0.1 + 1e-3
    zp = torch.randint(0, 256, (n,), generator=g)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis, 0, 255)
    shape = [1, 1, 1]
    shape[axis] = n
    out = fake_quantize(x, scale.reshape(shape), zp.float().reshape(shape), 0, 255)
    assert torch.equal(out, ref)


def test_ste_gradient_matches_torch_and_closed_form():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    scale, zp = torch.tensor(0.02), torch.tensor(3.0)
    fake_quantize(x, scale, zp, -128, 127).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(x_ref, 0.02, 3, -128, 127).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    # closed form: 1 where the unclamped code lies in [qmin, qmax]
    inside = ((torch.round(x.detach() / 0.02) + 3 >= -128) & (torch.round(x.detach() / 0.02) + 3 <= 127)).float()
    assert torch.equal(x.grad, inside)
    assert 0 < inside.sum() < len(inside)


def test_lsq_gradients_closed_form():
    qmin, qmax = -8, 7
    s = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([-10.0, -1.3, 0.2, 0.74, 3.3, 9.0], requires_grad=True)
    g = 0.25
    y = lsq_fake_quantize(x, s, torch.tensor(0.0), qmin, qmax, g)
    y.backward(torch.ones_like(y))
    v = x.detach() / 0.5
    expected_ds = torch.where(v < -8.5, torch.tensor(-8.0), torch.where(v > 7.5, torch.tensor(7.0), torch.round(v) - v))
    assert torch.allclose(s.grad, expected_ds.sum() * g)
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))
    assert torch.equal(y.detach(), torch.tensor([-4.0, -1.5, 0.0, 0.5, 3.5, 3.5]))


def test_lsq_matches_torch_learnable_op():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 2
    x1, s1 = x.clone().requires_grad_(), torch.tensor([0.05], requires_grad=True)
    zp = torch.tensor([0.0])
    grad_factor = 1 / math.sqrt(1000 * 127)
    lsq_fake_quantize(x1, s1, zp, -128, 127, grad_factor).pow(2).sum().backward()
    x2, s2 = x.clone().requires_grad_(), torch.tensor([0.05], requires_grad=True)
    torch._fake_quantize_learnable_per_tensor_affine(x2, s2, zp, -128, 127, grad_factor).pow(2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 8), symmetric=st.booleans(), signed=st.booleans(),
       gi=st.integers(0, len(GRANULARITIES) - 1))
def test_round_trip_error_at_most_half_scale(seed, bits, symmetric, signed, gi):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 40, generator=g) * torch.rand(1, generator=g) * 10
    scheme = QScheme(bits, symmetric, signed, **GRANULARITIES[gi])
    q = Quantizer(scheme)
    if not scheme.dynamic:
        q.fit(x)
    y = q(x)
    xl = scheme.to_layout(x)
    scale, _ = q._qparams(xl)
    err = scheme.to_layout(y - x).abs()
    assert y.shape == x.shape
    # min-max range: every value is inside, so the error is at most half a step (plus rounding slack)
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)


def test_quantize_dequantize_integer_codes():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.26, 2.0])
    q = quantize(x, torch.tensor(0.25), torch.tensor(0.0), -4, 3)
    assert q.dtype == torch.int8 and q.tolist() == [-4, -2, 0, 1, 3]
    assert dequantize(q, torch.tensor(0.25), torch.tensor(0.0)).tolist() == [-1.0, -0.5, 0.0, 0.25, 0.75]
    qu = quantize(x, torch.tensor(0.25), torch.tensor(4.0), 0, 15)
    assert qu.dtype == torch.uint8 and qu.tolist() == [0, 2, 4, 5, 12]


def test_qparams_closed_form():
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QScheme(8, symmetric=False, signed=False))
    assert math.isclose(float(s), 4 / 255, rel_tol=1e-6) and float(z) == 64
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QScheme(4, symmetric=True))
    assert math.isclose(float(s), 3 / 7, rel_tol=1e-6) and float(z) == 0
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QScheme(8, symmetric=True, signed=False))
    assert math.isclose(float(s), 3 / 127, rel_tol=1e-6) and float(z) == 128
    # the range is widened to hold zero
    s, z = qparams_from_range(torch.tensor(2.0), torch.tensor(3.0), QScheme(8, symmetric=False, signed=False))
    assert math.isclose(float(s), 3 / 255, rel_tol=1e-6) and float(z) == 0


@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (1e-30, 1e-30), (-1e-38, 1e-38), (5.0, 5.0)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_finite_for_degenerate_ranges(lo, hi, symmetric):
    scheme = QScheme(4, symmetric=symmetric)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), scheme)
    assert torch.isfinite(s) and s > 0 and torch.isfinite(z)
    x = torch.full((3,), hi)
    y = fake_quantize(x, s, z, scheme.qmin, scheme.qmax)
    assert torch.isfinite(y).all()


def test_all_zero_tensor_quantizes_to_zero():
    q = Quantizer(QScheme(3, granularity="channel"))
    q.fit(torch.zeros(4, 5))
    assert torch.equal(q(torch.zeros(4, 5)), torch.zeros(4, 5))


@pytest.mark.parametrize("bits", [0, 1, 9, 33, -4, 4.0, True])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QScheme(bits)


def test_bad_granularity_and_group_size():
    with pytest.raises(ValueError, match="granularity"):
        QScheme(8, granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        QScheme(4, granularity="group")
    with pytest.raises(ValueError, match="larger than the input dimension"):
        Quantizer(QScheme(4, granularity="group", group_size=64)).fit(torch.randn(8, 32))


def test_partial_last_group_is_handled():
    scheme = QScheme(4, granularity="group", group_size=16)
    x = torch.randn(3, 40)  # groups of 16, 16, 8
    q = Quantizer(scheme)
    q.fit(x)
    assert q.scale.shape == (3, 3, 1)
    y = q(x)
    assert y.shape == x.shape
    # the last group's scale comes from its own 8 values only
    assert torch.allclose(q.scale[:, 2, 0], x[:, 32:].abs().amax(1) / 7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        Quantizer(QScheme(8)).fit(w)
