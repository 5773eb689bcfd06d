"""Building and loading the native kernel: flags from the CPU's features, a cache keyed by what was built, clear
reasons where it cannot be had, and torch's own OpenMP runtime."""

from __future__ import annotations

import stat

import pytest
import torch

from gpt2lab import native
from gpt2lab.cpu import CPUFeatures

ZEN3 = CPUFeatures(avx2=True, fma=True, f16c=True)
AVX512 = dict(avx2=True, fma=True, f16c=True, avx512=True, avx512bw=True, avx512vl=True)
ZEN4 = CPUFeatures(**AVX512, avx512_bf16=True, vnni=True, avx512_vnni=True)
SKYLAKE_SP = CPUFeatures(**AVX512)  # AVX-512 without bf16 or VNNI dot products
CASCADE_LAKE = CPUFeatures(**AVX512, vnni=True, avx512_vnni=True)
XEON_PHI = CPUFeatures(avx2=True, fma=True, f16c=True, avx512=True)  # AVX-512 F without BW or VL
ALDER_LAKE = CPUFeatures(avx2=True, fma=True, f16c=True, vnni=True)  # AVX-VNNI, no AVX-512
OLD = CPUFeatures(avx2=False, fma=False, f16c=False)


def avx512_flags(features):
    return [f for f in native.compile_flags(features) if f.startswith("-mavx512")]


def test_flags_follow_the_cpu():
    for features in (ZEN3, ZEN4):
        flags = native.compile_flags(features)
        assert {"-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared"} <= set(flags)
    assert native.compile_flags(OLD) is None
    assert native.compile_flags(CPUFeatures(avx2=True, fma=True)) is None  # no F16C


def test_avx512_paths_are_built_only_for_the_instructions_the_cpu_has():
    assert avx512_flags(ZEN3) == avx512_flags(XEON_PHI) == avx512_flags(ALDER_LAKE) == []
    assert avx512_flags(SKYLAKE_SP) == ["-mavx512f", "-mavx512bw", "-mavx512vl"]
    assert avx512_flags(CASCADE_LAKE) == ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    assert avx512_flags(ZEN4) == ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"]


def test_emulated_paths_build_on_simde_whatever_the_cpu():
    flags = native.compile_flags(ZEN3, ("avx512", "avx512_vnni"), "/simde")
    assert "-I/simde" in flags and not any(f.startswith("-mavx512") for f in flags)
    assert {"-DGPT2LAB_EMULATE_AVX512", "-DGPT2LAB_EMULATE_AVX512_VNNI"} <= set(flags)
    assert "-DGPT2LAB_EMULATE_AVX512_BF16" not in flags
    assert native.compile_flags(OLD, ("avx512",), "/simde") is None  # the AVX2 base still needs the real CPU


def test_the_emulate_knob_names_paths_and_refuses_others():
    assert native.emulated_paths(None) == native.emulated_paths(" ") == ()
    assert native.emulated_paths("avx512_bf16") == ("avx512", "avx512_bf16")  # bf16 dot products are AVX-512's
    assert native.emulated_paths("avx512_vnni, avx512") == ("avx512", "avx512_vnni")
    with pytest.raises(ValueError, match="names 'amx'; choose from: avx512, avx512_bf16, avx512_vnni"):
        native.emulated_paths("avx512,amx")


def test_knobs_turn_avx512_off_or_name_what_is_wrong(monkeypatch):
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN4)
    assert "-mavx512bf16" in native.requested_flags()
    monkeypatch.setenv("GPT2LAB_NATIVE_AVX512", "0")
    assert native.requested_flags() == native.compile_flags(ZEN3)
    monkeypatch.setenv("GPT2LAB_NATIVE_EMULATE", "avx1024")
    assert native.requested_flags() == "GPT2LAB_NATIVE_EMULATE names 'avx1024'; choose from: avx512, avx512_bf16, " \
                                       "avx512_vnni"
    assert not native.buildable()
    monkeypatch.setenv("GPT2LAB_NATIVE_EMULATE", "avx512")
    monkeypatch.setattr(native, "simde_include", lambda: None)
    assert "pip install simde-py" in native.requested_flags()


