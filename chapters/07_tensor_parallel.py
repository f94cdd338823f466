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
# # Chapter 7. Processes, the mesh and tensor parallelism
#
# Chapter 6 built Llama 3 and trained it in one process. Llama 3's 405B model was trained on
# up to 16K GPUs, every step split four ways (Grattafiori et al. 2024, arXiv:2407.21783,
# Section 3.3.2). This chapter and the next three build those four splits from scratch on
# `torch.distributed`, each checked equal to the single-process step in float64. Here come the
# machinery they share, processes, ranks, collectives and the 4D mesh (section 7.1), and the
# first split, tensor parallelism, which cuts every weight matrix across the GPUs of one server
# (section 7.2). Chapter 8 splits the sequence, chapter 9 the layers and the batch.

# %%
import torch

from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices, and the spawned processes share the cores

# %% [markdown]
# ## 7.1 Processes, ranks and the 4D mesh
#
# Every parallel scheme of chapters 7 to 10 runs the same program in $W$ processes (ranks)
# that talk through `torch.distributed` collectives. On a laptop the processes share the
# CPU and talk through the gloo backend; on GPUs the same code uses NCCL.
#
# The book starts those processes in one place, the hand-written `lrn_lib.spawn` (chapter 5's
# expert parallelism uses it too). `spawn(worker, W, *args)` asks the operating system for a
# free TCP port on the loopback address, starts $W$ fresh Python processes with
# `torch.multiprocessing`, and in each one sets `MASTER_ADDR`/`MASTER_PORT` to that port, joins
# the gloo process group as rank $r$ of $W$ (the rendezvous: every rank connects to the same
# address, and the group exists once all $W$ have arrived), runs `worker(r, W, *args)`, and sends
# its result back through a queue; the parent returns the results in rank order. Two details
# matter in practice: the processes are *spawned*, not forked, so the worker must be a top-level
# function of an importable module (which is why this chapter's workers live in `lrn_lib`, not
# in notebook cells), and each rank waits at a barrier before leaving the group, so that no rank
# tears down a connection another is still using.

# %%
#| export lrn_lib.mesh
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lrn_lib import validate


def check_rank(rank: int, world: int) -> None:
    """Raise unless world is an int >= 1 and rank an int in [0, world): the first check of every spawn worker."""
    validate.integer(world, "world", low=1)
    validate.integer(rank, "rank", low=0, high=world - 1)


def check_mesh_shape(shape: "MeshShape", world: int) -> None:
    """Raise TypeError unless shape is a MeshShape, ValueError unless its world size is `world`."""
    validate.instance(shape, "shape", MeshShape)
    if shape.world != world:
        raise ValueError(f"shape {shape} needs {shape.world} ranks, but world={world}")


def check_group(group: Any, name: str = "group") -> None:
    """Raise TypeError unless group is a torch.distributed ProcessGroup or None (None: the whole world)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


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

    def __post_init__(self):
        for name in MESH_DIMS:
            validate.integer(getattr(self, name), name, low=1)

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def grid(self) -> torch.Tensor:
        """Rank numbers laid out (dp, pp, cp, tp): TP varies fastest, as in Llama 3's Figure 5."""
        return torch.arange(self.world).view(self.dp, self.pp, self.cp, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{'tp': i, 'cp': j, 'pp': k, 'dp': l} of one rank."""
        validate.integer(rank, "rank", low=0, high=self.world - 1)
        dp, pp, cp, tp = (int(c[0]) for c in torch.nonzero(self.grid() == rank, as_tuple=True))
        return {"tp": tp, "cp": cp, "pp": pp, "dp": dp}

    def groups(self, *dims: str) -> list[list[int]]:
        """Every group of ranks that differ only along `dims` (e.g. groups("cp", "dp") for gradient averaging)."""
        for d in dims:
            if d not in MESH_DIMS:
                raise ValueError(f"unknown mesh dimension {d!r}; expected one of {MESH_DIMS}")
        if len(set(dims)) < len(dims):
            raise ValueError(f"dims {dims} names a mesh dimension twice")
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
        validate.instance(shape, "shape", MeshShape)
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


# %%
#| export lrn_lib.mesh_checks
"""Spawn workers that show the mesh at work: each rank's coordinates and groups, and two collectives."""
import torch
import torch.distributed as dist

from lrn_lib.mesh import Mesh, MeshShape, check_mesh_shape, check_rank


def describe_rank(rank: int, world: int, shape: MeshShape) -> str:
    """One line per rank: its coordinates and the members of each of its groups (a spawn worker)."""
    check_rank(rank, world)
    check_mesh_shape(shape, world)
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
from lrn_lib.mesh import MeshShape
from lrn_lib.spawn import spawn

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
#| export lrn_lib.mesh_checks
def collectives_demo(rank: int, world: int) -> str:
    """all_reduce and all_gather of each rank's number (a spawn worker); returns what this rank sees."""
    check_rank(rank, world)
    x = torch.tensor([float(rank)])
    total = x.clone()
    dist.all_reduce(total)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, x)
    return f"rank {rank}: all_reduce -> {total.item():.0f}, all_gather -> {[int(g.item()) for g in gathered]}"


# %%
from lrn_lib.mesh_checks import collectives_demo  # the module's function: spawned processes import it from there

for line in spawn(collectives_demo, 4):
    print(line)

