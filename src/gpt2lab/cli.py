"""The `gpt2lab` command line: parsing and dispatch only.

Each subcommand has a `_add_<name>(subparsers)` function that declares its flags and a `_run_<name>(args)` function
that calls into the package. Defaults come from the config dataclasses so each default exists once. Errors that a
user can fix (ValueError, TypeError, OSError) are printed as one line on stderr with a non-zero exit, no traceback.
Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

USER_ERRORS = (ValueError, TypeError, OSError)


# ----------------------------------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's architecture, parameter table and forward-pass time")
    p.add_argument("model", nargs="?", default="gpt2", help="a preset name (e.g. gpt2, gpt2-tiny) or a model directory")
    p.add_argument("--seq-len", type=int, default=None, help="tokens in the timed forward pass (default: min(n_ctx, 1024))")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from gpt2lab.info import describe

    print(describe(args.model, seq_len=args.seq_len, threads=args.threads))


# ------------------------------------------------------------------------------------------------------------- parsing
# One entry per subcommand, in the order `gpt2lab --help` lists them. Each adds its parser and sets `run`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2lab", description="A faithful, from-scratch GPT-2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
