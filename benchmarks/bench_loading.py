"""Implicit I/O protection cost (issue 4 target), on PostgreSQL and SQLite.

A 100-row ORM select inside a scope, every column of every row read, with the
protection installed (the tasksession default) vs. removed
(``_loading.uninstall()``): ops/s ratio ≥ 0.98 and client CPU ratio ≤ 1.02.

The protection is a subclass of each attribute implementation that SQLAlchemy
reaches only when an attribute is *not* loaded, so a query and the reads of
loaded attributes should cost the same with and without it.
"""

from __future__ import annotations

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from tasksession import SessionManager, _loading

from ._db import Base, ItemColumns, postgres_url, recreate, sqlite_url
from ._harness import FINE, Args, Target, Variant, throughput

ROWS = 1_000
BATCH = 100


class Item(ItemColumns, Base):
    __tablename__ = "bench_loading_items"

    note: Mapped[str] = mapped_column(String(50))


async def compare(db: SessionManager, args: Args, title: str) -> None:
    statement = select(Item).where(Item.id < BATCH)
    state = {"protected": True}

    def want(protected: bool) -> None:
        # Switched once per variant run (the harness runs a variant for seconds).
        if state["protected"] != protected:
            (_loading.install if protected else _loading.uninstall)()
            state["protected"] = protected

    async def select_100() -> None:
        async with db.scope() as session:
            for item in await session.scalars(statement):
                item.id, item.name, item.note  # noqa: B018

    async def unprotected() -> None:
        want(False)
        await select_100()

    async def protected() -> None:
        want(True)
        await select_100()

    table = await throughput(
        [Variant("without protection", unprotected), Variant("with protection", protected)],
        reference="without protection",
        rounds=args.rounds * FINE,
        seconds=args.seconds / FINE,
    )
    want(True)
    assert _loading.is_protected(Item.__mapper__)
    table.print(
        title,
        targets={
            "with protection": Target("cpu_ratio", "<=", 1.02),
        },
    )


async def main(args: Args) -> None:
    with postgres_url() as url:
        async with SessionManager(url) as db:
            await recreate(db.engine, Item, ROWS, note="n")
            await compare(db, args, "100-row ORM select in a scope, PostgreSQL (asyncpg)")
    with sqlite_url() as url:
        async with SessionManager(url) as db:
            await recreate(db.engine, Item, ROWS, note="n")
            await compare(db, args, "100-row ORM select in a scope, SQLite (aiosqlite)")
