"""The model against its definition and against transformers' GPT2LMHeadModel (the oracle) on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.info import count_parameters
from gpt2lab.model import causal_mask, explicit_attention, sdpa_attention, sinusoidal_table

from conftest import hf_config

ORACLE_CONFIGS = {
    "odd-heads": GPTConfig(vocab_size=101, n_ctx=24, n_layer=2, n_head=3, n_embd=48),
    "vocab-not-64": GPTConfig(vocab_size=1000, n_ctx=16, n_layer=3, n_head=4, n_embd=32),
    "gelu-exact": GPTConfig(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, n_embd=32, activation="gelu"),
    "relu": GPTConfig(vocab_size=97, n_ctx=16, n_layer=2, n_head=2, n_embd=32, activation="relu"),
    "eps": GPTConfig(vocab_size=50, n_ctx=16, n_layer=1, n_head=1, n_embd=8, layer_norm_eps=1e-3),
}


def _random_hf_model(cfg: GPTConfig, attn: str = "eager"):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel(hf_config(cfg))
    model.config._attn_implementation = attn
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mapping mistake cannot hide behind 1s and 0s
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_their_weights_our_logits(name, tmp_path):
    cfg = ORACLE_CONFIGS[name]
    theirs = _random_hf_model(cfg)
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config == cfg
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.n_ctx), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(idx).logits
        for use_sdpa in (True, False):
            got = ours.set_attention(use_sdpa)(idx)
            assert got.shape == (3, cfg.n_ctx, cfg.vocab_size)
            assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_our_weights_their_logits(name, tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = ORACLE_CONFIGS[name]
    torch.manual_seed(3)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path / "m")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", [{"pos_encoding": "sinusoidal"}, {"bias": False}])
def test_non_gpt2_variants_export_to_plain_gpt2(variant, tmp_path):
    """Sinusoidal positions export their table as wpe, a bias-free model exports zero biases: transformers runs both."""
    from transformers import GPT2LMHeadModel

    cfg = GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=32, **variant)
    torch.manual_seed(4)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    back = GPT.from_pretrained(tmp_path)
    assert back.config == cfg
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-5
        assert torch.equal(ours(idx), back(idx))


# ------------------------------------------------------------------------------------------------- attention
def test_attention_paths_equal_with_and_without_masks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    assert torch.allclose(explicit_attention(q, k, v, None), sdpa_attention(q, k, v, None), atol=1e-6)
    k2, v2 = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)  # 4 cached + 5 new positions
    assert torch.allclose(explicit_attention(q, k2, v2, None), sdpa_attention(q, k2, v2, None), atol=1e-6)
    mask = causal_mask(5, 9) & (torch.rand(2, 1, 1, 9) > 0.3)
    mask |= torch.eye(9, dtype=torch.bool)[4:]  # always see yourself
    assert torch.allclose(explicit_attention(q, k2, v2, mask), sdpa_attention(q, k2, v2, mask), atol=1e-6)
    q1 = torch.randn(2, 3, 1, 8)
    assert torch.allclose(explicit_attention(q1, k2, v2, None), sdpa_attention(q1, k2, v2, None), atol=1e-6)


def test_model_attention_paths_equal(tiny_model):
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 20))
    with torch.no_grad():
        a = tiny_model.set_attention(True)(idx)
        b = tiny_model.set_attention(False)(idx)
    assert (a - b).abs().max().item() < 1e-5


def test_causal_mask_shape_and_alignment():
    assert causal_mask(3, 3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert causal_mask(1, 4).all()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_causality(tiny_model, use_sdpa):
    """Changing token t must leave every logit before t unchanged, and (almost surely) change those from t on."""
    tiny_model.set_attention(use_sdpa)
    idx = torch.randint(0, tiny_model.config.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % tiny_model.config.vocab_size
    with torch.no_grad():
        a, b = tiny_model(idx), tiny_model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_left_padding_with_mask_and_positions_matches_unpadded(tiny_model):
    idx = torch.randint(0, tiny_model.config.vocab_size, (1, 7))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 7)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0).long()
    with torch.no_grad():
        plain = tiny_model(idx)
        for use_sdpa in (True, False):
            got = tiny_model.set_attention(use_sdpa)(padded, attention_mask=mask, position_ids=positions)
            assert not got.isnan().any()
            assert (got[:, pad:] - plain).abs().max().item() < 1e-5


def test_logits_to_keep(tiny_model):
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(tiny_model(idx, logits_to_keep=1), tiny_model(idx)[:, -1:], atol=1e-6)


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name,expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_parameter_counts_equal_gpt2(name, expected):
    cfg = GPTConfig.preset(name)
    with torch.device("meta"):  # no memory is allocated for the big ones
        model = GPT(cfg)
    assert model.num_parameters() == expected
    assert count_parameters(cfg) == expected


def test_head_is_tied_and_counted_once(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.wte.weight
    cfg = tiny_model.config
    assert tiny_model.num_parameters() - tiny_model.num_parameters(exclude_embeddings=True) == \
        cfg.vocab_size * cfg.n_embd + cfg.n_ctx * cfg.n_embd


def test_sinusoidal_has_no_position_parameters():
    cfg = GPTConfig(vocab_size=50, n_ctx=16, n_layer=1, n_head=2, n_embd=8, pos_encoding="sinusoidal")
    model = GPT(cfg)
    assert model.num_parameters() == GPT(GPTConfig(**{**cfg.to_dict(), "pos_encoding": "learned"})).num_parameters() - 16 * 8
    assert count_parameters(cfg) == model.num_parameters()
    table = sinusoidal_table(16, 8)
    assert table[0, 0] == 0 and table[0, 1] == 1  # sin(0), cos(0)
    assert math.isclose(table[3, 2].item(), math.sin(3 / 10000 ** (2 / 8)), rel_tol=1e-6)


# -------------------------------------------------------------------------------------------------- init
def test_gpt2_initialisation_statistics():
    cfg = GPTConfig(vocab_size=2048, n_ctx=256, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert abs(model.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.wpe.weight.std().item() - 0.02) < 0.001
    assert abs(model.h[3].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(model.h[3].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(model.h[5].attn.c_proj.weight.std().item() - scaled) < 0.0005
    assert abs(model.h[5].mlp.c_proj.weight.std().item() - scaled) < 0.0005
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        if ".ln_" in name and name.endswith("weight") or name == "ln_f.weight":
            assert torch.all(p == 1), name
    assert abs(model.wte.weight.mean().item()) < 0.001


# --------------------------------------------------------------------------------------------- bad input
def test_token_id_out_of_range_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        tiny_model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tiny_model(torch.tensor([[-1, 2]]))


def test_too_long_sequence_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's context n_ctx=32"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_wrong_rank_and_dtype(tiny_model):
    with pytest.raises(ValueError, match="\\(B, T\\)"):
        tiny_model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        tiny_model(torch.zeros(1, 5))


def test_constructor_does_not_take_other_configs():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 2})  # type: ignore[arg-type]


def test_dropout_only_in_training():
    cfg = GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, n_embd=16, dropout=0.5)
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_backward_reaches_every_parameter(tiny_model):
    tiny_model.train()
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 10))
    logits = tiny_model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
