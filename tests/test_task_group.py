"""``db.task_group()``: children run in parallel, each in an independent scope."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus
from sqlalchemy import event, insert, select, text

from tasksession import (
    NotConfiguredError,
    ReadOnlyScopeError,
    SessionManager,
    SessionTaskGroup,
)

from .conftest import _managed
from .helpers import checked_out, eventually
from .models import User

pytestmark = pytest.mark.anyio


async def _names(db: SessionManager) -> list[str]:
    async with db.scope() as session:
        return list((await session.scalars(select(User.name).order_by(User.name))).all())


async def _insert(db: SessionManager, name: str) -> None:
    await db.session.execute(insert(User).values(name=name))


async def test_each_child_gets_a_session_of_its_own(db: SessionManager) -> None:
    seen: dict[str, Any] = {}

    async def child(label: str) -> None:
        seen[label] = db.session
        await db.session.execute(text("SELECT 1"))

    async with db.scope() as parent_session:
        async with db.task_group() as tg:
            for label in ("a", "b", "c"):
                tg.start_soon(child, label)

    sessions = [parent_session, *seen.values()]
    assert 4 == len({id(s) for s in sessions})


async def test_children_commit_when_they_return(db: SessionManager) -> None:
    async with db.task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(_insert, db, name)

    assert ["a", "b", "c"] == await _names(db)


async def test_a_child_commits_before_its_siblings_finish(pg_db: SessionManager) -> None:
    # Independent, not atomic: "fast" is visible while "slow" is still running.
    release = anyio.Event()

    async def slow() -> None:
        await _insert(pg_db, "slow")
        await release.wait()

    with anyio.fail_after(10):
        async with pg_db.task_group() as tg:
            tg.start_soon(slow)
            await tg.start(_started_insert, pg_db, "fast")

            # The commit happens after the child returns, so nothing to wait on
            # but the database itself: poll it.
            async def fast_visible() -> bool:
                return "fast" in await _names(pg_db)

            await eventually(fast_visible)
            visible_meanwhile = await _names(pg_db)
            release.set()

    assert ["fast"] == visible_meanwhile
    assert ["fast", "slow"] == await _names(pg_db)


async def _started_insert(
    db: SessionManager, name: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    await _insert(db, name)


async def test_a_failing_child_rolls_back_and_cancels_its_siblings(pg_db: SessionManager) -> None:
    inserted = anyio.Event()

    async def sibling() -> None:
        await _insert(pg_db, "cancelled-sibling")
        inserted.set()
        await anyio.sleep_forever()

    async def failing() -> None:
        await inserted.wait()
        await _insert(pg_db, "failing")
        raise ValueError("boom")

    with anyio.fail_after(10):
        with pytest.RaisesGroup(ValueError):
            async with pg_db.task_group() as tg:
                await tg.start(_started_insert, pg_db, "finished-first")
                tg.start_soon(sibling)
                tg.start_soon(failing)

    stats = pg_db.statistics()
    assert (1, 2) == (stats.commits, stats.rollbacks)
    assert ["finished-first"] == await _names(pg_db)


async def test_cancelling_the_group_rolls_back_every_child(pg_db: SessionManager) -> None:
    started = 0
    all_started = anyio.Event()

    async def child(name: str) -> None:
        nonlocal started
        await _insert(pg_db, name)
        started += 1
        if started == 3:
            all_started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with pg_db.task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(child, name)
            await all_started.wait()
            tg.cancel_scope.cancel()

    assert [] == await _names(pg_db)
    assert 0 == checked_out(pg_db)


@pytest.fixture
async def small_pool_db(database_url: str) -> AsyncIterator[SessionManager]:
    async for manager in _managed(database_url, pool_size=5, max_overflow=0, pool_timeout=10):
        yield manager


async def test_fifty_children_share_a_pool_of_five(small_pool_db: SessionManager) -> None:
    db = small_pool_db
    in_use = peak = 0

    def on_checkout(*args: Any) -> None:
        nonlocal in_use, peak
        in_use += 1
        peak = max(peak, in_use)

    def on_checkin(*args: Any) -> None:
        nonlocal in_use
        in_use -= 1

    async def child(i: int) -> None:
        await db.session.execute(insert(User).values(name=f"user-{i:02}"))
        # Hold the connection across a switch so that children overlap.
        await anyio.lowlevel.checkpoint()
        await db.session.scalar(select(User.id).where(User.name == f"user-{i:02}"))

    pool = db.engine.sync_engine.pool
    event.listen(pool, "checkout", on_checkout)
    event.listen(pool, "checkin", on_checkin)
    try:
        with anyio.fail_after(30):
            async with db.task_group() as tg:
                for i in range(50):
                    tg.start_soon(child, i)
    finally:
        event.remove(pool, "checkout", on_checkout)
        event.remove(pool, "checkin", on_checkin)

    assert [f"user-{i:02}" for i in range(50)] == await _names(db)
    assert 5 == peak
    assert 0 == checked_out(db)
    assert (50, 0) == (db.statistics().commits - 1, db.statistics().concurrent_violations)


async def test_children_inside_an_open_scope_leave_the_parents_session_alone(
    db: SessionManager,
) -> None:
    async with db.scope() as parent:
        parent.add(User(name="parent"))
        async with db.task_group() as tg:
            for name in ("a", "b"):
                tg.start_soon(_insert, db, name)
        assert db.session is parent

    assert ["a", "b", "parent"] == await _names(db)
    assert 0 == db.statistics().concurrent_violations


async def test_start_returns_the_started_value_and_commits_at_return(db: SessionManager) -> None:
    async def server(*, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        user = User(name="started")
        db.session.add(user)
        await db.session.flush()
        task_status.started(user.id)

    async with db.task_group() as tg:
        user_id = await tg.start(server)

    async with db.scope() as session:
        assert "started" == (await session.get_one(User, user_id)).name


async def test_child_scope_and_task_are_named_after_the_function_or_name(
    db: SessionManager,
) -> None:
    seen: list[tuple[str, str]] = []

    async def probe() -> None:
        task = asyncio.current_task()
        assert task is not None
        scope = next(s for s in db.active_scopes() if s.task_name == task.get_name())
        seen.append((task.get_name(), scope.name))

    async with db.task_group() as tg:
        tg.start_soon(probe)
        tg.start_soon(probe, name="custom")

    expected_default = probe.__qualname__
    assert sorted([(expected_default, expected_default), ("custom", "custom")]) == sorted(seen)


async def test_readonly_group_children_cannot_write(db: SessionManager) -> None:
    async def write() -> None:
        db.session.add(User(name="nope"))
        await db.session.flush()

    with pytest.RaisesGroup(ReadOnlyScopeError):
        async with db.task_group(readonly=True) as tg:
            tg.start_soon(write)

    assert [] == await _names(db)


async def test_starting_outside_the_block_is_an_error(db: SessionManager) -> None:
    group = db.task_group()

    with pytest.raises(RuntimeError, match=r"async with db\.task_group"):
        group.start_soon(_insert, db, "x")


async def test_an_unconfigured_manager_fails_when_the_group_is_entered() -> None:
    with pytest.raises(NotConfiguredError):
        async with SessionManager().task_group():
            pass


def test_task_group_is_a_session_task_group() -> None:
    assert isinstance(SessionManager().task_group(), SessionTaskGroup)
