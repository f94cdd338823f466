"""How close the compiled attention kernels come to their error bars, over several seeds.

Run on a CUDA GPU: ``python benchmarks/flash_attention_tolerance.py``. For each GPU test
shape of ``tests/test_flash_attention.py``, causal and full, float16 and bfloat16, and
seeds 0-4, it prints the largest of (kernel error / bar error) over O, dQ, dK, dV for the
two bars the tests know: "rounded P" (float32 attention with P rounded to 16 bits) and
"16-bit" (attention computed entirely in 16 bits, FlashAttention's own test). A test
passes where the ratio is at most 2.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_flash_attention import GPU_SHAPES, kernel_error_ratios  # noqa: E402

SEEDS = range(5)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    print(f"{'shape (B,H,Hkv,Nq,Nk,d)':28s} {'causal':6s} {'dtype':15s} {'bar':9s} max ratio per seed -> worst")
    for shape in GPU_SHAPES:
        for causal in (False, True):
            for dtype in (torch.float16, torch.bfloat16):
                for bar in ("rounded P", "16-bit"):
                    worst = []
                    for seed in SEEDS:
                        torch.manual_seed(seed)
                        ratios = kernel_error_ratios(shape, causal, dtype, "cuda", bar=bar)
                        worst.append(max(ratios.values()))
                    print(f"{str(shape):28s} {str(causal):6s} {str(dtype):15s} {bar:9s}",
                          " ".join(f"{r:4.2f}" for r in worst), f"-> {max(worst):4.2f}", flush=True)


if __name__ == "__main__":
    main()
