"""Exports to the formats other tools load, holding the quantized values our model computes with.

  compressed-tensors  a Hugging Face folder (config.json with a `quantization_config`) that
                      `AutoModelForCausalLM.from_pretrained` loads through the compressed-tensors
                      package and vLLM serves: int weights per group / channel / tensor, symmetric
                      or asymmetric, packed ("pack-quantized"); with 8-bit activations, W8A8
                      ("int-quantized": int8 weights, static per-tensor or dynamic per-token inputs)
  gguf                a llama.cpp file (Llama architecture): Q8_0 or Q4_0 blocks of 32

Folded scales (AWQ, SmoothQuant) are already in the norms and weights of the quantized model, so
every algorithm exports the same way. Settings a format cannot express are refused with one
line (ExportError) before anything is written; files appear atomically (temporary, then renamed).
"""
import copy
import os
import tempfile

import torch
import torch.nn as nn

from .arch import in_out, is_conv1d, is_linear
from .checkpoint import atomic_path
from .modules import QuantEmbedding, quant_modules, replace_module
from .scheme import QScheme

FORMATS = ("compressed-tensors", "gguf")


class ExportError(ValueError):
    """The model's quantization cannot be written in the requested format."""


def _signed_zero_point(q, s: QScheme) -> torch.Tensor:
    """Our zero point on the signed grid [-2^(b-1), 2^(b-1)) that both formats use: an unsigned
    scheme's codes shift down by 2^(b-1) and its zero point with them (same dequantized values)."""
    return q.zero_point - (s.qmin + 2 ** (s.bits - 1))


def _ct_args(s: QScheme):
    from compressed_tensors.quantization import QuantizationArgs
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor", "token": "token"}[s.granularity]
    return QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.symmetric, strategy=strategy,
                            group_size=s.group_size, dynamic=s.dynamic)


def _layers(model: nn.Module, recipe=None) -> list:
    """(name, weight scheme, activation scheme, in_features, conv1d, embedding) of each layer that is
    quantized: read off a quantized model, or, given a recipe, what it will quantize in a float model
    (so that a run can refuse an export before it quantizes anything)."""
    if recipe is None:
        return [(n, q.weight_quant.scheme, q.act_quant.scheme if q.act_quant is not None else None, q.in_features,
                 q.conv1d, isinstance(q, QuantEmbedding)) for n, q in quant_modules(model).items()]
    from .modules import _matches, layer_scheme
    out = []
    for n, m in model.named_modules():
        embedding = isinstance(m, nn.Embedding)
        if not n or not (is_linear(m) or (embedding and recipe.embeddings)):
            continue
        if _matches(n, recipe.skip) and not recipe.embeddings:
            continue
        in_f = m.weight.shape[1] if embedding else in_out(m)[0]
        w = layer_scheme(recipe.weight, in_f) if recipe.group_fallback else recipe.weight
        out.append((n, w, None if embedding else recipe.activation, in_f, is_conv1d(m), embedding))
    return out


def _ct_problem(name, w: QScheme, a: QScheme | None, in_features: int, conv1d: bool, embedding: bool):
    if embedding:
        return f"{name}: quantized embeddings (transformers and vLLM load quantized Linear layers only)"
    if conv1d:
        return f"{name}: a GPT-2 Conv1D layer (compressed-tensors quantizes nn.Linear, whose weight is (out, in))"
    if w.granularity == "channel" and w.axis not in (0, -2):
        return f"{name}: per-channel weights along axis {w.axis} (the format has per-output-channel only)"
    if w.granularity == "group" and in_features % w.group_size:
        return (f"{name}: in_features {in_features} is not a multiple of group {w.group_size} "
                f"(the format has no padded last group; use a group that divides it, or per-channel)")
    if a is not None and (a.bits != 8 or w.bits != 8):
        return f"{name}: W{w.bits}A{a.bits} (the format's integer activations are W8A8)"
    if a is not None and a.group_size is not None:
        return f"{name}: activations per token group ({a.describe()}; this exporter writes per-token or per-tensor inputs)"
    if a is not None and a.dynamic and a.symmetric:
        return (f"{name}: symmetric per-token activations (compressed-tensors scales them by absmax / 127.5, "
                f"this scheme by absmax / 127: the loaded model would compute something else)")
    return None


def _gguf_problem(model: nn.Module, layers: list):
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type != "llama":
        return f"GGUF export covers the Llama architecture, this is {getattr(cfg, 'model_type', type(model).__name__)!r}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope.get('rope_type')!r} is not written by this exporter"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "Llama layers with biases are not written by this exporter"
    if any(a is not None for _, _, a, *_ in layers):
        return "GGUF holds quantized weights only, and this model quantizes activations (llama.cpp picks its own)"
    return None


