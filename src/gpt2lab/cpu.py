"""What the CPU offers, read at run time, and the choices made from it: instruction sets and thread counts.

The machines gpt2lab runs on change (an AVX2-only laptop, an AVX-512 server with bf16 dot products, a Xeon with AMX),
so nothing about the CPU is fixed when the package is built or tuned: `cpu_features()` reads what this CPU reports,
and the code that picks a kernel (gpt2lab.quantize) or a thread count (`decode_threads`) asks it. The choices are
small pure functions of a `CPUFeatures` value, so tests can check every machine type's choice on any machine.

Threads: a batch-1 decode step is ~100 short parallel regions per token, and OpenMP's threads wait for each other at
the end of every region. On a quiet machine two threads on two cores beat one; on a machine where another program
keeps a core busy, a thread that loses its core stalls the other at every region, and decoding runs several times
slower than with one thread (docs/benchmarks.md, threads). Where the native decode step tunes its own thread count
(gpt2lab.thread_tuner, fed by `LoadMeter`'s reading of other programs' load while it runs), `default_threads` gives
it every core to choose from; elsewhere `decode_threads` counts the cores that other programs leave idle, over a
short look at /proc/stat, and uses only those.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

# /proc/cpuinfo flag names of the instruction sets the kernels care about
_FLAGS = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512vl": ("avx512vl",),
    "avx512_bf16": ("avx512_bf16",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "avx512_vnni": ("avx512_vnni",),
    "amx": ("amx_tile",),
}


@dataclass(frozen=True)
class CPUFeatures:
    """The instruction sets that decide which kernels are fastest, as this CPU reports them."""

    avx2: bool = False
    fma: bool = False
    f16c: bool = False
    avx512: bool = False
    avx512bw: bool = False  # byte and word operations (every AVX-512 CPU since Skylake-SP; Xeon Phi lacks them)
    avx512vl: bool = False  # the AVX-512 encodings of 128- and 256-bit operations
    avx512_bf16: bool = False  # native bf16 dot products (VDPBF16PS)
    vnni: bool = False  # int8 dot products (AVX-512 VNNI or AVX-VNNI)
    avx512_vnni: bool = False  # the 512-bit ones, which FBGEMM's integer kernels use (they have no AVX-VNNI path)
    amx: bool = False  # tile matrix units (bf16 and int8)

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 products run natively (oneDNN's own test is the same two features)."""
        return self.avx512_bf16 or self.amx

    @property
    def avx512_kernels(self) -> bool:
        """Whether the native kernel's AVX-512 paths can run here (F, BW and VL; gpt2lab.native)."""
        return self.avx512 and self.avx512bw and self.avx512vl

    @property
    def name(self) -> str:
        """The widest level this CPU reaches, e.g. "AVX-512 + BF16 + VNNI"."""
        if not (self.avx2 or self.avx512):
            return "baseline"
        parts = ["AVX-512" if self.avx512 else "AVX2"]
        parts += [label for label, has in (("BF16", self.avx512_bf16), ("VNNI", self.vnni), ("AMX", self.amx)) if has]
        return " + ".join(parts)

    @classmethod
    def from_flags(cls, flags: Iterable[str]) -> CPUFeatures:
        """From /proc/cpuinfo-style flag names (lower case, e.g. "avx512_bf16")."""
        have = set(flags)
        return cls(**{field: any(f in have for f in names) for field, names in _FLAGS.items()})


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in the text of /proc/cpuinfo ("flags : fpu ... avx2 ..."), lower case."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.lower().split())
    return frozenset()


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> Optional[frozenset[str]]:
    """The flags of the first CPU in /proc/cpuinfo, or None where there is no such file or no flags line."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return parse_cpu_flags(text) or None


@functools.lru_cache(maxsize=None)
def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CPUFeatures:
    """This CPU's features: /proc/cpuinfo's flags on Linux, else what torch detected (its dispatch level)."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return CPUFeatures.from_flags(flags)
    level = torch.backends.cpu.get_cpu_capability().upper()  # "AVX2", "AVX512", "DEFAULT", ...
    avx512 = level.startswith("AVX512")
    avx2 = avx512 or level.startswith("AVX2")
    # torch's AVX512 level means F, BW, VL and DQ
    return CPUFeatures(avx2=avx2, fma=avx2, f16c=avx2, avx512=avx512, avx512bw=avx512, avx512vl=avx512)


