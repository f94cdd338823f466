"""Checkers for the exercises at the end of each chapter.

Hand-written tool (not exported from a chapter; listed under ``tools`` in book.toml).

    from lrn_lib.exercises import check, exercises
    exercises("02")                  # the chapter's exercise ids, each with one line about it
    check("02.merge", my_merge)      # hidden randomized tests: prints one line, returns True/False

``check`` draws fresh random inputs on every call (odd shapes, huge and tiny scores,
``-inf`` entries, empty pieces, whatever the exercise makes risky), calls the reader's
function on each, and compares the answer with the library's float64 reference. It
prints a single plain line: how many cases passed, or the first failing input, what the
function returned, what was expected, and a hint at the likely mistake. The hint comes
from running plausible wrong implementations (the *mistake models* below) on the failing
input: when the reader's answer matches one, its hint names that mistake. An exception
raised by the reader's function is reported the same way, never raised. ``check(...,
seed=S)`` repeats a run; the failure line names the seed it used.
"""
from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator

import numpy as np
import torch
from scipy import ndimage

from lrn_lib.attention import attention_reference, causal_visible
from lrn_lib.grpo import group_advantages, grpo_loss
from lrn_lib.llada import commit_most_confident, pretraining_loss, transfer_schedule
from lrn_lib.llama import RMSNorm, apply_rope, rope_cos_sin
from lrn_lib.moe import apply_capacity, switch_balance_loss, top_k_gate, update_balance_bias
from lrn_lib.online_softmax import SoftmaxState, merge_lse, merge_states, softmax_backward_reference
from lrn_lib.patching import HASH_BASE, HASH_PRIME, PAD, bytes_to_tensor, hash_ngram_ids
from lrn_lib.pipeline_parallel import bubble_fraction, gpipe_schedule, one_f_one_b_schedule, simulate_schedule
from lrn_lib.seem import MEMORY, OBJECT, QUERY, TEXT, VISUAL, bce_loss, dice_loss, query_prompt_mask, sequence_layout
from lrn_lib.shapes import next_click
from lrn_lib.softmax import logsumexp, safe_softmax
from lrn_lib.tensor_parallel import shard_bounds
from lrn_lib.tiling import matmul_flops, matmul_min_bytes, tiled_traffic_bytes

INF = float("inf")
F64 = torch.float64


# ---------------------------------------------------------------- the machinery

@dataclass
class Case:
    """One test input: the arguments, their names for the message, the expected answer.

    note: what is special about this input ("a row of only -inf scores"), or "random".
    """

    args: tuple
    names: tuple[str, ...]
    expected: Any
    note: str = "random"


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong implementation (same signature as the reader's) and the hint it earns."""

    model: Callable[..., Any]
    hint: str


@dataclass(frozen=True)
class Exercise:
    """A code exercise: its id ("NN.name"), a one-line summary, the signature the reader writes,
    the case generator and what to say when an answer is wrong."""

    id: str
    summary: str
    signature: str
    cases: Callable[[random.Random, torch.Generator], Iterator[Case]]
    n_cases: int
    outputs: tuple[str, ...]
    fallback: str                                   # the hint when nothing more specific fits
    mistakes: tuple[Mistake, ...] = ()
    shape_hint: str = ""
    nonfinite_hint: str = ""                        # for inf/nan where the answer is finite
    diagnose: Callable[[Case, list[torch.Tensor]], str | None] | None = None
    rtol: float = 1e-5
    atol: float = 1e-6

    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]


class _BadReturn(Exception):
    """The reader's function returned something that is not the expected kind of value."""


def _num(x: float) -> str:
    """A number in at most four significant digits; inf and nan spelled out."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


def _show(value: Any) -> str:
    """A short, one-line rendering of an argument or a result."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 12:
            def nested(t: torch.Tensor) -> str:
                if t.dim() == 0:
                    return _num(t.item())
                return "[" + ", ".join(nested(row) for row in t) + "]"
            return nested(value.detach().double().cpu())
        return f"<tensor of shape {tuple(value.shape)}>"
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):    # a pipeline schedule
        text = " | ".join(f"stage {s}: " + " ".join(f"{kind}{i}" for kind, i in actions)
                          for s, actions in enumerate(value))
        return f"[{text}]"
    text = repr(value)
    return text if len(text) <= 240 else text[:240] + " ..."


def _clone(value: Any) -> Any:
    """A copy of an argument, so a function that writes into its inputs cannot spoil a case."""
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value.clone() if isinstance(value, torch.Tensor) else value