def export_problem(model: nn.Module, fmt: str, recipe=None) -> str | None:
    """Why `model` (quantized, or float with the `recipe` it will get) cannot be exported as `fmt`,
    in one line; None when it can."""
    layers = _layers(model, recipe)
    floats = next((sch for _, w, a, *_ in layers for sch in (w, a) if sch is not None and sch.format != "int"), None)
    if floats is not None:
        return f"{floats.describe()}: exports write integer formats (this workbench simulates {floats.format})"
    if fmt == "gguf":
        return _gguf_problem(model, layers)
    if fmt != "compressed-tensors":
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    if (recipe is not None and recipe.method == "hqq") or any(q.weight_quant.fractional for q in quant_modules(model).values()):
        return "HQQ's fractional zero points (the format's zero points are integers; GGUF requantizes them)"
    return next((p for p in (_ct_problem(*layer) for layer in layers) if p), None)


def as_float_model(model) -> None:
    """Drop a GGUF origin from a model in place. A model read from a GGUF file was dequantized on
    load and is a float model, but its quantizer and config still say "gguf": transformers then
    refuses to save it, and llm-compressor refuses to calibrate it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@torch.no_grad()
def save_compressed_tensors(model: nn.Module, folder: str, tokenizer=None) -> dict:
    """Write `model` (quantized by quantize_model) as a compressed-tensors folder loadable by
    `AutoModelForCausalLM.from_pretrained(folder)`. Returns {format, path, bytes}."""
    problem = export_problem(model, "compressed-tensors")
    if problem:
        raise ExportError(f"cannot export as compressed-tensors: {problem}")
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    out = copy.deepcopy(model)
    as_float_model(out)
    groups, params = {}, {}
    for name, q in quant_modules(out).items():
        w = q.weight_quant.scheme
        a = q.act_quant.scheme if q.act_quant is not None else None
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device, dtype=q.weight.dtype)
        lin.weight.copy_(q.weight)  # already on the grid: the compressor's quantize gives back our codes
        if q.bias is not None:
            lin.bias.copy_(q.bias)
        params[name] = (q.weight_quant.scale, _signed_zero_point(q.weight_quant, w),
                        None if a is None or a.dynamic else (q.act_quant.scale, _signed_zero_point(q.act_quant, a)))
        groups.setdefault((w, a), []).append(name)
        replace_module(out, name, lin)
    config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=_ct_args(w),
                                                      input_activations=None if a is None else _ct_args(a))
                     for i, ((w, a), names) in enumerate(groups.items())}
    w8a8 = any(a is not None for _, a in groups)
    cfg = QuantizationConfig(config_groups=config_groups, format="int-quantized" if w8a8 else "pack-quantized")
    apply_quantization_config(out, cfg)
    for name, (scale, zp, act) in params.items():
        m = out.get_submodule(name)
        m.weight_scale.data = scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zp.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
        if act is not None:
            m.input_scale.data = act[0].reshape(m.input_scale.shape).to(m.input_scale.dtype)
            if hasattr(m, "input_zero_point"):
                m.input_zero_point.data = act[1].reshape(m.input_zero_point.shape).to(m.input_zero_point.dtype)
    compressor = ModelCompressor(quantization_config=cfg)
    compressor.compress_model(out)
    with atomic_path(folder, folder=True) as tmp:
        out.save_pretrained(tmp)
        compressor.update_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    weights = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    asym = [w for w, _ in groups if not w.symmetric]
    notes = ("asymmetric packed zero points: transformers loads them with CompressedTensorsConfig(dequantize=True) "
             "(its default path mis-sizes them)") if asym and not w8a8 else ""
    return {"format": "compressed-tensors", "path": folder, "bytes": sum(os.path.getsize(f) for f in weights), "notes": notes}


def safetensors_data_bytes(path: str) -> int:
    """Bytes of tensor data in a .safetensors file (its size less the JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header



# --- GGUF ---------------------------------------------------------------------------------------

GGUF_TYPES = ("q8_0", "q4_0")
_BLOCK = 32  # both types: blocks of 32 weights along a row, one float16 scale each


def _gguf_exact(q, qtype: str) -> bool:
    """Whether our codes are the GGUF type's codes: symmetric, group 32, 8 or 4 bits."""
    s = q.weight_quant.scheme
    return (s.symmetric and s.granularity == "group" and s.group_size == _BLOCK and q.in_features % _BLOCK == 0
            and s.bits == {"q8_0": 8, "q4_0": 4}[qtype])


def _gguf_blocks(q, qtype: str):
    """Our codes and scales as the type's blocks, (out, in / 32 * block bytes) uint8: float16 d then
    32 int8 (Q8_0), or float16 d then 16 bytes of nibbles, element j low and j + 16 high (Q4_0)."""
    import numpy as np
    wq, s = q.weight_quant, q.weight_quant.scheme
    codes = (wq.int_repr(q.weight).to(torch.int16) - _signed_zero_point(wq, s).to(torch.int16)
             + (s.qmin + 2 ** (s.bits - 1)))  # signed codes about zero
    codes = codes.reshape(q.out_features, -1, _BLOCK).cpu()
    d = wq.scale.reshape(q.out_features, -1, 1).cpu().to(torch.float16).view(torch.uint8).numpy()
    if qtype == "q8_0":
        qs = codes.to(torch.int8).view(torch.uint8).numpy()
    else:
        u = (codes + 8).to(torch.uint8).numpy()
        qs = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([d, qs], -1).reshape(q.out_features, -1)


def _llama_permute(w, n_head: int):
    """llama.cpp's row order for q / k (rotary pairs interleaved), which its loaders undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NOT_SPM = ("the tokenizer is not SentencePiece-style (byte-fallback BPE), the kind this exporter converts; "
            "for a byte-level BPE model, start from its GGUF file (--gguf_file or pkg:...), whose tokenizer is copied")


def _llama_vocab(tokenizer, folder: str):
    """gguf's reading of a SentencePiece-style HF tokenizer saved into `folder`; None for any other kind."""
    from pathlib import Path

    import gguf
    tokenizer.save_pretrained(folder)
    try:
        return gguf.LlamaHfVocab(Path(folder))
    except (FileNotFoundError, TypeError, KeyError):
        return None


def gguf_tokenizer_problem(tokenizer) -> str | None:
    """Why a Hugging Face tokenizer cannot be written into a GGUF file (None if it can)."""
    with tempfile.TemporaryDirectory() as tmp:
        return None if _llama_vocab(tokenizer, tmp) is not None else _NOT_SPM


def _tokenizer_fields(writer, tokenizer, source_gguf: str | None) -> None:
    """The tokenizer as GGUF metadata: copied from the source GGUF when there is one, else built
    from a SentencePiece-style (byte-fallback BPE) Hugging Face tokenizer."""
    import gguf
    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), vtype, sub)
        return
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        vocab = _llama_vocab(tokenizer, tmp)
        if vocab is None:
            raise ExportError(f"cannot export as GGUF: {_NOT_SPM}")
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(Path(tmp), load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        # whether encoding adds BOS / EOS, as the tokenizer does it (its post-processor, not always its config)
        ids = tokenizer("a").input_ids
        written = {key for kv in writer.kv_data for key in kv}
        if "tokenizer.ggml.add_bos_token" not in written:
            writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
        if "tokenizer.ggml.add_eos_token" not in written:
            writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])


