"""Tokenizer files: tiktoken ranks, Hugging Face's vocab.json + merges.txt (+ tokenizer_config.json) and
tokenizer.json, and GPT-2's own vocabulary, obtained and checked by sha256.

Readers return plain data (a vocabulary {id: bytes}, merges as byte pairs, special tokens {str: id}) and writers
take it, so this module knows file layouts and nothing of the tokenizer classes built on top of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from gpt2lab import checks
from gpt2lab.download import (
    cache_dir,
    file_source,
    obtain,
    pypi_sdist_source,
    read_json,
    sha256_file,
    url_source,
    write_file_atomic,
)
from gpt2lab.files import claim_files, read_json_field
from gpt2lab.tokenizer.byte_map import _from_visible, _to_visible
from gpt2lab.tokenizer.merges import derive_merges
from gpt2lab.tokenizer.pretokenize import EOT

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# OpenAI's released GPT-2 files (encoder.json, vocab.bpe); `save_pretrained` of Tokenizer.gpt2() reproduces both
# byte for byte, as vocab.json and merges.txt. The merges are derived from the ranks once, then cached.
GPT2_VOCAB_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_PYPI = ("openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken")

CHAR_FILE = "char_tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")  # what Tokenizer.save_pretrained writes
TOKENIZER_FILES = (*BPE_FILES, CHAR_FILE)  # every file a tokenizer of ours may write into a directory
CHAR_FORMAT = "gpt2lab-char-tokenizer"
CHAR_FORMAT_VERSION = 1
BPE_MARK = {"format": "gpt2lab-bpe-tokenizer", "version": 1}  # in tokenizer_config.json: these files are ours


def own_bpe_files(directory: Path) -> bool:
    """Whether the BPE files in `directory` are gpt2lab's (its tokenizer_config.json carries BPE_MARK): only those
    are replaced, with `overwrite`. Hugging Face ignores the extra key and keeps it when it saves them again."""
    return read_json_field(directory / "tokenizer_config.json", "gpt2lab") == BPE_MARK


def own_char_file(directory: Path) -> bool:
    """Whether `directory`'s char_tokenizer.json is gpt2lab's (its format field)."""
    return read_json_field(directory / CHAR_FILE, "format") == CHAR_FORMAT


def refuse_another_tokenizer(directory: Path, writing: str) -> None:
    """Refuse to write a tokenizer ("bpe" or "char") into `directory` beside one of the other kind, or beside a
    `tokenizer.json` that would go stale: a directory holds one tokenizer, as load_tokenizer requires."""
    others = [CHAR_FILE] if writing == "bpe" else [*BPE_FILES]
    others.append("tokenizer.json")
    present = [n for n in others if (directory / n).exists() or (directory / n).is_symlink()]
    if present:
        raise FileExistsError(f"{directory} already holds another tokenizer ({', '.join(present)}); keep one "
                              "tokenizer per directory: choose another directory")


def own_tokenizer_file(path: Path) -> bool:
    """Whether `path`, one of TOKENIZER_FILES, is gpt2lab's (as own_bpe_files or own_char_file say of its set)."""
    if path.name == CHAR_FILE:
        return own_char_file(path.parent)
    return path.name in BPE_FILES and own_bpe_files(path.parent)


class TokenizerFiles(NamedTuple):
    """A BPE tokenizer as read from files; `where(k)` names the line or entry of merge k, for error messages."""

    vocab: dict[int, bytes]
    merges: list[tuple[bytes, bytes]]
    special_tokens: dict[str, int]
    path: Path
    where: Callable[[int], str]


# ------------------------------------------------------------------------------------------------- GPT-2's files
def gpt2_ranks_file(ranks_file: str | os.PathLike | None = None) -> Path:
    """GPT-2's vocabulary (r50k_base ranks): `ranks_file` if given, else obtained into our cache; checked by sha256.

    Looked up in turn: our cache ($GPT2LAB_CACHE or ~/.cache/gpt2lab), tiktoken's cache, OpenAI's public URL, and
    the `gpt2.tiktoken` inside the PyPI sdist of openai-whisper (wherever pip works).
    """
    if ranks_file is not None:
        path = Path(ranks_file)
        got = sha256_file(path)
        if got != GPT2_RANKS_SHA256:
            raise ValueError(f"{path} has sha256 {got}, not GPT-2's vocabulary ({GPT2_RANKS_SHA256})")
        return path
    dest = cache_dir() / "gpt2.tiktoken"
    hint = (f"Offline, copy GPT-2's gpt2.tiktoken (alias r50k_base.tiktoken) to {dest} or pass it: "
            "Tokenizer.gpt2(ranks_file=PATH), or `--tokenizer PATH` on the command line.")  # fmt: skip
    return obtain(dest, GPT2_RANKS_SHA256, _gpt2_sources(), hint=hint)


