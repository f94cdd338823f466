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
# # Chapter 6. LLaMA 3 and 4D parallelism
#
# Llama 3 (Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783) is a
# plain decoder-only transformer. Its interest lies less in the architecture than in how it
# was trained: the 405B-parameter model was trained on up to 16K H100 GPUs, each step split
# four ways at once: tensor parallelism (TP) inside a server, context parallelism (CP) over
# the sequence, pipeline parallelism (PP) over the layers and data parallelism (DP, sharded
# as in FSDP) over the batch.
#
# This chapter first builds the model (sections 6.1 to 6.3) and checks it against Hugging Face
# `transformers`' implementation, then builds each parallel dimension from scratch on
# `torch.distributed` (sections 6.4 to 6.8), each checked equal to the single-process step, composes
# all four (section 6.9), runs the same model through PyTorch's own engine with `torchrun` (section 6.10),
# and ends with the accounting of where the 405B model's bytes and messages go (section 6.11).

# %%
import math
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import kernels
from lrn_lib import config

config.seed_everything(0)
torch.set_printoptions(precision=4, sci_mode=False)
torch.set_num_threads(1)  # small matrices, and the spawned processes share the cores

# %%
# NBVAL_IGNORE_OUTPUT
print(config.describe())
print("Triton kernels run:", kernels.runtime.MODE)

# %% [markdown]
# ## 6.1 The model
#
# A Llama 3 decoder maps token ids to next-token logits through $L$ identical blocks:
#
# $$h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad x' = h + \mathrm{FFN}(\mathrm{RMSNorm}(h)) \qquad (6.1)$$
#
# Four choices distinguish it from the original transformer, all inherited from Llama 1
# and 2:
#
# * **RMSNorm** (Zhang and Sennrich 2019) instead of LayerNorm: no mean subtraction, no
#   bias, $\mathrm{RMSNorm}(x) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot g$ (6.2),
#   applied before each sub-layer ("pre-norm").
# * **Rotary position embeddings** (RoPE, Su et al. 2021) rotate each pair of query and key
#   coordinates by an angle proportional to the position, so that $q_m \cdot k_n$ depends
#   only on $m - n$.
# * **Grouped-query attention** (GQA, Ainslie et al. 2023): 8 key/value heads shared by all
#   query heads (32 query heads in the 8B model), which shrinks the KV cache 4 to 16 times.
# * **SwiGLU** feed-forward (Shazeer 2020): $\mathrm{FFN}(x) = W_2(\mathrm{SiLU}(W_1 x) \odot
#   W_3 x)$ (6.3), three matrices instead of two.
#
# In the 8B, 70B and 405B models the output head is a separate matrix (the small Llama 3.2
# models, 1B and 3B, tie it to the embedding: `tie_embeddings=True`), and nothing has a
# bias. We start with the configuration, with the published shapes of the three Llama 3.1
# models (Table 3 of the paper; vocabulary 128,256; RoPE base $\theta = 500{,}000$). The
# constants are named `LLAMA3_*`, but they are the Llama 3.1 release's: its RoPE scaling
# and 131,072-token context (Llama 3.0 had 8,192 tokens and no scaling). The FFN widths are
# not free parameters: Meta's code derives them from the model width $d$ with two knobs,
# `ffn_dim_multiplier` and `multiple_of`, as $\lceil m \lfloor 8d/3 \rfloor / r \rceil \cdot r$
# (with the products truncated to integers), which gives 14,336, 28,672 and 53,248.

# %%
#| export lrn_lib.llama
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lrn_lib import corpus, validate
from lrn_lib.attention import check_attention_inputs, flash_attention
from lrn_lib.moe import MoELayer


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling for long context (see rope_frequencies)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        validate.number(self.factor, "factor", low=0, low_open=True)
        validate.number(self.low_freq_factor, "low_freq_factor", low=0, low_open=True)
        validate.number(self.high_freq_factor, "high_freq_factor", low=self.low_freq_factor, low_open=True)
        validate.integer(self.original_max_seq_len, "original_max_seq_len", low=1)


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama 3 decoder. n_experts > 0 swaps SwiGLU for chapter 5's MoE layer."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    n_experts: int = 0
    top_k: int = 2
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            validate.integer(getattr(self, name), name, low=1)
        validate.number(self.norm_eps, "norm_eps", low=0)
        validate.number(self.rope_theta, "rope_theta", low=0, low_open=True)
        if not isinstance(self.rope_scaling, (RopeScaling, type(None))):
            raise TypeError(f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
        validate.integer(self.n_experts, "n_experts", low=0)
        validate.integer(self.top_k, "top_k", low=1, high=self.n_experts or None)
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def check_config(cfg: LlamaConfig, name: str = "cfg") -> LlamaConfig:
    """Raise TypeError unless cfg is a LlamaConfig (its own __post_init__ checked the fields); returns it."""
    if not isinstance(cfg, LlamaConfig):
        raise TypeError(f"{name} must be a LlamaConfig, got {type(cfg).__name__}")
    return cfg


def llama_ffn_dim(dim: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """The SwiGLU width of Meta's Llama code: int(multiplier * int(8 dim / 3)), rounded up to multiple_of."""
    validate.integer(dim, "dim", low=1)
    validate.number(ffn_dim_multiplier, "ffn_dim_multiplier", low=0, low_open=True)
    validate.integer(multiple_of, "multiple_of", low=1)
    hidden = int(ffn_dim_multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


# The Llama 3.1 release's shapes (params.json of each model: width, multiplier, multiple_of).
LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        ffn_dim=llama_ffn_dim(4096, 1.3, 1024), rope_scaling=RopeScaling(), max_seq_len=131072)
LLAMA3_70B = LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                         ffn_dim=llama_ffn_dim(8192, 1.3, 4096), rope_scaling=RopeScaling(), max_seq_len=131072)
LLAMA3_405B = LlamaConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                          ffn_dim=llama_ffn_dim(16384, 1.2, 4096), rope_scaling=RopeScaling(), max_seq_len=131072)


def tiny_config(**overrides) -> LlamaConfig:
    """A Llama 3 shape small enough to train on a laptop CPU: byte vocabulary, 2 layers, GQA 4:2."""
    base = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                       rope_theta=10000.0, max_seq_len=256)
    unknown = sorted(set(overrides) - set(base.__dataclass_fields__))
    if unknown:
        raise TypeError(f"tiny_config got unknown overrides {unknown}; LlamaConfig's fields are "
                        f"{sorted(base.__dataclass_fields__)}")
    return replace(base, **overrides)


# %% [markdown]
# ### Counting parameters and training FLOPs
#
# Parameters follow from the shapes: per block, $W_q$ and $W_o$ are $d \times d$, $W_k$ and
# $W_v$ are $d \times d_{kv}$ with $d_{kv} = n_{kv} \cdot d/n_h$, three FFN matrices
# $d \times d_{ff}$, and two RMSNorm gains; plus the embedding and the head
# ($V \times d$ each) and the final norm. Training a dense transformer costs about
# $6ND$ FLOPs for $N$ parameters and $D$ tokens (2 per parameter per token forward, 4
# backward; attention's own $O(T^2)$ term is left out, as in the paper's scaling laws).

# %%
#| export lrn_lib.llama
def parameter_count(cfg: LlamaConfig) -> int:
    """Number of parameters of the model cfg describes (SwiGLU or MoE FFNs; the head counted once if tied)."""
    check_config(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    attention = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv
    if cfg.n_experts:
        ffn = cfg.n_experts * 2 * cfg.dim * cfg.ffn_dim + cfg.dim * cfg.n_experts
    else:
        ffn = 3 * cfg.dim * cfg.ffn_dim
    block = attention + ffn + 2 * cfg.dim
    embeddings = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * cfg.dim
    return cfg.n_layers * block + embeddings + cfg.dim


def training_flops(n_params: float, n_tokens: float) -> float:
    """The 6ND estimate of training compute (forward 2ND + backward 4ND)."""
    validate.number(n_params, "n_params", low=0)
    validate.number(n_tokens, "n_tokens", low=0)
    return 6.0 * n_params * n_tokens


# %% [markdown]
# The paper reports 8B, 70B and 405B parameters, and 15.6T training tokens for the
# flagship, for "$3.8 \times 10^{25}$ FLOPs". Our counts from the shapes:

# %%
for name, cfg in (("8B", LLAMA3_8B), ("70B", LLAMA3_70B), ("405B", LLAMA3_405B)):
    n = parameter_count(cfg)
    print(f"Llama 3 {name:>4s}: {n / 1e9:6.2f} B parameters, of which embedding + head {2 * cfg.vocab_size * cfg.dim / 1e9:5.2f} B")
flops_405b = training_flops(parameter_count(LLAMA3_405B), 15.6e12)
print(f"405B on 15.6T tokens: 6ND = {flops_405b:.2e} FLOPs (the paper: 3.8e25)")

# %% [markdown]
# ### RMSNorm and rotary embeddings
#
# RoPE treats a head's $d_h$ coordinates as $d_h/2$ pairs; pair $i$ rotates by angle
# $m\,\omega_i$ at position $m$, with frequencies $\omega_i = \theta^{-2i/d_h}$ (6.4). Meta's
# reference code pairs adjacent coordinates $(2i, 2i+1)$; Hugging Face pairs $i$ with
# $i + d_h/2$ ("rotate half"). The two are the same model up to a fixed permutation of the
# rows of $W_q$ and $W_k$ (which the weight converters apply); we use the rotate-half
# layout, so weights copy to `transformers` unchanged:
#
# $$\mathrm{RoPE}(x)_m = x \odot \cos(m\omega) + \mathrm{rot}(x) \odot \sin(m\omega), \quad
# \mathrm{rot}(x_1, x_2) = (-x_2, x_1) \qquad (6.5)$$
#
# **Llama 3.1's frequency scaling** stretches context from 8K to 128K tokens without
# retraining from scratch: with original length $L_0 = 8192$, factor $s = 8$ and wavelength
# $\lambda_i = 2\pi/\omega_i$, frequencies whose wavelength is short ($\lambda_i < L_0 / 4$)
# are kept, long ones ($\lambda_i > L_0 / 1$) are divided by $s$, and the band between is
# interpolated with weight $\gamma = (L_0/\lambda_i - 1) / (4 - 1)$:
# $\omega_i' = (1-\gamma)\,\omega_i/s + \gamma\,\omega_i$ (6.6).

# %%
#| export lrn_lib.llama
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (6.2); x (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        validate.integer(dim, "dim", low=1)
        self.eps = validate.number(eps, "eps", low=0)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim), normalized in at least float32."""
        validate.tensor(x, "x", kind="float", nonempty=False)
        if x.dim() == 0 or x.shape[-1] != self.weight.numel():
            raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be dim={self.weight.numel()}")
        work = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(work)
        normed = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.eps)    # (6.2)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Rotation frequencies omega_i (head_dim // 2,) float64, with Llama 3.1 scaling if configured."""
    d = check_config(cfg).head_dim
    omega = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)       # (6.4)
    s = cfg.rope_scaling
    if s is None:
        return omega
    wavelength = 2 * math.pi / omega
    short = wavelength < s.original_max_seq_len / s.high_freq_factor
    long = wavelength > s.original_max_seq_len / s.low_freq_factor
    gamma = (s.original_max_seq_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    between = (1 - gamma) * omega / s.factor + gamma * omega                          # (6.6)
    return torch.where(short, omega, torch.where(long, omega / s.factor, between))


def rope_cos_sin(positions: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles m * omega_i for positions (T,): each (T, head_dim), halves repeated."""
    validate.tensor(positions, "positions", dims=1, kind="int")
    validate.tensor(omega, "omega", dims=1, kind="float")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    angles = positions.to(torch.float64)[:, None] * omega.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by (6.5), pairing coordinate i with i + hd/2; cos, sin (T, hd)."""
    validate.tensor(x, "x", dims=range(2, 8), kind="float")
    if x.shape[-1] % 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: its head dimension must be even to form rotation pairs")
    for name, t in (("cos", cos), ("sin", sin)):
        if validate.tensor(t, name, kind="float").shape != x.shape[-2:]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; x {tuple(x.shape)} needs {tuple(x.shape[-2:])}")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin                                                   # (6.5)


# %% [markdown]
# RoPE's defining property: the score of a rotated query and key depends only on their
# distance. We check it by shifting both positions by the same amount, and show which
# frequencies Llama 3.1's scaling changes.

# %%
cfg = tiny_config()
omega = rope_frequencies(cfg)
q, k = torch.randn(2, 1, 1, cfg.head_dim, dtype=torch.float64).unbind(0)


def rotated_score(m: int, n: int) -> float:
    cos_m, sin_m = rope_cos_sin(torch.tensor([m]), omega, torch.float64)
    cos_n, sin_n = rope_cos_sin(torch.tensor([n]), omega, torch.float64)
    return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum().item()


print("score(7, 3) == score(107, 103):", abs(rotated_score(7, 3) - rotated_score(107, 103)) < 1e-12)

base = rope_frequencies(replace(LLAMA3_8B, rope_scaling=None))
scaled = rope_frequencies(LLAMA3_8B)
wavelength = 2 * math.pi / base
fig, ax = plt.subplots(figsize=(6.5, 3))
ax.loglog(wavelength, base, "o", ms=3, label="Llama 3 ($\\theta$ = 500,000)")
ax.loglog(wavelength, scaled, "x", ms=3, label="Llama 3.1 scaled")
for edge in (8192 / 4, 8192):
    ax.axvline(edge, color="gray", lw=0.8, ls="--")
ax.set_xlabel("wavelength (tokens)")
ax.set_ylabel("frequency $\\omega_i$")
ax.legend()
ax.set_title("RoPE frequencies of the 8B model (head_dim 128)")
plt.show()
print("kept:", int((scaled == base).sum()), " divided by 8:", int(torch.isclose(scaled, base / 8).sum()),
      " interpolated:", int(((scaled != base) & ~torch.isclose(scaled, base / 8)).sum()))

# %% [markdown]
# ### Attention, feed-forward and the block
#
# Attention projects to $n_h$ query heads and $n_{kv}$ key/value heads, rotates queries
# and keys, and lets chapter 4's `flash_attention` do the rest: it handles GQA by mapping
# query head $j$ to KV head $j / (n_h / n_{kv})$ and uses the bottom-right causal mask, so
# the same call serves training (queries = keys) and generation with a KV cache (a few new
# queries against all cached keys). The way $q$, $k$, $v$ meet is a replaceable attribute,
# `attend`: section 6.6 swaps in ring attention there. A model that needs another pattern than
# causal for one call (padding, a local window, a prompt's blocks) passes a boolean `mask`
# through `forward` instead; `sdpa_attention` then runs PyTorch's fused attention with it,
# and without a mask it is the causal path the later chapters use on CPU. Heads are found from the tensor's
# width (`view(B, T, -1, hd)`), so a projection that holds only some heads (tensor
# parallelism, 6.5) works unchanged.
#
# Llama 3 itself is dense. With `n_experts > 0` the block swaps its SwiGLU for chapter 5's
# `MoELayer`, whose experts are two-matrix GELU FFNs. That makes a small MoE variant for
# experiments, not a Mixtral or Llama 4 model: their experts are SwiGLU FFNs (three
# matrices each), so neither their shapes nor their parameter counts match this variant's.

# %%
#| export lrn_lib.llama
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention with chapter 4's flash_attention: q (B, H, T, hd), k, v (B, Hkv, S, hd) -> (B, H, T, hd)."""
    return flash_attention(q, k, v, causal=True)


def check_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Raise unless mask is a bool (B or 1, 1, T, S) table for q (B, H, T, hd), k (B, Hkv, S, hd); returns it."""
    validate.tensor(mask, "mask", dims=4, dtype=torch.bool)
    b, t, s = q.shape[0], q.shape[2], k.shape[2]
    if mask.shape[0] not in (1, b) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (t, s):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected ({b} or 1, 1, {t}, {s})")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention through torch's fused scaled_dot_product_attention: q (B, H, T, hd), k, v (B, Hkv, S, hd)
    -> (B, H, T, hd). Causal (queries = keys) without a mask; with one, mask (B or 1, 1, T, S) bool, True = may attend."""
    check_attention_inputs(q, k, v)
    if mask is None and k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} positions but q has {q.shape[2]}: is_causal needs queries and keys "
                         "of the same tokens")
    if mask is not None:
        check_mask(mask, q, k)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class KVCache:
    """Keys and values of every layer for generation: k[layer], v[layer] of shape (B, Hkv, max_len, hd).

    A forward pass at positions p..p+T-1 writes its keys there and attends to positions 0..p+T-1.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        check_config(cfg)
        validate.integer(batch, "batch", low=1)
        validate.integer(max_len, "max_len", low=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at positions start..start+T-1; return all keys and values up to there."""
        validate.integer(layer, "layer", low=0, high=len(self.k) - 1)
        validate.integer(start, "start", low=0)
        b, h_kv, _, hd = self.k[layer].shape
        validate.tensor(k, "k", dims=4, kind="float")
        if (k.shape[0], k.shape[1], k.shape[3]) != (b, h_kv, hd):
            raise ValueError(f"k has shape {tuple(k.shape)}; this cache holds ({b}, {h_kv}, T, {hd})")
        validate.same_shape(k=k, v=v)
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; writing up to {end} does not fit")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention with RoPE. x (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        check_config(cfg)
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attend = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, start: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); cos, sin (T, hd) for the tokens' positions; with a cache, they sit at start..start+T-1.
        mask (B or 1, 1, T, S) bool replaces `attend` for this call (True = may attend)."""
        if validate.tensor(x, "x", dims=3, kind="float").shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, T, dim={self.dim})")
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        o = self.attend(q, k, v) if mask is None else sdpa_attention(q, k, v, mask)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU (6.3): w2(silu(w1 x) * w3 x). x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.dim = validate.integer(dim, "dim", low=1)
        validate.integer(ffn_dim, "ffn_dim", low=1)
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        if validate.tensor(x, "x", kind="float", nonempty=False).dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be dim={self.dim}")
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                              # (6.3)


class TransformerBlock(nn.Module):
    """Pre-norm block (6.1): h = x + attention(norm(x)); out = h + ffn(norm(h)). x (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        check_config(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = (MoELayer(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.top_k, renormalize=True)
                             if cfg.n_experts else FeedForward(cfg.dim, cfg.ffn_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, start: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim); mask as in Attention.forward."""
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start, mask)   # (6.1)
        return h + self.feed_forward(self.ffn_norm(h))


# %% [markdown]
# The model: embedding, blocks, final norm, untied head. `positions` defaults to
# $0, \dots, T-1$; context parallelism (6.6) passes each shard's global positions, and
# generation passes the positions after the cached prefix.

# %%
#| export lrn_lib.llama
class Llama(nn.Module):
    """Llama 3 decoder. tokens (B, T) int64 -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = check_config(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:                                   # Llama 3.2 1B/3B: one (V, d) matrix
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("omega", rope_frequencies(cfg), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) embedding and linear weights (wo and w2 scaled by 1/sqrt(2 n_layers)), unit norm gains."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                scale = math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w2")) else 1.0
                nn.init.normal_(module.weight, std=std / scale)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); positions (T,) default arange(T); a cache needs contiguous positions;
        mask (B or 1, 1, T, S) bool, True = may attend, replaces the causal attention of every layer."""
        validate.tensor(tokens, "tokens", dims=2, dtype=torch.int64)
        validate.ids(tokens, "tokens", self.cfg.vocab_size)
        t, most = tokens.shape[1], self.cfg.max_seq_len
        if positions is None:
            if t > most:
                raise ValueError(f"tokens has {t} positions, more than cfg.max_seq_len={most}")
            positions = torch.arange(t, device=tokens.device)
        elif validate.tensor(positions, "positions", kind="int").shape != (t,):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({t},)")
        elif int(positions.min()) < 0 or int(positions.max()) >= most:
            raise ValueError(f"positions must lie in [0, cfg.max_seq_len={most}), got {int(positions.min())} "
                             f"to {int(positions.max())}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        x = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.omega, x.dtype)
        start = int(positions[0]) if cache is not None else 0
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start, mask)
        return self.output(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B*T positions: logits (B, T, V), targets (B, T) -> scalar.

    Targets equal to -100 (F.cross_entropy's ignore_index) are left out of the mean."""
    validate.tensor(logits, "logits", kind="float")
    validate.tensor(targets, "targets", kind="int")
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B, T, V) and (B, T)")
    if bool(((targets >= logits.shape[-1]) | ((targets < 0) & (targets != -100))).any()):
        raise ValueError(f"targets must hold ids in [0, {logits.shape[-1]}) (or -100, ignored)")
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.reshape(-1))


# %% [markdown]
# ## 6.2 Checking the model against Hugging Face `transformers`
#
# A from-scratch model is only as good as its check. The test suite
# (`tests/test_llama.py`) builds `transformers`' `LlamaForCausalLM` with the same small
# configuration (GQA, Llama 3.1 RoPE scaling), copies our weights into it by name
# (`tok_embeddings` → `embed_tokens`, `wq` → `q_proj`, `w1`/`w3`/`w2` →
# `gate_proj`/`up_proj`/`down_proj`, ...) and requires the logits to agree in float64 to
# $10^{-10}$, and greedy generations to agree token for token. `transformers` is a test
# dependency only, so the notebook does not import it.
#
# The name mapping lives in the library, so that a reader can also load real weights saved
# by `transformers` (its `state_dict()`, or the tensors of a `model.safetensors` file) into
# our model. Meta's own checkpoints already use our names, but pair RoPE's coordinates the
# other way (section 6.1): their `wq` and `wk` rows need the permutation that `transformers`'
# conversion script applies before they load.

# %%
#| export lrn_lib.llama
TRANSFORMERS_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
                      "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                      "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                      "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                      "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                      "feed_forward.w2": "mlp.down_proj"}


def transformers_name(name: str) -> str:
    """The name in transformers' LlamaForCausalLM of our parameter `name` (e.g. layers.0.attention.wq.weight)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            return f"model.layers.{i}.{TRANSFORMERS_NAMES[module]}.{kind}"
        module, kind = name.rsplit(".", 1)
        return f"{TRANSFORMERS_NAMES[module]}.{kind}"
    except (KeyError, ValueError):
        raise ValueError(f"name {name!r} is not a parameter name of lrn_lib.llama.Llama") from None


def load_transformers_state_dict(model: "Llama", state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a transformers LlamaForCausalLM state dict into `model` in place (dense SwiGLU models).

    Every parameter of `model` must be present with its shape; a tied model needs no
    lm_head.weight. Raises ValueError naming the first missing or mis-shaped tensor.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an lrn_lib.llama.Llama, got {type(model).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if model.cfg.n_experts:
        raise ValueError("load_transformers_state_dict loads dense Llama models; this one has MoE FFNs")
    with torch.no_grad():
        for name, p in model.named_parameters():          # a tied head is listed once, as the embedding
            key = transformers_name(name)
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} (our {name})")
            if not isinstance(state_dict[key], torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(state_dict[key]).__name__}")
            if state_dict[key].shape != p.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(state_dict[key].shape)}; "
                                 f"our {name} is {tuple(p.shape)}")
            p.copy_(state_dict[key])


# %% [markdown]
# Here we check what the notebook can on its own: the parameter count of the tiny model
# against `parameter_count`, and that the model is causal: changing a later token never
# changes an earlier logit.

# %%
torch.manual_seed(0)
cfg = tiny_config()
model = Llama(cfg).double()
n_real = sum(p.numel() for p in model.parameters())
print(f"tiny model: {n_real:,} parameters; parameter_count(cfg) = {parameter_count(cfg):,}")
tokens = torch.randint(0, cfg.vocab_size, (2, 24))
changed = tokens.clone()
changed[:, 15] = (changed[:, 15] + 1) % cfg.vocab_size
with torch.no_grad():
    a, b = model(tokens), model(changed)
print("logits before position 15 unchanged:", bool((a[:, :15] - b[:, :15]).abs().max() < 1e-12))
print("logits from position 15 on changed:", bool((a[:, 15:] - b[:, 15:]).abs().max() > 1e-6))

# %% [markdown]
# ## 6.3 Generation with a KV cache
#
# Generating $n$ tokens naively reruns the model on the whole prefix $n$ times. A **KV
# cache** keeps each layer's keys and values: the prompt is processed once ("prefill"),
# then each step feeds only the newest token, whose query attends to every cached key.
# Positions continue where the prefix ended. Sampling turns the last logits into a token:
# greedy takes the argmax; temperature $\tau$ samples from $\mathrm{softmax}(z/\tau)$; top-$p$
# (nucleus, Holtzman et al. 2019) samples only from the smallest set of tokens whose
# probability reaches $p$.

# %%
#| export lrn_lib.llama
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): greedy at temperature 0, else softmax(z / T) within top-p."""
    validate.tensor(logits, "logits", dims=2, kind="float")
    validate.number(temperature, "temperature", low=0)
    validate.number(top_p, "top_p", low=0, low_open=True, high=1)
    validate.generator(generator, optional=True)
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p          # the nucleus: tokens before which mass < top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    where = generator.device if generator is not None else sorted_p.device   # a CPU generator repeats across devices
    choice = torch.multinomial(sorted_p.to(where), 1, generator=generator).to(sorted_p.device)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend prompt (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an lrn_lib.llama.Llama, got {type(model).__name__}")
    validate.tensor(prompt, "prompt", dims=2, dtype=torch.int64)
    validate.ids(prompt, "prompt", model.cfg.vocab_size)
    validate.integer(max_new_tokens, "max_new_tokens", low=0)
    if prompt.shape[1] + max(max_new_tokens - 1, 0) > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {prompt.shape[1]} tokens and max_new_tokens={max_new_tokens} run the model "
                         f"past cfg.max_seq_len={model.cfg.max_seq_len}")
    validate.number(temperature, "temperature", low=0)
    validate.number(top_p, "top_p", low=0, low_open=True, high=1)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
    validate.generator(generator, optional=True)
    tokens = prompt
    param = next(model.parameters())
    cache = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, param.dtype, param.device) if use_cache else None
    fresh, start = prompt, 0
    for _ in range(max_new_tokens):
        if use_cache:
            positions = torch.arange(start, start + fresh.shape[1], device=prompt.device)
            logits = model(fresh, positions, cache)
            start += fresh.shape[1]
        else:
            logits = model(tokens)
        nxt = sample_next(logits[:, -1], temperature, top_p, generator)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        fresh = nxt[:, None]
    return tokens


# %% [markdown]
# With and without the cache, greedy decoding must produce the same tokens; the cache
# changes only the cost. We time both on a longer generation.

# %%
prompt = torch.randint(0, cfg.vocab_size, (2, 8))
with_cache = generate(model, prompt, 40)
without = generate(model, prompt, 40, use_cache=False)
print("greedy with cache == without cache:", torch.equal(with_cache, without))
g = torch.Generator().manual_seed(0)
sampled = generate(model, prompt, 40, temperature=0.8, top_p=0.9, generator=g)
print("sampled tokens differ from greedy:", not torch.equal(sampled, with_cache))

