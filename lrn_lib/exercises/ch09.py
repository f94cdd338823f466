"""The exercises of chapter 09 (Pipeline and data parallelism, and all four at once): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 09 id is checked.

Hand-written; may import only library modules of chapter 09 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, Mistake
from lrn_lib.pipeline_parallel import bubble_fraction, gpipe_schedule, one_f_one_b_schedule, simulate_schedule


def _simulate(schedule, forward_time, backward_time, in_order: bool = True, wait_downstream: bool = True) -> float:
    """Bubble (9.1) of a schedule with instant messages; the switches model two mistakes."""
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
    yield _bubble_case(gpipe_schedule(2, 2), 1, 2, "GPipe, p = 2, m = 2: (9.2) gives 1/3")
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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="09.schedule_bubble", summary="the idle share of a pipeline schedule with instant messages, (9.1)",
        signature="schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) "
                  "-> float",
        cases=_cases_schedule_bubble, n_cases=150, outputs=("bubble",),
        fallback="start every action at the latest of its stage's previous end and its inputs' ends (F on "
                 "stage s-1, or F on stage s and B on stage s+1), then bubble = 1 - busy / (p * makespan), (9.1)",
        shape_hint="return one number, the bubble fraction of the whole schedule",
        mistakes=(
            Mistake(_bubble_formula_of,
                    "(p-1)/(m+p-1) is the bubble of GPipe and 1F1B in their usual order, not of every "
                    "schedule: simulate the listed order, in which a stage may wait longer, (9.1)"),
            Mistake(lambda s, f, b: (len(s) - 1) / (len(s[0]) // 2),
                    "(p-1)/m is Megatron-LM's idle time over busy time; the bubble (9.1) divides the idle "
                    "time by the whole step, p times the makespan"),
            Mistake(lambda s, f, b: _simulate(s, f, b, wait_downstream=False),
                    "a backward B i on stage s also needs B i of stage s+1 (the gradient of its output), "
                    "section 9.1"),
            Mistake(lambda s, f, b: _simulate(s, f, b, in_order=False),
                    "a stage runs one action at a time, in the listed order: an action starts no earlier "
                    "than the end of its stage's previous action"),
        )),
)
