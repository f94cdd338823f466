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
# # Chapter 10. PyTorch's engine and the 405B accounting
#
# Chapters 7 to 9 built every parallel dimension of Llama 3's training out of raw collectives.
# This chapter does two things with them. Section 10.1 runs chapter 6's model through PyTorch's
# own engine (DeviceMesh, DTensor, FSDP2, pipelining, context parallel) and `torchrun`, held to
# the same float64 checks. Section 10.2 leaves the laptop: with arithmetic on the published
# layouts it works out where the 405B model's bytes and messages go on 16K GPUs.

# %%
import torch

from lrn_lib import config

# %%
# NBVAL_IGNORE_OUTPUT
config.start_chapter(threads=1)  # small matrices, and the spawned processes share the cores

# %% [markdown]
# ## 10.1 The production path: PyTorch's own engine and `torchrun`
#
# Sections 7.2 to 9.3 built every parallel dimension out of raw collectives, so that each
# message could be seen and counted. Production trainers do not write those messages by hand.
# PyTorch ships the same four dimensions as an engine: a **device mesh** that names the
# dimensions of the grid of ranks, **DTensor**, a tensor that knows how it is laid out over
# that mesh, `parallelize_module` for tensor parallelism, `fully_shard` (FSDP2) for sharded
# data parallelism, `torch.distributed.pipelining` for pipeline parallelism, and
# `context_parallel` for the sequence dimension. torchtitan (Liang et al. 2024,
# arXiv:2410.06511), PyTorch's reference trainer for Llama 3, composes exactly these pieces.
#
# This section trains chapter 6's `Llama` with them. The module `lrn_lib.train` is a
# command-line program: `python -m lrn_lib.train` on one process, or
# `torchrun --nproc-per-node 8 -m lrn_lib.train --tp 2 --cp 2 --pp 2` on eight GPUs. The same
# code runs on CPU processes joined by gloo and on GPUs joined by NCCL. Since everything below
# is somebody else's machinery, we hold it to the standard of the earlier sections: in
# float64, the loss curve and every gradient under TP, FSDP, PP and a 2-D mesh must equal the
# single-process run.
#
# ### The mesh and DTensor
#
# `init_device_mesh("cuda", (dp, pp, cp, tp), mesh_dim_names=("dp", "pp", "cp", "tp"))` lays the
# ranks out as `arange(W).view(dp, pp, cp, tp)`, the layout of section 7.1: TP varies fastest,
# so the ranks of a TP group sit in one server. Indexing the mesh by name gives a sub-mesh,
# `mesh["tp"]` (this rank's TP group, with its process group), and the engine's functions take
# such sub-meshes instead of raw process groups.
#
# A DTensor is a local tensor plus a mesh plus one **placement** per mesh dimension, which says
# how the global tensor relates to the local pieces along that dimension:
#
# * `Shard(d)`: the global tensor is cut along its dimension `d`; each rank holds one piece.
# * `Replicate()`: every rank holds the whole tensor.
# * `Partial()`: every rank holds a summand; the global tensor is their sum, not yet computed.
#
# Changing placements is communication, and each change is one of the collectives of
# section 7.1: `Partial` to `Replicate` is an all-reduce, `Shard` to `Replicate` an all-gather,
# `Partial` to `Shard` a reduce-scatter, `Replicate` to `Shard` a local slice with no message.
# Operators on DTensors propagate placements: a matrix product of an input `Replicate` and a
# weight `Shard(0)` gives an output `Shard(-1)`; one of an input `Shard(-1)` and a weight
# `Shard(1)` gives an output `Partial`. Tensor parallelism, FSDP and context parallelism are
# all choices of placements plus the redistributions between them.

# %%
#| export lrn_lib.train
import argparse
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lrn_lib import corpus, validate
from lrn_lib.llama import Llama, LlamaConfig, lm_loss, random_windows, sdpa_attention, tiny_config
from lrn_lib.mesh import check_rank
from lrn_lib.spawn import free_port, spawn
from lrn_lib.pipeline_parallel import LlamaStage, partition_layers

try:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
except ImportError as missing:
    raise ImportError(f"lrn_lib.train needs PyTorch's distributed engine (DeviceMesh, DTensor, FSDP2, pipelining; "
                      f"torch >= 2.6), but this torch {torch.__version__} lacks a piece: {missing}") from missing


MESH_DIM_NAMES = ("dp", "pp", "cp", "tp")


def build_mesh(args: argparse.Namespace) -> DeviceMesh:
    """The job's DeviceMesh, shape (dp, pp, cp, tp): TP varies fastest, as in Llama 3's Figure 5 and
    lrn_lib.mesh.MeshShape. Needs an initialized process group of dp * pp * cp * tp ranks."""
    check_args(args)
    shape = (args.dp, args.pp, args.cp, args.tp)
    if dist.get_world_size() != math.prod(shape):
        raise ValueError(f"--dp {args.dp} --pp {args.pp} --cp {args.cp} --tp {args.tp} need {math.prod(shape)} "
                         f"processes, but the job has {dist.get_world_size()}")
    return init_device_mesh(args.device, shape, mesh_dim_names=MESH_DIM_NAMES)

# %% [markdown]
# ### Data that needs no download
#
# The model reads bytes (vocabulary 256). The corpus is the book's (`lrn_lib.corpus`, a snapshot of
# Python 3.11.7's standard library, the same bytes on every Python): the sources of the `json` and
# `email` packages and the text of pydoc's help topics, about 0.9 MB. Step $s$
# draws its windows from a generator seeded with `(seed, s)`, so every rank computes the same
# global batch of `--batch` sequences without a message; a rank keeps the rows of its dp
# coordinate (rows $d\,B/D$ to $(d+1)\,B/D$ for dp rank $d$ of $D$), so ranks that differ only
# in tp, cp or pp hold the same rows, as those dimensions require.

