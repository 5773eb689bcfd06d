"""The language-modelling loss, fused with the LM head: cross-entropy of `h Wᵀ` without the usual pile of (N, V) tensors.

For GPT-2's vocabulary the logits are the largest tensor of a training step by far: N = B·T rows of V = 50,257
floats (400 MB for 8 × 256 tokens). The plain path, `F.cross_entropy(lm_head(h), y)`, allocates four of them
(the logits, their log-softmax, and two gradients of that size in the backward pass). On a CPU each fresh 400 MB
allocation is returned to the OS when freed and page-faulted back in on the next step, which costs another pass over
the memory; with the softmax passes on top, the head and loss are a large share of a small model's step.

`linear_cross_entropy` computes the same loss with one (N, V) buffer that lives from step to step:

    forward:   Z = h Wᵀ                       written into the buffer           (N, V)
               Z ← log_softmax(Z)             in place, row by row
               loss = −mean_i Z[i, y_i]
    backward:  G ← exp(Z) − onehot(y)         in place: softmax minus the target, i.e. ∂loss/∂Z times the row count
               ∂h = (G W) · g/n,  ∂W = Gᵀ (h · g/n)   the scale applied to the small operands, never to G

where n is the number of counted rows and g the incoming gradient (1 for a plain `loss.backward()`). The matmuls are
the same three as the plain path; what goes away is the allocation traffic and two of the elementwise passes. The
result equals `F.cross_entropy` to float32 rounding (tests/test_loss.py); `benchmarks/train.py` measures the speed.

The buffer is reused only when no earlier graph still needs it, so two losses built before one backward, or a graph
kept with `retain_graph=True`, stay correct: they get buffers of their own (a second backward through the same graph is
refused, since the first one turned the log-probabilities into gradients in place).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are not counted, as in F.cross_entropy


class LogitsWorkspace:
    """One reusable (N, V) float buffer: `take` hands it out (or a fresh one when it is busy or the shape changed),
    `give_back` returns it when a backward pass is done with it."""

    def __init__(self) -> None:
        self._free: Optional[torch.Tensor] = None

    def take(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        buf, self._free = self._free, None
        if buf is None or buf.shape != (rows, cols) or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
        return buf

    def give_back(self, buf: torch.Tensor) -> None:
        self._free = buf

    def clear(self) -> None:
        """Drop the kept buffer (its memory returns to the OS); the next `take` allocates afresh."""
        self._free = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                workspace: LogitsWorkspace, keep: bool) -> torch.Tensor:
        z = workspace.take(h.size(0), weight.size(0), h)  # (N, V)
        torch.mm(h, weight.t(), out=z)  # logits
        torch.log_softmax(z, dim=-1, out=z)  # log-probabilities, in place
        counted = targets != IGNORE_INDEX  # (N,)
        rows = counted.nonzero().squeeze(1)  # (n,)
        n = rows.numel()
        picked = z[rows, targets[rows]]  # (n,) log p(y_i)
        loss = -picked.sum() / n if n else z.new_zeros(())  # no counted row: 0, as a sum over nothing
        if keep:  # a backward pass may come: it will turn z into the gradient
            ctx.save_for_backward(h, weight, targets, rows)
            ctx.z, ctx.workspace, ctx.n = z, workspace, n
        else:
            workspace.give_back(z)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        if ctx.z is None:
            raise RuntimeError("linear_cross_entropy: backward through the same graph twice is not supported "
                               "(the first backward overwrote the saved log-probabilities)")
        h, weight, targets, rows = ctx.saved_tensors
        z, ctx.z = ctx.z, None
        if ctx.n == 0:
            ctx.workspace.give_back(z)
            return torch.zeros_like(h), torch.zeros_like(weight), None, None, None
        g = z.exp_()  # softmax (N, V)
        g[rows, targets[rows]] -= 1.0  # minus the one-hot target
        if ctx.n < g.size(0):
            g[targets == IGNORE_INDEX] = 0.0  # ignored rows get no gradient
        scale = grad / ctx.n
        grad_h = torch.mm(g, weight).mul_(scale) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.mm(g.t(), h * scale) if ctx.needs_input_grad[1] else None  # (V, C)
        ctx.workspace.give_back(z)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         workspace: Optional[LogitsWorkspace] = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of the logits `h @ weight.T` against `targets`, with one reused (N, V) buffer.

    h: (..., C) float32; weight: (V, C); targets: (...) int64 in [0, V) or IGNORE_INDEX. Equal to
    `F.cross_entropy((h @ weight.T).view(-1, V), targets.view(-1))` (the plain path, which `fused_loss_applies`
    falls back to under autocast, on a GPU, or inside torch.compile).
    """
    C = h.size(-1)
    keep = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h.reshape(-1, C), weight, targets.reshape(-1), workspace or LogitsWorkspace(), keep)


def fused_loss_applies(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused path is for float32 on the CPU, where allocation traffic costs most; elsewhere the plain path is
    what autocast, torch.compile and CUDA's caching allocator already serve well."""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: mean next-token cross-entropy in nats over (..., V) logits, upcast to float32 so that a bf16
    forward still sums exactly."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
