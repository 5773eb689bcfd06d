"""The `gpt2lab` command line: parsing and dispatch only.

    args.py        the value types (one argparse type per kind of value), shared help texts, OneLineParser
    info.py        info, tokenize
    training.py    train-tokenizer, prepare, train, quickstart
    inference.py   generate, eval, attention
    serve.py       serve
    commands.py    COMMANDS (every subcommand, in --help order), build_parser, and main (parse, run, one-line errors)

Each subcommand has an `add_<name>(subparsers)` function that declares its flags and a `_run_<name>(args)` function
that calls into the package. Defaults come from the config dataclasses so each default exists once. Errors that a
user can fix (ValueError, TypeError, OSError) are printed as one line on stderr with a non-zero exit, no traceback.
Nothing imports this package; `gpt2lab` (the console script) and `python -m gpt2lab.cli` run `main`.
"""

from gpt2lab.cli.commands import build_parser, main
from gpt2lab.cli.inference import EVAL_RESULTS_FORMAT

__all__ = ["EVAL_RESULTS_FORMAT", "build_parser", "main"]
