"""Bad input to chapters 01-04's public functions gets a clear TypeError/ValueError naming the argument.

Every bad call fails in the argument checks, before any kernel launch, so the Triton
wrappers of kernels/ cost nothing here; their checks come before the one that needs Triton
(kernels.runtime.check_launchable), so they also hold where Triton is not installed.
"""
import pytest
import torch

from bad_input import assert_clear_error, cases
from kernels.flash_attention import (backward_configs, check_backward_inputs, check_flash_inputs,
                                     flash_attention_backward, flash_attention_forward, forward_config, head_block)
from kernels.matmul import (check_matmul_config, check_matmul_operands, matmul, needs_padding, padded_copy,
                            pipeline_bytes, prune_configs, skinny_config, split_k_count)
from kernels.online_softmax import online_softmax_triton, softmax_backward_triton
from kernels.softmax import as_rows, check_row_kernel_input, fused_launch_config, run_on_rows, softmax_triton
from lrn_lib.attention import (FlashAttention, attention_reference, causal_visible, check_attention_inputs,
                               flash_attention, flash_attention_backward_blocks, flash_attention_blocks,
                               kernel_can_run)
from lrn_lib.online_softmax import (ReferenceSoftmax, SoftmaxState, TritonSoftmax, check_state, merge_lse,
                                    merge_states, online_softmax_reference, softmax_backward_reference,
                                    softmax_function, softmax_state, state_lse)
from lrn_lib.softmax import check_softmax_input, logsumexp, safe_softmax, softmax
from lrn_lib.tiling import (H100_SXM_DATASHEET, Ceilings, arithmetic_intensity, attainable_flops, matmul_flops,
                            matmul_min_bytes, program_order, tiled_matmul, tiled_traffic_bytes, wave_panels)

INTS = torch.arange(6).reshape(2, 3)


def x():
    return torch.randn(2, 3)


def state(rows=2):
    return SoftmaxState(torch.zeros(rows), torch.ones(rows))


def qkv(dtype=torch.float64, heads=2, kv_heads=1, d=8):
    return (torch.randn(1, heads, 3, d, dtype=dtype), torch.randn(1, kv_heads, 4, d, dtype=dtype),
            torch.randn(1, kv_heads, 4, d, dtype=dtype))


def half_qkv(**kwargs):
    return qkv(torch.float16, **kwargs)


def backward_args(**change):
    """(q, k, v, o, lse, do) of a small 16-bit problem for the kernel backward, one entry replaced."""
    q, k, v = half_qkv()
    args = {"q": q, "k": k, "v": v, "o": torch.zeros_like(q), "lse": torch.zeros(q.shape[:3]),
            "do": torch.zeros_like(q)}
    return {**args, **change}


def reference_backward_args(**change):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, "o": torch.zeros_like(q), "lse": torch.zeros(q.shape[:3], dtype=q.dtype),
            "do": torch.zeros_like(q)}
    return {**args, **change}


CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1}

