"""Training a byte-level BPE tokenizer, GPT-2 style: count the pre-tokenised pieces, then learn merges.

Each step merges the most frequent adjacent pair. Counts are kept per unique piece and updated incrementally,
with an index from pair to the pieces that hold it, so a merge touches only those pieces, never a full recount.
"""

from __future__ import annotations

import codecs
import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from gpt2lab import checks
from gpt2lab.tokenizer.bpe_tokenizer import Tokenizer
from gpt2lab.tokenizer.byte_map import _BYTE_TO_CHAR
from gpt2lab.tokenizer.pretokenize import EOT, _check_specials, _check_text, _PATTERN, _special_splitter, split_text


def train_bpe(
    texts: str | Iterable[str] = (),
    *,
    vocab_size: int,
    files: Iterable[str | os.PathLike] = (),
    special_tokens: Sequence[str] = (EOT,),
    progress: bool = False,
) -> Tokenizer:
    """Learn a GPT-2-style byte-level BPE tokenizer of `vocab_size` ids from `texts` and/or UTF-8 `files`.

    Like GPT-2: the text is pre-split with GPT-2's regex (merges never cross a piece), the base vocabulary is the
    256 bytes (ids 0-255 in GPT-2's order), merges get ids 256, 257, ... in the order they are learned, and the
    special tokens come last. Special-token strings in the corpus only separate text; they are never merged.

    Each step merges the most frequent adjacent pair, counted over the unique pieces weighted by frequency. Ties go
    to the pair whose (left bytes, right bytes) is smallest, so the result does not depend on input order or
    hashing. Counts are updated incrementally: a merge touches only the pieces that contain the pair (an index from
    pair to pieces says which), never a full recount. If the corpus runs out of pairs first, the vocabulary is
    smaller than asked.
    """
    specials = _check_specials(special_tokens)
    checks.integer("vocab_size", vocab_size, low=256 + len(specials),
                   note=f"256 bytes + {len(specials)} special tokens")
    counts = count_pieces([texts] if isinstance(texts, str) else texts, files, specials, progress)
    base = [bytes([b]) for b in _BYTE_TO_CHAR]  # GPT-2's order: printable bytes first
    merges = learn_merges(counts, vocab_size - 256 - len(specials), base, progress)
    vocab = dict(enumerate(base + [a + b for a, b in merges]))
    return Tokenizer(vocab, merges, {s: len(vocab) + k for k, s in enumerate(specials)})


def count_pieces(
    texts: Iterable[str], files: Iterable[str | os.PathLike], special_tokens: Sequence[str] = (), progress: bool = False
) -> Counter:
    """How often each pre-tokenised piece occurs in `texts` and `files` ({piece: count}).

    Files are read in blocks cut at places where the pieces cannot change, so a large file never needs to fit
    in memory and the counts equal those of the whole text.
    """
    counts: Counter = Counter()
    splitter = _special_splitter(set(special_tokens)) if special_tokens else None

    def add(text: str) -> None:
        for k, part in enumerate(splitter.split(text) if splitter else (text,)):
            if k % 2 == 0:
                counts.update(_PATTERN.findall(part))

    for text in texts:
        _check_text(text)
        add(text)
    for path in files:
        for block in _read_blocks(Path(path), progress):
            add(block)
    return counts


def _read_blocks(path: Path, progress: bool, block_bytes: int = 1 << 20) -> Iterator[str]:
    """Yield the UTF-8 text of `path` in blocks ending at safe cuts (see `split_text`); newlines are kept as is."""
    from tqdm import tqdm  # only when training: importing it costs time every tokenizer user would pay

    decoder = codecs.getincrementaldecoder("utf-8")()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                     disable=not progress, leave=False) as bar:  # fmt: skip
        pending, offset = "", 0
        while True:
            data = f.read(block_bytes)
            try:
                pending += decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (byte {offset + e.start}): {e.reason}") from None
            offset += len(data)
            bar.update(len(data))
            if not data:
                break
            *ready, pending = split_text(pending, max(1, len(pending) // 2))
            yield from ready
        if pending:
            yield pending


def learn_merges(
    counts: Mapping[str, int], n_merges: int, base: Sequence[bytes], progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """Learn up to `n_merges` merges from piece counts; `base[i]` is the byte of id i. Returns byte pairs in order.

    State: each unique piece as a list of ids with its count, `pair_counts` over all pieces, `where[pair]` = the
    pieces that contain the pair, and a max-heap of (count, pair) whose stale entries are skipped when popped.
    """
    from tqdm import tqdm

    id_of_byte = {token[0]: i for i, token in enumerate(base)}
    words = [[id_of_byte[b] for b in piece.encode("utf-8")] for piece in counts]
    freqs = list(counts.values())
    token_bytes = list(base)
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in pairwise(word):
            pair_counts[pair] += freq
            where[pair].add(w)

    def entry(pair: tuple[int, int]):  # heap order: highest count, then smallest (left bytes, right bytes)
        return (-pair_counts[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

    heap = [entry(pair) for pair in pair_counts]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_merges, desc="merges", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            neg_count, left, right, pair = heapq.heappop(heap)
            if pair_counts.get(pair) != -neg_count:
                continue  # stale: the count changed after this entry was pushed
            new_id = len(token_bytes)
            token_bytes.append(left + right)
            merges.append((left, right))
            changed = _apply_merge(pair, new_id, words, freqs, pair_counts, where)
            for p in changed:
                if pair_counts[p] > 0:
                    heapq.heappush(heap, entry(p))
                else:
                    del pair_counts[p]
            bar.update(1)
    return merges


def _apply_merge(pair, new_id, words, freqs, pair_counts, where) -> set:
    """Merge `pair` in every piece that has it, updating pair counts and the index; returns the pairs touched."""
    changed = set()
    first, second = pair
    for w in where.pop(pair):
        word = words[w]
        new, i, n = [], 0, len(word)
        while i < n:
            if word[i] == first and i + 1 < n and word[i + 1] == second:
                new.append(new_id)
                i += 2
            else:
                new.append(word[i])
                i += 1
        if len(new) == n:
            continue  # the index is allowed to be stale: this piece no longer has the pair
        freq = freqs[w]
        for p in pairwise(word):
            pair_counts[p] -= freq
            changed.add(p)
        for p in pairwise(new):
            pair_counts[p] += freq
            changed.add(p)
            where[p].add(w)
        words[w] = new
    changed.discard(pair)
    pair_counts.pop(pair, None)
    return changed
