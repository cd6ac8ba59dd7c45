"""Ending a unit of work without SQLAlchemy's ceremony, when it provably has nothing to do.

A scope ends every unit with a COMMIT or a ROLLBACK and a close. Through the
ORM, ``Session.commit()`` first runs its own machinery (before/after-commit
events, a flush check, state-change bookkeeping, expiring what was loaded), and
closing goes through a greenlet in case the driver has I/O to do. When the
session provably has none of that to do, the scope takes the short way:

* :func:`commits_like_its_connections`: ``Session.commit()`` would do nothing
  but commit its connections' transactions (nothing to flush, no listeners,
  no savepoint open, nothing to expire), so :func:`commit_connections_and_close`
  does exactly that, at the Connection level (engine events still fire);
* :func:`driver_commit`: when the one connection is an asyncpg one and nothing
  listens to its events, :func:`commit_through_the_driver` sends that COMMIT
  straight through asyncpg, with no greenlet at all (a failure is replayed
  through SQLAlchemy, which translates it as usual); the rest of the commit
  and the close are SQLAlchemy's bookkeeping, with no I/O left to do;
* :func:`closes_without_io`: rolling back and returning the connections needs
  no I/O (an asyncpg connection in AUTOCOMMIT, the read-only pool, has no
  transaction to end), so the session can be closed synchronously, without a
  greenlet or a shield.

Both read SQLAlchemy internals that every supported version has
(``Session._transaction``, ``SessionTransaction._connections``), and the
asyncpg adapter's ``_transaction``; the test suite pins them, on the oldest
and the newest supported SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

__all__ = [
    "closes_without_io",
    "commit_connections_and_close",
    "commit_through_the_driver",
    "commits_like_its_connections",
    "driver_commit",
    "held_connections",
    "is_asyncpg",
    "terminate_asyncpg",
]

_session_commit = Session.commit
# SQLAlchemy 2.0's asyncpg adapter also flags a started transaction (2.1 does not).
_ADAPTER_HAS_STARTED = hasattr(AsyncAdapt_asyncpg_connection, "_started")


def held_connections(sync_session: Session) -> list[Connection]:
    """The connections ``sync_session``'s transaction holds (without acquiring new ones)."""
    transaction = sync_session.get_transaction()
    if transaction is None:
        return []
    # SessionTransaction.connections is public only from SQLAlchemy 2.1.7; the
    # private mapping (bind -> (connection, ...)) exists in every 2.x.
    return [entry[0] for entry in getattr(transaction, "_connections", {}).values()]


def commits_like_its_connections(sync: Session) -> bool:
    """Whether ``sync.commit()`` would only commit its connections' transactions."""
    transaction: Any = sync._transaction
    return (
        transaction is not None
        and transaction._parent is None  # no savepoint or subtransaction open
        and transaction.is_active  # not failed (commit() would raise PendingRollbackError)
        and type(sync).commit is _session_commit
        and not sync.expire_on_commit  # nothing to expire (tasksession's default)
        and not sync.twophase
        and sync._is_clean()  # nothing to flush
        and not sync.dispatch.before_commit
        and not sync.dispatch.after_commit
    )


def commit_connections_and_close(sync: Session) -> None:
    """Commit the session's connections, then close it (run in a greenlet).

    Only when :func:`commits_like_its_connections` said so: this is what
    ``commit()`` followed by ``close()`` does then, minus the ORM's bookkeeping.
    """
    transaction: Any = sync._transaction
    for entry in set(transaction._connections.values()):
        connection_transaction, should_commit = entry[1], entry[2]
        if should_commit and connection_transaction.is_active:
            connection_transaction.commit()
    sync.close()  # the connections go back to the pool; after_transaction_end fires


def closes_without_io(sync: Session) -> bool:
    """Whether ``sync.close()`` does no I/O, so that it may run outside a greenlet.

    True when every connection the session holds is an asyncpg connection with
    no driver transaction (AUTOCOMMIT), nothing listens to the rollback or the
    return to the pool (a listener might use the connection), and its pool has
    room to keep it (else the pool closes it).
    """
    transaction: Any = sync._transaction
    if transaction is None:
        return True
    for entry in transaction._connections.values():
        connection = entry[0]
        pooled = _asyncpg_underneath(connection)
        if pooled is None:
            return False
        fairy, adapter = pooled
        if adapter._transaction is not None:  # a driver transaction to roll back
            return False
        # Rollback listeners on the connection or its engine (the engine's
        # dispatcher is built once; the connection's would be built per call).
        if connection._has_events or connection.engine.dispatch.rollback:
            return False
        if not _pool_keeps_it_quietly(fairy):
            return False
    return True


