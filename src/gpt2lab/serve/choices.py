"""One choice's tokens as the API reports them: text deltas (whole characters, stop strings cut), each token's text,
offset and log-probabilities, and OpenAI's `logprobs` object built from them."""

from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from gpt2lab.generate import TokenEvent, prompt_logprobs
from gpt2lab.text import first_stop, held_back  # the one text assembler, shared with generate.stream_text


@dataclass(frozen=True)
class TokenInfo:
    """One token as the API reports it: its text, where it starts in the choice's text, its log-probability and the
    top alternatives (text -> logprob). The first token of an echoed prompt has no log-probability (None)."""

    text: str
    offset: int
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one choice adds at one step: new text, the tokens that start in it, and the finish reason on its last."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()
    finish_reason: str | None = None


def token_text(tokenizer: Any, token: int) -> str:
    """A token's own text; a token that is only part of a UTF-8 character is shown as OpenAI does,
    `bytes:\\xe2\\x80`."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_start(decoder: codecs.IncrementalDecoder, raw: bytes) -> int:
    """How many characters the `decoder` will emit for earlier tokens' bytes before the text of the token `raw`.

    A token that completes a character started by the tokens before it starts at that character (0). But when the
    decoder holds the start of a character that `raw` does not continue, those bytes become U+FFFD first (1), and
    the token's own text starts after it.
    """
    held, _ = decoder.getstate()
    if not held or not raw:
        return 0
    strict = codecs.getincrementaldecoder("utf-8")()
    strict.setstate((held, 0))
    try:
        strict.decode(raw[:1])
    except UnicodeDecodeError:
        return 1  # the decoder only ever holds a valid incomplete prefix: it becomes one U+FFFD
    return 0


def score_prompt(model: torch.nn.Module, tokenizer: Any, ids: Sequence[int], top_logprobs: int,
                 token_names: Callable[[int], str] | None = None) -> tuple[TokenInfo, ...]:
    """The prompt's tokens with their log-probabilities (`generate.prompt_logprobs`), for `echo` with `logprobs`.

    Offsets index the prompt's decoded text, counted as `ChoiceText` counts a completion's: a token that ends inside a
    UTF-8 character adds no text until the token that completes it.
    """
    name = token_names or (lambda t: token_text(tokenizer, t))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    infos, offset = [], 0
    for token, event in zip(ids, prompt_logprobs(model, ids, top_logprobs)):
        raw = tokenizer.decode_bytes([token])
        top = tuple((name(t), float(lp)) for t, lp in event.top_logprobs) if event is not None else ()
        start = offset + token_start(decoder, raw)
        infos.append(TokenInfo(name(token), start, float(event.logprob) if event is not None else None, top))
        offset += len(decoder.decode(raw))
    return tuple(infos)


class ChoiceText:
    """Turns one choice's token events into text deltas, with the text assembler of `generate.stream_text`.

    Text is decoded incrementally from the tokens' bytes, so a character split across two tokens appears whole with
    the second; text that might begin a stop string is held back until it can be told apart (`held_back`); a stop
    string ends the choice and is cut from the text, as in OpenAI's API. The end-of-text token ends the choice
    without text, but is reported like any token (its log-probability, and it counts in `num_tokens`), as OpenAI's
    API reports the token it sampled.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 token_names: Callable[[int], str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max(map(len, self._stop), default=0)
        self._name = token_names or (lambda t: token_text(tokenizer, t))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[TokenInfo] = []
        self.text = ""  # decoded so far; text[:released] has been sent
        self.released = 0
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def add(self, event: TokenEvent, eos_token_id: int | None) -> Delta | None:
        """Take one token event; return the text that can be sent now (None if nothing yet)."""
        if self.finish_reason is not None:
            return None
        if event.token == eos_token_id and event.finish_reason == "stop":
            self.text += self._decoder.decode(b"", final=True)  # a dangling partial character belongs before it
            self._record(event, len(self.text))
            return self.finish("stop")
        raw = self._tokenizer.decode_bytes([event.token])
        self._record(event, len(self.text) + token_start(self._decoder, raw))
        self.text += self._decoder.decode(raw)
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop", flush=False)
        if event.finish_reason is not None:
            return self.finish(event.finish_reason)
        return self._release(len(self.text) - held_back(self.text, self._stop))

    def finish(self, reason: str, flush: bool = True) -> Delta:
        """End the choice: send all text still held back (a dangling partial character becomes U+FFFD) with its
        tokens, and a token that adds no text at the very end (end-of-text). Tokens of a cut stop string are not
        reported."""
        if flush:
            self.text += self._decoder.decode(b"", final=True)
        self.finish_reason = reason
        delta = self._release(len(self.text), include_end=flush)
        self._pending = []
        return Delta(delta.text if delta else "", delta.tokens if delta else (), reason)

    def _record(self, event: TokenEvent, offset: int) -> None:
        self.num_tokens += 1
        top = tuple((self._name(t), float(lp)) for t, lp in event.top_logprobs)
        self._pending.append(TokenInfo(self._name(event.token), offset, float(event.logprob), top))

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts, searching only text that could hold one not yet seen."""
        if not self._stop:
            return None
        start = max(0, self.released - self._longest_stop + 1)
        cut = first_stop(self.text[start:], self._stop)
        return None if cut is None else start + cut

    def _release(self, upto: int, include_end: bool = False) -> Delta | None:
        """Send text[released:upto] with the tokens that start in it (and those that start at its end, if
        `include_end`)."""
        if upto <= self.released and not (include_end and self._pending):
            return None
        tokens = tuple(t for t in self._pending if t.offset < upto or (include_end and t.offset == upto))
        self._pending = self._pending[len(tokens):]
        text, self.released = self.text[self.released:upto], max(self.released, upto)
        return Delta(text, tokens)


def logprobs_object(tokens: Iterable[TokenInfo], base_offset: int, include_sampled: bool = True,
                    prompt: Sequence[TokenInfo] = ()) -> dict[str, Any]:
    """OpenAI's legacy logprobs: parallel lists of token texts, their logprobs, the top alternatives (plus the
    sampled token, so there may be k + 1) and each token's character offset in the choice's text.

    With `echo`, the `prompt` tokens come first (offsets from 0; the very first has null logprob and alternatives, as
    in OpenAI's API), then the completion's `tokens`, whose offsets start at `base_offset` (the echoed text's length).
    """
    tokens = [*prompt, *(dataclasses.replace(t, offset=base_offset + t.offset) for t in tokens)]
    top: list[dict[str, float] | None] = []
    for t in tokens:
        if t.logprob is None:
            top.append(None)
            continue
        alternatives = dict(t.top)
        if include_sampled:
            alternatives.setdefault(t.text, t.logprob)
        top.append(alternatives)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
            "text_offset": [t.offset for t in tokens]}
