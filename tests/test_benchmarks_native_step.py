"""benchmarks/native_step.py: it compares the native step with the flat step for each precision and batch size, on
the layers each is meant for. (The speed itself is measured, not tested.)"""

from __future__ import annotations

import sys

import pytest

from gpt2lab import native

from conftest import load_benchmark, run_benchmark_without_the_kernel


@pytest.mark.skipif(native.library() is None, reason=f"native kernel unavailable here: {native.unavailable_reason()}")
def test_the_benchmark_runs_every_precision_and_batch(monkeypatch, capsys):
    bench = load_benchmark("native_step")
    monkeypatch.setattr(sys, "argv", ["native_step.py", "--preset", "tiny", "--tokens", "2", "--rounds", "1",
                                      "--batches", "1,3", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert out.startswith("CPU flags: ")
    for batch in (1, 3):
        for dtype in ("fp32", "bf16", "int8", "int4"):
            assert f"batch {batch} {dtype}: native " in out
    assert "flat (Linear)" not in out  # the flat side runs the layers prepared without the native kernel


def test_without_the_kernel_it_says_why(monkeypatch, capsys):
    run_benchmark_without_the_kernel("native_step", monkeypatch)
    assert "unavailable here: no C++ compiler found" in capsys.readouterr().out
