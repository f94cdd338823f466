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
# # Chapter 3. Tiling
#
# Chapter 1 found softmax to be *memory-bound*: a few operations per byte, so its speed
# is the speed of memory. Matrix multiplication is the opposite case. It does $2MNK$
# operations on only $MK + KN + MN$ numbers, so in principle each byte can feed hundreds of
# operations. Whether a kernel gets that reuse depends on how it walks through the
# matrices, and the way to get it is *tiling*: cut the matrices into blocks small enough
# to sit on chip, and multiply block by block.
#
# This chapter covers the bookkeeping (arithmetic intensity and the roofline model), a
# tiled matmul written as plain PyTorch loops, and then a Triton kernel that is competitive
# with cuBLAS on an H100. The last section explains why the same idea does not carry over
# directly to attention, because of softmax. That is the problem chapter 2's online
# softmax solves and chapter 4's FlashAttention builds on.
#
# Exported: `lrn_lib.tiling` (cost model, roofline, the tiled reference, operand checks)
# and `kernels.matmul` (the Triton kernel and its launcher).

# %%
import math

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

import kernels
from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter()

# %% [markdown]
# ## 3.1 A matrix product is a sum of tile products
#
# For $A \in \mathbb{R}^{M \times K}$ and $B \in \mathbb{R}^{K \times N}$, each entry of
# $C = AB$ is a dot product, $C_{ij} = \sum_{k} A_{ik} B_{kj}$. Group the rows of $C$ into
# blocks of $b_M$, its columns into blocks of $b_N$ and the shared index $k$ into blocks
# of $b_K$. Write $A_{[I,P]}$ for the $b_M \times b_K$ block of $A$ in row block $I$ and
# column block $P$, and likewise for $B$ and $C$. The sum over $k$ splits into a sum over
# blocks, and so
#
# $$C_{[I,J]} = \sum_{P=1}^{\lceil K / b_K \rceil} A_{[I,P]}\, B_{[P,J]} \qquad (3.1)$$
#
# Each output tile is a sum of small matrix products. This is the same formula for the
# whole matrix, applied at the scale of blocks. Blocks at the edges are smaller when
# $b_M$, $b_N$ or $b_K$ does not divide the matrix sizes, and (3.1) still holds. Here it
# is checked for one tile:

# %%
A = torch.randn(6, 10, dtype=torch.float64)
B = torch.randn(10, 4, dtype=torch.float64)
bm, bn, bk = 3, 2, 4
I, J = 1, 1                                       # the tile C[3:6, 2:4]
tile = sum(A[I * bm:(I + 1) * bm, p:p + bk] @ B[p:p + bk, J * bn:(J + 1) * bn] for p in range(0, 10, bk))
print("K blocks:", [(p, min(p + bk, 10)) for p in range(0, 10, bk)], "(the last one is shorter)")
print("tile from (3.1) equals (A @ B)[3:6, 2:4]:", torch.allclose(tile, (A @ B)[3:6, 2:4], atol=1e-12))

# %% [markdown]
# Why bother with blocks? A program (one GPU thread block) that owns the tile
# $C_{[I,J]}$ needs only the row panel $A_{[I,:]}$ ($b_M \times K$) and the column panel
# $B_{[:,J]}$ ($K \times b_N$), and it can stream through them one $b_K$ slice at a time.
# Only three small blocks have to be on chip at any moment: the two input slices and the
# float32 accumulator for $C_{[I,J]}$. Each number loaded from memory is then used
# $b_N$ times (an element of $A$) or $b_M$ times (an element of $B$). A naive program that
# computes one $C_{ij}$ at a time uses each loaded number exactly once.
#
# ## 3.2 Arithmetic intensity and the roofline
#
# Counting one multiply and one add per term, a matmul does
#
# $$F = 2MNK \qquad (3.2)$$
#
# floating-point operations. At the very least it must read $A$ and $B$ and write $C$,
# which moves
#
# $$Q_{\min} = (MK + KN + MN)\, s \qquad (3.3)$$
#
# bytes of memory traffic for $s$-byte elements. The ratio is the *arithmetic intensity*
#
# $$I = F / Q \quad \text{(FLOP per byte)}. \qquad (3.4)$$
#
# Using $Q_{\min}$ gives the best intensity an algorithm could have. A real kernel moves
# more bytes. If each program reads its own panels of $A$ and $B$ from memory, with no
# sharing through the cache, then $A$ is read once for each of the $\lceil N/b_N \rceil$
# column blocks and $B$ once for each of the $\lceil M/b_M \rceil$ row blocks:
#
# $$Q_{\text{tiled}} = \left(MK \left\lceil \tfrac{N}{b_N} \right\rceil + KN \left\lceil \tfrac{M}{b_M} \right\rceil + MN\right) s,
# \qquad I_{\text{tile}} \approx \frac{2\, b_M b_N}{(b_M + b_N)\, s} \qquad (3.5)$$
#
# Bigger tiles give more reuse. The *roofline model* (Williams, Waterman and Patterson,
# 2009) then bounds the speed of any kernel by two ceilings, the peak arithmetic rate
# $\pi$ and the memory bandwidth $\beta$:
#
# $$\text{attainable FLOP/s} = \min(\pi,\; I \cdot \beta) \qquad (3.6)$$
#
# The two ceilings cross at the *ridge point* $I^{*} = \pi / \beta$. A kernel below it is
# memory-bound and one above it is compute-bound. The helpers below implement (3.2) to (3.6).

# %%
#| export lrn_lib.tiling
import math
from dataclasses import dataclass

import torch

from lrn_lib import validate


@dataclass(frozen=True)
class Ceilings:
    """The two ceilings of a roofline: peak FLOP/s and memory bandwidth in bytes/s.

    name: what the figures describe; source: where they come from (datasheet or measured).
    """

    name: str
    peak_flops: float
    bandwidth: float
    source: str

    def __post_init__(self):
        """Raise a clear error for a non-str name or source, or a ceiling that is not a positive number."""
        for field in ("name", "source"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"{field} must be a str, got {type(getattr(self, field)).__name__}")
        validate.number(self.peak_flops, "peak_flops", low=0, low_open=True)
        validate.number(self.bandwidth, "bandwidth", low=0, low_open=True)

    @property
    def ridge(self) -> float:
        """The ridge point pi / beta in FLOP/byte: the intensity where the ceilings cross."""
        return self.peak_flops / self.bandwidth


# NVIDIA H100 SXM5 datasheet: dense BF16 tensor-core peak (no sparsity) and HBM3 bandwidth.
H100_SXM_DATASHEET = Ceilings("H100 SXM (datasheet)", 989e12, 3.35e12,
                              "NVIDIA H100 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3")


def matmul_flops(m: int, n: int, k: int) -> int:
    """Floating-point operations of an (m, k) @ (k, n) product, equation (3.2)."""
    for name, size in (("m", m), ("n", n), ("k", k)):
        validate.integer(size, name, low=1)
    return 2 * m * n * k


def matmul_min_bytes(m: int, n: int, k: int, bytes_per_element: int) -> int:
    """Fewest bytes an (m, k) @ (k, n) product can move: read A and B, write C once, (3.3)."""
    for name, size in (("m", m), ("n", n), ("k", k), ("bytes_per_element", bytes_per_element)):
        validate.integer(size, name, low=1)
    return (m * k + k * n + m * n) * bytes_per_element


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """FLOP per byte of memory traffic, equation (3.4)."""
    validate.number(flops, "flops", low=0)
    validate.number(bytes_moved, "bytes_moved", low=0, low_open=True)
    return flops / bytes_moved


def tiled_traffic_bytes(m: int, n: int, k: int, block_m: int, block_n: int, bytes_per_element: int) -> int:
    """Bytes moved by a tiled matmul whose programs share nothing through a cache, (3.5).

    Each of the ceil(m/block_m) * ceil(n/block_n) programs reads a (block_m, k) panel of A
    and a (k, block_n) panel of B, and writes its (block_m, block_n) tile of C.
    """
    for name, size in (("m", m), ("n", n), ("k", k), ("block_m", block_m), ("block_n", block_n),
                       ("bytes_per_element", bytes_per_element)):
        validate.integer(size, name, low=1)
    row_blocks, col_blocks = math.ceil(m / block_m), math.ceil(n / block_n)
    return (m * k * col_blocks + k * n * row_blocks + m * n) * bytes_per_element


def attainable_flops(intensity: float, ceilings: Ceilings) -> float:
    """The roofline bound min(pi, I * beta) in FLOP/s, equation (3.6)."""
    validate.number(intensity, "intensity", low=0)
    validate.instance(ceilings, "ceilings", Ceilings)
    return min(ceilings.peak_flops, intensity * ceilings.bandwidth)


# %% [markdown]
# The numbers for the three acceptance shapes of this chapter's benchmark, in bfloat16
# (2 bytes), against the H100 SXM datasheet ceilings. These are NVIDIA's published figures,
# not measurements: 989 TFLOP/s dense bfloat16 on the tensor cores and 3.35 TB/s of HBM3.
# For comparison, the same arithmetic for a float32 softmax (about 5 operations per
# element, 8 bytes moved per element) is included.

