"""The exercises of chapter 06 (LLaMA 3 and 4D parallelism): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 06 id is checked.

Hand-written; may import only library modules of chapter 06 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _randn, _random_shape
from lrn_lib.llama import RMSNorm, apply_rope, rope_cos_sin
from lrn_lib.pipeline_parallel import bubble_fraction, gpipe_schedule, one_f_one_b_schedule, simulate_schedule
from lrn_lib.tensor_parallel import shard_bounds


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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
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
)
