"""The one-token decode step compiled by torch.compile (inductor's C++ backend): `FlatStep`'s function as one graph.

Eager PyTorch pays a fixed cost for every tensor operation of a step (Python, dispatch, a fresh output tensor), some
300 of them a token on GPT-2 small. torch.compile traces the step once into a graph and inductor writes it as a few
C++ loops (LayerNorm, GELU, the residual adds and the attention fused between the matmuls) called from one wrapper,
so that cost is paid a few dozen times instead. The matmuls stay library kernels: the bf16 and int8 layers' own, and
MKL's GEMM on the (N, K) weight for every float32 layer (oneDNN's and the row-blocked products of `quantize` do not
trace).

Two choices keep one graph valid for every step:

- The cache length is a symbolic size (`dynamic=True`), so a longer cache is not a new graph. The step reads the
  cached keys and values of the positions before this one and attends to the new key and value separately (one
  softmax over both), so the graph never writes into the cache: it returns the new keys and values, (L, B, H, D), and
  the caller stores them in column `pos`. A graph that wrote into its input would copy the whole cache each step.
- The first positions (a cache of 0 or 1) would be specialized by the tracer; they run through `FlatStep`, as does
  everything after a failed compile.

Where the graph is traced again: once for a batch of 1 and once for a larger batch (torch specializes sizes 0 and 1),
and once each with and without a padding mask. Each compile is slow next to a step (docs/benchmarks.md has the
start-up times); inductor keeps what it compiled in its on-disk cache, which shortens the next process's start-up, so
the compiled step is for long-lived processes that decode many tokens, and it is never the default.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab import quantize
from gpt2lab.fast_step import FlatStep
from gpt2lab.kv_cache import KVCache
from gpt2lab.model import GPT
from gpt2lab.quantize import (BF16Linear, ColumnEmbedding, Int8Linear, KERNEL_DTYPE, LowPrecisionEmbedding,
                              OneDNNLinear, TransposedLinear)

Linear = Callable[[torch.Tensor], torch.Tensor]
# What a failed trace or compile raises (torch._dynamo's errors are its public contract for torch.compile).
COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)


def compiler_available() -> bool:
    """Whether torch.compile can build CPU code here: dynamo supports this Python and a C++ compiler is on PATH."""
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except (AttributeError, RuntimeError):
        return False
    return bool(supported) and any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


def compiled_step(model: GPT) -> Optional["CompiledStep"]:
    """A compiled decode step for `model` with `FlatStep`'s signature, or None where it cannot be built: no C++
    compiler, a model the flat step does not apply to (training mode, hooks, custom blocks), or a layer kind that has
    no traceable form (FBGEMM's packed fp16 weights)."""
    if not compiler_available() or not FlatStep.applies(model):
        return None
    try:
        return CompiledStep(model)
    except TypeError:  # a layer kind `linear_function` or `embedding_function` does not know
        return None


def linear_function(layer: nn.Module) -> Linear:
    """x (..., K) -> (..., N) as `layer` computes it, written with traceable ops on the layer's own tensors."""
    if isinstance(layer, Int8Linear):
        return _int8_linear(layer.weight, layer.kernel_scale, layer.bias)
    if isinstance(layer, BF16Linear):
        return _bf16_linear(layer.weight, layer.bias)
    if isinstance(layer, TransposedLinear):
        weight_t, bias = layer.weight_t, layer.bias  # (K, N)
        return lambda x: x @ weight_t if bias is None else x @ weight_t + bias
    if type(layer) is nn.Linear or isinstance(layer, OneDNNLinear):  # ChunkedLinear too: the same (N, K) weight
        weight, bias = layer.weight, layer.bias
        return lambda x: F.linear(x, weight, bias)
    raise TypeError(f"no compiled form for {type(layer).__name__}")


def _int8_linear(weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> Linear:
    if not quantize.INT8PACK:  # a torch without its private int8 kernel: the widened weight (quantize.Int8Linear)
        widened = weight.float() * scale.float()[:, None]  # (N, K)
        return lambda x: F.linear(x.float(), widened, bias)

    def linear(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1)).to(KERNEL_DTYPE)  # (M, K)
        y = torch._weight_int8pack_mm(x2, weight, scale).float()  # (M, N)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], weight.size(0))
    return linear


def _bf16_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Linear:
    def linear(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), weight).float()  # (..., N)
        return y if bias is None else y + bias
    return linear


