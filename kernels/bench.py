"""Benchmarks of the book's kernels against PyTorch, measured side by side in one run.

Hand-written tool (not exported from a chapter).

    python -m kernels.bench [NAME ...] [--out DIR]

Each case first checks our result against PyTorch's on the same fresh random input, then
times both with ``triton.testing.do_bench`` (median of many runs, warm-up excluded, L2
flushed between runs), and prints effective bandwidth (GB/s from the fewest bytes the
operation must move), the ratio ours/torch of the medians (above 1 means we are faster), and
a second table with each side's fastest, median and slowest run (the spread of every figure).
A check compares every output (for attention forward+backward: dQ, dK and dV). An anchor
that does not run here (a backend that refuses a shape, torch.compile failing) is reported
on a ``skip:`` line and left out, not fatal. A JSON file with the device, versions, date,
all rows and the skips goes to ``--out`` (default ``benchmarks/results``).
Needs a CUDA GPU and refuses clearly without one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch


@dataclass
class Case:
    """One timed comparison: our function and PyTorch's on the same input."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    ours: Callable[[], torch.Tensor]
    torch_fn: Callable[[], torch.Tensor]
    bytes_moved: int
    tolerance: float
    flops: int = 0  # arithmetic of the operation, for compute-bound kernels (0: report GB/s only)
    # optional: the same two functions over rotating input sets (together larger than L2), timed as
    # CUDA-graph replays, which leave out the host's launch overhead (how decoding loops run them)
    ours_sets: list[Callable[[], torch.Tensor]] | None = None
    torch_sets: list[Callable[[], torch.Tensor]] | None = None


SKIPPED: list[str] = []  # the anchors that did not run in this process, one line each


def skip(line: str) -> None:
    """Report an anchor left out (printed at once on a ``skip:`` line, kept for the JSON)."""
    SKIPPED.append(line)
    print(f"skip: {line}", flush=True)


