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
# # Chapter 4. FlashAttention-2
#
# Attention computes $O = \mathrm{softmax}(QK^\top / \sqrt{d})\,V$. Written as three
# operations, it moves an $N \times N$ matrix through memory twice, and for long sequences
# that traffic, not the arithmetic, sets the running time. FlashAttention (Dao et al. 2022,
# arXiv:2205.14135) computes the same exact result without ever writing that matrix,
# using the two tools of the previous chapters: **tiling** (chapter 3) for the two matrix
# products, and the **online softmax merge** (chapter 2) for the normalization that
# blocked tiling. FlashAttention-2 (Dao 2023, arXiv:2307.08691) reorganizes the work so
# that GPUs run it near their matrix-multiply speed.
#
# This chapter builds attention four times: the standard three-step version, FlashAttention's
# Algorithm 1 as PyTorch block loops, FlashAttention-2's changes to it one at a time, and
# finally Triton kernels for the forward and backward passes, with causal masks, grouped-query
# attention and any head dimension up to 256.

# %%
import difflib
import inspect
import math

import matplotlib.pyplot as plt
import torch

import kernels
from lrn_lib import config
from lrn_lib.online_softmax import merge_lse

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter()

# %% [markdown]
# ## 4.1 Standard attention and its memory traffic
#
# For one head with queries $Q \in \mathbb{R}^{N_q \times d}$, keys and values
# $K, V \in \mathbb{R}^{N_k \times d}$ and a scale $\tau$ (usually $1/\sqrt{d}$):
#
# $$S = \tau\, Q K^\top, \qquad P = \mathrm{softmax}(S) \text{ (row-wise)}, \qquad O = P V \qquad (4.1)$$
#
# The standard implementation (Algorithm 0 of the paper) runs these as three kernels, and
# each writes its $N_q \times N_k$ result to the GPU's main memory (HBM) for the next to
# read back. We also return the row-wise log-sum-exp $L = \log \sum_j e^{S_{ij}}$
# (equation 1.3): FlashAttention-2 keeps exactly this for its backward pass.
#
# Two conventions are needed beyond (4.1), and the reference fixes them for the whole book:
#
# * **Causal masks when $N_q \ne N_k$** are aligned to the *bottom right*: query $i$ sees key
#   $j$ when $j \le i + (N_k - N_q)$. The last query sees every key, as in decoding with a KV
#   cache. This is FlashAttention-2's convention (since its version 2.1) and PyTorch's
#   `scaled_dot_product_attention` with a lower-right causal bias. Beware: SDPA's plain
#   `is_causal=True` is aligned to the *top left* ($j \le i$), so for $N_q \ne N_k$ it is a
#   different mask; the two agree only when $N_q = N_k$. If $N_q > N_k$, the first
#   $N_q - N_k$ queries see no key at all; their output is defined as 0 and their $L$ as
#   $-\infty$. That $L$ is our choice, not FlashAttention-2's: its main kernels write
#   $+\infty$ for such rows (so that $e^{S - L}$ is 0 in the backward pass), and only its
#   split-KV decoding path uses $-\infty$. Either value gives the same $O$ and gradients; we
#   keep $-\infty$ because it is the log-sum-exp of an empty set, which chapter 2's
#   `merge_lse` treats as "no keys".
# * **Grouped-query attention (GQA)**: $H$ query heads share $H_{kv}$ key/value heads
#   ($H_{kv}$ divides $H$); query head $h$ uses key/value head $\lfloor h / (H / H_{kv}) \rfloor$.
#   $H_{kv} = 1$ is multi-query attention (MQA). The reference repeats K and V for clarity;
#   the kernels never do.

# %%
#| export lrn_lib.attention
import math

import torch

from kernels import runtime
from lrn_lib import validate


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           scale: float | None = None) -> None:
    """Raise a clear TypeError/ValueError unless q, k, v form a valid attention problem.

    q: (batch, heads, n_queries, head_dim); k, v: (batch, kv_heads, n_keys, head_dim), with
    kv_heads dividing heads, one floating dtype and one device, nothing empty; causal a
    bool, scale None or a positive finite number.
    """
    validate.attention_inputs(q, k, v, causal, scale)


