"""Models ready for inference: loaded with their tokenizer, in eval mode, in an inference precision.

`load_for_inference` is what the CLI and the server call: a model directory or hub name in, the network in
`INFERENCE_DTYPES` and its tokenizer out. `prepare_for_inference` converts a model already in memory.
"""

from __future__ import annotations

from typing import Any

from gpt2lab.checkpoint import load_model, resolve_model_dir
from gpt2lab.model import GPT
from gpt2lab.quantize import WEIGHT_DTYPES, convert_weights, is_converted
from gpt2lab.tokenizer import load_tokenizer

INFERENCE_DTYPES = WEIGHT_DTYPES  # ("fp32", "bf16", "int8", "int4")


def prepare_for_inference(model: GPT, dtype: str = "fp32") -> GPT:
    """Put `model` in eval mode with its weights in the given inference precision, in place, and return it.

    - "fp32": the float32 weights themselves, same function: as they are where the native decode kernel is built
      (moved into 2 MiB pages), else in layers that decode faster.
    - "bf16": every linear layer and the tied LM head / embedding hold bfloat16 weights (half the bytes per token).
    - "int8": the same with int8 weights and one scale per output channel (a quarter of the bytes).
    - "int4": int4 weights in groups of 32 along each row, one scale per group (llama.cpp's q4_0 scheme: about a
      seventh of the bytes); the model's widths must be multiples of 32. Decoding is fast only through the native
      kernel; elsewhere the layers widen their weights to float32 every call.

    The low-precision modes change the weights: the residual stream, LayerNorm, attention and the KV cache stay
    float32 (int8's FBGEMM kernel, chosen on x86 CPUs with AVX2, also rounds each activation row to integers inside
    its matmul). Which layer each mode uses on which CPU is `gpt2lab.quantize.choose_kernels`'s business. A converted model is for inference;
    train and save the float32 one.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"unknown inference dtype {dtype!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    model.eval()
    if is_converted(model):
        raise ValueError("this model was already prepared for inference; prepare a freshly loaded model")
    return convert_weights(model, dtype)


def load_tokenizer_for(directory: str, vocab_size: int, tokenizer: str | None = None) -> Any:
    """The tokenizer of a model directory: `tokenizer` if given ("gpt2" or a directory), else the directory's own
    tokenizer files, else GPT-2's when the model has GPT-2's vocabulary size."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(str(directory))
    except FileNotFoundError:
        if vocab_size != 50257:
            raise FileNotFoundError(f"{directory} has no tokenizer files and its vocab_size ({vocab_size}) is not "
                                    "GPT-2's; pass --tokenizer or save the model with its tokenizer") from None
        return load_tokenizer("gpt2")


def load_for_inference(model: str, dtype: str = "fp32", tokenizer: str | None = None,
                       model_class: type[GPT] = GPT) -> tuple[GPT, Any]:
    """Load a model directory or hub name in an inference precision, with its tokenizer (see `load_tokenizer_for`).

    The network comes back as `model_class` (the bare `gpt2lab.model.GPT` by default; pass `gpt2lab.GPT` for its
    `.generate` and `.save_pretrained` methods)."""
    if dtype not in INFERENCE_DTYPES:  # before any loading or download
        raise ValueError(f"unknown inference dtype {dtype!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    directory = resolve_model_dir(model)
    network = prepare_for_inference(load_model(directory, model_class=model_class), dtype)
    return network, load_tokenizer_for(str(directory), network.config.vocab_size, tokenizer)
