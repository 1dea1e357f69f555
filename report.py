"""Turn the results CSVs into Markdown tables and PNG plots, and put the tables in README.md.

    python report.py [--results_dir results] [--readme README.md]

The CSVs keep every run ever appended; a table shows the latest row of each configuration.
Writes results/tables.md, results/ptq_nn.png, results/qat_nn.png and results/ptq_llm_<model>.png,
and replaces the text between the `<!-- results:start -->` and `<!-- results:end -->` markers of
the README with the tables.
"""
import argparse
import os
import re

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values("timestamp").drop_duplicates(keys, keep="last")


def md(df: pd.DataFrame) -> str:
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".2f")


def ptq_nn(df, out_dir):
    df = latest(df, ["method", "w_bits", "a_bits", "observer", "w_observer", "granularity", "calib_samples", "seed"])
    fp32 = df[df.method == "fp32"].accuracy.iloc[-1]
    q = df[df.method == "ptq"]
    table = q.pivot_table(index=["granularity", "observer"], columns="w_bits", values="accuracy", aggfunc="last")
    table = table[sorted(table.columns, reverse=True)]
    table.columns = [f"W{int(c)}A8" for c in table.columns]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (gran, obs), row in q.groupby(["granularity", "observer"]):
        row = row.sort_values("w_bits")
        ax.plot(row.w_bits, row.accuracy, marker="o", ls="-" if gran == "channel" else "--", label=f"{obs} ({gran})")
    ax.axhline(fp32, color="k", lw=0.8, label=f"FP32 {fp32:.2f}%")
    ax.set(xlabel="weight bits (activations 8-bit)", ylabel="test accuracy (%)", title="MNIST MLP, PTQ", xticks=[2, 3, 4, 8])
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ptq_nn.png"), dpi=120)
    plt.close(fig)
    sizes = q.groupby(["w_bits", "granularity"]).size_bytes.last().unstack()
    return (f"FP32 accuracy {fp32:.2f}% ({int(df.test_images.iloc[-1])} test images, {int(df.fp32_size_bytes.iloc[-1])} bytes). "
            f"Test accuracy (%) after static PTQ, activations 8-bit affine per-tensor:\n\n" + md(table.reset_index())
            + "\n\nPacked size (bytes):\n\n" + md(sizes.reset_index().rename(columns={"w_bits": "weight bits"})))


