"""The fused LM head + cross-entropy (gpt2lab.loss) against F.cross_entropy on the plain logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.loss import IGNORE_INDEX, LogitsWorkspace, cross_entropy, fused_loss_applies, linear_cross_entropy


def _plain(h, w, y):
    return F.cross_entropy((h @ w.t()).view(-1, w.size(0)), y.view(-1), ignore_index=IGNORE_INDEX)


def _inputs(n=24, c=16, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, requires_grad=True)
    w = torch.randn(v, c, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _grads(loss_fn, h, w, y, grad_scale=1.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(h, w, y)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_matches_cross_entropy_value_and_gradients(grad_scale):
    h, w, y = _inputs()
    ours = _grads(lambda *a: linear_cross_entropy(*a), h, w, y, grad_scale)
    ref = _grads(_plain, h, w, y, grad_scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_targets_are_skipped_like_cross_entropy():
    h, w, y = _inputs()
    y[::3] = IGNORE_INDEX
    ours = _grads(lambda *a: linear_cross_entropy(*a), h, w, y)
    ref = _grads(_plain, h, w, y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1][::3].abs().max() == 0  # ignored rows get no gradient


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    h, w, y = _inputs()
    y[:] = IGNORE_INDEX
    loss, gh, gw = _grads(lambda *a: linear_cross_entropy(*a), h, w, y)
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_workspace_buffer_is_reused_between_steps_and_returned_without_grad():
    h, w, y = _inputs()
    ws = LogitsWorkspace()
    linear_cross_entropy(h, w, y, ws).backward()
    first = ws._free
    assert first is not None and first.shape == (h.size(0), w.size(0))
    linear_cross_entropy(h, w, y, ws).backward()
    assert ws._free is first  # the same storage served the second step
    with torch.no_grad():
        linear_cross_entropy(h, w, y, ws)
    assert ws._free is first
    ws.clear()
    assert ws._free is None


def test_two_losses_before_one_backward_do_not_share_a_buffer():
    h, w, y = _inputs()
    ws = LogitsWorkspace()
    y2 = y.flip(0)
    total = linear_cross_entropy(h, w, y, ws) + linear_cross_entropy(h, w, y2, ws)
    ref = _plain(h, w, y) + _plain(h, w, y2)
    torch.testing.assert_close(total, ref)
    gh, gw = torch.autograd.grad(total, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_second_backward_through_the_same_graph_is_refused():
    h, w, y = _inputs()
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_model_loss_equals_plain_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=211)).train()
    twin = copy.deepcopy(model)
    x = torch.randint(0, 211, (3, 20))
    y = torch.randint(0, 211, (3, 20))
    torch.manual_seed(1)
    ours = model.loss(x, y)
    torch.manual_seed(1)  # same dropout masks
    ref = cross_entropy(twin(x), y)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_model_loss_falls_back_to_the_plain_path_under_autocast():
    model = GPT(GPTConfig.preset("tiny", vocab_size=101)).eval()
    x = torch.randint(0, 101, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_loss_applies(torch.zeros(1), model.lm_head.weight)
        loss = model.loss(x, x)
    assert model.logits_workspace._free is None  # the fused path did not run
    torch.testing.assert_close(loss, cross_entropy(model(x), x), rtol=2e-2, atol=2e-2)


def test_model_loss_checks_the_target_shape():
    model = GPT(GPTConfig.preset("tiny", vocab_size=101))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model.loss(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


def test_workspace_is_not_part_of_the_state_dict():
    model = GPT(GPTConfig.preset("tiny", vocab_size=101))
    x = torch.randint(0, 101, (2, 8))
    model.loss(x, x).backward()
    assert not any("workspace" in k for k in model.state_dict())
