"""Where gpt2lab may write: one rule for every output, atomic directories, and the leftovers of killed writers.

The rule, followed by every writer (prepare, save_pretrained, train's out_dir, train-tokenizer, attention,
eval --output-path):

    a new path, or an empty directory                      written
    a directory that is gpt2lab's own output of this kind  replaced only when asked (`--overwrite`, overwrite=True),
                                                           and then only gpt2lab's files; files it does not know stay
    anything else (a file where a directory should go,     refused, naming the path and how to proceed
    a non-empty directory of other files)

"gpt2lab's own" is proven by the directory's signature files (a prepared-data meta.json with gpt2lab's format tag,
a model's config.json with gpt2lab's key, an eval results file's format tag), never guessed from a name alone.

A directory is written into a temp directory beside it and swapped in with renames, so readers see the old or the
new one, never half. The temp directory holds a marker file that its writer keeps locked (`flock`) while it writes;
the lock dies with the process, even with `kill -9`, so the next writer can prove an orphan is abandoned, and
removes it. Files and directories get the user's umask (as `open` and `mkdir` give them), so a model one user saves
can be served by another.

This module needs only the standard library.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: orphans are left alone rather than removed unproven)
    fcntl = None  # type: ignore[assignment]

MARKER_FILE = ".gpt2lab-partial"  # inside a temp directory while its writer is alive; holds MARKER_FORMAT
MARKER_FORMAT = "gpt2lab-partial-directory"
TOKEN_LENGTH = 12  # hex digits of the random part of temp names


# ------------------------------------------------------------------------------------ single files: atomic, checked
def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks so large files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success it replaces `dest` in one step, on failure it is removed.

    The temp file lives in the same directory so `os.replace` is a rename on one filesystem: readers see either the
    old file or the complete new one, never a partial write.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.touch(exist_ok=False)  # unlike mkstemp's 0600, the umask decides the permissions, as for any new file
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str is encoded as UTF-8) to `path` atomically and return the path."""
    dest = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(dest) as tmp:
        tmp.write_bytes(payload)
    return dest


def read_json(path: str | os.PathLike) -> object:
    """Parse a UTF-8 JSON file; a broken one raises ValueError naming the file (never a bare JSONDecodeError)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers too long to convert
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_versioned_json(path: str | os.PathLike, fmt: str, version: int) -> dict:
    """A JSON object written by gpt2lab with `"format": fmt` and `"version": version`; anything else is refused
    naming the file, so a foreign or future file is never half-understood."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file")
    if data.get("version") != version:
        raise ValueError(f"{path}: version {data.get('version')!r} is not supported (only {version})")
    return data


# ------------------------------------------------------------------------------------------- the rule for outputs
@dataclass(frozen=True)
class OutputKind:
    """A kind of directory gpt2lab writes: a name for messages, the test that proves a directory is one, the glob
    patterns of the files gpt2lab puts there (an old one is dropped when the directory is replaced), and
    `own_file(path)`, which must also say yes of such a file before it is dropped: a name alone proves nothing
    (a user's `train_005.bin` beside prepared data is kept)."""

    description: str
    is_own: Callable[[Path], bool]
    own_files: tuple[str, ...] = ()
    own_file: Callable[[Path], bool] | None = None

    def owns(self, path: Path) -> bool:
        """Whether the file `path` is one this kind writes: its name matches, and `own_file` (if any) agrees."""
        named = any(fnmatch.fnmatchcase(path.name, pattern) for pattern in self.own_files)
        return named and (self.own_file is None or self.own_file(path))


