"""The exercises of chapter 04 (FlashAttention-2): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 04 id is checked.

Hand-written; may import only library modules of chapter 04 or earlier (book.toml order).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator

import torch

from lrn_lib.attention import attention_reference, causal_visible
from lrn_lib.exercises.machinery import Case, Exercise, F64, INF, Mistake, _randn


def _block_update_reference(acc, l, m, s, v):
    """One FlashAttention-2 step for a block of keys: the merge (2.2) with deferred normalization."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(m_new == -INF, torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m - m_safe)
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(-1), m_new


def _cases_block_update(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("acc", "l", "m", "s", "v")

    def walk(s_all: torch.Tensor, v_all: torch.Tensor, cuts: list[int], step: int, note: str) -> Case:
        rows, d = s_all.shape[0], v_all.shape[1]
        state = (torch.zeros(rows, d, dtype=F64), torch.zeros(rows, dtype=F64), torch.full((rows,), -INF, dtype=F64))
        bounds = [0, *cuts, s_all.shape[1]]
        for j in range(step):
            state = _block_update_reference(*state, s_all[:, bounds[j]:bounds[j + 1]], v_all[bounds[j]:bounds[j + 1]])
        s, v = s_all[:, bounds[step]:bounds[step + 1]], v_all[bounds[step]:bounds[step + 1]]
        return Case((*state, s, v), names, _block_update_reference(*state, s, v), note)

    s = torch.tensor([[0.5, 2.0, 1.0, 8.0], [3.0, -1.0, 0.0, 1.0]], dtype=F64)
    v = _randn(gen, 4, 3)
    yield walk(s, v, [2], 0, "the first key block: acc = 0, l = 0, m = -inf")
    yield walk(s, v, [2], 1, "the second block raises the first row's maximum from 2 to 8")
    masked = s.clone()
    masked[0, :2] = -INF
    yield walk(masked, v, [2], 0, "a first block whose first row is all masked (-inf)")
    yield walk(masked, v, [2], 1, "a row whose scores so far were all masked")
    while True:
        rows, d, n_keys = rng.randint(1, 8), rng.randint(1, 16), rng.randint(1, 50)
        s_all = _randn(gen, rows, n_keys) * rng.choice([1.0, 5.0, 30.0])
        if rng.random() < 0.6:
            s_all[torch.rand(rows, n_keys, generator=gen) < rng.choice([0.2, 0.5, 0.9])] = -INF
        if rng.random() < 0.3:
            s_all[rng.randrange(rows), : rng.randint(1, n_keys)] = -INF      # a masked stretch
        cuts = sorted(rng.sample(range(1, n_keys), k=min(n_keys - 1, rng.randint(0, 5)))) if n_keys > 1 else []
        yield walk(s_all, _randn(gen, n_keys, d), cuts, rng.randint(0, len(cuts)), "random")


def _update_l_not_rescaled(acc, l, m, s, v):
    new_acc, _, new_m = _block_update_reference(acc, l, m, s, v)
    m_safe = torch.where(new_m == -INF, torch.zeros_like(new_m), new_m)
    return new_acc, l + torch.exp(s - m_safe[:, None]).sum(-1), new_m


def _update_acc_not_rescaled(acc, l, m, s, v):
    _, new_l, new_m = _block_update_reference(acc, l, m, s, v)
    m_safe = torch.where(new_m == -INF, torch.zeros_like(new_m), new_m)
    return acc + torch.exp(s - m_safe[:, None]) @ v, new_l, new_m


def _update_normalized(acc, l, m, s, v):
    new_acc, new_l, new_m = _block_update_reference(acc, l, m, s, v)
    return new_acc / new_l[:, None], new_l, new_m


def _update_no_standin(acc, l, m, s, v):
    m_new = torch.maximum(m, s.amax(-1))
    p = torch.exp(s - m_new[:, None])
    alpha = torch.exp(m - m_new)
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(-1), m_new


def _update_m_kept(acc, l, m, s, v):
    new_acc, new_l, _ = _block_update_reference(acc, l, m, s, v)
    return new_acc, new_l, m


def _causal_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, note: str) -> Case:
    o, _ = attention_reference(q[None, None], k[None, None], v[None, None], causal=True)
    return Case((q, k, v), ("q", "k", "v"), o[0, 0], note)


def _cases_causal_attention(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    for n_q, n_k, d, note in [(4, 4, 2, "N_q = N_k"), (2, 5, 3, "N_q < N_k: the diagonal moves right"),
                              (5, 3, 2, "N_q > N_k: the first two queries see no key"),
                              (1, 1, 1, "one query, one key")]:
        yield _causal_case(_randn(gen, n_q, d), _randn(gen, n_k, d), _randn(gen, n_k, d), note)
    while True:
        n_q, n_k, d = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 16)
        scale = rng.choice([0.5, 1.0, 3.0])
        yield _causal_case(_randn(gen, n_q, d) * scale, _randn(gen, n_k, d) * scale, _randn(gen, n_k, d), "random")


