"""Training checkpoints: the run state, writing a checkpoint atomically, and reading it back to resume exactly.

A checkpoint directory is a Hugging Face GPT-2 model directory (config.json, model.safetensors) plus the tokenizer
files and the training state: `optimizer.safetensors` (AdamW's moments and step counts, or Muon's momentum for the
block matrices, by parameter name, and the RNG states as uint8 tensors) and `training_state.json` (step, counters, best val loss, the run config). Nothing is
pickled. Each checkpoint is written to a temp directory that replaces the old one in a single rename, so a run
killed mid-write leaves the previous checkpoint whole; a failed write (a full disk) names the checkpoint and leaves
the previous one in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab import checks
from gpt2lab.checkpoint import atomic_directory, import_state_dict, read_weights, write_model_files
from gpt2lab.config import TrainConfig
from gpt2lab.download import read_versioned_json
from gpt2lab.model import GPT
from gpt2lab.train.optim import load_optimizer_tensors
from gpt2lab.train.runtime import Runtime

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "gpt2lab-training-state"
STATE_VERSION = 1
LAST, BEST = "last", "best"  # the checkpoint to resume from; the model with the lowest val loss


@dataclass
class RunState:
    """What changes as a run goes on and must survive a restart (all of it goes into training_state.json)."""

    step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # global micro-batches consumed (all processes): the data position
    tokens: int = 0  # training tokens seen, all processes
    elapsed_s: float = 0.0  # training wall time before this session
    best_val_loss: float = float("inf")
    last_val_loss: float = float("nan")
    last_val_bpb: float = float("nan")
    last_train_loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = STATE_FILE) -> "RunState":
        """The state a training_state.json holds, each field checked: the counts are integers >= 0 (all three must
        be there: the data position decides which batches come next), the rest numbers or null (no value yet)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: 'state' must be an object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = data.get(f.name)
            if f.type in (int, "int"):
                if f.name not in data:
                    raise ValueError(f"{source}: the state has no {f.name!r}, which resuming needs")
                values[f.name] = checks.integer(f"{source}: {f.name}", v, 0)
            elif v is None:
                values[f.name] = float("inf") if f.name == "best_val_loss" else float("nan")
            else:
                values[f.name] = checks.number(f"{source}: {f.name}", v, 0.0)
        return cls(**values)


def rng_tensors(runtime: Runtime) -> dict[str, torch.Tensor]:
    """The torch RNG states (dropout) of every process, gathered to all of them as uint8 tensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(runtime.device)
    if not runtime.distributed:
        return {f"{k}.0": v for k, v in states.items()}
    out = {}
    for key, value in states.items():
        backend_device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
        gathered = [torch.empty_like(value, device=backend_device) for _ in range(runtime.world_size)]
        torch.distributed.all_gather(gathered, value.to(backend_device))
        out.update({f"{key}.{r}": t.cpu() for r, t in enumerate(gathered)})
    return out


def restore_rng(tensors: dict[str, torch.Tensor], runtime: Runtime) -> None:
    key = f"rng.cpu.{runtime.rank}"
    if key in tensors:
        torch.set_rng_state(tensors[key])
    key = f"rng.cuda.{runtime.rank}"
    if key in tensors and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(tensors[key], runtime.device)


def save_checkpoint(directory: Path, model: GPT, tokenizer: Any, config: TrainConfig, state: RunState,
                    optimizer_state: dict[str, torch.Tensor] | None) -> Path:
    """Write a checkpoint directory atomically: model files, tokenizer files, optimizer tensors, state JSON.

    A failed write (a full disk, say) raises OSError naming the checkpoint and saying whether a previous one is
    still in place; safetensors reports I/O failures with its own error type, which becomes that OSError too.
    """
    try:
        with atomic_directory(directory) as tmp:
            write_model_files(model, tmp, tokenizer)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if optimizer_state is not None:
                save_file(optimizer_state, str(tmp / OPTIMIZER_FILE), metadata={"format": STATE_FORMAT})
            payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": state.to_dict(),
                       "config": config.to_dict(), "vocab_size": model.config.vocab_size}
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:
        kept = ("the previous checkpoint there is intact" if (directory / STATE_FILE).is_file()
                else "no earlier checkpoint was there")
        raise OSError(f"could not write the checkpoint {directory} at step {state.step} ({e}); {kept}") from e
    return directory


def find_checkpoint(out_dir: Path, name: str = LAST) -> Path | None:
    """`out_dir/name`, or the previous copy that `atomic_directory` had set aside if a run died between its two
    renames (a window of microseconds, but a checkpoint must never be lost)."""
    path = out_dir / name
    if (path / STATE_FILE).is_file():
        return path
    leftovers = sorted(out_dir.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in leftovers:
        if (old / STATE_FILE).is_file():
            os.replace(old, path)
            return path
    return None


def read_state_file(directory: Path) -> dict[str, Any]:
    """The parsed training_state.json of a checkpoint; refuses a missing, foreign or broken file."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {STATE_FILE}; not a training checkpoint "
                                "(a `last/` directory of a run)")
    return read_versioned_json(path, STATE_FORMAT, STATE_VERSION)


def read_training_state(directory: Path) -> tuple[RunState, dict[str, Any], dict[str, torch.Tensor]]:
    """(run state, saved config dict, optimizer and RNG tensors) of a checkpoint; refuses foreign or broken files.
    The tensors are empty when the checkpoint has no optimizer.safetensors."""
    payload = read_state_file(directory)
    tensors: dict[str, torch.Tensor] = {}
    if (directory / OPTIMIZER_FILE).is_file():
        try:
            tensors = load_file(str(directory / OPTIMIZER_FILE))
        except Exception as e:  # safetensors raises its own error type for truncated files
            raise ValueError(f"{directory / OPTIMIZER_FILE}: not a readable safetensors file ({e})") from None
    state = RunState.from_dict(payload.get("state", {}), str(directory / STATE_FILE))
    return state, payload.get("config", {}), tensors


def restore_checkpoint(ckpt: Path, model: GPT, optimizer: torch.optim.Optimizer, runtime: Runtime,
                       fresh_optimizer: bool, seed: int) -> RunState:
    """Load a checkpoint's weights, AdamW state and RNG states into this run; returns its run state.

    A checkpoint without AdamW state is refused unless `fresh_optimizer`: AdamW restarted from zero moments takes
    steps as large as the learning rate in every weight at first, so the run would quietly differ from the one it
    continues. With `fresh_optimizer` the saved AdamW state, if any, is not used.
    """
    state, _, tensors = read_training_state(ckpt)
    import_state_dict(model, read_weights(ckpt), source=str(ckpt))
    if not fresh_optimizer:
        if not any(key.startswith("optim.") for key in tensors):
            raise FileNotFoundError(f"{ckpt}: no optimizer state ({OPTIMIZER_FILE} is missing or empty), so the run "
                                    "cannot continue exactly; pass --fresh-optimizer to resume with AdamW's "
                                    "moments started again from zero")
        load_optimizer_tensors(model, optimizer, tensors, str(ckpt / OPTIMIZER_FILE))
    if any(key.startswith("rng.") for key in tensors):
        restore_rng(tensors, runtime)
    else:
        torch.manual_seed(seed + runtime.rank + state.step)  # no saved RNG: still reproducible from here
    return state
