"""GPTQ, AWQ and SmoothQuant with sequential calibration, on stories260K and a tiny GPT-2."""
import copy
import os

import pytest
import torch
from conftest import DATA

import ptq_llm
from llm import calib_windows, tokenize, wikitext_text
from quant import QScheme, Quantizer, Recipe, quantize_linears
from quant.arch import decoder_blocks, is_linear, scale_groups, weight_matrix
from quant.gptq import Hessian, gptq_block, gptq_quantize
from quant.modules import layer_scheme
from quant.sequential import collect_inputs, first_block_inputs, run_block, sequential_quantize
from quant.smoothing import awq_block, smooth_block


def load(source, n=8, seq_len=64):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    tok = AutoTokenizer.from_pretrained(source)
    ids = tokenize(tok, wikitext_text("validation", DATA))
    return model, calib_windows(ids, n, seq_len, seed=0).split(4)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2-alg")
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257))
    with torch.no_grad():  # outlier channels, as trained LLMs have, so that smoothing has work to do
        for block in model.transformer.h:
            block.ln_1.weight[:4] *= 20
            block.ln_2.weight[5:8] *= 15
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(DATA, "gpt2-tokenizer")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["stories", "gpt2"])
def source(request, tiny_gpt2):
    return os.path.join(DATA, "stories260K") if request.param == "stories" else tiny_gpt2


W4 = QScheme(4, granularity="group", group_size=32)


def scheme_for(name, m):
    return layer_scheme(W4, weight_matrix(m).shape[1])


@torch.no_grad()
def block_error(block, inputs, ref_outputs):
    return sum(float((run_block(block, *inp) - ref).pow(2).mean()) for inp, ref in zip(inputs, ref_outputs))


def test_sequential_finds_blocks_and_propagates(source):
    model, batches = load(source)
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    seen = []
    sequential_quantize(model, batches, "cpu", lambda i, block, inputs: seen.append((i, len(inputs))), progress=False)
    assert seen == [(i, len(batches)) for i in range(len(blocks))]


def test_gptq_reduces_layer_output_error_against_rtn(source):
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    xs, hs = {}, {n: Hessian(weight_matrix(m).shape[1]) for n, m in linears.items()}

    def observe(name, x):
        hs[name].add(x)
        xs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
    collect_inputs(block, inputs, linears, observe)
    total_gptq = total_rtn = 0.0
    for name, m in linears.items():
        w, x = weight_matrix(m).detach(), torch.cat(xs[name])
        scheme = scheme_for(name, m)
        q, _, _ = gptq_quantize(w, hs[name].H, scheme)
        rtn = Quantizer(scheme)
        rtn.fit(w)
        r = x @ w.t()
        total_gptq += float((x @ q.t() - r).pow(2).sum())
        total_rtn += float((x @ rtn(w).t() - r).pow(2).sum())
    assert total_gptq < 0.8 * total_rtn


def test_collect_inputs_stops_once_every_module_has_its_input(source):
    """Observing only the first layers' inputs gives the same inputs as a full forward and never
    runs the rest of the block."""
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    first, last = next(iter(linears)), list(linears)[-1]
    full, early, ran_last = [], [], []
    collect_inputs(block, inputs, linears, lambda name, x: full.append(x.clone()) if name == first else None)
    handle = linears[last].register_forward_pre_hook(lambda *a: ran_last.append(1))
    try:
        collect_inputs(block, inputs, {first: linears[first]}, lambda name, x: early.append(x.clone()))
    finally:
        handle.remove()
    assert not ran_last and len(early) == len(full) == len(inputs)
    assert all(torch.equal(a, b) for a, b in zip(early, full))


