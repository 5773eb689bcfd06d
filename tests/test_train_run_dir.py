"""The run directory (train/run_dir.py): a fresh run does not overwrite; a run resumes from its checkpoint alone."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import tiny_run
from gpt2lab import train as T
from gpt2lab.cli import main as cli_main
from gpt2lab.config import TrainConfig


def test_a_fresh_run_does_not_overwrite_and_resume_needs_a_checkpoint(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        T.train(cfg, resume=True, progress=False)
    T.train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        T.train(cfg, progress=False)
    assert T.train(cfg, overwrite=True, progress=False).state.step == 2


def test_resume_without_config_toml_uses_the_checkpoints_config(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    T.train(cfg, progress=False)
    (tmp_path / "run" / "config.toml").unlink()
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--set", "max_steps=3", "--no-progress"]) == 0
    state, saved, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 3
    assert TrainConfig.from_dict(saved) == dataclasses.replace(cfg, max_steps=3)  # the whole run config is kept
    with pytest.raises(FileNotFoundError, match="neither config.toml nor a checkpoint"):
        T.load_run_config(tmp_path / "elsewhere")


def test_a_damaged_checkpoint_directory_is_refused_before_any_training(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=100, checkpoint_interval=1)
    T.train(cfg, progress=False)
    (tmp_path / "run" / "last" / "config.json").write_text("{")  # damaged by hand
    more = dataclasses.replace(cfg, max_steps=4)
    with pytest.raises(FileExistsError, match="last is not a gpt2lab model directory"):
        T.train(more, resume=True, progress=False)
    assert (tmp_path / "run" / "last" / "config.json").read_text() == "{"


def test_a_second_run_in_the_same_out_dir_is_refused_while_the_first_runs(char_data, tmp_path):
    import fcntl
    import os

    from gpt2lab.train.run_dir import LOCK_FILE, run_lock

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    with run_lock(tmp_path / "run"):  # as another run holds it (flock locks per open file, so this process counts)
        with open(tmp_path / "run" / LOCK_FILE, encoding="utf-8") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert f.read().strip() == str(os.getpid())
        with pytest.raises(FileExistsError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            T.train(cfg, progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing else written
    T.train(cfg, progress=False)  # the lock is gone with its holder
    T.train(cfg, resume=True, progress=False)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with run_lock(tmp_path / "theirs"):  # a directory of other files gets no lock file
        pass
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]
