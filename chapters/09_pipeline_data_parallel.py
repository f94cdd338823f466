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
# # Chapter 9. Pipeline and data parallelism, and all four at once
#
# Chapters 7 and 8 split every layer of chapter 6's Llama, by its matrices and by its sequence.
# This chapter adds the two splits that leave each layer whole: pipeline parallelism gives each
# rank a slice of the layers (section 9.1), data parallelism a slice of the batch, sharding the
# weights, gradients and optimizer state as FSDP does (section 9.2). Section 9.3 composes all four
# on chapter 7's mesh and checks the composed step against one process.

# %%
import torch

from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices, and the spawned processes share the cores

# %% [markdown]
# ## 9.1 Pipeline parallelism
#
# Tensor and context parallelism split every layer; **pipeline parallelism** (PP) splits the
# model between layers. With $p$ stages, stage $s$ holds a contiguous slice of the decoder
# blocks: stage 0 also holds the token embedding, the last stage also the final RMSNorm, the
# output head and the loss. Each stage keeps only its own weights, gradients and optimizer
# state, so PP divides the model's memory by $p$ while sending only one activation tensor
# $(b, T, d)$ per micro-batch across each stage boundary, forward and backward. That small
# volume is why Llama 3 lets PP span servers (its Figure 5 orders the dimensions
# [TP, CP, PP, DP], PP outside TP and CP); the 405B model runs in 16 stages.
#
# The price is idleness. A stage cannot start the forward pass of a batch before the previous
# stage has finished it, nor the backward pass before the next stage has sent the gradient
# back. GPipe (Huang et al. 2019, arXiv:1811.06965) reduces the idle time, the **bubble**, by
# splitting the batch into $m$ **micro-batches** that flow through the stages one behind the
# other; the gradients of all micro-batches are summed and the optimizer steps once, so the
# result is the same step as without the pipeline. This section builds
#
# 1. the split of Llama into stages,
# 2. the two classic schedules, GPipe and 1F1B, as pure functions that list each stage's
#    actions; from those lists alone we compute the bubble exactly and the activation memory,
# 3. an executor that runs a schedule with `torch.distributed` point-to-point messages, checked
#    equal to the single-process step and to PyTorch's own `torch.distributed.pipelining`,
# 4. a measured timeline of both schedules.
#
# ### Stages over layers
#
# The decoder blocks are equal in cost, so the natural split gives every stage the same number
# of blocks. The ends are heavier, though. The last stage also runs the output head, a
# $d \times V$ matrix with $V = 128{,}256$: in the 405B model it has two thirds of a block's
# parameters and FLOPs, and its logits and the loss add memory. The first stage stores the
# embedding table, as large as the head, and (we will see) the most activations. Llama 3
# therefore takes one block away from the first and from the last stage (Section 3.3.2 of the
# paper): its 126 layers fill 16 stages as $7 + 14 \times 8 + 7$. `partition_layers` computes
# both splits; `LlamaStage` wraps one stage's modules, keyed by their index in the full model,
# so that a stage's parameter names are the full model's names.

# %%
#| export lrn_lib.pipeline_parallel
import itertools
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from lrn_lib import validate
from lrn_lib.llama import Llama, rope_cos_sin
from lrn_lib.mesh import check_group


def partition_layers(n_layers: int, num_stages: int, lighter_ends: bool = False) -> list[range]:
    """Contiguous ranges of layer indices, one per stage, covering range(n_layers) in order.

    The sizes differ by at most one, earlier stages taking the extra layers. With lighter_ends
    the first and the last stage get one layer fewer than a balanced split of n_layers + 2
    layers would give them, leaving room for the embedding and the output head (Llama 3:
    126 layers over 16 stages -> 7, 8, ..., 8, 7).
    """
    validate.integer(n_layers, "n_layers", low=1)
    validate.integer(num_stages, "num_stages", low=2 if lighter_ends else 1)
    base, extra = divmod(n_layers + (2 if lighter_ends else 0), num_stages)
    sizes = [base + (s < extra) for s in range(num_stages)]
    if lighter_ends:
        sizes[0] -= 1
        sizes[-1] -= 1
    if min(sizes) < 1:
        raise ValueError(f"n_layers={n_layers} leaves a stage of {num_stages} without a layer")
    bounds = [0, *itertools.accumulate(sizes)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class LlamaStage(nn.Module):
    """One pipeline stage of a Llama: a contiguous slice of its blocks, plus the ends it owns.

    The first stage maps tokens (B, T) int64 -> hidden states (B, T, dim), a middle stage
    hidden states -> hidden states, the last stage hidden states -> logits (B, T, vocab_size);
    a stage that is both first and last is the whole model. The blocks live in a ModuleDict
    keyed by their index in the full model, so a stage's parameter names (for example
    "layers.5.attention.wq.weight") are the full model's. The modules are taken from `model`,
    not copied: build the stage from a model that nothing else trains.
    """

    def __init__(self, model: Llama, layers: range, first: bool, last: bool):
        super().__init__()
        validate.instance(model, "model", Llama)
        if not isinstance(layers, range):
            raise TypeError(f"layers must be a range of layer indices, got {type(layers).__name__}")
        if not isinstance(first, bool) or not isinstance(last, bool):
            raise TypeError(f"first and last must be bools, got {first!r}, {last!r}")
        if len(layers) == 0 or layers.start < 0 or layers.stop > len(model.layers) or layers.step != 1:
            raise ValueError(f"layers={layers} is not a non-empty contiguous slice of {len(model.layers)} layers")
        self.first, self.last, self.vocab_size = first, last, model.cfg.vocab_size
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("omega", model.omega.clone(), persistent=False)
        self.positions: torch.Tensor | None = None    # the tokens' RoPE positions, None: 0..T-1 (CP sets a shard's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) on the first stage, else hidden (B, T, dim) -> hidden (B, T, dim), or logits on the last stage."""
        if self.first:
            if validate.tensor(x, "tokens").dim() != 2 or x.dtype != torch.int64:
                raise ValueError(f"the first stage takes (batch, time) int64 tokens, got {tuple(x.shape)} {x.dtype}")
            validate.ids(x, "tokens", self.vocab_size)
            x = self.tok_embeddings(x)
        else:
            validate.tensor(x, "x", dims=3, kind="float")
        positions = self.positions if self.positions is not None else torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.omega, x.dtype)
        for block in self.layers.values():
            x = block(x, cos, sin)
        if self.last:
            x = self.output(self.norm(x))
        return x


def build_stage(model: Llama, stage: int, num_stages: int, lighter_ends: bool = False) -> LlamaStage:
    """Stage `stage` of `num_stages` of model, with the layers partition_layers gives it."""
    validate.instance(model, "model", Llama)
    validate.integer(num_stages, "num_stages", low=1)
    validate.integer(stage, "stage", low=0, high=num_stages - 1)
    layers = partition_layers(len(model.layers), num_stages, lighter_ends)[stage]
    return LlamaStage(model, layers, first=stage == 0, last=stage == num_stages - 1)


# %% [markdown]
# Chaining the stages by hand, in one process, must give the full model's logits exactly: the
# split only moves the boundaries between function calls.

# %%
import matplotlib.pyplot as plt
import torch

from lrn_lib.llama import LLAMA3_405B, Llama, lm_loss, tiny_config
from lrn_lib.spawn import spawn
from lrn_lib.pipeline_parallel import build_stage, partition_layers

torch.set_num_threads(1)
sizes = [len(r) for r in partition_layers(LLAMA3_405B.n_layers, 16, lighter_ends=True)]
print("Llama 3 405B, 16 stages, layers per stage:", sizes, "sum", sum(sizes))
print("balanced split of 10 layers over 4 stages:", partition_layers(10, 4))

torch.manual_seed(0)
model = Llama(tiny_config(n_layers=4)).double()
tokens = torch.randint(0, 256, (3, 12))
x = tokens
for s in range(3):
    x = build_stage(model, s, 3)(x)
print("3 chained stages equal the full model:", torch.equal(x, model(tokens)))

# %% [markdown]
# ### Schedules as lists of actions
#
# A schedule says, for every stage, in which order it runs the forward pass F$i$ and the
# backward pass B$i$ of each micro-batch $i = 0, \dots, m-1$. We write it as data: a list
# per stage of actions `("F", i)` and `("B", i)`. The dependencies are not part of the list;
# they are the model's: F$i$ on stage $s$ needs F$i$ of stage $s-1$ (its input), B$i$ on stage
# $s$ needs B$i$ of stage $s+1$ (the gradient of its output) and its own F$i$ (the saved
# activations).
#
# * **GPipe** runs all $m$ forwards, then all $m$ backwards.
# * **1F1B** (PipeDream-Flush, from Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel
#   DNN Training", arXiv:2006.09503; the default of Megatron-LM, arXiv:2104.04473) starts the backward of a
#   micro-batch as soon as possible. Stage $s$ runs $p-1-s$ **warm-up** forwards, then
#   alternates one forward and one backward in the **steady** state, and ends with the
#   $p-1-s$ **cool-down** backwards. The last stage has no warm-up: it runs F0 B0 F1 B1 ...
#
# Both compute the same gradients; they differ in idle time and memory. Both need $m \ge p$ here:
# with fewer micro-batches than stages the pipeline never fills (1F1B's warm-up would be longer
# than the batch), and the bubble (9.2) below is at least half the step. (PyTorch's
# `Schedule1F1B` enforces the same; its `ScheduleGPipe` does not.)

# %%
#| export lrn_lib.pipeline_parallel
Action = tuple[str, int]           # ("F", i): forward of micro-batch i; ("B", i): its backward


def _check_pipeline(num_stages: int, num_microbatches: int) -> None:
    """The size checks every schedule shares: ints >= 1 and num_microbatches >= num_stages."""
    validate.integer(num_stages, "num_stages", low=1)
    validate.integer(num_microbatches, "num_microbatches", low=1)
    if num_microbatches < num_stages:
        raise ValueError(f"num_microbatches={num_microbatches} is less than num_stages={num_stages}: "
                         "a pipeline needs at least one micro-batch per stage")


