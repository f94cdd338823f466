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
# # Chapter 6. The Llama 3 model
#
# Llama 3 (Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783) is a
# plain decoder-only transformer. Its interest lies less in the architecture than in how it
# was trained: the 405B-parameter model was trained on up to 16K H100 GPUs, each step split
# four ways at once: tensor parallelism (TP) inside a server, context parallelism (CP) over
# the sequence, pipeline parallelism (PP) over the layers and data parallelism (DP, sharded
# as in FSDP) over the batch.
#
# This chapter builds the model itself (sections 6.1 to 6.3): the configuration and its
# parameter and FLOP counts, RMSNorm, rotary embeddings, grouped-query attention and SwiGLU,
# checked against Hugging Face `transformers`' implementation; generation with a KV cache;
# and a small training run. Section 6.4 writes the GPU kernels a generation step wants
# (flash-decoding: a few queries against a long cache), on top of chapter 4's. The next four chapters split its training step across processes:
# chapter 7 builds the process mesh and tensor parallelism, chapter 8 context parallelism,
# chapter 9 pipeline and data parallelism and all four at once, and chapter 10 runs the same
# model through PyTorch's own engine and accounts for where the 405B model's bytes go.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices, and the spawned processes share the cores

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
from lrn_lib.attention import check_attention_inputs, flash_attention, kernel_can_run
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
        validate.flag(self.tie_embeddings, "tie_embeddings")
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
    """Rotate x (B, H, T, hd) by (6.5), pairing coordinate i with i + hd/2; cos, sin (T, hd). The result keeps
    x's dtype, so bfloat16 q, k stay bfloat16 next to v when the tables are float32 (autocast training)."""
    validate.tensor(x, "x", dims=range(2, 8), kind="float")
    if x.shape[-1] % 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: its head dimension must be even to form rotation pairs")
    for name, t in (("cos", cos), ("sin", sin)):
        if validate.tensor(t, name, kind="float").shape != x.shape[-2:]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; x {tuple(x.shape)} needs {tuple(x.shape[-2:])}")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)                                     # (6.5)


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
# queries against all cached keys). On a GPU, a generation step against a long cache takes
# the split-key kernels of section 6.4 instead. The way $q$, $k$, $v$ meet is a replaceable attribute,
# `attend`: chapter 8 swaps in ring attention there. A model that needs another pattern than
# causal for one call (padding, a local window, a prompt's blocks) passes a boolean `mask`
# through `forward` instead; `sdpa_attention` then runs PyTorch's fused attention with it,
# and without a mask it is the causal path the later chapters use on CPU. Heads are found from the tensor's
# width (`view(B, T, -1, hd)`), so a projection that holds only some heads (tensor
# parallelism, section 7.2) works unchanged.
#
# Llama 3 itself is dense. With `n_experts > 0` the block swaps its SwiGLU for chapter 5's
# `MoELayer`, whose experts are two-matrix GELU FFNs. That makes a small MoE variant for
# experiments, not a Mixtral or Llama 4 model: their experts are SwiGLU FFNs (three
# matrices each), so neither their shapes nor their parameter counts match this variant's.

# %%
#| export lrn_lib.llama
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention: q (B, H, T, hd), k, v (B, Hkv, S, hd) -> (B, H, T, hd). A decoding step on a GPU
    (kernels.flash_decoding.is_decoding_step) runs flash_decode of section 6.4, any other call flash_attention."""
    from kernels.flash_decoding import flash_decode, is_decoding_step   # section 6.4

    if kernel_can_run(q) and is_decoding_step(q, k, v):
        return flash_decode(q, k, v, causal=True)[0]
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
# $0, \dots, T-1$; context parallelism (chapter 8) passes each shard's global positions, and
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
# The name mapping lives in the library (`lrn_lib.llama_transformers`), so that a reader
# can also load real weights saved by `transformers` (its `state_dict()`, or the tensors of
# a `model.safetensors` file) into our model. Meta's own checkpoints already use our names, but pair RoPE's coordinates the
# other way (section 6.1): their `wq` and `wk` rows need the permutation that `transformers`'
# conversion script applies before they load.

# %%
#| export lrn_lib.llama_transformers
"""Loading Hugging Face `transformers` Llama weights into lrn_lib.llama.Llama: the parameter name mapping and
a state-dict loader."""
import torch

from lrn_lib import llama, validate   # the module, not its names: the notebook keeps its own Llama

TRANSFORMERS_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
                      "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                      "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                      "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                      "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                      "feed_forward.w2": "mlp.down_proj"}


def transformers_name(name: str) -> str:
    """The name in transformers' LlamaForCausalLM of our parameter `name` (e.g. layers.0.attention.wq.weight)."""
    validate.instance(name, "name", str)
    try:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            return f"model.layers.{i}.{TRANSFORMERS_NAMES[module]}.{kind}"
        module, kind = name.rsplit(".", 1)
        return f"{TRANSFORMERS_NAMES[module]}.{kind}"
    except (KeyError, ValueError):
        raise ValueError(f"name {name!r} is not a parameter name of lrn_lib.llama.Llama") from None


