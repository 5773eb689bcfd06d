"""Outputs: gpt2lab never deletes or replaces what it did not write; umask; orphans of killed writers (files.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig, files
from gpt2lab import train as T
from gpt2lab.checkpoint import MODEL_DIRECTORY, WEIGHTS_FILE, atomic_directory, load_model, save_model
from gpt2lab.cli import main as cli_main
from gpt2lab.config import TrainConfig
from gpt2lab.data import META_FILE, prepare
from gpt2lab.tokenizer import CharTokenizer, train_bpe
from gpt2lab.visualize import plot_attention

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture
def source(tmp_path) -> Path:
    """A source folder of two text files."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text(TEXT.upper())
    return d


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what must survive a refused write."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def make_orphan(parent: Path, name: str, marker: bool = True) -> Path:
    """A temp directory as a killed writer leaves it: our name pattern, a weights file, the (unlocked) marker."""
    d = parent / f".{name}.tmp-{'0' * files.TOKEN_LENGTH}"
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(b"half")
    if marker:
        (d / files.MARKER_FILE).write_text(json.dumps({"format": files.MARKER_FORMAT, "pid": 1}))
    return d


# ------------------------------------------------------------------------------------------ prepare's output
@pytest.mark.parametrize("where", ["parent of other outputs", "the source folder itself"])
def test_prepare_refuses_a_directory_of_other_files(tmp_path, source, where, capsys):
    if where == "parent of other outputs":
        out = tmp_path / "data"
        prepare(str(source), out / "earlier", tokenizer="char", progress=False)
        (out / "readme.md").write_text("mine")
    else:
        out = source
    before = snapshot(out)
    for overwrite in (False, True):  # --overwrite replaces only gpt2lab's own outputs, never a foreign directory
        with pytest.raises(FileExistsError, match=f"{out} is not empty .* choose a new or empty directory"):
            prepare(str(source), out, tokenizer="char", progress=False, overwrite=overwrite)
    assert cli_main(["prepare", str(source), "--tokenizer", "char", "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2lab prepare: error: {out} is not empty") and len(err.splitlines()) == 1
    assert snapshot(out) == before


def test_prepare_refuses_a_file_as_output(tmp_path, source):
    out = tmp_path / "out"
    out.write_text("a file of mine")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        prepare(str(source), out, tokenizer="char", progress=False, overwrite=True)
    assert out.read_text() == "a file of mine"


def test_prepare_replaces_its_own_output_only_with_overwrite_and_keeps_unknown_files(tmp_path, source, capsys):
    out = tmp_path / "prep"
    prepare(str(source), out, tokenizer="char", shard_tokens=500, progress=False)
    assert (out / "train_002.bin").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "train_notes.bin").write_bytes(b"mine too")  # near a shard's name, but not one
    before = snapshot(out)
    assert cli_main(["prepare", str(source), "--tokenizer", "char", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before
    assert cli_main(["prepare", str(source / "a.txt"), "--tokenizer", "char", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / META_FILE).read_text())["source"] == str(source / "a.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "train_notes.bin").read_bytes() == b"mine too"
    assert not (out / "train_002.bin").exists()  # a stale shard of gpt2lab's own is dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep", "src"]  # nothing set aside is left


# ---------------------------------------------------------------------------------------- model directories
def test_save_pretrained_refuses_other_files_and_a_file_path(tiny_model, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')  # someone else's model: not ours to replace
    (tmp_path / "hf" / WEIGHTS_FILE).write_bytes(b"their weights")
    (tmp_path / "file").write_text("mine")
    for target in (foreign, tmp_path / "hf", tmp_path / "file"):
        before = snapshot(tmp_path)
        with pytest.raises(FileExistsError, match=str(target)):
            tiny_model.save_pretrained(target, overwrite=True)
        assert snapshot(tmp_path) == before


def test_save_pretrained_replaces_a_model_directory_only_with_overwrite(tiny_model, tmp_path):
    d = tmp_path / "m"
    tiny_model.save_pretrained(d, tokenizer=CharTokenizer.from_text("abc"))
    (d / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="already holds a gpt2lab model directory; pass --overwrite"):
        tiny_model.save_pretrained(d)
    other = GPT(GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16))
    other.save_pretrained(d, overwrite=True)
    assert sorted(os.listdir(d)) == ["README.md", "config.json", WEIGHTS_FILE]  # old tokenizer dropped, notes kept
    assert torch.equal(load_model(d).wte.weight, other.wte.weight)


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "v1")
    (tmp_path / "current").symlink_to(tmp_path / "v1", target_is_directory=True)
    other = GPT(GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16))
    other.save_pretrained(tmp_path / "current", overwrite=True)
    assert (tmp_path / "current").is_symlink()
    assert torch.equal(load_model(tmp_path / "v1").wte.weight, other.wte.weight)


def test_an_empty_directory_is_written(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)  # pytest's empty tmp_path
    assert (tmp_path / WEIGHTS_FILE).is_file()


# --------------------------------------------------------------------------------- tokenizer, image, run dir
def test_tokenizer_files_are_replaced_only_with_overwrite_and_only_gpt2labs(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT)
    with pytest.raises(FileExistsError, match="vocab.json exists and is not a directory"):
        (tmp_path / "vocab.json").write_text("{}")
        CharTokenizer.from_text("ab").save_pretrained(tmp_path / "vocab.json")
    (tmp_path / "vocab.json").unlink()
    args = ["train-tokenizer", "--input", str(tmp_path / "corpus.txt"), "--vocab-size", "260", "--out", str(tmp_path)]
    assert cli_main(args) == 0  # new files beside the corpus
    ours = (tmp_path / "vocab.json").read_text()
    assert cli_main(args) == 1
    assert "already holds vocab.json, merges.txt, tokenizer_config.json; pass --overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--vocab-size", "261", "--overwrite"]) == 0  # gpt2lab's own files: replaced
    assert (tmp_path / "vocab.json").read_text() != ours and (tmp_path / "corpus.txt").read_text() == TEXT
    with pytest.raises(FileExistsError, match="another tokenizer .vocab.json, merges.txt, tokenizer_config.json.; "
                                              "keep one tokenizer per directory"):
        CharTokenizer.from_text("ab").save_pretrained(tmp_path)  # beside a BPE tokenizer, it would break loading
    assert not (tmp_path / "char_tokenizer.json").exists()
    CharTokenizer.from_text("ab").save_pretrained(tmp_path / "char")
    with pytest.raises(FileExistsError, match="char_tokenizer.json; pass --overwrite"):
        CharTokenizer.from_text("ab").save_pretrained(tmp_path / "char")
    CharTokenizer.from_text("abc").save_pretrained(tmp_path / "char", overwrite=True)
    assert cli_main([*args[:-1], str(tmp_path / "char")]) == 1
    assert "another tokenizer (char_tokenizer.json)" in capsys.readouterr().err


