"""Training: the loop, its learning-rate schedule, checkpoints that resume exactly, and many processes (DDP).

One optimizer step, in order:

    lr = schedule(step)                                   warmup, then cosine decay to min_lr
    for each of grad_accum micro-batches:                 random windows of the token shards
        loss = model.loss(x, y) / grad_accum              (bf16 autocast if asked; head + loss fused in fp32 on CPU)
        loss.backward()                                   DDP all-reduces gradients on the last micro-batch
    clip the global gradient norm; AdamW step; zero the gradients

The data stream is a pure function of (seed, micro-batch number): micro-batch g is drawn with a generator seeded
from (seed, g). Process r of W takes numbers r, r + W, r + 2W, ..., so every process reads different windows, and
one process with grad_accum × W micro-batches reads exactly the windows W processes read together. Resuming needs
only the count of micro-batches consumed, not a sampler state.

A checkpoint directory is a Hugging Face GPT-2 model directory (config.json, model.safetensors) plus the tokenizer
files and the training state: `optimizer.safetensors` (AdamW's moments and step counts, by parameter name, and the
RNG states as uint8 tensors) and `training_state.json` (step, counters, best val loss, the run config). Nothing is
pickled. Each checkpoint is written to a temp directory that replaces the old one in a single rename, so a run
killed mid-write leaves the previous checkpoint whole.

A run never loses work it could have kept: data too short for one window is refused before the first step; a
non-finite loss or weight stops the run before it can overwrite a good checkpoint; the first Ctrl-C or SIGTERM
finishes the current step, saves `last/` and stops; a failed checkpoint write (a full disk) names the checkpoint
and leaves the previous one in place.

Nothing happens at import: no seeding, no thread settings, no backend switches; `train()` is the entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.checkpoint import atomic_directory, import_state_dict, load_model, read_weights, write_model_files
from gpt2lab.config import GPTConfig, TrainConfig, apply_overrides, load_train_config, train_config_to_toml
from gpt2lab.data import TokenData
from gpt2lab.download import read_versioned_json, write_file_atomic
from gpt2lab.files import OutputKind, claim_directory, remove_abandoned
from gpt2lab.generate import generate
from gpt2lab.model import GPT

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "gpt2lab-training-state"
STATE_VERSION = 1
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "config.toml"
LAST, BEST = "last", "best"


# ------------------------------------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among `world_size` processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
    and its device. Rank 0 alone logs and writes checkpoints."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def runtime_from_env(device: str = "auto") -> Runtime:
    """Read torchrun's environment and join the process group: nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use device = \"cpu\" or \"auto\"")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, local_rank, world_size, local_world_size, dev)


# -------------------------------------------------------------------------------------------------------- stopping
class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite; the run stopped without writing them to a checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT (Ctrl-C) or SIGTERM after saving a resumable checkpoint (`checkpoint`, or None when
    no step had been taken). A KeyboardInterrupt, so callers that handle Ctrl-C keep working."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return str(self.args[0])


