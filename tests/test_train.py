"""Training: config files, schedule, the loop, exact resume, crash-safe checkpoints, DDP, fine-tuning, quickstart."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2lab import train as T
from gpt2lab.checkpoint import load_model
from gpt2lab.cli import main as cli_main
from gpt2lab.config import GPTConfig, TrainConfig, load_train_config, parse_override, train_config_to_toml
from gpt2lab.data import prepare
from gpt2lab.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die: to sleep;", "No more; and by a sleep to say we end"]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    """A small char-level corpus (~12 KB), prepared once for the module."""
    root = tmp_path_factory.mktemp("char-data")
    text = "\n".join(LINES[(i * 7) % len(LINES)] for i in range(300)) + "\n"
    (root / "hamlet.txt").write_text(text)
    prepare(str(root / "hamlet.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


def tiny_run(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir),
                       model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32),
                       batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8,
                       eval_interval=4, eval_iters=2, log_interval=1, threads=1, seed=7)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------- config
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
                         (["beta2=1.0"], r"beta2 must be in \[0, 1\)"),
                         (["max_minutes=inf"], r"max_minutes must be a finite number >= 0, got inf"),
                         (["lr=nan"], r"lr must be a finite number >= 0, got nan"),
                         (["min_lr=1"], r"min_lr \(1\) must not exceed lr"),
                         (["nonsense"], "--set expects key=value")]:
        with pytest.raises(ValueError, match=message):
            load_train_config(None, bad)
    path.write_text("lr = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_train_config(path)


def test_shipped_configs_load_and_quickstart_matches_its_file():
    for name in ("quickstart", "shakespeare_char", "gpt2_124m"):
        load_train_config(REPO / "configs" / f"{name}.toml")
    assert load_train_config(REPO / "configs" / "quickstart.toml") == T.QUICKSTART
    big = load_train_config(REPO / "configs" / "gpt2_124m.toml")
    assert big.batch_size * big.seq_len * big.grad_accum * 8 == 524_288


@pytest.mark.parametrize("name", ["quickstart", "shakespeare_char"])
def test_cpu_configs_promise_a_duration_the_clock_keeps(name):
    """A config that says how long it takes on a CPU stops by the clock, so the promise holds on any machine."""
    text = (REPO / "configs" / f"{name}.toml").read_text()
    cfg = load_train_config(REPO / "configs" / f"{name}.toml")
    minutes = {60.0: "an hour", 5.0: "5 minutes"}
    assert cfg.max_minutes in minutes and minutes[cfg.max_minutes] in text and "CPU" in text


# --------------------------------------------------------------------------------------------------- pieces
def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [T.learning_rate(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert T.learning_rate(20, cfg, time_fraction=1.0) == pytest.approx(0.1)  # the clock can end the decay early
    assert T.learning_rate(20, dataclasses.replace(cfg, decay_steps=30)) == pytest.approx(0.55)


def test_weight_decay_only_on_matrices_and_each_tensor_once():
    model = T.GPT(GPTConfig(vocab_size=50, n_ctx=8, n_layer=2, n_head=2, n_embd=8))
    decay, no_decay = T.parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p is model.wte.weight for p in decay["params"]) == 1  # the tied LM head is not counted twice
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_flops_and_peak_are_sane():
    cfg = GPTConfig.preset("gpt2")
    # 6N (N: the 85M block weights and the 38.6M LM head a token passes through) + attention 12·L·C·T
    assert T.flops_per_token(cfg, 1024) == 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert T.flops_per_token(cfg, 1024) == pytest.approx(6 * 124e6 + 113e6, rel=0.01)  # nanoGPT's estimate
    peak, how = T.peak_flops(torch.device("cpu"), "fp32", threads=2)
    assert peak > 1e9 and "FLOP/cycle" in how


# --------------------------------------------------------------------------------------------------- the loop
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


def test_resume_continues_exactly(char_data, tmp_path):
    """N steps straight == N/2 steps, stop, resume (a new model, optimizer and process state), N/2 more."""
    straight = T.train(tiny_run(char_data, tmp_path / "a", model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32,
                                                                           dropout=0.1)), progress=False)
    half = tiny_run(char_data, tmp_path / "b", model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1),
                    max_steps=4, decay_steps=8)
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


def test_a_fresh_run_does_not_overwrite_and_resume_needs_a_checkpoint(char_data, tmp_path):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=2, eval_interval=2)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        T.train(cfg, resume=True, progress=False)
    T.train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        T.train(cfg, progress=False)
    assert T.train(cfg, overwrite=True, progress=False).state.step == 2


def test_an_error_while_writing_a_checkpoint_keeps_the_previous_one(char_data, tmp_path, monkeypatch):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100, checkpoint_interval=2)
    real_save = T.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(T, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        T.train(cfg, progress=False)
    state, _, tensors = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 2 and tensors
    load_model(tmp_path / "run" / "last")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # temp directory removed


KILL_SCRIPT = """
import sys, time
import gpt2lab.train as T
from gpt2lab.config import load_train_config

calls = []
real = T.write_model_files

def write_then_hang(model, directory):
    calls.append(directory)
    real(model, directory)
    if len(calls) == 2:  # the second checkpoint: weights written, state not yet; signal the test and wait for the kill
        open(sys.argv[2], "w").close()
        time.sleep(120)

