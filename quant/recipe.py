"""Recipe, one quantization described in full (method and its arguments, weight and activation
schemes, observers, which layers), and quantize_model, the one entry point that applies it.

    recipe = Recipe(weight=QScheme(4, symmetric=False, granularity="group", group_size=128),
                    method="gptq", method_args={"act_order": True})
    quantize_model(model, recipe, calib=batches_of_token_ids)

A recipe validates itself, round-trips through JSON exactly, and has a short stable `id` (a hash
of its canonical JSON), which every result row and saved model carries.
"""
import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .calibrate import calibrate
from .modules import layer_scheme, quant_modules, quantize_linears
from .observers import check_search_format
from .scheme import QScheme

# each method's arguments and their defaults: a recipe always holds all of them, filled in
METHOD_ARGS = {
    "rtn": {},
    "gptq": {"block_size": 128, "damp": 0.01, "act_order": False, "gptaq": False, "gptaq_alpha": 1.0, "true_sequential": True,
             "hessian_mse": False},
    "awq": {"grid": 20, "tokens": 4096},
    "smoothquant": {"alpha": 0.5},
    "hqq": {"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "round_start": False},
    "signround": {"iters": 200, "batch": 8, "minmax": True},  # batch: calibration windows per step
    "qat": {"mode": "ste", "epochs": 3, "lr": 1e-3},  # quantize_model prepares; the caller trains and freezes
}
# arguments added after recipes first carried ids: written into the JSON only when not at their
# default, so that every recipe that existed before keeps its id (and its rows and artefacts)
LATER_ARGS = {"gptq": {"gptaq": False, "gptaq_alpha": 1.0, "true_sequential": True, "hessian_mse": False},
              "mse": {"norm": 2.0, "min_ratio": 0.05}}
GPTQ_PASS_TOKENS = 16384  # calibration tokens per block call in GPTQ (32 windows of 512: ~0.3 GB of fp32 attention)
W_OBSERVERS = ("minmax", "mse", "percentile")
A_OBSERVERS = ("minmax", "ema", "percentile", "mse", "entropy")
ROTATIONS = ("none", "hadamard")
OBSERVER_ARGS = {"percentile": {"percentile": 99.99}, "ema": {"averaging_constant": 0.01},
                 "mse": {"norm": 2.0, "min_ratio": 0.05}}  # |error|^norm over clip ratios min_ratio..1


def _filled(kind: str, given: dict, defaults: dict) -> tuple:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} argument(s) {unknown}; expected some of {sorted(defaults)}")
    out = {**defaults, **given}
    for key, value in out.items():
        want = type(defaults[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value = float(value)
        if type(value) is not want:
            raise ValueError(f"{kind} argument {key} must be a {want.__name__}, got {value!r}")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Recipe:
    """One quantization. Method arguments and observer parameters may be given as dicts; they are
    stored with every default filled in, so two recipes that mean the same are equal and share an id.

    weight       the weight scheme (the grid every method ends on)
    method       rtn | gptq | awq | smoothquant | hqq | signround | qat, with `method_args` (see METHOD_ARGS)
    w_observer   how a weight's range is chosen: minmax | mse | percentile (GPTQ: its scale search);
                 AWQ runs its own clip search
    activation   None (weight-only), a per-tensor scheme (static, calibrated with `a_observer`) or
                 a per-token scheme (dynamic)
    skip         fnmatch globs of layers left in float; embeddings: quantize embedding tables
                 and lm_head too (weight-only); group_fallback: layers narrower than the group
                 get per-channel weights instead of an error
    layer_weights  {layer name: QScheme}: that layer's weight scheme instead of `weight` (mixed
                 precision: quant.mixed chooses them); every named layer must be quantized
    rotation     none | hadamard: rotate the float model first (quant.rotation; Llama-family)
    kv_cache     None (a float cache) or an integer group scheme for the KV cache (quant.kvcache:
                 keys per channel over group_size tokens, values per token over group_size
                 channels), with the `kv_residual` most recent tokens kept in float
    """
    weight: QScheme
    method: str = "rtn"
    method_args: tuple = ()
    w_observer: str = "minmax"
    w_observer_args: tuple = ()
    activation: QScheme | None = None
    a_observer: str | None = None
    a_observer_args: tuple = ()
    skip: tuple = ("lm_head",)
    embeddings: bool = False
    group_fallback: bool = True
    layer_weights: tuple = ()  # ((name, QScheme), ...) sorted by name; given as a dict or pairs
    rotation: str = "none"
    kv_cache: QScheme | None = None
    kv_residual: int = 0
    version: int = field(default=1, repr=False)  # of this description; bump when a field's meaning changes

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        if self.version != 1:
            raise ValueError(f"recipe version {self.version!r}: this code reads version 1")
        if not isinstance(self.weight, QScheme) or self.weight.dynamic:
            raise ValueError(f"weight must be a static QScheme (tensor, channel or group), got {self.weight!r}")
        if self.method not in METHOD_ARGS:
            raise ValueError(f"method must be one of {sorted(METHOD_ARGS)}, got {self.method!r}")
        put("method_args", _filled(f"{self.method}", dict(self.method_args), METHOD_ARGS[self.method]))
        a = dict(self.method_args)
        if self.method == "gptq" and not a["gptaq"] and a["gptaq_alpha"] != 1.0:  # alpha means nothing without gptaq
            put("method_args", _filled("gptq", {**a, "gptaq_alpha": 1.0}, METHOD_ARGS["gptq"]))
        bad = {"gptq": not 0 < a.get("gptaq_alpha", 1) <= 1,
               "hqq": a.get("iters", 0) < 0 or not 0 < a.get("lp_norm", 1) <= 1 or a.get("beta", 1) <= 0 or a.get("kappa", 1) < 1,
               "signround": a.get("iters", 0) < 0 or a.get("batch", 1) < 1}.get(self.method, False)
        if bad:
            raise ValueError(f"{self.method} arguments out of range: {a} (iters >= 0; hqq: 0 < lp_norm <= 1, beta > 0, "
                             f"kappa >= 1; signround: batch >= 1; gptq: 0 < gptaq_alpha <= 1)")
        if self.method == "gptq" and a["hessian_mse"] and self.w_observer != "mse":
            raise ValueError("hessian_mse weighs GPTQ's MSE range search: it needs w_observer='mse'")
        if self.method == "gptq" and a["gptaq"] and not a["true_sequential"]:
            raise ValueError("GPTAQ compares each layer's quantized input with its float one: it needs true_sequential=True")
        if self.method == "qat" and dict(self.method_args)["mode"] not in ("ste", "lsq"):
            raise ValueError(f"qat mode must be 'ste' or 'lsq', got {dict(self.method_args)['mode']!r}")
        if self.w_observer not in W_OBSERVERS:
            raise ValueError(f"w_observer must be one of {W_OBSERVERS}, got {self.w_observer!r}")
        if self.method == "gptq" and self.w_observer == "percentile":
            raise ValueError("gptq chooses its ranges by min-max or its MSE search: w_observer minmax or mse")
        if self.method in ("awq", "hqq", "signround") and self.w_observer != "minmax":
            raise ValueError(f"{self.method} runs its own range search: leave w_observer at minmax")
        if self.weight.format != "int" and self.method not in ("rtn", "gptq", "smoothquant"):
            raise ValueError(f"{self.weight.format} weights take rtn, gptq or smoothquant ({self.method}'s search "
                             f"scores integer grids)")
        for sch, obs in ((self.weight, self.w_observer), (self.activation, self.a_observer)):
            if sch is not None and obs is not None:
                check_search_format(obs, sch.format)
        if self.method == "hqq" and self.weight.symmetric:
            raise ValueError("hqq optimises each group's zero point: give an asymmetric weight scheme")
        put("w_observer_args", _filled(f"{self.w_observer} observer", dict(self.w_observer_args),
                                       OBSERVER_ARGS.get(self.w_observer, {})))
        if self.activation is not None and not isinstance(self.activation, QScheme):
            raise ValueError(f"activation must be a QScheme or None, got {self.activation!r}")
        static = self.activation is not None and not self.activation.dynamic
        if self.activation is not None and self.activation.granularity not in ("tensor", "token"):
            raise ValueError(f"activations are quantized per tensor (static) or per token (dynamic), "
                             f"not per {self.activation.granularity}")
        if static:
            put("a_observer", self.a_observer or "minmax")
            if self.a_observer not in A_OBSERVERS:
                raise ValueError(f"a_observer must be one of {A_OBSERVERS}, got {self.a_observer!r}")
            put("a_observer_args", _filled(f"{self.a_observer} observer", dict(self.a_observer_args),
                                           OBSERVER_ARGS.get(self.a_observer, {})))
        elif self.a_observer is not None or self.a_observer_args:
            raise ValueError("a_observer applies only to static (per-tensor) activation quantization")
        else:
            put("a_observer_args", ())
        for args in (self.w_observer_args, self.a_observer_args):
            m = dict(args)
            if "min_ratio" in m and not (m["norm"] > 0 and 0 < m["min_ratio"] <= 1):
                raise ValueError(f"the mse observer needs norm > 0 and 0 < min_ratio <= 1, got {m}")
        if self.method == "smoothquant" and self.activation is None:
            raise ValueError("smoothquant only helps quantized activations: give an activation scheme")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"skip must be a sequence of layer-name globs, got {self.skip!r}")
        put("skip", tuple(self.skip))
        pairs = self.layer_weights.items() if isinstance(self.layer_weights, dict) else self.layer_weights
        pairs = tuple(sorted(((n, QScheme(**sch) if isinstance(sch, dict) else sch) for n, sch in pairs), key=lambda p: str(p[0])))
        for name, sch in pairs:
            if not isinstance(name, str) or not isinstance(sch, QScheme) or sch.dynamic:
                raise ValueError(f"layer_weights maps layer names to static weight QSchemes, got {name!r}: {sch!r}")
            if self.method == "hqq" and sch.symmetric:
                raise ValueError(f"hqq optimises each group's zero point: layer {name} has a symmetric scheme")
        if len({n for n, _ in pairs}) != len(pairs):
            raise ValueError("layer_weights names a layer twice")
        put("layer_weights", pairs)
        for flag in ("embeddings", "group_fallback"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.rotation != "none" and self.method in ("qat", "hqq", "signround"):
            raise ValueError(f"rotation composes with rtn, gptq, awq and smoothquant, not {self.method}")
        if isinstance(self.kv_cache, dict):
            put("kv_cache", QScheme(**self.kv_cache))
        if self.kv_cache is not None:
            from .kvcache import check_scheme
            check_scheme(self.kv_cache)
        if type(self.kv_residual) is not int or self.kv_residual < 0 or (self.kv_residual and self.kv_cache is None):
            raise ValueError(f"kv_residual is a number of tokens >= 0 kept in float by a quantized KV cache, "
                             f"got {self.kv_residual!r}" + ("" if self.kv_cache is not None else " without kv_cache"))

    def scheme_of(self, name: str, in_features: int) -> QScheme:
        """The weight scheme of one layer (full name in the model): its own, or `weight`."""
        own = dict(self.layer_weights).get(name)
        scheme = own or self.weight
        return layer_scheme(scheme, in_features) if self.group_fallback else scheme

    @property
    def args(self) -> dict:
        return dict(self.method_args)

    @property
    def needs_calibration(self) -> bool:
        """Whether the result depends on calibration data (weight-only RTN and dynamic activations do not)."""
        return self.method in ("gptq", "awq", "smoothquant", "signround") or self.act == "static"

    @property
    def act(self) -> str:
        return "none" if self.activation is None else "dynamic" if self.activation.dynamic else "static"

    def to_dict(self) -> dict:
        def written(name, args):  # (LATER_ARGS at their default are left out)
            later = LATER_ARGS.get(name, {})
            return {k: v for k, v in args if not (k in later and v == later[k])}
        d = {"version": self.version, "method": self.method, "method_args": written(self.method, self.method_args),
             "weight": self.weight.to_dict(), "w_observer": self.w_observer,
             "w_observer_args": written(self.w_observer, self.w_observer_args),
             "activation": None if self.activation is None else self.activation.to_dict(),
             "a_observer": self.a_observer, "a_observer_args": written(self.a_observer, self.a_observer_args),
             "skip": list(self.skip), "embeddings": self.embeddings, "group_fallback": self.group_fallback}
        if self.layer_weights:  # (added after ids existed: absent when empty, so earlier ids stand)
            d["layer_weights"] = {n: sch.to_dict() for n, sch in self.layer_weights}
        if self.rotation != "none":  # (likewise)
            d["rotation"] = self.rotation
        if self.kv_cache is not None:
            d["kv_cache"], d["kv_residual"] = self.kv_cache.to_dict(), self.kv_residual
        return d

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; the same text in every process and machine."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        return cls(weight=QScheme(**d.pop("weight")),
                   activation=None if d.get("activation") is None else QScheme(**d.pop("activation")),
                   layer_weights={n: QScheme(**sch) for n, sch in d.pop("layer_weights", {}).items()},
                   kv_cache=None if d.get("kv_cache") is None else QScheme(**d.pop("kv_cache")),
                   **{k: (tuple(v) if k == "skip" else v) for k, v in d.items() if k not in ("activation", "kv_cache")})

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    @property
    def id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @property
    def mix(self) -> str:
        """How many layers have each scheme of layer_weights, e.g. "int3 asym g128 x150, int4 asym g64 x60"."""
        counts = {}
        for _, sch in self.layer_weights:
            counts[sch.describe()] = counts.get(sch.describe(), 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))

    def describe(self) -> str:
        tail = (" +hadamard" if self.rotation != "none" else "") + (
            f" kv{self.kv_cache.bits} g{self.kv_cache.group_size}" + (f" r{self.kv_residual}" if self.kv_residual else "")
            if self.kv_cache is not None else "")
        return self._describe() + tail

    def _describe(self) -> str:
        a = self.activation
        w = f"W{self.weight.bits}" + (f"A{a.bits} {self.act}" if a is not None else "")
        w += f" a={a.format}" if a is not None and a.format != "int" else ""
        w += f" a_group={a.group_size}" if a is not None and a.group_size else ""
        extra = [f"{k}={v}" for k, v in sorted(self.to_dict()["method_args"].items())]
        if self.w_observer != "minmax":
            search = sorted(self.to_dict()["w_observer_args"].items())
            extra.append(f"w_observer={self.w_observer}" + "".join(f" {k}={v}" for k, v in search))
        if self.a_observer:
            extra.append(self.a_observer)
        if self.layer_weights:
            act = f" A{a.bits} {self.act}" if a is not None else ""
            return f"{self.method} mixed{act} [{self.mix}]" + (f" ({', '.join(extra)})" if extra else "")
        return f"{self.method} {w} {self.weight.describe()}" + (f" ({', '.join(extra)})" if extra else "")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def quantize_model(model: nn.Module, recipe: Recipe, calib=None, progress: bool = True) -> nn.Module:
    """Quantize `model` in place as `recipe` says and return it.

    calib: calibration batches (an iterable of model inputs: token-id tensors for a causal LM,
    feature batches otherwise), needed by static activations and by GPTQ / AWQ / SmoothQuant,
    which run block by block on Hugging Face decoder models (each block calibrated on the outputs
    of the already-quantized blocks before it). For method "qat" the model comes back with float
    weights under fake quantization, ready to train; call `.freeze()` on its quant modules after.
    A rotation is applied to the float model before anything else, a KV-cache scheme after.
    A model whose decoder blocks stay on disk (quant.onload.open_model) is quantized one block at a
    time, round to nearest too.
    Under torchrun (quant.distributed) each rank passes the same batches and calibrates on its
    share of them; the statistics are reduced, so every rank ends with the same quantized model,
    the one a single process makes up to the order of float sums.
    """
    distributed.check_recipe(recipe)
    onload = getattr(model, "onload", None)
    if onload is not None:
        from .onload import check_recipe
        check_recipe(recipe)
    batches = None if calib is None else list(calib)
    if recipe.needs_calibration and not batches:
        raise ValueError(f"{recipe.describe()} needs calibration batches (calib=...)")
    if recipe.rotation == "hadamard":  # the float model first: every method then calibrates the rotated one
        from .rotation import rotate_model
        rotate_model(model)
    _quantize_layers(model, recipe, batches, progress)
    if recipe.kv_cache is not None:
        from .kvcache import quantize_kv_cache
        quantize_kv_cache(model, recipe.kv_cache, recipe.kv_residual)
    _check_swapped(model, recipe)
    return model


