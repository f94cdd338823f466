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
# This chapter first builds the model (6.1 to 6.3) and checks it against Hugging Face
# `transformers`' implementation, then builds each parallel dimension from scratch on
# `torch.distributed` (6.4 to 6.8), each checked equal to the single-process step, composes
# all four (6.9), runs the same model through PyTorch's own engine with `torchrun` (6.10),
# and ends with the accounting of where the 405B model's bytes and messages go (6.11).

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
# The output head is a separate matrix (not tied to the embedding), and nothing has a
# bias. We start with the configuration, with the published shapes of the three Llama 3.1
# models (Table 3 of the paper; vocabulary 128,256; RoPE base $\theta = 500{,}000$).

# %%
#| export lrn_lib.llama
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lrn_lib.attention import flash_attention
from lrn_lib.moe import MoELayer


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling for long context (see rope_frequencies)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


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

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA3_8B = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        rope_scaling=RopeScaling(), max_seq_len=131072)
LLAMA3_70B = LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                         rope_scaling=RopeScaling(), max_seq_len=131072)
LLAMA3_405B = LlamaConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                          rope_scaling=RopeScaling(), max_seq_len=131072)


def tiny_config(**overrides) -> LlamaConfig:
    """A Llama 3 shape small enough to train on a laptop CPU: byte vocabulary, 2 layers, GQA 4:2."""
    base = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                       rope_theta=10000.0, max_seq_len=256)
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
    """Number of parameters of the model cfg describes (dense SwiGLU, untied head)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    attention = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv
    if cfg.n_experts:
        ffn = cfg.n_experts * 2 * cfg.dim * cfg.ffn_dim + cfg.dim * cfg.n_experts
    else:
        ffn = 3 * cfg.dim * cfg.ffn_dim
    block = attention + ffn + 2 * cfg.dim
    return cfg.n_layers * block + 2 * cfg.vocab_size * cfg.dim + cfg.dim


def training_flops(n_params: float, n_tokens: float) -> float:
    """The 6ND estimate of training compute (forward 2ND + backward 4ND)."""
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
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim), normalized in at least float32."""
        work = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(work)
        normed = xw * torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + self.eps)    # (6.2)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Rotation frequencies omega_i (head_dim // 2,) float64, with Llama 3.1 scaling if configured."""
    d = cfg.head_dim
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
    angles = positions.to(torch.float64)[:, None] * omega.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by (6.5), pairing coordinate i with i + hd/2; cos, sin (T, hd)."""
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
# `attend`: section 6.6 swaps in ring attention there. Heads are found from the tensor's
# width (`view(B, T, -1, hd)`), so a projection that holds only some heads (tensor
# parallelism, 6.5) works unchanged.

# %%
#| export lrn_lib.llama
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention with chapter 4's flash_attention: q (B, H, T, hd), k, v (B, Hkv, S, hd) -> (B, H, T, hd)."""
    return flash_attention(q, k, v, causal=True)


class KVCache:
    """Keys and values of every layer for generation: k[layer], v[layer] of shape (B, Hkv, max_len, hd).

    A forward pass at positions p..p+T-1 writes its keys there and attends to positions 0..p+T-1.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at positions start..start+T-1; return all keys and values up to there."""
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
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attend = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, start: int = 0) -> torch.Tensor:
        """x (B, T, dim); cos, sin (T, hd) for the tokens' positions; with a cache, they sit at start..start+T-1."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        o = self.attend(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU (6.3): w2(silu(w1 x) * w3 x). x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                              # (6.3)


class TransformerBlock(nn.Module):
    """Pre-norm block (6.1): h = x + attention(norm(x)); out = h + ffn(norm(h)). x (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = (MoELayer(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.top_k, renormalize=True)
                             if cfg.n_experts else FeedForward(cfg.dim, cfg.ffn_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, start: int = 0) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start)   # (6.1)
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
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
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
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); positions (T,) default arange(T); a cache needs contiguous positions."""
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a (batch, time) int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if positions.shape != (tokens.shape[1],):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({tokens.shape[1]},)")
        x = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.omega, x.dtype)
        start = int(positions[0]) if cache is not None else 0
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start)
        return self.output(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all B*T positions: logits (B, T, V), targets (B, T) -> scalar."""
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
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p          # the nucleus: tokens before which mass < top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend prompt (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, time) tensor, got shape {tuple(prompt.shape)}")
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
# To see the model learn, we train the tiny configuration on bytes of text every Python
# installation has: the documentation topics in `pydoc_data`. A few hundred steps on a
# CPU take the loss from $\ln 256 \approx 5.5$ nats per byte to well under 3.

# %%
#| export lrn_lib.llama
def pydoc_bytes() -> torch.Tensor:
    """The bytes of the standard library's pydoc topics (English documentation text) as an int64 tensor."""
    from pydoc_data import topics

    text = "\n".join(topics.topics[key] for key in sorted(topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def random_windows(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (inputs, next-token targets), each (batch, seq), from random windows of data (N,)."""
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
print(bytes(generate(model, prompt, 60)[0].tolist()).decode("utf-8", errors="replace"))

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
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


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
        queue.put((rank, worker(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run worker(rank, world, *args) in `world` fresh CPU processes joined by gloo.

    worker must be a top-level function of an importable module (spawned processes import
    it); what it returns must pickle. Returns the workers' results in rank order.
    """
    import torch.multiprocessing as mp

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

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def grid(self) -> torch.Tensor:
        """Rank numbers laid out (dp, pp, cp, tp): TP varies fastest, as in Llama 3's Figure 5."""
        return torch.arange(self.world).view(self.dp, self.pp, self.cp, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{'tp': i, 'cp': j, 'pp': k, 'dp': l} of one rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside a mesh of {self.world} ranks")
        dp, pp, cp, tp = (int(c[0]) for c in torch.nonzero(self.grid() == rank, as_tuple=True))
        return {"tp": tp, "cp": cp, "pp": pp, "dp": dp}

    def groups(self, *dims: str) -> list[list[int]]:
        """Every group of ranks that differ only along `dims` (e.g. groups("cp", "dp") for gradient averaging)."""
        for d in dims:
            if d not in MESH_DIMS:
                raise ValueError(f"unknown mesh dimension {d!r}; expected one of {MESH_DIMS}")
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
# ## Summary
#
# * Llama 3 is a pre-norm decoder with RMSNorm, RoPE (with Llama 3.1's frequency scaling
#   for 128K context), grouped-query attention and SwiGLU; our implementation matches
#   Hugging Face `transformers` to float64 precision, and its KV cache changes the cost of
#   generation, not its result.
# * Every parallel dimension is a way to split one training step across processes while
#   computing exactly the same loss and gradients; the checks in this chapter compare each
#   with the single-process step in float64.