def embedding_function(wte: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens (B,) -> (B, C) float32 rows of the token table, for each embedding kind the inference layers use."""
    if type(wte) is nn.Embedding:
        return lambda tokens: wte.weight[tokens]
    if isinstance(wte, ColumnEmbedding):
        return lambda tokens: wte.weight_t.t()[tokens]
    if isinstance(wte, LowPrecisionEmbedding):
        table, scale = wte.weight, wte.scale  # (V, C), (V,) or None
        if scale is None:
            return lambda tokens: table[tokens].float()
        return lambda tokens: table[tokens].float() * scale[tokens].unsqueeze(-1)
    raise TypeError(f"no compiled form for the embedding {type(wte).__name__}")


def step_function(model: GPT) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The decode step as a pure function for torch.compile:

    `step(tokens (B,), k, v (L, B_max, H, S_max, D), pos, positions (B,) or None, mask ((B, pos), (B,)) or None)`
    -> (logits (B, V), new keys (L, B, H, D), new values (L, B, H, D)), reading cache columns [0, pos).
    """
    cfg = model.config
    C, H, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_eps
    D = C // H
    scale = D ** -0.5
    layers = [(b.ln_1.weight, b.ln_1.bias, linear_function(b.attn.c_attn), linear_function(b.attn.c_proj),
               b.ln_2.weight, b.ln_2.bias, linear_function(b.mlp.c_fc), b.mlp.act, linear_function(b.mlp.c_proj))
              for b in model.h]
    embed, head, table = embedding_function(model.wte), linear_function(model.lm_head), model.wpe.weight
    ln_f = (model.ln_f.weight, model.ln_f.bias)

    def step(tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, positions: Optional[torch.Tensor],
             mask: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = tokens.size(0)
        x = embed(tokens) + (table[pos] if positions is None else table[positions])  # (B, C)
        new_k, new_v = [], []
        for i, (ln1_w, ln1_b, c_attn, attn_proj, ln2_w, ln2_b, c_fc, act, mlp_proj) in enumerate(layers):
            qkv = c_attn(F.layer_norm(x, (C,), ln1_w, ln1_b, eps)).view(B, 3, H, D)  # (B, 3, H, D)
            q, k_i, v_i = qkv.unbind(1)  # (B, H, D) each
            y = _attend(q * scale, k[i, :B, :, :pos], v[i, :B, :, :pos], k_i, v_i, mask)  # (B, H, D)
            new_k.append(k_i)
            new_v.append(v_i)
            x = x + attn_proj(y.reshape(B, C))  # (B, C): heads side by side
            x = x + mlp_proj(act(c_fc(F.layer_norm(x, (C,), ln2_w, ln2_b, eps))))  # (B, C)
        logits = head(F.layer_norm(x, (C,), *ln_f, eps))  # (B, V)
        return logits, torch.stack(new_k), torch.stack(new_v)  # (B, V), (L, B, H, D), (L, B, H, D)

    return step


def _attend(q: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            mask: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention of q (B, H, D), already scaled, over the cached k_old, v_old (B, H, S, D) and the new
    k_new, v_new (B, H, D), as if the new column were appended: (B, H, D). mask: ((B, S), (B,)) bool, True where
    attended, for the cached columns and the new one."""
    s_old = (q.unsqueeze(2) * k_old).sum(-1)  # (B, H, S)
    s_new = (q * k_new).sum(-1)  # (B, H)
    if mask is not None:
        old, new = mask
        s_old = s_old.masked_fill(~old[:, None, :], float("-inf"))
        s_new = s_new.masked_fill(~new[:, None], float("-inf"))
    top = torch.maximum(s_old.amax(-1), s_new)  # (B, H): subtracted for a stable exp
    p_old, p_new = torch.exp(s_old - top.unsqueeze(-1)), torch.exp(s_new - top)  # (B, H, S), (B, H)
    total = p_old.sum(-1) + p_new  # (B, H)
    y = (p_old.unsqueeze(-1) * v_old).sum(2) + p_new.unsqueeze(-1) * v_new  # (B, H, D)
    return y / total.unsqueeze(-1)


class CompiledStep:
    """`step(tokens, cache, positions=None, attention_mask=None)`: `FlatStep`'s call, through a compiled graph.

    - tokens: (B,) the newest token of each active row; B is the cache's active batch.
    - positions: (B, 1) position ids of a left-padded batch, default the cache length.
    - attention_mask: (B, S) 1 for real tokens and 0 for padding over all cached positions plus the new one.

    Returns (B, V) float32 logits and advances the cache by one position. Compiling happens on the first calls; if
    it fails, a warning says so and every later step runs through `FlatStep`.
    """

    def __init__(self, model: GPT) -> None:
        self.flat = FlatStep(model)
        self.graph = torch.compile(step_function(model), dynamic=True)
        self.failed = False

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, positions: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, pos = tokens.size(0), cache.length
        cache.check_room(B, 1, "token")
        if self.failed or pos < 2:  # a cache of 0 or 1 positions would get a graph of its own
            return self.flat(tokens, cache, positions, attention_mask)
        # the mask of the cached columns and of the new one apart, and fresh position ids: an index or a view offset
        # inside the graph would be a guard on the length
        mask = None if attention_mask is None else (attention_mask[:, :pos].bool(), attention_mask[:, pos].bool())
        ids = None if positions is None else positions.reshape(-1).clone()  # (B,)
        try:
            logits, k_new, v_new = self.graph(tokens, cache.k, cache.v, pos, ids, mask)
        except COMPILE_ERRORS as error:
            warnings.warn(f"compiling the decode step failed, decoding without it: {str(error).splitlines()[0]}")
            self.failed = True
            return self.flat(tokens, cache, positions, attention_mask)
        cache.k[:, :B, :, pos] = k_new  # (L, B, H, D) into column pos
        cache.v[:, :B, :, pos] = v_new
        cache.advance(1)
        return logits