def _attention_with(visible: Callable[[int, int], torch.Tensor], scale: bool = True, zero_empty: bool = True):
    """A one-head attention with a given mask rule; the model behind several mistake hints."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.T / (math.sqrt(q.shape[-1]) if scale else 1.0)
        s = s.masked_fill(~visible(q.shape[0], k.shape[0]), -INF)
        p = torch.softmax(s, -1)
        return (p.nan_to_num(0.0) if zero_empty else p) @ v
    return attend


def _top_left(n_q: int, n_k: int) -> torch.Tensor:
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None]


def _strict(n_q: int, n_k: int) -> torch.Tensor:
    return torch.arange(n_k)[None, :] < torch.arange(n_q)[:, None] + (n_k - n_q)


def _no_mask(n_q: int, n_k: int) -> torch.Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool)


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="04.block_update", summary="one FlashAttention-2 step: merge a block of scores into (acc, l, m)",
        signature="block_update(acc, l, m, s, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]  "
                  "(acc: (B_r, d), l and m: (B_r,), s: (B_r, B_c) scaled, masked scores, v: (B_c, d))",
        cases=_cases_block_update, n_cases=200, outputs=("acc", "l", "m"),
        fallback="m_new = max(m, rowmax(s)); P = e^(s - m_new); l_new = e^(m - m_new) l + rowsum(P); "
                 "acc_new = e^(m - m_new) acc + P v (section 4.4, change 2)",
        shape_hint="return acc of shape (B_r, d) and l, m of shape (B_r,)",
        nonfinite_hint=("nan where the answer is finite: a row whose scores so far are all -inf has m = -inf, "
                        "and e^(-inf - (-inf)) is nan; use a stand-in maximum 0 there (sections 2.3 and 4.5)"),
        mistakes=(
            Mistake(_update_l_not_rescaled,
                    "your l ignores the rescaling e^(m - m_new) of the old sum: l_new = e^(m - m_new) l + "
                    "rowsum(P), the merge (2.2)"),
            Mistake(_update_acc_not_rescaled,
                    "your acc is not rescaled by e^(m - m_new) when the maximum grows: acc_new = "
                    "e^(m - m_new) acc + P v (change 2 of section 4.4)"),
            Mistake(_update_normalized,
                    "you normalized acc; FlashAttention-2 keeps it unnormalized and divides by l once, after "
                    "the last key block (change 2 of section 4.4)"),
            Mistake(_update_no_standin,
                    "a row whose scores so far are all masked (-inf) gave nan: e^(-inf - (-inf)) is undefined; "
                    "exponentiate against a stand-in maximum 0 there, so the row stays (0, 0, -inf)"),
            Mistake(_update_m_kept,
                    "m must become the new running maximum, max(m, rowmax(s))"),
        )),
    Exercise(
        id="04.causal_attention",
        summary="one head of attention with a bottom-right causal mask, N_q != N_k allowed (section 4.1)",
        signature="causal_attention(q, k, v) -> torch.Tensor  (q: (N_q, d), k, v: (N_k, d); returns (N_q, d))",
        cases=_cases_causal_attention, n_cases=150, outputs=("o",),
        fallback="S = Q K^T / sqrt(d); hide key j from query i unless j <= i + (N_k - N_q); O = softmax(S) V, "
                 "with O = 0 for queries that see no key (section 4.1)",
        shape_hint="O has one row per query and d columns: (N_q, d)",
        nonfinite_hint=("nan rows: when N_q > N_k the first N_q - N_k queries see no key, and their output "
                        "is defined as 0 (section 4.1)"),
        mistakes=(
            Mistake(_attention_with(_top_left),
                    "your mask is aligned to the top left (j <= i); the book aligns it to the bottom right, "
                    "j <= i + (N_k - N_q), so the last query sees every key (section 4.1)"),
            Mistake(_attention_with(causal_visible, zero_empty=False),
                    "queries that see no key (the first N_q - N_k when N_q > N_k) must output 0, not nan "
                    "(section 4.1)"),
            Mistake(_attention_with(causal_visible, scale=False),
                    "scale the scores by tau = 1 / sqrt(d) before the softmax, equation (4.1)"),
            Mistake(_attention_with(_strict),
                    "off by one: query i sees key j when j <= i + (N_k - N_q), the diagonal included"),
            Mistake(_attention_with(_no_mask),
                    "no key is masked: a causal mask hides key j from query i when j > i + (N_k - N_q)"),
        )),
)
