"""byte_map.py: GPT-2's byte <-> printable character map."""

from __future__ import annotations

from gpt2lab.tokenizer import bytes_to_unicode


def test_bytes_to_unicode_is_gpt2s_map():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0]) == ("Ġ", "Ċ", "A", "Ā")