class StopSignals:
    """A context in which the first SIGINT or SIGTERM only asks the training loop to stop (it finishes the step, saves
    `last/` and raises TrainingInterrupted); a second one interrupts at once. Outside the main thread, where Python
    cannot install handlers, signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"gpt2lab train: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint "
              "(send it again to stop without saving)", file=sys.stderr, flush=True)


CONTINUE, TIME_UP, SIGNALLED = 0, 1, 2


def _stop_code(time_up: bool, signalled: bool, runtime: Runtime) -> int:
    """CONTINUE, TIME_UP or SIGNALLED, the same on every process (the largest any process reports), so that all
    stop at the same step. Only rank 0 passes its clock, so rank 0's clock decides the time limit."""
    local = SIGNALLED if signalled else TIME_UP if time_up else CONTINUE
    if not runtime.distributed:
        return local
    flag = torch.tensor([local], dtype=torch.int64, device=runtime.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding inf or NaN; checked before every checkpoint, since saving such weights would
    replace a good checkpoint with a broken one."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_data_fits(data: TokenData, seq_len: int) -> None:
    """Both splits must hold one window of seq_len + 1 tokens in a single shard, or training could not draw its
    first batch (train) or would fail at its first eval (val), after the work of eval_interval steps."""
    for split in ("train", "val"):
        shards = data.splits.get(split, [])
        if max((shard.size for shard in shards), default=0) >= seq_len + 1:
            continue
        hint = "use more text or lower seq_len"
        if split == "val":
            fraction = data.meta.get("val_fraction")
            hint = (f"prepare the data again with a larger --val-fraction (it was {fraction}) or more text, "
                    "or lower seq_len")
        raise ValueError(f"the {split} split of {data.dir} has {sum(shard.size for shard in shards)} tokens, too few "
                         f"for one window of seq_len + 1 = {seq_len + 1} tokens; {hint}")


# ------------------------------------------------------------------------------------------------------ schedule
def learning_rate(step: int, config: TrainConfig, time_fraction: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps (large early updates on random
    weights are what destabilises training), then half a cosine from lr down to min_lr at `schedule_steps`, flat
    after. With a time budget, `time_fraction` (elapsed / budget) moves the cosine along too, whichever is further,
    so a run stopped by the clock still ends at min_lr.

    >>> cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110)
    >>> learning_rate(0, cfg), learning_rate(9, cfg), learning_rate(60, cfg), learning_rate(110, cfg)
    (0.1, 1.0, 0.5, 0.0)
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.schedule_steps - config.warmup_steps)
    progress = min(1.0, max((step - config.warmup_steps) / span, time_fraction))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# ----------------------------------------------------------------------------------------------------- optimizer
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on 2-D tensors (matmul weights, embeddings), none on biases and LayerNorm gains.

    Decaying a gain or a bias pulls it towards 0, which is not "simpler", just wrong: LayerNorm's gain of 1 is its
    neutral value. The tied wte / lm_head table appears once (named_parameters skips the alias).
    """
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel for the whole update instead of a loop over tensors) where this torch
    has it for the device."""
    groups = parameter_groups(model, config.weight_decay)
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": 1e-8}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused not built for this device / torch
        return torch.optim.AdamW(groups, **kwargs)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name: `optim.<name>.<exp_avg|exp_avg_sq|step>`."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put saved AdamW state back, checking that names and shapes match this model."""
    params = dict(model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, slot = key.removeprefix("optim.").rpartition(".")
        if name not in params:
            raise ValueError(f"{source}: optimizer state for unknown parameter {name!r}; was it saved from another model?")
        if slot != "step" and value.shape != params[name].shape:
            raise ValueError(f"{source}: optimizer state {key} has shape {tuple(value.shape)}, the parameter has "
                             f"{tuple(params[name].shape)}")
        state.setdefault(name, {})[slot] = value
    missing = [n for n in params if n not in state]
    if state and missing:
        raise ValueError(f"{source}: no optimizer state for {', '.join(missing[:5])}")
    sd = optimizer.state_dict()  # its "state" is keyed by position in param_groups order
    order = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in params.items()}
    sd["state"] = {i: {k: v.to(p.device) if k != "step" else v for k, v in state[names[id(p)]].items()}
                   for i, p in enumerate(order) if names[id(p)] in state}
    optimizer.load_state_dict(sd)


# ------------------------------------------------------------------------------------------------------ batches
def batch_seed(seed: int, index: int, stream: str = "train") -> int:
    """A 63-bit seed for micro-batch `index` of a stream: a hash, so nearby indices give unrelated windows."""
    digest = hashlib.sha256(f"{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def get_batch(data: TokenData, split: str, index: int, config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch number `index` of a split: (x, y), each (B, T), on `device`."""
    generator = torch.Generator().manual_seed(batch_seed(config.seed, index, split))
    x, y = data.batch(split, config.batch_size, config.seq_len, generator)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class TrainingLoss(torch.nn.Module):
    """`model.loss` as a module's forward: (B, T) ids, (B, T) targets -> scalar loss. Training calls this instead of
    `cross_entropy(model(x), y)` so that the LM head and the loss run fused (gpt2lab.loss); it is what torch.compile and
    DistributedDataParallel wrap, since DDP's gradient hooks are armed by a forward call."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(idx, targets)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast: matmuls in bf16 (AMX on recent Xeons, tensor cores on GPUs), weights and AdamW in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# -------------------------------------------------------------------------------------------------------- speed
def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward): 6 per weight that a token multiplies through
    (every block matmul plus the V × C LM head; embedding lookups are free), plus attention's scores and weighted
    sum, 12 · L · C · T (Kaplan et al. 2020; the PaLM paper's MFU appendix)."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    matmul_weights = L * 12 * C * C + V * C
    return 6 * matmul_weights + 12 * L * C * seq_len


GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, dtype: str, threads: int | None = None) -> tuple[float, str]:
    """(FLOP/s, how it was computed): the hardware's dense peak, the denominator of MFU.

    GPU: the vendor's dense bf16 tensor-core figure by name. CPU: cores × clock × FLOPs per cycle per core from the
    vector units: 32 with AVX2 (two 8-lane fp32 FMA units), 64 with AVX-512 (two 16-lane), and for bf16 1024
    with AMX tiles or 128 with AVX512-BF16. docs/training.md explains the numbers.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name}: {value / 1e12:.0f} TFLOP/s dense bf16"
        return float("nan"), f"{name}: peak unknown"
    flags, mhz = _cpu_flags_and_mhz()
    cores = threads or torch.get_num_threads()
    per_cycle, unit = (32, "AVX2 fp32") if "avx2" in flags else (16, "SSE fp32")
    if "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 fp32"
    if dtype == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif dtype == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16"
    value = cores * mhz * 1e6 * per_cycle
    return value, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle ({unit}) = {value / 1e9:.0f} GFLOP/s"


