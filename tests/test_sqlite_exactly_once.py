"""SQLite, the embedded default: every unit ends exactly once (issue 13, point 5).

(a) ``isolation_level="AUTOCOMMIT"`` really autocommits: no BEGIN, writes persist,
    readers hold no lock (and a readonly scope still cannot write);
(b) overlapping scopes on one shared connection (``sqlite+aiosqlite://``) take
    turns instead of undoing each other's work; pools that would lose data are refused;
(c) an application's own ``engine=`` gets the same setup (WAL, busy timeout, BEGIN
    IMMEDIATE for writable scopes), and a writable scope's session is bound to the
    engine itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, StaticPool

from tasksession import PoolExhaustedError, SessionManager

from .helpers import count_users, reset_tables
from .models import User

pytestmark = pytest.mark.anyio

INSERT_ADA = text("INSERT INTO users (name) VALUES ('ada')")


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL sent on ``engine``'s connections while the block runs."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def begins(sent: list[str]) -> list[str]:
    return [statement for statement in sent if statement.startswith("BEGIN")]


@pytest.fixture
async def autocommit_db(tmp_path: Path) -> AsyncIterator[SessionManager]:
    async with SessionManager(
        f"sqlite+aiosqlite:///{tmp_path}/app.db", isolation_level="AUTOCOMMIT"
    ) as db:
        await reset_tables(db.engine)
        yield db


@pytest.fixture
async def user_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An application's own engine on a database file (SQLAlchemy's defaults)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/own.db")
    try:
        await reset_tables(engine)
        yield engine
    finally:
        await engine.dispose()


# -- (a) AUTOCOMMIT ----------------------------------------------------------------------


async def test_autocommit_engine_sends_no_begin(autocommit_db: SessionManager) -> None:
    with statements(autocommit_db.engine) as sent:
        async with autocommit_db.scope() as session:
            await session.execute(INSERT_ADA)
        async with autocommit_db.scope(readonly=True) as session:
            await session.scalar(select(func.count()).select_from(User))
    assert [] == begins(sent)


async def test_autocommit_engine_write_persists_although_the_scope_fails(
    autocommit_db: SessionManager,
) -> None:
    with pytest.raises(LookupError):
        async with autocommit_db.scope() as session:
            await session.execute(INSERT_ADA)
            raise LookupError
    assert 1 == await count_users(autocommit_db.engine)


async def test_autocommit_engine_reader_holds_no_write_lock(
    autocommit_db: SessionManager,
) -> None:
    # A writer that would fail at once on a held write lock (no busy wait).
    impatient = create_async_engine(autocommit_db.engine.url, connect_args={"timeout": 0})
    try:
        with anyio.fail_after(10):
            async with autocommit_db.scope() as session:
                assert 0 == await session.scalar(select(func.count()).select_from(User))
                async with impatient.begin() as conn:  # the scope is still open
                    await conn.execute(INSERT_ADA)
        assert 1 == await count_users(autocommit_db.engine)
    finally:
        await impatient.dispose()


async def test_autocommit_connection_option_in_a_scope_persists_although_the_scope_fails(
    tmp_path: Path,
) -> None:
    async with SessionManager(f"sqlite+aiosqlite:///{tmp_path}/app.db") as db:
        await reset_tables(db.engine)
        with pytest.raises(LookupError):
            async with db.scope() as session:
                await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                await session.execute(INSERT_ADA)
                raise LookupError
        assert 1 == await count_users(db.engine)


async def test_autocommit_connection_of_the_application_persists_without_commit(
    tmp_path: Path,
) -> None:
    async with SessionManager(f"sqlite+aiosqlite:///{tmp_path}/app.db") as db:
        await reset_tables(db.engine)
        async with db.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(INSERT_ADA)
        assert 1 == await count_users(db.engine)


async def test_autocommit_readonly_scope_cannot_write(autocommit_db: SessionManager) -> None:
    with pytest.raises(OperationalError, match="readonly database"):
        async with autocommit_db.scope(readonly=True) as session:
            await session.execute(INSERT_ADA)
    assert 0 == await count_users(autocommit_db.engine)


async def test_autocommit_write_after_a_readonly_scope_on_the_same_connection_is_visible_at_once(
    tmp_path: Path,
) -> None:
    # One pooled connection: the readonly scope's query_only must not outlive it.
    async with SessionManager(
        f"sqlite+aiosqlite:///{tmp_path}/app.db",
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
    ) as db:
        await reset_tables(db.engine)
        async with db.scope(readonly=True) as session:
            await session.scalar(select(func.count()).select_from(User))
        reader = create_async_engine(db.engine.url, poolclass=NullPool)
        try:
            async with db.scope() as session:
                await session.execute(INSERT_ADA)
                assert 1 == await count_users(reader)  # committed by itself, scope still open
        finally:
            await reader.dispose()


# -- (b) one connection, overlapping scopes -------------------------------------------------


async def overlap(db: SessionManager) -> list[BaseException | None]:
    """Two scopes that each insert a row; the second starts while the first holds its write.

    Returns each scope's outcome (``None``: it returned normally).
    """
    outcomes: list[BaseException | None] = [None, None]
    first_wrote, second_started, second_done = anyio.Event(), anyio.Event(), anyio.Event()

    async def first() -> None:
        try:
            async with db.scope() as session:
                session.add(User(name="ada"))
                await session.flush()
                first_wrote.set()
                await second_started.wait()
                # Until the second waits for the connection, or (sharing it) is done:
                # the pool's gauge has no event to wait for, so check it every turn.
                pool: Any = db.engine.sync_engine.pool
                while not second_done.is_set() and not getattr(pool, "waiting", int)():
                    await anyio.lowlevel.checkpoint()
        except Exception as error:
            outcomes[0] = error

    async def second() -> None:
        await first_wrote.wait()
        try:
            async with db.scope() as session:
                second_started.set()
                session.add(User(name="bob"))
                await session.flush()
        except Exception as error:
            outcomes[1] = error
        finally:
            second_started.set()
            second_done.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
    return outcomes


@pytest.mark.parametrize("poolclass", [None, StaticPool])
async def test_overlapping_scopes_on_one_connection_take_turns_and_both_commit(
    poolclass: Any, tmp_path: Path
) -> None:
    options = {} if poolclass is None else {"poolclass": poolclass}
    url = "sqlite+aiosqlite://" if poolclass is None else f"sqlite+aiosqlite:///{tmp_path}/a.db"
    async with SessionManager(url, **options) as db:
        await reset_tables(db.engine)
        assert [None, None] == await overlap(db)
        assert (2, 2) == (await count_users(db.engine), db.statistics().commits)


async def test_a_scope_waiting_past_pool_timeout_fails_and_the_holder_commits() -> None:
    async with SessionManager("sqlite+aiosqlite://", pool_timeout=0.2) as db:
        await reset_tables(db.engine)
        holder_wrote, waiter_done = anyio.Event(), anyio.Event()
        failures: list[BaseException] = []

        async def holder() -> None:
            async with db.scope() as session:
                session.add(User(name="ada"))
                await session.flush()
                holder_wrote.set()
                await waiter_done.wait()

        async def waiter() -> None:
            await holder_wrote.wait()
            try:
                async with db.scope() as session:
                    session.add(User(name="bob"))
                    await session.flush()
            except Exception as error:
                failures.append(error)
            finally:
                waiter_done.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                tg.start_soon(waiter)
        assert [PoolExhaustedError] == [type(failure) for failure in failures]
        assert "one SQLite connection" in str(failures[0])
        assert (1, 1) == (await count_users(db.engine), db.statistics().commits)


async def test_cancelling_a_scope_that_waits_for_the_connection_loses_nothing() -> None:
    async with SessionManager("sqlite+aiosqlite://") as db:
        await reset_tables(db.engine)
        pool: Any = db.engine.sync_engine.pool
        holder_wrote, waiter_done = anyio.Event(), anyio.Event()
        waiter_scope = anyio.CancelScope()

        async def holder() -> None:
            async with db.scope() as session:
                session.add(User(name="ada"))
                await session.flush()
                holder_wrote.set()
                while not waiter_done.is_set() and not getattr(pool, "waiting", int)():
                    await anyio.lowlevel.checkpoint()
                waiter_scope.cancel()
                await waiter_done.wait()

        async def waiter() -> None:
            await holder_wrote.wait()
            try:
                with waiter_scope:
                    async with db.scope() as session:
                        session.add(User(name="bob"))
                        await session.flush()
            finally:
                waiter_done.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                tg.start_soon(waiter)
        outcome = (waiter_scope.cancelled_caught, await count_users(db.engine))
        assert (True, 1) == outcome
        assert (1, 0) == (db.statistics().commits, db.statistics().pool_checked_out)


@pytest.mark.parametrize(
    "options",
    [
        {"poolclass": NullPool},
        {"poolclass": AsyncAdaptedQueuePool},
        {"pool_size": 5},
        {"max_overflow": 1},
    ],
    ids=["NullPool", "QueuePool", "pool_size", "max_overflow"],
)
def test_in_memory_url_with_a_pool_of_several_connections_is_refused(
    options: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match=r"in-memory|separate, empty database"):
        SessionManager("sqlite+aiosqlite://", **options)


@pytest.mark.parametrize("database", ["", "/{tmp_path}/a.db"], ids=["memory", "file"])
async def test_engine_whose_pool_shares_one_connection_is_refused(
    database: str, tmp_path: Path
) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite://{database.format(tmp_path=tmp_path)}", poolclass=StaticPool
    )
    try:
        with pytest.raises(ValueError, match="pool_size=1, max_overflow=0"):
            SessionManager(engine=engine)
    finally:
        await engine.dispose()


async def test_in_memory_engine_with_several_connections_is_refused() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool)
    try:
        with pytest.raises(ValueError, match="separate, empty database"):
            SessionManager(engine=engine)
    finally:
        await engine.dispose()


# -- (c) an application's engine=, and what sessions are bound to ---------------------------


async def test_user_engine_gets_wal_and_the_busy_timeout(user_engine: AsyncEngine) -> None:
    db = SessionManager(engine=user_engine)
    async with db.scope() as session:
        mode = await session.scalar(text("PRAGMA journal_mode"))
        timeout = await session.scalar(text("PRAGMA busy_timeout"))
    assert ("wal", 30_000) == (mode, timeout)


async def test_user_engine_connection_pooled_before_configure_gets_the_busy_timeout(
    tmp_path: Path,
) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path}/own.db", pool_size=1, max_overflow=0
    )
    try:
        async with engine.connect() as conn:  # the one connection, pooled from now on
            await conn.execute(text("SELECT 1"))
        db = SessionManager(engine=engine)
        async with db.scope() as session:
            assert 30_000 == await session.scalar(text("PRAGMA busy_timeout"))
    finally:
        await engine.dispose()


async def test_user_engine_begins_immediate_for_writable_scopes_only(
    user_engine: AsyncEngine,
) -> None:
    db = SessionManager(engine=user_engine)
    with statements(user_engine) as sent:
        async with db.scope() as session:
            await session.execute(INSERT_ADA)
            async with user_engine.connect() as conn:  # the application's own connection
                await conn.execute(text("SELECT 1"))
        async with db.scope(readonly=True) as session:
            await session.execute(text("SELECT 1"))
    assert ["BEGIN IMMEDIATE", "BEGIN", "BEGIN"] == begins(sent)


async def test_user_engine_savepoint_then_outer_rollback_persists_nothing(
    user_engine: AsyncEngine,
) -> None:
    # sqlite3's legacy transaction control would let the released savepoint escape.
    db = SessionManager(engine=user_engine)
    with pytest.raises(LookupError):
        async with db.scope() as session:
            async with db.scope(savepoint=True):
                session.add(User(name="ada"))
            raise LookupError
    assert 0 == await count_users(user_engine)


async def test_user_engine_with_sqlalchemys_begin_recipe_gets_wal_and_keeps_its_begin(
    user_engine: AsyncEngine,
) -> None:
    # SQLAlchemy's documented recipe for SAVEPOINTs on aiosqlite, set up before configure().
    sync_engine = user_engine.sync_engine
    event.listen(
        sync_engine, "connect", lambda dbapi, record: setattr(dbapi, "isolation_level", None)
    )
    event.listen(sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    await user_engine.dispose()  # new connections, with the recipe's setting
    db = SessionManager(engine=user_engine)
    with statements(user_engine) as sent:
        async with db.scope() as session:
            await session.execute(INSERT_ADA)
            mode = await session.scalar(text("PRAGMA journal_mode"))
    assert (["BEGIN"], "wal", 1) == (begins(sent), mode, await count_users(user_engine))


@pytest.mark.parametrize("configured_with", ["url", "engine"])
async def test_writable_scope_session_is_bound_to_the_engine_itself(
    configured_with: str, user_engine: AsyncEngine
) -> None:
    if configured_with == "engine":
        db = SessionManager(engine=user_engine)
    else:
        db = SessionManager(user_engine.url)
    try:
        async with db.scope() as session:
            conn = await session.connection()
            bound = (
                session.bind is db.engine,
                session.get_bind() is db.engine.sync_engine,
                conn.engine is db.engine,
            )
        assert (True, True, True) == bound
    finally:
        await db.dispose()
