"""What the experiment scripts share that is not quantization: flag types and the one-line
error convention, YAML configs, data / model locations (local first, then the hub) with their
checksums, device choice, and results rows (appended atomically, shown as a table)."""
import argparse
import functools
import gzip
import hashlib
import lzma
import os
import socket
import sys
import tempfile
import time
from urllib.parse import urlparse

import pandas as pd

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO_DATA = os.path.join(ROOT, "data")  # the small real data the repository carries (data/README.md)
DATA_ENV = "QUANT_DATA_DIR"    # where MNIST / WikiText-2 live when --data_dir is not given
MODELS_ENV = "QUANT_MODELS_DIR"  # where local copies of hub models are looked for


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

def data_folders(arg: str | None) -> list[str]:
    """Where data files are looked for, in this order: --data_dir, $QUANT_DATA_DIR, the
    repository's data/ (the hub comes after these, in the loaders)."""
    return [d for d in (arg, os.environ.get(DATA_ENV), REPO_DATA) if d]


@functools.cache
def checksums() -> dict[str, str]:
    """{name inside its dataset folder, e.g. 'mnist/t10k-labels-idx1-ubyte': sha256 of its content}."""
    out = {}
    with open(os.path.join(ROOT, "data", "SHA256SUMS")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                digest, name = line.split()
                out[name] = digest
    return out


def read_data(path: str, key: str) -> bytes:
    """A data file's content (.gz / .xz decompressed), checked against data/SHA256SUMS under
    `key` (files the repository does not list, such as wiki.train.raw, are not checked)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":
            raw = lzma.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError) as e:
        raise UsageError(f"corrupt data file {path}: {e}") from None
    verify(raw, path, key)
    return raw


def verify(content: bytes, path: str, key: str) -> None:
    expected = checksums().get(key)
    if expected is not None and hashlib.sha256(content).hexdigest() != expected:
        raise UsageError(f"checksum mismatch for {path}: not the {key} this project was verified with "
                         f"(truncated or altered?); restore it or delete it")


def verify_folder(folder: str) -> None:
    """Check every file of a model folder that the repository carries (data/stories260K, ...)."""
    rel = os.path.relpath(os.path.abspath(folder), REPO_DATA)
    for key in checksums():
        if key.startswith(rel + "/"):
            path = os.path.join(REPO_DATA, key)
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing from the repository's data (restore it with git checkout)")
            with open(path, "rb") as f:
                verify(f.read(), path, key)


def check_writable(folder: str, flag: str) -> None:
    """Fail now, not after an hour of work, when an output folder cannot be written (nothing is
    created: the nearest existing folder on its path must be a writable directory)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: not writable ({path} is {'not a folder' if not os.path.isdir(path) else 'read-only'})")


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


# --- artefacts and environment ---

def settings_id(settings: dict) -> str:
    """A short stable hash of the settings that made an artefact (canonical JSON)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]


def environment(device: str = "cpu") -> dict:
    """What a row's numbers depend on beyond the code: library versions, the processor, threads."""
    import platform

    import numpy
    import torch
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if str(device).startswith("cuda") and torch.cuda.is_available() else ""
    return dict(torch=torch.__version__, transformers=tf_version, numpy=numpy.__version__, cpu=cpu, gpu=gpu,
                threads=torch.get_num_threads())


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


class Results:
    """The rows of one run: each appended to RESULTS_DIR/EXPERIMENT.csv the moment it is finished
    (an interrupted run keeps them), and shown at the end as one table of `columns`."""

    def __init__(self, results_dir: str, experiment: str, columns: list[str]):
        check_writable(results_dir, "--results_dir")
        self.path = os.path.join(results_dir, f"{experiment}.csv")
        self.columns, self.rows = columns, []

    def add(self, row: dict) -> dict:
        append_rows(self.path, [row])
        self.rows.append(row)
        return row

    def summary(self) -> str:
        return summary_table(self.rows, self.columns) + f"\n({len(self.rows)} rows appended to {self.path})"


def summary_table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(no rows)"
    df = pd.DataFrame(rows)
    df = df[[c for c in columns if c in df.columns]]
    return df.astype(object).where(df.notna(), "").to_string(index=False, float_format=lambda v: f"{v:.2f}")


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
