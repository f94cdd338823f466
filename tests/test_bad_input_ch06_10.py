"""Bad input to the public functions of chapters 06-10 (Llama 3 and its parallelism) gets a clear TypeError/ValueError naming the argument.

The parallel layers and collectives need a process group: the calls run in a gloo group of one
process (as tests/test_tensor_parallel.py does), and every spawn worker is called directly, so
its argument checks must fire before it builds a mesh or spawns anything.
"""
import argparse

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bad_input import assert_clear_error, cases
from kernels.flash_decoding import decode_config, decode_splits, flash_decode, is_decoding_step
from lrn_lib.accounting import (LLAMA3_TABLE4, Layout, PublishedRun, all_gather_bytes, all_reduce_bytes,
                                block_matrix_parameters, busiest_stage, check_layout, communication_per_step,
                                flops_per_token, implied_step_seconds, memory_per_gpu, params_per_gpu,
                                saved_activations, stage_layers)
from lrn_lib.llama import (Attention, FeedForward, KVCache, Llama, LlamaConfig, RMSNorm, RopeScaling, TransformerBlock,
                           apply_rope, causal_attention, check_config, check_mask, generate, llama_ffn_dim, lm_loss,
                           parameter_count, random_windows, rope_cos_sin, rope_frequencies, sample_next,
                           sdpa_attention, tiny_config, training_flops)
from lrn_lib.llama_transformers import load_transformers_state_dict, transformers_name
from lrn_lib.context_parallel import (GatherSequence, RingAttention, allgather_attention, attention_block_backward,
                                      chunk_ids, context_parallel_loss, cp_attend, gather_sequence, merge_partials,
                                      ring_attention, ring_attention_backward, ring_attention_forward,
                                      shard_positions, shard_sequence, unshard_sequence)
from lrn_lib.context_parallel_checks import attention_check, model_check
from lrn_lib.data_parallel import (GatherStats, ShardedUnit, all_reduce_gradients, backward_global_mean,
                                   gather_full_state, gradient_buckets, persistent_bytes, shard_llama, split_rows,
                                   zero_bytes_per_rank)
from lrn_lib.data_parallel_checks import data_parallel_check, fsdp_check
from lrn_lib.mesh import Mesh, MeshShape, check_group, check_mesh_shape, check_rank
from lrn_lib.mesh_checks import collectives_demo, describe_rank
from lrn_lib.spawn import free_port
from lrn_lib.parallel_4d import four_d_step
from lrn_lib.pipeline_parallel import (Event, LlamaStage, bubble_formula, bubble_fraction, build_stage,
                                       gpipe_schedule, one_f_one_b_schedule, partition_layers, peak_in_flight,
                                       run_pipeline, simulate_schedule)
from lrn_lib.pipeline_parallel_checks import SimulatedCompute, pipeline_check, timeline_worker
from lrn_lib.tensor_parallel import (ColumnParallelLinear, CopyToTP, ReduceFromTP, RowParallelLinear, TPRMSNorm,
                                     VocabParallelCrossEntropy, VocabParallelEmbedding, check_tp_config, copy_to_tp,
                                     gradient_errors, reduce_from_tp, shard_bounds, tensor_parallel_llama,
                                     vocab_parallel_cross_entropy)
from lrn_lib.tensor_parallel_checks import build_tp_llama, dtensor_tp_check, tp_layers_check, tp_llama_check
from lrn_lib.train import (Trainer, build_mesh, check_args, check_worker, data_parallel_mesh, global_batch, main,
                           model_config, parse_args, reference_run, shard_stage, tensor_parallel_plan,
                           train, train_worker)

CFG = tiny_config(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)
torch.manual_seed(0)
MODEL = Llama(CFG)
HD = CFG.head_dim
ACFG = tiny_config()                      # 4 heads, 2 KV heads: splits over tp = 2
LAYOUT = Layout(tp=2, cp=1, pp=1, dp=1, seq_len=16, batch_per_dp=2)
RUN = LLAMA3_TABLE4[0]


def ids(*shape, high=16):
    return torch.randint(0, high, shape)


