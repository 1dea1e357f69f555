"""Packed quantized checkpoints and real size accounting.

A checkpoint is a folder with `model.safetensors` (packed integer weights, scales, zero points,
static activation scales and every unquantized tensor, stored once even when tied) and
`quant_config.json` (the scheme of each quantized layer and, for a Hugging Face model, its
architecture config; also in the safetensors metadata). There is deliberately no config.json:
the folder is not a float Hugging Face model, so `from_pretrained` refuses it instead of loading
random weights. `load_quantized` reads it back (as fake-quantized layers, or with kernels=True
as integer-kernel modules built from the packed codes, without a float copy of the weights);
quant.export writes the formats other tools load. `quantized_size_bytes` sums exactly the
tensors that `save_quantized` writes, so it equals the file size minus the safetensors header.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import is_linear
from .modules import QuantEmbedding, Quantizer, QuantLinear, quant_modules, replace_module
from .packing import pack, packed_nbytes, unpack
from .scheme import QScheme

FORMAT = "quant-workbench/1"


def _owned_keys(name: str) -> tuple:
    return (f"{name}.weight", f"{name}.weight_quant.", f"{name}.act_quant.")


def export_tensors(model: torch.nn.Module):
    """(tensors to save, config): packed codes per quantized layer plus the remaining state."""
    tensors, layers = {}, {}
    qmods = quant_modules(model)
    floats = next((m.weight_quant.scheme for m in qmods.values() if m.weight_quant.scheme.format != "int"), None)
    if floats is not None:
        raise ValueError(f"{floats.describe()}: checkpoints hold integer formats (this workbench simulates {floats.format})")
    for name, m in qmods.items():
        wq, s = m.weight_quant, m.weight_quant.scheme
        codes = wq.int_repr(m.weight).to(torch.int16) - s.qmin
        tensors[f"{name}.qweight"] = pack(codes, s.bits)
        tensors[f"{name}.weight_scale"] = wq.scale.detach().float().contiguous()
        if not s.symmetric:  # a symmetric zero point follows from the scheme
            zp = wq.zero_point - s.qmin
            if not wq.fractional:
                zp = zp.to(torch.uint8)
            elif torch.equal(zp.half().float(), zp):  # HQQ's float zero points: float16 holds them exactly
                zp = zp.half()
            tensors[f"{name}.weight_zero_point"] = zp.contiguous()
        act = None
        if m.act_quant is not None:
            act = m.act_quant.scheme.to_dict()
            if not m.act_quant.scheme.dynamic:
                tensors[f"{name}.act_scale"] = m.act_quant.scale.detach().float().contiguous()
                tensors[f"{name}.act_zero_point"] = m.act_quant.zero_point.detach().float().contiguous()
        layers[name] = {"kind": "embedding" if isinstance(m, QuantEmbedding) else "linear", "weight": s.to_dict(),
                        "act": act, "shape": [m.out_features, m.in_features], "layout": list(codes.shape),
                        "bias": m.bias is not None, "padding_idx": getattr(m, "padding_idx", None), "conv1d": m.conv1d}
    rest, tied = _other_tensors(model, qmods)
    tensors.update(rest)
    config = {"format": FORMAT, "layers": layers, "tied": tied}
    if hasattr(getattr(model, "config", None), "to_dict"):
        config["model_config"] = model.config.to_dict()  # what load_quantized_model builds the architecture from
    return tensors, config


def _other_tensors(model: torch.nn.Module, qmods: dict):
    """({key: tensor} of the state that no quantized layer owns, each storage once; {tied key: the key
    that holds it}): tied weights (e.g. lm_head / embeddings) are stored once."""
    owned = tuple(k for name in qmods for k in _owned_keys(name))
    seen, tensors, tied = {}, {}, {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.startswith(owned):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen:
            tied[key] = seen[ptr]
            continue
        seen[ptr] = key
        tensors[key] = t.detach().contiguous()
    return tensors, tied


def quantized_size_bytes(model: torch.nn.Module) -> int:
    if getattr(model, "onload", None) is not None:  # blocks on disk (quant.onload): summed block by block
        return model.onload.quantized_bytes()
    qmods = quant_modules(model)
    if all(m.weight_quant.scheme.format == "int" for m in qmods.values()):
        tensors, _ = export_tensors(model)
        return sum(t.numel() * t.element_size() for t in tensors.values())
    # a float format, which checkpoints do not hold: the bytes its encoding takes (layer_nbytes),
    # static activation scales, and every other tensor once
    total = sum(t.numel() * t.element_size() for t in _other_tensors(model, qmods)[0].values())
    for m in qmods.values():
        total += layer_nbytes(m.out_features, m.in_features, m.weight_quant.scheme, m.weight_quant.fractional)
        if m.act_quant is not None and not m.act_quant.scheme.dynamic:
            total += 8  # float32 scale and zero point
    return total


def layer_nbytes(out_features: int, in_features: int, scheme: QScheme, fractional: bool = False) -> int:
    """Bytes that export_tensors writes for one quantized weight of this shape and scheme: its
    packed codes (partial groups padded), float32 scales and, when asymmetric, zero points (uint8,
    or float16 for fractional ones). What the mixed-precision allocator counts before building anything.
    A floating-point format: its codes, plus 1 byte per block scale (E8M0 / E4M3) and NVFP4's float32
    tensor scale, or fp8's float32 scales."""
    if scheme.format in ("mxfp4", "nvfp4"):
        n_blocks = out_features * -(-in_features // scheme.group_size)
        return packed_nbytes(n_blocks * scheme.group_size, 4) + n_blocks + (4 if scheme.format == "nvfp4" else 0)
    if scheme.granularity == "group":
        n_groups = -(-in_features // scheme.group_size)
        codes, params = out_features * n_groups * scheme.group_size, out_features * n_groups
    else:
        codes, params = out_features * in_features, 1 if scheme.granularity == "tensor" else (
            out_features if scheme.axis in (0, -2) else in_features)
    return packed_nbytes(codes, scheme.bits) + 4 * params + (0 if scheme.symmetric else (2 if fractional else 1) * params)


def bits_per_weight(model: torch.nn.Module) -> float:
    """Average stored bits per weight of the quantized layers (scales and zero points counted)."""
    mods = quant_modules(model).values()
    if not mods:
        return float("nan")
    total = sum(layer_nbytes(m.out_features, m.in_features, m.weight_quant.scheme, m.weight_quant.fractional) for m in mods)
    return 8 * total / sum(m.out_features * m.in_features for m in mods)


def float_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared storage once; a model whose blocks are on
    disk (quant.onload) counts those in their float dtype."""
    onload = getattr(model, "onload", None)
    seen, total = set(), (0 if onload is None else sum(onload.block_bytes(i) for i in range(len(onload.blocks))))
    for t in list(model.parameters()) + list(model.buffers()):
        if onload is not None and t.device.type == "meta":  # (a block on disk: counted above)
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def default_mode(path: str) -> None:
    """Give a file or folder made by tempfile (owner-only, 0600 / 0700) the permissions a plain
    open() or mkdir would have given it under the user's umask, before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str, folder: bool = False):
    """Yield a temporary file (or folder) beside `path` to write; on success it replaces `path`
    with the permissions of a plain open() / mkdir, on failure it is removed: readers see the old
    artefact or the whole new one, never half of one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if folder:
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=parent)
        os.close(fd)
    try:
        yield tmp
        default_mode(tmp)
        if folder and os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_quantized(model: torch.nn.Module, folder: str, extra: dict | None = None) -> str:
    """Write the checkpoint folder atomically (built in a temporary folder, then renamed)."""
    tensors, config = export_tensors(model)
    config["extra"] = extra or {}
    with atomic_path(folder, folder=True) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"quant_config": json.dumps(config)})
        with open(os.path.join(tmp, "quant_config.json"), "w") as f:
            json.dump(config, f, indent=1)
    return folder


def read_config(folder: str) -> dict:
    """The checkpoint's quant_config (layers, tied tensors, model_config when it has one)."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no quantized checkpoint at {path}")
    with safe_open(path, framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("quant_config", "{}"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return config


@torch.no_grad()
def load_quantized(model: torch.nn.Module, folder: str, kernels: bool = False) -> torch.nn.Module:
    """Load a checkpoint into `model`, a float model of the same architecture (its weights are
    overwritten): the listed layers become QuantLinear with the saved codes and scales. With
    kernels=True, each layer that has an integer kernel (quant.kernels) is built straight from
    its packed codes instead, never holding a float weight; the others stay QuantLinear."""
    from .kernels import IntLayer, fuse_siblings, kernel_for
    config = read_config(folder)
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    device = next(model.parameters()).device
    owned = []
    for name, lc in config["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint does not match the model: it has no layer {name!r}") from None
        embedding = lc.get("kind") == "embedding"
        if not (isinstance(module, torch.nn.Embedding) if embedding else is_linear(module)):
            raise ValueError(f"checkpoint layer {name} is a {type(module).__name__} in this model, "
                             f"expected {'an embedding' if embedding else 'a linear layer'}")
        w_scheme = QScheme(**lc["weight"])
        a_scheme = QScheme(**lc["act"]) if lc["act"] else None
        out_f, in_f = lc["shape"]
        weight_quant = Quantizer(w_scheme)
        scale = tensors.pop(f"{name}.weight_scale").to(device)
        zp_key = f"{name}.weight_zero_point"
        zp = (tensors.pop(zp_key).float() + w_scheme.qmin) if zp_key in tensors else \
            torch.full_like(scale, float(w_scheme.zero_point_int))
        weight_quant.set_qparams(scale, zp.to(device))
        act_quant = None if a_scheme is None else Quantizer(a_scheme)
        if a_scheme is not None and not a_scheme.dynamic:
            act_quant.set_qparams(tensors.pop(f"{name}.act_scale").to(device), tensors.pop(f"{name}.act_zero_point").to(device))
        numel = 1
        for d in lc["layout"]:
            numel *= d
        codes = unpack(tensors.pop(f"{name}.qweight"), w_scheme.bits, numel).to(device).to(torch.int16) + w_scheme.qmin
        codes = codes.reshape(lc["layout"])
        bias = tensors.get(f"{name}.bias")
        if kernels and not embedding:
            layer = IntLayer(codes, weight_quant, act_quant, None if bias is None else bias.to(device), in_f, out_f)
            cls, _ = kernel_for(layer)
            if cls is not None:
                replace_module(model, name, cls(layer))
                owned.append(f"{name}.")  # the kernel's own buffers come from the codes, not the file
                continue
        weight = weight_quant.dequantize(codes, torch.Size(lc["shape"]))
        if embedding:
            q = QuantEmbedding(weight, w_scheme, lc.get("padding_idx"), fit_weight=False)
        else:
            q = QuantLinear(weight, torch.zeros(out_f, device=device) if lc["bias"] else None, w_scheme, a_scheme,
                            fit_weight=False)
            q.conv1d = lc.get("conv1d", False)
        q.weight_quant, q.act_quant = weight_quant, act_quant
        q.weight.requires_grad_(False)
        replace_module(model, name, q)
        owned += _owned_keys(name)
    for alias, source in config["tied"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(owned))]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if kernels:
        fuse_siblings(model)
    return model
