"""book.toml is the single chapter list: the files, the README, the packaging and the
import order of the library must all agree with it."""
import importlib.metadata
import re
from pathlib import Path

import pytest

from lrn_lib.book import load_book, module_chapters, module_imports

BOOK = load_book(Path(__file__).resolve().parent.parent)
ROOT = BOOK.root


def test_book_has_a_start_page_and_chapters_numbered_in_order():
    assert [c.id for c in BOOK.chapters] == [f"{n:02d}" for n in range(len(BOOK.chapters))]
    assert BOOK.chapters[0].title == "Start here"
    assert all(c.status in ("written", "planned") for c in BOOK.chapters)
    assert all(c.notebook.name.startswith(c.id + "_") for c in BOOK.chapters)


def test_every_written_chapter_has_its_pair():
    for chapter in BOOK.chapters:
        if chapter.written:
            assert chapter.source.is_file(), chapter.source
            assert chapter.notebook.is_file(), chapter.notebook


def test_every_notebook_in_chapters_is_listed():
    listed = {c.notebook for c in BOOK.chapters if c.written} | {c.source for c in BOOK.chapters if c.written}
    on_disk = set((ROOT / "chapters").glob("*.ipynb")) | set((ROOT / "chapters").glob("[0-9][0-9]_*.py"))
    assert on_disk <= listed, f"not in book.toml as written chapters: {sorted(on_disk - listed)}"


def test_each_module_belongs_to_one_chapter_and_exists_once_written():
    owners = [m for c in BOOK.chapters for m in c.modules] + list(BOOK.infrastructure) + list(BOOK.tools)
    assert len(owners) == len(set(owners)), "a module is listed twice in book.toml"
    for chapter in BOOK.chapters:
        for module in chapter.modules if chapter.written else ():
            assert BOOK.module_path(module).is_file(), f"{module} of chapter {chapter.id} is missing"


def test_chapter_modules_import_only_earlier_or_same_chapters():
    """Positions in book.toml's chapter list order the layers (infrastructure first), not chapter ids."""
    order = module_chapters(BOOK)
    for module, chapter in order.items():
        if not BOOK.module_path(module).is_file():
            continue
        for target in module_imports(BOOK, module):
            assert order[target] <= chapter, (f"{module} ({BOOK.chapters[chapter].id}) imports {target}, "
                                              "of a later chapter in book.toml")


def test_every_library_file_is_in_the_manifest():
    known = set(module_chapters(BOOK)) | set(BOOK.tools)
    for folder in ("lrn_lib", "kernels"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name != "__init__.py":
                assert f"{folder}.{path.stem}" in known, f"{path} is not listed in book.toml"


def test_readme_chapter_table_matches_book_toml():
    section = (ROOT / "README.md").read_text().split("## Chapters", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d\d) \| (.+?) \| (.+?) \|", section, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [(c.id, c.title) for c in BOOK.chapters]
    for (_, _, status_cell), chapter in zip(rows, BOOK.chapters):
        assert chapter.status in status_cell


def requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        name = re.split(r"[<>=;\s\[]", line.strip(), maxsplit=1)[0].lower()
        names.add({"pytorch": "torch"}.get(name, name))
    return names


def test_environment_yml_lists_the_same_packages_as_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    wanted.discard("tomli")  # a back-port for Python 3.10 only; conda installs a newer Python
    text = (ROOT / "environment.yml").read_text().split("dependencies:", 1)[1]
    conda = [line.strip()[2:] for line in text.splitlines()
             if line.startswith("  - ") and not line.strip().endswith(":")]
    have = requirement_names(conda) - {"python", "pip"}
    assert have == wanted


def test_no_other_installed_distribution_claims_the_kernels_import_name():
    """The book's kernels/ package shadows any other `kernels`, such as Hugging Face's, which
    transformers 5.25 requires and then fails to import (pyproject.toml pins transformers below it)."""
    others = sorted(set(importlib.metadata.packages_distributions().get("kernels", [])) - {"lrn-book"})
    assert not others, f"{others} also install `import kernels`, which the book's kernels/ shadows: " \
                       f"pip uninstall {' '.join(others)}"


def test_each_chapters_exercises_import_only_modules_of_that_chapter_or_earlier():
    """lrn_lib/exercises/chNN.py holds chapter NN's exercises and may import only library modules of
    chapters at or before NN in book.toml's order, plus infrastructure."""
    position = {c.id: k for k, c in enumerate(BOOK.chapters)}
    chapter_position = module_chapters(BOOK)
    files = sorted((ROOT / "lrn_lib" / "exercises").glob("*.py"))
    assert {p.stem for p in files} - {"__init__", "machinery"} <= {f"ch{i}" for i in position}
    for path in files:
        if not path.stem.startswith("ch"):
            continue
        module, own = f"lrn_lib.exercises.{path.stem}", position[path.stem[2:]]
        for target in module_imports(BOOK, module):
            assert chapter_position[target] <= own, f"{module} imports {target}, of a later chapter"
