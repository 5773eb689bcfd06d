"""The layer rule of docs/architecture.md, checked on the source: imports only point down (or sideways within a
layer), and no two modules import each other, directly or around a circle, not even lazily inside a function.

Every module under src/gpt2lab must be assigned a layer below; a new module fails the test until it is.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2lab"

CORE, IO, SERVICES, JOBS, API, FACES = range(6)
LAYER_NAMES = ["core", "I/O", "services", "jobs", "api", "faces"]

# module (dotted, without the "gpt2lab." prefix) -> layer. A package's modules may be listed one by one; a package
# listed by name covers its modules that are not listed.
LAYERS = {
    # core: the torch model's ground floor, and the tokenizer's pure BPE core (no torch)
    "checks": CORE, "memory": CORE, "config": CORE, "cpu": CORE, "thread_tuner": CORE, "loss": CORE, "model": CORE,
    "tokenizer.pretokenize": CORE, "tokenizer.byte_map": CORE, "tokenizer.merges": CORE, "tokenizer.pool": CORE,
    "tokenizer.base": CORE,
    # I/O: files, downloads, model directories, data shards, tokenizer file formats
    "files": IO, "download": IO, "model_files": IO, "checkpoint": IO, "data": IO, "native": IO,
    "tokenizer": IO,  # the package (or, before it was split, the single module) with its formats and loaders
    # services: what decoding and loading are built from
    "kv_cache": SERVICES, "sampling": SERVICES, "text": SERVICES, "quantize": SERVICES, "fast_step": SERVICES,
    "quantize_int": SERVICES, "compiled_step": SERVICES, "inference": SERVICES, "native_step": SERVICES,
    "decode_step": SERVICES,  # the old name of fast_step.py, kept for imports
    # jobs: each uses the layers below
    "generate": JOBS, "train": JOBS, "evaluate": JOBS, "visualize": JOBS, "info": JOBS,
    # api: the GPT users import (`gpt2lab.GPT`), with loading, saving and generation as methods, and the quickstart
    # recipe, which uses two jobs (train, then generate samples)
    "pretrained": API, "quickstart": API,
    # faces: parse, dispatch, format
    "cli": FACES, "serve": FACES, "server": FACES, "lm_eval": FACES,  # server.py: the old name of serve/
    "": FACES,  # gpt2lab/__init__.py: the package's exports
}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


MODULES = module_names()


def layer_of(name: str) -> int | None:
    """The layer of a module: its own entry, else that of the nearest package above it that has one."""
    parts = name.split(".") if name else []
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in LAYERS and (n == len(parts) or key):
            return LAYERS[key]
    return None


def source_of(name: str) -> Path:
    base = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def resolve(target: str) -> str | None:
    """'gpt2lab.x.y' -> 'x.y' if that is one of our modules (or the nearest one above it), else None."""
    if target != "gpt2lab" and not target.startswith("gpt2lab."):
        return None
    parts = target.split(".")[1:]
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def imports_of(name: str) -> set[str]:
    """Every gpt2lab module `name` imports, at the top, inside functions and under TYPE_CHECKING alike."""
    path = source_of(name)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = ["gpt2lab", *package[:len(package) - node.level + 1]]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from gpt2lab import files` names the module gpt2lab.files; `from gpt2lab import GPT` the package
            targets = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = resolve(target)
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer():
    unknown = [name or "gpt2lab" for name in MODULES if layer_of(name) is None]
    assert not unknown, f"assign a layer to {unknown} in tests/test_architecture.py (see docs/architecture.md)"


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_down(name):
    mine = layer_of(name)
    upward = [f"{target or 'gpt2lab'} ({LAYER_NAMES[layer_of(target)]})" for target in sorted(GRAPH[name])
              if layer_of(target) is not None and mine is not None and layer_of(target) > mine]
    assert not upward, f"gpt2lab.{name} ({LAYER_NAMES[mine]}) imports from a higher layer: {', '.join(upward)}"


def test_no_import_cycles():
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def is_cli(name: str) -> bool:
    return name == "cli" or name.startswith("cli.")


def test_the_cli_is_a_package_of_faces():
    """cli/ is split into modules named after their commands; each is a face, whatever the package's entry says."""
    inside = [name for name in MODULES if is_cli(name)]
    assert "cli.commands" in inside and len(inside) > 2
    assert {layer_of(name) for name in inside} == {FACES}


def test_nothing_imports_the_cli():
    """Only the cli package's own modules import from it (its __init__ re-exports main and build_parser)."""
    importers = {name: sorted(filter(is_cli, GRAPH[name])) for name in MODULES if not is_cli(name)}
    assert {name: found for name, found in importers.items() if found} == {}


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path, monkeypatch):
    """The parser finds imports inside functions and under TYPE_CHECKING, so a lazy upward import cannot hide."""
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gpt2lab.generate import generate\n"
                      "def f():\n    from gpt2lab import checkpoint\n    import gpt2lab.cli\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "source_of", lambda name: module)
    assert imports_of("model") >= {"generate", "checkpoint", "cli"}


def test_the_checks_import_nothing_from_gpt2lab():
    """gpt2lab.checks sits under everything that validates a setting, config included, so it stands alone."""
    assert GRAPH["checks"] == set()
