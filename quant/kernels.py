"""Real integer execution: QuantLinear layers converted to modules that keep integer weights and
run PyTorch's integer kernels, so the quantized model actually saves memory and time.

  Int8WeightOnlyLinear  int8 per-channel symmetric weights, float activations: torch._weight_int8pack_mm
  Int4WeightOnlyLinear  int4 per-group weights (group 32..256), float activations:
                        torch._weight_int4pack_mm_for_cpu on CPU, torch._weight_int4pack_mm on CUDA
                        (which takes bfloat16 activations and scales only: on CUDA the layer
                        rounds its input to bfloat16, a relative error of up to 2^-9)
  Int8DynamicLinear     int8 per-channel weights x int8 per-token symmetric activations quantized
                        on the fly: torch._int_mm (exact int32 accumulation), then both scales
  Int8StaticLinear      int8 per-channel weights x 8-bit per-tensor static activations (the
                        calibrated scale and zero point), on CPU: the x86 / fbgemm quantized
                        engine's fused linear (quantize input, int8 GEMM, float output in one op)

Each computes the same function as the fake-quantized layer it replaces, up to float rounding
(the tests bound the difference). Layers whose scheme has no kernel stay fake-quantized, and
`convert_to_int` says which and why.
"""
import warnings
import weakref

import torch
import torch.nn as nn

from .modules import QuantLinear, quant_modules, replace_module

