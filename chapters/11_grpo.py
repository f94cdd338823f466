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
# # Chapter 11. GRPO: Group Relative Policy Optimization
#
# A language model that can sometimes solve a problem can be taught to solve it more
# often by reinforcement learning: sample several answers, check them with a program
# (a **verifiable reward**: is the number right? is the format right?), and raise the
# probability of the answers that scored better than their siblings. **GRPO**, Group
# Relative Policy Optimization, was introduced in DeepSeekMath (Shao et al. 2024,
# arXiv:2402.03300) and is the algorithm behind DeepSeek-R1-Zero and DeepSeek-R1
# (DeepSeek-AI 2025, arXiv:2501.12948), where rule-based rewards alone taught a base model
# to write long chains of thought.
#
# A note on the name: the lecture slides call it "General Reinforced Preference
# Optimization". That is wrong. The paper's title for the method is *Group Relative Policy
# Optimization*, and both words matter: the advantage of a sample is computed *relative* to
# the other samples of its *group* (the answers to the same prompt), and it is a *policy
# optimization* method in the PPO family, not a preference-optimization method like DPO
# (there are no preference pairs anywhere).
#
# This chapter derives GRPO from the policy gradient and PPO, implements the objective and
# its loss-normalization variants (the paper's, DAPO's and Dr. GRPO's) and checks it
# against TRL's implementation in the tests, then trains chapter 6's Llama on arithmetic
# with a verifiable answer: a short supervised warm-up leaves it wrong about half the
# time and sometimes malformed. GRPO then lifts its held-out accuracy, and section 11.9
# asks whether it does so more than the obvious alternatives at the same cost: continuing
# the supervised training, rejection-sampling fine-tuning, and plain REINFORCE.

# %%
import copy
import time
from functools import partial

import matplotlib.pyplot as plt
import torch

from lrn_lib import config
from lrn_lib.llama import Llama, parameter_count, tiny_config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices on a shared 2-core CPU: one thread is many times faster than two

# %% [markdown]
# ## 11.1 From the policy gradient to PPO to GRPO
#
# A prompt $q$ is drawn from the data, the **policy** $\pi_\theta$ (our language model)
# writes an output $o = (o_1, \dots, o_{|o|})$ token by token, and a reward $r(q, o)$ scores
# it. We want to maximize $J(\theta) = \mathbb{E}_{q,\, o \sim \pi_\theta}[r(q, o)]$. The
# **policy-gradient theorem** (Williams' REINFORCE, 1992) turns the gradient of this
# expectation into an expectation we can sample:
#
# $$\nabla_\theta J = \mathbb{E}\Big[\sum_{t=1}^{|o|} A_t\, \nabla_\theta \log \pi_\theta(o_t \mid q, o_{<t})\Big] \qquad (11.1)$$
#
# where the **advantage** $A_t$ says how much better than expected the outcome was. With
# $A_t = r$ this is unbiased but very noisy; subtracting a **baseline** $b(q)$ that does not
# depend on the sampled output keeps it unbiased
# ($\mathbb{E}[\nabla \log \pi] = \nabla \sum \pi = 0$) and reduces the variance.
#
# **PPO** (Schulman et al. 2017, arXiv:1707.06347) adds two things. First, it reuses each
# batch of samples for several gradient steps; the samples then come from an older policy
# $\pi_{\theta_{old}}$, which the probability ratio
# $\rho_t = \pi_\theta(o_t \mid \cdot) / \pi_{\theta_{old}}(o_t \mid \cdot)$ corrects
# (importance sampling). Second, it **clips** the ratio so that one batch cannot move the
# policy far:
#
# $$\mathcal{J}_{PPO} = \mathbb{E}\Big[\min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1-\varepsilon, 1+\varepsilon)\, A_t\big)\Big] \qquad (11.2)$$
#
# For a positive advantage, the objective stops rewarding increases of $\rho_t$ past
# $1+\varepsilon$ (the gradient of the clipped branch is zero); for a negative one, it stops
# rewarding decreases below $1-\varepsilon$. At $\rho_t = 1$, the gradient of (11.2) equals
# that of (11.1).
#
# PPO for language models estimates $A_t$ with a learned **value model** (critic) $V_\psi$
# and generalized advantage estimation. The critic is typically as large as the policy: a
# second model to hold in memory, run forward and backward, and train, and for a reward
# that only arrives at the last token, its per-token values are hard to learn.
#
# **GRPO** drops the critic. For each prompt it samples a *group* of $G$ outputs
# $o_1, \dots, o_G$ from $\pi_{\theta_{old}}$, scores them, and uses the group's statistics as
# the baseline and scale. With outcome rewards every token of output $i$ gets the same
# advantage (section 4.1.2 of DeepSeekMath):
#
# $$\hat A_{i,t} = \frac{r_i - \mathrm{mean}(r_1, \dots, r_G)}{\mathrm{std}(r_1, \dots, r_G)} \qquad (11.3)$$
#
# The mean of the other answers to the same question is a baseline that is free and adapts
# to the difficulty of each prompt. Instead of PPO's KL penalty in the reward, GRPO adds
# the KL divergence to a frozen **reference model** $\pi_{ref}$ (the policy before RL)
# directly to the loss, estimated per token with Schulman's unbiased, non-negative
# estimator ("Approximating KL divergence", 2020), often called k3:
#
# $$\mathbb{D}_{KL}[\pi_\theta \| \pi_{ref}] \approx \frac{\pi_{ref}(o_t \mid \cdot)}{\pi_\theta(o_t \mid \cdot)} - \log \frac{\pi_{ref}(o_t \mid \cdot)}{\pi_\theta(o_t \mid \cdot)} - 1 \qquad (11.4)$$
#
# The full objective, equation (3) of DeepSeekMath, to be maximized:
#
# $$\mathcal{J}_{GRPO}(\theta) = \mathbb{E}\Bigg[\frac{1}{G}\sum_{i=1}^{G}\frac{1}{|o_i|}\sum_{t=1}^{|o_i|}\Big\{\min\big(\rho_{i,t}\hat A_{i,t},\ \mathrm{clip}(\rho_{i,t}, 1-\varepsilon, 1+\varepsilon)\hat A_{i,t}\big) - \beta\, \mathbb{D}_{KL}[\pi_\theta \| \pi_{ref}]\Big\}\Bigg] \qquad (11.5)$$
#
# with $\varepsilon = 0.2$ and $\beta = 0.04$ in the paper. Our loss is $-\mathcal{J}$.
#
# ### The KL estimator (11.4)
#
# Write $x = \pi_{ref}/\pi_\theta$ for one sampled token. Since $\log x \le x - 1$ for all
# $x > 0$, the estimate $x - \log x - 1$ is never negative, token by token. And it is
# unbiased: under $o \sim \pi_\theta$, $\mathbb{E}[x] = \sum_o \pi_{ref}(o) = 1$, so
# $\mathbb{E}[x - \log x - 1] = \mathbb{E}[\log(\pi_\theta / \pi_{ref})] = \mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}]$.
# The naive estimator $k_1 = \log(\pi_\theta/\pi_{ref})$ has the same mean but is negative
# for many samples and much noisier.
#
# **Its gradient estimates a different KL.** In the loss, (11.4) is differentiated at the
# sampled tokens, not through the sampling. Per token, with $\nabla x = -x\,\nabla\log\pi_\theta$,
#
# $$\nabla_\theta (x - \log x - 1) = (1 - x)\,\nabla_\theta \log\pi_\theta(o_t), \qquad
# \mathbb{E}_{o \sim \pi_\theta}\big[(1 - x)\nabla\log\pi_\theta\big] = \underbrace{\textstyle\sum_o \nabla\pi_\theta(o)}_{=0} - \sum_o \pi_{ref}(o)\, \nabla\log\pi_\theta(o) = \nabla_\theta \mathbb{D}_{KL}[\pi_{ref} \| \pi_\theta] \qquad (11.4')$$
#
# So the *value* of the k3 term estimates $\mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}]$, as (11.5)
# says, but the *gradient* the optimizer receives is, in expectation, that of the reverse
# divergence $\mathbb{D}_{KL}[\pi_{ref}\|\pi_\theta]$ (the gradient of
# $\mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}]$ would be
# $\mathbb{E}[\log(\pi_\theta/\pi_{ref})\,\nabla\log\pi_\theta]$). Both vanish at
# $\pi_\theta = \pi_{ref}$ and both pull the policy back toward the reference, but they are
# different penalties; the paper does not say so. We check the value claims by sampling two
# random distributions over 50 tokens, and the gradient claim exactly, by weighting each
# token's gradient with its probability.