def _cpu_flags_and_mhz() -> tuple[set[str], float]:
    flags: set[str] = set()
    mhz = 2000.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz":
                mhz = float(value)
    return flags, mhz


# ------------------------------------------------------------------------------------------------------ run state
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
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for k, v in data.items():
            if k in known:
                values[k] = v if v is not None else (float("inf") if k == "best_val_loss" else float("nan"))
        return cls(**values)


@dataclass
class RunResult:
    """What `train` returns: where things were written and the final numbers."""

    out_dir: Path
    checkpoint: Path | None
    state: RunState
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this session
    tokens_per_s: float = 0.0


# ---------------------------------------------------------------------------------------------------- checkpoints
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
            write_model_files(model, tmp)
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
        raise FileNotFoundError(f"{directory}: no {STATE_FILE}; not a training checkpoint (a `last/` directory of a run)")
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
    return RunState.from_dict(payload.get("state", {})), payload.get("config", {}), tensors


def load_run_config(run_dir: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config of an existing run, with `key=value` overrides: its config.toml, or, if that file is gone, the copy
    that every checkpoint keeps in training_state.json (so a run can always be resumed from its checkpoint alone)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).is_file():
        return load_train_config(run_dir / CONFIG_FILE, overrides)
    ckpt = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: neither {CONFIG_FILE} nor a checkpoint ({LAST}/{STATE_FILE}); "
                                "is it the out_dir of a training run?")
    saved = read_state_file(ckpt).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt / STATE_FILE}: holds no run config; resume with --config FILE.toml instead")
    return TrainConfig.from_dict(apply_overrides(saved, overrides))


# ------------------------------------------------------------------------------------------------------- logging
def json_line(record: dict[str, Any]) -> str:
    """One line of strict JSON: non-finite numbers become null, since `NaN` and `Infinity` are not JSON and would
    break every reader of the log but Python's.

    >>> json_line({"step": 3, "loss": float("nan"), "mfu": 0.25})
    '{"step": 3, "loss": null, "mfu": 0.25}\\n'
    """
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