def causal_visible(n_queries: int, n_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Bottom-right-aligned causal mask: [i, j] is True when query i may see key j (j <= i + n_k - n_q)."""
    validate.integer(n_queries, "n_queries", low=1)
    validate.integer(n_keys, "n_keys", low=1)
    if device is not None and not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device, a str or None, got {type(device).__name__}")
    i = torch.arange(n_queries, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    return j <= i + (n_keys - n_queries)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard attention (4.1) with GQA and bottom-right causal masks; returns (O, L).

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d). O: (B, H, Nq, d) in q's dtype; L: (B, H, Nq)
    log-sum-exp of the scaled scores in float32 (float64 for float64 input). Queries that
    see no key get O = 0 and L = -inf.
    """
    check_attention_inputs(q, k, v, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k = k.to(work).repeat_interleave(group, dim=1)
    v = v.to(work).repeat_interleave(group, dim=1)
    s = scale * q.to(work) @ k.transpose(-1, -2)                 # S = tau Q K^T   (4.1)
    if causal:
        s = s.masked_fill(~causal_visible(q.shape[2], k.shape[2], q.device), -float("inf"))
    lse = torch.logsumexp(s, dim=-1)
    lse_safe = torch.where(lse == -float("inf"), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe[..., None])                       # P = softmax(S), 0 on empty rows
    return (p @ v).to(q.dtype), lse


# %% [markdown]
# How many bytes does the standard version move? Count elements read and written in HBM
# per head, forward and backward, ignoring the small per-row vectors. Forward: $S$ is
# written, read, $P$ written, read: $4 N_q N_k$, plus $Q, K, V, O$. Backward
# (with $dP = dO\,V^\top$, $dS = P \odot (dP - \mathrm{rowsum}(dO \odot O))$,
# $dV = P^\top dO$, $dQ = \tau\, dS\, K$, $dK = \tau\, dS^\top Q$): $dP$ written, $P$ read
# twice, $dP$ read, $dS$ written and read twice, $7 N_q N_k$. FlashAttention moves none of
# these $N^2$ matrices; it reads $K$ and $V$ once per block of $B_r$ queries.
#
# The FlashAttention paper measured this for GPT-2 medium's attention (sequence 1024,
# head dimension 64, 16 heads, batch 64) on an A100, forward plus backward: the standard
# PyTorch version moved **40.3 GB** in **41.7 ms**, FlashAttention **4.4 GB** in
# **7.3 ms**, for a few more FLOPs (75.2 versus 66.6 GFLOPs: the backward pass recomputes
# $S$). Our count below is a lower bound for the standard version (the paper's baseline
# also makes separate passes over $S$ for scaling, masking and dropout), and the same
# shape of comparison appears.

# %%
def attention_hbm_bytes(n: int, d: int, heads: int, batch: int, bytes_per_element: int,
                        block_rows: int | None = None, backward_block: int | None = None) -> float:
    """HBM bytes of attention forward + backward: standard (block_rows None) or FlashAttention-2.

    block_rows: queries per forward program; backward_block: keys per dK/dV program and
    queries per dQ program (default block_rows). Every reread is counted.
    """
    nd = n * d
    if block_rows is None:
        quadratic = (4 + 7) * n * n                          # S, P, dP, dS round trips
        linear = (4 + 8) * nd                                # Q K V O, then dO O Q K V read, dQ dK dV written
        return (quadratic + linear) * heads * batch * bytes_per_element
    q_blocks = math.ceil(n / block_rows)
    bwd_blocks = math.ceil(n / (backward_block or block_rows))
    forward = 2 * nd + 2 * q_blocks * nd                     # Q read, O written; K V once per query block
    backward = (2 * nd                                       # preprocessing: O and dO read
                + 4 * nd + 2 * bwd_blocks * nd               # dK dV: K V read, dK dV written; Q dO per key block
                + 3 * nd + 2 * bwd_blocks * nd)              # dQ: Q dO read, dQ written; K V per query block
    return (forward + backward) * heads * batch * bytes_per_element


gpt2_medium = dict(n=1024, d=64, heads=16, batch=64, bytes_per_element=2)
standard_gb = attention_hbm_bytes(**gpt2_medium) / 1e9
flash_gb = attention_hbm_bytes(**gpt2_medium, block_rows=128) / 1e9
ours_gb = attention_hbm_bytes(**gpt2_medium, block_rows=128, backward_block=64) / 1e9
print(f"standard attention, lower bound:      {standard_gb:5.1f} GB   (paper, measured on A100: 40.3 GB)")
print(f"FlashAttention-2, 128 x 128 blocks:    {flash_gb:5.1f} GB   (paper, FlashAttention-1: 4.4 GB)")
print(f"our kernels, backward 64 x 64 blocks:  {ours_gb:5.1f} GB")
print(f"ratio: {standard_gb / flash_gb:.0f}x fewer bytes")

# %% [markdown]
# Our FlashAttention figure counts every reread as HBM traffic: $K$ and $V$ once per query
# block in the forward pass and in the $dQ$ kernel, and, in the backward pass, $Q$ and $dO$
# once per *key* block as well (the $dK, dV$ kernel of section 4.6 walks all queries for
# each key block). Our own kernels use 64 x 64 blocks in the backward pass, which doubles
# its rereads compared with 128 x 128 blocks: hence the third line. In practice the blocks
# of one head run at the same time and share those reads through the L2 cache, so the real
# traffic is lower: with the block sizes of the kernel that runs, each figure is an upper
# bound, as the standard one is a lower bound.

# %% [markdown]
# ## 4.2 The memory hierarchy
#
# The reason bytes matter is the gap between the GPU's levels of memory. For an H100 SXM
# (datasheet figures): each of its 132 streaming multiprocessors has 256 KB of registers
# and up to 228 KB of shared memory (the "SRAM" of the paper), tens of TB/s in aggregate;
# a 50 MB L2 cache; 80 GB of HBM3 at 3.35 TB/s; and host memory across PCIe 5 at about
# 64 GB/s. Its tensor cores multiply bfloat16 matrices at about 990 TFLOP/s, so to keep
# them busy a kernel must do about 300 FLOPs per byte it reads from HBM. The standard
# attention's softmax does a handful. With a GPU present, the next cell prints the
# reader's own card and measures its HBM bandwidth.

# %%
# NBVAL_IGNORE_OUTPUT
if config.PROFILE == "gpu":
    props = torch.cuda.get_device_properties(0)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    from triton.testing import do_bench

    copy_ms = do_bench(lambda: y.copy_(x), return_mode="median")
    print(f"{props.name}: {props.multi_processor_count} SMs, "
          f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB, HBM {props.total_memory / 2**30:.0f} GiB, "
          f"measured copy bandwidth {2 * x.numel() / copy_ms / 1e6:.0f} GB/s")
    del x, y
else:
    print("no CUDA GPU: the figures above are the H100 datasheet's")

# %% [markdown]
# ## 4.3 FlashAttention, Algorithm 1, as block loops
#
# FlashAttention splits $Q$ into row blocks of $B_r$ queries and $K, V$ into blocks of $B_c$
# keys, and never forms more than one $B_r \times B_c$ block of $S$ at a time. Each query
# row keeps the online-softmax state of chapter 2, its running max $m$ and sum $\ell$, plus
# its output so far, and merges every new block in with equation (2.2). Algorithm 1 of the
# paper loops over key/value blocks on the outside; for each, it loads every query block
# with its $O_i, \ell_i, m_i$ from HBM, updates them, and writes them back. Here it is in
# PyTorch, one head at a time, with the paper's line numbers:

# %%
def flash_attention_v1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_r: int = 16,
                       block_c: int = 16) -> torch.Tensor:
    """FlashAttention (Algorithm 1 of Dao et al. 2022) for one head, q/k/v: (N, d). Teaching only."""
    n, d = q.shape
    o = torch.zeros_like(q)                                   # line 2: O, l, m in "HBM"
    ell = torch.zeros(n, dtype=q.dtype)
    m = torch.full((n,), -float("inf"), dtype=q.dtype)
    for j in range(0, n, block_c):                            # line 5: outer loop over K, V blocks
        k_j, v_j = k[j:j + block_c], v[j:j + block_c]         # line 6
        for i in range(0, n, block_r):                        # line 7: inner loop over Q blocks
            q_i, o_i, ell_i, m_i = q[i:i + block_r], o[i:i + block_r], ell[i:i + block_r], m[i:i + block_r]
            s_ij = q_i @ k_j.T / math.sqrt(d)                 # line 9
            m_ij = s_ij.amax(dim=1)                           # line 10
            p_ij = torch.exp(s_ij - m_ij[:, None])
            ell_ij = p_ij.sum(dim=1)
            m_new = torch.maximum(m_i, m_ij)                  # line 11: merge (2.2)
            ell_new = torch.exp(m_i - m_new) * ell_i + torch.exp(m_ij - m_new) * ell_ij
            o[i:i + block_r] = ((ell_i * torch.exp(m_i - m_new))[:, None] * o_i      # line 12: rescale and
                                + torch.exp(m_ij - m_new)[:, None] * (p_ij @ v_j)) / ell_new[:, None]  # normalize
            ell[i:i + block_r], m[i:i + block_r] = ell_new, m_new  # line 13
    return o


q, k, v = (torch.randn(64, 32, dtype=torch.float64) for _ in range(3))
expected, _ = attention_reference(q[None, None], k[None, None], v[None, None])
print("Algorithm 1 equals standard attention:",
      torch.allclose(flash_attention_v1(q, k, v), expected[0, 0], rtol=0, atol=1e-12))

# %% [markdown]
# ## 4.4 FlashAttention-2's changes, one at a time
#
# FlashAttention-2 keeps the arithmetic and changes the schedule. We apply its changes to
# the PyTorch version one by one, look at each as a diff, and count what each saves; the
# kernels of section 4.5 and their timings are the measurement on real hardware.
#
# **Change 1: swap the loops.** With queries on the outside, one query block's $O_i$,
# $\ell_i$, $m_i$ stay on chip for the whole inner loop over keys, and are written once at
# the end instead of once per key block. It also makes query blocks independent, so on a
# GPU each gets its own program: parallelism over the sequence, not only over batch and
# heads, which keeps the GPU full when batch x heads is small (long sequences).

# %%
def flash_attention_v2_loops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_r: int = 16,
                             block_c: int = 16) -> torch.Tensor:
    """Algorithm 1 with the loops swapped: each query block's state stays local. Teaching only."""
    n, d = q.shape
    o = torch.zeros_like(q)
    for i in range(0, n, block_r):                            # outer loop over Q blocks
        q_i = q[i:i + block_r]
        o_i = torch.zeros_like(q_i)
        ell_i = torch.zeros(len(q_i), dtype=q.dtype)
        m_i = torch.full((len(q_i),), -float("inf"), dtype=q.dtype)
        for j in range(0, n, block_c):                        # inner loop over K, V blocks
            k_j, v_j = k[j:j + block_c], v[j:j + block_c]
            s_ij = q_i @ k_j.T / math.sqrt(d)
            m_ij = s_ij.amax(dim=1)
            p_ij = torch.exp(s_ij - m_ij[:, None])
            ell_ij = p_ij.sum(dim=1)
            m_new = torch.maximum(m_i, m_ij)
            ell_new = torch.exp(m_i - m_new) * ell_i + torch.exp(m_ij - m_new) * ell_ij
            o_i = ((ell_i * torch.exp(m_i - m_new))[:, None] * o_i
                   + torch.exp(m_ij - m_new)[:, None] * (p_ij @ v_j)) / ell_new[:, None]
            ell_i, m_i = ell_new, m_new
        o[i:i + block_r] = o_i                                # written once
    return o


def show_diff(before, after) -> None:
    """Print a unified diff of two functions' sources."""
    lines = difflib.unified_diff(inspect.getsource(before).splitlines(), inspect.getsource(after).splitlines(),
                                 before.__name__, after.__name__, lineterm="", n=1)
    print("\n".join(lines))


show_diff(flash_attention_v1, flash_attention_v2_loops)
print("\nsame result:", torch.allclose(flash_attention_v2_loops(q, k, v), expected[0, 0], rtol=0, atol=1e-12))

# %% [markdown]
# **Change 2: defer the rescaling.** Algorithm 1 keeps $O_i$ normalized after every block,
# which costs a division of the whole $B_r \times d$ block by $\ell^{\text{new}}$ each time.
# FlashAttention-2 keeps the *unnormalized* $\tilde O_i = \sum_j e^{S_{ij} - m_i} V_j$, only
# rescales it by $e^{m_i - m^{\text{new}}}$ when the maximum grows, and divides by $\ell_i$
# once at the end. Each block also merges its scores straight into the running max
# (no separate $m_{ij}$, $\ell_{ij}$). This matters because a GPU's non-matmul arithmetic is
# far slower than its tensor cores (on an A100, 19.5 TFLOP/s of float32 against 312 of
# float16 matmul, the 16x of the paper). We count the non-matmul operations on the output
# block per (query block, key block) step below.
#
# **Change 3: save only the log-sum-exp.** For the backward pass, Algorithm 1 stores $m$ and
# $\ell$; FlashAttention-2 stores $L = m + \log \ell$, one number per row, which is all the
# backward pass needs to rebuild $P = e^{S - L}$. It is also exactly the state of chapter 2's
# log-sum-exp merge (2.3), so partial attentions over different keys (on different
# devices, chapter 8's ring attention) can be merged afterwards.

