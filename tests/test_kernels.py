"""Integer kernels against the fake-quantized layers they replace."""
import copy
import os

import pytest
import torch
import torch.nn as nn
from conftest import DATA

from quant import QScheme, calibrate, native, quantize_linears
from quant import float_size_bytes as weight_bytes
from quant.kernels import (
    Fp8DynamicLinear,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8StaticLinear,
    Int8WeightOnlyLinear,
    _cpu_rowwise_fp8,
    convert_to_int,
)

CASES = [
    (QScheme(8, granularity="channel"), None, Int8WeightOnlyLinear),
    (QScheme(4, granularity="group", group_size=64), None, Int4WeightOnlyLinear),
    (QScheme(4, symmetric=False, granularity="group", group_size=32), None, Int4WeightOnlyLinear),
    (QScheme(4, symmetric=False, signed=False, granularity="group", group_size=128), None, Int4WeightOnlyLinear),
    (QScheme(8, granularity="channel"), QScheme(8, granularity="token"), Int8DynamicLinear),
    (QScheme(8, granularity="channel"), QScheme(8, symmetric=False, signed=False), Int8StaticLinear),
    (QScheme(8, granularity="channel"), QScheme(8, symmetric=False), Int8StaticLinear),
    (QScheme(8, granularity="channel"), QScheme(8), Int8StaticLinear),
    (QScheme(8, granularity="channel", format="fp8"), QScheme(8, granularity="token", format="fp8"), Fp8DynamicLinear),
]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w,a,cls", CASES)
def test_converted_matches_fake_quant(w, a, cls, device):
    if cls is Int8StaticLinear and device == "cuda":
        pytest.skip("the static int8 kernel is the CPU quantized engine's")
    if cls is Fp8DynamicLinear and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matrix multiplication needs compute capability 8.9")
    if cls is Fp8DynamicLinear and device == "cpu" and not _cpu_rowwise_fp8():
        pytest.skip("this PyTorch's CPU _scaled_mm takes per-tensor scales only")
    model = mlp().to(device)
    quantize_linears(model, w, a)
    if a is not None and not a.dynamic:
        calibrate(model, [torch.randn(64, 256, device=device) for _ in range(4)], progress=False)
    x = torch.randn(5, 9, 256, device=device)
    fake = copy.deepcopy(model)
    with torch.no_grad():
        report = convert_to_int(model)
        out, ref = model(x), fake(x)
        if cls is Fp8DynamicLinear and device == "cuda":
            # CUDA's row-wise FP8 kernel writes bfloat16: the first layer's rounded output moves some of the
            # second layer's E4M3 codes across a rounding boundary (a step of 1/8 to 1/16), so the layers are
            # compared one at a time, on the same input
            out, ref = model[0](x), fake[0](x)
    assert report == {"0": cls.__name__, "2": cls.__name__}
    assert isinstance(model[0], cls)
    # stated tolerance: float accumulation order only, 1e-5 of the output scale; PyTorch's int4
    # kernels (on CUDA) take bfloat16 activations (8 significant bits), and CUDA's row-wise FP8
    # kernel writes bfloat16, hence 1e-2 there
    tol = 1e-2 if cls in (Int4WeightOnlyLinear, Fp8DynamicLinear) and device == "cuda" else 1e-5
    assert torch.allclose(out, ref, rtol=0, atol=tol * float(ref.abs().max()))


needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C++ compiler for quant/csrc")


GEMV_ROWS = Int4WeightOnlyLinear.GEMV_ROWS


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 9, GEMV_ROWS, GEMV_ROWS + 1, 40])  # the GEMV, then unpack + GEMM
@pytest.mark.parametrize("w", [QScheme(4, granularity="group", group_size=96),
                               QScheme(4, symmetric=False, granularity="group", group_size=32),
                               QScheme(4, symmetric=False, signed=False, granularity="group", group_size=192)])
