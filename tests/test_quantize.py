"""The inference precisions and kernels (gpt2lab.quantize, gpt2lab.inference): each layer computes what the float32
linear computes, each dtype stays close to float32, and the kernels are chosen from what the CPU offers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.generate import generate
from gpt2lab import quantize
from gpt2lab.cpu import CPUFeatures, cpu_features
from gpt2lab.inference import prepare_for_inference
from gpt2lab import quantize_int
from gpt2lab.quantize_int import FbgemmInt8Linear, activation_bits, choose_int8_kernel
from gpt2lab.quantize import (SMALL_M, BF16Linear, ChunkedLinear, HalfPackedLinear, Int8Linear, OneDNNLinear,
                              TransposedLinear, quantize_per_channel)

from conftest import CONFIGS, make_model


@pytest.fixture(autouse=True)
def _torch_layers(monkeypatch):
    """These tests are about the PyTorch layers and their choice, so the native kernel counts as absent here
    (tests/test_native_step.py covers the plan with it)."""
    from gpt2lab import native

    monkeypatch.setattr(native, "library", lambda: None)

def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q, s = quantize_per_channel(linear.weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.allclose(q.float() * s[:, None], linear.weight, atol=float(s.max()) / 2 + 1e-7)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64)
    ref = x @ layer.dequantized().t() + linear.bias
    assert torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-2)


def test_int8_linear_works_on_a_torch_without_its_private_int8_kernel(monkeypatch):
    """torch._weight_int8pack_mm is a private op: without it the layer multiplies by its widened weight."""
    from gpt2lab import quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64)
    monkeypatch.setattr(quantize, "INT8PACK", False)
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    torch.testing.assert_close(layer(x), x @ layer.dequantized().t() + linear.bias, rtol=1e-5, atol=1e-5)


def test_int4_groups_of_32_round_to_the_nearest_step_of_their_own_scale():
    import doctest

    from gpt2lab import quantize_int
    from gpt2lab.quantize_int import dequantize_int4, quantize_int4

    assert doctest.testmod(quantize_int).failed == 0
    torch.manual_seed(0)
    w = torch.randn(5, 96) * torch.rand(5, 1) * 3  # rows of different spreads
    w[2, 32:64] = 0.0  # a group of zeros: scale 0, no division by it
    w[3, 64:96] *= 1e-4  # a group far below its row's largest: its integer scale stays at least 1
    packed, s, D = quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48)
    assert s.dtype == torch.int16 and s.shape == (5, 3) and D.shape == (5,)
    assert s.abs().max() == 255 and s[2, 1] == 0 and s[3, 2].abs() == 1
    back = dequantize_int4(packed, s, D)
    step = (s.float() * D[:, None]).repeat_interleave(32, dim=1)  # (5, 96) each weight's step, signed
    err, level = (back - w).abs(), w / torch.where(step == 0, 1.0, step)
    inside = level.abs() <= 7.5  # levels -8..7: beyond (the far side of a group's largest) clamps
    assert torch.all(err[inside] <= step.abs()[inside] / 2 + 1e-6)  # the nearest step of the stored scale
    ideal = w.reshape(5, 3, 32).abs().amax(-1) / 8  # q4_0's step
    stored = (s.float() * D[:, None]).abs()
    big = ideal > ideal.amax(-1, keepdim=True) / 2  # groups within half their row's largest
    assert torch.all((stored[big] / ideal[big] - 1).abs() < 0.004)  # the integer scale costs under 0.4% there
    assert torch.equal(back[2, 32:64], torch.zeros(32))


def test_int4_refuses_widths_that_are_not_whole_groups():
    from gpt2lab.quantize_int import quantize_int4

    with pytest.raises(ValueError, match="row of 48 is not a multiple of 32"):
        quantize_int4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_for_inference(make_model(CONFIGS["tiny"]), "int4")  # n_embd 16


def test_int4_layers_compute_with_their_widened_weights():
    from gpt2lab.quantize import Int4Embedding, Int4Linear

    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(cfg), "int4")
    assert isinstance(model.h[0].mlp.c_fc, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.wte, Int4Embedding) and model.wte.weight is model.lm_head.weight  # one table
    widened = GPT(cfg).eval()
    with torch.no_grad():
        for (name, module), (_, target) in zip(model.named_modules(), widened.named_modules()):
            if isinstance(module, Int4Linear) and name != "lm_head":
                target.weight.copy_(module.dequantized())
                if module.bias is not None:
                    target.bias.copy_(module.bias)
        widened.wte.weight.copy_(model.lm_head.dequantized())
        for n, p in widened.named_parameters():  # LayerNorms and positions as they were
            if "ln" in n or "wpe" in n:
                p.copy_(dict(model.named_parameters())[n])
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), widened(idx), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_prepare_for_inference_stays_close_to_fp32(dtype):
    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    model = GPT(cfg)
    model.load_state_dict(ref.state_dict())
    prepare_for_inference(model, dtype)
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        a, b = ref(idx), model(idx).float()
    err = (a - b).abs().max() / a.abs().max()
    assert err < {"fp32": 1e-5, "bf16": 0.02, "int8": 0.03, "int4": 0.25}[dtype]
    out = generate(model, idx, 5, temperature=0)
    assert out.shape == (2, 15)


def test_prepare_for_inference_fp32_decodes_token_for_token():
    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    model = prepare_for_inference(copy.deepcopy(ref), "fp32")
    idx = torch.randint(0, 128, (2, 10))
    assert torch.equal(generate(model, idx, 5, temperature=0), generate(ref, idx, 5, temperature=0))


def test_prepare_for_inference_rejects_unknown_dtype_and_double_preparation():
    with pytest.raises(ValueError, match="fp16"):
        prepare_for_inference(make_model(CONFIGS["tiny"]), "fp16")
    model = prepare_for_inference(make_model(CONFIGS["tiny"]), "int8")
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_inference(model, "fp32")


KERNELS = [Int8Linear, BF16Linear, TransposedLinear,
           pytest.param(OneDNNLinear, marks=pytest.mark.skipif(not quantize.onednn_linear(), reason="no oneDNN")),
           pytest.param(HalfPackedLinear, marks=pytest.mark.skipif(not quantize.fbgemm_half(), reason="no FBGEMM")),
           pytest.param(FbgemmInt8Linear, marks=pytest.mark.skipif(not quantize_int.fbgemm_int8(), reason="no FBGEMM"))]


@pytest.mark.parametrize("layer_type", KERNELS)
def test_inference_linears_agree_on_small_and_large_batches(layer_type):
    """Decode-sized inputs use the low-precision kernel, prefill-sized ones a float32 GEMM: both are the same layer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    layer = layer_type.from_linear(linear)
    x = torch.randn(SMALL_M + 9, 48)
    ref = x @ (layer.dequantized() if hasattr(layer, "dequantized") else linear.weight).t() + linear.bias
    tol = 1e-5 if layer_type in (TransposedLinear, OneDNNLinear) else 3e-2
    assert torch.allclose(layer(x), ref, atol=tol, rtol=tol)  # large batch
    assert torch.allclose(layer(x[:3]), ref[:3], atol=tol, rtol=tol)  # small batch
    assert layer(x.view(1, -1, 48)).shape == (1, SMALL_M + 9, 80)