# %%
def flash_attention_v2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_r: int = 16,
                       block_c: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward pass for one head: deferred normalization, returns (O, L). Teaching only."""
    n, d = q.shape
    o = torch.zeros_like(q)
    lse = torch.zeros(n, dtype=q.dtype)
    for i in range(0, n, block_r):
        q_i = q[i:i + block_r]
        o_i = torch.zeros_like(q_i)
        ell_i = torch.zeros(len(q_i), dtype=q.dtype)
        m_i = torch.full((len(q_i),), -float("inf"), dtype=q.dtype)
        for j in range(0, n, block_c):
            k_j, v_j = k[j:j + block_c], v[j:j + block_c]
            s_ij = q_i @ k_j.T / math.sqrt(d)
            m_new = torch.maximum(m_i, s_ij.amax(dim=1))
            p_ij = torch.exp(s_ij - m_new[:, None])
            ell_i = torch.exp(m_i - m_new) * ell_i + p_ij.sum(dim=1)
            o_i = torch.exp(m_i - m_new)[:, None] * o_i + p_ij @ v_j     # unnormalized
            m_i = m_new
        o[i:i + block_r] = o_i / ell_i[:, None]               # normalize once
        lse[i:i + block_r] = m_i + torch.log(ell_i)           # keep only L
    return o, lse


show_diff(flash_attention_v2_loops, flash_attention_v2)
o2, lse2 = flash_attention_v2(q, k, v)
print("\nsame result:", torch.allclose(o2, expected[0, 0], rtol=0, atol=1e-12))

# %% [markdown]
# The count of elementwise operations on the $B_r \times d$ output block per inner step,
# read off the two versions: Algorithm 1 multiplies it by a rescaling factor, adds the new
# block's contribution scaled by another, and divides by $\ell^{\text{new}}$ (3 operations per
# element, plus a scaling of $P_{ij}V_j$); FlashAttention-2 rescales and adds (2), and
# divides once per query block instead of once per step.

# %%
def output_block_ops(n: int, d: int, block_r: int, block_c: int, version: int) -> int:
    """Non-matmul operations on the output block over a whole head (the counts read off the code above)."""
    steps = math.ceil(n / block_r) * math.ceil(n / block_c)
    per_step = 4 if version == 1 else 2                      # v1: scale O, scale PV, add, divide; v2: scale O, add
    final = 0 if version == 1 else 1                         # v2: one division per element at the end
    return steps * block_r * d * per_step + math.ceil(n / block_r) * block_r * d * final


for n in (1024, 8192):
    v1, v2 = (output_block_ops(n, 128, 128, 64, version) for version in (1, 2))
    print(f"N = {n:5d}, d = 128, B_r = 128, B_c = 64: output-block ops v1 {v1 / 1e6:7.1f} M, "
          f"v2 {v2 / 1e6:7.1f} M ({v1 / v2:.1f}x fewer)")

# %% [markdown]
# The other changes can be counted the same way, per head, for a sequence of 8192 with
# $d = 128$, $B_r = 128$, $B_c = 64$: the traffic of the running $O_i, \ell_i, m_i$ (change 1:
# Algorithm 1 reads and writes them once per key block, FlashAttention-2 writes them once),
# the statistics saved for the backward pass (change 3), and what the backward pass keeps
# from the forward (change 4: the standard implementation keeps $P$).

# %%
n, d, block_r, block_c = 8192, 128, 128, 64
key_blocks = math.ceil(n / block_c)
counts = {
    "change 1: O, l, m traffic (elements)": (2 * key_blocks * n * (d + 2), n * (d + 1)),
    "change 3: statistics saved (elements)": (2 * n, n),
    "change 4: kept for backward (elements)": (n * n, n),
}
print(f"{'':40s} {'before':>12s} {'after':>10s}")
for what, (before, after) in counts.items():
    print(f"{what:40s} {before:12,d} {after:10,d}   {before / after:6.0f}x fewer")

# %% [markdown]
# **Change 4: the backward pass by recomputation.** Storing $P$ for the backward pass would
# bring back the $N^2$ memory. Instead FlashAttention recomputes each block
# $P_{ij} = e^{\tau Q_i K_j^\top - L_i}$ from $Q$, $K$ and the saved $L$. With
# $D_i = \mathrm{rowsum}(dO_i \odot O_i)$ (FlashAttention-2's preprocessing step; it equals
# $\mathrm{rowsum}(dP_i \odot P_i)$, the dot product of softmax's backward pass, equation 2.4),
#
# $$dV_j = \sum_i P_{ij}^\top dO_i, \quad dP_{ij} = dO_i V_j^\top, \quad
#   dS_{ij} = P_{ij} \odot (dP_{ij} - D_i), \quad dQ_i = \tau \sum_j dS_{ij} K_j, \quad
#   dK_j = \tau \sum_i dS_{ij}^\top Q_i \qquad (4.2)$$
#
# When $L$ itself is used downstream (chapter 8's ring attention merges partial results
# by their $L$), a gradient $dL_i$ reaches it too. Since $\partial L_i / \partial S_{ij} =
# P_{ij}$, it adds $P_{ij}\, dL_i$ to $dS_{ij}$, which is the same as replacing $D_i$:
#
# $$dS_{ij} = P_{ij} \odot \big(dP_{ij} - (D_i - dL_i)\big) \qquad (4.3)$$
#
# so the backward kernels need no change at all, only a different $D$.
#
# The library's block versions below are the references for the kernels: forward and
# backward, all heads, causal masks and GQA, in PyTorch.

# %%
#| export lrn_lib.attention
def flash_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           scale: float | None = None, block_m: int = 64,
                           block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward pass in PyTorch block loops; returns (O, L) like attention_reference.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d). Each query block merges key blocks into its
    unnormalized output with the online-softmax state, normalizes once, and keeps L.
    """
    check_attention_inputs(q, k, v, causal, scale)
    validate.integer(block_m, "block_m", low=1)
    validate.integer(block_n, "block_n", low=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_q, n_k, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    kv = {name: t.to(work).repeat_interleave(group, dim=1) for name, t in (("k", k), ("v", v))}
    visible = causal_visible(n_q, n_k, q.device) if causal else None
    o = torch.empty(q.shape, dtype=work, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=work, device=q.device)
    for i in range(0, n_q, block_m):
        q_i = q[:, :, i:i + block_m].to(work)
        acc = torch.zeros_like(q_i)
        m_i = torch.full(q_i.shape[:3], -float("inf"), dtype=work, device=q.device)
        ell_i = torch.zeros_like(m_i)
        for j in range(0, n_k, block_n):
            s = scale * q_i @ kv["k"][:, :, j:j + block_n].transpose(-1, -2)
            if causal:
                s = s.masked_fill(~visible[i:i + block_m, j:j + block_n], -float("inf"))
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            m_safe = torch.where(m_new == -float("inf"), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m_i - m_safe)
            ell_i = alpha * ell_i + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ kv["v"][:, :, j:j + block_n]
            m_i = m_new
        has_keys = ell_i > 0
        o[:, :, i:i + block_m] = acc / torch.where(has_keys, ell_i, torch.ones_like(ell_i))[..., None]
        lse[:, :, i:i + block_m] = torch.where(has_keys, m_i + torch.log(ell_i), m_i)
    return o.to(q.dtype), lse


def flash_attention_backward_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                    lse: torch.Tensor, do: torch.Tensor, causal: bool = False,
                                    scale: float | None = None, block_n: int = 64,
                                    dlse: torch.Tensor | None = None,
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass (4.2) by recomputing P block by block from L; returns (dQ, dK, dV).

    Shapes as in flash_attention_blocks; do has o's shape. dK and dV are summed over the
    query heads that share each key/value head (GQA). dlse (B, H, Nq), optional: the
    gradient reaching L, which enters as D - dL (4.3).
    """
    check_attention_inputs(q, k, v, causal, scale)
    for name, t, shape in (("o", o, q.shape), ("do", do, q.shape), ("lse", lse, q.shape[:3]),
                           ("dlse", dlse, q.shape[:3])):
        if t is None and name == "dlse":
            continue
        if validate.tensor(t, name, kind="float").shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} to match q")
    validate.integer(block_n, "block_n", low=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    q_, o_, do_ = q.to(work), o.to(work), do.to(work)
    k_, v_ = k.to(work).repeat_interleave(group, dim=1), v.to(work).repeat_interleave(group, dim=1)
    lse_safe = torch.where(lse == -float("inf"), torch.zeros_like(lse), lse).to(work)
    delta = (do_ * o_).sum(dim=-1)                                # D = rowsum(dO * O)
    if dlse is not None:
        delta = delta - dlse.to(work)                             # D - dL   (4.3)
    visible = causal_visible(n_q, n_k, q.device) if causal else None
    dq = torch.zeros_like(q_)
    dk, dv = torch.zeros_like(k_), torch.zeros_like(v_)
    for j in range(0, n_k, block_n):
        k_j, v_j = k_[:, :, j:j + block_n], v_[:, :, j:j + block_n]
        p = torch.exp(scale * q_ @ k_j.transpose(-1, -2) - lse_safe[..., None])   # recomputed P_ij
        if causal:
            p = p.masked_fill(~visible[:, j:j + block_n], 0.0)
        p = torch.where(lse[..., None] == -float("inf"), torch.zeros_like(p), p)
        dv[:, :, j:j + block_n] = p.transpose(-1, -2) @ do_                       # (4.2)
        ds = p * (do_ @ v_j.transpose(-1, -2) - delta[..., None])
        dq += scale * ds @ k_j
        dk[:, :, j:j + block_n] = scale * ds.transpose(-1, -2) @ q_
    dk = dk.view(b, h_kv, group, n_k, d).sum(dim=2)
    dv = dv.view(b, h_kv, group, n_k, d).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# %% [markdown]
# Both agree with the standard attention and with PyTorch's autograd in float64, on an
# awkward case: two query heads per key/value head, $N_q \ne N_k$, lengths that are not
# multiples of the blocks, and a causal mask under which the first queries see no key.

# %%
q = torch.randn(2, 4, 37, 32, dtype=torch.float64, requires_grad=True)
k = torch.randn(2, 2, 29, 32, dtype=torch.float64, requires_grad=True)
v = torch.randn(2, 2, 29, 32, dtype=torch.float64, requires_grad=True)
o_ref, lse_ref = attention_reference(q, k, v, causal=True)
o_blk, lse_blk = flash_attention_blocks(q, k, v, causal=True, block_m=16, block_n=16)
do = torch.randn_like(o_ref)
grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
grads_blk = flash_attention_backward_blocks(q, k, v, o_blk, lse_blk, do, causal=True, block_n=16)
print("queries with no visible key:", int((lse_ref == -float("inf")).sum()), "of", lse_ref.numel())
print("forward O and L match:", torch.allclose(o_blk, o_ref, atol=1e-12),
      torch.equal(lse_blk.isinf(), lse_ref.isinf()) and torch.allclose(lse_blk[lse_blk.isfinite()],
                                                                        lse_ref[lse_ref.isfinite()]))
print("dQ, dK, dV match autograd:", all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads_blk, grads_ref)))

# %% [markdown]
# And the log-sum-exp really is a mergeable state: attention over the first half of the
# keys and attention over the second half, merged with chapter 2's `merge_lse`, give the
# full attention. The outputs combine with weights $e^{L_a - L}$ and $e^{L_b - L}$.

# %%
q1 = torch.randn(1, 2, 10, 16, dtype=torch.float64)
k1, v1 = torch.randn(1, 2, 40, 16, dtype=torch.float64), torch.randn(1, 2, 40, 16, dtype=torch.float64)
o_a, lse_a = attention_reference(q1, k1[:, :, :25], v1[:, :, :25])
o_b, lse_b = attention_reference(q1, k1[:, :, 25:], v1[:, :, 25:])
lse_ab = merge_lse(lse_a, lse_b)
o_ab = torch.exp(lse_a - lse_ab)[..., None] * o_a + torch.exp(lse_b - lse_ab)[..., None] * o_b
o_full, lse_full = attention_reference(q1, k1, v1)
print("two halves merged by L equal full attention:",
      torch.allclose(o_ab, o_full, atol=1e-12), torch.allclose(lse_ab, lse_full, atol=1e-12))

# %% [markdown]
# ## 4.5 The forward kernel in Triton
#
# The kernel is FlashAttention-2's forward pass with one program per (query block, batch x
# head), the grid's two axes. A program loads its $B_r \times d$ query block once, then
# walks the key/value blocks: a `tl.dot` for the scores (tensor cores, float32
# accumulation), the online-softmax update of (2.2) with the rescaling deferred, a second
# `tl.dot` for $\tilde P V$. Details that make it fast and correct:
#
# * **Base-2 exponentials.** GPUs compute $2^x$ natively; $e^x = 2^{x \log_2 e}$, so the
#   scores are scaled once by $\tau \log_2 e$ and `exp2` is used throughout. $L$ is converted
#   back to natural log at the end, so the library's $L$ matches the reference's.
# * **Masking only where needed.** Under a causal mask, key blocks entirely left of the
#   diagonal need no mask, blocks entirely right of it are skipped, and only the blocks
#   crossing it (or the ragged last block) evaluate the mask. The helper
#   `_attend_key_blocks` is compiled twice, with `MASKED` off and on.
# * **Empty rows.** A query that sees no key keeps $m = -\infty$; the stand-in max of
#   chapter 2 keeps $e^{-\infty - (-\infty)}$ from producing `nan`, and the output is 0.
# * **GQA without copies.** Program $(b, h)$ reads key/value head $h / G$ directly.
# * **Any head dimension up to 256.** Blocks are powers of two (at least 16, the smallest
#   `tl.dot` takes), so $d = 96$ uses a 128-wide block with the last 32 columns masked to
#   zero, which leaves every dot product unchanged; $d = 40$ uses 64 columns. Above 256 the
#   blocks no longer fit on chip and `flash_attention` uses the PyTorch block loop.
# * **64-bit offsets.** A row offset times a row stride can pass $2^{31}$: with $H d = 8192$
#   in a (batch, sequence, heads, head_dim) layout, that happens past 262,144 rows. Triton's
#   index arithmetic is 32-bit by default, so the row indices are widened to `int64` before
#   they are multiplied by a stride.

# %%
#| export kernels.flash_attention
import math

import torch

from kernels import runtime
from kernels.runtime import check_launchable, tl, triton
from lrn_lib import validate

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256   # any d from 1 to 256: the head block is d rounded up to a power of two
LOG2_E = 1.4426950408889634


@triton.jit
def _tile(base, stride_row, offs_row, offs_d):
    """Pointers to rows offs_row (BLOCK,) and columns offs_d (BLOCK_D,) of one head: a (BLOCK, BLOCK_D) block."""
    return base + offs_row.to(tl.int64)[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _row_block(n_heads, n_rows, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's place in the grid (row blocks, B * n_heads): its first row, b * n_heads + h, b, h,
    row offsets (BLOCK,), head offsets (BLOCK_D,) and the (BLOCK, BLOCK_D) mask of rows and columns in range."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return start, bh, (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64), offs, offs_d, mask


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       lo, hi, n_keys, causal_offset, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge key/value blocks [lo, hi) into one query block's running (acc, l, m); log2 units.

    acc: (BLOCK_M, BLOCK_D) unnormalized output; l_i, m_i: (BLOCK_M,) running sum and max.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(_tile(k_base, stride_kn, offs_n, offs_d), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale                      # S = tau Q K^T, in log2 units
        if MASKED:
            visible = offs_n[None, :] < n_keys
            if CAUSAL:                                               # bottom-right aligned
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)       # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)                           # rescale only the old state
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(_tile(v_base, stride_vn, offs_n, offs_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_range(q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, unmasked_end, hi, n_keys,
                  causal_offset, qk_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One query block's attention over keys [lo, hi), masks applied from unmasked_end on (a block boundary).

    Returns O (BLOCK_M, BLOCK_D) normalized by l, and L = m + log2 l (BLOCK_M,) in log2 units (-inf: no key seen).
    """
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                       lo, unmasked_end, n_keys, causal_offset, qk_scale,
                                       False, CAUSAL, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                       unmasked_end, hi, n_keys, causal_offset, qk_scale,
                                       True, CAUSAL, BLOCK_N, HEAD_DIM)
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(has_keys, m_i + tl.math.log2(l_safe), -float("inf"))  # normalize once


