"""The GPT that users import (`from gpt2lab import GPT`): the network of model.py plus loading, saving and generation.

    >>> model = GPT.from_pretrained("gpt2")                                   # doctest: +SKIP
    >>> out = model.generate(torch.tensor([[50256]]), 20, temperature=0.8)    # doctest: +SKIP
    >>> model.save_pretrained("out/my-gpt2")                                  # doctest: +SKIP

Why a subclass: `transformers` habits put `from_pretrained` and `generate` on the model class, which makes the model
file depend on checkpoint I/O and on decoding, which in turn depend on the model. Here model.py stays the ground floor
(it imports only config and loss, and reads top to bottom), and these methods live one floor up, above the code they
call. An instance of this class is a `gpt2lab.model.GPT` in every other way: same modules, same state dict.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gpt2lab import model
from gpt2lab.checkpoint import load_model, save_model
from gpt2lab.generate import generate


class GPT(model.GPT):
    """`gpt2lab.model.GPT` with `from_pretrained`, `save_pretrained` and `generate`."""

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike[str], **kwargs: Any) -> GPT:
        """Load a model directory in Hugging Face's GPT-2 layout, or an official checkpoint by hub name ("gpt2").

        `kwargs` are `checkpoint.load_model`'s (device, dtype, offline); the model comes back in eval mode.
        """
        return load_model(path_or_name, model_class=cls, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike[str], tokenizer: Any = None, overwrite: bool = False) -> None:
        """Write `config.json` + `model.safetensors` (GPT2LMHeadModel's names and layout) atomically, plus the
        tokenizer's files when one is given. An existing model directory is replaced only with `overwrite`, and
        a directory holding other files is refused (see `gpt2lab.files`)."""
        save_model(self, directory, tokenizer=tokenizer, overwrite=overwrite)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Extend `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + max_new_tokens). `kwargs` are those
        of `gpt2lab.generate.generate` (temperature, top_k, top_p, repetition_penalty, eos_token_id, generator,
        attention_mask, make_step)."""
        return generate(self, idx, max_new_tokens, **kwargs)
