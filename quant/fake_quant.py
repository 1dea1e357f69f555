"""Quantize / dequantize arithmetic and the fake-quant autograd functions (STE and LSQ).

All functions take scale and zero point already shaped to broadcast against x (see
QScheme.param_shape); fake_quantize also takes Python numbers for a per-tensor scheme.
The rounding matches PyTorch's fake-quantize kernels exactly:
q = clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax).
"""
import torch


def is_fractional(zero_point) -> bool:
    """Whether a zero point holds non-integers (HQQ optimises it as a float)."""
    if torch.is_tensor(zero_point):
        return bool((zero_point != torch.round(zero_point)).any())
    return zero_point != round(zero_point)


def quantize(x, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Float -> integer codes (int8 for signed ranges, uint8 for unsigned, both up to 8 bits).
    An integer zero point is added after rounding (PyTorch's order, which breaks ties the same
    way); a fractional one before it, q = round(x / scale + zero_point), as HQQ defines it."""
    x = x.float() * (1.0 / scale)
    q = torch.round(x + zero_point) if is_fractional(zero_point) else torch.round(x) + zero_point
    return q.clamp_(qmin, qmax).to(torch.int8 if qmin < 0 else torch.uint8)


def dequantize(q, scale, zero_point) -> torch.Tensor:
    return (q.float() - zero_point) * scale


def _fq(x, scale, zero_point, qmin, qmax):
    """Shared forward: fake-quantized x and the unclamped integer offsets r = round(x / s).
    Clamping r to [qmin - zp, qmax - zp] is the same as clamping r + zp to [qmin, qmax] and
    saves two passes over x."""
    r = torch.round(x * (1.0 / scale))
    lo, hi = qmin - zero_point, qmax - zero_point
    return torch.clamp(r, lo, hi) * scale, r, lo, hi


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        out, r, lo, hi = _fq(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward((r >= lo) & (r <= hi))
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with the straight-through estimator: gradient 1 inside the clipping
    range, 0 outside; no gradient to scale or zero point."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax).to(x.dtype)
    return fake_quantize_prepared(x, 1.0 / scale, scale, qmin - zero_point, qmax - zero_point).to(x.dtype)


def fake_quantize_fractional(x, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a fractional zero point: (clamp(round(x / s + zp)) - zp) * s.
    No gradient (HQQ's weights are fixed once)."""
    q = torch.round(x.float() * (1.0 / scale) + zero_point).clamp_(qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def fake_quantize_prepared(x, inv_scale, scale, lo, hi) -> torch.Tensor:
    """Inference fake-quant given 1 / scale and the offset bounds qmin - zp, qmax - zp (the
    same arithmetic as _fq), for loops that reuse one scale many times (GPTQ's columns): one
    new tensor, then in-place passes."""
    return (x * inv_scale).round_().clamp_(lo, hi).mul_(scale)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the parameter it came from."""
    if t.shape == torch.Size(shape):
        return t
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1] if len(shape) else list(range(t.dim()))
    return t.sum(dim=dims, keepdim=len(shape) > 0).reshape(shape)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale):
        out, r, lo, hi = _fq(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(x, scale, r, lo, hi)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, r, lo, hi = ctx.saved_tensors
        below, above = r < lo, r > hi
        inside = ~(below | above)
        # d(out)/d(scale): round(x/s) - x/s inside the range (STE through round), the clipped
        # integer bound outside it (Esser et al. 2020, eq. 3, with a zero point).
        ds = torch.where(below, lo, torch.where(above, hi, r - x / scale))
        grad_scale = _sum_to(grad * ds, scale.shape) * ctx.grad_scale
        return grad * inside, grad_scale, None, None, None, None


def lsq_fake_quantize(x, scale, zero_point, qmin: int, qmax: int, grad_scale: float):
    """LSQ fake quantization: STE for x, learned step size `scale` whose gradient is multiplied by
    `grad_scale` (LSQ's g = 1 / sqrt(elements per scale * positive levels); Quantizer computes it)."""
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, grad_scale).to(x.dtype)


def round_to_nearest(w: torch.Tensor, scheme, ratio=1.0):
    """RTN of an (out, in) weight, each scale's range [min, max] shrunk by `ratio` (a number, or
    one value per scale). Returns (quantized weight, scale, zero point)."""
    from .scheme import row_qparams
    wl = scheme.to_layout(w)
    scale, zp = row_qparams(scheme.rows(wl), scheme, ratio)
    shape = scheme.param_shape(wl)
    scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scheme.from_layout(fake_quantize(wl, scale, zp, scheme.qmin, scheme.qmax), w.shape), scale, zp
