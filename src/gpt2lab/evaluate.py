"""Loss, perplexity and bits per byte of a language model on a text.

A model with a context of n_ctx tokens cannot read a long text at once. Cutting the text into disjoint n_ctx chunks
starves the first tokens of every chunk of context (the first one gets none), which inflates the loss. The sliding
window of Hugging Face's perplexity guide trades compute for context: windows of n_ctx tokens start every `stride`
tokens, and each window scores only the tokens that the previous window did not:

    text:     t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          n_ctx = 6, stride = 3
    window 1: [t0 .. t5]         scores t1..t5        (t0 has no context and is never scored)
    window 2:    [t3 .. t8]      scores t6..t8        (each with at least n_ctx - stride tokens of context)
    window 3:       [t6 .. t9]   scores t9

Every token after the first is scored exactly once; stride = n_ctx is the disjoint-chunk evaluation, where the first
token of each chunk is skipped. The loss is the mean negative log-likelihood in nats per scored token; the perplexity
is exp(loss). The guide weights each window's mean loss by (scored tokens - 1), which undercounts by one token per
window when stride < n_ctx; we sum the per-token losses exactly (the two agree when stride = n_ctx).

Bits per byte divides the same total by ln 2 and by the UTF-8 bytes of the scored tokens: unlike perplexity it does
not depend on the tokenizer, so models with different vocabularies (or a byte-level model) compare directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from gpt2lab import checks
from gpt2lab.config import EVAL_BATCH_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; tokens [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean negative log-likelihood, nats per scored token
    perplexity: float  # exp(loss)
    bits_per_byte: Optional[float]  # total NLL / ln 2 / UTF-8 bytes of the scored tokens (None without a tokenizer)
    tokens: int  # scored tokens
    bytes: Optional[int]  # UTF-8 bytes of the scored tokens
    windows: int
    stride: int
    context: int

    def summary(self) -> str:
        bpb = f"{self.bits_per_byte:.4f}" if self.bits_per_byte is not None else "n/a"
        return (f"loss {self.loss:.4f} nats/token | perplexity {self.perplexity:.3f} | bits/byte {bpb} | "
                f"{self.tokens:,} tokens scored in {self.windows:,} windows (context {self.context}, stride {self.stride})")


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of the sliding-window evaluation of a text of `n_tokens` tokens.

    >>> [(w.begin, w.end, w.first_target) for w in sliding_windows(10, 6, 3)]
    [(0, 6, 1), (3, 9, 6), (6, 10, 9)]
    """
    checks.integer("context", context, 2)
    checks.integer("stride", stride, 1, context, note=f"context={context}")
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(previous_end, begin + 1)
        if end > first:
            windows.append(Window(begin, end, first))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length and equal scored span, at most `batch_size` at a time."""
    batch: list[Window] = []
    for w in windows:
        same = batch and (w.end - w.begin, w.end - w.first_target) == (batch[0].end - batch[0].begin,
                                                                       batch[0].end - batch[0].first_target)
        if batch and (not same or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def resolve_window(n_ctx: int, stride: int | None, context: int | None) -> tuple[int, int]:
    """The (stride, context) to evaluate with: None means the default (context n_ctx, stride context / 2); a given
    value is checked, never replaced.

    >>> resolve_window(1024, None, None)
    (512, 1024)
    """
    if context is None:
        context = n_ctx
    else:
        checks.integer("context", context, 2, n_ctx, note=f"n_ctx={n_ctx}, the model's context")
    if stride is None:
        stride = max(1, context // 2)
    else:
        checks.integer("stride", stride, 1, context, note=f"context={context}")
    return stride, context


def token_nll(model: "GPT", ids: torch.Tensor, stride: int | None = None, context: int | None = None,
              batch_size: int = EVAL_BATCH_SIZE, progress: bool = False) -> torch.Tensor:
    """Negative log-likelihood (nats) of every scored token of `ids` (N,) under the sliding window: (N - 1,) float64,
    entry i for token i + 1 (NaN for a token no window scores, which happens only when stride = context).

    Only the scored positions go through the LM head (`logits_to_keep`), the largest matmul of a small model.
    `progress` shows a bar of windows on stderr when it is a terminal.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    stride, context = resolve_window(model.config.n_ctx, stride, context)
    checks.integer("batch_size", batch_size, 1)
    device = model.ln_f.weight.device
    ids = ids.to(device=device, dtype=torch.long)
    nll = torch.full((max(ids.numel() - 1, 0),), float("nan"), dtype=torch.float64)
    windows = sliding_windows(ids.numel(), context, stride)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _progress_bar(len(windows), progress) as bar:
            for batch in _batches(windows, batch_size):
                first = batch[0]
                keep = first.end - first.first_target + 1  # logits of the positions before each scored token
                x = torch.stack([ids[w.begin:w.end] for w in batch])  # (B, W)
                logits = model(x, logits_to_keep=keep)[:, :-1].float()  # (B, scored, V)
                targets = torch.stack([ids[w.first_target:w.end] for w in batch])  # (B, scored)
                losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
                for row, w in enumerate(batch):
                    nll[w.first_target - 1:w.end - 1] = losses[row].double().cpu()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return nll


def _progress_bar(windows: int, enabled: bool) -> Any:
    """A tqdm bar of windows on stderr; tqdm itself hides it when stderr is not a terminal (disable=None)."""
    from tqdm import tqdm

    return tqdm(total=windows, desc="eval", unit="window", disable=None if enabled else True)


def summarize(nll: torch.Tensor, n_bytes: Optional[int], stride: int, context: int, windows: int) -> EvalResult:
    scored = nll[~torch.isnan(nll)]
    if scored.numel() == 0:
        raise ValueError("nothing to score: the text needs at least 2 tokens")
    total = float(scored.sum())
    loss = total / scored.numel()
    bpb = total / math.log(2) / n_bytes if n_bytes else None
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=bpb, tokens=scored.numel(), bytes=n_bytes,
                      windows=windows, stride=stride, context=context)


def token_byte_lengths(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of every token id: (V,) long. Ids the tokenizer does not know count 0 bytes."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        try:
            lengths[i] = len(tokenizer.decode_bytes([i]))
        except (ValueError, KeyError):
            pass
    return lengths


def evaluate_ids(model: "GPT", ids: torch.Tensor, stride: int | None = None, context: int | None = None,
                 byte_lengths: torch.Tensor | None = None, batch_size: int = EVAL_BATCH_SIZE,
                 progress: bool = False) -> EvalResult:
    """Loss, perplexity and (given each token's byte length) bits per byte of token ids `ids` (N,)."""
    stride, context = resolve_window(model.config.n_ctx, stride, context)
    nll = token_nll(model, ids, stride, context, batch_size, progress)
    n_bytes = None
    if byte_lengths is not None:
        scored = ~torch.isnan(nll)
        n_bytes = int(byte_lengths[ids[1:].cpu()][scored].sum())
    return summarize(nll, n_bytes, stride, context, len(sliding_windows(ids.numel(), context, stride)))


def evaluate_text(model: "GPT", tokenizer: Any, text: str, stride: int | None = None, context: int | None = None,
                  batch_size: int = EVAL_BATCH_SIZE, progress: bool = False) -> EvalResult:
    """Tokenize `text` (special-token strings are plain text) and evaluate it; see `evaluate_ids`."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); at least 2 are needed to score anything")
    lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    return evaluate_ids(model, ids, stride, context, lengths, batch_size, progress)
