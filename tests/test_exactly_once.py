"""Every unit ends exactly once, and its caller knows how (issue: "exactly once").

Faults are real: a PostgreSQL backend paused with SIGSTOP while its COMMIT is
under way (the COMMIT sits unanswered in its socket), the postmaster paused
too (a stalled server: new connections hang), native cancellations landing
inside COMMIT. Each test resumes what it paused in a ``finally`` block, and
only after the behaviour under test was observed, so a scope that waited for
the server would hang the test (bounded by ``fail_after``), not pass it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import (
    CommitOutcomeUnknownError,
    NoScopeError,
    ReadOnlyScopeError,
    RetryPolicy,
    SessionManager,
)

from .gate import Gate
from .helpers import checked_out, eventually, reset_tables
from .models import User
from .postgres_server import PostgresServer

pytestmark = pytest.mark.anyio

APP = "ts-exactly-once"


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        await engine.dispose()


async def make_db(postgres_url: str, **options: Any) -> SessionManager:
    connect_args = dict(options.pop("connect_args", {}))
    connect_args["server_settings"] = {"application_name": APP}
    db = SessionManager(postgres_url, connect_args=connect_args, **options)
    await reset_tables(db.engine)
    return db


@contextlib.contextmanager
def paused(*pids: int) -> Iterator[list[int]]:
    """SIGSTOP on entry of the pids added to the yielded list; SIGCONT on exit, always."""
    stopped: list[int] = list(pids)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def users_named(admin: AsyncEngine, name: str) -> int:
    async with admin.connect() as conn:
        return int(
            await conn.scalar(text("SELECT count(*) FROM users WHERE name LIKE :n"), {"n": name})
            or 0
        )


async def assert_clean(db: SessionManager, admin: AsyncEngine) -> None:
    async def drained() -> bool:
        return checked_out(db) == 0

    async def nothing_open_on_the_server() -> bool:
        async with admin.connect() as conn:
            busy = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                    "AND (state = 'active' OR state LIKE 'idle in transaction%')"
                ),
                {"app": APP},
            )
        return not busy

    await eventually(drained)
    await eventually(nothing_open_on_the_server)
    assert [] == db.active_scopes()


# -- 1. a COMMIT whose answer never came is reported unknown, never retried ---------------


async def test_a_commit_timed_out_by_the_driver_is_reported_unknown_and_never_retried(
    postgres_url: str, admin: AsyncEngine, self_started: PostgresServer
) -> None:
    db = await make_db(postgres_url, connect_args={"command_timeout": 0.3})
    pids: list[int] = []
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=3, backoff=0, exceptions=(TimeoutError,)))
    async def add_user() -> None:
        attempts.append(1)
        session = db.session
        pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
        session.add(User(name=f"timed-out-{len(attempts)}"))
        await session.flush()
        pids.append(pid)
        os.kill(pid, signal.SIGSTOP)  # the COMMIT that follows gets no answer in time

    try:
        with anyio.fail_after(10), pytest.raises(CommitOutcomeUnknownError) as caught:
            await add_user()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        assert 1 == len(attempts)  # never retried, although TimeoutError is in the policy
        assert isinstance(caught.value.original, TimeoutError)
        assert caught.value.__cause__ is caught.value.original
        assert "may or may not have committed" in str(caught.value)
        # The server did commit it once resumed: exactly one row, not three.
        await eventually(lambda: _equals(users_named(admin, "timed-out-%"), 1))
        await assert_clean(db, admin)
    finally:
        await db.dispose()


async def _equals(count: Any, expected: int) -> bool:
    return bool(await count == expected)


async def test_a_driver_level_commit_that_gets_no_answer_is_reported_unknown(
    postgres_url: str, admin: AsyncEngine, self_started: PostgresServer
) -> None:
    # Nothing for the ORM to do at exit: the COMMIT goes straight through asyncpg.
    db = await make_db(postgres_url, commit_timeout=0.3)
    scope = db.scope(name="driver-commit")
    try:
        with paused() as stopped:
            with anyio.fail_after(10), pytest.raises(CommitOutcomeUnknownError) as caught:
                async with scope as session:
                    await session.execute(text("INSERT INTO users (id, name) VALUES (1, 'drv')"))
                    pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            assert "unknown" == scope.outcome
            assert "commit_timeout=0.3" in str(caught.value)
        await eventually(lambda: _equals(users_named(admin, "drv"), 1))
        await assert_clean(db, admin)
        assert 0 == db.statistics().commits
    finally:
        await db.dispose()


# -- 6. a stalled COMMIT is bounded ---------------------------------------------------------


@pytest.mark.parametrize("deadline", ["anyio", "asyncio"])
async def test_commit_timeout_bounds_a_stalled_commit_inside_a_deadline(
    postgres_url: str, admin: AsyncEngine, self_started: PostgresServer, deadline: str
) -> None:
    db = await make_db(postgres_url, commit_timeout=0.3)
    gate = Gate(db.engine, "commit")  # the long commit path, through Session.commit()
    outcome: BaseException | None = None
    try:
        with paused() as stopped, gate:
            gate.arm()

            async def unit() -> None:
                async with db.scope() as session:
                    session.add(User(id=7, name="stalled"))
                    await session.flush()
                    stopped.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))

            async def pause_the_backend_at_commit() -> None:
                await gate.reached.wait()
                os.kill(stopped[-1], signal.SIGSTOP)
                gate.open()

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pause_the_backend_at_commit)
                    try:
                        if deadline == "anyio":
                            with anyio.fail_after(0.1):
                                await unit()
                        else:
                            async with asyncio.timeout(0.1):
                                await unit()
                    except BaseException as error:
                        outcome = error
            # Returned while the backend is still paused: the wait was bounded.
        # The deadline passed while the COMMIT was under way; the COMMIT was not
        # cut off half-way, and what reaches the caller says the outcome is unknown.
        assert outcome is not None
        unknown = isinstance(outcome, CommitOutcomeUnknownError) or (
            getattr(outcome, "tasksession_outcome", None) == "unknown"
            or getattr(outcome.__context__, "tasksession_outcome", None) == "unknown"
        )
        assert unknown, repr(outcome)
        await assert_clean(db, admin)
    finally:
        await db.dispose()


async def test_commit_timeout_must_be_positive(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="commit_timeout"):
        SessionManager(postgres_url, commit_timeout=0)


# -- 8. a native cancel inside COMMIT says the unit committed --------------------------------


@pytest.mark.parametrize("kind", ["task_cancel", "asyncio_timeout"])
async def test_a_native_cancel_inside_commit_says_the_unit_committed(
    postgres_url: str, admin: AsyncEngine, kind: str
) -> None:
    db = await make_db(postgres_url)
    gate = Gate(db.engine, "commit")
    scope = db.scope(name="cancelled-in-commit")

    async def unit() -> None:
        async with scope as session:
            session.add(User(id=8, name="committed-then-cancelled"))

    try:
        with gate:
            gate.arm()
            if kind == "task_cancel":
                task = asyncio.create_task(unit())
                with anyio.fail_after(10):
                    await gate.reached.wait()
                task.cancel()
                gate.open()
                with anyio.fail_after(10), pytest.raises(asyncio.CancelledError) as caught:
                    await task
                cancelled = caught.value
            else:

                async def open_when_reached() -> None:
                    await gate.reached.wait()
                    await asyncio.sleep(0.05)  # past the deadline, then let the COMMIT answer
                    gate.open()

                helper = asyncio.create_task(open_when_reached())
                with anyio.fail_after(10), pytest.raises(TimeoutError) as timed_out:
                    async with asyncio.timeout(0.01):
                        await unit()
                await helper
                context = timed_out.value.__context__
                assert isinstance(context, asyncio.CancelledError)
                cancelled = context
        assert "committed" == getattr(cancelled, "tasksession_outcome", None)
        assert any("COMMITTED" in note for note in getattr(cancelled, "__notes__", []))
        assert "committed" == scope.outcome
        assert 1 == await users_named(admin, "committed-then-cancelled")
    finally:
        await db.dispose()


async def test_a_cancelled_unit_that_rolled_back_says_so(pg_db: SessionManager) -> None:
    db = pg_db
    started = anyio.Event()

    async def unit() -> None:
        async with db.scope() as session:
            session.add(User(id=9, name="rolled-back"))
            await session.flush()
            started.set()
            await anyio.sleep_forever()

    task = asyncio.create_task(unit())
    with anyio.fail_after(10):
        await started.wait()
    task.cancel()
    with anyio.fail_after(10), pytest.raises(asyncio.CancelledError) as caught:
        await task
    assert "rolled back" == getattr(caught.value, "tasksession_outcome", None)


# -- 2. an async generator's scope does not leak to the code iterating it -----------------


async def test_a_scope_opened_in_a_suspended_async_generator_is_not_the_consumers(
    db: SessionManager,
) -> None:
    async def rows() -> AsyncIterator[int]:
        # readonly: on SQLite a writable scope would hold the write lock meanwhile
        async with db.scope(name="generator", readonly=True):
            await db.session.execute(select(func.count(User.id)))
            yield 1
            yield 2

    generator = rows()
    assert 1 == await generator.__anext__()
    # Between iterations the generator's scope is not visible...
    with pytest.raises(NoScopeError, match="async generator"):
        _ = db.session
    # ...and a scope of the consumer's own is its own unit.
    async with db.scope(name="consumer") as session:
        assert session is db.session
        session.add(User(name="consumer"))
    await generator.aclose()  # rolls the generator's scope back
    async with db.scope(readonly=True) as session:
        assert ["consumer"] == list(await session.scalars(select(User.name)))


async def test_inside_the_generator_its_scope_is_still_current(db: SessionManager) -> None:
    seen: list[Any] = []

    async def rows() -> AsyncIterator[int]:
        async with db.scope() as session:
            for value in range(2):
                seen.append(db.session is session)
                async with db.scope() as joined:  # joins: this is the generator's own code
                    seen.append(joined is session)
                yield value

    assert [0, 1] == [value async for value in rows()]
    assert [True, True, True, True] == seen


async def test_an_asynccontextmanager_scope_covers_its_with_block(db: SessionManager) -> None:
    @contextlib.asynccontextmanager
    async def unit() -> AsyncIterator[Any]:
        async with db.scope(name="wrapped") as session:
            yield session

    async with unit() as session:
        assert session is db.session
        async with db.scope() as joined:
            assert joined is session
        session.add(User(name="wrapped"))
    async with db.scope(readonly=True) as session:
        assert ["wrapped"] == list(await session.scalars(select(User.name)))


# -- 4. readonly scopes refuse unflushed writes ----------------------------------------------


async def test_an_unflushed_add_in_a_readonly_scope_is_refused_at_exit(db: SessionManager) -> None:
    with pytest.raises(ReadOnlyScopeError, match="never flushed"):
        async with db.scope(readonly=True) as session:
            await session.execute(select(func.count(User.id)))
            session.add(User(name="lost"))
    with pytest.raises(ReadOnlyScopeError, match="never flushed"):
        async with db.scope(readonly=True) as session:
            session.add(User(name="lost"))  # no statement ran: no transaction either
    async with db.scope(readonly=True) as session:
        assert 0 == await session.scalar(select(func.count(User.id)))
    assert 0 == checked_out(db)


# -- 12. scopes exited out of order ------------------------------------------------------------


async def test_after_scopes_exited_out_of_order_session_raises_no_scope_error(
    db: SessionManager,
) -> None:
    outer = db.scope(name="outer")
    inner = db.scope(name="inner", independent=True)
    await outer.__aenter__()
    inner_session = await inner.__aenter__()
    await outer.__aexit__(None, None, None)
    assert inner_session is db.session  # the inner scope is still open
    await inner.__aexit__(None, None, None)
    with pytest.raises(NoScopeError, match="out of order"):
        _ = db.session
    async with db.scope() as session:  # a new scope is an own scope, not a join
        assert session is db.session
        assert session is not inner_session


# -- 10. a scope never exited is reported and gives its connection back --------------------


async def test_a_scope_dropped_without_exit_is_reported_and_returns_its_connection(
    postgres_url: str, admin: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    db = await make_db(postgres_url)

    async def forget_to_exit() -> None:
        scope = db.scope(name="never-exited")
        session = await scope.__aenter__()
        await session.execute(text("SELECT 1"))  # holds a connection, idle in transaction

    try:
        await asyncio.create_task(forget_to_exit())
        assert 1 == checked_out(db)
        for _ in range(3):  # let the loop drop its last handle on the finished task
            await asyncio.sleep(0)
        with (
            caplog.at_level(logging.ERROR, logger="tasksession"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) for w in caught), caught
        assert any("never-exited" in record.getMessage() for record in caplog.records)
        assert any("forget_to_exit" in record.getMessage() for record in caplog.records)
        await assert_clean(db, admin)
    finally:
        await db.dispose()


# -- 7. a stalled network does not extend a cancelled caller's deadline -------------------


@pytest.mark.parametrize("deadline", ["anyio", "asyncio"])
async def test_a_cancel_request_over_a_stalled_server_does_not_extend_the_deadline(
    postgres_url: str, admin: AsyncEngine, self_started: PostgresServer, deadline: str
) -> None:
    db = await make_db(postgres_url, pool_size=2)
    assert self_started.data_dir is not None
    postmaster = int((self_started.data_dir / "postmaster.pid").read_text().split()[0])
    try:
        with paused() as stopped:

            async def unit() -> None:
                async with db.scope() as session:
                    stopped.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
                    # The server stops answering, and accepts no new connection either.
                    os.kill(stopped[0], signal.SIGSTOP)
                    os.kill(postmaster, signal.SIGSTOP)
                    stopped.append(postmaster)
                    await session.execute(text("SELECT 1"))

            # Less than the old wait (the graceful close's 2 s plus the cancel
            # request's 5 s): the scope must return without the server.
            with anyio.fail_after(1.5):
                if deadline == "anyio":
                    with anyio.move_on_after(0.1):
                        await unit()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await unit()
        await assert_clean(db, admin)
    finally:
        await db.dispose()


async def test_a_unit_whose_flush_the_server_rejected_is_a_plain_rollback(
    pg_db: SessionManager,
) -> None:
    db = pg_db
    async with db.scope() as session:
        session.add(User(id=1, name="taken"))
    scope = db.scope()
    with pytest.raises(sa_exc.IntegrityError):
        async with scope as session:
            session.add(User(id=1, name="again"))
    assert "rolled back" == scope.outcome


async def test_a_savepoint_scope_says_whether_it_was_released(db: SessionManager) -> None:
    async with db.scope() as session:
        await session.execute(select(func.count(User.id)))
        released = db.scope(savepoint=True)
        async with released:
            pass
        rolled_back = db.scope(savepoint=True)
        with pytest.raises(ValueError, match="undo"):
            async with rolled_back:
                raise ValueError("undo")
        joined = db.scope()
        async with joined:
            pass
    assert ("committed", "rolled back", None) == (
        released.outcome,
        rolled_back.outcome,
        joined.outcome,
    )


@pytest.mark.parametrize("path", ["orm", "driver"])
async def test_a_commit_the_server_rejected_is_a_known_rollback(
    pg_db: SessionManager, path: str
) -> None:
    # A deferred constraint fails at COMMIT: the server answered, so nothing is unknown.
    db = pg_db
    async with db.engine.begin() as conn:
        await conn.execute(
            text(
                "ALTER TABLE users DROP CONSTRAINT users_name_key, "
                "ADD CONSTRAINT users_name_unique UNIQUE (name) DEFERRABLE INITIALLY DEFERRED"
            )
        )
    scope = db.scope()
    with pytest.raises(sa_exc.IntegrityError):
        async with scope as session:
            if path == "orm":  # flushed by Session.commit(), then COMMIT
                session.add_all([User(id=1, name="twin"), User(id=2, name="twin")])
            else:  # nothing left for the ORM: the COMMIT goes through asyncpg itself
                await session.execute(text("INSERT INTO users VALUES (1, 'twin'), (2, 'twin')"))
    assert "rolled back" == scope.outcome
    assert 0 == checked_out(db)
