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
# # Chapter 5. Mixture-of-Experts: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 5. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's references (`lrn_lib.moe`) and prints one line.

# %%
import math

import torch
import torch.nn.functional as F

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.moe import expert_capacity, switch_balance_loss

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("05")))

# %% [markdown]
# ## Exercise 1 (derive): what the Switch loss rewards, and where its gradient comes from
#
# **Range.** $f_i \ge 0$ with $\sum_i f_i = 1$, and $0 \le P_i \le 1$. So $\sum_i f_i P_i$ is
# an average of the $P_i$ weighted by $f$, between 0 and $\max_i P_i \le 1$, and
#
# $$0 \le \mathcal{L}_{bal} = n \sum_i f_i P_i \le n.$$
#
# When every token picks expert 1, $f = (1, 0, \dots, 0)$ and $\mathcal{L}_{bal} = n P_1$,
# which tends to $n$ as $p_1 \to 1$ for every token: the collapsed router gets the largest
# loss.
#
# **Minimum at uniform routing.** If the load follows the probabilities, $f = P$, the loss
# is $n \sum_i P_i^2$. Cauchy-Schwarz on the vectors $P$ and $(1, \dots, 1)$ gives
#
# $$1 = \Big(\sum_i P_i \cdot 1\Big)^2 \le \Big(\sum_i P_i^2\Big)\Big(\sum_i 1^2\Big) = n \sum_i P_i^2,$$
#
# with equality exactly when $P$ is parallel to $(1, \dots, 1)$, that is $P_i = 1/n$. So the
# smallest value, 1, is reached at uniform routing and only there.
#
# **No gradient through $f$.** $f_i = \frac{1}{kT}\sum_t \mathbb{1}[i \in \mathrm{TopK}(x_t)]$
# depends on the router weights only through the *order* of each token's logits. A small
# enough change of the weights leaves every order, hence $f$, unchanged: $f$ is piecewise
# constant, its derivative is 0 wherever it exists, and it jumps (no derivative) where two
# logits tie. In code, `topk` returns integer indices with no autograd history.
#
# **The gradient through $P$.** Hold $f$ fixed. With $P_i = \frac{1}{T}\sum_t p_i(x_t)$ and
# the softmax Jacobian $\partial p_i / \partial h_j = p_i(\delta_{ij} - p_j)$ (chapter 2),
#
# $$\frac{\partial \mathcal{L}_{bal}}{\partial h_j(x_t)} = \frac{n}{T} \sum_i f_i\, p_i (\delta_{ij} - p_j)
#   = \frac{n}{T}\, p_j \Big(f_j - \sum_i f_i p_i\Big),$$
#
# all $p$ at $x_t$. The bracket compares expert $j$'s load with the load averaged under the
# token's own probabilities. A gradient step ($h \leftarrow h - \eta\, \nabla$) lowers the
# logits of experts loaded above that average and raises those below it, in proportion to
# $p_j$: probability moves from overloaded experts to idle ones, while the counts $f$ only
# say which is which. At perfect balance $f_j = 1/n$ for every $j$, so
# $\sum_i f_i p_i = 1/n = f_j$ and every bracket is 0: the gradient vanishes, as it must at
# the minimum. The checks:

# %%
n_exp, n_tok = 8, 512
logits = (torch.randn(n_tok, n_exp, dtype=torch.float64) + torch.linspace(0, 2, n_exp, dtype=torch.float64)
          ).requires_grad_()
probs = torch.softmax(logits, -1)
idx = probs.topk(1, dim=-1).indices
print("topk indices carry no gradient:", not idx.requires_grad and idx.grad_fn is None)
loss = switch_balance_loss(probs.double(), idx)
loss.backward()
f = torch.bincount(idx.reshape(-1), minlength=n_exp).double() / idx.numel()
p = probs.detach()
formula = n_exp / n_tok * p * (f - (p * f).sum(-1, keepdim=True))
print("autograd gradient equals (n/T) p_j (f_j - sum_i f_i p_i):",
      torch.allclose(logits.grad, formula.to(logits.grad.dtype), atol=1e-6))
print("the gradient lowers the logits of the busiest expert on average:",
      logits.grad[:, f.argmax()].mean().item() > 0)

random_p = torch.softmax(torch.randn(1000, n_exp, dtype=torch.float64) * 2, -1)
print("n sum_i P_i^2 >= 1 on 1000 random P:", bool((n_exp * random_p.square().sum(-1) >= 1 - 1e-12).all()))
uniform = torch.full((n_exp, n_exp), 1 / n_exp, dtype=torch.float64)
one_each = torch.arange(n_exp)[:, None]
print("balanced: loss", round(switch_balance_loss(uniform, one_each).item(), 6))
collapsed = torch.full((n_exp, n_exp), 1e-6, dtype=torch.float64)
collapsed[:, 0] = 1 - 1e-6 * (n_exp - 1)
all_on_0 = torch.zeros(n_exp, 1, dtype=torch.long)
print("collapsed onto expert 0: loss", round(switch_balance_loss(collapsed, all_on_0).item(), 4))

# %% [markdown]
# ## Exercise 2 (implement): the Switch loss
#
# Count each expert's assignments with `bincount` (with `minlength`, so that experts no
# token chose count 0), divide by the $kT$ assignments for $f$ (5.8), average the
# probabilities over the tokens for $P$, and multiply by $n$ (5.9). Nothing here needs a
# `detach`: the counts are integers with no gradient anyway.

