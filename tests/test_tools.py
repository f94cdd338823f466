"""Execution profiles, the doctor and the benchmark command, each in a fresh process so
that environment variables act as they do for a reader."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_lrn_device_cpu_forces_the_cpu_profile_and_the_interpreter():
    code = ("from lrn_lib import config; import kernels; "
            "print(config.DEVICE.type, config.PROFILE, config.pick(cpu='small', gpu='big'), kernels.runtime.MODE)")
    env = {"LRN_DEVICE": "cpu"}
    env_without = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env_without, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "cpu", "small", "interpreted"]


def test_unknown_lrn_device_is_a_clear_error():
    result = run_python("-c", "import lrn_lib.config", env={"LRN_DEVICE": "tpu"})
    assert result.returncode != 0
    assert "LRN_DEVICE='tpu': expected one of cpu, cuda, mps" in result.stderr


def test_seed_everything_repeats_random_draws():
    from lrn_lib import config

    config.seed_everything(3)
    first = torch.randn(4)
    config.seed_everything(3)
    assert torch.equal(first, torch.randn(4))


def test_start_chapter_seeds_sets_threads_and_says_how_kernels_run():
    code = ("import torch; from lrn_lib import config; config.start_chapter(threads=1); a = torch.randn(3); "
            "config.seed_everything(0); print(torch.equal(a, torch.randn(3)), torch.get_num_threads())")
    result = run_python("-c", code, env={"LRN_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "Triton kernels run: interpreted" and lines[-1] == "True 1", result.stdout


@pytest.mark.parametrize("threads,error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_start_chapter_rejects_a_bad_thread_count(threads, error):
    from lrn_lib import config

    with pytest.raises(error, match="threads"):
        config.start_chapter(threads=threads)


def test_doctor_prints_one_ok_or_fail_line_per_requirement():
    result = run_python("-m", "lrn_lib.doctor")
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith(("OK   ", "FAIL ")) for line in lines), result.stdout
    assert any(line.startswith("OK   Python") for line in lines)
    assert any("torch" in line for line in lines)
    assert any(line.startswith("OK   device: ") for line in lines)
    assert any("kernels run" in line or "triton not installed" in line for line in lines)
    assert result.returncode == (1 if any(line.startswith("FAIL") for line in lines) else 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_refuses_clearly_without_a_gpu():
    result = run_python("-m", "kernels.bench", "softmax")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


def test_bench_rejects_unknown_benchmark_names():
    result = run_python("-m", "kernels.bench", "no_such_kernel")
    assert result.returncode == 2
    assert "unknown benchmark(s) no_such_kernel; known: softmax" in result.stderr


def test_without_triton_the_reference_runs_with_one_clear_warning():
    code = """
import sys, warnings
sys.modules["triton"] = None  # as on macOS or Windows, where triton has no wheels
import torch
from kernels import runtime
from kernels.softmax import softmax_triton
from lrn_lib.softmax import safe_softmax, softmax
x = torch.randn(3, 7)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert torch.equal(softmax(x, impl="triton"), safe_softmax(x))
    assert torch.equal(softmax(x, impl="triton"), safe_softmax(x))
assert len(caught) == 1 and "Triton is not installed" in str(caught[0].message), caught
try:
    softmax_triton(x)
except RuntimeError as err:
    assert "Triton is not installed" in str(err)
else:
    raise AssertionError("the launcher ran without triton")
print(runtime.MODE)
"""
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unavailable"


# ------------------------------------------------------------------ the benchmark's pure helpers

def test_bench_relative_error_takes_the_worst_of_several_gradients():
    from kernels.bench import relative_error

    ref = (torch.ones(4), torch.ones(3), 2 * torch.ones(2))
    ours = (torch.ones(4), torch.ones(3) * 1.1, 2 * torch.ones(2))
    assert relative_error(ours, ref) == pytest.approx(0.1)
    assert relative_error(torch.ones(3), torch.ones(3)) == 0
    assert relative_error((torch.tensor([float("nan")]),), (torch.ones(1),)) == float("inf")
    with pytest.raises(ValueError, match="equally long"):
        relative_error(ours[:2], ref)
    with pytest.raises(ValueError, match="shape"):
        relative_error(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="ours"):
        relative_error([1.0], [torch.ones(1)])


def test_bench_attention_flops_counts_pairs_bottom_right():
    from kernels.bench import attention_flops

    assert attention_flops(2, 3, 5, 7, 4, False) == 4 * 2 * 3 * 5 * 7 * 4
    assert attention_flops(1, 1, 4, 4, 1, True) == 4 * (1 + 2 + 3 + 4)          # square: the lower triangle
    assert attention_flops(1, 1, 2, 5, 1, True) == 4 * (4 + 5)                  # the queries are the last 2 keys
    assert attention_flops(1, 1, 5, 2, 1, True) == 4 * (0 + 0 + 0 + 1 + 2)      # early queries see no key
    with pytest.raises(ValueError, match="head_dim"):
        attention_flops(1, 1, 1, 1, 0, True)
    with pytest.raises(TypeError, match="causal"):
        attention_flops(1, 1, 1, 1, 1, "yes")


def test_bench_spread_cells_and_ratio_range():
    from kernels.bench import ratio_range, spread_cell, spread_table

    row = {"name": "x", "shape": [2, 3], "ours_ms": 0.002, "ours_min_ms": 0.001, "ours_max_ms": 0.004,
           "torch_ms": 0.004, "torch_min_ms": 0.003, "torch_max_ms": 0.008, "ours_over_torch": 2.0}
    assert spread_cell(row, "ours") == "1.0/2.0/4.0"
    assert ratio_range(row) == pytest.approx((0.75, 8.0))
    line = spread_table([row]).splitlines()[1]
    assert "1.0/2.0/4.0" in line and "3.0/4.0/8.0" in line and "0.75-8.00" in line
    with pytest.raises(ValueError, match="side"):
        spread_cell(row, "theirs")
    with pytest.raises(ValueError, match="graph_"):
        ratio_range(row, "graph_")


def test_bench_compile_anchor_compiles_or_reports_a_skip_line(capsys):
    from kernels import bench

    compiled = bench.compile_anchor(lambda x: torch.softmax(x, -1), torch.randn(3, 5), label="t", backend="eager")
    x = torch.randn(4, 6)
    torch.testing.assert_close(compiled(x), torch.softmax(x, -1))

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler in this test")

    before = len(bench.SKIPPED)
    assert bench.compile_anchor(lambda x: x.exp() + 1, torch.randn(3), label="softmax/compile t",
                                backend=broken_backend) is None
    assert len(bench.SKIPPED) == before + 1
    out = capsys.readouterr().out
    assert out.startswith("skip: softmax/compile t: torch.compile failed here")
    with pytest.raises(TypeError, match="fn"):
        bench.compile_anchor(3, label="t")
    with pytest.raises(ValueError, match="label"):
        bench.compile_anchor(torch.exp, label="")
