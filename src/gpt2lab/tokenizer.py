"""GPT-2's tokenizer: byte-level BPE, written from scratch. Pure helpers first, then the thin classes.

Text becomes ids in three steps (docs/tokenizer.md walks one word through them):

1. **Pre-tokenise** with GPT-2's regex into pieces: words with their leading space, number runs, punctuation runs,
   whitespace. Merges never cross a piece boundary, so " dog" is tokenised the same wherever it appears.
2. **Bytes.** Each piece is UTF-8 encoded; the 256 byte values are the base vocabulary, so any string at all can be
   encoded and nothing is ever "unknown".
3. **Merge** adjacent tokens by rank: repeatedly join the adjacent pair that was learned earliest in training,
   until no learned pair is left.

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'

Files: Hugging Face's `vocab.json` + `merges.txt` (+ `tokenizer_config.json`), or `tokenizer.json`, or a tiktoken
ranks file. Speed comes from caching each piece's ids: natural text repeats its words, so after the first few
kilobytes nearly every piece is one dict lookup and the regex dominates. This module needs no torch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import os
import tempfile
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import chain, pairwise, repeat
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Literal

import regex

from gpt2lab.download import (
    cache_dir,
    file_source,
    obtain,
    pypi_sdist_source,
    read_json,
    read_versioned_json,
    sha256_file,
    url_source,
    write_file_atomic,
)
from gpt2lab.files import claim_files

__all__ = [
    "CharTokenizer",
    "EOT",
    "GPT2_PATTERN",
    "Tokenizer",
    "bpe",
    "bytes_to_unicode",
    "count_pieces",
    "derive_merges",
    "learn_merges",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "split_text",
    "train_bpe",
]

EOT = "<|endoftext|>"

# GPT-2's pre-tokeniser, as released (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`).
# Written with possessive runs (`++`), which match the same pieces but never backtrack, so they run faster.
# Contractions first; then an optional single space glued to the following letters, digits or symbols, so " dog"
# is one piece; `\s+(?!\S)` leaves the last space of a run to start the next word ("a   b" -> "a", "  ", " b").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s+(?!\S)|\s+"""

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

AllowedSpecial = Literal["all"] | AbstractSet[str] | Sequence[str]

_LONG_PIECE = 256  # pieces longer than this are merged with a heap: O(n log n) instead of O(n^2)
_CHUNK_CHARS = 1 << 16  # encode long texts in chunks so the regex's list of pieces stays small
_MAX_CACHE_BYTES = 64 << 20  # the piece cache's estimated size per tokenizer; then it starts afresh
_MAX_CACHED_PIECE = _LONG_PIECE  # longer pieces (runs of one letter, say) rarely repeat: encoded, never cached


# ------------------------------------------------------------------------------------------------- byte <-> unicode
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to 256 printable characters, used only in vocab files.

    Why: vocab.json and merges.txt are text, space-separated. Raw bytes such as b" " or b"\\n" or half a UTF-8
    character cannot be written there, so each byte gets a visible stand-in. Bytes that are already printable
    (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; the other 68 are shifted to U+0100 and up, in byte order.
    Hence the familiar 'Ġ' (U+0120) for a space and 'Ċ' for a newline:

        >>> bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("\\n")]
        ('Ġ', 'Ċ')

    The dict's order (printable bytes first) is also the order of GPT-2's first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate tables, so converting a token is one C call: visible <-> latin-1 (whose code points are the bytes).
_FROM_VISIBLE = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}
_FROM_VISIBLE.update({b: 0xFFFF for b in range(256) if b not in _FROM_VISIBLE})  # no stand-in: make latin-1 fail


def _to_visible(token: bytes) -> str:
    return token.decode("latin-1").translate(_BYTE_TO_CHAR)


def _from_visible(text: str) -> bytes | None:
    """Inverse of `_to_visible`; None if `text` has a character that stands for no byte."""
    try:
        return text.translate(_FROM_VISIBLE).encode("latin-1")
    except UnicodeEncodeError:
        return None


# ------------------------------------------------------------------------------------------------------ splitting
_PATTERN = regex.compile(GPT2_PATTERN)

