"""Test bed: real databases (PostgreSQL through asyncpg, SQLite through aiosqlite).

Fixtures:

``database_url``
    parametrized over ``sqlite`` (a file in the test's tmp dir) and ``postgres``.
``db``
    a configured :class:`SessionManager` on ``database_url`` with the test tables
    created; after the test it asserts that no connection is left checked out.
``pg_db``
    the same on PostgreSQL only.
``admin``
    an AUTOCOMMIT engine without a pool on PostgreSQL, to set up and check the server from
    outside the manager (a test module may override it to create its tables first).
``self_started``
    the PostgreSQL server, for tests that inject faults: skipped on a server the tests
    did not start.
``postgres_server``, ``postgres_url``, ``anyio_backend``
    in the repository's root ``conftest.py`` (shared with examples/).

Plain helpers (bounded polling, pool and row counts, ...) are in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tasksession import SessionManager

from .helpers import admin_engine, checked_out, reset_tables
from .models import User
from .postgres_server import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/test.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def self_started(postgres_server: PostgresServer) -> PostgresServer:
    """The PostgreSQL server, for tests that inject faults: only a cluster the tests started."""
    if not postgres_server.self_started:
        pytest.skip("injects faults: only on a PostgreSQL cluster the tests started")
    return postgres_server


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = admin_engine(postgres_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _managed(
    url: str, *, reset: bool = True, **options: Any
) -> AsyncIterator[SessionManager]:
    """A manager with ``options``; after the test, no connection checked out, no scope open.

    :param reset: create the tables of ``tests.models`` first (empty); without, the
        manager has not connected when the test starts.
    """
    db = SessionManager(url, **options)
    try:
        if reset:
            await reset_tables(db.engine)
        yield db
        assert checked_out(db) == 0, db.engine.sync_engine.pool.status()
        assert db.active_scopes() == []
    finally:
        await db.dispose()


async def seeded_readonly_autocommit(url: str, pool_size: int) -> AsyncIterator[SessionManager]:
    """A manager with ``readonly_autocommit=True`` (see ``_managed``), holding user 1 "ada"."""
    async for manager in _managed(url, readonly_autocommit=True, pool_size=pool_size):
        async with manager.scope() as session:
            session.add(User(id=1, name="ada"))
        yield manager


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[SessionManager]:
    async for manager in _managed(database_url):
        yield manager


@pytest.fixture
async def pg_db(postgres_url: str) -> AsyncIterator[SessionManager]:
    async for manager in _managed(postgres_url):
        yield manager


@pytest.fixture
async def make_manager(database_url: str) -> AsyncIterator[Any]:
    """Build extra managers on ``database_url`` with options; disposed after the test."""
    created: list[SessionManager] = []

    def make(url: str | None = None, **options: Any) -> SessionManager:
        manager = SessionManager(url or database_url, **options)
        created.append(manager)
        return manager

    try:
        yield make
    finally:
        for manager in created:
            await manager.dispose()
