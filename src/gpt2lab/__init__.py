"""gpt2lab: a faithful, from-scratch GPT-2 in PyTorch.

This file only re-exports the public names::

    from gpt2lab import GPT, GPTConfig
"""

from gpt2lab.config import PRESETS, GPTConfig
from gpt2lab.model import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS"]
__version__ = "0.1.0"
