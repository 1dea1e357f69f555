"""Forward time of a stack of Linear layers: float vs weight-only fake-quant vs W8A8.

    python bench/fakequant_overhead.py [--width 1024 --depth 8 --batch 256 --repeats 30]

Weight-only quantized layers hold already-quantized weights, so their forward is a float matmul;
W8A8 adds the activation fake-quant (static per-tensor, and dynamic per-token). Reports the
median time of each and its ratio to float, measured in the same process, interleaved, and
appends one row per variant to results/bench_fakequant.csv.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import Parser, check_writable, positive_int, run  # noqa: E402
from quant import QScheme, calibrate, quantize_linears  # noqa: E402
from results import append_rows, code_version, timestamp  # noqa: E402


def stack(width, depth, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=positive_int, default=1024)
    ap.add_argument("--depth", type=positive_int, default=8)
    ap.add_argument("--batch", type=positive_int, default=256)
    ap.add_argument("--repeats", type=positive_int, default=30)
    ap.add_argument("--results_dir", default="results")
    args = ap.parse_args(argv)
    check_writable(args.results_dir, "--results_dir")
    x = torch.randn(args.batch, args.width)
    models = {"float": stack(args.width, args.depth)}
    for name, a_scheme in [("w8 weight-only", None), ("w4 g128 weight-only", None),
                           ("w8a8 static", QScheme(8, symmetric=False)),
                           ("w8a8 dynamic per-token", QScheme(8, symmetric=False, granularity="token"))]:
        m = stack(args.width, args.depth)
        w = QScheme(4, granularity="group", group_size=128) if name.startswith("w4") else QScheme(8, granularity="channel")
        quantize_linears(m, w, a_scheme)
        calibrate(m, [torch.randn(args.batch, args.width) for _ in range(4)], progress=False)
        models[name] = m
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        for _ in range(args.repeats):
            for k, m in models.items():  # interleaved, so drift hits every variant alike
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["float"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, width {args.width}, depth {args.depth}, batch {args.batch}")
    print(f"{'variant':26s} {'median ms':>10s} {'x float':>8s}")
    rows, code, when = [], code_version(), timestamp()
    for k, t in times.items():
        med = statistics.median(t)
        print(f"{k:26s} {med * 1e3:10.3f} {med / base:8.3f}")
        rows.append(dict(timestamp=when, variant=k, width=args.width, depth=args.depth, batch=args.batch,
                         repeats=args.repeats, median_ms=round(med * 1e3, 4), x_float=round(med / base, 4),
                         threads=torch.get_num_threads(), torch=torch.__version__, code=code))
    path = os.path.join(args.results_dir, "bench_fakequant.csv")
    append_rows(path, rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    run(main)
