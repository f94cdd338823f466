"""Chapter 3: the tiling cost model, the tiled PyTorch reference and the Triton matmul.

The kernel runs in Triton's interpreter on CPU at small sizes, and compiled (autotuned) at
real sizes under the ``gpu`` marker. Every check draws fresh random inputs and compares
with torch.matmul on float64 copies of the same inputs.
"""
import math

import pytest
import torch

from conftest import kernel_device, needs_triton
from kernels import runtime
from lrn_lib import tiling

interpreter_only = pytest.mark.skipif(runtime.MODE != "interpreted",
                                      reason="interpreter sizes; compiled kernels are tested under the gpu marker")
UNIT_ROUNDOFF = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def assert_close_to_float64(c, a, b, atol=1e-5):
    """|c - a @ b| <= u |a @ b| + atol sqrt(K) + 16 u32 K: output rounding plus a float32 sum of K terms.

    A float32 sum of K unit-size products accumulates about u32 K / sqrt(2) of rounding
    error (u32 = 2**-24); the bound allows 16 u32 K, and atol sqrt(K) for small K.
    """
    k = a.shape[1]
    ref = a.double() @ b.double()
    assert c.shape == ref.shape and c.dtype == a.dtype and c.device == a.device
    bound = UNIT_ROUNDOFF[c.dtype] * ref.abs() + atol * math.sqrt(k) + 16 * 2**-24 * k
    excess = (c.double() - ref).abs() - bound
    assert excess.max().item() <= 0, f"{tuple(a.shape)} @ {tuple(b.shape)} {a.dtype}: over by {excess.max():.2e}"


def operands(m, n, k, dtype, device="cpu"):
    return torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)


# ------------------------------------------------------------------ cost model and roofline

def test_matmul_flops_and_minimum_bytes_follow_their_formulas():
    assert tiling.matmul_flops(2, 3, 4) == 48
    assert tiling.matmul_min_bytes(2, 3, 4, 2) == (8 + 12 + 6) * 2
    assert tiling.arithmetic_intensity(48, 52) == pytest.approx(48 / 52)


def test_arithmetic_intensity_rejects_non_positive_bytes():
    with pytest.raises(ValueError, match="bytes_moved"):
        tiling.arithmetic_intensity(10, 0)


def test_tiled_traffic_reduces_to_minimum_with_one_tile_and_grows_with_smaller_tiles():
    m, n, k = 300, 200, 50
    assert tiling.tiled_traffic_bytes(m, n, k, m, n, 4) == tiling.matmul_min_bytes(m, n, k, 4)
    sizes = [tiling.tiled_traffic_bytes(m, n, k, b, b, 4) for b in (8, 16, 64, 512)]
    assert sizes == sorted(sizes, reverse=True)
    # 8 row blocks, 4 column blocks (the last ones partial): A read 4 times, B read 8 times
    assert tiling.tiled_traffic_bytes(300, 200, 50, 40, 64, 1) == 300 * 50 * 4 + 50 * 200 * 8 + 300 * 200


def test_roofline_is_bandwidth_bound_below_the_ridge_and_flat_above():
    ceilings = tiling.H100_SXM_DATASHEET
    assert ceilings.peak_flops == 989e12 and ceilings.bandwidth == 3.35e12
    assert ceilings.ridge == pytest.approx(295.2, abs=0.1)
    assert tiling.attainable_flops(10, ceilings) == pytest.approx(10 * 3.35e12)
    assert tiling.attainable_flops(ceilings.ridge, ceilings) == pytest.approx(989e12)
    assert tiling.attainable_flops(1e5, ceilings) == 989e12


@pytest.mark.parametrize("grid_m,grid_n,group_m", [(1, 1, 1), (8, 8, 1), (8, 8, 4), (7, 5, 3), (13, 3, 8), (5, 9, 16)])
def test_program_order_visits_every_tile_once(grid_m, grid_n, group_m):
    tiles = [tiling.program_order(p, grid_m, grid_n, group_m) for p in range(grid_m * grid_n)]
    assert sorted(tiles) == [(i, j) for i in range(grid_m) for j in range(grid_n)]


