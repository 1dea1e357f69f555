"""Sequential (block-by-block) calibration of decoder-only transformers.

The model runs only up to its first decoder block to capture that block's inputs; then each
block in turn is handed to a `process` callback (which collects statistics through hooks and
quantizes the block in place), and the block's outputs, recomputed through the now-quantized
block, become the next block's inputs. Peak memory is one block's working set plus the
calibration activations of one layer, never the whole model's activations, and each block is
calibrated on what the quantized blocks before it actually produce (as in GPTQ).

Models loaded with accelerate's device_map / CPU offload work unchanged: each block's own hooks
move its weights in when it runs. A model whose blocks stay on disk (quant.onload) has each block
read in for its turn and written out quantized after it.
"""
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import decoder_blocks


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches, device) -> list:
    """[(args, kwargs)] of the first block's call for each batch (hidden states are args[0])."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def merge_batches(batches: list, max_tokens: int) -> list:
    """Consecutive token-id batches of one shape concatenated into batches of at most max_tokens
    (never splitting one): where only sums over all tokens matter (GPTQ's Hessians), a few large
    block calls cost the same arithmetic as many small ones with a fraction of the launches and
    Python overhead. Anything that is not a 2-D tensor is passed through as it is."""
    runs = []  # (tensors to concatenate, their tokens), or (None, the batch as it came)
    for b in batches:
        ids = torch.is_tensor(b) and b.dim() == 2
        last, tokens = runs[-1] if runs else (None, 0)
        if (ids and last is not None and last[0].shape[1:] == b.shape[1:] and last[0].dtype == b.dtype
                and last[0].device == b.device and tokens + b.numel() <= max_tokens):
            last.append(b)
            runs[-1] = (last, tokens + b.numel())
        else:
            runs.append(([b], b.numel()) if ids else (None, b))
    return [torch.cat(run) if run is not None else b for run, b in runs]


def run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_inputs(block: nn.Module, inputs: list, modules: dict, observe) -> None:
    """Run the block on every calibration input, calling observe(name, x) with the input of
    each module in `modules` ({name: module}); nothing is kept unless `observe` keeps it.
    Each forward stops as soon as every module has seen its input: the rest of the block
    (all of it after the q/k/v inputs, say) would be computed for nothing."""
    seen = set()

    def hook(name, x):
        observe(name, x)
        seen.add(name)
        if len(seen) == len(modules):
            raise _StopForward

    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: hook(name, a[0])) for name, m in modules.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            try:
                run_block(block, args, kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sequential_quantize(model: nn.Module, batches, device, process, progress: bool = True, desc: str = "blocks",
                        float_chain: bool = False) -> None:
    """For each decoder block: process(index, block, inputs), then propagate the inputs through
    the processed block. With float_chain, the float model's own activations run alongside (a
    second set) and process(index, block, inputs, float_inputs, float_outputs) also gets the
    float block's inputs and outputs in the float model, batch for batch: what the quantized
    block's inputs drifted from, and what it should reproduce."""
    blocks, onload = decoder_blocks(model), getattr(model, "onload", None)
    inputs = first_block_inputs(model, blocks, batches, device)
    if not inputs:
        raise ValueError("sequential calibration got no batches")
    float_inputs = inputs
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, leave=False):
        block = onload.load(i) if onload is not None else blocks[i]
        if float_chain:
            outputs = [run_block(block, args, kwargs) for args, kwargs in float_inputs]
            process(i, block, inputs, float_inputs, outputs)
            float_inputs = [((t,) + tuple(args[1:]), kwargs) for t, (args, kwargs) in zip(outputs, float_inputs)]
        else:
            process(i, block, inputs)
        inputs = [((run_block(block, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        if onload is not None:
            onload.release(i, keep=True)
