"""The one-token decode step through the native kernel (csrc/decode_step.cpp): one C call per token.

FlatStep (fast_step.py) runs a step as ~100 PyTorch operations; at batch 1 their fixed cost and the general GEMM
kernels behind them leave the step well short of the time it takes to stream the weights from memory. NativeStep hands
the whole step to one C function instead: the token ids go in, the logits come out, and in between every layer's
LayerNorm, matrix-vector products, attention over the KV cache and MLP run in one OpenMP parallel region (the design
is in the source's header comment).

It reads the model's own tensors, no copies: float32 `nn.Linear` weights as they are, `BF16Linear`'s bf16 weights
(widened to float32 in registers), `Int8Linear`'s int8 weights with their per-channel scales (multiplied by int8
activations quantized per row, 8 bits, symmetric, as llama.cpp's q8_0 does per block of 32), and `Int4Linear`'s int4
weights with an integer scale per group of 32 and a float per row (quantize_int.quantize_int4, times the same int8
activations). The KV cache is the usual `KVCache`, so the prefill and the steps share it. A short prompt is encoded
by the kernel too, in one call (`NativeStep.prefill`: the step's functions over all its tokens at once), since the
modules' GEMM runs few rows slowly and the PyTorch operations between them cost more than a small model's products.

    tokens (B,) ─ gpt2lab_decode_step (C++): the head's row + wpe ─► x (B, C) ─ the blocks ─► logits (B, V)
                                             └─ writes K, V of this token into cache column `pos`
    prompt (B, T) ─ gpt2lab_prefill (C++): the same over B x T rows ─► the last token's logits (B, V)
                                         └─ writes K, V of the prompt into cache columns [past, past + T)

The step reads the weights it was built with: it keeps its own alias of each tensor (`detach()`), so a weight
pointed elsewhere during a decode (`p.data = ...`, as `.half()` or `use_huge_pages` do) does not reach it and frees
no memory under it (only resizing a tensor's storage in place would), and no per-token check is needed; in-place
writes (`load_state_dict`, an optimizer step) do reach it. `generate` and `decode_steps` take a step per call from
`decode_step_for`, and the default step again after each re-encoding of the sliding window, so a decode never mixes
two sets of weights. `decode_step_for` hands out the kernel structures it built for a model again while the model's
`layout` (every module, where each tensor lies, the settings the step reads) is the same, each time with this
call's aliases: building them walks every layer, a visible share of a short prompt's time.
The token embedding is the head's own table (GPT-2 ties them; `embeds_with_head` checks), so the kernel embeds
from it.

`NativeStep.applies(model)` says where it runs: FlatStep's conditions (eval mode, stock blocks, no hooks), the
layer kinds above on the CPU, and the kernel library built (gpt2lab.native). In float32 it computes the modules'
function (summed in another order; tests hold it to float32's own error against float64). For bf16 and int8 it
computes the precision's arithmetic its own way, not the layers' torch forward: bf16 weights times float32
activations (the layers round the activations to bf16 on CPUs without bf16 dot products), and int8 weights times
activations rounded per row to int8 (the layers use bf16 activations; int4's layers widen the weights to float32).
Tests compare those with a float32 model of the same weights and with plain-PyTorch references of the int8 and int4
arithmetic.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import time
import weakref
from typing import Optional

import torch
from torch import nn

from gpt2lab import native
from gpt2lab.cpu import LoadMeter, usable_cpus
from gpt2lab.fast_step import FlatStep
from gpt2lab.kv_cache import KVCache
from gpt2lab.model import GPT
from gpt2lab.quantize import BF16Linear, Int4Embedding, Int4Linear, Int8Linear, LowPrecisionEmbedding
from gpt2lab.quantize_int import INT4_GROUP
from gpt2lab.thread_tuner import ThreadTuner

_F32, _BF16, _INT8, _INT4 = 0, 1, 2, 3
_ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "relu": 2}
_p = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _p), ("scale", _p), ("group_scale", _p), ("bias", _p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("kind", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", _p), ("ln1_b", _p), ("attn", _Linear), ("attn_proj", _Linear),
                ("ln2_w", _p), ("ln2_b", _p), ("fc", _Linear), ("mlp_proj", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("n_embd", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("ffn", ctypes.c_int64), ("eps", ctypes.c_float), ("activation", ctypes.c_int32),
                ("layers", _p), ("lnf_w", _p), ("lnf_b", _p), ("head", _Linear), ("wpe", _p),
                ("n_ctx", ctypes.c_int64)]


class _Prefill(ctypes.Structure):
    _fields_ = [("x", _p), ("logits", _p), ("k_cache", _p), ("v_cache", _p), ("batch", ctypes.c_int64),
                ("batch_max", ctypes.c_int64), ("s_max", ctypes.c_int64), ("past", ctypes.c_int64),
                ("length", ctypes.c_int64), ("mask", _p), ("tokens", _p), ("positions", _p), ("qkv", _p), ("att", _p),
                ("hidden", _p), ("norm", _p), ("scores", _p), ("xq", _p), ("xq_scale", _p), ("xq_sums", _p),
                ("xb", _p), ("threads", ctypes.c_int32)]


class _Step(ctypes.Structure):
    _fields_ = [("x", _p), ("logits", _p), ("k_cache", _p), ("v_cache", _p), ("batch", ctypes.c_int64),
                ("batch_max", ctypes.c_int64), ("s_max", ctypes.c_int64), ("pos", ctypes.c_int64), ("mask", _p),
                ("qkv", _p), ("att", _p), ("hidden", _p), ("norm", _p), ("scores", _p), ("xq", _p),
                ("xq_scale", _p), ("xq_sums", _p), ("xb", _p), ("threads", ctypes.c_int32),
                ("tokens", _p), ("positions", _p)]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _plain_f32(t: Optional[torch.Tensor]) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


# the widest int4 rows the kernel's 32-bit lanes hold exactly (csrc/decode_step.cpp, finish_i4); GPT-2's widest is
# 6,400 (gpt2-xl's MLP)
INT4_MAX_WIDTH = 22_000

# Prompts of up to this many tokens in all (batch x length) are encoded by `NativeStep.prefill`, by the kind of the
# blocks' weights; longer ones by the modules, whose GEMM is the faster kernel for many rows. Measured on an AVX2 CPU
# (docs/benchmarks.md, prefill).
PREFILL_ROWS = {_F32: 256, _BF16: 256, _INT8: 512, _INT4: 512}

# the layer classes the kernel reads in place, with their weight kind and the dtype their weight must have
_LAYER_KINDS = {nn.Linear: (_F32, torch.float32), BF16Linear: (_BF16, torch.bfloat16), Int8Linear: (_INT8, torch.int8),
                Int4Linear: (_INT4, torch.uint8)}


def linear_kind(layer: nn.Module) -> Optional[int]:
    """The kernel's weight kind for a linear layer it can read in place, or None."""
    kind, dtype = _LAYER_KINDS.get(type(layer), (None, None))
    w = getattr(layer, "weight", None)
    if (kind is None or w is None or w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous()
            or not _plain_f32(layer.bias)):
        return None
    if kind in (_INT8, _INT4) and not _plain_f32(layer.scale):  # read in place, as every tensor the kernel reads
        return None
    if kind == _INT4 and not (layer.in_features % INT4_GROUP == 0 and layer.in_features <= INT4_MAX_WIDTH
                              and layer.group_scale.dtype == torch.int16 and layer.group_scale.is_contiguous()):
        return None
    return kind


