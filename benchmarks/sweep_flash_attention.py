"""Sweep the block sizes of chapter 4's backward kernels on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_flash_attention.py

At d = 128, sequence 4096, batch 8 x 16 heads, bf16, causal and not, times the whole
backward pass while one kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) varies and the
other keeps the library's choice, checking each result against the library's. The
launcher reads kernels.flash_attention.backward_configs at call time, so the sweep swaps
that function. Results: benchmarks/results/flash_attention_backward_sweep_*.txt.
"""
import itertools

import torch
from triton.testing import do_bench

import kernels.flash_attention as fa

CANDIDATES = list(itertools.product(((32, 128), (64, 64), (64, 128), (128, 64), (128, 32), (32, 64)), (4, 8), (2, 3)))


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    chosen = fa.backward_configs
    for causal in (False, True):
        q, k, v = (torch.randn(8, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        o, lse = fa.flash_attention_forward(q, k, v, causal)
        do = torch.randn_like(o)
        reference = fa.flash_attention_backward(q, k, v, o, lse, do, causal)
        print(f"\ncausal={causal}: library choice {do_bench(lambda: fa.flash_attention_backward(q, k, v, o, lse, do, causal), return_mode='median'):.3f} ms")
        for which in (0, 1):
            timings = []
            for (bm, bn), warps, stages in CANDIDATES:
                pair = list(chosen(128))
                pair[which] = (bm, bn, warps, stages)
                fa.backward_configs = lambda _d, pair=tuple(pair): pair
                grads = fa.flash_attention_backward(q, k, v, o, lse, do, causal)
                ok = all(torch.allclose(a.float(), r.float(), atol=5e-2, rtol=5e-2) for a, r in zip(grads, reference))
                ms = do_bench(lambda: fa.flash_attention_backward(q, k, v, o, lse, do, causal), warmup=10, rep=50,
                              return_mode="median")
                timings.append((ms, (bm, bn, warps, stages), ok))
            fa.backward_configs = chosen
            best = sorted(timings)[:4]
            print(f"  {'dK/dV' if which == 0 else 'dQ'}: " + " | ".join(f"{c} {ms:.3f} ms ok={ok}" for ms, c, ok in best))


if __name__ == "__main__":
    main()
