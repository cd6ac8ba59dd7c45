"""Connects refused or reset while the server is down are retried; other ``OSError``s are not.

While PostgreSQL is down or restarting, asyncpg fails to connect with a bare
``OSError`` (``ConnectionRefusedError``; ``ConnectionResetError`` when the
socket is reset during the SSL negotiation): SQLAlchemy 2.0 and 2.1 wrap only
DBAPI errors, so that is what reaches the caller, not a ``DBAPIError``. Nothing
of the unit was sent on such a connection, so ``RetryPolicy`` retries it; the
same classes raised by a statement or a COMMIT (a ``command_timeout``) are not
retried. The restart tests stop the cluster the tests started, let the first
attempts be refused, and start it again from a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import RetryPolicy, SessionManager
from tasksession._retry import is_connect_failure
from tasksession.workers import run_worker

from .postgres_server import PostgresServer

pytestmark = pytest.mark.anyio

#: Outlasts a restart (~0.1-1 s here) with room to spare: up to ~50 s of attempts.
THROUGH_A_RESTART = RetryPolicy(attempts=1000, backoff=0.01, max_backoff=0.05, jitter=False)


@pytest.fixture
def server(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The cluster the tests started; running again after the test, whatever happened."""
    if not postgres_server.self_started:
        pytest.skip("stops the server: only on a PostgreSQL cluster the tests started")
    try:
        yield postgres_server
    finally:
        if not postgres_server.is_running():
            postgres_server.start_again()


@pytest.fixture
async def jobs(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine (no pool) on a fresh ``retry_jobs`` table, to count rows with."""
    engine = create_async_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS retry_jobs"))
        await conn.execute(text("CREATE TABLE retry_jobs (id serial PRIMARY KEY, unit text)"))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def fresh_db(postgres_url: str, jobs: AsyncEngine) -> AsyncIterator[SessionManager]:
    """A db that has never connected: its first unit opens its first connection."""
    db = SessionManager(postgres_url)
    try:
        yield db
        assert 0 == db.statistics().pool_checked_out
    finally:
        await db.dispose()


async def rows(jobs: AsyncEngine) -> list[str]:
    async with jobs.connect() as conn:
        return list((await conn.scalars(text("SELECT unit FROM retry_jobs ORDER BY id"))).all())


def connect_retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The retry log lines that name a connection that could not be opened."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "tasksession" and "could not be opened" in record.getMessage()
    ]


class Outage:
    """A stopped server, started again (in a worker thread) once ``refused`` is set."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.refused = anyio.Event()  # set by the unit when an attempt failed (a refused connect)

    async def bring_back(self) -> None:
        with anyio.fail_after(30):
            await self.refused.wait()
            await anyio.to_thread.run_sync(self.server.start_again)


# -- what reaches the caller, and how it is classified -----------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


async def test_a_refused_connect_reaches_the_caller_as_a_bare_oserror_raised_while_connecting() -> (
    None
):
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/x")
    try:
        with pytest.raises(ConnectionRefusedError) as caught:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    # Not wrapped (SQLAlchemy wraps DBAPI errors only), and raised inside the checkout.
    assert (ConnectionRefusedError, True) == (type(caught.value), is_connect_failure(caught.value))


async def test_a_connect_reset_during_the_ssl_negotiation_is_a_connect_failure() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # asyncpg's SSLRequest
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    listener = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")
    try:
        with pytest.raises(ConnectionResetError) as caught:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
        listener.close()
        await listener.wait_closed()
    assert (ConnectionResetError, True) == (type(caught.value), is_connect_failure(caught.value))
    assert "connection that could not be opened (ConnectionResetError; nothing was sent)" == (
        RetryPolicy().reason(caught.value)
    )


async def test_a_unit_whose_connects_are_refused_is_retried_until_attempts_run_out() -> None:
    db = SessionManager(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/x")
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=3, backoff=0, jitter=False))
    async def unit() -> None:
        attempts.append(1)
        await db.session.execute(text("SELECT 1"))

    try:
        with anyio.fail_after(10), pytest.raises(ConnectionRefusedError) as caught:
            await unit()
    finally:
        await db.dispose()
    assert 3 == len(attempts)
    assert any("RetryPolicy(attempts=3) gave up" in note for note in caught.value.__notes__)


