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
# # Chapter 13. LLaDA: masked diffusion language models: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 13. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's references (`lrn_lib.llada`) and prints one line.

# %%
import math

import torch
import torch.nn.functional as F

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.llada import ExactConditionals, fill_masks, pretraining_loss as library_loss

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("13")))

# %% [markdown]
# ## Exercise 1 (derive): the weights of the bound
#
# **(a) The Beta integral.** Let $I(a, b) = \int_0^1 t^{a}(1-t)^{b}\,dt$ for integers
# $a, b \ge 0$. Integrating by parts with $u = (1-t)^b$ and $dv = t^a\,dt$ (the boundary term
# vanishes at both ends when $b \ge 1$),
#
# $$I(a, b) = \frac{b}{a+1}\, I(a+1, b-1), \qquad I(a + b, 0) = \frac{1}{a+b+1},$$
#
# so $I(a, b) = \frac{b!\; a!}{(a+b+1)!}$. With $a = l - 1$ and $b = L - l$ this is
# $(l-1)!\,(L-l)!/L!$, and the coefficient of $g(l)$ in section 13.2 is
#
# $$\binom{L}{l}\, l \,\frac{(l-1)!\,(L-l)!}{L!} = \frac{L!}{l!\,(L-l)!}\cdot\frac{l!\,(L-l)!}{L!} = 1.$$
#
# Every $g(l)$ enters with weight 1, which turns the expectation (13.5) into the sum (13.4),
# that is $\log p(x_0)$.
#
# **(b) The weight $1/p$ cancels the masking rate.** Given $p$, position $i$ is masked with
# probability $p$, so $\mathbb{E}\big[\mathbf{1}[x_t^i = \text{M}]/p \mid p\big] = p/p = 1$,
# whatever $p$ is; averaging over $p$ keeps it 1. A model with uniform logits gives every
# masked token cross-entropy $\log V$, so the expected loss (13.3) is
#
# $$\mathbb{E}\Big[\frac{1}{BL}\sum_{b,i} \frac{\mathbf{1}[x_t^{b,i} = \text{M}]}{p_b}\log V\Big]
#   = \frac{1}{BL}\sum_{b,i} \log V = \log V,$$
#
# exactly the negative log-likelihood per token of the uniform model.
#
# **(c) The moments of $1/p$.** With $p = (1-\varepsilon)t + \varepsilon$ and $t \sim U(0, 1)$,
# $p$ is uniform on $[\varepsilon, 1]$, with density $1/(1-\varepsilon)$:
#
# $$\mathbb{E}\Big[\frac{1}{p}\Big] = \frac{1}{1-\varepsilon}\int_\varepsilon^1 \frac{dp}{p} = \frac{\ln(1/\varepsilon)}{1-\varepsilon},
# \qquad \mathbb{E}\Big[\frac{1}{p^2}\Big] = \frac{1}{1-\varepsilon}\Big(\frac{1}{\varepsilon} - 1\Big) = \frac{1}{\varepsilon}.$$
#
# At $\varepsilon = 0$ both diverge: a batch drawn at a tiny $t$ has a few masked tokens
# weighted by an enormous $1/t$, and the loss has infinite variance (the mean of $1/t$ is
# already infinite, although each token's $\mathbb{E}[\mathbf{1}[x_t^i = \text{M}]/t]$ stays 1,
# because few tokens are masked at small $t$). At $\varepsilon = 10^{-3}$, $\mathbb{E}[1/p] = 6.91$ and
# $\mathbb{E}[1/p^2] = 1000$, so the weight's standard deviation is about 31: finite, but
# large, which is one reason the paper's evaluation uses the lower-variance Algorithm 3.

# %%
L = 6
t = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)
for l in range(1, L + 1):
    integral = torch.trapezoid(t ** (l - 1) * (1 - t) ** (L - l), t).item()
    closed = math.factorial(l - 1) * math.factorial(L - l) / math.factorial(L)
    assert abs(integral - closed) < 1e-9 and abs(math.comb(L, l) * l * closed - 1) < 1e-12
