"""The machinery of the exercise checkers: the test case, the mistake model, the exercise,
``check`` and ``exercises``, the rendering of the failure line, and the random inputs that
several chapters draw. Each chapter's own generators, mistakes and catalogue entries live in
``lrn_lib/exercises/chNN.py`` and are imported only when one of that chapter's ids is used.

Hand-written infrastructure (listed as such in book.toml): imports no chapter's module.
"""
from __future__ import annotations

import functools
import importlib
import math
import pkgutil
import random
import re
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

INF = float("inf")
F64 = torch.float64
SHORT_INPUT = 120       # characters of the input in a failure line (unless verbose=True) ...
SHORT_RESULT = 200      # ... and of what the function returned against what was expected
SHORT_NOTE = " (Values shortened; check(..., verbose=True) prints them in full.)"



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


def _show(value: Any, limit: int | None = 240) -> str:
    """A one-line rendering of an argument or a result (a repr cut at ``limit`` characters)."""
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
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def _clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` characters, the cut marked with "..."."""
    if len(text) <= width:
        return text
    return text[:max(width - 4, 1)].rstrip() + " ..."


def _full(value: Any) -> str:
    """Every entry of a value, for ``check(..., verbose=True)``: a tensor printed whole."""
    if isinstance(value, torch.Tensor):
        with torch._tensor_str.printoptions(threshold=1_000_000, linewidth=110, precision=6):
            return f"shape {tuple(value.shape)}, {value.dtype}:\n{value.detach().cpu()!r}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "\n".join(f"[{i}] {_full(v)}" for i, v in enumerate(value))
    return _show(value, limit=None)


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


def _inputs(case: Case, width: int | None = None) -> str:
    """The case's arguments, ``name = value``; each value cut to ``width`` characters when given."""
    return ", ".join(f"{name} = {_value(arg, width)}" for name, arg in zip(case.names, case.args))


def _outputs(values: list[torch.Tensor], names: tuple[str, ...], width: int | None = None) -> str:
    if len(names) == 1:
        return _value(values[0], width)
    return "(" + ", ".join(f"{n} = {_value(v, width)}" for n, v in zip(names, values)) + ")"


def _value(value: Any, width: int | None) -> str:
    """A value for the failure line: whole (width None), or in at most about ``width`` characters,
    a tensor too long to list then named by its shape."""
    if width is None:
        return _show(value, limit=None)
    text = _show(value)
    if len(text) <= width:
        return text
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {tuple(value.shape)}>"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return f"<{len(value)} tensors>"
    return _clip(text, width)


def _shapes(values: list[torch.Tensor], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} of shape {tuple(v.shape)}" for n, v in zip(names, values))


def _hidden(value: Any) -> bool:
    """Whether the failure line names ``value`` by its shape instead of listing it (a tensor of
    more than 12 entries, or a list or tuple holding one)."""
    if isinstance(value, torch.Tensor):
        return value.numel() > 12
    if isinstance(value, (list, tuple)):
        return any(_hidden(v) for v in value)
    return False


def _verdict(where: str, case: Case, rest: Callable[[int | None], str], hint: str, verbose: bool,
             values: tuple = ()) -> str:
    """The failure line: ``where`` (the case), its input, what went wrong, then the hint (always whole).

    ``rest(width)`` says what went wrong with each value in about ``width`` characters (None:
    uncut). Unless ``verbose``, the input and ``rest`` each take the widest values that keep
    them within SHORT_INPUT and SHORT_RESULT characters (inputs that do not fit even so are
    only named), and a note says so if anything was shortened or if any of ``values`` (the
    inputs and both answers) is too large to list.
    """
    inputs, result = _inputs(case), rest(None)
    if verbose:
        return f"{where}: input {inputs}; {result}. Hint: {hint}"
    fits = len(inputs) <= SHORT_INPUT and len(result) <= SHORT_RESULT
    if not fits:
        for width in (80, 60, 40, 24):
            if len(inputs) > SHORT_INPUT:
                inputs = _inputs(case, width)
            if len(result) > SHORT_RESULT:
                result = rest(width)
        if len(inputs) > SHORT_INPUT:
            inputs = f"{', '.join(case.names)} (listed by verbose=True)"
    note = "" if fits and not _hidden(values) else SHORT_NOTE
    return f"{where}: input {inputs}; {result}. Hint: {hint}{note}"


def _details(case: Case, got: list[torch.Tensor] | None, want: list[torch.Tensor], names: tuple[str, ...]) -> str:
    """The lines after the verdict of ``check(..., verbose=True)``: every input and answer in full."""
    def block(label: str, value: Any) -> str:
        return f"{label} = " + _full(value).replace("\n", "\n    ")
    lines = [block(f"  input {name}", arg) for name, arg in zip(case.names, case.args)]
    if got is not None:
        lines += [block(f"  your {name}", g) for name, g in zip(names, got)]
    lines += [block(f"  expected {name}", w) for name, w in zip(names, want)]
    return "\n".join(lines)


def _normalize_id(exercise_id: Any) -> str:
    """ "01.name" from "01.name", "1.name" or " 01.name " (other text is left for _find to reject)."""
    text = str(exercise_id).strip()
    chapter, dot, name = text.partition(".")
    if dot and chapter.strip().isdigit():
        return f"{int(chapter):02d}.{name.strip()}"
    return text


def check(exercise_id: str, fn: Callable, seed: int | None = None, verbose: bool = False) -> bool:
    """Run the hidden randomized tests of exercise ``exercise_id`` on ``fn``; print one line.

    Returns True when every case agrees with the float64 reference. On the first wrong
    answer (or exception) prints the input, what ``fn`` returned, what was expected and a
    hint, and returns False; long values are shortened in that line unless ``verbose``, which
    also prints every input and both answers in full after it. ``seed`` repeats a run (each
    call draws a fresh one otherwise). ``exercise_id`` is "NN.name" ("1.name" works too).
    Raises ValueError for an unknown exercise id.
    """
    exercise = _find(exercise_id)
    if not callable(fn):
        name = exercise.signature.split("(", 1)[0]
        print(f"{exercise.id}: your answer must be a function (callable); got {type(fn).__name__}. "
              f"Hint: define {name}(...) and pass the function itself, check(\"{exercise.id}\", {name}), "
              f"not the result of calling it; it should be {exercise.signature}.")
        return False
    seed = secrets.randbits(32) if seed is None else seed
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    names = exercise.outputs
    for number, case in enumerate(exercise.cases(rng, gen), start=1):
        if number > exercise.n_cases:
            break
        where = f"{exercise.id}: failed on case {number} of {exercise.n_cases} ({case.note}; seed {seed})"
        want = _as_tensors(case.expected, names)
        got = None
        try:
            got = _as_tensors(fn(*map(_clone, case.args)), names)
        except _BadReturn as err:
            def rest(width, err=err):
                return f"{err} (the answer here is {_outputs(want, names, width)})"
            hint = f"write {exercise.signature}."
        except Exception as err:  # the reader's code failed: report it, do not raise
            def rest(width, err=err):
                message = str(err) if width is None else _clip(str(err), 2 * width)
                return f"your function raised {type(err).__name__}: {message}; expected {_outputs(want, names, width)}"
            hint = f"check it runs on this input; it should be {exercise.signature}."
        else:
            difference = _first_difference(got, want, names, exercise.rtol, exercise.atol)
            shapes_ok = all(_same_shape(g, w) is not None for g, w in zip(got, want))
            if shapes_ok and difference is None:
                continue
            if shapes_ok:
                def rest(width, got=got, difference=difference):
                    return (f"you returned {_outputs(got, names, width)}, expected {_outputs(want, names, width)} "
                            f"(first difference: {difference})")
            else:
                def rest(width, got=got):
                    return f"you returned {_shapes(got, names)}, expected {_shapes(want, names)}"
            hint = _hint(exercise, case, got, want)
        print(_verdict(where, case, rest, hint, verbose, (*case.args, *(got or ()), *want)))
        if verbose:
            print(_details(case, got, want, names))
        return False
    print(f"{exercise.id}: passed {exercise.n_cases} random cases")
    return True


def chapters() -> list[str]:
    """The chapters that have exercises, in order ("01", "02", ...): one module ``chNN`` each."""
    return sorted(m.name[2:] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if re.fullmatch(r"ch\d\d", m.name))


@functools.cache
def chapter_exercises(chapter: str) -> dict[str, Exercise]:
    """Chapter ``chapter``'s exercises ("01": {"01.logsumexp": ..., ...}), in the order the chapter
    lists them; imports that chapter's module ``lrn_lib.exercises.chNN`` and no other."""
    module = importlib.import_module(f"lrn_lib.exercises.ch{chapter}")
    return {e.id: e for e in module.EXERCISES}


def every_exercise() -> dict[str, Exercise]:
    """Every chapter's exercises by id, chapter by chapter (imports every chapter's module)."""
    return {key: e for chapter in chapters() for key, e in chapter_exercises(chapter).items()}


def exercises(chapter_id: str) -> list[str]:
    """The code exercises of a chapter ("02", "2" or 2), one line each: "id: summary; signature"."""
    text = str(chapter_id).strip()
    chapter = f"{int(text):02d}" if text.isdigit() else text
    known = chapters()
    found = [f"{e.id}: {e.summary}; write {e.signature}"
             for e in (chapter_exercises(chapter).values() if chapter in known else ())]
    if not found:
        raise ValueError(f"no exercises for chapter {chapter_id!r} to check (derive and measure exercises have no "
                         f"checker); chapters with exercises: {', '.join(known)}")
    return found


def _find(exercise_id: str) -> Exercise:
    key = _normalize_id(exercise_id)
    chapter = key.split(".")[0]
    found = chapter_exercises(chapter).get(key) if chapter in chapters() else None
    if found is None:
        raise ValueError(f"no exercise {exercise_id!r}; known ids: {', '.join(every_exercise())}")
    return found


# ---------------------------------------------------------------- random inputs shared by chapters

def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64)


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
