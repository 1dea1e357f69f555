"""Entry point: picks the experiment and hands the flags to its script.

    python main.py                                                             # the quick tour (tour.py)
    python main.py --model_name=distilgpt2 --calib_samples=200 --seq_len=128   # causal-LM PTQ
    python main.py --experiment ptq_nn --bits 8 4                              # MNIST PTQ
    python main.py --config configs/mnist_qat.yaml                             # a results table

With no flags at all it runs the quick tour; otherwise --experiment defaults to ptq_llm when
--model_name is given, else ptq_nn. A config may hold
`experiment:` and a list `runs:` of flag sets, each run in turn with the top-level flags.
Each script also runs on its own (python ptq_nn.py -h) with the same flags.
"""
import argparse
import importlib
import sys

from cli import Parser, load_config, run

EXPERIMENTS = ("ptq_nn", "qat_nn", "ptq_llm", "tour")


def _help() -> str:
    parts = [__doc__, f"usage: python main.py [--experiment {{{','.join(EXPERIMENTS)}}}] [--config FILE] [flags of that experiment]\n"]
    for name in EXPERIMENTS:
        parser = importlib.import_module(name).build_parser(prog=f"main.py --experiment {name}")
        text = parser.format_help()
        parts.append(f"=== --experiment {name} ===\n" + text[text.find("options:"):])
    return "\n".join(parts)


def config_runs(path: str) -> tuple[str | None, list[list[str]]]:
    """The experiment a config names and one argv per run (top-level keys, then each run's)."""
    cfg = load_config(path)
    runs = cfg.get("runs") or [{}]
    experiment = cfg.get("experiment")
    argvs = []
    for r in runs:
        argv = ["--config", path]
        for key, value in r.items():
            if key == "experiment":
                continue
            if isinstance(value, bool):  # a switch: present or absent
                argv += [f"--{key}"] if value else []
                continue
            values = value if isinstance(value, list) else [value]
            argv += [f"--{key}"] + [str(v) for v in values]
        argvs.append(argv)
    return experiment, argvs


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help())
        return
    if not argv:
        argv = ["--experiment", "tour"]
    pre = Parser(prog="main.py", add_help=False)
    pre.add_argument("--experiment", choices=EXPERIMENTS)
    known, rest = pre.parse_known_args(argv)  # rest: the script's flags
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--config")
    peek.add_argument("--model_name")
    peeked, _ = peek.parse_known_args(rest)
    runs, experiment = [rest], known.experiment
    if peeked.config:
        cfg_experiment, cfg_runs = config_runs(peeked.config)
        experiment = experiment or cfg_experiment
        # each run: the config's runs first, then the explicit command-line flags, which win
        runs = [r + rest for r in cfg_runs]
    model_name = peeked.model_name or (peeked.config and load_config(peeked.config).get("model_name"))
    experiment = experiment or ("ptq_llm" if model_name else "ptq_nn")
    script = importlib.import_module(experiment)
    for r in runs:
        script.main(r)


if __name__ == "__main__":
    run(main)
