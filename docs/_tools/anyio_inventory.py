"""Write an intersphinx inventory for anyio's API reference, from the installed anyio.

Why: the docs are built with warnings as errors on machines that reach only
package registries, so intersphinx cannot download
https://anyio.readthedocs.io/en/stable/objects.inv, and no Debian package ships
anyio's documentation. anyio documents its whole public API on one page,
``api.html``, with autodoc (``members: True``): every public object of
``anyio``, ``anyio.abc``, ``anyio.lowlevel``, ``anyio.to_thread`` and
``anyio.from_thread`` has the anchor ``api.html#<dotted name>``. This script
lists exactly those objects (the names each module presents as its own, i.e.
whose ``__module__`` is the module, and their public members) and writes them
in Sphinx's inventory format (version 2). Nothing is invented: an object that
is not in the installed anyio is not in the inventory.

``docs/conf.py`` runs it before every build; by hand::

    python docs/_tools/anyio_inventory.py docs/_build/inventories/anyio.inv
"""

from __future__ import annotations

import importlib
import inspect
import sys
import zlib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

MODULES = ("anyio", "anyio.abc", "anyio.lowlevel", "anyio.to_thread", "anyio.from_thread")
PAGE = "api.html"

#: Public in the installed anyio but not on its API page (compared with anyio's
#: ``docs/api.rst``): linking them would produce dead anchors, so they are left out.
NOT_ON_THE_API_PAGE = frozenset(
    {
        "anyio.FutureAlreadyFinished",
        "anyio.FutureCancelled",
        "anyio.FutureFailed",
        "anyio.FutureNotFinished",
        "anyio.abc.AsyncBackend",
        "anyio.abc.TestRunner",
        "anyio.create_connected_unix_datagram_socket",
        "anyio.create_unix_datagram_socket",
        "anyio.lowlevel.RunvarToken",
        "anyio.notify_closing",
    }
)


def _own_public_names(module: object) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in dir(module) if not name.startswith("_")]
    return sorted(names)


def _members(cls: type) -> Iterator[tuple[str, str]]:
    """Public members defined on ``cls`` itself, with their Sphinx role."""
    for name, value in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            yield name, "py:property"
        elif isinstance(value, classmethod):
            yield name, "py:classmethod"
        elif isinstance(value, staticmethod):
            yield name, "py:staticmethod"
        elif inspect.isfunction(value):
            yield name, "py:method"


def entries() -> Iterator[tuple[str, str]]:
    """``(dotted name, role)`` for every documented anyio object."""
    seen: set[str] = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in _own_public_names(module):
            value = getattr(module, name)
            if getattr(value, "__module__", None) != module_name:
                continue  # imported from elsewhere, documented there (if at all)
            full = f"{module_name}.{name}"
            if full in seen or full in NOT_ON_THE_API_PAGE:
                continue
            seen.add(full)
            if inspect.isclass(value):
                role = "py:exception" if issubclass(value, BaseException) else "py:class"
                yield full, role
                for member, member_role in _members(value):
                    yield f"{full}.{member}", member_role
            elif inspect.isfunction(value) or inspect.isbuiltin(value):
                yield full, "py:function"


def render(version: str) -> bytes:
    """The inventory file's bytes (Sphinx inventory format version 2)."""
    header = (
        "# Sphinx inventory version 2\n"
        "# Project: AnyIO\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    lines = "".join(
        # name, role, priority (1: default), URI ('$' = the name), display name ('-' = name)
        f"{name} {role} 1 {PAGE}#$ -\n"
        for name, role in sorted(set(entries()))
    )
    return header + zlib.compress(lines.encode())


def write_inventory(path: Path) -> Path:
    """Write the inventory to ``path`` (only if its content changed) and return it."""
    content = render(version("anyio"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != content:
        path.write_bytes(content)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/inventories/anyio.inv")
    print(write_inventory(target))
