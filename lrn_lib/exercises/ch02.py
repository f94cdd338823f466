"""The exercises of chapter 02 (Online softmax): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 02 id is checked.

Hand-written; may import only library modules of chapter 02 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, INF, Mistake, _randn, _random_shape, _scores
from lrn_lib.online_softmax import SoftmaxState, merge_lse, merge_states, softmax_backward_reference
from lrn_lib.softmax import safe_softmax


def _state(piece: torch.Tensor, rows: int) -> SoftmaxState:
    """The state (m, d) of each row of a (rows, n) piece; (-inf, 0) for an empty piece."""
    if piece.shape[-1] == 0:
        return SoftmaxState(torch.full((rows,), -INF, dtype=F64), torch.zeros(rows, dtype=F64))
    m = piece.amax(-1)
    m_safe = torch.where(m == -INF, torch.zeros_like(m), m)
    return SoftmaxState(m, torch.exp(piece - m_safe[:, None]).sum(-1))


def _cases_merge(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    def case(x: torch.Tensor, cut: int, note: str) -> Case:
        a, b = _state(x[:, :cut], x.shape[0]), _state(x[:, cut:], x.shape[0])
        return Case((a.m, a.d, b.m, b.d), ("m_a", "d_a", "m_b", "d_b"), tuple(merge_states(a, b)), note)

    yield case(torch.tensor([[1.0, 2.0, 5.0, 3.0], [9.0, 2.0, 5.0, 3.0]], dtype=F64), 2,
               "B holds the larger maximum in row 0, A in row 1")
    yield case(torch.tensor([[4.0, 1.0]], dtype=F64), 0, "A is empty: its state is (-inf, 0)")
    yield case(torch.tensor([[-INF, -INF], [1.0, 2.0]], dtype=F64), 1,
               "both pieces of the first row are all -inf")
    number = 3
    while True:
        number += 1
        rows, n = rng.randint(1, 5), rng.randint(0, min(200, 3 + 3 * number))
        x = _scores(rng, gen, (rows, max(n, 1)))[:, :n]
        yield case(x, rng.randint(0, n), "random")


def _merge_no_standin(m_a, d_a, m_b, d_b):
    m = torch.maximum(m_a, m_b)
    return m, d_a * torch.exp(m_a - m) + d_b * torch.exp(m_b - m)


def _cases_merge_lse(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    fixed = [([1000.0], [999.0], "large log-sum-exps"), ([-1000.0], [-1000.0], "very negative log-sum-exps"),
             ([-INF], [-INF], "two empty sets (-inf, -inf)"), ([-INF, 3.0], [2.0, -INF], "one side empty"),
             ([0.5, 1.0], [0.25, 1.0], "small values")]
    for a, b, note in fixed:
        a, b = torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)
        yield Case((a, b), ("lse_a", "lse_b"), merge_lse(a, b), note)
    number = len(fixed)
    while True:
        number += 1
        shape = _random_shape(rng, number, 50)[-rng.randint(1, 2):]
        a, b = (_scores(rng, gen, shape, masked_rows=False) for _ in range(2))
        yield Case((a, b), ("lse_a", "lse_b"), merge_lse(a, b))


def _cases_softmax_backward(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    def case(y: torch.Tensor, dy: torch.Tensor, note: str = "random") -> Case:
        return Case((y, dy), ("y", "dy"), softmax_backward_reference(y, dy, -1), note)

    yield case(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], dtype=F64),
               torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=F64), "two small rows")
    yield case(torch.tensor([[1.0]], dtype=F64), torch.tensor([[2.5]], dtype=F64), "a single column")
    yield case(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=F64),
               torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64), "one-hot and zero probabilities")
    number = 3
    while True:
        number += 1
        shape = _random_shape(rng, number, 200)
        if len(shape) == 1 and rng.random() < 0.7:
            shape = (rng.randint(2, 6), *shape)
        y = safe_softmax(_scores(rng, gen, shape, masked_rows=False, finite_per_row=True) / 100)
        yield case(y, _randn(gen, *shape) * rng.choice([0.1, 1.0, 10.0]))


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="02.merge", summary="merge two online-softmax states (m, d), equation (2.2)",
        signature="merge(m_a, d_a, m_b, d_b) -> tuple[torch.Tensor, torch.Tensor]  (returns (m, d))",
        cases=_cases_merge, n_cases=200, outputs=("m", "d"),
        fallback="m = max(m_A, m_B) and d = d_A e^(m_A - m) + d_B e^(m_B - m), equation (2.2)",
        shape_hint="m and d have one entry per row, the shape of m_a",
        nonfinite_hint=("nan or inf: when both states are empty, (-inf, 0), e^(-inf - (-inf)) is nan; "
                        "subtract a stand-in 0 when m = -inf, so the result is (-inf, 0) (section 2.3)"),
        mistakes=(
            Mistake(lambda ma, da, mb, db: (torch.maximum(ma, mb), da + db),
                    "your d ignores the rescaling e^(m_a - m) and e^(m_b - m): each sum was measured against "
                    "its own maximum; check equation (2.2)"),
            Mistake(lambda ma, da, mb, db: (lambda m: (m, da * torch.exp(ma - m).nan_to_num(0.0) + db))(
                        torch.maximum(ma, mb)),
                    "your d rescales A's sum but not B's: d = d_A e^(m_A - m) + d_B e^(m_B - m), equation (2.2)"),
            Mistake(lambda ma, da, mb, db: (lambda m: (m, da + db * torch.exp(mb - m).nan_to_num(0.0)))(
                        torch.maximum(ma, mb)),
                    "your d rescales B's sum but not A's: d = d_A e^(m_A - m) + d_B e^(m_B - m), equation (2.2)"),
            Mistake(_merge_no_standin,
                    "merging two empty states (-inf, 0) gave nan: e^(-inf - (-inf)) is undefined; subtract a "
                    "stand-in 0 when m = -inf, so the result is (-inf, 0) (section 2.3)"),
            Mistake(lambda ma, da, mb, db: (lambda m, ms: (m, da * torch.exp(ms - ma) + db * torch.exp(ms - mb)))(
                        torch.maximum(ma, mb), torch.maximum(ma, mb).clamp(min=-1e300)),
                    "your rescaling factor is upside down: it is e^(m_A - m) <= 1, equation (2.2)"),
            Mistake(lambda ma, da, mb, db: (torch.minimum(ma, mb), da + db),
                    "m must be the larger of the two maxima, max(m_A, m_B), equation (2.2)"),
        )),
    Exercise(
        id="02.merge_lse", summary="merge two log-sum-exps, equation (2.3)",
        signature="merge_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor",
        cases=_cases_merge_lse, n_cases=200, outputs=("lse",),
        fallback="lse = M + log(e^(lse_a - M) + e^(lse_b - M)) with M = max(lse_a, lse_b), equation (2.3)",
        shape_hint="the result has the shape of lse_a (elementwise)",
        nonfinite_hint=("inf or nan where the answer is finite: e^lse overflows above 709; subtract "
                        "M = max(lse_a, lse_b) inside the exponentials and add it back, equation (2.3)"),
        mistakes=(
            Mistake(lambda a, b: torch.log(torch.exp(a) + torch.exp(b)),
                    "you exponentiated the log-sum-exps directly: e^1000 is inf and e^-1000 is 0 in float64; "
                    "subtract M = max(lse_a, lse_b) first and add it back, equation (2.3)"),
            Mistake(lambda a, b: (lambda m: m + torch.log(torch.exp(a - m) + torch.exp(b - m)))(torch.maximum(a, b)),
                    "two empty sets (-inf, -inf) must merge to -inf, not nan: subtract a stand-in 0 when "
                    "M = -inf (section 2.3)"),
            Mistake(lambda a, b: torch.maximum(a, b),
                    "you returned max(lse_a, lse_b) and dropped log(e^(lse_a - M) + e^(lse_b - M)), equation (2.3)"),
            Mistake(lambda a, b: (lambda m: torch.log(torch.exp(a - m) + torch.exp(b - m)))(
                        torch.where(torch.maximum(a, b) == -INF, 0.0, torch.maximum(a, b))),
                    "you forgot to add M = max(lse_a, lse_b) back, equation (2.3)"),
        )),
    Exercise(
        id="02.softmax_backward", summary="softmax's backward pass dx from y and dy, equation (2.4)",
        signature="softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor  (softmax over the last dim)",
        cases=_cases_softmax_backward, n_cases=200, outputs=("dx",),
        fallback="dx = y * (dy - <dy, y>), with one dot product per row, equation (2.4)",
        shape_hint="dx has the shape of y and dy",
        mistakes=(
            Mistake(lambda y, dy: y * dy,
                    "you left out the term -y <dy, y>: dx = y * (dy - <dy, y>), equation (2.4)"),
            Mistake(lambda y, dy: y * (dy - (dy * y).sum()),
                    "the dot product <dy, y> is one number per row (sum over the last dim only, keepdim=True), "
                    "not over the whole tensor"),
            Mistake(lambda y, dy: y * (dy - (dy * y).sum(0, keepdim=True)),
                    "the dot product <dy, y> is taken along the softmax axis, the last dim, not the first"),
            Mistake(lambda y, dy: dy - (dy * y).sum(-1, keepdim=True),
                    "multiply by y: dx = y * (dy - <dy, y>), equation (2.4)"),
            Mistake(lambda y, dy: y * (1 - y) * dy,
                    "that is only the diagonal of the Jacobian, y_i (1 - y_i); the off-diagonal terms -y_i y_j "
                    "add up to -y_j <dy, y>, equation (2.4)"),
        )),
)
