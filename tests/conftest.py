"""Test bed: real databases (PostgreSQL through asyncpg, SQLite through aiosqlite).

Fixtures:

``database_url``
    parametrized over ``sqlite`` (a file in the test's tmp dir) and ``postgres``.
``db``
    a configured :class:`SessionManager` on ``database_url`` with the test tables
    created; after the test it asserts that no connection is left checked out.
``pg_db``
    the same on PostgreSQL only.
``postgres_server``, ``postgres_url``, ``anyio_backend``
    in the repository's root ``conftest.py`` (shared with examples/).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tasksession import SessionManager

from .models import Base, User
from .postgres_server import PostgresServer


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/test.db"
    return str(request.getfixturevalue("postgres_url"))


async def reset_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it is true; fail after 10 seconds."""
    with anyio.fail_after(10):
        while True:
            if await check():
                return
            await anyio.sleep(0.01)


@pytest.fixture
def self_started(postgres_server: PostgresServer) -> PostgresServer:
    """The PostgreSQL server, for tests that inject faults: only a cluster the tests started."""
    if not postgres_server.self_started:
        pytest.skip("injects faults: only on a PostgreSQL cluster the tests started")
    return postgres_server


def checked_out(manager: SessionManager) -> int:
    """Connections currently checked out of the manager's primary pool."""
    stats = manager.statistics()
    assert stats.pool_checked_out is not None
    return stats.pool_checked_out


async def _managed(url: str, **options: Any) -> AsyncIterator[SessionManager]:
    manager = SessionManager(url, **options)
    try:
        await reset_tables(manager.engine)
        yield manager
        assert checked_out(manager) == 0, manager.engine.sync_engine.pool.status()
        assert manager.active_scopes() == []
    finally:
        await manager.dispose()


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
