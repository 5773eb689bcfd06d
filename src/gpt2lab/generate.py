"""Decoding: batched, left-padded, cached generation, and the ways to consume it.

The pieces, from the bottom up (the cache, sampling and text assembly live in kv_cache.py, sampling.py and text.py):

- `Decoder`: the state of one batched decode (token buffer, padding mask, positions, KV cache, the sliding window);
  its steps run through the decode step that `make_step` picks for the model: by default (`default_step`) the
  native kernel (`gpt2lab.native_step.NativeStep`, one C call per token) or the same step written flat in PyTorch
  (`gpt2lab.fast_step.FlatStep`), wherever that is exact, else the model's own forward.
- `decode_steps`: THE decode loop. One event per row per step: the token, log-probabilities, stop reasons, per-row
  settings. The CLI, the server and `generate` all consume it.
- `generate`: tensor in, tensor out, as `transformers`' `generate` (`gpt2lab.GPT.generate` calls it).
- `prompt_logprobs`: the same events for the prompt's own tokens (OpenAI's `echo` with `logprobs`).
- `stream_text`: text pieces that never split a UTF-8 character, with stop strings (through `text.text_pieces`).

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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from gpt2lab import checks
from gpt2lab.kv_cache import KVCache
from gpt2lab.model import GPT
from gpt2lab.native_step import NativeStep, decode_step_for
from gpt2lab.sampling import SamplingParams, choose_tokens
from gpt2lab.text import text_pieces

# ------------------------------------------------------------------------------------------- moved names (re-exported)
# These lived in this module before it was split; `from gpt2lab.generate import ...` keeps working for each of them
# (the moved names this module uses itself, such as KVCache and SamplingParams, are imported above).
from gpt2lab.inference import (INFERENCE_DTYPES, load_for_inference, load_tokenizer_for,  # noqa: F401
                               prepare_for_inference)
from gpt2lab.kv_cache import activation_dtype  # noqa: F401
from gpt2lab.sampling import (Generators, apply_repetition_penalty, apply_temperature, apply_top_k,  # noqa: F401
                              apply_top_p, draw_uniforms, process_logits, sample_inverse_cdf)
from gpt2lab.text import held_back  # noqa: F401
# --------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------- decode steps
# One token per active row through the model with its cache, as FlatStep computes it: tokens (B,), the cache,
# positions (B, 1) of a padded batch or None, attention mask (B, S) over the cached positions and the new one or
# None -> next-token logits (B, V); the step advances the cache by one position, as the model's forward does.
DecodeStep = Callable[[torch.Tensor, KVCache, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]
# What picks the decode step for a model: a step, or None for the model's own forward.
StepFactory = Callable[[GPT], Optional[DecodeStep]]


def default_step(model: GPT) -> Optional[DecodeStep]:
    """The decode step a `Decoder` uses unless given a `make_step`, where it computes the model's forward (eval
    mode, stock blocks, no hooks): the native kernel's `NativeStep` where that is built and reads every layer, else
    `FlatStep`; else None, so the modules run (`gpt2lab.native_step.decode_step_for`). In float32 both compute the
    modules' function; for bf16 and int8 weights the native step does the precision's arithmetic its own way (see
    native_step.py).

    Another step (the compiled one of gpt2lab.compiled_step) is chosen per call with `make_step`; a
    step that keeps state across calls (a compiled graph) is built once and handed back for every decode:

    >>> step = compiled_step(model)  # doctest: +SKIP
    >>> generate(model, idx, 20, temperature=0, make_step=lambda m: step or default_step(m))  # doctest: +SKIP
    """
    return decode_step_for(model)


def _check_make_step(make_step: object) -> StepFactory:
    """The step factory to use: `make_step`, or `default_step` for None; anything else is refused by name."""
    if make_step is None:
        return default_step
    if not callable(make_step):
        raise TypeError(f"make_step must be a function model -> decode step (or None), got {type(make_step).__name__}")
    return make_step


def _pick_step(model: GPT, make_step: StepFactory | None = None) -> Optional[DecodeStep]:
    """`make_step(model)` (default `default_step`), checked: a callable step, or None for the model's forward."""
    step = _check_make_step(make_step)(model)
    if step is not None and not callable(step):
        raise TypeError(f"make_step returned {type(step).__name__}, not a decode step (a callable) or None")
    return step


