"""The package's shape: imports run one way down the module map, and privates stay home.

Reads every module of ``src/tasksession`` with :mod:`ast` (``TYPE_CHECKING`` blocks and
imports inside functions included; nothing is imported or run) and fails, naming
``file:line``, on

(a) an import that goes up or sideways in :data:`LEVELS` (a leaf may import only the
    ``tasksession`` root and the modules of its own leaf package), or of a module the map
    does not know;
(b) ``from ._x import _name``: another module's private name;
(c) ``module._name`` on an imported tasksession module;
(d) ``obj._name`` where ``_name`` is a private attribute or method that only *other*
    tasksession modules define, and ``obj._name = ...`` where another module owns it (see
    :func:`_definitions`);
(e) a module over :data:`MAX_MODULE_LINES` physical lines;
(f) a core (everything but the leaves) of :data:`CORE_CODE_LINES_BEFORE` code lines or more
    (a ceiling that stops growth, not the issue's target: see its comment).

A private name listed in :data:`SEAMS` may cross modules: each entry says why, and one
that no longer crosses any must go. The checker itself is tested on planted violations,
so that a clean report means something.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tasksession"
ROOT = "tasksession"

#: The module map (DESIGN.md, "Architecture"): a module imports only modules of a lower
#: level. ``__init__`` re-exports the core.
LEVELS: Mapping[int, Sequence[str]] = {
    8: ("__init__",),
    7: ("_manager",),
    6: ("_scope", "_transactional", "_task_group"),
    5: ("_home", "_rebind"),
    4: ("_teardown", "_session", "_config"),
    3: ("_guard", "_pool", "_sqlite", "_commit", "_savepoint"),
    2: (
        "_loading",
        "_streams",
        "_retry",
        "_completion",
        "_tasks",
        "_interrupt",
        "_shortcuts",
        "_outcome",
        "_urls",
        "_replicas",
    ),
    1: ("_errors", "_stats", "_pins", "_compat", "_members"),
}
#: Framework glue (a module, or a package of modules): it imports only the ``tasksession``
#: root and the modules of its own package, never the core's modules.
LEAVES: Sequence[str] = ("tornado", "workers", "testing", "opentelemetry")

#: Private names (or prefixes, ending in ``_``) that may cross modules, each with why.
#: Keep it short: a name here is a coupling the next maintainer must know about.
SEAMS: Mapping[str, str] = {
    "_ts_": "the guarded session's slots: the guard's state, allocated by _session, "
    "set by _scope at entry, read by the guard and the teardown",
}

#: Private names of third-party objects that the package writes (so writing them does not
#: make a tasksession module their owner), each with whose they are. Every third-party
#: internal is pinned in one place (issue 14); this list only tells the checker.
FOREIGN: Mapping[str, str] = {
    "_transaction": "SQLAlchemy's Session._transaction and the asyncpg adapter's",
    "_finished": "Tornado's RequestHandler._finished (set as Tornado's finish() would)",
}

#: "No module over ~350 lines" (issue 14): the tallest, _scope, is its public surface.
MAX_MODULE_LINES = 380
#: Code lines (non-blank, non-comment, non-docstring) the core must stay under. Issue 14
#: asked for fewer than 2,338 (the count when it was filed); the exactly-once work then
#: grew the core to 3,110, and the restructure added the pins table (285) and the
#: Protocols (3,574 after it). That target is NOT met; this ceiling only stops growth.
#: Issue 15 added the documented hook the testing leaf needs (SessionManager.bound_to,
#: _rebind: 3,657 after it).
CORE_CODE_LINES_BEFORE = 3700


@dataclass(frozen=True)
class Module:
    """One source file of the package, parsed."""

    unit: str  # its entry in the map: "_scope", "__init__", "tornado" (also tornado/_x.py)
    dotted: str  # "tasksession._scope", "tasksession.tornado._x"
    is_package: bool
    where: str  # how a violation names it: "tasksession/_scope.py"
    source: str
    tree: ast.Module


@dataclass(frozen=True)
class Violation:
    """A place that breaks a rule; ``rule`` is the letter of the module docstring."""

    rule: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def read_package(root: Path, shown_from: Path | None = None) -> list[Module]:
    """Parse every module below ``root`` (the package directory).

    :param shown_from: the directory violations name files from (default: ``root``'s parent).
    """
    shown_from = root.parent if shown_from is None else shown_from
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        names = parts[:-1] if is_package else parts
        source = path.read_text(encoding="utf-8")
        modules.append(
            Module(
                unit=names[0] if names else "__init__",
                dotted=".".join((ROOT, *names)),
                is_package=is_package,
                where=path.relative_to(shown_from).as_posix(),
                source=source,
                tree=ast.parse(source, filename=str(path)),
            )
        )
    return modules


def _level(unit: str, levels: Mapping[int, Sequence[str]], leaves: Sequence[str]) -> int | None:
    """The unit's level; leaves stand above every level; ``None`` for a unit not in the map."""
    if unit in leaves:
        return max(levels) + 1
    return next((level for level, units in levels.items() if unit in units), None)


def _unit_of(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_private(name: str) -> bool:
    return len(name) > 1 and name.startswith("_") and not name.endswith("__")


def _seam(name: str, seams: Mapping[str, str]) -> str | None:
    """The seam that lets ``name`` cross modules, if any."""
    for key in seams:
        if name == key or (key.endswith("_") and name.startswith(key)):
            return key
    return None


def _absolute(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` reads from; ``None`` outside the package."""
    if node.level == 0:
        name = node.module or ""
        return name if _in_package(name) else None
    package = module.dotted.split(".")
    if not module.is_package:
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


@dataclass(frozen=True)
class _Import:
    line: int
    target: str  # the tasksession module imported (or reached through an attribute)
    name: str | None  # the name taken from it, if not a module


_GETTERS = ("getattr", "hasattr", "delattr", "__getattribute__", "__delattr__")
_SETTERS = ("setattr", "__setattr__")


def _called(call: ast.Call) -> str:
    """The name of the function called: ``getattr`` in ``getattr(...)`` and ``x.getattr(...)``."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def _in_package(dotted: str) -> bool:
    return dotted == ROOT or dotted.startswith(ROOT + ".")


def _by_name(call: ast.Call) -> tuple[str, ast.expr, str] | None:
    """``(function, object, name)`` for ``getattr(obj, "name")`` and its kin, else ``None``."""
    function = _called(call)
    if function not in _GETTERS + _SETTERS or len(call.args) < 2:
        return None
    name = call.args[1]
    if not isinstance(name, ast.Constant) or not isinstance(name.value, str):
        return None
    return function, call.args[0], name.value


class _Reader:
    """What one module imports, which tasksession modules its names stand for, what it touches."""

    def __init__(self, module: Module, known: set[str]) -> None:
        self.module = module
        self.known = known
        self.bindings: dict[str, str] = {}  # local name -> tasksession module it stands for
        self.imports: list[_Import] = []
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                self._read_import(node)
            elif isinstance(node, ast.ImportFrom):
                self._read_import_from(node)
            elif isinstance(node, ast.Call):
                self._read_import_module(node)

    def _read_import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _in_package(alias.name):
                continue
            self.imports.append(_Import(node.lineno, alias.name, None))
            # `import tasksession._x` binds `tasksession`; `... as x` binds the module itself.
            self.bindings[alias.asname or ROOT] = alias.name if alias.asname else ROOT

    def _read_import_from(self, node: ast.ImportFrom) -> None:
        base = _absolute(self.module, node)
        if base is None:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.known:
                self.imports.append(_Import(node.lineno, submodule, None))
                self.bindings[alias.asname or alias.name] = submodule
            else:
                self.imports.append(_Import(node.lineno, base, alias.name))

    def _read_import_module(self, call: ast.Call) -> None:
        """``importlib.import_module("tasksession._x")`` (or ``__import__``) is an import too."""
        if _called(call) not in ("import_module", "__import__") or not call.args:
            return
        name = call.args[0].value if isinstance(call.args[0], ast.Constant) else None
        if isinstance(name, str) and _in_package(name):
            self.imports.append(_Import(call.lineno, name, None))

    def module_of(self, expr: ast.expr) -> str | None:
        """The tasksession module ``expr`` stands for (``_scope``, ``tasksession._scope``)."""
        if isinstance(expr, ast.Name):
            return self.bindings.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.module_of(expr.value)
            if base is not None and f"{base}.{expr.attr}" in self.known:
                return f"{base}.{expr.attr}"
        return None

    def accesses(self) -> Iterator[tuple[int, ast.expr, str, bool]]:
        """Every attribute use: ``(line, object, name, is_store)``, ``getattr`` & co. included."""
        for node in ast.walk(self.module.tree):
            if isinstance(node, ast.Attribute):
                yield node.lineno, node.value, node.attr, isinstance(node.ctx, ast.Store)
            elif isinstance(node, ast.Call) and (by_name := _by_name(node)) is not None:
                function, obj, name = by_name
                yield node.lineno, obj, name, function in _SETTERS


def _definitions(module: Module, *, owned: bool = False) -> set[str]:
    """The private attribute names ``module`` defines (or, with ``owned``, owns).

    Defined: an attribute assignment target (``self._name = ``, ``x._name = ``,
    ``setattr(x, "_name", ...)``), a name bound in a class body (a method included), or a
    string in ``__slots__``. A module-level ``def _name`` is no attribute: reaching it from
    another module is rule (b) or (c). Owned: the same, but of assignments only those to
    ``self`` or ``cls``: a module that sets ``scope._streams`` defines it without owning it.
    """
    names: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if not owned or _is_self(node.value):
                names.add(node.attr)
        elif isinstance(node, ast.Call) and (by_name := _by_name(node)) is not None:
            function, obj, name = by_name
            if function in _SETTERS and (not owned or _is_self(obj)):
                names.add(name)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                names.update(_class_body_names(statement))
    return {name for name in names if _is_private(name)}


def _is_self(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Name) and expr.id in ("self", "cls")


def _class_body_names(statement: ast.stmt) -> Iterator[str]:
    """The names a class-body statement binds, and the strings of ``__slots__``."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield statement.name
        return
    targets: list[ast.expr]
    value: ast.expr | None
    if isinstance(statement, ast.Assign):
        targets, value = statement.targets, statement.value
    elif isinstance(statement, ast.AnnAssign):
        targets, value = [statement.target], statement.value
    else:
        return
    for target in targets:
        if not isinstance(target, ast.Name):
            continue
        yield target.id
        if target.id == "__slots__" and value is not None:
            for element in ast.walk(value):
                if isinstance(element, ast.Constant) and isinstance(element.value, str):
                    yield element.value


def _check_unit(module: Module, levels: Mapping[int, Sequence[str]], leaves: Sequence[str]) -> str:
    """Why ``module`` may not be in the package, or ``""``."""
    if _level(module.unit, levels, leaves) is not None:
        return ""
    return (
        f"{module.dotted} is not in the module map: add {module.unit!r} to LEVELS (at a level "
        "above everything it imports) or to LEAVES in tests/test_architecture.py"
    )


def _check_import(
    module: Module,
    imported: _Import,
    levels: Mapping[int, Sequence[str]],
    leaves: Sequence[str],
) -> str:
    """Why ``module`` may not import ``imported`` (rule a), or ``""``."""
    target = _unit_of(imported.target)
    if target == module.unit:  # a leaf package's own modules (or the root's own names)
        return ""
    own_level = _level(module.unit, levels, leaves)
    target_level = _level(target, levels, leaves)
    if own_level is None or target_level is None:
        return ""  # reported once, as a module the map does not know
    what = imported.target if imported.name is None else f"{imported.target}.{imported.name}"
    if module.unit in leaves:
        if imported.target == ROOT:  # a name of the root (a submodule's target is the submodule)
            return ""
        return f"imports {what}: a leaf imports only the {ROOT} root (and its own package)"
    if target_level < own_level:
        return ""
    direction = "sideways" if target_level == own_level else "up"
    return (
        f"imports {what}: {direction} the module map "
        f"({module.unit} is level {own_level}, {target} level {target_level})"
    )


def check_imports_and_privates(
    modules: Sequence[Module],
    levels: Mapping[int, Sequence[str]] = LEVELS,
    leaves: Sequence[str] = LEAVES,
    seams: Mapping[str, str] = SEAMS,
    foreign: Mapping[str, str] = FOREIGN,
) -> tuple[list[Violation], set[str]]:
    """Rules (a) to (d) over ``modules``; also the seams and foreign names that mattered.

    A seam matters when it let a private name cross modules; a foreign name, when a module
    uses it at all.
    """
    known = {module.dotted for module in modules}
    known.update(f"{ROOT}.{unit}" for units in levels.values() for unit in units)
    known.update(f"{ROOT}.{leaf}" for leaf in leaves)
    defined = {module.dotted: _definitions(module) - set(foreign) for module in modules}
    owned = {module.dotted: _definitions(module, owned=True) - set(foreign) for module in modules}
    violations: list[Violation] = []
    seams_used: set[str] = set()

    def private(module: Module, line: int, rule: str, name: str, message: str) -> None:
        seam = _seam(name, seams)
        if seam is not None:
            seams_used.add(seam)
        else:
            violations.append(Violation(rule, f"{module.where}:{line}", message))

    for module in modules:
        if message := _check_unit(module, levels, leaves):
            violations.append(Violation("a", module.where, message))
        reader = _Reader(module, known)
        for imported in reader.imports:
            if message := _check_import(module, imported, levels, leaves):
                violations.append(Violation("a", f"{module.where}:{imported.line}", message))
            if imported.name is not None and _is_private(imported.name):
                what = f"from {imported.target} import {imported.name}"
                private(module, imported.line, "b", imported.name, f"{what}: a private name")
        for line, obj, name, is_store in reader.accesses():
            if name in foreign:
                seams_used.add(name)
            owner = reader.module_of(obj)
            if owner is not None:
                if f"{owner}.{name}" in known:  # a submodule reached through its package
                    imported = _Import(line, f"{owner}.{name}", None)
                    if message := _check_import(module, imported, levels, leaves):
                        violations.append(Violation("a", f"{module.where}:{line}", message))
                elif _is_private(name) and owner != module.dotted:
                    private(module, line, "c", name, f"{owner}.{name}: another module's private")
                continue
            if not _is_private(name):
                continue
            if is_store:  # a write: to a private another module owns, not its own
                if _is_self(obj) or name in owned[module.dotted]:
                    continue
                owners = sorted(other for other, names in owned.items() if name in names)
                message = f".{name} = ...: a private owned by {', '.join(owners)}"
            else:
                if name in defined[module.dotted]:
                    continue
                owners = sorted(other for other, names in defined.items() if name in names)
                message = f".{name}: a private defined only in {', '.join(owners)}"
            if owners:
                private(module, line, "d", name, message)
    violations.sort(key=_place)
    return violations, seams_used


def _place(violation: Violation) -> tuple[str, int]:
    file, _, line = violation.where.partition(":")
    return file, int(line or 0)


def code_lines(source: str) -> int:
    """Lines with code on them: not blank, not only a comment, not part of a docstring."""
    docstrings: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # row -> its span
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                assert first.end_lineno is not None
                assert first.end_col_offset is not None
                span = (first.lineno, first.col_offset), (first.end_lineno, first.end_col_offset)
                for row in range(first.lineno, first.end_lineno + 1):
                    docstrings[row] = span
    rows: set[int] = set()
    not_code = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT}
    not_code |= {tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in not_code:
            continue
        covering = docstrings.get(token.start[0])
        if covering and token.type == tokenize.STRING and covering[0] <= token.start < covering[1]:
            continue
        rows.update(range(token.start[0], token.end[0] + 1))
    return len(rows)


def check_sizes(
    modules: Sequence[Module],
    max_lines: int = MAX_MODULE_LINES,
    core_before: int = CORE_CODE_LINES_BEFORE,
    leaves: Sequence[str] = LEAVES,
) -> list[Violation]:
    """Rules (e) and (f): no module over ``max_lines``; a core under ``core_before`` lines."""
    violations = [
        Violation("e", module.where, f"{lines} lines (at most {max_lines})")
        for module in modules
        if (lines := len(module.source.splitlines())) > max_lines
    ]
    core = {m.where: code_lines(m.source) for m in modules if m.unit not in leaves}
    total = sum(core.values())
    if total >= core_before:
        figures = ", ".join(f"{where} {lines}" for where, lines in sorted(core.items()))
        message = f"{total} code lines (must be under {core_before}): {figures}"
        violations.append(Violation("f", "the core", message))
    return violations


def _report(violations: Sequence[Violation]) -> str:
    return f"{len(violations)} violation(s):\n" + "\n".join(map(str, violations))


# -- the package --------------------------------------------------------------------------


@functools.cache
def _package() -> tuple[Module, ...]:
    return tuple(read_package(PACKAGE, shown_from=PACKAGE.parents[1]))


def test_imports_run_down_the_module_map() -> None:
    violations, _ = check_imports_and_privates(_package())
    imports = [violation for violation in violations if violation.rule == "a"]
    assert [] == imports, _report(imports)


def test_no_module_reads_another_modules_private_names() -> None:
    violations, _ = check_imports_and_privates(_package())
    privates = [violation for violation in violations if violation.rule != "a"]
    assert [] == privates, _report(privates)


def test_every_seam_and_foreign_name_is_still_needed() -> None:
    _, used = check_imports_and_privates(_package())
    declared = set(SEAMS) | set(FOREIGN)
    assert declared == used, f"no longer needed, remove them: {sorted(declared - used)}"


def test_modules_stay_small_and_the_core_smaller_than_before() -> None:
    violations = check_sizes(_package())
    assert [] == violations, _report(violations)


# -- the checker, on planted violations ----------------------------------------------------

PLANTED = {
    "__init__.py": "from ._manager import Manager as Manager\n",
    "_errors.py": "import importlib\nimportlib.import_module('tasksession._stats')\n",
    "_stats.py": (
        "class Ledger:\n"
        "    __slots__ = ('_commits',)\n"
        "    def _count(self) -> None:\n"
        "        self._commits = 1\n"
    ),
    "_guard.py": (
        "from typing import TYPE_CHECKING\n"
        "from . import _stats\n"
        "if TYPE_CHECKING:\n"
        "    from ._scope import Scope\n"  # (a) up, hidden under TYPE_CHECKING
        "def guard(ledger: object, session: object) -> None:\n"
        "    from ._retry import _DELAY\n"  # (a) sideways, (b) private, inside a function
        "    ledger._count()\n"  # (d) a method only _stats defines
        "    _stats._helper()\n"  # (c) a private of an imported module
        "    session._ts_busy = True\n"  # a seam, assigned here
        "    getattr(ledger, '_commits')\n"  # (d) through getattr
    ),
    "_retry.py": "_DELAY = 1\n",
    "_scope.py": (
        "from ._guard import guard\n"
        "class Scope:\n"
        "    def __init__(self, session: object) -> None:\n"
        "        self._depth = 0\n"
        "        self._ts_scope = self\n"
        "        print(session._ts_busy, self._depth)\n"  # a seam and its own private: fine
    ),
    "_manager.py": (
        "import tasksession._scope\n"
        "from ._scope import Scope\n"
        "class Manager:\n"
        "    def depth(self, scope: Scope) -> int:\n"
        "        return scope._depth + tasksession._scope._private\n"  # (d) and (c)
    ),
    "_newcomer.py": "",  # not in the map
    "workers.py": "from . import Manager\nfrom ._scope import Scope\nimport tasksession._errors\n",
    "tornado/__init__.py": "from .. import Manager\nfrom ._state import State\n",
    "tornado/_state.py": (
        "from tasksession import _guard\n"
        "class State:\n"
        "    def enter(self, scope: object) -> None:\n"
        "        scope._depth = 1\n"  # (d) a write to a private _scope owns
    ),
}

PLANTED_LEVELS = {
    8: ("__init__",),
    7: ("_manager",),
    5: ("_scope",),
    3: ("_guard", "_retry"),
    1: ("_errors", "_stats"),
}


def _plant(tmp_path: Path, files: Mapping[str, str]) -> list[Module]:
    root = tmp_path / ROOT
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return read_package(root)


def test_the_checker_finds_each_kind_of_planted_violation(tmp_path: Path) -> None:
    modules = _plant(tmp_path, PLANTED)
    violations, seams_used = check_imports_and_privates(
        modules, levels=PLANTED_LEVELS, leaves=("tornado", "workers"), seams={"_ts_": "slots"}
    )
    expected = [
        "a tasksession/_guard.py:4: imports tasksession._scope.Scope: up the module map "
        "(_guard is level 3, _scope level 5)",
        "a tasksession/_guard.py:6: imports tasksession._retry._DELAY: sideways the module map "
        "(_guard is level 3, _retry level 3)",
        "a tasksession/_errors.py:2: imports tasksession._stats: sideways the module map "
        "(_errors is level 1, _stats level 1)",
        "a tasksession/_newcomer.py: tasksession._newcomer is not in the module map: add "
        "'_newcomer' to LEVELS (at a level above everything it imports) or to LEAVES in "
        "tests/test_architecture.py",
        "a tasksession/tornado/_state.py:1: imports tasksession._guard: a leaf imports only "
        "the tasksession root (and its own package)",
        "a tasksession/workers.py:2: imports tasksession._scope.Scope: a leaf imports only "
        "the tasksession root (and its own package)",
        "a tasksession/workers.py:3: imports tasksession._errors: a leaf imports only "
        "the tasksession root (and its own package)",
        "b tasksession/_guard.py:6: from tasksession._retry import _DELAY: a private name",
        "c tasksession/_guard.py:8: tasksession._stats._helper: another module's private",
        "c tasksession/_manager.py:5: tasksession._scope._private: another module's private",
        "d tasksession/_guard.py:7: ._count: a private defined only in tasksession._stats",
        "d tasksession/_guard.py:10: ._commits: a private defined only in tasksession._stats",
        "d tasksession/_manager.py:5: ._depth: a private defined only in tasksession._scope, "
        "tasksession.tornado._state",
        "d tasksession/tornado/_state.py:4: ._depth = ...: a private owned by tasksession._scope",
    ]
    assert sorted(expected) == sorted(f"{v.rule} {v}" for v in violations)
    assert {"_ts_"} == seams_used


def test_the_checker_finds_a_sideways_import_the_levels_map_exactly(tmp_path: Path) -> None:
    modules = _plant(tmp_path, {"_retry.py": "", "_loading.py": "from . import _retry\n"})
    violations, _ = check_imports_and_privates(modules)
    assert [
        "tasksession/_loading.py:1: imports tasksession._retry: sideways the module map "
        "(_loading is level 2, _retry level 2)"
    ] == [str(violation) for violation in violations]


def test_the_checker_passes_a_tree_that_keeps_the_rules(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "__init__.py": "from ._scope import Scope as Scope\n__version__ = '1'\n",
            "_errors.py": "class Error(Exception):\n    __slots__ = ('_code',)\n",
            "_scope.py": (
                "from . import _errors\n"
                "class Scope:\n"
                "    def __init__(self) -> None:\n"
                "        self._depth = _errors.Error.__name__\n"
                "    def depth(self) -> str:\n"
                "        return self._depth + str(_errors.__doc__)\n"
            ),
            "workers.py": "import tasksession\nfrom tasksession import Scope\n",
            "tornado/__init__.py": "from .. import Scope\nfrom . import _state\n",
            "tornado/_state.py": "from tasksession import Scope\n",
        },
    )
    assert ([], set()) == check_imports_and_privates(modules)


def test_code_lines_leave_out_blank_lines_comments_and_docstrings() -> None:
    source = (
        '"""Module docstring,\n\nover three lines."""\n'
        "\n"
        "# a comment\n"
        "def f() -> str:\n"
        '    """Docstring."""\n'
        "    text = '''a string\n"
        "    over two lines'''  # counted: it is code\n"
        "    return text\n"
    )
    assert 4 == code_lines(source)


def test_the_checker_names_oversized_modules_and_a_core_that_grew(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "_scope.py": "x = 1\n" * 4,
            "_errors.py": "# only a comment\n\nx = 1\n",
            "workers.py": "y = 2\n" * 9,
        },
    )
    assert [
        "e tasksession/workers.py: 9 lines (at most 5)",
        "f the core: 5 code lines (must be under 5): "
        "tasksession/_errors.py 1, tasksession/_scope.py 4",
    ] == [f"{v.rule} {v}" for v in check_sizes(modules, max_lines=5, core_before=5)]
    assert [] == check_sizes(modules, max_lines=9, core_before=6)