@pytest.mark.parametrize("foreign", [{"vocab.json": "{}"},  # a lone file of another tokenizer
                                     {"tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer"}'},
                                     {"char_tokenizer.json": '{"chars": ["a"]}'}])
def test_tokenizer_files_gpt2lab_did_not_write_are_never_replaced(tmp_path, capsys, foreign):
    for name, text in foreign.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "corpus.txt").write_text(TEXT)
    args = ["train-tokenizer", "--input", str(tmp_path / "corpus.txt"), "--vocab-size", "260", "--out", str(tmp_path),
            "--overwrite"]
    name, text = next(iter(foreign.items()))
    if name == "char_tokenizer.json":
        with pytest.raises(FileExistsError, match="not a char tokenizer written by gpt2lab"):
            CharTokenizer.from_text("ab").save_pretrained(tmp_path, overwrite=True)
    else:
        assert cli_main(args) == 1
        assert "not a tokenizer written by gpt2lab, which never replaces" in capsys.readouterr().err
        with pytest.raises(FileExistsError, match="not a tokenizer written by gpt2lab"):
            train_bpe(TEXT, vocab_size=260).save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / name).read_text() == text


@pytest.mark.parametrize("kind", ["png", "svg", "pdf"])
def test_attention_image_is_replaced_only_with_overwrite_and_only_gpt2labs(tmp_path, kind):
    out = tmp_path / f"attention.{kind}"
    out.write_bytes(b"my picture")
    weights = torch.softmax(torch.randn(2, 3, 3), dim=-1)  # (H, T, T)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"attention.{kind} exists and is not an attention picture written "
                                                  "by gpt2lab"):
            plot_attention(weights, ["a", "b", "c"], out, layer=0, overwrite=overwrite)
    assert out.read_bytes() == b"my picture"
    (tmp_path / f"pictures.{kind}").mkdir()
    with pytest.raises(FileExistsError, match="is a directory"):
        plot_attention(weights, ["a", "b", "c"], tmp_path / f"pictures.{kind}", layer=0, overwrite=True)
    pytest.importorskip("matplotlib", reason="drawing needs the plot extra")
    out.unlink()
    plot_attention(weights, ["a", "b", "c"], out, layer=0)
    first = out.read_bytes()
    with pytest.raises(FileExistsError, match=f"attention.{kind} already exists; pass --overwrite"):
        plot_attention(weights, ["a", "b", "c"], out, layer=0)
    plot_attention(weights, ["a", "b", "c"], out, layer=1, overwrite=True)  # its own picture: replaced
    assert out.read_bytes() != first


