"""Generation: a preallocated KV cache, sampling controls, batched decoding and text streaming.

Autoregressive decoding runs the model once over the prompt (the *prefill*), then once per new token (a *decode
step*). Each step only needs the new token's query, but attention needs every earlier key and value; recomputing them
would make a step cost as much as the whole prefix. The KV cache keeps them instead:

    prefill:  tokens (B, T) ─► model ─► logits of the last position (B, V); cache holds K, V for T positions
    step:     token  (B, 1) ─► model ─► logits (B, V);                      cache grows by one position

The pieces, from the bottom up:

- `KVCache`: one (L, B, H, S_max, D) buffer each for keys and values, allocated once; a step writes one column.
- `SamplingParams` and the pure filters `apply_repetition_penalty`, `apply_temperature`, `apply_top_k`, `apply_top_p`,
  `process_logits`: how temperature, top-k, top-p and the repetition penalty reshape the next-token distribution;
  `choose_tokens` then draws from it by inverse-CDF sampling (`sample_inverse_cdf`), one uniform number per row.
- `Decoder`: the state of one batched decode (token buffer, padding mask, positions, cache, the sliding window);
  its steps run through `gpt2lab.decode_step.DecodeStep`, the same step written flat, wherever that is exact.
- `generate`: tensor in, tensor out, as `transformers`' `generate` (the model's `.generate` calls it).
- `decode_steps`: one event per row per step, for servers: log-probabilities, stop reasons, per-row settings.
- `prompt_logprobs`: the same events for the prompt's own tokens (OpenAI's `echo` with `logprobs`).
- `stream_text`: text pieces that never split a UTF-8 character, with stop strings.

Left padding: prompts of different lengths are padded on the left so that every row's next token sits in the same
column. Padding positions are masked out of attention, and each row's position ids count only its real tokens
(`cumsum(mask) - 1`, padding at 0), exactly as `transformers` does, so a padded row computes what it would alone.

Past the context: GPT-2's positions are absolute (a learned table of n_ctx rows), so cached keys cannot be shifted.
When a sequence would exceed n_ctx tokens, the window slides: its oldest tokens are dropped, the newest `keep`
tokens (3/4 of n_ctx by default) are re-encoded from position 0 in one prefill, and decoding continues with the cache.
Each token therefore sees between `keep` and n_ctx tokens of context, and the re-encoding costs one prefill per
n_ctx - keep new tokens instead of one full forward per token. In a padded batch each row slides when its own real
tokens overflow, so a row generates what it would alone.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from gpt2lab.decode_step import DecodeStep

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT


# ------------------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer for the positions seen so far, in buffers allocated once.

    `k` and `v` are (L, B, H, S_max, D). After `length` positions are cached, `update(layer, k_new, v_new)` with
    k_new (B, H, T, D) writes columns [length, length + T) of that layer and returns views of columns [0, length + T):
    no concatenation, no reallocation, per step. The model calls `advance(T)` once after its last layer, so every
    layer of one forward writes the same columns.

    Rows can be dropped (`keep_rows`) when their sequences finish, so a batch only computes what is still running:
    the active rows are always the first `batch_size` rows of the buffers.

    >>> cache = KVCache(n_layer=2, batch_size=1, n_head=2, max_length=8, head_dim=4)
    >>> k_all, v_all = cache.update(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    >>> tuple(k_all.shape)
    (1, 2, 3, 4)
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layer, batch_size, n_head, max_length, head_dim)  # (L, B, H, S_max, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_length: int | None = None) -> "KVCache":
        """A cache shaped for `model`, in its activation dtype, holding up to `max_length` (default n_ctx)."""
        cfg = model.config
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_length or cfg.n_ctx, cfg.head_dim,
                   dtype=activation_dtype(model), device=model.ln_f.weight.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        start, end = self.length, self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {start} cached + {T} new positions exceed max_length={self.max_length}")
        if B != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} active rows, got keys for {B}")
        self.k[layer, :B, :, start:end].copy_(k)
        self.v[layer, :B, :, start:end].copy_(v)
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]  # (B, H, S, D) views

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the active rows `rows` (indices into the current active rows), moved to the front."""
        n = rows.numel()
        end = self.length
        self.k[:, :n, :, :end] = self.k[:, rows, :, :end]  # the gather copies first, so overlap is safe
        self.v[:, :n, :, :end] = self.v[:, rows, :, :end]
        self.batch_size = n


