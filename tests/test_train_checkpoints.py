"""Checkpoints (train/checkpoints.py): exact resume, crash-safe writes, a full disk, missing AdamW state."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import tiny_run, weights
from gpt2lab import train as T
from gpt2lab.checkpoint import load_model
from gpt2lab.cli import main as cli_main
from gpt2lab.config import GPTConfig, train_config_to_toml
from gpt2lab.train import checkpoints
from gpt2lab.train.run_dir import LOCK_FILE


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(char_data, tmp_path, optimizer):
    """N steps straight == N/2 steps, stop, resume (a new model, optimizer and process state), N/2 more."""
    model = GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    straight = T.train(tiny_run(char_data, tmp_path / "a", model=model, optimizer=optimizer), progress=False)
    half = tiny_run(char_data, tmp_path / "b", model=model, optimizer=optimizer, max_steps=4, decay_steps=8)
    first = T.train(half, progress=False)
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it (dropout)
    assert cli_main(["train", "--resume", str(tmp_path / "b"), "--set", "max_steps=8", "--no-progress"]) == 0
    second_losses = [r["loss"] for r in T.iter_log(tmp_path / "b") if "loss" in r]
    assert first.losses + second_losses[4:] == pytest.approx(straight.losses, abs=0)  # bit-identical
    assert second_losses[:4] == first.losses
    a, b = weights(tmp_path / "a" / "last"), weights(tmp_path / "b" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(tmp_path / "a" / "last" / "optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "b" / "last" / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    slot = "momentum_buffer" if optimizer == "muon" else "exp_avg"
    assert f"optim.h.0.attn.c_attn.weight.{slot}" in opt_a and "optim.wte.weight.exp_avg" in opt_a


def test_an_error_while_writing_a_checkpoint_keeps_the_previous_one(char_data, tmp_path, monkeypatch):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100, checkpoint_interval=2)
    real_save = checkpoints.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        T.train(cfg, progress=False)
    state, _, tensors = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 2 and tensors
    load_model(tmp_path / "run" / "last")
    assert not [p for p in (tmp_path / "run").iterdir()
                if p.name.startswith(".") and p.name != LOCK_FILE]  # temp directory removed


KILL_SCRIPT = """
import sys, time
import gpt2lab.train as T
import gpt2lab.train.checkpoints as checkpoints
from gpt2lab.config import load_train_config

calls = []
real = checkpoints.write_model_files

def write_then_hang(model, directory, tokenizer=None):
    calls.append(directory)
    real(model, directory, tokenizer)
    if len(calls) == 2:  # the second checkpoint: weights written, state not yet; signal the test and wait for the kill
        open(sys.argv[2], "w").close()
        time.sleep(120)

checkpoints.write_model_files = write_then_hang
T.train(load_train_config(sys.argv[1]), progress=False)
"""


def test_killing_the_process_mid_checkpoint_leaves_the_previous_one_intact(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100, checkpoint_interval=2)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "run.toml"), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[0].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 2  # the checkpoint of step 4 never replaced it
    assert any(p.name.startswith(".last.tmp") for p in (tmp_path / "run").iterdir())  # the half-written one
    load_model(tmp_path / "run" / "last")
    result = T.train(cfg, resume=True, progress=False)
    assert result.state.step == 6 and len(result.losses) == 4


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device")])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch,
                                                                                        capsys, error):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100, checkpoint_interval=2)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))
    real_save, calls = checkpoints.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise error
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    assert cli_main(["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert f"could not write the checkpoint {tmp_path / 'run' / 'last'} at step 4" in err and "intact" in err
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 2
    load_model(tmp_path / "run" / "last")


def test_resume_without_optimizer_state_needs_fresh_optimizer(char_data, tmp_path, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    T.train(cfg, progress=False)
    (tmp_path / "run" / "last" / "optimizer.safetensors").unlink()
    more = dataclasses.replace(cfg, max_steps=3)
    with pytest.raises(FileNotFoundError, match="no optimizer state .* pass --fresh-optimizer"):
        T.train(more, resume=True, progress=False)
    with pytest.raises(ValueError, match="only applies when resuming"):
        T.train(more, overwrite=True, fresh_optimizer=True, progress=False)
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--set", "max_steps=3", "--fresh-optimizer",
                     "--no-progress"]) == 0
    state, _, tensors = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 3 and any(k.startswith("optim.") for k in tensors)


@pytest.mark.parametrize("change, message", [({"step": "abc"}, "step must be an integer >= 0, got 'abc'"),
                                             ({"step": -5}, "step must be an integer >= 0, got -5"),
                                             ({"micro_batches": None}, "micro_batches must be an integer"),
                                             ({"elapsed_s": "x"}, "elapsed_s must be a finite number")])
def test_a_checkpoints_state_file_is_checked_field_by_field(char_data, tmp_path, change, message):
    import json

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=100, checkpoint_interval=1)
    T.train(cfg, progress=False)
    path = tmp_path / "run" / "last" / "training_state.json"
    payload = json.loads(path.read_text())
    good = dict(payload["state"])
    payload["state"].update(change)
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=f"training_state.json: {message}"):
        T.read_training_state(tmp_path / "run" / "last")
    payload["state"] = {k: v for k, v in good.items() if k != "micro_batches"}
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="has no 'micro_batches', which resuming needs"):
        T.read_training_state(tmp_path / "run" / "last")
