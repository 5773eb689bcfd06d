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


# The config families of the generation and decode-step tests: learned and sinusoidal positions, three activations,
# with and without biases, one to four heads.
CONFIGS = {
    "tiny": GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16),
    "wide": GPTConfig(vocab_size=211, n_ctx=48, n_layer=3, n_head=4, n_embd=32, activation="gelu"),
    "relu-nobias": GPTConfig(vocab_size=64, n_ctx=40, n_layer=2, n_head=1, n_embd=24, activation="relu", bias=False),
    "sinusoidal": GPTConfig(vocab_size=80, n_ctx=24, n_layer=2, n_head=2, n_embd=16, pos_encoding="sinusoidal"),
}


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """An eval-mode GPT whose weights are 8x GPT-2's init, so its distributions are sharper and more varied."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model
