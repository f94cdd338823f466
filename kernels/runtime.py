"""How the book loads Triton: compiled on CUDA, interpreted on CPU, or not at all.

Hand-written infrastructure (not exported from a chapter).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so this module sets it
before any kernel module of ``kernels`` is imported: ``kernels/__init__.py`` imports
this module first. The rule is

* ``TRITON_INTERPRET`` already set by the reader: respected as it is;
* the book's device (``lrn_lib.config.DEVICE``) is CUDA: kernels are compiled;
* anything else: Triton's interpreter runs the same kernels on the CPU with NumPy.

Where triton cannot be installed (macOS, Windows), ``triton`` and ``tl`` below are
small stand-ins so that kernel modules still import; launchers check ``MODE`` and the
dispatching functions of ``lrn_lib`` use their PyTorch references, saying so once.
"""
from __future__ import annotations

import os
import types
import warnings

from lrn_lib import config

MISSING_MESSAGE = (
    "Triton is not installed (it has wheels for Linux x86_64/aarch64 only): "
    "the book uses the PyTorch reference implementations instead of the Triton kernels."
)


def _stand_in() -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    """Objects with the names kernel modules use at import time, for machines without triton."""

    def mark(fn):
        fn.triton_stand_in = True        # a kernel that cannot run here (tests skip it as a public name)
        return fn

    def decorator(fn=None, **_options):
        return mark(fn) if fn is not None else mark

    def factory(*_args, **_kwargs):
        return decorator

    language = types.SimpleNamespace(constexpr=type("constexpr", (), {}))
    return types.SimpleNamespace(jit=decorator, autotune=factory, heuristics=factory,
                                 Config=lambda *a, **k: None, language=language), language


if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if config.DEVICE.type == "cuda" else "1"
try:
    import triton
    import triton.language as tl

    MODE = "interpreted" if os.environ["TRITON_INTERPRET"] == "1" else "compiled"
except ImportError:
    MODE = "unavailable"
    triton, tl = _stand_in()

_noted: set[str] = set()


def note_fallback(reason: str = MISSING_MESSAGE) -> None:
    """Say once per process and reason that a PyTorch reference replaces the Triton kernels."""
    if reason not in _noted:
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        _noted.add(reason)


def check_launchable(name: str, x) -> None:
    """Raise a clear error if the kernels cannot run on tensor ``x`` (argument ``name``) here."""
    if MODE == "unavailable":
        raise RuntimeError(MISSING_MESSAGE)
    if MODE == "compiled" and x.device.type != "cuda":
        raise ValueError(
            f"{name} is on {x.device}, but Triton kernels here are compiled for CUDA: "
            "move it to the GPU, or set TRITON_INTERPRET=1 before importing kernels to interpret them"
        )
    if MODE == "interpreted" and x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}; Triton's interpreter runs on CPU tensors")
