"""Cancellation safety of scopes, on real PostgreSQL.

A matrix of *where* the unit of work is when the cancellation arrives (phase)
times *how* it is cancelled (kind). Every cell checks the same properties:

* the pool has no connection checked out and no scope is open;
* no server backend of the victim is left ``idle in transaction``;
* no statement of the victim keeps running on the server (the victim's
  connections run with ``client_connection_check_interval=0``, so only an
  explicit cancel can stop an orphaned statement, as on a user's server);
* the unit is never half-committed: both of its rows or neither;
* no warning (``non-checked-in connection`` and friends).

Pauses are real: a pool with no free connection, ``pg_sleep``, triggers that
block on advisory locks the test holds, and a rollback hook that waits on an
event; the test synchronizes on ``pg_stat_activity`` and events, never sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import Integer, MetaData, String, event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

from tasksession import SessionManager

from .helpers import eventually

pytestmark = pytest.mark.anyio

APP = "ts-cancel-victim"
FLUSH_LOCK = 71001
COMMIT_LOCK = 71002


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "cancel_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit: Mapped[str] = mapped_column(String(40))


# A row with unit 'flush-blocked' waits for FLUSH_LOCK while it is inserted; a row
# with unit 'commit-blocked' waits for COMMIT_LOCK in a deferred trigger, at COMMIT.
TRIGGERS = [
    f"""
    CREATE FUNCTION cancel_items_block_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock({FLUSH_LOCK}); RETURN NEW; END $$
    """,
    """
    CREATE TRIGGER cancel_items_block_insert BEFORE INSERT ON cancel_items
    FOR EACH ROW WHEN (NEW.unit = 'flush-blocked')
    EXECUTE FUNCTION cancel_items_block_insert()
    """,
    f"""
    CREATE FUNCTION cancel_items_block_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock({COMMIT_LOCK}); RETURN NULL; END $$
    """,
    """
    CREATE CONSTRAINT TRIGGER cancel_items_block_commit AFTER INSERT ON cancel_items
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.unit = 'commit-blocked')
    EXECUTE FUNCTION cancel_items_block_commit()
    """,
]


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS cancel_items"))
        await conn.execute(text("DROP FUNCTION IF EXISTS cancel_items_block_insert"))
        await conn.execute(text("DROP FUNCTION IF EXISTS cancel_items_block_commit"))
        await conn.run_sync(Base.metadata.create_all)
        for statement in TRIGGERS:
            await conn.execute(text(statement))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def victim_db(postgres_url: str, admin: AsyncEngine) -> AsyncIterator[SessionManager]:
    """A db with ONE pooled connection whose backends never notice a vanished client."""
    db = SessionManager(
        postgres_url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=10,
        connect_args={
            "server_settings": {"application_name": APP, "client_connection_check_interval": "0"}
        },
    )
    try:
        yield db
    finally:
        await db.dispose()


async def victim_backends(admin: AsyncEngine) -> list[tuple[str, str]]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT coalesce(state, ''), query FROM pg_stat_activity "
                "WHERE application_name = :app AND datname = current_database()"
            ),
            {"app": APP},
        )
        return [(state, query) for state, query in rows]


async def wait_for_backend(admin: AsyncEngine, state: str, query_start: str) -> None:
    """Wait until a victim backend is in ``state`` running a query starting with ``query_start``."""

    async def running() -> bool:
        return any(
            s == state and q.lstrip().startswith(query_start)
            for s, q in await victim_backends(admin)
        )

    await eventually(running)


async def assert_server_clean(admin: AsyncEngine) -> None:
    """No victim backend is running a statement or idle in a transaction (bounded wait)."""
    busy: list[tuple[str, str]] = []
    try:
        with anyio.fail_after(3):
            while True:
                busy = [
                    (s, q)
                    for s, q in await victim_backends(admin)
                    if s == "active" or s.startswith("idle in transaction")
                ]
                if not busy:
                    return
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"victim backends still busy on the server: {busy}")


async def unit_rows(admin: AsyncEngine, unit: str) -> int:
    async with admin.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM cancel_items WHERE unit IN (:unit, :blocked)"),
            {"unit": unit, "blocked": f"{unit}-blocked"},
        )
        return int(count or 0)


class Victim:
    """Runs ``body`` in a task that the test cancels in one of five ways.

    ``cancel_scope`` / ``move_on_after``: anyio (which re-delivers the cancellation
    at every checkpoint); ``task_cancel``: one native ``Task.cancel()``;
    ``cancel_twice_at_once``: two back to back; ``cancel_twice``: a second one
    once the scope is already tearing down.
    """

    def __init__(self, kind: str, body: Callable[[], Awaitable[None]]) -> None:
        self.kind = kind
        self.body = body
        self.cancel_scope: anyio.CancelScope | None = None
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        if self.kind == "cancel_scope":
            with anyio.CancelScope() as self.cancel_scope:
                await self.body()
        elif self.kind == "move_on_after":
            with anyio.move_on_after(3600) as self.cancel_scope:
                await self.body()
        else:
            await self.body()

    async def cancel(self, db: SessionManager) -> None:
        if self.kind == "cancel_scope":
            assert self.cancel_scope is not None
            self.cancel_scope.cancel()
        elif self.kind == "move_on_after":
            assert self.cancel_scope is not None
            self.cancel_scope.deadline = anyio.current_time()  # the timeout expires now
        else:
            self.task.cancel()
            if self.kind == "cancel_twice_at_once":
                await anyio.lowlevel.checkpoint()
                self.task.cancel()
            elif self.kind == "cancel_twice":

                async def tearing_down() -> bool:
                    return not db.active_scopes() or self.task.done()

                # The second cancel arrives once the scope is tearing down.
                await eventually(tearing_down)
                self.task.cancel()

    async def outcome(self) -> BaseException | None:
        with anyio.fail_after(10):
            await asyncio.wait([self.task])
        if self.task.cancelled():
            return asyncio.CancelledError()
        return self.task.exception()


KINDS = ["cancel_scope", "move_on_after", "task_cancel", "cancel_twice_at_once", "cancel_twice"]
NATIVE = ("task_cancel", "cancel_twice_at_once", "cancel_twice")


def assert_cancelled(victim: Victim, outcome: BaseException | None) -> None:
    if victim.kind in NATIVE:
        assert isinstance(outcome, asyncio.CancelledError), outcome
    else:
        assert victim.cancel_scope is not None
        assert victim.cancel_scope.cancel_called
        assert outcome is None, outcome


async def assert_all_clean(db: SessionManager, admin: AsyncEngine) -> None:
    assert 0 == db.statistics().pool_checked_out, db.engine.sync_engine.pool.status()
    assert [] == db.active_scopes()
    await assert_server_clean(admin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [] == [str(w.message) for w in caught]


async def cancel_mid_statement(
    db: SessionManager,
    admin: AsyncEngine,
    kind: str,
    body: Callable[[], Awaitable[None]],
    *,
    unit: str,
) -> None:
    """Cancel ``body`` while its ``pg_sleep(30)`` runs; check nothing is left and nothing landed."""
    victim = Victim(kind, body)
    await wait_for_backend(admin, "active", "SELECT pg_sleep(30)")
    await victim.cancel(db)
    outcome = await victim.outcome()
    assert_cancelled(victim, outcome)
    await assert_all_clean(db, admin)
    assert 0 == await unit_rows(admin, unit)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_while_waiting_for_a_connection(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    release = anyio.Event()
    holding = anyio.Event()

    async def holder() -> None:
        async with victim_db.scope(name="holder") as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await release.wait()

    async def body() -> None:
        async with victim_db.scope(name="victim") as session:
            session.add_all([Item(id=1, unit="checkout"), Item(id=2, unit="checkout")])
            await session.execute(text("SELECT 1"))  # waits: the only connection is held

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await holding.wait()
        victim = Victim(kind, body)
        await anyio.wait_all_tasks_blocked()
        await victim.cancel(victim_db)
        outcome = await victim.outcome()
        release.set()
    assert_cancelled(victim, outcome)
    assert 0 == await unit_rows(admin, "checkout")
    await assert_all_clean(victim_db, admin)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_mid_statement_stops_the_statement_on_the_server(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    async def body() -> None:
        async with victim_db.scope() as session:
            session.add_all([Item(id=1, unit="statement"), Item(id=2, unit="statement")])
            await session.flush()
            await session.execute(text("SELECT pg_sleep(30)"))

    await cancel_mid_statement(victim_db, admin, kind, body, unit="statement")


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_mid_flush_stops_the_insert_on_the_server(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    async def body() -> None:
        async with victim_db.scope() as session:
            session.add(Item(id=1, unit="flush"))
            await session.flush()
            session.add(Item(id=2, unit="flush-blocked"))
            await session.flush()  # blocks in the trigger, on FLUSH_LOCK

    async with admin.connect() as lock:
        await lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": FLUSH_LOCK})
        victim = Victim(kind, body)
        await wait_for_backend(admin, "active", "INSERT INTO cancel_items")
        await victim.cancel(victim_db)
        outcome = await victim.outcome()
        # Still holding the lock: an orphaned INSERT would still be waiting for it.
        await assert_all_clean(victim_db, admin)
        await lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": FLUSH_LOCK})
    assert_cancelled(victim, outcome)
    assert 0 == await unit_rows(admin, "flush")


@pytest.mark.parametrize("written", ["orm", "core"])
@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_mid_commit_lets_the_commit_finish_whole(
    victim_db: SessionManager, admin: AsyncEngine, kind: str, written: str
) -> None:
    # "core": nothing left for the ORM to flush, so the scope commits the short
    # way (at the connection level); the same guarantee holds.
    async def body() -> None:
        async with victim_db.scope() as session:
            rows = [Item(id=1, unit="commit"), Item(id=2, unit="commit-blocked")]
            if written == "orm":
                session.add_all(rows)
            else:
                for row in rows:
                    await session.execute(insert(Item).values(id=row.id, unit=row.unit))
        # exit: COMMIT runs the deferred trigger, which waits for COMMIT_LOCK

    async with admin.connect() as lock:
        await lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": COMMIT_LOCK})
        victim = Victim(kind, body)
        await wait_for_backend(admin, "active", "COMMIT")
        await victim.cancel(victim_db)
        await lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": COMMIT_LOCK})
        outcome = await victim.outcome()
    # The teardown is shielded: a commit already under way completes, then the
    # cancellation is delivered. Never half a unit.
    if victim.kind in NATIVE:
        assert isinstance(outcome, asyncio.CancelledError), outcome
    else:
        assert outcome is None, outcome
    assert 2 == await unit_rows(admin, "commit")
    await assert_all_clean(victim_db, admin)


class Gate:
    """A rollback hook that pauses the teardown's ROLLBACK until released."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def __call__(self, connection: Any) -> None:
        self.reached.set()
        await_only(self.release.wait())


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_during_teardown_rollback_finishes_the_rollback(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    gate = Gate()

    async def body() -> None:
        async with victim_db.scope() as session:
            session.add_all([Item(id=1, unit="close"), Item(id=2, unit="close")])
            await session.flush()
            raise LookupError("the unit fails; its scope rolls back")

    sync_engine = victim_db.engine.sync_engine
    event.listen(sync_engine, "rollback", gate)
    try:
        victim = Victim(kind, body)
        with anyio.fail_after(10):
            await gate.reached.wait()
        await victim.cancel(victim_db)
        gate.release.set()
        outcome = await victim.outcome()
    finally:
        event.remove(sync_engine, "rollback", gate)
    if victim.kind in NATIVE:
        assert isinstance(outcome, asyncio.CancelledError), outcome
    else:
        assert isinstance(outcome, LookupError), outcome
    assert 0 == await unit_rows(admin, "close")
    await assert_all_clean(victim_db, admin)


async def test_cancel_mid_statement_keeps_the_pool_usable(
    victim_db: SessionManager, admin: AsyncEngine
) -> None:
    victim = Victim("cancel_scope", _sleeping_unit(victim_db))
    await wait_for_backend(admin, "active", "SELECT pg_sleep(30)")
    await victim.cancel(victim_db)
    await victim.outcome()
    async with victim_db.scope() as session:
        session.add(Item(id=7, unit="after"))
    assert 1 == await unit_rows(admin, "after")
    await assert_all_clean(victim_db, admin)


async def test_cancel_while_idle_in_transaction_returns_the_connection_intact(
    victim_db: SessionManager, admin: AsyncEngine
) -> None:
    idle = anyio.Event()
    pids: list[int] = []

    async def body() -> None:
        async with victim_db.scope() as session:
            pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
            idle.set()
            await anyio.sleep_forever()

    victim = Victim("cancel_scope", body)
    with anyio.fail_after(10):
        await idle.wait()
    await victim.cancel(victim_db)
    await victim.outcome()
    await assert_all_clean(victim_db, admin)
    async with victim_db.scope() as session:
        # Same backend: the connection went back to the pool, not invalidated.
        assert pids[0] == await session.scalar(text("SELECT pg_backend_pid()"))


def _sleeping_unit(db: SessionManager) -> Callable[[], Awaitable[None]]:
    async def body() -> None:
        async with db.scope() as session:
            await session.execute(text("SELECT pg_sleep(30)"))

    return body


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_mid_statement_in_a_savepoint_scope(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    async def body() -> None:
        async with victim_db.scope() as session:
            session.add(Item(id=1, unit="savepoint"))
            async with victim_db.scope(savepoint=True) as inner:
                inner.add(Item(id=2, unit="savepoint"))
                await inner.flush()
                await inner.execute(text("SELECT pg_sleep(30)"))

    await cancel_mid_statement(victim_db, admin, kind, body, unit="savepoint")


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_a_task_group_whose_child_is_mid_statement(
    victim_db: SessionManager, admin: AsyncEngine, kind: str
) -> None:
    async def child() -> None:
        session = victim_db.session
        session.add_all([Item(id=1, unit="group"), Item(id=2, unit="group")])
        await session.flush()
        await session.execute(text("SELECT pg_sleep(30)"))

    async def body() -> None:
        async with victim_db.task_group() as tg:
            tg.start_soon(child)

    await cancel_mid_statement(victim_db, admin, kind, body, unit="group")
