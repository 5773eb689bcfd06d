"""The native decode step computes what the modules compute, for every layer kind it reads, and is chosen only where
it can run.

Oracles: the model's own forward at T = 1 with the same KV cache (float32 and bf16 weights: the same float32
arithmetic, summed in another order); for int8, the modules with each int8 layer replaced by a plain-PyTorch
reference of the kernel's arithmetic (activations quantized per row to [-127, 127], integer dot products, scaled).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

from gpt2lab import GPT, GPTConfig, native
from gpt2lab.cpu import cpu_features
from gpt2lab.fast_step import FlatStep
from gpt2lab.generate import Decoder, generate
from gpt2lab.kv_cache import KVCache
from gpt2lab.native_step import NativeStep, decode_step_for, linear_kind
from gpt2lab.quantize import (BF16Linear, Int4Embedding, Int4Linear, Int8Linear, LowPrecisionEmbedding,
                              _replace_linears)
from gpt2lab.quantize_int import quantize_per_channel

from conftest import CONFIGS, assert_step_refuses_a_full_cache_or_wrong_batch, make_model, modules_and_step

needs_kernel = pytest.mark.skipif(native.library() is None,
                                  reason=f"native kernel unavailable here: {native.unavailable_reason()}")


@needs_kernel
def test_the_kernel_took_the_paths_this_cpu_or_the_emulation_asks_for():
    """The loaded library reports the paths its build took (the C side's own #if's): the AVX-512 ones exactly where
    the CPU has the instructions, or where GPT2LAB_NATIVE_EMULATE asked for them (test_native_emulated.py runs this
    file so)."""
    emulate = native.emulated_paths(os.environ.get("GPT2LAB_NATIVE_EMULATE"))
    if emulate:
        assert native.kernel_paths() == {*emulate, "emulated"}
        return
    f = cpu_features()
    wide = f.avx512_kernels and os.environ.get("GPT2LAB_NATIVE_AVX512", "1") != "0"
    wide = wide and native.fallback_note() is None  # else the AVX-512 build was not usable here, and it says why
    want = {name for name, has in (("avx512", wide), ("avx512_bf16", wide and f.avx512_bf16),
                                   ("avx512_vnni", wide and f.avx512_vnni)) if has}
    assert native.kernel_paths() == want


def both_paths(model, prompt, tokens, positions=None, mask=None, reference=None):
    """Logits of each step through the modules of `reference` (default `model`) and through NativeStep(model), from
    two caches filled by the same prefill (the reference's); returns (module logits, native logits, both caches)."""
    (ref, fast), caches = modules_and_step(model, NativeStep(model), prompt, tokens, positions, mask,
                                           reference=reference)
    return ref, fast, caches[0], caches[1]


def model_for(name: str | GPTConfig, sharpen: bool = True):
    """make_model's sharpened model (or GPT-2's init) of CONFIGS[name] (or of a config given itself) with random
    biases and LayerNorm gains, so that every tensor the kernel reads changes the logits (GPT-2's init leaves biases
    at 0 and gains at 1)."""
    config = CONFIGS[name] if isinstance(name, str) else name
    if sharpen:
        model = make_model(config)
    else:
        torch.manual_seed(0)
        model = GPT(config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def random_steps(V: int, B: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, 5), generator=g), [torch.randint(0, V, (B,), generator=g) for _ in range(n)]


def float64_logits(model, prompt, tokens, positions=None, mask=None):
    """The modules' logits in float64: the oracle both float32 paths are measured against."""
    model64 = copy.deepcopy(model).double()
    cfg = model.config
    B, T = prompt.shape
    cache = KVCache(cfg.n_layer, B, cfg.n_head, T + len(tokens), cfg.head_dim, dtype=torch.float64)
    with torch.no_grad():
        model64(prompt, kv_cache=cache, attention_mask=None if mask is None else mask[:, :T],
                position_ids=None if positions is None else positions[:, :T])
        return [model64(tok[:, None], kv_cache=cache, attention_mask=None if mask is None else mask[:, :T + i + 1],
                        position_ids=None if positions is None else positions[:, T + i:T + i + 1])[:, -1].float()
                for i, tok in enumerate(tokens)]


def assert_as_exact_as_the_modules(exact, modules, native_logits):
    """Over all steps, the native logits are as close to the float64 logits as float32 allows: a few times the
    modules' own error, or 1e-4 of the logits' scale where one ill-conditioned step amplifies rounding (the two sum
    in different orders; on these sharpened models float32 itself is off by up to ~5e-4). A wrong kernel is off by
    orders of magnitude more."""
    assert all(b.shape == a.shape and b.dtype == torch.float32 for a, b in zip(modules, native_logits))
    modules_error = max((a - r).abs().max().item() for r, a in zip(exact, modules))
    native_error = max((b - r).abs().max().item() for r, b in zip(exact, native_logits))
    scale = max(r.abs().max().item() for r in exact)
    assert native_error <= 4 * modules_error + 1e-4 * scale, (native_error, modules_error, scale)


# head widths the kernel's attention takes in pieces: it scores four keys at a time and holds up to 64 of a head's
# output values in registers per pass over the keys: 4 (only a scalar tail), 12 (one of 8 and a scalar tail), 72 (a
# pass of 64 and one of 8), 100 (64, 32 and a scalar tail of 4), 160 (two passes of 64 and one of 32)
HEAD_WIDTHS = {f"head {C // H}": GPTConfig(vocab_size=61, n_ctx=24, n_layer=2, n_head=H, n_embd=C)
               for C, H in ((16, 4), (36, 3), (144, 2), (200, 2), (160, 1))}


@needs_kernel
@pytest.mark.parametrize("name", list(CONFIGS) + list(HEAD_WIDTHS))
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_equals_the_modules(name, batch):
    model = model_for(CONFIGS.get(name) or HEAD_WIDTHS[name])
    V = model.config.vocab_size
    prompt, tokens = random_steps(V, batch, 6, seed=1)
    ref, fast, cache, native_cache = both_paths(model, prompt, tokens)
    assert fast[0].shape == (batch, V)
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, fast)
    assert native_cache.length == cache.length == 11
    torch.testing.assert_close(native_cache.k, cache.k, atol=1e-3, rtol=1e-3)  # keys and values written in place
    torch.testing.assert_close(native_cache.v, cache.v, atol=1e-3, rtol=1e-3)


@needs_kernel
def test_native_step_with_left_padding_equals_the_modules():
    model = model_for("wide", sharpen=False)  # attention spread over every column: a padded one would show
    prompt, tokens = random_steps(211, 2, 4, seed=2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # row 0 has three padding tokens on the left
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, 9)
    ref, fast, _, _ = both_paths(model, prompt, tokens, positions, mask)
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens, positions, mask), ref, fast)


@needs_kernel
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [2, 4])
def test_widths_that_are_not_whole_vectors_take_the_scalar_tails(kind, batch):
    """n_embd 36 and head width 12: every product and dot ends in a tail shorter than one 8-float vector (and than
    one 32-value bf16 dot product); batch 4 takes the two-by-four kernels' tails."""
    assert_float_step_exact(kind, GPTConfig(vocab_size=53, n_ctx=16, n_layer=2, n_head=3, n_embd=36), batch, 4, seed=8)


@needs_kernel
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_long_float_rows_at_four_input_rows_or_more(kind):
    """n_embd 128, hidden 512: at batch 5 the two-by-four kernels read rows of 512 floats (2 KiB) and of 512 bf16
    (1 KiB), which they prefetch into L2 rather than L1 (FAR_ROW_BYTES), and rows of 128 values, prefetched into L1;
    the fifth row takes the one-row kernels. Where a prefetch goes changes only the speed: this checks that both
    instances of each kernel compute the right thing (benchmarks/native_step.py times them)."""
    assert_float_step_exact(kind, GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=128), 5, 3, seed=9)


