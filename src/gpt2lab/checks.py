"""One check per kind of value: an integer in a range, a finite number in a range, a flag.

Settings reach gpt2lab from Python calls, TOML run files, JSON config files, command-line flags and HTTP requests,
so a size may arrive as `True`, `2.0`, `"12"` or `nan`. Each helper returns the value when it is of the kind and in
the range, and otherwise raises a ValueError that names the setting, the value and what is allowed, the same words
wherever the check is made:

    >>> integer("n_layer", 12, low=1)
    12
    >>> integer("n_layer", 0, low=1)
    Traceback (most recent call last):
    ...
    ValueError: n_layer must be an integer >= 1, got 0

A wrong type is a ValueError too, not a TypeError: to the user it is one more bad value in a file or a flag, and the
command line and the server turn ValueErrors into one-line messages.
"""

from __future__ import annotations

import math
from typing import Any, Optional

MAX_SEED = 2**63 - 1  # torch's CPU generator keeps 63 bits of a seed: s and s + 2**63 would give one stream


def integer(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *, note: str = "") -> int:
    """`value` if it is an int in [low, high] (a missing bound: no limit); bool is refused, though Python counts it
    as an int. `note` says what a special value means.

    >>> integer("workers", 0, low=0, note="0: one per CPU core")
    0
    >>> integer("top_k", True, low=1)
    Traceback (most recent call last):
    ...
    ValueError: top_k must be an integer >= 1, got True
    >>> integer("port", 70000, 0, 65535, note="0: any free port")
    Traceback (most recent call last):
    ...
    ValueError: port must be an integer in [0, 65535] (0: any free port), got 70000
    """
    if isinstance(value, bool) or not isinstance(value, int) \
            or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{_range(low, high, False, False)}{_note(note)}, got {_show(value)}")
    return value


def number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
           low_open: bool = False, high_open: bool = False, note: str = "") -> float:
    """`value` as a float if it is a finite int or float in the range: [low, high] by default, an open end with
    `low_open` / `high_open`, no limit where a bound is None. bool, NaN, infinities and ints too large for a float
    are refused.

    >>> number("dropout", 0, 0, 1, high_open=True)
    0.0
    >>> number("top_p", 0.0, 0, 1, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be a number in (0, 1], got 0.0
    >>> number("lr", float("nan"), low=0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number >= 0, got nan
    """
    if not _is_finite_number(value) or (low is not None and (value < low or (low_open and value == low))) \
            or (high is not None and (value > high or (high_open and value == high))):
        kind = "a number" if low is not None and high is not None else "a finite number"
        raise ValueError(f"{name} must be {kind}{_range(low, high, low_open, high_open)}{_note(note)}, "
                         f"got {_show(value)}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """`value` if it is True or False; 1, "yes" or "false" are refused rather than guessed at.

    >>> flag("bias", "false")
    Traceback (most recent call last):
    ...
    ValueError: bias must be true or false, got 'false'
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}")
    return value


def _is_finite_number(value: Any) -> bool:
    """An int or float (not bool) that converts to a finite float (JSON allows NaN, Infinity and ints of any
    length)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _range(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    """' in [0, 1)', ' >= 1', ' < 2' or '': the allowed range as the error message words it."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_bound(high)}"
    return ""


def _bound(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def _show(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, so an error about a huge value stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
