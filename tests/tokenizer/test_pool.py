"""pool.py: the one tokenizing process pool gives the ids of encoding in this process, in order."""

from __future__ import annotations

import pickle
from multiprocessing import get_context

import pytest

from gpt2lab.tokenizer import EOT, CharTokenizer, pool, tokenizer_pool


def test_encode_batch_in_parallel_equals_sequential(gpt2, shakespeare_text):
    texts = [shakespeare_text[i : i + 3000] for i in range(0, 60_000, 3000)] + ["", EOT]
    expected = [gpt2.encode(t, allowed_special="all") for t in texts]
    assert gpt2.encode_batch(texts, allowed_special="all", num_workers=2) == expected
    assert gpt2.encode_batch(texts, allowed_special="all") == expected
    with pytest.raises(TypeError, match="list of str"):
        gpt2.encode_batch("one string")


def first_and_length(tokenizer, text: str) -> tuple[int | None, int]:
    """A job for the pool: module-level, so workers can be sent it by name."""
    ids = tokenizer.encode(text)
    return (ids[0] if ids else None), len(ids)


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenizer_pool_runs_jobs_in_order_and_streams_its_input(gpt2, workers):
    texts = (f"document {k} " * (k % 7) for k in range(50))  # a generator, as prepare() passes
    expected = [first_and_length(gpt2, f"document {k} " * (k % 7)) for k in range(50)]
    with tokenizer_pool(gpt2, workers) as imap:
        assert list(imap(first_and_length, texts, chunksize=3)) == expected


def test_tokenizer_pool_refuses_a_bad_worker_count(gpt2):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
            with tokenizer_pool(gpt2, bad):
                pass


def test_tokenizers_pickle_as_their_definition(gpt2):
    # Pools on platforms without fork send the tokenizer to each worker pickled.
    gpt2.encode("warm the cache")
    copy = pickle.loads(pickle.dumps(gpt2))
    assert copy._cache == {}  # the definition travels, not the derived tables or the cache
    assert (copy.vocab, copy.merges, copy.special_tokens) == (gpt2.vocab, gpt2.merges, gpt2.special_tokens)
    assert copy.encode("Hello there<|endoftext|>", allowed_special="all") == [15496, 612, 50256]
    char = CharTokenizer.from_text("hello")
    assert pickle.loads(pickle.dumps(char)).encode("hell") == char.encode("hell")


def test_a_spawned_pool_receives_the_tokenizer_pickled(gpt2, monkeypatch):
    monkeypatch.setattr(pool, "_context", lambda: get_context("spawn"))
    texts = ["Hello world", "", "one<|endoftext|>two"] * 2
    assert gpt2.encode_batch(texts, allowed_special="all", num_workers=2) == [
        gpt2.encode(t, allowed_special="all") for t in texts
    ]
