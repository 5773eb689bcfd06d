"""GPT-2, module by module, in reading order.

    tokens (B, T) ──wte──► (B, T, C) ─┐
    positions (T)  ──wpe──► (T, C) ───┴─► + ─► drop ─► Block × n_layer ─► ln_f ─► lm_head (= wteᵀ) ─► logits (B, T, V)

    Block:  x = x + attn(ln_1(x))      causal multi-head self-attention
            x = x + mlp(ln_2(x))       position-wise feed-forward, 4C wide

Shape letters: B batch, T sequence (new tokens), C width (n_embd), H heads, D head width (C / H), V vocabulary,
S key positions (the cached past plus the T new ones).

Attribute names follow the GPT-2 checkpoint (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `mlp.c_fc`, `ln_f`), so
importing official weights is a name table plus transposes (see checkpoint.py). Linear layers are `nn.Linear`
(out, in); the official checkpoints store the transpose (their `Conv1D` is (in, out)).

This file is the ground floor of the torch code: it imports only config and loss. Loading, saving and generation are
methods of `gpt2lab.GPT` (pretrained.py), a subclass one floor up; docs/architecture.md says why.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.config import GPTConfig
from gpt2lab.loss import LogitsWorkspace, cross_entropy, fused_loss_applies, linear_cross_entropy


# ------------------------------------------------------------------------------------------------------- positions
def sinusoidal_table(n_ctx: int, n_embd: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(...).

    Each pair of channels is a rotation at its own frequency, so a fixed offset between two positions is a linear
    map of their encodings. Returns (n_ctx, C), float32. An odd C leaves the last channel as a sine.
    """
    position = torch.arange(n_ctx, dtype=torch.float64).unsqueeze(1)  # (n_ctx, 1)
    inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))  # (ceil(C/2),)
    angles = position * inv_freq  # (n_ctx, ceil(C/2))
    table = torch.zeros(n_ctx, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : n_embd // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    """Drop-in for the learned `wpe` table: indexing returns fixed sinusoids, and there is nothing to train.

    The table is a non-persistent buffer, so it is not part of the state dict; export writes it out as `wpe` so
    the checkpoint still loads in any GPT-2 implementation.
    """

    def __init__(self, n_ctx: int, n_embd: int) -> None:
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(n_ctx, n_embd), persistent=False)  # (n_ctx, C)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(pos, self.weight)  # pos (..., T) -> (..., T, C)


# ------------------------------------------------------------------------------------------------------- attention
def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t, s) mask, True where query i may attend key j: the t queries are the *last* t of the s positions.

    >>> causal_mask(2, 3).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    q_pos = torch.arange(s - t, s, device=device).unsqueeze(1)  # (t, 1)
    k_pos = torch.arange(s, device=device).unsqueeze(0)  # (1, s)
    return k_pos <= q_pos


def attention_mask_for(t: int, s: int, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Combine causality with a key padding mask: (B, S) of 1/0 -> bool (B, 1, T, S), True = may attend.

    Without padding this returns None and attention applies causality itself (the fast path). Every query is always
    allowed to see its own position: a padding query would otherwise have no key at all, and its softmax over
    nothing would be NaN, which then leaks into real positions through 0 × NaN.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.size(1) != s:
        raise ValueError(f"attention_mask must have shape (B, {s}) covering cached and new positions, got {tuple(attention_mask.shape)}")
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    causal = causal_mask(t, s, attention_mask.device)  # (T, S)
    diagonal = torch.zeros(t, s, dtype=torch.bool, device=attention_mask.device)
    diagonal[torch.arange(t), torch.arange(s - t, s)] = True  # each query's own position
    return (keys & causal) | diagonal  # (B, 1, T, S)


def explicit_attention_weights(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor],
                               dropout_p: float = 0.0) -> torch.Tensor:
    """The attention pattern softmax(Q Kᵀ / √D) under the mask: (B, H, T, S), each row sums to 1."""
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, S)
    if mask is None:
        mask = causal_mask(T, S, q.device)  # (T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, H, T, S)
    return F.dropout(weights, dropout_p) if dropout_p > 0 else weights


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q Kᵀ / √D + mask) V, spelled out: the textbook path, and the one that can return the weights.

    q: (B, H, T, D); k, v: (B, H, S, D); mask: bool, broadcastable to (B, H, T, S), True = may attend; None means
    causal with the queries as the last T positions. Returns (B, H, T, D).
    """
    return explicit_attention_weights(q, k, mask, dropout_p) @ v  # (B, H, T, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   dropout_p: float = 0.0) -> torch.Tensor:
    """The same computation through PyTorch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels).

    Shapes and mask meaning as in `explicit_attention`. Without a mask it uses the kernel's own causal masking, which
    never materialises the (T, S) matrix.
    """
    T, S = q.size(-2), k.size(-2)
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if mask is None and T == 1:  # one new token after a cache: it sees every position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCacheLike(Protocol):
    """What attention needs from a key/value cache (the preallocated one is kv_cache.KVCache).

    `length` is the number of positions already cached (the same for every layer). `update` stores this step's keys
    and values for one layer and returns all of them so far: (B, H, length + T, D) each. The model calls `advance(T)`
    once after the last layer.
    """

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n: int) -> None: ...


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past.

    One fused projection `c_attn` (C -> 3C) makes queries, keys and values in a single matmul, as GPT-2 does; they
    are split into H heads of width D = C / H, each head attends independently, and `c_proj` (C -> C) mixes the heads
    back into the residual stream. Scaling by 1/√D keeps the dot products' variance near 1 so the softmax does not
    saturate at init.

    `use_sdpa` picks the fused kernel (default) or the explicit path; both compute the same function (tested).
    """

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # index into a KV cache
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of every head: (B, T, C) -> three (B, H, T, D)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C): one matmul makes all three
        return (q.view(B, T, H, D).transpose(1, 2),  # (B, H, T, D)
                k.view(B, T, H, D).transpose(1, 2),  # (B, H, T, D)
                v.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCacheLike] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)  # 3 × (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, S, D)
        attend = sdpa_attention if self.use_sdpa else explicit_attention
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


# ------------------------------------------------------------------------------------------------------------- MLP
def activation_fn(name: str):
    """The MLP non-linearity by config name. `gelu_tanh` is 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))), the form GPT-2
    was trained with; using exact GELU on GPT-2's weights shifts logits by ~1e-3."""
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")  # GPTConfig validates first; this guards direct calls


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation -> C, applied to each position independently.

    Attention moves information between positions; the MLP transforms it within one, and holds about two thirds of
    a block's parameters.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.act = activation_fn(config.activation)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


