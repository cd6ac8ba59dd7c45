"""Stopping statements that a cancellation orphaned on the PostgreSQL server.

When a task is cancelled while one of its statements is in flight, SQLAlchemy
invalidates the connection. A single asyncio cancellation closes it
gracefully, which also cancels the statement on the server. Under anyio
cancel scopes (which deliver the cancellation again and again) or a repeated
``Task.cancel()``, SQLAlchemy gives up on the graceful close and terminates the
socket: the server keeps running the statement, holding its locks, until it
ends or (if the server sets ``client_connection_check_interval``) notices the
client is gone.

:func:`watch` registers a pool ``invalidate`` listener that remembers the
server process id of every connection invalidated by a cancellation;
:func:`cancel_orphans`, awaited by the scope teardown, asks the server to
cancel those backends' statements (``pg_cancel_backend``) over another pooled
connection. Cancelling a backend that already finished or exited does nothing.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from ._config import Binding

__all__ = ["cancel_orphans", "has_orphans", "watch", "watch_binding"]

logger = logging.getLogger("tasksession")

#: Seconds the teardown waits for a connection to send the cancel on.
CANCEL_TIMEOUT = 5.0

# root sync engine -> server pids whose statement may still be running
_ORPHANS: weakref.WeakKeyDictionary[Engine, deque[int]] = weakref.WeakKeyDictionary()

_CANCEL = text(
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
    "WHERE pid = ANY(CAST(:pids AS integer[])) AND pid <> pg_backend_pid()"
)


def _root(sync_engine: Engine) -> Engine:
    # Engine.execution_options() returns an OptionEngine sharing the pool of
    # the engine it proxies; orphans are kept per real engine.
    proxied = getattr(sync_engine, "_proxied", None)
    while isinstance(proxied, Engine):
        sync_engine = proxied
        proxied = getattr(sync_engine, "_proxied", None)
    return sync_engine


def _backend_pid(dbapi_connection: Any) -> int | None:
    driver = getattr(dbapi_connection, "driver_connection", None)
    get_server_pid = getattr(driver, "get_server_pid", None)  # asyncpg
    if get_server_pid is not None:
        return int(get_server_pid())
    info = getattr(driver, "info", None)  # psycopg
    pid = getattr(info, "backend_pid", None)
    return int(pid) if pid else None


def watch(engine: AsyncEngine) -> None:
    """Remember the backends of ``engine``'s connections invalidated by a cancellation.

    Does nothing for databases other than PostgreSQL, and once per engine.
    """
    if engine.dialect.name != "postgresql":
        return
    root = _root(engine.sync_engine)
    if root in _ORPHANS:
        return
    orphans: deque[int] = deque(maxlen=256)
    _ORPHANS[root] = orphans

    def on_invalidate(dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        # Only a cancellation (a BaseException that is not an Exception) can
        # abandon a statement mid-flight; a disconnect already ended the backend.
        if exception is None or isinstance(exception, Exception):
            return
        try:
            pid = _backend_pid(dbapi_connection)
        except Exception:  # pragma: no cover - an exotic driver
            logger.debug("tasksession: no backend pid for %r", dbapi_connection, exc_info=True)
            return
        if pid is not None:
            orphans.append(pid)

    event.listen(root, "invalidate", on_invalidate)


def watch_binding(binding: Binding) -> None:
    """:func:`watch` every engine of ``binding`` (primary, replicas, extra pools)."""
    for engine in (binding.engine, *binding.replica_engines, *binding.extra_engines):
        watch(engine)


def has_orphans(engine: AsyncEngine | None) -> bool:
    """Whether statements of invalidated connections of ``engine`` may still be running."""
    return engine is not None and bool(_ORPHANS.get(_root(engine.sync_engine)))


async def cancel_orphans(engine: AsyncEngine) -> None:
    """Cancel the server-side statements of connections invalidated by a cancellation.

    Run it shielded: it checks out a pooled connection (waiting at most
    :data:`CANCEL_TIMEOUT` seconds for one) and sends one ``pg_cancel_backend``
    query for all pending backends. Failures are logged, never raised: the
    server ends an orphaned statement by itself eventually.
    """
    orphans = _ORPHANS.get(_root(engine.sync_engine))
    if not orphans:
        return
    pids = list(orphans)
    orphans.clear()
    try:
        with anyio.fail_after(CANCEL_TIMEOUT):
            async with engine.connect() as connection:
                await connection.execute(_CANCEL, {"pids": pids})
    except Exception:
        logger.warning(
            "tasksession: could not cancel the statements that cancelled tasks left running "
            "on server processes %s; they run until they finish",
            pids,
            exc_info=True,
        )