T.write_model_files = write_then_hang
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


# ------------------------------------------------------------------------------------------------------- DDP
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
    init = T.GPT(dataclasses.replace(ddp.model, vocab_size=load_model(tmp_path / "ddp" / "last").config.vocab_size))
    assert not torch.equal(init.wte.weight, a["transformer.wte.weight"])  # the step did change the weights
    state = json.loads((tmp_path / "ddp" / "last" / "training_state.json").read_text())["state"]
    assert state["micro_batches"] == 4 and state["tokens"] == 2 * 2 * 4 * 16


# ------------------------------------------------------------------------------------------------ quickstart
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


# ------------------------------------------------------------------------------------ nothing lost (issue #12)
def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("val_fraction, split", [(0.0, "val"), (0.1, "train")])
def test_data_too_short_for_one_window_is_refused_before_the_first_step(tmp_path, val_fraction, split):
    text = "\n".join(LINES) + "\n" if split == "val" else "To be, or not.\nTo sleep.\n"
    (tmp_path / "t.txt").write_text(text)
    prepare(str(tmp_path / "t.txt"), tmp_path / "data", tokenizer="char", val_fraction=val_fraction, progress=False)
    cfg = tiny_run(tmp_path / "data", tmp_path / "run", seq_len=32)
    with pytest.raises(ValueError) as refused:
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before any step, log or checkpoint
    hint = "--val-fraction" if split == "val" else "more text or lower seq_len"
    assert re.search(rf"the {split} split of .* tokens, too few for one window of seq_len \+ 1 = 33 .*{hint}",
                     str(refused.value))


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
    real_step, calls = T._optimizer_step, []

    def poisoning_step(step_model, model, *args):
        calls.append(1)
        loss = real_step(step_model, model, *args)
        if len(calls) == 2:
            with torch.no_grad():
                model.ln_f.weight[0] = float("inf")  # the loss of this step was finite; the weights are not
        return loss

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=4, eval_interval=100, checkpoint_interval=2)
    monkeypatch.setattr(T, "_optimizer_step", poisoning_step)
    with pytest.raises(ValueError, match=r"step 2: the weights hold inf or NaN \(ln_f.weight\)"):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run" / "last").exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(char_data, tmp_path, monkeypatch):
    straight = T.train(tiny_run(char_data, tmp_path / "straight", max_steps=6, eval_interval=100), progress=False)
    real_step, calls = T._optimizer_step, []

    def step_then_interrupt(*args):
        calls.append(1)
        loss = real_step(*args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does, in the middle of the run
        return loss

    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100)
    monkeypatch.setattr(T, "_optimizer_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="SIGINT: stopped at step 3; checkpoint .*last") as stopped:
        T.train(cfg, progress=False)
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 3 and stopped.value.checkpoint == tmp_path / "run" / "last"
    monkeypatch.setattr(T, "_optimizer_step", real_step)
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


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device")])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(char_data, tmp_path, monkeypatch,
                                                                                        capsys, error):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=100, checkpoint_interval=2)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))
    real_save, calls = T.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise error
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(T, "save_file", full_disk)
    assert cli_main(["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert f"could not write the checkpoint {tmp_path / 'run' / 'last'} at step 4" in err and "intact" in err
    state, _, _ = T.read_training_state(tmp_path / "run" / "last")
    assert state.step == 2
    load_model(tmp_path / "run" / "last")


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


def test_the_progress_bar_follows_the_limit_that_ends_the_run(char_data, tmp_path, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=4, eval_interval=4, max_minutes=60.0)
    T.train(cfg, progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    assert "train: 100%" in final and "step=4/4" in final  # the steps ended the run, not the hour
    assert T.progress_fraction(2, 60.0, cfg) == 0.5 and T.progress_fraction(1, 1800.0, cfg) == 0.5


def test_a_full_disk_while_logging_is_one_line(char_data, tmp_path, monkeypatch, capsys):
    cfg = tiny_run(char_data, tmp_path / "run", max_steps=6, eval_interval=2)
    (tmp_path / "run.toml").write_text(train_config_to_toml(cfg))

    def full_disk_open(path, mode="r", *args, **kwargs):
        if mode == "a" and Path(path).name == "log.jsonl" and len(list(T.iter_log(tmp_path / "run"))) >= 3:
            raise OSError(28, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(T, "open", full_disk_open, raising=False)
    assert cli_main(["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"could not append to {tmp_path / 'run' / 'log.jsonl'}" in err
    assert T.read_training_state(tmp_path / "run" / "last")[0].step == 2


def test_ensure_prepared_redoes_a_damaged_preparation_of_its_own_and_refuses_another(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("to be or not to be, that is the question. " * 200)
    data = T.ensure_prepared(str(source), "char", tmp_path / "data", progress=False)
    shard = next(data.glob("train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-8])  # a damaged shard of the same preparation
    T.ensure_prepared(str(source), "char", data, progress=False)  # prepared again, not refused
    T.TokenData(data)  # whole again
    other = tmp_path / "other.txt"
    other.write_text("a different corpus " * 200)
    with pytest.raises(FileExistsError, match="overwrite"):  # another preparation is not replaced silently
        T.ensure_prepared(str(other), "char", data, progress=False)
    from gpt2lab.data import read_meta

    assert read_meta(data)["source"] == str(source)
