"""Hadamard rotations (quant/rotation.py) and the quantized KV cache (quant/kvcache.py)."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import ptq_llm
from cli import UsageError
from quant import QScheme, Recipe, quantize_model
from quant.kvcache import kv_bytes_per_token, quantize_keys, quantize_kv_cache, quantize_values
from quant.rotation import factor, hadamard_matrix, hadamard_transform, paley_factor, rotate_model
from tests.conftest import DATA
from tests.test_llm import args_for


@pytest.fixture
def stories():
    return os.path.join(DATA, "stories260K")


SIZES = [1, 2, 4, 8, 12, 20, 24, 48, 64, 72, 96, 576, 768, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthogonal_and_the_fast_transform_is_the_matrix(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-12)  # +-1 / sqrt(n): a Hadamard matrix
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, paley_factor(n)), x @ h, atol=1e-12)


def test_sizes_without_a_matrix_are_refused():
    assert factor(576) == (72, 8) and factor(1536) == (12, 128)
    with pytest.raises(ValueError, match="172 is not 2\\^k times a Paley order"):
        hadamard_matrix(172)


def tiny_llama(hidden=48, inter=96, heads=3, kv=1, tied=True, bias=False, outlier=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      attention_bias=bias, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms that are not 1: folding them must be exact
                p.copy_(torch.rand_like(p) + 0.5)
        if outlier is not None:  # a residual channel far larger than the rest, as trained LLMs have
            model.model.embed_tokens.weight[:, 0] *= outlier
    return model


@pytest.mark.parametrize("kw", [dict(), dict(hidden=64, inter=128, heads=4, kv=2, tied=False, bias=True)])
def test_a_rotated_float_model_computes_the_same_logits(kw):
    model = tiny_llama(**kw)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(model)
        after = model(ids).logits
    assert (after - before).abs().max() < 1e-4
    assert model.get_output_embeddings().weight is not model.model.embed_tokens.weight  # untied, each rotated
    assert all(float(layer.input_layernorm.weight.detach().min()) == 1.0 for layer in model.model.layers)


def test_rotation_refuses_what_it_cannot_rotate(stories, tiny_gpt2):
    with pytest.raises(ValueError, match="MLP width 172 has no Hadamard matrix"):
        rotate_model(AutoModelForCausalLM.from_pretrained(stories))
    with pytest.raises(ValueError, match="LayerNorm's mean subtraction"):
        rotate_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    model = tiny_llama()
    quantize_model(model, Recipe(weight=QScheme(8)), progress=False)
    with pytest.raises(ValueError, match="before quantizing"):
        rotate_model(model)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant"])
def test_rotation_spreads_an_outlier_channel_for_w4a4(method):
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))
    calib = list(ids.split(2))
    with torch.no_grad():
        ref = tiny_llama(outlier=40.0)(ids).logits
    err = {}
    for rotation in ("none", "hadamard"):
        model = tiny_llama(outlier=40.0)
        recipe = Recipe(weight=QScheme(4, granularity="group", group_size=16), method=method,
                        activation=QScheme(4, granularity="token"), rotation=rotation)
        quantize_model(model, recipe, calib, progress=False)
        if rotation == "hadamard":  # the online transform stays with the quantized down projection
            assert all(layer.mlp.down_proj.input_transform is not None for layer in model.model.layers)
        with torch.no_grad():
            out = model(ids).logits
        err[rotation] = float((out - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())
    # per-token 4-bit activations lose the small channels beside the outlier; a rotation spreads it
    # (AWQ and SmoothQuant already move some of it into the weights, so they gain less)
    assert err["hadamard"] < err["none"] / (1.5 if method in ("rtn", "gptq") else 1), err


def test_recipe_fields_keep_earlier_ids_and_round_trip():
    plain = Recipe(weight=QScheme(4, granularity="group", group_size=32))
    assert "rotation" not in plain.to_dict() and "kv_cache" not in plain.to_dict()
    kv = QScheme(4, symmetric=False, granularity="group", group_size=32)
    full = Recipe(weight=plain.weight, rotation="hadamard", kv_cache=kv, kv_residual=64)
    back = Recipe.from_json(full.to_json())
    assert back == full and back.id == full.id != plain.id
    assert full.describe().endswith("+hadamard kv4 g32 r64")
    with pytest.raises(ValueError, match="without kv_cache"):
        Recipe(weight=plain.weight, kv_residual=8)
    with pytest.raises(ValueError, match="integer scheme per group"):
        Recipe(weight=plain.weight, kv_cache=QScheme(4, granularity="channel"))
    with pytest.raises(ValueError, match="not qat"):
        Recipe(weight=plain.weight, method="qat", rotation="hadamard")


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 2**16), shift=st.floats(-50, 50))
def test_kv_round_trip_error_is_within_half_a_step(bits, symmetric, seed, shift):
    g = 8
    x = torch.randn(2, 3, 21, 16, generator=torch.Generator().manual_seed(seed)) * 3 + shift
    scheme = QScheme(bits, symmetric=symmetric, granularity="group", group_size=g)
    # one step: the symmetric grid puts absmax on qmax, the asymmetric one spreads [min, max] over all levels
    sym_levels, levels = scheme.qmax - scheme.zero_point_int, scheme.qmax - scheme.qmin
    # keys: per channel over blocks of g tokens (the last block partial); values: per token over g channels
    kp = torch.cat([x, x[:, :, -1:].expand(-1, -1, -21 % g, -1)], 2).reshape(2, 3, -1, g, 16)
    step_k = (kp.abs().amax(3) / sym_levels if symmetric else (kp.amax(3) - kp.amin(3)) / levels).repeat_interleave(g, 2)[:, :, :21]
    assert ((quantize_keys(x, scheme) - x).abs() <= step_k / 2 * 1.001 + 1e-5).all()
    vg = x.reshape(2, 3, 21, 2, g)
    step_v = (vg.abs().amax(-1, keepdim=True) / sym_levels if symmetric
              else (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / levels).expand_as(vg).reshape(x.shape)
    assert ((quantize_values(x, scheme) - x).abs() <= step_v / 2 * 1.001 + 1e-5).all()


def test_one_pass_computes_what_streaming_decoding_from_the_cache_computes(stories):
    model = AutoModelForCausalLM.from_pretrained(stories).eval()
    ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        for residual in (0, 16):
            quantize_kv_cache(model, QScheme(2, symmetric=False, granularity="group", group_size=8), residual)
            one_pass = model(ids).logits
            assert (one_pass - ref).abs().max() > 0.1  # 2 bits change the logits ...
            out = model(ids[:, :30], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(30, 70):
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.past_key_values
            assert (torch.cat(steps, 1) - one_pass).abs().max() < 1e-3  # ... and decoding sees the same cache
        quantize_kv_cache(model, QScheme(2, symmetric=False, granularity="group", group_size=8), residual=70)
        assert (model(ids).logits - ref).abs().max() < 1e-4  # a residual window over everything is a float cache


def test_kv_bytes_per_token():
    cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    elems = 2 * 30 * 3 * 64
    assert kv_bytes_per_token(cfg, None) == elems * 2
    kv4 = QScheme(4, symmetric=False, granularity="group", group_size=32)
    assert kv_bytes_per_token(cfg, kv4) == elems * (0.5 + 4 / 32)
    assert kv_bytes_per_token(cfg, kv4, residual=128, seq_len=512) == pytest.approx(
        elems * (0.75 * (0.5 + 4 / 32) + 0.25 * 2))


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(DATA, "stories260K")).save_pretrained(folder)
    return str(folder)


def test_rotation_and_kv_rows_end_to_end(tiny_llama_folder, stories, tiny_gpt2, tmp_path):
    common = ["--seq_len", "64", "--eval_samples", "4", "--calib_samples", "4", "--group_size", "16"]
    rows = ptq_llm.main(args_for(tiny_llama_folder, tmp_path, *common, "--method", "rtn", "gptq", "--bits", "4",
                                 "--act", "none", "dynamic", "--act_w_bits", "4", "--a_bits", "8",
                                 "--rotation", "none", "hadamard", "--kv_bits", "4", "--kv_group", "8"))
    got = {(r["method"], r["act"], r["rotation"]): r for r in rows if r["method"] != "fp32"}
    assert len(got) == 2 * 2 * 2
    for r in got.values():
        assert np.isfinite(r["perplexity"]) and r["kv_bits"] == 4 and r["kv_group"] == 8
        assert r["kv_bytes_per_token"] == kv_bytes_per_token(
            LlamaConfig.from_pretrained(tiny_llama_folder), QScheme(4, symmetric=False, granularity="group", group_size=8))
    rows = ptq_llm.main(args_for(stories, tmp_path, "--seq_len", "64", "--eval_samples", "4", "--bits", "8",
                                 "--act", "none", "--kv_bits", "8", "2", "--kv_group", "8"))
    fp32, kv8, kv2 = (r["perplexity"] for r in rows)
    assert abs(kv8 / fp32 - 1) < 0.02 and kv2 > kv8
    rows = ptq_llm.main(args_for(tiny_gpt2, tmp_path, "--seq_len", "32", "--eval_samples", "2", "--bits", "8",
                                 "--act", "none", "--kv_bits", "4", "--kv_group", "8"))  # GPT-2's attention too
    assert np.isfinite(rows[-1]["perplexity"])
    with pytest.raises(UsageError, match="MLP width 172"):
        ptq_llm.main(args_for(stories, tmp_path, "--bits", "8", "--act", "none", "--rotation", "hadamard"))
    with pytest.raises(UsageError, match="LayerNorm"):
        ptq_llm.main(args_for(tiny_gpt2, tmp_path, "--seq_len", "32", "--bits", "8", "--act", "none", "--rotation", "hadamard"))
    with pytest.raises(UsageError, match="do not divide the head dimension 8"):
        ptq_llm.main(args_for(stories, tmp_path, "--bits", "8", "--act", "none", "--kv_bits", "4"))
    with pytest.raises(UsageError, match="drop --save_model"):
        ptq_llm.main(args_for(stories, tmp_path, "--bits", "8", "--act", "none", "--kv_bits", "4", "--save_model"))
