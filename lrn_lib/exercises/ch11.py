"""The exercises of chapter 11 (GRPO: Group Relative Policy Optimization): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 11 id is checked.

Hand-written; may import only library modules of chapter 11 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _randn
from lrn_lib.grpo import group_advantages, grpo_loss


def _advantages_case(rewards: torch.Tensor, group_size: int, note: str = "random") -> Case:
    return Case((rewards, group_size), ("rewards", "group_size"), group_advantages(rewards, group_size)[0], note)


def _cases_group_advantages(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _advantages_case(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), 4, "one right answer of four")
    yield _advantages_case(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64), 3,
                           "two groups, one all right and one all wrong: advantages 0")
    yield _advantages_case(torch.tensor([0.0, 2.0], dtype=F64), 2, "G = 2")
    yield _advantages_case(torch.tensor([1.0, 0.0, 0.0, 1.5, 1.0, 1.0, 1.0, 1.0], dtype=F64), 4,
                           "section 11.2's example")
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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="11.group_advantages", summary="group-relative advantages with the Bessel std plus 1e-4, (11.3)",
        signature="group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor  "
                  "(rewards (N,), groups contiguous -> advantages (N,))",
        cases=_cases_group_advantages, n_cases=200, outputs=("advantages",),
        fallback="view the rewards as (N / G, G), one group per row; A = (r - row mean) / (row std + 1e-4) "
                 "with the Bessel-corrected std, (11.3) and section 11.2",
        shape_hint="return one advantage per completion, shape (N,), in the order of the rewards",
        nonfinite_hint="nan or inf: a group whose rewards are all equal has std 0; add epsilon = 1e-4 to the "
                       "std, so that the advantage is exactly 0 (section 11.2)",
        mistakes=(
            Mistake(lambda r, g: _adv_std(r, g, unbiased=False),
                    "your std divides by G; section 11.2 uses the sample std with Bessel's correction, "
                    "dividing by G - 1 (torch's default, unbiased=True)"),
            Mistake(lambda r, g: _adv_std(r, g, eps=0.0),
                    "you left out epsilon = 1e-4: a group of equal rewards must give 0, not nan (section 11.2)"),
            Mistake(_adv_batch,
                    "you normalized over the whole batch; the baseline and the scale are each group's own "
                    "mean and std, (11.3)"),
            Mistake(_adv_strided,
                    "your groups are strided; the G samples of one prompt are contiguous: rewards.view(-1, G)"),
            Mistake(lambda r, g: (r.view(-1, g) - r.view(-1, g).mean(1, keepdim=True)).reshape(-1),
                    "you only subtracted the group mean (Dr. GRPO's choice); (11.3) also divides by the "
                    "group's std + 1e-4"),
        )),
    Exercise(
        id="11.grpo_loss", summary="the clipped GRPO loss -J with the k3 KL and the per-sequence mean, (11.5)",
        signature="grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float, beta: float) -> "
                  "torch.Tensor  ((B, L) tensors, advantages (B,) -> a 0-dim loss)",
        cases=_cases_grpo_loss, n_cases=200, outputs=("loss",),
        fallback="per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (e^(ref - logp) - (ref - logp) - 1); "
                 "masked mean over each row's tokens, then the mean over rows, (11.5)",
        shape_hint="return a single number (a 0-dim tensor)",
        mistakes=(
            Mistake(_grpo_max,
                    "you took the max of the two branches; the objective takes the min (the pessimistic "
                    "one), and the loss is minus that, (11.2)"),
            Mistake(_grpo_token_mean,
                    "you averaged over all tokens of the batch (the bnpo normalization); the paper's grpo "
                    "averages each row over its own tokens first, then over rows, (11.5)"),
            Mistake(_grpo_kl_sign,
                    "the KL term enters the loss with +beta (the objective subtracts it), (11.5)"),
            Mistake(_grpo_k1,
                    "the KL term is the estimator (11.4), e^(ref - logp) - (ref - logp) - 1, not logp - ref"),
            Mistake(_grpo_unmasked,
                    "tokens after the end of a completion (mask 0) must not count: multiply by the mask "
                    "before summing"),
            Mistake(lambda *args: -_grpo_reference(*args),
                    "your sign is flipped: the loss is -J, so minimizing it maximizes the objective (11.5)"),
        )),
)
