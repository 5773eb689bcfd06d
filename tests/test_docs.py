"""The documentation's examples work as written, and the tests it cites exist.

- Every Python block of README.md and docs/*.md runs in a fresh directory, or is listed in NOT_RUN with the reason.
  Names that a block takes from its surrounding prose (`model`, `tokenizer`, `ids`, files such as corpus.txt) are
  provided by SETUP; the code itself runs unchanged, except where SUBSTITUTE says otherwise and why.
- Every `gpt2lab ...` command line, in code blocks and in inline code, parses with the real parser: examples parse
  outright, synopses (with [optional] parts, a|b choices or ...) name only real subcommands and flags.
- Every test file and test (`tests/x.py::test_y`) a doc names as evidence exists.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Callable

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(gpt2lab [^`]+)`")
START = re.compile(r"(?:^|\s|\|\s*)(gpt2lab(?:\.cli)?\s.*)")  # a command after a pipe, torchrun -m, or at the start

# (file, first line of the block) -> why the block is not run
NOT_RUN = {
    ("model.md", "q, k, v = self.c_attn(x).split(C, dim=2)   # 3 × (B, T, C): one matmul makes all three"):
        "an excerpt of GPT's attention for reading, with √D written as math",
    ("model.md", "x = x + self.attn(self.ln_1(x))"): "an excerpt of Block.forward for reading",
    ("evaluation.md", "import lm_eval"): "its tasks' datasets come from the Hugging Face Hub; tests/test_lm_eval.py "
                                         "makes the same call on local task files",
    ("serving.md", "from openai import OpenAI"): "a client of a server already running on port 8000 (and the "
                                                 "openai package, which gpt2lab does not depend on)",
}


def _tiny_gpt2_vocab_model() -> GPT:
    """A model with GPT-2's vocabulary, small enough to build and run in a fraction of a second."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, n_ctx=64, n_layer=2, n_head=2, n_embd=32)).eval()


def _model_directory(cwd: Path) -> dict:
    """generation.md loads "DIR": make it a real model directory, with GPT-2's tokenizer."""
    from gpt2lab.tokenizer import Tokenizer

    _tiny_gpt2_vocab_model().save_pretrained(cwd / "DIR", tokenizer=Tokenizer.gpt2())
    return {}


def _model_and_tokenizer(cwd: Path) -> dict:
    """serving.md builds an app "around any model and tokenizer"."""
    from gpt2lab.tokenizer import Tokenizer

    return {"model": _tiny_gpt2_vocab_model(), "tokenizer": Tokenizer.gpt2()}


def _texts(cwd: Path) -> dict:
    """tokenizer.md's reference card names the reader's own ids, documents and text files."""
    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 20
    (cwd / "corpus.txt").write_text(text, encoding="utf-8")
    (cwd / "input.txt").write_text(text, encoding="utf-8")
    return {"ids": [15496, 995], "documents": ["Hello world", "Goodbye"], "big_text": text}


SETUP: dict[tuple[str, str], Callable[[Path], dict]] = {
    ("generation.md", "import torch"): _model_directory,
    ("serving.md", "from gpt2lab.serve import BackgroundServer, ServerConfig, create_app"): _model_and_tokenizer,
    ("tokenizer.md", "from gpt2lab.tokenizer import Tokenizer, CharTokenizer, train_bpe, load_tokenizer"): _texts,
}

# (file, first line) -> (text, replacement). Why: GPT-2 124M takes tens of seconds to build, save and load on a CPU,
# so the README's walk-through runs on a 2-layer model of the same vocabulary; the 124M parameter count it states is
# checked by formula in test_readme_parameter_count.
SUBSTITUTE = {
    ("README.md", "import torch"): ('GPTConfig.preset("gpt2")',
                                    'GPTConfig.preset("gpt2", n_layer=2, n_embd=64, n_head=2)'),
}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of a markdown file."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]


def python_blocks() -> dict[tuple[str, str], str]:
    blocks = {}
    for path in DOCS:
        for language, body in code_blocks(path):
            if language == "python":
                blocks[(path.name, body.splitlines()[0])] = body
    return blocks


PYTHON = python_blocks()


def test_every_python_block_is_run_or_says_why_not():
    assert len(PYTHON) >= 5
    assert set(NOT_RUN) <= set(PYTHON), "NOT_RUN names a block the docs no longer have"
    assert set(SETUP) | set(SUBSTITUTE) <= set(PYTHON) - set(NOT_RUN)


