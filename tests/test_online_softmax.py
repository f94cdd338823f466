"""Chapter 2: the online-softmax state and its merge, the two-pass kernel, and the backward pass.

Property tests draw fresh random rows, cut them at random places and merge the pieces in
random orders and groupings; every result is compared with the float64 safe softmax.
"""
import random

import pytest
import torch

from conftest import kernel_device, needs_triton
from kernels import runtime
from lrn_lib.online_softmax import (ReferenceSoftmax, SoftmaxState, TritonSoftmax, merge_lse, merge_states,
                                    online_softmax_reference, softmax_backward_reference, softmax_state,
                                    state_lse)
from lrn_lib.softmax import safe_softmax

KERNEL_TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
INF = float("inf")


def random_rows(rng: random.Random, n_rows: int = 3) -> torch.Tensor:
    """Rows of random length and scale, with scattered -inf entries and a masked stretch."""
    n = rng.randint(1, 200)
    x = torch.randn(n_rows, n, dtype=torch.float64) * rng.choice([0.1, 1.0, 30.0, 100.0])
    x[torch.rand(n_rows, n) < 0.25] = -INF
    x[0, : rng.randint(0, n)] = -INF
    return x


def random_bracketing(rng: random.Random, states: list[SoftmaxState]) -> SoftmaxState:
    states = list(states)
    rng.shuffle(states)
    while len(states) > 1:
        i = rng.randrange(len(states) - 1)
        states[i:i + 2] = [merge_states(states[i], states[i + 1])]
    return states[0]


def softmax_from_state(x: torch.Tensor, state: SoftmaxState) -> torch.Tensor:
    m = torch.where(state.m == -INF, torch.zeros_like(state.m), state.m)
    return torch.exp(x.to(m.dtype) - m[:, None]) / state.d[:, None]


# ------------------------------------------------------------------ the state and its merge

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_any_split_merged_in_any_order_gives_the_safe_softmax(dtype):
    rng = random.Random(1234 + len(str(dtype)))
    for _ in range(100):
        x = random_rows(rng).to(dtype)
        cuts = sorted(rng.sample(range(1, x.shape[1]), k=min(x.shape[1] - 1, rng.randint(0, 10))))
        state = random_bracketing(rng, [softmax_state(p) for p in torch.tensor_split(x, cuts, dim=-1)])
        exact = safe_softmax(x.double())
        ours = softmax_from_state(x, state).double()
        tolerance = 1e-13 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours, exact, rtol=0, atol=tolerance, equal_nan=True)


def test_merge_is_commutative_exactly_and_has_the_empty_identity():
    rng = random.Random(7)
    for _ in range(50):
        a, b = softmax_state(random_rows(rng)[:, :5]), softmax_state(random_rows(rng)[:, :5])
        assert all(torch.equal(u, v) for u, v in zip(merge_states(a, b), merge_states(b, a)))
        empty = SoftmaxState(torch.full_like(a.m, -INF), torch.zeros_like(a.d))
        assert all(torch.equal(u, v) for u, v in zip(merge_states(a, empty), a))


def test_merging_two_empty_states_stays_empty_without_nan():
    empty = SoftmaxState(torch.tensor([-INF]), torch.tensor([0.0]))
    m, d = merge_states(empty, empty)
    assert m.item() == -INF and d.item() == 0.0
    assert state_lse(empty).item() == -INF


def test_state_of_an_all_minus_inf_row_is_the_identity():
    m, d = softmax_state(torch.full((2, 4), -INF))
    assert (m == -INF).all() and (d == 0).all()


def test_lse_merge_matches_logaddexp_and_the_state_merge():
    rng = random.Random(3)
    for _ in range(50):
        a, b = softmax_state(random_rows(rng)[:, :7]), softmax_state(random_rows(rng)[:, :7])
        la, lb = state_lse(a), state_lse(b)
        torch.testing.assert_close(merge_lse(la, lb), torch.logaddexp(la, lb), rtol=1e-13, atol=0)
        torch.testing.assert_close(merge_lse(la, lb), state_lse(merge_states(a, b)), rtol=1e-13, atol=0)