# %%
#| export lrn_lib.grpo
import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lrn_lib import validate
from lrn_lib.llama import KVCache, Llama, sample_next

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate (11.4): exp(ref - logp) - (ref - logp) - 1 >= 0; both (B, L) -> (B, L).

    logp are the policy's and ref_logp the reference model's log-probabilities of the
    sampled tokens; its mean over samples of the policy is KL(pi_theta || pi_ref).
    """
    validate.tensor(logp, "logp", kind="float")
    validate.tensor(ref_logp, "ref_logp", kind="float")
    validate.same_shape(logp=logp, ref_logp=ref_logp)
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1                                              # (11.4)


# %%
from lrn_lib.grpo import kl_k3

config.seed_everything(0)
p_theta = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
p_ref = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
exact_kl = (p_theta * (p_theta / p_ref).log()).sum().item()
samples = torch.multinomial(p_theta, 200_000, replacement=True)
lp, lr = p_theta.log()[samples], p_ref.log()[samples]
k3 = kl_k3(lp, lr)
k1 = lp - lr
print(f"exact KL(pi_theta || pi_ref) = {exact_kl:.3f}")
print(f"k3 mean = {k3.mean().item():.3f}, k1 mean = {k1.mean().item():.3f}")
print("k3 unbiased (|mean - KL| < 0.01):", abs(k3.mean().item() - exact_kl) < 0.01)
print("k3 never negative:", bool((k3 >= 0).all()), "| k1 negative on some samples:", bool((k1 < 0).any()))
print(f"standard deviation: k3 {k3.std().item():.2f}, k1 {k1.std().item():.2f}")

theta = p_theta.log().clone().requires_grad_(True)      # logits of pi_theta; the sampling is not differentiated
logp_all = torch.log_softmax(theta, 0)
grad_k3, = torch.autograd.grad((logp_all.exp().detach() * kl_k3(logp_all, p_ref.log())).sum(), theta)
grad_reverse, = torch.autograd.grad((p_ref * (p_ref.log() - torch.log_softmax(theta, 0))).sum(), theta)
grad_forward, = torch.autograd.grad((torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - p_ref.log())).sum(), theta)
print("E[grad k3] = grad KL(pi_ref || pi_theta)  (11.4'):", torch.allclose(grad_k3, grad_reverse, atol=1e-12))
print("E[grad k3] = grad KL(pi_theta || pi_ref):", torch.allclose(grad_k3, grad_forward, atol=1e-3),
      f"(largest difference {(grad_k3 - grad_forward).abs().max().item():.3f})")

# %% [markdown]
# ## 11.2 The pieces of the loss, and where they go wrong
#
# **Log-probabilities.** The model returns logits $z$ of shape $(B, T, V)$; the logits at
# position $t$ predict token $t+1$. So `logits[:, :-1]` is aligned with `ids[:, 1:]`, and of
# those we keep only the completion's tokens (the prompt is not the policy's action). The
# samples were drawn from $\mathrm{softmax}(z/\tau)$ at temperature $\tau$, so the ratio and
# the KL must use the same distribution:
#
# $$\log \pi_\theta(o_t \mid q, o_{<t}) = \log \mathrm{softmax}(z_{t-1} / \tau)[o_t] \qquad (11.6)$$
#
# Forgetting the division makes $\pi_{\theta_{old}}$ a different distribution from the one
# that produced the samples, and the importance ratios are then wrong.
#
# **The completion mask.** Generation runs a fixed number of steps; a sequence that has
# emitted the end-of-sequence token (EOS) is padded afterwards. The loss must cover the
# completion *up to and including the first EOS*. Many tokenizers use the same id for
# padding and EOS; a mask built as `ids != pad` then drops the EOS too, the EOS token never
# gets a gradient, and the model is never taught to stop. We build the mask from the
# position of the first EOS instead.
#
# **Advantages.** The $G$ samples of one prompt must be contiguous, so that
# `rewards.view(-1, G)` puts each group in a row. We divide by $\mathrm{std} + \epsilon$
# (the sample standard deviation with Bessel's correction, as TRL does, $\epsilon = 10^{-4}$):
# a group whose rewards are all equal (all right, or all wrong) gets advantage exactly 0,
# not NaN, and contributes no learning signal. The fraction of such groups is the first
# diagnostic to watch: when it approaches 1, the batch teaches nothing.

# %%
#| export lrn_lib.grpo
def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of the next tokens (11.6): logits (B, T, V), ids (B, T) -> (B, T - 1).

    Entry [b, t] is log p(ids[b, t + 1] | ids[b, :t + 1]): logits[:, :-1] aligned with ids[:, 1:].
    """
    validate.tensor(logits, "logits", dims=3, kind="float")
    validate.ids(ids, "ids", logits.shape[-1], dims=2)
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and ids (B, T); got {tuple(logits.shape)} and {tuple(ids.shape)}")
    validate.number(temperature, "temperature", low=0, low_open=True)
    work = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits[:, :-1].to(work) / temperature, dim=-1)          # (11.6)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def completion_logprobs(model: nn.Module, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (B, L) of the completion tokens (B, L) after the prompts (B, P) under model."""
    validate.instance(model, "model", nn.Module)
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    for name, t in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
        if vocab is None:
            validate.tensor(t, name, dims=2, kind="int")
        else:
            validate.ids(t, name, vocab, dims=2)
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids (B, P) and completion_ids (B, L) must share B; got "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    return token_logprobs(model(ids), ids, temperature)[:, prompt_ids.shape[1] - 1:]


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Float mask (B, L): 1 for tokens up to and including the first eos_id of each row, 0 after.

    Correct when the pad id equals eos_id (where `ids != pad` would drop the EOS token).
    """
    validate.tensor(completion_ids, "completion_ids", dims=2, kind="int")
    validate.integer(eos_id, "eos_id", low=0)
    is_eos = (completion_ids == eos_id).long()
    eos_before = is_eos.cumsum(1) - is_eos          # EOS tokens strictly before each position
    return (eos_before == 0).float()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, float]:
    """Group-relative advantages (11.3): rewards (N,) with each group's G samples contiguous -> ((N,), frac).

    A = (r - group mean) / (group std + eps) with the Bessel-corrected std, or r - group mean
    when scale is False (Dr. GRPO). frac is the fraction of groups whose rewards are all equal;
    those groups get advantage exactly 0 (their rounded mean need not equal their rewards).
    Integer or bool rewards are converted to floats.
    """
    validate.tensor(rewards, "rewards", dims=1, finite=True)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    validate.integer(group_size, "group_size", low=2)
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide the {rewards.numel()} rewards")
    validate.number(eps, "eps", low=0)
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    adv = centred / (grouped.std(dim=1, keepdim=True) + eps) if scale else centred   # (11.3)
    equal = (grouped == grouped[:, :1]).all(dim=1)
    adv = adv.masked_fill(equal[:, None], 0.0)       # exactly 0, not rounding noise / (0 + eps)
    return adv.reshape(-1), equal.sum().item() / grouped.shape[0]


# %% [markdown]
# A check of the three details on a hand-made batch: EOS id 0 doubles as padding;
# sequence 0 stopped after 3 tokens, sequence 1 never stopped. Then two groups of 4
# rewards, one of them all equal.

# %%
from lrn_lib.grpo import completion_mask, group_advantages, token_logprobs

ids = torch.tensor([[5, 7, 0, 0, 0], [6, 6, 6, 6, 6]])
print("mask keeping the first EOS:\n", completion_mask(ids, eos_id=0))
print("naive mask ids != pad:\n", (ids != 0).float())
adv, frac_equal = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.5, 1.0, 1.0, 1.0, 1.0]), group_size=4)
print("advantages:", [round(a, 3) for a in adv.tolist()], "| fraction of groups all equal:", frac_equal)
logits = torch.randn(2, 5, 9)
lp_t1, lp_t2 = token_logprobs(logits, ids, 1.0), token_logprobs(logits, ids, 2.0)
print("log-probs (B, T-1):", tuple(lp_t1.shape), "| temperature changes them:", not torch.allclose(lp_t1, lp_t2))

# %% [markdown]
# ## 11.3 One loss, four normalizations
#
# Per token, the loss is $\ell_{i,t} = -\min(\rho_{i,t}\hat A_i, \mathrm{clip}(\rho_{i,t})\hat A_i) + \beta\, \mathbb{D}_{i,t}$.
# How the $\ell_{i,t}$ are averaged is a design choice that matters more than it looks:
#
# * `grpo`, the paper's (11.5): mean over each sequence's tokens, then mean over sequences,
#   $\frac{1}{G}\sum_i \frac{1}{|o_i|}\sum_t \ell_{i,t}$. A token in a short answer weighs
#   more than a token in a long one. For a wrong answer ($\hat A < 0$) that means long
#   wrong answers are penalized *less* per token, a bias toward length that Dr. GRPO
#   (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) points out.
# * `bnpo`: sum over all tokens of the (micro-)batch divided by its number of tokens,
#   $\sum_{i,t} \ell_{i,t} / \sum_i |o_i|$: every token weighs the same.
# * `dapo` (Yu et al. 2025, DAPO, arXiv:2503.14476, "token-level policy gradient loss"):
#   the same token-level sum, divided by the token count of the *whole* generation batch
#   (across micro-batches and processes), so that splitting a batch does not change the
#   loss. In one process with one micro-batch, `bnpo` and `dapo` agree; our function takes
#   the global count as an optional argument.
# * `dr_grpo` (Dr. GRPO): divide the token sum by a constant, $B \times L_{max}$ (batch size
#   times the maximum completion length), which removes the length term; Dr. GRPO also
#   removes the std division in (11.3) (our `scale=False`), since dividing by the std
#   up-weights prompts that are nearly always solved or nearly always failed.
#
# DAPO also decouples the clipping range, $\mathrm{clip}(\rho, 1-\varepsilon_{low}, 1+\varepsilon_{high})$
# with $\varepsilon_{high} = 0.28 > \varepsilon_{low} = 0.2$ ("clip-higher"), to let unlikely
# good tokens grow; our function takes both.
#
# In (11.5), $\beta = 0.04$; DAPO and Dr. GRPO drop the KL term. TRL's `GRPOConfig` (version
# 1.16.0, the one our tests compare against) defaults to `loss_type="dapo"`, `num_iterations=1` (that is $\mu = 1$), `beta=0.0` (no
# reference model at all), `epsilon=0.2` with `epsilon_high` equal to it, and
# `scale_rewards="group"` (the std division of (11.3)). This chapter keeps the paper's
# `grpo` normalization and $\beta = 0.04$, and, like the paper and TRL, $\mu = 1$.
#
# **Why the loss is about 0 at the first step.** On the first pass over a batch,
# $\theta = \theta_{old}$, so every $\rho = 1$, the clip is inactive and, with the policy
# still equal to the reference, the KL is 0. The `grpo` loss is then
# $-\frac{1}{G}\sum_i \hat A_i$, and group-normalized advantages sum to zero: the loss is
# 0 (up to round-off), while its *gradient*, $-\frac{1}{G}\sum_i \hat A_i \frac{1}{|o_i|}\sum_t \nabla \log \pi_\theta(o_{i,t})$,
# is not. A flat, near-zero loss curve is therefore expected and says nothing about
# learning; watch the rewards. (With `bnpo`, `dapo` or `dr_grpo` the first loss is a length-weighted
# sum of advantages: small but not exactly 0.)

# %%
#| export lrn_lib.grpo
def _check_clip_range(epsilon_low: float | None, epsilon_high: float | None) -> None:
    """Raise unless epsilon_low is None or in [0, 1] and epsilon_high is None or >= 0 (and None without epsilon_low)."""
    if epsilon_low is None:
        if epsilon_high is not None:
            raise ValueError("epsilon_high needs epsilon_low: epsilon_low=None turns the clipping off")
        return
    validate.number(epsilon_low, "epsilon_low", low=0, high=1)       # the ratio is clipped at 1 - epsilon_low >= 0
    if epsilon_high is not None:
        validate.number(epsilon_high, "epsilon_high", low=0)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              loss_type: str = "grpo", epsilon_low: float | None = 0.2, epsilon_high: float | None = None,
              beta: float = 0.0, ref_logp: torch.Tensor | None = None, max_completion_length: int | None = None,
              n_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss -J of (11.5) with one of four normalizations (11.7); returns (loss, stats).

    logp, old_logp, ref_logp, mask: (B, L); advantages: (B,). epsilon_low=None turns the
    clipping off (REINFORCE). loss_type: "grpo" (per-sequence mean), "bnpo" (this batch's
    token mean), "dapo" (sum over n_tokens, the generation batch's token count, default this
    batch's), "dr_grpo" (sum over B * max_completion_length, default L). stats: clip_fraction
    (masked fraction of tokens where the clipped branch is active) and kl (masked mean of (11.4)).
    """
    validate.choice(loss_type, "loss_type", LOSS_TYPES)
    validate.tensor(logp, "logp", dims=2, kind="float")
    validate.tensor(old_logp, "old_logp", kind="float")
    validate.tensor(mask, "mask")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got dtype {mask.dtype}")
    validate.same_shape(logp=logp, old_logp=old_logp, mask=mask)
    validate.tensor(advantages, "advantages", kind="float", finite=True)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    _check_clip_range(epsilon_low, epsilon_high)
    beta = validate.number(beta, "beta", low=0)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if ref_logp is not None:
        validate.tensor(ref_logp, "ref_logp", kind="float")
        validate.same_shape(logp=logp, ref_logp=ref_logp)
    if max_completion_length is not None:
        validate.integer(max_completion_length, "max_completion_length", low=logp.shape[1])
    if n_tokens is not None:
        validate.number(n_tokens, "n_tokens", low=0)
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)                                               # rho_{i,t}
    if epsilon_low is None:
        per_token = -ratio * adv
        clipped = torch.zeros_like(mask, dtype=torch.bool)
    else:
        high = epsilon_low if epsilon_high is None else epsilon_high
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + high)
        per_token = -torch.min(ratio * adv, clipped_ratio * adv)                     # (11.2)
        clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    kl = None
    if beta != 0.0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl                                            # (11.5)
    masked = per_token * mask
    if loss_type == "grpo":                                                          # (11.7)
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        loss = masked.sum() / max(float(mask.sum()) if n_tokens is None else float(n_tokens), 1.0)
    else:
        loss = masked.sum() / (logp.shape[0] * (max_completion_length or logp.shape[1]))
    n = mask.sum().clamp(min=1.0)
    stats = {"clip_fraction": ((clipped.to(mask.dtype) * mask).sum() / n).item(),
             "kl": 0.0 if kl is None else ((kl.detach() * mask).sum() / n).item()}
    return loss, stats