def _gpt2_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """GPT-2's merges: read from the cache if it holds them (checked by sha256), else derived (~1 s) and cached.

    The derived list is cached only if it is byte for byte OpenAI's vocab.bpe, so the cache can never hold a
    wrong one.
    """
    cached = cache_dir() / "gpt2.merges.txt"
    if cached.is_file() and sha256_file(cached) == GPT2_MERGES_SHA256:
        lines = cached.read_text(encoding="utf-8").splitlines()[1:]
        return [(_from_visible(a), _from_visible(b)) for a, b in (line.split(" ") for line in lines)]
    merges = derive_merges(ranks)
    text = _merges_text(merges)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() == GPT2_MERGES_SHA256:
        try:
            write_file_atomic(cached, text)
        except OSError:
            pass  # a read-only cache costs only time
    return merges


def _gpt2_sources() -> list:
    sources = []
    tiktoken_cache = _tiktoken_cache_file(GPT2_RANKS_URL)
    if tiktoken_cache is not None:
        sources.append(file_source(tiktoken_cache, f"tiktoken's cache ({tiktoken_cache})"))
    sources.append(url_source(GPT2_RANKS_URL))
    sources.append(pypi_sdist_source(*GPT2_PYPI))
    return sources


def _tiktoken_cache_file(url: str) -> Path | None:
    """Where tiktoken caches `url` (its rule: $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or a temp dir; sha1 name)."""
    directory = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if directory == "":
        return None  # caching switched off
    directory = directory or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(directory) / hashlib.sha1(url.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- file readers
def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `<base64 of the token's bytes> <rank>` per line."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected '<base64 token> <rank>'")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if not token or rank < 0 or token in ranks or rank in seen:
                    raise ValueError("empty token, negative rank, or a token or rank seen before")
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}, line {lineno}: {e}: {line[:80]!r}") from None
            ranks[token] = rank
            seen.add(rank)
    if not ranks:
        raise ValueError(f"{path} holds no tokens")
    return ranks


def read_hf_files(directory: str | os.PathLike) -> TokenizerFiles:
    """Read Hugging Face files from `directory`: `vocab.json` + `merges.txt`, else `tokenizer.json`.

    Special tokens come from `tokenizer_config.json` (`added_tokens_decoder`) when present; otherwise
    `<|endoftext|>` is special if the vocabulary has it, as in GPT-2.
    """
    d = Path(directory)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        declared = _declared_specials(d / "tokenizer_config.json")
        return _read_vocab_and_merges(d / "vocab.json", d / "merges.txt", declared)
    if (d / "tokenizer.json").is_file():
        return _read_tokenizer_json(d / "tokenizer.json")
    if not d.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {d}")
    raise FileNotFoundError(f"no BPE tokenizer files in {d}: expected vocab.json + merges.txt, or tokenizer.json")


def _declared_specials(config_path: Path) -> dict[str, int] | None:
    """Special tokens named in tokenizer_config.json's `added_tokens_decoder`; None if there is no such list."""
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    added = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(added, dict):
        return None
    try:
        return {entry["content"]: int(i) for i, entry in added.items() if entry.get("special", False)}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{config_path}: malformed added_tokens_decoder") from None


def _split_vocab(vocab: object, specials: Mapping[str, int] | None, path: Path):
    """{visible string: id} -> ({id: bytes}, {special: id}), refusing entries that are not byte-level tokens."""
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: expected a JSON object of token -> id")
    if specials is None:
        specials = {EOT: vocab[EOT]} if isinstance(vocab.get(EOT), int) else {}
    ordinary: dict[int, bytes] = {}
    for text, i in vocab.items():
        checks.integer(f"{path}: the id of token {text!r}", i, low=0)
        if text in specials:
            continue
        token = _from_visible(text)
        if not token:
            raise ValueError(f"{path}: token {text!r} (id {i}) is not byte-level BPE text (GPT-2's byte map)")
        ordinary[i] = token
    return ordinary, dict(specials)


