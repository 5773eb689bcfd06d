"""load.py: load_tokenizer's specs."""

from __future__ import annotations

import pytest

from gpt2lab.tokenizer import CharTokenizer, load_tokenizer


def test_load_tokenizer_specs(gpt2_home, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(gpt2_home))
    assert load_tokenizer("gpt2").eot_token == 50256
    assert load_tokenizer(gpt2_home / "gpt2.tiktoken").vocab_size == 50257
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3'"):
        load_tokenizer("gpt3")
    trained.save_pretrained(tmp_path)
    CharTokenizer.from_text("abc").save_pretrained(tmp_path / "char")  # save_pretrained refuses to mix them, so
    (tmp_path / "char" / "char_tokenizer.json").rename(tmp_path / "char_tokenizer.json")  # copied in by hand
    with pytest.raises(ValueError, match="both"):
        load_tokenizer(tmp_path)