# %%
# NBVAL_IGNORE_OUTPUT
model_f = Llama(tiny_config(n_layers=4, max_seq_len=512))
prompt = torch.randint(0, 256, (1, 16))
timings = {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    generate(model_f, prompt, 200, use_cache=use_cache)
    timings[use_cache] = time.perf_counter() - t0
print(f"200 new tokens: {timings[True]:.2f} s with the cache, {timings[False]:.2f} s without")

# %%
print("the cache is faster:", timings[True] < timings[False])

# %% [markdown]
# ### Training the tiny model
#
# To see the model learn, we train the tiny configuration on the bytes of the book's English
# corpus (`lrn_lib.corpus`): the help topics of Python's `pydoc`, as one snapshot committed with the
# book, so every Python version reads the same bytes. A few hundred steps on a
# CPU take the loss from $\ln 256 \approx 5.5$ nats per byte to well under 3.

# %%
#| export lrn_lib.llama
def pydoc_bytes() -> torch.Tensor:
    """The book corpus's English part (pydoc's help topics, lrn_lib.corpus) as an int64 tensor (N,) of bytes."""
    return torch.frombuffer(bytearray(corpus.english()), dtype=torch.uint8).to(torch.int64)


def random_windows(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (inputs, next-token targets), each (batch, seq), from random windows of data (N,)."""
    validate.tensor(data, "data", dims=1, kind="int")
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    if data.numel() < seq + 2:
        raise ValueError(f"data has {data.numel()} tokens, too few for windows of seq + 1 = {seq + 1} tokens "
                         f"(random_windows draws starts from 0 .. N - seq - 2, so N must be at least seq + 2)")
    validate.generator(generator, optional=True)
    start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    window = torch.stack([data[s:s + seq + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]


# %%
config.seed_everything(0)
data = pydoc_bytes()
split = int(0.9 * data.numel())
train_data, held_out = data[:split], data[split:]
STEPS, BATCH, SEQ = config.pick(cpu=300, gpu=1500), config.pick(cpu=16, gpu=64), config.pick(cpu=64, gpu=256)
cfg = tiny_config(dim=config.pick(cpu=64, gpu=256), n_layers=config.pick(cpu=2, gpu=4), max_seq_len=SEQ)
model = Llama(cfg).to(config.DEVICE)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
gen = torch.Generator().manual_seed(0)
losses = []
for step in range(STEPS):
    x, y = (t.to(config.DEVICE) for t in random_windows(train_data, BATCH, SEQ, gen))
    loss = lm_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
with torch.no_grad():
    x, y = (t.to(config.DEVICE) for t in random_windows(held_out, 64, SEQ, torch.Generator().manual_seed(1)))
    held_out_loss = lm_loss(model(x), y).item()

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{len(train_data):,} training bytes; loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f}; held-out {held_out_loss:.2f} nats/byte")
plt.figure(figsize=(6, 3))
plt.plot(losses)
plt.xlabel("step")
plt.ylabel("loss (nats per byte)")
plt.title("tiny Llama on pydoc text")
plt.show()
prompt = torch.tensor([list(b"The return statement ")], device=config.DEVICE)
print(bytes(generate(model, prompt, SEQ - prompt.shape[1])[0].tolist()).decode("utf-8", errors="replace"))  # within max_seq_len

# %%
print("held-out loss below 3 nats per byte:", held_out_loss < 3.0)

# %% [markdown]
# ## 6.4 Processes, ranks and the 4D mesh
#
# Every parallel scheme in this chapter runs the same program in $W$ processes (ranks)
# that talk through `torch.distributed` collectives. On a laptop the processes share the
# CPU and talk through the gloo backend; on GPUs the same code uses NCCL. `spawn` starts
# $W$ processes, joins them into one process group, runs a worker function in each and
# returns what every rank returned, so the notebook can print it.

# %%
#| export lrn_lib.mesh
import gc
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from lrn_lib import validate


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, queue, worker: Callable, args: tuple) -> None:
    """Body of one spawned rank: join the gloo group, run worker(rank, world, *args), send back its result."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)                         # W processes share the laptop's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        gc.collect()        # free garbage cycles (FSDP's modules and hooks) that hold gloo work, while the group lives
        dist.barrier()      # and tear down no connection that another rank still uses
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run worker(rank, world, *args) in `world` fresh CPU processes joined by gloo.

    worker must be a top-level function of an importable module (spawned processes import
    it); what it returns must pickle. Returns the workers' results in rank order.
    """
    import torch.multiprocessing as mp

    if not callable(worker):
        raise TypeError(f"worker must be a function, got {type(worker).__name__}")
    validate.integer(world, "world", low=1)
    queue = mp.get_context("spawn").SimpleQueue()
    main = sys.modules["__main__"]
    script = main.__dict__.pop("__file__", None)     # children import the worker's module, never re-run a script
    try:
        mp.spawn(_spawned, args=(world, free_port(), queue, worker, args), nprocs=world, join=True)
    finally:
        if script is not None:
            main.__file__ = script
    results = dict(queue.get() for _ in range(world))
    return [results[r] for r in range(world)]


def check_rank(rank: int, world: int) -> None:
    """Raise unless world is an int >= 1 and rank an int in [0, world): the first check of every spawn worker."""
    validate.integer(world, "world", low=1)
    validate.integer(rank, "rank", low=0, high=world - 1)


def check_mesh_shape(shape: "MeshShape", world: int) -> None:
    """Raise TypeError unless shape is a MeshShape, ValueError unless its world size is `world`."""
    if not isinstance(shape, MeshShape):
        raise TypeError(f"shape must be a MeshShape, got {type(shape).__name__}")
    if shape.world != world:
        raise ValueError(f"shape {shape} needs {shape.world} ranks, but world={world}")


def check_group(group: Any, name: str = "group") -> None:
    """Raise TypeError unless group is a torch.distributed ProcessGroup or None (None: the whole world)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


# %% [markdown]
# Llama 3 trains its largest model on a 4D grid of GPUs (Figure 5 of the paper). The
# dimensions are ordered [TP, CP, PP, DP] from the fastest-varying to the slowest: the
# ranks are `arange(W).view(dp, pp, cp, tp)`, so the 8 GPUs of one server (the ones joined
# by NVLink) form tensor-parallel groups, which communicate the most, and data parallelism,
# which communicates the least, spans servers. A rank's **group** along a dimension is the
# set of ranks that differ from it only in that coordinate.

# %%
#| export lrn_lib.mesh
MESH_DIMS = ("tp", "cp", "pp", "dp")


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the four parallel dimensions; the world size is their product."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in MESH_DIMS:
            validate.integer(getattr(self, name), name, low=1)

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def grid(self) -> torch.Tensor:
        """Rank numbers laid out (dp, pp, cp, tp): TP varies fastest, as in Llama 3's Figure 5."""
        return torch.arange(self.world).view(self.dp, self.pp, self.cp, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{'tp': i, 'cp': j, 'pp': k, 'dp': l} of one rank."""
        validate.integer(rank, "rank", low=0, high=self.world - 1)
        dp, pp, cp, tp = (int(c[0]) for c in torch.nonzero(self.grid() == rank, as_tuple=True))
        return {"tp": tp, "cp": cp, "pp": pp, "dp": dp}

    def groups(self, *dims: str) -> list[list[int]]:
        """Every group of ranks that differ only along `dims` (e.g. groups("cp", "dp") for gradient averaging)."""
        for d in dims:
            if d not in MESH_DIMS:
                raise ValueError(f"unknown mesh dimension {d!r}; expected one of {MESH_DIMS}")
        if len(set(dims)) < len(dims):
            raise ValueError(f"dims {dims} names a mesh dimension twice")
        axis = {"dp": 0, "pp": 1, "cp": 2, "tp": 3}
        inside = [axis[d] for d in dims]
        outside = [a for a in range(4) if a not in inside]
        g = self.grid().permute(*outside, *inside)
        return [sorted(ranks) for ranks in g.reshape(-1, g[(0,) * len(outside)].numel()).tolist()]


class Mesh:
    """This rank's place in a MeshShape and its process groups along tp, cp, pp, dp and cp x dp.

    Every rank must build the Mesh (new_group is collective over the whole world).
    """

    def __init__(self, shape: MeshShape):
        if not isinstance(shape, MeshShape):
            raise TypeError(f"shape must be a MeshShape, got {type(shape).__name__}")
        if dist.get_world_size() != shape.world:
            raise ValueError(f"the mesh {shape} needs {shape.world} ranks but the world has {dist.get_world_size()}")
        self.shape = shape
        self.rank = dist.get_rank()
        self.coords = shape.coordinates(self.rank)
        self.group: dict[str, dist.ProcessGroup] = {}
        self.members: dict[str, list[int]] = {}
        for key, dims in (("tp", ("tp",)), ("cp", ("cp",)), ("pp", ("pp",)), ("dp", ("dp",)), ("cp_dp", ("cp", "dp"))):
            for ranks in shape.groups(*dims):
                pg = dist.new_group(ranks)           # collective: every rank creates every group
                if self.rank in ranks:
                    self.group[key], self.members[key] = pg, ranks


def describe_rank(rank: int, world: int, shape: MeshShape) -> str:
    """One line per rank: its coordinates and the members of each of its groups (a spawn worker)."""
    check_rank(rank, world)
    check_mesh_shape(shape, world)
    mesh = Mesh(shape)
    c = mesh.coords
    groups = " ".join(f"{k}={mesh.members[k]}" for k in ("tp", "cp", "pp", "dp"))
    return f"rank {rank:2d}: tp={c['tp']} cp={c['cp']} pp={c['pp']} dp={c['dp']}  groups {groups}"


# %% [markdown]
# The 16-GPU example of the paper's Figure 5, $|TP| = |CP| = |PP| = |DP| = 2$: GPU 0 and
# GPU 1 share a TP group, GPU 0 and GPU 2 a CP group, GPU 0 and GPU 4 a PP group, GPU 0
# and GPU 8 a DP group. Gradients are averaged over the combined CP x DP group: both
# dimensions split the tokens of one step, and each of their ranks holds the same weights.

# %%
from lrn_lib.mesh import MeshShape, spawn

shape = MeshShape(tp=2, cp=2, pp=2, dp=2)
print("ranks as (dp, pp, cp, tp):\n", shape.grid())
print("coordinates of GPU 5:", shape.coordinates(5))
for dims in (("tp",), ("cp",), ("pp",), ("dp",), ("cp", "dp")):
    print(f"{' x '.join(dims):>7s} groups:", shape.groups(*dims)[:4], "...")

# %% [markdown]
# A first collective: four processes each hold their rank number; `all_reduce` leaves the
# sum on every rank, `all_gather` gives every rank the list. The worker function lives in a
# module (`lrn_lib.mesh.collectives_demo`) because spawned processes import it.

# %%
#| export lrn_lib.mesh
def collectives_demo(rank: int, world: int) -> str:
    """all_reduce and all_gather of each rank's number (a spawn worker); returns what this rank sees."""
    check_rank(rank, world)
    x = torch.tensor([float(rank)])
    total = x.clone()
    dist.all_reduce(total)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, x)
    return f"rank {rank}: all_reduce -> {total.item():.0f}, all_gather -> {[int(g.item()) for g in gathered]}"


# %%
from lrn_lib.mesh import collectives_demo  # the module's function: spawned processes import it from there

for line in spawn(collectives_demo, 4):
    print(line)

# %% [markdown]
# ## 6.5 Tensor parallelism
#
# The first dimension of the Llama 3 grid splits every weight matrix of a layer over the 8
# GPUs of one server. This is the scheme of Megatron-LM (Shoeybi et al. 2019,
# "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism",
# arXiv:1909.08053): each rank holds a slice of each matrix and computes a slice of each
# product, and a few all-reduces stitch the slices together. Unlike data parallelism it
# divides the memory for a layer's weights, gradients and optimizer state by the TP degree
# $t$, and also the activations inside attention and the FFN (the residual stream and the
# norms' inputs stay whole on every rank). The price is communication inside every layer,
# twice forward and twice backward, which is why TP lives on the fast NVLink links inside
# a server.
#
# Write a linear layer as $Y = XA$ with $X$ of shape $(N, d_{in})$ and $A = W^\top$ of
# shape $(d_{in}, d_{out})$ (PyTorch's `nn.Linear` stores $W$, shape $(d_{out}, d_{in})$).
# There are two ways to cut $A$ over $t$ ranks:
#
# * **Column-parallel**: $A = [A_1, \dots, A_t]$ split along the output features. Rank $r$
#   computes $Y_r = X A_r$, a block of the output's columns, from the *whole* input:
#   $$Y = [XA_1, \dots, XA_t] \qquad (6.7)$$
# * **Row-parallel**: $A = [A_1; \dots; A_t]$ split along the input features. Rank $r$ needs
#   only the matching block of input columns $X_r$, and its product is a *partial sum* of
#   the whole output:
#   $$Y = \sum_{r=1}^{t} X_r A_r \qquad (6.8)$$
#
# The trick of Megatron-LM is to chain the two: a column-parallel layer produces exactly
# the column block $Y_r$ that a following row-parallel layer consumes, so the sharded
# intermediate never travels. For an MLP with an elementwise activation $\phi$,
# $\phi(XA)B = \sum_r \phi(XA_r) B_r$ (6.9): one all-reduce of the partial sums after $B$,
# nothing in between. The communication is two conjugate operators, which the paper calls
# $f$ and $g$:
#
# * $f$ (before a column-parallel block): identity forward; backward, all-reduce (sum). Every
#   rank's $X$ feeds its own $A_r$, so $\partial L / \partial X = \sum_r
#   (\partial L/\partial Y_r) A_r^\top$ sums contributions that live on different ranks. (6.10)
# * $g$ (after a row-parallel block): forward, all-reduce (sum) of the partial products
#   (6.8); backward, identity, because the sum hands the same gradient to every addend.
#   (6.11)
#
# Both are `torch.autograd.Function`s over a process group (`None`: the whole world), so the
# same code runs on a TP group of a 4D mesh (section 6.9). `shard_bounds` decides which
# contiguous rows a rank owns; when the size does not divide by $t$, the first ranks get
# one more row (the rule of `torch.tensor_split`), which the vocabulary will need.

# %%
#| export lrn_lib.tensor_parallel
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, RMSNorm, check_config, lm_loss
from lrn_lib.mesh import Mesh, MeshShape, check_group, check_rank


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share when `size` rows are split over `world` ranks.

    The first size % world ranks get one row more (torch.tensor_split's rule). Raises
    ValueError for a rank outside the group or when some rank would get no row.
    """
    check_rank(rank, world)
    validate.integer(size, "size", low=0)
    if size < world:
        raise ValueError(f"size={size} cannot be split over world={world} ranks with at least one row each")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def _all_reduce_copy(x: torch.Tensor, group: "dist.ProcessGroup | None",
                     op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> torch.Tensor:
    """A new tensor holding the all-reduce (op, default sum) of x over group; x (any shape) is left unchanged."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


class CopyToTP(torch.autograd.Function):
    """Megatron's f (6.10): identity forward, sum of the gradients over the group backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: "dist.ProcessGroup | None") -> torch.Tensor:
        """x (any shape) -> the same values."""
        validate.tensor(x, "x", nonempty=False)
        check_group(group)
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """All-reduce the partial input gradients of the ranks' column blocks."""
        return _all_reduce_copy(grad, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """Megatron's g (6.11): sum over the group forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: "dist.ProcessGroup | None") -> torch.Tensor:
        """x (any shape), a partial sum on each rank -> the full sum, the same on every rank."""
        validate.tensor(x, "x", nonempty=False)
        check_group(group)
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Every addend of a sum receives the sum's gradient unchanged."""
        return grad, None


def copy_to_tp(x: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """f (6.10): x (any shape) unchanged forward; its gradient is summed over `group` backward."""
    return CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """g (6.11): x (any shape) summed over `group` forward; the gradient passes unchanged backward."""
    return ReduceFromTP.apply(x, group)


# %% [markdown]
# ### Column- and row-parallel linear layers
#
# A parallel layer is built from the full `nn.Linear`, which every rank of the group holds
# identically (the same seed), and keeps only its own block as a new parameter. Each class
# can say which slice of a full-model tensor its parameter corresponds to (`full_slice`),
# which is how the tests compare every sharded gradient with the single-process one.
#
# A column-parallel layer applies $f$ to its input unless told that the caller already did:
# in attention, $W_q$, $W_k$ and $W_v$ read the same input, and one $f$ in front of all
# three (one all-reduce backward) replaces three. A bias of a column-parallel layer is split
# with its outputs; the bias of a row-parallel layer is added once, after $g$.

# %%
#| export lrn_lib.tensor_parallel
class ColumnParallelLinear(nn.Module):
    """This rank's block of output features of `linear` (6.7): x (..., in) -> (..., out_r).

    Keeps rows [start, stop) = shard_bounds(out, rank, t) of the full weight (out, in) and of
    the bias. With copy_input the input passes f first; pass copy_input=False when the caller
    applied f to an input that several column-parallel layers share.
    """

    def __init__(self, linear: nn.Linear, group: "dist.ProcessGroup | None" = None, copy_input: bool = True):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_group(group)
        if not isinstance(copy_input, bool):
            raise TypeError(f"copy_input must be a bool, got {type(copy_input).__name__}")
        self.group, self.copy_input = group, copy_input
        self.start, self.stop = shard_bounds(linear.out_features, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(linear.weight.detach(), "weight").clone())
        self.bias = None if linear.bias is None else nn.Parameter(self.full_slice(linear.bias.detach(), "bias").clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The part of a full-layer tensor, weight (out, in) or bias (out,), that parameter `name` holds."""
        return full[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in), the same on every rank -> this rank's output columns (..., out_r)."""
        if validate.tensor(x, "x", kind="float", nonempty=False).dim() == 0 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x has shape {tuple(x.shape)}; this layer takes {self.weight.shape[1]} input features")
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's block of input features of `linear` (6.8): x_r (..., in_r) -> (..., out), all-reduced.

    Keeps columns [start, stop) = shard_bounds(in, rank, t) of the full weight (out, in); the
    bias (out,) is replicated and added once, after the sum g.
    """

    def __init__(self, linear: nn.Linear, group: "dist.ProcessGroup | None" = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_group(group)
        self.group = group
        self.start, self.stop = shard_bounds(linear.in_features, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(linear.weight.detach(), "weight").clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The part of a full-layer tensor, weight (out, in) or bias (out,), that parameter `name` holds."""
        return full[:, self.start:self.stop] if name == "weight" else full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_r), this rank's input columns -> (..., out), the same on every rank."""
        if validate.tensor(x, "x", kind="float", nonempty=False).dim() == 0 or x.shape[-1] != self.stop - self.start:
            raise ValueError(f"x has {x.shape[-1]} features; this rank's block of the input has {self.stop - self.start}")
        y = reduce_from_tp(F.linear(x, self.weight), self.group)                        # (6.8)
        return y if self.bias is None else y + self.bias


# %% [markdown]
# ### Splitting SwiGLU and attention
#
# Llama's feed-forward network is SwiGLU (6.3), $\mathrm{FFN}(x) = W_2(\mathrm{SiLU}(W_1 x)
# \odot W_3 x)$. Its hidden unit $j$ is $\mathrm{SiLU}(w_{1,j} \cdot x)\,(w_{3,j} \cdot x)$:
# it needs row $j$ of the gate $W_1$ *and* row $j$ of the up projection $W_3$, and nothing
# else. So $W_1$ and $W_3$ are both column-parallel **with the same split**, rank $r$
# owning the hidden units $S_r$ of both, and $W_2$ is row-parallel over the same $S_r$:
#
# $$\mathrm{FFN}(x) = \sum_{r=1}^{t} W_{2}[:, S_r]\big(\mathrm{SiLU}(W_{1}[S_r]\, x) \odot
# W_{3}[S_r]\, x\big) \qquad (6.12)$$
#
# If the gate were split differently from the up projection (say rank 0 held gate units
# 0..79 but up units 80..159), the product $\odot$ would pair gate unit $j$ with up unit
# $j'\neq j$ on the same rank: the ranks would compute a different function, or would
# have to exchange the hidden activations, which is the communication the pairing exists
# to avoid. The same argument forbids splitting the contraction dimension $d$ of $W_1$ or
# $W_3$: $\mathrm{SiLU}$ of a partial sum is not a partial sum of $\mathrm{SiLU}$s.
#
# Attention splits by heads, because heads are independent until $W_o$ mixes them. $W_q$,
# $W_k$, $W_v$ are column-parallel, so rank $r$ computes the queries of $n_h/t$ heads and
# the keys and values of $n_{kv}/t$ heads; it runs attention on those heads alone, and
# $W_o$ is row-parallel over the concatenated local head outputs. `Attention.forward`
# reshapes the projections with `view(batch, time, -1, head_dim)`, so a column-sharded $W_q$
# simply yields the local heads. With grouped-query attention, query head $h$ reads KV head
# $\lfloor h/g \rfloor$, $g = n_h/n_{kv}$. Contiguous blocks keep each query head on the
# rank of its KV head exactly when $t$ divides $n_{kv}$: then rank $r$'s query heads
# $r n_h/t, \dots, (r+1)n_h/t - 1$ read KV heads $r n_{kv}/t, \dots, (r+1)n_{kv}/t - 1$,
# its own. Llama 3 405B has $n_{kv} = 8$, one KV head per GPU at $t = 8$: its TP degree
# is as large as it can be without replicating KV heads. We refuse head counts that $t$
# does not divide.
#
# Per layer this costs one $f$ before attention, one $g$ after $W_o$, one $f$ before the
# FFN and one $g$ after $W_2$: **two all-reduces forward and two backward**, each of a
# $(B, T, d)$ activation.
#
# ### Vocabulary-parallel embedding and cross-entropy
#
# The embedding table and the output head are $V \times d$ each; with Llama 3's
# $V = 128{,}256$ they hold 525M parameters each in the 8B model (2.1B in the 405B), so they
# are split too, along the vocabulary. Rank $r$ holds the rows of tokens $[s_r, e_r)$; a token outside that range
# gives a zero vector, and $g$ sums the ranks' vectors, exactly one of which is the row:
#
# $$E[x] = \sum_{r=1}^{t} \mathbf{1}[s_r \le x < e_r]\; E_r[x - s_r] \qquad (6.13)$$
#
# The output head is column-parallel, so rank $r$ ends with the logits $z_v$ of its own
# vocabulary slice. Gathering them would move $B \cdot T \cdot V$ numbers, $V/d$ times an
# activation (31 times in the 8B model) and as much memory again on every rank. Instead cross-entropy is computed on the shards, with three reductions of
# one number per token: the maximum $m$ (for a stable exponent), the sum of exponentials,
# and the target's logit, which only its owning rank has (the others contribute 0):
#
# $$\ell = \log \sum_{r} \sum_{v \in [s_r, e_r)} e^{z_v - m} - (z_y - m), \qquad m = \max_r
# \max_{v \in [s_r, e_r)} z_v \qquad (6.14)$$
#
# The sum of exponentials and the target logit travel in one all-reduce after the maximum,
# so the loss costs two all-reduces per step, of $B T$ and $2 B T$ numbers. The gradient needs no
# communication at all: $\partial \ell / \partial z_v = p_v - \mathbf{1}[v = y]$ with
# $p_v = e^{z_v - m} / \sum e^{z - m}$, and each rank computes it for its own $v$ (6.15).
# The vocabulary need not divide by $t$: ranks may own slices of unequal size.

# %%
#| export lrn_lib.tensor_parallel
class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, stop) = shard_bounds(V, rank, t) of `embedding` (6.13).

    forward(tokens (...) int64) -> (..., dim), the full embedding on every rank after g.
    """

    def __init__(self, embedding: nn.Embedding, group: "dist.ProcessGroup | None" = None):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("embedding must have no padding_idx and no max_norm")
        check_group(group)
        self.group, self.num_embeddings = group, embedding.num_embeddings
        self.start, self.stop = shard_bounds(embedding.num_embeddings, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(embedding.weight.detach(), "weight").clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The rows (V_r, dim) of a full table (V, dim) that this rank holds."""
        return full[self.start:self.stop]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 global ids -> (..., dim)."""
        if validate.tensor(tokens, "tokens").dtype != torch.int64:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        validate.ids(tokens, "tokens", self.num_embeddings)            # an id outside every shard would embed to 0
        local = tokens - self.start
        mine = (local >= 0) & (local < self.stop - self.start)
        rows = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return reduce_from_tp(rows.masked_fill(~mine[..., None], 0.0), self.group)      # (6.13)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (6.14) from vocabulary-sharded logits; backward (6.15) needs no communication."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, start: int,
                group: "dist.ProcessGroup | None") -> torch.Tensor:
        """logits (N, V_r) for vocabulary ids [start, start + V_r); targets (N,) global ids -> losses (N,)."""
        validate.tensor(logits, "logits", dims=2, kind="float")
        if validate.tensor(targets, "targets", dims=1, kind="int").shape[0] != logits.shape[0]:
            raise ValueError(f"targets {tuple(targets.shape)} must hold one id per row of logits {tuple(logits.shape)}")
        validate.integer(start, "start", low=0)
        check_group(group)
        work = logits.to(torch.promote_types(logits.dtype, torch.float32))
        m = _all_reduce_copy(work.amax(-1), group, dist.ReduceOp.MAX)                   # m of (6.14)
        e = torch.exp(work - m[:, None])
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        target = torch.where(mine, work.gather(1, local[:, None])[:, 0] - m, torch.zeros_like(m))
        sums = _all_reduce_copy(torch.stack([e.sum(-1), target]), group)                # one message, 2 numbers a token
        ctx.save_for_backward(e / sums[0][:, None], local, mine)
        ctx.dtype = logits.dtype
        return torch.log(sums[0]) - sums[1]                                             # (6.14)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """d loss_n / d z_nv = p_nv - [v = y_n] for this rank's v (6.15), scaled by grad (N,)."""
        p, local, mine = ctx.saved_tensors
        dz = p.clone()
        rows = torch.arange(dz.shape[0], device=dz.device)[mine]
        dz[rows, local[mine]] -= 1.0                                                    # (6.15)
        return (dz * grad[:, None]).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                 group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """Mean cross-entropy over all tokens, like lm_loss, from logits that are never gathered.

    local_logits (..., V_r): this rank's columns shard_bounds(vocab_size, rank, t) of the
    full logits; targets (...) int64 global ids -> scalar, the same on every rank of group.
    """
    validate.tensor(local_logits, "local_logits", kind="float")
    if validate.tensor(targets, "targets").dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(f"local_logits {tuple(local_logits.shape)} and targets {tuple(targets.shape)} "
                         "must agree except in the last (vocabulary) dimension")
    validate.integer(vocab_size, "vocab_size", low=1)
    if targets.min() < 0 or targets.max() >= vocab_size:
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size})")
    check_group(group)
    start, stop = shard_bounds(vocab_size, dist.get_rank(group), dist.get_world_size(group))
    if local_logits.shape[-1] != stop - start:
        raise ValueError(f"local_logits has {local_logits.shape[-1]} vocabulary columns; this rank owns "
                         f"{stop - start} of vocab_size={vocab_size}")
    losses = VocabParallelCrossEntropy.apply(local_logits.reshape(-1, stop - start), targets.reshape(-1), start, group)
    return losses.mean()


# %% [markdown]
# Before sharding a whole model, we check the pieces on their own against their
# single-process versions: a column-parallel layer, GELU and a row-parallel layer, with
# biases (6.9); the vocabulary-parallel embedding; and the vocabulary-parallel
# cross-entropy against `F.cross_entropy`, on logits with a standard deviation of 30 (so the
# shared maximum matters) and a vocabulary of 67 that no world size here divides.

# %%
#| export lrn_lib.tensor_parallel
def tp_layers_check(rank: int, world: int, vocab_size: int = 67, seed: int = 0, n_tokens: int = 10,
                    dim: int = 12, hidden: int = 10) -> dict[str, float]:
    """spawn worker: the parallel pieces against their single-process versions, float64, group = world.

    Returns the largest |parallel - single-process| of: a ColumnParallelLinear -> GELU ->
    RowParallelLinear MLP with biases ('mlp_out', 'mlp_grad': input and every parameter
    gradient); VocabParallelEmbedding ('embedding_out', 'embedding_grad'); and
    vocab_parallel_cross_entropy against F.cross_entropy ('ce_loss', 'ce_grad' of the logits).
    """
    check_rank(rank, world)
    for name, value in (("vocab_size", vocab_size), ("n_tokens", n_tokens), ("dim", dim), ("hidden", hidden)):
        validate.integer(value, name, low=world)                   # every rank gets a row of each split
    torch.manual_seed(seed)
    up, down = nn.Linear(dim, hidden).double(), nn.Linear(hidden, dim).double()
    table = nn.Embedding(vocab_size, dim).double()
    x = torch.randn(n_tokens, dim, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(n_tokens, dim, dtype=torch.float64)
    tokens = torch.randint(0, vocab_size, (n_tokens,))
    logits = (30 * torch.randn(n_tokens, vocab_size, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_tokens,))
    column, row, embedding = ColumnParallelLinear(up), RowParallelLinear(down), VocabParallelEmbedding(table)

    mlp = down(F.gelu(up(x)))
    (mlp * gy).sum().backward()
    x_tp = x.detach().clone().requires_grad_()
    mlp_tp = row(F.gelu(column(x_tp)))
    (mlp_tp * gy).sum().backward()
    mlp_grad = max([(x_tp.grad - x.grad).abs().max().item()] +
                   [(p.grad - module.full_slice(full.grad, name)).abs().max().item()
                    for module, layer in ((column, up), (row, down))
                    for (name, p), full in zip(module.named_parameters(), layer.parameters())])

    rows = table(tokens)
    (rows * gy).sum().backward()
    rows_tp = embedding(tokens)
    (rows_tp * gy).sum().backward()

    loss = F.cross_entropy(logits, targets)
    loss.backward()
    start, stop = shard_bounds(vocab_size, dist.get_rank(), dist.get_world_size())
    local = logits.detach()[:, start:stop].clone().requires_grad_()
    loss_tp = vocab_parallel_cross_entropy(local, targets, vocab_size)
    loss_tp.backward()
    return {"mlp_out": (mlp_tp - mlp).abs().max().item(), "mlp_grad": mlp_grad,
            "embedding_out": (rows_tp - rows).abs().max().item(),
            "embedding_grad": (embedding.weight.grad - embedding.full_slice(table.weight.grad, "weight")).abs().max().item(),
            "ce_loss": abs(loss_tp.item() - loss.item()),
            "ce_grad": (local.grad - logits.grad[:, start:stop]).abs().max().item()}


# %%
from lrn_lib.mesh import spawn
from lrn_lib.tensor_parallel import tp_layers_check

for tp_world in (2, 3):
    pieces = spawn(tp_layers_check, tp_world)
    print(f"world {tp_world}, vocabulary 67, every piece equal to its single-process version (< 1e-12):",
          all(err < 1e-12 for r in pieces for err in r.values()))
    print("  checked:", ", ".join(pieces[0]))

# %% [markdown]
# ### Sharding the whole Llama
#
# The ranks of a TP group must start from identical master weights: every rank builds the
# full `Llama` from one seed, and `tensor_parallel_llama` then keeps each rank's shards. It
# checks the premise with two small all-reduces (minimum and maximum) of per-parameter
# fingerprints, since ranks seeded differently would otherwise train a model that no
# single process describes.
#
# Where does $f$ go? Every column-parallel layer reads the output of an RMSNorm, so the
# sharded model replaces each norm by a `TPRMSNorm`, the same norm followed by $f$. The
# norm weights stay **replicated** (RMSNorm is cheap and elementwise), and here is why their
# gradients need no all-reduce over TP: in the backward pass the gradient reaching the
# norm's output has already been summed by $f$, so every rank holds the *full*
# $\partial L/\partial(\text{norm output})$ and the same input, and computes the same, full
# gradient of the norm weight. The residual stream is replicated in the same way. Summing
# these gradients over the group would multiply them by $t$. (This changes with Megatron's
# *sequence parallelism*, Korthikanti et al. 2022, arXiv:2205.05198, which splits the norms'
# tokens over the TP ranks: then each rank's norm gradient is a partial sum.)
#
# The sharded model's `forward` returns the rank's vocabulary slice of the logits,
# $(B, T, V_r)$, and the loss is `vocab_parallel_cross_entropy`. MoE layers are not
# sharded this way (chapter 5 splits experts instead), so they are refused.

# %%
#| export lrn_lib.tensor_parallel
class TPRMSNorm(RMSNorm):
    """A replicated RMSNorm whose output enters the tensor-parallel region through f.

    x (..., dim) -> (..., dim); the weight (dim,) is the same on every rank, and so is its gradient.
    """

    def __init__(self, norm: RMSNorm, group: "dist.ProcessGroup | None" = None):
        if not isinstance(norm, RMSNorm):
            raise TypeError(f"norm must be an lrn_lib.llama.RMSNorm, got {type(norm).__name__}")
        check_group(group)
        super().__init__(norm.weight.numel(), norm.eps)
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> normalized (..., dim), then f (6.10)."""
        return copy_to_tp(super().forward(x), self.group)


def check_tp_config(cfg: LlamaConfig, tp: int) -> None:
    """Raise ValueError unless a model of shape cfg splits over tp ranks: heads, KV heads, vocabulary, FFN."""
    check_config(cfg)
    validate.integer(tp, "tp", low=1)
    if cfg.n_heads % tp:
        raise ValueError(f"n_heads={cfg.n_heads} is not divisible by tp={tp}")
    if cfg.n_kv_heads % tp:
        raise ValueError(f"n_kv_heads={cfg.n_kv_heads} is not divisible by tp={tp}")
    if cfg.n_experts:
        raise ValueError("MoE feed-forward layers are split by expert parallelism (chapter 5), not by TP here")
    if min(cfg.vocab_size, cfg.ffn_dim) < tp:
        raise ValueError(f"vocab_size={cfg.vocab_size} and ffn_dim={cfg.ffn_dim} must be at least tp={tp}")


def _check_identical(model: nn.Module, group: "dist.ProcessGroup | None") -> None:
    """Raise ValueError on every rank unless all ranks of group hold the same parameters (by fingerprint)."""
    fingerprint = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                               for p in model.parameters()]).flatten()
    low = _all_reduce_copy(fingerprint, group, dist.ReduceOp.MIN)
    high = _all_reduce_copy(fingerprint, group, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("the ranks of the TP group hold different weights: build the full model from one seed everywhere")


def tensor_parallel_llama(model: Llama, group: "dist.ProcessGroup | None" = None) -> Llama:
    """A copy of `model` holding this rank's shards over group; model must be identical on every rank.

    wq, wk, wv, w1, w3 and the output head become column-parallel, wo and w2 row-parallel,
    the embedding vocabulary-parallel, the norms TPRMSNorm (replicated). forward(tokens (B, T))
    returns this rank's logits (B, T, V_r), columns shard_bounds(V, rank, t): take the loss with
    vocab_parallel_cross_entropy. The model's cfg keeps the full shapes, so it runs without a
    KVCache (a cache built from cfg would hold every KV head, not this rank's).
    """
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an lrn_lib.llama.Llama, got {type(model).__name__}")
    check_group(group)
    tp = dist.get_world_size(group)
    check_tp_config(model.cfg, tp)
    _check_identical(model, group)
    sharded = copy.deepcopy(model)
    sharded.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group)
    for block in sharded.layers:
        attention, ffn = block.attention, block.feed_forward
        block.attention_norm = TPRMSNorm(block.attention_norm, group)
        attention.wq, attention.wk, attention.wv = (ColumnParallelLinear(linear, group, copy_input=False)
                                                    for linear in (attention.wq, attention.wk, attention.wv))
        attention.wo = RowParallelLinear(attention.wo, group)
        attention.n_heads, attention.n_kv_heads = attention.n_heads // tp, attention.n_kv_heads // tp
        block.ffn_norm = TPRMSNorm(block.ffn_norm, group)
        ffn.w1, ffn.w3 = (ColumnParallelLinear(linear, group, copy_input=False) for linear in (ffn.w1, ffn.w3))
        ffn.w2 = RowParallelLinear(ffn.w2, group)
    sharded.norm = TPRMSNorm(sharded.norm, group)
    sharded.output = ColumnParallelLinear(sharded.output, group, copy_input=False)
    return sharded


def gradient_errors(tp_model: nn.Module, full_model: nn.Module) -> dict[str, float]:
    """max |gradient of each tp_model parameter - the matching slice of full_model's gradient|, by name."""
    for arg, model in (("tp_model", tp_model), ("full_model", full_model)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    errors = {}
    for module_name, module in tp_model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            try:
                full = full_model.get_parameter(full_name).grad
            except AttributeError:
                raise ValueError(f"full_model has no parameter {full_name!r} of tp_model") from None
            if p.grad is None or full is None:
                raise ValueError(f"{full_name} has no gradient in tp_model or full_model: run backward on both first")
            if hasattr(module, "full_slice"):
                full = module.full_slice(full, name)
            errors[full_name] = (p.grad - full).abs().max().item()
    return errors


# %% [markdown]
# ### Checking the sharded model against the single-process step
#
# The worker below runs on every rank: it builds the full model and a batch from one seed,
# takes the single-process loss and gradients, shards the model over its TP group, takes
# the tensor-parallel loss and gradients, and returns the largest differences, the shapes
# of its parameters, and every all-reduce it issued (counted by wrapping
# `torch.distributed.all_reduce` while the TP step runs). With `tp` smaller than the world
# it builds a `Mesh` (section 6.4) and uses its TP groups, so several TP groups run side by
# side, as they will inside the 4D mesh.

# %%
#| export lrn_lib.tensor_parallel
def tp_llama_check(rank: int, world: int, cfg: LlamaConfig, tp: int | None = None, seed: int = 0,
                   batch: int = 2, seq: int = 12) -> dict:
    """spawn worker: one float64 training step of tensor_parallel_llama against the full Llama.

    tp (default world) ranks per TP group; the world is split into world // tp groups by
    Mesh(MeshShape(tp=tp, dp=world // tp)). Returns {'loss', 'logits', 'grad'}: the largest
    |TP - single-process| of the loss, this rank's logit columns and any parameter gradient
    (sharded gradients against the matching slices); 'grads' per parameter name; 'shapes':
    name -> this rank's parameter shape; 'forward' and 'backward': the sizes (numbers of
    elements) of the all-reduces the TP step issued.
    """
    check_rank(rank, world)
    tp = world if tp is None else validate.integer(tp, "tp", low=1)
    if world % tp:
        raise ValueError(f"tp={tp} does not divide world={world}")
    check_tp_config(cfg, tp)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    group = Mesh(MeshShape(tp=tp, dp=world // tp)).group["tp"] if tp < world else None
    torch.manual_seed(seed)
    full = Llama(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    sharded = tensor_parallel_llama(full, group)
    logits = full(inputs)
    loss = lm_loss(logits, targets)
    loss.backward()

    sizes: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        local_logits = sharded(inputs)
        tp_loss = vocab_parallel_cross_entropy(local_logits, targets, cfg.vocab_size, group)
        forward = list(sizes)
        tp_loss.backward()
        backward = sizes[len(forward):]
    finally:
        dist.all_reduce = real_all_reduce
    start, stop = shard_bounds(cfg.vocab_size, dist.get_rank(group), tp)
    grads = gradient_errors(sharded, full)
    return {"loss": abs(tp_loss.item() - loss.item()),
            "logits": (local_logits - logits[..., start:stop]).abs().max().item(),
            "grad": max(grads.values()), "grads": grads,
            "shapes": {name: tuple(p.shape) for name, p in sharded.named_parameters()},
            "forward": forward, "backward": backward}


def dtensor_tp_check(rank: int, world: int, cfg: LlamaConfig, seed: int = 0, batch: int = 2, seq: int = 12) -> dict:
    """spawn worker: tensor_parallel_llama against PyTorch's own TP (DTensor) on the same float64 step.

    PyTorch's model: the full Llama parallelized by parallelize_module on a 1-D CPU
    DeviceMesh with ColwiseParallel (wq, wk, wv, w1, w3, output, its logits gathered) and
    RowwiseParallel (wo, w2, the embedding). Returns {'loss', 'grad'}: the largest
    |ours - PyTorch's| of the loss and of any parameter gradient (this rank's shards).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_rank(rank, world)
    check_tp_config(cfg, world)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    torch.manual_seed(seed)
    full = Llama(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ours = tensor_parallel_llama(full)
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())}
    for i in range(cfg.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    theirs = parallelize_module(full, init_device_mesh("cpu", (world,)), plan)
    their_loss = lm_loss(theirs(inputs), targets)
    their_loss.backward()
    our_loss = vocab_parallel_cross_entropy(ours(inputs), targets, cfg.vocab_size)
    our_loss.backward()
    grad = 0.0
    for name, p in ours.named_parameters():
        param = theirs.get_parameter(name)
        reference = param.grad
        if isinstance(param, DTensor):          # a gradient may come back in another layout (the embedding's: replicated)
            reference = reference.redistribute(param.device_mesh, param.placements).to_local()
        grad = max(grad, (p.grad - reference).abs().max().item())
    return {"loss": abs(our_loss.item() - their_loss.item()), "grad": grad}


def build_tp_llama(rank: int, world: int, cfg: LlamaConfig, seeds: list[int]) -> str:
    """spawn worker: build Llama(cfg) from seeds[rank] and shard it over the world; 'ok' or the ValueError's message."""
    check_rank(rank, world)
    check_config(cfg)
    if len(validate.nonempty(seeds, "seeds")) != world:
        raise ValueError(f"seeds must hold one seed per rank, {world}, got {len(seeds)}")
    torch.manual_seed(seeds[rank])
    try:
        tensor_parallel_llama(Llama(cfg))
    except ValueError as error:
        return str(error)
    return "ok"


# %%
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from lrn_lib.llama import LLAMA3_405B, Llama, tiny_config
from lrn_lib.tensor_parallel import build_tp_llama, dtensor_tp_check, shard_bounds, tp_llama_check

tp_cfg = tiny_config()
tp_results = spawn(tp_llama_check, 2, tp_cfg)
print(f"tiny Llama: dim={tp_cfg.dim}, {tp_cfg.n_heads} query heads, {tp_cfg.n_kv_heads} KV heads, "
      f"ffn_dim={tp_cfg.ffn_dim}, vocab={tp_cfg.vocab_size}; TP over 2 gloo processes, float64")
print(f"{'parameter (an nn.Linear weight is (out, in))':47s} {'full':>10s} {'rank 0':>10s} {'rank 1':>10s}")
for name, p in Llama(tp_cfg).named_parameters():
    if not name.startswith("layers.") or name.startswith("layers.0."):
        shards = [str(r["shapes"][name]) for r in tp_results]
        print(f"{name:47s} {str(tuple(p.shape)):>10s} {shards[0]:>10s} {shards[1]:>10s}")

# %% [markdown]
# Each rank holds 2 of the 4 query heads and 1 of the 2 KV heads, half of the SwiGLU
# hidden units in all three FFN matrices, half of the vocabulary, and full copies of the
# norms. The figure draws each matrix as the paper's $A = W^\top$ (input features down,
# output features across) and colours what each rank holds: column-parallel matrices are
# cut along the outputs, row-parallel ones along the inputs, and each row-parallel cut
# lines up with the column-parallel cut that feeds it (the heads for $W_o$, the hidden
# units for $W_2$).

# %%
hd = tp_cfg.head_dim
matrices = [("wq", tp_cfg.dim, tp_cfg.dim, "col", hd, "q"), ("wk", tp_cfg.dim, tp_cfg.n_kv_heads * hd, "col", hd, "kv"),
            ("wv", tp_cfg.dim, tp_cfg.n_kv_heads * hd, "col", hd, "kv"), ("wo", tp_cfg.dim, tp_cfg.dim, "row", hd, "q"),
            ("w1 gate", tp_cfg.dim, tp_cfg.ffn_dim, "col", 1, "unit"), ("w3 up", tp_cfg.dim, tp_cfg.ffn_dim, "col", 1, "unit"),
            ("w2 down", tp_cfg.ffn_dim, tp_cfg.dim, "row", 1, "unit")]
colors = ["tab:blue", "tab:orange"]
fig, ax = plt.subplots(figsize=(11, 3.6))
x0 = 0
for label, d_in, d_out, kind, unit, what in matrices:
    size = d_out if kind == "col" else d_in
    for r in range(2):
        a, b = shard_bounds(size, r, 2)
        xy, w, h = ((x0 + a, 0), b - a, d_in) if kind == "col" else ((x0, d_in - b), d_out, b - a)
        ax.add_patch(Rectangle(xy, w, h, facecolor=colors[r], edgecolor="black", alpha=0.75))
        span = f"{what} {a // unit}-{b // unit - 1}" if b // unit - a // unit > 1 else f"{what} {a // unit}"
        ax.text(xy[0] + w / 2, xy[1] + h / 2, span, ha="center", va="center", fontsize=7,
                rotation=90 if kind == "col" else 0)
    ax.text(x0 + d_out / 2, -6, f"{label}\n{'column' if kind == 'col' else 'row'}", ha="center", va="top", fontsize=8)
    x0 += d_out + 30
ax.set_xlim(-10, x0)
ax.set_ylim(-40, 170)
ax.set_aspect("equal")
ax.axis("off")
ax.legend([Rectangle((0, 0), 1, 1, color=c, alpha=0.75) for c in colors], ["rank 0", "rank 1"], loc="upper left")
ax.set_title("One block's matrices A = W^T (d_in down, d_out across) split over 2 TP ranks:\n"
             "q / kv = query / KV heads, unit = SwiGLU hidden units", fontsize=10)
plt.show()

# %% [markdown]
# Now the claims. One step of the tensor-parallel model gives the single-process loss, each
# rank's logit columns equal the matching columns of the full logits, and every gradient,
# sharded or replicated, equals the matching slice of the single-process gradient, all to
# float64 rounding. The all-reduces are exactly those predicted: forward, one for the
# embedding, two per layer of $B \cdot T \cdot d$ numbers, and two for the loss ($B T$
# maxima, then $2 B T$ sums); backward, two per layer and one for the final norm's $f$.

# %%
tokens_per_step = 2 * 12                              # tp_llama_check's default batch 2, sequence 12
activation = tokens_per_step * tp_cfg.dim
print("loss equal on every rank (|TP - single| < 1e-12):", all(r["loss"] < 1e-12 for r in tp_results))
print("each rank's logit columns equal the full logits' (< 1e-12):", all(r["logits"] < 1e-12 for r in tp_results))
print("every gradient equals its slice of the single-process gradient (< 1e-12):",
      all(r["grad"] < 1e-12 for r in tp_results))
print("norm gradients, replicated and not all-reduced, equal the full ones (< 1e-12):",
      all(e < 1e-12 for r in tp_results for name, e in r["grads"].items() if "norm" in name))
print(f"forward all-reduces: {len(tp_results[0]['forward'])} = 1 + 2 x {tp_cfg.n_layers} layers + 2; sizes as predicted:",
      tp_results[0]["forward"] == [activation] * (1 + 2 * tp_cfg.n_layers) + [tokens_per_step, 2 * tokens_per_step])
print(f"backward all-reduces: {len(tp_results[0]['backward'])} = 2 x {tp_cfg.n_layers} layers + 1, each of B*T*dim:",
      tp_results[0]["backward"] == [activation] * (2 * tp_cfg.n_layers + 1))

# %% [markdown]
# Two TP groups of 2 inside a world of 4 (a `Mesh` with $t = 2$, $d_p = 2$) behave the same
# way, with a vocabulary of 255 that does not divide evenly (rank 0 of each group owns 128
# tokens, rank 1 owns 127). Ranks that were seeded differently are refused before they
# could train inconsistent shards. And PyTorch's own tensor parallelism, DTensor's
# `parallelize_module` with `ColwiseParallel` and `RowwiseParallel` on a CPU `DeviceMesh`
# (section 6.10 uses it at scale), computes the same loss and gradients as ours.

# %%
grouped = spawn(tp_llama_check, 4, tiny_config(vocab_size=255), 2)
print("world 4 as 2 TP groups of 2, vocab 255: loss, logits and every gradient equal (< 1e-12):",
      all(r["loss"] < 1e-12 and r["grad"] < 1e-12 and r["logits"] < 1e-12 for r in grouped))
print("vocabulary rows held by the ranks of a group:", [r["shapes"]["tok_embeddings.weight"][0] for r in grouped[:2]])
print("seeds 0 and 1 on the two ranks:", spawn(build_tp_llama, 2, tp_cfg, [0, 1])[0])
versus_dtensor = spawn(dtensor_tp_check, 2, tp_cfg)
print("ours vs PyTorch's DTensor TP: loss and every gradient equal (< 1e-12):",
      all(r["loss"] < 1e-12 and r["grad"] < 1e-12 for r in versus_dtensor))

# %% [markdown]
# What does this mean for Llama 3 405B, whose TP degree is 8? Each GPU holds 16 of the
# 128 query heads, one of the 8 KV heads and 1/8 of the SwiGLU hidden units; per layer it
# stores one eighth of the matrices, and it all-reduces a $(B, T, 16384)$ activation four
# times per layer and micro-batch (two forward, two backward).

# %%
big, tp_big = LLAMA3_405B, 8
q_rows, kv_rows, ffn_rows = (big.n_heads * big.head_dim // tp_big, big.n_kv_heads * big.head_dim // tp_big,
                             big.ffn_dim // tp_big)
per_gpu = {"wq": (q_rows, big.dim), "wk": (kv_rows, big.dim), "wv": (kv_rows, big.dim), "wo": (big.dim, q_rows),
           "w1": (ffn_rows, big.dim), "w3": (ffn_rows, big.dim), "w2": (big.dim, ffn_rows)}
for name, shape in per_gpu.items():
    print(f"{name}: {shape} per GPU")
layer_params = sum(a * b for a, b in per_gpu.values())
print(f"one layer's matrices: {layer_params / 1e6:.0f}M parameters per GPU, {2 * layer_params / 2**30:.2f} GiB in bf16 "
      f"(the whole layer: {tp_big * layer_params / 1e9:.2f}B parameters)")
seq_405b = 8192
print(f"one all-reduce of a (1, {seq_405b}, {big.dim}) bf16 activation: {seq_405b * big.dim * 2 / 2**20:.0f} MiB; "
      f"4 per layer and micro-batch, {4 * big.n_layers} for the {big.n_layers} layers")

# %% [markdown]
# ## 6.6 Context parallelism
#
# Tensor parallelism splits the weights, pipeline parallelism the layers, data parallelism
# the batch. None of them shortens the sequence a rank works on, and a *single sequence*
# can be too long: Llama 3's last pre-training stage grows the context to 128K tokens
# (arXiv:2407.21783, Section 3.4.2), and then the activations of one sequence, $T \times d$
# per tensor and layer, no longer fit next to the weights, even with FlashAttention's
# $O(T)$ attention memory. **Context
# parallelism** (CP) splits the sequence dimension itself over $CP$ ranks: each rank holds
# $T/CP$ tokens of every activation.
#
# Almost everything in a transformer block is token-wise: RMSNorm, the $Q, K, V$ and output
# projections, the feed-forward network, and RoPE (provided each token is rotated by its
# *global* position, not its index in the shard). Those layers run on a shard without any
# communication. Attention is the exception: a query needs the keys and values of every
# token it attends to, and with a causal mask that is every earlier token, most of which
# live on other ranks. This section builds the two ways of getting them there,
#
# * **ring attention** (Liu, Zaharia and Abbeel 2023, arXiv:2310.01889): K/V blocks travel
#   around a ring of ranks while each rank merges partial attention results with the
#   log-sum-exp merge of chapter 2, and
# * **all-gather CP**, the variant Llama 3 uses: gather all of K and V, then attend locally,
#
# both with their backward passes, on a sequence layout that balances the causal work.

# %%
import matplotlib.pyplot as plt
import torch

from lrn_lib import config
from lrn_lib.attention import attention_reference
from lrn_lib.mesh import spawn
from lrn_lib.online_softmax import merge_lse

config.seed_everything(0)
torch.set_num_threads(1)

# %% [markdown]
# ### 6.6.1 Splitting the sequence, and where the causal work is
#
# The obvious split gives rank $i$ the contiguous chunk $i$ of $T/CP$ tokens. Without a mask
# every rank then does the same work. With a causal mask it does not: write the attention
# matrix as $CP \times CP$ blocks of (query chunk, key chunk). The queries of chunk $i$ see
# all keys of chunks $j < i$ (full blocks), the lower triangle of block $(i, i)$, and
# nothing of later chunks. Counting a diagonal block as half a full one, rank $i$ computes
#
# $$W_i^{\text{contiguous}} = i + \tfrac12 \text{ blocks}, \qquad
#   \max_i W_i \,/\, \mathrm{mean}_i W_i = \frac{CP - \frac12}{CP/2} \to 2 \qquad (6.16)$$
#
# Rank 0 attends to its own chunk only while the last rank attends to the whole sequence;
# since every rank waits for the slowest before the next layer, the step takes nearly twice
# as long as the balanced one would. The fix used by Llama 3 (Section 3.3.2) and by
# Megatron-LM's CP: cut the sequence into $2\,CP$ chunks and give rank $i$ chunks $i$ and
# $2CP-1-i$, one from the cheap front and one from the expensive back. In units of the
# smaller chunks, rank $i$ now does $(i + \frac12) + (2CP - 1 - i + \frac12) = 2CP$ blocks,
# the same on every rank.
#
# The helpers below cut a $(B, T, \dots)$ tensor into a rank's shard (its chunks concatenated
# in increasing order), put the shards back together, and give the global positions of a
# rank's tokens, which RoPE needs. `balanced=False` gives the contiguous layout.

# %%
#| export lrn_lib.context_parallel
import functools
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrn_lib import validate
from lrn_lib.attention import attention_reference, causal_visible, check_attention_inputs, flash_attention
from lrn_lib.llama import Llama, lm_loss, tiny_config
from lrn_lib.mesh import check_group, check_rank


def chunk_ids(rank: int, cp: int, balanced: bool = True) -> list[int]:
    """The sequence chunks that CP rank `rank` holds, in increasing order.

    balanced: the sequence is cut into 2*cp chunks and rank i holds [i, 2*cp - 1 - i]
    (Llama 3's causal load balancing); otherwise into cp chunks and rank i holds [i].
    """
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    return [rank, 2 * cp - 1 - rank] if balanced else [rank]


def _n_chunks(cp: int, balanced: bool) -> int:
    """How many chunks the sequence is cut into: 2*cp (balanced) or cp."""
    return 2 * cp if balanced else cp


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 1, balanced: bool = True) -> torch.Tensor:
    """The part of a full sequence that CP rank `rank` holds.

    x: (..., T, ...) with the sequence along dim (T divisible by 2*cp when balanced, else by
    cp). Returns (..., T/cp, ...): the rank's chunks (chunk_ids) concatenated along dim.
    """
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    validate.tensor(x, "x")
    dim = validate.integer(dim, "dim", low=-x.dim(), high=x.dim() - 1) % x.dim()
    n = _n_chunks(cp, balanced)
    if x.shape[dim] % n:
        layout = "2 * cp" if balanced else "cp"
        raise ValueError(f"x has sequence length {x.shape[dim]} along dim {dim}, which is not divisible "
                         f"by {layout} = {n} chunks")
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, cp, balanced)], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1, balanced: bool = True) -> torch.Tensor:
    """Inverse of shard_sequence: the full sequence from every rank's shard, given in rank order.

    shards: cp tensors of one shape (..., T/cp, ...). Returns (..., T, ...) in global order.
    """
    validate.nonempty(shards, "shards")
    for shard in shards:
        validate.tensor(shard, "shards")
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards have shapes {[tuple(s.shape) for s in shards]}; they must all match")
    cp = len(shards)
    dim = validate.integer(dim, "dim", low=-shards[0].dim(), high=shards[0].dim() - 1) % shards[0].dim()
    per_rank = len(chunk_ids(0, cp, balanced))
    if shards[0].shape[dim] % per_rank:
        raise ValueError(f"shards have length {shards[0].shape[dim]} along dim {dim}, which does not split "
                         f"into {per_rank} chunks")
    chunks: list[torch.Tensor | None] = [None] * _n_chunks(cp, balanced)
    for rank, shard in enumerate(shards):
        for c, piece in zip(chunk_ids(rank, cp, balanced), shard.chunk(per_rank, dim=dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


def shard_positions(seq_len: int, rank: int, cp: int, balanced: bool = True,
                    device: torch.device | None = None) -> torch.Tensor:
    """The global positions (T/cp,) int64 of CP rank `rank`'s tokens in a sequence of seq_len.

    These are the positions RoPE must rotate the shard's queries and keys by.
    """
    validate.integer(seq_len, "seq_len", low=1)
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    n = _n_chunks(cp, balanced)
    if seq_len % n:
        raise ValueError(f"seq_len {seq_len} is not divisible by the {n} chunks of the layout")
    return shard_sequence(torch.arange(seq_len, device=device), rank, cp, dim=0, balanced=balanced)


# %%
from lrn_lib.context_parallel import chunk_ids, shard_positions, shard_sequence, unshard_sequence

cp, seq_len = 4, 16
for balanced in (False, True):
    name = "balanced" if balanced else "contiguous"
    for rank in range(cp):
        print(f"{name:10s} rank {rank}: chunks {chunk_ids(rank, cp, balanced)}, "
              f"positions {shard_positions(seq_len, rank, cp, balanced).tolist()}")

x = torch.randn(2, 24, 3)
shards = [shard_sequence(x, r, 3) for r in range(3)]
print("unshard(shard(x)) == x:", torch.equal(unshard_sequence(shards), x))

# %% [markdown]
# The figure draws the $2CP \times 2CP$ blocks (query chunk, key chunk) of a causal attention
# matrix for $CP = 4$, colored by the rank that computes them; the contiguous layout is shown
# at the same granularity (rank $i$ holds chunks $2i$ and $2i+1$). The bars count each rank's
# work, a diagonal block as half.

# %%
def block_owners(cp: int, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Owner rank of each causal (query chunk, key chunk) block (-1: masked), and work per rank."""
    n = 2 * cp
    owner = torch.full((n, n), -1)
    work = torch.zeros(cp)
    for rank in range(cp):
        mine = chunk_ids(rank, cp) if balanced else [2 * rank, 2 * rank + 1]
        for qc in mine:
            owner[qc, :qc + 1] = rank
            work[rank] += qc + 0.5                          # qc full blocks and half a diagonal one
    return owner, work


cp = 4
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, balanced in zip(axes[:2], (False, True)):
    owner, work = block_owners(cp, balanced)
    shown = torch.where(owner >= 0, owner.double(), torch.nan)
    ax.imshow(shown, cmap="tab10", vmin=0, vmax=9)
    for qc in range(2 * cp):
        for kc in range(qc + 1):
            ax.text(kc, qc, f"{int(owner[qc, kc])}", ha="center", va="center", fontsize=8)
        ax.add_patch(plt.Rectangle((qc - 0.5, qc - 0.5), 1, 1, fill=False, hatch="///", lw=0))
    ax.set_title(("load-balanced" if balanced else "contiguous") + f" layout, CP = {cp}")
    ax.set_xlabel("key chunk (hatched: causal diagonal block, half the work)")
    ax.set_ylabel("query chunk (number: the rank computing it)")
    axes[2].bar(torch.arange(cp) + (0.2 if balanced else -0.2), work, width=0.4, color="0.3" if balanced else "0.7",
                label="load-balanced" if balanced else "contiguous")
axes[2].set_xlabel("CP rank")
axes[2].set_ylabel("blocks computed")
axes[2].set_xticks(range(cp))
axes[2].legend()
plt.tight_layout()
plt.show()

for balanced in (False, True):
    work = block_owners(cp, balanced)[1]
    print(f"{'load-balanced' if balanced else 'contiguous':13s} work per rank {work.tolist()}, "
          f"slowest / mean = {work.max() / work.mean():.2f}")

# %% [markdown]
# ### 6.6.2 Merging partial attention results
#
# Split the keys of one query into two disjoint sets $A$ and $B$ and compute attention over
# each alone: outputs $O_A, O_B$ (each normalized by its own softmax) and log-sum-exps
# $L_A, L_B$ of the scaled scores. The full softmax weights a score $s$ by
# $e^{s - L}$ with $L = \log(e^{L_A} + e^{L_B})$, chapter 2's merge (2.3), so
#
# $$O = e^{L_A - L}\, O_A + e^{L_B - L}\, O_B \qquad (6.17)$$
#
# The two weights sum to one, and $e^{L_B - L} = e^{L_B} / (e^{L_A} + e^{L_B}) =
# \sigma(L_B - L_A)$, the logistic sigmoid. Hence (6.17) and (2.3) can be written as two
# updates of a running result $(O, L) \leftarrow (O_A, L_A)$:
#
# $$O \leftarrow O - \sigma(L_B - L)\,(O - O_B), \qquad
#   L \leftarrow L - \log\sigma(L - L_B) \qquad (6.18)$$
#
# (the second because $L_A + \log(1 + e^{L_B - L_A}) = L_A - \log\sigma(L_A - L_B)$). Both
# $\sigma$ and $\log\sigma$ are computed without overflow for any argument, so (6.18)
# needs neither the running maximum of chapter 2 nor any exponential of a large number. The
# form fits ring attention, which updates one running result per query as blocks arrive.
# (6.18) assumes both sets are non-empty (finite $L$); ring attention never merges an empty
# block, it skips it.

# %%
#| export lrn_lib.context_parallel
def merge_partials(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over a second, disjoint set of keys into a running result, equation (6.18).

    o, o_b: (B, H, N, d); lse, lse_b: (B, H, N), all finite. Returns the (O, L) of attention
    over the union of both key sets.
    """
    for name, x, y in (("o", o, o_b), ("lse", lse, lse_b)):
        validate.tensor(x, name, dims=4 if name == "o" else 3, kind="float")
        validate.tensor(y, name + "_b", kind="float")
        validate.same_shape(**{name: x, name + "_b": y})
    if lse.shape != o.shape[:-1]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; o {tuple(o.shape)} needs {tuple(o.shape[:-1])}")
    o = o - torch.sigmoid(lse_b - lse)[..., None] * (o - o_b)       # (6.18), equal to (6.17)
    lse = lse - F.logsigmoid(lse - lse_b)                            # (6.18), equal to (2.3)
    return o, lse


# %% [markdown]
# A check with three key blocks of very different score scales: merging the three partial
# results gives attention over all keys, (6.18) agrees with the weighted form (6.17), and
# the weighted form written with raw exponentials, $\sum_j e^{L_j} O_j / \sum_j e^{L_j}$,
# overflows once the scores are large.

# %%
from lrn_lib.context_parallel import merge_partials

g = torch.Generator().manual_seed(0)
q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
k = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0] * 10 + [30.0] * 10 + [0.1] * 10,
                                                                            dtype=torch.float64)[:, None]
v = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64)
parts = [attention_reference(q, k[:, :, j:j + 10], v[:, :, j:j + 10]) for j in (0, 10, 20)]
o_full, lse_full = attention_reference(q, k, v)

o, lse = parts[0]
o_w, lse_w = parts[0]
for o_b, lse_b in parts[1:]:
    o, lse = merge_partials(o, lse, o_b, lse_b)                                   # (6.18)
    merged = merge_lse(lse_w, lse_b)                                              # (2.3)
    o_w = torch.exp(lse_w - merged)[..., None] * o_w + torch.exp(lse_b - merged)[..., None] * o_b   # (6.17)
    lse_w = merged
print("merged (6.18) == attention over all keys:", torch.allclose(o, o_full, atol=1e-12, rtol=0),
      torch.allclose(lse, lse_full, atol=1e-12, rtol=0))
print("(6.18) == weighted form (6.17):", torch.allclose(o, o_w, atol=1e-12, rtol=0))

big = [(o_j, lse_j + 800.0) for o_j, lse_j in parts]          # the same results with all L shifted by 800
raw = sum(torch.exp(l)[..., None] * o_j for o_j, l in big) / sum(torch.exp(l) for _, l in big)[..., None]
o_big, lse_big = big[0]
for o_b, lse_b in big[1:]:
    o_big, lse_big = merge_partials(o_big, lse_big, o_b, lse_b)
print("raw exponentials at L ~ 800 give nan:", bool(raw.isnan().any()))
print("(6.18) at L ~ 800 still equals attention:", torch.allclose(o_big, o_full, atol=1e-12, rtol=0))

# %% [markdown]
# ### 6.6.3 Ring attention
#
# Ring attention arranges the $CP$ ranks in a ring. Every rank starts with its own K/V
# shard; at step $t = 0, 1, \dots, CP-1$, rank $r$ holds the K/V shard of rank
#
# $$s = (r - t) \bmod CP \qquad (6.19)$$
#
# It attends its queries to that block, merges the result into its running $(O, L)$ by
# (6.18), and passes the block on to rank $r+1$. The transfer of the next block is posted
# *before* the computation on the current one, so communication hides behind compute when a
# block's attention takes longer than sending it, which holds for long enough chunks because
# attention costs $O(c^2)$ per block of $c$ tokens and the transfer $O(c)$. Each rank holds
# at most two K/V blocks at a time (in the backward pass also their two gradient
# accumulators), never the K/V of the whole sequence.
#
# Under the causal mask each (query chunk, key chunk) pair is one of three cases: the key
# chunk is later (skip), the same (causal diagonal block), or earlier (full block). A shard's
# chunks are sorted, so the key chunks visible to a query chunk $q_c$ are always a *prefix*
# of the arriving shard, and when the prefix ends in chunk $q_c$ itself, chapter 4's
# bottom-right-aligned causal mask on (query chunk, visible prefix) is exactly the right
# mask: query $i$ of the chunk sees every earlier chunk fully and keys $\le i$ of its own. So
# every block is one call of `flash_attention(q_chunk, k_prefix, v_prefix, causal=ends_on_diagonal)`.
#
# In the load-balanced layout every step costs every rank the same: at $t = 0$ both diagonal
# blocks plus one full block; from a rank $s < r$ all queries against the first half of
# the arriving shard; from $s > r$ the second half of the queries against all of it: two
# chunk blocks each time. (In the contiguous layout rank 0 idles at every step after the
# first.)

# %%
#| export lrn_lib.context_parallel
def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype (the accumulators)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _visible_prefix(q_chunk: int, k_chunks: list[int], causal: bool) -> tuple[int, bool]:
    """(how many leading chunks of k_chunks query chunk q_chunk sees, whether the last one is its diagonal).

    k_chunks must be sorted: then the visible chunks (k <= q_chunk) are a prefix.
    """
    if not causal:
        return len(k_chunks), False
    n = sum(c <= q_chunk for c in k_chunks)
    return n, n > 0 and k_chunks[n - 1] == q_chunk


def _ring_exchange(send: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list]:
    """Post the ring transfer: send `send` to the next rank, receive the previous rank's into a new buffer.

    Returns (receive buffer, requests); wait on the requests before reading the buffer.
    """
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % cp), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % cp), group)]
    return received, dist.batch_isend_irecv(ops)


def ring_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                           group: dist.ProcessGroup, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of ring attention on this rank's shards; returns (O, L).

    q: (B, H, Tl, d), k, v: (B, Hkv, Tl, d), the rank's shard (chunk_ids order). O: (B, H, Tl, d)
    and L: (B, H, Tl) in float32 (float64 for float64 input): attention of the local queries
    over the whole sequence.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    mine = chunk_ids(rank, cp, balanced)
    c = q.shape[2] // len(mine)                                  # tokens per chunk
    work = _work_dtype(q)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mine)
    kv = torch.stack((k, v))                                     # one buffer travels the ring
    for step in range(cp):
        if step < cp - 1:
            incoming, requests = _ring_exchange(kv, group)       # post the next transfer first
        theirs = chunk_ids((rank - step) % cp, cp, balanced)     # (6.19)
        for a, q_chunk in enumerate(mine):
            n, diagonal = _visible_prefix(q_chunk, theirs, causal)
            if n == 0:
                continue                                         # a later chunk: masked out entirely
            o_b, lse_b = flash_attention(q[:, :, a * c:(a + 1) * c], kv[0, :, :, :n * c], kv[1, :, :, :n * c],
                                         causal=diagonal, scale=scale, return_lse=True)
            o_b = o_b.to(work)
            results[a] = (o_b, lse_b) if results[a] is None else merge_partials(*results[a], o_b, lse_b)
        if step < cp - 1:
            for request in requests:
                request.wait()
            kv = incoming
    return torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2)


