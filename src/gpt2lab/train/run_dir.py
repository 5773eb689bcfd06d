"""The run directory (out_dir): what a run writes there, whether a run starts fresh or resumes, and its config.

A fresh run refuses to replace an existing run's checkpoints unless told to, and never writes into a directory of
other files; a run can always be resumed from its checkpoint alone, since each one keeps the run config.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from gpt2lab.checkpoint import MODEL_DIRECTORY
from gpt2lab.config import TrainConfig, apply_overrides, load_train_config
from gpt2lab.files import OutputKind, claim_directory, remove_abandoned
from gpt2lab.train.checkpoints import BEST, LAST, STATE_FILE, find_checkpoint, read_state_file
from gpt2lab.train.run_log import LOG_FILE, PLOT_FILE, is_own_log, is_own_plot

CONFIG_FILE = "config.toml"


RUN_FILES = (CONFIG_FILE, LOG_FILE, PLOT_FILE, LAST, BEST, f".{PLOT_FILE}.tmp", f".{LAST}.*", f".{BEST}.*",
             f".{LOG_FILE}.*", f".{CONFIG_FILE}.*")  # what a run writes into out_dir, temp files included


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
