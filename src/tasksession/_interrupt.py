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

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import anyio
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

__all__ = [
    "cancel_orphans",
    "cancel_orphans_soon",
    "finish_cancelling",
    "has_orphans",
    "root_engine",
    "watch",
    "watch_all",
]

logger = logging.getLogger("tasksession")

#: Seconds the teardown waits for a connection to send the cancel on.
CANCEL_TIMEOUT = 5.0

# root sync engine -> server pids whose statement may still be running
_ORPHANS: weakref.WeakKeyDictionary[Engine, deque[int]] = weakref.WeakKeyDictionary()

# root sync engine -> the background task sending its cancel requests (one at a time:
# a storm of cancelled statements must not open a storm of connections).
_CANCELLING: weakref.WeakKeyDictionary[Engine, asyncio.Task[None]] = weakref.WeakKeyDictionary()

_CANCEL_ASYNCPG = (
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
    "WHERE pid = ANY($1::integer[]) AND pid <> pg_backend_pid()"
)

_CANCEL = text(
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
    "WHERE pid = ANY(CAST(:pids AS integer[])) AND pid <> pg_backend_pid()"
)


def root_engine(sync_engine: Engine) -> Engine:
    """The real engine behind ``sync_engine`` (an ``execution_options()`` view shares its pool)."""
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
    root = root_engine(engine.sync_engine)
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
        # Cut the socket now: SQLAlchemy's graceful close, next, would wait up to
        # 2 s for a server that may be unreachable (a stalled network), after the
        # caller's deadline. The statement is cancelled on the server instead
        # (cancel_orphans, in the background).
        terminate = getattr(getattr(dbapi_connection, "driver_connection", None), "terminate", None)
        if terminate is not None:
            try:
                terminate()
            except Exception:  # pragma: no cover - already closed
                logger.debug("tasksession: terminating %r failed", dbapi_connection, exc_info=True)

    event.listen(root, "invalidate", on_invalidate)


def watch_all(engines: Iterable[AsyncEngine]) -> None:
    """:func:`watch` every engine of a configuration (primary, replicas, extra pools)."""
    for engine in engines:
        watch(engine)


def has_orphans(engine: AsyncEngine | None) -> bool:
    """Whether statements of invalidated connections of ``engine`` may still be running."""
    return engine is not None and bool(_ORPHANS.get(root_engine(engine.sync_engine)))


async def cancel_orphans(engine: AsyncEngine) -> None:
    """Cancel the server-side statements of connections invalidated by a cancellation.

    Sends one ``pg_cancel_backend`` query for all pending backends, within
    :data:`CANCEL_TIMEOUT` seconds. On asyncpg it goes over a connection of its
    own, opened with the engine's settings outside the pool (so that it never
    takes a pooled connection from the application, nor shows as one checked
    out); otherwise over a pooled connection. Failures are logged, never
    raised: the server ends an orphaned statement by itself eventually.
    """
    orphans = _ORPHANS.get(root_engine(engine.sync_engine))
    if not orphans:
        return
    pids = list(orphans)
    orphans.clear()
    try:
        with anyio.fail_after(CANCEL_TIMEOUT):
            if engine.dialect.driver == "asyncpg":
                await _cancel_outside_the_pool(engine, pids)
            else:
                async with engine.connect() as connection:
                    await connection.execute(_CANCEL, {"pids": pids})
    except Exception:
        logger.warning(
            "tasksession: could not cancel the statements that cancelled tasks left running "
            "on server processes %s; they run until they finish",
            pids,
            exc_info=True,
        )


async def _cancel_outside_the_pool(engine: AsyncEngine, pids: list[int]) -> None:
    # The pool's creator opens a driver connection with everything the engine
    # was given (URL, connect_args, do_connect listeners), without the pool.
    adapter = await greenlet_spawn(engine.sync_engine.pool._creator)
    driver = adapter.driver_connection
    try:
        await driver.execute(_CANCEL_ASYNCPG, pids)
    finally:
        driver.terminate()  # nothing to say to the server: closing costs no round trip


def cancel_orphans_soon(engine: AsyncEngine) -> None:
    """Start cancelling ``engine``'s orphaned statements in the background; return at once.

    The scope teardown that finds orphans runs after its caller's deadline
    (the cancellation that orphaned the statement): the cancel request, which
    may wait for a connection over a stalled network, must not extend it. One
    task per engine sends the requests, until no orphan is left.
    """
    root = root_engine(engine.sync_engine)
    running = _CANCELLING.get(root)
    if running is not None and not running.done():
        return  # it takes the new orphans with the next request
    _CANCELLING[root] = asyncio.get_running_loop().create_task(
        _cancel_until_none_left(engine), name="tasksession: cancel orphaned statements"
    )


async def _cancel_until_none_left(engine: AsyncEngine) -> None:
    root = root_engine(engine.sync_engine)
    while _ORPHANS.get(root):
        await cancel_orphans(engine)


async def finish_cancelling(engines: list[AsyncEngine]) -> None:
    """Wait for the background cancel requests of ``engines`` (before they are disposed).

    Bounded: each request waits at most :data:`CANCEL_TIMEOUT` for a connection.
    """
    loop = asyncio.get_running_loop()
    pending = []
    for engine in engines:
        task = _CANCELLING.get(root_engine(engine.sync_engine))
        if task is not None and not task.done() and task.get_loop() is loop:
            pending.append(task)
    if pending:
        await asyncio.wait(pending, timeout=CANCEL_TIMEOUT + 1.0)
