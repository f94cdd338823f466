"""Chapter 3: matmul's launch plans (section 3.6). The first call for a layout decides and runs,
later calls of that layout reuse the decision, and every call still checks its arguments.

Interpreter tests run the plans at tiny sizes on the CPU; the compiled ones, under the ``gpu``
marker, check that a plan's later calls (which launch Triton's compiled binary directly) give
the first call's result on fresh inputs, for every route: autotuned, skinny, padded, split-K.
"""
import pytest
import torch

from conftest import kernel_device, needs_triton
from kernels import runtime
from kernels.matmul import clear_launch_plans, matmul
from test_matmul import KERNEL_DTYPES, assert_close_to_float64, operands


def reference_then_planned(m, n, k, dtype, device, **options):
    """Multiply two fresh pairs of one layout: the first makes the plan, the second reuses it."""
    first = operands(m, n, k, dtype, device)
    made = matmul(*first, **options)
    second = operands(m, n, k, dtype, device)
    return first, made, second, matmul(*second, **options)


def one_plan(m, n, k, dtype):
    """Forget every plan, then make one: return the operands it was made with."""
    clear_launch_plans()
    a, b = operands(m, n, k, dtype, kernel_device())
    matmul(a, b)
    return a, b


@needs_triton
def test_one_plan_per_layout_and_options():
    a, b = one_plan(20, 30, 40, torch.float32)
    matmul(a + 1, b)                                   # same layout: the same plan
    matmul(a.t().contiguous().t(), b)                  # column-major a: a plan of its own
    matmul(a, b, allow_tf32=not torch.backends.cuda.matmul.allow_tf32)
    matmul(a, b, split_k=2)
    assert clear_launch_plans() == 4
    assert clear_launch_plans() == 0


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("options", [{}, {"split_k": 3}, {"config": {"BLOCK_M": 16, "BLOCK_N": 32,
                                                                     "BLOCK_K": 16, "GROUP_M": 2}}])
def test_a_reused_plan_multiplies_fresh_operands(dtype, options):
    clear_launch_plans()
    first, made, second, planned = reference_then_planned(33, 17, 250, dtype, kernel_device(), **options)
    assert_close_to_float64(made, *first)
    assert_close_to_float64(planned, *second)
    assert planned.data_ptr() != made.data_ptr()       # each call gets its own output


@needs_triton
def test_an_operand_offset_by_one_element_gets_its_own_plan():
    a, b = one_plan(20, 32, 48, torch.float16)
    shifted = torch.randn(20 * 48 + 1, device=a.device).to(torch.float16)[1:].view(20, 48)   # 2 bytes off
    assert_close_to_float64(matmul(shifted, b), shifted, b)
    assert clear_launch_plans() == 2


@needs_triton
@pytest.mark.parametrize("bad, error, words", [
    (lambda a, b: matmul(a, b.half()), TypeError, "b has dtype"),
    (lambda a, b: matmul(a, b.to("meta")), ValueError, "b is on meta"),
    (lambda a, b: matmul(a.reshape(-1), b), ValueError, "a has shape"),
    (lambda a, b: matmul(a, b, allow_tf32=1), TypeError, "allow_tf32"),
    (lambda a, b: matmul(a, b, split_k=0), ValueError, "split_k"),
    (lambda a, b: matmul(a, b, config={"BLOCK_M": 16}), ValueError, "config"),
])
def test_arguments_are_checked_after_a_plan_exists(bad, error, words):
    a, b = one_plan(8, 16, 16, torch.float32)
    with pytest.raises(error, match=words):
        bad(a, b)


def test_plans_keep_at_most_their_size_dropping_the_oldest():
    plans = runtime.LaunchPlans(2)
    for key in "abc":
        assert plans.keep(key, key.upper()) == key.upper()
    assert list(plans) == ["b", "c"]
    with pytest.raises(ValueError, match="size"):
        runtime.LaunchPlans(0)


# ------------------------------------------------------------------ compiled on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 512), (16, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192),
                                   (4097, 4095, 4093), (1000, 1000, 1000), (128, 1024, 8192), (1, 17, 1000)])
def test_compiled_plans_match_float64_on_their_second_call(m, n, k, dtype):
    first, made, second, planned = reference_then_planned(m, n, k, dtype, "cuda")
    assert_close_to_float64(made, *first)
    assert_close_to_float64(planned, *second)
    again = matmul(*first)                                 # the direct launch, on the first operands
    assert torch.equal(again, made), "the plan's launch differs from the first call's"


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 5])
def test_compiled_split_k_plans_match_float64_on_their_second_call(split_k):
    first, made, second, planned = reference_then_planned(300, 500, 4097, torch.bfloat16, "cuda", split_k=split_k)
    assert_close_to_float64(planned, *second)
    assert torch.equal(matmul(*first, split_k=split_k), made)


@pytest.mark.gpu
def test_compiled_plans_launch_on_the_current_stream_and_see_misaligned_operands():
    a, b = operands(256, 512, 256, torch.bfloat16, "cuda")
    matmul(a, b)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        c = matmul(a, b)
    side.synchronize()
    assert_close_to_float64(c, a, b)
    shifted = torch.randn(256 * 256 + 1, device="cuda").to(torch.bfloat16)[1:].view(256, 256)
    for _ in range(2):
        assert_close_to_float64(matmul(shifted, b), shifted, b)
