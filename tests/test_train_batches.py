"""The data stream (train/batches.py): data too short for one window is refused before the first step."""

from __future__ import annotations

import re

import pytest

from conftest import LINES, tiny_run
from gpt2lab import train as T
from gpt2lab.data import prepare


@pytest.mark.parametrize("val_fraction, split", [(0.0, "val"), (0.1, "train")])
def test_data_too_short_for_one_window_is_refused_before_the_first_step(tmp_path, val_fraction, split):
    text = "\n".join(LINES) + "\n" if split == "val" else "To be, or not.\nTo sleep.\n"
    (tmp_path / "t.txt").write_text(text)
    prepare(str(tmp_path / "t.txt"), tmp_path / "data", tokenizer="char", val_fraction=val_fraction, progress=False)
    cfg = tiny_run(tmp_path / "data", tmp_path / "run", seq_len=32)
    with pytest.raises(ValueError) as refused:
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before any step, log or checkpoint
    hint = "--val-fraction" if split == "val" else "more text or lower seq_len"
    assert re.search(rf"the {split} split of .* tokens, too few for one window of seq_len \+ 1 = 33 .*{hint}",
                     str(refused.value))