def load_transformers_state_dict(model: llama.Llama, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a transformers LlamaForCausalLM state dict into `model` in place (dense SwiGLU models).

    Every parameter of `model` must be present with its shape; a tied model needs no
    lm_head.weight. Raises ValueError naming the first missing or mis-shaped tensor.
    """
    if not isinstance(model, llama.Llama):
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
    validate.flag(use_cache, "use_cache")
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
# ## 6.4 Flash-decoding: a few queries against a long cache
#
# Every step of `generate` after the prompt runs attention with one new query per sequence
# (or a handful, when a draft model proposes several tokens) against every key in the KV
# cache: $N_q$ from 1 to 16, $N_k$ from a thousand to a hundred thousand. Chapter 4's
# forward kernel (section 4.5) fits this badly for three reasons. It gives each program
# $B_r = 128$ query rows, so with $N_q = 1$ it computes 127 rows of padding. It runs one
# program per (batch, head), so a batch of one with 32 heads starts 32 programs on a GPU with
# 132 multiprocessors, and each of them walks all $N_k$ keys alone. And with grouped-query
# attention every query head reads its key/value head again: with 32 query heads on 8
# key/value heads, $K$ and $V$ come from memory four times. At these shapes attention moves
# $2 N_k d$ numbers per key/value head and does only $4 N_q G$ operations per number moved
# ($G$ query heads per key/value head), so it is bound by memory bandwidth, and the only aims
# are to read $K$ and $V$ once and to keep every multiprocessor reading.
#
# Flash-decoding (Dao, Haziza, Massa and Sizov 2023, the "Flash-Decoding for long-context
# inference" post of the PyTorch blog) does both:
#
# * **Pack the group.** One program takes the $G N_q$ query rows of one key/value head (all
#   of its query heads, all the queries), so the rows of a $\tilde S$ block are
#   (query head, query) pairs and each $K$, $V$ block is read once for all of them. With
#   $G N_q \ge 16$ the tensor-core products are no longer mostly padding.
# * **Split the keys.** The key range is cut into $S$ chunks of equal length, and a program
#   per (chunk, batch x key/value head) runs the forward kernel's loop over its chunk only,
#   writing a partial result: $O_s$ normalized over its own keys and
#   their log-sum-exp $L_s$ (rows whose chunk holds no visible key get $O_s = 0$,
#   $L_s = -\infty$).
# * **Merge by log-sum-exp.** A second small kernel combines the $S$ partials of every row,
#   which is chapter 2's merge of softmax states applied to whole outputs:
#
# $$L = \log \sum_{s=1}^{S} e^{L_s}, \qquad O = \sum_{s=1}^{S} e^{L_s - L}\, O_s \qquad (6.7)$$
#
# (computed with the largest $L_s$ subtracted first, in base 2 like the kernels).
#
# **How many chunks.** More chunks keep more multiprocessors reading, but each chunk writes
# a partial that the merge must read back, and a short chunk's loop has little to overlap.
# The rule is one program per multiprocessor, and more chunks where that would leave chunks
# longer than 2,048 keys, with at least two key blocks per chunk. It was measured side by side
# with the rules on either side of it on an H200
# (`benchmarks/results/decode_chunk_rule_NVIDIA_H200_2026-12-04.txt`, CUDA-graph replays at the
# 24 shapes of the benchmark below): four programs per multiprocessor, our first choice, is
# up to 1.46 times slower at 8k to 32k keys, where its chunks are two or four blocks long;
# one program per multiprocessor alone is 5 to 11% slower at 128k keys with 32 heads on 8,
# where 17 chunks of 7,700 keys leave too few programs to hide the memory's latency. Against
# four per multiprocessor, in a second run, the rule was nowhere more than 1% slower and
# gained as much as one per multiprocessor had (up to 1.46 times, at 8k and 32k keys).
#
# The inner loop is `_attend_range`, the key loop of chapter 4's forward kernel, unchanged:
# the causal mask (bottom-right aligned, so query $i$ of $N_q$ sees keys up to
# $i + N_k - N_q$) takes each row's own query index, which after packing is the row number
# modulo $N_q$. Only the chunk holding the last $N_q - 1$ keys ever evaluates the mask.
# There is no backward pass: decoding runs without gradients, and the model's
# `causal_attention` (section 6.1) uses these kernels only when none is needed, for at most
# `DECODE_MAX_QUERIES` queries against at least `DECODE_MIN_KEYS` keys, on a GPU
# (`is_decoding_step`); every other call goes to chapter 4's `flash_attention`. Below that
# length the two launches cost more host time than the work takes (about 60 µs against 25
# µs for chapter 4's forward kernel at 1k keys on the H200, called eagerly), so short caches
# stay on the one-launch kernel.

# %%
#| export kernels.flash_decoding
"""Flash-decoding: attention for a generation step, a few queries against a long KV cache.

The key range is split into chunks that run in parallel, each program holding all the query
heads of one key/value head; a second kernel merges the chunks' partial outputs by their
log-sum-exp. The key loop is chapter 4's (kernels.flash_attention).
"""
import math

import torch

from kernels.flash_attention import (LOG2_E, MAX_HEAD_DIM, _attend_range, _interpreter_dtype, _last_dim_contiguous,
                                     check_flash_inputs, head_block)
from kernels import runtime
from kernels.runtime import check_launchable, tl, triton
from lrn_lib import validate

DECODE_MAX_QUERIES = 16   # causal_attention decodes with the split kernels up to this many queries
DECODE_MIN_KEYS = 4096    # ... and from this many keys on: shorter caches cost less in one launch
DECODE_MAX_SPLITS = 256   # the partials of one row: at most this many key chunks
DECODE_CHUNK_KEYS = 2048  # split further when one program per multiprocessor leaves longer chunks


@triton.jit
def flash_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        n_heads, n_kv_heads, group_size, n_queries, n_keys, n_splits, chunk, causal_offset, qk_scale,
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial attention of one key chunk for BLOCK_M packed (query head, query) rows of one kv head.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d), unit stride on d. Grid: (splits, B * Hkv, row
    blocks of the G * Nq packed rows). Writes o_part: (B, H, Nq, splits, d) float32, O_s
    normalized over the chunk, and lse_part: (B, H, Nq, splits) float32, L_s in log2 units.
    """
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // n_kv_heads).to(tl.int64)
    kv_h = (bkv % n_kv_heads).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)   # packed row = g * Nq + i
    row_ok = rows < group_size * n_queries
    query = rows % n_queries                                     # i, for the causal mask
    head = kv_h * group_size + rows // n_queries                 # query head h = kv_h * G + g
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + query.to(tl.int64)[:, None] * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    lo = split * chunk                                           # chunk is a multiple of BLOCK_N
    hi = tl.minimum(lo + chunk, n_keys)
    if CAUSAL:   # keys <= causal_offset are visible to every query
        all_see = tl.maximum(causal_offset + 1, 0)
    else:
        all_see = n_keys
    unmasked_end = lo + tl.maximum(tl.minimum(hi, all_see) - lo, 0) // BLOCK_N * BLOCK_N
    o_s, lse2 = _attend_range(q, k_base, v_base, stride_kn, stride_vn, query, offs_d, lo, unmasked_end, hi, n_keys,
                              causal_offset, qk_scale, CAUSAL, BLOCK_M, BLOCK_D, BLOCK_N, HEAD_DIM)  # O_s, L_s
    out_row = ((b * n_heads + head) * n_queries + query) * n_splits + split
    tl.store(o_part_ptr + out_row[:, None] * HEAD_DIM + offs_d[None, :], o_s, mask=q_mask)
    tl.store(lse_part_ptr + out_row, lse2, mask=row_ok)


