"""Plain helpers the tests share (the fixtures are in ``conftest.py``).

Also imported by the fault benchmark (through :mod:`tests.faults`): nothing here needs
pytest.

``poll`` / ``eventually``
    bounded polling, for what offers no event to wait on (the server's view of a
    backend, a pool's gauge); every wait ends within its ``within`` seconds.
``checked_out``, ``count_users``
    what the pool and the ``users`` table say, read outside any scope.
``admin_engine``, ``terminate``
    an AUTOCOMMIT engine without a pool, to set up and check from outside the manager;
    ending a backend from the server's side.
``reset_tables``
    the tables of :mod:`tests.models`, dropped and created empty.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import SessionManager

from .models import Base, User


async def poll(check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.01) -> bool:
    """Call ``check`` every ``interval`` seconds until it is true: ``False`` if ``within`` passed.

    A ``check`` still running when the time is up is cancelled.
    """
    with anyio.move_on_after(within):
        while True:
            if await check():
                return True
            await anyio.sleep(interval)
    return False


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``check`` until it is true; fail with :exc:`TimeoutError` after ``within`` seconds."""
    if not await poll(check, within, interval):
        raise TimeoutError(f"still false after {within} s: {getattr(check, '__qualname__', check)}")


def checked_out(manager: SessionManager) -> int:
    """Connections currently checked out of the manager's primary pool."""
    stats = manager.statistics()
    assert stats.pool_checked_out is not None
    return stats.pool_checked_out


async def count_users(
    target: SessionManager | AsyncEngine, name: str | None = None, *, like: str | None = None
) -> int:
    """Rows of ``users`` (named ``name``, or with a name ``LIKE`` the pattern ``like``).

    Counted on a connection of its own, outside any scope: what is committed.
    """
    engine = target.engine if isinstance(target, SessionManager) else target
    query = select(func.count()).select_from(User)
    if name is not None:
        query = query.where(User.name == name)
    if like is not None:
        query = query.where(User.name.like(like))
    async with engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


async def reset_tables(engine: AsyncEngine) -> None:
    """Drop and create the tables of :mod:`tests.models`, empty."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


def admin_engine(url: str) -> AsyncEngine:
    """An AUTOCOMMIT engine for setup and checks: no pool, so a restart leaves nothing stale."""
    return create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


async def terminate(admin: AsyncEngine, pid: int) -> None:
    """Terminate backend ``pid`` (``pg_terminate_backend``) and wait until it is gone."""
    query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
    async with admin.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        async def gone() -> bool:
            return not await conn.scalar(query, {"pid": pid})

        await eventually(gone)
