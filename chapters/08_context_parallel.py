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
# # Chapter 8. Context parallelism
#
# Chapter 7 split Llama's weight matrices over the ranks of a process group. This chapter
# splits the sequence instead, with the same tools: chapter 7's `spawn` and process groups,
# chapter 6's model, and the log-sum-exp merge of chapter 2.
#
# Tensor parallelism splits the weights, pipeline parallelism the layers, data parallelism
# the batch. None of them shortens the sequence a rank works on, and a *single sequence*
# can be too long: Llama 3's last pre-training stage grows the context to 128K tokens
# (arXiv:2407.21783, Section 3.4.2), and then the activations of one sequence, $T \times d$
# per tensor and layer, no longer fit next to the weights, even with FlashAttention's
# $O(T)$ attention memory. **Context
# parallelism** (CP) splits the sequence dimension itself over $CP$ ranks: each rank holds
# $T/CP$ tokens of every activation.
#
# Almost everything in a transformer block is token-wise: RMSNorm, the $Q, K, V$ and output
# projections, the feed-forward network, and RoPE (provided each token is rotated by its
# *global* position, not its index in the shard). Those layers run on a shard without any
# communication. Attention is the exception: a query needs the keys and values of every
# token it attends to, and with a causal mask that is every earlier token, most of which
# live on other ranks. This chapter builds the two ways of getting them there,
#
# * **ring attention** (Liu, Zaharia and Abbeel 2023, arXiv:2310.01889): K/V blocks travel
#   around a ring of ranks while each rank merges partial attention results with the
#   log-sum-exp merge of chapter 2, and
# * **all-gather CP**, the variant Llama 3 uses: gather all of K and V, then attend locally,
#
# both with their backward passes, on a sequence layout that balances the causal work.

# %%
import matplotlib.pyplot as plt
import torch

from lrn_lib import config
from lrn_lib.attention import attention_reference
from lrn_lib.spawn import spawn
from lrn_lib.online_softmax import merge_lse

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices, and the spawned processes share the cores

# %% [markdown]
# ### 8.1 Splitting the sequence, and where the causal work is
#
# The obvious split gives rank $i$ the contiguous chunk $i$ of $T/CP$ tokens. Without a mask
# every rank then does the same work. With a causal mask it does not: write the attention
# matrix as $CP \times CP$ blocks of (query chunk, key chunk). The queries of chunk $i$ see
# all keys of chunks $j < i$ (full blocks), the lower triangle of block $(i, i)$, and
# nothing of later chunks. Counting a diagonal block as half a full one, rank $i$ computes
#
# $$W_i^{\text{contiguous}} = i + \tfrac12 \text{ blocks}, \qquad
#   \max_i W_i \,/\, \mathrm{mean}_i W_i = \frac{CP - \frac12}{CP/2} \to 2 \qquad (8.1)$$
#
# Rank 0 attends to its own chunk only while the last rank attends to the whole sequence;
# since every rank waits for the slowest before the next layer, the step takes nearly twice
# as long as the balanced one would. The fix used by Llama 3 (Section 3.3.2) and by
# Megatron-LM's CP: cut the sequence into $2\,CP$ chunks and give rank $i$ chunks $i$ and
# $2CP-1-i$, one from the cheap front and one from the expensive back. In units of the
# smaller chunks, rank $i$ now does $(i + \frac12) + (2CP - 1 - i + \frac12) = 2CP$ blocks,
# the same on every rank.
#
# The helpers below cut a $(B, T, \dots)$ tensor into a rank's shard (its chunks concatenated
# in increasing order), put the shards back together, and give the global positions of a
# rank's tokens, which RoPE needs. `balanced=False` gives the contiguous layout.

# %%
#| export lrn_lib.context_parallel
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrn_lib import validate
from lrn_lib.attention import causal_visible, check_attention_inputs, flash_attention
from lrn_lib.mesh import check_group


def chunk_ids(rank: int, cp: int, balanced: bool = True) -> list[int]:
    """The sequence chunks that CP rank `rank` holds, in increasing order.

    balanced: the sequence is cut into 2*cp chunks and rank i holds [i, 2*cp - 1 - i]
    (Llama 3's causal load balancing); otherwise into cp chunks and rank i holds [i].
    """
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    return [rank, 2 * cp - 1 - rank] if balanced else [rank]


