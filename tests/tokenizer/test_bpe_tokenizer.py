"""`Tokenizer` (bpe_tokenizer.py) against its oracle, tiktoken's gpt2 encoding: the same ids on edge cases, real
text and random text, in every mode; the piece cache within its byte budget; decode and the errors of bad input."""

from __future__ import annotations

import pickle
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.tokenizer import EOT, Tokenizer, bpe_tokenizer, pretokenize

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Strings made of the characters where the regex has choices to make.
TRICKY = [*" \t\n\r\x0b'sdmtlvreSD aZ19.,!中\u0301🤗\u200d\xa0", EOT, "<|", "|>"]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=60).map("".join)


def test_matches_tiktoken_on_torture_corpus(gpt2, oracle, torture_text):
    text = torture_text
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert gpt2.encode(text, allowed_special="all") == oracle.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={EOT}) == oracle.encode(text, allowed_special={EOT})
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text


def test_matches_tiktoken_on_shakespeare(gpt2, oracle, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert ids == oracle.encode_ordinary(shakespeare_text)
    assert gpt2.decode(ids) == shakespeare_text
    # Chunked and parallel encoding cut only where the pieces cannot change, and never inside a special token.
    assert gpt2.encode(shakespeare_text, num_workers=2) == ids
    documents = shakespeare_text[:150_000].replace("\n\n\n", f"\n{EOT}\n")
    assert documents.count(EOT) > 10
    assert gpt2.encode(documents, allowed_special="all", num_workers=2) == oracle.encode(documents, allowed_special="all")


def test_a_full_piece_cache_starts_afresh_with_the_same_ids(gpt2, oracle, shakespeare_text, monkeypatch):
    monkeypatch.setattr(bpe_tokenizer, "_MAX_CACHE_BYTES", 20_000)
    text = shakespeare_text[-30_000:]
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert len(gpt2._cache) <= len(set(pretokenize._PATTERN.findall(text)))


def cache_size(tok: Tokenizer) -> int:
    """The measured size of the cache's keys and values (the dict's own table aside)."""
    return sum(sys.getsizeof(piece) + sys.getsizeof(ids) for piece, ids in tok._cache.items())


def test_the_piece_cache_stays_within_its_byte_budget(gpt2, monkeypatch):
    monkeypatch.setattr(bpe_tokenizer, "_MAX_CACHE_BYTES", 30_000)
    fresh = pickle.loads(pickle.dumps(gpt2))  # the same tokenizer with an empty cache
    words = [" w" + "".join(chr(97 + (i * 7 + k) % 26) for k in range(40)) + str(i) for i in range(2_000)]
    text = "".join(words)
    assert fresh.encode(text) == gpt2.encode(text)
    assert 0 < cache_size(fresh) <= 30_000 and fresh._cache_bytes <= 30_000


def test_long_pieces_are_encoded_but_never_cached(gpt2):
    fresh = pickle.loads(pickle.dumps(gpt2))
    runs = [chr(97 + i) * 5_000 for i in range(26)]  # one piece each: a run of one letter
    for run in runs:
        assert fresh.decode(fresh.encode(run)) == run
    assert not any(len(piece) > bpe_tokenizer._MAX_CACHED_PIECE for piece in fresh._cache)
    assert cache_size(fresh) < 100_000


@PROPERTY
@given(st.text(max_size=200))
def test_matches_tiktoken_on_random_text(gpt2, oracle, text):
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@PROPERTY
@given(tricky_text)
def test_matches_tiktoken_on_tricky_text_in_both_modes(gpt2, oracle, text):
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert gpt2.encode(text, allowed_special="all") == oracle.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text


def test_decode_of_a_split_character_gives_replacement_and_decode_bytes_is_exact(gpt2):
    ids = gpt2.encode("🤗")
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert b"".join(gpt2.decode_bytes([i]) for i in ids) == "🤗".encode()
    assert gpt2.decode_bytes(ids) == "🤗".encode()


def test_decode_accepts_arrays(gpt2):
    import numpy as np

    ids = gpt2.encode("Hello world")
    assert gpt2.decode(np.array(ids)) == gpt2.decode(tuple(ids)) == "Hello world"


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["a list"]])
def test_encode_non_str_raises_typeerror_naming_the_type(gpt2, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        gpt2.encode(bad)


@pytest.mark.parametrize("bad", [50257, -1, 10**9, "7", 1.5])
def test_decode_unknown_id_raises_valueerror_naming_id_and_size(gpt2, bad):
    with pytest.raises(ValueError, match=rf"{bad!r}.*50256"):
        gpt2.decode([15496, bad])


def test_bad_allowed_special(gpt2):
    with pytest.raises(ValueError, match="'all' or a set"):
        gpt2.encode("x", allowed_special=EOT)
    with pytest.raises(ValueError, match="<\\|fim\\|>.*<\\|endoftext\\|>"):
        gpt2.encode("x", allowed_special={"<|fim|>"})
    with pytest.raises(ValueError, match="num_workers"):
        gpt2.encode("x", num_workers=0)
