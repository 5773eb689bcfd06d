"""Model directories: Hugging Face layout both ways, safe loading, refusal of bad files, atomic saving."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lab import GPT, GPTConfig
from gpt2lab.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, atomic_directory, config_from_hf, config_to_hf,
                                export_state_dict, load_model, resolve_model_dir)


@pytest.fixture
def saved(tiny_model, tmp_path):
    d = tmp_path / "model"
    tiny_model.save_pretrained(d)
    return d


def test_directory_has_hf_names_and_conv1d_layout(tiny_model, saved):
    assert sorted(os.listdir(saved)) == [CONFIG_FILE, WEIGHTS_FILE]
    tensors = load_file(saved / WEIGHTS_FILE)
    C = tiny_model.config.n_embd
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D: (in, out)
    assert torch.equal(tensors["transformer.h.1.mlp.c_fc.weight"], tiny_model.h[1].mlp.c_fc.weight.t())
    assert "lm_head.weight" not in tensors  # tied, as transformers saves it
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["n_positions"] == 32 and config["activation_function"] == "gelu_new"
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]


def test_round_trip_is_exact(tiny_model, saved):
    back = GPT.from_pretrained(saved)
    assert back.config == tiny_model.config
    for (n1, p1), (n2, p2) in zip(tiny_model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert back.lm_head.weight is back.wte.weight
    assert not back.training


def test_config_mapping_round_trip():
    for cfg in (GPTConfig(), GPTConfig.preset("tiny", activation="relu", pos_encoding="sinusoidal", bias=False)):
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_official_layout_without_prefix_and_with_mask_buffers(tiny_model, tmp_path):
    """The released GPT-2 files were saved from GPT2Model: no `transformer.` prefix, plus `attn.bias` buffers."""
    tensors = {k.removeprefix("transformer."): v for k, v in export_state_dict(tiny_model).items()}
    for i in range(tiny_model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config_to_hf(tiny_model.config)))
    back = load_model(tmp_path)
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(idx), tiny_model(idx))


def test_pytorch_model_bin_is_read_without_unpickling_code(tiny_model, tmp_path):
    torch.save(export_state_dict(tiny_model), tmp_path / "pytorch_model.bin")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config_to_hf(tiny_model.config)))
    back = load_model(tmp_path)
    assert torch.equal(back.wte.weight, tiny_model.wte.weight)


def test_pickle_with_code_is_refused(tmp_path, tiny_model):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config_to_hf(tiny_model.config)))
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_model(tmp_path)


def test_truncated_safetensors_is_refused(saved):
    path = saved / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GPT.from_pretrained(saved)


def test_missing_tensor_is_named(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    del tensors["transformer.h.1.mlp.c_proj.bias"]
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="missing tensors: transformer.h.1.mlp.c_proj.bias"):
        GPT.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["transformer.h.2.ln_1.weight"] = torch.ones(16)
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="unexpected tensors: transformer.h.2.ln_1.weight"):
        GPT.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"wrong shapes: transformer.h.0.attn.c_attn.weight \(48, 16\) \(expected \(16, 48\)\)"):
        GPT.from_pretrained(saved)


def test_untied_head_is_refused(saved):
    tensors = load_file(saved / WEIGHTS_FILE)
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
    save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        GPT.from_pretrained(saved)


def test_unsupported_hf_config_is_refused(saved):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["activation_function"] = "swish"
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_function 'swish' is not supported"):
        GPT.from_pretrained(saved)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GPT.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "empty")


def test_hub_name_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConnectionError, match="pass a local model directory"):
        resolve_model_dir("gpt2")


def test_save_replaces_existing_directory_atomically(tiny_model, saved):
    (saved / "notes.txt").write_text("mine")  # not gpt2lab's: kept
    tiny_model.save_pretrained(saved, overwrite=True)
    assert (saved / "notes.txt").read_text() == "mine"
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_failed_save_leaves_previous_directory_intact(tiny_model, saved):
    before = (saved / WEIGHTS_FILE).read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_directory(saved) as tmp:
            (tmp / WEIGHTS_FILE).write_bytes(b"partial")
            raise RuntimeError("crash while writing")
    assert (saved / WEIGHTS_FILE).read_bytes() == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_save_with_tokenizer_files(tiny_model, tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, d):
            (d / "vocab.json").write_text("{}")

    tiny_model.save_pretrained(tmp_path / "m", tokenizer=FakeTokenizer())
    assert (tmp_path / "m" / "vocab.json").exists() and (tmp_path / "m" / WEIGHTS_FILE).exists()


def test_load_to_dtype(saved):
    model = load_model(saved, dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight


def test_export_refuses_a_model_converted_for_inference(tiny_model, tmp_path):
    from gpt2lab.inference import prepare_for_inference

    converted = prepare_for_inference(tiny_model, "int8")
    with pytest.raises(ValueError, match="cannot export"):
        converted.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_config_json_names_the_tokenizers_end_of_text_as_bos_and_eos(tmp_path):
    from gpt2lab.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("to be or not")
    small = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=8, n_layer=1, n_head=1, n_embd=8))
    small.save_pretrained(tmp_path / "char", tokenizer=tok)
    data = json.loads((tmp_path / "char" / CONFIG_FILE).read_text())
    assert data["bos_token_id"] == data["eos_token_id"] == tok.eot_token  # not GPT-2's 50256, past this vocabulary
    small.save_pretrained(tmp_path / "bare")  # no tokenizer, and 50256 is past the vocabulary: none
    assert json.loads((tmp_path / "bare" / CONFIG_FILE).read_text())["eos_token_id"] is None
    assert config_to_hf(GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_embd=8))["eos_token_id"] == 50256
    transformers = pytest.importorskip("transformers")
    assert transformers.GPT2Config.from_pretrained(tmp_path / "char").eos_token_id == tok.eot_token