_TUNERS: "weakref.WeakKeyDictionary[GPT, ThreadTuner]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def load_meter() -> LoadMeter:
    """The process's one measure of other programs' load (the machine's, so one is enough)."""
    return LoadMeter()


def thread_tuner(model: GPT, most: int) -> ThreadTuner:
    """The thread tuner of `model`'s native steps for at most `most` threads. Every step built for the model shares
    it, so what one `generate` call learned about the machine's load the next call starts from."""
    tuner = _TUNERS.get(model)
    if tuner is None or tuner.most != most:
        tuner = _TUNERS[model] = ThreadTuner(most, load_known=load_meter().available, cpus=usable_cpus())
    return tuner


def adaptive_threads_default() -> bool:
    """Whether native steps tune their thread count as they run: yes unless GPT2LAB_ADAPTIVE_THREADS=0."""
    return os.environ.get("GPT2LAB_ADAPTIVE_THREADS", "1") != "0"


def threads_adapt() -> bool:
    """Whether decoding here follows the machine's load by itself: the native kernel can be built here (asked
    without building it) and its steps tune their thread count (`adaptive_threads_default`)."""
    return adaptive_threads_default() and native.buildable()


def _same_memory(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def embeds_with_head(model: GPT) -> bool:
    """Whether the token embedding reads the head's own table (GPT-2 ties them, and `prepare_for_inference` keeps
    the tie for every head the kernel reads), so the kernel can embed tokens from the head's weights: a float32
    `nn.Embedding` on an `nn.Linear` head's weight, a `LowPrecisionEmbedding` on a bf16 or int8 head's weight (the
    int8 one on the head's scales), an `Int4Embedding` on an int4 head's tensors. Each is the same memory, not equal
    values, so whether a step applies depends on where the model's tensors lie, never on what they hold."""
    wte, head = model.wte, model.lm_head
    kind = linear_kind(head)
    if type(wte) is nn.Embedding:
        return kind == _F32 and wte.max_norm is None and _same_memory(wte.weight, head.weight)
    if type(wte) is LowPrecisionEmbedding and kind in (_BF16, _INT8) and _same_memory(wte.weight, head.weight):
        return (wte.scale is None) if kind == _BF16 else _same_memory(wte.scale, head.scale)
    if type(wte) is Int4Embedding and kind == _INT4:
        return all(_same_memory(getattr(wte, n), getattr(head, n)) for n in ("weight", "group_scale", "scale"))
    return False


def _linears(model: GPT) -> list[nn.Module]:
    return [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)] + [model.lm_head]