# %%
def switch_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss (5.9): probs (T, E), indices (T, k) -> n * sum_i f_i P_i."""
    n = probs.shape[-1]
    f = torch.bincount(indices.reshape(-1), minlength=n).to(probs.dtype) / indices.numel()   # (5.8)
    return n * (f * probs.mean(dim=0)).sum()


print(check("05.switch_loss", switch_loss))

# %% [markdown]
# ## Exercise 3 (implement): top-k gating and capacity
#
# (a) `torch.topk` returns the $k$ largest probabilities already in decreasing order, with
# their experts. Switch keeps $p_{i^*}$ as the weight (5.4); Mixtral divides the $k$ chosen
# probabilities by their sum. `torch.softmax` subtracts each row's maximum, so logits of
# 1000 are safe.

# %%
def top_k_gate(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) -> (weights (T, k), indices (T, k)): the k most probable experts, largest first."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


print(check("05.top_k_gate", top_k_gate))

# %% [markdown]
# (b) Walk the columns in order (first choices, then second choices, ...). Within a
# column, the slot an assignment would take in its expert's buffer is the number of
# assignments to that expert in earlier columns plus those of earlier tokens in this
# column; it is kept when that slot is below the capacity. Counting dropped assignments in
# `used` too changes nothing: an expert that overflowed stays full.

# %%
def capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """indices (T, k) -> keep (T, k) bool: each expert keeps its first `capacity` assignments,
    all first choices (in token order) before any second choice."""
    t, k = indices.shape
    keep = torch.zeros(t, k, dtype=torch.bool)
    used = torch.zeros(n_experts, dtype=torch.long)              # assignments seen so far per expert
    for j in range(k):
        one_hot = F.one_hot(indices[:, j], n_experts)
        slot = used[indices[:, j]] + (one_hot.cumsum(0) * one_hot).sum(1) - 1
        keep[:, j] = slot < capacity
        used += one_hot.sum(0)
    return keep


print(check("05.capacity_mask", capacity_mask))

# %% [markdown]
# ## Exercise 4 (implement): DeepSeek-V3's bias update
#
# The loads $c_i$ are counts (again with `minlength`, so an idle expert counts 0 and gets
# $+\gamma$), $\bar c = kT/E$ is their mean, and `torch.sign` returns 0 for an expert exactly
# at the mean, whose bias stays put.

# %%
def bias_update(bias: torch.Tensor, indices: torch.Tensor, rate: float) -> torch.Tensor:
    """One step of (5.13): bias (E,), indices (T, k) -> b + rate * sign(mean load - load)."""
    c = torch.bincount(indices.reshape(-1), minlength=bias.numel()).to(bias.dtype)
    return bias + rate * torch.sign(c.mean() - c)


print(check("05.bias_update", bias_update))

# %% [markdown]
# ## Exercise 5 (measure): dropped tokens with and without balancing
#
# The selection adds the bias to the probabilities, as `top_k_gate(logits, 2, True, bias)`
# of the library does; the weights would still be the renormalized probabilities, so the
# bias changes which experts run, not how their outputs are mixed.

# %%
n_tok, n_exp, k = 4096, 16, 2
skew = torch.zeros(n_exp)
skew[:2] = 1.5
gen = torch.Generator().manual_seed(0)


def select(logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The experts chosen by top_k_gate(logits, k, True, bias): top k of softmax + bias."""
    probs = torch.softmax(logits, dim=-1)
    return (probs if bias is None else probs + bias).topk(k, dim=-1).indices


bias = torch.zeros(n_exp)
for step in range(200):
    bias = bias_update(bias, select(torch.randn(n_tok, n_exp, generator=gen) + skew, bias), 1e-3)
print("learned bias:", [round(b, 3) for b in bias.tolist()])

fresh = torch.randn(n_tok, n_exp, generator=gen)
factors = (1.0, 1.25, 2.0)
results = {}
for label, indices in (("balanced router", select(fresh)), ("skewed router", select(fresh + skew)),
                       ("skewed + bias", select(fresh + skew, bias))):
    load = torch.bincount(indices.reshape(-1), minlength=n_exp).max().item() / indices.numel()
    drops = [1 - capacity_mask(indices, n_exp, expert_capacity(n_tok, n_exp, cf, k)).float().mean().item()
             for cf in factors]
    results[label] = (load, drops)
    print(f"{label:15s}: busiest expert {load:.3f} (uniform {1 / n_exp:.4f}) | drop rate at factor "
          + ", ".join(f"{cf}: {d:.3f}" for cf, d in zip(factors, drops)))

# %%
print("the skewed router drops over a quarter of its assignments even at factor 2:",
      results["skewed router"][1][-1] > 0.25)
print("with the bias, the busiest expert is within 20% of 1/16:", results["skewed + bias"][0] < 1.2 / n_exp)
print("with the bias, the drop rate at factor 1.25 is below 1%, as for the balanced router:",
      results["skewed + bias"][1][1] < 0.01 and results["balanced router"][1][1] < 0.01)

# %% [markdown]
# The skewed router sends about a quarter of all assignments to each of its two favourite
# experts, four times the uniform share, so no practical capacity factor saves it. After
# 200 bias steps the favourites' biases are negative, the others' positive, and the loads
# (and with them the drop rates) match the unskewed router's, without any loss term.