# %% [markdown]
# ## 7.2 Tensor parallelism
#
# The first dimension of the Llama 3 grid splits every weight matrix of a layer over the 8
# GPUs of one server. This is the scheme of Megatron-LM (Shoeybi et al. 2019,
# "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism",
# arXiv:1909.08053): each rank holds a slice of each matrix and computes a slice of each
# product, and a few all-reduces stitch the slices together. Unlike data parallelism it
# divides the memory for a layer's weights, gradients and optimizer state by the TP degree
# $t$, and also the activations inside attention and the FFN (the residual stream and the
# norms' inputs stay whole on every rank). The price is communication inside every layer,
# twice forward and twice backward, which is why TP lives on the fast NVLink links inside
# a server.
#
# Write a linear layer as $Y = XA$ with $X$ of shape $(N, d_{in})$ and $A = W^\top$ of
# shape $(d_{in}, d_{out})$ (PyTorch's `nn.Linear` stores $W$, shape $(d_{out}, d_{in})$).
# There are two ways to cut $A$ over $t$ ranks:
#
# * **Column-parallel**: $A = [A_1, \dots, A_t]$ split along the output features. Rank $r$
#   computes $Y_r = X A_r$, a block of the output's columns, from the *whole* input:
#   $$Y = [XA_1, \dots, XA_t] \qquad (7.1)$$
# * **Row-parallel**: $A = [A_1; \dots; A_t]$ split along the input features. Rank $r$ needs
#   only the matching block of input columns $X_r$, and its product is a *partial sum* of
#   the whole output:
#   $$Y = \sum_{r=1}^{t} X_r A_r \qquad (7.2)$$
#
# The trick of Megatron-LM is to chain the two: a column-parallel layer produces exactly
# the column block $Y_r$ that a following row-parallel layer consumes, so the sharded
# intermediate never travels. For an MLP with an elementwise activation $\phi$,
# $\phi(XA)B = \sum_r \phi(XA_r) B_r$ (7.3): one all-reduce of the partial sums after $B$,
# nothing in between. The communication is two conjugate operators, which the paper calls
# $f$ and $g$:
#
# * $f$ (before a column-parallel block): identity forward; backward, all-reduce (sum). Every
#   rank's $X$ feeds its own $A_r$, so $\partial L / \partial X = \sum_r
#   (\partial L/\partial Y_r) A_r^\top$ sums contributions that live on different ranks. (7.4)
# * $g$ (after a row-parallel block): forward, all-reduce (sum) of the partial products
#   (7.2); backward, identity, because the sum hands the same gradient to every addend.
#   (7.5)
#
# Both are `torch.autograd.Function`s over a process group (`None`: the whole world), so the
# same code runs on a TP group of a 4D mesh (section 9.3). `shard_bounds` decides which
# contiguous rows a rank owns; when the size does not divide by $t$, the first ranks get
# one more row (the rule of `torch.tensor_split`), which the vocabulary will need.