@needs_kernel
@pytest.mark.parametrize("kind, batch", [("fp32", 16), ("fp32", 17), ("fp32", 19), ("bf16", 48), ("bf16", 50)])
@pytest.mark.parametrize("n_embd, n_head", [(36, 3), (40, 4), (128, 4)])
def test_float_rows_from_many_input_rows_go_four_against_three(kind, batch, n_embd, n_head):
    """From 16 input rows float32 weight rows go four at a time against three input rows (dot4x3), the last one or
    two input rows (17, 19) one by one; bf16 rows (on the widening path) from 48, each four widened into float32
    first. 160-float rows (640 bytes) prefetch into L1, 512-float ones into L2; rows of 36 and 144 leave a tail
    past the last 8 values, and a head of 67 rows leaves rows past the last four."""
    config = GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=n_head, n_embd=n_embd)
    assert_float_step_exact(kind, config, batch, 2, seed=batch)


def assert_float_step_exact(kind: str, config: GPTConfig, batch: int, steps: int, seed: int) -> None:
    """The native step on `config` in fp32 (against the modules) or bf16 (against its reference arithmetic), with
    weights 4x GPT-2's init and random biases and gains, over `steps` random tokens of `batch` rows."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape)) if p.dim() == 1 else p.mul_(4.0)
    assert_step_exact_in(kind, model, *random_steps(config.vocab_size, batch, steps, seed=seed))


def assert_step_exact_in(kind: str, model, prompt, tokens) -> None:
    """The native step as exact as its reference allows: a float32 model against the modules, or (kind "bf16") the
    model converted to bf16 against the arithmetic its build's bf16 products do."""
    if kind == "bf16":
        model = to_bf16(model)
        assert_bf16_as_exact_as_its_reference(model, prompt, tokens, bf16_reference(model))
        return
    ref, fast, _, _ = both_paths(model, prompt, tokens)
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, fast)


def to_bf16(model):
    """Every linear layer and the tied head as BF16Linear, the embedding reading the head's bf16 table (as
    prepare_for_inference converts)."""
    _replace_linears(model, BF16Linear.from_linear)
    model.lm_head = BF16Linear(model.wte.weight)
    model.wte = LowPrecisionEmbedding(model.lm_head.weight)
    return model


def dequantized(model):
    """A float32 copy of a low-precision model: each layer's own weight, widened (the same numbers, float32 math)."""
    for block in model.h:
        for owner, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            layer = getattr(owner, name)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(layer.dequantized())
                if layer.bias is not None:
                    plain.bias.copy_(layer.bias)
            setattr(owner, name, plain)
    with torch.no_grad():
        table = model.wte(torch.arange(model.config.vocab_size))  # (V, C) the rows the embedding reads, float32
    model.wte = nn.Embedding(model.config.vocab_size, model.config.n_embd)
    with torch.no_grad():
        model.wte.weight.copy_(table)
    model.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
    model.lm_head.weight = model.wte.weight
    return model


class BF16Reference(nn.Module):
    """The bf16 dot-product path's arithmetic (AVX-512-BF16 builds): activations rounded to bf16, then products of
    bf16 values, exact in float32 and summed in the model's dtype, plus the bias. BF16Linear's own forward does the
    same rounding; this one also runs in float64."""

    def __init__(self, layer: BF16Linear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.dequantized())  # (N, K) the bf16 values, widened
        self.register_buffer("bias", layer.bias)

    def forward(self, x):
        y = x.to(torch.bfloat16).to(x.dtype) @ self.weight.t()
        return y if self.bias is None else y + self.bias


def bf16_reference(model):
    """What the kernel's bf16 products compute, for a bf16 model: the widened float32 model (float32 activations)
    on the AVX2 path, BF16Reference layers on the bf16 dot-product path (the build's `native.kernel_paths()`)."""
    if "avx512_bf16" not in native.kernel_paths():
        return dequantized(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    _replace_linears(reference, BF16Reference)
    reference.lm_head = BF16Reference(reference.lm_head)
    return reference


def assert_bf16_as_exact_as_its_reference(model, prompt, tokens, reference):
    """The native logits against a bf16 model's reference: on the AVX2 path as exact as float32 allows. On the
    bf16 dot-product path the reference rounds its own activations to bf16, and its LayerNorm sums in another
    order than the kernel's, so an activation may land one bf16 step away (2^-8 of it) and move the logits by
    about that much of one product: 2e-3 of the logits' scale is allowed (measured under emulation: below 5e-6;
    float32 activations instead of bf16 ones are off by 4-18e-2). Not tighter: SIMDe's emulation of VDPBF16PS adds
    a pair's two products in the other order than the instruction and keeps subnormals it flushes, so the emulated
    and the real path differ by float32 rounding."""
    ref, fast, _, _ = both_paths(model, prompt, tokens, reference=reference)
    exact = float64_logits(reference, prompt, tokens)
    if "avx512_bf16" not in native.kernel_paths():
        assert_as_exact_as_the_modules(exact, ref, fast)
        return
    scale = max(r.abs().max().item() for r in exact)
    modules_error = max((a - r).abs().max().item() for r, a in zip(exact, ref))
    native_error = max((b - r).abs().max().item() for r, b in zip(exact, fast))
    assert native_error <= 4 * modules_error + 2e-3 * scale, (native_error, modules_error, scale)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_native_step_on_bf16_weights_equals_the_widened_model(batch):
    """Rows of 32 and 128 (narrow: four at a time below four input rows, on the AVX2 path)."""
    model = to_bf16(model_for("wide"))
    assert linear_kind(model.h[0].mlp.c_fc) == 1 and NativeStep.applies(model)
    prompt, tokens = random_steps(211, batch, 4, seed=3)
    assert_bf16_as_exact_as_its_reference(model, prompt, tokens, bf16_reference(model))


class Int8Reference(nn.Module):
    """The kernel's int8 arithmetic in PyTorch: x rows to int8 in [-127, 127] with one scale each, integer products
    with the int8 weight, then both scales and the bias."""

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.q, self.scale, self.bias = layer.weight, layer.scale.float(), layer.bias

    def forward(self, x):
        amax = x.abs().amax(-1, keepdim=True)  # (..., 1)
        xq = torch.round(x * torch.where(amax > 0, 127.0 / amax, 0.0))  # (..., K) integers in float
        y = (xq.double() @ self.q.double().t()).float() * (amax / 127.0) * self.scale  # exact integer sums
        return y if self.bias is None else y + self.bias


def int8_reference(model):
    """A copy of an int8 model whose int8 layers compute through Int8Reference."""
    reference = copy.deepcopy(model)
    _replace_linears(reference, Int8Reference)
    reference.lm_head = Int8Reference(reference.lm_head)
    return reference


def to_int8(model):
    q, s = quantize_per_channel(model.wte.weight)
    _replace_linears(model, Int8Linear.from_linear)
    model.lm_head = Int8Linear(q, s)
    model.wte = LowPrecisionEmbedding(q, model.lm_head.scale)  # the head's table, as prepare_for_inference converts
    return model


@needs_kernel
def test_native_step_on_int8_weights_equals_its_reference_arithmetic():
    model = to_int8(model_for("wide"))  # n_embd 32 and 4 * 32: whole 32-byte blocks
    assert linear_kind(model.lm_head) == 2 and NativeStep.applies(model)
    reference = int8_reference(model)
    prompt, tokens = random_steps(211, 2, 4, seed=4)
    ref, fast, _, _ = both_paths(model, prompt, tokens, reference=reference)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name,batch", [("tiny", 1), ("tiny", 5), ("wide", 8), ("mixed", 1), ("mixed", 4),
                                        ("long", 5), ("192", 1), ("64", 1), ("64", 4), ("320", 1), ("320", 3)])