# ------------------------------------------------------------------------------------------------------- decoding
class Decoder:
    """The state of one batched, left-padded decode: feed it tokens, get next-token logits.

    - `prefill()` encodes the prompts and returns the last position's logits, (B, V) float32.
    - `step(tokens)` appends one token per active row (B,) and returns the next logits (B, V).
    - `retire(keep)` drops finished rows; `rows` maps active rows to the original batch rows.

    It owns a token buffer (B, T + max_new_tokens) and its padding mask, the next position id of each row, and the
    KV cache; only the model's own outputs are allocated per step. See the module docstring for the sliding window.
    `make_step(model)` gives the one-token step (`DecodeStep`), or None for the model's forward; None (the default)
    means `default_step`, built again after each re-encoding of the window (a given `make_step` is called once).
    The prefill and the window's re-encoding run the model's forward, except where the default step is the native
    one and the prompt short enough for its kernel to be faster (`NativeStep.prefill`: in float32 the same function;
    in bf16, int8 and int4 the step's own arithmetic, as for the tokens after the prompt).
    """

    def __init__(self, model: GPT, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 0, keep: int | None = None, make_step: StepFactory | None = None) -> None:
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
        self._make_step = make_step
        self.fast_step = _pick_step(model, make_step)  # None: the model's own forward

    @property
    def batch_size(self) -> int:
        return self.rows.numel()

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Encode the window [start, length) from an empty cache; returns (B, V) logits of its last position."""
        self.cache.reset()
        window = self.mask[:, self.start:self.length]  # (B, W)
        self.padded = not bool(window.all())
        tokens = self.tokens[:, self.start:self.length]  # (B, W)
        positions = mask = None
        if self.padded:
            positions = (window.cumsum(-1) - 1).clamp_(min=0)  # (B, W): real tokens count from 0, padding at 0
            self.next_pos = window.sum(-1, keepdim=True)  # (B, 1)
            mask = window
        if self._native_prefill(window.numel()):  # a short prompt: one call of the kernel
            return self.fast_step.prefill(tokens, self.cache, positions, mask)
        logits = self.model(tokens, position_ids=positions, attention_mask=mask, kv_cache=self.cache, logits_to_keep=1)
        return logits[:, -1].float()  # (B, V)

    def _native_prefill(self, rows: int) -> bool:
        """Whether the default step is the native one and encodes `rows` prompt tokens faster than the modules (a
        step given by `make_step` is not rebuilt after a re-encoding, so its weights may be older than the modules')."""
        return self._make_step is None and isinstance(self.fast_step, NativeStep) and self.fast_step.prefills(rows)

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
        if self._make_step is None:  # the default step: built again, so the re-encoding and the steps after it read
            self.fast_step = _pick_step(self.model)  # the weights as they are now (a native step keeps its own)
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
        self.was_training = _enter_eval(self.model)
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        _leave_eval(self.model, self.was_training)
        self.grad.__exit__(*exc)


def _enter_eval(model: torch.nn.Module) -> bool:
    """Put every module of `model` in eval mode; returns whether the model itself was training. `eval()` sets a flag
    on each of a model's modules through nn.Module's `__setattr__`, a visible share of a short prompt's time on a
    small model (docs/benchmarks.md), so a model already wholly in eval mode is left alone."""
    was_training = model.training
    if any(m.training for m in model.modules()):
        model.eval()
    return was_training


def _leave_eval(model: torch.nn.Module, was_training: bool) -> None:
    """Undo `_enter_eval` for a model that was training (one that was not stays in eval mode, as it was)."""
    if was_training:
        model.train(True)


def _check_token(name: str, value: object, vocab_size: int) -> Optional[int]:
    return None if value is None else checks.integer(name, value, 0, vocab_size - 1, note="a token id, or None")


def _check_ids(name: str, ids: Sequence[object], vocab_size: int) -> None:
    for t in ids:
        checks.integer(f"a token id of {name}", t, 0, vocab_size - 1)


def _seen_from_prompts(idx: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, T) ids and (B, T) 1/0 mask -> (B, V) bool: True for the ids of each row's real tokens."""
    seen = torch.zeros(idx.size(0), vocab_size, dtype=torch.bool, device=idx.device)
    if mask is None:
        return seen.scatter_(1, idx, True)
    counts = torch.zeros(idx.size(0), vocab_size, dtype=torch.long, device=idx.device)
    counts.scatter_add_(1, idx, mask.long())
    return counts > 0


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
    T = max((len(p) for p in prompts), default=0)
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


def decode_steps(model: GPT, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingParams | list[SamplingParams], eos_token_id: int | None = None,
                 generators: list[torch.Generator | None] | None = None, top_logprobs: int = 0,
                 should_stop: Callable[[int], bool] | None = None, make_step: StepFactory | None = None,
                 logprobs: bool = True, vocab_limit: int | None = None) -> Iterator[list[Optional[TokenEvent]]]:
    """Decode all prompts together (one left-padded batch, one KV cache), yielding one list per step.

    Each list has one entry per prompt: a `TokenEvent`, or None for a row that has already finished. A row's last
    event has `finish_reason` "stop" (it produced `eos_token_id`) or "length" (its `max_new_tokens` is reached).
    `max_new_tokens`, `sampling` and `generators` may be given per row. `should_stop(row)` is asked before every
    step; True ends that row without another event (e.g. its client went away). Finished rows leave the batch, so
    they cost nothing afterwards. Log-probabilities are log-softmax of the raw logits, before any sampling filter;
    `logprobs=False` leaves them out (each event's logprob is NaN) for callers that read only the tokens.
    `make_step` picks the one-token decode step for the model (see `default_step`, which it defaults to).
    `vocab_limit`: ids at or above it are never chosen, for a model whose vocabulary is padded past its tokenizer's
    (nanoGPT's 50304 for GPT-2's 50257): their logits are -inf before sampling and log-probabilities.

    Nothing is decoded until the first `next()`; `generate` runs the same loop.
    """
    n = len(prompts)
    V = model.config.vocab_size
    limits = _per_row("max_new_tokens", max_new_tokens, n, lambda v: checks.integer("max_new_tokens", v, low=0))
    params = _per_row("sampling", sampling, n, _check_sampling)
    gens = _per_row("generators", generators if generators is not None else None, n, lambda g: g)
    eos_token_id = _check_token("eos_token_id", eos_token_id, V)
    checks.integer("top_logprobs", top_logprobs, low=0)
    if vocab_limit is not None:
        checks.integer("vocab_limit", vocab_limit, 1, V, note="the ids that may be chosen")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; start it with at least one token (GPT-2 uses <|endoftext|>)")
        _check_ids(f"prompt {i}", p, V)
    _check_make_step(make_step)
    idx, mask = _left_pad(prompts, model.ln_f.weight.device)
    return _run_decode(model, idx, mask, limits, params, gens, eos_token_id, min(top_logprobs, V), should_stop,
                       make_step, logprobs, None if vocab_limit == V else vocab_limit)


def _run_decode(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None, limits: list[int],
                params: list[SamplingParams], gens: list, eos_token_id: int | None, top_logprobs: int,
                should_stop: Callable[[int], bool] | None, make_step: StepFactory | None = None,
                logprobs: bool = True, vocab_limit: int | None = None) -> Iterator[list[Optional[TokenEvent]]]:
    """The decode loop behind `decode_steps` and `generate`: idx (B, T) left-padded token ids, mask (B, T) 1 for real
    tokens (None: no padding), and per-row limits, settings and generators, already checked. Without `logprobs`
    (`generate`, which returns tokens only) the events' logprob is NaN: the log-softmax over the whole vocabulary
    that nobody would read is skipped (its cost is in docs/benchmarks.md)."""
    n = idx.size(0)
    if n == 0 or max(limits) == 0:
        return
    V = model.config.vocab_size
    needs_seen = any(p.repetition_penalty not in (None, 1.0) for p in params)
    # No grad-mode context is held across `yield` (grad mode is per thread and the consumer runs between steps):
    # the decoder's own methods run under no_grad, and only eval mode is kept until the generator ends.
    was_training = _enter_eval(model)
    try:
        decoder = Decoder(model, idx, mask, max(limits), make_step=make_step)
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
            if vocab_limit is not None:  # ids past the tokenizer's vocabulary: never chosen
                logits[:, vocab_limit:] = -math.inf
            tokens = _choose_rows(logits, [params[r] for r in rows], [gens[r] for r in rows], seen)  # (B,)
            if logprobs or top_logprobs:
                log_p = torch.log_softmax(logits, dim=-1)  # (B, V)
                chosen = log_p.gather(1, tokens[:, None]).squeeze(1).tolist()
            else:
                chosen = [math.nan] * len(rows)
            if top_logprobs:
                top = torch.topk(log_p, top_logprobs, dim=-1)
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
        _leave_eval(model, was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, make_step: StepFactory | None = None) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + max_new_tokens), prompt first.

    `temperature=0` is greedy decoding; otherwise tokens are sampled (see `SamplingParams`), reproducibly when a
    seeded `generator` is given. A batch of prompts of different lengths is left-padded with an `attention_mask`
    (B, T) of 1 for real tokens and 0 for padding. A row that produces `eos_token_id` stops there; its remaining
    columns are filled with `eos_token_id`. The prompt is encoded once; each new token costs one cached step.
    The tokens come from the decode loop that `decode_steps` runs for the CLI and the server. `make_step` picks the
    one-token decode step (see `default_step`, which it defaults to).

    >>> out = generate(model, torch.tensor([[50256]]), 5, temperature=0)  # doctest: +SKIP
    """
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    checks.integer("max_new_tokens", max_new_tokens, low=0)
    eos_token_id = _check_token("eos_token_id", eos_token_id, model.config.vocab_size)
    _check_make_step(make_step)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (B, T) tensor of token ids with T >= 1, got {getattr(idx, 'shape', idx)!r}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")  # a float would be truncated
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask is not None and not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError("attention_mask must end every row with a real token (1): pad prompts on the left, where "
                         "the next token goes after the last column")
    B, T = idx.shape
    idx = idx.to(device=model.ln_f.weight.device, dtype=torch.long)
    if attention_mask is not None:
        attention_mask = attention_mask.to(idx.device).long()
    new: list[list[int]] = [[] for _ in range(B)]  # each row's tokens, up to and including its end-of-text
    steps = _run_decode(model, idx, attention_mask, [max_new_tokens] * B, [params] * B, [generator] * B,
                        eos_token_id, 0, None, make_step, logprobs=False)
    try:
        for events in steps:
            for row, event in enumerate(events):
                if event is not None:
                    new[row].append(event.token)
    finally:
        steps.close()  # restores the model's training mode at once, even on an error
    out = torch.full((B, T + max_new_tokens), eos_token_id if eos_token_id is not None else 0, dtype=torch.long,
                     device=idx.device)  # (B, T + N): a finished row's remaining columns hold end-of-text
    out[:, :T] = idx
    for row, tokens in enumerate(new):
        if tokens:
            out[row, T:T + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def prompt_logprobs(model: GPT, ids: Sequence[int], top_logprobs: int = 0) -> list[Optional[TokenEvent]]:
    """The log-probability of each token of a prompt given the tokens before it: one entry per token of `ids`.

    The first entry is None (no token predicts the first one; OpenAI's `echo` + `logprobs` reports null there); entry
    t is a `TokenEvent` with token ids[t], log p(ids[t] | ids[:t]) and the `top_logprobs` most likely alternatives at
    that position, exactly as `decode_steps` reports generated tokens (log-softmax of the raw logits). It costs one
    forward over the prompt: the logits at position t - 1 score token t. At most n_ctx tokens.

    >>> [e.token if e else None for e in prompt_logprobs(model, [464, 3290, 318])]  # doctest: +SKIP
    [None, 3290, 318]
    """
    V, n_ctx = model.config.vocab_size, model.config.n_ctx
    checks.integer("top_logprobs", top_logprobs, low=0)
    ids = list(ids)
    if not ids:
        raise ValueError("the prompt is empty; there is nothing to score")
    _check_ids("the prompt", ids, V)
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
def stream_text(model: GPT, tokenizer: Any, prompt: str, max_new_tokens: int, *, stop: str | list[str] | None = None,
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
    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # a string is one stop string
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
    steps = decode_steps(model, [ids], max_new_tokens, params, eos_token_id=eos_token_id, generators=[generator],
                         logprobs=False, vocab_limit=vocab_limit_for(model, tokenizer))
    return _stream(steps, tokenizer, eos_token_id, stops)


def vocab_limit_for(model: GPT, tokenizer: Any) -> Optional[int]:
    """The `vocab_limit` of text generation with `tokenizer`: its vocabulary size where the model's is larger (ids
    the tokenizer cannot decode are never chosen), else None."""
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and 0 < size < model.config.vocab_size else None


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