def gpipe_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """GPipe's actions for each of num_stages stages: F0 ... F(m-1), then B0 ... B(m-1)."""
    _check_pipeline(num_stages, num_microbatches)
    forwards = [("F", i) for i in range(num_microbatches)]
    backwards = [("B", i) for i in range(num_microbatches)]
    return [forwards + backwards for _ in range(num_stages)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B's actions for each stage s: p-1-s warm-up forwards, then F(w+i) B(i) pairs, then the remaining backwards."""
    _check_pipeline(num_stages, num_microbatches)
    schedule = []
    for s in range(num_stages):
        warmup = num_stages - 1 - s
        actions = [("F", i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [("F", warmup + i), ("B", i)]
        actions += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[[int, int], list[list[Action]]]] = {"gpipe": gpipe_schedule,
                                                                   "1f1b": one_f_one_b_schedule}

# %%
from lrn_lib.pipeline_parallel import SCHEDULES


def show(schedule):
    for s, actions in enumerate(schedule):
        print(f"  stage {s}: " + " ".join(f"{kind}{i}" for kind, i in actions))


for name in ("gpipe", "1f1b"):
    print(f"{name}, p=4 stages, m=6 micro-batches:")
    show(SCHEDULES[name](4, 6))
try:
    SCHEDULES["1f1b"](4, 3)
except ValueError as err:
    print("m < p:", err)

# %% [markdown]
# ### The bubble, exactly
#
# Give every forward one time unit and every backward two (a backward computes the gradients
# of both the inputs and the weights, about twice the forward's FLOPs), and let messages take
# no time. Every action then starts as soon as the previous action of its stage and its
# dependencies have finished. `simulate_schedule` computes these start times exactly (with
# Python `Fraction`s); a schedule whose dependencies can never be met is reported as a deadlock.
#
# The **bubble fraction** is the share of the $p$ stages' time that they sit idle:
#
# $$\text{bubble} = 1 - \frac{\sum_{s}\text{busy}_s}{p \cdot \text{makespan}} \qquad (9.1)$$
#
# For GPipe the count is direct: the last micro-batch's forward leaves stage 0 after $m$ units
# and needs $p-1$ more to reach the end, so the forwards take $m + p - 1$ units and the
# backwards $2(m + p - 1)$; each stage is busy $3m$ of the $3(m+p-1)$, so
#
# $$\text{bubble} = \frac{p-1}{m+p-1} \qquad (9.2)$$
#
# (Megatron-LM's paper quotes $(p-1)/m$: the idle time divided by the *busy* time instead of the
# whole step; the two agree for $m \gg p$.) 1F1B does not shorten the step: its bubble is the
# same, as the simulation shows. What 1F1B changes is memory.

# %%
#| export lrn_lib.pipeline_parallel
class Event(NamedTuple):
    """One action run on one stage: kind "F" or "B", its micro-batch, and its start and end times."""

    kind: str
    microbatch: int
    start: float | Fraction
    end: float | Fraction


def _check_schedule(schedule: list[list[Action]]) -> None:
    """Raise unless schedule is a non-empty list of per-stage lists of actions ("F" or "B", micro-batch >= 0)."""
    for actions in validate.nonempty(schedule, "schedule"):
        if not isinstance(actions, (list, tuple)):
            raise TypeError(f"schedule must hold one list of actions per stage, got {type(actions).__name__}")
        for action in actions:
            if not (isinstance(action, tuple) and len(action) == 2 and action[0] in ("F", "B")
                    and isinstance(action[1], int) and action[1] >= 0):
                raise ValueError(f"schedule holds an unknown action {action!r}; expected ('F' or 'B', micro-batch)")


def simulate_schedule(schedule: list[list[Action]], forward_time: float | Fraction = 1,
                      backward_time: float | Fraction = 2) -> list[list[Event]]:
    """Earliest start and end of every action when messages are instant; one list of Events per stage.

    F(s, i) waits for F(s-1, i); B(s, i) waits for F(s, i) and B(s+1, i); each stage runs its
    actions in the listed order, one at a time. Times are exact Fractions. ValueError if an
    action is unknown or repeated, or if the schedule deadlocks.
    """
    _check_schedule(schedule)
    validate.number(forward_time, "forward_time", low=0, low_open=True)
    validate.number(backward_time, "backward_time", low=0)
    durations = {"F": Fraction(forward_time), "B": Fraction(backward_time)}
    num_stages = len(schedule)
    finished: dict[tuple[str, int, int], Fraction] = {}
    timeline: list[list[Event]] = [[] for _ in range(num_stages)]
    position, clock = [0] * num_stages, [Fraction(0)] * num_stages
    progress = True
    while progress:
        progress = False
        for s in range(num_stages):
            while position[s] < len(schedule[s]):
                kind, i = schedule[s][position[s]]
                if kind not in durations or (kind, s, i) in finished:
                    raise ValueError(f"stage {s}: action {(kind, i)!r} is unknown or repeated")
                needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
                if kind == "B":
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < num_stages - 1 else [])
                if any(n not in finished for n in needs):
                    break
                start = max([clock[s]] + [finished[n] for n in needs])
                clock[s] = finished[(kind, s, i)] = start + durations[kind]
                timeline[s].append(Event(kind, i, start, clock[s]))
                position[s] += 1
                progress = True
    stuck = [s for s in range(num_stages) if position[s] < len(schedule[s])]
    if stuck:
        s = stuck[0]
        raise ValueError(f"the schedule deadlocks: stage {s} waits forever at {schedule[s][position[s]]}")
    return timeline


def bubble_fraction(timeline: list[list[Event]]) -> float | Fraction:
    """Idle share of the stages' time (9.1): 1 - total busy time / (stages * (last end - first start))."""
    events = [e for stage in validate.nonempty(timeline, "timeline") for e in stage]
    if not events:
        raise ValueError("timeline has no events")
    if not all(isinstance(e, Event) for e in events):
        raise TypeError("timeline must hold lists of Events (simulate_schedule's or run_pipeline's)")
    span = max(e.end for e in events) - min(e.start for e in events)
    if span <= 0:
        raise ValueError("timeline spans no time: its events all start and end at one instant")
    busy = sum(e.end - e.start for e in events)
    total = len(timeline) * span
    return (total - busy) / total


def bubble_formula(num_stages: int, num_microbatches: int) -> Fraction:
    """GPipe's bubble fraction (9.2): (p - 1) / (m + p - 1)."""
    _check_pipeline(num_stages, num_microbatches)
    return Fraction(num_stages - 1, num_microbatches + num_stages - 1)


def peak_in_flight(schedule: list[list[Action]]) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and whose backward has not yet.

    Each of them keeps its activations alive until its backward, so this counts the
    activation sets a stage stores at its peak.
    """
    _check_schedule(schedule)
    peaks = []
    for actions in schedule:
        held = peak = 0
        for kind, _ in actions:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


# %%
from lrn_lib.pipeline_parallel import bubble_formula, bubble_fraction, peak_in_flight, simulate_schedule

all_equal = True
for p, m in ((2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)):
    gpipe = bubble_fraction(simulate_schedule(SCHEDULES["gpipe"](p, m)))
    ofob = bubble_fraction(simulate_schedule(SCHEDULES["1f1b"](p, m)))
    all_equal &= gpipe == ofob == bubble_formula(p, m)
    print(f"p={p} m={m:2d}: GPipe {str(gpipe):>5}  1F1B {str(ofob):>5}  (p-1)/(m+p-1) = {bubble_formula(p, m)}")
print("both schedules' bubble equals (9.2) exactly:", all_equal)

# %% [markdown]
# The timelines show where the idle time sits. In GPipe, stage $s$ waits $s$ units for its first
# input, then one long gap between its last forward and its first backward (micro-batch 0's
# gradient has to come back from the last stage), and $2s$ units at the end while the gradients
# travel down to it: $3(p-1)$ units on every stage. 1F1B has the same total, spread over the
# warm-up and the cool-down, and interleaves forwards and backwards in its steady state.

# %%
def draw_timelines(timelines, unit):
    """Stages as rows, one box per action, coloured by micro-batch; backward boxes hatched."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 1.2 + 0.55 * sum(len(t) for t in timelines.values())))
    colors = plt.get_cmap("tab10")
    for ax, (title, timeline) in zip(axes, timelines.items()):
        for s, events in enumerate(timeline):
            for e in events:
                ax.barh(s, float(e.end - e.start), left=float(e.start), height=0.8, color=colors(e.microbatch % 10),
                        edgecolor="black", hatch="//" if e.kind == "B" else None)
                ax.text(float(e.start + e.end) / 2, s, f"{e.kind}{e.microbatch}", ha="center", va="center", fontsize=7,
                        bbox=dict(facecolor="white", alpha=0.7, pad=0.5, linewidth=0))
        ax.set_yticks(range(len(timeline)), [f"stage {s}" for s in range(len(timeline))])
        ax.invert_yaxis()
        ax.set_title(f"{title}: bubble {float(bubble_fraction(timeline)):.3f}", fontsize=10)
    axes[-1].set_xlabel(unit)
    fig.tight_layout()
    plt.show()


draw_timelines({name: simulate_schedule(SCHEDULES[name](4, 8)) for name in ("gpipe", "1f1b")},
               "time (forward = 1 unit, backward = 2 units)")

# %% [markdown]
# ### Activation memory: $m$ against $p$
#
# A micro-batch's activations stay in memory from its forward until its backward on that
# stage. GPipe runs all $m$ forwards first, so every stage holds $m$ sets of activations at its
# peak; more micro-batches shrink the bubble but grow the memory. In 1F1B stage $s$ holds at
# most $p - s$: its warm-up forwards plus the one of the steady state, after which every new
# forward is matched by a backward that frees a set. The memory no longer grows with $m$, so
# $m$ can be raised to shrink the bubble, which is why Megatron-LM and Llama 3 use 1F1B-style
# schedules. (Interleaved 1F1B, which Llama 3 uses, gives each GPU several non-adjacent chunks of
# layers to cut the bubble further; it is beyond this section.)

# %%
for m in (4, 8, 16):
    print(f"p=4 m={m:2d}: activation sets held per stage, GPipe {peak_in_flight(SCHEDULES['gpipe'](4, m))}, "
          f"1F1B {peak_in_flight(SCHEDULES['1f1b'](4, m))}")

# %% [markdown]
# ### Loss scaling
#
# The step's loss is the mean of the cross-entropy over all $N$ tokens of the batch. With $m$
# micro-batches of $N/m$ tokens each and $\ell_i$ the mean loss of micro-batch $i$,
#
# $$L = \frac{1}{N}\sum_{t=1}^{N} \ell(t) = \frac{1}{m}\sum_{i=0}^{m-1} \ell_i, \qquad
# \nabla L = \sum_{i=0}^{m-1} \nabla\Big(\frac{\ell_i}{m}\Big) \qquad (9.3)$$
#
# so each micro-batch's backward must start from $\ell_i / m$, and the gradients that accumulate
# in `.grad` over the $m$ backwards are then exactly those of the full batch. The pitfall is to
# call `backward()` on each $\ell_i$ as it comes: the loss function already averages, it looks
# right, and the gradient comes out $m$ times too large. Adam hides the bug, since its update
# barely changes when every gradient is scaled by the same factor; gradient clipping, whose
# threshold is absolute, SGD, and any comparison with a data-parallel run do not. Note also
# that (9.3) needs micro-batches with the same number of counted tokens: with padding or
# ignored positions, the mean of micro-batch means is not the token mean, and each micro-batch
# must be weighted by its share of the tokens instead of $1/m$.

# %%
torch.manual_seed(0)
tokens, targets = torch.randint(0, 256, (8, 12)), torch.randint(0, 256, (8, 12))
m = 4
grads = {}
for name, scale in (("full batch", None), ("scaled by 1/m", 1 / m), ("unscaled", 1.0)):
    model.zero_grad()
    if scale is None:
        lm_loss(model(tokens), targets).backward()
    else:
        for x_i, y_i in zip(tokens.chunk(m), targets.chunk(m)):
            (lm_loss(model(x_i), y_i) * scale).backward()                            # (9.3)
    grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
print("scaled by 1/m equals the full batch (max |difference| < 1e-12):",
      (grads["scaled by 1/m"] - grads["full batch"]).abs().max().item() < 1e-12)
print("unscaled gradient / full-batch gradient:", round((grads["unscaled"] / grads["full batch"]).nanmedian().item(), 6))

# %% [markdown]
# ### The executor
#
# `run_pipeline` runs one stage's action list in its process. A forward receives the
# micro-batch's activation from the previous stage (stage 0 takes its slice of the batch),
# runs the stage module, and sends the output to the next stage; the last stage computes the
# scaled loss (9.3) instead. It keeps the input and output of every micro-batch in flight: a
# backward receives the gradient of the output from the next stage, runs autograd through the
# stage from the saved output, and sends the gradient of the input back.
#
# The messages are `torch.distributed` point-to-point calls over a process group (`group`,
# `None` for the whole world), so the 4D composition of section 9.3 can run one pipeline per
# TP x CP x DP coordinate. Receives block: a stage waits only for the data it needs now. Sends do not
# (`isend`): two neighbours may send to each other at the same moment in the steady state of
# 1F1B (stage $s$ an activation, stage $s+1$ a gradient), and two blocking sends would wait for
# each other's receive forever. Point-to-point messages between two ranks arrive in the order
# they were sent, and in both schedules every stage runs the forwards, and the backwards, in
# micro-batch order, so each receive gets the micro-batch it expects. The receiving stage must
# know the shape of what arrives; for a transformer it is always $(b, T, d)$.

# %%
#| export lrn_lib.pipeline_parallel
@dataclass
class PipelineRun:
    """One stage's record of run_pipeline.

    loss: the step's loss, the sum over micro-batches of loss_i / m (9.3), on the last stage
    (None elsewhere); events: this stage's actions with their start and end in seconds after
    a common barrier (waiting for a message is idle time, not part of an event); peak_stored:
    the most micro-batches whose activations the stage held at once.
    """

    loss: float | None
    events: list[Event]
    peak_stored: int


def _split(batch: torch.Tensor, num_microbatches: int, name: str) -> tuple[torch.Tensor, ...]:
    """batch (B, ...) -> m micro-batches (B/m, ...) along dim 0; ValueError unless m divides B."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(batch).__name__}")
    if batch.dim() == 0 or batch.shape[0] % num_microbatches:
        raise ValueError(f"{name} has batch size {tuple(batch.shape)[:1]}, "
                         f"not divisible by num_microbatches={num_microbatches}")
    return batch.chunk(num_microbatches)


def run_pipeline(module: nn.Module, schedule: str, num_microbatches: int, activation_shape: tuple[int, ...],
                 inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, group: dist.ProcessGroup | None = None) -> PipelineRun:
    """Run one training step's forwards and backwards of this rank's stage; gradients accumulate in .grad.

    The stage index is this rank's rank in `group` (None: the whole world), the number of
    stages the group's size. schedule: "gpipe" or "1f1b". activation_shape: the shape of one
    micro-batch's tensor between stages, e.g. (B/m, T, dim), received in `dtype`.
    The first stage needs inputs (B, ...), split into num_microbatches micro-batches along
    dim 0; the last stage needs targets (B, ...) and loss_fn(output_i, targets_i) -> scalar
    mean loss of micro-batch i, which is scaled by 1/num_microbatches (9.3) before its backward.
    Zero the gradients before the call.
    """
    validate.instance(module, "module", nn.Module)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    validate.integer(num_microbatches, "num_microbatches", low=1)
    if not (isinstance(activation_shape, tuple) and activation_shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in activation_shape)):
        raise ValueError(f"activation_shape must be a tuple of positive ints, got {activation_shape!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function or None, got {type(loss_fn).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    actions = SCHEDULES[schedule](num_stages, num_microbatches)[stage]
    first, last = stage == 0, stage == num_stages - 1
    if first:
        micro_inputs = _split(inputs, num_microbatches, "inputs")
    if last:
        if loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")
        micro_targets = _split(targets, num_microbatches, "targets")
    previous = None if first else dist.get_global_rank(group, stage - 1)
    following = None if last else dist.get_global_rank(group, stage + 1)

    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}    # micro-batch -> (stage input, output or scaled loss)
    sends: list[tuple[dist.Work, torch.Tensor]] = []
    events, peak, loss = [], 0, None
    dist.barrier(group=group)
    origin = time.perf_counter()
    for kind, i in actions:
        if kind == "F":
            if first:
                x = micro_inputs[i]
            else:
                x = torch.empty(activation_shape, dtype=dtype)
                dist.recv(x, src=previous, group=group)
                x.requires_grad_(True)
            start = time.perf_counter()
            y = module(x)
            if last:
                y = loss_fn(y, micro_targets[i]) / num_microbatches                  # (9.3)
                loss = (loss or 0.0) + y.item()
            else:
                out = y.detach()
                sends.append((dist.isend(out, dst=following, group=group), out))
            stored[i] = (x, y)
            peak = max(peak, len(stored))
        else:
            x, y = stored.pop(i)
            grad_y = None
            if not last:
                grad_y = torch.empty_like(y)
                dist.recv(grad_y, src=following, group=group)
            start = time.perf_counter()
            torch.autograd.backward(y, grad_y)
            if not first:
                sends.append((dist.isend(x.grad, dst=previous, group=group), x.grad))
        events.append(Event(kind, i, start - origin, time.perf_counter() - origin))
    for work, _ in sends:
        work.wait()
    return PipelineRun(loss, events, peak)


# %% [markdown]
# ### Checked against one process and against `torch.distributed.pipelining`
#
# PyTorch ships its own pipeline engine, `torch.distributed.pipelining`: a `PipelineStage` wraps
# a stage module, and `ScheduleGPipe` or `Schedule1F1B` run it. The worker below builds the same
# float64 model on every rank from one seed, computes the single-process step, and then runs
# the pipelined step with both schedules, once with `run_pipeline` and once with PyTorch's
# engine on the same split. It returns the largest difference from the single-process step over
# the loss (on the last stage) and every gradient the stage holds.
#
# We checked PyTorch's loss scaling by experiment, with `loss_fn = lm_loss` (a mean over the
# micro-batch). Its schedules call `backward` on each micro-batch's unscaled loss and, after the
# last backward, divide every parameter's `.grad` by $m$ (the `scale_grads=True` default of
# the schedule classes, present in the torch 2.11 of the GPU machine as in 2.13). The
# gradients are then those of (9.3), and the losses it returns through `step(...,
# losses=...)` are the unscaled $\ell_i$, so the step's loss is their mean. Because the division
# applies to the whole `.grad`, a gradient already accumulated before `step` (gradient
# accumulation over several steps) is divided by $m$ as well; with a loss function that sums
# instead of averaging, pass `scale_grads=False`.

# %%
#| export lrn_lib.pipeline_parallel_checks
"""Spawn workers that check the pipeline against one process and torch.distributed.pipelining in
float64, and time its schedules with simulated compute."""
import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, check_config, lm_loss, tiny_config
from lrn_lib.mesh import Mesh, MeshShape, check_rank
from lrn_lib.pipeline_parallel import SCHEDULES, PipelineRun, build_stage, run_pipeline


def _torch_pipeline_step(module: nn.Module, schedule: str, num_microbatches: int, inputs: torch.Tensor | None,
                         targets: torch.Tensor | None, group: dist.ProcessGroup) -> float | None:
    """One step of module through torch.distributed.pipelining; returns the mean micro-batch loss on the last stage."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    runner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    engine = runner(PipelineStage(module, stage, num_stages, torch.device("cpu"), group=group),
                    n_microbatches=num_microbatches, loss_fn=lm_loss)
    if stage == num_stages - 1:
        losses: list[torch.Tensor] = []
        engine.step(*([inputs] if stage == 0 else []), target=targets, losses=losses)
        return torch.stack(losses).mean().item()
    engine.step(*([inputs] if stage == 0 else []))
    return None


