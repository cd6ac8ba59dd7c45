"""Configuration (DESIGN.md "Configuration"), on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import ArgumentError, UnboundExecutionError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tasksession import (
    NotConfiguredError,
    PoolExhaustedError,
    SessionManager,
    UnsupportedBackendError,
    UnsupportedDriverError,
)

from .conftest import _managed
from .helpers import checked_out, count_users, reset_tables
from .models import User

pytestmark = pytest.mark.anyio


# -- unbound managers ----------------------------------------------------------------


async def test_unbound_manager_is_safe_to_create_and_says_what_to_call() -> None:
    db = SessionManager()
    assert not db.configured
    with pytest.raises(NotConfiguredError) as caught:
        async with db.scope():
            pass
    assert "configure(" in str(caught.value)
    assert isinstance(caught.value, UnboundExecutionError)
    with pytest.raises(NotConfiguredError):
        db.engine  # noqa: B018


async def test_configure_at_startup_binds_an_import_time_manager(database_url: str) -> None:
    db = SessionManager()
    db.configure(database_url)
    try:
        await reset_tables(db.engine)
        async with db.scope() as session:
            session.add(User(name="ada"))
        assert 1 == await count_users(db)
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    ("url", "suggested"),
    [
        ("postgresql://app@db.invalid/app", "postgresql+asyncpg://app@db.invalid/app"),
        ("postgresql+psycopg2://app@db.invalid/app", "postgresql+asyncpg://app@db.invalid/app"),
        ("sqlite:///app.db", "sqlite+aiosqlite:///app.db"),
        ("sqlite+pysqlite:///app.db", "sqlite+aiosqlite:///app.db"),
    ],
)
def test_sync_driver_url_is_refused_naming_the_async_driver(url: str, suggested: str) -> None:
    with pytest.raises(UnsupportedDriverError) as caught:
        SessionManager(url)
    assert suggested in str(caught.value)
    assert isinstance(caught.value, ArgumentError)
    db = SessionManager()
    with pytest.raises(UnsupportedDriverError):
        db.configure(url)
    assert not db.configured  # a failed configure leaves the manager as it was


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"guard": "sometimes"}, ValueError),
        ({"session_class": sa.orm.Session}, TypeError),
        ({"warn_after": 0}, ValueError),
        ({"replicas": "sqlite+aiosqlite://"}, TypeError),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        SessionManager("sqlite+aiosqlite://", **options)


def test_options_without_a_url_are_refused() -> None:
    with pytest.raises(TypeError, match="configure"):
        SessionManager(pool_size=5)


# -- engines ------------------------------------------------------------------------------


async def test_engine_passed_in_is_used_and_never_disposed_by_the_manager(
    database_url: str,
) -> None:
    engine = create_async_engine(database_url)
    try:
        disposed: list[Any] = []
        event.listen(engine.sync_engine, "engine_disposed", lambda e: disposed.append(e))
        async with SessionManager(engine=engine) as db:
            assert db.engine is engine
            async with db.scope() as session:
                assert 1 == await session.scalar(text("SELECT 1"))
        assert [] == disposed
    finally:
        await engine.dispose()


async def test_async_with_manager_disposes_its_engines(database_url: str) -> None:
    disposed: list[Any] = []
    async with SessionManager(database_url) as db:
        event.listen(db.engine.sync_engine, "engine_disposed", lambda e: disposed.append(e))
        async with db.scope() as session:
            await session.execute(text("SELECT 1"))
    assert 1 == len(disposed)


async def test_extra_keyword_arguments_go_to_create_async_engine(make_manager: Any) -> None:
    db = make_manager(pool_size=3, max_overflow=0)
    assert 3 == db.statistics().pool_size


async def test_reconfigure_with_open_scopes_warns_and_keeps_their_engine(
    tmp_path: Path,
) -> None:
    first, second = f"sqlite+aiosqlite:///{tmp_path}/a.db", f"sqlite+aiosqlite:///{tmp_path}/b.db"
    db = SessionManager(first)
    try:
        await reset_tables(db.engine)
        old_engine = db.engine
        async with db.scope() as session:
            session.add(User(name="ada"))
            with pytest.warns(RuntimeWarning, match="1 scope"):
                db.configure(second)
            await reset_tables(db.engine)
            async with db.scope(independent=True) as new_session:
                new_session.add(User(name="bob"))
            assert session.bind is not None
            assert old_engine.url == session.bind.url  # still on the first database
        async with old_engine.connect() as conn:
            assert ["ada"] == list((await conn.scalars(select(User.name))).all())
        async with db.engine.connect() as conn:
            assert ["bob"] == list((await conn.scalars(select(User.name))).all())
    finally:
        await db.dispose()


async def test_reconfigure_without_open_scopes_does_not_warn(tmp_path: Path) -> None:
    db = SessionManager(f"sqlite+aiosqlite:///{tmp_path}/a.db")
    try:
        db.configure(f"sqlite+aiosqlite:///{tmp_path}/b.db")  # warnings are errors here
    finally:
        await db.dispose()


# -- sessions ----------------------------------------------------------------------------


async def test_expire_on_commit_is_off_by_default_and_configurable(make_manager: Any) -> None:
    async with make_manager().scope() as session:
        assert session.sync_session.expire_on_commit is False
    async with make_manager(expire_on_commit=True).scope() as session:
        assert session.sync_session.expire_on_commit is True


class AuditedSession(AsyncSession):
    commits = 0

    def audit_label(self) -> str:
        return f"audited:{len(self.new)}"

    async def commit(self) -> None:
        AuditedSession.commits += 1
        await super().commit()


async def test_session_class_subclass_is_honoured(make_manager: Any) -> None:
    db = make_manager(session_class=AuditedSession)
    await reset_tables(db.engine)
    async with db.scope() as session:
        assert isinstance(session, AuditedSession)
        session.add(User(name="ada"))
        assert "audited:1" == session.audit_label()
        AuditedSession.commits = 0
    assert 1 == AuditedSession.commits  # the scope's commit went through the override
    assert 1 == await count_users(db)


# -- SQLite, the embedded default ------------------------------------------------------


async def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    async with SessionManager(f"sqlite+aiosqlite:///{tmp_path}/app.db") as db:
        async with db.scope() as session:
            assert "wal" == await session.scalar(text("PRAGMA journal_mode"))
            assert 30_000 == await session.scalar(text("PRAGMA busy_timeout"))


async def test_sqlite_concurrent_writers_wait_instead_of_failing(tmp_path: Path) -> None:
    async with SessionManager(f"sqlite+aiosqlite:///{tmp_path}/app.db") as db:
        await reset_tables(db.engine)
        first_holds_lock, release_first, second_started = (
            anyio.Event(),
            anyio.Event(),
            anyio.Event(),
        )

        async def first() -> None:
            async with db.scope() as session:
                session.add(User(name="ada"))
                await session.flush()  # BEGIN IMMEDIATE: holds the write lock
                first_holds_lock.set()
                await release_first.wait()

        async def second() -> None:
            await first_holds_lock.wait()
            async with db.scope() as session:
                second_started.set()
                # reads and then writes: with a deferred BEGIN the upgrade would
                # fail at once with "database is locked"
                await session.scalar(select(func.count()).select_from(User))
                session.add(User(name="bob"))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                tg.start_soon(second)
                await second_started.wait()
                release_first.set()
        assert 2 == await count_users(db)


async def test_savepoint_then_outer_rollback_persists_nothing(db: SessionManager) -> None:
    # Without the pysqlite BEGIN workaround, SQLite keeps a released savepoint's
    # rows after the enclosing transaction rolls back.
    with pytest.raises(LookupError):
        async with db.scope() as session:
            async with db.scope(savepoint=True):
                session.add(User(name="ada"))
            raise LookupError
    assert 0 == await count_users(db)


# -- backends ----------------------------------------------------------------------------


def test_entering_a_scope_under_trio_raises_unsupported_backend_error() -> None:
    db = SessionManager("sqlite+aiosqlite://")

    async def main() -> None:
        async with db.scope():
            pass

    with pytest.raises(UnsupportedBackendError, match="asyncio"):
        anyio.run(main, backend="trio")


def test_scope_works_on_the_asyncio_backend_with_plain_asyncio_run(tmp_path: Path) -> None:
    async def main() -> int:
        async with SessionManager(f"sqlite+aiosqlite:///{tmp_path}/a.db") as db:
            async with db.scope() as session:
                return int(await session.scalar(text("SELECT 41 + 1")) or 0)

    assert 42 == asyncio.run(main())


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_scopes_work_on_uvloop(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("uvloop", reason="uvloop is not available on this platform")
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/a.db"
        if backend == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )

    async def main() -> tuple[list[str], int]:
        import uvloop

        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with SessionManager(url) as db:
            await reset_tables(db.engine)
            async with db.scope() as session:
                session.add(User(name="ada"))
            with pytest.raises(LookupError):
                async with db.scope() as session:
                    session.add(User(name="bob"))
                    await session.flush()
                    raise LookupError
            with anyio.CancelScope() as cancel_scope:
                async with db.scope() as session:
                    session.add(User(name="cy"))
                    cancel_scope.cancel()
                    await anyio.sleep_forever()
            async with db.scope() as session:
                names = list((await session.scalars(select(User.name))).all())
            return names, checked_out(db)

    names, still_checked_out = anyio.run(
        main, backend="asyncio", backend_options={"use_uvloop": True}
    )
    assert (["ada"], 0) == (names, still_checked_out)


# -- the pool ----------------------------------------------------------------------------


@pytest.fixture
async def tiny_pool(database_url: str) -> AsyncIterator[SessionManager]:
    async for manager in _managed(database_url, pool_size=1, max_overflow=0, pool_timeout=0.2):
        yield manager


async def test_pool_exhaustion_names_the_scopes_holding_connections(
    tiny_pool: SessionManager,
) -> None:
    db = tiny_pool
    holding, done = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with db.scope(name="slow report") as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await done.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder, name="report-task")
            await holding.wait()
            with pytest.raises(PoolExhaustedError) as caught:
                async with db.scope(name="GET /users") as session:
                    await session.execute(text("SELECT 1"))
            done.set()
    error = caught.value
    assert isinstance(error, SQLAlchemyTimeoutError)
    assert ["slow report"] == [holder.name for holder in error.holders]
    assert "report-task" in str(error)
    assert "slow report" in str(error)
    assert 0 == checked_out(db)


# -- replicas and PgBouncer (PostgreSQL) -------------------------------------------------


@pytest.fixture
async def replica_url(postgres_url: str) -> str:
    url = sa.make_url(postgres_url)
    admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            exists = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = 'tasksession_replica'")
            )
            if not exists:
                await conn.execute(text("CREATE DATABASE tasksession_replica"))
    finally:
        await admin.dispose()
    return url.set(database="tasksession_replica").render_as_string(hide_password=False)


async def current_database(db: SessionManager, **scope_options: Any) -> str:
    async with db.scope(**scope_options) as session:
        return str(await session.scalar(text("SELECT current_database()")))


async def test_readonly_scopes_read_from_replicas(postgres_url: str, replica_url: str) -> None:
    async with SessionManager(postgres_url, replicas=[replica_url]) as db:
        assert "tasksession_replica" == await current_database(db, readonly=True)
        assert "tasksession_test" == await current_database(db)


async def test_readonly_scope_after_a_write_reads_the_primary(
    postgres_url: str, replica_url: str
) -> None:
    async with SessionManager(postgres_url, replicas=[replica_url]) as db:
        await reset_tables(db.engine)
        async with db.scope() as session:
            session.add(User(name="ada"))
        # read-your-writes: this task just committed, the replica may lag
        assert "tasksession_test" == await current_database(db, readonly=True)

        async def elsewhere() -> str:
            return await current_database(db, readonly=True)

        # a task that did not write (a fresh context) reads from the replica
        other = asyncio.get_running_loop().create_task(elsewhere(), context=contextvars.Context())
        assert "tasksession_replica" == await other


async def test_pgbouncer_preset_disables_prepared_statement_caches(postgres_url: str) -> None:
    async with SessionManager(postgres_url, pgbouncer=True) as db:
        assert "0" == db.engine.url.query["prepared_statement_cache_size"]
        async with db.scope() as session:
            for _ in range(3):  # statements work without any server-side cache
                assert 1 == await session.scalar(text("SELECT 1"))
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            assert 0 == driver._stmt_cache.get_max_size()


def test_pgbouncer_preset_needs_asyncpg() -> None:
    with pytest.raises(ValueError, match="asyncpg"):
        SessionManager("sqlite+aiosqlite://", pgbouncer=True)
