"""The public matmul() and softmax_triton() before and after their launch plans, against torch, on CUDA.

For each case three functions are timed side by side: "before", the launcher as it was (a copy of
the old kernels/matmul.py or kernels/softmax.py, whose kernels are replaced by the current module's,
so that both sides launch the same binaries and share the autotuner's choice: only the host path
differs), "after", the current launcher, and torch (torch.matmul, i.e. cuBLAS, or torch.softmax).
Two timings, repeated in turn for the three: "eager", CALLS calls back to back between two CUDA
events (per call: the time the stream needs, the host's launch cost included when the host is the
bottleneck; and the host's own time per call), REPEATS times; and triton.testing.do_bench (L2
flushed between runs), as kernels.bench runs it. Both report the median with min and max. Before
timing, "after" is checked bit for bit against "before" on fresh operands, on a first and a
second (planned) call. For unaligned shapes (the padded route) a fourth function, "after+c", adds the
output the old launcher allocated and left unused there. Last, a cProfile of 500 planned calls at
4096 x 4096 x 512.

Run: PYTHONPATH=. python benchmarks/launch_plans.py --before DIR [--only "4096x4096x512,softmax"]
(DIR holds before_matmul.py and before_softmax.py, e.g. from git show REV:kernels/matmul.py.)
"""
import argparse
import cProfile
import datetime
import importlib
import io
import platform
import pstats
import statistics
import sys
import time

import torch
import triton
from triton.testing import do_bench

from kernels import matmul as after_matmul
from kernels import softmax as after_softmax

MATMUL_SHAPES = [(4096, 4096, 512), (16, 8192, 8192), (32, 8192, 8192), (64, 8192, 8192), (128, 8192, 8192),
                 (4096, 4096, 4096), (4097, 4095, 4093)]
SOFTMAX_CASES = [((16384, 1024), torch.float32), ((16384, 1024), torch.bfloat16), ((4096, 32768), torch.float32)]
SHARED = {"before_matmul": ("matmul_kernel", "matmul_kernel_autotuned", "matmul_split_k_kernel", "split_k_sum_kernel"),
          "before_softmax": ("softmax_fused_kernel", "softmax_looped_kernel")}


def load_before(folder: str) -> tuple:
    """The old launchers, with the current modules' kernels (one binary and one autotuner cache for both)."""
    sys.path.insert(0, folder)
    modules = []
    for name, current in (("before_matmul", after_matmul), ("before_softmax", after_softmax)):
        module = importlib.import_module(name)
        for kernel in SHARED[name]:
            setattr(module, kernel, getattr(current, kernel))
        modules.append(module)
    return tuple(modules)


def eager(fn, calls: int) -> tuple[float, float]:
    """(stream us per call, host us per call) over `calls` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls * 1e3, host


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):7.1f}, {max(values):7.1f}]"


def compare(label: str, fns: dict, calls: int, repeats: int) -> dict:
    """Time each function of fns in turn, eager and with do_bench; print one line each; return medians."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(eager(fn, calls))
    benched = {name: [t * 1e3 for t in do_bench(fn, warmup=50, rep=300, return_mode="all")] for name, fn in fns.items()}
    medians = {}
    for name in fns:
        stream = [r[0] for r in runs[name]]
        host = [r[1] for r in runs[name]]
        medians[name] = (statistics.median(stream), statistics.median(benched[name]))
        print(f"{label:28s} {name:7s} eager us/call {spread(stream)}  host us/call {statistics.median(host):7.1f}"
              f"  do_bench us {spread(benched[name])}", flush=True)
    ref = fns and list(fns)[-1]
    for name in list(fns)[:-1]:
        print(f"{label:28s} {ref}/{name}: eager {medians[ref][0] / medians[name][0]:.2f}x, "
              f"do_bench {medians[ref][1] / medians[name][1]:.2f}x", flush=True)
    return medians


def check_same(label: str, before, after, make) -> None:
    """after() equals before() bit for bit on two fresh inputs (first call, then the planned one)."""
    for _ in range(2):
        args = make()
        if not torch.equal(before(*args), after(*args)):
            raise AssertionError(f"{label}: after differs from before")
    print(f"{label:28s} after == before, bit for bit, on a first and a planned call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="folder with before_matmul.py and before_softmax.py")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--only", default="", help="comma-separated parts of case labels to run (default: all)")
    args = parser.parse_args()
    wanted = [part for part in args.only.split(",") if part]
    before_matmul, before_softmax = load_before(args.before)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"Python {platform.python_version()} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("# eager: median [min, max] over repeats of back-to-back calls; do_bench: median [min, max] of its runs")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in MATMUL_SHAPES:
            label = f"matmul {m}x{n}x{k} {str(dtype)[6:]}"
            if wanted and not any(part in label for part in wanted):
                continue
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            b = torch.randn(k, n, device="cuda", dtype=dtype)
            check_same(label, before_matmul.matmul, after_matmul.matmul,
                       lambda: (torch.randn_like(a), torch.randn_like(b)))
            calls = 50 if m * n * k >= 2**36 else 200
            fns = {"before": lambda: before_matmul.matmul(a, b), "after": lambda: after_matmul.matmul(a, b)}
            if m % 16 or n % 16 or k % 16:   # the old launcher also allocated an output it did not use here
                fns["after+c"] = lambda: (torch.empty(m, n, device="cuda", dtype=dtype), after_matmul.matmul(a, b))[1]
            compare(label, {**fns, "cuBLAS": lambda: torch.matmul(a, b)}, calls, args.repeats)
    for shape, dtype in SOFTMAX_CASES:
        label = f"softmax {shape[0]}x{shape[1]} {str(dtype)[6:]}"
        if wanted and not any(part in label for part in wanted):
            continue
        x = torch.randn(shape, device="cuda", dtype=dtype) * 4
        check_same(label, before_softmax.softmax_triton, after_softmax.softmax_triton,
                   lambda: (torch.randn_like(x) * 4,))
        compare(label, {"before": lambda: before_softmax.softmax_triton(x),
                        "after": lambda: after_softmax.softmax_triton(x),
                        "torch": lambda: torch.softmax(x, dim=-1)}, 200, args.repeats)
    a = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    after_matmul.matmul(a, b)
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        after_matmul.matmul(a, b)
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
    print("==== cProfile of 500 planned matmul() calls, 4096x4096x512 bfloat16\n" + text.getvalue())


if __name__ == "__main__":
    main()
