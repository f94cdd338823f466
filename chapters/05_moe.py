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
# # Chapter 5. Mixture-of-Experts
#
# A transformer block spends most of its parameters and FLOPs in the feed-forward network
# (FFN). A Mixture-of-Experts (MoE) layer replaces that one FFN by $n$ FFNs, the
# **experts**, and a small **router** that sends each token to only $k$ of them. The model
# then has about $n$ times the FFN parameters, but each token pays for $k$ FFNs. This is
# how Switch Transformer (Fedus et al. 2021, arXiv:2101.03961), GShard (Lepikhin et al.
# 2020, arXiv:2006.16668), Mixtral (Jiang et al. 2024, arXiv:2401.04088) and DeepSeek-V3
# (arXiv:2412.19437) scale.
#
# This chapter builds the pieces one at a time: the gates (softmax, noisy top-k, Switch
# top-1, GShard top-2, DeepSeekMoE's fine-grained and shared experts), expert capacity and
# dropped tokens, the load-balancing losses (and what the lecture slide's loss really is),
# DeepSeek-V3's balancing without an auxiliary loss, a small MoE language model trained on
# English and Python, expert parallelism with all-to-all, and a Triton grouped GEMM that
# runs every expert in one launch.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import kernels
from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # tiny matrices: one thread beats two (and two contend with the spawned processes)

# %% [markdown]
# ## 5.1 From a dense FFN to a sparse MoE layer
#
# A dense FFN maps each token $x \in \mathbb{R}^d$ to $W_2\,\phi(W_1 x)$. An MoE layer has
# experts $E_1, \dots, E_n$ (each an FFN) and a gate $G(x) \in \mathbb{R}^n$:
#
# $$y = \sum_{i=1}^{n} G(x)_i\, E_i(x) \qquad (5.1)$$
#
# When $G(x)$ has only $k$ non-zero entries, only those $k$ experts run: the layer is
# **sparse**. Parameters grow with $n$, compute with $k$. The lecture slide's example
# ("a 47B model ... with top-2 gating, 14B parameters are used") is Mixtral 8x7B; instead of
# quoting it, we count it from Mixtral's published configuration (SwiGLU experts with three
# $d \times d_{ff}$ matrices, grouped-query attention, untied input and output embeddings).

# %%
def transformer_parameters(vocab: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                           d_ff: int, n_experts: int, top_k: int) -> tuple[int, int]:
    """(total, active per token) parameters of a Mixtral-style decoder with SwiGLU MoE FFNs."""
    head_dim = d_model // n_heads
    attention = d_model * n_heads * head_dim * 2 + d_model * n_kv_heads * head_dim * 2   # Wq, Wo, Wk, Wv
    expert = 3 * d_model * d_ff                                   # SwiGLU: W1, W3 (d x d_ff), W2 (d_ff x d)
    router = d_model * n_experts
    norms = 2 * d_model
    embeddings = 2 * vocab * d_model + d_model                    # input, output, final norm
    total = n_layers * (attention + n_experts * expert + router + norms) + embeddings
    active = n_layers * (attention + top_k * expert + router + norms) + embeddings
    return total, active