def _n_chunks(cp: int, balanced: bool) -> int:
    """How many chunks the sequence is cut into: 2*cp (balanced) or cp."""
    return 2 * cp if balanced else cp


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 1, balanced: bool = True) -> torch.Tensor:
    """The part of a full sequence that CP rank `rank` holds.

    x: (..., T, ...) with the sequence along dim (T divisible by 2*cp when balanced, else by
    cp). Returns (..., T/cp, ...): the rank's chunks (chunk_ids) concatenated along dim.
    """
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    validate.tensor(x, "x")
    dim = validate.integer(dim, "dim", low=-x.dim(), high=x.dim() - 1) % x.dim()
    n = _n_chunks(cp, balanced)
    if x.shape[dim] % n:
        layout = "2 * cp" if balanced else "cp"
        raise ValueError(f"x has sequence length {x.shape[dim]} along dim {dim}, which is not divisible "
                         f"by {layout} = {n} chunks")
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, cp, balanced)], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1, balanced: bool = True) -> torch.Tensor:
    """Inverse of shard_sequence: the full sequence from every rank's shard, given in rank order.

    shards: cp tensors of one shape (..., T/cp, ...). Returns (..., T, ...) in global order.
    """
    validate.nonempty(shards, "shards")
    for shard in shards:
        validate.tensor(shard, "shards")
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards have shapes {[tuple(s.shape) for s in shards]}; they must all match")
    cp = len(shards)
    dim = validate.integer(dim, "dim", low=-shards[0].dim(), high=shards[0].dim() - 1) % shards[0].dim()
    per_rank = len(chunk_ids(0, cp, balanced))
    if shards[0].shape[dim] % per_rank:
        raise ValueError(f"shards have length {shards[0].shape[dim]} along dim {dim}, which does not split "
                         f"into {per_rank} chunks")
    chunks: list[torch.Tensor | None] = [None] * _n_chunks(cp, balanced)
    for rank, shard in enumerate(shards):
        for c, piece in zip(chunk_ids(rank, cp, balanced), shard.chunk(per_rank, dim=dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


def shard_positions(seq_len: int, rank: int, cp: int, balanced: bool = True,
                    device: torch.device | None = None) -> torch.Tensor:
    """The global positions (T/cp,) int64 of CP rank `rank`'s tokens in a sequence of seq_len.

    These are the positions RoPE must rotate the shard's queries and keys by.
    """
    validate.integer(seq_len, "seq_len", low=1)
    validate.integer(cp, "cp", low=1)
    validate.integer(rank, "rank", low=0, high=cp - 1)
    n = _n_chunks(cp, balanced)
    if seq_len % n:
        raise ValueError(f"seq_len {seq_len} is not divisible by the {n} chunks of the layout")
    return shard_sequence(torch.arange(seq_len, device=device), rank, cp, dim=0, balanced=balanced)


# %%
from lrn_lib.context_parallel import chunk_ids, shard_positions, shard_sequence, unshard_sequence

cp, seq_len = 4, 16
for balanced in (False, True):
    name = "balanced" if balanced else "contiguous"
    for rank in range(cp):
        print(f"{name:10s} rank {rank}: chunks {chunk_ids(rank, cp, balanced)}, "
              f"positions {shard_positions(seq_len, rank, cp, balanced).tolist()}")

x = torch.randn(2, 24, 3)
shards = [shard_sequence(x, r, 3) for r in range(3)]
print("unshard(shard(x)) == x:", torch.equal(unshard_sequence(shards), x))

# %% [markdown]
# The figure draws the $2CP \times 2CP$ blocks (query chunk, key chunk) of a causal attention
# matrix for $CP = 4$, colored by the rank that computes them; the contiguous layout is shown
# at the same granularity (rank $i$ holds chunks $2i$ and $2i+1$). The bars count each rank's
# work, a diagonal block as half.

# %%
def block_owners(cp: int, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Owner rank of each causal (query chunk, key chunk) block (-1: masked), and work per rank."""
    n = 2 * cp
    owner = torch.full((n, n), -1)
    work = torch.zeros(cp)
    for rank in range(cp):
        mine = chunk_ids(rank, cp) if balanced else [2 * rank, 2 * rank + 1]
        for qc in mine:
            owner[qc, :qc + 1] = rank
            work[rank] += qc + 0.5                          # qc full blocks and half a diagonal one
    return owner, work


cp = 4
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, balanced in zip(axes[:2], (False, True)):
    owner, work = block_owners(cp, balanced)
    shown = torch.where(owner >= 0, owner.double(), torch.nan)
    ax.imshow(shown, cmap="tab10", vmin=0, vmax=9)
    for qc in range(2 * cp):
        for kc in range(qc + 1):
            ax.text(kc, qc, f"{int(owner[qc, kc])}", ha="center", va="center", fontsize=8)
        ax.add_patch(plt.Rectangle((qc - 0.5, qc - 0.5), 1, 1, fill=False, hatch="///", lw=0))
    ax.set_title(("load-balanced" if balanced else "contiguous") + f" layout, CP = {cp}")
    ax.set_xlabel("key chunk (hatched: causal diagonal block, half the work)")
    ax.set_ylabel("query chunk (number: the rank computing it)")
    axes[2].bar(torch.arange(cp) + (0.2 if balanced else -0.2), work, width=0.4, color="0.3" if balanced else "0.7",
                label="load-balanced" if balanced else "contiguous")
axes[2].set_xlabel("CP rank")
axes[2].set_ylabel("blocks computed")
axes[2].set_xticks(range(cp))
axes[2].legend()
plt.tight_layout()
plt.show()

for balanced in (False, True):
    work = block_owners(cp, balanced)[1]
    print(f"{'load-balanced' if balanced else 'contiguous':13s} work per rank {work.tolist()}, "
          f"slowest / mean = {work.max() / work.mean():.2f}")

# %% [markdown]
# ### 8.2 Merging partial attention results
#
# Split the keys of one query into two disjoint sets $A$ and $B$ and compute attention over
# each alone: outputs $O_A, O_B$ (each normalized by its own softmax) and log-sum-exps
# $L_A, L_B$ of the scaled scores. The full softmax weights a score $s$ by
# $e^{s - L}$ with $L = \log(e^{L_A} + e^{L_B})$, chapter 2's merge (2.3), so
#
# $$O = e^{L_A - L}\, O_A + e^{L_B - L}\, O_B \qquad (8.2)$$
#
# The two weights sum to one, and $e^{L_B - L} = e^{L_B} / (e^{L_A} + e^{L_B}) =
# \sigma(L_B - L_A)$, the logistic sigmoid. Hence (8.2) and (2.3) can be written as two
# updates of a running result $(O, L) \leftarrow (O_A, L_A)$:
#
# $$O \leftarrow O - \sigma(L_B - L)\,(O - O_B), \qquad
#   L \leftarrow L - \log\sigma(L - L_B) \qquad (8.3)$$
#
# (the second because $L_A + \log(1 + e^{L_B - L_A}) = L_A - \log\sigma(L_A - L_B)$). Both
# $\sigma$ and $\log\sigma$ are computed without overflow for any argument, so (8.3)
# needs neither the running maximum of chapter 2 nor any exponential of a large number. The
# form fits ring attention, which updates one running result per query as blocks arrive.
# (8.3) assumes both sets are non-empty (finite $L$); ring attention never merges an empty
# block, it skips it.

# %%
#| export lrn_lib.context_parallel
def merge_partials(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over a second, disjoint set of keys into a running result, equation (8.3).

    o, o_b: (B, H, N, d); lse, lse_b: (B, H, N), all finite. Returns the (O, L) of attention
    over the union of both key sets.
    """
    for name, x, y in (("o", o, o_b), ("lse", lse, lse_b)):
        validate.tensor(x, name, dims=4 if name == "o" else 3, kind="float")
        validate.tensor(y, name + "_b", kind="float")
        validate.same_shape(**{name: x, name + "_b": y})
    if lse.shape != o.shape[:-1]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; o {tuple(o.shape)} needs {tuple(o.shape[:-1])}")
    o = o - torch.sigmoid(lse_b - lse)[..., None] * (o - o_b)       # (8.3), equal to (8.2)
    lse = lse - F.logsigmoid(lse - lse_b)                            # (8.3), equal to (2.3)
    return o, lse


# %% [markdown]
# A check with three key blocks of very different score scales: merging the three partial
# results gives attention over all keys, (8.3) agrees with the weighted form (8.2), and
# the weighted form written with raw exponentials, $\sum_j e^{L_j} O_j / \sum_j e^{L_j}$,
# overflows once the scores are large.

# %%
from lrn_lib.context_parallel import merge_partials

g = torch.Generator().manual_seed(0)
q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
k = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0] * 10 + [30.0] * 10 + [0.1] * 10,
                                                                            dtype=torch.float64)[:, None]
v = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64)
parts = [attention_reference(q, k[:, :, j:j + 10], v[:, :, j:j + 10]) for j in (0, 10, 20)]
o_full, lse_full = attention_reference(q, k, v)

