"""Text -> pieces: GPT-2's regex, the places where long text may be cut, and special tokens split off first.

Merges never cross a piece boundary, so " dog" is tokenised the same wherever it appears; and since the regex
always ends a piece at certain places, a long text can be cut there and encoded chunk by chunk, or in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

import regex

EOT = "<|endoftext|>"

# GPT-2's pre-tokeniser, as released (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`).
# Written with possessive runs (`++`), which match the same pieces but never backtrack, so they run faster.
# Contractions first; then an optional single space glued to the following letters, digits or symbols, so " dog"
# is one piece; `\s+(?!\S)` leaves the last space of a run to start the next word ("a   b" -> "a", "  ", " b").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s+(?!\S)|\s+"""

AllowedSpecial = Literal["all"] | AbstractSet[str] | Sequence[str]

_CHUNK_CHARS = 1 << 16  # encode long texts in chunks so the regex's list of pieces stays small

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


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        hint = " (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"encode expects a str, got {type(text).__name__}{hint}")


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


def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    specials = [] if isinstance(special_tokens, str) else list(special_tokens)
    if isinstance(special_tokens, str) or len(set(specials)) != len(specials) or not all(
        isinstance(s, str) and s for s in specials
    ):
        raise ValueError(f"special_tokens must be a list of distinct non-empty strings, got {special_tokens!r}")
    return specials