@pytest.mark.skipif(not quantize.onednn_linear(), reason="no oneDNN")
def test_onednn_linear_is_the_float32_linear_for_any_number_of_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    layer = OneDNNLinear.from_linear(linear)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()  # no copy of the weight
    for rows in (1, 3, 8, SMALL_M + 1, 70):  # oneDNN for few rows, MKL for many
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(8, 128)[:, ::2]  # a strided input is made contiguous first
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_chunked_linear_is_the_float32_linear_for_any_number_of_rows(chunks, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias)
    layer = ChunkedLinear.from_linear(linear, chunks)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()  # the blocks are views of the same weight
    for rows in (1, 3, 8, SMALL_M, SMALL_M + 1):  # row blocks for few rows, MKL for many
        x = torch.randn(2, rows, 64)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 128)[:, ::2]  # a strided input
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunks must divide out_features=96, got 5"):
        ChunkedLinear.from_linear(linear, 5)


def test_decode_linear_gives_each_thread_two_row_blocks_where_they_divide():
    assert quantize.decode_linear(torch.nn.Linear(8, 96), threads=2).chunks == 4
    assert quantize.decode_linear(torch.nn.Linear(8, 1600), threads=16).chunks == 32  # gpt2-xl's width
    assert quantize.decode_linear(torch.nn.Linear(8, 30), threads=2).chunks == 3  # the most that divides, up to 4
    odd = quantize.decode_linear(torch.nn.Linear(8, 7), threads=2)
    assert type(odd) is OneDNNLinear  # 7 rows do not split: one oneDNN product


