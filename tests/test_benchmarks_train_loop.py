"""benchmarks/train_loop.py: its nanoGPT stand-in computes what gpt2lab's model computes on the same weights, draws
batches and sets the rate as nanoGPT's train.py does, and both loops run. (The speed itself is measured, not tested.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.data import TokenData
from gpt2lab.model import GPT

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_loop.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_loop")


@pytest.mark.parametrize("bias", [False, True])
def test_the_stand_in_model_is_gpt2labs_model_with_nanogpts_loss(bench, bias):
    """Same parameter names, same loss on the same weights: the two loops train the same function."""
    torch.manual_seed(0)
    nano = bench.NanoGPT(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias)
    ours = GPT(GPTConfig(vocab_size=13, n_ctx=16, n_layer=2, n_head=2, n_embd=32, bias=bias, activation="gelu"))
    assert set(nano.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(nano.state_dict())
    x, y = torch.randint(0, 13, (3, 16)), torch.randint(0, 13, (3, 16))
    logits, loss = nano(x, y)
    torch.testing.assert_close(logits, ours(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ours.loss(x, y), rtol=1e-5, atol=1e-6)
    assert nano.wte.weight is nano.lm_head.weight


def test_nanogpt_schedule_warms_up_then_decays_to_min_lr(bench):
    r = bench.RECIPE
    assert bench.nano_lr(0, 2000) == pytest.approx(r["lr"] / (r["warmup"] + 1))
    assert bench.nano_lr(r["warmup"], 2000) == pytest.approx(r["lr"])
    assert bench.nano_lr(2000, 2000) == pytest.approx(r["min_lr"]) and bench.nano_lr(2500, 2000) == r["min_lr"]
    middle = r["warmup"] + (2000 - r["warmup"]) // 2  # half way down the cosine: half way between the rates
    assert bench.nano_lr(middle, 2000) == pytest.approx((r["lr"] + r["min_lr"]) / 2)


def test_nanogpt_batches_are_windows_of_train_bin_and_targets_shift_by_one(bench, tmp_path):
    tokens = np.arange(500, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    x, y = bench.nano_batch(tmp_path, "train")
    B, T = bench.RECIPE["batch_size"], bench.RECIPE["block_size"]
    assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1) and int(y.max()) < 500


def test_both_loops_run_the_recipe(bench, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    ours, nano, vocab = bench.prepare(str(text), tmp_path)
    assert (nano / "train.bin").stat().st_size == 2 * TokenData(ours).tokens("train")
    before = torch.get_num_threads()
    a = bench.run_nanogpt(nano, tmp_path, steps=3, threads=1, vocab_size=vocab, bias=False)
    b = bench.run_gpt2lab(ours, tmp_path / "run", steps=3, threads=1, bias=False, compile=False)
    torch.set_num_threads(before)
    assert a["steps"] == b["steps"] == 3 and a["seconds"] > 0 and b["seconds"] > 0
    assert (tmp_path / "run" / "last").is_dir()