def test_native_int4_matches_fake_quant(w, rows):
    """Our CPU kernel on shapes PyTorch's refuses (a group of 96 or 192, 42 output rows: a block
    of 4 rows plus a remainder), against the fake-quantized layer, float rounding only."""
    torch.manual_seed(rows)
    model = nn.Sequential(nn.Linear(576, 42)).eval()
    quantize_linears(model, w)
    x = torch.randn(rows, 576)
    with torch.no_grad():
        ref = model(x)
        assert convert_to_int(model) == {"0": "Int4WeightOnlyLinear"}
        assert model[0].native
        out = model(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_int4_without_compiler_uses_pytorch_kernel(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    model = mlp()
    quantize_linears(model, QScheme(4, symmetric=False, granularity="group", group_size=64))
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = model(x)
        assert convert_to_int(model) == {"0": "Int4WeightOnlyLinear", "2": "Int4WeightOnlyLinear"}
        assert not model[0].native
        out = model(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-2 * float(ref.abs().max()))  # bfloat16 activations
    model = nn.Sequential(nn.Linear(64, 40))
    quantize_linears(model, QScheme(4, granularity="group", group_size=32))
    assert "multiple of 16" in convert_to_int(model)["0"]


def test_fp8_kernel_codes_and_refusals():
    """The FP8 layer holds the E4M3 codes of W / s_w (what a float8_e4m3fn cast gives), a quarter of
    float32's bytes; schemes the kernel does not take stay fake-quantized with the reason."""
    from quant.formats import round_fp8
    if not _cpu_rowwise_fp8():
        pytest.skip("this PyTorch's CPU _scaled_mm takes per-tensor scales only")
    model = mlp()
    fp8_w, fp8_a = QScheme(8, granularity="channel", format="fp8"), QScheme(8, granularity="token", format="fp8")
    quantize_linears(model, fp8_w, fp8_a)
    w, s = model[0].weight.detach(), model[0].weight_quant.scale.reshape(-1, 1)
    assert convert_to_int(model) == {"0": "Fp8DynamicLinear", "2": "Fp8DynamicLinear"}
    codes = model[0].weight_fp8_t.t()
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float(), round_fp8(w / s))
    for w_s, a_s, why in [(fp8_w, None, "floating-point format"),
                          (QScheme(8, granularity="tensor", format="fp8"), fp8_a, "per-channel weights"),
                          (fp8_w, QScheme(4, granularity="token", format="nvfp4"), "floating-point format")]:
        model = nn.Sequential(nn.Linear(64, 48))
        quantize_linears(model, w_s, a_s)
        assert why in convert_to_int(model)["0"]
    model = nn.Sequential(nn.Linear(64, 40))
    quantize_linears(model, fp8_w, fp8_a)
    assert "divisible by 16" in convert_to_int(model)["0"]


def test_unsupported_layers_stay_fake_quant_with_reason():
    model = mlp()
    quantize_linears(model, QScheme(3, granularity="group", group_size=32), QScheme(8, symmetric=False))
    calibrate(model, [torch.randn(4, 256)], progress=False)
    report = convert_to_int(model)
    assert all(v.startswith("fake-quant:") for v in report.values())
    model = nn.Sequential(nn.Linear(784, 16))
    quantize_linears(model, QScheme(4, granularity="group", group_size=128))
    assert "multiple of the group" in convert_to_int(model)["0"]
    for fmt in ("int", "fp8"):  # int8 (CPU) and FP8 GEMMs scale whole rows, not groups of a token
        model = nn.Sequential(nn.Linear(64, 48))
        quantize_linears(model, QScheme(8, granularity="channel", format=fmt),
                         QScheme(8, granularity="token", group_size=32, format=fmt))
        assert "per token group" in convert_to_int(model)["0"]


def test_int_weights_take_less_memory():
    model = mlp()
    float_bytes = weight_bytes(model)
    quantize_linears(model, QScheme(4, granularity="group", group_size=64))
    convert_to_int(model)
    assert weight_bytes(model) < 0.25 * float_bytes


def test_stories260k_int8_dynamic_matches():
    """End to end, float rounding differences can flip a downstream activation's rounding by one
    step, so the model-level tolerance is looser than a layer's: 1 % mean relative error, and
    the same next-token prediction almost everywhere."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "stories260K")).eval()
    quantize_linears(model, QScheme(8, granularity="channel"), QScheme(8, granularity="token"), skip=("lm_head",))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        report = convert_to_int(model)
        out = model(ids).logits
    assert set(report.values()) == {"Int8DynamicLinear"}
    assert float((out - ref).abs().mean() / ref.abs().mean()) < 0.01
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.98


def test_shared_input_quantized_once_and_changes_invalidate():
    """q/k/v-style layers reading one tensor reuse its int8 codes; an in-place change or a new
    tensor must not."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 32)) for _ in range(2)]
    for m in layers:
        quantize_linears(m, QScheme(8, granularity="channel"), QScheme(8, granularity="token"))
        convert_to_int(m)
    x = torch.randn(20, 64)
    ref = [m(x.clone()) for m in layers]
    assert all(torch.equal(m(x), r) for m, r in zip(layers, ref))
    x.mul_(3)  # same object, new contents
    assert torch.allclose(layers[1](x), 3 * ref[1] - 2 * layers[1][0].bias, rtol=1e-4, atol=1e-4)
    y = torch.randn(20, 64)
    assert torch.equal(layers[0](y), layers[0](y.clone()))


@pytest.mark.parametrize("a", [QScheme(8, symmetric=False, signed=False), QScheme(8, symmetric=False), QScheme(8)])
def test_chained_static_layers_match_fake_quant(a):
    """fc2(relu(fc1(x))) with fc1 handing int8 codes to fc2: the same function as the fake-quant
    pair, up to a hidden code flipped by one at a float tie (bounded, and rare)."""
    model = mlp(1)
    quantize_linears(model, QScheme(8, granularity="channel"), a)
    calibrate(model, [torch.randn(64, 256) for _ in range(4)], progress=False)
    x = torch.randn(512, 256)
    with torch.no_grad():
        ref = model(x)
        s_hidden = float(model[2].act_quant.scale)
        one_code = s_hidden * float(model[2].weight.abs().max())
        report = convert_to_int(model, chain={"0": "2"})
        out = model(x)
    assert report["0"] == "Int8StaticLinear -> relu -> int8 codes for 2"
    assert not out.is_quantized and out.dtype == torch.float32
    diff = (out - ref).abs()
    assert float((diff > 1e-4 * float(ref.abs().max())).float().mean()) < 0.01
    assert float(diff.max()) <= 2 * one_code
    with pytest.raises(ValueError, match="Int8StaticLinear"):
        m2 = mlp()
        quantize_linears(m2, QScheme(8, granularity="channel"), QScheme(8, granularity="token"))
        convert_to_int(m2, chain={"0": "2"})


@pytest.mark.parametrize("rows", [1, Int8WeightOnlyLinear.DECODE_ROWS, Int8WeightOnlyLinear.DECODE_ROWS + 1])
def test_int8_weight_only_decode_and_prefill_paths(rows):
    """Few rows take PyTorch's int8 kernel in bfloat16 (8 significant bits of the input), more rows
    a float GEMM on the codes (float rounding only): each within its stated tolerance."""
    model = mlp()
    quantize_linears(model, QScheme(8, granularity="channel"))
    x = torch.randn(rows, 256)
    with torch.no_grad():
        ref = model(x)
        convert_to_int(model)
        out = model(x)
    tol = 1e-2 if rows <= Int8WeightOnlyLinear.DECODE_ROWS else 1e-5
    assert torch.allclose(out, ref, rtol=0, atol=tol * float(ref.abs().max()))


def test_int8_weight_only_rows_of_odd_length_take_the_gemm():
    """torch._weight_int8pack_mm crashed the process (CPU, torch 2.13) on 2-8 rows of length 172
    (stories260K's MLP): such layers use the GEMM on the codes, exact to float rounding."""
    layer = nn.Linear(172, 40)
    model = nn.Sequential(layer)
    quantize_linears(model, QScheme(8, granularity="channel"))
    x = torch.randn(3, 172)
    with torch.no_grad():
        ref = model(x)
        convert_to_int(model)
        out = model(x)
    assert isinstance(model[0], Int8WeightOnlyLinear)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@needs_compiler
def test_stories260k_int4_siblings_fused_decode_matches_fake_quant():
    """q/k/v and gate/up each become one kernel call in decoding (their codes in one buffer, the
    layers' own views of it); the decoded logits equal the fake-quantized model's (float rounding
    only), a changed input is recomputed, and a layer whose buffers were replaced runs alone."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "stories260K")).eval()
    quantize_linears(model, QScheme(4, symmetric=False, granularity="group", group_size=32), skip=("lm_head",))
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))

    def decode(m):
        with torch.no_grad():
            past = m(ids[:, :-1], use_cache=True).past_key_values
            return m(ids[:, -1:], past_key_values=past, use_cache=True).logits
    ref = decode(model)
    convert_to_int(model)
    attn, mlp_ = model.model.layers[0].self_attn, model.model.layers[0].mlp
    group = attn.q_proj.siblings[0]
    assert group is attn.k_proj.siblings[0] is attn.v_proj.siblings[0] and mlp_.gate_proj.siblings[0] is mlp_.up_proj.siblings[0]
    assert attn.o_proj.siblings is None and attn.k_proj.weight_int4.untyped_storage().data_ptr() == group.weight.data_ptr()
    out = decode(model)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    x = torch.randn(1, 1, attn.q_proj.weight_int4.shape[1] * 2)
    with torch.no_grad():
        k = attn.k_proj(x)
        assert torch.equal(attn.v_proj(x), attn.v_proj(x.clone()))  # from the cache = computed alone
        x.mul_(2)
        assert torch.allclose(attn.k_proj(x), 2 * k, rtol=1e-5, atol=1e-6)
        v = attn.v_proj(x)
        attn.v_proj.scale, attn.v_proj.offset = attn.v_proj.scale * 2, attn.v_proj.offset * 2  # new tensors
        assert torch.allclose(attn.v_proj(x), 2 * v, rtol=1e-5, atol=1e-6)  # not the group's stale output


def test_int_mm_is_exact_on_either_path(monkeypatch):
    """The int8 GEMM equals int32 arithmetic exactly, through torch._int_mm and through the float32
    slices that stand in for it on CPUs without AVX-512 (extreme codes, k over one slice)."""
    from quant import kernels
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (40, 2500), dtype=torch.int8)
    b = torch.randint(-128, 128, (2500, 24), dtype=torch.int8)
    a[0], b[:, 0] = -128, -128  # the largest products, all of one sign: a row sum of 2500 * 2^14
    ref = a.long() @ b.long()
    for fast in (True, False):
        monkeypatch.setattr(kernels, "_cpu_int8_gemm", lambda fast=fast: fast)
        out = kernels.int_mm(a, b)
        assert out.dtype == torch.int32 and torch.equal(out.long(), ref)
