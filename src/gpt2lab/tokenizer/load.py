"""`load_tokenizer`: one spec ('gpt2', a directory or a .tiktoken file) -> the tokenizer it names."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2lab.tokenizer.bpe_tokenizer import Tokenizer
from gpt2lab.tokenizer.char_tokenizer import CharTokenizer
from gpt2lab.tokenizer.formats import CHAR_FILE


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer | CharTokenizer:
    """'gpt2', a directory (a model directory, or one written by `save_pretrained`), or a `.tiktoken` file.

    A directory with `char_tokenizer.json` holds a CharTokenizer; one with `vocab.json` + `merges.txt` or
    `tokenizer.json` a BPE Tokenizer.
    """
    if spec == "gpt2":
        return Tokenizer.gpt2()
    path = Path(spec)
    if path.is_dir():
        has_char = (path / CHAR_FILE).is_file()
        has_bpe = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
        if has_char and has_bpe:
            raise ValueError(f"{path} holds both {CHAR_FILE} and BPE files; keep one tokenizer per directory")
        return CharTokenizer.from_pretrained(path) if has_char else Tokenizer.from_pretrained(path)
    if path.is_file() and path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path)
    raise ValueError(f"unknown tokenizer {str(spec)!r}: use 'gpt2', a directory with vocab.json + merges.txt, "
                     f"tokenizer.json or {CHAR_FILE}, or a .tiktoken file")  # fmt: skip
