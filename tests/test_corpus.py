"""The book's corpus is the same bytes on every supported Python, and every chapter reads it."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrn_lib import corpus

ROOT = Path(__file__).resolve().parents[1]
# Pinned by hand: a change to the snapshot changes every chapter that trains on it.
ENGLISH = (466_195, "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4")
PYTHON = (2_585_419, "ce58e34f18482f5e4dd03009b24c3f95c95e4a89c1eda5b381631d35af331cb5")
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")


def _interpreters() -> dict[str, Path]:
    """Supported CPython versions installed on this machine (pyenv or PATH), version -> executable."""
    found = {}
    pyenv = Path.home() / ".pyenv" / "versions"
    for version in SUPPORTED:
        candidates = sorted(pyenv.glob(f"{version}.*/bin/python")) if pyenv.is_dir() else []
        on_path = shutil.which(f"python{version}")
        candidates += [Path(on_path)] if on_path else []
        for candidate in candidates:
            if subprocess.run([str(candidate), "-c", "pass"], capture_output=True).returncode == 0:
                found[version] = candidate
                break
    return found


def test_corpus_parts_have_pinned_length_and_hash():
    english, python = corpus.english(), corpus.python_source()
    assert (len(english), corpus.sha256(english)) == ENGLISH
    assert (len(python), corpus.sha256(python)) == PYTHON


def test_python_source_concatenates_modules_in_the_order_given():
    a, b = corpus.python_source(("json",)), corpus.python_source(("heapq",))
    assert corpus.python_source(("json", "heapq")) == a + b
    assert len(a) > 0 and len(b) > 0


@pytest.mark.parametrize("modules", [(), "json", ("json", "no_such_module")])
def test_python_source_rejects_bad_module_lists(modules):
    with pytest.raises(ValueError, match="modules"):
        corpus.python_source(modules)


def test_chapter_loaders_read_the_snapshot():
    import torch

    from lrn_lib.llama import pydoc_bytes
    from lrn_lib.patching import book_corpus
    from lrn_lib.train import stdlib_corpus

    assert bytes(pydoc_bytes().to(torch.uint8).tolist()) == corpus.english()
    assert book_corpus(("json",)) == {"english": corpus.english(), "python": corpus.python_source(("json",))}
    expected = corpus.python_source(("json", "email")) + corpus.english()
    assert bytes(stdlib_corpus().to(torch.uint8).tolist()) == expected


def test_no_chapter_reads_the_interpreters_own_text():
    """pydoc_data and stdlib source files differ between Python versions: only lrn_lib.corpus may read them."""
    pattern = re.compile(r"pydoc_data|os\.__file__|\.__file__\)\.parent\.rglob|getsourcefile")
    allowed = {ROOT / "lrn_lib" / "corpus.py"}
    offenders = [str(path.relative_to(ROOT)) for folder in ("chapters", "lrn_lib", "kernels")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if path not in allowed and pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_every_installed_supported_python_reads_the_same_bytes():
    """Each other supported CPython on this machine runs the corpus check with the standard library only."""
    others = {v: exe for v, exe in _interpreters().items() if v != f"{sys.version_info[0]}.{sys.version_info[1]}"}
    if not others:
        pytest.skip("no other supported CPython is installed on this machine")
    here = subprocess.run([sys.executable, "-m", "lrn_lib.corpus"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()[1:]
    for version, exe in others.items():
        out = subprocess.run([str(exe), "-I", "-c", "import sys; sys.path.insert(0, '.'); "
                              "from lrn_lib.corpus import main; main([])"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert out.splitlines()[1:] == here, version
