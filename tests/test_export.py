"""Exports load back through the ecosystem's own loaders and compute what our model computes;
settings a format cannot hold are refused before anything is written; our own checkpoint
folder is refused by from_pretrained instead of loading random weights."""
import os

import pytest
import torch
from conftest import DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

import ptq_llm
from llm import eval_windows, load_exported, load_quantized_model, perplexity, tokenize, wikitext_text
from quant import QScheme, Recipe, native, quantize_model, quantized_size_bytes, save_quantized
from quant.export import ExportError, export_problem, safetensors_data_bytes, save_compressed_tensors, save_gguf

STORIES = os.path.join(DATA, "stories260K")


@pytest.fixture(scope="module")
def data():
    tok = AutoTokenizer.from_pretrained(STORIES)
    calib = eval_windows(tokenize(tok, wikitext_text("validation", None)), 64, 8)
    return tok, calib, eval_windows(tokenize(tok, wikitext_text("test", None)), 256, 16)  # tokenizer, calibration, evaluation


def quantized(recipe, calib):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    return quantize_model(model, recipe, calib.split(4), progress=False)


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def sym(bits, group=None):
    return QScheme(bits, granularity="group" if group else "channel", group_size=group)


CT_CASES = {  # stories260K's widths are 64 and 172: groups of 4 divide both
    "rtn W4 g4": Recipe(weight=sym(4, 4)),
    "rtn W8 channel": Recipe(weight=sym(8)),
    "rtn W4 asym g4": Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=4)),
    "rtn W3 asym channel": Recipe(weight=QScheme(3, symmetric=False, granularity="channel")),
    "gptq W4 g4": Recipe(weight=sym(4, 4), method="gptq"),
    "awq W4 g4": Recipe(weight=sym(4, 4), method="awq"),
    "rtn W8A8 static": Recipe(weight=sym(8), activation=QScheme(8, symmetric=False), a_observer="minmax"),
    "smoothquant W8A8 static": Recipe(weight=sym(8), method="smoothquant", activation=QScheme(8, symmetric=False),
                                      a_observer="minmax"),
    "rtn W8A8 dynamic": Recipe(weight=sym(8), activation=QScheme(8, symmetric=False, granularity="token")),
}


@pytest.mark.parametrize("label", list(CT_CASES))
def test_compressed_tensors_round_trip_is_exact(data, tmp_path, label):
    tok, calib, windows = data
    model = quantized(CT_CASES[label], calib)
    info = save_compressed_tensors(model, str(tmp_path / "ct"), tok)
    loaded = load_exported(info["format"], info["path"], "cpu")
    ours, theirs = perplexity(model, windows, 4, "cpu", progress=False), perplexity(loaded, windows, 4, "cpu", progress=False)
    if "A8" not in label:  # the loader dequantizes our codes with our scales: the same weights exactly
        assert torch.equal(logits(loaded, windows), logits(model, windows)), label
        assert theirs == ours
    else:
        # compressed-tensors rounds x / s + zp where we (and PyTorch, and vLLM's kernels) round x / s,
        # then add zp: an input exactly halfway between two codes can land one code apart
        assert abs(theirs - ours) / ours < 1e-3, label
    # its tensors take no more room than our own packed format's (asymmetric zero points pack
    # tighter there); the file adds a JSON header (12 KB of 480 here, 35 layers of a tiny model)
    assert safetensors_data_bytes(os.path.join(info["path"], "model.safetensors")) <= 1.02 * quantized_size_bytes(model)


def test_compressed_tensors_plain_from_pretrained(data, tmp_path):
    """A symmetric export needs nothing but from_pretrained, and says what it is in config.json."""
    tok, calib, windows = data
    model = quantized(CT_CASES["rtn W4 g4"], calib)
    folder = save_compressed_tensors(model, str(tmp_path / "ct"), tok)["path"]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.quantization_config.quant_method == "compressed-tensors"
    assert torch.equal(logits(loaded, windows), logits(model, windows))


def tiny_gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=512)).eval()


