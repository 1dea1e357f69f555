"""Quantized modules, calibration, packing and checkpoints."""
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

from quant import (
    QScheme,
    QuantLinear,
    calibrate,
    float_size_bytes,
    load_quantized,
    pack,
    quant_modules,
    quantize_linears,
    quantized_size_bytes,
    save_quantized,
    unpack,
)
from quant.packing import packed_nbytes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_pack_layout_is_dense_little_endian():
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4).tolist() == [0x21, 0x43, 0x65, 0x87]
    assert pack(torch.arange(8), 3).numel() == 3  # 8 values x 3 bits = 3 bytes
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011, 0]
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="pack 2 to 8"):
        pack(torch.tensor([1]), 1)


def test_conv1d_wrapper_equals_linear_on_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs, weight (40, 24)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    lin = nn.Linear(40, 24)
    lin.weight.data = conv.weight.data.t().clone()
    lin.bias.data = conv.bias.data.clone()
    x = torch.randn(3, 5, 40)
    assert torch.allclose(conv(x), lin(x), atol=1e-5)  # the float layers agree
    for w, a in [(QScheme(4, granularity="group", group_size=8), None),
                 (QScheme(8, granularity="channel"), QScheme(8, granularity="token"))]:
        qc, ql = QuantLinear.from_module(conv, w, a), QuantLinear.from_module(lin, w, a)
        assert torch.equal(qc.weight, ql.weight)
        assert torch.equal(qc(x), ql(x))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def test_weight_only_forward_is_a_float_matmul_with_quantized_weight():
    model = mlp()
    x = torch.randn(7, 32)
    quantize_linears(model, QScheme(4, granularity="channel"))
    q = model[0]
    assert not q.weight.requires_grad
    # the weight was quantized once: at most 16 distinct values per output channel
    assert all(len(torch.unique(row)) <= 16 for row in q.weight)
    assert torch.equal(q(x), nn.functional.linear(x, q.weight, q.bias))


def test_swap_reports_and_respects_patterns():
    model = nn.ModuleDict({"body": mlp(), "lm_head": nn.Linear(10, 5)})
    swapped = quantize_linears(model, QScheme(8), skip=("lm_head",))
    assert sorted(swapped) == ["body.0", "body.2", "body.4"]
    assert isinstance(model["lm_head"], nn.Linear)
    model2 = mlp()
    assert sorted(quantize_linears(model2, QScheme(8), include=("2",))) == ["2"]


def test_group_fallback_to_per_channel():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 256))
    with pytest.raises(ValueError, match="larger than the input dimension"):
        quantize_linears(mlp(), QScheme(4, granularity="group", group_size=128))
    swapped = quantize_linears(model, QScheme(4, granularity="group", group_size=12), group_fallback=True)
    assert swapped["0"].granularity == "group"  # 16 = 12 + a partial group of 4
    assert swapped["1"].granularity == "channel"  # 8 < 12


def test_calibration_sets_static_scales_and_changes_outputs():
    model = mlp()
    xs = [torch.randn(16, 32) for _ in range(4)]
    float_out = model(xs[0])
    quantize_linears(model, QScheme(8, granularity="channel"), QScheme(8, symmetric=False))
    with pytest.raises(RuntimeError, match="calibrate"):
        model(xs[0])
    assert calibrate(model, xs, observer="minmax", progress=False) == 4
    for m in quant_modules(model).values():
        assert m.act_quant.scale.shape == () and m.act_quant.scale > 0
        assert not hasattr(m, "_forward_pre_hooks") or len(m._forward_pre_hooks) == 0
    # first layer sees the raw inputs: its scale covers exactly their range
    lo = min(float(x.min()) for x in xs)
    hi = max(float(x.max()) for x in xs)
    assert torch.allclose(model[0].act_quant.scale, torch.tensor((hi - lo) / 255))
    out = model(xs[0])
    assert not torch.equal(out, float_out) and torch.allclose(out, float_out, atol=0.05)


