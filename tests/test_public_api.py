"""The public API: what the package root exports, and that it is documented."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tasksession
from tasksession import _errors

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
ERRORS_PAGE = API_PAGE.parent / "errors.md"


def test_all_lists_exactly_the_public_names_of_the_package() -> None:
    public = {
        name
        for name, value in vars(tasksession).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(public) == sorted(tasksession.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(tasksession.__all__)) == len(tasksession.__all__)


def test_all_is_sorted() -> None:
    assert sorted(tasksession.__all__) == tasksession.__all__


def test_every_error_class_is_exported_from_the_package_root() -> None:
    classes = [name for name in _errors.__all__ if isinstance(getattr(_errors, name), type)]
    assert {name: getattr(_errors, name) for name in classes} == {
        name: getattr(tasksession, name, None) for name in classes
    }
    assert set(classes) <= set(tasksession.__all__)


def errors_in_the_hierarchy_on_the_errors_page() -> list[str]:
    """The class names in the hierarchy diagram of docs/errors.md, dotted where they say so."""
    block = ERRORS_PAGE.read_text().split("```text\n", 1)[1].split("```", 1)[0]
    return re.findall(r"[└├]── ([\w.]+)", block)


def test_every_error_on_the_errors_page_can_be_imported_where_it_says() -> None:
    names = errors_in_the_hierarchy_on_the_errors_page()
    found = {}
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        module = importlib.import_module(module_name or "tasksession")
        found[name] = isinstance(getattr(module, attribute, None), type)
    assert "StreamClosedError" in names
    assert dict.fromkeys(names, True) == found


_DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:class|exception|function|data|decorator)|currentmodule)::\s+([\w.]+)\s*$"
)


def documented_names() -> set[str]:
    """Dotted names the API page documents with autodoc, resolved like Sphinx does."""
    names, module = set(), ""
    for line in API_PAGE.read_text().splitlines():
        match = _DIRECTIVE.match(line.strip())
        if match is None:
            continue
        if line.strip().startswith(".. currentmodule::"):
            module = match[1]
        elif match[1].startswith("tasksession.") or not module:
            names.add(match[1])
        else:
            names.add(f"{module}.{match[1]}")
    return names


def public_names() -> list[str]:
    """Every public name: the package root's and the integration modules'."""
    import tasksession.tornado
    import tasksession.workers

    return [
        f"{module.__name__}.{name}"
        for module in (tasksession, tasksession.tornado, tasksession.workers)
        for name in module.__all__
    ]


@pytest.mark.parametrize("name", public_names())
def test_public_name_is_documented_on_the_api_page(name: str) -> None:
    assert name in documented_names(), f"docs/api.md has no autodoc directive for {name}"


def test_importing_tasksession_does_not_import_tornado() -> None:
    code = (
        "import sys, tasksession\n"
        "loaded = sorted(m for m in sys.modules if m == 'tornado' or m.startswith('tornado.'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (0, "[]") == (result.returncode, result.stdout.strip()), result.stderr
