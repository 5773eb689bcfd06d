"""`gpt2lab generate` and `gpt2lab attention` from the command line: streamed text, prompts from stdin or a file,
one-line errors, the attention image."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import GPT, GPTConfig

CHARS = "abcdefghijklmnopqrstuvwxyz ,.!?\n"


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    """A tiny model saved with its own character tokenizer (no GPT-2 vocabulary needed)."""
    from gpt2lab.tokenizer import CharTokenizer

    tok = CharTokenizer(list(CHARS))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=64, n_layer=2, n_head=2, n_embd=32))
    d = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(d, tokenizer=tok)
    return d


def run_cli(argv, capsys, stdin=None, monkeypatch=None):
    from gpt2lab.cli import main

    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_streams_reproducibly(char_model_dir, capsys):
    argv = ["generate", "--model", str(char_model_dir), "--prompt", "hello", "--max-new-tokens", "12", "--seed", "3",
            "--top-k", "5", "--num-samples", "2"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and err == ""
    assert out.count("hello") >= 2 and "sample 2" in out
    assert run_cli(argv, capsys)[1] == out  # same seed, same text
    code, greedy, _ = run_cli(["generate", "--model", str(char_model_dir), "--prompt", "hello", "--temperature", "0",
                               "--max-new-tokens", "10", "--no-echo", "--dtype", "int8"], capsys)
    assert code == 0 and not greedy.startswith("hello") and len(greedy) <= 11


def test_cli_generate_reads_stdin_and_prompt_file(char_model_dir, capsys, monkeypatch, tmp_path):
    base = ["generate", "--model", str(char_model_dir), "--temperature", "0", "--max-new-tokens", "6"]
    code, from_stdin, _ = run_cli(base, capsys, stdin="to be", monkeypatch=monkeypatch)
    (tmp_path / "p.txt").write_text("to be", encoding="utf-8")
    code2, from_file, _ = run_cli(base + ["--prompt-file", str(tmp_path / "p.txt")], capsys)
    assert code == code2 == 0 and from_stdin == from_file and from_file.startswith("to be")


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "temperature"),
    (["--prompt", "x" * 80], "n_ctx=64"),
    (["--dtype", "fp16"], "fp16"),
    (["--max-new-tokens", "-2"], "max-new-tokens"),
    (["--top-p", "2"], "--top-p"),
])
def test_cli_generate_bad_input_is_one_line(char_model_dir, capsys, extra, message):
    argv = ["generate", "--model", str(char_model_dir)] + (["--prompt", "hi"] if "--prompt" not in extra else []) + extra
    code, out, err = run_cli(argv, capsys)
    assert code != 0 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_cli_generate_missing_model_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"], capsys)
    assert code == 1 and "missing" in err and len(err.strip().splitlines()) == 1


def test_cli_attention_writes_a_png(char_model_dir, capsys, tmp_path):
    out = tmp_path / "pics" / "attn.png"
    threads = torch.get_num_threads()
    try:
        code, text, err = run_cli(["attention", "--model", str(char_model_dir), "--prompt", "to be or not",
                                   "--layer", "1", "--head", "0", "--out", str(out), "--threads", "1"], capsys)
        assert torch.get_num_threads() == 1  # --threads as generate and eval take it
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["attn.png"]  # no temp file left behind
    code, _, err = run_cli(["attention", "--model", str(char_model_dir), "--prompt", "hi", "--head", "5",
                            "--out", str(out)], capsys)
    assert code == 1 and "--head" in err
