"""The `gpt2lab` parser and the entry point: build the subcommands, parse, dispatch, and turn a user's error into
one line on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gpt2lab.cli import inference, info, serve, training
from gpt2lab.cli.args import OneLineParser

USER_ERRORS = (ValueError, TypeError, OSError)  # what a user can fix: one line, no traceback

# One entry per subcommand, in the order `gpt2lab --help` lists them. Each adds its parser and sets `run`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    training.add_quickstart,
    info.add_info,
    info.add_tokenize,
    training.add_train_tokenizer,
    training.add_prepare,
    training.add_train,
    inference.add_generate,
    inference.add_eval,
    inference.add_attention,
    serve.add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    from gpt2lab import __version__

    parser = OneLineParser(prog="gpt2lab", description="A faithful, from-scratch GPT-2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error, the help or the version
        return e.code if isinstance(e.code, int) else 2
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("gpt2lab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except USER_ERRORS as e:
        print(f"gpt2lab {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0
