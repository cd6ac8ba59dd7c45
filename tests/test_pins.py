"""The third-party internals tasksession relies on: all pinned in ``tasksession._pins``, all there.

Two halves:

* **the pins hold** on the installed versions (CI runs this file on the oldest and
  the newest supported SQLAlchemy): methods and functions exist with the
  parameters relied on; attributes exist on real objects (SQLAlchemy's on SQLite
  through aiosqlite, the asyncpg adapter's on PostgreSQL, Tornado's on a real
  ``RequestHandler``, skipped without Tornado); each behaviour is shown by a
  small demonstration;
* **the list is exact**: an AST scan of every module of the package finds each
  private name (``x._name``, ``getattr(x, "_name")``, an override in a subclass)
  that tasksession does not define itself, and fails on one that no pin lists,
  with its ``module:line``; and on a pin that no module uses any more, or whose
  ``used_by`` names the wrong modules.

``tests/test_loading_internals.py`` and ``tests/test_shortcuts.py`` pin some of
the same internals closer to the code that uses them (signatures, the shape of
``SessionTransaction._connections``); both stay.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import importlib
import importlib.metadata
import inspect
import re
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg
import pytest
from greenlet import getcurrent, greenlet
from sqlalchemy import ForeignKey, create_engine, event, text
from sqlalchemy.engine import Connection, Result, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    mapped_column,
    relationship,
)
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.pool import Pool, QueuePool

import tasksession
from tasksession._pins import PINS, Pin

PACKAGE_DIR = Path(tasksession.__file__).parent
#: Private names by tasksession's convention: attributes it plants on other objects.
OWN_PREFIXES = ("_ts_", "_tasksession")
#: Modules whose classes, as bases, define nothing a tasksession class could shadow.
NEUTRAL_MODULES = frozenset({"builtins", "typing", "typing_extensions", "abc"})
_PRIVATE = re.compile(r"_[A-Za-z0-9]\w*\Z")
_ADAPTER = "sqlalchemy.dialects.postgresql.asyncpg.AsyncAdapt_asyncpg_connection"


def _pin_id(pin: Pin) -> str:
    return f"{pin.owner.rsplit('.', 1)[-1]}.{pin.name}" if pin.kind != "behaviour" else pin.name


def _is_private(name: str) -> bool:
    return bool(_PRIVATE.match(name)) and not name.startswith(OWN_PREFIXES)


# -- the pins hold: resolving owners ---------------------------------------------------


def _resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[end:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(path)


def _owner(pin: Pin) -> Any:
    """The pin's owner on the installed versions; skips when it is not needed or not installed."""
    if pin.owner.startswith("tornado."):
        pytest.importorskip("tornado")
    if pin.only_before is not None:
        distribution, before = pin.only_before
        if distribution == "python":
            installed = sys.version_info[:2]
        else:
            major, minor = importlib.metadata.version(distribution).split(".")[:2]
            installed = (int(major), int(minor))
        if installed >= before:
            pytest.skip(f"only needed before {distribution} {before}: {installed} installed")
    failures = []
    for path in (pin.owner, *pin.also_owner):
        try:
            return _resolve(path)
        except (ImportError, AttributeError) as error:
            failures.append(f"{path}: {error!r}")
    pytest.fail(f"owner of {_pin_id(pin)} not found: {'; '.join(failures)}", pytrace=False)


CALLABLE_PINS = [pin for pin in PINS if pin.kind in ("method", "function")]
ATTRIBUTE_PINS = [pin for pin in PINS if pin.kind == "attribute"]
BEHAVIOUR_PINS = [pin for pin in PINS if pin.kind == "behaviour"]


@pytest.mark.parametrize("pin", CALLABLE_PINS, ids=_pin_id)
def test_each_pinned_method_exists_with_the_parameters_relied_on(pin: Pin) -> None:
    member = getattr(_owner(pin), pin.name)
    assert callable(member)
    if pin.parameters is not None:
        assert list(pin.parameters) == list(inspect.signature(member).parameters)


# -- the pins hold: attributes on real objects -------------------------------------------


