"""Reading a model directory's files without trusting them: config.json fields, tensor headers, shard paths.

A model directory may come from anywhere (a download, a colleague, a hostile upload), so everything here checks
before it costs anything: JSON files have a size cap, config.json fields are type-checked by name, a safetensors
file is first read only as a header (names, dtypes, shapes), and a sharded index may only point at files inside the
directory. checkpoint.py compares the result with the config before a model is built or a weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gpt2lab import checks
from gpt2lab.download import read_json

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"

# A GPT-2 config.json is about a kilobyte and a shard index some tens of kilobytes; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
# Sub-directories looked at when a directory has no config.json, to suggest the one the user meant.
MAX_ENTRIES_SCANNED = 1000

# Weights are stored in one of these and upcast on load; other dtypes (ints, bools, float64, fp8) are refused, since
# casting them would silently change what the file says.
LOADABLE_DTYPES = ("float32", "float16", "bfloat16")
# safetensors' dtype codes -> torch's names (unknown codes are shown as they are)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                      "BOOL": "bool"}

# config.json fields gpt2lab reads, by the JSON type each must have.
HF_INT_FIELDS = ("vocab_size", "n_positions", "n_ctx", "n_layer", "n_head", "n_embd")
HF_NUMBER_FIELDS = ("resid_pdrop", "layer_norm_epsilon")
HF_STRING_FIELDS = ("model_type", "activation_function")
HF_FLAG_FIELDS = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                  "tie_word_embeddings")
# the "gpt2lab" section: fields GPT-2 lacks, by their Python type
GPT2LAB_FIELDS = {"pos_encoding": str, "bias": bool, "activation": str}


class TensorSpec(NamedTuple):
    """What a file says about one tensor, known before its data is read."""

    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", "int64", ...


def show(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters, so an error about a huge value stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------ JSON files
def read_json_file(path: Path, max_bytes: int) -> dict[str, Any]:
    """A JSON object from a file of at most `max_bytes`; a larger file, broken JSON or a non-object is refused."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes is too large for a {path.name} (at most {max_bytes}); "
                         "refusing to read it")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_hf_fields(data: Mapping[str, Any], source: str) -> None:
    """Check the type of every config.json field gpt2lab reads, naming the field, its value and what is allowed.

    JSON has no integer type of its own, so `true`, `2.0`, `"12"` or `[12]` may stand where a size belongs; each is
    refused here rather than failing later with a message that names nothing.
    """
    for key in HF_INT_FIELDS:
        if key in data:
            checks.integer(f"{source}: {key}", data[key], low=1)
    for key in HF_NUMBER_FIELDS:
        if key in data:
            checks.number(f"{source}: {key}", data[key])
    for key in HF_STRING_FIELDS:
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{source}: {key} must be a string, got {show(data[key])}")
    for key in HF_FLAG_FIELDS:
        if key in data:
            checks.flag(f"{source}: {key}", data[key])
    if data.get("n_inner") is not None:
        checks.integer(f"{source}: n_inner", data["n_inner"], note="or null")
    _check_gpt2lab_section(data.get("gpt2lab", {}), source)


