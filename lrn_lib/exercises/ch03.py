"""The exercises of chapter 03 (Tiling): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 03 id is checked.

Hand-written; may import only library modules of chapter 03 or earlier (book.toml order).
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, Mistake, _close, _loguniform_int, _randn
from lrn_lib.tiling import matmul_flops, matmul_min_bytes, tiled_traffic_bytes


def _cases_tiled_matmul(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("a", "b", "block_m", "block_n", "block_k")

    def case(m: int, n: int, k: int, bm: int, bn: int, bk: int, note: str = "random") -> Case:
        a, b = _randn(gen, m, k), _randn(gen, k, n)
        return Case((a, b, bm, bn, bk), names, a @ b, note)

    yield case(1, 1, 1, 1, 1, 1, "1 x 1 matrices")
    yield case(8, 8, 8, 4, 4, 4, "blocks that divide every size")
    yield case(4, 4, 10, 4, 4, 4, "K = 10 with block_k = 4: a shorter last K block")
    yield case(7, 9, 4, 4, 4, 4, "M = 7 and N = 9 with blocks of 4: smaller edge tiles")
    yield case(5, 3, 7, 8, 8, 8, "blocks larger than the matrices")
    while True:
        m, n, k = (rng.randint(1, 48) for _ in range(3))
        while True:
            bm, bn, bk = (rng.randint(1, 32) for _ in range(3))
            if math.ceil(m / bm) * math.ceil(n / bn) * math.ceil(k / bk) <= 300:
                break
        yield case(m, n, k, bm, bn, bk)


def _matmul_without_k_tail(a, b, block_m, block_n, block_k):
    full = a.shape[1] // block_k * block_k
    return a[:, :full] @ b[:full]


def _matmul_without_edge_tiles(a, b, block_m, block_n, block_k):
    c = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    rows, cols = a.shape[0] // block_m * block_m, b.shape[1] // block_n * block_n
    c[:rows, :cols] = (a @ b)[:rows, :cols]
    return c


def _tiled_matmul_edges(case: Case, got: list[torch.Tensor]) -> str | None:
    """A hint when only entries in the last (shorter) row or column block are wrong."""
    a, b, bm, bn, _ = case.args
    wrong = ~_close(got[0], a @ b, 1e-5, 1e-6)
    inner = wrong[: a.shape[0] // bm * bm, : b.shape[1] // bn * bn]
    if wrong.any() and not inner.any():
        return ("only entries in the edge tiles (the last row or column block, shorter when the block "
                "size does not divide M or N) are wrong: slice a[i:i + block_m] and write back what "
                "the slice gives, equation (3.1)")
    return None


def _intensity(m: int, n: int, k: int, block_m: int, block_n: int, bytes_per_element: int) -> float:
    return matmul_flops(m, n, k) / tiled_traffic_bytes(m, n, k, block_m, block_n, bytes_per_element)


def _cases_tiled_intensity(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    names = ("m", "n", "k", "block_m", "block_n", "bytes_per_element")
    fixed = [((4096, 4096, 4096, 128, 128, 2), "large square, blocks divide"),
             ((100, 100, 100, 64, 64, 4), "blocks that do not divide"),
             ((1, 1, 1, 16, 16, 2), "1 x 1 x 1"), ((8192, 512, 1024, 128, 256, 2), "rectangular blocks")]
    for args, note in fixed:
        yield Case(args, names, _intensity(*args), note)
    while True:
        m, n, k = (_loguniform_int(rng, 1, 20000) for _ in range(3))
        if rng.random() < 0.5:
            block_m, block_n = rng.choice([16, 32, 64, 128, 256]), rng.choice([16, 32, 64, 128, 256])
        else:
            block_m, block_n = rng.randint(1, 300), rng.randint(1, 300)
        args = (m, n, k, block_m, block_n, rng.choice([1, 2, 4, 8]))
        yield Case(args, names, _intensity(*args))


def _traffic_floor(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * (n // block_n) + k * n * (m // block_m) + m * n) * s)


def _traffic_swapped(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * math.ceil(m / block_m) + k * n * math.ceil(n / block_n) + m * n) * s)


def _traffic_no_c(m, n, k, block_m, block_n, s):
    return 2 * m * n * k / ((m * k * math.ceil(n / block_n) + k * n * math.ceil(m / block_m)) * s)


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="03.tiled_matmul", summary="a @ b computed tile by tile, equation (3.1)",
        signature="tiled_matmul(a, b, block_m: int, block_n: int, block_k: int) -> torch.Tensor",
        cases=_cases_tiled_matmul, n_cases=60, outputs=("c",), atol=1e-5,
        fallback="C[I, J] = sum over P of A[I, P] B[P, J], equation (3.1): loop over tiles of C, and for each "
                 "over blocks of K, accumulating",
        shape_hint="C = A B has shape (M, N): M rows of a, N columns of b",
        diagnose=_tiled_matmul_edges,
        mistakes=(
            Mistake(_matmul_without_k_tail,
                    "your sum misses the last, shorter block along K (K is not a multiple of block_k): "
                    "loop with range(0, K, block_k) and slice, as in (3.1)"),
            Mistake(_matmul_without_edge_tiles,
                    "the edge tiles are missing: when block_m or block_n does not divide M or N the last "
                    "tiles are smaller, and range(0, M, block_m) with slicing covers them"),
        )),
    Exercise(
        id="03.tiled_intensity", summary="the arithmetic intensity of a tiled matmul, equations (3.2), (3.4), (3.5)",
        signature="tiled_intensity(m, n, k, block_m, block_n, bytes_per_element) -> float  (FLOP per byte)",
        cases=_cases_tiled_intensity, n_cases=200, outputs=("intensity",), rtol=1e-9, atol=0.0,
        fallback="I = 2MNK / Q_tiled with Q_tiled = (MK ceil(N / b_N) + KN ceil(M / b_M) + MN) s, "
                 "equations (3.2), (3.4) and (3.5)",
        shape_hint="return one number",
        mistakes=(
            Mistake(lambda m, n, k, bm, bn, s: 2 * bm * bn / ((bm + bn) * s),
                    "that is the large-matrix approximation I_tile of (3.5); count the exact traffic, with "
                    "ceilings and the write of C"),
            Mistake(_traffic_floor,
                    "partial tiles count: use ceil(N / b_N) and ceil(M / b_M), since a program at the edge "
                    "still reads whole panels (3.5)"),
            Mistake(_traffic_swapped,
                    "A is read once per column block of C, ceil(N / b_N) times, and B once per row block, "
                    "ceil(M / b_M) times: you swapped them (3.5)"),
            Mistake(lambda m, n, k, bm, bn, s: _intensity(m, n, k, bm, bn, s) / 2,
                    "a multiply-add is two floating-point operations: F = 2MNK, equation (3.2)"),
            Mistake(lambda m, n, k, bm, bn, s: matmul_flops(m, n, k) / matmul_min_bytes(m, n, k, s),
                    "that is the best case Q_min of (3.3); a tiled kernel rereads panels of A and B, (3.5)"),
            Mistake(_traffic_no_c,
                    "count the write of C, MN elements, in the traffic (3.5)"),
            Mistake(lambda m, n, k, bm, bn, s: _intensity(m, n, k, bm, bn, s) * s,
                    "traffic is in bytes: multiply the element count by bytes_per_element (3.5)"),
        )),
)