def run_config(tmp_path: Path, out_dir: Path) -> TrainConfig:
    return TrainConfig(data_dir=str(tmp_path / "data"), out_dir=str(out_dir), model=GPTConfig(n_ctx=16, n_layer=2,
                       n_head=2, n_embd=16), batch_size=2, seq_len=8, max_steps=1, eval_interval=1, eval_iters=1,
                       threads=1)  # fmt: skip


def test_train_refuses_an_out_dir_of_other_files(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.toml").write_text("# my own notes\n")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty .*config.toml.* is not a run directory written by gpt2lab"):
        T.checkpoint_to_resume(run_config(tmp_path, tmp_path / "exp"), resume=False, overwrite=True)
    with pytest.raises(FileExistsError, match="is not a directory"):
        T.checkpoint_to_resume(run_config(tmp_path, tmp_path / "file"), resume=False, overwrite=True)
    assert (tmp_path / "exp" / "config.toml").read_text() == "# my own notes\n"


def test_a_run_start_removes_only_provably_abandoned_temp_checkpoints(tmp_path):
    run = tmp_path / "run"
    orphan = make_orphan(run, T.LAST)
    (run / T.LOG_FILE).write_text("")  # a run killed before its first checkpoint
    unmarked = make_orphan(run, T.BEST, marker=False)  # no marker: not provably ours
    mine = run / f".{T.LAST}.tmp-mine"  # the user's, under a name like ours
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert T.checkpoint_to_resume(run_config(tmp_path, run), resume=False, overwrite=False) is None
    assert not orphan.exists() and unmarked.exists() and (mine / "keep.txt").exists()


def test_a_live_writers_temp_directory_is_not_removed(tiny_model, tmp_path):
    dest = tmp_path / "m"
    with atomic_directory(dest) as tmp:
        (tmp / "x").write_bytes(b"in progress")
        assert files.remove_abandoned(dest) == [] and tmp.is_dir()  # its marker is locked
    assert (dest / "x").read_bytes() == b"in progress" and not (dest / files.MARKER_FILE).exists()


def test_a_swap_cut_between_its_renames_is_finished_by_the_next_writer(tiny_model, tmp_path):
    dest = tmp_path / "m"
    save_model(tiny_model, dest)
    (dest / "notes.txt").write_text("mine")
    aside = tmp_path / f".m.old-{'a' * files.TOKEN_LENGTH}"
    os.replace(dest, aside)  # killed after setting the old copy aside, before the new one arrived
    backup = tmp_path / ".m.old-backup"  # the user's, under a name like ours
    backup.mkdir()
    (backup / WEIGHTS_FILE).write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="already holds"):  # the old copy is back, and still ours to protect
        save_model(tiny_model, dest)
    assert not aside.exists() and (dest / "notes.txt").read_text() == "mine"
    save_model(tiny_model, dest, overwrite=True)
    assert (backup / WEIGHTS_FILE).read_bytes() == b"keep" and (dest / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------ umask
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_users_umask(tiny_model, tmp_path, source, mask):
    old = os.umask(mask)
    try:
        tiny_model.save_pretrained(tmp_path / "out" / "m", tokenizer=CharTokenizer.from_text("ab"))
        prepare(str(source), tmp_path / "out" / "d", tokenizer="char", shard_tokens=500, progress=False)
    finally:
        os.umask(old)
    paths = [p for p in (tmp_path / "out").rglob("*")] + [tmp_path / "out"]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~mask for k in modes}
    assert modes == expected and "out/m/model.safetensors" in modes and "out/d/train_000.bin" in modes


