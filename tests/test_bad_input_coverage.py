"""Every public function and class of every chapter module has bad-input calls in a
tests/test_bad_input_*.py table, or a stated reason it takes no argument a caller could get wrong."""
import importlib
import inspect
from pathlib import Path

from lrn_lib.book import load_book

TABLES = sorted(p.stem for p in Path(__file__).parent.glob("test_bad_input_ch*.py"))


def public_names() -> set[str]:
    """"module.name" for each function or class a chapter module defines without a leading underscore."""
    names = set()
    for chapter in load_book().chapters:
        for module_name in chapter.modules:
            module = importlib.import_module(module_name)
            names |= {f"{module_name}.{name}" for name, obj in vars(module).items()
                      if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                      and obj.__module__ == module_name and not getattr(obj, "triton_stand_in", False)}
    return names


def test_every_public_name_has_bad_input_calls_or_a_reason():
    listed: dict[str, str] = {}
    for table in TABLES:
        module = importlib.import_module(table)
        for name in list(module.BAD_CALLS) + list(module.NO_BAD_INPUT):
            assert name not in listed, f"{name} is listed in {table} and in {listed[name]}"
            listed[name] = table
        assert all(module.BAD_CALLS.values()), f"{table} lists a name with no bad call"
        assert all(reason.strip() for reason in module.NO_BAD_INPUT.values())
    missing = sorted(public_names() - set(listed))
    stale = sorted(set(listed) - public_names())
    assert missing == [] and stale == []
