"""benchmarks/kernel_paths.py: it compares the kernel's AVX-512 build with its AVX2 build for every precision and
batch size, and says why where there is nothing to compare. (The speed itself is measured, not tested.)"""

from __future__ import annotations

import re
import sys

import pytest

from gpt2lab import native
from gpt2lab.cpu import CPUFeatures

from conftest import load_benchmark, run_benchmark_without_the_kernel


@pytest.mark.skipif(native.library() is None or native.simde_include() is None,
                    reason="needs the native kernel and SIMDe's headers (pip install simde-py)")
def test_the_benchmark_runs_both_builds_for_every_precision_and_batch(monkeypatch, capsys):
    bench = load_benchmark("kernel_paths")
    monkeypatch.setattr(sys, "argv", ["kernel_paths.py", "--emulate", "--preset", "tiny", "--tokens", "2",
                                      "--rounds", "1", "--batches", "1,4", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert out.startswith("CPU flags: ") and "wide build: avx512, avx512_bf16, avx512_vnni, emulated" in out
    for batch in (1, 4):
        for dtype in bench.DTYPES:
            assert f"batch {batch} {dtype}: wide " in out
    apart = {line.split(":")[0]: float(re.search(r"logits apart (\S+)", line).group(1))
             for line in out.splitlines() if "apart" in line}
    assert all(re.search(r"of bound: wide \d+%, AVX2 \d+%", line) for line in out.splitlines() if "apart" in line)
    assert apart["batch 1 fp32"] == apart["batch 1 int8"] == apart["batch 1 int4"] == 0.0  # the same arithmetic
    assert 0.0 < apart["batch 1 bf16"] < 0.05  # bf16 activations on the wide build, float32 ones on AVX2


def test_on_a_cpu_without_avx512_it_says_so(monkeypatch, capsys):
    bench = load_benchmark("kernel_paths")
    monkeypatch.setattr(bench, "cpu_features", lambda: CPUFeatures(avx2=True, fma=True, f16c=True))
    monkeypatch.setattr(native, "library", lambda: object())
    monkeypatch.setattr(sys, "argv", ["kernel_paths.py"])
    bench.main()
    assert "has no AVX-512 F/BW/VL: the kernel has only its AVX2 paths here" in capsys.readouterr().out


def test_without_the_kernel_it_says_why(monkeypatch, capsys):
    run_benchmark_without_the_kernel("kernel_paths", monkeypatch)
    assert "unavailable here: no C++ compiler found" in capsys.readouterr().out


def test_an_avx512_build_that_does_not_load_is_a_line_not_a_crash(monkeypatch, capsys):
    bench = load_benchmark("kernel_paths")
    monkeypatch.setattr(bench, "wide_flags", lambda emulate: ["-mavx512f"])
    monkeypatch.setattr(native, "library", lambda: object())
    monkeypatch.setattr(native, "load_build", lambda flags: (_ for _ in ()).throw(native.WrongCPU("no AVX-512 here")))
    monkeypatch.setattr(sys, "argv", ["kernel_paths.py"])
    bench.main()
    assert "the AVX-512 build is not usable here: no AVX-512 here" in capsys.readouterr().out
