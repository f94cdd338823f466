"""The exercises of chapter 15 (SEEM, part 2: training, evaluation and the interactive loop): their random inputs,
the mistake models that name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises
loads when a chapter 15 id is checked.

Hand-written; may import only library modules of chapter 15 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _random_blobs, _randn
from lrn_lib.seem_training import bce_loss, dice_loss


def _mask_losses_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(15.3) and (15.4) per mask: the library's dice_loss and bce_loss."""
    return dice_loss(logits, targets), bce_loss(logits, targets)


def _losses_case(logits: torch.Tensor, targets: torch.Tensor, note: str = "random") -> Case:
    return Case((logits, targets), ("logits", "targets"), _mask_losses_reference(logits, targets), note)


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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="15.mask_losses", summary="the dice loss (15.3) and the sigmoid cross-entropy (15.4) of each mask",
        signature="mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]  "
                  "(logits (N, X) float, targets (N, X) bool -> (dice (N,), bce (N,)))",
        cases=_cases_mask_losses, n_cases=200, outputs=("dice", "bce"),
        fallback="per row: dice = 1 - (2 sum sigma(m) t + 1) / (sum sigma(m) + sum t + 1), equation (15.3); "
                 "bce = the mean over the X pixels of log(1 + e^m) - t m, equation (15.4)",
        shape_hint="return one dice loss and one BCE per mask (row of logits): two tensors of shape (N,)",
        nonfinite_hint="inf or nan where the answer is finite: log(1 + e^m) overflows for large m and log sigma(m) "
                       "is -inf once sigma(m) rounds to 0 or 1; use softplus(m) - t m "
                       "(F.binary_cross_entropy_with_logits), and keep the +1 terms of (15.3)",
        mistakes=(
            Mistake(lambda lo, t: _mask_losses_reference(lo, t)[::-1],
                    "your two outputs are swapped: return (dice, bce) in this order"),
            Mistake(lambda lo, t: (_dice_with(lo, t, smooth=0.0), bce_loss(lo, t)),
                    "your dice has no +1 terms: (15.3) adds 1 to the numerator and to the denominator, so an "
                    "empty target with an empty prediction costs 0 instead of 0/0 (exercise 1)"),
            Mistake(lambda lo, t: (_dice_with(lo, t, sigmoid=False), bce_loss(lo, t)),
                    "your dice uses the logits m_x; (15.3) uses the probabilities sigma(m_x)"),
            Mistake(lambda lo, t: (_dice_with(lo, t, square=True), bce_loss(lo, t)),
                    "you squared the terms of the denominator (V-Net's variant); (15.3) sums sigma(m_x) and t_x "
                    "themselves, as Mask2Former does"),
            Mistake(lambda lo, t: (1 - dice_loss(lo, t), bce_loss(lo, t)),
                    "you returned the dice coefficient; the loss (15.3) is 1 minus it, 0 for a perfect mask"),
            Mistake(lambda lo, t: (dice_loss(lo, t), bce_loss(lo, t) * lo.shape[1]),
                    "your BCE is the sum over the pixels; (15.4) is the mean, divided by X"),
            Mistake(lambda lo, t: (dice_loss(lo, t), _bce_naive(lo, t)),
                    "log sigma(m) and log(1 - sigma(m)) are -inf once sigma(m) rounds to 0 or 1 (m beyond about "
                    "+-37 in float64): write (15.4) as softplus(m) - t m, or use "
                    "F.binary_cross_entropy_with_logits"),
        )),
)
