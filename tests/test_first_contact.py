"""What a new user meets first, on a fresh clone: the quick tour, one-line errors for bad configs,
flags and interruptions, and errors before any weights load."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import DATA, ROOT


def run(script, *args, cwd, timeout=600):
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return r, time.time() - t0


def test_tour_runs_end_to_end_from_any_folder(tmp_path):
    """`python main.py` with no flags: the quick tour on the repository's data, one summary table."""
    r, seconds = run("main.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout[r.stdout.index("== tour summary"):]
    for needle in ("MNIST PTQ", "MNIST QAT", "stories260K PTQ", "W4A8 channel minmax", "W4 g32", "gptq", "qat_ste"):
        assert needle in summary
    tour = tmp_path / "results" / "tour"
    nn, qat, llm = (pd.read_csv(tour / f"{n}.csv") for n in ("ptq_nn", "qat_nn", "ptq_llm"))
    assert len(nn) == 10 and len(qat) == 3 and len(llm) == 5
    assert nn[nn.method == "fp32"].accuracy.iloc[0] > 95
    fp32 = llm[llm.method == "fp32"].perplexity.iloc[0]
    w4 = llm[(llm.w_bits == 4)].set_index("method").perplexity
    assert w4["gptq"] < w4["rtn"] and fp32 < w4["gptq"]
    assert not os.path.exists(tmp_path / "results" / "ptq_nn.csv")  # the committed tables are never touched
    assert seconds < 180


@pytest.mark.parametrize("script", ["main.py", "ptq_nn.py", "qat_nn.py", "ptq_llm.py"])
def test_missing_and_malformed_config(tmp_path, script):
    """Each script, run as a user runs it, answers a missing config with one line and exit code 2
    (cli.run, which every script ends with); the malformed configs' messages are checked in-process
    (the same parse_with_config), which spares two interpreter starts per script."""
    import importlib

    from cli import UsageError
    r, _ = run(script, "--config", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "no such file missing.yaml" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    main = importlib.import_module(script[:-3]).main
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: [8, 4\nobservers: minmax\n")
    with pytest.raises(UsageError, match=r"cannot read .*bad\.yaml"):
        main(["--config", str(bad)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 8\n- 4\n")
    with pytest.raises(UsageError, match="mapping"):
        main(["--config", str(listed)])


def test_script_run_directly_with_a_config(tmp_path):
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("bits: [4]\nobservers: [minmax]\ngranularity: [channel]\nepochs: 1\ntrain_subset: 2000\n"
                   "test_subset: 500\ncalib_samples: 64\n")
    r, _ = run("ptq_nn.py", "--config", str(cfg), "--no_progress", "--results_dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "r" / "ptq_nn.csv")
    assert rows.w_bits.tolist() == [32, 4] and rows.epochs.tolist() == [1, 1] and rows.train_subset.tolist() == [2000, 2000]


@pytest.mark.parametrize("script,args", [("main.py", ["--calib", "5"]), ("ptq_nn.py", ["--calib", "5"]),
                                         ("main.py", ["--exp", "qat_nn"]), ("bench/speed.py", ["mlp", "--rep", "3"]),
                                         ("report.py", ["--results", "x"])])
def test_abbreviated_flags_are_refused(tmp_path, script, args):
    r, _ = run(script, *args, cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_is_one_line_and_keeps_finished_rows(tmp_path):
    out = tmp_path / "r" / "ptq_nn.csv"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "ptq_nn.py"), "--results_dir", str(tmp_path / "r"),
                          "--retrain", "--epochs", "1", "--train_subset", "2000", "--no_progress",
                          "--bits", "8", "4", "3", "2", "--observers", "minmax", "ema", "percentile", "mse", "entropy",
                          "--calib_samples", "1000"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         # a suite started in the background (nohup ... &) ignores SIGINT and the child would
                         # inherit that: give it the disposition a terminal's Ctrl-C meets
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and len(pd.read_csv(out)) >= 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr and "Traceback" not in stderr
    rows = pd.read_csv(out)
    assert 2 <= len(rows) < 41 and rows.method.iloc[0] == "fp32"
    assert [f for f in os.listdir(tmp_path / "r")] == ["ptq_nn.csv"]  # nothing half-written


def test_llm_errors_before_weights_load(tmp_path):
    """Missing data and unwritable outputs are reported within seconds, before the model loads."""
    empty = tmp_path / "empty"
    empty.mkdir()
    blocked = tmp_path / "file"
    blocked.write_text("")
    r, seconds = run("ptq_llm.py", "--model_name", "stories260K", "--results_dir", str(blocked / "r"), cwd=tmp_path)
    assert r.returncode == 2 and "--results_dir" in r.stderr and "not writable" in r.stderr and seconds < 30
    r, seconds = run("ptq_llm.py", "--model_name", "stories260K", "--save_model", "--models_dir", str(blocked / "m"),
                     "--results_dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 2 and "--models_dir" in r.stderr and seconds < 30
    assert not os.path.exists(tmp_path / "r")


def test_data_readme_names_every_file():
    text = open(os.path.join(DATA, "README.md")).read()
    for line in open(os.path.join(DATA, "SHA256SUMS")):
        if line.strip() and not line.startswith("#"):
            assert line.split()[1].split("/")[0] in text
    for licence in ("CC BY-SA 3.0", "MIT"):
        assert licence in text