@pytest.mark.parametrize("act_order,mse", [(False, False), (True, True)])
def test_gptq_block_stacks_layers_sharing_a_hessian_exactly(source, act_order, mse):
    """q/k/v (and gate/up) go through one GPTQ call on their stacked rows: the same weights,
    scales and zero points as one call per layer on the shared Hessian."""
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    groups = [[n for n in cons if n in linears] for _, _, cons in scale_groups(block, norms_only=True)]
    lead = max(groups, key=len)
    if len(lead) == 1:
        pytest.skip("GPT-2 fuses q/k/v into one layer and has no gate/up: no layers share a Hessian")
    hessian = Hessian(weight_matrix(linears[lead[0]]).shape[1])
    collect_inputs(block, inputs, {lead[0]: linears[lead[0]]}, lambda name, x: hessian.add(x))
    want = {n: gptq_quantize(weight_matrix(linears[n]), hessian.H, scheme_for(n, linears[n]), act_order=act_order, mse=mse)
            for n in lead}
    gptq_block(block, inputs, scheme_for, act_order=act_order, mse=mse)
    for n in lead:
        got = block.get_submodule(n)
        q, scale, zp = want[n]
        assert torch.equal(weight_matrix(got), q)
        assert torch.equal(got.weight_quant.scale, scale) and torch.equal(got.weight_quant.zero_point, zp)
        assert got.weight_quant.scale.untyped_storage().nbytes() == scale.numel() * 4  # its own storage, not the stack's


def test_gptq_layerwise_takes_every_hessian_from_the_float_block(source):
    """true_sequential=False: each layer is quantized on the Hessian of its input in the float block
    (llm-compressor's pipeline); true-sequential differs from the second group of layers on."""
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    hessians = {n: Hessian(weight_matrix(m).shape[1]) for n, m in linears.items()}
    collect_inputs(block, inputs, linears, lambda name, x: hessians[name].add(x))
    want = {n: gptq_quantize(weight_matrix(m), hessians[n].H, scheme_for(n, m))[0] for n, m in linears.items()}
    layerwise, sequential = copy.deepcopy(block), copy.deepcopy(block)
    gptq_block(layerwise, inputs, scheme_for, true_sequential=False)
    gptq_block(sequential, inputs, scheme_for)
    for n in linears:
        assert torch.equal(weight_matrix(layerwise.get_submodule(n)), want[n]), n
    last = list(linears)[-1]  # (the MLP's output layer: its input has passed through quantized layers)
    assert not torch.equal(weight_matrix(sequential.get_submodule(last)), want[last])
    with pytest.raises(ValueError, match="true_sequential"):
        Recipe(weight=QScheme(4, granularity="group", group_size=32), method="gptq",
               method_args={"gptaq": True, "true_sequential": False})


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_block_algorithms_beat_rtn_on_block_output(source, algorithm):
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    ref = [run_block(blocks[0], *inp) for inp in inputs]
    rtn = copy.deepcopy(blocks[0])
    quantize_linears(rtn, W4, group_fallback=True)
    alg = copy.deepcopy(blocks[0])
    if algorithm == "gptq":
        gptq_block(alg, inputs, scheme_for)
    else:
        awq_block(alg, inputs, scheme_for)
    assert all(not is_linear(m) for m in alg.modules())  # every linear was swapped
    assert block_error(alg, inputs, ref) < block_error(rtn, inputs, ref)


def test_smoothquant_fold_is_exact_before_quantization(source):
    model, batches = load(source)
    ids = torch.cat(batches)
    with torch.no_grad():
        before = model(ids).logits
    assert scale_groups(decoder_blocks(model)[0], norms_only=True)
    scales = []
    sequential_quantize(model, batches, "cpu", lambda i, block, inputs: scales.append(smooth_block(block, inputs, 0.5)),
                        progress=False)
    assert all(s for s in scales) and any(float((v - 1).abs().max()) > 0.1 for s in scales for v in s.values())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