def compile_anchor(fn: Callable[..., torch.Tensor], *example: torch.Tensor, label: str,
                   **options) -> Callable[..., torch.Tensor] | None:
    """torch.compile(fn, **options), run once on example; None (and a skip line) if that fails.

    The first call compiles, so a failure (no compiler, an unsupported backend) shows here,
    before any timing; options go to torch.compile (backend, mode, dynamic).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(label, str) or not label:
        raise ValueError("label must be a non-empty string naming the anchor")
    try:
        compiled = torch.compile(fn, **options)
        compiled(*example)
    except Exception as err:  # any compile failure is reported, the other cases still run
        skip(f"{label}: torch.compile failed here, not compared ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})")
        return None
    return compiled


def _softmax_last_dim(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def softmax_cases() -> Iterator[Case]:
    """Row softmax at the sizes of issue 2's acceptance list, float32 and bfloat16.

    Against torch.softmax and, side by side, torch.compile(torch.softmax) (Inductor's fused
    kernel, compiled for each shape), when it compiles here.
    """
    from kernels.softmax import softmax_triton

    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4096, 32768), (65536, 4096), (16384, 1024)):
            x = torch.randn(shape, device="cuda", dtype=dtype) * 4
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            yield Case("softmax", shape, dtype, lambda x=x: softmax_triton(x),
                       lambda x=x: torch.softmax(x, dim=-1), 2 * x.numel() * x.element_size(), tolerance)
            compiled = compile_anchor(_softmax_last_dim, x, label=f"softmax/compile {shape} {dtype}", dynamic=False)
            if compiled is not None:
                yield Case("softmax/compile", shape, dtype, lambda x=x: softmax_triton(x),
                           lambda x=x, f=compiled: f(x), 2 * x.numel() * x.element_size(), tolerance)


def online_softmax_cases() -> Iterator[Case]:
    """Chapter 2's two-pass online softmax at issue 3's sizes, against torch.softmax."""
    from kernels.online_softmax import online_softmax_triton

    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4096, 32768), (1024, 262144)):
            x = torch.randn(shape, device="cuda", dtype=dtype) * 4
            yield Case("online_softmax", shape, dtype, lambda x=x: online_softmax_triton(x),
                       lambda x=x: torch.softmax(x, dim=-1), 2 * x.numel() * x.element_size(),
                       tolerance=1e-5 if dtype == torch.float32 else 1e-2)


def softmax_backward_cases() -> Iterator[Case]:
    """Chapter 2's softmax backward (2.4) against PyTorch's own softmax backward kernel."""
    from kernels.online_softmax import softmax_backward_triton

    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4096, 32768), (16384, 1024), (1024, 262144)):
            y = torch.softmax(torch.randn(shape, device="cuda") * 4, dim=-1).to(dtype)
            dy = torch.randn(shape, device="cuda", dtype=dtype)
            yield Case("softmax_backward", shape, dtype, lambda y=y, dy=dy: softmax_backward_triton(y, dy),
                       lambda y=y, dy=dy: torch.ops.aten._softmax_backward_data(dy, y, -1, dtype),
                       3 * y.numel() * y.element_size(), tolerance=1e-5 if dtype == torch.float32 else 1e-2)


MATMUL_SQUARE = ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 1024, 4096))
# issue 24's odd shapes (M, N, K): small K, skinny M against 8192 x 8192 weights, sizes off every block
MATMUL_ODD = ((4096, 4096, 512), (16, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192), (4097, 4095, 4093))


def matmul_cases() -> Iterator[Case]:
    """Chapter 3's Triton matmul against torch.matmul (cuBLAS): issue 3's sizes and issue 24's odd shapes.

    bfloat16 at every shape, float16 at 8192^3 and the odd shapes. Skinny shapes are memory-bound
    (B read once), the rest compute-bound; do_bench flushes L2 between runs.
    """
    from kernels.matmul import matmul

    for dtype, shapes in ((torch.bfloat16, MATMUL_SQUARE + MATMUL_ODD),
                          (torch.float16, ((8192, 8192, 8192),) + MATMUL_ODD)):
        for m, n, k in shapes:
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(k, n, device="cuda", dtype=dtype)
            yield Case("matmul", (m, n, k), dtype, lambda a=a, b=b: matmul(a, b), lambda a=a, b=b: a @ b,
                       (m * k + k * n + m * n) * a.element_size(), tolerance=1e-2, flops=2 * m * n * k)


def flash_attention_cases() -> Iterator[Case]:
    """Chapter 4's attention kernels against SDPA's FlashAttention-2 and cuDNN backends, bf16.

    Sequence 1k/4k/16k, head dims 64 and 128, causal and not, batch x heads filling the GPU
    (batch x sequence = 16384 tokens, heads x head_dim = 2048). Forward alone, and forward
    plus backward (the check compares dQ, dK and dV). Then (issue 24): GQA with 32 query heads
    on 8 kv heads (SDPA gets enable_gqa=True), head dim 256, and Nq = 1024 queries against
    Nk = 4096 keys, causal aligned bottom-right (SDPA through the causal_lower_right mask, with
    the backend SDPA picks for it). An anchor that refuses a shape is a skip line.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.flash_attention import flash_attention_backward, flash_attention_forward

    from torch.nn.attention.bias import causal_lower_right

    def sdpa(backend, q, k, v, causal):
        gqa = q.shape[1] != k.shape[1]
        if causal and q.shape[2] != k.shape[2]:   # is_causal aligns top-left; the kernels bottom-right
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                                  enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def sdpa_fwd_bwd(backend, q, k, v, do, causal):
        return torch.autograd.grad(sdpa(backend, q, k, v, causal), (q, k, v), do)

    def ours_fwd_bwd(q, k, v, do, causal):
        o, lse = flash_attention_forward(q, k, v, causal)
        return flash_attention_backward(q, k, v, o, lse, do, causal)

    yield from _attention_variants(sdpa, sdpa_fwd_bwd, ours_fwd_bwd)
    for d in (64, 128):
        for n in (1024, 4096, 16384):
            for causal in (False, True):
                b, h = max(1, 16384 // n), 2048 // d
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                flops = 4 * b * h * n * n * d // (2 if causal else 1)
                io = 4 * q.numel() * q.element_size()
                mask = "causal" if causal else "full"
                for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    yield Case(f"attn {mask} fwd/{label}", (b, h, n, d), q.dtype,
                               lambda q=q, k=k, v=v, c=causal: flash_attention_forward(q, k, v, c)[0],
                               lambda q=q, k=k, v=v, c=causal, be=backend: sdpa(be, q, k, v, c),
                               io, tolerance=2e-2, flops=flops)
                    yield Case(f"attn {mask} f+b/{label}", (b, h, n, d), q.dtype,
                               lambda q=q, k=k, v=v, do=do, c=causal: ours_fwd_bwd(q, k, v, do, c),
                               lambda q=q, k=k, v=v, do=do, c=causal, be=backend: sdpa_fwd_bwd(be, q, k, v, do, c),
                               2 * io, tolerance=3e-2, flops=flops * 7 // 2)


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool) -> int:
    """Forward FLOPs of attention, 4 d per (query, key) pair seen: QK^T and PV (2 each).

    Causal is aligned bottom-right: query i of n_q sees n_k - n_q + i + 1 keys (at least 0,
    at most n_k), as in the book's kernels.
    """
    for name, value in (("batch", batch), ("heads", heads), ("n_q", n_q), ("n_k", n_k), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    pairs = sum(min(n_k, max(0, n_k - n_q + i + 1)) for i in range(n_q)) if causal else n_q * n_k
    return 4 * batch * heads * pairs * head_dim


def _attention_variants(sdpa, sdpa_fwd_bwd, ours_fwd_bwd) -> Iterator[Case]:
    """Issue 24's attention cases: GQA 32:8, head dim 256, Nq != Nk causal; bf16, 16384 query tokens."""
    from torch.nn.attention import SDPBackend

    from kernels.flash_attention import flash_attention_forward

    backends = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))
    variants = [  # label, batch, query heads, kv heads, Nq, Nk, head_dim, causal, anchors
        ("gqa32:8", 4, 32, 8, 4096, 4096, 128, False, backends),
        ("gqa32:8", 4, 32, 8, 4096, 4096, 128, True, backends),
        ("d256", 4, 8, 8, 4096, 4096, 256, False, backends),
        ("d256", 4, 8, 8, 4096, 4096, 256, True, backends),
        ("nq1k-nk4k", 16, 16, 16, 1024, 4096, 128, True, (("lower-right", None),)),
    ]
    for label, b, h, h_kv, n_q, n_k, d, causal, anchors in variants:
        q = torch.randn(b, h, n_q, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, h_kv, n_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        do = torch.randn_like(q)
        flops = attention_flops(b, h, n_q, n_k, d, causal)
        io = (2 * q.numel() + 2 * k.numel()) * q.element_size()
        mask = "causal" if causal else "full"
        for anchor, backend in anchors:
            yield Case(f"attn {label} {mask} fwd/{anchor}", (b, h, h_kv, n_q, n_k, d), q.dtype,
                       lambda q=q, k=k, v=v, c=causal: flash_attention_forward(q, k, v, c)[0],
                       lambda q=q, k=k, v=v, c=causal, be=backend: sdpa(be, q, k, v, c),
                       io, tolerance=2e-2, flops=flops)
            yield Case(f"attn {label} {mask} f+b/{anchor}", (b, h, h_kv, n_q, n_k, d), q.dtype,
                       lambda q=q, k=k, v=v, do=do, c=causal: ours_fwd_bwd(q, k, v, do, c),
                       lambda q=q, k=k, v=v, do=do, c=causal, be=backend: sdpa_fwd_bwd(be, q, k, v, do, c),
                       2 * io, tolerance=3e-2, flops=flops * 7 // 2)


def graph_times(fns: list[Callable[[], torch.Tensor]], replays: int = 50) -> list[float]:
    """Milliseconds per call of fns captured in order into one CUDA graph, one entry per replay.

    fns should cover rotating input sets together larger than L2, so that each call reads from
    memory as it would in a model; they are each run once before the capture (compilation).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return times


def rotating_sets(make: Callable[[], tuple[torch.Tensor, ...]], set_bytes: int,
                  total: int = 256 * 2**20, most: int = 256) -> list[tuple[torch.Tensor, ...]]:
    """Enough input sets from make() (each of set_bytes) to pass total bytes, between 1 and most."""
    return [make() for _ in range(max(1, min(most, -(-total // set_bytes))))]


def decode_cases() -> Iterator[Case]:
    """Chapter 6's split-key decoding kernels (section 6.4) against SDPA, bf16, head_dim 128, batch 1.

    Nq = 1, 4, 16 queries against Nk = 1k, 8k, 32k, 128k keys, 32 query heads on 8 kv heads and 4
    on 1, no mask (a decoding step's queries see the whole cache). Against SDPA's FlashAttention-2
    backend, SDPA's own choice of backend, and chapter 4's forward kernel (section 4.5). SDPA
    gets the kv heads unexpanded (enable_gqa=True). Bytes moved: K and V once, plus Q and O.
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.flash_attention import flash_attention_forward
    from kernels.flash_decoding import flash_decode

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sdpa_default(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for h, h_kv in ((32, 8), (4, 1)):
        for n_q in (1, 4, 16):
            for n_k in (1024, 8192, 32768, 131072):
                def make(h=h, h_kv=h_kv, n_q=n_q, n_k=n_k):
                    return (torch.randn(1, h, n_q, 128, device="cuda", dtype=torch.bfloat16),
                            *(torch.randn(1, h_kv, n_k, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))

                q, k, v = make()
                io = (2 * k.numel() + 2 * q.numel()) * k.element_size()
                sets = rotating_sets(make, io)
                flops = 4 * h * n_q * n_k * 128
                ours = lambda q=q, k=k, v=v: flash_decode(q, k, v, causal=False)[0]
                ours_sets = [lambda t=t: flash_decode(*t, causal=False)[0] for t in sets]
                for label, fn in (("flash", sdpa_flash), ("default", sdpa_default),
                                  ("fwd-kernel", lambda q, k, v: flash_attention_forward(q, k, v, False)[0])):
                    name = f"decode {h}:{h_kv}/" + (label if label == "fwd-kernel" else f"sdpa-{label}")
                    yield Case(name, (1, h, h_kv, n_q, n_k, 128), q.dtype, ours,
                               lambda q=q, k=k, v=v, fn=fn: fn(q, k, v), io, tolerance=2e-2, flops=flops,
                               ours_sets=ours_sets, torch_sets=[lambda t=t, fn=fn: fn(*t) for t in sets])


def moe_cases() -> Iterator[Case]:
    """Chapter 5's grouped GEMM (the experts' up-projection), bf16, 8192 tokens, d_model 2048.

    64 experts top-6 at d_ff 1408 and 8 experts top-2 at d_ff 14336, rows sorted by expert
    from a random router. Against (a) a Python loop of per-expert matmuls on the sorted rows,
    (a') the naive loop that also finds each expert's rows (nonzero) and scatters, (b) one dense
    matmul of the same FLOPs (ours then runs on copies of one matrix, so both give the same
    result), (c) torch._grouped_mm where the installed torch has it. Ours runs with
    check_counts=False, the path of the MoE layer's backward (counts built, not read back).
    """
    from kernels.moe import grouped_matmul

    tokens, d = 8192, 2048
    for n_experts, k, d_ff in ((64, 6, 1408), (8, 2, 14336)):
        idx = torch.rand(tokens, n_experts, device="cuda").topk(k, -1).indices.flatten()
        counts = torch.bincount(idx, minlength=n_experts)
        m = int(counts.sum())
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_experts, d, d_ff, device="cuda", dtype=torch.bfloat16) * d ** -0.5
        same = w[:1].expand(n_experts, d, d_ff).contiguous()
        flops, io = 2 * m * d * d_ff, (m * d + n_experts * d * d_ff + m * d_ff) * 2
        splits = counts.tolist()
        shape = (m, d, d_ff, n_experts)
        yield Case("moe grouped/loop", shape, torch.bfloat16, lambda x=x, w=w, c=counts: grouped_matmul(x, w, c, check_counts=False),
                   lambda x=x, w=w, s=splits: torch.cat([a @ w[e] for e, a in enumerate(torch.split(x, s))]),
                   io, tolerance=2e-2, flops=flops)
        expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device="cuda"), counts)

        def naive_loop(x=x, w=w, owner=expert_of_row):
            y = x.new_empty(x.shape[0], w.shape[2])
            for e in range(w.shape[0]):           # the loop a first MoE layer writes: find the rows, multiply
                rows = (owner == e).nonzero().squeeze(1)
                y[rows] = x[rows] @ w[e]
            return y

        yield Case("moe grouped/naive loop", shape, torch.bfloat16, lambda x=x, w=w, c=counts: grouped_matmul(x, w, c, check_counts=False),
                   naive_loop, io, tolerance=2e-2, flops=flops)
        yield Case("moe grouped/dense", shape, torch.bfloat16, lambda x=x, w=same, c=counts: grouped_matmul(x, w, c, check_counts=False),
                   lambda x=x, w=same: x @ w[0], io, tolerance=2e-2, flops=flops)
        if hasattr(torch, "_grouped_mm"):
            offs = torch.cumsum(counts, 0).to(torch.int32)
            w_cm = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the column-major layout its tests use
            try:
                torch._grouped_mm(x, w_cm, offs=offs)
            except RuntimeError as err:
                print(f"torch._grouped_mm does not run here, not compared: {str(err)[:200]}", file=sys.stderr)
                continue
            yield Case("moe grouped/_grouped_mm", shape, torch.bfloat16,
                       lambda x=x, w=w, c=counts: grouped_matmul(x, w, c, check_counts=False),
                       lambda x=x, w=w_cm, o=offs: torch._grouped_mm(x, w, offs=o), io, tolerance=2e-2, flops=flops)


BENCHMARKS: dict[str, Callable[[], Iterator[Case]]] = {
    "softmax": softmax_cases,
    "online_softmax": online_softmax_cases,
    "softmax_backward": softmax_backward_cases,
    "matmul": matmul_cases,
    "flash_attention": flash_attention_cases,
    "decode": decode_cases,
    "moe": moe_cases,
}


def relative_error(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64; NaN anywhere counts as infinitely wrong.

    ours, ref: tensors of one shape, or equally long tuples/lists of them (the gradients dQ,
    dK, dV), for which the worst of the pairs is returned.
    """
    if isinstance(ours, (tuple, list)) or isinstance(ref, (tuple, list)):
        if not isinstance(ours, (tuple, list)) or not isinstance(ref, (tuple, list)) or len(ours) != len(ref) \
                or not ours:
            raise ValueError(f"ours and ref must be tensors or equally long non-empty sequences of tensors, got "
                             f"{type(ours).__name__} and {type(ref).__name__}")
        return max(relative_error(o, r) for o, r in zip(ours, ref))
    for name, x in (("ours", ours), ("ref", ref)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ours.shape != ref.shape:
        raise ValueError(f"ours has shape {tuple(ours.shape)} but ref {tuple(ref.shape)}")
    ours, ref = ours.double(), ref.double()
    if ours.isnan().any():
        return float("inf")
    return ((ours - ref).norm() / ref.norm()).item()


def measure(case: Case) -> dict | None:
    """Check, then time one case; return its row of the results table (None: the anchor does not run here)."""
    from triton.testing import do_bench

    try:
        reference = case.torch_fn()
    except (RuntimeError, NotImplementedError, ValueError) as err:  # a backend that refuses this shape
        message = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        skip(f"{case.name} {'x'.join(map(str, case.shape))} {str(case.dtype).replace('torch.', '')}: "
             f"the anchor does not run here ({type(err).__name__}: {message})")
        torch.cuda.synchronize()
        return None
    error = relative_error(case.ours(), reference)
    del reference
    if error > case.tolerance:
        raise AssertionError(f"{case.name} {case.shape} {case.dtype}: relative error {error:.2e} "
                             f"over {case.tolerance:.0e}; not timing a wrong kernel")
    ours_all = do_bench(case.ours, warmup=50, rep=300, return_mode="all")
    torch_all = do_bench(case.torch_fn, warmup=50, rep=300, return_mode="all")
    ours_ms, torch_ms = statistics.median(ours_all), statistics.median(torch_all)
    return {
        "name": case.name, "shape": list(case.shape), "dtype": str(case.dtype).replace("torch.", ""),
        "ours_ms": ours_ms, "torch_ms": torch_ms,
        "ours_min_ms": min(ours_all), "ours_max_ms": max(ours_all),
        "torch_min_ms": min(torch_all), "torch_max_ms": max(torch_all),
        "ours_GBps": case.bytes_moved / ours_ms / 1e6, "torch_GBps": case.bytes_moved / torch_ms / 1e6,
        "ours_TFLOPs": case.flops / ours_ms / 1e9 if case.flops else None,
        "torch_TFLOPs": case.flops / torch_ms / 1e9 if case.flops else None,
        "ours_over_torch": torch_ms / ours_ms, "relative_error": error,
        **(graph_row(case) if case.ours_sets else {}),
    }


def graph_row(case: Case) -> dict:
    """Min/median/max milliseconds per call of both sides as CUDA-graph replays, and their ratio."""
    row = {}
    for side, fns in (("ours", case.ours_sets), ("torch", case.torch_sets)):
        times = graph_times(fns)
        row.update({f"{side}_graph_ms": statistics.median(times), f"{side}_graph_min_ms": min(times),
                    f"{side}_graph_max_ms": max(times)})
    row["graph_ours_over_torch"] = row["torch_graph_ms"] / row["ours_graph_ms"]
    row["graph_sets"] = len(case.ours_sets)
    return row


def environment() -> dict:
    """Device, versions and date, recorded with every result file."""
    import triton

    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def table(rows: list[dict]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"{'kernel':34s} {'shape':>15s} {'dtype':9s} {'ours ms':>8s} {'torch ms':>8s} "
             f"{'ours GB/s':>9s} {'torch GB/s':>10s} {'ours TFLOP/s':>12s} {'torch TFLOP/s':>13s} {'ours/torch':>10s}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        rates = [f"{r[key]:{width}.0f}" if r.get(key) is not None else f"{'-':>{width}s}"
                 for key, width in (("ours_TFLOPs", 12), ("torch_TFLOPs", 13))]  # only kernels that count FLOPs
        lines.append(f"{r['name']:34s} {shape:>15s} {r['dtype']:9s} {r['ours_ms']:8.3f} {r['torch_ms']:8.3f} "
                     f"{r['ours_GBps']:9.0f} {r['torch_GBps']:10.0f} {rates[0]} {rates[1]} "
                     f"{r['ours_over_torch']:9.2f}x")
    return "\n".join(lines)


def spread_cell(row: dict, side: str, prefix: str = "") -> str:
    """"min/median/max" microseconds of one side ("ours" or "torch") of a row; prefix "graph_" for replays."""
    if side not in ("ours", "torch"):
        raise ValueError(f"side must be 'ours' or 'torch', got {side!r}")
    keys = (f"{side}_{prefix}min_ms", f"{side}_{prefix}ms", f"{side}_{prefix}max_ms")
    missing = [key for key in keys if key not in row]
    if missing:
        raise ValueError(f"row lacks {missing}")
    return "/".join(f"{1e3 * row[key]:.1f}" for key in keys)


def ratio_range(row: dict, prefix: str = "") -> tuple[float, float]:
    """The ratio ours/torch between its extremes: (torch min / ours max, torch max / ours min)."""
    try:
        return (row[f"torch_{prefix}min_ms"] / row[f"ours_{prefix}max_ms"],
                row[f"torch_{prefix}max_ms"] / row[f"ours_{prefix}min_ms"])
    except KeyError as err:
        raise ValueError(f"row lacks {err.args[0]!r}") from None


def spread_table(rows: list[dict]) -> str:
    """Each side's fastest, median and slowest run in microseconds, eager and (if timed) as graph replays.

    After each ratio of medians, its range between the extremes (ratio_range).
    """
    lines = [f"{'kernel':34s} {'shape':>22s} {'eager us: ours min/med/max':>27s} {'torch min/med/max':>19s} "
             f"{'ratio':>5s} {'range':>9s} {'graph us: ours min/med/max':>27s} {'torch min/med/max':>19s} "
             f"{'ratio':>5s} {'range':>9s}"]
    for r in rows:
        cells = []
        for prefix in ("", "graph_"):
            if f"ours_{prefix}ms" not in r:
                continue
            for side, width in (("ours", 27), ("torch", 19)):
                cells.append(f"{spread_cell(r, side, prefix):>{width}s}")
            low, high = ratio_range(r, prefix)
            cells.append(f"{r[prefix + 'ours_over_torch']:5.2f} {f'{low:.2f}-{high:.2f}':>9s}")
        lines.append(f"{r['name']:34s} {'x'.join(map(str, r['shape'])):>22s} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON file")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: kernels.bench times compiled Triton kernels and needs a CUDA GPU; none was found "
              "(on a CPU the kernels run in Triton's interpreter, whose speed means nothing).", file=sys.stderr)
        return 2
    from kernels import runtime

    if runtime.MODE != "compiled":
        print(f"error: Triton kernels would run {runtime.MODE} here; unset TRITON_INTERPRET and LRN_DEVICE",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(args.names or ["all"])
    path = args.out / f"{stem}_{env['device'].replace(' ', '_')}_{env['date'][:10]}.json"
    rows = []
    for name in args.names or list(BENCHMARKS):
        for case in BENCHMARKS[name]():
            row = measure(case)
            if row is not None:
                rows.append(row)
                print(f"  {row['name']} {'x'.join(map(str, row['shape']))} {row['dtype']}: "
                      f"{row['ours_over_torch']:.2f}x", file=sys.stderr, flush=True)
            # written after each case, so that a run cut short keeps what it measured
            path.write_text(json.dumps({"environment": env, "results": rows, "skipped": SKIPPED,
                                        "complete": False}, indent=2) + "\n")
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | {env['date']}")
    print(table(rows))
    print("\nspread of every figure (min/median/max of each side's timed runs):")
    print(spread_table(rows))
    for line in SKIPPED:
        print(f"skip: {line}")
    path.write_text(json.dumps({"environment": env, "results": rows, "skipped": SKIPPED, "complete": True},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
