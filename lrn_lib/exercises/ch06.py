"""The exercises of chapter 06 (The Llama 3 model): their random inputs, the mistake models that
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
)