@pytest.mark.skipif(not quantize.fbgemm_half(), reason="no FBGEMM")
def test_half_packed_linear_holds_exactly_the_bf16_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    with torch.no_grad():
        linear.weight[0, :4] = torch.tensor([3e-7, -2e-6, 70.0, 1e-4])  # subnormal in fp16, large, small normal
    half, bf16 = HalfPackedLinear.from_linear(linear), BF16Linear.from_linear(linear)
    assert (half.dequantized() - bf16.dequantized()).abs().max() <= 2.0 ** -25
    x = torch.randn(5, 64)
    torch.testing.assert_close(half(x), x @ bf16.dequantized().t() + linear.bias, rtol=1e-5, atol=1e-5)
    assert not HalfPackedLinear.fits(torch.tensor([[1e5]]))


def test_inference_kernels_are_chosen_by_what_the_cpu_offers(monkeypatch):
    """oneDNN for fp32 and FBGEMM's fp16 layout for bf16 when available; otherwise the portable layers,
    with the same logits."""
    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    idx = torch.randint(0, 128, (2, 10))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast = {d: prepare_for_inference(copy.deepcopy(ref), d) for d in ("fp32", "bf16")}
        torch.set_num_threads(1)  # one thread: MKL's layout is the faster batch-1 kernel
        assert isinstance(prepare_for_inference(copy.deepcopy(ref), "fp32").lm_head, TransposedLinear)
    finally:
        torch.set_num_threads(threads)
    # what this CPU and torch build offer decides the layers; every branch is checked on the machine that has it
    fp32_head, fp32_block = (OneDNNLinear, ChunkedLinear) if quantize.onednn_linear() else (TransposedLinear,) * 2
    assert type(fast["fp32"].lm_head) is fp32_head
    assert type(fast["fp32"].h[0].mlp.c_fc) is fp32_block
    storages = [{t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}
                for m in (fast["fp32"].lm_head, fast["fp32"].wte)]
    assert storages[0] & storages[1]  # either way the head still shares the embedding's table
    packed = quantize.fbgemm_half() and not quantize.native_bf16()
    assert type(fast["bf16"].h[0].mlp.c_fc) is (HalfPackedLinear if packed else BF16Linear)
    monkeypatch.setattr(quantize, "onednn_linear", lambda: False)
    monkeypatch.setattr(quantize, "fbgemm_half", lambda: False)
    plain = {d: prepare_for_inference(copy.deepcopy(ref), d) for d in ("fp32", "bf16")}
    assert isinstance(plain["fp32"].lm_head, TransposedLinear)
    assert isinstance(plain["bf16"].lm_head, BF16Linear)
    with torch.no_grad():
        torch.testing.assert_close(fast["fp32"](idx), plain["fp32"](idx), rtol=1e-5, atol=1e-5)
        # same bf16 weights; BF16Linear also rounds the activations to bf16 inside its matmul, hence the tolerance
        torch.testing.assert_close(fast["bf16"](idx), plain["bf16"](idx), rtol=0, atol=1e-2)