@asynccontextmanager
async def _sqlalchemy_objects(url: str) -> AsyncIterator[dict[str, Any]]:
    """Real objects of each class that owns a pinned attribute, in a unit that holds a connection."""
    engine = create_async_engine(url)
    try:
        async with AsyncSession(engine) as session:
            result = await session.stream(text("SELECT 1"))
            connection = (await session.connection()).sync_connection
            assert connection is not None
            sync = session.sync_session
            objects = {
                "sqlalchemy.ext.asyncio.AsyncSession": session,
                "sqlalchemy.ext.asyncio.AsyncResult": result,
                "sqlalchemy.orm.Session": sync,
                "sqlalchemy.orm.SessionTransaction": sync.get_transaction(),
                "sqlalchemy.engine.Connection": connection,
                "sqlalchemy.engine.Engine": engine.sync_engine,
                "sqlalchemy.engine.base.OptionEngine": engine.sync_engine.execution_options(
                    logging_token="pins"
                ),
                "sqlalchemy.pool.Pool": engine.sync_engine.pool,
                "sqlalchemy.pool.QueuePool": engine.sync_engine.pool,
                "sqlalchemy.pool.base._ConnectionFairy": connection.connection,
            }
            if engine.dialect.driver == "asyncpg":
                objects[_ADAPTER] = connection.connection.dbapi_connection
            yield objects
            await result.close()
    finally:
        await engine.dispose()