def pipeline_check(rank: int, world: int, microbatch_counts: tuple[int, ...] = (4,), dp: int = 1,
                   cfg: LlamaConfig | None = None, batch: int = 20, seq: int = 8, seed: int = 0) -> dict[str, float]:
    """Spawn worker: pipelined steps against the single-process step of a float64 Llama.

    The world is a MeshShape(pp=world // dp, dp=dp): each data-parallel replica runs its own
    pipeline over its "pp" group, on its own batch (B=batch, T=seq) drawn from seed + its dp
    coordinate. For each schedule and each m in microbatch_counts it runs run_pipeline and
    torch.distributed.pipelining on the same stage split and returns
    {"ours gpipe m=4": err, "torch gpipe m=4": err, ...}, err being the largest |difference|
    from the single-process step over the loss (last stage only) and every gradient of this
    rank's stage.
    """
    check_rank(rank, world)
    validate.integer(dp, "dp", low=1, high=world)
    if world % dp:
        raise ValueError(f"dp={dp} does not divide world={world}")
    if cfg is not None:
        check_config(cfg)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    for m in validate.nonempty(microbatch_counts, "microbatch_counts"):
        validate.integer(m, "microbatch_counts", low=world // dp)
        if batch % m:
            raise ValueError(f"microbatch_counts holds {m}, which does not divide batch={batch}")
    mesh = Mesh(MeshShape(pp=world // dp, dp=dp))
    group = mesh.group["pp"]
    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    cfg = cfg if cfg is not None else tiny_config(n_layers=4)
    torch.manual_seed(seed)
    reference = Llama(cfg).double()
    data = torch.Generator().manual_seed(seed + 1 + mesh.coords["dp"])
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=data)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=data)
    expected_loss = lm_loss(reference(tokens), targets)
    expected_loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}

    errors = {}
    for m in microbatch_counts:
        for schedule in SCHEDULES:
            for engine in ("ours", "torch"):
                module = build_stage(copy.deepcopy(reference), stage, num_stages)
                module.zero_grad(set_to_none=True)
                first_inputs = tokens if stage == 0 else None
                last_targets = targets if stage == num_stages - 1 else None
                if engine == "ours":
                    loss = run_pipeline(module, schedule, m, (batch // m, seq, cfg.dim), first_inputs, last_targets,
                                        lm_loss, torch.float64, group).loss
                else:
                    loss = _torch_pipeline_step(module, schedule, m, first_inputs, last_targets, group)
                err = max((p.grad - expected[name]).abs().max().item() for name, p in module.named_parameters())
                if loss is not None:
                    err = max(err, abs(loss - expected_loss.item()))
                errors[f"{engine} {schedule} m={m}"] = err
    return errors


# %%
from lrn_lib.pipeline_parallel_checks import pipeline_check

results = spawn(pipeline_check, 4, (4,), 1, tiny_config(n_layers=4), 8)
worst = {key: max(r[key] for r in results) for key in results[0]}
for key, err in worst.items():
    print(f"4 stages, {key}: loss and all gradients equal the single-process step (max |difference| < 1e-10):",
          err < 1e-10)

# %% [markdown]
# ### The bubble, measured
#
# Finally we run both schedules for real and time every action. To see the schedule rather than
# the noise of four processes sharing a laptop's cores, each stage's compute is a
# `SimulatedCompute` module that sleeps a fixed time in its forward (and twice that in its
# backward), so every micro-batch costs the same on every stage and the CPU stays free for the
# messages. The idle fraction of the measured timeline is compared with (9.2).

# %%
#| export lrn_lib.pipeline_parallel_checks
class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward each sleep a given time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_seconds: float, backward_seconds: float) -> torch.Tensor:
        time.sleep(forward_seconds)
        ctx.backward_seconds = backward_seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_seconds)
        return grad, None, None


