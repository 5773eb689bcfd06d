"""MFU (train/flops.py): FLOPs per training token and the hardware's peak."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import train as T
from gpt2lab.config import GPTConfig


def test_flops_and_peak_are_sane():
    cfg = GPTConfig.preset("gpt2")
    # 6N (N: the 85M block weights and the 38.6M LM head a token passes through) + attention 12·L·C·T
    assert T.flops_per_token(cfg, 1024) == 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert T.flops_per_token(cfg, 1024) == pytest.approx(6 * 124e6 + 113e6, rel=0.01)  # nanoGPT's estimate
    peak, how = T.peak_flops(torch.device("cpu"), "fp32", threads=2)
    assert peak > 1e9 and "FLOP/cycle" in how
