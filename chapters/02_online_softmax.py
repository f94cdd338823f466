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
# # Chapter 2. Online softmax
#
# Chapter 1 ended with rows too long to hold on chip, for which the safe softmax streams
# the row from memory three times: once for the maximum, once for the sum of exponentials,
# once to write the output. This chapter removes one of those passes with the *online
# normalizer* of Milakov and Gimelshein (2018, "Online normalizer calculation for
# softmax", arXiv:1805.02867), and then finds the idea underneath it: the pair
# (running maximum, rescaled running sum) is a small *state* with an associative merge.
# That merge is what lets FlashAttention (chapter 4) split a row across blocks, ring
# attention (chapter 8) split it across devices, and flash-decoding (chapter 6) split it
# across programs, and it is written once, here, in `lrn_lib.online_softmax`. The chapter ends
# with softmax's backward pass.

# %%
import math
import random

import matplotlib.pyplot as plt
import torch

import kernels
from lrn_lib import config
from lrn_lib.softmax import safe_softmax

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter()

# %% [markdown]
# ## 2.1 Why three passes are too many
#
# The safe softmax (equation 1.2) needs the row maximum $m$ before it can exponentiate
# anything, and the sum $d = \sum_j e^{x_j - m}$ before it can write anything:
#
# 1. $m = \max_j x_j$ (read $x$);
# 2. $d = \sum_j e^{x_j - m}$ (read $x$);
# 3. $y_i = e^{x_i - m} / d$ (read $x$, write $y$).
#
# When a row fits on chip, passes 2 and 3 reread registers and cost nothing (chapter 1's
# fused kernel). When it does not, each pass is a trip to memory: 3 reads and 1 write per
# element. The output pass cannot be merged away, since every $y_i$ depends on the whole
# row through $d$. But the first two passes can be fused into one.
#
# ## 2.2 The online normalizer
#
# Process the row left to right, keeping the maximum so far $m_j$ and the sum of
# exponentials *relative to that maximum* $d_j$:
#
# $$m_j = \max(m_{j-1}, x_j), \qquad d_j = d_{j-1}\, e^{m_{j-1} - m_j} + e^{x_j - m_j},
# \qquad m_0 = -\infty,\ d_0 = 0 \qquad (2.1)$$
#
# When a new maximum arrives, everything summed so far was measured against the old,
# smaller maximum, so it is rescaled by $e^{m_{j-1} - m_j} \le 1$. This is Algorithm 3 of
# the paper. **Claim:** after $j$ steps, $d_j = \sum_{k \le j} e^{x_k - m_j}$.
#
# *Proof*, by induction on $j$. For $j = 1$: $m_1 = x_1$ and $d_1 = 0 + e^{0} = 1$. If the
# claim holds for $j - 1$, then
#
# $$d_j = \Big(\sum_{k < j} e^{x_k - m_{j-1}}\Big) e^{m_{j-1} - m_j} + e^{x_j - m_j}
#       = \sum_{k < j} e^{x_k - m_j} + e^{x_j - m_j} = \sum_{k \le j} e^{x_k - m_j}.$$
#
# At $j = V$, $m_V$ is the row maximum and $d_V$ is exactly the safe softmax's denominator,
# so $y_i = e^{x_i - m_V} / d_V$ is the same function, with every exponent still $\le 0$.
# Two passes remain: the state in one, the output in the other. Here is (2.1) as a plain
# loop over a short row, next to the safe softmax's $m$ and $d$.

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


row = [3.0, 1.0, 7.0, 2.0, 7.5, -1.0, 4.0, 9.0, 0.5, 8.0]
m, d, trace = online_normalizer(row)
x = torch.tensor(row, dtype=torch.float64)
print(f"online: m = {m}, d = {d:.6f}")
print(f"safe:   m = {x.max().item()}, d = {torch.exp(x - x.max()).sum().item():.6f}")
y = torch.exp(x - m) / d
print("softmax matches the safe softmax:", torch.allclose(y, safe_softmax(x), rtol=0, atol=1e-15))

# %% [markdown]
# At a new maximum the running sum is first rescaled by $e^{m_{j-1} - m_j} < 1$ and then
# gains exactly 1, the new maximum's own term $e^0$. So it falls only when the maximum
# jumps far enough, by more than $\ln\big(d_{j-1} / (d_{j-1} - 1)\big)$, and otherwise
# rises, as at $x = 7.5$ below, a jump of only 0.5. Without a new maximum it grows by
# $e^{x_j - m_j} \le 1$.

