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
# # Chapter 11. GRPO: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 11. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's references (`lrn_lib.grpo`) and prints one line. The measurement
# runs a miniature version of section 11.7 (a smaller model, fewer steps) so that the whole
# notebook takes about a minute on a CPU.

# %%
import copy
import time

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.grpo import (ArithmeticTokenizer, GRPOConfig, GRPOTrainer, accuracy_reward, completion_logprobs,
                          completion_mask, evaluate, format_reward, kl_k3, make_problems, prompt_text, rollout,
                          solution_text, token_logprobs)
from lrn_lib.grpo import grpo_loss as library_grpo_loss
from lrn_lib.llama import Llama, tiny_config

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("11")))

# %% [markdown]
# ## Exercise 1 (derive): the KL estimator
#
# **Non-negative.** $f(x) = x - \log x - 1$ has $f'(x) = 1 - 1/x$ and $f''(x) = 1/x^2 > 0$ on
# $x > 0$: it is strictly convex, its only stationary point is $x = 1$, where $f(1) = 0$. So
# $f(x) \ge 0$, with equality only at $x = 1$ (equivalently, $\log x \le x - 1$).
#
# **Unbiased under the policy.** For one token, $x = \pi_{ref}(o)/\pi_\theta(o)$ with
# $o \sim \pi_\theta$ (given the same context). Then
#
# $$\mathbb{E}_{\pi_\theta}[x] = \sum_o \pi_\theta(o)\frac{\pi_{ref}(o)}{\pi_\theta(o)} = \sum_o \pi_{ref}(o) = 1,
# \qquad \mathbb{E}_{\pi_\theta}[-\log x] = \sum_o \pi_\theta(o)\log\frac{\pi_\theta(o)}{\pi_{ref}(o)}
#   = \mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}],$$
#
# (the first sum runs over the tokens $\pi_\theta$ can emit; it is 1 when $\pi_{ref}$ puts no
# mass elsewhere, true for two softmax models). So (11.4) has mean $1 + \mathbb{D}_{KL} - 1 =
# \mathbb{D}_{KL}[\pi_\theta \| \pi_{ref}]$. Unlike $-\log x$ alone (also unbiased), it is
# never negative, and its variance is lower when the two policies are close.
#
# **Sampled from the reference instead.**
# $\mathbb{E}_{\pi_{ref}}[x] = \sum_o \pi_{ref}(o)^2/\pi_\theta(o) = 1 + \chi^2(\pi_{ref}\|\pi_\theta)$ and
# $\mathbb{E}_{\pi_{ref}}[-\log x] = -\mathbb{D}_{KL}[\pi_{ref}\|\pi_\theta]$, so the estimator
# then has mean $\chi^2(\pi_{ref}\|\pi_\theta) - \mathbb{D}_{KL}[\pi_{ref}\|\pi_\theta]$: not a
# KL divergence at all (it is non-negative, since $\log(1 + \chi^2) \ge \mathbb{D}_{KL}$
# gives $\chi^2 \ge \mathbb{D}_{KL}$, but it weighs the tokens the policy has made unlikely
# by $1/\pi_\theta$ and can be very large). This is why the tokens must come from the policy
# being trained. Exact expectations over a random vocabulary of 50 tokens:

# %%
pi = torch.softmax(torch.randn(50, dtype=torch.float64) * 2, -1)
ref = torch.softmax(torch.randn(50, dtype=torch.float64) * 2, -1)
k3 = kl_k3(pi.log(), ref.log())                                          # per token, (11.4)
kl_pi_ref = (pi * (pi / ref).log()).sum()
kl_ref_pi = (ref * (ref / pi).log()).sum()
chi2 = (ref ** 2 / pi).sum() - 1
print(f"E_pi[k3] = {(pi * k3).sum().item():.6f}, KL(pi || ref) = {kl_pi_ref.item():.6f}")
print(f"E_ref[k3] = {(ref * k3).sum().item():.6f}, chi2(ref || pi) - KL(ref || pi) = {(chi2 - kl_ref_pi).item():.6f}")
x = torch.logspace(-3, 3, 10001, dtype=torch.float64)
f = x - x.log() - 1
print("x - log x - 1 >= 0 on [1e-3, 1e3], smallest at x =", round(x[f.argmin()].item(), 4))
print("E_pi[k3] == KL(pi || ref):", torch.allclose((pi * k3).sum(), kl_pi_ref, atol=1e-12))

