"""Chapter 1: the softmax references, the dispatcher and the Triton kernels.

Kernels run in Triton's interpreter on CPU at small sizes, and compiled at real sizes
under the ``gpu`` marker. Every check draws fresh random inputs and compares with a
float64 reference.
"""
import pytest
import torch

from conftest import needs_triton
from kernels import runtime
from lrn_lib.softmax import logsumexp, safe_softmax, softmax

KERNEL_TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x.double(), dim=dim)


def random_logits(shape, dtype=torch.float32, device="cpu", scale=5.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------ references

@pytest.mark.parametrize("shape,dim", [((1,), 0), ((7, 1), -1), ((3, 5, 129), 1), ((2, 1000), -1)])
def test_safe_softmax_matches_float64_softmax(shape, dim):
    x = random_logits(shape, torch.float64, scale=40.0)
    torch.testing.assert_close(safe_softmax(x, dim), reference(x, dim), rtol=0, atol=1e-13)


def test_safe_softmax_survives_logits_that_overflow_exp():
    x = torch.tensor([[1000.0, 0.0, -1000.0], [12.0, 11.0, 0.0]])
    y = safe_softmax(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(x), rtol=0, atol=1e-7)
    y16 = safe_softmax(x[1:].half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()


def test_safe_softmax_of_all_minus_inf_row_is_nan_like_torch():
    x = torch.tensor([[-float("inf")] * 3, [0.0, 1.0, 2.0]])
    y = safe_softmax(x)
    assert y[0].isnan().all()
    torch.testing.assert_close(y[1], torch.softmax(x[1], -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_references_return_the_input_dtype(dtype):
    x = random_logits((4, 9), dtype)
    assert safe_softmax(x).dtype == dtype and logsumexp(x).dtype == dtype


def test_logsumexp_matches_torch_and_handles_extremes():
    x = random_logits((6, 333), torch.float64, scale=300.0)
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1), rtol=1e-14, atol=0)
    extremes = torch.tensor([[1e4, 1e4], [-float("inf"), -float("inf")]], dtype=torch.float64)
    out = logsumexp(extremes)
    assert out[0].item() == pytest.approx(1e4 + torch.log(torch.tensor(2.0)).item())
    assert out[1].item() == -float("inf")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("fn", [safe_softmax, logsumexp, softmax])
def test_integer_input_raises_type_error_naming_x(fn):
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        fn(torch.arange(6).reshape(2, 3))


@pytest.mark.parametrize("dim", [2, -3, 1.0])
def test_dim_out_of_range_raises_value_error(dim):
    with pytest.raises(ValueError, match=r"dim=.* out of range"):
        softmax(torch.randn(2, 3), dim=dim)


@pytest.mark.parametrize("x", [torch.randn(0), torch.randn(3, 0), torch.tensor(1.0)])
def test_empty_or_0d_input_raises_value_error(x):
    with pytest.raises(ValueError, match=r"x (is empty|is a 0-d)"):
        softmax(x)


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        softmax([1.0, 2.0])


def test_unknown_impl_raises_value_error():
    with pytest.raises(ValueError, match="impl="):
        softmax(torch.randn(3), impl="cuda")


def test_softmax_auto_on_cpu_uses_the_reference():
    x = random_logits((5, 11))
    torch.testing.assert_close(softmax(x), safe_softmax(x), rtol=0, atol=0)


# ------------------------------------------------------------------ kernels, interpreter on CPU

def kernel_case(shape, dtype, device, dim=-1):
    from kernels.softmax import softmax_triton

    x = random_logits(shape, dtype, device)
    y = softmax_triton(x, dim)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    error = (y.double() - reference(x, dim)).abs().max().item()
    assert error < KERNEL_TOLERANCE[dtype], f"{shape} {dtype}: max error {error:.2e}"


@needs_triton
@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 1), (5, 17), (19, 1000), (2, 4096), (1, 4097)])
def test_kernel_matches_float64_softmax_on_odd_shapes(shape, dtype):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    kernel_case(shape, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("n_cols", [65537, 100_003])
def test_kernel_handles_rows_longer_than_the_fused_limit(n_cols):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    from kernels.softmax import FUSED_MAX_COLS

    assert n_cols > FUSED_MAX_COLS
    kernel_case((2, n_cols), torch.float32, "cpu")
    kernel_case((1, n_cols), torch.bfloat16, "cpu")


def device_for_kernels() -> str:
    return "cuda" if runtime.MODE == "compiled" else "cpu"


@needs_triton
def test_kernel_on_any_dim_and_non_contiguous_input():
    from kernels.softmax import softmax_triton

    x = random_logits((6, 5, 7), device=device_for_kernels()).transpose(0, 2)  # (7, 5, 6), strided
    for dim in range(3):
        torch.testing.assert_close(softmax_triton(x, dim).double(), reference(x, dim), rtol=0, atol=2e-6)


@needs_triton
@pytest.mark.parametrize("n_cols", [5, 70000])
def test_kernel_all_minus_inf_row_is_nan_like_torch(n_cols):
    from kernels.softmax import softmax_triton

    x = random_logits((3, n_cols), device=device_for_kernels())
    x[1] = -float("inf")
    x[2, : n_cols // 2] = -float("inf")
    y = softmax_triton(x)
    assert y[1].isnan().all()
    torch.testing.assert_close(y[[0, 2]].double(), reference(x)[[0, 2]], rtol=0, atol=2e-6)


@needs_triton
def test_kernel_writes_into_out():
    from kernels.softmax import softmax_triton

    x = random_logits((4, 33), device=device_for_kernels())
    out = torch.full_like(x, float("nan"))
    assert softmax_triton(x, out=out) is out
    torch.testing.assert_close(out.double(), reference(x), rtol=0, atol=2e-6)


@needs_triton
def test_kernel_rejects_bad_input_with_clear_errors():
    from kernels.softmax import softmax_triton

    device = device_for_kernels()
    x = random_logits((2, 3), device=device)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        softmax_triton(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        softmax_triton(x.double())
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        softmax_triton(x, dim=2)
    with pytest.raises(ValueError, match="non-empty"):
        softmax_triton(torch.empty(2, 0, device=device))
    with pytest.raises(ValueError, match="out has shape"):
        softmax_triton(x, out=torch.empty(3, 2, device=device))
    with pytest.raises(ValueError, match="out has shape .* dtype torch.float16"):
        softmax_triton(x, out=torch.empty(2, 3, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        softmax_triton("not a tensor")


@needs_triton
def test_kernel_rejects_out_on_another_device():
    from kernels.softmax import softmax_triton

    x = random_logits((2, 3), device=device_for_kernels())
    other = torch.device("meta")
    with pytest.raises(ValueError, match="out is on meta but x is on"):
        softmax_triton(x, out=torch.empty(2, 3, device=other))


@needs_triton
def test_softmax_impl_triton_matches_reference():
    x = random_logits((9, 130), device=device_for_kernels())
    torch.testing.assert_close(softmax(x, impl="triton").double(), reference(x), rtol=0, atol=2e-6)


@needs_triton
@pytest.mark.parametrize("n_cols", [33, 70000])
def test_a_kept_launch_serves_fresh_inputs_of_its_layout_and_out_offset_by_one_element(n_cols):
    from kernels import softmax as ks

    device = device_for_kernels()
    ks._plans.clear()
    for _ in range(2):                                  # the first call launches through the JIT, the second directly
        x = random_logits((3, n_cols), device=device)
        torch.testing.assert_close(ks.softmax_triton(x).double(), reference(x), rtol=0, atol=2e-6)
    out = torch.empty(3 * n_cols + 1, device=device)[1:].view(3, n_cols)   # 4 bytes off 16-byte alignment
    for _ in range(2):
        assert ks.softmax_triton(x, out=out) is out
        torch.testing.assert_close(out.double(), reference(x), rtol=0, atol=2e-6)
    assert len(ks._plans) == 2


# ------------------------------------------------------------------ kernels, compiled on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCE))
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1000, 17), (4097, 1000), (4096, 32768), (64, 32769),
                                   (16, 65537), (4, 300_000), (65536, 4096), (16384, 1024)])
def test_compiled_kernel_matches_float64_softmax(shape, dtype):
    kernel_case(shape, dtype, "cuda")
    kernel_case(shape, dtype, "cuda")                    # again: the launch kept for this layout


@pytest.mark.gpu
def test_compiled_kernel_rejects_cpu_tensors():
    from kernels.softmax import softmax_triton

    with pytest.raises(ValueError, match="x is on cpu"):
        softmax_triton(torch.randn(2, 3))


@pytest.mark.gpu
def test_softmax_auto_on_cuda_uses_the_kernel_and_matches():
    x = random_logits((300, 5000), torch.bfloat16, "cuda")
    torch.testing.assert_close(softmax(x).double(), reference(x), rtol=0, atol=8e-3)
