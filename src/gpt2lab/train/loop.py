"""The training loop: `train()` runs (or resumes) a run from its config and returns the final state and losses.

Each step: set the learning rate from the schedule, take one optimizer step (step.py), count tokens, log, and at
intervals evaluate and checkpoint. The run stops at max_steps, at the time budget, on a signal (stopping.py) or when
it diverges; it never loses work it could have kept.

Nothing happens at import: no seeding, no thread settings, no backend switches; `train()` is the entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoint import load_model
from gpt2lab.config import TrainConfig, train_config_to_toml
from gpt2lab.data import TokenData
from gpt2lab.download import write_file_atomic
from gpt2lab.model import GPT
from gpt2lab.train.batches import check_data_fits
from gpt2lab.train.checkpoints import BEST, LAST, RunState, restore_checkpoint, rng_tensors, save_checkpoint
from gpt2lab.train.flops import flops_per_token, peak_flops
from gpt2lab.train.optim import learning_rate, make_optimizer, optimizer_tensors, set_learning_rate
from gpt2lab.train.run_dir import CONFIG_FILE, checkpoint_to_resume, run_lock
from gpt2lab.train.run_log import RunLog
from gpt2lab.train.runtime import Runtime, backend_settings, runtime_from_env
from gpt2lab.train.step import TrainingLoss, bits_per_byte, evaluate, optimizer_step
from gpt2lab.train.stopping import (SIGNALLED, TIME_UP, StopSignals, TrainingDiverged, TrainingInterrupted,
                                    nonfinite_parameters, stop_code)


@dataclass
class RunResult:
    """What `train` returns: where things were written and the final numbers."""

    out_dir: Path
    checkpoint: Path | None
    state: RunState
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this session
    tokens_per_s: float = 0.0


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
    lock = run_lock(Path(config.out_dir)) if runtime.is_main else contextlib.nullcontext()
    with lock:  # no other process runs in out_dir until this run ends
        ckpt = checkpoint_to_resume(config, resume, overwrite)
        threads = config.threads or max(1, (os.cpu_count() or 1) // runtime.local_world_size)
        with backend_settings(runtime.device, threads):  # thread count, TF32: restored when the run ends
            return _run(config, runtime, ckpt, threads, fresh_optimizer, progress)


def _run(config: TrainConfig, runtime: Runtime, ckpt: Path | None, threads: int, fresh_optimizer: bool,
         progress: bool) -> RunResult:
    """The body of `train`, with the run directory checked and the backend switches set."""
    out_dir = Path(config.out_dir)
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

    pending: list[tuple[torch.Tensor, float]] = []  # (loss, lr) of the steps whose loss is not read yet

    def diverged(what: str, step: int | None = None, at_lr: float | None = None) -> TrainingDiverged:
        kept = (f"the last good checkpoint, {out_dir / LAST} (step {saved_step}), is kept" if saved_step is not None
                else "no checkpoint had been written")
        step, at_lr = state.step if step is None else step, lr if at_lr is None else at_lr
        return TrainingDiverged(f"step {step}: {what} (lr {at_lr:.3g}): the run diverged and stopped; {kept}. "
                                f"Lower lr or raise warmup_steps, then start again or continue with "
                                f"--resume {out_dir} --set lr=...")

    def read_losses() -> None:
        """Bring the pending steps' losses to the host in one transfer (not one sync per step: a GPU keeps
        running ahead) and stop at the first non-finite one. Runs before every log line and every checkpoint."""
        if not pending:
            return
        values = torch.stack([loss for loss, _ in pending]).tolist()
        first_step = state.step - len(pending) + 1
        for i, (value, (_, step_lr)) in enumerate(zip(values, pending)):
            if not math.isfinite(value):
                pending.clear()
                if log is not None:
                    log.write({"step": first_step + i, "loss": value, "lr": step_lr, "diverged": True})
                raise diverged(f"the training loss is {value}", first_step + i, step_lr)
        pending.clear()
        result.losses.extend(values)
        state.last_train_loss = values[-1]

    def checkpoint(name: str, with_optimizer: bool = True) -> None:
        nonlocal saved_step
        read_losses()
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
            stop = stop_code(bool(budget_s) and runtime.is_main and elapsed() >= budget_s,
                             signals.received is not None, runtime)
            if stop == SIGNALLED:
                raise interrupted(signals.received or signal.SIGTERM)  # another process may have had the signal
            if stop == TIME_UP:
                break
            lr = learning_rate(state.step, config, elapsed() / budget_s if budget_s and config.clock_schedule else 0.0)
            set_learning_rate(optimizer, lr)
            pending.append((optimizer_step(step_model, model, optimizer, data, config, runtime,
                                           state.micro_batches), lr))
            state.step += 1
            state.micro_batches += config.grad_accum * runtime.world_size
            state.tokens += tokens_per_step
            window_tokens += tokens_per_step
            if state.step % config.log_interval == 0 or state.step == config.max_steps:
                read_losses()
                loss = state.last_train_loss
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
        read_losses()
        if evaluated_at != state.step and state.step > 0:
            run_eval()
        _advance(bar, 100.0)  # the run is over, whichever limit ended it
    model.logits_workspace.clear()  # the fused loss's (N, V) buffer is not needed after training
    state.elapsed_s = elapsed()
    return result


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
