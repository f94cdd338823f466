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
# # Chapter 6. LLaMA 3 and 4D parallelism: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 6. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's references (`lrn_lib.llama`, `lrn_lib.pipeline_parallel`) and prints
# one line. Everything here runs in a few seconds on a CPU; no process group is needed.

# %%
from fractions import Fraction

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.llama import apply_rope, rope_cos_sin
from lrn_lib.pipeline_parallel import bubble_formula, gpipe_schedule, one_f_one_b_schedule, peak_in_flight

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

# %% [markdown]
# ## Exercise 3 (implement): cross-entropy from vocabulary shards
#
# Each "rank" computes three numbers per token from its own slice: its maximum; then, after
# the global maximum $m$ is known (the first all-reduce, a MAX), its sum of $e^{z_v - m}$ and
# its target logit $z_y - m$, 0 when $y$ lies outside $[s_r, e_r)$ (the second all-reduce, a
# SUM of both). The loss (6.14) is $\log\sum - (z_y - m)$. A shard whose logits all lie far
# below $m$ contributes sums that underflow to 0, which is harmless; with each rank's own
# maximum instead of $m$ the sums would live on different scales and could not be added.

# %%
def sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(6.14) from vocabulary shards (N, V_r), consecutive from id 0; targets (N,) -> losses (N,)."""
    m = torch.stack([z.amax(dim=-1) for z in shards]).amax(dim=0)                   # all-reduce MAX
    total, target = torch.zeros_like(m), torch.zeros_like(m)
    start = 0
    for z in shards:                                                                # all-reduce SUM
        total = total + torch.exp(z - m[:, None]).sum(dim=-1)
        local = targets - start
        mine = (local >= 0) & (local < z.shape[-1])
        picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0] - m
        target = target + torch.where(mine, picked, torch.zeros_like(picked))
        start += z.shape[-1]
    return torch.log(total) - target                                                # (6.14)


print(check("06.sharded_cross_entropy", sharded_cross_entropy))

# %% [markdown]
# ## Exercise 4 (measure): the bubble of any schedule
#
# (a) The simulation repeats a sweep over the stages until every action has run: a stage
# runs its next action as soon as the action's inputs exist (F on stage $s-1$; or its own F
# and B on stage $s+1$), starting at the later of those inputs' ends and its own clock. Times
# are `Fraction`s, so the bubble (6.23) comes out exact. A sweep that runs nothing means a
# deadlock.

# %%
def schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) -> float:
    """(6.23) of a schedule (one action list per stage) with instant messages."""
    p = len(schedule)
    duration = {"F": Fraction(forward_time), "B": Fraction(backward_time)}
    end: dict[tuple[str, int, int], Fraction] = {}
    clock, nxt = [Fraction(0)] * p, [0] * p
    while any(nxt[s] < len(schedule[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while nxt[s] < len(schedule[s]):
                kind, i = schedule[s][nxt[s]]
                if kind == "F":
                    needs = [("F", s - 1, i)] if s > 0 else []
                else:
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
                if any(n not in end for n in needs):
                    break
                clock[s] = max([clock[s]] + [end[n] for n in needs]) + duration[kind]
                end[(kind, s, i)] = clock[s]
                nxt[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("the schedule deadlocks")
    busy = sum(duration[kind] for actions in schedule for kind, _ in actions)
    return float(1 - busy / (p * max(end.values())))


print(check("06.schedule_bubble", schedule_bubble))

# %% [markdown]
# (b) GPipe and 1F1B for $p = 4$, forward 1 and backward 2 units, next to (6.24), with the
# peak number of micro-batches stage 0 holds (its activations stay alive from its forward
# to its backward):

# %%
p = 4
rows = []
for m in (4, 8, 16, 32):
    g, o = gpipe_schedule(p, m), one_f_one_b_schedule(p, m)
    rows.append((m, schedule_bubble(g, 1, 2), schedule_bubble(o, 1, 2), float(bubble_formula(p, m)),
                 peak_in_flight(g)[0], peak_in_flight(o)[0]))
print(" m | GPipe bubble | 1F1B bubble | (6.24) | stage 0 holds: GPipe, 1F1B")
for m, bg, bo, formula, hg, ho in rows:
    print(f"{m:2d} | {bg:12.4f} | {bo:11.4f} | {formula:6.4f} | {hg:2d}, {ho}")

reversed_first = gpipe_schedule(p, 8)
reversed_first[0] = [("F", i) for i in reversed(range(8))] + [("B", i) for i in range(8)]
b_rev = schedule_bubble(reversed_first, 1, 2)
print(f"GPipe, m = 8, stage 0's forwards reversed: bubble {b_rev:.4f} (in order: {rows[1][1]:.4f})")

# %%
print("both schedules follow (6.24) exactly:", all(bg == bo == formula for _, bg, bo, formula, _, _ in rows))
print("stage 0 holds m micro-batches under GPipe and p under 1F1B:",
      all(hg == m and ho == p for m, _, _, _, hg, ho in rows))
print("the reversed order makes the step longer:", b_rev > rows[1][1])

# %% [markdown]
# The bubble falls as $(p-1)/(m+p-1)$ for both schedules: 3/7 at $m = 4$, under a tenth at
# $m = 32$. What 1F1B buys is memory: stage 0 holds at most $p = 4$ micro-batches' activations
# instead of all $m$, so $m$ can grow (and the bubble shrink) at a fixed activation budget.
# Reversing stage 0's forwards delays F0, which every later stage needs first, by $m - 1$
# units: the whole pipeline starts late and the makespan grows from $3(m + p - 1) = 33$ to 40
# units, so the bubble rises from 0.27 to 0.4. The order within a schedule matters as much
# as its shape.
