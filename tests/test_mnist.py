"""End-to-end runs of ptq_nn.py and qat_nn.py on a subset of the real MNIST files."""
import gzip
import lzma
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

import ptq_nn
import qat_nn
from cli import UsageError
from mnist import load_mnist, read_idx
from tests.conftest import DATA, ROOT

QUICK = ["--train_subset", "12000", "--test_subset", "2000", "--epochs", "3", "--no_progress", "--calib_samples", "256"]


def quick_args(tmp_path, *extra):
    return ["--data_dir", DATA, "--results_dir", str(tmp_path / "results"),
            "--models_dir", str(tmp_path / "models"), *QUICK, *extra]


def test_ptq_nn_end_to_end(tmp_path):
    rows = ptq_nn.main(quick_args(tmp_path, "--bits", "8", "2", "--observers", "minmax", "entropy", "--save_model"))
    df = pd.read_csv(tmp_path / "results" / "ptq_nn.csv")
    assert len(df) == len(rows) == 1 + 2 * 2 * 2
    for col in ["timestamp", "experiment", "method", "w_bits", "a_bits", "observer", "granularity", "calib_samples",
                "accuracy", "fp32_accuracy", "size_bytes", "fp32_size_bytes", "seconds", "seed"]:
        assert col in df.columns
    fp32 = df[df.method == "fp32"].iloc[0]
    assert fp32.accuracy > 85 and fp32.size_bytes == (784 * 128 + 128 + 128 * 10 + 10) * 4
    w8 = df[(df.w_bits == 8) & (df.observer == "minmax")]
    assert (abs(w8.accuracy - fp32.accuracy) < 1.0).all()
    w2 = df[(df.w_bits == 2)]
    assert (w2.accuracy < fp32.accuracy).all()
    # real packed sizes: 2-bit weights take a quarter of the 8-bit bytes (plus scales)
    assert (w2.size_bytes < df[df.w_bits == 8].size_bytes.min() / 2).all()
    # intervals and flips against the float model (itself: none)
    assert (df.acc_ci_low < df.accuracy).all() and (df.accuracy < df.acc_ci_high).all()
    assert (fp32.flips, fp32.flips_right_to_wrong, fp32.flips_wrong_to_right) == (0, 0, 0)
    assert (w2.flips > 0).all() and (w2.flips >= w2.flips_right_to_wrong + w2.flips_wrong_to_right).all()
    # the accuracy moves by exactly the net flips: wrong -> right minus right -> wrong
    assert ((w2.accuracy - fp32.accuracy) - (w2.flips_wrong_to_right - w2.flips_right_to_wrong)).abs().max() < 1e-9
    import report
    assert "predictions changed from FP32" in report.ptq_nn(df, str(tmp_path))
    saved = os.listdir(tmp_path / "models" / "ptq_nn")
    assert len(saved) == 8 and all(os.path.exists(tmp_path / "models" / "ptq_nn" / s / "model.safetensors") for s in saved)


def test_qat_nn_end_to_end_beats_ptq_at_2_bits(tmp_path):
    ptq_nn.main(quick_args(tmp_path, "--bits", "8", "--observers", "minmax", "--save_model"))
    rows = qat_nn.main(quick_args(tmp_path, "--bits", "2", "--qat_epochs", "1"))
    df = pd.read_csv(tmp_path / "results" / "qat_nn.csv")
    assert len(df) == len(rows) == 2
    q = df[df.method == "qat_ste"].iloc[0]
    assert q.w_bits == 2 and q.a_bits == 8
    assert q.accuracy > q.ptq_accuracy and q.accuracy > q.fp32_accuracy - 1.5


def test_checkpoint_reuse_and_determinism(tmp_path, capsys):
    args = quick_args(tmp_path, "--bits", "4", "--observers", "mse", "--granularity", "channel")
    first = ptq_nn.main(args + ["--save_model"])
    assert "saved FP32 checkpoint" in capsys.readouterr().out
    second = ptq_nn.main(args)
    assert "reusing FP32 checkpoint" in capsys.readouterr().out
    retrained = ptq_nn.main(args + ["--retrain"])
    for a, b, c in zip(first, second, retrained):
        assert a["accuracy"] == b["accuracy"] == c["accuracy"]
    df = pd.read_csv(tmp_path / "results" / "ptq_nn.csv")
    assert len(df) == 6  # appended three times, nothing clobbered


def test_corrupt_idx_files(tmp_path):
    src = os.path.join(DATA, "mnist", "t10k-labels-idx1-ubyte.xz")
    key = "mnist/t10k-labels-idx1-ubyte"
    raw = lzma.decompress(open(src, "rb").read())
    assert read_idx(src, 2049, key).shape == (10000,)
    # the repository's files are checksummed: a truncated or altered file is a one-line error
    truncated = tmp_path / "t10k-labels-idx1-ubyte"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(UsageError, match="checksum mismatch for .*t10k-labels-idx1-ubyte") as e:
        read_idx(str(truncated), 2049, key)
    assert "\n" not in str(e.value)
    altered = tmp_path / "altered.gz"
    altered.write_bytes(gzip.compress(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:]))
    with pytest.raises(UsageError, match="checksum mismatch"):
        read_idx(str(altered), 2049, key)
    intact = tmp_path / "intact.gz"
    intact.write_bytes(gzip.compress(raw))
    assert read_idx(str(intact), 2049, key).shape == (10000,)  # the content is checked, not the archive
    # files outside the checksum list still get the IDX header and length checks
    with pytest.raises(UsageError, match="truncated.*t10k-labels"):
        read_idx(str(truncated), 2049, "mnist/unlisted")
    bad_magic = tmp_path / "bad-idx1-ubyte"
    bad_magic.write_bytes(b"\x00\x00\x08\x03" + raw[4:])
    with pytest.raises(UsageError, match="magic number 2051, expected 2049"):
        read_idx(str(bad_magic), 2049, "mnist/unlisted")
    bad_xz = tmp_path / "broken.xz"
    bad_xz.write_bytes(open(src, "rb").read()[:100])
    with pytest.raises(UsageError, match="corrupt data file .*broken.xz"):
        read_idx(str(bad_xz), 2049, key)


