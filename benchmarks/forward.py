"""Forward-pass throughput: gpt2lab vs transformers' GPT2LMHeadModel on the same 124M weights, same threads, one run.

    python benchmarks/forward.py [--threads 2] [--repeats 5] [--preset gpt2]

Each model runs each shape alternately (ours, theirs, ours, ...) so machine noise hits both alike; the best time of
each is reported, with tokens/s and the ratio ours / theirs (> 1 means gpt2lab is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="1x1024,8x256", help="comma-separated BxT")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    from gpt2lab import GPT, GPTConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").eval()

    print(f"gpt2lab vs transformers {__import__('transformers').__version__}, {args.preset}, fp32, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'shape':>10} {'ours tok/s':>12} {'theirs tok/s':>13} {'ratio':>7}  max|dlogits|")
    for shape in args.shapes.split(","):
        B, T = map(int, shape.split("x"))
        idx = torch.randint(0, ours.config.vocab_size, (B, T))
        with torch.inference_mode():
            diff = (ours(idx) - theirs(idx).logits).abs().max().item()  # also the warm-up
            times = {"ours": float("inf"), "theirs": float("inf")}
            for _ in range(args.repeats):  # interleaved so drifting machine load hits both
                times["ours"] = min(times["ours"], best_time(lambda: ours(idx), 1))
                times["theirs"] = min(times["theirs"], best_time(lambda: theirs(idx), 1))
        tok = B * T
        print(f"{shape:>10} {tok / times['ours']:>12,.0f} {tok / times['theirs']:>13,.0f} "
              f"{times['theirs'] / times['ours']:>6.2f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