# the three machine types seen so far, as gpt2lab.cpu reads them
MACHINES = {
    "AVX2 (Zen 3)": CPUFeatures(avx2=True, fma=True, f16c=True),
    "AVX-512-BF16 + VNNI (Zen 4)": CPUFeatures(avx2=True, fma=True, f16c=True, avx512=True, avx512_bf16=True,
                                               vnni=True, avx512_vnni=True),
    "AMX (Sapphire Rapids)": CPUFeatures(avx2=True, fma=True, f16c=True, avx512=True, avx512_bf16=True, vnni=True,
                                         avx512_vnni=True, amx=True),
}
EXPECTED = {  # (machine, dtype) -> (block layer, head layer) with 2 threads, oneDNN and FBGEMM present
    ("AVX2 (Zen 3)", "fp32"): (ChunkedLinear, OneDNNLinear),
    ("AVX2 (Zen 3)", "bf16"): (HalfPackedLinear, HalfPackedLinear),  # no bf16 arithmetic: fp16 layout, F16C widens
    ("AVX2 (Zen 3)", "int8"): (FbgemmInt8Linear, FbgemmInt8Linear),  # integer GEMM, activations per row
    ("AVX-512-BF16 + VNNI (Zen 4)", "fp32"): (ChunkedLinear, OneDNNLinear),
    ("AVX-512-BF16 + VNNI (Zen 4)", "bf16"): (BF16Linear, BF16Linear),  # native bf16 dot products
    ("AVX-512-BF16 + VNNI (Zen 4)", "int8"): (FbgemmInt8Linear, FbgemmInt8Linear),  # integer GEMM, activations per row
    ("AMX (Sapphire Rapids)", "fp32"): (ChunkedLinear, OneDNNLinear),
    ("AMX (Sapphire Rapids)", "bf16"): (BF16Linear, BF16Linear),
    ("AMX (Sapphire Rapids)", "int8"): (FbgemmInt8Linear, FbgemmInt8Linear),  # integer GEMM, activations per row
}


@pytest.mark.parametrize("machine, dtype", list(EXPECTED))
def test_choose_kernels_for_each_machine_type(machine, dtype):
    plan = quantize.choose_kernels(dtype, MACHINES[machine], threads=2, onednn=True, fbgemm=True)
    assert (plan.block, plan.head) == EXPECTED[machine, dtype]


def test_choose_kernels_without_the_optional_libraries_or_with_one_thread():
    zen3 = MACHINES["AVX2 (Zen 3)"]
    one_thread = quantize.choose_kernels("fp32", zen3, threads=1, onednn=True, fbgemm=True)
    assert (one_thread.block, one_thread.head) == (TransposedLinear, TransposedLinear)
    assert quantize.choose_kernels("fp32", zen3, 2, onednn=False, fbgemm=True).block is TransposedLinear
    assert quantize.choose_kernels("bf16", zen3, 2, onednn=True, fbgemm=False).block is BF16Linear
    assert quantize.choose_kernels("bf16", CPUFeatures(), 2, onednn=True, fbgemm=True).block is BF16Linear  # no F16C
    assert quantize.choose_kernels("int8", zen3, 2, onednn=True, fbgemm=False).block is Int8Linear
    assert quantize.choose_kernels("int8", CPUFeatures(), 2, onednn=True, fbgemm=True).block is Int8Linear  # no AVX2
    assert quantize.choose_kernels("int4", zen3, 2, onednn=True, fbgemm=True).block is quantize.Int4Linear
    with pytest.raises(ValueError, match="'fp16'"):
        quantize.choose_kernels("fp16", zen3, 2, True, True)


def test_prepare_for_inference_follows_the_plan_for_this_cpu():
    """The layers a prepared model holds are the ones `choose_kernels` names for what this machine reports."""
    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=1, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    for dtype in quantize.WEIGHT_DTYPES:
        fbgemm = quantize.fbgemm_int8() if dtype == "int8" else quantize.fbgemm_half()
        plan = quantize.choose_kernels(dtype, cpu_features(), torch.get_num_threads(), quantize.onednn_linear(),
                                       fbgemm)
        model = prepare_for_inference(copy.deepcopy(ref), dtype)
        assert isinstance(model.h[0].attn.c_attn, plan.block)
        assert isinstance(model.lm_head, plan.head)


