"""The quickstart recipe (gpt2lab/quickstart.py): prepare, train for minutes, sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2lab import quickstart as Q
from gpt2lab.checkpoint import load_model
from gpt2lab.cli import main as cli_main
from gpt2lab.config import load_train_config
from gpt2lab.data import TokenData
from gpt2lab.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory) -> Path:
    from gpt2lab.data import obtain_builtin

    home = tmp_path_factory.mktemp("gpt2lab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(home))
        obtain_builtin("shakespeare")
    return home


def test_quickstart_end_to_end(shakespeare_cache, tmp_path, monkeypatch, capsys):
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("GPT2LAB_CACHE", str(shakespeare_cache))
    out, data_dir = tmp_path / "runs" / "quickstart", tmp_path / "data"
    code = cli_main(["quickstart", "--minutes", "0.05", "--out", str(out), "--data-dir", str(data_dir),
                     "--samples", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ROMEO:\n" in printed and "JULIET:\n" in printed and "bits/byte" in printed
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["source"] == "shakespeare" and meta["splits"]["train"]["documents"] == 42
    for name in ("config.toml", "log.jsonl", "loss.png", "best/model.safetensors", "last/optimizer.safetensors"):
        assert (out / name).is_file(), name
    assert load_train_config(out / "config.toml").max_minutes == 0.05
    ours = load_model(out / "best")
    theirs = GPT2LMHeadModel.from_pretrained(out / "best").eval()
    tok = load_tokenizer(out / "best")
    idx = torch.tensor([tok.encode("ROMEO:\nWhat light")])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    again = ["quickstart", "--minutes", "0.02", "--out", str(out), "--data-dir", str(data_dir), "--samples", "0",
             "--no-progress"]
    before = (out / "last" / "model.safetensors").read_bytes()
    assert cli_main(again) == 1  # an earlier run is not replaced silently
    err = capsys.readouterr().err
    assert "already holds a run" in err and "pass --overwrite" in err
    assert (out / "last" / "model.safetensors").read_bytes() == before
    assert cli_main([*again, "--overwrite"]) == 0
    assert load_train_config(out / "config.toml").max_minutes == 0.02


def test_ensure_prepared_redoes_a_damaged_preparation_of_its_own_and_refuses_another(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("to be or not to be, that is the question. " * 200)
    data = Q.ensure_prepared(str(source), "char", tmp_path / "data", progress=False)
    shard = next(data.glob("train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a damaged shard of the same preparation
    Q.ensure_prepared(str(source), "char", data, progress=False)  # prepared again, not refused
    TokenData(data)  # whole again
    other = tmp_path / "other.txt"
    other.write_text("a different corpus " * 200)
    with pytest.raises(FileExistsError, match="overwrite"):  # another preparation is not replaced silently
        Q.ensure_prepared(str(other), "char", data, progress=False)
    from gpt2lab.data import read_meta

    assert read_meta(data)["source"] == str(source)
