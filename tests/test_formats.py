"""Floating-point number formats (quant/formats.py) against independent references: ml_dtypes'
float8_e4m3fn / float4_e2m1fn casts, the OCP MX scale rule and the NVFP4 two-level scale in
closed form, and the formats through the quantizers, GPTQ, recipes and ptq_llm end to end."""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptq_llm
from cli import UsageError
from quant import QScheme, QuantLinear, Recipe, quantize_model, quantized_size_bytes, save_quantized
from quant.checkpoint import layer_nbytes
from quant.formats import fake_quantize_format, format_scale, round_fp4, round_fp8
from quant.gptq import gptq_quantize
from quant.modules import Quantizer
from tests.test_llm import args_for, stories  # noqa: F401  (the stories260K fixture)

MX = QScheme(4, granularity="group", group_size=32, format="mxfp4")
NV = QScheme(4, granularity="group", group_size=16, format="nvfp4")
FP8 = QScheme(8, granularity="channel", format="fp8")
FP8_G = QScheme(8, granularity="group", group_size=16, format="fp8")  # (--w8_group_size)


def cast(x: torch.Tensor, dtype) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(dtype).astype(np.float32))


def grid_and_midpoints(dtype) -> torch.Tensor:
    """Every finite value of a format, and each midpoint between neighbours (where ties go) with
    the floats just either side of it."""
    if dtype == ml_dtypes.float8_e4m3fn:
        values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    else:
        values = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
        values = np.concatenate([values, -values])
    values = np.unique(values[np.isfinite(values)])
    mids = (values[1:] + values[:-1]) / 2
    return torch.from_numpy(np.concatenate([values, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]))


def test_fp8_rounding_equals_the_e4m3_cast():
    x = torch.cat([grid_and_midpoints(ml_dtypes.float8_e4m3fn), torch.randn(20000) * 50, torch.randn(2000) * 1e-3])
    assert torch.equal(round_fp8(x), cast(x, ml_dtypes.float8_e4m3fn))
    assert torch.equal(round_fp8(x), x.to(torch.float8_e4m3fn).float())  # and PyTorch's own cast
    assert round_fp8(torch.tensor([1e4, -1e4])).tolist() == [448.0, -448.0]  # saturates (a cast would give NaN)


def test_fp4_rounding_equals_the_e2m1_cast():
    x = torch.cat([grid_and_midpoints(ml_dtypes.float4_e2m1fn), torch.randn(20000) * 3, torch.tensor([7.0, -100.0, 5.0, 0.25])])
    assert torch.equal(round_fp4(x), cast(x, ml_dtypes.float4_e2m1fn))
    # ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; beyond 6 saturates
    assert round_fp4(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])).tolist() == [0, 1, 1, 2, 2, 4, 4, 6]


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-30, 1e30))
def test_mx_scale_is_the_ocp_rule(absmax):
    # OCP MX v1.0, 6.3: X = 2^(floor(log2(max|V|)) - emax_elem), emax_elem = 2 for E2M1
    scale = float(format_scale(torch.tensor([absmax]), "mxfp4")[0])
    e = np.floor(np.log2(np.float32(absmax)))
    assert scale == 2.0 ** (e - 2)
    assert 4 <= np.float32(absmax) / scale < 8


