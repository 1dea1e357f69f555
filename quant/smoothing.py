"""SmoothQuant and AWQ: per-input-channel scales folded into the preceding operation (the fold
itself, and which producer feeds which linears, live in arch.py).

For a group of linear layers that read the same input x (q/k/v after a norm, gate/up after a
norm, down after up, ...), y = W x = (W diag(s)) (diag(1/s) x): the weights' input columns are
multiplied by s and the producer of x (a LayerNorm / RMSNorm weight and bias, or the output
rows of a linear) is divided by s, which leaves the float model's function unchanged.

  SmoothQuant (Xiao et al. 2022): s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha) moves activation
  outliers into the weights so that per-tensor int8 activations lose less.
  AWQ (Lin et al. 2023): s = mean|x|^alpha with alpha searched to minimize the quantized
  layers' output error, then a per-group weight-clipping search.
"""
import torch
import torch.nn as nn

from . import distributed
from .arch import fold_scales, is_linear, scale_groups, weight_matrix
from .fake_quant import round_to_nearest
from .modules import QuantLinear, replace_module
from .scheme import QScheme
from .sequential import collect_inputs


@torch.no_grad()
def smooth_block(block: nn.Module, inputs: list, alpha: float = 0.5) -> dict:
    """SmoothQuant on one block, before its quantization. Returns {producer: scales}.
    Besides the paper's norm-fed inputs (q/k/v, gate/up), every exact linear-to-linear fold is
    smoothed too (up_proj -> down_proj): in SwiGLU models the down_proj input carries the largest
    outliers, and leaving it unsmoothed dominates the error of per-tensor int8 activations."""
    groups = scale_groups(block)
    first = {prod_name: next(iter(cons.items())) for prod_name, _, cons in groups}
    amax = {}

    def observe(name, x):
        a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        amax[name] = a if name not in amax else torch.maximum(amax[name], a)
    collect_inputs(block, inputs, {c_name: c for c_name, c in first.values()}, observe)
    for c_name, _ in first.values():  # (in block order on every rank; each rank has a batch: shard_batches)
        distributed.all_reduce_(amax[c_name], "max")
    applied = {}
    for prod_name, prod, cons in groups:
        a = amax[first[prod_name][0]].clamp(min=1e-5)
        w = torch.stack([weight_matrix(c).abs().amax(0).float() for c in cons.values()]).amax(0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        fold_scales(prod, cons, s)
        applied[prod_name] = s
    return applied


def _rows_sample(store: dict, name: str, x: torch.Tensor, max_rows: int) -> None:
    """The first max_rows input rows of a layer, kept per calibration batch (a list of each batch's
    rows), so that a data-parallel run can put the ranks' batches back in their order."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    have = store.setdefault(name, [])
    room = max_rows - sum(len(t) for t in have)
    if room > 0:
        have.append(x[:room])


def _sample(per_batch: list, max_rows: int) -> torch.Tensor:
    """The layer's row sample: its first max_rows rows in batch order, over every rank's batches."""
    if distributed.world() > 1:
        device = per_batch[0].device
        per_batch = [t.to(device) for t in distributed.gather_windows([t.cpu() for t in per_batch])]
    return torch.cat(per_batch)[:max_rows]


@torch.no_grad()
def awq_block(block: nn.Module, inputs: list, scheme_for, a_scheme=None, n_grid: int = 20, max_rows: int = 4096,
              clip_grid=tuple(1.0 - 0.05 * i for i in range(11)), skip=()) -> dict:
    """AWQ on one block: for each producer/consumers group, search alpha in [0, 1) for
    s = mean|x|^alpha minimizing the consumers' quantized output error, fold s; then for every
    linear, search per (output channel, group) the clip ratio minimizing that group's output
    error, and install the quantized weights. scheme_for(name, module) gives a layer's weight
    scheme. Returns {producer: alpha}."""
    linears = {n: m for n, m in block.named_modules() if is_linear(m) and n not in skip}
    xs = {}
    collect_inputs(block, inputs, linears, lambda name, x: _rows_sample(xs, name, x, max_rows))
    xs = {name: _sample(xs[name], max_rows) for name in linears}  # (in block order on every rank)
    alphas = {}
    for prod_name, prod, cons in scale_groups(block):
        cons = {n: c for n, c in cons.items() if n in linears}
        if not cons:
            continue
        x = xs[next(iter(cons))]
        x_mean = x.abs().mean(0).clamp(min=1e-8)
        ref = {n: x @ weight_matrix(c).float().t() for n, c in cons.items()}
        best = (float("inf"), 0.0, None)
        for k in range(n_grid):
            alpha = k / n_grid
            s = x_mean.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for n, c in cons.items():
                w = weight_matrix(c).float() * s
                q = round_to_nearest(w, scheme_for(n, c))[0] / s
                err += float((x @ q.t() - ref[n]).pow(2).mean())
            if err < best[0]:
                best = (err, alpha, s)
        fold_scales(prod, cons, best[2])
        for n in cons:  # the consumers' inputs are now x / s
            xs[n] = xs[n] / best[2]
        alphas[prod_name] = best[1]
    for name, m in linears.items():
        scheme = scheme_for(name, m)
        w = weight_matrix(m).float()
        ratio = _clip_search(w, xs[name], scheme, clip_grid)
        q, scale, zp = round_to_nearest(w, scheme, ratio)
        qm = QuantLinear.from_module(m, scheme, a_scheme, fit_weight=False)
        qm.set_quantized_weight(q, scale, zp)
        replace_module(block, name, qm)
    return alphas


def _clip_search(w: torch.Tensor, x: torch.Tensor, scheme: QScheme, grid, chunk: int = 256):
    """Per (output channel, group) ratio in `grid` minimizing that group's partial output error
    x_g w_g^T; 1.0 for per-tensor schemes (one range for everything)."""
    if scheme.granularity == "tensor":
        return 1.0
    grouped = scheme.granularity == "group"
    xl = scheme.to_layout(x) if grouped else x.unsqueeze(1)  # (n, groups, g)
    best = torch.ones(w.shape[0], xl.shape[1], device=w.device)
    for o in range(0, w.shape[0], chunk):  # output channels in chunks: memory n x chunk x groups
        wc = w[o:o + chunk]
        wl = scheme.to_layout(wc) if grouped else wc.unsqueeze(1)
        ref = torch.einsum("ngk,ogk->nog", xl, wl)
        best_err = torch.full(wl.shape[:2], float("inf"), device=w.device)
        for r in grid:
            q = round_to_nearest(wc, scheme, r)[0]
            ql = scheme.to_layout(q) if grouped else q.unsqueeze(1)
            err = (torch.einsum("ngk,ogk->nog", xl, ql) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[o:o + chunk] = torch.where(better, r, best[o:o + chunk])
    return best