@asynccontextmanager
async def _objects_for(
    pin: Pin, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    if pin.owner.startswith("tornado."):
        yield {"tornado.web.RequestHandler": _tornado_handler()}
    elif pin.owner == _ADAPTER:
        async with _sqlalchemy_objects(request.getfixturevalue("postgres_url")) as objects:
            yield objects
    else:
        async with _sqlalchemy_objects(f"sqlite+aiosqlite:///{tmp_path}/pins.db") as objects:
            yield objects


def _tornado_handler() -> Any:
    """A real RequestHandler, as Tornado builds one for a request (its connection a stub)."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
    from tornado.web import Application, RequestHandler

    start_line = RequestStartLine("GET", "/", "HTTP/1.1")  # method=/uri= warn from Tornado 6.6
    headers = HTTPHeaders({"Host": "localhost"})
    request = HTTPServerRequest(start_line=start_line, headers=headers, connection=mock.Mock())
    return RequestHandler(Application(), request)


#: What each pinned attribute holds, where its value matters to tasksession.
_SHAPES: dict[tuple[str, str], Callable[[Any, dict[str, Any]], bool]] = {
    ("sqlalchemy.orm.Session", "_transaction"): lambda value, objects: (
        value is objects["sqlalchemy.orm.SessionTransaction"]
    ),
    ("sqlalchemy.orm.SessionTransaction", "_parent"): lambda value, _: value is None,
    ("sqlalchemy.orm.SessionTransaction", "_state"): lambda value, _: (
        value is SessionTransactionState.ACTIVE
    ),
    ("sqlalchemy.orm.SessionTransaction", "_connections"): lambda value, objects: (
        [(objects["sqlalchemy.engine.Connection"], True)]
        == [(entry[0], entry[2]) for entry in set(value.values())]
    ),
    ("sqlalchemy.ext.asyncio.AsyncSession", "_proxied"): lambda value, objects: (
        value is objects["sqlalchemy.orm.Session"]
    ),
    ("sqlalchemy.ext.asyncio.AsyncResult", "_real_result"): lambda value, _: isinstance(
        value, Result
    ),
    ("sqlalchemy.engine.Connection", "_dbapi_connection"): lambda value, objects: (
        value is objects["sqlalchemy.pool.base._ConnectionFairy"]
    ),
    ("sqlalchemy.engine.Connection", "_has_events"): lambda value, _: value is False,
    ("sqlalchemy.engine.Engine", "_has_events"): lambda value, _: value is False,
    ("sqlalchemy.engine.base.OptionEngine", "_proxied"): lambda value, objects: (
        value is objects["sqlalchemy.engine.Engine"]
    ),
    ("sqlalchemy.pool.Pool", "_creator"): lambda value, _: callable(value),
    ("sqlalchemy.pool.QueuePool", "_max_overflow"): lambda value, _: value == 10,
    ("sqlalchemy.pool.base._ConnectionFairy", "_pool"): lambda value, objects: (
        value is objects["sqlalchemy.pool.Pool"]
    ),
    (_ADAPTER, "_transaction"): lambda value, _: value is not None,  # inside a BEGIN
    (_ADAPTER, "_connection"): lambda value, _: isinstance(value, asyncpg.Connection),
    (_ADAPTER, "_started"): lambda value, _: value is True,
    ("asyncio.tasks", "_current_tasks"): lambda value, _: isinstance(value, dict),
    ("tornado.web.RequestHandler", "_auto_finish"): lambda value, _: value is True,
    ("tornado.web.RequestHandler", "_finished"): lambda value, _: value is False,
    ("tornado.web.RequestHandler", "_headers_written"): lambda value, _: value is False,
    ("tornado.web.RequestHandler", "_status_code"): lambda value, _: value == 200,
}


@pytest.mark.anyio
@pytest.mark.parametrize("pin", ATTRIBUTE_PINS, ids=_pin_id)
async def test_each_pinned_attribute_is_on_a_real_object(
    pin: Pin, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    owner = _owner(pin)
    shape = _SHAPES[(pin.owner, pin.name)]
    if isinstance(owner, types.ModuleType):
        assert shape(getattr(owner, pin.name), {})
        return
    async with _objects_for(pin, request, tmp_path) as objects:
        instance = objects[pin.owner]
        assert isinstance(instance, owner)
        assert shape(getattr(instance, pin.name), objects)


def test_every_pinned_attribute_has_its_shape_described() -> None:
    assert [] == [_pin_id(pin) for pin in ATTRIBUTE_PINS if (pin.owner, pin.name) not in _SHAPES]


# -- the pins hold: behaviours, each shown -----------------------------------------------


class _Sentinel(Exception):
    """Raised by the stand-ins the demonstrations install."""


def _raise_sentinel(*args: Any, **kwargs: Any) -> Any:
    raise _Sentinel


class _Base(DeclarativeBase):
    """Models of this file only (their own registry: nothing tasksession protects)."""


class _Owner(_Base):
    __tablename__ = "pin_owners"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    items: Mapped[list[_Item]] = relationship()


class _Item(_Base):
    __tablename__ = "pin_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("pin_owners.id"))


async def _greenlet_attributes(context: _Context) -> None:
    def child() -> Any:
        getcurrent()._ts_pin_check = "set"
        return getcurrent()._ts_pin_check

    assert "set" == greenlet(child).switch()


async def _get_bind_then_begin(context: _Context) -> None:
    seen: list[tuple[Any, Any]] = []

    class Naming(Session):
        def get_bind(self, *args: Any, **kwargs: Any) -> Any:
            getcurrent()._ts_pin_writer = self
            return super().get_bind(*args, **kwargs)

    engine = create_async_engine(context.sqlite_url)

    def on_begin(connection: Connection) -> None:
        writer = getattr(getcurrent(), "_ts_pin_writer", None)
        seen.append((writer, writer.get_transaction()._state if writer is not None else None))

    event.listen(engine.sync_engine, "begin", on_begin)
    try:
        async with AsyncSession(engine, sync_session_class=Naming) as session:
            await session.execute(text("SELECT 1"))
            expected = [(session.sync_session, SessionTransactionState.PROVISIONING_CONNECTION)]
            assert expected == seen
    finally:
        await engine.dispose()


async def _session_attributes(context: _Context) -> None:
    session = Session()
    session._ts_pin = "set"  # type: ignore[attr-defined]
    session.__dict__["execute"] = _raise_sentinel
    assert "set" == session._ts_pin  # type: ignore[attr-defined]
    with pytest.raises(_Sentinel):
        session.execute(text("SELECT 1"))


async def _loaders_use_execute(context: _Context) -> None:
    engine = create_async_engine(context.sqlite_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_Base.metadata.create_all)

        def load(sync: Session) -> None:
            sync.add(_Owner(id=1, name="one"))
            sync.flush()
            owner = sync.get_one(_Owner, 1)
            sync.expire(owner)
            sync.__dict__["execute"] = _raise_sentinel
            try:
                with pytest.raises(_Sentinel):
                    owner.name  # noqa: B018 - an expired column: a refresh query
                sync.__dict__.pop("execute")
                owner.name  # noqa: B018
                sync.__dict__["execute"] = _raise_sentinel
                with pytest.raises(_Sentinel):
                    owner.items  # noqa: B018 - a lazy relationship: a query
            finally:
                sync.__dict__.pop("execute", None)

        async with AsyncSession(engine) as session:
            await session.run_sync(load)
    finally:
        await engine.dispose()


async def _impl_class_switch(context: _Context) -> None:
    configure_mappers()
    impl: Any = _Owner.items.impl
    original = type(impl)
    switched = type(original.__name__, (original,), {"__slots__": ()})
    impl.__class__ = switched
    try:
        assert switched is type(_Owner.items.impl)
    finally:
        impl.__class__ = original


async def _async_session_dict(context: _Context) -> None:
    session = AsyncSession()
    assert session.__dict__["sync_session"] is session.__dict__["_proxied"]


async def _result_shadows(context: _Context) -> None:
    engine = create_async_engine(context.sqlite_url)
    try:
        async with AsyncSession(engine) as session:
            result = await session.stream(text("SELECT 1 UNION ALL SELECT 2"))
            real = result._real_result
            for method in (
                "_fetchiter_impl",
                "_fetchone_impl",
                "_fetchmany_impl",
                "_fetchall_impl",
            ):
                setattr(real, method, _raise_sentinel)
            for fetch in (result.fetchone, result.fetchmany, result.all, result.scalars().all):
                with pytest.raises(_Sentinel):
                    await fetch()
            with pytest.raises(_Sentinel):
                await anext(aiter(result))
            await result.close()
    finally:
        await engine.dispose()


async def _checkout_through_connect(context: _Context) -> None:
    engine = create_engine(context.sqlite_url.replace("+aiosqlite", ""), poolclass=QueuePool)
    with mock.patch.object(engine.pool, "_creator", _raise_sentinel):
        with pytest.raises(_Sentinel) as raised:
            engine.connect()
    engine.dispose()
    codes = []
    tb = raised.value.__traceback__
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    assert Pool.connect.__code__ in codes


async def _refused_cancel(context: _Context) -> None:
    loop = asyncio.get_running_loop()
    started, release = asyncio.Event(), asyncio.Event()
    refused: list[object] = []

    class Refusing(asyncio.Task[str]):
        def cancel(self, msg: Any | None = None) -> bool:
            refused.append(msg)
            return False

    async def cleanup() -> str:
        started.set()
        await release.wait()
        return "done"

    inner = Refusing(cleanup(), loop=loop)

    async def waiting() -> str:
        return await inner

    outer = loop.create_task(waiting())
    await started.wait()
    outer.cancel("stop")
    assert ["stop"] == refused  # passed on to the awaited task, at once
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await outer  # delivered once the awaited task finished
    assert "done" == inner.result()


async def _asyncpg_connection(context: _Context) -> Any:
    url = make_url(context.request.getfixturevalue("postgres_url")).set(drivername="postgresql")
    return await asyncpg.connect(url.render_as_string(hide_password=False))


async def _terminate_at_once(context: _Context) -> None:
    connection = await _asyncpg_connection(context)
    connection.terminate()
    assert connection.is_closed()  # no await: nothing was sent


async def _server_pid(context: _Context) -> None:
    connection = await _asyncpg_connection(context)
    try:
        assert await connection.fetchval("SELECT pg_backend_pid()") == connection.get_server_pid()
    finally:
        await connection.close()


@dataclass
class _Context:
    request: pytest.FixtureRequest
    sqlite_url: str


#: behaviour pin -> its demonstration (a behaviour pin without one fails the test).
_BEHAVIOURS: dict[str, Callable[[_Context], Awaitable[None]]] = {
    "a greenlet accepts attributes set on it": _greenlet_attributes,
    "get_bind() runs in the greenlet whose BEGIN then fires": _get_bind_then_begin,
    "Session instances take extra attributes": _session_attributes,
    "ORM loaders query through the instance's Session.execute": _loaders_use_execute,
    "an attribute impl's __class__ can be swapped for a slot-less subclass": _impl_class_switch,
    "AsyncSession.__init__ stores sync_session in the instance __dict__": _async_session_dict,
    "a Result's instance attributes shadow its methods": _result_shadows,
    "every checkout runs Pool.connect()": _checkout_through_connect,
    "a cancelled task cancels the task it awaits": _refused_cancel,
    "terminate() closes at once, without I/O": _terminate_at_once,
    "get_server_pid() names the backend": _server_pid,
}


@pytest.mark.anyio
@pytest.mark.parametrize("pin", BEHAVIOUR_PINS, ids=_pin_id)
async def test_each_pinned_behaviour_holds(
    pin: Pin, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    _owner(pin)
    await _BEHAVIOURS[pin.name](_Context(request, f"sqlite+aiosqlite:///{tmp_path}/pins.db"))


def test_every_behaviour_pin_is_demonstrated() -> None:
    assert sorted(pin.name for pin in BEHAVIOUR_PINS) == sorted(_BEHAVIOURS)


# -- the list is exact: what the package's source uses -----------------------------------


@dataclass(frozen=True)
class Use:
    """A private name used by a module of the package: ``x._name``, ``"_name"``, an override."""

    module: str
    line: int
    name: str
    #: The name reads a member of an imported module or object (``sys._getframe``):
    #: ``"foreign"`` (not tasksession's), the tasksession module's name, or None.
    via: str | None = None

    def __str__(self) -> str:
        return f"{self.module}:{self.line} {self.name}"


@dataclass
class _Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _modules() -> dict[str, _Module]:
    """Every module of the package, as it is now (files added, split or renamed included)."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = _Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def _imported_names(module: _Module) -> dict[str, str]:
    """Local name -> the absolute dotted path it was imported as (anywhere in the module)."""
    names = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.package.split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _top_level_names(module: _Module) -> set[str]:
    names = set()
    for node in module.tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        for target in _assigned(node):
            names.add(target)
    return names


def _assigned(node: ast.AST) -> Iterator[str]:
    """Names a class-body or module-level statement binds."""
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    for target in targets:
        for element in ast.walk(target):
            if isinstance(element, ast.Name):
                yield element.id


def _slots(node: ast.AST) -> list[ast.Constant]:
    """The string constants of a ``__slots__`` declaration (statement or namespace entry)."""
    value: ast.AST | None = None
    if isinstance(node, ast.Assign) and "__slots__" in _assigned(node):
        value = node.value
    elif isinstance(node, ast.Dict):
        for key, item in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "__slots__":
                value = item
    if value is None:
        return []
    return [c for c in ast.walk(value) if isinstance(c, ast.Constant) and isinstance(c.value, str)]


def _runtime_class(module: _Module, node: ast.ClassDef) -> type | None:
    """The class object of a top-level class statement, if its module imports here."""
    if node not in module.tree.body:
        return None
    try:
        found = getattr(importlib.import_module(module.name), node.name, None)
    except ImportError:  # an optional leaf whose framework is not installed
        return None
    return found if isinstance(found, type) else None


def _foreign_bases(cls: type) -> list[type]:
    return [
        base
        for base in cls.__mro__[1:]
        if not base.__module__.startswith("tasksession") and base.__module__ not in NEUTRAL_MODULES
    ]


def _declarations(modules: dict[str, _Module]) -> tuple[dict[str, str], list[Use]]:
    """Private names tasksession defines (name -> where), and its overrides of others' names.

    A class member (method, class attribute, ``__slots__`` entry) is tasksession's
    unless a third-party base class has it (then it is an override); a
    ``self._name = ...`` in a method is tasksession's if its class has only
    tasksession (or builtin) bases, or declares the name itself. A class that
    cannot be imported here (Tornado missing) or is nested counts as having
    third-party bases unless its bases are plainly tasksession's or builtins.
    """
    class_names = {
        node.name
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ClassDef)
    }
    own: dict[str, str] = {}
    overrides: list[Use] = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ClassDef):
                continue
            members: dict[str, int] = {}
            for statement in node.body:
                if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                    members[statement.name] = statement.lineno
                for name in _assigned(statement):
                    members[name] = statement.lineno
                for constant in _slots(statement):
                    members[constant.value] = constant.lineno
            cls = _runtime_class(module, node)
            if cls is not None:
                foreign = _foreign_bases(cls)
                pure = not foreign
            else:
                foreign = []
                pure = all(
                    isinstance(base, ast.Name)
                    and (base.id in class_names or hasattr(builtins, base.id))
                    for base in node.bases
                )
            declared = set()
            for name, line in members.items():
                if not _is_private(name):
                    continue
                if pure or (cls is not None and not any(name in vars(b) for b in foreign)):
                    declared.add(name)
                    own.setdefault(name, f"{module.name}:{line}")
                else:
                    overrides.append(Use(module.name, line, name))
            for method in node.body:
                if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                if not method.args.args:
                    continue
                self_name = method.args.args[0].arg
                for element in ast.walk(method):
                    if (
                        isinstance(element, ast.Attribute)
                        and isinstance(element.ctx, ast.Store)
                        and isinstance(element.value, ast.Name)
                        and element.value.id == self_name
                        and _is_private(element.attr)
                        and (pure or element.attr in declared)
                    ):
                        own.setdefault(element.attr, f"{module.name}:{element.lineno}")
    return own, overrides


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _uses(module: _Module, modules: dict[str, _Module]) -> Iterator[Use]:
    """Every private name ``module`` reads, writes or names in a string."""
    imported = _imported_names(module)
    skipped = _docstrings(module.tree)
    for node in ast.walk(module.tree):
        for constant in _slots(node):
            skipped.add(id(constant))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            via = None
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported:
                target = imported[root.id]
                if not target.startswith("tasksession"):
                    via = "foreign"
                elif node.value is root and target in modules:
                    via = target  # a tasksession module's own top-level name
            yield Use(module.name, node.lineno, node.attr, via)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skipped
            and _is_private(node.value)
        ):
            yield Use(module.name, node.lineno, node.value)


