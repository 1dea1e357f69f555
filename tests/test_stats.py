"""Intervals and the distance from the float model: bootstrap coverage on synthetic data, KL
divergence against a direct full-vocabulary computation, the float model against itself, and the
columns every ptq_llm row carries."""
import copy
import os

import numpy as np
import pytest
import torch
from conftest import DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

import ptq_llm
from llm import eval_windows, evaluate, tokenize, wikitext_text
from quant import QScheme, Recipe, quantize_model
from stats import bootstrap_mean

STORIES = os.path.join(DATA, "stories260K")


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    trials, hits = 300, 0
    for _ in range(trials):
        x = rng.gamma(2.0, 1.5, size=80)  # skewed, like per-window losses; true mean 3.0
        lo, hi = bootstrap_mean(x, resamples=500, seed=int(rng.integers(1 << 30)))
        hits += lo <= 3.0 <= hi
    assert 0.90 <= hits / trials <= 0.98


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.arange(20.0)
    assert bootstrap_mean(x) == bootstrap_mean(x)
    lo, hi = bootstrap_mean(x)
    assert lo < x.mean() < hi
    assert bootstrap_mean(np.full(30, 2.0)) == (2.0, 2.0)


@pytest.fixture(scope="module")
def models():
    tok = AutoTokenizer.from_pretrained(STORIES)
    windows = eval_windows(tokenize(tok, wikitext_text("test", None)), 256, 16)
    f = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    q = quantize_model(copy.deepcopy(f), Recipe(weight=QScheme(4, granularity="group", group_size=32), group_fallback=True),
                       None, progress=False)
    return f, q, windows


def test_float_model_against_itself(models):
    f, _, windows = models
    ref = evaluate(f, windows, 4, "cpu", False, keep_reference=32)["reference"]
    r = evaluate(f, windows, 4, "cpu", False, reference=ref)
    assert np.abs(r["kld_tokens"]).max() < 1e-6 and r["top1_agree"] == 1.0


@torch.no_grad()
def test_kld_matches_the_full_vocabulary_computation(models):
    f, q, windows = models
    ref = evaluate(f, windows, 4, "cpu", False, keep_reference=32)["reference"]
    r = evaluate(q, windows, 4, "cpu", False, reference=ref)
    lp = f(windows).logits[:, :-1].float().log_softmax(-1)
    lq = q(windows).logits[:, :-1].float().log_softmax(-1)
    exact = (lp.exp() * (lp - lq)).sum(-1).reshape(-1)
    assert abs(r["kld_tokens"].mean() - float(exact.mean())) / float(exact.mean()) < 0.01
    agree = (lq.argmax(-1) == lp.argmax(-1)).double().mean()
    assert r["top1_agree"] == pytest.approx(float(agree), abs=1e-12)
    # the perplexity is the one every table reports, unchanged by the extra statistics
    assert r["perplexity"] == evaluate(q, windows, 4, "cpu", False, stats=False)["perplexity"]
    assert np.exp(r["window_nll"].mean()) == pytest.approx(r["perplexity"], rel=1e-6)


def test_ptq_llm_rows_carry_intervals_and_distance(tmp_path):
    rows = ptq_llm.main(["--model_name", STORIES, "--results_dir", str(tmp_path), "--no_progress", "--seq_len", "128",
                         "--eval_samples", "16", "--calib_samples", "4", "--bits", "4", "--group_size", "32", "--act", "none"])
    fp32, w4 = rows
    assert (fp32["kld"], fp32["top1_agree"], fp32["ln_ppl_ratio"]) == (0.0, 1.0, 0.0)
    for r in rows:
        assert r["ppl_ci_low"] < r["perplexity"] < r["ppl_ci_high"]
    assert 0 < w4["kld_ci_low"] < w4["kld"] < w4["kld_ci_high"] < w4["kld_p99"]
    assert 0 < w4["top1_agree"] < 1
    assert w4["ln_ppl_ratio"] == pytest.approx(np.log(w4["perplexity"] / fp32["perplexity"]), rel=1e-4)
    assert w4["ln_ppl_ratio_ci_low"] < w4["ln_ppl_ratio"] < w4["ln_ppl_ratio_ci_high"]
    skipped = ptq_llm.main(["--model_name", STORIES, "--results_dir", str(tmp_path / "s"), "--no_progress", "--seq_len", "128",
                            "--eval_samples", "16", "--bits", "4", "--group_size", "32", "--act", "none", "--skip_fp32"])
    assert "kld" not in skipped[0] and skipped[0]["ppl_ci_low"] < skipped[0]["perplexity"]  # no float pass, no reference


@torch.no_grad()
def test_evaluation_arithmetic_is_the_plain_definition(models):
    """The evaluation's shortcuts change no number: its NLL sum is F.cross_entropy's over each batch,
    and the reference's draws, taken in slices of rows, are one torch.multinomial call's."""
    import torch.nn.functional as F

    from llm import FloatReference
    f, _, windows = models
    r = evaluate(f, windows[:4], 4, "cpu", False)
    logits = f(windows[:4]).logits
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:4, 1:].reshape(-1), reduction="sum"))
    assert r["perplexity"] == float(torch.exp(torch.tensor(nll / windows[:4, 1:].numel())))
    # (the evaluation asks the model for the predicting positions only: the same numbers as a full call's,
    # per window too, and from a model whose forward cannot be asked)
    logq = logits[:, :-1].reshape(-1, logits.shape[-1]).log_softmax(-1)
    per_window = -logq.gather(-1, windows[:4, 1:].reshape(-1, 1)).reshape(4, -1).mean(1)
    assert torch.equal(torch.from_numpy(r["window_nll"]), per_window.double())

    class Plain(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids)
    assert evaluate(Plain(f), windows[:4], 4, "cpu", False, stats=False)["perplexity"] == r["perplexity"]
    torch.manual_seed(0)
    logp = (torch.randn(300, 40000) * 3).log_softmax(-1)  # more rows than one slice holds at this vocabulary
    ref = FloatReference(8, 16)
    ref.add(logp)
    ref.done()
    tail = logp.exp().scatter_(-1, logp.topk(8, -1).indices, 0.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ref.draws.long(), torch.multinomial(tail, 16, replacement=True, generator=gen))