@pytest.mark.parametrize("w,a", [
    (QScheme(8, granularity="channel"), QScheme(8, symmetric=False)),
    (QScheme(4, symmetric=False, granularity="group", group_size=16), None),
    (QScheme(3, granularity="group", group_size=20), QScheme(8, granularity="token")),
    (QScheme(2, symmetric=False, signed=False), None),
])
def test_save_load_bit_identical_and_size_matches_file(tmp_path, w, a):
    model = mlp()
    xs = [torch.randn(16, 32) for _ in range(2)]
    quantize_linears(model, w, a)
    calibrate(model, xs, progress=False)
    out = model(xs[0])
    folder = save_quantized(model, str(tmp_path / "ckpt"))
    fresh = mlp()
    nn.init.zeros_(fresh[0].weight)
    load_quantized(fresh, folder)
    assert torch.equal(fresh(xs[0]), out)
    file_bytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert quantized_size_bytes(model) == file_bytes - header
    assert quantized_size_bytes(fresh) == quantized_size_bytes(model)
    assert quantized_size_bytes(model) < float_size_bytes(mlp())


def test_tied_weights_are_stored_once(tmp_path):
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "proj": nn.Linear(16, 16), "head": head})
    quantize_linears(model, QScheme(8), skip=("head",))
    assert float_size_bytes(model) < 2 * 50 * 16 * 4
    save_quantized(model, str(tmp_path / "t"))
    fresh = nn.ModuleDict({"emb": nn.Embedding(50, 16), "proj": nn.Linear(16, 16), "head": nn.Linear(16, 50, bias=False)})
    load_quantized(fresh, str(tmp_path / "t"))
    assert torch.equal(fresh["head"].weight, emb.weight) and torch.equal(fresh["emb"].weight, emb.weight)


def test_load_rejects_mismatched_model(tmp_path):
    model = mlp()
    quantize_linears(model, QScheme(8))
    save_quantized(model, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="does not match|expected a linear"):
        load_quantized(nn.Sequential(nn.Linear(32, 64), nn.ReLU()), str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError):
        load_quantized(mlp(), str(tmp_path / "nothing"))


def test_nan_weights_rejected_at_swap():
    model = mlp()
    model[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_linears(model, QScheme(8))


def test_qat_weight_gets_gradients_and_lsq_scale_learns():
    torch.manual_seed(0)
    for learnable in (False, True):
        layer = QuantLinear.from_module(nn.Linear(8, 4), QScheme(4, granularity="channel"), qat=True, learnable=learnable)
        y = layer(torch.randn(5, 8)).pow(2).sum()
        y.backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        if learnable:
            assert layer.weight_quant.scale.grad is not None
        layer.freeze()
        assert not layer.qat and not layer.weight.requires_grad


def test_quant_embedding_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(40, 24, padding_idx=0), "proj": nn.Linear(24, 8)})
    swapped = quantize_linears(model, QScheme(4, granularity="group", group_size=8), embeddings=True)
    assert sorted(swapped) == ["emb", "proj"]
    ids = torch.tensor([[0, 5, 39], [3, 3, 1]])
    emb = model["emb"]
    assert all(len(torch.unique(row[:8])) <= 16 for row in emb.weight)
    assert torch.equal(emb(ids), nn.functional.embedding(ids, emb.weight))
    save_quantized(model, str(tmp_path / "e"))
    fresh = nn.ModuleDict({"emb": nn.Embedding(40, 24, padding_idx=0), "proj": nn.Linear(24, 8)})
    load_quantized(fresh, str(tmp_path / "e"))
    assert torch.equal(fresh["proj"](fresh["emb"](ids)), model["proj"](model["emb"](ids)))
    assert fresh["emb"].padding_idx == 0


@pytest.mark.parametrize("w", [QScheme(8, granularity="channel"),
                               QScheme(4, symmetric=False, granularity="group", group_size=32),
                               QScheme(3, granularity="group", group_size=64)])
def test_saved_file_within_2_percent_of_ideal(tmp_path, w):
    """Ideal bytes, counted from the float model alone: bits/8 per quantized weight, a float32
    scale per row or group, a one-byte zero point per row or group when asymmetric, and every
    other tensor as it is (tied tensors once). The saved safetensors file, header included,
    must be within 2 % of it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ideal = 0
    for m in linears.values():
        rows = m.out_features * (m.in_features // w.group_size if w.granularity == "group" else 1)
        ideal += m.weight.numel() * w.bits / 8 + rows * 4 + (0 if w.symmetric else rows)
    quantized_ptrs = {m.weight.data_ptr() for m in linears.values()}
    seen = set()
    for t in model.state_dict().values():
        if t.data_ptr() not in quantized_ptrs and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            ideal += t.numel() * t.element_size()
    quantize_linears(model, w, skip=("lm_head",))
    folder = save_quantized(model, str(tmp_path / "q"))
    file_bytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert abs(file_bytes / ideal - 1) < 0.02, (file_bytes, ideal)