INT4_GROUPS = (32, 64, 128, 256)


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, q: QuantLinear):
        super().__init__()
        self.register_buffer("weight_int8", q.weight_quant.int_repr(q.weight).contiguous())
        self.register_buffer("scale", q.weight_quant.scale.reshape(-1).to(q.weight.dtype).contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight_int8, self.scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, q: QuantLinear, inner_k_tiles: int = 2):
        super().__init__()
        s = q.weight_quant.scheme
        self.group_size = s.group_size
        codes = q.weight_quant.int_repr(q.weight).reshape(q.out_features, q.in_features).to(torch.int32)
        # the kernel computes w = (u - 8) * scale + zero with u in [0, 16); ours is (q - zp) * scale.
        # With u = q - qmin: (q - zp) * scale = (u - 8) * scale + (8 + qmin - zp) * scale.
        u = codes - s.qmin
        scale = q.weight_quant.scale.reshape(q.out_features, -1).float()
        zero = (8 + s.qmin - q.weight_quant.zero_point.reshape(q.out_features, -1).float()) * scale
        self.cuda = q.weight.is_cuda
        if self.cuda:
            packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack(packed_u8, inner_k_tiles))
        else:
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.cuda:
            y = torch._weight_int4pack_mm(x2.bfloat16(), self.weight_int4, self.group_size,
                                          self.scales_and_zeros.bfloat16()).to(x.dtype)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size,
                                                  self.scales_and_zeros.to(x.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class _LastInput:
    """The int8 codes of the last input quantized per token. Layers that read the same tensor
    (q/k/v after one norm, gate/up after another) then quantize it once: the cache holds a weak
    reference to the tensor and its in-place version counter, so a changed or new tensor misses."""
    ref, version, value = None, None, None

    @classmethod
    def get(cls, x):
        if cls.ref is not None and cls.ref() is x and cls.version == x._version:
            return cls.value
        return None

    @classmethod
    def put(cls, x, value):
        cls.ref, cls.version, cls.value = weakref.ref(x), x._version, value


def quantize_per_token(x2: torch.Tensor):
    """int8 codes and per-row scales: the arithmetic of QScheme(8, granularity="token")."""
    x_scale = (x2.abs().amax(-1, keepdim=True).float() / 127).clamp_(min=1e-12)
    x_int8 = (x2.float() * (1.0 / x_scale)).round_().clamp_(-128, 127).to(torch.int8)
    return x_int8, x_scale


class Int8DynamicLinear(nn.Module):
    def __init__(self, q: QuantLinear):
        super().__init__()
        self.register_buffer("weight_int8_t", q.weight_quant.int_repr(q.weight).t().contiguous())  # (in, out)
        self.register_buffer("scale", q.weight_quant.scale.reshape(1, -1).float().contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        cached = _LastInput.get(x)
        if cached is None:
            cached = quantize_per_token(x.reshape(-1, x.shape[-1]))
            _LastInput.put(x, cached)
        x_int8, x_scale = cached
        rows = x_int8.shape[0]
        if x_int8.is_cuda and rows <= 16:  # the CUDA kernel wants more than 16 rows
            x_int8 = torch.nn.functional.pad(x_int8, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(x_int8, self.weight_int8_t)[:rows]
        y = acc.float().mul_(x_scale).mul_(self.scale)  # (cheaper than int32 * float promotion)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def static_engine() -> str | None:
    """The CPU quantized engine that has the fused float-in / float-out int8 linear, or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), None)


class Int8StaticLinear(nn.Module):
    """y = (q(x) - zp_x) s_x  (W_q s_w)^T + b, with q(x) the calibrated per-tensor 8-bit code of x.
    Codes are mapped to the engine's unsigned domain (u = q - qmin, zp_u = zp - qmin): the same
    integers, so the same function.

    Chained (`emit` set by convert_to_int's `chain`): instead of a float y the layer returns the
    next layer's input codes, round(y / s_next) + zp_next, as a quint8 tensor from the engine's
    requantizing GEMM, and the next layer takes them as they are. That is what the fake-quant
    pair computes, except that the engine rounds y from its exact int32 sum, the fake-quant layer
    from a float sum: a code can differ by one where y / s_next lies within float error of a tie."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        a, w = q.act_quant.scheme, q.weight_quant.scheme
        self.x_scale = float(q.act_quant.scale)
        self.x_zero_point = int(q.act_quant.zero_point) - a.qmin
        self.engine = static_engine()
        codes = q.weight_quant.int_repr(q.weight).reshape(q.out_features, q.in_features)
        scale = q.weight_quant.scale.reshape(-1).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, the engine's kernels are not (yet)
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(codes.to(torch.int8).cpu(), scale.cpu(),
                                                          torch.zeros_like(scale, dtype=torch.long).cpu(), 0)
            torch.backends.quantized.engine = self.engine
            self._packed = torch.ops.quantized.linear_prepack(qw, None if q.bias is None else q.bias.detach().float().cpu())
        self.in_features, self.out_features = q.in_features, q.out_features
        self.emit = None  # (scale, zero point) of the next layer's input codes, when chained

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the packed weight is an engine object, not a tensor: save its int8 codes, scales and bias
        qw, bias = torch.ops.quantized.linear_unpack(self._packed)
        destination[prefix + "weight_int8"] = qw.int_repr()
        destination[prefix + "weight_scale"] = qw.q_per_channel_scales().float()
        if bias is not None:
            destination[prefix + "bias"] = bias

    def forward(self, x):
        torch.backends.quantized.engine = self.engine
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.emit is not None:
            qx = x2 if x2.is_quantized else torch.quantize_per_tensor(x2.float().contiguous(), self.x_scale,
                                                                       self.x_zero_point, torch.quint8)
            return torch.ops.quantized.linear(qx, self._packed, *self.emit).reshape(*shape, -1)
        if x2.is_quantized:  # codes from a chained layer: on this layer's grid, so re-quantizing them is exact
            x2 = x2.dequantize()
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x2.float().contiguous(), self.x_scale, self.x_zero_point, self._packed)
        return y.to(torch.float32 if x.is_quantized else x.dtype).reshape(*shape, -1)


def kernel_for(q: QuantLinear):
    """(module class, None) for a layer that has an integer kernel, else (None, reason)."""
    w, a = q.weight_quant.scheme, q.act_quant.scheme if q.act_quant is not None else None
    int8_channel = w.bits == 8 and w.symmetric and w.signed and w.granularity == "channel" and w.axis in (0, -2)
    if a is not None:
        if a.bits == 8 and a.granularity == "tensor" and not a.dynamic:
            if q.weight.is_cuda or static_engine() is None:
                return None, "static int8 activations need the CPU x86 / fbgemm quantized engine"
            if not int8_channel:
                return None, f"no W{w.bits}A8 static kernel for weights {w.describe()}"
            if q.act_quant.scale is None:
                return None, "activation scale not calibrated"
            return Int8StaticLinear, None
        if not (a.dynamic and a.symmetric and a.signed and a.bits == 8):
            return None, f"no kernel for activations {a.describe()} (needs int8 per-token symmetric or per-tensor static)"
        if int8_channel:
            return Int8DynamicLinear, None
        return None, f"no W{w.bits}A8 kernel for weights {w.describe()}"
    if int8_channel:
        return Int8WeightOnlyLinear, None
    if w.bits == 4 and w.granularity == "group":
        if w.group_size not in INT4_GROUPS:
            return None, f"int4 kernel needs a group size in {INT4_GROUPS}, got {w.group_size}"
        if q.in_features % w.group_size or q.in_features % 32:
            return None, f"int4 kernel needs in_features ({q.in_features}) to be a multiple of the group and of 32"
        if q.out_features % 16:
            return None, f"int4 kernel needs out_features ({q.out_features}) to be a multiple of 16"
        return Int4WeightOnlyLinear, None
    return None, f"no integer kernel for {w.describe()}"


@torch.no_grad()
def convert_to_int(model: nn.Module, chain: dict | None = None) -> dict:
    """Swap every QuantLinear that has a kernel for its integer module, in place.
    `chain` ({producer: consumer} layer names, both static int8) makes the producer hand its
    output to the consumer as int8 codes, skipping a float round trip; only valid where nothing
    but ReLU (which works on the codes) lies between them, e.g. {"fc1": "fc2"} for
    fc2(relu(fc1(x))). Returns {name: kernel class name, or 'fake-quant: <reason>'}."""
    report = {}
    for name, q in quant_modules(model).items():
        cls, reason = kernel_for(q)
        if cls is None:
            report[name] = f"fake-quant: {reason}"
            continue
        replace_module(model, name, cls(q))
        report[name] = cls.__name__
    for producer, consumer in (chain or {}).items():
        p, c = model.get_submodule(producer), model.get_submodule(consumer)
        if not (isinstance(p, Int8StaticLinear) and isinstance(c, Int8StaticLinear)):
            raise ValueError(f"chain {producer} -> {consumer}: both layers must have become Int8StaticLinear")
        p.emit = (c.x_scale, c.x_zero_point)
        report[producer] += f" -> int8 codes for {consumer}"
    return report

