"""Without triton (macOS, Windows, or an install that does not import), the chapters run to
the end on the PyTorch references and say so once, and the doctor reports it without a
traceback. Each run is a fresh process in which ``import triton`` fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("0[1-5]_*.py"))
MISSING = "Triton is not installed"  # the start of kernels.runtime.MISSING_MESSAGE

# Run a script (``script PATH``) or a module (``module NAME``) with ``import triton`` failing
# as it does where triton has no wheels; the installed triton stays on disk, untouched.
BLOCK_TRITON = """
import importlib.abc, runpy, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
kind, target = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
if kind == "script":
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def run_without_triton(kind: str, target: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LRN_DEVICE": "cpu", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON, kind, target], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_chapters_are_found():
    assert [name[:2] for name in CHAPTERS] == ["01", "02", "03", "04", "05"], CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_to_the_end_without_triton(chapter):
    result = run_without_triton("script", chapter, ROOT / "chapters")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert result.stdout.count("Triton kernels run: unavailable") == 1, result.stdout[:2000]
    assert output.count(MISSING) <= 1, output            # the reason is given once, not per cell
    if "(skipped: needs Triton)" in result.stdout:        # a chapter that skips cells says why
        assert output.count(MISSING) == 1, output


def test_doctor_reports_a_triton_that_does_not_import():
    result = run_without_triton("module", "lrn_lib.doctor", ROOT)
    lines = result.stdout.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and all(line.startswith(("OK   ", "FAIL ")) for line in lines), result.stdout
    from lrn_lib.doctor import triton_expected, version

    triton_line = next(line for line in lines if line[5:].startswith("triton "))
    if version("triton"):                                  # installed here, but blocked
        assert "is installed but does not import" in triton_line, triton_line
        assert "chapters use the PyTorch references" in triton_line, triton_line
    else:
        assert "triton not installed" in triton_line, triton_line
    assert triton_line.startswith("FAIL" if triton_expected() else "OK"), triton_line
    assert result.returncode == (1 if any(line.startswith("FAIL") for line in lines) else 0)
