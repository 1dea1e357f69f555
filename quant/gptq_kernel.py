"""GPTQ's column loop on a GPU as one Triton kernel per run of columns.

The loop is sequential over columns but independent across rows (every row's update reads only
its own values and the shared inverse-Hessian rows), so each program holds a tile of rows of the
block in registers and walks the columns itself: quantize the column, scale its error by the
diagonal, subtract error x Hinv row from the tile. In PyTorch that is about ten launches per
column (a few microseconds each, which is what GPTQ's time on a GPU was); here it is one launch
per block or group. The arithmetic is the PyTorch loop's, column by column (quant/gptq.py keeps
that loop as the reference and the CPU path).
"""
import triton
import triton.language as tl

_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + _ROUND - _ROUND rounds a float32 |x| < 2**22 half to even


@triton.jit
def _columns(W, Q, E, Hinv, SCALE, ZERO, GROUP, rows, width, ld_w, ld_q, ld_h, ld_p, qmin, qmax,
             START: tl.constexpr, STOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    live = r < rows
    tile_mask = live[:, None] & (c < width)[None, :]
    tile = tl.load(W + r[:, None] * ld_w + c[None, :], mask=tile_mask, other=0.0)
    for i in range(START, STOP):  # constants: a handful of variants per model, compiled once each
        w = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)
        g = tl.load(GROUP + i)
        s = tl.load(SCALE + r * ld_p + g, mask=live, other=1.0)
        z = tl.load(ZERO + r * ld_p + g, mask=live, other=0.0)
        # clamp before rounding: the bounds are integers, so this is round-then-clamp
        x = tl.minimum(tl.maximum(w * tl.math.div_rn(1.0, s), qmin - z), qmax - z)
        q = ((x + _ROUND) - _ROUND) * s
        h = tl.load(Hinv + i * ld_h + c, mask=c < width, other=0.0)  # row i: zero left of the diagonal
        err = tl.math.div_rn(w - q, tl.load(Hinv + i * ld_h + i))  # IEEE division, as in PyTorch
        tile = tile - err[:, None] * h[None, :]
        tl.store(Q + r * ld_q + i, q, mask=live)
        tl.store(E + r * ld_w + i, err, mask=live)
    tl.store(W + r[:, None] * ld_w + c[None, :], tile, mask=tile_mask)


def columns(W1, Q1, Err1, Hinv1, scales, zeros, group_of, start, stop, qmin, qmax):
    """Quantize columns start..stop-1 of the block W1 (rows, width; updated in place, as the
    PyTorch loop does): codes times scale into Q1[:, i], scaled errors into Err1[:, i]. scales and
    zeros are (rows, groups); group_of[i] is column i's group. All float32 and contiguous in
    the last dimension; Q1 may be a column slice of a wider matrix."""
    assert all(t.stride(-1) == 1 for t in (W1, Q1, Err1, Hinv1, scales, zeros)), "rows must be contiguous"
    rows, width = W1.shape
    block_c = triton.next_power_of_2(width)
    block_r = max(1, min(16, 4096 // block_c))  # a tile of at most 4096 floats in registers
    _columns[(triton.cdiv(rows, block_r),)](
        W1, Q1, Err1, Hinv1, scales, zeros, group_of, rows, width, W1.stride(0), Q1.stride(0),
        Hinv1.stride(0), scales.stride(0), float(qmin), float(qmax), START=start, STOP=stop, BLOCK_R=block_r, BLOCK_C=block_c)
