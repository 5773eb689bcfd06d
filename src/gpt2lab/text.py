"""Bytes to text, with stop strings: the one text assembler of generation and serving.

GPT-2's tokens are bytes, and one character (é, an emoji) may span several tokens, so text is assembled through an
incremental UTF-8 decoder: a piece never holds half a character. A stop string may arrive split across tokens, so text
that could be the beginning of one is held back (`held_back`) until it is ruled out, and at the first complete one
(`first_stop`) the text before it is the last piece. `TextAssembler` does both, fed one chunk of bytes at a time;
`text_pieces` (generation's streaming) and the server's `ChoiceText` are built on it. No torch here: this is plain
text handling.
"""

from __future__ import annotations

import codecs
from typing import Iterable, Iterator, Optional, Sequence


class TextAssembler:
    """Turns chunks of bytes (one per token) into text that is certain: whole characters, stop strings cut.

    `feed(chunk)` returns the text that can be shown now; text that could begin a stop string, and a character still
    incomplete, wait for later chunks. At the first complete stop string the text is cut before it, `stopped` becomes
    True and later chunks are ignored. `finish()` ends the text: it returns what was held back (a character left
    incomplete becomes U+FFFD). `chunk_start` tells where the last fed chunk's text starts in `text`, for the
    character offsets of OpenAI's logprobs.

    >>> a = TextAssembler(stops=["END"])
    >>> a.feed(b"caf"), a.feed(b"\\xc3"), a.feed(b"\\xa9 E"), a.chunk_start, a.feed(b"ND!"), a.stopped, a.text
    ('caf', '', 'é ', 3, '', True, 'café ')
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._released: list[str] = []  # the text returned so far, in pieces (joined only when `text` is read)
        self._pending = ""  # decoded but not yet returned: a possible start of a stop string
        self.released = 0  # characters returned so far
        self.chunk_start = 0  # where the text of the chunk fed last starts in `text`
        self.stopped = False  # a stop string completed; `text` ends before it
        self.finished = False

    @property
    def text(self) -> str:
        """All text decoded so far (cut before a stop string), returned or not."""
        return "".join(self._released) + self._pending

    @property
    def done(self) -> bool:
        """True once the text has ended (a stop string, or `finish()`): chunks fed now are ignored."""
        return self.stopped or self.finished

    def start_of(self, chunk: bytes) -> int:
        """Where `chunk`'s text would start in `text` if it were fed next.

        A chunk that completes a character started by earlier chunks starts at that character. But when the decoder
        holds the start of a character that `chunk` does not continue, those bytes become U+FFFD first, and the
        chunk's own text starts after it.
        """
        return self.released + len(self._pending) + _replaced_before(self._decoder, chunk)

    def feed(self, chunk: bytes) -> str:
        """Take one chunk of bytes; return the text now certain (often '', never half a character)."""
        if self.done:
            return ""
        self.chunk_start = self.start_of(chunk)
        self._pending += self._decoder.decode(chunk)
        cut = first_stop(self._pending, self.stops)  # a stop string can only start in text not yet returned
        if cut is not None:
            self._pending, self.stopped = self._pending[:cut], True
            return self._release(cut)
        return self._release(len(self._pending) - held_back(self._pending, self.stops))

    def finish(self) -> str:
        """End the text: return all that is held back, cut at a stop string it completes (only a dangling partial
        character, now U+FFFD, can complete one). After a stop string there is nothing left ('')."""
        if not self.done:
            self._pending += self._decoder.decode(b"", final=True)
            cut = first_stop(self._pending, self.stops)
            if cut is not None:
                self._pending, self.stopped = self._pending[:cut], True
        self.finished = True
        return self._release(len(self._pending))

    def _release(self, n: int) -> str:
        """Return the first `n` characters of the pending text."""
        piece, self._pending = self._pending[:n], self._pending[n:]
        if piece:
            self._released.append(piece)
            self.released += len(piece)
        return piece


def text_pieces(chunks: Iterable[bytes], stops: Sequence[str] = ()) -> Iterator[str]:
    """Turn a stream of byte chunks (one per token) into text pieces that never split a character or a stop string.

    A pull-style view of `TextAssembler`: at the first complete stop string, the text before it is yielded and the
    stream ends (the chunk iterator is not read further).

    >>> list(text_pieces([b"caf", b"\\xc3", b"\\xa9 ok", b"END!"], stops=["END"]))
    ['caf', 'é ok']
    """
    assembler = TextAssembler(stops)
    for chunk in chunks:
        piece = assembler.feed(chunk)
        if piece:
            yield piece
        if assembler.stopped:
            return
    rest = assembler.finish()
    if rest:
        yield rest


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string, and so must not be shown yet.

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


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _replaced_before(decoder: codecs.IncrementalDecoder, chunk: bytes) -> int:
    """How many U+FFFD the `decoder` will emit for the bytes it holds before the text of `chunk`: 1 when it holds
    the start of a character that `chunk` does not continue, else 0."""
    held, _ = decoder.getstate()
    if not held or not chunk:
        return 0
    strict = codecs.getincrementaldecoder("utf-8")()
    strict.setstate((held, 0))
    try:
        strict.decode(chunk[:1])
    except UnicodeDecodeError:
        return 1  # the decoder only ever holds a valid incomplete prefix: it becomes one U+FFFD
    return 0
