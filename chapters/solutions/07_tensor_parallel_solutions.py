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
# # Chapter 7. Processes, the mesh and tensor parallelism: solutions to the exercises
#
# A worked solution to the exercise at the end of chapter 7, run through its checker,
# `lrn_lib.exercises.check`, which tests it on fresh random inputs against the library's
# reference (`lrn_lib.tensor_parallel`) and prints one line. No process group is needed.

# %%
import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises

config.seed_everything(0)
torch.set_num_threads(1)
print("\n".join(exercises("07")))

# %% [markdown]
# ## Exercise 1 (implement): cross-entropy from vocabulary shards
#
# Each "rank" computes three numbers per token from its own slice: its maximum; then, after
# the global maximum $m$ is known (the first all-reduce, a MAX), its sum of $e^{z_v - m}$ and
# its target logit $z_y - m$, 0 when $y$ lies outside $[s_r, e_r)$ (the second all-reduce, a
# SUM of both). The loss (7.8) is $\log\sum - (z_y - m)$. A shard whose logits all lie far
# below $m$ contributes sums that underflow to 0, which is harmless; with each rank's own
# maximum instead of $m$ the sums would live on different scales and could not be added.

# %%
def sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(7.8) from vocabulary shards (N, V_r), consecutive from id 0; targets (N,) -> losses (N,)."""
    m = torch.stack([z.amax(dim=-1) for z in shards]).amax(dim=0)                   # all-reduce MAX
    total, target = torch.zeros_like(m), torch.zeros_like(m)
    start = 0
    for z in shards:                                                                # all-reduce SUM
        total = total + torch.exp(z - m[:, None]).sum(dim=-1)
        local = targets - start
        mine = (local >= 0) & (local < z.shape[-1])
        picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0] - m
        target = target + torch.where(mine, picked, torch.zeros_like(picked))
        start += z.shape[-1]
    return torch.log(total) - target                                                # (7.8)


print(check("07.sharded_cross_entropy", sharded_cross_entropy))
