"""Check a reader's set-up: one OK/FAIL line per requirement, for bug reports.

Hand-written tool (not exported from a chapter).

    python -m lrn_lib.doctor

Prints the Python and package versions, the device the book will use, and whether the
Triton kernels will run compiled, interpreted or not at all. Exits 1 if a requirement
fails. A missing triton is not a failure on macOS or Windows, where it has no wheels.
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys

REQUIRED = ["torch", "numpy", "matplotlib", "tqdm", "jupytext", "nbclient", "ipykernel", "nbconvert"]
FOR_TESTS = ["pytest", "nbval", "selenium"]


def version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_error(module: str) -> str:
    """Why ``import module`` fails, as "ErrorType: message" (or "imports" if it does not fail)."""
    try:
        importlib.import_module(module)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "imports"


def triton_expected() -> bool:
    """Whether triton publishes wheels for this platform (Linux x86_64/aarch64)."""
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")


def checks() -> list[tuple[bool, str]]:
    """(passed, line) for each requirement, in the order they are printed."""
    lines = [(sys.version_info >= (3, 10), f"Python {platform.python_version()} (3.10 or newer needed)")]
    for package in REQUIRED + FOR_TESTS:
        found = version(package)
        note = " (tests only)" if package in FOR_TESTS else ""
        lines.append((found is not None, f"{package} {found or 'not installed'}{note}"))
    if version("torch") is None:
        return lines
    from lrn_lib import config

    lines.append((True, config.describe()))
    triton_version = version("triton")
    if triton_version is None:
        where = "expected on this platform: pip install triton" if triton_expected() else \
            "no wheels for this platform: chapters use the PyTorch references"
        lines.append((not triton_expected(), f"triton not installed ({where})"))
        return lines
    try:
        from kernels import runtime
    except Exception as err:  # a triton that imports but then fails inside kernels
        lines.append((False, f"triton {triton_version}: kernels failed to import: {type(err).__name__}: {err}"))
        return lines
    if runtime.MODE == "unavailable":  # installed, but `import triton` fails: report why
        lines.append((not triton_expected(), f"triton {triton_version} is installed but does not import "
                      f"({import_error('triton')}): chapters use the PyTorch references"))
        return lines
    how = {"compiled": "compiled for the GPU", "interpreted": "in Triton's interpreter on the CPU (slow, exact)"}
    lines.append((True, f"triton {triton_version}: kernels run {how[runtime.MODE]}"))
    try:
        import torch

        from kernels.softmax import softmax_triton

        x = torch.randn(3, 37, device="cuda" if runtime.MODE == "compiled" else "cpu")
        ok = torch.allclose(softmax_triton(x), torch.softmax(x, -1), atol=1e-5)
        lines.append((ok, "softmax kernel runs and matches torch.softmax" if ok else "softmax kernel gives wrong results"))
    except Exception as err:  # a doctor reports every failure instead of stopping at the first
        lines.append((False, f"softmax kernel failed to run: {type(err).__name__}: {err}"))
    return lines


def main() -> int:
    results = checks()
    for passed, line in results:
        print(f"{'OK  ' if passed else 'FAIL'} {line}")
    return 0 if all(passed for passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
