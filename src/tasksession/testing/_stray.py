"""The stray-engine guard: inside an isolated test, only the isolated database may be used.

Django's ``databases`` idea: a test declares the databases it uses, and a query
through any other fails instead of writing to a database that other tests (or
people) share. Here, while an :func:`~tasksession.testing.isolated` block is
open, every pool checkout in the process is checked: it must come from a pool
the block isolated (clone mode: the clone's engines) or one it was told to
allow (``allow=``). In savepoint mode the test's one connection was checked out
before the guard started, so *every* checkout fails, the manager's own engine
included (``engine.connect()`` on it would bypass the test transaction).

The check is a class-level ``checkout`` listener on SQLAlchemy's ``Pool``,
installed while at least one block is open and removed after the last.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from tasksession import TaskSessionError

from ._frames import application_frame

__all__ = [
    "StrayEngineError",
    "allow",
    "exempt",
    "only_these_pools",
    "own_checkouts",
    "pools_of",
]

# One entry per open isolated() block: the pools it lets tests check out from, and how
# the user's code names its manager.
_ALLOWED: list[tuple[set[Pool], str | None]] = []
# The testing kit's own pools (creating and dropping databases): never stray.
_OWN: weakref.WeakSet[Pool] = weakref.WeakSet()


class StrayEngineError(TaskSessionError):
    """Inside an isolated test, a connection was asked of an engine the test did not isolate.

    ``managers``: how the user's code names the isolated managers (``db``), when known.
    """

    error_code = "ts-stray-engine"

    def __init__(self, pool: str, where: str, managers: Sequence[str | None] = ()) -> None:
        self.pool, self.where, self.managers = pool, where, tuple(managers)
        # The user's name for the manager (``db``); "manager" when unknown or several.
        m = (self.managers[0] if len(self.managers) == 1 else None) or "manager"
        super().__init__(
            f"A connection was checked out at {where} from a pool the test did not isolate "
            f"({pool}). Inside `isolated({m})` (the tasksession_db fixture) only the "
            "isolated database may be used: anything else would write to a database that "
            f"outlives the test, and in savepoint mode even {m}.engine.connect() bypasses "
            "the test's transaction. Use the database through the manager's scopes:\n\n"
            f"    async with {m}.scope() as session:\n"
            "        await session.execute(...)\n\n"
            "or isolate that engine's manager too, or let the test use the engine on "
            f"purpose: `isolated({m}, allow=[engine])`."
        )


def _check_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    pool = proxy._pool  # the pool this checkout is served from (pinned: tasksession._pins)
    if pool in _OWN:
        return
    for allowed, _label in _ALLOWED:
        if pool in allowed:
            return
    labels = [label for _pools, label in _ALLOWED]
    raise StrayEngineError(pool.status(), application_frame(), labels)


def exempt(engine: AsyncEngine) -> AsyncEngine:
    """Let ``engine`` (the testing kit's own) be used inside isolated blocks; return it."""
    _OWN.add(engine.sync_engine.pool)
    return engine


@contextmanager
def own_checkouts(engine: AsyncEngine) -> Iterator[None]:
    """Let the testing kit check out of ``engine``'s pool during the block (isolating it)."""
    pool = engine.sync_engine.pool
    if pool in _OWN:
        yield
        return
    _OWN.add(pool)
    try:
        yield
    finally:
        _OWN.discard(pool)


def allow(engine: AsyncEngine) -> AsyncEngine:
    """Let the open isolated blocks use ``engine`` too; return it.

    For an engine a test creates on purpose inside the block, such as an AUTOCOMMIT
    engine on the clone (``db.engine.url``) to look at ``pg_stat_activity``::

        admin = allow(create_async_engine(db.engine.url, poolclass=NullPool))

    :raises RuntimeError: no isolated block is open.
    """
    if not _ALLOWED:
        raise RuntimeError("allow(engine) is for use inside an isolated() block (tasksession_db)")
    pool = engine.sync_engine.pool
    for pools, _label in _ALLOWED:
        pools.add(pool)
    return engine


def pools_of(engines: Iterable[AsyncEngine]) -> frozenset[Pool]:
    """The pools behind ``engines``."""
    return frozenset(engine.sync_engine.pool for engine in engines)


@contextmanager
def only_these_pools(allowed: frozenset[Pool], label: str | None) -> Iterator[None]:
    """While the block runs, a checkout from any pool outside ``allowed`` (and other blocks') fails.

    :param label: the isolated manager's name in the user's code, for the message.
    """
    if not _ALLOWED:
        event.listen(Pool, "checkout", _check_checkout)
    entry = (set(allowed), label)
    _ALLOWED.append(entry)
    try:
        yield
    finally:
        _ALLOWED.remove(entry)
        if not _ALLOWED:
            event.remove(Pool, "checkout", _check_checkout)