o, lse = parts[0]
o_w, lse_w = parts[0]
for o_b, lse_b in parts[1:]:
    o, lse = merge_partials(o, lse, o_b, lse_b)                                   # (8.3)
    merged = merge_lse(lse_w, lse_b)                                              # (2.3)
    o_w = torch.exp(lse_w - merged)[..., None] * o_w + torch.exp(lse_b - merged)[..., None] * o_b   # (8.2)
    lse_w = merged
print("merged (8.3) == attention over all keys:", torch.allclose(o, o_full, atol=1e-12, rtol=0),
      torch.allclose(lse, lse_full, atol=1e-12, rtol=0))
print("(8.3) == weighted form (8.2):", torch.allclose(o, o_w, atol=1e-12, rtol=0))

big = [(o_j, lse_j + 800.0) for o_j, lse_j in parts]          # the same results with all L shifted by 800
raw = sum(torch.exp(l)[..., None] * o_j for o_j, l in big) / sum(torch.exp(l) for _, l in big)[..., None]
o_big, lse_big = big[0]
for o_b, lse_b in big[1:]:
    o_big, lse_big = merge_partials(o_big, lse_big, o_b, lse_b)
print("raw exponentials at L ~ 800 give nan:", bool(raw.isnan().any()))
print("(8.3) at L ~ 800 still equals attention:", torch.allclose(o_big, o_full, atol=1e-12, rtol=0))

# %% [markdown]
# ### 8.3 Ring attention
#
# Ring attention arranges the $CP$ ranks in a ring. Every rank starts with its own K/V
# shard; at step $t = 0, 1, \dots, CP-1$, rank $r$ holds the K/V shard of rank
#
# $$s = (r - t) \bmod CP \qquad (8.4)$$
#
# It attends its queries to that block, merges the result into its running $(O, L)$ by
# (8.3), and passes the block on to rank $r+1$. The transfer of the next block is posted
# *before* the computation on the current one, so communication hides behind compute when a
# block's attention takes longer than sending it, which holds for long enough chunks because
# attention costs $O(c^2)$ per block of $c$ tokens and the transfer $O(c)$. Each rank holds
# at most two K/V blocks at a time (in the backward pass also their two gradient
# accumulators), never the K/V of the whole sequence.
#
# Under the causal mask each (query chunk, key chunk) pair is one of three cases: the key
# chunk is later (skip), the same (causal diagonal block), or earlier (full block). A shard's
# chunks are sorted, so the key chunks visible to a query chunk $q_c$ are always a *prefix*
# of the arriving shard, and when the prefix ends in chunk $q_c$ itself, chapter 4's
# bottom-right-aligned causal mask on (query chunk, visible prefix) is exactly the right
# mask: query $i$ of the chunk sees every earlier chunk fully and keys $\le i$ of its own. So
# every block is one call of `flash_attention(q_chunk, k_prefix, v_prefix, causal=ends_on_diagonal)`.
#
# In the load-balanced layout every step costs every rank the same: at $t = 0$ both diagonal
# blocks plus one full block; from a rank $s < r$ all queries against the first half of
# the arriving shard; from $s > r$ the second half of the queries against all of it: two
# chunk blocks each time. (In the contiguous layout rank 0 idles at every step after the
# first.)

# %%
#| export lrn_lib.context_parallel
def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype (the accumulators)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _visible_prefix(q_chunk: int, k_chunks: list[int], causal: bool) -> tuple[int, bool]:
    """(how many leading chunks of k_chunks query chunk q_chunk sees, whether the last one is its diagonal).

    k_chunks must be sorted: then the visible chunks (k <= q_chunk) are a prefix.
    """
    if not causal:
        return len(k_chunks), False
    n = sum(c <= q_chunk for c in k_chunks)
    return n, n > 0 and k_chunks[n - 1] == q_chunk


def _ring_exchange(send: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list]:
    """Post the ring transfer: send `send` to the next rank, receive the previous rank's into a new buffer.

    Returns (receive buffer, requests); wait on the requests before reading the buffer.
    """
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % cp), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % cp), group)]
    return received, dist.batch_isend_irecv(ops)


