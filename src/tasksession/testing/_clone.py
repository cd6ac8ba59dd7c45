"""Clone mode: a database per test (or per module), cloned from a template built once.

PostgreSQL: the template is a database created once per process and given the
schema by the user's hook (``metadata.create_all``, a migration command); each
clone is ``CREATE DATABASE ... TEMPLATE`` of it (sessions still connected to the
template are terminated first: PostgreSQL refuses to clone a database in use),
dropped ``WITH (FORCE)`` afterwards. SQLite: the template is a database file,
and a clone a copy of it. Templates are dropped by :func:`drop_templates` (the
pytest plugin calls it when the run ends).
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ._stray import exempt

__all__ = ["Clone", "SchemaHook", "create_clone", "drop_templates"]

#: Builds the schema of the template: ``async def (AsyncConnection)``, or a plain
#: function of a synchronous Connection such as ``Base.metadata.create_all``.
SchemaHook = Callable[[AsyncConnection], Awaitable[None]] | Callable[[Connection], None]

_names = itertools.count(1)


@dataclass(frozen=True)
class Clone:
    """A database cloned from a template: ``url`` reaches it."""

    url: URL

    async def drop(self) -> None:
        """Drop the clone (every session on it is cut first)."""
        if self.url.get_backend_name() == "sqlite":
            _remove_sqlite(self.url)
        else:
            await _drop_postgres(self.url)


# (server and database of the source, the hook) -> the template's URL. The hook is
# compared by equality, not identity: `Base.metadata.create_all` is a new bound
# method object each time it is read, equal to the others.
_TEMPLATES: dict[tuple[str, SchemaHook], URL] = {}


def _key(url: URL, schema: SchemaHook) -> tuple[str, SchemaHook]:
    return url.render_as_string(hide_password=False), schema


def _unique_name(base: str, kind: str) -> str:
    stem = re.sub(r"[^a-z0-9_]", "_", base.lower())[:30]
    return f"{stem}_{kind}_{os.getpid()}_{next(_names)}"


def _maintenance_engine(url: URL) -> AsyncEngine:
    # The server's maintenance database, outside any pool: CREATE/DROP DATABASE
    # cannot run in a transaction, or while connected to the database itself.
    return exempt(
        create_async_engine(
            url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
    )


async def _run_schema(engine: AsyncEngine, schema: SchemaHook) -> None:
    async with engine.begin() as connection:
        if inspect.iscoroutinefunction(schema):
            await schema(connection)  # type: ignore[arg-type]
        else:
            await connection.run_sync(schema)  # type: ignore[arg-type]


def _check_hook(schema: SchemaHook | None) -> SchemaHook:
    if schema is None:
        raise TypeError(
            "clone mode builds a template database once and clones it for each test; "
            "pass schema=, the function that creates your tables in it: "
            "isolated(db, mode='clone', schema=Base.metadata.create_all), or in pytest "
            "a fixture `tasksession_schema` returning it (an `async def (connection)` for a "
            "migration command)"
        )
    if not callable(schema):
        raise TypeError(f"schema={schema!r} must be a function (such as metadata.create_all)")
    return schema


async def _template(url: URL, schema: SchemaHook) -> URL:
    key = _key(url, schema)
    known = _TEMPLATES.get(key)
    if known is not None:
        return known
    if url.get_backend_name() == "sqlite":
        template = _sqlite_sibling(url, "template")
    else:
        template = url.set(database=_unique_name(url.database or "db", "tmpl"))
        admin = _maintenance_engine(url)
        try:
            async with admin.connect() as connection:
                await connection.execute(text(f'CREATE DATABASE "{template.database}"'))
        finally:
            await admin.dispose()
    engine = create_async_engine(template, poolclass=NullPool)
    try:
        await _run_schema(engine, schema)
    except BaseException:
        await engine.dispose()
        await Clone(template).drop()
        raise
    await engine.dispose()
    _TEMPLATES[key] = template
    return template


async def create_clone(url: URL, schema: SchemaHook | None) -> Clone:
    """A new database with the schema ``schema`` builds, on the server (or directory) of ``url``."""
    hook = _check_hook(schema)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
            raise ValueError(
                "clone mode on SQLite copies a database file: configure the manager with a "
                "file (sqlite+aiosqlite:///path/test.db), or use the default savepoint mode"
            )
    elif backend != "postgresql":
        raise ValueError(f"clone mode supports PostgreSQL and SQLite, not {backend}")
    template = await _template(url, hook)
    if backend == "sqlite":
        clone = _sqlite_sibling(url, "clone")
        assert template.database is not None
        assert clone.database is not None
        shutil.copyfile(template.database, clone.database)
        return Clone(clone)
    clone = url.set(database=_unique_name(url.database or "db", "clone"))
    admin = _maintenance_engine(url)
    try:
        async with admin.connect() as connection:
            await _terminate_sessions(connection, template.database)
            await connection.execute(
                text(f'CREATE DATABASE "{clone.database}" TEMPLATE "{template.database}"')
            )
    finally:
        await admin.dispose()
    return Clone(clone)


async def _terminate_sessions(connection: AsyncConnection, database: str | None) -> None:
    await connection.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :name AND pid <> pg_backend_pid()"
        ),
        {"name": database},
    )


async def _drop_postgres(url: URL) -> None:
    admin = _maintenance_engine(url)
    try:
        async with admin.connect() as connection:
            version = connection.dialect.server_version_info or (0,)
            if version >= (13,):
                await connection.execute(
                    text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
                )
            else:  # pragma: no cover - servers older than PostgreSQL 13
                await _terminate_sessions(connection, url.database)
                await connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}"'))
    finally:
        await admin.dispose()


def _sqlite_sibling(url: URL, kind: str) -> URL:
    assert url.database is not None
    source = Path(url.database)
    name = f"{source.stem}.{_unique_name('', kind).lstrip('_')}{source.suffix or '.db'}"
    return url.set(database=str(source.with_name(name)))


def _remove_sqlite(url: URL) -> None:
    assert url.database is not None
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(url.database + suffix).unlink(missing_ok=True)


async def drop_templates() -> None:
    """Drop every template database this process built (clone mode); call it once, at the end."""
    templates = list(_TEMPLATES.values())
    _TEMPLATES.clear()
    for template in templates:
        await Clone(template).drop()


def template_count() -> int:
    """How many templates this process holds (for tests of the plugin)."""
    return len(_TEMPLATES)
