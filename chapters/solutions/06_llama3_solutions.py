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
# # Chapter 6. The Llama 3 model: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 6. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's reference (`lrn_lib.llama`) and prints one line. Everything here
# runs in a few seconds on a CPU.

# %%
import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.llama import apply_rope, rope_cos_sin

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("06")))

# %% [markdown]
# ## Exercise 1 (derive): RoPE sees only distances
#
# **One pair.** By (6.5) the pair $(x_i, x_{i+d_h/2}) = (a, b)$ at position $m$ becomes
# $(a\cos\phi - b\sin\phi,\ b\cos\phi + a\sin\phi)$ with $\phi = m\omega_i$, that is
#
# $$\begin{pmatrix} a' \\ b' \end{pmatrix} = R(\phi)\begin{pmatrix} a \\ b \end{pmatrix}, \qquad
# R(\phi) = \begin{pmatrix} \cos\phi & -\sin\phi \\ \sin\phi & \cos\phi \end{pmatrix}.$$
#
# **Rotations compose.** $R(a)^\top = R(-a)$ (the transpose flips the sign of the sines), and
# the angle-addition formulas give $R(-a)R(b) = R(b - a)$:
# $\cos a\cos b + \sin a \sin b = \cos(b-a)$ and $\cos a \sin b - \sin a\cos b = \sin(b-a)$.
#
# **The score.** The dot product of two $d_h$-vectors is the sum over the $d_h/2$ pairs of
# the dot products of the pairs. For pair $i$ of a query at $m$ and a key at $n$,
#
# $$\big(R(m\omega_i) q_i\big)^\top \big(R(n\omega_i) k_i\big) = q_i^\top R(m\omega_i)^\top R(n\omega_i) k_i
#   = q_i^\top R\big((n - m)\omega_i\big) k_i,$$
#
# which depends on $m$ and $n$ only through $n - m$; so does the sum over $i$.
#
# **Meta's layout.** Meta rotates the adjacent pairs $(2i, 2i+1)$ by $m\omega_i$. Let
# $\pi = (0, 2, 4, \dots, d_h - 2,\ 1, 3, \dots, d_h - 1)$ and $(Px)_j = x_{\pi(j)}$. Then
# $(Px)_i = x_{2i}$ and $(Px)_{i + d_h/2} = x_{2i+1}$: $P$ moves Meta's pair $i$ to the
# rotate-half pair $i$, with the same frequency, so
# $\mathrm{RoPE}_{half}(Px) = P\,\mathrm{RoPE}_{Meta}(x)$. Permuting the rows of $W_q$ and
# $W_k$ by $\pi$ (per head) replaces $q, k$ by $Pq, Pk$, and since $P$ is orthogonal,
#
# $$\mathrm{RoPE}_{half}(Pq)_m^\top \mathrm{RoPE}_{half}(Pk)_n = \mathrm{RoPE}_{Meta}(q)_m^\top P^\top P\,
#   \mathrm{RoPE}_{Meta}(k)_n = \mathrm{RoPE}_{Meta}(q)_m^\top \mathrm{RoPE}_{Meta}(k)_n .$$
#
# Every score, hence every attention weight, is unchanged. $W_v$ must not be permuted: the
# values are not rotated, and the attention output $\sum_n p_{mn} v_n$ is read by $W_o$,
# whose columns expect the original order of $v$'s coordinates; permuting $W_v$ alone would
# scramble the input of $W_o$. The checks, in float64:

# %%
d, theta = 8, 10000.0
omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def rope_half(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The library's rotate-half RoPE (6.5) of x (..., T, d) at the given positions."""
    cos, sin = rope_cos_sin(positions, omega, torch.float64)
    return apply_rope(x, cos, sin)


def rope_meta(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Meta's layout: rotate the adjacent pairs (2i, 2i+1) by positions * omega_i."""
    angles = positions.double()[:, None] * omega[None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()
    return out


q, k = torch.randn(2, 1, d, dtype=torch.float64).unbind(0)
scores = [(rope_half(q, torch.tensor([m])) * rope_half(k, torch.tensor([m + 3]))).sum().item()
          for m in (0, 7, 1000)]
print("score at distance 3 from positions 0, 7 and 1000:", [round(s, 10) for s in scores])
print("the score depends only on the distance:", max(scores) - min(scores) < 1e-9)

perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])          # pi
x = torch.randn(5, d, dtype=torch.float64)
positions = torch.tensor([0, 1, 2, 40, 41])
print("RoPE_half(P x) == P RoPE_Meta(x):", torch.allclose(rope_half(x[:, perm], positions),
                                                         rope_meta(x, positions)[:, perm], atol=1e-12))
qs, ks = torch.randn(2, 5, d, dtype=torch.float64).unbind(0)
s_meta = rope_meta(qs, positions) @ rope_meta(ks, positions).T
s_half = rope_half(qs[:, perm], positions) @ rope_half(ks[:, perm], positions).T
print("permuted W_q, W_k give the same scores in the rotate-half layout:", torch.allclose(s_meta, s_half, atol=1e-12))

# %% [markdown]
# ## Exercise 2 (implement): RMSNorm and RoPE
#
# (a) RMSNorm (6.2) divides each vector by its root mean square, with $\epsilon$ inside the
# square root (so a zero vector stays 0), and multiplies by the gain. There is no mean
# subtraction: that is what distinguishes it from LayerNorm.

# %%
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(6.2) over the last dimension: x (..., d), weight (d,) -> (..., d)."""
    return weight * x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


print(check("06.rms_norm", rms_norm))

# %% [markdown]
# (b) The angles $m\,\omega_i$ are formed in float64 (at position $10^5$ a float32 angle is
# off by about $10^{-2}$ radian), one per token and pair; coordinate $i$ and $i + d_h/2$ share
# pair $i$'s angle, and the two halves of the output are $x_1\cos - x_2\sin$ and
# $x_2\cos + x_1\sin$, which is (6.5) written out.

# %%
def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """(6.4), (6.5) in the rotate-half layout: x (B, H, T, d_h), positions (T,) -> (B, H, T, d_h)."""
    d = x.shape[-1]
    omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)              # (6.4)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]                  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)             # (6.5)


print(check("06.rope", rope))
