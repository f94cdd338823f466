"""The exercises of chapter 13 (LLaDA: masked diffusion language models): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 13 id is checked.

Hand-written; may import only library modules of chapter 13 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, F64, Mistake, _randn
from lrn_lib.llada import commit_most_confident, pretraining_loss, transfer_schedule


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
        p = 1e-3 + (1 - 1e-3) * torch.rand(b, generator=gen, dtype=F64)                  # (13.2)
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


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="13.pretraining_loss", summary="LLaDA's loss: masked cross-entropy over p, divided by B L, (13.3)",
        signature="pretraining_loss(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, p: torch.Tensor) "
                  "-> torch.Tensor  (logits (B, L, V), x0 and masked (B, L), p (B,) -> a 0-dim loss)",
        cases=_cases_pretraining_loss, n_cases=200, outputs=("loss",),
        fallback="sum over the masked tokens of -log softmax(logits)[x0] / p of their row, divided by B * L, "
                 "equation (13.3)",
        shape_hint="return a single number (a 0-dim tensor)",
        nonfinite_hint="inf or nan: use a stable log-softmax (F.cross_entropy) for logits near 1000, and do not "
                       "divide by the number of masked tokens, which can be 0",
        mistakes=(
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) / p[:, None]).sum() / m.sum(),
                    "you divided by the number of masked tokens; (13.3) divides by B * L, all positions, "
                    "so the expectation of the 1/p-weighted sum bounds the likelihood (section 13.2)"),
            Mistake(lambda lo, x0, m, p: _masked_ce(lo, x0, m).sum() / x0.numel(),
                    "each masked token's cross-entropy must be divided by its row's p, equation (13.3)"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) * p[:, None]).sum() / x0.numel(),
                    "you multiplied by p; the weight is 1/p (1/t in (13.3))"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, torch.ones_like(m)) / p[:, None]).sum() / x0.numel(),
                    "only masked tokens count: a visible token is given to the model, not predicted, (13.3)"),
            Mistake(lambda lo, x0, m, p: (_masked_ce(lo, x0, m) / p[:, None]).sum() / x0.shape[0],
                    "divide by B * L, not by B alone, equation (13.3)"),
        )),
    Exercise(
        id="13.transfer_schedule", summary="how many tokens each sampling step commits, front-loaded, (13.8)",
        signature="transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor  "
                  "(n_masked (B,) int64 -> (B, steps) int64)",
        cases=_cases_transfer_schedule, n_cases=200, outputs=("counts",),
        fallback="n_s = floor(m / N) + [s < m mod N] for s = 0 .. N-1, equation (13.8)",
        shape_hint="return one row per sequence and one column per step, (B, steps)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(lambda n, s: (n // s)[:, None] + (torch.arange(s)[None] >= s - n[:, None] % s).long(),
                    "your remainder goes to the last steps; (13.8) gives the extra tokens to the first "
                    "m mod N steps"),
            Mistake(lambda n, s: (n // s)[:, None].expand(-1, s).clone(),
                    "your counts do not add up to the number of masks: spread the remainder m mod N, one "
                    "token each over the first steps, (13.8)"),
            Mistake(lambda n, s: ((n + s - 1) // s)[:, None].expand(-1, s).clone(),
                    "ceil(m / N) every step commits more tokens than there are masks; (13.8) gives "
                    "floor(m / N) plus one on the first m mod N steps only"),
            Mistake(lambda n, s: (n // s)[:, None] + torch.where(torch.arange(s)[None] == 0, (n % s)[:, None], 0),
                    "the whole remainder lands on the first step; (13.8) spreads it, one token per step"),
        )),
    Exercise(
        id="13.commit_low_confidence", summary="one step of low-confidence remasking: commit the most confident masks",
        signature="commit_low_confidence(x: torch.Tensor, proposal: torch.Tensor, confidence: torch.Tensor, "
                  "counts: torch.Tensor, mask_id: int) -> torch.Tensor  ((B, L) tensors, counts (B,) -> (B, L))",
        cases=_cases_commit_low_confidence, n_cases=200, outputs=("x",),
        fallback="in row b, among the positions where x == mask_id, take the counts[b] of highest confidence, "
                 "write their proposals, and keep every other position (section 13.6)",
        shape_hint="return the new x, of x's shape (B, L)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_commit_any_position,
                    "only masked positions compete: set the confidence of unmasked positions to -inf before "
                    "taking the top counts[b] (a committed token is never changed)"),
            Mistake(_commit_least_confident,
                    "you committed the least confident proposals; low-confidence remasking keeps the most "
                    "confident and remasks the rest (section 13.6)"),
            Mistake(_commit_same_count,
                    "each row commits its own counts[b], not the largest count of the batch"),
            Mistake(lambda x, prop, conf, counts, mask_id: torch.where(x == mask_id, prop, x),
                    "you committed every mask; a step commits only counts[b] of them (13.8)"),
        )),
)
