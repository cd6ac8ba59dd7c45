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

from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

__all__ = ["closes_without_io", "commit_connections_and_close", "commits_like_its_connections"]

_session_commit = Session.commit
_NOT_ASYNCPG = object()


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
        fairy = connection._dbapi_connection
        if fairy is None:
            return False
        if getattr(fairy.dbapi_connection, "_transaction", _NOT_ASYNCPG) is not None:
            return False
        # Rollback listeners on the connection or its engine (the engine's
        # dispatcher is built once; the connection's would be built per call).
        if connection._has_events or connection.engine.dispatch.rollback:
            return False
        pool = fairy._pool
        pool_events = pool.dispatch
        if pool_events.reset or pool_events.checkin:
            return False
        # Returned to a full pool (an overflow connection) or to a pool that
        # keeps nothing, the connection is closed: that is I/O.
        if not isinstance(pool, QueuePool) or pool.checkedin() >= pool.size():
            return False
    return True