def qat_nn(df, out_dir):
    df = latest(df, ["method", "w_bits", "a_bits", "granularity", "qat_epochs", "seed"])
    fp32 = df[df.method == "fp32"].accuracy.iloc[-1]
    q = df[df.method != "fp32"]
    table = q.pivot_table(index="w_bits", columns="method", values="accuracy", aggfunc="last")
    table.insert(0, "ptq", q.groupby("w_bits").ptq_accuracy.last())
    table = table.sort_index(ascending=False).reset_index()
    table.insert(0, "setting", [f"W{int(b)}A8" for b in table.w_bits])
    table = table.drop(columns="w_bits")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table.setting, table.ptq, marker="o", label="PTQ")
    for m in [c for c in table.columns if c.startswith("qat")]:
        ax.plot(table.setting, table[m], marker="o", label=m.replace("_", " ").upper())
    ax.axhline(fp32, color="k", lw=0.8, label=f"FP32 {fp32:.2f}%")
    ax.set(ylabel="test accuracy (%)", title="MNIST MLP: QAT vs PTQ (per-channel weights)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "qat_nn.png"), dpi=120)
    plt.close(fig)
    epochs = int(q.qat_epochs.iloc[-1])
    return f"FP32 accuracy {fp32:.2f}%. QAT: {epochs} epochs from the FP32 checkpoint. Test accuracy (%):\n\n" + md(table)


def ptq_llm(df, out_dir):
    parts = []
    for col, default in (("method_args", ""), ("w_symmetric", True), ("quant_seconds", None)):
        if col not in df.columns:
            df[col] = default
    df["method_args"] = df.method_args.fillna("")
    df["w_symmetric"] = df.w_symmetric.map(lambda v: str(v).lower() != "false")  # rows before the column were symmetric
    # the device is not a key: a configuration gives the same perplexity on CPU and GPU (the FP32 rows agree to 4 digits)
    df = latest(df, ["model", "method", "method_args", "w_bits", "a_bits", "act", "observer", "w_observer", "group_size",
                     "w_symmetric", "seq_len", "eval_tokens", "calib_samples", "seed"])
    for model, g in df.groupby("model", sort=False):
        g = g.copy()
        g["setting"] = [("FP32" if r.method == "fp32" else f"W{int(r.w_bits)}" + (f"A{int(r.a_bits)} {r.act}" if r.act != "none" else "")
                         + (f" g{int(r.group_size)}" if r.granularity == "group" else (" per-channel" if r.method != "fp32" else ""))
                         + ("" if r.w_symmetric or r.method == "fp32" else " asym")
                         + (f" {r.observer}" if isinstance(r.observer, str) and r.observer else "")) for r in g.itertuples()]
        g["size MB"] = g.size_bytes / 1e6
        # rows run with --skip_fp32 compare with the FP32 row of the same evaluation
        fp32_rows = g[g.method == "fp32"].groupby(["seq_len", "eval_tokens"]).perplexity.last()
        ref = [r.fp32_perplexity if pd.notna(r.fp32_perplexity) else fp32_rows.get((r.seq_len, r.eval_tokens))
               for r in g.itertuples()]
        g["Δppl"] = g.perplexity - pd.to_numeric(pd.Series(ref, index=g.index))
        g["method"] = [m + (f" ({a})" if a and m != "rtn" else "") for m, a in zip(g.method, g.method_args)]
        g["order"] = [(r.method != "fp32", r.act != "none", -r.w_bits, not r.w_symmetric, r.act, r.method != "rtn", r.method)
                      for r in g.itertuples()]
        g = g.sort_values("order", kind="stable")
        t = g[["setting", "method", "perplexity", "Δppl", "size MB", "quant_seconds", "seconds", "device"]].rename(
            columns={"quant_seconds": "quantize (s)", "seconds": "total (s)"})
        r = g.iloc[-1]
        name = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(str(model).rstrip("/"))).strip("_")
        fig, ax = plt.subplots(figsize=(6, 4))
        wo = g[(g.method != "fp32") & (g.act == "none")].sort_values("w_bits")
        for (method, sym), m in wo.groupby(["method", "w_symmetric"]):
            ax.plot(m.w_bits, m.perplexity, marker="o", ls="-" if sym else "--", label=f"{method}{'' if sym else ' asym'}")
        fp32 = g[g.method == "fp32"].perplexity
        if len(fp32):
            ax.axhline(fp32.iloc[-1], color="k", lw=0.8, label=f"FP32 {fp32.iloc[-1]:.2f}")
        ax.set(xlabel="weight bits (weight-only)", ylabel="WikiText-2 test perplexity", yscale="log", title=str(model),
               xticks=[2, 3, 4, 8])
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"ptq_llm_{name}.png"), dpi=120)
        plt.close(fig)
        parts.append(f"**{model}**: seq_len {int(r.seq_len)}, {int(r.eval_tokens)} evaluation tokens, "
                     f"{int(r.calib_samples)} calibration windows from the {r.calib_split} split; total time = quantize + "
                     f"calibrate + evaluate on the row's device (CPU rows: 2 cores; cuda rows: one H100).\n\n" + md(t)
                     + f"\n\n![{model}](results/ptq_llm_{name}.png)")
    return "\n\n".join(parts)


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
                    "speedup_decode", "rss_mb", "peak_rss_mb", "peak_forward_mb", "notes", "code"]
        cols = [c for c in cols if c in last.columns and last[c].notna().any()]
        r = last.iloc[0]
        parts.append(f"**{name}** on {device} ({r.quality_metric}; {int(r.threads)} threads, {r['dtype']}, "
                     f"torch {torch_version}; the latest row of each variant, its speedups against the float model "
                     f"of its own run, named by `code`):\n\n" + md(last[cols]))
    return "\n\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default="results")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args(argv)
    sections = []
    for name, title, fn in [("ptq_nn", "MNIST PTQ", ptq_nn), ("qat_nn", "MNIST QAT", qat_nn), ("ptq_llm", "Causal-LM PTQ", ptq_llm)]:
        path = os.path.join(args.results_dir, f"{name}.csv")
        if os.path.exists(path):
            body = fn(pd.read_csv(path), args.results_dir)
            img = f"\n\n![{title}](results/{name}.png)" if name != "ptq_llm" else ""
            sections.append(f"### {title}\n\n{body}{img}")
    for name in ("bench_mlp", "bench_llm"):
        path = os.path.join(args.results_dir, f"{name}.csv")
        if os.path.exists(path):
            sections.append(f"### Speed benchmark ({name[6:]})\n\n" + bench(pd.read_csv(path), args.results_dir))
    text = "\n\n".join(sections) + "\n"
    with open(os.path.join(args.results_dir, "tables.md"), "w") as f:
        f.write(text)
    if args.readme and os.path.exists(args.readme):
        readme = open(args.readme).read()
        if START in readme and END in readme:
            head, rest = readme.split(START, 1)
            readme = head + START + "\n" + text + END + rest.split(END, 1)[1]
            with open(args.readme, "w") as f:
                f.write(readme)
    print(f"wrote {os.path.join(args.results_dir, 'tables.md')} and plots")


if __name__ == "__main__":
    main()
