"""Hadamard rotations (QuaRot / SpinQuant with fixed Hadamards): the matrices, a fast
Walsh-Hadamard transform, and `rotate_model`, which rewrites a Llama-family model so that its
float function is unchanged while its activations lose their outlier channels.

    R1  the residual stream: embeddings, every linear that reads or writes it and lm_head,
        offline (folded into the weights, RMSNorm weights folded into their consumers first)
    R2  each attention head's value / output path, offline
    R3  queries and keys after RoPE, online, inside the KV-cache attention (quant.kvcache)
    R4  the input of every MLP down projection, online (a transform attached to the layer)

Sizes n = m * 2^k are built as H_m (x) H_2^k with a Sylvester H_2^k and, where m > 1, a Paley
construction of order m * 2^j (p = m * 2^j - 1 a prime = 3 mod 4), as QuaRot does with its table
of known orders; other sizes are refused.
"""
import math

import torch
import torch.nn as nn

ARCHS = ("llama", "mistral", "qwen2")  # RMSNorm (weight * x / rms) pre-norm decoders with these module names


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (+-1 entries)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k, m = 1 or the order of a Paley matrix; ValueError otherwise."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    pow2 = n & -n
    m = n // pow2
    if m == 1:
        return 1, n
    while m <= n:
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return m, n // m
        m *= 2
    raise ValueError(f"{n} is not 2^k times a Paley order (q + 1 for a prime q = 3 mod 4), the orders this "
                     f"construction covers")


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal n x n Hadamard matrix H (H @ H.T = I) that `hadamard_transform` applies."""
    m, p = factor(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    small = _paley(m - 1) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return (torch.kron(small, sylvester) / math.sqrt(n)).to(dtype)


def hadamard_transform(x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
    """x @ H over the last dimension in O(n log n) (plus O(n m) for a Paley factor of order m):
    butterflies over the power-of-two factor, then the small dense factor. `small` is the
    Paley factor (+-1 entries) when n is not a power of two; `paley_factor(n)` gives it."""
    n = x.shape[-1]
    m = 1 if small is None else small.shape[0]
    p = n // m
    if m * p != n or p & (p - 1):
        raise ValueError(f"hadamard_transform: last dimension {n} is not {m} x a power of two")
    shape = x.shape
    y = x.reshape(-1, m, p)
    h = 1
    while h < p:  # Sylvester butterflies: pairs (a, b) -> (a + b, a - b) at stride h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:  # x @ (S (x) B) = S^T X B for X the (m, p) reshaping of x
        y = torch.einsum("ji,bjp->bip", small.to(y), y)
    return (y / math.sqrt(n)).reshape(shape)


def paley_factor(n: int) -> torch.Tensor | None:
    m, _ = factor(n)
    return _paley(m - 1) if m > 1 else None


class Hadamard(nn.Module):
    """An online transform x -> x @ H over the last dimension (size n), as a layer's input transform."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        small = paley_factor(n)
        self.register_buffer("small", None if small is None else small.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.small)

    def extra_repr(self) -> str:
        return f"n={self.n}"


def check_rotatable(model: nn.Module) -> None:
    """ValueError saying why `rotate_model` cannot rotate this model, if it cannot."""
    from .modules import quant_modules
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHS:
        raise ValueError(f"rotation supports {', '.join(ARCHS)} models (RMSNorm pre-norm decoders), not "
                         f"{kind or type(model).__name__}: a LayerNorm's mean subtraction does not commute with a rotation")
    if quant_modules(model):
        raise ValueError("rotate the float model before quantizing it")
    d = cfg.hidden_size
    for what, n in (("hidden size", d), ("MLP width", model.model.layers[0].mlp.down_proj.weight.shape[1]),
                    ("head dimension", getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)):
        try:
            factor(n)
        except ValueError as e:
            raise ValueError(f"cannot rotate this {kind} model: its {what} {n} has no Hadamard matrix here ({e})") from None


def _rows(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (w.double() @ q.to(w.device)).to(w.dtype)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Rotate a Llama-family causal LM in place (R1, R2, R4 above; R3 is applied by the KV-cache
    attention): the float model computes the same function, up to rounding. R1 is a Hadamard
    matrix with random signs from `seed` (QuaRot's randomized Hadamard); tied embeddings are untied
    (lm_head takes the final norm's weight)."""
    from .modules import attach_input_transform
    check_rotatable(model)
    cfg = model.config
    inner, lm_head = model.model, model.get_output_embeddings()
    d = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1)
    q1 = signs[:, None] * hadamard_matrix(d)  # R1 = diag(signs) @ H: orthogonal
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    h2 = hadamard_matrix(head_dim)

    def fold_norm(norm, consumers):  # weight * x / rms(x): the weight moves into the consumers' input columns
        for lin in consumers:
            lin.weight.mul_(norm.weight.to(lin.weight.dtype)[None, :])
        norm.weight.fill_(1.0)

    emb = inner.embed_tokens
    if lm_head.weight is emb.weight:  # tied: lm_head gets its own copy before either changes
        lm_head.weight = nn.Parameter(emb.weight.detach().clone())
        cfg.tie_word_embeddings = False
    for layer in inner.layers:
        att, mlp = layer.self_attn, layer.mlp
        fold_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
        fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):  # read the stream: W @ R1
            lin.weight.copy_(_rows(lin.weight, q1))
        for lin in (att.o_proj, mlp.down_proj):  # write the stream: R1^T @ W (and its bias)
            lin.weight.copy_(_rows(lin.weight.t(), q1).t())
            if lin.bias is not None:
                lin.bias.copy_(_rows(lin.bias[None], q1)[0])
        # R2: each value head v_h -> v_h @ H (rows of v_proj, its bias), o_proj's columns of that head likewise
        n_kv = att.v_proj.weight.shape[0] // head_dim
        wv = att.v_proj.weight.t().reshape(d, n_kv, head_dim)
        att.v_proj.weight.copy_(_rows(wv, h2).reshape(d, -1).t())
        if att.v_proj.bias is not None:
            att.v_proj.bias.copy_(_rows(att.v_proj.bias.reshape(n_kv, head_dim), h2).reshape(-1))
        wo = att.o_proj.weight
        att.o_proj.weight.copy_(_rows(wo.reshape(wo.shape[0], -1, head_dim), h2).reshape(wo.shape))
        att.kv_rotate = True  # R3, used by quant.kvcache when the cache is quantized
        # R4: down_proj reads x @ H online; its weight becomes W @ H
        n = mlp.down_proj.weight.shape[1]
        mlp.down_proj.weight.copy_(_rows(mlp.down_proj.weight, hadamard_matrix(n)))
        attach_input_transform(mlp.down_proj, Hadamard(n).to(mlp.down_proj.weight.device))
    fold_norm(inner.norm, [lm_head])
    lm_head.weight.copy_(_rows(lm_head.weight, q1))
    emb.weight.copy_(_rows(emb.weight, q1))
    return model