class NativeStep:
    """`step(tokens, cache, positions, attention_mask)` == FlatStep's, computed by the native kernel.

    Shapes as FlatStep: tokens (B,), positions (B, 1) or None, attention_mask (B, S) or None; returns (B, V)
    float32 logits and advances the cache by one position.

    Threads: at most `torch.get_num_threads()`. With `adaptive_threads` (the default, see
    `adaptive_threads_default`) the model's `ThreadTuner` picks the count per step from the steps' own times, so load
    from other programs that comes and goes during a run does not make two threads crawl (gpt2lab.thread_tuner);
    `threads_used` is the count the last step ran with.
    """

    def __init__(self, model: GPT, adaptive_threads: Optional[bool] = None,
                 library: Optional[ctypes.CDLL] = None) -> None:
        lib = native.library() if library is None else library  # another build: benchmarks/kernel_paths.py
        if lib is None:
            raise RuntimeError(f"the native decode kernel is unavailable: {native.unavailable_reason()}")
        if not embeds_with_head(model):
            raise TypeError("the native decode step embeds tokens from the LM head's table, and this model's "
                            "embedding reads another one (untied); decode it with FlatStep")
        self._run = lib.gpt2lab_decode_step
        self._run_prefill = lib.gpt2lab_prefill
        self._bf16_dot = "avx512_bf16" in native.kernel_paths(lib)  # bf16 products round their activations
        cfg = model.config
        self.model = model
        self.adaptive_threads = adaptive_threads_default() if adaptive_threads is None else bool(adaptive_threads)
        self.threads_used: Optional[int] = None
        self.vocab_size = model.lm_head.out_features
        self.n_embd, self.ffn = cfg.n_embd, model.h[0].mlp.c_fc.out_features
        self._keep: list[torch.Tensor] = []  # every tensor whose memory the kernel reads, kept alive with the step
        layers = (_Layer * cfg.n_layer)()
        for i, b in enumerate(model.h):
            layers[i] = _Layer(self._addr(b.ln_1, "weight"), self._addr(b.ln_1, "bias"), self._linear(b.attn.c_attn),
                               self._linear(b.attn.c_proj), self._addr(b.ln_2, "weight"), self._addr(b.ln_2, "bias"),
                               self._linear(b.mlp.c_fc), self._linear(b.mlp.c_proj))
        self._layers = layers
        self.n_ctx = model.wpe.weight.size(0)  # wpe is (n_ctx, C): the positions the kernel may read
        self._model = _Model(cfg.n_layer, cfg.n_embd, cfg.n_head, self.ffn, cfg.layer_norm_eps,
                             _ACTIVATIONS[cfg.activation], ctypes.addressof(layers), self._addr(model.ln_f, "weight"),
                             self._addr(model.ln_f, "bias"), self._linear(model.lm_head),
                             self._addr(model.wpe, "weight"), self.n_ctx)
        self._scratch: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}
        self._checked: Optional[tuple[weakref.ref, weakref.ref]] = None  # the cache `_check_cache` last passed

    def bound(self, model: Optional[GPT], keep: list[torch.Tensor]) -> NativeStep:
        """This step for `model` (or None: a step that holds no model), keeping `keep` alive in place of this step's
        own aliases: the same kernel structures, fresh scratch memory and the default thread choice. `keep` must
        hold every tensor the structures point into (`layout`'s aliases of a model whose layout is this step's)."""
        step = copy.copy(self)
        step.model, step._keep, step._scratch, step._checked = model, keep, {}, None
        step.adaptive_threads, step.threads_used = adaptive_threads_default(), None
        return step

    def _addr(self, module: nn.Module, name: str) -> Optional[int]:
        """The address of `module.name` (None for an absent bias). The step keeps its own alias of the tensor
        (`detach()`: the same memory, another tensor), so the memory stays alive for the step even where the
        module's tensor is later pointed elsewhere (`p.data = ...`, as `.half()` or `use_huge_pages` do)."""
        t = getattr(module, name, None)
        if t is None:
            return None
        alias = t.detach()
        self._keep.append(alias)
        return alias.data_ptr()

    def _linear(self, layer: nn.Module) -> _Linear:
        kind = linear_kind(layer)
        if kind is None:
            raise TypeError(f"the native decode step cannot read a {type(layer).__name__} layer")
        scale = group_scale = None  # read in place: (N,) float32, int4's (N, K/32) int16
        if kind in (_INT8, _INT4):
            scale = self._addr(layer, "scale")
        if kind == _INT4:
            group_scale = self._addr(layer, "group_scale")
        weight = self._addr(layer, "weight")
        return _Linear(weight, scale, group_scale, self._addr(layer, "bias"), layer.out_features, layer.in_features,
                       kind)

    @staticmethod
    def applies(model: GPT) -> bool:
        """Whether the native step can decode `model` here: the kernel is built and reads every layer (the module
        docstring says what it computes in each precision)."""
        if not FlatStep.applies(model) or model.config.activation not in _ACTIVATIONS:
            return False
        norms = [t for b in model.h for t in (b.ln_1.weight, b.ln_1.bias, b.ln_2.weight, b.ln_2.bias)]
        norms += [model.ln_f.weight, model.ln_f.bias, model.wpe.weight]
        if not all(_plain_f32(t) for t in norms) or any(linear_kind(m) is None for m in _linears(model)):
            return False
        if model.wpe.weight.shape != (model.config.n_ctx, model.config.n_embd):
            return False
        return embeds_with_head(model) and native.library() is not None

    def _check_cache(self, cache: KVCache) -> None:
        """The kernel writes keys and values by its own arithmetic: the cache must be this model's shape, float32,
        contiguous, on the CPU (a cache of fewer layers or heads would be written past its end). Checked once per
        pair of tensors (a decode's steps pass the same ones), remembered by weak reference (no cache kept alive)."""
        if self._checked is not None and self._checked[0]() is cache.k and self._checked[1]() is cache.v:
            return
        if not (_plain_f32(cache.k) and _plain_f32(cache.v)):
            raise TypeError("the native decode step needs a contiguous float32 KV cache on the CPU")
        L, H, C = self._model.n_layer, self._model.n_head, self.n_embd
        want = (L, cache.k.size(1), H, cache.max_length, C // H)
        if cache.k.dim() != 5 or tuple(cache.k.shape) != want or cache.v.shape != cache.k.shape:
            raise ValueError(f"the KV cache must be (n_layer, B, n_head, max_length, head_dim) = {want} for this "
                             f"model, got keys {tuple(cache.k.shape)} and values {tuple(cache.v.shape)}")
        self._checked = (weakref.ref(cache.k), weakref.ref(cache.v))

    def _out_of_range(self, ids: torch.Tensor, at: int | torch.Tensor, refused: int) -> IndexError:
        """The error for the kernel's refusal (1: a token id, 2: a position outside the model's), naming the value."""
        if refused == 1:
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0].item()
            return IndexError(f"token id {bad} is out of range: the vocabulary has ids 0 to {self.vocab_size - 1}")
        bad = at if isinstance(at, int) else at[(at < 0) | (at >= self.n_ctx)][0].item()
        return IndexError(f"position {bad} is out of range: the model has positions 0 to {self.n_ctx - 1}")

    def _buffers(self, B: int, s_max: int, threads: int) -> tuple[torch.Tensor, ...]:
        """Scratch memory for B rows, allocated once per shape: x (the residual stream), qkv, att, hidden, norm,
        scores, xq, xq_scale, xq_sums, xb (each thread's bf16 copy of the activations, bits in int16)."""
        key = (B, s_max, threads)
        if key not in self._scratch:
            C, F = self.n_embd, self.ffn
            f32 = dict(dtype=torch.float32)
            self._scratch[key] = (torch.empty(B, C, **f32), torch.empty(B, 3 * C, **f32), torch.empty(B, C, **f32),
                                  torch.empty(B, F, **f32),
                                  torch.empty(threads, B, C, **f32), torch.empty(threads, s_max, **f32),
                                  torch.empty(threads, B, max(C, F), dtype=torch.int8),
                                  torch.empty(threads, B, **f32),
                                  torch.empty(threads, B, max(1, max(C, F) // 32), dtype=torch.int16),
                                  torch.empty(threads, B, max(C, F), dtype=torch.int16))
        return self._scratch[key]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, positions: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = tokens.size(0)
        pos = cache.length  # the column this token's key and value go to
        cache.check_room(B, 1, "token")
        self._check_cache(cache)
        if positions is not None and positions.numel() != B:
            raise ValueError(f"positions must hold one position per row ({B}), got shape {tuple(positions.shape)}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.size(0) != B
                                           or attention_mask.size(1) != pos + 1):
            raise ValueError(f"attention_mask must be (B, S) = ({B}, {pos + 1}) over the cached positions and the new "
                             f"one, got shape {tuple(attention_mask.shape)}")
        ids = tokens.reshape(B).long().contiguous()  # (B,) embedded by the kernel from the head's table
        at = None if positions is None else positions.reshape(B).long().contiguous()  # (B,); None: all at pos
        mask = None
        if attention_mask is not None:
            mask = (attention_mask[:, :pos + 1] != 0).to(torch.uint8).contiguous()  # (B, pos + 1), as .bool()
        logits = torch.empty(B, self.vocab_size, dtype=torch.float32)  # (B, V)
        most = torch.get_num_threads()
        tuner = thread_tuner(self.model, most) if self.adaptive_threads else None
        threads = tuner.threads() if tuner is not None else most
        x, qkv, att, hidden, norm, scores, xq, xq_scale, xq_sums, xb = self._buffers(B, cache.max_length, most)
        step = _Step(x.data_ptr(), logits.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), B, cache.k.size(1),
                     cache.max_length, pos, _ptr(mask), qkv.data_ptr(), att.data_ptr(), hidden.data_ptr(),
                     norm.data_ptr(), scores.data_ptr(), xq.data_ptr(), xq_scale.data_ptr(), xq_sums.data_ptr(),
                     xb.data_ptr(), threads, ids.data_ptr(), _ptr(at))
        start = time.perf_counter()
        refused = self._run(ctypes.byref(self._model), ctypes.byref(step))
        if refused:
            raise self._out_of_range(ids, pos if at is None else at, refused)
        if tuner is not None:
            tuner.record(time.perf_counter() - start, B, load_meter().others())
        self.threads_used = threads
        cache.advance(1)
        return logits

    def prefills(self, rows: int) -> bool:
        """Whether `prefill` is the faster way to encode prompts of `rows` tokens in all (batch x length)."""
        return 0 < rows <= PREFILL_ROWS[self._layers[0].attn.kind]

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The prompt's encoding in one kernel call: (B, T) ids -> (B, V) float32 logits of each row's last position,
        the cache advanced by T. position_ids (B, T) or (T,) and attention_mask (B, past + T) as the model's forward
        takes them (a left-padded batch).

        A short prompt's products have few rows, which MKL's GEMM and torch's bf16 and int8 kernels run far below
        what the cores can do, and on a small model the PyTorch operations between them cost more than the products
        (docs/benchmarks.md, prefill). The kernel runs the whole forward instead: the step's products over all B x T
        tokens at once (each weight streamed once), and the step's LayerNorm and attention, each token over the
        columns up to its own that the mask keeps. So in float32 this is `model(idx, ..., kv_cache=cache,
        logits_to_keep=1)[:, -1]` summed in another order, and in bf16, int8 and int4 the step's arithmetic (see the
        module docstring), as for the tokens after the prompt."""
        model = self.model
        model.check_inputs(idx, cache.length)  # (B, T) integer ids in range, or the model's own error
        B, T = idx.shape
        past = cache.length
        if B == 0 or T == 0:
            raise ValueError(f"a prompt to encode needs at least one row and one token, got shape {(B, T)}")
        cache.check_room(B, T, "prompt")
        self._check_cache(cache)
        if position_ids is None:
            position_ids = torch.arange(past, past + T)  # (T,)
        elif tuple(position_ids.shape) not in ((T,), (1, T), (B, T)):
            raise ValueError(f"position_ids must be (T,) or (B, T) = ({B}, {T}), got shape "
                             f"{tuple(position_ids.shape)}")
        positions = position_ids.long().expand(B, T).reshape(B * T).contiguous()  # (B*T,)
        ids = idx.long().reshape(B * T).contiguous()  # (B*T,)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be (B, S) = ({B}, {past + T}) over the cached positions and "
                                 f"the prompt's, got shape {tuple(attention_mask.shape)}")
            mask = (attention_mask != 0).to(torch.uint8).contiguous()  # (B, past + T), as .bool()
        most = torch.get_num_threads()
        threads = thread_tuner(model, most).threads() if self.adaptive_threads else most
        M, C, W = B * T, self.n_embd, max(self.n_embd, self.ffn)
        ints, bf16 = self._rounded_kinds()
        f32 = dict(dtype=torch.float32)
        x, qkv, att, norm = (torch.empty(M, n, **f32) for n in (C, 3 * C, C, C))  # (M, C), (M, 3C), ...
        hidden, logits = torch.empty(M, self.ffn, **f32), torch.empty(B, self.vocab_size, **f32)
        scores = torch.empty(threads, past + T, **f32)
        xq = torch.empty(M, W if ints else 1, dtype=torch.int8)  # (M, W): rounded only where a layer needs it
        xq_scale = torch.empty(M if ints else 1, dtype=torch.float32)  # (M,)
        xq_sums = torch.empty(M, W // 32 if ints else 1, dtype=torch.int16)  # (M, W/32)
        xb = torch.empty(M, W if bf16 else 1, dtype=torch.int16)
        run = _Prefill(x.data_ptr(), logits.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), B, cache.k.size(1),
                       cache.max_length, past, T, _ptr(mask), ids.data_ptr(), positions.data_ptr(), qkv.data_ptr(),
                       att.data_ptr(), hidden.data_ptr(), norm.data_ptr(), scores.data_ptr(), xq.data_ptr(),
                       xq_scale.data_ptr(), xq_sums.data_ptr(), xb.data_ptr(), threads)
        refused = self._run_prefill(ctypes.byref(self._model), ctypes.byref(run))
        if refused:
            raise self._out_of_range(ids, positions, refused)
        cache.advance(T)
        return logits

    def _rounded_kinds(self) -> tuple[bool, bool]:
        """Whether a product rounds its activations to int8 (an integer layer) and to bf16 (a bf16 layer on the
        dot-product path): what a prefill's shared scratch must hold."""
        kinds = {self._model.head.kind} | {getattr(layer, name).kind for layer in self._layers
                                           for name in ("attn", "attn_proj", "fc", "mlp_proj")}
        return bool(kinds & {_INT8, _INT4}), _BF16 in kinds and self._bf16_dot