def activation_dtype(model: "GPT") -> torch.dtype:
    """The dtype of the residual stream (and so of keys, values and logits): that of the final LayerNorm."""
    return model.ln_f.weight.dtype


# ------------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the model's logits.

    - `temperature`: divides the logits. 1 samples the model's distribution; below 1 sharpens it towards the most
      likely tokens, above 1 flattens it; 0 means greedy (always the most likely token).
    - `top_k`: sample only among the k most likely tokens (None: no limit).
    - `top_p`: nucleus sampling: the smallest set of most likely tokens whose probabilities sum to at least p
      (None or 1: no limit). Adapts to the distribution: few candidates when the model is sure, many when it is not.
    - `repetition_penalty`: CTRL's penalty (Keskar et al. 2019): the logit of every token already in the sequence
      (prompt included) is divided by the penalty if positive and multiplied if negative; > 1 discourages repeats.
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be a positive integer or None (no limit), got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None (no limit), got {p!r}")
        r = self.repetition_penalty
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = none) or None, got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) float, seen (B, V) bool: divide positive logits of seen tokens by `penalty`, multiply negative
    ones (so a penalty > 1 always lowers them). Returns a new tensor."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th survive). (B, V) -> (B, V)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


_TOP_P_CANDIDATES = (256, 4096)  # candidate-set sizes tried before sorting a whole row


