"""Models larger than memory: decoder blocks read from the safetensors checkpoint one at a time.

`open_model` builds a Hugging Face causal LM whose decoder blocks hold no weights (meta tensors)
and loads everything else (embeddings, final norm, head, the rotary tables). The `Onload` it
attaches as `model.onload` reads block i's own tensors from the checkpoint when the block runs
(`load`) and drops them after (`release`). A quantized block is written whole to the run's own
folder when it is released and read back from there afterwards, so the float checkpoint is never
modified and never held. `quantize_model` and `llm.evaluate` see `model.onload` and go block by
block; peak memory is then one block, the rest of the model, and the hidden states that flow
between blocks (calibration: all its windows; evaluation: `chunk` windows at a time).
"""
import ctypes
import json
import os
import struct

import torch
import torch.nn as nn

from .arch import block_prefix, decoder_blocks

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of '500MB', '1.5GiB', '2gb', '1048576'."""
    t = text.strip().lower().replace(" ", "")
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits):]
    if unit in ("k", "m", "g", "t"):
        unit += "b"
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    if unit not in SIZE_UNITS or value <= 0:
        raise ValueError(f"not a size: {text!r} (e.g. 500MB, 1.5GiB)")
    return int(value * SIZE_UNITS[unit])


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint folder (one file or a sharded index)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json: onloading reads a "
                         "safetensors checkpoint (not a GGUF file or .bin weights)")
    return [os.path.join(folder, n) for n in names]


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path: str) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(path: str, entry: dict, start: int) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory of its own (a memory map of the file would
    count its pages towards the process's memory while it is open)."""
    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start + begin)
        if f.readinto(memoryview(buf.numpy())) != end - begin:
            raise ValueError(f"{path} is truncated")
    return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc): freed blocks would otherwise stay in the
    allocator's arenas, and the process would grow by a fragment of every block it has read."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _map_large_buffers() -> None:
    """glibc: serve every buffer of 1 MiB or more by its own memory map, given back to the system
    when freed (by default the threshold creeps up to 32 MiB after the first frees, and the blocks'
    and GPTQ's matrices then fragment the heap: the process grew with every block it had read)."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class Onload:
    """Block i of `model` in memory only between load(i) and release(i)."""

    def __init__(self, model: nn.Module, files: list[str], device, dtype: torch.dtype, folder: str):
        self.model, self.device, self.dtype, self.folder = model, torch.device(device), dtype, folder
        self.blocks, self.prefix = decoder_blocks(model), block_prefix(model)
        self.file_of, self.headers = {}, {}
        for f in files:
            self.headers[f] = safetensors_header(f)
            self.file_of.update({k: f for k in self.headers[f][0]})
        # checkpoints of some architectures (GPT-2) name tensors without the base model's prefix
        base = getattr(model, "base_model_prefix", "")
        self.strip = f"{base}." if base and not any(k.startswith(f"{base}.") for k in self.file_of) else ""
        self.kept, self.kept_bytes = set(), {}
        _map_large_buffers()
        self.chunk = 64  # windows evaluated per pass over the blocks (their hidden states are held)
        self.pass_tokens = None  # at most this many tokens in one of GPTQ's merged block calls (None: its default)
        os.makedirs(folder, exist_ok=True)

    def _checkpoint_name(self, name: str) -> str:
        return name[len(self.strip):] if self.strip and name.startswith(self.strip) else name

    def has(self, name: str) -> bool:
        return self._checkpoint_name(name) in self.file_of

    def key(self, name: str) -> str:
        k = self._checkpoint_name(name)
        if k not in self.file_of:
            raise ValueError(f"the checkpoint has no tensor {k!r} (the model's {name!r}): onloading needs a checkpoint "
                             "saved with the model's own tensor names")
        return k

    def read(self, names: list[str]) -> dict:
        """{name: tensor} read from the checkpoint in this run's dtype, onto the device."""
        out = {}
        for n in names:
            k = self.key(n)
            header, start = self.headers[self.file_of[k]]
            t = read_tensor(self.file_of[k], header[k], start)
            out[n] = (t.to(self.dtype) if t.is_floating_point() else t).to(self.device)
        return out

    def _path(self, i: int) -> str:
        return os.path.join(self.folder, f"block{i}.pt")

    def load(self, i: int) -> nn.Module:
        """Block i with its weights on the device: the quantized copy once there is one, else the checkpoint's."""
        if i in self.kept:
            self.blocks[i] = torch.load(self._path(i), map_location=self.device, weights_only=False)
            return self.blocks[i]
        block = self.blocks[i]
        names = [n for n, p in block.named_parameters()]
        for n, t in self.read([f"{self.prefix}{i}.{n}" for n in names]).items():
            _set(block, n[len(f"{self.prefix}{i}."):], t)
        return block

    def release(self, i: int, keep: bool = False) -> None:
        """Drop block i's weights; with keep, first write the block (quantized, say) for later loads."""
        block = self.blocks[i]
        if keep:
            from .checkpoint import quantized_size_bytes
            tmp = self._path(i) + ".tmp"
            torch.save(block, tmp)
            os.replace(tmp, self._path(i))
            self.kept.add(i)
            self.kept_bytes[i] = quantized_size_bytes(block)
        if i in self.kept:  # read back whole next time: nothing of it stays
            block.to("meta")
        else:
            for name, p in list(block.named_parameters()):  # buffers stay: the non-persistent ones are not in the checkpoint
                _set(block, name, torch.empty_like(p, device="meta"))
        _trim()

    def block_bytes(self, i: int) -> int:
        """Bytes of block i's float weights in this run's dtype."""
        size = torch.finfo(self.dtype).bits // 8
        return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in self.blocks[i].parameters())

    def resident_bytes(self) -> int:
        """Bytes of the saved state outside the blocks (what stays in memory), tied tensors once."""
        seen, total = set(), 0
        for name, t in self.model.state_dict(keep_vars=True).items():
            if not name.startswith(self.prefix) and (t.untyped_storage().data_ptr(), t.shape) not in seen:
                seen.add((t.untyped_storage().data_ptr(), t.shape))
                total += t.numel() * t.element_size()
        return total

    def quantized_bytes(self) -> int:
        """What save_quantized would write: each quantized block's packed tensors plus the rest, once."""
        if len(self.kept) != len(self.blocks):
            raise ValueError("not every block is quantized yet")
        return self.resident_bytes() + sum(self.kept_bytes.values())

    def logits(self, windows: torch.Tensor, batch_size: int, chunk: int, progress: bool = False,
               predicting: bool = False):
        """(batch, logits) for each batch of `windows`, the same as model(batch).logits (with
        predicting, of every position but the last, as llm.predicting_only asks): `chunk` windows
        at a time go through block after block, each block loaded once per chunk. (Nothing here holds
        a batch's logits once it is yielded, as torch.no_grad's generator wrapper or a local would until
        the next batch's are made: two vocabulary-wide tensors would then count in the peak.)"""
        from tqdm.auto import tqdm

        from .arch import final_norm
        from .sequential import first_block_inputs, run_block
        norm, head = final_norm(self.model), self.model.get_output_embeddings()
        scores = torch.no_grad()(lambda x: head(norm(x)))
        chunk = max(batch_size, chunk // batch_size * batch_size)
        bar = tqdm(total=-(-len(windows) // chunk) * len(self.blocks), desc="blocks", disable=not progress, leave=False)
        for start in range(0, len(windows), chunk):
            with torch.no_grad():
                batches = [b.to(self.device) for b in windows[start:start + chunk].split(batch_size)]
                inputs = first_block_inputs(self.model, self.blocks, batches, self.device)
                for i in range(len(self.blocks)):
                    block = self.load(i)
                    inputs = [((run_block(block, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
                    self.release(i)
                    bar.update()
            for batch, (args, _) in zip(batches, inputs):
                yield batch, scores(args[0][:, :-1] if predicting else args[0])
        bar.close()


def check_recipe(recipe) -> None:
    """ValueError naming what in `recipe` needs the whole model in memory."""
    if recipe.method not in ("rtn", "gptq", "awq", "smoothquant", "signround"):
        raise ValueError(f"{recipe.method} is not run block by block here: with blocks on disk, use rtn, gptq, awq, "
                         "smoothquant or signround")
    if recipe.rotation != "none" or recipe.kv_cache is not None or recipe.embeddings:
        raise ValueError("a rotation, a quantized KV cache and quantized embeddings change the whole model at once: "
                         "with blocks on disk, quantize the decoder blocks' linear layers only")


def open_model(folder: str, config, device, dtype: torch.dtype, work_dir: str, like: nn.Module | None = None) -> nn.Module:
    """The model of the checkpoint in `folder`, its decoder blocks left on disk (see Onload);
    quantized blocks go to work_dir. With `like` (an open model of the same checkpoint), the
    tensors outside the blocks are its own, shared rather than read again: quantizing block by
    block never changes them (check_recipe), and a second copy of the embeddings would count twice."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    onload = Onload(model, checkpoint_files(folder), device, dtype, work_dir)
    rest = [n for n, _ in model.named_parameters() if not n.startswith(onload.prefix)]
    tensors = {n: p.data for n, p in like.named_parameters() if n in rest} if like is not None else {}
    tensors.update(onload.read([n for n in rest if onload.has(n) and n not in tensors]))
    for n, t in tensors.items():
        _set(model, n, t)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if not n.startswith(onload.prefix) and p.device.type == "meta"]
    if missing:
        raise ValueError(f"the checkpoint in {folder} lacks {missing[0]!r} (and {len(missing) - 1} more)")
    for n, b in list(model.named_buffers()):  # (blocks' too: what they hold is small, and not in the checkpoint)
        _set(model, n, b.to(device))
    model.onload = onload
    return model
