"""Model directories: safetensors I/O, atomic writes, and the Hugging Face GPT-2 layout both ways.

A gpt2lab model directory *is* a Hugging Face GPT-2 directory:

    config.json          GPT2Config's field names (n_positions, n_embd, activation_function, ...)
    model.safetensors    GPT2LMHeadModel's tensor names, Linear weights stored (in, out) as its Conv1D expects

so `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads what we save, and we load what it saves (or the official
checkpoints). Fields that GPT-2 lacks (sinusoidal positions, bias-free layers) travel under a "gpt2lab" key that
other readers ignore, and are exported in a form they can still run: the fixed sinusoid table as `wpe`, zeros for
absent biases.

Loading never unpickles: safetensors, or `torch.load(weights_only=True)` for `pytorch_model.bin`. A file with missing,
unexpected or wrongly shaped tensors is refused before anything is copied into the model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab import files
from gpt2lab.config import GPTConfig
from gpt2lab.download import read_json
from gpt2lab.files import OutputKind, read_json_field
from gpt2lab.model import GPT
from gpt2lab.tokenizer import TOKENIZER_FILES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"

# our activation name <-> Hugging Face's `activation_function`
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                      "gelu": "gelu", "relu": "relu"}

# Official GPT-2 checkpoints by hub name. Any "owner/name" is also tried as a hub repository.
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]

# Buffers some checkpoints carry (the causal mask, stored per layer); they are constants, not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Weights that the official checkpoints store as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# --------------------------------------------------------------------------------------------------------- config
def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> a `config.json` dict that `transformers.GPT2Config` reads."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": ACTIVATION_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
        "gpt2lab": {"pos_encoding": config.pos_encoding, "bias": config.bias, "activation": config.activation},
    }


def config_from_hf(data: Mapping[str, Any], source: str = CONFIG_FILE) -> GPTConfig:
    """A Hugging Face GPT-2 `config.json` dict -> GPTConfig, refusing features this model does not implement."""
    if data.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type {data.get('model_type')!r} is not a GPT-2 model (expected 'gpt2')")
    act = data.get("activation_function", "gelu_new")
    if act not in ACTIVATION_FROM_HF:
        raise ValueError(f"{source}: activation_function {act!r} is not supported; allowed: {', '.join(ACTIVATION_FROM_HF)}")
    n_embd = data.get("n_embd", 768)
    if data.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{source}: n_inner={data['n_inner']} is not supported (gpt2lab's MLP is 4 * n_embd = {4 * n_embd})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if data.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported by gpt2lab")
    if data.get("scale_attn_weights", True) is False:
        raise ValueError(f"{source}: scale_attn_weights=false is not supported by gpt2lab")
    if data.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{source}: tie_word_embeddings=false is not supported (GPT-2's LM head is the token embedding)")
    extra = data.get("gpt2lab", {})
    return GPTConfig(
        vocab_size=data.get("vocab_size", 50257),
        n_ctx=data.get("n_positions", data.get("n_ctx", 1024)),
        n_layer=data.get("n_layer", 12),
        n_head=data.get("n_head", 12),
        n_embd=n_embd,
        activation=extra.get("activation", ACTIVATION_FROM_HF[act]),
        pos_encoding=extra.get("pos_encoding", "learned"),
        dropout=float(data.get("resid_pdrop", 0.0)),
        layer_norm_eps=float(data.get("layer_norm_epsilon", 1e-5)),
        bias=extra.get("bias", True),
    )


def read_config(directory: str | os.PathLike[str]) -> GPTConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; a model directory holds config.json and model.safetensors")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return config_from_hf(data, str(path))


# --------------------------------------------------------------------------------------------------- tensor names
def hf_names(config: GPTConfig) -> list[str]:
    """GPT2LMHeadModel's tensor names for this config, in model order (no lm_head: it is the tied wte)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        names += [p + "ln_1.weight", p + "ln_1.bias", p + "attn.c_attn.weight", p + "attn.c_attn.bias",
                  p + "attn.c_proj.weight", p + "attn.c_proj.bias", p + "ln_2.weight", p + "ln_2.bias",
                  p + "mlp.c_fc.weight", p + "mlp.c_fc.bias", p + "mlp.c_proj.weight", p + "mlp.c_proj.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def _our_name(hf_name: str) -> str:
    return hf_name.removeprefix("transformer.")