async def test_an_oserror_raised_by_a_statement_is_not_retried(
    postgres_url: str, jobs: AsyncEngine
) -> None:
    # asyncpg's command_timeout raises a bare TimeoutError, an OSError: the
    # statement was sent, so it is not a connect failure.
    db = SessionManager(postgres_url, connect_args={"command_timeout": 0.2})
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=5, backoff=0, jitter=False))
    async def unit() -> None:
        attempts.append(1)
        await db.session.execute(text("INSERT INTO retry_jobs (unit) VALUES ('slow')"))
        await db.session.execute(text("SELECT pg_sleep(5)"))

    try:
        with anyio.fail_after(10), pytest.raises(TimeoutError) as caught:
            await unit()
    finally:
        await db.dispose()
    assert (1, False) == (len(attempts), is_connect_failure(caught.value))
    assert [] == await rows(jobs)


async def test_an_oserror_raised_by_a_commit_is_not_a_connect_failure(
    postgres_url: str, server: PostgresServer
) -> None:
    # The backend is paused during COMMIT: asyncpg's command_timeout raises a bare
    # TimeoutError after the COMMIT was sent (it may have been applied).
    engine = create_async_engine(
        postgres_url, poolclass=NullPool, connect_args={"command_timeout": 0.3}
    )
    try:
        async with engine.connect() as conn:
            pid = int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)
            os.kill(pid, signal.SIGSTOP)
            try:
                with anyio.fail_after(10), pytest.raises(TimeoutError) as caught:
                    await conn.commit()
            finally:
                os.kill(pid, signal.SIGCONT)
    finally:
        await engine.dispose()
    assert (False, None) == (is_connect_failure(caught.value), RetryPolicy().reason(caught.value))


async def test_an_oserror_of_the_unit_itself_is_not_retried(fresh_db: SessionManager) -> None:
    db = fresh_db
    attempts: list[int] = []

    @db.transactional(retry=RetryPolicy(attempts=5, backoff=0, jitter=False))
    async def unit() -> None:
        attempts.append(1)
        await db.session.execute(text("SELECT 1"))
        raise ConnectionRefusedError("the payment service refused the connection")

    with pytest.raises(ConnectionRefusedError):
        await unit()
    assert 1 == len(attempts)


# -- across a real server restart --------------------------------------------------------


async def test_a_transactional_unit_succeeds_across_a_server_restart_and_applies_once(
    server: PostgresServer,
    fresh_db: SessionManager,
    jobs: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = fresh_db
    outage = Outage(server)
    attempts: list[int] = []

    @db.transactional(retry=THROUGH_A_RESTART, name="record")
    async def record() -> str:
        attempts.append(1)
        if len(attempts) == 2:  # the first attempt failed (its connect was refused)
            outage.refused.set()
        await db.session.execute(text("INSERT INTO retry_jobs (unit) VALUES ('record')"))
        return "done"

    caplog.set_level(logging.INFO, logger="tasksession")
    await anyio.to_thread.run_sync(server.shut_down)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outage.bring_back)
            result = await record()
    assert ("done", ["record"]) == (result, await rows(jobs))
    assert len(attempts) >= 2
    assert "(ConnectionRefusedError; nothing was sent)" in connect_retries(caplog)[0]


async def test_a_worker_step_succeeds_across_a_server_restart_and_applies_once(
    server: PostgresServer,
    fresh_db: SessionManager,
    jobs: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = fresh_db
    outage = Outage(server)
    stop = anyio.Event()
    attempts: list[int] = []

    async def step(session: AsyncSession) -> bool:
        attempts.append(1)
        if len(attempts) == 2:
            outage.refused.set()
        await session.execute(text("INSERT INTO retry_jobs (unit) VALUES ('step')"))
        stop.set()
        return True

    caplog.set_level(logging.INFO, logger="tasksession")
    await anyio.to_thread.run_sync(server.shut_down)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outage.bring_back)
            await run_worker(db, step, retry=THROUGH_A_RESTART, stop=stop)
    assert ["step"] == await rows(jobs)
    # Retried inside the step's unit: no failure reached the worker loop.
    failures: list[Any] = [r for r in caplog.records if r.name == "tasksession.workers"]
    assert [] == [r.getMessage() for r in failures]
    assert "(ConnectionRefusedError; nothing was sent)" in connect_retries(caplog)[0]
