"""SignRound (Cheng et al. 2023, the method of Intel's AutoRound): block by block, learn each
weight's rounding offset v (codes round(w / s + v) instead of round(w / s)) and, per scale, two
factors in [0, 1] on the range's min and max, by signed gradient descent on the block's output
error: the quantized block, fed the outputs of the already-quantized blocks before it, is trained
to reproduce the float model's block output (the float block on the float model's own inputs),
so each block also corrects the drift the blocks before it left. Rounding goes through the
straight-through estimator; the step is lr * sign(grad) with lr = 1 / iters decaying linearly
to 0, so no offset moves more than about 0.5; the parameters of the step with the lowest loss
are kept. Afterwards each layer is an ordinary grid weight (integer zero point) whose codes the
offsets chose: nothing extra is stored.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .arch import is_conv1d, is_linear, weight_matrix
from .scheme import MIN_SCALE, QScheme


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def qdq_rows(rows: torch.Tensor, v, lo_factor, hi_factor, scheme: QScheme):
    """Quantize-dequantize rows (one per scale) with rounding offsets v and range factors:
    (dequantized rows, scale, zero point), differentiable in v and the factors."""
    qmin, qmax = scheme.qmin, scheme.qmax
    mx = rows.amax(1, keepdim=True).clamp(min=0) * hi_factor
    if scheme.symmetric:  # one factor on the larger magnitude
        mn = rows.amin(1, keepdim=True).clamp(max=0) * hi_factor
        zp = torch.full_like(mx, float(scheme.zero_point_int))
        scale = (torch.maximum(-mn, mx) / (qmax - scheme.zero_point_int)).clamp(min=MIN_SCALE)
    else:
        mn = rows.amin(1, keepdim=True).clamp(max=0) * lo_factor
        scale = ((mx - mn) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zp = _ste_round(qmin - mn / scale).clamp(qmin, qmax)
    q = torch.clamp(_ste_round(rows / scale + v) + zp, qmin, qmax)
    return (q - zp) * scale, scale, zp


def _rows_to_weight(rows: torch.Tensor, scheme: QScheme, shape: torch.Size) -> torch.Tensor:
    if scheme.granularity == "group":
        n_groups = -(-shape[-1] // scheme.group_size)
        return scheme.from_layout(rows.reshape(shape[0], n_groups, scheme.group_size), shape)
    return rows.reshape(shape)  # per-tensor, or per-channel along the output axis


class _Layer:
    """One linear layer's tuning state."""

    def __init__(self, module, scheme: QScheme, minmax: bool):
        if scheme.granularity == "channel" and scheme.axis not in (0, -2):
            raise ValueError("signround quantizes per output channel (axis 0), per group or per tensor")
        self.module, self.scheme, self.conv1d = module, scheme, is_conv1d(module)
        w = weight_matrix(module).detach().float()
        self.shape = w.shape
        self.rows = scheme.rows(scheme.to_layout(w))
        self.v = torch.zeros_like(self.rows, requires_grad=True)
        ones = lambda grad: torch.ones(self.rows.shape[0], 1, device=w.device, requires_grad=grad)  # noqa: E731
        self.hi = ones(minmax)
        self.lo = ones(minmax and not scheme.symmetric)

    def params(self) -> list:
        return [p for p in (self.v, self.lo, self.hi) if p.requires_grad]

    def weight(self):
        """(the (out, in) quantized weight, scale, zero point) under the current parameters."""
        rows, scale, zp = qdq_rows(self.rows, self.v, self.lo, self.hi, self.scheme)
        return _rows_to_weight(rows, self.scheme, self.shape), scale, zp

    def as_stored(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.conv1d else w  # Conv1D keeps its weight as (in, out)


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def signround_block(block, inputs: list, targets: list, scheme_for, a_scheme=None, iters: int = 200,
                    minmax: bool = True, seed: int = 0) -> dict:
    """SignRound on one float block, then its linear layers swapped for QuantLinears.
    inputs: [(args, kwargs)] of the block's calls (the quantized model's); targets: the float
    model's block outputs for the same windows. Each step: as many windows as the first batch holds.
    Returns {"loss_start", "loss_best", "best_step"}."""
    from .modules import QuantLinear, replace_module
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    layers = {n: _Layer(m, scheme_for(n, m), minmax) for n, m in linears.items()}
    params = [p for layer in layers.values() for p in layer.params()]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # only the rounding state learns
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    # each step trains on a batch of windows drawn afresh (shuffled, each once per pass over the
    # set), not on one of the fixed calibration batches: the windows carry no padding, so the
    # first batch's other arguments (positions, causal mask) serve any batch of its size
    (args0, kwargs0), size = inputs[0], inputs[0][0][0].shape[0]
    windows = [(k, i) for k, (args, _) in enumerate(inputs) for i in range(args[0].shape[0])]
    order = []

    def draw():
        nonlocal order
        if len(order) < size:
            order += torch.randperm(len(windows), generator=gen).tolist()
        picked, order = [windows[j] for j in order[:size]], order[size:]
        x = torch.cat([inputs[k][0][0][i:i + 1] for k, i in picked])
        return (x,) + tuple(args0[1:]), torch.cat([targets[k][i:i + 1] for k, i in picked])

    best_loss, best_step, start_loss = math.inf, -1, None
    best = {n: (layer.v.clone(), layer.lo.clone(), layer.hi.clone()) for n, layer in layers.items()}
    try:
        with torch.enable_grad():
            for step in range(iters):
                args, target = draw()
                weights = {f"{n}.weight": layer.as_stored(layer.weight()[0]) for n, layer in layers.items()}
                out = _output(functional_call(block, weights, args, kwargs0))
                loss = F.mse_loss(out.float(), target.float())
                value = float(loss.detach())
                start_loss = value if start_loss is None else start_loss
                if value < best_loss:
                    best_loss, best_step = value, step
                    best = {n: (layer.v.detach().clone(), layer.lo.detach().clone(), layer.hi.detach().clone())
                            for n, layer in layers.items()}
                grads = torch.autograd.grad(loss, params)
                lr = (1.0 - step / iters) / iters
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(lr * torch.sign(g))
                    for layer in layers.values():
                        layer.lo.clamp_(0, 1)
                        layer.hi.clamp_(0, 1)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for n, layer in layers.items():
        layer.v, layer.lo, layer.hi = best[n]
        w, scale, zp = layer.weight()
        wl = layer.scheme.to_layout(w)
        shape = layer.scheme.param_shape(wl)
        qm = QuantLinear.from_module(linears[n], layer.scheme, a_scheme, fit_weight=False)
        qm.set_quantized_weight(w, scale.reshape(shape), zp.reshape(shape))
        replace_module(block, n, qm)
    return {"loss_start": start_loss, "loss_best": best_loss, "best_step": best_step}
