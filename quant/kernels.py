"""Real integer execution: QuantLinear layers converted to modules that keep integer weights and
run PyTorch's integer kernels, so the quantized model actually saves memory and time.

  Int8WeightOnlyLinear  int8 per-channel symmetric weights, float activations: torch._weight_int8pack_mm
                        for up to 8 rows (on CPU in bfloat16); more rows: a GEMM on the codes
  Int4WeightOnlyLinear  int4 per-group weights: on CPU the project's own kernel (quant/csrc/int4.cpp,
                        float activations, any group that is a multiple of 32); on CUDA, or
                        without a C++ compiler, PyTorch's _weight_int4pack_mm(_for_cpu) (groups
                        32..256, bfloat16 activations)
  Int8DynamicLinear     int8 per-channel weights x int8 per-token symmetric activations quantized
                        on the fly: torch._int_mm (exact int32 accumulation; on CPUs without
                        AVX-512, where it is a scalar loop, exact float32 GEMMs: int_mm), then both scales
  Int8StaticLinear      int8 per-channel weights x 8-bit per-tensor static activations (the
                        calibrated scale and zero point), on CPU: one fused quantization of the
                        input, torch._int_mm, the zero point folded into the bias
  Fp8DynamicLinear      FP8 E4M3 per-channel weights x FP8 E4M3 per-token activations quantized on
                        the fly: torch._scaled_mm with row-wise scales (CUDA from sm_89, and CPU)

Each computes the same function as the fake-quantized layer it replaces, up to float rounding
(the tests bound the difference). Layers whose scheme has no kernel stay fake-quantized, and
`convert_to_int` says which and why.
"""
import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import native
from .arch import decoder_blocks, shared_inputs
from .formats import format_scale, to_fp8
from .modules import Quantizer, QuantLinear, quant_modules, replace_module

INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class IntLayer:
    """A quantized linear layer as integers: what the kernels are built from, either from a
    QuantLinear (`of`) or straight from a checkpoint's packed codes (no float weight on the way)."""
    codes: torch.Tensor | None  # integer (or E4M3) codes, laid out as the weight scheme lays out (out, in);
    # None for formats without a kernel
    weight_quant: Quantizer
    act_quant: Quantizer | None
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    @classmethod
    def of(cls, q: QuantLinear) -> "IntLayer":
        fmt = q.weight_quant.scheme.format
        if fmt == "fp8":  # (W / its per-channel scale, as E4M3 codes)
            codes = to_fp8(q.weight.detach(), q.weight_quant.scale.reshape(-1, 1).float())
        else:
            codes = q.weight_quant.int_repr(q.weight) if fmt == "int" else None
        return cls(codes, q.weight_quant, q.act_quant, q.bias, q.in_features, q.out_features)

    @property
    def is_cuda(self) -> bool:
        return self.weight_quant.scale.is_cuda