@dataclass
class _Scan:
    uses: list[Use]  # private names of other libraries, as the package uses them
    own: dict[str, str]  # private names tasksession defines -> where
    modules: set[str]


def _scan() -> _Scan:
    modules = _modules()
    own, overrides = _declarations(modules)
    top_level = {name: _top_level_names(module) for name, module in modules.items()}
    foreign = list(overrides)
    for module in modules.values():
        if module.name == "tasksession._pins":  # the list itself names every pinned internal
            continue
        for use in _uses(module, modules):
            if use.via == "foreign":
                foreign.append(use)
            elif use.via is not None:
                if use.name not in top_level[use.via]:
                    foreign.append(use)
            elif use.name not in own:
                foreign.append(use)
    return _Scan(sorted(set(foreign), key=lambda u: (u.module, u.line, u.name)), own, set(modules))


def _covers(listed: str, module: str) -> bool:
    """Whether a pin's ``used_by`` entry covers ``module`` (the module, or a package of it)."""
    return module == listed or module.startswith(listed + ".")


def test_the_scan_finds_the_known_internals() -> None:
    # The scan itself: it must see through self., strings, imported modules and overrides.
    found = {(use.module, use.name) for use in _scan().uses}
    assert {
        ("tasksession._compat", "_current_tasks"),  # via `from asyncio import tasks as _tasks`
        ("tasksession._sqlite", "_do_get"),  # an override of QueuePool's
        ("tasksession._sqlite", "_max_overflow"),  # getattr(pool, "_max_overflow", None)
        ("tasksession._shortcuts", "_transaction"),  # written as well as read
        ("tasksession._tasks", "_getframe"),  # sys._getframe
    } <= found
    own = _scan().own
    assert {"_kind", "_waiting", "_name"} <= set(own)  # Scope's, a pool's, slots


