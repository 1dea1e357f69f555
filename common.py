"""What the experiment scripts share that is not quantization: flag types and the one-line
error convention, YAML configs, data / model locations (local first, then the hub), device
choice, and atomic CSV appends."""
import argparse
import os
import socket
import sys
import tempfile
import time
from urllib.parse import urlparse

import pandas as pd

DATA_ENV = "QUANT_DATA_DIR"    # where MNIST / WikiText-2 live when --data_dir is not given
MODELS_ENV = "QUANT_MODELS_DIR"  # where local copies of hub models are looked for


class UsageError(Exception):
    """Bad input the user can fix (a flag, a path, missing data): printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def run(main, argv=None):
    """Run a script's main, turning UsageError into a one-line message and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


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
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")


def load_config(path: str) -> dict:
    import yaml
    if not os.path.exists(path):
        raise UsageError(f"--config: no such file {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    return cfg


def parse_with_config(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse argv; values in --config become defaults, so explicit flags override them.
    Config values go through the same type checks as flags."""
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


# --- where things live ---

def data_dir(arg: str | None) -> str:
    return arg or os.environ.get(DATA_ENV) or "data"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before any hub download, so that offline users get an answer in seconds
    instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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


# --- results ---

def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def code_version() -> str:
    """Short git commit of the code that produced a row ('-dirty' with uncommitted changes to the
    code: Python files, configs, requirements; not results or prose), or $QUANT_CODE_VERSION
    where the code runs from a copy without its .git (another machine)."""
    import subprocess
    if os.environ.get("QUANT_CODE_VERSION"):
        return os.environ["QUANT_CODE_VERSION"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "configs", "requirements.txt"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("-dirty" if commit and dirty else "")


def save_rows(results_dir: str, experiment: str, rows: list[dict]) -> str:
    path = os.path.join(results_dir, f"{experiment}.csv")
    append_rows(path, rows)
    print(f"appended {len(rows)} rows to {path}")
    return path


def append_rows(path: str, rows: list[dict]) -> None:
    """Append rows to a CSV atomically: the old rows plus the new are written to a temporary
    file that replaces the old one, so an interrupted run never leaves a half-written file.
    New columns are added (earlier rows get blanks); no earlier row is lost."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = pd.DataFrame(rows)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        old = pd.read_csv(path)
        new = pd.concat([old, new], ignore_index=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csv", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            new.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