def test_int8_at_any_width_and_batch_equals_its_reference_arithmetic(name, batch):
    """n_embd 16 (no whole 32-byte block: scalar tails), 32, 96, 192, 64 (hidden 256: the widest narrow rows, four
    at a time), 320 (too wide for that: VNNI's 128-wide loop, then its 64-wide one) and 544 (whole blocks, then a
    tail of 32); batches of 1-3 and of 4 or more, which take different kernels for wide rows."""
    model = to_int8(model_for(name) if name in CONFIGS else model_for(INT4_CONFIGS[name], sharpen=False))
    V = model.config.vocab_size
    assert linear_kind(model.h[0].attn.c_attn) == 2 and NativeStep.applies(model)
    reference = int8_reference(model)
    prompt, tokens = random_steps(V, batch, 3, seed=10)
    ref, fast, _, _ = both_paths(model, prompt, tokens, reference=reference)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


class Int4Reference(nn.Module):
    """The kernel's int4 arithmetic in PyTorch: x rows to int8 as for int8, each group's integer dot product with
    the int4 weights times the group's integer scale (all exact in float64), summed, times the row's float scale
    and the activation row's, plus the bias."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from gpt2lab.quantize_int import dequantize_int4

        layer = self.layer
        N, G = layer.group_scale.shape
        ones = torch.ones(N, G, dtype=torch.int16)
        q = dequantize_int4(layer.weight, ones, torch.ones(N)).double().view(N, G, 32)  # integers in [-8, 7]
        amax = x.abs().amax(-1, keepdim=True)  # (..., 1)
        xq = torch.round(x * torch.where(amax > 0, 127.0 / amax, 0.0)).double()  # (..., K)
        per_group = torch.einsum("...gk,ngk->...ng", xq.unflatten(-1, (G, 32)), q)  # (..., N, G) integers
        y = (per_group * layer.group_scale.double()).sum(-1).float() * layer.scale * (amax / 127.0)
        return y if layer.bias is None else y + layer.bias


INT4_CONFIGS = {
    "wide": CONFIGS["wide"],  # widths 32 (one group of 32: the last-group path) and 128 (two blocks of 64)
    "mixed": GPTConfig(vocab_size=131, n_ctx=32, n_layer=2, n_head=4, n_embd=96),  # 96 = a block and a group
    # 544 = 8 blocks and a group: 17 groups, so the correction's 16-at-a-time loop and its tail both run
    "long": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=544),
    "192": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=192),  # 6 groups; int8's widths 192, 768
    # narrow-row edges: 64 wide (int8 rows of 64, 256 bytes = the narrow limit at 256 wide) and 128 wide (int4 rows
    # of 512 weights: 16 groups, the correction's 16-wide step, the exactness bound's worst case)
    "64": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=64),
    "128": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=128),
    # 320 wide: int8 rows too wide to go four at a time, 320 = 2 x 128 + 64 (VNNI's 128-wide loop, then its 64-wide one)
    "320": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=320),
    "448": GPTConfig(vocab_size=67, n_ctx=16, n_layer=1, n_head=4, n_embd=448),  # int4 rows of 14 groups
}


def int4_model_and_reference(name="wide"):
    from gpt2lab.inference import prepare_for_inference

    torch.manual_seed(0)
    model = prepare_for_inference(GPT(INT4_CONFIGS[name]).eval(), "int4")
    with torch.no_grad():  # biases and gains that change the logits (GPT-2's init leaves them 0 and 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape))
    reference = copy.deepcopy(model)
    _replace_linears(reference, Int4Reference)
    reference.lm_head = Int4Reference(reference.lm_head)
    return model, reference


@needs_kernel
@pytest.mark.parametrize("name", ["wide", "mixed", "long", "192", "128", "64", "320", "448"])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 8, 17, 20])
def test_native_step_on_int4_weights_equals_its_reference_arithmetic(name, batch):
    """Rows of at most 512 weights in whole blocks go four at a time, at every batch size, each group count its
    own compiled kernel (64, 128, 192, 256, 320, 384, 448, 512 wide: 2 to 16 groups, with rows left over in the
    heads of 67 or 211): one input row unpacks each block as it goes, more unpack the four rows once, 17 and 20 rows
    take two calls (the second of one row, of four). Wider rows (544, 768, 1280, 1792, 2176) take the one-row kernel
    at batches of 1-3, the four-input-row one at 4 and 8, both at 5, 17 and 20. Widths of 32, 96 and 544 take the
    last-group path, and every width the correction's 16-, 8- and 4-group steps and its tail where it has them.
    (Batch 2 shares batch 3's paths; it is compared bit for bit with batch 5 below.)"""
    model, reference = int4_model_and_reference(name)
    assert linear_kind(model.lm_head) == 3 and NativeStep.applies(model)
    prompt, tokens = random_steps(model.config.vocab_size, batch, 3, seed=13)
    ref, fast, _, _ = both_paths(model, prompt, tokens, reference=reference)
    for a, b in zip(ref, fast):
        off = (a - b).abs() > 1e-4
        # the kernel's LayerNorm and attention sum in another order, so now and then an activation sits on a
        # rounding boundary and lands one int8 step away from the reference's: a few logits move by about
        # (group scale * activation scale), here up to 0.016, not more
        assert off.float().mean() < 0.2 and (a - b).abs().max() < 2e-2, (off.float().mean(), (a - b).abs().max())
    assert sum(int(((a - b).abs() > 1e-4).any()) for a, b in zip(ref, fast)) <= 1  # most steps match exactly


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("name", ["wide", "long"])
def test_integer_rows_decode_the_same_alone_or_in_a_batch(kind, name):
    """An integer layer's sums are exact integers whichever kernel a batch size takes (one row, four rows at a time,
    four input rows at once), and every path rounds the scales and bias in one fused multiply-add, so a row's logits
    are the same bits alone, in a batch of 2 (below four rows) and in a batch of 5 (both kernels)."""
    from gpt2lab.kv_cache import KVCache

    if kind == "int8":
        model = to_int8(model_for(name) if name in CONFIGS else model_for(INT4_CONFIGS[name], sharpen=False))
    else:
        model = int4_model_and_reference(name)[0]
    prompt, tokens = random_steps(model.config.vocab_size, 5, 3, seed=21)
    T = prompt.size(1)
    full = KVCache.for_model(model, 5, T + len(tokens))
    with torch.no_grad():
        model(prompt, kv_cache=full)  # one prefill; each smaller batch starts from its rows of this cache

    def decode(rows):
        cache = KVCache.for_model(model, len(rows), T + len(tokens))
        cache.k[:, :len(rows)].copy_(full.k[:, rows])
        cache.v[:, :len(rows)].copy_(full.v[:, rows])
        cache.length = T
        step = NativeStep(model)
        return [step(tok[rows], cache) for tok in tokens]  # each (len(rows), V)

    batched = decode([0, 1, 2, 3, 4])
    pairs = decode([1, 3])
    for i in range(5):
        alone = decode([i])
        for a, b in zip(alone, batched):
            assert torch.equal(a[0], b[i]), (kind, name, i)
    for a, b in zip(pairs, batched):
        assert torch.equal(a, b[[1, 3]]), (kind, name)


@needs_kernel
def test_int4_reference_is_not_the_int4_layers_own_forward():
    """The reference is worth its name: it differs from the layers' float32 forward (the int8 activations), and
    the step follows the reference, not the layers."""
    model, reference = int4_model_and_reference()
    prompt, tokens = random_steps(211, 2, 2, seed=14)
    own, fast, _, _ = both_paths(model, prompt, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(own, fast)) > 1e-3


@needs_kernel
def test_int8_weights_of_minus_128_keep_their_sign():
    """torch's int8 layers accept -128, which AVX2's byte sign instruction cannot negate; the kernel moves the sign
    onto the activations instead. Rows of 1, 4 and 5 inputs take each int8 kernel: on "wide" the narrow rows'
    four-at-a-time one, on "long" (rows of 544 and 2176) the one-row and four-input-row ones.
    With weights this large, a last-bit difference upstream (LayerNorm, attention) can move an activation across a
    rounding boundary of its int8 copy and shift every later logit by a step of that copy (seen on 2 of 90 seeds, of
    this kernel and of the one before), so a fixed tolerance would pass or fail by luck. A lost sign (-128 read as
    +128) moves the logits ten times further than any such step: the test asks that the kernel's logits be within a
    tenth of that distance of the reference's, and that all but one of each model's three batches match it closely
    (a flip stays in the cache, so it moves every later step of its batch)."""
    for name in ("wide", "long"):
        model = to_int8(model_for(name) if name in CONFIGS else model_for(INT4_CONFIGS[name], sharpen=False))
        with torch.no_grad():
            for layer in (model.h[0].mlp.c_fc, model.h[-1].attn.c_attn, model.lm_head):
                layer.weight[::3, ::5] = -128
        reference, lost_sign = int8_reference(model), int8_reference(model)
        for layer in (lost_sign.h[0].mlp.c_fc, lost_sign.h[-1].attn.c_attn, lost_sign.lm_head):
            layer.q = torch.where(layer.q == -128, 128, layer.q.to(torch.int16))
        off = 0  # batches with a step that does not match closely
        for batch in (1, 4, 5):
            prompt, tokens = random_steps(model.config.vocab_size, batch, 2, seed=11)
            ref, fast, _, _ = both_paths(model, prompt, tokens, reference=reference)
            wrong, _, _, _ = both_paths(model, prompt, tokens, reference=lost_sign)
            for a, b, c in zip(ref, fast, wrong):
                assert (b - a).abs().mean() < 0.1 * (c - a).abs().mean(), (name, batch)
            off += int(any(not torch.allclose(b, a, atol=1e-4, rtol=1e-4) for a, b in zip(ref, fast)))
        assert off <= 1, (name, off)  # a smaller error (-128 read as -127) moves every batch


@needs_kernel
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [4, 5, 8, 9])
def test_batches_that_take_the_two_by_four_kernel_equal_the_modules(kind, batch):
    model = model_for("wide")
    assert_step_exact_in(kind, model, *random_steps(211, batch, 3, seed=12))


