"""Section 7.2: Megatron-style tensor parallelism (f/g operators, column/row-parallel linears, split
attention heads and SwiGLU, vocabulary-parallel embedding and cross-entropy) against the
single-process float64 step, over gloo processes on the CPU, and against PyTorch's DTensor TP."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from lrn_lib.llama import Llama, tiny_config
from lrn_lib.spawn import free_port, spawn
from lrn_lib.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, check_tp_config,
                                     shard_bounds, tensor_parallel_llama, vocab_parallel_cross_entropy)
from lrn_lib.tensor_parallel_checks import build_tp_llama, dtensor_tp_check, tp_layers_check, tp_llama_check

TOL = 1e-10


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo group of this process alone: the parallel classes then hold everything."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def assert_step_equal(results, layers):
    for r in results:
        assert r["loss"] < TOL and r["logits"] < TOL and r["grad"] < TOL
    names = set(results[0]["grads"])
    assert len(names) == 3 + 9 * layers                     # embedding, final norm, head + 9 per block
    for r in results:
        assert all(e < TOL for e in r["grads"].values())


# ------------------------------------------------------------------ no processes

@pytest.mark.parametrize("size,world", [(8, 2), (67, 2), (67, 4), (10, 3), (5, 5)])
def test_shard_bounds_follow_tensor_split_and_cover_every_row(size, world):
    expected = [(int(c[0]), int(c[-1]) + 1) for c in torch.tensor_split(torch.arange(size), world)]
    assert [shard_bounds(size, r, world) for r in range(world)] == expected


@pytest.mark.parametrize("size,rank,world", [(3, 0, 4), (8, 2, 2), (8, -1, 2), (8, 0, 0)])
def test_shard_bounds_rejects_impossible_splits(size, rank, world):
    with pytest.raises(ValueError):
        shard_bounds(size, rank, world)


@pytest.mark.parametrize("overrides,tp,word", [
    ({"n_heads": 4, "n_kv_heads": 2}, 3, "n_heads"),
    ({"n_heads": 8, "n_kv_heads": 2}, 4, "n_kv_heads"),
    ({"n_experts": 4}, 2, "MoE"),
    ({}, 0, "tp"),
])
def test_heads_and_kv_heads_must_divide_by_tp(overrides, tp, word):
    with pytest.raises(ValueError, match=word):
        check_tp_config(tiny_config(**overrides), tp)
    check_tp_config(tiny_config(n_heads=8, n_kv_heads=4), 4)


# ------------------------------------------------------------------ a group of one process

def test_world_of_one_is_the_plain_model(world_of_one):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50)
    model = Llama(cfg).double()
    sharded = tensor_parallel_llama(model)
    tokens = torch.randint(0, 50, (2, 9))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1)).backward()
    vocab_parallel_cross_entropy(sharded(tokens[:, :-1]), tokens[:, 1:], 50).backward()
    assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in model.named_parameters()]
    for (_, p), (_, q) in zip(sharded.named_parameters(), model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=TOL, rtol=0)


def test_parallel_layers_reject_bad_input(world_of_one):
    with pytest.raises(TypeError, match="linear"):
        ColumnParallelLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="linear"):
        RowParallelLinear(nn.Embedding(4, 2))
    with pytest.raises(TypeError, match="embedding"):
        VocabParallelEmbedding(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="padding_idx"):
        VocabParallelEmbedding(nn.Embedding(5, 3, padding_idx=0))
    with pytest.raises(TypeError, match="tokens"):
        VocabParallelEmbedding(nn.Embedding(5, 3))(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="features"):
        RowParallelLinear(nn.Linear(6, 3))(torch.randn(2, 5))
    with pytest.raises(TypeError, match="model"):
        tensor_parallel_llama(nn.Linear(2, 2))


def test_vocab_parallel_cross_entropy_rejects_bad_input(world_of_one):
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    with pytest.raises(TypeError, match="targets"):
        vocab_parallel_cross_entropy(logits, targets.int(), 7)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_cross_entropy(logits, targets[:, :2], 7)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_cross_entropy(logits, targets, 8)
    with pytest.raises(ValueError, match=r"\[0, vocab_size"):
        vocab_parallel_cross_entropy(logits, targets + 7, 7)


# ------------------------------------------------------------------ gloo processes

@pytest.mark.parametrize("world", [2, 3])
def test_parallel_linears_embedding_and_cross_entropy_equal_single_process(world):
    for r in spawn(tp_layers_check, world, 67):             # 67 divides by neither 2 nor 3 (world 4: the Llama tests)
        assert all(err < TOL for err in r.values()), r


def test_tp_llama_step_equals_single_process_world_2_gqa():
    cfg = tiny_config()                                      # 4 query heads, 2 KV heads
    results = spawn(tp_llama_check, 2, cfg)
    assert_step_equal(results, cfg.n_layers)
    assert results[0]["shapes"]["layers.0.attention.wk.weight"] == (cfg.head_dim, cfg.dim)   # one KV head
    activation = 2 * 12 * cfg.dim
    assert results[0]["forward"] == [activation] * (1 + 2 * cfg.n_layers) + [24, 48]
    assert results[0]["backward"] == [activation] * (2 * cfg.n_layers + 1)


def test_tp_llama_step_equals_single_process_world_4_uneven_vocab_and_ffn():
    cfg = tiny_config(n_heads=8, n_kv_heads=4, vocab_size=67, ffn_dim=90, n_layers=1)
    results = spawn(tp_llama_check, 4, cfg, None, 1, 3, 5)
    assert_step_equal(results, cfg.n_layers)
    assert [r["shapes"]["output.weight"][0] for r in results] == [17, 17, 17, 16]
    assert [r["shapes"]["layers.0.feed_forward.w2.weight"][1] for r in results] == [23, 23, 22, 22]


def test_two_tp_groups_of_a_mesh_each_equal_single_process():
    cfg = tiny_config(n_kv_heads=4, vocab_size=61)           # plain multi-head attention
    results = spawn(tp_llama_check, 4, cfg, 2)
    assert_step_equal(results, cfg.n_layers)
    assert [r["shapes"]["tok_embeddings.weight"][0] for r in results] == [31, 30, 31, 30]


def test_matches_pytorch_dtensor_tensor_parallel():
    for r in spawn(dtensor_tp_check, 2, tiny_config(n_layers=1)):
        assert r["loss"] < TOL and r["grad"] < TOL


def test_ranks_with_different_weights_or_indivisible_heads_are_refused():
    assert all("different weights" in m for m in spawn(build_tp_llama, 2, tiny_config(), [0, 1]))
    assert all("n_kv_heads=1" in m for m in spawn(build_tp_llama, 2, tiny_config(n_kv_heads=1), [0, 0]))
