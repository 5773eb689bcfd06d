"""The optimizer (train/optim.py): the learning-rate schedule, AdamW's parameter groups, Muon for the matrices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_run
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


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=2, n_head=2, n_embd=8))
    opt = T.make_optimizer(model, TrainConfig(model=model.config, seq_len=8, optimizer="muon", lr=1e-3,
                                              muon_lr=0.02), torch.device("cpu"))
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h."))
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert "wte.weight" in in_adamw and "ln_f.weight" in in_adamw and not set(in_muon) & set(in_adamw)
    T.set_learning_rate(opt, 5e-4)  # half the peak: both halves follow the one schedule
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4, 5e-4])


def test_orthogonalise_flattens_the_singular_values():
    g = torch.randn(3, 16, 48) * torch.logspace(-2, 1, 48)  # (L, R, K), singular values spread over 3 decades
    s = torch.linalg.svdvals(T.optim.orthogonalise(g))  # (L, 16)
    assert s.shape == (3, 16) and s.min() > 0.5 and s.max() < 1.3
    assert T.optim.orthogonalise(g.mT).shape == (3, 48, 16)  # tall matrices come back tall


def test_muon_steps_like_torch_muon():
    """Our Muon (fp32 Newton-Schulz, matrices batched by shape) takes the step torch.optim.Muon takes (bf16)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in [(48, 16), (48, 16), (16, 64)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a, b = T.optim.Muon(ours, lr=0.02, weight_decay=0.1), torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        ours_moved, theirs_moved = (p - p0).detach(), (q - p0).detach()
        assert (ours_moved - theirs_moved).norm() < 0.03 * theirs_moved.norm()  # bf16 rounding in theirs


def test_muon_honours_a_closure_as_torch_optimizers_do():
    """step(closure) evaluates the loss with gradients, returns it and steps on those gradients: the same update as
    a backward pass followed by step()."""
    torch.manual_seed(0)
    target = torch.randn(16, 8)
    weights = [torch.nn.Parameter(torch.randn(16, 8) * 0.1) for _ in range(2)]
    for p in weights[1:]:
        p.data.copy_(weights[0].data)
    by_closure, by_hand = T.optim.Muon([weights[0]], lr=0.02), T.optim.Muon([weights[1]], lr=0.02)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        by_closure.zero_grad()
        loss = ((weights[0] - target) ** 2).sum()
        loss.backward()
        return loss

    returned = by_closure.step(closure)
    ((weights[1] - target) ** 2).sum().backward()
    assert by_hand.step() is None
    assert calls == [True] and torch.is_tensor(returned) and returned.item() > 0
    assert not torch.equal(weights[0], target) and torch.equal(weights[0], weights[1])


def test_muon_adamw_runs_the_closure_once_and_returns_its_loss():
    model = GPT(GPTConfig(n_ctx=8, n_layer=1, n_head=2, n_embd=16, vocab_size=11))
    optimizer = T.make_optimizer(model, TrainConfig(model=model.config, seq_len=8, optimizer="muon"),
                                 torch.device("cpu"))
    x = torch.randint(0, 11, (2, 8))
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = model.loss(x, x)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # Muon's and AdamW's moved


def test_muon_option_trains(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=40, eval_interval=40, warmup_steps=5, lr=1e-2,
                   optimizer="muon", muon_lr=0.05)
    losses = T.train(cfg, progress=False).losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_bad_optimizer_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"TrainConfig.optimizer 'sgd' is unknown; choose one of: adamw, muon"):
        TrainConfig(optimizer="sgd")
    for bad in (0.0, -1.0, float("nan"), "0.02", True):
        with pytest.raises(ValueError, match=r"TrainConfig.muon_lr must be"):
            TrainConfig(optimizer="muon", muon_lr=bad)


def test_resuming_with_the_other_optimizer_is_refused(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=4, optimizer="muon")
    T.train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"no exp_avg for h\.0\.attn\.c_attn\.weight; was it saved with another"):
        T.train(dataclasses.replace(cfg, optimizer="adamw", max_steps=8), resume=True, progress=False)
    T.train(dataclasses.replace(cfg, optimizer="adamw", max_steps=8), resume=True, fresh_optimizer=True, progress=False)