# ------------------------------------------------------------------------------------------------------- threads
TORCH_THREADS = torch.get_num_threads()  # torch's own default (its physical cores), read before anyone changes it


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _line_times(fields: list[str], nice_busy: bool = False) -> tuple[float, float]:
    """(busy, total) jiffies of one /proc/stat cpu line's fields; `nice` time counts as idle, since a niced program
    yields its core to ours (unless `nice_busy`: where our own program is the niced one)."""
    user, nice, system, idle, *rest = (float(v) for v in fields[1:9])
    iowait = rest[0] if rest else 0.0
    busy = user + system + sum(rest[1:]) + (nice if nice_busy else 0.0)  # irq, softirq, steal
    return busy, busy + (0.0 if nice_busy else nice) + idle + iowait


def _cpu_times(stat: str | Path, cpus: Optional[Iterable[int]] = None,
               nice_busy: bool = False) -> Optional[tuple[float, float]]:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line, or summed over the lines of the CPUs `cpus`
    (e.g. this process's affinity: on a container's few CPUs of a big host, the host's other CPUs do not matter)."""
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    names = {"cpu"} if cpus is None else {f"cpu{c}" for c in cpus}
    rows = [fields for fields in map(str.split, lines) if fields and fields[0] in names]
    if not rows or any(len(row) < 5 for row in rows):
        return None
    times = [_line_times(row, nice_busy) for row in rows]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def busy_cpus(window: float = 0.1, stat: str | Path = "/proc/stat") -> Optional[float]:
    """How many CPUs other programs keep busy, averaged over `window` seconds while this one sleeps; None where
    /proc/stat is missing. Niced programs do not count (they give way)."""
    first = _cpu_times(stat)
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times(stat)
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])  # fraction of all CPUs' time
    return share * (os.cpu_count() or 1)


class LoadMeter:
    """How many CPUs other programs keep busy while this program runs, measured as it runs: the busy time /proc/stat
    reports for the CPUs this process may use, less this process's own CPU time, over the wall time between two
    readings at least `interval` seconds apart (one reading is one file read). Niced programs do not count,
    unless this one is niced too: its own time is then in the nice column, and the column counts as busy.
    `others()` is None until the first interval has passed, and always where /proc/stat cannot be read
    (`available` is False there)."""

    def __init__(self, interval: float = 0.1, stat: str | Path = "/proc/stat", clock=time.monotonic,
                 own=time.process_time) -> None:
        self.interval, self._stat, self._clock, self._own = interval, stat, clock, own
        try:
            self._cpus: Optional[set[int]] = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            self._cpus = None
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._nice_busy = hasattr(os, "getpriority") and os.getpriority(os.PRIO_PROCESS, 0) > 0
        self._last = self._read()
        self.available = self._last is not None
        self._value: Optional[float] = None

    def _read(self) -> Optional[tuple[float, float, float]]:
        """(wall seconds, busy CPU-seconds of our CPUs, this process's CPU-seconds), or None."""
        times = _cpu_times(self._stat, self._cpus, self._nice_busy)
        return None if times is None else (self._clock(), times[0] / self._hz, self._own())

    def others(self) -> Optional[float]:
        """Other programs' busy CPUs over the last interval (the latest reading; a new one once `interval` passed)."""
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return self._value
        now = self._read()
        if now is None:
            return self._value
        wall, busy, own = (a - b for a, b in zip(now, self._last))
        self._last = now
        self._value = max(0.0, (busy - own) / wall) if wall > 0 else self._value
        return self._value


def pick_threads(cpus: int, busy: Optional[float]) -> int:
    """Threads for decoding on `cpus` CPUs of which `busy` are kept busy by other programs: the idle ones, at least
    one (a CPU counts as idle when less than half of it is in use). Unknown load: all of them.

    >>> pick_threads(2, 0.1), pick_threads(2, 0.7), pick_threads(2, 1.9), pick_threads(8, 2.2)
    (2, 1, 1, 6)
    """
    if busy is None:
        return max(1, cpus)
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def default_threads(decode_adapts: bool, window: float = 0.1) -> int:
    """The thread count the CLI, the server and the lm-eval adapter use when none is given. Where the decode step
    follows the machine's load itself (`decode_adapts`: the native step's thread tuner), every core torch would use
    (this process's CPUs, at most torch's default): the tuner takes fewer while other programs need them and all of
    them back when they leave, and a long forward (evaluation, a prefill) does not suffer from a busy core the way a
    decode step does (docs/benchmarks.md, threads under load). Otherwise the cores idle now (`decode_threads`)."""
    if decode_adapts:
        return max(1, min(usable_cpus(), TORCH_THREADS))
    return decode_threads(window)


def decode_threads(window: float = 0.1) -> int:
    """The thread count `pick_threads` gives for this machine now, capped at torch's own default (its physical
    cores): what `default_threads` gives where decoding does not tune its own thread count."""
    cpus = min(usable_cpus(), TORCH_THREADS)
    return pick_threads(cpus, busy_cpus(window))
