"""Fan database work out over tasks, the right way: ``db.task_group()``.

Run it from the repository root::

    .venv/bin/python examples/fan_out.py

It uses a throwaway SQLite database in a temporary directory (set
``TASKSESSION_DATABASE_URL`` to use another database, e.g.
``postgresql+asyncpg://user@localhost/db``; it creates and drops the tables
``fan_out_products`` and ``fan_out_prices``), and shows:

1. the wrong way: ``asyncio.gather`` over one scope's session is refused with
   ``ConcurrentSessionError`` before anything reaches the database;
2. fanned-out reads: ``db.task_group(readonly=True)``, one session per child;
3. fanned-out writes: ``db.task_group()``, each child commits its own work;
4. a failing child: its work is rolled back, running siblings are cancelled and
   rolled back, but **siblings that already finished stay committed** (the
   children's commits are independent, not atomic);
5. all-or-nothing: writes that must succeed together go in one scope.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tasksession import ConcurrentSessionError, SessionManager


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "fan_out_products"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class Price(Base):
    __tablename__ = "fan_out_prices"

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("fan_out_products.id"))
    cents: Mapped[int]


db = SessionManager()


async def price_count(product_id: int) -> int:
    """A read: any function the child calls reaches the child's session through db.session."""
    count = await db.session.scalar(
        select(func.count(Price.id)).where(Price.product_id == product_id)
    )
    return int(count or 0)


async def add_prices(product_id: int, prices: list[int]) -> None:
    """A write: committed when this child returns, rolled back if it raises."""
    for cents in prices:
        if cents <= 0:
            raise ValueError(f"price {cents} for product {product_id} is not positive")
        db.session.add(Price(product_id=product_id, cents=cents))
    await db.session.flush()


async def prices_of_all_products() -> dict[str, int]:
    async with db.scope(readonly=True) as session:
        rows = await session.execute(
            select(Product.name, func.count(Price.id))
            .outerjoin(Price, Price.product_id == Product.id)
            .group_by(Product.name)
            .order_by(Product.name)
        )
        return {name: count for name, count in rows}


async def tour() -> None:
    async with db.scope() as session:
        products = [Product(name=name) for name in ("apple", "pear", "plum", "fig")]
        session.add_all(products)
        await session.flush()
        ids = {product.name: product.id for product in products}

    print("1. The wrong way: gather over one session")
    async with db.scope() as session:
        results = await asyncio.gather(
            *(session.get(Product, product_id) for product_id in ids.values()),
            return_exceptions=True,
        )
    refused = [r for r in results if isinstance(r, ConcurrentSessionError)]
    print(f"   {len(refused)} of {len(results)} calls refused: ConcurrentSessionError")
    print(f"   (counted in statistics(): {db.statistics().concurrent_violations})")

    print("2. Fanned-out reads: one session per child")
    counts: dict[str, int] = {}

    async def count_into(name: str) -> None:
        counts[name] = await price_count(ids[name])

    async with db.task_group(readonly=True) as tg:
        for name in ids:
            tg.start_soon(count_into, name)
    print(f"   price counts: {dict(sorted(counts.items()))}")

    print("3. Fanned-out writes: each child commits its own work")
    async with db.task_group() as tg:
        tg.start_soon(add_prices, ids["apple"], [120, 130])
        tg.start_soon(add_prices, ids["pear"], [90])
    print(f"   committed: {await prices_of_all_products()}")

    print("4. A failing child rolls back its own work only")
    try:
        async with db.task_group() as tg:
            tg.start_soon(add_prices, ids["plum"], [200])
            tg.start_soon(add_prices, ids["fig"], [150, -1])
    except* ValueError as group:
        print(f"   the group raised: {group.exceptions[0]}")
    after = await prices_of_all_products()
    assert after["fig"] == 0, "the failing child's work must be rolled back"
    print(
        f"   fig: {after['fig']} prices (rolled back); plum: {after['plum']} "
        "(committed if it finished before fig failed, else cancelled and rolled back)"
    )

    print("5. All or nothing: one scope, one transaction")
    try:
        async with db.scope():
            await add_prices(ids["plum"], [210])
            await add_prices(ids["fig"], [160, -1])
    except ValueError as error:
        print(f"   the scope rolled back everything: {error}")
    assert after == await prices_of_all_products()
    print(f"   unchanged: {await prices_of_all_products()}")


async def main() -> None:
    url = os.environ.get("TASKSESSION_DATABASE_URL")
    with tempfile.TemporaryDirectory() as tmp:
        db.configure(url or f"sqlite+aiosqlite:///{tmp}/fan_out.db", pool_size=5)
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        try:
            await tour()
        finally:
            async with db.engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
            await db.dispose()


if __name__ == "__main__":
    # ConcurrentSessionError is also logged at WARNING; keep this demo's output short.
    import logging

    logging.getLogger("tasksession").setLevel(logging.ERROR)
    asyncio.run(main())
    sys.exit(0)