def ring_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                           group: dist.ProcessGroup, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass of ring attention on this rank's shards; returns (O, L).

    q: (B, H, Tl, d), k, v: (B, Hkv, Tl, d), the rank's shard (chunk_ids order). O: (B, H, Tl, d)
    and L: (B, H, Tl) in float32 (float64 for float64 input): attention of the local queries
    over the whole sequence.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    mine = chunk_ids(rank, cp, balanced)
    c = q.shape[2] // len(mine)                                  # tokens per chunk
    work = _work_dtype(q)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mine)
    kv = torch.stack((k, v))                                     # one buffer travels the ring
    for step in range(cp):
        if step < cp - 1:
            incoming, requests = _ring_exchange(kv, group)       # post the next transfer first
        theirs = chunk_ids((rank - step) % cp, cp, balanced)     # (8.4)
        for a, q_chunk in enumerate(mine):
            n, diagonal = _visible_prefix(q_chunk, theirs, causal)
            if n == 0:
                continue                                         # a later chunk: masked out entirely
            o_b, lse_b = flash_attention(q[:, :, a * c:(a + 1) * c], kv[0, :, :, :n * c], kv[1, :, :, :n * c],
                                         causal=diagonal, scale=scale, return_lse=True)
            o_b = o_b.to(work)
            results[a] = (o_b, lse_b) if results[a] is None else merge_partials(*results[a], o_b, lse_b)
        if step < cp - 1:
            for request in requests:
                request.wait()
            kv = incoming
    return torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2)


# %% [markdown]
# ### 8.4 The backward pass of ring attention
#
# FlashAttention-2's backward pass (4.2) is already written block by block: given the final
# $O$ and $L$ of the forward pass and $D = \mathrm{rowsum}(dO \odot O)$, the contribution of a
# key block $j$ to every gradient needs only $Q, K_j, V_j, dO, L, D$:
#
# $$P = e^{\tau Q K_j^\top - L}, \quad dV_j \mathrel{+}= P^\top dO, \quad dP = dO\, V_j^\top, \quad
#   dS = P \odot (dP - D), \quad dQ \mathrel{+}= \tau\, dS\, K_j, \quad dK_j \mathrel{+}= \tau\, dS^\top Q
#   \qquad (8.5)$$
#
# The one thing that makes this correct across ranks is that $L$ and $D$ are the *global*
# ones, saved by the forward pass after all blocks were merged: $e^{S - L}$ is then the
# block's piece of the full softmax, not of a local one. The ring backward runs the same
# schedule (8.4) as the forward pass, but now two things travel: the K/V block, and its
# gradient accumulators $dK, dV$, to which every rank adds its queries' contribution
# (8.5) before passing them on. After $CP$ steps each accumulator has visited every rank,
# and one final hop brings it home to the rank that owns the keys. $dQ$ never moves: it is
# summed locally over the arriving blocks. With GQA the key heads are repeated for the
# computation and $dK, dV$ summed over the query heads of each group.

# %%
#| export lrn_lib.context_parallel
def attention_block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                             lse: torch.Tensor, delta: torch.Tensor, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key block's share of attention's gradients, equation (8.5), from the global L and D.

    q, do: (B, H, Nq, d); k, v: (B, Hkv, Nk, d); lse, delta: (B, H, Nq), finite. causal: the
    bottom-right mask of chapter 4. Returns (dQ (B, H, Nq, d), dK, dV (B, Hkv, Nk, d)), dK and
    dV summed over the query heads of each GQA group.
    """
    check_attention_inputs(q, k, v, causal, scale)
    validate.tensor(do, "do", kind="float")
    validate.same_shape(q=q, do=do)
    for name, t in (("lse", lse), ("delta", delta)):
        if validate.tensor(t, name, kind="float").shape != q.shape[:-1]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; q {tuple(q.shape)} needs {tuple(q.shape[:-1])}")
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    k_, v_ = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * q @ k_.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_visible(n_q, n_k, q.device), -float("inf"))
    p = torch.exp(s - lse[..., None])                            # P = exp(S - L), the global L   (8.5)
    dv = p.transpose(-1, -2) @ do                                # dV = P^T dO
    ds = p * (do @ v_.transpose(-1, -2) - delta[..., None])      # dS = P * (dO V^T - D)
    dq = scale * ds @ k_                                         # dQ = scale dS K
    dk = scale * ds.transpose(-1, -2) @ q                        # dK = scale dS^T Q
    return dq, dk.view(b, h_kv, group, n_k, d).sum(2), dv.view(b, h_kv, group, n_k, d).sum(2)


def ring_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, do: torch.Tensor, causal: bool, scale: float,
                            group: dist.ProcessGroup,
                            balanced: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass of ring attention: K/V and their dK/dV accumulators travel the ring.

    Shapes as in ring_attention_forward; o, lse are its results and do has o's shape.
    Returns (dQ, dK, dV) of this rank's shards in the dtypes of q, k, v.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    for name, t in (("o", o), ("do", do)):
        validate.tensor(t, name, kind="float")
    validate.same_shape(q=q, o=o, do=do)
    if validate.tensor(lse, "lse", kind="float").shape != q.shape[:-1]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; q {tuple(q.shape)} needs {tuple(q.shape[:-1])}")
    check_group(group)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    mine = chunk_ids(rank, cp, balanced)
    c = q.shape[2] // len(mine)
    work = o.dtype
    q_, do_ = q.to(work), do.to(work)
    delta = (do_ * o).sum(dim=-1)                                # D = rowsum(dO * O), global
    dq = torch.zeros_like(q_)
    kv = torch.stack((k, v)).to(work)
    dkv = torch.zeros_like(kv)                                   # accumulators of the block held now
    for step in range(cp):
        if step < cp - 1:
            incoming, requests = _ring_exchange(kv, group)       # K/V can leave before the compute
        theirs = chunk_ids((rank - step) % cp, cp, balanced)     # (8.4)
        for a, q_chunk in enumerate(mine):
            n, diagonal = _visible_prefix(q_chunk, theirs, causal)
            if n == 0:
                continue
            rows, cols = slice(a * c, (a + 1) * c), slice(0, n * c)
            dq_a, dk_b, dv_b = attention_block_backward(q_[:, :, rows], kv[0, :, :, cols], kv[1, :, :, cols],
                                                        do_[:, :, rows], lse[:, :, rows], delta[:, :, rows],
                                                        diagonal, scale)
            dq[:, :, rows] += dq_a
            dkv[0, :, :, cols] += dk_b
            dkv[1, :, :, cols] += dv_b
        if cp > 1:                                               # dK/dV leave after the compute;
            dkv, dkv_requests = _ring_exchange(dkv, group)       # the last hop brings them home
            for request in dkv_requests:
                request.wait()
        if step < cp - 1:
            for request in requests:
                request.wait()
            kv = incoming
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Ring attention as an autograd function: ring_attention_forward, then ring_attention_backward.

    Use ring_attention(...), which checks the inputs and fills in the defaults.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                group: dist.ProcessGroup, balanced: bool) -> torch.Tensor:
        """O (B, H, Tl, d) in q's dtype; saves q, k, v, O and L for the backward pass."""
        o, lse = ring_attention_forward(q, k, v, causal, scale, group, balanced)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.balanced = causal, scale, group, balanced
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        """dQ, dK, dV by the ring backward; None for causal, scale, group and balanced."""
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.scale, ctx.group, ctx.balanced)
        return dq, dk, dv, None, None, None, None


