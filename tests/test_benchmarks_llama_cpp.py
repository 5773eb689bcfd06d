"""benchmarks/llama_cpp.py without llama.cpp: its pure helpers, and the one-line skip when llama_cpp or the GGUF
converter is missing (the benchmark itself needs a llama-cpp-python build and is run by hand)."""

from __future__ import annotations

import ctypes
import doctest
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_cpp.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("llama_cpp")


def test_docstring_examples(bench):
    result = doctest.testmod(bench)
    assert result.attempted >= 4 and result.failed == 0


def test_arguments_defaults_and_overrides(bench):
    args = bench.parse_args([])
    assert (args.preset, args.threads, args.rounds, args.repeats, args.converter) == ("gpt2", 2, 2, 3, None)
    assert args.batches == (1, 8) and args.context == bench.PROMPT == 16
    args = bench.parse_args(["--threads", "1", "--preset", "mini", "--converter", "c.py", "--train-seconds", "0",
                             "--batches", "4", "--context", "768"])
    assert (args.threads, args.preset, args.converter, args.train_seconds) == (1, "mini", Path("c.py"), 0.0)
    assert args.batches == (4,) and args.context == 768


@pytest.mark.parametrize("value", ["0", "1,,8", "eight", "1,-2"])
def test_batches_must_be_positive_counts(bench, value, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--batches", value])
    assert exc.value.code == 2 and f"comma-separated positive integers such as 1,8, got {value!r}" in \
        capsys.readouterr().err


def test_a_batch_rate_counts_every_row(bench):
    calls = []

    def generate(prompts, n):
        calls.append((len(prompts), n))
        time.sleep(0.001 * n)
        return [[0] * n for _ in prompts]

    variant = bench.Variant("x", generate)
    rate = variant.measure([[1, 2], [3, 4], [5, 6]], repeats=1)
    assert calls == [(3, 1), (3, bench.TOKENS)]
    assert rate == pytest.approx(3 * (bench.TOKENS - 1) / (0.001 * (bench.TOKENS - 1)), rel=0.5)


class FakeLlamaCpp:
    """llama.cpp's C API as LlamaBatch calls it, over a made-up model whose next token is always (token + row + 1)
    mod V, so each row's greedy continuation is known; it records every decode's (token, pos, row, logits)."""

    V = 50

    def __init__(self):
        self.decodes, self.logits = [], None
        self.llama_log_callback = lambda fn: fn
        self.llama_log_set = lambda callback, data: None

    def llama_model_load_from_file(self, path, params):
        return "model"

    llama_model_default_params = llama_context_default_params = staticmethod(lambda: types.SimpleNamespace())
    llama_model_get_vocab = staticmethod(lambda model: "vocab")
    llama_get_memory = staticmethod(lambda ctx: "memory")

    def llama_init_from_model(self, model, params):
        self.params = params
        return "ctx"

    def llama_vocab_n_tokens(self, vocab):
        return self.V

    def llama_batch_init(self, n, embd, seqs):
        return types.SimpleNamespace(n_tokens=0, token=[0] * n, pos=[0] * n, n_seq_id=[0] * n, logits=[0] * n,
                                     seq_id=[[0] for _ in range(n)])

    def llama_memory_clear(self, memory, data):
        self.decodes.append("clear")

    def llama_decode(self, ctx, b):
        entries = [(b.token[i], b.pos[i], b.seq_id[i][0], bool(b.logits[i])) for i in range(b.n_tokens)]
        self.decodes.append(entries)
        self.logits = (ctypes.c_float * (self.V * b.n_tokens))()
        for i, (token, _, row, _) in enumerate(entries):
            self.logits[i * self.V + (token + row + 1) % self.V] = 1.0
        return 0

    def llama_get_logits_ith(self, ctx, i):
        return ctypes.cast(ctypes.byref(self.logits, 4 * self.V * i), ctypes.POINTER(ctypes.c_float))

    def llama_batch_free(self, b):
        pass

    def llama_free(self, ctx):
        pass

    def llama_model_free(self, model):
        pass


def test_llama_cpp_batches_hold_each_row_as_its_own_sequence(bench, tmp_path):
    fake = FakeLlamaCpp()
    batched = bench.LlamaBatch(fake, tmp_path / "m.gguf", threads=2, rows=2)
    assert (fake.params.n_seq_max, fake.params.n_ctx, fake.params.n_threads) == (2, 2 * (bench.PROMPT + bench.TOKENS), 2)
    out = batched.generate([[3, 4, 5], [7, 8, 9]], 3)
    assert out == [[6, 7, 8], [11, 13, 15]]  # row r: next = token + r + 1
    clear, prompt, *steps = fake.decodes
    assert clear == "clear"
    assert prompt == [(3, 0, 0, False), (4, 1, 0, False), (5, 2, 0, True), (7, 0, 1, False), (8, 1, 1, False),
                      (9, 2, 1, True)]  # each row from position 0, logits only where the prompt ends
    assert steps == [[(6, 3, 0, True), (11, 3, 1, True)], [(7, 4, 0, True), (13, 4, 1, True)]]
    bench.LlamaBatch(fake, tmp_path / "m.gguf", threads=2, rows=3, prompt=700)  # --context: room for 700 + 128
    assert (fake.params.n_ctx, fake.params.n_batch, fake.params.n_ubatch) == (3 * (700 + bench.TOKENS), 3 * 700, 512)


def test_one_row_of_llama_cpp_gets_room_for_the_context(bench, tmp_path):
    made = {}

    class Llama:
        def __init__(self, path, **kwargs):
            made.update(kwargs)

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    variant = bench.llama_variant("llama.cpp f32", types.SimpleNamespace(Llama=Llama), gguf, 2, 1, prompt=700)
    assert (made["n_ctx"], made["n_batch"], variant.weight_bytes) == (700 + bench.TOKENS, 700 + bench.TOKENS, 4)


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--repeats", "--context"])
def test_arguments_refuse_counts_below_one(bench, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args([flag, "0"])
    assert exc.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_decode_rate_counts_steps_after_the_first_token(bench):
    assert bench.decode_rate(1.0, 3.0, 129) == pytest.approx(64.0)
    with pytest.raises(ValueError, match="no longer than one token"):
        bench.decode_rate(2.0, 2.0, 128)


def test_agreement_stops_counting_at_the_first_difference(bench):
    assert bench.identical_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert bench.identical_prefix([4, 2, 3], [1, 2, 3]) == 0
    assert bench.agreement([([1, 2, 3, 4], [1, 2, 9, 4])]) == 0.5
    assert bench.agreement([([1, 2], [1, 2]), ([3, 4], [3, 4])]) == 1.0


def test_span_formats_a_range_or_one_value(bench):
    assert bench.span([3.0, 1.04, 2.0]) == "1.0-3.0"
    assert bench.span([1.234, 1.236], "{:.2f}x") == "1.23-1.24x"
    assert bench.span([0.5], "{:.2f}x") == "0.50x"


def _run_with_fake_llama_cpp(tmp_path: Path, init: str, *args: str) -> subprocess.CompletedProcess:
    """Run the script with a `llama_cpp` package of our own first on the path, standing in for a missing or broken
    build (`init` is its __init__.py) whatever is installed."""
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_skips_with_the_build_command_when_llama_cpp_is_missing(tmp_path):
    done = _run_with_fake_llama_cpp(tmp_path, "raise ImportError('no llama.cpp library here')\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipped: llama_cpp is not importable")
    assert "no llama.cpp library here" in lines[0]
    here = bench_flags_of_this_cpu()
    assert f'CMAKE_ARGS="{here}"' in lines[0] and here.startswith("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON")


def bench_flags_of_this_cpu() -> str:
    bench = load_benchmark("llama_cpp")
    return bench.cmake_args(bench.parse_cpu_flags(bench.read_cpuinfo()))


ZEN4_FLAGS = {"sse2", "sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx512f", "avx512cd", "avx512dq", "avx512bw",
              "avx512vl", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bf16"}  # as /proc/cpuinfo spells them
AVX2_BUILD = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | OPENMP = 1 | "


def test_cmake_args_name_each_extension_the_cpu_has(bench):
    baseline = ("-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON "
                "-DGGML_F16C=ON")
    assert bench.cmake_args(set()) == baseline + " -DGGML_OPENMP=ON"  # unreadable flags: the AVX2 baseline
    phi = {"avx512f", "avx512cd", "avx512_vnni"}  # AVX-512F without BW/VL/DQ: GGML_AVX512's -mavx512bw would SIGILL
    assert bench.cmake_args(phi) == baseline + " -DGGML_OPENMP=ON"
    zen4 = bench.cmake_args(ZEN4_FLAGS).split()
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"} <= set(zen4)
    assert not any("AMX" in a or "AVX_VNNI" in a for a in zen4)
    sapphire = bench.cmake_args(ZEN4_FLAGS | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})
    assert all(f"-D{o}=ON" in sapphire for o in ("GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))


def test_a_build_without_the_cpus_extensions_is_named(bench):
    assert bench.missing_from_build(ZEN4_FLAGS, AVX2_BUILD) == ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
    assert bench.missing_from_build(ZEN4_FLAGS, AVX2_BUILD.replace("BMI2 = 1 | ", "")) == [
        "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
    full = AVX2_BUILD + "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | "
    assert bench.missing_from_build(ZEN4_FLAGS, full) == []
    assert bench.missing_from_build({"avx2", "fma", "f16c"}, AVX2_BUILD) == []
    assert bench.missing_from_build({"avx2", "amx_tile", "amx_int8"}, AVX2_BUILD) == ["AMX_INT8"]


def test_refuses_to_time_a_build_that_leaves_out_the_cpus_extensions(bench, monkeypatch, tmp_path, capsys):
    """On an AVX-512 CPU an AVX2 build of llama.cpp would make gpt2lab look better than it is: refused before any
    work, with the CMAKE_ARGS to rebuild, unless --any-build."""
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("")
    fake = types.SimpleNamespace(llama_print_system_info=lambda: AVX2_BUILD.encode())
    monkeypatch.setattr(bench, "read_cpuinfo", lambda: "model name : Zen 4\nflags : " + " ".join(ZEN4_FLAGS) + "\n")
    monkeypatch.setattr(bench, "import_llama_cpp", lambda: fake)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--converter", str(converter)])
    message = str(stop.value.code)
    assert message.startswith("error: this llama.cpp build leaves out AVX512, AVX512_VBMI, AVX512_VNNI, AVX512_BF16")
    assert bench.cmake_args(ZEN4_FLAGS) in message and "--any-build" in message and "\n" not in message

    class Started(Exception):
        pass

    def stop_at_torch(*args):  # --any-build goes on to the timed work: stop where it would start
        raise Started

    monkeypatch.setattr(bench, "cpu_description", stop_at_torch)
    import torch

    threads = torch.get_num_threads()  # main sets the benchmark's count before it gets there
    try:
        with pytest.raises(Started):
            bench.main(["--converter", str(converter), "--any-build"])
    finally:
        torch.set_num_threads(threads)


def exit_message_of_main(bench, monkeypatch, tmp_path, args: list[str]) -> str:
    """What `main(args)` exits with on an AVX2 machine whose llama.cpp build matches, before any file is made."""
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("")
    fake = types.SimpleNamespace(llama_print_system_info=lambda: AVX2_BUILD.encode())
    monkeypatch.setattr(bench, "read_cpuinfo", lambda: "flags : avx2 fma f16c\n")
    monkeypatch.setattr(bench, "import_llama_cpp", lambda: fake)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--converter", str(converter), *args])
    return str(stop.value.code)


@pytest.mark.parametrize("preset, expected", [("nope", "error: unknown preset 'nope'; choose one of: gpt2, "),
                                              ("mini", "error: --preset 'mini' holds 256 positions; the "
                                                       "benchmark needs 1016")])
def test_a_bad_preset_is_one_line_before_any_work(bench, monkeypatch, tmp_path, preset, expected):
    monkeypatch.setattr(bench, "TOKENS", 1000)  # every preset holds the default 144 positions
    message = exit_message_of_main(bench, monkeypatch, tmp_path, ["--preset", preset])
    assert message.startswith(expected) and "\n" not in message


def test_a_context_longer_than_the_preset_holds_is_one_line_before_any_work(bench, monkeypatch, tmp_path):
    message = exit_message_of_main(bench, monkeypatch, tmp_path, ["--preset", "mini", "--context", "200"])
    assert message == ("error: --preset 'mini' holds 256 positions; the benchmark needs 328 (200 prompt + 128 new "
                       "tokens)")


def test_cmake_args_option_prints_this_cpus_build_flags():
    done = subprocess.run([sys.executable, str(SCRIPT), "--cmake-args"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [bench_flags_of_this_cpu()]


def test_skips_when_the_converter_is_missing(tmp_path):
    done = _run_with_fake_llama_cpp(tmp_path, "__version__ = '0'\n", "--converter", str(tmp_path / "nope.py"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "nope.py is not a file" in lines[0] and "convert_hf_to_gguf.py" in lines[0]


def test_rounds_rotate_the_pairs_and_keep_each_pair_together(bench):
    names = ["generate", "fp32", "f32", "bf16", "f16", "int8", "q8_0"]
    variants = [bench.Variant(n, None) for n in names]
    orders = [[v.name for v in bench.rotate_pairs(variants, r)] for r in range(4)]
    assert orders[0] == names
    assert orders[1] == ["fp32", "f32", "bf16", "f16", "int8", "q8_0", "generate"]
    assert orders[3] == ["int8", "q8_0", "generate", "fp32", "f32", "bf16", "f16"]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert len({o[0] for o in orders}) == 4  # each group leads once in four rounds


def test_the_kernel_description_names_the_build_or_why_there_is_none(bench):
    fake = types.SimpleNamespace(library=lambda: None, unavailable_reason=lambda: "no C++ compiler found")
    assert bench.kernel_description(fake) == "unavailable (no C++ compiler found): gpt2lab decodes through PyTorch"
    fake = types.SimpleNamespace(library=lambda: object(), kernel_paths=lambda: frozenset({"avx512_vnni", "avx512"}),
                                 fallback_note=lambda: None)
    assert bench.kernel_description(fake) == "avx512, avx512_vnni"
    fake.kernel_paths = lambda: frozenset()
    assert bench.kernel_description(fake) == "the AVX2 paths"


def test_prefill_lengths_default_to_those_the_preset_holds(bench, monkeypatch, tmp_path, capsys):
    args = bench.parse_args([])
    assert args.prefill is None and not args.no_prefill
    assert bench.parse_args(["--prefill", "32,128"]).prefill == (32, 128)
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text("")
    fake = types.SimpleNamespace(llama_print_system_info=lambda: AVX2_BUILD.encode())
    monkeypatch.setattr(bench, "read_cpuinfo", lambda: "flags : avx2 fma f16c\n")
    monkeypatch.setattr(bench, "import_llama_cpp", lambda: fake)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stop:  # before any work: no file is made
            bench.main(["--converter", str(converter), "--preset", "mini", "--prefill", "16,300"])
    finally:
        torch.set_num_threads(threads)
    assert stop.value.code == "error: --prefill 300 is longer than mini's 256 positions"
    assert [f.name for f in tmp_path.iterdir()] == ["convert_hf_to_gguf.py"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--prefill", "16,0"])
    assert "comma-separated prompt lengths such as 16,64,512, got '16,0'" in capsys.readouterr().err


class FakeSide:
    """A model's `generate` or llama.cpp's `reset` + `eval`, recording the prompt lengths it encodes."""

    def __init__(self):
        self.lengths = []

    def generate(self, prompt, n, temperature):
        assert n == 1 and temperature == 0 and prompt.shape[0] == 1
        self.lengths.append(prompt.shape[1])

    def reset(self):
        self.lengths.append("reset")

    def eval(self, tokens):
        assert all(isinstance(t, int) for t in tokens)
        self.lengths.append(len(tokens))


def test_prefill_times_each_length_on_both_sides_from_an_empty_cache(bench, capsys):
    ours = {name: FakeSide() for name, _ in bench.PAIRS}
    theirs = {name: FakeSide() for _, name in bench.PAIRS}
    table = bench.run_prefill(ours, theirs, (4, 9), rounds=2, repeats=3)
    assert sorted(table) == [4, 9] and all(len(rates) == 2 for rates in table[4].values())
    for side in ours.values():  # warm-up at the longest, then 3 repeats per length and round
        assert side.lengths == [9] + [4] * 6 + [9] * 6
    for side in theirs.values():  # llama.cpp's cache is reset before every encoding
        assert side.lengths == ["reset", 9] + ["reset", 4] * 6 + ["reset", 9] * 6
    out = capsys.readouterr().out
    assert "prompt encoding (prefill)" in out and out.count("tokens: gpt2lab") == 2 * len(bench.PAIRS)