# %% [markdown]
# The four normalizations on the same random batch (two groups of 4, ragged lengths), at
# the first step ($\rho = 1$) and after the policy has moved a little:

# %%
from lrn_lib.grpo import grpo_loss

config.seed_everything(0)
B, L = 8, 6
old = -torch.rand(B, L, dtype=torch.float64) * 2
lengths = torch.tensor([6, 2, 4, 5, 3, 6, 1, 4])
mask = (torch.arange(L)[None, :] < lengths[:, None]).double()
adv, _ = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0], dtype=torch.float64), 4)
moved = old + 0.3 * torch.randn(B, L, dtype=torch.float64)
for lt in ("grpo", "bnpo", "dapo", "dr_grpo"):
    first, _ = grpo_loss(old, old, adv, mask, lt, beta=0.04, ref_logp=old)
    later, stats = grpo_loss(moved, old, adv, mask, lt, beta=0.04, ref_logp=old)
    print(f"{lt:8s} first step {first.item():+.4f}   after a move {later.item():+.4f}   "
          f"clip fraction {stats['clip_fraction']:.2f}   kl {stats['kl']:.3f}")

# %% [markdown]
# As promised, `grpo` is exactly 0 at the first step: advantages sum to 0 in each group and
# each sequence weighs the same. The token-weighted `bnpo`, `dapo` and `dr_grpo` are not 0:
# they weigh each sequence's advantage by its length (here the longer sequences had lower
# rewards). All four have a non-zero gradient.
#
# ## 11.4 A task with verifiable answers
#
# Our problems are `a+b-c=` with a $d$-digit $a$ and $(d-1)$-digit $b$ and $c$ ($d = 2$ on
# the CPU, 3 on the GPU), so every prompt of a run has the same length. The answer format,
# modelled on DeepSeek-R1-Zero's template, is a thought between `<think>` and `</think>`,
# then the number, then EOS; the thought we teach in the warm-up writes out the two
# intermediate steps:
#
#     prompt:      47+5-8=
#     completion:  <think>47+5=52-8=44</think>44<eos>
#
# The tokenizer is character-level: 13 characters, plus `<think>`, `</think>` and `<eos>`
# as single tokens; `<eos>` is also the padding token, on purpose, so that the mask of
# section 11.2 matters. Two rule-based rewards, as in DeepSeek-R1: the **format reward** is
# 1 when the completion is exactly `<think>...</think>` + an integer + EOS; the **accuracy
# reward** is 1 when it is well formed and the integer is the answer. The total reward is
#
# $$r = r_{acc} + 0.5\, r_{fmt} \qquad (11.8)$$

