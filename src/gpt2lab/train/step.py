"""One optimizer step and one evaluation: the loss module, bf16 autocast, gradient accumulation, the val loss.

One optimizer step, in order:

    for each of grad_accum micro-batches:                 random windows of the token shards
        loss = model.loss(x, y) / grad_accum              (bf16 autocast if asked; head + loss fused in fp32 on CPU)
        loss.backward()                                   DDP all-reduces gradients on the last micro-batch
    clip the global gradient norm; AdamW step; zero the gradients
"""

from __future__ import annotations

import contextlib
import math

import torch

from gpt2lab.config import TrainConfig
from gpt2lab.data import TokenData
from gpt2lab.model import GPT
from gpt2lab.train.batches import get_batch
from gpt2lab.train.runtime import Runtime


class TrainingLoss(torch.nn.Module):
    """`model.loss` as a module's forward: (B, T) ids, (B, T) targets -> scalar loss. Training calls this instead of
    `cross_entropy(model(x), y)` so that the LM head and the loss run fused (gpt2lab.loss); it is what torch.compile and
    DistributedDataParallel wrap, since DDP's gradient hooks are armed by a forward call."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(idx, targets)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast: matmuls in bf16 (AMX on recent Xeons, tensor cores on GPUs), weights and AdamW in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def optimizer_step(step_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer, data: TokenData,
                   config: TrainConfig, runtime: Runtime, first_micro_batch: int) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the mean loss (over all processes' batches) as a
    0-d float32 tensor on the device, so that the step never waits for the device: the loop reads the losses of
    many steps at once."""
    total = torch.zeros((), dtype=torch.float32, device=runtime.device)
    for a in range(config.grad_accum):
        index = first_micro_batch + a * runtime.world_size + runtime.rank
        x, y = get_batch(data, "train", index, config, runtime.device)
        last = a == config.grad_accum - 1
        sync = contextlib.nullcontext() if last or not runtime.distributed else step_model.no_sync()
        with sync:
            with autocast(runtime.device, config.dtype):
                loss = step_model(x, y) / config.grad_accum
            loss.backward()
        total += loss.detach().float()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if runtime.distributed:
        torch.distributed.all_reduce(total)
        total /= runtime.world_size
    return total


@torch.no_grad()
def evaluate(model: GPT, data: TokenData, config: TrainConfig, runtime: Runtime,
             loss_model: torch.nn.Module | None = None) -> float:
    """Mean val loss over `eval_iters` fixed batches (the same windows at every eval, so the curve is smooth and
    comparable), shared among the processes. `loss_model` (default `TrainingLoss(model)`) is the training run's
    possibly compiled loss module, so that eval runs compiled too."""
    loss_model = loss_model if loss_model is not None else TrainingLoss(model)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(runtime.rank, config.eval_iters, runtime.world_size):
        x, y = get_batch(data, "val", i, config, runtime.device)
        with autocast(runtime.device, config.dtype):
            total += torch.tensor([loss_model(x, y).item(), 1.0], dtype=torch.float64)
    if runtime.distributed:
        total = total.to(runtime.device)
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """nats per token -> bits per byte of text: × tokens/byte ÷ ln 2. Comparable across tokenizers."""
    return loss * tokens_per_byte / math.log(2)
