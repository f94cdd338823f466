"""Chapter 10 (section 10.2): the memory and communication accounting of Llama 3's 4D layouts, against hand-computed
small cases (tiny config: vocab 256, dim 64, 2 layers, 4 heads, 2 KV heads of 16, ffn 160)."""
import math

import pytest

from lrn_lib.accounting import (GB, LLAMA3_TABLE4, GiB, Layout, all_gather_bytes, all_reduce_bytes, busiest_stage,
                                check_layout, communication_per_step, flops_per_token, implied_step_seconds,
                                memory_per_gpu, params_per_gpu, saved_activations, stage_layers)
from lrn_lib.llama import LLAMA3_405B, parameter_count, tiny_config

TINY = tiny_config()
# one layer of the tiny block: 2*64*64 (wq, wo) + 2*64*32 (wk, wv) + 3*64*160 (w1, w2, w3) = 43,008 matrix entries
TP2_PP2 = Layout(tp=2, cp=1, pp=2, dp=2, seq_len=16, batch_per_dp=4)
CP2 = Layout(tp=1, cp=2, pp=1, dp=1, seq_len=16, batch_per_dp=2)


def assert_bytes(parts: dict[str, float], unit: int, expected: dict[str, int]) -> None:
    assert parts.keys() == expected.keys()
    for name, value in expected.items():
        assert math.isclose(parts[name] * unit, value, rel_tol=1e-12, abs_tol=1e-9), name


# ------------------------------------------------------------------ layouts and stages

def test_llama3_126_layers_split_7_then_fourteen_8s_then_7():
    assert stage_layers(126, 16) == [7] + [8] * 14 + [7]


def test_stage_layers_small_cases():
    assert stage_layers(2, 1) == [2]
    assert stage_layers(2, 2) == [1, 1]
    assert stage_layers(6, 4) == [1, 2, 2, 1]


def test_table4_layouts_give_16m_tokens_and_their_gpu_counts():
    assert [r.gpus for r in LLAMA3_TABLE4] == [8192, 16384, 16384]
    for run in LLAMA3_TABLE4:
        lay = run.layout
        assert lay.gpus == run.gpus
        assert lay.dp * lay.batch_per_dp * lay.seq_len == lay.tokens_per_step == 2 ** 24
        assert lay.micro_batch_tokens == 8192
        check_layout(LLAMA3_405B, lay)


def test_stages_at_tp1_add_up_to_the_parameter_count():
    for cfg, pp in ((TINY, 2), (LLAMA3_405B, 16)):
        lay = Layout(tp=1, cp=1, pp=pp, dp=1, seq_len=16, batch_per_dp=pp)
        assert sum(params_per_gpu(cfg, lay, s) for s in range(pp)) == parameter_count(cfg)


# ------------------------------------------------------------------ hand-computed tiny cases

def test_params_per_gpu_tp2_pp2():
    # per layer 43008/2 + 2*64 = 21632; embedding and head 256*64/2 = 8192 each; final norm 64
    assert params_per_gpu(TINY, TP2_PP2, 0) == 21632 + 8192
    assert params_per_gpu(TINY, TP2_PP2, 1) == 21632 + 8192 + 64


def test_saved_activations_count_six_dims_two_kv_three_ffn():
    saved = saved_activations(TINY)
    assert len(saved) == 11
    assert sum(saved.values()) == 6 * 64 + 2 * 32 + 3 * 160 == 928


def test_memory_tp2_pp2():
    # a layer-micro-batch keeps 16 tokens * 2 bytes * 928 / tp = 14848 bytes; 1F1B: stage 0 holds 2, stage 1 holds 1
    assert_bytes(memory_per_gpu(TINY, TP2_PP2, 0), GiB, {
        "weights": 2 * 29824, "gradients": 4 * 29824, "optimizer": 12 * 29824 / 2, "activations": 2 * 14848,
        "total": 2 * 29824 + 4 * 29824 + 6 * 29824 + 2 * 14848})
    head = 16 * (2 * 2 * 64 + 4 * 256) / 2                       # final norm in/out in bf16, fp32 logits
    assert_bytes(memory_per_gpu(TINY, TP2_PP2, 1), GiB, {
        "weights": 2 * 29888, "gradients": 4 * 29888, "optimizer": 6 * 29888, "activations": 14848 + head,
        "total": 12 * 29888 + 14848 + head})


def test_memory_with_context_parallel_keeps_the_gathered_kv_and_shards_the_optimizer_over_dp_times_cp():
    params = parameter_count(TINY)
    assert params_per_gpu(TINY, CP2, 0) == params == 119104
    per_layer = 8 * 2 * 928 + 8 * 2 * 32 * 2                     # own 8 tokens + the other rank's 8 tokens of K, V
    head = 8 * (2 * 2 * 64 + 4 * 256)
    assert_bytes(memory_per_gpu(TINY, CP2, 0), GiB, {
        "weights": 2 * params, "gradients": 4 * params, "optimizer": 6 * params, "activations": 2 * per_layer + head,
        "total": 12 * params + 2 * per_layer + head})


def test_in_flight_micro_batches_follow_1f1b_and_are_capped_by_the_batch():
    cfg = tiny_config(n_layers=6)
    per_layer = 8 * 2 * 928
    head = 8 * (2 * 2 * 64 + 4 * 256)
    many = Layout(tp=1, cp=1, pp=4, dp=1, seq_len=8, batch_per_dp=8)
    got = [memory_per_gpu(cfg, many, s)["activations"] * GiB for s in range(4)]
    assert got == pytest.approx([4 * 1 * per_layer, 3 * 2 * per_layer, 2 * 2 * per_layer, 1 * per_layer + head])
    few = Layout(tp=1, cp=1, pp=4, dp=1, seq_len=8, batch_per_dp=2)
    got = [memory_per_gpu(cfg, few, s)["activations"] * GiB for s in range(4)]
    assert got == pytest.approx([2 * 1 * per_layer, 2 * 2 * per_layer, 2 * 2 * per_layer, 1 * per_layer + head])


