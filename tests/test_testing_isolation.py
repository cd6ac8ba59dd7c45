"""``tasksession.testing`` without pytest's plugin: ``isolated()``, ``assert_no_leaks()``, ``bound_to``.

On PostgreSQL and SQLite (the ``db`` fixture): what savepoint isolation does at its
edges (a parent's commit while a scope it started still holds the connection, nested
savepoint scopes, readonly scopes, an outer commit), what ``bound_to`` restores, the
errors for bad input, and that a manager isolated in one event loop works in the next.
"""

# Assertions read `expected == actual`, as in the test suite (STYLE.md).

from __future__ import annotations

import asyncio
import os
import warnings
from typing import Any

import anyio
import pytest
from sqlalchemy import exc, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from tasksession import ReadOnlyScopeError, SessionManager
from tasksession.testing import (
    StrayEngineError,
    assert_no_leaks,
    create_clone,
    drop_templates,
    isolated,
)

from .helpers import admin_engine, reset_tables
from .models import Base, User

pytestmark = pytest.mark.anyio


async def users(db: SessionManager) -> list[str]:
    async with db.scope() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


async def test_nothing_persists_whatever_the_scopes_did(db: SessionManager) -> None:
    async with isolated(db):
        async with db.scope() as session:
            session.add(User(name="plain"))
        async with db.scope() as session:
            session.add(User(name="committed"))
            await session.commit()
            session.add(User(name="rolled back"))
            await session.flush()
            await session.rollback()
        async with db.scope() as session, db.scope(savepoint=True) as inner:
            assert inner is session
            session.add(User(name="in a savepoint scope"))
        assert ["committed", "in a savepoint scope", "plain"] == await users(db)
    assert [] == await users(db)


async def test_a_parent_waits_for_the_scope_it_started_before_ending(db: SessionManager) -> None:
    # Without the wait, the parent's RELEASE would also release the child's savepoint
    # (it was opened on top), and the child's own RELEASE would fail.
    child_wrote, child_may_end = anyio.Event(), anyio.Event()

    async def child() -> None:
        async with db.scope() as session:
            session.add(User(name="child"))
            await session.flush()
            child_wrote.set()
            await child_may_end.wait()

    with anyio.fail_after(10):
        async with isolated(db):
            async with db.scope() as session:
                session.add(User(name="parent"))
                await session.flush()
                task = asyncio.create_task(child())
                await child_wrote.wait()
                commit = asyncio.create_task(session.commit())
                for _ in range(20):  # the commit does not get past the child's savepoint
                    await asyncio.sleep(0)
                assert not commit.done()
                child_may_end.set()
                await commit
                await task
            assert ["child", "parent"] == await users(db)


async def test_a_readonly_scope_reads_the_test_data_and_refuses_writes(db: SessionManager) -> None:
    async with isolated(db):
        async with db.scope() as session:
            session.add(User(name="ada"))
        async with db.scope(readonly=True) as session:
            assert 1 == await session.scalar(select(func.count()).select_from(User))
            session.add(User(name="eve"))
            with pytest.raises(ReadOnlyScopeError):
                await session.flush()
            session.expunge_all()


async def test_committing_the_outer_transaction_is_refused(db: SessionManager) -> None:
    with pytest.raises(AssertionError, match="committed the test's outer transaction"):
        async with isolated(db):
            async with db.scope() as session:
                session.add(User(name="ada"))
                connection = await session.connection()
                await connection.exec_driver_sql("SELECT 1")
                outer = connection.get_transaction()
                assert outer is not None
                await outer.commit()  # the root transaction: a real COMMIT
    assert [] == await users(db)


async def test_bound_to_restores_the_configuration(db: SessionManager) -> None:
    engine = db.engine
    connection = await engine.connect()
    try:
        with pytest.raises(ValueError, match="inside a transaction"):
            async with db.bound_to(connection):
                pass
        await connection.begin()
        async with db.bound_to(connection) as engines:
            assert () == engines
            async with db.scope() as session:
                assert session.bind is connection
        async with db.scope() as session:
            assert session.bind is engine
    finally:
        await connection.close()