@needs_kernel
def test_rows_retired_mid_decode_keep_their_own_cache_rows():
    """After `Decoder.retire` the active rows are the first rows of a cache allocated for more: the native step
    indexes the cache by its allocated batch and gives each remaining row what a decode of that row alone gives."""
    model = model_for("wide", sharpen=False)
    prompt, _ = random_steps(211, 3, 0, seed=13)
    decoder = Decoder(model, prompt, max_new_tokens=6)
    assert isinstance(decoder.fast_step, NativeStep)
    decoder.prefill()
    tokens = torch.tensor([5, 6, 7])
    decoder.step(tokens)
    decoder.retire(torch.tensor([0, 2]))  # row 1 finished
    got = decoder.step(torch.tensor([8, 9]))
    for i, row in enumerate((0, 2)):
        alone = Decoder(model, prompt[row:row + 1], max_new_tokens=6, make_step=lambda m: None)
        alone.prefill()
        alone.step(tokens[row:row + 1])
        want = alone.step(torch.tensor([[8, 9][i]]))
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_a_step_decodes_with_the_weights_it_was_built_with(dtype):
    """A weight pointed elsewhere after the step was built (`p.data = ...`, as `.half()` or huge pages do) does not
    reach that step, and its old memory is not freed under it: the step keeps its own alias of each tensor, so no
    per-token check is needed. In-place writes reach it; a new step sees the new weights."""
    from gpt2lab.inference import prepare_for_inference

    model = prepare_for_inference(model_for("wide", sharpen=False), dtype)
    step = NativeStep(model)
    prefilled = KVCache.for_model(model, 1, max_length=8)
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4]]), kv_cache=prefilled)  # once: the modules would prefill with new weights

    def decode(step):
        cache = KVCache.for_model(model, 1, max_length=8)
        cache.k.copy_(prefilled.k)
        cache.v.copy_(prefilled.v)
        cache.advance(prefilled.length)
        return step(torch.tensor([5]), cache)

    before = decode(step)
    with torch.no_grad():
        for layer in (model.h[1].mlp.c_fc, model.lm_head):
            for name in ("weight", "scale"):
                t = getattr(layer, name, None)
                if t is not None:
                    t.data = t.data.clone() * 2 if t.is_floating_point() else t.data.clone() // 2
        nbytes = max(t.numel() * t.element_size() for t in (model.lm_head.weight, model.h[1].mlp.c_fc.weight))
        fill = [torch.full((nbytes // 4,), float("nan")) for _ in range(8)]  # blocks the freed ones' size: reused
    torch.testing.assert_close(decode(step), before, rtol=0, atol=0)
    changed = decode(NativeStep(model))
    assert not torch.allclose(changed, before)
    with torch.no_grad():  # an in-place write to what the step reads reaches it
        model.h[0].ln_1.bias.add_(1.0)
    assert not torch.allclose(decode(step), before)
    del fill


# what a user may do to a model between two decodes, each a change the next step must follow (the hook set for
# every module is removed by the test)
LAYOUT_CHANGES = {
    "new memory for a weight": lambda m: setattr(m.h[1].mlp.c_fc.weight, "data", m.h[1].mlp.c_fc.weight.data * 2),
    "a bias dropped": lambda m: setattr(m.h[0].attn.c_proj, "bias", None),
    "another module": lambda m: setattr(m.h[0], "mlp", copy.deepcopy(m.h[0].mlp)),
    "blocks reordered": lambda m: setattr(m, "h", nn.ModuleList(list(m.h)[::-1])),
    "the head's table replaced": lambda m: setattr(m.wte, "weight", nn.Parameter(m.wte.weight.detach().clone())),
    "a hook on a layer": lambda m: m.h[0].mlp.c_fc.register_forward_hook(lambda *args: None),
    "a hook on the model": lambda m: m.register_forward_pre_hook(lambda *args: None),
    "a hook on every module": lambda m: torch.nn.modules.module.register_module_forward_hook(lambda *args: None),
    "a block training": lambda m: setattr(m.h[1], "training", True),
    "attention without SDPA": lambda m: setattr(m.h[0].attn, "use_sdpa", False),
    "another config": lambda m: setattr(m, "config", dataclasses.replace(m.config, activation="relu")),
    "a module's class changed": lambda m: setattr(m.h[0].mlp, "__class__", type("OtherMLP", (type(m.h[0].mlp),), {})),
    "gain and bias swapped": lambda m: _swap_gain_and_bias(m.h[1].ln_2),
}


def _swap_gain_and_bias(ln):
    """The same two tensors at the same addresses, under each other's names: only the names tell them apart."""
    weight, bias = ln.weight, ln.bias
    del ln.weight, ln.bias
    ln.bias, ln.weight = weight, bias


@needs_kernel
@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_decode_step_for_reuses_a_models_step_until_what_it_reads_changes(change):
    """Building a native step walks every layer, so `decode_step_for` keeps each model's last one (its kernel
    structures, none of the model's tensors) and hands it out again while the model's `layout` is unchanged; after
    any change the step follows it (a new step, or no native step where it no longer applies), and its logits are
    those of a step built from scratch."""
    from gpt2lab.native_step import _BUILT, layout

    model = model_for("wide")
    first, again = decode_step_for(model), decode_step_for(model)
    assert isinstance(again, NativeStep) and again is not first and again._model is first._model
    assert again.model is model and len(again._keep) == len(layout(model)[1])
    kept = _BUILT[model][1]
    assert kept.model is None and kept._keep == [] and kept._scratch == {}  # no tensor, no model held
    assert kept._checked is None
    before = layout(model)[0]
    done = LAYOUT_CHANGES[change](model)
    try:
        assert layout(model)[0] != before
        step = decode_step_for(model)
        assert not (isinstance(step, NativeStep) and step._model is first._model)
        if isinstance(step, NativeStep):
            prompt, tokens = random_steps(model.config.vocab_size, 2, 2, seed=8)
            reused = decode_step_for(model)
            assert reused._model is step._model
            (_, ours), _ = modules_and_step(model, reused, prompt, tokens)
            (_, fresh), _ = modules_and_step(model, NativeStep(model), prompt, tokens)
            assert all(torch.equal(a, b) for a, b in zip(ours, fresh))
        else:
            assert model not in _BUILT
    finally:
        if change == "a hook on every module":
            done.remove()


@needs_kernel
def test_a_tensor_without_an_address_builds_the_step_each_time():
    """A sparse buffer has no data pointer to record: `layout` gives None, and the step is built each call, as
    before there was a layout, instead of failing."""
    from gpt2lab.native_step import _BUILT, layout

    model = model_for("tiny")
    model.h[0].register_buffer("extra", torch.eye(3).to_sparse())
    assert layout(model) is None
    first, second = decode_step_for(model), decode_step_for(model)
    assert isinstance(first, NativeStep) and isinstance(second, NativeStep) and second._model is not first._model
    assert model not in _BUILT


@needs_kernel
def test_the_kept_step_does_not_keep_its_model_alive():
    import gc
    import weakref

    from gpt2lab.native_step import _BUILT

    model = model_for("tiny")
    generate(model, torch.tensor([[1, 2, 3]]), 2, temperature=0)
    assert model in _BUILT
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_the_kernel_embeds_from_the_heads_table_only_where_they_are_tied(dtype):
    """The kernel embeds tokens from the head's weights, so it runs only where the embedding reads that table (GPT-2
    ties them; prepare_for_inference keeps the tie); an untied model decodes through the flat step, as correctly."""
    from gpt2lab.inference import prepare_for_inference
    from gpt2lab.native_step import embeds_with_head

    model = prepare_for_inference(model_for("wide", sharpen=False), dtype)
    assert embeds_with_head(model) and isinstance(decode_step_for(model), NativeStep)
    untied = copy.deepcopy(model)
    with torch.no_grad():
        table = untied.wte(torch.arange(untied.config.vocab_size))  # (V, C) float32
    untied.wte = nn.Embedding.from_pretrained(table.clone(), freeze=False)
    assert not embeds_with_head(untied) and isinstance(decode_step_for(untied), FlatStep)
    with pytest.raises(TypeError, match="embeds tokens from the LM head's table"):
        NativeStep(untied)
    if dtype != "fp32":  # the same kind of embedding module on another table, or other scales
        other = copy.deepcopy(model)
        head = other.lm_head
        if dtype == "int4":
            other.wte = Int4Embedding(head)
            other.wte.group_scale = head.group_scale.clone()
        elif dtype == "bf16":
            other.wte = LowPrecisionEmbedding(head.weight.clone())
        else:  # equal scales in other memory: whether the kernel applies never depends on values
            other.wte = LowPrecisionEmbedding(head.weight, head.scale.clone())
        assert not embeds_with_head(other)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    untied_out = generate(untied, prompt, 6, temperature=0)
    assert untied_out.shape == (1, 11)
    if dtype == "fp32":  # the same arithmetic by another route (the other precisions' flat layers round otherwise)
        assert torch.equal(untied_out, generate(model, prompt, 6, temperature=0))


@needs_kernel
def test_token_ids_and_positions_out_of_range_are_refused_before_anything_is_written():
    model = model_for("wide")
    step = NativeStep(model)
    V, n_ctx = model.config.vocab_size, model.config.n_ctx
    cache = KVCache.for_model(model, 2, max_length=8)
    with torch.no_grad():
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    k_before = cache.k.clone()
    with pytest.raises(IndexError, match=f"token id {V} is out of range: the vocabulary has ids 0 to {V - 1}"):
        step(torch.tensor([1, V]), cache)
    with pytest.raises(IndexError, match="token id -1 is out of range"):
        step(torch.tensor([-1, 2]), cache)
    with pytest.raises(IndexError, match=f"position {n_ctx} is out of range: the model has positions 0 to {n_ctx - 1}"):
        step(torch.tensor([1, 2]), cache, positions=torch.tensor([[3], [n_ctx]]))
    with pytest.raises(IndexError, match="position -2 is out of range"):
        step(torch.tensor([1, 2]), cache, positions=torch.tensor([[-2], [3]]))
    assert cache.length == 3 and torch.equal(cache.k, k_before)
    assert step(torch.tensor([1, 2]), cache).shape == (2, V) and cache.length == 4
    long_cache = KVCache.for_model(model, 1, max_length=n_ctx + 2)  # room past the model's positions
    long_cache.advance(n_ctx)
    with pytest.raises(IndexError, match=f"position {n_ctx} is out of range"):
        step(torch.tensor([1]), long_cache)  # every row at the cache's column
    assert long_cache.length == n_ctx


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_the_kernels_embedding_is_the_modules_bit_for_bit(dtype):
    """With every block adding exactly zero, the residual stream the kernel leaves in its x buffer is the embedding
    alone: the token's row of the head's table widened as the embedding module widens it, plus the position's row,
    equal to `wte(tokens) + wpe[positions]` to the bit (the logits tests allow a tolerance)."""
    from gpt2lab.inference import prepare_for_inference

    model = prepare_for_inference(model_for("wide", sharpen=False), dtype)
    with torch.no_grad():
        for block in model.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                for name in ("weight", "scale", "bias"):
                    t = getattr(layer, name, None)
                    if t is not None and t.is_floating_point():
                        t.zero_()
    step = NativeStep(model)
    V = model.config.vocab_size
    tokens, positions = torch.tensor([0, V - 1, 77]), torch.tensor([[5], [0], [9]])
    cache = KVCache.for_model(model, 3, max_length=8)
    cache.advance(4)
    step(tokens, cache, positions=positions)
    x = step._buffers(3, 8, torch.get_num_threads())[0]  # (B, C) the residual stream after the last block
    with torch.no_grad():
        want = model.wte(tokens) + model.wpe.weight[positions.view(-1)]
    assert torch.equal(x, want)


@needs_kernel
def test_masks_and_positions_of_the_wrong_shape_are_refused():
    model = model_for("wide")
    step = NativeStep(model)
    cache = KVCache.for_model(model, 2, max_length=8)
    with torch.no_grad():
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    tokens = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, S\) = \(2, 4\)"):
        step(tokens, cache, attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one position per row"):
        step(tokens, cache, positions=torch.zeros(3, 1, dtype=torch.long))
    assert cache.length == 3


@needs_kernel
def test_generate_takes_the_native_step_where_it_applies_and_gives_the_same_tokens():
    model = model_for("wide")
    prompt, _ = random_steps(211, 2, 0, seed=5)
    assert isinstance(Decoder(model, prompt, max_new_tokens=3).fast_step, NativeStep)
    fast = generate(model, prompt, 12, temperature=0)
    handle = model.h[0].register_forward_hook(lambda *args: None)  # a hook: the modules run every step
    assert decode_step_for(model) is None
    assert torch.equal(generate(model, prompt, 12, temperature=0), fast)
    handle.remove()


def test_without_the_kernel_the_flat_step_runs(monkeypatch):
    model = make_model(CONFIGS["tiny"])
    monkeypatch.setattr(native, "library", lambda: None)
    assert not NativeStep.applies(model)
    assert isinstance(decode_step_for(model), FlatStep)
    with pytest.raises(RuntimeError, match="native decode kernel is unavailable"):
        NativeStep(model)


def test_layers_the_kernel_cannot_read_keep_the_flat_step():
    model = make_model(CONFIGS["tiny"])
    assert linear_kind(model.h[0].mlp.c_fc) == 0
    model.h[0].mlp.c_fc.weight.data = model.h[0].mlp.c_fc.weight.data.t().contiguous().t()  # not row-major
    assert linear_kind(model.h[0].mlp.c_fc) is None
    assert not NativeStep.applies(model)
    int8 = Int8Linear.from_linear(nn.Linear(32, 8))
    assert linear_kind(int8) == 2
    int8.scale = int8.scale.double()  # the kernel reads float32 scales in place: no copy it would have to refresh
    assert linear_kind(int8) is None


@needs_kernel
def test_native_step_refuses_a_full_cache_or_wrong_batch():
    model = make_model(CONFIGS["tiny"])
    assert_step_refuses_a_full_cache_or_wrong_batch(model, NativeStep(model))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_native_step_is_the_same_with_any_thread_count(threads):
    model = model_for("wide")
    prompt, tokens = random_steps(211, 3, 3, seed=6)
    torch.set_num_threads(threads)  # conftest's autouse fixture restores the count after each test
    ref, fast, _, _ = both_paths(model, prompt, tokens)
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, fast)


# ------------------------------------------------------------------------------------ the plan with the native kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_with_the_kernel_every_machine_gets_the_layers_it_reads(dtype):
    from gpt2lab.quantize import choose_kernels
    from gpt2lab.cpu import CPUFeatures

    for features in (CPUFeatures(avx2=True, fma=True, f16c=True),
                     CPUFeatures(avx2=True, fma=True, f16c=True, avx512=True, avx512_bf16=True, vnni=True, amx=True)):
        for threads, onednn, fbgemm in ((1, False, False), (2, True, True)):
            plan = choose_kernels(dtype, features, threads, onednn, fbgemm, native=True)
            assert plan.block is plan.head is {"fp32": nn.Linear, "bf16": BF16Linear, "int8": Int8Linear,
                                               "int4": Int4Linear}[dtype]


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_prepared_models_decode_through_the_native_step(dtype):
    from gpt2lab.inference import prepare_for_inference

    fp32 = model_for("wide", sharpen=False)  # GPT-2's init: bf16 and int8 rounding stay small, as on real weights
    model = prepare_for_inference(copy.deepcopy(fp32), dtype)
    if dtype == "fp32":  # nothing to convert: the kernel reads the float32 weights in place
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    else:
        assert type(model.h[0].attn.c_attn) is type(model.lm_head) is {"bf16": BF16Linear, "int8": Int8Linear,
                                                                        "int4": Int4Linear}[dtype]
    prompt, _ = random_steps(211, 2, 0, seed=9)
    decoder = Decoder(model, prompt, max_new_tokens=4)
    assert isinstance(decoder.fast_step, NativeStep)
    reference = Decoder(fp32, prompt, max_new_tokens=4)
    decoder.prefill(), reference.prefill()
    tokens = torch.tensor([3, 7])
    for _ in range(3):
        got, want = decoder.step(tokens), reference.step(tokens)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() > {"fp32": 0.99999, "bf16": 0.99, "int8": 0.99, "int4": 0.95}[dtype], cos
        tokens = want.argmax(-1)


# ------------------------------------------------------------------------------------------- threads and barriers
@needs_kernel
@pytest.mark.parametrize("spin_us", [0, 20, 10_000])
def test_native_step_is_the_same_however_long_threads_spin_before_they_sleep(spin_us):
    """0 us: every thread that waits at a barrier sleeps on the futex and is woken; the results must not change."""
    model = model_for("wide")
    prompt, tokens = random_steps(211, 3, 4, seed=8)
    torch.set_num_threads(2)
    try:
        (_, quick), _ = modules_and_step(model, NativeStep(model), prompt, tokens)
        native.set_barrier_spin(spin_us)
        (ref, fast), _ = modules_and_step(model, NativeStep(model), prompt, tokens)
    finally:
        native.set_barrier_spin(20)
    assert all(torch.equal(a, b) for a, b in zip(fast, quick))  # same threads, same chunks of rows: the same sums
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, fast)


class _Fixed:
    """A stand-in tuner that asks for a given count and remembers what it was told."""

    def __init__(self, threads):
        self.most, self._threads, self.seen = 2, threads, []

    def threads(self):
        return self._threads

    def record(self, seconds, key=None, others=None):
        self.seen.append((seconds, key, others))


@needs_kernel
def test_the_native_step_runs_with_the_count_its_tuner_picks_and_reports_its_time(monkeypatch):
    import gpt2lab.native_step as native_step
    model = model_for("wide")
    prompt, tokens = random_steps(211, 3, 3, seed=9)
    torch.set_num_threads(2)
    (ref, two), _ = modules_and_step(model, NativeStep(model, adaptive_threads=False), prompt, tokens)
    fixed = _Fixed(1)
    monkeypatch.setattr(native_step, "thread_tuner", lambda m, most: fixed)
    step = NativeStep(model, adaptive_threads=True)
    (_, one), _ = modules_and_step(model, step, prompt, tokens)
    assert step.threads_used == 1 and len(fixed.seen) == len(tokens)
    assert all(seconds > 0 and key == 3 for seconds, key, _ in fixed.seen)  # key: the batch size
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, one)
    assert_as_exact_as_the_modules(float64_logits(model, prompt, tokens), ref, two)


