"""Quantized modules: the Quantizer (one tensor's fake quantization), QuantLinear (a Linear or
GPT-2 Conv1D with a weight quantizer and an optional input-activation quantizer) and
`quantize_linears`, which swaps them into any model by name.

PTQ (the default): the weight is fake-quantized once when the module is built, so a
weight-only forward is exactly a float F.linear. QAT (`qat=True`): the float weight is kept
and fake-quantized on every forward so that gradients reach it.
"""
import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import in_out, is_conv1d, is_linear, weight_matrix
from .fake_quant import dequantize, fake_quantize, fake_quantize_fractional, is_fractional, lsq_fake_quantize, quantize
from .formats import fake_quantize_format
from .observers import make_observer
from .scheme import QScheme, check_finite, qparams_from_range


class Quantizer(nn.Module):
    """Fake-quantizes tensors under one scheme. Static schemes use a stored scale and zero point
    (set from an observer); per-token schemes compute them on every call; `learnable=True`
    makes the scale an LSQ parameter."""

    def __init__(self, scheme: QScheme, learnable: bool = False):
        super().__init__()
        self.scheme = scheme
        self.learnable = learnable
        self.enabled = True
        self.fractional = False  # zero points that are not integers (HQQ): rounding adds them first
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale = scale.detach().float().clone()
        for name in ("scale", "zero_point"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        if self.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.fractional = is_fractional(self.zero_point)
        if self.fractional and (self.learnable or self.scheme.symmetric):
            raise ValueError("fractional zero points are for asymmetric, fixed (not learned) weight scales")

    def fit(self, x: torch.Tensor, observer: str = "minmax", **observer_kwargs) -> None:
        """Set scale / zero point from one tensor (a weight)."""
        obs = make_observer(observer, self.scheme, **observer_kwargs)
        obs.observe(x)
        scale, zp = obs.qparams()
        self.set_qparams(scale.to(x.device), zp.to(x.device))

    def _qparams(self, xl: torch.Tensor):
        if self.scheme.dynamic:
            with torch.no_grad():
                # (NVFP4's tensor scale: each token's own absmax, so a row does not depend on its batch)
                row_absmax = xl.abs().amax((-2, -1), keepdim=True) if self.scheme.format == "nvfp4" else None
                return qparams_from_range(xl.amin(-1, keepdim=True), xl.amax(-1, keepdim=True), self.scheme, row_absmax)
        if self.scale is None:
            raise RuntimeError(f"quantizer ({self.scheme.describe()}) has no scale: calibrate it first")
        return self.scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scheme
        xl = s.to_layout(x)
        scale, zp = self._qparams(xl)
        if self.learnable:
            # LSQ gradient scale: 1 / sqrt(elements per scale * positive levels)
            positive_levels = s.qmax - s.zero_point_int if s.symmetric else s.qmax - s.qmin
            g = (xl.numel() / scale.numel() * positive_levels) ** -0.5
            y = lsq_fake_quantize(xl, scale, zp, s.qmin, s.qmax, g)
        elif s.format != "int":
            y = fake_quantize_format(xl, scale, s.format)
        elif self.fractional:
            y = fake_quantize_fractional(xl, scale, zp, s.qmin, s.qmax)
        else:
            if scale.numel() == 1 and scale.device.type == "cpu":
                # Python numbers make the elementwise passes cheaper; .item() costs no device sync on CPU
                scale, zp = scale.item(), zp.item()
            y = fake_quantize(xl, scale, zp, s.qmin, s.qmax)
        return s.from_layout(y, x.shape)

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x in the laid-out shape (for packing)."""
        if self.scheme.format != "int":
            raise ValueError(f"{self.scheme.describe()} has no integer codes: checkpoints and exports hold integer formats")
        xl = self.scheme.to_layout(x.detach())
        scale, zp = self._qparams(xl)
        return quantize(xl, scale, zp, self.scheme.qmin, self.scheme.qmax)

    def dequantize(self, q: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return self.scheme.from_layout(dequantize(q, self.scale, self.zero_point), shape)

    def extra_repr(self) -> str:
        return self.scheme.describe() + (", lsq" if self.learnable else "")


class QuantLinear(nn.Module):
    """y = F.linear(act_quant(x), weight_quant(W), b). W is always held as (out, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w_scheme: QScheme,
                 a_scheme: QScheme | None = None, w_observer: str = "minmax", qat: bool = False,
                 learnable: bool = False, fit_weight: bool = True, **observer_kwargs):
        super().__init__()
        if w_scheme.dynamic:
            raise ValueError("weights cannot use dynamic per-token quantization")
        check_finite(weight, "weight")
        w_scheme.check_shape(weight.shape)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format), requires_grad=qat)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=qat)
        self.weight_quant = Quantizer(w_scheme, learnable=learnable)
        self.act_quant = None if a_scheme is None else Quantizer(a_scheme, learnable=learnable and not a_scheme.dynamic)
        self.qat = qat
        self.conv1d = False  # whether the layer it replaces stored its weight as (in, out); exports need it
        self.w_observer, self.observer_kwargs = w_observer, observer_kwargs  # QAT re-fits the range with them
        if fit_weight:  # False only when a checkpoint supplies the quantized weight and scales
            self.weight_quant.fit(self.weight, w_observer, **observer_kwargs)
            if not qat:
                self.freeze()

    @classmethod
    def from_module(cls, module: nn.Module, w_scheme, a_scheme=None, **kwargs) -> "QuantLinear":
        if not is_linear(module):
            raise TypeError(f"cannot quantize a {type(module).__name__}: only nn.Linear and GPT-2 Conv1D")
        q = cls(weight_matrix(module), module.bias, w_scheme, a_scheme, **kwargs)
        q.conv1d = is_conv1d(module)
        return q

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the weight by its quantized value once; forwards then cost a float matmul."""
        self.weight.data = self.weight_quant(self.weight).detach()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if self.weight_quant.learnable:  # the learned step size becomes a fixed buffer
            self.weight_quant.learnable = False
            self.weight_quant.set_qparams(self.weight_quant.scale, self.weight_quant.zero_point)
        self.qat = False

    @torch.no_grad()
    def set_quantized_weight(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install a weight computed elsewhere (GPTQ, AWQ) with its scales. Fake-quantizing it
        once more is a no-op for a weight on the grid, and guarantees that it is on it."""
        self.weight_quant.set_qparams(scale.to(self.weight.device), zero_point.to(self.weight.device))
        self.weight.data = self.weight_quant(weight.to(self.weight)).detach()
        self.weight.requires_grad_(False)
        self.qat = False

    def current_weight(self) -> torch.Tensor:
        """The weight a forward uses: already quantized after PTQ, fake-quantized now under QAT."""
        if not self.qat:
            return self.weight
        if not self.weight_quant.learnable:
            with torch.no_grad():  # STE QAT tracks the weights' current range, with the configured observer
                self.weight_quant.fit(self.weight, self.w_observer, **self.observer_kwargs)
        return self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.current_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, qat={self.qat}"


