"""Sweep the block configurations of chapter 5's grouped GEMMs on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_moe.py

For issue 5's two bfloat16 MoE shapes (8192 tokens, d_model 2048; 64 experts top-6 at
d_ff 1408, and 8 experts top-2 at d_ff 14336), times the forward kernel
(kernels.moe.grouped_matmul_kernel) and the weight-gradient kernel
(kernels.moe.grouped_weight_grad_kernel) under each candidate (BLOCK_M, BLOCK_N, BLOCK_K,
num_stages, num_warps), next to one dense torch.matmul of the same FLOPs. The config in
kernels.moe.grouped_config and weight_grad_config (chapter 5) come from this sweep.
Results: benchmarks/results/moe_sweep_*.txt.
"""
import torch
import triton
from triton.testing import do_bench

from kernels.moe import expert_offsets, grouped_matmul_kernel, grouped_weight_grad_kernel

SHAPES = [(8192, 2048, 1408, 64, 6), (8192, 2048, 14336, 8, 2)]  # tokens, d_model, d_ff, experts, top-k
CANDIDATES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
    (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8), (64, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 128, 3, 4), (128, 128, 128, 3, 8), (256, 128, 64, 3, 8),
]


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def forward(x, w, y, counts, bm, bn, bk, stages, warps):
    rows, blocks = expert_offsets(counts, bm)
    n_experts = counts.numel()
    grid = (triton.cdiv(x.shape[0], bm) + n_experts, triton.cdiv(w.shape[2], bn))
    return lambda: grouped_matmul_kernel[grid](
        x, w, y, rows, blocks, n_experts, w.shape[2], x.shape[1], x.stride(0), x.stride(1), w.stride(0),
        w.stride(1), w.stride(2), y.stride(0), y.stride(1), IEEE=False,
        EXPERTS_POW2=triton.next_power_of_2(n_experts), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)


def weight_grad(x, dy, dw, offsets, bm, bn, bk, stages, warps):
    grid = (dw.shape[0], triton.cdiv(dw.shape[1], bk), triton.cdiv(dw.shape[2], bn))
    return lambda: grouped_weight_grad_kernel[grid](
        x, dy, dw, offsets, dw.shape[1], dw.shape[2], x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2), IEEE=False, BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm,
        num_warps=warps, num_stages=stages)


def main() -> None:
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    torch.manual_seed(0)
    for tokens, d, d_ff, n_experts, k in SHAPES:
        idx = torch.rand(tokens, n_experts, device="cuda").topk(k, -1).indices.flatten()
        counts = torch.bincount(idx, minlength=n_experts)
        m = int(counts.sum())
        offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device="cuda")
        offsets[1:] = torch.cumsum(counts, 0)
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_experts, d, d_ff, device="cuda", dtype=torch.bfloat16) * d ** -0.5
        dy = torch.randn(m, d_ff, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * d * d_ff
        ref = torch.cat([a.float() @ w[e].float() for e, a in enumerate(torch.split(x, counts.tolist()))])
        ref_dw = torch.stack([a.float().T @ g.float() for a, g in
                              zip(torch.split(x, counts.tolist()), torch.split(dy, counts.tolist()))])
        t_dense = time_ms(lambda: x @ w[0])
        print(f"\n{m} rows x {d} -> {d_ff}, {n_experts} experts: dense torch.matmul {t_dense:.3f} ms = "
              f"{flop / t_dense / 1e9:.0f} TFLOP/s")
        for label, make, out, expected in (("forward", forward, torch.empty(m, d_ff, device="cuda", dtype=torch.bfloat16), ref),
                                           ("weight grad", weight_grad, torch.empty_like(w), ref_dw)):
            results = []
            for bm, bn, bk, stages, warps in CANDIDATES:
                try:
                    fn = (make(x, w, out, counts, bm, bn, bk, stages, warps) if label == "forward"
                          else make(x, dy, out, offsets, bm, bn, bk, stages, warps))
                    fn()
                    err = ((out.float() - expected).norm() / expected.norm()).item()
                    if err > 2e-2:
                        raise AssertionError(f"relative error {err:.1e}")
                    results.append((time_ms(fn), (bm, bn, bk, stages, warps)))
                except Exception as e:  # a config that does not compile (resources) is reported, not fatal
                    print(f"  {label} {(bm, bn, bk, stages, warps)}: failed: {type(e).__name__}: {str(e)[:100]}")
            results.sort()
            for ms, (bm, bn, bk, stages, warps) in results[:6]:
                print(f"  {label:11s} {bm:3d}x{bn:3d}x{bk:3d} stages={stages} warps={warps}: {ms:.3f} ms "
                      f"{flop / ms / 1e9:4.0f} TFLOP/s  {t_dense / ms:.3f}x dense")


if __name__ == "__main__":
    main()