def test_mx_block_quantization_matches_a_reference():
    torch.manual_seed(0)
    w = torch.randn(8, 96) * torch.logspace(-3, 2, 8).unsqueeze(1)
    q = Quantizer(MX)
    q.fit(w)
    blocks = w.reshape(8, 3, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    ref = (cast(blocks / scale, ml_dtypes.float4_e2m1fn) * scale).reshape(8, 96)
    assert torch.equal(q(w), ref)
    assert torch.equal(q.scale, scale)


def test_nv_block_quantization_matches_a_reference():
    torch.manual_seed(1)
    w = torch.randn(4, 64) * 3
    q = Quantizer(NV)
    q.fit(w)
    t = w.abs().max() / (448 * 6)
    blocks = w.reshape(4, 4, 16)
    block_scale = cast(blocks.abs().amax(-1, keepdim=True) / 6 / t, ml_dtypes.float8_e4m3fn)
    scale = block_scale * t
    ref = (cast(blocks / scale, ml_dtypes.float4_e2m1fn) * scale).reshape(4, 64)
    assert torch.allclose(q.scale, scale, rtol=0, atol=0)
    assert torch.equal(q(w), ref)
    # the largest block's scale is exactly 448 x t: E4M3's top value
    assert float(block_scale.max()) == 448.0


def test_fp8_channel_quantization_error_bound():
    torch.manual_seed(2)
    w = torch.randn(16, 50) * torch.rand(16, 1) * 10
    q = Quantizer(FP8)
    q.fit(w)
    assert torch.allclose(q.scale.squeeze(1), w.abs().amax(1) / 448)
    err = (q(w) - w).abs() / w.abs().clamp(min=1e-6)
    normal = w.abs() / q.scale >= 2 ** -6  # E4M3 normals carry 3 mantissa bits: relative error <= 2^-4
    assert float(err[normal].max()) <= 2 ** -4 + 1e-6
    assert torch.equal(q(q(w)), q(w))  # on the grid, fake quantization is a no-op


def test_dynamic_token_blocks_do_not_depend_on_the_batch():
    torch.manual_seed(3)
    x = torch.randn(3, 5, 40) * torch.logspace(-2, 2, 3).view(3, 1, 1)
    for fmt in ("mxfp4", "nvfp4", "fp8"):
        q = Quantizer(QScheme(8 if fmt == "fp8" else 4, granularity="token", format=fmt))
        y = q(x)
        assert y.shape == x.shape
        assert torch.equal(y[1:2], q(x[1:2]))  # each token scaled by its own blocks alone
        for i in range(5):
            assert torch.equal(y[2, i], q(x[2, i:i + 1])[0])


@pytest.mark.parametrize("fmt", ["fp8", "int"])
def test_token_group_activations_are_each_group_alone(fmt):
    """Per-token-group scales (block FP8's 1 x g activations): every group of g channels of a token
    is quantized as if it were a token of its own; a partial last group gets its own scale too."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 40) * torch.tensor([1e-3] * 16 + [1.0] * 16 + [1e3] * 8)  # groups 6 decades apart
    scheme = QScheme(8, symmetric=fmt != "int", granularity="token", group_size=16, format=fmt)
    y = Quantizer(scheme)(x)
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        g = x[..., lo:hi].reshape(-1, hi - lo)
        if fmt == "fp8":  # E4M3 through ml_dtypes' cast, scale = the group's absmax / 448
            s = g.abs().amax(1, keepdim=True) / 448
            ref = cast(g / s, ml_dtypes.float8_e4m3fn) * s
        else:  # PyTorch's own asymmetric int8 fake quant, the affine map of each group's [min, max]
            mn, mx = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
            s = (mx - mn) / 255
            zp = (-128 - torch.round(mn / s)).clamp(-128, 127).int()
            ref = torch.fake_quantize_per_channel_affine(g, s, zp, 0, -128, 127)
        torch.testing.assert_close(y[..., lo:hi].reshape(-1, hi - lo), ref, rtol=0, atol=0)
    per_token = Quantizer(QScheme(8, symmetric=fmt != "int", granularity="token", format=fmt))(x)
    small = slice(0, 16)  # per token they sit far below the row's step; per group, on their own grid
    assert (y - x)[..., small].abs().sum() < (per_token - x)[..., small].abs().sum() / 10


def test_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    y = fake_quantize_format(x, format_scale(x.detach().abs().amax(-1, keepdim=True), "mxfp4"), "mxfp4")
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("scheme", [MX, NV, FP8, FP8_G], ids=["mxfp4", "nvfp4", "fp8", "fp8-g16"])
def test_gptq_in_a_float_format_lands_on_its_grid_and_beats_rtn(scheme):
    torch.manual_seed(4)
    X = torch.randn(2048, 64) @ torch.randn(64, 64)  # correlated inputs: where error feedback helps
    W = torch.randn(48, 64)
    H = 2 * X.t() @ X / len(X)
    Q, scale, zp = gptq_quantize(W, H, scheme)
    layer = QuantLinear(W, None, scheme, fit_weight=False)
    layer.set_quantized_weight(Q, scale, zp)
    assert torch.equal(layer.weight, Q)  # fake-quantizing GPTQ's weight again changes nothing
    rtn = QuantLinear(W, None, scheme).weight
    loss = lambda q: float(((q - W) @ X.t()).pow(2).sum())  # noqa: E731
    assert loss(Q) < 0.9 * loss(rtn)
    if scheme.format == "fp8":  # its MSE search: scales no smaller than min-max's, no larger error
        Qm, scale_m, _ = gptq_quantize(W, H, scheme, mse=True)
        assert (scale_m >= scale).all() and (scale_m < 2 * scale).all() and loss(Qm) <= loss(Q) * 1.05
    else:
        with pytest.raises(ValueError, match="own rule"):
            gptq_quantize(W, H, scheme, mse=True)


def test_fp8_mse_search_is_the_best_of_every_grid_alignment():
    """Per row, the scale absmax * r / 448 for r in 1, 1 + 1/32, .., 2 - 1/32 with the least squared
    error of a cast to torch.float8_e4m3fn (computed here by brute force); it beats min-max (r = 1)
    on heavy-tailed rows; with H = I GPTQ has nothing to compensate and is that search's RTN."""
    torch.manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((64, 256))

    def alignments(rows):  # each row's squared error at every widening ratio, by casts
        absmax = rows.abs().amax(1, keepdim=True)
        return torch.stack([((rows / s).to(torch.float8_e4m3fn).float() * s - rows).pow(2).sum(1)
                            for s in (absmax * (1 + k / 32) / 448 for k in range(32))], 1)
    layer = QuantLinear(W, None, FP8, w_observer="mse")
    errs = alignments(W)
    got = (layer.weight - W).pow(2).sum(1)
    assert torch.allclose(got, errs.min(1).values, rtol=1e-5)
    assert got.sum() < 0.9 * errs[:, 0].sum()  # min-max's alignment is rarely the best one
    # per group of 16 (--w8_group_size): each group its own best alignment, less error than per row
    grouped = QuantLinear(W, None, FP8_G, w_observer="mse")
    got_g = (grouped.weight - W).reshape(-1, 16).pow(2).sum(1)
    assert torch.allclose(got_g, alignments(W.reshape(-1, 16)).min(1).values, rtol=1e-5)
    assert got_g.sum() < got.sum()
    Q, scale, _ = gptq_quantize(W, torch.eye(256), FP8, mse=True)
    assert torch.equal(Q, layer.weight) and torch.allclose(scale, layer.weight_quant.scale)
    Recipe(weight=FP8, w_observer="mse", method="gptq", method_args={"hessian_mse": True})  # accepted
    # a static per-tensor FP8 activation: the search over the observed histogram widens the range too
    from quant.observers import make_observer
    x = torch.distributions.StudentT(3.0).sample((64, 512))
    a_fp8 = QScheme(8, granularity="tensor", format="fp8")
    observers = [make_observer(name, a_fp8) for name in ("minmax", "mse")]
    for o in observers:
        o.observe(x)
    (s_mm, _), (s_mse, _) = (o.qparams() for o in observers)
    assert s_mm <= s_mse < 2 * s_mm
    err = lambda s: float((fake_quantize_format(x, s, "fp8") - x).pow(2).sum())  # noqa: E731
    assert err(s_mse) <= err(s_mm) * 1.001
    with pytest.raises(ValueError, match="min_ratio"):
        QuantLinear(W, None, FP8, w_observer="mse", min_ratio=0.5)


def test_scheme_and_recipe_rules():
    assert "format" not in QScheme(4, granularity="group", group_size=32).to_dict()  # int: the ids of before stand
    assert Recipe(weight=MX).weight.to_dict()["format"] == "mxfp4"
    nv_tokens = QScheme(4, granularity="token", format="nvfp4")
    assert Recipe.from_json(Recipe(weight=NV, activation=nv_tokens).to_json()).activation == nv_tokens
    bad = [lambda: QScheme(4, format="fp8"), lambda: QScheme(4, granularity="group", group_size=64, format="mxfp4"),
           lambda: QScheme(4, False, granularity="group", group_size=16, format="nvfp4"),
           lambda: QScheme(4, granularity="tensor", format="mxfp4"), lambda: QScheme(8, format="fp6"),
           lambda: Recipe(weight=MX, method="awq"), lambda: Recipe(weight=NV, w_observer="mse"),
           lambda: Recipe(weight=FP8, activation=QScheme(8, format="fp8"), a_observer="entropy"),
           lambda: QScheme(4, granularity="token", group_size=16, format="nvfp4"),  # the block is the format's
           lambda: QScheme(8, granularity="token", group_size=0), lambda: QScheme(8, granularity="channel", group_size=8)]
    for make in bad:
        with pytest.raises(ValueError):
            make()
    # a layer narrower than the block gets one zero-padded block, not per-channel integers
    small = QuantLinear(torch.randn(4, 20), None, MX)
    assert small.weight_quant.scheme == MX and small.weight_quant.scale.shape == (4, 1, 1)


def test_sizes_and_refused_checkpoints(stories, tmp_path):  # noqa: F811
    assert layer_nbytes(10, 64, MX) * 8 / 640 == 4.25  # 4-bit codes + one E8M0 byte per 32
    assert layer_nbytes(10, 64, NV) == 320 + 40 + 4  # + one E4M3 byte per 16 + a float32 tensor scale
    assert layer_nbytes(10, 64, FP8) == 640 + 40
    from llm import load_model
    model = load_model(stories, "cpu", torch.float32)
    quantize_model(model, Recipe(weight=MX), progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    floats = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.endswith(("proj.weight",)))
    assert quantized_size_bytes(model) == floats + sum(layer_nbytes(m.out_features, m.in_features, MX) for m in linears)
    with pytest.raises(ValueError, match="integer formats"):
        save_quantized(model, str(tmp_path / "ckpt"))


@pytest.mark.parametrize("source", ["stories", "tiny_gpt2"])
def test_format_rows_end_to_end(source, request, tmp_path):
    model = request.getfixturevalue(source)
    common = ["--seq_len", "64", "--eval_samples", "6", "--calib_samples", "4", "--method", "rtn", "gptq"]
    rows = ptq_llm.main(args_for(model, tmp_path, *common, "--bits", "8", "--act", "none", "static", "dynamic",
                                 "--w_format", "fp8", "--a_format", "fp8"))
    for fmt in ("mxfp4", "nvfp4"):
        rows += ptq_llm.main(args_for(model, tmp_path, *common, "--bits", "4", "--act", "none", "dynamic", "--act_w_bits", "4",
                                      "--a_bits", "4", "--w_format", fmt, "--a_format", fmt))
    grouped = ptq_llm.main(args_for(model, tmp_path, *common[:-1], "--bits", "8", "--act", "dynamic", "--w_format", "fp8",
                                    "--a_format", "fp8", "--a_group_size", "16", "--w8_group_size", "16"))[-1]
    assert (grouped["granularity"], grouped["group_size"], grouped["w_format"]) == ("group", 16, "fp8")
    per_token = next(r for r in rows if (r["method"], r["act"]) == ("rtn", "dynamic"))
    assert grouped["a_group_size"] == 16 and Recipe.from_json(grouped["recipe"]).activation.block == 16
    assert np.isfinite(grouped["kld"])
    assert grouped["recipe_id"] != per_token["recipe_id"] and per_token["a_group_size"] is None
    fp32 = rows[0]["perplexity"]
    got = {(r["method"], r["w_format"], r["a_format"], r["act"]): r for r in rows if r["method"] != "fp32"}
    assert len(got) == 2 * (3 + 2 + 2)
    for (method, wf, af, act), r in got.items():
        assert np.isfinite(r["perplexity"]) and r["w_format"] == wf and r["a_format"] == (af if act != "none" else "")
        assert r["group_size"] == {"fp8": None, "mxfp4": 32, "nvfp4": 16}[wf]
        if wf == "fp8" and act in ("none", "dynamic") and source == "stories":
            # on a trained model 8 bits stay closer to float than 4 (the KL divergence: not noisy on 6 windows)
            assert abs(r["perplexity"] / fp32 - 1) < 0.03, (method, r["perplexity"], fp32)
            assert r["kld"] < got[method, "mxfp4", "mxfp4" if act != "none" else "", act]["kld"] / 4
    with pytest.raises(UsageError, match="use --act dynamic"):
        ptq_llm.main(args_for(model, tmp_path, "--act", "static", "--a_format", "mxfp4", "--a_bits", "4"))
    with pytest.raises(UsageError, match="--w8_group_size"):
        ptq_llm.main(args_for(model, tmp_path, "--w8_group_size", "-1"))
    with pytest.raises(UsageError, match="--a_group_size"):
        ptq_llm.main(args_for(model, tmp_path, "--act", "static", "--a_format", "fp8", "--a_group_size", "16"))
    with pytest.raises(UsageError, match="drop --save_model"):
        ptq_llm.main(args_for(model, tmp_path, "--bits", "8", "--act", "none", "--w_format", "fp8", "--save_model"))
    with pytest.raises(UsageError, match="4-bit format"):
        ptq_llm.main(args_for(model, tmp_path, "--seq_len", "64", "--bits", "8", "--act", "none", "--w_format", "mxfp4"))
