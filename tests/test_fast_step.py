"""The flat decode step computes what the modules compute, and is used only where it can.

Oracle: the model's own forward at T = 1 with the same KV cache (itself tested against no cache and transformers).
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2lab import GPT
from gpt2lab.fast_step import FlatStep
from gpt2lab.generate import Decoder, generate
from gpt2lab.inference import prepare_for_inference
from gpt2lab.model import Block

from conftest import CONFIGS, assert_step_refuses_a_full_cache_or_wrong_batch, make_model, modules_and_step  # the config families and sharpened weights shared with test_generate


def both_paths(model: GPT, prompt: torch.Tensor, tokens: list[torch.Tensor], positions=None, mask=None):
    """Logits of each step through the modules and through FlatStep, from two caches filled by the same prefill."""
    return modules_and_step(model, FlatStep(model), prompt, tokens, positions, mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flat_step_equals_the_modules(name):
    model = make_model(CONFIGS[name])
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (3, 5), generator=g)
    tokens = [torch.randint(0, V, (3,), generator=g) for _ in range(6)]
    (ref, fast), caches = both_paths(model, prompt, tokens)
    for a, b in zip(ref, fast):
        assert b.shape == (3, V)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert caches[0].length == caches[1].length == 11
    # float32 both ways; the decode kernel sums in another order than nn.Linear, hence the float32 tolerance
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=1e-5)


def test_flat_step_with_left_padding_equals_the_modules():
    model = make_model(CONFIGS["tiny"])
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 97, (2, 6), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # row 0 has three padding tokens on the left
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, 10)
    tokens = [torch.randint(0, 97, (2,), generator=g) for _ in range(4)]
    (ref, fast), _ = both_paths(model, prompt, tokens, positions, mask)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,threads", [("fp32", 2), ("fp32", 1), ("bf16", 2), ("int8", 2)])
def test_flat_step_on_inference_layers_equals_their_modules(dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # fp32 prepared under one thread stores wide layers transposed
    try:
        model = prepare_for_inference(make_model(CONFIGS["wide"]), dtype)
    finally:
        torch.set_num_threads(before)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 211, (2, 4), generator=g)
    tokens = [torch.randint(0, 211, (2,), generator=g) for _ in range(3)]
    (ref, fast), _ = both_paths(model, prompt, tokens)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_generate_uses_the_step_only_where_it_applies():
    model = make_model(CONFIGS["tiny"])
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    assert FlatStep.applies(model)
    assert Decoder(model, prompt, max_new_tokens=3).fast_step is not None
    expected = generate(model, prompt, 8, temperature=0)

    calls = []
    handle = model.h[0].register_forward_hook(lambda *args: calls.append(1))
    assert not FlatStep.applies(model)  # a hook must see every step, so the modules run
    assert torch.equal(generate(model, prompt, 8, temperature=0), expected)
    assert len(calls) == 8  # the prefill and the 7 steps after it all went through the block
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)  # a hook on every module
    assert not FlatStep.applies(model)
    handle.remove()
    assert FlatStep.applies(model)

    model.h[0].attn.use_sdpa = False  # the explicit attention path is the modules' alone
    assert not FlatStep.applies(model)
    model.h[0].attn.use_sdpa = True

    class CustomBlock(Block):
        pass

    custom = copy.deepcopy(model)
    custom.h[1].__class__ = CustomBlock  # a subclass may change forward: not the stock block
    assert not FlatStep.applies(custom)
    assert not FlatStep.applies(copy.deepcopy(model).train())


def test_flat_step_refuses_a_full_cache_or_wrong_batch():
    model = make_model(CONFIGS["tiny"])
    assert_step_refuses_a_full_cache_or_wrong_batch(model, FlatStep(model))


def test_the_old_module_name_still_imports_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("gpt2lab.decode_step", None)
    with pytest.warns(DeprecationWarning, match="fast_step"):
        old = importlib.import_module("gpt2lab.decode_step")
    assert old.DecodeStep is FlatStep