# %%
from lrn_lib.tiling import (H100_SXM_DATASHEET, arithmetic_intensity, attainable_flops, matmul_flops,
                            matmul_min_bytes, tiled_traffic_bytes)

h100 = H100_SXM_DATASHEET
print(f"{h100.name}: ridge point {h100.ridge:.0f} FLOP/byte")
SHAPES = {"4096^3": (4096, 4096, 4096), "8192^3": (8192, 8192, 8192), "16384x1024x4096": (16384, 1024, 4096)}
for label, (m, n, k) in SHAPES.items():
    intensity = arithmetic_intensity(matmul_flops(m, n, k), matmul_min_bytes(m, n, k, 2))
    bound = attainable_flops(intensity, h100)
    print(f"matmul {label:16s} I = {intensity:6.0f} FLOP/B  -> bound {bound / 1e12:4.0f} TFLOP/s "
          f"({'compute' if intensity > h100.ridge else 'memory'}-bound)")
softmax_intensity = arithmetic_intensity(5, 8)
print(f"softmax float32         I = {softmax_intensity:6.3f} FLOP/B -> bound "
      f"{attainable_flops(softmax_intensity, h100) / 1e12:4.1f} TFLOP/s (memory-bound)")

# %% [markdown]
# A large matmul sits far to the right of the ridge point, and softmax sits far to the
# left. That holds only if the matmul actually achieves intensity close to $F/Q_{\min}$.
# Equation (3.5) says what happens when each program loads its panels from HBM on its own:

# %%
m = n = k = 8192
print(f"8192^3 bfloat16, minimum traffic: {matmul_min_bytes(m, n, k, 2) / 1e9:6.2f} GB")
for block_m, block_n in [(16, 16), (64, 64), (128, 128), (128, 256)]:
    q = tiled_traffic_bytes(m, n, k, block_m, block_n, 2)
    intensity = arithmetic_intensity(matmul_flops(m, n, k), q)
    print(f"tiles {block_m:3d} x {block_n:3d}: {q / 1e9:6.2f} GB, I = {intensity:4.0f} FLOP/B, "
          f"above the ridge ({h100.ridge:.0f}): {intensity > h100.ridge}")

# %% [markdown]
# Even 128 x 256 tiles leave the kernel below the ridge if every panel comes from HBM,
# since (3.5) gives $2 \cdot 128 \cdot 256 / (384 \cdot 2) \approx 85$ FLOP/byte. Tiles
# cannot grow much further: the accumulator alone takes 128 KB of registers at 128 x 256,
# and the input slices need shared memory, times the number of pipeline stages. The rest
# of the reuse has to come from the 50 MB L2 cache, which is shared by all programs. When
# programs that run at the same time read the *same* panels, only the first read goes to
# HBM. Section 3.5 arranges the order of the programs so that this happens.
#
# ## 3.3 A tiled matmul in plain PyTorch
#
# Equation (3.1) translates directly into loops over tiles. Slicing with `a[i:i + b]`
# quietly shortens the last block, so the PyTorch version needs no special edge handling,
# while the Triton kernel will need masks. Products accumulate in float32, or in float64
# for float64 input, and the result comes back in the input's dtype, as in
# `torch.matmul`. The operand checks sit in a separate function that the Triton launcher
# reuses; it lives in `kernels.matmul`, so that the kernels package depends on nothing
# above it.

# %%
#| export kernels.matmul
import torch

from lrn_lib import validate

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matmul_operands(a: torch.Tensor, b: torch.Tensor, dtypes=FLOAT_DTYPES) -> tuple[int, int, int]:
    """Validate the operands of a @ b and return (M, N, K).

    a: (M, K), b: (K, N), both non-empty 2-D tensors of one dtype from ``dtypes`` on one
    device. Raises TypeError (not a tensor, wrong dtype) or ValueError (not 2-D, empty,
    inner dimensions or devices differ); each message names the argument.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {x.dtype}; matmul takes {names}")
        if x.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; matmul needs a 2-D matrix")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); matmul needs non-empty matrices")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype} but a has {a.dtype}; they must match")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}; they must share a device")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a has {a.shape[1]} columns but b has {b.shape[0]} rows")
    return a.shape[0], b.shape[1], a.shape[1]


# %%
#| export lrn_lib.tiling
from kernels.matmul import check_matmul_operands


def tiled_matmul(a: torch.Tensor, b: torch.Tensor, block_m: int = 32, block_n: int = 32,
                 block_k: int = 32) -> torch.Tensor:
    """a @ b computed tile by tile, equation (3.1): the reference the Triton kernel follows.

    a: (M, K), b: (K, N), floating. Each (block_m, block_n) tile of C is a float32 (float64
    for float64 input) sum over K of block products. Returns (M, N) in a's dtype.
    """
    m, n, k = check_matmul_operands(a, b)
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        validate.integer(value, name, low=1)
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    for i in range(0, m, block_m):                 # one iteration = one program of the kernel
        for j in range(0, n, block_n):
            acc = torch.zeros((min(block_m, m - i), min(block_n, n - j)), dtype=acc_dtype, device=a.device)
            for p in range(0, k, block_k):         # the K loop of (3.1)
                acc += a[i:i + block_m, p:p + block_k].to(acc_dtype) @ b[p:p + block_k, j:j + block_n].to(acc_dtype)
            c[i:i + block_m, j:j + block_n] = acc.to(a.dtype)
    return c


# %%
from lrn_lib.tiling import tiled_matmul

UNIT_ROUNDOFF = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}


def close_to_float64(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    """|c - a @ b| <= u |a @ b| + atol sqrt(K) + 16 u32 K entrywise, the reference in float64.

    u (the output format's unit roundoff) covers the final rounding; the other two terms
    cover the rounding of a float32 sum of K terms of size about 1 (u32 = 2**-24).
    """
    k = a.shape[1]
    ref = a.double() @ b.double()
    bound = UNIT_ROUNDOFF[c.dtype] * ref.abs() + atol * math.sqrt(k) + 16 * 2**-24 * k
    return bool(((c.double() - ref).abs() <= bound).all())


for (m, n, k), dtype in [((1, 1, 1), torch.float64), ((17, 1000, 33), torch.float64),
                         ((100, 17, 1000), torch.float32), ((64, 48, 80), torch.bfloat16),
                         ((1000, 17, 1), torch.bfloat16)]:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    atol = 1e-13 if dtype == torch.float64 else 1e-5
    print(f"M, N, K = {m:4d}, {n:4d}, {k:4d}  {str(dtype):15s} close to float64: "
          f"{close_to_float64(tiled_matmul(a, b), a, b, atol)}")

# %% [markdown]
# The bound has two parts. The last step rounds each entry to the output format, which
# moves it by at most the *unit roundoff* $u$ times its size: $u = 2^{-8}$ for
# bfloat16's 8 significant bits, $2^{-11}$ for float16, $2^{-24}$ for float32. Before
# that, the float32 sum of $K$ terms carries its own rounding. The $k$-th addition errs by
# up to $u_{32} = 2^{-24}$ times a partial sum of size about $\sqrt{k}$, and these errors
# add up randomly to about $u_{32} K / \sqrt{2}$. The bound allows $16\, u_{32} K$, plus
# `atol`$\sqrt{K}$ for small $K$. Products of two bfloat16 or float16 numbers are exact in
# float32, so nothing else is lost. (Our first GPU run used only the $\sqrt{K}$ term. It
# failed float16 and float32 at $K = 4096$ and passed bfloat16, whose own rounding hides
# the sum's error.)
#
# ## 3.4 A Triton matmul kernel
#
# The kernel is the innermost body of `tiled_matmul`, run by many programs at once. One
# program owns one `BLOCK_M x BLOCK_N` tile of C:
#
# 1. **Which tile.** The program id is turned into a tile position (`pid_m`, `pid_n`).
#    The order of that mapping decides cache reuse (section 3.5).
# 2. **Pointers to the first K slice.** `rows` and `cols` are the tile's global row and
#    column indices. For loading they are wrapped with `% M` and `% N`, so rows past the
#    matrix edge read valid memory (row 0 again) instead of going out of bounds. Their
#    results land in rows of C that are never stored. This keeps the loads free of row
#    and column masks.
# 3. **The K loop** of (3.1). Load a `BLOCK_M x BLOCK_K` slice of A and a
#    `BLOCK_K x BLOCK_N` slice of B, multiply them with `tl.dot` (tensor cores on a GPU)
#    into a float32 accumulator, and move both pointers `BLOCK_K` along K. When K is not a
#    multiple of `BLOCK_K`, the last slice is masked, with zeros loaded past the end,
#    which adds nothing to the sum. `EVEN_K`, computed by `triton.heuristics` from the
#    actual K and `BLOCK_K`, compiles the mask out when it cannot be needed.
# 4. **Store** the tile once, rounded to the output dtype, under the mask `rows < M` and
#    `cols < N`.
#
# All strides are arguments, so transposed or sliced (non-contiguous) inputs are read in
# place with no copy.
#
# Two points about precision. **float32 inputs**: on NVIDIA GPUs since Ampere, Triton's
# `tl.dot` defaults to TF32 for float32 operands, meaning inputs rounded to 10 mantissa
# bits before the tensor-core product (relative error around $10^{-3}$). `torch.matmul` does
# *not* use TF32 by default (`torch.backends.cuda.matmul.allow_tf32` is `False`). The
# launcher therefore follows PyTorch's setting and passes `input_precision="ieee"` (true
# float32) or `"tf32"` explicitly. **bfloat16 under the interpreter**: Triton 3.6's CPU
# interpreter returns garbage from `tl.dot` on bfloat16 blocks. We found this with this
# chapter's tests, and the error was about $10^{10}$. Under the interpreter only, the
# kernel therefore widens bfloat16 slices to float32 before the dot (`WIDEN_BF16`). This
# changes no result: a product of two bfloat16 numbers (8-bit significands) fits exactly in
# float32, and the sum is in float32 either way. The same interpreter also *truncates*
# when it converts float32 to bfloat16, where the GPU rounds to nearest. Under the
# interpreter only, bfloat16 results are therefore stored in a float32 buffer and rounded
# by PyTorch. The interpreter then gives the answers the compiled kernel gives.

# %%
#| export kernels.matmul
import torch

from kernels import runtime
from kernels.runtime import check_launchable, tl, triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def grouped_program_id(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a program id to its tile (pid_m, pid_n), going down GROUP_M tile rows at a time.

    Within a group of GROUP_M tile rows, consecutive programs walk down a column, so the
    programs running together share B column panels and a few A row panels (section 3.5).
    GROUP_M = 1 is plain row-major order. Same formulas as lrn_lib.tiling.program_order.
    """
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)   # the last group may be short
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  WIDEN_BF16: tl.constexpr):
    """C = A @ B, one (BLOCK_M, BLOCK_N) tile of C per program, float32 accumulation (3.1).

    A: (M, K), B: (K, N), C: (M, N), any strides. Grid: ceil(M/BLOCK_M) * ceil(N/BLOCK_N).
    """
    pid_m, pid_n = grouped_program_id(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak   # wrapped: in bounds
    b_ptrs = b_ptr + ks[:, None] * stride_bk + (cols % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):                                  # the sum over P in (3.1)
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - step * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if WIDEN_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)               # A[I,P] B[P,J]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# %% [markdown]
# ## 3.5 Program order and the L2 cache
#
# Programs are launched in order of id, and the GPU runs about one *wave* of them at a
# time (132 streaming multiprocessors on an H100 SXM, one big-tile program on each). In
# plain row-major order, a wave covers a few whole tile rows of C. It reads those few A
# panels and *every* B panel. `grouped_program_id` walks instead down columns inside
# bands of `GROUP_M` tile rows. A wave then covers a squarer patch of C, and it reads
# `GROUP_M` A panels and only as many B panels as it has columns. The same mapping in plain
# Python lets us draw it and count panels:

