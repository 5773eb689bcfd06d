"""Shared by the benchmarks that print the machine next to their figures: the CPU with the vector flags that decide
which kernels run, and the read bandwidth that bounds a batch-1 decode step (which reads every weight once).

Not a benchmark itself: `python benchmarks/generate.py` finds it because Python puts the script's directory first on
sys.path (tests/conftest.py's `load_benchmark` does the same).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from gpt2lab.cpu import parse_cpu_flags

# the vector extensions that decide which kernels gpt2lab, llama.cpp or torch can use
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_description(cpuinfo: Optional[str] = None) -> str:
    """'<model name> (N vCPU; flag, flag, ...)' from the text of /proc/cpuinfo (this machine's by default), naming
    the vector flags in ISA_FLAGS it has."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    name = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = parse_cpu_flags(cpuinfo)
    shown = [f for f in ISA_FLAGS if f in flags]
    return f"{name.group(1) if name else 'unknown CPU'} ({os.cpu_count()} vCPU; {', '.join(shown) or 'no AVX2'})"


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a streaming read with every core: the best of `repeats` sums over a 512 MiB tensor (far beyond any
    cache). Torch's thread count is put back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        a = torch.ones(128 * 1024 * 1024)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return a.numel() * 4 / best
