"""`CharTokenizer`: one id per character (the classic char-level setup), saved as `char_tokenizer.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from gpt2lab.download import read_versioned_json, write_file_atomic
from gpt2lab.files import claim_files
from gpt2lab.tokenizer.base import _TokenizerBase
from gpt2lab.tokenizer.formats import (CHAR_FILE, CHAR_FORMAT, CHAR_FORMAT_VERSION, own_char_file,
                                       refuse_another_tokenizer)
from gpt2lab.tokenizer.pretokenize import EOT, _check_specials, _check_text


class CharTokenizer(_TokenizerBase):
    """One id per character (the classic char-level setup), with special tokens after the characters.

        >>> tok = CharTokenizer.from_text("hello")
        >>> tok.encode("hell"), tok.vocab_size, tok.eot_token
        ([1, 0, 2, 2], 5, 4)

    Saved as `char_tokenizer.json`: {"format": "gpt2lab-char-tokenizer", "version": 1, "chars": [...],
    "special_tokens": {"<|endoftext|>": n}}, where chars[i] is the character of id i.
    """

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = (EOT,)):
        self.chars = list(chars)
        bad = next((c for c in self.chars if not (isinstance(c, str) and len(c) == 1)), None)
        if bad is not None or not self.chars:
            raise ValueError(f"chars must be a non-empty list of single characters, got the entry {bad!r}")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars lists a character twice")
        specials = _check_specials(special_tokens)
        self.special_tokens = {s: len(self.chars) + k for k, s in enumerate(specials)}
        self._id_of = {c: i for i, c in enumerate(self.chars)}
        self._decoder = {**dict(enumerate(self.chars)), **{i: s for s, i in self.special_tokens.items()}}

    @classmethod
    def from_text(cls, text: str, special_tokens: Sequence[str] = (EOT,)) -> CharTokenizer:
        """The sorted set of characters in `text` (special-token strings in it are not counted as characters)."""
        _check_text(text)
        for special in special_tokens:
            text = text.replace(special, "")
        return cls(sorted(set(text)), special_tokens)

    def __reduce__(self):
        return (type(self), (self.chars, list(self.special_tokens)))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return list(map(self._id_of.__getitem__, text))
        except KeyError:
            where = next(i for i, c in enumerate(text) if c not in self._id_of)
            raise ValueError(f"character {text[where]!r} at index {where} is not in this char-level vocabulary"
                             f" ({len(self.chars)} characters)") from None  # fmt: skip

    def decode(self, ids: Iterable[int]) -> str:
        ids = self._ids_to_list(ids)
        try:
            return "".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            raise self._bad_id(ids, self._decoder.__contains__) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `char_tokenizer.json` to `directory` atomically, keeping the directory's other files; an existing
        one is replaced only with `overwrite`."""
        d = claim_files(directory, (CHAR_FILE,), overwrite, is_own=own_char_file, description="a char tokenizer")
        refuse_another_tokenizer(d, "char")
        d.mkdir(parents=True, exist_ok=True)
        data = {"format": CHAR_FORMAT, "version": CHAR_FORMAT_VERSION, "chars": self.chars,
                "special_tokens": self.special_tokens}  # fmt: skip
        write_file_atomic(d / CHAR_FILE, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CharTokenizer:
        path = Path(directory) / CHAR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CHAR_FILE} in {directory}")
        data = read_versioned_json(path, CHAR_FORMAT, CHAR_FORMAT_VERSION)
        chars, specials = data.get("chars"), data.get("special_tokens", {})
        if not isinstance(chars, list) or not isinstance(specials, dict):
            raise ValueError(f"{path}: 'chars' must be a list and 'special_tokens' an object")
        order = sorted(specials, key=lambda s: specials[s])
        if [specials[s] for s in order] != list(range(len(chars), len(chars) + len(order))):
            raise ValueError(f"{path}: special token ids must follow the characters ({len(chars)}, {len(chars)+1}, ...)")
        try:
            return cls(chars, order)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