# %%
#| export lrn_lib.tensor_parallel
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, RMSNorm, check_config
from lrn_lib.mesh import check_group, check_rank


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share when `size` rows are split over `world` ranks.

    The first size % world ranks get one row more (torch.tensor_split's rule). Raises
    ValueError for a rank outside the group or when some rank would get no row.
    """
    check_rank(rank, world)
    validate.integer(size, "size", low=0)
    if size < world:
        raise ValueError(f"size={size} cannot be split over world={world} ranks with at least one row each")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def _all_reduce_copy(x: torch.Tensor, group: "dist.ProcessGroup | None",
                     op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> torch.Tensor:
    """A new tensor holding the all-reduce (op, default sum) of x over group; x (any shape) is left unchanged."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


class CopyToTP(torch.autograd.Function):
    """Megatron's f (7.4): identity forward, sum of the gradients over the group backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: "dist.ProcessGroup | None") -> torch.Tensor:
        """x (any shape) -> the same values."""
        validate.tensor(x, "x", nonempty=False)
        check_group(group)
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """All-reduce the partial input gradients of the ranks' column blocks."""
        return _all_reduce_copy(grad, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """Megatron's g (7.5): sum over the group forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: "dist.ProcessGroup | None") -> torch.Tensor:
        """x (any shape), a partial sum on each rank -> the full sum, the same on every rank."""
        validate.tensor(x, "x", nonempty=False)
        check_group(group)
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Every addend of a sum receives the sum's gradient unchanged."""
        return grad, None


def copy_to_tp(x: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """f (7.4): x (any shape) unchanged forward; its gradient is summed over `group` backward."""
    return CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """g (7.5): x (any shape) summed over `group` forward; the gradient passes unchanged backward."""
    return ReduceFromTP.apply(x, group)


# %% [markdown]
# ### Column- and row-parallel linear layers
#
# A parallel layer is built from the full `nn.Linear`, which every rank of the group holds
# identically (the same seed), and keeps only its own block as a new parameter. Each class
# can say which slice of a full-model tensor its parameter corresponds to (`full_slice`),
# which is how the tests compare every sharded gradient with the single-process one.
#
# A column-parallel layer applies $f$ to its input unless told that the caller already did:
# in attention, $W_q$, $W_k$ and $W_v$ read the same input, and one $f$ in front of all
# three (one all-reduce backward) replaces three. A bias of a column-parallel layer is split
# with its outputs; the bias of a row-parallel layer is added once, after $g$.

# %%
#| export lrn_lib.tensor_parallel
class ColumnParallelLinear(nn.Module):
    """This rank's block of output features of `linear` (7.1): x (..., in) -> (..., out_r).

    Keeps rows [start, stop) = shard_bounds(out, rank, t) of the full weight (out, in) and of
    the bias. With copy_input the input passes f first; pass copy_input=False when the caller
    applied f to an input that several column-parallel layers share.
    """

    def __init__(self, linear: nn.Linear, group: "dist.ProcessGroup | None" = None, copy_input: bool = True):
        super().__init__()
        validate.instance(linear, "linear", nn.Linear)
        check_group(group)
        validate.flag(copy_input, "copy_input")
        self.group, self.copy_input = group, copy_input
        self.start, self.stop = shard_bounds(linear.out_features, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(linear.weight.detach(), "weight").clone())
        self.bias = None if linear.bias is None else nn.Parameter(self.full_slice(linear.bias.detach(), "bias").clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The part of a full-layer tensor, weight (out, in) or bias (out,), that parameter `name` holds."""
        return full[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in), the same on every rank -> this rank's output columns (..., out_r)."""
        if validate.tensor(x, "x", kind="float", nonempty=False).dim() == 0 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x has shape {tuple(x.shape)}; this layer takes {self.weight.shape[1]} input features")
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's block of input features of `linear` (7.2): x_r (..., in_r) -> (..., out), all-reduced.

    Keeps columns [start, stop) = shard_bounds(in, rank, t) of the full weight (out, in); the
    bias (out,) is replicated and added once, after the sum g.
    """

    def __init__(self, linear: nn.Linear, group: "dist.ProcessGroup | None" = None):
        super().__init__()
        validate.instance(linear, "linear", nn.Linear)
        check_group(group)
        self.group = group
        self.start, self.stop = shard_bounds(linear.in_features, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(linear.weight.detach(), "weight").clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The part of a full-layer tensor, weight (out, in) or bias (out,), that parameter `name` holds."""
        return full[:, self.start:self.stop] if name == "weight" else full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_r), this rank's input columns -> (..., out), the same on every rank."""
        if validate.tensor(x, "x", kind="float", nonempty=False).dim() == 0 or x.shape[-1] != self.stop - self.start:
            raise ValueError(f"x has {x.shape[-1]} features; this rank's block of the input has {self.stop - self.start}")
        y = reduce_from_tp(F.linear(x, self.weight), self.group)                        # (7.2)
        return y if self.bias is None else y + self.bias


# %% [markdown]
# ### Splitting SwiGLU and attention
#
# Llama's feed-forward network is SwiGLU (6.3), $\mathrm{FFN}(x) = W_2(\mathrm{SiLU}(W_1 x)
# \odot W_3 x)$. Its hidden unit $j$ is $\mathrm{SiLU}(w_{1,j} \cdot x)\,(w_{3,j} \cdot x)$:
# it needs row $j$ of the gate $W_1$ *and* row $j$ of the up projection $W_3$, and nothing
# else. So $W_1$ and $W_3$ are both column-parallel **with the same split**, rank $r$
# owning the hidden units $S_r$ of both, and $W_2$ is row-parallel over the same $S_r$:
#
# $$\mathrm{FFN}(x) = \sum_{r=1}^{t} W_{2}[:, S_r]\big(\mathrm{SiLU}(W_{1}[S_r]\, x) \odot
# W_{3}[S_r]\, x\big) \qquad (7.6)$$
#
# If the gate were split differently from the up projection (say rank 0 held gate units
# 0..79 but up units 80..159), the product $\odot$ would pair gate unit $j$ with up unit
# $j'\neq j$ on the same rank: the ranks would compute a different function, or would
# have to exchange the hidden activations, which is the communication the pairing exists
# to avoid. The same argument forbids splitting the contraction dimension $d$ of $W_1$ or
# $W_3$: $\mathrm{SiLU}$ of a partial sum is not a partial sum of $\mathrm{SiLU}$s.
#
# Attention splits by heads, because heads are independent until $W_o$ mixes them. $W_q$,
# $W_k$, $W_v$ are column-parallel, so rank $r$ computes the queries of $n_h/t$ heads and
# the keys and values of $n_{kv}/t$ heads; it runs attention on those heads alone, and
# $W_o$ is row-parallel over the concatenated local head outputs. `Attention.forward`
# reshapes the projections with `view(batch, time, -1, head_dim)`, so a column-sharded $W_q$
# simply yields the local heads. With grouped-query attention, query head $h$ reads KV head
# $\lfloor h/g \rfloor$, $g = n_h/n_{kv}$. Contiguous blocks keep each query head on the
# rank of its KV head exactly when $t$ divides $n_{kv}$: then rank $r$'s query heads
# $r n_h/t, \dots, (r+1)n_h/t - 1$ read KV heads $r n_{kv}/t, \dots, (r+1)n_{kv}/t - 1$,
# its own. Llama 3 405B has $n_{kv} = 8$, one KV head per GPU at $t = 8$: its TP degree
# is as large as it can be without replicating KV heads. We refuse head counts that $t$
# does not divide.
#
# Per layer this costs one $f$ before attention, one $g$ after $W_o$, one $f$ before the
# FFN and one $g$ after $W_2$: **two all-reduces forward and two backward**, each of a
# $(B, T, d)$ activation.
#
# ### Vocabulary-parallel embedding and cross-entropy
#
# The embedding table and the output head are $V \times d$ each; with Llama 3's
# $V = 128{,}256$ they hold 525M parameters each in the 8B model (2.1B in the 405B), so they
# are split too, along the vocabulary. Rank $r$ holds the rows of tokens $[s_r, e_r)$; a token outside that range
# gives a zero vector, and $g$ sums the ranks' vectors, exactly one of which is the row:
#
# $$E[x] = \sum_{r=1}^{t} \mathbf{1}[s_r \le x < e_r]\; E_r[x - s_r] \qquad (7.7)$$
#
# The output head is column-parallel, so rank $r$ ends with the logits $z_v$ of its own
# vocabulary slice. Gathering them would move $B \cdot T \cdot V$ numbers, $V/d$ times an
# activation (31 times in the 8B model) and as much memory again on every rank. Instead cross-entropy is computed on the shards, with three reductions of
# one number per token: the maximum $m$ (for a stable exponent), the sum of exponentials,
# and the target's logit, which only its owning rank has (the others contribute 0):
#
# $$\ell = \log \sum_{r} \sum_{v \in [s_r, e_r)} e^{z_v - m} - (z_y - m), \qquad m = \max_r
# \max_{v \in [s_r, e_r)} z_v \qquad (7.8)$$
#
# The sum of exponentials and the target logit travel in one all-reduce after the maximum,
# so the loss costs two all-reduces per step, of $B T$ and $2 B T$ numbers. The gradient needs no
# communication at all: $\partial \ell / \partial z_v = p_v - \mathbf{1}[v = y]$ with
# $p_v = e^{z_v - m} / \sum e^{z - m}$, and each rank computes it for its own $v$ (7.9).
# The vocabulary need not divide by $t$: ranks may own slices of unequal size.

# %%
#| export lrn_lib.tensor_parallel
class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, stop) = shard_bounds(V, rank, t) of `embedding` (7.7).

    forward(tokens (...) int64) -> (..., dim), the full embedding on every rank after g.
    """

    def __init__(self, embedding: nn.Embedding, group: "dist.ProcessGroup | None" = None):
        super().__init__()
        validate.instance(embedding, "embedding", nn.Embedding)
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("embedding must have no padding_idx and no max_norm")
        check_group(group)
        self.group, self.num_embeddings = group, embedding.num_embeddings
        self.start, self.stop = shard_bounds(embedding.num_embeddings, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(self.full_slice(embedding.weight.detach(), "weight").clone())

    def full_slice(self, full: torch.Tensor, name: str) -> torch.Tensor:
        """The rows (V_r, dim) of a full table (V, dim) that this rank holds."""
        return full[self.start:self.stop]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 global ids -> (..., dim)."""
        if validate.tensor(tokens, "tokens").dtype != torch.int64:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        validate.ids(tokens, "tokens", self.num_embeddings)            # an id outside every shard would embed to 0
        local = tokens - self.start
        mine = (local >= 0) & (local < self.stop - self.start)
        rows = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return reduce_from_tp(rows.masked_fill(~mine[..., None], 0.0), self.group)      # (7.7)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (7.8) from vocabulary-sharded logits; backward (7.9) needs no communication."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, start: int,
                group: "dist.ProcessGroup | None") -> torch.Tensor:
        """logits (N, V_r) for vocabulary ids [start, start + V_r); targets (N,) global ids -> losses (N,)."""
        validate.tensor(logits, "logits", dims=2, kind="float")
        if validate.tensor(targets, "targets", dims=1, kind="int").shape[0] != logits.shape[0]:
            raise ValueError(f"targets {tuple(targets.shape)} must hold one id per row of logits {tuple(logits.shape)}")
        validate.integer(start, "start", low=0)
        check_group(group)
        work = logits.to(torch.promote_types(logits.dtype, torch.float32))
        m = _all_reduce_copy(work.amax(-1), group, dist.ReduceOp.MAX)                   # m of (7.8)
        e = torch.exp(work - m[:, None])
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        target = torch.where(mine, work.gather(1, local[:, None])[:, 0] - m, torch.zeros_like(m))
        sums = _all_reduce_copy(torch.stack([e.sum(-1), target]), group)                # one message, 2 numbers a token
        ctx.save_for_backward(e / sums[0][:, None], local, mine)
        ctx.dtype = logits.dtype
        return torch.log(sums[0]) - sums[1]                                             # (7.8)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """d loss_n / d z_nv = p_nv - [v = y_n] for this rank's v (7.9), scaled by grad (N,)."""
        p, local, mine = ctx.saved_tensors
        dz = p.clone()
        rows = torch.arange(dz.shape[0], device=dz.device)[mine]
        dz[rows, local[mine]] -= 1.0                                                    # (7.9)
        return (dz * grad[:, None]).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                 group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """Mean cross-entropy over all tokens, like lm_loss, from logits that are never gathered.

    local_logits (..., V_r): this rank's columns shard_bounds(vocab_size, rank, t) of the
    full logits; targets (...) int64 global ids -> scalar, the same on every rank of group.
    """
    validate.tensor(local_logits, "local_logits", kind="float")
    if validate.tensor(targets, "targets").dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(f"local_logits {tuple(local_logits.shape)} and targets {tuple(targets.shape)} "
                         "must agree except in the last (vocabulary) dimension")
    validate.integer(vocab_size, "vocab_size", low=1)
    if targets.min() < 0 or targets.max() >= vocab_size:
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size})")
    check_group(group)
    start, stop = shard_bounds(vocab_size, dist.get_rank(group), dist.get_world_size(group))
    if local_logits.shape[-1] != stop - start:
        raise ValueError(f"local_logits has {local_logits.shape[-1]} vocabulary columns; this rank owns "
                         f"{stop - start} of vocab_size={vocab_size}")
    losses = VocabParallelCrossEntropy.apply(local_logits.reshape(-1, stop - start), targets.reshape(-1), start, group)
    return losses.mean()


