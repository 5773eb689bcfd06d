"""`python -m gpt2lab.cli ...`: the same as the `gpt2lab` console script (torchrun needs the module form)."""

import sys

from gpt2lab.cli.commands import main

sys.exit(main())
