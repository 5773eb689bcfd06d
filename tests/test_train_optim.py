"""The optimizer (train/optim.py): the learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import dataclasses

import pytest

from gpt2lab import train as T
from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.model import GPT


def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [T.learning_rate(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert T.learning_rate(20, cfg, time_fraction=1.0) == pytest.approx(0.1)  # the clock can end the decay early
    assert T.learning_rate(20, dataclasses.replace(cfg, decay_steps=30)) == pytest.approx(0.55)


def test_weight_decay_only_on_matrices_and_each_tensor_once():
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=2, n_head=2, n_embd=8))
    decay, no_decay = T.parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p is model.wte.weight for p in decay["params"]) == 1  # the tied LM head is not counted twice
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
