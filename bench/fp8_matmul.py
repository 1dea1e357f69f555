"""FP8 W8A8 linear layers against bfloat16 ones, one layer at a time, on the device's real kernels.

    python bench/fp8_matmul.py --device cuda          # -> results/bench_fp8.csv

For each shape (in -> out features, tokens) it times, interleaved and on the same random input:
  bf16      F.linear in bfloat16 (cuBLAS)
  fp8       quant.kernels.Fp8DynamicLinear as the model runs it: the input quantized per token to
            E4M3 (its row absmax, divide, cast), then torch._scaled_mm with row-wise scales
  fp8 gemm  torch._scaled_mm alone, on input codes made beforehand (what a fused producer would hand it)
and the largest relative difference of fp8 from the fake-quant layer it replaces (float32).
Shapes: SmolLM2-135M's (576 wide: small, launch-bound on a GPU) and Llama-3-8B's (4096 / 14336),
at 512 and 8192 tokens. Timings are medians of --repeats CUDA-synchronised calls per round, over
shuffled rounds; TFLOP/s counts 2 * tokens * in * out.
"""
import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [  # (model, layer, in, out)
    ("SmolLM2-135M", "q_proj", 576, 576),
    ("SmolLM2-135M", "gate_proj", 576, 1536),
    ("SmolLM2-135M", "down_proj", 1536, 576),
    ("Llama-3-8B", "q_proj", 4096, 4096),
    ("Llama-3-8B", "gate_proj", 4096, 14336),
    ("Llama-3-8B", "down_proj", 14336, 4096),
]


def timed(fns: dict, repeats: int, rounds: int, sync) -> dict:
    """Median seconds per call of each function: `rounds` shuffled rounds of `repeats` calls each."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fns[k]()
            sync()
            times[k].append((time.perf_counter() - t0) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    from cli import Parser, check_writable, pick_device, positive_int
    from quant import QScheme, quantize_linears
    from quant.formats import format_scale, to_fp8
    from quant.kernels import convert_to_int
    from results import append_rows, code_version, timestamp
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[512, 8192])
    p.add_argument("--models", nargs="+", default=sorted({s[0] for s in SHAPES}))
    p.add_argument("--repeats", type=positive_int, default=20, help="calls per timed round (default 20)")
    p.add_argument("--rounds", type=positive_int, default=5, help="shuffled rounds (default 5)")
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    check_writable(args.results_dir, "--results_dir")
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for model_name, layer, k, n in SHAPES:
            if model_name not in args.models:
                continue
            lin = nn.Linear(k, n, bias=False).to(device)
            holder = nn.Sequential(lin)
            quantize_linears(holder, QScheme(8, granularity="channel", format="fp8"),
                             QScheme(8, granularity="token", format="fp8"))
            fake = holder[0]
            report = convert_to_int(holder)
            if report["0"] != "Fp8DynamicLinear":
                raise SystemExit(f"error: no FP8 kernel here: {report['0']}")
            fp8 = holder[0]
            w_bf16 = fake.weight.detach().to(torch.bfloat16)
            for m in args.tokens:
                x = torch.randn(m, k, device=device)
                x_bf16 = x.to(torch.bfloat16)
                err = float((fp8(x).float() - fake(x)).abs().max() / fake(x).abs().max())
                x_scale = format_scale(x.abs().amax(-1, keepdim=True), "fp8")
                x_fp8 = to_fp8(x, x_scale)
                out_dtype = torch.bfloat16 if on_cuda else torch.float32
                fns = {"bf16": lambda: torch.nn.functional.linear(x_bf16, w_bf16),
                       # a new tensor each call, so the layer's reuse of a shared input's codes does not apply
                       "fp8": lambda: fp8(x_bf16.clone()) if on_cuda else fp8(x.clone()),
                       "fp8 gemm": lambda: torch._scaled_mm(x_fp8, fp8.weight_fp8_t, scale_a=x_scale, scale_b=fp8.scale,
                                                            out_dtype=out_dtype)}
                clone_s = timed({"clone": lambda: (x_bf16 if on_cuda else x).clone()}, args.repeats, args.rounds, sync)["clone"]
                t = timed(fns, args.repeats, args.rounds, sync)
                t["fp8"] = max(t["fp8"] - clone_s, 1e-9)
                flop = 2 * m * k * n
                for name, sec in t.items():
                    rows.append(dict(timestamp=timestamp(), model=model_name, layer=layer, in_features=k, out_features=n,
                                     tokens=m, variant=name, ms=round(sec * 1e3, 4), tflops=round(flop / sec / 1e12, 2),
                                     speedup_vs_bf16=round(t["bf16"] / sec, 3),
                                     max_rel_diff_vs_fake_quant=float(f"{err:.3g}") if name == "fp8" else None,
                                     device=device, device_name=torch.cuda.get_device_name() if on_cuda else "cpu",
                                     torch=torch.__version__, code=code_version()))
                print(f"{model_name:13s} {layer:9s} {k:6d}->{n:6d} x {m:5d} tokens: bf16 {t['bf16'] * 1e3:8.3f} ms  "
                      f"fp8 {t['fp8'] * 1e3:8.3f} ms ({t['bf16'] / t['fp8']:.2f}x)  fp8 gemm {t['fp8 gemm'] * 1e3:8.3f} ms "
                      f"({t['bf16'] / t['fp8 gemm']:.2f}x)  max rel diff {err:.1e}", flush=True)
    append_rows(os.path.join(args.results_dir, "bench_fp8.csv"), rows)


if __name__ == "__main__":
    from cli import run
    run(main)