def test_every_private_name_of_another_library_that_the_package_uses_is_pinned() -> None:
    pinned = {pin.name for pin in PINS if pin.kind != "behaviour"}
    unpinned = [str(use) for use in _scan().uses if use.name not in pinned]
    assert [] == unpinned, (
        "private names of other libraries used without a pin: list each in "
        "tasksession/_pins.py with its reason, or stop using it"
    )


def test_no_pinned_name_is_also_defined_by_tasksession() -> None:
    # Else a use of it could not be told from a use of tasksession's own.
    own = _scan().own
    assert [] == sorted(
        f"{pin.name} (defined at {own[pin.name]})" for pin in PINS if pin.name in own
    )


def test_every_pin_is_used_by_exactly_the_modules_it_lists() -> None:
    scan = _scan()
    mismatches = []
    for name in sorted({pin.name for pin in PINS if pin.kind != "behaviour"}):
        listed = {m for pin in PINS if pin.name == name for m in pin.used_by}
        using = {use.module for use in scan.uses if use.name == name}
        uncovered = sorted(m for m in using if not any(_covers(entry, m) for entry in listed))
        unused = sorted(entry for entry in listed if not any(_covers(entry, m) for m in using))
        if uncovered or unused:
            mismatches.append(f"{name}: used by {uncovered} (not listed), listed {unused} (no use)")
    assert [] == mismatches, "update used_by in tasksession/_pins.py (or drop an unused pin)"


def test_every_behaviour_pin_names_modules_that_exist() -> None:
    modules = _scan().modules
    assert [] == [
        f"{pin.name}: {entry}"
        for pin in BEHAVIOUR_PINS
        for entry in pin.used_by
        if not any(_covers(entry, module) for module in modules)
    ]


def test_pins_module_imports_nothing_of_tasksession_or_of_the_libraries_it_names() -> None:
    modules = _modules()
    imported = set(_imported_names(modules["tasksession._pins"]).values())
    assert {
        "__future__.annotations",
        "dataclasses.dataclass",
        "typing.Final",
        "typing.Literal",
    } >= (imported)


def test_importing_tasksession_does_not_import_tornado() -> None:
    code = "import sys, tasksession, tasksession._pins; print('tornado' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "False" == out.stdout.strip()