@pytest.mark.parametrize("recipe,model_fn,reason", [
    (Recipe(weight=sym(4, 32)), None, "not a multiple of group 32"),  # 172-wide down_proj: a padded last group
    (Recipe(weight=sym(4, 32), embeddings=True, group_fallback=True), None, "quantized embeddings"),
    (Recipe(weight=sym(8), activation=QScheme(8, granularity="token")), None, "symmetric per-token"),
    (Recipe(weight=sym(8), activation=QScheme(8, False, granularity="token", group_size=16)), None, "per token group"),
    (Recipe(weight=sym(4, 4), activation=QScheme(8, symmetric=False), a_observer="minmax"), None, "W4A8"),
    (Recipe(weight=sym(4, 32)), tiny_gpt2_model, "Conv1D"),
])
def test_compressed_tensors_refuses_what_it_cannot_hold(data, tmp_path, recipe, model_fn, reason):
    tok, calib, _ = data
    float_model = model_fn() if model_fn else AutoModelForCausalLM.from_pretrained(STORIES).eval()
    assert reason in export_problem(float_model, "compressed-tensors", recipe)  # known before quantizing
    model = quantize_model(float_model, recipe, calib.split(4), progress=False)
    with pytest.raises(ExportError, match=reason):
        save_compressed_tensors(model, str(tmp_path / "ct"), tok)
    assert not os.listdir(tmp_path)  # nothing half-written


def gguf_payload_bytes(path):
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("bits,qtype", [(4, "q4_0"), (8, "q8_0")])
def test_gguf_keeps_codes_exact_and_loads_through_transformers(data, tmp_path, bits, qtype):
    tok, calib, windows = data
    model = quantized(Recipe(weight=sym(bits, 32), group_fallback=True), calib)
    info = save_gguf(model, str(tmp_path / f"m-{qtype}.gguf"), qtype, tok)
    assert "30 layers with their codes exact" in info["notes"] and "5 layers float32" in info["notes"]
    loaded = load_exported(info["format"], info["path"], "cpu")
    ours, theirs = perplexity(model, windows, 4, "cpu", progress=False), perplexity(loaded, windows, 4, "cpu", progress=False)
    assert abs(theirs - ours) / ours < 1e-3  # only the float16 rounding of the scales differs
    assert (logits(loaded, windows) - logits(model, windows)).abs().max() < 0.1
    # the file is its tensors plus the header and the 512-token vocabulary
    assert info["bytes"] <= 1.05 * gguf_payload_bytes(info["path"])
    assert_same_tokenizer(info["path"], tok)


def assert_same_tokenizer(path, tok):
    """The GGUF file's tokenizer encodes as `tok` does, and says that encoding adds BOS (what
    llama.cpp reads; transformers' GGUF converters honour it from 5.2x on, so the ids are compared
    without it)."""
    import gguf
    fields = gguf.GGUFReader(path).fields
    assert bool(fields["tokenizer.ggml.add_bos_token"].contents()) is True
    back = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = "Once upon a time, there was a little girl named Lily."
    ours, theirs = tok(text).input_ids, back(text).input_ids
    assert ours[0] == tok.bos_token_id and theirs[-len(ours) + 1:] == ours[1:]


def test_gguf_sourced_model_exports_both_ways(data, tmp_path):
    """A model read from a GGUF file (as SmolLM2 is) exports to compressed-tensors, and to GGUF
    with the source file's tokenizer copied over."""
    tok, calib, windows = data
    source = save_gguf(quantized(Recipe(weight=sym(8, 32), group_fallback=True), calib), str(tmp_path / "src.gguf"),
                       "q8_0", tok)["path"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="src.gguf").eval()
    quantize_model(model, Recipe(weight=sym(4, 4)), None, progress=False)
    ct = save_compressed_tensors(model, str(tmp_path / "ct"), tok)
    assert torch.equal(logits(load_exported(ct["format"], ct["path"], "cpu"), windows), logits(model, windows))
    out = save_gguf(model, str(tmp_path / "out" / "m.gguf"), "q4_0", None, source_gguf=source)
    assert_same_tokenizer(out["path"], tok)


def test_gguf_block_layout_matches_gguf_dequantizer(data, tmp_path):
    """Our Q4_0 bytes, read by the gguf package's own dequantizer, give our weights (float16 scales)."""
    import gguf
    tok, calib, _ = data
    model = quantized(Recipe(weight=sym(4, 32), group_fallback=True), calib)
    path = save_gguf(model, str(tmp_path / "m.gguf"), "q4_0", tok)["path"]
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    q = model.model.layers[0].mlp.up_proj
    expect = (q.weight_quant.int_repr(q.weight) * q.weight_quant.scale.half().float()).reshape(q.weight.shape)
    assert torch.equal(w, expect)


def test_gguf_requantizes_another_grid_and_says_so(data, tmp_path):
    tok, calib, windows = data
    model = quantized(Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=64), group_fallback=True), calib)
    info = save_gguf(model, str(tmp_path / "m.gguf"), "q4_0", tok)
    assert "requantized to q4_0" in info["notes"]