def test_a_compiler_without_avx512_flags_still_builds_the_avx2_kernel(monkeypatch, tmp_path):
    """The AVX-512 flags are tried first; a compiler that refuses them (too old) builds the AVX2 kernel instead."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN4)
    log = tmp_path / "flags.log"
    cxx = fake_compiler(tmp_path, f'echo "$@" >> {log}\ncase "$*" in *-mavx512*) exit 1;; esac\n'
                                  'while [ "$1" != "-o" ]; do shift; done; echo built > "$2"\n')
    monkeypatch.setattr(native, "compiler", lambda: cxx)
    assert native._load() is None  # the fake's output is no library, but the second build was the AVX2 one
    tried = [line for line in log.read_text().splitlines() if line != "--version"]
    assert "-mavx512bf16" in tried[0] and len(tried) > 1 and not any("-mavx512" in t for t in tried[1:])


def test_the_cache_key_covers_source_flags_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    base = native.library_path("src", ["-O3"], "g++ 12")
    assert base.parent == tmp_path / "native" and base.suffix == ".so"
    assert native.library_path("src", ["-O3"], "g++ 12") == base
    assert len({base, native.library_path("src2", ["-O3"], "g++ 12"), native.library_path("src", ["-O2"], "g++ 12"),
                native.library_path("src", ["-O3"], "g++ 13")}) == 4


def fake_compiler(tmp_path, script: str) -> str:
    path = tmp_path / "fake-cxx"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failed_build_names_the_compiler_error_and_leaves_nothing(tmp_path):
    cxx = fake_compiler(tmp_path, "echo 'decode_step.cpp:1: error: no such intrinsic' >&2; exit 1\n")
    dest = tmp_path / "out" / "decode_step-x.so"
    with pytest.raises(RuntimeError, match="failed to build decode_step.cpp: .*no such intrinsic"):
        native.build(cxx, ["-O3"], dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no half-written library, no temp file


def test_build_writes_the_library_in_one_step(tmp_path):
    cxx = fake_compiler(tmp_path, 'while [ "$1" != "-o" ]; do shift; done; echo built > "$2"\n')
    dest = tmp_path / "out" / "decode_step-x.so"
    native.build(cxx, ["-O3"], dest)
    assert dest.read_text() == "built\n"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


@pytest.mark.parametrize("case,reason", [
    ("disabled", "GPT2LAB_NATIVE=0"),
    ("old cpu", "lacks AVX2, FMA or F16C"),
    ("no compiler", "no C++ compiler found"),
    ("broken compiler", "did not build or load"),
])
def test_each_reason_the_kernel_is_unavailable_is_said(monkeypatch, tmp_path, case, reason):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN3)
    if case == "disabled":
        monkeypatch.setenv("GPT2LAB_NATIVE", "0")
    elif case == "old cpu":
        monkeypatch.setattr(native, "cpu_features", lambda: OLD)
    elif case == "no compiler":
        monkeypatch.setattr(native, "compiler", lambda: None)
    else:
        monkeypatch.setattr(native, "compiler", lambda: fake_compiler(tmp_path, "exit 1\n"))
    assert native._load() is None
    assert reason in native.unavailable_reason()


def test_the_compiler_comes_from_cxx_first(monkeypatch, tmp_path):
    cxx = fake_compiler(tmp_path, "exit 0\n")
    monkeypatch.setenv("CXX", cxx)
    assert native.compiler() == cxx
    monkeypatch.setenv("CXX", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.compiler() is None


@pytest.mark.skipif(native.library() is None, reason=f"native kernel unavailable here: {native.unavailable_reason()}")
def test_the_kernel_shares_torchs_openmp_runtime():
    """torch.set_num_threads sets the thread count of the OpenMP runtime it loaded; the kernel sees the same value
    only if the loader gave it that runtime rather than a second copy."""
    lib = native.library()
    for n in (1, 3):  # conftest's autouse fixture restores torch's thread count after the test
        torch.set_num_threads(n)
        assert lib.gpt2lab_omp_max_threads() == n


def test_a_cached_library_that_does_not_load_is_built_again(monkeypatch, tmp_path):
    """A truncated file in the cache (a crash mid-copy, another system's build) is replaced, not trusted forever."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN3)
    cxx = fake_compiler(tmp_path, 'while [ "$1" != "-o" ]; do shift; done; echo rebuilt > "$2"\n')
    monkeypatch.setattr(native, "compiler", lambda: cxx)
    path = native.library_path(native.SOURCE.read_text(), native.compile_flags(ZEN3), native._compiler_version(cxx))
    path.parent.mkdir(parents=True)
    path.write_text("truncated")
    assert native._load() is None  # the fake compiler's output does not load either: a reason, no exception
    assert path.read_text() == "rebuilt\n"
    assert "did not build or load" in native.unavailable_reason()


def test_a_missing_source_file_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN3)
    monkeypatch.setattr(native, "SOURCE", tmp_path / "missing.cpp")
    assert native._load() is None
    assert "did not build or load" in native.unavailable_reason()


