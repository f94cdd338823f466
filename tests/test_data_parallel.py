"""Section 9.2: data parallelism with the global-mean loss rule, bucketed gradient all-reduce,
ZeRO-3 / FSDP from scratch and PyTorch's fully_shard, all checked in float64 against the
single-process step on gloo CPU processes."""
import pytest
import torch
from torch import nn

from lrn_lib.data_parallel import (ShardedUnit, backward_global_mean, gradient_buckets, shard_llama, split_rows,
                                   zero_bytes_per_rank)
from lrn_lib.data_parallel_checks import data_parallel_check, fsdp_check
from lrn_lib.llama import Llama, tiny_config
from lrn_lib.spawn import spawn

# Odd shapes: GQA 5:1, head_dim 10, a 97-token vocabulary; the 50-element norms need padding
# at W = 3 and 4 (every unit has an even size: W = 2 splits evenly).
CFG = tiny_config(dim=50, n_heads=5, n_kv_heads=1, ffn_dim=60, vocab_size=97)
SEQ, MICRO_STEPS = 13, 2
BATCH = {2: 5, 3: 7, 4: 9}            # global batches that split unevenly over the ranks and micro-steps
TOL = 1e-10


@pytest.fixture(scope="module")
def dp_results():
    return {w: spawn(data_parallel_check, w, CFG, BATCH[w], SEQ, MICRO_STEPS) for w in (2, 3)}


@pytest.fixture(scope="module")
def fsdp_results():
    return {w: spawn(fsdp_check, w, CFG, BATCH[w], SEQ, MICRO_STEPS) for w in (2, 3, 4)}


# ------------------------------------------------------------------ pure helpers

def test_split_rows_covers_the_batch_in_near_equal_contiguous_shares():
    x = torch.arange(10)[:, None]
    shares = [split_rows(x, r, 3) for r in range(3)]
    assert [s.shape[0] for s in shares] == [4, 3, 3]
    assert torch.equal(torch.cat(shares), x)


def test_split_rows_rejects_more_ranks_than_rows_and_bad_ranks():
    with pytest.raises(ValueError, match="rows"):
        split_rows(torch.zeros(2, 3), 0, 3)
    with pytest.raises(ValueError, match="rank"):
        split_rows(torch.zeros(4, 3), 3, 3)


def test_gradient_buckets_fill_from_the_last_tensor_within_size_and_dtype():
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(8), torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    buckets = gradient_buckets(grads, bucket_bytes=32)
    assert buckets == [[4], [3], [2], [1, 0]]          # dtype change, 32-byte tensor alone, 16 + 16 bytes
    assert sorted(i for b in buckets for i in b) == list(range(5))
    assert gradient_buckets(grads, bucket_bytes=2**20) == [[4], [3], [2, 1, 0]]


def test_gradient_buckets_rejects_a_non_positive_size():
    with pytest.raises(ValueError, match="bucket_bytes"):
        gradient_buckets([torch.zeros(3)], 0)


def test_zero_formula_reproduces_the_zero_paper_example():
    # ZeRO (arXiv:1910.02054), Figure 1: 7.5B parameters, K = 12, 64 data-parallel ranks.
    gb = [zero_bytes_per_rank(7.5e9, 64, stage)["total"] / 1e9 for stage in range(4)]
    assert gb == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)
    ours = zero_bytes_per_rank(1000, 4, 3, 8, 8, 16)
    assert ours == {"params": 2000, "grads": 2000, "optimizer": 4000, "total": 8000}


def test_zero_formula_rejects_bad_stage_and_world():
    with pytest.raises(ValueError, match="stage"):
        zero_bytes_per_rank(10, 2, 4)
    with pytest.raises(ValueError, match="world"):
        zero_bytes_per_rank(10, 0, 1)


def test_backward_global_mean_rejects_bad_input():
    def loss_fn(x, y):
        return x.sum()

    batch = [(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64))]
    with pytest.raises(ValueError, match="sync"):
        backward_global_mean(loss_fn, batch, sync="avg")
    with pytest.raises(ValueError, match="micro_batches"):
        backward_global_mean(loss_fn, [])
    with pytest.raises(ValueError, match="without tokens"):
        backward_global_mean(loss_fn, batch + [(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64))])


def test_sharded_unit_rejects_modules_it_cannot_shard():
    with pytest.raises(ValueError, match="no parameters"):
        ShardedUnit(nn.ReLU())
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="dtypes"):
        ShardedUnit(mixed)
    inner = ShardedUnit.__new__(ShardedUnit)
    nn.Module.__init__(inner)
    with pytest.raises(ValueError, match="already contains"):
        ShardedUnit(nn.Sequential(nn.Linear(2, 2), inner))
    with pytest.raises(TypeError, match="Llama"):
        shard_llama(nn.Linear(2, 2))


def test_the_test_shapes_need_padding_at_three_and_four_ranks():
    model = Llama(CFG)
    units = [model.tok_embeddings, *model.layers, model.norm, model.output]
    sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    for world in (3, 4):
        assert any(n % world for n in sizes), world


# ------------------------------------------------------------------ data parallel

@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_step_equals_the_single_process_step(dp_results, world):
    for errors in dp_results[world]:
        assert errors["loss"] < TOL and errors["grad"] < TOL and errors["param"] < TOL, errors


def test_averaging_local_means_is_wrong_when_token_counts_differ(dp_results):
    # 7 sequences on 3 ranks: shares of 3, 2, 2; (10.10) over-weights the smaller shares.
    assert all(errors["naive_grad"] > 1e-4 for errors in dp_results[3])


# ------------------------------------------------------------------ ZeRO-3 / FSDP

@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("engine", ["", "keep_", "fsdp2_"])
def test_sharded_training_equals_the_single_process_run(fsdp_results, world, engine):
    """Our ZeRO-3 with and without resharding, and FSDP2's fully_shard: loss, every gradient, params after 2 steps."""
    for r in fsdp_results[world]:
        assert max(r[engine + k] for k in ("loss", "grad", "param")) < TOL, (engine, r)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp_frees_gathered_parameters_and_holds_few_units_at_once(fsdp_results, world):
    for r in fsdp_results[world]:
        units = r["unit_bytes"]
        assert r["live"] == 0 and r["keep_live"] == 0
        # one unit at a time, plus what gloo's threads may still hold of the previous all-gathers
        assert max(units) <= r["peak"] <= sum(sorted(units)[-3:]) < sum(units)
        assert sum(units) - units[0] <= r["keep_peak"] <= sum(units)         # the embedding's weight is not saved
        per_micro_batch = 2 * MICRO_STEPS                                    # 2 optimizer steps
        assert r["gathers"] == per_micro_batch * (2 * len(r["unit_bytes"]) - 1)
        assert r["keep_gathers"] == per_micro_batch * len(r["unit_bytes"])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp_rank_keeps_one_over_w_of_the_padded_state(fsdp_results, world):
    for r in fsdp_results[world]:
        shards = sum(r["unit_bytes"]) // world
        assert r["bytes"]["params"] == shards and r["bytes"]["grads"] == shards
        assert r["bytes"]["optimizer"] == 2 * shards + 4 * len(r["unit_bytes"])   # exp_avg, exp_avg_sq, step
        dp = r["dp_bytes"]
        assert dp["params"] == dp["grads"] == 8 * sum(p.numel() for p in Llama(CFG).parameters())
        assert sum(r["bytes"].values()) < sum(dp.values()) / world + 64 * world * len(r["unit_bytes"])