def _check_gpt2lab_section(extra: Any, source: str) -> None:
    """The "gpt2lab" object holds exactly the fields GPT-2 lacks, each of its own type."""
    if not isinstance(extra, dict):
        raise ValueError(f"{source}: gpt2lab must be a JSON object, got {show(extra)}")
    unknown = sorted(set(extra) - set(GPT2LAB_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown gpt2lab key(s) {', '.join(map(show, unknown))}; "
                         f"allowed: {', '.join(GPT2LAB_FIELDS)}")
    for key, kind in GPT2LAB_FIELDS.items():
        if key in extra and not isinstance(extra[key], kind):
            allowed = "true or false" if kind is bool else "a string"
            raise ValueError(f"{source}: gpt2lab.{key} must be {allowed}, got {show(extra[key])}")


def model_subdirectories(directory: Path, marker: str) -> list[Path]:
    """Direct sub-directories of `directory` that hold a `marker` file (e.g. a run's best/ and last/), sorted.

    Only the first MAX_ENTRIES_SCANNED entries are looked at, so a huge directory costs little.
    """
    found = []
    with os.scandir(directory) as entries:
        for i, entry in enumerate(entries):
            if i >= MAX_ENTRIES_SCANNED:
                break
            if entry.is_dir() and (Path(entry.path) / marker).is_file():
                found.append(Path(entry.path))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------- weight files
def weight_files(directory: Path) -> list[Path]:
    """The files holding a directory's tensors: model.safetensors, the shards its index names, or
    pytorch_model.bin, in that order of preference."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        return shard_paths(directory)
    if (directory / PICKLE_WEIGHTS_FILE).is_file():
        return [directory / PICKLE_WEIGHTS_FILE]
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {PICKLE_WEIGHTS_FILE} found")


def shard_paths(directory: Path) -> list[Path]:
    """The shard files a `model.safetensors.index.json` names, each checked to lie inside the model directory."""
    index_path = directory / WEIGHTS_INDEX_FILE
    weight_map = read_json_file(index_path, MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty \"weight_map\" object (tensor name -> shard file)")
    shards = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index_path}: weight_map[{show(name)}] must be a file name, got {show(shard)}")
        shards.add(shard)
    roots = allowed_roots(directory)
    return [shard_path(directory, shard, roots, index_path) for shard in sorted(shards)]


def allowed_roots(directory: Path) -> list[Path]:
    """Where a shard may really live: the model directory, and for a Hugging Face cache snapshot
    (`models--owner--name/snapshots/<rev>`, whose files are links into the repository's `blobs/`) that blobs folder."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def shard_path(directory: Path, shard: str, roots: list[Path], index_path: Path) -> Path:
    """`directory / shard`, refused when the name is absolute, climbs with `..`, or is a link leading elsewhere."""
    relative = PurePosixPath(shard)
    if not shard or relative.is_absolute() or ".." in relative.parts or "\\" in shard or ":" in shard:
        raise ValueError(f"{index_path}: shard {show(shard)} is not a file name inside the model directory "
                         "(allowed: a relative path without '..')")
    path = directory / relative
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise ValueError(f"{index_path}: shard {show(shard)} is a link that leads outside the model directory "
                         f"(to {real})")
    if not path.is_file():
        raise FileNotFoundError(f"{index_path}: shard {show(shard)} does not exist in {directory}")
    return path


# --------------------------------------------------------------------------------------------------- reading them
def read_layout(files: list[Path]) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of every tensor in `files`. safetensors files are read only as far as their header;
    pytorch_model.bin has no header, so it is loaded (with `weights_only=True`)."""
    layout: dict[str, TensorSpec] = {}
    owner: dict[str, Path] = {}
    for path in files:
        part = read_safetensors_layout(path) if path.suffix == ".safetensors" else layout_of(read_pickle_weights(path))
        for name in part:
            if name in owner:
                raise ValueError(f"tensor {name!r} appears in both {owner[name]} and {path}")
            owner[name] = path
        layout.update(part)
    return layout


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(read_safetensors(path) if path.suffix == ".safetensors" else read_pickle_weights(path))
    return tensors


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The layout of tensors already in memory, to check them the same way as a file header."""
    return {name: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()}


def read_safetensors_layout(path: Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes from a safetensors header; safetensors checks the header against the file size, so
    a truncated file is refused here, before any data is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: _spec(f.get_slice(name)) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _spec(tensor_slice: Any) -> TensorSpec:
    code = tensor_slice.get_dtype()
    return TensorSpec(tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES.get(code, code))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a truncated or corrupt file raises ValueError naming it."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, error: Exception) -> ValueError:
    size = path.stat().st_size if path.exists() else 0
    return ValueError(f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {error}")


def read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict, read with `weights_only=True`, which refuses arbitrary pickled objects."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or unsafe pickle
        raise ValueError(f"{path}: cannot be read safely ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return data
