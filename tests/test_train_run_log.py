"""The run log (train/run_log.py): a full disk while logging is one line."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_run
from gpt2lab import train as T
from gpt2lab.cli import main as cli_main
from gpt2lab.config import train_config_to_toml
from gpt2lab.train import run_log


def test_a_full_disk_while_logging_is_one_line(char_data, tmp_path, monkeypatch, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=2)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))

    def full_disk_open(path, mode="r", *args, **kwargs):
        if mode == "a" and Path(path).name == "log.jsonl" and len(list(T.iter_log(tmp_path / "run"))) >= 3:
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_log, "open", full_disk_open, raising=False)
    assert cli_main(["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"could not append to {tmp_path / 'run' / 'log.jsonl'}" in err
    assert T.read_training_state(tmp_path / "run" / "last")[0].step == 2