# %% [markdown]
# Before sharding a whole model, we check the pieces on their own against their
# single-process versions: a column-parallel layer, GELU and a row-parallel layer, with
# biases (7.3); the vocabulary-parallel embedding; and the vocabulary-parallel
# cross-entropy against `F.cross_entropy`, on logits with a standard deviation of 30 (so the
# shared maximum matters) and a vocabulary of 67 that no world size here divides.

# %%
#| export lrn_lib.tensor_parallel_checks
"""Spawn workers that check tensor parallelism against one process in float64: the parallel layers,
the whole sharded Llama, and the same split through PyTorch's DTensor."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lrn_lib import validate
from lrn_lib.llama import Llama, LlamaConfig, check_config, lm_loss
from lrn_lib.mesh import Mesh, MeshShape, check_rank
from lrn_lib.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, check_tp_config,
                                     gradient_errors, shard_bounds, tensor_parallel_llama,
                                     vocab_parallel_cross_entropy)


def tp_layers_check(rank: int, world: int, vocab_size: int = 67, seed: int = 0, n_tokens: int = 10,
                    dim: int = 12, hidden: int = 10) -> dict[str, float]:
    """spawn worker: the parallel pieces against their single-process versions, float64, group = world.

    Returns the largest |parallel - single-process| of: a ColumnParallelLinear -> GELU ->
    RowParallelLinear MLP with biases ('mlp_out', 'mlp_grad': input and every parameter
    gradient); VocabParallelEmbedding ('embedding_out', 'embedding_grad'); and
    vocab_parallel_cross_entropy against F.cross_entropy ('ce_loss', 'ce_grad' of the logits).
    """
    check_rank(rank, world)
    for name, value in (("vocab_size", vocab_size), ("n_tokens", n_tokens), ("dim", dim), ("hidden", hidden)):
        validate.integer(value, name, low=world)                   # every rank gets a row of each split
    torch.manual_seed(seed)
    up, down = nn.Linear(dim, hidden).double(), nn.Linear(hidden, dim).double()
    table = nn.Embedding(vocab_size, dim).double()
    x = torch.randn(n_tokens, dim, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(n_tokens, dim, dtype=torch.float64)
    tokens = torch.randint(0, vocab_size, (n_tokens,))
    logits = (30 * torch.randn(n_tokens, vocab_size, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, vocab_size, (n_tokens,))
    column, row, embedding = ColumnParallelLinear(up), RowParallelLinear(down), VocabParallelEmbedding(table)

    mlp = down(F.gelu(up(x)))
    (mlp * gy).sum().backward()
    x_tp = x.detach().clone().requires_grad_()
    mlp_tp = row(F.gelu(column(x_tp)))
    (mlp_tp * gy).sum().backward()
    mlp_grad = max([(x_tp.grad - x.grad).abs().max().item()] +
                   [(p.grad - module.full_slice(full.grad, name)).abs().max().item()
                    for module, layer in ((column, up), (row, down))
                    for (name, p), full in zip(module.named_parameters(), layer.parameters())])

    rows = table(tokens)
    (rows * gy).sum().backward()
    rows_tp = embedding(tokens)
    (rows_tp * gy).sum().backward()

    loss = F.cross_entropy(logits, targets)
    loss.backward()
    start, stop = shard_bounds(vocab_size, dist.get_rank(), dist.get_world_size())
    local = logits.detach()[:, start:stop].clone().requires_grad_()
    loss_tp = vocab_parallel_cross_entropy(local, targets, vocab_size)
    loss_tp.backward()
    return {"mlp_out": (mlp_tp - mlp).abs().max().item(), "mlp_grad": mlp_grad,
            "embedding_out": (rows_tp - rows).abs().max().item(),
            "embedding_grad": (embedding.weight.grad - embedding.full_slice(table.weight.grad, "weight")).abs().max().item(),
            "ce_loss": abs(loss_tp.item() - loss.item()),
            "ce_grad": (local.grad - logits.grad[:, start:stop]).abs().max().item()}


# %%
from lrn_lib.spawn import spawn
from lrn_lib.tensor_parallel_checks import tp_layers_check

for tp_world in (2, 3):
    pieces = spawn(tp_layers_check, tp_world)
    print(f"world {tp_world}, vocabulary 67, every piece equal to its single-process version (< 1e-12):",
          all(err < 1e-12 for r in pieces for err in r.values()))
    print("  checked:", ", ".join(pieces[0]))

# %% [markdown]
# ### Sharding the whole Llama
#
# The ranks of a TP group must start from identical master weights: every rank builds the
# full `Llama` from one seed, and `tensor_parallel_llama` then keeps each rank's shards. It
# checks the premise with two small all-reduces (minimum and maximum) of per-parameter
# fingerprints, since ranks seeded differently would otherwise train a model that no
# single process describes.
#
# Where does $f$ go? Every column-parallel layer reads the output of an RMSNorm, so the
# sharded model replaces each norm by a `TPRMSNorm`, the same norm followed by $f$. The
# norm weights stay **replicated** (RMSNorm is cheap and elementwise), and here is why their
# gradients need no all-reduce over TP: in the backward pass the gradient reaching the
# norm's output has already been summed by $f$, so every rank holds the *full*
# $\partial L/\partial(\text{norm output})$ and the same input, and computes the same, full
# gradient of the norm weight. The residual stream is replicated in the same way. Summing
# these gradients over the group would multiply them by $t$. (This changes with Megatron's
# *sequence parallelism*, Korthikanti et al. 2022, arXiv:2205.05198, which splits the norms'
# tokens over the TP ranks: then each rank's norm gradient is a partial sum.)
#
# The sharded model's `forward` returns the rank's vocabulary slice of the logits,
# $(B, T, V_r)$, and the loss is `vocab_parallel_cross_entropy`. MoE layers are not
# sharded this way (chapter 5 splits experts instead), so they are refused.

# %%
#| export lrn_lib.tensor_parallel
class TPRMSNorm(RMSNorm):
    """A replicated RMSNorm whose output enters the tensor-parallel region through f.

    x (..., dim) -> (..., dim); the weight (dim,) is the same on every rank, and so is its gradient.
    """

    def __init__(self, norm: RMSNorm, group: "dist.ProcessGroup | None" = None):
        if not isinstance(norm, RMSNorm):
            raise TypeError(f"norm must be an lrn_lib.llama.RMSNorm, got {type(norm).__name__}")
        check_group(group)
        super().__init__(norm.weight.numel(), norm.eps)
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> normalized (..., dim), then f (7.4)."""
        return copy_to_tp(super().forward(x), self.group)


