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
# # Chapter 1. Softmax: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 1. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's float64 references and prints one line.

# %%
import math

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.softmax import safe_softmax

config.seed_everything(0)
print("\n".join(exercises("01")))

# %% [markdown]
# ## Exercise 1 (derive): how large can the denominator be?
#
# Every term of $d = \sum_j e^{x_j - m}$ satisfies $0 < e^{x_j - m} \le 1$, because
# $x_j \le m$; so $d \le V$. The term of the maximizing index $k$ is exactly $e^0 = 1$ and the
# others are positive, so $d \ge 1$. Both bounds are tight: $d = 1$ when one score is the
# maximum and all others are $-\infty$ (or, in the limit, far below it), and $d = V$ when all
# scores are equal.
#
# By (1.3), $\mathrm{LSE}(x) = m + \log d$, and $\log$ is increasing, so
# $m + \log 1 \le \mathrm{LSE}(x) \le m + \log V$, that is
# $m \le \mathrm{LSE}(x) \le m + \log V$: log-sum-exp is the maximum, overestimated by at most
# $\log V$.
#
# For the gradient, differentiate $\log \sum_j e^{x_j}$ with the chain rule:
#
# $$\frac{\partial\,\mathrm{LSE}(x)}{\partial x_i} = \frac{1}{\sum_j e^{x_j}} \cdot e^{x_i}
#   = \mathrm{softmax}(x)_i.$$
#
# So LSE is a smooth stand-in for the maximum (within $\log V$ of it), and its gradient
# spreads the "credit" for the maximum over the entries by the softmax. Both facts are
# checked numerically below: the bounds on random rows, the gradient with autograd.

# %%
x = torch.randn(1000, 50, dtype=torch.float64) * 10
lse, m = torch.logsumexp(x, -1), x.amax(-1)
print("m <= LSE <= m + log V on 1000 random rows:",
      bool(((m <= lse) & (lse <= m + math.log(50) + 1e-12)).all()))
print("d = V for equal scores:", round(torch.logsumexp(torch.zeros(50, dtype=torch.float64), 0).exp().item(), 6))
x1 = torch.randn(7, dtype=torch.float64, requires_grad=True)
(grad,) = torch.autograd.grad(torch.logsumexp(x1, 0), x1)
print("gradient of LSE equals the softmax:", torch.allclose(grad, torch.softmax(x1, 0), atol=1e-15))

# %% [markdown]
# ## Exercise 2 (implement): a safe log-sum-exp
#
# Subtract the row maximum, sum, take the log, and add the maximum back (1.3). A row of only
# `-inf` has $m = -\infty$, and $x - m$ would be $-\infty - (-\infty) = $ `nan`; subtracting a
# stand-in 0 instead gives $\log \sum_j e^{-\infty} = \log 0 = -\infty$, the right answer for
# an empty sum.

# %%
def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x_j) over the last dim, equation (1.3); -inf for a row of only -inf."""
    m = x.amax(dim=-1, keepdim=True)
    m_safe = torch.where(m == -float("inf"), torch.zeros_like(m), m)
    return (m_safe + torch.log(torch.exp(x - m_safe).sum(dim=-1, keepdim=True))).squeeze(-1)


print(check("01.logsumexp", logsumexp))

# %% [markdown]
# ## Exercise 3 (implement): log-softmax
#
# $\log \mathrm{softmax}(x)_i = x_i - \mathrm{LSE}(x)$. Computed this way, a score far below
# the maximum gives a large negative but finite number, where the softmax itself would have
# rounded to 0 and its log to `-inf`.

# %%
def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax(x) over the last dim, as x - LSE(x) (1.3): finite wherever x is."""
    return x - logsumexp(x).unsqueeze(-1)


print(check("01.log_softmax", log_softmax))
print("log_softmax([1000, 0]) =", log_softmax(torch.tensor([1000.0, 0.0], dtype=torch.float64)).tolist(),
      "| log(safe_softmax) gives", torch.log(safe_softmax(torch.tensor([1000.0, 0.0], dtype=torch.float64))).tolist())

# %% [markdown]
# ## Exercise 4 (implement): temperature
#
# Divide first, then apply the safe softmax: the maximum that is subtracted must be that of
# $x / T$, since for $T = 10^{-3}$ the scores $x / T$ are a thousand times larger than $x$.

# %%
def temperature_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / T) over the last dim, with the maximum of x / T subtracted first (1.2)."""
    z = x / temperature
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    return e / e.sum(dim=-1, keepdim=True)


print(check("01.temperature", temperature_softmax))

# %% [markdown]
# As $T \to 0$ every score below the maximum gets weight $e^{(x_i - m)/T} \to 0$, while the
# tied maxima each keep $e^0 = 1$: the probability is split evenly among the ties, one half
# each for two of them.

# %%
tied = torch.tensor([2.0, 5.0, 5.0, 1.0], dtype=torch.float64)
for temperature in (1.0, 0.1, 0.001):
    print(f"T = {temperature:5}:", [round(p, 4) for p in temperature_softmax(tied, temperature).tolist()])

# %% [markdown]
# ## Exercise 5 (measure): where the naive softmax breaks
#
# The same naive function as section 1.2, run on $[c, 0]$ for increasing integers $c$ until
# the output contains `nan`.

# %%
def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax by equation (1.1), as written (overflows)."""
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


for dtype in (torch.float16, torch.bfloat16, torch.float32):
    c = next(c for c in range(1000) if naive_softmax(torch.tensor([c, 0.0], dtype=dtype)).isnan().any())
    threshold = math.log(torch.finfo(dtype).max)
    safe_ok = all(not safe_softmax(torch.tensor([c, 0.0], dtype=dtype)).isnan().any() for c in range(1000))
    print(f"{str(dtype):15s} first nan at c = {c:3d}; overflow threshold {threshold:.2f}; "
          f"c is the first integer above it: {c == math.floor(threshold) + 1}; safe softmax never nan: {safe_ok}")