print(f"L = {L}: every Beta integral matches (l-1)!(L-l)!/L!, and every coefficient is 1")

gen = torch.Generator().manual_seed(0)
V, B, Lq, draws = 11, 64, 32, 400
x0 = torch.randint(0, V, (B, Lq), generator=gen)
losses = []
for _ in range(draws):
    p = 1e-3 + (1 - 1e-3) * torch.rand(B, generator=gen, dtype=torch.float64)
    masked = torch.rand(B, Lq, generator=gen, dtype=torch.float64) < p[:, None]
    losses.append(library_loss(torch.zeros(B, Lq, V, dtype=torch.float64), x0, masked, p).item())
mean, se = sum(losses) / draws, torch.tensor(losses).std().item() / math.sqrt(draws)
print(f"uniform logits: mean loss {mean:.4f} +- {se:.4f}, log V = {math.log(V):.4f}")
print("within 4 standard errors of log V:", abs(mean - math.log(V)) < 4 * se)

eps = 1e-3
p = eps + (1 - eps) * torch.rand(2_000_000, generator=gen, dtype=torch.float64)
print(f"E[1/p]: sampled {(1 / p).mean().item():.3f}, formula {math.log(1 / eps) / (1 - eps):.3f}; "
      f"E[1/p^2]: sampled {(1 / p ** 2).mean().item():.0f}, formula {1 / eps:.0f}")

# %% [markdown]
# ## Exercise 2 (implement): the pretraining loss
#
# `F.cross_entropy` computes $-\log\mathrm{softmax}$ stably (logits of 1000 are fine); the
# unmasked positions are zeroed with `torch.where` (not by multiplying, which would turn a
# `nan` or `inf` into `nan`), each row is divided by its $p$, and the sum by $B \cdot L$, so
# a batch with no masked token gives 0 rather than $0/0$.

