"""Host-side cost of one kernels.matmul.matmul call against its parts, on CUDA (bfloat16): the public
call, the autotuned kernel alone, the kernel launched with the autotuner's best config, the argument
checks alone, and torch.matmul. Each is called 200 times back to back; "host" is the Python time per
call, "queue" the CUDA-event time per call (equal to host when the host, not the GPU, is the bottleneck).
Run: PYTHONPATH=. python benchmarks/launch_overhead_matmul.py"""
import time
import torch
import triton
from kernels import matmul as M

torch.manual_seed(0)
for (m, n, k) in [(4096, 4096, 512), (64, 8192, 8192), (4096, 4096, 4096)]:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    M.matmul(a, b); torch.cuda.synchronize()
    args = (a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    opts = {"INPUT_PRECISION": "ieee", "WIDEN_BF16": False}
    best = M.matmul_kernel_autotuned.best_config if m > M.SKINNY_M else None
    cands = {"public matmul": lambda: M.matmul(a, b), "torch.matmul": lambda: torch.matmul(a, b)}
    if best is not None:
        kw = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]),)
        def tuned_grid(meta, m=m, n=n):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        cands["autotuned kernel alone"] = lambda: M.matmul_kernel_autotuned[tuned_grid](*args, **opts)
        cands["fixed best config"] = lambda: M.matmul_kernel[grid](*args, **opts, **kw)
        print(m, n, k, "best config", best)
    cands["checks only"] = lambda: (M.check_matmul_operands(a, b, M.SUPPORTED_DTYPES), M._max_offset(a),
                                    M._max_offset(b), M.check_launchable("a", a))
    for name, f in cands.items():
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        rows = []
        for rep in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter(); e0.record()
            for _ in range(200):
                f()
            host = (time.perf_counter() - t0) / 200 * 1e6
            e1.record(); torch.cuda.synchronize()
            rows.append((host, e0.elapsed_time(e1) / 200 * 1e3))
        rows.sort()
        print(f"{m}x{n}x{k} {name:24s} host us/call {rows[2][0]:7.1f}  queue us/call {sorted(r[1] for r in rows)[2]:7.1f}")
