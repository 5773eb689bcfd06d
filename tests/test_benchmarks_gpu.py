"""benchmarks/gpu.py on a CPU: its command line, FLOP and MFU arithmetic, peak table lookup, goal lines, and the
one-line exit without a CUDA device. (What it measures needs a GPU; tests/test_cuda.py holds the GPU's tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2lab import GPTConfig
from gpt2lab.train import GPU_PEAK_BF16, flops_per_token

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu")


def test_defaults_are_the_issue_settings_and_fit_in_8_minutes(gpu):
    args = gpu.parse_args([])
    assert (args.batch, args.seq, args.preset, args.device, args.gen_batches) == (16, 1024, "gpt2", "cuda", [1, 8])
    assert args.tests_s + args.train_s + args.generate_s <= 8 * 60
    assert gpu.parse_args(["--gen-batches", "2,4", "--skip-tests", "--train-s", "400"]).gen_batches == [2, 4]
    child = gpu.parse_args(["--part", "train", "--result", "r.json", "--train-s", "470"])  # its parent's limit
    assert child.part == "train" and child.train_s == 470


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--gen-batches", "1,x"], ["--gen-batches", "0"],
                                  ["--seq", "2048"], ["--preset", "gpt3"], ["--train-s", "400"],
                                  ["--device", "tpu"]])
def test_bad_arguments_are_refused_with_a_usage_error(gpu, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
                                          ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165)])
def test_peak_is_looked_up_by_device_name_the_longest_name_winning(gpu, name, tflops):
    assert gpu.peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_an_unlisted_gpu_has_no_peak_and_no_mfu(gpu):
    assert gpu.peak_bf16_flops("Some Future GPU") is None
    assert gpu.mfu(1e6, 1e9, None) is None
    assert all(gpu.peak_bf16_flops(f"NVIDIA {key}") is not None for key in GPU_PEAK_BF16)


def test_mfu_of_gpt2_124m_by_hand(gpu):
    """GPT-2 small at T = 1024: 6 x (12·L·C² + V·C) + 12·L·C·T FLOPs a token; 400k tokens/s on an H100 is ~35%."""
    per_token = flops_per_token(GPTConfig.preset("gpt2"), 1024)
    L, C, V, T = 12, 768, 50257, 1024
    assert per_token == 6 * (12 * L * C * C + V * C) + 12 * L * C * T == 854_438_400
    share = gpu.mfu(400_000, per_token, gpu.peak_bf16_flops("NVIDIA H100 80GB HBM3"))
    assert share == pytest.approx(400_000 * 854_438_400 / 989e12) and 0.34 < share < 0.35


def test_decode_rate_counts_only_the_steps_after_the_first_token(gpu):
    assert gpu.decode_tokens_per_s(8, 101, seconds_n=1.5, seconds_1=0.5) == pytest.approx(800.0)


def test_goal_lines_say_met_not_met_or_not_measured(gpu):
    met = gpu.goal_lines({"ours_tok_s": 1.0, "ours_mfu": 0.55, "ratio": 1.4}, "NVIDIA H100 80GB HBM3")
    assert [line.split(": ")[1].split(" (")[0] for line in met] == ["met", "met"]
    missed = gpu.goal_lines({"ours_tok_s": 1.0, "ours_mfu": 0.45, "ratio": 1.1}, "NVIDIA A100-SXM4-80GB")
    assert all(": not met (" in line and "set for H100/H200; this is NVIDIA A100" in line for line in missed)
    unknown_peak = gpu.goal_lines({"ours_tok_s": 1.0, "ours_mfu": None, "ratio": 1.0}, "Some Future GPU")
    assert "not measured; this GPU's peak is not in" in unknown_peak[0] and "not met" in unknown_peak[1]
    assert all("not measured" in line for line in gpu.goal_lines(None, "NVIDIA H200"))


def test_a_half_written_or_missing_result_reads_as_none(gpu, tmp_path):
    (tmp_path / "half.json").write_text('{"stage": "compi')
    assert gpu.read_json(tmp_path / "half.json") == {} and gpu.read_json(tmp_path / "missing.json") == {}


def test_pytest_summary_is_the_counts_line(gpu):
    output = "sss.F\n=== FAILURES ===\nFAILED tests/test_cuda.py::test_x\n1 failed, 1 passed, 3 skipped in 2.0s\n"
    assert gpu.pytest_summary(output) == "1 failed, 1 passed, 3 skipped in 2.0s"
    assert gpu.pytest_summary("") == "no output"


def test_without_cuda_it_prints_one_line_and_exits_0(gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no CUDA device; ") and out.count("\n") == 1
