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
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from gpt2lab import files
from gpt2lab.config import GPTConfig
from gpt2lab.files import OutputKind, read_json_field
from gpt2lab.memory import use_huge_pages
from gpt2lab.model import GPT
from gpt2lab.model_files import (LOADABLE_DTYPES, MAX_CONFIG_BYTES, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE,
                                 WEIGHTS_INDEX_FILE, TensorSpec, check_hf_fields, layout_of, model_subdirectories,
                                 read_json_file, read_layout, read_tensors, weight_files)
from gpt2lab.tokenizer import TOKENIZER_FILES
from gpt2lab.tokenizer.formats import own_tokenizer_file

CONFIG_FILE = "config.json"

# our activation name <-> Hugging Face's `activation_function`
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                      "gelu": "gelu", "relu": "relu"}

# Official GPT-2 checkpoints by hub name. Any "owner/name" is also tried as a hub repository, unless `owner` is a
# local directory (then the path is local: "runs/x" when runs/ exists).
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]

# Buffers some checkpoints carry (the causal mask, stored per layer); they are constants, not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Weights that the official checkpoints store as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER_NAME = re.compile(r"transformer\.h\.(\d+)\.")


# --------------------------------------------------------------------------------------------------------- config
GPT2_EOT = 50256  # GPT-2's <|endoftext|>, its bos and eos


def config_to_hf(config: GPTConfig, eot: int | None = GPT2_EOT) -> dict[str, Any]:
    """GPTConfig -> a `config.json` dict that `transformers.GPT2Config` reads. `eot`: the tokenizer's end-of-text id,
    written as bos and eos (transformers' generate stops there); None, or an id past the vocabulary, writes null."""
    eot = eot if eot is not None and 0 <= eot < config.vocab_size else None
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
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
        "gpt2lab": {"pos_encoding": config.pos_encoding, "bias": config.bias, "activation": config.activation},
    }


def config_from_hf(data: Mapping[str, Any], source: str = CONFIG_FILE) -> GPTConfig:
    """A Hugging Face GPT-2 `config.json` dict -> GPTConfig, refusing features this model does not implement.

    Every field is checked by name before it is used, and GPTConfig's own checks (n_embd divisible by n_head, the
    size cap) are reported against `source`; nothing is allocated here.
    """
    check_hf_fields(data, source)
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
    try:
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
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_config(directory: str | os.PathLike[str]) -> GPTConfig:
    """The GPTConfig of a model directory's config.json, every field checked (see `config_from_hf`)."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(_no_config_message(d))
    return config_from_hf(read_json_file(path, MAX_CONFIG_BYTES), str(path))


def _no_config_message(directory: Path) -> str:
    """Why `directory` is not a model directory, naming the sub-directories that are (a run's best/ and last/)."""
    if not directory.is_dir():
        return f"no such directory: {str(directory)!r}"
    found = model_subdirectories(directory, CONFIG_FILE)
    if found:
        return (f"{directory} has no {CONFIG_FILE}, but these sub-directories hold a model: "
                f"{', '.join(map(str, found))}; pass one of them")
    return f"{directory}: no {CONFIG_FILE}; a model directory holds config.json and model.safetensors"


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


def normalize_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint's names to GPT2LMHeadModel's: the official files were saved from GPT2Model, without the
    `transformer.` prefix; the attention-mask buffers some files carry are dropped. Values (tensors or their
    TensorSpecs) pass through."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if not name.startswith("transformer.") and name != "lm_head.weight":
            name = "transformer." + name
        out[name] = t
    return out


def check_layout(config: GPTConfig, layout: Mapping[str, TensorSpec], source: str = "checkpoint") -> None:
    """Refuse tensors that do not fit `config`: dtypes, the sizes the config names, then every name and shape.
    Works on a file's header alone, so a bad file is refused before anything is allocated.

    The sizes come before the per-tensor comparison so that a config claiming, say, a million layers is refused in
    time proportional to the file, not to the claim. Raises ValueError naming the field, or every missing,
    unexpected or wrongly shaped tensor.
    """
    layout = normalize_names(layout)
    _check_dtypes(layout, source)
    lm_head = layout.pop("lm_head.weight", None)
    _check_sizes(config, layout, source)
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in layout]
    unexpected = [n for n in layout if n not in shapes]
    wrong = [f"{n} {layout[n].shape} (expected {shapes[n]})" for n in shapes if n in layout and layout[n].shape != shapes[n]]
    if lm_head is not None and lm_head.shape != shapes["transformer.wte.weight"]:
        wrong.append(f"lm_head.weight {lm_head.shape} (expected {shapes['transformer.wte.weight']})")
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


def _check_sizes(config: GPTConfig, layout: Mapping[str, TensorSpec], source: str) -> None:
    """More layers than the file holds, and vocab_size, n_ctx, n_embd against wte and wpe, each named. (Fewer
    layers than the file holds are reported tensor by tensor, which is then cheap.)"""
    layers = {m.group(1) for name in layout if (m := LAYER_NAME.match(name))}
    if config.n_layer > len(layers):
        raise ValueError(f"{source}: the config says n_layer={config.n_layer} but the weights hold {len(layers)} layers")
    for name, fields in (("transformer.wte.weight", ("vocab_size", "n_embd")), ("transformer.wpe.weight", ("n_ctx", "n_embd"))):
        expected = tuple(getattr(config, f) for f in fields)
        if name in layout and layout[name].shape != expected:
            said = ", ".join(f"{f}={v}" for f, v in zip(fields, expected))
            raise ValueError(f"{source}: the config says {said} but {name} has shape {layout[name].shape}")