def _mass_before(ranked: torch.Tensor, peak: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """ranked (R, k): the k largest logits of each row, descending; peak, norm (R, 1): the row's max and softmax
    denominator. Returns (R, k): for each, the probability mass of the tokens ranked before it."""
    probs = torch.exp(ranked - peak) / norm
    return probs.cumsum(dim=-1) - probs


def _top_p_by_sorting(logits: torch.Tensor, p: float, peak: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The nucleus filter by sorting every logit of every row. (R, V) -> (R, V)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (R, V)
    drop_sorted = _mass_before(sorted_logits, peak, norm) >= p
    drop_sorted[:, 0] = False  # the top token survives even when p is below float32's smallest number
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p; the rest -> -inf.

    A token survives if the mass of the tokens strictly more likely than it is below p, and the top token always
    survives, even for a p so small that it rounds to 0 in float32. (B, V) -> (B, V).

    Why not just sort: sorting GPT-2's 50,257 logits costs as much as a decode step, yet a nucleus rarely holds more
    than a few hundred tokens. So only the k largest logits are ranked (`torch.topk`, k = 256, then 4096): a row is
    settled once one of them is dropped (every token after it has at least as much mass before it) and then keeps
    exactly the logits >= its last kept one. Rows still open after the largest k, and rows whose last kept logit
    ties with a dropped one (which of the tied tokens survives is then up to the sort's order), are sorted whole,
    so the result is the sorting filter's. The softmax denominator is `torch.sum`'s (pairwise, relative error
    ~1e-7), not the one inside `softmax`, whose plain running sum over a sorted row is off by up to ~1e-5.
    """
    if p >= 1.0:
        return logits
    vocab = logits.size(-1)
    peak = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    norm = torch.exp(logits - peak).sum(dim=-1, keepdim=True)  # (B, 1): the softmax denominator
    out, open_rows, rows = None, None, logits  # rows: the logits of the rows not settled yet
    for k in _TOP_P_CANDIDATES:
        if k >= vocab:
            break
        top = torch.topk(rows, k, dim=-1).values  # (R, k), descending
        n_kept = (_mass_before(top, peak, norm) < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # (R, 1)
        keep = rows >= top.gather(-1, n_kept - 1)  # (R, V)
        settled = ((n_kept < k) & (keep.sum(dim=-1, keepdim=True) == n_kept)).squeeze(1)  # (R,)
        if out is None and bool(settled.all()):
            return logits.masked_fill(~keep, float("-inf"))  # the usual case: no copies
        if out is None:
            out, open_rows = logits.clone(), torch.arange(logits.size(0), device=logits.device)
        out[open_rows[settled]] = rows[settled].masked_fill(~keep[settled], float("-inf"))
        open_rows, rows, peak, norm = open_rows[~settled], rows[~settled], peak[~settled], norm[~settled]
        if open_rows.numel() == 0:
            return out
    if out is None:
        return _top_p_by_sorting(rows, p, peak, norm)
    out[open_rows] = _top_p_by_sorting(rows, p, peak, norm)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by `temperature` > 0. (B, V) -> (B, V).

    A tiny temperature can push finite logits past float32's range, and inf - inf in the softmax is NaN. Then each
    row's maximum is subtracted first (softmax does not change): the top logit becomes 0 and the rest fall towards
    -inf, which is the greedy limit that a temperature near 0 stands for.
    """
    scaled = logits / temperature
    if temperature < 1.0 and bool(torch.isinf(scaled).any()):
        shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
        scaled = torch.where(shifted == 0, 0.0, shifted / temperature)  # 0 / 0 would be NaN when t rounds to 0
    return scaled


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The sampling pipeline in `transformers`' order: repetition penalty, temperature, top-k, top-p.

    logits (B, V) float32; seen (B, V) bool marks tokens already in each sequence (needed for the penalty).
    Greedy params stop after the penalty: temperature and the filters cannot change the argmax.
    """
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    return logits


Generators = Optional[torch.Generator] | Sequence[Optional[torch.Generator]]


def draw_uniforms(n: int, generator: Generators, device: torch.device | str | None = None) -> torch.Tensor:
    """n uniform numbers in [0, 1), float64, one per row: (n,).

    `generator` is one generator for all rows (None: torch's default), or one per row. A row with its own generator
    takes exactly one number from it per call, so its draws do not depend on which other rows share the batch.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand(n, dtype=torch.float64, generator=generator, device=gen_device).to(device)
    generators = list(generator)
    if len(generators) != n:
        raise ValueError(f"got {len(generators)} generators for {n} rows; give one per row, or a single one")
    if all(g is generators[0] for g in generators):
        return draw_uniforms(n, generators[0], device)
    return torch.cat([draw_uniforms(1, g, device) for g in generators])


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of `probs` (B, V), non-negative and not necessarily normalised, using `uniforms` (B,)
    in [0, 1): the first index whose cumulative probability exceeds u × (row total). (B,) long.

    This is exact in distribution: index i is chosen when u lands in [cdf[i-1], cdf[i]), an interval as wide as its
    probability, so zero-probability tokens are never chosen. The cumulative sum runs in float64 and the target is
    scaled by its own last value, so float rounding in the probabilities cannot push the target past the end (the
    index is clamped all the same). It costs a cumulative sum and a binary search per row; `torch.multinomial` over
    GPT-2's 50,257 tokens costs 7 (batch 1) to 15 (batch 16) times as much on CPU (benchmarks/sampling.py).

    >>> probs = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])
    >>> sample_inverse_cdf(probs, torch.tensor([0.25, 0.75], dtype=torch.float64))
    tensor([0, 2])
    """
    cdf = probs.to(torch.float64).cumsum_(dim=-1)  # (B, V); cumsum(dtype=float64) takes a slow path at B > 1 on CPU
    total = cdf[:, -1]  # (B,)
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # NaN logits, or every token filtered out
        bad = int((~((total > 0) & torch.isfinite(total))).nonzero()[0])
        raise ValueError(f"row {bad} has no token to sample: its probabilities sum to {float(total[bad])!r}")
    target = uniforms.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True)  # (B, 1): first i with cdf[i] > target
    return index.squeeze(1).clamp_(max=probs.size(-1) - 1)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                  generator: Generators = None) -> torch.Tensor:
    """Pick one token per row: argmax if greedy, else a draw from softmax(processed logits). (B, V) -> (B,) long.

    `generator` is one generator for the batch or one per row (see `draw_uniforms`); greedy rows draw nothing.
    """
    scores = process_logits(logits, params, seen)
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)  # (B, V)
    return sample_inverse_cdf(probs, draw_uniforms(probs.size(0), generator, probs.device))


# ------------------------------------------------------------------------------------------------------- decoding
class Decoder:
    """The state of one batched, left-padded decode: feed it tokens, get next-token logits.

    - `prefill()` encodes the prompts and returns the last position's logits, (B, V) float32.
    - `step(tokens)` appends one token per active row (B,) and returns the next logits (B, V).
    - `retire(keep)` drops finished rows; `rows` maps active rows to the original batch rows.

    It owns a token buffer (B, T + max_new_tokens) and its padding mask, the next position id of each row, and the
    KV cache; only the model's own outputs are allocated per step. See the module docstring for the sliding window.
    """

    def __init__(self, model: "GPT", idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 0, keep: int | None = None) -> None:
        n_ctx = model.config.n_ctx
        B, T = idx.shape
        if T > n_ctx:
            raise ValueError(f"prompt of {T} tokens is longer than the model's context n_ctx={n_ctx}")
        self.model = model
        self.n_ctx = n_ctx
        self.keep = keep if keep is not None else max(1, (3 * n_ctx) // 4)
        if not 1 <= self.keep <= n_ctx:
            raise ValueError(f"keep must be in [1, n_ctx={n_ctx}], got {keep}")
        device = model.ln_f.weight.device
        capacity = T + max(max_new_tokens, 0)
        self.tokens = torch.zeros(B, capacity, dtype=torch.long, device=device)  # (B, capacity)
        self.tokens[:, :T] = idx
        self.mask = torch.ones(B, capacity, dtype=torch.long, device=device)  # (B, capacity)
        if attention_mask is not None:
            self.mask[:, :T] = attention_mask
        self.length = T  # columns filled
        self.start = 0  # first column inside the window (the cache's position 0)
        self.rows = torch.arange(B, device=device)
        self.cache = KVCache.for_model(model, B, max_length=min(n_ctx, capacity))
        self.padded = False
        self.next_pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1) position of the next token
        self.fast_step = DecodeStep(model) if DecodeStep.applies(model) else None  # the flat step, where exact

    @property
    def batch_size(self) -> int:
        return self.rows.numel()

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Encode the window [start, length) from an empty cache; returns (B, V) logits of its last position."""
        self.cache.reset()
        window = self.mask[:, self.start:self.length]  # (B, W)
        self.padded = not bool(window.all())
        if not self.padded:
            logits = self.model(self.tokens[:, self.start:self.length], kv_cache=self.cache, logits_to_keep=1)
        else:
            positions = (window.cumsum(-1) - 1).clamp_(min=0)  # (B, W): real tokens count from 0, padding at 0
            self.next_pos = window.sum(-1, keepdim=True)  # (B, 1)
            logits = self.model(self.tokens[:, self.start:self.length], position_ids=positions,
                                attention_mask=window, kv_cache=self.cache, logits_to_keep=1)
        return logits[:, -1].float()  # (B, V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B,) at the next column and return the logits for the column after it, (B, V)."""
        col = self.length
        self.tokens[:, col] = tokens
        self.length += 1
        if self.length - self.start > self.n_ctx:  # the window is full: slide it and re-encode
            return self._slide()
        if self.fast_step is not None:
            window = self.mask[:, self.start:self.length] if self.padded else None  # (B, S)
            logits = self.fast_step(tokens, self.cache, self.next_pos if self.padded else None, window)  # (B, V)
            if self.padded:
                self.next_pos += 1
            return logits.float()
        if not self.padded:
            logits = self.model(self.tokens[:, col:col + 1], kv_cache=self.cache, logits_to_keep=1)
        else:
            logits = self.model(self.tokens[:, col:col + 1], position_ids=self.next_pos,
                                attention_mask=self.mask[:, self.start:self.length], kv_cache=self.cache,
                                logits_to_keep=1)
            self.next_pos += 1
        return logits[:, -1].float()  # (B, V)

    def _slide(self) -> torch.Tensor:
        """Each row whose window now holds more than n_ctx real tokens keeps only its newest `keep`; the older ones
        are masked out. The window then starts where the longest remaining row starts, and is re-encoded.

        Rows are slid one by one, when they themselves overflow, so a padded row generates exactly what it would
        alone (its padding never counts against its context); a row that did not overflow is re-encoded unchanged.
        """
        window = self.mask[:, self.start:self.length]  # (B, W)
        real = window.sum(-1)  # (B,) real tokens in each row's window
        overflow = real > self.n_ctx
        kept = torch.where(overflow, torch.full_like(real, self.keep), real)  # (B,)
        cols = torch.arange(self.length, device=real.device)  # (length,)
        forget = overflow[:, None] & (cols[None, :] < (self.length - kept)[:, None])  # (B, length)
        self.mask[:, :self.length].masked_fill_(forget, 0)
        self.start = self.length - int(kept.max())
        return self.prefill()

    def retire(self, keep: torch.Tensor) -> None:
        """Keep only the active rows listed in `keep` (indices into the active rows, ascending)."""
        self.tokens = self.tokens[keep]
        self.mask = self.mask[keep]
        self.next_pos = self.next_pos[keep]
        self.rows = self.rows[keep]
        self.cache.keep_rows(keep)


class _EvalMode:
    """Run generation in eval mode (no dropout) without permanently changing the caller's model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _check_token(name: str, value: object, vocab_size: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}) or None, got {value!r}")
    return value


def _seen_from_prompts(idx: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, T) ids and (B, T) 1/0 mask -> (B, V) bool: True for the ids of each row's real tokens."""
    seen = torch.zeros(idx.size(0), vocab_size, dtype=torch.bool, device=idx.device)
    if mask is None:
        return seen.scatter_(1, idx, True)
    counts = torch.zeros(idx.size(0), vocab_size, dtype=torch.long, device=idx.device)
    counts.scatter_add_(1, idx, mask.long())
    return counts > 0


def generate(model: "GPT", idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + max_new_tokens), prompt first.

    `temperature=0` is greedy decoding; otherwise tokens are sampled (see `SamplingParams`), reproducibly when a
    seeded `generator` is given. A batch of prompts of different lengths is left-padded with an `attention_mask`
    (B, T) of 1 for real tokens and 0 for padding. A row that produces `eos_token_id` stops there; its remaining
    columns are filled with `eos_token_id`. The prompt is encoded once; each new token costs one cached step.

    >>> out = generate(model, torch.tensor([[50256]]), 5, temperature=0)  # doctest: +SKIP
    """
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    _check_count("max_new_tokens", max_new_tokens)
    V = model.config.vocab_size
    eos_token_id = _check_token("eos_token_id", eos_token_id, V)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (B, T) tensor of token ids with T >= 1, got {getattr(idx, 'shape', idx)!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
    B, T = idx.shape
    idx = idx.to(device=model.ln_f.weight.device, dtype=torch.long)
    out = torch.full((B, T + max_new_tokens), eos_token_id if eos_token_id is not None else 0, dtype=torch.long,
                     device=idx.device)
    out[:, :T] = idx
    if max_new_tokens == 0:
        return out
    if attention_mask is not None:
        attention_mask = attention_mask.to(idx.device).long()
    with _EvalMode(model):
        decoder = Decoder(model, idx, attention_mask, max_new_tokens)
        seen = _seen_from_prompts(idx, attention_mask, V) if params.repetition_penalty not in (None, 1.0) else None
        logits = decoder.prefill()  # (B, V)
        for i in range(max_new_tokens):
            tokens = choose_tokens(logits, params, seen, generator)  # (B_active,)
            out[decoder.rows, T + i] = tokens
            if i == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(tokens.numel(), device=tokens.device), tokens] = True
            if eos_token_id is not None:
                running = tokens != eos_token_id
                if not bool(running.all()):
                    keep = running.nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    decoder.retire(keep)
                    tokens = tokens[keep]
                    seen = seen[keep] if seen is not None else None
            logits = decoder.step(tokens)
    return out


# ------------------------------------------------------------------------------------------------- event stream
@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row: its id, its log-probability under the model (before any sampling filter),
    the `top_logprobs` most likely alternatives as (id, logprob), and why the row ended here ("stop": end-of-text,
    "length": max_new_tokens reached), or None while it continues."""

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None


def _per_row(name: str, value: Any, n: int, check: Callable[[Any], Any]) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} prompts")
    return [check(v) for v in values]


def _check_sampling(value: Any) -> SamplingParams:
    if not isinstance(value, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams (or a list of them), got {type(value).__name__}")
    return value


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ragged prompts -> (B, T) ids left-padded with 0, and a (B, T) mask (None when all lengths agree)."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, T - len(p):] = 1
    same = all(len(p) == T for p in prompts)
    return idx.to(device), (None if same else mask.to(device))


def _choose_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list, seen: torch.Tensor | None
                 ) -> torch.Tensor:
    """Tokens (B,) for rows that may each have their own sampling settings and generator.

    Rows with the same settings are filtered and sampled together; each row still draws from its own generator."""
    if all(p == params[0] for p in params):
        return choose_tokens(logits, params[0], seen, generators)
    groups: dict[SamplingParams, list[int]] = {}
    for r, p in enumerate(params):
        groups.setdefault(p, []).append(r)
    out = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    for p, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        group_seen = seen[index] if seen is not None else None
        out[index] = choose_tokens(logits[index], p, group_seen, [generators[r] for r in rows])
    return out


def decode_steps(model: "GPT", prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingParams | list[SamplingParams], eos_token_id: int | None = None,
                 generators: list[torch.Generator | None] | None = None, top_logprobs: int = 0,
                 should_stop: Callable[[int], bool] | None = None) -> Iterator[list[Optional[TokenEvent]]]:
    """Decode all prompts together (one left-padded batch, one KV cache), yielding one list per step.

    Each list has one entry per prompt: a `TokenEvent`, or None for a row that has already finished. A row's last
    event has `finish_reason` "stop" (it produced `eos_token_id`) or "length" (its `max_new_tokens` is reached).
    `max_new_tokens`, `sampling` and `generators` may be given per row. `should_stop(row)` is asked before every
    step; True ends that row without another event (e.g. its client went away). Finished rows leave the batch, so
    they cost nothing afterwards. Log-probabilities are log-softmax of the raw logits, before any sampling filter.

    The generator does its work lazily: nothing runs until the first `next()`.
    """
    n = len(prompts)
    V = model.config.vocab_size
    limits = _per_row("max_new_tokens", max_new_tokens, n, lambda v: _check_count("max_new_tokens", v))
    params = _per_row("sampling", sampling, n, _check_sampling)
    gens = _per_row("generators", generators if generators is not None else None, n, lambda g: g)
    eos_token_id = _check_token("eos_token_id", eos_token_id, V)
    _check_count("top_logprobs", top_logprobs)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; start it with at least one token (GPT-2 uses <|endoftext|>)")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]!r} outside [0, {V})")
    return _decode_events(model, prompts, limits, params, gens, eos_token_id, min(top_logprobs, V), should_stop)


