"""Deprecated: the server moved to the `gpt2lab.serve` package. `from gpt2lab.serve import ...` gives the same names."""

import warnings

from gpt2lab.serve import *  # noqa: F401,F403
from gpt2lab.serve import __all__  # noqa: F401

warnings.warn("gpt2lab.server is deprecated; import from gpt2lab.serve instead", DeprecationWarning, stacklevel=2)
