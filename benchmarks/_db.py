"""Databases and tables for benchmarks.

PostgreSQL: ``TASKSESSION_BENCH_DATABASE_URL``, else a throwaway cluster started
here; SQLite: a database file in a temporary directory. Every benchmark declares
its tables on :class:`Base` and creates (and drops) only its own.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from sqlalchemy import Integer, String, insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ENV_URL = "TASKSESSION_BENCH_DATABASE_URL"


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """Yield a PostgreSQL URL; a cluster started here is stopped afterwards."""
    url = os.environ.get(ENV_URL)
    if url:
        yield url
        return
    from tests.postgres_server import start_cluster

    server = start_cluster()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def sqlite_url() -> Iterator[str]:
    """Yield the URL (aiosqlite) of a SQLite database file, removed afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        yield f"sqlite+aiosqlite:///{directory}/bench.db"


class Base(DeclarativeBase):
    """The benchmarks' tables (each benchmark recreates only its own: :func:`recreate`)."""


class ItemColumns:
    """``id`` (primary key) and ``name``: the columns of an item table.

    A mixin, so that each benchmark has a table of its own::

        class Item(ItemColumns, Base):
            __tablename__ = "bench_<topic>_items"
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


async def recreate(
    engine: AsyncEngine, model: type[Base], rows: int = 0, **columns: object
) -> None:
    """Drop and create ``model``'s table (no other), with ``rows`` item rows.

    Row ``i`` has ``id`` i, ``name`` ``"item {i}"`` and the values in ``columns``.
    """
    table = Base.metadata.tables[model.__tablename__]
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all, tables=[table])
        await conn.run_sync(Base.metadata.create_all, tables=[table])
        if rows:
            await conn.execute(
                insert(table), [{"id": i, "name": f"item {i}", **columns} for i in range(rows)]
            )
