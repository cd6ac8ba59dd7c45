"""The short ways a scope ends a unit (``_shortcuts``): same outcome as the long way.

A clean unit whose session has nothing for the ORM to do is committed at the
Connection level instead of through ``Session.commit()``; a read-only unit on
the AUTOCOMMIT pool is closed without a greenlet. Each test shows that the
short way is taken where it may be, that the outcome (what is persisted, what
listeners see, what is expired) is what ``Session.commit()`` gives, and that the
long way is kept wherever the short one would differ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import anyio
import pytest
from sqlalchemy import event, func, insert, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.orm import Session, SessionTransaction

from tasksession import SessionManager, _shortcuts, _teardown

from .conftest import _managed, seeded_readonly_autocommit
from .helpers import checked_out, reset_tables
from .models import User

pytestmark = pytest.mark.anyio


@contextmanager
def orm_commits() -> Iterator[mock.MagicMock]:
    """Count SessionTransaction.commit() calls (the ORM's own commit path)."""
    with mock.patch.object(
        SessionTransaction, "commit", autospec=True, side_effect=SessionTransaction.commit
    ) as spy:
        yield spy


async def names(db: SessionManager) -> list[str]:
    async with db.engine.connect() as conn:
        return list((await conn.scalars(select(User.name).order_by(User.name))).all())


# -- the commit shortcut -----------------------------------------------------------


async def test_a_core_write_in_a_clean_session_is_committed_the_short_way(
    db: SessionManager,
) -> None:
    commits: list[object] = []
    listener = commits.append
    event.listen(db.engine.sync_engine, "commit", listener)
    try:
        with orm_commits() as orm:
            async with db.scope() as session:
                # Written through Core: the ORM sees nothing to flush.
                await session.execute(insert(User).values(name="core"))
    finally:
        event.remove(db.engine.sync_engine, "commit", listener)
    assert 0 == orm.call_count  # the short way
    assert 1 == len(commits)  # engine events still see the COMMIT
    assert ["core"] == await names(db)
    assert 1 == db.statistics().commits


async def test_on_asyncpg_the_commit_needs_no_greenlet(postgres_url: str) -> None:
    # One pooled connection: the second unit reuses the first's, which must
    # have been left with no driver transaction.
    single = SessionManager(postgres_url, pool_size=1, max_overflow=0)
    try:
        await _two_units_through_the_driver(single)
    finally:
        await single.dispose()


async def _two_units_through_the_driver(single: SessionManager) -> None:
    await reset_tables(single.engine)
    for ident in (1, 2):
        scope = single.scope()
        session = await scope.__aenter__()
        await session.execute(insert(User).values(id=ident, name=f"driver{ident}"))
        with (
            mock.patch.object(_shortcuts, "greenlet_spawn", side_effect=AssertionError) as a,
            mock.patch.object(_teardown, "greenlet_spawn", side_effect=AssertionError) as b,
        ):
            await scope.__aexit__(None, None, None)
        a.assert_not_called()
        b.assert_not_called()
    assert ["driver1", "driver2"] == await names(single)
    assert 0 == checked_out(single)
    assert 2 == single.statistics().commits


async def test_a_pool_filled_during_the_driver_commit_closes_in_the_greenlet(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Both units find room in the pool before either COMMIT returns; the second
    # connection back finds the pool full and is closed: I/O, in a greenlet.
    db = SessionManager(postgres_url, pool_size=1, max_overflow=1)
    opened: list[Any] = []
    pool: Any = db.engine.sync_engine.pool
    event.listen(pool, "connect", lambda dbapi_connection, record: opened.append(dbapi_connection))
    try:
        await reset_tables(db.engine)
        both_written = anyio.Event()
        written: list[int] = []

        async def unit(ident: int) -> None:
            async with db.scope() as session:
                await session.execute(insert(User).values(id=ident, name=f"unit{ident}"))
                written.append(ident)
                if len(written) == 2:
                    both_written.set()
                with anyio.fail_after(10):
                    await both_written.wait()

        async with anyio.create_task_group() as group:
            group.start_soon(unit, 1)
            group.start_soon(unit, 2)
        assert ["unit1", "unit2"] == await names(db)
        assert 0 == pool.checkedout()
        assert 0 == pool.overflow()
        # One connection kept by the pool, the overflow one really closed.
        assert [False, True] == sorted(c._connection.is_closed() for c in opened)
        assert [] == [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await db.dispose()


async def test_a_unit_with_objects_to_flush_takes_the_orm_commit(db: SessionManager) -> None:
    with orm_commits() as orm:
        async with db.scope() as session:
            session.add(User(name="orm"))
    assert orm.call_count >= 1  # (the flush commits a subtransaction too)
    assert ["orm"] == await names(db)


async def test_session_commit_listeners_keep_the_orm_commit(db: SessionManager) -> None:
    seen: list[str] = []
    with orm_commits() as orm:
        async with db.scope() as session:
            await session.execute(insert(User).values(name="core"))
            sync = session.sync_session
            event.listen(sync, "before_commit", lambda s: seen.append("before"))
            event.listen(sync, "after_commit", lambda s: seen.append("after"))
    assert 1 == orm.call_count
    assert ["before", "after"] == seen
    assert ["core"] == await names(db)


async def test_expire_on_commit_keeps_the_orm_commit(make_manager: Any) -> None:
    expiring = make_manager(expire_on_commit=True)
    await reset_tables(expiring.engine)
    async with expiring.scope() as session:
        session.add(User(id=1, name="ada"))
    with orm_commits() as orm:
        async with expiring.scope() as session:
            user = await session.get(User, 1)
            assert user is not None
    assert 1 == orm.call_count
    assert "name" in inspect(user).expired_attributes


async def test_an_open_savepoint_keeps_the_orm_commit(db: SessionManager) -> None:
    with orm_commits() as orm:
        async with db.scope() as session:
            await session.begin_nested()  # never closed: the unit's commit releases it
            await session.execute(insert(User).values(name="nested"))
    assert orm.call_count >= 1
    assert ["nested"] == await names(db)


async def test_a_failed_flush_still_fails_the_clean_exit(db: SessionManager) -> None:
    # Session.commit() refuses a transaction a failed flush rolled back; the
    # short way must not turn that into a silent success.
    async with db.scope() as session:
        session.add(User(id=1, name="first"))
    with pytest.raises(sa_exc.PendingRollbackError):
        async with db.scope() as session:
            await session.execute(insert(User).values(id=2, name="lost"))
            session.add(User(id=1, name="duplicate"))
            with pytest.raises(sa_exc.IntegrityError):
                await session.flush()
    assert ["first"] == await names(db)
    assert 0 == checked_out(db)


async def test_a_failed_short_commit_rolls_back_and_raises(pg_db: SessionManager) -> None:
    # A deferred constraint fails at COMMIT, which the short way sends.
    async with pg_db.engine.begin() as conn:
        await conn.execute(
            text(
                "ALTER TABLE users DROP CONSTRAINT users_name_key, "
                "ADD CONSTRAINT users_name_unique UNIQUE (name) DEFERRABLE INITIALLY DEFERRED"
            )
        )
    with orm_commits() as orm, pytest.raises(sa_exc.IntegrityError):
        async with pg_db.scope() as session:
            await session.execute(insert(User).values(id=1, name="twin"))
            await session.execute(insert(User).values(id=2, name="twin"))
    assert 0 == orm.call_count
    assert [] == await names(pg_db)
    assert 0 == checked_out(pg_db)
    assert 1 == pg_db.statistics().rollbacks


# -- the close without I/O (readonly scopes on the AUTOCOMMIT pool) -----------------


@pytest.fixture
async def ro_db(postgres_url: str) -> AsyncIterator[SessionManager]:
    async for db in seeded_readonly_autocommit(postgres_url, pool_size=2):
        yield db


def readonly_checked_out(db: SessionManager) -> int:
    pool: Any = db._home.require_binding().readonly_engine.sync_engine.pool
    return int(pool.checkedout())


async def test_a_readonly_autocommit_unit_closes_without_a_teardown(
    ro_db: SessionManager,
) -> None:
    with mock.patch.object(_teardown, "_teardown", autospec=True) as teardown:
        async with ro_db.scope(readonly=True) as session:
            assert "ada" == (await session.get(User, 1)).name  # type: ignore[union-attr]
            assert 1 == readonly_checked_out(ro_db)
    teardown.assert_not_called()
    assert 0 == readonly_checked_out(ro_db)
    assert 1 == ro_db.statistics().rollbacks


@pytest.fixture
async def ro_db_of_one(postgres_url: str) -> AsyncIterator[SessionManager]:
    async for db in _managed(postgres_url, readonly_autocommit=True, pool_size=1, max_overflow=0):
        yield db


async def test_a_readonly_exit_hands_its_connection_to_a_waiting_task_first(
    ro_db_of_one: SessionManager,
) -> None:
    # The close without I/O returns the connection without a suspension; the exit
    # then yields once, so a task waiting for the pool takes the connection before
    # the exiting task goes on (else it sits in the queue while this task works on,
    # and under load more requests find the pool empty: benchmarks/bench_tornado).
    db = ro_db_of_one
    waiting = asyncio.Event()
    seen: list[int] = []

    async def waiter() -> None:
        async with db.scope(readonly=True) as session:
            waiting.set()  # the execute() below then waits for the only connection
            await session.execute(text("SELECT 1"))

    async with anyio.create_task_group() as tg:
        async with db.scope(readonly=True) as session:
            await session.execute(text("SELECT 1"))
            tg.start_soon(waiter)
            with anyio.fail_after(10):
                await waiting.wait()
        seen.append(readonly_checked_out(db))  # right after the exit: the waiter has it
    assert [1] == seen
    assert 0 == readonly_checked_out(db)


async def test_a_pool_listener_keeps_the_greenlet(ro_db: SessionManager) -> None:
    # A checkin listener may use the connection (here: a query, which needs the
    # greenlet); with one installed the close goes the long way.
    pool = ro_db._home.require_binding().readonly_engine.sync_engine.pool
    seen: list[Any] = []

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 41 + 1")
        seen.append(cursor.fetchone()[0])

    event.listen(pool, "checkin", on_checkin)
    try:
        async with ro_db.scope(readonly=True) as session:
            await session.get(User, 1)
    finally:
        event.remove(pool, "checkin", on_checkin)
    assert [42] == seen
    assert 0 == readonly_checked_out(ro_db)


async def test_an_overflow_connection_is_closed_in_the_greenlet(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Returned to a full pool, a connection is closed: I/O, so the long way.
    db = SessionManager(postgres_url, readonly_autocommit=True, pool_size=1, max_overflow=1)
    try:
        pool: Any = db._home.require_binding().readonly_engine.sync_engine.pool
        async with db.scope(readonly=True) as first:
            await first.execute(text("SELECT 1"))
            async with db.scope(readonly=True, independent=True) as second:
                await second.execute(text("SELECT 2"))
                assert 1 == pool.overflow()
        assert 0 == pool.checkedout()
        assert 0 == pool.overflow()  # the overflow connection was closed, not leaked
        assert [] == [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await db.dispose()


async def test_a_readonly_unit_outside_autocommit_rolls_back(pg_db: SessionManager) -> None:
    # The normal pool holds a driver transaction: closing it is a ROLLBACK (I/O).
    rollbacks: list[object] = []
    listener = rollbacks.append
    event.listen(pg_db.engine.sync_engine, "rollback", listener)
    try:
        async with pg_db.scope(readonly=True) as session:
            await session.scalar(select(func.count()).select_from(User))
    finally:
        event.remove(pg_db.engine.sync_engine, "rollback", listener)
    assert 1 == len(rollbacks)
    assert 0 == checked_out(pg_db)


# -- the internals the shortcuts read, on every supported SQLAlchemy ----------------


async def test_the_internals_the_shortcuts_read_exist(pg_db: SessionManager) -> None:
    async with pg_db.scope() as session:
        await session.execute(text("SELECT 1"))
        sync: Any = session.sync_session
        transaction = sync._transaction
        assert transaction._parent is None
        # keyed by engine and by connection: one entry, twice
        (entry,) = set(transaction._connections.values())
        connection, connection_transaction, should_commit, _autoclose = entry
        assert connection is (await session.connection()).sync_connection
        assert connection_transaction.is_active
        assert should_commit is True
        fairy = connection._dbapi_connection
        assert isinstance(fairy.dbapi_connection, AsyncAdapt_asyncpg_connection)
        assert fairy.dbapi_connection._transaction is not None  # BEGIN was sent
        assert fairy._pool is pg_db.engine.sync_engine.pool
        assert Session.commit is type(sync).commit