def _check_dtypes(layout: Mapping[str, TensorSpec], source: str) -> None:
    """Only floating-point weights are loaded (and upcast); an int, bool or float64 tensor is refused, not cast."""
    bad = [f"{n} ({spec.dtype})" for n, spec in layout.items() if spec.dtype not in LOADABLE_DTYPES]
    if bad:
        raise ValueError(f"{source}: tensors of a dtype gpt2lab does not load: {_clip(bad)}; "
                         f"allowed: {', '.join(LOADABLE_DTYPES)}")


def import_state_dict(model: GPT, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-layout tensors into `model`, after checking that the names, shapes and dtypes match.

    Raises ValueError naming every missing, unexpected or wrongly shaped tensor; nothing is copied in that case.
    """
    config = model.config
    check_layout(config, layout_of(tensors), source)
    tensors = normalize_names(tensors)
    lm_head = tensors.pop("lm_head.weight", None)
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
    """All tensors of a model directory: model.safetensors, a sharded safetensors index (whose shards must lie
    inside the directory), or pytorch_model.bin (read with `weights_only=True`, which refuses arbitrary pickled
    objects). A truncated or corrupt file raises ValueError naming it."""
    return read_tensors(weight_files(Path(directory)))


def read_weight_layout(directory: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of every tensor of a model directory, from the safetensors headers alone."""
    return read_layout(weight_files(Path(directory)))


# ------------------------------------------------------------------------------------------------- load and save
def resolve_model_dir(path_or_name: str | os.PathLike[str], offline: bool = False) -> Path:
    """A local directory as is; a hub name ("gpt2", "openai-community/gpt2") downloaded once into the Hugging Face
    cache. Without network this fails within seconds and says how to pass a local directory instead.

    Anything that is not a hub name is a local path, and a missing one says "no such directory": `./x`, `/abs`,
    `a/b/c`, and `runs/x` when a local `runs/` exists.
    """
    p = Path(path_or_name)
    with contextlib.suppress(RuntimeError):  # "~user/x" for an unknown user stays as written
        p = p.expanduser()
    if p.is_dir():
        return p
    name = str(path_or_name)
    if p.exists():
        raise NotADirectoryError(f"{name!r} is a file, not a model directory (a directory with config.json and "
                                 "model.safetensors)")
    if name in HUB_NAMES:
        return download_from_hub(HUB_NAMES[name], offline=offline)
    if not is_hub_id(name):
        raise FileNotFoundError(f"no such directory: {name!r}; pass a directory with config.json and "
                                f"model.safetensors, or a hub name such as {', '.join(HUB_NAMES)} or owner/name")
    try:
        return download_from_hub(name, offline=offline)
    except ConnectionError as e:
        raise ConnectionError(f"{name!r} is not a local directory; as a hub name: {e}") from None


def is_hub_id(name: str) -> bool:
    """True for a Hub repository id, `owner/name`, whose `owner` is not a local directory (then it is a path)."""
    return HUB_ID.fullmatch(name) is not None and not Path(name.split("/")[0]).is_dir()


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
               dtype: torch.dtype | None = None, offline: bool = False, model_class: type[GPT] = GPT) -> GPT:
    """Build a GPT from a model directory or hub name, check every tensor, and load it (eval mode).

    `model_class` is the class built: the bare network by default, or a subclass such as `gpt2lab.GPT` (whose
    `from_pretrained` passes itself), which adds methods but no modules or weights.

    The config and the files' headers are checked against each other before the model is built or a weight is read,
    so a hostile or mismatched directory costs no more than reading its headers.
    """
    directory = resolve_model_dir(path_or_name, offline=offline)
    config = read_config(directory)
    check_layout(config, read_weight_layout(directory), source=str(directory))
    tensors = read_weights(directory)
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device="cpu")
    if str(device) == "cpu" and dtype is None:  # big weights in 2 MiB pages, where a decode step streams them
        use_huge_pages(model, copy=False)  # (memory.py); uninitialized, like to_empty's: the file fills them below
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
                             (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES),
                             lambda p: p.name not in TOKENIZER_FILES or own_tokenizer_file(p))


def atomic_directory(destination: str | os.PathLike[str], kind: OutputKind = MODEL_DIRECTORY,
                     overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """`files.atomic_directory` for model directories (a training checkpoint is one): a temp directory that
    replaces `destination` in one rename on success, and is removed on failure."""
    return files.atomic_directory(destination, kind, overwrite)


def write_model_files(model: GPT, directory: str | os.PathLike[str], tokenizer: Any = None) -> None:
    """Write config.json and model.safetensors into an existing directory (non-atomic; use inside
    `atomic_directory`). The config's bos/eos are the tokenizer's end-of-text id (without a tokenizer, GPT-2's)."""
    d = Path(directory)
    eot = getattr(tokenizer, "eot_token", None) if tokenizer is not None else GPT2_EOT
    (d / CONFIG_FILE).write_text(json.dumps(config_to_hf(model.config, eot), indent=2) + "\n", encoding="utf-8")
    save_file(export_state_dict(model), str(d / WEIGHTS_FILE), metadata={"format": "pt", "producer": "gpt2lab"})


def save_model(model: GPT, directory: str | os.PathLike[str], tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Save atomically: config.json + model.safetensors (+ the tokenizer's files). Returns the directory.

    `directory` must be new, empty, or (with `overwrite`) a model directory gpt2lab wrote; files there that
    gpt2lab does not write are kept.
    """
    with atomic_directory(directory, MODEL_DIRECTORY, overwrite) as tmp:
        write_model_files(model, tmp, tokenizer)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