def _decode_events(model: "GPT", prompts: list[list[int]], limits: list[int], params: list[SamplingParams],
                   gens: list, eos_token_id: int | None, top_logprobs: int,
                   should_stop: Callable[[int], bool] | None) -> Iterator[list[Optional[TokenEvent]]]:
    n = len(prompts)
    if n == 0 or max(limits) == 0:
        return
    V = model.config.vocab_size
    idx, mask = _left_pad(prompts, model.ln_f.weight.device)
    needs_seen = any(p.repetition_penalty not in (None, 1.0) for p in params)
    # No grad-mode context is held across `yield` (grad mode is per thread and the consumer runs between steps):
    # the decoder's own methods run under no_grad, and only eval mode is kept until the generator ends.
    was_training = model.training
    model.eval()
    try:
        decoder = Decoder(model, idx, mask, max(limits))
        seen = _seen_from_prompts(idx, mask, V) if needs_seen else None
        # rows with a zero limit never start
        active = [r for r in range(n) if limits[r] > 0]
        if len(active) < n:
            keep = torch.tensor(active, dtype=torch.long, device=idx.device)
            decoder.retire(keep)
            seen = seen[keep] if seen is not None else None
        logits = decoder.prefill()
        produced = 0
        while True:
            rows = decoder.rows.tolist()
            if should_stop is not None:
                alive = [i for i, r in enumerate(rows) if not should_stop(r)]
                if len(alive) < len(rows):
                    if not alive:
                        return
                    keep = torch.tensor(alive, dtype=torch.long, device=logits.device)
                    decoder.retire(keep)
                    logits, rows = logits[keep], [rows[i] for i in alive]
                    seen = seen[keep] if seen is not None else None
            tokens = _choose_rows(logits, [params[r] for r in rows], [gens[r] for r in rows], seen)  # (B,)
            logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
            chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
            if top_logprobs:
                top = torch.topk(logprobs, top_logprobs, dim=-1)
                top_ids, top_lps = top.indices.tolist(), top.values.tolist()
            token_list = tokens.tolist()
            produced += 1
            events: list[Optional[TokenEvent]] = [None] * n
            running = []
            for i, r in enumerate(rows):
                tok = token_list[i]
                reason = "stop" if tok == eos_token_id else ("length" if produced >= limits[r] else None)
                alts = list(zip(top_ids[i], top_lps[i])) if top_logprobs else []
                events[r] = TokenEvent(tok, chosen[i], alts, reason)
                if reason is None:
                    running.append(i)
            yield events
            if not running:
                return
            if seen is not None:
                seen[torch.arange(tokens.numel(), device=tokens.device), tokens] = True
            if len(running) < len(rows):
                keep = torch.tensor(running, dtype=torch.long, device=tokens.device)
                decoder.retire(keep)
                tokens = tokens[keep]
                seen = seen[keep] if seen is not None else None
            logits = decoder.step(tokens)
    finally:
        model.train(was_training)