# %% [markdown]
# ### 6.6.4 The backward pass of ring attention
#
# FlashAttention-2's backward pass (4.2) is already written block by block: given the final
# $O$ and $L$ of the forward pass and $D = \mathrm{rowsum}(dO \odot O)$, the contribution of a
# key block $j$ to every gradient needs only $Q, K_j, V_j, dO, L, D$:
#
# $$P = e^{\tau Q K_j^\top - L}, \quad dV_j \mathrel{+}= P^\top dO, \quad dP = dO\, V_j^\top, \quad
#   dS = P \odot (dP - D), \quad dQ \mathrel{+}= \tau\, dS\, K_j, \quad dK_j \mathrel{+}= \tau\, dS^\top Q
#   \qquad (6.20)$$
#
# The one thing that makes this correct across ranks is that $L$ and $D$ are the *global*
# ones, saved by the forward pass after all blocks were merged: $e^{S - L}$ is then the
# block's piece of the full softmax, not of a local one. The ring backward runs the same
# schedule (6.19) as the forward pass, but now two things travel: the K/V block, and its
# gradient accumulators $dK, dV$, to which every rank adds its queries' contribution
# (6.20) before passing them on. After $CP$ steps each accumulator has visited every rank,
# and one final hop brings it home to the rank that owns the keys. $dQ$ never moves: it is
# summed locally over the arriving blocks. With GQA the key heads are repeated for the
# computation and $dK, dV$ summed over the query heads of each group.

# %%
#| export lrn_lib.context_parallel
def attention_block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                             lse: torch.Tensor, delta: torch.Tensor, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key block's share of attention's gradients, equation (6.20), from the global L and D.

    q, do: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); lse, delta: (B, H, Nq), finite. causal: the
    bottom-right mask of chapter 4. Returns (dQ (B, H, Nq, d), dK, dV (B, Hkv, Nk, d)), dK and
    dV summed over the query heads of each GQA group.
    """
    check_attention_inputs(q, k, v, causal, scale)
    validate.tensor(do, "do", kind="float")
    validate.same_shape(q=q, do=do)
    for name, t in (("lse", lse), ("delta", delta)):
        if validate.tensor(t, name, kind="float").shape != q.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; q {tuple(q.shape)} needs {tuple(q.shape[:-1])}")
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    k_, v_ = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * q @ k_.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_visible(n_q, n_k, q.device), -float("inf"))
    p = torch.exp(s - lse[..., None])                            # P = exp(S - L), the global L   (6.20)
    dv = p.transpose(-1, -2) @ do                                # dV = P^T dO
    ds = p * (do @ v_.transpose(-1, -2) - delta[..., None])      # dS = P * (dO V^T - D)
    dq = scale * ds @ k_                                         # dQ = scale dS K
    dk = scale * ds.transpose(-1, -2) @ q                        # dK = scale dS^T Q
    return dq, dk.view(b, h_kv, group, n_k, d).sum(2), dv.view(b, h_kv, group, n_k, d).sum(2)


def ring_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, do: torch.Tensor, causal: bool, scale: float,
                            group: dist.ProcessGroup,
                            balanced: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass of ring attention: K/V and their dK/dV accumulators travel the ring.

    Shapes as in ring_attention_forward; o, lse are its results and do has o's shape.
    Returns (dQ, dK, dV) of this rank's shards in the dtypes of q, k, v.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    for name, t in (("o", o), ("do", do)):
        validate.tensor(t, name, kind="float")
    validate.same_shape(q=q, o=o, do=do)
    if validate.tensor(lse, "lse", kind="float").shape != q.shape[:-1]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; q {tuple(q.shape)} needs {tuple(q.shape[:-1])}")
    check_group(group)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    mine = chunk_ids(rank, cp, balanced)
    c = q.shape[2] // len(mine)
    work = o.dtype
    q_, do_ = q.to(work), do.to(work)
    delta = (do_ * o).sum(dim=-1)                                # D = rowsum(dO * O), global
    dq = torch.zeros_like(q_)
    kv = torch.stack((k, v)).to(work)
    dkv = torch.zeros_like(kv)                                   # accumulators of the block held now
    for step in range(cp):
        if step < cp - 1:
            incoming, requests = _ring_exchange(kv, group)       # K/V can leave before the compute
        theirs = chunk_ids((rank - step) % cp, cp, balanced)     # (6.19)
        for a, q_chunk in enumerate(mine):
            n, diagonal = _visible_prefix(q_chunk, theirs, causal)
            if n == 0:
                continue
            rows, cols = slice(a * c, (a + 1) * c), slice(0, n * c)
            dq_a, dk_b, dv_b = attention_block_backward(q_[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols],
                                                        do_[:, :, rows], lse[:, :, rows], delta[:, :, rows],
                                                        diagonal, scale)
            dq[:, :, rows] += dq_a
            dkv[0, :, :, cols] += dk_b
            dkv[1, :, :, cols] += dv_b
        if cp > 1:                                               # dK/dV leave after the compute;
            dkv, dkv_requests = _ring_exchange(dkv, group)       # the last hop brings them home
            for request in dkv_requests:
                request.wait()
        if step < cp - 1:
            for request in requests:
                request.wait()
            kv = incoming
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Ring attention as an autograd function: ring_attention_forward, then ring_attention_backward.

    Use ring_attention(...), which checks the inputs and fills in the defaults.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                group: dist.ProcessGroup, balanced: bool) -> torch.Tensor:
        """O (B, H, Tl, d) in q's dtype; saves q, k, v, O and L for the backward pass."""
        o, lse = ring_attention_forward(q, k, v, causal, scale, group, balanced)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.balanced = causal, scale, group, balanced
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        """dQ, dK, dV by the ring backward; None for causal, scale, group and balanced."""
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.scale, ctx.group, ctx.balanced)
        return dq, dk, dv, None, None, None, None


def _check_cp_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, balanced: bool, causal: bool = False,
                     scale: float | None = None) -> None:
    """Chapter 4's checks, plus: q and k/v shards of one length that splits into the rank's chunks."""
    check_attention_inputs(q, k, v, causal, scale)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} local tokens but q has {q.shape[2]}; a CP rank holds the queries "
                         "and keys of the same tokens")
    if balanced and q.shape[2] % 2:
        raise ValueError(f"q has {q.shape[2]} local tokens, which is odd; the balanced layout gives each rank "
                         "two chunks of equal length")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None, group: dist.ProcessGroup | None = None,
                   balanced: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across the CP group, by ring attention (differentiable).

    q: (B, H, Tl, d); k, v: (B, Hkv, Tl, d) with Hkv dividing H: this rank's shard, as given by
    shard_sequence(..., balanced) and rotated by RoPE at shard_positions. Returns O (B, H, Tl, d),
    this rank's rows of softmax(scale Q K^T) V over the full sequence (causal: a token sees itself
    and earlier tokens). group: the CP process group (None: the whole world).
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return RingAttention.apply(q, k, v, causal, scale, group if group is not None else dist.group.WORLD, balanced)


# %% [markdown]
# ### 6.6.5 Llama 3's all-gather context parallelism
#
# Llama 3 does not pass blocks around a ring. Its CP ranks first **all-gather** K and V, so
# that every rank holds the keys and values of the whole sequence, and then compute attention
# of their local queries against them (Section 3.3.2 of the paper). The all-gather cannot
# overlap with the attention that needs its result, but the paper gives two reasons why that
# is acceptable. First, any mask (Llama 3 trains with document masks, so tokens attend only
# within their own document) is easy to apply when all keys are present, while a ring has to
# work out per block what is visible. Second, with GQA the K/V tensors are small: the 405B
# model has 128 query heads but 8 key/value heads, so gathering K and V moves
# $2 \cdot 8 / 128 = 1/8$ of the bytes of $Q$, and gathering costs $O(T)$ against attention's
# $O(T^2)$. The price is memory: every rank holds K/V for all $T$ tokens (still $T/CP$ for all
# other activations).
#
# Gathered and put back in global order, the keys of a local query chunk $q_c$ under the
# causal mask are the prefix of the first $q_c + 1$ chunks, and chapter 4's bottom-right
# mask on (query chunk, key prefix) is again the exact mask, so each local chunk is one
# `flash_attention` call. Only the gather itself needs a custom backward pass. All-gather is
# linear: rank $r$'s shard $x_r$ appears in every rank's gathered copy, so its gradient is the
# sum over ranks of the gradient each one computed for that piece,
#
# $$\frac{\partial \mathcal{L}}{\partial x_r}
#   = \sum_{r'} \Big[\frac{\partial \mathcal{L}}{\partial X^{(r')}}\Big]_{\text{shard } r} \qquad (6.21)$$
#
# which is exactly a **reduce-scatter**: sum the full-length gradients over the group and
# hand rank $r$ its shard. The attention itself is differentiated by autograd through
# `flash_attention` (chapter 4's kernels' backward on the GPU).

# %%
#| export lrn_lib.context_parallel
class GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards into the full sequence; its backward is a reduce-scatter (6.21).

    Use gather_sequence(...).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int, balanced: bool) -> torch.Tensor:
        """x (..., Tl, ...) on every rank -> the full (..., T, ...) in global order."""
        validate.tensor(x, "x")
        check_group(group)
        validate.integer(dim, "dim", low=0, high=x.dim() - 1)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        ctx.group, ctx.dim, ctx.balanced = group, dim, balanced
        return unshard_sequence(parts, dim=dim, balanced=balanced)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Sum the full-length gradients over the group, keep this rank's shard (reduce-scatter)."""
        cp = dist.get_world_size(ctx.group)
        pieces = [shard_sequence(grad, r, cp, dim=ctx.dim, balanced=ctx.balanced).contiguous() for r in range(cp)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=ctx.group)
        return out, None, None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                    balanced: bool = True) -> torch.Tensor:
    """All-gather every CP rank's shard x (..., Tl, ...) into the full (..., T, ...) sequence (differentiable).

    The inverse of shard_sequence across the group; the backward pass reduce-scatters.
    """
    validate.tensor(x, "x")
    check_group(group)
    dim = validate.integer(dim, "dim", low=-x.dim(), high=x.dim() - 1) % x.dim()
    return GatherSequence.apply(x, group if group is not None else dist.group.WORLD, dim, balanced)


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None, group: dist.ProcessGroup | None = None,
                        balanced: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across the CP group, Llama 3's way: all-gather K/V.

    Same arguments and result as ring_attention. Differentiable: autograd through
    flash_attention, and a reduce-scatter of dK, dV in the gather's backward pass.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    k_all = gather_sequence(k, group, dim=2, balanced=balanced)
    v_all = gather_sequence(v, group, dim=2, balanced=balanced)
    if not causal:
        return flash_attention(q, k_all, v_all, causal=False, scale=scale)
    mine = chunk_ids(dist.get_rank(group), dist.get_world_size(group), balanced)
    c = q.shape[2] // len(mine)
    outs = [flash_attention(q[:, :, a * c:(a + 1) * c], k_all[:, :, :(q_chunk + 1) * c],
                            v_all[:, :, :(q_chunk + 1) * c], causal=True, scale=scale)   # the key prefix
            for a, q_chunk in enumerate(mine)]
    return torch.cat(outs, dim=2)


