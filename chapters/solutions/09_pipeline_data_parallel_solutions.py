# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 9. Pipeline and data parallelism: solutions to the exercises
#
# A worked solution to the exercise at the end of chapter 9, run through its checker,
# `lrn_lib.exercises.check`, which tests it on fresh random schedules against the library's
# reference (`lrn_lib.pipeline_parallel`) and prints one line. No process group is needed.

# %%
from fractions import Fraction

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.pipeline_parallel import bubble_formula, gpipe_schedule, one_f_one_b_schedule, peak_in_flight

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("09")))

# %% [markdown]
# ## Exercise 1 (measure): the bubble of any schedule
#
# (a) The simulation repeats a sweep over the stages until every action has run: a stage
# runs its next action as soon as the action's inputs exist (F on stage $s-1$; or its own F
# and B on stage $s+1$), starting at the later of those inputs' ends and its own clock. Times
# are `Fraction`s, so the bubble (9.1) comes out exact. A sweep that runs nothing means a
# deadlock.

# %%
def schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) -> float:
    """(9.1) of a schedule (one action list per stage) with instant messages."""
    p = len(schedule)
    duration = {"F": Fraction(forward_time), "B": Fraction(backward_time)}
    end: dict[tuple[str, int, int], Fraction] = {}
    clock, nxt = [Fraction(0)] * p, [0] * p
    while any(nxt[s] < len(schedule[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while nxt[s] < len(schedule[s]):
                kind, i = schedule[s][nxt[s]]
                if kind == "F":
                    needs = [("F", s - 1, i)] if s > 0 else []
                else:
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
                if any(n not in end for n in needs):
                    break
                clock[s] = max([clock[s]] + [end[n] for n in needs]) + duration[kind]
                end[(kind, s, i)] = clock[s]
                nxt[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("the schedule deadlocks")
    busy = sum(duration[kind] for actions in schedule for kind, _ in actions)
    return float(1 - busy / (p * max(end.values())))


print(check("09.schedule_bubble", schedule_bubble))

# %% [markdown]
# (b) GPipe and 1F1B for $p = 4$, forward 1 and backward 2 units, next to (9.2), with the
# peak number of micro-batches stage 0 holds (its activations stay alive from its forward
# to its backward):

# %%
p = 4
rows = []
for m in (4, 8, 16, 32):
    g, o = gpipe_schedule(p, m), one_f_one_b_schedule(p, m)
    rows.append((m, schedule_bubble(g, 1, 2), schedule_bubble(o, 1, 2), float(bubble_formula(p, m)),
                 peak_in_flight(g)[0], peak_in_flight(o)[0]))
print(" m | GPipe bubble | 1F1B bubble |  (9.2) | stage 0 holds: GPipe, 1F1B")
for m, bg, bo, formula, hg, ho in rows:
    print(f"{m:2d} | {bg:12.4f} | {bo:11.4f} | {formula:6.4f} | {hg:2d}, {ho}")

reversed_first = gpipe_schedule(p, 8)
reversed_first[0] = [("F", i) for i in reversed(range(8))] + [("B", i) for i in range(8)]
b_rev = schedule_bubble(reversed_first, 1, 2)
print(f"GPipe, m = 8, stage 0's forwards reversed: bubble {b_rev:.4f} (in order: {rows[1][1]:.4f})")

# %%
print("both schedules follow (9.2) exactly:", all(bg == bo == formula for _, bg, bo, formula, _, _ in rows))
print("stage 0 holds m micro-batches under GPipe and p under 1F1B:",
      all(hg == m and ho == p for m, _, _, _, hg, ho in rows))
print("the reversed order makes the step longer:", b_rev > rows[1][1])

# %% [markdown]
# The bubble falls as $(p-1)/(m+p-1)$ for both schedules: 3/7 at $m = 4$, under a tenth at
# $m = 32$. What 1F1B buys is memory: stage 0 holds at most $p = 4$ micro-batches' activations
# instead of all $m$, so $m$ can grow (and the bubble shrink) at a fixed activation budget.
# Reversing stage 0's forwards delays F0, which every later stage needs first, by $m - 1$
# units: the whole pipeline starts late and the makespan grows from $3(m + p - 1) = 33$ to 40
# units, so the bubble rises from 0.27 to 0.4. The order within a schedule matters as much
# as its shape.
