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
# # Chapter 10. PyTorch's engine and the 405B accounting: solutions to the exercises
#
# A worked solution to the exercise at the end of chapter 10, with the chapter's accounting
# functions (`lrn_lib.accounting`). Pure arithmetic: it runs in a second.

# %%
from dataclasses import replace

from lrn_lib.accounting import LLAMA3_TABLE4, busiest_stage, check_layout, communication_per_step, memory_per_gpu
from lrn_lib.llama import LLAMA3_405B

H100_GIB = 80

# %% [markdown]
# ## Exercise 1 (measure): how much does tensor parallelism buy?
#
# Layout (a) runs $TP = 8$, $DP = 64$ with 32 sequences per replica. Halving $TP$ doubles $DP$ at
# the same 8,192 GPUs, so each replica takes half as many sequences to keep the tokens per step.
# As in the chapter, an H100's "80 GB" of HBM are 80 GiB.

# %%
base = LLAMA3_TABLE4[0].layout
layouts = {tp: replace(base, tp=tp, dp=base.dp * base.tp // tp, batch_per_dp=base.batch_per_dp * tp // base.tp)
           for tp in (2, 4, 8)}
print("TP  DP  B/DP | GiB per GPU: weights grads optim  activ  total | GB sent per step: TP    PP    DP")
fits = {}
for tp, layout in layouts.items():
    check_layout(LLAMA3_405B, layout)
    stage = busiest_stage(LLAMA3_405B, layout)
    mem, sent = memory_per_gpu(LLAMA3_405B, layout, stage), communication_per_step(LLAMA3_405B, layout, stage)
    fits[tp] = mem["total"] < H100_GIB
    print(f"{tp:2d} {layout.dp:3d} {layout.batch_per_dp:5d} | {mem['weights']:19.1f} {mem['gradients']:5.1f} "
          f"{mem['optimizer']:5.1f} {mem['activations']:6.1f} {mem['total']:6.1f} | "
          f"{sent['tp']:19.1f} {sent['pp']:5.1f} {sent['dp']:5.1f}")
    assert layout.tokens_per_step == base.tokens_per_step and layout.gpus == base.gpus
try:
    check_layout(LLAMA3_405B, replace(base, tp=16, dp=base.dp // 2))
except ValueError as err:
    refusal = str(err)
print("TP = 16:", refusal)

# %%
print("only TP = 8 fits in an H100's 80 GiB:", fits == {2: False, 4: False, 8: True})
print("TP = 16 is refused for the 8 key/value heads:", "n_kv_heads=8" in refusal)

# %% [markdown]
# Halving $TP$ doubles the weights and gradients of the busiest stage, the parts $TP$ shards.
# The saved activations double too at $TP = 4$, where a replica still has 16 sequences in flight
# under 1F1B (as many as its 16 stages, as at $TP = 8$); at $TP = 2$ a replica's 8 sequences are
# fewer than its stages, so fewer are in flight and the activations grow less. Only $TP = 8$ fits
# in 80 GiB (78 GiB; the others need 155 and 199 GiB). What $TP$ costs is traffic: each GPU's
# tensor-parallel messages grow with $TP$ (the all-reduces carry $2(tp-1)/tp$ of the activations,
# over more sequences per replica), from 69 to 481 GB per step, while its data-parallel traffic
# shrinks, since each GPU holds a smaller shard of the gradients. $TP = 16$ would cut the memory once more, but the
# model has 8 key/value heads and GQA cannot split a head across GPUs, and 16 GPUs would also
# leave the 8-GPU server, whose NVLink is what makes TP's traffic affordable.
