"""Post-training static quantization of the MNIST MLP (784 -> 128 -> ReLU -> 10).

Load MNIST, train (or reuse) the FP32 model, then for every weight bit width x weight
granularity x activation observer: quantize the weights, calibrate the activation ranges on
--calib_samples training images, evaluate on the test set, and append a row to
results/ptq_nn.csv.

    python ptq_nn.py --bits 8 4 3 2 --observers minmax ema percentile mse entropy
"""
import argparse
import copy
import os
import time

import torch

from cli import Parser, UsageError, add_common_args, check_writable, parse_with_config, per_seed, percentile_type, run
from mnist import add_mnist_args, fp32_model, fp32_settings, load_subsets, predictions, scored
from quant import OBSERVERS, QScheme, Recipe, float_size_bytes, quantize_model, quantized_size_bytes, save_quantized
from results import Results, code_version, environment, settings_id, timestamp

EXPERIMENT = "ptq_nn"
SUMMARY = ["method", "seed", "w_bits", "a_bits", "granularity", "observer", "w_observer", "accuracy", "size_bytes", "seconds"]


def a_bits_type(s):
    if s in ("same", "none"):
        return s
    from cli import bits_type
    return bits_type(s)


def add_ptq_args(p, observers=("minmax", "ema", "percentile", "mse", "entropy"), granularity=("tensor", "channel")):
    p.add_argument("--a_bits", type=a_bits_type, default=8,
                   help="activation bits: 2..8, 'same' (= weight bits) or 'none' (float activations) (default: 8)")
    p.add_argument("--observers", nargs="+", choices=sorted(OBSERVERS), default=list(observers),
                   help=f"activation observers to sweep (default: {' '.join(observers)})")
    p.add_argument("--granularity", nargs="+", choices=["tensor", "channel"], default=list(granularity),
                   help=f"weight granularities to sweep (default: {' '.join(granularity)})")
    p.add_argument("--w_observer", choices=["minmax", "percentile", "mse"], default="minmax",
                   help="weight observer (default: minmax)")
    p.add_argument("--percentile", type=percentile_type, default=99.99, help="percentile observer's percentile (default: 99.99)")


def build_parser(prog=None):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, bits_default=[8, 4, 3, 2], calib_default=1000)
    add_mnist_args(p)
    add_ptq_args(p)
    return p


def schemes(w_bits, a_bits, granularity):
    w = QScheme(w_bits, symmetric=True, granularity=granularity, axis=0)
    a_bits = w_bits if a_bits == "same" else a_bits
    # activations: affine over the observed range (the first layer's input is signed, the second is post-ReLU)
    a = None if a_bits == "none" else QScheme(a_bits, symmetric=False, signed=False)
    return w, a, a_bits


def calib_batches(x, n, seed, batch_size=256):
    if n > len(x):
        raise UsageError(f"--calib_samples {n} is more than the {len(x)} training images available")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return [x[idx[i:i + batch_size]] for i in range(0, n, batch_size)]


def recipe_for(w_scheme, a_scheme, observer, args, method="rtn", method_args=None) -> Recipe:
    pct = {"percentile": args.percentile}
    return Recipe(weight=w_scheme, method=method, method_args=method_args or {}, w_observer=args.w_observer,
                  w_observer_args=pct if args.w_observer == "percentile" else {}, activation=a_scheme,
                  a_observer=observer if a_scheme is not None else None,
                  a_observer_args=pct if a_scheme is not None and observer == "percentile" else {}, skip=())


def ptq(model, recipe, batches, progress=True):
    """A quantized copy of `model`: weights quantized once, activation ranges calibrated."""
    return quantize_model(copy.deepcopy(model), recipe, batches, progress=progress).eval()


def save_mlp(q, recipe, accuracy, args, experiment, stem) -> None:
    """Save a quantized MLP under a name that hashes everything that made it: an existing folder of
    that name was made by the same recipe, FP32 training and calibration, so it is kept as it is."""
    made_by = dict(recipe_id=recipe.id, fp32=fp32_settings(args), calib_samples=args.calib_samples, seed=args.seed)
    folder = os.path.join(args.models_dir, experiment, f"{stem}_{settings_id(made_by)}")
    if not os.path.exists(os.path.join(folder, "quant_config.json")):
        save_quantized(q, folder, extra={"accuracy": accuracy, "arch": "mnist_mlp", "made_by": made_by,
                                         "recipe": recipe.to_dict()})


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    results = Results(args.results_dir, EXPERIMENT, SUMMARY)
    if args.save_model:
        check_writable(args.models_dir, "--models_dir")
    data = load_subsets(args)
    for seed_args in per_seed(args):  # each seed: its own FP32 training and calibration sample
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
    common = dict(experiment=EXPERIMENT, calib_samples=args.calib_samples, fp32_accuracy=fp32_acc,
                  fp32_size_bytes=fp32_size, code=code_version(), test_images=len(test_x),
                  percentile=args.percentile, fp32_id=settings_id(fp32_settings(args)), **fp32_settings(args),
                  **environment())
    results.add(dict(timestamp=timestamp(), method="fp32", w_bits=32, a_bits=32, observer="", w_observer="",
                 granularity="", size_bytes=fp32_size, seconds=round(time.time() - t0, 2), recipe="",
                 recipe_id="fp32", **fp32_scores, **common))
    print(f"seed {args.seed}: FP32 test accuracy {fp32_acc:.2f}% ({len(test_x)} images), {fp32_size} bytes")

    configs = [(b, g, o) for b in args.bits for g in args.granularity
               for o in (args.observers if args.a_bits != "none" else ["none"])]
    for bits, gran, observer in configs:
        t0 = time.time()
        w_scheme, a_scheme, a_bits = schemes(bits, args.a_bits, gran)
        recipe = recipe_for(w_scheme, a_scheme, observer, args)
        q = ptq(model, recipe, batches, not args.no_progress)
        scores, size = scored(predictions(q, test_x), test_y, fp32_pred), quantized_size_bytes(q)
        acc = scores["accuracy"]
        results.add(dict(timestamp=timestamp(), method="ptq", w_bits=bits, a_bits=32 if a_bits == "none" else a_bits,
                         observer="" if observer == "none" else observer, w_observer=args.w_observer, granularity=gran,
                         size_bytes=size, seconds=round(time.time() - t0, 2), recipe=recipe.to_json(),
                         recipe_id=recipe.id, **scores, **common))
        print(f"PTQ W{bits}A{a_bits} {gran:7s} {observer:10s} accuracy {acc:6.2f}%  size {size} bytes")
        if args.save_model:
            save_mlp(q, recipe, acc, args, EXPERIMENT, f"w{bits}a{a_bits}_{gran}_{observer}")


if __name__ == "__main__":
    run(main)
