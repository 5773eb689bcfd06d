"""The package's shape: no torch, imports that only point down, files a reader can hold, and every name that
`gpt2lab.tokenizer` exported as one module still importable from it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gpt2lab.tokenizer as package

PACKAGE = Path(package.__file__).parent
# Bottom up, as __init__.py lists them: a module may import only modules before it.
LAYERS = ["pretokenize", "byte_map", "merges", "pool", "base", "formats", "bpe_tokenizer", "char_tokenizer",
          "training", "load"]  # fmt: skip


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_every_module_is_in_the_layer_list():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


def test_imports_point_only_down_and_never_at_torch():
    for k, name in enumerate(LAYERS):
        imported = imports(PACKAGE / f"{name}.py")
        assert not {m for m in imported if m.split(".")[0] == "torch"}, name
        inside = {m.removeprefix("gpt2lab.tokenizer.") for m in imported if m.startswith("gpt2lab.tokenizer")}
        assert inside <= set(LAYERS[:k]), f"{name} imports {sorted(inside - set(LAYERS[:k]))}, which are not below it"


def test_the_package_imports_without_torch():
    code = "import sys, gpt2lab.tokenizer; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modules_are_files_a_reader_can_hold():
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) < 500, path.name


def test_init_only_re_exports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
        assert is_docstring or is_all or isinstance(node, ast.ImportFrom), ast.dump(node)[:80]


def test_the_names_of_the_single_module_still_import():
    names = ["AllowedSpecial", "BPE_FILES", "CHAR_FILE", "CHAR_FORMAT", "CHAR_FORMAT_VERSION", "CharTokenizer", "EOT",
             "GPT2_MERGES_SHA256", "GPT2_PATTERN", "GPT2_PYPI", "GPT2_RANKS_SHA256", "GPT2_RANKS_URL",
             "GPT2_VOCAB_JSON_SHA256", "Ranks", "TOKENIZER_FILES", "Tokenizer", "bpe", "bytes_to_unicode",
             "count_pieces", "derive_merges", "learn_merges", "load_tokenizer", "read_tiktoken_ranks", "split_text",
             "train_bpe"]  # fmt: skip
    assert [name for name in names if not hasattr(package, name)] == []
    assert callable(package.bpe) and set(package.__all__) <= set(dir(package))