# %% [markdown]
# ### 6.6.6 Checking both against attention on one process
#
# The worker below builds the same random $Q, K, V$ and upstream gradient $dO$ on every rank
# (one seed), computes full-sequence attention and its gradients with chapter 4's
# `attention_reference` and autograd in float64, then gives each rank its shards, runs
# ring or all-gather attention and its backward pass, and compares its output and its
# $dQ, dK, dV$ shards with the reference's. A list of configurations runs in one set of
# processes, since starting processes costs more than these small problems. The errors are
# stacked under `torch.no_grad()` before the all-reduce: a tensor handed to a collective
# that still carries an autograd graph can keep, through the `ctx.group` of the CP
# functions in that graph, the process group alive past `destroy_process_group`, and the
# process may then abort at exit.

# %%
#| export lrn_lib.context_parallel
def _check_configs(configs: list[dict], keys: tuple[str, ...]) -> None:
    """Raise unless configs is a non-empty list of dicts holding `keys`, each with a known variant."""
    for cfg in validate.nonempty(configs, "configs"):
        if not isinstance(cfg, dict):
            raise TypeError(f"configs must hold dicts, got {type(cfg).__name__}")
        missing = sorted(set(keys) - set(cfg))
        if missing:
            raise ValueError(f"a config of configs lacks the keys {missing}")
        validate.choice(cfg["variant"], "variant", ("ring", "allgather"))


def attention_check(rank: int, world: int, configs: list[dict],
                    cp_groups: list[list[int]] | None = None) -> list[dict[str, float]]:
    """Spawn worker: CP attention against full-sequence attention_reference, in float64.

    Each config: variant ("ring" or "allgather"), causal, balanced, batch, heads, kv_heads,
    seq_len, head_dim, seed. cp_groups: a partition of the ranks into CP groups, each of which
    runs every config on its own (default: one group of all ranks). Returns, per config, the
    largest |difference| over all ranks of the output and of dQ, dK, dV.
    """
    check_rank(rank, world)
    _check_configs(configs, ("variant", "causal", "balanced", "batch", "heads", "kv_heads", "seq_len", "head_dim",
                             "seed"))
    if cp_groups is not None and sorted(r for ranks in validate.nonempty(cp_groups, "cp_groups") for r in ranks) \
            != list(range(world)):
        raise ValueError(f"cp_groups must partition the ranks 0..{world - 1}, got {cp_groups}")
    group = dist.group.WORLD
    for ranks in cp_groups or []:
        new = dist.new_group(ranks)                               # collective: every rank creates every group
        if rank in ranks:
            group = new
    cp_rank, cp = dist.get_rank(group), dist.get_world_size(group)
    attend = {"ring": ring_attention, "allgather": allgather_attention}
    results = []
    for cfg in configs:
        g = torch.Generator().manual_seed(cfg["seed"])
        b, t, d = cfg["batch"], cfg["seq_len"], cfg["head_dim"]
        q = torch.randn(b, cfg["heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, cfg["kv_heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(b, cfg["kv_heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        do = torch.randn(b, cfg["heads"], t, d, generator=g, dtype=torch.float64)
        o_ref = attention_reference(q, k, v, causal=cfg["causal"])[0]
        o_ref.backward(do)

        def mine(x: torch.Tensor) -> torch.Tensor:
            return shard_sequence(x.detach(), cp_rank, cp, dim=2, balanced=cfg["balanced"])

        q_l, k_l, v_l = (mine(x).requires_grad_() for x in (q, k, v))
        o_l = attend[cfg["variant"]](q_l, k_l, v_l, causal=cfg["causal"], group=group, balanced=cfg["balanced"])
        o_l.backward(mine(do))
        with torch.no_grad():                                      # a collective's tensor must carry no graph
            errors = torch.stack([(o_l - mine(o_ref)).abs().max(), (q_l.grad - mine(q.grad)).abs().max(),
                                  (k_l.grad - mine(k.grad)).abs().max(), (v_l.grad - mine(v.grad)).abs().max()])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results.append(dict(zip(("output", "dq", "dk", "dv"), errors.tolist())))
    return results


# %%
from lrn_lib.context_parallel import attention_check

base = dict(batch=2, heads=6, kv_heads=2, head_dim=8, seed=0)
configs = [dict(base, variant=variant, causal=causal, balanced=balanced, seq_len=40)
           for variant in ("ring", "allgather") for causal, balanced in ((True, True), (True, False), (False, True))]
results = spawn(attention_check, 4, configs)[0]
print("4 CP ranks, 40 tokens, 6 query heads sharing 2 K/V heads, float64:")
for cfg, errors in zip(configs, results):
    layout = "load-balanced" if cfg["balanced"] else "contiguous"
    mask = "causal" if cfg["causal"] else "no mask"
    print(f"  {cfg['variant']:9s} {mask:7s} {layout:13s}: output, dQ, dK, dV equal to one process "
          f"(|difference| < 1e-12): {max(errors.values()) < 1e-12}")

# %% [markdown]
# ### 6.6.7 Context parallelism in the model: positions and the loss
#
# To run the Llama model of Section 6.1 with CP, three things change and nothing else.
#
# 1. Each rank feeds its shard of the tokens, `shard_sequence(tokens, rank, cp)`, **with its
#    global positions** `shard_positions(T, rank, cp)`. RoPE rotates a token by its position,
#    and attention scores depend on the difference of the query's and the key's positions;
#    a rank that numbered its tokens $0, 1, \dots, T/CP - 1$ would compute a different model.
#    Since RoPE is token-wise, rotating a shard by its global positions gives exactly the
#    shard of the rotated full sequence (checked below).
# 2. Every attention module's `attend` becomes CP attention with `causal=True` over the CP
#    group; the module's projections, RMSNorm and the FFN are untouched.
# 3. The loss. The single-process loss is the mean over all $N$ predicted tokens of the
#    sequence(s). Each rank only has the logits of its own tokens, so it computes the
#    **sum** of its token losses and divides by the **global** count $N = \sum_r N_r$:
#
# $$\mathcal{L} = \frac{1}{N} \sum_{r} \sum_{i \in \text{rank } r} \ell_i
#   = \sum_r \underbrace{\frac{1}{N}\sum_{i \in \text{rank } r} \ell_i}_{\text{rank } r\text{'s share}}
#   \qquad (6.22)$$
#
#    Each rank back-propagates its share; the parameter gradients are then **summed** over
#    the CP group (an all-reduce), because (6.22) is a sum over ranks. The value of the loss,
#    for logging, is the all-reduced sum of the shares.
#
# The pitfall is to let each rank take the mean over its own tokens and then average over
# ranks, as data parallelism does with its batches. That equals (6.22) only if every rank
# has the same number of counted tokens. With padding or ignored positions (target $-100$:
# prompts in fine-tuning, the tail of a packed batch) the counts differ per rank, and the
# tokens of a rank with few valid ones get too much weight. The same holds for the
# gradient: a DP-style *average* of the gradients over $G$ ranks divides by $G$, so the
# shares must then be multiplied by $G$. The rule that avoids both: normalize by the token
# count of the whole group over which the gradients are reduced, and reduce by summing.

# %%
#| export lrn_lib.context_parallel
def context_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup | None = None,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share (6.22) of the mean next-token loss of a sequence sharded over the CP group.

    logits: (B, Tl, V), targets: (B, Tl) int64, this rank's shard (targets equal to ignore_index
    are not counted). Returns (share, loss): share = sum of this rank's token losses / the
    group's count of counted tokens (back-propagate it, then sum the gradients over the group);
    loss = the all-reduced sum of the shares, the single-process mean (detached).
    """
    validate.tensor(logits, "logits", kind="float")
    validate.tensor(targets, "targets", kind="int")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B, T, V) "
                         "and (B, T)")
    validate.integer(ignore_index, "ignore_index")
    if bool((((targets < 0) | (targets >= logits.shape[-1])) & (targets != ignore_index)).any()):
        raise ValueError(f"targets must hold ids in [0, {logits.shape[-1]}) or ignore_index={ignore_index}")
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    total = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                            targets.flatten(), ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    dist.all_reduce(count, group=group)                          # N: the global token count
    if count == 0:
        raise ValueError(f"targets holds no counted token on any rank (all equal ignore_index={ignore_index})")
    share = total / count                                        # (6.22): local sum / global count
    loss = share.detach().clone()
    dist.all_reduce(loss, group=group)
    return share, loss


def cp_attend(variant: str = "allgather", group: dist.ProcessGroup | None = None,
              balanced: bool = True) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A causal CP attention (q, k, v) -> o to assign to lrn_lib.llama.Attention.attend.

    variant: "ring" (ring_attention) or "allgather" (allgather_attention, Llama 3's).
    """
    variants = {"ring": ring_attention, "allgather": allgather_attention}
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    check_group(group)
    attention = variants[variant]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's shard q (B, H, Tl, d) against the whole sequence."""
        return attention(q, k, v, causal=True, group=group, balanced=balanced)

    return attend


# %% [markdown]
# Two single-process checks first: RoPE at the global positions commutes with sharding,
# and, with padding at the end of the sequence, the mean of per-rank means differs from the
# true mean while the shares (6.22) add up to it. The ranks are simulated by
# `shard_sequence`; no processes are needed.

# %%
from lrn_lib.llama import apply_rope, rope_cos_sin, rope_frequencies, tiny_config

cfg = tiny_config()
x = torch.randn(2, cfg.n_heads, 32, cfg.head_dim, dtype=torch.float64)
cos, sin = rope_cos_sin(torch.arange(32), rope_frequencies(cfg), torch.float64)
full = apply_rope(x, cos, sin)
same = True
for rank in range(4):
    cos_r, sin_r = rope_cos_sin(shard_positions(32, rank, 4), rope_frequencies(cfg), torch.float64)
    shard_rotated = apply_rope(shard_sequence(x, rank, 4, dim=2), cos_r, sin_r)
    same &= torch.equal(shard_rotated, shard_sequence(full, rank, 4, dim=2))
print("RoPE of a shard at its global positions == the shard of RoPE of the sequence:", same)

token_loss = torch.rand(2, 32, dtype=torch.float64) * 5          # per-token losses of 2 sequences
counted = torch.ones(2, 32, dtype=torch.bool)
counted[:, 20:] = False                                          # padding: the last 12 targets are -100
true_mean = token_loss[counted].mean()
sums = [shard_sequence(token_loss * counted, r, 4).sum() for r in range(4)]
counts = [shard_sequence(counted, r, 4).sum() for r in range(4)]
print("counted tokens per rank:", [int(c) for c in counts])
mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 4
print("mean of per-rank means == true mean:", torch.allclose(mean_of_means, true_mean))
print("sum of shares (6.22) == true mean:", torch.allclose(sum(s / sum(counts) for s in sums), true_mean))

# %% [markdown]
# Now the whole model. The worker builds the tiny Llama (float64) from one seed on every
# rank, takes one forward and backward step on the full sequence, then replaces every
# `attend` by CP attention, runs its shard at its global positions, back-propagates its loss
# share and all-reduces the gradients over the CP group. Some targets are padding, so the
# ranks count different numbers of tokens. The loss and every parameter gradient must equal
# the single-process step.

# %%
#| export lrn_lib.context_parallel
def model_check(rank: int, world: int, configs: list[dict]) -> list[dict[str, float]]:
    """Spawn worker: one step of the tiny lrn_lib.llama model with CP against the single-process step.

    Each config: variant ("ring"/"allgather"), balanced, batch, seq_len, padding (how many
    trailing targets are ignore_index), seed. Returns, per config, |loss difference|, the
    largest |gradient difference| over all parameters, and the largest |gradient|, over the group.
    """
    check_rank(rank, world)
    _check_configs(configs, ("variant", "balanced", "batch", "seq_len", "padding", "seed"))
    group = dist.group.WORLD
    results = []
    for cfg in configs:
        torch.manual_seed(cfg["seed"])                            # the same weights and data on every rank
        model = Llama(tiny_config()).double()
        tokens = torch.randint(model.cfg.vocab_size, (cfg["batch"], cfg["seq_len"] + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[:, targets.shape[1] - cfg["padding"]:] = -100
        loss_ref = lm_loss(model(inputs), targets)                # the single-process step
        loss_ref.backward()
        grads_ref = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()

        for layer in model.layers:
            layer.attention.attend = cp_attend(cfg["variant"], group, cfg["balanced"])
        mine = functools.partial(shard_sequence, rank=rank, cp=world, dim=1, balanced=cfg["balanced"])
        logits = model(mine(inputs), shard_positions(cfg["seq_len"], rank, world, cfg["balanced"]))
        share, loss = context_parallel_loss(logits, mine(targets), group)
        share.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)                  # (6.22) is a sum over ranks: sum the grads
        with torch.no_grad():                                      # a collective's tensor must carry no graph
            grad_error = max((p.grad - grads_ref[name]).abs().max() for name, p in model.named_parameters())
            grad_size = max(g.abs().max() for g in grads_ref.values())
            errors = torch.stack([(loss - loss_ref).abs(), grad_error, grad_size])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results.append(dict(zip(("loss", "grad", "grad_size"), errors.tolist())))
    return results


# %%
from lrn_lib.context_parallel import model_check

configs = [dict(variant=variant, balanced=True, batch=2, seq_len=32, padding=5, seed=0)
           for variant in ("ring", "allgather")]
print("tiny Llama, 2 CP ranks, 32 tokens (5 padded targets), float64:")
for cfg, errors in zip(configs, spawn(model_check, 2, configs)[0]):
    print(f"  {cfg['variant']:9s}: loss equal to one process (|difference| < 1e-12): {errors['loss'] < 1e-12}; "
          f"every gradient equal (|difference| < 1e-12): {errors['grad'] < 1e-12}")

# %% [markdown]
# Both variants compute the same model as one process, and they differ only in how K and V
# reach the queries: the ring keeps two K/V blocks per rank and hides the transfers behind
# the block computations, while the all-gather keeps all of K/V and exposes one collective
# per layer that GQA makes small. Llama 3 trained its 128K-token stage of the 405B model
# with CP = 16 inside the 4D mesh (Table 4 of the paper); Section 6.9 composes this section's
# `cp_attend` and `context_parallel_loss` with the other three dimensions.

# %% [markdown]
# ## 6.7 Pipeline parallelism
#
# Tensor and context parallelism split every layer; **pipeline parallelism** (PP) splits the
# model between layers. With $p$ stages, stage $s$ holds a contiguous slice of the decoder
# blocks: stage 0 also holds the token embedding, the last stage also the final RMSNorm, the
# output head and the loss. Each stage keeps only its own weights, gradients and optimizer
# state, so PP divides the model's memory by $p$ while sending only one activation tensor
# $(b, T, d)$ per micro-batch across each stage boundary, forward and backward. That small
# volume is why Llama 3 lets PP span servers (its Figure 5 orders the dimensions
# [TP, CP, PP, DP], PP outside TP and CP); the 405B model runs in 16 stages.
#
# The price is idleness. A stage cannot start the forward pass of a batch before the previous
# stage has finished it, nor the backward pass before the next stage has sent the gradient
# back. GPipe (Huang et al. 2019, arXiv:1811.06965) reduces the idle time, the **bubble**, by
# splitting the batch into $m$ **micro-batches** that flow through the stages one behind the
# other; the gradients of all micro-batches are summed and the optimizer steps once, so the
# result is the same step as without the pipeline. This section builds
#
# 1. the split of Llama into stages,
# 2. the two classic schedules, GPipe and 1F1B, as pure functions that list each stage's
#    actions; from those lists alone we compute the bubble exactly and the activation memory,
# 3. an executor that runs a schedule with `torch.distributed` point-to-point messages, checked
#    equal to the single-process step and to PyTorch's own `torch.distributed.pipelining`,
# 4. a measured timeline of both schedules.
#
# ### Stages over layers
#
# The decoder blocks are equal in cost, so the natural split gives every stage the same number
# of blocks. The ends are heavier, though. The last stage also runs the output head, a
# $d \times V$ matrix with $V = 128{,}256$: in the 405B model it has two thirds of a block's
# parameters and FLOPs, and its logits and the loss add memory. The first stage stores the
# embedding table, as large as the head, and (we will see) the most activations. Llama 3
# therefore takes one block away from the first and from the last stage (Section 3.3.2 of the
# paper): its 126 layers fill 16 stages as $7 + 14 \times 8 + 7$. `partition_layers` computes
# both splits; `LlamaStage` wraps one stage's modules, keyed by their index in the full model,
# so that a stage's parameter names are the full model's names.

# %%
#| export lrn_lib.pipeline_parallel
import copy
import itertools
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, check_config, lm_loss, rope_cos_sin, tiny_config
from lrn_lib.mesh import Mesh, MeshShape, check_group, check_rank


def partition_layers(n_layers: int, num_stages: int, lighter_ends: bool = False) -> list[range]:
    """Contiguous ranges of layer indices, one per stage, covering range(n_layers) in order.

    The sizes differ by at most one, earlier stages taking the extra layers. With lighter_ends
    the first and the last stage get one layer fewer than a balanced split of n_layers + 2
    layers would give them, leaving room for the embedding and the output head (Llama 3:
    126 layers over 16 stages -> 7, 8, ..., 8, 7).
    """
    validate.integer(n_layers, "n_layers", low=1)
    validate.integer(num_stages, "num_stages", low=2 if lighter_ends else 1)
    base, extra = divmod(n_layers + (2 if lighter_ends else 0), num_stages)
    sizes = [base + (s < extra) for s in range(num_stages)]
    if lighter_ends:
        sizes[0] -= 1
        sizes[-1] -= 1
    if min(sizes) < 1:
        raise ValueError(f"n_layers={n_layers} leaves a stage of {num_stages} without a layer")
    bounds = [0, *itertools.accumulate(sizes)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class LlamaStage(nn.Module):
    """One pipeline stage of a Llama: a contiguous slice of its blocks, plus the ends it owns.

    The first stage maps tokens (B, T) int64 -> hidden states (B, T, dim), a middle stage
    hidden states -> hidden states, the last stage hidden states -> logits (B, T, vocab_size);
    a stage that is both first and last is the whole model. The blocks live in a ModuleDict
    keyed by their index in the full model, so a stage's parameter names (for example
    "layers.5.attention.wq.weight") are the full model's. The modules are taken from `model`,
    not copied: build the stage from a model that nothing else trains.
    """

    def __init__(self, model: Llama, layers: range, first: bool, last: bool):
        super().__init__()
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a Llama, got {type(model).__name__}")
        if not isinstance(layers, range):
            raise TypeError(f"layers must be a range of layer indices, got {type(layers).__name__}")
        if not isinstance(first, bool) or not isinstance(last, bool):
            raise TypeError(f"first and last must be bools, got {first!r}, {last!r}")
        if len(layers) == 0 or layers.start < 0 or layers.stop > len(model.layers) or layers.step != 1:
            raise ValueError(f"layers={layers} is not a non-empty contiguous slice of {len(model.layers)} layers")
        self.first, self.last, self.vocab_size = first, last, model.cfg.vocab_size
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("omega", model.omega.clone(), persistent=False)
        self.positions: torch.Tensor | None = None    # the tokens' RoPE positions, None: 0..T-1 (CP sets a shard's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) on the first stage, else hidden (B, T, dim) -> hidden (B, T, dim), or logits on the last stage."""
        if self.first:
            if validate.tensor(x, "tokens").dim() != 2 or x.dtype != torch.int64:
                raise ValueError(f"the first stage takes (batch, time) int64 tokens, got {tuple(x.shape)} {x.dtype}")
            validate.ids(x, "tokens", self.vocab_size)
            x = self.tok_embeddings(x)
        else:
            validate.tensor(x, "x", dims=3, kind="float")
        positions = self.positions if self.positions is not None else torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.omega, x.dtype)
        for block in self.layers.values():
            x = block(x, cos, sin)
        if self.last:
            x = self.output(self.norm(x))
        return x


def build_stage(model: Llama, stage: int, num_stages: int, lighter_ends: bool = False) -> LlamaStage:
    """Stage `stage` of `num_stages` of model, with the layers partition_layers gives it."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a Llama, got {type(model).__name__}")
    validate.integer(num_stages, "num_stages", low=1)
    validate.integer(stage, "stage", low=0, high=num_stages - 1)
    layers = partition_layers(len(model.layers), num_stages, lighter_ends)[stage]
    return LlamaStage(model, layers, first=stage == 0, last=stage == num_stages - 1)


# %% [markdown]
# Chaining the stages by hand, in one process, must give the full model's logits exactly: the
# split only moves the boundaries between function calls.

# %%
import matplotlib.pyplot as plt
import torch

from lrn_lib.llama import LLAMA3_405B, Llama, lm_loss, tiny_config
from lrn_lib.mesh import spawn
from lrn_lib.pipeline_parallel import build_stage, partition_layers

torch.set_num_threads(1)
sizes = [len(r) for r in partition_layers(LLAMA3_405B.n_layers, 16, lighter_ends=True)]
print("Llama 3 405B, 16 stages, layers per stage:", sizes, "sum", sum(sizes))
print("balanced split of 10 layers over 4 stages:", partition_layers(10, 4))

torch.manual_seed(0)
model = Llama(tiny_config(n_layers=4)).double()
tokens = torch.randint(0, 256, (3, 12))
x = tokens
for s in range(3):
    x = build_stage(model, s, 3)(x)
print("3 chained stages equal the full model:", torch.equal(x, model(tokens)))

# %% [markdown]
# ### Schedules as lists of actions
#
# A schedule says, for every stage, in which order it runs the forward pass F$i$ and the
# backward pass B$i$ of each micro-batch $i = 0, \dots, m-1$. We write it as data: a list
# per stage of actions `("F", i)` and `("B", i)`. The dependencies are not part of the list;
# they are the model's: F$i$ on stage $s$ needs F$i$ of stage $s-1$ (its input), B$i$ on stage
# $s$ needs B$i$ of stage $s+1$ (the gradient of its output) and its own F$i$ (the saved
# activations).
#
# * **GPipe** runs all $m$ forwards, then all $m$ backwards.
# * **1F1B** (PipeDream-Flush, from Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel
#   DNN Training", arXiv:2006.09503; the default of Megatron-LM, arXiv:2104.04473) starts the backward of a
#   micro-batch as soon as possible. Stage $s$ runs $p-1-s$ **warm-up** forwards, then
#   alternates one forward and one backward in the **steady** state, and ends with the
#   $p-1-s$ **cool-down** backwards. The last stage has no warm-up: it runs F0 B0 F1 B1 ...
#
# Both compute the same gradients; they differ in idle time and memory. Both need $m \ge p$ here:
# with fewer micro-batches than stages the pipeline never fills (1F1B's warm-up would be longer
# than the batch), and the bubble (6.24) below is at least half the step. (PyTorch's
# `Schedule1F1B` enforces the same; its `ScheduleGPipe` does not.)

# %%
#| export lrn_lib.pipeline_parallel
Action = tuple[str, int]           # ("F", i): forward of micro-batch i; ("B", i): its backward


def _check_pipeline(num_stages: int, num_microbatches: int) -> None:
    """The size checks every schedule shares: ints >= 1 and num_microbatches >= num_stages."""
    validate.integer(num_stages, "num_stages", low=1)
    validate.integer(num_microbatches, "num_microbatches", low=1)
    if num_microbatches < num_stages:
        raise ValueError(f"num_microbatches={num_microbatches} is less than num_stages={num_stages}: "
                         "a pipeline needs at least one micro-batch per stage")


def gpipe_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """GPipe's actions for each of num_stages stages: F0 ... F(m-1), then B0 ... B(m-1)."""
    _check_pipeline(num_stages, num_microbatches)
    forwards = [("F", i) for i in range(num_microbatches)]
    backwards = [("B", i) for i in range(num_microbatches)]
    return [forwards + backwards for _ in range(num_stages)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B's actions for each stage s: p-1-s warm-up forwards, then F(w+i) B(i) pairs, then the remaining backwards."""
    _check_pipeline(num_stages, num_microbatches)
    schedule = []
    for s in range(num_stages):
        warmup = num_stages - 1 - s
        actions = [("F", i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [("F", warmup + i), ("B", i)]
        actions += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[[int, int], list[list[Action]]]] = {"gpipe": gpipe_schedule,
                                                                   "1f1b": one_f_one_b_schedule}

# %%
from lrn_lib.pipeline_parallel import SCHEDULES


def show(schedule):
    for s, actions in enumerate(schedule):
        print(f"  stage {s}: " + " ".join(f"{kind}{i}" for kind, i in actions))


for name in ("gpipe", "1f1b"):
    print(f"{name}, p=4 stages, m=6 micro-batches:")
    show(SCHEDULES[name](4, 6))
try:
    SCHEDULES["1f1b"](4, 3)
except ValueError as err:
    print("m < p:", err)

# %% [markdown]
# ### The bubble, exactly
#
# Give every forward one time unit and every backward two (a backward computes the gradients
# of both the inputs and the weights, about twice the forward's FLOPs), and let messages take
# no time. Every action then starts as soon as the previous action of its stage and its
# dependencies have finished. `simulate_schedule` computes these start times exactly (with
# Python `Fraction`s); a schedule whose dependencies can never be met is reported as a deadlock.
#
# The **bubble fraction** is the share of the $p$ stages' time that they sit idle:
#
# $$\text{bubble} = 1 - \frac{\sum_{s}\text{busy}_s}{p \cdot \text{makespan}} \qquad (6.23)$$
#
# For GPipe the count is direct: the last micro-batch's forward leaves stage 0 after $m$ units
# and needs $p-1$ more to reach the end, so the forwards take $m + p - 1$ units and the
# backwards $2(m + p - 1)$; each stage is busy $3m$ of the $3(m+p-1)$, so
#
# $$\text{bubble} = \frac{p-1}{m+p-1} \qquad (6.24)$$
#
# (Megatron-LM's paper quotes $(p-1)/m$: the idle time divided by the *busy* time instead of the
# whole step; the two agree for $m \gg p$.) 1F1B does not shorten the step: its bubble is the
# same, as the simulation shows. What 1F1B changes is memory.

# %%
#| export lrn_lib.pipeline_parallel
class Event(NamedTuple):
    """One action run on one stage: kind "F" or "B", its micro-batch, and its start and end times."""

    kind: str
    microbatch: int
    start: float | Fraction
    end: float | Fraction


def _check_schedule(schedule: list[list[Action]]) -> None:
    """Raise unless schedule is a non-empty list of per-stage lists of actions ("F" or "B", micro-batch >= 0)."""
    for actions in validate.nonempty(schedule, "schedule"):
        if not isinstance(actions, (list, tuple)):
            raise TypeError(f"schedule must hold one list of actions per stage, got {type(actions).__name__}")
        for action in actions:
            if not (isinstance(action, tuple) and len(action) == 2 and action[0] in ("F", "B")
                    and isinstance(action[1], int) and action[1] >= 0):
                raise ValueError(f"schedule holds an unknown action {action!r}; expected ('F' or 'B', micro-batch)")


def simulate_schedule(schedule: list[list[Action]], forward_time: float | Fraction = 1,
                      backward_time: float | Fraction = 2) -> list[list[Event]]:
    """Earliest start and end of every action when messages are instant; one list of Events per stage.

    F(s, i) waits for F(s-1, i); B(s, i) waits for F(s, i) and B(s+1, i); each stage runs its
    actions in the listed order, one at a time. Times are exact Fractions. ValueError if an
    action is unknown or repeated, or if the schedule deadlocks.
    """
    _check_schedule(schedule)
    validate.number(forward_time, "forward_time", low=0, low_open=True)
    validate.number(backward_time, "backward_time", low=0)
    durations = {"F": Fraction(forward_time), "B": Fraction(backward_time)}
    num_stages = len(schedule)
    finished: dict[tuple[str, int, int], Fraction] = {}
    timeline: list[list[Event]] = [[] for _ in range(num_stages)]
    position, clock = [0] * num_stages, [Fraction(0)] * num_stages
    progress = True
    while progress:
        progress = False
        for s in range(num_stages):
            while position[s] < len(schedule[s]):
                kind, i = schedule[s][position[s]]
                if kind not in durations or (kind, s, i) in finished:
                    raise ValueError(f"stage {s}: action {(kind, i)!r} is unknown or repeated")
                needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
                if kind == "B":
                    needs = [("F", s, i)] + ([("B", s + 1, i)] if s < num_stages - 1 else [])
                if any(n not in finished for n in needs):
                    break
                start = max([clock[s]] + [finished[n] for n in needs])
                clock[s] = finished[(kind, s, i)] = start + durations[kind]
                timeline[s].append(Event(kind, i, start, clock[s]))
                position[s] += 1
                progress = True
    stuck = [s for s in range(num_stages) if position[s] < len(schedule[s])]
    if stuck:
        s = stuck[0]
        raise ValueError(f"the schedule deadlocks: stage {s} waits forever at {schedule[s][position[s]]}")
    return timeline


def bubble_fraction(timeline: list[list[Event]]) -> float | Fraction:
    """Idle share of the stages' time (6.23): 1 - total busy time / (stages * (last end - first start))."""
    events = [e for stage in validate.nonempty(timeline, "timeline") for e in stage]
    if not events:
        raise ValueError("timeline has no events")
    if not all(isinstance(e, Event) for e in events):
        raise TypeError("timeline must hold lists of Events (simulate_schedule's or run_pipeline's)")
    span = max(e.end for e in events) - min(e.start for e in events)
    if span <= 0:
        raise ValueError("timeline spans no time: its events all start and end at one instant")
    busy = sum(e.end - e.start for e in events)
    total = len(timeline) * span
    return (total - busy) / total


def bubble_formula(num_stages: int, num_microbatches: int) -> Fraction:
    """GPipe's bubble fraction (6.24): (p - 1) / (m + p - 1)."""
    _check_pipeline(num_stages, num_microbatches)
    return Fraction(num_stages - 1, num_microbatches + num_stages - 1)


def peak_in_flight(schedule: list[list[Action]]) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and whose backward has not yet.

    Each of them keeps its activations alive until its backward, so this counts the
    activation sets a stage stores at its peak.
    """
    _check_schedule(schedule)
    peaks = []
    for actions in schedule:
        held = peak = 0
        for kind, _ in actions:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


# %%
from lrn_lib.pipeline_parallel import bubble_formula, bubble_fraction, peak_in_flight, simulate_schedule

all_equal = True
for p, m in ((2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)):
    gpipe = bubble_fraction(simulate_schedule(SCHEDULES["gpipe"](p, m)))
    ofob = bubble_fraction(simulate_schedule(SCHEDULES["1f1b"](p, m)))
    all_equal &= gpipe == ofob == bubble_formula(p, m)
    print(f"p={p} m={m:2d}: GPipe {str(gpipe):>5}  1F1B {str(ofob):>5}  (p-1)/(m+p-1) = {bubble_formula(p, m)}")
print("both schedules' bubble equals (6.24) exactly:", all_equal)

# %% [markdown]
# The timelines show where the idle time sits. In GPipe, stage $s$ waits $s$ units for its first
# input, then one long gap between its last forward and its first backward (micro-batch 0's
# gradient has to come back from the last stage), and $2s$ units at the end while the gradients
# travel down to it: $3(p-1)$ units on every stage. 1F1B has the same total, spread over the
# warm-up and the cool-down, and interleaves forwards and backwards in its steady state.

# %%
def draw_timelines(timelines, unit):
    """Stages as rows, one box per action, coloured by micro-batch; backward boxes hatched."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 1.2 + 0.55 * sum(len(t) for t in timelines.values())))
    colors = plt.get_cmap("tab10")
    for ax, (title, timeline) in zip(axes, timelines.items()):
        for s, events in enumerate(timeline):
            for e in events:
                ax.barh(s, float(e.end - e.start), left=float(e.start), height=0.8, color=colors(e.microbatch % 10),
                        edgecolor="black", hatch="//" if e.kind == "B" else None)
                ax.text(float(e.start + e.end) / 2, s, f"{e.kind}{e.microbatch}", ha="center", va="center", fontsize=7,
                        bbox=dict(facecolor="white", alpha=0.7, pad=0.5, linewidth=0))
        ax.set_yticks(range(len(timeline)), [f"stage {s}" for s in range(len(timeline))])
        ax.invert_yaxis()
        ax.set_title(f"{title}: bubble {float(bubble_fraction(timeline)):.3f}", fontsize=10)
    axes[-1].set_xlabel(unit)
    fig.tight_layout()
    plt.show()


draw_timelines({name: simulate_schedule(SCHEDULES[name](4, 8)) for name in ("gpipe", "1f1b")},
               "time (forward = 1 unit, backward = 2 units)")

# %% [markdown]
# ### Activation memory: $m$ against $p$
#
# A micro-batch's activations stay in memory from its forward until its backward on that
# stage. GPipe runs all $m$ forwards first, so every stage holds $m$ sets of activations at its
# peak; more micro-batches shrink the bubble but grow the memory. In 1F1B stage $s$ holds at
# most $p - s$: its warm-up forwards plus the one of the steady state, after which every new
# forward is matched by a backward that frees a set. The memory no longer grows with $m$, so
# $m$ can be raised to shrink the bubble, which is why Megatron-LM and Llama 3 use 1F1B-style
# schedules. (Interleaved 1F1B, which Llama 3 uses, gives each GPU several non-adjacent chunks of
# layers to cut the bubble further; it is beyond this section.)

# %%
for m in (4, 8, 16):
    print(f"p=4 m={m:2d}: activation sets held per stage, GPipe {peak_in_flight(SCHEDULES['gpipe'](4, m))}, "
          f"1F1B {peak_in_flight(SCHEDULES['1f1b'](4, m))}")

# %% [markdown]
# ### Loss scaling
#
# The step's loss is the mean of the cross-entropy over all $N$ tokens of the batch. With $m$
# micro-batches of $N/m$ tokens each and $\ell_i$ the mean loss of micro-batch $i$,
#
# $$L = \frac{1}{N}\sum_{t=1}^{N} \ell(t) = \frac{1}{m}\sum_{i=0}^{m-1} \ell_i, \qquad
# \nabla L = \sum_{i=0}^{m-1} \nabla\Big(\frac{\ell_i}{m}\Big) \qquad (6.25)$$
#
# so each micro-batch's backward must start from $\ell_i / m$, and the gradients that accumulate
# in `.grad` over the $m$ backwards are then exactly those of the full batch. The pitfall is to
# call `backward()` on each $\ell_i$ as it comes: the loss function already averages, it looks
# right, and the gradient comes out $m$ times too large. Adam hides the bug, since its update
# barely changes when every gradient is scaled by the same factor; gradient clipping, whose
# threshold is absolute, SGD, and any comparison with a data-parallel run do not. Note also
# that (6.25) needs micro-batches with the same number of counted tokens: with padding or
# ignored positions, the mean of micro-batch means is not the token mean, and each micro-batch
# must be weighted by its share of the tokens instead of $1/m$.

# %%
torch.manual_seed(0)
tokens, targets = torch.randint(0, 256, (8, 12)), torch.randint(0, 256, (8, 12))
m = 4
grads = {}
for name, scale in (("full batch", None), ("scaled by 1/m", 1 / m), ("unscaled", 1.0)):
    model.zero_grad()
    if scale is None:
        lm_loss(model(tokens), targets).backward()
    else:
        for x_i, y_i in zip(tokens.chunk(m), targets.chunk(m)):
            (lm_loss(model(x_i), y_i) * scale).backward()                            # (6.25)
    grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
print("scaled by 1/m equals the full batch (max |difference| < 1e-12):",
      (grads["scaled by 1/m"] - grads["full batch"]).abs().max().item() < 1e-12)
print("unscaled gradient / full-batch gradient:", round((grads["unscaled"] / grads["full batch"]).nanmedian().item(), 6))

# %% [markdown]
# ### The executor
#
# `run_pipeline` runs one stage's action list in its process. A forward receives the
# micro-batch's activation from the previous stage (stage 0 takes its slice of the batch),
# runs the stage module, and sends the output to the next stage; the last stage computes the
# scaled loss (6.25) instead. It keeps the input and output of every micro-batch in flight: a
# backward receives the gradient of the output from the next stage, runs autograd through the
# stage from the saved output, and sends the gradient of the input back.
#
# The messages are `torch.distributed` point-to-point calls over a process group (`group`,
# `None` for the whole world), so the 4D composition of section 6.9 can run one pipeline per
# TP x CP x DP coordinate. Receives block: a stage waits only for the data it needs now. Sends do not
# (`isend`): two neighbours may send to each other at the same moment in the steady state of
# 1F1B (stage $s$ an activation, stage $s+1$ a gradient), and two blocking sends would wait for
# each other's receive forever. Point-to-point messages between two ranks arrive in the order
# they were sent, and in both schedules every stage runs the forwards, and the backwards, in
# micro-batch order, so each receive gets the micro-batch it expects. The receiving stage must
# know the shape of what arrives; for a transformer it is always $(b, T, d)$.

# %%
#| export lrn_lib.pipeline_parallel
@dataclass
class PipelineRun:
    """One stage's record of run_pipeline.

    loss: the step's loss, the sum over micro-batches of loss_i / m (6.25), on the last stage
    (None elsewhere); events: this stage's actions with their start and end in seconds after
    a common barrier (waiting for a message is idle time, not part of an event); peak_stored:
    the most micro-batches whose activations the stage held at once.
    """

    loss: float | None
    events: list[Event]
    peak_stored: int


def _split(batch: torch.Tensor, num_microbatches: int, name: str) -> tuple[torch.Tensor, ...]:
    """batch (B, ...) -> m micro-batches (B/m, ...) along dim 0; ValueError unless m divides B."""
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(batch).__name__}")
    if batch.dim() == 0 or batch.shape[0] % num_microbatches:
        raise ValueError(f"{name} has batch size {tuple(batch.shape)[:1]}, "
                         f"not divisible by num_microbatches={num_microbatches}")
    return batch.chunk(num_microbatches)


def run_pipeline(module: nn.Module, schedule: str, num_microbatches: int, activation_shape: tuple[int, ...],
                 inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, group: dist.ProcessGroup | None = None) -> PipelineRun:
    """Run one training step's forwards and backwards of this rank's stage; gradients accumulate in .grad.

    The stage index is this rank's rank in `group` (None: the whole world), the number of
    stages the group's size. schedule: "gpipe" or "1f1b". activation_shape: the shape of one
    micro-batch's tensor between stages, e.g. (B/m, T, dim), received in `dtype`.
    The first stage needs inputs (B, ...), split into num_microbatches micro-batches along
    dim 0; the last stage needs targets (B, ...) and loss_fn(output_i, targets_i) -> scalar
    mean loss of micro-batch i, which is scaled by 1/num_microbatches (6.25) before its backward.
    Zero the gradients before the call.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    validate.integer(num_microbatches, "num_microbatches", low=1)
    if not (isinstance(activation_shape, tuple) and activation_shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in activation_shape)):
        raise ValueError(f"activation_shape must be a tuple of positive ints, got {activation_shape!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function or None, got {type(loss_fn).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    actions = SCHEDULES[schedule](num_stages, num_microbatches)[stage]
    first, last = stage == 0, stage == num_stages - 1
    if first:
        micro_inputs = _split(inputs, num_microbatches, "inputs")
    if last:
        if loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")
        micro_targets = _split(targets, num_microbatches, "targets")
    previous = None if first else dist.get_global_rank(group, stage - 1)
    following = None if last else dist.get_global_rank(group, stage + 1)

    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}    # micro-batch -> (stage input, output or scaled loss)
    sends: list[tuple[dist.Work, torch.Tensor]] = []
    events, peak, loss = [], 0, None
    dist.barrier(group=group)
    origin = time.perf_counter()
    for kind, i in actions:
        if kind == "F":
            if first:
                x = micro_inputs[i]
            else:
                x = torch.empty(activation_shape, dtype=dtype)
                dist.recv(x, src=previous, group=group)
                x.requires_grad_(True)
            start = time.perf_counter()
            y = module(x)
            if last:
                y = loss_fn(y, micro_targets[i]) / num_microbatches                  # (6.25)
                loss = (loss or 0.0) + y.item()
            else:
                out = y.detach()
                sends.append((dist.isend(out, dst=following, group=group), out))
            stored[i] = (x, y)
            peak = max(peak, len(stored))
        else:
            x, y = stored.pop(i)
            grad_y = None
            if not last:
                grad_y = torch.empty_like(y)
                dist.recv(grad_y, src=following, group=group)
            start = time.perf_counter()
            torch.autograd.backward(y, grad_y)
            if not first:
                sends.append((dist.isend(x.grad, dst=previous, group=group), x.grad))
        events.append(Event(kind, i, start - origin, time.perf_counter() - origin))
    for work, _ in sends:
        work.wait()
    return PipelineRun(loss, events, peak)


# %% [markdown]
# ### Checked against one process and against `torch.distributed.pipelining`
#
# PyTorch ships its own pipeline engine, `torch.distributed.pipelining`: a `PipelineStage` wraps
# a stage module, and `ScheduleGPipe` or `Schedule1F1B` run it. The worker below builds the same
# float64 model on every rank from one seed, computes the single-process step, and then runs
# the pipelined step with both schedules, once with `run_pipeline` and once with PyTorch's
# engine on the same split. It returns the largest difference from the single-process step over
# the loss (on the last stage) and every gradient the stage holds.
#
# We checked PyTorch's loss scaling by experiment, with `loss_fn = lm_loss` (a mean over the
# micro-batch). Its schedules call `backward` on each micro-batch's unscaled loss and, after the
# last backward, divide every parameter's `.grad` by $m$ (the `scale_grads=True` default of
# the schedule classes, present in the torch 2.11 of the GPU machine as in 2.13). The
# gradients are then those of (6.25), and the losses it returns through `step(...,
# losses=...)` are the unscaled $\ell_i$, so the step's loss is their mean. Because the division
# applies to the whole `.grad`, a gradient already accumulated before `step` (gradient
# accumulation over several steps) is divided by $m$ as well; with a loss function that sums
# instead of averaging, pass `scale_grads=False`.

# %%
#| export lrn_lib.pipeline_parallel
def _torch_pipeline_step(module: nn.Module, schedule: str, num_microbatches: int, inputs: torch.Tensor | None,
                         targets: torch.Tensor | None, group: dist.ProcessGroup) -> float | None:
    """One step of module through torch.distributed.pipelining; returns the mean micro-batch loss on the last stage."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    runner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    engine = runner(PipelineStage(module, stage, num_stages, torch.device("cpu"), group=group),
                    n_microbatches=num_microbatches, loss_fn=lm_loss)
    if stage == num_stages - 1:
        losses: list[torch.Tensor] = []
        engine.step(*([inputs] if stage == 0 else []), target=targets, losses=losses)
        return torch.stack(losses).mean().item()
    engine.step(*([inputs] if stage == 0 else []))
    return None


def pipeline_check(rank: int, world: int, microbatch_counts: tuple[int, ...] = (4,), dp: int = 1,
                   cfg: LlamaConfig | None = None, batch: int = 20, seq: int = 8, seed: int = 0) -> dict[str, float]:
    """Spawn worker: pipelined steps against the single-process step of a float64 Llama.

    The world is a MeshShape(pp=world // dp, dp=dp): each data-parallel replica runs its own
    pipeline over its "pp" group, on its own batch (B=batch, T=seq) drawn from seed + its dp
    coordinate. For each schedule and each m in microbatch_counts it runs run_pipeline and
    torch.distributed.pipelining on the same stage split and returns
    {"ours gpipe m=4": err, "torch gpipe m=4": err, ...}, err being the largest |difference|
    from the single-process step over the loss (last stage only) and every gradient of this
    rank's stage.
    """
    check_rank(rank, world)
    validate.integer(dp, "dp", low=1, high=world)
    if world % dp:
        raise ValueError(f"dp={dp} does not divide world={world}")
    if cfg is not None:
        check_config(cfg)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    for m in validate.nonempty(microbatch_counts, "microbatch_counts"):
        validate.integer(m, "microbatch_counts", low=world // dp)
        if batch % m:
            raise ValueError(f"microbatch_counts holds {m}, which does not divide batch={batch}")
    mesh = Mesh(MeshShape(pp=world // dp, dp=dp))
    group = mesh.group["pp"]
    stage, num_stages = dist.get_rank(group), dist.get_world_size(group)
    cfg = cfg if cfg is not None else tiny_config(n_layers=4)
    torch.manual_seed(seed)
    reference = Llama(cfg).double()
    data = torch.Generator().manual_seed(seed + 1 + mesh.coords["dp"])
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=data)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq), generator=data)
    expected_loss = lm_loss(reference(tokens), targets)
    expected_loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}

    errors = {}
    for m in microbatch_counts:
        for schedule in SCHEDULES:
            for engine in ("ours", "torch"):
                module = build_stage(copy.deepcopy(reference), stage, num_stages)
                module.zero_grad(set_to_none=True)
                first_inputs = tokens if stage == 0 else None
                last_targets = targets if stage == num_stages - 1 else None
                if engine == "ours":
                    loss = run_pipeline(module, schedule, m, (batch // m, seq, cfg.dim), first_inputs, last_targets,
                                        lm_loss, torch.float64, group).loss
                else:
                    loss = _torch_pipeline_step(module, schedule, m, first_inputs, last_targets, group)
                err = max((p.grad - expected[name]).abs().max().item() for name, p in module.named_parameters())
                if loss is not None:
                    err = max(err, abs(loss - expected_loss.item()))
                errors[f"{engine} {schedule} m={m}"] = err
    return errors


# %%
from lrn_lib.pipeline_parallel import pipeline_check

results = spawn(pipeline_check, 4, (4,), 1, tiny_config(n_layers=4), 8)
worst = {key: max(r[key] for r in results) for key in results[0]}
for key, err in worst.items():
    print(f"4 stages, {key}: loss and all gradients equal the single-process step (max |difference| < 1e-10):",
          err < 1e-10)

# %% [markdown]
# ### The bubble, measured
#
# Finally we run both schedules for real and time every action. To see the schedule rather than
# the noise of four processes sharing a laptop's cores, each stage's compute is a
# `SimulatedCompute` module that sleeps a fixed time in its forward (and twice that in its
# backward), so every micro-batch costs the same on every stage and the CPU stays free for the
# messages. The idle fraction of the measured timeline is compared with (6.24).

# %%
#| export lrn_lib.pipeline_parallel
class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward each sleep a given time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_seconds: float, backward_seconds: float) -> torch.Tensor:
        time.sleep(forward_seconds)
        ctx.backward_seconds = backward_seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_seconds)
        return grad, None, None


class SimulatedCompute(nn.Module):
    """The identity x (...) -> x (...) that takes forward_seconds forward and backward_seconds backward.

    It sleeps instead of computing, so stages of equal cost can be timed on a shared CPU.
    """

    def __init__(self, forward_seconds: float, backward_seconds: float):
        super().__init__()
        validate.number(forward_seconds, "forward_seconds", low=0)
        validate.number(backward_seconds, "backward_seconds", low=0)
        self.forward_seconds, self.backward_seconds = forward_seconds, backward_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> the same values (...), after sleeping forward_seconds."""
        validate.tensor(x, "x", nonempty=False)
        return _Sleep.apply(x, self.forward_seconds, self.backward_seconds)


def timeline_worker(rank: int, world: int, num_microbatches: int, forward_seconds: float) -> dict[str, PipelineRun]:
    """Spawn worker: one step of each schedule over `world` equal simulated stages; {schedule: PipelineRun}.

    Each stage is a Linear(4, 4) followed by SimulatedCompute(forward_seconds, 2 * forward_seconds).
    An untimed step with zero compute comes first: a process's first backward pays one-time setup costs.
    """
    check_rank(rank, world)
    validate.integer(num_microbatches, "num_microbatches", low=world)
    validate.number(forward_seconds, "forward_seconds", low=0)
    torch.manual_seed(0)
    inputs = torch.randn(num_microbatches, 4) if rank == 0 else None
    targets = torch.zeros(num_microbatches, 4) if rank == world - 1 else None

    def step(schedule: str, seconds: float) -> PipelineRun:
        module = nn.Sequential(nn.Linear(4, 4), SimulatedCompute(seconds, 2 * seconds))
        return run_pipeline(module, schedule, num_microbatches, (1, 4), inputs, targets, F.mse_loss)

    step("gpipe", 0.0)
    return {schedule: step(schedule, forward_seconds) for schedule in SCHEDULES}


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.pipeline_parallel import timeline_worker

p, m = 4, 8
runs = spawn(timeline_worker, p, m, 0.05)
measured = {name: [runs[s][name].events for s in range(p)] for name in SCHEDULES}
for name, timeline in measured.items():
    print(f"{name}: measured bubble {bubble_fraction(timeline):.3f}, (p-1)/(m+p-1) = {float(bubble_formula(p, m)):.3f}")
draw_timelines(measured, "seconds")

# %%
for name, timeline in measured.items():
    print(f"{name}: measured bubble within 0.05 of (6.24):", abs(bubble_fraction(timeline) - bubble_formula(p, m)) < 0.05)
    print(f"{name}: activation sets held per stage match the schedule's count:",
          [runs[s][name].peak_stored for s in range(p)] == peak_in_flight(SCHEDULES[name](p, m)))

# %% [markdown]
# Both schedules idle the same share of the step, about $(p-1)/(m+p-1) = 3/11$ here, but GPipe
# held all 8 micro-batches' activations on every stage, 1F1B at most $4, 3, 2, 1$. With real
# compute the measured bubble is larger than (6.24): the messages take time, and the last stage,
# which also runs the output head and the loss, is slower than the others unless the partition
# accounts for it, as Llama 3's lighter end stages do.

# %% [markdown]
# ## 6.8 Data parallelism and FSDP
#
# Data parallelism (DP) is the oldest and simplest way to use many GPUs: every rank holds the
# whole model, takes its own slice of the global batch, runs forward and backward on it,
# and the ranks then average their gradients so that every rank applies the same optimizer
# step. It needs one all-reduce of the gradients per step and no change to the model, which is why it is the
# outermost dimension of Llama 3's mesh (section 6.4): it spans the slow links between
# servers. Its weakness is memory: every rank stores the parameters, the gradients and the
# optimizer state of the full model. ZeRO (Rajbhandari et al. 2019, "ZeRO: Memory
# Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054) removes that
# redundancy by sharding those three across the data-parallel ranks; PyTorch calls the full
# version Fully Sharded Data Parallel (Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277),
# and Llama 3 trains with it.
#
# This section builds plain DP with the correct loss scaling, then ZeRO-3 / FSDP from
# scratch, checks both against the single-process step in float64, measures what each rank
# stores, and cross-checks our FSDP against PyTorch's own `fully_shard`.

# %%
import torch

from lrn_lib.llama import Llama, LLAMA3_8B, parameter_count, tiny_config
from lrn_lib.mesh import spawn

torch.set_num_threads(1)

# %% [markdown]
# ### 6.8.1 Which mean? The loss-scaling rule
#
# The training loss is the mean of the per-token losses $\ell_t$ over the **global** batch.
# Split the global batch over $W$ ranks, and each rank's share over $M$ micro-steps of
# gradient accumulation; micro-batch $(r, m)$ holds $n_{r,m}$ tokens and its mean loss is
# $L_{r,m}$. Then
#
# $$L = \frac{1}{N}\sum_{r,m}\sum_{t \in B_{r,m}} \ell_t = \sum_{r,m} \frac{n_{r,m}}{N} L_{r,m},
# \qquad N = \sum_{r,m} n_{r,m} \qquad (6.26)$$
#
# and since the gradient is linear,
#
# $$\nabla L = \sum_{r} \Big(\sum_m \frac{n_{r,m}}{N} \nabla L_{r,m}\Big). \qquad (6.27)$$
#
# The inner sum is what rank $r$ computes by calling `backward` on each micro-batch's mean
# loss multiplied by $n_{r,m}/N$ (autograd accumulates the micro-steps into `.grad`); the
# outer sum is one `all_reduce(SUM)` of the gradients. Only $N$, one integer, has to be
# agreed on first. When every micro-batch holds the same number of tokens,
# $n_{r,m}/N = 1/(WM)$:
#
# $$\nabla L = \frac{1}{W}\sum_r \frac{1}{M}\sum_m \nabla L_{r,m} \qquad (6.28)$$
#
# which is the familiar recipe: average the gradients over the ranks and divide the loss
# of each accumulation step by $M$. With unequal counts (a global batch of 10 sequences on
# 3 ranks, sequences of different lengths, or padding tokens left out of the loss), the
# recipe (6.28) over-weights the tokens of the smaller shares; (6.27) stays exact. Engines that divide the summed gradient by $W$
# themselves, as PyTorch's DDP and FSDP do, need the weight $W n_{r,m}/N$ instead: that is
# the `sync="mean"` option below. For the 4D composition of 6.9 the same function runs over
# the combined CP x DP group, because both dimensions split the tokens of one global batch.

# %%
#| export lrn_lib.data_parallel
import copy
import weakref
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, check_config, lm_loss, pydoc_bytes, random_windows
from lrn_lib.mesh import check_group, check_rank

SYNC_OPS = ("sum", "mean")


def split_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of the rows of x (N, ...) -> (N_r, ...), sizes differing by at most one."""
    check_rank(rank, world)
    if validate.tensor(x, "x", nonempty=False).dim() == 0:
        raise ValueError("x must have a dimension of rows, got a 0-dim tensor")
    if x.shape[0] < world:
        raise ValueError(f"x has {x.shape[0]} rows: fewer than world={world}, some rank would get none")
    return torch.tensor_split(x, world)[rank]


def backward_global_mean(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         group: dist.ProcessGroup | None = None, sync: str = "sum") -> torch.Tensor:
    """Backpropagate this rank's share of the global-batch mean loss (6.27), one micro-batch at a time.

    loss_fn(inputs, targets) returns the mean loss over the targets.numel() tokens of one
    micro-batch; micro_batches is this rank's list of (inputs (b_m, T_m), targets (b_m, T_m)).
    Each micro-batch's loss is weighted by n_m / N, N the token count over every micro-batch
    of every rank in `group`, so that summing the gradients over the group (sync="sum")
    yields the gradient of the global mean. sync="mean" weights by W n_m / N, for a gradient
    reduction that averages over the W ranks (DDP, FSDP2). Returns the global mean loss, a
    float64 scalar equal on every rank. Gradients are accumulated, not synchronized.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function, got {type(loss_fn).__name__}")
    validate.choice(sync, "sync", SYNC_OPS)
    for pair in validate.nonempty(micro_batches, "micro_batches"):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], torch.Tensor)):
            raise TypeError("micro_batches must hold (inputs, targets) pairs with a tensor of targets")
    check_group(group)
    counts = [targets.numel() for _, targets in micro_batches]
    if min(counts) == 0:
        raise ValueError(f"micro_batches holds a micro-batch without tokens (token counts {counts})")
    n_global = torch.tensor(sum(counts), dtype=torch.int64)
    dist.all_reduce(n_global, group=group)                       # N of (6.26): one integer
    scale = dist.get_world_size(group) if sync == "mean" else 1
    loss_sum = torch.zeros((), dtype=torch.float64)
    for (inputs, targets), n in zip(micro_batches, counts):
        loss = loss_fn(inputs, targets)
        (loss * (scale * n / n_global.item())).backward()        # (6.27): weight n_{r,m} / N
        loss_sum += loss.detach().double() * n
    dist.all_reduce(loss_sum, group=group)
    return loss_sum / n_global.item()


# %% [markdown]
# ### Gradient buckets and overlap
#
# The gradient synchronization is one `all_reduce` per parameter in the simplest version.
# PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704)
# packs gradients into **buckets** of about 25 MiB: few large messages use the links far
# better than many small ones. The buckets are filled in reverse order of the parameters,
# because backward produces the gradients of the last layers first, and DDP launches each
# bucket's all-reduce asynchronously as soon as its last gradient arrives, so communication
# overlaps the rest of the backward pass. Below we keep the buckets and leave out the
# overlap: `all_reduce_gradients` runs after backward, one collective per bucket.

# %%
#| export lrn_lib.data_parallel
def gradient_buckets(grads: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Group gradient indices into buckets of at most bucket_bytes (a larger single tensor gets its own).

    Walks the tensors from last to first (the order backward produces them) and starts a new
    bucket when the next tensor would overflow the current one or has another dtype.
    """
    if not isinstance(grads, (list, tuple)) or not all(isinstance(g, torch.Tensor) for g in grads):
        raise TypeError(f"grads must be a list of tensors, got {type(grads).__name__}")
    validate.integer(bucket_bytes, "bucket_bytes", low=1)
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(grads))):
        nbytes = grads[i].numel() * grads[i].element_size()
        if buckets and size + nbytes <= bucket_bytes and grads[buckets[-1][-1]].dtype == grads[i].dtype:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def all_reduce_gradients(module: nn.Module, group: dist.ProcessGroup | None = None,
                         bucket_bytes: int = 25 * 2**20) -> int:
    """Sum every parameter gradient of module over `group` in place, bucket by bucket (the outer sum of (6.27)).

    A parameter without a gradient takes part with zeros, so every rank issues the same
    collectives. Returns the number of all_reduce calls.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_group(group)
    validate.integer(bucket_bytes, "bucket_bytes", low=1)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    buckets = gradient_buckets(grads, bucket_bytes)
    for bucket in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, group=group)
        for i, piece in zip(bucket, flat.split([grads[i].numel() for i in bucket])):
            grads[i].copy_(piece.view_as(grads[i]))
    return len(buckets)


# %%
cfg = tiny_config()
model = Llama(cfg).double()
grads = [p.detach() for p in model.parameters()]
print("tiny Llama:", len(grads), "parameter tensors,", sum(g.numel() for g in grads), "parameters")
for bucket_bytes in (25 * 2**20, 2**18, 2**16):
    print(f"buckets of {bucket_bytes // 1024:6d} KiB -> {len(gradient_buckets(grads, bucket_bytes)):2d} all_reduce calls")

# %% [markdown]
# ### Checking DP against one process
#
# The check runs the same two AdamW steps three ways. The reference is one process on the
# whole global batch. The DP run splits each global batch of 10 sequences over 3 ranks
# (4, 3 and 3 sequences) and each rank's share over 2 micro-steps, weights the losses by
# (6.27), sums the gradients, and steps. Every rank builds the model from the same seed, so
# all start equal; their gradients after the all-reduce are equal, and so are their steps.
# The worker also applies the naive recipe (6.28) to the same unequal split, to show how
# far off it is.

# %%
#| export lrn_lib.data_parallel
def _adamw(params) -> torch.optim.AdamW:
    """The optimizer of every run in this section (large steps, so that errors would show)."""
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _check_run(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int, steps: int) -> None:
    """The argument checks of the DP and FSDP workers: every rank gets rows and micro_steps micro-batches."""
    check_rank(rank, world)
    check_config(cfg)
    validate.integer(batch, "batch", low=world)
    validate.integer(seq, "seq", low=1, high=cfg.max_seq_len)
    validate.integer(micro_steps, "micro_steps", low=1, high=batch // world)
    validate.integer(steps, "steps", low=1)


def _setup(cfg: LlamaConfig, batch: int, seq: int, steps: int, seed: int) -> tuple[Llama, list]:
    """A float64 Llama from `seed` and `steps` global batches of (tokens, targets), each (batch, seq)."""
    torch.manual_seed(seed)
    model = Llama(cfg).double()
    generator = torch.Generator().manual_seed(seed)
    data = pydoc_bytes() % cfg.vocab_size
    return model, [random_windows(data, batch, seq, generator) for _ in range(steps)]


def _micro_batches(tokens: torch.Tensor, targets: torch.Tensor, rank: int, world: int,
                   micro_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows of the global batch (B, T), split into micro_steps micro-batches."""
    x, y = split_rows(tokens, rank, world), split_rows(targets, rank, world)
    if x.shape[0] < micro_steps:
        raise ValueError(f"rank {rank} holds {x.shape[0]} sequences, fewer than micro_steps={micro_steps}")
    return list(zip(x.tensor_split(micro_steps), y.tensor_split(micro_steps)))