BAD_CALLS = {
    # ---------------------------------------------------------------- chapter 01
    "lrn_lib.softmax.check_softmax_input": [
        ("x", lambda: check_softmax_input(INTS, -1)),                        # integer dtype
        ("dim", lambda: check_softmax_input(x(), 2)),                        # dim out of range
        ("dim", lambda: check_softmax_input(x(), True)),                     # a bool is not an axis
        ("x", lambda: check_softmax_input([1.0, 2.0], -1)),                  # not a tensor
    ],
    "lrn_lib.softmax.safe_softmax": [
        ("x", lambda: safe_softmax(INTS)),
        ("x", lambda: safe_softmax(torch.randn(3, 0))),                      # empty
        ("dim", lambda: safe_softmax(x(), dim=-3)),
    ],
    "lrn_lib.softmax.logsumexp": [
        ("x", lambda: logsumexp(torch.tensor(1.0))),                         # 0-d
        ("dim", lambda: logsumexp(x(), dim=1.0)),
    ],
    "lrn_lib.softmax.softmax": [
        ("impl", lambda: softmax(x(), impl="cuda")),
        ("x", lambda: softmax([1.0, 2.0])),
        ("dim", lambda: softmax(x(), dim=5)),
    ],
    "kernels.softmax.check_row_kernel_input": [
        ("x", lambda: check_row_kernel_input(x().double(), -1)),             # float64: no kernel for it
        ("dim", lambda: check_row_kernel_input(x(), 2)),
        ("out", lambda: check_row_kernel_input(x(), -1, torch.empty(3, 2))),  # out of the wrong shape
        ("out", lambda: check_row_kernel_input(x(), -1, [[0.0] * 3] * 2)),
    ],
    "kernels.softmax.as_rows": [
        ("x", lambda: as_rows(torch.tensor(1.0))),                           # 0-d
        ("x", lambda: as_rows([[1.0, 2.0]])),
        ("x", lambda: as_rows(torch.empty(2, 0))),
    ],
    "kernels.softmax.run_on_rows": [
        ("launch", lambda: run_on_rows(x(), -1, None, "softmax")),
        ("x", lambda: run_on_rows(INTS, -1, None, lambda x2, y2: None)),
        ("dim", lambda: run_on_rows(x(), 2, None, lambda x2, y2: None)),
        ("out", lambda: run_on_rows(x(), -1, torch.empty(3, 2), lambda x2, y2: None)),
    ],
    "kernels.softmax.fused_launch_config": [
        ("n_cols", lambda: fused_launch_config(0)),
        ("n_cols", lambda: fused_launch_config(65537)),                      # longer than the fused kernel holds
        ("n_cols", lambda: fused_launch_config(16.0)),
    ],
    "kernels.softmax.softmax_triton": [
        ("x", lambda: softmax_triton(INTS)),
        ("dim", lambda: softmax_triton(x(), dim=2)),
        ("out", lambda: softmax_triton(x(), out=torch.empty(2, 3, dtype=torch.float16))),
        ("x", lambda: softmax_triton(torch.empty(2, 0))),
    ],
    # ---------------------------------------------------------------- chapter 02
    "lrn_lib.online_softmax.check_state": [
        ("state", lambda: check_state((torch.zeros(2), torch.ones(2)))),     # a plain tuple
        ("state.d", lambda: check_state(SoftmaxState(torch.zeros(2), torch.ones(3)))),
        ("state.m", lambda: check_state(SoftmaxState(torch.zeros(2, dtype=torch.long), torch.ones(2)))),
    ],
    "lrn_lib.online_softmax.softmax_state": [
        ("x", lambda: softmax_state(INTS)),
        ("dim", lambda: softmax_state(x(), dim=2)),
    ],
    "lrn_lib.online_softmax.merge_states": [
        ("b.m", lambda: merge_states(state(2), state(1))),                   # would broadcast
        ("b.m", lambda: merge_states(state(2), SoftmaxState(torch.zeros(2, 1), torch.ones(2, 1)))),
        ("a", lambda: merge_states((torch.zeros(2), torch.ones(2)), state(2))),
        ("b.d", lambda: merge_states(state(2), SoftmaxState(torch.zeros(2), torch.ones(1)))),
    ],
    "lrn_lib.online_softmax.state_lse": [
        ("state", lambda: state_lse(torch.zeros(2))),
        ("state.d", lambda: state_lse(SoftmaxState(torch.zeros(2), torch.ones(2, dtype=torch.long)))),
    ],
    "lrn_lib.online_softmax.merge_lse": [
        ("lse_b", lambda: merge_lse(torch.zeros(2, 3), torch.zeros(3))),     # would broadcast
        ("lse_b", lambda: merge_lse(torch.zeros(3), torch.zeros(1))),        # would broadcast
        ("lse_a", lambda: merge_lse(torch.zeros(3, dtype=torch.long), torch.zeros(3))),
        ("lse_b", lambda: merge_lse(torch.zeros(3), [0.0, 0.0, 0.0])),
    ],
    "lrn_lib.online_softmax.online_softmax_reference": [
        ("block", lambda: online_softmax_reference(x(), block=0)),
        ("block", lambda: online_softmax_reference(x(), block=2.0)),
        ("x", lambda: online_softmax_reference(INTS)),
        ("dim", lambda: online_softmax_reference(x(), dim=3)),
    ],
    "lrn_lib.online_softmax.softmax_backward_reference": [
        ("dy", lambda: softmax_backward_reference(x(), torch.randn(3))),     # would broadcast
        ("y", lambda: softmax_backward_reference(INTS, x())),
        ("dy", lambda: softmax_backward_reference(x(), INTS)),
        ("dim", lambda: softmax_backward_reference(x(), x(), dim=2)),
    ],
    "lrn_lib.online_softmax.TritonSoftmax": [
        ("x", lambda: TritonSoftmax.apply(INTS, -1)),
        ("dim", lambda: TritonSoftmax.apply(x(), 2)),
    ],
    "lrn_lib.online_softmax.ReferenceSoftmax": [
        ("x", lambda: ReferenceSoftmax.apply(INTS, -1)),
        ("dim", lambda: ReferenceSoftmax.apply(x(), 2)),
    ],
    "lrn_lib.online_softmax.softmax_function": [
        ("name", lambda: softmax_function(3, safe_softmax, softmax_backward_reference, "doc")),
        ("forward", lambda: softmax_function("S", None, softmax_backward_reference, "doc")),
        ("backward", lambda: softmax_function("S", safe_softmax, "dx", "doc")),
    ],
    "kernels.online_softmax.online_softmax_triton": [
        ("x", lambda: online_softmax_triton(INTS)),
        ("dim", lambda: online_softmax_triton(x(), dim=-3)),
        ("x", lambda: online_softmax_triton(torch.randn(0, 3))),
        ("out", lambda: online_softmax_triton(x(), out=torch.empty(3, 2))),
    ],
    "kernels.online_softmax.softmax_backward_triton": [
        ("dy", lambda: softmax_backward_triton(x(), torch.randn(3, 2))),
        ("dy", lambda: softmax_backward_triton(x(), x().half())),
        ("dy", lambda: softmax_backward_triton(x(), torch.ones(2, 3, dtype=torch.int32))),
        ("y", lambda: softmax_backward_triton("y", x())),
    ],
    # ---------------------------------------------------------------- chapter 03
    "lrn_lib.tiling.Ceilings": [
        ("bandwidth", lambda: Ceilings("gpu", 1e12, 0.0, "made up")),        # ridge would divide by zero
        ("peak_flops", lambda: Ceilings("gpu", -1e12, 1e12, "made up")),
        ("peak_flops", lambda: Ceilings("gpu", float("nan"), 1e12, "made up")),
        ("name", lambda: Ceilings(None, 1e12, 1e12, "made up")),
    ],
    "lrn_lib.tiling.matmul_flops": [
        ("m", lambda: matmul_flops(-2, 3, 4)),
        ("k", lambda: matmul_flops(2, 3, 0)),
        ("n", lambda: matmul_flops(2, 3.5, 4)),
    ],
    "lrn_lib.tiling.matmul_min_bytes": [
        ("bytes_per_element", lambda: matmul_min_bytes(2, 3, 4, 0)),
        ("m", lambda: matmul_min_bytes(-1, 3, 4, 2)),
        ("bytes_per_element", lambda: matmul_min_bytes(2, 3, 4, 2.0)),
    ],
    "lrn_lib.tiling.arithmetic_intensity": [
        ("bytes_moved", lambda: arithmetic_intensity(10, 0)),
        ("flops", lambda: arithmetic_intensity(-10, 5)),
        ("bytes_moved", lambda: arithmetic_intensity(10, float("inf"))),
        ("flops", lambda: arithmetic_intensity("14", 5)),
    ],
    "lrn_lib.tiling.tiled_traffic_bytes": [
        ("block_m", lambda: tiled_traffic_bytes(64, 64, 64, 0, 32, 2)),      # ZeroDivisionError before
        ("block_n", lambda: tiled_traffic_bytes(64, 64, 64, 32, -32, 2)),
        ("m", lambda: tiled_traffic_bytes(0, 64, 64, 32, 32, 2)),
        ("bytes_per_element", lambda: tiled_traffic_bytes(64, 64, 64, 32, 32, 0)),
    ],
    "lrn_lib.tiling.attainable_flops": [
        ("intensity", lambda: attainable_flops(-1.0, H100_SXM_DATASHEET)),
        ("ceilings", lambda: attainable_flops(10.0, (989e12, 3.35e12))),
        ("intensity", lambda: attainable_flops(float("nan"), H100_SXM_DATASHEET)),
    ],
    "lrn_lib.tiling.tiled_matmul": [
        ("a", lambda: tiled_matmul(torch.ones(3), torch.ones(3, 2))),        # 1-D
        ("b", lambda: tiled_matmul(torch.ones(2, 3), torch.ones(4, 2))),
        ("block_k", lambda: tiled_matmul(torch.ones(2, 3), torch.ones(3, 2), block_k=0)),
        ("block_m", lambda: tiled_matmul(torch.ones(2, 3), torch.ones(3, 2), block_m=8.0)),
    ],
    "lrn_lib.tiling.program_order": [
        ("group_m", lambda: program_order(0, 4, 4, 0)),                      # ZeroDivisionError before
        ("pid", lambda: program_order(16, 4, 4, 2)),                         # no such program: a made-up tile
        ("pid", lambda: program_order(-1, 4, 4, 2)),
        ("num_pid_n", lambda: program_order(0, 4, 0, 1)),
    ],
    "lrn_lib.tiling.wave_panels": [
        ("programs", lambda: wave_panels(0, 8, 8, 1)),                       # returned (0, 0) before
        ("num_pid_m", lambda: wave_panels(16, 0, 8, 1)),                     # returned (0, 0) before
        ("group_m", lambda: wave_panels(16, 8, 8, 0)),
        ("programs", lambda: wave_panels(16.0, 8, 8, 1)),
    ],
    "kernels.matmul.check_matmul_operands": [
        ("a", lambda: check_matmul_operands(torch.ones(3), torch.ones(3, 2))),
        ("b", lambda: check_matmul_operands(torch.ones(2, 3), torch.ones(4, 2))),
        ("b", lambda: check_matmul_operands(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.int32))),
        ("b", lambda: check_matmul_operands(torch.ones(2, 3), torch.ones(3, 0))),
    ],
    "kernels.matmul.pipeline_bytes": [
        ("num_stages", lambda: pipeline_bytes(128, 128, 64, 0, 2)),
        ("element_size", lambda: pipeline_bytes(128, 128, 64, 3, -2)),
        ("block_k", lambda: pipeline_bytes(128, 128, 64.0, 3, 2)),
    ],
    "kernels.matmul.prune_configs": [
        ("configs", lambda: prune_configs([], {"a_ptr": torch.ones(2, 2)})),
        ("named_args", lambda: prune_configs([object()], {})),
        ("configs", lambda: prune_configs(None, {"a_ptr": torch.ones(2, 2)})),
    ],
    "kernels.matmul.check_matmul_config": [
        ("config", lambda: check_matmul_config({"BLOCK_M": 16, "BLOCK_N": 16})),
        ("BLOCK_M", lambda: check_matmul_config({**CONFIG, "BLOCK_M": 48})),
        ("GROUP_M", lambda: check_matmul_config({**CONFIG, "GROUP_M": 0})),
        ("config", lambda: check_matmul_config([16, 16, 16, 1])),
    ],
    "kernels.matmul.matmul": [
        ("a", lambda: matmul(torch.ones(3), torch.ones(3, 2))),
        ("a", lambda: matmul(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))),
        ("allow_tf32", lambda: matmul(torch.ones(2, 3), torch.ones(3, 2), allow_tf32="yes")),
        ("BLOCK_K", lambda: matmul(torch.ones(2, 3), torch.ones(3, 2), config={**CONFIG, "BLOCK_K": 8})),
        ("split_k", lambda: matmul(torch.ones(2, 3), torch.ones(3, 2), split_k=0)),
        ("split_k", lambda: matmul(torch.ones(2, 3), torch.ones(3, 2), split_k=2.0)),
        ("split_k", lambda: matmul(torch.ones(2, 3), torch.ones(3, 2), split_k=65)),
    ],
    "kernels.matmul.split_k_count": [
        ("tiles", lambda: split_k_count(0, 8, 132)),
        ("k_blocks", lambda: split_k_count(4, 8.0, 132)),
        ("multiprocessors", lambda: split_k_count(4, 8, -1)),
        ("min_blocks", lambda: split_k_count(4, 8, 132, min_blocks=0)),
    ],
    "kernels.matmul.skinny_config": [
        ("m", lambda: skinny_config(129, 64, 64, 2, 132)),
        ("m", lambda: skinny_config(0, 64, 64, 2, 132)),
        ("element_size", lambda: skinny_config(16, 64, 64, 0, 132)),
        ("multiprocessors", lambda: skinny_config(16, 64, 64, 2, True)),
    ],
    "kernels.matmul.needs_padding": [
        ("a", lambda: needs_padding(torch.ones(3), torch.ones(3, 2))),
        ("b", lambda: needs_padding(torch.ones(2, 3), torch.ones(4, 2))),
    ],
    "kernels.matmul.padded_copy": [
        ("x", lambda: padded_copy(torch.ones(3), 4, 4)),
        ("rows", lambda: padded_copy(torch.ones(3, 2), 2, 4)),
        ("cols", lambda: padded_copy(torch.ones(3, 2), 4, 1.5)),
    ],
    # ---------------------------------------------------------------- chapter 04
    "lrn_lib.attention.check_attention_inputs": [
        ("q", lambda: check_attention_inputs(torch.randn(3, 8), *qkv()[1:])),  # 2-D
        ("k/v", lambda: check_attention_inputs(*qkv(heads=3, kv_heads=2))),
        ("causal", lambda: check_attention_inputs(*qkv(), causal="yes")),
        ("scale", lambda: check_attention_inputs(*qkv(), scale=0.0)),
    ],
    "lrn_lib.attention.causal_visible": [
        ("n_queries", lambda: causal_visible(0, 4)),
        ("n_keys", lambda: causal_visible(3, -1)),
        ("n_keys", lambda: causal_visible(3, 4.0)),
        ("device", lambda: causal_visible(3, 4, device=0.5)),
    ],
    "lrn_lib.attention.attention_reference": [
        ("q", lambda: attention_reference(torch.ones(1, 1, 2, 8, dtype=torch.long), *qkv(heads=1)[1:])),
        ("v", lambda: attention_reference(*qkv()[:2], torch.randn(1, 1, 5, 8, dtype=torch.float64))),
        ("scale", lambda: attention_reference(*qkv(), scale=float("nan"))),  # silent NaN output before
        ("causal", lambda: attention_reference(*qkv(), causal=None)),
    ],
    "lrn_lib.attention.flash_attention_blocks": [
        ("block_m", lambda: flash_attention_blocks(*qkv(), block_m=0)),
        ("block_n", lambda: flash_attention_blocks(*qkv(), block_n=-4)),
        ("scale", lambda: flash_attention_blocks(*qkv(), scale=-1.0)),
        ("q", lambda: flash_attention_blocks(torch.randn(1, 2, 0, 8, dtype=torch.float64), *qkv()[1:])),
    ],
    "lrn_lib.attention.flash_attention_backward_blocks": [
        ("lse", lambda: flash_attention_backward_blocks(**reference_backward_args(
            lse=torch.zeros(1, 2, 1, dtype=torch.float64)))),                  # would broadcast
        ("do", lambda: flash_attention_backward_blocks(**reference_backward_args(
            do=torch.zeros(1, 2, 3, 1, dtype=torch.float64)))),                # would broadcast
        ("o", lambda: flash_attention_backward_blocks(**reference_backward_args(o=[0.0]))),
        ("block_n", lambda: flash_attention_backward_blocks(**reference_backward_args(), block_n=0)),
    ],
    "lrn_lib.attention.FlashAttention": [
        ("q", lambda: FlashAttention.apply(*qkv(torch.float32), False, None)),   # the kernels take 16-bit
        ("causal", lambda: FlashAttention.apply(*half_qkv(), "no", None)),
        ("scale", lambda: FlashAttention.apply(*half_qkv(), False, 0.0)),
    ],
    "lrn_lib.attention.kernel_can_run": [
        ("q", lambda: kernel_can_run("q")),
        ("q", lambda: kernel_can_run(torch.randn(3, 8))),
    ],
    "lrn_lib.attention.flash_attention": [
        ("k/v", lambda: flash_attention(*qkv(heads=3, kv_heads=2))),
        ("q", lambda: flash_attention(torch.ones(1, 1, 2, 8, dtype=torch.int64), *qkv(heads=1)[1:])),
        ("return_lse", lambda: flash_attention(*qkv(), return_lse="yes")),
        ("scale", lambda: flash_attention(*qkv(), scale=float("inf"))),
    ],
    "kernels.flash_attention.check_flash_inputs": [
        ("q", lambda: check_flash_inputs(*qkv(torch.float32))),
        ("k", lambda: check_flash_inputs(half_qkv()[0], torch.randn(1, 1, 4, 8, device="meta").half(),
                                         half_qkv()[2])),
        ("head_dim", lambda: check_flash_inputs(*half_qkv(d=300))),
        ("causal", lambda: check_flash_inputs(*half_qkv(), causal=1)),
    ],
    "kernels.flash_attention.check_backward_inputs": [
        ("lse", lambda: check_backward_inputs(*(backward_args(lse=torch.zeros(1, 2, 3).double())[n]
                                                 for n in ("q", "o", "lse", "do")), None)),
        ("do", lambda: check_backward_inputs(*(backward_args(do=torch.zeros(1, 2, 3, 4).half())[n]
                                                for n in ("q", "o", "lse", "do")), None)),
        ("dlse", lambda: check_backward_inputs(*(backward_args()[n] for n in ("q", "o", "lse", "do")),
                                               torch.zeros(1, 2))),
        ("q", lambda: check_backward_inputs("q", torch.zeros(1), torch.zeros(1), torch.zeros(1), None)),
    ],
    "kernels.flash_attention.head_block": [
        ("head_dim", lambda: head_block(0)),
        ("head_dim", lambda: head_block(512)),
        ("head_dim", lambda: head_block(64.0)),
    ],
    "kernels.flash_attention.forward_config": [
        ("head_dim", lambda: forward_config(-8)),
        ("head_dim", lambda: forward_config(1024)),
    ],
    "kernels.flash_attention.backward_configs": [
        ("head_dim", lambda: backward_configs(0)),
        ("head_dim", lambda: backward_configs("64")),
    ],
    "kernels.flash_attention.flash_attention_forward": [
        ("q", lambda: flash_attention_forward(*qkv(torch.float32))),
        ("k/v", lambda: flash_attention_forward(*half_qkv(heads=3, kv_heads=2))),
        ("scale", lambda: flash_attention_forward(*half_qkv(), scale=-0.5)),
        ("causal", lambda: flash_attention_forward(*half_qkv(), causal="true")),
    ],
    "kernels.flash_attention.flash_attention_backward": [
        ("lse", lambda: flash_attention_backward(**backward_args(lse=torch.zeros(1, 2, 1)))),
        ("o", lambda: flash_attention_backward(**backward_args(o=torch.zeros(1, 2, 3, 8)))),   # float32 o
        ("do", lambda: flash_attention_backward(**backward_args(do=torch.zeros(1, 2, 3, 8).half().tolist()))),
        ("causal", lambda: flash_attention_backward(**backward_args(), causal=None)),
    ],
}

NO_BAD_INPUT = {
    "lrn_lib.online_softmax.SoftmaxState": "a NamedTuple of the tensors (m, d) that softmax_state builds; a "
                                           "NamedTuple cannot check its fields, so check_state, merge_states "
                                           "and state_lse check the states they are given",
    "kernels.matmul.hopper_configs": "takes no arguments: it returns the fixed list of autotuning configs",
    "kernels.matmul.clear_launch_plans": "takes no arguments: it empties matmul's cache of launch plans",
}


@pytest.mark.parametrize("argument, call", cases(BAD_CALLS))
def test_bad_call_raises_clear_error(argument, call):
    assert_clear_error(argument, call)
