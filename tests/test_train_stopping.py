"""Stopping early without losing work (train/stopping.py): divergence, Ctrl-C and SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_run, weights
from gpt2lab import train as T
from gpt2lab.cli import main as cli_main
from gpt2lab.config import train_config_to_toml
from gpt2lab.train import loop


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(char_data, tmp_path, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    T.train(cfg, progress=False)
    good = weights(tmp_path / "run" / "last")
    code = cli_main(["train", "--resume", str(tmp_path / "run"), "--set", "max_steps=8", "--set", "lr=1e30",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "diverged" in err and f"{tmp_path / 'run' / 'last'} (step 2), is kept" in err
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    now = weights(tmp_path / "run" / "last")
    assert state.step == 2 and all(torch.equal(good[k], now[k]) for k in good)
    records = strict_json_lines(tmp_path / "run" / "log.jsonl")
    assert records[-1]["diverged"] is True and records[-1]["loss"] is None


def test_nonfinite_weights_are_never_checkpointed(char_data, tmp_path, monkeypatch):
    real_step, calls = loop.optimizer_step, []

    def poisoning_step(step_model, model, *args):
        calls.append(1)
        loss = real_step(step_model, model, *args)
        if len(calls) == 2:
            with torch.no_grad():
                model.ln_f.weight[0] = float("inf")  # the loss of this step was finite; the weights are not
        return loss

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=4, eval_interval=100, checkpoint_interval=2)
    monkeypatch.setattr(loop, "optimizer_step", poisoning_step)
    with pytest.raises(ValueError, match=r"step 2: the weights hold inf or NaN \(ln_f.weight\)"):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run" / "last").exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(char_data, tmp_path, monkeypatch):
    straight = T.train(tiny_run(char_data, tmp_path / "straight", max_steps=6, eval_interval=100), progress=False)
    real_step, calls = loop.optimizer_step, []

    def step_then_interrupt(*args):
        calls.append(1)
        loss = real_step(*args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does, in the middle of the run
        return loss

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100)
    monkeypatch.setattr(loop, "optimizer_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="SIGINT: stopped at step 3; checkpoint .*last") as stopped:
        T.train(cfg, progress=False)
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 3 and stopped.value.checkpoint == tmp_path / "run" / "last"
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    resumed = T.train(cfg, resume=True, progress=False)
    assert resumed.state.step == 6 and resumed.losses == pytest.approx(straight.losses[3:], abs=0)


SIGTERM_SCRIPT = "import sys; from gpt2lab.cli import main; sys.exit(main(sys.argv[1:]))"


def test_sigterm_saves_a_resumable_checkpoint_and_says_where(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=100_000, eval_interval=100_000)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, "train", "--config", str(tmp_path / "run.toml"),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "run" / "log.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and f"checkpoint {tmp_path / 'run' / 'last'}; continue with" in err.splitlines()[-1]
    state, _, tensors = T.read_training_state(tmp_path / "run" / "last")
    assert state.step >= 3 and any(k.startswith("optim.") for k in tensors)
    resumed = T.train(dataclasses.replace(cfg, max_steps=state.step + 2), resume=True, progress=False)
    assert resumed.state.step == state.step + 2 and len(resumed.losses) == 2


def test_losses_read_in_batches_still_stop_at_the_step_that_diverged(char_data, tmp_path, monkeypatch):
    """The loop reads the losses only at log lines and checkpoints (no host sync per step); a non-finite loss is
    still reported at its own step, and no checkpoint is written after it."""
    real_step, calls = loop.optimizer_step, []

    def nan_at_step_3(*args):
        calls.append(1)
        loss = real_step(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=8, log_interval=5, eval_interval=100, checkpoint_interval=4)
    monkeypatch.setattr(loop, "optimizer_step", nan_at_step_3)
    with pytest.raises(T.TrainingDiverged, match=r"^step 3: the training loss is nan"):
        T.train(cfg, progress=False)
    assert len(calls) == 4 and not (tmp_path / "run" / "last").exists()  # caught at step 4's checkpoint
    records = strict_json_lines(tmp_path / "run" / "log.jsonl")
    assert records == [{"step": 3, "loss": None, "lr": pytest.approx(T.learning_rate(2, cfg)), "diverged": True}]


def test_every_steps_loss_is_returned_when_the_log_skips_steps(char_data, tmp_path):
    every = T.train(tiny_run(char_data, tmp_path / "a", max_steps=7, log_interval=1, eval_interval=100),
                    progress=False)
    sparse = T.train(tiny_run(char_data, tmp_path / "b", max_steps=7, log_interval=3, eval_interval=100),
                     progress=False)
    assert len(sparse.losses) == 7 and sparse.losses == every.losses
    assert sparse.state.last_train_loss == every.losses[-1]
