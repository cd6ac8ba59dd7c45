"""Errors that must name the right culprit: the pool that timed out, a connection the server closed.

* ``PoolExhaustedError`` from a ``readonly=True`` scope on the
  ``readonly_autocommit`` pool reports *that* pool's status and the scopes
  holding *its* connections, not the primary pool's.
* A statement sent right after the server terminated the backend (its FATAL
  message read, the end of the connection not yet) fails in asyncpg with
  ``InternalClientError: cannot switch to state 11; another operation (2) is in
  progress`` (SQLAlchemy 2.0 and 2.1: ``sqlalchemy.exc.InternalError``, the
  connection invalidated): the very words of a session shared by two tasks.
  What reaches the scope's caller must say that the connection was lost.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tasksession import PoolExhaustedError, SessionManager
from tasksession._retry import lost_connection_note

from .conftest import _managed

pytestmark = pytest.mark.anyio


# -- PoolExhaustedError names the pool that timed out -------------------------------------


@pytest.fixture
async def autocommit_db(postgres_url: str) -> AsyncIterator[SessionManager]:
    """``readonly_autocommit=True``: two pools of 2 connections each, no overflow."""
    async for manager in _managed(
        postgres_url, readonly_autocommit=True, pool_size=2, max_overflow=0, pool_timeout=0.2
    ):
        yield manager


async def test_pool_exhaustion_of_the_readonly_pool_reports_that_pool_and_its_holders(
    autocommit_db: SessionManager,
) -> None:
    db = autocommit_db
    assert db._home.binding is not None
    primary = db._home.binding.engine.sync_engine.pool
    readonly = db._home.binding.readonly_engine.sync_engine.pool
    assert primary is not readonly
    done = anyio.Event()

    async def hold(name: str, readonly_scope: bool, holding: anyio.Event) -> None:
        async with db.scope(name=name, readonly=readonly_scope) as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await done.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for name, readonly_scope in (("writer", False), ("reader 1", True), ("reader 2", True)):
                holding = anyio.Event()
                tg.start_soon(hold, name, readonly_scope, holding)
                await holding.wait()  # in this order: oldest first
            with pytest.raises(PoolExhaustedError) as caught:
                async with db.scope(name="late reader", readonly=True) as session:
                    await session.execute(text("SELECT 1"))
            statuses = (readonly.status(), primary.status())
            done.set()
    error = caught.value
    assert statuses[0] != statuses[1]  # the two pools are told apart
    assert (statuses[0], ["reader 1", "reader 2"]) == (
        error.pool_status,
        [holder.name for holder in error.holders],
    )


async def test_pool_exhaustion_of_the_primary_pool_leaves_out_the_readonly_holders(
    autocommit_db: SessionManager,
) -> None:
    db = autocommit_db
    assert db._home.binding is not None
    primary = db._home.binding.engine.sync_engine.pool
    done = anyio.Event()

    async def hold(name: str, readonly_scope: bool, holding: anyio.Event) -> None:
        async with db.scope(name=name, readonly=readonly_scope) as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await done.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for name, readonly_scope in (
                ("reader", True),
                ("writer 1", False),
                ("writer 2", False),
            ):
                holding = anyio.Event()
                tg.start_soon(hold, name, readonly_scope, holding)
                await holding.wait()
            with pytest.raises(PoolExhaustedError) as caught:
                async with db.scope(name="late writer") as session:
                    await session.execute(text("SELECT 1"))
            status = primary.status()
            done.set()
    assert (status, ["writer 1", "writer 2"]) == (
        caught.value.pool_status,
        [holder.name for holder in caught.value.holders],
    )


# -- a connection the server closed says so ----------------------------------------------


def terminate_while_the_loop_waits(url: str, pid: int) -> None:
    """Terminate backend ``pid`` and return once its process is gone, blocking the event loop.

    The loop reads nothing meanwhile: the server's FATAL message and the end of
    the connection are both waiting on the socket when it runs again.
    """

    async def terminate() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await engine.dispose()

    worker = threading.Thread(target=asyncio.run, args=(terminate(),))
    worker.start()
    worker.join(30)
    deadline = time.monotonic() + 10
    while True:  # its socket is closed once the process has exited
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"backend {pid} still running"
        time.sleep(0.001)


async def statement_after_termination(db: SessionManager, url: str) -> sa_exc.DBAPIError:
    """The error of a statement sent after the FATAL message was read, before the connection's end."""
    with pytest.raises(sa_exc.DBAPIError) as caught:
        async with db.scope(name="terminated") as session:
            pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
            terminate_while_the_loop_waits(url, pid)
            # One loop iteration reads the FATAL message (asyncpg, idle, goes into
            # its error-consuming state); the end of the connection is read after
            # the next one. The statement is sent in between.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            await session.execute(text("SELECT 1"))
    return caught.value


def driver_error(error: sa_exc.DBAPIError) -> Any:
    orig: Any = error.orig
    return getattr(orig, "driver_exception", None) or orig.__cause__  # 2.1, 2.0


async def test_another_operation_in_progress_after_a_terminated_backend_says_the_connection_was_lost(
    pg_db: SessionManager, postgres_url: str, self_started: None
) -> None:
    error = await statement_after_termination(pg_db, postgres_url)
    # What asyncpg says (the reproduction): another operation is in progress.
    assert (sa_exc.InternalError, asyncpg.exceptions.InternalClientError, True) == (
        type(error),
        type(driver_error(error)),
        error.connection_invalidated,
    )
    notes = [note for note in getattr(error, "__notes__", ()) if "connection" in note]
    assert 1 == len(notes), getattr(error, "__notes__", None)
    assert "the server ended the session (pg_terminate_backend" in notes[0]
    assert "do not mean that two tasks shared the session" in notes[0]


async def test_the_lost_connection_note_applies_to_driver_complaints_only(
    pg_db: SessionManager, postgres_url: str, self_started: None
) -> None:
    complaint = await statement_after_termination(pg_db, postgres_url)
    with pytest.raises(sa_exc.ProgrammingError) as syntax:
        async with pg_db.scope() as session:
            await session.execute(text("SELEC 1"))
    assert [True, False, True] == [
        lost_connection_note(complaint) is not None,
        lost_connection_note(syntax.value) is not None,  # the server's answer; not invalidated
        "guard='off'" in (lost_connection_note(complaint, "off") or ""),
    ]
