"""The optimizer: the learning-rate schedule, AdamW and its parameter groups, and AdamW's state by parameter name
(what a checkpoint saves, so that a resumed run continues exactly)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gpt2lab.config import TrainConfig


def learning_rate(step: int, config: TrainConfig, time_fraction: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps (large early updates on random
    weights are what destabilises training), then half a cosine from lr down to min_lr at `schedule_steps`, flat
    after. With a time budget, `time_fraction` (elapsed / budget) moves the cosine along too, whichever is further,
    so a run stopped by the clock still ends at min_lr.

    >>> cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110)
    >>> learning_rate(0, cfg), learning_rate(9, cfg), learning_rate(60, cfg), learning_rate(110, cfg)
    (0.1, 1.0, 0.5, 0.0)
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.schedule_steps - config.warmup_steps)
    progress = min(1.0, max((step - config.warmup_steps) / span, time_fraction))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# ----------------------------------------------------------------------------------------------------- optimizer
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorm gains.

    Decaying a gain or a bias pulls it towards 0, which is not "simpler", just wrong: LayerNorm's gain of 1 is its
    neutral value. The tied wte / lm_head table appears once (named_parameters skips the alias).
    """
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel for the whole update instead of a loop over tensors) where this torch
    has it for the device."""
    groups = parameter_groups(model, config.weight_decay)
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused not built for this device / torch
        return torch.optim.AdamW(groups, **kwargs)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name: `optim.<name>.<exp_avg|exp_avg_sq|step>`."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put saved AdamW state back, checking that names and shapes match this model."""
    params = dict(model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, slot = key.removeprefix("optim.").rpartition(".")
        if name not in params:
            raise ValueError(f"{source}: optimizer state for unknown parameter {name!r}; "
                             "was it saved from another model?")
        if slot != "step" and value.shape != params[name].shape:
            raise ValueError(f"{source}: optimizer state {key} has shape {tuple(value.shape)}, the parameter has "
                             f"{tuple(params[name].shape)}")
        state.setdefault(name, {})[slot] = value
    missing = [n for n in params if n not in state]
    if state and missing:
        raise ValueError(f"{source}: no optimizer state for {', '.join(missing[:5])}")
    sd = optimizer.state_dict()  # its "state" is keyed by position in param_groups order
    order = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in params.items()}
    sd["state"] = {i: {k: v.to(p.device) if k != "step" else v for k, v in state[names[id(p)]].items()}
                   for i, p in enumerate(order) if names[id(p)] in state}
    optimizer.load_state_dict(sd)
