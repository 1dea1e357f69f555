"""Where data and models come from: the repository's own data/, the lookup order (--data_dir,
$QUANT_DATA_DIR, data/, then the hub), the checksums of the data it carries, and whether the
Hugging Face hub is reachable."""
import functools
import gzip
import hashlib
import lzma
import os
import socket
from urllib.parse import urlparse

import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO_DATA = os.path.join(ROOT, "data")  # the small real data the repository carries (data/README.md)
DATA_ENV = "QUANT_DATA_DIR"    # where MNIST / WikiText-2 live when --data_dir is not given
MODELS_ENV = "QUANT_MODELS_DIR"  # where local copies of hub models are looked for


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
        raise cli.UsageError(f"corrupt data file {path}: {e}") from None
    verify(raw, path, key)
    return raw


def verify(content: bytes, path: str, key: str) -> None:
    expected = checksums().get(key)
    if expected is not None and hashlib.sha256(content).hexdigest() != expected:
        raise cli.UsageError(f"checksum mismatch for {path}: not the {key} this project was verified with "
                         f"(truncated or altered?); restore it or delete it")


def verify_folder(folder: str) -> None:
    """Check every file of a model folder that the repository carries (data/stories260K, ...)."""
    rel = os.path.relpath(os.path.abspath(folder), REPO_DATA)
    for key in checksums():
        if key.startswith(rel + "/"):
            path = os.path.join(REPO_DATA, key)
            if not os.path.isfile(path):
                raise cli.UsageError(f"{path} is missing from the repository's data (restore it with git checkout)")
            with open(path, "rb") as f:
                verify(f.read(), path, key)


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
