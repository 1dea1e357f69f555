"""Result rows and artefacts that say what made them: each row appended atomically the moment
it is finished, the run's summary table, the code version and environment every row records,
and the settings hash that names saved artefacts."""
import os
import time

import pandas as pd

from cli import check_writable
from quant.checkpoint import atomic_path


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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "configs", "requirements.txt"],
                               cwd=here, capture_output=True,
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
    new = pd.DataFrame(rows)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        old = pd.read_csv(path)
        new = pd.concat([old, new], ignore_index=True)
    with atomic_path(path) as tmp:
        new.to_csv(tmp, index=False)
