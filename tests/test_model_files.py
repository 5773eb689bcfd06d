"""Hostile or mistaken model directories are refused before they cost anything, with a message that names the problem.

Every directory here is hand-written under tmp_path: a literal config.json and a safetensors file of a few KB.
Where the old behaviour was to build a huge model, the test replaces the model class with one that fails, so a
regression fails fast instead of hanging.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt2lab import checkpoint
from gpt2lab.checkpoint import expected_shapes, load_model, read_config, resolve_model_dir
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig

CONFIG = {"model_type": "gpt2", "vocab_size": 11, "n_positions": 8, "n_embd": 8, "n_layer": 2, "n_head": 2}


def tensors_for(config: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of the right names and shapes for `config` (a config.json dict)."""
    cfg = GPTConfig(vocab_size=config["vocab_size"], n_ctx=config["n_positions"], n_layer=config["n_layer"],
                    n_head=config["n_head"], n_embd=config["n_embd"])
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in expected_shapes(cfg).items()}


def write_model(directory: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A model directory: `config` (default CONFIG) as config.json, `tensors` (default: matching CONFIG) as
    model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config if config is not None else CONFIG))
    save_file(tensors if tensors is not None else tensors_for(CONFIG), str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def no_model_building(monkeypatch):
    """Fail the test if load_model gets as far as building a model or reading the weights' data."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or weights were read before the files were checked")

    monkeypatch.setattr(checkpoint, "GPT", refuse)
    monkeypatch.setattr(checkpoint, "read_weights", refuse)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access: a name that is wrongly taken for a hub id fails at once instead of reaching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_hand_written_directory_loads(tmp_path):
    model = load_model(write_model(tmp_path / "m"))
    assert model.config.n_layer == 2 and model.config.vocab_size == 11


# ------------------------------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("field,value,allowed", [
    ("n_layer", True, "an integer >= 1"),
    ("n_layer", 2.0, "an integer >= 1"),
    ("n_layer", "2", "an integer >= 1"),
    ("n_embd", [8], "an integer >= 1"),
    ("n_head", {"a": 1}, "an integer >= 1"),
    ("vocab_size", 0, "an integer >= 1"),
    ("n_positions", -8, "an integer >= 1"),
    ("n_layer", None, "an integer >= 1"),
    ("layer_norm_epsilon", "abc", "a finite number"),
    ("layer_norm_epsilon", 10**400, "a finite number"),
    ("layer_norm_epsilon", float("nan"), "a finite number"),
    ("resid_pdrop", None, "a finite number"),
    ("resid_pdrop", [0.1], "a finite number"),
    ("activation_function", ["gelu_new"], "a string"),
    ("model_type", None, "a string"),
    ("tie_word_embeddings", "false", "true or false"),
    ("n_inner", "32", r"an integer \(or null\)"),
    ("gpt2lab", ["bias"], "a JSON object"),
])
def test_config_field_of_the_wrong_type_is_named(tmp_path, field, value, allowed):
    directory = write_model(tmp_path / "m", {**CONFIG, field: value})
    with pytest.raises(ValueError, match=rf"config.json: {field} must be {allowed}, got "):
        load_model(directory)


@pytest.mark.parametrize("extra,message", [
    ({"bias": "yes"}, "gpt2lab.bias must be true or false, got 'yes'"),
    ({"pos_encoding": 1}, "gpt2lab.pos_encoding must be a string, got 1"),
    ({"rope": True}, "unknown gpt2lab key\\(s\\) 'rope'; allowed: pos_encoding, bias, activation"),
])
def test_gpt2lab_section_is_checked(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        load_model(write_model(tmp_path / "m", {**CONFIG, "gpt2lab": extra}))


def test_config_errors_from_gptconfig_name_the_file(tmp_path):
    directory = write_model(tmp_path / "m", {**CONFIG, "n_head": 3})
    with pytest.raises(ValueError, match=r"config.json: GPTConfig.n_embd \(8\) must be divisible by n_head \(3\)"):
        load_model(directory)


def test_huge_value_is_shown_clipped(tmp_path):
    directory = write_model(tmp_path / "m", {**CONFIG, "n_layer": list(range(100_000))})
    with pytest.raises(ValueError) as error:
        load_model(directory)
    assert "n_layer must be an integer >= 1, got [0, 1, 2" in str(error.value) and len(str(error.value)) < 300


def test_oversized_config_json_is_refused_unread(tmp_path):
    directory = write_model(tmp_path / "m", {**CONFIG, "padding": "x" * (2 << 20)})
    with pytest.raises(ValueError, match="too large for a config.json"):
        load_model(directory)


# ------------------------------------------------------------------------------------- config against the weights
def test_million_layers_over_a_small_file_is_refused_before_building(tmp_path, no_model_building):
    directory = write_model(tmp_path / "m", {**CONFIG, "n_layer": 10**6})
    with pytest.raises(ValueError, match="the config says n_layer=1000000 but the weights hold 2 layers"):
        load_model(directory)


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 12, r"vocab_size=12, n_embd=8 but transformer.wte.weight has shape \(11, 8\)"),
    ("n_positions", 16, r"n_ctx=16, n_embd=8 but transformer.wpe.weight has shape \(8, 8\)"),
    ("n_embd", 16, r"vocab_size=11, n_embd=16 but transformer.wte.weight has shape \(11, 8\)"),
])
def test_sizes_that_disagree_with_the_file_are_named(tmp_path, no_model_building, field, value, message):
    with pytest.raises(ValueError, match=message):
        load_model(write_model(tmp_path / "m", {**CONFIG, field: value}))


@pytest.mark.parametrize("changes", [{"n_embd": 10**30, "n_head": 1}, {"vocab_size": 10**18}, {"n_positions": 2**62}])
def test_astronomical_sizes_are_refused_by_the_size_cap(tmp_path, no_model_building, changes):
    with pytest.raises(ValueError, match="config.json: GPTConfig describes about 10\\^[0-9]+ parameters \\(n_layer=2, .*\\); at most 1e\\+12 are allowed"):
        load_model(write_model(tmp_path / "m", {**CONFIG, **changes}))


# -------------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_upcast(tmp_path, dtype):
    tensors = tensors_for(CONFIG, dtype)
    model = load_model(write_model(tmp_path / "m", tensors=tensors))
    assert model.wte.weight.dtype == torch.float32
    assert torch.equal(model.wte.weight, tensors["transformer.wte.weight"].float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int8, torch.bool])
def test_other_dtypes_are_refused_not_cast(tmp_path, no_model_building, dtype):
    tensors = tensors_for(CONFIG)
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"].to(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"dtype gpt2lab does not load: transformer.h.1.mlp.c_fc.weight \({dtype_name}\); "
                                         "allowed: float32, float16, bfloat16"):
        load_model(write_model(tmp_path / "m", tensors=tensors))


def test_pytorch_model_bin_dtypes_are_checked_too(tmp_path):
    tensors = tensors_for(CONFIG)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"].double()
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"transformer.wte.weight \(float64\)"):
        load_model(tmp_path)


# -------------------------------------------------------------------------------------------------- sharded files
def write_sharded(directory: Path, weight_map: object) -> Path:
    """config.json and an index with `weight_map`, but no shard files (tests add the ones they need)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def split_in_two(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    names = sorted(tensors)
    half = len(names) // 2
    return {n: tensors[n] for n in names[:half]}, {n: tensors[n] for n in names[half:]}


def test_sharded_directory_loads(tmp_path):
    first, second = split_in_two(tensors_for(CONFIG))
    directory = write_sharded(tmp_path / "m", {**{n: "a.safetensors" for n in first},
                                               **{n: "sub/b.safetensors" for n in second}})
    save_file(first, str(directory / "a.safetensors"))
    (directory / "sub").mkdir()
    save_file(second, str(directory / "sub" / "b.safetensors"))
    model = load_model(directory)
    assert torch.equal(model.ln_f.weight, second["transformer.ln_f.weight"])


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "OUTSIDE"])
def test_shard_outside_the_directory_is_refused(tmp_path, shard):
    outside = tmp_path / "outside.safetensors"
    save_file(tensors_for(CONFIG), str(outside))
    shard = str(outside) if shard == "OUTSIDE" else shard  # an absolute path
    directory = write_sharded(tmp_path / "m", {"transformer.wte.weight": shard})
    with pytest.raises(ValueError, match="is not a file name inside the model directory"):
        load_model(directory)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_shard_that_links_outside_the_directory_is_refused(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file(tensors_for(CONFIG), str(outside))
    directory = write_sharded(tmp_path / "m", {"transformer.wte.weight": "model-1.safetensors"})
    (directory / "model-1.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="model-1.safetensors' is a link that leads outside the model directory"):
        load_model(directory)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path):
    """The Hub cache keeps files in `blobs/` and links them from `snapshots/<rev>/`: those links are allowed."""
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    save_file(tensors_for(CONFIG), str(repo / "blobs" / "0123abcd"))
    snapshot = write_sharded(repo / "snapshots" / "rev1", {"transformer.wte.weight": "model-1.safetensors"})
    (snapshot / "model-1.safetensors").symlink_to(Path("..", "..", "blobs", "0123abcd"))
    assert load_model(snapshot).config.n_layer == 2


@pytest.mark.parametrize("weight_map,message", [
    (["a.safetensors"], 'expected a non-empty "weight_map" object'),
    ({}, 'expected a non-empty "weight_map" object'),
    ({"transformer.wte.weight": 3}, r"weight_map\['transformer.wte.weight'\] must be a file name, got 3"),
])
def test_malformed_index_is_named(tmp_path, weight_map, message):
    with pytest.raises(ValueError, match=message):
        load_model(write_sharded(tmp_path / "m", weight_map))


def test_tensor_in_two_shards_is_refused(tmp_path):
    tensors = tensors_for(CONFIG)
    directory = write_sharded(tmp_path / "m", {"transformer.wte.weight": "a.safetensors", "x": "b.safetensors"})
    save_file(tensors, str(directory / "a.safetensors"))
    save_file({"transformer.wte.weight": tensors["transformer.wte.weight"]}, str(directory / "b.safetensors"))
    with pytest.raises(ValueError, match="tensor 'transformer.wte.weight' appears in both"):
        load_model(directory)


# ---------------------------------------------------------------------------------------------------- model paths
@pytest.mark.parametrize("name", ["runs/nothere", "./x", "runs/a/b", "x/", "~/surely-not-here-gpt2lab"])
def test_missing_local_path_says_no_such_directory(tmp_path, monkeypatch, offline, name):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(name)


def test_absolute_missing_path_says_no_such_directory(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "nothere"))