def _plain_state(model: nn.Module, grad: bool) -> dict[str, torch.Tensor]:
    """Parameters (or gradients) of an unsharded model by name."""
    return {n: (p.grad if grad else p).detach().clone() for n, p in model.named_parameters()}


def _reference_run(model: nn.Module, batches: list) -> dict:
    """One process, whole global batches: per-step losses and gradients, final parameters, bytes held."""
    opt = _adamw(model.parameters())
    losses, grads = [], []
    for tokens, targets in batches:
        loss = lm_loss(model(tokens), targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_plain_state(model, grad=True))
        opt.step()
        held = persistent_bytes(model, opt)
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "params": _plain_state(model, grad=False), "bytes": held}


def _parallel_run(model: nn.Module, batches: list, rank: int, world: int, micro_steps: int, sync: str,
                  reduce_gradients: Callable[[nn.Module], object] | None,
                  full_state: Callable[[nn.Module, bool], dict[str, torch.Tensor]]) -> dict:
    """The same steps on this rank's micro-batches; full_state reads back unsharded parameters/gradients."""
    opt = _adamw(model.parameters())
    losses, grads = [], []
    for tokens, targets in batches:
        micro = _micro_batches(tokens, targets, rank, world, micro_steps)
        losses.append(backward_global_mean(lambda x, y: lm_loss(model(x), y), micro, sync=sync))
        if reduce_gradients is not None:
            reduce_gradients(model)
        grads.append(full_state(model, True))
        opt.step()
        held = persistent_bytes(model, opt)
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "params": full_state(model, False), "bytes": held}


def _max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all tensors of two dicts with the same names."""
    if a.keys() != b.keys():
        raise ValueError(f"the runs name different tensors: {sorted(a.keys() ^ b.keys())}")
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _errors(run: dict, ref: dict) -> dict[str, float]:
    """Largest loss, gradient (any step) and final-parameter differences of a run from the reference."""
    return {"loss": max(abs(x.item() - y.item()) for x, y in zip(run["losses"], ref["losses"])),
            "grad": max(_max_error(g, h) for g, h in zip(run["grads"], ref["grads"])),
            "param": _max_error(run["params"], ref["params"])}


def data_parallel_check(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int,
                        steps: int = 2, seed: int = 0) -> dict[str, float]:
    """Spawn worker: DP with (6.27) against one process on the whole batch, over `steps` AdamW steps.

    Returns the max |difference| of the losses, of every gradient and of the final parameters,
    and "naive_grad": the gradient error of averaging local means (6.28) on the first batch.
    """
    _check_run(rank, world, cfg, batch, seq, micro_steps, steps)
    model, batches = _setup(cfg, batch, seq, steps, seed)
    ref = _reference_run(copy.deepcopy(model), batches)
    run = _parallel_run(copy.deepcopy(model), batches, rank, world, micro_steps, "sum",
                        all_reduce_gradients, _plain_state)
    naive = copy.deepcopy(model)
    tokens, targets = batches[0]
    lm_loss(naive(split_rows(tokens, rank, world)), split_rows(targets, rank, world)).backward()
    all_reduce_gradients(naive)
    for p in naive.parameters():
        p.grad /= world                                           # (6.28): right only for equal shares
    return {**_errors(run, ref), "naive_grad": _max_error(_plain_state(naive, grad=True), ref["grads"][0])}


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.data_parallel import data_parallel_check  # spawned processes import the worker from the module

dp = spawn(data_parallel_check, 3, cfg, 10, 16, 2)
for rank, errors in enumerate(dp):
    print(f"rank {rank}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

# %%
worst = {k: max(e[k] for e in dp) for k in dp[0]}
print("DP on 3 ranks x 2 micro-steps = one process: loss, every gradient, parameters after 2 steps < 1e-12:",
      max(worst["loss"], worst["grad"], worst["param"]) < 1e-12)
print("naive averaging of local means is off by more than 1e-4 with shares of 4, 3, 3 sequences:",
      worst["naive_grad"] > 1e-4)

# %% [markdown]
# ### 6.8.2 Where the memory goes
#
# With $\Psi$ parameters and AdamW, a DP rank in mixed precision (Micikevicius et al. 2017,
# arXiv:1710.03740) holds 2 bytes per parameter for the bf16/fp16 weights, 2 for their
# gradients, and $K = 12$ for the optimizer: an fp32 master copy of the weights and Adam's
# two fp32 moments. ZeRO's three stages shard, one after another, the optimizer state
# ($P_{os}$), the gradients ($P_{os+g}$) and the parameters ($P_{os+g+p}$) over the $W$
# data-parallel ranks:
#
# $$\text{DP}: (2+2+K)\Psi, \quad \text{ZeRO-1}: (2+2)\Psi + \frac{K\Psi}{W}, \quad
# \text{ZeRO-2}: 2\Psi + \frac{(2+K)\Psi}{W}, \quad \text{ZeRO-3}: \frac{(2+2+K)\Psi}{W} \qquad (6.29)$$
#
# Our float64 runs keep no master copy: 8 bytes of weights, 8 of gradients and $K = 16$
# (two float64 moments). Activations and temporary buffers come on top of all of these.

# %%
#| export lrn_lib.data_parallel
def zero_bytes_per_rank(n_params: float, world: int, stage: int, param_bytes: float = 2,
                        grad_bytes: float = 2, optimizer_bytes: float = 12) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer state under ZeRO stage 0 (DP) to 3 (6.29).

    Defaults are mixed-precision AdamW (2 + 2 + 12 bytes per parameter); returns a dict with
    keys params, grads, optimizer and total.
    """
    validate.integer(stage, "stage", low=0, high=3)
    validate.integer(world, "world", low=1)
    for name, value in (("n_params", n_params), ("param_bytes", param_bytes), ("grad_bytes", grad_bytes),
                        ("optimizer_bytes", optimizer_bytes)):
        validate.number(value, name, low=0)
    out = {"params": param_bytes * n_params / (world if stage >= 3 else 1),
           "grads": grad_bytes * n_params / (world if stage >= 2 else 1),
           "optimizer": optimizer_bytes * n_params / (world if stage >= 1 else 1)}
    out["total"] = sum(out.values())
    return out


# %%
psi = parameter_count(LLAMA3_8B)
print(f"Llama 3 8B: {psi / 1e9:.2f}B parameters; GB per rank for weights + gradients + AdamW (bf16 mixed precision)")
print("  W     DP  ZeRO-1  ZeRO-2  ZeRO-3")
for world in (1, 8, 64):
    row = [zero_bytes_per_rank(psi, world, stage)["total"] / 1e9 for stage in range(4)]
    print(f"{world:3d} " + " ".join(f"{gb:7.1f}" for gb in row))

# %% [markdown]
# Plain DP needs 128 GB per GPU for the 8B model before the first activation, more than an
# 80 GB H100 holds; sharding over the 8 GPUs of one server brings it to 16 GB, and over 64
# ranks to 2 GB. The communication is almost free for stages 1 and 2: a ring all-reduce *is*
# a reduce-scatter followed by an all-gather, each moving $(W-1)/W$ of the data per rank. In
# ZeRO-2 each rank reduce-scatters the gradients, updates its own shard of the parameters
# and all-gathers the updated parameters: the same two halves. ZeRO-3 must all-gather the
# parameters twice (forward and backward) because it does not keep them, so it moves
# $3\Psi$ instead of $2\Psi$: 1.5 times the DP volume.
#
# ### 6.8.3 ZeRO-3 / FSDP from scratch
#
# We shard **per unit**: the token embedding, each `TransformerBlock`, the final norm and
# the output head. A unit's $P$ parameters are flattened into one vector (in
# `named_parameters` order), padded with zeros to $W s$ elements where $s = \lceil P/W
# \rceil$, and rank $r$ keeps only its slice:
#
# $$\theta^{(r)} = \mathrm{flat}(\theta)[\,r s : (r+1) s\,] \qquad (6.30)$$
#
# That slice is the unit's only `nn.Parameter`; the unit's modules keep no weights of their
# own. A step then runs:
#
# 1. Before the unit's forward: `all_gather` the $W$ shards into the full flat vector, point
#    the modules' weights at views of it, run the forward, and drop the full vector.
# 2. Autograd wants to keep the weights that the backward needs (a linear layer saves its
#    weight to compute the input gradient). We intercept what it saves with
#    `torch.autograd.graph.saved_tensors_hooks`: a saved view of the gathered vector is
#    replaced by its (offset, shape, stride), and the backward all-gathers the vector again
#    on first use.
# 3. The gathering itself is an autograd function whose backward receives the gradient of
#    the full flat vector on each rank (of that rank's tokens) and returns a
#    `reduce_scatter`: rank $r$ gets the sum over ranks of slice $r$,
#
#    $$g^{(r)} = \sum_{q=1}^{W} \nabla_{\mathrm{flat}(\theta)} L^{(q)}\,[\,r s : (r+1) s\,] \qquad (6.31)$$
#
#    which lands in the shard's `.grad` (and accumulates over micro-steps). The re-gathered
#    vector is freed there too: every use of it in the unit's backward is over.
# 4. AdamW works element by element, so AdamW on the shard computes exactly slice $r$ of
#    AdamW on the full vector; `torch.optim.AdamW` over the shards is the whole optimizer.
#    (A global gradient-norm clip would need one extra all-reduce of the shards' squared
#    norms; the padding has zero gradient and does not change it.)
#
# A small `GatherStats` object counts the bytes of gathered vectors that are alive, through
# `weakref.finalize`: the count drops only when the tensor is really freed (any view, any
# tensor autograd saved, any reference the communication backend still holds keeps it
# alive), so its peak is a measurement, not a promise.

