"""benchmarks/_machine.py: the machine as the benchmarks print it next to their figures (the CPU and its vector
flags, the read bandwidth that bounds a batch-1 decode step)."""

from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def machine():
    return load_benchmark("_machine")


def test_cpu_description_names_the_vector_flags(machine):
    info = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_bf16\n"
    text = machine.cpu_description(info)
    assert text.startswith("Some CPU (") and "avx2, fma, f16c, avx512f, avx512_bf16" in text
    assert "no AVX2" in machine.cpu_description("model name : Old\nflags : sse2\n")
    assert machine.cpu_description("").startswith("unknown CPU")


def test_cpu_description_reads_this_machine_by_default(machine, monkeypatch):
    monkeypatch.setattr(machine, "read_cpuinfo", lambda: "model name : Here\nflags : avx2 amx_tile\n")
    assert machine.cpu_description().startswith("Here (") and "avx2, amx_tile" in machine.cpu_description()


def test_read_bandwidth_is_bytes_per_second_and_restores_the_thread_count(machine):
    threads = torch.get_num_threads()
    bandwidth = machine.read_bandwidth(1)
    assert torch.get_num_threads() == threads
    assert 1e8 < bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s: a rate, not seconds or bytes


@pytest.mark.parametrize("name,uses", [("generate", ("cpu_description", "read_bandwidth")),
                                       ("llama_cpp", ("cpu_description", "read_bandwidth", "read_cpuinfo")),
                                       ("harness", ("cpu_description",)), ("kernel_paths", ("read_bandwidth",))])
def test_the_benchmarks_share_it(name, uses):
    module = load_benchmark(name)
    assert all(getattr(module, f).__module__ == "_machine" for f in uses), name
