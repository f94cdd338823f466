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
# # Chapter 2. Online softmax: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 2. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's float64 references and prints one line.

# %%
import math
import random

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises

config.seed_everything(0)
print("\n".join(exercises("02")))

# %% [markdown]
# ## Exercise 1 (derive): from states to log-sum-exps
#
# Write $\ell_A = m_A + \log d_A$, so $d_A = e^{\ell_A - m_A}$, and the same for $B$. By (2.2),
#
# $$d = d_A e^{m_A - m} + d_B e^{m_B - m} = e^{\ell_A - m} + e^{\ell_B - m},
# \qquad \ell = m + \log d = \log\big(e^{\ell_A} + e^{\ell_B}\big).$$
#
# Evaluated as written this overflows; factoring out any constant $M$ gives
# $\ell = M + \log(e^{\ell_A - M} + e^{\ell_B - M})$, and $M = \max(\ell_A, \ell_B)$ keeps both
# exponents $\le 0$ with one of them exactly 0: that is (2.3).
#
# **Identity.** Merging $(m_B, d_B) = (-\infty, 0)$ into $(m_A, d_A)$ gives
# $m = \max(m_A, -\infty) = m_A$ and $d = d_A e^{0} + 0 \cdot e^{-\infty - m_A} = d_A$ (with the
# stand-in maximum when $m_A = -\infty$ too). Its log-sum-exp is $\ell = -\infty + \log 0 =
# -\infty$: the log of an empty sum, and $e^{\ell_B} = 0$ adds nothing in (2.3).
#
# **The gradient sums to zero.** Summing (2.4) over $j$:
# $\sum_j dx_j = \sum_j y_j g_j - \langle g, y\rangle \sum_j y_j = \langle g, y\rangle -
# \langle g, y\rangle = 0$, since $\sum_j y_j = 1$. It must: adding the same $c$ to every score
# leaves $y$ unchanged (property 2 of section 1.1), so the loss does not change along the
# direction $(1, \dots, 1)$, and the directional derivative $\sum_j \partial L / \partial x_j$
# is 0.

# %% [markdown]
# ## Exercise 2 (implement): the merge
#
# Equation (2.2), with the stand-in maximum 0 where both states are empty, so that
# $e^{-\infty - 0} = 0$ instead of $e^{-\infty - (-\infty)} = $ `nan`.

# %%
def merge(m_a: torch.Tensor, d_a: torch.Tensor, m_b: torch.Tensor,
          d_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The state (m, d) of A united with B, equation (2.2); (-inf, 0) is the empty state."""
    m = torch.maximum(m_a, m_b)
    m_safe = torch.where(m == -float("inf"), torch.zeros_like(m), m)
    return m, d_a * torch.exp(m_a - m_safe) + d_b * torch.exp(m_b - m_safe)


print(check("02.merge", merge))

# %% [markdown]
# ## Exercise 3 (implement): the log-sum-exp merge
#
# Equation (2.3) with the same stand-in for two empty sets.

# %%
def merge_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """log(e^lse_a + e^lse_b) without overflow, equation (2.3); -inf when both are -inf."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(m == -float("inf"), torch.zeros_like(m), m)
    return m_safe + torch.log(torch.exp(lse_a - m_safe) + torch.exp(lse_b - m_safe))


print(check("02.merge_lse", merge_lse))
print("agrees with torch.logaddexp on [1000, -inf] and [999, -inf]:",
      torch.equal(merge_lse(torch.tensor([1000.0, -math.inf]), torch.tensor([999.0, -math.inf])),
                  torch.logaddexp(torch.tensor([1000.0, -math.inf]), torch.tensor([999.0, -math.inf]))))

# %% [markdown]
# ## Exercise 4 (implement): softmax backward
#
# Equation (2.4): one dot product per row (`keepdim=True` keeps it broadcastable against the
# row), then an elementwise expression.

# %%
def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - <dy, y>) with the dot product over the last dim, equation (2.4)."""
    return y * (dy - (dy * y).sum(dim=-1, keepdim=True))


print(check("02.softmax_backward", softmax_backward))
y = torch.softmax(torch.randn(4, 9, dtype=torch.float64), -1)
print("rows of dx sum to zero (exercise 1):",
      bool(softmax_backward(y, torch.randn(4, 9, dtype=torch.float64)).sum(-1).abs().max() < 1e-15))

# %% [markdown]
# ## Exercise 5 (measure): how often does the maximum move?
#
# The chapter's `online_normalizer` (copied here) returns the state after every step; a
# rescaling happened at step $j \ge 2$ when $m_j > m_{j-1}$. In a random permutation, step $j$
# holds a new maximum with probability $1/j$, so the expected count is
# $\sum_{j=2}^{V} 1/j = H_V - 1$.

# %%
def online_normalizer(x: list[float]) -> tuple[float, float, list[tuple[float, float]]]:
    """Equation (2.1) element by element; returns (m, d) and the states after each step."""
    m, d, trace = -math.inf, 0.0, []
    for value in x:
        m_new = max(m, value)
        d = d * math.exp(m - m_new) + math.exp(value - m_new)
        m = m_new
        trace.append((m, d))
    return m, d, trace


def rescalings(row: list[float]) -> int:
    """Steps j >= 2 of (2.1) at which the running maximum grew."""
    maxima = [m for m, _ in online_normalizer(row)[2]]
    return sum(later > earlier for earlier, later in zip(maxima, maxima[1:]))


rng = random.Random(0)
print(f"{'V':>6s} {'ascending':>10s} {'descending':>11s} {'random (mean of 20)':>20s} {'H_V - 1':>8s}")
for v in (10, 100, 1000, 10000):
    row = [rng.gauss(0, 1) for _ in range(v)]
    shuffled = [rescalings(rng.sample(row, v)) for _ in range(20)]
    harmonic = sum(1 / j for j in range(2, v + 1))
    print(f"{v:6d} {rescalings(sorted(row)):10d} {rescalings(sorted(row, reverse=True)):11d} "
          f"{sum(shuffled) / 20:20.2f} {harmonic:8.2f}")
