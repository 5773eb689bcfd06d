"""The old name of fast_step.py: `from gpt2lab.decode_step import DecodeStep` still works, with a warning."""

import warnings

from gpt2lab.fast_step import FlatStep

DecodeStep = FlatStep

warnings.warn("gpt2lab.decode_step is now gpt2lab.fast_step, and DecodeStep is FlatStep; import those instead",
              DeprecationWarning, stacklevel=2)