@pytest.mark.skipif(not quantize.onednn_linear(), reason="no oneDNN: plain float32 layers keep their own forward")
def test_a_fresh_float32_model_decodes_through_the_fast_kernel_over_its_own_weights():
    """Fast by default: FlatStep runs a freshly built model's nn.Linear layers through the decode kernel, reading
    the very same weight tensors (no copy), so it follows later changes to the weights."""
    from gpt2lab.fast_step import FlatStep

    cfg = GPTConfig(vocab_size=96, n_ctx=32, n_layer=1, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    step = FlatStep(model)
    head = step.head.__self__
    assert isinstance(head, OneDNNLinear)
    assert head.weight.data_ptr() == model.wte.weight.data_ptr()
    c_fc = step.layers[0][6].__self__
    assert isinstance(c_fc, OneDNNLinear)
    assert c_fc.weight.data_ptr() == model.h[0].mlp.c_fc.weight.data_ptr()
    x = torch.randn(1, 64)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(2.0)  # a change after the step was built is seen
        torch.testing.assert_close(c_fc(x), model.h[0].mlp.c_fc(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- int8 kernels

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # an AVX2-only Zen 3
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}  # a Zen 4
AMX = AVX512_VNNI | {"amx_tile", "amx_int8", "amx_bf16"}  # a Sapphire Rapids Xeon
ARM = frozenset({"fp", "asimd", "asimddp", "sve"})
needs_fbgemm = pytest.mark.skipif(not quantize_int.fbgemm_int8(), reason="this torch has no working FBGEMM int8")


@pytest.mark.parametrize("flags,fbgemm,kernel,bits", [
    (AVX2, True, "fbgemm", 7),  # 16-bit pair sums in vpmaddubsw: 7-bit activations cannot saturate them
    (AVX512_VNNI, True, "fbgemm", 8),  # vpdpbusd sums into 32 bits
    (AMX, True, "fbgemm", 8),
    (AVX2 | {"avx_vnni"}, True, "fbgemm", 7),  # AVX-VNNI alone (an Alder Lake): FBGEMM's kernels do not use it
    (AVX2 | {"avx512f", "avx_vnni"}, True, "fbgemm", 7),  # AVX-512 without its VNNI: still 16-bit pair sums
    (AVX2, False, "int8pack", 7),  # a torch without FBGEMM
    (ARM, False, "int8pack", 7),
    (ARM, True, "int8pack", 7),  # FBGEMM without AVX2 runs scalar code
    (frozenset({"sse4_2", "avx"}), True, "int8pack", 7),
])
def test_int8_kernel_is_a_function_of_the_cpu_features(flags, fbgemm, kernel, bits):
    features = CPUFeatures.from_flags(flags)  # as gpt2lab.cpu reads them from /proc/cpuinfo
    assert choose_int8_kernel(features, fbgemm) == kernel
    assert activation_bits(features) == bits
    int8 = quantize.choose_kernels("int8", features, threads=2, onednn=True, fbgemm=fbgemm)
    assert int8.block is int8.head is (FbgemmInt8Linear if kernel == "fbgemm" else Int8Linear)


@needs_fbgemm
@pytest.mark.parametrize("bits", [7, pytest.param(8, marks=pytest.mark.skipif(
    activation_bits(cpu_features()) != 8, reason="8-bit activations saturate AVX2's 16-bit pair sums"))])
@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_int8_linear_is_close_to_its_dequantized_weight(bits, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=bias)
    q, s = quantize_per_channel(linear.weight)
    layer = FbgemmInt8Linear.from_linear(linear, bits)
    assert torch.equal(layer.dequantized(), q.float() * s[:, None])  # packed without a change of value
    for rows in (1, 3, SMALL_M + 9):  # one row straight through FBGEMM, several mapped onto [0, 1] first
        x = torch.randn(rows, 96) * 3 + 1
        ref = F.linear(x, layer.dequantized(), linear.bias)
        step = float((x.amax(1) - x.amin(1).clamp(max=0)).max()) / (2 ** bits - 1)  # the activation grid
        tol = step * float(layer.dequantized().abs().sum(1).max()) / 2  # at most half a step per product
        assert (layer(x) - ref).abs().max() <= tol
        assert (layer(x) - ref).abs().mean() <= tol / 10  # errors of single steps cancel in a sum
    assert layer(torch.randn(2, 5, 96)).shape == (2, 5, 80)
    with pytest.raises(ValueError, match="bits must be 7 or 8, got 4"):
        FbgemmInt8Linear.from_linear(linear, 4)


@needs_fbgemm
def test_fbgemm_int8_rows_do_not_depend_on_the_rest_of_the_batch():
    """FBGEMM quantizes a tensor with one scale; each row's own range is what decides its result here."""
    torch.manual_seed(0)
    layer = FbgemmInt8Linear.from_linear(torch.nn.Linear(64, 48))
    x = torch.randn(4, 64)
    x[2] *= 50  # a row with outliers would coarsen its neighbours' grid under one shared scale
    x[3] = 0.25  # a constant row
    together = layer(x)
    torch.testing.assert_close(together[0], layer(x[[0, 1]])[0], rtol=0, atol=1e-6)  # one shared scale: 0.7 off
    torch.testing.assert_close(together[1], layer(x[[1, 3]])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(together[3], F.linear(x[3], layer.dequantized(), layer.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:1]), together[:1], rtol=0, atol=0.05)  # one row: the unmapped path


@pytest.mark.parametrize("fbgemm", [True, False])
def test_int8_kernel_is_chosen_by_what_the_cpu_offers(monkeypatch, fbgemm):
    """The CPU's features pick the layers; every kernel that runs here gives logits close to the float32 model, and
    the embedding reads the head's int8 rows either way."""
    if fbgemm and not quantize_int.fbgemm_int8():
        pytest.skip("this torch has no working FBGEMM int8")
    cfg = GPTConfig(vocab_size=128, n_ctx=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(cfg).eval()
    monkeypatch.setattr(quantize, "cpu_features", lambda: CPUFeatures.from_flags(AVX2))
    monkeypatch.setattr(quantize, "fbgemm_int8", lambda: fbgemm)
    model = prepare_for_inference(copy.deepcopy(ref), "int8")
    kind = FbgemmInt8Linear if fbgemm else Int8Linear
    assert all(type(m) is kind for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert type(model.lm_head) is kind
    if fbgemm:
        assert model.lm_head.reduce_range  # AVX2: 7-bit activations
    idx = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(model.wte(idx), model.lm_head.dequantized()[idx], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        a, b = ref(idx), model(idx)
    assert float((a - b).abs().max() / a.abs().max()) < 0.03
    assert torch.equal(generate(model, idx, 4, temperature=0), generate(model, idx, 4, temperature=0))


@needs_fbgemm
@pytest.mark.parametrize("flags, reduce_range", [(AVX2, True), (AVX512_VNNI, False)])
def test_fbgemm_activation_bits_follow_the_cpu_features(monkeypatch, flags, reduce_range):
    """convert_int8's default bits come from what gpt2lab.cpu reports: 7 on AVX2, 8 with AVX-512-VNNI."""
    monkeypatch.setattr(quantize, "cpu_features", lambda: CPUFeatures.from_flags(flags))
    model = quantize.convert_int8(make_model(CONFIGS["tiny"]), "fbgemm")
    layers = [model.lm_head] + [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    assert all(layer.reduce_range is reduce_range for layer in layers)
    assert quantize.convert_int8(make_model(CONFIGS["tiny"]), "fbgemm", bits=7).lm_head.reduce_range  # given bits win


def test_convert_int8_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="unknown int8 kernel 'vnni'; choose one of: fbgemm, int8pack"):
        quantize.convert_int8(make_model(CONFIGS["tiny"]), "vnni")