class SimulatedCompute(nn.Module):
    """The identity x (...) -> x (...) that takes forward_seconds forward and backward_seconds backward.

    It sleeps instead of computing, so stages of equal cost can be timed on a shared CPU.
    """

    def __init__(self, forward_seconds: float, backward_seconds: float):
        super().__init__()
        validate.number(forward_seconds, "forward_seconds", low=0)
        validate.number(backward_seconds, "backward_seconds", low=0)
        self.forward_seconds, self.backward_seconds = forward_seconds, backward_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> the same values (...), after sleeping forward_seconds."""
        validate.tensor(x, "x", nonempty=False)
        return _Sleep.apply(x, self.forward_seconds, self.backward_seconds)


def timeline_worker(rank: int, world: int, num_microbatches: int, forward_seconds: float) -> dict[str, PipelineRun]:
    """Spawn worker: one step of each schedule over `world` equal simulated stages; {schedule: PipelineRun}.

    Each stage is a Linear(4, 4) followed by SimulatedCompute(forward_seconds, 2 * forward_seconds).
    An untimed step with zero compute comes first: a process's first backward pays one-time setup costs.
    """
    check_rank(rank, world)
    validate.integer(num_microbatches, "num_microbatches", low=world)
    validate.number(forward_seconds, "forward_seconds", low=0)
    torch.manual_seed(0)
    inputs = torch.randn(num_microbatches, 4) if rank == 0 else None
    targets = torch.zeros(num_microbatches, 4) if rank == world - 1 else None

    def step(schedule: str, seconds: float) -> PipelineRun:
        module = nn.Sequential(nn.Linear(4, 4), SimulatedCompute(seconds, 2 * seconds))
        return run_pipeline(module, schedule, num_microbatches, (1, 4), inputs, targets, F.mse_loss)

    step("gpipe", 0.0)
    return {schedule: step(schedule, forward_seconds) for schedule in SCHEDULES}


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.pipeline_parallel_checks import timeline_worker

p, m = 4, 8
runs = spawn(timeline_worker, p, m, 0.05)
measured = {name: [runs[s][name].events for s in range(p)] for name in SCHEDULES}
for name, timeline in measured.items():
    print(f"{name}: measured bubble {bubble_fraction(timeline):.3f}, (p-1)/(m+p-1) = {float(bubble_formula(p, m)):.3f}")
draw_timelines(measured, "seconds")

# %%
for name, timeline in measured.items():
    print(f"{name}: measured bubble within 0.05 of (9.2):", abs(bubble_fraction(timeline) - bubble_formula(p, m)) < 0.05)
    print(f"{name}: activation sets held per stage match the schedule's count:",
          [runs[s][name].peak_stored for s in range(p)] == peak_in_flight(SCHEDULES[name](p, m)))

# %% [markdown]
# Both schedules idle the same share of the step, about $(p-1)/(m+p-1) = 3/11$ here, but GPipe
# held all 8 micro-batches' activations on every stage, 1F1B at most $4, 3, 2, 1$. With real
# compute the measured bubble is larger than (9.2): the messages take time, and the last stage,
# which also runs the output head and the loss, is slower than the others unless the partition
# accounts for it, as Llama 3's lighter end stages do.

# %% [markdown]
# ## 9.2 Data parallelism and FSDP
#
# Data parallelism (DP) is the oldest and simplest way to use many GPUs: every rank holds the
# whole model, takes its own slice of the global batch, runs forward and backward on it,
# and the ranks then average their gradients so that every rank applies the same optimizer
# step. It needs one all-reduce of the gradients per step and no change to the model, which is why it is the
# outermost dimension of Llama 3's mesh (section 7.1): it spans the slow links between
# servers. Its weakness is memory: every rank stores the parameters, the gradients and the
# optimizer state of the full model. ZeRO (Rajbhandari et al. 2019, "ZeRO: Memory
# Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054) removes that
# redundancy by sharding those three across the data-parallel ranks; PyTorch calls the full
# version Fully Sharded Data Parallel (Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277),
# and Llama 3 trains with it.
#
# This section builds plain DP with the correct loss scaling, then ZeRO-3 / FSDP from
# scratch, checks both against the single-process step in float64, measures what each rank
# stores, and cross-checks our FSDP against PyTorch's own `fully_shard`.

# %%
import torch

from lrn_lib.llama import Llama, LLAMA3_8B, parameter_count, tiny_config
from lrn_lib.spawn import spawn

torch.set_num_threads(1)

# %% [markdown]
# ### 9.2.1 Which mean? The loss-scaling rule
#
# The training loss is the mean of the per-token losses $\ell_t$ over the **global** batch.
# Split the global batch over $W$ ranks, and each rank's share over $M$ micro-steps of
# gradient accumulation; micro-batch $(r, m)$ holds $n_{r,m}$ tokens and its mean loss is
# $L_{r,m}$. Then
#
# $$L = \frac{1}{N}\sum_{r,m}\sum_{t \in B_{r,m}} \ell_t = \sum_{r,m} \frac{n_{r,m}}{N} L_{r,m},
# \qquad N = \sum_{r,m} n_{r,m} \qquad (9.4)$$
#
# and since the gradient is linear,
#
# $$\nabla L = \sum_{r} \Big(\sum_m \frac{n_{r,m}}{N} \nabla L_{r,m}\Big). \qquad (9.5)$$
#
# The inner sum is what rank $r$ computes by calling `backward` on each micro-batch's mean
# loss multiplied by $n_{r,m}/N$ (autograd accumulates the micro-steps into `.grad`); the
# outer sum is one `all_reduce(SUM)` of the gradients. Only $N$, one integer, has to be
# agreed on first. When every micro-batch holds the same number of tokens,
# $n_{r,m}/N = 1/(WM)$:
#
# $$\nabla L = \frac{1}{W}\sum_r \frac{1}{M}\sum_m \nabla L_{r,m} \qquad (9.6)$$
#
# which is the familiar recipe: average the gradients over the ranks and divide the loss
# of each accumulation step by $M$. With unequal counts (a global batch of 10 sequences on
# 3 ranks, sequences of different lengths, or padding tokens left out of the loss), the
# recipe (9.6) over-weights the tokens of the smaller shares; (9.5) stays exact. Engines that divide the summed gradient by $W$
# themselves, as PyTorch's DDP and FSDP do, need the weight $W n_{r,m}/N$ instead: that is
# the `sync="mean"` option below. For the 4D composition of section 9.3 the same function runs over
# the combined CP x DP group, because both dimensions split the tokens of one global batch.

# %%
#| export lrn_lib.data_parallel
import weakref
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from lrn_lib import validate
from lrn_lib.llama import Llama
from lrn_lib.mesh import check_group, check_rank

SYNC_OPS = ("sum", "mean")


def split_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of the rows of x (N, ...) -> (N_r, ...), sizes differing by at most one."""
    check_rank(rank, world)
    if validate.tensor(x, "x", nonempty=False).dim() == 0:
        raise ValueError("x must have a dimension of rows, got a 0-dim tensor")
    if x.shape[0] < world:
        raise ValueError(f"x has {x.shape[0]} rows: fewer than world={world}, some rank would get none")
    return torch.tensor_split(x, world)[rank]