# %% [markdown]
# ## Exercise 2 (derive): the gradient, and the length bias
#
# With $\mu = 1$ the single update happens at $\theta = \theta_{old}$, so every ratio
# $\rho_{i,t} = 1$ lies inside $[1-\varepsilon, 1+\varepsilon]$: the min in (11.5) picks
# $\rho_{i,t}\hat A_i$ (both branches are equal, and the clipped one has the same gradient at
# $\rho = 1$ as the unclipped). Since $\nabla\rho = \rho\,\nabla\log\pi_\theta = \nabla\log\pi_\theta$ at
# $\rho = 1$, and taking $\beta = 0$ (the KL term adds $\beta$ times the gradient of the
# per-sequence mean KL),
#
# $$\nabla \mathcal{L}_{grpo} = -\nabla\mathcal{J} = -\frac{1}{G}\sum_{i=1}^{G}\frac{\hat A_i}{|o_i|}\sum_{t=1}^{|o_i|}\nabla\log\pi_\theta(o_{i,t}).$$
#
# **The length bias.** Take a group with one right answer and $G - 1$ wrong ones. All wrong
# answers have the same reward, hence the same advantage $\hat A_- < 0$. Each token of wrong
# answer $i$ is pushed down with weight $|\hat A_-|/(G|o_i|)$: a wrong answer of 40 tokens
# gets a quarter of the per-token push of one of 10 tokens, so the loss punishes long wrong
# answers less and, over training, lets wrong answers grow (for right answers it is the
# other way round: short ones are rewarded more per token). The `bnpo` and `dapo`
# normalizations divide by the total token count, the same for every token of the batch,
# and `dr_grpo` by a constant $B \cdot L_{max}$: in all three each token gets weight
# $\hat A_i$ times one common constant, and the length effect is gone. (Dr. GRPO's second
# change, no std scaling, addresses a different bias, across prompts.)
#
# A check with autograd, the logits of each position as the parameters:

# %%
G, L, V = 4, 12, 7
lengths = torch.tensor([3, 12, 6, 3])                       # answer 0 is right, the others wrong
mask = (torch.arange(L)[None] < lengths[:, None]).double()
logits = torch.randn(G, L, V, dtype=torch.float64, requires_grad=True)
tokens = torch.randint(0, V, (G, L))
logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
adv = torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64)
loss, _ = library_grpo_loss(logp, logp.detach(), adv, mask, "grpo", epsilon_low=0.2)
(grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
weights = -adv[:, None] / (G * lengths[:, None]) * mask                    # -(1/G) A_i / |o_i| on each token
(formula,) = torch.autograd.grad(logp, logits, grad_outputs=weights)       # sum of weight * grad log pi
print("autograd gradient == -(1/G) sum_i A_i/|o_i| sum_t grad log pi:", torch.allclose(grad, formula, atol=1e-12))
per_token = {"grpo": 1 / (G * lengths.double()), "bnpo": 1 / mask.sum().expand(G),
             "dr_grpo": torch.full((G,), 1 / (G * L), dtype=torch.float64)}
for loss_type, scale in per_token.items():
    print(f"{loss_type:8s}: push per token on the wrong answers of lengths 12, 6, 3:",
          [round((-adv[i] * scale[i]).item(), 4) for i in (1, 2, 3)])

# %% [markdown]
# Under `grpo` the 12-token wrong answer's tokens are pushed down with a quarter of the
# weight of the 3-token one's; under `bnpo` and `dr_grpo` all wrong tokens get the same.

# %% [markdown]
# ## Exercise 3 (measure): Dr. GRPO, clip-higher, and no KL term
#
# Section 11.7's run takes several minutes; here a miniature: a 64-wide, 2-layer policy,
# 200 warm-up steps on correct solutions only, then 15 GRPO steps of 16 prompts and
# $G = 8$ at a learning rate of $10^{-3}$ for each variant, from the same warm-up model and
# seed. Held-out sampled accuracy and format reward, completion length, the clip fraction
# averaged over the steps, and the KL to the warm-up model, measured by (11.4) on sampled
# held-out completions (the trainer itself reports a KL only when $\beta \ne 0$).

# %%
tok = ArithmeticTokenizer()
DIGITS, MAX_NEW = 2, 24
cfg = tiny_config(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192,
                  max_seq_len=64)
gen = torch.Generator().manual_seed(0)
held_out = make_problems(128, DIGITS, gen)
held_out_set = set(held_out)


def sft_batch(problems):
    """Prompt + correct solution per row, padded with EOS; the loss mask covers the completion up to its EOS."""
    rows, starts = [], []
    for p in problems:
        prompt = tok.encode(prompt_text(p))
        rows.append(prompt + tok.encode(solution_text(p)))
        starts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in rows])
    loss_mask = torch.zeros_like(ids, dtype=torch.float32)
    for i, s in enumerate(starts):
        loss_mask[i, s:] = completion_mask(ids[i:i + 1, s:], tok.eos_id)[0]
    return ids, loss_mask


t0 = time.perf_counter()
config.seed_everything(0)
warm = Llama(cfg)
opt = torch.optim.AdamW(warm.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99))
gen = torch.Generator().manual_seed(1)
for step in range(200):
    ids, m = sft_batch(make_problems(32, DIGITS, gen, held_out_set))
    loss = -(token_logprobs(warm(ids), ids) * m[:, 1:]).sum() / m[:, 1:].sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
warm_seconds = time.perf_counter() - t0
REWARDS = {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5)}            # (11.8)
probe = GRPOTrainer(warm, tok, REWARDS, torch.optim.SGD(warm.parameters(), lr=0.0), GRPOConfig(max_new_tokens=MAX_NEW))
before = evaluate(probe, held_out * 2, 1.0, generator=torch.Generator().manual_seed(2))[0]