def export_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under GPT2LMHeadModel's names and layout: Conv1D weights transposed to (in, out), the sinusoid
    table written as `wpe`, zeros where a bias-free model has no bias. Tensors are contiguous fp32 copies (or the
    model's dtype) safe to hand to safetensors."""
    ours = dict(model.state_dict())
    shapes = expected_shapes(model.config)
    if model.config.pos_encoding == "sinusoidal":
        ours["wpe.weight"] = model.wpe.weight
    foreign = sorted(set(ours) - {_our_name(n) for n in shapes} - {"lm_head.weight"})
    lossy = sorted(n for n, t in ours.items() if not t.is_floating_point())
    if foreign or lossy:  # e.g. int8 weights and their scales after prepare_for_inference
        raise ValueError(f"cannot export: the model holds tensors a GPT-2 checkpoint has no place for "
                         f"({_clip(foreign + lossy)}); was it converted with prepare_for_inference? "
                         "save the original floating-point model instead")
    out: dict[str, torch.Tensor] = {}
    for hf_name in hf_names(model.config):
        name = _our_name(hf_name)
        if name in ours:
            t = ours[name].detach()
        elif name.endswith(".bias") and not model.config.bias:  # a bias the model does not have: zero is the same
            t = torch.zeros(shapes[hf_name], dtype=model.wte.weight.dtype)
        else:
            raise ValueError(f"cannot export: the model has no tensor {name!r} (was it converted for inference with "
                             "prepare_for_inference? save the original fp32 model instead)")
        if tuple(t.shape) != (shapes[hf_name][::-1] if hf_name.endswith(CONV1D_SUFFIXES) else shapes[hf_name]):
            raise ValueError(f"cannot export: {name!r} has shape {tuple(t.shape)}, not that of a plain GPT-2 layer")
        if hf_name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[hf_name] = t.contiguous().cpu().clone()
    return out


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor in the Hugging Face layout: the yardstick a file is checked against before loading."""
    C, V, F = config.n_embd, config.vocab_size, config.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (config.n_ctx, C),
                                          "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    per_layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}
    for i in range(config.n_layer):
        for k, s in per_layer.items():
            shapes[f"transformer.h.{i}.{k}"] = s
    return shapes


def normalize_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a checkpoint's names to GPT2LMHeadModel's: the official files were saved from GPT2Model, without the
    `transformer.` prefix; the attention-mask buffers some files carry are dropped."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if not name.startswith("transformer.") and name != "lm_head.weight":
            name = "transformer." + name
        out[name] = t
    return out


def import_state_dict(model: GPT, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-layout tensors into `model`, after checking that the names and shapes match exactly.

    Raises ValueError naming every missing, unexpected or wrongly shaped tensor; nothing is copied in that case.
    """
    config = model.config
    tensors = normalize_names(tensors)
    lm_head = tensors.pop("lm_head.weight", None)
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    wrong = [f"{n} {tuple(tensors[n].shape)} (expected {shapes[n]})" for n in shapes
             if n in tensors and tuple(tensors[n].shape) != shapes[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_clip(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_clip(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match the config ({config.n_layer} layers, n_embd={config.n_embd}, "
                         f"vocab_size={config.vocab_size}): " + "; ".join(problems))
    if lm_head is not None and not torch.equal(lm_head, tensors["transformer.wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but GPT-2's LM head is tied to the embedding")
    _check_fixed_tensors(config, tensors, source)

    ours = model.state_dict()
    with torch.no_grad():
        for hf_name, t in tensors.items():
            name = _our_name(hf_name)
            if hf_name.endswith(CONV1D_SUFFIXES):
                t = t.t()
            if name in ours:
                ours[name].copy_(t)


def _check_fixed_tensors(config: GPTConfig, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """A sinusoidal model's `wpe` and a bias-free model's biases are not parameters: they must hold what we would
    export, or the file belongs to a different model."""
    if config.pos_encoding == "sinusoidal":
        from gpt2lab.model import sinusoidal_table

        if not torch.allclose(tensors["transformer.wpe.weight"].float(), sinusoidal_table(config.n_ctx, config.n_embd), atol=1e-4):
            raise ValueError(f"{source}: config says sinusoidal positions but wpe holds a different (learned?) table")
    if not config.bias:
        nonzero = [n for n, t in tensors.items() if n.endswith(".bias") and bool(t.any())]
        if nonzero:
            raise ValueError(f"{source}: config says bias=false but these biases are non-zero: {_clip(nonzero)}")


def _clip(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------- reading files
def read_weights(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: model.safetensors, a sharded safetensors index, or pytorch_model.bin
    (read with `weights_only=True`, which refuses arbitrary pickled objects). A truncated or corrupt file raises
    ValueError naming it."""
    d = Path(directory)
    if (d / WEIGHTS_FILE).is_file():
        return _read_safetensors(d / WEIGHTS_FILE)
    if (d / WEIGHTS_INDEX_FILE).is_file():
        index = read_json(d / WEIGHTS_INDEX_FILE)
        if not isinstance(index, dict):
            raise ValueError(f"{d / WEIGHTS_INDEX_FILE}: expected a JSON object")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            tensors.update(_read_safetensors(d / shard))
        return tensors
    if (d / PICKLE_WEIGHTS_FILE).is_file():
        try:
            data = torch.load(d / PICKLE_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad or unsafe pickle
            raise ValueError(f"{d / PICKLE_WEIGHTS_FILE}: cannot be read safely ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{d / PICKLE_WEIGHTS_FILE}: expected a dict of tensors")
        return data
    raise FileNotFoundError(f"{d}: no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {PICKLE_WEIGHTS_FILE} found")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}") from None


# ------------------------------------------------------------------------------------------------- load and save
def resolve_model_dir(path_or_name: str | os.PathLike[str], offline: bool = False) -> Path:
    """A local directory as is; a hub name ("gpt2", "openai-community/gpt2") downloaded once into the Hugging Face
    cache. Without network this fails within seconds and says how to pass a local directory instead."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    name = str(path_or_name)
    looks_like_hub = name in HUB_NAMES or (name.count("/") == 1 and not name.startswith((".", "/", "~")))
    if not looks_like_hub:
        raise FileNotFoundError(f"model directory {name!r} does not exist; pass a directory with config.json and "
                                f"model.safetensors, or a hub name such as {', '.join(HUB_NAMES)}")
    return download_from_hub(HUB_NAMES.get(name, name), offline=offline)


def download_from_hub(repo_id: str, offline: bool = False, timeout: float = 10.0) -> Path:
    """Fetch a GPT-2 checkpoint from the Hugging Face Hub into its cache (a second call reads the cache)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # already cached: no network needed
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConnectionError(f"{repo_id!r} is not in the local Hugging Face cache and offline mode is on; "
                              "pass a local model directory (config.json + model.safetensors) instead")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, repo not found)
        raise ConnectionError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "without network access, pass a local model directory instead (a directory with config.json and "
            "model.safetensors, e.g. one written by save_pretrained or `huggingface-cli download` on another machine)"
        ) from None


def load_model(path_or_name: str | os.PathLike[str], device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, offline: bool = False) -> GPT:
    """Build a GPT from a model directory or hub name, check every tensor, and load it (eval mode)."""
    directory = resolve_model_dir(path_or_name, offline=offline)
    config = read_config(directory)
    tensors = read_weights(directory)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.pos_encoding == "sinusoidal":  # buffers are not in the file's state; rebuild them after to_empty
        from gpt2lab.model import sinusoidal_table

        model.wpe.weight = sinusoidal_table(config.n_ctx, config.n_embd)
    model.lm_head.weight = model.wte.weight  # to_empty keeps the tie, but be explicit
    import_state_dict(model, tensors, source=str(directory))
    model.eval()
    return model.to(device=device, dtype=dtype) if (dtype is not None or str(device) != "cpu") else model


def _is_model_directory(directory: Path) -> bool:
    """A model directory gpt2lab wrote: config.json carries gpt2lab's own key (`config_to_hf` writes it), beside
    model.safetensors."""
    return read_json_field(directory / CONFIG_FILE, "gpt2lab") is not None and (directory / WEIGHTS_FILE).is_file()


MODEL_DIRECTORY = OutputKind("gpt2lab model directory", _is_model_directory,
                             (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES))


def atomic_directory(destination: str | os.PathLike[str], kind: OutputKind = MODEL_DIRECTORY,
                     overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """`files.atomic_directory` for model directories (a training checkpoint is one): a temp directory that
    replaces `destination` in one rename on success, and is removed on failure."""
    return files.atomic_directory(destination, kind, overwrite)


def write_model_files(model: GPT, directory: str | os.PathLike[str]) -> None:
    """Write config.json and model.safetensors into an existing directory (non-atomic; use inside
    `atomic_directory`)."""
    d = Path(directory)
    (d / CONFIG_FILE).write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n", encoding="utf-8")
    save_file(export_state_dict(model), str(d / WEIGHTS_FILE), metadata={"format": "pt", "producer": "gpt2lab"})


def save_model(model: GPT, directory: str | os.PathLike[str], tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Save atomically: config.json + model.safetensors (+ the tokenizer's files). Returns the directory.

    `directory` must be new, empty, or (with `overwrite`) a model directory gpt2lab wrote; files there that
    gpt2lab does not write are kept.
    """
    with atomic_directory(directory, MODEL_DIRECTORY, overwrite) as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
