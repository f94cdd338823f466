# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3. Tiling: solutions to the exercises
#
# Worked solutions to the exercises at the end of chapter 3. Each code solution is run
# through its checker, `lrn_lib.exercises.check`, which tests it on fresh random inputs
# against the library's float64 references and prints one line.

# %%
import math

import torch

from lrn_lib import config
from lrn_lib.exercises import check, exercises
from lrn_lib.tiling import H100_SXM_DATASHEET, arithmetic_intensity, matmul_flops, wave_panels

config.seed_everything(0)
print("\n".join(exercises("03")))

# %% [markdown]
# ## Exercise 1 (derive): the best tile shape
#
# When the blocks divide the sizes, the ceilings in (3.5) are exact quotients, so
#
# $$\frac{F}{Q_{\text{tiled}}} = \frac{2MNK}{\big(MK\,\tfrac{N}{b_N} + KN\,\tfrac{M}{b_M} + MN\big)s}
#   = \frac{2}{\big(\tfrac{1}{b_N} + \tfrac{1}{b_M} + \tfrac{1}{K}\big)s}.$$
#
# As $K$ grows the last term vanishes, leaving
# $I_{\text{tile}} = \dfrac{2}{(1/b_M + 1/b_N)s} = \dfrac{2 b_M b_N}{(b_M + b_N)s}$. $b_K$ appears
# nowhere: it sets how much of each panel is on chip at once, not how often a panel is read.
#
# With $b_M b_N = A$ fixed, the numerator $2A$ is fixed and $I_{\text{tile}}$ is largest when
# $b_M + b_N$ is smallest. By the inequality of arithmetic and geometric means,
# $b_M + b_N \ge 2\sqrt{b_M b_N} = 2\sqrt{A}$, with equality exactly when $b_M = b_N = \sqrt A$;
# then $I_{\text{tile}} = \sqrt{A}/s$. For $A = 128 \cdot 256 = 32768$ in bfloat16 ($s = 2$): a
# square tile gives $\sqrt{32768}/2 \approx 90.5$ FLOP/byte against $85.3$ for 128 x 256, only
# 6% more, which is why kernels keep power-of-two tiles.

# %%
def tile_intensity(block_m: int, block_n: int, s: int) -> float:
    """The large-matrix limit I_tile = 2 b_M b_N / ((b_M + b_N) s) of (3.5)."""
    return 2 * block_m * block_n / ((block_m + block_n) * s)


for bm, bn in [(128, 256), (181, 181), (64, 512)]:
    print(f"{bm:3d} x {bn:3d} (area {bm * bn:5d}): I_tile = {tile_intensity(bm, bn, 2):5.1f} FLOP/byte")
print(f"square over 128 x 256: {tile_intensity(181, 181, 2) / tile_intensity(128, 256, 2):.3f}x")

# %% [markdown]
# ## Exercise 2 (implement): a tiled matmul
#
# Two loops over the tiles of $C$ and one over blocks of $K$, as in (3.1). Python slices stop
# at the end of a tensor, so the edge tiles and the last $K$ block are simply shorter, and
# writing the accumulator back through the same slices fills exactly the edge tile.

# %%
def tiled_matmul(a: torch.Tensor, b: torch.Tensor, block_m: int, block_n: int, block_k: int) -> torch.Tensor:
    """C = A B tile by tile, equation (3.1), accumulating in a's dtype."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype)
    for i in range(0, m, block_m):
        for j in range(0, n, block_n):
            acc = torch.zeros(min(block_m, m - i), min(block_n, n - j), dtype=a.dtype)
            for p in range(0, k, block_k):
                acc += a[i:i + block_m, p:p + block_k] @ b[p:p + block_k, j:j + block_n]
            c[i:i + block_m, j:j + block_n] = acc
    return c


print(check("03.tiled_matmul", tiled_matmul))

# %% [markdown]
# ## Exercise 3 (implement): the intensity of a tiling
#
# $F = 2MNK$ (3.2) over the traffic (3.5), in which each of the $\lceil N / b_N \rceil$ column
# blocks of $C$ reads all of $A$, each of the $\lceil M / b_M \rceil$ row blocks reads all of
# $B$, and $C$ is written once.

# %%
def tiled_intensity(m: int, n: int, k: int, block_m: int, block_n: int, bytes_per_element: int) -> float:
    """FLOP per byte of a tiled matmul without cache sharing: (3.2) over (3.5)."""
    traffic = (m * k * math.ceil(n / block_n) + k * n * math.ceil(m / block_m) + m * n) * bytes_per_element
    return 2 * m * n * k / traffic


print(check("03.tiled_intensity", tiled_intensity))
print(f"8192^3, 128 x 256 tiles, bfloat16: I = {tiled_intensity(8192, 8192, 8192, 128, 256, 2):.1f} FLOP/byte "
      f"(limit {tile_intensity(128, 256, 2):.1f})")

# %% [markdown]
# ## Exercise 4 (measure): the best group size
#
# The wave's traffic and intensity as in section 3.5, for each group size.

# %%
m = n = k = 8192
block_m, block_n, programs = 128, 256, 132
grid_m, grid_n = math.ceil(m / block_m), math.ceil(n / block_n)
ridge = H100_SXM_DATASHEET.ridge
wave_intensity = {}
for group_m in (1, 2, 4, 8, 16, 32, 64):
    a_panels, b_panels = wave_panels(programs, grid_m, grid_n, group_m)
    wave_bytes = (a_panels * block_m + b_panels * block_n) * k * 2
    wave_intensity[group_m] = arithmetic_intensity(programs * matmul_flops(block_m, block_n, k), wave_bytes)
    print(f"GROUP_M = {group_m:2d}: {a_panels:2d} A panels ({a_panels * block_m:4d} rows) + {b_panels:2d} B panels "
          f"({b_panels * block_n:4d} columns), I = {wave_intensity[group_m]:5.0f} FLOP/byte")
best = max(wave_intensity, key=wave_intensity.get)
print(f"best GROUP_M = {best}; every group size above the ridge ({ridge:.0f} FLOP/byte):",
      all(i > ridge for i in wave_intensity.values()))

# %% [markdown]
# The best group, 16, covers 16 tile rows (2048 rows of $C$) by 9 tile columns (2304
# columns): the squarest patch in elements that 132 programs can cover, so it reads the
# fewest panels per tile. Smaller groups make wide, short patches that read every B panel;
# larger ones make tall, narrow patches that read many A panels. Even the worst order stays
# above the ridge point in this model, so the measured gain of grouping in section 3.7 was
# modest.
