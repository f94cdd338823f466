"""Chapter 6, section 6.4: the split-key (flash-decoding) kernels for a few queries, and the model's dispatch.

Each case draws fresh random inputs and compares O and L with the float64 attention_reference.
The bar is the forward tests' "rounded P" bar: at most twice the error of attention in float32
with P rounded to the inputs' dtype (floor 1e-3), L within 1e-3 with the same -inf rows. On the
CPU the kernels run in Triton's interpreter; the gpu-marked tests run the compiled kernels at
decoding sizes.
"""
import math

import pytest
import torch

from conftest import kernel_device, needs_triton
from kernels import runtime
from lrn_lib.attention import attention_reference, causal_visible, flash_attention
from lrn_lib.llama import causal_attention

INF = float("inf")


def random_qkv(b, h, h_kv, n_q, n_k, d, dtype, device):
    q = torch.randn(b, h, n_q, d, device=device).to(dtype)
    k = torch.randn(b, h_kv, n_k, d, device=device).to(dtype)
    v = torch.randn(b, h_kv, n_k, d, device=device).to(dtype)
    return q, k, v


def rounded_p_error(q, k, v, causal, o64):
    """Max error against float64 of attention in float32 with P rounded to q's dtype (the bar)."""
    group = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_visible(q.shape[2], k.shape[2], q.device), -INF)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype).float()
    o = (p @ v.float().repeat_interleave(group, 1)).to(q.dtype)
    return (o.double() - o64).abs().max().item()


def check_decode(shape, causal, dtype, device, n_splits=None):
    """flash_decode on fresh inputs of shape (B, H, Hkv, Nq, Nk, d) against the float64 reference."""
    from kernels.flash_decoding import flash_decode

    q, k, v = random_qkv(*shape, dtype, device)
    o, lse = flash_decode(q, k, v, causal=causal, n_splits=n_splits)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    o64, lse64 = attention_reference(q.double(), k.double(), v.double(), causal)
    assert torch.equal(lse.isinf(), lse64.isinf())
    assert not o.isnan().any()
    finite = lse64.isfinite()
    if finite.any():
        assert (lse.double()[finite] - lse64[finite]).abs().max().item() < 1e-3
    ours = (o.double() - o64).abs().max().item()
    bar = max(rounded_p_error(q, k, v, causal, o64), 1e-3)
    assert ours <= 2 * bar, f"error {ours:.2e} over twice the rounded-P error {bar:.2e}"


DECODE_SHAPES = [  # (B, H, Hkv, Nq, Nk, d): GQA ratios 1 and 4, Nq in {1, 3, 16}, odd Nk
    (1, 4, 1, 1, 1, 64), (2, 2, 2, 3, 17, 128), (1, 4, 1, 16, 1000, 64), (1, 8, 2, 3, 1000, 128),
    (2, 3, 3, 16, 17, 64), (1, 4, 1, 1, 1000, 128), (1, 4, 4, 16, 1, 128),
]


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_matches_float64_reference(shape, causal):
    if runtime.MODE == "compiled":
        pytest.skip("interpreter sizes; compiled kernels are tested under the gpu marker")
    torch.manual_seed(sum(shape) + causal)
    check_decode(shape, causal, torch.float16, "cpu")


@needs_triton
@pytest.mark.parametrize("n_splits", [1, 2, 7, 256])
def test_decode_is_right_for_any_number_of_chunks(n_splits):
    # 16 causal queries over 300 keys in chunks of 64 or more: with 7 chunks and up the last chunk holds
    # only masked keys for the first queries; 256 is capped at one chunk per key block
    torch.manual_seed(n_splits)
    check_decode((1, 4, 1, 16, 300, 64), True, torch.float16, kernel_device(), n_splits=n_splits)


@needs_triton
def test_decode_with_more_queries_than_keys_and_bfloat16_and_odd_head_dim():
    torch.manual_seed(3)
    check_decode((1, 4, 2, 16, 5, 40), True, torch.bfloat16, kernel_device())   # 11 queries see no key
    check_decode((1, 8, 1, 16, 33, 96), False, torch.bfloat16, kernel_device())  # 128 packed rows: 2 blocks


@needs_triton
def test_decode_reads_strided_inputs_and_honours_scale():
    from kernels.flash_decoding import flash_decode

    torch.manual_seed(4)
    q, k, v = (t.transpose(1, 2) for t in (torch.randn(1, 3, 8, 64).half(), torch.randn(1, 70, 2, 64).half(),
                                           torch.randn(1, 70, 2, 64).half()))
    q, k, v = (t.to(kernel_device()) for t in (q, k, v))
    o, lse = flash_decode(q, k, v, causal=True, scale=0.2)
    o64, lse64 = attention_reference(q.double(), k.double(), v.double(), causal=True, scale=0.2)
    assert (o.double() - o64).abs().max().item() < 2e-3
    assert (lse.double() - lse64).abs().max().item() < 1e-4


