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
# # Chapter 4. FlashAttention-2: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 4. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's float64 references and prints one line.

# %%
import math

import torch

from lrn_lib import config
from lrn_lib.attention import attention_reference, flash_attention_blocks
from lrn_lib.exercises import check, exercises

config.seed_everything(0)
print("\n".join(exercises("04")))

# %% [markdown]
# ## Exercise 1 (derive): deferred normalization is exact
#
# The update for block $t$ with scores $S_j$ and values $V_j$ ($j$ in block $t$) is
#
# $$m^{(t)} = \max\big(m^{(t-1)}, \max_{j \in t} S_j\big), \quad
#   \ell^{(t)} = e^{m^{(t-1)} - m^{(t)}} \ell^{(t-1)} + \sum_{j \in t} e^{S_j - m^{(t)}}, \quad
#   \tilde o^{(t)} = e^{m^{(t-1)} - m^{(t)}} \tilde o^{(t-1)} + \sum_{j \in t} e^{S_j - m^{(t)}} V_j.$$
#
# *Base*, $t = 0$: $m^{(0)} = -\infty$ is the maximum of no scores and $\ell^{(0)} = 0$,
# $\tilde o^{(0)} = 0$ are empty sums, so the claim holds.
# *Step*: if the claim holds after block $t - 1$, then $m^{(t)}$ is the maximum over blocks up to
# $t$, and
#
# $$\ell^{(t)} = e^{m^{(t-1)} - m^{(t)}} \sum_{j < t} e^{S_j - m^{(t-1)}} + \sum_{j \in t} e^{S_j - m^{(t)}}
#   = \sum_{j \le t} e^{S_j - m^{(t)}},$$
#
# and the same computation with $V_j$ in every term gives $\tilde o^{(t)}$. This is the merge
# (2.2) of chapter 2, applied to $\ell$ and, term by term, to $\tilde o$. After the last block,
#
# $$\frac{\tilde o^{(T)}}{\ell^{(T)}} = \frac{\sum_j e^{S_j - m} V_j}{\sum_j e^{S_j - m}}
#   = \sum_j \mathrm{softmax}(S)_j V_j = (PV)_i = O_i,$$
#
# with $m = m^{(T)}$ cancelling, and $m + \log \ell^{(T)} = \log \sum_j e^{S_j} = L_i$ by (1.3).
# Nothing was ever normalized early, so no division is repeated: that is change 2.
#
# For $D_i$: with $O_i = \sum_j P_{ij} V_j$ and $dP_{ij} = dO_i \cdot V_j$,
#
# $$\mathrm{rowsum}(dO_i \odot O_i) = dO_i \cdot \sum_j P_{ij} V_j = \sum_j P_{ij}\,(dO_i \cdot V_j)
#   = \sum_j P_{ij}\, dP_{ij} = \mathrm{rowsum}(dP_i \odot P_i).$$
#
# The left side needs one length-$d$ dot product per query; the right side would need the
# whole row of $P$. Both identities, checked numerically:

# %%
s = torch.randn(5, 40, dtype=torch.float64) * 3
v = torch.randn(40, 8, dtype=torch.float64)
acc, ell, m = torch.zeros(5, 8, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), \
    torch.full((5,), -math.inf, dtype=torch.float64)
for start in range(0, 40, 16):
    block = s[:, start:start + 16]
    m_new = torch.maximum(m, block.amax(-1))
    p = torch.exp(block - m_new[:, None])
    ell = torch.exp(m - m_new) * ell + p.sum(-1)
    acc = torch.exp(m - m_new)[:, None] * acc + p @ v[start:start + 16]
    m = m_new
print("acc / l equals softmax(S) V:", torch.allclose(acc / ell[:, None], torch.softmax(s, -1) @ v, atol=1e-13))
print("m + log l equals L:", torch.allclose(m + torch.log(ell), torch.logsumexp(s, -1), atol=1e-13))
d_o = torch.randn(5, 8, dtype=torch.float64)
p_full = torch.softmax(s, -1)
print("rowsum(dO * O) equals rowsum(dP * P):",
      torch.allclose((d_o * (p_full @ v)).sum(-1), ((d_o @ v.T) * p_full).sum(-1), atol=1e-13))

# %% [markdown]
# ## Exercise 2 (implement): one FlashAttention-2 step
#
# The update above, with the stand-in maximum of chapter 2: where a row's scores so far are all
# masked, `m_new` is `-inf`, and exponentiating against 0 instead gives $e^{-\infty} = 0$
# everywhere, so the row stays $(0, 0, -\infty)$ rather than turning into `nan`.

# %%
def block_update(acc: torch.Tensor, l: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge one block of scaled, masked scores s (B_r, B_c) and values v (B_c, d) into the
    unnormalized state (acc, l, m) of a query block; returns the new state."""
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    alpha = torch.exp(m - m_safe)                 # e^(m - m_new): rescales what was summed before
    return alpha[:, None] * acc + p @ v, alpha * l + p.sum(dim=-1), m_new


print(check("04.block_update", block_update))

# %% [markdown]
# ## Exercise 3 (implement): causal attention with $N_q \ne N_k$
#
# The bottom-right mask keeps key $j$ for query $i$ when $j \le i + (N_k - N_q)$. A query that
# sees no key has an all-`-inf` row of scores; its softmax would be `nan`, so those rows are
# set to 0 explicitly, as section 4.1 defines.

# %%
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for one head with a bottom-right causal mask; 0 for queries with no key."""
    n_q, n_k = q.shape[0], k.shape[0]
    s = q @ k.T / math.sqrt(q.shape[-1])
    visible = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    s = s.masked_fill(~visible, -math.inf)
    sees_a_key = visible.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(sees_a_key, s, torch.zeros_like(s)), dim=-1) * sees_a_key
    return p @ v


print(check("04.causal_attention", causal_attention))

# %% [markdown]
# ## Exercise 4 (measure): does blocking cost accuracy?
#
# The errors of $O$ and $L$ against float64, for the library's block version at four block
# sizes and for the unblocked float32 reference. The printed errors depend on the machine's
# floating-point library, so they are not compared; the claim after them is.

# %%
# NBVAL_IGNORE_OUTPUT
q = torch.randn(1, 2, 200, 64)
k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
o64, lse64 = attention_reference(q.double(), k.double(), v.double(), causal=True)


def errors(o: torch.Tensor, lse: torch.Tensor) -> tuple[float, float]:
    """Max |error| of O and of L against the float64 reference."""
    return (o.double() - o64).abs().max().item(), (lse.double() - lse64).abs().max().item()


measured = {f"blocks, block_n = {b}": errors(*flash_attention_blocks(q, k, v, causal=True, block_n=b))
            for b in (1, 7, 64, 256)}
measured["reference, float32"] = errors(*attention_reference(q, k, v, causal=True))
for name, (error_o, error_lse) in measured.items():
    print(f"{name:22s} max error of O {error_o:.1e}, of L {error_lse:.1e}")

# %%
unblocked_o = measured["reference, float32"][0]
print("every blocking is within float32 rounding (O error < 1e-5, L error < 1e-5):",
      all(e_o < 1e-5 and e_l < 1e-5 for e_o, e_l in measured.values()))
print("no blocking is more than 10x worse than unblocked float32 attention:",
      all(e_o <= 10 * unblocked_o for e_o, _ in measured.values()))