@pytest.mark.parametrize("block", [1, 7, 256])
def test_online_reference_matches_float64_softmax(block):
    x = torch.randn(5, 1001, dtype=torch.float64) * 20
    x[2] = -INF
    torch.testing.assert_close(online_softmax_reference(x, block=block), safe_softmax(x),
                               rtol=0, atol=1e-13, equal_nan=True)
    x32 = torch.randn(2, 3, 300) * 5
    torch.testing.assert_close(online_softmax_reference(x32, dim=1, block=2).double(),
                               torch.softmax(x32.double(), 1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the two-pass kernel

def online_kernel_case(shape, dtype, device):
    from kernels.online_softmax import online_softmax_triton

    x = (torch.randn(shape, device=device) * 5).to(dtype)
    x[0, : shape[1] // 2] = -INF
    y = online_softmax_triton(x)
    assert y.shape == x.shape and y.dtype == dtype
    error = (y.double() - torch.softmax(x.double(), -1)).abs().max().item()
    assert error < KERNEL_TOLERANCE[dtype], f"{shape} {dtype}: {error:.2e}"


@needs_triton
@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 17), (4, 4096), (2, 4097), (2, 10_001)])
def test_online_kernel_matches_float64_softmax(shape, dtype):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    online_kernel_case(shape, dtype, "cpu")


@needs_triton
def test_online_kernel_all_minus_inf_row_is_nan_and_other_dims_work():
    from kernels.online_softmax import online_softmax_triton

    x = torch.randn(3, 9, 5, device=kernel_device())
    x[1, :, 2] = -INF
    y = online_softmax_triton(x, dim=1)
    assert y[1, :, 2].isnan().all()
    keep = ~torch.isnan(y)
    torch.testing.assert_close(y[keep].double(), torch.softmax(x.double(), 1)[keep], rtol=0, atol=2e-6)
    xt = torch.randn(50, 7, device=kernel_device()).t()
    torch.testing.assert_close(online_softmax_triton(xt).double(), torch.softmax(xt.double(), -1),
                               rtol=0, atol=2e-6)


@needs_triton
def test_online_kernel_rejects_bad_input():
    from kernels.online_softmax import online_softmax_triton

    device = kernel_device()
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        online_softmax_triton(torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="dim=-3 is out of range"):
        online_softmax_triton(torch.randn(2, 3, device=device), dim=-3)
    with pytest.raises(ValueError, match="x has shape \\(0, 3\\)"):
        online_softmax_triton(torch.randn(0, 3, device=device))
    with pytest.raises(ValueError, match="out is on meta"):
        online_softmax_triton(torch.randn(2, 3, device=device), out=torch.empty(2, 3, device="meta"))


# ------------------------------------------------------------------ the backward pass

def test_backward_formula_passes_gradcheck_in_float64():
    x = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ReferenceSoftmax.apply(t, -1), (x,))
    x3 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ReferenceSoftmax.apply(t, 1), (x3,))


def test_backward_reference_matches_torch_autograd():
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 40, dtype=torch.float64)
    y = torch.softmax(x, -1)
    (expected,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(softmax_backward_reference(y.detach(), dy), expected, rtol=1e-13, atol=1e-15)


def backward_kernel_case(shape, dim, dtype, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    (ours,) = torch.autograd.grad(TritonSoftmax.apply(x, dim), x, dy)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(torch.softmax(x64, dim), x64, dy.double())
    assert ours.dtype == dtype
    error = (ours.double() - expected).abs().max().item()
    assert error < {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype], error


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((5, 37), -1), ((4, 6, 9), 1), ((3, 600), 0),
                                       ((2, 70_001), -1)])
def test_triton_softmax_gradient_matches_torch_autograd(shape, dim, dtype):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    backward_kernel_case(shape, dim, dtype, "cpu")


@needs_triton
def test_backward_kernel_rejects_mismatched_gradients():
    from kernels.online_softmax import softmax_backward_triton

    device = kernel_device()
    y = torch.softmax(torch.randn(3, 4, device=device), -1)
    with pytest.raises(ValueError, match="dy has shape \\(4, 3\\)"):
        softmax_backward_triton(y, torch.randn(4, 3, device=device))
    with pytest.raises(ValueError, match="dy has shape .* dtype torch.float16"):
        softmax_backward_triton(y, torch.randn(3, 4, device=device).half())
    with pytest.raises(TypeError, match="dy has dtype torch.int32"):
        softmax_backward_triton(y, torch.ones(3, 4, dtype=torch.int32, device=device))


# ------------------------------------------------------------------ compiled on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (4096, 32768), (1024, 262_144), (7, 1_000_003), (300, 4097)])
def test_compiled_online_kernel_matches_float64_softmax(shape, dtype):
    online_kernel_case(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim", [((4096, 4096), -1), ((64, 8, 1000), 1), ((32, 200_000), -1)])
def test_compiled_triton_softmax_gradient_matches_torch_autograd(shape, dim, dtype):
    backward_kernel_case(shape, dim, dtype, "cuda")
