"""Sweep the split-key decoding kernels of chapter 6 (section 6.4) on a CUDA GPU (hand-written tuning tool).

    python benchmarks/sweep_decode.py

For a few decoding shapes (bf16, head_dim 128, batch 1, no mask), times flash_decode while
(a) the number of key chunks varies with the library's block sizes, and (b) the split kernel's
(BLOCK_N, num_warps, num_stages) varies with the library's number of chunks, checking each
result against the library's choice. The launcher reads kernels.flash_decoding.decode_config
at call time, so the sweep swaps that function. SDPA's FlashAttention-2 backend is timed
alongside. Results: benchmarks/results/decode_sweep_*.txt.
"""
import itertools
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels.flash_decoding as fa
from kernels import runtime
from kernels.bench import graph_times, rotating_sets

SHAPES = [  # (H, Hkv, Nq, Nk)
    (32, 8, 1, 8192), (32, 8, 1, 131072), (32, 8, 16, 32768), (4, 1, 1, 131072), (4, 1, 4, 8192),
]
SPLITS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIGS = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))


def us(fn, sets) -> float:
    """Median microseconds per call of fn(*inputs) as CUDA-graph replays over the rotating input sets."""
    return 1e3 * statistics.median(graph_times([lambda t=t: fn(*t) for t in sets], replays=20))


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    chosen = fa.decode_config
    for h, h_kv, n_q, n_k in SHAPES:
        torch.manual_seed(0)
        def make(h=h, h_kv=h_kv, n_q=n_q, n_k=n_k):
            return (torch.randn(1, h, n_q, 128, device="cuda", dtype=torch.bfloat16),
                    *(torch.randn(1, h_kv, n_k, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))

        sets = rotating_sets(make, 2 * h_kv * n_k * 128 * 2)
        q, k, v = sets[0]
        reference = fa.flash_decode(q, k, v, causal=False)[0].float()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = us(lambda *t: F.scaled_dot_product_attention(*t, enable_gqa=True), sets)
        base = us(lambda *t: fa.flash_decode(*t, causal=False), sets)
        bm, bn, w, s = chosen(128, n_q * h // h_kv)
        programs = h_kv * -(-(n_q * h // h_kv) // bm)
        default_splits = fa.decode_splits(programs, n_k, bn, runtime.multiprocessors(q.device))
        print(f"\nH={h} Hkv={h_kv} Nq={n_q} Nk={n_k}: library {base:.1f} us ({default_splits} chunks, "
              f"{chosen(128, n_q * h // h_kv)}), SDPA flash {sdpa:.1f} us")
        line = []
        for splits in SPLITS:
            if splits > -(-n_k // bn):
                continue
            o = fa.flash_decode(q, k, v, causal=False, n_splits=splits)[0].float()
            ok = torch.allclose(o, reference, atol=2e-2, rtol=2e-2)
            line.append(f"{splits}:{us(lambda *t, n=splits: fa.flash_decode(*t, causal=False, n_splits=n), sets):.1f}"
                        + ("" if ok else "(WRONG)"))
        print("  chunks:us ", " ".join(line))
        timings = []
        for block_n, warps, stages in CONFIGS:
            fa.decode_config = lambda _d, rows, c=(block_n, warps, stages): (chosen(128, rows)[0], *c)
            try:
                o = fa.flash_decode(q, k, v, causal=False)[0].float()
            except Exception as err:  # out of shared memory for the larger blocks
                timings.append((float("inf"), (block_n, warps, stages), str(err)[:40]))
                continue
            ok = torch.allclose(o, reference, atol=2e-2, rtol=2e-2)
            timings.append((us(lambda *t: fa.flash_decode(*t, causal=False), sets), (block_n, warps, stages),
                            "" if ok else "WRONG"))
        fa.decode_config = chosen
        timings.sort()
        print("  best (BLOCK_N, warps, stages):", "  ".join(f"{c} {t:.1f}{(' ' + e) if e else ''}"
                                                          for t, c, e in timings[:6]))


if __name__ == "__main__":
    main()
