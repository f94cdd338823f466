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
# # Chapter 1. Softmax
#
# Every attention layer, every language-model head and every Mixture-of-Experts router
# in this book ends in the same small function: softmax. It is cheap in arithmetic and
# expensive in memory traffic, and almost every trick of the next three chapters
# (online softmax, tiling, FlashAttention) is a way to move fewer bytes around it. This
# chapter builds it four times: the textbook formula, the numerically safe version, a
# count of what each costs in memory traffic, and a fused Triton kernel that touches
# each byte once.
#
# The code cells marked `#| export` are the library: `python -m lrn_lib.book export`
# copies them into `lrn_lib/softmax.py` and `kernels/softmax.py`, which later chapters
# import.

# %%
import math

import matplotlib.pyplot as plt
import torch

import kernels
from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter()

# %% [markdown]
# The first line names the device this notebook found and its *profile*: `cpu`
# (small sizes, Triton kernels in Triton's interpreter) or `gpu` (large sizes, kernels
# compiled for the GPU). The committed outputs come from the CPU profile; set
# `LRN_DEVICE=cpu` to reproduce them on a GPU machine.
#
# ## 1.1 What softmax is, and why exponentials
#
# Softmax turns a vector of real scores $x \in \mathbb{R}^V$ (logits) into a probability
# distribution over $V$ outcomes:
#
# $$y_i = \mathrm{softmax}(x)_i = \frac{e^{x_i}}{\sum_{j=1}^{V} e^{x_j}} \qquad (1.1)$$
#
# Why the exponential rather than, say, dividing by the sum of the scores? Three
# properties make it the right choice.
#
# 1. **Positivity.** $e^{x} > 0$ for every real $x$, so each $y_i > 0$ and
#    $\sum_i y_i = 1$ whatever the signs of the scores.
# 2. **Differences, not levels.** Adding the same constant $c$ to every score changes
#    nothing, since $e^{x_i + c} / \sum_j e^{x_j + c} = e^{c} e^{x_i} / (e^{c} \sum_j e^{x_j})$.
#    Only score *differences* matter, and a difference of $\Delta$ means odds of $e^{\Delta}$.
# 3. **A smooth arg max.** Dividing the scores by a temperature $T$ interpolates between
#    uniform ($T \to \infty$) and one-hot on the largest score ($T \to 0$), and the
#    gradient $\partial y_i / \partial x_j = y_i(\delta_{ij} - y_j)$ is simple.
#
# Let us check the first two numerically.

# %%
x = torch.tensor([2.0, 1.0, 0.1, -1.5])
y = torch.exp(x) / torch.exp(x).sum()
print("softmax(x)          =", y)
print("sum                 =", round(y.sum().item(), 6))
y_shifted = torch.exp(x + 10) / torch.exp(x + 10).sum()
print("softmax(x + 10)     =", y_shifted)
print("odds y0/y1 = e^(x0-x1):", round((y[0] / y[1]).item(), 4), round(math.exp(1.0), 4))

# %% [markdown]
# The temperature is how sampling from a language model is made more or less adventurous
# (chapter 6 uses it), and how a router's choices are sharpened. The figure shows one
# vector of logits under three temperatures.

# %%
logits = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0])
fig, ax = plt.subplots(figsize=(7, 3))
width = 0.27
for k, temperature in enumerate([0.5, 1.0, 4.0]):
    probs = torch.softmax(logits / temperature, dim=0)
    ax.bar(torch.arange(len(logits)) + (k - 1) * width, probs, width, label=f"T = {temperature}")
ax.set_xlabel("outcome i (logit shown below)")
ax.set_xticks(range(len(logits)), [f"{v:g}" for v in logits.tolist()])
ax.set_ylabel("softmax(x / T)_i")
ax.set_title("Temperature sharpens or flattens the distribution")
ax.legend()
plt.show()

# %% [markdown]
# ## 1.2 The naive algorithm, and where it overflows
#
# Equation (1.1) read literally is two passes over the row: sum the exponentials, then
# divide each one by the sum.