@needs_kernel
def test_steps_of_one_model_share_a_tuner_and_the_switch_turns_it_off(monkeypatch):
    from gpt2lab.native_step import thread_tuner
    model, other = model_for("tiny"), model_for("tiny")
    assert thread_tuner(model, 2) is thread_tuner(model, 2)
    assert thread_tuner(model, 2) is not thread_tuner(other, 2)
    assert thread_tuner(model, 1).most == 1  # torch's thread count changed: a new tuner for the new range
    monkeypatch.setenv("GPT2LAB_ADAPTIVE_THREADS", "0")
    assert NativeStep(model).adaptive_threads is False
    monkeypatch.setenv("GPT2LAB_ADAPTIVE_THREADS", "1")
    assert NativeStep(model).adaptive_threads is True
    torch.set_num_threads(2)
    step = NativeStep(model, adaptive_threads=False)
    prompt, tokens = random_steps(model.config.vocab_size, 1, 2, seed=1)
    modules_and_step(model, step, prompt, tokens)
    assert step.threads_used == 2


@needs_kernel
@pytest.mark.parametrize("n, k", [(3, 32), (5, 96), (7, 544), (64, 2176)])
def test_int4_weights_widen_through_the_kernel_bit_for_bit(n, k):
    """Int4Linear.dequantized (a prefill's weights) uses the kernel's widening where it is built: the same float32
    values as the PyTorch widening, blocks of 64 and a last group of 32 alike."""
    from gpt2lab.quantize_int import dequantize_int4

    torch.manual_seed(k)
    layer = Int4Linear.from_linear(nn.Linear(k, n))
    torch_widened = dequantize_int4(layer.weight, layer.group_scale, layer.scale)
    assert torch.equal(layer.dequantized(), torch_widened)
    x = torch.randn(2, 9, k)
    torch.testing.assert_close(layer(x), x @ torch_widened.t() + layer.bias)