# %%
#| export lrn_lib.data_parallel
class GatherStats:
    """Bytes of gathered (unsharded) parameter vectors alive now (`live`), at most (`peak`), and all-gathers made."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.gathers = 0

    def track(self, full: torch.Tensor) -> None:
        """Count full (P,) as alive until Python frees it."""
        validate.tensor(full, "full", nonempty=False)
        nbytes = full.numel() * full.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.gathers += 1
        weakref.finalize(full, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


class _GatherShards(torch.autograd.Function):
    """shard (s,) -> full flat vector (W s,) by all_gather; backward: reduce_scatter (6.31)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, unit: "ShardedUnit") -> torch.Tensor:
        ctx.unit = unit
        return unit.gather(shard, track=True)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> tuple[torch.Tensor, None]:
        unit = ctx.unit
        unit.regathered = None                     # the unit's backward is done with its parameters
        return unit.reduce_scatter(grad_full), None


def _check_shard_options(group: dist.ProcessGroup | None, stats: GatherStats | None, reshard_after_forward: bool) -> None:
    """Raise unless group is a ProcessGroup or None, stats a GatherStats or None, reshard_after_forward a bool."""
    check_group(group)
    if stats is not None and not isinstance(stats, GatherStats):
        raise TypeError(f"stats must be a GatherStats or None, got {type(stats).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {type(reshard_after_forward).__name__}")


class ShardedUnit(nn.Module):
    """ZeRO-3 wrapper: module's parameters live as one padded flat shard (6.30) per rank of `group`.

    forward(*args) all-gathers the full parameters, runs module(*args) and frees them; the
    backward all-gathers them again and reduce-scatters their gradient into shard.grad (6.31).
    With reshard_after_forward=False the gathered parameters stay alive from forward to
    backward instead (one all-gather per step fewer, more memory), as FSDP's option of that name.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None,
                 stats: GatherStats | None = None, reshard_after_forward: bool = True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        _check_shard_options(group, stats, reshard_after_forward)
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"module ({type(module).__name__}) has no parameters to shard")
        if any(isinstance(m, ShardedUnit) for m in module.modules()):
            raise ValueError("module already contains a ShardedUnit: shard each unit once, bottom-up")
        if len({p.dtype for _, p in named}) > 1:
            raise ValueError(f"module's parameters mix dtypes {sorted({str(p.dtype) for _, p in named})}")
        self.module, self.group, self.stats = module, group, stats
        self.reshard_after_forward = reshard_after_forward
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.slots: list[tuple[str, nn.Module, str, int, torch.Size]] = []   # name, owner, attribute, offset, shape
        offset = 0
        for name, p in named:
            owner_name, _, attr = name.rpartition(".")
            self.slots.append((name, module.get_submodule(owner_name), attr, offset, p.shape))
            offset += p.numel()
        self.numel = offset
        self.shard_numel = -(-offset // self.world)                           # s = ceil(P / W)
        flat = torch.zeros(self.shard_numel * self.world, dtype=named[0][1].dtype, device=named[0][1].device)
        flat[:offset] = torch.cat([p.detach().reshape(-1) for _, p in named])
        start = self.rank * self.shard_numel
        self.shard = nn.Parameter(flat[start:start + self.shard_numel].clone())   # (6.30)
        for _, owner, attr, _, _ in self.slots:
            delattr(owner, attr)                                              # the module keeps no weights
            setattr(owner, attr, None)
        self.regathered: torch.Tensor | None = None
        self._gathered_ptr: int | None = None

    def gather(self, shard: torch.Tensor, track: bool = False) -> torch.Tensor:
        """all_gather the W shards (s,) of `group` into the full padded flat vector (W s,)."""
        full = torch.empty(self.shard_numel * self.world, dtype=shard.dtype, device=shard.device)
        dist.all_gather(list(full.chunk(self.world)), shard.detach().contiguous(), group=self.group)
        if track and self.stats is not None:
            self.stats.track(full)
        return full

    def reduce_scatter(self, grad_full: torch.Tensor) -> torch.Tensor:
        """(W s,) gradient of this rank -> (s,) sum over the ranks of this rank's slice (6.31)."""
        grad_shard = torch.empty(self.shard_numel, dtype=grad_full.dtype, device=grad_full.device)
        dist.reduce_scatter(grad_shard, list(grad_full.contiguous().chunk(self.world)), group=self.group)
        return grad_shard

    def _bind(self, full: torch.Tensor | None) -> None:
        """Point every weight of the module at its view of full (or at None)."""
        for _, owner, attr, offset, shape in self.slots:
            setattr(owner, attr, None if full is None else full[offset:offset + shape.numel()].view(shape))

    def _pack(self, saved: torch.Tensor):
        """Saved-tensor hook: a view of the gathered vector is stored as (offset, shape, stride) only."""
        if saved.untyped_storage().data_ptr() == self._gathered_ptr:
            return saved.storage_offset(), saved.shape, saved.stride()
        return saved

    def _unpack(self, packed) -> torch.Tensor:
        """Inverse of _pack; the first parameter the backward needs triggers the second all-gather."""
        if isinstance(packed, torch.Tensor):
            return packed
        offset, shape, stride = packed
        if self.regathered is None:
            self.regathered = self.gather(self.shard, track=True)
        return self.regathered.as_strided(shape, stride, offset)

    def forward(self, *args, **kwargs):
        """module(*args, **kwargs) with the full parameters gathered for the duration of the call."""
        full = _GatherShards.apply(self.shard, self)
        self._bind(full)
        self._gathered_ptr = full.untyped_storage().data_ptr()
        hooks = (torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
                 if self.reshard_after_forward else nullcontext())
        with hooks:
            out = self.module(*args, **kwargs)
        self._bind(None)
        self._gathered_ptr = None
        return out

    def full_tensors(self, grad: bool = False) -> dict[str, torch.Tensor]:
        """Collective: the unsharded parameters (or gradients) of the module by name, each in its own shape."""
        source = self.shard.grad if grad else self.shard
        if source is None:
            raise ValueError("grad=True but the shard has no gradient yet")
        full = self.gather(source)
        return {name: full[offset:offset + shape.numel()].view(shape).clone()
                for name, _, _, offset, shape in self.slots}


# %% [markdown]
# Wrapping the Llama replaces its units by `ShardedUnit`s in place; `Llama.forward` does not
# change, since a wrapped unit is called with the same arguments. `gather_full_state` reads
# the whole model back by its original parameter names (a collective, for checks), and
# `persistent_bytes` counts what a rank keeps from step to step: the bytes of its
# parameters, their gradients and every tensor of the optimizer state (for PyTorch's
# `DTensor`s, the local shard).

# %%
#| export lrn_lib.data_parallel
def shard_llama(model: Llama, group: dist.ProcessGroup | None = None, stats: GatherStats | None = None,
                reshard_after_forward: bool = True) -> list[ShardedUnit]:
    """ZeRO-3 a Llama in place over `group`: one ShardedUnit per embedding, block, final norm and head."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a lrn_lib.llama.Llama, got {type(model).__name__}")
    _check_shard_options(group, stats, reshard_after_forward)          # before the model is changed

    def wrap(module: nn.Module) -> ShardedUnit:
        return ShardedUnit(module, group, stats, reshard_after_forward)

    model.tok_embeddings = wrap(model.tok_embeddings)
    for i, layer in enumerate(model.layers):
        model.layers[i] = wrap(layer)
    model.norm = wrap(model.norm)
    model.output = wrap(model.output)
    return [m for m in model.modules() if isinstance(m, ShardedUnit)]


def gather_full_state(model: nn.Module, grad: bool = False) -> dict[str, torch.Tensor]:
    """Collective: every sharded unit's full parameters (or gradients), named as in the unwrapped model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = {}
    for path, unit in model.named_modules():
        if isinstance(unit, ShardedUnit):
            prefix = path + "." if path else ""
            state.update({prefix + name: t for name, t in unit.full_tensors(grad).items()})
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of t this rank stores: the local shard of a DTensor, t itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank keeps across steps: parameters, their gradients, optimizer state tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def nbytes(tensors) -> int:
        return sum(_local(t).numel() * _local(t).element_size() for t in tensors)

    params = list(model.parameters())
    return {"params": nbytes(params),
            "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values()
                                if isinstance(v, torch.Tensor))}


# %% [markdown]
# ### Checking FSDP, and PyTorch's `fully_shard`
#
# `fsdp_check` trains four copies of the same model for two AdamW steps: the single-process
# reference; our ZeRO-3 with re-sharding after forward; ours without; and PyTorch's FSDP2,
# `torch.distributed.fsdp.fully_shard` applied to every block and then to the whole model
# (the root unit then holds the embedding, the final norm and the head), on a CPU
# `DeviceMesh` over gloo. FSDP2 shards each parameter along its first dimension as a
# `DTensor` instead of one flat vector per unit, and averages (rather than sums) the
# reduce-scattered gradients, so its losses are weighted with `sync="mean"`.

# %%
#| export lrn_lib.data_parallel
def _dtensor_state(model: nn.Module, grad: bool) -> dict[str, torch.Tensor]:
    """Full parameters (or gradients) of an FSDP2 model by name (a collective per parameter)."""
    return {n: (p.grad if grad else p).full_tensor().detach().clone() for n, p in model.named_parameters()}


def fsdp_check(rank: int, world: int, cfg: LlamaConfig, batch: int, seq: int, micro_steps: int,
               steps: int = 2, seed: int = 0) -> dict:
    """Spawn worker: our ZeRO-3 (both resharding modes) and FSDP2's fully_shard against one process.

    Returns max |difference| of losses, gradients and final parameters ("loss", "grad", "param";
    "keep_*" without resharding after forward; "fsdp2_*"), the peak and final live gathered
    bytes and the number of all-gathers ("peak", "live", "gathers", "keep_*"), the padded bytes
    of every unit in model order, embedding first ("unit_bytes"), and the persistent bytes of
    a DP rank, our ZeRO-3 rank and an FSDP2 rank ("dp_bytes", "bytes", "fsdp2_bytes").
    """
    _check_run(rank, world, cfg, batch, seq, micro_steps, steps)
    model, batches = _setup(cfg, batch, seq, steps, seed)
    ref = _reference_run(copy.deepcopy(model), batches)
    out: dict = {"dp_bytes": ref["bytes"]}
    for prefix, reshard in (("", True), ("keep_", False)):
        stats = GatherStats()
        sharded = copy.deepcopy(model)
        units = shard_llama(sharded, None, stats, reshard)
        run = _parallel_run(sharded, batches, rank, world, micro_steps, "sum", None, gather_full_state)
        out.update({prefix + k: v for k, v in _errors(run, ref).items()})
        out[prefix + "peak"], out[prefix + "live"], out[prefix + "gathers"] = stats.peak, stats.live, stats.gathers
        if reshard:
            out["bytes"] = run["bytes"]
            out["unit_bytes"] = [u.shard_numel * world * u.shard.element_size() for u in units]
    fsdp2 = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp2.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp2, mesh=mesh)
    run = _parallel_run(fsdp2, batches, rank, world, micro_steps, "mean", None, _dtensor_state)
    out.update({"fsdp2_" + k: v for k, v in _errors(run, ref).items()})
    out["fsdp2_bytes"] = run["bytes"]
    return out


# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib.data_parallel import fsdp_check

deep = tiny_config(n_layers=4)
fsdp = {world: spawn(fsdp_check, world, deep, 9, 16, 2) for world in (1, 2, 4)}
for world, results in fsdp.items():
    r = results[-1]
    print(f"W={world}, last rank: " + ", ".join(f"{k} {r[k]:.1e}" for k in
          ("loss", "grad", "param", "keep_param", "fsdp2_loss", "fsdp2_grad", "fsdp2_param")))

# %%
keys = ("loss", "grad", "param", "keep_loss", "keep_grad", "keep_param", "fsdp2_loss", "fsdp2_grad", "fsdp2_param")
worst = max(r[k] for results in fsdp.values() for r in results for k in keys)
print("our ZeRO-3 (both modes) and FSDP2 on W = 1, 2, 4 ranks = one process:",
      "losses, every gradient, parameters after 2 AdamW steps < 1e-12:", worst < 1e-12)

# %% [markdown]
# All three engines reproduce the single-process run to rounding (the runs use a 4-layer
# tiny Llama, so that one block is a small part of the model). Now the bytes each rank
# keeps (rank 0, after an optimizer step, gradients still held). The DP and ZeRO-3 columns
# are measured on the runs above; the ZeRO-1 and ZeRO-2 columns combine the measured full
# tensors of the DP rank with the measured shards of the ZeRO-3 rank, which is exactly what
# those stages keep. The last column is (6.29) with 8 + 8 + 16 bytes per parameter.

# %%
def kib(nbytes: float) -> str:
    return f"{nbytes / 1024:8.1f}"


n_params = parameter_count(deep)
print(f"4-layer tiny Llama, {n_params} float64 parameters; KiB per rank (params + grads + AdamW state)")
print("  W       DP   ZeRO-1   ZeRO-2   ZeRO-3    FSDP2  (6.29) ZeRO-3")
formula_gap = 0.0
for world, results in fsdp.items():
    dp_b, z3, f2 = results[0]["dp_bytes"], results[0]["bytes"], results[0]["fsdp2_bytes"]
    zero1 = dp_b["params"] + dp_b["grads"] + z3["optimizer"]
    zero2 = dp_b["params"] + z3["grads"] + z3["optimizer"]
    formula = zero_bytes_per_rank(n_params, world, 3, 8, 8, 16)["total"]
    formula_gap = max(formula_gap, abs(sum(z3.values()) - formula) / formula)
    print(f"{world:3d} " + " ".join(kib(b) for b in (sum(dp_b.values()), zero1, zero2, sum(z3.values()),
                                                     sum(f2.values()), formula)))
print("measured ZeRO-3 bytes within 0.5% of (8 + 8 + 16) Psi / W:", formula_gap < 0.005)

# %% [markdown]
# The measured ZeRO-3 bytes differ from the formula only by the padding (at most $W-1$
# elements per unit) and by AdamW's step counter, a 4-byte tensor per parameter tensor,
# which is why DP (39 parameter tensors) holds a little more than $32\Psi$ and why FSDP2,
# which keeps one shard per original parameter, holds a little more than our ZeRO-3 with
# its 7 flat shards.
#
# Sharding the persistent state is half the story: during the step a rank also holds the
# parameters it gathered. With re-sharding after forward, our code holds one unit at a
# time; without it, the gathered parameters of every unit stay alive from their forward to
# their backward. Every unit but one: the embedding's backward needs only the token ids, so
# autograd saves nothing of its weight, its gathered vector dies right after its forward in
# both modes, and with re-sharding the backward never gathers it again.
#
# The measured peak with re-sharding is at least the largest unit, and sometimes a little
# more, varying from run to run: gloo's worker threads drop their own reference to an
# all-gather's output a moment after the collective has returned, so on a busy CPU the
# previous unit's buffer can still be alive when the next one is gathered. GPUs have the
# same problem in another form (memory of a collective still in flight on another stream
# cannot be reused yet), which is why PyTorch's first FSDP had a `limit_all_gathers` rate
# limiter that allows only two all-gathers in flight.

# %%
# NBVAL_IGNORE_OUTPUT
r = fsdp[4][0]
units = r["unit_bytes"]
print(f"W=4: all parameters gathered {kib(sum(units))} KiB, largest unit {kib(max(units))} KiB")
print(f"     peak of live gathered parameters: resharding {kib(r['peak'])} KiB, keeping {kib(r['keep_peak'])} KiB")

# %%
print("with resharding, the peak lies between the largest unit and the three largest (< whole model):",
      max(units) <= r["peak"] <= sum(sorted(units)[-3:]) < sum(units))
print("without resharding, it holds all units but the embedding, or all:",
      sum(units) - units[0] <= r["keep_peak"] <= sum(units))
print("every gathered vector freed by the end of the step:", all(x[k] == 0 for res in fsdp.values()
                                                               for x in res for k in ("live", "keep_live")))
