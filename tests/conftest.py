"""Helpers shared by the kernel tests: whether triton can run here, and where its kernels run."""
from __future__ import annotations

import pytest

from kernels import runtime

needs_triton = pytest.mark.skipif(runtime.MODE == "unavailable", reason="triton is not installed")


def kernel_device() -> str:
    """The device the Triton kernels run on here: "cuda" when compiled, else "cpu" (the interpreter)."""
    return "cuda" if runtime.MODE == "compiled" else "cpu"
