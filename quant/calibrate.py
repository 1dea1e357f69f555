"""Calibration: observe the inputs of every statically quantized activation through forward
hooks while the model runs on calibration batches, then freeze the observed ranges into the
quantizers. Observers are dropped afterwards; nothing keeps the activations."""
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import distributed
from .modules import QuantLinear
from .observers import make_observer


@contextmanager
def activation_quant_disabled(model: torch.nn.Module):
    """Calibrate on float activations (PyTorch's convention): downstream observers see what the
    float model produces, not already-clipped values."""
    quantizers = [m.act_quant for m in model.modules() if isinstance(m, QuantLinear) and m.act_quant is not None]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q in quantizers:
            q.enabled = True


def static_act_layers(model: torch.nn.Module) -> dict:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act_quant is not None and not m.act_quant.scheme.dynamic}


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches, observer: str = "minmax", forward=None,
              desc: str = "calibrate", progress: bool = True, **observer_kwargs) -> int:
    """Run `forward(model, batch)` (default: model(batch)) over the batches, observing each static
    activation quantizer's input, and set its scale / zero point. Returns the batch count."""
    layers = static_act_layers(model)
    if not layers:
        return 0
    observers = {n: make_observer(observer, m.act_quant.scheme, **observer_kwargs) for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, obs=observers[n]: obs.observe(args[0]))
             for n, m in layers.items()]
    forward = forward or (lambda mdl, batch: mdl(batch))
    count = 0
    try:
        with activation_quant_disabled(model):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                forward(model, batch)
                count += 1
    finally:
        for h in hooks:
            h.remove()
    if distributed.total(count) == 0:
        raise ValueError("calibration got no batches")
    for n, m in layers.items():  # (the same order on every rank)
        observers[n].reduce()
        scale, zp = observers[n].qparams()
        m.act_quant.set_qparams(scale.to(m.weight.device), zp.to(m.weight.device))
    return count
