"""The exercises of chapter 01 (Softmax): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 01 id is checked.

Hand-written; may import only library modules of chapter 01 or earlier (book.toml order).
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, INF, Mistake, _random_shape, _scores
from lrn_lib.softmax import logsumexp, safe_softmax


def _lse(x: torch.Tensor) -> torch.Tensor:
    return logsumexp(x, dim=-1)


def _cases_logsumexp(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    fixed = [([[1000.0, 0.0]], "a score of 1000"), ([[-1000.0, -1001.0]], "very negative scores"),
             ([[3.0]], "a single score"), ([[-INF, -INF, -INF], [0.0, 1.0, 2.0]], "a row of only -inf scores"),
             ([[-INF, 2.0, -INF, 800.0]], "-inf entries and a large score")]
    for rows, note in fixed:
        x = torch.tensor(rows, dtype=F64)
        yield Case((x,), ("x",), _lse(x), note)
    number = len(fixed)
    while True:
        number += 1
        x = _scores(rng, gen, _random_shape(rng, number))
        yield Case((x,), ("x",), _lse(x))


def _no_standin_lse(x: torch.Tensor) -> torch.Tensor:
    m = x.amax(-1, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))).squeeze(-1)


def _cases_log_softmax(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    fixed = [([[1000.0, 0.0]], "scores 1000 apart"), ([[-INF, 0.0, 1.0]], "a -inf entry"),
             ([[7.0]], "a single score"), ([[800.0, 799.0], [-800.0, -801.0]], "large and very negative scores")]
    for rows, note in fixed:
        x = torch.tensor(rows, dtype=F64)
        yield Case((x,), ("x",), x - _lse(x)[..., None], note)
    number = len(fixed)
    while True:
        number += 1
        x = _scores(rng, gen, _random_shape(rng, number), masked_rows=False, finite_per_row=True)
        yield Case((x,), ("x",), x - _lse(x)[..., None])


def _log_softmax_row_offset(case: Case, got: list[torch.Tensor]) -> str | None:
    """A hint when the answer is off by one constant per row (log softmax is shift-sensitive)."""
    x = case.args[0]
    diff = got[0] - (x - _lse(x)[..., None])
    finite = diff.isfinite()
    if not finite.any():
        return None
    filled = torch.where(finite, diff, diff[finite][0])
    spread = (filled.amax(-1) - filled.amin(-1)).abs().max().item()
    if spread < 1e-6 * (1 + x[x.isfinite()].abs().max().item()):
        return ("each row of yours is off by one constant: log softmax(x)_i = x_i - LSE(x), with "
                "LSE(x) = m + log sum_j e^(x_j - m) from equation (1.3)")
    return None


def _cases_temperature(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    fixed = [([[3.0, 2.0, 1.0]], 1.0, "temperature 1"), ([[2.0, 1.0, 0.0]], 0.001, "a tiny temperature"),
             ([[5.0, -5.0]], 1000.0, "a huge temperature"), ([[1.0, 3.0, -INF]], 0.5, "a -inf entry")]
    for rows, temperature, note in fixed:
        x = torch.tensor(rows, dtype=F64)
        yield Case((x, temperature), ("x", "temperature"), safe_softmax(x / temperature), note)
    number = len(fixed)
    while True:
        number += 1
        x = _scores(rng, gen, _random_shape(rng, number, 100), masked_rows=False, finite_per_row=True)
        x = torch.where(x.isfinite(), x / 30, x)     # scores of a few units; the temperature does the rest
        temperature = round(math.exp(rng.uniform(math.log(1e-3), math.log(1e3))), 4)
        yield Case((x, temperature), ("x", "temperature"), safe_softmax(x / temperature))


# ---------------------------------------------------------------- the catalogue

_OVERFLOW_01 = ("your answer has inf or nan where the true one is finite: e^x overflows for x > 709 in "
                "float64 (88.7 in float32); subtract the row maximum m before exponentiating, equation (1.2)")

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="01.logsumexp", summary="log-sum-exp over the last dim without overflow, equation (1.3)",
        signature="logsumexp(x: torch.Tensor) -> torch.Tensor  (x of shape (..., V), result of shape (...))",
        cases=_cases_logsumexp, n_cases=200, outputs=("lse",),
        fallback="LSE(x) = m + log sum_j e^(x_j - m) with m the row maximum, equation (1.3)",
        shape_hint="reduce over the last dimension only, and drop it: x of shape (..., V) gives (...)",
        nonfinite_hint=_OVERFLOW_01,
        mistakes=(
            Mistake(lambda x: torch.log(torch.exp(x).sum(-1)),
                    "you exponentiated x directly, and e^x overflows to inf (or every term underflows to 0): "
                    "subtract the row maximum m first and add it back, equation (1.3)"),
            Mistake(_no_standin_lse,
                    "a row of only -inf scores must give -inf (the log of an empty sum), not nan: "
                    "-inf - (-inf) is undefined, so when m = -inf subtract a stand-in 0 instead"),
            Mistake(lambda x: torch.log(torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)),
                    "you forgot to add m back: LSE(x) = m + log sum_j e^(x_j - m), equation (1.3)"),
            Mistake(lambda x: x.amax(-1),
                    "LSE(x) is m plus log sum_j e^(x_j - m), which lies between 0 and log V; the maximum alone "
                    "is only its lower bound"),
        )),
    Exercise(
        id="01.log_softmax", summary="log softmax over the last dim, finite wherever the score is, (1.3)",
        signature="log_softmax(x: torch.Tensor) -> torch.Tensor  (same shape as x)",
        cases=_cases_log_softmax, n_cases=200, outputs=("log_y",),
        fallback="log softmax(x)_i = x_i - LSE(x), with LSE(x) = m + log sum_j e^(x_j - m), equation (1.3)",
        shape_hint="return a tensor of x's shape: log softmax is taken along the last dimension",
        nonfinite_hint=_OVERFLOW_01,
        diagnose=_log_softmax_row_offset,
        mistakes=(
            Mistake(lambda x: torch.log(safe_softmax(x)),
                    "log(softmax(x)) loses small probabilities: e^(x_i - m) rounds to 0 when x_i - m < -745, "
                    "and log 0 = -inf; compute x_i - LSE(x) directly, equation (1.3)"),
            Mistake(lambda x: x - torch.log(torch.exp(x).sum(-1, keepdim=True)),
                    "e^x overflows (or all terms underflow to 0): compute LSE(x) with the maximum subtracted "
                    "and added back, equation (1.3)"),
            Mistake(lambda x: x - x.amax(-1, keepdim=True),
                    "you subtracted only m: log softmax(x)_i = x_i - m - log sum_j e^(x_j - m)"),
        )),
    Exercise(
        id="01.temperature", summary="softmax(x / T) over the last dim, safe for tiny and huge T",
        signature="temperature_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor",
        cases=_cases_temperature, n_cases=200, outputs=("y",),
        fallback="y = softmax(x / T): divide the scores by T, then apply the safe softmax (1.2)",
        shape_hint="return a tensor of x's shape: the softmax is taken along the last dimension",
        nonfinite_hint=("inf or nan: x / T is huge for a small T, so e^(x / T) overflows; subtract the "
                        "maximum of x / T (not of x) before exponentiating, equation (1.2)"),
        mistakes=(
            Mistake(lambda x, t: safe_softmax(x * t),
                    "you multiplied the scores by T; a temperature divides them: softmax(x / T)"),
            Mistake(lambda x, t: safe_softmax(x),
                    "your result does not depend on T: the scores must be divided by T first"),
            Mistake(lambda x, t: safe_softmax(x) / t,
                    "dividing the probabilities by T breaks their sum of 1: divide the scores, softmax(x / T)"),
        )),
)
