"""The command line: output of `info`, one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt2lab.cli import main


def test_info_preset(capsys):
    assert main(["info", "tiny", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, 2 heads of 32, width 64" in out
    assert "attn.c_attn" in out and "lm_head (tied to wte)" in out
    assert "forward (1, 16)" in out and "tokens/s" in out


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