# %%
#| export lrn_lib.tiling
def program_order(pid: int, num_pid_m: int, num_pid_n: int, group_m: int) -> tuple[int, int]:
    """The tile (pid_m, pid_n) that program ``pid`` computes under grouped ordering.

    Python twin of kernels.matmul.grouped_program_id; group_m = 1 is row-major order.
    """
    for name, value in (("num_pid_m", num_pid_m), ("num_pid_n", num_pid_n), ("group_m", group_m)):
        validate.integer(value, name, low=1)
    validate.integer(pid, "pid", low=0, high=num_pid_m * num_pid_n - 1)
    per_group = group_m * num_pid_n
    first_m = (pid // per_group) * group_m
    rows_in_group = min(num_pid_m - first_m, group_m)
    return first_m + (pid % per_group) % rows_in_group, (pid % per_group) // rows_in_group


def wave_panels(programs: int, num_pid_m: int, num_pid_n: int, group_m: int) -> tuple[int, int]:
    """(A row panels, B column panels) read by programs 0 .. programs-1 together.

    When those programs run at once and share the L2 cache, these are the panels that
    must come from HBM: the wave's traffic is (a_panels * BLOCK_M + b_panels * BLOCK_N) * K
    elements.
    """
    for name, value in (("programs", programs), ("num_pid_m", num_pid_m), ("num_pid_n", num_pid_n),
                        ("group_m", group_m)):
        validate.integer(value, name, low=1)
    tiles = [program_order(p, num_pid_m, num_pid_n, group_m)
             for p in range(min(programs, num_pid_m * num_pid_n))]
    return len({t[0] for t in tiles}), len({t[1] for t in tiles})


# %% [markdown]
# The first figure shows what one program reads (the drawn case is M = 10, N = 12,
# K = 9 with 2 x 3 x 3 blocks, and the program computing tile (3, 2)). The second shows
# the launch order of the tiles of C, with the first "wave" of 16 programs shaded, in
# row-major order and with `GROUP_M = 4`.

# %%
from lrn_lib.tiling import program_order, wave_panels


def draw_tiles(ax, rows, cols, bm, bn, title, highlight=(), dark=(), color="C0"):
    """A rows x cols matrix cut into bm x bn blocks; highlight/dark: sets of (block row, block col)."""
    for i in range(math.ceil(rows / bm)):
        for j in range(math.ceil(cols / bn)):
            h, w = min(bm, rows - i * bm), min(bn, cols - j * bn)
            alpha = 0.85 if (i, j) in dark else 0.35 if (i, j) in highlight else 0.0
            ax.add_patch(Rectangle((j * bn, i * bm), w, h, facecolor=color, alpha=alpha, edgecolor="none"))
            ax.add_patch(Rectangle((j * bn, i * bm), w, h, fill=False, edgecolor="0.4", lw=0.8))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


M_, N_, K_, bm, bn, bk, ti, tj, step = 10, 12, 9, 2, 3, 3, 3, 2, 1
fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"width_ratios": [K_, N_, N_]})
draw_tiles(axes[0], M_, K_, bm, bk, f"A ({M_} x {K_}): row panel {ti}",
           {(ti, p) for p in range(3)}, {(ti, step)}, "C0")
draw_tiles(axes[1], K_, N_, bk, bn, f"B ({K_} x {N_}): column panel {tj}",
           {(p, tj) for p in range(3)}, {(step, tj)}, "C1")
draw_tiles(axes[2], M_, N_, bm, bn, f"C ({M_} x {N_}): tile ({ti}, {tj}), float32 acc",
           set(), {(ti, tj)}, "C2")
fig.suptitle(f"One program: C[{ti},{tj}] = sum over P of A[{ti},P] B[P,{tj}]; dark = the K step P = {step} "
             "on chip now", fontsize=10)
plt.show()