def test_an_avx512_build_the_cpu_does_not_run_falls_back_to_the_avx2_one(monkeypatch, tmp_path):
    """/proc/cpuinfo can claim what the CPU (or the OS) does not run: the library asks CPUID itself when it loads
    (`gpt2lab_cpu_ok`), and a build that fails that check, or does not build, gives way to the AVX2 build."""
    monkeypatch.setattr(native, "cpu_features", lambda: ZEN4)
    monkeypatch.setattr(native, "compiler", lambda: "c++")
    monkeypatch.setattr(native, "_compiler_version", lambda cxx: "c++ 12")
    monkeypatch.setattr(native, "_reason", None)  # _load sets both; monkeypatch puts them back afterwards
    monkeypatch.setattr(native, "_fallback", None)
    built = []

    def build_and_load(cxx, flags, version):
        built.append(flags)
        if "-mavx512f" in flags:
            raise native.WrongCPU("this CPU's CPUID does not report every instruction set the build was compiled for")
        return "avx2 library"

    monkeypatch.setattr(native, "_build_and_load", build_and_load)
    assert native._load() == "avx2 library"
    assert built == [native.compile_flags(ZEN4), native.compile_flags(ZEN3)]
    assert native.unavailable_reason() is None
    assert "the AVX2 kernel, since the AVX-512 build was not usable" in native.fallback_note()
    assert "CPUID does not report" in native.fallback_note()


@pytest.mark.skipif(native.library() is None, reason=f"native kernel unavailable here: {native.unavailable_reason()}")
def test_the_kernels_argmax_is_torchs():
    """First index of the largest value, ties included; -inf rows, vectors with a scalar tail; a NaN goes to torch."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 1003, generator=g)
    scores[1, 7] = scores[1, 900] = 50.0  # a tie: the first wins
    scores[2] = -float("inf")
    scores[3, 1002] = 60.0  # the largest in the tail after the last whole vector
    scores[4, :3] = torch.tensor([0.0, -0.0, 0.0])
    scores[4, 3:] = -1.0
    assert torch.equal(native.argmax_rows(scores), scores.argmax(dim=-1))
    assert native.argmax_rows(scores).tolist()[1:4] == [7, 0, 1002]
    with_nan = scores.clone()
    with_nan[0, 500] = float("nan")
    assert torch.equal(native.argmax_rows(with_nan), with_nan.argmax(dim=-1))
    lib = native.library()
    out = torch.empty(5, dtype=torch.long)
    assert lib.gpt2lab_argmax_rows(with_nan.data_ptr(), 5, 1003, out.data_ptr()) == 1  # the kernel declines
    assert torch.equal(native.argmax_rows(scores[:, ::2]), scores[:, ::2].argmax(dim=-1))  # not contiguous
