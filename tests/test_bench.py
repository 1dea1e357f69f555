"""bench/speed.py end to end on the small real Llama, and the report's per-machine tables."""
import os
import subprocess
import sys

import pandas as pd

import report
from tests.conftest import DATA, ROOT


def test_llm_bench_writes_rows_against_float_of_the_same_run(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "speed.py"), "llm",
           "--model_name", os.path.join(DATA, "stories260K"), "--data_dir", DATA,
           "--seq_len", "64", "--eval_samples", "2", "--repeats", "1", "--int4_group", "32",
           "--only", "ours int8 dynamic", "ours int8 weight-only", "--decode_batches", "3", "--generate_tokens", "4",
           "--results_dir", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    df = pd.read_csv(tmp_path / "bench_llm.csv")
    assert df.variant.tolist() == ["float", "ours int8 weight-only", "ours int8 dynamic (W8A8)"]
    assert df.code.nunique() == 1 and df.device.eq("cpu").all()  # one run, one machine and code version
    f = df.set_index("variant")
    assert f.loc["float", "speedup_prefill"] == 1.0 and f.loc["float", "speedup_linears_prefill"] == 1.0
    assert (f.linears_prefill_ms > 0).all() and (f.prefill_tokens_per_s > 0).all()
    # a decode step's time inside its linears (lm_head included), against float's of the same run
    assert f.loc["float", "speedup_linears_decode"] == 1.0 and (f.linears_decode_ms > 0).all()
    # generate's own decode rate, against float's of the same run
    assert f.loc["float", "speedup_generate"] == 1.0 and (f.generate_tokens_per_s > 0).all()
    # batched decode against float at the same batch; the roofline from the run's own read bandwidth
    assert f.loc["float", "speedup_decode_b3"] == 1.0 and (f.decode_tokens_per_s_b3 > 0).all()
    assert (f.read_gb_per_s > 0.1).all() and f.read_gb_per_s.nunique() == 1
    roofline = f.state_bytes * f.decode_tokens_per_s / (f.read_gb_per_s * 1e9)
    assert ((f.decode_roofline / roofline - 1).abs() < 0.02).all()
    # memory from a process per variant: resident with the weights loaded, and the forward's peak above it
    assert (f.rss_mb > 100).all() and (f.peak_rss_mb >= f.rss_mb).all()
    # the int8 weights take about a quarter of the float weights' bytes (embeddings stay float)
    assert f.loc["ours int8 dynamic (W8A8)", "state_bytes"] < f.loc["float", "state_bytes"]
    # weight-only int8 with a GEMM on the codes for prefill-sized inputs: perplexity within 1 %
    assert abs(f.loc["ours int8 weight-only", "quality"] / f.loc["float", "quality"] - 1) < 0.01


def test_report_bench_tables_per_machine_latest_row_per_variant():
    rows = []
    for t, device, torch_v, variant, code in [("1", "cpu", "2.13", "float", "a"), ("1", "cpu", "2.13", "x", "a"),
                                             ("2", "cpu", "2.13", "float", "b"), ("3", "H100", "2.11", "float", "c"),
                                             ("3", "H100", "2.11", "x", "c")]:
        rows.append(dict(timestamp=t, bench="mlp", device=device, torch=torch_v, variant=variant, provider="p",
                         quality=1.0, quality_metric="acc", threads=2, code=code, speedup_b256=1.0))
    text = report.bench(pd.DataFrame(rows), None)
    assert text.count("**mlp** on") == 2 and "float32, torch 2.13" in text  # (no dtype column: float32)
    cpu, gpu = text.split("**mlp** on H100")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in cpu.splitlines() if line.startswith("| ")]
    rows = {c[0]: c[-1] for c in cells[1:]}  # variant -> code
    assert rows == {"float": "b", "x": "a"}  # the newest float row; x as last measured, with its run named
    assert gpu.count("| c ") == 2


def test_gptq_peer_bench_runs_ours_and_matches_quantize_model(tmp_path):
    """The peer bench's own run of this project's GPTQ writes a row whose perplexity is what
    quantize_model + evaluate give in this process on the same windows (the peer is not installed here)."""
    import torch

    from llm import calib_windows, eval_windows, evaluate, load_model, load_tokenizer, tokenize, wikitext_text
    from quant import QScheme, Recipe, quantize_model
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gptq_peer.py"), "--model_name", "stories260K", "--runs", "ours minmax",
           "--calib_samples", "4", "--seq_len", "64", "--eval_samples", "2", "--group_size", "4", "--device", "cpu",
           "--results_dir", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    row = pd.read_csv(tmp_path / "bench_gptq.csv").iloc[0]
    assert row.run == "ours minmax" and row.quantize_s > 0 and row.eval_windows == 2
    tok = load_tokenizer("stories260K")
    calib = calib_windows(tokenize(tok, wikitext_text("validation", None)), 4, 64, 0)
    test = eval_windows(tokenize(tok, wikitext_text("test", None)), 64, 2)
    torch.manual_seed(0)
    model = load_model("stories260K", "cpu")
    quantize_model(model, Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=4), method="gptq",
                                 method_args={"act_order": True}), calib.split(4), progress=False)
    assert abs(row.perplexity - evaluate(model, test, 4, "cpu", progress=False, stats=False)["perplexity"]) < 1e-3


def test_fp8_split_parts_are_the_rows_arithmetic(tmp_path, monkeypatch):
    """bench/fp8_split.py's 'weights + activations' part is FP8 W8A8 RTN as quantize_model makes it,
    its 'weights' part FP8 weight-only RTN, to the last bit of the perplexity; every part has a row."""
    import importlib.util

    from llm import eval_windows, evaluate, load_model, load_tokenizer, tokenize, wikitext_text
    from quant import QScheme, Recipe, quantize_model
    monkeypatch.setenv("QUANT_DATA_DIR", DATA)
    spec = importlib.util.spec_from_file_location("fp8_split", os.path.join(ROOT, "bench", "fp8_split.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = os.path.join(DATA, "stories260K")
    rows = bench.main(["--model_name", folder, "--eval_samples", "6", "--seq_len", "64", "--batch_size", "3",
                       "--device", "cpu", "--no_progress", "--results_dir", str(tmp_path), "--a_group_size", "16"])
    got = {r["part"]: r["perplexity"] for r in rows}
    assert len(pd.read_csv(tmp_path / "bench_fp8_split.csv")) == len(rows) == 6 + 7  # 7 layer kinds in a Llama block
    windows = eval_windows(tokenize(load_tokenizer(folder), wikitext_text("test", DATA)), 64, 6)
    w = QScheme(8, granularity="channel", axis=0, format="fp8")
    for part, act, obs in (("weights", None, "minmax"), ("weights + activations", QScheme(8, granularity="token", format="fp8"), "minmax"),
                           ("weights mse + activations g16", QScheme(8, granularity="token", group_size=16, format="fp8"), "mse")):
        model = quantize_model(load_model(folder, "cpu"), Recipe(weight=w, activation=act, w_observer=obs), None, progress=False)
        assert evaluate(model, windows, 3, "cpu", progress=False, stats=False)["perplexity"] == got[part], part
    assert got["weights mse"] != got["weights"]
