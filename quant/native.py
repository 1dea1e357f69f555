"""The project's own C++ CPU kernels (quant/csrc): compiled on first use with the machine's C++
compiler for the machine's own CPU (-march=native), cached by a hash of the source, the flags,
the compiler and the CPU, and loaded with ctypes. Without a compiler, `library()` is None and
says why once; the callers then use PyTorch's kernels instead."""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "int4.cpp"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
P, I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {
    "int4_gemv": [P, P, P, P, P, I64, I64, I64, I64, ctypes.c_int],
    "int4_dequantize": [P, P, P, P, I64, I64, I64, ctypes.c_int],
}


def cache_dir() -> Path:
    return Path(os.environ.get("QUANT_CACHE_DIR", Path.home() / ".cache" / "quant-workbench")) / "native"


def _cpu_id() -> str:
    try:  # the flags line says which instructions -march=native may use
        return next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() + platform.machine()


def _compile(compiler: str, out: Path, openmp: bool) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out.parent)) / out.name  # the same file system: os.replace is atomic
    flags = FLAGS + (["-fopenmp"] if openmp else [])
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


@cache
def library():
    """The compiled kernels as a ctypes library, or None (with one warning saying why)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        warnings.warn("no C++ compiler found (set CXX): the int4 CPU layers use PyTorch's slower bfloat16 kernel")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _compile(compiler, out, openmp=True)
        except subprocess.CalledProcessError:
            try:  # (Apple's clang has no OpenMP: one thread then)
                _compile(compiler, out, openmp=False)
            except subprocess.CalledProcessError as e:
                warnings.warn(f"compiling {SOURCE.name} failed, the int4 CPU layers use PyTorch's slower bfloat16 "
                              f"kernel: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}")
                return None
    lib = ctypes.CDLL(str(out))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib
