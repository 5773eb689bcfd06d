"""Bytes to text, with stop strings: the one text assembler of generation and serving.

GPT-2's tokens are bytes, and one character (é, an emoji) may span several tokens, so text is assembled through an
incremental UTF-8 decoder: a piece never holds half a character. A stop string may arrive split across tokens, so text
that could be the beginning of one is held back (`held_back`) until it is ruled out, and at the first complete one
(`first_stop`) the text before it is the last piece. No torch here: this is plain text handling.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Iterator, Optional, Sequence


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string, and so must not be shown yet.

    Used by `text_pieces` here and by the server's streaming, so both hold back exactly the same text.

    >>> held_back("Hello wor", ["world"]), held_back("Hello", ["\\n\\n"])
    (3, 0)
    """
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def text_pieces(chunks: Iterable[bytes], stops: Sequence[str] = ()) -> Iterator[str]:
    """Turn a stream of byte chunks (one per token) into text pieces that never split a character or a stop string.

    Bytes pass through an incremental UTF-8 decoder (an incomplete sequence waits for the next chunk). Text that
    could be the beginning of a stop string waits until it is ruled out; at the first complete stop string, the text
    before it is yielded and the stream ends (the chunk iterator is not read further).

    >>> list(text_pieces([b"caf", b"\\xc3", b"\\xa9 ok", b"END!"], stops=["END"]))
    ['caf', 'é ok']
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        cut = first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        hold = held_back(pending, stops)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += decoder.decode(b"", final=True)
    cut = first_stop(pending, stops)
    pending = pending[:cut] if cut is not None else pending
    if pending:
        yield pending


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