mixtral = dict(vocab=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, n_experts=8, top_k=2)
total, active = transformer_parameters(**mixtral)
dense_ffn = transformer_parameters(**{**mixtral, "n_experts": 1, "top_k": 1})[0]
print(f"Mixtral-style 8 experts, top-2: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
print(f"the same model with one dense FFN: {dense_ffn / 1e9:.2f}B parameters")
print(f"expert share of the parameters: {1 - (total - 32 * 8 * 3 * 4096 * 14336) / total:.1%}")

# %% [markdown]
# The counts agree with Mistral's own figures (46.7B total, 12.9B active). The slide's
# "14B used" overstates the active count slightly: not 2/8 of the whole model is active,
# but 2/8 of the experts plus *all* of attention and the embeddings. The FLOPs per token of
# the forward pass are about $2\times$ the active parameters (a multiply and an add per
# weight); memory still has to hold all 46.7B.
#
# ## 5.2 Gates
#
# All gates start from router logits $h(x) = x W_g \in \mathbb{R}^n$. They differ in how
# they pick the $k$ experts and weigh them:
#
# * **Softmax gating** (dense): $G_\sigma(x) = \mathrm{softmax}(x W_g)$. (5.2) Every expert
#   runs, so it is a soft mixture, not a sparse one.
# * **Noisy top-k** (Shazeer et al. 2017, arXiv:1701.06538):
#   $H(x)_i = (xW_g)_i + \epsilon_i \cdot \mathrm{softplus}((xW_{noise})_i)$,
#   $\epsilon \sim N(0, 1)$, and $G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(H(x), k))$, where
#   KeepTopK sets all but the $k$ largest to $-\infty$. (5.3) The learned noise spreads
#   tokens while the router is undecided; at evaluation the noise is off.
# * **Switch top-1**: $p = \mathrm{softmax}(h)$, one expert $i^* = \arg\max p$, weighted by
#   $p_{i^*}$ (not renormalized to 1, so the router gets a gradient through the weight). (5.4)
# * **Top-k with renormalization** (Mixtral): the $k$ largest $p_i$, divided by their sum.
# * **GShard top-2**: the first expert always; the second, with normalized weights
#   $g_1 + g_2 = 1$, only with probability $\min(1, 2 g_2)$: a second expert with a small
#   weight is often skipped, which saves capacity. (5.5)
# * **DeepSeekMoE** (Dai et al. 2024, arXiv:2401.06066): split each expert into $m$ smaller
#   ones ($mN$ experts of width $d_{ff}/m$, route to $mK$ of them: the same FLOPs, many
#   more combinations), and add $K_s$ **shared** experts that every token uses. DeepSeek-V3
#   scores experts with a sigmoid, $s_i = \sigma(h_i)$, selects the top $k$ and normalizes
#   the selected scores to sum to 1. (5.6)

# %%
#| export lrn_lib.moe
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels import runtime
from lrn_lib import validate
from lrn_lib.attention import flash_attention

GATES = ("softmax", "noisy", "gshard", "sigmoid")


def softmax_gate(logits: torch.Tensor) -> torch.Tensor:
    """Dense softmax gating (5.2): logits (T, E) -> gates (T, E), every expert weighted."""
    validate.tensor(logits, "logits", dims=2, kind="float")
    return torch.softmax(logits.float(), dim=-1)


def noisy_logits(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, training: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Shazeer et al.'s H(x) = x W_g + N(0,1) * softplus(x W_noise) (5.3); x (T, d), W (d, E) -> (T, E).

    Without training the noise is off and H(x) = x W_g.
    """
    validate.tensor(x, "x", dims=2, kind="float")
    validate.tensor(w_gate, "w_gate", dims=2, dtype=x.dtype)
    validate.tensor(w_noise, "w_noise", dims=2, dtype=x.dtype)
    if w_gate.shape[0] != x.shape[1] or w_noise.shape != w_gate.shape:
        raise ValueError(f"w_gate and w_noise must be (d, E) with d = x.shape[1]; got x {tuple(x.shape)}, "
                         f"w_gate {tuple(w_gate.shape)}, w_noise {tuple(w_noise.shape)}")
    validate.generator(generator, optional=True)
    clean = x @ w_gate
    if not training:
        return clean
    eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return clean + eps * F.softplus(x @ w_noise)


def keep_top_k(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KeepTopK then softmax (5.3): h (T, E) -> (dense gates (T, E) with k non-zeros, indices (T, k))."""
    validate.tensor(h, "h", dims=2, kind="float")
    validate.integer(k, "k", low=1, high=h.shape[1])
    top, idx = h.float().topk(k, dim=-1)
    masked = torch.full_like(h.float(), -float("inf")).scatter(-1, idx, top)
    return torch.softmax(masked, dim=-1), idx


def top_k_gate(logits: torch.Tensor, k: int, renormalize: bool, bias: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch (k=1, renormalize=False, (5.4)) or Mixtral-style top-k gating.

    logits (T, E) -> (weights (T, k), indices (T, k)): the k largest softmax probabilities,
    divided by their sum when renormalize. A bias (E,) only changes the selection (5.13).
    """
    validate.tensor(logits, "logits", dims=2, kind="float")
    validate.integer(k, "k", low=1, high=logits.shape[1])
    if bias is not None and validate.tensor(bias, "bias", dims=1, kind="float").shape != logits.shape[1:]:
        raise ValueError(f"bias must have shape ({logits.shape[1]},), one entry per expert, got {tuple(bias.shape)}")
    probs = torch.softmax(logits.float(), dim=-1)
    _, idx = (probs if bias is None else probs + bias).topk(k, dim=-1)
    weights = probs.gather(-1, idx)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, idx


def gshard_top2_gate(logits: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GShard's top-2 gate with a random second expert (5.5).

    logits (T, E) -> (weights (T, 2) normalized to sum 1, indices (T, 2), active (T, 2) bool):
    the first expert always, the second with probability min(1, 2 g_2); a skipped second
    expert gets weight 0 and active False.
    """
    if validate.tensor(logits, "logits", dims=2, kind="float").shape[1] < 2:
        raise ValueError(f"logits must have at least 2 experts (columns) for a top-2 gate, got {tuple(logits.shape)}")
    validate.generator(generator, optional=True)
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(2, dim=-1)
    g = top / top.sum(-1, keepdim=True)
    u = torch.rand(g.shape[0], generator=generator, device=g.device)
    active = torch.ones_like(g, dtype=torch.bool)
    active[:, 1] = u < 2 * g[:, 1]
    return g * active, idx, active


def sigmoid_gate(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 gating (5.6): s = sigmoid(logits); choose top-k of s + bias; weights s / sum of chosen s.

    logits (T, E), bias (E,) or None -> (weights (T, k), indices (T, k)). The bias only
    changes which experts are chosen, never their weights (see (5.12)).
    """
    validate.tensor(logits, "logits", dims=2, kind="float")
    validate.integer(k, "k", low=1, high=logits.shape[1])
    if bias is not None and validate.tensor(bias, "bias", dims=1, kind="float").shape != logits.shape[1:]:
        raise ValueError(f"bias must have shape ({logits.shape[1]},), one entry per expert, got {tuple(bias.shape)}")
    s = torch.sigmoid(logits.float())
    _, idx = (s if bias is None else s + bias).topk(k, dim=-1)
    chosen = s.gather(-1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


# %% [markdown]
# We put the five gates side by side on the same 6 tokens and 8 experts, and print each
# one's weights as a dense (token x expert) matrix: blank where a gate gives an expert
# nothing.

# %%
from lrn_lib.moe import gshard_top2_gate, keep_top_k, noisy_logits, sigmoid_gate, softmax_gate, top_k_gate

config.seed_everything(0)
x_demo = torch.randn(6, 16)
w_gate, w_noise = torch.randn(16, 8) * 0.3, torch.randn(16, 8) * 0.3
logits_demo = x_demo @ w_gate
gen = torch.Generator().manual_seed(0)


def dense(weights, idx, n=8):
    return torch.zeros(weights.shape[0], n).scatter(-1, idx, weights)


gates = {
    "softmax (5.2)": softmax_gate(logits_demo),
    "noisy top-2 (5.3)": keep_top_k(noisy_logits(x_demo, w_gate, w_noise, generator=gen), 2)[0],
    "Switch top-1 (5.4)": dense(*top_k_gate(logits_demo, 1, renormalize=False)),
    "GShard top-2 (5.5)": dense(*gshard_top2_gate(logits_demo, generator=gen)[:2]),
    "sigmoid top-2 (5.6)": dense(*sigmoid_gate(logits_demo, 2)),
}
for name, g in gates.items():
    print(f"{name}: experts used per token {(g > 0).sum(1).tolist()}")
    for row in g:
        print("   " + " ".join(f"{v:4.2f}" if v > 0 else "  . " for v in row.tolist()))

# %% [markdown]
# Softmax gating uses all 8 experts; the sparse gates use 1 or 2. GShard's random second
# expert is skipped for some tokens (the rows with one entry): those had a small second
# weight.
#
# ## 5.3 Expert capacity and dropped tokens
#
# On an accelerator, tensor shapes are fixed before the routing is known, so each expert
# gets a buffer of **capacity** slots (Switch Transformer, equation 3 of the paper;
# GShard multiplies by $k$ since each token makes $k$ assignments):
#
# $$C = \left\lceil \frac{k \cdot \text{tokens per batch}}{n} \times \text{capacity factor} \right\rceil \qquad (5.7)$$
#
# Assignments past an expert's capacity are **dropped**: the expert does not process the
# token, the token's MoE output lacks that expert's term, and because the MoE layer sits in
# a residual block $x + \mathrm{MoE}(x)$, a token dropped by all its experts passes through
# unchanged. Who gets dropped is a priority rule; ours (GShard's) fills first choices
# before second choices, and earlier tokens before later ones.

# %%
#| export lrn_lib.moe
def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float, k: int = 1) -> int:
    """Slots per expert (5.7): ceil(k * n_tokens / n_experts * capacity_factor), in exact arithmetic.

    The factor is read as the decimal it prints as (1.1 is 11/10, not the binary float just
    above it), so that 2 * 100 / 4 * 1.1 gives 55 slots, not 56.
    """
    validate.integer(n_tokens, "n_tokens", low=0)
    validate.integer(n_experts, "n_experts", low=1)
    validate.integer(k, "k", low=1)
    capacity_factor = validate.number(capacity_factor, "capacity_factor", low=0, low_open=True)
    return math.ceil(Fraction(k * n_tokens, n_experts) * Fraction(repr(capacity_factor)))


def apply_capacity(indices: torch.Tensor, active: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments an expert with `capacity` slots keeps: indices, active (T, k) -> keep (T, k) bool.

    Priority: all first choices (column 0) before second choices, and within a column
    earlier tokens first. Inactive assignments are never kept.
    """
    validate.ids(indices, "indices", validate.integer(n_experts, "n_experts", low=1), dims=2)
    validate.same_shape(indices=indices, active=validate.tensor(active, "active", dtype=torch.bool))
    validate.integer(capacity, "capacity", low=0)
    t, k = indices.shape
    flat = indices.t().reshape(-1).long()                         # choice-major order: the priority order
    live = active.t().reshape(-1)
    one_hot = F.one_hot(flat, n_experts) * live[:, None]
    position = (one_hot.cumsum(0) * one_hot).sum(1) - 1           # slot this assignment would take
    keep = live & (position < capacity)
    return keep.reshape(k, t).t()


# %% [markdown]
# How many assignments are dropped depends on the capacity factor and on how balanced the
# router is. We measure the drop rate for a balanced router (random logits) and for a
# skewed one (the same logits plus a preference for two experts), top-2, 4096 tokens and 16
# experts.

# %%
from lrn_lib.moe import apply_capacity, expert_capacity

config.seed_everything(0)
n_tok, n_exp = 4096, 16
balanced_logits = torch.randn(n_tok, n_exp)
skew = torch.zeros(n_exp)
skew[:2] = 1.5
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0]
drop_rates = {}
for label, lg in (("balanced router", balanced_logits), ("skewed router", balanced_logits + skew)):
    _, idx = top_k_gate(lg, 2, renormalize=True)
    active = torch.ones_like(idx, dtype=torch.bool)
    drop_rates[label] = [1 - apply_capacity(idx, active, n_exp, expert_capacity(n_tok, n_exp, cf, 2)).float().mean().item()
                         for cf in factors]
    print(f"{label:16s} drop rate at factor " + ", ".join(f"{cf}: {r:.3f}" for cf, r in zip(factors, drop_rates[label])))

fig, ax = plt.subplots(figsize=(5.5, 3.2))
for label, rates in drop_rates.items():
    ax.plot(factors, rates, marker="o", label=label)
ax.set_xlabel("capacity factor")
ax.set_ylabel("fraction of assignments dropped")
ax.set_title("Drop rate vs capacity factor (top-2, 16 experts)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# A balanced router drops a few percent at factor 1.0 (random fluctuation) and almost
# nothing at 1.25, the range Switch Transformer recommends. A skewed router needs a
# capacity factor several times larger for the same drop rate, and capacity costs memory
# and compute whether used or not. That is why balancing matters.
#
# ## 5.4 Load balancing
#
# Left alone, a router collapses: the experts it picks early get trained, become better,
# and get picked more (section 5.8 shows the start of this drift in a short run, not the
# collapse itself, which takes longer). Let $T$ tokens make $kT$
# assignments, $f_i$ the fraction of assignments that go to expert $i$, and $P_i$ the mean
# router probability of expert $i$ over the tokens:
#
# $$f_i = \frac{1}{kT}\sum_{t} \mathbb{1}[i \in \mathrm{TopK}(x_t)], \qquad P_i = \frac{1}{T}\sum_t p_i(x_t) \qquad (5.8)$$
#
# **Switch load-balancing loss** (Fedus et al., equation 4): $\mathcal{L}_{bal} = n\sum_i f_i P_i$. (5.9)
# $f$ is a count of argmax decisions: piecewise constant in the router weights, so its
# gradient is zero almost everywhere (and autograd gives none). The loss therefore pushes
# on $P$ only, weighted by $f$: it lowers the probability of the experts that are
# overloaded *now*. At perfect balance $f_i = P_i = 1/n$ and the loss is 1; when one
# expert takes everything, it is $n$.
#
# **Router z-loss** (ST-MoE, Zoph et al. 2022, arXiv:2202.08906): $\mathcal{L}_z = \frac{1}{T}\sum_t \big(\log\sum_i e^{h_i(x_t)}\big)^2$. (5.10)
# It keeps the logits small, so that the router's softmax stays in a range where float
# round-off does not flip decisions; it does not balance anything by itself.
#
# **The slide's loss**, $L_{aux} = n\sum_i f_i \log f_i$. (5.11) This is *not* the Switch loss:
# it is $n$ times the negative entropy of the load, $-n H(f)$. Minimizing it would
# maximize the entropy of the load, whose minimum $-n\log n$ is at the uniform load; it is
# 0 (its maximum) when one expert takes everything. So it is a fine *measure* of balance.
# But it is a function of $f$ alone, and $f$ is not differentiable: the loss has no
# gradient to give the router, and adding it to the training loss changes nothing. Replacing
# $f$ by $P$ would make it differentiable, but then it balances the *average* probability,
# which a router can satisfy while still sending every token to one expert with
# probability just over $1/n$. The Switch loss's product $f_i P_i$ is the fix: the counts
# say which experts are overloaded, the probabilities carry the gradient. We follow the
# papers and keep (5.11) as a diagnostic.
#
# **Micro-batch versus global-batch balancing** ("Demons in the Detail", Qiu et al. 2025,
# arXiv:2501.11873): frameworks compute $f$ per micro-batch, often a handful of sequences,
# so the router is told to balance *within each sequence*, and a sequence of code must
# spread its tokens over all experts: no expert can specialize in code. Computing $f$
# over the global batch (all micro-batches, all data-parallel ranks, one all-reduce of $n$
# counts) only asks for balance over the corpus:
#
# $$\mathcal{L}_{global} = \frac{1}{M}\sum_{m=1}^{M} n \sum_i f_i^{\text{global}} P_i^{(m)} \qquad (5.12)$$
#
# **Auxiliary-loss-free balancing** (Wang et al. 2024, arXiv:2408.15664, adopted by
# DeepSeek-V3, arXiv:2412.19437): no balancing loss on the experts' loads. Each expert has a
# bias $b_i$ added to its score *for selection only* ($\mathrm{TopK}(s_i + b_i)$, while the
# weights use $s_i$), and after each step
#
# $$b_i \leftarrow b_i + \gamma\, \mathrm{sign}(\bar c - c_i) \qquad (5.13)$$
#
# with $c_i$ the tokens expert $i$ received and $\bar c$ their mean: overloaded experts
# become less attractive, idle ones more, and the language-modelling gradient is left
# untouched. DeepSeek-V3 sets the update speed $\gamma = 0.001$ (for its first 14.3T
# tokens, then 0), and it is not entirely loss-free: it keeps a *sequence-wise* balance
# loss, the Switch loss (5.9) computed within each sequence, with a very small weight
# $\alpha = 10^{-4}$, to prevent extreme imbalance inside single sequences. Our training
# run in section 5.8 uses the bias alone, with a larger $\gamma = 0.01$ for its 200 steps.

# %%
#| export lrn_lib.moe
def load_fractions(indices: torch.Tensor, n_experts: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """f of (5.8): indices (T, k) -> (E,) fraction of the active assignments each expert received (no gradient)."""
    validate.ids(indices, "indices", validate.integer(n_experts, "n_experts", low=1), dims=2)
    if active is not None:
        validate.same_shape(indices=indices, active=validate.tensor(active, "active", dtype=torch.bool))
    flat = indices.reshape(-1)
    w = torch.ones_like(flat, dtype=torch.float32) if active is None else active.reshape(-1).float()
    counts = torch.zeros(n_experts, device=indices.device).index_add_(0, flat, w)
    return counts / counts.sum().clamp_min(1.0)


def switch_balance_loss(probs: torch.Tensor, indices: torch.Tensor, active: torch.Tensor | None = None,
                        f: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss (5.9): n * sum_i f_i P_i; probs (T, E), indices (T, k) -> scalar.

    f defaults to this batch's load (5.8); pass a global f for (5.12). Gradients flow
    through P only.
    """
    n = validate.tensor(probs, "probs", dims=2, kind="float").shape[1]
    if validate.tensor(indices, "indices", dims=2, kind="int").shape[0] != probs.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} tokens (rows) but probs has {probs.shape[0]}")
    if f is not None and validate.tensor(f, "f", dims=1, kind="float").shape[0] != n:
        raise ValueError(f"f must have one entry per expert, ({n},) for probs {tuple(probs.shape)}, "
                         f"got {tuple(f.shape)}")
    if f is None:
        f = load_fractions(indices, n, active)
    return n * (f.detach() * probs.float().mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (5.10): mean over tokens of logsumexp(logits)^2; logits (T, E) -> scalar."""
    validate.tensor(logits, "logits", dims=2, kind="float")
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def slide_balance_loss(indices: torch.Tensor, n_experts: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """The lecture slide's n * sum_i f_i log f_i (5.11) = -n * entropy(f); 0 log 0 = 0. No gradient exists."""
    f = load_fractions(indices, n_experts, active)
    return n_experts * torch.where(f > 0, f * torch.log(f.clamp_min(1e-30)), torch.zeros_like(f)).sum()


def micro_batch_balance_loss(probs: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    """(5.9) computed within each micro-batch and averaged: lists of (T_m, E) probs and (T_m, k) indices."""
    if len(validate.nonempty(probs, "probs")) != len(validate.nonempty(indices, "indices")):
        raise ValueError(f"probs and indices must hold one tensor per micro-batch, got {len(probs)} and {len(indices)}")
    return torch.stack([switch_balance_loss(p, i) for p, i in zip(probs, indices)]).mean()


def global_batch_balance_loss(probs: list[torch.Tensor], indices: list[torch.Tensor],
                              group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """(5.12): f counted over all micro-batches, and over the ranks of `group` when one is given.

    probs: list of (T_m, E); indices: list of (T_m, k). Returns the mean over micro-batches
    of n * sum_i f_i^global P_i^(m). Only the group passed is reduced over (the
    data-parallel group that shares this layer): a world-wide all-reduce would mix the
    layers of different pipeline stages, or wait forever for ranks that never call it.
    """
    if len(validate.nonempty(probs, "probs")) != len(validate.nonempty(indices, "indices")):
        raise ValueError(f"probs and indices must hold one tensor per micro-batch, got {len(probs)} and {len(indices)}")
    n = validate.tensor(probs[0], "probs[0]", dims=2, kind="float").shape[1]
    counts = sum(load_fractions(i, n) * i.numel() for i in indices)
    if group is not None:
        dist.all_reduce(counts, group=group)
    f = counts / counts.sum()
    return torch.stack([switch_balance_loss(p, i, f=f) for p, i in zip(probs, indices)]).mean()


@torch.no_grad()
def update_balance_bias(bias: torch.Tensor, indices: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's bias update (5.13), in place: b_i += rate * sign(mean load - load_i). bias (E,), indices (T, k)."""
    validate.ids(indices, "indices", validate.tensor(bias, "bias", dims=1, kind="float").numel(), dims=2)
    rate = validate.number(rate, "rate", low=0)
    counts = torch.bincount(indices.reshape(-1), minlength=bias.numel()).float()
    bias += rate * torch.sign(counts.mean() - counts)
    return bias


# %% [markdown]
# Each loss on a balanced and a collapsed routing of 8 experts, and the gradient that
# reaches the router logits:

# %%
from lrn_lib.moe import load_fractions, router_z_loss, slide_balance_loss, switch_balance_loss

config.seed_everything(0)
n = 8
for label, shift in (("balanced", torch.zeros(n)), ("collapsed", torch.tensor([8.0] + [0.0] * 7))):
    logits = (torch.randn(512, n) * 0.5 + shift).requires_grad_()
    probs = torch.softmax(logits, -1)
    _, idx = probs.topk(1, -1)
    bal = switch_balance_loss(probs, idx)
    slide = slide_balance_loss(idx, n)
    z = router_z_loss(logits)
    bal.backward()
    print(f"{label:9s}: max load {load_fractions(idx, n).max():.2f} | Switch (5.9) {bal.item():.3f} | "
          f"slide (5.11) {slide.item():+.3f} (min -n log n = {-n * math.log(n):+.3f}) | z-loss {z.item():.2f} | "
          f"Switch grad norm {logits.grad.norm():.2e} | slide loss requires grad: {slide.requires_grad}")

# %% [markdown]
# The slide's loss tells balanced from collapsed (-16.6, its minimum, versus 0), but
# `requires_grad` is False: it is a statistic of argmax decisions, and minimizing it by
# gradient descent is impossible as written.
#
# ## 5.5 The MoE layer
#
# The layer routes the tokens, applies capacity, sorts the kept assignments by expert,
# runs each expert on its rows, and adds the outputs back to their tokens, weighted by the
# gate (the **combine**). Sorting makes every expert's input one contiguous block of rows,
# which is what the grouped GEMM of section 5.6 needs; `grouped_mm` uses the Triton kernel
# when it is compiled and a loop of per-expert matmuls otherwise. Shared experts
# (DeepSeekMoE) are one extra dense FFN every token passes through, of width
# $K_s \cdot d_{ff}$. Each expert is a two-layer GELU FFN; the experts' weights are stored
# as (E, d, d_ff) and (E, d_ff, d) tensors.

# %%
#| export lrn_lib.moe
@dataclass
class Routing:
    """One MoE layer's routing decisions for T tokens and E experts.

    logits (T, E) float32; probs (T, E): softmax of the logits (normalized sigmoid scores
    for the sigmoid gate), used by the balancing losses; indices, weights, keep: (T, k);
    keep is False for assignments that GShard skipped or capacity dropped.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor


class Router(nn.Module):
    """Linear router x -> logits = x W_g (E,) and one of the gates of section 5.2.

    gate: "softmax" (top-k of softmax, Switch for k=1; renormalize for Mixtral), "noisy"
    (5.3), "gshard" (5.5, k must be 2) or "sigmoid" (5.6, with the selection bias of (5.13)).
    forward(x (T, d)) -> Routing (capacity not yet applied).
    """

    def __init__(self, d_model: int, n_experts: int, k: int, gate: str = "softmax", renormalize: bool = False):
        super().__init__()
        validate.integer(d_model, "d_model", low=1)
        validate.integer(k, "k", low=1, high=validate.integer(n_experts, "n_experts", low=1))
        if validate.choice(gate, "gate", GATES) == "gshard" and k != 2:
            raise ValueError(f"k must be 2 for the GShard gate (it routes to exactly 2 experts), got {k}")
        self.n_experts, self.k, self.gate, self.renormalize = n_experts, k, gate, renormalize
        self.weight = nn.Parameter(torch.randn(d_model, n_experts) * d_model ** -0.5)
        self.noise = nn.Parameter(torch.zeros(d_model, n_experts)) if gate == "noisy" else None
        self.register_buffer("bias", torch.zeros(n_experts))       # selection-only bias (5.13)

    def forward(self, x: torch.Tensor) -> Routing:
        """x (T, d) -> Routing."""
        if validate.tensor(x, "x", dims=2, kind="float").shape[1] != self.weight.shape[0]:
            raise ValueError(f"x must have shape (tokens, {self.weight.shape[0]}), got {tuple(x.shape)}")
        logits = (x @ self.weight.to(x.dtype)).float()
        probs = torch.softmax(logits, dim=-1)
        keep = torch.ones(x.shape[0], self.k, dtype=torch.bool, device=x.device)
        if self.gate == "softmax":
            weights, idx = top_k_gate(logits, self.k, self.renormalize, self.bias)
        elif self.gate == "noisy":
            h = noisy_logits(x.float(), self.weight.float(), self.noise.float(), self.training)
            gates, idx = keep_top_k(h, self.k)
            weights = gates.gather(-1, idx)
        elif self.gate == "gshard":
            weights, idx, keep = gshard_top2_gate(logits)
        else:
            weights, idx = sigmoid_gate(logits, self.k, self.bias)
            s = torch.sigmoid(logits)
            probs = s / s.sum(-1, keepdim=True)
        return Routing(logits, probs, idx, weights, keep)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped matmul as a loop over experts: rows sorted by expert, x (M, K), w (E, K, N), counts (E,) -> (M, N)."""
    validate.tensor(x, "x", dims=2, kind="float", nonempty=False)
    validate.same_device(x=x, w=validate.tensor(w, "w", dims=3, dtype=x.dtype))
    sizes = validate.tensor(counts, "counts", dims=1, kind="int").tolist()
    if w.shape[:2] != (len(sizes), x.shape[1]):
        raise ValueError(f"w must be (experts, K, N) = ({len(sizes)}, {x.shape[1]}, N) for counts "
                         f"{tuple(counts.shape)} and x {tuple(x.shape)}, got {tuple(w.shape)}")
    if min(sizes) < 0 or sum(sizes) != x.shape[0]:
        raise ValueError(f"counts must be >= 0 and sum to the {x.shape[0]} rows of x, "
                         f"got min {min(sizes)}, sum {sum(sizes)}")
    outs = [xe @ w[e] for e, xe in enumerate(torch.split(x, sizes))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class GroupedMM(torch.autograd.Function):
    """Autograd around the Triton grouped GEMM: Y = X_e W_e per expert; dX = dY_e W_e^T; dW_e = X_e^T dY_e."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, K) sorted by expert, w (E, K, N), counts (E,) -> (M, N)."""
        from kernels.moe import grouped_matmul

        ctx.save_for_backward(x, w, counts)
        return grouped_matmul(x, w, counts)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        """Both gradients as grouped GEMMs."""
        from kernels.moe import grouped_matmul, grouped_weight_grad

        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_matmul(dy, w.transpose(1, 2), counts, check_counts=False) if ctx.needs_input_grad[0] else None
        dw = grouped_weight_grad(x, dy, counts, check_counts=False) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def kernel_can_run(x: torch.Tensor) -> bool:
    """Whether grouped_mm uses the compiled Triton kernel for rows like x."""
    validate.tensor(x, "x", nonempty=False)
    return runtime.MODE == "compiled" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """Rows of x sorted by expert, times their expert's matrix: x (M, K), w (E, K, N), counts (E,) -> (M, N).

    use_kernel None: the Triton kernel where kernel_can_run(x), else the per-expert loop;
    True forces the kernel (also under the interpreter), False the loop.
    """
    if validate.choice(use_kernel, "use_kernel", (None, True, False)) is None:
        use_kernel = kernel_can_run(x)
    return GroupedMM.apply(x, w, counts) if use_kernel else grouped_mm_reference(x, w, counts)


def sort_by_expert(indices: torch.Tensor, keep: torch.Tensor, n_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept assignments sorted by expert: indices, keep (T, k) -> (token ids (A,), choice column (A,),
    expert ids (A,), counts (E,)) with A the number of kept assignments."""
    validate.ids(indices, "indices", validate.integer(n_experts, "n_experts", low=1), dims=2)
    validate.same_shape(indices=indices, keep=validate.tensor(keep, "keep", dtype=torch.bool))
    t, k = indices.shape
    token = torch.arange(t, device=indices.device).repeat_interleave(k)[keep.reshape(-1)]
    column = torch.arange(k, device=indices.device).repeat(t)[keep.reshape(-1)]
    expert = indices.reshape(-1)[keep.reshape(-1)]
    order = torch.argsort(expert, stable=True)
    token, column, expert = token[order], column[order], expert[order]
    return token, column, expert, torch.bincount(expert, minlength=n_experts)


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, counts: torch.Tensor,
               use_kernel: bool | None = None) -> torch.Tensor:
    """Each expert's GELU FFN on its rows: x (A, d) sorted by expert, w_in (E, d, f), w_out (E, f, d) -> (A, d)."""
    validate.tensor(x, "x", dims=2, kind="float", nonempty=False)
    if validate.tensor(w_in, "w_in", dims=3, kind="float").shape[1] != x.shape[1]:
        raise ValueError(f"w_in must be (E, {x.shape[1]}, f) for x {tuple(x.shape)}, got {tuple(w_in.shape)}")
    if validate.tensor(w_out, "w_out", dims=3, kind="float").shape[:2] != (w_in.shape[0], w_in.shape[2]):
        raise ValueError(f"w_out must be ({w_in.shape[0]}, {w_in.shape[2]}, d) for w_in {tuple(w_in.shape)}, "
                         f"got {tuple(w_out.shape)}")
    return grouped_mm(F.gelu(grouped_mm(x, w_in, counts, use_kernel)), w_out, counts, use_kernel)


def token_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x (..., dim) floating -> its tokens as rows (T, dim); ValueError naming x for any other shape."""
    if validate.tensor(x, "x", kind="float").dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (..., {dim}), got {tuple(x.shape)}")
    return x.reshape(-1, dim)


class MoELayer(nn.Module):
    """Sparse MoE FFN (5.1): router, top-k, capacity, routed experts and optional shared experts.

    forward(x (..., d)) -> y (..., d), the MoE term only (the block adds the residual, so a
    dropped token's output is its shared-expert term, or 0). The last routing is kept in
    self.last for the balancing losses. capacity_factor None: no capacity limit.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, gate: str = "softmax",
                 renormalize: bool = False, capacity_factor: float | None = None, n_shared: int = 0,
                 use_kernel: bool | None = None):
        super().__init__()
        validate.integer(d_ff, "d_ff", low=1)
        validate.integer(n_shared, "n_shared", low=0)
        if capacity_factor is not None:
            validate.number(capacity_factor, "capacity_factor", low=0, low_open=True)
        validate.choice(use_kernel, "use_kernel", (None, True, False))
        self.n_experts, self.k, self.capacity_factor, self.use_kernel = n_experts, k, capacity_factor, use_kernel
        self.router = Router(d_model, n_experts, k, gate, renormalize)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * d_model ** -0.5)
        self.w_out = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * d_ff ** -0.5)
        self.shared = (nn.Sequential(nn.Linear(d_model, n_shared * d_ff), nn.GELU(), nn.Linear(n_shared * d_ff, d_model))
                       if n_shared else None)
        self.last: Routing | None = None

    def route(self, x: torch.Tensor) -> Routing:
        """Route x (T, d) and apply capacity (5.7) to the keep mask."""
        r = self.router(x)
        if self.capacity_factor is not None:
            cap = expert_capacity(x.shape[0], self.n_experts, self.capacity_factor, self.k)
            r.keep = apply_capacity(r.indices, r.keep, self.n_experts, cap)
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d)."""
        x, shape = token_rows(x, self.w_in.shape[1]), x.shape   # tokens as rows (T, d)
        r = self.last = self.route(x)
        token, column, expert, counts = sort_by_expert(r.indices, r.keep, self.n_experts)
        out = expert_ffn(x[token], self.w_in, self.w_out, counts, self.use_kernel)
        weight = r.weights[token, column].to(out.dtype)
        y = torch.zeros_like(x).index_add(0, token, out * weight[:, None])      # the combine (5.1)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)


# %% [markdown]
# The check: the layer against a loop over tokens that applies (5.1) literally, with a
# capacity factor small enough that some tokens are dropped, DeepSeekMoE-style (16
# fine-grained experts, top-4, one shared expert).

# %%
from lrn_lib.moe import MoELayer

config.seed_everything(0)
layer = MoELayer(d_model=32, d_ff=16, n_experts=16, k=4, gate="sigmoid", capacity_factor=0.5, n_shared=1).double()
x = torch.randn(64, 32, dtype=torch.float64)
y = layer(x)
r = layer.last
expected = layer.shared(x).clone()
for t in range(x.shape[0]):
    for j in range(layer.k):
        if r.keep[t, j]:
            e = r.indices[t, j]
            expected[t] += r.weights[t, j] * (F.gelu(x[t] @ layer.w_in[e]) @ layer.w_out[e])
print("dropped assignments:", int((~r.keep).sum()), "of", r.keep.numel())
print("layer equals the per-token loop:", torch.allclose(y, expected, atol=1e-12))

# %% [markdown]
# ## 5.6 A grouped GEMM for the experts
#
# The loop in `grouped_mm_reference` launches one matmul per expert: 64 experts, 64
# launches, each on a few hundred rows, too small to fill a GPU. A **grouped GEMM** does
# all of them in one launch. With the rows sorted by expert, expert $e$ owns rows
# $[o_e, o_{e+1})$. We cut each expert's rows into blocks of $B_M$ rows, so its last block
# is padded up to the block size (the padding rows are masked: never loaded, never
# stored). Expert $e$ owns $n_e = \lceil c_e / B_M \rceil$ blocks, numbered from
# $b_e = n_0 + \dots + n_{e-1}$. One program per (row block, column block): program $j$
# finds its expert as the number of experts whose blocks all come before it,
# $e = |\{e' : b_{e'+1} \le j\}|$, its rows as $o_e + (j - b_e) B_M$ up to $o_{e+1}$, and
# computes $Y[\text{rows}] = X[\text{rows}]\, W_e$ like chapter 3's tiled matmul. An expert
# with no tokens owns no blocks and costs nothing. The offsets $o$ and $b$ are two cumulative
# sums computed on the GPU: the host never waits for the router's counts to know how many
# programs to launch, because it launches the most there can be,
# $\lceil M / B_M \rceil + E$, and the spare programs exit at once.
#
# The backward pass is two more grouped GEMMs. $dX_e = dY_e W_e^\top$ is the same kernel
# with $W$ transposed (passed as strides, not copied). $dW_e = X_e^\top dY_e$ reduces over
# the expert's rows, a different shape: one program per (expert, block of $W_e$), looping
# over that expert's rows; an expert with no tokens writes zeros. The gate weights are
# applied in the combine (the `index_add` of the layer), not in the kernel, so the kernel
# stays a plain GEMM and the weights' gradient is ordinary autograd.
#
# As in chapter 4, Triton 3.6's interpreter computes `tl.dot` of bfloat16 blocks wrongly,
# so under the interpreter (CPU) bfloat16 inputs run in float32 and the result is rounded
# back; compiled, bfloat16 runs as bfloat16 with float32 accumulation.

# %%
#| export kernels.moe
import torch

from kernels import runtime
from kernels.runtime import check_launchable, tl, triton
from lrn_lib import validate

GROUPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def grouped_matmul_kernel(x_ptr, w_ptr, y_ptr, row_offsets_ptr, block_offsets_ptr, n_experts,
                          n_cols, k_dim, stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                          stride_ym, stride_yn, IEEE: tl.constexpr, EXPERTS_POW2: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[rows] = X[rows] @ W[e] for one (row block, column block); the block offsets give e and the rows.

    x: (M, K); w: (E, K, N); y: (M, N); row_offsets o and block_offsets b: (E + 1,) int32.
    Programs past the last block (b[E]) do nothing.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, EXPERTS_POW2)
    ends = tl.load(block_offsets_ptr + 1 + experts, mask=experts < n_experts, other=2**30)
    e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)          # experts whose blocks all precede this one
    if e >= n_experts:
        return
    first_block = tl.load(block_offsets_ptr + e)
    start = tl.load(row_offsets_ptr + e).to(tl.int64) + (pid_m - first_block).to(tl.int64) * BLOCK_M
    end = tl.load(row_offsets_ptr + e + 1).to(tl.int64)
    e = e.to(tl.int64)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < end                                  # the padding rows of the expert's last block
    col_ok = offs_n < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & (kk[None, :] < k_dim), other=0.0)
        b = tl.load(w_ptr + e * stride_we + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(kk[:, None] < k_dim) & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, k_dim, n_cols,
                               stride_xm, stride_xk, stride_ym, stride_yn, stride_we, stride_wk, stride_wn,
                               IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_M: tl.constexpr):
    """dW[e] = X[rows_e]^T @ dY[rows_e] for one (expert, block of dW[e]); zeros for an expert without rows.

    x: (M, K); dy: (M, N); dw: (E, K, N); offsets: (E + 1,) int32 row offsets.
    """
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < k_dim
    n_ok = offs_n < n_cols
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        r_ok = rows < end
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        g = tl.load(dy_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt, g, input_precision="ieee")
        else:
            acc += tl.dot(xt, g)
    tl.store(dw_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


# %% [markdown]
# The launchers validate their inputs, compute the row and block offsets from the counts on
# the device, and launch once for all experts.

# %%
#| export kernels.moe
def check_grouped_inputs(x: torch.Tensor, other: torch.Tensor, counts: torch.Tensor, other_name: str,
                         other_dims: int, check_counts: bool = True) -> None:
    """Raise TypeError/ValueError naming the argument unless x (M, K), other and counts (E,) fit a grouped GEMM.

    check_counts: also check the values of counts (non-negative, summing to M), which makes
    the host wait for the device; callers that built counts themselves skip it.
    """
    for name, t in (("x", x), (other_name, other), ("counts", counts)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("x", x), (other_name, other)):
        if t.dtype not in GROUPED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the grouped GEMM takes float16, bfloat16 or float32")
    if other.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but {other_name} has {other.dtype}; they must match")
    if counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"counts has dtype {counts.dtype}; expected an integer tensor of rows per expert")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected a non-empty (rows, K) matrix")
    if other.dim() != other_dims or other.numel() == 0:
        raise ValueError(f"{other_name} has shape {tuple(other.shape)}; expected a non-empty {other_dims}-d tensor")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts has shape {tuple(counts.shape)}; expected (experts,) with at least one expert")
    if other.device != x.device or counts.device != x.device:
        raise ValueError(f"x, {other_name}, counts are on {x.device}, {other.device}, {counts.device}; "
                         "they must share a device")
    if check_counts:
        smallest, total = torch.stack([counts.min(), counts.sum()]).tolist()     # one wait for the device
        if smallest < 0:
            raise ValueError("counts has negative entries")
        if total != x.shape[0]:
            raise ValueError(f"counts sum to {total} but x has {x.shape[0]} rows")
    check_launchable("x", x)                     # last: bad arguments are named even where triton is missing


def expert_offsets(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row offsets o and block offsets b, each (E + 1,) int32, from counts (E,), computed where counts live.

    Expert e owns rows [o_e, o_e+1) and row blocks [b_e, b_e+1) of block_m rows each: its last
    block is padded (rows at or past o_e+1 are masked); an expert with no rows owns no block.
    counts must be non-negative; they are not read back here, so nothing waits for the device.
    """
    validate.tensor(counts, "counts", dims=1, kind="int")
    validate.integer(block_m, "block_m", low=1)
    zero = counts.new_zeros(1)
    rows = torch.cat([zero, torch.cumsum(counts, 0)])
    blocks = torch.cat([zero, torch.cumsum((counts + block_m - 1) // block_m, 0)])
    return rows.int(), blocks.int()


def _config_for(dtype: torch.dtype, float32: tuple[int, ...], half: tuple[int, ...]) -> tuple[int, ...]:
    """A small config under the interpreter; compiled, the float32 or the 16-bit (bfloat16, float16) one."""
    validate.choice(dtype, "dtype", GROUPED_DTYPES)
    if runtime.MODE != "compiled":
        return 16, 32, 32, 4, 1
    return float32 if dtype == torch.float32 else half


def grouped_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """Forward (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small under the interpreter, Hopper-sized
    compiled (bfloat16 and float16 from benchmarks/sweep_moe.py on an H100)."""
    return _config_for(dtype, float32=(64, 64, 32, 4, 3), half=(128, 256, 64, 8, 4))


def weight_grad_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """Weight-gradient (BLOCK_M rows reduced per step, BLOCK_N, BLOCK_K, num_warps, num_stages), as grouped_config."""
    return _config_for(dtype, float32=(32, 64, 64, 4, 3), half=(64, 128, 128, 4, 3))


def _interpreter_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float32 copies of bfloat16 tensors under the interpreter, whose bfloat16 tl.dot is wrong."""
    if runtime.MODE == "interpreted" and tensors[0].dtype == torch.bfloat16:
        return [t.float() for t in tensors]
    return list(tensors)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, check_counts: bool = True) -> torch.Tensor:
    """All experts' matmuls in one launch: x (M, K) sorted by expert, w (E, K, N), counts (E,) -> (M, N).

    Rows [o_e, o_e + counts[e]) of x are multiplied by w[e]; any strides of w are accepted
    (so w.transpose(1, 2) computes dY W^T for the backward pass without a copy). With
    check_counts=False (counts known valid) nothing waits for the device.
    """
    check_grouped_inputs(x, w, counts, "w", 3, check_counts)
    if w.shape[1] != x.shape[1] or w.shape[0] != counts.numel():
        raise ValueError(f"x {tuple(x.shape)}, w {tuple(w.shape)}, counts ({counts.numel()},): w must be "
                         "(experts, K, N) with K = x.shape[1] and one count per expert")
    dtype = x.dtype
    x, w = _interpreter_dtype(x, w)
    m, k_dim = x.shape
    n = w.shape[2]
    n_experts = counts.numel()
    block_m, block_n, block_k, warps, stages = grouped_config(dtype)
    rows, blocks = expert_offsets(counts, block_m)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) + n_experts, triton.cdiv(n, block_n))   # the most blocks there can be
    grouped_matmul_kernel[grid](x, w, y, rows, blocks, n_experts, n, k_dim, x.stride(0), x.stride(1),
                                w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
                                IEEE=x.dtype == torch.float32, EXPERTS_POW2=triton.next_power_of_2(n_experts),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                num_warps=warps, num_stages=stages)
    return y.to(dtype)


def grouped_weight_grad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor,
                        check_counts: bool = True) -> torch.Tensor:
    """dW[e] = X_e^T dY_e for every expert in one launch: x (M, K), dy (M, N), counts (E,) -> (E, K, N).

    Experts with no rows get zero gradients.
    """
    check_grouped_inputs(x, dy, counts, "dy", 2, check_counts)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but dy has {dy.shape[0]}; they must match")
    dtype = x.dtype
    x, dy = _interpreter_dtype(x, dy)
    k_dim, n = x.shape[1], dy.shape[1]
    n_experts = counts.numel()
    block_m, block_n, block_k, warps, stages = weight_grad_config(dtype)
    offsets, _ = expert_offsets(counts, block_m)
    dw = torch.empty((n_experts, k_dim, n), dtype=x.dtype, device=x.device)
    grid = (n_experts, triton.cdiv(k_dim, block_k), triton.cdiv(n, block_n))
    grouped_weight_grad_kernel[grid](x, dy, dw, offsets, k_dim, n, x.stride(0), x.stride(1), dy.stride(0),
                                     dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
                                     IEEE=x.dtype == torch.float32, BLOCK_K=block_k, BLOCK_N=block_n,
                                     BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    return dw.to(dtype)


# %% [markdown]
# Forward and backward against float64, in the interpreter on the CPU, with odd sizes and
# two experts that receive no tokens:

# %%
if kernels.runtime.MODE != "unavailable":
    from kernels.moe import expert_offsets, grouped_matmul, grouped_weight_grad
    from lrn_lib.moe import grouped_mm, grouped_mm_reference

    dev = "cuda" if kernels.runtime.MODE == "compiled" else "cpu"   # compiled kernels take CUDA tensors
    config.seed_everything(0)
    counts = torch.tensor([5, 0, 23, 1, 0, 40])
    rows, blocks = expert_offsets(counts, 16)
    print("counts", counts.tolist(), "with BLOCK_M 16: row offsets", rows.tolist(), "block offsets", blocks.tolist())
    for j in range(int(blocks[-1])):
        e = int((blocks[1:] <= j).sum())
        start = int(rows[e]) + (j - int(blocks[e])) * 16
        print(f"  program {j}: expert {e}, rows [{start}, {min(start + 16, int(rows[e + 1]))})")
    x = torch.randn(int(counts.sum()), 37, dtype=torch.float64)
    w = torch.randn(6, 37, 19, dtype=torch.float64)
    dy = torch.randn(x.shape[0], 19, dtype=torch.float64)
    y_ref = grouped_mm_reference(x, w, counts)
    dw_ref = torch.stack([xe.T @ ge for xe, ge in zip(torch.split(x, counts.tolist()), torch.split(dy, counts.tolist()))])
    kernel_errors = {}                                       # dtype -> (tolerance, [error of y, dX, dW])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xd, wd, dyd, cd = x.to(dev, dtype), w.to(dev, dtype), dy.to(dev, dtype), counts.to(dev)
        y = grouped_matmul(xd, wd, cd).cpu().double()
        dx = grouped_matmul(dyd, wd.transpose(1, 2), cd).cpu().double()
        dw = grouped_weight_grad(xd, dyd, cd).cpu().double()
        kernel_errors[dtype] = tol, [((a - b).norm() / b.norm()).item() for a, b in
                                     ((y, y_ref), (dx, grouped_mm_reference(dy, w.transpose(1, 2), counts)),
                                      (dw, dw_ref))]
    layer = MoELayer(16, 32, 6, 2, capacity_factor=1.0).to(dev)
    xs = torch.randn(40, 16, device=dev, requires_grad=True)
    layer.use_kernel = False
    y_loop = layer(xs)
    g_loop = torch.autograd.grad(y_loop.square().sum(), (xs, layer.w_in, layer.router.weight))
    layer.use_kernel = True
    y_kern = layer(xs)
    g_kern = torch.autograd.grad(y_kern.square().sum(), (xs, layer.w_in, layer.router.weight))

# %%
# NBVAL_IGNORE_OUTPUT
if kernels.runtime.MODE != "unavailable":               # the digits depend on the BLAS's order of summation
    for dtype, (_, errors) in kernel_errors.items():
        print(f"{str(dtype):15s} relative errors y {errors[0]:.1e}, dX {errors[1]:.1e}, dW {errors[2]:.1e}")

# %%
if kernels.runtime.MODE != "unavailable":
    for dtype, (tol, errors) in kernel_errors.items():
        print(f"{str(dtype):15s} y, dX and dW all within relative error {tol:g} of float64: {max(errors) < tol}")
    print("MoE layer with the kernel equals the loop (output and gradients):",
          torch.allclose(y_kern, y_loop, atol=1e-5) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_kern, g_loop)))

# %% [markdown]
# ## 5.7 Expert parallelism
#
# In a large MoE model the experts do not fit on one GPU, so they are spread over the ranks
# of an **expert-parallel** group: with $W$ ranks, rank $r$ holds experts
# $[rE/W, (r+1)E/W)$, and every rank keeps the (small) router and the attention. Each rank
# routes its own tokens, then:
#
# 1. sorts its assignments by expert, so they are already grouped by destination rank;
# 2. exchanges the per-expert counts with one `all_to_all` (each rank learns how many rows
#    it will receive from each other rank, for each of its experts);
# 3. sends the token vectors with a second `all_to_all` of uneven splits (dispatch);
# 4. runs its experts on what it received (one grouped GEMM);
# 5. sends the outputs back with the reverse `all_to_all` (combine), where the gate weights
#    are applied.
#
# The backward pass of an all-to-all is the all-to-all with the splits swapped, which the
# small `AllToAll` autograd function below states. GShard's capacity would be counted per
# rank here, and then the result would depend on how tokens are split over ranks; the
# expert-parallel layer therefore runs without a capacity limit (it refuses one), which is
# what makes it exactly equal to the single-process layer. On CPU the group uses gloo; on
# GPUs, NCCL.

# %%
#| export lrn_lib.expert_parallel
"""Expert parallelism (section 5.7): each rank holds some of the experts, and tokens travel to their
experts and back by two all_to_all exchanges; equal to the single-process MoELayer."""
import torch
import torch.distributed as dist
import torch.nn as nn

from lrn_lib import validate
from lrn_lib.moe import MoELayer, Routing, expert_ffn, sort_by_expert, token_rows
from lrn_lib.spawn import spawn


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; the backward pass swaps the splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
        """x (sum(in_splits), ...) -> (sum(out_splits), ...): rows in_splits[j] go to rank j."""
        for name, splits in (("out_splits", out_splits), ("in_splits", in_splits)):
            for j, rows in enumerate(validate.nonempty(splits, name)):
                validate.integer(rows, f"{name}[{j}]", low=0)
        if len(out_splits) != len(in_splits):
            raise ValueError(f"out_splits and in_splits need one entry per rank, "
                             f"got {len(out_splits)} and {len(in_splits)}")
        if validate.tensor(x, "x", nonempty=False).dim() == 0 or x.shape[0] != sum(in_splits):
            raise ValueError(f"in_splits sum to {sum(in_splits)} but x has shape {tuple(x.shape)}")
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """The reverse exchange."""
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class ExpertParallelMoE(nn.Module):
    """The experts of `layer` spread over the ranks of `group`; this rank keeps experts [r E/W, (r+1) E/W).

    Router and shared experts are copied (replicated on every rank). forward(x (..., d)) ->
    (..., d) equals layer(x) on this rank's tokens. Requires layer.capacity_factor None.
    """

    def __init__(self, layer: "MoELayer", group=None):
        super().__init__()
        import copy

        validate.instance(layer, "layer", MoELayer)
        if layer.capacity_factor is not None:
            raise ValueError(f"layer has capacity_factor {layer.capacity_factor}: the expert-parallel layer takes no "
                             "capacity limit (it would depend on the rank split)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if layer.n_experts % world:
            raise ValueError(f"layer has {layer.n_experts} experts, which cannot be split evenly over {world} ranks")
        self.group, self.world, self.n_experts = group, world, layer.n_experts
        self.local = layer.n_experts // world
        first = rank * self.local
        self.router = copy.deepcopy(layer.router)
        self.shared = copy.deepcopy(layer.shared)
        self.w_in = nn.Parameter(layer.w_in.detach()[first:first + self.local].clone())
        self.w_out = nn.Parameter(layer.w_out.detach()[first:first + self.local].clone())
        self.use_kernel = layer.use_kernel
        self.last: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d)."""
        x, shape = token_rows(x, self.w_in.shape[1]), x.shape   # tokens as rows (T, d)
        r = self.last = self.router(x)
        token, column, _, counts = sort_by_expert(r.indices, r.keep, self.n_experts)   # step 1
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)              # step 2
        received_counts = received_counts.view(self.world, self.local)                 # [source rank, local expert]
        in_splits = counts.view(self.world, self.local).sum(1).tolist()
        out_splits = received_counts.sum(1).tolist()
        rows = AllToAll.apply(x[token], out_splits, in_splits, self.group)             # step 3: dispatch
        local_expert = torch.arange(self.local, device=x.device).repeat(self.world).repeat_interleave(
            received_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)                               # by expert, not by source
        out = expert_ffn(rows[order], self.w_in, self.w_out, received_counts.sum(0), self.use_kernel)  # step 4
        out = out[torch.argsort(order)]
        back = AllToAll.apply(out, in_splits, out_splits, self.group)                  # step 5: combine
        weight = r.weights[token, column].to(back.dtype)
        y = torch.zeros_like(x).index_add(0, token, back * weight[:, None])
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)


def _expert_parallel_worker(rank: int, world: int, seed: int) -> dict[str, float]:
    """One rank of expert_parallel_check (a lrn_lib.spawn worker): ExpertParallelMoE against MoELayer on the
    same tokens; returns the largest differences over all ranks."""
    torch.manual_seed(seed)                                     # the same layer and data on every rank
    layer = MoELayer(16, 24, 4 * world, 2, renormalize=True, n_shared=1).double()
    per_rank = 23
    x = torch.randn(world * per_rank, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(x)
    ep = ExpertParallelMoE(layer)
    (layer(x) * gy).sum().backward()                            # the single-process reference
    y_full = layer(x).detach()
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    x_local = x.detach()[mine].clone().requires_grad_()
    y_local = ep(x_local)
    (y_local * gy[mine]).sum().backward()
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)                                # replicated parameters: sum over ranks
    first = rank * ep.local
    errors = torch.stack([
        (y_local - y_full[mine]).abs().max(),
        (x_local.grad - x.grad[mine]).abs().max(),
        (ep.w_in.grad - layer.w_in.grad[first:first + ep.local]).abs().max(),
        (ep.w_out.grad - layer.w_out.grad[first:first + ep.local]).abs().max(),
        (router_grad - layer.router.weight.grad).abs().max(),
    ]).detach()
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return dict(zip(("output", "grad_x", "grad_w_in", "grad_w_out", "grad_router"), errors.tolist()))


def expert_parallel_check(world: int = 2, seed: int = 0) -> dict[str, float]:
    """Spawn `world` CPU processes (gloo) and return the largest differences between the expert-parallel
    layer and the single-process layer: output, and the gradients of x, w_in, w_out and the router."""
    validate.integer(world, "world", low=1)
    validate.integer(seed, "seed")
    return spawn(_expert_parallel_worker, world, seed)[0]      # every rank holds the same maxima


# %%
from lrn_lib.expert_parallel import expert_parallel_check

errors = expert_parallel_check(world=2)
print("largest |expert-parallel - single-process| over 2 gloo processes (float64):")
for name, err in errors.items():
    print(f"  {name:12s} below 1e-12: {err < 1e-12}")

# %% [markdown]
# ## 5.8 A small MoE language model on English and Python
#
# The model is a decoder-only transformer whose attention is chapter 4's
# `flash_attention` and whose FFNs are all MoE layers. The data need no download: the book's
# corpus (`lrn_lib.corpus`, one snapshot committed with the book, the same bytes on every
# Python) holds English prose from Python's own documentation (pydoc's help topics, the text
# behind `help()`) and Python code from the standard library's sources, read as bytes (a 256-token
# vocabulary). Every sequence comes from one domain, so we can ask which experts English
# and code tokens go to.

# %%
#| export lrn_lib.moe
class MoEBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MoE(norm(x)). x (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, moe: "MoELayer"):
        super().__init__()
        if validate.integer(d_model, "d_model", low=1) % validate.integer(n_heads, "n_heads", low=1):
            raise ValueError(f"n_heads must divide d_model = {d_model}, got {n_heads}")
        if not isinstance(moe, nn.Module):
            raise TypeError(f"moe must be an nn.Module (a MoELayer), got {type(moe).__name__}")
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        if validate.tensor(x, "x", dims=3, kind="float").shape[2] != self.proj.in_features:
            raise ValueError(f"x must have shape (B, T, {self.proj.in_features}), got {tuple(x.shape)}")
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = flash_attention(q, k, v, causal=True)                   # chapter 4
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.moe(self.norm2(x))                           # dropped tokens: the residual only


class MoETransformer(nn.Module):
    """Decoder-only language model with an MoE FFN in every block.

    tokens (B, T) int64 -> logits (B, T, vocab). moe: keyword arguments of MoELayer except
    d_model. routings() returns each layer's last Routing.
    """

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, max_len: int, **moe):
        super().__init__()
        for name, value in (("vocab", vocab), ("d_model", d_model), ("n_layers", n_layers), ("max_len", max_len)):
            validate.integer(value, name, low=1)
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(MoEBlock(d_model, n_heads, MoELayer(d_model, **moe)) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab)."""
        if validate.ids(tokens, "tokens", self.embed.num_embeddings, dims=2).shape[1] > self.pos.shape[0]:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, more than max_len = {self.pos.shape[0]}")
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def routings(self) -> list[Routing]:
        """The last forward pass's Routing of each MoE layer, first layer first."""
        return [block.moe.last for block in self.blocks]


# %%
from lrn_lib import corpus as book_text

corpus = {name: torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
          for name, text in (("English", book_text.english()), ("code", book_text.python_source()))}
splits = {name: (data[: int(0.9 * len(data))], data[int(0.9 * len(data)):]) for name, data in corpus.items()}
print({name: f"{len(data) / 1e6:.2f}M bytes" for name, data in corpus.items()})
print(repr(book_text.english()[2000:2120].decode(errors="replace")))
print(repr(book_text.python_source()[5000:5120].decode(errors="replace")))

# %%
SEQ, BATCH = config.pick(cpu=64, gpu=256), config.pick(cpu=16, gpu=64)
STEPS = config.pick(cpu=200, gpu=1000)
MODEL = dict(vocab=256, d_model=config.pick(cpu=64, gpu=256), n_heads=4, n_layers=2, max_len=SEQ)


def batch(gen: torch.Generator, split: int = 0, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half English, half code windows of SEQ + 1 bytes: (inputs, targets, domain (B,) 0 English / 1 code)."""
    rows, domains = [], []
    for d, name in enumerate(("English", "code")):
        data = splits[name][split]
        starts = torch.randint(0, len(data) - SEQ - 1, (size // 2,), generator=gen)
        rows += [data[s:s + SEQ + 1] for s in starts.tolist()]
        domains += [d] * (size // 2)
    rows = torch.stack(rows)
    return rows[:, :-1], rows[:, 1:], torch.tensor(domains)


def train(method: str, gate: str = "softmax", steps: int = STEPS, seed: int = 0, alpha: float = 0.05, k: int = 1, router_scale: float = 1.0,
          bias_rate: float = 1e-3) -> tuple[MoETransformer, list[torch.Tensor], list[float]]:
    """Train the small MoE LM with a balancing method; return the model, the load per step
    (n_layers, E) and the loss per step. method: none, switch, switch+z, global, sequence, aux-free."""
    config.seed_everything(seed)
    model = MoETransformer(**MODEL, d_ff=config.pick(cpu=64, gpu=512), n_experts=8, k=k, gate=gate,
                           renormalize=k > 1)
    with torch.no_grad():
        for block in model.blocks:
            block.moe.router.weight.mul_(router_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loads, losses = [], []
    for step in range(steps):
        x, y, _ = batch(gen)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        aux = torch.zeros(())
        for r in model.routings():
            if method in ("switch", "switch+z"):
                aux = aux + alpha * switch_balance_loss(r.probs, r.indices)
            if method == "switch+z":
                aux = aux + 1e-3 * router_z_loss(r.logits)
            if method in ("global", "sequence"):                  # micro-batch = one sequence
                probs, idx = r.probs.view(BATCH, SEQ, -1), r.indices.view(BATCH, SEQ, -1)
                fn = global_batch_balance_loss if method == "global" else micro_batch_balance_loss
                aux = aux + alpha * fn(list(probs), list(idx))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        if method == "aux-free":
            for block in model.blocks:
                update_balance_bias(block.moe.router.bias, block.moe.last.indices, bias_rate)
        loads.append(torch.stack([load_fractions(r.indices, 8) for r in model.routings()]))
        losses.append(loss.item())
    return model, loads, losses


from lrn_lib.moe import (MoETransformer, global_batch_balance_loss, micro_batch_balance_loss,
                         update_balance_bias)

# %% [markdown]
# We train the same model (2 layers, $d = 64$, 8 experts of width 64, Switch top-1
# routing, 200 steps of 1024 bytes on CPU) six ways: no balancing; the Switch loss (5.9)
# with $\alpha = 0.05$ per layer; Switch plus the z-loss (5.10); DeepSeek-V3's bias (5.13)
# with $\gamma = 0.01$ and no loss; and the Switch loss with $f$ counted per sequence (the
# micro-batch of a large-scale run, where a micro-batch holds a sequence or two) versus over
# the global batch (5.12).

# %%
# NBVAL_IGNORE_OUTPUT
runs = {}
t0 = time.perf_counter()
for method in ("none", "switch", "switch+z", "aux-free", "sequence", "global"):
    model, loads, losses = train(method, bias_rate=1e-2)
    runs[method] = dict(model=model, loads=torch.stack(loads), losses=losses)
    final = runs[method]["loads"][-20:].mean(0)
    print(f"{method:9s} final LM loss {sum(losses[-20:]) / 20:.3f} | max expert load per layer "
          f"{[round(v, 3) for v in final.max(1).values.tolist()]} | slide's (5.11) "
          f"{8 * (final * final.clamp_min(1e-9).log()).sum(1).mean().item():+.2f}")
print(f"six runs: {time.perf_counter() - t0:.0f} s")

# %%
fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True, sharey=True)
for ax, (method, run) in zip(axes.flat, runs.items()):
    ax.plot(run["loads"][:, -1].numpy())
    ax.axhline(1 / 8, color="black", lw=0.8, ls="--")
    ax.set_title(f"{method}: layer 2 load per expert")
for ax in axes[1]:
    ax.set_xlabel("step")
for ax in axes[:, 0]:
    ax.set_ylabel("fraction of tokens")
plt.tight_layout()
plt.show()

# %%
max_load = {m: r["loads"][-20:].mean(0).max().item() for m, r in runs.items()}
print("without balancing, some expert takes over 1.75x its fair share (> 0.22):", max_load["none"] > 0.22)
print("every balancing method keeps the busiest expert below 0.2:",
      all(max_load[m] < 0.2 for m in ("switch", "switch+z", "aux-free", "sequence", "global")))

# %% [markdown]
# The global-batch run prints exactly the Switch run's numbers: on one process with
# equal-length sequences, (5.12) with $f$ pooled over the batch *is* (5.9) on the whole batch
# (the mean of the per-sequence $P$ is the batch's $P$). They differ once $f$ is pooled over
# several ranks or accumulation steps, which `global_batch_balance_loss` does with one
# all-reduce. The sequence-level run is the one that differs.
#
# At this scale (200 steps, a 0.2M-parameter model) the unbalanced router does not
# collapse onto one expert; it drifts, and its busiest expert ends with two to three times
# the uniform share $1/8$, which at capacity factor 1.25 means dropped tokens on every step
# (section 5.3). The drift is the beginning of the rich-get-richer loop that in long runs
# ends in collapse. Each balancing method holds every expert near $1/8$; the
# auxiliary-loss-free bias does so without any loss term (its LM loss is the
# unregularized objective's).
#
# Which experts do English and code tokens go to? We route held-out English and code
# sequences through the global-batch-balanced and the sequence-balanced models.

# %%
# NBVAL_IGNORE_OUTPUT
def domain_routing(model: MoETransformer, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Fraction of each domain's tokens per expert (2, E) in the last layer, and the mutual information
    between domain and expert in bits."""
    x, _, domain = batch(gen, split=1, size=64)
    with torch.no_grad():
        model(x)
    idx = model.routings()[-1].indices.view(x.shape[0], SEQ)
    joint = torch.stack([torch.bincount(idx[domain == d].reshape(-1), minlength=8).float() for d in (0, 1)])
    joint = joint / joint.sum()
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    mi = torch.where(joint > 0, joint * torch.log2(joint / independent), torch.zeros_like(joint)).sum().item()
    return joint / joint.sum(1, keepdim=True), mi


fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
for ax, method in zip(axes, ("global", "sequence")):
    share, mi = domain_routing(runs[method]["model"], torch.Generator().manual_seed(1))
    ax.bar(torch.arange(8) - 0.2, share[0], width=0.4, label="English")
    ax.bar(torch.arange(8) + 0.2, share[1], width=0.4, label="Python code")
    ax.set_title(f"{method}-batch balancing: I(domain; expert) = {mi:.3f} bits")
    ax.set_xlabel("expert (layer 2)")
    print(f"{method:8s}: English share per expert {[round(v, 2) for v in share[0].tolist()]}")
    print(f"{'':8s}  code    share per expert {[round(v, 2) for v in share[1].tolist()]}")
axes[0].set_ylabel("fraction of the domain's tokens")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The routing differs by domain in both models, but at this scale the difference is small
# (a few hundredths of a bit of mutual information, out of a possible 1): a byte-level model
# after 200 steps routes mostly by byte identity (spaces, letters, punctuation), and both
# domains share most bytes. "Demons in the Detail" measured the specialization gain of
# global-batch balancing on models of billions of parameters trained on hundreds of
# billions of tokens; with the GPU profile (`config.pick`) the same code trains a larger
# model for longer, where the comparison is meaningful. We do not claim the effect from
# these CPU numbers.
#
# ## 5.9 The grouped GEMM on a GPU
#
# `python -m kernels.bench moe` times the grouped kernel in bfloat16 at the sizes of
# DeepSeek-style fine-grained experts (8192 tokens, $d = 2048$, $d_{ff} = 1408$, 64 experts,
# top-6) and Mixtral-style experts (8 experts, top-2, $d_{ff} = 14336$) against a Python loop
# over experts, one dense matmul doing the same FLOPs, and `torch._grouped_mm` where torch
# has it. On the CPU the cell below only says so: interpreted Triton timings mean nothing.

# %%
# NBVAL_IGNORE_OUTPUT
if config.PROFILE == "gpu":
    from kernels.bench import measure, moe_cases, table

    print(table([measure(case) for case in moe_cases()]))
else:
    print("no CUDA GPU: run `python -m kernels.bench moe` on one")

# %% [markdown]
# ## Summary
#
# * An MoE layer (5.1) multiplies parameters by the number of experts and compute by $k$:
#   Mixtral's 46.7B parameters run with 12.9B active per token.
# * Gates differ in how they pick and weigh experts: dense softmax (5.2), noisy top-k (5.3),
#   Switch top-1 (5.4), GShard's random second expert (5.5), DeepSeek's sigmoid scores over
#   fine-grained and shared experts (5.6).
# * Capacity (5.7) fixes shapes; overflow is dropped and passes through the residual. An
#   unbalanced router needs a far larger capacity factor for the same drop rate.
# * The Switch loss (5.9) balances through $P$ because $f$ has no gradient; the slide's
#   $n\sum f\log f$ (5.11) is $-n$ times the load's entropy, a measure with no gradient;
#   the z-loss (5.10) keeps logits small; global-batch balancing (5.12) asks for balance over
#   the corpus instead of each sequence; the auxiliary-loss-free bias (5.13) balances
#   with no loss on the loads (DeepSeek-V3 adds a tiny sequence-wise one, $\alpha = 10^{-4}$).
# * Expert parallelism is three all-to-alls around a grouped GEMM (the counts, then the
#   token vectors out and back), exactly equal to the
#   single-process layer; the grouped GEMM runs all experts in one launch, forward and
#   backward.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("05.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("05")))` lists the checkers. Worked solutions:
# `chapters/solutions/05_moe_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (derive): what the Switch loss rewards, and where its gradient comes from.**
# With $f$ and $P$ as in (5.8), show that $\mathcal{L}_{bal} = n\sum_i f_i P_i$ (5.9) lies
# between 0 and $n$ and equals $n$ when every token picks expert 1 with $p_1 \to 1$. Then
# suppose the load follows the probabilities, $f = P$, and use Cauchy-Schwarz to show that
# $n\sum_i P_i^2 \ge 1$, with equality exactly at uniform routing $P_i = 1/n$. Explain why
# $f$, a count of top-k decisions, carries no gradient, and, holding $f$ fixed, derive the
# gradient of (5.9) with respect to token $t$'s logit $h_j(x_t)$, where $p = \mathrm{softmax}(h)$:
# $\partial \mathcal{L}_{bal} / \partial h_j(x_t) = \frac{n}{T}\, p_j(x_t)\big(f_j - \sum_i f_i p_i(x_t)\big)$.
# Which logits does a gradient step lower, and why is the gradient 0 at perfect balance?
#
# **Exercise 2 (implement): the Switch loss.** Write
# `switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor` that returns
# (5.9) as a 0-dim tensor: `probs` $(T, E)$ holds each token's router probabilities, `indices`
# $(T, k)$ the $k$ different experts each token was sent to (not necessarily its top $k$:
# a noisy or biased gate chooses otherwise), $f_i$ is the fraction of the $kT$ assignments
# that went to expert $i$ and $P_i$ the mean of $p_i$ over the $T$ tokens. Run
# `check("05.switch_loss", switch_loss)`.
#
# **Exercise 3 (implement): top-k gating and capacity.** (a) Write
# `top_k_gate(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]`:
# `logits` $(T, E)$ to `(weights, indices)`, both $(T, k)$, the experts with the $k$ largest
# probabilities $p = \mathrm{softmax}(h)$, largest first, weighted by $p_i$ (Switch, (5.4),
# when $k = 1$) or, when `renormalize`, by $p_i$ divided by the sum of the $k$ chosen
# probabilities (Mixtral). The checker's logits have no ties. Run
# `check("05.top_k_gate", top_k_gate)`. (b) Write
# `capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor`
# that returns a boolean `keep` $(T, k)$: each expert takes at most `capacity` assignments
# in the priority order of section 5.3, all first choices (column 0) in token order, then
# all second choices, and so on; the rest are dropped. Run
# `check("05.capacity_mask", capacity_mask)`.
#
# **Exercise 4 (implement): DeepSeek-V3's bias update.** Write
# `bias_update(bias: torch.Tensor, indices: torch.Tensor, rate: float) -> torch.Tensor`
# that returns the new selection bias $(E,)$ after one step of (5.13): $c_i$ is the number of
# assignments in `indices` $(T, k)$ that went to expert $i$ (0 for an expert no token
# chose), $\bar c$ their mean over the $E$ experts, and $\gamma$ = `rate`. Run
# `check("05.bias_update", bias_update)`.
#
# **Exercise 5 (measure): dropped tokens with and without balancing.** Take section 5.3's
# router (4096 tokens, 16 experts, top-2 with renormalized weights, random logits plus 1.5
# on two favourite experts). Run your `bias_update` for 200 steps with $\gamma = 10^{-3}$ on
# fresh batches, selecting with the bias as `top_k_gate(logits, 2, True, bias)` does. Then,
# on a new batch, print the busiest expert's load and the drop rate (your
# `capacity_mask`, capacity (5.7)) at capacity factors 1.0, 1.25 and 2.0, for the router
# without the skew, the skewed router, and the skewed router with the learned bias. Look for:
# the skewed router drops over a quarter of its assignments even at factor 2, while the
# bias brings the busiest expert back near $1/16$ and the drop rate down to the balanced
# router's, without changing any weight.