async def test_stray_engine_guard_ends_with_the_block(db: SessionManager) -> None:
    async with isolated(db):
        with pytest.raises(StrayEngineError, match=r"test_testing_isolation\.py"):
            async with db.engine.connect():
                pass
    async with db.engine.connect() as connection:  # after the block: allowed again
        await connection.execute(text("SELECT 1"))


async def test_the_leak_check_names_a_connection_left_checked_out(db: SessionManager) -> None:
    kept: list[Any] = []
    with pytest.raises(AssertionError, match=r"checked out at .*test_testing_isolation.py:\d+"):
        async with assert_no_leaks(db):
            kept.append(await db.engine.connect())
    await kept[0].close()


async def test_bad_input_says_what_to_do(db: SessionManager) -> None:
    with pytest.raises(ValueError, match="use 'savepoint'"):
        async with isolated(db, "rollback"):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="pass schema="):
        async with isolated(db, "clone"):
            pass
    with pytest.raises(TypeError, match="mode='clone' only"):
        async with isolated(db, schema=print):
            pass


async def test_clone_mode_needs_a_database_file() -> None:
    memory = SessionManager("sqlite+aiosqlite://")
    try:
        with pytest.raises(ValueError, match="copies a database file"):
            async with isolated(memory, "clone", schema=print):
                pass
    finally:
        await memory.dispose()


def test_a_manager_isolated_in_one_event_loop_works_in_the_next(database_url: str) -> None:
    # Test runners give tests new loops; a pooled asyncpg connection serves only its own.
    db = SessionManager(database_url)

    async def one_test(name: str) -> list[str]:
        async with isolated(db):
            async with db.scope() as session:
                session.add(User(name=name))
            return await users(db)

    async def create_tables() -> None:
        await reset_tables(db.engine)
        await db.engine.dispose()  # its connection belongs to this loop

    try:
        asyncio.run(create_tables())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unclosed connection would warn
            assert ["first"] == asyncio.run(one_test("first"))
            assert ["second"] == asyncio.run(one_test("second"))
    finally:
        asyncio.run(db.dispose())


async def test_an_applications_own_sqlite_engine_is_isolated_too(tmp_path: Any) -> None:
    # pysqlite's own transaction handling emits no BEGIN before a SAVEPOINT: without
    # SQLAlchemy's documented fix (tasksession applies it to engine= too), the test's
    # outer rollback would keep the rows.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/own.db")
    db = SessionManager(engine=engine)
    try:
        await reset_tables(engine)
        async with isolated(db):
            async with db.scope() as session:
                session.add(User(name="ada"))
            assert ["ada"] == await users(db)
        assert [] == await users(db)
    finally:
        await db.dispose()
        await engine.dispose()


@pytest.mark.postgres
async def templates_of_this_process(url: Any) -> set[str]:
    lister = admin_engine(url.render_as_string(hide_password=False))
    try:
        async with lister.connect() as connection:
            names = await connection.scalars(
                text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                {"p": f"%\\_tmpl\\_{os.getpid()}\\_%"},
            )
            return set(names)
    finally:
        await lister.dispose()


async def test_one_template_serves_every_clone_even_while_someone_uses_it(
    pg_db: SessionManager,
) -> None:
    # Built once per hook (`Base.metadata.create_all` is a new, equal bound method each
    # time it is read); PostgreSQL refuses to clone a database in use, so the sessions
    # on the template are terminated first. (Other tests of the run may have built
    # templates of their own: only this test's are counted.)
    url = pg_db.engine.url
    before = await templates_of_this_process(url)
    first = await create_clone(url, Base.metadata.create_all)
    second = None
    try:
        built = await templates_of_this_process(url) - before
        assert 1 == len(built)
        squatter = admin_engine(url.set(database=built.pop()))
        try:
            async with squatter.connect() as connection:
                await connection.execute(text("SELECT 1"))
                second = await create_clone(url, Base.metadata.create_all)
                assert 1 == len(await templates_of_this_process(url) - before)
                with pytest.raises(exc.DBAPIError):  # terminated to make the clone
                    await connection.execute(text("SELECT 1"))
        finally:
            await squatter.dispose()
    finally:
        await first.drop()
        if second is not None:
            await second.drop()
        await drop_templates()
