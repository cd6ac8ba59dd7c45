"""SessionMixin when the client goes away while a statement runs, over real HTTP on PostgreSQL.

Cancelling the request's task inside a round trip makes SQLAlchemy invalidate
the connection (and the pool open a new one). So a statement already running
when the client disconnects is let finish (within ``disconnect_grace``), the
scope rolls back and its connection goes back to the pool intact, and only then
is the handler cancelled; a handler that merely waits for a pool connection is
cancelled at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio
import pytest
import tornado.web
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection

from tasksession import SessionManager
from tasksession.tornado import SessionMixin

from .conftest import _managed
from .models import User
from .tornado_helpers import checked_out, count_users, serve, wait_until_released

pytestmark = pytest.mark.anyio

LOCK = 7301  # the advisory lock the test holds to keep a handler's statement running
REQUEST = b"POST /r HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"


class Recorder(SessionMixin, tornado.web.RequestHandler):
    """Runs a statement that waits for the test's lock; records what happens to it."""

    events: ClassVar[list[str]]
    disconnected: ClassVar[asyncio.Event]
    ended: ClassVar[asyncio.Event]

    async def post(self) -> None:
        try:
            await self._run()
        finally:
            self.ended.set()

    async def _run(self) -> None:
        self.session.add(User(name="abandoned"))
        await self.session.flush()  # a connection and a transaction are held from here on
        self.events.append("statement")
        try:
            await self.session.execute(text(f"SELECT pg_advisory_xact_lock({LOCK})"))
        except asyncio.CancelledError:
            self.events.append("statement cancelled")
            raise
        self.events.append("statement returned")
        try:
            await asyncio.Event().wait()  # the cancellation is delivered here
        except asyncio.CancelledError:
            self.events.append("handler cancelled")
            raise

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.disconnected.set()


@pytest.fixture
def recorder() -> type[Recorder]:
    class Handler(Recorder):
        events: ClassVar[list[str]] = []
        disconnected: ClassVar[asyncio.Event] = asyncio.Event()
        ended: ClassVar[asyncio.Event] = asyncio.Event()

    return Handler


@asynccontextmanager
async def lock_held(db: SessionManager) -> AsyncIterator[AsyncConnection]:
    """Hold the advisory lock in a transaction of its own until the block ends."""
    async with db.engine.connect() as conn:
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({LOCK})"))
        yield conn
        await conn.rollback()


async def waiting_for_the_lock(db: SessionManager) -> int:
    """How many backends wait for the test's lock (from a connection of its own)."""
    async with db.engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND objid = :lock AND NOT granted"
        )
        return int(await conn.scalar(query, {"lock": LOCK}) or 0)


async def until_waiting(db: SessionManager, expected: int) -> None:
    with anyio.fail_after(10):
        # Bounded polling: the server offers no event for "a backend now waits on a lock".
        while await waiting_for_the_lock(db) != expected:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def invalidations(db: SessionManager) -> list[object]:
    seen: list[object] = []
    event.listen(db.engine.sync_engine.pool, "invalidate", lambda *args: seen.append(args))
    return seen


async def test_a_statement_in_flight_finishes_and_its_connection_is_kept(
    pg_db: SessionManager, recorder: type[Recorder]
) -> None:
    invalidated = invalidations(pg_db)
    app = tornado.web.Application([(r"/r", recorder)], session_manager=pg_db)
    async with serve(app) as server:
        async with lock_held(pg_db) as holder:
            _, writer = await server.open_raw(REQUEST)
            await until_waiting(pg_db, 1)  # the handler's statement runs on the server
            writer.close()
            with anyio.fail_after(10):
                await recorder.disconnected.wait()
            # Still running: the disconnect did not cut the round trip off.
            assert ["statement"] == recorder.events
            assert 1 == await waiting_for_the_lock(pg_db)
            assert 2 == checked_out(pg_db)  # the handler's and the lock holder's
            await holder.rollback()  # the statement returns
        await wait_until_released(pg_db)
        with anyio.fail_after(10):
            await recorder.ended.wait()
    assert ["statement", "statement returned", "handler cancelled"] == recorder.events
    assert [] == invalidated  # the connection went back to the pool, not away
    assert 0 == await count_users(pg_db, "abandoned")


async def test_a_statement_running_past_the_grace_period_is_cut_off(
    pg_db: SessionManager, recorder: type[Recorder]
) -> None:
    class Impatient(recorder):  # type: ignore[misc,valid-type]
        disconnect_grace = 0.05

    invalidated = invalidations(pg_db)
    app = tornado.web.Application([(r"/r", Impatient)], session_manager=pg_db)
    async with serve(app) as server, lock_held(pg_db):
        _, writer = await server.open_raw(REQUEST)
        await until_waiting(pg_db, 1)
        writer.close()
        # The lock is still held: only the grace period can end the request.
        with anyio.fail_after(10):
            while checked_out(pg_db) != 1:  # noqa: ASYNC110 - bounded polling of the pool
                await anyio.sleep(0.01)
        await until_waiting(pg_db, 0)  # and the statement was cancelled on the server
        assert ["statement", "statement cancelled"] == recorder.events
        assert 1 == len(invalidated)  # the price of cutting a round trip off
    await wait_until_released(pg_db)
    assert 0 == await count_users(pg_db, "abandoned")


@pytest.fixture
async def one_connection(postgres_url: str) -> AsyncIterator[SessionManager]:
    async for manager in _managed(postgres_url, pool_size=1, max_overflow=0):
        yield manager


async def test_a_handler_waiting_for_a_pool_connection_is_cancelled_at_once(
    one_connection: SessionManager, pg_db: SessionManager, recorder: type[Recorder]
) -> None:
    db = one_connection
    queued: list[str] = []
    queued_started = asyncio.Event()

    class Queued(SessionMixin, tornado.web.RequestHandler):
        async def post(self) -> None:
            queued_started.set()
            try:
                await self.session.execute(text("SELECT 1"))  # waits for the only connection
            except asyncio.CancelledError:
                queued.append("cancelled while waiting")
                raise
            queued.append("ran")

    app = tornado.web.Application([(r"/r", recorder), (r"/q", Queued)], session_manager=db)
    async with serve(app) as server:
        async with lock_held(pg_db) as holder:  # pg_db: a pool of its own
            _, first = await server.open_raw(REQUEST)  # takes the pool's only connection
            await until_waiting(pg_db, 1)
            _, second = await server.open_raw(REQUEST.replace(b"/r", b"/q"))
            with anyio.fail_after(10):
                # Set right before the execute, which then waits in the pool's queue.
                await queued_started.wait()
            second.close()
            with anyio.fail_after(10):
                while not queued:  # noqa: ASYNC110 - bounded polling of the handler's progress
                    await anyio.sleep(0.01)
            # Cancelled while the first request still holds the only connection.
            assert ["cancelled while waiting"] == queued
            assert ["statement"] == recorder.events
            await holder.rollback()
            first.close()
        await wait_until_released(db)
    assert ["cancelled while waiting"] == queued
