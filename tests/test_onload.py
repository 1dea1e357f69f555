"""Onloading (quant.onload): a model whose decoder blocks stay in the safetensors checkpoint gives
the same quantized model and perplexity as the model in memory, per method, and ptq_llm with
--max_memory quantizes a model whose float weights are over twice the cap with a measured peak
under it."""
import copy
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import DATA, ROOT

from llm import calib_windows, evaluate, load_model, load_onloaded
from quant import QScheme, Recipe, quantize_model, quantized_size_bytes
from quant.onload import parse_size

STORIES = os.path.join(DATA, "stories260K")
W4G = QScheme(4, symmetric=False, granularity="group", group_size=32)
W8, A8 = QScheme(8, granularity="channel"), QScheme(8, symmetric=False)
RECIPES = {
    "gptq": Recipe(weight=W4G, method="gptq", method_args={"act_order": True}),
    "rtn": Recipe(weight=W4G),
    "rtn static minmax": Recipe(weight=W8, activation=A8, a_observer="minmax"),
    "awq": Recipe(weight=W4G, method="awq", method_args={"tokens": 200}),
    "smoothquant": Recipe(weight=W8, activation=QScheme(8, granularity="token"), method="smoothquant"),
    "signround": Recipe(weight=W4G, method="signround", method_args={"iters": 4}),
}


@pytest.fixture(scope="module")
def stories():
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (24, 64))
    return load_model(STORIES, "cpu"), ids[:8], ids[8:]


@pytest.mark.parametrize("name", list(RECIPES))
def test_onloaded_equals_in_memory(tmp_path, stories, name):
    model, calib, test = stories
    recipe = RECIPES[name]
    ref = quantize_model(copy.deepcopy(model), recipe, calib.split(4), progress=False)
    onl = load_onloaded(STORIES, "cpu", torch.float32, str(tmp_path / "blocks"))
    onl.onload.chunk = 5  # several passes over the blocks, one batch left over
    onl.onload.pass_tokens = 128  # GPTQ's block calls over 2 windows, not all 8 merged: the same sums
    quantize_model(onl, recipe, calib.split(4), progress=False)
    assert len(os.listdir(tmp_path / "blocks")) == len(onl.onload.blocks)  # every block written, nothing else
    a, b = evaluate(ref, test, 4, "cpu", progress=False), evaluate(onl, test, 4, "cpu", progress=False)
    assert a["perplexity"] == b["perplexity"]
    assert torch.equal(torch.as_tensor(a["window_nll"]), torch.as_tensor(b["window_nll"]))
    assert quantized_size_bytes(ref) == quantized_size_bytes(onl)
    for i, block in enumerate(ref.model.layers):  # the blocks on disk are the in-memory ones
        kept = torch.load(onl.onload._path(i), weights_only=False)
        for (n, t), (m, u) in zip(block.state_dict().items(), kept.state_dict().items()):
            assert n == m and torch.equal(t, u), n


def test_float_onloaded_equals_in_memory(tmp_path, stories):
    model, _, test = stories
    onl = load_onloaded(STORIES, "cpu", torch.float32, str(tmp_path / "blocks"))
    onl.onload.chunk = 8
    assert evaluate(model, test, 4, "cpu", progress=False)["perplexity"] == evaluate(onl, test, 4, "cpu", progress=False)["perplexity"]
    from quant import float_size_bytes
    assert float_size_bytes(onl) == float_size_bytes(model)
    assert all(p.device.type == "meta" for p in onl.model.layers.parameters())  # nothing of the blocks stays


def test_refusals(tmp_path):
    onl = load_onloaded(STORIES, "cpu", torch.float32, str(tmp_path / "blocks"))
    with pytest.raises(ValueError, match="rotation"):
        quantize_model(onl, Recipe(weight=W4G, rotation="hadamard"), calib_windows(torch.arange(4000) % 512, 4, 64, 0))
    with pytest.raises(ValueError, match="block by block"):
        quantize_model(onl, Recipe(weight=W4G, method="hqq"), None)
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("500MB") == 500 * 10**6
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_max_memory_keeps_the_measured_peak_under_the_cap(tmp_path):
    """18 random Llama blocks of 10 MiB (182 MiB of float32 weights) under a 90 MiB cap, on stories260K's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "llama"
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=18, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(STORIES, f), folder)
    run = [sys.executable, "ptq_llm.py", "--model_name", str(folder), "--seq_len", "128", "--calib_samples", "8",
           "--eval_samples", "16", "--batch_size", "4", "--bits", "4", "--group_size", "64", "--act", "none",
           "--results_dir", str(tmp_path / "results"), "--no_progress"]
    done = subprocess.run(run + ["--method", "gptq", "rtn", "--max_memory", "90MiB"], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "results" / "ptq_llm.csv")
    assert list(rows.method) == ["fp32", "gptq", "rtn"]
    assert (rows.fp32_size_bytes > 2 * 90 * 2**20).all() and (rows.max_memory_mb == 90).all()
    assert (rows.model_peak_mb < 90).all(), rows[["method", "model_peak_mb"]]
    assert rows.notes.isna().all()
    too_small = subprocess.run(run + ["--method", "gptq", "--max_memory", "12MiB"], capture_output=True, text=True,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert too_small.returncode != 0 and "--max_memory 12 MiB is too small" in too_small.stderr
    assert len(pd.read_csv(tmp_path / "results" / "ptq_llm.csv")) == 3  # nothing written


def test_row_models_share_what_stays_in_memory(tmp_path):
    """A row's model (load_onloaded(like=...)) holds the float model's embeddings, norm and head
    themselves, not a second copy: under a memory cap each copy would count."""
    a = load_onloaded(STORIES, "cpu", torch.float32, str(tmp_path / "a"))
    b = load_onloaded(STORIES, "cpu", torch.float32, str(tmp_path / "b"), like=a)
    mine = dict(a.named_parameters())
    rest = [(n, p) for n, p in b.named_parameters() if not n.startswith(b.onload.prefix)]
    assert rest and all(p.data_ptr() == mine[n].data_ptr() for n, p in rest)
    windows = torch.randint(0, 512, (4, 64))
    assert evaluate(a, windows, 2, "cpu", progress=False)["perplexity"] == evaluate(b, windows, 2, "cpu", progress=False)["perplexity"]
