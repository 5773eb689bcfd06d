"""`Tokenizer`: GPT-2's byte-level BPE, a thin class over the pure helpers of this package.

Text becomes ids in three steps (docs/tokenizer.md walks one word through them):

1. **Pre-tokenise** with GPT-2's regex into pieces (pretokenize.py): words with their leading space, number runs,
   punctuation runs, whitespace. Merges never cross a piece boundary.
2. **Bytes.** Each piece is UTF-8 encoded; the 256 byte values are the base vocabulary, so any string at all can be
   encoded and nothing is ever "unknown".
3. **Merge** adjacent tokens by rank (merges.py): repeatedly join the adjacent pair that was learned earliest in
   training, until no learned pair is left.

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'

Speed comes from caching each piece's ids: natural text repeats its words, so after the first few kilobytes nearly
every piece is one dict lookup and the regex dominates.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path

from gpt2lab.tokenizer.base import _TokenizerBase
from gpt2lab.tokenizer.formats import (
    TokenizerFiles,
    _gpt2_merges,
    gpt2_ranks_file,
    read_hf_files,
    read_tiktoken_ranks,
    write_hf_files,
)
from gpt2lab.tokenizer.merges import _LONG_PIECE, _BadMerge, _merge_table, bpe, derive_merges
from gpt2lab.tokenizer.pretokenize import _CHUNK_CHARS, _PATTERN, EOT, split_text

_MAX_CACHE_BYTES = 64 << 20  # the piece cache's estimated size per tokenizer; then it starts afresh
_MAX_CACHED_PIECE = _LONG_PIECE  # longer pieces (runs of one letter, say) rarely repeat: encoded, never cached


def _entry_bytes(piece: str, ids: list[int]) -> int:
    """An upper estimate of the memory one cache entry takes: the key (up to 4 bytes a character), the list of ids
    (small ints are shared, so 8 bytes a slot, with room for over-allocation) and the dict's and objects' headers."""
    return 200 + 4 * len(piece) + 16 * len(ids)


class Tokenizer(_TokenizerBase):
    """Byte-level BPE: a vocabulary (id -> bytes), merges in rank order, and special tokens (str -> id).

    GPT-2's own: `Tokenizer.gpt2()` (50,257 ids, `<|endoftext|>` = 50256). Others: `Tokenizer.from_pretrained(dir)`,
    `Tokenizer.from_tiktoken(path)`, or `train_bpe(...)`. The object is immutable apart from its cache.
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Mapping[str, int] | None = None,
    ):
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = dict(special_tokens or {})
        self._id_of = {token: i for i, token in self.vocab.items()}
        if len(self._id_of) != len(self.vocab):
            raise ValueError("the vocabulary lists the same token under two ids")
        missing = [b for b in range(256) if bytes([b]) not in self._id_of]
        if missing:
            raise ValueError(f"the vocabulary lacks the single-byte tokens of bytes {missing[:8]}; "
                             "byte-level BPE needs all 256")  # fmt: skip
        clash = sorted(i for i in self.special_tokens.values() if i in self.vocab)
        if clash:
            raise ValueError(f"special token ids {clash[:8]} are also ids of ordinary tokens")
        self._byte_ids = [self._id_of[bytes([b])] for b in range(256)]
        self._ranks, self._merged = _merge_table(self.merges, self._id_of)
        self._decoder = {**self.vocab, **{i: s.encode("utf-8") for s, i in self.special_tokens.items()}}
        self._vocab_size = max(self._decoder) + 1
        self._cache: dict[str, list[int]] = {}
        self._cache_bytes = 0  # estimated, see _entry_bytes

    def __reduce__(self):  # pickle the definition, not the derived tables and cache
        return (type(self), (self.vocab, self.merges, self.special_tokens))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={self.special_tokens})"

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: the largest id + 1 (50257 for GPT-2)."""
        return self._vocab_size

    # --------------------------------------------------------------------------------------------- encode/decode
    def _encode_ordinary(self, text: str) -> list[int]:
        if len(text) <= _CHUNK_CHARS:
            return self._encode_chunk(text)
        return [i for chunk in split_text(text) for i in self._encode_chunk(chunk)]

    def _encode_chunk(self, text: str) -> list[int]:
        """Pre-tokenise, run BPE once per new piece, then join the cached ids of all pieces in one C-level pass."""
        pieces = _PATTERN.findall(text)
        cache = self._cache
        try:
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))  # every piece seen before
        except KeyError:
            pass
        byte_ids, ranks, merged = self._byte_ids, self._ranks, self._merged
        new = {piece: bpe([byte_ids[b] for b in piece.encode("utf-8")], ranks, merged)
               for piece in set(pieces).difference(cache)}
        self._remember(new)
        return list(chain.from_iterable(new[p] if p in new else cache[p] for p in pieces))

    def _remember(self, new: dict[str, list[int]]) -> None:
        """Cache newly encoded pieces, keeping the cache's estimated size within _MAX_CACHE_BYTES: when they would
        not fit, a new cache is started (rather than this one cleared: another thread may be reading it)."""
        sizes = {piece: _entry_bytes(piece, ids) for piece, ids in new.items() if len(piece) <= _MAX_CACHED_PIECE}
        added = sum(sizes.values())
        if self._cache_bytes + added > _MAX_CACHE_BYTES:
            self._cache, self._cache_bytes = {}, 0
        cache = self._cache
        for piece, size in sizes.items():
            if self._cache_bytes + size > _MAX_CACHE_BYTES:
                break
            cache[piece] = new[piece]
            self._cache_bytes += size

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the exact bytes they stand for (specials as their UTF-8 text)."""
        ids = self._ids_to_list(ids)
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            raise self._bad_id(ids, self._decoder.__contains__) from None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def gpt2(cls, ranks_file: str | os.PathLike | None = None) -> Tokenizer:
        """GPT-2's tokenizer (r50k_base), from its vocabulary file checked by sha256.

        Looked up in turn: our cache ($GPT2LAB_CACHE or ~/.cache/gpt2lab), tiktoken's cache, OpenAI's public URL,
        and the `gpt2.tiktoken` inside the PyPI sdist of openai-whisper (wherever pip works). Offline, pass the file
        yourself: `Tokenizer.gpt2(ranks_file="gpt2.tiktoken")`.
        """
        ranks = read_tiktoken_ranks(gpt2_ranks_file(ranks_file))
        return cls({rank: token for token, rank in ranks.items()}, _gpt2_merges(ranks), {EOT: 50256})

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, special_tokens: Mapping[str, int] | None = None) -> Tokenizer:
        """Load a tiktoken ranks file (`<base64 token> <rank>` per line); ids are the ranks.

        Without `special_tokens`, `<|endoftext|>` gets the id after the last rank.
        """
        ranks = read_tiktoken_ranks(path)
        if special_tokens is None:
            special_tokens = {EOT: max(ranks.values()) + 1}
        merges = derive_merges(ranks)
        return cls({rank: token for token, rank in ranks.items()}, merges, special_tokens)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load Hugging Face files from `directory`: `vocab.json` + `merges.txt`, else `tokenizer.json`.

        Special tokens come from `tokenizer_config.json` (`added_tokens_decoder`) when present; otherwise
        `<|endoftext|>` is special if the vocabulary has it, as in GPT-2.
        """
        return cls._from_files(read_hf_files(directory))

    @classmethod
    def _from_files(cls, files: TokenizerFiles) -> Tokenizer:
        """A Tokenizer from parsed files; a merge out of order is reported with its file and line."""
        try:
            return cls(files.vocab, files.merges, files.special_tokens)
        except _BadMerge as e:
            raise ValueError(f"{files.path}, {files.where(e.index)}: {e.reason}") from None

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` (Hugging Face's GPT-2 format) to `directory`.

        Each file is written atomically; other files in the directory (a model's config and weights) are kept, and
        existing tokenizer files are replaced only with `overwrite`.
        `transformers.GPT2TokenizerFast.from_pretrained(directory)` then gives the same ids as `encode(...,
        allowed_special="all")`.
        """
        return write_hf_files(directory, self.vocab, self.merges, self.special_tokens, overwrite)
