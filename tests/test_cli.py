"""The command line: output of `info`, one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpt2lab.cli import main


def test_info_preset(capsys):
    assert main(["info", "tiny", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, 2 heads of 32, width 64" in out
    assert "attn.c_attn" in out and "lm_head (tied to wte)" in out
    assert "forward (1, 16)" in out and "tokens/s" in out
    # what this CPU reports, and the layers choose_kernels gives it
    from gpt2lab import quantize
    from gpt2lab.cpu import cpu_features

    assert f"CPU: {cpu_features().name};" in out
    plan = quantize.plan_for_this_cpu("bf16")
    assert f"bf16 layers on {torch.get_num_threads()} thread(s): blocks {plan.block.__name__}" in out
    from gpt2lab import native

    assert ("decode step: the native kernel (" in out) == (native.library() is not None)


def test_info_model_directory(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--seq-len", "8"]) == 0
    assert f"{tiny_model.num_parameters():,}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "gpt3"], "'gpt3' is neither a preset"),
    (["info", "tiny", "--seq-len", "500"], "--seq-len must be in 1..128"),
])
def test_info_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_error_exit_code():
    proc = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "info", "nope"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("gpt2lab info: error:") and "Traceback" not in proc.stderr


def test_tokenizer_import_does_not_load_torch():
    code = "import sys, gpt2lab.tokenizer; from gpt2lab import Tokenizer; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------------ bad values fail at parsing
def usage_error(argv: list[str], capsys) -> str:
    """Run `gpt2lab argv`, expect argparse to refuse it, and return its one stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err
    return err


