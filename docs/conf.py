"""Sphinx configuration for the tasksession documentation (MyST Markdown).

Build (as ``.ci/run`` does; warnings are errors, references are checked)::

    .venv/bin/sphinx-build -n -W --keep-going -b html docs docs/_build/html

Cross-references to Python, SQLAlchemy, Tornado and anyio work **offline**:
the build must not depend on hosts other than package registries.

* Python, SQLAlchemy and Tornado: the inventories shipped by Debian's
  ``python3-doc`` (Python 3.11), ``python-sqlalchemy-doc`` (1.4; the pages and
  anchors of the classes we link, such as ``AsyncSession``, are the same in 2.x)
  and ``python-tornado-doc`` (6.2). ``.ci/run`` installs them when missing.
  Links still point to the current online documentation.
* anyio: no package ships its docs, so ``_tools/anyio_inventory.py`` writes an
  inventory of anyio's API page from the installed anyio, before each build.

Where a local inventory is missing (another OS), intersphinx downloads it
from the documentation site instead.

The public packages give every exported name its public ``__module__``
(``tasksession``, ``tasksession.tornado``); for the build only, each class is
pointed back at the private module that defines it, where autodoc reads its
source (see ``_document_from_defining_modules``).
"""

from __future__ import annotations

import importlib
import pkgutil
import pyclbr
import sys
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_tools"))

from anyio_inventory import write_inventory  # noqa: E402

import tasksession  # noqa: E402

project = "tasksession"
author = "tasksession developers"
copyright = "tasksession developers"
release = _version("tasksession")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_tools", "README.md"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "tasksession"

# -- autodoc -------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"
autodoc_default_options = {"exclude-members": "__init__, __new__"}


def _document_from_defining_modules() -> None:
    """Set each exported class's ``__module__`` back to the module that defines it.

    autodoc reads a class's source (the order of ``autodoc_member_order =
    "bysource"``, the ``#:`` comments documenting attributes) in the module its
    ``__module__`` names; a public package's ``__init__.py`` (``tasksession``,
    ``tasksession.tornado``) holds only the re-exports, so the members would come out
    in alphabetical order and the attributes undocumented. For every private module
    (``tasksession._errors``, ``tasksession.tornado._handler``), ``pyclbr`` finds the
    classes it defines from the source, without trusting ``__module__``; each one the
    enclosing public package exports is pointed back at it. The pages still name each
    class by its public path (``.. currentmodule:: tasksession``, or the full name).
    """
    for info in pkgutil.walk_packages(tasksession.__path__, "tasksession."):
        public_name, _, leaf = info.name.rpartition(".")
        if not leaf.startswith("_"):
            continue  # a public module: its classes are documented where they are defined
        public, module = importlib.import_module(public_name), importlib.import_module(info.name)
        for name in pyclbr.readmodule(info.name):
            cls = getattr(module, name, None)
            if cls is not None and getattr(public, name, None) is cls:
                cls.__module__ = info.name


_document_from_defining_modules()

# -- cross-references ----------------------------------------------------------------

nitpicky = True
nitpick_ignore = [
    # Names private to tasksession that appear in public signatures.
    ("py:class", "tasksession._config.ManagerOptions"),
    ("py:class", "ManagerOptions"),
    # Scope.outcome's type: Literal["committed", "rolled back", "unknown"], documented there.
    ("py:class", "Outcome"),
    ("py:class", "tasksession._outcome.Outcome"),
]
# Type variables in signatures (``Callable[P, Awaitable[R]]``) have no page to link to.
nitpick_ignore_regex = [("py:class", r"~?([\w.]+\.)?[A-Z]")]


def _local(path: str) -> str | None:
    """A local inventory file, or ``None`` (download from the site) when it is missing."""
    return path if Path(path).exists() else None


_anyio_inventory = write_inventory(HERE / "_build" / "inventories" / "anyio.inv")

intersphinx_mapping = {
    "python": (
        "https://docs.python.org/3",
        _local("/usr/share/doc/python3.11/html/objects.inv")
        or _local("/usr/share/doc/python3-doc/html/objects.inv"),
    ),
    "sqlalchemy": (
        "https://docs.sqlalchemy.org/en/21",
        _local("/usr/share/doc/python-sqlalchemy-doc/html/objects.inv"),
    ),
    "tornado": (
        "https://www.tornadoweb.org/en/stable",
        _local("/usr/share/doc/python-tornado-doc/html/objects.inv"),
    ),
    "anyio": ("https://anyio.readthedocs.io/en/stable", str(_anyio_inventory)),
}
intersphinx_timeout = 10

# -- resolving short names ---------------------------------------------------------

#: Private names some objects report, and the public names they are documented under.
_ALIASES = {"_asyncio.Future": "asyncio.Future", "_asyncio.Task": "asyncio.Task"}


def _resolve_short_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve ``SessionManager`` as ``tasksession.SessionManager`` anywhere, and aliases.

    Docstrings of the leaf modules (``tasksession.tornado``...) name core classes
    by their short name, as users import them from the package root.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    candidates = [_ALIASES[target]] if target in _ALIASES else []
    if not target.startswith("tasksession."):
        candidates.append(f"tasksession.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        resolved = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
        )
        if resolved is None and candidate in _ALIASES.values():
            # Not ours: let intersphinx look the public name up.
            new_node = node.deepcopy()
            new_node["reftarget"] = candidate
            resolved = app.emit_firstresult(
                "missing-reference", env, new_node, contnode, allowed_exceptions=()
            )
        if resolved is not None:
            return resolved
    return None


def setup(app: Any) -> None:
    app.connect("missing-reference", _resolve_short_names, priority=400)
