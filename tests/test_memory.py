"""Weights moved into huge-page memory keep their values, identities and ties, and stay usable for everything a
model does (decode, train, save, copy)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gpt2lab import GPT, GPTConfig, memory
from gpt2lab.quantize import BF16Linear, LowPrecisionEmbedding

needs_thp = pytest.mark.skipif(not memory.huge_pages_supported(), reason="no transparent huge pages on this platform")
BIG = (512, 1024)  # 2 MiB of float32: the smallest tensor that moves


@needs_thp
def test_huge_page_empty_is_aligned_and_writable():
    t = memory.huge_page_empty(BIG, torch.float32)
    assert t.shape == BIG and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()
    b = memory.huge_page_empty((3, 5), torch.bfloat16)
    assert b.shape == (3, 5) and b.dtype == torch.bfloat16


def tied_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=8192, n_ctx=16, n_layer=1, n_head=2, n_embd=64)).eval()  # wte: 2 MiB


@needs_thp
def test_big_parameters_move_with_their_values_identity_and_tie():
    model = tied_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    small = model.h[0].mlp.c_fc.weight.data_ptr()
    moved = memory.use_huge_pages(model)
    assert moved == 8192 * 64 * 4  # only the tied table is big enough, counted once
    assert model.wte.weight.data_ptr() % memory.HUGE_PAGE == 0
    assert model.lm_head.weight is model.wte.weight  # the tie holds
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.h[0].mlp.c_fc.weight.data_ptr() == small  # small tensors stay where they are
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    ptr = model.wte.weight.data_ptr()
    assert memory.use_huge_pages(model) == 0 and model.wte.weight.data_ptr() == ptr  # already there: no second copy


@needs_thp
def test_a_moved_model_decodes_trains_saves_and_copies_as_before(tmp_path):
    reference, model = tied_model(), tied_model()
    memory.use_huge_pages(model)
    idx = torch.randint(0, 8192, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx))
    assert torch.equal(model.generate(idx, 5, temperature=0), reference.generate(idx, 5, temperature=0))
    clone = copy.deepcopy(model)
    assert torch.equal(clone.wte.weight, model.wte.weight) and clone.lm_head.weight is clone.wte.weight
    for m in (model, reference):  # one optimizer step each, from the same start
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.loss(idx[:, :-1], idx[:, 1:]).backward() if hasattr(m, "loss") else None
        opt.step()
    assert torch.equal(model.wte.weight, reference.wte.weight)
    model.eval().save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.wte.weight, model.wte.weight)
    assert loaded.wte.weight.data_ptr() % memory.HUGE_PAGE == 0  # loading puts big weights in huge pages too


@needs_thp
def test_a_buffer_held_by_two_modules_moves_once_and_stays_shared():
    table = torch.randn(2 * BIG[0], BIG[1])  # 2 MiB in bf16
    holder = nn.Module()
    holder.head = BF16Linear(table)
    holder.embed = LowPrecisionEmbedding(holder.head.weight)  # the same bf16 tensor, as prepare_for_inference ties
    values = holder.embed.weight.clone()
    assert memory.use_huge_pages(holder) == table.numel() * 2
    assert holder.head.weight is holder.embed.weight
    assert holder.embed.weight.data_ptr() % memory.HUGE_PAGE == 0
    assert torch.equal(holder.embed.weight, values)


@needs_thp
def test_views_and_small_tensors_are_left_alone_and_copy_false_keeps_the_shape():
    base = torch.randn(2 * BIG[0], BIG[1])
    holder = nn.Module()
    holder.register_buffer("top", base[:BIG[0]])  # two views of one storage: neither may move alone
    holder.register_buffer("bottom", base[BIG[0]:])
    holder.register_buffer("small", torch.randn(4, 4))
    assert memory.use_huge_pages(holder) == 0
    assert holder.top.data_ptr() == base.data_ptr()
    lone = nn.Linear(BIG[1], BIG[0], bias=False)
    assert memory.use_huge_pages(lone, copy=False) == BIG[0] * BIG[1] * 4
    assert lone.weight.shape == BIG and lone.weight.data_ptr() % memory.HUGE_PAGE == 0


def test_without_huge_pages_nothing_moves(monkeypatch):
    monkeypatch.setattr(memory, "huge_pages_supported", lambda: False)
    model = tied_model()
    ptr = model.wte.weight.data_ptr()
    assert memory.use_huge_pages(model) == 0 and model.wte.weight.data_ptr() == ptr


@needs_thp
def test_a_loaded_sinusoidal_model_keeps_its_position_table(tmp_path):
    """The fixed sinusoids are not in the file; a table of 2 MiB or more must not be left as empty huge pages."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=1024, n_layer=1, n_head=2, n_embd=512, pos_encoding="sinusoidal")).eval()
    assert model.wpe.weight.numel() * 4 >= memory.HUGE_PAGE
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.wpe.weight, model.wpe.weight)
    idx = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