def prompt_logprobs(model: "GPT", ids: Sequence[int], top_logprobs: int = 0) -> list[Optional[TokenEvent]]:
    """The log-probability of each token of a prompt given the tokens before it: one entry per token of `ids`.

    The first entry is None (no token predicts the first one; OpenAI's `echo` + `logprobs` reports null there); entry
    t is a `TokenEvent` with token ids[t], log p(ids[t] | ids[:t]) and the `top_logprobs` most likely alternatives at
    that position, exactly as `decode_steps` reports generated tokens (log-softmax of the raw logits). It costs one
    forward over the prompt: the logits at position t - 1 score token t. At most n_ctx tokens.

    >>> [e.token if e else None for e in prompt_logprobs(model, [464, 3290, 318])]  # doctest: +SKIP
    [None, 3290, 318]
    """
    V, n_ctx = model.config.vocab_size, model.config.n_ctx
    _check_count("top_logprobs", top_logprobs)
    ids = list(ids)
    if not ids:
        raise ValueError("the prompt is empty; there is nothing to score")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
    if bad:
        raise ValueError(f"the prompt has token id {bad[0]!r} outside [0, {V})")
    if len(ids) > n_ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens long, more than the model's context n_ctx={n_ctx}")
    if len(ids) == 1:
        return [None]
    idx = torch.tensor([ids], dtype=torch.long, device=model.ln_f.weight.device)  # (1, T)
    with _EvalMode(model):
        logits = model(idx)[0, :-1].float()  # (T - 1, V): position t - 1 predicts token t
    logprobs = torch.log_softmax(logits, dim=-1)  # (T - 1, V)
    chosen = logprobs.gather(1, idx[0, 1:, None]).squeeze(1).tolist()  # (T - 1,)
    k = min(top_logprobs, V)
    alternatives: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k:
        top = torch.topk(logprobs, k, dim=-1)  # (T - 1, k)
        alternatives = [list(zip(i, lp)) for i, lp in zip(top.indices.tolist(), top.values.tolist())]
    return [None] + [TokenEvent(t, lp, alts) for t, lp, alts in zip(ids[1:], chosen, alternatives)]


