"""Post-training quantization of a causal LM, scored by WikiText-2 perplexity.

Load the model (hub id, local folder or GGUF file) and WikiText-2; measure FP32 perplexity on the
test split in non-overlapping --seq_len windows; then for each configuration quantize a fresh
copy of the float weights, calibrate static activation scales on --calib_samples random windows
of the train split (validation when train is absent; never test), evaluate, and append a row to
results/ptq_llm.csv.

Configurations: weight-only at each --bits (per-group --group_size below 8 bits, per-channel at
8), and with --act static/dynamic, W{--act_w_bits}A{--a_bits} with static per-tensor activation
scales (from the --observers) or dynamic per-token activations. Each runs with every --method:
  rtn          round-to-nearest weights, activations calibrated over the whole model
  gptq         GPTQ weights (Hessian-based error feedback), block by block
  awq          AWQ: activation-aware scales folded into the preceding op + clip search, block by block
  smoothquant  SmoothQuant (each --sq_alpha) folded into the norms and up_proj, then RTN; --act static/dynamic only
  hqq          HQQ: each group's zero point optimised as a float, no calibration data; --w_asym only
  signround    SignRound (AutoRound): rounding offsets and range factors learned per block by signed
               gradient descent against the float model's block outputs (--signround_iters steps)
--w_format / --a_format pick FP8, MXFP4 or NVFP4 grids instead of integers (--a_group_size: dynamic
activations scaled per group of channels of each token, block FP8's scales; --w8_group_size: 8-bit
weights per group); --rotation hadamard
rotates the float model first (QuaRot-style, quant/rotation.py); --kv_bits quantizes the KV cache
that attention reads (KIVI, quant/kvcache.py). Each rotation and each KV setting is a run of all
the configurations.
With --budget_bits / --budget_bytes the weight-only rows are mixed precision instead: each layer's
sensitivity to each candidate scheme is measured once (KL divergence from the float model with only
that layer quantized), and each budget gets the scheme per layer that minds least in total.
The block-by-block methods calibrate each decoder block on the outputs of the already-quantized
blocks before it (peak memory: one block plus one layer's calibration activations).
With --export, each quantized model is also written as a compressed-tensors folder and / or a
GGUF file, loaded back through that format's own loader and scored on the same windows
(docs/exports.md).

    python main.py --model_name=distilgpt2 --calib_samples=200 --seq_len=128
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from cli import (
    Parser,
    UsageError,
    add_common_args,
    bits_type,
    check_writable,
    hide_library_bars,
    parse_with_config,
    per_seed,
    percentile_type,
    pick_device,
    positive_float,
    positive_int,
    run,
    unit_float,
)
from llm import (
    calib_windows,
    calibration_text,
    context_length,
    eval_windows,
    evaluate,
    import_model_code,
    load_exported,
    load_model,
    load_onloaded,
    load_tokenizer,
    perplexity,
    resolve_model,
    tokenize,
    wikitext_text,
)
from quant import QScheme, Recipe, distributed, float_size_bytes, quant_modules, quantize_model, quantized_size_bytes, save_quantized
from quant.arch import weight_matrix
from quant.checkpoint import atomic_path, bits_per_weight
from quant.export import FORMATS as EXPORT_FORMATS
from quant.export import export_problem, gguf_tokenizer_problem, save_compressed_tensors, save_gguf
from quant.formats import BLOCK, FORMATS
from quant.kvcache import check_kv, kv_bytes_per_token
from quant.modules import layer_scheme
from quant.onload import parse_size
from quant.rotation import check_rotatable
from results import Results, append_rows, code_version, environment, settings_id, timestamp
from stats import bootstrap_mean, encode

EXPERIMENT = "ptq_llm"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser(prog=None):
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, bits_default=[8, 4, 3], calib_default=128)
    p.add_argument("--model_name", default="distilgpt2",
                   help="hub id, local folder, .gguf file or pkg:PACKAGE holding one (default: distilgpt2)")
    p.add_argument("--gguf_file", default=None, help="GGUF file name inside --model_name's folder")
    p.add_argument("--seq_len", type=positive_int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on evaluation windows (default: the full test split)")
    p.add_argument("--batch_size", type=positive_int, default=4, help="windows per forward pass (default: 4)")
    p.add_argument("--group_size", type=int, default=128,
                   help="weight group size below 8 bits; 0 = per-channel (default: 128)")
    p.add_argument("--w8_group_size", type=int, default=0,
                   help="8-bit weights (int8 or fp8) with one scale per group of this many input channels instead of "
                        "one per output channel; with fp8 the MSE search then aligns E4M3's grid per group. "
                        "Fake-quant only: the W8 kernels take per-channel scales (default: 0 = per channel)")
    p.add_argument("--w_observer", choices=["minmax", "mse"], default="minmax",
                   help="weight observer, also GPTQ's scale search (AWQ runs its own clip search; FP8: the search aligns "
                        "E4M3's grid, clipping nothing) (default: minmax)")
    p.add_argument("--w_asym", action="store_true", help="asymmetric (zero-point) weights instead of symmetric")
    p.add_argument("--w_format", choices=list(FORMATS), default="int",
                   help="weight number format: int, fp8 (E4M3 per channel; 8-bit rows), mxfp4 / nvfp4 (E2M1 in blocks "
                        "of 32 / 16 with E8M0 / E4M3 scales; 4-bit rows, the block replaces --group_size) (default: int)")
    p.add_argument("--a_format", choices=list(FORMATS), default="int",
                   help="activation number format of the --act rows: int, fp8 (static per tensor or dynamic per token, "
                        "--a_bits 8), mxfp4 / nvfp4 (dynamic, --a_bits 4) (default: int)")
    p.add_argument("--a_group_size", type=int, default=0,
                   help="dynamic activations (int or fp8): one scale per group of this many channels of each token "
                        "(per-token-group, block FP8's 1 x 128 scales) instead of one per token; 0 = per token. "
                        "Fake-quant only: no GEMM here takes such scales (default: 0)")
    p.add_argument("--rotation", nargs="+", choices=["none", "hadamard"], default=["none"],
                   help="each a run: none, or hadamard: rotate the float model first (QuaRot-style fixed Hadamards "
                        "on the residual stream, value heads, down-projection inputs and, with --kv_bits, queries and "
                        "keys; Llama-family models whose widths have a Hadamard matrix) (default: none)")
    p.add_argument("--kv_bits", type=bits_type, nargs="+", default=[],
                   help="each a run: a quantized KV cache at these bits, keys per channel and values per token "
                        "(KIVI), used for attention (default: none, a float cache)")
    p.add_argument("--kv_group", type=positive_int, default=32,
                   help="KV cache: tokens per key scale and channels per value scale; must divide the head "
                        "dimension (default: 32)")
    p.add_argument("--kv_residual", type=int, default=0,
                   help="KV cache: the most recent tokens kept in float (default: 0)")
    p.add_argument("--act", nargs="+", choices=["none", "static", "dynamic"], default=["none", "static", "dynamic"],
                   help="activation modes: none = weight-only at each --bits; static / dynamic = W{act_w_bits}A{a_bits} "
                        "(default: none static dynamic)")
    p.add_argument("--act_w_bits", type=bits_type, default=8, help="weight bits of the rows with quantized activations (default: 8)")
    p.add_argument("--a_bits", type=bits_type, default=8, help="activation bits (default: 8)")
    p.add_argument("--observers", nargs="+", choices=["minmax", "ema", "percentile", "mse", "entropy"], default=["minmax"],
                   help="observers for static activation scales (default: minmax)")
    p.add_argument("--percentile", type=percentile_type, default=99.99, help="percentile observer's percentile (default: 99.99)")
    p.add_argument("--quantize_embeddings", action="store_true",
                   help="quantize lm_head and the embedding tables too, weight-only with the same weight scheme "
                        "(kept float by default; tied weights become two quantized copies)")
    p.add_argument("--method", nargs="+", choices=["rtn", "gptq", "awq", "smoothquant", "hqq", "signround"], default=["rtn"],
                   help="quantization algorithms (default: rtn)")
    p.add_argument("--gptq_block_size", type=positive_int, default=128, help="GPTQ lazy-update block (default: 128)")
    p.add_argument("--gptq_damp", type=positive_float, default=0.01, help="GPTQ dampening, fraction of mean diag(H) (default: 0.01)")
    p.add_argument("--act_order", action="store_true", help="GPTQ: quantize columns in decreasing Hessian-diagonal order")
    p.add_argument("--gptq_layerwise", action="store_true",
                   help="GPTQ: every layer of a block gets its Hessian from the block's float pass (llm-compressor's "
                        "pipeline), not true-sequentially from the layers before it already quantized")
    p.add_argument("--gptq_hessian_mse", action="store_true",
                   help="GPTQ with --w_observer mse: weigh each column's error in the range search by GPTQ's own cost "
                        "of rounding it (1 / [H^-1]_jj) instead of equally")
    p.add_argument("--gptaq", action="store_true",
                   help="GPTQ: GPTAQ's objective, the float model's layer outputs from the quantized model's inputs")
    p.add_argument("--gptaq_alpha", type=unit_float, default=0.25,
                   help="GPTAQ: fraction of its correction applied, in (0, 1]; 1 is the exact least-squares target "
                        "(default: 0.25, the reference implementation's, and better than 1 in results/)")
    p.add_argument("--awq_grid", type=positive_int, default=20, help="AWQ: alpha values searched in [0, 1) (default: 20)")
    p.add_argument("--awq_tokens", type=positive_int, default=4096,
                   help="AWQ: calibration tokens per layer for the searches (default: 4096)")
    p.add_argument("--signround_iters", type=int, default=200, help="SignRound: steps per block (default: 200)")
    p.add_argument("--budget_bits", type=positive_float, nargs="+", default=[],
                   help="mixed precision: instead of the uniform weight-only rows at --bits, one row per budget of average "
                        "stored bits per quantized weight (scales and zero points counted); each layer gets the candidate "
                        "scheme (--mp_bits x --mp_groups) that the allocation picks from its measured sensitivity")
    p.add_argument("--budget_bytes", type=positive_int, nargs="+", default=[],
                   help="mixed precision as --budget_bits, each budget the checkpoint's total bytes (a row's size_bytes)")
    p.add_argument("--mp_bits", type=bits_type, nargs="+", default=[2, 3, 4, 8],
                   help="mixed precision: candidate weight bits (default: 2 3 4 8)")
    p.add_argument("--mp_groups", type=int, nargs="+", default=[64, 128, 0],
                   help="mixed precision: candidate group sizes below 8 bits, 0 = per-channel (default: 64 128 0)")
    p.add_argument("--mp_samples", type=positive_int, default=8,
                   help="mixed precision: calibration windows the layers' sensitivities are measured on; the float "
                        "model's log-probabilities of all of them are held (default: 8)")
    p.add_argument("--sq_alpha", type=unit_float, nargs="+", default=[0.5],
                   help="SmoothQuant migration strengths in [0, 1], one run each (default: 0.5)")
    p.add_argument("--device_map", default=None,
                   help="accelerate device map for models larger than one device, e.g. auto (each configuration then reloads "
                        "the model from disk instead of copying it in memory)")
    p.add_argument("--max_memory", type=size_type, default=None,
                   help="models larger than memory: keep the float weights in their safetensors checkpoint and read one "
                        "decoder block at a time (quant/onload.py), so that the model and its activations fit in SIZE "
                        "(e.g. 2GiB) on the device; refused up front when the largest block, the rest of the model, the "
                        "calibration activations and the method's working set would not. Each row records the measured "
                        "peak (model_peak_mb)")
    p.add_argument("--export", nargs="+", choices=list(EXPORT_FORMATS), default=[],
                   help="also write each quantized model as compressed-tensors (a folder transformers and vLLM load) "
                        "and/or gguf (Q8_0 for 5-8 bits, Q4_0 below; Llama only) under --models_dir, load it back "
                        "through that format's loader and record its perplexity in the row")
    p.add_argument("--skip_fp32", action="store_true", help="do not evaluate the FP32 baseline (its row is then absent)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="evaluation dtype (default: float32)")
    return p


def configurations(args):
    """(w_bits, act mode, observer) triples in run order."""
    out = []
    for act in args.act:
        if act == "none":
            out += [(b, "none", "") for b in args.bits]
        elif act == "static":
            out += [(args.act_w_bits, "static", o) for o in args.observers]
        else:
            out.append((args.act_w_bits, "dynamic", ""))
    return out


def weight_scheme(bits, group_size, symmetric=True, fmt="int", w8_group_size=0):
    if fmt in BLOCK:
        return QScheme(bits, symmetric=symmetric, granularity="group", group_size=BLOCK[fmt], format=fmt)
    if bits == 8 and w8_group_size:
        return QScheme(bits, symmetric=symmetric, granularity="group", group_size=w8_group_size, format=fmt)
    if fmt == "fp8":
        return QScheme(bits, symmetric=symmetric, granularity="channel", axis=0, format=fmt)
    if bits < 8 and group_size:
        return QScheme(bits, symmetric=symmetric, granularity="group", group_size=group_size)
    return QScheme(bits, symmetric=symmetric, granularity="channel", axis=0)


def act_scheme(mode, bits, fmt="int", group_size=0):
    if mode == "none":
        return None
    # (floating-point formats are symmetric: their grids are)
    return QScheme(bits, symmetric=fmt != "int", granularity="token" if mode == "dynamic" else "tensor", format=fmt,
                   group_size=(group_size or None) if mode == "dynamic" else None)


def variants(methods, args) -> list:
    """(method, SmoothQuant alpha or None) in run order: SmoothQuant once per --sq_alpha."""
    return [(m, a) for m in methods for a in (args.sq_alpha if m == "smoothquant" else [None])]


def kv_scheme(bits, group):
    """The KV-cache scheme of --kv_bits: asymmetric (KIVI's min / max per group)."""
    return None if bits is None else QScheme(bits, symmetric=False, granularity="group", group_size=group)


def recipe_for(method, alpha, w_bits, act, observer, args, rotation="none", kv_bits=None) -> Recipe:
    """The Recipe of one configuration, from the flags."""
    method_args = {"gptq": lambda: dict(block_size=args.gptq_block_size, damp=args.gptq_damp, act_order=args.act_order,
                                        gptaq=getattr(args, "gptaq", False), gptaq_alpha=getattr(args, "gptaq_alpha", 1.0),
                                        true_sequential=not getattr(args, "gptq_layerwise", False),
                                        hessian_mse=getattr(args, "gptq_hessian_mse", False)),
                   "awq": lambda: dict(grid=args.awq_grid, tokens=args.awq_tokens), "smoothquant": lambda: dict(alpha=alpha),
                   "signround": lambda: dict(iters=args.signround_iters)}.get(method, dict)()
    w_format, a_format = getattr(args, "w_format", "int"), getattr(args, "a_format", "int")  # (rows from before the flags: int)
    return Recipe(weight=weight_scheme(w_bits, args.group_size, not args.w_asym, w_format, getattr(args, "w8_group_size", 0)),
                  method=method, method_args=method_args,
                  w_observer="minmax" if method in ("awq", "hqq", "signround") else args.w_observer,  # they search ranges their own way
                  activation=act_scheme(act, args.a_bits, a_format, getattr(args, "a_group_size", 0)), a_observer=observer or None,
                  a_observer_args={"percentile": args.percentile} if observer == "percentile" else {},
                  embeddings=args.quantize_embeddings, rotation=rotation, kv_cache=kv_scheme(kv_bits, getattr(args, "kv_group", 32)),
                  kv_residual=args.kv_residual if kv_bits is not None else 0)


def method_args(recipe: Recipe) -> str:
    """The short form of the method's arguments that the tables show (the same text as before recipes)."""
    a = recipe.args
    return {"rtn": "", "gptq": f"block={a.get('block_size')} damp={a.get('damp')} act_order={a.get('act_order')}"
                               + (" mse" if recipe.w_observer == "mse" else "") + (" gptaq" if a.get("gptaq") else "")
                               + (f" alpha={a.get('gptaq_alpha')}" if a.get("gptaq") and a.get("gptaq_alpha") != 1.0 else "")
                               + (" layerwise" if a.get("true_sequential") is False else "")
                               + (" hessian_mse" if a.get("hessian_mse") else ""),
            "awq": f"grid={a.get('grid')} tokens={a.get('tokens')}", "smoothquant": f"alpha={a.get('alpha')}",
            "hqq": f"iters={a.get('iters')} p={a.get('lp_norm')}",
            "signround": f"iters={a.get('iters')} batch={a.get('batch')}"}[recipe.method]


def size_type(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def rss_mb(key: str = "VmRSS") -> float | None:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None
    return round(kb / 1024, 1)


def start_peaks(device: str) -> float | None:
    """Start the peaks afresh (VmHWM where Linux allows it, and CUDA's) and return the resident memory
    now: what a row's peak is measured over."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB) since this row's run began (Linux; elsewhere since
    the start of the process)."""
    import resource
    import sys
    peak = rss_mb("VmHWM")
    if peak is not None:
        return peak
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def peak_gpu_mb(device: str):
    """Peak CUDA memory allocated by this process so far (MB), None off CUDA."""
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def fit_memory(model, args, calibs) -> None:
    """Refuse a --max_memory that one block, the rest of the model, the calibration activations,
    GPTQ's Hessian work and one block call over a batch exceed; else give GPTQ's merged block calls
    and the evaluation's chunk of windows what is left. An estimate: each row records the measured peak."""
    from quant.arch import is_linear
    onload, cfg, mib = model.onload, model.config, 2**20
    width = torch.finfo(DTYPES[args.dtype]).bits // 8
    hidden = cfg.hidden_size * args.seq_len * width  # one window's hidden states
    block = max(onload.block_bytes(i) for i in range(len(onload.blocks)))
    resident = onload.resident_bytes()
    calib = 2 * len(next(iter(calibs.values()))) * hidden  # a block's inputs and outputs, all windows
    widest = max(weight_matrix(m).shape[1] for m in onload.blocks[0].modules() if is_linear(m))
    # GPTQ: the float64 sum of X^T X and about five float32 in x in matrices of the solve, measured
    work = 48 * widest**2 if "gptq" in args.method else 0
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    # what a block call holds per token (estimated): its activations, and attention's scores, which CUDA's
    # float32 attention with a mask makes whole (three of them, measured; a CPU's fused kernel does not: generous there)
    per_token = width * (6 * cfg.hidden_size + 3 * inner + 3 * heads * args.seq_len)
    batch_call = args.batch_size * args.seq_len * per_token
    # a batch's float logits and log-probabilities (and, over several windows, the copy without each one's last position)
    logits = (2 + (args.batch_size > 1)) * args.batch_size * args.seq_len * cfg.vocab_size * 4
    cublas = 32 * mib if onload.device.type == "cuda" else 0  # cuBLAS's workspace, made at the first matmul (measured)
    held = resident + cublas + block  # whatever the phase
    need = held + max(calib + work + batch_call, logits + batch_call + 2 * args.batch_size * hidden)
    if need > args.max_memory:
        raise UsageError(f"--max_memory {args.max_memory / mib:.0f} MiB is too small: the model outside its blocks takes "
                         f"{resident / mib:.0f} MiB" + (f", cuBLAS's workspace {cublas / mib:.0f} MiB" if cublas else "")
                         + f", its largest block {block / mib:.0f} MiB, {args.calib_samples} calibration "
                         f"windows' activations {calib / mib:.0f} MiB" + (f", GPTQ's work {work / mib:.0f} MiB" if work else "")
                         + f", a block call over a batch {batch_call / mib:.0f} MiB and a batch's logits {logits / mib:.0f} "
                         f"MiB (at least {need / mib:.0f} MiB; a smaller --batch_size or --calib_samples needs less)")
    onload.pass_tokens = int((args.max_memory - held - calib - work) // per_token)
    onload.chunk = max(args.batch_size, int((args.max_memory - held - logits - batch_call) // (2 * hidden)))
    print(f"--max_memory {args.max_memory / mib:.0f} MiB: blocks read from disk one at a time ({block / mib:.1f} MiB the "
          f"largest; {resident / mib:.1f} MiB stays), evaluation {onload.chunk} windows a pass"
          + (f", GPTQ block calls of at most {onload.pass_tokens} tokens" if work else ""))


def candidates(args) -> list[QScheme]:
    """The weight schemes a mixed-precision allocation chooses among, cheapest grid first."""
    out = []
    for b in sorted(set(args.mp_bits)):
        for g in (sorted(set(args.mp_groups), reverse=True) if b < 8 else [0]):
            sch = weight_scheme(b, g, not args.w_asym)
            if sch not in out:
                out.append(sch)
    return out


def mixed_recipe(template: Recipe, cands: list, sens: dict, model, budget: tuple, fp32_size: int) -> Recipe:
    """The template's method with one candidate scheme per layer, allocated within the budget:
    ("bits", average bits per quantized weight) or ("bytes", the whole checkpoint's bytes)."""
    from quant.mixed import allocate
    names = list(sens)
    costs, limit = budget_limit(template, cands, model, names, budget, fp32_size)
    pick = allocate(costs, [sens[n] for n in names], limit)
    mods = dict(model.named_modules())
    # each layer's scheme as it applies (per-channel where the layer is narrower than the group)
    chosen = [layer_scheme(cands[i], weight_matrix(mods[n]).shape[1]) for n, i in zip(names, pick)]
    common = max(chosen, key=lambda c: (chosen.count(c), c.bits))  # the default scheme: the one most layers got
    return dataclasses.replace(template, weight=common, layer_weights=dict(zip(names, chosen)))


def budget_limit(template: Recipe, cands: list, model, names: list, budget: tuple, fp32_size: int):
    """(costs of each layer at each candidate, the bytes the layers may take); UsageError when even
    the cheapest candidate everywhere does not fit."""
    from quant.mixed import layer_costs
    costs = layer_costs(model, cands, names, fractional=template.method == "hqq")
    mods = dict(model.named_modules())
    kind, value = budget
    if kind == "bits":
        limit = math.floor(value * sum(weight_matrix(mods[n]).numel() for n in names) / 8)
    else:  # the checkpoint's other tensors (embeddings, norms, biases) are stored as they are
        rest = fp32_size - sum(weight_matrix(mods[n]).numel() * weight_matrix(mods[n]).element_size() for n in names)
        limit = int(value) - rest
    if costs.min(1).sum() > limit:
        least = int(costs.min(1).sum())
        numel = sum(weight_matrix(mods[n]).numel() for n in names)
        floor = f"{8 * least / numel:.4f} bits per weight" if kind == "bits" else f"{least + rest} bytes"
        raise UsageError(f"--budget_{kind} {value:g}: below the cheapest allocation of the candidates ({floor})")
    return costs, limit


def budget_text(budget: tuple) -> str:
    return f"{budget[1]:g} bits/weight" if budget[0] == "bits" else f"{int(budget[1])} bytes"


SUMMARY = ["method", "seed", "w_bits", "a_bits", "act", "observer", "granularity", "group_size", "w_format", "a_format",
           "rotation", "kv_bits", "perplexity", "size_bytes", "quant_seconds", "seconds"]


EXPORT_FIELDS = ["export_format", "export_path", "export_bytes", "export_perplexity", "export_max_logit_diff",
                 "export_notes"]


def export(qmodel, fmt, stem, tok, source_gguf, windows, args, device, dtype) -> dict:
    """Write (or keep, when the same settings made it) one export of the quantized model, load it
    back through the format's own loader and measure it on the same windows."""
    if fmt == "gguf":
        qtype = "q8_0" if qmodel_bits(qmodel) >= 5 else "q4_0"
        path = f"{stem}-{qtype}.gguf"
        info = None if os.path.exists(path) else save_gguf(qmodel, path, qtype, tok, source_gguf)
    else:
        path = f"{stem}-compressed-tensors"
        info = None if os.path.exists(os.path.join(path, "config.json")) else save_compressed_tensors(qmodel, path, tok)
    if info is None:  # kept: made by the same model, recipe and calibration
        info = {"format": f"gguf-{qtype}" if fmt == "gguf" else fmt, "path": path, "notes": "kept"}
    loaded = load_exported(info["format"], path, device, dtype)
    batch = windows[: args.batch_size].to(device)
    with torch.no_grad():
        diff = float((loaded(batch).logits.float() - qmodel(batch).logits.float()).abs().max())
    exported_ppl = perplexity(loaded, windows, args.batch_size, device, not args.no_progress, desc=f"eval {info['format']}")
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")] if os.path.isdir(path) else [path]
    del loaded
    return dict(export_format=info["format"], export_path=path, export_bytes=sum(os.path.getsize(f) for f in files),
                export_perplexity=exported_ppl, export_max_logit_diff=round(diff, 6), export_notes=info["notes"])


REFERENCE_K = 32  # top tokens and tail draws kept per position of the float pass (llm.FloatReference)


def intervals(ev: dict, fp32_ev: dict | None) -> dict:
    """A row's 95 % intervals, bootstrapped over the evaluation windows (stats.py says why windows):
    perplexity; against the float pass, the mean per-token KL divergence (and its 99th percentile),
    top-1 agreement and the paired ln(perplexity / float perplexity)."""
    lo, hi = bootstrap_mean(ev["window_nll"])
    out = dict(ppl_ci_low=math.exp(lo), ppl_ci_high=math.exp(hi), window_nll=encode(ev["window_nll"]))
    if "kld_tokens" in ev:
        lo, hi = bootstrap_mean(ev["kld_window"])
        out.update(kld=float(ev["kld_tokens"].mean()), kld_ci_low=lo, kld_ci_high=hi,
                   kld_p99=float(np.quantile(ev["kld_tokens"], 0.99)), top1_agree=ev["top1_agree"])
    if fp32_ev is not None:
        d = ev["window_nll"] - fp32_ev["window_nll"]
        lo, hi = bootstrap_mean(d)
        out.update(ln_ppl_ratio=float(d.mean()), ln_ppl_ratio_ci_low=lo, ln_ppl_ratio_ci_high=hi)
    return out


def qmodel_bits(qmodel) -> int:
    return max(m.weight_quant.scheme.bits for m in quant_modules(qmodel).values())


def main(argv=None):
    args = parse_with_config(build_parser(), argv)
    if args.group_size < 0:
        raise UsageError(f"--group_size must be >= 0, got {args.group_size}")
    if "hqq" in args.method and not args.w_asym:
        raise UsageError("--method hqq optimises each group's zero point: add --w_asym")
    if args.w8_group_size < 0:
        raise UsageError(f"--w8_group_size must be >= 0, got {args.w8_group_size}")
    if args.a_group_size < 0:
        raise UsageError(f"--a_group_size must be >= 0, got {args.a_group_size}")
    if args.a_group_size and (args.a_format in BLOCK or set(args.act) - {"none", "dynamic"}):
        raise UsageError(f"--a_group_size scales groups of each token on every call: it takes --act dynamic and an int or "
                         f"fp8 --a_format ({args.a_format} has its own block; static is one scale per tensor)")
    if args.a_format in BLOCK and "static" in args.act:
        raise UsageError(f"--a_format {args.a_format} scales each block of {BLOCK[args.a_format]} on every call: "
                         f"use --act dynamic (static is one calibrated scale per tensor)")
    if args.save_model and (args.w_format != "int" or (args.a_format != "int" and set(args.act) - {"none"})):
        raise UsageError("--save_model writes integer checkpoints; this run's rows use floating-point formats "
                         f"(--w_format {args.w_format} --a_format {args.a_format}): drop --save_model")
    if args.kv_residual < 0:
        raise UsageError(f"--kv_residual is a number of tokens >= 0, got {args.kv_residual}")
    if (args.save_model or args.export) and (set(args.rotation) - {"none"} or args.kv_bits):
        raise UsageError("--save_model / --export write the weights alone: a rotation's online transforms and a "
                         "quantized KV cache are not part of them; drop --save_model / --export or --rotation / --kv_bits")
    device = distributed.init(pick_device(args.device))  # under torchrun: this rank's device (quant.distributed)
    if distributed.world() > 1:
        if args.device_map or args.max_memory or args.save_model or args.export or args.budget_bits or args.budget_bytes:
            raise UsageError("under torchrun, ranks calibrate and evaluate a model each holds whole: drop --device_map, "
                             "--max_memory, --save_model, --export and --budget_bits / --budget_bytes, or run one process")
        if -(-args.calib_samples // args.batch_size) < distributed.world():
            raise UsageError(f"{args.calib_samples} calibration windows in batches of {args.batch_size} give fewer batches "
                             f"than the {distributed.world()} ranks: each rank needs one")
        if not distributed.is_main():  # one rank speaks and writes; the others compute
            sys.stdout = open(os.devnull, "w")
            args.no_progress = True
    dtype = DTYPES[args.dtype]

    # everything that can fail before the weights load fails first: outputs, data, tokenizer, context
    t_load = time.time()
    results = Results(args.results_dir, EXPERIMENT, SUMMARY)
    if args.save_model or args.export:
        check_writable(args.models_dir, "--models_dir")
    ctx = context_length(args.model_name, args.gguf_file)
    if ctx is not None and args.seq_len > ctx:
        raise UsageError(f"--seq_len {args.seq_len} exceeds the model's context length {ctx}")
    test_text = wikitext_text("test", args.data_dir)
    calib_split, calib_text = calibration_text(args.data_dir)
    if calib_split != "train":
        print("WikiText-2 train split not available: calibrating on the validation split")
    budgets = [("bits", b) for b in args.budget_bits] + [("bytes", b) for b in args.budget_bytes]
    if budgets and (set(args.rotation) - {"none"} or args.kv_bits):
        raise UsageError("--budget_bits / --budget_bytes allocate the weights of the unrotated model with a float "
                         "cache: drop --rotation / --kv_bits")
    if budgets and (args.export or args.quantize_embeddings or args.device_map):
        raise UsageError("--budget_bits / --budget_bytes allocate the linear layers of a model in memory: "
                         "drop --export, --quantize_embeddings and --device_map")
    if args.max_memory and (args.device_map or args.save_model or args.export or budgets or args.quantize_embeddings
                            or set(args.rotation) - {"none"} or args.kv_bits or "hqq" in args.method):
        raise UsageError("--max_memory quantizes one decoder block at a time: drop --device_map, --save_model, --export, "
                         "--budget_bits / --budget_bytes, --quantize_embeddings, --rotation, --kv_bits and --method hqq, "
                         "which need the whole model at once")
    if budgets and args.w_format != "int":
        raise UsageError(f"--budget_bits / --budget_bytes choose among integer schemes: drop --w_format {args.w_format}")
    if any(g < 0 for g in args.mp_groups):
        raise UsageError(f"--mp_groups must be >= 0, got {args.mp_groups}")
    cands = candidates(args)
    try:  # every configuration's recipe, checked now: a setting that cannot work fails before any weights load
        # (recipe, budget): a mixed-precision entry holds its template (the method, at each candidate scheme once)
        plan = [(recipe_for(method, alpha, w_bits, act, observer, args, rotation, kv), None)
                for rotation in args.rotation for kv in (args.kv_bits or [None])
                for method, alpha in variants(args.method, args) for w_bits, act, observer in configurations(args)
                if not (method == "smoothquant" and act == "none")  # smoothing only helps quantized activations
                and not (budgets and act == "none")]  # budgets replace the uniform weight-only rows
        for method, alpha in variants(args.method, args):
            if budgets and method != "smoothquant":
                template = recipe_for(method, alpha, 4, "none", "", args)
                for c in cands:
                    dataclasses.replace(template, weight=c)
                plan += [(template, b) for b in budgets]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if budgets:
        check_writable(args.models_dir, "--models_dir")
    tok = load_tokenizer(args.model_name, args.gguf_file)
    windows = eval_windows(tokenize(tok, test_text), args.seq_len, args.eval_samples)
    if len(windows) < distributed.world():
        raise UsageError(f"{len(windows)} test windows for {distributed.world()} ranks: each rank needs one")
    calib_ids = tokenize(tok, calib_text)
    seeds = [a.seed for a in per_seed(args)]
    calibs = {seed: calib_windows(calib_ids, args.calib_samples, args.seq_len, seed) for seed in seeds}
    if args.no_progress:
        hide_library_bars()
    import_model_code(args.model_name, args.gguf_file)
    rss_at_load = start_peaks(device)
    work = tempfile.TemporaryDirectory(prefix="onload-") if args.max_memory else None  # quantized blocks, per row
    if args.max_memory:
        model = load_onloaded(args.model_name, device, dtype, os.path.join(work.name, "float"), args.gguf_file)
        fit_memory(model, args, calibs)
    else:
        model = load_model(args.model_name, device, dtype, args.gguf_file, args.device_map)
    eval_tokens = windows.numel()
    source, source_gguf, _ = resolve_model(args.model_name, args.gguf_file)
    source_gguf = os.path.join(source, source_gguf) if source_gguf else None
    if "gguf" in args.export and source_gguf is None:  # the tokenizer is the same for every recipe
        problem = gguf_tokenizer_problem(tok)
        if problem:
            raise UsageError(f"--export gguf: {problem}")
    try:  # a rotation or cache this model cannot take fails now, not after the float pass
        for recipe, _ in plan:
            if recipe.rotation != "none":
                check_rotatable(model)
            if recipe.kv_cache is not None:
                check_kv(model, recipe.kv_cache)
    except ValueError as e:
        raise UsageError(f"{args.model_name}: {e}") from None
    for recipe, _ in plan:  # an export that cannot be written fails now, not after hours of quantizing
        for fmt in args.export:
            problem = export_problem(model, fmt, recipe)
            if problem:
                raise UsageError(f"--export {fmt}: {recipe.describe()}: {problem}")
    print(f"{args.model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}; "
          f"eval {len(windows)} windows x {args.seq_len} = {eval_tokens} tokens; calib {args.calib_samples} windows from {calib_split}"
          f"{f' x {len(seeds)} seeds' if len(seeds) > 1 else ''} "
          f"({time.time() - t_load:.1f}s)")
    fp32_size = float_size_bytes(model)
    progress = not args.no_progress
    from quant.mixed import target_layers
    for template, budget in plan:  # a budget that nothing fits fails now, before any row is written
        if budget is not None:
            budget_limit(template, cands, model, list(target_layers(model)), budget, fp32_size)
    base = dict(experiment=EXPERIMENT, model=args.model_name, calib_samples=args.calib_samples, calib_split=calib_split,
                seq_len=args.seq_len, eval_tokens=eval_tokens, fp32_size_bytes=fp32_size, code=code_version(),
                device=device, dtype=args.dtype, quantize_embeddings=args.quantize_embeddings, **environment(device))

    fp32_ppl, fp32_eval = None, None

    def record(row, start):  # each row lands as soon as it exists: a later failure loses nothing
        peak = peak_gpu_mb(device) if device.startswith("cuda") else (
            round(peak_rss_mb() - start, 1) if start is not None else None)
        if args.max_memory and peak is not None and peak * 2**20 > args.max_memory:
            row["notes"] = "; ".join(filter(None, [row.get("notes"), f"measured peak {peak} MiB above --max_memory"]))
        row.update(peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(device), world_size=distributed.world(),
                   rss_at_start_mb=start, model_peak_mb=peak,
                   max_memory_mb=round(args.max_memory / 2**20, 1) if args.max_memory else None, **base)
        if distributed.is_main():
            results.add(row)

    if not args.skip_fp32:
        t0 = time.time()
        # the float pass keeps its next-token distributions for the KL divergence of every row after it
        fp32_eval = evaluate(model, windows, args.batch_size, device, progress, desc="eval fp32", keep_reference=REFERENCE_K)
        fp32_ppl = fp32_eval["perplexity"]
        record(dict(timestamp=timestamp(), method="fp32", w_bits=32, a_bits=32, act="none", observer="", w_observer="",
                    granularity="", group_size=None, perplexity=fp32_ppl, fp32_perplexity=fp32_ppl, size_bytes=fp32_size,
                    seconds=round(time.time() - t0, 2), notes="", recipe="", recipe_id="fp32",
                    **intervals(fp32_eval, None), kld=0.0, kld_ci_low=0.0, kld_ci_high=0.0, kld_p99=0.0, top1_agree=1.0,
                    ln_ppl_ratio=0.0, ln_ppl_ratio_ci_low=0.0, ln_ppl_ratio_ci_high=0.0, seed=seeds[0],
                    rotation="none", kv_bytes_per_token=kv_bytes_per_token(model.config, None)), rss_at_load)
        print(f"FP32 perplexity {fp32_ppl:.3f}  ({fp32_size} bytes)")

    sensitivities = {}  # (seed, weight observer): {layer: [KL per candidate]}

    def sensitivity_of(seed, w_observer):  # measured once, kept in models_dir: reused only for the same settings
        if (seed, w_observer) in sensitivities:
            return sensitivities[seed, w_observer], 0.0
        from quant.mixed import layer_costs, sensitivity
        samples = min(args.mp_samples, args.calib_samples)  # (the first calibration windows)
        made_by = dict(model=args.model_name, candidates=[c.to_dict() for c in cands], w_observer=w_observer,
                       skip=["lm_head"], samples=samples, calib_samples=args.calib_samples, calib_split=calib_split,
                       seq_len=args.seq_len, seed=seed, dtype=args.dtype)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(args.model_name.rstrip('/'))).strip("_")
        path = os.path.join(args.models_dir, "sensitivity", f"{stem}_{settings_id(made_by)}.json")
        kept = json.load(open(path)) if os.path.exists(path) else None
        if kept is not None and kept.get("made_by") == made_by:
            print(f"kept {path}: layer sensitivities made by the same model, candidates and calibration")
            sens, seconds = kept["kl"], 0.0
        else:
            t_s = time.time()
            sens = sensitivity(model, cands, calibs[seed][:samples].split(args.batch_size), w_observer=w_observer,
                               progress=progress)
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump({"made_by": made_by, "kl": sens}, f)
            costs = layer_costs(model, cands, list(sens))
            append_rows(os.path.join(args.results_dir, "sensitivity.csv"), [
                dict(timestamp=timestamp(), model=args.model_name, layer=n, index=i, candidate=c.describe(), bits=c.bits,
                     group_size=c.group_size, kl=kl, bytes=int(costs[i, j]), samples=samples,
                     seq_len=args.seq_len, seed=seed, w_observer=w_observer, calib_split=calib_split,
                     seconds=round(time.time() - t_s, 2), code=code_version(), device=device)
                for i, (n, row) in enumerate(sens.items()) for j, (c, kl) in enumerate(zip(cands, row))])
            seconds = round(time.time() - t_s, 2)
            print(f"layer sensitivities of {len(sens)} layers x {len(cands)} schemes on {samples} windows "
                  f"({seconds:.1f}s): {path}")
        sensitivities[seed, w_observer] = sens
        return sens, seconds

    # every seed draws its own calibration windows; a recipe that reads none gives one row, not N equal ones
    for seed, recipe, budget in [(seed, r, b) for seed in seeds for r, b in plan
                                 if seed == seeds[0] or r.needs_calibration or b is not None]:
        sens_seconds = None
        if budget is not None:  # (the sensitivities are measured once, for the first row that needs them: its own column)
            sens, sens_seconds = sensitivity_of(seed, recipe.w_observer)
            recipe = mixed_recipe(recipe, cands, sens, model, budget, fp32_size)
        t0 = time.time()
        method, w_bits, act = recipe.method, recipe.weight.bits, recipe.act
        rss_at_start = start_peaks(device)  # each row's peak is its own, over what the process held when it began
        if args.max_memory:  # the float blocks are read from the checkpoint again; this row's quantized ones go here
            qmodel = load_onloaded(args.model_name, device, dtype, os.path.join(work.name, "row"), args.gguf_file, like=model)
            qmodel.onload.chunk, qmodel.onload.pass_tokens = model.onload.chunk, model.onload.pass_tokens  # (fit_memory's)
        elif args.device_map:
            qmodel = load_model(args.model_name, device, dtype, args.gguf_file, args.device_map)
        else:
            qmodel = copy.deepcopy(model)
        try:
            quantize_model(qmodel, recipe, calibs[seed].split(args.batch_size), progress=progress)
        except ValueError as e:  # a recipe that cannot apply to this model: bad input, not a crash
            raise UsageError(f"{args.model_name}: {e}") from None
        w_scheme, kv = recipe.weight, recipe.kv_cache
        schemes = {n: m.weight_quant.scheme for n, m in quant_modules(qmodel).items()}
        fallback = [n for n, sch in schemes.items() if sch.granularity != w_scheme.granularity and budget is None]
        notes = f"per-channel for {len(fallback)} layers with inputs < group {args.group_size}" if fallback else ""
        t_quant = time.time() - t0
        q_eval = evaluate(qmodel, windows, args.batch_size, device, progress, desc=f"eval {method} W{w_bits} {act}",
                          reference=fp32_eval["reference"] if fp32_eval else None)
        ppl = q_eval["perplexity"]
        size = quantized_size_bytes(qmodel)
        if budget is not None and (size if budget[0] == "bytes" else bits_per_weight(qmodel)) > budget[1]:
            raise RuntimeError(f"the allocation for {budget_text(budget)} stores {size} bytes: a bug, please report it")
        label = recipe.describe() if budget is None else f"{method} mixed, {budget_text(budget)}"
        row = dict(timestamp=timestamp(), method=method, w_bits=w_bits, a_bits=args.a_bits if act != "none" else 32,
                   act=act, observer=recipe.a_observer or "", w_observer=recipe.w_observer, granularity=w_scheme.granularity,
                   w_symmetric=w_scheme.symmetric, group_size=w_scheme.group_size, w_format=w_scheme.format,
                   a_format=recipe.activation.format if recipe.activation is not None else "",
                   a_group_size=recipe.activation.group_size if recipe.activation is not None else None, perplexity=ppl,
                   fp32_perplexity=fp32_ppl, size_bytes=size, quant_seconds=round(t_quant, 2),
                   seconds=round(time.time() - t0, 2), notes=notes, method_args=method_args(recipe),
                   recipe=recipe.to_json(), recipe_id=recipe.id, **intervals(q_eval, fp32_eval), seed=seed,
                   bits_per_weight=round(bits_per_weight(qmodel), 4), rotation=recipe.rotation,
                   kv_bits=kv.bits if kv else None, kv_group=kv.group_size if kv else None,
                   kv_residual=recipe.kv_residual if kv else None,
                   kv_bytes_per_token=round(kv_bytes_per_token(qmodel.config, kv, recipe.kv_residual, args.seq_len), 2))
        if budget is not None:
            row.update(budget=budget_text(budget), mix=recipe.mix, mp_samples=min(args.mp_samples, args.calib_samples),
                       sensitivity_seconds=sens_seconds)
        # artefacts are named by everything that made them: the same name is the same model, never another one
        made_by = dict(model=args.model_name, recipe_id=recipe.id, calib_samples=args.calib_samples,
                       calib_split=calib_split, seq_len=args.seq_len, seed=seed, dtype=args.dtype)
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{os.path.basename(args.model_name.rstrip('/'))}_{method}_W{w_bits}"
                     f"_{act}_{settings_id(made_by)}").strip("_")
        try:
            exports = [export(qmodel, fmt, os.path.join(args.models_dir, EXPERIMENT, tag), tok, source_gguf, windows,
                              args, device, dtype) for fmt in args.export]
        except BaseException:
            record(row, rss_at_start)  # the measured row lands even when an export fails
            raise
        if exports:
            row.update({k: ";".join(str(e[k]) for e in exports) for k in EXPORT_FIELDS})
        record(row, rss_at_start)
        print(f"{label:44s}" + (f" seed {seed}" if len(seeds) > 1 else "")
              + f" perplexity {ppl:.3f}  size {size} bytes ({size / fp32_size:.1%} of float)  quantize {t_quant:.1f}s"
              + (f"  [{notes}]" if notes else ""))
        for e in exports:
            print(f"  {e['export_format']:18s} perplexity {e['export_perplexity']:.3f} through its loader "
                  f"(max logit difference {e['export_max_logit_diff']:.2g})  {e['export_bytes']} bytes  {e['export_path']}"
                  + (f"  [{e['export_notes']}]" if e["export_notes"] else ""))
        if args.save_model:
            folder = os.path.join(args.models_dir, EXPERIMENT, tag)
            if os.path.exists(os.path.join(folder, "quant_config.json")):
                print(f"kept {folder}: made by the same model, recipe and calibration")
            else:
                save_quantized(qmodel, folder, extra={"perplexity": ppl, "made_by": made_by, "recipe": recipe.to_dict()})
                tok.save_pretrained(folder)  # (no config.json: from_pretrained refuses the folder; llm.load_quantized_model reads it)
                print(f"saved {folder}")
        del qmodel
        if work is not None:
            shutil.rmtree(os.path.join(work.name, "row"))
    print(results.summary())
    return results.rows


if __name__ == "__main__":
    run(main)
