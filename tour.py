"""The quick tour: what `python main.py` runs with no flags, on the data the repository carries
(data/), in a few minutes on 2 CPU cores.

1. MNIST PTQ: train the 784-128-10 MLP (3 epochs), then static W8A8 / W4A8 / W2A8 with
   per-channel weights and three activation observers (min-max, percentile, MSE).
2. MNIST QAT: one epoch of fake-quant fine-tuning (STE) at W4A8 and W2A8, PTQ beside it.
3. stories260K (a real 260K-parameter Llama trained on TinyStories): FP32, round-to-nearest and
   GPTQ weight-only 4-bit in groups of 32, and W8A8 with static per-tensor activations; perplexity
   on 64 windows of 256 tokens of the WikiText-2 test split.

Rows go to results/tour/ (not the committed tables in results/); one summary table at the end.

    python main.py                 # the same as: python tour.py
"""
import argparse
import os
import time

import ptq_llm
import ptq_nn
import qat_nn
from cli import Parser, run
from results import summary_table


def build_parser(prog=None):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", default=os.path.join("results", "tour"),
                   help="where the tour's CSVs are appended (default: results/tour)")
    p.add_argument("--data_dir", default=None, help="data folder (default: $QUANT_DATA_DIR, then the repository's data/)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def setting(row) -> str:
    if row["method"] == "fp32":
        return "FP32"
    w = f"W{row['w_bits']}" + (f"A{row['a_bits']}" if row["a_bits"] != 32 else "")
    gran = f"g{row['group_size']}" if row.get("granularity") == "group" else row.get("granularity", "")
    act = f"{row.get('act')} " if row.get("act") not in (None, "none") else ""
    return " ".join(x for x in (w, gran, act + (row.get("observer") or "")) if x).strip()


def main(argv=None):
    args = build_parser().parse_args(argv)
    shared = ["--results_dir", args.results_dir, "--seed", "0"] + (["--data_dir", args.data_dir] if args.data_dir else []) \
        + (["--no_progress"] if args.no_progress else [])
    t0 = time.time()
    print("== 1/3 MNIST post-training quantization ==")
    nn_rows = ptq_nn.main(shared + ["--retrain", "--epochs", "3", "--bits", "8", "4", "2", "--granularity", "channel",
                                    "--observers", "minmax", "percentile", "mse", "--calib_samples", "1000"])
    print("\n== 2/3 MNIST quantization-aware training ==")
    qat_rows = qat_nn.main(shared + ["--retrain", "--epochs", "3", "--bits", "4", "2", "--qat_epochs", "1",
                                     "--calib_samples", "1000"])
    print("\n== 3/3 stories260K post-training quantization ==")
    llm_rows = ptq_llm.main(shared + ["--model_name", "stories260K", "--seq_len", "256", "--eval_samples", "64",
                                      "--calib_samples", "32", "--group_size", "32", "--bits", "4",
                                      "--act", "none", "static", "--method", "rtn", "gptq", "--device", "cpu"])
    table = []
    for experiment, rows, metric in (("MNIST PTQ", nn_rows, "accuracy"), ("MNIST QAT", qat_rows, "accuracy"),
                                     ("stories260K PTQ", llm_rows, "perplexity")):
        for r in rows:
            if experiment == "MNIST QAT" and r["method"] == "fp32":
                continue  # the same FP32 model as the PTQ step's
            table.append({"experiment": experiment, "method": r["method"], "setting": setting(r),
                          ("accuracy %" if metric == "accuracy" else "perplexity"): r[metric],
                          "PTQ accuracy %": r.get("ptq_accuracy"), "size KB": r["size_bytes"] / 1000,
                          "seconds": r["seconds"]})
    print(f"\n== tour summary ({time.time() - t0:.0f} s; rows in {args.results_dir}/) ==")
    print(summary_table(table, ["experiment", "method", "setting", "accuracy %", "PTQ accuracy %", "perplexity",
                                "size KB", "seconds"]))
    return table


if __name__ == "__main__":
    run(main)