# --------------------------------------------------------------------------------------------------- streaming
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


def stream_text(model: "GPT", tokenizer: Any, prompt: str, max_new_tokens: int, *, stop: list[str] | None = None,
                eos_token_id: int | None = -1, generator: torch.Generator | None = None,
                **sampling: Any) -> Iterator[str]:
    """Generate a continuation of `prompt` and yield it as text pieces, as soon as each is certain.

    Two things hold text back. GPT-2's tokens are bytes, and one character (é, an emoji) may span several tokens:
    bytes go through an incremental UTF-8 decoder, so a piece never contains half a character (a sequence left
    incomplete at the very end decodes to U+FFFD). And a stop string may arrive split across tokens: text that could
    be the beginning of one waits until it is ruled out; when one appears, the text before it is the last piece.

    `**sampling` are `SamplingParams` fields (temperature, top_k, top_p, repetition_penalty). Generation also stops at
    the tokenizer's end-of-text token (`eos_token_id=-1`, the default, means "the tokenizer's"; None never stops).
    Arguments are checked (and the prompt encoded) at the call; decoding starts at the first `next()`.
    """
    params = SamplingParams(**sampling)
    stops = [s for s in (stop or []) if s]
    if eos_token_id == -1:
        eos_token_id = getattr(tokenizer, "eot_token", None)
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else []
    if not ids:
        if eos_token_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos_token_id]
    n_ctx = model.config.n_ctx
    if len(ids) > n_ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens long, more than the model's context n_ctx={n_ctx}")
    steps = decode_steps(model, [ids], max_new_tokens, params, eos_token_id=eos_token_id, generators=[generator])
    return _stream(steps, tokenizer, eos_token_id, stops)


