"""Attention weights (gpt2lab.visualize): the patterns transformers reports for the same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, make_model


def test_attention_weights_match_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    from gpt2lab.visualize import attention_weights

    model = make_model(CONFIGS["wide"], seed=2)
    model.save_pretrained(tmp_path / "m")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    idx = torch.randint(0, 211, (9,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx[None], output_attentions=True).attentions
    for layer in range(model.config.n_layer):
        ours = attention_weights(model, idx, layer)
        assert ours.shape == (4, 9, 9)
        assert torch.allclose(ours, theirs[layer][0], atol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        attention_weights(model, idx, 3)


def test_the_command_line_takes_the_formats_plot_attention_writes(tmp_path):
    from gpt2lab.cli.args import IMAGE_SUFFIXES
    from gpt2lab.visualize import IMAGE_KINDS, image_kind, plot_attention

    assert IMAGE_SUFFIXES == tuple(f".{k}" for k in IMAGE_KINDS)
    weights = torch.softmax(torch.randn(1, 2, 2), dim=-1)
    for bad in ("a.jpg", "a", "a.png.tmp"):
        with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
            image_kind(bad)
        with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
            plot_attention(weights, ["a", "b"], tmp_path / bad, layer=0)
    assert list(tmp_path.iterdir()) == []
    assert image_kind("A.PNG") == "png"
