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
           "--only", "ours int8 dynamic", "ours int8 weight-only", "--results_dir", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    df = pd.read_csv(tmp_path / "bench_llm.csv")
    assert df.variant.tolist() == ["float", "ours int8 weight-only", "ours int8 dynamic (W8A8)"]
    assert df.code.nunique() == 1 and df.device.eq("cpu").all()  # one run, one machine and code version
    f = df.set_index("variant")
    assert f.loc["float", "speedup_prefill"] == 1.0 and f.loc["float", "speedup_linears_prefill"] == 1.0
    assert (f.linears_prefill_ms > 0).all() and (f.prefill_tokens_per_s > 0).all()
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