def _stream(steps: Iterator[list[Optional[TokenEvent]]], tokenizer: Any, eos_token_id: Optional[int],
            stops: Sequence[str]) -> Iterator[str]:
    try:
        yield from text_pieces(_token_bytes(steps, tokenizer, eos_token_id), stops)
    finally:
        steps.close()  # stop decoding as soon as the consumer stops (a stop string, a closed connection)


def _token_bytes(steps: Iterator[list[Optional[TokenEvent]]], tokenizer: Any, eos_token_id: Optional[int]
                 ) -> Iterator[bytes]:
    for events in steps:
        event = events[0]
        if event is None or event.token == eos_token_id:
            return
        yield tokenizer.decode_bytes([event.token])


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
        cut = _first_stop(pending, stops)
        if cut is not None:
            if cut:
                yield pending[:cut]
            return
        hold = held_back(pending, stops)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += decoder.decode(b"", final=True)
    cut = _first_stop(pending, stops)
    pending = pending[:cut] if cut is not None else pending
    if pending:
        yield pending


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------------ inference dtype
def prepare_for_inference(model: "GPT", dtype: str = "fp32") -> "GPT":
    """Put `model` in eval mode with its weights in the given inference precision, in place, and return it.

    - "fp32": the float32 weights themselves, in layers that decode faster: same function.
    - "bf16": every linear layer and the tied LM head / embedding hold bfloat16 weights (half the bytes per token).
    - "int8": the same with int8 weights and one scale per output channel (a quarter of the bytes).

    Both low-precision modes are weight-only: activations, LayerNorm, attention and the KV cache stay float32. Which
    layer and kernel each mode uses on which CPU is `gpt2lab.quantize`'s business. A converted model is for inference;
    train and save the float32 one.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"unknown inference dtype {dtype!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    model.eval()
    from gpt2lab.quantize import convert_weights, is_converted

    if is_converted(model):
        raise ValueError("this model was already prepared for inference; prepare a freshly loaded model")
    return convert_weights(model, dtype)


INFERENCE_DTYPES = ("fp32", "bf16", "int8")


def load_tokenizer_for(directory: str, vocab_size: int, tokenizer: str | None = None) -> Any:
    """The tokenizer of a model directory: `tokenizer` if given ("gpt2" or a directory), else the directory's own
    tokenizer files, else GPT-2's when the model has GPT-2's vocabulary size."""
    from gpt2lab.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(str(directory))
    except FileNotFoundError:
        if vocab_size != 50257:
            raise FileNotFoundError(f"{directory} has no tokenizer files and its vocab_size ({vocab_size}) is not "
                                    "GPT-2's; pass --tokenizer or save the model with its tokenizer") from None
        return load_tokenizer("gpt2")


def load_for_inference(model: str, dtype: str = "fp32", tokenizer: str | None = None) -> tuple["GPT", Any]:
    """Load a model directory or hub name in an inference precision, with its tokenizer (see `load_tokenizer_for`)."""
    from gpt2lab.checkpoint import load_model, resolve_model_dir

    if dtype not in INFERENCE_DTYPES:  # before any loading or download
        raise ValueError(f"unknown inference dtype {dtype!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    directory = resolve_model_dir(model)
    network = prepare_for_inference(load_model(directory), dtype)
    return network, load_tokenizer_for(str(directory), network.config.vocab_size, tokenizer)
