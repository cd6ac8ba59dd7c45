"""The stray-engine guard: inside an isolated test, only the isolated database may be used.

Django's ``databases`` idea: a test declares the databases it uses, and a query
through any other fails instead of writing to a database that other tests (or
people) share. Here, while an :func:`~tasksession.testing.isolated` block is
open, every pool checkout in the process is checked: it must come from a pool
the block isolated (clone mode: the clone's engines) or one it was told to
allow (``allow=``). In savepoint mode the test's one connection was checked out
before the guard started, so *every* checkout fails, the manager's own engine
included (``db.engine.connect()`` would bypass the test transaction).

The check is a class-level ``checkout`` listener on SQLAlchemy's ``Pool``,
installed while at least one block is open and removed after the last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from tasksession import TaskSessionError

from ._frames import application_frame

__all__ = ["StrayEngineError", "only_these_pools"]

# One entry per open isolated() block: the pools it lets tests check out from.
_ALLOWED: list[frozenset[Pool]] = []


class StrayEngineError(TaskSessionError):
    """Inside an isolated test, a connection was asked of an engine the test did not isolate."""

    error_code = "ts-stray-engine"

    def __init__(self, pool: str, where: str) -> None:
        self.pool, self.where = pool, where
        super().__init__(
            f"A connection was checked out at {where} from a pool the test did not isolate "
            f"({pool}). Inside `isolated(db)` (the tasksession_db fixture) only the "
            "isolated database may be used: anything else would write to a database that "
            "outlives the test, and in savepoint mode even db.engine.connect() bypasses "
            "the test's transaction. Use the database through the manager's scopes:\n\n"
            "    async with db.scope() as session:\n"
            "        await session.execute(...)\n\n"
            "or isolate that engine's manager too, or let the test use the engine on "
            "purpose: `isolated(db, allow=[engine])`."
        )


def _check_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    pool = proxy._pool  # the pool this checkout is served from (pinned: tasksession._pins)
    for allowed in _ALLOWED:
        if pool in allowed:
            return
    raise StrayEngineError(pool.status(), application_frame())


def pools_of(engines: Iterable[AsyncEngine]) -> frozenset[Pool]:
    """The pools behind ``engines``."""
    return frozenset(engine.sync_engine.pool for engine in engines)


@contextmanager
def only_these_pools(allowed: frozenset[Pool]) -> Iterator[None]:
    """While the block runs, a checkout from any pool outside ``allowed`` (and other blocks') fails."""
    if not _ALLOWED:
        event.listen(Pool, "checkout", _check_checkout)
    _ALLOWED.append(allowed)
    try:
        yield
    finally:
        _ALLOWED.remove(allowed)
        if not _ALLOWED:
            event.remove(Pool, "checkout", _check_checkout)