def test_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file, not a model directory"):
        resolve_model_dir(str(tmp_path / "model.safetensors"))


def test_hub_id_that_is_not_local_says_both(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError, match="'someone/some-model' is not a local directory; as a hub name: .*offline"):
        resolve_model_dir("someone/some-model")


def test_run_directory_points_to_its_models(tmp_path):
    run = tmp_path / "quickstart"
    write_model(run / "best")
    write_model(run / "last")
    (run / "logs").mkdir()
    with pytest.raises(FileNotFoundError, match=f"these sub-directories hold a model: {run / 'best'}, {run / 'last'}"):
        read_config(run)


# ------------------------------------------------------------------------------------------------- the CLI chain
def tiny_text_data(tmp_path: Path) -> Path:
    from gpt2lab.data import prepare

    (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
    prepare(str(tmp_path / "text.txt"), tmp_path / "data", tokenizer="char", progress=False)
    return tmp_path / "data"


def test_every_command_refuses_a_hostile_directory_in_one_line(tmp_path, no_model_building, capsys):
    directory = str(write_model(tmp_path / "m", {**CONFIG, "n_layer": 10**6}))
    (tmp_path / "t.txt").write_text("hello")
    data = tiny_text_data(tmp_path)
    commands = [["info", directory], ["generate", "--model", directory, "--prompt", "hi"],
                ["eval", "--model", directory, "--data", str(tmp_path / "t.txt")],
                ["train", "--init-from", directory, "--set", f"data_dir={json.dumps(str(data))}",
                 "--set", f"out_dir={json.dumps(str(tmp_path / 'run'))}", "--set", "seq_len=16", "--no-progress"]]
    for argv in commands:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "n_layer=1000000 but the weights hold 2 layers" in err and err.count("\n") == 1, (argv, err)


def test_info_names_a_missing_path_as_such(tmp_path, capsys, offline):
    assert main(["info", str(tmp_path / "runs" / "nothere")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_integer_too_long_to_read_names_the_file(tmp_path):
    directory = write_model(tmp_path / "m")
    (directory / "config.json").write_text('{"n_layer": 1' + "0" * 5000 + "}")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(directory)


def test_missing_shard_is_named(tmp_path):
    directory = write_sharded(tmp_path / "m", {"transformer.wte.weight": "model-1.safetensors"})
    with pytest.raises(FileNotFoundError, match="shard 'model-1.safetensors' does not exist"):
        load_model(directory)
