"""Generation speed: gpt2lab (fp32, bf16, int8, int4) vs transformers' `generate` (fp32) on the same random weights.

"ours fp32 fresh" is the model as loaded, with no `prepare_for_inference` (what `model.generate` gets by default);
"ours fp32/bf16/int8/int4" are prepared for inference.

    python benchmarks/generate.py [--threads 2,1] [--tokens 48] [--rounds 3]

For each thread count, one run measures, for every variant:

- decode tokens/s at batch 1 and batch 8: greedy `generate` of N tokens minus `generate` of 1 token (which is the
  prefill plus one sampling), so the figure is the per-token cost of cached decoding alone;
- prefill tokens/s of a 512-token prompt (`generate` of 1 token);
- for the compiled variants (`gpt2lab.compiled_step`, the decode step through torch.compile), the start-up: the
  seconds of the warm-up calls, which compile a batch-1 and a batch-8 graph (less when inductor's on-disk cache
  already holds them, as on a second run); `--no-compiled` leaves them out;
- peak memory: the bytes of weights, and the peak resident memory of a fresh process that loads the variant and
  runs the batch-8 decode and the 512-token prefill (the kernel's VmHWM, reset after loading so the float32 copy a
  conversion starts from does not count), next to the same process's RSS before loading anything (Python + torch).

Variants run alternately, round after round, and each keeps its best time, so a noisy machine hits all alike. The
machine's read bandwidth is measured (summing a 512 MiB tensor with every core, best of all tries before and between
rounds) to give the batch-1 bound:
bandwidth / bytes of weights read per token (every matrix once, the tied LM head included, the embeddings one row
each, plus the cache).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Callable

import torch

from _machine import cpu_description, read_bandwidth

PROMPT = 16  # decode benchmarks start from a 16-token prompt
PREFILL = 512


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc keeps it mapped otherwise), so the peak
    measured next starts from what is live: the loaded model, not the float32 copy a conversion started from."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors once) plus the kernel-packed weights that are neither."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(getattr(m, "weight_nbytes", 0) for m in model.modules())


def bytes_per_token(model: torch.nn.Module, context: int) -> int:
    """Bytes a batch-1 decode step reads: every weight except the two embedding tables (one row each), the tied head
    once, and the keys and values of `context` cached positions."""
    from gpt2lab.kv_cache import activation_dtype

    cfg = model.config
    total = weight_bytes(model)  # the tied token table is counted once: the head reads all of it
    wpe = getattr(model.wpe, "weight", None)
    total -= wpe.numel() * wpe.element_size() if wpe is not None else 0  # one row per token
    head = {t.data_ptr() for t in list(model.lm_head.parameters()) + list(model.lm_head.buffers())}
    wte = getattr(model.wte, "weight", None)
    if wte is not None and wte.data_ptr() not in head:  # a packed head: the lookup table is a separate copy,
        total -= wte.numel() * wte.element_size()  # read one row per token
    kv = 2 * cfg.n_layer * context * cfg.n_embd * torch.empty(0, dtype=activation_dtype(model)).element_size()
    return total + kv


class Variant:
    def __init__(self, name: str, generate: Callable[[torch.Tensor, int], object], weights: int, per_token: int | None):
        self.name, self.generate, self.weights, self.per_token = name, generate, weights, per_token
        self.best: dict[str, float] = {}
        self.peak = self.baseline = 0
        self.startup = 0.0

    def time(self, key: str, fn: Callable[[], object]) -> None:
        self.best[key] = min(self.best.get(key, float("inf")), _timed(fn))


def compiled_generate(model: torch.nn.Module) -> Callable[[torch.Tensor, int], object] | None:
    """`generate` through the compiled decode step, or None where `compiled_step` gives none (no compiler, or a layer
    kind it cannot trace, such as FBGEMM's packed fp16). The step is built once and handed to every call through
    `make_step`, so its graphs compile once."""
    from gpt2lab.compiled_step import compiled_step
    from gpt2lab.generate import generate

    step = compiled_step(model)
    if step is None:
        return None

    def gen(idx: torch.Tensor, n: int):
        return generate(model, idx, n, temperature=0, make_step=lambda _: step)
    return gen


def build_variants(threads: int, compiled: bool = True) -> list[Variant]:
    from transformers import GPT2LMHeadModel

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.generate import generate
    from gpt2lab.inference import prepare_for_inference

    torch.manual_seed(0)
    base = GPT(GPTConfig.preset("gpt2")).eval()
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").eval()
        fresh = GPT.from_pretrained(d)  # as loaded, no prepare_for_inference: what `model.generate` gets by default
    context = PROMPT + 24
    variants = [Variant("ours fp32 fresh", lambda idx, n: generate(fresh, idx, n, temperature=0), weight_bytes(fresh),
                        bytes_per_token(fresh, context))]
    for dtype in ("fp32", "bf16", "int8", "int4"):
        model = prepare_for_inference(copy.deepcopy(base), dtype)
        gen = (lambda m: lambda idx, n: generate(m, idx, n, temperature=0))(model)
        variants.append(Variant(f"ours {dtype}", gen, weight_bytes(model), bytes_per_token(model, context)))
        fast = compiled_generate(model) if compiled else None
        if fast is not None:
            variants.append(Variant(f"ours {dtype} compiled", fast, weight_bytes(model), bytes_per_token(model, context)))
        elif compiled:
            print(f"ours {dtype} compiled: no compiled step here (no C++ compiler, or a layer kind it cannot trace)")
    del base

    def hf_generate(idx: torch.Tensor, n: int):
        with torch.inference_mode():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    variants.append(Variant("transformers fp32", hf_generate, weight_bytes(hf), None))
    return variants


def run(threads: int, tokens: int, rounds: int, bandwidth: float, compiled: bool = True) -> None:
    torch.set_num_threads(threads)
    variants = build_variants(threads, compiled)
    g = torch.Generator().manual_seed(1)
    prompt1 = torch.randint(0, 50257, (1, PROMPT), generator=g)
    prompt8 = torch.randint(0, 50257, (8, PROMPT), generator=g)
    long = torch.randint(0, 50257, (1, PREFILL), generator=g)
    for v in variants:  # warm-up (first calls allocate and pick kernels, or compile)
        t0 = time.perf_counter()
        v.generate(prompt1, 3)
        v.generate(prompt8, 2)
        v.startup = time.perf_counter() - t0
    for _ in range(rounds):
        for v in variants:
            v.time("b1_1", lambda: v.generate(prompt1, 1))
            v.time("b1_n", lambda: v.generate(prompt1, tokens))
            v.time("b8_1", lambda: v.generate(prompt8, 1))
            v.time("b8_n", lambda: v.generate(prompt8, tokens))
            v.time("prefill", lambda: v.generate(long, 1))
        bandwidth = max(bandwidth, read_bandwidth(3))  # the best seen during the run: the machine's, not the noise's
    print(f"read bandwidth (best during the run, all cores): {bandwidth / 1e9:.1f} GB/s")
    for v in variants:
        if not v.name.endswith("compiled"):  # a compiled variant holds the same weights (and compiles in a child)
            v.peak, v.baseline = peak_memory(v.name, threads, tokens)

    print(f"\n== {threads} thread(s), {tokens} new tokens, best of {rounds} rounds ==")
    print(f"{'variant':<18} {'b1 tok/s':>9} {'b8 tok/s':>9} {'prefill':>9} {'weights':>9} {'peak RSS':>9} "
          f"{'MB/token':>9} {'bound':>7} {'of bound':>8}")
    rates = {}
    for v in variants:
        b1 = (tokens - 1) / (v.best["b1_n"] - v.best["b1_1"])
        b8 = 8 * (tokens - 1) / (v.best["b8_n"] - v.best["b8_1"])
        prefill = PREFILL / v.best["prefill"]
        rates[v.name] = (b1, b8, prefill)
        bound = bandwidth / v.per_token if v.per_token else None
        print(f"{v.name:<18} {b1:>9.1f} {b8:>9.1f} {prefill:>9.0f} {v.weights / 2**20:>7.0f}MB "
              + (f"{v.peak / 2**20:>7.0f}MB " if v.peak else f"{'-':>9} ")
              + (f"{v.per_token / 1e6:>9.0f} {bound:>7.1f} {b1 / bound:>7.0%}" if bound else f"{'':>9} {'':>7} {'':>8}"))
    for v in variants:
        if v.name.endswith("compiled"):
            print(f"start-up of {v.name}: {v.startup:.1f} s (warm-up calls, compiling the batch-1 and batch-8 graphs)")
    hf = rates["transformers fp32"]
    print("ratios vs transformers fp32 (batch 1 / batch 8 / prefill):")
    for name, (b1, b8, prefill) in rates.items():
        if name != "transformers fp32":
            print(f"  {name:<10} {b1 / hf[0]:5.2f}x {b8 / hf[1]:5.2f}x {prefill / hf[2]:5.2f}x")
    fp32_bound = bandwidth / variants[0].per_token
    print(f"  bandwidth bound for fp32 batch 1: {fp32_bound / hf[0]:.2f}x transformers")
    print(f"peak RSS: a fresh process loading the variant and running batch-8 decode + prefill; Python + torch alone "
          f"is {variants[0].baseline / 2**20:.0f}MB of it")


def peak_memory(name: str, threads: int, tokens: int) -> tuple[int, int]:
    """(peak RSS while generating, RSS before loading) of a fresh process running variant `name`."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--memory-of", name, "--threads", str(threads), "--tokens", str(tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return data["peak"], data["baseline"]


def measure_memory(name: str, tokens: int) -> None:
    """Child process of `peak_memory`: load one variant, reset the peak, generate, print the peak as JSON."""
    import gc
    import json

    baseline = rss("VmRSS")
    from gpt2lab import GPT, GPTConfig

    torch.manual_seed(0)
    if name.startswith("transformers"):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config()).eval()

        def gen(idx, n):
            with torch.inference_mode():
                model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    else:
        from gpt2lab.generate import generate
        from gpt2lab.inference import prepare_for_inference

        model = GPT(GPTConfig.preset("gpt2")).eval()
        if not name.endswith("fresh"):  # "ours fp32 fresh" decodes the model as loaded
            model = prepare_for_inference(model, name.split()[-1])

        def gen(idx, n):
            generate(model, idx, n, temperature=0)
    gc.collect()
    release_freed_memory()
    reset_peak_rss()
    gen(torch.randint(0, 50257, (8, PROMPT)), tokens)
    gen(torch.randint(0, 50257, (1, PREFILL)), 1)
    print(json.dumps({"peak": rss("VmHWM"), "baseline": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts to measure (default 2,1)")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per decode measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="leave out the variants through torch.compile (their warm-up compiles for minutes)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak memory
    args = parser.parse_args()
    if args.memory_of:
        torch.set_num_threads(int(args.threads))
        return measure_memory(args.memory_of, args.tokens)
    import transformers

    from gpt2lab import native

    paths = ", ".join(sorted(native.kernel_paths())) or ("the AVX2 paths" if native.library() else "none")
    print(f"machine: {cpu_description()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"gpt2lab's native kernel: {paths}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth()
        run(threads, args.tokens, args.rounds, bandwidth, args.compiled)


if __name__ == "__main__":
    main()
