"""Evaluation: the sliding-window loss equals the same computation with transformers on the same weights, and the
Hugging Face perplexity guide's own loop where the two definitions coincide (stride = context)."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.evaluate import evaluate_ids, evaluate_text, sliding_windows, token_byte_lengths, token_nll

CFG = GPTConfig(vocab_size=257, n_ctx=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(CFG).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(5.0)
    d = tmp_path_factory.mktemp("m") / "model"
    ours.save_pretrained(d)
    return ours, GPT2LMHeadModel.from_pretrained(d).eval()


def hf_sliding_nll(hf, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Per-token sliding window with transformers: every token after the first scored once, from its window."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), stride):
            end = min(begin + context, ids.numel())
            first = max(prev_end, begin + 1)
            logits = hf(ids[None, begin:end]).logits[0]  # (W, V)
            targets = ids[first:end]
            total += F.cross_entropy(logits[first - begin - 1:end - begin - 1], targets, reduction="sum").item()
            count += targets.numel()
            prev_end = end
            if end == ids.numel():
                break
    return total, count


def hf_guide_perplexity(hf, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of Hugging Face's perplexity guide, verbatim in substance (labels=-100 masking, mean loss per window
    weighted by valid labels minus the batch size)."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    with torch.no_grad():
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = ids[None, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = hf(input_ids, labels=target_ids).loss
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
            nll_sum += loss.item() * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return math.exp(nll_sum / n_tokens)


def test_sliding_windows_score_every_token_once():
    for n, ctx, stride in [(10, 6, 3), (100, 32, 7), (32, 32, 32), (5, 32, 16), (64, 32, 32), (65, 32, 1)]:
        windows = sliding_windows(n, ctx, stride)
        scored = [t for w in windows for t in range(w.first_target, w.end)]
        assert len(scored) == len(set(scored))
        assert all(w.end - w.begin <= ctx and w.first_target > w.begin for w in windows)
        if stride < ctx:
            assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 6, 7)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 6, 0)


@pytest.mark.parametrize("stride", [1, 5, 16, 31, 32])
def test_loss_equals_transformers(models, stride):
    ours, hf = models
    ids = torch.randint(0, 257, (150,), generator=torch.Generator().manual_seed(stride))
    nll = token_nll(ours, ids, stride=stride, batch_size=3)
    total, count = hf_sliding_nll(hf, ids, 32, stride)
    scored = nll[~torch.isnan(nll)]
    assert scored.numel() == count
    assert float(scored.sum()) == pytest.approx(total, rel=1e-5)
    result = evaluate_ids(ours, ids, stride=stride)
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_disjoint_chunks_equal_the_hugging_face_guide(models):
    ours, hf = models
    ids = torch.randint(0, 257, (100,), generator=torch.Generator().manual_seed(7))
    assert evaluate_ids(ours, ids, stride=32).perplexity == pytest.approx(hf_guide_perplexity(hf, ids, 32, 32), rel=1e-5)
    # with overlap the guide counts one token fewer per window; the difference is only in that weighting
    guide = hf_guide_perplexity(hf, ids, 32, 16)
    assert evaluate_ids(ours, ids, stride=16).perplexity == pytest.approx(guide, rel=0.05)


def test_batching_and_context_do_not_change_the_result(models):
    ours, _ = models
    ids = torch.randint(0, 257, (120,), generator=torch.Generator().manual_seed(3))
    one = token_nll(ours, ids, stride=8)
    many = token_nll(ours, ids, stride=8, batch_size=7)
    assert torch.allclose(one, many, rtol=1e-5, atol=1e-6)
    shorter = evaluate_ids(ours, ids, stride=4, context=8)
    assert shorter.context == 8 and shorter.tokens == 119
    with pytest.raises(ValueError, match="n_ctx"):
        token_nll(ours, ids, context=64)


class ByteTokenizer:
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


def test_bits_per_byte_of_a_byte_level_model_is_loss_over_ln2(models):
    ours, _ = models
    text = "To be, or not to be: that is the question. Ünïcödé — too. " * 3
    result = evaluate_text(ours, ByteTokenizer(), text, stride=16)
    assert result.bytes == len(text.encode()) - 1 == result.tokens  # every token is one byte; the first is unscored
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))
    lengths = token_byte_lengths(ByteTokenizer(), 257)
    assert lengths[:256].eq(1).all() and lengths[256] == 0
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_text(ours, ByteTokenizer(), "a")


def test_bits_per_byte_counts_multibyte_tokens():
    """With a tokenizer whose tokens span several bytes, bpb divides by bytes, not tokens."""

    class PairTokenizer:
        vocab_size = 257

        def decode_bytes(self, ids):
            return b"".join(b"xy" if i % 2 else b"z" for i in ids)

    torch.manual_seed(1)
    model = GPT(CFG).eval()
    ids = torch.arange(40) % 257
    result = evaluate_ids(model, ids, stride=16, byte_lengths=token_byte_lengths(PairTokenizer(), 257))
    expected_bytes = sum(2 if i % 2 else 1 for i in range(1, 40))
    assert result.bytes == expected_bytes
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / expected_bytes)


def test_cli_eval_prints_loss_perplexity_and_bpb(tmp_path, capsys):
    import json

    from gpt2lab.cli import main
    from gpt2lab.tokenizer import CharTokenizer

    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .\n"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    text = "the quick brown fox jumps over the lazy dog.\n" * 4
    (tmp_path / "data.txt").write_text(text, encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt"), "--stride", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = evaluate_ids(model, torch.tensor(tok.encode(text)), stride=4,
                            byte_lengths=token_byte_lengths(tok, tok.vocab_size))
    assert result["loss"] == pytest.approx(expected.loss) and result["tokens"] == len(text) - 1
    assert result["bits_per_byte"] == pytest.approx(expected.loss / math.log(2))  # one byte per character here
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt"), "--stride", "40"]) == 1
    assert "stride" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,message", [
    ({"context": 0}, "context must be an integer in \\[2, 32\\] \\(n_ctx=32"),
    ({"context": 33}, "context must be an integer in \\[2, 32\\] \\(n_ctx=32"),
    ({"stride": 0}, "stride must be an integer in \\[1, 32\\] \\(context=32\\)"),
    ({"stride": 9, "context": 8}, "stride must be an integer in \\[1, 8\\] \\(context=8\\)"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
])
def test_given_values_are_checked_never_replaced(kwargs, message):
    """0 is not "the default": a window setting that is given is used as given or refused."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    ids = torch.arange(40) % 257
    with pytest.raises(ValueError, match=message):
        evaluate_ids(model, ids, **kwargs)
    with pytest.raises(ValueError, match=message):
        token_nll(model, ids, **kwargs)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_counts_windows_on_a_terminal(progress, monkeypatch):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate_ids(model, torch.arange(100) % 257, stride=16, batch_size=2, progress=progress)
    assert ("eval: 100%" in terminal.getvalue() and "6/6" in terminal.getvalue()) == progress


def test_progress_bar_hides_itself_when_stderr_is_not_a_terminal(monkeypatch):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    evaluate_ids(model, torch.arange(100) % 257, stride=16, progress=True)
    assert pipe.getvalue() == ""


def test_cli_eval_progress_and_window_errors(tmp_path, monkeypatch, capsys):
    from gpt2lab.cli import main
    from gpt2lab.tokenizer import CharTokenizer

    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .\n"))
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=2, n_embd=16)).save_pretrained(
        tmp_path / "m", tokenizer=tok)
    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 2, encoding="utf-8")
    argv = ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt")]
    for extra, shown in [([], True), (["--no-progress"], False)]:
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(argv + extra) == 0
        assert ("window" in terminal.getvalue()) == shown
    monkeypatch.undo()
    for extra, message in [(["--context", "17"], "context must be an integer in [2, 16] (n_ctx=16"),
                           (["--context", "8", "--stride", "9"], "stride must be an integer in [1, 8] (context=8)")]:
        assert main(argv + extra) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