# %%
#| export lrn_lib.train
def stdlib_corpus() -> torch.Tensor:
    """Training bytes that need no download (lrn_lib.corpus): the sources of the standard library's json
    and email packages, then pydoc's help topics, as an int64 tensor (N,) of values 0..255."""
    data = corpus.python_source(("json", "email")) + corpus.english()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def global_batch(data: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole job's batch of one step: (inputs, targets), each (batch, seq) int64, drawn from data (N,)
    by a generator seeded with (seed, step), so every rank draws the same windows without talking."""
    validate.integer(step, "step", low=0)
    validate.integer(seed, "seed", low=0)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return random_windows(data, batch, seq, generator)

# %% [markdown]
# ### Tensor parallelism: `parallelize_module`
#
# `parallelize_module(module, mesh["tp"], plan)` takes a plan, a dictionary from submodule
# names to **styles**, and turns those submodules' weights into DTensors:
#
# * `ColwiseParallel()` on an `nn.Linear` (weight of shape (out, in)) shards the weight
#   `Shard(0)`, so rank $r$ computes the output features $Y_r = X W_r^\top$ of its rows
#   $W_r$; the input is taken as `Replicate`, the output is left `Shard(-1)` and handed on as a
#   plain local tensor.
# * `RowwiseParallel()` shards the weight `Shard(1)`, takes its input `Shard(-1)` (exactly what
#   a column-parallel layer produced), computes the `Partial` sum
#   $Y = \sum_r X_r W_r^\top$ and all-reduces it to `Replicate`. (10.1)
#
# That is Megatron's column-then-row pairing of section 7.2, one all-reduce per pair: `wq`,
# `wk`, `wv` column-parallel and `wo` row-parallel in attention; `w1`, `w3` column-parallel
# and `w2` row-parallel in SwiGLU. Attention needs no change: it reshapes the projections with
# `view(B, T, -1, head_dim)`, so a rank whose `wq` holds $H/t$ heads' rows (and $H_{kv}/t$ in
# `wk`, `wv`) simply runs attention on its own heads, the GQA groups intact as long as $t$
# divides $H_{kv}$. For the ends we choose: `RowwiseParallel` on the embedding shards the
# table by vocabulary rows (a rank looks up the ids it owns, contributes zeros for the others,
# and the all-reduce completes the lookup); `ColwiseParallel(output_layouts=Replicate())` on
# the output head computes a vocabulary slice of the logits per rank and all-gathers them. At
# a vocabulary of 128,256, torchtitan instead keeps the logits sharded and computes the
# cross-entropy on the shards (`loss_parallel`), which saves the gather; with our 256 bytes the
# gathered logits are simpler. RMSNorm weights stay plain tensors, the same on every TP rank.
#
# The attention itself goes through section 6.1's `sdpa_attention`, PyTorch's
# `F.scaled_dot_product_attention` (SDPA): it is the call that context parallelism intercepts,
# and on GPUs it runs a FlashAttention kernel. It repeats the key/value heads for GQA before
# the call, since the context-parallel path takes plain multi-head inputs. The stage module is section 9.1's `LlamaStage`, whose `positions`
# attribute carries the RoPE positions (under CP a rank holds positions that are not $0..T-1$).

# %%
#| export lrn_lib.train
def tensor_parallel_plan(stage: LlamaStage) -> dict:
    """parallelize_module's plan for one stage: Megatron's column/row pairs in attention and SwiGLU, the
    embedding split by vocabulary rows, the output head by vocabulary columns (logits gathered)."""
    validate.instance(stage, "stage", LlamaStage)
    plan = {}
    if stage.first:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    for name in stage.layers:
        block = f"layers.{name}"                        # column then row parallel, (10.1)
        plan |= {f"{block}.attention.wq": ColwiseParallel(), f"{block}.attention.wk": ColwiseParallel(),
                 f"{block}.attention.wv": ColwiseParallel(), f"{block}.attention.wo": RowwiseParallel(),
                 f"{block}.feed_forward.w1": ColwiseParallel(), f"{block}.feed_forward.w3": ColwiseParallel(),
                 f"{block}.feed_forward.w2": RowwiseParallel()}
    if stage.last:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    return plan

# %% [markdown]
# ### Sharded data parallelism: `fully_shard`
#
# `fully_shard(module, mesh=data_mesh)` is FSDP2, the ZeRO-3 of section 9.2. It replaces each
# parameter of `module` by a DTensor `Shard(0)` over the data-parallel ranks (per parameter,
# not one flat buffer as in FSDP1) and adds hooks: before the module's forward it all-gathers
# the parameters, after it frees them again (`reshard_after_forward=True`), before the
# backward it all-gathers them once more, and after the backward it reduce-scatters the
# gradients, averaged over the $D$ ranks,
#
# $$g^{(r)} = \text{shard } r \text{ of } \frac{1}{D}\sum_{d=1}^{D} g_d, \qquad (10.2)$$
#
# so that AdamW updates only the rank's shard. Calling it on every `TransformerBlock` first
# and on the stage last makes each block one communication group, whose all-gather can be
# prefetched while the previous block computes; the root call collects what is left (the
# embedding, the final norm, the head). The order matters in a second way: TP must come
# first, so that FSDP shards the TP shards. On a 2-D (dp, tp) mesh a `wq` weight then has the
# placements `(dp: _StridedShard(dim=0, sf=2), tp: Shard(dim=0))`: TP rank $t$ owns half of
# the rows, and FSDP cuts that half again, so that from the global tensor's point of view a dp
# rank's rows come in two strided pieces. The demo below prints these layouts.
#
# With a pipeline, a stage runs $m$ forward passes before the first backward. Resharding
# after each forward would repeat the all-gather $2m$ times per step, so with `--pp > 1` we keep
# the weights gathered from the forward to the backward (`reshard_after_forward=False`), the
# trade Llama 3's report describes for its FSDP (section 9.2). With context parallelism the $C$
# ranks of a CP group hold different tokens of the same sequences, so their gradients must be
# averaged too: FSDP then runs over the dp and cp dimensions flattened into one, the CP x DP
# group of section 9.3 (torchtitan does the same).

# %%
#| export lrn_lib.train
def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The 1-D mesh over which gradients are averaged: dp, or cp, or both flattened (as torchtitan does);
    None when there is only one such rank."""
    if not isinstance(mesh, DeviceMesh) or not {"dp", "cp"} <= set(mesh.mesh_dim_names or ()):
        raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
    dp, cp = mesh["dp"].size(), mesh["cp"].size()
    if dp * cp == 1:
        return None
    if cp == 1:
        return mesh["dp"]
    if dp == 1:
        return mesh["cp"]
    if not hasattr(mesh, "_flatten"):
        raise RuntimeError(f"this torch ({torch.__version__}) cannot flatten the (dp, cp) mesh dimensions")
    return mesh["dp", "cp"]._flatten("dp_cp")


def shard_stage(stage: LlamaStage, mesh: DeviceMesh) -> LlamaStage:
    """Apply TP over mesh["tp"], then FSDP2 over the data ranks (dp, times cp when cp > 1): per block, then
    the stage as root. Returns the same module, its parameters now DTensors."""
    validate.instance(stage, "stage", LlamaStage)
    if not isinstance(mesh, DeviceMesh) or tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
        raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
    if mesh["tp"].size() > 1:
        parallelize_module(stage, mesh["tp"], tensor_parallel_plan(stage))
    data_mesh = data_parallel_mesh(mesh)
    if data_mesh is not None:
        keep_gathered = mesh["pp"].size() > 1          # pipelining runs a stage once per micro-batch
        for block in stage.layers.values():           # gradients reduce-scattered as in (10.2)
            fully_shard(block, mesh=data_mesh, reshard_after_forward=not keep_gathered)
        fully_shard(stage, mesh=data_mesh, reshard_after_forward=not keep_gathered)
    return stage

# %% [markdown]
# ### Pipeline parallelism: `torch.distributed.pipelining`, and its loss scaling
#
# Each pipeline rank builds its stage by keeping only its own blocks of the full model (the
# first stage also the embedding, the last the norm and the head), as torchtitan does by
# deleting the other layers. `PipelineStage(stage, k, p, device, group=mesh["pp"].get_group())`
# wraps it for the messages between neighbours (activation shapes are exchanged once, at the
# first step), and `ScheduleGPipe` or `Schedule1F1B` (section 9.1's two schedules) drives it:
# `schedule.step(inputs, target=targets, losses=losses)` on the first stage,
# `schedule.step(target=targets, losses=losses)` on the others. The schedule splits the batch
# into $m$ micro-batches along dimension 0.
#
# The scaling deserves care, because a factor of $m$ is easy to lose. On the last stage the
# schedule calls `loss_fn(output_j, target_j)`, here `lm_loss`, the mean over the micro-batch's
# tokens, $\ell_j$; it runs the backward pass of each $\ell_j$ as it is, accumulating
# $\sum_j \nabla\ell_j$, and only after the last backward (and FSDP's reduce-scatter) divides
# every gradient of the stage by $m$ (the default `scale_grads=True`). With micro-batches of
# equal size,
#
# $$\frac{1}{m}\sum_{j=1}^{m}\nabla\ell_j = \nabla\Big(\frac{1}{m}\sum_{j=1}^{m}\ell_j\Big) = \nabla L_{\text{batch}}, \qquad (10.3)$$
#
# the gradient of the single-process loss over the whole batch. The `losses` list receives the
# unscaled $\ell_j$, so the step's loss is their mean. A `loss_fn` that summed over tokens
# would need `scale_grads=False`; dividing `lm_loss` by $m$ by hand would divide twice. The
# gradient checks below, at $m = 2$ and $m = 4$, pin this down.
#
# ### Context parallelism: `context_parallel`
#
# Inside `with context_parallel(mesh["cp"], buffers=[inputs, targets, positions],
# buffer_seq_dims=[1, 1, 0])` two things hold. The buffers are replaced, in place, by this
# rank's part of the sequence, with the same head-and-tail balancing as chapter 8 (the
# sequence is cut into $2C$ chunks and rank $c$ keeps chunks $c$ and $2C-1-c$, so every rank
# gets the same share of the causal work); that is why the positions go in too, so that RoPE
# rotates each token by its true position. And `F.scaled_dot_product_attention` is replaced by
# a version that wraps $q, k, v$ as DTensors sharded on the sequence and runs ring attention:
# by default it all-gathers the keys and values, the variant Llama 3 chose (chapter 8);
# `set_rotate_method("alltoall")` passes them around the ring instead. The replacement
# intercepts only the CUDA attention kernels (flash, memory-efficient, cuDNN), so there is no
# CPU path: with `--cp > 1` on a CPU, `lrn_lib.train` refuses and points to chapter 8's
# from-scratch ring attention, which runs on gloo. The job's loss averages the last stage's
# losses over the $D \cdot C$ ranks that hold different tokens (one TP rank each):
#
# $$L = \frac{1}{D\,C}\sum_{d=1}^{D}\sum_{c=1}^{C} \ell_{d,c}. \qquad (10.4)$$
#
# In bfloat16 the weights and AdamW's moments stay in float32 and the forward runs under
# `torch.autocast`. (FSDP2 can instead gather the weights in bfloat16 with
# `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`, halving the
# all-gather bytes; autocast keeps one mechanism for every layout.)

# %%
#| export lrn_lib.train
def context_parallel_api() -> Callable:
    """torch.distributed.tensor.experimental.context_parallel, or a clear error where this torch lacks it."""
    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as missing:
        raise RuntimeError(f"this torch ({torch.__version__}) has no context_parallel; use --cp 1") from missing
    return context_parallel


class Trainer:
    """One rank's part of the training job: its pipeline stage of the Llama, sharded by TP and FSDP2, its
    AdamW, and (with pp > 1) its pipeline schedule. Every rank builds the full model from --seed first,
    so all parallel layouts start from the single-process weights."""

    def __init__(self, args: argparse.Namespace, mesh: DeviceMesh):
        check_args(args)
        if not isinstance(mesh, DeviceMesh) or tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES:
            raise TypeError(f"mesh must be build_mesh's DeviceMesh with dimensions {MESH_DIM_NAMES}, got {mesh!r}")
        self.args, self.mesh = args, mesh
        self.coord = {name: mesh[name].get_local_rank() for name in MESH_DIM_NAMES}
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.dtype = DTYPES[args.dtype]
        self.param_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        torch.manual_seed(args.seed)
        model = Llama(model_config(args)).to(self.param_dtype)
        k = self.coord["pp"]
        stage = LlamaStage(model, partition_layers(args.layers, args.pp)[k], first=k == 0, last=k == args.pp - 1)
        stage = stage.to(self.device)
        for block in stage.layers.values():
            block.attention.attend = sdpa_attention
        self.stage = shard_stage(stage, mesh)
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=args.lr, foreach=False)
        self.schedule = None
        if args.pp > 1:
            pipe = PipelineStage(self.stage, self.coord["pp"], args.pp, self.device, group=mesh["pp"].get_group())
            kind = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
            self.schedule = kind(pipe, n_microbatches=args.microbatches, loss_fn=lm_loss)
        self.data = stdlib_corpus()

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the step's global batch: (inputs, targets), each (batch / dp, seq); ranks with
        the same dp coordinate get the same rows."""
        inputs, targets = global_batch(self.data, step, self.args.batch, self.args.seq, self.args.seed)
        share = self.args.batch // self.args.dp
        rows = slice(self.coord["dp"] * share, (self.coord["dp"] + 1) * share)
        return inputs[rows].to(self.device), targets[rows].to(self.device)

    def forward_backward(self, step: int) -> float:
        """Run the forward and backward passes of one step; the gradients are left in the parameters.
        Returns the step's loss, the mean over all batch * seq tokens of the job (on every rank)."""
        inputs, targets = self.local_batch(step)
        positions = torch.arange(self.args.seq, device=self.device)
        loss = None
        with ExitStack() as scope:
            if self.args.cp > 1:                       # shards the three buffers along the sequence, in place
                scope.enter_context(context_parallel_api()(
                    self.mesh["cp"], buffers=[inputs, targets, positions], buffer_seq_dims=[1, 1, 0],
                    no_restore_buffers={inputs, targets, positions}))
            if self.dtype != self.param_dtype:
                scope.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            self.stage.positions = positions
            if self.schedule is None:
                loss = lm_loss(self.stage(inputs), targets)
                loss.backward()
            else:
                losses: list[torch.Tensor] = []
                if self.stage.first:
                    self.schedule.step(inputs, target=targets, losses=losses)
                else:
                    self.schedule.step(target=targets, losses=losses)
                if self.stage.last:                    # the unscaled l_j; the grads were divided by m, (10.3)
                    loss = torch.stack(losses).mean()
        return self.job_loss(loss)

    def job_loss(self, loss: torch.Tensor | None) -> float:
        """Average the last stage's per-rank losses over dp and cp (one TP rank each) into the job's loss."""
        share = torch.zeros((), dtype=torch.float64, device=self.device)
        if loss is not None and self.coord["tp"] == 0:
            share += loss.detach().double() / (self.args.dp * self.args.cp)     # (10.4)
        dist.all_reduce(share)
        return share.item()

    def step(self, step: int) -> float:
        """One optimizer step on batch number `step`; returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(step)
        self.optimizer.step()
        return loss

    def layout(self, name: str) -> str:
        """How parameter `name` lives on this rank: its mesh dimensions, placements, local and global shape."""
        params = dict(self.stage.named_parameters())
        if name not in params:
            raise ValueError(f"name {name!r} is not a parameter of this rank's stage")
        p = params[name]
        if not isinstance(p, DTensor):
            return f"plain tensor {tuple(p.shape)}, whole on this rank"
        dims = p.device_mesh.mesh_dim_names
        placements = ", ".join(f"{dim}: {placement!r}" for dim, placement in zip(dims, p.placements))
        return f"{placements}; local {tuple(p.to_local().shape)} of {tuple(p.shape)}"

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every gradient of this rank's stage, gathered to full size (a collective over the stage's dp, cp
        and tp ranks), on the CPU, keyed by the Llama's parameter name."""
        grads = {}
        for name, p in self.stage.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = g.detach().cpu()
        return grads

