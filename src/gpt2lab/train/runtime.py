"""Where a training process runs: its rank among the processes and its device (torchrun's environment).

Rank, world size and device travel in this small object, not in globals, so every function that depends on them
says so in its arguments.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among `world_size` processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
    and its device. Rank 0 alone logs and writes checkpoints."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def runtime_from_env(device: str = "auto") -> Runtime:
    """Read torchrun's environment and join the process group: nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use device = \"cpu\" or \"auto\"")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, local_rank, world_size, local_world_size, dev)


@contextlib.contextmanager
def backend_settings(device: torch.device, threads: int) -> Iterator[None]:
    """The process-wide switches a run wants, put back as they were when it ends: the CPU thread count, and on a GPU
    TF32 matmuls (fp32 matmuls on tensor cores with a 10-bit mantissa, which training tolerates). A caller that
    trains and then needs exact fp32 or its own thread count (a test, a notebook, the quickstart's sampling) finds
    them as it left them."""
    saved_threads = torch.get_num_threads()
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    saved_precision = torch.get_float32_matmul_precision()
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        torch.set_float32_matmul_precision(saved_precision)