class QuantEmbedding(QuantLinear):
    """Weight-only quantized nn.Embedding. Its (num_embeddings, dim) table has the layout of a
    Linear weight: rows are the channels and groups run along the embedding dimension, so the
    schemes, freezing and checkpoints of QuantLinear apply as they are."""

    def __init__(self, weight: torch.Tensor, w_scheme: QScheme, padding_idx: int | None = None, **kwargs):
        super().__init__(weight, None, w_scheme, None, **kwargs)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.current_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"num={self.out_features}, dim={self.in_features}, qat={self.qat}"


def layer_scheme(scheme: QScheme, in_features: int) -> QScheme:
    """The scheme for a layer: per-channel when its input is smaller than the group (a block
    format's block is part of the format: a narrower layer gets one zero-padded block)."""
    if scheme.granularity == "group" and scheme.group_size > in_features and scheme.format == "int":
        return QScheme(scheme.bits, scheme.symmetric, scheme.signed, "channel", axis=0)
    return scheme


def _apply_input_transform(module, args):
    return (module.input_transform(args[0]), *args[1:])


def attach_input_transform(module: nn.Module, transform: nn.Module) -> None:
    """Apply `transform` to the module's input before anything else sees it (its other hooks,
    calibration, its activation quantizer): an online rotation. It stays with the layer when
    quantize_linears replaces the module."""
    module.input_transform = transform
    module.register_forward_pre_hook(_apply_input_transform, prepend=True)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    if getattr(old, "input_transform", None) is not None:
        attach_input_transform(new, old.input_transform)
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_linears(model: nn.Module, w_scheme: QScheme, a_scheme: QScheme | None = None, *,
                     include=("*",), skip=(), group_fallback: bool = False, embeddings: bool = False,
                     overrides: dict | None = None, **kwargs) -> dict:
    """Swap every nn.Linear / Conv1D whose name matches `include` and no `skip` pattern (fnmatch
    globs, e.g. "lm_head" or "*.mlp.*") for a QuantLinear, in place; with embeddings=True, every
    matching nn.Embedding too (weight-only: a_scheme does not apply to token ids).

    With group_fallback, a layer whose input dimension is smaller than the group size gets
    per-channel quantization instead of an error. `overrides` ({name: QScheme}) gives a layer
    its own weight scheme instead of w_scheme. Returns {name: weight scheme used}.
    """
    swapped = {}
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    targets = [(n, m) for n, m in model.named_modules()
               if n and (isinstance(m, kinds) or is_linear(m)) and _matches(n, include) and not _matches(n, skip)]
    for name, module in targets:
        in_features = module.weight.shape[1] if isinstance(module, nn.Embedding) else in_out(module)[0]
        scheme = (overrides or {}).get(name, w_scheme)
        scheme = layer_scheme(scheme, in_features) if group_fallback else scheme
        if isinstance(module, nn.Embedding):
            qmodule = QuantEmbedding(module.weight, scheme, module.padding_idx, **kwargs)
        else:
            qmodule = QuantLinear.from_module(module, scheme, a_scheme, **kwargs)
        replace_module(model, name, qmodule)
        swapped[name] = scheme
    return swapped


def quant_modules(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
