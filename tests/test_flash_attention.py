"""Chapter 4: standard attention, FlashAttention-2 in PyTorch blocks, and the Triton kernels.

The kernels' forward output, log-sum-exp and gradients are compared with a float64
reference; the bound is FlashAttention's: at most twice the error of standard attention in
the same low precision (with a floor of 1e-3 where both are tiny).
"""
import math

import pytest
import torch

from kernels import runtime
from lrn_lib.attention import (attention_reference, causal_visible, flash_attention, flash_attention_backward_blocks,
                               flash_attention_blocks)

needs_triton = pytest.mark.skipif(runtime.MODE == "unavailable", reason="triton is not installed")
INF = float("inf")


def kernel_device() -> str:
    return "cuda" if runtime.MODE == "compiled" else "cpu"


def random_qkv(b, h, h_kv, n_q, n_k, d, dtype=torch.float64, device="cpu"):
    q = torch.randn(b, h, n_q, d, device=device).to(dtype)
    k = torch.randn(b, h_kv, n_k, d, device=device).to(dtype)
    v = torch.randn(b, h_kv, n_k, d, device=device).to(dtype)
    return q, k, v


# ------------------------------------------------------------------ references

def test_causal_mask_is_aligned_bottom_right():
    mask = causal_visible(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_visible(3, 2).tolist() == [[False, False], [True, False], [True, True]]


def test_reference_matches_sdpa_in_float64():
    q, k, v = random_qkv(2, 4, 4, 33, 47, 16)
    o, _ = attention_reference(q, k, v)
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    o, _ = attention_reference(q, k[:, :, :33], v[:, :, :33], causal=True, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :33], v[:, :, :33], is_causal=True,
                                                                scale=0.3)
    torch.testing.assert_close(o, expected)


def test_queries_that_see_no_key_give_zero_output_and_minus_inf_lse():
    q, k, v = random_qkv(1, 2, 1, 10, 4, 8)
    o, lse = attention_reference(q, k, v, causal=True)
    assert (lse[:, :, :6] == -INF).all() and lse[:, :, 6:].isfinite().all()
    assert (o[:, :, :6] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 8), (2, 4, 2, 37, 29, 16), (1, 6, 1, 20, 45, 32),
                                   (1, 2, 2, 64, 64, 8)])
def test_block_forward_and_backward_match_autograd_of_the_reference(shape, causal):
    q, k, v = (t.requires_grad_() for t in random_qkv(*shape))
    o_ref, lse_ref = attention_reference(q, k, v, causal)
    o, lse = flash_attention_blocks(q, k, v, causal, block_m=16, block_n=8)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)
    do = torch.randn_like(o)
    expected = torch.autograd.grad(o_ref, (q, k, v), do)
    got = flash_attention_backward_blocks(q, k, v, o, lse, do, causal, block_n=8)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-11)


def test_flash_attention_on_cpu_uses_the_differentiable_reference():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, 9, 12, 16))
    o, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    o_ref, lse_ref = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal=True), (q, k, v))


@pytest.mark.parametrize("call,error,match", [
    (lambda: flash_attention(*random_qkv(1, 3, 2, 4, 4, 8)), ValueError, "does not divide q's 3 heads"),
    (lambda: flash_attention(torch.ones(1, 1, 2, 8, dtype=torch.int64), *random_qkv(1, 1, 1, 2, 2, 8)[1:]),
     TypeError, "q has dtype torch.int64"),
    (lambda: flash_attention(*random_qkv(1, 1, 1, 2, 2, 8)[:2], torch.randn(1, 1, 2, 8)), TypeError, "must match"),
    (lambda: flash_attention(torch.randn(2, 8, dtype=torch.float64), *random_qkv(1, 1, 1, 2, 2, 8)[1:]),
     ValueError, "expected 4 dims"),
    (lambda: flash_attention(torch.randn(1, 1, 0, 8, dtype=torch.float64), *random_qkv(1, 1, 1, 2, 2, 8)[1:]),
     ValueError, "q is empty"),
])
def test_bad_attention_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ the kernels

