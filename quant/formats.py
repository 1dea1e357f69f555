"""Floating-point number formats: how a value is rounded onto each format's grid and how each
format's scales are made.

  int    the integer grid of QScheme (fake_quant.py owns its arithmetic)
  fp8    FP8 E4M3 (OCP "fn": no infinities, largest value 448), one float32 scale per tensor,
         channel or token: scale = absmax / 448
  mxfp4  OCP Microscaling MXFP4: E2M1 elements (+-0, 0.5, 1, 1.5, 2, 3, 4, 6), one E8M0
         (power-of-two) scale per block of 32: 2^(floor(log2 absmax) - 2), the spec's rule, which
         can clip the block's largest values to 6 x scale
  nvfp4  NVIDIA NVFP4: E2M1 elements, one E4M3 scale per block of 16 and a float32 tensor scale
         t = tensor absmax / (448 * 6): block scale = e4m3(block absmax / 6 / t) x t
Every rounding is round-to-nearest, ties to even, saturating at the largest finite value, as a
cast to the format does. Block formats take group granularity (weights: blocks along the input
dimension) or token granularity (activations: blocks along each row, scales made on every call,
and NVFP4's tensor scale from the row, so that a token's result does not depend on its batch).
"""
import torch

FORMATS = ("int", "fp8", "mxfp4", "nvfp4")
BITS = {"fp8": 8, "mxfp4": 4, "nvfp4": 4}
BLOCK = {"mxfp4": 32, "nvfp4": 16}  # elements per scale, fixed by the format
FP8_MAX, FP4_MAX = 448.0, 6.0


def to_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The E4M3 codes of x (or of x / scale): a cast to torch.float8_e4m3fn, saturating at +-448."""
    y = x.float().clamp(-FP8_MAX, FP8_MAX) if scale is None else (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn)


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto the E4M3 grid (what a cast to torch.float8_e4m3fn gives, saturating)."""
    return to_fp8(x).float()


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto the E2M1 grid. The grid's spacing is 0.5 below 2, 1 below 4 and 2 up to 6,
    so rounding |x| / spacing to the nearest integer (ties to even) is round-to-nearest-even on
    the grid: an even multiple is a value whose mantissa bit is 0."""
    a = x.float().abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign((a / step).round_().mul_(step).clamp_(max=FP4_MAX), x.float())


ROUND = {"fp8": round_fp8, "mxfp4": round_fp4, "nvfp4": round_fp4}


def format_scale(absmax: torch.Tensor, fmt: str, tensor_absmax=None) -> torch.Tensor:
    """The scale of each block (or channel, token, tensor) whose largest magnitude is `absmax`.
    NVFP4 also needs the largest magnitude of the whole tensor (broadcastable to absmax)."""
    absmax = absmax.float()
    if fmt == "fp8":
        return (absmax / FP8_MAX).clamp(min=1e-12)
    if fmt == "mxfp4":
        _, e = torch.frexp(absmax)  # absmax = m * 2^e with m in [0.5, 1): floor(log2 absmax) = e - 1
        e = torch.where(absmax > 0, e - 1 - 2, -127).clamp(-127, 127)  # E8M0 holds 2^-127 .. 2^127
        return torch.ldexp(torch.ones_like(absmax), e)
    if fmt == "nvfp4":
        t = (torch.as_tensor(tensor_absmax, dtype=torch.float32, device=absmax.device) / (FP8_MAX * FP4_MAX)).clamp(min=1e-30)
        return round_fp8(absmax / FP4_MAX / t) * t  # (a block of zeros may get scale 0: its values stay 0)
    raise ValueError(f"unknown number format {fmt!r}; choose from {FORMATS}")


def fake_quantize_format(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x / scale rounded onto the format's grid, times scale (scale broadcasts against x); the
    gradient passes straight through."""
    safe = torch.where(scale > 0, scale, 1.0)
    y = (ROUND[fmt](x.float() / safe) * scale).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (y - x).detach()
    return y
