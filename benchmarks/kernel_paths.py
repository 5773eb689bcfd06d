"""The native kernel's AVX-512 paths against its AVX2 paths on this CPU, per precision and batch size, in one run.

    python benchmarks/kernel_paths.py [--preset gpt2] [--threads 2] [--batches 1,8] [--tokens 48] [--rounds 3]

Two builds of csrc/decode_step.cpp are loaded in one process: the one gpt2lab builds for this CPU (AVX-512 F/BW/VL,
with AVX-512-BF16 and AVX-512-VNNI where the CPU has them; gpt2lab.native) and the AVX2 one. Each precision's model
(`prepare_for_inference` of GPT-2's init, seed 0) is stepped by a `NativeStep` on each build, alternately, and the
script prints tokens/s of cached decode steps at a fixed thread count (best of `--rounds`), the ratio wide / AVX2 within each round, and how
far the two builds' logits are apart after the same steps (bf16's dot-product path rounds activations to bf16), and
each build's share of the bandwidth bound (the read bandwidth measured as benchmarks/generate.py measures it; the
issue's goal for bf16 and int8 on CPUs with bf16 / int8 dot products is 70% at batch 1).
On a CPU without AVX-512 F/BW/VL there is nothing to compare: it says so and exits 0. `--emulate` takes the build
on SIMDe's emulated AVX-512 (GPT2LAB_NATIVE_EMULATE's) as the wide side, to check this script on any CPU: its times
mean nothing.
"""

from __future__ import annotations

import copy

import torch

from gpt2lab import GPT, GPTConfig, native
from gpt2lab.cpu import CPUFeatures, cpu_features, cpu_flags
from gpt2lab.inference import prepare_for_inference
from gpt2lab.kv_cache import KVCache
from gpt2lab.native_step import NativeStep

from _machine import read_bandwidth
from generate import bytes_per_token
from native_step import step_arguments, steps_per_second

DTYPES = ("fp32", "bf16", "int8", "int4")


def wide_flags(emulate: bool) -> list[str] | str:
    """The flags of the wide build: this CPU's own, or SIMDe's emulation of every path; or why there is none."""
    if emulate:
        include = native.simde_include()
        if include is None:
            return "--emulate needs SIMDe's headers: pip install simde-py"
        return native.compile_flags(cpu_features(), native.PATHS, include)
    if not cpu_features().avx512_kernels:
        return f"this CPU ({cpu_features().name}) has no AVX-512 F/BW/VL: the kernel has only its AVX2 paths here"
    return native.compile_flags(cpu_features())


def logits_apart(model: GPT, wide, avx2, batch: int, steps: int = 4) -> float:
    """The largest |logit difference| between the two builds' steps from one prefill, relative to the logits' scale."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 8), generator=g)
    caches = [KVCache.for_model(model, batch, max_length=8 + steps + 1) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(prompt, kv_cache=cache)
        tok, worst = torch.zeros(batch, dtype=torch.long), 0.0
        for _ in range(steps):
            a, b = wide(tok, caches[0]), avx2(tok, caches[1])
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
            tok = b.argmax(-1)
    return worst


def main() -> None:
    ap = step_arguments(__doc__.split("\n")[0])
    ap.add_argument("--emulate", action="store_true", help="the wide side on SIMDe's emulation (times mean nothing)")
    args = ap.parse_args()
    if native.library() is None:
        print(f"the native kernel is unavailable here: {native.unavailable_reason()}")
        return
    flags = wide_flags(args.emulate)
    if isinstance(flags, str):
        print(flags)
        return
    avx2_flags = native.compile_flags(CPUFeatures(avx2=True, fma=True, f16c=True))
    try:
        wide_lib, avx2_lib = native.load_build(flags), native.load_build(avx2_flags)
    except (OSError, RuntimeError) as exc:  # a compiler without the AVX-512 flags, a CPU that does not run them
        print(f"the AVX-512 build is not usable here: {exc}")
        return
    torch.set_num_threads(args.threads)
    shown = sorted((cpu_flags() or frozenset()) & {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                                                   "avx512_vnni", "amx_tile"})
    print(f"CPU flags: {' '.join(shown)}; wide build: {', '.join(sorted(native.kernel_paths(wide_lib)))}; torch "
          f"{torch.__version__}; {args.preset}, {args.threads} threads, {args.tokens} steps after a 16-token "
          f"prefill, {args.rounds} rounds")
    torch.manual_seed(0)
    base = GPT(GPTConfig.preset(args.preset)).eval()
    models = {dtype: prepare_for_inference(copy.deepcopy(base), dtype) for dtype in DTYPES}
    bandwidth = read_bandwidth(5)
    print(f"read bandwidth (all cores): {bandwidth / 1e9:.1f} GB/s; of bound = tok/s x bytes a step reads / bandwidth")
    for batch in (int(b) for b in args.batches.split(",")):
        for dtype, model in models.items():
            best_w = best_a = 0.0
            ratios = []
            for _ in range(args.rounds):  # threads fixed: one model's tuner would steer both builds' counts
                w = steps_per_second(model, NativeStep(model, False, wide_lib), batch, args.tokens)
                a = steps_per_second(model, NativeStep(model, False, avx2_lib), batch, args.tokens)
                best_w, best_a = max(best_w, w), max(best_a, a)
                ratios.append(w / a)
            apart = logits_apart(model, NativeStep(model, False, wide_lib), NativeStep(model, False, avx2_lib), batch)
            step_bytes = bytes_per_token(model, 16 + args.tokens // 2)  # a batch's step reads the weights once
            share = ", ".join(f"{name} {rate / batch * step_bytes / bandwidth:.0%}"
                              for name, rate in (("wide", best_w), ("AVX2", best_a)))
            print(f"batch {batch} {dtype}: wide {best_w:7.1f} tok/s  AVX2 {best_a:7.1f} tok/s  wide / AVX2 "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x  logits apart {apart:.1e}  of bound: {share}", flush=True)


if __name__ == "__main__":
    main()
