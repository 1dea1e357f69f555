"""Mixed precision under a byte budget: how much each layer minds each candidate weight scheme,
and the choice of one scheme per layer that minds least in total within a number of bytes.

    sens = sensitivity(model, candidates, calib_batches)          # {layer: [KL per candidate]}
    pick = allocate(costs, sens_matrix, budget_bytes)             # one candidate index per layer
    recipe = Recipe(weight=..., method="gptq", layer_weights={layer: candidates[i] ...})

A layer's sensitivity to a scheme is the mean per-token KL divergence of the model's next-token
distribution from the float model's, on calibration windows, with only that layer quantized
(round to nearest with the recipe's weight observer): measured, not estimated from a Hessian.
Summing them over layers assumes the layers' errors add, which is what the allocation minimises.
Costs are the bytes a checkpoint stores for the layer (checkpoint.layer_nbytes), so a budget met
here is met by the saved model.
"""
import math

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import in_out, is_linear, weight_matrix
from .modules import Quantizer, _matches, layer_scheme
from .scheme import QScheme


def target_layers(model: nn.Module, skip=("lm_head",)) -> dict:
    """{name: module} of the linear layers a weight recipe with this `skip` quantizes."""
    return {n: m for n, m in model.named_modules() if n and is_linear(m) and not _matches(n, skip)}


def _kl(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    logq = logits.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1).sum()


@torch.no_grad()
def sensitivity(model: nn.Module, candidates: list[QScheme], batches, *, skip=("lm_head",), w_observer: str = "minmax",
                group_fallback: bool = True, progress: bool = True, **observer_kwargs) -> dict:
    """{layer name: [mean per-token KL(float || only this layer at candidate c) for each candidate]}.

    model: a causal LM (Hugging Face: called as model(ids, use_cache=False).logits).
    batches: token-id tensors; the float model's log-probabilities of all of them are
    kept for the comparison (tokens x vocabulary floats), so pass a few windows, not the whole set.
    Each layer's weight is replaced in place by its fake-quantized value and restored after."""
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches]
    if not batches:
        raise ValueError("sensitivity needs calibration batches")
    refs = [model(b, use_cache=False).logits.float().log_softmax(-1) for b in batches]
    tokens = sum(r.shape[:-1].numel() for r in refs)
    layers = target_layers(model, skip)
    out = {}
    bar = tqdm(total=len(layers) * len(candidates), desc="sensitivity", disable=not progress, leave=False)
    for name, module in layers.items():
        w = weight_matrix(module)  # (a view for GPT-2's Conv1D: writing it writes the module's weight)
        original = w.detach().clone()
        row = []
        for scheme in candidates:
            scheme = layer_scheme(scheme, original.shape[1]) if group_fallback else scheme
            q = Quantizer(scheme)
            q.fit(original, w_observer, **observer_kwargs)
            w.copy_(q(original))
            row.append(float(sum(_kl(model(b, use_cache=False).logits, r) for b, r in zip(batches, refs))) / tokens)
            bar.update()
        w.copy_(original)
        out[name] = row
    bar.close()
    return out


def layer_costs(model: nn.Module, candidates: list[QScheme], layers, group_fallback: bool = True,
                fractional: bool = False) -> np.ndarray:
    """(layers, candidates) bytes each layer stores at each candidate (see checkpoint.layer_nbytes;
    fractional: HQQ's float16 zero points)."""
    from .checkpoint import layer_nbytes
    mods = dict(model.named_modules())
    costs = []
    for name in layers:
        in_f, out_f = in_out(mods[name])
        costs.append([layer_nbytes(out_f, in_f, layer_scheme(c, in_f) if group_fallback else c,
                                   fractional and not c.symmetric) for c in candidates])
    return np.array(costs, dtype=np.int64)


def allocate(costs, sens, budget: int, cells: int = 1 << 15) -> list[int]:
    """One candidate index per layer, minimising the summed sensitivity with the summed cost at most
    `budget` (a multiple-choice knapsack). Dynamic programming over the budget above the cheapest
    choice, in at most `cells` steps whose size rounds every cost up (so the result always fits;
    exact when the costs are whole steps), then the left-over bytes are spent exactly: the largest
    improvement that still fits, one layer at a time, until none does."""
    costs, sens = np.asarray(costs, dtype=np.int64), np.asarray(sens, dtype=np.float64)
    if costs.shape != sens.shape or costs.ndim != 2 or costs.shape[1] == 0:
        raise ValueError(f"costs and sensitivities must both be (layers, candidates); got {costs.shape}, {sens.shape}")
    base = int(costs.min(1).sum())
    if budget < base:
        raise ValueError(f"a budget of {budget} bytes is below the cheapest allocation ({base} bytes)")
    extra = costs - costs.min(1, keepdims=True)
    slack = budget - base
    step = max(1, math.ceil(slack / cells))
    units = -(-extra // step)  # rounded up
    k = slack // step + 1
    best = np.zeros(k)  # best[j]: least summed sensitivity of the layers so far within j steps
    choice = np.zeros((len(costs), k), dtype=np.int16)
    for layer in range(len(costs)):
        new = np.full(k, np.inf)
        for c in range(costs.shape[1]):
            u = units[layer, c]
            if u >= k:
                continue
            cand = np.full(k, np.inf)
            cand[u:] = best[:k - u] + sens[layer, c]
            better = cand < new
            new[better], choice[layer, better] = cand[better], c
        best = new
    pick, j = [0] * len(costs), k - 1
    for layer in reversed(range(len(costs))):
        pick[layer] = int(choice[layer, j])
        j -= units[layer, pick[layer]]
    left = budget - sum(int(costs[i, c]) for i, c in enumerate(pick))
    while True:  # spend the bytes that the rounding left over
        gain, delta = sens[np.arange(len(pick)), pick][:, None] - sens, costs - costs[np.arange(len(pick)), pick][:, None]
        gain[delta > left] = 0
        i, c = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, c] <= 0:
            break
        pick[i], left = int(c), left - int(delta[i, c])
    return pick
