"""Shared fixtures. Files go under tmp_path only; models are tiny so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import GPT, GPTConfig
from gpt2lab.config import TrainConfig
from gpt2lab.data import prepare


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


# ------------------------------------------------------------------------------------- training (tests/test_train_*.py)
LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die: to sleep;", "No more; and by a sleep to say we end"]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A small char-level corpus (~12 KB), prepared once for the session."""
    root = tmp_path_factory.mktemp("char-data")
    text = "\n".join(LINES[(i * 7) % len(LINES)] for i in range(300)) + "\n"
    (root / "hamlet.txt").write_text(text)
    prepare(str(root / "hamlet.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


def tiny_run(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 32-wide run of 8 steps on `data_dir`, changed by `overrides`; fast enough for 2 CPU cores."""
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir),
                       model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32),
                       batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8,
                       eval_interval=4, eval_iters=2, log_interval=1, threads=1, seed=7)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint's model.safetensors, by name."""
    return load_file(str(directory / "model.safetensors"))
