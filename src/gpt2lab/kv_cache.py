"""The KV cache: keys and values of every layer for the positions decoded so far, preallocated once.

Autoregressive decoding runs the model once over the prompt (the *prefill*), then once per new token (a *decode
step*). Each step only needs the new token's query, but attention needs every earlier key and value; recomputing them
would make a step cost as much as the whole prefix. The cache keeps them instead:

    prefill:  tokens (B, T) ─► model ─► logits of the last position (B, V); cache holds K, V for T positions
    step:     token  (B, 1) ─► model ─► logits (B, V);                      cache grows by one position

The model only needs `length`, `update` and `advance` (its `KVCacheLike`); the flat decode step in fast_step.py also
writes the buffers `k` and `v` directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT


class KVCache:
    """Keys and values of every layer for the positions seen so far, in buffers allocated once.

    `k` and `v` are (L, B, H, S_max, D). After `length` positions are cached, `update(layer, k_new, v_new)` with
    k_new (B, H, T, D) writes columns [length, length + T) of that layer and returns views of columns [0, length + T):
    no concatenation, no reallocation, per step. The model calls `advance(T)` once after its last layer, so every
    layer of one forward writes the same columns.

    Rows can be dropped (`keep_rows`) when their sequences finish, so a batch only computes what is still running:
    the active rows are always the first `batch_size` rows of the buffers.

    >>> cache = KVCache(n_layer=2, batch_size=1, n_head=2, max_length=8, head_dim=4)
    >>> k_all, v_all = cache.update(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    >>> tuple(k_all.shape)
    (1, 2, 3, 4)
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layer, batch_size, n_head, max_length, head_dim)  # (L, B, H, S_max, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_length: int | None = None) -> "KVCache":
        """A cache shaped for `model`, in its activation dtype, holding up to `max_length` (default n_ctx)."""
        cfg = model.config
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_length or cfg.n_ctx, cfg.head_dim,
                   dtype=activation_dtype(model), device=model.ln_f.weight.device)

    def check_room(self, batch: int, new: int, rows: str) -> None:
        """Refuse, naming the numbers, `new` positions past `max_length`, or `batch` rows where the cache holds
        another number of active rows (`rows` names what the caller brought, one of them: "token", "key row")."""
        if self.length + new > self.max_length:
            positions = f"{new} new positions exceed" if new != 1 else "1 new position exceeds"
            raise ValueError(f"KV cache overflow: {self.length} cached + {positions} max_length={self.max_length}")
        if batch != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} active rows, got {batch} {rows}{'s' * (batch != 1)}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        self.check_room(B, T, "key row")
        start, end = self.length, self.length + T
        self.k[layer, :B, :, start:end].copy_(k)
        self.v[layer, :B, :, start:end].copy_(v)
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]  # (B, H, S, D) views

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the active rows `rows` (indices into the current active rows), moved to the front."""
        n = rows.numel()
        end = self.length
        self.k[:, :n, :, :end] = self.k[:, rows, :, :end]  # the gather copies first, so overlap is safe
        self.v[:, :n, :, :end] = self.v[:, rows, :, :end]
        self.batch_size = n


def activation_dtype(model: "GPT") -> torch.dtype:
    """The dtype of the residual stream (and so of keys, values and logits): that of the final LayerNorm."""
    return model.ln_f.weight.dtype
