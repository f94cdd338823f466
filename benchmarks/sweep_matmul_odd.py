"""Sweep chapter 3's matmul at issue 24's odd shapes on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_matmul_odd.py [--quick]

For each shape: torch.matmul (cuBLAS), the old path (the autotuned kernel of section 3.6 on the
operands as given, which is what `matmul` ran before the skinny heuristic, split-K and padding),
and the new `matmul`; then fixed configurations and splits around the heuristic's choice for
the skinny shapes, candidate tiles for K = 512, and the pieces of the padded path (the copies
alone, the kernel on aligned operands). Every timed variant is first checked against a float32
product. Ratios are cuBLAS time / ours (above 1: ours faster), medians of do_bench with L2
flushed. Results: benchmarks/results/matmul_odd_sweep_*.txt.
"""
import sys

import torch
import triton
from triton.testing import do_bench

import kernels.matmul as km
from kernels import runtime

SKINNY = [(16, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192)]
SMALL_K = (4096, 4096, 512)
ODD = (4097, 4095, 4093)


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def check(c, ref, what) -> bool:
    err = ((c.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        print(f"  {what}: WRONG, relative error {err:.2e}")
        return False
    return True


def old_path(a, b):
    """The launcher before issue 24: the autotuned kernel on the operands as given."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    km.matmul_kernel_autotuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        INPUT_PRECISION="ieee", WIDEN_BF16=False)
    return c


def headline(m, n, k, dtype):
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    ref = a.float() @ b.float()
    t_cublas = ms(lambda: a @ b)
    line = [f"{m}x{n}x{k} {str(dtype)[6:]}: cuBLAS {t_cublas * 1e3:7.1f} us"]
    for label, fn in (("old", old_path), ("new", km.matmul)):
        if check(fn(a, b), ref, label):
            t = ms(lambda fn=fn: fn(a, b))
            line.append(f"{label} {t * 1e3:7.1f} us = {t_cublas / t:.2f}x")
    print("  ".join(line), flush=True)
    return a, b, ref, t_cublas


def main() -> None:
    quick = "--quick" in sys.argv
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__, flush=True)
    print("== headline: cuBLAS, old path, new matmul")
    for dtype in (torch.bfloat16, torch.float16):
        for shape in SKINNY + [SMALL_K, ODD]:
            headline(*shape, dtype)
    if quick:
        return
    print("== skinny: fixed configs x splits (bf16); heuristic's pick marked *")
    for m, n, k in SKINNY:
        a, b, ref, t_cublas = headline(m, n, k, torch.bfloat16)
        pick, s_pick = km.skinny_config(m, n, k, 2, runtime.multiprocessors(torch.device("cuda", 0)))
        results = []
        block_m = pick["BLOCK_M"]
        for bn, bk in ((64, 128), (128, 128), (128, 64), (256, 64), (64, 256), (128, 256)):
            for stages in (3, 5):
                for split in (1, 2, 4):
                    cfg = {"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                           "num_stages": stages, "num_warps": 4}
                    if km.pipeline_bytes(block_m, bn, bk, stages, 2) > km.SHARED_MEMORY_BUDGET:
                        continue
                    try:
                        if not check(km.matmul(a, b, config=cfg, split_k=split), ref, str(cfg)):
                            continue
                        t = ms(lambda cfg=cfg, split=split: km.matmul(a, b, config=cfg, split_k=split))
                    except Exception as err:  # resources: reported, not fatal
                        print(f"  {cfg} S={split}: failed {type(err).__name__}: {str(err)[:80]}")
                        continue
                    results.append((t, bn, bk, stages, split))
        results.sort()
        for t, bn, bk, stages, split in results[:6]:
            mark = "*" if (bn, bk, stages, split) == (pick["BLOCK_N"], pick["BLOCK_K"], pick["num_stages"], s_pick) else " "
            print(f" {mark} {block_m}x{bn}x{bk} stages={stages} S={split}: {t * 1e3:7.1f} us = {t_cublas / t:.2f}x", flush=True)
        picked = [r for r in results if r[1:] == (pick["BLOCK_N"], pick["BLOCK_K"], pick["num_stages"], s_pick)]
        print(f"   heuristic pick {pick} S={s_pick}: " + (f"{picked[0][0] * 1e3:.1f} us" if picked else "not in sweep"))
    print("== K = 512: tiles (bf16)")
    m, n, k = SMALL_K
    a, b, ref, t_cublas = headline(m, n, k, torch.bfloat16)
    for bm, bn, bk, stages, warps in ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 3, 4),
                                      (128, 128, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
                                      (128, 256, 128, 2, 8), (64, 256, 64, 4, 4), (128, 128, 64, 5, 4)):
        for group in (8, 16):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_stages": stages,
                   "num_warps": warps}
            try:
                if check(km.matmul(a, b, config=cfg), ref, str(cfg)):
                    t = ms(lambda cfg=cfg: km.matmul(a, b, config=cfg))
                    print(f"   {bm}x{bn}x{bk} s{stages} w{warps} g{group}: {t * 1e3:6.1f} us = {t_cublas / t:.2f}x", flush=True)
            except Exception as err:
                print(f"   {cfg}: failed {type(err).__name__}: {str(err)[:80]}")
    print("== 4097x4095x4093: the padded path's pieces (bf16)")
    m, n, k = ODD
    a, b, ref, t_cublas = headline(m, n, k, torch.bfloat16)
    kp, np_ = (triton.cdiv(x, km.PAD_MULTIPLE) * km.PAD_MULTIPLE for x in (k, n))
    t_copy = ms(lambda: (km.padded_copy(a, m, kp), km.padded_copy(b, kp, np_)))
    ap, bp = km.padded_copy(a, m, kp), km.padded_copy(b, kp, np_)
    t_kernel = ms(lambda: km.matmul(ap, bp))
    t_cublas_pad = ms(lambda: ap @ bp)
    print(f"   copies {t_copy * 1e3:.1f} us, kernel on padded {t_kernel * 1e3:.1f} us, cuBLAS on padded "
          f"{t_cublas_pad * 1e3:.1f} us, cuBLAS as given {t_cublas * 1e3:.1f} us")


if __name__ == "__main__":
    main()