# %%
def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim by equation (1.1), as written. Overflows: for teaching only."""
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


print(naive_softmax(torch.tensor([1.0, 2.0, 3.0])))
print(naive_softmax(torch.tensor([1000.0, 0.0])))

# %% [markdown]
# The second row is `nan`: $e^{1000}$ is far beyond the largest float32 number, so the
# numerator and the sum are both `inf` and `inf / inf` is not a number. Logits of 1000 are
# not exotic: a language model's final layer can produce large scores, attention scores
# grow with the head dimension, and a model trained in float16 has much less room. Where
# exactly does $e^x$ leave each format? At $x = \ln(\text{largest finite number})$:

# %%
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    limit = math.log(torch.finfo(dtype).max)
    just_below = torch.exp(torch.tensor(limit - 0.01, dtype=dtype))
    just_above = torch.exp(torch.tensor(limit + 0.1, dtype=dtype))
    print(f"{str(dtype):15s} max = {torch.finfo(dtype).max:.4g}  exp overflows above x = {limit:.2f}"
          f"  exp({limit - 0.01:.2f}) = {just_below.item():.4g}  exp({limit + 0.1:.2f}) = {just_above.item()}")

# %% [markdown]
# In float16, the format of many inference kernels, $e^{x}$ is already infinite for
# $x > 11.09$: a score of 12 is enough to break the naive softmax. bfloat16 has float32's
# exponent range (8 exponent bits) and overflows only above 88.72, at the price of fewer
# mantissa bits. Underflow is the milder, opposite failure: $e^{x}$ rounds to 0 for very
# negative $x$ (below about $-104$ in float32, counting subnormals), which is harmless for
# one entry but ruinous if it happens to all of them, since then the sum is 0.

# %%
half = torch.tensor([12.0, 0.0], dtype=torch.float16)
print("naive softmax of [12, 0] in float16:", naive_softmax(half))
print("naive softmax of [-120, -121] in float32:", naive_softmax(torch.tensor([-120.0, -121.0])))

# %% [markdown]
# ## 1.3 Safe softmax and log-sum-exp
#
# Property 2 is the cure. Subtract the row maximum $m = \max_k x_k$ before exponentiating:
#
# $$y_i = \frac{e^{x_i - m}}{\sum_{j=1}^{V} e^{x_j - m}}, \qquad m = \max_{k} x_k \qquad (1.2)$$
#
# It is the same function (take $c = -m$ above), but now every exponent is $\le 0$, so no
# term exceeds 1, and the largest term is exactly $e^0 = 1$, so the sum is at least 1:
# neither overflow nor a zero denominator is possible. The price is a third pass over the
# row, to find $m$ first. Every deep-learning library computes this *safe softmax*.
#
# The logarithm of the denominator has its own name, because it appears in every
# cross-entropy loss:
#
# $$\mathrm{LSE}(x) = \log \sum_j e^{x_j} = m + \log \sum_j e^{x_j - m} \qquad (1.3)$$
#
# and $\log \mathrm{softmax}(x)_i = x_i - \mathrm{LSE}(x)$. Chapter 2 will show that the
# pair $(m, \sum_j e^{x_j - m})$ can be merged across pieces of a row, and chapter 4 keeps
# only LSE from the forward pass to compute the backward pass of attention.
#
# The references below are exported to `lrn_lib.softmax`. They accept any floating dtype,
# compute in at least float32 (float64 stays float64) and return the input's dtype, as
# `torch.softmax` does. Input checks live in one function, shared with the kernel launcher.

# %%
#| export lrn_lib.softmax
import torch

from kernels import runtime
from lrn_lib import validate

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_softmax_input(x: torch.Tensor, dim: int, name: str = "x") -> int:
    """Validate a softmax input and return ``dim`` as a non-negative axis.

    Raises TypeError for a non-tensor or a non-floating dtype, ValueError for a 0-d or an
    empty tensor and for a ``dim`` out of range; each message names the argument.
    """
    validate.tensor(x, name, nonempty=False)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; softmax needs a floating dtype "
                        f"(float16, bfloat16, float32 or float64)")
    if x.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor; softmax needs at least one dimension")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); softmax needs at least one element")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for {name} with {x.dim()} dimension(s)")
    return dim % x.dim()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax with the maximum subtracted first, equation (1.2).

    x: any shape, floating; the softmax is taken along ``dim``. Returns x's shape and dtype.
    """
    dim = check_softmax_input(x, dim)
    z = x.to(_compute_dtype(x.dtype))
    m = z.amax(dim=dim, keepdim=True)          # pass 1: the row maximum
    e = torch.exp(z - m)                        # pass 2: exponentials, all <= 1 ...
    d = e.sum(dim=dim, keepdim=True)            # ... and their sum, at least 1
    return (e / d).to(x.dtype)                  # pass 3: normalize


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(sum(exp(x))) along ``dim`` without overflow, equation (1.3).

    x: any shape, floating. Returns x's shape without ``dim``, in x's dtype.
    """
    dim = check_softmax_input(x, dim)
    z = x.to(_compute_dtype(x.dtype))
    m = z.amax(dim=dim, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows give -inf
    lse = m_safe + torch.log(torch.exp(z - m_safe).sum(dim=dim, keepdim=True))
    return lse.squeeze(dim).to(x.dtype)


# %% [markdown]
# The safe version survives every input that broke the naive one, and agrees with
# PyTorch's own `torch.softmax` and `torch.logsumexp`:

# %%
print("safe softmax of [1000, 0]:", safe_softmax(torch.tensor([1000.0, 0.0])))
print("safe softmax of [12, 0] in float16:", safe_softmax(half))
print("safe softmax of [-120, -121]:", safe_softmax(torch.tensor([-120.0, -121.0])))

x = torch.randn(64, 1000, dtype=torch.float64) * 30
print("max |safe - torch.softmax|  < 1e-12:",
      (safe_softmax(x) - torch.softmax(x, -1)).abs().max().item() < 1e-12)
print("max |logsumexp - torch's|   < 1e-12:",
      (logsumexp(x) - torch.logsumexp(x, -1)).abs().max().item() < 1e-12)

# %% [markdown]
# A row of only `-inf` scores (every outcome masked out) has no meaningful softmax:
# PyTorch returns `nan` for it, and so do we, since $-\infty - (-\infty)$ is undefined.
# Chapter 4 meets this case for real with causal masks and handles it there.

# %%
masked = torch.full((1, 4), -float("inf"))
print("torch:", torch.softmax(masked, -1), " ours:", safe_softmax(masked))

# %% [markdown]
# ## 1.4 Three passes, and the bytes they move
#
# On a modern accelerator softmax is **memory-bound**: each element needs a handful of
# arithmetic operations (a subtraction, an exponential, an addition, a multiplication),
# while an H100 can do several hundred operations in the time it reads one float32 from
# its HBM. The running time is therefore set by the bytes moved between memory and the
# chip, and the way to count an algorithm's cost is to count its passes over memory.
# For an $N \times V$ input of $s$-byte elements:
#
# | algorithm | reads of x | writes of y | bytes moved |
# |---|---|---|---|
# | naive (1.1): sum, then divide | 2 | 1 | $3NVs$ |
# | safe (1.2) as three loops: max, sum, divide | 3 | 1 | $4NVs$ |
# | safe (1.2) as separate PyTorch ops: `amax`, `-`, `exp`, `sum`, `/` | 5 | 3 | $8NVs$ |
# | fused: the row is read once, kept on chip, written once | 1 | 1 | $2NVs$ |
#
# The eager PyTorch version is the worst because every operation is its own kernel:
# `x - m` writes an intermediate the size of `x`, `exp` reads it back and writes another,
# and so on. The fused kernel reads and writes the minimum any softmax must: the input
# once, the output once. (The per-row vectors $m$ and $d$ are $V$ times smaller and left
# out.) Here are those counts for one large batch of rows, turned into times at an
# H100's measured copy bandwidth of about 3 TB/s (this is a model, not a measurement:
# section 1.7 measures).

# %%
PASSES = {  # algorithm -> (reads of x, writes of y)
    "naive (2 passes)": (2, 1),
    "safe, 3 loops": (3, 1),
    "safe, 5 eager ops": (5, 3),
    "fused kernel": (1, 1),
}


def bytes_moved(n_rows: int, n_cols: int, bytes_per_element: int, reads: int, writes: int) -> int:
    """HBM traffic of a softmax that reads its input ``reads`` times and writes ``writes`` times."""
    return (reads + writes) * n_rows * n_cols * bytes_per_element


n_rows, n_cols = 4096, 32768
copy_bandwidth = 3.0e12  # bytes/s, an H100's device-to-device copy rate
moved = {name: bytes_moved(n_rows, n_cols, 4, *rw) for name, rw in PASSES.items()}
for name, b in moved.items():
    print(f"{name:18s} {b / 1e9:5.2f} GB   {b / copy_bandwidth * 1e3:5.2f} ms at 3 TB/s")

fig, ax = plt.subplots(figsize=(7, 2.8))
ax.barh(list(moved), [b / 1e9 for b in moved.values()], color=["C1", "C1", "C3", "C2"])
ax.invert_yaxis()
ax.set_xlabel("GB moved for a 4096 x 32768 float32 softmax")
ax.set_title("Memory traffic per algorithm (bytes read + written)")
plt.show()

# %% [markdown]
# Fusing is worth up to 4x over eager PyTorch, and 2x over a three-loop safe softmax
# that streams the row from memory each time. The fused kernel's condition is that a
# whole row fits on the chip (in registers and shared memory) at once; section 1.6 deals
# with rows that do not, and chapter 2 shows how to need only two passes for them.
#
# ## 1.5 A fused softmax kernel in Triton
#
# Triton lets us write the fused kernel in Python. A Triton kernel is a function run by
# many *programs* at once (one per block of work, like CUDA thread blocks); inside one,
# operations act on whole blocks of values (`tl.arange(0, BLOCK)` is a vector of
# `BLOCK` indices), and the compiler maps a block onto the GPU's threads, registers and
# vector loads. Block sizes are compile-time constants (`tl.constexpr`) and must be powers
# of two; masks switch off the lanes that fall outside the data.
#
# Our kernel gives each program a tile of `BLOCK_M` rows by `BLOCK_N` columns, with
# `BLOCK_N` the row length rounded up to a power of two, so the whole row is on chip:
#
# * `rows`, `cols`: the global row indices of this program's tile, and the column
#   indices `0 .. BLOCK_N-1`. Rows are widened to 64 bits so that `row * stride` cannot
#   overflow on tensors with more than $2^{31}$ elements.
# * Padding: columns past the row's end are loaded as `-inf`, which adds
#   $e^{-\infty} = 0$ to the sum and never wins the max, so they change nothing. Rows past
#   the last one (when `n_rows` is not a multiple of `BLOCK_M`) re-read the last row, so
#   they compute something harmless, and `mask` keeps them from being stored.
# * `tl.load` reads the tile from memory once, and `.to(tl.float32)` does the
#   arithmetic in float32 whatever the input format (this is *float32 accumulation*).
# * `tl.max`, `tl.exp`, `tl.sum`: equation (1.2) on values already in registers. We
#   multiply by `1 / d` instead of dividing each element: one division per row.
# * `tl.store` writes the result once, converted back to the output's dtype, under the
#   same mask.
#
# Tiles of several short rows give each program enough work; for long rows `BLOCK_M` is 1.

# %%
#| export kernels.softmax
from typing import Callable

import torch

from kernels.runtime import LaunchPlans, check_launchable, launch_and_keep, layout_key, tl, triton
from lrn_lib import validate

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_MAX_COLS = 65536  # longest row the fused kernel holds on chip; longer rows loop
LONG_ROW_BLOCK = 4096   # columns per step of the looped kernel


@triton.jit
def softmax_fused_kernel(x_ptr, y_ptr, n_rows, n_cols, x_row_stride, y_row_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Safe softmax (1.2) of BLOCK_M whole rows held on chip: one read and one write per element.

    x, y: (n_rows, n_cols) with unit column stride; BLOCK_N >= n_cols, a power of two.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.minimum(rows, n_rows - 1).to(tl.int64)  # padding rows re-read the last row
    cols = tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=cols[None, :] < n_cols,
                other=-float("inf"))
    x = x.to(tl.float32)
    m = tl.max(x, axis=1)                       # row maximum
    e = tl.exp(x - m[:, None])                  # every exponent <= 0
    d = tl.sum(e, axis=1)                       # row sum, >= 1
    y = e * (1.0 / d)[:, None]
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# ## 1.6 Rows longer than the chip holds
#
# The fused kernel keeps `BLOCK_N` float32 values per row in registers. An H100 has
# 256 KB of registers per streaming multiprocessor, shared by all the programs running
# on it, so a row of 65536 float32 values (256 KB) is about the limit: past it the
# compiler must spill to slow local memory, and on an H100 we measured the fused kernel
# still ahead of the alternative at 65536 columns (`benchmarks/sweep_softmax.py`). For
# longer rows we fall back to the three passes of the
# safe softmax, each streaming the row through the chip in `BLOCK` columns at a time: one
# loop for the maximum, one for the sum of exponentials, one to write the output. That
# reads the row three times (the $4NVs$ line of the table); chapter 2's online softmax
# removes one of those passes.

# %%
#| export kernels.softmax
@triton.jit
def softmax_looped_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    """Safe softmax (1.2) of one row of any length, in three passes of BLOCK columns each.

    x, y: (n_rows, n_cols) with unit column stride; one program per row.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):      # pass 1: the maximum
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m = tl.maximum(m, x)
    m_row = tl.max(m, axis=0)
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):      # pass 2: the sum of exponentials
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        d += tl.exp(x - m_row)
    inv_d = 1.0 / tl.sum(d, axis=0)
    for start in range(0, n_cols, BLOCK):      # pass 3: normalize and write
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        y = tl.exp(x - m_row) * inv_d
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