@torch.no_grad()
def save_gguf(model: nn.Module, path: str, qtype: str, tokenizer=None, source_gguf: str | None = None) -> dict:
    """Write a Llama model quantized by quantize_model as a GGUF file whose linear layers are
    `qtype` (q8_0 or q4_0). A layer whose scheme is the type's grid (symmetric, group 32, the
    type's bits) keeps its codes exactly, with its scale rounded to float16 (the format's scale);
    any other quantized layer is requantized from its dequantized weight with gguf's own
    quantizer; a row length that is not a multiple of 32 stays float32 (our dequantized values);
    embeddings, lm_head and norms are written as the model holds them (float32).
    Returns {format, path, bytes, notes}."""
    import gguf
    import numpy as np
    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type must be one of {GGUF_TYPES}, got {qtype!r}")
    problem = export_problem(model, "gguf")
    if problem:
        raise ExportError(f"cannot export as GGUF: {problem}")
    cfg = model.config
    qmods = quant_modules(model)
    ggml_type = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors, exact, requantized, kept = [], 0, 0, []
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    tied = getattr(cfg, "tie_word_embeddings", False) and "lm_head" not in qmods

    def add(hf_name, data, raw_dtype=None):
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ExportError(f"cannot export as GGUF: no GGUF name for {hf_name}")
        if name.endswith(("attn_q", "attn_k")):
            data = _llama_permute(data, n_head if name.endswith("attn_q") else n_kv)
        tensors.append((f"{name}.{suffix}", np.ascontiguousarray(data), raw_dtype))

    for module_name, module in model.named_modules():
        if module_name in qmods:
            q = module
            if q.in_features % _BLOCK:
                kept.append(module_name)
                add(module_name + ".weight", q.weight.float().cpu().numpy())
            elif _gguf_exact(q, qtype):
                exact += 1
                add(module_name + ".weight", _gguf_blocks(q, qtype), ggml_type)
            else:
                requantized += 1
                add(module_name + ".weight", gguf.quants.quantize(q.weight.float().cpu().numpy(), ggml_type), ggml_type)
            continue
        if any(module_name.startswith(n + ".") for n in qmods):
            continue  # the quantizers inside a quantized layer
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full == "lm_head.weight" and tied:
                continue  # llama.cpp and transformers tie a missing output.weight to token_embd
            add(full, p.float().cpu().numpy())
    notes = [f"{exact} layers with their codes exact (float16 scales)"] if exact else []
    if requantized:
        notes.append(f"{requantized} layers requantized to {qtype} (their grid is not {qtype}'s)")
    if kept:
        notes.append(f"{len(kept)} layers float32 (rows not a multiple of {_BLOCK})")

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(os.path.splitext(os.path.basename(path))[0])
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        rope = getattr(cfg, "rope_parameters", None) or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        _tokenizer_fields(w, tokenizer, source_gguf)
        for name, data, raw_dtype in tensors:
            w.add_tensor(name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"format": f"gguf-{qtype}", "path": path, "bytes": os.path.getsize(path), "notes": ", ".join(notes)}