def _asyncpg_underneath(connection: Any) -> tuple[Any, AsyncAdapt_asyncpg_connection] | None:
    """The pooled connection and asyncpg adapter under a Connection, or None (not asyncpg)."""
    fairy = connection._dbapi_connection
    if fairy is None:
        return None
    adapter = fairy.dbapi_connection
    if not isinstance(adapter, AsyncAdapt_asyncpg_connection):
        return None
    return fairy, adapter


def is_asyncpg(connection: Any) -> bool:
    """Whether ``connection`` (a Connection) runs on asyncpg (or holds no driver connection)."""
    fairy = connection._dbapi_connection
    return fairy is None or isinstance(fairy.dbapi_connection, AsyncAdapt_asyncpg_connection)


def terminate_asyncpg(connection: Any) -> bool:
    """Cut ``connection``'s asyncpg connection at once (no I/O, no waiting); False if not asyncpg.

    A round trip awaited on it fails at once with a lost-connection error; the
    server rolls back whatever it had not committed. SQLAlchemy still has to be
    told (invalidate), which then costs nothing more.
    """
    pooled = _asyncpg_underneath(connection)
    if pooled is None:
        return False
    pooled[1]._connection.terminate()
    return True


def _pool_keeps_it_quietly(fairy: Any) -> bool:
    """Whether returning ``fairy`` to its pool does no I/O and runs no listener."""
    pool = fairy._pool
    pool_events = pool.dispatch
    if pool_events.reset or pool_events.checkin:
        return False
    # Returned to a full pool (an overflow connection) or to a pool that keeps
    # nothing, the connection is closed: that is I/O.
    return isinstance(pool, QueuePool) and pool.checkedin() < pool.size()


def driver_commit(sync: Session) -> tuple[Any, Any] | None:
    """``(asyncpg adapter, connection transaction)`` to commit through the driver, or None.

    Only after :func:`commits_like_its_connections`: one asyncpg connection
    inside a driver transaction, and no Connection events (they would see the
    COMMIT out of order). Whether the close after it needs a greenlet is decided
    once the COMMIT is done (:func:`commit_through_the_driver`).
    """
    transaction: Any = sync._transaction
    entries = set(transaction._connections.values())
    if len(entries) != 1:
        return None
    connection, connection_transaction, should_commit = next(iter(entries))[:3]
    if not should_commit or not connection_transaction.is_active:
        return None
    if connection._has_events or connection.engine._has_events:
        return None
    pooled = _asyncpg_underneath(connection)
    if pooled is None or pooled[1]._transaction is None:
        return None
    return pooled[1], connection_transaction


class _FailedCommit:
    """Stands in for the driver transaction to replay a failed COMMIT through SQLAlchemy."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    async def commit(self) -> None:
        raise self._error

    async def rollback(self) -> None:  # pragma: no cover - discarded before any rollback
        return None


async def commit_through_the_driver(
    sync: Session, adapter: Any, connection_transaction: Any
) -> None:
    """COMMIT through asyncpg itself, then let SQLAlchemy note it and close, without I/O.

    ``adapter`` and ``connection_transaction`` come from :func:`driver_commit`.
    """
    try:
        await adapter._transaction.commit()
    except Exception as error:
        # SQLAlchemy's adapter and Connection turn the driver's error into the
        # usual exception (IntegrityError, ...) and invalidate a broken
        # connection: replay the failure through them.
        adapter._transaction = _FailedCommit(error)
        await greenlet_spawn(connection_transaction.commit)
        raise  # pragma: no cover - the replay raised already
    # Done at the driver: what the adapter's commit() would now find is nothing.
    adapter._transaction = None
    if _ADAPTER_HAS_STARTED:
        adapter._started = False
    connection_transaction.commit()  # SQLAlchemy's bookkeeping; the adapter has no I/O left
    if closes_without_io(sync):
        sync.close()  # returns the connection; the pool takes it back quietly
    else:
        # The pool would close it (full, e.g. filled by other units while the
        # COMMIT was awaited) or a listener would run: I/O, in a greenlet.
        await greenlet_spawn(sync.close)