def config(**overrides):
    fields = dict(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    return LlamaConfig(**{**fields, **overrides})


def layout(**overrides):
    return Layout(**{**dict(tp=1, cp=1, pp=1, dp=1, seq_len=16, batch_per_dp=2), **overrides})


def run(**overrides):
    fields = dict(name="(a)", gpus=8192, layout=RUN.layout, tflops_per_gpu=430.0, mfu=0.43)
    return PublishedRun(**{**fields, **overrides})


def cos_sin(t=4, hd=HD):
    return rope_cos_sin(torch.arange(t), rope_frequencies(tiny_config(dim=2 * hd, n_heads=2, n_kv_heads=1)),
                        torch.float32)


def qkv(t=4, h=2, h_kv=1, d=8, b=1):
    return torch.randn(b, h, t, d), torch.randn(b, h_kv, t, d), torch.randn(b, h_kv, t, d)


def half(tensors):
    return tuple(t.half() for t in tensors)


def partials(n=4):
    return torch.randn(1, 2, n, 8), torch.randn(1, 2, n)


def block_backward(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, do=torch.randn_like(q), lse=torch.randn(1, 2, 4), delta=torch.randn(1, 2, 4),
                causal=False, scale=0.3)
    return attention_block_backward(**{**args, **overrides})


def ring_backward(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, o=torch.randn_like(q), lse=torch.randn(1, 2, 4), do=torch.randn_like(q),
                causal=True, scale=0.3, group=None, balanced=True)
    return ring_attention_backward(**{**args, **overrides})


ATTENTION_CONFIG = dict(variant="ring", causal=True, balanced=True, batch=1, heads=2, kv_heads=1, seq_len=8,
                        head_dim=4, seed=0)
STAGE = build_stage(Llama(CFG), 0, 1)
BASE_ARGS = parse_args(["--device", "cpu"])


def flags(**overrides):
    return argparse.Namespace(**{**vars(BASE_ARGS), **overrides})


def pipeline(**overrides):
    args = dict(module=nn.Linear(4, 4), schedule="gpipe", num_microbatches=2, activation_shape=(1, 4),
                inputs=torch.randn(2, 4), targets=torch.zeros(2, 4), loss_fn=torch.nn.functional.mse_loss)
    return run_pipeline(**{**args, **overrides})


def trained_linear():
    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    return layer


def one_pair():
    return [(ids(1, 2), ids(1, 2))]


def cache_update(k=None, v=None, layer=0, start=0):
    cache = KVCache(CFG, 1, 8, torch.float32)
    k = torch.zeros(1, 1, 2, HD) if k is None else k
    return cache.update(layer, start, k, k.clone() if v is None else v)


BAD_CALLS = {
    # ------------------------------------------------------------------ lrn_lib.llama
    "lrn_lib.llama.RopeScaling": [
        ("factor", lambda: RopeScaling(factor=0.0)),
        ("high_freq_factor", lambda: RopeScaling(low_freq_factor=4.0, high_freq_factor=4.0)),   # divides by 0
        ("original_max_seq_len", lambda: RopeScaling(original_max_seq_len=0)),
    ],
    "lrn_lib.llama.LlamaConfig": [
        ("n_kv_heads", lambda: config(n_kv_heads=0)),                                 # was ZeroDivisionError
        ("n_heads", lambda: config(n_heads=0)),
        ("vocab_size", lambda: config(vocab_size=-5)),
        ("top_k", lambda: config(n_experts=2, top_k=3)),
    ],
    "lrn_lib.llama.check_config": [
        ("cfg", lambda: check_config({"dim": 16})),
    ],
    "lrn_lib.llama.llama_ffn_dim": [
        ("multiple_of", lambda: llama_ffn_dim(4096, 1.3, 0)),                           # was ZeroDivisionError
        ("ffn_dim_multiplier", lambda: llama_ffn_dim(4096, -1.3, 1024)),
        ("dim", lambda: llama_ffn_dim(4096.0, 1.3, 1024)),
    ],
    "lrn_lib.llama.tiny_config": [
        ("n_layer", lambda: tiny_config(n_layer=3)),                                  # a misspelt field
        ("n_kv_heads", lambda: tiny_config(n_kv_heads=0)),
        ("max_seq_len", lambda: tiny_config(max_seq_len=0)),
    ],
    "lrn_lib.llama.parameter_count": [
        ("cfg", lambda: parameter_count("llama-8b")),
    ],
    "lrn_lib.llama.training_flops": [
        ("n_params", lambda: training_flops(-1e9, 1e12)),
        ("n_tokens", lambda: training_flops(1e9, float("nan"))),
    ],
    "lrn_lib.llama.RMSNorm": [
        ("dim", lambda: RMSNorm(0)),
        ("eps", lambda: RMSNorm(8, eps=-1e-5)),
        ("x", lambda: RMSNorm(8)(torch.randn(2, 6))),                                 # wrong last dim
        ("x", lambda: RMSNorm(8)(torch.ones(2, 8, dtype=torch.int64))),
    ],
    "lrn_lib.llama.rope_frequencies": [
        ("cfg", lambda: rope_frequencies(None)),
    ],
    "lrn_lib.llama.rope_cos_sin": [
        ("positions", lambda: rope_cos_sin(torch.zeros(2, 3, dtype=torch.long), torch.ones(4), torch.float32)),
        ("omega", lambda: rope_cos_sin(torch.arange(3), torch.ones(4, dtype=torch.long), torch.float32)),
        ("dtype", lambda: rope_cos_sin(torch.arange(3), torch.ones(4), torch.int64)),
    ],
    "lrn_lib.llama.apply_rope": [
        ("x", lambda: apply_rope(torch.randn(1, 2, 4, 7), *cos_sin(4, 8))),           # odd head dim
        ("cos", lambda: apply_rope(torch.randn(1, 2, 5, HD), *cos_sin(4))),           # T mismatch
        ("x", lambda: apply_rope(torch.randn(HD), *cos_sin(1))),                       # 1-D
    ],
    "lrn_lib.llama.causal_attention": [
        ("q", lambda: causal_attention(torch.randn(1, 2, 4), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))),
        ("k", lambda: causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6))),
    ],
    "kernels.flash_decoding.decode_config": [
        ("head_dim", lambda: decode_config(0, 4)),
        ("rows", lambda: decode_config(128, 0)),
        ("rows", lambda: decode_config(128, 4.0)),
    ],
    "kernels.flash_decoding.decode_splits": [
        ("programs", lambda: decode_splits(0, 1024, 64, 132)),
        ("n_keys", lambda: decode_splits(8, -1, 64, 132)),
        ("block_n", lambda: decode_splits(8, 1024, None, 132)),
        ("n_sm", lambda: decode_splits(8, 1024, 64, 0)),
    ],
    "kernels.flash_decoding.flash_decode": [
        ("q", lambda: flash_decode(*qkv())),
        ("k/v", lambda: flash_decode(*half(qkv(h=3, h_kv=2)))),
        ("n_splits", lambda: flash_decode(*half(qkv()), n_splits=0)),
        ("n_splits", lambda: flash_decode(*half(qkv()), n_splits=2.5)),
        ("n_splits", lambda: flash_decode(*half(qkv()), n_splits=1000)),
        ("scale", lambda: flash_decode(*half(qkv()), scale=float("nan"))),
        ("causal", lambda: flash_decode(*half(qkv()), causal="yes")),
    ],
    "kernels.flash_decoding.is_decoding_step": [
        ("q", lambda: is_decoding_step(torch.randn(2, 4, 8), *qkv()[1:])),
        ("k", lambda: is_decoding_step(qkv()[0], [[1.0]], qkv()[2])),
    ],
    "lrn_lib.llama.sdpa_attention": [
        ("q", lambda: sdpa_attention(torch.randn(2, 4, 8), *qkv()[1:])),
        ("k", lambda: sdpa_attention(*qkv()[:1], *qkv(t=6)[1:])),           # causal needs queries = keys
        ("mask", lambda: sdpa_attention(*qkv(), mask=torch.ones(1, 1, 4, 4))),              # not bool
        ("mask", lambda: sdpa_attention(*qkv(), mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))),
        ("mask", lambda: sdpa_attention(*qkv(), mask=torch.ones(4, 4, dtype=torch.bool))),   # 2-D
    ],
    "lrn_lib.llama.check_mask": [
        ("mask", lambda: check_mask("mask", *qkv()[:2])),
        ("mask", lambda: check_mask(torch.ones(2, 1, 4, 4, dtype=torch.bool), *qkv()[:2])),  # batch 2 vs 1
        ("mask", lambda: check_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool), *qkv()[:2])),  # one per head
    ],
    "lrn_lib.llama.KVCache": [
        ("cfg", lambda: KVCache("cfg", 1, 8, torch.float32)),
        ("max_len", lambda: KVCache(CFG, 1, 0, torch.float32)),
        ("layer", lambda: cache_update(layer=1)),                                      # CFG has one layer
        ("k", lambda: cache_update(k=torch.zeros(1, 2, 2, HD))),                        # Hkv mismatch
    ],
    "lrn_lib.llama.Attention": [
        ("cfg", lambda: Attention({"dim": 16})),
        ("x", lambda: Attention(CFG)(torch.randn(1, 4, 8), *cos_sin(4))),               # wrong width
        ("x", lambda: Attention(CFG)(torch.randn(4, 16), *cos_sin(4))),                 # 2-D
    ],
    "lrn_lib.llama.FeedForward": [
        ("ffn_dim", lambda: FeedForward(16, 0)),
        ("x", lambda: FeedForward(16, 32)(torch.randn(2, 8))),
    ],
    "lrn_lib.llama.TransformerBlock": [
        ("cfg", lambda: TransformerBlock(None)),
        ("x", lambda: TransformerBlock(CFG)(torch.randn(1, 4, 8), *cos_sin(4))),
    ],
    "lrn_lib.llama.Llama": [
        ("tokens", lambda: MODEL(ids(2, 5, high=100) + 16)),                           # ids >= vocab_size
        ("tokens", lambda: MODEL(ids(2, 0))),                                          # empty
        ("max_seq_len", lambda: MODEL(ids(1, 17))),                                    # longer than max_seq_len
        ("positions", lambda: MODEL(ids(1, 4), torch.arange(4) + 14)),                 # past max_seq_len
    ],
    "lrn_lib.llama.lm_loss": [
        ("targets", lambda: lm_loss(torch.randn(2, 5, 16), ids(2, 4))),                 # shape mismatch
        ("targets", lambda: lm_loss(torch.randn(2, 5, 16), ids(2, 5) + 16)),            # id >= V
        ("logits", lambda: lm_loss(torch.ones(2, 5, 16, dtype=torch.long), ids(2, 5))),
    ],
    "lrn_lib.llama_transformers.transformers_name": [
        ("name", lambda: transformers_name("layers.0.attention.wz.weight")),
        ("name", lambda: transformers_name(3)),
    ],
    "lrn_lib.llama_transformers.load_transformers_state_dict": [
        ("model", lambda: load_transformers_state_dict(torch.nn.Linear(2, 2), {})),
        ("state_dict", lambda: load_transformers_state_dict(MODEL, [("lm_head.weight", torch.zeros(1))])),
    ],
    "lrn_lib.llama.sample_next": [
        ("temperature", lambda: sample_next(torch.randn(2, 16), temperature=-1.0)),
        ("top_p", lambda: sample_next(torch.randn(2, 16), 1.0, top_p=1.5)),
        ("logits", lambda: sample_next(torch.randn(16))),                              # 1-D
        ("generator", lambda: sample_next(torch.randn(2, 16), 1.0, generator=0)),
    ],
    "lrn_lib.llama.generate": [
        ("max_new_tokens", lambda: generate(MODEL, ids(1, 3), -1)),                    # negative
        ("prompt", lambda: generate(MODEL, ids(1, 3) + 16, 2)),                          # outside the vocabulary
        ("max_seq_len", lambda: generate(MODEL, ids(1, 10), 8)),                       # runs past max_seq_len
        ("temperature", lambda: generate(MODEL, ids(1, 3), 2, temperature=-0.5)),
    ],
    "lrn_lib.llama.random_windows": [
        ("data", lambda: random_windows(torch.arange(5), 2, 8, torch.Generator())),    # shorter than a window
        ("seq", lambda: random_windows(torch.arange(50), 2, 0, torch.Generator())),
        ("batch", lambda: random_windows(torch.arange(50), -1, 8, torch.Generator())),
        ("data", lambda: random_windows(torch.rand(50), 2, 8, torch.Generator())),      # float data
    ],
    # ------------------------------------------------------------------ lrn_lib.mesh
    "lrn_lib.mesh.check_rank": [
        ("rank", lambda: check_rank(2, 2)),
        ("world", lambda: check_rank(0, 0)),
    ],
    "lrn_lib.mesh.MeshShape": [
        ("tp", lambda: MeshShape(tp=0)),
        ("cp", lambda: MeshShape(cp=2.0)),
        ("rank", lambda: MeshShape(2, 2).coordinates(4)),
        ("dims", lambda: MeshShape(2, 2).groups("tp", "tp")),
    ],
    "lrn_lib.mesh.Mesh": [
        ("shape", lambda: Mesh((2, 2, 1, 1))),
    ],
    "lrn_lib.mesh_checks.describe_rank": [
        ("rank", lambda: describe_rank(4, 4, MeshShape(tp=2, dp=2))),
        ("shape", lambda: describe_rank(0, 4, MeshShape(tp=2))),                       # 2 ranks, not 4
    ],
    "lrn_lib.mesh_checks.collectives_demo": [
        ("rank", lambda: collectives_demo(-1, 2)),
        ("world", lambda: collectives_demo(0, 0)),
    ],
    # ------------------------------------------------------------------ lrn_lib.accounting
    "lrn_lib.accounting.Layout": [
        ("tp", lambda: layout(tp=0)),
        ("micro_batch", lambda: layout(batch_per_dp=3, micro_batch=2)),
        ("seq_len", lambda: layout(seq_len=16.0)),
        ("cp", lambda: layout(cp=3)),
    ],
    "lrn_lib.accounting.PublishedRun": [
        ("layout", lambda: run(layout=(8, 1, 16, 64))),
        ("mfu", lambda: run(mfu=43.0)),
        ("gpus", lambda: run(gpus=0)),
    ],
    "lrn_lib.accounting.stage_layers": [
        ("pp", lambda: stage_layers(126, 0)),
        ("pp", lambda: stage_layers(2, 4)),
        ("n_layers", lambda: stage_layers(-1, 1)),
    ],
    "lrn_lib.accounting.check_layout": [
        ("n_heads", lambda: check_layout(ACFG, layout(tp=3))),                           # tp does not divide
        ("layout", lambda: check_layout(ACFG, dict(tp=1))),
        ("cfg", lambda: check_layout("405B", LAYOUT)),
    ],
    "lrn_lib.accounting.block_matrix_parameters": [
        ("cfg", lambda: block_matrix_parameters(None)),
    ],
    "lrn_lib.accounting.params_per_gpu": [
        ("stage", lambda: params_per_gpu(ACFG, LAYOUT, 1)),
        ("stage", lambda: params_per_gpu(ACFG, LAYOUT, -1)),
    ],
    "lrn_lib.accounting.saved_activations": [
        ("cfg", lambda: saved_activations({"dim": 16})),
    ],
    "lrn_lib.accounting.memory_per_gpu": [
        ("stage", lambda: memory_per_gpu(ACFG, LAYOUT, 3)),
        ("layout", lambda: memory_per_gpu(ACFG, None, 0)),
    ],
    "lrn_lib.accounting.busiest_stage": [
        ("layout", lambda: busiest_stage(ACFG, "tp=2")),
        ("n_heads", lambda: busiest_stage(ACFG, layout(tp=3))),
    ],
    "lrn_lib.accounting.all_gather_bytes": [
        ("n", lambda: all_gather_bytes(1e9, 0)),                                       # was ZeroDivisionError
        ("size", lambda: all_gather_bytes(-1.0, 8)),
    ],
    "lrn_lib.accounting.all_reduce_bytes": [
        ("n", lambda: all_reduce_bytes(1e9, -8)),
        ("size", lambda: all_reduce_bytes("1 GB", 8)),
    ],
    "lrn_lib.accounting.communication_per_step": [
        ("stage", lambda: communication_per_step(ACFG, LAYOUT, 2)),
        ("cfg", lambda: communication_per_step(None, LAYOUT, 0)),
    ],
    "lrn_lib.accounting.flops_per_token": [
        ("seq_len", lambda: flops_per_token(ACFG, 0)),
        ("attention", lambda: flops_per_token(ACFG, 16, attention="yes")),
        ("cfg", lambda: flops_per_token("cfg", 16)),
    ],
    "lrn_lib.accounting.implied_step_seconds": [
        ("run", lambda: implied_step_seconds(ACFG, RUN.layout)),
        ("cfg", lambda: implied_step_seconds(None, RUN)),
    ],
}

