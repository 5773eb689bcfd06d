"""The command line's value types: one argparse type per kind of value, the shared help texts, and the parser class.

A bad value fails at parse time, before any model is loaded, with one line that names the flag (argparse adds
"argument --flag:") and what is allowed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, NoReturn

MAX_THREADS = 1024  # torch stores the thread count in a C int; far more threads than cores only slows it down
MAX_NEW_TOKENS = 1_000_000  # the decoder holds a token buffer this long


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper limit when `high` is None)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, zero: bool = False, above: bool = False,
           below: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, ... when `above` is set, ..., high) when `below` is),
    or exactly 0 as well when `zero` is set."""
    opening, closing = "(" if above else "[", ")" if below else "]"
    bounds = f"{'>' if above else '>='} {low:g}" if high == math.inf else f"in {opening}{low:g}, {high:g}{closing}"
    allowed = f"0 or a finite number {bounds}" if zero else f"a finite number {bounds}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low < value if above else low <= value) and (value < high if below else value <= high)
        if not (math.isfinite(value) and (inside or (zero and value == 0))):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def nonempty(text: str) -> str:
    """An argparse type for names, paths and texts where an empty string would silently mean something else
    (the current directory, a default)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


INFERENCE_DTYPES = ("fp32", "bf16", "int8", "int4")  # inference.INFERENCE_DTYPES, without importing torch to parse
DTYPE_HELP = "inference precision: fp32, bf16, int8 or int4 (default: fp32)"
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")  # visualize.IMAGE_KINDS, without importing torch to parse a command line


def image_file(text: str) -> str:
    """An argparse type for a picture to write: a path ending in .png, .svg or .pdf (the format follows it)."""
    if Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"must end in {', '.join(IMAGE_SUFFIXES)} (the picture's format), got "
                                         f"{text!r}")
    return text


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of the file `path` given with `flag`; a missing, unreadable or non-UTF-8 file is a ValueError
    naming the flag and the file (one line on stderr), not the OS's errno text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path}: a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None


def limit(text: str) -> int | float:
    """An argparse type for lm-eval's --limit: a count of examples per task (>= 1), or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value == int(value) and math.isfinite(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be a whole number of examples >= 1 or a fraction in (0, 1), got {text!r}")


POSITIVE = integer(1)
THREADS = integer(1, MAX_THREADS)
THREADS_HELP = (f"torch threads, 1..{MAX_THREADS} (default: every core this process may use where the native "
                "decode step tunes its own count, else the cores other programs leave idle, at least 1)")
TEXT_FIELD_HELP = "the field holding the text in a .jsonl source (default: text)"
MODEL_HELP = "a model directory or a hub name such as gpt2 (default: gpt2)"
TOKENIZER_HELP = "tokenizer (default: the model directory's, else gpt2)"


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line: the message and where the usage is, instead of the usage itself."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def set_threads(threads: int | None) -> None:
    """Use `threads` torch threads; None: `gpt2lab.cpu.default_threads` (every core where the native step's thread
    tuner follows the load, else the cores other programs leave idle now), since threads that must share a busy core
    slow decoding down several times."""
    import torch

    from gpt2lab.cpu import default_threads
    from gpt2lab.native_step import threads_adapt

    torch.set_num_threads(threads if threads is not None else default_threads(threads_adapt()))
