"""What depends on the model's architecture, in one place: which modules are linear layers and
how their weights are oriented (GPT-2's Conv1D stores (in, out)), where the decoder blocks are and
what follows them, which linears read the same input and what produces it (for the SmoothQuant /
AWQ folds and the fused int4 decoding), and how a per-input-channel scale is folded into a
producer and its consumers."""
import torch
import torch.nn as nn


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D (a linear layer with its weight stored as (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or Conv1D (a view: Conv1D's is transposed)."""
    return m.weight.t() if is_conv1d(m) else m.weight


def in_out(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    out_f, in_f = weight_matrix(m).shape
    return in_f, out_f


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the ModuleList with one entry per hidden layer."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return m
    raise ValueError(f"cannot find the decoder blocks of a {type(model).__name__}")


def block_prefix(model: nn.Module) -> str:
    """The name prefix of the decoder blocks ("model.layers." for Llama): block i's modules are
    named prefix + f"{i}." + their name inside the block."""
    blocks = decoder_blocks(model)
    return next(n for n, m in model.named_modules() if m is blocks) + "."


FINAL_NORMS = ["model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"]  # (then the output embeddings)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the output head (Llama's model.norm, GPT-2's ln_f)."""
    for name in FINAL_NORMS:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the final norm of a {type(model).__name__} (known: {', '.join(FINAL_NORMS)})")


# (producer, consumers) of known decoder blocks; names relative to the block
MAPPINGS = [
    # Llama, Mistral, Qwen2, SmolLM
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    # GPT-2
    ("ln_1", ["attn.c_attn"]),
    ("ln_2", ["mlp.c_fc"]),
    # OPT
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("final_layer_norm", ["fc1"]),
]


def scale_groups(block: nn.Module, norms_only: bool = False) -> list:
    """[(producer name, producer, {consumer name: consumer})] present in this block, where the
    folding is exact: a norm producer, or a linear whose output rows are the consumers' inputs."""
    found = []
    for prod_name, cons_names in MAPPINGS:
        try:
            prod = block.get_submodule(prod_name)
            cons = {n: block.get_submodule(n) for n in cons_names}
        except AttributeError:
            continue
        if not all(is_linear(c) for c in cons.values()):
            continue
        if any(getattr(c, "input_transform", None) is not None for c in cons.values()):
            continue  # an online rotation mixes the channels between producer and consumer
        if is_linear(prod):
            if norms_only or in_out(prod)[1] != in_out(next(iter(cons.values())))[0]:
                continue  # e.g. v_proj -> o_proj under grouped-query attention: shapes differ
        elif not hasattr(prod, "weight"):
            continue
        found.append((prod_name, prod, cons))
    return found


def shared_inputs(block: nn.Module) -> list[dict]:
    """[{name: module}] of the modules in this block that read one and the same input tensor (the
    consumers of one norm: q/k/v, gate/up), whatever the modules have become."""
    found = []
    for _, cons_names in MAPPINGS:
        try:
            found.append({n: block.get_submodule(n) for n in cons_names})
        except AttributeError:
            continue
    return [group for group in found if len(group) > 1]


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: dict, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by s."""
    s = s.to(producer.weight.device)
    if is_linear(producer):
        if is_conv1d(producer):
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(0))
        else:
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:  # LayerNorm / RMSNorm
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for c in consumers.values():
        if is_conv1d(c):
            c.weight.mul_(s.to(c.weight.dtype).unsqueeze(1))
        else:
            c.weight.mul_(s.to(c.weight.dtype).unsqueeze(0))