def check_tp_config(cfg: LlamaConfig, tp: int) -> None:
    """Raise ValueError unless a model of shape cfg splits over tp ranks: heads, KV heads, vocabulary, FFN."""
    check_config(cfg)
    validate.integer(tp, "tp", low=1)
    if cfg.n_heads % tp:
        raise ValueError(f"n_heads={cfg.n_heads} is not divisible by tp={tp}")
    if cfg.n_kv_heads % tp:
        raise ValueError(f"n_kv_heads={cfg.n_kv_heads} is not divisible by tp={tp}")
    if cfg.n_experts:
        raise ValueError("MoE feed-forward layers are split by expert parallelism (chapter 5), not by TP here")
    if min(cfg.vocab_size, cfg.ffn_dim) < tp:
        raise ValueError(f"vocab_size={cfg.vocab_size} and ffn_dim={cfg.ffn_dim} must be at least tp={tp}")


def _check_identical(model: nn.Module, group: "dist.ProcessGroup | None") -> None:
    """Raise ValueError on every rank unless all ranks of group hold the same parameters (by fingerprint)."""
    fingerprint = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                               for p in model.parameters()]).flatten()
    low = _all_reduce_copy(fingerprint, group, dist.ReduceOp.MIN)
    high = _all_reduce_copy(fingerprint, group, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("the ranks of the TP group hold different weights: build the full model from one seed everywhere")


def tensor_parallel_llama(model: Llama, group: "dist.ProcessGroup | None" = None) -> Llama:
    """A copy of `model` holding this rank's shards over group; model must be identical on every rank.

    wq, wk, wv, w1, w3 and the output head become column-parallel, wo and w2 row-parallel,
    the embedding vocabulary-parallel, the norms TPRMSNorm (replicated). forward(tokens (B, T))
    returns this rank's logits (B, T, V_r), columns shard_bounds(V, rank, t): take the loss with
    vocab_parallel_cross_entropy. The model's cfg keeps the full shapes, so it runs without a
    KVCache (a cache built from cfg would hold every KV head, not this rank's).
    """
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an lrn_lib.llama.Llama, got {type(model).__name__}")
    check_group(group)
    tp = dist.get_world_size(group)
    check_tp_config(model.cfg, tp)
    _check_identical(model, group)
    sharded = copy.deepcopy(model)
    sharded.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group)
    for block in sharded.layers:
        attention, ffn = block.attention, block.feed_forward
        block.attention_norm = TPRMSNorm(block.attention_norm, group)
        attention.wq, attention.wk, attention.wv = (ColumnParallelLinear(linear, group, copy_input=False)
                                                    for linear in (attention.wq, attention.wk, attention.wv))
        attention.wo = RowParallelLinear(attention.wo, group)
        attention.n_heads, attention.n_kv_heads = attention.n_heads // tp, attention.n_kv_heads // tp
        block.ffn_norm = TPRMSNorm(block.ffn_norm, group)
        ffn.w1, ffn.w3 = (ColumnParallelLinear(linear, group, copy_input=False) for linear in (ffn.w1, ffn.w3))
        ffn.w2 = RowParallelLinear(ffn.w2, group)
    sharded.norm = TPRMSNorm(sharded.norm, group)
    sharded.output = ColumnParallelLinear(sharded.output, group, copy_input=False)
    return sharded


