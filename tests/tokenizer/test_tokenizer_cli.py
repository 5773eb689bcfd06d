"""The tokenizer's commands: `gpt2lab tokenize` and `gpt2lab train-tokenizer`."""

from __future__ import annotations

from gpt2lab.cli import main
from gpt2lab.tokenizer import load_tokenizer, train_bpe


def test_cli_tokenize(gpt2, tmp_path, capsys):
    gpt2.save_pretrained(tmp_path)
    assert main(["tokenize", "--tokenizer", str(tmp_path), "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995"]
    (tmp_path / "in.txt").write_text("Hi<|endoftext|>")
    assert main(["tokenize", "--tokenizer", str(tmp_path), "--file", str(tmp_path / "in.txt"), "--show", "--special"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "50256\t'<|endoftext|>'"


def test_cli_train_tokenizer_and_errors(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    assert main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "270", "--out", str(tmp_path / "tok")]) == 0
    assert "saved" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").encode(" the cat") == train_bpe(corpus.read_text(), vocab_size=270).encode(" the cat")
    assert main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "10", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vocab-size: must be an integer >= 257" in err and "10" in err  # parse time
    assert main(["tokenize", "--tokenizer", str(tmp_path / "nope"), "hi"]) == 1
    assert "unknown tokenizer" in capsys.readouterr().err