@torch.no_grad()
def kl_to_warm(trainer: GRPOTrainer) -> float:
    """Masked mean of (11.4) on one sampled completion per held-out prompt, policy against the warm-up model."""
    prompts = trainer.encode_prompts(held_out)
    ids = rollout(trainer.policy, prompts, 1, MAX_NEW, tok.eos_id, 1.0, torch.Generator().manual_seed(5))
    mask = completion_mask(ids, tok.eos_id)
    kl = kl_k3(completion_logprobs(trainer.policy, prompts, ids), completion_logprobs(warm, prompts, ids))
    return ((kl * mask).sum() / mask.sum()).item()


variants = {
    "grpo, mu = 2 (the config's default)": GRPOConfig(group_size=8, max_new_tokens=MAX_NEW, loss_type="grpo"),
    "dr_grpo, no std scaling": GRPOConfig(group_size=8, max_new_tokens=MAX_NEW, loss_type="dr_grpo",
                                          scale_rewards=False),
    "clip-higher, eps_high 0.28": GRPOConfig(group_size=8, max_new_tokens=MAX_NEW, loss_type="grpo",
                                             epsilon_high=0.28),
    "grpo with beta = 0": GRPOConfig(group_size=8, max_new_tokens=MAX_NEW, loss_type="grpo", beta=0.0),
}
results = {}
t0 = time.perf_counter()
for name, grpo_cfg in variants.items():
    config.seed_everything(3)
    model = copy.deepcopy(warm)
    trainer = GRPOTrainer(model, tok, REWARDS, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
                          grpo_cfg)
    gen = torch.Generator().manual_seed(3)
    history = [trainer.step(make_problems(16, DIGITS, gen, held_out_set), gen) for _ in range(15)]
    after = evaluate(trainer, held_out * 2, 1.0, generator=torch.Generator().manual_seed(2))[0]
    results[name] = {**after, "clip_fraction": sum(h["clip_fraction"] for h in history) / len(history),
                     "kl": kl_to_warm(trainer)}
rl_seconds = time.perf_counter() - t0

# %%
# NBVAL_IGNORE_OUTPUT
print(f"warm-up {warm_seconds:.0f} s, four GRPO runs {rl_seconds:.0f} s")
print(f"{'':27s} accuracy  format  length  clip frac  KL to warm-up")
print(f"{'warm-up model':27s} {before['accuracy']:8.3f} {before['format']:7.3f} {before['completion_length']:7.2f}")
for name, r in results.items():
    print(f"{name:27s} {r['accuracy']:8.3f} {r['format']:7.3f} {r['completion_length']:7.2f} "
          f"{r['clip_fraction']:10.4f} {r['kl']:14.4f}")

# %%
print("every variant raises the sampled format reward:",
      all(r["format"] > before["format"] for r in results.values()))
print("without the KL term the policy drifts at least twice as far from the warm-up model:",
      results["grpo with beta = 0"]["kl"] > 2 * results["grpo, mu = 2 (the config's default)"]["kl"])

# %% [markdown]
# At this size the warm-up teaches the format but hardly any arithmetic (sampled accuracy
# around 5%), so 15 steps of RL mostly sharpen the format, and the accuracy differences
# between the variants are within a few standard errors (about 0.015 for 256 samples at
# 5%), and the accuracy does not improve; the clip fractions (a few percent) and
# completion lengths (fixed by the template, about 17 tokens) barely differ either. Section
# 11.7's model and step count are what make those comparisons meaningful, and Dr. GRPO's
# length effect needs answers whose length can vary, which the template here does not
# leave much room for. What does show at once is the role of $\beta$: with the KL term the
# policy stays close to the warm-up model; without it, the same number of steps moves it
# several times further (by the estimator (11.4) on its own samples). That distance is the
# budget the KL term controls; DAPO and Dr. GRPO drop it and rely on the clipping and a
# small learning rate instead.

# %% [markdown]
# ## Exercise 4 (implement): advantages and the loss
#
# (a) `view(-1, G)` puts each group in a row because the $G$ samples of a prompt are
# contiguous; `std` is Bessel-corrected by default; $\epsilon = 10^{-4}$ makes a group of
# equal rewards give $0/10^{-4} = 0$.

# %%
def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(11.3): rewards (N,), groups of group_size contiguous -> (N,)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + 1e-4)).reshape(-1)


print(check("11.group_advantages", group_advantages))

# %% [markdown]
# (b) Per token: the pessimistic min of the clipped and unclipped terms, plus $\beta$ times
# (11.4); then the masked mean of each row, with the count clamped to 1 so that an empty row
# gives 0, and the mean over rows, all negated.

# %%
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float, beta: float) -> torch.Tensor:
    """-J_GRPO of (11.5): (B, L) log-probs and mask, advantages (B,) -> 0-dim loss."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    objective = torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)       # (11.2)
    delta = ref_logp - logp
    per_token = -objective + beta * (torch.exp(delta) - delta - 1)                       # (11.4), (11.5)
    per_row = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_row.mean()


print(check("11.grpo_loss", grpo_loss))