def backward_global_mean(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         group: dist.ProcessGroup | None = None, sync: str = "sum") -> torch.Tensor:
    """Backpropagate this rank's share of the global-batch mean loss (9.5), one micro-batch at a time.

    loss_fn(inputs, targets) returns the mean loss over the targets.numel() tokens of one
    micro-batch; micro_batches is this rank's list of (inputs (b_m, T_m), targets (b_m, T_m)).
    Each micro-batch's loss is weighted by n_m / N, N the token count over every micro-batch
    of every rank in `group`, so that summing the gradients over the group (sync="sum")
    yields the gradient of the global mean. sync="mean" weights by W n_m / N, for a gradient
    reduction that averages over the W ranks (DDP, FSDP2). Returns the global mean loss, a
    float64 scalar equal on every rank. Gradients are accumulated, not synchronized.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function, got {type(loss_fn).__name__}")
    validate.choice(sync, "sync", SYNC_OPS)
    for pair in validate.nonempty(micro_batches, "micro_batches"):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], torch.Tensor)):
            raise TypeError("micro_batches must hold (inputs, targets) pairs with a tensor of targets")
    check_group(group)
    counts = [targets.numel() for _, targets in micro_batches]
    if min(counts) == 0:
        raise ValueError(f"micro_batches holds a micro-batch without tokens (token counts {counts})")
    n_global = torch.tensor(sum(counts), dtype=torch.int64)
    dist.all_reduce(n_global, group=group)                       # N of (9.4): one integer
    scale = dist.get_world_size(group) if sync == "mean" else 1
    loss_sum = torch.zeros((), dtype=torch.float64)
    for (inputs, targets), n in zip(micro_batches, counts):
        loss = loss_fn(inputs, targets)
        (loss * (scale * n / n_global.item())).backward()        # (9.5): weight n_{r,m} / N
        loss_sum += loss.detach().double() * n
    dist.all_reduce(loss_sum, group=group)
    return loss_sum / n_global.item()


# %% [markdown]
# ### Gradient buckets and overlap
#
# The gradient synchronization is one `all_reduce` per parameter in the simplest version.
# PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704)
# packs gradients into **buckets** of about 25 MiB: few large messages use the links far
# better than many small ones. The buckets are filled in reverse order of the parameters,
# because backward produces the gradients of the last layers first, and DDP launches each
# bucket's all-reduce asynchronously as soon as its last gradient arrives, so communication
# overlaps the rest of the backward pass. Below we keep the buckets and leave out the
# overlap: `all_reduce_gradients` runs after backward, one collective per bucket.

# %%
#| export lrn_lib.data_parallel
def gradient_buckets(grads: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Group gradient indices into buckets of at most bucket_bytes (a larger single tensor gets its own).

    Walks the tensors from last to first (the order backward produces them) and starts a new
    bucket when the next tensor would overflow the current one or has another dtype.
    """
    if not isinstance(grads, (list, tuple)) or not all(isinstance(g, torch.Tensor) for g in grads):
        raise TypeError(f"grads must be a list of tensors, got {type(grads).__name__}")
    validate.integer(bucket_bytes, "bucket_bytes", low=1)
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(grads))):
        nbytes = grads[i].numel() * grads[i].element_size()
        if buckets and size + nbytes <= bucket_bytes and grads[buckets[-1][-1]].dtype == grads[i].dtype:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def all_reduce_gradients(module: nn.Module, group: dist.ProcessGroup | None = None,
                         bucket_bytes: int = 25 * 2**20) -> int:
    """Sum every parameter gradient of module over `group` in place, bucket by bucket (the outer sum of (9.5)).

    A parameter without a gradient takes part with zeros, so every rank issues the same
    collectives. Returns the number of all_reduce calls.
    """
    validate.instance(module, "module", nn.Module)
    check_group(group)
    validate.integer(bucket_bytes, "bucket_bytes", low=1)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    buckets = gradient_buckets(grads, bucket_bytes)
    for bucket in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, group=group)
        for i, piece in zip(bucket, flat.split([grads[i].numel() for i in bucket])):
            grads[i].copy_(piece.view_as(grads[i]))
    return len(buckets)


# %%
cfg = tiny_config()
model = Llama(cfg).double()
grads = [p.detach() for p in model.parameters()]
print("tiny Llama:", len(grads), "parameter tensors,", sum(g.numel() for g in grads), "parameters")
for bucket_bytes in (25 * 2**20, 2**18, 2**16):
    print(f"buckets of {bucket_bytes // 1024:6d} KiB -> {len(gradient_buckets(grads, bucket_bytes)):2d} all_reduce calls")

# %% [markdown]
# ### Checking DP against one process
#
# The check runs the same two AdamW steps three ways. The reference is one process on the
# whole global batch. The DP run splits each global batch of 10 sequences over 3 ranks
# (4, 3 and 3 sequences) and each rank's share over 2 micro-steps, weights the losses by
# (9.5), sums the gradients, and steps. Every rank builds the model from the same seed, so
# all start equal; their gradients after the all-reduce are equal, and so are their steps.
# The worker also applies the naive recipe (9.6) to the same unequal split, to show how
# far off it is.

# %%
#| export lrn_lib.data_parallel_checks
"""Spawn workers that check data parallelism and FSDP against one process in float64, and our FSDP
against PyTorch's fully_shard."""
import copy
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lrn_lib import validate
from lrn_lib.data_parallel import (GatherStats, all_reduce_gradients, backward_global_mean, gather_full_state,
                                   persistent_bytes, shard_llama, split_rows)
from lrn_lib.llama import Llama, LlamaConfig, check_config, lm_loss, pydoc_bytes, random_windows
from lrn_lib.mesh import check_rank