def gradient_errors(tp_model: nn.Module, full_model: nn.Module) -> dict[str, float]:
    """max |gradient of each tp_model parameter - the matching slice of full_model's gradient|, by name."""
    for arg, model in (("tp_model", tp_model), ("full_model", full_model)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    errors = {}
    for module_name, module in tp_model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            try:
                full = full_model.get_parameter(full_name).grad
            except AttributeError:
                raise ValueError(f"full_model has no parameter {full_name!r} of tp_model") from None
            if p.grad is None or full is None:
                raise ValueError(f"{full_name} has no gradient in tp_model or full_model: run backward on both first")
            if hasattr(module, "full_slice"):
                full = module.full_slice(full, name)
            errors[full_name] = (p.grad - full).abs().max().item()
    return errors


# %% [markdown]
# ### Checking the sharded model against the single-process step
#
# The worker below runs on every rank: it builds the full model and a batch from one seed,
# takes the single-process loss and gradients, shards the model over its TP group, takes
# the tensor-parallel loss and gradients, and returns the largest differences, the shapes
# of its parameters, and every all-reduce it issued (counted by wrapping
# `torch.distributed.all_reduce` while the TP step runs). With `tp` smaller than the world
# it builds a `Mesh` (section 7.1) and uses its TP groups, so several TP groups run side by
# side, as they will inside the 4D mesh.

# %%
#| export lrn_lib.tensor_parallel_checks
def tp_llama_check(rank: int, world: int, cfg: LlamaConfig, tp: int | None = None, seed: int = 0,
                   batch: int = 2, seq: int = 12) -> dict:
    """spawn worker: one float64 training step of tensor_parallel_llama against the full Llama.

    tp (default world) ranks per TP group; the world is split into world // tp groups by
    Mesh(MeshShape(tp=tp, dp=world // tp)). Returns {'loss', 'logits', 'grad'}: the largest
    |TP - single-process| of the loss, this rank's logit columns and any parameter gradient
    (sharded gradients against the matching slices); 'grads' per parameter name; 'shapes':
    name -> this rank's parameter shape; 'forward' and 'backward': the sizes (numbers of
    elements) of the all-reduces the TP step issued.
    """
    check_rank(rank, world)
    tp = world if tp is None else validate.integer(tp, "tp", low=1)
    if world % tp:
        raise ValueError(f"tp={tp} does not divide world={world}")
    check_tp_config(cfg, tp)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    group = Mesh(MeshShape(tp=tp, dp=world // tp)).group["tp"] if tp < world else None
    torch.manual_seed(seed)
    full = Llama(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    sharded = tensor_parallel_llama(full, group)
    logits = full(inputs)
    loss = lm_loss(logits, targets)
    loss.backward()

    sizes: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        local_logits = sharded(inputs)
        tp_loss = vocab_parallel_cross_entropy(local_logits, targets, cfg.vocab_size, group)
        forward = list(sizes)
        tp_loss.backward()
        backward = sizes[len(forward):]
    finally:
        dist.all_reduce = real_all_reduce
    start, stop = shard_bounds(cfg.vocab_size, dist.get_rank(group), tp)
    grads = gradient_errors(sharded, full)
    return {"loss": abs(tp_loss.item() - loss.item()),
            "logits": (local_logits - logits[..., start:stop]).abs().max().item(),
            "grad": max(grads.values()), "grads": grads,
            "shapes": {name: tuple(p.shape) for name, p in sharded.named_parameters()},
            "forward": forward, "backward": backward}


def dtensor_tp_check(rank: int, world: int, cfg: LlamaConfig, seed: int = 0, batch: int = 2, seq: int = 12) -> dict:
    """spawn worker: tensor_parallel_llama against PyTorch's own TP (DTensor) on the same float64 step.

    PyTorch's model: the full Llama parallelized by parallelize_module on a 1-D CPU
    DeviceMesh with ColwiseParallel (wq, wk, wv, w1, w3, output, its logits gathered) and
    RowwiseParallel (wo, w2, the embedding). Returns {'loss', 'grad'}: the largest
    |ours - PyTorch's| of the loss and of any parameter gradient (this rank's shards).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_rank(rank, world)
    check_tp_config(cfg, world)
    validate.integer(batch, "batch", low=1)
    validate.integer(seq, "seq", low=1)
    torch.manual_seed(seed)
    full = Llama(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ours = tensor_parallel_llama(full)
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())}
    for i in range(cfg.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    theirs = parallelize_module(full, init_device_mesh("cpu", (world,)), plan)
    their_loss = lm_loss(theirs(inputs), targets)
    their_loss.backward()
    our_loss = vocab_parallel_cross_entropy(ours(inputs), targets, cfg.vocab_size)
    our_loss.backward()
    grad = 0.0
    for name, p in ours.named_parameters():
        param = theirs.get_parameter(name)
        reference = param.grad
        if isinstance(param, DTensor):          # a gradient may come back in another layout (the embedding's: replicated)
            reference = reference.redistribute(param.device_mesh, param.placements).to_local()
        grad = max(grad, (p.grad - reference).abs().max().item())
    return {"loss": abs(our_loss.item() - their_loss.item()), "grad": grad}


def build_tp_llama(rank: int, world: int, cfg: LlamaConfig, seeds: list[int]) -> str:
    """spawn worker: build Llama(cfg) from seeds[rank] and shard it over the world; 'ok' or the ValueError's message."""
    check_rank(rank, world)
    check_config(cfg)
    if len(validate.nonempty(seeds, "seeds")) != world:
        raise ValueError(f"seeds must hold one seed per rank, {world}, got {len(seeds)}")
    torch.manual_seed(seeds[rank])
    try:
        tensor_parallel_llama(Llama(cfg))
    except ValueError as error:
        return str(error)
    return "ok"


# %%
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from lrn_lib.llama import LLAMA3_405B, Llama, tiny_config
from lrn_lib.tensor_parallel import shard_bounds
from lrn_lib.tensor_parallel_checks import build_tp_llama, dtensor_tp_check, tp_llama_check

tp_cfg = tiny_config()
tp_results = spawn(tp_llama_check, 2, tp_cfg)
print(f"tiny Llama: dim={tp_cfg.dim}, {tp_cfg.n_heads} query heads, {tp_cfg.n_kv_heads} KV heads, "
      f"ffn_dim={tp_cfg.ffn_dim}, vocab={tp_cfg.vocab_size}; TP over 2 gloo processes, float64")
print(f"{'parameter (an nn.Linear weight is (out, in))':47s} {'full':>10s} {'rank 0':>10s} {'rank 1':>10s}")
for name, p in Llama(tp_cfg).named_parameters():
    if not name.startswith("layers.") or name.startswith("layers.0."):
        shards = [str(r["shapes"][name]) for r in tp_results]
        print(f"{name:47s} {str(tuple(p.shape)):>10s} {shards[0]:>10s} {shards[1]:>10s}")

# %% [markdown]
# Each rank holds 2 of the 4 query heads and 1 of the 2 KV heads, half of the SwiGLU
# hidden units in all three FFN matrices, half of the vocabulary, and full copies of the
# norms. The figure draws each matrix as the paper's $A = W^\top$ (input features down,
# output features across) and colours what each rank holds: column-parallel matrices are
# cut along the outputs, row-parallel ones along the inputs, and each row-parallel cut
# lines up with the column-parallel cut that feeds it (the heads for $W_o$, the hidden
# units for $W_2$).

# %%
hd = tp_cfg.head_dim
matrices = [("wq", tp_cfg.dim, tp_cfg.dim, "col", hd, "q"), ("wk", tp_cfg.dim, tp_cfg.n_kv_heads * hd, "col", hd, "kv"),
            ("wv", tp_cfg.dim, tp_cfg.n_kv_heads * hd, "col", hd, "kv"), ("wo", tp_cfg.dim, tp_cfg.dim, "row", hd, "q"),
            ("w1 gate", tp_cfg.dim, tp_cfg.ffn_dim, "col", 1, "unit"), ("w3 up", tp_cfg.dim, tp_cfg.ffn_dim, "col", 1, "unit"),
            ("w2 down", tp_cfg.ffn_dim, tp_cfg.dim, "row", 1, "unit")]
colors = ["tab:blue", "tab:orange"]
fig, ax = plt.subplots(figsize=(11, 3.6))
x0 = 0
for label, d_in, d_out, kind, unit, what in matrices:
    size = d_out if kind == "col" else d_in
    for r in range(2):
        a, b = shard_bounds(size, r, 2)
        xy, w, h = ((x0 + a, 0), b - a, d_in) if kind == "col" else ((x0, d_in - b), d_out, b - a)
        ax.add_patch(Rectangle(xy, w, h, facecolor=colors[r], edgecolor="black", alpha=0.75))
        span = f"{what} {a // unit}-{b // unit - 1}" if b // unit - a // unit > 1 else f"{what} {a // unit}"
        ax.text(xy[0] + w / 2, xy[1] + h / 2, span, ha="center", va="center", fontsize=7,
                rotation=90 if kind == "col" else 0)
    ax.text(x0 + d_out / 2, -6, f"{label}\n{'column' if kind == 'col' else 'row'}", ha="center", va="top", fontsize=8)
    x0 += d_out + 30
ax.set_xlim(-10, x0)
ax.set_ylim(-40, 170)
ax.set_aspect("equal")
ax.axis("off")
ax.legend([Rectangle((0, 0), 1, 1, color=c, alpha=0.75) for c in colors], ["rank 0", "rank 1"], loc="upper left")
ax.set_title("One block's matrices A = W^T (d_in down, d_out across) split over 2 TP ranks:\n"
             "q / kv = query / KV heads, unit = SwiGLU hidden units", fontsize=10)
plt.show()

# %% [markdown]
# Now the claims. One step of the tensor-parallel model gives the single-process loss, each
# rank's logit columns equal the matching columns of the full logits, and every gradient,
# sharded or replicated, equals the matching slice of the single-process gradient, all to
# float64 rounding. The all-reduces are exactly those predicted: forward, one for the
# embedding, two per layer of $B \cdot T \cdot d$ numbers, and two for the loss ($B T$
# maxima, then $2 B T$ sums); backward, two per layer and one for the final norm's $f$.

# %%
tokens_per_step = 2 * 12                              # tp_llama_check's default batch 2, sequence 12
activation = tokens_per_step * tp_cfg.dim
print("loss equal on every rank (|TP - single| < 1e-12):", all(r["loss"] < 1e-12 for r in tp_results))
print("each rank's logit columns equal the full logits' (< 1e-12):", all(r["logits"] < 1e-12 for r in tp_results))
print("every gradient equals its slice of the single-process gradient (< 1e-12):",
      all(r["grad"] < 1e-12 for r in tp_results))
print("norm gradients, replicated and not all-reduced, equal the full ones (< 1e-12):",
      all(e < 1e-12 for r in tp_results for name, e in r["grads"].items() if "norm" in name))
print(f"forward all-reduces: {len(tp_results[0]['forward'])} = 1 + 2 x {tp_cfg.n_layers} layers + 2; sizes as predicted:",
      tp_results[0]["forward"] == [activation] * (1 + 2 * tp_cfg.n_layers) + [tokens_per_step, 2 * tokens_per_step])
print(f"backward all-reduces: {len(tp_results[0]['backward'])} = 2 x {tp_cfg.n_layers} layers + 1, each of B*T*dim:",
      tp_results[0]["backward"] == [activation] * (2 * tp_cfg.n_layers + 1))

# %% [markdown]
# Two TP groups of 2 inside a world of 4 (a `Mesh` with $t = 2$, $d_p = 2$) behave the same
# way, with a vocabulary of 255 that does not divide evenly (rank 0 of each group owns 128
# tokens, rank 1 owns 127). Ranks that were seeded differently are refused before they
# could train inconsistent shards. And PyTorch's own tensor parallelism, DTensor's
# `parallelize_module` with `ColwiseParallel` and `RowwiseParallel` on a CPU `DeviceMesh`
# (section 10.1 uses it at scale), computes the same loss and gradients as ours.

# %%
grouped = spawn(tp_llama_check, 4, tiny_config(vocab_size=255), 2)
print("world 4 as 2 TP groups of 2, vocab 255: loss, logits and every gradient equal (< 1e-12):",
      all(r["loss"] < 1e-12 and r["grad"] < 1e-12 and r["logits"] < 1e-12 for r in grouped))
print("vocabulary rows held by the ranks of a group:", [r["shapes"]["tok_embeddings.weight"][0] for r in grouped[:2]])
print("seeds 0 and 1 on the two ranks:", spawn(build_tp_llama, 2, tp_cfg, [0, 1])[0])
versus_dtensor = spawn(dtensor_tp_check, 2, tp_cfg)
print("ours vs PyTorch's DTensor TP: loss and every gradient equal (< 1e-12):",
      all(r["loss"] < 1e-12 and r["grad"] < 1e-12 for r in versus_dtensor))

# %% [markdown]
# What does this mean for Llama 3 405B, whose TP degree is 8? Each GPU holds 16 of the
# 128 query heads, one of the 8 KV heads and 1/8 of the SwiGLU hidden units; per layer it
# stores one eighth of the matrices, and it all-reduces a $(B, T, 16384)$ activation four
# times per layer and micro-batch (two forward, two backward).

# %%
big, tp_big = LLAMA3_405B, 8
q_rows, kv_rows, ffn_rows = (big.n_heads * big.head_dim // tp_big, big.n_kv_heads * big.head_dim // tp_big,
                             big.ffn_dim // tp_big)
per_gpu = {"wq": (q_rows, big.dim), "wk": (kv_rows, big.dim), "wv": (kv_rows, big.dim), "wo": (big.dim, q_rows),
           "w1": (ffn_rows, big.dim), "w3": (ffn_rows, big.dim), "w2": (big.dim, ffn_rows)}
for name, shape in per_gpu.items():
    print(f"{name}: {shape} per GPU")
layer_params = sum(a * b for a, b in per_gpu.values())
print(f"one layer's matrices: {layer_params / 1e6:.0f}M parameters per GPU, {2 * layer_params / 2**30:.2f} GiB in bf16 "
      f"(the whole layer: {tp_big * layer_params / 1e9:.2f}B parameters)")
seq_405b = 8192
print(f"one all-reduce of a (1, {seq_405b}, {big.dim}) bf16 activation: {seq_405b * big.dim * 2 / 2**20:.0f} MiB; "
      f"4 per layer and micro-batch, {4 * big.n_layers} for the {big.n_layers} layers")

# %% [markdown]
# ## Summary
#
# * Every parallel scheme runs one program in $W$ processes joined in a process group; the
#   4D mesh orders the ranks $[TP, CP, PP, DP]$, TP varying fastest, so that the chattiest
#   dimension stays inside a server.
# * Tensor parallelism splits the weight matrices: a column-parallel layer followed by a
#   row-parallel one needs one all-reduce, so a Llama block costs two all-reduces in the
#   forward pass; the embedding and the cross-entropy split by vocabulary and combine only
#   a few numbers per token.
# * The sharded Llama gives the single-process loss and gradients in float64, and so does
#   the same split through PyTorch's DTensor.
#
# Not measured here: runs on several GPUs (the checks run as CPU processes joined by gloo).

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *implement* a function with the given signature and check it with
# `check("07.name", your_function)` from `lrn_lib.exercises` (randomized tests you do not
# see, against the library's float64 references; one line of verdict), *measure* with this
# chapter's code. `print("\n".join(exercises("07")))` lists the checkers. Worked solutions:
# `chapters/solutions/07_tensor_parallel_solutions.ipynb`.
#
# ```python
# from lrn_lib.exercises import check, exercises
# ```
#
# **Exercise 1 (implement): cross-entropy from vocabulary shards.** Write
# `sharded_cross_entropy(shards: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor`
# that returns the per-token losses $(N,)$ of (7.8). `shards[r]` $(N, V_r)$ holds the logits
# of rank $r$'s vocabulary slice, the slices consecutive from id 0 and of unequal sizes;
# `targets` $(N,)$ are global ids. Compute from each shard only what section 7.2 sends (per
# token: its maximum, then its sum of exponentials and its target logit, 0 when the target
# is not in the slice) and combine those numbers as the all-reduces would; never
# concatenate the shards. Logits can be large (the checker uses values near $\pm 10^3$).
# Run `check("07.sharded_cross_entropy", sharded_cross_entropy)`.
