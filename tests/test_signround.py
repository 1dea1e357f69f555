"""SignRound: zero steps is round-to-nearest, the learned rounding lowers a block's output error
against RTN on stories260K, and the method runs end to end."""
import os

import pytest
import torch

import ptq_llm
from llm import calib_windows, tokenize, wikitext_text
from quant import QScheme
from quant.arch import decoder_blocks, is_linear, weight_matrix
from quant.fake_quant import round_to_nearest
from quant.modules import layer_scheme, quant_modules, quantize_linears
from quant.sequential import first_block_inputs, run_block
from quant.signround import qdq_rows, signround_block
from tests.conftest import DATA


@pytest.mark.parametrize("scheme", [QScheme(3, symmetric=False, granularity="group", group_size=32),
                                    QScheme(4, symmetric=False, signed=False, granularity="group", group_size=16),
                                    QScheme(4, granularity="group", group_size=32),
                                    QScheme(8, symmetric=False, granularity="channel")])
def test_no_offsets_and_full_range_is_round_to_nearest(scheme):
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    rows = scheme.rows(scheme.to_layout(w))
    ones = torch.ones(rows.shape[0], 1)
    ours, scale, zp = qdq_rows(rows, torch.zeros_like(rows), ones, ones, scheme)
    ref, ref_scale, ref_zp = round_to_nearest(w, scheme)
    assert torch.allclose(scale.reshape(-1), ref_scale.reshape(-1)) and torch.equal(zp.reshape(-1), ref_zp.reshape(-1))
    # x / s against x * (1 / s): a code may differ where x / s is within an ulp of a tie
    ref_rows = scheme.rows(scheme.to_layout(ref))
    assert (ours == ref_rows).float().mean() > 0.999


def _stories_block():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = os.path.join(DATA, "stories260K")
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(source), wikitext_text("validation", DATA))
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, calib_windows(ids, 16, 64, seed=0).split(8), "cpu")
    return blocks[0], inputs


@torch.no_grad()
def test_signround_lowers_block_output_error_against_rtn():
    import copy
    block, inputs = _stories_block()
    targets = [run_block(block, a, k) for a, k in inputs]
    w3 = QScheme(3, symmetric=False, granularity="group", group_size=32)
    scheme_for = lambda n, m: layer_scheme(w3, weight_matrix(m).shape[1])  # noqa: E731

    def error(b):
        return sum(float((run_block(b, a, k) - t).pow(2).mean()) for (a, k), t in zip(inputs, targets))

    rtn = copy.deepcopy(block)
    quantize_linears(rtn, w3, group_fallback=True)
    tuned = copy.deepcopy(block)
    info = signround_block(tuned, inputs, targets, scheme_for, iters=100)
    assert len(quant_modules(tuned)) == sum(is_linear(m) for m in block.modules())
    assert info["loss_best"] < info["loss_start"]
    assert error(tuned) < 0.8 * error(rtn)
    for name, q in quant_modules(tuned).items():  # every weight is on its grid: fake-quantizing it changes nothing
        assert torch.equal(q.weight_quant(q.weight), q.weight), name


@pytest.mark.parametrize("which", ["stories260K", "tiny-gpt2"])
def test_ptq_llm_signround_end_to_end(which, tmp_path):
    if which == "tiny-gpt2":  # GPT-2's Conv1D weights are (in, out)
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)).save_pretrained(tmp_path / "g")
        AutoTokenizer.from_pretrained(os.path.join(DATA, "gpt2-tokenizer")).save_pretrained(tmp_path / "g")
        source = str(tmp_path / "g")
    else:
        source = os.path.join(DATA, which)
    rows = ptq_llm.main(["--model_name", source, "--data_dir", DATA, "--results_dir", str(tmp_path), "--no_progress",
                         "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "16", "--bits", "3",
                         "--group_size", "32", "--w_asym", "--act", "none", "--method", "rtn", "signround",
                         "--signround_iters", "40", "--save_model", "--models_dir", str(tmp_path / "m")])
    by = {r["method"]: r["perplexity"] for r in rows}
    assert set(by) == {"fp32", "rtn", "signround"} and by["signround"] < by["rtn"] * 1.05
    from llm import load_quantized_model
    for folder in sorted(os.listdir(tmp_path / "m" / "ptq_llm")):
        load_quantized_model(os.path.join(tmp_path, "m", "ptq_llm", folder))
