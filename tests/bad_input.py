"""Shared by the tests/test_bad_input_*.py files: the table format and the one assertion they make.

Each of those files holds, for the public functions and classes of some chapters' modules,
BAD_CALLS: {"module.name": [(argument, call), ...]}, where call() passes one bad argument and
must raise a TypeError or ValueError, raised by the book's own code (lrn_lib/ or kernels/, not
torch), whose message names the argument; and NO_BAD_INPUT: {"module.name": reason} for the few
names that take no argument a caller could get wrong. tests/test_bad_input_coverage.py checks
that together they list every public name of every chapter module.
"""
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = (ROOT / "lrn_lib", ROOT / "kernels")
BadCalls = dict[str, list[tuple[str, Callable[[], object]]]]


def cases(table: BadCalls) -> list:
    """pytest parameters, one per bad call, with ids "name-argument-index"."""
    return [pytest.param(arg, call, id=f"{name}-{arg}-{i}")
            for name, calls in table.items() for i, (arg, call) in enumerate(calls)]


def assert_clear_error(argument: str, call: Callable[[], object]) -> None:
    """call() raises TypeError/ValueError from the book's code, and the message names argument."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    raised_in = Path(info.traceback[-1].path).resolve()
    assert any(raised_in.is_relative_to(own) for own in OWN_CODE), \
        f"raised by {raised_in}, not by the book's code: {info.value!r}"
    assert argument in str(info.value), f"message does not name {argument!r}: {info.value}"
