"""Sweep the fused softmax kernel's launch sizes on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_softmax.py

For each acceptance shape and dtype, times torch.softmax and the fused kernel under every
(BLOCK_M, num_warps) pair, and the looped kernel, with triton.testing.do_bench (median).
The chosen heuristic lives in kernels.softmax.fused_launch_config (chapter 1); this script
is the evidence for it. Results: benchmarks/results/softmax_sweep_*.txt.
"""
import torch
import triton
from triton.testing import do_bench

from kernels.softmax import LONG_ROW_BLOCK, fused_launch_config, softmax_fused_kernel, softmax_looped_kernel


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    shapes = [(4096, 32768), (65536, 4096), (16384, 1024), (65536, 512), (8192, 8192), (1024, 65536)]
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, n_cols in shapes:
            x = torch.randn(n_rows, n_cols, device="cuda", dtype=dtype)
            y = torch.empty_like(x)
            gb = 2 * x.numel() * x.element_size() / 1e9
            t_torch = time_ms(lambda: torch.softmax(x, -1))
            block_n = triton.next_power_of_2(n_cols)
            results = []
            for block_m in (1, 2, 4, 8, 16):
                if block_m * block_n > 65536 or block_m > n_rows:
                    continue
                for warps in (4, 8, 16, 32):
                    def run(bm=block_m, w=warps):
                        softmax_fused_kernel[(triton.cdiv(n_rows, bm),)](
                            x, y, n_rows, n_cols, x.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=block_n, num_warps=w)
                    run()
                    torch.testing.assert_close(y.float(), torch.softmax(x.float(), -1), atol=1e-2, rtol=0)
                    results.append((time_ms(run), f"fused BLOCK_M={block_m:2d} warps={warps:2d}"))
            for warps in (4, 8, 16, 32):
                def run_looped(w=warps):
                    softmax_looped_kernel[(n_rows,)](x, y, n_cols, x.stride(0), y.stride(0),
                                                     BLOCK=LONG_ROW_BLOCK, num_warps=w)
                results.append((time_ms(run_looped), f"looped warps={warps:2d}"))
            chosen = fused_launch_config(n_cols)
            results.sort()
            print(f"\n{n_rows}x{n_cols} {dtype}: torch {t_torch:.3f} ms ({gb / t_torch * 1e3:.0f} GB/s); "
                  f"heuristic picks BLOCK_M={chosen[0]} warps={chosen[2]}")
            for ms, name in results[:6]:
                print(f"  {name:30s} {ms:.3f} ms  {gb / ms * 1e3:6.0f} GB/s  {t_torch / ms:.2f}x torch")


if __name__ == "__main__":
    main()
