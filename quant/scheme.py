"""Quantization schemes: the integer range, the granularity, and how a float range becomes a
scale and a zero point.

A scheme says *how* a tensor is quantized; observers say *which range* to quantize.
Granularities:
  tensor   one scale for the whole tensor
  channel  one scale per index along `axis`
  group    one scale per `group_size` consecutive elements of the last (input) dimension;
           a last partial group is allowed (it is zero-padded, and zero is always exact)
  token    dynamic: one scale per row of the last dimension, computed on every call; with a
           group_size, one per group_size consecutive elements of each row (per-token-group,
           the "1 x 128 block" activation scales of block FP8)

`format` is the grid the scaled values are rounded onto: "int" (the integer range of `bits`), or
a floating-point format of quant/formats.py: fp8 (E4M3), mxfp4 or nvfp4 (E2M1 in blocks of 32 /
16; group granularity with that block for weights, token granularity for activations, which
then get one scale per block of each row).
"""
from dataclasses import asdict, dataclass

import torch

from .formats import BITS, BLOCK, FORMATS, format_scale

GRANULARITIES = ("tensor", "channel", "group", "token")
MIN_BITS, MAX_BITS = 2, 8
# Smallest scale we emit: keeps 1/scale finite and quantization of a zero range well defined.
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class QScheme:
    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    format: str = "int"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" or (self.granularity == "token" and self.group_size is not None):
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"{self.granularity} granularity needs a positive integer group_size"
                                 + (" (or None: one scale per token)" if self.granularity == "token" else "")
                                 + f", got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with granularity 'group' or 'token' (got {self.granularity!r})")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format != "int":
            if self.bits != BITS[self.format] or not self.symmetric or not self.signed:
                raise ValueError(f"{self.format} is a signed, symmetric {BITS[self.format]}-bit format: "
                                 f"bits={BITS[self.format]}, symmetric and signed (got {self.describe_int()})")
            block = BLOCK.get(self.format)
            if block and (self.granularity, self.group_size) not in (("group", block), ("token", None)):
                raise ValueError(f"{self.format} has one scale per block of {block}: granularity='group' with "
                                 f"group_size={block} (weights) or 'token' without one (activations), got {self.granularity!r}"
                                 + (f" with group_size={self.group_size}" if self.group_size else ""))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def zero_point_int(self) -> int:
        """The zero point of a symmetric scheme: the middle of the integer range (0 when signed)."""
        return (self.qmin + self.qmax + 1) // 2

    @property
    def dynamic(self) -> bool:
        return self.granularity == "token"

    @property
    def block(self) -> int | None:
        """Elements per scale along the last dimension: the group (of a weight, or of each token),
        a block format's block on a token (each row in blocks), or None (one scale spans the row)."""
        if self.group_size is not None:
            return self.group_size
        return BLOCK.get(self.format) if self.granularity == "token" else None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.format == "int":  # (added after schemes were in recipe ids: absent at its default, so ids stand)
            del d["format"]
        return d

    def describe_int(self) -> str:
        g = {"tensor": "per-tensor", "channel": f"per-channel(axis={self.axis})",
             "group": f"g{self.group_size}", "token": "per-token" + (f"-g{self.group_size}" if self.group_size else "")}[self.granularity]
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"

    def describe(self) -> str:
        if self.format == "int":
            return self.describe_int()
        g = self.describe_int().split(" ", 2)[2]
        return {"fp8": f"fp8-e4m3 {g}", "mxfp4": f"mxfp4 {g}", "nvfp4": f"nvfp4 {g}"}[self.format]

    # --- layout: how a tensor is viewed so that scale / zero point broadcast against it ---

    def check_shape(self, shape: torch.Size) -> None:
        if self.granularity == "channel" and not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"channel axis {self.axis} is out of range for a tensor of shape {tuple(shape)}")
        if self.granularity == "group" and self.group_size > shape[-1] and self.format == "int":
            raise ValueError(
                f"group_size {self.group_size} is larger than the input dimension {shape[-1]} "
                f"(tensor shape {tuple(shape)}); use a smaller group or per-channel quantization")

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks (groups, or a block format's blocks of each token): (..., n) -> (..., n_blocks,
        block), zero-padding a partial last block. Otherwise x itself."""
        if self.block is None:
            return x
        n, g = x.shape[-1], self.block
        pad = -n % g
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], (n + pad) // g, g)

    def from_layout(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.block is None:
            return y
        return y.reshape(*y.shape[:-2], -1)[..., : shape[-1]]

    def rows(self, xl: torch.Tensor) -> torch.Tensor:
        """The laid-out tensor as a 2-D (one row per scale, elements) matrix."""
        if self.granularity == "tensor":
            return xl.reshape(1, -1)
        if self.granularity == "channel":
            return xl.movedim(self.axis, 0).reshape(xl.shape[self.axis], -1)
        return xl.reshape(-1, xl.shape[-1])  # group (rows of group_size) and token (rows of the last dim)

    def param_shape(self, xl: torch.Tensor) -> tuple:
        """Shape of scale / zero point that broadcasts against the laid-out tensor."""
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            shape = [1] * xl.dim()
            shape[self.axis] = xl.shape[self.axis]
            return tuple(shape)
        return (*xl.shape[:-1], 1)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values; cannot quantize it")


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, scheme: QScheme, tensor_absmax=None):
    """Scale (float32) and zero point (float32 holding integers) for the range [min_val, max_val].

    The range is widened to include 0 so that zero (padding, ReLU outputs) is exact.
    Symmetric: zero point at the middle of the integer range, scale = absmax / (qmax - zp), so
    absmax lands exactly on qmax and nothing positive is clipped. Asymmetric: the affine map of
    [min, max] onto [qmin, qmax], as in PyTorch's observers. A floating-point format: its own
    scale of the range's absmax (NVFP4's tensor scale from `tensor_absmax`, by default the
    largest absmax given), and zero points 0.
    """
    if scheme.format != "int":
        absmax = torch.maximum(-torch.as_tensor(min_val, dtype=torch.float32), torch.as_tensor(max_val, dtype=torch.float32))
        absmax = absmax.clamp(min=0)
        scale = format_scale(absmax, scheme.format, absmax.max() if tensor_absmax is None else tensor_absmax)
        return scale, torch.zeros_like(scale)
    min_val = torch.as_tensor(min_val, dtype=torch.float32).clamp(max=0)
    max_val = torch.as_tensor(max_val, dtype=torch.float32).clamp(min=0)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        zp_int = scheme.zero_point_int
        scale = torch.maximum(-min_val, max_val) / (qmax - zp_int)
        scale = scale.clamp(min=MIN_SCALE)
        zero_point = torch.full_like(scale, float(zp_int))
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return scale, zero_point


def row_qparams(rows: torch.Tensor, scheme: QScheme, ratio=1.0):
    """Scale / zero point of each row of a 2-D matrix (one row per scale) over the row's
    [min, max] shrunk by `ratio` (a number, or one value per row): the round-to-nearest range."""
    r = ratio.reshape(-1, 1) if torch.is_tensor(ratio) else ratio
    return qparams_from_range(rows.amin(1, keepdim=True) * r, rows.amax(1, keepdim=True) * r, scheme)
