"""How a run stops early without losing work: divergence (a non-finite loss or weight) and stop signals.

A non-finite loss or weight stops the run before it can overwrite a good checkpoint (TrainingDiverged); the first
Ctrl-C or SIGTERM finishes the current step, saves `last/` and stops (TrainingInterrupted); every process agrees
on when to stop (`stop_code`).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from gpt2lab.train.runtime import Runtime


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite; the run stopped without writing them to a checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT (Ctrl-C) or SIGTERM after saving a resumable checkpoint (`checkpoint`, or None when
    no step had been taken). A KeyboardInterrupt, so callers that handle Ctrl-C keep working."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    def __str__(self) -> str:
        return str(self.args[0])


class StopSignals:
    """A context in which the first SIGINT or SIGTERM only asks the training loop to stop (it finishes the step, saves
    `last/` and raises TrainingInterrupted); a second one interrupts at once. Outside the main thread, where Python
    cannot install handlers, signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"gpt2lab train: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint "
              "(send it again to stop without saving)", file=sys.stderr, flush=True)


CONTINUE, TIME_UP, SIGNALLED = 0, 1, 2


def stop_code(time_up: bool, signalled: bool, runtime: Runtime) -> int:
    """CONTINUE, TIME_UP or SIGNALLED, the same on every process (the largest any process reports), so that all
    stop at the same step. Only rank 0 passes its clock, so rank 0's clock decides the time limit."""
    local = SIGNALLED if signalled else TIME_UP if time_up else CONTINUE
    if not runtime.distributed:
        return local
    flag = torch.tensor([local], dtype=torch.int64, device=runtime.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding inf or NaN; checked before every checkpoint, since saving such weights would
    replace a good checkpoint with a broken one."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