class RunLog:
    """The run directory's JSONL log and loss-curve PNG (rank 0 only)."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / LOG_FILE
        self.plot_path = out_dir / PLOT_FILE
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():  # keep history up to the checkpoint, drop the rest
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
        write_file_atomic(self.path, "".join(json_line(r) for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a failed write (a full disk) names the log, and leaves the checkpoints as they were."""
        self.records.append(record)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json_line(record))
        except OSError as e:
            raise OSError(f"could not append to {self.path} at step {record.get('step')} ({e}); the checkpoints "
                          "are unaffected") from e

    def plot(self) -> None:
        """Train and val loss against step; written to a temp file and renamed, so a viewer never sees half a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_name(f".{self.plot_path.name}.tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.plot_path)


# ---------------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: GPT, data: TokenData, config: TrainConfig, runtime: Runtime,
             loss_model: torch.nn.Module | None = None) -> float:
    """Mean val loss over `eval_iters` fixed batches (the same windows at every eval, so the curve is smooth and
    comparable), shared among the processes. `loss_model` (default `TrainingLoss(model)`) is the training run's
    possibly compiled loss module, so that eval runs compiled too."""
    loss_model = loss_model if loss_model is not None else TrainingLoss(model)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(runtime.rank, config.eval_iters, runtime.world_size):
        x, y = get_batch(data, "val", i, config, runtime.device)
        with autocast(runtime.device, config.dtype):
            total += torch.tensor([loss_model(x, y).item(), 1.0], dtype=torch.float64)
    if runtime.distributed:
        total = total.to(runtime.device)
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """nats per token -> bits per byte of text: × tokens/byte ÷ ln 2. Comparable across tokenizers."""
    return loss * tokens_per_byte / math.log(2)


# ------------------------------------------------------------------------------------------------------ the loop
def build_model(config: TrainConfig, vocab_size: int) -> GPT:
    """A fresh model (seeded, so every process starts from the same weights) or the `init_from` model."""
    if config.init_from:
        model = load_model(config.init_from)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"init_from {config.init_from!r} has vocab_size {model.config.vocab_size} but the data's "
                             f"tokenizer has {vocab_size}; prepare the data with the model's tokenizer")
        if config.seq_len > model.config.n_ctx:
            raise ValueError(f"seq_len {config.seq_len} exceeds n_ctx {model.config.n_ctx} of {config.init_from!r}")
        return model.train()
    torch.manual_seed(config.seed)
    return GPT(dataclasses.replace(config.model, vocab_size=vocab_size)).train()


def checkpoint_to_resume(config: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). A fresh run refuses to replace an existing run's
    checkpoints unless told to (`overwrite`), so a forgotten `--resume` cannot wipe hours of training, and never
    writes into a directory of other files. Temp checkpoints that a killed run left are removed here."""
    out_dir = Path(config.out_dir)
    if out_dir.is_dir():
        for name in (LAST, BEST):
            remove_abandoned(out_dir / name)
    ckpt = find_checkpoint(out_dir) if out_dir.is_dir() else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (expected {out_dir / LAST}/{STATE_FILE})")
    if not resume and ckpt is not None and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run (checkpoint {ckpt}); pass --resume to continue it, "
                              "--overwrite to start again, or choose another out_dir")
    if ckpt is None:  # what is there holds no checkpoint, so it may go only if a run wrote it
        claim_directory(out_dir, RUN_DIRECTORY, overwrite=True)
    return ckpt if resume else None


RUN_FILES = (CONFIG_FILE, LOG_FILE, PLOT_FILE, LAST, BEST, f".{PLOT_FILE}.tmp", f".{LAST}.*", f".{BEST}.*",
             f".{LOG_FILE}.*", f".{CONFIG_FILE}.*")  # what a run writes into out_dir, temp files included


def _holds_only_run_files(out_dir: Path) -> bool:
    """True when `out_dir` holds nothing but what a run writes before its first checkpoint. A config.toml counts
    as the run's only beside its log.jsonl (a run writes the log first): a user may keep their own run file there."""
    entries = [p.name for p in out_dir.iterdir()]
    known = all(any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES) for name in entries)
    return known and (CONFIG_FILE not in entries or LOG_FILE in entries)


