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

Launch plans: ``relauncher`` and ``launch_and_keep`` turn a first launch through Triton's JIT
into a function that launches the compiled binary again without the JIT's per-call work, and
``LaunchPlans`` holds such plans by key (chapter 3, section 3.7, measures what that saves).
"""
from __future__ import annotations

import os
import types
import warnings

import torch

from lrn_lib import config, validate

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


_MULTIPROCESSORS: dict[int, int] = {}   # by CUDA device index: asked once, not at every launch


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (read once per device); 4 off CUDA, for the interpreter
    (few programs, quick tests). Launchers size their grids from it."""
    validate.instance(device, "device", torch.device)
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _MULTIPROCESSORS[index]


def launch_device() -> int | None:
    """The CUDA device index Triton launches on now (the current device) when compiled, else None.

    A launch plan that keeps a compiled binary belongs to this device: it goes into the plan's key.
    """
    return torch.cuda.current_device() if MODE == "compiled" else None


def layout_key(*tensors: torch.Tensor) -> tuple:
    """What a launch plan for these tensors depends on: each one's shape, strides, 16-byte alignment, dtype and
    device, and the CUDA device Triton launches on now (see launch_device)."""
    return tuple((t.shape, t.stride(), t.data_ptr() % 16 == 0, t.dtype, t.device) for t in tensors) + (launch_device(),)


def relauncher(kernel, grid: tuple[int, ...], compiled, constexprs: dict, options: dict):
    """A function of ``kernel``'s run-time arguments that launches it again on ``grid``.

    ``compiled`` is what a first launch ``kernel[grid](*args, **constexprs, **options)`` returned
    (or the autotuner's launch with the configuration it chose); ``constexprs`` holds the values
    of every compile-time parameter, heuristics' too, which must be the kernel's last parameters,
    in the order of its signature. Compiled, the function hands the arguments to Triton's
    launcher for that binary directly, skipping the JIT's argument binding, specialization and
    cache lookup. It is valid only for arguments Triton would specialize the same way: the
    same dtypes, integers equal (or alike in being 1 or a multiple of 16), pointers alike in
    16-byte alignment, on the same current device; the caller's cache key must guarantee that.
    Interpreted, or where the compiled kernel lacks the handles, it launches through the JIT.
    """
    validate.instance(constexprs, "constexprs", dict)
    validate.instance(options, "options", dict)
    validate.nonempty(grid, "grid")
    names = list(getattr(kernel, "arg_names", ()))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    direct = (MODE == "compiled" and callable(getattr(compiled, "__getitem__", None))
              and len(names) >= len(constexprs) and names[len(names) - len(constexprs):] == list(constexprs))
    if not direct:
        return lambda *args: kernel[grid](*args, **constexprs, **options)
    runner, tail = compiled[grid], tuple(constexprs.values())
    return lambda *args: runner(*args, *tail)


def launch_and_keep(kernel, grid: tuple[int, ...], args: tuple, constexprs: dict, options: dict | None = None):
    """Launch ``kernel[grid](*args, **constexprs, **options)`` through Triton's JIT; return its relauncher.

    The returned function takes new run-time arguments like ``args`` (see :func:`relauncher`).
    """
    options = options or {}
    return relauncher(kernel, grid, kernel[grid](*args, **constexprs, **options), constexprs, options)


class LaunchPlans(dict):
    """Launch plans by key, at most ``size`` of them: keeping one more drops the oldest."""

    def __init__(self, size: int):
        super().__init__()
        self.size = validate.integer(size, "size", low=1)

    def keep(self, key, plan):
        """Store plan under key (dropping the oldest plan when full) and return it."""
        if len(self) >= self.size:
            del self[next(iter(self))]
        self[key] = plan
        return plan
