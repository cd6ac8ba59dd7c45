"""The job queue survives crashes and restarts of its workers: no job lost, none done twice.

Each test ends with the same check: every job is ``done`` and has exactly one
outcome row (the outcome table has no unique constraint, so a job completed
twice would show as two rows).

Each test gets a database of its own through tasksession's pytest plugin, in clone
mode (``tasksession_db``): the workers need real concurrency (``SKIP LOCKED``
between transactions, backends terminated mid-job, worker processes of their own
that connect to the clone), which one rolled-back transaction cannot give. The
clone is made from a template built once from the queue's schema.
"""

# Assertions read `expected == actual`, as in the test suite (STYLE.md).
# ruff: noqa: SIM300

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import RetryPolicy, SessionManager
from tasksession.testing import allow
from tasksession.workers import run_worker

from .jobs import Base, Handler, Job, enqueue, job_step, process

pytestmark = [pytest.mark.anyio, pytest.mark.tasksession(mode="clone")]

ROOT = Path(__file__).resolve().parents[2]
TEST_APP = "job-queue-test"
QUICK = RetryPolicy(attempts=5, backoff=0.005, max_backoff=0.05)


@pytest.fixture
async def tasksession_manager(postgres_server: object) -> AsyncIterator[SessionManager]:
    """The queue's manager, for the plugin to run on a clone of the template in each test."""
    url = postgres_server.url  # type: ignore[attr-defined]
    manager = SessionManager(
        url,
        pool_size=4,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": TEST_APP}},
    )
    try:
        yield manager
    finally:
        await manager.dispose()


@pytest.fixture
def tasksession_schema() -> Callable[..., None]:
    """What the template database is built with, once per run."""
    return Base.metadata.create_all


@pytest.fixture
def db(tasksession_db: SessionManager) -> SessionManager:
    """The manager, on this test's own database (the plugin checks for leaks at the end)."""
    return tasksession_db


@pytest.fixture
async def admin(db: SessionManager) -> AsyncIterator[AsyncEngine]:
    # On the test's clone (db.engine.url), used on purpose: allowed past the guard.
    engine = allow(
        create_async_engine(db.engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    )
    try:
        yield engine
    finally:
        await engine.dispose()


async def add_jobs(db: SessionManager, payloads: list[str]) -> None:
    async with db.scope() as session:
        await enqueue(session, payloads)


async def scalar(admin: AsyncEngine, sql: str) -> int:
    async with admin.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def pending(admin: AsyncEngine) -> int:
    return await scalar(admin, "SELECT count(*) FROM jobs WHERE status = 'pending'")


async def drain(db: SessionManager, admin: AsyncEngine, concurrency: int = 4) -> None:
    """Run workers (a restart) until every job is committed as done, then stop them."""
    stop = anyio.Event()
    worker = functools.partial(
        run_worker,
        db,
        job_step(),
        concurrency=concurrency,
        idle_delay=0.02,
        retry=QUICK,
        stop=stop,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await wait_until_drained(admin)
        stop.set()


async def assert_each_job_done_exactly_once(admin: AsyncEngine, jobs: int) -> None:
    assert jobs == await scalar(admin, "SELECT count(*) FROM jobs WHERE status = 'done'")
    assert 0 == await scalar(admin, "SELECT count(*) FROM jobs WHERE status <> 'done'")
    assert jobs == await scalar(admin, "SELECT count(*) FROM job_outcomes")
    assert 0 == await scalar(
        admin,
        "SELECT count(*) FROM (SELECT job_id FROM job_outcomes GROUP BY job_id "
        "HAVING count(*) <> 1) AS twice",
    )


def require_own_cluster(postgres_server: object) -> None:
    if not postgres_server.self_started:  # type: ignore[attr-defined]
        pytest.skip("terminates backends: only on a PostgreSQL cluster the tests started")


async def test_workers_drain_the_queue_exactly_once(db: SessionManager, admin: AsyncEngine) -> None:
    await add_jobs(db, [f"job {n}" for n in range(300)])
    await drain(db, admin)
    await assert_each_job_done_exactly_once(admin, 300)


def hanging_handler(stuck: list[int], all_stuck: anyio.Event) -> Handler:
    """A handler that hangs mid-job (claimed, processed, not committed) on every tenth job."""

    async def handle(session: AsyncSession, job: Job) -> str:
        output = await process(session, job)
        if job.id % 10 == 0:
            stuck.append(job.id)
            if len(stuck) == 4:
                all_stuck.set()
            await anyio.sleep_forever()
        return output

    return handle


async def wait_until_drained(admin: AsyncEngine) -> None:
    with anyio.fail_after(60):
        while True:
            if not await pending(admin):
                return
            await anyio.sleep(0.02)


async def terminate(admin: AsyncEngine, pid: int) -> None:
    async with admin.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with anyio.fail_after(10):
            while True:
                alive = await conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
                )
                if not alive:
                    return
                await anyio.sleep(0.01)


async def test_workers_cancelled_mid_job_lose_no_job(
    db: SessionManager, admin: AsyncEngine
) -> None:
    await add_jobs(db, [f"job {n}" for n in range(120)])
    for generation in range(2):
        stuck: list[int] = []
        all_stuck = anyio.Event()
        hang_on_every_tenth = hanging_handler(stuck, all_stuck)

        with anyio.CancelScope() as crash:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(run_worker, db, job_step(hang_on_every_tenth), concurrency=4)
                )
                with anyio.fail_after(30):
                    await all_stuck.wait()
                crash.cancel()  # every worker is in the middle of a job
        assert 0 == db.statistics().pool_checked_out
        # The jobs they were in the middle of went back to the queue.
        assert 0 == await scalar(
            admin,
            "SELECT count(*) FROM jobs WHERE status = 'done' AND id IN ("
            + ", ".join(map(str, stuck))
            + ")",
        ), generation
    await drain(db, admin)
    await assert_each_job_done_exactly_once(admin, 120)


