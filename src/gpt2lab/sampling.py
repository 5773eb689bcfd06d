"""How the next token is chosen from the model's logits: the settings, the logit filters and the draw.

- `SamplingParams`: temperature, top-k, top-p and the repetition penalty, validated once.
- The pure filters `apply_repetition_penalty`, `apply_temperature`, `apply_top_k`, `apply_top_p`, chained by
  `process_logits` in `transformers`' order: each reshapes the next-token distribution, (B, V) -> (B, V).
- `choose_tokens`: argmax when greedy, else one draw per row by inverse-CDF sampling (`sample_inverse_cdf`), from one
  uniform number per row (`draw_uniforms`), so a row with its own seeded generator gets the same tokens in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gpt2lab import checks, native


# Past these the penalized logits of seen tokens overflow float32 (a row of +-inf is NaN in the softmax). Any
# temperature >= 0 and top_p in (0, 1] is safe: near 0 they are the greedy limit (apply_temperature, apply_top_p).
REPETITION_PENALTY_RANGE = (0.01, 1e4)


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
        checks.number("temperature", self.temperature, low=0, note="0 = greedy")
        if self.top_k is not None:
            checks.integer("top_k", self.top_k, low=1, note="None: no limit")
        if self.top_p is not None:
            checks.number("top_p", self.top_p, 0, 1, low_open=True, note="None: no limit")
        if self.repetition_penalty is not None:
            low, high = REPETITION_PENALTY_RANGE
            checks.number("repetition_penalty", self.repetition_penalty, low, high, note="1 or None: none")

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
    index is clamped all the same). It costs a cumulative sum and a binary search per row, several times less than
    `torch.multinomial` over GPT-2's vocabulary on CPU (docs/benchmarks.md, benchmarks/sampling.py).

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
        return native.argmax_rows(scores)  # scores.argmax(dim=-1), faster where the native kernel is built
    probs = scores.softmax(dim=-1)  # (B, V)
    return sample_inverse_cdf(probs, draw_uniforms(probs.size(0), generator, probs.device))
