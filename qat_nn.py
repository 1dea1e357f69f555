"""Quantization-aware training of the MNIST MLP, with the PTQ result of the same setting beside it.

Start from the FP32 checkpoint; for every weight bit width: quantize (weights per-channel,
activations static per-tensor calibrated on --calib_samples images), fine-tune with fake
quantization in the forward pass (STE, or LSQ with --lsq: learned step sizes), freeze, evaluate
on the test set, and append a row to results/qat_nn.csv.

    python qat_nn.py --bits 8 4 3 2 --qat_epochs 3
"""
import argparse
import copy
import time

from cli import Parser, add_common_args, check_writable, parse_with_config, per_seed, positive_float, positive_int, run
from mnist import accuracy, add_mnist_args, fp32_model, fp32_settings, load_subsets, predictions, scored, train
from ptq_nn import add_ptq_args, calib_batches, ptq, recipe_for, save_mlp, schemes
from quant import float_size_bytes, quant_modules, quantize_model, quantized_size_bytes
from results import Results, code_version, environment, settings_id, timestamp

EXPERIMENT = "qat_nn"
SUMMARY = ["method", "seed", "w_bits", "a_bits", "granularity", "observer", "accuracy", "ptq_accuracy", "size_bytes", "seconds"]


def build_parser(prog=None):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, bits_default=[8, 4, 3, 2], calib_default=1000)
    add_mnist_args(p)
    add_ptq_args(p, observers=("minmax",), granularity=("channel",))
    p.add_argument("--qat_epochs", type=positive_int, default=3, help="QAT fine-tuning epochs (default: 3)")
    p.add_argument("--qat_lr", type=positive_float, default=1e-3, help="QAT learning rate (default: 1e-3)")
    p.add_argument("--lsq", action="store_true", help="learn the step sizes (LSQ) instead of min-max scales with STE")
    return p


def qat(model, recipe, batches, data, args):
    """Fine-tune a fake-quantized copy of `model` (the recipe's QAT mode, epochs and rate), then freeze it."""
    q = quantize_model(copy.deepcopy(model), recipe, batches, progress=not args.no_progress)
    train(q, *data["train"], epochs=recipe.args["epochs"], lr=recipe.args["lr"], seed=args.seed + 1,
          desc=f"qat {recipe.weight.describe()}", progress=not args.no_progress)
    for m in quant_modules(q).values():
        m.freeze()
    return q.eval()


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    results = Results(args.results_dir, EXPERIMENT, SUMMARY)
    if args.save_model:
        check_writable(args.models_dir, "--models_dir")
    data = load_subsets(args)
    for seed_args in per_seed(args):  # each seed: its own FP32 training, calibration sample and QAT shuffling
        run_seed(seed_args, data, results)
    print(results.summary())
    return results.rows


def run_seed(args, data, results):
    test_x, test_y = data["test"]
    batches = calib_batches(data["train"][0], args.calib_samples, args.seed)
    t0 = time.time()
    model = fp32_model(data, args)
    fp32_pred, fp32_size = predictions(model, test_x), float_size_bytes(model)
    fp32_scores = scored(fp32_pred, test_y, fp32_pred)
    fp32_acc = fp32_scores["accuracy"]
    method = "qat_lsq" if args.lsq else "qat_ste"
    common = dict(experiment=EXPERIMENT, calib_samples=args.calib_samples, fp32_accuracy=fp32_acc,
                  fp32_size_bytes=fp32_size, code=code_version(), test_images=len(test_x), qat_epochs=args.qat_epochs,
                  qat_lr=args.qat_lr, percentile=args.percentile, fp32_id=settings_id(fp32_settings(args)),
                  **fp32_settings(args), **environment())
    results.add(dict(timestamp=timestamp(), method="fp32", w_bits=32, a_bits=32, observer="", w_observer="", granularity="",
                 ptq_accuracy=None, size_bytes=fp32_size, seconds=round(time.time() - t0, 2), recipe="",
                 recipe_id="fp32", **fp32_scores, **common))
    print(f"seed {args.seed}: FP32 test accuracy {fp32_acc:.2f}% ({len(test_x)} images)")
    for bits, gran, observer in [(b, g, o) for b in args.bits for g in args.granularity for o in args.observers]:
        w_scheme, a_scheme, a_bits = schemes(bits, args.a_bits, gran)
        ptq_acc = accuracy(ptq(model, recipe_for(w_scheme, a_scheme, observer, args), batches, not args.no_progress),
                           test_x, test_y)
        t0 = time.time()
        recipe = recipe_for(w_scheme, a_scheme, observer, args, method="qat",
                            method_args=dict(mode="lsq" if args.lsq else "ste", epochs=args.qat_epochs, lr=args.qat_lr))
        q = qat(model, recipe, batches, data, args)
        scores, size = scored(predictions(q, test_x), test_y, fp32_pred), quantized_size_bytes(q)
        acc = scores["accuracy"]
        results.add(dict(timestamp=timestamp(), method=method, w_bits=bits, a_bits=32 if a_bits == "none" else a_bits,
                         observer=observer if a_scheme else "", w_observer=args.w_observer, granularity=gran,
                         ptq_accuracy=ptq_acc, size_bytes=size, seconds=round(time.time() - t0, 2),
                         recipe=recipe.to_json(), recipe_id=recipe.id, **scores, **common))
        print(f"W{bits}A{a_bits} {gran} {observer}: QAT ({method}) {acc:.2f}%  PTQ {ptq_acc:.2f}%  FP32 {fp32_acc:.2f}%")
        if args.save_model:
            save_mlp(q, recipe, acc, args, EXPERIMENT, f"{method}_w{bits}a{a_bits}_{gran}_{observer}")


if __name__ == "__main__":
    run(main)