def test_gguf_refuses_gpt2_and_quantized_activations(data, tmp_path):
    tok, calib, _ = data
    assert "Llama architecture" in export_problem(tiny_gpt2_model(), "gguf", Recipe(weight=sym(4, 32)))
    model = quantized(Recipe(weight=sym(8), activation=QScheme(8, symmetric=False), a_observer="minmax"), calib)
    with pytest.raises(ExportError, match="quantizes activations"):
        save_gguf(model, str(tmp_path / "m.gguf"), "q8_0", tok)
    assert not os.listdir(tmp_path)


def test_own_checkpoint_never_masquerades_and_loads_as_kernels(data, tmp_path):
    tok, calib, windows = data
    model = quantized(Recipe(weight=sym(4, 32), group_fallback=True), calib)
    folder = save_quantized(model, str(tmp_path / "q"))
    tok.save_pretrained(folder)
    assert not os.path.exists(os.path.join(folder, "config.json"))
    with pytest.raises((OSError, ValueError), match="config.json"):  # loudly refused, never random weights
        AutoModelForCausalLM.from_pretrained(folder)
    fake, _ = load_quantized_model(folder)
    assert torch.equal(logits(fake, windows), logits(model, windows))
    real, _ = load_quantized_model(folder, kernels=True)
    kinds = {type(m).__name__ for m in real.modules()}
    assert "Int4WeightOnlyLinear" in kinds and "QuantLinear" in kinds  # 172-wide inputs have no int4 kernel
    assert not any(type(m).__name__ == "Int4WeightOnlyLinear" and hasattr(m, "weight") for m in real.modules())
    # float rounding only with our CPU int4 kernel; PyTorch's (without a compiler) rounds to bfloat16
    ours, kernels = perplexity(model, windows, 4, "cpu", progress=False), perplexity(real, windows, 4, "cpu", progress=False)
    assert abs(kernels - ours) / ours < (1e-4 if native.library() else 1e-2)


def test_ptq_llm_export_rows(tmp_path, capfd):
    args = ["--model_name", STORIES, "--results_dir", str(tmp_path), "--models_dir", str(tmp_path / "models"),
            "--no_progress", "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "8", "--bits", "4",
            "--group_size", "4", "--act", "none", "--skip_fp32", "--export", "compressed-tensors", "gguf"]
    row = ptq_llm.main(args)[0]
    assert "it/s]" not in capfd.readouterr().err  # --no_progress hides the libraries' own bars too
    assert row["export_format"] == "compressed-tensors;gguf-q4_0"
    ct_ppl, gguf_ppl = (float(p) for p in row["export_perplexity"].split(";"))
    assert ct_ppl == row["perplexity"]
    assert "requantized to q4_0" in row["export_notes"]  # groups of 4 are not Q4_0's 32
    paths = row["export_path"].split(";")
    assert os.path.isdir(paths[0]) and paths[1].endswith(".gguf") and os.path.isfile(paths[1])
    assert [int(b) for b in row["export_bytes"].split(";")] == [
        sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0]) if f.endswith(".safetensors")),
        os.path.getsize(paths[1])]
    again = ptq_llm.main(args)[0]  # the same settings: the artefacts are kept, and measured again
    assert again["export_notes"].split(";")[0] == "kept" and again["export_perplexity"] == row["export_perplexity"]


def test_ptq_llm_refuses_an_export_before_quantizing(tmp_path):
    from cli import UsageError
    with pytest.raises(UsageError, match="not a multiple of group 32"):
        ptq_llm.main(["--model_name", STORIES, "--results_dir", str(tmp_path), "--models_dir", str(tmp_path / "m"),
                      "--no_progress", "--seq_len", "64", "--eval_samples", "2", "--bits", "4", "--group_size", "32",
                      "--act", "none", "--export", "compressed-tensors"])
    assert not os.path.exists(tmp_path / "ptq_llm.csv")


def test_artefacts_get_the_permissions_of_the_umask(data, tmp_path):
    """Files are built under temporary names (owner-only) and renamed into place: they must end
    with the permissions a plain open() would give, readable by whoever else reads models/."""
    from results import append_rows
    tok, calib, _ = data
    model = quantized(Recipe(weight=sym(4, 4)), calib)
    old = os.umask(0o022)
    try:
        made = [save_gguf(model, str(tmp_path / "m.gguf"), "q4_0", tok)["path"],
                save_compressed_tensors(model, str(tmp_path / "ct"), tok)["path"], save_quantized(model, str(tmp_path / "own"))]
        append_rows(str(tmp_path / "rows.csv"), [{"a": 1}])
    finally:
        os.umask(old)
    modes = {os.path.basename(p): oct(os.stat(p).st_mode & 0o777) for p in made + [str(tmp_path / "rows.csv")]}
    assert modes == {"m.gguf": "0o644", "ct": "0o755", "own": "0o755", "rows.csv": "0o644"}