def low_precision_errors_and_kernel_errors(shape, causal, dtype, device, scale=None):
    from kernels.flash_attention import flash_attention_backward, flash_attention_forward

    q, k, v = random_qkv(*shape, dtype=dtype, device=device)
    do = torch.randn(q.shape, device=device).to(dtype)
    o, lse = flash_attention_forward(q, k, v, causal, scale)
    ours = (o, *flash_attention_backward(q, k, v, o, lse, do, causal, scale))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_reference(q64, k64, v64, causal, scale)
    exact = (o64, *torch.autograd.grad(o64, (q64, k64, v64), do.double()))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    group = shape[1] // shape[2]
    scale = 1 / math.sqrt(shape[-1]) if scale is None else scale
    s = scale * qq.float() @ kk.float().repeat_interleave(group, 1).transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_visible(shape[3], shape[4], q.device), -INF)
    o_low = (torch.softmax(s, -1).nan_to_num(0.0).to(dtype).float() @ vv.float().repeat_interleave(group, 1)).to(dtype)
    low = (o_low, *torch.autograd.grad(o_low, (qq, kk, vv), do))
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1:])
    assert torch.equal(lse.isinf(), lse64.isinf())
    finite = lse64.isfinite()
    assert (lse.double()[finite] - lse64[finite]).abs().max().item() < 1e-3
    for name, a, e, lo in zip(("O", "dQ", "dK", "dV"), ours, exact, low):
        ours_error = (a.double() - e).abs().max().item()
        low_error = (lo.double() - e).abs().max().item()
        assert ours_error <= 2 * max(low_error, 1e-3), f"{name}: ours {ours_error:.2e}, low precision {low_error:.2e}"


INTERPRETER_SHAPES = [  # (B, H, Hkv, Nq, Nk, d)
    (1, 1, 1, 1, 1, 32), (1, 2, 1, 17, 17, 64), (2, 2, 2, 113, 37, 96), (1, 4, 2, 37, 113, 128),
    (1, 2, 1, 20, 33, 256), (1, 3, 3, 64, 64, 32),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES)
def test_kernels_match_float64_within_twice_low_precision_error(shape, causal, dtype):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    low_precision_errors_and_kernel_errors(shape, causal, dtype, "cpu")


@needs_triton
def test_kernels_read_strided_inputs_in_place():
    from kernels.flash_attention import flash_attention_forward

    q, k, v = (t.transpose(1, 2) for t in random_qkv(1, 9, 2, 2, 2, 32, torch.float16, kernel_device()))
    assert not q.is_contiguous()
    o, lse = flash_attention_forward(q, k, v, causal=True)
    o_ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert (o.double() - o_ref).abs().max().item() < 2e-3


@needs_triton
@pytest.mark.parametrize("call,error,match", [
    (lambda d: ((torch.randn(1, 1, 4, 48).half(),) * 3), ValueError, "head_dim 48 is not supported"),
    (lambda d: ((torch.randn(1, 1, 4, 32, dtype=torch.float32),) * 3), TypeError, "float16 or bfloat16"),
    (lambda d: (torch.randn(1, 3, 4, 32).half(), torch.randn(1, 2, 4, 32).half(), torch.randn(1, 2, 4, 32).half()),
     ValueError, "does not divide"),
    (lambda d: (torch.randn(1, 1, 4, 32).half(), torch.randn(1, 1, 4, 32).bfloat16(),
                torch.randn(1, 1, 4, 32).half()), TypeError, "must match"),
    (lambda d: (torch.randn(1, 1, 4, 32).half(), torch.randn(1, 1, 4, 32, device="meta").half(),
                torch.randn(1, 1, 4, 32).half()), ValueError, "is on meta"),
])
def test_kernel_launchers_reject_bad_inputs(call, error, match):
    from kernels.flash_attention import flash_attention_forward

    device = kernel_device()
    tensors = [t if t.device.type == "meta" else t.to(device) for t in call(device)]
    with pytest.raises(error, match=match):
        flash_attention_forward(*tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [
    (1, 8, 2, 1000, 1000, 64), (2, 8, 8, 1024, 4096, 128), (1, 4, 1, 4096, 1024, 256), (2, 16, 4, 513, 777, 96),
    (4, 8, 8, 2048, 2048, 32), (1, 4, 4, 1, 113, 128), (1, 2, 1, 17, 1, 64),
])
def test_compiled_kernels_match_float64_within_twice_low_precision_error(shape, causal, dtype):
    low_precision_errors_and_kernel_errors(shape, causal, dtype, "cuda")


@pytest.mark.gpu
def test_flash_attention_on_cuda_uses_the_kernel_and_its_gradients():
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 8, 2, 300, 300, 64, torch.bfloat16, "cuda"))
    o = flash_attention(q, k, v, causal=True)
    assert o.grad_fn is not None and "FlashAttention" in type(o.grad_fn).__name__
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, _ = attention_reference(q64, k64, v64, causal=True)
    for a, e in zip(grads, torch.autograd.grad(o64, (q64, k64, v64), do.double())):
        assert (a.double() - e).abs().max().item() < 0.1


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_honour_the_scale_argument(causal):
    low_precision_errors_and_kernel_errors((1, 4, 2, 45, 70, 64), causal, torch.float16, kernel_device(), scale=0.37)
