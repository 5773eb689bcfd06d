"""The int8 kernels side by side: GB/s of weight read per GPT-2 124M layer shape, then decode tokens/s end to end.

    python benchmarks/int8_kernels.py [--threads 2] [--rows 1,8] [--tokens 64] [--rounds 2] [--skip-layers]

Per layer (x (M, K) times an int8 weight (N, K) at M rows): torch._weight_int8pack_mm with bf16 and with float32
activations, FBGEMM's dynamic int8 linear as `FbgemmInt8Linear` runs it (7-bit activations; 1 row straight through,
several rows mapped per row first), FBGEMM under the oneDNN engine for comparison, and the bf16 F.linear for
reference (its GB/s counts its two bytes per weight). A small matrix stays in cache between repeats, so its figure
is above the memory's speed; the head (768 -> 50257, 38.6 MB in int8) is not.

End to end: greedy decode of `--tokens` tokens after a 16-token prompt, minus a 1-token generate, on random GPT-2
124M weights, for int8 with each kernel (`quantize.convert_int8`) and bf16 / fp32 as `prepare_for_inference` picks
them; variants alternate round after round and each keeps its best. Ratios are to int8pack, the previous int8 path.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

# (K, N): c_attn, attn.c_proj, c_fc, mlp.c_proj, the head
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]
PROMPT = 16


def best_seconds(fn: Callable[[], object], calls: int) -> float:
    """The fastest of `calls` timed calls after two warm-ups: on a shared machine a call that lost its core to
    another process is slower, never faster."""
    fn()
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def layer_candidates(K: int, N: int, M: int) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, bytes of weight it reads) for one (K -> N) layer at M rows."""
    from gpt2lab.quantize_int import FbgemmInt8Linear, fbgemm_int8, quantize_per_channel

    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    q, s = quantize_per_channel(w)
    x = torch.randn(M, K)
    xb, sb, wb = x.bfloat16(), s.bfloat16(), w.bfloat16()
    out = {"int8pack bf16": (lambda: torch._weight_int8pack_mm(xb, q, sb), N * K),
           "int8pack fp32": (lambda: torch._weight_int8pack_mm(x, q, s), N * K)}
    if fbgemm_int8():
        layer = FbgemmInt8Linear(q, s)
        out["fbgemm"] = (lambda: layer(x), N * K)
        out.update(onednn_candidate(q, s, x))
    out["bf16 F.linear"] = (lambda: F.linear(xb, wb), 2 * N * K)
    return out


def onednn_candidate(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> dict:
    """The same dynamic linear packed by the oneDNN quantized engine, where this torch has it."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        return {}
    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "onednn"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            w = torch.quantize_per_channel(q.float() * s[:, None], s.double(), torch.zeros(q.size(0), dtype=torch.long),
                                           0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(w, None)
        return {"onednn dynamic": (lambda: torch.ops.quantized.linear_dynamic(x, packed, True), q.numel())}
    except RuntimeError:
        return {}
    finally:
        torch.backends.quantized.engine = before


def run_layers(rows: list[int]) -> None:
    for M in rows:
        print(f"\nper layer, M={M}: GB/s of weight read (time per call)")
        for K, N in SHAPES:
            cells = []
            for name, (fn, nbytes) in layer_candidates(K, N, M).items():
                seconds = best_seconds(fn, max(10, int(2e8 / nbytes)))
                cells.append(f"{name} {nbytes / seconds / 1e9:5.1f} ({seconds * 1e6:.0f} us)")
            print(f"  {K:>4} -> {N:<5}  " + " | ".join(cells), flush=True)


def decode_variants() -> dict[str, torch.nn.Module]:
    from gpt2lab import GPT, GPTConfig, quantize
    from gpt2lab.inference import prepare_for_inference

    torch.manual_seed(0)
    ref = GPT(GPTConfig.preset("gpt2")).eval()
    out = {"int8 int8pack": quantize.convert_int8(copy.deepcopy(ref), "int8pack")}
    if quantize.fbgemm_int8():
        out["int8 fbgemm"] = quantize.convert_int8(copy.deepcopy(ref), "fbgemm")
    out["bf16"] = prepare_for_inference(copy.deepcopy(ref), "bf16")
    out["fp32"] = prepare_for_inference(ref, "fp32")
    return out


def run_decode(tokens: int, rounds: int, batches: list[int]) -> None:
    from gpt2lab.generate import generate

    models = decode_variants()
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for batch in batches:
            prompt = torch.randint(0, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
            for name, model in models.items():
                one = best_seconds(lambda: generate(model, prompt, 1, temperature=0), 2)
                many = best_seconds(lambda: generate(model, prompt, tokens, temperature=0), 2)
                rate = batch * (tokens - 1) / (many - one)
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
    for batch in batches:
        base = best["int8 int8pack", batch]
        print(f"\ndecode, batch {batch}, {tokens} tokens, best of {rounds} rounds: tokens/s (ratio to int8pack)")
        for name in models:
            print(f"  {name:<14} {best[name, batch]:7.1f}  ({best[name, batch] / base:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8", help="comma-separated M for the per-layer table")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    from gpt2lab.cpu import cpu_flags

    torch.set_num_threads(args.threads)
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: "
          f"{' '.join(f for f in wanted if f in (cpu_flags() or ())) or 'none of ' + ', '.join(wanted)}")
    rows = [int(r) for r in args.rows.split(",")]
    if not args.skip_layers:
        run_layers(rows)
    if not args.skip_decode:
        run_decode(args.tokens, args.rounds, [1, 8])


if __name__ == "__main__":
    main()
