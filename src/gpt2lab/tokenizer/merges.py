"""The merge loop: applying BPE merges to one piece's ids, and building or recovering merge tables.

A merge table is two parts: `ranks` maps a pair of adjacent ids to its rank (lower = learned earlier), and
`merged[rank]` is the id of the token that merge makes.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import pairwise, repeat

from gpt2lab.tokenizer.byte_map import _to_visible

Ranks = Mapping[tuple[int, int], int]
_NO_RANK = 1 << 62
_LONG_PIECE = 256  # pieces longer than this are merged with a heap: O(n log n) instead of O(n^2)

def bpe(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    """Apply BPE merges to one piece's ids: join the lowest-ranked adjacent pair (leftmost first) until none is left.

    Example with merges (h, e) -> he, (l, l) -> ll, (he, ll) -> hell, in that rank order:
    [h, e, l, l, o] -> [he, l, l, o] -> [he, ll, o] -> [hell, o].

    `found[k]` is the rank of the pair (ids[k], ids[k+1]). A merge changes only the two pairs beside it, so only
    those are looked up again; `min` and `index` scan the list in C. Long pieces go to a heap-based version, so a
    100 kB run of one letter does not take quadratic time.
    """
    return _bpe_heap(ids, ranks, merged) if len(ids) > _LONG_PIECE else _bpe_scan(ids, ranks, merged)


def _bpe_scan(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    ids = list(ids)
    get = ranks.get
    found = list(map(get, pairwise(ids), repeat(_NO_RANK, len(ids))))
    while found:
        rank = min(found)
        if rank == _NO_RANK:
            break
        i = found.index(rank)
        ids[i] = merged[rank]
        del ids[i + 1], found[i]
        if i > 0:
            found[i - 1] = get((ids[i - 1], ids[i]), _NO_RANK)
        if i < len(found):
            found[i] = get((ids[i], ids[i + 1]), _NO_RANK)
    return ids


def _bpe_heap(ids: list[int], ranks: Ranks, merged: Sequence[int]) -> list[int]:
    """`bpe` for long pieces: a linked list of tokens and a heap of (rank, position) candidates.

    Popping the smallest (rank, position) picks the lowest-ranked pair, leftmost first, like `bpe`. Entries go
    stale when a neighbour is merged; they are recognised on pop and skipped.
    """
    n = len(ids)
    tokens = list(ids)
    nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
    heap = [(ranks[p], i) for i, p in enumerate(pairwise(ids)) if p in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n:
            continue
        if ranks.get((tokens[i], tokens[j])) != rank:
            continue
        tokens[i], alive[j], nxt[i] = merged[rank], False, nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        for left in (prv[i], i):  # the two pairs that now involve the merged token
            right = nxt[left] if left >= 0 else n
            if left >= 0 and right < n and (tokens[left], tokens[right]) in ranks:
                heapq.heappush(heap, (ranks[tokens[left], tokens[right]], left))
    return [t for t, keep in zip(tokens, alive) if keep]


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list, in rank order, from tiktoken-style ranks ({token bytes: rank}).

    A tiktoken file stores only tokens and their ranks. Each multi-byte token was made by one merge of two earlier
    tokens; running BPE on its bytes with only the earlier merges stops at exactly those two parts.
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"the ranks lack the single-byte tokens of bytes {missing[:8]}; byte-level BPE needs all 256")
    byte_ids = [ranks[bytes([b])] for b in range(256)]
    token_of = {rank: token for token, rank in ranks.items()}
    pair_ranks: dict[tuple[int, int], int] = {}
    merged: list[int] = []
    merges = []
    for rank in sorted(token_of):
        token = token_of[rank]
        if len(token) == 1:
            continue
        split = _only_split(token, rank, ranks)
        if split:  # shortcut, taken for ~half of GPT-2's tokens: one split into two earlier tokens, so it is that one
            parts = [ranks[token[:split]], ranks[token[split:]]]
        else:
            parts = bpe([byte_ids[b] for b in token], pair_ranks, merged)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        pair_ranks[parts[0], parts[1]] = len(merged)
        merged.append(rank)
        merges.append((token_of[parts[0]], token_of[parts[1]]))
    return merges


def _only_split(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> int:
    """The cut k if token[:k] and token[k:] are earlier tokens for exactly one k; else 0."""
    found = 0
    for k in range(1, len(token)):
        if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank:
            if found:
                return 0
            found = k
    return found


class _BadMerge(ValueError):
    """A merge that does not fit the vocabulary; `index` lets file readers report the line."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"merge #{index}: {reason}")
        self.index, self.reason = index, reason


def _merge_table(merges: Sequence[tuple[bytes, bytes]], id_of: Mapping[bytes, int]) -> tuple[dict, list[int]]:
    """(ranks, merged) for `bpe`, checking that each merge builds only on bytes and earlier merges.

    That order is what makes BPE well defined (and lets the result not depend on how ties between equal pairs
    are broken).
    """
    made = {token for token in id_of if len(token) == 1}
    ranks: dict[tuple[int, int], int] = {}
    merged: list[int] = []
    for rank, (left, right) in enumerate(merges):
        if left not in made or right not in made:
            part = left if left not in made else right
            raise _BadMerge(rank, f"{_to_visible(part)!r} is neither a byte nor the result of an earlier merge")
        token = left + right
        if token not in id_of:
            raise _BadMerge(rank, f"the merged token {_to_visible(token)!r} is not in the vocabulary")
        ranks[id_of[left], id_of[right]] = rank
        merged.append(id_of[token])
        made.add(token)
    if len(ranks) != len(merges):
        seen = set()
        for rank, pair in enumerate(merges):
            if pair in seen:
                raise _BadMerge(rank, f"({_to_visible(pair[0])!r}, {_to_visible(pair[1])!r}) is listed twice")
            seen.add(pair)
    return ranks, merged