class Int8WeightOnlyLinear(nn.Module):
    """PyTorch's int8 weight-only kernel is fast only for a few rows (decoding), and on CPU only in
    bfloat16 (in float32 it was 10-80x slower than a float GEMM here; on an H100, 7x slower at
    512 rows). So up to DECODE_ROWS rows the layer uses it, on CPU with its input rounded to
    bfloat16 (relative error up to 2^-9); for more rows (prefill, batches) it runs a GEMM in the
    input's dtype against the int8 codes converted on the fly and scales the output (within
    ~1.3x of the float layer's time on CPU, exact up to float rounding)."""
    DECODE_ROWS = 8

    def __init__(self, q: IntLayer):
        super().__init__()
        self.register_buffer("weight_int8", q.codes.to(torch.int8).contiguous())
        self.register_buffer("scale", q.weight_quant.scale.reshape(-1).float().contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        # (on CPU that kernel crashed, in torch 2.13, on 2+ rows whose length is not a multiple of 16)
        if x2.shape[0] <= self.DECODE_ROWS and (x2.is_cuda or x2.shape[1] % 16 == 0):
            dtype = x.dtype if x2.is_cuda else torch.bfloat16
            y = torch._weight_int8pack_mm(x2.to(dtype), self.weight_int8, self.scale.to(dtype)).to(x.dtype)
        else:
            y = (x2 @ self.weight_int8.t().to(x.dtype)).mul_(self.scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """w = (q - zp) * scale per group, as 4-bit codes u = q - qmin in [0, 16).

    On CPU, with the project's own kernel (quant.native): float32 activations, exact up to float
    rounding. Up to GEMV_ROWS rows (decoding) it reads the packed codes once per call; for more
    rows (prefill) it unpacks them into a float weight for one GEMM, which then costs about what
    the float layer does. Without a C++ compiler, and on CUDA, PyTorch's int4 kernels: those take
    bfloat16 activations (the layer rounds its input, a relative error of up to 2^-9) and pack
    the codes their own way."""
    # reading the codes once per row still beat unpacking them for a GEMM at 32 rows on SmolLM2's
    # layers (the unpacked float weight is written and read again on every call)
    GEMV_ROWS = 32

    def __init__(self, q: IntLayer, inner_k_tiles: int = 2):
        super().__init__()
        s = q.weight_quant.scheme
        self.group_size = s.group_size
        codes = q.codes.reshape(q.out_features, q.in_features).to(torch.int32)
        u = codes - s.qmin
        scale = q.weight_quant.scale.reshape(q.out_features, -1).float()
        zero_point = q.weight_quant.zero_point.reshape(q.out_features, -1).float()
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        self.native = not q.is_cuda and native.library() is not None
        self.siblings = None  # (_Siblings, rows, its views' addresses) once fused with the layers that read the same input
        if self.native:
            # (q - zp) * scale = u * scale + (qmin - zp) * scale; the layout is quant/csrc/int4.cpp's
            n, k = u.shape
            u = u.reshape(n, k // 32, 2, 16).to(torch.uint8)
            self.register_buffer("weight_int4", (u[:, :, 0] | u[:, :, 1] << 4).reshape(n, k // 2).contiguous())
            self.register_buffer("scale", scale.contiguous())
            self.register_buffer("offset", ((s.qmin - zero_point) * scale).contiguous())
            return
        # PyTorch's kernels compute w = (u - 8) * scale + zero: (q - zp) * scale = (u - 8) * scale + (8 + qmin - zp) * scale
        zero = (8 + s.qmin - zero_point) * scale
        if q.is_cuda:  # (the two kernels pack differently)
            packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack(packed_u8, inner_k_tiles))
        else:
            self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles))
        # in bfloat16 once, here: the kernels take nothing else, and a conversion per call costs decode time
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16())

    def forward(self, x):
        # (decoding calls this ~200 times a token: every tensor op skipped when it would be a no-op
        # is a microsecond or two of the step)
        y = self._native(x) if self.native else self._torch(x.reshape(-1, x.shape[-1]))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias

    def _native(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        mine = self.weight_int4, self.scale, self.offset
        if self.siblings is not None and x2.shape[0] <= self.GEMV_ROWS:
            group, rows, pointers = self.siblings
            if all(t.data_ptr() == p for t, p in zip(mine, pointers)):  # (still the views: not moved or cast since)
                return group.output(x, x2)[:, rows].contiguous()
        return _int4_matmul(x2, *mine, self.group_size, self.GEMV_ROWS)

    def _torch(self, x2):
        # both run in bfloat16: the CUDA one takes nothing else, the CPU one is 20-100x slower in
        # float32 (a scalar loop; measured here)
        mm = torch._weight_int4pack_mm if self.weight_int4.is_cuda else torch._weight_int4pack_mm_for_cpu
        sz = self.scales_and_zeros  # (a model.to(dtype) may have converted it since)
        sz = sz if sz.dtype == torch.bfloat16 else sz.bfloat16()
        return mm(x2.bfloat16(), self.weight_int4, self.group_size, sz)


def _int4_matmul(x2, w, scale, offset, group_size, gemv_rows):
    """x2 @ W^T for the native layout: the codes read once per call (GEMV) up to gemv_rows rows,
    else unpacked into a float weight for one GEMM."""
    lib, threads = native.library(), torch.get_num_threads()
    if scale.dtype != torch.float32 or offset.dtype != torch.float32:  # (a model.to(dtype) may have cast them)
        scale, offset = scale.float().contiguous(), offset.float().contiguous()
    (n, half_k), rows = w.shape, x2.shape[0]
    if rows <= gemv_rows:
        y = torch.empty(rows, n)
        lib.int4_gemv(x2.data_ptr(), w.data_ptr(), scale.data_ptr(), offset.data_ptr(), y.data_ptr(),
                      rows, n, 2 * half_k, group_size, threads)
        return y
    weight = torch.empty(n, 2 * half_k)
    lib.int4_dequantize(w.data_ptr(), scale.data_ptr(), offset.data_ptr(), weight.data_ptr(),
                        n, 2 * half_k, group_size, threads)
    return x2 @ weight.t()


class _Siblings:
    """Native int4 layers that read the same input (q/k/v after one norm, gate/up after another)
    with their codes, scales and offsets in one buffer each, the layers' own being views of it:
    in decoding, the first of them to be called computes all their outputs in one kernel call
    (one pass over the weights, a third of the calls) and the others take theirs from it while
    the input is the same tensor, unchanged."""

    def __init__(self, layers: list):
        self.group_size, self.gemv_rows = layers[0].group_size, layers[0].GEMV_ROWS
        self.weight, self.scale, self.offset = (torch.cat([getattr(m, k) for m in layers])
                                                for k in ("weight_int4", "scale", "offset"))
        start = 0
        for m in layers:
            rows = slice(start, start + m.weight_int4.shape[0])
            start = rows.stop
            m.weight_int4, m.scale, m.offset = self.weight[rows], self.scale[rows], self.offset[rows]
            m.siblings = (self, rows, tuple(t.data_ptr() for t in (m.weight_int4, m.scale, m.offset)))
        self.last = _SameInput()

    def output(self, x, x2):
        y = self.last.get(x)
        if y is None:
            y = _int4_matmul(x2, self.weight, self.scale, self.offset, self.group_size, self.gemv_rows)
            self.last.put(x, y)
        return y


def fuse_siblings(model: nn.Module) -> None:
    """Fuse the native int4 layers of each decoder block that read the same input (quant.arch) and
    agree in group size and input width."""
    try:
        blocks = decoder_blocks(model)
    except ValueError:
        return
    for block in blocks:
        for consumers in shared_inputs(block):
            layers = list(consumers.values())
            if (all(isinstance(m, Int4WeightOnlyLinear) and m.native and m.siblings is None for m in layers)
                    and len({(m.group_size, m.weight_int4.shape[1]) for m in layers}) == 1):
                _Siblings(layers)


class _SameInput:
    """A value computed from a tensor, reused while the same tensor comes back unchanged: a weak
    reference to it and its in-place version counter, so a changed or new tensor misses."""

    def __init__(self):
        self.ref = self.version = self.value = None

    def get(self, x):
        if self.ref is not None and self.ref() is x and self.version == x._version:
            return self.value
        return None

    def put(self, x, value):
        self.ref, self.version, self.value = weakref.ref(x), x._version, value


# the int8 codes of the last input quantized per token: layers that read the same tensor (q/k/v
# after one norm, gate/up after another) then quantize it once
_last_codes = _SameInput()


def _int8_codes(x2: torch.Tensor, scale: float, zero_point: int, as_dtype=torch.int8) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, -128, 127) as a plain int8 tensor (or its bytes read as
    uint8), in one pass: quantize_per_tensor is the fused, vectorized kernel; its storage is read
    as plain integers without the copy int_repr makes (int_repr is slower than quantizing).
    Elsewhere than on CPU, the same arithmetic as separate ops."""
    if not x2.is_cpu:
        q = (x2.float() * (1.0 / scale)).round_().add_(zero_point).clamp_(-128, 127)
        return q.to(torch.int8).view(as_dtype)
    q = torch.quantize_per_tensor(x2.float().contiguous(), scale, zero_point, torch.qint8)
    return torch.empty(0, dtype=as_dtype, device=q.device).set_(q.untyped_storage(), 0, q.shape)


# Quantized tensors are deprecated (their kernels, used above only as a fused quantizer, remain);
# PyTorch warns once per process, so spend that warning here, silently.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)


@functools.cache
def _cpu_int8_gemm() -> bool:
    """Whether this CPU runs torch._int_mm as a real int8 GEMM: oneDNN's needs AVX-512 (VNNI, AMX);
    on an AVX2-only x86 CPU it falls back to a scalar loop, some 30x slower than a float32 GEMM."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) int8 @ b (k, n) int8 as int32, exactly: torch._int_mm on CUDA and where the CPU has an
    int8 GEMM; else float32 GEMMs over slices of at most 1024 of k, whose every partial sum is an
    integer of magnitude at most 1024 * 128 * 128 = 2^24, which float32 holds exactly."""
    if a.is_cuda or _cpu_int8_gemm():
        return torch._int_mm(a, b)
    out = None
    for k in range(0, a.shape[1], 1024):
        part = (a[:, k:k + 1024].float() @ b[k:k + 1024].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def quantize_per_token(x2: torch.Tensor):
    """int8 codes and per-row scales: the arithmetic of QScheme(8, granularity="token"). The rows
    are divided by their scales in one pass, then rounded, clamped and narrowed by the fused
    per-tensor quantization at scale 1: round(x * (1 / s)) either way, so the same codes."""
    x_scale = (x2.abs().amax(-1, keepdim=True).float() / 127).clamp_(min=1e-12)
    return _int8_codes(x2.float() * (1.0 / x_scale), 1.0, 0), x_scale


class Int8DynamicLinear(nn.Module):
    def __init__(self, q: IntLayer):
        super().__init__()
        self.register_buffer("weight_int8_t", q.codes.to(torch.int8).t().contiguous())  # (in, out)
        self.register_buffer("scale", q.weight_quant.scale.reshape(1, -1).float().contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        cached = _last_codes.get(x)
        if cached is None:
            cached = quantize_per_token(x.reshape(-1, x.shape[-1]))
            _last_codes.put(x, cached)
        x_int8, x_scale = cached
        rows = x_int8.shape[0]
        if x_int8.is_cuda and rows <= 16:  # the CUDA kernel wants more than 16 rows
            x_int8 = torch.nn.functional.pad(x_int8, (0, 0, 0, 17 - rows))
        acc = int_mm(x_int8, self.weight_int8_t)[:rows]
        y = acc.float().mul_(x_scale)  # (faster than int32 * float's promotion, measured)
        y = y.mul_(self.scale) if self.bias is None else torch.addcmul(self.bias, y, self.scale)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8StaticLinear(nn.Module):
    """y = (q(x) - zp) s_x (W_q s_w)^T + b, with q(x) the calibrated per-tensor 8-bit code of x.
    The codes are shifted into int8 (c = q - qmin - 128, so the grid becomes c - zc with
    zc = zp - qmin - 128) for torch._int_mm; the zero point's share, -zc * sum_k W_q, is a
    per-channel constant folded into the bias once:
        y = s_x s_w (c @ W_q^T) + [b - s_x s_w zc sum_k W_q].

    Chained (convert_to_int's `chain`, for consumer(relu(producer(x)))): instead of a float y the
    producer returns relu(y) as the consumer's int8 input codes, quantized once on the consumer's
    grid, their bytes handed over as a uint8 tensor so that the model's own ReLU leaves them as
    they are; the consumer reads the same bytes back as int8. That is what the fake-quant pair
    computes, except that the producer rounds y / s_next from its own float epilogue: a code can
    differ by one where y / s_next lies within float error of a tie."""

    def __init__(self, q: IntLayer):
        super().__init__()
        a = q.act_quant.scheme
        self.x_scale = float(q.act_quant.scale)
        self.x_zero_point = int(q.act_quant.zero_point) - a.qmin - 128  # zc, on the int8 grid
        codes = q.codes.reshape(q.out_features, q.in_features).to(torch.int8)
        w_scale = q.weight_quant.scale.reshape(-1).float()
        self.register_buffer("weight_int8", codes.contiguous())
        self.register_buffer("weight_scale", w_scale.contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        # derived from the above, so not saved
        out_scale = self.x_scale * w_scale
        bias = torch.zeros_like(w_scale) if q.bias is None else q.bias.detach().float()
        self.register_buffer("out_scale", out_scale, persistent=False)
        self.register_buffer("out_bias", bias - out_scale * self.x_zero_point * codes.sum(1, dtype=torch.int32).float(),
                             persistent=False)
        self.emit = None  # (scale, int8 zero point) of the consumer's input, when chained

    def forward(self, x):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype == torch.uint8:  # int8 codes from the chained producer, as bytes
            c = x2.view(torch.int8)
        else:
            c = _int8_codes(x2, self.x_scale, self.x_zero_point)
        y = torch.addcmul(self.out_bias, int_mm(c, self.weight_int8.t()), self.out_scale)
        if self.emit is not None:
            scale, zero_point = self.emit
            if zero_point != -128:  # (at -128, the clamp to the lowest code is the ReLU)
                y.relu_()
            return _int8_codes(y, scale, zero_point, as_dtype=torch.uint8).reshape(*shape, -1)
        return y.to(x.dtype if x.is_floating_point() else torch.float32).reshape(*shape, -1)


class Fp8DynamicLinear(nn.Module):
    """y = (x_q s_x) (W_q s_w)^T + b with W_q, x_q on the E4M3 grid: torch._scaled_mm multiplies the
    FP8 codes with float32 accumulation and applies both row-wise scales in its epilogue. The
    activation codes are made as the fake quantizer makes them (x / s_x, s_x = row absmax / 448,
    rounded by the cast), so only the summation order differs from the fake-quant layer; on CUDA
    the row-wise kernel writes bfloat16, which rounds the output."""

    def __init__(self, q: IntLayer):
        super().__init__()
        # _scaled_mm wants its second operand column-major: the (out, in) codes transposed is
        self.register_buffer("weight_fp8_t", q.codes.reshape(q.out_features, q.in_features).t())
        self.register_buffer("scale", q.weight_quant.scale.reshape(1, -1).float().contiguous())
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        cached = _last_fp8.get(x)
        if cached is None:
            x_scale = format_scale(x2.abs().amax(-1, keepdim=True), "fp8")
            cached = to_fp8(x2, x_scale), x_scale
            _last_fp8.put(x, cached)
        x_fp8, x_scale = cached
        out_dtype = torch.bfloat16 if x.is_cuda else torch.float32  # (CUDA's row-wise kernel writes bfloat16 only)
        y = torch._scaled_mm(x_fp8, self.weight_fp8_t, scale_a=x_scale, scale_b=self.scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


_last_fp8 = _SameInput()  # as _last_codes, for the FP8 codes of q/k/v's and gate/up's shared input


@functools.cache
def _cpu_rowwise_fp8() -> bool:
    """Whether torch._scaled_mm takes row-wise scales on the CPU (it does from PyTorch 2.13; 2.11 refused)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


def kernel_for(q: IntLayer):
    """(module class, None) for a layer that has an integer (or FP8) kernel, else (None, reason)."""
    w, a = q.weight_quant.scheme, q.act_quant.scheme if q.act_quant is not None else None
    if a is not None and a.group_size is not None:
        return None, f"no kernel takes activation scales per token group ({a.describe()}): the GEMMs here scale whole rows"
    if w.format == "fp8" and a is not None and a.format == "fp8":
        if not (w.granularity == "channel" and w.axis in (0, -2) and a.dynamic and a.granularity == "token"):
            return None, f"the FP8 kernel takes per-channel weights and dynamic per-token activations, not {w.describe()} x {a.describe()}"
        if q.in_features % 16 or q.out_features % 16:
            return None, f"the FP8 GEMM needs in and out features divisible by 16, got {q.in_features}, {q.out_features}"
        if q.is_cuda and torch.cuda.get_device_capability(q.weight_quant.scale.device) < (8, 9):
            return None, "FP8 matrix multiplication needs a GPU of compute capability 8.9 or newer"
        if not q.is_cuda and not _cpu_rowwise_fp8():
            return None, f"this PyTorch's ({torch.__version__}) CPU torch._scaled_mm takes per-tensor scales only"
        return Fp8DynamicLinear, None
    if any(sch is not None and sch.format != "int" for sch in (w, a)):
        return None, "no kernel for this floating-point format (FP8 W8A8 per-channel x per-token has one)"
    int8_channel = w.bits == 8 and w.symmetric and w.signed and w.granularity == "channel" and w.axis in (0, -2)
    if a is not None:
        if a.bits == 8 and a.granularity == "tensor" and not a.dynamic:
            if q.is_cuda:
                return None, "the static int8 kernel runs on CPU (on CUDA use per-token dynamic activations)"
            if not int8_channel:
                return None, f"no W{w.bits}A8 static kernel for weights {w.describe()}"
            if q.act_quant.scale is None:
                return None, "activation scale not calibrated"
            return Int8StaticLinear, None
        if not (a.dynamic and a.symmetric and a.signed and a.bits == 8):
            return None, f"no kernel for activations {a.describe()} (needs int8 per-token symmetric or per-tensor static)"
        if not int8_channel:
            return None, f"no W{w.bits}A8 kernel for weights {w.describe()}"
        if q.is_cuda and (q.in_features % 8 or q.out_features % 8):
            return None, f"the CUDA int8 GEMM needs in and out features divisible by 8, got {q.in_features}, {q.out_features}"
        return Int8DynamicLinear, None
    if int8_channel:
        return Int8WeightOnlyLinear, None
    if w.bits == 4 and w.granularity == "group":
        if not q.is_cuda and native.library() is not None:
            if w.group_size % 32 or q.in_features % w.group_size:
                return None, (f"int4 kernel needs in_features ({q.in_features}) to be a multiple of the group "
                              f"({w.group_size}), and the group a multiple of 32")
            return Int4WeightOnlyLinear, None
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
    `chain` ({producer: consumer} layer names, both static int8) is for consumer(relu(producer(x))),
    e.g. {"fc1": "fc2"} for fc2(relu(fc1(x))): the producer applies the ReLU itself and hands the
    consumer its input codes, skipping a float round trip. Only valid with exactly a ReLU between
    them (it is applied in the producer; the model's own ReLU then sees codes, which it leaves
    as they are). Returns {name: kernel class name, or 'fake-quant: <reason>'}."""
    report = {}
    for name, q in quant_modules(model).items():
        layer = IntLayer.of(q)
        cls, reason = kernel_for(layer)
        if cls is None:
            report[name] = f"fake-quant: {reason}"
            continue
        replace_module(model, name, cls(layer))
        report[name] = cls.__name__
    for producer, consumer in (chain or {}).items():
        p, c = model.get_submodule(producer), model.get_submodule(consumer)
        if not (isinstance(p, Int8StaticLinear) and isinstance(c, Int8StaticLinear)):
            raise ValueError(f"chain {producer} -> {consumer}: both layers must have become Int8StaticLinear")
        p.emit = (c.x_scale, c.x_zero_point)
        report[producer] += f" -> relu -> int8 codes for {consumer}"
    fuse_siblings(model)
    return report

