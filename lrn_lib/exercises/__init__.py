"""Checkers for the exercises at the end of each chapter.

Hand-written tool (not exported from a chapter; listed under ``tools`` in book.toml). The
package holds the machinery (``machinery``: Case, Mistake, Exercise, check) and one module
per chapter, ``chNN``, with that chapter's input generators, mistake models and catalogue
entries; a chapter's module is imported the first time one of its ids is used.

    from lrn_lib.exercises import check, exercises
    exercises("02")                  # the chapter's exercise ids, each with one line about it
    check("02.merge", my_merge)      # hidden randomized tests: prints one line, returns True/False

``check`` draws fresh random inputs on every call (odd shapes, huge and tiny scores,
``-inf`` entries, empty pieces, whatever the exercise makes risky), calls the reader's
function on each, and compares the answer with the library's float64 reference. It
prints a single plain line: how many cases passed, or the first failing input, what the
function returned, what was expected, and a hint at the likely mistake. The hint comes
from running plausible wrong implementations (the *mistake models* of its chapter module) on the failing
input: when the reader's answer matches one, its hint names that mistake. An exception
raised by the reader's function is reported the same way, never raised. ``check(...,
seed=S)`` repeats a run; the failure line names the seed it used.

The failure line is kept readable: its values are shortened (a long tensor is named by its
shape) so that the input and the answers take at most ``SHORT_INPUT`` and ``SHORT_RESULT``
characters (the case and the hint are always whole), and a note says when something was
cut or named by its shape. ``check(..., verbose=True)`` prints the line uncut, followed by
every input, your answer and the expected answer in full. Exercise ids may be written
"01.name", "1.name" or " 01.name "; an answer that is not a function (``None``, a tensor)
gets its own message instead of a TypeError from calling it.
"""
from lrn_lib.exercises.machinery import (SHORT_INPUT, SHORT_NOTE, SHORT_RESULT, Case, Exercise, Mistake, check,
                                         exercises, every_exercise)

__all__ = ["Case", "Exercise", "Mistake", "check", "exercises", "EXERCISES",
           "SHORT_INPUT", "SHORT_NOTE", "SHORT_RESULT"]


def __getattr__(name: str) -> dict[str, Exercise]:
    """``EXERCISES``: every exercise by id ("01.logsumexp": Exercise), chapter by chapter; reading it
    imports every chapter's module, where ``check`` and ``exercises`` import only the one they need."""
    if name == "EXERCISES":
        return every_exercise()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