# %% [markdown]
# ## 1.7 The launcher
#
# A kernel is launched as `kernel[grid](arguments...)`, where `grid` says how many
# programs run. The launcher is the part users call, so it carries the checks: the input
# must be a floating tensor of a supported dtype on a device the kernels can run on, not
# empty, and `dim` in range; an `out` tensor must match in shape, dtype and device. Any
# `dim` is handled by moving it last and viewing the tensor as rows; a non-contiguous
# input is copied once into row order. Then the launcher picks a kernel and its sizes:
#
# * rows up to `FUSED_MAX_COLS`: the fused kernel, with enough rows per program that a
#   tile holds about 4096 elements, and more warps (groups of 32 GPU threads) for bigger
#   tiles so each thread keeps few values;
# * longer rows: the looped kernel, one program per row.
#
# Launching through Triton's JIT costs the host about as long as the GPU needs for a
# small softmax. On an H200 (`benchmarks/launch_plans.py`, results of 2026-12-04 in
# `benchmarks/results/`), back-to-back calls at 16384 x 1024 in float32 took 55
# microseconds each, all of it the host's, while the kernel runs in about 38. So the
# launcher keeps, for each layout of the rows (sizes, row strides, 16-byte alignment,
# dtype, device), the binary its first launch compiled, and later launches hand their
# arguments straight to it (chapter 3, section 3.7, explains the idea). That brought the
# call to 39 microseconds, level with `torch.softmax`'s 38 (in bfloat16, 30 against 33).