def layout(model: GPT) -> Optional[tuple[list[object], list[torch.Tensor]]]:
    """What a native step built for `model` depends on, and an alias (`detach()`) of each of its tensors; None where
    a tensor has no address to record (a sparse or not yet materialized one).

    The first is a list: for every module, depth first, its name in its parent, its type and identity, its mode and
    whether it has forward hooks, then each of its parameters and buffers by name with where it lies (device,
    address, dtype, shape, strides; None for an absent one); ahead of those, the settings the step reads besides its
    tensors (the config's sizes and activation, each attention's `use_sdpa`, the embedding's `max_norm`, hooks set
    for every module). Whether a step applies and what its structures hold follow from these alone (it reads
    weights in place, and no value decides whether it applies), so two equal layouts are decoded by the same step.
    Walking the modules' own dictionaries costs about a quarter of building a step (docs/benchmarks.md)."""
    cfg = model.config
    hooks = torch.nn.modules.module  # hooks registered for every module (register_module_forward_hook)
    found: list[object] = [cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.layer_norm_eps, cfg.activation,
                           bool(getattr(hooks, "_global_forward_hooks", None)
                                or getattr(hooks, "_global_forward_pre_hooks", None)),
                           getattr(model.wte, "max_norm", None)]
    found += [getattr(b.attn, "use_sdpa", None) for b in model.h]
    aliases: list[torch.Tensor] = []
    todo: list[tuple[str, Optional[nn.Module]]] = [("", model)]
    try:
        while todo:
            name, m = todo.pop()
            if m is None:
                found.append((name, None))
                continue
            found.append((name, type(m), id(m), m.training, bool(m._forward_hooks or m._forward_pre_hooks)))
            for tensors in (m._parameters, m._buffers):
                for key, t in tensors.items():
                    if t is None:
                        found.append((key, None))
                        continue
                    alias = t.detach()
                    aliases.append(alias)
                    found.append((key, alias.device, alias.data_ptr(), alias.dtype, alias.shape, alias.stride()))
            todo.extend(m._modules.items())
    except (RuntimeError, ValueError):  # no data pointer: nothing to compare, so no step is reused
        return None
    return found, aliases