# -------------------------------------------------------------------------------------------------- kill -9
KILL_SCRIPT = """
import sys, time, torch
import gpt2lab.checkpoint as C
from gpt2lab import GPT, GPTConfig

real = C.write_model_files

def write_then_hang(model, directory, tokenizer=None):
    real(model, directory, tokenizer)
    if model.wte.weight[0, 0].item() == 2.0:  # the second save: weights written; signal the test, wait for the kill
        open(sys.argv[2], "w").close()
        time.sleep(120)

C.write_model_files = write_then_hang
model = GPT(GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16))
for value in (1.0, 2.0):
    with torch.no_grad():
        model.wte.weight.fill_(value)
    C.save_model(model, sys.argv[1], overwrite=True)
"""


def test_a_kill_during_a_save_keeps_the_previous_model_and_the_orphan_goes_at_the_next_save(tiny_model, tmp_path):
    dest, signal_file = tmp_path / "m", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(dest), str(signal_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not signal_file.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), proc.communicate(timeout=10)[0].decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert (load_model(dest).wte.weight == 1.0).all()  # the first save, whole
    orphans = list(tmp_path.glob(".m.tmp-*"))
    assert len(orphans) == 1 and (orphans[0] / files.MARKER_FILE).is_file()
    save_model(tiny_model, dest, overwrite=True)
    assert not list(tmp_path.glob(".m.*")) and torch.equal(load_model(dest).wte.weight, tiny_model.wte.weight)


def test_the_model_kind_recognises_only_gpt2lab_model_directories(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ours")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "theirs" / WEIGHTS_FILE).write_bytes(b"")
    assert MODEL_DIRECTORY.is_own(tmp_path / "ours") and not MODEL_DIRECTORY.is_own(tmp_path / "theirs")


def test_cli_attention_replaces_only_its_own_image_and_only_with_overwrite(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="drawing needs the plot extra")
    tok = CharTokenizer.from_text("to be or not")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=2, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    out = tmp_path / "attn.png"
    out.write_bytes(b"my picture")
    args = ["attention", "--model", str(tmp_path / "m"), "--prompt", "to be", "--out", str(out)]
    for extra in ([], ["--overwrite"]):
        assert cli_main(args + extra) == 1
        assert "attn.png exists and is not an attention picture written by gpt2lab" in capsys.readouterr().err
    assert out.read_bytes() == b"my picture"
    out.unlink()
    assert cli_main(args) == 0 and out.read_bytes().startswith(b"\x89PNG")
    assert cli_main(args) == 1
    assert "attn.png already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0 and out.read_bytes().startswith(b"\x89PNG")


def test_files_named_like_gpt2labs_are_kept_unless_their_content_is(tmp_path):
    """`prepare --overwrite` drops the old preparation's shards, not a user's file that only shares their name."""
    (tmp_path / "small.txt").write_text(TEXT)
    out = tmp_path / "data"
    prepare(str(tmp_path / "small.txt"), out, tokenizer="char", progress=False)
    (out / "train_005.bin").write_text("my precious notes")
    (out / "val_042.bin").write_text("more")
    prepare(str(tmp_path / "small.txt"), out, tokenizer="char", progress=False, overwrite=True)
    assert (out / "train_005.bin").read_text() == "my precious notes" and (out / "val_042.bin").read_text() == "more"


@pytest.mark.parametrize("name, content", [("log.jsonl", '{"my": "precious experiment record"}\n'),
                                           ("loss.png", "my own picture")])
def test_a_run_never_takes_a_users_log_or_plot_for_its_own(tmp_path, name, content):
    out_dir = tmp_path / "myexp"
    out_dir.mkdir()
    (out_dir / name).write_text(content)
    with pytest.raises(FileExistsError, match="not empty"):
        T.train(run_config(tmp_path, out_dir), progress=False)
    assert (out_dir / name).read_text() == content