def test_awq_fold_keeps_float_function(source):
    """AWQ's scales alone (no rounding) leave the model's function unchanged."""
    model, batches = load(source)
    blocks = decoder_blocks(model)
    inputs = first_block_inputs(model, blocks, batches, "cpu")
    block = blocks[0]
    with torch.no_grad():
        ref = [run_block(block, *inp) for inp in inputs]
    eight = QScheme(8, granularity="channel")
    awq_block(block, inputs, lambda n, m: eight)  # 8-bit: the rounding is tiny next to any folding mistake
    assert block_error(block, inputs, ref) < 1e-3 * sum(float(r.pow(2).mean()) for r in ref)


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_ptq_llm_methods_end_to_end(source, tmp_path, method):
    rows = ptq_llm.main(["--model_name", source, "--data_dir", DATA, "--results_dir", str(tmp_path),
                         "--no_progress", "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "8",
                         "--bits", "4", "--group_size", "32", "--act", "none", "static", "--method", method, "--save_model",
                         "--models_dir", str(tmp_path / "m")])
    q = [r for r in rows if r["method"] == method]
    assert len(q) == (1 if method == "smoothquant" else 2)
    assert all(r["perplexity"] < 2 * rows[0]["perplexity"] + 100 and r["quant_seconds"] > 0 and r["peak_rss_mb"] > 0 for r in q)
    from llm import load_quantized_model
    folder = os.path.join(tmp_path, "m", "ptq_llm", sorted(os.listdir(tmp_path / "m" / "ptq_llm"))[0])
    load_quantized_model(folder)  # the algorithms' weights save and reload like RTN's


def test_merge_batches_concatenates_runs_of_one_shape_up_to_the_budget():
    from quant.sequential import merge_batches
    a, b, c, d, e = (torch.full(shape, i) for i, shape in enumerate([(4, 8), (4, 8), (2, 8), (4, 6), (4, 8)]))
    out = merge_batches([a, b, c, d, e, {"x": 1}], max_tokens=80)
    assert [t.shape for t in out[:3]] == [(10, 8), (4, 6), (4, 8)] and out[3] == {"x": 1}
    assert torch.equal(out[0], torch.cat([a, b, c]))
    assert [t.shape[0] for t in merge_batches([a, b, c], max_tokens=40)] == [4, 4, 2]  # never split, never over
    other = [a, b]  # a batch that is a list (of tensors) passes through untouched, and cuts the run
    out = merge_batches([a, other, b], max_tokens=80)
    assert len(out) == 3 and out[1] is other and torch.equal(out[2], b)


def test_gptq_same_result_in_any_calibration_batching(monkeypatch):
    """quantize_model runs GPTQ's block passes on merged batches: only the Hessians' sums over all
    tokens matter, so the batching changes nothing but float summation order."""
    import quant.recipe
    from quant import Recipe, quantize_model
    from quant.modules import quant_modules
    model, calib = load(os.path.join(DATA, "stories260K"), n=8)
    recipe = Recipe(weight=W4, method="gptq")
    weights = []
    for tokens in (1, 1 << 20):  # one batch of 4 per pass, all in one
        monkeypatch.setattr(quant.recipe, "GPTQ_PASS_TOKENS", tokens)
        m = quantize_model(copy.deepcopy(model), recipe, calib, progress=False)
        weights.append({n: q.current_weight() for n, q in quant_modules(m).items()})
    for n, w in weights[0].items():
        # (scales move in the last float digits; a weight on a rounding boundary may move a step)
        assert (~torch.isclose(w, weights[1][n], rtol=1e-4, atol=1e-7)).float().mean() < 0.01, n


def test_gptaq_target_solves_the_asymmetric_objective():
    from quant.gptq import Hessian, gptaq_target, gptq_quantize
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(2048, 32, generator=g)  # the quantized model's inputs (rows: tokens)
    # the float model's inputs, drifted from them: partly a linear map of them, partly noise
    Xf = X @ (torch.eye(32) + 0.1 * torch.randn(32, 32, generator=g)) + 0.1 * torch.randn(2048, 32, generator=g)
    h = Hessian(32)
    for a, b in zip(X.split(512), Xf.split(512)):  # accumulated in batches, like calibration
        h.add(a, b)
    assert torch.allclose(h.H, 2 / 2048 * X.t() @ X, atol=1e-3) and torch.allclose(h.D, 2 / 2048 * (Xf - X).t() @ X, atol=1e-3)
    target = gptaq_target(W, h.H, h.D, percdamp=1e-9)
    # the normal equations of min ||W Xf^T - T X^T||: T (X^T X) = W (Xf^T X)
    assert torch.allclose(target @ (X.t() @ X), W @ (Xf.t() @ X), rtol=1e-3, atol=1e-2)
    objective = lambda Q: float((Xf @ W.t() - X @ Q.t()).pow(2).sum())  # noqa: E731
    scheme = QScheme(3, symmetric=False, granularity="group", group_size=8)
    plain = gptq_quantize(W, h.H, scheme)[0]
    gptaq = gptq_quantize(target, h.H, scheme)[0]
    floor = objective(target)  # what no weight can go below (the drift a linear map cannot explain)
    assert objective(target) <= objective(W) and objective(gptaq) - floor < 0.5 * (objective(plain) - floor)
    same = Hessian(32)
    same.add(X, X)  # no drift: the target is the weight itself
    assert torch.equal(gptaq_target(W, same.H, same.D, 0.01), W)


