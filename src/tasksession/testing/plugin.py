"""The pytest plugin: ``tasksession_db``, an isolated, leak-checked manager for each test.

Registered through the ``pytest11`` entry point (``pip install tasksession`` is
enough). The application provides one fixture::

    @pytest.fixture
    def tasksession_manager():
        return app.db                      # its SessionManager, configured for tests

and a test asks for ``tasksession_db``: the same manager, inside
:func:`~tasksession.testing.isolated` (savepoint mode unless the test is marked
``@pytest.mark.tasksession(mode="clone")``) and :func:`~tasksession.testing.assert_no_leaks`.
Clone mode also needs ``tasksession_schema``: a fixture returning the function that
builds the template's schema (``Base.metadata.create_all``).

Which runner runs the async fixture is the test's: anyio's pytest plugin (a test
marked ``anyio``) or pytest-asyncio (a test marked ``asyncio``, or any coroutine
test in its auto mode), in the test's own event loop whatever its loop scope.
pytest-asyncio runs a fixture's setup, the test and the teardown in three
different tasks; nothing here is tied to one.

This module imports only pytest until a fixture runs: loading the plugin costs a
test run that does not use it nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest

__all__ = ["tasksession_db", "tasksession_manager", "tasksession_schema"]

LoopScope = Literal["function", "class", "module", "package", "session"]

_MARKER = "tasksession"
_LOOP_SCOPES: tuple[LoopScope, ...] = ("function", "class", "module", "package", "session")
_OPTIONS = {"mode", "clone_per", "allow", "wait_timeout"}

# Clones shared by the tests of one module (clone_per="module"): module node id -> clone.
_MODULE_CLONES: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tasksession(mode='savepoint'|'clone', clone_per='test'|'module', wait_timeout=5.0): "
        "how tasksession_db isolates the test (tasksession.testing)",
    )


@pytest.fixture
def tasksession_manager() -> Any:
    """Override this: return the application's ``SessionManager`` (configured for tests)."""
    raise pytest.UsageError(
        "tasksession_db needs your manager: define a fixture named tasksession_manager "
        "in conftest.py that returns it, e.g.\n\n"
        "    @pytest.fixture\n"
        "    def tasksession_manager():\n"
        "        return app.db\n"
    )


@pytest.fixture
def tasksession_schema() -> Any:
    """Override this for clone mode: return the function that builds the schema."""
    return None


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker(_MARKER)
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    if marker is not None and marker.args:
        options.setdefault("mode", marker.args[0])
    unknown = set(options) - _OPTIONS
    if unknown:
        raise pytest.UsageError(
            f"@pytest.mark.tasksession got {sorted(unknown)}; it takes {sorted(_OPTIONS)}"
        )
    return options


def _asyncio_loop_scope(request: pytest.FixtureRequest) -> str | None:
    """The loop scope of a pytest-asyncio test, or None when pytest-asyncio does not run it."""
    marker = request.node.get_closest_marker("asyncio")
    auto = False
    try:
        auto = request.config.getini("asyncio_mode") == "auto"
    except ValueError:  # pytest-asyncio is not installed
        return None
    function = getattr(request.node, "function", None)
    if marker is None and not (auto and inspect.iscoroutinefunction(function)):
        return None
    scope = None
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope is None:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # older pytest-asyncio: tests default to their function's loop
            scope = None
    return scope or "function"


@pytest.fixture
def tasksession_db(
    request: pytest.FixtureRequest, tasksession_manager: Any, tasksession_schema: Any
) -> Any:
    """The application's manager, isolated for this test and checked for leaks at its end."""
    # The two fixtures are asked for here, statically, so that a parametrized
    # tasksession_manager parametrizes the tests; the async variants reuse them.
    if "anyio_backend" in request.fixturenames:
        return request.getfixturevalue("_tasksession_db_anyio")
    loop_scope = _asyncio_loop_scope(request)
    if loop_scope is not None:
        if loop_scope not in _LOOP_SCOPES:
            raise pytest.UsageError(f"unknown pytest-asyncio loop scope {loop_scope!r}")
        return request.getfixturevalue(f"_tasksession_db_asyncio_{loop_scope}")
    raise pytest.UsageError(
        f"{request.node.nodeid} uses tasksession_db but no async test runner runs it: mark "
        "it @pytest.mark.anyio (anyio's pytest plugin) or @pytest.mark.asyncio "
        "(pytest-asyncio), and make it an `async def`"
    )


async def _isolated_manager(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    from tasksession import SessionManager

    from ._isolation import isolated
    from ._leaks import assert_no_leaks

    db = request.getfixturevalue("tasksession_manager")
    if not isinstance(db, SessionManager):
        raise pytest.UsageError(
            f"the tasksession_manager fixture returned {db!r}; it must return a SessionManager"
        )
    options = _options(request)
    mode = options.get("mode", "savepoint")
    kwargs: dict[str, Any] = {"allow": options.get("allow", ())}
    if "wait_timeout" in options:
        kwargs["wait_timeout"] = options["wait_timeout"]
    if mode == "clone":
        _drop_templates_at_the_end(request.session)
        kwargs.pop("wait_timeout", None)
        kwargs["schema"] = request.getfixturevalue("tasksession_schema")
        if options.get("clone_per", "test") == "module":
            kwargs["clone"] = await _module_clone(request, db, kwargs["schema"])
    async with isolated(db, mode, **kwargs), assert_no_leaks(db):
        yield db


async def _module_clone(request: pytest.FixtureRequest, db: Any, schema: Any) -> Any:
    from ._clone import create_clone

    module = request.node.getparent(pytest.Module)
    key = module.nodeid if module is not None else ""
    clone = _MODULE_CLONES.get(key)
    if clone is None:
        clone = _MODULE_CLONES[key] = await create_clone(db.engine.url, schema)
        node = module if module is not None else request.session
        # Dropped when the module's tests are done (before any session fixture ends,
        # such as a PostgreSQL server the tests started).
        node.addfinalizer(lambda: _drop_now(_MODULE_CLONES.pop(key).drop()))
    return clone


def _drop_now(drop: Any) -> None:
    # Finalizers run between tests: no event loop is running in this thread.
    from sqlalchemy.exc import SQLAlchemyError

    try:
        asyncio.run(drop)
    except (OSError, SQLAlchemyError) as error:  # the server is gone, its databases with it
        print(f"tasksession.testing: could not drop a test database: {error!r}", file=sys.stderr)


def _drop_templates_at_the_end(session: pytest.Session) -> None:
    """Drop the clone templates when the session's fixtures end, before those it relies on."""
    from ._clone import drop_templates

    if not getattr(session, "_tasksession_templates", False):
        session._tasksession_templates = True  # type: ignore[attr-defined]
        # A finalizer registered now runs before the session fixtures set up earlier
        # (the server the templates live on) are torn down.
        session.addfinalizer(lambda: _drop_now(drop_templates()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Templates built outside the fixture (isolated() called by a test itself).
    from ._clone import drop_templates, template_count

    if template_count():
        _drop_now(drop_templates())


@pytest.fixture
async def _tasksession_db_anyio(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    async for db in _isolated_manager(request):
        yield db


def _asyncio_variants() -> None:
    try:
        import pytest_asyncio
    except ImportError:
        return
    for loop_scope in _LOOP_SCOPES:

        async def fixture(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
            async for db in _isolated_manager(request):
                yield db

        name = f"_tasksession_db_asyncio_{loop_scope}"
        fixture.__name__ = name
        globals()[name] = pytest_asyncio.fixture(loop_scope=loop_scope, name=name)(fixture)


_asyncio_variants()
