"""Int8 weight-only quantization for fast CPU decoding.

Decoding one token at batch 1 multiplies a single activation vector by every weight matrix: two flops per weight
read, so the speed is set by how many bytes of weights cross the memory bus per token, not by arithmetic. Storing
weights as int8 (one byte instead of four) cuts those bytes by 4x; the activations stay in floating point.

Each output channel (row n of an nn.Linear weight W, (N, K)) gets its own scale, s_n = max_k |W[n, k]| / 127, and
W ≈ s ⊙ Q with Q = round(W / s) in [-127, 127]. A per-channel scale follows the spread of each row, so a row of
small weights keeps its resolution next to a row of large ones. The matmul runs as x · Qᵀ then multiplies by s,
which `torch._weight_int8pack_mm` does in one kernel without materialising W.

The tied LM head (V, C) is the largest single matrix of GPT-2 small (38.6M of 124M weights); it is quantized too, and
the token embedding reads rows of the same int8 table (each row times its scale), so the tie survives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT

# Activations are cast to bfloat16 for the int8 kernel: its float32-activation path is not vectorized on CPU (about
# 10x slower), while the bf16 one reads the int8 weights at memory speed.
KERNEL_DTYPE = torch.bfloat16


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (Q (N, K) int8, scale (N,) float32) with weight ≈ Q * scale[:, None], symmetric, no zero point.

    >>> q, s = quantize_per_channel(torch.tensor([[1.0, -0.5], [0.01, 0.02]]))
    >>> q.tolist()
    [[127, -64], [64, 127]]
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear whose weight is int8 with one float scale per output channel.

    forward: x (..., K) float -> (..., N) in x's dtype. The weight is read as one byte per element.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight", qweight)  # (N, K) int8
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_per_channel(linear.weight)
        return cls(q, s, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer computes with, (N, K)."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (M, K)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scale).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """Token embedding that reads rows of an int8 table (shared with the LM head) and rescales them: (B, T) -> (B, T, C)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", qweight)  # (V, C) int8, the same tensor as the head's
        self.register_buffer("scale", scale.float())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx].float() * self.scale[idx].unsqueeze(-1)  # (B, T, C)


def quantize_int8(model: "GPT") -> "GPT":
    """Replace every linear layer of `model` (and its tied head/embedding) by int8 weight-only versions, in place."""
    for block in model.h:
        block.attn.c_attn = Int8Linear.from_linear(block.attn.c_attn)
        block.attn.c_proj = Int8Linear.from_linear(block.attn.c_proj)
        block.mlp.c_fc = Int8Linear.from_linear(block.mlp.c_fc)
        block.mlp.c_proj = Int8Linear.from_linear(block.mlp.c_proj)
    q, s = quantize_per_channel(model.wte.weight)
    model.lm_head = Int8Linear(q, s)
    model.wte = Int8Embedding(q, s)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