def _adamw(params) -> torch.optim.AdamW:
    """The optimizer of every run in this section (large steps, so that errors would show)."""
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _check_run(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int, steps: int) -> None:
    """The argument checks of the DP and FSDP workers: every rank gets rows and micro_steps micro-batches."""
    check_rank(rank, world)
    check_config(cfg)
    validate.integer(batch, "batch", low=world)
    validate.integer(seq, "seq", low=1, high=cfg.max_seq_len)
    validate.integer(micro_steps, "micro_steps", low=1, high=batch // world)
    validate.integer(steps, "steps", low=1)


def _setup(cfg: LlamaConfig, batch: int, seq: int, steps: int, seed: int) -> tuple[Llama, list]:
    """A float64 Llama from `seed` and `steps` global batches of (tokens, targets), each (batch, seq)."""
    torch.manual_seed(seed)
    model = Llama(cfg).double()
    generator = torch.Generator().manual_seed(seed)
    data = pydoc_bytes() % cfg.vocab_size
    return model, [random_windows(data, batch, seq, generator) for _ in range(steps)]


def _micro_batches(tokens: torch.Tensor, targets: torch.Tensor, rank: int, world: int,
                   micro_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows of the global batch (B, T), split into micro_steps micro-batches."""
    x, y = split_rows(tokens, rank, world), split_rows(targets, rank, world)
    if x.shape[0] < micro_steps:
        raise ValueError(f"rank {rank} holds {x.shape[0]} sequences, fewer than micro_steps={micro_steps}")
    return list(zip(x.tensor_split(micro_steps), y.tensor_split(micro_steps)))


def _plain_state(model: nn.Module, grad: bool) -> dict[str, torch.Tensor]:
    """Parameters (or gradients) of an unsharded model by name."""
    return {n: (p.grad if grad else p).detach().clone() for n, p in model.named_parameters()}


def _reference_run(model: nn.Module, batches: list) -> dict:
    """One process, whole global batches: per-step losses and gradients, final parameters, bytes held."""
    opt = _adamw(model.parameters())
    losses, grads = [], []
    for tokens, targets in batches:
        loss = lm_loss(model(tokens), targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_plain_state(model, grad=True))
        opt.step()
        held = persistent_bytes(model, opt)
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "params": _plain_state(model, grad=False), "bytes": held}


def _parallel_run(model: nn.Module, batches: list, rank: int, world: int, micro_steps: int, sync: str,
                  reduce_gradients: Callable[[nn.Module], object] | None,
                  full_state: Callable[[nn.Module, bool], dict[str, torch.Tensor]]) -> dict:
    """The same steps on this rank's micro-batches; full_state reads back unsharded parameters/gradients."""
    opt = _adamw(model.parameters())
    losses, grads = [], []
    for tokens, targets in batches:
        micro = _micro_batches(tokens, targets, rank, world, micro_steps)
        losses.append(backward_global_mean(lambda x, y: lm_loss(model(x), y), micro, sync=sync))
        if reduce_gradients is not None:
            reduce_gradients(model)
        grads.append(full_state(model, True))
        opt.step()
        held = persistent_bytes(model, opt)
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "params": full_state(model, False), "bytes": held}


def _max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all tensors of two dicts with the same names."""
    if a.keys() != b.keys():
        raise ValueError(f"the runs name different tensors: {sorted(a.keys() ^ b.keys())}")
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _errors(run: dict, ref: dict) -> dict[str, float]:
    """Largest loss, gradient (any step) and final-parameter differences of a run from the reference."""
    return {"loss": max(abs(x.item() - y.item()) for x, y in zip(run["losses"], ref["losses"])),
            "grad": max(_max_error(g, h) for g, h in zip(run["grads"], ref["grads"])),
            "param": _max_error(run["params"], ref["params"])}


def data_parallel_check(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int,
                        steps: int = 2, seed: int = 0) -> dict[str, float]:
    """Spawn worker: DP with (9.5) against one process on the whole batch, over `steps` AdamW steps.

    Returns the max |difference| of the losses, of every gradient and of the final parameters,
    and "naive_grad": the gradient error of averaging local means (9.6) on the first batch.
    """
    _check_run(rank, world, cfg, batch, seq, micro_steps, steps)
    model, batches = _setup(cfg, batch, seq, steps, seed)
    ref = _reference_run(copy.deepcopy(model), batches)
    run = _parallel_run(copy.deepcopy(model), batches, rank, world, micro_steps, "sum",
                        all_reduce_gradients, _plain_state)
    naive = copy.deepcopy(model)
    tokens, targets = batches[0]
    lm_loss(naive(split_rows(tokens, rank, world)), split_rows(targets, rank, world)).backward()
    all_reduce_gradients(naive)
    for p in naive.parameters():
        p.grad /= world                                           # (9.6): right only for equal shares
    return {**_errors(run, ref), "naive_grad": _max_error(_plain_state(naive, grad=True), ref["grads"][0])}


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.data_parallel_checks import data_parallel_check  # spawned processes import the worker from the module

dp = spawn(data_parallel_check, 3, cfg, 10, 16, 2)
for rank, errors in enumerate(dp):
    print(f"rank {rank}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

# %%
worst = {k: max(e[k] for e in dp) for k in dp[0]}
print("DP on 3 ranks x 2 micro-steps = one process: loss, every gradient, parameters after 2 steps < 1e-12:",
      max(worst["loss"], worst["grad"], worst["param"]) < 1e-12)
print("naive averaging of local means is off by more than 1e-4 with shares of 4, 3, 3 sequences:",
      worst["naive_grad"] > 1e-4)

# %% [markdown]
# ### 9.2.2 Where the memory goes
#
# With $\Psi$ parameters and AdamW, a DP rank in mixed precision (Micikevicius et al. 2017,
# arXiv:1710.03740) holds 2 bytes per parameter for the bf16/fp16 weights, 2 for their
# gradients, and $K = 12$ for the optimizer: an fp32 master copy of the weights and Adam's
# two fp32 moments. ZeRO's three stages shard, one after another, the optimizer state
# ($P_{os}$), the gradients ($P_{os+g}$) and the parameters ($P_{os+g+p}$) over the $W$
# data-parallel ranks:
#
# $$\text{DP}: (2+2+K)\Psi, \quad \text{ZeRO-1}: (2+2)\Psi + \frac{K\Psi}{W}, \quad
# \text{ZeRO-2}: 2\Psi + \frac{(2+K)\Psi}{W}, \quad \text{ZeRO-3}: \frac{(2+2+K)\Psi}{W} \qquad (9.7)$$
#
# Our float64 runs keep no master copy: 8 bytes of weights, 8 of gradients and $K = 16$
# (two float64 moments). Activations and temporary buffers come on top of all of these.

# %%
#| export lrn_lib.data_parallel
def zero_bytes_per_rank(n_params: float, world: int, stage: int, param_bytes: float = 2,
                        grad_bytes: float = 2, optimizer_bytes: float = 12) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer state under ZeRO stage 0 (DP) to 3 (9.7).

    Defaults are mixed-precision AdamW (2 + 2 + 12 bytes per parameter); returns a dict with
    keys params, grads, optimizer and total.
    """
    validate.integer(stage, "stage", low=0, high=3)
    validate.integer(world, "world", low=1)
    for name, value in (("n_params", n_params), ("param_bytes", param_bytes), ("grad_bytes", grad_bytes),
                        ("optimizer_bytes", optimizer_bytes)):
        validate.number(value, name, low=0)
    out = {"params": param_bytes * n_params / (world if stage >= 3 else 1),
           "grads": grad_bytes * n_params / (world if stage >= 2 else 1),
           "optimizer": optimizer_bytes * n_params / (world if stage >= 1 else 1)}
    out["total"] = sum(out.values())
    return out


# %%
psi = parameter_count(LLAMA3_8B)
print(f"Llama 3 8B: {psi / 1e9:.2f}B parameters; GB per rank for weights + gradients + AdamW (bf16 mixed precision)")
print("  W     DP  ZeRO-1  ZeRO-2  ZeRO-3")
for world in (1, 8, 64):
    row = [zero_bytes_per_rank(psi, world, stage)["total"] / 1e9 for stage in range(4)]
    print(f"{world:3d} " + " ".join(f"{gb:7.1f}" for gb in row))

# %% [markdown]
# Plain DP needs 128 GB per GPU for the 8B model before the first activation, more than an
# 80 GB H100 holds; sharding over the 8 GPUs of one server brings it to 16 GB, and over 64
# ranks to 2 GB. The communication is almost free for stages 1 and 2: a ring all-reduce *is*
# a reduce-scatter followed by an all-gather, each moving $(W-1)/W$ of the data per rank. In
# ZeRO-2 each rank reduce-scatters the gradients, updates its own shard of the parameters
# and all-gathers the updated parameters: the same two halves. ZeRO-3 must all-gather the
# parameters twice (forward and backward) because it does not keep them, so it moves
# $3\Psi$ instead of $2\Psi$: 1.5 times the DP volume.
#
# ### 9.2.3 ZeRO-3 / FSDP from scratch
#
# We shard **per unit**: the token embedding, each `TransformerBlock`, the final norm and
# the output head. A unit's $P$ parameters are flattened into one vector (in
# `named_parameters` order), padded with zeros to $W s$ elements where $s = \lceil P/W
# \rceil$, and rank $r$ keeps only its slice:
#
# $$\theta^{(r)} = \mathrm{flat}(\theta)[\,r s : (r+1) s\,] \qquad (9.8)$$
#
# That slice is the unit's only `nn.Parameter`; the unit's modules keep no weights of their
# own. A step then runs:
#
# 1. Before the unit's forward: `all_gather` the $W$ shards into the full flat vector, point
#    the modules' weights at views of it, run the forward, and drop the full vector.
# 2. Autograd wants to keep the weights that the backward needs (a linear layer saves its
#    weight to compute the input gradient). We intercept what it saves with
#    `torch.autograd.graph.saved_tensors_hooks`: a saved view of the gathered vector is
#    replaced by its (offset, shape, stride), and the backward all-gathers the vector again
#    on first use.
# 3. The gathering itself is an autograd function whose backward receives the gradient of
#    the full flat vector on each rank (of that rank's tokens) and returns a
#    `reduce_scatter`: rank $r$ gets the sum over ranks of slice $r$,
#
#    $$g^{(r)} = \sum_{q=1}^{W} \nabla_{\mathrm{flat}(\theta)} L^{(q)}\,[\,r s : (r+1) s\,] \qquad (9.9)$$
#
#    which lands in the shard's `.grad` (and accumulates over micro-steps). The re-gathered
#    vector is freed there too: every use of it in the unit's backward is over.
# 4. AdamW works element by element, so AdamW on the shard computes exactly slice $r$ of
#    AdamW on the full vector; `torch.optim.AdamW` over the shards is the whole optimizer.
#    (A global gradient-norm clip would need one extra all-reduce of the shards' squared
#    norms; the padding has zero gradient and does not change it.)
#
# A small `GatherStats` object counts the bytes of gathered vectors that are alive, through
# `weakref.finalize`: the count drops only when the tensor is really freed (any view, any
# tensor autograd saved, any reference the communication backend still holds keeps it
# alive), so its peak is a measurement, not a promise.

# %%
#| export lrn_lib.data_parallel
class GatherStats:
    """Bytes of gathered (unsharded) parameter vectors alive now (`live`), at most (`peak`), and all-gathers made."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.gathers = 0

    def track(self, full: torch.Tensor) -> None:
        """Count full (P,) as alive until Python frees it."""
        validate.tensor(full, "full", nonempty=False)
        nbytes = full.numel() * full.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.gathers += 1
        weakref.finalize(full, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


class _GatherShards(torch.autograd.Function):
    """shard (s,) -> full flat vector (W s,) by all_gather; backward: reduce_scatter (9.9)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, unit: "ShardedUnit") -> torch.Tensor:
        ctx.unit = unit
        return unit.gather(shard, track=True)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> tuple[torch.Tensor, None]:
        unit = ctx.unit
        unit.regathered = None                     # the unit's backward is done with its parameters
        return unit.reduce_scatter(grad_full), None


def _check_shard_options(group: dist.ProcessGroup | None, stats: GatherStats | None, reshard_after_forward: bool) -> None:
    """Raise unless group is a ProcessGroup or None, stats a GatherStats or None, reshard_after_forward a bool."""
    check_group(group)
    if stats is not None and not isinstance(stats, GatherStats):
        raise TypeError(f"stats must be a GatherStats or None, got {type(stats).__name__}")
    validate.flag(reshard_after_forward, "reshard_after_forward")


class ShardedUnit(nn.Module):
    """ZeRO-3 wrapper: module's parameters live as one padded flat shard (9.8) per rank of `group`.

    forward(*args) all-gathers the full parameters, runs module(*args) and frees them; the
    backward all-gathers them again and reduce-scatters their gradient into shard.grad (9.9).
    With reshard_after_forward=False the gathered parameters stay alive from forward to
    backward instead (one all-gather per step fewer, more memory), as FSDP's option of that name.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None,
                 stats: GatherStats | None = None, reshard_after_forward: bool = True):
        super().__init__()
        validate.instance(module, "module", nn.Module)
        _check_shard_options(group, stats, reshard_after_forward)
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"module ({type(module).__name__}) has no parameters to shard")
        if any(isinstance(m, ShardedUnit) for m in module.modules()):
            raise ValueError("module already contains a ShardedUnit: shard each unit once, bottom-up")
        if len({p.dtype for _, p in named}) > 1:
            raise ValueError(f"module's parameters mix dtypes {sorted({str(p.dtype) for _, p in named})}")
        self.module, self.group, self.stats = module, group, stats
        self.reshard_after_forward = reshard_after_forward
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.slots: list[tuple[str, nn.Module, str, int, torch.Size]] = []   # name, owner, attribute, offset, shape
        offset = 0
        for name, p in named:
            owner_name, _, attr = name.rpartition(".")
            self.slots.append((name, module.get_submodule(owner_name), attr, offset, p.shape))
            offset += p.numel()
        self.numel = offset
        self.shard_numel = -(-offset // self.world)                           # s = ceil(P / W)
        flat = torch.zeros(self.shard_numel * self.world, dtype=named[0][1].dtype, device=named[0][1].device)
        flat[:offset] = torch.cat([p.detach().reshape(-1) for _, p in named])
        start = self.rank * self.shard_numel
        self.shard = nn.Parameter(flat[start:start + self.shard_numel].clone())   # (9.8)
        for _, owner, attr, _, _ in self.slots:
            delattr(owner, attr)                                              # the module keeps no weights
            setattr(owner, attr, None)
        self.regathered: torch.Tensor | None = None
        self._gathered_ptr: int | None = None

    def gather(self, shard: torch.Tensor, track: bool = False) -> torch.Tensor:
        """all_gather the W shards (s,) of `group` into the full padded flat vector (W s,)."""
        full = torch.empty(self.shard_numel * self.world, dtype=shard.dtype, device=shard.device)
        dist.all_gather(list(full.chunk(self.world)), shard.detach().contiguous(), group=self.group)
        if track and self.stats is not None:
            self.stats.track(full)
        return full

    def reduce_scatter(self, grad_full: torch.Tensor) -> torch.Tensor:
        """(W s,) gradient of this rank -> (s,) sum over the ranks of this rank's slice (9.9)."""
        grad_shard = torch.empty(self.shard_numel, dtype=grad_full.dtype, device=grad_full.device)
        dist.reduce_scatter(grad_shard, list(grad_full.contiguous().chunk(self.world)), group=self.group)
        return grad_shard

    def _bind(self, full: torch.Tensor | None) -> None:
        """Point every weight of the module at its view of full (or at None)."""
        for _, owner, attr, offset, shape in self.slots:
            setattr(owner, attr, None if full is None else full[offset:offset + shape.numel()].view(shape))

    def _pack(self, saved: torch.Tensor):
        """Saved-tensor hook: a view of the gathered vector is stored as (offset, shape, stride) only."""
        if saved.untyped_storage().data_ptr() == self._gathered_ptr:
            return saved.storage_offset(), saved.shape, saved.stride()
        return saved

    def _unpack(self, packed) -> torch.Tensor:
        """Inverse of _pack; the first parameter the backward needs triggers the second all-gather."""
        if isinstance(packed, torch.Tensor):
            return packed
        offset, shape, stride = packed
        if self.regathered is None:
            self.regathered = self.gather(self.shard, track=True)
        return self.regathered.as_strided(shape, stride, offset)

    def forward(self, *args, **kwargs):
        """module(*args, **kwargs) with the full parameters gathered for the duration of the call."""
        full = _GatherShards.apply(self.shard, self)
        self._bind(full)
        self._gathered_ptr = full.untyped_storage().data_ptr()
        hooks = (torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
                 if self.reshard_after_forward else nullcontext())
        with hooks:
            out = self.module(*args, **kwargs)
        self._bind(None)
        self._gathered_ptr = None
        return out

    def full_tensors(self, grad: bool = False) -> dict[str, torch.Tensor]:
        """Collective: the unsharded parameters (or gradients) of the module by name, each in its own shape."""
        source = self.shard.grad if grad else self.shard
        if source is None:
            raise ValueError("grad=True but the shard has no gradient yet")
        full = self.gather(source)
        return {name: full[offset:offset + shape.numel()].view(shape).clone()
                for name, _, _, offset, shape in self.slots}