BAD_CALLS.update({
    "lrn_lib.mesh.check_group": [
        ("group", lambda: check_group("world")),
    ],
    "lrn_lib.mesh.check_mesh_shape": [
        ("shape", lambda: check_mesh_shape((2, 1, 1, 1), 2)),
        ("world", lambda: check_mesh_shape(MeshShape(tp=2), 4)),
    ],
    # ------------------------------------------------------------------ lrn_lib.tensor_parallel
    "lrn_lib.tensor_parallel.shard_bounds": [
        ("size", lambda: shard_bounds(3, 0, 4)),                                       # a rank would get no row
        ("rank", lambda: shard_bounds(8, 2, 2)),
        ("world", lambda: shard_bounds(8, 0, 0)),
        ("size", lambda: shard_bounds(8.0, 0, 2)),
    ],
    "lrn_lib.tensor_parallel.CopyToTP": [
        ("x", lambda: CopyToTP.apply([1.0, 2.0], None)),
        ("group", lambda: CopyToTP.apply(torch.ones(2), "tp")),
    ],
    "lrn_lib.tensor_parallel.ReduceFromTP": [
        ("x", lambda: ReduceFromTP.apply("x", None)),
        ("group", lambda: ReduceFromTP.apply(torch.ones(2), 0)),
    ],
    "lrn_lib.tensor_parallel.copy_to_tp": [
        ("x", lambda: copy_to_tp(3.0)),
        ("group", lambda: copy_to_tp(torch.ones(2), group="all")),
    ],
    "lrn_lib.tensor_parallel.reduce_from_tp": [
        ("x", lambda: reduce_from_tp([1.0])),
        ("group", lambda: reduce_from_tp(torch.ones(2), group=1)),
    ],
    "lrn_lib.tensor_parallel.ColumnParallelLinear": [
        ("linear", lambda: ColumnParallelLinear(nn.Conv1d(2, 2, 1))),
        ("x", lambda: ColumnParallelLinear(nn.Linear(4, 6))(torch.randn(2, 5))),       # wrong in_features
        ("copy_input", lambda: ColumnParallelLinear(nn.Linear(4, 6), copy_input="yes")),
        ("group", lambda: ColumnParallelLinear(nn.Linear(4, 6), group="tp")),
    ],
    "lrn_lib.tensor_parallel.RowParallelLinear": [
        ("linear", lambda: RowParallelLinear(nn.Embedding(4, 2))),
        ("x", lambda: RowParallelLinear(nn.Linear(6, 3))(torch.randn(2, 5))),
        ("x", lambda: RowParallelLinear(nn.Linear(6, 3))(torch.ones(2, 6, dtype=torch.long))),
    ],
    "lrn_lib.tensor_parallel.VocabParallelEmbedding": [
        ("embedding", lambda: VocabParallelEmbedding(nn.Linear(2, 2))),
        ("tokens", lambda: VocabParallelEmbedding(nn.Embedding(16, 4))(ids(2, 3) + 16)),  # was a silent zero row
        ("tokens", lambda: VocabParallelEmbedding(nn.Embedding(16, 4))(torch.zeros(2, dtype=torch.int32))),
    ],
    "lrn_lib.tensor_parallel.VocabParallelCrossEntropy": [
        ("logits", lambda: VocabParallelCrossEntropy.apply(torch.randn(4), ids(4), 0, None)),
        ("targets", lambda: VocabParallelCrossEntropy.apply(torch.randn(4, 16), ids(3), 0, None)),
        ("start", lambda: VocabParallelCrossEntropy.apply(torch.randn(4, 16), ids(4), -1, None)),
    ],
    "lrn_lib.tensor_parallel.vocab_parallel_cross_entropy": [
        ("targets", lambda: vocab_parallel_cross_entropy(torch.randn(2, 3, 16), ids(2, 3) + 16, 16)),
        ("targets", lambda: vocab_parallel_cross_entropy(torch.randn(2, 3, 16), ids(2, 0), 16)),   # empty: mean nan
        ("local_logits", lambda: vocab_parallel_cross_entropy(torch.ones(2, 3, 16, dtype=torch.long), ids(2, 3), 16)),
        ("vocab_size", lambda: vocab_parallel_cross_entropy(torch.randn(2, 3, 16), ids(2, 3), 17)),
    ],
    "lrn_lib.tensor_parallel_checks.tp_layers_check": [
        ("rank", lambda: tp_layers_check(1, 1)),
        ("vocab_size", lambda: tp_layers_check(0, 1, vocab_size=0)),
        ("hidden", lambda: tp_layers_check(0, 2, hidden=1)),
    ],
    "lrn_lib.tensor_parallel.TPRMSNorm": [
        ("norm", lambda: TPRMSNorm(nn.LayerNorm(4))),
        ("group", lambda: TPRMSNorm(RMSNorm(4), group="tp")),
    ],
    "lrn_lib.tensor_parallel.check_tp_config": [
        ("tp", lambda: check_tp_config(CFG, 0)),
        ("n_kv_heads", lambda: check_tp_config(CFG, 2)),
        ("cfg", lambda: check_tp_config("cfg", 1)),
    ],
    "lrn_lib.tensor_parallel.tensor_parallel_llama": [
        ("model", lambda: tensor_parallel_llama(nn.Linear(2, 2))),
        ("group", lambda: tensor_parallel_llama(MODEL, group="world")),
    ],
    "lrn_lib.tensor_parallel.gradient_errors": [
        ("full_model", lambda: gradient_errors(nn.Linear(2, 2), "full")),
        ("tp_model", lambda: gradient_errors(nn.Linear(2, 2), nn.Linear(2, 2))),      # no backward yet
        ("full_model", lambda: gradient_errors(trained_linear(), nn.Sequential(nn.Linear(2, 2)))),   # other names
    ],
    "lrn_lib.tensor_parallel_checks.tp_llama_check": [
        ("rank", lambda: tp_llama_check(2, 2, CFG)),
        ("tp", lambda: tp_llama_check(0, 4, CFG, tp=3)),
        ("cfg", lambda: tp_llama_check(0, 1, "cfg")),
        ("batch", lambda: tp_llama_check(0, 1, CFG, batch=0)),
    ],
    "lrn_lib.tensor_parallel_checks.dtensor_tp_check": [
        ("rank", lambda: dtensor_tp_check(3, 2, CFG)),
        ("cfg", lambda: dtensor_tp_check(0, 1, None)),
        ("seq", lambda: dtensor_tp_check(0, 1, CFG, seq=0)),
    ],
    "lrn_lib.tensor_parallel_checks.build_tp_llama": [
        ("seeds", lambda: build_tp_llama(0, 2, CFG, [0])),
        ("cfg", lambda: build_tp_llama(0, 1, "cfg", [0])),
        ("rank", lambda: build_tp_llama(-1, 1, CFG, [0])),
    ],
    # ------------------------------------------------------------------ lrn_lib.context_parallel
    "lrn_lib.context_parallel.chunk_ids": [
        ("rank", lambda: chunk_ids(2, 2)),
        ("cp", lambda: chunk_ids(0, 0)),
    ],
    "lrn_lib.context_parallel.shard_sequence": [
        ("x", lambda: shard_sequence(torch.randn(2, 10, 3), 0, 3)),                     # 10 is not 6 chunks
        ("dim", lambda: shard_sequence(torch.randn(2, 12, 3), 0, 1, dim=3)),
        ("x", lambda: shard_sequence([1, 2, 3, 4], 0, 1)),
        ("cp", lambda: shard_sequence(torch.randn(2, 12, 3), 0, -2)),
    ],
    "lrn_lib.context_parallel.unshard_sequence": [
        ("shards", lambda: unshard_sequence([])),
        ("shards", lambda: unshard_sequence([torch.zeros(1, 4), torch.zeros(1, 6)])),
        ("shards", lambda: unshard_sequence(torch.zeros(2, 4))),
    ],
    "lrn_lib.context_parallel.shard_positions": [
        ("seq_len", lambda: shard_positions(0, 0, 1)),
        ("seq_len", lambda: shard_positions(10, 0, 3)),
        ("cp", lambda: shard_positions(8, 0, "2")),
    ],
    "lrn_lib.context_parallel.merge_partials": [
        ("o_b", lambda: merge_partials(*partials(), torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4))),
        ("lse", lambda: merge_partials(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3), *partials())),
        ("o", lambda: merge_partials(torch.randn(2, 4, 8), torch.randn(2, 4), torch.randn(2, 4, 8), torch.randn(2, 4))),
    ],
    "lrn_lib.context_parallel.ring_attention_forward": [
        ("scale", lambda: ring_attention_forward(*qkv(), True, -1.0, None, True)),
        ("k", lambda: ring_attention_forward(*qkv()[:1], *qkv(t=6)[1:], True, 0.3, None, True)),
        ("q", lambda: ring_attention_forward(*qkv(t=5), True, 0.3, None, True)),        # odd for balanced
    ],
    "lrn_lib.context_parallel.attention_block_backward": [
        ("do", lambda: block_backward(do=torch.randn(1, 2, 3, 8))),
        ("delta", lambda: block_backward(delta=torch.randn(1, 2))),
        ("scale", lambda: block_backward(scale=0.0)),
    ],
    "lrn_lib.context_parallel.ring_attention_backward": [
        ("o", lambda: ring_backward(o=torch.randn(1, 2, 4, 7))),
        ("lse", lambda: ring_backward(lse=torch.randn(1, 2, 3))),
        ("scale", lambda: ring_backward(scale=float("inf"))),
    ],
    "lrn_lib.context_parallel.RingAttention": [
        ("q", lambda: RingAttention.apply(torch.randn(2, 4, 8), *qkv()[1:], False, 0.3, None, True)),
        ("group", lambda: RingAttention.apply(*qkv(), False, 0.3, "cp", True)),
    ],
    "lrn_lib.context_parallel.ring_attention": [
        ("scale", lambda: ring_attention(*qkv(), scale=0)),
        ("k", lambda: ring_attention(*qkv()[:1], *qkv(t=8)[1:])),
        ("group", lambda: ring_attention(*qkv(), group="cp")),
        ("q", lambda: ring_attention(*qkv(h=3, h_kv=2))),                                # kv heads do not divide
    ],
    "lrn_lib.context_parallel.GatherSequence": [
        ("x", lambda: GatherSequence.apply("x", None, 1, True)),
        ("dim", lambda: GatherSequence.apply(torch.randn(2, 4), None, 5, True)),
    ],
    "lrn_lib.context_parallel.gather_sequence": [
        ("x", lambda: gather_sequence([1, 2])),
        ("dim", lambda: gather_sequence(torch.randn(2, 4), dim=2)),
        ("group", lambda: gather_sequence(torch.randn(2, 4), group=1)),
    ],
    "lrn_lib.context_parallel.allgather_attention": [
        ("scale", lambda: allgather_attention(*qkv(), scale=-1.0)),
        ("q", lambda: allgather_attention(*qkv(t=5))),
        ("causal", lambda: allgather_attention(*qkv(), causal="yes")),
    ],
    "lrn_lib.context_parallel_checks.attention_check": [
        ("rank", lambda: attention_check(1, 1, [ATTENTION_CONFIG])),
        ("configs", lambda: attention_check(0, 1, [])),
        ("variant", lambda: attention_check(0, 1, [{**ATTENTION_CONFIG, "variant": "zigzag"}])),
        ("cp_groups", lambda: attention_check(0, 2, [ATTENTION_CONFIG], cp_groups=[[0]])),
    ],
    "lrn_lib.context_parallel.context_parallel_loss": [
        ("targets", lambda: context_parallel_loss(torch.zeros(2, 4, 5), ids(2, 3, high=5))),   # shape mismatch
        ("targets", lambda: context_parallel_loss(torch.zeros(2, 4, 5), ids(2, 4, high=5) + 5)),  # id >= V
        ("logits", lambda: context_parallel_loss(torch.zeros(2, 4, 5, dtype=torch.long), ids(2, 4, high=5))),
        ("ignore_index", lambda: context_parallel_loss(torch.zeros(2, 4, 5), ids(2, 4, high=5), ignore_index=0.5)),
    ],
    "lrn_lib.context_parallel.cp_attend": [
        ("variant", lambda: cp_attend("zigzag")),
        ("group", lambda: cp_attend("ring", group="cp")),
    ],
    "lrn_lib.context_parallel_checks.model_check": [
        ("configs", lambda: model_check(0, 1, [])),
        ("configs", lambda: model_check(0, 1, [{"variant": "ring"}])),                   # keys missing
        ("rank", lambda: model_check(-1, 1, [{"variant": "ring"}])),
    ],
    # ------------------------------------------------------------------ lrn_lib.pipeline_parallel
    "lrn_lib.pipeline_parallel.partition_layers": [
        ("n_layers", lambda: partition_layers(3, 4)),                                  # a stage without a layer
        ("num_stages", lambda: partition_layers(4, 0)),
        ("n_layers", lambda: partition_layers(4.0, 2)),
    ],
    "lrn_lib.pipeline_parallel.LlamaStage": [
        ("layers", lambda: LlamaStage(MODEL, [0], first=True, last=True)),
        ("model", lambda: LlamaStage(nn.Linear(2, 2), range(0, 1), first=True, last=True)),
        ("tokens", lambda: LlamaStage(MODEL, range(0, 1), first=True, last=True)(ids(2, 3) + 16)),
        ("x", lambda: LlamaStage(MODEL, range(0, 1), first=False, last=True)(ids(2, 3))),   # tokens to a later stage
    ],
    "lrn_lib.pipeline_parallel.build_stage": [
        ("stage", lambda: build_stage(MODEL, 1, 1)),
        ("model", lambda: build_stage("llama", 0, 1)),
        ("num_stages", lambda: build_stage(MODEL, 0, 0)),
    ],
    "lrn_lib.pipeline_parallel.gpipe_schedule": [
        ("num_microbatches", lambda: gpipe_schedule(2, 1)),
        ("num_stages", lambda: gpipe_schedule(0, 4)),
    ],
    "lrn_lib.pipeline_parallel.one_f_one_b_schedule": [
        ("num_microbatches", lambda: one_f_one_b_schedule(4, 2)),
        ("num_stages", lambda: one_f_one_b_schedule(2.0, 4)),
    ],
    "lrn_lib.pipeline_parallel.simulate_schedule": [
        ("schedule", lambda: simulate_schedule([])),
        ("schedule", lambda: simulate_schedule([[("W", 0)]])),
        ("forward_time", lambda: simulate_schedule(gpipe_schedule(2, 2), forward_time=0)),
        ("backward_time", lambda: simulate_schedule(gpipe_schedule(2, 2), backward_time=-1)),
    ],
    "lrn_lib.pipeline_parallel.bubble_fraction": [
        ("timeline", lambda: bubble_fraction([])),
        ("timeline", lambda: bubble_fraction([[("F", 0, 0, 1)]])),                      # not Events
        ("timeline", lambda: bubble_fraction([[Event("F", 0, 0, 0)]])),                 # was ZeroDivisionError
    ],
    "lrn_lib.pipeline_parallel.bubble_formula": [
        ("num_microbatches", lambda: bubble_formula(2, 1)),
        ("num_stages", lambda: bubble_formula(0, 2)),
    ],
    "lrn_lib.pipeline_parallel.peak_in_flight": [
        ("schedule", lambda: peak_in_flight([[("X", 0)]])),
        ("schedule", lambda: peak_in_flight("FB")),
    ],
    "lrn_lib.pipeline_parallel.run_pipeline": [
        ("schedule", lambda: pipeline(schedule="zero-bubble")),
        ("num_microbatches", lambda: pipeline(num_microbatches=0)),
        ("activation_shape", lambda: pipeline(activation_shape=(2, -3))),
        ("module", lambda: pipeline(module="stage")),
    ],
    "lrn_lib.pipeline_parallel_checks.pipeline_check": [
        ("dp", lambda: pipeline_check(0, 2, dp=3)),
        ("microbatch_counts", lambda: pipeline_check(0, 1, microbatch_counts=())),
        ("microbatch_counts", lambda: pipeline_check(0, 1, microbatch_counts=(3,))),    # 3 does not divide 20
        ("rank", lambda: pipeline_check(1, 1)),
    ],
    "lrn_lib.pipeline_parallel_checks.SimulatedCompute": [
        ("forward_seconds", lambda: SimulatedCompute(-1.0, 0.0)),
        ("backward_seconds", lambda: SimulatedCompute(0.0, float("nan"))),
        ("x", lambda: SimulatedCompute(0.0, 0.0)([1.0])),
    ],
    "lrn_lib.pipeline_parallel_checks.timeline_worker": [
        ("num_microbatches", lambda: timeline_worker(0, 2, 1, 0.1)),
        ("forward_seconds", lambda: timeline_worker(0, 1, 1, -0.1)),
        ("rank", lambda: timeline_worker(2, 2, 4, 0.1)),
    ],
    # ------------------------------------------------------------------ lrn_lib.data_parallel
    "lrn_lib.data_parallel.split_rows": [
        ("x", lambda: split_rows(torch.zeros(2, 3), 0, 3)),                            # fewer rows than ranks
        ("rank", lambda: split_rows(torch.zeros(4, 3), 3, 3)),
        ("x", lambda: split_rows([[1, 2], [3, 4]], 0, 1)),
        ("x", lambda: split_rows(torch.tensor(1.0), 0, 1)),
    ],
    "lrn_lib.data_parallel.backward_global_mean": [
        ("sync", lambda: backward_global_mean(lm_loss, one_pair(), sync="avg")),
        ("micro_batches", lambda: backward_global_mean(lm_loss, [])),
        ("loss_fn", lambda: backward_global_mean("lm_loss", one_pair())),
        ("micro_batches", lambda: backward_global_mean(lm_loss, [ids(1, 2)])),           # not (inputs, targets)
    ],
    "lrn_lib.data_parallel.gradient_buckets": [
        ("bucket_bytes", lambda: gradient_buckets([torch.zeros(3)], 0)),
        ("grads", lambda: gradient_buckets("abc", 8)),
        ("bucket_bytes", lambda: gradient_buckets([torch.zeros(3)], 1.5)),
    ],
    "lrn_lib.data_parallel.all_reduce_gradients": [
        ("module", lambda: all_reduce_gradients("model")),
        ("bucket_bytes", lambda: all_reduce_gradients(nn.Linear(2, 2), bucket_bytes=0)),
        ("group", lambda: all_reduce_gradients(nn.Linear(2, 2), group="dp")),
    ],
    "lrn_lib.data_parallel_checks.data_parallel_check": [
        ("batch", lambda: data_parallel_check(0, 2, CFG, 1, 8, 1)),                     # fewer rows than ranks
        ("micro_steps", lambda: data_parallel_check(0, 1, CFG, 4, 8, 5)),
        ("seq", lambda: data_parallel_check(0, 1, CFG, 4, 32, 1)),                      # past max_seq_len
        ("cfg", lambda: data_parallel_check(0, 1, "cfg", 4, 8, 1)),
    ],
    "lrn_lib.data_parallel.zero_bytes_per_rank": [
        ("stage", lambda: zero_bytes_per_rank(10, 2, 4)),
        ("world", lambda: zero_bytes_per_rank(10, 0, 1)),
        ("n_params", lambda: zero_bytes_per_rank(-10, 2, 1)),
        ("stage", lambda: zero_bytes_per_rank(10, 2, 1.0)),
    ],
    "lrn_lib.data_parallel.GatherStats": [
        ("full", lambda: GatherStats().track([1.0, 2.0])),
    ],
    "lrn_lib.data_parallel.ShardedUnit": [
        ("module", lambda: ShardedUnit(nn.ReLU())),                                    # no parameters
        ("module", lambda: ShardedUnit("layer")),
        ("stats", lambda: ShardedUnit(nn.Linear(2, 2), stats=3)),
        ("reshard_after_forward", lambda: ShardedUnit(nn.Linear(2, 2), reshard_after_forward="no")),
    ],
    "lrn_lib.data_parallel.shard_llama": [
        ("model", lambda: shard_llama(nn.Linear(2, 2))),
        ("stats", lambda: shard_llama(Llama(CFG), stats="stats")),
    ],
    "lrn_lib.data_parallel.gather_full_state": [
        ("model", lambda: gather_full_state("model")),
    ],
    "lrn_lib.data_parallel.persistent_bytes": [
        ("model", lambda: persistent_bytes("model", torch.optim.SGD(MODEL.parameters(), lr=0.1))),
        ("optimizer", lambda: persistent_bytes(MODEL, "adamw")),
    ],
    "lrn_lib.data_parallel_checks.fsdp_check": [
        ("batch", lambda: fsdp_check(0, 2, CFG, 1, 8, 1)),
        ("micro_steps", lambda: fsdp_check(0, 1, CFG, 4, 8, 0)),
        ("steps", lambda: fsdp_check(0, 1, CFG, 4, 8, 1, steps=0)),
    ],
    # ------------------------------------------------------------------ lrn_lib.parallel_4d
    "lrn_lib.parallel_4d.four_d_step": [
        ("batch", lambda: four_d_step(0, 1, MeshShape(), CFG, 3, 8, 2)),
        ("shape", lambda: four_d_step(0, 2, MeshShape(), CFG, 4, 8, 1)),               # a mesh of 1 rank, world 2
        ("shape", lambda: four_d_step(0, 1, (1, 1, 1, 1), CFG, 4, 8, 1)),
        ("microbatches", lambda: four_d_step(0, 2, MeshShape(pp=2), CFG, 4, 8, 1)),     # fewer than stages
    ],
    # ------------------------------------------------------------------ lrn_lib.train
    "lrn_lib.train.build_mesh": [
        ("args", lambda: build_mesh(argparse.Namespace(tp=2))),
        ("args", lambda: build_mesh("--tp 2")),
    ],
    "lrn_lib.train.global_batch": [
        ("step", lambda: global_batch(torch.arange(50), -1, 2, 8, 0)),
        ("data", lambda: global_batch(torch.arange(5), 0, 2, 8, 0)),
        ("seed", lambda: global_batch(torch.arange(50), 0, 2, 8, 1.5)),
    ],
    "lrn_lib.train.tensor_parallel_plan": [
        ("stage", lambda: tensor_parallel_plan(MODEL)),
    ],
    "lrn_lib.train.data_parallel_mesh": [
        ("mesh", lambda: data_parallel_mesh((1, 1, 1, 1))),
    ],
    "lrn_lib.train.shard_stage": [
        ("stage", lambda: shard_stage(MODEL, None)),
        ("mesh", lambda: shard_stage(STAGE, "mesh")),
    ],
    "lrn_lib.train.Trainer": [
        ("mesh", lambda: Trainer(BASE_ARGS, "mesh")),
        ("args", lambda: Trainer({"tp": 1}, None)),
        ("--kv-heads", lambda: Trainer(flags(kv_heads=3), None)),
    ],
    "lrn_lib.train.reference_run": [
        ("--steps", lambda: reference_run(flags(steps=0))),
        ("args", lambda: reference_run(["--steps", "2"])),
    ],
    "lrn_lib.train.check_worker": [
        ("runs", lambda: check_worker(0, 1, "--tp 1")),
        ("runs", lambda: check_worker(0, 1, [["--steps", 2]])),
        ("rank", lambda: check_worker(1, 1, [[]])),
    ],
    "lrn_lib.train.parse_args": [
        ("argv", lambda: parse_args("--tp 2")),
        ("--tp", lambda: parse_args(["--tp", "0"])),
        ("--lr", lambda: parse_args(["--lr", "-1"])),
    ],
    "lrn_lib.train.check_args": [
        ("args", lambda: check_args({"tp": 1})),
        ("--kv-heads", lambda: check_args(flags(kv_heads=3))),
        ("--batch", lambda: check_args(flags(batch=2.5))),
        ("--dtype", lambda: check_args(flags(dtype="float8"))),
    ],
    "lrn_lib.train.model_config": [
        ("args", lambda: model_config(None)),
        ("--heads", lambda: model_config(flags(heads=0))),
    ],
    "lrn_lib.train.train": [
        ("args", lambda: train("--steps 2")),
        ("--seq", lambda: train(flags(seq=-1))),
    ],
    "lrn_lib.train.train_worker": [
        ("rank", lambda: train_worker(2, 2, [])),
        ("argv", lambda: train_worker(0, 1, "--tp 1")),
    ],
    "lrn_lib.train.main": [
        ("argv", lambda: main("--tp 2")),
        ("argv", lambda: main([2])),
    ],
})

NO_BAD_INPUT = {
    "lrn_lib.llama.pydoc_bytes": "takes no arguments: it reads the book's own corpus",
    "lrn_lib.pipeline_parallel.Event": "a NamedTuple of results that simulate_schedule and run_pipeline build; "
                                       "bubble_fraction checks the timelines it is given",
    "lrn_lib.pipeline_parallel.PipelineRun": "a dataclass of results that run_pipeline builds from its own events",
    "lrn_lib.train.stdlib_corpus": "takes no arguments: it reads the book's own corpus",
    "lrn_lib.train.context_parallel_api": "takes no arguments: it imports torch's context_parallel",
    "lrn_lib.train.build_parser": "takes no arguments: it builds the command line's parser",
}


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo group of this one process, for the layers and collectives that ask for their rank."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(world_of_one, argument, call):
    assert_clear_error(argument, call)
