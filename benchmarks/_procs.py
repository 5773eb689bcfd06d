"""Shared by the benchmarks that race contenders at once: each in its own spawned process, one row back from each.

A benchmark run with `--concurrent` starts its contenders together, one thread each, so that a noisy shared machine
slows all of them alike. `spawn` (not `fork`) gives each a fresh interpreter: no torch thread pool or OpenMP state is
inherited from the parent. Each contender puts its result row, a dict, on a queue as its last act.

Not a benchmark itself: `python benchmarks/train_loop.py` finds it because Python puts the script's directory first
on sys.path (tests/conftest.py's `load_benchmark` does the same).
"""

from __future__ import annotations

import multiprocessing
from typing import Callable, Sequence


def run_concurrently(target: Callable[..., dict], calls: Sequence[tuple]) -> list[dict]:
    """`target(*args, queue)` for each `args` of `calls`, all at once, each in a spawned process; returns the rows
    they put on the queue, in the order they finished. `target` must be importable by the child (a module-level
    function) and put exactly one row."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in calls]
    for p in procs:
        p.start()
    rows = [queue.get() for _ in procs]  # before join: a child cannot exit while its row is still in the pipe
    for p in procs:
        p.join()
    return rows
