"""What the CPU reports, and the thread count chosen from the load, checked with made-up /proc files."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import cpu
from gpt2lab.cpu import CPUFeatures

# flags as three machine types report them (abridged /proc/cpuinfo lines)
ZEN3 = "fpu sse2 avx f16c fma avx2 bmi2"
ZEN4 = ZEN3 + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = ZEN4 + " amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("flags, name, native_bf16", [
    (ZEN3, "AVX2", False),
    (ZEN4, "AVX-512 + BF16 + VNNI", True),
    (SAPPHIRE_RAPIDS, "AVX-512 + BF16 + VNNI + AMX", True),
    ("fpu sse2", "baseline", False),
    ("avx2 fma avx_vnni", "AVX2 + VNNI", False),
])
def test_features_from_flags(flags, name, native_bf16):
    features = CPUFeatures.from_flags(flags.split())
    assert features.name == name
    assert features.native_bf16 is native_bf16


@pytest.mark.parametrize("flags, vnni, avx512_vnni", [
    (ZEN3, False, False),
    (ZEN4, True, True),
    (SAPPHIRE_RAPIDS, True, True),
    ("avx2 fma avx_vnni", True, False),  # AVX-VNNI without AVX-512 (an Alder Lake)
])
def test_vnni_of_either_width_and_the_512_bit_one(flags, vnni, avx512_vnni):
    features = CPUFeatures.from_flags(flags.split())
    assert (features.vnni, features.avx512_vnni) == (vnni, avx512_vnni)


@pytest.mark.parametrize("flags, kernels", [
    (ZEN3, False),
    (ZEN4, True),
    (SAPPHIRE_RAPIDS, True),
    ("avx2 fma f16c avx512f avx512cd avx512er avx512pf", False),  # a Xeon Phi: AVX-512 F without BW or VL
])
def test_the_native_kernels_avx512_paths_need_f_bw_and_vl(flags, kernels):
    assert CPUFeatures.from_flags(flags.split()).avx512_kernels is kernels


def test_flags_are_parsed_from_cpuinfo_text():
    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu AVX2 fma avx512_vnni\n\nprocessor\t: 1\n"
    assert cpu.parse_cpu_flags(text) == {"fpu", "avx2", "fma", "avx512_vnni"}
    assert cpu.parse_cpu_flags("Features\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}  # ARM's name for them
    assert cpu.parse_cpu_flags("") == frozenset()


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {ZEN4}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_flags(info) == frozenset(ZEN4.split())
    assert cpu.cpu_features(info).avx512_bf16
    assert cpu.cpu_flags(tmp_path / "missing") is None


def test_cpu_features_fall_back_to_torchs_dispatch_level(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    features = cpu.cpu_features(tmp_path / "no-cpuinfo-here")
    assert features.avx512 and features.avx2 and not features.avx512_bf16


def test_this_cpu_reports_what_torch_dispatches_to():
    level = torch.backends.cpu.get_cpu_capability()
    features = cpu.cpu_features()
    if level.startswith("AVX512"):
        assert features.avx512
    if level.startswith("AVX2"):
        assert features.avx2


@pytest.mark.parametrize("cpus, busy, threads", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (8, 2.2, 6), (8, None, 8), (1, 0.0, 1),
])
def test_pick_threads_uses_the_cpus_others_leave_idle(cpus, busy, threads):
    assert cpu.pick_threads(cpus, busy) == threads


def _stat_line(user, nice, system, idle):
    return f"cpu  {user} {nice} {system} {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n"


def test_busy_cpus_counts_other_programs_but_not_niced_ones(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)

    def measure(before, after):
        stat.write_text(_stat_line(*before))
        monkeypatch.setattr(cpu.time, "sleep", lambda s: stat.write_text(_stat_line(*after)))
        return cpu.busy_cpus(0.1, stat)

    # 200 jiffies pass (2 CPUs x 100): one CPU busy with user + system time, the other idle
    assert measure((0, 0, 0, 0), (80, 0, 20, 100)) == pytest.approx(1.0)
    # the same, but the busy program is niced: it yields its core, so nothing counts as busy
    assert measure((0, 0, 0, 0), (0, 100, 0, 100)) == pytest.approx(0.0)
    assert measure((5, 0, 0, 5), (5, 0, 0, 5)) is None  # no time passed
    assert cpu.busy_cpus(0.0, tmp_path / "missing") is None


def test_decode_threads_never_exceed_torchs_default(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cpus", lambda window: 0.0)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 64)
    monkeypatch.setattr(cpu, "TORCH_THREADS", 4)
    assert cpu.decode_threads() == 4
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 3)  # e.g. taskset -c 0-2
    assert cpu.decode_threads() == 3
    monkeypatch.setattr(cpu, "busy_cpus", lambda window: 2.0)
    assert cpu.decode_threads() == 1


def test_default_threads_leave_a_busy_core_to_the_tuner_where_decoding_adapts(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cpus", lambda window: 1.0)  # another program keeps one of our two CPUs busy
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu, "TORCH_THREADS", 2)
    assert cpu.default_threads(decode_adapts=True) == 2  # the tuner takes one while the load lasts, two after
    assert cpu.default_threads(decode_adapts=False) == 1  # a fixed count: the idle cores now
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 64)
    assert cpu.default_threads(decode_adapts=True) == 2  # never above torch's default


def test_the_cli_uses_the_default_threads_unless_given_a_count(monkeypatch):
    from gpt2lab import native_step
    from gpt2lab.cli.args import set_threads

    seen = []
    monkeypatch.setattr(cpu, "default_threads", lambda adapts, window=0.1: seen.append(adapts) or 1)
    monkeypatch.setattr(native_step, "threads_adapt", lambda: True)
    set_threads(None)  # conftest's autouse fixture restores torch's thread count after the test
    assert torch.get_num_threads() == 1 and seen == [True]
    set_threads(2)
    assert torch.get_num_threads() == 2 and seen == [True]  # a given count always wins


def test_load_meter_counts_other_programs_on_our_cpus_less_our_own_time(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(cpu.os, "getpriority", lambda which, who: 0)  # not niced (whatever runs the tests)
    clock, own = [0.0], [0.0]

    def lines(cpu0, cpu1, cpu2):  # (user, nice, system, idle) jiffies of each CPU; cpu2 is not ours
        return "cpu  0 0 0 0\n" + "".join(f"cpu{i} {u} {n} {s} {d} 0 0 0 0\n"
                                          for i, (u, n, s, d) in enumerate((cpu0, cpu1, cpu2)))

    stat.write_text(lines((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)))
    meter = cpu.LoadMeter(interval=0.25, stat=stat, clock=lambda: clock[0], own=lambda: own[0])
    assert meter.available and meter.others() is None  # no interval has passed
    # one second: both our CPUs fully busy (200 jiffies), 1.0 CPU-seconds of it ours; CPU 2 busy too (not ours)
    clock[0], own[0] = 1.0, 1.0
    stat.write_text(lines((100, 0, 0, 0), (90, 0, 10, 0), (100, 0, 0, 0)))
    assert meter.others() == pytest.approx(1.0)
    clock[0] = 1.1  # within the interval: the last reading, the file is not read
    stat.write_text("garbage")
    assert meter.others() == pytest.approx(1.0)
    # the next second the other program is niced: its time counts as idle
    clock[0], own[0] = 2.0, 1.9
    stat.write_text(lines((190, 0, 0, 0), (90, 100, 10, 0), (200, 0, 0, 0)))
    assert meter.others() == pytest.approx(0.0)
    # a niced program of our own: our time is in the nice column, so that column counts as busy
    monkeypatch.setattr(cpu.os, "getpriority", lambda which, who: 10)
    clock[0], own[0] = 0.0, 0.0
    stat.write_text(lines((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)))
    niced = cpu.LoadMeter(interval=0.25, stat=stat, clock=lambda: clock[0], own=lambda: own[0])
    clock[0], own[0] = 1.0, 1.0
    stat.write_text(lines((0, 100, 0, 0), (100, 0, 0, 0), (0, 0, 0, 0)))  # ours niced on CPU 0, another on CPU 1
    assert niced.others() == pytest.approx(1.0)
    assert not cpu.LoadMeter(stat=tmp_path / "missing").available
    assert cpu.LoadMeter(stat=tmp_path / "missing").others() is None