async def test_a_backend_terminated_mid_job_is_retried_and_done_once(
    db: SessionManager, admin: AsyncEngine, postgres_server: object
) -> None:
    require_own_cluster(postgres_server)
    await add_jobs(db, [f"job {n}" for n in range(20)])
    attempts: list[int] = []

    async def lose_connection_on_job_7(session: AsyncSession, job: Job) -> str:
        output = await process(session, job)
        if job.id == 7:
            attempts.append(job.id)
            if len(attempts) == 1:
                await terminate(admin, int(await session.scalar(text("SELECT pg_backend_pid()"))))
        return output

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            functools.partial(
                run_worker, db, job_step(lose_connection_on_job_7), retry=QUICK, stop=stop
            )
        )
        await wait_until_drained(admin)
        stop.set()
    assert [7, 7] == attempts
    await assert_each_job_done_exactly_once(admin, 20)


async def test_backends_terminated_at_random_moments_lose_no_job(
    db: SessionManager, admin: AsyncEngine, postgres_server: object
) -> None:
    require_own_cluster(postgres_server)
    await add_jobs(db, [f"sleep:0.002 {n}" if n % 3 == 0 else f"job {n}" for n in range(200)])
    kills: list[int] = []

    async def chaos() -> None:
        # Terminate every worker backend, 20 times, at arbitrary points of their jobs
        # (mid-statement, idle in transaction, during COMMIT, idle in the pool).
        async with admin.connect() as conn:
            for _ in range(20):
                killed = await conn.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :app"
                    ),
                    {"app": TEST_APP},
                )
                kills.append(int(killed or 0))
                await anyio.sleep(0.03)

    async with anyio.create_task_group() as tg:
        tg.start_soon(chaos)
        await drain(db, admin)
    assert sum(kills) > 0
    await assert_each_job_done_exactly_once(admin, 200)


def _worker_process(url: str, concurrency: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "examples.job_queue", url, "--concurrency", str(concurrency)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_process(process_: subprocess.Popen[bytes]) -> None:
    if process_.poll() is None:
        process_.kill()
    process_.communicate(timeout=30)  # reaps it and closes the pipe


async def wait_for_sleeping_workers(admin: AsyncEngine, count: int) -> None:
    with anyio.fail_after(30):
        while True:
            sleeping = await scalar(
                admin,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'job-queue-worker' AND state = 'active' AND query LIKE '%pg_sleep%'",
            )
            if sleeping >= count:
                return
            await anyio.sleep(0.05)


async def test_a_killed_worker_process_loses_no_job(db: SessionManager, admin: AsyncEngine) -> None:
    await add_jobs(db, ["sleep:3 first", "sleep:3 second"] + [f"job {n}" for n in range(30)])
    process_ = _worker_process(str(db.engine.url.render_as_string(hide_password=False)), 2)
    try:
        await wait_for_sleeping_workers(admin, 2)  # both loops are mid-job
        process_.send_signal(signal.SIGKILL)  # no cleanup of any kind
        process_.communicate(timeout=30)
        assert -signal.SIGKILL == process_.returncode
    finally:
        stop_process(process_)
    assert 32 == await pending(admin)  # the two jobs it held are still pending
    await drain(db, admin)  # the restarted workers
    await assert_each_job_done_exactly_once(admin, 32)


async def test_sigterm_lets_the_worker_finish_its_running_jobs(
    db: SessionManager, admin: AsyncEngine
) -> None:
    await add_jobs(db, ["sleep:0.5 first", "sleep:0.5 second"] + [f"job {n}" for n in range(10)])
    process_ = _worker_process(str(db.engine.url.render_as_string(hide_password=False)), 2)
    try:
        await wait_for_sleeping_workers(admin, 2)
        process_.send_signal(signal.SIGTERM)
        _, errors = process_.communicate(timeout=30)
        assert 0 == process_.returncode, errors.decode()
    finally:
        stop_process(process_)
    # The two running jobs finished and committed; nothing else was started.
    assert 2 == await scalar(admin, "SELECT count(*) FROM jobs WHERE status = 'done'")
    await drain(db, admin)
    await assert_each_job_done_exactly_once(admin, 12)
