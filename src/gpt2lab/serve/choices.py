"""One choice's tokens as the API reports them: text deltas (whole characters, stop strings cut), each token's text,
offset and log-probabilities, and OpenAI's `logprobs` object built from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from gpt2lab.generate import TokenEvent, prompt_logprobs
from gpt2lab.text import TextAssembler  # the one text assembler, shared with generate.stream_text


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


def score_prompt(model: torch.nn.Module, tokenizer: Any, ids: Sequence[int], top_logprobs: int,
                 token_names: Callable[[int], str] | None = None) -> tuple[TokenInfo, ...]:
    """The prompt's tokens with their log-probabilities (`generate.prompt_logprobs`), for `echo` with `logprobs`.

    Offsets index the prompt's decoded text, counted by the same `TextAssembler` as a completion's: a token that ends
    inside a UTF-8 character adds no text until the token that completes it.
    """
    name = token_names or (lambda t: token_text(tokenizer, t))
    text = TextAssembler()
    infos = []
    for token, event in zip(ids, prompt_logprobs(model, ids, top_logprobs)):
        text.feed(tokenizer.decode_bytes([token]))
        top = tuple((name(t), float(lp)) for t, lp in event.top_logprobs) if event is not None else ()
        infos.append(TokenInfo(name(token), text.chunk_start, float(event.logprob) if event is not None else None, top))
    return tuple(infos)


class ChoiceText:
    """Turns one choice's token events into text deltas, with the text assembler of `generate.stream_text`
    (`text.TextAssembler`).

    Text is decoded incrementally from the tokens' bytes, so a character split across two tokens appears whole with
    the second; text that might begin a stop string is held back until it can be told apart; a stop string ends the
    choice and is cut from the text, as in OpenAI's API. Each token is sent with the delta its text starts in. The
    end-of-text token ends the choice without text, but is reported like any token (its log-probability, and it
    counts in `num_tokens`), as OpenAI's API reports the token it sampled.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 token_names: Callable[[int], str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._name = token_names or (lambda t: token_text(tokenizer, t))
        self._assembler = TextAssembler(stop)
        self._pending: list[TokenInfo] = []  # tokens whose text has not been sent yet
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The choice's text so far (cut before a stop string); `text[:released]` has been sent."""
        return self._assembler.text

    @property
    def released(self) -> int:
        """How many characters of `text` have been sent."""
        return self._assembler.released

    def add(self, event: TokenEvent, eos_token_id: int | None) -> Delta | None:
        """Take one token event; return the text that can be sent now (None if nothing yet)."""
        if self.finish_reason is not None:
            return None
        if event.token == eos_token_id and event.finish_reason == "stop":
            return self._end("stop", end_token=event)
        text = self._assembler.feed(self._tokenizer.decode_bytes([event.token]))
        self._record(event, self._assembler.chunk_start)
        if self._assembler.stopped:
            return self._end("stop", text)
        if event.finish_reason is not None:
            return self._end(event.finish_reason, text)
        return self._send(text) if text else None

    def finish(self, reason: str) -> Delta:
        """End the choice: send all text still held back (a dangling partial character becomes U+FFFD) with its
        tokens."""
        return self._end(reason)

    def _record(self, event: TokenEvent, offset: int) -> None:
        self.num_tokens += 1
        top = tuple((self._name(t), float(lp)) for t, lp in event.top_logprobs)
        self._pending.append(TokenInfo(self._name(event.token), offset, float(event.logprob), top))

    def _send(self, text: str, include_end: bool = False) -> Delta:
        """`text`, just released, with the tokens that start in it (and those that start at its end, if
        `include_end`)."""
        released = self._assembler.released
        tokens = tuple(t for t in self._pending if t.offset < released or (include_end and t.offset == released))
        self._pending = self._pending[len(tokens):]
        return Delta(text, tokens)

    def _end(self, reason: str, text: str = "", end_token: TokenEvent | None = None) -> Delta:
        """The last delta: `text` (released by the last token) and all that is still held back, with their tokens,
        then `end_token` (end-of-text), which adds no text. The tokens of a stop string that was cut are not
        reported, and the reason is "stop" (even when the last flush, a dangling byte as U+FFFD, completed it)."""
        text += self._assembler.finish()  # nothing after a stop string
        if end_token is not None:
            self._record(end_token, len(self._assembler.text))
        self.finish_reason = "stop" if self._assembler.stopped else reason
        delta = self._send(text, include_end=not self._assembler.stopped)
        self._pending = []
        return Delta(delta.text, delta.tokens, self.finish_reason)


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