# each model's last native step with the layout it was built for, without the model's tensors (`NativeStep.bound`)
_BUILT: "weakref.WeakKeyDictionary[GPT, tuple[list[object], NativeStep]]" = weakref.WeakKeyDictionary()


def decode_step_for(model: GPT) -> Optional[NativeStep | FlatStep]:
    """The fastest one-token step for `model`: the native kernel where it applies, else the flat PyTorch step where
    that applies, else None (the modules run).

    Building a native step walks every layer (a millisecond on GPT-2, a third of a short prompt's time on a small
    model), so the last one built for a model is kept, without the model's tensors, and handed out again, holding
    this call's aliases, while the model's `layout` is the one it was built for. It is kept only where the layout
    was the same before and after building (nothing changed the model meanwhile, as another thread could)."""
    built = _BUILT.get(model)
    if built is not None and native.library() is not None:  # built before: the library is loaded, this is a lookup
        now = layout(model)
        if now is not None and now[0] == built[0]:
            return built[1].bound(model, now[1])
        _BUILT.pop(model, None)
    if NativeStep.applies(model):
        before = layout(model)
        step = NativeStep(model)
        after = layout(model)
        if before is not None and after is not None and before[0] == after[0]:
            _BUILT[model] = (after[0], step.bound(None, []))
        return step
    return FlatStep(model) if FlatStep.applies(model) else None