def test_gptaq_end_to_end_and_old_gptq_ids_unchanged(source, tmp_path):
    from quant import Recipe
    plain = Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=128), method="gptq",
                   method_args={"act_order": True}, w_observer="mse")
    assert plain.id == "209bfa175762"  # its id from before the gptaq argument existed (rows and artefacts carry it)
    # gptaq_alpha means nothing without gptaq: the same recipe, the same id, however it was given (ptq_llm's
    # --gptaq_alpha default is 0.25, and gave plain GPTQ rows a second id until Recipe normalised it)
    args = ptq_llm.build_parser().parse_args(["--w_asym", "--act_order", "--w_observer", "mse"])
    assert ptq_llm.recipe_for("gptq", None, 4, "none", "", args).id == plain.id
    assert Recipe(weight=plain.weight, method="gptq", method_args={"act_order": True, "gptaq_alpha": 0.25},
                  w_observer="mse") == plain
    rows = ptq_llm.main(["--model_name", source, "--data_dir", DATA, "--results_dir", str(tmp_path), "--no_progress",
                         "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "8", "--bits", "3", "--w_asym",
                         "--group_size", "32", "--act", "none", "--method", "gptq", "--skip_fp32"])
    rows += ptq_llm.main(["--model_name", source, "--data_dir", DATA, "--results_dir", str(tmp_path), "--no_progress",
                          "--seq_len", "64", "--eval_samples", "8", "--calib_samples", "8", "--bits", "3", "--w_asym",
                          "--group_size", "32", "--act", "none", "--method", "gptq", "--gptaq", "--skip_fp32"])
    assert ["gptaq alpha=0.25" in r["method_args"] for r in rows] == [False, True]
    assert rows[0]["recipe_id"] != rows[1]["recipe_id"] and rows[0]["perplexity"] != rows[1]["perplexity"]
    assert rows[1]["perplexity"] < 1.3 * rows[0]["perplexity"]


def test_hessian_mse_reduces_to_the_plain_search_and_helps_on_outlier_inputs():
    """GPTQ's Hessian-weighted range search: with H a multiple of the identity every column costs the
    same, so the result is the unweighted search's exactly; where a few input channels carry most of
    the energy, the layer's output error tr(D H D^T) is lower than with the unweighted search."""
    from quant.gptq import gptq_quantize
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    W[:, :4] *= 8  # outlier weights in a few columns
    sch = QScheme(4, symmetric=False, granularity="group", group_size=64)
    for act_order in (False, True):
        eye = 3.0 * torch.eye(256)
        a = gptq_quantize(W, eye, sch, act_order=act_order, mse=True)
        b = gptq_quantize(W, eye, sch, act_order=act_order, mse=True, hessian_mse=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        X = torch.randn(4096, 256)
        X[:, 200:] *= 20  # the energy is in other channels than the outlier weights
        H = X.T @ X / len(X)
        loss = {}
        for weighted in (False, True):
            Q, _, _ = gptq_quantize(W, H, sch, act_order=act_order, mse=True, hessian_mse=weighted)
            D = W - Q
            loss[weighted] = float(torch.einsum("oi,ij,oj->", D, H, D))
        assert loss[True] < loss[False]


def test_hessian_mse_needs_the_mse_search():
    with pytest.raises(ValueError, match="hessian_mse"):
        Recipe(weight=QScheme(4, granularity="group", group_size=32), method="gptq", method_args={"hessian_mse": True})
    old = Recipe(weight=QScheme(4, granularity="group", group_size=32), method="gptq", w_observer="mse")
    assert "hessian_mse" not in old.to_json()  # every recipe from before the argument keeps its id
