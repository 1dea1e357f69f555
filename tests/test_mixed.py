"""Mixed precision under a byte budget: the allocator (exact against brute force, within its budget,
cheap layers first), the byte counts it plans with (equal to what a checkpoint stores), the
per-layer sensitivities (an independent recomputation), recipes with per-layer schemes, and
ptq_llm --budget_bits / --budget_bytes end to end on stories260K and a tiny GPT-2."""
import copy
import itertools
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

import ptq_llm
from llm import load_model
from quant import QScheme, Recipe, quant_modules, quantize_linears, quantize_model, quantized_size_bytes
from quant.checkpoint import bits_per_weight, export_tensors, layer_nbytes
from quant.mixed import allocate, layer_costs, sensitivity, target_layers

STORIES = os.path.join(DATA, "stories260K")
G4 = QScheme(4, symmetric=False, granularity="group", group_size=32)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.randoms(use_true_random=False), st.floats(0, 1.2))
def test_allocate_is_optimal_and_within_budget(layers, cands, rnd, frac):
    costs = np.array([[rnd.randint(1, 60) for _ in range(cands)] for _ in range(layers)])
    sens = np.array([[rnd.random() for _ in range(cands)] for _ in range(layers)])
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    budget = int(lo + frac * (hi - lo))
    brute = min(sum(sens[i, c] for i, c in enumerate(p)) for p in itertools.product(range(cands), repeat=layers)
                if sum(costs[i, c] for i, c in enumerate(p)) <= budget)
    pick = allocate(costs, sens, budget)
    assert sum(costs[i, c] for i, c in enumerate(pick)) <= budget
    assert sum(sens[i, c] for i, c in enumerate(pick)) == pytest.approx(brute, abs=1e-12)
    coarse = allocate(costs, sens, budget, cells=3)  # steps coarser than the costs: still within the budget
    assert sum(costs[i, c] for i, c in enumerate(coarse)) <= budget


def test_allocate_upgrades_the_sensitive_layers_first():
    # five layers at 2 or 4 bits (200 or 400 bytes); the sensitivities, in a shuffled layer order, differ by 10x steps
    weight = np.array([[100], [1], [10000], [10], [1000]])
    costs, sens = np.array([[200, 400]] * 5), np.array([[8.0, 2.0]]) * weight
    order = list(np.argsort(-weight[:, 0]))  # most sensitive first
    for k in range(6):
        for spare in (0, 199):  # bytes short of the next upgrade change nothing
            pick = allocate(costs, sens, 1000 + 200 * k + spare)
            assert [i for i in range(5) if pick[i] == 1] == sorted(order[:k])
    # a third choice: 8 bits for the most sensitive layer beats 4 bits for the next two at the same bytes
    costs3, sens3 = np.array([[200, 400, 800]] * 5), np.hstack([sens, 0.01 * weight])
    assert allocate(costs3, sens3, 1600) == [0, 0, 2, 0, 0]
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate(costs, sens, 999)


@pytest.mark.parametrize("scheme,fractional", [
    (QScheme(4, symmetric=False, granularity="group", group_size=48), False),  # padded last groups
    (QScheme(3, granularity="group", group_size=10), False),
    (QScheme(2, symmetric=False, granularity="channel"), False),
    (QScheme(8, granularity="tensor"), False),
    (QScheme(4, symmetric=False, granularity="group", group_size=32), True),  # HQQ's float16 zero points
])
def test_layer_nbytes_is_what_the_checkpoint_stores(scheme, fractional):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 50), torch.nn.Linear(50, 24))
    if fractional:
        quantize_model(model, Recipe(weight=scheme, method="hqq"))
    else:
        quantize_linears(model, scheme)
    tensors, _ = export_tensors(model)
    for name, m in quant_modules(model).items():
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                     if k.startswith(f"{name}.") and k.split(".", 1)[1] in ("qweight", "weight_scale", "weight_zero_point"))
        assert layer_nbytes(m.out_features, m.in_features, m.weight_quant.scheme, m.weight_quant.fractional) == stored
        assert m.weight_quant.fractional == fractional
    numel = sum(m.weight.numel() for m in quant_modules(model).values())
    costs = layer_costs(model, [scheme], list(quant_modules(model)), fractional=fractional)
    assert bits_per_weight(model) == pytest.approx(8 * costs.sum() / numel)


def test_recipe_layer_weights():
    base = Recipe(weight=G4)
    mixed = Recipe(weight=G4, layer_weights={"b": QScheme(8, granularity="channel"), "a": QScheme(2, granularity="channel")})
    assert [n for n, _ in mixed.layer_weights] == ["a", "b"]
    assert "layer_weights" not in base.to_dict() and mixed.id != base.id
    assert Recipe.from_json(mixed.to_json()) == mixed and Recipe.from_json(mixed.to_json()).id == mixed.id
    assert "mixed [int2 sym per-channel(axis=0) x1, int8 sym per-channel(axis=0) x1]" in mixed.describe()
    with pytest.raises(ValueError, match="static weight QSchemes"):
        Recipe(weight=G4, layer_weights={"a": QScheme(8, granularity="token")})
    with pytest.raises(ValueError, match="symmetric scheme"):
        Recipe(weight=G4, method="hqq", layer_weights={"a": QScheme(4, granularity="channel")})
    with pytest.raises(ValueError, match="did not quantize"):  # a name that is not a layer of the model
        quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), Recipe(weight=G4, layer_weights={"9": G4}))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "signround"])
