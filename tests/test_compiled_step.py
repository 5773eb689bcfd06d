"""The compiled decode step computes what the modules compute, compiles once for every cache length, and steps aside
(None, or FlatStep after a failed compile) where it cannot run.

Oracle: the model's own forward at T = 1 with the same KV cache. Each test that compiles builds one graph of a tiny
model, so the file stays within a few tens of seconds on two cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from gpt2lab import compiled_step as compiled_module
from gpt2lab.compiled_step import CompiledStep, compiled_step, compiler_available
from gpt2lab.inference import prepare_for_inference
from gpt2lab.kv_cache import KVCache
from gpt2lab.quantize import BF16Linear, HalfPackedLinear, LowPrecisionEmbedding, convert_int8, fbgemm_half
from gpt2lab.quantize_int import fbgemm_int8

from conftest import CONFIGS, make_model, modules_and_step

needs_compiler = pytest.mark.skipif(not compiler_available(),
                                    reason="torch.compile needs a C++ compiler (g++, c++ or clang++ on PATH)")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled graphs and zeroed counters, so graph counts are this test's own."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def random_tokens(V: int, B: int, T: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), [torch.randint(0, V, (B,), generator=g) for _ in range(steps)]


@needs_compiler
def test_fp32_equals_the_modules_with_one_graph_for_every_length():
    model = make_model(CONFIGS["wide"])
    step = compiled_step(model)
    assert isinstance(step, CompiledStep)
    prompt, tokens = random_tokens(model.config.vocab_size, 2, 3, 40)
    for max_length, n in ((3 + 40, 40), (48, 20)):  # two caches of different sizes, the first filled to the end
        (ref, ours), caches = modules_and_step(model, step, prompt, tokens[:n], max_length=max_length)
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)  # fused sums round differently
        torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-3, rtol=1e-3)
        assert caches[1].length == 3 + n
    assert not step.failed
    assert graphs() == 1, "one graph for every cache length and size"


@needs_compiler
def test_int8_with_left_padding_equals_the_modules():
    model = convert_int8(make_model(CONFIGS["tiny"]).eval(), "int8pack")  # FBGEMM's packed int8 does not trace
    step = compiled_step(model)
    prompt, tokens = random_tokens(model.config.vocab_size, 2, 5, 8, seed=2)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded by 3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, 13)
    (ref, ours), _ = modules_and_step(model, step, prompt, tokens, positions, mask)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)  # bf16 activations into the int8 kernel
    assert not step.failed and graphs() == 1


@needs_compiler
def test_prepared_fp32_at_batch_one_equals_the_modules():
    model = prepare_for_inference(make_model(CONFIGS["tiny"]), "fp32")  # ChunkedLinear with two threads or more
    step = compiled_step(model)
    prompt, tokens = random_tokens(model.config.vocab_size, 1, 2, 12, seed=3)
    (ref, ours), _ = modules_and_step(model, step, prompt, tokens)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)  # fused sums round differently
    assert not step.failed and graphs() == 1


@needs_compiler
def test_bf16_tensor_layers_equal_the_modules():
    model = make_model(CONFIGS["sinusoidal"])
    for block in model.h:  # the bf16 tensor layers, whichever bf16 kind this CPU's conversion picks
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, BF16Linear.from_linear(getattr(parent, name)))
    model.lm_head = BF16Linear(model.wte.weight)
    model.wte = LowPrecisionEmbedding(model.lm_head.weight)
    step = compiled_step(model)
    prompt, tokens = random_tokens(model.config.vocab_size, 1, 4, 10, seed=4)
    (ref, ours), _ = modules_and_step(model, step, prompt, tokens)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)
    assert not step.failed and graphs() == 1


def test_none_without_a_compiler(monkeypatch):
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    assert not compiler_available()
    assert compiled_step(make_model(CONFIGS["tiny"])) is None


@needs_compiler
def test_none_where_the_flat_step_does_not_apply():
    model = make_model(CONFIGS["tiny"]).train()
    assert compiled_step(model) is None


@pytest.mark.skipif(not fbgemm_half(), reason="FBGEMM's packed fp16 layer needs an x86 build of torch")
@needs_compiler
def test_none_for_packed_fp16_layers():
    model = make_model(CONFIGS["tiny"])
    model.lm_head = HalfPackedLinear(model.wte.weight)
    assert compiled_step(model) is None
    if fbgemm_int8():  # FBGEMM's packed int8 layers (int8 on x86 CPUs with AVX2) do not trace either
        assert compiled_step(convert_int8(make_model(CONFIGS["tiny"]).eval(), "fbgemm")) is None


@needs_compiler
def test_unknown_layer_kind_is_refused_by_name():
    with pytest.raises(TypeError, match="Identity"):
        compiled_module.linear_function(nn.Identity())


def test_a_failed_compile_falls_back_to_the_flat_step(monkeypatch):
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no compiler")

    monkeypatch.setattr(compiled_module, "compiler_available", lambda: True)
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **kwargs: broken)
    model = make_model(CONFIGS["tiny"])
    step = compiled_step(model)
    prompt, tokens = random_tokens(model.config.vocab_size, 2, 3, 4, seed=5)
    with pytest.warns(UserWarning, match="no compiler"):
        (ref, ours), _ = modules_and_step(model, step, prompt, tokens)
    assert step.failed
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)


def test_bad_cache_is_refused(monkeypatch):
    monkeypatch.setattr(compiled_module, "compiler_available", lambda: True)
    model = make_model(CONFIGS["tiny"])
    step = compiled_step(model)
    cache = KVCache.for_model(model, 2, 4)
    cache.advance(4)
    with pytest.raises(ValueError, match="overflow"):
        step(torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="2 active rows, got 3"):
        step(torch.zeros(3, dtype=torch.long), KVCache.for_model(model, 2, 4))


def test_model_is_left_unchanged(monkeypatch):
    monkeypatch.setattr(compiled_module, "compiler_available", lambda: True)
    model = make_model(CONFIGS["tiny"])
    before = copy.deepcopy(model.state_dict())
    compiled_step(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_int8_layers_compile_without_torchs_private_int8_kernel(monkeypatch):
    """Where a torch build lacks _weight_int8pack_mm, the compiled step's int8 layers multiply by the widened
    weight (the same weights, float32 activations)."""
    from gpt2lab import compiled_step, quantize
    from gpt2lab.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 64)
    monkeypatch.setattr(quantize, "INT8PACK", False)
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    widened = layer.weight.float() * layer.kernel_scale.float()[:, None]
    got = compiled_step._int8_linear(layer.weight, layer.kernel_scale, layer.bias)(x)
    torch.testing.assert_close(got, x @ widened.t() + linear.bias, rtol=1e-5, atol=1e-5)
