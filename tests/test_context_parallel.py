"""Chapter 8: context parallelism. Sequence sharding, the log-sum-exp merge, the block backward,
ring and all-gather attention against full-sequence attention (gloo processes, float64), and the
tiny Llama model with CP against the single-process step."""
import pytest
import torch
import torch.distributed as dist

from lrn_lib.attention import attention_reference
from lrn_lib.context_parallel import (allgather_attention, attention_block_backward, chunk_ids, context_parallel_loss,
                                      cp_attend, gather_sequence, merge_partials, ring_attention, shard_positions,
                                      shard_sequence, unshard_sequence)
from lrn_lib.context_parallel_checks import attention_check, model_check
from lrn_lib.spawn import free_port, spawn


def qkv(b=2, h=6, h_kv=2, n_q=10, n_k=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n_q, d, generator=g, dtype=torch.float64),
            torch.randn(b, h_kv, n_k, d, generator=g, dtype=torch.float64),
            torch.randn(b, h_kv, n_k, d, generator=g, dtype=torch.float64))


# ------------------------------------------------------------------ layout helpers

@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("balanced", [True, False])
def test_shard_then_unshard_is_the_identity_along_any_dim(cp, balanced):
    x = torch.randn(3, 2 * cp * 5, 4)
    for dim in (1, -2):
        shards = [shard_sequence(x, r, cp, dim=dim, balanced=balanced) for r in range(cp)]
        assert all(s.shape == (3, 10, 4) for s in shards)
        assert torch.equal(unshard_sequence(shards, dim=dim, balanced=balanced), x)