# %%
#| export lrn_lib.grpo
class ArithmeticTokenizer:
    """Character tokenizer for a+b-c problems: ids 0 '<eos>' (also the pad), 1 '<think>', 2 '</think>', then '0'-'9+-='."""

    specials = ("<eos>", "<think>", "</think>")
    chars = "0123456789+-="

    def __init__(self) -> None:
        self.vocab = list(self.specials) + list(self.chars)
        self.ids = {s: i for i, s in enumerate(self.vocab)}
        self.eos_id = self.pad_id = 0
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    @property
    def vocab_size(self) -> int:
        """Number of tokens (16)."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens are written as '<eos>', '<think>', '</think>'."""
        validate.instance(text, "text", str)
        out = []
        for piece in self._split.split(text):
            if piece in self.ids and piece in self.specials:
                out.append(self.ids[piece])
                continue
            for ch in piece:
                if ch not in self.ids:
                    raise ValueError(f"text contains {ch!r}, which is not in the vocabulary")
                out.append(self.ids[ch])
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids, stopping after the first '<eos>' (which is kept)."""
        if isinstance(ids, torch.Tensor):
            ids = validate.tensor(ids, "ids", dims=1, kind="int", nonempty=False).tolist()
        elif isinstance(ids, (list, tuple)):
            for i in ids:
                validate.integer(i, "ids")
        else:
            raise TypeError(f"ids must be a list of ints or a 1-D integer tensor, got {type(ids).__name__}")
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got values from {min(ids)} to {max(ids)}")
        out = []
        for i in ids:
            out.append(self.vocab[i])
            if i == self.eos_id:
                break
        return "".join(out)


def make_problems(n: int, digits: int, generator: torch.Generator,
                  exclude: set[tuple[int, int, int]] | None = None) -> list[tuple[int, int, int]]:
    """n distinct problems (a, b, c): a with digits digits, b and c with digits - 1, none in exclude."""
    validate.integer(n, "n", low=1)
    validate.integer(digits, "digits", low=2, high=7)              # 8 digits overflow the int64 count below
    validate.generator(generator)
    if exclude is not None and not isinstance(exclude, (set, frozenset)):
        raise TypeError(f"exclude must be a set of problems or None, got {type(exclude).__name__}")
    lo = torch.tensor([10 ** (digits - 1), 10 ** (digits - 2), 10 ** (digits - 2)])
    span = torch.tensor([9 * 10 ** (digits - 1), 9 * 10 ** (digits - 2), 9 * 10 ** (digits - 2)])
    if n > int(span.prod()) - len(exclude or ()):
        raise ValueError(f"n={n} is more than the number of {digits}-digit problems left")
    exclude = exclude or set()
    found: dict[tuple[int, int, int], None] = {}
    while len(found) < n:
        draw = (lo + (torch.rand(2 * n, 3, generator=generator) * span).long()).tolist()
        for p in map(tuple, draw):
            if p not in exclude and len(found) < n:
                found[p] = None
    return list(found)


def _check_problem(problem: tuple[int, int, int], name: str = "problem") -> tuple[int, int, int]:
    """Raise unless problem is a tuple (a, b, c) of three non-negative ints; returns it."""
    if not isinstance(problem, (tuple, list)) or len(problem) != 3:
        raise TypeError(f"{name} must be a tuple (a, b, c) of three ints, got {problem!r}")
    for x in problem:
        validate.integer(x, name, low=0)
    return tuple(problem)


def _check_batch(completions: Sequence[str], problems: Sequence[tuple[int, int, int]]) -> None:
    """Raise unless completions is a non-empty list of str and problems a list of problems of the same length."""
    validate.nonempty(completions, "completions")
    validate.nonempty(problems, "problems")
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions but {len(problems)} problems")
    for c in completions:
        if not isinstance(c, str):
            raise TypeError(f"completions must hold str, got {type(c).__name__}")
    for p in problems:
        _check_problem(p, "problems")


def prompt_text(problem: tuple[int, int, int]) -> str:
    """'a+b-c=' for problem (a, b, c)."""
    a, b, c = _check_problem(problem)
    return f"{a}+{b}-{c}="


def solution_text(problem: tuple[int, int, int]) -> str:
    """The well-formed completion '<think>a+b=s-c=answer</think>answer<eos>' for problem (a, b, c)."""
    a, b, c = _check_problem(problem)
    return f"<think>{a}+{b}={a + b}-{c}={a + b - c}</think>{a + b - c}<eos>"


ANSWER_PATTERN = re.compile(r"<think>[0-9+\-=]*</think>(-?[0-9]+)<eos>")


def format_reward(completions: Sequence[str], problems: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """(N,) float: 1 where the completion is '<think>...</think>' + an integer + '<eos>', else 0."""
    _check_batch(completions, problems)
    return torch.tensor([float(ANSWER_PATTERN.fullmatch(c) is not None) for c in completions])


def accuracy_reward(completions: Sequence[str], problems: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """(N,) float: 1 where the completion is well formed and its integer equals a + b - c, else 0."""
    _check_batch(completions, problems)
    out = []
    for text, (a, b, c) in zip(completions, problems):
        m = ANSWER_PATTERN.fullmatch(text)
        out.append(float(m is not None and int(m.group(1)) == a + b - c))
    return torch.tensor(out)


# %%
from lrn_lib.grpo import ArithmeticTokenizer, accuracy_reward, format_reward, make_problems, prompt_text, solution_text

tok = ArithmeticTokenizer()
example = (47, 5, 8)
print(prompt_text(example), solution_text(example))
print("ids:", tok.encode(prompt_text(example) + solution_text(example)))
print("round trip:", tok.decode(tok.encode(solution_text(example))) == solution_text(example))
tries = [solution_text(example), "<think>47+5=52-8=44</think>45<eos>", "44<eos>", "<think>47+5=52-8=44</think>44"]
print("format  :", format_reward(tries, [example] * 4).tolist())
print("accuracy:", accuracy_reward(tries, [example] * 4).tolist())

# %% [markdown]
# ## 11.5 Rollouts with the KV cache, and the trainer
#
# A **rollout** repeats each prompt $G$ times (`repeat_interleave`, so that each group is
# contiguous), prefills the prompts once into chapter 6's `KVCache`, then samples one token
# per step at temperature $\tau$, feeding only the new token. A finished sequence keeps
# receiving EOS (= padding); generation stops when every sequence has finished or after
# `max_new_tokens`. All our prompts have the same length, so no left-padding is needed.
#
# The trainer's step is the algorithm of DeepSeekMath (its Algorithm 1) for one batch:
#
# 1. sample $G$ completions for each of the batch's prompts with $\pi_{\theta_{old}}$ (the current policy);
# 2. score them (11.8), compute group advantages (11.3);
# 3. compute $\log \pi_{ref}$ with the frozen reference model (only when $\beta \ne 0$);
# 4. take $\mu$ gradient steps on the loss (11.5)/(11.7) over the same samples. On the first,
#    $\theta = \theta_{old}$, so $\log\pi_{\theta_{old}}$ is the detached current value (as in
#    TRL); on the later ones the ratio moves away from 1 and clipping starts to act.
#
# REINFORCE with the group-mean baseline, one of the baselines of section 11.7, is the same step
# with $\mu = 1$ (so $\rho = 1$ where the gradient is taken, and the gradient of (11.2) is
# that of (11.1)), no clipping, no KL and no std division.

# %%
#| export lrn_lib.grpo
@torch.no_grad()
def rollout(model: Llama, prompt_ids: torch.Tensor, group_size: int, max_new_tokens: int, eos_id: int,
            temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample group_size completions per prompt with the KV cache: prompt_ids (P, T) -> (P * group_size, L).

    Row g of prompt p is row p * group_size + g (groups contiguous); L <= max_new_tokens;
    positions after a sequence's first eos_id hold eos_id. temperature 0 is greedy.
    """
    validate.instance(model, "model", Llama)
    validate.ids(prompt_ids, "prompt_ids", model.cfg.vocab_size, dims=2)
    validate.integer(group_size, "group_size", low=1)
    validate.integer(max_new_tokens, "max_new_tokens", low=1)
    validate.integer(eos_id, "eos_id", low=0, high=model.cfg.vocab_size - 1)
    validate.number(temperature, "temperature", low=0)
    validate.generator(generator, optional=True)
    prompts = prompt_ids.repeat_interleave(group_size, dim=0)
    param = next(model.parameters())
    b, t = prompts.shape
    cache = KVCache(model.cfg, b, t + max_new_tokens, param.dtype, param.device)
    done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
    fresh, start, out = prompts, 0, []
    for _ in range(max_new_tokens):
        logits = model(fresh, torch.arange(start, start + fresh.shape[1], device=prompts.device), cache)
        start += fresh.shape[1]
        nxt = sample_next(logits[:, -1].float(), temperature, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        fresh = nxt[:, None]
    return torch.stack(out, dim=1)


@dataclass
class GRPOConfig:
    """Hyperparameters of a GRPO step; REINFORCE is num_iterations=1, epsilon_low=None, beta=0, scale_rewards=False."""

    group_size: int = 8
    max_new_tokens: int = 20
    temperature: float = 1.0
    num_iterations: int = 2
    epsilon_low: float | None = 0.2
    epsilon_high: float | None = None
    beta: float = 0.04
    loss_type: str = "grpo"
    scale_rewards: bool = True
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        validate.choice(self.loss_type, "loss_type", LOSS_TYPES)
        validate.integer(self.group_size, "group_size", low=2)
        validate.integer(self.max_new_tokens, "max_new_tokens", low=1)
        validate.integer(self.num_iterations, "num_iterations", low=1)
        validate.number(self.temperature, "temperature", low=0, low_open=True)   # training samples, never greedy
        _check_clip_range(self.epsilon_low, self.epsilon_high)
        validate.number(self.beta, "beta", low=0)
        validate.flag(self.scale_rewards, "scale_rewards")
        validate.number(self.max_grad_norm, "max_grad_norm", low=0, low_open=True)


RewardFn = Callable[[Sequence[str], Sequence[tuple[int, int, int]]], torch.Tensor]


class GRPOTrainer:
    """GRPO on a Llama policy: step(problems) samples, scores, and takes num_iterations gradient steps.

    rewards maps a name to (function(completions, problems) -> (N,), weight); the total
    reward (11.8) is the weighted sum. The reference model is a frozen copy of the policy
    at construction, kept only when beta != 0.
    """

    def __init__(self, policy: Llama, tokenizer: ArithmeticTokenizer, rewards: dict[str, tuple[RewardFn, float]],
                 optimizer: torch.optim.Optimizer, cfg: GRPOConfig,
                 prompt_fn: Callable[[tuple[int, int, int]], str] = prompt_text) -> None:
        validate.instance(policy, "policy", Llama)
        validate.instance(tokenizer, "tokenizer", ArithmeticTokenizer)
        if tokenizer.vocab_size > policy.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the policy only {policy.cfg.vocab_size}")
        if not isinstance(rewards, dict):
            raise TypeError(f"rewards must be a dict name -> (function, weight), got {type(rewards).__name__}")
        if not rewards:
            raise ValueError("rewards must name at least one reward function")
        for name, entry in rewards.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
                raise TypeError(f"rewards[{name!r}] must be a (function, weight) pair, got {entry!r}")
            validate.number(entry[1], f"rewards[{name!r}] weight")
        validate.instance(optimizer, "optimizer", torch.optim.Optimizer)
        validate.instance(cfg, "cfg", GRPOConfig)
        if not callable(prompt_fn):
            raise TypeError(f"prompt_fn must be callable, got {type(prompt_fn).__name__}")
        self.policy, self.tokenizer, self.rewards, self.optimizer, self.cfg = policy, tokenizer, rewards, optimizer, cfg
        self.prompt_fn = prompt_fn
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta != 0.0 else None

    def encode_prompts(self, problems: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Prompt ids (P, T) on the policy's device; all prompts must have the same length."""
        validate.nonempty(problems, "problems")
        rows = [self.tokenizer.encode(self.prompt_fn(p)) for p in problems]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("problems give prompts of different lengths; this trainer does not left-pad")
        return torch.tensor(rows, device=next(self.policy.parameters()).device)

    def score(self, completion_ids: torch.Tensor, problems: Sequence[tuple[int, int, int]]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """Total rewards (N,), each named reward (N,), and the decoded texts of completion_ids (N, L)."""
        validate.ids(completion_ids, "completion_ids", self.tokenizer.vocab_size, dims=2)
        validate.nonempty(problems, "problems")
        if len(problems) != completion_ids.shape[0]:
            raise ValueError(f"{completion_ids.shape[0]} completion_ids rows but {len(problems)} problems")
        texts = [self.tokenizer.decode(row) for row in completion_ids.cpu()]
        parts = {}
        for name, (fn, _) in self.rewards.items():
            part = validate.tensor(fn(texts, problems), f"reward {name!r}", dims=1, finite=True)
            if part.shape[0] != len(texts):
                raise ValueError(f"reward {name!r} returned {part.shape[0]} values for {len(texts)} completions")
            parts[name] = part if part.is_floating_point() else part.to(torch.get_default_dtype())
        total = sum(w * parts[name] for name, (_, w) in self.rewards.items())            # (11.8)
        return total, parts, texts

    def step(self, problems: Sequence[tuple[int, int, int]], generator: torch.Generator | None = None) -> dict[str, float]:
        """One GRPO step on a batch of problems; returns rewards, lengths and loss statistics."""
        validate.generator(generator, optional=True)
        cfg = self.cfg
        prompts = self.encode_prompts(problems)
        self.policy.eval()
        completions = rollout(self.policy, prompts, cfg.group_size, cfg.max_new_tokens, self.tokenizer.eos_id,
                              cfg.temperature, generator)
        mask = completion_mask(completions, self.tokenizer.eos_id)
        repeated = [p for p in problems for _ in range(cfg.group_size)]
        total, parts, _ = self.score(completions, repeated)
        adv, all_equal = group_advantages(total, cfg.group_size, scale=cfg.scale_rewards)
        adv = adv.to(prompts.device)
        prompt_rows = prompts.repeat_interleave(cfg.group_size, dim=0)
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp = completion_logprobs(self.ref, prompt_rows, completions, cfg.temperature)
        self.policy.train()
        old_logp, first_loss = None, 0.0
        for it in range(cfg.num_iterations):
            logp = completion_logprobs(self.policy, prompt_rows, completions, cfg.temperature)
            if old_logp is None:
                old_logp = logp.detach()          # theta_old = theta on the first pass: rho = 1
            loss, stats = grpo_loss(logp, old_logp, adv, mask, cfg.loss_type, cfg.epsilon_low, cfg.epsilon_high,
                                    cfg.beta, ref_logp, cfg.max_new_tokens)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            if it == 0:
                first_loss = loss.item()
        out = {"reward": total.mean().item(), "loss_first_pass": first_loss, "all_equal_groups": all_equal,
               "completion_length": mask.sum(1).mean().item(), **stats}
        out.update({name: v.mean().item() for name, v in parts.items()})
        return out


@torch.no_grad()
def evaluate(trainer: GRPOTrainer, problems: Sequence[tuple[int, int, int]], temperature: float = 0.0,
             batch: int = 512, generator: torch.Generator | None = None) -> tuple[dict[str, float], list[str]]:
    """Mean named rewards and completion length on problems (greedy by default), and the completions' texts."""
    validate.instance(trainer, "trainer", GRPOTrainer)
    validate.nonempty(problems, "problems")
    validate.number(temperature, "temperature", low=0)
    validate.integer(batch, "batch", low=1)
    validate.generator(generator, optional=True)
    trainer.policy.eval()
    sums: dict[str, float] = {}
    texts: list[str] = []
    length = 0.0
    for i in range(0, len(problems), batch):
        chunk = list(problems[i:i + batch])
        ids = rollout(trainer.policy, trainer.encode_prompts(chunk), 1, trainer.cfg.max_new_tokens,
                      trainer.tokenizer.eos_id, temperature, generator)
        _, parts, chunk_texts = trainer.score(ids, chunk)
        texts += chunk_texts
        length += completion_mask(ids, trainer.tokenizer.eos_id).sum().item()
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + v.sum().item()
    out = {name: s / len(problems) for name, s in sums.items()}
    out["completion_length"] = length / len(problems)
    return out, texts


# %% [markdown]
# ## 11.6 The supervised warm-up
#
# DeepSeek-R1-Zero starts RL from a base model that can already produce the format now
# and then; DeepSeek-R1 first fine-tunes on a few thousand "cold-start" examples. Our
# stand-in: a character-level Llama (chapter 6) of about 0.8M parameters on the CPU,
# trained for a short time on worked solutions, 15% of which are deliberately malformed
# (the thought or its closing tag is missing), so that the model starts out sometimes
# malformed and often wrong. The loss covers the completion only (with the first EOS,
# section 11.2).

# %%
DIGITS = config.pick(cpu=2, gpu=3)
WARMUP_STEPS = config.pick(cpu=500, gpu=2500)
WARMUP_BATCH = config.pick(cpu=64, gpu=256)
cfg_model = tiny_config(vocab_size=tok.vocab_size, dim=config.pick(cpu=128, gpu=256),
                        n_layers=config.pick(cpu=4, gpu=6), n_heads=4, n_kv_heads=2,
                        ffn_dim=config.pick(cpu=384, gpu=768), max_seq_len=64)
MAX_NEW = 6 * DIGITS + 12
gen = torch.Generator().manual_seed(0)
held_out = make_problems(config.pick(cpu=256, gpu=512), DIGITS, gen)
held_out_set = set(held_out)
print(f"model: {parameter_count(cfg_model) / 1e6:.2f}M parameters | {DIGITS}-digit problems | "
      f"{len(held_out)} held-out problems")


def malformed(problem: tuple[int, int, int], r: float) -> str:
    a, b, c = problem
    if r < 0.075:
        return f"{a + b - c}<eos>"                                    # no thought
    return f"<think>{a}+{b}={a + b}-{c}={a + b - c}{a + b - c}<eos>"  # no closing tag


def sft_batch(problems, generator):
    rows, starts = [], []
    for p in problems:
        r = torch.rand((), generator=generator).item()
        completion = malformed(p, r) if r < 0.15 else solution_text(p)
        prompt = tok.encode(prompt_text(p))
        rows.append(prompt + tok.encode(completion))
        starts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in rows])
    loss_mask = torch.zeros_like(ids, dtype=torch.float32)
    for i, s in enumerate(starts):
        loss_mask[i, s:] = completion_mask(ids[i:i + 1, s:], tok.eos_id)[0]
    return ids, loss_mask


def sft_loss(model, ids, loss_mask):
    logp = token_logprobs(model(ids), ids)
    m = loss_mask[:, 1:]
    return -(logp * m).sum() / m.sum()


# %%
# NBVAL_IGNORE_OUTPUT
config.seed_everything(0)
policy = Llama(cfg_model).to(config.DEVICE)
opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
gen = torch.Generator().manual_seed(1)
t0 = time.perf_counter()
sft_losses = []
for step in range(WARMUP_STEPS):
    ids, m = (t.to(config.DEVICE) for t in sft_batch(make_problems(WARMUP_BATCH, DIGITS, gen, held_out_set), gen))
    loss = sft_loss(policy, ids, m)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    sft_losses.append(loss.item())
print(f"warm-up: {WARMUP_STEPS} steps in {time.perf_counter() - t0:.0f} s, loss {sft_losses[0]:.2f} -> "
      f"{sum(sft_losses[-20:]) / 20:.3f}")

# %% [markdown]
# The warm-up's learning rate ramps up over 30 steps to $3 \times 10^{-3}$ and then stays
# there: it is never annealed. That matters for what follows. Every method of section 11.7
# continues at $3 \times 10^{-4}$, and merely lowering the learning rate of a model trained
# at a constant high rate improves it (the noise of the large steps goes away). So part of
# any gain after the warm-up is annealing, not reinforcement learning; the continued-SFT
# baseline of section 11.7 takes the same lower rate and measures that part.
#
# We measure a model on the held-out problems in two ways: greedy decoding, and $n = 8$
# samples per problem at $\tau = 1$ as the rollouts do. From the samples, **pass@k** is the
# probability that at least one of $k$ samples is right; with $c$ right among $n$, the
# unbiased estimate (Chen et al. 2021, arXiv:2107.03374) is
#
# $$\text{pass@}k = 1 - \binom{n - c}{k} \Big/ \binom{n}{k} \qquad (11.9)$$
#
# pass@1 is the sampled accuracy, the expected reward that GRPO maximizes; pass@8 says how
# often the right answer is *within reach* of the policy at all.

# %%
#| export lrn_lib.grpo
def pass_at_k(correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k (11.9) of each problem from its n samples: correct (P, n) of 0/1 -> (P,) float64.

    With c right among n samples, pass@k = 1 - C(n - c, k) / C(n, k), the probability that k of
    the n samples drawn without replacement hold at least one right answer.
    """
    validate.tensor(correct, "correct", dims=2)
    if not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must hold only 0 and 1")
    validate.integer(k, "k")
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    wrong = (n - correct.to(torch.int64).sum(1)).tolist()
    return 1.0 - torch.tensor([math.comb(w, k) / math.comb(n, k) for w in wrong], dtype=torch.float64)  # (11.9)


# %%
from lrn_lib.grpo import GRPOConfig, GRPOTrainer, evaluate, pass_at_k

REWARDS = {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5)}           # (11.8)
N_SAMPLES = 8


def measure(model):
    """Held-out greedy accuracy; pass@1, pass@8 (11.9) and format of N_SAMPLES samples per problem at tau = 1."""
    probe = GRPOTrainer(model, tok, REWARDS, torch.optim.SGD(model.parameters(), lr=0.0),
                        GRPOConfig(max_new_tokens=MAX_NEW, beta=0.0))
    greedy, greedy_texts = evaluate(probe, held_out)
    sampled, texts = evaluate(probe, held_out * N_SAMPLES, 1.0, generator=torch.Generator().manual_seed(2))
    correct = accuracy_reward(texts, held_out * N_SAMPLES).view(N_SAMPLES, -1).T           # (P, n)
    return {"pass@1": pass_at_k(correct, 1).mean().item(), "pass@8": pass_at_k(correct, N_SAMPLES).mean().item(),
            "greedy": greedy["accuracy"], "format": sampled["format"]}, greedy_texts


before, before_texts = measure(policy)

# %%
# NBVAL_IGNORE_OUTPUT
print("warm-up, held-out:", {k: round(v, 3) for k, v in before.items()})
for p, text in list(zip(held_out, before_texts))[:6]:
    print(f"  {prompt_text(p)} {text:32s} (answer {p[0] + p[1] - p[2]})")

# %%
print("warm-up leaves room to learn: greedy accuracy < 0.7 and sampled format < 0.95:",
      before["greedy"] < 0.7 and before["format"] < 0.95)
print("the right answer is often within reach (pass@8 > pass@1 + 0.3):", before["pass@8"] > before["pass@1"] + 0.3)

# %% [markdown]
# ## 11.7 GRPO against the baselines a skeptic asks for first
#
# GRPO lifts the held-out accuracy of this model; the question is whether it lifts it *more
# than the simple things* one could do with the same prompts and the same number of
# updates. Four methods, each started from the warm-up model, each for the same number of
# steps on the same stream of prompts (32 per step on the CPU), each taking **one** AdamW
# update per step at $3 \times 10^{-4}$ with the gradient norm clipped to 1:
#
# * **GRPO**, as in DeepSeekMath: $G = 8$ samples per prompt, advantages (11.3), the `grpo`
#   normalization, $\varepsilon = 0.2$, $\beta = 0.04$ with the warm-up model as the
#   reference, and $\mu = 1$ policy update per batch (section 11.8 says why, and what
#   $\mu > 1$ changes).
# * **REINFORCE** with the group-mean baseline: the same rollouts and update count, no std
#   division, no clipping (with $\mu = 1$ it never acts anyway), no KL term.
# * **RFT**, rejection-sampling fine-tuning (Yuan et al. 2023, arXiv:2308.01825): the same
#   $G = 8$ samples per prompt and the same verifier, but the update is plain supervised
#   learning on the samples that are right. Ours samples from the current policy at every
#   step, which DeepSeekMath (section 5.2.1) calls *online* RFT; Yuan et al. sample once,
#   from the starting model.
# * **SFT**, the warm-up continued: the same prompts with their worked solutions from the
#   warm-up's data (15% still malformed), no sampling at all.
#
# GRPO, REINFORCE and RFT see the same $32 \times 8$ sampled completions per step; SFT sees
# the 32 reference solutions, which is cheaper and uses labels the others never get. Three
# seeds each; the seed sets the prompt stream (shared by the four methods) and the sampling.

# %%
from lrn_lib.grpo import completion_logprobs, rollout

RL_STEPS = config.pick(cpu=30, gpu=30)
PROMPTS_PER_STEP = config.pick(cpu=32, gpu=64)
G = 8
RL_LR = 3e-4
SEEDS = (0, 1, 2)
METHODS = ("GRPO", "REINFORCE", "RFT", "SFT")
CONFIGS = {
    "GRPO": GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, num_iterations=1, epsilon_low=0.2, beta=0.04,
                       loss_type="grpo"),
    "REINFORCE": GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, num_iterations=1, epsilon_low=None, beta=0.0,
                            scale_rewards=False, loss_type="grpo"),
    "RFT": GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, beta=0.0),   # only its sampling settings are used
    "SFT": GRPOConfig(group_size=G, max_new_tokens=MAX_NEW, beta=0.0),
}


def update(trainer, loss):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.policy.parameters(), trainer.cfg.max_grad_norm)
    trainer.optimizer.step()


def rft_step(trainer, problems, generator):
    """Sample G completions per prompt, keep the right ones, one SFT update on them."""
    cfg = trainer.cfg
    prompts = trainer.encode_prompts(problems)
    trainer.policy.eval()
    completions = rollout(trainer.policy, prompts, G, cfg.max_new_tokens, tok.eos_id, cfg.temperature, generator)
    _, parts, _ = trainer.score(completions, [p for p in problems for _ in range(G)])
    keep = parts["accuracy"].to(prompts.device) > 0
    if keep.any():
        trainer.policy.train()
        kept, mask = completions[keep], completion_mask(completions[keep], tok.eos_id)
        logp = completion_logprobs(trainer.policy, prompts.repeat_interleave(G, dim=0)[keep], kept)
        update(trainer, -(logp * mask).sum() / mask.sum())
    return {"accuracy": parts["accuracy"].mean().item(), "format": parts["format"].mean().item()}


def sft_step(trainer, problems, generator):
    """One update of the warm-up's loss on the problems' worked solutions."""
    trainer.policy.train()
    ids, m = (t.to(config.DEVICE) for t in sft_batch(problems, generator))
    update(trainer, sft_loss(trainer.policy, ids, m))
    return {}


def train(method, seed):
    config.seed_everything(seed)
    model = copy.deepcopy(policy)
    opt = torch.optim.AdamW(model.parameters(), lr=RL_LR, weight_decay=0.0)
    trainer = GRPOTrainer(model, tok, REWARDS, opt, CONFIGS[method])
    prompt_gen, sample_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(1000 + seed)
    step_fn = {"RFT": partial(rft_step, trainer), "SFT": partial(sft_step, trainer)}.get(method, trainer.step)
    history = [step_fn(make_problems(PROMPTS_PER_STEP, DIGITS, prompt_gen, held_out_set), sample_gen)
               for _ in range(RL_STEPS)]
    return model, history


# %%
# NBVAL_IGNORE_OUTPUT
results = {m: [] for m in METHODS}
histories = {m: [] for m in METHODS}
seconds = dict.fromkeys(METHODS, 0.0)
for seed in SEEDS:
    for method in METHODS:
        t0 = time.perf_counter()
        model, history = train(method, seed)
        seconds[method] += time.perf_counter() - t0
        scores, texts = measure(model)
        results[method].append(scores)
        histories[method].append(history)
        if method == "GRPO" and seed == 0:
            grpo_texts = texts
print(f"{RL_STEPS} steps x {PROMPTS_PER_STEP} prompts, {len(SEEDS)} seeds; training seconds per run:",
      {m: round(s / len(SEEDS)) for m, s in seconds.items()})
print("GRPO, seed 0:", {k: round(v, 3) for k, v in results["GRPO"][0].items()})
print(f"first-pass loss of GRPO's first step: {histories['GRPO'][0][0]['loss_first_pass']:+.1e}")

# %% [markdown]
# The training curves of the three sampling methods (mean over the seeds): the accuracy and
# the format of the rollouts, which are fresh prompts at every step and so an unbiased
# running estimate of pass@1; for GRPO also the fraction of groups with no signal (all
# rewards equal) and the KL to the reference.

# %%
# NBVAL_IGNORE_OUTPUT
def curve(method, key):
    return [sum(h[s][key] for h in histories[method]) / len(SEEDS) for s in range(RL_STEPS)]


fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
for method in ("GRPO", "REINFORCE", "RFT"):
    axes[0].plot(range(1, RL_STEPS + 1), curve(method, "accuracy"), label=method)
    axes[1].plot(range(1, RL_STEPS + 1), curve(method, "format"), label=method)
axes[2].plot(range(1, RL_STEPS + 1), curve("GRPO", "all_equal_groups"))
axes[3].plot(range(1, RL_STEPS + 1), curve("GRPO", "kl"))
for ax, title in zip(axes, ("rollout accuracy", "rollout format", "GRPO: groups all equal", "GRPO: KL to ref (k3)")):
    ax.set_title(title)
    ax.set_xlabel("step")
axes[0].legend()
plt.tight_layout()
plt.show()
print("GRPO rollout accuracy, first 5 / last 5 steps:",
      round(sum(curve("GRPO", "accuracy")[:5]) / 5, 3), round(sum(curve("GRPO", "accuracy")[-5:]) / 5, 3))

# %%
print("GRPO's first-pass loss is ~0 (ratio 1, advantages sum to 0):",
      all(abs(h[0]["loss_first_pass"]) < 1e-5 for h in histories["GRPO"]))
print("with mu = 1 the clip never acts (clip fraction exactly 0):",
      all(s["clip_fraction"] == 0.0 for h in histories["GRPO"] for s in h))
print("the policy moves away from the reference (KL > 0 at the end):",
      all(h[-1]["kl"] > 0 for h in histories["GRPO"]))

# %% [markdown]
# Completions for the same held-out prompts before and after GRPO (seed 0, greedy):

# %%
# NBVAL_IGNORE_OUTPUT
for p, b_text, a_text in list(zip(held_out, before_texts, grpo_texts))[:8]:
    print(f"{prompt_text(p)} (= {p[0] + p[1] - p[2]:4d})  before: {b_text:30s} after: {a_text}")

# %% [markdown]
# ## 11.8 One update per batch, or several: what $\mu$ changes
#
# DeepSeekMath's Algorithm 1 allows $\mu$ updates per batch of samples, but its RL
# experiments take one: each batch is used for a single gradient step ($\mu = 1$, section
# 4.2 of the paper). TRL's default is the same (`num_iterations=1`). With $\mu = 1$ the only
# update happens at $\theta = \theta_{old}$: every ratio $\rho$ is 1, the clip in (11.2) is
# never active, and the gradient of (11.5) is the policy gradient (11.1) with the advantages
# (11.3) plus the KL term's (11.4'). The whole PPO machinery is inert; GRPO with $\mu = 1$ is
# REINFORCE with a group-normalized baseline and a KL penalty.
#
# With $\mu > 1$, the later passes reuse samples drawn from the policy *before* the earlier
# updates: $\rho$ moves away from 1, and the clip starts to cut off the tokens whose
# probability has already moved more than $\varepsilon$ in the direction their advantage
# pushes. That buys more updates per rollout, at the price of updates on stale samples. We
# take one batch from the warm-up model and make four passes over it, printing how far the
# ratios have moved and what fraction of tokens is clipped.

# %%
# NBVAL_IGNORE_OUTPUT
config.seed_everything(0)
mu_model = copy.deepcopy(policy)
mu_opt = torch.optim.AdamW(mu_model.parameters(), lr=RL_LR, weight_decay=0.0)
mu_trainer = GRPOTrainer(mu_model, tok, REWARDS, mu_opt, CONFIGS["GRPO"])
batch_problems = make_problems(PROMPTS_PER_STEP, DIGITS, torch.Generator().manual_seed(7), held_out_set)
prompt_rows = mu_trainer.encode_prompts(batch_problems).repeat_interleave(G, dim=0)
mu_model.eval()
completions = rollout(mu_model, mu_trainer.encode_prompts(batch_problems), G, MAX_NEW, tok.eos_id, 1.0,
                      torch.Generator().manual_seed(8))
mask = completion_mask(completions, tok.eos_id)
total, _, _ = mu_trainer.score(completions, [p for p in batch_problems for _ in range(G)])
advantages = group_advantages(total, G)[0].to(config.DEVICE)
mu_model.train()
with torch.no_grad():
    old_logp = completion_logprobs(mu_model, prompt_rows, completions)   # theta_old = theta_ref here
clip_by_pass = []
for it in range(4):
    logp = completion_logprobs(mu_model, prompt_rows, completions)
    loss, stats = grpo_loss(logp, old_logp, advantages, mask, "grpo", 0.2, None, 0.04, old_logp, MAX_NEW)
    moved = (((logp.detach() - old_logp).abs() * mask).sum() / mask.sum()).item()
    clip_by_pass.append(stats["clip_fraction"])
    print(f"pass {it + 1}: mean |log rho| {moved:.4f}, clip fraction {stats['clip_fraction']:.4f}")
    update(mu_trainer, loss)

# %%
print("pass 1 (mu = 1) never clips:", clip_by_pass[0] == 0.0)
print("every later pass clips some tokens (clip fraction > 0 on passes 2 to 4):", all(c > 0 for c in clip_by_pass[1:]))

# %% [markdown]
# The first pass is exactly what $\mu = 1$ does. From the second pass on, the ratios have
# moved and a growing fraction of tokens sits outside $[1 - \varepsilon, 1 + \varepsilon]$ on
# the side its advantage pushes, where the clipped objective stops pulling. This is the only
# place where GRPO differs from the REINFORCE baseline by more than the std division and the
# KL term. An earlier version of this chapter trained with $\mu = 2$ (one seed, log in
# `benchmarks/results/chapter11_gpu_profile_NVIDIA_H100_80GB_HBM3_2026-11-23.txt`): on the
# GPU, REINFORCE with half as many updates on the same number of batches still ended higher
# (0.91 against 0.82 held-out sampled accuracy), so the extra clipped passes did not pay
# there. That was one seed, and we do not rerun it with seeds here.

# %% [markdown]
# ## 11.9 Is it real? GRPO against continued SFT, RFT and REINFORCE, three seeds
#
# The held-out figures of the four methods of section 11.7 after the same number of steps,
# as mean ± standard deviation over the three seeds (the warm-up model, the starting point
# of all four, in the first row).

# %%
# NBVAL_IGNORE_OUTPUT
from lrn_lib import profile_results

METRICS = ("pass@1", "pass@8", "greedy", "format")


def mean_sd(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item()


print(f"{'held-out':10s}" + "".join(f"{k:>16s}" for k in METRICS))
print(f"{'warm-up':10s}" + "".join(f"{before[k]:16.3f}" for k in METRICS))
for m in METHODS:
    print(f"{m:10s}" + "".join("{:10.3f} ± {:.3f}".format(*mean_sd([r[m_k] for r in results[m]])) for m_k in METRICS))
print("pass@1 per seed:", {m: [round(r["pass@1"], 3) for r in results[m]] for m in METHODS})

fig, ax = plt.subplots(figsize=(8, 3.4))
width = 0.8 / len(METHODS)
for j, m in enumerate(METHODS):
    stats = [mean_sd([r[k] for r in results[m]]) for k in METRICS]
    ax.bar([i + (j - 1.5) * width for i in range(len(METRICS))], [s[0] for s in stats], width,
           yerr=[s[1] for s in stats], capsize=3, label=m)
ax.scatter(range(len(METRICS)), [before[k] for k in METRICS], color="black", marker="_", s=400, zorder=3,
           label="warm-up")
ax.set_xticks(range(len(METRICS)), METRICS)
ax.set_ylabel("held-out (mean ± sd, 3 seeds)")
ax.set_ylim(0, 1.05)
ax.legend(ncol=5, fontsize=8, loc="lower right")
plt.tight_layout()
plt.show()

profile_results.record("11", "warm_up", before)
profile_results.record("11", "per_seed", {m: {k: [r[k] for r in results[m]] for k in METRICS} for m in METHODS})
profile_results.record("11", "mu_demo_clip_fraction_by_pass", clip_by_pass)
profile_results.record("11", "train_seconds_per_run", {m: s / len(SEEDS) for m, s in seconds.items()})

# %%
mean = {m: {k: mean_sd([r[k] for r in results[m]])[0] for k in METRICS} for m in METHODS}
print("CPU profile: every method lifts pass@1 over the warm-up by > 0.1:",
      all(mean[m]["pass@1"] > before["pass@1"] + 0.1 for m in METHODS))
print("GRPO's format beats continued SFT's by > 0.05:", mean["GRPO"]["format"] > mean["SFT"]["format"] + 0.05)
print("continued SFT's greedy accuracy is at least GRPO's:", mean["SFT"]["greedy"] >= mean["GRPO"]["greedy"])
print("GRPO's pass@1 is within 0.05 of REINFORCE's and of RFT's:",
      all(abs(mean["GRPO"]["pass@1"] - mean[m]["pass@1"]) < 0.05 for m in ("REINFORCE", "RFT")))
print("among well-formed samples GRPO is not more accurate than continued SFT (pass@1 / format):",
      mean["GRPO"]["pass@1"] / mean["GRPO"]["format"] <= mean["SFT"]["pass@1"] / mean["SFT"]["format"])

# %% [markdown]
# **What the CPU numbers show.** All four methods lift pass@1 from 0.25 to between 0.44 and
# 0.48, and the differences among them (about 0.04 at most) are smaller than the spread over
# seeds (up to ±0.05): on pass@1, GRPO is not distinguishable from REINFORCE, from RFT, or
# from simply continuing the supervised warm-up. Most of the lift comes without any
# reinforcement: continued SFT, which never samples, reaches 0.44, because the lower
# learning rate alone improves the un-annealed warm-up model (section 11.6). Where the
# methods do differ:
#
# * **Format.** The three methods that learn from their own verified samples end at 0.98 to
#   0.99 well-formed samples; continued SFT stays at 0.83, since its data keeps the
#   warm-up's 15% malformed solutions. This is GRPO's clear gain over SFT, and RFT and
#   REINFORCE share it. A sample counts as right only when it is well formed, so
#   pass@1 / format is the accuracy among well-formed samples: about 0.53 for SFT and 0.46
#   for GRPO. GRPO's pass@1 matches SFT's because it fixed the format, not because it does
#   the arithmetic better.
# * **Greedy accuracy and pass@8** are highest for continued SFT (0.75 and 0.95, against
#   GRPO's 0.61 and 0.90). The methods that learn from samples concentrate probability on
#   answers the policy already gives (sharpening), which raises pass@1 more than pass@8.
# * **GRPO against REINFORCE**, with the same rollouts and updates: 0.454 against 0.455
#   pass@1, no difference on any figure beyond the seed spread. With $\mu = 1$ the std
#   division and the KL term at $\beta = 0.04$ are the only differences, and at this scale
#   they do not matter.
# * **RFT** is nominally the best of the sampling methods on pass@1, pass@8 and greedy
#   accuracy, with the smallest spread, and it is cheaper: one supervised update on the
#   kept samples (less than half of GRPO's training time per run in our CPU run).
#
# So on the CPU profile, what GRPO adds over these baselines is the format, and the
# sampled accuracy that comes with it; learning from verified samples in any of the three
# ways adds the same, and the supervised baseline stays ahead at greedy decoding and at
# pass@8. This is three seeds of a 0.8M-parameter model after 30 steps on a toy task;
# it says nothing about long RL runs on large models, where DeepSeek-R1 reports behaviour
# that its supervised data did not contain.
#
# **The GPU profile agrees on everything but the size of the SFT gap** (table below; one
# H200, a 4.7M-parameter model, seeds 0-2). Its warm-up model is far stronger (pass@1
# 0.78, greedy 0.89, format 0.88), and GRPO, REINFORCE and RFT again end together, at
# 0.917 to 0.922 pass@1 with format 0.99. Continued SFT gains almost nothing on pass@1
# (0.80) and keeps its format at 0.86, so here the sampling methods lead it by 0.12. That
# lead is the format again: among well-formed samples SFT is right 0.93 of the time and
# GRPO 0.92. SFT is still best at greedy decoding (0.955 against GRPO's 0.939) and at
# pass@8 (0.980 against 0.968). The conclusion that holds on both profiles: at matched
# samples and updates GRPO is indistinguishable from REINFORCE with a group-mean baseline
# and from rejection-sampling fine-tuning; what learning from verified samples adds over
# continued supervised training is the format, not better arithmetic.
#
# The same table from the GPU profile, beside this run's:

# %%
# NBVAL_IGNORE_OUTPUT
gpu = profile_results.recorded("11")["figures"]
print(profile_results.describe_run("11"))
print(f"{'':10s}{'':8s}{'CPU (this run)':>18s}{'GPU':>18s}")
for m in METHODS:
    for k in METRICS:
        cpu_cell = "{:.3f} ± {:.3f}".format(*mean_sd([r[k] for r in results[m]]))
        gpu_cell = "{:.3f} ± {:.3f}".format(*mean_sd(gpu["per_seed"][m][k])) if "per_seed" in gpu else "not recorded yet"
        print(f"{m:10s}{k:8s}{cpu_cell:>18s}{gpu_cell:>18s}")
if "warm_up" in gpu:
    print("GPU warm-up:", {k: round(v, 3) for k, v in gpu["warm_up"].items()})

# %% [markdown]
# ## 11.10 What the runs show, and the GPU profile
#
# On a GPU (`config.pick`'s `gpu` values), the same code trains a larger model (4.7M
# parameters: 256 wide, 6 layers) on 3-digit problems: 2,500 warm-up steps of 256
# problems, then each of the four methods for 30 steps of 64 prompts, three seeds, scored
# on 512 held-out problems; the last table of section 11.9 puts its figures beside the
# CPU's (run of 2026-12-02 on one H200, sharing it with chapters 12-10; whole output in
# `benchmarks/results/chapter11_gpu_profile_NVIDIA_H200_2026-12-02.txt`). The warm-up took
# 129 s there and each 30-step run 11 to 14 s (SFT 1 s). Only the first check of section
# 11.9 is specific to the CPU: on the GPU the warm-up model is already at 0.78 pass@1, and
# continued SFT adds only 0.02 to it.
#
# An earlier GPU run of this chapter (H100, 2026-11-23,
# `benchmarks/results/chapter11_gpu_profile_NVIDIA_H100_80GB_HBM3_2026-11-23.txt`: one
# seed, $\mu = 2$, 100 steps of 32 prompts, no SFT or RFT baseline) took held-out sampled
# accuracy from 0.46 to 0.82 and greedy accuracy from 0.73 to 0.89, and REINFORCE with the
# same batches ended at 0.91 sampled accuracy.
#
# What RL cannot do is visible in (11.3): a group whose $G$ samples are all wrong gets
# advantage 0 everywhere and teaches nothing (and RFT keeps nothing from it). Learning from
# verified samples can only sharpen what the model already sometimes does; the fraction of
# groups with all rewards equal is the signal budget, and DAPO's "dynamic sampling" replaces
# such groups with fresh prompts.
#
# ## Exercises
#
# **Exercise 1 (derive).** Show that $x - \log x - 1 \ge 0$ for $x > 0$ with equality only at
# $x = 1$, and that under $o \sim \pi_\theta$ the estimator (11.4) has mean
# $\mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}]$. What does it estimate if the tokens were sampled
# from $\pi_{ref}$ instead?
#
# **Exercise 2 (derive).** With $\mu = 1$, show that the gradient of the `grpo` loss is
# $-\frac{1}{G}\sum_i \frac{\hat A_i}{|o_i|}\sum_t \nabla\log\pi_\theta(o_{i,t})$, and explain
# why, for a group where every answer is wrong except one, a long wrong answer is pushed
# down less per token than a short one. Which of the normalizations of section 11.3 remove
# that effect?
#
# **Exercise 3 (measure).** Train with `loss_type="dr_grpo"` and `scale_rewards=False`, and
# with `epsilon_high=0.28` (with `num_iterations=2`: at $\mu = 1$ no clip ever acts), and
# compare held-out accuracy, completion length and clip fraction with GRPO at $\mu = 2$.
# Then set `beta=0` and watch the KL to the reference.

# %% [markdown]
# **Exercise 4 (implement): advantages and the loss.** Check each function with
# `check("11.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not see,
# against the library's float64 references; one line of verdict);
# `print("\n".join(exercises("11")))` lists the checkers, and
# `chapters/solutions/11_grpo_solutions.ipynb` has worked solutions to all four exercises.
# (a) Write `group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor` that
# returns the advantages (11.3) $(N,)$ of `rewards` $(N,)$, each group's $G$ = `group_size`
# samples contiguous, with the Bessel-corrected standard deviation plus $\epsilon = 10^{-4}$
# of section 11.2 in the denominator; a group with equal rewards gets 0. Run
# `check("11.group_advantages", group_advantages)`. (b) Write
# `grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float, beta: float) -> torch.Tensor`
# that returns $-\mathcal{J}_{GRPO}$ of (11.5) as a 0-dim tensor with the paper's `grpo`
# normalization: `logp`, `old_logp`, `ref_logp` and the 0/1 float `mask` are $(B, L)$,
# `advantages` $(B,)$, the ratio is $\rho = e^{\text{logp} - \text{old\_logp}}$, the KL term is
# (11.4), and a row whose mask is all 0 adds 0 to the mean over the $B$ rows. Run
# `check("11.grpo_loss", grpo_loss)`.
