"""Quantization schemes: the integer range, the granularity, and how a float range becomes a
scale and a zero point.

A scheme says *how* a tensor is quantized; observers say *which range* to quantize.
Granularities:
  tensor   one scale for the whole tensor
  channel  one scale per index along `axis`
  group    one scale per `group_size` consecutive elements of the last (input) dimension;
           a last partial group is allowed (it is zero-padded, and zero is always exact)
  token    dynamic: one scale per row of the last dimension, computed on every call
"""
from dataclasses import asdict, dataclass

import torch

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

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group granularity needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with granularity='group' (got {self.granularity!r})")

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

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        g = {"tensor": "per-tensor", "channel": f"per-channel(axis={self.axis})",
             "group": f"g{self.group_size}", "token": "per-token"}[self.granularity]
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"

    # --- layout: how a tensor is viewed so that scale / zero point broadcast against it ---

    def check_shape(self, shape: torch.Size) -> None:
        if self.granularity == "channel" and not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"channel axis {self.axis} is out of range for a tensor of shape {tuple(shape)}")
        if self.granularity == "group" and self.group_size > shape[-1]:
            raise ValueError(
                f"group_size {self.group_size} is larger than the input dimension {shape[-1]} "
                f"(tensor shape {tuple(shape)}); use a smaller group or per-channel quantization")

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Group granularity: (..., n) -> (..., n_groups, group_size), zero-padding a partial last
        group. Every other granularity: x itself."""
        if self.granularity != "group":
            return x
        n, g = x.shape[-1], self.group_size
        pad = -n % g
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], (n + pad) // g, g)

    def from_layout(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.granularity != "group":
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


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, scheme: QScheme):
    """Scale (float32) and zero point (float32 holding integers) for the range [min_val, max_val].

    The range is widened to include 0 so that zero (padding, ReLU outputs) is exact.
    Symmetric: zero point at the middle of the integer range, scale = absmax / (qmax - zp), so
    absmax lands exactly on qmax and nothing positive is clipped. Asymmetric: the affine map of
    [min, max] onto [qmin, qmax], as in PyTorch's observers.
    """
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
