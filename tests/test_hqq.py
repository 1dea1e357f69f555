"""HQQ: the half-quadratic zero-point search, the fractional zero points it needs (fake quant,
checkpoints, kernels, exports), and the method end to end."""
import os

import pytest
import torch

import ptq_llm
from cli import UsageError
from quant import QScheme, Recipe, quantize_model
from quant.checkpoint import export_tensors, load_quantized, save_quantized
from quant.fake_quant import dequantize, fake_quantize_fractional, quantize, round_to_nearest
from quant.hqq import hqq_qparams
from quant.modules import QuantLinear, quant_modules
from tests.conftest import DATA


def heavy_tailed(rows=64, cols=256, seed=0):
    """A weight-like matrix with outliers (a Gaussian scale mixture: heavier tails than normal)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt() * 0.02


def hqq_weight(w, scheme, **kw):
    scale, zero = hqq_qparams(w, scheme, **kw)
    wl = scheme.to_layout(w)
    return scheme.from_layout(fake_quantize_fractional(wl, scale, zero, scheme.qmin, scheme.qmax), w.shape)


def l1(a, b):
    return float((a - b).abs().mean())


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (2, 32), (4, 32)])
def test_hqq_lowers_the_reconstruction_error_and_converges(bits, group):
    w = heavy_tailed()
    scheme = QScheme(bits, symmetric=False, signed=False, granularity="group", group_size=group)
    rtn = round_to_nearest(w, scheme)[0]
    errors = [l1(w, hqq_weight(w, scheme, iters=n)) for n in (0, 2, 5, 20, 60)]
    # each group keeps its best step, so more iterations are never worse (up to the float16 zero)
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:]))
    assert errors[3] < 0.985 * errors[0]  # it optimises: at least 1.5 % below its min-max start
    assert errors[3] < l1(w, rtn)  # and below round-to-nearest with an integer zero point
    assert abs(errors[4] - errors[3]) < 0.01 * errors[3]  # converged by the default 20 steps


def test_hqq_zero_points_are_fractional_and_float16_exact():
    w = heavy_tailed()
    scheme = QScheme(4, symmetric=False, signed=False, granularity="group", group_size=64)
    scale, zero = hqq_qparams(w, scheme)
    assert scale.shape == zero.shape == (64, 4, 1)
    assert (zero != zero.round()).float().mean() > 0.9
    assert torch.equal(zero.half().float(), zero)


def test_hqq_ignores_the_padding_of_a_partial_group():
    w = heavy_tailed(8, 100)
    scheme = QScheme(3, symmetric=False, granularity="group", group_size=32)
    scale, zero = hqq_qparams(w, scheme)
    last_s, last_z = hqq_qparams(w[:, 96:].contiguous(), QScheme(3, symmetric=False, granularity="group", group_size=4))
    assert torch.allclose(scale[:, -1], last_s[:, 0]) and torch.equal(zero[:, -1], last_z[:, 0])


def test_hqq_refuses_symmetric_schemes():
    with pytest.raises(ValueError, match="asymmetric"):
        hqq_qparams(torch.randn(4, 8), QScheme(4, granularity="group", group_size=8))


def test_hqq_at_least_as_good_as_the_reference_package():
    hqq = pytest.importorskip("hqq.core.quantize")
    w = heavy_tailed(128, 576)
    for bits in (4, 3):
        scheme = QScheme(bits, symmetric=False, signed=False, granularity="group", group_size=64)
        codes, meta = hqq.Quantizer.quantize(w, nbits=bits, group_size=64, optimize=True, round_zero=bits == 4, axis=1,
                                             bitpack=False, device="cpu")
        ref = hqq.Quantizer.dequantize(codes, meta).float().reshape(w.shape)
        ours = hqq_weight(w, scheme, round_start=bits == 4)
        assert l1(w, ours) <= l1(w, ref) * 1.001


def test_fractional_zero_point_arithmetic():
    x = torch.tensor([[-1.0, -0.26, 0.0, 0.24, 0.5, 2.0]])
    scale, zero = torch.tensor([[0.5]]), torch.tensor([[1.3]])
    q = quantize(x, scale, zero, 0, 7)
    # round(x / s + z): -2 + 1.3 -> 0 (clamped), -0.52 + 1.3 -> 1, 1.3 -> 1, 1.78 -> 2, 2.3 -> 2, 5.3 -> 5
    assert q.tolist() == [[0, 1, 1, 2, 2, 5]]
    assert torch.allclose(fake_quantize_fractional(x, scale, zero, 0, 7), dequantize(q, scale, zero))
    layer = QuantLinear(heavy_tailed(16, 64), None, QScheme(4, symmetric=False, granularity="group", group_size=32),
                        fit_weight=False)
    w = layer.weight.detach().clone()
    s, z = hqq_qparams(w, layer.weight_quant.scheme)
    layer.set_quantized_weight(w, s, z)
    assert layer.weight_quant.fractional
    once = layer.weight.detach().clone()
    layer.set_quantized_weight(once, s, z)  # a weight on the grid stays where it is
    assert torch.equal(layer.weight, once)
    assert torch.equal(layer.weight_quant(once), once)


def _hqq_model():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "stories260K")).eval()
    recipe = Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=32), method="hqq")
    return quantize_model(model, recipe, progress=False), recipe


def test_hqq_checkpoint_round_trip_and_kernels(tmp_path):
    from transformers import AutoModelForCausalLM

    from quant.kernels import Int4WeightOnlyLinear, convert_to_int
    model, _ = _hqq_model()
    tensors, _ = export_tensors(model)
    zps = [t for k, t in tensors.items() if k.endswith("weight_zero_point")]
    assert zps and all(t.dtype == torch.float16 for t in zps)
    save_quantized(model, str(tmp_path / "ckpt"))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "stories260K")).eval()
        again = load_quantized(fresh, str(tmp_path / "ckpt"))
        assert all(torch.equal(again.get_submodule(n).weight, m.weight) for n, m in quant_modules(model).items())
        assert torch.equal(again(ids).logits, ref)
        report = convert_to_int(model)
        assert any(v == Int4WeightOnlyLinear.__name__ for v in report.values())
        assert torch.allclose(model(ids).logits, ref, atol=1e-4 * float(ref.abs().max()))


def test_hqq_refuses_compressed_tensors_export():
    from quant.export import export_problem
    model, recipe = _hqq_model()
    assert "fractional zero points" in export_problem(model, "compressed-tensors")


@pytest.mark.parametrize("source", ["stories260K", "tiny-gpt2"])
def test_ptq_llm_hqq_end_to_end(source, tmp_path):
    if source == "tiny-gpt2":
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)).save_pretrained(tmp_path / "g")
        AutoTokenizer.from_pretrained(os.path.join(DATA, "gpt2-tokenizer")).save_pretrained(tmp_path / "g")
        source = str(tmp_path / "g")
    else:
        source = os.path.join(DATA, source)
    common = ["--model_name", source, "--data_dir", DATA, "--results_dir", str(tmp_path), "--no_progress",
              "--seq_len", "64", "--eval_samples", "8", "--bits", "4", "3", "--group_size", "32", "--act", "none"]
    with pytest.raises(UsageError, match="add --w_asym"):
        ptq_llm.main(common + ["--method", "hqq", "--skip_fp32"])  # symmetric weights: a one-line usage error
    rows = ptq_llm.main(common + ["--method", "rtn", "hqq", "--w_asym", "--save_model", "--models_dir", str(tmp_path / "m")])
    by = {(r["method"], r["w_bits"]): r["perplexity"] for r in rows}
    assert set(by) == {("fp32", 32), ("rtn", 4), ("rtn", 3), ("hqq", 4), ("hqq", 3)}
    assert all(by[("hqq", b)] < 1.5 * by[("rtn", b)] for b in (4, 3))
    from llm import load_quantized_model
    for folder in sorted(os.listdir(tmp_path / "m" / "ptq_llm")):
        load_quantized_model(os.path.join(tmp_path, "m", "ptq_llm", folder))
