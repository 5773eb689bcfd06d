"""The one process pool that tokenizes: `Tokenizer.encode_batch`, `encode(num_workers=...)` and `gpt2lab prepare`
all go through `tokenizer_pool`.

Each worker receives the tokenizer once, when it starts (by fork where the platform has it, else pickled), not
with every task; tasks then carry only text. Results come back in order.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import get_all_start_methods, get_context
from typing import Any, TypeVar

from gpt2lab import checks

Item = TypeVar("Item")
Result = TypeVar("Result")
# imap(fn, items, chunksize=1): fn(tokenizer, item) for each item, in order.
IMap = Callable[..., Iterator[Any]]

# Set in worker processes only (by the pool initializer), so the tokenizer crosses to each worker once, not per task.
_WORKER_TOKENIZER: Any = None


def check_workers(num_workers: object) -> int:
    """`num_workers` if it is an int >= 1; else a ValueError naming it."""
    return checks.integer("num_workers", num_workers, low=1)


@contextlib.contextmanager
def tokenizer_pool(tokenizer: Any, workers: int) -> Iterator[IMap]:
    """Yield `imap(fn, items, chunksize=1)`, which runs `fn(tokenizer, item)` for each item and yields the results
    in order: in `workers` processes, or lazily in this one when `workers` is 1.

    `fn` must be a module-level function (it is sent to the workers by name). `items` may be a generator; results
    are yielded as soon as they are ready, in the order of the items.

        >>> with tokenizer_pool(tok, 4) as imap:
        ...     ids = [a.tolist() for a in imap(encode_packed, texts)]
    """
    if check_workers(workers) == 1:
        yield lambda fn, items, chunksize=1: map(partial(fn, tokenizer), items)
        return
    with _context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield lambda fn, items, chunksize=1: pool.imap(partial(_call_in_worker, fn), items, chunksize=chunksize)


def encode_packed(tokenizer: Any, text: str, allowed_special: Any = frozenset()) -> array:
    """`tokenizer.encode(text)` as an array, which pickles as one block of bytes: far cheaper to send back from a
    worker than a list of Python ints."""
    return array("q", tokenizer.encode(text, allowed_special=allowed_special))


def _context():
    # fork shares the parent's tokenizer without pickling or re-importing anything; the workers run pure Python.
    return get_context("fork" if "fork" in get_all_start_methods() else None)


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _call_in_worker(fn: Callable[[Any, Item], Result], item: Item) -> Result:
    return fn(_WORKER_TOKENIZER, item)