micro_batches = 2 * 2                                             # 2 steps of 2 micro-batches
print("all-gathers per micro-batch: resharding", r["gathers"] // micro_batches,
      "(7 forward + 6 backward), keeping", r["keep_gathers"] // micro_batches)

# %% [markdown]
# Real FSDP improves on this in two ways that change speed, not results. It **prefetches**:
# the all-gather of unit $i+1$ is issued while unit $i$ computes (and in backward, of unit
# $i-1$ while unit $i$'s gradients are computed), on a separate CUDA stream, so the peak
# is two units rather than one, and the communication hides behind compute. And it
# keeps the gathered parameters in bf16 while the shards and optimizer stay in fp32, which
# is where (6.29)'s $2 + 2 + 12$ comes from. Llama 3's report describes running its FSDP
# without re-sharding the weights after the forward pass, trading the memory measured above
# for one fewer all-gather per micro-batch, which matters when pipeline parallelism runs
# many micro-batches per step. Section 6.9 uses `backward_global_mean` and
# `all_reduce_gradients` over the CP x DP group of the 4D mesh, and 6.10 hands the sharding
# to `fully_shard`, which we have just checked against our own.

# %% [markdown]
# ## 6.9 All four at once
#
# Each dimension so far split one thing: TP the weight matrices, CP the sequence, PP the
# layers, DP the batch. They compose because they split different things. On the 4D mesh
# of section 6.4, a rank with coordinates $(t, c, p, d)$
#
# 1. builds the full model from the shared seed, keeps tensor-parallel shard $t$ of every
#    matrix (section 6.5), and of those only the layers of pipeline stage $p$ (section 6.7);
# 2. takes data-parallel slice $d$ of the batch (section 6.8), and of each sequence the chunks
#    that CP rank $c$ holds under Llama 3's load balancing, with their global positions
#    (section 6.6);
# 3. runs the 1F1B schedule over its PP group, with TP's all-reduces inside every layer
#    over its TP group and CP's K/V all-gathers over its CP group;
# 4. sums gradients over its CP x DP group: those ranks hold the same weight shard and
#    have seen different tokens.
#
# The loss needs care in exactly one place. The single-process loss is the mean over all
# $N$ target tokens of the step. On rank $(t, c, p, d)$, micro-batch $i$'s loss function
# returns the mean over its $n$ local tokens divided by $|CP|\,|DP|$, the pipeline divides
# by $m$ micro-batches, so each token's loss carries weight $1 / (n \cdot m \cdot |CP|\,|DP|)
# = 1/N$:
#
# $$\mathcal{L} = \sum_{c,d} \sum_{i=1}^{m} \frac{1}{m}\,\frac{1}{|CP|\,|DP|}\,
#   \frac{1}{n} \sum_{j \in \text{shard}(c, d, i)} \ell_j = \frac{1}{N} \sum_{j=1}^{N} \ell_j \qquad (6.32)$$
#
# and a plain sum (not a mean) of gradients over the CP x DP group gives the exact
# gradient. The worker below does all of it and compares the loss and every gradient
# shard with the single-process step, in float64.

# %%
#| export lrn_lib.parallel_4d
import torch
import torch.distributed as dist

from lrn_lib.context_parallel import cp_attend, shard_positions, shard_sequence
from lrn_lib.data_parallel import all_reduce_gradients, split_rows
from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, lm_loss
from lrn_lib.mesh import Mesh, MeshShape, check_mesh_shape, check_rank
from lrn_lib.pipeline_parallel import build_stage, run_pipeline
from lrn_lib.tensor_parallel import check_tp_config, gradient_errors, tensor_parallel_llama, vocab_parallel_cross_entropy


def four_d_step(rank: int, world: int, shape: MeshShape, cfg: LlamaConfig, batch: int, seq: int,
                microbatches: int, seed: int = 0) -> dict:
    """Spawn worker: one training step of a Llama on the 4D mesh `shape`, against the single-process step.

    batch sequences of seq + 1 tokens (inputs and next-token targets); batch must split into
    dp x microbatches equal parts and seq into 2 x cp chunks. Returns this rank's coordinates,
    its group members, the step's loss (on last-stage ranks, else None), the single-process
    loss, and the largest |gradient difference| over this rank's parameter shards.
    """
    check_rank(rank, world)
    check_mesh_shape(shape, world)
    check_tp_config(cfg, shape.tp)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1, high=cfg.max_seq_len)
    validate.integer(microbatches, "microbatches", low=shape.pp)      # a pipeline needs one per stage
    if batch % (shape.dp * microbatches):
        raise ValueError(f"batch={batch} does not split into dp={shape.dp} x microbatches={microbatches} parts")
    if seq % (2 * shape.cp):
        raise ValueError(f"seq={seq} is not divisible by 2 x cp = {2 * shape.cp}")
    mesh = Mesh(shape)
    t, c, p, d = (mesh.coords[k] for k in ("tp", "cp", "pp", "dp"))
    torch.manual_seed(seed)                                          # one model and one batch on every rank
    model = Llama(cfg).double()
    tokens = torch.randint(cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    reference = lm_loss(model(inputs), targets)                      # the single-process step
    reference.backward()

    stage = build_stage(tensor_parallel_llama(model, mesh.group["tp"]), p, shape.pp)    # 1. TP shard, PP stage
    stage.zero_grad()
    stage.positions = shard_positions(seq, c, shape.cp)               # 2. the CP shard's global positions
    for block in stage.layers.values():
        block.attention.attend = cp_attend("allgather", mesh.group["cp"])
    mine = shard_sequence(split_rows(inputs, d, shape.dp), c, shape.cp)
    my_targets = shard_sequence(split_rows(targets, d, shape.dp), c, shape.cp)

    def loss_fn(local_logits: torch.Tensor, micro_targets: torch.Tensor) -> torch.Tensor:
        mean = vocab_parallel_cross_entropy(local_logits, micro_targets, cfg.vocab_size, mesh.group["tp"])
        return mean / (shape.cp * shape.dp)                          # (6.32); the pipeline divides by m

    micro_shape = (batch // shape.dp // microbatches, seq // shape.cp, cfg.dim)
    run = run_pipeline(stage, "1f1b", microbatches, micro_shape, mine, my_targets, loss_fn,
                       torch.float64, mesh.group["pp"])             # 3. 1F1B over the PP group
    all_reduce_gradients(stage, mesh.group["cp_dp"])                # 4. sum over CP x DP

    loss = None
    if stage.last:
        total = torch.tensor([run.loss], dtype=torch.float64)
        dist.all_reduce(total, group=mesh.group["cp_dp"])
        loss = total.item()
    return {"coords": mesh.coords, "members": mesh.members, "loss": loss, "reference": reference.item(),
            "grad_error": max(gradient_errors(stage, model).values())}


# %% [markdown]
# Sixteen processes on the laptop, the paper's Figure 5 layout $|TP| = |CP| = |PP| = |DP|
# = 2$, a 2-layer tiny model (one layer per stage), a batch of 4 sequences of 16 tokens
# (2 per DP rank, as 2 micro-batches of one sequence; 8 tokens per CP rank, in the chunks
# $\{c, 3 - c\}$ of 4 chunks of 4).

# %%
from lrn_lib.llama import tiny_config
from lrn_lib.mesh import MeshShape, spawn
from lrn_lib.parallel_4d import four_d_step

shape = MeshShape(tp=2, cp=2, pp=2, dp=2)
results = spawn(four_d_step, shape.world, shape, tiny_config(), 4, 16, 2)
for rank, r in enumerate(results):
    m = r["members"]
    print(f"GPU{rank:<2d} [TP{r['coords']['tp']}, CP{r['coords']['cp']}, PP{r['coords']['pp']}, DP{r['coords']['dp']}]"
          f"  TP {m['tp']}  CP {m['cp']}  PP {m['pp']}  DP {m['dp']}  CPxDP {m['cp_dp']}")

# %%
losses = [r["loss"] for r in results if r["loss"] is not None]
print("last-stage ranks report the loss:", len(losses), "of", len(results))
print("4D loss equals the single-process loss:", all(abs(x - results[0]["reference"]) < 1e-12 for x in losses))
print("every gradient shard equals the single-process gradient's slice:",
      max(r["grad_error"] for r in results) < 1e-12)

# %% [markdown]
# ## 6.10 The production path: PyTorch's own engine and `torchrun`
#
# Sections 6.5 to 6.9 built every parallel dimension out of raw collectives, so that each
# message could be seen and counted. Production trainers do not write those messages by hand.
# PyTorch ships the same four dimensions as an engine: a **device mesh** that names the
# dimensions of the grid of ranks, **DTensor**, a tensor that knows how it is laid out over
# that mesh, `parallelize_module` for tensor parallelism, `fully_shard` (FSDP2) for sharded
# data parallelism, `torch.distributed.pipelining` for pipeline parallelism, and
# `context_parallel` for the sequence dimension. torchtitan (Liang et al. 2024,
# arXiv:2410.06511), PyTorch's reference trainer for Llama 3, composes exactly these pieces.
#
# This section trains the chapter's `Llama` with them. The module `lrn_lib.train` is a
# command-line program: `python -m lrn_lib.train` on one process, or
# `torchrun --nproc-per-node 8 -m lrn_lib.train --tp 2 --cp 2 --pp 2` on eight GPUs. The same
# code runs on CPU processes joined by gloo and on GPUs joined by NCCL. Since everything below
# is somebody else's machinery, we hold it to the standard of the earlier sections: in
# float64, the loss curve and every gradient under TP, FSDP, PP and a 2-D mesh must equal the
# single-process run.
#
# ### The mesh and DTensor
#
# `init_device_mesh("cuda", (dp, pp, cp, tp), mesh_dim_names=("dp", "pp", "cp", "tp"))` lays the
# ranks out as `arange(W).view(dp, pp, cp, tp)`, the layout of section 6.4: TP varies fastest,
# so the ranks of a TP group sit in one server. Indexing the mesh by name gives a sub-mesh,
# `mesh["tp"]` (this rank's TP group, with its process group), and the engine's functions take
# such sub-meshes instead of raw process groups.
#
# A DTensor is a local tensor plus a mesh plus one **placement** per mesh dimension, which says
# how the global tensor relates to the local pieces along that dimension:
#
# * `Shard(d)`: the global tensor is cut along its dimension `d`; each rank holds one piece.
# * `Replicate()`: every rank holds the whole tensor.
# * `Partial()`: every rank holds a summand; the global tensor is their sum, not yet computed.
#
# Changing placements is communication, and each change is one of the collectives of
# section 6.4: `Partial` to `Replicate` is an all-reduce, `Shard` to `Replicate` an all-gather,
# `Partial` to `Shard` a reduce-scatter, `Replicate` to `Shard` a local slice with no message.
# Operators on DTensors propagate placements: a matrix product of an input `Replicate` and a
# weight `Shard(0)` gives an output `Shard(-1)`; one of an input `Shard(-1)` and a weight
# `Shard(1)` gives an output `Partial`. Tensor parallelism, FSDP and context parallelism are
# all choices of placements plus the redistributions between them.

# %%
#| export lrn_lib.train
import argparse
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrn_lib import corpus, validate
from lrn_lib.llama import Llama, LlamaConfig, lm_loss, random_windows, sdpa_attention, tiny_config
from lrn_lib.mesh import check_rank, free_port, spawn
from lrn_lib.pipeline_parallel import LlamaStage, partition_layers

try:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
except ImportError as missing:
    raise ImportError(f"lrn_lib.train needs PyTorch's distributed engine (DeviceMesh, DTensor, FSDP2, pipelining; "
                      f"torch >= 2.6), but this torch {torch.__version__} lacks a piece: {missing}") from missing


MESH_DIM_NAMES = ("dp", "pp", "cp", "tp")


def build_mesh(args: argparse.Namespace) -> DeviceMesh:
    """The job's DeviceMesh, shape (dp, pp, cp, tp): TP varies fastest, as in Llama 3's Figure 5 and
    lrn_lib.mesh.MeshShape. Needs an initialized process group of dp * pp * cp * tp ranks."""
    check_args(args)
    shape = (args.dp, args.pp, args.cp, args.tp)
    if dist.get_world_size() != math.prod(shape):
        raise ValueError(f"--dp {args.dp} --pp {args.pp} --cp {args.cp} --tp {args.tp} need {math.prod(shape)} "
                         f"processes, but the job has {dist.get_world_size()}")
    return init_device_mesh(args.device, shape, mesh_dim_names=MESH_DIM_NAMES)

# %% [markdown]
# ### Data that needs no download
#
# The model reads bytes (vocabulary 256). The corpus is the book's (`lrn_lib.corpus`, a snapshot of
# Python 3.11.7's standard library, the same bytes on every Python): the sources of the `json` and
# `email` packages and the text of pydoc's help topics, about 0.9 MB. Step $s$
# draws its windows from a generator seeded with `(seed, s)`, so every rank computes the same
# global batch of `--batch` sequences without a message; a rank keeps the rows of its dp
# coordinate (rows $d\,B/D$ to $(d+1)\,B/D$ for dp rank $d$ of $D$), so ranks that differ only
# in tp, cp or pp hold the same rows, as those dimensions require.

# %%
#| export lrn_lib.train
def stdlib_corpus() -> torch.Tensor:
    """Training bytes that need no download (lrn_lib.corpus): the sources of the standard library's json
    and email packages, then pydoc's help topics, as an int64 tensor (N,) of values 0..255."""
    data = corpus.python_source(("json", "email")) + corpus.english()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def global_batch(data: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole job's batch of one step: (inputs, targets), each (batch, seq) int64, drawn from data (N,)
    by a generator seeded with (seed, step), so every rank draws the same windows without talking."""
    validate.integer(step, "step", low=0)
    validate.integer(seed, "seed", low=0)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return random_windows(data, batch, seq, generator)

# %% [markdown]
# ### Tensor parallelism: `parallelize_module`
#
# `parallelize_module(module, mesh["tp"], plan)` takes a plan, a dictionary from submodule
# names to **styles**, and turns those submodules' weights into DTensors:
#
# * `ColwiseParallel()` on an `nn.Linear` (weight of shape (out, in)) shards the weight
#   `Shard(0)`, so rank $r$ computes the output features $Y_r = X W_r^\top$ of its rows
#   $W_r$; the input is taken as `Replicate`, the output is left `Shard(-1)` and handed on as a
#   plain local tensor.
# * `RowwiseParallel()` shards the weight `Shard(1)`, takes its input `Shard(-1)` (exactly what
#   a column-parallel layer produced), computes the `Partial` sum
#   $Y = \sum_r X_r W_r^\top$ and all-reduces it to `Replicate`. (6.33)
#
# That is Megatron's column-then-row pairing of section 6.5, one all-reduce per pair: `wq`,
# `wk`, `wv` column-parallel and `wo` row-parallel in attention; `w1`, `w3` column-parallel
# and `w2` row-parallel in SwiGLU. Attention needs no change: it reshapes the projections with
# `view(B, T, -1, head_dim)`, so a rank whose `wq` holds $H/t$ heads' rows (and $H_{kv}/t$ in
# `wk`, `wv`) simply runs attention on its own heads, the GQA groups intact as long as $t$
# divides $H_{kv}$. For the ends we choose: `RowwiseParallel` on the embedding shards the
# table by vocabulary rows (a rank looks up the ids it owns, contributes zeros for the others,
# and the all-reduce completes the lookup); `ColwiseParallel(output_layouts=Replicate())` on
# the output head computes a vocabulary slice of the logits per rank and all-gathers them. At
# a vocabulary of 128,256, torchtitan instead keeps the logits sharded and computes the
# cross-entropy on the shards (`loss_parallel`), which saves the gather; with our 256 bytes the
# gathered logits are simpler. RMSNorm weights stay plain tensors, the same on every TP rank.
#
# The attention itself goes through section 6.1's `sdpa_attention`, PyTorch's
# `F.scaled_dot_product_attention` (SDPA): it is the call that context parallelism intercepts,
# and on GPUs it runs a FlashAttention kernel. It repeats the key/value heads for GQA before
# the call, since the context-parallel path takes plain multi-head inputs. The stage module is section 6.7's `LlamaStage`, whose `positions`
# attribute carries the RoPE positions (under CP a rank holds positions that are not $0..T-1$).

# %%
#| export lrn_lib.train
def tensor_parallel_plan(stage: LlamaStage) -> dict:
    """parallelize_module's plan for one stage: Megatron's column/row pairs in attention and SwiGLU, the
    embedding split by vocabulary rows, the output head by vocabulary columns (logits gathered)."""
    if not isinstance(stage, LlamaStage):
        raise TypeError(f"stage must be a LlamaStage, got {type(stage).__name__}")
    plan = {}
    if stage.first:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    for name in stage.layers:
        block = f"layers.{name}"                        # column then row parallel, (6.33)
        plan |= {f"{block}.attention.wq": ColwiseParallel(), f"{block}.attention.wk": ColwiseParallel(),
                 f"{block}.attention.wv": ColwiseParallel(), f"{block}.attention.wo": RowwiseParallel(),
                 f"{block}.feed_forward.w1": ColwiseParallel(), f"{block}.feed_forward.w3": ColwiseParallel(),
                 f"{block}.feed_forward.w2": RowwiseParallel()}
    if stage.last:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    return plan

# %% [markdown]
# ### Sharded data parallelism: `fully_shard`
#
# `fully_shard(module, mesh=data_mesh)` is FSDP2, the ZeRO-3 of section 6.8. It replaces each
# parameter of `module` by a DTensor `Shard(0)` over the data-parallel ranks (per parameter,
# not one flat buffer as in FSDP1) and adds hooks: before the module's forward it all-gathers
# the parameters, after it frees them again (`reshard_after_forward=True`), before the
# backward it all-gathers them once more, and after the backward it reduce-scatters the
# gradients, averaged over the $D$ ranks,
#
# $$g^{(r)} = \text{shard } r \text{ of } \frac{1}{D}\sum_{d=1}^{D} g_d, \qquad (6.34)$$
#
# so that AdamW updates only the rank's shard. Calling it on every `TransformerBlock` first
# and on the stage last makes each block one communication group, whose all-gather can be
# prefetched while the previous block computes; the root call collects what is left (the
# embedding, the final norm, the head). The order matters in a second way: TP must come
# first, so that FSDP shards the TP shards. On a 2-D (dp, tp) mesh a `wq` weight then has the
# placements `(dp: _StridedShard(dim=0, sf=2), tp: Shard(dim=0))`: TP rank $t$ owns half of
# the rows, and FSDP cuts that half again, so that from the global tensor's point of view a dp
# rank's rows come in two strided pieces. The demo below prints these layouts.
#
# With a pipeline, a stage runs $m$ forward passes before the first backward. Resharding
# after each forward would repeat the all-gather $2m$ times per step, so with `--pp > 1` we keep
# the weights gathered from the forward to the backward (`reshard_after_forward=False`), the
# trade Llama 3's report describes for its FSDP (section 6.8). With context parallelism the $C$
# ranks of a CP group hold different tokens of the same sequences, so their gradients must be
# averaged too: FSDP then runs over the dp and cp dimensions flattened into one, the CP x DP
# group of section 6.9 (torchtitan does the same).

# %%
#| export lrn_lib.train
def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The 1-D mesh over which gradients are averaged: dp, or cp, or both flattened (as torchtitan does);
    None when there is only one such rank."""
    if not isinstance(mesh, DeviceMesh) or not {"dp", "cp"} <= set(mesh.mesh_dim_names or ()):
        raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
    dp, cp = mesh["dp"].size(), mesh["cp"].size()
    if dp * cp == 1:
        return None
    if cp == 1:
        return mesh["dp"]
    if dp == 1:
        return mesh["cp"]
    if not hasattr(mesh, "_flatten"):
        raise RuntimeError(f"this torch ({torch.__version__}) cannot flatten the (dp, cp) mesh dimensions")
    return mesh["dp", "cp"]._flatten("dp_cp")


def shard_stage(stage: LlamaStage, mesh: DeviceMesh) -> LlamaStage:
    """Apply TP over mesh["tp"], then FSDP2 over the data ranks (dp, times cp when cp > 1): per block, then
    the stage as root. Returns the same module, its parameters now DTensors."""
    if not isinstance(stage, LlamaStage):
        raise TypeError(f"stage must be a LlamaStage, got {type(stage).__name__}")
    if not isinstance(mesh, DeviceMesh) or tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
        raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
    if mesh["tp"].size() > 1:
        parallelize_module(stage, mesh["tp"], tensor_parallel_plan(stage))
    data_mesh = data_parallel_mesh(mesh)
    if data_mesh is not None:
        keep_gathered = mesh["pp"].size() > 1          # pipelining runs a stage once per micro-batch
        for block in stage.layers.values():           # gradients reduce-scattered as in (6.34)
            fully_shard(block, mesh=data_mesh, reshard_after_forward=not keep_gathered)
        fully_shard(stage, mesh=data_mesh, reshard_after_forward=not keep_gathered)
    return stage

# %% [markdown]
# ### Pipeline parallelism: `torch.distributed.pipelining`, and its loss scaling
#
# Each pipeline rank builds its stage by keeping only its own blocks of the full model (the
# first stage also the embedding, the last the norm and the head), as torchtitan does by
# deleting the other layers. `PipelineStage(stage, k, p, device, group=mesh["pp"].get_group())`
# wraps it for the messages between neighbours (activation shapes are exchanged once, at the
# first step), and `ScheduleGPipe` or `Schedule1F1B` (section 6.7's two schedules) drives it:
# `schedule.step(inputs, target=targets, losses=losses)` on the first stage,
# `schedule.step(target=targets, losses=losses)` on the others. The schedule splits the batch
# into $m$ micro-batches along dimension 0.
#
# The scaling deserves care, because a factor of $m$ is easy to lose. On the last stage the
# schedule calls `loss_fn(output_j, target_j)`, here `lm_loss`, the mean over the micro-batch's
# tokens, $\ell_j$; it runs the backward pass of each $\ell_j$ as it is, accumulating
# $\sum_j \nabla\ell_j$, and only after the last backward (and FSDP's reduce-scatter) divides
# every gradient of the stage by $m$ (the default `scale_grads=True`). With micro-batches of
# equal size,
#
# $$\frac{1}{m}\sum_{j=1}^{m}\nabla\ell_j = \nabla\Big(\frac{1}{m}\sum_{j=1}^{m}\ell_j\Big) = \nabla L_{\text{batch}}, \qquad (6.35)$$
#
# the gradient of the single-process loss over the whole batch. The `losses` list receives the
# unscaled $\ell_j$, so the step's loss is their mean. A `loss_fn` that summed over tokens
# would need `scale_grads=False`; dividing `lm_loss` by $m$ by hand would divide twice. The
# gradient checks below, at $m = 2$ and $m = 4$, pin this down.
#
# ### Context parallelism: `context_parallel`
#
# Inside `with context_parallel(mesh["cp"], buffers=[inputs, targets, positions],
# buffer_seq_dims=[1, 1, 0])` two things hold. The buffers are replaced, in place, by this
# rank's part of the sequence, with the same head-and-tail balancing as section 6.6 (the
# sequence is cut into $2C$ chunks and rank $c$ keeps chunks $c$ and $2C-1-c$, so every rank
# gets the same share of the causal work); that is why the positions go in too, so that RoPE
# rotates each token by its true position. And `F.scaled_dot_product_attention` is replaced by
# a version that wraps $q, k, v$ as DTensors sharded on the sequence and runs ring attention:
# by default it all-gathers the keys and values, the variant Llama 3 chose (section 6.6);
# `set_rotate_method("alltoall")` passes them around the ring instead. The replacement
# intercepts only the CUDA attention kernels (flash, memory-efficient, cuDNN), so there is no
# CPU path: with `--cp > 1` on a CPU, `lrn_lib.train` refuses and points to section 6.6's
# from-scratch ring attention, which runs on gloo. The job's loss averages the last stage's
# losses over the $D \cdot C$ ranks that hold different tokens (one TP rank each):
#
# $$L = \frac{1}{D\,C}\sum_{d=1}^{D}\sum_{c=1}^{C} \ell_{d,c}. \qquad (6.36)$$
#
# In bfloat16 the weights and AdamW's moments stay in float32 and the forward runs under
# `torch.autocast`. (FSDP2 can instead gather the weights in bfloat16 with
# `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`, halving the
# all-gather bytes; autocast keeps one mechanism for every layout.)

# %%
#| export lrn_lib.train
def context_parallel_api() -> Callable:
    """torch.distributed.tensor.experimental.context_parallel, or a clear error where this torch lacks it."""
    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as missing:
        raise RuntimeError(f"this torch ({torch.__version__}) has no context_parallel; use --cp 1") from missing
    return context_parallel


class Trainer:
    """One rank's part of the training job: its pipeline stage of the Llama, sharded by TP and FSDP2, its
    AdamW, and (with pp > 1) its pipeline schedule. Every rank builds the full model from --seed first,
    so all parallel layouts start from the single-process weights."""

    def __init__(self, args: argparse.Namespace, mesh: DeviceMesh):
        check_args(args)
        if not isinstance(mesh, DeviceMesh) or tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
            raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
        self.args, self.mesh = args, mesh
        self.coord = {name: mesh[name].get_local_rank() for name in MESH_DIM_NAMES}
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.dtype = DTYPES[args.dtype]
        self.param_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        torch.manual_seed(args.seed)
        model = Llama(model_config(args)).to(self.param_dtype)
        k = self.coord["pp"]
        stage = LlamaStage(model, partition_layers(args.layers, args.pp)[k], first=k == 0, last=k == args.pp - 1)
        stage = stage.to(self.device)
        for block in stage.layers.values():
            block.attention.attend = sdpa_attention
        self.stage = shard_stage(stage, mesh)
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=args.lr, foreach=False)
        self.schedule = None
        if args.pp > 1:
            pipe = PipelineStage(self.stage, self.coord["pp"], args.pp, self.device, group=mesh["pp"].get_group())
            kind = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
            self.schedule = kind(pipe, n_microbatches=args.microbatches, loss_fn=lm_loss)
        self.data = stdlib_corpus()

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the step's global batch: (inputs, targets), each (batch / dp, seq); ranks with
        the same dp coordinate get the same rows."""
        inputs, targets = global_batch(self.data, step, self.args.batch, self.args.seq, self.args.seed)
        share = self.args.batch // self.args.dp
        rows = slice(self.coord["dp"] * share, (self.coord["dp"] + 1) * share)
        return inputs[rows].to(self.device), targets[rows].to(self.device)

    def forward_backward(self, step: int) -> float:
        """Run the forward and backward passes of one step; the gradients are left in the parameters.
        Returns the step's loss, the mean over all batch * seq tokens of the job (on every rank)."""
        inputs, targets = self.local_batch(step)
        positions = torch.arange(self.args.seq, device=self.device)
        loss = None
        with ExitStack() as scope:
            if self.args.cp > 1:                       # shards the three buffers along the sequence, in place
                scope.enter_context(context_parallel_api()(
                    self.mesh["cp"], buffers=[inputs, targets, positions], buffer_seq_dims=[1, 1, 0],
                    no_restore_buffers={inputs, targets, positions}))
            if self.dtype != self.param_dtype:
                scope.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            self.stage.positions = positions
            if self.schedule is None:
                loss = lm_loss(self.stage(inputs), targets)
                loss.backward()
            else:
                losses: list[torch.Tensor] = []
                if self.stage.first:
                    self.schedule.step(inputs, target=targets, losses=losses)
                else:
                    self.schedule.step(target=targets, losses=losses)
                if self.stage.last:                    # the unscaled l_j; the grads were divided by m, (6.35)
                    loss = torch.stack(losses).mean()
        return self.job_loss(loss)

    def job_loss(self, loss: torch.Tensor | None) -> float:
        """Average the last stage's per-rank losses over dp and cp (one TP rank each) into the job's loss."""
        share = torch.zeros((), dtype=torch.float64, device=self.device)
        if loss is not None and self.coord["tp"] == 0:
            share += loss.detach().double() / (self.args.dp * self.args.cp)     # (6.36)
        dist.all_reduce(share)
        return share.item()

    def step(self, step: int) -> float:
        """One optimizer step on batch number `step`; returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(step)
        self.optimizer.step()
        return loss

    def layout(self, name: str) -> str:
        """How parameter `name` lives on this rank: its mesh dimensions, placements, local and global shape."""
        params = dict(self.stage.named_parameters())
        if name not in params:
            raise ValueError(f"name {name!r} is not a parameter of this rank's stage")
        p = params[name]
        if not isinstance(p, DTensor):
            return f"plain tensor {tuple(p.shape)}, whole on this rank"
        dims = p.device_mesh.mesh_dim_names
        placements = ", ".join(f"{dim}: {placement!r}" for dim, placement in zip(dims, p.placements))
        return f"{placements}; local {tuple(p.to_local().shape)} of {tuple(p.shape)}"

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every gradient of this rank's stage, gathered to full size (a collective over the stage's dp, cp
        and tp ranks), on the CPU, keyed by the Llama's parameter name."""
        grads = {}
        for name, p in self.stage.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = g.detach().cpu()
        return grads

# %% [markdown]
# ### The check against the single-process run
#
# `reference_run` trains the plain `Llama` (chapter 4's attention, not SDPA) on the whole
# global batch in one process; `check_worker` trains through the engine on each spawned rank,
# gathers every gradient of the first step to full size (`DTensor.full_tensor()`), and
# compares both.

# %%
#| export lrn_lib.train
def reference_run(args: argparse.Namespace) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process run the parallel ones must reproduce: a plain Llama (chapter 4's attention),
    lm_loss over the whole global batch and AdamW, on the CPU. Returns the per-step losses and the
    gradients of step 0, keyed by parameter name."""
    check_args(args)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    torch.manual_seed(args.seed)
    model = Llama(model_config(args)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=False)
    data, losses, first_grads = stdlib_corpus(), [], {}
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        inputs, targets = global_batch(data, step, args.batch, args.seq, args.seed)
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def check_worker(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """lrn_lib.mesh.spawn worker: for each command line in runs (each for `world` ranks), train with the
    engine and compare with reference_run, which every rank computes itself.

    Returns one dict per run: {'losses': the job's per-step losses, 'loss_err': max |loss - reference|,
    'grad_err': max |gradient - reference| over this rank's parameters at step 0, 'n_params': their count,
    'groups': {dim: ranks of this rank's group along dim}, 'layout': {parameter name: Trainer.layout}}."""
    check_rank(rank, world)
    for argv in validate.nonempty(runs, "runs"):
        _check_argv(argv, "runs")
    results = []
    for argv in runs:
        args = parse_args(argv)
        trainer = Trainer(args, build_mesh(args))
        reference_losses, reference_grads = reference_run(args)
        trainer.optimizer.zero_grad(set_to_none=True)
        losses = [trainer.forward_backward(0)]
        grads = trainer.full_gradients()
        grad_err = max((grads[name] - reference_grads[name]).abs().max().item() for name in grads)
        trainer.optimizer.step()
        losses += [trainer.step(step) for step in range(1, args.steps)]
        loss_err = max(abs(a - b) for a, b in zip(losses, reference_losses))
        results.append({"losses": losses, "loss_err": loss_err, "grad_err": grad_err, "n_params": len(grads),
                        "groups": {dim: trainer.mesh[dim].mesh.tolist() for dim in MESH_DIM_NAMES},
                        "layout": {name: trainer.layout(name) for name in grads}})
    return results

# %% [markdown]
# ### The command line and `torchrun`
#
# `torchrun --nproc-per-node W -m lrn_lib.train ...` starts $W$ processes and gives each the
# environment variables `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`;
# `dist.init_process_group(backend)` reads them. On GPUs each process first selects its GPU
# (`torch.cuda.set_device(LOCAL_RANK)`) and the backend is NCCL; on CPUs it is gloo, and
# torchrun sets `OMP_NUM_THREADS=1` (where it is unset) so that the processes do not fight over
# the cores. Started
# without torchrun, the program makes its own world: one process, or on the CPU as many
# processes as the mesh needs, through section 6.4's `spawn`. One trap: torchrun parses the
# whole command line with Python's `argparse`, which accepts unambiguous abbreviations of its
# own flags, and it rejects a script flag such as `--log`, which could abbreviate its `--log-dir`
# (or its `--logs-specs`). Hence `--log-file`.

# %%
#| export lrn_lib.train
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m lrn_lib.train`, with their defaults and help texts."""
    p = argparse.ArgumentParser(prog="python -m lrn_lib.train",
                                description="Train a small Llama 3 on the standard library's bytes with "
                                            "PyTorch's TP (DTensor), CP, PP (pipelining) and FSDP2.")
    for flag, default, text in (("--tp", 1, "tensor-parallel degree"), ("--cp", 1, "context-parallel degree (CUDA)"),
                                ("--pp", 1, "pipeline stages"), ("--dp", 1, "data-parallel (FSDP2) degree"),
                                ("--microbatches", 0, "micro-batches per step with --pp > 1 (default: 2 * pp)"),
                                ("--steps", 10, "optimizer steps"), ("--seq", 128, "tokens per sequence"),
                                ("--batch", 8, "sequences per step, whole job"), ("--dim", 128, "model width"),
                                ("--layers", 4, "transformer blocks"), ("--heads", 4, "query heads"),
                                ("--kv-heads", 2, "key/value heads (GQA)"),
                                ("--ffn-dim", 0, "SwiGLU width (default ~8/3 dim)"),
                                ("--seed", 0, "seed of the weights and the batches")):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU); float64 for exactness checks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe", help="pipeline schedule")
    p.add_argument("--log-file", type=Path, default=None,
                   help="write the per-step loss and tokens/s here as JSON "
                        "(not --log: torchrun would take it for its --log-dir)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m lrn_lib.train` / `torchrun ... -m lrn_lib.train`, checked.

    Raises ValueError naming the flag when the sizes do not fit together (a head count that TP
    cannot split, a batch that DP or the micro-batches cannot split, CP on a CPU, ...), when
    --device cuda finds no GPU, or when --log-file could not be written."""
    _check_argv(argv)
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.microbatches == 0:
        args.microbatches = 2 * args.pp if args.pp > 1 else 1
    if args.ffn_dim == 0:
        args.ffn_dim = 32 * math.ceil(8 * args.dim / 3 / 32)
    check_args(args)
    return args


def _check_argv(argv: list[str] | None, name: str = "argv") -> None:
    """Raise TypeError unless argv is None or a list (or tuple) of strings, as sys.argv[1:] is."""
    if argv is not None and not (isinstance(argv, (list, tuple)) and all(isinstance(a, str) for a in argv)):
        raise TypeError(f"{name} must be a list of command-line strings such as ['--tp', '2'], got {argv!r}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag if the parallel degrees and the model or batch sizes disagree."""
    if not isinstance(args, argparse.Namespace):
        raise TypeError(f"args must be an argparse.Namespace from parse_args, got {type(args).__name__}")
    missing = sorted(set(vars(build_parser().parse_args([]))) - set(vars(args)))
    if missing:
        raise ValueError(f"args lacks the flags {missing}: build it with parse_args")
    for name in ("tp", "cp", "pp", "dp", "microbatches", "steps", "seq", "batch", "dim", "layers", "heads",
                 "kv_heads", "ffn_dim"):
        validate.integer(getattr(args, name), f"--{name.replace('_', '-')}", low=1)
    validate.choice(args.device, "--device", ("cpu", "cuda"))
    validate.choice(args.dtype, "--dtype", sorted(DTYPES))
    validate.choice(args.schedule, "--schedule", ("gpipe", "1f1b"))
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        raise ValueError(f"--dim {args.dim} must be --heads {args.heads} times an even head size")
    if args.heads % args.kv_heads:
        raise ValueError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.heads % args.tp or args.kv_heads % args.tp:
        raise ValueError(f"--tp {args.tp} must divide --heads {args.heads} and --kv-heads {args.kv_heads}: "
                         "each TP rank keeps whole heads")
    if args.layers < args.pp:
        raise ValueError(f"--layers {args.layers} is fewer than --pp {args.pp} stages")
    if args.batch % args.dp:
        raise ValueError(f"--dp {args.dp} must divide --batch {args.batch}")
    if args.pp > 1 and (args.batch // args.dp) % args.microbatches:
        raise ValueError(f"--microbatches {args.microbatches} must divide the batch of one DP rank, "
                         f"{args.batch // args.dp}")
    if args.pp == 1 and args.microbatches != 1:
        raise ValueError("--microbatches is for pipeline parallelism: use it with --pp > 1")
    if args.cp > 1 and args.device != "cuda":
        raise ValueError("--cp > 1 needs CUDA: torch's context_parallel rewrites the CUDA flash/efficient "
                         "attention kernels of scaled_dot_product_attention and has no CPU path. On the CPU, "
                         "section 6.6's from-scratch ring attention (lrn_lib.context_parallel) shows context "
                         "parallelism.")
    if args.cp > 1 and args.seq % (2 * args.cp):
        raise ValueError(f"--seq {args.seq} must be a multiple of 2 * --cp = {2 * args.cp} (load-balanced shards)")
    validate.number(args.lr, "--lr", low=0, low_open=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch finds no CUDA GPU (a CPU-only torch, or no visible device)")
    world = args.tp * args.cp * args.pp * args.dp
    if args.device == "cuda" and world > 1 and "RANK" not in os.environ:
        raise ValueError(f"{world} GPU ranks need a launcher: torchrun --nproc-per-node {world} -m lrn_lib.train ...")
    if args.log_file is not None and not args.log_file.resolve().parent.is_dir():
        raise ValueError(f"--log-file {args.log_file}: its folder {args.log_file.resolve().parent} does not exist")


def model_config(args: argparse.Namespace) -> LlamaConfig:
    """The LlamaConfig the flags describe: byte vocabulary (256), max_seq_len = --seq."""
    check_args(args)
    return tiny_config(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       ffn_dim=args.ffn_dim, max_seq_len=args.seq)

# %%
#| export lrn_lib.train
def train(args: argparse.Namespace) -> list[dict]:
    """Train for --steps steps in an initialized process group; rank 0 prints each step's loss and
    tokens/s and writes --log-file (the flags, the world size, rank 0's parameter layouts, the largest
    peak GPU memory of any rank on CUDA, and the records). Returns the per-step records
    [{'step', 'loss', 'tokens_per_s'}]."""
    check_args(args)
    trainer = Trainer(args, build_mesh(args))
    records, tokens = [], args.batch * args.seq
    for step in range(args.steps):
        start = time.perf_counter()
        loss = trainer.step(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        rate = tokens / (time.perf_counter() - start)
        records.append({"step": step, "loss": loss, "tokens_per_s": rate})
        if dist.get_rank() == 0:
            print(f"step {step:3d}  loss {loss:.6f}  tokens/s {rate:,.0f}", flush=True)
    peak = torch.zeros((), dtype=torch.int64, device=trainer.device)
    if trainer.device.type == "cuda":
        peak += torch.cuda.max_memory_allocated(trainer.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0 and args.log_file is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        layout = {name: trainer.layout(name) for name, _ in trainer.stage.named_parameters()}
        args.log_file.write_text(json.dumps({"args": settings, "world": dist.get_world_size(), "rank0_layout": layout,
                                             "peak_memory_bytes": peak.item(), "steps": records}, indent=1))
    return records


def train_worker(rank: int, world: int, argv: list[str]) -> list[dict]:
    """lrn_lib.mesh.spawn worker: train(parse_args(argv)) on one rank of a gloo world."""
    check_rank(rank, world)
    return train(parse_args(argv))


def main(argv: list[str] | None = None) -> list[dict]:
    """Entry point of `python -m lrn_lib.train` and `torchrun --nproc-per-node W -m lrn_lib.train`.

    Under torchrun (RANK set) it joins the launched job (NCCL on GPUs, gloo on CPUs); alone with a
    world of one it starts its own; alone on the CPU with a larger world it spawns the ranks itself.
    Returns the per-step records."""
    _check_argv(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as err:                           # one `error:` line and exit code 2, before any work
        build_parser().error(str(err))
    world = args.tp * args.cp * args.pp * args.dp
    backend = "nccl" if args.device == "cuda" else "gloo"
    if dist.is_initialized():
        return train(args)
    launched = "RANK" in os.environ                    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    if not launched and world > 1:                     # on the CPU: check_args refuses CUDA without torchrun
        return spawn(train_worker, world, argv)[0]
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if launched:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and __package__ == "lrn_lib":     # `python -m lrn_lib.train`, not this notebook
    main()

# %% [markdown]
# ### Checking the engine
#
# First the two-process layouts, in float64, three steps each: TP over 2 ranks, FSDP over 2
# ranks, and a 2-stage pipeline run by GPipe with 4 micro-batches (the default, $2p$) and by
# 1F1B with 2.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

from lrn_lib.mesh import spawn
from lrn_lib.train import check_worker, parse_args, reference_run

TINY = "--device cpu --dtype float64 --steps 3 --dim 32 --layers 2 --heads 4 --kv-heads 2 --seq 16 --batch 8".split()
layouts = {"TP=2": ["--tp", "2"], "DP=2 (FSDP2)": ["--dp", "2"], "PP=2, GPipe, m=4": ["--pp", "2"],
           "PP=2, 1F1B, m=2": ["--pp", "2", "--schedule", "1f1b", "--microbatches", "2"]}
results = spawn(check_worker, 2, [TINY + flags for flags in layouts.values()])
for i, name in enumerate(layouts):
    loss_err = max(rank[i]["loss_err"] for rank in results)
    grad_err = max(rank[i]["grad_err"] for rank in results)
    print(f"{name:18s} losses {[round(x, 6) for x in results[0][i]['losses']]}  "
          f"loss and every gradient within 1e-12 of one process: {loss_err < 1e-12 and grad_err < 1e-12}")

# %% [markdown]
# The same loss curve four times, equal to the single process's to float64 rounding. Here is how
# the engine stored one attention weight and one norm weight on rank 0 in each layout (a pipeline
# rank holds only its stage's parameters; rank 0 holds the first block):

# %%
for i, name in enumerate(list(layouts)[:3]):
    layout = results[0][i]["layout"]
    print(f"{name}:\n  wq   {layout['layers.0.attention.wq.weight']}\n  wo   {layout['layers.0.attention.wo.weight']}"
          f"\n  norm {layout['layers.0.attention_norm.weight']}")

# %% [markdown]
# Context parallelism refuses the CPU, with a pointer to where the CPU version lives:

# %%
try:
    parse_args(["--cp", "2", "--device", "cpu"])
except ValueError as refusal:
    print(refusal)

# %% [markdown]
# Now the launcher. The command lines, from a laptop to a server of 8 GPUs:
#
# ```bash
# python -m lrn_lib.train --steps 20                           # one process
# python -m lrn_lib.train --dp 2 --tp 2 --steps 20             # CPU: spawns 4 gloo processes itself
# torchrun --nproc-per-node 4 -m lrn_lib.train --dp 2 --tp 2   # the same through torchrun (gloo on CPU, NCCL on GPU)
# torchrun --nproc-per-node 8 -m lrn_lib.train --pp 2 --cp 2 --tp 2 \
#     --dim 1024 --layers 8 --heads 16 --kv-heads 8 --seq 4096 --batch 16 --log-file run.json
# ```
#
# Across servers, each server runs the same command with
# `--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB` in place of the
# single-server defaults, and torchrun assigns the ranks. We run the 2-D mesh (dp=2, tp=2) as
# four CPU processes under torchrun, in float64 (`python -m torch.distributed.run` is the
# `torchrun` program); each step's line shows the job's loss and its throughput.

# %%
# NBVAL_IGNORE_OUTPUT
log = Path("production_demo_log.json")
flags = TINY + ["--dp", "2", "--tp", "2"]
env = {**os.environ, "PYTHONPATH": str(Path.cwd().parent), "OMP_NUM_THREADS": "1"}
run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "lrn_lib.train",
                      *flags, "--log-file", str(log)], env=env, capture_output=True, text=True, timeout=300)
print("$ torchrun --nproc-per-node 4 -m lrn_lib.train", " ".join(flags))
print(run.stdout.strip() if run.returncode == 0 else run.stderr[-3000:])

# %%
record = json.loads(log.read_text())
log.unlink()
expected, _ = reference_run(parse_args(flags))
gap = max(abs(step["loss"] - e) for step, e in zip(record["steps"], expected))
print(f"{record['world']} torchrun processes, mesh dp=2 x tp=2; loss curve equal to the single process within 1e-12:",
      gap < 1e-12)
for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.0.attention_norm.weight"):
    print(f"rank 0, {name:30s} {record['rank0_layout'][name]}")

# %% [markdown]
# The torchrun job reproduces the one-process loss curve, and its log shows the 2-D layout:
# `wq` (32 x 32) is cut four ways, 8 rows per rank, by TP's `Shard(0)` and then FSDP's strided
# shard of each TP half; `wo` is `Shard(1)` under TP and FSDP cuts its rows; the norm weight
# is sharded by FSDP alone. `tests/test_train.py` also checks every gradient of the 2-D mesh
# and of a pipeline combined with FSDP, and the torchrun entry point with its JSON log.
#
# What this run leaves out of a production job such as torchtitan's: initializing the model on
# the `meta` device and materializing only each rank's shards (every rank here builds the full
# model first, which a 405B model does not allow), distributed checkpoints
# (`torch.distributed.checkpoint`), activation checkpointing, `torch.compile`, gradient
# clipping (whose norm must be reduced across the pipeline stages as well), sequence
# parallelism for the norms, float8 matrix products, and Llama 3's lighter first and last
# pipeline stages (`partition_layers(..., lighter_ends=True)` of section 6.7). The
# multi-GPU paths (NCCL, and `--cp > 1`, which needs CUDA) are covered by GPU tests in
# `tests/test_train.py`, run where a machine has two GPUs.
#
# ### On two GPUs
# We ran each layout of two GPUs against one GPU on a server with two NVIDIA H200s (torch
# 2.11, NCCL), through `benchmarks/train_layouts.py`, which launches `lrn_lib.train` once per
# layout and reads the JSON logs (numbers and command in the README and in
# `benchmarks/results/`). A model of width 512, 8 layers, 8 query and 2 key/value heads, 16
# sequences of 1,024 bytes per step, 40 steps of AdamW in float32:
#
# | layout | tokens/s | peak GiB per GPU | final loss | largest loss gap to 1 GPU |
# |---|---|---|---|---|
# | 1 GPU | 186,622 | 5.73 | 2.8272 | |
# | TP=2 | 97,259 | 3.79 | 2.8272 | 5.3e-05 |
# | CP=2 | 129,254 | 3.07 | 2.8272 | 5.4e-05 |
# | DP=2 (FSDP2) | 157,180 | 2.94 | 2.8272 | 6.1e-05 |
# | PP=2 (GPipe, m=4) | 205,493 | 2.97 | 2.8272 | 3.1e-05 |
#
# Every layout follows the one-GPU loss curve to within $6\cdot10^{-5}$ over all 40 steps:
# float32 rounding in a different order of summation, nothing more. Every layout also cuts the
# memory per GPU: CP, FSDP and the pipeline to about half, since at this size the activations
# dominate and each of them halves them (tokens, sequences, layers); TP less, since the
# residual stream, the norms and the gathered logits stay whole on both GPUs. Speed is
# another matter. A model this small gives each GPU too little work: TP pays two all-reduces
# per block on every step for matrix products that were already fast, and halves the GPU's
# throughput; CP and FSDP lose less; only the pipeline gains (its stages overlap, and each
# GPU's kernels are larger than TP's). In bfloat16 at width 2,048 (16 layers, 16/8 heads, 8
# sequences of 4,096 bytes, 20 steps), where one GPU needs 66.6 GiB, the picture turns: one
# GPU makes 63,219 tokens/s, TP=2 65,828 at 47.2 GiB, CP=2 80,574 at 35.6 GiB, FSDP 93,547 at
# 34.3 GiB and the pipeline 93,342 at 33.6 GiB. The bfloat16 loss curves no longer agree to
# many digits (the largest gap is 0.19, for TP, in the first chaotic steps; the final losses
# are 3.27 to 3.35), which is why the equality above is checked in float32. The layouts of
# eight GPUs (TP x CP x PP x DP together) need a server this book has not yet run on.

# %% [markdown]
# ## 6.11 Where the 405B model's bytes and messages go
#
# The previous sections built each parallel dimension on a handful of CPU processes and
# checked it against the single-process step. None of that tells us whether the real
# thing fits: 405.9 billion parameters, 16 million tokens per step, 16,384 H100 GPUs of
# 80 GB each. This section answers that question with arithmetic. For each of the three
# layouts that the Llama 3 paper (Grattafiori et al. 2024, arXiv:2407.21783) reports in
# its Table 4, we compute
#
# * how many bytes of weights, gradients, optimizer state and saved activations one GPU
#   holds, and whether they fit in an H100;
# * how many bytes one GPU sends per training step in each of the four dimensions (TP, CP,
#   PP, DP), and at what rate, given the step time implied by the paper's throughput.
#
# Every number comes from `lrn_lib.llama.LLAMA3_405B` and the functions below, not from
# the paper. The paper gives only the layouts and the throughput; the rest rests on
# assumptions, which we state as we go. Change an assumption and the table changes with
# it.
#
# ### The three published layouts
#
# Table 4 of the paper lists the layouts used to pre-train the 405B model:
#
# | GPUs | TP | CP | PP | DP | sequence | sequences per DP group | TFLOPs/GPU | BF16 MFU |
# |---|---|---|---|---|---|---|---|---|
# | 8,192 | 8 | 1 | 16 | 64 | 8,192 | 32 | 430 | 43% |
# | 16,384 | 8 | 1 | 16 | 128 | 8,192 | 16 | 400 | 41% |
# | 16,384 | 8 | 16 | 16 | 8 | 131,072 | 16 | 380 | 38% |
#
# Layout (a) ran early in pre-training, (b) after the cluster had doubled, and (c) during
# the long-context stage, when sequences grew to 128K tokens. Two more details come from the
# paper's description of its pipeline and of FSDP (Section 3.3.2):
#
# * The 126 layers sit on 16 pipeline stages, but the first and the last stage hold one
#   layer fewer (7 instead of 8). The first stage also holds the token embedding and the
#   last stage the output head and the loss, so both would otherwise run late and use more
#   memory than the others. A micro-batch is one sequence.
# * Gradients and optimizer state are sharded over the data-parallel group, as in ZeRO
#   stage 2 (Rajbhandari et al. 2019, arXiv:1910.02054). The bf16 weights are gathered once
#   per step and *not* resharded after the forward pass. So during the step every GPU
#   holds all the bf16 weights of its TP and PP slice.
#
# The first check is the token arithmetic. A step processes $dp$ data-parallel replicas,
# each with $B$ sequences of $T$ tokens:
#
# $$\text{tokens per step} = dp \cdot B \cdot T \qquad (6.37)$$
#
# All three layouts give $2^{24} = 16{,}777{,}216$ tokens per step. This is the paper's
# "16M": the batch stays the same when the cluster doubles and when the context grows 16
# times, and that keeps the optimization recipe unchanged. Doubling the GPUs halves the
# sequences per DP group, from 32 to 16. Growing the sequence 16 times takes GPUs away from DP
# (128 to 8) and gives them to CP (1 to 16), so that each GPU still processes
# $T/cp = 8{,}192$ tokens of every sequence.

# %%
#| export lrn_lib.accounting
from dataclasses import dataclass

from lrn_lib import validate
from lrn_lib.llama import LlamaConfig, check_config, parameter_count, training_flops

GiB = 2 ** 30                 # memory is counted in binary gigabytes
GB = 10 ** 9                  # traffic in decimal gigabytes, the unit of link bandwidths
WEIGHT_BYTES = 2              # bf16 weights, kept whole during the step
GRAD_BYTES = 4                # fp32 gradient accumulation, sharded over the dp * cp ranks sharing the weights
OPTIMIZER_BYTES = 12          # fp32 master weights + Adam's m and v, sharded the same way
ACTIVATION_BYTES = 2          # bf16 activations, and bf16 messages between GPUs
LOGIT_BYTES = 4               # fp32 logits for the cross-entropy


@dataclass(frozen=True)
class Layout:
    """How one training step is spread over tp * cp * pp * dp GPUs.

    dp replicas each process batch_per_dp sequences of seq_len tokens per step, in
    micro-batches of micro_batch sequences; each sequence is split over cp GPUs.
    """

    tp: int
    cp: int
    pp: int
    dp: int
    seq_len: int
    batch_per_dp: int
    micro_batch: int = 1

    def __post_init__(self):
        for name in ("tp", "cp", "pp", "dp", "seq_len", "batch_per_dp", "micro_batch"):
            validate.integer(getattr(self, name), name, low=1)
        if self.batch_per_dp % self.micro_batch:
            raise ValueError(f"micro_batch={self.micro_batch} does not divide batch_per_dp={self.batch_per_dp}")
        if self.seq_len % self.cp:
            raise ValueError(f"cp={self.cp} does not divide seq_len={self.seq_len}")

    @property
    def gpus(self) -> int:
        """Number of GPUs the layout uses."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over the whole job."""
        return self.dp * self.batch_per_dp * self.seq_len                          # (6.37)

    @property
    def micro_batches(self) -> int:
        """Micro-batches each pipeline runs per step."""
        return self.batch_per_dp // self.micro_batch

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens of one micro-batch that one CP rank holds (before any TP sharding)."""
        return self.micro_batch * self.seq_len // self.cp


@dataclass(frozen=True)
class PublishedRun:
    """A row of Table 4 of the Llama 3 paper: GPU count, layout and measured throughput."""

    name: str
    gpus: int
    layout: Layout
    tflops_per_gpu: float
    mfu: float

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        validate.integer(self.gpus, "gpus", low=1)
        if not isinstance(self.layout, Layout):
            raise TypeError(f"layout must be a Layout, got {type(self.layout).__name__}")
        validate.number(self.tflops_per_gpu, "tflops_per_gpu", low=0, low_open=True)
        validate.number(self.mfu, "mfu", low=0, low_open=True, high=1)


LLAMA3_TABLE4 = (
    PublishedRun("(a) 8K GPUs, 8K context", 8192,
                 Layout(tp=8, cp=1, pp=16, dp=64, seq_len=8192, batch_per_dp=32), 430.0, 0.43),
    PublishedRun("(b) 16K GPUs, 8K context", 16384,
                 Layout(tp=8, cp=1, pp=16, dp=128, seq_len=8192, batch_per_dp=16), 400.0, 0.41),
    PublishedRun("(c) 16K GPUs, 128K context", 16384,
                 Layout(tp=8, cp=16, pp=16, dp=8, seq_len=131072, batch_per_dp=16), 380.0, 0.38),
)

# %%
from lrn_lib.accounting import LLAMA3_TABLE4

for run in LLAMA3_TABLE4:
    lay = run.layout
    print(f"{run.name:28s} {lay.dp:>4d} x {lay.batch_per_dp:>2d} x {lay.seq_len:>7,d} = "
          f"{lay.tokens_per_step:,d} tokens; {lay.tp} x {lay.cp} x {lay.pp} x {lay.dp} = {lay.gpus:,d} GPUs")
print("every layout's GPU count matches Table 4:", all(r.layout.gpus == r.gpus for r in LLAMA3_TABLE4))
print("every step is 2**24 tokens:", all(r.layout.tokens_per_step == 2 ** 24 for r in LLAMA3_TABLE4))

# %% [markdown]
# ### Parameters on one GPU
#
# One GPU's slice of the model is decided by TP and PP, the two dimensions that split the
# weights. DP and CP replicate them. PP gives stage $s$ a run of $L_s$ consecutive layers. The Llama 3
# rule counts the embedding and the head as one layer each: with $\ell = (L + 2)/pp$,
#
# $$L_0 = L_{pp-1} = \ell - 1, \qquad L_s = \ell \text{ otherwise.} \qquad (6.38)$$
#
# For 126 layers on 16 stages, $\ell = 8$ and the split is $7 + 14 \times 8 + 7$, the same one
# section 6.7 uses. Here we require $L + 2$ to be a multiple of $pp$, because this section only
# counts layouts that divide exactly. TP then splits every matrix of a block $tp$ ways:
# $W_q, W_o$ ($d \times d$), $W_k, W_v$ ($d \times d_{kv}$, where $d_{kv}$ is the number of
# key/value heads times the head size), and the three SwiGLU matrices
# ($d \times d_{ff}$). The two RMSNorm gains ($2d$) are replicated. Both the embedding and the
# head are $V \times d$ matrices split over the vocabulary. Stage $s$ of a TP group then holds
#
# $$P_s = L_s\Big(\frac{2d^2 + 2 d\, d_{kv} + 3 d\, d_{ff}}{tp} + 2d\Big)
#        + [s = 0]\,\frac{Vd}{tp} + [s = pp-1]\Big(\frac{Vd}{tp} + d\Big) \qquad (6.39)$$
#
# parameters, where $[\cdot]$ is 1 when the condition holds. A layout must also divide the shapes: $tp$ must
# divide the number of query heads, the number of key/value heads (Llama 3's 8 KV heads allow $tp \le 8$, one
# KV head per GPU at $tp = 8$), $d_{ff}$ and the vocabulary.

# %%
#| export lrn_lib.accounting
def stage_layers(n_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage (pp,) under Llama 3's rule (6.38): the first and last stage hold one fewer.

    The embedding and the head count as one layer each, so (n_layers + 2) must be a
    multiple of pp; pp = 1 puts every layer on the one stage.
    """
    validate.integer(n_layers, "n_layers", low=1)
    validate.integer(pp, "pp", low=1)
    if pp == 1:
        return [n_layers]
    per_stage, rest = divmod(n_layers + 2, pp)
    if rest or per_stage < 2:
        raise ValueError(f"pp={pp} stages cannot hold n_layers={n_layers} as (n_layers + 2) / pp layers each, "
                         "less one at both ends")
    return [per_stage - 1] + [per_stage] * (pp - 2) + [per_stage - 1]                # (6.38)


def check_layout(cfg: LlamaConfig, layout: Layout) -> None:
    """Raise ValueError unless the layout splits cfg's heads, widths, vocabulary, tokens and layers evenly."""
    check_config(cfg)
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout, got {type(layout).__name__}")
    if cfg.n_experts:
        raise ValueError(f"cfg.n_experts={cfg.n_experts}: this accounting covers dense models only")
    for name, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                       ("vocab_size", cfg.vocab_size), ("micro-batch tokens per CP rank", layout.micro_batch_tokens)):
        if size % layout.tp:
            raise ValueError(f"tp={layout.tp} does not divide {name}={size}")
    stage_layers(cfg.n_layers, layout.pp)


def block_matrix_parameters(cfg: LlamaConfig) -> int:
    """Parameters in one block's seven weight matrices (Wq, Wk, Wv, Wo, W1, W2, W3), the part TP splits."""
    check_config(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_dim


def params_per_gpu(cfg: LlamaConfig, layout: Layout, stage: int) -> int:
    """Parameters one GPU of pipeline stage `stage` holds (6.39): its layers' TP shards, replicated norm
    gains, and the TP shard of the embedding (first stage) or of the final norm and head (last stage)."""
    check_layout(cfg, layout)
    validate.integer(stage, "stage", low=0, high=layout.pp - 1)
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    embedding = cfg.vocab_size * cfg.dim // layout.tp
    count = layers * (block_matrix_parameters(cfg) // layout.tp + 2 * cfg.dim)       # (6.39)
    if stage == 0:
        count += embedding
    if stage == layout.pp - 1:
        count += embedding + cfg.dim
    return count


# %%
from lrn_lib.accounting import Layout, params_per_gpu, stage_layers
from lrn_lib.llama import LLAMA3_405B, parameter_count

lay_a = LLAMA3_TABLE4[0].layout
layers = stage_layers(LLAMA3_405B.n_layers, lay_a.pp)
print("layers per stage:", layers, "sum", sum(layers))
per_stage = [params_per_gpu(LLAMA3_405B, lay_a, s) for s in range(lay_a.pp)]
for s in (0, 1, 15):
    print(f"stage {s:2d}: {layers[s]} layers, {per_stage[s] / 1e9:.3f}B parameters per GPU")
untiled = [params_per_gpu(LLAMA3_405B, Layout(tp=1, cp=1, pp=16, dp=1, seq_len=8192, batch_per_dp=16), s)
           for s in range(16)]
print("the 16 stages at tp=1 hold parameter_count(LLAMA3_405B):", sum(untiled) == parameter_count(LLAMA3_405B))

# %% [markdown]
# A middle stage holds the most weights: 8 blocks of 3.19B parameters each, split 8 ways,
# about 3.19B parameters per GPU. The first stage swaps one block for the
# $128{,}256 \times 16{,}384$ embedding (2.10B parameters), so it holds a little less. As a
# check, the sixteen stages at $tp = 1$ add up to `parameter_count`.
#
# ### Memory per GPU
#
# **Model state.** With the byte sizes stated at the top of the module (bf16 weights,
# fp32 gradients, fp32 master weights plus Adam's two moments), a GPU with $P$ parameters
# holds
#
# $$M_{\text{state}} = 2P + 4P + \frac{12P}{dp \cdot cp} \qquad (6.40)$$
#
# bytes. The optimizer state is sharded over the group of $dp \cdot cp$ ranks, not just $dp$:
# the $cp$ ranks of a CP group hold the same weights and see different tokens, so for the
# weights they behave like more data-parallel replicas; Megatron-LM and TorchTitan shard
# over both. The gradient is *not* sharded in this model, and that follows from how we
# count DP's messages below (6.48): one reduce-scatter per step, after the gradients of all
# $m$ micro-batches have been accumulated in fp32. Until that reduce-scatter, every GPU
# accumulates the full fp32 gradient of its own TP/PP slice, $4P$ bytes. The alternative,
# a reduce-scatter after every micro-batch (FSDP's default), would shard the gradient to
# $4P/(dp \cdot cp)$ but multiply DP's gradient traffic by $m = 16$. Without any sharding,
# the 16 bytes per parameter would be $16 \times 3.19 \text{B} = 51$ GB per GPU before a
# single activation; with ours, the optimizer state drops to under a GiB and the fp32
# gradient buffer (about 12 GiB) becomes the largest part of the model state, twice the
# bf16 weights.
#
# **Activations.** The backward pass needs tensors that the forward pass computed. For one
# token in one layer of `lrn_lib.llama.TransformerBlock`, we count the tensors a fused
# implementation keeps: the input of every matmul, the norms' inputs, the attention's
# q, k, v and output, and the SwiGLU intermediates. We list them below. Per token they add
# up to
#
# $$a = 6d + 2 d_{kv} + 3 d_{ff} \text{ elements} \qquad (6.41)$$
#
# For the 405B model that is 260,096 elements, or 508 KiB in bf16. Per-token scalars, such as
# RMSNorm's $1/\mathrm{rms}$ and attention's log-sum-exp (128 values), add about 0.1% and are left out.
# FlashAttention (chapter 4) keeps no $T \times T$ matrix. Our CPU reference saves more,
# for example the float32 temporaries of the norm, but production kernels keep close to
# this list. TP splits the matmul tensors over heads and $d_{ff}$. With sequence
# parallelism (Korthikanti et al. 2022, arXiv:2205.05198) it also splits the norms' tensors
# over tokens, so every entry is divided by $tp$.
#
# How many micro-batches are in flight depends on the schedule. Under 1F1B (section 6.7),
# stage $s$ runs $pp - s$ forward passes before its first backward pass and then alternates.
# It therefore holds $\min(pp - s, m)$ micro-batches at its peak, where $m$ is the number of
# micro-batches per step: the first stage holds $pp$. (Llama 3 uses an interleaved variant
# that holds a little more; we count plain 1F1B.) With $t = T/cp$ tokens per micro-batch on
# a GPU, stage $s$ keeps
#
# $$M_{\text{act}} = \min(pp - s, m)\; L_s\; t \;\frac{2a}{tp}
#                   \;+\; \text{CP: } \min(pp - s, m)\; L_s\; (T - t)\frac{2 \cdot 2 d_{kv}}{tp} \qquad (6.42)$$
#
# bytes. The second term exists only with CP. Each rank all-gathers the keys and values of
# the other $cp - 1$ chunks of the sequence, and we assume that it keeps them for the
# backward pass rather than gathering them again. The last stage adds, for its one
# micro-batch in flight, the final norm's input and output ($2d$ in bf16) and the fp32
# logits that the cross-entropy needs ($V$ values, split by $tp$ over the vocabulary):
#
# $$M_{\text{head}} = t\,\frac{2 \cdot 2d + 4V}{tp} \qquad (6.43)$$
#
# This term is about the size of one more layer, another reason to give the last stage one
# block fewer. We ignore transient buffers, such as a layer's unsharded gradients before their
# reduce-scatter and the communication buffers. The CUDA context, NCCL and the allocator's
# fragmentation also take a few GiB that the arithmetic does not see.

# %%
#| export lrn_lib.accounting
def saved_activations(cfg: LlamaConfig) -> dict[str, int]:
    """Elements per token that one TransformerBlock keeps for its backward pass (6.41), before TP sharding.

    Keys name the tensors of lrn_lib.llama's block: matmul inputs, norm inputs, q/k/v after RoPE,
    the attention output and the SwiGLU intermediates (a fused implementation's list).
    """
    kv = check_config(cfg).n_kv_heads * cfg.head_dim
    return {
        "attention_norm input x": cfg.dim,
        "wq/wk/wv input norm(x)": cfg.dim,
        "q after RoPE": cfg.n_heads * cfg.head_dim,
        "k after RoPE": kv,
        "v": kv,
        "attention output (wo input)": cfg.dim,
        "ffn_norm input h": cfg.dim,
        "w1/w3 input norm(h)": cfg.dim,
        "w1 output (gate, before SiLU)": cfg.ffn_dim,
        "w3 output (up)": cfg.ffn_dim,
        "w2 input silu(gate) * up": cfg.ffn_dim,
    }


def memory_per_gpu(cfg: LlamaConfig, layout: Layout, stage: int) -> dict[str, float]:
    """GiB one GPU of pipeline stage `stage` holds at its peak under 1F1B, by part.

    Keys: weights (bf16, whole), gradients (fp32, whole: accumulated over the step's micro-batches
    before the one reduce-scatter of (6.48)), optimizer (fp32 master + Adam m, v, sharded over
    dp * cp) (6.40); activations (6.42, 6.43); total.
    """
    params = params_per_gpu(cfg, layout, stage)
    shards = layout.dp * layout.cp
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    in_flight = min(layout.pp - stage, layout.micro_batches)
    t = layout.micro_batch_tokens
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = t * ACTIVATION_BYTES * sum(saved_activations(cfg).values()) / layout.tp            # (6.42)
    gathered_kv = layout.micro_batch * (layout.seq_len - layout.seq_len // layout.cp) * 2 * kv / layout.tp
    per_layer += gathered_kv * ACTIVATION_BYTES
    activations = in_flight * layers * per_layer
    if stage == layout.pp - 1:
        activations += t * (ACTIVATION_BYTES * 2 * cfg.dim + LOGIT_BYTES * cfg.vocab_size) / layout.tp  # (6.43)
    parts = {
        "weights": WEIGHT_BYTES * params,                                                          # (6.40)
        "gradients": GRAD_BYTES * params,
        "optimizer": OPTIMIZER_BYTES * params / shards,
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    return {name: size / GiB for name, size in parts.items()}


def busiest_stage(cfg: LlamaConfig, layout: Layout) -> int:
    """The pipeline stage whose GPUs need the most memory (the first such stage on a tie)."""
    check_layout(cfg, layout)
    totals = [memory_per_gpu(cfg, layout, s)["total"] for s in range(layout.pp)]
    return totals.index(max(totals))


# %%
from lrn_lib.accounting import ACTIVATION_BYTES, memory_per_gpu, saved_activations

saved = saved_activations(LLAMA3_405B)
for name, elements in saved.items():
    print(f"  {name:32s} {elements:>6,d}")
print(f"  {'total (6.41)':32s} {sum(saved.values()):>6,d} elements = "
      f"{ACTIVATION_BYTES * sum(saved.values()) / 1024:.0f} KiB per token per layer in bf16")

# %% [markdown]
# The list makes the balance visible. The three SwiGLU intermediates ($3 d_{ff} = 159{,}744$)
# take more than all the attention tensors together. Thanks to GQA, k and v are only
# $1{,}024$ each, a sixteenth of q. Next, the memory of every stage of the three layouts:

# %%
import matplotlib.pyplot as plt

parts = ("weights", "gradients", "optimizer", "activations")
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
for ax, run in zip(axes, LLAMA3_TABLE4):
    stages = range(run.layout.pp)
    mem = [memory_per_gpu(LLAMA3_405B, run.layout, s) for s in stages]
    bottom = [0.0] * run.layout.pp
    for part in parts:
        heights = [m[part] for m in mem]
        ax.bar(stages, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(80, color="black", linestyle="--", linewidth=1)
    ax.set_title(run.name, fontsize=10)
    ax.set_xlabel("pipeline stage")
axes[0].set_ylabel("GiB per GPU")
axes[-1].legend(loc="upper right", fontsize=8)
fig.suptitle("Memory per GPU at the 1F1B peak; dashed: an H100's 80 GiB")
plt.tight_layout()
plt.show()

# %% [markdown]
# Activations dominate every stage, at about 90% of the memory. The bars fall from left to
# right because under 1F1B stage $s$ holds $16 - s$ micro-batches. The weights are nearly
# flat: 8 layers on the middle stages, 7 layers plus the embedding or the head at the ends.
# So the tightest GPU is not the first stage but the second. It holds 15 micro-batches of 8
# layers, 120 layer-micro-batches, where the first stage holds $16 \times 7 = 112$. The
# short first stage of Llama 3 is what keeps stage 0 from being the worst. A plain split,
# which gives the first stages 8 layers, would put $16 \times 8 = 128$ layer-micro-batches
# plus the embedding on stage 0. Layout (c) has the same per-GPU token count as (a) and (b), $131{,}072/16 =
# 8{,}192$, so its extra memory is exactly the gathered keys and values of the other 15 CP
# chunks (second term of 6.42).
#
# ### Messages per step
#
# For the bytes a GPU sends, we use the costs of ring collectives over $n$ GPUs
# (Patarasuk and Yuan 2009). Let $S$ be the size of the whole tensor: the result of an
# all-gather, the input of a reduce-scatter or an all-reduce. Each GPU then sends
#
# $$\text{all-gather}, \text{reduce-scatter}: \frac{n-1}{n} S, \qquad
#   \text{all-reduce}: 2\,\frac{n-1}{n} S \qquad (6.44)$$
#
# bytes: an all-reduce is a reduce-scatter followed by an all-gather. With $t$ tokens per
# micro-batch on a GPU, $m$ micro-batches per step and $L_s$ layers on the stage, each
# dimension sends the following.
#
# * **TP** (section 6.5): per layer and micro-batch, one all-reduce of the $t \times d$
#   activations after the attention's $W_o$ and one after the FFN's $W_2$ in the forward pass,
#   and one each for the input gradients of $W_{q,k,v}$ and $W_{1,3}$ in the backward pass.
#   Sequence parallelism turns each all-reduce into an all-gather plus a reduce-scatter, with
#   the same bytes. To keep its $1/tp$ activation saving, Megatron-LM gathers the sharded
#   inputs again in the backward pass, which adds about 25%; we leave that out.
#   $$C_{TP} = L_s\, m \cdot 4 \cdot 2\frac{tp-1}{tp}\, 2td \qquad (6.45)$$
# * **CP** (section 6.6): per layer and micro-batch, an all-gather of the K and V chunks
#   (the whole gathered tensor has $T \cdot 2 d_{kv}/tp$ elements on each TP rank) in the
#   forward pass, and a reduce-scatter of their gradients in the backward pass:
#   $$C_{CP} = L_s\, m \cdot 2 \cdot \frac{cp-1}{cp}\, 2 T\,\frac{2 d_{kv}}{tp} \qquad (6.46)$$
# * **PP** (section 6.7): per micro-batch, the activations go forward to the next stage and
#   their gradient goes back to the previous one. Under sequence parallelism each TP rank holds
#   $t/tp$ of the tokens and sends only those:
#   $$C_{PP} = m\,\big([s > 0] + [s < pp-1]\big)\, \frac{2td}{tp} \qquad (6.47)$$
# * **DP** (section 6.8): once per step, an all-gather of the bf16 weights and a
#   reduce-scatter of the fp32 gradients over the $dp \cdot cp$ ranks that share the slice:
#   $$C_{DP} = \frac{n-1}{n}(2P + 4P), \quad n = dp \cdot cp \qquad (6.48)$$
#
# We leave out the small collectives of the vocabulary-parallel embedding and
# cross-entropy.

# %%
#| export lrn_lib.accounting
def all_gather_bytes(size: float, n: int) -> float:
    """Bytes each of n GPUs sends in a ring all-gather (or reduce-scatter) of a size-byte tensor (6.44)."""
    validate.number(size, "size", low=0)
    validate.integer(n, "n", low=1)
    return (n - 1) / n * size                                                     # (6.44)


def all_reduce_bytes(size: float, n: int) -> float:
    """Bytes each of n GPUs sends in a ring all-reduce of a size-byte tensor: reduce-scatter + all-gather (6.44)."""
    return 2 * all_gather_bytes(size, n)                                          # (6.44)


def communication_per_step(cfg: LlamaConfig, layout: Layout, stage: int) -> dict[str, float]:
    """GB (10**9 bytes) one GPU of pipeline stage `stage` sends per step in each dimension: keys tp, cp, pp, dp.

    tp (6.45): 4 all-reduces of (tokens, dim) bf16 per layer and micro-batch; cp (6.46): all-gather
    of K, V forward and reduce-scatter of their gradients backward; pp (6.47): activations forward and
    gradients backward per micro-batch and neighbour; dp (6.48): bf16 weight all-gather and fp32
    gradient reduce-scatter once per step over dp * cp.
    """
    params = params_per_gpu(cfg, layout, stage)
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    m, t = layout.micro_batches, layout.micro_batch_tokens
    kv = cfg.n_kv_heads * cfg.head_dim
    activation = t * cfg.dim * ACTIVATION_BYTES
    sequence_kv = layout.micro_batch * layout.seq_len * 2 * kv / layout.tp * ACTIVATION_BYTES
    neighbours = (stage > 0) + (stage < layout.pp - 1)
    shards = layout.dp * layout.cp
    sent = {
        "tp": layers * m * 4 * all_reduce_bytes(activation, layout.tp),                              # (6.45)
        "cp": layers * m * 2 * all_gather_bytes(sequence_kv, layout.cp),                             # (6.46)
        "pp": m * neighbours * activation / layout.tp,                                               # (6.47)
        "dp": all_gather_bytes(WEIGHT_BYTES * params, shards) + all_gather_bytes(GRAD_BYTES * params, shards),  # (6.48)
    }
    return {name: size / GB for name, size in sent.items()}


# %% [markdown]
# ### The table
#
# For each layout we show the busiest stage: memory in GiB and the GB it sends per step
# in each dimension. HBM is built in binary sizes, so an H100's "80 GB" are 80 GiB; that is
# the limit we compare against.

# %%
from lrn_lib.accounting import busiest_stage, communication_per_step

print(f"{'layout':28s} {'stage':>5s} | {'weights':>7s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'total':>6s} GiB"
      f" | {'TP':>6s} {'CP':>5s} {'PP':>5s} {'DP':>5s} GB sent per step")
rows = {}
for run in LLAMA3_TABLE4:
    s = busiest_stage(LLAMA3_405B, run.layout)
    mem = memory_per_gpu(LLAMA3_405B, run.layout, s)
    sent = communication_per_step(LLAMA3_405B, run.layout, s)
    rows[run.name] = (s, mem, sent)
    print(f"{run.name:28s} {s:>5d} | {mem['weights']:7.1f} {mem['gradients']:6.2f} {mem['optimizer']:6.2f} "
          f"{mem['activations']:6.1f} {mem['total']:6.1f}     | {sent['tp']:6.1f} {sent['cp']:5.1f} "
          f"{sent['pp']:5.2f} {sent['dp']:5.1f}")

# %%
H100_GIB = 80
for name, (_, mem, _) in rows.items():
    print(f"{name}: busiest GPU {mem['total']:.1f} GiB, fits in {H100_GIB} GiB: {mem['total'] < H100_GIB}")
print("TP sends the most bytes in every layout:",
      all(max(sent, key=sent.get) == "tp" for _, _, sent in rows.values()))

# %% [markdown]
# The busiest GPU of layout (a) needs about 78 GiB out of 80, and so does (b): on paper they
# fit, but the margin of about 2 GiB is less than the CUDA context, NCCL's buffers and the
# allocator's fragmentation usually take. Layout (b) uses twice the GPUs, and only the
# sharded optimizer part shrinks, because weights, gradient buffer and activations per GPU
# do not depend on $dp$. Layout (c) does *not* fit: the gathered keys and values cost about
# 7 GiB more, for 84.7 GiB. So the published runs must do something this model leaves out,
# and the accounting shows where the room can come from: a reduce-scatter of the gradients
# after every micro-batch would shrink the 12 GiB buffer to almost nothing at 16 times DP's
# gradient traffic; recomputing some activations in the backward pass (activation
# checkpointing) trades FLOPs for the largest part; and gathering the keys and values again
# in the backward pass instead of keeping them would save the 7 GiB of (c) at twice CP's
# forward traffic. The paper does not say which it uses.
#
# In traffic, the dimensions differ by orders of magnitude:
#
# * **TP** sends about 480 GB per step per GPU in (a). Every layer of every micro-batch
#   all-reduces its full activations four times, and these collectives sit on the critical
#   path: the next matmul waits for them. This is why TP stays inside the 8 GPUs of one
#   server, on NVLink.
# * **DP** sends about 19 GB per step, but only once per step, and the weight all-gather and
#   gradient reduce-scatter can overlap with compute. That is why it spans the slow,
#   cross-rack part of the network.
# * **PP** sends about 2 GB: one small tensor per micro-batch per boundary. It is cheap in
#   bytes but expensive in idle time (the bubble, section 6.7).
# * **CP** in (c) sends about 16 GB. GQA makes K and V only $2 d_{kv} = 2{,}048$ wide against
#   $d = 16{,}384$, so gathering a whole 128K-token sequence's keys and values costs less than
#   TP does for one 8K chunk.
#
# Figure 5 of the paper orders the dimensions [TP, CP, PP, DP] from innermost to outermost.
# That is *not* the ordering by bytes: by our table DP sends more than CP, and CP more than
# PP. The paper's reason is how well each dimension tolerates latency and hides behind
# compute: TP's collectives block the next matmul, so it gets NVLink; CP's all-gathers sit
# inside every attention layer; PP sends little, and only at stage boundaries; DP's
# traffic happens once per step and overlaps with compute, so it can cross the slowest
# links.
#
# ### Step time and MFU
#
# The paper reports throughput, not step time, so we derive the step time. A step trains
# on $D$ tokens with about $6N$ FLOPs per token (section 6.1: $2N$ forward, $4N$ backward). At
# the reported FLOP/s per GPU, a step takes
#
# $$t_{\text{step}} = \frac{D \cdot F}{\text{GPUs} \cdot \text{FLOP/s per GPU}}, \qquad
#   F = 6N \;\; \text{or} \;\; F = 6N + 6 L d T \qquad (6.49)$$
#
# seconds. The second $F$ adds the causal attention's own matmuls, $QK^\top$ and $AV$: per
# token and layer, $2 \cdot 2 d \cdot T/2$ FLOPs forward and twice that backward. These matmuls
# have no weights, so $6N$ does not count them. At 8K tokens they add 4%, at 128K they add 67%.
# The paper does not say which convention its TFLOPs use, so we show both. For MFU, the
# reported TFLOPs divided by the H100's dense BF16 peak of 989 TFLOPs should give the reported MFU.

# %%
#| export lrn_lib.accounting
def flops_per_token(cfg: LlamaConfig, seq_len: int, attention: bool = False) -> float:
    """Training FLOPs per token (6.49): 6N, plus the causal attention matmuls 6 * n_layers * dim * seq_len."""
    validate.integer(seq_len, "seq_len", low=1)
    if not isinstance(attention, bool):
        raise TypeError(f"attention must be a bool, got {type(attention).__name__}")
    flops = training_flops(parameter_count(cfg), 1)
    if attention:
        flops += 6 * cfg.n_layers * cfg.dim * seq_len                              # (6.49)
    return flops


def implied_step_seconds(cfg: LlamaConfig, run: PublishedRun, attention: bool = False) -> float:
    """Seconds per step implied by a published run's throughput (6.49): tokens * F / (GPUs * FLOP/s)."""
    check_config(cfg)
    if not isinstance(run, PublishedRun):
        raise TypeError(f"run must be a PublishedRun, got {type(run).__name__}")
    layout = run.layout
    flops = layout.tokens_per_step * flops_per_token(cfg, layout.seq_len, attention)
    return flops / (layout.gpus * run.tflops_per_gpu * 1e12)                      # (6.49)


# %%
from lrn_lib.accounting import implied_step_seconds

H100_BF16_TFLOPS = 989.0
print(f"{'layout':28s} {'step, 6N':>9s} {'+ attention':>12s} | {'TFLOPs / 989':>12s} {'reported MFU':>12s}")
for run in LLAMA3_TABLE4:
    print(f"{run.name:28s} {implied_step_seconds(LLAMA3_405B, run):8.1f}s "
          f"{implied_step_seconds(LLAMA3_405B, run, attention=True):11.1f}s | "
          f"{run.tflops_per_gpu / H100_BF16_TFLOPS:12.0%} {run.mfu:12.0%}")
print("TFLOPs / peak is within one point of the reported MFU:",
      all(abs(r.tflops_per_gpu / H100_BF16_TFLOPS - r.mfu) <= 0.01 for r in LLAMA3_TABLE4))

# %% [markdown]
# The reported MFUs are the reported TFLOPs over the peak, up to rounding. A step of layout (a)
# takes about 11.6 s counting $6N$ (12.1 s with the attention matmuls). Layout (b) has twice
# the GPUs at a slightly lower per-GPU rate, so its step is about half as long, 6.2 s (6.5 s).
# For (c), the two conventions disagree more: 6.6 s if the 380 TFLOPs count only $6N$, and
# 10.9 s if they include the attention matmuls. The second is the one that
# charges the 128K-token sequences for their quadratic attention, and it is the step time we use
# from here on.
#
# Dividing the bytes of the table by the step time gives the bandwidth each dimension needs on
# average. We compare it with the links of the paper's cluster: NVLink inside a server
# (H100: 450 GB/s each way) and one 400 Gb/s RoCE port (50 GB/s) per GPU across servers.
# Averages understate TP's cost, because its collectives block the next matmul and cannot hide
# behind compute. So for TP we also print the time its bytes take on each link, as a share of
# the step.

# %%
NVLINK_GBS, ROCE_GBS = 450.0, 50.0
print(f"{'layout':28s} {'step':>6s} | {'TP':>5s} {'CP':>5s} {'PP':>5s} {'DP':>5s} GB/s per GPU | "
      f"TP time on NVLink, on RoCE")
shares = {}
for run in LLAMA3_TABLE4:
    step = implied_step_seconds(LLAMA3_405B, run, attention=True)
    sent = rows[run.name][2]
    rate = {k: v / step for k, v in sent.items()}
    shares[run.name] = (rate, sent["tp"] / NVLINK_GBS / step, sent["tp"] / ROCE_GBS / step)
    print(f"{run.name:28s} {step:5.1f}s | " + " ".join(f"{rate[k]:5.1f}" for k in ("tp", "cp", "pp", "dp"))
          + f"              | {shares[run.name][1]:5.0%} {shares[run.name][2]:8.0%} of the step")

# %%
print("TP's bytes take under a tenth of the step on NVLink:", all(nv < 0.1 for _, nv, _ in shares.values()))
print("over RoCE they would take over 40% of it:", all(roce > 0.4 for _, _, roce in shares.values()))
print("CP, PP and DP together need under a tenth of a RoCE port:",
      all(r["cp"] + r["pp"] + r["dp"] < ROCE_GBS / 10 for r, _, _ in shares.values()))

# %% [markdown]
# On NVLink, TP's all-reduces cost a few percent up to a tenth of the step. Over the 50 GB/s
# network the same bytes would take most of the step in layouts (a) and (b), and nearly half
# of it in (c), during which the matmuls would wait. The outer three dimensions together need only a few
# GB/s across servers, and DP's share can hide behind compute. The 4D layout works because the
# one dimension that needs bandwidth stays on the one link that has it. In short:
#
# * **Memory is set by activations.** Under 1F1B, the first stages hold up to $pp$
#   micro-batches of $T/cp$ tokens. Weights and the fp32 gradient buffer stay whole per
#   TP/PP slice; DP sharding makes the optimizer state almost free. Layouts (a) and (b) fit
#   an H100 by about 2 GiB, layout (c) does not without one of the savings listed above.
# * **TP** dominates traffic and latency, so it stays inside the server.
# * **CP** buys long context with modest traffic thanks to GQA, but the gathered keys and
#   values cost memory.
# * **PP** is cheap in bytes and costs idle time.
# * **DP** sends the model state once per step, and that traffic can overlap with compute.

# %% [markdown]
# ## Summary
#
# * Llama 3 is a pre-norm decoder with RMSNorm, RoPE (with Llama 3.1's frequency scaling
#   for 128K context), grouped-query attention and SwiGLU; our implementation matches
#   Hugging Face `transformers` to float64 precision, and its KV cache changes the cost of
#   generation, not its result.
# * Every parallel dimension splits one training step across processes while computing the
#   same loss and gradients, and each was checked against the single-process step in
#   float64: tensor parallelism splits the matrices (two all-reduces per layer forward),
#   context parallelism the sequence (K/V passed round a ring or all-gathered, partial
#   results merged by their log-sum-exp), pipeline parallelism the layers (a bubble of
#   $(p-1)/(m+p-1)$ of the step), and data parallelism the batch (gradients summed; FSDP
#   also shards the weights, gradients and optimizer state and gathers weights just in time).
# * Loss scaling is where parallel training goes quietly wrong: every scheme has to
#   weight each token's loss by one over the global token count, whatever the split.
# * Composed on the $[TP, CP, PP, DP]$ mesh, all four still give the single-process step
#   exactly; PyTorch's own engine (DTensor, FSDP2, pipelining, context parallel) gives the
#   same numbers and scales the same code to many GPUs with `torchrun`.
# * Arithmetic on the published layouts shows why Llama 3 trains 405B parameters on 16K
#   GPUs the way it does: TP inside a server, where the bandwidth is, and the bytes of each
#   GPU kept under its 80 GB.
#
# Not measured here: runs on several GPUs. The multi-GPU checks of `lrn_lib.train`
# (`tests/test_train.py`, marked `gpu`) and the scaling runs wait for a machine with two or
# more GPUs.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("06.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("06")))` lists the checkers. Worked solutions:
# `chapters/solutions/06_llama3_parallelism_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): RoPE sees only distances.** Write the rotation (6.5) of one pair
# $(x_i, x_{i + d_h/2})$ at position $m$ as the $2 \times 2$ matrix $R(m\omega_i)$. Show that
# $R(a)^\top R(b) = R(b - a)$ and conclude that the score of a query at position $m$ and a key
# at position $n$, $\mathrm{RoPE}(q)_m \cdot \mathrm{RoPE}(k)_n$, depends on $m$ and $n$ only
# through $n - m$. Then give the permutation $\pi$ of $\{0, \dots, d_h - 1\}$ that turns Meta's
# adjacent pairs $(2i, 2i+1)$ into the rotate-half pairs $(i, i + d_h/2)$, and show that
# permuting the rows of $W_q$ and $W_k$ by $\pi$ leaves every attention score unchanged. Why
# must $W_v$ not be permuted?
#
# **Exercise 2 (implement): RMSNorm and RoPE.** (a) Write
# `rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor` for (6.2) over
# the last dimension of `x` $(\dots, d)$ with gain `weight` $(d,)$. Run
# `check("06.rms_norm", rms_norm)`. (b) Write
# `rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor` that rotates
# `x` $(B, H, T, d_h)$ by (6.5) in the rotate-half layout, token $j$ at the (int64) position
# `positions[j]`, with the unscaled frequencies (6.4). The positions need not start at 0 or be
# consecutive (context parallelism hands a rank two separate chunks). Run
# `check("06.rope", rope)`.
#
# **Exercise 3 (implement): cross-entropy from vocabulary shards.** Write
# `sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor`
# that returns the per-token losses $(N,)$ of (6.14). `shards[r]` $(N, V_r)$ holds the logits
# of rank $r$'s vocabulary slice, the slices consecutive from id 0 and of unequal sizes;
# `targets` $(N,)$ are global ids. Compute from each shard only what section 6.5 sends (per
# token: its maximum, then its sum of exponentials and its target logit, 0 when the target
# is not in the slice) and combine those numbers as the all-reduces would; never
# concatenate the shards. Logits can be large (the checker uses values near $\pm 10^3$).
# Run `check("06.sharded_cross_entropy", sharded_cross_entropy)`.
#
# **Exercise 4 (measure): the bubble of any schedule.** (a) Write
# `schedule_bubble(schedule: list[list[tuple[str, int]]], forward_time: int, backward_time: int) -> float`
# that runs a schedule (one list of actions `("F", i)` / `("B", i)` per stage, as
# `gpipe_schedule` returns) with instant messages and the dependencies of section 6.7, and
# returns the bubble (6.23). Each stage runs its actions in the listed order; the checker's
# schedules never deadlock, but their orders need not be GPipe's or 1F1B's. Run
# `check("06.schedule_bubble", schedule_bubble)`. (b) With your function, print the bubble of
# GPipe and 1F1B for $p = 4$ and $m = 4, 8, 16, 32$ next to (6.24), and the largest number of
# micro-batches whose activations stage 0 holds at once (`peak_in_flight`). Then give stage 0
# of GPipe its forwards in reverse order. Look for: both schedules follow (6.24) exactly, 1F1B
# holds $p$ micro-batches where GPipe holds $m$, and the reversed order makes the step longer.
