"""The exercises of chapter 07 (Processes, the mesh and tensor parallelism): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 07 id is checked.

Hand-written; may import only library modules of chapter 07 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _randn
from lrn_lib.tensor_parallel import shard_bounds


def _shard(logits: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(logits.split(sizes, dim=-1))


def _sharded_case(logits: torch.Tensor, sizes: list[int], targets: torch.Tensor, note: str = "random") -> Case:
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none")            # (7.8)
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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="07.sharded_cross_entropy",
        summary="per-token cross-entropy from vocabulary shards, without gathering the logits, (7.8)",
        signature="sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor  "
                  "(shards[r] (N, V_r), consecutive slices from id 0; targets (N,) global ids -> losses (N,))",
        cases=_cases_sharded_cross_entropy, n_cases=200, outputs=("loss",),
        fallback="m = the maximum over every shard, l = log sum_r sum_v e^(z_v - m) - (z_y - m), where only the "
                 "shard that owns y contributes z_y, equation (7.8)",
        shape_hint="return one loss per token, shape (N,)",
        nonfinite_hint="inf or nan: with logits near 1000, e^z overflows; subtract the global maximum m "
                       "(the maximum over all shards) before exponentiating, equation (7.8)",
        mistakes=(
            Mistake(_sharded_local_max,
                    "each shard subtracted its own maximum: sums e^(z - m_r) taken against different m_r "
                    "cannot be added; use the global m = max_r m_r (the first all-reduce), equation (7.8)"),
            Mistake(_sharded_no_offset,
                    "the target logit is looked up at the global id in every shard; shard r holds ids "
                    "[s_r, e_r), so look up y - s_r, and only in the shard that owns y, equation (7.8)"),
            Mistake(_sharded_no_max,
                    "e^z overflows (or underflows) for logits near +-1000: subtract the global maximum m, "
                    "equation (7.8)"),
            Mistake(_sharded_max_not_added,
                    "you forgot m: the loss is log sum e^(z - m) - (z_y - m), equation (7.8)"),
            Mistake(lambda shards, targets: -torch.nn.functional.cross_entropy(torch.cat(shards, -1), targets,
                                                                               reduction="none"),
                    "your sign is flipped: the loss is log sum e^z - z_y >= 0"),
        )),
)