@triton.jit
def flash_attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
        n_heads, group_size, n_queries, n_keys, causal_offset, qk_scale,
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlashAttention-2 forward for BLOCK_M queries of one (batch, head): O and L (natural log).

    q, o: (B, H, Nq, d); k, v: (B, Hkv, Nk, d), unit stride on d; lse: (B, H, Nq) float32.
    """
    start_m, bh, b, h, offs_m, offs_d, q_mask = _row_block(n_heads, n_queries, BLOCK_M, BLOCK_D, HEAD_DIM)
    kv_h = h // group_size
    q = tl.load(_tile(q_ptr + b * stride_qb + h * stride_qh, stride_qm, offs_m, offs_d), mask=q_mask, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    if CAUSAL:   # keys < unmasked_end are visible to every row of the block; none >= hi is
        unmasked_end = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0), n_keys)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), n_keys)
    else:
        unmasked_end = n_keys
        hi = n_keys
    unmasked_end = (unmasked_end // BLOCK_N) * BLOCK_N
    o, lse2 = _attend_range(q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, unmasked_end, hi, n_keys,
                            causal_offset, qk_scale, CAUSAL, BLOCK_M, BLOCK_D, BLOCK_N, HEAD_DIM)
    lse = lse2 / 1.4426950408889634                                  # back to natural log
    tl.store(_tile(o_ptr + b * stride_ob + h * stride_oh, stride_om, offs_m, offs_d), o.to(o_ptr.dtype.element_ty),
             mask=q_mask)
    tl.store(lse_ptr + bh.to(tl.int64) * n_queries + offs_m, lse, mask=offs_m < n_queries)


# %% [markdown]
# The launcher validates, picks block sizes by head dimension (the forward ones follow the
# Triton tutorial's choices for Hopper; the backward ones below come from
# `benchmarks/sweep_flash_attention.py` on an H100), and launches one program per query block and
# (batch, head). Triton 3.6's interpreter computes `tl.dot` of bfloat16 blocks wrongly, so
# under the interpreter (CPU) bfloat16 inputs are run in float32 and the results rounded
# back; compiled on a GPU, bfloat16 runs as bfloat16.

# %%
#| export kernels.flash_attention
def check_flash_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       scale: float | None = None, *, launch: bool = True) -> None:
    """Raise a clear error unless the kernels can run attention on q, k, v (shapes as in the forward kernel).

    causal: a bool; scale: None or a positive finite number. launch=False leaves out the last
    check, that the kernels can run on q's device here.
    """
    validate.attention_inputs(q, k, v, causal, scale)
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"q, k, v have dtype {q.dtype}; the attention kernels take float16 or bfloat16")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported; the kernels take 1 to {MAX_HEAD_DIM}")
    if launch:
        check_launchable("q", q)


def check_backward_inputs(q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                          dlse: torch.Tensor | None) -> None:
    """Raise a clear error unless o, do (like q), lse and dlse ((B, H, Nq) float32) fit the backward kernels."""
    validate.tensor(q, "q", dims=4)
    for name, t, shape, dtypes in (("o", o, q.shape, (q.dtype,)), ("do", do, q.shape, (q.dtype,)),
                                   ("lse", lse, q.shape[:3], (torch.float32,)),
                                   ("dlse", dlse, q.shape[:3], (torch.float32,))):
        if t is None and name == "dlse":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; expected {dtypes[0]}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} to match q")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must share a device")


def head_block(head_dim: int) -> int:
    """BLOCK_D of the kernels: head_dim rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    validate.integer(head_dim, "head_dim", low=1, high=MAX_HEAD_DIM)
    return max(16, triton.next_power_of_2(head_dim))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has unit stride (any other strides are passed to the kernels), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _interpreter_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float32 copies of bfloat16 tensors under the interpreter, whose bfloat16 tl.dot is wrong."""
    if runtime.MODE == "interpreted" and tensors[0].dtype == torch.bfloat16:
        return [t.float() for t in tensors]
    return list(tensors)


def forward_config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel for a head dimension."""
    validate.integer(head_dim, "head_dim", low=1, high=MAX_HEAD_DIM)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention O and log-sum-exp L with the forward kernel; the conventions of attention_reference.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); float16/bfloat16, 1 <= d <= MAX_HEAD_DIM.
    Returns O of q's shape and dtype and L: (B, H, Nq) float32.
    """
    check_flash_inputs(q, k, v, causal, scale)
    dtype = q.dtype
    q, k, v = _interpreter_dtype(*(_last_dim_contiguous(t) for t in (q, k, v)))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = forward_config(d)
    flash_attention_forward_kernel[(triton.cdiv(n_q, block_m), b * h)](
        q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h, h // h_kv, n_q, n_k, n_k - n_q, scale * LOG2_E,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_D=head_block(d), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    return o.to(dtype), lse


# %% [markdown]
# ## 4.6 The backward kernels
#
# The backward pass (4.2) has two reductions in opposite directions: $dK_j, dV_j$ sum over
# query blocks, $dQ_i$ sums over key blocks. FlashAttention-2's CUDA code runs one program
# per key block that accumulates $dK_j, dV_j$ on chip and adds its share of every $dQ_i$
# into a float32 buffer with atomic additions; the Triton tutorial's fused attention uses
# one backward kernel whose programs first compute $dK_j, dV_j$ for a key block and then
# $dQ_i$ for a query block, each with its own loop. We split those two loops into two
# kernels, after a small preprocessing one, which needs no atomics and keeps each kernel
# short to read, at the price of computing $S$ and $dP$ twice:
#
# 1. `flash_attention_preprocess_kernel`: $D = \mathrm{rowsum}(dO \odot O)$.
# 2. `flash_attention_dkdv_kernel`: one program per (key block, batch x key/value head). It
#    keeps $K_j, V_j$ and the accumulators $dK_j, dV_j$ on chip and loops over every query
#    head of its group and every query block that can see the keys, recomputing
#    $P_{ij}^\top = e^{\tau K_j Q_i^\top - L_i}$ directly in transposed form, so that the
#    products $P^\top dO$ and $dS^\top Q$ take it as it is; only the operands $Q$ and $dO$ are
#    transposed (`tl.trans`) where a product needs them.
#    Summing over the group's query heads here is what makes GQA's $dK, dV$ correct
#    without materializing repeated keys.
# 3. `flash_attention_dq_kernel`: one program per (query block, batch x head), looping over
#    key blocks, as in the forward pass.
#
# $P$ is recomputed twice (once per kernel): the price of never storing it. Counting
# products, the minimal backward pass has five ($S$ again, $dV$, $dP$, $dQ$, $dK$); our two
# kernels run seven, since $S$ and $dP$ are computed in both.

# %%
#| export kernels.flash_attention
@triton.jit
def _row_stats(lse_ptr, delta_ptr, rows, offs_m, n_queries):
    """L (in log2 units) and D of queries offs_m of the (batch, head) whose rows start at `rows`."""
    in_range = offs_m < n_queries
    lse = tl.load(lse_ptr + rows + offs_m, mask=in_range, other=0.0) * 1.4426950408889634
    return lse, tl.load(delta_ptr + rows + offs_m, mask=in_range, other=0.0)


@triton.jit
def flash_attention_preprocess_kernel(o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_om,
                                      stride_dob, stride_doh, stride_dom, n_heads, n_queries,
                                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """D = rowsum(dO * O) for BLOCK_M queries of one (batch, head); delta: (B, H, Nq) float32."""
    _, bh, b, h, offs_m, offs_d, mask = _row_block(n_heads, n_queries, BLOCK_M, BLOCK_D, HEAD_DIM)
    o = tl.load(_tile(o_ptr + b * stride_ob + h * stride_oh, stride_om, offs_m, offs_d), mask=mask, other=0.0)
    do = tl.load(_tile(do_ptr + b * stride_dob + h * stride_doh, stride_dom, offs_m, offs_d), mask=mask, other=0.0)
    o, do = o.to(tl.float32), do.to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * n_queries + offs_m, tl.sum(o * do, axis=1), mask=offs_m < n_queries)


@triton.jit
def flash_attention_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        n_heads, n_kv_heads, group_size, n_queries, n_keys, causal_offset, qk_scale, scale,
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV (4.2) of BLOCK_N keys of one (batch, kv head), summed over the group's query heads.

    Shapes as in the forward kernel; dk, dv like k, v; lse, delta: (B, H, Nq) float32.
    """
    start_n, _, b, kv_h, offs_n, offs_d, kv_mask = _row_block(n_kv_heads, n_keys, BLOCK_N, BLOCK_D, HEAD_DIM)
    k = tl.load(_tile(k_ptr + b * stride_kb + kv_h * stride_kh, stride_kn, offs_n, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_tile(v_ptr + b * stride_vb + kv_h * stride_vh, stride_vn, offs_n, offs_d), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:   # the first query that sees key start_n is start_n - causal_offset
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    for h in range(kv_h * group_size, (kv_h + 1) * group_size):
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        rows = (b * n_heads + h) * n_queries
        for start_m in range(lo, n_queries, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(_tile(q_base, stride_qm, offs_m, offs_d), mask=q_mask, other=0.0)
            do = tl.load(_tile(do_base, stride_dom, offs_m, offs_d), mask=q_mask, other=0.0)
            lse, delta = _row_stats(lse_ptr, delta_ptr, rows, offs_m, n_queries)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale                 # S^T, (BLOCK_N, BLOCK_M), log2 units
            visible = (offs_m[None, :] < n_queries) & (offs_n[:, None] < n_keys)
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
            p_t = tl.where(visible, tl.math.exp2(s_t - lse[None, :]), 0.0)   # recomputed P^T
            dv += tl.dot(p_t.to(do.dtype), do)                       # dV += P^T dO
            dp_t = tl.dot(v, tl.trans(do))                           # dP^T = V dO^T
            ds_t = p_t * (dp_t - delta[None, :])                     # dS^T
            dk += tl.dot(ds_t.to(q.dtype), q)                        # dK += dS^T Q
    tl.store(_tile(dk_ptr + b * stride_dkb + kv_h * stride_dkh, stride_dkn, offs_n, offs_d),
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(dv_ptr + b * stride_dvb + kv_h * stride_dvh, stride_dvn, offs_n, offs_d),
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def flash_attention_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
        stride_dqb, stride_dqh, stride_dqm,
        n_heads, group_size, n_queries, n_keys, causal_offset, qk_scale, scale,
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (4.2) of BLOCK_M queries of one (batch, head); shapes as in the forward kernel."""
    start_m, bh, b, h, offs_m, offs_d, q_mask = _row_block(n_heads, n_queries, BLOCK_M, BLOCK_D, HEAD_DIM)
    q = tl.load(_tile(q_ptr + b * stride_qb + h * stride_qh, stride_qm, offs_m, offs_d), mask=q_mask, other=0.0)
    do = tl.load(_tile(do_ptr + b * stride_dob + h * stride_doh, stride_dom, offs_m, offs_d), mask=q_mask, other=0.0)
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh.to(tl.int64) * n_queries, offs_m, n_queries)
    kv_h = h // group_size
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), n_keys)
    else:
        hi = n_keys
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(_tile(k_base, stride_kn, offs_n, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_tile(v_base, stride_vn, offs_n, offs_d), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = (offs_m[:, None] < n_queries) & (offs_n[None, :] < n_keys)
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)  # recomputed P
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])         # dS = P * (dO V^T - D)
        dq += tl.dot(ds.to(k.dtype), k)                              # dQ += dS K
    tl.store(_tile(dq_ptr + b * stride_dqb + h * stride_dqh, stride_dqm, offs_m, offs_d),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def backward_configs(head_dim: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel and of the dQ kernel."""
    validate.integer(head_dim, "head_dim", low=1, high=MAX_HEAD_DIM)
    if head_dim <= 128:
        return (64, 64, 4, 2), (64, 64, 4, 2)
    return (32, 32, 4, 1), (32, 32, 4, 1)


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, do: torch.Tensor, causal: bool = False,
                             scale: float | None = None, dlse: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of attention (4.2) from the forward's O and L; shapes and dtypes of q, k, v.

    o, do: like q; lse: (B, H, Nq) float32 from the forward. dlse, optional (B, H, Nq)
    float32: the gradient reaching L, added through dS = P * (dP - (D - dL)) (4.3).
    """
    check_flash_inputs(q, k, v, causal, scale, launch=False)
    check_backward_inputs(q, o, lse, do, dlse)
    check_launchable("q", q)
    dtype = q.dtype
    q, k, v, o, do = _interpreter_dtype(*(_last_dim_contiguous(t) for t in (q, k, v, o, do)))
    lse = lse.contiguous()
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = head_block(d)
    delta = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    flash_attention_preprocess_kernel[(triton.cdiv(n_q, 64), b * h)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, n_q, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64)
    if dlse is not None:
        delta -= dlse                                                # D - dL   (4.3)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    (bm1, bn1, w1, s1), (bm2, bn2, w2, s2) = backward_configs(d)
    flash_attention_dkdv_kernel[(triton.cdiv(n_k, bn1), b * h_kv)](
        q, k, v, do, lse, delta, dk, dv, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        h, h_kv, h // h_kv, n_q, n_k, n_k - n_q, scale * LOG2_E, scale,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm1, BLOCK_N=bn1, num_warps=w1, num_stages=s1)
    flash_attention_dq_kernel[(triton.cdiv(n_q, bm2), b * h)](
        q, k, v, do, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        h, h // h_kv, n_q, n_k, n_k - n_q, scale * LOG2_E, scale,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm2, BLOCK_N=bn2, num_warps=w2, num_stages=s2)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# %% [markdown]
# ## 4.7 One `flash_attention()` for the rest of the book
#
# An `autograd.Function` ties the kernels together (the forward saves $Q, K, V, O, L$; the
# backward calls the three kernels), and `flash_attention` picks the kernel when it can run
# (CUDA tensors of a supported dtype and head dimension, Triton compiled) and the PyTorch
# block reference otherwise, which is differentiable by autograd. `return_lse=True` also
# returns $L$, for chapter 8's ring attention; gradients flow through $L$ on both paths
# (on the kernel path by (4.3)). On a CUDA GPU where the kernels cannot run (Triton missing
# or interpreted, a head dimension above 256), `flash_attention` says once that it runs the
# much slower PyTorch block loop instead; float32 inputs take the block loop by design.
# (A generation step, a few queries against a long cache, wants other kernels: chapter 6
# writes them on top of these, in section 6.4.)

# %%
#| export lrn_lib.attention
class FlashAttention(torch.autograd.Function):
    """Attention whose forward and backward passes run the Triton kernels of kernels.flash_attention."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                scale: float | None = None):
        """(O, L) from flash_attention_forward; saves what the backward pass recomputes from."""
        from kernels.flash_attention import flash_attention_forward

        o, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        """dQ, dK, dV from flash_attention_backward, with L's gradient by (4.3); None for causal and scale."""
        from kernels.flash_attention import flash_attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = flash_attention_backward(q, k, v, o, lse, do.to(o.dtype), ctx.causal, ctx.scale,
                                              dlse=None if dlse is None else dlse.float())
        return dq, dk, dv, None, None


def kernel_can_run(q: torch.Tensor) -> bool:
    """Whether flash_attention would use the Triton kernels for a query tensor like q."""
    from kernels.flash_attention import MAX_HEAD_DIM

    validate.tensor(q, "q", dims=4)
    return (runtime.MODE == "compiled" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= MAX_HEAD_DIM)


def _note_cuda_fallback(q: torch.Tensor) -> None:
    """Warn once when a 16-bit CUDA attention runs the block loop because the kernels cannot run."""
    from kernels.flash_attention import MAX_HEAD_DIM

    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return
    if runtime.MODE == "unavailable":
        runtime.note_fallback()
    elif runtime.MODE == "interpreted":
        runtime.note_fallback("TRITON_INTERPRET=1 on a CUDA machine: flash_attention runs the PyTorch "
                              "block loop, not the compiled kernels")
    elif q.shape[-1] > MAX_HEAD_DIM:
        runtime.note_fallback(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}: flash_attention runs the PyTorch "
                              "block loop, not the kernels")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False):
    """Exact attention softmax(scale Q K^T) V with GQA and bottom-right causal masks.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d) with Hkv dividing H. Returns O of q's shape and
    dtype, and with return_lse=True also L: (B, H, Nq) in float32 (float64 for float64 input).
    Uses the Triton kernels where kernel_can_run(q), else flash_attention_blocks.
    """
    check_attention_inputs(q, k, v, causal, scale)
    validate.flag(return_lse, "return_lse")
    if kernel_can_run(q):
        o, lse = FlashAttention.apply(q, k, v, causal, scale)
    else:
        _note_cuda_fallback(q)
        o, lse = flash_attention_blocks(q, k, v, causal, scale)
    return (o, lse) if return_lse else o


# %% [markdown]
# ## 4.8 Checking the kernels
#
# The acceptance bar of FlashAttention's own tests: the kernel's error against a
# high-precision reference (float64 here) may be at most twice the error of standard
# attention computed entirely in the same low precision by PyTorch. We also hold the
# kernels to a stricter bar: twice the error of attention computed in float32 with only
# the inputs and the probabilities $P$ rounded to bfloat16 or float16. That reference
# keeps its gradients in float32, while our backward kernels round $dS$ and $P$ to 16 bits
# for the tensor-core products, so on large GPU problems the ratio comes close to the bar:
# up to 1.77 over five seeds on an H200, against at most 1.22 for FlashAttention's own
# bar (`benchmarks/flash_attention_tolerance.py`, output in `benchmarks/results/`). The
# GPU tests therefore use FlashAttention's bar. On the CPU the kernels run in the
# interpreter at small sizes; on a GPU the same cell runs larger ones.

# %%
from kernels.flash_attention import flash_attention_backward, flash_attention_forward


def low_precision_attention(q, k, v, causal, do):
    """Standard attention with float32 accumulation but P rounded to the inputs' dtype, and its gradients."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    s = (qq.float() @ kk.float().repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_visible(q.shape[2], k.shape[2], q.device), -float("inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    o = (p.float() @ vv.float().repeat_interleave(group, 1)).to(q.dtype)
    return (o, *torch.autograd.grad(o, (qq, kk, vv), do))


def attention_16bit(q, k, v, causal, do):
    """Standard attention computed entirely in q's 16-bit dtype by PyTorch, and its gradients."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    s = qq @ kk.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_visible(q.shape[2], k.shape[2], q.device), -float("inf"))
    o = torch.softmax(s, -1).nan_to_num(0.0) @ vv.repeat_interleave(group, 1)
    return (o, *torch.autograd.grad(o, (qq, kk, vv), do))


def kernel_errors(b, h, h_kv, n_q, n_k, d, causal, dtype):
    """Max errors against float64 of the kernels, rounded-P and all-16-bit attention: O, dQ, dK, dV; and L's."""
    shape_q, shape_kv = (b, h, n_q, d), (b, h_kv, n_k, d)
    q, k, v = (torch.randn(s, device=config.DEVICE).to(dtype) for s in (shape_q, shape_kv, shape_kv))
    do = torch.randn(shape_q, device=config.DEVICE).to(dtype)
    o, lse = flash_attention_forward(q, k, v, causal)
    ours = (o, *flash_attention_backward(q, k, v, o, lse, do, causal))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_reference(q64, k64, v64, causal)
    exact = (o64, *torch.autograd.grad(o64, (q64, k64, v64), do.double()))
    finite = lse64.isfinite()
    lse_error = (lse.double()[finite] - lse64[finite]).abs().max().item()
    return [[(a.double() - e).abs().max().item() for a, e in zip(grads, exact)]
            for grads in (ours, low_precision_attention(q, k, v, causal, do), attention_16bit(q, k, v, causal, do))
            ] + [lse_error]


cases = config.pick(
    cpu=[(1, 2, 1, 17, 17, 32, True), (1, 2, 2, 113, 37, 64, True), (2, 4, 2, 37, 113, 96, False),
         (1, 1, 1, 1, 64, 128, False), (1, 2, 1, 20, 33, 256, True)],
    gpu=[(1, 8, 2, 1000, 1000, 64, True), (2, 8, 8, 1024, 4096, 128, False), (1, 4, 1, 4096, 1024, 256, True),
         (2, 16, 4, 513, 777, 96, False), (4, 8, 8, 2048, 2048, 32, True)])
if kernels.runtime.MODE != "unavailable":
    within = {"FlashAttention's": True, "rounded-P": True}
    for case in cases:
        for dtype in (torch.bfloat16, torch.float16):
            ours, low, pure, lse_error = kernel_errors(*case, dtype)
            flash_bar = all(o <= 2 * max(p, 1e-3) for o, p in zip(ours, pure)) and lse_error < 1e-3
            strict_bar = all(o <= 2 * max(l, 1e-3) for o, l in zip(ours, low)) and lse_error < 1e-3
            within["FlashAttention's"] &= flash_bar
            within["rounded-P"] &= strict_bar
            print(f"B,H,Hkv,Nq,Nk,d,causal = {case} {str(dtype):14s} O, dQ, dK, dV and L within "
                  f"FlashAttention's bar: {flash_bar}, the rounded-P bar: {strict_bar}")
    print("every case within FlashAttention's bar (twice the all-16-bit error):", within["FlashAttention's"])
    print("every case within the stricter rounded-P bar:", within["rounded-P"])
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# ### Numerics of the backward pass
#
# One step of the backward pass loses more precision than the rest. $D_i =
# \mathrm{rowsum}(dO_i \odot O_i)$ is computed from the *stored* $O$, which was rounded to
# 16 bits (a relative error of $2^{-11}$ in float16, $2^{-8}$ in bfloat16). When the
# softmax is peaked, row $i$ puts almost all its weight on one key $j$, so $O_i \approx V_j$
# and $D_i \approx dO_i \cdot V_j \approx dP_{ij}$: the difference $dP_{ij} - D_i$ in (4.2)
# cancels, and what is left of it is mostly the rounding error of $O$, which $dS$ then
# carries into $dK$ and $dQ$. FlashAttention-2 computes $D$ the same way (storing $O$ in
# float32 would double its memory). The next cell makes the scores peaked by scaling $Q$
# and compares the error in $dK$ of: the block reference given the exact $O$, the same
# reference given $O$ rounded to 16 bits, our kernels, and standard attention computed
# entirely in 16-bit arithmetic by PyTorch, which is FlashAttention's own bar.

# %%
def dk_errors(sharpness: float, dtype: torch.dtype, n: int = 64, d: int = 32) -> dict[str, float]:
    """Max |dK - dK_float64| of four backward passes on scores made peaked by scaling Q."""
    q = (sharpness * torch.randn(1, 2, n, d, device=config.DEVICE)).to(dtype)
    k, v, do = (torch.randn(1, 2, n, d, device=config.DEVICE).to(dtype) for _ in range(3))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_reference(q64, k64, v64)
    dk64 = torch.autograd.grad(o64, k64, do.double())[0]
    o, lse = flash_attention_forward(q, k, v)
    candidates = {
        "reference, exact O": flash_attention_backward_blocks(q64, k64, v64, o64, lse64, do.double())[1],
        "reference, 16-bit O": flash_attention_backward_blocks(q64, k64, v64, o64.to(dtype).double(), lse64,
                                                               do.double())[1],
        "our kernels": flash_attention_backward(q, k, v, o, lse, do)[1],
        "all-16-bit attention": attention_16bit(q, k, v, False, do)[2],
    }
    return {name: (g.double() - dk64).abs().max().item() for name, g in candidates.items()}


if kernels.runtime.MODE != "unavailable":
    config.seed_everything(1)
    numerics = {(dtype, sharp): dk_errors(sharp, dtype) for dtype in (torch.float16, torch.bfloat16)
                for sharp in (1.0, 8.0)}
else:
    print("(skipped: needs Triton)")

# %%
# NBVAL_IGNORE_OUTPUT
if kernels.runtime.MODE != "unavailable":
    print(f"{'dtype':15s} {'Q scale':>7s}", " ".join(f"{name:>21s}" for name in next(iter(numerics.values()))))
    for (dtype, sharp), errors in numerics.items():
        print(f"{str(dtype):15s} {sharp:7.0f}", " ".join(f"{e:21.1e}" for e in errors.values()))
else:
    print("(skipped: needs Triton)")

# %%
if kernels.runtime.MODE != "unavailable":
    peaked = [numerics[(dtype, 8.0)] for dtype in (torch.float16, torch.bfloat16)]
    print("peaked scores: our dK error is that of D computed from the 16-bit O (within 1.5x):",
          all(e["our kernels"] <= 1.5 * e["reference, 16-bit O"] for e in peaked))
    print("peaked scores: the 16-bit O costs over 100x the exact-O error:",
          all(e["reference, 16-bit O"] > 100 * e["reference, exact O"] for e in peaked))
    print("every case: our kernels within FlashAttention's bar (2x the all-16-bit error):",
          all(e["our kernels"] <= 2 * e["all-16-bit attention"] for e in numerics.values()))
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# With peaked scores, our $dK$ is as accurate as $D$ from the rounded $O$ allows, and that
# rounding, not the kernels' block arithmetic, sets the error; it stays far below the error
# of attention computed in 16 bits throughout, which is FlashAttention's acceptance test.
# A reader who needs better gradients in this regime can keep $O$ in float32 for the
# backward pass.

# %% [markdown]
# ## 4.9 The block schedule
#
# Which key blocks does each query block visit? Under a causal mask the forward kernel skips
# every block right of the diagonal and evaluates the mask only on blocks that cross it;
# with $N_q < N_k$ the diagonal moves right (bottom-right alignment), with $N_q > N_k$ the
# top query blocks have fewer (or no) keys to see.

# %%
def block_schedule(n_q: int, n_k: int, block_m: int, block_n: int, causal: bool) -> torch.Tensor:
    """(query blocks, key blocks): 0 skipped, 1 visited without a mask, 2 visited with the mask."""
    rows, cols = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    grid = torch.zeros(rows, cols, dtype=torch.long)
    offset = n_k - n_q
    for r in range(rows):
        start_m = r * block_m
        unmasked_end = min(max(start_m + offset + 1, 0), n_k) if causal else n_k
        hi = min(max(start_m + block_m + offset, 0), n_k) if causal else n_k
        unmasked_end = unmasked_end // block_n * block_n
        for c in range(cols):
            start_n = c * block_n
            grid[r, c] = 1 if start_n < unmasked_end else 2 if start_n < hi else 0
    return grid


fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
for ax, (n_q, n_k, causal) in zip(axes, [(1024, 1000, False), (1024, 1024, True), (512, 1024, True)]):
    grid = block_schedule(n_q, n_k, 128, 64, causal)
    ax.imshow(grid, cmap=plt.matplotlib.colors.ListedColormap(["white", "C0", "C1"]), vmin=0, vmax=2)
    ax.set_title(f"Nq={n_q}, Nk={n_k}, {'causal' if causal else 'full'}", fontsize=9)
    ax.set_xlabel("key block (64 keys)")
    ax.set_ylabel("query block (128 queries)")
    visited = int((grid > 0).sum())
    print(f"Nq={n_q:4d} Nk={n_k:4d} causal={causal!s:5s}: {visited} of {grid.numel()} blocks visited, "
          f"{int((grid == 2).sum())} with the mask")
fig.suptitle("Blue: no mask needed; orange: mask evaluated; white: skipped", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4.10 Speed
#
# The FLOPs of attention are those of its two matrix products, $4 N_q N_k d$ per head forward
# (half that under a causal mask), and 2.5 times that for the backward pass (the five
# products of the minimal backward, one of them the recomputation of $S$). These are
# *model* FLOPs, the count the FlashAttention papers use: our backward kernels run seven
# products (section 4.6), so the work they do is 3.5 times the forward's, and a fwd+bwd
# TFLOP/s figure computed from model FLOPs undercounts their arithmetic. SDPA's
# `is_causal=True` is used only for square problems below, where its top-left mask equals
# ours. On a GPU the next cell measures TFLOP/s against
# sequence length for our kernels, PyTorch's `scaled_dot_product_attention` with its
# FlashAttention-2 backend and with NVIDIA's cuDNN backend, and standard attention.
# `python -m kernels.bench flash_attention` makes the full comparison of the acceptance
# list; its table is in `benchmarks/results/` and the README.

# %%
# NBVAL_IGNORE_OUTPUT
if config.PROFILE == "gpu":
    import sys

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tqdm.auto import tqdm
    from triton.testing import do_bench

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    def standard(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                             + torch.full((q.shape[2], k.shape[2]), -float("inf"), device=q.device,
                                          dtype=q.dtype).triu(1), -1) @ v

    contenders = {"ours (Triton)": lambda q, k, v: flash_attention_forward(q, k, v, True),
                  "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
                  "standard": standard}
    lengths = [512, 1024, 2048, 4096, 8192, 16384]
    tflops = {name: [] for name in contenders}
    for n in tqdm(lengths, desc="sequence lengths", file=sys.stderr):
        q, k, v = (torch.randn(max(1, 16384 // n), 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 2 * q.shape[0] * 16 * n * n * 128      # causal: half of 4 N^2 d per head
        for name, fn in contenders.items():
            if name == "standard" and n > 8192:
                tflops[name].append(float("nan"))
                continue
            tflops[name].append(flops / do_bench(lambda: fn(q, k, v), return_mode="median") / 1e9)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in tflops.items():
        ax.plot(lengths, values, "o-", label=name)
        print(f"{name:14s}", " ".join(f"{t:5.0f}" for t in values), "TFLOP/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (batch x length = 16384, 16 heads, d = 128, causal, bf16)")
    ax.set_ylabel("forward TFLOP/s")
    ax.set_title(config.describe().split(" | ")[0], fontsize=9)
    ax.legend(fontsize=8)
    plt.show()
    print("ours over SDPA flash at 16k:", round(tflops["ours (Triton)"][-1] / tflops["SDPA flash"][-1], 2))
else:
    print("no CUDA GPU: speed is measured only in the GPU profile (see benchmarks/results/)")

# %% [markdown]
# On the H100 we measured (table in the README), our forward kernel runs ahead of PyTorch's
# FlashAttention-2 backend, which was written for the A100 and does not use the H100's
# newer instructions, while NVIDIA's cuDNN backend stays ahead of ours. We have not profiled
# cuDNN's kernels, so why it is faster is an informed guess, not a measurement: the
# FlashAttention-3 paper (Shah et al. 2024) attributes its own gains over FlashAttention-2 on
# Hopper to asynchronous warpgroup matrix instructions (`wgmma`) issued by producer and
# consumer warps that overlap the softmax of one block with the matrix products of the
# next, and to the tensor memory accelerator (TMA) for the loads; whether cuDNN's kernels
# do the same cannot be seen without a profile. Our kernel leaves those choices to Triton's compiler,
# which pipelines loads but does not overlap softmax with matmuls across warps.

# %% [markdown]
# ## Where the slides and the papers differ
#
# The lecture slides say FlashAttention-2 reaches "90–95% GPU utilization". The paper reports
# 50–73% of the theoretical maximum FLOP/s on an A100 for the forward pass (up to 230
# TFLOP/s) and up to 225 TFLOP/s (72% model FLOPs utilization) end to end in training. The
# slides' list of adopters is not from the paper either; we leave it out. The 16x cost of
# non-matmul FLOPs is the paper's A100 figure (19.5 versus 312 TFLOP/s).
#
# ## Summary
#
# * Standard attention writes and reads $N \times N$ matrices; FlashAttention tiles the two
#   products and merges softmax states across key blocks (chapter 2's merge), so it moves
#   only $Q, K, V, O$ and reads $K, V$ once per query block.
# * FlashAttention-2 puts the query loop outside (one program per query block), defers the
#   normalization to the end, keeps only $L$, and recomputes $P$ in the backward pass with
#   $D = \mathrm{rowsum}(dO \odot O)$.
# * The Triton kernels handle causal masks aligned to the bottom right, GQA/MQA without
#   copies, head dimensions from 1 to 256, lengths that are not multiples of the blocks,
#   and gradients through $L$ (4.3).
#
# Exported: `lrn_lib.attention` (`attention_reference`, `causal_visible`,
# `check_attention_inputs`, `flash_attention_blocks`, `flash_attention_backward_blocks`,
# `FlashAttention`, `kernel_can_run`, `flash_attention`) and `kernels.flash_attention` (the
# forward, preprocessing, dK/dV and dQ kernels with their launchers).

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("04.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("04")))` lists the checkers. Worked solutions:
# `chapters/solutions/04_flash_attention_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): deferred normalization is exact.** For one query row, let key
# blocks $1, \dots, T$ arrive in order and run FlashAttention-2's update (change 2 of section
# 4.4) from $\tilde o = 0$, $\ell = 0$, $m = -\infty$. Show by induction that after block
# $t$: $m^{(t)}$ is the maximum of the scores seen so far, $\ell^{(t)} = \sum_{j \le t}
# e^{S_j - m^{(t)}}$ and $\tilde o^{(t)} = \sum_{j \le t} e^{S_j - m^{(t)}} V_j$ (sums over the
# keys of those blocks). Conclude that $\tilde o^{(T)} / \ell^{(T)}$ is the row of $O$ in
# (4.1) and $m^{(T)} + \log \ell^{(T)}$ is $L$. Then show that
# $D_i = \mathrm{rowsum}(dO_i \odot O_i)$ equals $\mathrm{rowsum}(dP_i \odot P_i)$ (use
# $O = PV$ and $dP = dO\, V^\top$).
#
# **Exercise 2 (implement): one FlashAttention-2 step.** Write
# `block_update(acc, l, m, s, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]` that
# merges one block of scores into a query block's state: `acc` $(B_r, d)$ the unnormalized
# output $\tilde O_i$, `l` and `m` $(B_r,)$ the running sum and maximum, `s` $(B_r, B_c)$ the
# scaled scores of the block with masked entries at `-inf`, `v` $(B_c, d)$ the block's
# values. Return the new `(acc, l, m)`, unnormalized. A row whose scores so far are all
# masked must stay $(0, 0, -\infty)$ without a `nan`. Run `check("04.block_update", block_update)`.
#
# **Exercise 3 (implement): causal attention with $N_q \ne N_k$.** Write
# `causal_attention(q, k, v) -> torch.Tensor` for one head, `q` $(N_q, d)$, `k` and `v`
# $(N_k, d)$, scale $\tau = 1/\sqrt{d}$, with the bottom-right causal mask of section 4.1
# (query $i$ sees key $j$ when $j \le i + N_k - N_q$) and output 0 for queries that see no
# key. Run `check("04.causal_attention", causal_attention)`.
#
# **Exercise 4 (measure): does blocking cost accuracy?** On float32 inputs
# ($N_q = 200$, $N_k = 256$, $d = 64$, causal), compare `flash_attention_blocks` with
# `block_n` = 1, 7, 64 and 256 and the float32 `attention_reference` against the float64
# `attention_reference`, and print the maximum errors of $O$ and $L$. Look for: every
# blocking gives an error of the same order (float32 rounding, around $10^{-7}$) as the
# unblocked float32 reference, so the online merge trades no accuracy for its memory
# savings, even when each block holds a single key.
