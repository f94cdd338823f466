"""The book's text corpus: the same bytes on every Python, nothing downloaded.

Hand-written infrastructure (not exported from a chapter). Chapters that train a language
model read English prose and Python code. Both once came from the running interpreter's own
standard library (pydoc's help topics and module sources), but those differ between Python
versions (3.12's help topics are ~6% longer than 3.11's), so a notebook's outputs depended on
the interpreter. The corpus is now a snapshot taken once, from CPython 3.11.7, and committed
as ``lrn_lib/data/corpus.zip``:

- ``english.txt``: pydoc's topic pages (``pydoc_data.topics``), sorted by topic, joined by
  newlines, UTF-8;
- ``python/<module>.py``: one member per standard-library module in PYTHON_MODULES, the module's
  source file, or for a package all its ``.py`` files in sorted path order, concatenated.

Python's documentation and sources are under the PSF License, which allows redistribution.
This module uses only the standard library, so any interpreter can check the corpus:
``python -m lrn_lib.corpus`` prints each part's size and SHA-256; ``python -m lrn_lib.corpus
--write`` rebuilds the archive from the running interpreter (only to move to a new snapshot).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import sys
import zipfile
from pathlib import Path

ARCHIVE = Path(__file__).parent / "data" / "corpus.zip"
SOURCE_PYTHON = "3.11.7"    # the interpreter the snapshot was taken from
PYTHON_MODULES = (
    # chapter 12's CPU profile, in this order
    "textwrap", "string", "heapq", "bisect", "shlex", "difflib", "calendar", "json",
    # chapter 6's training command, and more code for the GPU profiles
    "email", "asyncio", "logging", "argparse", "typing", "dataclasses", "inspect", "collections",
    "enum", "functools", "ast", "statistics", "fractions", "_pydecimal", "pickle", "tomllib",
    "http", "concurrent",
)


@functools.cache
def _members() -> dict[str, bytes]:
    """Every member of the archive, name -> bytes (read once per process)."""
    with zipfile.ZipFile(ARCHIVE) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def english() -> bytes:
    """pydoc's help topics (Python 3.11.7), sorted by topic and joined by newlines, as UTF-8 bytes."""
    return _members()["english.txt"]


def python_source(modules: tuple[str, ...] = PYTHON_MODULES) -> bytes:
    """The concatenated standard-library sources (Python 3.11.7) of modules, in the order given."""
    if isinstance(modules, str) or not modules:
        raise ValueError(f"modules must be a non-empty tuple of module names, got {modules!r}")
    unknown = [name for name in modules if name not in PYTHON_MODULES]
    if unknown:
        raise ValueError(f"modules {unknown} are not in the corpus; it holds {', '.join(PYTHON_MODULES)}")
    members = _members()
    return b"".join(members[f"python/{name}.py"] for name in modules)


def sha256(data: bytes) -> str:
    """The hex SHA-256 digest of data."""
    return hashlib.sha256(data).hexdigest()


def _source_from_interpreter(name: str) -> bytes:
    """The running interpreter's source of module name: its file, or a package's .py files sorted."""
    path = Path(importlib.import_module(name).__file__)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    return b"".join(f.read_bytes() for f in files)


def write_archive(path: Path = ARCHIVE) -> None:
    """Rebuild the archive at path from the running interpreter's standard library."""
    from pydoc_data import topics

    text = "\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in [("english.txt", text)] + [(f"python/{m}.py", _source_from_interpreter(m))
                                                      for m in PYTHON_MODULES]:
            info = zipfile.ZipInfo(name, date_time=(2026, 12, 2, 0, 0, 0))   # fixed stamp: same archive bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)


def main(argv: list[str] | None = None) -> None:
    """Print each part's size and SHA-256, or rebuild the archive with --write."""
    parser = argparse.ArgumentParser(prog="python -m lrn_lib.corpus", description=main.__doc__)
    parser.add_argument("--write", action="store_true", help="rebuild the archive from this interpreter")
    args = parser.parse_args(argv)
    if args.write:
        write_archive()
        _members.cache_clear()
    print(f"Python {sys.version.split()[0]}, snapshot of Python {SOURCE_PYTHON}")
    for part, data in (("english", english()), ("python", python_source())):
        print(f"{part:8s} {len(data):>9,d} bytes  sha256 {sha256(data)}")


if __name__ == "__main__":
    main()
