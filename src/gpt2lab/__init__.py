"""gpt2lab: a faithful, from-scratch GPT-2 in PyTorch.

This file only re-exports the public names::

    from gpt2lab import GPT, GPTConfig

The exports are resolved on first use (PEP 562), so `import gpt2lab.tokenizer` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {"GPT": "gpt2lab.pretrained", "GPTConfig": "gpt2lab.config", "PRESETS": "gpt2lab.config",
            "Tokenizer": "gpt2lab.tokenizer"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.config import PRESETS, GPTConfig
    from gpt2lab.pretrained import GPT
    from gpt2lab.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