# ------------------------------------------------------------------------------------------------------- the rule
def claim_directory(path: str | os.PathLike[str], kind: OutputKind, overwrite: bool = False) -> Path:
    """Check that gpt2lab may write the directory `path` as a `kind`; raise FileExistsError saying why not.

        claim_directory("data/x", PREPARED_DATA)                   # new or empty: fine
        claim_directory("data", PREPARED_DATA)                     # other files: refused, even with overwrite
        claim_directory("data/x", PREPARED_DATA, overwrite=True)   # an earlier `prepare` output: may be replaced
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path for the {kind.description}")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    if kind.is_own(path):
        if overwrite:
            return path
        raise FileExistsError(f"{path} already holds a {kind.description}; pass --overwrite (overwrite=True) to "
                              "replace gpt2lab's files there, or choose another path")
    raise FileExistsError(f"{path} is not empty ({_clip(entries)}) and is not a {kind.description} written by "
                          "gpt2lab, which never replaces files it did not write; choose a new or empty directory")


def claim_files(directory: str | os.PathLike[str], names: tuple[str, ...], overwrite: bool = False, *,
                is_own: Callable[[Path], bool] | None = None, description: str = "files") -> Path:
    """Check that gpt2lab may add the files `names` to `directory` (which may hold others: a tokenizer's files sit
    beside a model's weights); existing ones are replaced only with `overwrite`, and with `is_own` only where
    `is_own(directory)` proves them gpt2lab's `description` (others are refused even with `overwrite`)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a directory; choose a directory for {', '.join(names)}")
    taken = [n for n in names if (d / n).exists() or (d / n).is_symlink()]
    if taken and is_own is not None and not is_own(d):
        raise FileExistsError(f"{d} already holds {', '.join(taken)}, not {description} written by gpt2lab, which "
                              "never replaces files it did not write; choose another directory")
    if taken and not overwrite:
        raise FileExistsError(f"{d} already holds {', '.join(taken)}; pass --overwrite (overwrite=True) to replace "
                              "them, or choose another directory")
    return d


def claim_file(path: str | os.PathLike[str], overwrite: bool = False, *,
               is_own: Callable[[Path], bool] | None = None, description: str = "a file") -> Path:
    """Check that gpt2lab may write the file `path`: a new path, or an existing file with `overwrite`. With `is_own`,
    an existing file must also prove to be gpt2lab's `description`; any other file is refused even with `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a directory; give a file path")
    if (path.exists() or path.is_symlink()) and is_own is not None and not is_own(path):
        raise FileExistsError(f"{path} exists and is not {description} written by gpt2lab, which never replaces "
                              "files it did not write; choose another path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it, "
                              "or choose another path")
    return path


def read_json_field(path: Path, key: str) -> object:
    """`key` of the JSON object in `path`, or None when the file is missing, not JSON or not an object: the
    building block of `OutputKind.is_own` tests, which must answer no rather than raise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def holds_mark(path: Path, mark: str, max_bytes: int = 64 << 20) -> bool:
    """Whether the file `path` contains `mark` (the plain-text metadata gpt2lab writes into its pictures), read only
    when it is a file of at most `max_bytes`: the `is_own` test of outputs that cannot carry a JSON signature."""
    try:
        return path.is_file() and path.stat().st_size <= max_bytes and mark.encode() in path.read_bytes()
    except OSError:
        return False


def _clip(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------------------------ atomic directory
@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike[str], kind: OutputKind, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temp directory beside `destination`; on success it takes `destination`'s place.

    `destination` is first claimed (`claim_directory`); `overwrite` defaults to True because the callers that
    replace their own output (a run's `last/` checkpoint) are the common case; the user-facing writers pass the
    user's choice. When an existing directory is replaced, files that neither this write nor `kind` produces are
    moved into the new one. An exception, or a kill, leaves `destination` as it was; the temp directory is removed
    (after a kill, by the next writer: see `remove_abandoned`).
    """
    dest = Path(destination)
    if dest.is_symlink():  # replace what the link points to, and keep the link
        dest = dest.resolve()
    if dest.parent.is_dir():
        remove_abandoned(dest)
        recover_set_aside(dest, kind)
    claim_directory(dest, kind, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{_token()}"
    tmp.mkdir()  # mode 0o777 less the umask, unlike mkdtemp's 0o700
    try:
        with _writing_marker(tmp) as marker:
            yield tmp
            _finish_files(tmp)
            marker.unlink()  # before the rename, so the marker never appears in `destination`
            _swap_in(tmp, dest, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _writing_marker(directory: Path) -> Iterator[Path]:
    """Create `directory/MARKER_FILE`, locked for as long as the block runs (the lock is the proof of life).

    The marker is locked under a temp name and then renamed, so no one ever sees it unlocked while we live.
    """
    marker, staging = directory / MARKER_FILE, directory / (MARKER_FILE + ".new")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"format": MARKER_FORMAT, "pid": os.getpid()}).encode())
        os.replace(staging, marker)
        yield marker
    finally:
        os.close(fd)


def _finish_files(directory: Path) -> None:
    """Give each written file the umask's permissions (safetensors writes 0o600) and flush it to disk before the
    rename makes it visible."""
    mode = 0o666 & ~current_umask()
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink() and f.name != MARKER_FILE:
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_in(tmp: Path, dest: Path, kind: OutputKind) -> None:
    """Put `tmp` in `dest`'s place with two renames; the old directory's unknown files are then moved across."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    aside = dest.parent / f".{dest.name}.old-{_token()}"
    os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    _merge_back(aside, dest, kind)


def _merge_back(aside: Path, dest: Path, kind: OutputKind) -> None:
    """Empty the set-aside old directory: its files that `dest` now holds anew, or that `kind` writes, are dropped;
    everything else is moved into `dest`. A directory that is not empty afterwards is left in place."""
    for entry in sorted(aside.iterdir()):
        target = dest / entry.name
        with contextlib.suppress(FileNotFoundError):
            if target.exists() or target.is_symlink() or kind.owns(entry):
                if entry.is_file() or entry.is_symlink():
                    entry.unlink()
            else:
                os.replace(entry, target)
    with contextlib.suppress(OSError):
        aside.rmdir()


def recover_set_aside(destination: str | os.PathLike[str], kind: OutputKind) -> None:
    """Finish the swaps of writers that died between renames: with `destination` missing, the newest set-aside
    copy is put back; otherwise set-aside copies are merged into it as `_merge_back` does. Only directories named
    as `_swap_in` names them and holding a `kind` (or nothing) are touched, and nothing unknown is deleted."""
    dest = Path(destination)
    name = re.compile(rf"\.{re.escape(dest.name)}\.old-[0-9a-f]{{{TOKEN_LENGTH}}}")
    asides = [p for p in dest.parent.iterdir() if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
              and (kind.is_own(p) or not any(p.iterdir()))]
    for aside in sorted(asides, key=lambda p: p.stat().st_mtime, reverse=True):
        if not dest.exists():
            os.replace(aside, dest)
        else:
            _merge_back(aside, dest, kind)


# ---------------------------------------------------------------------------------------------------- orphans
def remove_abandoned(destination: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp directories of `destination` that killed writers left behind; returns them.

    A directory is removed only when all of these hold: its name is `.<name>.tmp-*`, it holds only regular files,
    one of them our marker with its format tag, and the marker's lock can be taken (so its writer is dead).
    """
    dest = Path(destination)
    removed = []
    for candidate in sorted(dest.parent.glob(f".{dest.name}.tmp-*")):
        with contextlib.suppress(OSError), _lock_if_abandoned(candidate) as abandoned:
            if abandoned:
                shutil.rmtree(candidate)
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def _lock_if_abandoned(candidate: Path) -> Iterator[bool]:
    """Yield True, holding its marker's lock, when `candidate` is provably a gpt2lab temp directory whose writer is
    gone; else yield False."""
    marker = candidate / MARKER_FILE
    plain = candidate.is_dir() and not candidate.is_symlink() and all(
        p.is_file() and not p.is_symlink() for p in candidate.iterdir())
    if fcntl is None or not plain or read_json_field(marker, "format") != MARKER_FORMAT:
        yield False
        return
    fd = os.open(marker, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _token() -> str:
    """A random suffix that makes temp names unique among processes and hosts."""
    return uuid.uuid4().hex[:TOKEN_LENGTH]


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc), else by setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
