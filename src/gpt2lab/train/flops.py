"""Model FLOPs utilization (MFU): the FLOPs a training token costs and the FLOP/s the hardware can do at most."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from gpt2lab.config import GPTConfig


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward): 6 per weight that a token multiplies through
    (every block matmul plus the V × C LM head; embedding lookups are free), plus attention's scores and weighted
    sum, 12 · L · C · T (Kaplan et al. 2020; the PaLM paper's MFU appendix)."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    matmul_weights = L * 12 * C * C + V * C
    return 6 * matmul_weights + 12 * L * C * seq_len


# Dense bf16 tensor-core peaks by a part of the device name (fp16 for GPUs without bf16). A name is matched by the
# longest key it contains, so "L40S" is not read as "L40" nor "L40" as "L4", and "H100 PCIe" not as the SXM part.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "A100": 312e12,
                 "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
                 "V100": 125e12, "T4": 65e12}


def gpu_peak_bf16(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name), or None if unknown.

    >>> gpu_peak_bf16("NVIDIA L40"), gpu_peak_bf16("NVIDIA L40S"), gpu_peak_bf16("NVIDIA H100 PCIe")
    (181000000000000.0, 362000000000000.0, 756000000000000.0)
    """
    keys = [key for key in GPU_PEAK_BF16 if key in name]
    return GPU_PEAK_BF16[max(keys, key=len)] if keys else None


def peak_flops(device: torch.device, dtype: str, threads: int | None = None) -> tuple[float, str]:
    """(FLOP/s, how it was computed): the hardware's dense peak, the denominator of MFU.

    GPU: the vendor's dense bf16 tensor-core figure by name. CPU: cores × clock × FLOPs per cycle per core from the
    vector units: 32 with AVX2 (two 8-lane fp32 FMA units), 64 with AVX-512 (two 16-lane), and for bf16 1024
    with AMX tiles or 128 with AVX512-BF16. docs/training.md explains the numbers.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = gpu_peak_bf16(name)
        if value is None:
            return float("nan"), f"{name}: peak unknown"
        return value, f"{name}: {value / 1e12:.0f} TFLOP/s dense bf16"
    flags, mhz = _cpu_flags_and_mhz()
    cores = threads or torch.get_num_threads()
    per_cycle, unit = (32, "AVX2 fp32") if "avx2" in flags else (16, "SSE fp32")
    if "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 fp32"
    if dtype == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif dtype == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16"
    value = cores * mhz * 1e6 * per_cycle
    return value, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle ({unit}) = {value / 1e9:.0f} GFLOP/s"


def _cpu_flags_and_mhz() -> tuple[set[str], float]:
    """The CPU's feature flags and clock from /proc/cpuinfo (none and 2 GHz where there is no such file)."""
    flags: set[str] = set()
    mhz = 2000.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz":
                mhz = float(value)
    return flags, mhz