def _check_cp_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, balanced: bool, causal: bool = False,
                     scale: float | None = None) -> None:
    """Chapter 4's checks, plus: q and k/v shards of one length that splits into the rank's chunks."""
    check_attention_inputs(q, k, v, causal, scale)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} local tokens but q has {q.shape[2]}; a CP rank holds the queries "
                         "and keys of the same tokens")
    if balanced and q.shape[2] % 2:
        raise ValueError(f"q has {q.shape[2]} local tokens, which is odd; the balanced layout gives each rank "
                         "two chunks of equal length")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None, group: dist.ProcessGroup | None = None,
                   balanced: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across the CP group, by ring attention (differentiable).

    q: (B, H, Tl, d); k, v: (B, Hkv, Tl, d) with Hkv dividing H: this rank's shard, as given by
    shard_sequence(..., balanced) and rotated by RoPE at shard_positions. Returns O (B, H, Tl, d),
    this rank's rows of softmax(scale Q K^T) V over the full sequence (causal: a token sees itself
    and earlier tokens). group: the CP process group (None: the whole world).
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return RingAttention.apply(q, k, v, causal, scale, group if group is not None else dist.group.WORLD, balanced)


# %% [markdown]
# ### 8.5 Llama 3's all-gather context parallelism
#
# Llama 3 does not pass blocks around a ring. Its CP ranks first **all-gather** K and V, so
# that every rank holds the keys and values of the whole sequence, and then compute attention
# of their local queries against them (Section 3.3.2 of the paper). The all-gather cannot
# overlap with the attention that needs its result, but the paper gives two reasons why that
# is acceptable. First, any mask (Llama 3 trains with document masks, so tokens attend only
# within their own document) is easy to apply when all keys are present, while a ring has to
# work out per block what is visible. Second, with GQA the K/V tensors are small: the 405B
# model has 128 query heads but 8 key/value heads, so gathering K and V moves
# $2 \cdot 8 / 128 = 1/8$ of the bytes of $Q$, and gathering costs $O(T)$ against attention's
# $O(T^2)$. The price is memory: every rank holds K/V for all $T$ tokens (still $T/CP$ for all
# other activations).
#
# Gathered and put back in global order, the keys of a local query chunk $q_c$ under the
# causal mask are the prefix of the first $q_c + 1$ chunks, and chapter 4's bottom-right
# mask on (query chunk, key prefix) is again the exact mask, so each local chunk is one
# `flash_attention` call. Only the gather itself needs a custom backward pass. All-gather is
# linear: rank $r$'s shard $x_r$ appears in every rank's gathered copy, so its gradient is the
# sum over ranks of the gradient each one computed for that piece,
#
# $$\frac{\partial \mathcal{L}}{\partial x_r}
#   = \sum_{r'} \Big[\frac{\partial \mathcal{L}}{\partial X^{(r')}}\Big]_{\text{shard } r} \qquad (8.6)$$
#
# which is exactly a **reduce-scatter**: sum the full-length gradients over the group and
# hand rank $r$ its shard. The attention itself is differentiated by autograd through
# `flash_attention` (chapter 4's kernels' backward on the GPU).

