"""The optimizer: the learning-rate schedule, AdamW and its parameter groups (or Muon on the blocks' matrices with
AdamW on the rest), and the optimizer state by parameter name (what a checkpoint saves, so that a resumed run
continues exactly)."""

from __future__ import annotations

import math
from typing import Any, Callable

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


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer `config.optimizer` names: AdamW for every parameter, or `MuonAdamW`."""
    if config.optimizer == "muon":
        return make_muon_adamw(model, config, device)
    return make_adamw(parameter_groups(model, config.weight_decay), config, device)


def make_adamw(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel for the whole update instead of a loop over tensors) where this torch
    has it for the device."""
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused not built for this device / torch
        return torch.optim.AdamW(groups, **kwargs)


class MuonAdamW:
    """Muon on the transformer blocks' matmul weights, AdamW on everything else, stepped as one optimizer.

    Muon (Jordan et al. 2024, the modded-nanogpt speedruns) replaces each matrix's momentum by the nearest
    orthogonal matrix, so every direction of the update moves by the same amount instead of a few dominant ones; it
    is defined for matrices, so the embedding table (a lookup and the tied LM head), LayerNorm gains and biases stay
    with AdamW. Each group has an `lr_scale` (muon_lr / lr for Muon's) that `set_learning_rate` multiplies the
    schedule by, so one schedule drives both.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of both optimizers; `closure` (re-evaluate the loss and its gradients, as torch optimizers take
        it) runs once, before either steps, and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum (Nesterov) whose update is orthogonalised before it is applied, for 2-D weights.

    The same algorithm as `torch.optim.Muon` (momentum 0.95, 5 quintic Newton-Schulz steps, decoupled weight decay,
    the rate scaled by sqrt(max(1, rows / cols))), with two differences: the Newton-Schulz iterations run in fp32 on
    a CPU (torch's always casts to bf16, which a CPU without native bf16 runs a hundred times slower), and the
    matrices of one shape are orthogonalised together as one batch (4 batched matmul chains instead of one per layer).
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every matrix that has a gradient; `closure`, if given, re-evaluates the loss (with
        gradients) first, as torch optimizers do, and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                by_shape.setdefault(tuple(p.shape), []).append((p, p.grad.add(buf, alpha=group["momentum"])))
            for (rows, cols), pairs in by_shape.items():
                params = [p for p, _ in pairs]
                update = orthogonalise(torch.stack([u for _, u in pairs]), group["ns_steps"])  # (L, rows, cols)
                lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr)
        return loss


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U Vᵀ of each matrix's SVD U S Vᵀ, by a quintic Newton-Schulz iteration (Muon's coefficients,
    which trade exactness for speed: singular values land in about [0.7, 1.2]). (L, R, K) -> (L, R, K)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: X Xᵀ is the smaller square
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT  # (L, R, R)
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def is_muon_parameter(name: str, p: torch.Tensor) -> bool:
    """The matrices Muon trains: 2-D weights inside the blocks (`h.<i>.attn.c_attn.weight`, ...), not embeddings."""
    return p.dim() == 2 and name.startswith("h.")


def make_muon_adamw(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> MuonAdamW:
    """Muon at `muon_lr` (momentum 0.95, Nesterov, decoupled weight decay) on the block matrices; AdamW with
    `parameter_groups`' decay split on the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if is_muon_parameter(n, p)]
    rest = [p for n, p in named if not is_muon_parameter(n, p)]
    muon = Muon([{"params": matrices, "lr_scale": config.muon_lr / config.lr}], lr=config.muon_lr,
                weight_decay=config.weight_decay)
    adamw = make_adamw([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
                        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], config, device)
    return MuonAdamW(muon, adamw)


def set_learning_rate(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every group's rate to the schedule's `lr` times the group's `lr_scale` (1 unless it says otherwise)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_tensors(model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer | MuonAdamW) -> dict[str, torch.Tensor]:
    """The per-parameter state keyed by parameter name: `optim.<name>.<exp_avg|exp_avg_sq|step>` for AdamW's,
    `optim.<name>.momentum_buffer` for Muon's."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | MuonAdamW,
                           tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put saved optimizer state back, checking that names, shapes and slots match this model and optimizer."""
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
    names = {id(p): n for n, p in params.items()}
    for part in optimizer.optimizers if isinstance(optimizer, MuonAdamW) else (optimizer,):
        sd = part.state_dict()  # its "state" is keyed by position in param_groups order
        order = [p for g in part.param_groups for p in g["params"]]
        expected = "momentum_buffer" if isinstance(part, Muon) else "exp_avg"
        for p in order:
            if state and expected not in state.get(names[id(p)], {}):
                raise ValueError(f"{source}: no {expected} for {names[id(p)]}; was it saved with another optimizer "
                                 "setting? Resume with the run's own optimizer, or pass --fresh-optimizer")
        sd["state"] = {i: {k: v.to(p.device) if k != "step" else v for k, v in state[names[id(p)]].items()}
                       for i, p in enumerate(order) if names[id(p)] in state}
        part.load_state_dict(sd)
