"""Sweep variants of chapter 2's two-pass online softmax kernel on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_online_softmax.py

Times, at the sizes of issue 3's acceptance list, torch.softmax and three versions of the
kernel under several BLOCK / num_warps choices:
  scalar    the chapter's kernel: the running state (m, d) as two scalars, merged per block;
  hinted    the same with L2 eviction hints (keep the row for the second pass, stream the output);
  per-lane  a state per lane (BLOCK of them), merged once at the end: no reductions in the loop.
The evidence for the chapter's choice; results in benchmarks/results/online_softmax_sweep_*.txt.
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from kernels.online_softmax import softmax_online_kernel


@triton.jit
def hinted_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_last").to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    inv_d = 1.0 / d
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_first").to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (tl.exp(x - m) * inv_d).to(y_ptr.dtype.element_ty),
                 mask=cols < n_cols, eviction_policy="evict_first")


@triton.jit
def per_lane_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_last").to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row == -float("inf"), 0.0, m_row)
    d_row = tl.sum(d * tl.exp(m - m_row_safe), axis=0)
    inv_d = 1.0 / d_row
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < n_cols, other=-float("inf"),
                    eviction_policy="evict_first").to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (tl.exp(x - m_row) * inv_d).to(y_ptr.dtype.element_ty),
                 mask=cols < n_cols, eviction_policy="evict_first")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    variants = {"scalar": softmax_online_kernel, "hinted": hinted_kernel, "per-lane": per_lane_kernel}
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, n_cols in ((4096, 32768), (1024, 262144)):
            x = torch.randn(n_rows, n_cols, device="cuda", dtype=dtype) * 4
            y = torch.empty_like(x)
            gb = 2 * x.numel() * x.element_size() / 1e9
            t_torch = do_bench(lambda: torch.softmax(x, -1), warmup=25, rep=150, return_mode="median")
            results = []
            for name, kernel in variants.items():
                for block in (1024, 2048, 4096, 8192):
                    for warps in (4, 8, 16):
                        def run(k=kernel, b=block, w=warps):
                            k[(n_rows,)](x, y, n_cols, x.stride(0), y.stride(0), BLOCK=b, num_warps=w)
                        run()
                        torch.testing.assert_close(y.float(), torch.softmax(x.float(), -1), atol=1e-2, rtol=0)
                        ms = do_bench(run, warmup=25, rep=150, return_mode="median")
                        results.append((ms, f"{name:8s} BLOCK={block:5d} warps={warps:2d}"))
            results.sort()
            print(f"\n{n_rows}x{n_cols} {dtype}: torch {t_torch:.3f} ms ({gb / t_torch * 1e3:.0f} GB/s)")
            for ms, label in results[:8]:
                print(f"  {label}  {ms:.3f} ms  {gb / ms * 1e3:6.0f} GB/s  {t_torch / ms:.2f}x torch")
            for ms, label in results:
                if label.startswith("scalar   BLOCK= 4096 warps=16"):
                    print(f"  (current) {label}  {ms:.3f} ms  {t_torch / ms:.2f}x torch")


if __name__ == "__main__":
    main()
