"""Training: the loop, its learning-rate schedule, checkpoints that resume exactly, and many processes (DDP).

One optimizer step, in order:

    lr = schedule(step)                                   warmup, then cosine decay to min_lr
    for each of grad_accum micro-batches:                 random windows of the token shards
        loss = model.loss(x, y) / grad_accum              (bf16 autocast if asked; head + loss fused in fp32 on CPU)
        loss.backward()                                   DDP all-reduces gradients on the last micro-batch
    clip the global gradient norm; AdamW step; zero the gradients

The modules, each one job, in the order they import one another (each uses only those above it):

    runtime.py      Runtime: rank, world size and device (torchrun's environment); the switches a run sets
    flops.py        FLOPs per training token and the hardware's peak FLOP/s: the two halves of MFU
    optim.py        the learning-rate schedule, AdamW and its parameter groups, AdamW's state by parameter name
    batches.py      the data stream: micro-batch `index` as a pure function of (seed, index); data too short
    stopping.py     divergence and stop signals (Ctrl-C, SIGTERM), agreed among the processes
    run_log.py      log.jsonl and loss.png
    checkpoints.py  the run state; writing a checkpoint atomically; reading it back to resume exactly
    run_dir.py      the run directory: fresh or resumed, what a run may replace there, the run's config
    step.py         one optimizer step (gradient accumulation, autocast, clipping) and one evaluation
    loop.py         train(): the loop that ties them together

This file only re-exports: `from gpt2lab.train import train` and every name below keep working. The quickstart,
which trains and then samples, lives above the training job in gpt2lab.quickstart.
"""

from __future__ import annotations

from gpt2lab.train.batches import batch_seed, check_data_fits, get_batch
from gpt2lab.train.checkpoints import (BEST, LAST, OPTIMIZER_FILE, STATE_FILE, STATE_FORMAT, STATE_VERSION, RunState,
                                       find_checkpoint, read_state_file, read_training_state, restore_checkpoint,
                                       restore_rng, rng_tensors, save_checkpoint)
from gpt2lab.train.flops import GPU_PEAK_BF16, flops_per_token, gpu_peak_bf16, peak_flops
from gpt2lab.train.loop import RunResult, build_model, progress_fraction, train
from gpt2lab.train.optim import (MuonAdamW, is_muon_parameter, learning_rate, load_optimizer_tensors, make_adamw,
                                 make_muon_adamw, make_optimizer, optimizer_tensors, parameter_groups,
                                 set_learning_rate)
from gpt2lab.train.run_dir import CONFIG_FILE, RUN_DIRECTORY, RUN_FILES, checkpoint_to_resume, load_run_config
from gpt2lab.train.run_log import LOG_FILE, PLOT_FILE, RunLog, iter_log, json_line
from gpt2lab.train.runtime import Runtime, backend_settings, runtime_from_env
from gpt2lab.train.step import TrainingLoss, autocast, bits_per_byte, evaluate, optimizer_step
from gpt2lab.train.stopping import (CONTINUE, SIGNALLED, TIME_UP, StopSignals, TrainingDiverged, TrainingInterrupted,
                                    nonfinite_parameters, stop_code)

__all__ = [
    # runtime, stopping
    "Runtime", "runtime_from_env", "backend_settings", "TrainingDiverged", "TrainingInterrupted", "StopSignals",
    "CONTINUE", "TIME_UP", "SIGNALLED", "stop_code", "nonfinite_parameters",
    # data, optimizer, one step
    "batch_seed", "get_batch", "check_data_fits", "learning_rate", "parameter_groups", "make_optimizer",
    "make_adamw", "make_muon_adamw", "MuonAdamW", "is_muon_parameter", "set_learning_rate", "optimizer_tensors",
    "load_optimizer_tensors", "TrainingLoss", "autocast", "optimizer_step", "evaluate", "bits_per_byte",
    # MFU
    "flops_per_token", "GPU_PEAK_BF16", "gpu_peak_bf16", "peak_flops",
    # checkpoints and the run directory
    "STATE_FILE", "OPTIMIZER_FILE", "STATE_FORMAT", "STATE_VERSION", "LAST", "BEST", "RunState", "rng_tensors",
    "restore_rng", "save_checkpoint", "find_checkpoint", "read_state_file", "read_training_state",
    "restore_checkpoint", "CONFIG_FILE", "RUN_FILES", "RUN_DIRECTORY", "checkpoint_to_resume", "load_run_config",
    # the run log
    "LOG_FILE", "PLOT_FILE", "json_line", "RunLog", "iter_log",
    # the loop
    "RunResult", "build_model", "progress_fraction", "train",
]

_MOVED_TO_QUICKSTART = {"QUICKSTART", "QUICKSTART_SOURCE", "QUICKSTART_TOKENIZER", "ensure_prepared", "sample_texts",
                        "quickstart"}


def __getattr__(name: str) -> object:
    # The quickstart's names moved up a layer; re-exporting them here would be an upward import, so say where they are.
    if name in _MOVED_TO_QUICKSTART:
        raise AttributeError(f"gpt2lab.train.{name} moved to gpt2lab.quickstart (the quickstart trains and then "
                             f"samples, so it is not part of the training job): from gpt2lab.quickstart import {name}")
    raise AttributeError(f"module 'gpt2lab.train' has no attribute {name!r}")