# %%
for j in range(1, len(row)):
    (m_old, d_old), (m_new, d_new) = trace[j - 1], trace[j]
    if m_new > m_old:
        print(f"new max at x = {row[j]}: jump {m_new - m_old:.1f}, d {d_old:.3f} -> {d_new:.3f} "
              f"({'falls' if d_new < d_old else 'rises'})")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 2.8))
steps = range(1, len(row) + 1)
ax1.plot(steps, row, "o:", color="gray", label="$x_j$")
ax1.step(steps, [s[0] for s in trace], where="post", label="running max $m_j$")
ax1.set_xlabel("j")
ax1.legend()
ax2.step(steps, [s[1] for s in trace], where="post", color="C2")
ax2.set_xlabel("j")
ax2.set_title("running sum $d_j$, rescaled at each new max", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2.3 The state and its merge
#
# Equation (2.1) absorbs one element at a time, but nothing forces that. Call
# $s = (m, d)$ the *state* of any set $A$ of scores, with $m = \max_{k \in A} x_k$ and
# $d = \sum_{k \in A} e^{x_k - m}$. The state of a union $A \cup B$ follows from the two
# states alone:
#
# $$m = \max(m_A, m_B), \qquad d = d_A\, e^{m_A - m} + d_B\, e^{m_B - m} \qquad (2.2)$$
#
# since $d_A e^{m_A - m} = \sum_{k \in A} e^{x_k - m}$, and the same for $B$. Equation
# (2.1) is (2.2) with $B$ a single element, whose state is $(x_j, 1)$.
#
# The merge $\oplus$ of (2.2) is **commutative** (the formula is symmetric) and
# **associative**: both $(s_A \oplus s_B) \oplus s_C$ and $s_A \oplus (s_B \oplus s_C)$
# equal the state of $A \cup B \cup C$, because each side is the state of the union of its
# parts. The empty set has the state $(-\infty, 0)$, the identity. So a row can be cut into
# pieces of any sizes, the pieces handled by different loop iterations, programs or
# devices, and their states combined in any order and any grouping: a reduction, just
# like a sum. This is the one piece of this chapter the rest of the book keeps reusing.
#
# **Two details.** First, if both states are empty, (2.2) computes
# $e^{-\infty - (-\infty)}$, which is `nan`; we subtract a stand-in 0 instead of an
# infinite maximum, which gives the right answer $(-\infty, 0)$. Second, the state can
# also be kept as one number, the log-sum-exp $\ell = m + \log d$ (equation 1.3). Then the
# merge is
#
# $$\ell_{A \cup B} = \max(\ell_A, \ell_B) + \log\!\big(e^{\ell_A - \max} + e^{\ell_B - \max}\big)
# \qquad (2.3)$$
#
# which is the form FlashAttention-2 saves for its backward pass (chapter 4) and ring
# attention passes between devices (chapter 8). With $\ell$ the softmax is simply
# $y_i = e^{x_i - \ell}$.

# %%
#| export lrn_lib.online_softmax
from typing import NamedTuple

import torch

from lrn_lib import validate
from lrn_lib.softmax import check_softmax_input, safe_softmax


class SoftmaxState(NamedTuple):
    """The online-softmax state of a set of scores: ``m`` = their maximum, ``d`` = sum exp(x - m).

    m, d: tensors of one shape (one entry per row); the empty set is (-inf, 0).
    """

    m: torch.Tensor
    d: torch.Tensor


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """m with -inf replaced by 0, the stand-in maximum of an empty state."""
    return torch.where(m == -float("inf"), torch.zeros_like(m), m)


def check_state(state: SoftmaxState, name: str = "state") -> SoftmaxState:
    """Raise a clear error unless ``state`` is a SoftmaxState of two floating tensors of one shape."""
    if not isinstance(state, SoftmaxState):
        raise TypeError(f"{name} must be a SoftmaxState, got {type(state).__name__}")
    validate.tensor(state.m, f"{name}.m", kind="float")
    validate.tensor(state.d, f"{name}.d", kind="float")
    validate.same_shape(**{f"{name}.m": state.m, f"{name}.d": state.d})
    return state


def softmax_state(x: torch.Tensor, dim: int = -1) -> SoftmaxState:
    """The state (m, d) of the scores of ``x`` along ``dim``, in float32 (float64 stays float64).

    x: any shape, floating. Returns m and d of x's shape without ``dim``.
    """
    dim = check_softmax_input(x, dim)
    z = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    m = z.amax(dim=dim)
    d = torch.exp(z - _finite_or_zero(m).unsqueeze(dim)).sum(dim=dim)
    return SoftmaxState(m, d)


def merge_states(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state of the union of two disjoint sets of scores, equation (2.2).

    a, b: states of the same shape. Commutative and associative; (-inf, 0) is the identity.
    """
    check_state(a, "a")
    check_state(b, "b")
    validate.same_shape(**{"a.m": a.m, "b.m": b.m})          # states never broadcast
    m = torch.maximum(a.m, b.m)
    m_safe = _finite_or_zero(m)
    return SoftmaxState(m, a.d * torch.exp(a.m - m_safe) + b.d * torch.exp(b.m - m_safe))


def state_lse(state: SoftmaxState) -> torch.Tensor:
    """The log-sum-exp of a state, m + log d (equation 1.3); -inf for the empty state."""
    check_state(state)
    return state.m + torch.log(state.d)


def merge_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of the union of two disjoint sets of scores, equation (2.3).

    lse_a, lse_b: tensors of one shape. Equal to torch.logaddexp, written out.
    """
    validate.tensor(lse_a, "lse_a", kind="float")
    validate.tensor(lse_b, "lse_b", kind="float")
    validate.same_shape(lse_a=lse_a, lse_b=lse_b)            # no broadcasting: one entry per row
    m = torch.maximum(lse_a, lse_b)
    m_safe = _finite_or_zero(m)
    return m_safe + torch.log(torch.exp(lse_a - m_safe) + torch.exp(lse_b - m_safe))


def online_softmax_reference(x: torch.Tensor, dim: int = -1, block: int = 256) -> torch.Tensor:
    """Softmax by two passes over blocks of ``block`` scores: merge states (2.2), then normalize.

    x: any shape, floating. Returns x's shape and dtype. The reference for the Triton kernel.
    """
    dim = check_softmax_input(x, dim)
    validate.integer(block, "block", low=1)
    z = x.movedim(dim, -1)
    state = softmax_state(z[..., :block])
    for start in range(block, z.shape[-1], block):          # pass 1: one merged state
        state = merge_states(state, softmax_state(z[..., start:start + block]))
    y = torch.exp(z.to(state.m.dtype) - _finite_or_zero(state.m).unsqueeze(-1)) / state.d.unsqueeze(-1)
    return y.to(x.dtype).movedim(-1, dim)                  # pass 2: normalize


# %% [markdown]
# Now the properties, on fresh random rows: cut each row at random places, compute the
# pieces' states, and merge them in a random grouping and order; the result must equal the
# state of the whole row, computed in float64 by the safe softmax. Rows include `-inf`
# entries (masked scores), pieces that are entirely `-inf`, and float16 inputs.

# %%
def random_merge(states: list[SoftmaxState]) -> SoftmaxState:
    """Merge states by repeatedly combining two random neighbours (a random bracketing)."""
    states = list(states)
    random.shuffle(states)  # the merge is commutative, so the order is free too
    while len(states) > 1:
        i = random.randrange(len(states) - 1)
        states[i:i + 2] = [merge_states(states[i], states[i + 1])]
    return states[0]


random.seed(0)
worst = {"float32": 0.0, "float16": 0.0}
for trial in range(200):
    n = random.randint(1, 300)
    x = torch.randn(4, n, dtype=torch.float64) * random.choice([1, 10, 60])
    x[torch.rand(4, n) < 0.2] = -float("inf")
    x[1, : n // 2] = -float("inf")                        # a long masked stretch
    cuts = sorted(random.sample(range(1, n), k=min(n - 1, random.randint(0, 8)))) if n > 1 else []
    pieces = torch.tensor_split(x, cuts, dim=-1)
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        xd = x.to(dtype)
        state = random_merge([softmax_state(p.to(dtype)) for p in pieces])
        y = torch.exp(xd.float() - _finite_or_zero(state.m)[:, None]) / state.d[:, None]
        exact = safe_softmax(xd.double())          # float64 softmax of the rounded inputs
        finite = ~exact.isnan()
        worst[name] = max(worst[name], (y.double() - exact)[finite].abs().max().item())
print("random splits and bracketings agree with the float64 safe softmax:")
print("  float32 inputs, max error < 1e-6:", worst["float32"] < 1e-6)
print("  float16 inputs, max error < 1e-6:", worst["float16"] < 1e-6)

# %% [markdown]
# (With float16 *inputs* the state is still computed in float32, so the only error is the
# float32 arithmetic; the comparison is with the float64 softmax of the same rounded
# inputs.) The log-sum-exp form agrees too, and a row cut into a hundred blocks by
# `online_softmax_reference` matches `torch.softmax`:

# %%
a, b = torch.randn(1000, dtype=torch.float64) * 20, torch.randn(1000, dtype=torch.float64) * 20
a[:10] = -float("inf")
b[:5] = -float("inf")
print("merge_lse agrees with torch.logaddexp to 1e-13:",
      torch.allclose(merge_lse(a, b), torch.logaddexp(a, b), rtol=1e-13, atol=0))
x = torch.randn(8, 25_000) * 8
print("online_softmax_reference matches the float64 softmax to 1e-6:",
      torch.allclose(online_softmax_reference(x).double(), torch.softmax(x.double(), -1), rtol=0, atol=1e-6))

# %% [markdown]
# ## 2.4 A two-pass kernel in Triton
#
# The kernel runs one program per row and walks the row in blocks of `BLOCK` columns.
# Pass 1 keeps the running state $(m, d)$ as two float32 scalars; each block is loaded,
# its maximum found, and its exponentials merged in by (2.2): the old sum is rescaled by
# $e^{m - m_{\text{new}}}$ and the block's $\sum e^{x - m_{\text{new}}}$ added, one
# exponential per element. Pass 2 walks the row again and writes $e^{x - m} / d$.
# Compare chapter 1's `softmax_looped_kernel`: the same loop structure with one loop fewer.
#
# One detail is about the cache rather than the arithmetic. Pass 2 rereads the row that
# pass 1 has just read; if it is still in the GPU's L2 cache, the reread costs no memory
# traffic. The `eviction_policy` hints tell the hardware which lines to keep: pass 1's
# loads are marked `evict_last` (keep them), pass 2's loads and the output stores
# `evict_first` (they are never used again, so they should not push rows still waiting for
# their second pass out of the cache). On an H100 the hints and a block of 8192 columns
# made the kernel 20 to 40% faster than the plain version at 4096 x 32768, where rows can
# stay in L2 between the passes, and about 7% faster on rows of 262144 columns, which
# cannot (the sweep in `benchmarks/sweep_online_softmax.py`, its results in
# `benchmarks/results/`). The interpreter ignores the hints.

# %%
#| export kernels.online_softmax
import torch

from kernels.runtime import check_launchable, tl, triton
from kernels.softmax import as_rows, check_row_kernel_input, run_on_rows

ONLINE_BLOCK = 8192  # columns per loop step (benchmarks/sweep_online_softmax.py)


@triton.jit
def softmax_online_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    """Softmax of one row of any length in two passes: merged state (2.2), then normalize.

    x, y: (n_rows, n_cols) with unit column stride; one program per row.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):           # pass 1: the state (m, d)
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_last").to(tl.float32)  # keep the row in L2 for pass 2
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: stay (-inf, 0)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    inv_d = 1.0 / d
    for start in range(0, n_cols, BLOCK):           # pass 2: normalize and write
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_first").to(tl.float32)  # last use: free the L2 space
        tl.store(y_row + cols, (tl.exp(x - m) * inv_d).to(y_ptr.dtype.element_ty), mask=cols < n_cols,
                 eviction_policy="evict_first")


def online_softmax_triton(x: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` with the two-pass online kernel (float32 state).

    x: any shape, float16/bfloat16/float32, on CUDA (or CPU under the interpreter).
    out: optional contiguous tensor of x's shape and dtype. Returns x's shape and dtype.
    """
    def launch(x2: torch.Tensor, y2: torch.Tensor) -> None:
        block = min(ONLINE_BLOCK, triton.next_power_of_2(x2.shape[1]))
        softmax_online_kernel[(x2.shape[0],)](x2, y2, x2.shape[1], x2.stride(0), y2.stride(0),
                                              BLOCK=block, num_warps=16 if block >= 2048 else 4)
    return run_on_rows(x, dim, out, launch)


# %% [markdown]
# Checked against `torch.softmax` in float64, on shapes that do and do not divide the
# block, with whole rows and half rows of `-inf`:

# %%
from kernels.softmax import softmax_triton  # chapter 1's fused and three-pass kernels

TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
shapes = config.pick(cpu=[(1, 1), (3, 17), (4, 4096), (2, 10_001)],
                     gpu=[(1, 1), (3, 17), (4096, 32768), (1024, 262_144), (7, 1_000_003)])
if kernels.runtime.MODE != "unavailable":
    for shape in shapes:
        for dtype, tolerance in TOLERANCE.items():
            x = (torch.randn(shape, device=config.DEVICE) * 5).to(dtype)
            x[0, : shape[1] // 2] = -float("inf")
            error = (online_softmax_triton(x).double() - torch.softmax(x.double(), -1)).abs().max().item()
            print(f"shape {str(shape):17s} {str(dtype):15s} max error < {tolerance:g}: {error < tolerance}")
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# ## 2.5 Which kernel wins, and when
#
# We now have three softmax kernels. Counting reads and writes of the row (the model of
# section 1.4), for $N$ rows of $V$ elements of $s$ bytes:
#
# | kernel | passes over memory | bytes | works for |
# |---|---|---|---|
# | fused (chapter 1) | 1 read, 1 write | $2NVs$ | rows that fit on chip (here up to 65536 columns) |
# | online, two passes (this chapter) | 2 reads, 1 write | $3NVs$ | any length |
# | safe, three passes (chapter 1) | 3 reads, 1 write | $4NVs$ | any length |
#
# So the model says: fused when the row fits, otherwise online, which should beat the
# three-pass kernel by $4/3 \approx 1.33\times$. That is the figure the paper reports on a
# V100 (the lecture slides quote it as "1.33x apparent, 1.3x in practice"). Two things
# blur the model on a real GPU. A reread can come from the L2 cache instead of memory: if
# the rows being processed at once fit in L2 (50 MB on an H100), the second and third
# passes are almost free and all three kernels run at nearly the same speed. And when the
# row is long, one program per row gives few programs: 1024 rows on 132 streaming
# multiprocessors is fewer than 8 per multiprocessor, enough here but not for a handful of
# very long rows, where the row itself would have to be split over programs and the
# states merged with (2.2), as the decoding kernels of chapter 6 do.
#
# On the CPU we can only draw the model; on a GPU the next cell measures all three
# kernels and `torch.softmax` over row lengths, with the total size fixed.

# %%
# NBVAL_IGNORE_OUTPUT
from kernels.softmax import FUSED_MAX_COLS, LONG_ROW_BLOCK, softmax_looped_kernel


def three_pass_softmax(x: torch.Tensor) -> torch.Tensor:
    """Chapter 1's three-pass kernel on every row length (a launcher just for this comparison)."""
    y = torch.empty_like(x)
    softmax_looped_kernel[(x.shape[0],)](x, y, x.shape[1], x.stride(0), y.stride(0),
                                         BLOCK=min(LONG_ROW_BLOCK, x.shape[1]), num_warps=16)
    return y


lengths = [1024, 4096, 16384, 65536, 262144, 1048576]
fig, ax = plt.subplots(figsize=(7, 3.5))
if config.PROFILE == "gpu":
    import sys

    from tqdm.auto import tqdm
    from triton.testing import do_bench

    kernels_to_time = {"fused (ch. 1)": softmax_triton, "online, 2 passes": online_softmax_triton,
                       "safe, 3 passes (ch. 1)": three_pass_softmax,
                       "torch.softmax": lambda t: torch.softmax(t, -1)}
    measured = {name: [] for name in kernels_to_time}
    for n in tqdm(lengths, desc="row lengths", file=sys.stderr):
        x = torch.randn(2**28 // n, n, device="cuda")
        for name, fn in kernels_to_time.items():
            if name.startswith("fused") and n > FUSED_MAX_COLS:
                measured[name].append(float("nan"))
                continue
            ms = do_bench(lambda: fn(x), return_mode="median")
            measured[name].append(2 * x.numel() * 4 / ms / 1e6)
    for name, gbps in measured.items():
        ax.plot(lengths, gbps, "o-", label=name)
        print(f"{name:24s}", " ".join(f"{g:6.0f}" for g in gbps), "GB/s")
    ax.set_ylabel("effective GB/s (2 x bytes of x / time)")
    ax.set_title(config.describe().split(" | ")[0] + ", float32, 2^28 elements")
    online_over_three = min(o / t for o, t, n in zip(measured["online, 2 passes"],
                                                     measured["safe, 3 passes (ch. 1)"], lengths) if n >= 262144)
    print(f"online over three-pass at rows >= 262144: {online_over_three:.2f}x")
else:
    model = {"fused (ch. 1)": 2, "online, 2 passes": 3, "safe, 3 passes (ch. 1)": 4}
    for name, passes in model.items():
        ax.plot(lengths, [2 / passes] * len(lengths), "o-", label=name)
    ax.set_ylabel("speed relative to one read + one write")
    ax.set_title("The bytes model (no cache): CPU profile, nothing measured")
    online_over_three = 4 / 3
ax.set_xscale("log", base=2)
ax.set_xlabel("row length")
ax.legend(fontsize=8)
plt.show()

# %%
if config.PROFILE == "gpu":
    print("measured: the online kernel is at least as fast as the three-pass one on long rows:",
          online_over_three >= 1.0)
else:
    print(f"bytes model: online over three-pass = {online_over_three:.2f}x (measured only on a GPU)")

# %% [markdown]
# On an H100 (the table in `benchmarks/results/`, made by `python -m kernels.bench
# online_softmax`) the picture matches the model only in part, as expected: for rows that
# fit on chip the fused kernel is best; for long rows the online kernel beats the
# three-pass one, by less than the model's 1.33x where the L2 cache absorbs some rereads.
#
# ## 2.6 The backward pass
#
# Training needs the gradient. With $y = \mathrm{softmax}(x)$ and an upstream gradient
# $g = \partial L / \partial y$, the Jacobian is $\partial y_i / \partial x_j = y_i(\delta_{ij} - y_j)$
# (section 1.1), so
#
# $$\frac{\partial L}{\partial x_j} = \sum_i g_i\, y_i (\delta_{ij} - y_j)
#   = y_j \Big(g_j - \sum_i g_i y_i\Big), \qquad dx = y \odot (dy - \langle dy, y\rangle) \qquad (2.4)$$
#
# The $V \times V$ Jacobian never needs to exist: one dot product per row, then an
# elementwise expression. That is again a row reduction followed by a pass that needs its
# result, so the kernel has the same shape as the forward ones: for a row that fits on
# chip, one read of $y$ and $dy$ and one write of $dx$. (FlashAttention's backward pass,
# chapter 4, computes exactly this dot product for every query, as
# $D = \mathrm{rowsum}(dO \odot O)$.) The forward output $y$ is saved for the backward
# pass, so the input $x$ is not needed at all.

# %%
#| export kernels.online_softmax
@triton.jit
def softmax_backward_kernel(y_ptr, dy_ptr, dx_ptr, n_cols, y_row_stride, dy_row_stride, dx_row_stride,
                            BLOCK: tl.constexpr):
    """dx = y * (dy - sum(dy * y)) for one row, equation (2.4); float32 arithmetic.

    y, dy, dx: (n_rows, n_cols) with unit column stride; one program per row. When
    BLOCK >= n_cols each loop runs once and the second reads hit the cache.
    """
    row = tl.program_id(0).to(tl.int64)
    dot = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):           # pass 1: <dy, y>
        cols = start + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + row * y_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dot += y * dy
    total = tl.sum(dot, axis=0)
    for start in range(0, n_cols, BLOCK):           # pass 2: dx
        cols = start + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + row * y_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_row_stride + cols, (y * (dy - total)).to(dx_ptr.dtype.element_ty),
                 mask=cols < n_cols)


def softmax_backward_triton(y: torch.Tensor, dy: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The gradient of softmax with respect to its input, equation (2.4), with the Triton kernel.

    y: the softmax output; dy: the gradient with respect to y; same shape, dtype and device.
    Returns dx of that shape and dtype.
    """
    dim = check_row_kernel_input(y, dim, name="y", launch=False)
    check_row_kernel_input(dy, dim, name="dy", launch=False)
    if dy.shape != y.shape or dy.dtype != y.dtype or dy.device != y.device:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, dtype {dy.dtype} on {dy.device}; expected y's "
                         f"{tuple(y.shape)}, {y.dtype} on {y.device}")
    check_launchable("y", y)
    if dim != y.dim() - 1:
        return softmax_backward_triton(y.movedim(dim, -1), dy.movedim(dim, -1)).movedim(-1, dim)
    y2, dy2 = as_rows(y), as_rows(dy)
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    dx2 = dx.view(y2.shape)
    block = min(ONLINE_BLOCK, triton.next_power_of_2(y2.shape[1]))
    softmax_backward_kernel[(y2.shape[0],)](y2, dy2, dx2, y2.shape[1], y2.stride(0), dy2.stride(0),
                                            dx2.stride(0), BLOCK=block, num_warps=16 if block >= 2048 else 4)
    return dx


# %% [markdown]
# To make the kernels usable in training, wrap them in a `torch.autograd.Function`: the
# forward pass runs chapter 1's `softmax_triton` (fused or three-pass, by row length) and
# saves its output; the backward pass runs the kernel above. The same wrapper with the
# PyTorch formula (2.4) is the reference, and `torch.autograd.gradcheck` verifies that
# formula against finite differences in float64.

# %%
#| export lrn_lib.online_softmax
from typing import Callable

from kernels.online_softmax import softmax_backward_triton
from kernels.softmax import softmax_triton


def softmax_backward_reference(y: torch.Tensor, dy: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y, dim)), equation (2.4); y, dy and dx share one shape."""
    dim = check_softmax_input(y, dim, "y")
    validate.tensor(dy, "dy", kind="float")
    validate.same_shape(y=y, dy=dy)
    return y * (dy - (dy * y).sum(dim=dim, keepdim=True))


def softmax_function(name: str, forward: Callable[[torch.Tensor, int], torch.Tensor],
                     backward: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                     doc: str) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named name: y = forward(x, dim) saves y, and dx = backward(y, dy, dim) (2.4).

    The returned class is used as ``Cls.apply(x, dim)``; y, dy and dx share x's shape.
    """
    validate.instance(name, "name", str)
    for arg, fn in (("forward", forward), ("backward", backward)):
        if not callable(fn):
            raise TypeError(f"{arg} must be a function, got {type(fn).__name__}")

    def forward_pass(ctx, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        y = forward(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    def backward_pass(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        return backward(y, dy.contiguous(), ctx.dim), None  # None: dim takes no gradient

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_pass), "backward": staticmethod(backward_pass),
        "__doc__": doc, "__module__": __name__})


TritonSoftmax = softmax_function(
    "TritonSoftmax", softmax_triton, softmax_backward_triton,
    "Softmax whose forward and backward passes run the Triton kernels of chapters 1 and 2; x: float16/bfloat16/"
    "float32 on CUDA (or CPU under the interpreter).")
ReferenceSoftmax = softmax_function(
    "ReferenceSoftmax", safe_softmax, softmax_backward_reference,
    "The same autograd wrapper around lrn_lib.softmax.safe_softmax and equation (2.4).")


# %%
x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
print("gradcheck of equation (2.4) in float64:",
      torch.autograd.gradcheck(lambda t: ReferenceSoftmax.apply(t, -1), (x,)))

if kernels.runtime.MODE != "unavailable":
    for shape, dim in config.pick(cpu=[((5, 37), -1), ((4, 6, 9), 1), ((2, 70_000), -1)],
                                  gpu=[((4096, 4096), -1), ((64, 8, 1000), 1), ((32, 200_000), -1)]):
        x = (torch.randn(shape, device=config.DEVICE) * 3).requires_grad_()
        upstream = torch.randn(shape, device=config.DEVICE)
        (grad_ours,) = torch.autograd.grad(TritonSoftmax.apply(x, dim), x, upstream)
        x64 = x.detach().double().requires_grad_()
        (grad_ref,) = torch.autograd.grad(torch.softmax(x64, dim), x64, upstream.double())
        error = (grad_ours.double() - grad_ref).abs().max().item()
        print(f"shape {str(shape):14s} dim {dim:2d}: gradient matches torch autograd (float64), "
              f"max error < 1e-6: {error < 1e-6}")
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# ## Summary
#
# * The online normalizer (2.1) computes the row maximum and the softmax denominator in one
#   pass, by rescaling the running sum whenever the maximum grows; the softmax is unchanged.
# * Its state $(m, d)$, or the single number $\ell = m + \log d$, has an associative,
#   commutative merge (2.2, 2.3) with identity $(-\infty, 0)$: rows can be split and their
#   pieces recombined in any order. `lrn_lib.online_softmax` holds it for the rest of the book.
# * For rows too long for the chip, the two-pass online kernel moves 3 instead of 4 row-sized
#   transfers; for rows that fit, chapter 1's fused kernel (2 transfers) stays best. Caches
#   blur both counts on real hardware, so we measure.
# * Softmax's backward pass is $dx = y \odot (dy - \langle dy, y \rangle)$ (2.4): one dot product
#   per row, no Jacobian; the kernel and the autograd wrapper are in the library.
#
# Exported: `lrn_lib.online_softmax` (`SoftmaxState`, `softmax_state`, `merge_states`,
# `state_lse`, `merge_lse`, `online_softmax_reference`, `softmax_backward_reference`,
# `softmax_function`, and the two classes it makes, `TritonSoftmax` and `ReferenceSoftmax`) and `kernels.online_softmax` (`softmax_online_kernel`,
# `online_softmax_triton`, `softmax_backward_kernel`, `softmax_backward_triton`).

# %% [markdown]
# ## Exercises
#
# As in chapter 1: *derive* on paper, *implement* a function with the given signature and
# check it with `check("02.name", your_function)` from `lrn_lib.exercises` (randomized
# tests you do not see, against the library's float64 references; one line of verdict),
# *measure* with this chapter's code. `print("\n".join(exercises("02")))` lists the checkers.
# Worked solutions: `chapters/solutions/02_online_softmax_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): from states to log-sum-exps.** Starting from the merge (2.2), show
# that $\ell = m + \log d$ of the merged state is
# $\log\big(e^{\ell_A} + e^{\ell_B}\big)$, which is (2.3) with the maximum taken out, and
# that $(-\infty, 0)$ is the identity of (2.2) (what does $\ell = -\infty$ mean?). Then show
# from (2.4) that every row of $dx$ sums to zero, and explain why it must: what does adding
# the same constant to every score do to $y$?
#
# **Exercise 2 (implement): the merge.** Write
# `merge(m_a, d_a, m_b, d_b) -> tuple[torch.Tensor, torch.Tensor]` returning the state
# $(m, d)$ of $A \cup B$ by equation (2.2), elementwise over tensors of one shape. Either
# piece may be empty, state $(-\infty, 0)$, and two empty pieces must merge to
# $(-\infty, 0)$ without a `nan`. Run `check("02.merge", merge)`.
#
# **Exercise 3 (implement): the log-sum-exp merge.** Write
# `merge_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor` by equation (2.3),
# safe for log-sum-exps of $\pm 1000$ and for `-inf` on either or both sides, without
# calling `torch.logaddexp`. Run `check("02.merge_lse", merge_lse)`.
#
# **Exercise 4 (implement): softmax backward.** Write
# `softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor`, the gradient
# $dx$ of equation (2.4) for a softmax over the last dimension, where `y` is the softmax
# output and `dy` the gradient with respect to it (any number of leading dimensions). Run
# `check("02.softmax_backward", softmax_backward)`.
#
# **Exercise 5 (measure): how often does the maximum move?** Count the rescalings of (2.1),
# the steps $j \ge 2$ with $m_j > m_{j-1}$, using `online_normalizer` and its trace, on rows
# of length $V = 10, 100, 1000, 10000$: sorted ascending, sorted descending, and the average
# over 20 random permutations. Look for: $V - 1$ ascending, 0 descending, and for random
# order about $H_V - 1 \approx \ln V - 0.42$ (the harmonic number $H_V$), so on typical data
# a new maximum is rare and almost every step only adds. A kernel cannot know that in
# advance, which is why it computes the factor $e^{m - m_{\text{new}}}$ once per block anyway.