@pytest.mark.parametrize("key", sorted(set(PYTHON) - set(NOT_RUN)), ids=lambda key: f"{key[0]}:{key[1][:30]}")
def test_python_example_runs(key, tmp_path, monkeypatch):
    code = PYTHON[key]
    if key in SUBSTITUTE:
        text, replacement = SUBSTITUTE[key]
        assert text in code
        code = code.replace(text, replacement)
    monkeypatch.chdir(tmp_path)  # examples that write (save_pretrained("out/...")) write here
    namespace = SETUP[key](tmp_path) if key in SETUP else {}
    exec(compile(code, f"{key[0]} example", "exec"), namespace)


def test_readme_parameter_count():
    from gpt2lab.info import count_parameters

    assert "124,439,808 parameters" in PYTHON[("README.md", "import torch")]
    assert count_parameters(GPTConfig.preset("gpt2")) == 124_439_808


# -------------------------------------------------------------------------------------------------- command lines
def command_lines() -> list[tuple[str, str]]:
    """(file, command) for every `gpt2lab ...` in the docs: whole lines of shell blocks (continuations joined) and
    inline code spans; table cells escape | as \\|."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for language, body in code_blocks(path):
            if language not in ("", "bash", "sh"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                m = START.search(line)
                if m and not line.lstrip().startswith(("src/", "runs/", "config.toml", "python -m gpt2lab.lm_eval",
                                                       "lm_eval")):  # lm-eval's command line, naming our model
                    found.append((path.name, m.group(1)))
        found += [(path.name, span.replace("\\|", "|")) for span in INLINE.findall(FENCE.sub("", text))]
    return found


COMMANDS = command_lines()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def is_synopsis(args: list[str]) -> bool:
    return any(c in arg for arg in args for c in "[]()|") or any(arg.endswith("...") for arg in args)


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30
    assert {c.split()[1] for _, c in COMMANDS} >= {"quickstart", "info", "tokenize", "train-tokenizer", "prepare",
                                                   "train", "generate", "eval", "attention", "serve"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:40]}" for w, c in COMMANDS])
def test_command_line_parses(where, command):
    parser = build_parser()
    args = [a for a in shlex.split(command, comments=True)[1:] if a != "&"]  # a trailing & runs it in the background
    if {"-h", "--help", "--version"} & set(args):  # prints and exits 0
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(args)
        assert exit_info.value.code == 0, f"{where}: {command!r} does not parse"
        return
    commands = subcommands(parser)
    assert args[0] in commands, f"{where}: {command!r} names no gpt2lab command"
    if len(args) == 1:  # the command's name, in prose
        return
    if is_synopsis(args):
        options = set(commands[args[0]]._option_string_actions)
        flags = {m for arg in args for m in re.findall(r"--[a-z][\w-]*", arg)}
        assert flags <= options, f"{where}: {command!r} shows flags {sorted(flags - options)} that do not exist"
        return
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {command!r} does not parse (see the stderr above)")


def test_readme_lists_the_presets():
    from gpt2lab.config import PRESETS

    line = next(l for l in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if l.startswith("Presets:"))
    assert set(re.findall(r"`([\w-]+)`", line)) == set(PRESETS)


# ----------------------------------------------------------------------------------------- the tests the docs cite
CITED_FILE = re.compile(r"\b(tests/[\w/]+\.py)\b")
CITED_TEST = re.compile(r"(?:\b(tests/[\w/]+\.py))?::(test_\w+)")


def cited_tests() -> list[tuple[str, str, str]]:
    """(doc, test file, test name) for every `tests/x.py::test_y` a doc names; a bare `::test_y` belongs to the
    file named last before it in the same doc."""
    found = []
    for doc in DOCS:
        last = None
        for m in re.finditer(rf"{CITED_TEST.pattern}|{CITED_FILE.pattern}", doc.read_text(encoding="utf-8")):
            file_with_test, name, bare_file = m.group(1), m.group(2), m.group(3)
            last = file_with_test or bare_file or last
            if name:
                found.append((doc.name, last, name))
    return found


def test_the_docs_cite_tests():
    assert len(cited_tests()) > 20  # the pattern still finds them


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_every_test_file_a_doc_names_exists(doc):
    text = next(d for d in DOCS if d.name == doc).read_text(encoding="utf-8")
    missing = sorted({f for f in CITED_FILE.findall(text) if not (ROOT / f).is_file()})
    assert not missing, f"{doc} names test files that do not exist: {missing}"


@pytest.mark.parametrize("doc, file, name", cited_tests())
def test_every_test_a_doc_names_exists(doc, file, name):
    assert file is not None, f"{doc} names ::{name} before naming its file"
    assert re.search(rf"^def {name}\(", (ROOT / file).read_text(encoding="utf-8"), re.M), \
        f"{doc} names {file}::{name}, which that file does not define"
