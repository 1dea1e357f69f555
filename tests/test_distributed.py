"""Data-parallel calibration (quant.distributed) with 2 gloo processes on the CPU against one process:
the same quantized weights to float tolerance and the same perplexity, per method; a failing rank
stops the run; ptq_llm under torchrun writes one row per configuration, from rank 0."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT

from quant import QScheme, Recipe

WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
W4G = QScheme(4, symmetric=False, granularity="group", group_size=32)
W8, A8 = QScheme(8, granularity="channel"), QScheme(8, symmetric=False)
RECIPES = {
    "gptq": Recipe(weight=W4G, method="gptq", method_args={"act_order": True}),
    "gptq static minmax": Recipe(weight=W4G, activation=A8, method="gptq", a_observer="minmax"),
    "gptaq": Recipe(weight=W4G, method="gptq", method_args={"gptaq": True}),
    "rtn static minmax": Recipe(weight=W8, activation=A8, a_observer="minmax"),
    "smoothquant": Recipe(weight=W8, activation=A8, method="smoothquant", a_observer="minmax"),
    "awq": Recipe(weight=W4G, method="awq", method_args={"tokens": 200}),  # (a sample that ends inside a batch)
}


def torchrun(args, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + os.getpid() % 1000), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every recipe quantized in one process and under torchrun with 2 ranks (one launch each)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    recipes = [r.to_json() for r in RECIPES.values()]
    done = subprocess.run([sys.executable, WORKER, str(one), *recipes], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    done = torchrun([WORKER, str(two), *recipes])
    assert done.returncode == 0, done.stderr[-2000:]
    return one, two


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_equal_one_process(runs, name):
    i = list(RECIPES).index(name)
    a, b = (torch.load(d / f"{i}.pt", weights_only=False) for d in runs)
    assert (a["world"], b["world"]) == (1, 2)
    assert abs(b["perplexity"] / a["perplexity"] - 1) < 1e-4
    assert a["window_nll"].shape == b["window_nll"].shape  # every window, in order
    assert abs(a["window_nll"] - b["window_nll"]).max() < 1e-4
    assert a["state"].keys() == b["state"].keys()
    for k, x in a["state"].items():
        y = b["state"][k]
        if not torch.is_floating_point(x):
            assert torch.equal(x, y), k
            continue
        # weights land on a grid: a float-order difference can move a value across a rounding
        # boundary, so one grid step in a few elements; scales and ranges to float tolerance
        close = torch.isclose(x, y, rtol=1e-4, atol=1e-6)
        assert close.float().mean() > 0.99, (k, float(close.float().mean()))


def test_a_failing_rank_stops_every_rank(tmp_path):
    done = torchrun([WORKER, str(tmp_path), RECIPES["gptq"].to_json(), "--fail_rank", "1"], timeout=300)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert not list(tmp_path.iterdir())


def test_refused_under_several_ranks(monkeypatch):
    """What is not reduced exactly is refused before anything runs (how a rank's error stops the
    others under torchrun is test_a_failing_rank_stops_every_rank's)."""
    from quant import distributed, quantize_model
    monkeypatch.setattr(distributed, "world", lambda: 2)
    for recipe, why in [(Recipe(weight=QScheme(4, symmetric=False, signed=False, granularity="group", group_size=32),
                                method="signround", method_args={"iters": 2}), "not data-parallel"),
                        (Recipe(weight=W8, activation=A8, a_observer="percentile"), "not reduced exactly")]:
        with pytest.raises(ValueError, match=why):
            quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), recipe, [torch.randn(2, 8)], progress=False)


def test_ptq_llm_under_torchrun(tmp_path):
    """The same rows from 2 ranks as from one process (rank 0 writes them, once), world_size recorded."""
    import pandas as pd
    args = ["--model_name", os.path.join(DATA, "stories260K"), "--data_dir", DATA, "--no_progress", "--seq_len", "64",
            "--eval_samples", "8", "--calib_samples", "8", "--batch_size", "2", "--bits", "4", "--group_size", "32",
            "--act", "none", "static", "--method", "gptq", "--w_asym"]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "ptq_llm.py"), *args, "--results_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun([os.path.join(ROOT, "ptq_llm.py"), *args, "--results_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    a = pd.read_csv(tmp_path / "one" / "ptq_llm.csv")
    b = pd.read_csv(tmp_path / "two" / "ptq_llm.csv")
    assert len(a) == len(b) == 3 and list(b.world_size) == [2, 2, 2] and list(a.world_size) == [1, 1, 1]
    assert ((b.perplexity / a.perplexity - 1).abs() < 1e-4).all()
    assert two.stdout.count("FP32 perplexity") == 1  # one rank speaks


def test_scaling_bench_rows(tmp_path):
    """bench/scaling.py at 1 and 2 gloo ranks: a row each, the same weights, a peak per rank."""
    import pandas as pd
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "scaling.py"), "--ranks", "1", "2", "--device", "cpu",
                           "--model_name", os.path.join(DATA, "stories260K"), "--calib_samples", "8", "--seq_len", "64",
                           "--batch_size", "2", "--group_size", "32", "--results_dir", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, QUANT_DATA_DIR=DATA), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    df = pd.read_csv(tmp_path / "bench_scaling.csv")
    assert list(df.ranks) == [1, 2] and df.same_weights.all() and (df.quantize_s > 0).all()
    assert [len(str(p).split()) for p in df.peak_mb_per_rank] == [1, 2]