# %%
#| export kernels.softmax
def check_row_kernel_input(x: torch.Tensor, dim: int, out: torch.Tensor | None = None,
                           name: str = "x", *, launch: bool = True) -> int:
    """Validate the input (and optional ``out``) of a row-wise kernel; return ``dim`` >= 0.

    Raises TypeError for a non-tensor or an unsupported dtype, ValueError for an empty or
    0-d tensor, a ``dim`` out of range, an ``out`` whose device, shape, dtype or layout does
    not match, or (last, unless launch=False) a device the kernels cannot run on. Messages
    name the argument.
    """
    validate.tensor(x, name, nonempty=False)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; the kernels take float16, bfloat16 or float32")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; the kernels need a non-empty tensor "
                         "with at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for {name} with {x.dim()} dimension(s)")
    if out is not None:
        validate.tensor(out, "out", nonempty=False)
        if out.device != x.device:
            raise ValueError(f"out is on {out.device} but {name} is on {x.device}; they must share a device")
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; "
                             f"expected {name}'s {tuple(x.shape)} and {x.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    if launch:
        check_launchable(name, x)
    return dim % x.dim()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x of shape (..., n) as a (rows, n) tensor with unit column stride; a view when possible."""
    if validate.tensor(x, "x").dim() == 0:
        raise ValueError("x is a 0-d tensor; as_rows needs at least one dimension")
    return _rows(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """as_rows without its checks, for a tensor the launcher has checked."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def fused_launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the fused kernel on rows of ``n_cols`` elements."""
    validate.integer(n_cols, "n_cols", low=1, high=FUSED_MAX_COLS)
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