def test_ring_costs():
    assert all_reduce_bytes(100, 4) == 150
    assert all_gather_bytes(100, 4) == 75
    assert all_gather_bytes(100, 1) == all_reduce_bytes(100, 1) == 0


def test_communication_tp2_pp2():
    activation = 16 * 64 * 2                                     # one micro-batch's (tokens, dim) in bf16
    assert_bytes(communication_per_step(TINY, TP2_PP2, 0), GB, {
        "tp": 1 * 4 * 4 * activation,                            # layers * micro-batches * 4 all-reduces * 2(n-1)/n
        "cp": 0,
        "pp": 4 * activation / 2,                                # forward only, each TP rank sends its half
        "dp": 29824 + 2 * 29824})                                # (1/2)(2P) + (1/2)(4P)
    assert_bytes(communication_per_step(TINY, TP2_PP2, 1), GB, {
        "tp": 16 * activation, "cp": 0, "pp": 4 * activation / 2, "dp": 3 * 29888})


def test_communication_with_context_parallel():
    params = parameter_count(TINY)
    sequence_kv = 16 * 2 * 32 * 2                                # whole sequence's K and V in bf16
    assert_bytes(communication_per_step(TINY, CP2, 0), GB, {
        "tp": 0, "cp": 2 * 2 * 2 * sequence_kv / 2, "pp": 0, "dp": params + 2 * params})


def test_a_middle_stage_sends_pipeline_messages_both_ways():
    cfg = tiny_config(n_layers=6)
    lay = Layout(tp=2, cp=1, pp=4, dp=1, seq_len=8, batch_per_dp=4)
    pp = [communication_per_step(cfg, lay, s)["pp"] * GB for s in range(4)]
    assert pp == [4 * 8 * 64, 8 * 8 * 64, 8 * 8 * 64, 4 * 8 * 64]


# ------------------------------------------------------------------ the 405B table

def test_405b_layout_a_fits_an_h100_and_its_second_stage_is_the_busiest():
    lay = LLAMA3_TABLE4[0].layout
    assert busiest_stage(LLAMA3_405B, lay) == 1
    mem = memory_per_gpu(LLAMA3_405B, lay, 1)
    assert 70 < mem["total"] < 80
    assert mem["activations"] > 0.7 * mem["total"]
    assert mem["gradients"] == pytest.approx(4 * params_per_gpu(LLAMA3_405B, lay, 1) / GiB)   # the whole fp32 buffer


def test_405b_long_context_layout_does_not_fit_an_h100_with_the_gradient_buffer_held():
    lay = LLAMA3_TABLE4[2].layout
    mem = memory_per_gpu(LLAMA3_405B, lay, busiest_stage(LLAMA3_405B, lay))
    assert 84 < mem["total"] < 86


def test_405b_tp_sends_the_most_and_cp_only_with_long_context():
    for run in LLAMA3_TABLE4:
        sent = communication_per_step(LLAMA3_405B, run.layout, 1)
        assert max(sent, key=sent.get) == "tp"
        assert (sent["cp"] > 0) == (run.layout.cp > 1)


def test_implied_step_time_is_tokens_times_6n_over_cluster_flops():
    run = LLAMA3_TABLE4[0]
    expected = 2 ** 24 * 6 * parameter_count(LLAMA3_405B) / (8192 * 430e12)
    assert math.isclose(implied_step_seconds(LLAMA3_405B, run), expected, rel_tol=1e-12)
    assert flops_per_token(TINY, 16, attention=True) - flops_per_token(TINY, 16) == 6 * 2 * 64 * 16


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("overrides, name", [(dict(tp=3), "n_heads"), (dict(tp=4), "n_kv_heads"),
                                             (dict(pp=3), "n_layers"), (dict(tp=2, seq_len=15), "tokens")])
def test_layouts_that_do_not_divide_raise(overrides, name):
    lay = Layout(**{**dict(tp=1, cp=1, pp=1, dp=1, seq_len=16, batch_per_dp=4), **overrides})
    with pytest.raises(ValueError, match=name):
        check_layout(TINY, lay)
    with pytest.raises(ValueError, match=name):
        memory_per_gpu(TINY, lay, 0)


def test_bad_layout_fields_and_stages_raise():
    with pytest.raises(ValueError, match="cp"):
        Layout(tp=1, cp=3, pp=1, dp=1, seq_len=16, batch_per_dp=1)
    with pytest.raises(ValueError, match="micro_batch"):
        Layout(tp=1, cp=1, pp=1, dp=1, seq_len=16, batch_per_dp=3, micro_batch=2)
    with pytest.raises(ValueError, match="dp"):
        Layout(tp=1, cp=1, pp=1, dp=0, seq_len=16, batch_per_dp=1)
    with pytest.raises(TypeError, match="tp"):
        Layout(tp=2.0, cp=1, pp=1, dp=1, seq_len=16, batch_per_dp=1)
    with pytest.raises(ValueError, match="stage"):
        communication_per_step(TINY, TP2_PP2, 2)
    with pytest.raises(ValueError, match="n_experts"):
        check_layout(tiny_config(n_experts=4), TP2_PP2)
    with pytest.raises(ValueError, match="pp"):
        stage_layers(2, 4)
