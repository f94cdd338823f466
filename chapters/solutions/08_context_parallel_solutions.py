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
# # Chapter 8. Context parallelism: solutions to the exercises
#
# A worked solution to the exercise at the end of chapter 8: a derivation on paper, then the
# count with the chapter's `chunk_ids` and chapter 4's `causal_visible`. No process group is
# needed.

# %%
import torch

from lrn_lib import config
from lrn_lib.attention import causal_visible
from lrn_lib.context_parallel import chunk_ids

config.seed_everything(0)
torch.set_num_threads(1)

# %% [markdown]
# ## Exercise 1 (derive and measure): the balanced layout's work
#
# (a) Query $q$ of chunk $j$ sits at global position $jc + q$ ($q = 0, \dots, c-1$) and sees keys
# $0, \dots, jc + q$, that is $jc + q + 1$ of them. Summed over the chunk,
# $W_j = \sum_{q=0}^{c-1} (jc + q + 1) = jc^2 + c(c+1)/2$. Rank $i$ of the balanced layout holds
# chunks $i$ and $2CP - 1 - i$, so
#
# $$W_i + W_{2CP-1-i} = (i + 2CP - 1 - i)\,c^2 + c(c+1) = 2CP\,c^2 + c,$$
#
# the same for every rank: the $i$ cancels.
#
# (b) Contiguously, rank $i$ holds chunks $2i$ and $2i + 1$, with work
# $W_{2i} + W_{2i+1} = (4i + 1)c^2 + c(c+1) = (4i + 2)c^2 + c$, largest for $i = CP - 1$:
# $(4CP - 2)c^2 + c$. Both layouts do the same total work, so the mean is the balanced value,
# and the ratio is
#
# $$\frac{(4CP - 2)c + 1}{2CP\,c + 1} \;\to\; \frac{2CP - 1}{CP} = \frac{CP - \frac12}{CP/2} \quad (c \to \infty),$$
#
# the ratio (8.1), which tends to 2 as $CP$ grows.
#
# (c) The count: the causal table of the whole sequence, with each rank's rows picked out.

# %%
def work_per_rank(cp: int, c: int, balanced: bool) -> list[int]:
    """Visible (query, key) pairs of each CP rank's queries under a causal mask, chunks of c tokens."""
    visible = causal_visible(2 * cp * c, 2 * cp * c)
    rows = []
    for rank in range(cp):
        chunks = chunk_ids(rank, cp, balanced=True) if balanced else [2 * rank, 2 * rank + 1]
        rows.append(sum(int(visible[j * c:(j + 1) * c].sum()) for j in chunks))
    return rows


c = 16
ratios = {}
for cp in (2, 4, 8):
    bal, cont = work_per_rank(cp, c, True), work_per_rank(cp, c, False)
    ratios[cp] = (max(bal) / (sum(bal) / cp), max(cont) / (sum(cont) / cp))
    print(f"CP = {cp}: balanced work per rank {bal[0]} on every rank: {len(set(bal)) == 1} "
          f"(closed form {2 * cp * c * c + c}); max/mean contiguous {ratios[cp][1]:.3f}, "
          f"closed form {((4 * cp - 2) * c + 1) / (2 * cp * c + 1):.3f}, (8.1) {(cp - 0.5) / (cp / 2):.3f}")

# %%
print("the balanced layout gives every rank the same work:", all(b == 1.0 for b, _ in ratios.values()))
print("the contiguous layout's ratio grows towards 2:", ratios[2][1] < ratios[4][1] < ratios[8][1] < 2)

# %% [markdown]
# The balanced layout's work is equal on every rank exactly, whatever $CP$. The contiguous
# layout's busiest rank does 1.49, 1.74 and 1.87 times the mean here ($c = 16$; a hair under
# (8.1), which is the limit of long chunks), and the ratio keeps growing with $CP$: with 16 CP
# ranks, as in Llama 3's 128K-context layout, the step would wait almost twice as long as it
# needs to.