@needs_kernel
def test_the_int4_embedding_widens_its_rows_through_the_kernel_bit_for_bit(monkeypatch):
    """Int4Embedding reads the tied head's rows: through the kernel (a decode step's one row per token) the same
    float32 values as through PyTorch, any index shape."""
    from gpt2lab.quantize import Int4Embedding

    torch.manual_seed(3)
    head = Int4Linear.from_linear(nn.Linear(96, 70, bias=False))
    embedding = Int4Embedding(head)
    idx = torch.tensor([[5, 0, 69], [5, 12, 33]])  # (B, T), a repeated row
    fast = embedding(idx)
    assert fast.shape == (2, 3, 96)
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(embedding(idx), fast)
    assert torch.equal(embedding(torch.tensor([7]))[0], head.dequantized()[7])
    assert embedding(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 96)  # no tokens: no rows, any path


def test_int4_group_scales_outside_the_kernels_range_are_refused():
    layer = Int4Linear.from_linear(nn.Linear(64, 3))
    scales = layer.group_scale.clone()
    scales[1, 0] = 300
    with pytest.raises(ValueError, match=r"group scales must lie in \[-255, 255\].*got one of 300"):
        Int4Linear(layer.weight, scales, layer.scale)


def test_int4_rows_wider_than_the_kernels_exact_bound_are_not_read():
    """The kernel's int4 sums stay exact in 32-bit lanes for rows of up to 22,000 weights; a wider layer keeps the
    PyTorch step rather than overflow (GPT-2's widest is 6,400)."""
    from gpt2lab.native_step import INT4_MAX_WIDTH

    assert linear_kind(Int4Linear.from_linear(nn.Linear(INT4_MAX_WIDTH // 32 * 32, 2))) == 3
    assert linear_kind(Int4Linear.from_linear(nn.Linear((INT4_MAX_WIDTH // 32 + 1) * 32, 2))) is None


# ------------------------------------------------------------------------------------------------------- prefill
@needs_kernel
@pytest.mark.parametrize("name", list(CONFIGS) + list(HEAD_WIDTHS))
def test_native_prefill_computes_the_forward_in_float32(name):
    """`NativeStep.prefill` is the model's forward on the last position (float32: the same arithmetic, summed in
    another order), and fills the cache with the same keys and values; a second chunk after a cached first one too
    (attention over the past and the chunk's own causal part: 1 to 9 columns, with and without a tail past the
    last four keys)."""
    model = model_for(CONFIGS.get(name) or HEAD_WIDTHS[name])
    g = torch.Generator().manual_seed(5)
    first = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
    second = torch.randint(0, model.config.vocab_size, (2, 3), generator=g)
    step = NativeStep(model)
    caches = [KVCache.for_model(model, 2, max_length=12) for _ in range(2)]
    exact, modules, fast = [], [], []
    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        cache64 = KVCache(model.config.n_layer, 2, model.config.n_head, 12, model.config.head_dim, dtype=torch.float64)
        for chunk in (first, second):
            exact.append(model64(chunk, kv_cache=cache64, logits_to_keep=1)[:, -1].float())
            modules.append(model(chunk, kv_cache=caches[0], logits_to_keep=1)[:, -1])
            fast.append(step.prefill(chunk, caches[1]))
    assert_as_exact_as_the_modules(exact, modules, fast)
    assert caches[1].length == caches[0].length == 9
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(b, a, atol=1e-4 * a.abs().max().item(), rtol=0)


@needs_kernel
@pytest.mark.parametrize("name", ["wide", "long"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_native_prefill_computes_what_the_step_computes_token_by_token(dtype, name):
    """Every prompt token's products in `prefill` are those the decode step computes for it (int8 and int4 round
    each row of activations to int8 on its own), and its LayerNorm and attention the step's functions, so a prompt
    prefilled in one call gives the logits and the cache of the same prompt fed to the step one token at a time.
    The products over many rows take other kernels (four weight rows against three input rows) that sum in other
    orders: now and then an activation lands on the other side of an int8 (or bf16) rounding boundary, which moves a
    few logits by about one rounding step, not more. "wide" has narrow rows (32 wide), "long" wide ones (544 and
    2176: the one-row and four-input-row kernels); 3 x 9 = 27 rows, on two threads, each rounding its share of the
    rows for both."""
    from gpt2lab.inference import prepare_for_inference

    config = CONFIGS[name] if name in CONFIGS else INT4_CONFIGS[name]
    model = prepare_for_inference(model_for(config, sharpen=False), dtype)
    step = NativeStep(model, adaptive_threads=False)
    prompt = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(11))
    caches = [KVCache.for_model(model, 3, max_length=10) for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = step.prefill(prompt, caches[0])
        for t in range(prompt.size(1)):
            one_by_one = step(prompt[:, t], caches[1])
    finally:
        torch.set_num_threads(threads)
    assert caches[0].length == caches[1].length == 9
    # where the activations are rounded (int8, int4; bf16 on the dot-product path) one flip moves every later value a
    # little, so those are held to a rounding step at most and a small average; elsewhere to float32's order
    rounded = dtype in ("int8", "int4") or (dtype == "bf16" and "avx512_bf16" in native.kernel_paths())
    for want, got in ((one_by_one, fast), (caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        scale, off = want.abs().max().item(), (got - want).abs()
        if rounded:
            assert off.max() <= 2e-2 * scale and off.mean() <= 1e-3 * scale, (off.max(), off.mean(), scale)
        else:
            assert off.max() <= 1e-4 * scale, (off.max(), scale)


@needs_kernel
def test_native_prefill_refuses_a_full_cache_a_wrong_batch_or_a_bad_token():
    model = model_for("tiny")
    step = NativeStep(model)
    with pytest.raises(ValueError, match="KV cache overflow: 0 cached \\+ 5 new positions exceed max_length=4"):
        step.prefill(torch.zeros(1, 5, dtype=torch.long), KVCache.for_model(model, 1, max_length=4))
    with pytest.raises(ValueError, match="KV cache holds 2 active rows, got 1 prompt$"):
        step.prefill(torch.zeros(1, 3, dtype=torch.long), KVCache.for_model(model, 2, max_length=4))
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        step.prefill(torch.tensor([[1, 97]]), KVCache.for_model(model, 1, max_length=4))
    cache = KVCache.for_model(model, 1, max_length=4)
    n_ctx = model.config.n_ctx
    with pytest.raises(IndexError, match=f"position {n_ctx} is out of range: the model has positions 0 to {n_ctx - 1}"):
        step.prefill(torch.tensor([[1, 2]]), cache, position_ids=torch.tensor([[0, n_ctx]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, S\) = \(1, 2\) .* got shape \(1, 3\)"):
        step.prefill(torch.tensor([[1, 2]]), cache, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"position_ids must be \(T,\) or \(B, T\) = \(1, 2\), got shape \(3,\)"):
        step.prefill(torch.tensor([[1, 2]]), cache, position_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"needs at least one row and one token, got shape \(1, 0\)"):
        step.prefill(torch.zeros(1, 0, dtype=torch.long), cache)
    assert cache.length == 0  # nothing cached by a refused prompt


@needs_kernel
def test_prefill_rows_follow_the_weight_kind_of_the_model():
    """Each precision's prompts take the kernel up to its own limit (PREFILL_ROWS, by the layers' weight kind),
    longer ones the modules' GEMM, and an empty prompt neither."""
    from gpt2lab.inference import prepare_for_inference
    from gpt2lab.native_step import PREFILL_ROWS

    kinds = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
    for dtype, kind in kinds.items():
        model = prepare_for_inference(model_for("wide", sharpen=False), dtype)
        assert linear_kind(model.h[0].attn.c_attn) == kind
        most = PREFILL_ROWS[kind]
        step = NativeStep(model)
        assert not step.prefills(0) and step.prefills(1) and step.prefills(most) and not step.prefills(most + 1)


@needs_kernel
def test_native_prefill_of_a_left_padded_batch_computes_the_forward():
    """With the position ids and padding mask of a left-padded batch (as `Decoder` makes them), `prefill` is the
    forward on those arguments: each row's real tokens count from position 0 and never see the padding."""
    model = model_for("wide")
    idx = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    caches = [KVCache.for_model(model, 3, max_length=8) for _ in range(2)]
    with torch.no_grad():
        want = model(idx, position_ids=positions, attention_mask=mask, kv_cache=caches[0], logits_to_keep=1)[:, -1]
    got = NativeStep(model).prefill(idx, caches[1], positions, mask)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # padding tokens too: each attends to
        torch.testing.assert_close(b, a, atol=1e-4 * a.abs().max().item(), rtol=0)  # its own column, as modules'
    assert caches[1].length == 6
    alone = NativeStep(model).prefill(idx[:1, 3:], KVCache.for_model(model, 1, max_length=8))  # row 0 unpadded
    torch.testing.assert_close(got[:1], alone, atol=1e-4 * want.abs().max().item(), rtol=0)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_native_prefill_of_one_token_and_of_padding_after_a_cached_chunk(threads):
    """A one-token prompt (fewer rows than threads), and a second chunk of a left-padded batch after a first one (its
    padding now in the cached columns, the mask over past and new ones), are the forward's, on one and three
    threads; mask values other than 0 and 1 mean what they mean to the modules (nonzero: attend)."""
    model = model_for("wide")
    torch.set_num_threads(threads)  # conftest's autouse fixture restores the count
    step = NativeStep(model, adaptive_threads=False)
    one = torch.tensor([[7]])
    caches = [KVCache.for_model(model, 1, max_length=4) for _ in range(2)]
    with torch.no_grad():
        want = model(one, kv_cache=caches[0], logits_to_keep=1)[:, -1]
    torch.testing.assert_close(step.prefill(one, caches[1]), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    g = torch.Generator().manual_seed(9)
    first, second = (torch.randint(0, model.config.vocab_size, (2, n), generator=g) for n in (4, 3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, 7)
    caches = [KVCache.for_model(model, 2, max_length=8) for _ in range(2)]
    got = []
    with torch.no_grad():
        for chunk, cols in ((first, slice(0, 4)), (second, slice(4, 7))):
            seen = mask[:, :cols.stop]
            want = model(chunk, position_ids=positions[:, cols], attention_mask=seen, kv_cache=caches[0],
                         logits_to_keep=1)[:, -1]
            got = step.prefill(chunk, caches[1], positions[:, cols], seen * 3)  # 3: attend, as 1
            torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


@needs_kernel
def test_a_cache_of_another_shape_is_refused_before_the_kernel_writes_to_it():
    """The kernel writes keys and values by the model's own sizes: a cache of fewer layers (or heads) would be
    written past its end, so the step and the prefill refuse it, naming both shapes."""
    model = model_for("wide")
    step = NativeStep(model)
    cfg = model.config
    small = KVCache(cfg.n_layer - 1, 1, cfg.n_head, 8, cfg.head_dim)
    with pytest.raises(ValueError, match=r"KV cache must be .* = \(3, 1, 4, 8, 8\) for this model, got keys "
                                         r"\(2, 1, 4, 8, 8\)"):
        step.prefill(torch.tensor([[1, 2]]), small)
    with pytest.raises(ValueError, match="KV cache must be"):
        step(torch.tensor([1]), small)
    assert small.length == 0


@needs_kernel
def test_a_step_keeps_no_cache_alive():
    """The step remembers which cache it checked by weak reference: a finished decode's cache is freed."""
    import gc
    import weakref

    model = model_for("tiny")
    step = NativeStep(model)
    cache = KVCache.for_model(model, 1, max_length=4)
    step(step.prefill(torch.tensor([[1, 2]]), cache).argmax(-1), cache)
    gone = weakref.ref(cache.k)
    del cache
    gc.collect()
    assert gone() is None


@needs_kernel
def test_the_step_returns_float32_whatever_torchs_default_dtype():
    """The kernel writes float32: its logits and scratch are float32 even where torch's default dtype is not."""
    from gpt2lab.inference import prepare_for_inference

    model = prepare_for_inference(model_for("wide", sharpen=False), "int8")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    want = generate(model, prompt, 4, temperature=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        step = NativeStep(model)
        cache = KVCache.for_model(model, 1, max_length=8)  # float32: the model's activations
        logits = step.prefill(prompt, cache)
        assert logits.dtype == torch.float32 and step(logits.argmax(-1), cache).dtype == torch.float32
        assert torch.equal(generate(model, prompt, 4, temperature=0), want)
    finally:
        torch.set_default_dtype(default)


@needs_kernel
def test_generate_prefills_short_prompts_with_the_kernel(monkeypatch):
    """`generate` hands a short prompt, padded or not, to `NativeStep.prefill` and gets the modules' greedy tokens;
    a float32 prompt past the kernel's share goes through the model's forward."""
    import gpt2lab.native_step as native_step

    model = model_for(GPTConfig(vocab_size=97, n_ctx=96, n_layer=2, n_head=2, n_embd=32))
    calls = []
    real = NativeStep.prefill

    def counted(self, idx, cache, *args):
        calls.append(tuple(idx.shape))
        return real(self, idx, cache, *args)

    monkeypatch.setattr(NativeStep, "prefill", counted)
    short = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for mask in (None, padding):
        calls.clear()
        out = generate(model, short, 6, temperature=0, attention_mask=mask)
        assert calls == [(2, 5)]
        with monkeypatch.context() as m:
            m.setattr(native_step, "PREFILL_ROWS", {k: 0 for k in native_step.PREFILL_ROWS})  # the modules prefill
            assert torch.equal(generate(model, short, 6, temperature=0, attention_mask=mask), out)
        assert calls == [(2, 5)]
    rows = native_step.PREFILL_ROWS[0] // 65 + 1  # rows of 65 tokens: past fp32's limit
    generate(model, torch.randint(0, 97, (rows, 65)), 2, temperature=0)
    assert calls == [(2, 5)]


@needs_kernel
def test_the_window_is_re_encoded_through_the_kernel_with_the_step_built_again(monkeypatch):
    """Past n_ctx, `generate` re-encodes the newest 3/4 of the window; that prefill goes through the kernel too, on
    the default step built again for it (so it reads the weights as they are then), and the tokens are the ones the
    modules' re-encoding gives."""
    import gpt2lab.native_step as native_step

    model = model_for(GPTConfig(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, n_embd=32))
    steps = []
    real = NativeStep.prefill

    def counted(self, idx, cache, *args):
        steps.append(self)
        return real(self, idx, cache, *args)

    monkeypatch.setattr(NativeStep, "prefill", counted)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, 30, temperature=0)  # the window (16, keeping 12) slides at 17, 22, 27 and 32
    assert len(steps) == 5 and len(set(steps)) == 5  # the prompt, then each re-encoding, each on a step of its own
    with monkeypatch.context() as m:
        m.setattr(native_step, "PREFILL_ROWS", {k: 0 for k in native_step.PREFILL_ROWS})
        assert torch.equal(generate(model, prompt, 30, temperature=0), out)
