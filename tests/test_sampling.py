"""Sampling filters at their edges: a nucleus too small for float32, temperatures near 0, rows with nothing to sample.

Each filter must leave at least one token to draw; a row that has none is refused with a ValueError naming it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpt2lab.sampling import (REPETITION_PENALTY_RANGE, SamplingParams, apply_repetition_penalty, apply_temperature,
                              apply_top_p, choose_tokens, process_logits, sample_inverse_cdf)


@pytest.mark.parametrize("vocab", [100, 5000, 50257])  # the sort path, the 256-candidate path, the 4096 path
@pytest.mark.parametrize("p", [1e-50, 1e-300, 5e-324])
def test_top_p_below_float32_keeps_the_top_token(vocab, p):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 3
    out = apply_top_p(logits, p)
    kept = ~torch.isinf(out)
    assert kept.sum(dim=-1).tolist() == [1, 1, 1]
    assert torch.equal(kept.float().argmax(dim=-1), logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_a_temperature_near_zero_is_the_greedy_limit(temperature):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 5
    scaled = apply_temperature(logits, temperature)
    assert not torch.isnan(scaled).any()
    params = SamplingParams(temperature=temperature, top_p=0.9)
    tokens = choose_tokens(logits, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_ordinary_temperatures_are_a_plain_division():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(apply_temperature(logits, 0.7), logits / 0.7)
    assert torch.equal(process_logits(logits, SamplingParams(temperature=1.5)), logits / 1.5)


def test_a_row_with_nothing_to_sample_is_refused_by_name():
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.1]])
    with pytest.raises(ValueError, match="row 1 has no token to sample"):
        sample_inverse_cdf(probs, torch.tensor([0.3, 0.3], dtype=torch.float64))


def test_cli_generate_with_a_tiny_top_p_prints_text(tiny_model, tmp_path):
    from gpt2lab.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(c) for c in range(32, 32 + 96)])
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    proc = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "generate", "--model", str(tmp_path / "m"),
                           "--prompt", "ab", "--max-new-tokens", "5", "--top-p", "1e-50", "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.startswith("ab")


@pytest.mark.parametrize("penalty", REPETITION_PENALTY_RANGE)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-30])
def test_the_penalty_bounds_keep_a_row_of_seen_tokens_sampleable(penalty, temperature):
    logits = torch.tensor([[-900.0, -5.0, -1.0], [900.0, 5.0, 1.0]])
    seen = torch.ones_like(logits, dtype=torch.bool)
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
    probs = torch.softmax(process_logits(logits, params, seen), dim=-1)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    if temperature < 1:
        assert choose_tokens(logits, params, seen).tolist() == [2, 0]


@pytest.mark.parametrize("penalty", [1e300, 1e-300])
def test_past_the_penalty_bounds_logits_overflow(penalty):
    logits = torch.tensor([[-900.0, -5.0, -1.0], [900.0, 5.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.ones_like(logits, dtype=torch.bool), penalty)
    assert not torch.isfinite(out).all()  # one row overflows to +-inf, the other collapses to 0: why they are refused


@pytest.mark.parametrize("penalty", [0.005, 1e5, float("nan"), float("inf")])
def test_sampling_params_refuse_a_penalty_outside_its_range(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)
