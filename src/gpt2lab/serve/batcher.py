"""The decode thread: rows (one per completion choice) queued by the app are decoded together in batches with
`generate.decode_steps`, and each row's tokens become text deltas on that thread (`ChoiceText`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from gpt2lab.generate import TokenEvent, decode_steps
from gpt2lab.sampling import SamplingParams
from gpt2lab.serve.choices import ChoiceText, Delta
from gpt2lab.serve.errors import APIError

log = logging.getLogger("gpt2lab.serve")


@dataclass(eq=False)
class Row:
    """One choice on its way through the decode thread. `deliver` is called from that thread with each Delta, then
    None when the row is done (or an APIError if decoding failed); `cancelled` is set by the HTTP side. `tokens`
    holds the ids generated so far, so a row can be resumed alone if its batch fails."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None
    top_logprobs: int
    text: ChoiceText
    deliver: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    failed: bool = False
    logprobs: bool = True  # whether the request asked for log-probabilities (a batch computes them if any row did)

    @property
    def done(self) -> bool:
        return self.failed or self.cancelled.is_set() or self.text.finish_reason is not None


class BatchWorker:
    """One thread that decodes queued rows in batches with `generate.decode_steps`.

    A batch is formed from the rows waiting when the previous one ends (after `batch_wait_ms` of waiting if the
    queue held fewer than `max_batch_size`). Left padding makes a batch as long as its longest prompt plus its
    longest completion, so a row joins only if that still fits the context; otherwise it waits, first in line, for
    the next batch. A batch runs until all its rows are done: rows that arrive meanwhile wait for the next one.

    A failure stays in its row: an error while turning one row's tokens into text ends that row alone, and an error
    inside the batched decode re-runs each unfinished row alone from the tokens it already has, so only a row that
    fails by itself gets the error (a 500 for its request) and the others finish their text.
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int | None, max_batch_size: int, batch_wait_ms: float,
                 max_pending: int, vocab_limit: int | None = None) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.vocab_limit = vocab_limit  # ids the tokenizer can decode (a padded model's others are never chosen)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_pending = max_pending
        self.n_ctx = model.config.n_ctx
        self._queue: deque[Row] = deque()
        self._active = 0
        self._arriving = 0  # requests being read and parsed: their rows are about to be submitted
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # statistics, read by tests and /health
        self.rows_run = 0
        self.tokens_decoded = 0
        self.largest_batch = 0

    def submit(self, rows: Sequence[Row]) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._queue) + self._active + len(rows) > self.max_pending:
                busy = len(self._queue) + self._active
                raise APIError(503, f"the server is busy ({busy} completions queued or running, limit "
                                    f"{self.max_pending}); retry shortly", code="overloaded")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gpt2lab-decode", daemon=True)
                self._thread.start()
            self._queue.extend(rows)
            self._cond.notify()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read, parsed, tokenized) while the block runs: a batch about to start
        waits for it (up to 10 × batch_wait_ms), so requests sent together are decoded together even when parsing
        them takes longer than the batch window."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for row in self._queue:
                row.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._decode(batch)

    def _next_batch(self) -> list[Row] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            start = time.monotonic()
            while len(self._queue) < self.max_batch_size and not self._closed:
                waited = time.monotonic() - start
                limit = 10 * self.batch_wait if self._arriving else self.batch_wait
                if waited >= limit:
                    break
                self._cond.wait(limit - waited)
            if self._closed:
                return None
            batch, waiting, longest_prompt, longest_new = [], deque(), 0, 0
            for row in self._queue:
                if row.cancelled.is_set():
                    row.deliver(None)
                    continue
                prompt, new = max(longest_prompt, len(row.prompt)), max(longest_new, row.max_new_tokens)
                if len(batch) < self.max_batch_size and (not batch or prompt + new <= self.n_ctx):
                    batch.append(row)
                    longest_prompt, longest_new = prompt, new
                else:
                    waiting.append(row)
            self._queue = waiting
            self._active = len(batch)
            return batch

    def _decode(self, batch: list[Row]) -> None:
        self.batches_run += 1
        self.rows_run += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            try:
                self._run(batch)
            except Exception as e:  # one row may be the cause: each unfinished row continues alone
                if len(batch) == 1:
                    self._fail(batch[0], e)
                for row in batch:
                    if not row.done:
                        try:
                            self._run([row])
                        except Exception as e:
                            self._fail(row, e)
            for row in batch:
                if not row.failed:
                    row.deliver(None)
        finally:
            with self._cond:
                self._active = 0

    def _run(self, rows: list[Row]) -> None:
        """Decode `rows` together, each continuing after the tokens it already has, until all are done."""
        with torch.inference_mode():
            steps = decode_steps(self.model, [list(r.prompt) + r.tokens for r in rows],
                                 [r.max_new_tokens - len(r.tokens) for r in rows], [r.sampling for r in rows],
                                 eos_token_id=self.eos_token_id, generators=[r.generator for r in rows],
                                 top_logprobs=max(r.top_logprobs for r in rows), should_stop=lambda i: rows[i].done,
                                 logprobs=any(r.logprobs for r in rows), vocab_limit=self.vocab_limit)
            for events in steps:
                for row, event in zip(rows, events):
                    if event is not None and not row.done:
                        self._accept(row, event)
        for row in rows:
            if not row.done:  # decode_steps ended it silently (no tokens left to generate)
                self._deliver(row, lambda r: r.text.finish("length"))

    def _accept(self, row: Row, event: TokenEvent) -> None:
        self.tokens_decoded += 1
        row.tokens.append(event.token)
        if row.top_logprobs < len(event.top_logprobs):
            event = dataclasses.replace(event, top_logprobs=list(event.top_logprobs[:row.top_logprobs]))
        self._deliver(row, lambda r: r.text.add(event, self.eos_token_id))

    def _deliver(self, row: Row, make_delta: Callable[[Row], Delta | None]) -> None:
        """Send the row's next delta; an error while making or sending it ends this row only."""
        try:
            delta = make_delta(row)
            if delta is not None:
                row.deliver(delta)
        except Exception as e:
            self._fail(row, e)

    def _fail(self, row: Row, error: Exception) -> None:
        row.failed = True
        log.error("a completion failed: %s: %s", type(error).__name__, error)
        try:
            row.deliver(APIError(500, f"generation failed: {type(error).__name__}: {error}",
                                 code="generation_failed"))
        except Exception:  # the row's own delivery is what failed: nobody can be told
            pass

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._active == 0