@triton.jit
def flash_decode_merge_kernel(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, stride_ob, stride_oh, stride_om,
                              n_heads, n_queries, n_splits,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the split partials of one (batch, head, query) row by (6.7): O and L (natural log).

    o_part: (B, H, Nq, splits, d) float32, lse_part: (B, H, Nq, splits) float32 in log2 units;
    o: (B, H, Nq, d) in q's dtype, unit stride on d; lse: (B, H, Nq) float32.
    """
    row = tl.program_id(0).to(tl.int64)                          # (b * H + h) * Nq + i
    b = row // (n_heads * n_queries)
    h = (row // n_queries) % n_heads
    i = row % n_queries
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m_s = tl.full([BLOCK_S], -float("inf"), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):                       # pass 1: the largest L_s
        lse_s = tl.load(lse_part_ptr + row * n_splits + s0 + offs_s, mask=s0 + offs_s < n_splits,
                        other=-float("inf"))
        m_s = tl.maximum(m_s, lse_s)
    m = tl.max(m_s, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)                # a row that sees no key at all
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):                       # pass 2: sum of e^{L_s - m} O_s
        in_range = s0 + offs_s < n_splits
        lse_s = tl.load(lse_part_ptr + row * n_splits + s0 + offs_s, mask=in_range, other=-float("inf"))
        w = tl.math.exp2(lse_s - m_safe)                         # 0 for chunks with no visible key
        o_s = tl.load(o_part_ptr + (row * n_splits + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=in_range[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc += w[:, None] * o_s
        total += w
    denom = tl.sum(total, axis=0)                                # e^{L - m}   (6.7)
    has_keys = denom > 0.0
    o = tl.sum(acc, axis=0) / tl.where(has_keys, denom, 1.0)
    lse = tl.where(has_keys, (m_safe + tl.math.log2(tl.where(has_keys, denom, 1.0))) / 1.4426950408889634,
                   -float("inf"))
    tl.store(o_ptr + b * stride_ob + h * stride_oh + i * stride_om + offs_d, o.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(lse_ptr + row, lse)

# %% [markdown]
# The launcher packs nothing in memory: the packing is only the kernel's address arithmetic,
# so $Q$ in any layout with unit stride on $d$ is read in place. It chooses the blocks
# (`decode_config`: up to 64 packed rows per program, 64 keys per block for $d \le 128$) and
# the number of chunks (`decode_splits`), allocates the float32 partials and launches the two
# kernels. `n_splits` may be given to force a split, which the tests use to exercise chunks
# that see no key; it is capped at one chunk per key block.

# %%
#| export kernels.flash_decoding
def decode_config(head_dim: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel for G * Nq packed rows.

    BLOCK_M is rows rounded up to a power of two, between 16 (tl.dot's minimum) and 64.
    """
    validate.integer(head_dim, "head_dim", low=1, high=MAX_HEAD_DIM)
    validate.integer(rows, "rows", low=1)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if head_dim <= 128:
        return block_m, 64, 4, 3
    return block_m, 32, 4, 2


def decode_splits(programs: int, n_keys: int, block_n: int, n_sm: int) -> int:
    """Number of key chunks S: one program per multiprocessor, chunks of at most DECODE_CHUNK_KEYS keys,
    at least two key blocks per chunk.

    programs: the programs of one chunk (B * Hkv * row blocks); n_sm: multiprocessors of the GPU.
    Returns 1 <= S <= DECODE_MAX_SPLITS.
    """
    for name, value in (("programs", programs), ("n_keys", n_keys), ("block_n", block_n), ("n_sm", n_sm)):
        validate.integer(value, name, low=1)
    wanted = max(triton.cdiv(n_sm, programs), triton.cdiv(n_keys, DECODE_CHUNK_KEYS))
    return max(1, min(wanted, triton.cdiv(n_keys, 2 * block_n), DECODE_MAX_SPLITS))


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                 scale: float | None = None, n_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for few queries by split keys (flash-decoding): O and L like flash_attention_forward.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); float16/bfloat16, 1 <= d <= MAX_HEAD_DIM; meant for
    Nq <= DECODE_MAX_QUERIES but right for any. causal: bottom-right aligned (the queries are the
    last Nq positions). n_splits: None (chosen by decode_splits) or the number of key chunks,
    at most one per key block. Returns O: (B, H, Nq, d) in q's dtype, L: (B, H, Nq) float32.
    """
    check_flash_inputs(q, k, v, causal, scale, launch=False)
    if n_splits is not None:
        validate.integer(n_splits, "n_splits", low=1, high=DECODE_MAX_SPLITS)
    check_launchable("q", q)
    dtype = q.dtype
    q, k, v = _interpreter_dtype(*(_last_dim_contiguous(t) for t in (q, k, v)))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_m, block_n, warps, stages = decode_config(d, group * n_q)
    row_blocks = triton.cdiv(group * n_q, block_m)
    if n_splits is None:
        n_splits = decode_splits(b * h_kv * row_blocks, n_k, block_n, runtime.multiprocessors(q.device))
    chunk = triton.cdiv(triton.cdiv(n_k, n_splits), block_n) * block_n   # keys per chunk
    n_splits = triton.cdiv(n_k, chunk)                                   # no chunk is empty
    o_part = torch.empty((b, h, n_q, n_splits, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, h, n_q, n_splits), dtype=torch.float32, device=q.device)
    flash_decode_split_kernel[(n_splits, b * h_kv, row_blocks)](
        q, k, v, o_part, lse_part, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), h, h_kv, group, n_q, n_k, n_splits, chunk, n_k - n_q,
        scale * LOG2_E, CAUSAL=causal, HEAD_DIM=d, BLOCK_D=head_block(d), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    flash_decode_merge_kernel[(b * h * n_q,)](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), o.stride(2), h, n_q, n_splits,
        HEAD_DIM=d, BLOCK_D=head_block(d), BLOCK_S=min(16, triton.next_power_of_2(n_splits)), num_warps=4)
    return o.to(dtype), lse


def is_decoding_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether flash_decode should run this attention: few queries, a long cache, no gradient needed.

    q: (B, H, Nq, d); k, v: (B, Hkv, Nk, d). True for Nq <= DECODE_MAX_QUERIES and Nk >= DECODE_MIN_KEYS.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        validate.tensor(t, name, dims=4)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] >= DECODE_MIN_KEYS and not needs_grad


# %% [markdown]
# A check on the CPU (the interpreter) at a size a decoding step has: 4 query heads on one
# key/value head, 3 queries, 1000 keys (not a multiple of the block), causal, in six chunks,
# against the float64 reference; the error is at the level of the inputs' rounding. The
# partials are merged by (6.7), so the number of chunks changes only the rounding.

# %%
import kernels.runtime
from kernels.flash_decoding import flash_decode
from lrn_lib.attention import attention_reference

if kernels.runtime.MODE != "unavailable":
    config.seed_everything(2)
    q = torch.randn(1, 4, 3, 64, device=config.DEVICE).half()
    k, v = (torch.randn(1, 1, 1000, 64, device=config.DEVICE).half() for _ in range(2))
    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    errors = {}
    for splits in (1, 6):
        o, lse = flash_decode(q, k, v, causal=True, n_splits=splits)
        errors[splits] = ((o.double() - o_ref).abs().max().item(), (lse.double() - lse_ref).abs().max().item())
    o16, _ = attention_reference(q.float(), k.float(), v.float(), causal=True)
    rounding = (o16.half().double() - o_ref).abs().max().item()    # O rounded once to float16
    print("O within 2x the float16 rounding of O, L within 1e-4, for 1 and 6 chunks:",
          all(e_o <= 2 * max(rounding, 1e-3) and e_l < 1e-4 for e_o, e_l in errors.values()))
else:
    print("(skipped: needs Triton)")

# %% [markdown]
# On a GPU the next cell times a decoding step of a model with 32 query heads on 8
# key/value heads ($d = 128$, bfloat16, batch 1) for growing caches: the split kernels,
# chapter 4's forward kernel (section 4.5), and PyTorch's `scaled_dot_product_attention` with its
# FlashAttention-2 backend. It times kernels as CUDA-graph replays over rotating inputs
# larger than the L2 cache (`kernels.bench.graph_times`): a decoding loop replays a graph,
# and a single eager call of a few microseconds of GPU work would time Python instead.
# `python -m kernels.bench decode` makes the full comparison ($N_q$ = 1, 4, 16; two head
# layouts; also SDPA's default choice of backend; eager and graph times, minimum, median and
# maximum); its table is in `benchmarks/results/`.

# %%
# NBVAL_IGNORE_OUTPUT
if config.PROFILE == "gpu":
    import statistics

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.bench import graph_times, rotating_sets
    from kernels.flash_attention import flash_attention_forward

    def sdpa_flash_gqa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    contenders = {"split kernels": lambda q, k, v: flash_decode(q, k, v, causal=False),
                  "ch. 4 kernel": lambda q, k, v: flash_attention_forward(q, k, v, False),
                  "SDPA flash": sdpa_flash_gqa}
    print(f"{'Nk':>7s}", " ".join(f"{name + ' us':>16s}" for name in contenders), " GB/s of the split kernels")
    for n_k in (1024, 8192, 32768, 131072):
        def make(n_k=n_k):
            return (torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16),
                    *(torch.randn(1, 8, n_k, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))

        kv_bytes = 2 * 8 * n_k * 128 * 2
        sets = rotating_sets(make, kv_bytes)
        times = [1e3 * statistics.median(graph_times([lambda t=t, fn=fn: fn(*t) for t in sets], replays=20))
                 for fn in contenders.values()]
        print(f"{n_k:7d}", " ".join(f"{t:16.1f}" for t in times), f"{kv_bytes / times[0] / 1e3:8.0f}")
else:
    print("no CUDA GPU: speed is measured only in the GPU profile (see benchmarks/results/)")

# %% [markdown]
# Run on an H200 (2026-12-04, torch 2.11, triton 3.6:
# `benchmarks/results/chapter06_decode_cell_NVIDIA_H200_2026-12-04.txt`) with our first chunk
# rule (four programs per multiprocessor), the cell printed 8.1, 19.6, 48.9 and 151.3 µs for
# the split kernels at 1k, 8k, 32k and 128k keys, against 10.7, 23.4, 49.8 and 152.9 µs for
# SDPA's FlashAttention-2 backend and 23 µs to 2.4 ms for chapter 4's kernel. With the rule
# above, the comparison of the chunk rules measured 8.2, 16.4, 48.4 and 149.6 µs at the same
# shapes, against SDPA's 10.7, 23.8, 49.9 and 151.6 in the same run. At 128k keys both read
# the cache at about 3.5 TB/s, near the memory's speed, so there the two are level.
#
# Over all 24 shapes of that comparison (one query to 16, 1k to 128k keys, 32 heads on 8 and
# 4 on 1), the split kernels with this rule ran 1.01 to 3.4 times as fast as SDPA's
# FlashAttention-2 backend, as graph replays; the earlier full benchmark, with the first rule
# (`benchmarks/results/decode_bench_NVIDIA_H200_2026-12-03.txt`), had one exception (0.94
# times, one query against 131,072 keys with 32 heads on 8) and showed the kernels 2 to 69
# times as fast as chapter 4's forward kernel. The gain over SDPA grows with $N_q$: with one
# query SDPA packs a group's query heads as we do, while its times for several queries are
# those of reading $K$ and $V$ once per query head (at 131,072 keys, about three times its
# single-query time). Called eagerly from Python, a call costs 50 to a few hundred
# microseconds of host time in Triton's launcher for the two kernels, against about 12 for
# SDPA, so below about 32k keys an eager decoding step is bound by the host, not the GPU;
# the remedy is the graph, or one kernel launch instead of two.


# %% [markdown]
# ## Summary
#
# * Llama 3 is a pre-norm decoder with RMSNorm, RoPE (with Llama 3.1's frequency scaling
#   for 128K context), grouped-query attention and SwiGLU; our implementation matches
#   Hugging Face `transformers` to float64 precision, and its KV cache changes the cost of
#   generation, not its result.
# * The parameter and FLOP counts of section 6.1 follow the published shapes of the 8B, 70B
#   and 405B models; a few hundred CPU steps on the book's corpus take the tiny model's
#   held-out loss below 3 nats per byte.
# * Attention is the replaceable part of the block: the `attend` attribute (chapter 8 swaps
#   in ring attention) or a boolean `mask` passed through `forward` (later chapters use it
#   for padding and local windows).
# * A generation step is one query (or a few) against the whole cache, bound by memory:
#   flash-decoding packs the query heads of a key/value head into one program, splits the
#   keys into chunks run in parallel, and merges the chunks' partial outputs by their
#   log-sum-exp (6.7); the model takes it on a GPU for caches of 4,096 keys and more.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("06.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("06")))` lists the checkers. Worked solutions:
# `chapters/solutions/06_llama3_solutions.ipynb`.
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
