"""The native decode kernel: csrc/decode_step.cpp, compiled for this CPU at first use and loaded with ctypes.

Why build at run time: the kernel is written for the instruction sets this CPU reports, and the machines gpt2lab
runs on change, so it is compiled here, for here, by the system's C++ compiler (a few seconds, once), and cached:
`$GPT2LAB_CACHE/native/decode_step-<hash>.so`, where the hash covers the source, the flags and the compiler, so an
edit or a new compiler builds a new file and never reuses a stale one. The file is written atomically; concurrent
first uses each build their own temporary file and the last rename wins.

Which paths: every CPU with AVX2, FMA and F16C gets the AVX2 kernel; one with AVX-512 (F, BW, VL) also gets the
wider low-precision products, with bf16 dot products where it has AVX-512-BF16 and int8 dot products where it has
AVX-512-VNNI (`compile_flags`, a pure function of the CPU's features; `kernel_paths()` says what the loaded build
took). Two knobs, for measuring and testing, not for use: `GPT2LAB_NATIVE_AVX512=0` builds the AVX2 kernel on an
AVX-512 CPU (to compare the two in one run), and `GPT2LAB_NATIVE_EMULATE=avx512,avx512_bf16,avx512_vnni` builds the
named paths on SIMDe's portable intrinsics (the simde-py package), so a CPU without them can check their arithmetic,
slowly.

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
import importlib.metadata
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

import torch

from gpt2lab.cpu import CPUFeatures, cpu_features
from gpt2lab.download import cache_dir
from gpt2lab.files import atomic_file

SOURCE = Path(__file__).with_name("csrc") / "decode_step.cpp"
BUILD_SECONDS = 120  # a compiler that takes longer than this is treated as missing

_reason: Optional[str] = None
_fallback: Optional[str] = None


# the kernel's wider paths, in the order the library reports them (gpt2lab_kernel_paths' bits)
PATHS = ("avx512", "avx512_bf16", "avx512_vnni")
_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]


def compile_flags(features: CPUFeatures, emulate: Iterable[str] = (),
                  simde_include: Optional[str] = None) -> Optional[list[str]]:
    """The compiler flags for this CPU's kernel, or None where the kernel cannot run (it needs AVX2, FMA, F16C).
    CPUs with AVX-512 F/BW/VL add its paths, with AVX-512-BF16 and AVX-512-VNNI where the CPU has them; `emulate`
    (names from PATHS) builds those paths on SIMDe's headers at `simde_include` instead, whatever the CPU has."""
    if not (features.avx2 and features.fma and features.f16c):
        return None
    emulate = [p for p in PATHS if p in set(emulate)]
    if emulate:  # the headers' version is in the flags, so a new SIMDe builds anew (library_path hashes the flags)
        return [*_BASE_FLAGS, "-Wno-psabi", f"-I{simde_include}", f"-DGPT2LAB_SIMDE={_simde_version()}",
                "-DGPT2LAB_EMULATE_AVX512",
                *(f"-DGPT2LAB_EMULATE_{p.upper()}" for p in emulate if p != "avx512")]
    flags = list(_BASE_FLAGS)
    if features.avx512_kernels:
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl"]
        flags += ["-mavx512bf16"] if features.avx512_bf16 else []
        flags += ["-mavx512vnni"] if features.avx512_vnni else []
    return flags


def emulated_paths(value: Optional[str]) -> tuple[str, ...]:
    """The paths GPT2LAB_NATIVE_EMULATE names ("avx512,avx512_bf16"; empty or unset: none); a name outside PATHS
    raises ValueError naming it and the choices. bf16 and VNNI products are AVX-512 paths, so they bring it along."""
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    bad = [n for n in names if n not in PATHS]
    if bad:
        raise ValueError(f"GPT2LAB_NATIVE_EMULATE names {bad[0]!r}; choose from: {', '.join(PATHS)}")
    return tuple(p for p in PATHS if p in names or (names and p == "avx512"))


def _simde_version() -> str:
    try:
        return importlib.metadata.version("simde-py")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def simde_include() -> Optional[str]:
    """SIMDe's header directory from the simde-py package (a test dependency), or None where it is not installed."""
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


def requested_flags() -> list[str] | str:
    """The flags to build with here, from the CPU and the two knobs (module docstring), or why there are none."""
    features = cpu_features()
    if os.environ.get("GPT2LAB_NATIVE_AVX512", "1") == "0":
        features = replace(features, avx512=False)
    try:
        emulate = emulated_paths(os.environ.get("GPT2LAB_NATIVE_EMULATE"))
    except ValueError as exc:
        return str(exc)
    include = simde_include() if emulate else None
    if emulate and include is None:
        return "GPT2LAB_NATIVE_EMULATE needs SIMDe's headers: pip install simde-py"
    flags = compile_flags(features, emulate, include)
    return "this CPU lacks AVX2, FMA or F16C" if flags is None else flags


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
    """Why the kernel cannot be built here (switched off, the CPU, a knob's value, no compiler), or None where it can
    be tried."""
    if os.environ.get("GPT2LAB_NATIVE", "1") == "0":
        return "GPT2LAB_NATIVE=0 in the environment"
    flags = requested_flags()
    if isinstance(flags, str):
        return flags
    if compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def buildable() -> bool:
    """Whether the kernel can be built here, asked without building it (a build can still fail)."""
    return _why_not_buildable() is None


