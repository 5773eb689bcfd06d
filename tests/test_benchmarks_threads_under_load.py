"""benchmarks/threads_under_load.py: it runs the three ways (one thread, all fixed, tuned) beside busy programs and
leaves none of them running. (The speed itself is measured, not tested.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpt2lab import native

from conftest import load_benchmark, run_benchmark_without_the_kernel


@pytest.mark.skipif(native.library() is None, reason=f"native kernel unavailable here: {native.unavailable_reason()}")
def test_the_benchmark_runs_each_way_beside_busy_programs_and_stops_them(monkeypatch, capsys):
    bench = load_benchmark("threads_under_load")
    started = []
    real_popen = subprocess.Popen

    def popen(*a, **kw):
        started.append(real_popen(*a, **kw))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(sys, "argv", ["threads_under_load.py", "--preset", "tiny", "--tokens", "4", "--rounds", "1",
                                      "--busy", "0,1", "--dtypes", "fp32,int8", "--spin-us", "0,20"])
    before = torch.get_num_threads()
    bench.main()
    assert torch.get_num_threads() == before
    out = capsys.readouterr().out
    assert out.startswith("CPU flags: ")
    for busy in (0, 1):
        for spin in ("0", "20"):
            for dtype in ("fp32", "int8"):
                assert f"busy {busy} " in out and f"spin {spin} us {dtype}: 1 thread " in out
    assert "tuned / best fixed" in out
    assert len(started) == 1 and all(p.poll() is not None for p in started)  # the busy program was stopped


def test_without_the_kernel_it_says_why(monkeypatch, capsys):
    run_benchmark_without_the_kernel("threads_under_load", monkeypatch)
    assert "unavailable here: no C++ compiler found" in capsys.readouterr().out