# %%
#| export lrn_lib.context_parallel
class GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards into the full sequence; its backward is a reduce-scatter (8.6).

    Use gather_sequence(...).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, dim: int, balanced: bool) -> torch.Tensor:
        """x (..., Tl, ...) on every rank -> the full (..., T, ...) in global order."""
        validate.tensor(x, "x")
        check_group(group)
        validate.integer(dim, "dim", low=0, high=x.dim() - 1)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        ctx.group, ctx.dim, ctx.balanced = group, dim, balanced
        return unshard_sequence(parts, dim=dim, balanced=balanced)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Sum the full-length gradients over the group, keep this rank's shard (reduce-scatter)."""
        cp = dist.get_world_size(ctx.group)
        pieces = [shard_sequence(grad, r, cp, dim=ctx.dim, balanced=ctx.balanced).contiguous() for r in range(cp)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=ctx.group)
        return out, None, None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                    balanced: bool = True) -> torch.Tensor:
    """All-gather every CP rank's shard x (..., Tl, ...) into the full (..., T, ...) sequence (differentiable).

    The inverse of shard_sequence across the group; the backward pass reduce-scatters.
    """
    validate.tensor(x, "x")
    check_group(group)
    dim = validate.integer(dim, "dim", low=-x.dim(), high=x.dim() - 1) % x.dim()
    return GatherSequence.apply(x, group if group is not None else dist.group.WORLD, dim, balanced)


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None, group: dist.ProcessGroup | None = None,
                        balanced: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across the CP group, Llama 3's way: all-gather K/V.

    Same arguments and result as ring_attention. Differentiable: autograd through
    flash_attention, and a reduce-scatter of dK, dV in the gather's backward pass.
    """
    _check_cp_inputs(q, k, v, balanced, causal, scale)
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    k_all = gather_sequence(k, group, dim=2, balanced=balanced)
    v_all = gather_sequence(v, group, dim=2, balanced=balanced)
    if not causal:
        return flash_attention(q, k_all, v_all, causal=False, scale=scale)
    mine = chunk_ids(dist.get_rank(group), dist.get_world_size(group), balanced)
    c = q.shape[2] // len(mine)
    outs = [flash_attention(q[:, :, a * c:(a + 1) * c], k_all[:, :, :(q_chunk + 1) * c],
                            v_all[:, :, :(q_chunk + 1) * c], causal=True, scale=scale)   # the key prefix
            for a, q_chunk in enumerate(mine)]
    return torch.cat(outs, dim=2)


# %% [markdown]
# ### 8.6 Checking both against attention on one process
#
# The worker below builds the same random $Q, K, V$ and upstream gradient $dO$ on every rank
# (one seed), computes full-sequence attention and its gradients with chapter 4's
# `attention_reference` and autograd in float64, then gives each rank its shards, runs
# ring or all-gather attention and its backward pass, and compares its output and its
# $dQ, dK, dV$ shards with the reference's. A list of configurations runs in one set of
# processes, since starting processes costs more than these small problems. The errors are
# stacked under `torch.no_grad()` before the all-reduce: a tensor handed to a collective
# that still carries an autograd graph can keep, through the `ctx.group` of the CP
# functions in that graph, the process group alive past `destroy_process_group`, and the
# process may then abort at exit.

# %%
#| export lrn_lib.context_parallel_checks
"""Spawn workers that check context parallelism against one process in float64: ring and all-gather
attention against full-sequence attention, and a whole Llama step with CP."""
import functools

import torch
import torch.distributed as dist

from lrn_lib import validate
from lrn_lib.attention import attention_reference
from lrn_lib.context_parallel import (allgather_attention, context_parallel_loss, cp_attend, ring_attention,
                                      shard_positions, shard_sequence)
from lrn_lib.llama import Llama, lm_loss, tiny_config
from lrn_lib.mesh import check_rank


def _check_configs(configs: list[dict], keys: tuple[str, ...]) -> None:
    """Raise unless configs is a non-empty list of dicts holding `keys`, each with a known variant."""
    for cfg in validate.nonempty(configs, "configs"):
        if not isinstance(cfg, dict):
            raise TypeError(f"configs must hold dicts, got {type(cfg).__name__}")
        missing = sorted(set(keys) - set(cfg))
        if missing:
            raise ValueError(f"a config of configs lacks the keys {missing}")
        validate.choice(cfg["variant"], "variant", ("ring", "allgather"))


def attention_check(rank: int, world: int, configs: list[dict],
                    cp_groups: list[list[int]] | None = None) -> list[dict[str, float]]:
    """Spawn worker: CP attention against full-sequence attention_reference, in float64.

    Each config: variant ("ring" or "allgather"), causal, balanced, batch, heads, kv_heads,
    seq_len, head_dim, seed. cp_groups: a partition of the ranks into CP groups, each of which
    runs every config on its own (default: one group of all ranks). Returns, per config, the
    largest |difference| over all ranks of the output and of dQ, dK, dV.
    """
    check_rank(rank, world)
    _check_configs(configs, ("variant", "causal", "balanced", "batch", "heads", "kv_heads", "seq_len", "head_dim",
                             "seed"))
    if cp_groups is not None and sorted(r for ranks in validate.nonempty(cp_groups, "cp_groups") for r in ranks) \
            != list(range(world)):
        raise ValueError(f"cp_groups must partition the ranks 0..{world - 1}, got {cp_groups}")
    group = dist.group.WORLD
    for ranks in cp_groups or []:
        new = dist.new_group(ranks)                               # collective: every rank creates every group
        if rank in ranks:
            group = new
    cp_rank, cp = dist.get_rank(group), dist.get_world_size(group)
    attend = {"ring": ring_attention, "allgather": allgather_attention}
    results = []
    for cfg in configs:
        g = torch.Generator().manual_seed(cfg["seed"])
        b, t, d = cfg["batch"], cfg["seq_len"], cfg["head_dim"]
        q = torch.randn(b, cfg["heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, cfg["kv_heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(b, cfg["kv_heads"], t, d, generator=g, dtype=torch.float64, requires_grad=True)
        do = torch.randn(b, cfg["heads"], t, d, generator=g, dtype=torch.float64)
        o_ref = attention_reference(q, k, v, causal=cfg["causal"])[0]
        o_ref.backward(do)

        def mine(x: torch.Tensor) -> torch.Tensor:
            return shard_sequence(x.detach(), cp_rank, cp, dim=2, balanced=cfg["balanced"])

        q_l, k_l, v_l = (mine(x).requires_grad_() for x in (q, k, v))
        o_l = attend[cfg["variant"]](q_l, k_l, v_l, causal=cfg["causal"], group=group, balanced=cfg["balanced"])
        o_l.backward(mine(do))
        with torch.no_grad():                                      # a collective's tensor must carry no graph
            errors = torch.stack([(o_l - mine(o_ref)).abs().max(), (q_l.grad - mine(q.grad)).abs().max(),
                                  (k_l.grad - mine(k.grad)).abs().max(), (v_l.grad - mine(v.grad)).abs().max()])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results.append(dict(zip(("output", "dq", "dk", "dv"), errors.tolist())))
    return results


# %%
from lrn_lib.context_parallel_checks import attention_check

base = dict(batch=2, heads=6, kv_heads=2, head_dim=8, seed=0)
configs = [dict(base, variant=variant, causal=causal, balanced=balanced, seq_len=40)
           for variant in ("ring", "allgather") for causal, balanced in ((True, True), (True, False), (False, True))]
results = spawn(attention_check, 4, configs)[0]
print("4 CP ranks, 40 tokens, 6 query heads sharing 2 K/V heads, float64:")
for cfg, errors in zip(configs, results):
    layout = "load-balanced" if cfg["balanced"] else "contiguous"
    mask = "causal" if cfg["causal"] else "no mask"
    print(f"  {cfg['variant']:9s} {mask:7s} {layout:13s}: output, dQ, dK, dV equal to one process "
          f"(|difference| < 1e-12): {max(errors.values()) < 1e-12}")

# %% [markdown]
# ### 8.7 Context parallelism in the model: positions and the loss
#
# To run the Llama model of Section 6.1 with CP, three things change and nothing else.
#
# 1. Each rank feeds its shard of the tokens, `shard_sequence(tokens, rank, cp)`, **with its
#    global positions** `shard_positions(T, rank, cp)`. RoPE rotates a token by its position,
#    and attention scores depend on the difference of the query's and the key's positions;
#    a rank that numbered its tokens $0, 1, \dots, T/CP - 1$ would compute a different model.
#    Since RoPE is token-wise, rotating a shard by its global positions gives exactly the
#    shard of the rotated full sequence (checked below).
# 2. Every attention module's `attend` becomes CP attention with `causal=True` over the CP
#    group; the module's projections, RMSNorm and the FFN are untouched.
# 3. The loss. The single-process loss is the mean over all $N$ predicted tokens of the
#    sequence(s). Each rank only has the logits of its own tokens, so it computes the
#    **sum** of its token losses and divides by the **global** count $N = \sum_r N_r$:
#
# $$\mathcal{L} = \frac{1}{N} \sum_{r} \sum_{i \in \text{rank } r} \ell_i
#   = \sum_r \underbrace{\frac{1}{N}\sum_{i \in \text{rank } r} \ell_i}_{\text{rank } r\text{'s share}}
#   \qquad (8.7)$$
#
#    Each rank back-propagates its share; the parameter gradients are then **summed** over
#    the CP group (an all-reduce), because (8.7) is a sum over ranks. The value of the loss,
#    for logging, is the all-reduced sum of the shares.
#
# The pitfall is to let each rank take the mean over its own tokens and then average over
# ranks, as data parallelism does with its batches. That equals (8.7) only if every rank
# has the same number of counted tokens. With padding or ignored positions (target $-100$:
# prompts in fine-tuning, the tail of a packed batch) the counts differ per rank, and the
# tokens of a rank with few valid ones get too much weight. The same holds for the
# gradient: a DP-style *average* of the gradients over $G$ ranks divides by $G$, so the
# shares must then be multiplied by $G$. The rule that avoids both: normalize by the token
# count of the whole group over which the gradients are reduced, and reduce by summing.

# %%
#| export lrn_lib.context_parallel
def context_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup | None = None,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share (8.7) of the mean next-token loss of a sequence sharded over the CP group.

    logits: (B, Tl, V), targets: (B, Tl) int64, this rank's shard (targets equal to ignore_index
    are not counted). Returns (share, loss): share = sum of this rank's token losses / the
    group's count of counted tokens (back-propagate it, then sum the gradients over the group);
    loss = the all-reduced sum of the shares, the single-process mean (detached).
    """
    validate.tensor(logits, "logits", kind="float")
    validate.tensor(targets, "targets", kind="int")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B, T, V) "
                         "and (B, T)")
    validate.integer(ignore_index, "ignore_index")
    if bool((((targets < 0) | (targets >= logits.shape[-1])) & (targets != ignore_index)).any()):
        raise ValueError(f"targets must hold ids in [0, {logits.shape[-1]}) or ignore_index={ignore_index}")
    check_group(group)
    group = group if group is not None else dist.group.WORLD
    total = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                            targets.flatten(), ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    dist.all_reduce(count, group=group)                          # N: the global token count
    if count == 0:
        raise ValueError(f"targets holds no counted token on any rank (all equal ignore_index={ignore_index})")
    share = total / count                                        # (8.7): local sum / global count
    loss = share.detach().clone()
    dist.all_reduce(loss, group=group)
    return share, loss