def test_quantize_model_gives_each_layer_its_scheme(method):
    model = load_model(STORIES, "cpu")
    names = list(target_layers(model))
    own = {n: [QScheme(2, symmetric=False, granularity="channel"), QScheme(8, symmetric=False, granularity="channel"),
               QScheme(3, symmetric=False, granularity="group", group_size=16)][i % 3] for i, n in enumerate(names)}
    recipe = Recipe(weight=G4, method=method, layer_weights=own,
                    method_args={"iters": 2} if method == "signround" else {})
    calib = [torch.randint(0, 512, (2, 32))]
    quantize_model(model, recipe, calib=calib, progress=False)
    got = {n: m.weight_quant.scheme for n, m in quant_modules(model).items()}
    assert got == own


def test_sensitivity_matches_an_independent_recomputation():
    model = load_model(STORIES, "cpu")
    before = copy.deepcopy(model.state_dict())
    cands = [QScheme(2, symmetric=False, granularity="channel"), QScheme(4, symmetric=False, granularity="group", group_size=32),
             QScheme(8, symmetric=False, granularity="channel")]
    ids = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    sens = sensitivity(model, cands, batches, progress=False)
    for k, v in model.state_dict().items():  # every weight put back exactly
        assert torch.equal(v, before[k]), k
    assert list(sens) == list(target_layers(model)) and all(len(row) == 3 for row in sens.values())
    kl = np.array(list(sens.values()))
    assert (kl >= 0).all() and (kl[:, 0] > kl[:, 1]).mean() > 0.9 and (kl[:, 1] > kl[:, 2]).all()
    # the KL of one layer at one scheme, by another route: a copy with only that layer swapped for a QuantLinear
    name = list(sens)[5]
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        for j, cand in enumerate(cands):
            q = copy.deepcopy(model)
            quantize_linears(q, cand, include=(name,))
            logq = q(ids).logits.log_softmax(-1)
            direct = torch.nn.functional.kl_div(logq, ref, log_target=True, reduction="sum") / ref.shape[:-1].numel()
            assert sens[name][j] == pytest.approx(float(direct), rel=1e-4, abs=1e-9)


def args_for(model, tmp_path, *extra):
    return ["--model_name", model, "--data_dir", DATA, "--results_dir", str(tmp_path / "results"),
            "--models_dir", str(tmp_path / "models"), "--no_progress", "--act", "none", "--w_asym", "--calib_samples", "4",
            "--eval_samples", "4", "--mp_samples", "2", *extra]


@pytest.mark.parametrize("which", ["stories", "gpt2"])
def test_ptq_llm_budgets_end_to_end(which, tiny_gpt2, tmp_path, capsys):
    source = STORIES if which == "stories" else tiny_gpt2
    seq = ["--seq_len", "64"]
    uniform = ptq_llm.main(args_for(source, tmp_path, *seq, "--bits", "3", "--group_size", "32"))
    w3 = uniform[1]
    rows = ptq_llm.main(args_for(source, tmp_path, *seq, "--skip_fp32", "--method", "rtn", "gptq",
                                 "--budget_bytes", str(w3["size_bytes"]), "--budget_bits", "3.3", "--mp_groups", "32", "0"))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"rtn", "gptq"}
    for r in rows:
        if r["budget"].endswith("bytes"):
            assert r["size_bytes"] <= w3["size_bytes"]
        else:
            assert r["bits_per_weight"] <= 3.3
        assert r["mix"] and Recipe.from_json(r["recipe"]).layer_weights
    out = capsys.readouterr().out
    assert out.count("layer sensitivities of") == 1  # measured once for both methods and budgets
    sens_csv = pd.read_csv(tmp_path / "results" / "sensitivity.csv")
    model = load_model(source, "cpu")
    assert len(sens_csv) == len(target_layers(model)) * 7  # 2, 3, 4 bits x (g32, per-channel) + 8 bits
    # the same settings again: the cached sensitivities are reused, nothing new lands in sensitivity.csv
    again = ptq_llm.main(args_for(source, tmp_path, *seq, "--skip_fp32", "--method", "rtn",
                                  "--budget_bytes", str(w3["size_bytes"]), "--mp_groups", "32", "0"))
    assert "kept" in capsys.readouterr().out and len(pd.read_csv(tmp_path / "results" / "sensitivity.csv")) == len(sens_csv)
    assert again[0]["recipe_id"] == rows[1]["recipe_id"] and again[0]["perplexity"] == rows[1]["perplexity"]
    # other settings (more windows): measured afresh, never the cached table
    ptq_llm.main(args_for(source, tmp_path, *seq, "--skip_fp32", "--method", "rtn", "--mp_samples", "3",
                          "--budget_bytes", str(w3["size_bytes"]), "--mp_groups", "32", "0"))
    assert "layer sensitivities of" in capsys.readouterr().out
    # the saved quantized size is what the allocation planned
    q = copy.deepcopy(model)
    quantize_model(q, Recipe.from_json(rows[1]["recipe"]), calib=[torch.randint(0, 100, (1, 16))], progress=False)
    assert quantized_size_bytes(q) == rows[1]["size_bytes"]


def test_ptq_llm_budget_bad_input(tmp_path):
    from cli import UsageError
    with pytest.raises(UsageError, match="below the cheapest allocation"):
        ptq_llm.main(args_for(STORIES, tmp_path, "--seq_len", "64", "--budget_bits", "1.5"))
    with pytest.raises(UsageError, match="drop --export"):
        ptq_llm.main(args_for(STORIES, tmp_path, "--seq_len", "64", "--budget_bits", "3", "--export", "gguf"))
    assert not os.path.exists(tmp_path / "results" / "ptq_llm.csv")
