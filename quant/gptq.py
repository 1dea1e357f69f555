"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs (H = 2 X X^T / n), so that the layer's output error ||WX - QX|| stays small.

Implemented: dampening (a fraction of the mean diagonal added to H), lazy block updates
(errors applied to the rest of the matrix once per block of columns), per-channel or per-group
scales (groups computed when the algorithm reaches them, from the already-updated weights), and
act-order (columns in order of decreasing Hessian diagonal; groups then keep their contiguous
columns and their scales are fixed up front from the original weights — "static groups" — so
that the checkpoint layout is unchanged), an optional MSE search of each scale's range (the
reference code's `mse` quantizer), and true-sequential order within a block: each layer's
Hessian comes from the inputs it gets once the layers before it are quantized. GPTAQ (Li et al.
2025) as an option: the objective becomes reproducing the *float* model's layer output from the
quantized model's drifted inputs, which GPTQ solves on a shifted target weight (gptaq_target).
"""
import copy

import torch

from . import distributed
from .fake_quant import fake_quantize_prepared
from .formats import fake_quantize_format
from .observers import _mse_best_ratio, check_search_format
from .scheme import QScheme, qparams_from_range, row_qparams


class Hessian:
    """H = 2/n * sum x x^T over every input row seen; given the float model's inputs for the same
    rows too, also D = 2/n * sum (x_float - x) x^T (GPTAQ). Each sequence's product is float32 and
    the sums over sequences are float64: how sequences are grouped into batches (or spread over the
    ranks of a data-parallel run) then changes H by ~1e-16, not float32's ~1e-7, and GPTQ's
    rounding decisions, which such small changes of H can flip, do not depend on it."""

    def __init__(self, in_features: int, device=None):
        self.S = torch.zeros(in_features, in_features, device=device, dtype=torch.float64)
        self.T = None
        self.n = 0

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]  # (sequences, rows, in)
        self.n += x.shape[0] * x.shape[1]
        for i in range(x.shape[0]):
            xi = x[i].float()
            if x_float is not None:
                dx = x_float.reshape(x.shape)[i].float() - xi
                self.T = torch.zeros_like(self.S) if self.T is None else self.T
                self.T += dx.t() @ xi
            self.S += xi.t() @ xi

    @property
    def H(self) -> torch.Tensor:
        return (self.S * (2.0 / max(self.n, 1))).float()

    @property
    def D(self) -> torch.Tensor | None:
        return None if self.T is None else (self.T * (2.0 / max(self.n, 1))).float()

    def reduce(self) -> None:
        """Sum over the ranks of a data-parallel run (quant.distributed)."""
        if distributed.world() == 1:
            return
        self.n = int(distributed.total(float(self.n)))
        for t in (self.S, self.T):
            if t is not None:
                distributed.all_reduce_(t)


def gptaq_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, percdamp: float, alpha: float = 1.0) -> torch.Tensor:
    """The weight GPTQ should quantize for GPTAQ's objective ||W X_float - Q X||^2, where X are the
    quantized model's inputs and X_float the float model's: with H = XX^T and D = (X_float - X)X^T,
    that objective is ||(W* - Q) X||^2 + const for the least-squares target W* = W (I + D H^-1),
    so GPTQ on W* with H minimizes it (H dampened as GPTQ dampens it). alpha < 1 moves only that
    fraction of the way (the reference implementation scales its correction by 0.25)."""
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    L = torch.linalg.cholesky(H)
    WD = W.float() @ D
    return W.float() + alpha * torch.cholesky_solve(WD.t(), L).t()


def _column_kernel(W: torch.Tensor):
    """The Triton kernel for the column loop where W lives on a CUDA device and Triton imports;
    None means the PyTorch loop."""
    if not W.is_cuda:
        return None
    try:
        from .gptq_kernel import columns
    except ImportError:
        return None
    return columns


def _params(w: torch.Tensor, scheme: QScheme, mse: bool | dict = False, col_weight: torch.Tensor | None = None):
    """Per-row scale / zero point of a (rows, cols) slice for the scheme's bits and symmetry: over
    the row's [min, max], or with `mse` (True, or the search's arguments: norm, min_ratio) over the
    shrunk range that minimizes the row's error, each column's error weighted by col_weight (cols,)
    where given."""
    if not mse:
        return row_qparams(w, scheme, 1.0)
    weights = None if col_weight is None else col_weight.expand_as(w)
    return row_qparams(w, scheme, _mse_best_ratio(w, weights, scheme, **({} if mse is True else mse)))


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QScheme, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, mse: bool | dict = False, hessian_mse: bool = False):
    """Quantize W (out, in) given H (in, in). Returns (Q, scale, zero_point), Q on the grid and
    the scales shaped as QScheme.param_shape of W's layout. With `mse` and hessian_mse, the search
    weighs each column's error by what GPTQ's own objective charges for rounding it, 1 / [H^-1]_jj
    in its processing order, instead of equally: where inputs have outlier channels, a group may
    then be clipped harder in the columns whose error the later columns can absorb."""
    if scheme.granularity not in ("tensor", "channel", "group") or (scheme.granularity == "channel" and scheme.axis not in (0, -2)):
        raise ValueError(f"GPTQ needs per-tensor, per-output-channel or per-group weights, got {scheme.describe()}")
    scheme.check_shape(W.shape)
    W = W.detach().clone().float()
    out_f, in_f = W.shape
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(in_f, device=H.device)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    L = torch.linalg.cholesky(H[perm][:, perm])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    # GPTQ's cost of rounding column j is err^2 / Hinv_jj^2 (in its order): the MSE search can weigh by it
    cost = Hinv.diagonal().pow(-2) if mse and hessian_mse else None
    cost_orig = cost[torch.argsort(perm)] if cost is not None else None

    g = scheme.group_size if scheme.granularity == "group" else None
    n_groups = -(-in_f // g) if g else 1
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    fmt = scheme.format != "int"
    if mse:
        check_search_format("mse", scheme.format)
    if scheme.granularity == "tensor":
        s, z = qparams_from_range(W.min(), W.max(), scheme)
        scales[:], zeros[:] = s, z
    elif fmt:  # a float format's scales come from the original weight up front (NVFP4's need the whole tensor)
        layout = lambda m: scheme.rows(scheme.to_layout(m))  # noqa: E731
        s, z = _params(layout(W), scheme, mse, None if cost_orig is None else layout(cost_orig.expand(out_f, -1)))
        scales[:], zeros[:] = s.view(out_f, n_groups), z.view(out_f, n_groups)
    elif scheme.granularity == "channel" or act_order:
        # fixed up front: per-channel, or static groups under act-order (all groups as rows of one
        # call where they tile the row: the MSE search is one pass instead of one per group)
        if not g or in_f % g == 0:
            s, z = _params(W.reshape(-1, g or in_f), scheme, mse,
                           None if cost_orig is None else cost_orig.view(-1, g or in_f).repeat(out_f, 1))
            scales[:], zeros[:] = s.view(out_f, n_groups), z.view(out_f, n_groups)
        else:
            for k in range(n_groups):
                s, z = _params(W[:, k * g:(k + 1) * g], scheme, mse, None if cost_orig is None else cost_orig[k * g:(k + 1) * g])
                scales[:, k], zeros[:, k] = s[:, 0], z[:, 0]
    lazy_groups = g is not None and not act_order and not fmt

    W = W[:, perm]

    grid = {}  # group -> the fake-quant operands of its current scales

    def operands(group):
        if group not in grid:
            s, z = scales[:, group], zeros[:, group]
            grid[group] = (1.0 / s, s, scheme.qmin - z, scheme.qmax - z)
        return grid[group]

    def rounded(w, group):
        if fmt:
            return fake_quantize_format(w, scales[:, group], scheme.format)
        return fake_quantize_prepared(w, *operands(group))

    Q = torch.zeros_like(W)
    cols = perm.tolist()  # read on the host once: indexing a device tensor per column syncs
    kernel = None if fmt else _column_kernel(W)  # (the Triton kernel rounds onto integer grids)
    if kernel is not None:
        Hinv = Hinv.contiguous()  # (cholesky's upper factor comes transposed: column-major)
        group_of = torch.tensor([c // g if g else 0 for c in cols], dtype=torch.int32, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        # runs of columns that share their scales: the block, cut where a lazy group starts
        cuts = [i for i in range(1, i2 - i1) if lazy_groups and cols[i1 + i] % g == 0]
        for a, b in zip([0] + cuts, cuts + [i2 - i1]):
            col = cols[i1 + a]
            if lazy_groups and col % g == 0:
                # this group's scales, from its columns as updated so far
                ahead = W1[:, a:a + g]
                if ahead.shape[1] < g:
                    ahead = torch.cat([ahead, W[:, i2:i2 + g - ahead.shape[1]]], 1)
                s, z = _params(ahead, scheme, mse, None if cost is None else cost[i1 + a:i1 + a + ahead.shape[1]])
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                grid.pop(col // g, None)
            if kernel is not None:
                kernel(W1, Q[:, i1:], Err1, Hinv1, scales, zeros, group_of[i1:], a, b, scheme.qmin, scheme.qmax)
                continue
            for i in range(a, b):
                w = W1[:, i]
                q = rounded(w, cols[i1 + i] // g if g else 0)
                Q[:, i1 + i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    if scheme.granularity == "group":
        return Q, scales.unsqueeze(-1), zeros.unsqueeze(-1)
    if scheme.granularity == "channel":
        return Q, scales, zeros  # (out, 1)
    return Q, scales[0, 0], zeros[0, 0]


def _result_shapes(W: torch.Tensor, scheme: QScheme) -> list:
    """The shapes of what gptq_quantize returns for W: Q, scale, zero point."""
    out_f, in_f = W.shape
    if scheme.granularity == "group":
        n_groups = -(-in_f // scheme.group_size)
        return [W.shape, (out_f, n_groups, 1), (out_f, n_groups, 1)]
    if scheme.granularity == "channel":
        return [W.shape, (out_f, 1), (out_f, 1)]
    return [W.shape, (), ()]


@torch.no_grad()
def gptq_block(block, inputs: list, scheme_for, a_scheme=None, skip=(), float_inputs: list | None = None,
               gptaq_alpha: float = 1.0, true_sequential: bool = True, **gptq_kwargs) -> None:
    """GPTQ on every linear of one decoder block, true-sequentially: for each group of layers in
    block order (q/k/v, o, gate/up, down), one pass over the calibration inputs through the block
    as quantized so far collects the group's Hessian, then its weights are quantized and the
    layers swapped for QuantLinears. Activation quantizers of the layers already done stay off
    (static ones are calibrated after the block is quantized): the Hessians see quantized
    weights and float activations. With float_inputs (the float model's inputs to this block,
    batch for batch), GPTAQ: each layer's float input comes from a float copy of the block, and
    the weight is quantized towards reproducing the float layer on it (gptaq_target).
    true_sequential=False: every group's Hessian from one pass over the block as it came (float
    weights), as llm-compressor's layer-by-layer pipeline does, then all groups quantized."""
    from .arch import is_linear, scale_groups, weight_matrix
    from .calibrate import activation_quant_disabled
    from .modules import QuantLinear, replace_module
    from .sequential import collect_inputs
    linears = {n: m for n, m in block.named_modules() if is_linear(m) and n not in skip}
    # layers reading the same normalized input (q/k/v, gate/up) share one Hessian
    owner = {n: n for n in linears}
    for _, _, consumers in scale_groups(block, norms_only=True):
        names = [n for n in consumers if n in linears]
        for n in names[1:]:
            owner[n] = names[0]
    float_block = copy.deepcopy(block) if float_inputs is not None else None
    leads = list(dict.fromkeys(owner.values()))  # group leaders, in block order

    def new_hessian(lead):
        return Hessian(weight_matrix(linears[lead]).shape[1], device=linears[lead].weight.device)
    hessians = {}
    if not true_sequential:  # (GPTAQ is refused by Recipe: it compares each layer's quantized input with its float one)
        hessians = {lead: new_hessian(lead) for lead in leads}
        with activation_quant_disabled(block):
            collect_inputs(block, inputs, {lead: block.get_submodule(lead) for lead in leads},
                           lambda name, x: hessians[name].add(x))
    solves = 0
    for lead in leads:
        hessian = hessians.get(lead)
        if hessian is None:  # true-sequential: from the block as quantized so far
            hessian = new_hessian(lead)
            with activation_quant_disabled(block):
                if float_block is None:
                    collect_inputs(block, inputs, {lead: block.get_submodule(lead)}, lambda name, x: hessian.add(x))
                else:  # batch by batch: the float layer input of a batch, then the quantized one
                    for inp, finp in zip(inputs, float_inputs):
                        got = []
                        collect_inputs(float_block, [finp], {lead: float_block.get_submodule(lead)},
                                       lambda name, x: got.append(x))
                        collect_inputs(block, [inp], {lead: block.get_submodule(lead)}, lambda name, x: hessian.add(x, got[0]))
        hessian.reduce()
        names = [n for n in linears if owner[n] == lead]
        schemes = {n: scheme_for(n, linears[n]) for n in names}
        # GPTQ treats every row alike given H, so the layers sharing H (q/k/v, gate/up) are
        # quantized as one matrix of stacked rows: one column loop instead of one per layer
        # (not with per-tensor scales: one scale would then span the layers)
        first = schemes[names[0]]
        stack = len(names) > 1 and first.granularity != "tensor" and all(sc == first for sc in schemes.values())
        for batch in [names] if stack else [[n] for n in names]:
            ws = [weight_matrix(linears[n]) for n in batch]
            W = torch.cat(ws) if stack else ws[0]
            solver = solves % distributed.world()  # one rank solves, in turn; the others receive its result
            solves += 1
            if distributed.rank() == solver:
                H = hessian.H
                if hessian.T is not None:
                    W = gptaq_target(W, H, hessian.D, gptq_kwargs.get("percdamp", 0.01), gptaq_alpha)
                q, scale, zp = gptq_quantize(W, H, schemes[batch[0]], **gptq_kwargs)
            else:
                q, scale, zp = (torch.empty(shape, device=W.device) for shape in _result_shapes(W, schemes[batch[0]]))
            for t in (q, scale, zp):
                distributed.broadcast_(t, solver)
            rows = [w.shape[0] for w in ws]
            parts = zip(q.split(rows), scale.split(rows), zp.split(rows)) if stack else [(q, scale, zp)]
            for name, (q, scale, zp) in zip(batch, parts):
                qm = QuantLinear.from_module(linears[name], schemes[name], a_scheme, fit_weight=False)
                qm.set_quantized_weight(q, scale, zp)  # (it copies scale and zero point: no views into the stack)
                replace_module(block, name, qm)
