"""The training loop (train/loop.py): the loss falls, the run directory, bf16, fine-tuning, DDP, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run, weights
from gpt2lab import train as T
from gpt2lab.checkpoint import load_model
from gpt2lab.config import load_train_config, train_config_to_toml
from gpt2lab.data import prepare
from gpt2lab.model import GPT
from gpt2lab.tokenizer import load_tokenizer


def test_training_lowers_the_loss_and_writes_the_run_directory(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=40, eval_interval=20, lr=1e-2, warmup_steps=5)
    result = T.train(cfg, progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 40 and last < first - 0.5
    out = tmp_path / "run"
    assert load_train_config(out / "config.toml") == cfg
    records = list(T.iter_log(out))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_bpb"] > 0
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "last" / "training_state.json").read_text())
    assert state["state"]["step"] == 40 and state["state"]["tokens"] == 40 * 4 * 16
    assert (out / "best" / "config.json").is_file() and not (out / "best" / "optimizer.safetensors").exists()
    assert result.state.best_val_loss == min(r["val_loss"] for r in evals)
    assert load_tokenizer(out / "last").vocab_size == load_model(out / "last").config.vocab_size


def test_checkpoint_loads_in_transformers_with_the_same_logits(char_data, tmp_path):
    from transformers import GPT2LMHeadModel

    T.train(tiny_run(char_data, tmp_path / "run", max_steps=3, eval_interval=3), progress=False)
    ours = load_model(tmp_path / "run" / "last")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "last").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains(char_data, tmp_path):
    result = T.train(tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2, dtype="bf16"), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert load_file(str(tmp_path / "run" / "last" / "model.safetensors"))["transformer.wte.weight"].dtype == torch.float32


def test_init_from_fine_tunes_a_model_directory(char_data, tmp_path):
    base = T.train(tiny_run(char_data, tmp_path / "base", max_steps=30, eval_interval=30, lr=1e-2), progress=False)
    tuned = T.train(tiny_run(char_data, tmp_path / "tuned", max_steps=1, eval_interval=1, warmup_steps=0,
                             init_from=str(tmp_path / "base" / "last")), progress=False)
    fresh = T.train(tiny_run(char_data, tmp_path / "fresh", max_steps=1, eval_interval=1), progress=False)
    assert tuned.losses[0] < fresh.losses[0] - 0.5
    assert abs(tuned.losses[0] - base.losses[-1]) < 0.5
    other = tmp_path / "other.txt"
    other.write_text("completely different characters: 0123456789 XYZ {}[]\n" * 50)
    prepare(str(other), tmp_path / "other", tokenizer="char", progress=False)
    with pytest.raises(ValueError, match="has vocab_size .* but the data's tokenizer has"):
        T.train(tiny_run(tmp_path / "other", tmp_path / "bad", init_from=str(tmp_path / "base" / "last")), progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_gradient_accumulation(char_data, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 steps == 1 process with grad_accum=2 over the same micro-batches."""
    ddp = tiny_run(char_data, tmp_path / "ddp", max_steps=2, eval_interval=2, grad_accum=1)
    (tmp_path / "ddp.toml").write_text(train_config_to_toml(ddp))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "gpt2lab.cli", "train",
           "--config", str(tmp_path / "ddp.toml"), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = T.train(dataclasses.replace(ddp, out_dir=str(tmp_path / "single"), grad_accum=2), progress=False)
    ddp_losses = [r["loss"] for r in T.iter_log(tmp_path / "ddp") if "loss" in r]
    assert ddp_losses == pytest.approx(single.losses, rel=1e-5)
    a, b = weights(tmp_path / "ddp" / "last"), weights(tmp_path / "single" / "last")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    torch.manual_seed(ddp.seed)
    init = GPT(dataclasses.replace(ddp.model, vocab_size=load_model(tmp_path / "ddp" / "last").config.vocab_size))
    assert not torch.equal(init.wte.weight, a["transformer.wte.weight"])  # the step did change the weights
    state = json.loads((tmp_path / "ddp" / "last" / "training_state.json").read_text())["state"]
    assert state["micro_batches"] == 4 and state["tokens"] == 2 * 2 * 4 * 16


def test_the_progress_bar_follows_the_limit_that_ends_the_run(char_data, tmp_path, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=4, eval_interval=4, max_minutes=60.0)
    T.train(cfg, progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    assert "train: 100%" in final and "step=4/4" in final  # the steps ended the run, not the hour
    assert T.progress_fraction(2, 60.0, cfg) == 0.5 and T.progress_fraction(1, 1800.0, cfg) == 0.5


def test_train_puts_back_the_thread_count_it_set(char_data, tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    T.train(tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2, threads=other), progress=False)
    assert torch.get_num_threads() == before


def test_backend_settings_restore_tf32_and_threads():
    """On a GPU a run turns TF32 matmuls on; the switches are process-wide, so they go back when the run ends (the
    flags can be read and set without a GPU, so this runs everywhere)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.get_num_threads())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        with T.backend_settings(torch.device("cuda"), threads=1):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        with pytest.raises(RuntimeError, match="inside"), T.backend_settings(torch.device("cpu"), threads=1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == saved[3]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        torch.set_num_threads(saved[3])
