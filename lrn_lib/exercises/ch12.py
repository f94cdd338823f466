"""The exercises of chapter 12 (The Byte Latent Transformer): their random inputs, the mistake models that
name a wrong answer, and the catalogue entries (``EXERCISES``) that lrn_lib.exercises loads
when a chapter 12 id is checked.

Hand-written; may import only library modules of chapter 12 or earlier (book.toml order).
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import torch

from lrn_lib.exercises.machinery import Case, Exercise, Mistake
from lrn_lib.patching import HASH_BASE, HASH_PRIME, PAD, bytes_to_tensor, hash_ngram_ids


def _rolling_case(data: bytes, n: int, table_size: int, note: str = "random") -> Case:
    expected = hash_ngram_ids(bytes_to_tensor(data), n, table_size)
    return Case((data, n, table_size), ("data", "n", "table_size"), expected, note)


def _cases_rolling_ids(rng: random.Random, gen: torch.Generator) -> Iterator[Case]:
    yield _rolling_case(b"the cat sat on the mat", 3, 4096, "section 12.5's 3-grams")
    yield _rolling_case(b"\x00\x00\x00\x00", 2, 1000, "zero bytes: c = x + 1 keeps them counted")
    yield _rolling_case(b"ab", 5, 4096, "n longer than the data: every n-gram starts in the padding")
    yield _rolling_case(b"\xff" * 20, 8, 2 ** 31, "a table larger than p: ids are the hash itself")
    yield _rolling_case(b"hello", 1, 7, "n = 1: the byte itself")
    yield _rolling_case(b"rolling hash", 4, 1, "a table of one row: every id is 0")
    while True:
        length = rng.randint(1, 200)
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(length))
        else:
            data = (bytes(rng.randrange(256) for _ in range(rng.randint(1, 5))) * length)[:length]
        table_size = rng.choice([1, 7, 4096, 500_009, 2 ** 20, rng.randint(1, 10 ** 9)])
        yield _rolling_case(data, rng.randint(1, 10), table_size)


def _rolling_with(c_of: Callable[[int], int], pad: int | None, prime: int | None):
    """The n-gram hashes with a chosen byte map, padding value (None: n-grams shortened at the start)
    and prime (None: no reduction mod p)."""
    def ids(data: bytes, n: int, table_size: int) -> list[int]:
        values = [c_of(x) for x in data]
        out = []
        for t in range(len(values)):
            window = values[max(0, t - n + 1): t + 1]
            if pad is not None:
                window = [pad] * (n - len(window)) + window
            h = 0
            for c in window:
                h = h * HASH_BASE + c
                if prime is not None:
                    h %= prime
            out.append(h % table_size)
        return out
    return ids


# ---------------------------------------------------------------- the catalogue

EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        id="12.rolling_ids", summary="the n-gram hash (12.9) at every position, streamed with the rolling update",
        signature="rolling_ids(data: bytes, n: int, table_size: int) -> list[int]  (one id per byte)",
        cases=_cases_rolling_ids, n_cases=150, outputs=("ids",),
        fallback="the n-gram ending at byte t, with PAD (258) before the start, c = x + 1, hashed as "
                 "(sum_i c_i B^(n-i)) mod p mod M, equation (12.9); compare with hash_ngram_ids",
        shape_hint="return one id per byte of data, the n-gram ending there (padding included at the start)",
        rtol=0.0, atol=0.0,
        mistakes=(
            Mistake(_rolling_with(lambda x: x, PAD, HASH_PRIME),
                    "use c = x + 1 for every value, the padding included, so that a zero byte still counts, "
                    "section 12.5"),
            Mistake(_rolling_with(lambda x: x + 1, 0, HASH_PRIME),
                    "the first n - 1 n-grams reach into the padding: the missing bytes are PAD (258), hashed "
                    "as c = 259; padding with 0 (or hashing a shorter n-gram, the same thing) gives other ids, "
                    "section 12.5"),
            Mistake(_rolling_with(lambda x: x + 1, PAD + 1, None),
                    "reduce mod p = 2^31 - 1 before mod M, equation (12.9): without it the ids differ whenever "
                    "the sum exceeds p"),
        )),
)
