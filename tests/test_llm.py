"""ptq_llm.py on a tiny GPT-2 (Conv1D path) and on the real trained stories260K (Llama path)."""
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import DATA

import ptq_llm
from llm import eval_windows, hub_rows, load_quantized_model, perplexity, tokenize, wikitext_text
from quant import QScheme, calibrate, quantize_linears, save_quantized
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def stories():
    return os.path.join(DATA, "stories260K")


def args_for(model, tmp_path, *extra):
    return ["--model_name", model, "--data_dir", DATA, "--results_dir", str(tmp_path / "results"),
            "--models_dir", str(tmp_path / "models"), "--no_progress", *extra]


def test_wikitext_rebuild_matches_hub_token_count():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(DATA, "gpt2-tokenizer"))
    text = wikitext_text("test", DATA)
    assert len(tokenize(tok, text)) == 287_644
    assert hub_rows(" \n = Title = \n \n Body .\n") == ["", " = Title = \n", "", " Body .\n"]
    assert wikitext_text("train", DATA) is None  # not shipped offline


def test_tiny_gpt2_conv1d_end_to_end(tiny_gpt2, tmp_path):
    rows = ptq_llm.main(args_for(tiny_gpt2, tmp_path, "--seq_len", "64", "--eval_samples", "6",
                                 "--calib_samples", "4", "--bits", "8", "4", "--group_size", "32"))
    df = pd.read_csv(tmp_path / "results" / "ptq_llm.csv")
    assert len(df) == len(rows) == 1 + 2 + 2
    for col in ["timestamp", "model", "method", "w_bits", "a_bits", "observer", "granularity", "group_size",
                "calib_samples", "calib_split", "seq_len", "eval_tokens", "perplexity", "fp32_perplexity",
                "size_bytes", "fp32_size_bytes", "seconds", "seed"]:
        assert col in df.columns
    assert (df.calib_split == "validation").all() and (df.eval_tokens == 6 * 64).all()
    assert df.perplexity.notna().all() and (df.perplexity > 1).all()
    q = df[df.method == "rtn"]
    assert (q.size_bytes < q.fp32_size_bytes).all()
    assert set(q[(q.act == "none") & (q.w_bits == 4)].group_size) == {32}


def test_stories260k_w8_within_1_percent_and_reload_bit_exact(stories, tmp_path):
    rows = ptq_llm.main(args_for(stories, tmp_path, "--seq_len", "256", "--eval_samples", "40",
                                 "--calib_samples", "8", "--bits", "8", "--act", "none", "--save_model"))
    fp32, w8 = rows[0]["perplexity"], rows[1]["perplexity"]
    assert abs(w8 - fp32) / fp32 < 0.01
    folder = os.path.join(tmp_path, "models", "ptq_llm", os.listdir(tmp_path / "models" / "ptq_llm")[0])
    model, tok = load_quantized_model(folder)
    windows = eval_windows(tokenize(tok, wikitext_text("test", DATA)), 256, 40)
    assert perplexity(model, windows, 4, "cpu", progress=False) == w8


@pytest.mark.parametrize("w,a,embeddings", [(QScheme(4, granularity="group", group_size=32), None, False),
                                            (QScheme(8, granularity="channel"), QScheme(8, symmetric=False), False),
                                            (QScheme(4, symmetric=False, granularity="group", group_size=32), None, True)])
def test_save_reload_bit_identical_logits(stories, tiny_gpt2, tmp_path, w, a, embeddings):
    from transformers import AutoModelForCausalLM
    for source in (stories, tiny_gpt2):
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        quantize_linears(model, w, a, skip=() if embeddings else ("lm_head",), group_fallback=True, embeddings=embeddings)
        calibrate(model, [ids], progress=False)
        with torch.no_grad():
            logits = model(ids).logits
        folder = save_quantized(model, str(tmp_path / os.path.basename(source)))
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        reloaded, _ = load_quantized_model(folder)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, logits)


def run_main(*args, cwd):
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return r, time.time() - t0


@pytest.mark.parametrize("extra,needle", [
    (["--seq_len", "1024"], "exceeds the model's context length 512"),
    (["--bits", "1"], "--bits"),
    (["--calib_samples", "0"], "--calib_samples"),
    (["--group_size", "-1"], "--group_size"),
])
def test_bad_input(stories, tmp_path, extra, needle):
    r, _ = run_main("--model_name", stories, "--data_dir", DATA,
                    "--results_dir", str(tmp_path / "r"), *extra, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "r")


def test_missing_model_path_and_offline_hub_id(tmp_path):
    r, _ = run_main("--model_name", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    # the signature command, offline: a clear message in seconds, naming where to put the model
    r, seconds = run_main("--model_name=distilgpt2", "--calib_samples=200", "--seq_len=128", cwd=tmp_path)
    assert r.returncode == 2 and "models/distilgpt2" in r.stderr and seconds < 30


def test_gguf_header_reader_matches_the_gguf_package(tmp_path):
    """Our header-only reader (context length within seconds) against gguf's own writer and reader."""
    import gguf
    import numpy as np

    from cli import UsageError
    from llm import gguf_metadata
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(1234)
    w.add_block_count(2)
    w.add_token_list([f"tok{i}" for i in range(300)])  # an array of strings, skipped
    w.add_array("test.floats", [0.5, 1.5, 2.5])
    w.add_float32("test.scale", 0.25)
    w.add_bool("test.flag", True)
    w.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 1234
    assert meta["llama.block_count"] == 2 and meta["test.scale"] == 0.25 and meta["test.flag"] is True
    reader = gguf.GGUFReader(path)
    assert set(meta) == {k for k in reader.fields if not k.startswith("GGUF.")}  # (its own header entries)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(UsageError, match="not a GGUF file"):
        gguf_metadata(str(bad))


def test_seeds_repeat_only_what_reads_calibration(stories, tmp_path):
    """--seeds 3: each calibrated recipe gets a row per seed from its own calibration windows; a
    recipe that reads no calibration data (weight-only RTN) gets one row; the report shows the spread."""
    rows = ptq_llm.main(args_for(stories, tmp_path, "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "4",
                                 "--bits", "4", "--group_size", "32", "--act", "none", "static", "--method", "rtn", "gptq",
                                 "--seeds", "3", "--seed", "5"))
    seeds = pd.DataFrame(rows).groupby(["method", "act"]).seed.apply(sorted).to_dict()
    assert seeds[("fp32", "none")] == [5] and seeds[("rtn", "none")] == [5]
    assert seeds[("rtn", "static")] == seeds[("gptq", "none")] == seeds[("gptq", "static")] == [5, 6, 7]
    gptq = [r["perplexity"] for r in rows if r["method"] == "gptq" and r["act"] == "none"]
    assert len(set(gptq)) == 3  # three calibration samples, three quantized models
    import report
    df = report.llm_rows(pd.read_csv(tmp_path / "results" / "ptq_llm.csv")).set_index(["method", "act"])
    mean, sd = float(pd.Series(gptq).mean()), float(pd.Series(gptq).std())
    assert df.loc[("gptq", "none"), "over seeds"] == f"{mean:.2f} ± {sd:.2f} (3)"
    assert df.loc[("rtn", "none"), "over seeds"] == "" and df.loc[("gptq", "none"), "seed"] == 5
