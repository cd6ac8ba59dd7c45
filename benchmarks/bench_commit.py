"""Ending a unit of work: do tasksession's short ways earn their keep? (issue 14)

A scope ends a unit that leaves the ORM nothing to do (nothing to flush, no
listeners, nothing to expire) without SQLAlchemy's commit machinery
(``tasksession._shortcuts``). What that saves, on PostgreSQL (asyncpg) and
SQLite (aiosqlite), for a unit that did one small INSERT (a Core ``insert``
through the session: nothing for the ORM to flush) or one SELECT (a primary-key
``get``) in a transaction, ended three ways on the same engine by sessions made
alike (``expire_on_commit=False``, tasksession's default, which the short ways
need):

1. ``ORM commit + close``: ``await session.commit(); await session.close()``
   (the reference);
2. ``connection-level short way``: ``commits_like_its_connections()``, then
   ``commit_connections_and_close`` through ``greenlet_spawn``;
3. ``driver short way``: the same check, ``driver_commit()``, then
   ``commit_through_the_driver()`` (asyncpg only: skipped on SQLite).

A short way is timed with the checks that choose it: dropping it drops them too.
``ORM commit + close, again`` is (1) once more, as a variant of its own: the same
code, so the spread of its ratio to (1) across rounds is this machine's noise.
Every ending is checked once to have committed, and every table to end with no
connection checked out.

Then the whole unit as it is today: ``async with db.scope() as s: <work>``
(``tasksession.SessionManager``, short ways included) vs
``async with AsyncSession(engine) as s: <work>; await s.commit()``.

Verdict per short way, on its client CPU µs/op ratio to (1), paired per round
(what a short way saves is client CPU, and CPU per op is less sensitive to noise
than ops/s; the ops/s ratio is printed alongside): ``worth keeping`` when the
median ratio lies below the noise band, the middle half (p25-p75) of the noise
control's ratios across rounds; ``slower`` when above it; else ``within noise``.
Also printed: in how many rounds a variant beat (1) (identical code: about half).
``python -m benchmarks commit [--quick]``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import QueuePool

from tasksession import SessionManager

from ._db import Base, ItemColumns, postgres_url, recreate, sqlite_url
from ._harness import Args, Row, Table, Variant, throughput

ROWS = 1_000
#: Rounds per ``--rounds`` and slices per ``--seconds`` (one slice per variant and
#: round). The harness collects garbage before every slice, about 25 ms on the
#: 2-core box with SQLAlchemy loaded, so the 22 variants of this module's 8 tables
#: take fewer, longer slices than the other benchmarks' ``FINE``: a full run is
#: about 50 s.
ROUNDS_PER_ROUND = 2
SLICES_PER_SECOND = 16

ORM = "ORM commit + close"
CONTROL = "ORM commit + close, again"
CONNECTION_LEVEL = "connection-level short way"
DRIVER = "driver short way"
HAND_WRITTEN = "hand-written AsyncSession + commit"
SCOPE = "db.scope()"

Work = Callable[[AsyncSession], Awaitable[object]]
End = Callable[[AsyncSession], Awaitable[None]]


class Item(ItemColumns, Base):
    __tablename__ = "bench_commit_items"


class Written(ItemColumns, Base):
    __tablename__ = "bench_commit_written"


def endings() -> dict[str, End]:
    """The three ways of ending a unit (and the control, the first once more)."""
    # Imported here: a rename in tasksession._shortcuts fails this benchmark at once.
    from sqlalchemy.util import greenlet_spawn

    from tasksession._shortcuts import (
        commit_connections_and_close,
        commit_through_the_driver,
        commits_like_its_connections,
        driver_commit,
    )

    async def orm(session: AsyncSession) -> None:
        await session.commit()
        await session.close()

    async def connection_level(session: AsyncSession) -> None:
        sync = session.sync_session
        if not commits_like_its_connections(sync):
            raise RuntimeError(f"the {CONNECTION_LEVEL} does not apply to this unit")
        await greenlet_spawn(commit_connections_and_close, sync)

    async def driver(session: AsyncSession) -> None:
        sync = session.sync_session
        through = driver_commit(sync) if commits_like_its_connections(sync) else None
        if through is None:
            raise RuntimeError(f"the {DRIVER} does not apply to this unit")
        await commit_through_the_driver(sync, *through)

    return {ORM: orm, CONTROL: orm, CONNECTION_LEVEL: connection_level, DRIVER: driver}


def unit(engine: AsyncEngine, work: Work, end: End) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        session = AsyncSession(engine, expire_on_commit=False)
        await work(session)
        await end(session)

    return op


def hand_written(engine: AsyncEngine, work: Work) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        async with AsyncSession(engine) as session:
            await work(session)
            await session.commit()

    return op


def in_scope(db: SessionManager, work: Work) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        async with db.scope() as session:
            await work(session)

    return op


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def check_commits(engine: AsyncEngine, ends: dict[str, End]) -> None:
    """Each ending commits: its unit's row is there, seen from another connection."""
    for name, end in ends.items():
        marker = f"check: {name}"
        session = AsyncSession(engine, expire_on_commit=False)
        await session.execute(insert(Written).values(name=marker))
        await end(session)
        async with engine.connect() as conn:
            found = await conn.scalar(
                select(func.count()).select_from(Written).where(Written.name == marker)
            )
        assert found == 1, f"{name}: the unit's INSERT was not committed"


