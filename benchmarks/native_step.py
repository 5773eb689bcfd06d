"""The native decode step against the flat PyTorch step, per precision and batch size, in one run.

    python benchmarks/native_step.py [--preset gpt2] [--threads 2] [--batches 1,8] [--tokens 48] [--rounds 3]

Each precision runs both ways on the same random weights (GPT-2's init, seed 0):

- "native": the model as `prepare_for_inference` leaves it with the native kernel built (fp32: the nn.Linear layers
  as loaded; bf16: BF16Linear; int8: Int8Linear; int4: Int4Linear), stepped by `NativeStep`;
- "flat": the model prepared as it is without the native kernel (fp32: row blocks + oneDNN; bf16: FBGEMM's fp16
  layout; int8: FBGEMM's integer GEMM, where this torch build has them; int4: Int4Linear widening its weights at
  every call), stepped by `FlatStep`.

Tokens/s of cached decode steps alone (after a 16-token prefill; greedy argmax between steps), best of `--rounds`
rounds in which the two run alternately, and the ratio native / flat within each round. Prints the CPU's flags.
Without the native kernel (no compiler, a CPU without AVX2/FMA/F16C) it says why and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import time
from unittest import mock

import torch

from gpt2lab import GPT, GPTConfig, native
from gpt2lab.cpu import cpu_flags
from gpt2lab.fast_step import FlatStep
from gpt2lab.inference import prepare_for_inference
from gpt2lab.kv_cache import KVCache
from gpt2lab.native_step import NativeStep


def steps_per_second(model: GPT, step, batch: int, tokens: int) -> float:
    """Decode tokens/s of `step` on `model`: `tokens` steps of `batch` rows after a 16-token prefill."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(model, batch, max_length=16 + tokens + 2)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (batch, 16), generator=g), kv_cache=cache)
        tok = step(torch.zeros(batch, dtype=torch.long), cache).argmax(-1)  # warm-up
        start = time.perf_counter()
        for _ in range(tokens):
            tok = step(tok, cache).argmax(-1)
        return tokens * batch / (time.perf_counter() - start)


def flat_model(base: GPT, dtype: str) -> GPT:
    """`base` prepared in `dtype` as it is without the native kernel."""
    with mock.patch.object(native, "library", lambda: None):
        return prepare_for_inference(copy.deepcopy(base), dtype)


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that time decode steps (this one and kernel_paths.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    return ap


def main() -> None:
    args = step_arguments(__doc__.split("\n")[0]).parse_args()
    if native.library() is None:
        print(f"the native kernel is unavailable here: {native.unavailable_reason()}")
        return
    torch.set_num_threads(args.threads)
    flags = sorted((cpu_flags() or frozenset()) & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
                                                   "avx_vnni", "amx_tile"})
    print(f"CPU flags: {' '.join(flags)}; torch {torch.__version__}; {args.preset}, {args.threads} threads, "
          f"{args.tokens} steps after a 16-token prefill, {args.rounds} rounds")
    torch.manual_seed(0)
    base = GPT(GPTConfig.preset(args.preset)).eval()
    pairs = {dtype: (prepare_for_inference(copy.deepcopy(base), dtype), flat_model(base, dtype))
             for dtype in ("fp32", "bf16", "int8", "int4")}
    for batch in (int(b) for b in args.batches.split(",")):
        for dtype, (fast, flat) in pairs.items():
            best_n = best_f = 0.0
            ratios = []
            for _ in range(args.rounds):
                n = steps_per_second(fast, NativeStep(fast), batch, args.tokens)
                f = steps_per_second(flat, FlatStep(flat), batch, args.tokens)
                best_n, best_f = max(best_n, n), max(best_f, f)
                ratios.append(n / f)
            print(f"batch {batch} {dtype}: native {best_n:7.1f} tok/s  flat ({type(flat.lm_head).__name__}) "
                  f"{best_f:7.1f} tok/s  native / flat {min(ratios):.2f}-{max(ratios):.2f}x", flush=True)


if __name__ == "__main__":
    main()
