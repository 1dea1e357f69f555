"""KV-cache quantization (KIVI: keys per channel, values per token), applied where attention
reads the cache: a Hugging Face attention function that scores the queries against the keys and
mixes the values as a quantized streaming cache would hold them.

A streaming cache quantizes keys per channel over blocks of `group` tokens, once a block is full;
values per token, over groups of `group` channels within a head. With a residual window of R
tokens, the R most recent keys and values stay in float. So query t sees key s quantized iff
s <= t - R and s's block is complete at t, and value s quantized iff s <= t - R: one forward over a
window computes what token-by-token decoding from such a cache computes. Under a rotated model
(quant.rotation) queries and keys are rotated by a Hadamard over the head dimension first (R3),
which leaves the float scores unchanged and spreads the keys' outlier channels.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fake_quant import fake_quantize, fake_quantize_fractional
from .rotation import hadamard_transform, paley_factor
from .scheme import MIN_SCALE, QScheme, qparams_from_range

NAME = "quant_kv"  # the attention implementation's registered name
FLOAT_BYTES = 2  # a float cache is counted at 16 bits, what serving stacks keep
SCALE_BYTES = 2  # each group's scale (and minimum, when asymmetric) at 16 bits


def check_scheme(scheme: QScheme) -> None:
    if scheme.format != "int" or scheme.granularity != "group" or scheme.dynamic:
        raise ValueError(f"a KV-cache scheme is an integer scheme per group (keys: `group_size` tokens per channel, "
                         f"values: `group_size` channels per token), got {scheme.describe()}")


def fake_quantize_groups(x: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Quantize-dequantize each group along the last dimension: symmetric by its absmax,
    asymmetric by its own min and max (a fractional zero point; KIVI does not widen to 0)."""
    if scheme.symmetric:
        amax = x.abs().amax(-1, keepdim=True).float()
        scale, zp = qparams_from_range(-amax, amax, scheme)
        return fake_quantize(x, scale, zp, scheme.qmin, scheme.qmax)
    lo, hi = x.amin(-1, keepdim=True).float(), x.amax(-1, keepdim=True).float()
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=MIN_SCALE)
    return fake_quantize_fractional(x, scale, scheme.qmin - lo / scale, scheme.qmin, scheme.qmax)


def quantize_keys(k: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """(B, H, S, D) keys, per channel over blocks of group_size tokens (a last partial block is
    quantized over what it holds; the attention reads it in float until it is full)."""
    g = scheme.group_size
    b, h, s, d = k.shape
    pad = -s % g
    kp = F.pad(k, (0, 0, 0, pad)) if pad else k
    if pad:  # repeat the last token so that padding does not widen the partial block's range
        kp[:, :, s:] = k[:, :, -1:]
    blocks = kp.reshape(b, h, -1, g, d).transpose(-1, -2)
    return fake_quantize_groups(blocks, scheme).transpose(-1, -2).reshape(b, h, s + pad, d)[:, :, :s]


def quantize_values(v: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """(B, H, S, D) values, per token over groups of group_size channels."""
    d, g = v.shape[-1], scheme.group_size
    if d % g:
        raise ValueError(f"KV-cache groups of {g} channels do not divide the head dimension {d}")
    return fake_quantize_groups(v.reshape(*v.shape[:-1], d // g, g), scheme).reshape(v.shape)


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hugging Face attention interface: (B, Hq, T, D) queries against a (B, Hkv, S, D) cache."""
    scheme, residual = module.kv_scheme, module.kv_residual
    if getattr(module, "kv_rotate", False):  # R3: q k^T is unchanged by a rotation of both
        small = paley_factor(query.shape[-1])
        query, key = hadamard_transform(query, small), hadamard_transform(key, small)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    t, s, g = query.shape[-2], key.shape[-2], scheme.group_size
    kq, vq = quantize_keys(key, scheme), quantize_values(value, scheme)
    rep = query.shape[1] // key.shape[1]  # grouped-query attention: each cached head serves `rep` query heads
    k, kq, v, vq = (x.repeat_interleave(rep, dim=1) if rep > 1 else x for x in (key, kq, value, vq))
    qpos = torch.arange(s - t, s, device=query.device)[:, None]
    kpos = torch.arange(s, device=query.device)[None, :]
    recent = kpos > qpos - residual
    key_float = recent | ((kpos // g + 1) * g - 1 > qpos)  # the key's block is not full yet at this query
    scores = torch.where(key_float, query @ k.transpose(-1, -2), query @ kq.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    if attention_mask is not None:
        mask = attention_mask[..., :s]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.where(recent, probs, 0) @ v + torch.where(recent, 0, probs) @ vq
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(NAME, kv_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def attention_modules(model: nn.Module) -> list:
    """The modules whose forward calls the attention interface (one per decoder layer)."""
    found = [m for m in model.modules() if hasattr(m, "head_dim") and
             any(hasattr(m, p) for p in ("q_proj", "c_attn", "qkv_proj")) and hasattr(m, "layer_idx")]
    if not found:
        raise ValueError(f"KV-cache quantization needs a Hugging Face decoder with attention modules; "
                         f"found none in a {type(model).__name__}")
    return found


def check_kv(model: nn.Module, scheme: QScheme) -> list:
    """The model's attention modules; ValueError saying why this cache scheme cannot apply, if it cannot."""
    check_scheme(scheme)
    mods = attention_modules(model)
    for m in mods:
        if m.head_dim % scheme.group_size:
            raise ValueError(f"KV-cache groups of {scheme.group_size} channels do not divide the head dimension "
                             f"{m.head_dim}: pick a group size that does")
    return mods


def quantize_kv_cache(model: nn.Module, scheme: QScheme, residual: int = 0) -> nn.Module:
    """Make every attention layer of a Hugging Face causal LM read its keys and values as a
    quantized cache holds them (module docstring), in place."""
    if residual < 0:
        raise ValueError(f"the KV residual window is a number of tokens >= 0, got {residual}")
    for m in check_kv(model, scheme):
        m.kv_scheme, m.kv_residual = scheme, residual
    _register()
    model.set_attn_implementation(NAME)
    return model


def kv_bytes_per_token(config, scheme: QScheme | None, residual: int = 0, seq_len: int | None = None) -> float:
    """Cache bytes per token over all layers: quantized values plus each group's 16-bit scale (and
    minimum), with the residual window's tokens in float, averaged over a window of seq_len
    tokens; a float cache (scheme None) at 16 bits."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elems = 2 * layers * heads * head_dim  # keys and values
    if scheme is None:
        return float(elems * FLOAT_BYTES)
    per_group = SCALE_BYTES * (1 if scheme.symmetric else 2)
    quantized = elems * (scheme.bits / 8 + per_group / scheme.group_size)
    share = 0.0 if seq_len is None else min(residual, seq_len) / seq_len
    return float((1 - share) * quantized + share * elems * FLOAT_BYTES)