def _build_and_load(cxx: str, flags: list[str], version: str) -> ctypes.CDLL:
    path = library_path(SOURCE.read_text(), flags, version)
    if not path.exists():
        build(cxx, flags, path)
    try:
        return _declare(ctypes.CDLL(str(path)))
    except OSError:  # a cached file that does not load (truncated, from another system): build it again, once
        build(cxx, flags, path)
        return _declare(ctypes.CDLL(str(path)))


class WrongCPU(RuntimeError):
    """A build whose instructions this CPU does not run (its flags in /proc/cpuinfo said otherwise)."""


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library with its functions' C types set (a file without them is not this kernel: AttributeError), once
    the CPU itself has confirmed it runs the build's instructions (else WrongCPU)."""
    lib.gpt2lab_cpu_ok.restype = ctypes.c_int
    if not lib.gpt2lab_cpu_ok():
        raise WrongCPU("this CPU's CPUID does not report every instruction set the build was compiled for")
    lib.gpt2lab_decode_step.restype = ctypes.c_int
    lib.gpt2lab_omp_max_threads.restype = ctypes.c_int
    lib.gpt2lab_kernel_paths.restype = ctypes.c_int
    lib.gpt2lab_set_spin_ns.argtypes = [ctypes.c_int64]
    lib.gpt2lab_set_spin_ns.restype = None
    lib.gpt2lab_dequantize_int4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.gpt2lab_dequantize_int4.restype = None
    lib.gpt2lab_argmax_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.gpt2lab_argmax_rows.restype = ctypes.c_int
    lib.gpt2lab_prefill.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.gpt2lab_prefill.restype = ctypes.c_int
    return lib


def load_build(flags: list[str]) -> ctypes.CDLL:
    """A build of the kernel with these flags (cached as `library()`'s is), beside the one `library()` loaded: for
    benchmarks that compare two builds in one process (benchmarks/kernel_paths.py). Raises RuntimeError or OSError
    where it does not build or load."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    torch.get_num_threads()  # torch's OpenMP runtime first, as for library()
    return _build_and_load(cxx, flags, _compiler_version(cxx))


def _load() -> Optional[ctypes.CDLL]:
    global _reason, _fallback
    _reason, _fallback = _why_not_buildable(), None
    if _reason is not None:
        return None
    flags, cxx = requested_flags(), compiler()
    version = _compiler_version(cxx)
    # a compiler too old for the AVX-512 flags, or a CPU that does not run them, still gets the AVX2 kernel
    tries = [flags, list(_BASE_FLAGS)] if any(f.startswith("-mavx512") for f in flags) else [flags]
    for attempt in tries:
        try:
            lib = _build_and_load(cxx, attempt, version)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            _reason = f"the native kernel did not build or load: {exc}"
            continue
        if attempt is not flags:
            _fallback = f"the AVX2 kernel, since the AVX-512 build was not usable ({_reason})"
        _reason = None
        return lib
    return None


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library (built on first call and cached on disk), or None where it cannot be had."""
    torch.get_num_threads()  # torch (and with it torch's OpenMP runtime) is loaded before the library
    return _load()


def unavailable_reason() -> Optional[str]:
    """Why `library()` is None (None while it is available or not yet asked for)."""
    return _reason


def fallback_note() -> Optional[str]:
    """Where `library()` fell back to the AVX2 build on an AVX-512 CPU, why (for `gpt2lab info`); else None."""
    return _fallback


def kernel_paths(lib: Optional[ctypes.CDLL] = None) -> frozenset[str]:
    """The wider paths a build took (default: `library()`'s), names from PATHS plus "emulated" for a SIMDe build;
    empty for the AVX2 kernel or where there is no kernel."""
    lib = library() if lib is None else lib
    if lib is None:
        return frozenset()
    bits = lib.gpt2lab_kernel_paths()
    return frozenset(name for i, name in enumerate((*PATHS, "emulated")) if bits & (1 << i))


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=-1)` of a (B, V) float32 CPU tensor, the same indices (first of ties; a row with a NaN
    through torch), through the kernel where it is built: torch's CPU argmax is one scalar pass, the kernel's is
    vectorized, and a greedy decode step takes one over the whole vocabulary (docs/benchmarks.md has the times)."""
    lib = library() if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2 else None
    if lib is None or scores.size(1) == 0:
        return scores.argmax(dim=-1)
    scores = scores.contiguous()
    out = torch.empty(scores.size(0), dtype=torch.long)  # (B,)
    if lib.gpt2lab_argmax_rows(scores.data_ptr(), scores.size(0), scores.size(1), out.data_ptr()) != 0:
        return scores.argmax(dim=-1)
    return out


def set_barrier_spin(microseconds: float) -> None:
    """How long the kernel's threads spin where they meet before they sleep (default 20 us; 0: sleep after one short
    check of 64 pauses). A knob for benchmarks (benchmarks/threads_under_load.py --spin-us); the library must be
    available."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native decode kernel is unavailable: {unavailable_reason()}")
    lib.gpt2lab_set_spin_ns(int(microseconds * 1000))
