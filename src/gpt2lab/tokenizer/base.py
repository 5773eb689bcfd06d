"""What both tokenizers share: input checks, special tokens, batching and parallel encoding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import regex

from gpt2lab.tokenizer.pool import check_workers, encode_packed, tokenizer_pool
from gpt2lab.tokenizer.pretokenize import (
    _CHUNK_CHARS,
    EOT,
    AllowedSpecial,
    _check_text,
    _resolve_allowed,
    _special_splitter,
    split_text,
)


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
        if check_workers(num_workers) > 1 and len(text) > _CHUNK_CHARS:
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
        if check_workers(num_workers) == 1 or len(texts) < 2:
            return [self.encode(text, allowed_special) for text in texts]
        workers = min(num_workers, len(texts))
        with tokenizer_pool(self, workers) as imap:
            encoded = imap(partial(encode_packed, allowed_special=allowed_special), texts,
                           chunksize=max(1, len(texts) // (8 * workers)))  # fmt: skip
            return [ids.tolist() for ids in encoded]

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