def test_balanced_layout_gives_rank_i_chunks_i_and_2cp_minus_1_minus_i():
    assert [chunk_ids(r, 3) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    assert [chunk_ids(r, 3, balanced=False) for r in range(3)] == [[0], [1], [2]]
    assert shard_positions(12, 0, 3).tolist() == [0, 1, 10, 11]
    assert shard_positions(12, 2, 3, balanced=False).tolist() == [8, 9, 10, 11]
    positions = torch.cat([shard_positions(24, r, 4) for r in range(4)])
    assert sorted(positions.tolist()) == list(range(24))


def test_balanced_layout_equalizes_causal_work():
    cp = 4
    def work(balanced):                     # causal blocks at the granularity of the layout's chunks
        return [sum(c + 0.5 for c in chunk_ids(r, cp, balanced)) for r in range(cp)]
    assert len(set(work(True))) == 1
    assert work(False) == [0.5, 1.5, 2.5, 3.5]


# ------------------------------------------------------------------ merge (10.10) and block backward (10.12)

def test_merge_partials_is_the_weighted_form_and_gives_attention_over_all_keys():
    q, k, v = qkv(n_q=7, n_k=24)
    parts = [attention_reference(q, k[:, :, j:j + 8], v[:, :, j:j + 8]) for j in (0, 8, 16)]
    o, lse = parts[0]
    for o_b, lse_b in parts[1:]:
        plain_lse = torch.logaddexp(lse, lse_b)
        plain_o = torch.exp(lse - plain_lse)[..., None] * o + torch.exp(lse_b - plain_lse)[..., None] * o_b
        o, lse = merge_partials(o, lse, o_b, lse_b)
        assert torch.allclose(o, plain_o, atol=1e-13, rtol=0) and torch.allclose(lse, plain_lse, atol=1e-13, rtol=0)
    o_full, lse_full = attention_reference(q, k, v)
    assert torch.allclose(o, o_full, atol=1e-13, rtol=0) and torch.allclose(lse, lse_full, atol=1e-13, rtol=0)


def test_merge_partials_stays_finite_at_huge_log_sum_exps():
    q, k, v = qkv(n_q=3, n_k=8)
    (o_a, l_a), (o_b, l_b) = (attention_reference(q, k[:, :, j:j + 4], v[:, :, j:j + 4]) for j in (0, 4))
    o, lse = merge_partials(o_a, l_a + 5000, o_b, l_b + 5000)
    o_full, lse_full = attention_reference(q, k, v)
    assert torch.allclose(o, o_full, atol=1e-12, rtol=0) and torch.allclose(lse, lse_full + 5000, atol=1e-9, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_block_backward_with_the_global_lse_sums_to_the_full_gradients(causal):
    q, k, v = (t.requires_grad_() for t in qkv(h=6, h_kv=3, n_q=6, n_k=15, d=5))
    do = torch.randn_like(q)
    o, lse = attention_reference(q, k, v, causal=causal)
    o.backward(do)
    delta = (do * o.detach()).sum(-1)
    dq, dk, dv = torch.zeros_like(q), [], []
    for j in (0, 5, 10):
        # bottom-right mask of (6 queries, 15 keys): the first two key blocks are fully visible,
        # the last is the bottom-right mask of (6 queries, 5 keys)
        with torch.no_grad():
            dq_j, dk_j, dv_j = attention_block_backward(q, k[:, :, j:j + 5], v[:, :, j:j + 5], do, lse, delta,
                                                        causal and j == 10, 5 ** -0.5)
        dq += dq_j
        dk.append(dk_j)
        dv.append(dv_j)
    assert torch.allclose(dq, q.grad, atol=1e-12, rtol=0)
    assert torch.allclose(torch.cat(dk, 2), k.grad, atol=1e-12, rtol=0)
    assert torch.allclose(torch.cat(dv, 2), v.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ ring and all-gather attention, gloo processes

def configs(seq_len):
    shapes = [dict(batch=2, heads=6, kv_heads=2, head_dim=8),     # GQA
              dict(batch=1, heads=3, kv_heads=1, head_dim=5),     # odd head counts and head_dim, MQA
              dict(batch=1, heads=5, kv_heads=5, head_dim=4)]     # odd head count, no GQA
    return [dict(shape, variant=variant, causal=causal, balanced=balanced, seq_len=seq_len, seed=i)
            for i, shape in enumerate(shapes) for variant in ("ring", "allgather")
            for causal, balanced in ((True, True), (True, False), (False, True))]


@pytest.mark.parametrize("world, seq_len", [(2, 20), (3, 30)])   # chunks of 5 tokens (balanced) or 10
def test_ring_and_allgather_attention_equal_full_attention_output_and_gradients(world, seq_len):
    cases = configs(seq_len)
    per_rank = spawn(attention_check, world, cases)
    for cfg, *errors in zip(cases, *per_rank):
        for rank_errors in errors:
            assert max(rank_errors.values()) < 1e-12, (cfg, rank_errors)


def test_cp_subgroups_of_non_adjacent_ranks_each_compute_their_own_attention():
    cases = [dict(batch=1, heads=4, kv_heads=2, head_dim=4, variant=variant, causal=True, balanced=True,
                  seq_len=16, seed=3) for variant in ("ring", "allgather")]
    results = spawn(attention_check, 4, cases, [[0, 2], [1, 3]])     # ring peers are global ranks 0<->2, 1<->3
    for cfg, errors in zip(cases, results[0]):
        assert max(errors.values()) < 1e-12, (cfg, errors)


def _single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_a_cp_group_of_one_rank_is_plain_attention():
    _single_rank_group()
    try:
        q, k, v = (t.requires_grad_() for t in qkv(n_q=12, n_k=12))
        o_ref = attention_reference(q, k, v, causal=True)[0]
        grads_ref = torch.autograd.grad(o_ref.sum(), (q, k, v))
        for attend in (ring_attention, allgather_attention):
            o = attend(q, k, v, causal=True)
            grads = torch.autograd.grad(o.sum(), (q, k, v))
            assert torch.allclose(o, o_ref, atol=1e-12, rtol=0)
            assert all(torch.allclose(g, r, atol=1e-12, rtol=0) for g, r in zip(grads, grads_ref))
        x = torch.randn(2, 8, 3, requires_grad=True)
        assert torch.equal(gather_sequence(x), x)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ the model with CP

def test_llama_with_context_parallel_attention_matches_the_single_process_loss_and_gradients():
    cases = [dict(variant="ring", balanced=True, batch=2, seq_len=24, padding=5, seed=0),
             dict(variant="allgather", balanced=True, batch=1, seq_len=24, padding=7, seed=1),
             dict(variant="ring", balanced=False, batch=1, seq_len=22, padding=0, seed=2)]
    for cfg, errors in zip(cases, spawn(model_check, 2, cases)[0]):
        assert errors["grad_size"] > 1e-4, cfg                    # the gradients compared are not trivially 0
        assert errors["loss"] < 1e-12 and errors["grad"] < 1e-12, (cfg, errors)


def test_mean_of_per_rank_means_is_not_the_loss_but_the_shares_add_up_to_it():
    _single_rank_group()
    try:
        logits = torch.randn(2, 16, 11, dtype=torch.float64)
        targets = torch.randint(11, (2, 16))
        targets[:, 10:] = -100
        share, loss = context_parallel_loss(logits, targets)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        assert torch.allclose(share, expected) and torch.allclose(loss, expected)
        parts = [(shard_sequence(logits, r, 2), shard_sequence(targets, r, 2)) for r in range(2)]
        counts = [int((t != -100).sum()) for _, t in parts]
        assert counts[0] != counts[1]
        sums = [torch.nn.functional.cross_entropy(l.flatten(0, 1), t.flatten(), reduction="sum") for l, t in parts]
        assert torch.allclose(sum(sums) / sum(counts), expected)
        assert not torch.allclose(sum(s / c for s, c in zip(sums, counts)) / 2, expected)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ bad input

def test_bad_input_raises_errors_naming_the_argument():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"x has sequence length 10.*2 \* cp = 6"):
        shard_sequence(x, 0, 3)
    with pytest.raises(ValueError, match="cp must be >= 1"):
        shard_sequence(x, 0, 0)
    with pytest.raises(ValueError, match="rank must be <= 1"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="dim must be <= 2"):
        shard_sequence(x, 0, 1, dim=3)
    with pytest.raises(ValueError, match="seq_len 10 is not divisible"):
        shard_positions(10, 0, 3)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        shard_positions(0, 0, 1)
    with pytest.raises(ValueError, match="shards must not be empty"):
        unshard_sequence([])
    with pytest.raises(ValueError, match="shards have shapes"):
        unshard_sequence([torch.zeros(1, 4), torch.zeros(1, 6)])
    with pytest.raises(ValueError, match="variant must be one of"):
        cp_attend("zigzag")
    q, k, v = qkv(n_q=6, n_k=8)
    for attend in (ring_attention, allgather_attention):
        with pytest.raises(ValueError, match="k has 8 local tokens but q has 6"):
            attend(q, k, v)
        with pytest.raises(ValueError, match="q has 5 local tokens, which is odd"):
            attend(*qkv(n_q=5, n_k=5))
        with pytest.raises(ValueError, match="k/v have 4 heads"):
            attend(*qkv(h=6, h_kv=4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gather_sequence([1, 2])
    with pytest.raises(ValueError, match="logits .* and targets .* must be"):
        context_parallel_loss(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