def cp_attend(variant: str = "allgather", group: dist.ProcessGroup | None = None,
              balanced: bool = True) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A causal CP attention (q, k, v) -> o to assign to lrn_lib.llama.Attention.attend.

    variant: "ring" (ring_attention) or "allgather" (allgather_attention, Llama 3's).
    """
    variants = {"ring": ring_attention, "allgather": allgather_attention}
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    check_group(group)
    attention = variants[variant]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's shard q (B, H, Tl, d) against the whole sequence."""
        return attention(q, k, v, causal=True, group=group, balanced=balanced)

    return attend


# %% [markdown]
# Two single-process checks first: RoPE at the global positions commutes with sharding,
# and, with padding at the end of the sequence, the mean of per-rank means differs from the
# true mean while the shares (8.7) add up to it. The ranks are simulated by
# `shard_sequence`; no processes are needed.

# %%
from lrn_lib.llama import apply_rope, rope_cos_sin, rope_frequencies, tiny_config

cfg = tiny_config()
x = torch.randn(2, cfg.n_heads, 32, cfg.head_dim, dtype=torch.float64)
cos, sin = rope_cos_sin(torch.arange(32), rope_frequencies(cfg), torch.float64)
full = apply_rope(x, cos, sin)
same = True
for rank in range(4):
    cos_r, sin_r = rope_cos_sin(shard_positions(32, rank, 4), rope_frequencies(cfg), torch.float64)
    shard_rotated = apply_rope(shard_sequence(x, rank, 4, dim=2), cos_r, sin_r)
    same &= torch.equal(shard_rotated, shard_sequence(full, rank, 4, dim=2))
print("RoPE of a shard at its global positions == the shard of RoPE of the sequence:", same)

token_loss = torch.rand(2, 32, dtype=torch.float64) * 5          # per-token losses of 2 sequences
counted = torch.ones(2, 32, dtype=torch.bool)
counted[:, 20:] = False                                          # padding: the last 12 targets are -100
true_mean = token_loss[counted].mean()
sums = [shard_sequence(token_loss * counted, r, 4).sum() for r in range(4)]
counts = [shard_sequence(counted, r, 4).sum() for r in range(4)]
print("counted tokens per rank:", [int(c) for c in counts])
mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 4
print("mean of per-rank means == true mean:", torch.allclose(mean_of_means, true_mean))
print("sum of shares (8.7) == true mean:", torch.allclose(sum(s / sum(counts) for s in sums), true_mean))

# %% [markdown]
# Now the whole model. The worker builds the tiny Llama (float64) from one seed on every
# rank, takes one forward and backward step on the full sequence, then replaces every
# `attend` by CP attention, runs its shard at its global positions, back-propagates its loss
# share and all-reduces the gradients over the CP group. Some targets are padding, so the
# ranks count different numbers of tokens. The loss and every parameter gradient must equal
# the single-process step.

# %%
#| export lrn_lib.context_parallel_checks
def model_check(rank: int, world: int, configs: list[dict]) -> list[dict[str, float]]:
    """Spawn worker: one step of the tiny lrn_lib.llama model with CP against the single-process step.

    Each config: variant ("ring"/"allgather"), balanced, batch, seq_len, padding (how many
    trailing targets are ignore_index), seed. Returns, per config, |loss difference|, the
    largest |gradient difference| over all parameters, and the largest |gradient|, over the group.
    """
    check_rank(rank, world)
    _check_configs(configs, ("variant", "balanced", "batch", "seq_len", "padding", "seed"))
    group = dist.group.WORLD
    results = []
    for cfg in configs:
        torch.manual_seed(cfg["seed"])                            # the same weights and data on every rank
        model = Llama(tiny_config()).double()
        tokens = torch.randint(model.cfg.vocab_size, (cfg["batch"], cfg["seq_len"] + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[:, targets.shape[1] - cfg["padding"]:] = -100
        loss_ref = lm_loss(model(inputs), targets)                # the single-process step
        loss_ref.backward()
        grads_ref = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()

        for layer in model.layers:
            layer.attention.attend = cp_attend(cfg["variant"], group, cfg["balanced"])
        mine = functools.partial(shard_sequence, rank=rank, cp=world, dim=1, balanced=cfg["balanced"])
        logits = model(mine(inputs), shard_positions(cfg["seq_len"], rank, world, cfg["balanced"]))
        share, loss = context_parallel_loss(logits, mine(targets), group)
        share.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)                  # (8.7) is a sum over ranks: sum the grads
        with torch.no_grad():                                      # a collective's tensor must carry no graph
            grad_error = max((p.grad - grads_ref[name]).abs().max() for name, p in model.named_parameters())
            grad_size = max(g.abs().max() for g in grads_ref.values())
            errors = torch.stack([(loss - loss_ref).abs(), grad_error, grad_size])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results.append(dict(zip(("loss", "grad", "grad_size"), errors.tolist())))
    return results


# %%
from lrn_lib.context_parallel_checks import model_check

configs = [dict(variant=variant, balanced=True, batch=2, seq_len=32, padding=5, seed=0)
           for variant in ("ring", "allgather")]
print("tiny Llama, 2 CP ranks, 32 tokens (5 padded targets), float64:")
for cfg, errors in zip(configs, spawn(model_check, 2, configs)[0]):
    print(f"  {cfg['variant']:9s}: loss equal to one process (|difference| < 1e-12): {errors['loss'] < 1e-12}; "
          f"every gradient equal (|difference| < 1e-12): {errors['grad'] < 1e-12}")

# %% [markdown]
# Both variants compute the same model as one process, and they differ only in how K and V
# reach the queries: the ring keeps two K/V blocks per rank and hides the transfers behind
# the block computations, while the all-gather keeps all of K/V and exposes one collective
# per layer that GQA makes small. Llama 3 trained its 128K-token stage of the 405B model
# with CP = 16 inside the 4D mesh (Table 4 of the paper); Section 9.3 composes this section's
# `cp_attend` and `context_parallel_loss` with the other three dimensions.

# %% [markdown]
# ## Summary
#
# * Context parallelism splits the sequence. Everything but attention is token-wise; attention
#   needs every earlier token's keys and values, which either travel round a ring (ring
#   attention) or are all-gathered (Llama 3's choice), and partial results merge exactly by
#   their log-sum-exp (8.3).
# * Under a causal mask a contiguous split gives the last rank almost twice the mean work
#   (8.1); cutting the sequence into $2 \cdot CP$ chunks and giving rank $i$ chunks $i$ and
#   $2CP - 1 - i$ balances it.
# * Both variants, forward and backward, equal attention on one process in float64, and so
#   does a whole Llama step once each rank rotates its tokens by their global positions and
#   weights its loss by the global token count.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *measure* with this chapter's code. Worked solutions:
# `chapters/solutions/08_context_parallel_solutions.ipynb`.
#
# **Exercise 1 (derive and measure): the balanced layout's work.** Cut a sequence of
# $T = 2 \cdot CP \cdot c$ tokens into $2 \cdot CP$ chunks of $c$ tokens. (a) Show that under a causal
# mask the queries of chunk $j$ see $W_j = j c^2 + c(c+1)/2$ (query, key) pairs, and that rank $i$
# of the balanced layout (chunks $i$ and $2CP - 1 - i$, `chunk_ids`) sees the same number for
# every $i$; give it. (b) For the contiguous layout (rank $i$ holds $2c$ consecutive tokens),
# derive the ratio of the busiest rank's work to the mean and check it against (8.1). (c) Count
# the pairs with `chunk_ids` and `causal_visible` for $CP = 2, 4, 8$ and $c = 16$ and print
# both layouts' max/mean ratios. Look for: balanced 1 exactly, contiguous approaching 2.
