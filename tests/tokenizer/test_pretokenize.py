"""pretokenize.py: GPT-2's regex as released, and cutting text only where its pieces cannot change."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.tokenizer import EOT, GPT2_PATTERN, split_text
from gpt2lab.tokenizer.pretokenize import _PATTERN

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Strings made of the characters where the regex has choices to make.
TRICKY = [*" \t\n\r\x0b'sdmtlvreSD aZ19.,!中\u0301🤗\u200d\xa0", EOT, "<|", "|>"]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=60).map("".join)


@PROPERTY
@given(tricky_text, st.integers(1, 12))
def test_split_text_cuts_only_where_the_pieces_do_not_change(text, max_chars):
    chunks = split_text(text, max_chars)
    assert "".join(chunks) == text
    assert [p for chunk in chunks for p in _PATTERN.findall(chunk)] == _PATTERN.findall(text)


@PROPERTY
@given(st.text(max_size=100))
def test_fast_pattern_equals_gpt2s_released_pattern(text):
    import regex

    released = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert regex.findall(GPT2_PATTERN, text) == regex.findall(released, text)
