"""The run directory (out_dir): what a run writes there, whether a run starts fresh or resumes, and its config.

A fresh run refuses to replace an existing run's checkpoints unless told to, and never writes into a directory of
other files; a run can always be resumed from its checkpoint alone, since each one keeps the run config.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

from gpt2lab.checkpoint import MODEL_DIRECTORY
from gpt2lab.config import TrainConfig, apply_overrides, load_train_config
from gpt2lab.files import OutputKind, claim_directory, remove_abandoned
from gpt2lab.train.checkpoints import BEST, LAST, STATE_FILE, find_checkpoint, read_state_file
from gpt2lab.train.run_log import LOG_FILE, PLOT_FILE, is_own_log, is_own_plot

CONFIG_FILE = "config.toml"
LOCK_FILE = ".gpt2lab-run.lock"  # held (flock) by the process that runs in out_dir; holds its pid


RUN_FILES = (CONFIG_FILE, LOG_FILE, PLOT_FILE, LAST, BEST, LOCK_FILE, f".{PLOT_FILE}.tmp", f".{LAST}.*",
             f".{BEST}.*", f".{LOG_FILE}.*", f".{CONFIG_FILE}.*")  # what a run writes into out_dir, temp files included


def _holds_only_run_files(out_dir: Path) -> bool:
    """True when `out_dir` holds nothing but what a run writes before its first checkpoint, proven by content, not
    name: a log.jsonl of step records, a loss.png with the run's mark. A config.toml counts as the run's only beside
    its log.jsonl (a run writes the log first): a user may keep their own run file there."""
    entries = [p.name for p in out_dir.iterdir()]
    known = all(any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES) for name in entries)
    if LOG_FILE in entries and not is_own_log(out_dir / LOG_FILE):
        return False
    if PLOT_FILE in entries and not is_own_plot(out_dir / PLOT_FILE):
        return False
    return known and (CONFIG_FILE not in entries or LOG_FILE in entries)


RUN_DIRECTORY = OutputKind("run directory", _holds_only_run_files, RUN_FILES)


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` while a run uses it: another process that starts a run there is refused (two runs in one
    directory would truncate each other's log and replace each other's checkpoints). An advisory lock (flock) on
    out_dir/.gpt2lab-run.lock, which the OS drops when the process ends, however it ends. The lock file is written
    only into a new or empty directory or a run directory; any other directory is left to `checkpoint_to_resume`'s
    refusal. Where flock is missing (not POSIX), runs are not locked."""
    if fcntl is None or (out_dir.exists() and not _may_hold_a_run(out_dir)):
        yield
        return
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _held(out_dir / LOCK_FILE):
            yield
    finally:  # a run refused before it wrote anything leaves no directory behind
        if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                (out_dir / LOCK_FILE).unlink()
                out_dir.rmdir()


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """flock `path` (created if missing) for as long as the context lasts, writing this process's pid into it."""
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise FileExistsError(f"{path.parent} is in use by another run (pid {pid}); wait for it to end, or "
                                  "choose another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _may_hold_a_run(out_dir: Path) -> bool:
    """Whether a run may put its lock file into the existing `out_dir`: empty, or a run directory."""
    return out_dir.is_dir() and (not any(out_dir.iterdir()) or find_checkpoint(out_dir) is not None
                                 or _holds_only_run_files(out_dir))


def checkpoint_to_resume(config: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). A fresh run refuses to replace an existing run's
    checkpoints unless told to (`overwrite`), so a forgotten `--resume` cannot wipe hours of training, and never
    writes into a directory of other files. Temp checkpoints that a killed run left are removed here."""
    out_dir = Path(config.out_dir)
    if out_dir.is_dir():
        for name in (LAST, BEST):
            remove_abandoned(out_dir / name)
    ckpt = find_checkpoint(out_dir) if out_dir.is_dir() else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (expected {out_dir / LAST}/{STATE_FILE})")
    if not resume and ckpt is not None and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run (checkpoint {ckpt}); pass --resume to continue it, "
                              "--overwrite to start again, or choose another out_dir")
    if ckpt is None:  # what is there holds no checkpoint, so it may go only if a run wrote it
        claim_directory(out_dir, RUN_DIRECTORY, overwrite=True)
    for name in (LAST, BEST):  # each checkpoint will replace these: find out now, not after the training
        d = out_dir / name
        if d.is_dir() and any(d.iterdir()) and not MODEL_DIRECTORY.is_own(d):
            raise FileExistsError(f"{d} is not a gpt2lab model directory (its config.json or model.safetensors is "
                                  "missing or not gpt2lab's), so the run could not replace it at its checkpoints; "
                                  "repair or move it first")
    return ckpt if resume else None


def load_run_config(run_dir: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config of an existing run, with `key=value` overrides: its config.toml, or, if that file is gone, the copy
    that every checkpoint keeps in training_state.json (so a run can always be resumed from its checkpoint alone)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).is_file():
        return load_train_config(run_dir / CONFIG_FILE, overrides)
    ckpt = find_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: neither {CONFIG_FILE} nor a checkpoint ({LAST}/{STATE_FILE}); "
                                "is it the out_dir of a training run?")
    saved = read_state_file(ckpt).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt / STATE_FILE}: holds no run config; resume with --config FILE.toml instead")
    return TrainConfig.from_dict(apply_overrides(saved, overrides))