# ----------------------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """One transformer layer, pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    GPT-2 moved LayerNorm from after each residual addition (the original post-LN) to the input of each sub-layer.
    The residual stream then is a plain sum that gradients cross untouched, which lets deep stacks train without
    careful warmup; the price is one more LayerNorm (`ln_f`) at the very end.
    """

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCacheLike] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv_cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# ------------------------------------------------------------------------------------------------------------- GPT
def init_residual_projections(model: GPT) -> None:
    """Scale the init of each residual branch's output projection by 1/√(2·n_layer).

    Every block adds two branches (attention, MLP) to the residual stream, so after L blocks the stream has summed 2L
    roughly independent contributions; shrinking each one's std by √(2L) keeps the stream's variance at init
    independent of depth (GPT-2 paper, section 2.3).
    """
    std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for block in model.h:
        nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
        nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)


class GPT(nn.Module):
    """The full GPT-2 language model: token ids (B, T) -> next-token logits (B, T, V).

    >>> model = GPT(GPTConfig.preset("tiny"))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 50257])

    The LM head shares its weight with the token embedding (`lm_head.weight is wte.weight`): reading a token in and
    writing it out use one table, which saves V × C parameters (38.6M of GPT-2 small's 124M) and is how the released
    checkpoints were trained.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        else:
            self.wpe = SinusoidalPositions(config.n_ctx, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, layer=i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) table
        self.logits_workspace = LogitsWorkspace()  # the fused loss's reused (N, V) buffer; not state, never saved
        self.apply(self._init_weights)
        init_residual_projections(self)

    # ----------------------------------------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init: weights N(0, 0.02), biases 0, LayerNorm gain 1 (PyTorch's LayerNorm default)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, kv_cache: Optional[KVCacheLike] = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Next-token logits for every position.

        - idx: (B, T) token ids in [0, vocab_size).
        - position_ids: (B, T) or (T,), default `past + arange(T)`; a left-padded batch passes its own.
        - attention_mask: (B, S) with 1 for real tokens and 0 for padding over all S = past + T positions.
        - kv_cache: keys and values of earlier positions (see `KVCacheLike`); updated in place.
        - logits_to_keep: if > 0, project only the last that many positions (generation needs only the last).

        Returns (B, T, V) logits (or (B, logits_to_keep, V)).
        """
        x = self.hidden_states(idx, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)  # (B, T, V)

    def hidden_states(self, idx: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None,
                      kv_cache: Optional[KVCacheLike] = None) -> torch.Tensor:
        """The final, LayerNormed residual stream that the LM head reads: (B, T) ids -> (B, T, C). Same arguments as
        `forward`."""
        past = kv_cache.length if kv_cache is not None else 0
        self.check_inputs(idx, past)
        T = idx.size(1)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        mask = attention_mask_for(T, past + T, attention_mask)  # None or (B, 1, T, S)
        for block in self.h:
            x = block(x, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)  # (B, T, C)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats of (B, T) `targets` (IGNORE_INDEX = -100 skips a position) given
        (B, T) `idx`: what training minimises. Equal to `cross_entropy(self(idx), targets)`; in float32 on a CPU it
        runs the LM head and the loss as one fused step with a reused logits buffer (gpt2lab.loss explains why)."""
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        h = self.hidden_states(idx)  # (B, T, C)
        if isinstance(self.lm_head, nn.Linear) and fused_loss_applies(h, self.lm_head.weight):
            return linear_cross_entropy(h, self.lm_head.weight, targets, self.logits_workspace)
        return cross_entropy(self.lm_head(h), targets)

    def check_inputs(self, idx: torch.Tensor, past: int = 0) -> None:
        """Refuse `idx` (B, T) that the model cannot read after `past` cached tokens: not 2-D, not integer, past the
        context, or an id outside the vocabulary. Public so that other paths over the same weights (the native
        step) refuse what `forward` refuses with the same message, not an index error deep inside the embedding."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        T = idx.size(1)
        if past + T > self.config.n_ctx:
            raise ValueError(
                f"sequence length {past + T} exceeds the model's context n_ctx={self.config.n_ctx}"
                + (f" ({past} cached + {T} new)" if past else "")
            )
        if torch.compiler.is_compiling() or idx.numel() == 0:
            return
        if self.training and idx.device.type != "cpu":  # reading the range would stall a GPU every step; training
            return  # batches come from shards written by the data's tokenizer, whose vocabulary sizes the model
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size={self.config.vocab_size} (allowed: 0..{self.config.vocab_size - 1})")

    # -------------------------------------------------------------------------------------------- helpers
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters, the tied LM head counted once. `exclude_embeddings` drops wte and wpe, the count
        that scaling laws use."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            n -= sum(p.numel() for p in self.wpe.parameters())
        return n

    def set_attention(self, use_sdpa: bool) -> "GPT":
        """Switch every layer between the fused kernel (True) and the explicit softmax path (False)."""
        for block in self.h:
            block.attn.use_sdpa = use_sdpa
        return self

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device