# %% [markdown]
# ### The check against the single-process run
#
# `reference_run` trains the plain `Llama` (chapter 4's attention, not SDPA) on the whole
# global batch in one process; `check_worker` trains through the engine on each spawned rank,
# gathers every gradient of the first step to full size (`DTensor.full_tensor()`), and
# compares both.

# %%
#| export lrn_lib.train
def reference_run(args: argparse.Namespace) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process run the parallel ones must reproduce: a plain Llama (chapter 4's attention),
    lm_loss over the whole global batch and AdamW, on the CPU. Returns the per-step losses and the
    gradients of step 0, keyed by parameter name."""
    check_args(args)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    torch.manual_seed(args.seed)
    model = Llama(model_config(args)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=False)
    data, losses, first_grads = stdlib_corpus(), [], {}
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        inputs, targets = global_batch(data, step, args.batch, args.seq, args.seed)
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        if step == 0:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return losses, first_grads


def check_worker(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """lrn_lib.spawn.spawn worker: for each command line in runs (each for `world` ranks), train with the
    engine and compare with reference_run, which every rank computes itself.

    Returns one dict per run: {'losses': the job's per-step losses, 'loss_err': max |loss - reference|,
    'grad_err': max |gradient - reference| over this rank's parameters at step 0, 'n_params': their count,
    'groups': {dim: ranks of this rank's group along dim}, 'layout': {parameter name: Trainer.layout}}."""
    check_rank(rank, world)
    for argv in validate.nonempty(runs, "runs"):
        _check_argv(argv, "runs")
    results = []
    for argv in runs:
        args = parse_args(argv)
        trainer = Trainer(args, build_mesh(args))
        reference_losses, reference_grads = reference_run(args)
        trainer.optimizer.zero_grad(set_to_none=True)
        losses = [trainer.forward_backward(0)]
        grads = trainer.full_gradients()
        grad_err = max((grads[name] - reference_grads[name]).abs().max().item() for name in grads)
        trainer.optimizer.step()
        losses += [trainer.step(step) for step in range(1, args.steps)]
        loss_err = max(abs(a - b) for a, b in zip(losses, reference_losses))
        results.append({"losses": losses, "loss_err": loss_err, "grad_err": grad_err, "n_params": len(grads),
                        "groups": {dim: trainer.mesh[dim].mesh.tolist() for dim in MESH_DIM_NAMES},
                        "layout": {name: trainer.layout(name) for name in grads}})
    return results

# %% [markdown]
# ### The command line and `torchrun`
#
# `torchrun --nproc-per-node W -m lrn_lib.train ...` starts $W$ processes and gives each the
# environment variables `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`;
# `dist.init_process_group(backend)` reads them. On GPUs each process first selects its GPU
# (`torch.cuda.set_device(LOCAL_RANK)`) and the backend is NCCL; on CPUs it is gloo, and
# torchrun sets `OMP_NUM_THREADS=1` (where it is unset) so that the processes do not fight over
# the cores. Started
# without torchrun, the program makes its own world: one process, or on the CPU as many
# processes as the mesh needs, through section 7.1's `spawn`. One trap: torchrun parses the
# whole command line with Python's `argparse`, which accepts unambiguous abbreviations of its
# own flags, and it rejects a script flag such as `--log`, which could abbreviate its `--log-dir`
# (or its `--logs-specs`). Hence `--log-file`.

# %%
#| export lrn_lib.train
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m lrn_lib.train`, with their defaults and help texts."""
    p = argparse.ArgumentParser(prog="python -m lrn_lib.train",
                                description="Train a small Llama 3 on the standard library's bytes with "
                                            "PyTorch's TP (DTensor), CP, PP (pipelining) and FSDP2.")
    for flag, default, text in (("--tp", 1, "tensor-parallel degree"), ("--cp", 1, "context-parallel degree (CUDA)"),
                                ("--pp", 1, "pipeline stages"), ("--dp", 1, "data-parallel (FSDP2) degree"),
                                ("--microbatches", 0, "micro-batches per step with --pp > 1 (default: 2 * pp)"),
                                ("--steps", 10, "optimizer steps"), ("--seq", 128, "tokens per sequence"),
                                ("--batch", 8, "sequences per step, whole job"), ("--dim", 128, "model width"),
                                ("--layers", 4, "transformer blocks"), ("--heads", 4, "query heads"),
                                ("--kv-heads", 2, "key/value heads (GQA)"),
                                ("--ffn-dim", 0, "SwiGLU width (default ~8/3 dim)"),
                                ("--seed", 0, "seed of the weights and the batches")):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU); float64 for exactness checks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe", help="pipeline schedule")
    p.add_argument("--log-file", type=Path, default=None,
                   help="write the per-step loss and tokens/s here as JSON "
                        "(not --log: torchrun would take it for its --log-dir)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m lrn_lib.train` / `torchrun ... -m lrn_lib.train`, checked.

    Raises ValueError naming the flag when the sizes do not fit together (a head count that TP
    cannot split, a batch that DP or the micro-batches cannot split, CP on a CPU, ...), when
    --device cuda finds no GPU, or when --log-file could not be written."""
    _check_argv(argv)
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.microbatches == 0:
        args.microbatches = 2 * args.pp if args.pp > 1 else 1
    if args.ffn_dim == 0:
        args.ffn_dim = 32 * math.ceil(8 * args.dim / 3 / 32)
    check_args(args)
    return args


def _check_argv(argv: list[str] | None, name: str = "argv") -> None:
    """Raise TypeError unless argv is None or a list (or tuple) of strings, as sys.argv[1:] is."""
    if argv is not None and not (isinstance(argv, (list, tuple)) and all(isinstance(a, str) for a in argv)):
        raise TypeError(f"{name} must be a list of command-line strings such as ['--tp', '2'], got {argv!r}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag if the parallel degrees and the model or batch sizes disagree."""
    if not isinstance(args, argparse.Namespace):
        raise TypeError(f"args must be an argparse.Namespace from parse_args, got {type(args).__name__}")
    missing = sorted(set(vars(build_parser().parse_args([]))) - set(vars(args)))
    if missing:
        raise ValueError(f"args lacks the flags {missing}: build it with parse_args")
    for name in ("tp", "cp", "pp", "dp", "microbatches", "steps", "seq", "batch", "dim", "layers", "heads",
                 "kv_heads", "ffn_dim"):
        validate.integer(getattr(args, name), f"--{name.replace('_', '-')}", low=1)
    validate.choice(args.device, "--device", ("cpu", "cuda"))
    validate.choice(args.dtype, "--dtype", sorted(DTYPES))
    validate.choice(args.schedule, "--schedule", ("gpipe", "1f1b"))
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        raise ValueError(f"--dim {args.dim} must be --heads {args.heads} times an even head size")
    if args.heads % args.kv_heads:
        raise ValueError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.heads % args.tp or args.kv_heads % args.tp:
        raise ValueError(f"--tp {args.tp} must divide --heads {args.heads} and --kv-heads {args.kv_heads}: "
                         "each TP rank keeps whole heads")
    if args.layers < args.pp:
        raise ValueError(f"--layers {args.layers} is fewer than --pp {args.pp} stages")
    if args.batch % args.dp:
        raise ValueError(f"--dp {args.dp} must divide --batch {args.batch}")
    if args.pp > 1 and (args.batch // args.dp) % args.microbatches:
        raise ValueError(f"--microbatches {args.microbatches} must divide the batch of one DP rank, "
                         f"{args.batch // args.dp}")
    if args.pp == 1 and args.microbatches != 1:
        raise ValueError("--microbatches is for pipeline parallelism: use it with --pp > 1")
    if args.cp > 1 and args.device != "cuda":
        raise ValueError("--cp > 1 needs CUDA: torch's context_parallel rewrites the CUDA flash/efficient "
                         "attention kernels of scaled_dot_product_attention and has no CPU path. On the CPU, "
                         "chapter 8's from-scratch ring attention (lrn_lib.context_parallel) shows context "
                         "parallelism.")
    if args.cp > 1 and args.seq % (2 * args.cp):
        raise ValueError(f"--seq {args.seq} must be a multiple of 2 * --cp = {2 * args.cp} (load-balanced shards)")
    validate.number(args.lr, "--lr", low=0, low_open=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch finds no CUDA GPU (a CPU-only torch, or no visible device)")
    world = args.tp * args.cp * args.pp * args.dp
    if args.device == "cuda" and world > 1 and "RANK" not in os.environ:
        raise ValueError(f"{world} GPU ranks need a launcher: torchrun --nproc-per-node {world} -m lrn_lib.train ...")
    if args.log_file is not None and not args.log_file.resolve().parent.is_dir():
        raise ValueError(f"--log-file {args.log_file}: its folder {args.log_file.resolve().parent} does not exist")


def model_config(args: argparse.Namespace) -> LlamaConfig:
    """The LlamaConfig the flags describe: byte vocabulary (256), max_seq_len = --seq."""
    check_args(args)
    return tiny_config(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       ffn_dim=args.ffn_dim, max_seq_len=args.seq)

# %%
#| export lrn_lib.train
def train(args: argparse.Namespace) -> list[dict]:
    """Train for --steps steps in an initialized process group; rank 0 prints each step's loss and
    tokens/s and writes --log-file (the flags, the world size, rank 0's parameter layouts, the largest
    peak GPU memory of any rank on CUDA, and the records). Returns the per-step records
    [{'step', 'loss', 'tokens_per_s'}]."""
    check_args(args)
    trainer = Trainer(args, build_mesh(args))
    records, tokens = [], args.batch * args.seq
    for step in range(args.steps):
        start = time.perf_counter()
        loss = trainer.step(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        rate = tokens / (time.perf_counter() - start)
        records.append({"step": step, "loss": loss, "tokens_per_s": rate})
        if dist.get_rank() == 0:
            print(f"step {step:3d}  loss {loss:.6f}  tokens/s {rate:,.0f}", flush=True)
    peak = torch.zeros((), dtype=torch.int64, device=trainer.device)
    if trainer.device.type == "cuda":
        peak += torch.cuda.max_memory_allocated(trainer.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0 and args.log_file is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        layout = {name: trainer.layout(name) for name, _ in trainer.stage.named_parameters()}
        args.log_file.write_text(json.dumps({"args": settings, "world": dist.get_world_size(), "rank0_layout": layout,
                                             "peak_memory_bytes": peak.item(), "steps": records}, indent=1))
    return records


def train_worker(rank: int, world: int, argv: list[str]) -> list[dict]:
    """lrn_lib.spawn.spawn worker: train(parse_args(argv)) on one rank of a gloo world."""
    check_rank(rank, world)
    return train(parse_args(argv))


def main(argv: list[str] | None = None) -> list[dict]:
    """Entry point of `python -m lrn_lib.train` and `torchrun --nproc-per-node W -m lrn_lib.train`.

    Under torchrun (RANK set) it joins the launched job (NCCL on GPUs, gloo on CPUs); alone with a
    world of one it starts its own; alone on the CPU with a larger world it spawns the ranks itself.
    Returns the per-step records."""
    _check_argv(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as err:                           # one `error:` line and exit code 2, before any work
        build_parser().error(str(err))
    world = args.tp * args.cp * args.pp * args.dp
    backend = "nccl" if args.device == "cuda" else "gloo"
    if dist.is_initialized():
        return train(args)
    launched = "RANK" in os.environ                    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    if not launched and world > 1:                     # on the CPU: check_args refuses CUDA without torchrun
        return spawn(train_worker, world, argv)[0]
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if launched:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and __package__ == "lrn_lib":     # `python -m lrn_lib.train`, not this notebook
    main()

# %% [markdown]
# ### Checking the engine
#
# First the two-process layouts, in float64, three steps each: TP over 2 ranks, FSDP over 2
# ranks, and a 2-stage pipeline run by GPipe with 4 micro-batches (the default, $2p$) and by
# 1F1B with 2.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

from lrn_lib.spawn import spawn
from lrn_lib.train import check_worker, parse_args, reference_run

TINY = "--device cpu --dtype float64 --steps 3 --dim 32 --layers 2 --heads 4 --kv-heads 2 --seq 16 --batch 8".split()
layouts = {"TP=2": ["--tp", "2"], "DP=2 (FSDP2)": ["--dp", "2"], "PP=2, GPipe, m=4": ["--pp", "2"],
           "PP=2, 1F1B, m=2": ["--pp", "2", "--schedule", "1f1b", "--microbatches", "2"]}
results = spawn(check_worker, 2, [TINY + flags for flags in layouts.values()])
for i, name in enumerate(layouts):
    loss_err = max(rank[i]["loss_err"] for rank in results)
    grad_err = max(rank[i]["grad_err"] for rank in results)
    print(f"{name:18s} losses {[round(x, 6) for x in results[0][i]['losses']]}  "
          f"loss and every gradient within 1e-12 of one process: {loss_err < 1e-12 and grad_err < 1e-12}")

# %% [markdown]
# The same loss curve four times, equal to the single process's to float64 rounding. Here is how
# the engine stored one attention weight and one norm weight on rank 0 in each layout (a pipeline
# rank holds only its stage's parameters; rank 0 holds the first block):

# %%
for i, name in enumerate(list(layouts)[:3]):
    layout = results[0][i]["layout"]
    print(f"{name}:\n  wq   {layout['layers.0.attention.wq.weight']}\n  wo   {layout['layers.0.attention.wo.weight']}"
          f"\n  norm {layout['layers.0.attention_norm.weight']}")

# %% [markdown]
# Context parallelism refuses the CPU, with a pointer to where the CPU version lives:

# %%
try:
    parse_args(["--cp", "2", "--device", "cpu"])
except ValueError as refusal:
    print(refusal)

# %% [markdown]
# Now the launcher. The command lines, from a laptop to a server of 8 GPUs:
#
# ```bash
# python -m lrn_lib.train --steps 20                           # one process
# python -m lrn_lib.train --dp 2 --tp 2 --steps 20             # CPU: spawns 4 gloo processes itself
# torchrun --nproc-per-node 4 -m lrn_lib.train --dp 2 --tp 2   # the same through torchrun (gloo on CPU, NCCL on GPU)
# torchrun --nproc-per-node 8 -m lrn_lib.train --pp 2 --cp 2 --tp 2 \
#     --dim 1024 --layers 8 --heads 16 --kv-heads 8 --seq 4096 --batch 16 --log-file run.json
# ```
#
# Across servers, each server runs the same command with
# `--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB` in place of the
# single-server defaults, and torchrun assigns the ranks. We run the 2-D mesh (dp=2, tp=2) as
# four CPU processes under torchrun, in float64 (`python -m torch.distributed.run` is the
# `torchrun` program); each step's line shows the job's loss and its throughput.

# %%
# NBVAL_IGNORE_OUTPUT
log = Path("production_demo_log.json")
flags = TINY + ["--dp", "2", "--tp", "2"]
env = {**os.environ, "PYTHONPATH": str(Path.cwd().parent), "OMP_NUM_THREADS": "1"}
run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "lrn_lib.train",
                      *flags, "--log-file", str(log)], env=env, capture_output=True, text=True, timeout=300)
print("$ torchrun --nproc-per-node 4 -m lrn_lib.train", " ".join(flags))
print(run.stdout.strip() if run.returncode == 0 else run.stderr[-3000:])

# %%
record = json.loads(log.read_text())
log.unlink()
expected, _ = reference_run(parse_args(flags))
gap = max(abs(step["loss"] - e) for step, e in zip(record["steps"], expected))
print(f"{record['world']} torchrun processes, mesh dp=2 x tp=2; loss curve equal to the single process within 1e-12:",
      gap < 1e-12)
for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.0.attention_norm.weight"):
    print(f"rank 0, {name:30s} {record['rank0_layout'][name]}")

# %% [markdown]
# The torchrun job reproduces the one-process loss curve, and its log shows the 2-D layout:
# `wq` (32 x 32) is cut four ways, 8 rows per rank, by TP's `Shard(0)` and then FSDP's strided
# shard of each TP half; `wo` is `Shard(1)` under TP and FSDP cuts its rows; the norm weight
# is sharded by FSDP alone. `tests/test_train.py` also checks every gradient of the 2-D mesh
# and of a pipeline combined with FSDP, and the torchrun entry point with its JSON log.
#
# What this run leaves out of a production job such as torchtitan's: initializing the model on
# the `meta` device and materializing only each rank's shards (every rank here builds the full
# model first, which a 405B model does not allow), distributed checkpoints
# (`torch.distributed.checkpoint`), activation checkpointing, `torch.compile`, gradient
# clipping (whose norm must be reduced across the pipeline stages as well), sequence
# parallelism for the norms, float8 matrix products, and Llama 3's lighter first and last
# pipeline stages (`partition_layers(..., lighter_ends=True)` of section 9.1). The
# multi-GPU paths (NCCL, and `--cp > 1`, which needs CUDA) are covered by GPU tests in
# `tests/test_train.py`, run where a machine has two GPUs.
#
# ### On two GPUs
# We ran each layout of two GPUs against one GPU on a server with two NVIDIA H200s (torch
# 2.11, NCCL), through `benchmarks/train_layouts.py`, which launches `lrn_lib.train` once per
# layout and reads the JSON logs (numbers and command in the README and in
# `benchmarks/results/`). A model of width 512, 8 layers, 8 query and 2 key/value heads, 16
# sequences of 1,024 bytes per step, 40 steps of AdamW in float32:
#
# | layout | tokens/s | peak GiB per GPU | final loss | largest loss gap to 1 GPU |
# |---|---|---|---|---|
# | 1 GPU | 186,622 | 5.73 | 2.8272 | |
# | TP=2 | 97,259 | 3.79 | 2.8272 | 5.3e-05 |
# | CP=2 | 129,254 | 3.07 | 2.8272 | 5.4e-05 |
# | DP=2 (FSDP2) | 157,180 | 2.94 | 2.8272 | 6.1e-05 |
# | PP=2 (GPipe, m=4) | 205,493 | 2.97 | 2.8272 | 3.1e-05 |
#
# Every layout follows the one-GPU loss curve to within $6\cdot10^{-5}$ over all 40 steps:
# float32 rounding in a different order of summation, nothing more. Every layout also cuts the
# memory per GPU: CP, FSDP and the pipeline to about half, since at this size the activations
# dominate and each of them halves them (tokens, sequences, layers); TP less, since the
# residual stream, the norms and the gathered logits stay whole on both GPUs. Speed is
# another matter. A model this small gives each GPU too little work: TP pays two all-reduces
# per block on every step for matrix products that were already fast, and halves the GPU's
# throughput; CP and FSDP lose less; only the pipeline gains (its stages overlap, and each
# GPU's kernels are larger than TP's). In bfloat16 at width 2,048 (16 layers, 16/8 heads, 8
# sequences of 4,096 bytes, 20 steps), where one GPU needs 66.6 GiB, the picture turns: one
# GPU makes 63,219 tokens/s, TP=2 65,828 at 47.2 GiB, CP=2 80,574 at 35.6 GiB, FSDP 93,547 at
# 34.3 GiB and the pipeline 93,342 at 33.6 GiB. The bfloat16 loss curves no longer agree to
# many digits (the largest gap is 0.19, for TP, in the first chaotic steps; the final losses
# are 3.27 to 3.35), which is why the equality above is checked in float32. The layouts of
# eight GPUs (TP x CP x PP x DP together) need a server this book has not yet run on.

# %% [markdown]
# ## 10.2 Where the 405B model's bytes and messages go
#
# The previous sections built each parallel dimension on a handful of CPU processes and
# checked it against the single-process step. None of that tells us whether the real
# thing fits: 405.9 billion parameters, 16 million tokens per step, 16,384 H100 GPUs of
# 80 GB each. This section answers that question with arithmetic. For each of the three
# layouts that the Llama 3 paper (Grattafiori et al. 2024, arXiv:2407.21783) reports in
# its Table 4, we compute
#
# * how many bytes of weights, gradients, optimizer state and saved activations one GPU
#   holds, and whether they fit in an H100;
# * how many bytes one GPU sends per training step in each of the four dimensions (TP, CP,
#   PP, DP), and at what rate, given the step time implied by the paper's throughput.
#
# Every number comes from `lrn_lib.llama.LLAMA3_405B` and the functions below, not from
# the paper. The paper gives only the layouts and the throughput; the rest rests on
# assumptions, which we state as we go. Change an assumption and the table changes with
# it.
#
# ### The three published layouts
#
# Table 4 of the paper lists the layouts used to pre-train the 405B model:
#
# | GPUs | TP | CP | PP | DP | sequence | sequences per DP group | TFLOPs/GPU | BF16 MFU |
# |---|---|---|---|---|---|---|---|---|
# | 8,192 | 8 | 1 | 16 | 64 | 8,192 | 32 | 430 | 43% |
# | 16,384 | 8 | 1 | 16 | 128 | 8,192 | 16 | 400 | 41% |
# | 16,384 | 8 | 16 | 16 | 8 | 131,072 | 16 | 380 | 38% |
#
# Layout (a) ran early in pre-training, (b) after the cluster had doubled, and (c) during
# the long-context stage, when sequences grew to 128K tokens. Two more details come from the
# paper's description of its pipeline and of FSDP (Section 3.3.2):
#
# * The 126 layers sit on 16 pipeline stages, but the first and the last stage hold one
#   layer fewer (7 instead of 8). The first stage also holds the token embedding and the
#   last stage the output head and the loss, so both would otherwise run late and use more
#   memory than the others. A micro-batch is one sequence.
# * Gradients and optimizer state are sharded over the data-parallel group, as in ZeRO
#   stage 2 (Rajbhandari et al. 2019, arXiv:1910.02054). The bf16 weights are gathered once
#   per step and *not* resharded after the forward pass. So during the step every GPU
#   holds all the bf16 weights of its TP and PP slice.
#
# The first check is the token arithmetic. A step processes $dp$ data-parallel replicas,
# each with $B$ sequences of $T$ tokens:
#
# $$\text{tokens per step} = dp \cdot B \cdot T \qquad (10.5)$$
#
# All three layouts give $2^{24} = 16{,}777{,}216$ tokens per step. This is the paper's
# "16M": the batch stays the same when the cluster doubles and when the context grows 16
# times, and that keeps the optimization recipe unchanged. Doubling the GPUs halves the
# sequences per DP group, from 32 to 16. Growing the sequence 16 times takes GPUs away from DP
# (128 to 8) and gives them to CP (1 to 16), so that each GPU still processes
# $T/cp = 8{,}192$ tokens of every sequence.

# %%
#| export lrn_lib.accounting
from dataclasses import dataclass

from lrn_lib import validate
from lrn_lib.llama import LlamaConfig, check_config, parameter_count, training_flops

GiB = 2 ** 30                 # memory is counted in binary gigabytes
GB = 10 ** 9                  # traffic in decimal gigabytes, the unit of link bandwidths
WEIGHT_BYTES = 2              # bf16 weights, kept whole during the step
GRAD_BYTES = 4                # fp32 gradient accumulation, sharded over the dp * cp ranks sharing the weights
OPTIMIZER_BYTES = 12          # fp32 master weights + Adam's m and v, sharded the same way
ACTIVATION_BYTES = 2          # bf16 activations, and bf16 messages between GPUs
LOGIT_BYTES = 4               # fp32 logits for the cross-entropy


@dataclass(frozen=True)
class Layout:
    """How one training step is spread over tp * cp * pp * dp GPUs.

    dp replicas each process batch_per_dp sequences of seq_len tokens per step, in
    micro-batches of micro_batch sequences; each sequence is split over cp GPUs.
    """

    tp: int
    cp: int
    pp: int
    dp: int
    seq_len: int
    batch_per_dp: int
    micro_batch: int = 1

    def __post_init__(self):
        for name in ("tp", "cp", "pp", "dp", "seq_len", "batch_per_dp", "micro_batch"):
            validate.integer(getattr(self, name), name, low=1)
        if self.batch_per_dp % self.micro_batch:
            raise ValueError(f"micro_batch={self.micro_batch} does not divide batch_per_dp={self.batch_per_dp}")
        if self.seq_len % self.cp:
            raise ValueError(f"cp={self.cp} does not divide seq_len={self.seq_len}")

    @property
    def gpus(self) -> int:
        """Number of GPUs the layout uses."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over the whole job."""
        return self.dp * self.batch_per_dp * self.seq_len                          # (10.5)

    @property
    def micro_batches(self) -> int:
        """Micro-batches each pipeline runs per step."""
        return self.batch_per_dp // self.micro_batch

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens of one micro-batch that one CP rank holds (before any TP sharding)."""
        return self.micro_batch * self.seq_len // self.cp


@dataclass(frozen=True)
class PublishedRun:
    """A row of Table 4 of the Llama 3 paper: GPU count, layout and measured throughput."""

    name: str
    gpus: int
    layout: Layout
    tflops_per_gpu: float
    mfu: float

    def __post_init__(self):
        validate.instance(self.name, "name", str)
        validate.integer(self.gpus, "gpus", low=1)
        validate.instance(self.layout, "layout", Layout)
        validate.number(self.tflops_per_gpu, "tflops_per_gpu", low=0, low_open=True)
        validate.number(self.mfu, "mfu", low=0, low_open=True, high=1)


LLAMA3_TABLE4 = (
    PublishedRun("(a) 8K GPUs, 8K context", 8192,
                 Layout(tp=8, cp=1, pp=16, dp=64, seq_len=8192, batch_per_dp=32), 430.0, 0.43),
    PublishedRun("(b) 16K GPUs, 8K context", 16384,
                 Layout(tp=8, cp=1, pp=16, dp=128, seq_len=8192, batch_per_dp=16), 400.0, 0.41),
    PublishedRun("(c) 16K GPUs, 128K context", 16384,
                 Layout(tp=8, cp=16, pp=16, dp=8, seq_len=131072, batch_per_dp=16), 380.0, 0.38),
)

# %%
from lrn_lib.accounting import LLAMA3_TABLE4

for run in LLAMA3_TABLE4:
    lay = run.layout
    print(f"{run.name:28s} {lay.dp:>4d} x {lay.batch_per_dp:>2d} x {lay.seq_len:>7,d} = "
          f"{lay.tokens_per_step:,d} tokens; {lay.tp} x {lay.cp} x {lay.pp} x {lay.dp} = {lay.gpus:,d} GPUs")
print("every layout's GPU count matches Table 4:", all(r.layout.gpus == r.gpus for r in LLAMA3_TABLE4))
print("every step is 2**24 tokens:", all(r.layout.tokens_per_step == 2 ** 24 for r in LLAMA3_TABLE4))

# %% [markdown]
# ### Parameters on one GPU
#
# One GPU's slice of the model is decided by TP and PP, the two dimensions that split the
# weights. DP and CP replicate them. PP gives stage $s$ a run of $L_s$ consecutive layers. The Llama 3
# rule counts the embedding and the head as one layer each: with $\ell = (L + 2)/pp$,
#
# $$L_0 = L_{pp-1} = \ell - 1, \qquad L_s = \ell \text{ otherwise.} \qquad (10.6)$$
#
# For 126 layers on 16 stages, $\ell = 8$ and the split is $7 + 14 \times 8 + 7$, the same one
# section 9.1 uses. Here we require $L + 2$ to be a multiple of $pp$, because this section only
# counts layouts that divide exactly. TP then splits every matrix of a block $tp$ ways:
# $W_q, W_o$ ($d \times d$), $W_k, W_v$ ($d \times d_{kv}$, where $d_{kv}$ is the number of
# key/value heads times the head size), and the three SwiGLU matrices
# ($d \times d_{ff}$). The two RMSNorm gains ($2d$) are replicated. Both the embedding and the
# head are $V \times d$ matrices split over the vocabulary. Stage $s$ of a TP group then holds
#
# $$P_s = L_s\Big(\frac{2d^2 + 2 d\, d_{kv} + 3 d\, d_{ff}}{tp} + 2d\Big)
#        + [s = 0]\,\frac{Vd}{tp} + [s = pp-1]\Big(\frac{Vd}{tp} + d\Big) \qquad (10.7)$$
#
# parameters, where $[\cdot]$ is 1 when the condition holds. A layout must also divide the shapes: $tp$ must
# divide the number of query heads, the number of key/value heads (Llama 3's 8 KV heads allow $tp \le 8$, one
# KV head per GPU at $tp = 8$), $d_{ff}$ and the vocabulary.

# %%
#| export lrn_lib.accounting
def stage_layers(n_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage (pp,) under Llama 3's rule (10.6): the first and last stage hold one fewer.

    The embedding and the head count as one layer each, so (n_layers + 2) must be a
    multiple of pp; pp = 1 puts every layer on the one stage.
    """
    validate.integer(n_layers, "n_layers", low=1)
    validate.integer(pp, "pp", low=1)
    if pp == 1:
        return [n_layers]
    per_stage, rest = divmod(n_layers + 2, pp)
    if rest or per_stage < 2:
        raise ValueError(f"pp={pp} stages cannot hold n_layers={n_layers} as (n_layers + 2) / pp layers each, "
                         "less one at both ends")
    return [per_stage - 1] + [per_stage] * (pp - 2) + [per_stage - 1]                # (10.6)


def check_layout(cfg: LlamaConfig, layout: Layout) -> None:
    """Raise ValueError unless the layout splits cfg's heads, widths, vocabulary, tokens and layers evenly."""
    check_config(cfg)
    validate.instance(layout, "layout", Layout)
    if cfg.n_experts:
        raise ValueError(f"cfg.n_experts={cfg.n_experts}: this accounting covers dense models only")
    for name, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim),
                       ("vocab_size", cfg.vocab_size), ("micro-batch tokens per CP rank", layout.micro_batch_tokens)):
        if size % layout.tp:
            raise ValueError(f"tp={layout.tp} does not divide {name}={size}")
    stage_layers(cfg.n_layers, layout.pp)


def block_matrix_parameters(cfg: LlamaConfig) -> int:
    """Parameters in one block's seven weight matrices (Wq, Wk, Wv, Wo, W1, W2, W3), the part TP splits."""
    check_config(cfg)
    kv = cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_dim


def params_per_gpu(cfg: LlamaConfig, layout: Layout, stage: int) -> int:
    """Parameters one GPU of pipeline stage `stage` holds (10.7): its layers' TP shards, replicated norm
    gains, and the TP shard of the embedding (first stage) or of the final norm and head (last stage)."""
    check_layout(cfg, layout)
    validate.integer(stage, "stage", low=0, high=layout.pp - 1)
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    embedding = cfg.vocab_size * cfg.dim // layout.tp
    count = layers * (block_matrix_parameters(cfg) // layout.tp + 2 * cfg.dim)       # (10.7)
    if stage == 0:
        count += embedding
    if stage == layout.pp - 1:
        count += embedding + cfg.dim
    return count


# %%
from lrn_lib.accounting import Layout, params_per_gpu, stage_layers
from lrn_lib.llama import LLAMA3_405B, parameter_count

lay_a = LLAMA3_TABLE4[0].layout
layers = stage_layers(LLAMA3_405B.n_layers, lay_a.pp)
print("layers per stage:", layers, "sum", sum(layers))
per_stage = [params_per_gpu(LLAMA3_405B, lay_a, s) for s in range(lay_a.pp)]
for s in (0, 1, 15):
    print(f"stage {s:2d}: {layers[s]} layers, {per_stage[s] / 1e9:.3f}B parameters per GPU")
untiled = [params_per_gpu(LLAMA3_405B, Layout(tp=1, cp=1, pp=16, dp=1, seq_len=8192, batch_per_dp=16), s)
           for s in range(16)]
print("the 16 stages at tp=1 hold parameter_count(LLAMA3_405B):", sum(untiled) == parameter_count(LLAMA3_405B))

# %% [markdown]
# A middle stage holds the most weights: 8 blocks of 3.19B parameters each, split 8 ways,
# about 3.19B parameters per GPU. The first stage swaps one block for the
# $128{,}256 \times 16{,}384$ embedding (2.10B parameters), so it holds a little less. As a
# check, the sixteen stages at $tp = 1$ add up to `parameter_count`.
#
# ### Memory per GPU
#
# **Model state.** With the byte sizes stated at the top of the module (bf16 weights,
# fp32 gradients, fp32 master weights plus Adam's two moments), a GPU with $P$ parameters
# holds
#
# $$M_{\text{state}} = 2P + 4P + \frac{12P}{dp \cdot cp} \qquad (10.8)$$
#
# bytes. The optimizer state is sharded over the group of $dp \cdot cp$ ranks, not just $dp$:
# the $cp$ ranks of a CP group hold the same weights and see different tokens, so for the
# weights they behave like more data-parallel replicas; Megatron-LM and TorchTitan shard
# over both. The gradient is *not* sharded in this model, and that follows from how we
# count DP's messages below (10.16): one reduce-scatter per step, after the gradients of all
# $m$ micro-batches have been accumulated in fp32. Until that reduce-scatter, every GPU
# accumulates the full fp32 gradient of its own TP/PP slice, $4P$ bytes. The alternative,
# a reduce-scatter after every micro-batch (FSDP's default), would shard the gradient to
# $4P/(dp \cdot cp)$ but multiply DP's gradient traffic by $m = 16$. Without any sharding,
# the 16 bytes per parameter would be $16 \times 3.19 \text{B} = 51$ GB per GPU before a
# single activation; with ours, the optimizer state drops to under a GiB and the fp32
# gradient buffer (about 12 GiB) becomes the largest part of the model state, twice the
# bf16 weights.
#
# **Activations.** The backward pass needs tensors that the forward pass computed. For one
# token in one layer of `lrn_lib.llama.TransformerBlock`, we count the tensors a fused
# implementation keeps: the input of every matmul, the norms' inputs, the attention's
# q, k, v and output, and the SwiGLU intermediates. We list them below. Per token they add
# up to
#
# $$a = 6d + 2 d_{kv} + 3 d_{ff} \text{ elements} \qquad (10.9)$$
#
# For the 405B model that is 260,096 elements, or 508 KiB in bf16. Per-token scalars, such as
# RMSNorm's $1/\mathrm{rms}$ and attention's log-sum-exp (128 values), add about 0.1% and are left out.
# FlashAttention (chapter 4) keeps no $T \times T$ matrix. Our CPU reference saves more,
# for example the float32 temporaries of the norm, but production kernels keep close to
# this list. TP splits the matmul tensors over heads and $d_{ff}$. With sequence
# parallelism (Korthikanti et al. 2022, arXiv:2205.05198) it also splits the norms' tensors
# over tokens, so every entry is divided by $tp$.
#
# How many micro-batches are in flight depends on the schedule. Under 1F1B (section 9.1),
# stage $s$ runs $pp - s$ forward passes before its first backward pass and then alternates.
# It therefore holds $\min(pp - s, m)$ micro-batches at its peak, where $m$ is the number of
# micro-batches per step: the first stage holds $pp$. (Llama 3 uses an interleaved variant
# that holds a little more; we count plain 1F1B.) With $t = T/cp$ tokens per micro-batch on
# a GPU, stage $s$ keeps
#
# $$M_{\text{act}} = \min(pp - s, m)\; L_s\; t \;\frac{2a}{tp}
#                   \;+\; \text{CP: } \min(pp - s, m)\; L_s\; (T - t)\frac{2 \cdot 2 d_{kv}}{tp} \qquad (10.10)$$
#
# bytes. The second term exists only with CP. Each rank all-gathers the keys and values of
# the other $cp - 1$ chunks of the sequence, and we assume that it keeps them for the
# backward pass rather than gathering them again. The last stage adds, for its one
# micro-batch in flight, the final norm's input and output ($2d$ in bf16) and the fp32
# logits that the cross-entropy needs ($V$ values, split by $tp$ over the vocabulary):
#
# $$M_{\text{head}} = t\,\frac{2 \cdot 2d + 4V}{tp} \qquad (10.11)$$
#
# This term is about the size of one more layer, another reason to give the last stage one
# block fewer. We ignore transient buffers, such as a layer's unsharded gradients before their
# reduce-scatter and the communication buffers. The CUDA context, NCCL and the allocator's
# fragmentation also take a few GiB that the arithmetic does not see.

# %%
#| export lrn_lib.accounting
def saved_activations(cfg: LlamaConfig) -> dict[str, int]:
    """Elements per token that one TransformerBlock keeps for its backward pass (10.9), before TP sharding.

    Keys name the tensors of lrn_lib.llama's block: matmul inputs, norm inputs, q/k/v after RoPE,
    the attention output and the SwiGLU intermediates (a fused implementation's list).
    """
    kv = check_config(cfg).n_kv_heads * cfg.head_dim
    return {
        "attention_norm input x": cfg.dim,
        "wq/wk/wv input norm(x)": cfg.dim,
        "q after RoPE": cfg.n_heads * cfg.head_dim,
        "k after RoPE": kv,
        "v": kv,
        "attention output (wo input)": cfg.dim,
        "ffn_norm input h": cfg.dim,
        "w1/w3 input norm(h)": cfg.dim,
        "w1 output (gate, before SiLU)": cfg.ffn_dim,
        "w3 output (up)": cfg.ffn_dim,
        "w2 input silu(gate) * up": cfg.ffn_dim,
    }


def memory_per_gpu(cfg: LlamaConfig, layout: Layout, stage: int) -> dict[str, float]:
    """GiB one GPU of pipeline stage `stage` holds at its peak under 1F1B, by part.

    Keys: weights (bf16, whole), gradients (fp32, whole: accumulated over the step's micro-batches
    before the one reduce-scatter of (10.16)), optimizer (fp32 master + Adam m, v, sharded over
    dp * cp) (10.8); activations (10.10, 10.11); total.
    """
    params = params_per_gpu(cfg, layout, stage)
    shards = layout.dp * layout.cp
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    in_flight = min(layout.pp - stage, layout.micro_batches)
    t = layout.micro_batch_tokens
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = t * ACTIVATION_BYTES * sum(saved_activations(cfg).values()) / layout.tp            # (10.10)
    gathered_kv = layout.micro_batch * (layout.seq_len - layout.seq_len // layout.cp) * 2 * kv / layout.tp
    per_layer += gathered_kv * ACTIVATION_BYTES
    activations = in_flight * layers * per_layer
    if stage == layout.pp - 1:
        activations += t * (ACTIVATION_BYTES * 2 * cfg.dim + LOGIT_BYTES * cfg.vocab_size) / layout.tp  # (10.11)
    parts = {
        "weights": WEIGHT_BYTES * params,                                                          # (10.8)
        "gradients": GRAD_BYTES * params,
        "optimizer": OPTIMIZER_BYTES * params / shards,
        "activations": activations,
    }
    parts["total"] = sum(parts.values())
    return {name: size / GiB for name, size in parts.items()}


def busiest_stage(cfg: LlamaConfig, layout: Layout) -> int:
    """The pipeline stage whose GPUs need the most memory (the first such stage on a tie)."""
    check_layout(cfg, layout)
    totals = [memory_per_gpu(cfg, layout, s)["total"] for s in range(layout.pp)]
    return totals.index(max(totals))


# %%
from lrn_lib.accounting import ACTIVATION_BYTES, memory_per_gpu, saved_activations

saved = saved_activations(LLAMA3_405B)
for name, elements in saved.items():
    print(f"  {name:32s} {elements:>6,d}")
print(f"  {'total (10.9)':32s} {sum(saved.values()):>6,d} elements = "
      f"{ACTIVATION_BYTES * sum(saved.values()) / 1024:.0f} KiB per token per layer in bf16")

# %% [markdown]
# The list makes the balance visible. The three SwiGLU intermediates ($3 d_{ff} = 159{,}744$)
# take more than all the attention tensors together. Thanks to GQA, k and v are only
# $1{,}024$ each, a sixteenth of q. Next, the memory of every stage of the three layouts:

# %%
import matplotlib.pyplot as plt

parts = ("weights", "gradients", "optimizer", "activations")
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
for ax, run in zip(axes, LLAMA3_TABLE4):
    stages = range(run.layout.pp)
    mem = [memory_per_gpu(LLAMA3_405B, run.layout, s) for s in stages]
    bottom = [0.0] * run.layout.pp
    for part in parts:
        heights = [m[part] for m in mem]
        ax.bar(stages, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(80, color="black", linestyle="--", linewidth=1)
    ax.set_title(run.name, fontsize=10)
    ax.set_xlabel("pipeline stage")
axes[0].set_ylabel("GiB per GPU")
axes[-1].legend(loc="upper right", fontsize=8)
fig.suptitle("Memory per GPU at the 1F1B peak; dashed: an H100's 80 GiB")
plt.tight_layout()
plt.show()

# %% [markdown]
# Activations dominate every stage, at about 90% of the memory. The bars fall from left to
# right because under 1F1B stage $s$ holds $16 - s$ micro-batches. The weights are nearly
# flat: 8 layers on the middle stages, 7 layers plus the embedding or the head at the ends.
# So the tightest GPU is not the first stage but the second. It holds 15 micro-batches of 8
# layers, 120 layer-micro-batches, where the first stage holds $16 \times 7 = 112$. The
# short first stage of Llama 3 is what keeps stage 0 from being the worst. A plain split,
# which gives the first stages 8 layers, would put $16 \times 8 = 128$ layer-micro-batches
# plus the embedding on stage 0. Layout (c) has the same per-GPU token count as (a) and (b), $131{,}072/16 =
# 8{,}192$, so its extra memory is exactly the gathered keys and values of the other 15 CP
# chunks (second term of (10.10)).
#
# ### Messages per step
#
# For the bytes a GPU sends, we use the costs of ring collectives over $n$ GPUs
# (Patarasuk and Yuan 2009). Let $S$ be the size of the whole tensor: the result of an
# all-gather, the input of a reduce-scatter or an all-reduce. Each GPU then sends
#
# $$\text{all-gather}, \text{reduce-scatter}: \frac{n-1}{n} S, \qquad
#   \text{all-reduce}: 2\,\frac{n-1}{n} S \qquad (10.12)$$
#
# bytes: an all-reduce is a reduce-scatter followed by an all-gather. With $t$ tokens per
# micro-batch on a GPU, $m$ micro-batches per step and $L_s$ layers on the stage, each
# dimension sends the following.
#
# * **TP** (section 7.2): per layer and micro-batch, one all-reduce of the $t \times d$
#   activations after the attention's $W_o$ and one after the FFN's $W_2$ in the forward pass,
#   and one each for the input gradients of $W_{q,k,v}$ and $W_{1,3}$ in the backward pass.
#   Sequence parallelism turns each all-reduce into an all-gather plus a reduce-scatter, with
#   the same bytes. To keep its $1/tp$ activation saving, Megatron-LM gathers the sharded
#   inputs again in the backward pass, which adds about 25%; we leave that out.
#   $$C_{TP} = L_s\, m \cdot 4 \cdot 2\frac{tp-1}{tp}\, 2td \qquad (10.13)$$
# * **CP** (chapter 8): per layer and micro-batch, an all-gather of the K and V chunks
#   (the whole gathered tensor has $T \cdot 2 d_{kv}/tp$ elements on each TP rank) in the
#   forward pass, and a reduce-scatter of their gradients in the backward pass:
#   $$C_{CP} = L_s\, m \cdot 2 \cdot \frac{cp-1}{cp}\, 2 T\,\frac{2 d_{kv}}{tp} \qquad (10.14)$$
# * **PP** (section 9.1): per micro-batch, the activations go forward to the next stage and
#   their gradient goes back to the previous one. Under sequence parallelism each TP rank holds
#   $t/tp$ of the tokens and sends only those:
#   $$C_{PP} = m\,\big([s > 0] + [s < pp-1]\big)\, \frac{2td}{tp} \qquad (10.15)$$
# * **DP** (section 9.2): once per step, an all-gather of the bf16 weights and a
#   reduce-scatter of the fp32 gradients over the $dp \cdot cp$ ranks that share the slice:
#   $$C_{DP} = \frac{n-1}{n}(2P + 4P), \quad n = dp \cdot cp \qquad (10.16)$$
#
# We leave out the small collectives of the vocabulary-parallel embedding and
# cross-entropy.

# %%
#| export lrn_lib.accounting
def all_gather_bytes(size: float, n: int) -> float:
    """Bytes each of n GPUs sends in a ring all-gather (or reduce-scatter) of a size-byte tensor (10.12)."""
    validate.number(size, "size", low=0)
    validate.integer(n, "n", low=1)
    return (n - 1) / n * size                                                     # (10.12)


def all_reduce_bytes(size: float, n: int) -> float:
    """Bytes each of n GPUs sends in a ring all-reduce of a size-byte tensor: reduce-scatter + all-gather (10.12)."""
    return 2 * all_gather_bytes(size, n)                                          # (10.12)


def communication_per_step(cfg: LlamaConfig, layout: Layout, stage: int) -> dict[str, float]:
    """GB (10**9 bytes) one GPU of pipeline stage `stage` sends per step in each dimension: keys tp, cp, pp, dp.

    tp (10.13): 4 all-reduces of (tokens, dim) bf16 per layer and micro-batch; cp (10.14): all-gather
    of K, V forward and reduce-scatter of their gradients backward; pp (10.15): activations forward and
    gradients backward per micro-batch and neighbour; dp (10.16): bf16 weight all-gather and fp32
    gradient reduce-scatter once per step over dp * cp.
    """
    params = params_per_gpu(cfg, layout, stage)
    layers = stage_layers(cfg.n_layers, layout.pp)[stage]
    m, t = layout.micro_batches, layout.micro_batch_tokens
    kv = cfg.n_kv_heads * cfg.head_dim
    activation = t * cfg.dim * ACTIVATION_BYTES
    sequence_kv = layout.micro_batch * layout.seq_len * 2 * kv / layout.tp * ACTIVATION_BYTES
    neighbours = (stage > 0) + (stage < layout.pp - 1)
    shards = layout.dp * layout.cp
    sent = {
        "tp": layers * m * 4 * all_reduce_bytes(activation, layout.tp),                              # (10.13)
        "cp": layers * m * 2 * all_gather_bytes(sequence_kv, layout.cp),                             # (10.14)
        "pp": m * neighbours * activation / layout.tp,                                               # (10.15)
        "dp": all_gather_bytes(WEIGHT_BYTES * params, shards) + all_gather_bytes(GRAD_BYTES * params, shards),  # (10.16)
    }
    return {name: size / GB for name, size in sent.items()}


# %% [markdown]
# ### The table
#
# For each layout we show the busiest stage: memory in GiB and the GB it sends per step
# in each dimension. HBM is built in binary sizes, so an H100's "80 GB" are 80 GiB; that is
# the limit we compare against.

# %%
from lrn_lib.accounting import busiest_stage, communication_per_step

print(f"{'layout':28s} {'stage':>5s} | {'weights':>7s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'total':>6s} GiB"
      f" | {'TP':>6s} {'CP':>5s} {'PP':>5s} {'DP':>5s} GB sent per step")
rows = {}
for run in LLAMA3_TABLE4:
    s = busiest_stage(LLAMA3_405B, run.layout)
    mem = memory_per_gpu(LLAMA3_405B, run.layout, s)
    sent = communication_per_step(LLAMA3_405B, run.layout, s)
    rows[run.name] = (s, mem, sent)
    print(f"{run.name:28s} {s:>5d} | {mem['weights']:7.1f} {mem['gradients']:6.2f} {mem['optimizer']:6.2f} "
          f"{mem['activations']:6.1f} {mem['total']:6.1f}     | {sent['tp']:6.1f} {sent['cp']:5.1f} "
          f"{sent['pp']:5.2f} {sent['dp']:5.1f}")

# %%
H100_GIB = 80
for name, (_, mem, _) in rows.items():
    print(f"{name}: busiest GPU {mem['total']:.1f} GiB, fits in {H100_GIB} GiB: {mem['total'] < H100_GIB}")
print("TP sends the most bytes in every layout:",
      all(max(sent, key=sent.get) == "tp" for _, _, sent in rows.values()))

# %% [markdown]
# The busiest GPU of layout (a) needs about 78 GiB out of 80, and so does (b): on paper they
# fit, but the margin of about 2 GiB is less than the CUDA context, NCCL's buffers and the
# allocator's fragmentation usually take. Layout (b) uses twice the GPUs, and only the
# sharded optimizer part shrinks, because weights, gradient buffer and activations per GPU
# do not depend on $dp$. Layout (c) does *not* fit: the gathered keys and values cost about
# 7 GiB more, for 84.7 GiB. So the published runs must do something this model leaves out,
# and the accounting shows where the room can come from: a reduce-scatter of the gradients
# after every micro-batch would shrink the 12 GiB buffer to almost nothing at 16 times DP's
# gradient traffic; recomputing some activations in the backward pass (activation
# checkpointing) trades FLOPs for the largest part; and gathering the keys and values again
# in the backward pass instead of keeping them would save the 7 GiB of (c) at twice CP's
# forward traffic. The paper does not say which it uses.
#
# In traffic, the dimensions differ by orders of magnitude:
#
# * **TP** sends about 480 GB per step per GPU in (a). Every layer of every micro-batch
#   all-reduces its full activations four times, and these collectives sit on the critical
#   path: the next matmul waits for them. This is why TP stays inside the 8 GPUs of one
#   server, on NVLink.
# * **DP** sends about 19 GB per step, but only once per step, and the weight all-gather and
#   gradient reduce-scatter can overlap with compute. That is why it spans the slow,
#   cross-rack part of the network.
# * **PP** sends about 2 GB: one small tensor per micro-batch per boundary. It is cheap in
#   bytes but expensive in idle time (the bubble, section 9.1).
# * **CP** in (c) sends about 16 GB. GQA makes K and V only $2 d_{kv} = 2{,}048$ wide against
#   $d = 16{,}384$, so gathering a whole 128K-token sequence's keys and values costs less than
#   TP does for one 8K chunk.
#
# Figure 5 of the paper orders the dimensions [TP, CP, PP, DP] from innermost to outermost.
# That is *not* the ordering by bytes: by our table DP sends more than CP, and CP more than
# PP. The paper's reason is how well each dimension tolerates latency and hides behind
# compute: TP's collectives block the next matmul, so it gets NVLink; CP's all-gathers sit
# inside every attention layer; PP sends little, and only at stage boundaries; DP's
# traffic happens once per step and overlaps with compute, so it can cross the slowest
# links.
#
# ### Step time and MFU
#
# The paper reports throughput, not step time, so we derive the step time. A step trains
# on $D$ tokens with about $6N$ FLOPs per token (section 6.1: $2N$ forward, $4N$ backward). At
# the reported FLOP/s per GPU, a step takes
#
# $$t_{\text{step}} = \frac{D \cdot F}{\text{GPUs} \cdot \text{FLOP/s per GPU}}, \qquad
#   F = 6N \;\; \text{or} \;\; F = 6N + 6 L d T \qquad (10.17)$$
#
# seconds. The second $F$ adds the causal attention's own matmuls, $QK^\top$ and $AV$: per
# token and layer, $2 \cdot 2 d \cdot T/2$ FLOPs forward and twice that backward. These matmuls
# have no weights, so $6N$ does not count them. At 8K tokens they add 4%, at 128K they add 67%.
# The paper does not say which convention its TFLOPs use, so we show both. For MFU, the
# reported TFLOPs divided by the H100's dense BF16 peak of 989 TFLOPs should give the reported MFU.

# %%
#| export lrn_lib.accounting
def flops_per_token(cfg: LlamaConfig, seq_len: int, attention: bool = False) -> float:
    """Training FLOPs per token (10.17): 6N, plus the causal attention matmuls 6 * n_layers * dim * seq_len."""
    validate.integer(seq_len, "seq_len", low=1)
    validate.flag(attention, "attention")
    flops = training_flops(parameter_count(cfg), 1)
    if attention:
        flops += 6 * cfg.n_layers * cfg.dim * seq_len                              # (10.17)
    return flops


def implied_step_seconds(cfg: LlamaConfig, run: PublishedRun, attention: bool = False) -> float:
    """Seconds per step implied by a published run's throughput (10.17): tokens * F / (GPUs * FLOP/s)."""
    check_config(cfg)
    validate.instance(run, "run", PublishedRun)
    layout = run.layout
    flops = layout.tokens_per_step * flops_per_token(cfg, layout.seq_len, attention)
    return flops / (layout.gpus * run.tflops_per_gpu * 1e12)                      # (10.17)


# %%
from lrn_lib.accounting import implied_step_seconds

H100_BF16_TFLOPS = 989.0
print(f"{'layout':28s} {'step, 6N':>9s} {'+ attention':>12s} | {'TFLOPs / 989':>12s} {'reported MFU':>12s}")
for run in LLAMA3_TABLE4:
    print(f"{run.name:28s} {implied_step_seconds(LLAMA3_405B, run):8.1f}s "
          f"{implied_step_seconds(LLAMA3_405B, run, attention=True):11.1f}s | "
          f"{run.tflops_per_gpu / H100_BF16_TFLOPS:12.0%} {run.mfu:12.0%}")
print("TFLOPs / peak is within one point of the reported MFU:",
      all(abs(r.tflops_per_gpu / H100_BF16_TFLOPS - r.mfu) <= 0.01 for r in LLAMA3_TABLE4))

# %% [markdown]
# The reported MFUs are the reported TFLOPs over the peak, up to rounding. A step of layout (a)
# takes about 11.6 s counting $6N$ (12.1 s with the attention matmuls). Layout (b) has twice
# the GPUs at a slightly lower per-GPU rate, so its step is about half as long, 6.2 s (6.5 s).
# For (c), the two conventions disagree more: 6.6 s if the 380 TFLOPs count only $6N$, and
# 10.9 s if they include the attention matmuls. The second is the one that
# charges the 128K-token sequences for their quadratic attention, and it is the step time we use
# from here on.
#
# Dividing the bytes of the table by the step time gives the bandwidth each dimension needs on
# average. We compare it with the links of the paper's cluster: NVLink inside a server
# (H100: 450 GB/s each way) and one 400 Gb/s RoCE port (50 GB/s) per GPU across servers.
# Averages understate TP's cost, because its collectives block the next matmul and cannot hide
# behind compute. So for TP we also print the time its bytes take on each link, as a share of
# the step.

# %%
NVLINK_GBS, ROCE_GBS = 450.0, 50.0
print(f"{'layout':28s} {'step':>6s} | {'TP':>5s} {'CP':>5s} {'PP':>5s} {'DP':>5s} GB/s per GPU | "
      f"TP time on NVLink, on RoCE")
shares = {}
for run in LLAMA3_TABLE4:
    step = implied_step_seconds(LLAMA3_405B, run, attention=True)
    sent = rows[run.name][2]
    rate = {k: v / step for k, v in sent.items()}
    shares[run.name] = (rate, sent["tp"] / NVLINK_GBS / step, sent["tp"] / ROCE_GBS / step)
    print(f"{run.name:28s} {step:5.1f}s | " + " ".join(f"{rate[k]:5.1f}" for k in ("tp", "cp", "pp", "dp"))
          + f"              | {shares[run.name][1]:5.0%} {shares[run.name][2]:8.0%} of the step")

# %%
print("TP's bytes take under a tenth of the step on NVLink:", all(nv < 0.1 for _, nv, _ in shares.values()))
print("over RoCE they would take over 40% of it:", all(roce > 0.4 for _, _, roce in shares.values()))
print("CP, PP and DP together need under a tenth of a RoCE port:",
      all(r["cp"] + r["pp"] + r["dp"] < ROCE_GBS / 10 for r, _, _ in shares.values()))

# %% [markdown]
# On NVLink, TP's all-reduces cost a few percent up to a tenth of the step. Over the 50 GB/s
# network the same bytes would take most of the step in layouts (a) and (b), and nearly half
# of it in (c), during which the matmuls would wait. The outer three dimensions together need only a few
# GB/s across servers, and DP's share can hide behind compute. The 4D layout works because the
# one dimension that needs bandwidth stays on the one link that has it. In short:
#
# * **Memory is set by activations.** Under 1F1B, the first stages hold up to $pp$
#   micro-batches of $T/cp$ tokens. Weights and the fp32 gradient buffer stay whole per
#   TP/PP slice; DP sharding makes the optimizer state almost free. Layouts (a) and (b) fit
#   an H100 by about 2 GiB, layout (c) does not without one of the savings listed above.
# * **TP** dominates traffic and latency, so it stays inside the server.
# * **CP** buys long context with modest traffic thanks to GQA, but the gathered keys and
#   values cost memory.
# * **PP** is cheap in bytes and costs idle time.
# * **DP** sends the model state once per step, and that traffic can overlap with compute.

# %% [markdown]
# ## Summary
#
# * PyTorch's own engine (DeviceMesh, DTensor, FSDP2, pipelining, context parallel) gives the
#   same loss curve and gradients as one process in float64, and the same program scales to
#   many GPUs with `torchrun`.
# * Arithmetic on the published layouts shows why Llama 3 trains 405B parameters on 16K
#   GPUs the way it does: TP inside a server, where the bandwidth is, and the bytes of each
#   GPU kept under its 80 GB.
#
# Not measured here: runs on several GPUs. The multi-GPU checks of `lrn_lib.train`
# (`tests/test_train.py`, marked `gpu`) and the scaling runs wait for a machine with two or
# more GPUs.

# %% [markdown]
# ## Exercises
#
# *Derive* on paper, *measure* with this chapter's code. Worked solutions:
# `chapters/solutions/10_torch_engine_solutions.ipynb`.
#
# **Exercise 1 (measure): how much does tensor parallelism buy?** Start from layout (a) of
# `LLAMA3_TABLE4` (8,192 GPUs, $TP = 8$) and change $TP$ to 2 and 4, keeping the number of GPUs
# and the tokens per step fixed (adjust `dp` and `batch_per_dp`). For each layout print the
# busiest stage's memory per GPU by part (`memory_per_gpu`) and each dimension's traffic
# (`communication_per_step`). Which layouts fit in an 80 GB H100? Then try $TP = 16$: why
# does `check_layout` refuse it? Look for: memory falling roughly as $1/TP$, TP traffic per GPU
# rising, and the refusal naming the 8 key/value heads.
