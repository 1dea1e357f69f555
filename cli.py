"""The command line that every script shares: flag types, YAML configs, the one-line error
convention (bad input: one line and exit 2; Ctrl-C: one line and exit 130), and the checks of
output folders and devices that run before any work."""
import argparse
import os
import sys


class UsageError(Exception):
    """Bad input the user can fix (a flag, a path, missing data): printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2, and no abbreviated flags
    (`--calib 5` would otherwise silently mean `--calib_samples 5`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def run(main, argv=None):
    """Run a script's main: bad input is one line and exit code 2; Ctrl-C is one line and exit
    code 130 (every finished row is already in its CSV: rows are written as they finish)."""
    try:
        return main(argv)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: the rows finished so far are in their CSV files; nothing half-written\n")
        sys.exit(130)


# --- flag types: argparse names the flag in its message when these raise ---

def int_range(lo, hi=None, what="value"):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {'an integer >= ' + str(lo) if hi is None else f'from {lo} to {hi}'}, got {v}")
        return v
    parse.__name__ = what
    return parse


def float_range(lo, hi=None, lo_open=False):
    """A float flag in [lo, hi] ((lo, hi] with lo_open; no upper bound when hi is None)."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            bounds = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if hi is not None else ''}{bounds}, got {v}")
        return v
    return parse


percentile_type = float_range(50, 100, lo_open=True)


positive_float = float_range(0, lo_open=True)


unit_float = float_range(0, 1)


bits_type = int_range(2, 8, "bits")


positive_int = int_range(1, None, "positive_int")


def str2bool(s):
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_common_args(p, *, bits_default, calib_default):
    from paths import DATA_ENV
    p.add_argument("--config", help="YAML file of flag values; flags given on the command line override it")
    p.add_argument("--bits", type=bits_type, nargs="+", default=bits_default,
                   help=f"weight bit widths to sweep, 2..8 (default: {' '.join(map(str, bits_default))})")
    p.add_argument("--calib_samples", type=positive_int, default=calib_default,
                   help=f"calibration samples (default: {calib_default})")
    p.add_argument("--save_model", type=str2bool, nargs="?", const=True, default=False,
                   help="save checkpoints under models/ (bare flag, or =true/false/1/0)")
    p.add_argument("--data_dir", default=None, help=f"data folder (default: ${DATA_ENV}, then ./data)")
    p.add_argument("--results_dir", default="results", help="where the CSV files are appended (default: results)")
    p.add_argument("--models_dir", default="models", help="where checkpoints are saved / reused (default: models)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="repeat with seeds --seed .. --seed+N-1 (calibration sample; MNIST: also FP32 training and "
                        "QAT); the report shows mean and spread (default: 1)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")


def hide_library_bars() -> None:
    """--no_progress for the bars libraries draw with tqdm themselves too (transformers' GGUF reader,
    compressed-tensors, which passes its own `disable`): every tqdm bar of this process is
    disabled, whatever its caller asked for."""
    import tqdm
    import transformers
    transformers.utils.logging.disable_progress_bar()
    init = tqdm.tqdm.__init__
    if not getattr(init, "hidden_by_no_progress", False):
        def hidden(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "disable": True})
        hidden.hidden_by_no_progress = True
        tqdm.tqdm.__init__ = hidden


def per_seed(args) -> list[argparse.Namespace]:
    """The run's arguments once per seed of --seed .. --seed+--seeds-1, in order."""
    return [argparse.Namespace(**{**vars(args), "seed": args.seed + i}) for i in range(args.seeds)]


def load_config(path: str) -> dict:
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"--config: no such file {path}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"--config: cannot read {path}{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    return cfg


def parse_with_config(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse argv; values in --config become defaults, so explicit flags override them.
    Config values go through the same type checks as flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_config(known.config)
        cfg.pop("experiment", None)
        cfg.pop("runs", None)
        actions = {a.dest: a for a in parser._actions}
        flags = []
        for key, value in cfg.items():
            if key not in actions or key == "help":
                parser.error(f"--config {known.config}: unknown key {key!r}")
            opt = actions[key].option_strings[-1]
            if isinstance(actions[key], argparse._StoreTrueAction) or isinstance(value, bool):
                flags += [opt] if value else []
            else:
                flags += [opt] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
        argv = flags + list(argv)
    return parser.parse_args(argv)


def check_writable(folder: str, flag: str) -> None:
    """Fail now, not after an hour of work, when an output folder cannot be written (nothing is
    created: the nearest existing folder on its path must be a writable directory)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: not writable ({path} is {'not a folder' if not os.path.isdir(path) else 'read-only'})")


def pick_device(requested: str | None = None) -> str:
    import torch
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device mps: MPS is not available on this machine")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
