"""gpt2lab.checks: each kind of value is accepted in its range and refused outside it with a message that names the
setting, the value and the allowed range."""

from __future__ import annotations

import doctest

import pytest

from gpt2lab import checks
from gpt2lab.checks import flag, integer, number


def test_docstring_examples():
    assert doctest.testmod(checks).failed == 0


@pytest.mark.parametrize("args, expected", [
    (("n", 3), 3), (("n", -7), -7), (("n", 1, 1), 1), (("n", 5, None, 5), 5), (("n", 0, 0, 0), 0),
    (("n", 2**70, 1), 2**70),
])
def test_integer_accepts_ints_in_range(args, expected):
    assert integer(*args) == expected and type(integer(*args)) is int


@pytest.mark.parametrize("value, low, high, message", [
    (True, None, None, "n must be an integer, got True"),
    (2.0, 1, None, "n must be an integer >= 1, got 2.0"),
    ("12", 1, None, "n must be an integer >= 1, got '12'"),
    (None, 0, 9, "n must be an integer in [0, 9], got None"),
    (0, 1, None, "n must be an integer >= 1, got 0"),
    (10, 0, 9, "n must be an integer in [0, 9], got 10"),
    (-1, 0, 9, "n must be an integer in [0, 9], got -1"),
    (6, None, 5, "n must be an integer <= 5, got 6"),
])
def test_integer_refuses_bools_other_types_and_values_out_of_range(value, low, high, message):
    with pytest.raises(ValueError) as error:
        integer("n", value, low, high)
    assert str(error.value) == message


def test_integer_note_says_what_a_special_value_means():
    with pytest.raises(ValueError, match=r"^workers must be an integer >= 0 \(0: one per CPU core\), got -1$"):
        integer("workers", -1, 0, note="0: one per CPU core")


@pytest.mark.parametrize("args, kwargs, expected", [
    (("x", 1), {}, 1.0), (("x", 0.5, 0, 1), {}, 0.5), (("x", 0, 0, 1), {"high_open": True}, 0.0),
    (("x", 1, 0, 1), {"low_open": True}, 1.0), (("x", -1e300), {}, -1e300), (("x", 10**300, 0), {}, 1e300),
])
def test_number_accepts_finite_numbers_in_range_as_floats(args, kwargs, expected):
    value = number(*args, **kwargs)
    assert value == expected and type(value) is float


@pytest.mark.parametrize("value, low, high, kwargs, message", ids=lambda v: repr(v)[:20], argvalues=[
    (True, None, None, {}, "x must be a finite number, got True"),
    ("1", 0, None, {}, "x must be a finite number >= 0, got '1'"),
    (float("nan"), 0, None, {}, "x must be a finite number >= 0, got nan"),
    (float("inf"), 0, None, {}, "x must be a finite number >= 0, got inf"),
    (-float("inf"), None, None, {}, "x must be a finite number, got -inf"),
    (10**400, None, None, {}, "x must be a finite number, got " + "1" + "0" * 56 + "..."),
    (0, 0, None, {"low_open": True}, "x must be a finite number > 0, got 0"),
    (1.0, 0, 1, {"high_open": True}, "x must be a number in [0, 1), got 1.0"),
    (0.0, 0, 1, {"low_open": True}, "x must be a number in (0, 1], got 0.0"),
    (1.5, 0, 1, {}, "x must be a number in [0, 1], got 1.5"),
    (3, None, 2.5, {"high_open": True}, "x must be a finite number < 2.5, got 3"),
    (0.5, 1e-5, 0.25, {}, "x must be a number in [1e-05, 0.25], got 0.5"),
    (-1, 0, 1000, {"note": "milliseconds"}, "x must be a number in [0, 1000] (milliseconds), got -1"),
])
def test_number_refuses_non_numbers_non_finite_and_out_of_range(value, low, high, kwargs, message):
    with pytest.raises(ValueError) as error:
        number("x", value, low, high, **kwargs)
    assert str(error.value) == message


def test_flag_accepts_only_booleans():
    assert flag("bias", True) is True and flag("bias", False) is False
    for value in (1, 0, "true", None):
        with pytest.raises(ValueError, match=rf"^bias must be true or false, got {value!r}$"):
            flag("bias", value)
