"""``tasksession.workers.run_worker`` on real databases."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import RetryPolicy, SessionManager
from tasksession.workers import run_worker

from .models import User
from .postgres_server import PostgresServer

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.01)


async def users(db: SessionManager) -> list[str]:
    async with db.scope() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


async def test_each_step_gets_a_fresh_session_with_an_empty_identity_map(
    db: SessionManager,
) -> None:
    stop = anyio.Event()
    seen: list[tuple[int, int]] = []
    sessions: list[AsyncSession] = []
    kept: list[User] = []

    async def step(session: AsyncSession) -> bool:
        sessions.append(session)
        seen.append((len(session.identity_map), len(seen)))
        user = User(name=f"user{len(seen)}")
        kept.append(user)  # strongly referenced: a shared identity map would keep it
        session.add(user)
        await session.flush()
        assert user in session
        if len(seen) == 3:
            stop.set()
        return True

    with anyio.fail_after(10):
        await run_worker(db, step, stop=stop, idle_delay=3600)
    assert [(0, 0), (0, 1), (0, 2)] == seen
    assert 3 == len({id(session) for session in sessions})
    assert ["user1", "user2", "user3"] == await users(db)


async def test_db_session_inside_a_step_is_the_steps_session(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    same: list[bool] = []

    async def step(session: AsyncSession) -> bool:
        same.append(session is pg_db.session)
        stop.set()
        return True

    await run_worker(pg_db, step, stop=stop)
    assert [True] == same


async def test_busy_steps_run_back_to_back_without_waiting(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    steps: list[int] = []

    async def step(session: AsyncSession) -> bool:
        await session.execute(text("SELECT 1"))
        steps.append(1)
        if len(steps) == 20:
            stop.set()
        return True

    with anyio.fail_after(10):  # an idle wait would take an hour
        await run_worker(pg_db, step, stop=stop, idle_delay=3600)
    assert 20 == len(steps)


async def test_stop_wakes_an_idle_worker_at_once(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    idle = anyio.Event()

    async def step(session: AsyncSession) -> bool:
        idle.set()
        return False

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_worker(pg_db, step, stop=stop, idle_delay=3600))
        with anyio.fail_after(10):
            await idle.wait()
            await anyio.wait_all_tasks_blocked()
            stop.set()


async def test_idle_steps_wait_idle_delay_before_the_next_step(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    times: list[float] = []

    async def step(session: AsyncSession) -> bool:
        times.append(anyio.current_time())
        if len(times) == 3:
            stop.set()
        return False

    with anyio.fail_after(10):
        await run_worker(pg_db, step, stop=stop, idle_delay=0.05)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.05 for gap in gaps), gaps


async def test_a_failing_step_is_logged_backed_off_and_the_loop_goes_on(
    db: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    stop = anyio.Event()
    times: list[float] = []

    async def step(session: AsyncSession) -> bool:
        times.append(anyio.current_time())
        session.add(User(name=f"attempt{len(times)}"))
        await session.flush()
        if len(times) <= 2:
            raise RuntimeError(f"step {len(times)} broke")
        stop.set()
        return True

    policy = RetryPolicy(attempts=1, backoff=0.05, jitter=False)
    with caplog.at_level(logging.ERROR, logger="tasksession.workers"), anyio.fail_after(10):
        await run_worker(db, step, stop=stop, retry=policy)
    failures = [r for r in caplog.records if "step failed" in r.getMessage()]
    assert 2 == len(failures)
    assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in failures)
    assert times[1] - times[0] >= 0.05  # backed off 0.05 s after the first failure
    assert times[2] - times[1] >= 0.1  # and twice that after the second in a row
    assert ["attempt3"] == await users(db)  # the failed steps were rolled back


async def test_a_retryable_failure_reruns_the_step_in_a_new_scope(pg_db: SessionManager) -> None:
    class Flaky(Exception):
        pass

    stop = anyio.Event()
    sessions: list[AsyncSession] = []

    async def step(session: AsyncSession) -> bool:
        sessions.append(session)
        session.add(User(name="once"))
        await session.flush()
        if len(sessions) == 1:
            raise Flaky
        stop.set()
        return True

    policy = RetryPolicy(attempts=2, backoff=0.001, exceptions=(Flaky,))
    await run_worker(pg_db, step, stop=stop, retry=policy)
    assert 2 == len(sessions)
    assert sessions[0] is not sessions[1]
    assert ["once"] == await users(pg_db)


async def test_stop_lets_the_running_steps_finish_and_commit(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    inside = anyio.Event()
    finish = anyio.Event()
    started: list[int] = []

    async def step(session: AsyncSession) -> bool:
        started.append(1)
        session.add(User(name=f"worker{len(started)}"))
        await session.flush()
        if len(started) == 2:
            inside.set()
        await finish.wait()
        return True

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_worker(pg_db, step, stop=stop, concurrency=2))
        with anyio.fail_after(10):
            await inside.wait()
            stop.set()
            finish.set()
    assert 2 == len(started)  # no step started after stop
    assert ["worker1", "worker2"] == await users(pg_db)


async def test_cancellation_rolls_back_the_running_steps(
    pg_db: SessionManager, postgres_url: str
) -> None:
    running = anyio.Event()
    started: list[int] = []

    async def step(session: AsyncSession) -> bool:
        started.append(1)
        session.add(User(name=f"half{len(started)}"))
        await session.flush()
        if len(started) == 3:
            running.set()
        await anyio.sleep_forever()
        return True

    with anyio.CancelScope() as cancel:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_worker(pg_db, step, concurrency=3))
            with anyio.fail_after(10):
                await running.wait()
            cancel.cancel()
    assert [] == await users(pg_db)
    assert 0 == pg_db.statistics().pool_checked_out
    admin = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            idle_in_transaction = await conn.scalar(
                select(func.count())
                .select_from(text("pg_stat_activity"))
                .where(text("state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"))
            )
        assert 0 == idle_in_transaction
    finally:
        await admin.dispose()


async def test_concurrency_runs_steps_side_by_side(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    loops = 4
    arrived: list[int] = []
    everybody = anyio.Event()

    async def step(session: AsyncSession) -> bool:
        await session.execute(text("SELECT 1"))
        arrived.append(1)
        if len(arrived) == loops:
            everybody.set()
        with anyio.fail_after(10):
            await everybody.wait()  # passes only if all loops are in a step at once
        stop.set()
        return True

    await run_worker(pg_db, step, concurrency=loops, stop=stop)
    assert loops == len(arrived)


async def test_a_step_that_never_awaits_can_still_be_stopped(pg_db: SessionManager) -> None:
    stop = anyio.Event()
    count: list[int] = []

    async def step(session: AsyncSession) -> bool:
        count.append(1)  # touches nothing: no scope I/O, no await
        return True

    async def stopper() -> None:
        while len(count) < 100:
            await anyio.lowlevel.checkpoint()
        stop.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_worker(pg_db, step, stop=stop))
            tg.start_soon(stopper)
    assert len(count) >= 100


async def test_run_worker_inside_a_scope_still_uses_a_fresh_scope_per_step(
    pg_db: SessionManager,
) -> None:
    stop = anyio.Event()
    sessions: list[AsyncSession] = []

    async def step(session: AsyncSession) -> bool:
        sessions.append(session)
        if len(sessions) == 2:
            stop.set()
        return True

    async with pg_db.scope() as outer:
        await run_worker(pg_db, step, stop=stop)
    assert outer not in sessions
    assert sessions[0] is not sessions[1]


async def test_a_lost_connection_is_retried_and_the_work_done_once(
    pg_db: SessionManager, postgres_server: PostgresServer
) -> None:
    if not postgres_server.self_started:
        pytest.skip("terminates backends: only on a PostgreSQL cluster the tests started")
    admin = create_async_engine(postgres_server.url, poolclass=NullPool)
    stop = anyio.Event()
    pids: list[int] = []

    async def step(session: AsyncSession) -> bool:
        session.add(User(name="exactly-once"))
        await session.flush()
        pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
        if len(pids) == 1:
            await _terminate(admin, pids[0])
            await session.execute(text("SELECT 1"))  # the connection is gone
        stop.set()
        return True

    try:
        with anyio.fail_after(10):
            await run_worker(pg_db, step, stop=stop, retry=QUICK)
    finally:
        await admin.dispose()
    assert ["exactly-once"] == await users(pg_db)
    assert 2 == len(pids)


def test_concurrency_must_be_positive() -> None:
    async def step(session: Any) -> bool:
        return False

    with pytest.raises(ValueError, match="concurrency"):
        anyio.run(lambda: run_worker(SessionManager(), step, concurrency=0))


async def _terminate(admin: AsyncEngine, pid: int) -> None:
    async with admin.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with anyio.fail_after(10):
            while True:
                if not await conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                ):
                    return
                await anyio.sleep(0.01)