# Places where GPT-2's regex always ends a piece, whatever follows: before a space that sits between two
# non-spaces ("dog| cat"), and after a lone newline between two non-spaces ("dog\n|cat"). Cutting there gives
# the same pieces as not cutting (tests check this), so long texts can be encoded chunk by chunk, or in parallel.
_SAFE_CUT = regex.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


def split_text(text: str, max_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut `text` into chunks of about `max_chars` at places where the pre-tokeniser splits anyway.

    Encoding the chunks one by one gives exactly the ids of encoding the whole text. A chunk may be longer than
    `max_chars` when there is no safe place to cut (e.g. one long run of letters).

        >>> split_text("the cat sat", 4)
        ['the cat', ' sat']
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    chunks, start = [], 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        chunks.append(text[start : cut.start()])
        start = cut.start()
    chunks.append(text[start:])
    return chunks


# -------------------------------------------------------------------------------------------------------- merging
# A merge table is two parts: `ranks` maps a pair of adjacent ids to its rank (lower = learned earlier), and
# `merged[rank]` is the id of the token that merge makes.
Ranks = Mapping[tuple[int, int], int]
_NO_RANK = 1 << 62


def bpe(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    """Apply BPE merges to one piece's ids: join the lowest-ranked adjacent pair (leftmost first) until none is left.

    Example with merges (h, e) -> he, (l, l) -> ll, (he, ll) -> hell, in that rank order:
    [h, e, l, l, o] -> [he, l, l, o] -> [he, ll, o] -> [hell, o].

    `found[k]` is the rank of the pair (ids[k], ids[k+1]). A merge changes only the two pairs beside it, so only
    those are looked up again; `min` and `index` scan the list in C. Long pieces go to a heap-based version, so a
    100 kB run of one letter does not take quadratic time.
    """
    return _bpe_heap(ids, ranks, merged) if len(ids) > _LONG_PIECE else _bpe_scan(ids, ranks, merged)


def _bpe_scan(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    ids = list(ids)
    get = ranks.get
    found = list(map(get, pairwise(ids), repeat(_NO_RANK, len(ids))))
    while found:
        rank = min(found)
        if rank == _NO_RANK:
            break
        i = found.index(rank)
        ids[i] = merged[rank]
        del ids[i + 1], found[i]
        if i > 0:
            found[i - 1] = get((ids[i - 1], ids[i]), _NO_RANK)
        if i < len(found):
            found[i] = get((ids[i], ids[i + 1]), _NO_RANK)
    return ids


def _bpe_heap(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    """`bpe` for long pieces: a linked list of tokens and a heap of (rank, position) candidates.

    Popping the smallest (rank, position) picks the lowest-ranked pair, leftmost first, like `bpe`. Entries go
    stale when a neighbour is merged; they are recognised on pop and skipped.
    """
    n = len(ids)
    tokens = list(ids)
    nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    heap = [(ranks[p], i) for i, p in enumerate(pairwise(ids)) if p in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n:
            continue
        if ranks.get((tokens[i], tokens[j])) != rank:
            continue
        tokens[i], alive[j], nxt[i] = merged[rank], False, nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        for left in (prv[i], i):  # the two pairs that now involve the merged token
            right = nxt[left] if left >= 0 else n
            if left >= 0 and right < n and (tokens[left], tokens[right]) in ranks:
                heapq.heappush(heap, (ranks[tokens[left], tokens[right]], left))
    return [t for t, keep in zip(tokens, alive) if keep]


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list, in rank order, from tiktoken-style ranks ({token bytes: rank}).

    A tiktoken file stores only tokens and their ranks. Each multi-byte token was made by one merge of two earlier
    tokens; running BPE on its bytes with only the earlier merges stops at exactly those two parts.
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"the ranks lack the single-byte tokens of bytes {missing[:8]}; byte-level BPE needs all 256")
    byte_ids = [ranks[bytes([b])] for b in range(256)]
    token_of = {rank: token for token, rank in ranks.items()}
    pair_ranks: dict[tuple[int, int], int] = {}
    merged: list[int] = []
    merges = []
    for rank in sorted(token_of):
        token = token_of[rank]
        if len(token) == 1:
            continue
        split = _only_split(token, rank, ranks)
        if split:  # shortcut, taken for ~half of GPT-2's tokens: one split into two earlier tokens, so it is that one
            parts = [ranks[token[:split]], ranks[token[split:]]]
        else:
            parts = bpe([byte_ids[b] for b in token], pair_ranks, merged)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        pair_ranks[parts[0], parts[1]] = len(merged)
        merged.append(rank)
        merges.append((token_of[parts[0]], token_of[parts[1]]))
    return merges


def _only_split(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> int:
    """The cut k if token[:k] and token[k:] are earlier tokens for exactly one k; else 0."""
    found = 0
    for k in range(1, len(token)):
        if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank:
            if found:
                return 0
            found = k
    return found


class _BadMerge(ValueError):
    """A merge that does not fit the vocabulary; `index` lets file readers report the line."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"merge #{index}: {reason}")
        self.index, self.reason = index, reason


def _merge_table(merges: Sequence[tuple[bytes, bytes]], id_of: Mapping[bytes, int]) -> tuple[dict, list[int]]:
    """(ranks, merged) for `bpe`, checking that each merge builds only on bytes and earlier merges.

    That order is what makes BPE well defined (and lets the result not depend on how ties between equal pairs
    are broken).
    """
    made = {token for token in id_of if len(token) == 1}
    ranks: dict[tuple[int, int], int] = {}
    merged: list[int] = []
    for rank, (left, right) in enumerate(merges):
        if left not in made or right not in made:
            part = left if left not in made else right
            raise _BadMerge(rank, f"{_to_visible(part)!r} is neither a byte nor the result of an earlier merge")
        token = left + right
        if token not in id_of:
            raise _BadMerge(rank, f"the merged token {_to_visible(token)!r} is not in the vocabulary")
        ranks[id_of[left], id_of[right]] = rank
        merged.append(id_of[token])
        made.add(token)
    if len(ranks) != len(merges):
        seen = set()
        for rank, pair in enumerate(merges):
            if pair in seen:
                raise _BadMerge(rank, f"({_to_visible(pair[0])!r}, {_to_visible(pair[1])!r}) is listed twice")
            seen.add(pair)
    return ranks, merged


# ------------------------------------------------------------------------------------------------ special tokens
def _resolve_allowed(special_tokens: Mapping[str, int], allowed: AllowedSpecial) -> dict[str, int]:
    """The special tokens that `encode(text, allowed_special=...)` should map to their ids."""
    if isinstance(allowed, str):
        if allowed == "all":
            return dict(special_tokens)
        raise ValueError(f"allowed_special must be 'all' or a set of special tokens, got the string {allowed!r}"
                         f" (for one token write {{{allowed!r}}})")  # fmt: skip
    unknown = sorted(set(allowed) - special_tokens.keys())
    if unknown:
        have = ", ".join(map(repr, special_tokens)) or "none"
        raise ValueError(f"unknown special tokens {unknown}; this tokenizer has: {have}")
    return {token: special_tokens[token] for token in allowed}


def _special_splitter(specials: AbstractSet[str]) -> regex.Pattern:
    # Longest first, so that of two specials where one is a prefix of the other the longer wins.
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        hint = " (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"encode expects a str, got {type(text).__name__}{hint}")


# Set in worker processes only (by the pool initializer), so the tokenizer crosses to each worker once, not per task.
_WORKER_TOKENIZER = None


def _init_worker(tokenizer: _TokenizerBase) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(text: str, allowed_special: AllowedSpecial) -> array:
    # An array pickles as one block of bytes: far cheaper to send back than a list of Python ints.
    return array("q", _WORKER_TOKENIZER.encode(text, allowed_special=allowed_special))


def _pool_context():
    # fork shares the parent's tokenizer without pickling or re-importing anything; the workers run pure Python.
    return get_context("fork" if "fork" in get_all_start_methods() else None)


class _TokenizerBase:
    """What both tokenizers share: input checks, special tokens, batching and parallel encoding.

    A subclass provides `special_tokens`, `_encode_ordinary(text)`, `decode_bytes(ids)` and `vocab_size`.
    """

    special_tokens: dict[str, int]

    @property
    def eot_token(self) -> int | None:
        """Id of `<|endoftext|>`, the document separator (50256 in GPT-2); None if this tokenizer has none."""
        return self.special_tokens.get(EOT)

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset(), num_workers: int = 1) -> list[int]:
        """Text -> ids. Special-token strings are ordinary text unless listed in `allowed_special` ('all' or a set).

        Like tiktoken: `encode(t)` is `encode_ordinary(t)`, and `encode(t, allowed_special="all")` maps each
        `<|endoftext|>` in `t` to its id. `num_workers > 1` encodes a long text in parallel processes, cut where
        the result cannot change.
        """
        _check_text(text)
        parts = self._split_specials(text, _resolve_allowed(self.special_tokens, allowed_special))
        texts = [part for part in parts if type(part) is str]
        if _check_workers(num_workers) > 1 and len(text) > _CHUNK_CHARS:
            encoded = iter(self._encode_parallel(texts, num_workers))
        else:
            encoded = map(self._encode_ordinary, texts)
        ids: list[int] = []
        for part in parts:
            if type(part) is int:
                ids.append(part)
            else:
                ids.extend(next(encoded))
        return ids

    def _encode_parallel(self, texts: list[str], num_workers: int) -> list[list[int]]:
        """Cut each text where the pieces cannot change (see `split_text`) and encode the chunks in processes.

        Special tokens were split off before, so a cut never falls inside one.
        """
        size = max(_CHUNK_CHARS, sum(map(len, texts)) // (4 * num_workers))
        chunked = [split_text(text, size) for text in texts]
        flat = iter(self.encode_batch([chunk for chunks in chunked for chunk in chunks], num_workers=num_workers))
        return [[i for _ in chunks for i in next(flat)] for chunks in chunked]

    def _split_specials(self, text: str, specials: dict[str, int]) -> list[str | int]:
        """'a<|endoftext|>b' -> ['a', 50256, 'b'] for the allowed specials; [text] when none are allowed."""
        if not specials:
            return [text]
        splitter = self._special_split(frozenset(specials))
        # split() with a capture group alternates text, special, text, ...
        return [specials[part] if k % 2 else part for k, part in enumerate(splitter.split(text)) if part]

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset(), num_workers: int = 1
    ) -> list[list[int]]:
        """Encode many texts; with `num_workers > 1` in that many processes. Order is kept.

        Each worker keeps its own piece cache, so give it enough text to warm up (documents, not single words).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str, got one str; use encode() for a single text")
        texts = list(texts)
        for text in texts:
            _check_text(text)
        _resolve_allowed(self.special_tokens, allowed_special)  # fail here, not in a worker
        if _check_workers(num_workers) == 1 or len(texts) < 2:
            return [self.encode(text, allowed_special) for text in texts]
        workers = min(num_workers, len(texts))
        with _pool_context().Pool(workers, initializer=_init_worker, initargs=(self,)) as pool:
            job = pool.starmap_async(_encode_in_worker, [(t, allowed_special) for t in texts],
                                     chunksize=max(1, len(texts) // (8 * workers)))  # fmt: skip
            return [ids.tolist() for ids in job.get()]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> str. Ids that split a UTF-8 character decode to U+FFFD, as in GPT-2; `decode_bytes` is exact."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _special_split(self, specials: frozenset[str]) -> regex.Pattern:
        cache = self.__dict__.setdefault("_special_splitters", {})
        if specials not in cache:
            cache[specials] = _special_splitter(specials)
        return cache[specials]

    def _ids_to_list(self, ids: Iterable[int]) -> list:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors, without importing either
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
        return ids if isinstance(ids, list) else list(ids)

    def _bad_id(self, ids: list, known: Callable[[object], bool]) -> ValueError:
        bad = next((i for i in ids if not (isinstance(i, int) and known(i))), None)
        return ValueError(f"token id {bad!r} is not in the vocabulary (ids 0..{self.vocab_size - 1})")


def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    specials = [] if isinstance(special_tokens, str) else list(special_tokens)
    if isinstance(special_tokens, str) or len(set(specials)) != len(specials) or not all(
        isinstance(s, str) and s for s in specials
    ):
        raise ValueError(f"special_tokens must be a list of distinct non-empty strings, got {special_tokens!r}")
    return specials


def _check_workers(num_workers: object) -> int:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    return num_workers


def _entry_bytes(piece: str, ids: list[int]) -> int:
    """An upper estimate of the memory one cache entry takes: the key (up to 4 bytes a character), the list of ids
    (small ints are shared, so 8 bytes a slot, with room for over-allocation) and the dict's and objects' headers."""
    return 200 + 4 * len(piece) + 16 * len(ids)


# ------------------------------------------------------------------------------------------------------- Tokenizer
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
        if ranks_file is not None:
            path = Path(ranks_file)
            got = sha256_file(path)
            if got != GPT2_RANKS_SHA256:
                raise ValueError(f"{path} has sha256 {got}, not GPT-2's vocabulary ({GPT2_RANKS_SHA256})")
        else:
            dest = cache_dir() / "gpt2.tiktoken"
            hint = (f"Offline, copy GPT-2's gpt2.tiktoken (alias r50k_base.tiktoken) to {dest} or pass it: "
                    "Tokenizer.gpt2(ranks_file=PATH), or `--tokenizer PATH` on the command line.")  # fmt: skip
            path = obtain(dest, GPT2_RANKS_SHA256, _gpt2_sources(), hint=hint)
        ranks = read_tiktoken_ranks(path)
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
        d = Path(directory)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            declared = _declared_specials(d / "tokenizer_config.json")
            return _build(*_read_vocab_and_merges(d / "vocab.json", d / "merges.txt", declared))
        if (d / "tokenizer.json").is_file():
            return _build(*_read_tokenizer_json(d / "tokenizer.json"))
        if not d.is_dir():
            raise FileNotFoundError(f"no tokenizer directory at {d}")
        raise FileNotFoundError(f"no BPE tokenizer files in {d}: expected vocab.json + merges.txt, or tokenizer.json")

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` (Hugging Face's GPT-2 format) to `directory`.

        Each file is written atomically; other files in the directory (a model's config and weights) are kept, and
        existing tokenizer files are replaced only with `overwrite`.
        `transformers.GPT2TokenizerFast.from_pretrained(directory)` then gives the same ids as `encode(...,
        allowed_special="all")`.
        """
        d = claim_files(directory, BPE_FILES, overwrite)
        vocab = {_to_visible(token): i for i, token in sorted(self.vocab.items())}
        for special, i in self.special_tokens.items():
            if vocab.get(special, i) != i:
                raise ValueError(f"special token {special!r} has the same text as ordinary token {vocab[special]}")
            vocab[special] = i
        d.mkdir(parents=True, exist_ok=True)
        write_file_atomic(d / "vocab.json", json.dumps(vocab))  # json's defaults: the layout of GPT-2's encoder.json
        write_file_atomic(d / "merges.txt", _merges_text(self.merges))
        write_file_atomic(d / "tokenizer_config.json", json.dumps(_hf_config(self.special_tokens), indent=2) + "\n")
        return d


def _merges_text(merges: Sequence[tuple[bytes, bytes]]) -> str:
    return "#version: 0.2\n" + "".join(f"{_to_visible(a)} {_to_visible(b)}\n" for a, b in merges)


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


def _hf_config(special_tokens: Mapping[str, int]) -> dict:
    config: dict = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode exact (no " ." -> "." rewriting)
        "errors": "replace",
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for s, i in sorted(special_tokens.items(), key=lambda item: item[1])
        },
    }
    if EOT in special_tokens:
        config.update(bos_token=EOT, eos_token=EOT, unk_token=EOT)
    return config


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
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{path}: token {text!r} has id {i!r}; ids must be ints >= 0")
        if text in specials:
            continue
        token = _from_visible(text)
        if not token:
            raise ValueError(f"{path}: token {text!r} (id {i}) is not byte-level BPE text (GPT-2's byte map)")
        ordinary[i] = token
    return ordinary, dict(specials)


def _parse_merges(entries: Sequence[object], vocab: Mapping[int, bytes], path: Path, label: Callable[[int], str]):
    """Merge entries ('a b' strings or [a, b] lists) -> byte pairs, naming `label(k)` (the line) of a bad one.

    The order of the merges is checked when the Tokenizer is built; `_build` maps such an error back to its line.
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


def _read_vocab_and_merges(vocab_path: Path, merges_path: Path, specials: Mapping[str, int] | None):
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
    return vocab, merges, label, specials, merges_path


def _read_tokenizer_json(path: Path):
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

    return vocab, _parse_merges(merges, vocab, path, label), label, specials, path


def _build(vocab, merges, label: Callable[[int], str], specials, path: Path) -> Tokenizer:
    """A Tokenizer from parsed files; a merge out of order is reported with its file and line."""
    try:
        return Tokenizer(vocab, merges, specials)
    except _BadMerge as e:
        raise ValueError(f"{path}, {label(e.index)}: {e.reason}") from None


# -------------------------------------------------------------------------------------------------------- training
def train_bpe(
    texts: str | Iterable[str] = (),
    *,
    vocab_size: int,
    files: Iterable[str | os.PathLike] = (),
    special_tokens: Sequence[str] = (EOT,),
    progress: bool = False,
) -> Tokenizer:
    """Learn a GPT-2-style byte-level BPE tokenizer of `vocab_size` ids from `texts` and/or UTF-8 `files`.

    Like GPT-2: the text is pre-split with GPT-2's regex (merges never cross a piece), the base vocabulary is the
    256 bytes (ids 0-255 in GPT-2's order), merges get ids 256, 257, ... in the order they are learned, and the
    special tokens come last. Special-token strings in the corpus only separate text; they are never merged.

    Each step merges the most frequent adjacent pair, counted over the unique pieces weighted by frequency. Ties go
    to the pair whose (left bytes, right bytes) is smallest, so the result does not depend on input order or
    hashing. Counts are updated incrementally: a merge touches only the pieces that contain the pair (an index from
    pair to pieces says which), never a full recount. If the corpus runs out of pairs first, the vocabulary is
    smaller than asked.
    """
    specials = _check_specials(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be an int >= {256 + len(specials)} (256 bytes + {len(specials)} special"
                         f" tokens), got {vocab_size!r}")  # fmt: skip
    counts = count_pieces([texts] if isinstance(texts, str) else texts, files, specials, progress)
    base = [bytes([b]) for b in _BYTE_TO_CHAR]  # GPT-2's order: printable bytes first
    merges = learn_merges(counts, vocab_size - 256 - len(specials), base, progress)
    vocab = dict(enumerate(base + [a + b for a, b in merges]))
    return Tokenizer(vocab, merges, {s: len(vocab) + k for k, s in enumerate(specials)})


def count_pieces(
    texts: Iterable[str], files: Iterable[str | os.PathLike], special_tokens: Sequence[str] = (), progress: bool = False
) -> Counter:
    """How often each pre-tokenised piece occurs in `texts` and `files` ({piece: count}).

    Files are read in blocks cut at places where the pieces cannot change, so a large file never needs to fit
    in memory and the counts equal those of the whole text.
    """
    counts: Counter = Counter()
    splitter = _special_splitter(set(special_tokens)) if special_tokens else None

    def add(text: str) -> None:
        for k, part in enumerate(splitter.split(text) if splitter else (text,)):
            if k % 2 == 0:
                counts.update(_PATTERN.findall(part))

    for text in texts:
        _check_text(text)
        add(text)
    for path in files:
        for block in _read_blocks(Path(path), progress):
            add(block)
    return counts


def _read_blocks(path: Path, progress: bool, block_bytes: int = 1 << 20) -> Iterator[str]:
    """Yield the UTF-8 text of `path` in blocks ending at safe cuts (see `split_text`); newlines are kept as is."""
    import codecs

    from tqdm import tqdm

    decoder = codecs.getincrementaldecoder("utf-8")()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                     disable=not progress, leave=False) as bar:  # fmt: skip
        pending, offset = "", 0
        while True:
            data = f.read(block_bytes)
            try:
                pending += decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (byte {offset + e.start}): {e.reason}") from None
            offset += len(data)
            bar.update(len(data))
            if not data:
                break
            *ready, pending = split_text(pending, max(1, len(pending) // 2))
            yield from ready
        if pending:
            yield pending


def learn_merges(
    counts: Mapping[str, int], n_merges: int, base: Sequence[bytes], progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """Learn up to `n_merges` merges from piece counts; `base[i]` is the byte of id i. Returns byte pairs in order.

    State: each unique piece as a list of ids with its count, `pair_counts` over all pieces, `where[pair]` = the
    pieces that contain the pair, and a max-heap of (count, pair) whose stale entries are skipped when popped.
    """
    from tqdm import tqdm

    id_of_byte = {token[0]: i for i, token in enumerate(base)}
    words = [[id_of_byte[b] for b in piece.encode("utf-8")] for piece in counts]
    freqs = list(counts.values())
    token_bytes = list(base)
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(w)

    def entry(pair: tuple[int, int]):  # heap order: highest count, then smallest (left bytes, right bytes)
        return (-pair_counts[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

    heap = [entry(pair) for pair in pair_counts]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_merges, desc="merges", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            neg_count, left, right, pair = heapq.heappop(heap)
            if pair_counts.get(pair) != -neg_count:
                continue  # stale: the count changed after this entry was pushed
            new_id = len(token_bytes)
            token_bytes.append(left + right)
            merges.append((left, right))
            changed = _apply_merge(pair, new_id, words, freqs, pair_counts, where)
            for p in changed:
                if pair_counts[p] > 0:
                    heapq.heappush(heap, entry(p))
                else:
                    del pair_counts[p]
            bar.update(1)
    return merges


def _apply_merge(pair, new_id, words, freqs, pair_counts, where) -> set:
    """Merge `pair` in every piece that has it, updating pair counts and the index; returns the pairs touched."""
    changed = set()
    first, second = pair
    for w in where.pop(pair):
        word = words[w]
        new, i, n = [], 0, len(word)
        while i < n:
            if word[i] == first and i + 1 < n and word[i + 1] == second:
                new.append(new_id)
                i += 2
            else:
                new.append(word[i])
                i += 1
        if len(new) == n:
            continue  # the index is allowed to be stale: this piece no longer has the pair
        freq = freqs[w]
        for p in pairwise(word):
            pair_counts[p] -= freq
            changed.add(p)
        for p in pairwise(new):
            pair_counts[p] += freq
            changed.add(p)
            where[p].add(w)
        words[w] = new
    changed.discard(pair)
    pair_counts.pop(pair, None)
    return changed


# -------------------------------------------------------------------------------------------------- CharTokenizer
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
        d = claim_files(directory, (CHAR_FILE,), overwrite)
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


# ---------------------------------------------------------------------------------------------------- load_tokenizer
def load_tokenizer(spec: str | os.PathLike) -> Tokenizer | CharTokenizer:
    """'gpt2', a directory (a model directory, or one written by `save_pretrained`), or a `.tiktoken` file.

    A directory with `char_tokenizer.json` holds a CharTokenizer; one with `vocab.json` + `merges.txt` or
    `tokenizer.json` a BPE Tokenizer.
    """
    if spec == "gpt2":
        return Tokenizer.gpt2()
    path = Path(spec)
    if path.is_dir():
        has_char = (path / CHAR_FILE).is_file()
        has_bpe = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
        if has_char and has_bpe:
            raise ValueError(f"{path} holds both {CHAR_FILE} and BPE files; keep one tokenizer per directory")
        return CharTokenizer.from_pretrained(path) if has_char else Tokenizer.from_pretrained(path)
    if path.is_file() and path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path)
    raise ValueError(f"unknown tokenizer {str(spec)!r}: use 'gpt2', a directory with vocab.json + merges.txt, "
                     f"tokenizer.json or {CHAR_FILE}, or a .tiktoken file")  # fmt: skip
