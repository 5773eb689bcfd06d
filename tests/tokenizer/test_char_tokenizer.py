"""char_tokenizer.py: CharTokenizer round trips through its file and refuses what it cannot encode."""

from __future__ import annotations

import json

import pytest

from gpt2lab.tokenizer import CHAR_FILE, EOT, CharTokenizer, load_tokenizer


def test_char_tokenizer_round_trip_save_and_load(tmp_path, shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.chars == sorted(set(shakespeare_text)) and tok.eot_token == len(tok.chars)
    ids = tok.encode(shakespeare_text[:5000] + EOT, allowed_special="all")
    assert ids[-1] == tok.eot_token and tok.decode(ids) == shakespeare_text[:5000] + EOT
    assert tok.decode_bytes(ids[:10]) == shakespeare_text[:10].encode()
    (tmp_path / "config.json").write_text("{}")
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    assert loaded.special_tokens == tok.special_tokens and (tmp_path / "config.json").exists()
    assert tok.encode_batch(["ab", "ba"] * 3, num_workers=2) == [tok.encode(t) for t in ["ab", "ba"] * 3]


def test_char_tokenizer_errors(tmp_path):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' at index 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="token id 4 is not in the vocabulary"):
        tok.decode([0, 4])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"abc")
    (tmp_path / CHAR_FILE).write_text(json.dumps({"format": "gpt2lab-char-tokenizer", "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_tokenizer(tmp_path)