def test_data_lookup_order(tmp_path, monkeypatch):
    """--data_dir, then $QUANT_DATA_DIR, then the repository's data/: the first that holds a file wins."""
    from mnist import mnist_paths
    assert mnist_paths(None)["test"][1].startswith(DATA)
    env, flag = tmp_path / "env" / "mnist", tmp_path / "flag" / "mnist"
    env.mkdir(parents=True), flag.mkdir(parents=True)
    for folder in (env, flag):
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("QUANT_DATA_DIR", str(tmp_path / "env"))
    paths = mnist_paths(str(tmp_path / "flag"))
    assert paths["test"][1].startswith(str(flag)) and paths["test"][0].startswith(DATA)
    assert mnist_paths(None)["test"][1].startswith(str(env))


def test_missing_data_fails_fast_with_location(tmp_path, monkeypatch):
    import paths
    monkeypatch.setattr(paths, "REPO_DATA", str(tmp_path / "no-data"))
    t0 = time.time()
    with pytest.raises(UsageError, match=f"MNIST not found .*{tmp_path}.*hub is unreachable.*--data_dir"):
        load_mnist(str(tmp_path))
    assert time.time() - t0 < 5


def run_main(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args,flag", [(["--bits", "0"], "--bits"), (["--bits", "9"], "--bits"),
                                       (["--calib_samples", "-5"], "--calib_samples"),
                                       (["--observers", "kmeans"], "--observers"), (["--nope"], "--nope"),
                                       (["--save_model=maybe"], "--save_model"),
                                       (["--experiment", "qat_nn", "--qat_epochs", "0"], "--qat_epochs")])
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, args, flag):
    r = run_main(*args, "--results_dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "r")


def test_save_model_flag_forms():
    parser = ptq_nn.build_parser()
    assert parser.parse_args(["--save_model"]).save_model is True
    for text, value in [("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False)]:
        assert parser.parse_args([f"--save_model={text}"]).save_model is value
    assert parser.parse_args([]).save_model is False


def test_quick_runs_checkpoint_is_not_reused_by_other_settings(tmp_path, capsys):
    """An FP32 checkpoint is named by everything that trained it: a quick run's is never reused by a longer one."""
    base = ["--data_dir", DATA, "--results_dir", str(tmp_path / "r"), "--models_dir", str(tmp_path / "m"), "--no_progress",
            "--test_subset", "500", "--calib_samples", "64", "--bits", "8", "--observers", "minmax", "--granularity",
            "channel", "--save_model"]
    quick = ptq_nn.main(base + ["--train_subset", "300", "--epochs", "1"])
    assert "saved FP32 checkpoint" in capsys.readouterr().out
    longer = ptq_nn.main(base + ["--train_subset", "3000", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "reusing" not in out and "saved FP32 checkpoint" in out
    assert longer[0]["accuracy"] > quick[0]["accuracy"] and longer[0]["fp32_id"] != quick[0]["fp32_id"]
    again = ptq_nn.main(base + ["--train_subset", "300", "--epochs", "1"])
    assert "reusing FP32 checkpoint" in capsys.readouterr().out and again[0]["accuracy"] == quick[0]["accuracy"]
    assert len([f for f in os.listdir(tmp_path / "m") if f.endswith(".pt")]) == 2


def test_flips_on_a_constructed_case():
    import torch

    from mnist import scored
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    fp32 = torch.tensor([0, 1, 2, 3, 9, 9, 6, 7])  # right on 6 of 8
    q = torch.tensor([0, 1, 2, 8, 4, 9, 6, 5])    # 3 and 7 break, 4 is fixed, 5 stays wrong
    s = scored(q, y, fp32)
    assert s["accuracy"] == 62.5 and s["flips"] == 37.5
    assert (s["flips_right_to_wrong"], s["flips_wrong_to_right"]) == (25.0, 12.5)
    assert scored(fp32, y, fp32)["flips"] == 0.0


def test_seeds_train_calibrate_and_report_each(tmp_path):
    """--seeds 2: an FP32 training, a calibration sample and a row per seed; the report's cells are
    mean ± std over the seeds (ddof 1) and its plot has error bars."""
    rows = ptq_nn.main(quick_args(tmp_path, "--bits", "4", "--observers", "minmax", "--granularity", "channel",
                                  "--epochs", "1", "--seeds", "2"))
    assert [(r["method"], r["seed"]) for r in rows] == [("fp32", 0), ("ptq", 0), ("fp32", 1), ("ptq", 1)]
    assert rows[0]["fp32_id"] != rows[2]["fp32_id"] and rows[0]["accuracy"] != rows[2]["accuracy"]
    import report
    df = pd.read_csv(tmp_path / "results" / "ptq_nn.csv")
    text = report.ptq_nn(df, str(tmp_path))
    acc = pd.Series([rows[1]["accuracy"], rows[3]["accuracy"]])
    assert f"| {acc.mean():.2f} ± {acc.std():.2f} |" in text and "seeds 0, 1: mean ± std over seeds" in text
    fp32 = pd.Series([rows[0]["accuracy"], rows[2]["accuracy"]])
    assert f"FP32 accuracy {fp32.mean():.2f} ± {fp32.std():.2f} %" in text