def _quantize_layers(model: nn.Module, recipe: Recipe, batches, progress: bool) -> None:
    from .sequential import merge_batches, run_block, sequential_quantize
    w_kw = dict(recipe.w_observer_args)
    a_kw = dict(recipe.a_observer_args)
    device = _device(model)
    static = recipe.act == "static"

    if recipe.method == "rtn" and getattr(model, "onload", None) is not None:
        _rtn_blocks(model, recipe, batches, progress)
        return
    if recipe.method in ("rtn", "qat", "hqq"):
        qat, hqq = recipe.method == "qat", recipe.method == "hqq"
        swapped = quantize_linears(model, recipe.weight, recipe.activation, skip=() if recipe.embeddings else recipe.skip,
                                   group_fallback=recipe.group_fallback, embeddings=recipe.embeddings and not qat,
                                   overrides=dict(recipe.layer_weights),
                                   w_observer=recipe.w_observer, qat=qat, learnable=qat and recipe.args["mode"] == "lsq",
                                   fit_weight=not hqq, **w_kw)
        if hqq:
            from .hqq import hqq_quantize
            for name in tqdm(swapped, desc="hqq", disable=not progress, leave=False):
                hqq_quantize(model.get_submodule(name), **recipe.args)
        if static:
            calibrate(model, distributed.shard_batches(batches), observer=recipe.a_observer, forward=lambda m, b: m(b.to(device)),
                      desc=f"calibrate {recipe.a_observer}", progress=progress, **a_kw)
        return

    from .arch import block_prefix, weight_matrix
    from .gptq import gptq_block
    from .signround import signround_block
    from .smoothing import awq_block, smooth_block
    args = recipe.args
    prefix = block_prefix(model)

    def process(index, block, inputs, float_inputs=None, float_outputs=None):
        def scheme_for(name, module):  # (names inside the block)
            return recipe.scheme_of(f"{prefix}{index}.{name}", weight_matrix(module).shape[1])

        if recipe.method == "signround":
            signround_block(block, inputs, float_outputs, scheme_for, recipe.activation, iters=args["iters"],
                            minmax=args["minmax"], seed=index)
        elif recipe.method == "gptq":
            gptq_block(block, inputs, scheme_for, recipe.activation, float_inputs=float_inputs, gptaq_alpha=args["gptaq_alpha"],
                       true_sequential=args["true_sequential"],
                       block_size=args["block_size"], percdamp=args["damp"], act_order=args["act_order"],
                       mse=recipe.w_observer == "mse" and dict(recipe.w_observer_args), hessian_mse=args["hessian_mse"])
        elif recipe.method == "awq":
            awq_block(block, inputs, scheme_for, recipe.activation, n_grid=args["grid"], max_rows=args["tokens"])
        else:  # smoothquant: fold the smoothing scales, then round to nearest
            smooth_block(block, inputs, args["alpha"])
            quantize_linears(block, recipe.weight, recipe.activation, group_fallback=recipe.group_fallback,
                             w_observer=recipe.w_observer, overrides=_block_overrides(recipe, prefix, index), **w_kw)
        if static:  # static scales from this block's real inputs
            calibrate(block, inputs, observer=recipe.a_observer, forward=lambda m, inp: run_block(m, *inp),
                      progress=False, **a_kw)

    if recipe.method == "gptq" and not static:  # (observers of static activations may depend on batch boundaries)
        # (at least one merged batch per rank; where that leaves the cap alone, ranks get the very batches one process runs)
        tokens = sum(b.numel() if torch.is_tensor(b) else 1 for b in batches)
        cap = getattr(getattr(model, "onload", None), "pass_tokens", None) or GPTQ_PASS_TOKENS  # (a memory cap's share)
        batches = merge_batches(batches, min(GPTQ_PASS_TOKENS, cap, -(-tokens // distributed.world())))
    if recipe.method == "signround":  # one step's batch: `batch` windows (batches are merged, never split)
        batches = merge_batches(batches, args["batch"] * max(b.shape[-1] if torch.is_tensor(b) else 1 for b in batches))
    batches = distributed.shard_batches(batches)  # (merged first: each rank's share is whole batches one process runs)
    sequential_quantize(model, batches, device, process, progress=progress, desc=f"{recipe.method} blocks",
                        float_chain=recipe.method == "signround" or (recipe.method == "gptq" and args["gptaq"]))
    if recipe.embeddings:  # lm_head and embeddings: round to nearest, weight-only
        quantize_linears(model, recipe.weight, None, group_fallback=recipe.group_fallback, embeddings=True,
                         w_observer=recipe.w_observer, overrides=dict(recipe.layer_weights), **w_kw)


def _block_overrides(recipe: Recipe, prefix: str, index: int) -> dict:
    """recipe.layer_weights of block `index`, named inside the block."""
    head = f"{prefix}{index}."
    return {n[len(head):]: sch for n, sch in recipe.layer_weights if n.startswith(head)}


def _rtn_blocks(model: nn.Module, recipe: Recipe, batches, progress: bool) -> None:
    """Round to nearest block by block, for a model whose blocks stay on disk. Static activation
    scales come from each block's inputs as the whole-model calibration sees them: quantized
    weights, float activations (calibrate's convention) in the blocks before it."""
    from .arch import block_prefix
    from .calibrate import activation_quant_disabled
    from .sequential import first_block_inputs, run_block
    prefix, onload = block_prefix(model), model.onload
    static = recipe.act == "static"
    inputs = first_block_inputs(model, onload.blocks, distributed.shard_batches(batches), _device(model)) if static else None
    for i in tqdm(range(len(onload.blocks)), desc="rtn blocks", disable=not progress, leave=False):
        block = onload.load(i)
        quantize_linears(block, recipe.weight, recipe.activation, group_fallback=recipe.group_fallback,
                         w_observer=recipe.w_observer, overrides=_block_overrides(recipe, prefix, i),
                         **dict(recipe.w_observer_args))
        if static:
            calibrate(block, inputs, observer=recipe.a_observer, forward=lambda m, inp: run_block(m, *inp),
                      progress=False, **dict(recipe.a_observer_args))
            with activation_quant_disabled(block):
                inputs = [((run_block(block, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        onload.release(i, keep=True)


def _check_swapped(model: nn.Module, recipe: Recipe) -> None:
    done = quant_modules(model)
    if not done:
        raise ValueError("the recipe quantized no layer: the model has no nn.Linear / Conv1D outside `skip`")
    missing = [n for n, _ in recipe.layer_weights if n not in done]
    if missing:
        raise ValueError(f"layer_weights names {len(missing)} layer(s) the recipe did not quantize, first {missing[0]!r}")
