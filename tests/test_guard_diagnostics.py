"""What a refused operation tells the user, and how it shows up in logs and statistics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tasksession import ConcurrentSessionError, SessionManager, _guard

from .gate import Gate
from .models import User

pytestmark = pytest.mark.anyio

LOCK_KEY = 4242


@pytest.fixture
async def advisory_lock(postgres_url: str) -> AsyncIterator[None]:
    """Hold a PostgreSQL advisory lock from a separate connection for the test's duration."""
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
            yield
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
    finally:
        await engine.dispose()


async def _wait_until_blocked_on_lock(db: SessionManager) -> None:
    """Poll pg_stat_activity until a backend waits for the advisory lock."""
    with anyio.fail_after(10):
        while True:
            async with db.engine.connect() as conn:
                waiting = await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
                    )
                )
            if waiting:
                return
            await anyio.sleep(0.01)


async def wait_for_lock_in_flight(session: AsyncSession) -> None:
    """The holder's user-level frame: blocked in the database, inside asyncpg."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


async def insert_in_child(session: AsyncSession) -> None:
    """The caller's user-level frame."""
    await session.execute(insert(User).values(name="refused"))


async def _refused_while_blocked_in_database(db: SessionManager) -> ConcurrentSessionError:
    async with db.scope(name="GET /users") as session:
        holder = asyncio.create_task(wait_for_lock_in_flight(session), name="holder-task")
        await _wait_until_blocked_on_lock(db)
        caller = asyncio.create_task(insert_in_child(session), name="caller-task")
        with pytest.raises(ConcurrentSessionError) as info:
            with anyio.fail_after(10):
                await caller
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await session.rollback()
    return info.value


@pytest.mark.usefixtures("advisory_lock")
async def test_error_names_scope_tasks_operations_and_where_each_task_is(
    pg_db: SessionManager,
) -> None:
    error = await _refused_while_blocked_in_database(pg_db)

    assert "GET /users" == error.scope_name
    assert ("holder-task", "execute") == (error.holder_task, error.holder_operation)
    assert ("caller-task", "execute") == (error.caller_task, error.caller_operation)
    assert error.holder_location.endswith("in wait_for_lock_in_flight"), error.holder_location
    assert error.caller_location.endswith("in insert_in_child"), error.caller_location
    assert "test_guard_diagnostics.py:" in error.holder_location


@pytest.mark.usefixtures("advisory_lock")
async def test_error_message_explains_the_fix_with_a_snippet(pg_db: SessionManager) -> None:
    error = await _refused_while_blocked_in_database(pg_db)
    message = str(error)

    for expected in (
        "'caller-task' called execute()",
        "'GET /users'",
        "'holder-task' is still inside execute()",
        "holder-task is at: ",
        "caller-task is at: ",
        "async with db.task_group() as tg:",
        "db.scope(independent=True)",
        "#ts-concurrent",
    ):
        assert expected in message, expected


async def _gather_with_one_overlap(db: SessionManager) -> list[Any]:
    async with db.scope() as session:
        with Gate(db.engine, "before_cursor_execute") as gate:

            async def hold() -> None:
                gate.arm()
                await session.execute(text("SELECT 1"))

            async def call() -> None:
                await gate.reached.wait()
                try:
                    await session.execute(text("SELECT 2"))
                finally:
                    gate.open()

            with anyio.fail_after(10):
                return await asyncio.gather(hold(), call(), return_exceptions=True)


async def test_return_exceptions_still_counts_the_violation(db: SessionManager) -> None:
    before = db.statistics().concurrent_violations

    results = await _gather_with_one_overlap(db)

    assert ConcurrentSessionError is type(results[1])
    assert 1 == db.statistics().concurrent_violations - before


async def test_one_violation_is_logged_once_at_warning(
    db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="tasksession"):
        results = await _gather_with_one_overlap(db)

    records = [r for r in caplog.records if r.name.startswith("tasksession")]
    assert [logging.WARNING] == [r.levelno for r in records]
    assert str(results[1]) == records[0].getMessage()


async def test_fifty_violations_are_fifty_warnings_and_fifty_counts(
    pg_db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    before = pg_db.statistics().concurrent_violations
    async with pg_db.scope() as session:
        with caplog.at_level(logging.WARNING, logger="tasksession"):
            with anyio.fail_after(10):
                results = await asyncio.gather(
                    *(session.execute(text("SELECT 1")) for _ in range(51)),
                    return_exceptions=True,
                )

    refused = [r for r in results if isinstance(r, ConcurrentSessionError)]
    assert 50 == len(refused)
    assert 50 == pg_db.statistics().concurrent_violations - before
    assert 50 == len([r for r in caplog.records if r.name == "tasksession"])


async def test_the_happy_path_does_not_inspect_stacks(
    db: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stack was inspected on the happy path")

    monkeypatch.setattr(_guard, "task_location", forbidden)
    monkeypatch.setattr(_guard, "_caller_frames", forbidden)
    async with db.scope() as session:

        async def insert_user(name: str) -> None:
            await session.execute(insert(User).values(name=name))

        await asyncio.gather(insert_user("a"))
        await insert_user("b")
        assert 2 == len((await session.scalars(select(User))).all())