@needs_triton
@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "float16 or bfloat16"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "does not divide"),
    (lambda q, k, v: (q[..., :32], k, v), ValueError, "agree with q in batch and head_dim"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "non-empty"),
])
def test_decode_rejects_bad_inputs(call, error, match):
    from kernels.flash_decoding import flash_decode

    q, k, v = random_qkv(1, 4, 2, 2, 9, 64, torch.float16, kernel_device())
    with pytest.raises(error, match=match):
        flash_decode(*call(q, k, v))
    with pytest.raises(ValueError, match="n_splits"):
        flash_decode(q, k, v, n_splits=0)
    with pytest.raises(TypeError, match="causal"):
        flash_decode(q, k, v, causal=None)


GPU_DECODE_SHAPES = [  # (B, H, Hkv, Nq, Nk, d)
    (1, 32, 8, 1, 1024, 128), (2, 32, 8, 4, 8191, 128), (1, 4, 1, 16, 32768, 128), (4, 8, 8, 3, 1000, 64),
    (1, 32, 8, 16, 131072, 128), (3, 16, 4, 1, 17, 64), (1, 4, 1, 16, 1, 128), (2, 8, 2, 16, 4097, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GPU_DECODE_SHAPES)
def test_compiled_decode_matches_float64_reference(shape, causal, dtype):
    torch.manual_seed(sum(shape))
    check_decode(shape, causal, dtype, "cuda")


@pytest.mark.gpu
def test_the_model_attention_decodes_without_grad_and_uses_the_forward_kernel_with_it(monkeypatch):
    import kernels.flash_decoding

    calls = []
    decode = kernels.flash_decoding.flash_decode
    monkeypatch.setattr(kernels.flash_decoding, "flash_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    q, k, v = random_qkv(1, 8, 2, 4, 5000, 128, torch.bfloat16, "cuda")
    with torch.no_grad():
        o = causal_attention(q, k, v)
    assert calls == [1]
    o64, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert (o.double() - o64).abs().max().item() < 2e-2
    q.requires_grad_()
    o = causal_attention(q, k, v)
    assert calls == [1] and "FlashAttention" in type(o.grad_fn).__name__


def test_the_model_attention_on_cpu_is_flash_attention_for_few_queries():
    # the CPU path is chapter 4's block reference whatever the number of queries
    q, k, v = random_qkv(1, 4, 1, 2, 50, 16, torch.float64, "cpu")
    o64, _ = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), o64)
    torch.testing.assert_close(causal_attention(q, k, v), flash_attention(q, k, v, causal=True))


def test_the_dispatch_decodes_few_queries_over_long_caches_without_gradients_only():
    from kernels.flash_decoding import DECODE_MAX_QUERIES, DECODE_MIN_KEYS
    from kernels.flash_decoding import is_decoding_step

    def qkv(n_q, n_k, grad=False):
        return (torch.empty(1, 4, n_q, 8, requires_grad=grad), torch.empty(1, 1, n_k, 8), torch.empty(1, 1, n_k, 8))

    with torch.no_grad():
        assert is_decoding_step(*qkv(1, DECODE_MIN_KEYS))
        assert is_decoding_step(*qkv(DECODE_MAX_QUERIES, 10 * DECODE_MIN_KEYS))
        assert not is_decoding_step(*qkv(DECODE_MAX_QUERIES + 1, DECODE_MIN_KEYS))
        assert not is_decoding_step(*qkv(1, DECODE_MIN_KEYS - 1))       # a short cache costs less in one launch
    assert not is_decoding_step(*qkv(1, DECODE_MIN_KEYS, grad=True))     # a gradient needs the forward kernel's L


def test_decode_splits_gives_one_program_per_multiprocessor_and_chunks_of_at_most_2048_keys():
    from kernels.flash_decoding import DECODE_CHUNK_KEYS, DECODE_MAX_SPLITS, decode_splits

    assert decode_splits(8, 8192, 64, 132) == 17                   # 32:8 heads, one query: 17 x 8 programs
    assert decode_splits(8, 131072, 64, 132) == 131072 // DECODE_CHUNK_KEYS   # long caches: 2,048-key chunks
    assert decode_splits(1, 131072, 64, 132) == 132                # 4:1 heads: one program per multiprocessor
    assert decode_splits(1, 8192, 64, 132) == 8192 // 128          # at least two key blocks per chunk
    assert decode_splits(1, 10**7, 64, 132) == DECODE_MAX_SPLITS
    assert decode_splits(1000, 100, 64, 132) == 1