grid_m, grid_n, wave = 8, 8, 16
fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
for ax, group_m in zip(axes, (1, 4)):
    order = torch.zeros(grid_m, grid_n, dtype=torch.long)
    for pid in range(grid_m * grid_n):
        order[program_order(pid, grid_m, grid_n, group_m)] = pid
    ax.imshow(order < wave, cmap="Blues", vmin=0, vmax=1.6)
    for (i, j), pid in zip(torch.cartesian_prod(torch.arange(grid_m), torch.arange(grid_n)).tolist(),
                           order.flatten().tolist()):
        ax.text(j, i, pid, ha="center", va="center", fontsize=8)
    a_panels, b_panels = wave_panels(wave, grid_m, grid_n, group_m)
    ax.set_title(f"GROUP_M = {group_m}: first {wave} programs read\n{a_panels} A panels + {b_panels} B panels",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# With square tiles, row-major order makes the first wave read 2 + 8 = 10 panels, while
# `GROUP_M = 4` reads 4 + 4 = 8 for the same 16 tiles of output. The same count for the
# real case, an 8192^3 bfloat16 matmul with 128 x 256 tiles and one wave of 132 programs,
# gives the wave's arithmetic intensity against HBM when its panel reads are shared
# through L2:

# %%
m = n = k = 8192
block_m, block_n, programs = 128, 256, 132
grid_m, grid_n = math.ceil(m / block_m), math.ceil(n / block_n)
for group_m in (1, 8):
    a_panels, b_panels = wave_panels(programs, grid_m, grid_n, group_m)
    wave_bytes = (a_panels * block_m + b_panels * block_n) * k * 2
    wave_intensity = arithmetic_intensity(programs * matmul_flops(block_m, block_n, k), wave_bytes)
    print(f"GROUP_M = {group_m}: one wave reads {a_panels:2d} A + {b_panels:2d} B panels = "
          f"{wave_bytes / 1e6:5.1f} MB, I = {wave_intensity:4.0f} FLOP/B")

# %% [markdown]
# Grouping cuts a wave's HBM traffic by about 40%. Both orders land above the ridge point
# (295 FLOP/byte) under this idealised model, so the gain on a GPU should be modest.
# Section 3.7 measures it. The model assumes that a panel, once read, stays in L2 until
# the whole wave has used it. A wave's panels (88 to 145 MB here) do not fit in the 50 MB
# cache. What saves the model is that the programs of a wave move along K at roughly the
# same pace, so only the current K slices of the panels need to be cached at once. How
# well that holds is a property of the hardware and the scheduling, and only a
# measurement can tell.
#
# ## 3.6 The launcher: sizes, autotuning and checks
#
# Block sizes are compile-time constants, and the best ones depend on the GPU, the dtype
# and the shape. Compiled on CUDA, `matmul_kernel` is wrapped in `triton.autotune`. The
# first call for each (M, N, K, dtype) times a handful of configurations and remembers
# the fastest. The candidates are configurations that did well on an H100 in
# `benchmarks/sweep_matmul.py`: 128 x 256 and 128 x 128 tiles for large problems, and
# narrower ones for small ones. `num_stages` is how many K slices are in flight at once
# (the software pipeline that hides memory latency behind the tensor cores), and
# `num_warps` is the number of warps of 32 threads per program. Configurations whose
# pipeline would not fit in shared memory (float32 inputs take twice the bytes) are
# pruned before timing. Under the interpreter, autotuning would time every configuration
# by running it in NumPy, so the launcher uses one small fixed configuration there.
# `matmul(..., config=...)` runs a fixed configuration on any device, which is how
# section 3.7 compares `GROUP_M` values.

# %%
#| export kernels.matmul
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
SHARED_MEMORY_BUDGET = 220 * 1024  # bytes of shared memory per program on an H100 (228 KB, minus slack)
MAX_OFFSET = 2**31 - 1              # the kernel's pointer offsets are 32-bit


def hopper_configs() -> list:
    """The autotuning candidates: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)."""
    table = [(128, 256, 64, 8, 4, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 4, 8),
             (128, 128, 64, 8, 5, 4), (64, 256, 32, 8, 4, 4), (128, 64, 64, 8, 4, 4),
             (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
                          num_stages=stages, num_warps=warps) for bm, bn, bk, g, stages, warps in table]


def pipeline_bytes(block_m: int, block_n: int, block_k: int, num_stages: int, element_size: int) -> int:
    """Shared memory for num_stages in-flight (block_m, block_k) and (block_k, block_n) slices."""
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                        ("num_stages", num_stages), ("element_size", element_size)):
        validate.integer(value, name, low=1)
    return num_stages * (block_m * block_k + block_k * block_n) * element_size


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop autotuning configs whose pipeline does not fit in shared memory for this dtype."""
    validate.nonempty(configs, "configs")
    if not isinstance(named_args, dict) or not isinstance(named_args.get("a_ptr"), torch.Tensor):
        raise TypeError("named_args must be a dict holding the kernel's tensor argument 'a_ptr'")
    size = named_args["a_ptr"].element_size()
    kept = [c for c in configs if pipeline_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                 c.num_stages, size) <= SHARED_MEMORY_BUDGET]
    return kept or configs[-1:]


if runtime.MODE == "compiled":
    matmul_kernel_autotuned = triton.autotune(configs=hopper_configs(), key=["M", "N", "K"],
                                              prune_configs_by={"early_config_prune": prune_configs})(matmul_kernel)
else:
    matmul_kernel_autotuned = None


def _max_offset(x: torch.Tensor) -> int:
    """The largest element offset a kernel computes for x: sum of (size - 1) * stride."""
    return sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))


def check_matmul_config(config: dict) -> dict:
    """Validate a fixed kernel configuration and return it as a new dict.

    Required: BLOCK_M, BLOCK_N, BLOCK_K (powers of two from 16 to 256, the sizes tl.dot
    takes) and GROUP_M (a positive int); optional: num_warps (1, 2, 4, 8, 16 or 32) and
    num_stages (a positive int). Anything else raises ValueError or TypeError naming it.
    """
    validate.instance(config, "config", dict)
    required = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    missing, unknown = required - set(config), set(config) - required - {"num_warps", "num_stages"}
    if missing or unknown:
        raise ValueError(f"config lacks {sorted(missing)} / has unknown keys {sorted(unknown)}")
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"config[{key!r}] = {value!r}; it must be an int")
        if key.startswith("BLOCK") and not (16 <= value <= 256 and value & (value - 1) == 0):
            raise ValueError(f"config[{key!r}] = {value}; blocks are powers of two from 16 to 256")
        if key == "num_warps" and value not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"config['num_warps'] = {value}; it must be 1, 2, 4, 8, 16 or 32")
        if key in ("GROUP_M", "num_stages") and value < 1:
            raise ValueError(f"config[{key!r}] = {value}; it must be at least 1")
    return dict(config)


# %% [markdown]
# ### Shapes the autotuner serves badly: a heuristic and split-K
#
# The candidates above are tiles for large products. Three kinds of shape fall outside
# them. *Skinny* products, $M \le 128$ rows against a large weight (a decoding step, a
# small batch), fill a 128 x 256 tile with mostly padding. They are also memory-bound: each
# weight is used $M$ times, so the time is the time to read $B$ once. Their tile has
# to be short in $M$ ($b_M$ = $M$ rounded up to a power of two, at least 16 for `tl.dot`)
# and long in $K$ (128 columns per step, several steps in flight). Then there are too few
# tiles. At $M = 64$, $N = 8192$ and $b_N = 128$ there are $T = 64$ tiles of $C$, and an
# H100 or H200 has $P = 132$ multiprocessors: half the chip would idle, and half its
# bandwidth with it.
#
# *Split-K* gives the idle multiprocessors work. $S$ programs share one tile of $C$, each
# summing the products of one range of $K$ (3.1 splits the sum over $P$ the same way),
# and a second short pass adds the $S$ float32 partials and rounds once. Counting
# $k_b = \lceil K / b_K \rceil$ block steps per tile, the busiest multiprocessor runs
#
# $$W(S) = \left\lceil \frac{T S}{P} \right\rceil \left\lceil \frac{k_b}{S} \right\rceil \quad \text{block steps},
# \qquad \text{pays when } T < P \qquad (3.7)$$
#
# With $T < P$, $W(1) = k_b$ while $W(S) \approx k_b / S$ as long as $TS \le P$: up to
# $P / T$ times less time on the busiest multiprocessor. With $T \ge P$ every
# multiprocessor already has a tile; a split could only even out the last partial wave,
# and never by more than a factor $\lceil T/P \rceil / (T/P)$, so the launcher keeps
# $S = 1$ there. The price is the partials, $S \cdot M N$ float32 numbers written and read
# once, small next to $B$ when $M$ is small. For $T < P$ the launcher takes the smallest
# $S$ that minimises (3.7), with at least 4 block steps per range.
#
# (3.7) counts block steps, the picture of a compute-bound product. A skinny product is
# memory-bound, and there the question is whether the busy multiprocessors already pull
# the full bandwidth. On an H200 (sweep of 2026-12-03 in `benchmarks/results/`, script
# `benchmarks/sweep_matmul_odd.py`), 64 programs of 16 x 128 x 128 tiles with 5 stages
# read the 8192 x 8192 weight at 0.99x cuBLAS's speed unsplit, and no split of 2 or 4
# beat S = 1 at M = 16, 64 or 128. So the skinny heuristic applies (3.7) with $P/4$ in
# place of $P$: it splits only when fewer than a quarter of the multiprocessors would
# have a tile (a short $N$, such as 128 x 1024 x 8192).
# Third, sizes that are not multiples of 16 (4097 x 4095 x 4093) leave rows of the
# operands at addresses that are not 16-byte aligned, so the compiler cannot prove any
# load wider than one element and loses its wide, asynchronous copies. For a large
# product the launcher copies the operands once into zero-padded buffers whose sizes and
# row strides are multiples of 64, runs the autotuned kernel on those and returns the
# $M \times N$ corner. The copy moves each input twice, a few percent of a large product's
# time.

# %%
#| export kernels.matmul
SKINNY_M = 128          # at most this many rows: the skinny heuristic instead of autotuning
PAD_MULTIPLE = 64       # padded sizes and row strides for unaligned operands
PAD_MIN_FLOPS = 2**33   # pad only products at least this large (the copy must be amortised)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def matmul_split_k_kernel(a_ptr, b_ptr, part_ptr, M, N, K, K_PER_SPLIT,
                          stride_am, stride_ak, stride_bk, stride_bn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          WIDEN_BF16: tl.constexpr):
    """One range of K of C = A @ B: program (t, s) sums tile t over k in [s K_PER_SPLIT, (s + 1) K_PER_SPLIT).

    A: (M, K), B: (K, N), any strides; part: (S, M, N) float32, contiguous, one slice per
    range. K_PER_SPLIT is a multiple of BLOCK_K. Grid: (ceil(M/BLOCK_M) * ceil(N/BLOCK_N), S).
    """
    pid_m, pid_n = grouped_program_id(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    k_first = split * K_PER_SPLIT
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M)[:, None] * stride_am + (k_first + ks)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_first + ks)[:, None] * stride_bk + (cols % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(tl.minimum(K - k_first, K_PER_SPLIT), BLOCK_K)):   # this range's steps
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k_first - step * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if WIDEN_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    part_ptrs = part_ptr + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(part_ptrs, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def split_k_sum_kernel(part_ptr, c_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """C = part[0] + ... + part[S - 1] in float32, rounded once to C's dtype.

    part: (S, M, N) float32 and C: (M, N), both contiguous, seen flat (MN = M * N elements).
    Grid: ceil(MN / BLOCK).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def split_k_count(tiles: int, k_blocks: int, multiprocessors: int, min_blocks: int = 4, most: int = 16) -> int:
    """S minimising (3.7), W(S) = ceil(T S / P) ceil(k_blocks / S); the smallest such S.

    tiles: T, output tiles; k_blocks: block steps along K per tile; multiprocessors: P.
    Each range keeps at least min_blocks steps, and S <= most. Returns 1 when T >= P.
    """
    for name, value in (("tiles", tiles), ("k_blocks", k_blocks), ("multiprocessors", multiprocessors),
                        ("min_blocks", min_blocks), ("most", most)):
        validate.integer(value, name, low=1)
    if tiles >= multiprocessors:
        return 1
    best, best_work = 1, k_blocks * -(-tiles // multiprocessors)
    for s in range(2, min(most, k_blocks // min_blocks) + 1):
        work = -(-tiles * s // multiprocessors) * -(-k_blocks // s)
        if work < best_work:
            best, best_work = s, work
    return best


def skinny_config(m: int, n: int, k: int, element_size: int, multiprocessors: int) -> tuple[dict, int]:
    """(config, S) for a product of m <= SKINNY_M rows: a short, K-long tile and the split of (3.7).

    BLOCK_M is m rounded up to a power of two, at least 16. Tiles from the H200 sweep
    (benchmarks/sweep_matmul_odd.py): 16 or 32 x 128 x 128 with 5 stages, 64 x 256 x 64 with
    5 stages, 128 x 64 x 128 with 4 stages; 4 warps; BLOCK_K halved for float32 (twice the
    bytes per slice). S from (3.7) with P / 4 in place of P: a memory-bound product
    saturates HBM with about a quarter of the multiprocessors streaming B.
    """
    for name, value in (("m", m), ("n", n), ("k", k), ("element_size", element_size),
                        ("multiprocessors", multiprocessors)):
        validate.integer(value, name, low=1)
    if m > SKINNY_M:
        raise ValueError(f"m = {m}: the skinny configuration is for at most {SKINNY_M} rows")
    block_m = max(16, 1 << (m - 1).bit_length())
    block_n, block_k, stages = {16: (128, 128, 5), 32: (128, 128, 5), 64: (256, 64, 5), 128: (64, 128, 4)}[block_m]
    if element_size >= 4:
        block_k //= 2
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
              "num_stages": stages, "num_warps": 4}
    if pipeline_bytes(block_m, block_n, block_k, stages, element_size) > SHARED_MEMORY_BUDGET:
        config["num_stages"] = 3
    tiles = -(-m // block_m) * -(-n // block_n)
    return config, split_k_count(tiles, -(-k // block_k), max(1, multiprocessors // 4))


def needs_padding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a (M, K) @ b (K, N) leaves the compiler only one-element loads (pad them first).

    True when K, N or a stride other than 1 (of a dimension longer than 1) is not a multiple of
    16 elements, or a data pointer is not 16-byte aligned.
    """
    check_matmul_operands(a, b, SUPPORTED_DTYPES)
    return _unaligned(a, b)


def _unaligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """needs_padding without its checks, for operands the launcher has checked."""
    sizes = [a.shape[1], b.shape[1]] + [stride for x in (a, b) for size, stride in zip(x.shape, x.stride())
                                        if size > 1 and stride != 1]
    return any(s % 16 for s in sizes) or any(x.data_ptr() % 16 for x in (a, b))


def padded_copy(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x (r, c) copied into the top-left corner of a contiguous (rows, cols) buffer of zeros."""
    validate.tensor(x, "x", dims=2)
    validate.integer(rows, "rows", low=x.shape[0])
    validate.integer(cols, "cols", low=x.shape[1])
    return _zero_padded(x, rows, cols)


def _zero_padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """padded_copy without its checks, for a matrix and sizes the launcher has checked."""
    out = x.new_empty((rows, cols))
    out[: x.shape[0], : x.shape[1]] = x
    out[x.shape[0]:].zero_()
    out[: x.shape[0], x.shape[1]:].zero_()
    return out


def _launch_options(config: dict) -> tuple[dict, dict]:
    """A configuration split into the kernel's block constexprs and Triton's launch options."""
    blocks = {key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    return blocks, {key: value for key, value in config.items() if key not in blocks}


def _split_k_launch(a, b, c, config, split_k, options):
    """Run the split-K kernel and the sum into c once; return f(a, b, c) that repeats both for this layout."""
    m, k = a.shape
    n = b.shape[1]
    k_blocks = triton.cdiv(k, config["BLOCK_K"])
    per_split = triton.cdiv(k_blocks, split_k) * config["BLOCK_K"]
    split_k = triton.cdiv(k, per_split)               # no empty ranges
    blocks, launch_options = _launch_options(config)
    constexprs = {**blocks, "EVEN_K": k % blocks["BLOCK_K"] == 0, **options}
    sizes = (m, n, k, per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), split_k)
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)
    partial = runtime.launch_and_keep(matmul_split_k_kernel, grid, (a, b, part, *sizes), constexprs, launch_options)
    sums = {"SPLIT_K": split_k, "BLOCK": 1024}
    total = runtime.launch_and_keep(split_k_sum_kernel, (triton.cdiv(m * n, 1024),), (part, c, m * n), sums)

    def launch(a, b, c):
        part = torch.empty((split_k, m, n), dtype=torch.float32, device=c.device)
        partial(a, b, part, *sizes)
        total(part, c, m * n)
    return launch


# %% [markdown]
# The launcher picks among the three: the skinny heuristic for $M \le 128$, padding for a
# large unaligned product, the autotuner for the rest. `split_k=S` forces a split on any
# device, which is how the interpreter tests the split-K kernels at tiny sizes.
#
# The choice depends only on the *layout* of the operands (shapes, strides, 16-byte
# alignment, dtype, device) and the options, so the launcher makes it once per layout. The
# first call checks what the layout alone decides (32-bit offsets, a device the kernels run
# on), chooses the route, runs it and keeps it as a *launch plan*; a later call of that
# layout checks its arguments and runs the plan. Section 3.7 measures why that matters.

# %%
#| export kernels.matmul
SPLIT_K_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_stages": 4, "num_warps": 4}
MAX_SPLIT_K = 64


def matmul(a: torch.Tensor, b: torch.Tensor, *, allow_tf32: bool | None = None,
           config: dict | None = None, split_k: int | None = None) -> torch.Tensor:
    """a @ b with the Triton kernel: float32 accumulation, output in the inputs' dtype.

    a: (M, K), b: (K, N): float16, bfloat16 or float32, one dtype, on CUDA (or on the CPU
    under Triton's interpreter); any strides. allow_tf32: for float32 inputs, use TF32
    tensor cores; None follows torch.backends.cuda.matmul.allow_tf32 (False by default,
    like torch.matmul). config: a fixed {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} plus
    optional "num_warps", "num_stages"; None chooses when compiled (skinny_config for
    M <= SKINNY_M, zero-padded operands for a large product that needs_padding, else
    autotuning). split_k: None chooses (S of skinny_config, else 1); an int from 1 to
    MAX_SPLIT_K sums S ranges of K in the split-K kernel, then adds them. Returns (M, N),
    a column slice of a padded buffer when N had to be padded. The first call for a layout
    (shapes, strides, 16-byte alignment, dtype, device) and options makes its launch plan,
    which later calls run after checking their arguments (see clear_launch_plans).
    """
    check_matmul_operands(a, b, SUPPORTED_DTYPES)
    if config is not None:
        config = check_matmul_config(config)
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    elif not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    if split_k is not None:
        validate.integer(split_k, "split_k", low=1, high=MAX_SPLIT_K)
    return _planned(a, b, allow_tf32, config, split_k)


PLAN_CACHE_SIZE = 4096  # launch plans kept (one per layout and options); the oldest goes first
_plans = runtime.LaunchPlans(PLAN_CACHE_SIZE)


def clear_launch_plans() -> int:
    """Forget matmul's launch plans, so that each layout's next call decides afresh; return how many there were.

    Needed only after changing what a plan fixed but its key does not hold: Triton's debug or
    instrumentation settings, or the autotuner's cache.
    """
    count = len(_plans)
    _plans.clear()
    return count


def _planned(a, b, allow_tf32, config, split_k):
    """a @ b for checked operands, through the plan of their layout (made and run on a first call)."""
    key = runtime.layout_key(a, b) + (allow_tf32, None if config is None else tuple(config.items()), split_k)
    plan = _plans.get(key)
    if plan is not None:
        return plan(a, b)
    plan, c = _make_plan(a, b, allow_tf32, config, split_k)
    _plans.keep(key, plan)
    return c


def _make_plan(a, b, allow_tf32, config, split_k):
    """Check what the layout allows, choose the route and run it once; return (plan, a @ b)."""
    m, k = a.shape
    n = b.shape[1]
    check_launchable("a", a)
    for name, x in (("a", a), ("b", b)):
        if _max_offset(x) > MAX_OFFSET:
            raise ValueError(f"{name} spans more than 2**31 elements; the kernel's offsets are 32-bit")
    if m * n > MAX_OFFSET:
        raise ValueError(f"the output would have {m * n} elements, more than the kernel's 2**31 limit")
    interpreted = runtime.MODE == "interpreted"
    choose = config is None and not interpreted
    if choose and m <= SKINNY_M:
        config, chosen = skinny_config(m, n, k, a.element_size(), runtime.multiprocessors(a.device))
        split_k = chosen if split_k is None else split_k
    elif choose and split_k is None and 2 * m * n * k >= PAD_MIN_FLOPS and _unaligned(a, b):
        k_pad, n_pad = (triton.cdiv(size, PAD_MULTIPLE) * PAD_MULTIPLE for size in (k, n))

        def padded(a, b):
            return _planned(_zero_padded(a, m, k_pad), _zero_padded(b, k_pad, n_pad), allow_tf32, None, None)[:, :n]
        return padded, padded(a, b)
    if config is None and (interpreted or split_k is not None):
        config = INTERPRETER_CONFIG if interpreted else SPLIT_K_CONFIG
    split_k = min(split_k or 1, max(1, MAX_OFFSET // (m * n)))   # the partials' offsets are 32-bit too
    # Triton 3.6's interpreter truncates float32 -> bfloat16; let torch round instead.
    round_in_torch = interpreted and a.dtype == torch.bfloat16
    out_dtype, device = torch.float32 if round_in_torch else a.dtype, a.device
    options = {"INPUT_PRECISION": "tf32" if allow_tf32 and a.dtype == torch.float32 else "ieee",
               "WIDEN_BF16": round_in_torch}
    c = torch.empty((m, n), dtype=out_dtype, device=device)
    if split_k > 1:
        launch = _split_k_launch(a, b, c, config, split_k, options)
    else:
        launch = _single_launch(a, b, c, config, options)

    def plan(a, b):
        c = torch.empty((m, n), dtype=out_dtype, device=device)
        launch(a, b, c)
        return c.to(a.dtype) if round_in_torch else c
    return plan, c.to(a.dtype) if round_in_torch else c


def _single_launch(a, b, c, config, options):
    """Run matmul_kernel once into c (autotuned when config is None); return f(a, b, c) that repeats it."""
    m, k = a.shape
    n = b.shape[1]
    sizes = (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    compiled = None
    if config is None:   # the autotuner times its candidates once per (M, N, K, dtype); keep its choice

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        compiled = matmul_kernel_autotuned[grid](a, b, c, *sizes, **options)
        config = matmul_kernel_autotuned.best_config.all_kwargs()
    blocks, launch_options = _launch_options(config)
    constexprs = {**blocks, "EVEN_K": k % blocks["BLOCK_K"] == 0, **options}
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    if compiled is None:
        launch = runtime.launch_and_keep(matmul_kernel, grid, (a, b, c, *sizes), constexprs, launch_options)
    else:
        launch = runtime.relauncher(matmul_kernel, grid, compiled, constexprs, launch_options)
    return lambda a, b, c: launch(a, b, c, *sizes)


# %% [markdown]
# The kernel is now checked against float64 on fresh random inputs, with the same bound
# as the PyTorch reference. The shapes include dimensions of 1, 17 and 1000, sizes that are
# not multiples of any block, and a transposed and a sliced operand. float32 agrees to
# float32 rounding: under the interpreter `tl.dot` is NumPy's float32 product, and
# compiled, the launcher asks for IEEE float32.

# %%
from kernels.matmul import matmul

shapes = config.pick(cpu=[(1, 1, 1), (17, 1000, 33), (1000, 17, 1), (1, 17, 1000), (100, 77, 300)],
                     gpu=[(1, 1, 1), (17, 1000, 33), (1000, 17, 1), (1, 17, 1000), (4097, 1000, 4095),
                          (4096, 4096, 4096)])


def report_closeness(m: int, n: int, k: int, dtype: torch.dtype, label: str = "", **options) -> None:
    """Multiply fresh random (m, k) and (k, n) operands of dtype and say if it is close to float64."""
    a = torch.randn(m, k, device=config.DEVICE).to(dtype)
    b = torch.randn(k, n, device=config.DEVICE).to(dtype)
    print(f"{label}M, N, K = {m:4d}, {n:4d}, {k:4d}  {str(dtype):15s} close to float64: "
          f"{close_to_float64(matmul(a, b, **options), a, b)}")


if kernels.runtime.MODE != "unavailable":
    for m, n, k in shapes:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            report_closeness(m, n, k, dtype)
else:
    print("(skipped: needs Triton)")

# %%
if kernels.runtime.MODE != "unavailable":
    a = torch.randn(90, 50, device=config.DEVICE).t()            # (50, 90), column-major
    b = torch.randn(90, 130, device=config.DEVICE)[:, ::2]       # (90, 65), every other column
    print("strided a and b are not contiguous:", not a.is_contiguous() and not b.is_contiguous())
    print("transposed and sliced operands, close to float64:", close_to_float64(matmul(a, b), a, b))
    a32, b32 = torch.randn(64, 256, device=config.DEVICE), torch.randn(256, 48, device=config.DEVICE)
    print("float32 with allow_tf32=True, close to float64 with atol = 4e-3:",
          close_to_float64(matmul(a32, b32, allow_tf32=True), a32, b32, atol=4e-3))
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# The split-K path, forced at tiny sizes so that the interpreter runs it: a few ranges of
# $K$ (more ranges than blocks at the second shape, so some programs sum little), then the
# sum pass. The heuristic's choices are plain arithmetic and print the same everywhere.

# %%
from kernels.matmul import skinny_config, split_k_count

print("S of (3.7) for T = 16, 64, 132 tiles on P = 132, 64 block steps:",
      [split_k_count(t, 64, 132) for t in (16, 64, 132)])
print("skinny_config(64, 8192, 8192) in bfloat16 on 132 multiprocessors:", skinny_config(64, 8192, 8192, 2, 132))
if kernels.runtime.MODE != "unavailable":
    for m, n, k, s in [(5, 40, 100, 3), (33, 17, 250, 8)]:
        for dtype in (torch.bfloat16, torch.float32):
            report_closeness(m, n, k, dtype, label=f"split_k = {s}, ", split_k=s)
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# TF32 rounds each input to 11 significant bits, a relative error of up to $2^{-11}$ per
# input, so a sum of $K$ such products is off by about $10^{-3}\sqrt{K}$. That is why the
# TF32 check uses `atol = 4e-3`. On the CPU this check passes trivially, because the
# interpreter computes in full float32. On a GPU it measures real TF32 rounding. Bad input is rejected with an error that names the argument:

# %%
bad_calls = {
    "integer matrix": lambda: matmul(torch.ones(2, 3, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32)),
    "float64 into the kernel": lambda: matmul(torch.randn(2, 3, dtype=torch.float64),
                                              torch.randn(3, 2, dtype=torch.float64)),
    "inner dimensions differ": lambda: matmul(torch.randn(2, 3), torch.randn(4, 2)),
    "a 1-D operand": lambda: matmul(torch.randn(3), torch.randn(3, 2)),
    "an empty operand": lambda: matmul(torch.randn(2, 0), torch.randn(0, 2)),
    "dtypes differ": lambda: matmul(torch.randn(2, 3), torch.randn(3, 2).half()),
    "devices differ": lambda: matmul(torch.randn(2, 3), torch.randn(3, 2, device="meta")),
}
for what, call in bad_calls.items():
    try:
        call()
        print(f"{what}: no error (unexpected)")
    except (TypeError, ValueError) as err:
        print(f"{what}: {type(err).__name__}: {err}")

# %% [markdown]
# ## 3.7 Measuring: the roofline of your device
#
# With a CUDA GPU, the cell below measures both ceilings of *this* device. Bandwidth comes
# from a 1 GiB device-to-device copy (bytes read plus bytes written, divided by the time).
# Peak FLOP/s comes from the best of a few large `torch.matmul` calls in bfloat16, and
# cuBLAS is the practical ceiling. It then times our kernel and `torch.matmul` at several
# shapes, from compute-bound cubes down to a skinny product whose intensity is below the
# ridge. On a CPU the cell prints the datasheet ceilings and times nothing: the interpreter
# runs the kernel in NumPy, and its speed says nothing about the kernel.

# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.tiling import Ceilings

BENCH_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 1024, 4096), (8192, 8192, 512),
                (8192, 8192, 128), (64, 8192, 8192)]
measured = {}
if config.PROFILE == "gpu":
    import sys

    from tqdm.auto import tqdm
    from triton.testing import do_bench

    def tflops(fn, m, n, k):
        return matmul_flops(m, n, k) / do_bench(fn, warmup=50, rep=200, return_mode="median") / 1e9

    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")      # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    peak = max(tflops(lambda a=a, b=b: a @ b, *shape) for shape in [(8192, 8192, 8192), (16384, 8192, 8192)]
               for a, b in [(torch.randn(shape[0], shape[2], device="cuda", dtype=torch.bfloat16),
                             torch.randn(shape[2], shape[1], device="cuda", dtype=torch.bfloat16))])
    del src, dst
    ceilings = Ceilings(f"{torch.cuda.get_device_name()} (measured)", peak * 1e12,
                        2 * 2**30 / copy_ms * 1e3, "1 GiB copy; best torch.matmul bf16")
    for m, n, k in tqdm(BENCH_SHAPES, desc="matmul shapes", file=sys.stderr):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        measured[(m, n, k)] = (tflops(lambda: matmul(a, b), m, n, k), tflops(lambda: a @ b, m, n, k))
    print(f"{ceilings.name}: {ceilings.peak_flops / 1e12:.0f} TFLOP/s, {ceilings.bandwidth / 1e12:.2f} TB/s, "
          f"ridge {ceilings.ridge:.0f} FLOP/B")
    for (m, n, k), (ours, cublas) in measured.items():
        print(f"{m:5d} x {n:5d} x {k:5d}: ours {ours:5.0f} TFLOP/s, torch.matmul {cublas:5.0f} TFLOP/s, "
              f"ours/torch {ours / cublas:.2f}")
else:
    ceilings = H100_SXM_DATASHEET
    print(f"no GPU: using the {ceilings.source} (datasheet numbers, not measured here)")

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
intensities = torch.logspace(-1, 4, 200).tolist()
ax.plot(intensities, [attainable_flops(i, ceilings) / 1e12 for i in intensities], "k-",
        label=f"roofline: {ceilings.name}")
ax.axvline(ceilings.ridge, color="0.6", ls=":", lw=1)
for (m, n, k) in BENCH_SHAPES:
    intensity = arithmetic_intensity(matmul_flops(m, n, k), matmul_min_bytes(m, n, k, 2))
    if measured:
        ours, cublas = measured[(m, n, k)]
        ax.plot(intensity, ours, "o", color="C0", label="ours (Triton), measured" if (m, n, k) == BENCH_SHAPES[0] else None)
        ax.plot(intensity, cublas, "x", color="C3", label="torch.matmul, measured" if (m, n, k) == BENCH_SHAPES[0] else None)
    else:
        ax.plot(intensity, attainable_flops(intensity, ceilings) / 1e12, "o", mfc="none", color="C0",
                label="our matmul shapes (intensity only)" if (m, n, k) == BENCH_SHAPES[0] else None)
    ax.annotate(f"{m}x{n}x{k}", (intensity, attainable_flops(intensity, ceilings) / 1e12),
                textcoords="offset points", xytext=(-10, -14 if k > 1000 else 6), fontsize=7, rotation=-30)
ax.axvline(softmax_intensity, color="C2", ls="--", lw=1)
ax.text(softmax_intensity * 1.1, 2, "softmax (ch. 1)", color="C2", fontsize=8)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("arithmetic intensity (FLOP per byte, bfloat16, minimum traffic)")
ax.set_ylabel("TFLOP/s")
ax.set_title("Roofline: " + ("measured ceilings and points" if measured else "datasheet ceilings, no measurements"))
ax.legend(fontsize=8, loc="lower right")
plt.show()

# %%
if measured:
    worst_large = min(measured[s][0] / measured[s][1] for s in BENCH_SHAPES[:3])
    print("ours is at least 0.8x torch.matmul at the three acceptance shapes:", worst_large >= 0.8)
else:
    big = [arithmetic_intensity(matmul_flops(*s), matmul_min_bytes(*s, 2)) for s in BENCH_SHAPES[:3]]
    print("timings need a GPU; the three acceptance shapes are compute-bound on the datasheet roofline:",
          all(i > ceilings.ridge for i in big))

# %% [markdown]
# Then the effect of program order. The same fixed configuration (128 x 256 x 64 tiles,
# 4 stages, 8 warps) is run with `GROUP_M = 1` (row-major) and `GROUP_M = 8`, on a large
# square product where the panels do not all fit in L2. In the H100 sweep
# (`benchmarks/sweep_matmul.py`, output in `benchmarks/results/matmul_sweep_*`), the
# library's `GROUP_M = 8` gained 1.01x over row-major at $4096^3$ and 1.05x at $8192^3$;
# `GROUP_M = 16`, which the library does not use, reached 1.12x at $8192^3$ but only 1.04x
# at $4096^3$. That is real but modest, as section 3.5's model predicted for two orders
# that are both above the ridge.

# %%
# NBVAL_IGNORE_OUTPUT
FIXED = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_stages": 4, "num_warps": 8}
if config.PROFILE == "gpu":
    m = n = k = 8192
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    grouping = {g: tflops(lambda g=g: matmul(a, b, config={**FIXED, "GROUP_M": g}), m, n, k) for g in (1, 8)}
    for g, rate in grouping.items():
        print(f"8192^3 bfloat16, GROUP_M = {g}: {rate:.0f} TFLOP/s")
    print(f"grouped over row-major: {grouping[8] / grouping[1]:.3f}x")
else:
    grouping = {}
    print("no GPU: the effect of GROUP_M is measured only on a GPU (section 3.5 gives the model)")

# %%
if grouping:
    print("GROUP_M = 8 is at least as fast as row-major (within 2%):", grouping[8] >= 0.98 * grouping[1])
else:
    print("GROUP_M measurement skipped without a GPU")

# %% [markdown]
# Then the shapes of section 3.6's heuristic: skinny products against an 8192 x 8192
# weight, a small $K$, and sizes that are multiples of nothing. The skinny ones are
# memory-bound, so their TFLOP/s are far under the peak for both sides; the ratio is what
# to read.

# %%
# NBVAL_IGNORE_OUTPUT
ODD_SHAPES = [(16, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192), (4096, 4096, 512), (4097, 4095, 4093)]
if config.PROFILE == "gpu":
    for m, n, k in ODD_SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        ours, cublas = tflops(lambda: matmul(a, b), m, n, k), tflops(lambda: a @ b, m, n, k)
        print(f"{m:5d} x {n:5d} x {k:5d}: ours {ours:5.0f} TFLOP/s, torch.matmul {cublas:5.0f} TFLOP/s, "
              f"ours/torch {ours / cublas:.2f}")
else:
    print("no GPU: the odd shapes are timed only on a GPU (an H200 run: benchmarks/results/matmul_odd_sweep_*)")

# %% [markdown]
# Our measurements on an H100 80GB HBM3 (torch 2.11, Triton 3.6, in
# `benchmarks/results/matmul_NVIDIA_H100_80GB_HBM3_2026-11-23.json`, from
# `python -m kernels.bench matmul`) put the autotuned bfloat16 kernel at 0.95x
# `torch.matmul` at 4096^3, 1.01x at 8192^3 and 0.94x at 16384 x 1024 x 4096, at
# 650 to 700 TFLOP/s; the sweep of the same day (`matmul_sweep_*` beside it) measured the
# autotuned kernel at 0.89x at 4096^3. At that size one matmul takes 0.2 ms, and clocks
# and the autotuner's choice between two near-equal configurations both matter. cuBLAS
# itself reached 649 to 767 TFLOP/s in these files, against the datasheet's 989, and
# chapter 4's GPU run measured 3.0 TB/s for a plain copy against the datasheet's 3.35 TB/s
# (`benchmarks/results/chapter04_gpu_profile_*`).
#
# For the shapes off the square (section 3.6's heuristic, split-K and padding), the H200
# sweep of 2026-12-03 (`benchmarks/results/matmul_odd_sweep_NVIDIA_H200_2026-12-03.txt`)
# and `python -m kernels.bench matmul` (`benchmarks/results/*_NVIDIA_H200_2026-12-03.json`)
# hold the numbers. The padded path wins most: at 4097 x 4095 x 4093, cuBLAS itself takes
# 0.9 ms (its unaligned kernels), the padded copies 0.1 ms and our kernel on the aligned
# copies 0.2 ms, about 3x cuBLAS in all. Against 8192 x 8192 weights the best fixed
# configurations of the sweep reached 0.99x cuBLAS at $M = 16$, 0.78x at $M = 64$ and
# 0.80 to 0.93x at $M = 128$ (the heuristic's tiles come from these), and at $K = 512$
# the best fixed tile reached 0.87x. Timings of these 40-microsecond products moved by up
# to 2x between repeats of one configuration on that machine, so their ratios need
# repeated runs before anyone trusts the second digit.
#
# Through the public `matmul()` these small products fare worse: the full
# `python -m kernels.bench` of 2026-12-03 measured 0.33x cuBLAS at $K = 512$ and 0.78x at
# $M = 64$ (medians). The kernel is not the cause. Called back to back
# (`benchmarks/launch_overhead_matmul.py`, results beside the others), the kernel launched
# with the autotuner's best tile queues at 35 microseconds per call at $K = 512$ against
# cuBLAS's 30.5, but one `matmul()` call spends about 100 microseconds on the host: 9 in
# the argument checks, 22 in Triton's autotuner, 31 in Triton's launcher, the rest in our
# launcher's choices and the output's allocation. A 30-microsecond product is bound by the
# host, not by the GPU; the cure is less host work per call, not a better tile.
#
# ### The host's share: launch plans
#
# Most of that work gives the same answer on every call of one layout. The autotuner hashes
# (M, N, K) and the dtypes to find the configuration it chose; Triton's launcher binds the
# arguments to the kernel's signature, works out their *specialization* (which integers are
# 1 or multiples of 16, which pointers are 16-byte aligned) and looks up the binary compiled
# for it; our launcher re-derives its route (skinny, padded, autotuned). Section 3.6's
# launch plan does all of that once. It keeps the binary the first call launched and hands
# later calls' arguments straight to Triton's launcher for it (`kernels.runtime.relauncher`).
# That is valid only while the specialization would come out the same, which is why a
# plan's key holds the strides and the alignment of the operands, not only their shapes:

# %%
from kernels.matmul import clear_launch_plans

if kernels.runtime.MODE != "unavailable":
    clear_launch_plans()
    a, b = torch.randn(64, 48, device=config.DEVICE), torch.randn(48, 32, device=config.DEVICE)
    for x in (a, torch.randn_like(a), a.t().contiguous().t()):   # one layout twice, then column-major
        matmul(x, b)
    print("launch plans after three calls of two layouts:", clear_launch_plans())
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# On the H200, `benchmarks/launch_plans.py` runs the old launcher and the planned one side
# by side on the same compiled kernels (results of 2026-12-04 in
# `benchmarks/results/launch_plans_NVIDIA_H200_2026-12-04.txt`; torch 2.11, Triton 3.6).
# At $K = 512$ in bfloat16, back-to-back calls took 96 microseconds each through the old
# path and 35 through the plan, against cuBLAS's 31: from 0.32x to 0.87x cuBLAS, the
# ratio of the best fixed tile. The host's own time fell from 96 to 26 microseconds a
# call. Against 8192 x 8192 weights the ratio rose from 0.71x to 1.00x at $M = 16$, from
# 0.50x to 0.87x at $M = 32$ and from 0.77x to 0.95x at $M = 128$. At $M = 64$ it rose only
# from 0.60x to 0.74x: the kernel itself, 49 microseconds, is now the limit. Where the GPU
# dominates, nothing changed: 0.96x at $4096^3$, 3.2x at 4097 x 4095 x 4093. A second
# lease, on a machine whose host took 123 microseconds per old call, measured 0.25x and
# 0.88x at $K = 512$.
#
# ## 3.8 Why attention does not tile like this, yet
#
# Attention for one head computes $S = QK^\top / \sqrt{d}$, then $P = \mathrm{softmax}(S)$
# row by row, then $O = PV$, with $Q, K, V \in \mathbb{R}^{N \times d}$. Both products are
# matmuls, and each would tile as above. The obstacle is the softmax in between. A tile
# $P_{[I,J]}$ depends on the *whole* row block $S_{[I,:]}$, through the row maximum and
# the row sum of (1.2). So no tile of $P$, and no contribution $P_{[I,J]} V_{[J,:]}$ to
# $O$, can be finished until every tile of that row of $S$ has been computed. A plain
# tiled implementation has to write all of $S$ (and then $P$) to memory and read it back.
# Softmax applied to each tile on its own gives the wrong answer:

# %%
s_row = torch.randn(1, 8, dtype=torch.float64) * 3
whole = torch.softmax(s_row, dim=-1)
per_tile = torch.cat([torch.softmax(s_row[:, :4], -1), torch.softmax(s_row[:, 4:], -1)], dim=-1)
print("softmax of the whole row :", whole)
print("softmax tile by tile     :", per_tile)
print("tile-by-tile equals whole:", torch.allclose(whole, per_tile))

# %% [markdown]
# Each tile sums to 1 on its own, so the concatenated row sums to 2. Each tile is also
# normalised with its own maximum rather than the row's. What it costs to materialise $S$
# for one head at a long context, in bfloat16:

# %%
for n_ctx, d in [(4096, 128), (32768, 128)]:
    flops = 2 * matmul_flops(n_ctx, n_ctx, d)                      # S = Q K^T and O = P V
    qkvo = 4 * n_ctx * d * 2                                        # read Q, K, V, write O
    with_s = qkvo + 2 * 2 * n_ctx * n_ctx * 2                       # + write and read S, then P
    print(f"N = {n_ctx:5d}, d = {d}: S is {n_ctx * n_ctx * 2 / 2**20:6.0f} MiB; "
          f"I = {arithmetic_intensity(flops, with_s):4.0f} FLOP/B with S in memory, "
          f"{arithmetic_intensity(flops, qkvo):5.0f} FLOP/B if S never leaves the chip")

# %% [markdown]
# With $S$ in memory, attention sits far below the ridge point (memory-bound) at any
# context length, and $S$ grows quadratically. If $S$ never leaves the chip, attention
# becomes a compute-bound pair of matmuls. The step that makes that possible is chapter
# 2's *online softmax*. Its running maximum and rescaled running sum let each tile of a
# row be folded in as it arrives. When a later tile raises the maximum, partial results
# already accumulated are corrected by a factor of $e^{m_{\text{old}} - m_{\text{new}}}$.
# Chapter 4 applies that merge to the output accumulator $O_{[I,:]}$ inside a kernel
# built like this one, a K loop (over key tiles) with a float32 accumulator, and the
# result is FlashAttention.
#
# ## Summary
#
# * A matmul is a sum of tile products (3.1). A program that owns one tile of C streams
#   panels of A and B through the chip, reusing each loaded number $b_M$ or $b_N$ times.
# * Arithmetic intensity (3.4) against the ridge point of the roofline (3.6) tells whether
#   memory or arithmetic limits a kernel. Large matmuls are compute-bound and softmax is
#   memory-bound.
# * Tiles alone leave a matmul below the ridge (3.5). The L2 cache supplies the rest of
#   the reuse, and grouped program order makes concurrent programs share their panels.
# * The Triton kernel: block tiles, a K loop, float32 accumulation, masks only on the K
#   tail and the store, any strides, autotuned block sizes on CUDA and a fixed small
#   configuration under the interpreter. float32 inputs use IEEE float32 unless TF32 is
#   allowed, following PyTorch.
# * Off the square (3.6): skinny products get a short, K-long tile; when the tiles leave
#   most multiprocessors idle, split-K shares each tile's sum over K among several programs
#   (3.7); large unaligned products run on zero-padded, aligned copies.
# * The launcher decides once per layout of the operands and keeps a launch plan, which
#   reuses the compiled binary of the first call: a small product is then bound by the GPU,
#   not by the host's Python.
# * Softmax's normalization couples all tiles of a row, which is why attention needs the
#   online softmax before it can be tiled (chapters 2 and 4).
#
# Exported to the library: `lrn_lib.tiling` (`Ceilings`, `H100_SXM_DATASHEET`,
# `matmul_flops`, `matmul_min_bytes`, `arithmetic_intensity`, `tiled_traffic_bytes`,
# `attainable_flops`, `check_matmul_operands`, `tiled_matmul`, `program_order`,
# `wave_panels`) and `kernels.matmul` (`grouped_program_id`, `matmul_kernel`,
# `hopper_configs`, `prune_configs`, `matmul_split_k_kernel`, `split_k_sum_kernel`,
# `split_k_count`, `skinny_config`, `needs_padding`, `padded_copy`, `matmul`,
# `clear_launch_plans`).

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("03.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("03")))` lists the checkers. Worked solutions:
# `chapters/solutions/03_tiling_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): the best tile shape.** Show that when $b_M$ divides $M$, $b_N$
# divides $N$ and $K$ is large, the intensity $F / Q_{\text{tiled}}$ from (3.2) and (3.5)
# tends to $I_{\text{tile}} = 2 b_M b_N / ((b_M + b_N)\, s)$ as $M, N \to \infty$, and that it
# does not depend on $b_K$. Then fix the accumulator size $b_M b_N = A$ (registers limit it)
# and show that $I_{\text{tile}}$ is largest for a square tile, $b_M = b_N = \sqrt{A}$. How
# much does a 181 x 181 tile gain over 128 x 256 in bfloat16?
#
# **Exercise 2 (implement): a tiled matmul.** Without looking at `lrn_lib.tiling`, write
# `tiled_matmul(a, b, block_m: int, block_n: int, block_k: int) -> torch.Tensor` that
# computes $C = AB$ by equation (3.1): a loop over the tiles of $C$, and inside it a loop
# over blocks of $K$ that accumulates block products (no product of the whole matrices).
# Any $M, N, K \ge 1$ and any block sizes, including blocks that do not divide the sizes or
# exceed them. Run `check("03.tiled_matmul", tiled_matmul)`.
#
# **Exercise 3 (implement): the intensity of a tiling.** Write
# `tiled_intensity(m, n, k, block_m, block_n, bytes_per_element) -> float`, the arithmetic
# intensity (3.4) of a tiled matmul whose programs share nothing through a cache: $F$ from
# (3.2) and the exact traffic $Q_{\text{tiled}}$ of (3.5), partial edge tiles included. Run
# `check("03.tiled_intensity", tiled_intensity)`.
#
# **Exercise 4 (measure): the best group size.** For the 8192^3 bfloat16 matmul of section
# 3.5 (128 x 256 tiles, one wave of 132 programs), compute with `wave_panels` the wave's
# intensity against HBM for `GROUP_M` = 1, 2, 4, 8, 16, 32 and 64. Look for: the intensity
# peaks at the group size that makes the wave's patch of $C$ closest to square in elements
# (rows $\times$ 128 against columns $\times$ 256), falls off on both sides, and every value is
# above the H100's ridge point of 295 FLOP/byte, which is why section 3.7 found only a
# modest gain from grouping.