def _parse_merges(entries: Sequence[object], vocab: Mapping[int, bytes], path: Path, label: Callable[[int], str]):
    """Merge entries ('a b' strings or [a, b] lists) -> byte pairs, naming `label(k)` (the line) of a bad one.

    The order of the merges is checked when the Tokenizer is built, which names the line through `where`.
    """
    known = set(vocab.values())
    merges = []
    for k, entry in enumerate(entries):
        parts = entry.split(" ") if type(entry) is str else entry
        if type(parts) not in (list, tuple) or len(parts) != 2 or not all(type(p) is str for p in parts):
            raise ValueError(f"{path}, {label(k)}: expected two tokens separated by one space, got {entry!r}")
        pair = (_from_visible(parts[0]), _from_visible(parts[1]))
        if pair[0] not in known or pair[1] not in known:
            text = parts[0] if pair[0] not in known else parts[1]
            raise ValueError(f"{path}, {label(k)}: {text!r} is not a token of the vocabulary")
        merges.append(pair)
    return merges


def _read_vocab_and_merges(vocab_path: Path, merges_path: Path, specials: Mapping[str, int] | None) -> TokenizerFiles:
    vocab, specials = _split_vocab(read_json(vocab_path), specials, vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path} is not UTF-8 text: {e}") from None
    header = 1 if lines and lines[0].startswith("#version") else 0
    while lines and not lines[-1].strip():
        lines.pop()

    def label(k: int) -> str:
        return f"line {k + header + 1}"

    merges = _parse_merges(lines[header:], vocab, merges_path, label)
    return TokenizerFiles(vocab, merges, specials, merges_path, label)


def _read_tokenizer_json(path: Path) -> TokenizerFiles:
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: expected a BPE model, got {model.get('type') if isinstance(model, dict) else model!r}")
    added = data.get("added_tokens") or []
    try:
        specials = {t["content"]: int(t["id"]) for t in added if t.get("special", False)}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{path}: malformed added_tokens") from None
    vocab, specials = _split_vocab(model.get("vocab"), specials, path)
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges must be a list")

    def label(k: int) -> str:
        return f"merges[{k}]"

    return TokenizerFiles(vocab, _parse_merges(merges, vocab, path, label), specials, path, label)


# ---------------------------------------------------------------------------------------------------- file writers
def write_hf_files(
    directory: str | os.PathLike,
    vocab: Mapping[int, bytes],
    merges: Sequence[tuple[bytes, bytes]],
    special_tokens: Mapping[str, int],
    overwrite: bool = False,
) -> Path:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` (Hugging Face's GPT-2 format) to `directory`.

    Each file is written atomically; other files in the directory are kept, and existing tokenizer files are
    replaced only with `overwrite`.
    """
    d = claim_files(directory, BPE_FILES, overwrite, is_own=own_bpe_files, description="a tokenizer")
    refuse_another_tokenizer(d, "bpe")
    visible = {_to_visible(token): i for i, token in sorted(vocab.items())}
    for special, i in special_tokens.items():
        if visible.get(special, i) != i:
            raise ValueError(f"special token {special!r} has the same text as ordinary token {visible[special]}")
        visible[special] = i
    d.mkdir(parents=True, exist_ok=True)
    write_file_atomic(d / "vocab.json", json.dumps(visible))  # json's defaults: the layout of GPT-2's encoder.json
    write_file_atomic(d / "merges.txt", _merges_text(merges))
    write_file_atomic(d / "tokenizer_config.json", json.dumps(_hf_config(special_tokens), indent=2) + "\n")
    return d


def _merges_text(merges: Sequence[tuple[bytes, bytes]]) -> str:
    return "#version: 0.2\n" + "".join(f"{_to_visible(a)} {_to_visible(b)}\n" for a, b in merges)


def _hf_config(special_tokens: Mapping[str, int]) -> dict:
    config: dict = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode exact (no " ." -> "." rewriting)
        "errors": "replace",
        "gpt2lab": BPE_MARK,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for s, i in sorted(special_tokens.items(), key=lambda item: item[1])
        },
    }
    if EOT in special_tokens:
        config.update(bos_token=EOT, eos_token=EOT, unk_token=EOT)
    return config