def _as_tensors(result: Any, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The reader's result as a list of float64 tensors, one per output name."""
    if len(names) > 1:
        if not isinstance(result, (tuple, list)) or len(result) != len(names):
            what = f"a {type(result).__name__}" if not isinstance(result, (tuple, list)) else \
                f"{len(result)} values"
            raise _BadReturn(f"you returned {what}; expected a tuple ({', '.join(names)})")
        parts = list(result)
    else:
        parts = [result]
    tensors = []
    for name, part in zip(names, parts):
        if isinstance(part, Fraction):
            part = float(part)
        try:
            tensors.append(torch.as_tensor(part).detach().to("cpu", F64))
        except (TypeError, ValueError, RuntimeError):
            raise _BadReturn(f"you returned {name} as a {type(part).__name__}; expected a number or a tensor") \
                from None
    return tensors


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Entrywise closeness; equal infinities and nan against nan count as equal."""
    return torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


def _same_shape(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor | None:
    """got reshaped to want's shape when they agree (a 1-element answer for a scalar), else None."""
    if got.shape == want.shape:
        return got
    if want.dim() == 0 and got.numel() == 1:
        return got.reshape(())
    return None


def _first_difference(got: list[torch.Tensor], want: list[torch.Tensor], names: tuple[str, ...],
                      rtol: float, atol: float) -> str | None:
    """None when every output agrees, else a phrase naming the first wrong entry."""
    for name, g, w in zip(names, got, want):
        g = _same_shape(g, w)
        if g is None:
            return None  # shape problems are reported separately
        wrong = ~_close(g, w, rtol, atol)
        if wrong.any():
            index = tuple(int(i) for i in wrong.nonzero()[0])
            where = f"{name}[{', '.join(map(str, index))}]" if index else name
            return f"{where} = {_num(g[index].item())}, expected {_num(w[index].item())}"
    return None


def _agrees(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, atol: float) -> bool:
    """Whether two lists of outputs agree in shape and value."""
    for g, w in zip(got, want):
        g = _same_shape(g, w)
        if g is None or not bool(_close(g, w, rtol, atol).all()):
            return False
    return True


def _hint(exercise: Exercise, case: Case, got: list[torch.Tensor], want: list[torch.Tensor]) -> str:
    """The most specific hint for a wrong answer: shape, a matching mistake model, the exercise's
    own diagnosis, inf/nan where the answer is finite, or the general hint."""
    for g, w in zip(got, want):
        if _same_shape(g, w) is None:
            return exercise.shape_hint or exercise.fallback
    for mistake in exercise.mistakes:
        try:
            with torch.no_grad():
                modelled = _as_tensors(mistake.model(*map(_clone, case.args)), exercise.outputs)
        except Exception:  # a mistake model may itself fail on some inputs
            continue
        if _agrees(got, modelled, exercise.rtol, exercise.atol):
            return mistake.hint
    if exercise.diagnose is not None:
        specific = exercise.diagnose(case, got)
        if specific:
            return specific
    if exercise.nonfinite_hint and any(bool((~g.isfinite() & w.isfinite()).any()) for g, w in zip(got, want)):
        return exercise.nonfinite_hint
    return exercise.fallback


def _inputs(case: Case) -> str:
    return ", ".join(f"{name} = {_show(arg)}" for name, arg in zip(case.names, case.args))


def _outputs(values: list[torch.Tensor], names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return _show(values[0])
    return "(" + ", ".join(f"{n} = {_show(v)}" for n, v in zip(names, values)) + ")"


def _shapes(values: list[torch.Tensor], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} of shape {tuple(v.shape)}" for n, v in zip(names, values))


def check(exercise_id: str, fn: Callable, seed: int | None = None) -> bool:
    """Run the hidden randomized tests of exercise ``exercise_id`` on ``fn``; print one line.

    Returns True when every case agrees with the float64 reference. On the first wrong
    answer (or exception) prints the input, what ``fn`` returned, what was expected and a
    hint, and returns False. ``seed`` repeats a run (each call draws a fresh one otherwise).
    Raises ValueError for an unknown exercise id.
    """
    exercise = _find(exercise_id)
    seed = secrets.randbits(32) if seed is None else seed
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    names = exercise.outputs
    for number, case in enumerate(exercise.cases(rng, gen), start=1):
        if number > exercise.n_cases:
            break
        where = f"{exercise.id}: failed on case {number} of {exercise.n_cases} ({case.note}; seed {seed})"
        want = _as_tensors(case.expected, names)
        try:
            got = _as_tensors(fn(*map(_clone, case.args)), names)
        except _BadReturn as err:
            print(f"{where}: input {_inputs(case)}; {err} (the answer here is {_outputs(want, names)}). "
                  f"Hint: write {exercise.signature}.")
            return False
        except Exception as err:  # the reader's code failed: report it, do not raise
            print(f"{where}: input {_inputs(case)}; your function raised {type(err).__name__}: {err}; "
                  f"expected {_outputs(want, names)}. Hint: check it runs on this input; it should be "
                  f"{exercise.signature}.")
            return False
        difference = _first_difference(got, want, names, exercise.rtol, exercise.atol)
        shapes_ok = all(_same_shape(g, w) is not None for g, w in zip(got, want))
        if shapes_ok and difference is None:
            continue
        if shapes_ok:
            returned = f"you returned {_outputs(got, names)}, expected {_outputs(want, names)} " \
                       f"(first difference: {difference})"
        else:
            returned = f"you returned {_shapes(got, names)}, expected {_shapes(want, names)}"
        print(f"{where}: input {_inputs(case)}; {returned}. Hint: {_hint(exercise, case, got, want)}")
        return False
    print(f"{exercise.id}: passed {exercise.n_cases} random cases")
    return True


def exercises(chapter_id: str) -> list[str]:
    """The code exercises of a chapter ("02" or "2"), one line each: "id: summary; signature"."""
    chapter = f"{int(chapter_id):02d}" if str(chapter_id).isdigit() else str(chapter_id)
    found = [f"{e.id}: {e.summary}; write {e.signature}" for e in EXERCISES.values() if e.chapter == chapter]
    if not found:
        chapters = sorted({e.chapter for e in EXERCISES.values()})
        raise ValueError(f"no exercises for chapter {chapter_id!r}; chapters with exercises: {', '.join(chapters)}")
    return found


def _find(exercise_id: str) -> Exercise:
    if exercise_id not in EXERCISES:
        raise ValueError(f"no exercise {exercise_id!r}; known ids: {', '.join(EXERCISES)}")
    return EXERCISES[exercise_id]


# ---------------------------------------------------------------- random inputs

def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64)


def _random_shape(rng: random.Random, number: int, max_len: int = 300) -> tuple[int, ...]:
    """1 to 3 dimensions; the last one (the softmax axis) grows with the case number."""
    last = rng.randint(1, min(max_len, 4 + 3 * number))
    lead = [rng.randint(1, 5) for _ in range(rng.choice([0, 1, 1, 2]))]
    return (*lead, last)


def _scores(rng: random.Random, gen: torch.Generator, shape: tuple[int, ...], masked_rows: bool = True,
            finite_per_row: bool = False) -> torch.Tensor:
    """Random scores at a random scale (up to 1000), some entries -inf, sometimes whole rows."""
    x = _randn(gen, *shape) * rng.choice([0.1, 1.0, 30.0, 300.0, 1000.0])
    if rng.random() < 0.5:
        x[torch.rand(shape, generator=gen) < rng.choice([0.1, 0.3, 0.7])] = -INF
    if masked_rows and len(shape) > 1 and rng.random() < 0.3:
        x.view(-1, shape[-1])[rng.randrange(x.numel() // shape[-1])] = -INF
    if finite_per_row:  # every row keeps at least one finite score
        rows = x.view(-1, shape[-1])
        for r in range(rows.shape[0]):
            if not rows[r].isfinite().any():
                rows[r, rng.randrange(shape[-1])] = rng.gauss(0, 10)
    return x


def _loguniform_int(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


# ---------------------------------------------------------------- chapter 01

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


# ---------------------------------------------------------------- chapter 02

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


# ---------------------------------------------------------------- chapter 03

def _cases_tiled_matmul(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("a", "b", "block_m", "block_n", "block_k")

    def case(m: int, n: int, k: int, bm: int, bn: int, bk: int, note: str = "random") -> Case:
        a, b = _randn(gen, m, k), _randn(gen, k, n)
        return Case((a, b, bm, bn, bk), names, a @ b, note)

    yield case(1, 1, 1, 1, 1, 1, "1 x 1 matrices")
    yield case(8, 8, 8, 4, 4, 4, "blocks that divide every size")
    yield case(4, 4, 10, 4, 4, 4, "K = 10 with block_k = 4: a shorter last K block")
    yield case(7, 9, 4, 4, 4, 4, "M = 7 and N = 9 with blocks of 4: smaller edge tiles")
    yield case(5, 3, 7, 8, 8, 8, "blocks larger than the matrices")
    while True:
        m, n, k = (rng.randint(1, 48) for _ in range(3))
        while True:
            bm, bn, bk = (rng.randint(1, 32) for _ in range(3))
            if math.ceil(m / bm) * math.ceil(n / bn) * math.ceil(k / bk) <= 300:
                break
        yield case(m, n, k, bm, bn, bk)


def _matmul_without_k_tail(a, b, block_m, block_n, block_k):
    full = a.shape[1] // block_k * block_k
    return a[:, :full] @ b[:full]


def _matmul_without_edge_tiles(a, b, block_m, block_n, block_k):
    c = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    rows, cols = a.shape[0] // block_m * block_m, b.shape[1] // block_n * block_n
    c[:rows, :cols] = (a @ b)[:rows, :cols]
    return c


def _tiled_matmul_edges(case: Case, got: list[torch.Tensor]) -> str | None:
    """A hint when only entries in the last (shorter) row or column block are wrong."""
    a, b, bm, bn, _ = case.args
    wrong = ~_close(got[0], a @ b, 1e-5, 1e-6)
    inner = wrong[: a.shape[0] // bm * bm, : b.shape[1] // bn * bn]
    if wrong.any() and not inner.any():
        return ("only entries in the edge tiles (the last row or column block, shorter when the block "
                "size does not divide M or N) are wrong: slice a[i:i + block_m] and write back what "
                "the slice gives, equation (3.1)")
    return None


def _intensity(m: int, n: int, k: int, block_m: int, block_n: int, bytes_per_element: int) -> float:
    return matmul_flops(m, n, k) / tiled_traffic_bytes(m, n, k, block_m, block_n, bytes_per_element)


def _cases_tiled_intensity(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("m", "n", "k", "block_m", "block_n", "bytes_per_element")
    fixed = [((4096, 4096, 4096, 128, 128, 2), "large square, blocks divide"),
             ((100, 100, 100, 64, 64, 4), "blocks that do not divide"),
             ((1, 1, 1, 16, 16, 2), "1 x 1 x 1"), ((8192, 512, 1024, 128, 256, 2), "rectangular blocks")]
    for args, note in fixed:
        yield Case(args, names, _intensity(*args), note)
    while True:
        m, n, k = (_loguniform_int(rng, 1, 20000) for _ in range(3))
        if rng.random() < 0.5:
            block_m, block_n = rng.choice([16, 32, 64, 128, 256]), rng.choice([16, 32, 64, 128, 256])
        else:
            block_m, block_n = rng.randint(1, 300), rng.randint(1, 300)
        args = (m, n, k, block_m, block_n, rng.choice([1, 2, 4, 8]))
        yield Case(args, names, _intensity(*args))


def _traffic_floor(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * (n // block_n) + k * n * (m // block_m) + m * n) * s)


def _traffic_swapped(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * math.ceil(m / block_m) + k * n * math.ceil(n / block_n) + m * n) * s)


def _traffic_no_c(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * math.ceil(n / block_n) + k * n * math.ceil(m / block_m)) * s)


# ---------------------------------------------------------------- chapter 04

def _block_update_reference(acc, l, m, s, v):
    """One FlashAttention-2 step for a block of keys: the merge (2.2) with deferred normalization."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(m_new == -INF, torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m - m_safe)
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(-1), m_new


def _cases_block_update(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("acc", "l", "m", "s", "v")

    def walk(s_all: torch.Tensor, v_all: torch.Tensor, cuts: list[int], step: int, note: str) -> Case:
        rows, d = s_all.shape[0], v_all.shape[1]
        state = (torch.zeros(rows, d, dtype=F64), torch.zeros(rows, dtype=F64), torch.full((rows,), -INF, dtype=F64))
        bounds = [0, *cuts, s_all.shape[1]]
        for j in range(step):
            state = _block_update_reference(*state, s_all[:, bounds[j]:bounds[j + 1]], v_all[bounds[j]:bounds[j + 1]])
        s, v = s_all[:, bounds[step]:bounds[step + 1]], v_all[bounds[step]:bounds[step + 1]]
        return Case((*state, s, v), names, _block_update_reference(*state, s, v), note)

    s = torch.tensor([[0.5, 2.0, 1.0, 8.0], [3.0, -1.0, 0.0, 1.0]], dtype=F64)
    v = _randn(gen, 4, 3)
    yield walk(s, v, [2], 0, "the first key block: acc = 0, l = 0, m = -inf")
    yield walk(s, v, [2], 1, "the second block raises the first row's maximum from 2 to 8")
    masked = s.clone()
    masked[0, :2] = -INF
    yield walk(masked, v, [2], 0, "a first block whose first row is all masked (-inf)")
    yield walk(masked, v, [2], 1, "a row whose scores so far were all masked")
    while True:
        rows, d, n_keys = rng.randint(1, 8), rng.randint(1, 16), rng.randint(1, 50)
        s_all = _randn(gen, rows, n_keys) * rng.choice([1.0, 5.0, 30.0])
        if rng.random() < 0.6:
            s_all[torch.rand(rows, n_keys, generator=gen) < rng.choice([0.2, 0.5, 0.9])] = -INF
        if rng.random() < 0.3:
            s_all[rng.randrange(rows), : rng.randint(1, n_keys)] = -INF      # a masked stretch
        cuts = sorted(rng.sample(range(1, n_keys), k=min(n_keys - 1, rng.randint(0, 5)))) if n_keys > 1 else []
        yield walk(s_all, _randn(gen, n_keys, d), cuts, rng.randint(0, len(cuts)), "random")


def _update_l_not_rescaled(acc, l, m, s, v):
    new_acc, _, new_m = _block_update_reference(acc, l, m, s, v)
    m_safe = torch.where(new_m == -INF, torch.zeros_like(new_m), new_m)
    return new_acc, l + torch.exp(s - m_safe[:, None]).sum(-1), new_m


def _update_acc_not_rescaled(acc, l, m, s, v):
    _, new_l, new_m = _block_update_reference(acc, l, m, s, v)
    m_safe = torch.where(new_m == -INF, torch.zeros_like(new_m), new_m)
    return acc + torch.exp(s - m_safe[:, None]) @ v, new_l, new_m


def _update_normalized(acc, l, m, s, v):
    new_acc, new_l, new_m = _block_update_reference(acc, l, m, s, v)
    return new_acc / new_l[:, None], new_l, new_m


def _update_no_standin(acc, l, m, s, v):
    m_new = torch.maximum(m, s.amax(-1))
    p = torch.exp(s - m_new[:, None])
    alpha = torch.exp(m - m_new)
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(-1), m_new


def _update_m_kept(acc, l, m, s, v):
    new_acc, new_l, _ = _block_update_reference(acc, l, m, s, v)
    return new_acc, new_l, m


def _causal_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, note: str) -> Case:
    o, _ = attention_reference(q[None, None], k[None, None], v[None, None], causal=True)
    return Case((q, k, v), ("q", "k", "v"), o[0, 0], note)


def _cases_causal_attention(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    for n_q, n_k, d, note in [(4, 4, 2, "N_q = N_k"), (2, 5, 3, "N_q < N_k: the diagonal moves right"),
                              (5, 3, 2, "N_q > N_k: the first two queries see no key"),
                              (1, 1, 1, "one query, one key")]:
        yield _causal_case(_randn(gen, n_q, d), _randn(gen, n_k, d), _randn(gen, n_k, d), note)
    while True:
        n_q, n_k, d = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 16)
        scale = rng.choice([0.5, 1.0, 3.0])
        yield _causal_case(_randn(gen, n_q, d) * scale, _randn(gen, n_k, d) * scale, _randn(gen, n_k, d), "random")


def _attention_with(visible: Callable[[int, int], torch.Tensor], scale: bool = True, zero_empty: bool = True):
    """A one-head attention with a given mask rule; the model behind several mistake hints."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.T / (math.sqrt(q.shape[-1]) if scale else 1.0)
        s = s.masked_fill(~visible(q.shape[0], k.shape[0]), -INF)
        p = torch.softmax(s, -1)
        return (p.nan_to_num(0.0) if zero_empty else p) @ v
    return attend


def _top_left(n_q: int, n_k: int) -> torch.Tensor:
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None]


def _strict(n_q: int, n_k: int) -> torch.Tensor:
    return torch.arange(n_k)[None, :] < torch.arange(n_q)[:, None] + (n_k - n_q)


def _no_mask(n_q: int, n_k: int) -> torch.Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool)


# ---------------------------------------------------------------- chapter 05

def _distinct_choices(rng: random.Random, gen: torch.Generator, t: int, n_experts: int, k: int) -> torch.Tensor:
    """(t, k) expert indices, k different experts per token, from a router that is balanced,
    mildly skewed or strongly skewed towards a few experts."""
    skew = torch.zeros(n_experts, dtype=F64)
    favourites = rng.randint(0, min(3, n_experts))
    skew[torch.randperm(n_experts, generator=gen)[:favourites]] = rng.choice([0.0, 1.0, 3.0])
    scores = _randn(gen, t, n_experts) + skew
    return scores.topk(k, dim=-1).indices


def _switch_case(probs: torch.Tensor, indices: torch.Tensor, note: str = "random") -> Case:
    return Case((probs, indices), ("probs", "indices"), switch_balance_loss(probs, indices), note)


def _cases_switch_loss(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _switch_case(torch.full((4, 4), 0.1, dtype=F64) + 0.6 * torch.eye(4, dtype=F64),
                       torch.tensor([[0], [1], [2], [3]]), "perfect balance: f_i = P_i = 1/4, the loss is 1")
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 3, dtype=F64)
    yield _switch_case(collapsed, torch.zeros(3, 1, dtype=torch.long), "every token on expert 0")
    yield _switch_case(torch.tensor([[0.5, 0.3, 0.2]], dtype=F64), torch.tensor([[0, 1]]), "one token, top-2")
    yield _switch_case(torch.softmax(torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.5, 0.0]],
                                                  dtype=F64), -1),
                       torch.tensor([[0, 2], [1, 2], [0, 1]]), "three tokens, top-2: expert 2 gets two of six")
    while True:
        t, n = rng.randint(1, 200), rng.randint(2, 64)
        k = rng.randint(1, min(n, 4))
        logits = _randn(gen, t, n) * rng.choice([0.3, 1.0, 3.0])
        if rng.random() < 0.5:
            logits[:, rng.randrange(n)] += rng.choice([1.0, 4.0])      # a favourite expert
        probs = torch.softmax(logits, -1)
        if rng.random() < 0.7:
            indices = probs.topk(k, dim=-1).indices                    # the router's own top-k
        else:
            indices = _distinct_choices(rng, gen, t, n, k)             # noisy or biased selection
        yield _switch_case(probs, indices)


def _loads(indices: torch.Tensor, n_experts: int, per: int) -> torch.Tensor:
    """Counts of each expert among the indices, divided by `per`."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).to(F64) / per


def _switch_f_per_token(probs, indices):
    t, n = probs.shape
    return n * (_loads(indices, n, t) * probs.mean(0)).sum()


def _switch_f_sq(probs, indices):
    f = _loads(indices, probs.shape[1], indices.numel())
    return probs.shape[1] * (f * f).sum()


def _switch_chosen_p(probs, indices):
    n = probs.shape[1]
    chosen = torch.zeros_like(probs).scatter(-1, indices, 1.0)
    return n * (_loads(indices, n, indices.numel()) * (probs * chosen).mean(0)).sum()


def _switch_p_summed(probs, indices):
    n = probs.shape[1]
    return n * (_loads(indices, n, indices.numel()) * probs.sum(0)).sum()


def _switch_slide(probs, indices):
    f = _loads(indices, probs.shape[1], indices.numel())
    return probs.shape[1] * torch.where(f > 0, f * torch.log(f.clamp_min(1e-300)), torch.zeros_like(f)).sum()


def _gate_case(logits: torch.Tensor, k: int, renormalize: bool, note: str = "random") -> Case:
    return Case((logits, k, renormalize), ("logits", "k", "renormalize"), top_k_gate(logits, k, renormalize), note)


def _cases_top_k_gate(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    h = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0]], dtype=F64)
    yield _gate_case(h, 1, False, "Switch top-1 (5.4): the weight is p_i*, not 1")
    yield _gate_case(h, 1, True, "top-1 renormalized: every weight is 1")
    yield _gate_case(h, 2, True, "top-2 renormalized (Mixtral)")
    yield _gate_case(h, 2, False, "top-2 not renormalized")
    yield _gate_case(torch.tensor([[1000.0, 990.0, 0.0]], dtype=F64), 2, False, "logits of 1000")
    yield _gate_case(h[:1], 4, True, "k = E: every expert, in decreasing order")
    while True:
        t, n = rng.randint(1, 50), rng.randint(1, 64)
        k = rng.randint(1, min(n, 8))
        # distinct logits (gaps of at least 1.5 scale / n), so the top k has no ties
        perm = torch.rand(t, n, generator=gen).argsort(-1).to(F64)
        scale = rng.choice([0.1, 1.0, 5.0, 30.0])
        logits = scale * (perm + 0.5 * torch.rand(t, n, generator=gen, dtype=F64)) * 3 / n
        logits = logits + _randn(gen, t, 1) * rng.choice([0.0, 10.0])      # a shift per token changes nothing
        yield _gate_case(logits, k, rng.random() < 0.5)


def _gate_sorted_by_expert(logits, k, renormalize):
    weights, indices = top_k_gate(logits, k, renormalize)
    indices, order = indices.sort(-1)
    return weights.gather(-1, order), indices


def _gate_logit_weights(logits, k, renormalize):
    top, indices = logits.topk(k, dim=-1)
    return (top / top.sum(-1, keepdim=True) if renormalize else top), indices


def _gate_softmax_dim0(logits, k, renormalize):
    probs = torch.softmax(logits, 0)
    weights, indices = probs.topk(k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), indices


def _capacity_case(indices: torch.Tensor, n_experts: int, capacity: int, note: str = "random") -> Case:
    keep = apply_capacity(indices, torch.ones_like(indices, dtype=torch.bool), n_experts, capacity)
    return Case((indices, n_experts, capacity), ("indices", "n_experts", "capacity"), keep, note)


def _cases_capacity_mask(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _capacity_case(torch.tensor([[0, 1], [1, 0], [0, 1]]), 2, 1,
                         "capacity 1: token 1's first choice outranks token 0's second choice")
    yield _capacity_case(torch.tensor([[2], [2], [0], [2], [2]]), 3, 3, "top-1, expert 2 chosen four times")
    yield _capacity_case(torch.tensor([[0, 1], [0, 2], [1, 0]]), 3, 0, "capacity 0: everything is dropped")
    yield _capacity_case(torch.tensor([[0, 1], [0, 2], [1, 0]]), 3, 6, "room for every assignment")
    yield _capacity_case(torch.tensor([[0, 1, 2], [1, 0, 2], [0, 2, 1], [0, 1, 2]]), 3, 2,
                         "top-3 with 3 experts: each expert gets every token once")
    while True:
        t, n = rng.randint(1, 100), rng.randint(1, 16)
        k = rng.randint(1, min(n, 4))
        indices = _distinct_choices(rng, gen, t, n, k)
        if rng.random() < 0.6:
            capacity = math.ceil(k * t / n * rng.choice([0.5, 0.75, 1.0, 1.25, 1.5, 2.0]))   # (5.7)
        else:
            capacity = rng.randint(0, t)
        yield _capacity_case(indices, n, capacity)


def _capacity_in_order(order: str, extra: int = 0):
    """Keep assignments in a given priority order: "token" (row-major), "choice" but latest token
    first ("reversed"), or a separate counter per column ("column"); extra adds slots."""
    def keep_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
        t, k = indices.shape
        keep = torch.zeros(t, k, dtype=torch.bool)
        if order == "token":
            cells = [(i, j) for i in range(t) for j in range(k)]
        elif order == "reversed":
            cells = [(i, j) for j in range(k) for i in reversed(range(t))]
        else:
            cells = [(i, j) for j in range(k) for i in range(t)]
        used: dict[tuple[int, int], int] = {}
        for i, j in cells:
            key = (int(indices[i, j]), j if order == "column" else 0)
            if used.get(key, 0) < capacity + extra:
                used[key] = used.get(key, 0) + 1
                keep[i, j] = True
        return keep
    return keep_mask


def _bias_case(bias: torch.Tensor, indices: torch.Tensor, rate: float, note: str = "random") -> Case:
    expected = update_balance_bias(bias.clone(), indices, rate)
    return Case((bias, indices, rate), ("bias", "indices", "rate"), expected, note)


def _cases_bias_update(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _bias_case(torch.zeros(3, dtype=F64), torch.tensor([[0], [1], [1]]), 0.01,
                     "loads (1, 2, 0) around a mean of 1: expert 0 is exactly at the mean")
    yield _bias_case(torch.tensor([0.5, -0.2, 0.0, 0.1], dtype=F64), torch.tensor([[0, 1], [0, 2], [1, 0]]), 0.1,
                     "expert 3 received no token")
    yield _bias_case(torch.tensor([0.3], dtype=F64), torch.tensor([[0], [0]]), 0.5, "one expert")
    yield _bias_case(torch.zeros(4, dtype=F64), torch.tensor([[0, 1], [2, 3]]), 0.01,
                     "perfect balance: nothing moves")
    while True:
        t, n = rng.randint(1, 300), rng.randint(1, 64)
        k = rng.randint(1, min(n, 4))
        bias = _randn(gen, n) * rng.choice([0.0, 0.01, 1.0])
        yield _bias_case(bias, _distinct_choices(rng, gen, t, n, k), rng.choice([1e-3, 0.01, 0.1, 1.0]))


def _bias_counts(bias: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=bias.numel()).to(bias.dtype)


def _bias_flipped(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias - rate * torch.sign(c.mean() - c)


def _bias_no_sign(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + rate * (c.mean() - c)


def _bias_no_tie(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + torch.where(c > c.mean(), -rate, rate)


def _bias_step_only(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return rate * torch.sign(c.mean() - c)


def _bias_mean_of_tokens(bias, indices, rate):
    c = _bias_counts(bias, indices)
    return bias + rate * torch.sign(indices.shape[0] / bias.numel() - c)


# ---------------------------------------------------------------- chapter 06

def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).to(F64)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _cases_rms_norm(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("x", "weight", "eps")

    def case(x: torch.Tensor, weight: torch.Tensor, eps: float, note: str = "random") -> Case:
        return Case((x, weight, eps), names, _rms_norm_reference(x, weight, eps), note)

    yield case(torch.tensor([[3.0, -4.0]], dtype=F64), torch.ones(2, dtype=F64), 1e-5, "rms of (3, -4) is sqrt(12.5)")
    yield case(torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), torch.tensor([2.0, 0.5, -1.0], dtype=F64), 1e-5,
               "a gain that is not all ones")
    yield case(torch.zeros(2, 4, dtype=F64), torch.ones(4, dtype=F64), 1e-5, "a zero vector: eps keeps it finite")
    yield case(torch.tensor([[1e-4, -2e-4, 3e-4]], dtype=F64), torch.ones(3, dtype=F64), 1e-5,
               "tiny entries, where eps inside the square root dominates")
    yield case(torch.tensor([[5.0]], dtype=F64), torch.tensor([1.5], dtype=F64), 0.1, "d = 1")
    yield case(torch.tensor([[1000.0, 1.0, -1000.0, 2.0]], dtype=F64), torch.ones(4, dtype=F64), 1e-6,
               "large entries")
    while True:
        shape = _random_shape(rng, 6, 64)
        x = _randn(gen, *shape) * rng.choice([1e-3, 0.1, 1.0, 30.0])
        if rng.random() < 0.3:
            x = x + rng.choice([-5.0, 5.0])                      # a non-zero mean: RMSNorm keeps it
        weight = 1 + _randn(gen, shape[-1]) * rng.choice([0.0, 0.3])
        yield case(x, weight, rng.choice([1e-6, 1e-5, 1e-3, 0.1]))


def _layer_norm(x, weight, eps):
    centred = x - x.mean(-1, keepdim=True)
    return weight * centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    omega = theta ** (-torch.arange(0, d, 2, dtype=F64) / d)                      # (6.4)
    cos, sin = rope_cos_sin(positions, omega, F64)
    return apply_rope(x, cos, sin)                                                 # (6.5)


def _rope_with(x: torch.Tensor, angles: torch.Tensor, interleaved: bool = False, sign: float = 1.0) -> torch.Tensor:
    """Rotate pairs by the given angles (T, d/2): rotate-half pairs, or adjacent ones when interleaved."""
    cos, sin = angles.cos(), sign * angles.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _angles(positions: torch.Tensor, d: int, theta: float, exponent_step: int = 2) -> torch.Tensor:
    omega = theta ** (-torch.arange(0, d // 2, dtype=F64) * exponent_step / d)
    return positions.to(F64)[:, None] * omega[None, :]


def _cases_rope(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("x", "positions", "theta")

    def case(x: torch.Tensor, positions: torch.Tensor, theta: float, note: str = "random") -> Case:
        return Case((x, positions, theta), names, _rope_reference(x, positions, theta), note)

    yield case(_randn(gen, 1, 1, 3, 4), torch.tensor([0, 0, 0]), 10000.0, "every position 0: nothing rotates")
    yield case(torch.tensor([[[[1.0, 0.0]]]], dtype=F64), torch.tensor([1]), 10000.0,
               "d_h = 2, position 1: (1, 0) turns by 1 radian")
    yield case(_randn(gen, 1, 2, 4, 8), torch.tensor([5, 6, 7, 8]), 10000.0, "positions that do not start at 0")
    yield case(_randn(gen, 2, 1, 4, 6), torch.tensor([0, 1, 6, 7]), 500000.0,
               "two chunks of a sequence, as context parallelism gives a rank")
    yield case(_randn(gen, 1, 1, 2, 16), torch.tensor([100000, 131071]), 500000.0, "positions above 100,000")
    while True:
        b, h, t = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 12)
        d = 2 * rng.randint(1, 32)
        kind = rng.random()
        if kind < 0.4:
            start = rng.choice([0, rng.randint(0, 5000)])
            positions = torch.arange(start, start + t)
        elif kind < 0.7:
            positions = torch.tensor(sorted(rng.sample(range(4 * t + 10), t)))
        else:
            positions = torch.tensor([rng.randint(0, 200000) for _ in range(t)])
        yield case(_randn(gen, b, h, t, d), positions, rng.choice([10000.0, 500000.0, 100.0]))


def _shard(logits: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(logits.split(sizes, dim=-1))


def _sharded_case(logits: torch.Tensor, sizes: list[int], targets: torch.Tensor, note: str = "random") -> Case:
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none")            # (6.14)
    return Case((_shard(logits, sizes), targets), ("shards", "targets"), expected, note)


def _cases_sharded_cross_entropy(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    z = torch.tensor([[2.0, 0.0, -1.0, 3.0, 0.5], [0.0, 1.0, 0.0, -2.0, 4.0]], dtype=F64)
    yield _sharded_case(z, [5], torch.tensor([3, 1]), "one rank holds the whole vocabulary")
    yield _sharded_case(z, [2, 3], torch.tensor([0, 4]), "two ranks, targets on both")
    yield _sharded_case(z, [1, 1, 1, 1, 1], torch.tensor([2, 2]), "five ranks of one id each")
    big = torch.tensor([[1000.0, 999.0, 0.0, -5.0], [-1000.0, -1001.0, -999.0, -1000.5]], dtype=F64)
    yield _sharded_case(big, [2, 2], torch.tensor([1, 2]), "logits near +-1000")
    yield _sharded_case(torch.tensor([[-1000.0, -999.0, 1000.0]], dtype=F64), [2, 1], torch.tensor([0]),
                        "rank 0's logits are all about 2000 below rank 1's maximum")
    while True:
        t, v = rng.randint(1, 8), rng.randint(2, 200)
        t = min(t, v)
        if rng.random() < 0.5:
            sizes = [shard_bounds(v, r, t)[1] - shard_bounds(v, r, t)[0] for r in range(t)]
        else:
            cuts = sorted(rng.sample(range(1, v), t - 1)) if t > 1 else []
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, v])]
        n = rng.randint(1, 20)
        logits = _randn(gen, n, v) * rng.choice([0.5, 3.0, 30.0, 1000.0])
        if rng.random() < 0.3:
            logits[:, : sizes[0]] -= rng.choice([50.0, 2000.0])          # a rank whose logits are all far below
        yield _sharded_case(logits, sizes, torch.randint(0, v, (n,), generator=gen))


def _sharded_ce_parts(shards: list[torch.Tensor], targets: torch.Tensor, offset: bool = True):
    """Per-shard (max, target logit): the target is looked up at targets - start (or at targets when not offset)."""
    start, maxima, picked = 0, [], torch.zeros(targets.shape, dtype=F64)
    for z in shards:
        local = targets - (start if offset else 0)
        mine = (local >= 0) & (local < z.shape[-1])
        picked = picked + torch.where(mine, z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0],
                                      torch.zeros_like(picked))
        maxima.append(z.amax(-1))
        start += z.shape[-1]
    return maxima, picked


def _sharded_local_max(shards, targets):
    maxima, picked = _sharded_ce_parts(shards, targets)
    total = sum(torch.exp(z - m[:, None]).sum(-1) for z, m in zip(shards, maxima))
    m = torch.stack(maxima).amax(0)
    return torch.log(total) + m - picked


def _sharded_no_offset(shards, targets):
    maxima, picked = _sharded_ce_parts(shards, targets, offset=False)
    m = torch.stack(maxima).amax(0)
    total = sum(torch.exp(z - m[:, None]).sum(-1) for z in shards)
    return torch.log(total) + m - picked


def _sharded_no_max(shards, targets):
    _, picked = _sharded_ce_parts(shards, targets)
    return torch.log(sum(torch.exp(z).sum(-1) for z in shards)) - picked


def _sharded_max_not_added(shards, targets):
    maxima, picked = _sharded_ce_parts(shards, targets)
    m = torch.stack(maxima).amax(0)
    return torch.log(sum(torch.exp(z - m[:, None]).sum(-1) for z in shards)) - picked


def _simulate(schedule, forward_time, backward_time, in_order: bool = True, wait_downstream: bool = True) -> float:
    """Bubble (6.23) of a schedule with instant messages; the switches model two mistakes."""
    p = len(schedule)
    done: dict[tuple[str, int, int], float] = {}
    clock, pos = [0.0] * p, [0] * p
    busy = 0.0
    while any(pos[s] < len(schedule[s]) for s in range(p)):
        moved = False
        for s in range(p):
            while pos[s] < len(schedule[s]):
                kind, i = schedule[s][pos[s]]
                needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
                if kind == "B":
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 and wait_downstream else [])
                if any(n not in done for n in needs):
                    break
                start = max([clock[s] if in_order else 0.0] + [done[n] for n in needs])
                length = forward_time if kind == "F" else backward_time
                done[(kind, s, i)] = start + length
                clock[s] = max(clock[s], start + length)
                busy += length
                pos[s] += 1
                moved = True
        if not moved:
            raise ValueError("deadlock")
    return 1 - busy / (p * max(done.values()))


def _bubble_case(schedule, forward_time: int, backward_time: int, note: str = "random") -> Case:
    expected = float(bubble_fraction(simulate_schedule(schedule, forward_time, backward_time)))
    return Case((schedule, forward_time, backward_time), ("schedule", "forward_time", "backward_time"),
                expected, note)


def _cases_schedule_bubble(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _bubble_case(gpipe_schedule(1, 3), 1, 2, "one stage: never idle")
    yield _bubble_case(gpipe_schedule(2, 2), 1, 2, "GPipe, p = 2, m = 2: (6.24) gives 1/3")
    yield _bubble_case(one_f_one_b_schedule(4, 8), 1, 2, "1F1B, p = 4, m = 8")
    reversed_first = gpipe_schedule(3, 4)
    reversed_first[0] = [("F", i) for i in reversed(range(4))] + [("B", i) for i in range(4)]
    yield _bubble_case(reversed_first, 1, 2, "GPipe whose stage 0 runs its forwards in reverse order")
    yield _bubble_case(one_f_one_b_schedule(3, 5), 2, 3, "forward 2 units, backward 3")
    while True:
        p = rng.randint(1, 6)
        m = rng.randint(p, p + 8)
        f, b = rng.randint(1, 3), rng.randint(1, 4)
        kind = rng.random()
        if kind < 0.3:
            schedule = gpipe_schedule(p, m)
        elif kind < 0.6:
            schedule = one_f_one_b_schedule(p, m)
        else:  # every stage: its forwards, then its backwards, each in its own random order (never deadlocks)
            schedule = []
            for _ in range(p):
                forwards, backwards = list(range(m)), list(range(m))
                rng.shuffle(forwards)
                rng.shuffle(backwards)
                schedule.append([("F", i) for i in forwards] + [("B", i) for i in backwards])
        yield _bubble_case(schedule, f, b)


def _bubble_formula_of(schedule, forward_time, backward_time):
    p, m = len(schedule), len(schedule[0]) // 2
    return (p - 1) / (m + p - 1)


# ---------------------------------------------------------------- chapter 07

def _advantages_case(rewards: torch.Tensor, group_size: int, note: str = "random") -> Case:
    return Case((rewards, group_size), ("rewards", "group_size"), group_advantages(rewards, group_size)[0], note)


def _cases_group_advantages(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _advantages_case(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), 4, "one right answer of four")
    yield _advantages_case(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64), 3,
                           "two groups, one all right and one all wrong: advantages 0")
    yield _advantages_case(torch.tensor([0.0, 2.0], dtype=F64), 2, "G = 2")
    yield _advantages_case(torch.tensor([1.0, 0.0, 0.0, 1.5, 1.0, 1.0, 1.0, 1.0], dtype=F64), 4,
                           "section 7.2's example")
    yield _advantages_case(torch.tensor([3.0, 0.0, 1.0, 2.0, 10.0, 10.0], dtype=F64), 2,
                           "three groups of 2, the last equal")
    while True:
        groups, g = rng.randint(1, 16), rng.randint(2, 16)
        kind = rng.random()
        if kind < 0.4:
            rewards = (torch.rand(groups * g, generator=gen, dtype=F64) < rng.random()).to(F64)
        elif kind < 0.7:        # format plus accuracy rewards: 0, 0.5, 1 or 1.5
            rewards = torch.randint(0, 4, (groups * g,), generator=gen).to(F64) / 2
        else:
            rewards = _randn(gen, groups * g) * rng.choice([0.01, 1.0, 100.0])
        if rng.random() < 0.3:
            rewards.view(groups, g)[rng.randrange(groups)] = rng.choice([0.0, 1.0])   # an all-equal group
        yield _advantages_case(rewards, g)


def _adv_std(rewards, g, unbiased=True, eps=1e-4):
    grouped = rewards.view(-1, g)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=unbiased, keepdim=True) + eps)
            ).reshape(-1)


def _adv_batch(rewards, g):
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def _adv_strided(rewards, g):
    grouped = rewards.view(g, -1).T
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).T.reshape(-1)


def _grpo_reference(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    return grpo_loss(logp, old_logp, advantages, mask, loss_type="grpo", epsilon_low=epsilon, beta=beta,
                     ref_logp=ref_logp)[0]


_GRPO_NAMES = ("logp", "old_logp", "ref_logp", "advantages", "mask", "epsilon", "beta")


def _grpo_case(args: tuple, note: str = "random") -> Case:
    return Case(args, _GRPO_NAMES, _grpo_reference(*args), note)


def _prefix_mask(lengths: list[int], length: int) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


def _cases_grpo_loss(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.1]], dtype=F64)
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    yield _grpo_case((logp, logp.clone(), logp.clone(), adv, _prefix_mask([3, 2], 3), 0.2, 0.0),
                     "ratio 1 and beta 0: minus the mean advantage")
    yield _grpo_case((logp, logp - 0.5, logp.clone(), adv, _prefix_mask([3, 3], 3), 0.2, 0.0),
                     "ratio e^0.5 > 1 + epsilon: the positive advantage is clipped, the negative not")
    yield _grpo_case((logp, logp + 0.5, logp.clone(), adv, _prefix_mask([3, 3], 3), 0.2, 0.0),
                     "ratio e^-0.5 < 1 - epsilon: the negative advantage is clipped, the positive not")
    yield _grpo_case((logp, logp + 0.1, logp - 0.3, adv, _prefix_mask([2, 0], 3), 0.2, 0.04),
                     "a row with an empty mask, and beta = 0.04")
    yield _grpo_case((logp[:1, :1], logp[:1, :1] + 0.05, logp[:1, :1] - 1.0, adv[:1], torch.ones(1, 1, dtype=F64),
                      0.3, 0.5), "one token")
    while True:
        b, length = rng.randint(1, 12), rng.randint(1, 20)
        logp = -torch.rand(b, length, generator=gen, dtype=F64) * rng.choice([0.5, 3.0, 8.0])
        old = logp + _randn(gen, b, length) * rng.choice([0.0, 0.05, 0.3, 1.0])
        ref = logp + _randn(gen, b, length) * rng.choice([0.01, 0.3, 1.0])
        adv = _randn(gen, b) * rng.choice([0.1, 1.0, 3.0])
        if rng.random() < 0.3:
            adv[torch.rand(b, generator=gen) < 0.5] = 0.0                 # groups with equal rewards
        mask = _prefix_mask([rng.randint(0, length) for _ in range(b)], length)
        yield _grpo_case((logp, old, ref, adv, mask, rng.choice([0.1, 0.2, 0.28]), rng.choice([0.0, 0.04, 0.1])))


def _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, beta, pessimistic=True, kl="k3"):
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    pick = torch.minimum if pessimistic else torch.maximum
    per_token = -pick(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    delta = ref_logp - logp
    kl_term = torch.exp(delta) - delta - 1 if kl == "k3" else logp - ref_logp
    return per_token + beta * kl_term


def _grpo_max(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    per_token = _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, beta, pessimistic=False)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _grpo_token_mean(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    per_token = _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, beta)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _grpo_kl_sign(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    per_token = _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, -beta)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _grpo_k1(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    per_token = _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, beta, kl="k1")
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def _grpo_unmasked(logp, old_logp, ref_logp, advantages, mask, epsilon, beta):
    per_token = _grpo_parts(logp, old_logp, ref_logp, advantages, mask, epsilon, beta)
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()


# ---------------------------------------------------------------- chapter 08

def _rolling_case(data: bytes, n: int, table_size: int, note: str = "random") -> Case:
    expected = hash_ngram_ids(bytes_to_tensor(data), n, table_size)
    return Case((data, n, table_size), ("data", "n", "table_size"), expected, note)


def _cases_rolling_ids(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _rolling_case(b"the cat sat on the mat", 3, 4096, "section 8.5's 3-grams")
    yield _rolling_case(b"\x00\x00\x00\x00", 2, 1000, "zero bytes: c = x + 1 keeps them counted")
    yield _rolling_case(b"ab", 5, 4096, "n longer than the data: every n-gram starts in the padding")
    yield _rolling_case(b"\xff" * 20, 8, 2 ** 31, "a table larger than p: ids are the hash itself")
    yield _rolling_case(b"hello", 1, 7, "n = 1: the byte itself")
    yield _rolling_case(b"rolling hash", 4, 1, "a table of one row: every id is 0")
    while True:
        length = rng.randint(1, 200)
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(length))
        else:
            data = (bytes(rng.randrange(256) for _ in range(rng.randint(1, 5))) * length)[:length]
        table_size = rng.choice([1, 7, 4096, 500_009, 2 ** 20, rng.randint(1, 10 ** 9)])
        yield _rolling_case(data, rng.randint(1, 10), table_size)


def _rolling_with(c_of: Callable[[int], int], pad: int | None, prime: int | None):
    """The n-gram hashes with a chosen byte map, padding value (None: n-grams shortened at the start)
    and prime (None: no reduction mod p)."""
    def ids(data: bytes, n: int, table_size: int) -> list[int]:
        values = [c_of(x) for x in data]
        out = []
        for t in range(len(values)):
            window = values[max(0, t - n + 1): t + 1]
            if pad is not None:
                window = [pad] * (n - len(window)) + window
            h = 0
            for c in window:
                h = h * HASH_BASE + c
                if prime is not None:
                    h %= prime
            out.append(h % table_size)
        return out
    return ids


# ---------------------------------------------------------------- chapter 09

def _llada_case(logits, x0, masked, p, note: str = "random") -> Case:
    return Case((logits, x0, masked, p), ("logits", "x0", "masked", "p"), pretraining_loss(logits, x0, masked, p),
                note)


def _cases_pretraining_loss(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    v, b, length = 7, 3, 5
    x0 = torch.randint(0, v, (b, length), generator=gen)
    masked = torch.zeros(b, length, dtype=torch.bool)
    masked[0, :2], masked[1, 3], masked[2, 4] = True, True, True
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    yield _llada_case(torch.zeros(b, length, v, dtype=F64), x0, masked, p,
                      "uniform logits: every cross-entropy is log V")
    yield _llada_case(_randn(gen, b, length, v), x0, torch.zeros(b, length, dtype=torch.bool), p,
                      "no token masked: the loss is 0")
    yield _llada_case(_randn(gen, b, length, v), x0, torch.ones(b, length, dtype=torch.bool),
                      torch.ones(b, dtype=F64), "everything masked with p = 1: the mean cross-entropy")
    yield _llada_case(_randn(gen, b, length, v) * 1000, x0, masked, p, "logits of size 1000")
    yield _llada_case(_randn(gen, 2, 4, 3), torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]]),
                      torch.tensor([[True, False, False, False], [False, False, False, False]]),
                      torch.tensor([1e-3, 0.6], dtype=F64), "p = 0.001 on a row with one mask, a row with none")
    while True:
        b, length, v = rng.randint(1, 6), rng.randint(1, 30), rng.randint(2, 50)
        p = 1e-3 + (1 - 1e-3) * torch.rand(b, generator=gen, dtype=F64)                  # (9.2)
        masked = torch.rand(b, length, generator=gen, dtype=F64) < p[:, None]
        logits = _randn(gen, b, length, v) * rng.choice([0.5, 3.0, 30.0])
        yield _llada_case(logits, torch.randint(0, v, (b, length), generator=gen), masked, p)


def _masked_ce(logits, x0, masked):
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    return torch.where(masked, ce, torch.zeros_like(ce))


def _transfer_case(n_masked: torch.Tensor, steps: int, note: str = "random") -> Case:
    return Case((n_masked, steps), ("n_masked", "steps"), transfer_schedule(n_masked, steps), note)


def _cases_transfer_schedule(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _transfer_case(torch.tensor([10]), 4, "10 masks in 4 steps: 3, 3, 2, 2")
    yield _transfer_case(torch.tensor([0, 3]), 5, "no mask, and fewer masks than steps")
    yield _transfer_case(torch.tensor([12, 8]), 4, "counts that divide")
    yield _transfer_case(torch.tensor([7]), 1, "one step commits everything")
    while True:
        b, steps = rng.randint(1, 6), rng.randint(1, 64)
        n = torch.randint(0, rng.choice([4, 64, 512]), (b,), generator=gen)
        yield _transfer_case(n, steps)


def _commit_reference(x, proposal, confidence, counts, mask_id):
    """One low-confidence step of fill_masks (the library's commit_most_confident), new tokens only."""
    return commit_most_confident(x, proposal, confidence, counts, mask_id)[0]


_COMMIT_NAMES = ("x", "proposal", "confidence", "counts", "mask_id")


def _commit_case(x, proposal, confidence, counts, mask_id, note: str = "random") -> Case:
    return Case((x, proposal, confidence, counts, mask_id), _COMMIT_NAMES,
                _commit_reference(x, proposal, confidence, counts, mask_id), note)


def _cases_commit_low_confidence(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    m = 9
    x = torch.tensor([[3, m, m, 1, m], [m, m, 2, m, 0]])
    proposal = torch.tensor([[4, 5, 6, 7, 8], [1, 2, 3, 4, 5]])
    conf = torch.tensor([[0.99, 0.2, 0.7, 0.95, 0.5], [0.1, 0.3, 0.9, 0.2, 0.8]], dtype=F64)
    yield _commit_case(x, proposal, conf, torch.tensor([1, 2]), m,
                       "unmasked positions have the highest confidences and must be left alone")
    yield _commit_case(x, proposal, conf, torch.tensor([0, 1]), m, "a row that commits nothing")
    yield _commit_case(x, proposal, conf, torch.tensor([3, 3]), m, "every mask is committed")
    yield _commit_case(torch.tensor([[0, 1, 2]]), torch.tensor([[5, 5, 5]]), torch.tensor([[0.5, 0.6, 0.7]]),
                       torch.tensor([0]), 3, "no mask at all")
    while True:
        b, length, v = rng.randint(1, 6), rng.randint(1, 30), rng.randint(2, 20)
        mask_id = rng.choice([v, 0]) if rng.random() < 0.8 else v + 3
        low = 1 if mask_id == 0 else 0
        x = torch.randint(low, v + low, (b, length), generator=gen)
        x[torch.rand(b, length, generator=gen) < rng.random()] = mask_id
        proposal = torch.randint(low, v + low, (b, length), generator=gen)
        confidence = torch.rand(b, length, generator=gen, dtype=F64)
        n_masks = (x == mask_id).sum(1)
        counts = torch.tensor([rng.randint(0, int(k)) for k in n_masks])
        yield _commit_case(x, proposal, confidence, counts, mask_id)


def _commit_any_position(x, proposal, confidence, counts, mask_id):
    k = int(counts.max()) if counts.numel() else 0
    if k == 0:
        return x.clone()
    top = confidence.topk(k, dim=1).indices
    keep = torch.arange(k)[None] < counts[:, None]
    commit = torch.zeros_like(x, dtype=torch.bool).scatter(1, top, keep)
    return torch.where(commit, proposal, x)


def _commit_least_confident(x, proposal, confidence, counts, mask_id):
    return _commit_reference(x, proposal, -confidence, counts, mask_id)


def _commit_same_count(x, proposal, confidence, counts, mask_id):
    return _commit_reference(x, proposal, confidence, torch.full_like(counts, int(counts.max())), mask_id)


# ---------------------------------------------------------------- chapter 10

def _mask_losses_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(10.12) and (10.13) per mask: the library's dice_loss and bce_loss."""
    return dice_loss(logits, targets), bce_loss(logits, targets)


def _losses_case(logits: torch.Tensor, targets: torch.Tensor, note: str = "random") -> Case:
    return Case((logits, targets), ("logits", "targets"), _mask_losses_reference(logits, targets), note)


def _random_blobs(rng: random.Random, h: int, w: int, count: int) -> torch.Tensor:
    """An (h, w) bool mask: the union of `count` discs and axis-aligned rectangles at random places and sizes,
    some of them cut by the image border."""
    ys, xs = torch.arange(h, dtype=F64)[:, None], torch.arange(w, dtype=F64)[None, :]
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(count):
        cy, cx = rng.uniform(-1.0, h), rng.uniform(-1.0, w)
        if rng.random() < 0.5:
            r = rng.uniform(0.8, max(1.5, min(h, w) / 3))
            mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        else:
            mask |= ((ys - cy).abs() <= rng.uniform(0.5, max(1.0, h / 3))) & \
                    ((xs - cx).abs() <= rng.uniform(0.5, max(1.0, w / 3)))
    return mask


def _cases_mask_losses(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    targets = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    yield _losses_case(torch.zeros(2, 8, dtype=F64), targets, "zero logits: every sigma(m_x) is 1/2")
    yield _losses_case(torch.tensor([[-3.0, 0.5, 2.0, -1.0]], dtype=F64),
                       torch.tensor([[0, 1, 1, 0]], dtype=torch.bool), "one mask of four pixels")
    yield _losses_case(torch.full((1, 30), -800.0, dtype=F64), torch.zeros(1, 30, dtype=torch.bool),
                       "an empty target and a confidently empty prediction: the +1 terms give dice 0, not 0/0")
    confident = torch.where(targets, 1000.0, -1000.0).to(F64)
    confident[0, 3] = 1000.0                                                  # one false alarm
    yield _losses_case(confident, targets, "logits of size 1000")
    small = torch.zeros(1, 4096, dtype=torch.bool)
    small[0, :20] = True                                                      # exercise 1's 20-pixel object
    logits = torch.full((1, 4096), -6.0, dtype=F64)
    logits[0, 10:30] = 6.0                                                    # half right, 10 false alarms
    yield _losses_case(logits, small, "a 20-pixel object in a 4096-pixel image")
    yield _losses_case(torch.tensor([[0.7]], dtype=F64), torch.tensor([[True]]), "a single pixel")
    while True:
        n = rng.randint(1, 6)
        if rng.random() < 0.5:                                               # masks of an image, flattened
            h, w = rng.randint(1, 24), rng.randint(1, 24)
            targets = torch.stack([_random_blobs(rng, h, w, rng.randint(0, 3)).flatten() for _ in range(n)])
            agree = torch.where(targets, 1.0, -1.0).to(F64) * rng.choice([0.0, 1.0, 4.0])
            logits = agree + _randn(gen, n, h * w) * rng.choice([0.5, 2.0, 8.0])
        else:                                                                 # any pixels
            x = rng.randint(1, 500)
            density = rng.choice([0.0, 0.05, 0.5, 0.95, 1.0, rng.random()])
            targets = torch.rand(n, x, generator=gen) < density
            logits = _randn(gen, n, x) * rng.choice([0.5, 3.0, 30.0])
        yield _losses_case(logits, targets)


def _dice_with(logits, targets, smooth: float = 1.0, sigmoid: bool = True, square: bool = False):
    prob = logits.sigmoid() if sigmoid else logits
    t = targets.to(F64)
    denominator = (prob ** 2).sum(1) + (t ** 2).sum(1) if square else prob.sum(1) + t.sum(1)
    return 1 - (2 * (prob * t).sum(1) + smooth) / (denominator + smooth)


def _bce_naive(logits, targets):
    p, t = logits.sigmoid(), targets.to(F64)
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean(1)


def _prompt_table_case(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, note: str = "random") -> Case:
    return Case((kinds, groups, valid), ("kinds", "groups", "valid"),
                query_prompt_mask(kinds, groups, valid).allowed, note)


def _token_valid(kinds: torch.Tensor, b: int, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """valid (b, S): object queries, prompt queries and memory tokens are real; some visual and text tokens are
    padding, and now and then all of one prompt's tokens of one kind (a prompt without a phrase, or without a click)."""
    valid = torch.ones(b, kinds.numel(), dtype=torch.bool)
    tokens = (kinds == VISUAL) | (kinds == TEXT)
    valid[:, tokens] = torch.rand(b, int(tokens.sum()), generator=gen) >= rng.choice([0.0, 0.2, 0.5, 0.9])
    return valid


def _cases_prompt_table(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    kinds, groups = sequence_layout(3, 2, [VISUAL] * 4 + [TEXT] * 2, 2)
    valid = torch.ones(1, len(kinds), dtype=torch.bool)
    valid[0, 17:19] = False
    yield _prompt_table_case(kinds, groups, valid, "section 10.6's figure: 3 objects, 2 prompts with 4 visual, "
                                                   "2 text and 2 memory tokens, 2 padding tokens")
    kinds, groups = sequence_layout(4, 0, [VISUAL, TEXT], 0)
    yield _prompt_table_case(kinds, groups, torch.ones(2, 4, dtype=torch.bool), "no prompt: object queries only")
    kinds, groups = sequence_layout(2, 2, [VISUAL] * 3 + [TEXT] * 2, 1)
    valid = torch.ones(1, len(kinds), dtype=torch.bool)
    valid[0, 8:11] = False                                                   # prompt 0: a phrase, no click
    valid[0, 14:16] = False                                                  # prompt 1: a click, no phrase
    yield _prompt_table_case(kinds, groups, valid, "prompt 0 has only text tokens, prompt 1 only visual ones")
    kinds, groups = sequence_layout(0, 3, [TEXT] * 2, 0)
    yield _prompt_table_case(kinds, groups, torch.ones(1, len(kinds), dtype=torch.bool), "no object queries")
    kinds, groups = sequence_layout(2, 2, [VISUAL] * 2 + [TEXT], 2)
    order = torch.randperm(len(kinds), generator=gen)
    yield _prompt_table_case(kinds[order], groups[order], _token_valid(kinds[order], 2, rng, gen),
                             "the members in shuffled order: the rules follow kinds and groups, not positions")
    while True:
        n_object, n_prompts = rng.randint(0, 6), rng.randint(0, 4)
        token_kinds = [rng.choice([VISUAL, TEXT]) for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.5:
            token_kinds.sort()                                              # visual first, as the model has them
        n_memory = rng.choice([0, 0, 1, 2, 3])
        if n_object + n_prompts == 0:
            n_object = 1
        kinds, groups = sequence_layout(n_object, n_prompts, token_kinds, n_memory)
        note = "random"
        if rng.random() < 0.3:
            order = torch.randperm(len(kinds), generator=gen)
            kinds, groups, note = kinds[order], groups[order], "random, members shuffled"
        yield _prompt_table_case(kinds, groups, _token_valid(kinds, rng.randint(1, 3), rng, gen), note)


def _table_with(objects_see_all: bool = False, other_prompts: bool = False, all_kinds: bool = False,
                queries_see_objects: bool = False, use_valid: bool = True, self_always: bool = True):
    """query_prompt_mask with one rule changed; the model behind the table's mistake hints."""
    def table(kinds, groups, valid):
        ki, kj = kinds[:, None], kinds[None, :]
        same = (groups[:, None] == groups[None, :]) | other_prompts
        objects = (ki == OBJECT) & ((kj == OBJECT) | objects_see_all)
        queries = (ki == QUERY) & ((same & (kj != OBJECT)) | (queries_see_objects & (kj == OBJECT)))
        tokens = (ki >= VISUAL) & same & ((kj >= VISUAL) if all_kinds else (kj == ki))
        allowed = (objects | queries | tokens)[None].expand(valid.shape[0], -1, -1)
        if use_valid:
            allowed = allowed & valid[:, None, :]
        if self_always:
            allowed = allowed | torch.eye(kinds.numel(), dtype=torch.bool)
        return allowed
    return table


_KIND_NAMES = {OBJECT: "object query", QUERY: "prompt query", VISUAL: "visual token", TEXT: "text token",
               MEMORY: "memory token"}


def _table_member(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, b: int, i: int) -> str:
    kind, group = int(kinds[i]), int(groups[i])
    padding = "" if bool(valid[b, i]) else "padding "
    return f"{padding}{_KIND_NAMES[kind]}" + ("" if kind == OBJECT else f" of prompt {group}")


def _prompt_table_diagnose(case: Case, got: list[torch.Tensor]) -> str | None:
    """The first wrong cell of the table, in words."""
    kinds, groups, valid = case.args
    want = case.expected.to(F64)
    wrong = got[0] != want
    if not wrong.any():
        return None
    b, i, j = (int(v) for v in wrong.nonzero()[0])
    verdict = "may attend to it" if bool(want[b, i, j]) else "must not attend to it"
    return (f"in image {b}, row {i} is a {_table_member(kinds, groups, valid, b, i)} and key {j} a "
            f"{_table_member(kinds, groups, valid, b, j)}: the row {verdict}. The rules of section 10.6: object "
            "queries see object queries; a prompt query sees its own prompt's members; a prompt token sees its "
            "prompt's tokens of its own kind; padding keys are blocked; every row sees itself")


def _click_case(pred: torch.Tensor, target: torch.Tensor, note: str = "random") -> Case:
    point, positive = next_click(pred, target)
    return Case((pred, target), ("pred", "target"), (point, positive), note)


def _rect(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    """An (h, w) bool mask, True on rows y0..y1 and columns x0..x1 (inclusive)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def _shifted(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """mask moved by (dy, dx), what leaves the image is lost, what enters is False."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def _cases_next_click(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    empty = torch.zeros(14, 16, dtype=torch.bool)
    yield _click_case(empty, _rect(14, 16, 3, 2, 9, 10),
                      "an empty prediction: the first click, on the deepest pixel of the target")
    ys, xs = torch.arange(12)[:, None], torch.arange(12)[None, :]
    blobs = ((ys - 6) ** 2 + (xs - 5) ** 2 <= 9) | _rect(12, 12, 1, 8, 2, 10)
    yield _click_case(blobs, torch.zeros(12, 12, dtype=torch.bool), "an empty target: every error is a false alarm")
    yield _click_case(torch.zeros(12, 12, dtype=torch.bool), _rect(12, 12, 0, 0, 11, 4),
                      "a miss along three sides of the image: the border counts as outside (10.4)")
    yield _click_case(_rect(16, 16, 11, 11, 13, 13), _rect(16, 16, 1, 1, 7, 7),
                      "a 7 x 7 miss and a 3 x 3 false alarm: the deeper region gets the click")
    yield _click_case(_rect(20, 20, 2, 0, 3, 19), _rect(20, 20, 10, 3, 14, 7),
                      "a long, thin false alarm and a compact miss: larger means deeper, not more pixels")
    yield _click_case(_rect(12, 16, 7, 10, 9, 12), _rect(12, 16, 2, 2, 4, 4),
                      "a miss and a false alarm equally deep: the false alarm wins the tie")
    ys, xs = torch.arange(15)[:, None], torch.arange(15)[None, :]
    diamond = (ys - 7).abs() + (xs - 7).abs() <= 5
    yield _click_case(torch.zeros(15, 15, dtype=torch.bool), diamond | _rect(15, 15, 12, 0, 14, 3),
                      "a diamond-shaped miss: distances are Euclidean")
    ys, xs = torch.arange(24)[:, None], torch.arange(13)[None, :]
    yield _click_case(torch.zeros(24, 13, dtype=torch.bool), ((ys - 6).abs() + (xs - 6).abs() <= 5) |
                      _rect(24, 13, 13, 1, 21, 9), "a diamond and a square missed: the square is deeper, by (10.4)")
    yield _click_case(_rect(1, 16, 0, 5, 0, 12), _rect(1, 16, 0, 3, 0, 8),
                      "an image one pixel high: every error pixel has depth 1")
    yield _click_case(torch.zeros(9, 13, dtype=torch.bool), torch.ones(9, 13, dtype=torch.bool),
                      "the whole image is the object and nothing is predicted")
    while True:
        h, w = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.1:                                                    # nothing to find
            target = torch.zeros(h, w, dtype=torch.bool)
            pred = _random_blobs(rng, h, w, rng.randint(1, 3))
        else:
            target = _random_blobs(rng, h, w, rng.randint(1, 3))
            way = rng.choice(["empty", "shift", "grow", "shrink", "blobs", "shift and blobs"])
            if way == "empty":
                pred = torch.zeros_like(target)
            elif way in ("shift", "shift and blobs"):
                pred = _shifted(target, rng.randint(-4, 4), rng.randint(-4, 4))
            elif way in ("grow", "shrink"):
                change = ndimage.binary_dilation if way == "grow" else ndimage.binary_erosion
                pred = torch.from_numpy(change(target.numpy(), iterations=rng.randint(1, 3)))
            else:
                pred = target.clone()
            if way in ("blobs", "shift and blobs"):
                added, removed = (_random_blobs(rng, h, w, rng.randint(0, 2)) for _ in range(2))
                pred = (pred | added) & ~removed
        if bool((pred != target).any()):
            yield _click_case(pred, target)


def _depths(pred: torch.Tensor, target: torch.Tensor, pad: bool = True, metric: str = "euclidean"):
    """The inner distance transforms of the miss and the false-alarm regions (10.3), (10.4), as numpy arrays."""
    def depth(region: np.ndarray) -> np.ndarray:
        padded = np.pad(region, 1) if pad else region
        if metric == "euclidean":
            d = ndimage.distance_transform_edt(padded)
        else:
            d = ndimage.distance_transform_cdt(padded, metric=metric).astype(float)
        return d[1:-1, 1:-1] if pad else d
    return depth((target & ~pred).numpy()), depth((pred & ~target).numpy())


def _click_with(pad: bool = True, metric: str = "euclidean", choose: str = "deeper", last: bool = False,
                swap: bool = False, flip: bool = False):
    """next_click with one rule changed; the model behind the corrective click's mistake hints."""
    def click(pred, target):
        d_miss, d_false = _depths(pred, target, pad, metric)
        miss, false_alarm = bool((target & ~pred).any()), bool((pred & ~target).any())
        if not (miss and false_alarm):
            positive = miss
        elif choose == "deeper":
            positive = d_miss.max() > d_false.max()
        elif choose == "ties to misses":
            positive = d_miss.max() >= d_false.max()
        elif choose == "shallower":
            positive = d_miss.max() < d_false.max()
        else:                                                                    # "area"
            positive = int((target & ~pred).sum()) > int((pred & ~target).sum())
        depth = d_miss if positive else d_false
        flat = depth.reshape(-1)
        k = len(flat) - 1 - int(flat[::-1].argmax()) if last else int(flat.argmax())
        y, x = divmod(k, depth.shape[1])
        return torch.tensor([x, y] if swap else [y, x]), bool(positive) != flip
    return click


# ---------------------------------------------------------------- the catalogue

_EUCLIDEAN_HINT = ("(10.4) measures depth with the Euclidean distance (ndimage.distance_transform_edt), not a "
                   "chessboard or taxicab distance: a pixel one step along a diagonal lies sqrt(2) away")

_OVERFLOW_01 = ("your answer has inf or nan where the true one is finite: e^x overflows for x > 709 in "
                "float64 (88.7 in float32); subtract the row maximum m before exponentiating, equation (1.2)")

EXERCISES: dict[str, Exercise] = {e.id: e for e in [
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
    Exercise(
        id="03.tiled_matmul", summary="a @ b computed tile by tile, equation (3.1)",
        signature="tiled_matmul(a, b, block_m: int, block_n: int, block_k: int) -> torch.Tensor",
        cases=_cases_tiled_matmul, n_cases=60, outputs=("c",), atol=1e-5,
        fallback="C[I, J] = sum over P of A[I, P] B[P, J], equation (3.1): loop over tiles of C, and for each "
                 "over blocks of K, accumulating",
        shape_hint="C = A B has shape (M, N): M rows of a, N columns of b",
        diagnose=_tiled_matmul_edges,
        mistakes=(
            Mistake(_matmul_without_k_tail,
                    "your sum misses the last, shorter block along K (K is not a multiple of block_k): "
                    "loop with range(0, K, block_k) and slice, as in (3.1)"),
            Mistake(_matmul_without_edge_tiles,
                    "the edge tiles are missing: when block_m or block_n does not divide M or N the last "
                    "tiles are smaller, and range(0, M, block_m) with slicing covers them"),
        )),
    Exercise(
        id="03.tiled_intensity", summary="the arithmetic intensity of a tiled matmul, equations (3.2), (3.4), (3.5)",
        signature="tiled_intensity(m, n, k, block_m, block_n, bytes_per_element) -> float  (FLOP per byte)",
        cases=_cases_tiled_intensity, n_cases=200, outputs=("intensity",), rtol=1e-9, atol=0.0,
        fallback="I = 2MNK / Q_tiled with Q_tiled = (MK ceil(N / b_N) + KN ceil(M / b_M) + MN) s, "
                 "equations (3.2), (3.4) and (3.5)",
        shape_hint="return one number",
        mistakes=(
            Mistake(lambda m, n, k, bm, bn, s: 2 * bm * bn / ((bm + bn) * s),
                    "that is the large-matrix approximation I_tile of (3.5); count the exact traffic, with "
                    "ceilings and the write of C"),
            Mistake(_traffic_floor,
                    "partial tiles count: use ceil(N / b_N) and ceil(M / b_M), since a program at the edge "
                    "still reads whole panels (3.5)"),
            Mistake(_traffic_swapped,
                    "A is read once per column block of C, ceil(N / b_N) times, and B once per row block, "
                    "ceil(M / b_M) times: you swapped them (3.5)"),
            Mistake(lambda m, n, k, bm, bn, s: _intensity(m, n, k, bm, bn, s) / 2,
                    "a multiply-add is two floating-point operations: F = 2MNK, equation (3.2)"),
            Mistake(lambda m, n, k, bm, bn, s: matmul_flops(m, n, k) / matmul_min_bytes(m, n, k, s),
                    "that is the best case Q_min of (3.3); a tiled kernel rereads panels of A and B, (3.5)"),
            Mistake(_traffic_no_c,
                    "count the write of C, MN elements, in the traffic (3.5)"),
            Mistake(lambda m, n, k, bm, bn, s: _intensity(m, n, k, bm, bn, s) * s,
                    "traffic is in bytes: multiply the element count by bytes_per_element (3.5)"),
        )),
    Exercise(
        id="04.block_update", summary="one FlashAttention-2 step: merge a block of scores into (acc, l, m)",
        signature="block_update(acc, l, m, s, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]  "
                  "(acc: (B_r, d), l and m: (B_r,), s: (B_r, B_c) scaled, masked scores, v: (B_c, d))",
        cases=_cases_block_update, n_cases=200, outputs=("acc", "l", "m"),
        fallback="m_new = max(m, rowmax(s)); P = e^(s - m_new); l_new = e^(m - m_new) l + rowsum(P); "
                 "acc_new = e^(m - m_new) acc + P v (section 4.4, change 2)",
        shape_hint="return acc of shape (B_r, d) and l, m of shape (B_r,)",
        nonfinite_hint=("nan where the answer is finite: a row whose scores so far are all -inf has m = -inf, "
                        "and e^(-inf - (-inf)) is nan; use a stand-in maximum 0 there (sections 2.3 and 4.5)"),
        mistakes=(
            Mistake(_update_l_not_rescaled,
                    "your l ignores the rescaling e^(m - m_new) of the old sum: l_new = e^(m - m_new) l + "
                    "rowsum(P), the merge (2.2)"),
            Mistake(_update_acc_not_rescaled,
                    "your acc is not rescaled by e^(m - m_new) when the maximum grows: acc_new = "
                    "e^(m - m_new) acc + P v (change 2 of section 4.4)"),
            Mistake(_update_normalized,
                    "you normalized acc; FlashAttention-2 keeps it unnormalized and divides by l once, after "
                    "the last key block (change 2 of section 4.4)"),
            Mistake(_update_no_standin,
                    "a row whose scores so far are all masked (-inf) gave nan: e^(-inf - (-inf)) is undefined; "
                    "exponentiate against a stand-in maximum 0 there, so the row stays (0, 0, -inf)"),
            Mistake(_update_m_kept,
                    "m must become the new running maximum, max(m, rowmax(s))"),
        )),
    Exercise(
        id="04.causal_attention",
        summary="one head of attention with a bottom-right causal mask, N_q != N_k allowed (section 4.1)",
        signature="causal_attention(q, k, v) -> torch.Tensor  (q: (N_q, d), k, v: (N_k, d); returns (N_q, d))",
        cases=_cases_causal_attention, n_cases=150, outputs=("o",),
        fallback="S = Q K^T / sqrt(d); hide key j from query i unless j <= i + (N_k - N_q); O = softmax(S) V, "
                 "with O = 0 for queries that see no key (section 4.1)",
        shape_hint="O has one row per query and d columns: (N_q, d)",
        nonfinite_hint=("nan rows: when N_q > N_k the first N_q - N_k queries see no key, and their output "
                        "is defined as 0 (section 4.1)"),
        mistakes=(
            Mistake(_attention_with(_top_left),
                    "your mask is aligned to the top left (j <= i); the book aligns it to the bottom right, "
                    "j <= i + (N_k - N_q), so the last query sees every key (section 4.1)"),
            Mistake(_attention_with(causal_visible, zero_empty=False),
                    "queries that see no key (the first N_q - N_k when N_q > N_k) must output 0, not nan "
                    "(section 4.1)"),
            Mistake(_attention_with(causal_visible, scale=False),
                    "scale the scores by tau = 1 / sqrt(d) before the softmax, equation (4.1)"),
            Mistake(_attention_with(_strict),
                    "off by one: query i sees key j when j <= i + (N_k - N_q), the diagonal included"),
            Mistake(_attention_with(_no_mask),
                    "no key is masked: a causal mask hides key j from query i when j > i + (N_k - N_q)"),
        )),
    Exercise(
        id="05.switch_loss", summary="the Switch load-balancing loss n sum_i f_i P_i, equations (5.8) and (5.9)",
        signature="switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor  "
                  "(probs: (T, E) router probabilities, indices: (T, k) chosen experts; returns a scalar)",
        cases=_cases_switch_loss, n_cases=200, outputs=("loss",),
        fallback="L_bal = n sum_i f_i P_i, with f_i the fraction of the kT assignments that chose expert i "
                 "and P_i the mean of p_i(x_t) over the T tokens, equations (5.8) and (5.9)",
        shape_hint="return one number (a 0-dim tensor): the loss sums over the experts",
        mistakes=(
            Mistake(_switch_f_per_token,
                    "f_i is a fraction of the kT assignments, not of the T tokens: divide expert i's count by "
                    "kT, so that the f_i sum to 1, equation (5.8)"),
            Mistake(lambda probs, indices: switch_balance_loss(probs, indices) / probs.shape[1],
                    "multiply by n, the number of experts: at perfect balance f_i = P_i = 1/n and the loss "
                    "is 1, equation (5.9)"),
            Mistake(lambda probs, indices: probs.shape[1] * probs.mean(0).square().sum(),
                    "you used P in place of f: f_i counts the experts actually chosen (indices), P_i averages "
                    "the probabilities, and (5.9) multiplies the two"),
            Mistake(_switch_f_sq,
                    "you used f in place of P: P_i = (1/T) sum_t p_i(x_t) is the mean router probability, the "
                    "only factor with a gradient, equations (5.8) and (5.9)"),
            Mistake(_switch_chosen_p,
                    "P_i averages p_i(x_t) over all T tokens, whether or not they chose expert i, (5.8)"),
            Mistake(_switch_p_summed,
                    "P_i is the mean of p_i(x_t) over the T tokens, not their sum, (5.8)"),
            Mistake(_switch_slide,
                    "that is the slide's n sum_i f_i log f_i (5.11), a measure with no gradient; the Switch "
                    "loss is n sum_i f_i P_i (5.9)"),
        )),
    Exercise(
        id="05.top_k_gate", summary="top-k gating: Switch's p_i* (5.4) or Mixtral's renormalized weights",
        signature="top_k_gate(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]  "
                  "(logits (T, E) -> (weights (T, k), indices (T, k)), the largest probability first)",
        cases=_cases_top_k_gate, n_cases=200, outputs=("weights", "indices"),
        fallback="p = softmax(h) over the experts; the k largest p_i, in decreasing order, are the weights and "
                 "their experts the indices; with renormalize, divide the k weights by their sum (section 5.2)",
        shape_hint="return weights and indices of shape (T, k): k experts for each of the T tokens",
        nonfinite_hint=("inf or nan: e^h overflows for logits like 1000; use torch.softmax, or subtract each "
                        "token's largest logit first, equation (1.2)"),
        mistakes=(
            Mistake(lambda logits, k, renormalize: top_k_gate(logits, k, False),
                    "with renormalize=True (Mixtral) divide the k chosen probabilities by their sum, so each "
                    "token's weights add up to 1"),
            Mistake(lambda logits, k, renormalize: top_k_gate(logits, k, True),
                    "with renormalize=False (Switch, (5.4)) the weight is the softmax probability p_i itself, "
                    "not renormalized: a top-1 weight of 1 would give the router no gradient through the "
                    "weight"),
            Mistake(_gate_logit_weights,
                    "the weights are probabilities, p = softmax(h) over the experts, not the logits h"),
            Mistake(lambda logits, k, renormalize: (lambda w, i: (w, i))(
                        *torch.softmax(logits, -1).topk(k, dim=-1, largest=False)),
                    "you picked the k smallest probabilities; the gate keeps the k largest (topk, largest=True)"),
            Mistake(_gate_sorted_by_expert,
                    "list each token's chosen experts in decreasing order of probability (as torch.topk "
                    "returns them), not by expert number"),
            Mistake(_gate_softmax_dim0,
                    "take the softmax over the experts (the last dim, dim=-1): each token's probabilities "
                    "sum to 1, not each expert's"),
        )),
    Exercise(
        id="05.capacity_mask", summary="which assignments survive an expert capacity C (5.7): first choices first",
        signature="capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor  "
                  "(indices (T, k) -> keep (T, k) bool)",
        cases=_cases_capacity_mask, n_cases=200, outputs=("keep",), rtol=0.0, atol=0.0,
        fallback="each expert keeps its first `capacity` assignments in priority order: all first choices "
                 "(column 0) in token order, then all second choices, and so on (section 5.3)",
        shape_hint="keep has the shape of indices, (T, k): one True or False per assignment",
        mistakes=(
            Mistake(_capacity_in_order("token"),
                    "you filled slots token by token (token 0's first and second choice, then token 1's, ...); "
                    "the priority of section 5.3 takes all first choices before any second choice, so a "
                    "second choice only gets the slots the first choices left (walk indices column by column)"),
            Mistake(_capacity_in_order("choice", extra=1),
                    "off by one: an expert keeps exactly `capacity` assignments, slots 0 to capacity - 1"),
            Mistake(_capacity_in_order("choice", extra=-1),
                    "off by one: an expert keeps `capacity` assignments, not capacity - 1"),
            Mistake(_capacity_in_order("reversed"),
                    "within a column earlier tokens come first: token 0's choice takes a slot before token 1's"),
            Mistake(_capacity_in_order("column"),
                    "the capacity is per expert, shared by all choices: first and second choices fill the "
                    "same `capacity` slots, not `capacity` each"),
            Mistake(lambda indices, n_experts, capacity: torch.ones_like(indices, dtype=torch.bool),
                    "nothing was dropped: an expert with more than `capacity` assignments drops the rest "
                    "(section 5.3)"),
        )),
    Exercise(
        id="05.bias_update", summary="DeepSeek-V3's loss-free balancing step b_i += gamma sign(mean c - c_i), (5.13)",
        signature="bias_update(bias: torch.Tensor, indices: torch.Tensor, rate: float) -> torch.Tensor  "
                  "(bias (E,), indices (T, k) -> the new bias (E,))",
        cases=_cases_bias_update, n_cases=200, outputs=("bias",),
        fallback="c_i = the number of assignments expert i received, c-bar their mean over the E experts; "
                 "b_i + gamma sign(c-bar - c_i), equation (5.13)",
        shape_hint="return one bias per expert, shape (E,) with E = bias.numel(), experts that received no "
                   "token included (torch.bincount(..., minlength=E))",
        mistakes=(
            Mistake(_bias_flipped,
                    "your signs are flipped: an overloaded expert (c_i > c-bar) must become less attractive, "
                    "so its bias goes down: b_i + gamma sign(c-bar - c_i), (5.13)"),
            Mistake(_bias_no_sign,
                    "each bias moves by exactly gamma (or 0): take the sign of c-bar - c_i, not the "
                    "difference itself, (5.13)"),
            Mistake(_bias_no_tie,
                    "an expert whose load equals the mean exactly keeps its bias: sign(0) = 0, (5.13)"),
            Mistake(_bias_step_only,
                    "return the updated bias b_i + gamma sign(c-bar - c_i), not only the step"),
            Mistake(_bias_mean_of_tokens,
                    "c-bar is the mean load over the experts, kT / E (every token makes k assignments), "
                    "not T / E"),
        )),
    Exercise(
        id="06.rms_norm", summary="RMSNorm over the last dim with a gain, equation (6.2)",
        signature="rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor  "
                  "(x (..., d), weight (d,) -> (..., d))",
        cases=_cases_rms_norm, n_cases=200, outputs=("y",),
        fallback="RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g over the last dimension, equation (6.2)",
        shape_hint="return a tensor of x's shape: RMSNorm normalizes each vector along the last dimension",
        mistakes=(
            Mistake(_layer_norm,
                    "you subtracted the mean: that is LayerNorm; RMSNorm divides x itself by its root mean "
                    "square and has no centring, equation (6.2)"),
            Mistake(lambda x, w, eps: w * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps),
                    "eps goes inside the square root: x / sqrt(mean(x^2) + eps), equation (6.2)"),
            Mistake(lambda x, w, eps: w * x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps),
                    "you divided by the norm (the square root of the sum); RMSNorm uses the mean of x^2, "
                    "which is d times smaller, equation (6.2)"),
            Mistake(lambda x, w, eps: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps),
                    "you left out the gain: multiply the normalized x by weight, equation (6.2)"),
        )),
    Exercise(
        id="06.rope", summary="rotary position embedding in the rotate-half layout at given positions, (6.4) and (6.5)",
        signature="rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor  "
                  "(x (B, H, T, d_h), positions (T,) int64 -> (B, H, T, d_h))",
        cases=_cases_rope, n_cases=150, outputs=("y",),
        fallback="pair coordinate i with i + d_h/2 and turn the pair by the angle positions[t] * omega_i, "
                 "omega_i = theta^(-2i/d_h): y = x cos + rot(x) sin with rot(x_1, x_2) = (-x_2, x_1), (6.4), (6.5)",
        shape_hint="return a tensor of x's shape (B, H, T, d_h)",
        mistakes=(
            Mistake(lambda x, pos, th: _rope_with(x, _angles(pos, x.shape[-1], th), interleaved=True),
                    "you paired adjacent coordinates (2i, 2i+1), Meta's layout; the book (and Hugging Face) "
                    "pairs coordinate i with i + d_h/2 (rotate half), section 6.1"),
            Mistake(lambda x, pos, th: _rope_with(x, _angles(pos, x.shape[-1], th), sign=-1.0),
                    "your rotation turns the wrong way: rot(x_1, x_2) = (-x_2, x_1), so the first half gets "
                    "x_1 cos - x_2 sin, equation (6.5)"),
            Mistake(lambda x, pos, th: _rope_with(x, _angles(pos, x.shape[-1], th, exponent_step=1)),
                    "your frequencies are theta^(-i/d_h); they are omega_i = theta^(-2i/d_h) for the pairs "
                    "i = 0 .. d_h/2 - 1, equation (6.4)"),
            Mistake(lambda x, pos, th: _rope_reference(x, torch.arange(x.shape[-2]), th),
                    "you used the positions 0 .. T-1; rotate token t by positions[t] (a rank of context "
                    "parallelism holds tokens from the middle of the sequence)"),
            Mistake(lambda x, pos, th: _rope_with(x, (pos.float()[:, None] * (th ** (
                        -torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1]))[None]).to(F64)),
                    "your angles are computed in float32, which loses about 1e-7 of each angle: at position "
                    "100,000 that is an error of order 0.01 radian; compute positions * omega in float64"),
        )),
    Exercise(
        id="06.sharded_cross_entropy",
        summary="per-token cross-entropy from vocabulary shards, without gathering the logits, (6.14)",
        signature="sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor  "
                  "(shards[r] (N, V_r), consecutive slices from id 0; targets (N,) global ids -> losses (N,))",
        cases=_cases_sharded_cross_entropy, n_cases=200, outputs=("loss",),
        fallback="m = the maximum over every shard, l = log sum_r sum_v e^(z_v - m) - (z_y - m), where only the "
                 "shard that owns y contributes z_y, equation (6.14)",
        shape_hint="return one loss per token, shape (N,)",
        nonfinite_hint="inf or nan: with logits near 1000, e^z overflows; subtract the global maximum m "
                       "(the maximum over all shards) before exponentiating, equation (6.14)",
        mistakes=(
            Mistake(_sharded_local_max,
                    "each shard subtracted its own maximum: sums e^(z - m_r) taken against different m_r "
                    "cannot be added; use the global m = max_r m_r (the first all-reduce), equation (6.14)"),
            Mistake(_sharded_no_offset,
                    "the target logit is looked up at the global id in every shard; shard r holds ids "
                    "[s_r, e_r), so look up y - s_r, and only in the shard that owns y, equation (6.14)"),
            Mistake(_sharded_no_max,
                    "e^z overflows (or underflows) for logits near +-1000: subtract the global maximum m, "
                    "equation (6.14)"),
            Mistake(_sharded_max_not_added,
                    "you forgot m: the loss is log sum e^(z - m) - (z_y - m), equation (6.14)"),
            Mistake(lambda shards, targets: -torch.nn.functional.cross_entropy(torch.cat(shards, -1), targets,
                                                                               reduction="none"),
                    "your sign is flipped: the loss is log sum e^z - z_y >= 0"),
        )),
    Exercise(
        id="06.schedule_bubble", summary="the idle share of a pipeline schedule with instant messages, (6.23)",
        signature="schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) "
                  "-> float",
        cases=_cases_schedule_bubble, n_cases=150, outputs=("bubble",),
        fallback="start every action at the latest of its stage's previous end and its inputs' ends (F on "
                 "stage s-1, or F on stage s and B on stage s+1), then bubble = 1 - busy / (p * makespan), (6.23)",
        shape_hint="return one number, the bubble fraction of the whole schedule",
        mistakes=(
            Mistake(_bubble_formula_of,
                    "(p-1)/(m+p-1) is the bubble of GPipe and 1F1B in their usual order, not of every "
                    "schedule: simulate the listed order, in which a stage may wait longer, (6.23)"),
            Mistake(lambda s, f, b: (len(s) - 1) / (len(s[0]) // 2),
                    "(p-1)/m is Megatron-LM's idle time over busy time; the bubble (6.23) divides the idle "
                    "time by the whole step, p times the makespan"),
            Mistake(lambda s, f, b: _simulate(s, f, b, wait_downstream=False),
                    "a backward B i on stage s also needs B i of stage s+1 (the gradient of its output), "
                    "section 6.7"),
            Mistake(lambda s, f, b: _simulate(s, f, b, in_order=False),
                    "a stage runs one action at a time, in the listed order: an action starts no earlier "
                    "than the end of its stage's previous action"),
        )),
    Exercise(
        id="07.group_advantages", summary="group-relative advantages with the Bessel std plus 1e-4, (7.3)",
        signature="group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor  "
                  "(rewards (N,), groups contiguous -> advantages (N,))",
        cases=_cases_group_advantages, n_cases=200, outputs=("advantages",),
        fallback="view the rewards as (N / G, G), one group per row; A = (r - row mean) / (row std + 1e-4) "
                 "with the Bessel-corrected std, (7.3) and section 7.2",
        shape_hint="return one advantage per completion, shape (N,), in the order of the rewards",
        nonfinite_hint="nan or inf: a group whose rewards are all equal has std 0; add epsilon = 1e-4 to the "
                       "std, so that the advantage is exactly 0 (section 7.2)",
        mistakes=(
            Mistake(lambda r, g: _adv_std(r, g, unbiased=False),
                    "your std divides by G; section 7.2 uses the sample std with Bessel's correction, "
                    "dividing by G - 1 (torch's default, unbiased=True)"),
            Mistake(lambda r, g: _adv_std(r, g, eps=0.0),
                    "you left out epsilon = 1e-4: a group of equal rewards must give 0, not nan (section 7.2)"),
            Mistake(_adv_batch,
                    "you normalized over the whole batch; the baseline and the scale are each group's own "
                    "mean and std, (7.3)"),
            Mistake(_adv_strided,
                    "your groups are strided; the G samples of one prompt are contiguous: rewards.view(-1, G)"),
            Mistake(lambda r, g: (r.view(-1, g) - r.view(-1, g).mean(1, keepdim=True)).reshape(-1),
                    "you only subtracted the group mean (Dr. GRPO's choice); (7.3) also divides by the "
                    "group's std + 1e-4"),
        )),
    Exercise(
        id="07.grpo_loss", summary="the clipped GRPO loss -J with the k3 KL and the per-sequence mean, (7.5)",
        signature="grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float, beta: float) -> "
                  "torch.Tensor  ((B, L) tensors, advantages (B,) -> a 0-dim loss)",
        cases=_cases_grpo_loss, n_cases=200, outputs=("loss",),
        fallback="per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (e^(ref - logp) - (ref - logp) - 1); "
                 "masked mean over each row's tokens, then the mean over rows, (7.5)",
        shape_hint="return a single number (a 0-dim tensor)",
        mistakes=(
            Mistake(_grpo_max,
                    "you took the max of the two branches; the objective takes the min (the pessimistic "
                    "one), and the loss is minus that, (7.2)"),
            Mistake(_grpo_token_mean,
                    "you averaged over all tokens of the batch (the bnpo normalization); the paper's grpo "
                    "averages each row over its own tokens first, then over rows, (7.5)"),
            Mistake(_grpo_kl_sign,
                    "the KL term enters the loss with +beta (the objective subtracts it), (7.5)"),
            Mistake(_grpo_k1,
                    "the KL term is the estimator (7.4), e^(ref - logp) - (ref - logp) - 1, not logp - ref"),
            Mistake(_grpo_unmasked,
                    "tokens after the end of a completion (mask 0) must not count: multiply by the mask "
                    "before summing"),
            Mistake(lambda *args: -_grpo_reference(*args),
                    "your sign is flipped: the loss is -J, so minimizing it maximizes the objective (7.5)"),
        )),
    Exercise(
        id="08.rolling_ids", summary="the n-gram hash (8.9) at every position, streamed with the rolling update",
        signature="rolling_ids(data: bytes, n: int, table_size: int) -> list[int]  (one id per byte)",
        cases=_cases_rolling_ids, n_cases=150, outputs=("ids",),
        fallback="the n-gram ending at byte t, with PAD (258) before the start, c = x + 1, hashed as "
                 "(sum_i c_i B^(n-i)) mod p mod M, equation (8.9); compare with hash_ngram_ids",
        shape_hint="return one id per byte of data, the n-gram ending there (padding included at the start)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_rolling_with(lambda x: x, PAD, HASH_PRIME),
                    "use c = x + 1 for every value, the padding included, so that a zero byte still counts, "
                    "section 8.5"),
            Mistake(_rolling_with(lambda x: x + 1, 0, HASH_PRIME),
                    "the first n - 1 n-grams reach into the padding: the missing bytes are PAD (258), hashed "
                    "as c = 259; padding with 0 (or hashing a shorter n-gram, the same thing) gives other ids, "
                    "section 8.5"),
            Mistake(_rolling_with(lambda x: x + 1, PAD + 1, None),
                    "reduce mod p = 2^31 - 1 before mod M, equation (8.9): without it the ids differ whenever "
                    "the sum exceeds p"),
        )),
    Exercise(
        id="09.pretraining_loss", summary="LLaDA's loss: masked cross-entropy over p, divided by B L, (9.3)",
        signature="pretraining_loss(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, p: torch.Tensor) "
                  "-> torch.Tensor  (logits (B, L, V), x0 and masked (B, L), p (B,) -> a 0-dim loss)",
        cases=_cases_pretraining_loss, n_cases=200, outputs=("loss",),
        fallback="sum over the masked tokens of -log softmax(logits)[x0] / p of their row, divided by B * L, "
                 "equation (9.3)",
        shape_hint="return a single number (a 0-dim tensor)",
        nonfinite_hint="inf or nan: use a stable log-softmax (F.cross_entropy) for logits near 1000, and do not "
                       "divide by the number of masked tokens, which can be 0",
        mistakes=(
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) / p[:, None]).sum() / m.sum(),
                    "you divided by the number of masked tokens; (9.3) divides by B * L, all positions, "
                    "so the expectation of the 1/p-weighted sum bounds the likelihood (section 9.2)"),
            Mistake(lambda lo, x0, m, p: _masked_ce(lo, x0, m).sum() / x0.numel(),
                    "each masked token's cross-entropy must be divided by its row's p, equation (9.3)"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) * p[:, None]).sum() / x0.numel(),
                    "you multiplied by p; the weight is 1/p (1/t in (9.3))"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, torch.ones_like(m)) / p[:, None]).sum() / x0.numel(),
                    "only masked tokens count: a visible token is given to the model, not predicted, (9.3)"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) / p[:, None]).sum() / x0.shape[0],
                    "divide by B * L, not by B alone, equation (9.3)"),
        )),
    Exercise(
        id="09.transfer_schedule", summary="how many tokens each sampling step commits, front-loaded, (9.8)",
        signature="transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor  "
                  "(n_masked (B,) int64 -> (B, steps) int64)",
        cases=_cases_transfer_schedule, n_cases=200, outputs=("counts",),
        fallback="n_s = floor(m / N) + [s < m mod N] for s = 0 .. N-1, equation (9.8)",
        shape_hint="return one row per sequence and one column per step, (B, steps)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(lambda n, s: (n // s)[:, None] + (torch.arange(s)[None] >= s - n[:, None] % s).long(),
                    "your remainder goes to the last steps; (9.8) gives the extra tokens to the first "
                    "m mod N steps"),
            Mistake(lambda n, s: (n // s)[:, None].expand(-1, s).clone(),
                    "your counts do not add up to the number of masks: spread the remainder m mod N, one "
                    "token each over the first steps, (9.8)"),
            Mistake(lambda n, s: ((n + s - 1) // s)[:, None].expand(-1, s).clone(),
                    "ceil(m / N) every step commits more tokens than there are masks; (9.8) gives "
                    "floor(m / N) plus one on the first m mod N steps only"),
            Mistake(lambda n, s: (n // s)[:, None] + torch.where(torch.arange(s)[None] == 0, (n % s)[:, None], 0),
                    "the whole remainder lands on the first step; (9.8) spreads it, one token per step"),
        )),
    Exercise(
        id="09.commit_low_confidence", summary="one step of low-confidence remasking: commit the most confident masks",
        signature="commit_low_confidence(x: torch.Tensor, proposal: torch.Tensor, confidence: torch.Tensor, "
                  "counts: torch.Tensor, mask_id: int) -> torch.Tensor  ((B, L) tensors, counts (B,) -> (B, L))",
        cases=_cases_commit_low_confidence, n_cases=200, outputs=("x",),
        fallback="in row b, among the positions where x == mask_id, take the counts[b] of highest confidence, "
                 "write their proposals, and keep every other position (section 9.6)",
        shape_hint="return the new x, of x's shape (B, L)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_commit_any_position,
                    "only masked positions compete: set the confidence of unmasked positions to -inf before "
                    "taking the top counts[b] (a committed token is never changed)"),
            Mistake(_commit_least_confident,
                    "you committed the least confident proposals; low-confidence remasking keeps the most "
                    "confident and remasks the rest (section 9.6)"),
            Mistake(_commit_same_count,
                    "each row commits its own counts[b], not the largest count of the batch"),
            Mistake(lambda x, prop, conf, counts, mask_id: torch.where(x == mask_id, prop, x),
                    "you committed every mask; a step commits only counts[b] of them (9.8)"),
        )),
    Exercise(
        id="10.mask_losses", summary="the dice loss (10.12) and the sigmoid cross-entropy (10.13) of each mask",
        signature="mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]  "
                  "(logits (N, X) float, targets (N, X) bool -> (dice (N,), bce (N,)))",
        cases=_cases_mask_losses, n_cases=200, outputs=("dice", "bce"),
        fallback="per row: dice = 1 - (2 sum sigma(m) t + 1) / (sum sigma(m) + sum t + 1), equation (10.12); "
                 "bce = the mean over the X pixels of log(1 + e^m) - t m, equation (10.13)",
        shape_hint="return one dice loss and one BCE per mask (row of logits): two tensors of shape (N,)",
        nonfinite_hint="inf or nan where the answer is finite: log(1 + e^m) overflows for large m and log sigma(m) "
                       "is -inf once sigma(m) rounds to 0 or 1; use softplus(m) - t m "
                       "(F.binary_cross_entropy_with_logits), and keep the +1 terms of (10.12)",
        mistakes=(
            Mistake(lambda lo, t: _mask_losses_reference(lo, t)[::-1],
                    "your two outputs are swapped: return (dice, bce) in this order"),
            Mistake(lambda lo, t: (_dice_with(lo, t, smooth=0.0), bce_loss(lo, t)),
                    "your dice has no +1 terms: (10.12) adds 1 to the numerator and to the denominator, so an "
                    "empty target with an empty prediction costs 0 instead of 0/0 (exercise 1)"),
            Mistake(lambda lo, t: (_dice_with(lo, t, sigmoid=False), bce_loss(lo, t)),
                    "your dice uses the logits m_x; (10.12) uses the probabilities sigma(m_x)"),
            Mistake(lambda lo, t: (_dice_with(lo, t, square=True), bce_loss(lo, t)),
                    "you squared the terms of the denominator (V-Net's variant); (10.12) sums sigma(m_x) and t_x "
                    "themselves, as Mask2Former does"),
            Mistake(lambda lo, t: (1 - dice_loss(lo, t), bce_loss(lo, t)),
                    "you returned the dice coefficient; the loss (10.12) is 1 minus it, 0 for a perfect mask"),
            Mistake(lambda lo, t: (dice_loss(lo, t), bce_loss(lo, t) * lo.shape[1]),
                    "your BCE is the sum over the pixels; (10.13) is the mean, divided by X"),
            Mistake(lambda lo, t: (dice_loss(lo, t), _bce_naive(lo, t)),
                    "log sigma(m) and log(1 - sigma(m)) are -inf once sigma(m) rounds to 0 or 1 (m beyond about "
                    "+-37 in float64): write (10.13) as softplus(m) - t m, or use "
                    "F.binary_cross_entropy_with_logits"),
        )),
    Exercise(
        id="10.next_click", summary="the simulated user's corrective click, (10.3) and (10.4)",
        signature="next_click(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, bool]  "
                  "(pred, target (H, W) bool, not equal -> ((y, x) int64 of shape (2,), positive))",
        cases=_cases_next_click, n_cases=150, outputs=("point", "positive"),
        fallback="misses E+ = target & ~pred, false alarms E- = pred & ~target (10.3); the Euclidean distance of each "
                 "pixel to the nearest pixel outside its region, the image border counting as outside (10.4); the "
                 "click goes to the deepest pixel of the region whose deepest pixel is deeper (a tie goes to the "
                 "false alarms; among equal depths the first pixel in row-major order); positive on a miss",
        shape_hint="return the click as (y, x), a tensor of 2 integers, and positive as one bool",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_click_with(swap=True),
                    "your point is (x, y); the library, and the checker, want (y, x): row first, then column"),
            Mistake(_click_with(flip=True),
                    "a click on a miss (target & ~pred) is positive, one on a false alarm (pred & ~target) "
                    "is negative (10.3)"),
            Mistake(_click_with(pad=False),
                    "the image border counts as the border of an error region in (10.4): pad the region with one "
                    "row and column of False on each side before the distance transform, else a region cut by the "
                    "border has its deepest pixel on the border itself"),
            Mistake(_click_with(choose="area"),
                    "'larger' is the region with the deeper inscribed disc, max d_E (10.4), not the one with more "
                    "pixels: a long sliver one pixel wide is large but hard to click on (section 10.3)"),
            Mistake(_click_with(choose="shallower"),
                    "you clicked in the error region whose deepest pixel is shallower; (10.4) takes the region "
                    "whose deepest pixel is deeper"),
            Mistake(_click_with(choose="ties to misses"),
                    "when the two regions are equally deep the click goes to the false alarm (negative), as the "
                    "library's next_click breaks the tie: use a strict > for the miss"),
            Mistake(_click_with(last=True),
                    "among pixels of equal depth take the first in row-major order (argmax of the flattened depth "
                    "map); you took the last"),
            Mistake(_click_with(metric="chessboard"),
                    _EUCLIDEAN_HINT),
            Mistake(_click_with(metric="taxicab"),
                    _EUCLIDEAN_HINT),
        )),
    Exercise(
        id="10.prompt_table", summary="the decoder's self-attention table of section 10.6 (SEEM's Figure 3b)",
        signature="prompt_table(kinds: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor  "
                  "(kinds, groups (S,) int64, valid (B, S) bool -> allowed (B, S, S) bool, True = may attend)",
        cases=_cases_prompt_table, n_cases=200, outputs=("allowed",),
        fallback="allowed[b, i, j] when (both are object queries, or i is a prompt query and j a non-object member of "
                 "its prompt, or i is a prompt token and j a token of its kind in its prompt) and valid[b, j], "
                 "or when i == j, section 10.6",
        shape_hint="return one (S, S) table per image: (B, S, S), with the batch of valid first",
        rtol=0.0, atol=0.0, diagnose=_prompt_table_diagnose,
        mistakes=(
            Mistake(lambda kinds, groups, valid: ~_table_with()(kinds, groups, valid),
                    "your table is inverted: True means blocked in nn.MultiheadAttention's convention, but here, "
                    "as in F.scaled_dot_product_attention, True means may attend (section 10.6)"),
            Mistake(_table_with(objects_see_all=True),
                    "object queries attend to object queries only: if they saw prompts, the prompt-free output "
                    "would change whenever a user prompts (claim 1 of section 10.6)"),
            Mistake(_table_with(queries_see_objects=True),
                    "a prompt query does not attend to the object queries, only to its own prompt's members "
                    "(the table of section 10.6)"),
            Mistake(_table_with(other_prompts=True),
                    "prompts never see each other: a prompt query and a prompt token attend only to members "
                    "with their own group (claim 2 of section 10.6)"),
            Mistake(_table_with(all_kinds=True),
                    "a prompt token attends to tokens of its own kind only, so memory tokens see only memory "
                    "tokens (claim 3 of section 10.6); only the prompt query reads every kind"),
            Mistake(_table_with(use_valid=False),
                    "padding members (valid[b, j] False) must be blocked as keys in every row but their own"),
            Mistake(_table_with(self_always=False),
                    "every row may attend to itself, a padding token's row too: otherwise a row whose keys are all "
                    "blocked attends to nothing, and softmax over nothing is nan"),
        )),
]}