@pytest.mark.parametrize("argv,flag,allowed", [
    (["info", "tiny", "--threads", "0"], "--threads", "1..1024"),
    (["info", "tiny", "--threads", "99999999999999999999"], "--threads", "1..1024"),
    (["info", "tiny", "--seq-len", "0"], "--seq-len", ">= 1"),
    (["info", ""], "model", "must not be empty"),
    (["generate", "--threads", "0"], "--threads", "1..1024"),
    (["generate", "--threads", "-3"], "--threads", "1..1024"),
    (["generate", "--seed", "9223372036854775808"], "--seed", "0..9223372036854775807"),
    (["generate", "--seed", "-1"], "--seed", "0..9223372036854775807"),
    (["generate", "--temperature=-1e-300"], "--temperature", "a finite number >= 0"),
    (["generate", "--temperature", "nan"], "--temperature", "a finite number >= 0"),
    (["generate", "--temperature=-inf"], "--temperature", "a finite number >= 0"),
    (["generate", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", "--top-p", "inf"], "--top-p", "(0, 1]"),
    (["generate", "--top-p", ""], "--top-p", "(0, 1]"),
    (["generate", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["generate", "--top-k", "0"], "--top-k", ">= 1"),
    (["generate", "--repetition-penalty", "1e-300"], "--repetition-penalty", "in [0.01, 10000]"),
    (["generate", "--repetition-penalty", "1e300"], "--repetition-penalty", "in [0.01, 10000]"),
    (["generate", "--max-new-tokens", "99999999999999999999"], "--max-new-tokens", "0..1000000"),
    (["generate", "--max-new-tokens", "-1"], "--max-new-tokens", "0..1000000"),
    (["generate", "--num-samples", "0"], "--num-samples", ">= 1"),
    (["generate", "--stop", ""], "--stop", "must not be empty"),
    (["generate", "--model", ""], "--model", "must not be empty"),
    (["generate", "--prompt-file", ""], "--prompt-file", "must not be empty"),
    (["eval", "--data", "x.txt", "--context", "0"], "--context", ">= 2"),
    (["eval", "--data", "x.txt", "--stride", "0"], "--stride", ">= 1"),
    (["eval", "--data", "x.txt", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["eval", "--data", "x.txt", "--threads", "0"], "--threads", "1..1024"),
    (["serve", "--threads", "0"], "--threads", "1..1024"),
    (["serve", "--model", ""], "--model", "must not be empty"),
    (["prepare", "x.txt", "--val-fraction", "1"], "--val-fraction", "in [0, 1)"),
    (["train-tokenizer", "--input", "x.txt", "--vocab-size", "10", "--out", "t"], "--vocab-size", ">= 257"),
    (["serve", "--dtype", "fp16"], "--dtype", "'fp32', 'bf16', 'int8', 'int4'"),
    (["generate", "--dtype", "fp16"], "--dtype", "'fp32', 'bf16', 'int8', 'int4'"),
    (["eval", "--data", "x.txt", "--dtype", "int3"], "--dtype", "'fp32', 'bf16', 'int8', 'int4'"),
    (["serve", "--tokenizer", ""], "--tokenizer", "must not be empty"),
    (["attention", "--prompt", "a", "--out", "a.png", "--threads", "0"], "--threads", "1..1024"),
    (["attention", "--prompt", "a", "--out", "a.jpg"], "--out", ".png, .svg, .pdf"),
    (["attention", "--prompt", "a", "--out", "picture"], "--out", ".png, .svg, .pdf"),
    (["attention", "--prompt", "a", "--out", ""], "--out", ".png, .svg, .pdf"),
    (["eval", "--data", ""], "--data", "must not be empty"),
    (["eval", "--data", "x.jsonl", "--text-field", ""], "--text-field", "must not be empty"),
    (["tokenize", "hi", "--tokenizer", ""], "--tokenizer", "must not be empty"),
    (["train-tokenizer", "--input", "a.txt", "--vocab-size", "0", "--out", "t"], "--vocab-size", ">= 257"),
    (["train-tokenizer", "--input", "a.txt", "--vocab-size", "300", "--out", ""], "--out", "must not be empty"),
    (["prepare", "", "--out", "d"], "source", "must not be empty"),
    (["prepare", "a.txt", "--out", ""], "--out", "must not be empty"),
    (["prepare", "a.txt", "--val-fraction", "nan"], "--val-fraction", "[0, 1)"),
    (["prepare", "a.txt", "--workers", "99999999999999999999"], "--workers", "0..1024"),
    (["attention", "--prompt", "a", "--out", "a.png", "--layer", "-1"], "--layer", ">= 0"),
    (["quickstart", "--minutes", "0"], "--minutes", "a finite number > 0"),
    (["quickstart", "--minutes", "-1"], "--minutes", "a finite number > 0"),
    (["quickstart", "--minutes", "inf"], "--minutes", "a finite number > 0"),
    (["quickstart", "--minutes", "nan"], "--minutes", "a finite number > 0"),
    (["quickstart", "--samples", "-1"], "--samples", ">= 0"),
    (["quickstart", "--samples", "2.5"], "--samples", ">= 0"),
    (["quickstart", "--out", ""], "--out", "must not be empty"),
    (["quickstart", "--data-dir", ""], "--data-dir", "must not be empty"),
    (["train", "--config", ""], "--config", "must not be empty"),
    (["train", "--init-from", ""], "--init-from", "must not be empty"),
    (["train", "--resume", ""], "--resume", "must not be empty"),
    (["nope"], "COMMAND", "choose from"),
    ([], "COMMAND", "required"),
])
def test_bad_values_are_one_line_naming_the_flag(argv, flag, allowed, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written, least of all into the current directory
    err = usage_error(argv, capsys)
    assert err.startswith("gpt2lab") and flag in err and allowed in err
    assert list(tmp_path.iterdir()) == []


def test_version_is_the_package_version(capsys):
    import tomllib
    from pathlib import Path

    import gpt2lab

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gpt2lab {gpt2lab.__version__}\n"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["version"] == gpt2lab.__version__


def test_info_help_lists_the_real_presets():
    from gpt2lab.cli import build_parser
    from gpt2lab.config import PRESETS

    info = build_parser()._subparsers._group_actions[0].choices["info"]
    text = info.format_help()
    assert all(name in text for name in PRESETS) and "gpt2-tiny" not in text


@pytest.fixture
def char_model_dir(tmp_path):
    """A tiny model saved with its 30-id character tokenizer."""
    import torch

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.tokenizer import CharTokenizer

    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .\n"))
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=2, n_head=2, n_embd=16)).save_pretrained(
        tmp_path / "m", tokenizer=tok)
    return tmp_path / "m"


@pytest.mark.parametrize("command", [["generate", "--prompt", "hello", "--max-new-tokens", "2"],
                                     ["attention", "--prompt", "hello", "--out", "attention.png"],
                                     ["eval", "--data", "data.txt"]])
def test_a_tokenizer_larger_than_the_model_is_refused_in_one_line(command, char_model_dir, capsys, monkeypatch,
                                                                  tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("hello world\n" * 4, encoding="utf-8")
    assert main([*command, "--model", str(char_model_dir), "--tokenizer", "gpt2"]) == 1
    err = capsys.readouterr().err
    assert "the tokenizer has 50257 ids but the model" in err and "only 30" in err and err.count("\n") == 1
    assert not (tmp_path / "attention.png").exists()


def test_console_script_usage_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "generate", "--threads", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("gpt2lab generate: error: argument --threads: must be an integer in 1..1024, got '0' "
                           "(see gpt2lab generate --help)\n")


def test_bare_resume_resumes_the_configs_out_dir(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    import gpt2lab.train

    calls = []

    def fake_train(config, **kwargs):
        calls.append((config, kwargs))
        return SimpleNamespace(checkpoint=None, state=SimpleNamespace(step=0))

    monkeypatch.setattr(gpt2lab.train, "train", fake_train)
    out_dir = str(tmp_path / "run")
    assert main(["train", "--resume", "--set", f"out_dir={json.dumps(out_dir)}"]) == 0  # `nonempty` skips the const
    [(config, kwargs)] = calls
    assert kwargs["resume"] is True and config.out_dir == out_dir


def test_near_zero_temperature_and_top_p_are_accepted():
    """The sampling core treats them as the greedy limit (test_sampling.py), so the command line takes them."""
    from gpt2lab.cli import build_parser

    args = build_parser().parse_args(["generate", "--temperature", "1e-300", "--top-p", "5e-324",
                                      "--repetition-penalty", "0.01"])
    assert (args.temperature, args.top_p, args.repetition_penalty) == (1e-300, 5e-324, 0.01)


def test_the_command_line_offers_the_inference_dtypes_there_are():
    from gpt2lab.cli.args import INFERENCE_DTYPES
    from gpt2lab.inference import INFERENCE_DTYPES as LOADED

    assert INFERENCE_DTYPES == LOADED


@pytest.mark.parametrize("extra, named", [(["--overwrite"], "--overwrite"), (["--init-from", "gpt2"], "--init-from")])
def test_resume_refuses_the_flags_that_start_a_run_again(tmp_path, capsys, extra, named):
    assert main(["train", "--resume", str(tmp_path), *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume continues a run" in err and named in err


@pytest.mark.parametrize("argv, says", [
    (["generate", "--model", "m", "--prompt-file", "{tmp}/missing.txt"], "--prompt-file {tmp}/missing.txt: no such file"),
    (["generate", "--model", "m", "--prompt-file", "{tmp}"], "--prompt-file {tmp}: a directory"),
    (["generate", "--model", "m", "--prompt-file", "{tmp}/latin1.txt"], "--prompt-file {tmp}/latin1.txt: not UTF-8"),
    (["tokenize", "--file", "{tmp}/missing.txt"], "--file {tmp}/missing.txt: no such file"),
    (["train-tokenizer", "--input", "{tmp}/missing.txt", "--vocab-size", "300", "--out", "{tmp}/t"],
     "--input {tmp}/missing.txt: no such file"),
])
def test_a_text_file_that_cannot_be_read_is_one_line_naming_the_flag(tmp_path, capsys, argv, says):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.replace("{tmp}", str(tmp_path)) in err and "Errno" not in err
    assert not (tmp_path / "t").exists()
