"""The BPE tokenizer's piece cache stays within its byte budget, whatever text a client sends, and never changes ids."""

from __future__ import annotations

import sys

import pytest

from gpt2lab.tokenizer import bpe_tokenizer as tokenizer_module
from gpt2lab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


def cache_size(tok: Tokenizer) -> int:
    """The measured size of the cache's keys and values (the dict's own table aside)."""
    return sum(sys.getsizeof(piece) + sys.getsizeof(ids) for piece, ids in tok._cache.items())


def test_the_piece_cache_stays_within_its_byte_budget(gpt2, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_MAX_CACHE_BYTES", 30_000)
    fresh = Tokenizer.gpt2()
    words = [" w" + "".join(chr(97 + (i * 7 + k) % 26) for k in range(40)) + str(i) for i in range(2_000)]
    text = "".join(words)
    assert fresh.encode(text) == gpt2.encode(text)
    assert 0 < cache_size(fresh) <= 30_000 and fresh._cache_bytes <= 30_000


def test_long_pieces_are_encoded_but_never_cached(monkeypatch):
    fresh = Tokenizer.gpt2()
    runs = [chr(97 + i) * 5_000 for i in range(26)]  # one piece each: a run of one letter
    for run in runs:
        assert fresh.decode(fresh.encode(run)) == run
    assert not any(len(piece) > tokenizer_module._MAX_CACHED_PIECE for piece in fresh._cache)
    assert cache_size(fresh) < 100_000