RUN_DIRECTORY = OutputKind("run directory", _holds_only_run_files, RUN_FILES)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, fresh_optimizer: bool = False,
          progress: bool = True, runtime: Runtime | None = None) -> RunResult:
    """Run (or continue, with `resume`) training as `config` says; returns the final state and losses.

    Rank 0 writes `out_dir/`: config.toml (the resolved run config), log.jsonl, loss.png, last/ (checkpoint to
    resume from, written at every eval and checkpoint_interval) and best/ (model with the lowest val loss).
    A non-finite loss or weight raises TrainingDiverged before anything is saved; the first SIGINT or SIGTERM
    saves last/ after the current step and raises TrainingInterrupted. `fresh_optimizer` resumes from a
    checkpoint without using its AdamW state (required when the checkpoint has none).
    """
    if fresh_optimizer and not resume:
        raise ValueError("fresh_optimizer (--fresh-optimizer) only applies when resuming a run (--resume)")
    runtime = runtime or runtime_from_env(config.device)
    ckpt = checkpoint_to_resume(config, resume, overwrite)
    out_dir = Path(config.out_dir)
    threads = config.threads or max(1, (os.cpu_count() or 1) // runtime.local_world_size)
    if runtime.device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = TokenData(config.data_dir)
    check_data_fits(data, config.seq_len)
    tokenizer = data.tokenizer()
    model = build_model(config, data.vocab_size).to(runtime.device)
    optimizer = make_optimizer(model, config, runtime.device)
    state = RunState()
    if ckpt is not None:
        state = restore_checkpoint(ckpt, model, optimizer, runtime, fresh_optimizer, config.seed)
    else:
        torch.manual_seed(config.seed + runtime.rank)  # dropout masks differ per process

    loss_model: torch.nn.Module = TrainingLoss(model)
    if config.compile:
        loss_model = torch.compile(loss_model)
    step_model = loss_model  # what the optimizer step calls; eval calls loss_model (no DDP hooks there)
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(loss_model, device_ids=ids)

    log = RunLog(out_dir, state.step if ckpt is not None else None) if runtime.is_main else None
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out_dir / CONFIG_FILE, train_config_to_toml(config))
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * runtime.world_size
    flops_step = flops_per_token(model.config, config.seq_len) * tokens_per_step
    peak, _ = peak_flops(runtime.device, config.dtype, threads * runtime.world_size)
    budget_s = config.max_minutes * 60.0
    session_start, earlier_s = time.perf_counter(), state.elapsed_s
    elapsed = lambda: earlier_s + time.perf_counter() - session_start  # noqa: E731  (wall time of the whole run)
    result = RunResult(out_dir, ckpt, state)
    bar = _progress_bar(config, state, enabled=progress and runtime.is_main)
    saved_step = state.step if ckpt is not None else None  # the step of the newest resumable last/ checkpoint
    lr = learning_rate(state.step, config)

    def diverged(what: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint, {out_dir / LAST} (step {saved_step}), is kept" if saved_step is not None
                else "no checkpoint had been written")
        return TrainingDiverged(f"step {state.step}: {what} (lr {lr:.3g}): the run diverged and stopped; {kept}. "
                                f"Lower lr or raise warmup_steps, then start again or continue with "
                                f"--resume {out_dir} --set lr=...")

    def checkpoint(name: str, with_optimizer: bool = True) -> None:
        nonlocal saved_step
        bad = nonfinite_parameters(model)
        if bad:
            raise diverged(f"the weights hold inf or NaN ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        opt = optimizer_tensors(model, optimizer) if with_optimizer else None
        rng = rng_tensors(runtime) if with_optimizer else {}
        if runtime.is_main:
            state.elapsed_s = elapsed()
            result.checkpoint = save_checkpoint(out_dir / name, model, tokenizer, config, state,
                                                {**opt, **rng} if opt is not None else None)
        if name == LAST:
            saved_step = state.step

    def interrupted(signum: int) -> TrainingInterrupted:
        if state.step > 0 and saved_step != state.step:
            checkpoint(LAST)
        name = signal.Signals(signum).name
        if saved_step is None:
            return TrainingInterrupted(f"{name}: stopped before the first step; nothing to save", signum, None)
        return TrainingInterrupted(f"{name}: stopped at step {state.step}; checkpoint {out_dir / LAST}; continue "
                                   f"with: gpt2lab train --resume {out_dir}", signum, out_dir / LAST)

    def run_eval() -> None:
        val = evaluate(model, data, config, runtime, loss_model)
        if not math.isfinite(val):
            if log is not None:
                log.write({"step": state.step, "val_loss": val, "diverged": True})
            raise diverged(f"the validation loss is {val}")
        state.last_val_loss, state.last_val_bpb = val, bits_per_byte(val, data.tokens_per_byte("val"))
        improved = val < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val)
        if improved:
            checkpoint(BEST, with_optimizer=False)
        checkpoint(LAST)
        if log is not None:
            log.write({"step": state.step, "val_loss": val, "val_bpb": state.last_val_bpb,
                       "tokens": state.tokens, "elapsed_s": round(elapsed(), 3)})
            log.plot()
        if progress and runtime.is_main:
            bar.write(f"step {state.step}: val loss {val:.4f}, {state.last_val_bpb:.4f} bits/byte")

    window_start, window_tokens = time.perf_counter(), 0
    evaluated_at = -1
    with StopSignals() as signals, contextlib.closing(bar):
        while state.step < config.max_steps:
            stop = _stop_code(bool(budget_s) and runtime.is_main and elapsed() >= budget_s,
                              signals.received is not None, runtime)
            if stop == SIGNALLED:
                raise interrupted(signals.received or signal.SIGTERM)  # another process may have had the signal
            if stop == TIME_UP:
                break
            lr = learning_rate(state.step, config, elapsed() / budget_s if budget_s and config.clock_schedule else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _optimizer_step(step_model, model, optimizer, data, config, runtime, state.micro_batches)
            state.step += 1
            state.micro_batches += config.grad_accum * runtime.world_size
            state.tokens += tokens_per_step
            if not math.isfinite(loss):
                if log is not None:
                    log.write({"step": state.step, "loss": loss, "lr": lr, "diverged": True})
                raise diverged(f"the training loss is {loss}")
            state.last_train_loss = loss
            result.losses.append(loss)
            window_tokens += tokens_per_step
            if state.step % config.log_interval == 0 or state.step == config.max_steps:
                dt = time.perf_counter() - window_start
                tok_s = window_tokens / dt if dt > 0 else 0.0
                mfu = tok_s / tokens_per_step * flops_step / peak if peak == peak else float("nan")
                result.tokens_per_s = tok_s
                if log is not None:
                    log.write({"step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens,
                               "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed_s": round(elapsed(), 3)})
                bar.set_postfix(step=f"{state.step}/{config.max_steps}", loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
            _advance(bar, 100.0 * progress_fraction(state.step, elapsed(), config))
            if state.step % config.eval_interval == 0:
                run_eval()
                evaluated_at = state.step
            elif config.checkpoint_interval and state.step % config.checkpoint_interval == 0:
                checkpoint(LAST)
        if evaluated_at != state.step and state.step > 0:
            run_eval()
        _advance(bar, 100.0)  # the run is over, whichever limit ended it
    model.logits_workspace.clear()  # the fused loss's (N, V) buffer is not needed after training
    state.elapsed_s = elapsed()
    return result


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


def _optimizer_step(step_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer, data: TokenData,
                    config: TrainConfig, runtime: Runtime, first_micro_batch: int) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean loss (over all processes' batches)."""
    total = torch.zeros((), dtype=torch.float32)
    for a in range(config.grad_accum):
        index = first_micro_batch + a * runtime.world_size + runtime.rank
        x, y = get_batch(data, "train", index, config, runtime.device)
        last = a == config.grad_accum - 1
        sync = contextlib.nullcontext() if last or not runtime.distributed else step_model.no_sync()
        with sync:
            with autocast(runtime.device, config.dtype):
                loss = step_model(x, y) / config.grad_accum
            loss.backward()
        total += loss.detach().float().cpu()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if runtime.distributed:
        total = total.to(runtime.device)
        torch.distributed.all_reduce(total)
        total = total.cpu() / runtime.world_size
    return float(total)


def progress_fraction(step: int, elapsed_s: float, config: TrainConfig) -> float:
    """How far the run is towards the limit that will end it: the larger of step / max_steps and, with a time
    limit, elapsed / max_minutes (whichever is further along is reached first), at most 1.

    >>> cfg = TrainConfig(max_steps=100, max_minutes=10.0)
    >>> progress_fraction(50, 60.0, cfg), progress_fraction(10, 300.0, cfg), progress_fraction(100, 0.0, cfg)
    (0.5, 0.5, 1.0)
    """
    fraction = step / config.max_steps
    if config.max_minutes:
        fraction = max(fraction, elapsed_s / (config.max_minutes * 60.0))
    return min(1.0, fraction)


def _progress_bar(config: TrainConfig, state: RunState, enabled: bool) -> Any:
    """A bar in percent of the run (see `progress_fraction`): it fills as the steps or the clock run out, whichever
    ends the run; the postfix shows the step, loss, learning rate, tokens/s and MFU."""
    from tqdm import tqdm

    start = 100.0 * progress_fraction(state.step, state.elapsed_s, config)
    return tqdm(total=100.0, initial=start, desc="train", disable=not enabled, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")


def _advance(bar: Any, position: float) -> None:
    """Move the bar forward to `position` percent."""
    position = min(position, bar.total)
    if position > bar.n:
        bar.update(position - bar.n)


def iter_log(out_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a run's log.jsonl."""
    with open(Path(out_dir) / LOG_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# ---------------------------------------------------------------------------------------------------- quickstart
QUICKSTART_SOURCE = "shakespeare"
QUICKSTART_TOKENIZER = "char"
QUICKSTART = TrainConfig(
    data_dir="data/shakespeare-char",
    out_dir="runs/quickstart",
    model=GPTConfig(n_ctx=64, n_layer=4, n_head=4, n_embd=128),
    batch_size=12,
    seq_len=64,
    lr=3e-3,
    min_lr=1e-4,
    warmup_steps=30,
    max_steps=100_000,  # the clock stops it; the cosine follows the clock
    max_minutes=5.0,
    weight_decay=0.1,
    beta2=0.99,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
)
"""The quickstart run: nanoGPT's CPU example size (4 x 128, 64 characters of context, batch 12) with the speedrun's
winning schedule (lr 3e-3, cosine timed by the clock); in a few minutes on 2 cores the step count is what matters.
configs/quickstart.toml holds the same values (a test keeps them equal)."""


def ensure_prepared(source: str, tokenizer: str, data_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """Prepare `source` into `data_dir` unless a complete preparation of the same source and tokenizer is there.

    A damaged preparation of the same source and tokenizer is gpt2lab's own and is prepared again; anything else in
    `data_dir` is refused by `prepare` (the caller chooses another directory)."""
    from gpt2lab.data import prepare, read_meta

    same = False
    with contextlib.suppress(OSError, ValueError):
        meta = read_meta(data_dir)
        same = meta.get("source") == source and meta.get("tokenizer") == tokenizer
        if same:
            TokenData(data_dir)  # checks every shard against meta.json
            return Path(data_dir)
    prepare(source, data_dir, tokenizer=tokenizer, progress=progress, overwrite=same)
    return Path(data_dir)


def sample_texts(model: GPT, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int = 0) -> list[str]:
    """Continue each prompt (top-k sampling, seeded); returns prompt + continuation, one per prompt."""
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=model.device)  # (1, T)
        new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,  # slides past n_ctx
                       eos_token_id=tokenizer.eot_token, generator=generator)  # (1, T + N)
        tokens = [t for t in new[0].tolist() if t != tokenizer.eot_token]
        out.append(tokenizer.decode(tokens))
    return out


def quickstart(minutes: float = QUICKSTART.max_minutes, out_dir: str = QUICKSTART.out_dir,
               data_dir: str = QUICKSTART.data_dir, samples: int = 3, progress: bool = True,
               echo: Any = print) -> tuple[RunResult, list[str]]:
    """Prepare the complete works of Shakespeare (char-level), train the quickstart model for `minutes`, and
    return the run and a few samples from the best checkpoint (also echoed)."""
    echo(f"[1/3] preparing {QUICKSTART_SOURCE!r} ({QUICKSTART_TOKENIZER} tokens) in {data_dir}")
    ensure_prepared(QUICKSTART_SOURCE, QUICKSTART_TOKENIZER, data_dir, progress=progress)
    config = dataclasses.replace(QUICKSTART, out_dir=str(out_dir), data_dir=str(data_dir), max_minutes=float(minutes))
    echo(f"[2/3] training a {config.model.n_layer}-layer, {config.model.n_embd}-wide model for {minutes:g} min "
         f"into {out_dir}")
    result = train(config, overwrite=True, progress=progress)
    s = result.state
    echo(f"      {s.step} steps, {s.tokens:,} tokens in {s.elapsed_s:.0f} s; val loss {s.last_val_loss:.4f} "
         f"({s.last_val_bpb:.3f} bits/byte), train loss {s.last_train_loss:.4f}")
    best = find_checkpoint(Path(out_dir), BEST) or Path(out_dir) / LAST
    from gpt2lab.tokenizer import load_tokenizer

    model, tokenizer = load_model(best), load_tokenizer(best)
    prompts = ["ROMEO:\n", "JULIET:\n", "KING HENRY:\n", "HAMLET:\n", "First Citizen:\n"][:samples]
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=200, seed=config.seed) if samples else []
    echo(f"[3/3] samples from {best} (temperature 0.8, top-k 40):")
    for text in texts:
        echo("-" * 60 + "\n" + text)
    echo("-" * 60 + f"\nmodel directory: {best} (loads with GPT.from_pretrained or transformers' GPT2LMHeadModel)\n"
         f"log: {Path(out_dir) / LOG_FILE}, loss curve: {Path(out_dir) / PLOT_FILE}, config: {Path(out_dir) / CONFIG_FILE}")
    return result, texts