def test_program_order_with_group_one_is_row_major_and_groups_go_down_columns():
    assert [tiling.program_order(p, 3, 4, 1) for p in range(5)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert [tiling.program_order(p, 4, 4, 2) for p in range(5)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


def test_grouping_reduces_the_panels_a_wave_reads():
    assert tiling.wave_panels(16, 8, 8, 1) == (2, 8)
    assert tiling.wave_panels(16, 8, 8, 4) == (4, 4)
    assert tiling.wave_panels(132, 64, 32, 8) == (8, 17)
    assert tiling.wave_panels(1000, 2, 2, 1) == (2, 2)  # more programs than tiles


# ------------------------------------------------------------------ tiled PyTorch reference

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 1000, 33), (1000, 17, 1), (1, 17, 1000), (65, 31, 97)])
def test_tiled_matmul_matches_float64_on_odd_shapes(m, n, k, dtype):
    a, b = operands(m, n, k, dtype)
    atol = 1e-13 if dtype == torch.float64 else 1e-5
    assert_close_to_float64(tiling.tiled_matmul(a, b, 16, 32, 8), a, b, atol)


def test_tiled_matmul_handles_non_contiguous_operands_and_any_block_sizes():
    a = torch.randn(40, 23, dtype=torch.float64).t()
    b = torch.randn(40, 60, dtype=torch.float64)[:, ::3]
    for blocks in [(1, 1, 1), (7, 5, 3), (100, 100, 100)]:
        assert_close_to_float64(tiling.tiled_matmul(a, b, *blocks), a, b, atol=1e-13)


@pytest.mark.parametrize("name", ["block_m", "block_n", "block_k"])
def test_tiled_matmul_rejects_bad_block_sizes(name):
    with pytest.raises(ValueError, match=name):
        tiling.tiled_matmul(torch.randn(2, 3), torch.randn(3, 2), **{name: 0})


# ------------------------------------------------------------------ bad input

BAD_CASES = {
    "non-tensor a": (lambda: ([[1.0]], torch.randn(1, 1)), TypeError, "a must be a torch.Tensor"),
    "integer a": (lambda: (torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 2)), TypeError,
                  "a has dtype torch.int64"),
    "integer b": (lambda: (torch.ones(2, 3), torch.ones(3, 2, dtype=torch.int32)), TypeError,
                  "b has dtype torch.int32"),
    "mismatched dtypes": (lambda: (torch.ones(2, 3), torch.ones(3, 2).half()), TypeError,
                          "b has dtype torch.float16 but a has torch.float32"),
    "mismatched inner dims": (lambda: (torch.ones(2, 3), torch.ones(4, 2)), ValueError,
                              "inner dimensions differ: a has 3 columns but b has 4 rows"),
    "1-D a": (lambda: (torch.ones(3), torch.ones(3, 2)), ValueError, r"a has shape \(3,\); matmul needs a 2-D"),
    "3-D b": (lambda: (torch.ones(2, 3), torch.ones(1, 3, 2)), ValueError, r"b has shape \(1, 3, 2\)"),
    "empty a": (lambda: (torch.ones(0, 3), torch.ones(3, 2)), ValueError, r"a is empty \(shape \(0, 3\)\)"),
    "empty inner dim": (lambda: (torch.ones(2, 0), torch.ones(0, 2)), ValueError, "a is empty"),
    "empty b": (lambda: (torch.ones(2, 3), torch.ones(3, 0)), ValueError, "b is empty"),
    "mismatched devices": (lambda: (torch.ones(2, 3), torch.ones(3, 2, device="meta")), ValueError,
                           "b is on meta but a is on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_tiled_matmul_rejects_bad_input_naming_the_argument(case):
    make, error, message = BAD_CASES[case]
    with pytest.raises(error, match=message):
        tiling.tiled_matmul(*make())


@needs_triton
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_kernel_rejects_bad_input_naming_the_argument(case):
    from kernels.matmul import matmul

    make, error, message = BAD_CASES[case]
    a, b = make()
    if runtime.MODE == "compiled" and isinstance(a, torch.Tensor) and case != "mismatched devices":
        a, b = a.cuda(), b.cuda()
        message = message.replace("cpu", "cuda:0")
    with pytest.raises(error, match=message):
        matmul(a, b)


@needs_triton
def test_kernel_rejects_float64_which_it_does_not_implement():
    from kernels.matmul import matmul

    a, b = operands(2, 3, 4, torch.float64, kernel_device())
    with pytest.raises(TypeError, match="a has dtype torch.float64; matmul takes float16, bfloat16, float32"):
        matmul(a, b)


@needs_triton
def test_kernel_rejects_an_incomplete_config():
    from kernels.matmul import matmul

    a, b = operands(2, 3, 4, torch.float32, kernel_device())
    with pytest.raises(ValueError, match="config lacks"):
        matmul(a, b, config={"BLOCK_M": 16, "BLOCK_N": 16})


@pytest.mark.parametrize("bad, error, words", [
    ({"GROUP_M": 0}, ValueError, "GROUP_M"), ({"GROUP_M": -3}, ValueError, "GROUP_M"),
    ({"BLOCK_M": 48}, ValueError, "BLOCK_M"), ({"BLOCK_K": 8}, ValueError, "BLOCK_K"),
    ({"BLOCK_N": 512}, ValueError, "BLOCK_N"), ({"BLOCK_M": 32.0}, TypeError, "BLOCK_M"),
    ({"GROUP_M": True}, TypeError, "GROUP_M"), ({"num_warps": 3}, ValueError, "num_warps"),
    ({"num_stages": 0}, ValueError, "num_stages"), ({"BLOCKM": 32}, ValueError, "unknown keys"),
])
def test_kernel_rejects_config_values_it_cannot_run_before_launching(bad, error, words):
    from kernels.matmul import matmul

    a, b = operands(2, 3, 4, torch.float32, kernel_device())
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, **bad}
    with pytest.raises(error, match=words):
        matmul(a, b, config=config)