# %% [markdown]
# Wrapping the Llama replaces its units by `ShardedUnit`s in place; `Llama.forward` does not
# change, since a wrapped unit is called with the same arguments. `gather_full_state` reads
# the whole model back by its original parameter names (a collective, for checks), and
# `persistent_bytes` counts what a rank keeps from step to step: the bytes of its
# parameters, their gradients and every tensor of the optimizer state (for PyTorch's
# `DTensor`s, the local shard).

# %%
#| export lrn_lib.data_parallel
def shard_llama(model: Llama, group: dist.ProcessGroup | None = None, stats: GatherStats | None = None,
                reshard_after_forward: bool = True) -> list[ShardedUnit]:
    """ZeRO-3 a Llama in place over `group`: one ShardedUnit per embedding, block, final norm and head."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a lrn_lib.llama.Llama, got {type(model).__name__}")
    _check_shard_options(group, stats, reshard_after_forward)          # before the model is changed

    def wrap(module: nn.Module) -> ShardedUnit:
        return ShardedUnit(module, group, stats, reshard_after_forward)

    model.tok_embeddings = wrap(model.tok_embeddings)
    for i, layer in enumerate(model.layers):
        model.layers[i] = wrap(layer)
    model.norm = wrap(model.norm)
    model.output = wrap(model.output)
    return [m for m in model.modules() if isinstance(m, ShardedUnit)]


def gather_full_state(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """Collective: every sharded unit's full parameters (or gradients), named as in the unwrapped model."""
    validate.instance(model, "model", nn.Module)
    state = {}
    for path, unit in model.named_modules():
        if isinstance(unit, ShardedUnit):
            prefix = path + "." if path else ""
            state.update({prefix + name: t for name, t in unit.full_tensors(grad).items()})
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of t this rank stores: the local shard of a DTensor, t itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank keeps across steps: parameters, their gradients, optimizer state tensors."""
    validate.instance(model, "model", nn.Module)
    validate.instance(optimizer, "optimizer", torch.optim.Optimizer)

    def nbytes(tensors) -> int:
        return sum(_local(t).numel() * _local(t).element_size() for t in tensors)

    params = list(model.parameters())
    return {"params": nbytes(params),
            "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values()
                                if isinstance(v, torch.Tensor))}


# %% [markdown]
# ### Checking FSDP, and PyTorch's `fully_shard`
#
# `fsdp_check` trains four copies of the same model for two AdamW steps: the single-process
# reference; our ZeRO-3 with re-sharding after forward; ours without; and PyTorch's FSDP2,
# `torch.distributed.fsdp.fully_shard` applied to every block and then to the whole model
# (the root unit then holds the embedding, the final norm and the head), on a CPU
# `DeviceMesh` over gloo. FSDP2 shards each parameter along its first dimension as a
# `DTensor` instead of one flat vector per unit, and averages (rather than sums) the
# reduce-scattered gradients, so its losses are weighted with `sync="mean"`.

# %%
#| export lrn_lib.data_parallel_checks
def _dtensor_state(model: nn.Module, grad: bool) -> dict[str, torch.Tensor]:
    """Full parameters (or gradients) of an FSDP2 model by name (a collective per parameter)."""
    return {n: (p.grad if grad else p).full_tensor().detach().clone() for n, p in model.named_parameters()}


def fsdp_check(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int,
               steps: int = 2, seed: int = 0) -> dict:
    """Spawn worker: our ZeRO-3 (both resharding modes) and FSDP2's fully_shard against one process.

    Returns max |difference| of losses, gradients and final parameters ("loss", "grad", "param";
    "keep_*" without resharding after forward; "fsdp2_*"), the peak and final live gathered
    bytes and the number of all-gathers ("peak", "live", "gathers", "keep_*"), the padded bytes
    of every unit in model order, embedding first ("unit_bytes"), and the persistent bytes of
    a DP rank, our ZeRO-3 rank and an FSDP2 rank ("dp_bytes", "bytes", "fsdp2_bytes").
    """
    _check_run(rank, world, cfg, batch, seq, micro_steps, steps)
    model, batches = _setup(cfg, batch, seq, steps, seed)
    ref = _reference_run(copy.deepcopy(model), batches)
    out: dict = {"dp_bytes": ref["bytes"]}
    for prefix, reshard in (("", True), ("keep_", False)):
        stats = GatherStats()
        sharded = copy.deepcopy(model)
        units = shard_llama(sharded, None, stats, reshard)
        run = _parallel_run(sharded, batches, rank, world, micro_steps, "sum", None, gather_full_state)
        out.update({prefix + k: v for k, v in _errors(run, ref).items()})
        out[prefix + "peak"], out[prefix + "live"], out[prefix + "gathers"] = stats.peak, stats.live, stats.gathers
        if reshard:
            out["bytes"] = run["bytes"]
            out["unit_bytes"] = [u.shard_numel * world * u.shard.element_size() for u in units]
    fsdp2 = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp2.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp2, mesh=mesh)
    run = _parallel_run(fsdp2, batches, rank, world, micro_steps, "mean", None, _dtensor_state)
    out.update({"fsdp2_" + k: v for k, v in _errors(run, ref).items()})
    out["fsdp2_bytes"] = run["bytes"]
    return out


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.data_parallel_checks import fsdp_check

deep = tiny_config(n_layers=4)
fsdp = {world: spawn(fsdp_check, world, deep, 9, 16, 2) for world in (1, 2, 4)}
for world, results in fsdp.items():
    r = results[-1]
    print(f"W={world}, last rank: " + ", ".join(f"{k} {r[k]:.1e}" for k in
          ("loss", "grad", "param", "keep_param", "fsdp2_loss", "fsdp2_grad", "fsdp2_param")))

# %%
keys = ("loss", "grad", "param", "keep_loss", "keep_grad", "keep_param", "fsdp2_loss", "fsdp2_grad", "fsdp2_param")
worst = max(r[k] for results in fsdp.values() for r in results for k in keys)
print("our ZeRO-3 (both modes) and FSDP2 on W = 1, 2, 4 ranks = one process:",
      "losses, every gradient, parameters after 2 AdamW steps < 1e-12:", worst < 1e-12)

# %% [markdown]
# All three engines reproduce the single-process run to rounding (the runs use a 4-layer
# tiny Llama, so that one block is a small part of the model). Now the bytes each rank
# keeps (rank 0, after an optimizer step, gradients still held). The DP and ZeRO-3 columns
# are measured on the runs above; the ZeRO-1 and ZeRO-2 columns combine the measured full
# tensors of the DP rank with the measured shards of the ZeRO-3 rank, which is exactly what
# those stages keep. The last column is (9.7) with 8 + 8 + 16 bytes per parameter.

# %%
def kib(nbytes: float) -> str:
    return f"{nbytes / 1024:8.1f}"


n_params = parameter_count(deep)
print(f"4-layer tiny Llama, {n_params} float64 parameters; KiB per rank (params + grads + AdamW state)")
print("  W       DP   ZeRO-1   ZeRO-2   ZeRO-3    FSDP2  (9.7) ZeRO-3")
formula_gap = 0.0
for world, results in fsdp.items():
    dp_b, z3, f2 = results[0]["dp_bytes"], results[0]["bytes"], results[0]["fsdp2_bytes"]
    zero1 = dp_b["params"] + dp_b["grads"] + z3["optimizer"]
    zero2 = dp_b["params"] + z3["grads"] + z3["optimizer"]
    formula = zero_bytes_per_rank(n_params, world, 3, 8, 8, 16)["total"]
    formula_gap = max(formula_gap, abs(sum(z3.values()) - formula) / formula)
    print(f"{world:3d} " + " ".join(kib(b) for b in (sum(dp_b.values()), zero1, zero2, sum(z3.values()),
                                                     sum(f2.values()), formula)))
print("measured ZeRO-3 bytes within 0.5% of (8 + 8 + 16) Psi / W:", formula_gap < 0.005)

# %% [markdown]
# The measured ZeRO-3 bytes differ from the formula only by the padding (at most $W-1$
# elements per unit) and by AdamW's step counter, a 4-byte tensor per parameter tensor,
# which is why DP (39 parameter tensors) holds a little more than $32\Psi$ and why FSDP2,
# which keeps one shard per original parameter, holds a little more than our ZeRO-3 with
# its 7 flat shards.
#
# Sharding the persistent state is half the story: during the step a rank also holds the
# parameters it gathered. With re-sharding after forward, our code holds one unit at a
# time; without it, the gathered parameters of every unit stay alive from their forward to
# their backward. Every unit but one: the embedding's backward needs only the token ids, so
# autograd saves nothing of its weight, its gathered vector dies right after its forward in
# both modes, and with re-sharding the backward never gathers it again.
#
# The measured peak with re-sharding is at least the largest unit, and sometimes a little
# more, varying from run to run: gloo's worker threads drop their own reference to an
# all-gather's output a moment after the collective has returned, so on a busy CPU the
# previous unit's buffer can still be alive when the next one is gathered. GPUs have the
# same problem in another form (memory of a collective still in flight on another stream
# cannot be reused yet), which is why PyTorch's first FSDP had a `limit_all_gathers` rate
# limiter that allows only two all-gathers in flight.

# %%
# NBVAL_IGNORE_OUTPUT
r = fsdp[4][0]
units = r["unit_bytes"]
print(f"W=4: all parameters gathered {kib(sum(units))} KiB, largest unit {kib(max(units))} KiB")
print(f"     peak of live gathered parameters: resharding {kib(r['peak'])} KiB, keeping {kib(r['keep_peak'])} KiB")

# %%
print("with resharding, the peak lies between the largest unit and the three largest (< whole model):",
      max(units) <= r["peak"] <= sum(sorted(units)[-3:]) < sum(units))
print("without resharding, it holds all units but the embedding, or all:",
      sum(units) - units[0] <= r["keep_peak"] <= sum(units))
print("every gathered vector freed by the end of the step:", all(x[k] == 0 for res in fsdp.values()
                                                               for x in res for k in ("live", "keep_live")))
micro_batches = 2 * 2                                             # 2 steps of 2 micro-batches
print("all-gathers per micro-batch: resharding", r["gathers"] // micro_batches,
      "(7 forward + 6 backward), keeping", r["keep_gathers"] // micro_batches)

# %% [markdown]
# Real FSDP improves on this in two ways that change speed, not results. It **prefetches**:
# the all-gather of unit $i+1$ is issued while unit $i$ computes (and in backward, of unit
# $i-1$ while unit $i$'s gradients are computed), on a separate CUDA stream, so the peak
# is two units rather than one, and the communication hides behind compute. And it
# keeps the gathered parameters in bf16 while the shards and optimizer stay in fp32, which
# is where (9.7)'s $2 + 2 + 12$ comes from. Llama 3's report describes running its FSDP
# without re-sharding the weights after the forward pass, trading the memory measured above
# for one fewer all-gather per micro-batch, which matters when pipeline parallelism runs
# many micro-batches per step. Section 9.3 uses `backward_global_mean` and
# `all_reduce_gradients` over the CP x DP group of the 4D mesh, and 10.1 hands the sharding
# to `fully_shard`, which we have just checked against our own.

# %% [markdown]
# ## 9.3 All four at once
#
# Each dimension so far split one thing: TP the weight matrices, CP the sequence, PP the
# layers, DP the batch. They compose because they split different things. On the 4D mesh
# of section 7.1, a rank with coordinates $(t, c, p, d)$
#
# 1. builds the full model from the shared seed, keeps tensor-parallel shard $t$ of every
#    matrix (section 7.2), and of those only the layers of pipeline stage $p$ (section 9.1);
# 2. takes data-parallel slice $d$ of the batch (section 9.2), and of each sequence the chunks
#    that CP rank $c$ holds under Llama 3's load balancing, with their global positions
#    (chapter 8);
# 3. runs the 1F1B schedule over its PP group, with TP's all-reduces inside every layer
#    over its TP group and CP's K/V all-gathers over its CP group;
# 4. sums gradients over its CP x DP group: those ranks hold the same weight shard and
#    have seen different tokens.
#
# The loss needs care in exactly one place. The single-process loss is the mean over all
# $N$ target tokens of the step. On rank $(t, c, p, d)$, micro-batch $i$'s loss function
# returns the mean over its $n$ local tokens divided by $|CP|\,|DP|$, the pipeline divides
# by $m$ micro-batches, so each token's loss carries weight $1 / (n \cdot m \cdot |CP|\,|DP|)
# = 1/N$:
#
# $$\mathcal{L} = \sum_{c,d} \sum_{i=1}^{m} \frac{1}{m}\,\frac{1}{|CP|\,|DP|}\,
#   \frac{1}{n} \sum_{j \in \text{shard}(c, d, i)} \ell_j = \frac{1}{N} \sum_{j=1}^{N} \ell_j \qquad (9.10)$$
#
# and a plain sum (not a mean) of gradients over the CP x DP group gives the exact
# gradient. The worker below does all of it and compares the loss and every gradient
# shard with the single-process step, in float64.

# %%
#| export lrn_lib.parallel_4d
import torch
import torch.distributed as dist

from lrn_lib.context_parallel import cp_attend, shard_positions, shard_sequence
from lrn_lib.data_parallel import all_reduce_gradients, split_rows
from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, lm_loss
from lrn_lib.mesh import Mesh, MeshShape, check_mesh_shape, check_rank
from lrn_lib.pipeline_parallel import build_stage, run_pipeline
from lrn_lib.tensor_parallel import check_tp_config, gradient_errors, tensor_parallel_llama, vocab_parallel_cross_entropy


def four_d_step(rank: int, world: int, shape: MeshShape, cfg: LlamaConfig, batch: int, seq: int,
                microbatches: int, seed: int = 0) -> dict:
    """Spawn worker: one training step of a Llama on the 4D mesh `shape`, against the single-process step.

    batch sequences of seq + 1 tokens (inputs and next-token targets); batch must split into
    dp x microbatches equal parts and seq into 2 x cp chunks. Returns this rank's coordinates,
    its group members, the step's loss (on last-stage ranks, else None), the single-process
    loss, and the largest |gradient difference| over this rank's parameter shards.
    """
    check_rank(rank, world)
    check_mesh_shape(shape, world)
    check_tp_config(cfg, shape.tp)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1, high=cfg.max_seq_len)
    validate.integer(microbatches, "microbatches", low=shape.pp)      # a pipeline needs one per stage
    if batch % (shape.dp * microbatches):
        raise ValueError(f"batch={batch} does not split into dp={shape.dp} x microbatches={microbatches} parts")
    if seq % (2 * shape.cp):
        raise ValueError(f"seq={seq} is not divisible by 2 x cp = {2 * shape.cp}")
    mesh = Mesh(shape)
    t, c, p, d = (mesh.coords[k] for k in ("tp", "cp", "pp", "dp"))
    torch.manual_seed(seed)                                          # one model and one batch on every rank
    model = Llama(cfg).double()
    tokens = torch.randint(cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    reference = lm_loss(model(inputs), targets)                      # the single-process step
    reference.backward()

    stage = build_stage(tensor_parallel_llama(model, mesh.group["tp"]), p, shape.pp)    # 1. TP shard, PP stage
    stage.zero_grad()
    stage.positions = shard_positions(seq, c, shape.cp)               # 2. the CP shard's global positions
    for block in stage.layers.values():
        block.attention.attend = cp_attend("allgather", mesh.group["cp"])
    mine = shard_sequence(split_rows(inputs, d, shape.dp), c, shape.cp)
    my_targets = shard_sequence(split_rows(targets, d, shape.dp), c, shape.cp)

    def loss_fn(local_logits: torch.Tensor, micro_targets: torch.Tensor) -> torch.Tensor:
        mean = vocab_parallel_cross_entropy(local_logits, micro_targets, cfg.vocab_size, mesh.group["tp"])
        return mean / (shape.cp * shape.dp)                          # (9.10); the pipeline divides by m

    micro_shape = (batch // shape.dp // microbatches, seq // shape.cp, cfg.dim)
    run = run_pipeline(stage, "1f1b", microbatches, micro_shape, mine, my_targets, loss_fn,
                       torch.float64, mesh.group["pp"])             # 3. 1F1B over the PP group
    all_reduce_gradients(stage, mesh.group["cp_dp"])                # 4. sum over CP x DP

    loss = None
    if stage.last:
        total = torch.tensor([run.loss], dtype=torch.float64)
        dist.all_reduce(total, group=mesh.group["cp_dp"])
        loss = total.item()
    return {"coords": mesh.coords, "members": mesh.members, "loss": loss, "reference": reference.item(),
            "grad_error": max(gradient_errors(stage, model).values())}


# %% [markdown]
# Sixteen processes on the laptop, the paper's Figure 5 layout $|TP| = |CP| = |PP| = |DP|
# = 2$, a 2-layer tiny model (one layer per stage), a batch of 4 sequences of 16 tokens
# (2 per DP rank, as 2 micro-batches of one sequence; 8 tokens per CP rank, in the chunks
# $\{c, 3 - c\}$ of 4 chunks of 4).

# %%
from lrn_lib.llama import tiny_config
from lrn_lib.mesh import MeshShape
from lrn_lib.spawn import spawn
from lrn_lib.parallel_4d import four_d_step

shape = MeshShape(tp=2, cp=2, pp=2, dp=2)
results = spawn(four_d_step, shape.world, shape, tiny_config(), 4, 16, 2)
for rank, r in enumerate(results):
    m = r["members"]
    print(f"GPU{rank:<2d} [TP{r['coords']['tp']}, CP{r['coords']['cp']}, PP{r['coords']['pp']}, DP{r['coords']['dp']}]"
          f"  TP {m['tp']}  CP {m['cp']}  PP {m['pp']}  DP {m['dp']}  CPxDP {m['cp_dp']}")

# %%
losses = [r["loss"] for r in results if r["loss"] is not None]
print("last-stage ranks report the loss:", len(losses), "of", len(results))
print("4D loss equals the single-process loss:", all(abs(x - results[0]["reference"]) < 1e-12 for x in losses))
print("every gradient shard equals the single-process gradient's slice:",
      max(r["grad_error"] for r in results) < 1e-12)

# %% [markdown]
# ## Summary
#
# * Pipeline parallelism splits the layers and pays with idle time: with $p$ stages and $m$
#   micro-batches the bubble is $(p-1)/(m+p-1)$ of the step for GPipe and 1F1B alike, but
#   1F1B holds the activations of $p$ micro-batches where GPipe holds $m$.
# * Data parallelism splits the batch; its one subtle point is loss scaling: every token's
#   loss must be weighted by one over the global token count, whatever the split. FSDP also
#   shards the weights, gradients and optimizer state and gathers weights just in time.
# * Composed on the $[TP, CP, PP, DP]$ mesh, all four still give the single-process step
#   exactly, in float64.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("09.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("09")))` lists the checkers. Worked solutions:
# `chapters/solutions/09_pipeline_data_parallel_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (measure): the bubble of any schedule.** (a) Write
# `schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) -> float`
# that runs a schedule (one list of actions `("F", i)` / `("B", i)` per stage, as
# `gpipe_schedule` returns) with instant messages and the dependencies of section 9.1, and
# returns the bubble (9.1). Each stage runs its actions in the listed order; the checker's
# schedules never deadlock, but their orders need not be GPipe's or 1F1B's. Run
# `check("09.schedule_bubble", schedule_bubble)`. (b) With your function, print the bubble of
# GPipe and 1F1B for $p = 4$ and $m = 4, 8, 16, 32$ next to (9.2), and the largest number of
# micro-batches whose activations stage 0 holds at once (`peak_in_flight`). Then give stage 0
# of GPipe its forwards in reverse order. Look for: both schedules follow (9.2) exactly, 1F1B
# holds $p$ micro-batches where GPipe holds $m$, and the reversed order makes the step longer.