async def durability(engine: AsyncEngine) -> str:
    """What a COMMIT waits for on this database (a note under each table)."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            version = await conn.scalar(text("SHOW server_version"))
            fsync = await conn.scalar(text("SHOW fsync"))
            synchronous = await conn.scalar(text("SHOW synchronous_commit"))
            return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={synchronous}"
        journal = await conn.scalar(text("PRAGMA journal_mode"))
        synchronous = await conn.scalar(text("PRAGMA synchronous"))
        version = await conn.scalar(text("SELECT sqlite_version()"))
        return f"SQLite {version}, journal_mode={journal}, synchronous={synchronous} (2 = FULL)"


def band(values: Sequence[float]) -> tuple[float, float]:
    """The middle half of ``values``: (p25, p75)."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def against_noise(median: float, noise: Sequence[float], *, lower_wins: bool) -> str:
    """Where ``median`` lies against the noise band: ``"better"``, ``"worse"`` or within."""
    low, high = band(noise)
    if median < low:
        return "better" if lower_wins else "worse"
    if median > high:
        return "worse" if lower_wins else "better"
    return "within noise"


def describe(row: Row) -> str:
    """The median ratios, their spread across rounds and the rounds won, CPU and ops/s."""
    assert row.cpu_ratio is not None
    assert row.ratio is not None
    cpu_low, cpu_high = band(row.cpu_ratios)
    low, high = band(row.ratios)
    rounds = len(row.ratios)
    cpu_won = sum(r < 1 for r in row.cpu_ratios)
    won = sum(r > 1 for r in row.ratios)
    return (
        f"CPU/op {row.cpu_ratio:.3f}x [p25-p75 {cpu_low:.3f}-{cpu_high:.3f}, less CPU in "
        f"{cpu_won}/{rounds} rounds], ops/s {row.ratio:.3f}x [{low:.3f}-{high:.3f}, "
        f"faster in {won}/{rounds}]"
    )


def print_verdicts(table: Table, ways: Sequence[str]) -> None:
    control = table.row(CONTROL)
    print(f"  noise band ({CONTROL} vs {ORM}): {describe(control)}")
    for way in ways:
        row = table.row(way)
        assert row.cpu_ratio is not None
        assert row.ratio is not None
        cpu = against_noise(row.cpu_ratio, control.cpu_ratios, lower_wins=True)
        verdict = {"better": "worth keeping", "worse": "slower"}.get(cpu, cpu)
        speed = against_noise(row.ratio, control.ratios, lower_wins=False)
        print(f"  verdict: {way}: {verdict} (ops/s: {speed}; {describe(row)})")


async def compare(db: SessionManager, args: Args, database: str) -> None:
    engine = db.engine
    asyncpg = engine.dialect.driver == "asyncpg"
    ends = endings()
    if not asyncpg:
        del ends[DRIVER]
    await recreate(engine, Item, ROWS)
    await recreate(engine, Written)
    await check_commits(engine, ends)
    statement = insert(Written).values(name="written")
    rng = random.Random(42)

    async def insert_one(session: AsyncSession) -> None:
        await session.execute(statement)

    async def select_one(session: AsyncSession) -> None:
        await session.get(Item, rng.randrange(ROWS))

    settings = await durability(engine)

    async def measure(variants: list[Variant], reference: str) -> Table:
        table = await throughput(
            variants,
            reference=reference,
            rounds=args.rounds * ROUNDS_PER_ROUND,
            seconds=args.seconds / SLICES_PER_SECOND,
        )
        assert checked_out(engine) == 0
        return table

    works: list[tuple[str, Work]] = [
        ("one INSERT", insert_one),
        ("one SELECT (PK get)", select_one),
    ]
    for what, work in works:
        table = await measure(
            [Variant(name, unit(engine, work, end)) for name, end in ends.items()], ORM
        )
        table.notes.append(settings)
        table.print(f"{database}: a unit that did {what}, ended three ways")
        if not asyncpg:
            print(
                f"  skipped: {DRIVER} (driver_commit + commit_through_the_driver): asyncpg "
                f"only, and this engine's driver is {engine.dialect.driver}"
            )
        print_verdicts(table, [way for way in (CONNECTION_LEVEL, DRIVER) if way in ends])

    for what, work in works:
        table = await measure(
            [Variant(HAND_WRITTEN, hand_written(engine, work)), Variant(SCOPE, in_scope(db, work))],
            HAND_WRITTEN,
        )
        table.notes.append(
            "the hand-written unit keeps AsyncSession's defaults (expire_on_commit=True), "
            "as in bench_scope; db.scope() is the whole unit as tasksession runs it today"
        )
        if not asyncpg:
            table.notes.append(
                "on SQLite, tasksession begins a writable scope's transaction IMMEDIATE; "
                "the hand-written session's BEGIN is deferred"
            )
        table.print(f"{database}: the whole unit ({what}), db.scope() vs hand-written")
        print(f"  {SCOPE} vs {HAND_WRITTEN}: {describe(table.row(SCOPE))}")


async def main(args: Args) -> None:
    with postgres_url() as url:
        async with SessionManager(url) as db:
            await compare(db, args, "PostgreSQL (asyncpg)")
    with sqlite_url() as url:
        async with SessionManager(url) as db:
            await compare(db, args, "SQLite (aiosqlite)")
