"""The native decode kernel: csrc/decode_step.cpp, compiled for this CPU at first use and loaded with ctypes.

Why build at run time: the kernel is written for the instruction sets this CPU reports (AVX2 with FMA and F16C), and
the machines gpt2lab runs on change, so it is compiled here, for here, by the system's C++ compiler (a few seconds,
once), and cached: `$GPT2LAB_CACHE/native/decode_step-<hash>.so`, where the hash covers the source, the flags and
the compiler, so an edit or a new compiler builds a new file and never reuses a stale one. The file is written
atomically; concurrent first uses each build their own temporary file and the last rename wins.

Why ctypes and not a torch extension: the kernel needs no torch headers, only pointers to the tensors' memory, so it
builds in seconds instead of a minute. It is loaded after torch, and its OpenMP library has the same name as the one
torch loaded (libgomp.so.1), so the dynamic loader gives it torch's OpenMP runtime: one thread pool, one thread count
(`torch.set_num_threads`).

Nothing depends on it: without a compiler, on a CPU without AVX2/FMA/F16C, or with `GPT2LAB_NATIVE=0` in the
environment, `library()` returns None, `unavailable_reason()` says why, and decoding uses the PyTorch step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from gpt2lab.cpu import CPUFeatures, cpu_features
from gpt2lab.download import cache_dir
from gpt2lab.files import atomic_file

SOURCE = Path(__file__).with_name("csrc") / "decode_step.cpp"
BUILD_SECONDS = 120  # a compiler that takes longer than this is treated as missing

_reason: Optional[str] = None


def compile_flags(features: CPUFeatures) -> Optional[list[str]]:
    """The compiler flags for this CPU's kernel, or None where the kernel cannot run (it needs AVX2, FMA, F16C)."""
    if not (features.avx2 and features.fma and features.f16c):
        return None
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]


def compiler() -> Optional[str]:
    """The C++ compiler: $CXX, else c++, else g++ (the first on PATH), or None."""
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(source: str, flags: list[str], version: str) -> Path:
    """Where the build of `source` with `flags` by the compiler `version` is cached."""
    digest = hashlib.sha256("\0".join([source, " ".join(flags), version]).encode()).hexdigest()[:16]
    return cache_dir() / "native" / f"decode_step-{digest}.so"


def build(cxx: str, flags: list[str], dest: Path) -> None:
    """Compile SOURCE into `dest` atomically; a failed build raises RuntimeError with the compiler's message."""
    with atomic_file(dest) as tmp:
        out = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                             timeout=BUILD_SECONDS)
        if out.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}: {out.stderr.strip()[-400:]}")


def _why_not_buildable() -> Optional[str]:
    """Why the kernel cannot be built here (switched off, the CPU, no compiler), or None where it can be tried."""
    if os.environ.get("GPT2LAB_NATIVE", "1") == "0":
        return "GPT2LAB_NATIVE=0 in the environment"
    if compile_flags(cpu_features()) is None:
        return "this CPU lacks AVX2, FMA or F16C"
    if compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def buildable() -> bool:
    """Whether the kernel can be built here, asked without building it (a build can still fail)."""
    return _why_not_buildable() is None


def _load() -> Optional[ctypes.CDLL]:
    global _reason
    _reason = _why_not_buildable()
    if _reason is not None:
        return None
    flags, cxx = compile_flags(cpu_features()), compiler()
    try:
        path = library_path(SOURCE.read_text(), flags, _compiler_version(cxx))
        if not path.exists():
            build(cxx, flags, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a cached file that does not load (truncated, from another system): build it again, once
            build(cxx, flags, path)
            lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason = f"the native kernel did not build or load: {exc}"
        return None
    lib.gpt2lab_decode_step.restype = None
    lib.gpt2lab_omp_max_threads.restype = ctypes.c_int
    lib.gpt2lab_set_spin_ns.argtypes = [ctypes.c_int64]
    lib.gpt2lab_set_spin_ns.restype = None
    lib.gpt2lab_dequantize_int4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.gpt2lab_dequantize_int4.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library (built on first call and cached on disk), or None where it cannot be had."""
    torch.get_num_threads()  # torch (and with it torch's OpenMP runtime) is loaded before the library
    return _load()


def unavailable_reason() -> Optional[str]:
    """Why `library()` is None (None while it is available or not yet asked for)."""
    return _reason


def set_barrier_spin(microseconds: float) -> None:
    """How long the kernel's threads spin where they meet before they sleep (default 20 us; 0: sleep after one short
    check of 64 pauses). A knob for benchmarks (benchmarks/threads_under_load.py --spin-us); the library must be
    available."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native decode kernel is unavailable: {unavailable_reason()}")
    lib.gpt2lab_set_spin_ns(int(microseconds * 1000))
