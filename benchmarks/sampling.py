"""Sampling speed: gpt2lab's `choose_tokens` vs softmax + `torch.multinomial` on GPT-2's 50,257-token vocabulary.

    python benchmarks/sampling.py [--rounds 30] [--vocab 50257] [--threads 2]

Only the choice of the next token is timed (no model): the same random logits (B, V), for B = 1 and 16, under
temperature 1 (the plain softmax), top-k 50 and top-p 0.9, with one shared seeded generator and with one generator
per row (as the server gives seeded requests, so a row samples the same tokens whatever shares its batch; the peer
then has to call `multinomial` row by row). Both sides apply the same filters (`process_logits`), so the difference
is the draw itself. Variants alternate round after round and each keeps its median, so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from gpt2lab.sampling import SamplingParams, choose_tokens, process_logits


def peer(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """The usual way: softmax, then `torch.multinomial` (row by row when each row has its own generator)."""
    probs = process_logits(logits, params).softmax(dim=-1)  # (B, V)
    if len(generators) == 1:
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1)
    return torch.cat([torch.multinomial(probs[r:r + 1], 1, generator=g).squeeze(1) for r, g in enumerate(generators)])


def ours(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    return choose_tokens(logits, params, generator=generators[0] if len(generators) == 1 else generators)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"temperature 1": SamplingParams(), "top-k 50": SamplingParams(top_k=50),
                "top-p 0.9": SamplingParams(top_p=0.9)}
    print(f"torch {torch.__version__}, {args.threads} threads, V = {args.vocab}, median of {args.rounds} rounds; "
          "time per step (ms)")
    print(f"{'batch':>5}  {'generators':<10}  {'setting':<14}  {'multinomial':>11}  {'gpt2lab':>8}  {'speed-up':>8}")
    for batch in (1, 16):
        logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch)) * 3
        for per_row in (False, True) if batch > 1 else (False,):
            gens = [torch.Generator().manual_seed(r) for r in range(batch if per_row else 1)]
            for name, params in settings.items():
                rounds = {"peer": [], "ours": []}
                for _ in range(args.rounds):  # alternate, a few calls each, so noise hits both alike
                    rounds["peer"].append(median_ms(lambda: peer(logits, params, gens), 3))
                    rounds["ours"].append(median_ms(lambda: ours(logits, params, gens), 3))
                p, o = statistics.median(rounds["peer"]), statistics.median(rounds["ours"])
                print(f"{batch:>5}  {'per row' if per_row else 'shared':<10}  {name:<14}  {p:>11.3f}  {o:>8.3f}  "
                      f"{p / o:>7.1f}x")


if __name__ == "__main__":
    main()
