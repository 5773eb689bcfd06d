"""benchmarks/_procs.py: contenders run at once, each in a spawned process, one row back from each; the benchmarks
that use it find it both when run as scripts and when the tests load them.

This module imports only the standard library at the top: the spawned children import it to find `report`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def report(name: str, extra: int, queue) -> None:
    """A contender: a row with its arguments and the process that ran it."""
    queue.put({"name": name, "extra": extra, "pid": os.getpid()})


def test_run_concurrently_returns_one_row_per_call_from_its_own_process():
    from conftest import load_benchmark  # here, not at the top: the children need no torch

    procs = load_benchmark("_procs")
    rows = procs.run_concurrently(report, [("a", 1), ("b", 2)])
    assert sorted((r["name"], r["extra"]) for r in rows) == [("a", 1), ("b", 2)]
    pids = {r["pid"] for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids
    assert procs.run_concurrently(report, []) == []


@pytest.mark.parametrize("name", ["train_loop", "speedrun"])
def test_benchmarks_that_share_the_helper_run_as_scripts(name):
    """`python benchmarks/{name}.py` imports `_procs` from its own folder (no package, no sys.path edits)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--concurrent" in done.stdout
