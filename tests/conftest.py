"""Shared fixtures. Files go under tmp_path only; models are tiny so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import GPT, GPTConfig


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tiny_model(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def hf_config(cfg: GPTConfig):
    """The transformers GPT2Config describing the same architecture (test oracle only)."""
    from transformers import GPT2Config

    from gpt2lab.checkpoint import ACTIVATION_TO_HF

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, activation_function=ACTIVATION_TO_HF[cfg.activation],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps)