# %%
def pretraining_loss(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(13.3): logits (B, L, V), x0 and masked (B, L), p (B,) -> sum of CE / p over masked tokens / (B L)."""
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")              # (B, L)
    ce = torch.where(masked, ce, torch.zeros_like(ce))
    return (ce / p[:, None]).sum() / x0.numel()                                     # (13.3)


print(check("13.pretraining_loss", pretraining_loss))

# %% [markdown]
# ## Exercise 3 (implement): which tokens a step commits
#
# (a) (13.8) in integer arithmetic: every step gets $\lfloor m/N \rfloor$, and the first
# $m \bmod N$ steps one more, so the counts add up to $m$ and differ by at most one.

# %%
def transfer_schedule(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(13.8): n_masked (B,) int64 -> (B, steps) int64 tokens to commit per step."""
    base, extra = n_masked // steps, n_masked % steps
    return base[:, None] + (torch.arange(steps)[None, :] < extra[:, None]).long()


print(check("13.transfer_schedule", transfer_schedule))

# %% [markdown]
# (b) Unmasked positions get confidence $-\infty$, so they lose every comparison; each
# row then sorts its confidences and commits its first `counts[b]` positions. The final
# `& is_mask` is a guard: a row asked for no commit never selects anything, and an
# unmasked position can never be written even if a count were too large.

# %%
def commit_low_confidence(x: torch.Tensor, proposal: torch.Tensor, confidence: torch.Tensor,
                          counts: torch.Tensor, mask_id: int) -> torch.Tensor:
    """One low-confidence step: in each row, write the proposals at the counts[b] most confident masks."""
    is_mask = x == mask_id
    conf = torch.where(is_mask, confidence.double(), torch.full(x.shape, -math.inf, dtype=torch.float64))
    rank = conf.argsort(dim=1, descending=True).argsort(dim=1)                       # 0 = most confident
    commit = (rank < counts[:, None]) & is_mask
    return torch.where(commit, proposal, x)


print(check("13.commit_low_confidence", commit_low_confidence))

# %% [markdown]
# ## Exercise 4 (measure): how faithful is the sampler?
#
# A joint table over $K = 3$ symbols and $L = 4$ positions, built as in section 13.3, and
# 20,000 sequences drawn from all-mask inputs with the exact conditionals as the "model".
# The total variation distance to the table is $\frac12\sum_x |\hat q(x) - p(x)|$. For
# reference, its expected value for 20,000 exact samples is about
# $\frac12\sum_x \sqrt{2p(x)(1-p(x))/(\pi N)}$ (the mean absolute deviation of each count).

# %%
config.seed_everything(0)
K, L = 3, 4
joint = torch.distributions.Dirichlet(torch.full((K ** L,), 0.5)).sample()
joint = (joint + 1e-4) / (joint + 1e-4).sum()
exact = ExactConditionals(joint, K, L)
N = 20_000
noise = 0.5 * torch.sqrt(2 * exact.probs * (1 - exact.probs) / (math.pi * N)).sum().item()
gen = torch.Generator().manual_seed(1)
tv = {}
for remasking in ("random", "low_confidence"):
    for steps in (1, 2, 4):
        out, _ = fill_masks(exact, torch.full((N, L), exact.mask_id), steps, exact.mask_id, temperature=1.0,
                            remasking=remasking, generator=gen)
        index = (out * K ** torch.arange(L - 1, -1, -1)).sum(1)                    # row-major, as the table
        empirical = torch.bincount(index, minlength=K ** L).double() / N
        tv[remasking, steps] = 0.5 * (empirical - exact.probs).abs().sum().item()
for steps in (1, 2, 4, 8, 16, 32):                   # Algorithm 4: a random number of commits per step
    out, _ = fill_masks(exact, torch.full((N, L), exact.mask_id), steps, exact.mask_id, temperature=1.0,
                        remasking="independent", generator=gen)
    index = (out * K ** torch.arange(L - 1, -1, -1)).sum(1)
    tv["independent", steps] = 0.5 * (torch.bincount(index, minlength=K ** L).double() / N - exact.probs).abs().sum().item()

# %%
# NBVAL_IGNORE_OUTPUT
print(f"sampling noise for {N:,} exact samples: about {noise:.3f}")
for (remasking, steps), d in tv.items():
    per_step = f"{L // steps} token(s) per step" if remasking != "independent" else f"{L / steps:.2f} tokens per step on average"
    print(f"{remasking:>14}, {steps} step(s) ({per_step}): total variation {d:.3f}")

# %%
print("random remasking, one token per step: within twice the sampling noise:", tv["random", 4] < 2 * noise)
print("one step (all tokens drawn independently) is far off:", min(tv["random", 1], tv["low_confidence", 1]) > 0.2)
print("low-confidence remasking stays far off even at one token per step:", tv["low_confidence", 4] > 0.2)
print("Algorithm 4 gets closer with every doubling of the steps from 1 to 16:",
      all(tv["independent", a] > tv["independent", 2 * a] for a in (1, 2, 4, 8)))

# %% [markdown]
# With one token per step and random remasking, each step reveals a uniformly random
# masked position and draws it from its exact conditional given the revealed ones: that
# is the chain rule in a random order, so the samples come from the table itself and only
# sampling noise remains. With one step, all four tokens are drawn at once from their
# marginals, independently, and every correlation of the table is lost. Low-confidence
# remasking draws a proposal at every position and keeps the one the model is surest of:
# the kept token is then not a draw from its conditional (likely values are kept more
# often than their probability), and the bias does not shrink with more steps. It is a
# good rule for greedy, accuracy-seeking decoding (the paper's setting); as a sampler of the
# distribution it is biased. Algorithm 4 is unbiased only in the limit: a step from $t$ to
# $s$ commits each mask independently, so with few steps two or more tokens often land in
# the same step and are drawn independently of each other; as the steps grow that becomes
# rare and the distance falls towards the noise.
