"""Sweep the Triton matmul's block configurations on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_matmul.py

For each of issue 3's bfloat16 acceptance shapes, times torch.matmul and chapter 3's
kernel (kernels.matmul.matmul with a fixed config) under every candidate
(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), then the effect of GROUP_M (1, 4, 8,
16) at the best config, then what the autotuner picks. The autotuning candidates in
kernels.matmul.hopper_configs (chapter 3) come from this sweep.
Results: benchmarks/results/matmul_sweep_*.txt.
"""
import torch
import triton
from triton.testing import do_bench

from kernels.matmul import hopper_configs, matmul, pipeline_bytes

SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 1024, 4096)]
CANDIDATES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
    (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (256, 128, 64, 4, 8),
    (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 128, 64, 5, 4), (128, 128, 128, 3, 8),
    (128, 256, 32, 4, 8), (64, 256, 32, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
]


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def main() -> None:
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    for m, n, k in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        ref = (a.float() @ b.float())
        flop = 2 * m * n * k
        t_torch = time_ms(lambda: a @ b)
        print(f"\n{m}x{n}x{k} bfloat16: torch.matmul {t_torch:.3f} ms = {flop / t_torch / 1e9:.0f} TFLOP/s")
        results = []
        for bm, bn, bk, stages, warps in CANDIDATES:
            if pipeline_bytes(bm, bn, bk, stages, 2) > 228 * 1024:
                continue
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_stages": stages, "num_warps": warps}
            try:
                c = matmul(a, b, config=cfg)
                torch.testing.assert_close(c.float(), ref, atol=0.5, rtol=1e-2)
                results.append((time_ms(lambda cfg=cfg: matmul(a, b, config=cfg)), cfg))
            except Exception as err:  # a config that does not compile (resources) is reported, not fatal
                print(f"  {cfg}: failed: {type(err).__name__}: {str(err)[:100]}")
        results.sort(key=lambda r: r[0])
        for ms, cfg in results[:8]:
            print(f"  {cfg['BLOCK_M']:3d}x{cfg['BLOCK_N']:3d}x{cfg['BLOCK_K']:3d} stages={cfg['num_stages']} "
                  f"warps={cfg['num_warps']}: {ms:.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  {t_torch / ms:.3f}x torch")
        best = results[0][1]
        for group in (1, 4, 8, 16):
            cfg = {**best, "GROUP_M": group}
            ms = time_ms(lambda cfg=cfg: matmul(a, b, config=cfg))
            print(f"  best config with GROUP_M={group:2d}: {ms:.3f} ms  {flop / ms / 1e9:4.0f} TFLOP/s  "
                  f"{t_torch / ms:.3f}x torch")
        ms = time_ms(lambda: matmul(a, b))
        print(f"  autotuned (kernels.matmul.hopper_configs, {len(hopper_configs())} candidates): {ms:.3f} ms  "
              f"{flop / ms / 1e9:4.0f} TFLOP/s  {t_torch / ms:.3f}x torch")


if __name__ == "__main__":
    main()
