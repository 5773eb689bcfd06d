"""training.py: a worked example, incremental counting against a naive recounting trainer, determinism, files,
and a trained tokenizer that transformers reads with identical ids."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab.tokenizer import EOT, count_pieces, load_tokenizer, train_bpe
from gpt2lab.tokenizer.pretokenize import _PATTERN
from gpt2lab.tokenizer.training import _read_blocks


def test_training_worked_example_with_tie_break():
    # Pairs in "aaabdaaabac": aa x4, ab x2 -> merge (a, a). Then (aa, a) and (a, b) tie at 2: the smaller
    # (left bytes, right bytes) wins, so (a, b) before (aa, a); then (aa, ab) is counted twice.
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 3 + 1)
    assert tok.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert tok.vocab_size == 260 and tok.eot_token == 259
    assert tok.decode_bytes(tok.encode("aaab")) == b"aaab" and len(tok.encode("aaab")) == 1


def naive_merges(texts: list[str], n_merges: int) -> list[tuple[bytes, bytes]]:
    """Reference trainer: recount every pair from scratch each step (slow, obviously right)."""
    words = Counter(p for t in texts for p in _PATTERN.findall(t))
    seqs = {tuple(bytes([b]) for b in w.encode()): c for w, c in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for seq, c in seqs.items():
            for pair in itertools.pairwise(seq):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p[0], p[1]))
        merges.append(best)
        new = {}
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        seqs = new
    return merges


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abc d\n'é", max_size=40), min_size=1, max_size=6), st.integers(1, 30))
def test_incremental_training_equals_recounting(texts, n_merges):
    tok = train_bpe(texts, vocab_size=256 + n_merges, special_tokens=())
    assert tok.merges == naive_merges(texts, n_merges)


def test_training_is_deterministic_and_files_equal_texts(tmp_path):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(["the", "cat", "sat", "on", "mat", "héllo", "a\r\n", "1234"]) for _ in range(12))
             for _ in range(400)]  # fmt: skip
    text = "\n".join(lines)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    a = train_bpe(text, vocab_size=400)
    b = train_bpe(files=[path], vocab_size=400)
    c = train_bpe(list(reversed(lines)), vocab_size=400)
    assert a.merges == b.merges
    assert Counter(count_pieces([text], [])) == Counter(count_pieces([], [path]))
    assert "".join(_read_blocks(path, False, block_bytes=7)) == text
    assert len(c.merges) == len(a.merges)


def test_special_tokens_in_the_corpus_only_separate_text():
    tok = train_bpe("ab<|endoftext|>ab<|endoftext|>" * 50, vocab_size=300)
    assert all(b"<" not in a + b for a, b in tok.merges)
    assert tok.encode("ab<|endoftext|>", allowed_special="all") == [tok.encode("ab")[0], tok.eot_token]


def test_trained_tokenizer_loads_in_transformers_with_identical_ids(trained, tmp_path, shakespeare_text, torture,
                                                                    hf_tokenizer):
    assert trained.vocab_size == 1000 and trained.eot_token == 999
    trained.save_pretrained(tmp_path)
    hf = hf_tokenizer(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in torture + [shakespeare_text[:20_000]]:
        ids = trained.encode(text, allowed_special="all")
        assert hf(text)["input_ids"] == ids, text[:40]
        assert loaded.encode(text, allowed_special="all") == ids
        assert trained.decode(ids) == text


def test_train_bpe_rejects_bad_arguments(tmp_path):
    message = r"vocab_size must be an integer >= 257 \(256 bytes \+ 1 special tokens\), got 100"
    with pytest.raises(ValueError, match=message):
        train_bpe("abc", vocab_size=100)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe("abc", vocab_size=300, special_tokens=EOT)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        train_bpe(files=[bad], vocab_size=300)