def run_on_rows(x: torch.Tensor, dim: int, out: torch.Tensor | None,
                launch: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """Check x and out, view x as rows (R, C) along dim, and call launch(x2, y2) to fill y's rows.

    Returns y of x's shape and dtype (out when given). A dim other than the last is moved last
    and back, which copies.
    """
    if not callable(launch):
        raise TypeError(f"launch must be a function of (x2, y2), got {type(launch).__name__}")
    dim = check_row_kernel_input(x, dim, out)
    if dim != x.dim() - 1:  # move the softmax axis last, compute, move it back
        y = run_on_rows(x.movedim(dim, -1), -1, None, launch).movedim(-1, dim)
        return y if out is None else out.copy_(y)
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    launch(x2, y.view(x2.shape))
    return y


_plans = LaunchPlans(4096)  # a launch for each layout of (x2, y2) seen, the oldest dropped first


def _launch_softmax(x2: torch.Tensor, y2: torch.Tensor) -> None:
    """The fused kernel for rows that fit one block, the looped one for longer rows; x2, y2: (R, C).

    The first launch for a layout (sizes, strides, 16-byte alignment, dtype, device) goes
    through Triton's JIT; later ones hand the arguments to the binary it compiled.
    """
    key = layout_key(x2, y2)
    launch = _plans.get(key)
    if launch is not None:
        return launch(x2, y2)
    n_rows, n_cols = x2.shape
    if n_cols <= FUSED_MAX_COLS:
        block_m, block_n, num_warps = fused_launch_config(n_cols)
        kernel, grid, sizes = softmax_fused_kernel, (triton.cdiv(n_rows, block_m),), (n_rows, n_cols)
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    else:
        kernel, grid, sizes, num_warps = softmax_looped_kernel, (n_rows,), (n_cols,), 32
        constexprs = {"BLOCK": LONG_ROW_BLOCK}
    sizes += (x2.stride(0), y2.stride(0))
    relaunch = launch_and_keep(kernel, grid, (x2, y2, *sizes), constexprs, {"num_warps": num_warps})
    _plans.keep(key, lambda x2, y2: relaunch(x2, y2, *sizes))


def softmax_triton(x: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` with the Triton kernels (float32 accumulation).

    x: any shape, float16/bfloat16/float32, on CUDA (or on the CPU under Triton's
    interpreter). out: optional contiguous tensor of x's shape and dtype.
    Returns a tensor of x's shape and dtype.
    """
    return run_on_rows(x, dim, out, _launch_softmax)


# %% [markdown]
# Now the check that matters: the kernel against `torch.softmax` on fresh random inputs
# of awkward shapes, in each supported dtype. On a CPU the very same kernel source runs in
# Triton's interpreter (`TRITON_INTERPRET=1`, which the `kernels` package sets before
# importing triton when there is no GPU): each program is executed one after another with
# NumPy arrays standing in for blocks. It is slow, but it is the same code, so every step
# can be followed and printed.
#
# Tolerances follow the output format: float32 results should agree to about $10^{-6}$;
# bfloat16 stores only 8 significant bits, so one rounding step of a value near 1 is
# $2^{-8} \approx 0.004$.

# %%
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
shapes = config.pick(cpu=[(1, 1), (5, 17), (33, 1000), (3, 70000)],
                     gpu=[(1, 1), (5, 17), (4096, 1000), (1024, 32768), (16, 100_000)])
if kernels.runtime.MODE != "unavailable":
    for shape in shapes:
        for dtype in TOLERANCE:
            x = (torch.randn(shape, device=config.DEVICE) * 5).to(dtype)
            ours = softmax_triton(x)
            error = (ours.double() - torch.softmax(x.double(), dim=-1)).abs().max().item()
            print(f"shape {str(shape):15s} {str(dtype):15s} max error < {TOLERANCE[dtype]:g}: "
                  f"{error < TOLERANCE[dtype]}")
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# The $(3, 70000)$ case is longer than `FUSED_MAX_COLS` and went through the looped
# kernel. A few edge cases: the softmax along the first axis of a non-contiguous tensor,
# and a row that is entirely `-inf` (which must come out `nan`, as in PyTorch). On the
# CPU, NumPy warns about an invalid subtraction: that is the interpreter showing us
# $-\infty - (-\infty)$ being computed.

# %%
if kernels.runtime.MODE != "unavailable":
    x = torch.randn(7, 300, device=config.DEVICE).t()          # (300, 7), not contiguous
    print("dim=0 of a transposed tensor matches:",
          torch.allclose(softmax_triton(x, dim=0), torch.softmax(x, dim=0), atol=1e-6))
    x = torch.randn(3, 50, device=config.DEVICE)
    x[1] = -float("inf")
    y = softmax_triton(x)
    print("all -inf row is nan:", bool(y[1].isnan().all()), "| other rows match:",
          torch.allclose(y[[0, 2]], torch.softmax(x, -1)[[0, 2]], atol=1e-6))
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# ## 1.8 One `softmax()` for the rest of the book
#
# Later chapters call `lrn_lib.softmax.softmax`, which picks the implementation: the
# Triton kernel for CUDA tensors when Triton is compiled, the safe PyTorch reference
# otherwise (the interpreter is for studying kernels, not for speed). `impl="triton"` or
# `impl="torch"` forces a choice; where Triton cannot be installed, `impl="triton"` falls
# back to the reference with one warning.

# %%
#| export lrn_lib.softmax
def softmax(x: torch.Tensor, dim: int = -1, impl: str = "auto") -> torch.Tensor:
    """Softmax of ``x`` along ``dim``; returns x's shape and dtype.

    impl: "auto" (Triton kernel for CUDA tensors when Triton is compiled, else
    :func:`safe_softmax`), "triton" (the kernel, also under the CPU interpreter) or
    "torch" (:func:`safe_softmax`).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r}; expected 'auto', 'triton' or 'torch'")
    dim = check_softmax_input(x, dim)
    if impl == "auto":
        use_kernel = x.is_cuda and x.dtype != torch.float64 and runtime.MODE != "interpreted"
        impl = "triton" if use_kernel else "torch"
    if impl == "triton" and runtime.MODE == "unavailable":
        runtime.note_fallback()
        impl = "torch"
    if impl == "torch":
        return safe_softmax(x, dim)
    from kernels.softmax import softmax_triton

    return softmax_triton(x, dim)


# %% [markdown]
# Bad input gets an error that says what is wrong and with which argument, rather than a
# crash deep inside Triton or a silently wrong answer:

# %%
bad_calls = {
    "integer tensor": lambda: softmax(torch.arange(6).reshape(2, 3)),
    "dim out of range": lambda: softmax(torch.randn(2, 3), dim=2),
    "empty tensor": lambda: softmax(torch.randn(4, 0)),
    "float64 into the kernel": lambda: softmax_triton(torch.randn(2, 3, dtype=torch.float64)),
    "out of the wrong shape": lambda: softmax_triton(torch.randn(2, 3, device=config.DEVICE),
                                                     out=torch.empty(3, 2, device=config.DEVICE)),
}
for what, call in bad_calls.items():
    try:
        call()
        print(f"{what}: no error (unexpected)")
    except (TypeError, ValueError) as err:
        print(f"{what}: {type(err).__name__}: {err}")
    except RuntimeError:                                   # no triton: the launcher cannot run at all
        print(f"{what}: (skipped: needs Triton)")

# %% [markdown]
# ## 1.9 Measuring
#
# Bytes moved predicted a 4x gap between eager PyTorch and a fused kernel. On the CPU we
# can at least compare PyTorch's fused `torch.softmax` with the five-op eager version, on one
# thread and taking the fastest of several runs to damp the noise of a shared machine
# (timings vary from machine to machine, so the printed numbers are not checked; the
# claim after them is). With a CUDA GPU, the same cell measures bandwidth in GB/s for
# our Triton kernel, `torch.softmax` and the eager version across row lengths, the
# measurement `python -m kernels.bench softmax` makes at the acceptance sizes.

# %%
def eager_softmax(x: torch.Tensor) -> torch.Tensor:
    """Safe softmax as five separate PyTorch operations: what an unfused program runs."""
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim=-1, keepdim=True)


def best_cpu_ms(fn, *args, repeats: int = 15) -> float:
    """Fastest of ``repeats`` single-threaded CPU runs of fn(*args), in ms, after a warm-up.

    One thread and the minimum make the figure repeatable on a busy two-core machine.
    """
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    torch.set_num_threads(threads)
    return min(times)


# %%
# NBVAL_IGNORE_OUTPUT
if config.PROFILE == "gpu":
    import sys

    from tqdm.auto import tqdm
    from triton.testing import do_bench

    lengths = [256, 1024, 4096, 16384, 32768, 131072]
    results = {"ours (Triton)": [], "torch.softmax": [], "eager, 5 ops": []}
    for n in tqdm(lengths, desc="row lengths", file=sys.stderr):
        x = torch.randn(2**26 // n, n, device="cuda")
        for name, fn in zip(results, (softmax_triton, lambda t: torch.softmax(t, -1), eager_softmax)):
            ms = do_bench(lambda: fn(x), return_mode="median")
            results[name].append(2 * x.numel() * 4 / ms / 1e6)  # minimal bytes / time, GB/s
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, gbps in results.items():
        ax.plot(lengths, gbps, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("row length (2^26 float32 elements in all)")
    ax.set_ylabel("effective GB/s (2 x bytes of x / time)")
    ax.set_title(config.describe().split(" | ")[0])
    ax.legend()
    plt.show()
    fused_speedup = min(t / e for t, e in zip(results["ours (Triton)"], results["eager, 5 ops"]))
else:
    x = torch.randn(2048, 4096)
    t_fused = best_cpu_ms(lambda t: torch.softmax(t, -1), x)
    t_eager = best_cpu_ms(eager_softmax, x)
    print(f"CPU, one thread, 2048 x 4096 float32: torch.softmax {t_fused:.2f} ms, eager 5 ops {t_eager:.2f} ms")
    fused_speedup = t_eager / t_fused
print(f"fused over eager: {fused_speedup:.1f}x")

# %%
print("the fused softmax beats the eager five-op version:", fused_speedup > 1.2)

# %% [markdown]
# On an H100 we measured (the table in the README and `benchmarks/results/`) our fused kernel
# at 2.4 to 3.0 TB/s of effective bandwidth on rows that fit on chip, close to the card's
# measured copy rate of 3.0 TB/s (chapter 4's GPU run, `benchmarks/results/chapter04_gpu_profile_*`), and `torch.softmax` at 1.3 to 2.6 TB/s on the same inputs;
# the eager version runs several times slower, as the byte count predicted. Past
# `FUSED_MAX_COLS` the looped kernel reads each row three times, and its bandwidth drops
# accordingly: that is chapter 2's starting point.
#
# ## Summary
#
# * Softmax is exponentials normalized to sum to one; only score differences matter.
# * The literal formula overflows (float16 above $x = 11.09$, float32 and bfloat16 above
#   $88.72$); subtracting the row maximum (safe softmax) fixes it at the cost of a pass.
# * On GPUs softmax is memory-bound, so the cost is the bytes moved: 8 passes' worth for
#   eager PyTorch, 4 for a streaming safe softmax, 2 for a fused kernel.
# * The fused Triton kernel keeps a row on chip, does float32 arithmetic on any input
#   format, and runs unchanged in Triton's interpreter on a CPU.
#
# Exported to the library: `lrn_lib.softmax` (`safe_softmax`, `logsumexp`, `softmax`,
# `check_softmax_input`) and `kernels.softmax` (`softmax_fused_kernel`,
# `softmax_looped_kernel`, `softmax_triton`, and the input checks `check_row_kernel_input`
# and `as_rows` that chapter 2's kernels reuse).

# %% [markdown]
# ## Exercises
#
# Each exercise says what kind it is: *derive* (on paper, stating what to show),
# *implement* (a function with the given signature, then one line that checks it) or
# *measure* (an experiment with this chapter's code, and what to look for). The checker
# `check("01.name", your_function)` from `lrn_lib.exercises` runs randomized tests you do
# not see (huge scores, `-inf` entries, odd shapes) against the library's float64
# references and prints one line: the number of cases passed, or the first input your
# function got wrong, what it returned, what was expected, and a hint. Run
# `print("\n".join(exercises("01")))` for the list. Worked solutions are in
# `chapters/solutions/01_softmax_solutions.ipynb`; try first.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): how large can the denominator be?** With $m = \max_k x_k$ and
# $d = \sum_{j=1}^{V} e^{x_j - m}$ the denominator of (1.2), show that $1 \le d \le V$, and
# deduce $m \le \mathrm{LSE}(x) \le m + \log V$ for the log-sum-exp (1.3). Say when each
# bound is attained. Then show that $\partial\,\mathrm{LSE}(x) / \partial x_i =
# \mathrm{softmax}(x)_i$: log-sum-exp is a smooth maximum whose gradient is the softmax.
#
# **Exercise 2 (implement): a safe log-sum-exp.** Write
# `logsumexp(x: torch.Tensor) -> torch.Tensor` that reduces the last dimension (shape
# `(..., V)` in, `(...)` out) by equation (1.3), without overflow for scores of 1000 and
# with `-inf`, not `nan`, for a row whose scores are all `-inf`. Use `amax`, `exp`, `sum`
# and `log`, not `torch.logsumexp`. Then run `check("01.logsumexp", logsumexp)`.
#
# **Exercise 3 (implement): log-softmax.** A cross-entropy loss needs
# $\log \mathrm{softmax}(x)_i$ for scores that may lie far apart, where
# `torch.log(safe_softmax(x))` returns `-inf`. Write
# `log_softmax(x: torch.Tensor) -> torch.Tensor` over the last dimension, finite wherever
# $x_i$ is, and run `check("01.log_softmax", log_softmax)`.
#
# **Exercise 4 (implement): temperature.** Write
# `temperature_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor`, the softmax of
# $x / T$ over the last dimension (property 3 of section 1.1), safe for every temperature
# from $10^{-3}$ to $10^{3}$, and run `check("01.temperature", temperature_softmax)`. What
# does it return as $T \to 0$ when two scores tie for the maximum?
#
# **Exercise 5 (measure): where the naive softmax breaks.** For float16, bfloat16 and
# float32, find the smallest integer $c \ge 0$ for which
# `naive_softmax(torch.tensor([c, 0.0], dtype=dtype))` contains `nan`, and run
# `safe_softmax` on the same inputs. Look for: $c$ is the first integer above the overflow
# threshold $\ln(\text{largest finite number})$ printed in section 1.2 for each format
# (bfloat16 and float32 share theirs), and the safe softmax never fails.
