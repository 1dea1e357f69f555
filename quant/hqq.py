"""HQQ (Badri & Shaji 2023, "Half-Quadratic Quantization"): calibration-free weight quantization.

Each group keeps its min-max scale; its zero point becomes a float chosen to minimise
||W - dequant(quant(W))||_p^p with p < 1 (a sparsity-promoting norm, so a few outlier weights
do not pull the grid). Half-quadratic splitting adds an error variable E and alternates two
closed forms: E = shrink_p(W - W_r) (generalised soft thresholding, weight beta growing by kappa
each step), then the zero point that makes the codes reproduce W - E in least squares (a mean
over the group). Codes are q = clamp(round(W / s + z)); the weight is (q - z) * s.

Unlike the reference implementation, which stops the whole tensor at the first step whose mean
error does not improve, each group keeps the zero point of its own best step (by mean absolute
error, the reference's stopping measure): never worse than the start, group by group.
"""
import torch

from .scheme import MIN_SCALE, QScheme


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None, count) -> torch.Tensor:
    return (x if mask is None else x * mask).sum(1, keepdim=True) / count


@torch.no_grad()
def hqq_qparams(w: torch.Tensor, scheme: QScheme, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
                kappa: float = 1.01, round_start: bool = False):
    """Scale and (fractional) zero point of an (out, in) weight under an asymmetric `scheme`,
    shaped as scheme.param_shape of its layout. round_start: begin from the rounded min-max zero
    point (the reference does at 4 bits). The zero point is left float16-exact (as stored)."""
    if scheme.symmetric:
        raise ValueError("hqq optimises the zero point: use an asymmetric weight scheme")
    wl = scheme.to_layout(w.float())
    rows = scheme.rows(wl)
    mask = None
    if scheme.granularity == "group" and w.shape[-1] % scheme.group_size:  # ignore the zero padding
        mask = scheme.rows(scheme.to_layout(torch.ones_like(w, dtype=torch.float32)))
    count = rows.shape[1] if mask is None else mask.sum(1, keepdim=True)
    lo = rows.amin(1, keepdim=True) if mask is None else rows.masked_fill(mask == 0, float("inf")).amin(1, keepdim=True)
    hi = rows.amax(1, keepdim=True) if mask is None else rows.masked_fill(mask == 0, float("-inf")).amax(1, keepdim=True)
    qmin, qmax = scheme.qmin, scheme.qmax
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    inv = 1.0 / scale
    zero = qmin - lo * inv
    if round_start:
        zero = zero.round()

    def step(zero):
        q = torch.round(rows * inv + zero).clamp_(qmin, qmax)
        err = rows - (q - zero) * scale
        return q, err

    best_zero, best_err = zero, torch.full_like(zero, float("inf"))
    for _ in range(iters + 1):
        q, err = step(zero)
        l1 = _masked_mean(err.abs(), mask, count)
        better = l1 < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.where(better, l1, best_err)
        if _ == iters:
            break
        a = err.abs()
        e = torch.sign(err) * (a - a.clamp(min=1e-12).pow(lp_norm - 1) / beta).clamp_(min=0)
        zero = _masked_mean(q - (rows - e) * inv, mask, count)
        beta *= kappa
    zero = (best_zero - qmin).half().float() + qmin  # what a checkpoint stores, exactly
    shape = scheme.param_shape(wl)
    return scale.reshape(shape), zero.reshape(shape)


def hqq_quantize(module, iters: int, lp_norm: float, beta: float, kappa: float, round_start: bool) -> None:
    """Requantize a QuantLinear / QuantEmbedding (built by quantize_linears) with HQQ's zero points."""
    scale, zero = hqq_qparams(module.weight, module.weight_quant.scheme, iters, lp_norm, beta, kappa, round_start)
    module.set_quantized_weight(module.weight, scale, zero)