def test_kernels_package_imports_nothing_from_lrn_lib_but_infrastructure():
    import ast
    from pathlib import Path

    from lrn_lib.book import load_book

    book = load_book()
    root = Path(__file__).resolve().parent.parent / "kernels"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            for name in names:
                if name.startswith("lrn_lib"):
                    assert any(name == m or name.startswith(m + ".") for m in book.infrastructure), \
                        f"{path.name} imports {name}"


# ------------------------------------------------------------------ kernel, interpreter on CPU

@needs_triton
@interpreter_only
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 1000, 33), (1000, 17, 1), (1, 17, 1000), (33, 65, 64),
                                   (100, 77, 300)])
def test_kernel_matches_float64_on_odd_shapes_in_the_interpreter(m, n, k, dtype):
    from kernels.matmul import matmul

    a, b = operands(m, n, k, dtype)
    assert_close_to_float64(matmul(a, b), a, b)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_reads_transposed_and_sliced_operands_in_place(dtype):
    from kernels.matmul import matmul

    device = kernel_device()
    a = torch.randn(70, 45, device=device).to(dtype).t()          # (45, 70), column-major
    b = torch.randn(70, 99, device=device).to(dtype)[:, 1::2]     # (70, 49), column stride 2
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_close_to_float64(matmul(a, b), a, b)
    assert_close_to_float64(matmul(b.t(), a.t()), b.t(), a.t())


@needs_triton
@interpreter_only
@pytest.mark.parametrize("group_m", [1, 2, 3, 8])
@pytest.mark.parametrize("blocks", [(16, 16, 16), (32, 16, 64), (16, 64, 32)])
def test_kernel_is_correct_for_any_fixed_config_and_program_order(blocks, group_m):
    from kernels.matmul import matmul

    a, b = operands(75, 90, 50, torch.float16)
    config = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2], "GROUP_M": group_m}
    assert_close_to_float64(matmul(a, b, config=config), a, b)


@needs_triton
def test_bfloat16_results_are_rounded_to_nearest_like_torch():
    from kernels.matmul import matmul

    a, b = operands(40, 30, 1, torch.bfloat16, kernel_device())  # K = 1: each product is exact in float32
    torch.testing.assert_close(matmul(a, b), (a.float() @ b.float()).bfloat16(), rtol=0, atol=0)


