"""The run's log: log.jsonl (one strict-JSON record per logged step or eval) and loss.png (the loss curve)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from gpt2lab.download import write_file_atomic
from gpt2lab.files import holds_mark

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


PLOT_MARK = "gpt2lab run loss plot"  # in loss.png's metadata: the plot is the run's (is_own_plot)


def is_own_plot(path: Path) -> bool:
    """Whether `path` is a loss plot a run drew (its PNG metadata names PLOT_MARK)."""
    return holds_mark(path, PLOT_MARK)


def is_own_log(path: Path) -> bool:
    """Whether `path` is a run's log.jsonl: every line a JSON object with an integer "step" (the last may be cut
    off by a kill)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                continue
            return False
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return False
    return True


def json_line(record: dict[str, Any]) -> str:
    """One line of strict JSON: non-finite numbers become null, since `NaN` and `Infinity` are not JSON and would
    break every reader of the log but Python's.

    >>> json_line({"step": 3, "loss": float("nan"), "mfu": 0.25})
    '{"step": 3, "loss": null, "mfu": 0.25}\\n'
    """
    finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


class RunLog:
    """The run directory's JSONL log and loss-curve PNG (rank 0 only)."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / LOG_FILE
        self.plot_path = out_dir / PLOT_FILE
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():  # keep history up to the checkpoint, drop the rest
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
        write_file_atomic(self.path, "".join(json_line(r) for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a failed write (a full disk) names the log, and leaves the checkpoints as they were."""
        self.records.append(record)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json_line(record))
        except OSError as e:
            raise OSError(f"could not append to {self.path} at step {record.get('step')} ({e}); the checkpoints "
                          "are unaffected") from e

    def plot(self) -> None:
        """Train and val loss against step; written to a temp file and renamed, so a viewer never sees half a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.records if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_name(f".{self.plot_path.name}.tmp")
        fig.savefig(tmp, format="png", metadata={"Software": PLOT_MARK})
        plt.close(fig)
        os.replace(tmp, self.plot_path)


def iter_log(out_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a run's log.jsonl."""
    with open(Path(out_dir) / LOG_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
