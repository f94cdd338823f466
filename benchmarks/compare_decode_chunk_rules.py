"""Chunk rules of chapter 6's flash-decoding side by side on one CUDA GPU (hand-written tuning tool).

    python benchmarks/compare_decode_chunk_rules.py

For the decode benchmark's 24 shapes (bf16, head_dim 128, batch 1, no mask), times flash_decode with
the number of key chunks from each rule below, and SDPA's FlashAttention-2 backend, as CUDA-graph
replays over rotating inputs larger than L2: min/median/max of 30 replays in microseconds, and
the largest difference of each rule's output from the library rule's. The launcher reads
kernels.flash_decoding.decode_splits at call time, so the tool swaps that function.
Results: benchmarks/results/decode_chunk_rule_*.txt.
"""
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels.flash_decoding as fd
from kernels.bench import graph_times, rotating_sets

LIBRARY = fd.decode_splits


def per_sm(programs_per_sm: int):
    """The rule of programs_per_sm programs per multiprocessor, at least two key blocks per chunk."""
    def rule(programs: int, n_keys: int, block_n: int, n_sm: int) -> int:
        wanted = -(-programs_per_sm * n_sm // programs)
        return max(1, min(wanted, -(-n_keys // (2 * block_n)), fd.DECODE_MAX_SPLITS))
    return rule


RULES = {"4 per SM": per_sm(4), "1 per SM": per_sm(1), "library": LIBRARY}


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def spread(fn, sets) -> tuple[float, float, float]:
    times = [1e3 * t for t in graph_times([lambda s=s: fn(*s) for s in sets], replays=30)]
    return min(times), statistics.median(times), max(times)


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'H:Hkv':>6} {'Nq':>3} {'Nk':>7} |", " | ".join(f"{name + ' us':>22}" for name in [*RULES, "SDPA flash"]),
          "| library vs 4 per SM, library vs SDPA")
    for h, h_kv in ((32, 8), (4, 1)):
        for n_q in (1, 4, 16):
            for n_k in (1024, 8192, 32768, 131072):
                torch.manual_seed(0)

                def make(h=h, h_kv=h_kv, n_q=n_q, n_k=n_k):
                    return (torch.randn(1, h, n_q, 128, device="cuda", dtype=torch.bfloat16),
                            *(torch.randn(1, h_kv, n_k, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))

                sets = rotating_sets(make, 2 * 2 * h_kv * n_k * 128)
                reference = fd.flash_decode(*sets[0], causal=False)[0].float()
                rows, worst = [], 0.0
                for rule in RULES.values():
                    fd.decode_splits = rule
                    worst = max(worst, (fd.flash_decode(*sets[0], causal=False)[0].float() - reference).abs().max().item())
                    rows.append(spread(lambda *t: fd.flash_decode(*t, causal=False), sets))
                fd.decode_splits = LIBRARY
                rows.append(spread(sdpa_flash, sets))
                cells = " | ".join(f"{lo:6.1f}/{mid:6.1f}/{hi:6.1f}" for lo, mid, hi in rows)
                print(f"{h:>3}:{h_kv:<2} {n_q:>3} {n_k:>7} | {cells} | {rows[0][1] / rows[2][1]:.2f}x, "
                      f"{rows[3][1] / rows[2][1]:.2f}x  (max diff {worst:.1e})", flush=True)


if __name__ == "__main__":
    main()
