import dataclasses

import pytest

from gpt2lab.config import PRESETS, GPTConfig


def test_defaults_are_gpt2_small():
    assert GPTConfig() == GPTConfig.preset("gpt2")
    cfg = GPTConfig.preset("gpt2")
    assert (cfg.vocab_size, cfg.n_ctx, cfg.n_layer, cfg.n_head, cfg.n_embd) == (50257, 1024, 12, 12, 768)
    assert cfg.head_dim == 64 and cfg.ffn_dim == 3072
    assert cfg.activation == "gelu_tanh" and cfg.pos_encoding == "learned"


@pytest.mark.parametrize("name,layers,heads,width", [
    ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600)])
def test_large_presets(name, layers, heads, width):
    cfg = GPTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, width)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'") as e:
        GPTConfig.preset("gpt3")
    for name in PRESETS:
        assert name in str(e.value)


def test_preset_lookup_is_exact():
    with pytest.raises(ValueError):
        GPTConfig.preset("GPT2")


def test_preset_overrides_make_a_new_config():
    cfg = GPTConfig.preset("tiny", vocab_size=65)
    assert cfg.vocab_size == 65 and PRESETS["tiny"].vocab_size == 50257


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTConfig().n_layer = 3  # type: ignore[misc]


@pytest.mark.parametrize("field,value,message", [
    ("n_embd", 100, "n_embd \\(100\\) must be divisible by n_head \\(12\\)"),
    ("n_layer", 0, "GPTConfig.n_layer must be an integer >= 1, got 0"),
    ("vocab_size", -5, "vocab_size must be an integer >= 1, got -5"),
    ("n_head", 2.0, "n_head must be an integer >= 1, got 2.0"),
    ("activation", "swish", "activation 'swish' is unknown; choose one of: gelu_tanh, gelu, relu"),
    ("pos_encoding", "rope", "pos_encoding 'rope' is unknown; choose one of: learned, sinusoidal"),
    ("dropout", 1.0, "dropout must be a number in \\[0, 1\\), got 1.0"),
    ("layer_norm_eps", 0, "layer_norm_eps must be a finite number > 0, got 0"),
    ("layer_norm_eps", float("inf"), "layer_norm_eps must be a finite number > 0, got inf"),
    ("bias", "yes", "GPTConfig.bias must be true or false, got 'yes'"),
])
def test_invalid_values_name_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{field: value})


@pytest.mark.parametrize("fields", [{"n_embd": 2**40, "n_head": 1}, {"vocab_size": 10**15}, {"n_layer": 10**7},
                                    {"n_ctx": 2**62}])
def test_absurd_sizes_are_refused_before_anything_is_built(fields):
    with pytest.raises(ValueError, match="GPTConfig describes .* parameters .*; at most 1e\\+12 are allowed"):
        GPTConfig(**fields)


@pytest.mark.parametrize("fields", [{}, {"bias": False}, {"pos_encoding": "sinusoidal"}, {"n_layer": 3, "n_embd": 48}])
def test_parameter_count_matches_the_built_model(fields):
    from gpt2lab import GPT

    cfg = GPTConfig.preset("tiny", **fields)
    assert cfg.parameter_count == GPT(cfg).num_parameters()


def test_from_dict_with_preset_and_overrides():
    cfg = GPTConfig.from_dict({"preset": "mini", "n_layer": 3, "activation": "relu"})
    assert (cfg.n_layer, cfg.n_embd, cfg.activation) == (3, 128, "relu")


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown model config key\\(s\\) 'n_layers'"):
        GPTConfig.from_dict({"n_layers": 3})


def test_round_trip_dict():
    cfg = GPTConfig.preset("nano", pos_encoding="sinusoidal", bias=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