@needs_triton
def test_float32_follows_torch_tf32_setting_and_tf32_stays_within_its_tolerance():
    from kernels.matmul import matmul

    a, b = operands(64, 48, 512, torch.float32, kernel_device())
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: full float32 matmuls
    assert_close_to_float64(matmul(a, b), a, b, atol=1e-5)
    assert_close_to_float64(matmul(a, b, allow_tf32=True), a, b, atol=4e-3)


def test_pruning_drops_configs_that_overflow_shared_memory_for_float32():
    from kernels.matmul import SHARED_MEMORY_BUDGET, pipeline_bytes

    assert pipeline_bytes(128, 256, 64, 4, 2) <= SHARED_MEMORY_BUDGET
    assert pipeline_bytes(128, 256, 64, 4, 4) > SHARED_MEMORY_BUDGET


# ------------------------------------------------------------------ kernel, compiled on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 1000, 33), (1000, 17, 1), (1, 17, 1000), (1000, 1000, 1000),
                                   (4097, 1000, 4095), (4096, 4096, 4096), (16384, 1024, 4096), (129, 8191, 257)])
def test_compiled_autotuned_kernel_matches_float64(m, n, k, dtype):
    from kernels.matmul import matmul

    a, b = operands(m, n, k, dtype, "cuda")
    assert_close_to_float64(matmul(a, b), a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("group_m", [1, 8])
def test_compiled_fixed_configs_match_float64(group_m):
    from kernels.matmul import hopper_configs, matmul

    a, b = operands(1000, 3000, 777, torch.bfloat16, "cuda")
    for cfg in hopper_configs():
        config = {**cfg.kwargs, "GROUP_M": group_m, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        assert_close_to_float64(matmul(a, b, config=config), a, b)


@pytest.mark.gpu
def test_compiled_kernel_rejects_cpu_tensors():
    from kernels.matmul import matmul

    with pytest.raises(ValueError, match="a is on cpu"):
        matmul(torch.randn(2, 3), torch.randn(3, 2))


# ------------------------------------------------------------------ skinny, small-K and unaligned shapes (3.6)

def test_split_k_count_splits_only_when_tiles_leave_multiprocessors_idle():
    from kernels.matmul import split_k_count

    assert split_k_count(132, 64, 132) == 1                 # a full wave: W(S) >= W(1)
    assert split_k_count(1000, 512, 132) == 1
    assert split_k_count(64, 64, 132) == 2                  # W = 64, 32, 44, 32: the smallest best S
    assert split_k_count(8, 64, 132) == 16                  # capped by most
    assert split_k_count(8, 64, 132, most=64) == 16         # capped by min_blocks: 64 // 4
    assert split_k_count(8, 7, 132) == 1                    # too few steps to share
    for tiles, k_blocks, p in [(1, 100, 7), (5, 33, 16), (64, 128, 132), (100, 8, 132)]:
        s = split_k_count(tiles, k_blocks, p)
        work = [-(-tiles * t // p) * -(-k_blocks // t) for t in range(1, min(16, k_blocks // 4) + 1)]
        assert work[s - 1] == min(work) and work.index(min(work)) == s - 1


def test_skinny_config_rounds_m_up_and_splits_k_only_for_very_few_tiles():
    from kernels.matmul import SHARED_MEMORY_BUDGET, pipeline_bytes, skinny_config

    for m, block_m in [(1, 16), (16, 16), (17, 32), (64, 64), (100, 128), (128, 128)]:
        config, s = skinny_config(m, 8192, 8192, 2, 132)
        assert config["BLOCK_M"] == block_m and s == 1       # >= 32 tiles: a quarter of 132 streams B
        assert pipeline_bytes(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_stages"],
                              2) <= SHARED_MEMORY_BUDGET
    config, s = skinny_config(16, 8192, 8192, 4, 132)
    assert config["BLOCK_K"] == 64 and pipeline_bytes(16, 128, 64, config["num_stages"], 4) <= SHARED_MEMORY_BUDGET
    assert skinny_config(128, 1024, 8192, 2, 132) == (skinny_config(128, 1024, 8192, 2, 132)[0], 2)  # 16 tiles
    assert skinny_config(16, 512, 8192, 2, 132)[1] == 8      # 4 tiles on 33: W(8) = 1 x 8 steps
    with pytest.raises(ValueError, match="m = 129"):
        skinny_config(129, 8192, 8192, 2, 132)


def test_needs_padding_sees_unaligned_sizes_and_strides():
    from kernels.matmul import needs_padding

    a, b = torch.randn(33, 64), torch.randn(64, 48)
    assert not needs_padding(a, b)                           # M itself may be anything
    assert needs_padding(torch.randn(33, 65), torch.randn(65, 48))
    assert needs_padding(a, torch.randn(64, 50))
    assert needs_padding(torch.randn(64, 33).t(), b)         # column-major a: row stride 1, column stride 33
    assert not needs_padding(torch.randn(64, 48).t(), torch.randn(64, 32))
    assert needs_padding(torch.randn(40, 65)[:, 1:], b)      # a pointer one element past alignment


def test_padded_copy_keeps_the_corner_and_zeros_the_rest():
    from kernels.matmul import padded_copy

    x = torch.randn(70, 45).t()                              # (45, 70), column-major
    out = padded_copy(x, 64, 128)
    assert out.shape == (64, 128) and out.is_contiguous() and torch.equal(out[:45, :70], x)
    assert out[45:].abs().sum() == 0 and out[:, 70:].abs().sum() == 0
    with pytest.raises(ValueError, match="cols"):
        padded_copy(x, 64, 69)


@needs_triton
@interpreter_only
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k,split_k", [(1, 1, 1, 2), (17, 40, 100, 2), (33, 65, 64, 3), (5, 70, 129, 5),
                                           (40, 3, 300, 64), (100, 77, 300, 4)])
def test_split_k_kernel_matches_float64_in_the_interpreter(m, n, k, split_k, dtype):
    from kernels.matmul import matmul

    a, b = operands(m, n, k, dtype)
    c = matmul(a, b, split_k=split_k)
    assert c.is_contiguous()
    assert_close_to_float64(c, a, b)


@needs_triton
@interpreter_only
def test_split_k_kernel_reads_strided_operands_and_takes_a_fixed_config():
    from kernels.matmul import matmul

    a = torch.randn(90, 30).t().to(torch.float16)              # (30, 90), column-major
    b = torch.randn(90, 99)[:, 1::3].to(torch.float16)         # (90, 33), column stride 3
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    assert_close_to_float64(matmul(a, b, config=config, split_k=3), a, b)
    assert_close_to_float64(matmul(a, b, split_k=1), a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 8192, 8192), (16, 4096, 8192), (64, 8192, 8192), (100, 4095, 4093),
                                   (128, 8192, 8192), (64, 1000, 100), (128, 17, 8192)])
def test_compiled_skinny_products_match_float64(m, n, k, dtype):
    from kernels.matmul import matmul

    a, b = operands(m, n, k, dtype, "cuda")
    assert_close_to_float64(matmul(a, b), a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("m,n,k", [(4097, 4095, 4093), (2049, 3000, 1001), (4096, 4096, 512)])
def test_compiled_unaligned_and_small_k_products_match_float64(m, n, k, dtype):
    from kernels.matmul import matmul, needs_padding

    a, b = operands(m, n, k, dtype, "cuda")
    assert needs_padding(a, b) == (k % 16 != 0 or n % 16 != 0)
    c = matmul(a, b)
    assert c.shape == (m, n)
    assert_close_to_float64(c, a, b)
    a_t = a.t().contiguous().t()                             # column-major a with an odd stride
    assert_close_to_float64(matmul(a_t, b), a_t, b)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_compiled_forced_split_k_matches_float64(split_k, dtype):
    from kernels.matmul import matmul

    for m, n, k in [(300, 500, 4097), (1000, 1000, 1000), (64, 8192, 8192)]:
        a, b = operands(m, n, k, dtype, "cuda")
        assert_close_to_float64(matmul(a, b, split_k=split_k), a, b)
