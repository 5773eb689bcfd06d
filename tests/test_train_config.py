"""Training configs: TOML files, key=value overrides and their errors, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab import quickstart as Q
from gpt2lab.config import load_train_config, parse_override, train_config_to_toml


REPO = Path(__file__).resolve().parents[1]


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 3e-4\nseq_len = 64\ndtype = "bf16"\n[model]\npreset = "tiny"\nn_layer = 3\n')
    cfg = load_train_config(path, ["batch_size=2", "model.n_embd=96", "out_dir=runs/x", "compile=true"])
    assert (cfg.lr, cfg.dtype, cfg.batch_size, cfg.out_dir, cfg.compile) == (3e-4, "bf16", 2, "runs/x", True)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_ctx) == (3, 96, 128)  # rest from the tiny preset
    assert load_train_config(None, ["model.n_layer=2"]).model.n_embd == 128  # a partial table starts from mini
    (tmp_path / "again.toml").write_text(train_config_to_toml(cfg))
    assert load_train_config(tmp_path / "again.toml") == cfg
    assert parse_override("lr=1e-3") == ("lr", 1e-3) and parse_override("data_dir=a/b") == ("data_dir", "a/b")
    for bad, message in [(["lr_max=1"], r"unknown training config key\(s\) 'lr_max'; allowed: data_dir"),
                         (["dtype=fp16"], r"TrainConfig.dtype 'fp16' is unknown; choose one of: fp32, bf16"),
                         (["batch_size=0"], r"TrainConfig.batch_size must be an integer >= 1, got 0"),
                         (["seq_len=4096"], r"seq_len \(4096\) exceeds the model's context model.n_ctx \(256\)"),
                         (["model.vocab_size=10"], "comes from the data's tokenizer"),
                         (["model.n_layers=2"], r"unknown model config key\(s\) 'n_layers'"),
                         (["beta2=1.0"], r"TrainConfig.beta2 must be a number in \[0, 1\), got 1.0"),
                         (["max_minutes=inf"], r"max_minutes must be a finite number >= 0, got inf"),
                         (["lr=nan"], r"TrainConfig.lr must be a finite number > 0, got nan"),
                         (["lr=0"], r"TrainConfig.lr must be a finite number > 0, got 0"),
                         (["min_lr=1"], r"min_lr \(1\) must not exceed lr"),
                         (["nonsense"], "--set expects key=value")]:
        with pytest.raises(ValueError, match=message):
            load_train_config(None, bad)
    path.write_text("lr = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_train_config(path)
    path.write_text('model = "tiny"\n')  # a string where the model table goes, then a field of it set
    with pytest.raises(ValueError, match="--set model.n_layer: 'model' must be a table"):
        load_train_config(path, ["model.n_layer=1"])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_train_config(tmp_path)


def test_shipped_configs_load_and_quickstart_matches_its_file():
    for name in ("quickstart", "shakespeare_char", "gpt2_124m", "speedrun"):
        load_train_config(REPO / "configs" / f"{name}.toml")
    speedrun = load_train_config(REPO / "configs" / "speedrun.toml")
    assert (speedrun.optimizer, speedrun.max_minutes, speedrun.clock_schedule) == ("muon", 5.0, True)
    assert load_train_config(REPO / "configs" / "quickstart.toml") == Q.QUICKSTART
    big = load_train_config(REPO / "configs" / "gpt2_124m.toml")
    assert big.batch_size * big.seq_len * big.grad_accum * 8 == 524_288


@pytest.mark.parametrize("name", ["quickstart", "shakespeare_char", "speedrun"])
def test_cpu_configs_promise_a_duration_the_clock_keeps(name):
    """A config that says how long it takes on a CPU stops by the clock, so the promise holds on any machine."""
    text = (REPO / "configs" / f"{name}.toml").read_text()
    cfg = load_train_config(REPO / "configs" / f"{name}.toml")
    minutes = {60.0: "an hour", 5.0: "5 minutes"}
    assert cfg.max_minutes in minutes and minutes[cfg.max_minutes] in text and "CPU" in text
