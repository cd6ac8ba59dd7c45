"""``RetryPolicy``: which failures re-run a unit of work, how often, and how long to wait.

A unit of work may be re-run from the start when the database rejected it
for reasons that say nothing about the unit itself and that a new attempt
usually avoids:

* a **serialization failure** (SQLSTATE ``40001``: SERIALIZABLE or REPEATABLE
  READ conflicts with a concurrent transaction);
* a **deadlock** (SQLSTATE ``40P01``: PostgreSQL aborted this transaction to
  break a lock cycle);
* a **disconnect**: the connection died and SQLAlchemy invalidated it
  (``DBAPIError.connection_invalidated``), so the server rolled the
  transaction back;
* a **failure to connect** (:func:`is_connect_failure`): an ``OSError``
  (refused, reset, timed out, no route) raised while the pool was opening a
  connection, as while a server restarts. Nothing of the unit was sent on
  that connection, so running the unit again is safe.

Errors are classified by exception class and SQLSTATE, looking through
SQLAlchemy's wrapper (``.orig``) to the driver's exception
(``driver_exception`` on 2.1, ``__cause__`` on 2.0), and by where they were
raised, never by message text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool

__all__ = [
    "server_rejected",
    "DEADLOCK",
    "SERIALIZATION_FAILURE",
    "RetryPolicy",
    "explain_lost_connection",
    "is_connect_failure",
    "is_disconnect",
    "lost_connection_note",
    "raised_while_connecting",
    "sqlstate_of",
]

SERIALIZATION_FAILURE = "40001"
DEADLOCK = "40P01"

# SQLSTATEs that mean the server ended the session: class 08 (connection
# exception) and the operator-intervention codes for a terminated backend.
_DISCONNECT_CLASS = "08"
_DISCONNECT_STATES = frozenset({"57P01", "57P02", "57P03"})


def _related(error: BaseException) -> Iterator[Any]:
    """``error``, the DBAPI exception it wraps, and the driver exception behind that."""
    yield error
    orig = getattr(error, "orig", None) if isinstance(error, sa_exc.StatementError) else None
    if orig is None:
        return
    yield orig
    driver = getattr(orig, "driver_exception", None)  # SQLAlchemy 2.1 adapted drivers
    if driver is not None:
        yield driver
    cause = orig.__cause__  # SQLAlchemy 2.0: the adapted error is raised from the driver's
    if cause is not None and cause is not driver:
        yield cause


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE the database reported for ``error``, if it is a database error.

    Reads ``sqlstate`` (asyncpg, psycopg 3) or ``pgcode`` (psycopg 2) on the
    error and on what it wraps.
    """
    for candidate in _related(error):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_disconnect(error: BaseException) -> bool:
    """Whether ``error`` means the connection to the database was lost."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    state = sqlstate_of(error)
    return state is not None and (
        state.startswith(_DISCONNECT_CLASS) or state in _DISCONNECT_STATES
    )


def _checkout_codes() -> frozenset[CodeType]:
    # Pool.connect() is the one way to a connection (Engine.connect, a
    # reconnect, pre-ping: all check out through it); SingletonThreadPool
    # overrides it. Code objects, compared by identity: no name matching.
    codes = {sa_pool.Pool.connect.__code__}
    pending = list(sa_pool.Pool.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        connect = cls.__dict__.get("connect")
        code = getattr(connect, "__code__", None)
        if code is not None:
            codes.add(code)
    return frozenset(codes)


_CHECKOUT_CODES = _checkout_codes()


def raised_while_connecting(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a pool checkout (SQLAlchemy's ``Pool.connect()``).

    A checkout opens a new connection when the pool has none to hand out (or
    the one it had was invalidated or failed its pre-ping) and runs the
    connect/checkout listeners on it; none of the unit's statements has been
    sent on that connection yet. The traceback says where the error came from
    (its frames run from the ``except`` down to the ``raise``, through
    SQLAlchemy's greenlet too); it is read only here, on the error path.
    """
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in _CHECKOUT_CODES:
            return True
        tb = tb.tb_next
    return False


def is_connect_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failure to open a connection, which makes a retry safe.

    True for an ``OSError`` (``ConnectionRefusedError``, ``ConnectionResetError``,
    ``TimeoutError``, a DNS failure, a missing Unix socket...) raised while the
    pool was connecting (:func:`raised_while_connecting`). asyncpg raises these
    as they are (SQLAlchemy wraps only DBAPI errors, and ``handle_error``
    listeners never see them) while a server is down or restarting. The same
    classes raised anywhere else (a statement's ``command_timeout``, a COMMIT,
    the unit's own network calls) are not connect failures: something was
    sent, or the error is not the database's.

    Errors the server sent while a connection was being opened (SQLSTATE
    ``57P03``, "the database system is starting up") are disconnects
    (:func:`is_disconnect`) already.
    """
    return isinstance(error, OSError) and raised_while_connecting(error)


_LOST_CONNECTION = (
    "tasksession: the database connection under this session was closed, and SQLAlchemy "
    "invalidated it: most often the server ended the session (pg_terminate_backend, a server "
    "restart, idle_in_transaction_session_timeout) or the network dropped it. The driver's "
    "words ('another operation is in progress', 'connection is closed') describe the closed "
    "connection's state; "
)
_GUARDED = (
    "they do not mean that two tasks shared the session: tasksession's guard refuses that "
    "with ConcurrentSessionError before any I/O. "
)
_UNGUARDED = (
    "with guard='off' two tasks sharing one session can also cause them (the guard, "
    "guard='concurrent', would refuse that with ConcurrentSessionError). "
)
_RETRY_HINT = (
    "The transaction cannot go on; to run such units again, decorate them with "
    "@db.transactional(retry=RetryPolicy()) (a connection lost during COMMIT is never retried)."
)


def lost_connection_note(error: BaseException, guard_mode: str = "concurrent") -> str | None:
    """The note that says ``error`` means a lost connection, if its own text may not say so.

    For a :class:`~sqlalchemy.exc.DBAPIError` whose connection SQLAlchemy found
    closed (``connection_invalidated``; asyncpg's ``is_closed()``, a state, not
    a message) and that carries no SQLSTATE: the driver's own client-side
    complaint, such as asyncpg's ``InternalClientError`` "cannot switch to
    state 11; another operation (2) is in progress" when a statement is sent
    right after the server terminated the backend (the server's FATAL message
    was read, the end of the connection not yet), or ``InterfaceError``
    "connection is closed". An error the server reported (an SQLSTATE, such as
    ``57P01`` "terminating connection due to administrator command") says what
    happened by itself: ``None``.

    :param guard_mode: the scope's guard mode; under ``"off"`` the guard does not
        rule out a shared session, and the note says so.
    """
    if not isinstance(error, sa_exc.DBAPIError) or not error.connection_invalidated:
        return None
    if sqlstate_of(error) is not None:
        return None
    return _LOST_CONNECTION + (_UNGUARDED if guard_mode == "off" else _GUARDED) + _RETRY_HINT


def server_rejected(error: BaseException) -> bool:
    """Whether ``error`` is the server's own answer: an error with an SQLSTATE, not a disconnect.

    Such an answer to COMMIT means the server rolled the transaction back.
    """
    if not isinstance(error, sa_exc.DBAPIError) or error.connection_invalidated:
        return False
    return sqlstate_of(error) is not None and not is_disconnect(error)


def explain_lost_connection(error: BaseException, guard_mode: str = "concurrent") -> None:
    """Add :func:`lost_connection_note` to ``error`` (once), if it applies.

    Called on the error path only (an exception leaving a scope); costs an
    ``isinstance`` check for any other error.
    """
    note = lost_connection_note(error, guard_mode)
    if note is not None and note not in getattr(error, "__notes__", ()):
        error.add_note(note)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a unit of work is re-run after a transient database failure.

    Used by :meth:`SessionManager.transactional` and
    :func:`tasksession.workers.run_worker`. The whole unit runs again, in a new
    scope (new session, new transaction), so it must not have effects outside
    the database that cannot be repeated.

    Waits between attempts grow exponentially from ``backoff`` and are capped
    at ``max_backoff``; with ``jitter`` each wait is drawn uniformly from zero
    to that value, so that units that collided do not collide again in step.

    :param attempts: total attempts, including the first (``1`` never retries).
    :param backoff: seconds to wait (before jitter) after the first failure;
        doubled after each further failure.
    :param max_backoff: upper bound of any wait, in seconds.
    :param jitter: randomize each wait (recommended).
    :param sqlstates: SQLSTATEs that are retried; by default serialization
        failures (``40001``) and deadlocks (``40P01``).
    :param disconnects: retry when the connection was lost (the server rolled
        the transaction back), and when a connection could not be opened (an
        ``OSError`` such as ``ConnectionRefusedError`` raised while connecting,
        as while the server restarts: nothing was sent). An ``OSError`` raised
        anywhere else (a statement, a COMMIT) is not retried, and a connection
        lost *during COMMIT* never is: see :class:`~tasksession.CommitOutcomeUnknownError`.
    :param exceptions: further exception classes to retry (your own transient
        errors, for example).
    """

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: bool = True
    sqlstates: frozenset[str] = frozenset({SERIALIZATION_FAILURE, DEADLOCK})
    disconnects: bool = True
    exceptions: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts!r} must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")
        if not isinstance(self.sqlstates, frozenset):
            states: Iterable[str] = self.sqlstates
            if isinstance(states, str):
                raise TypeError("sqlstates= takes a collection, e.g. sqlstates={'40001'}")
            object.__setattr__(self, "sqlstates", frozenset(states))
        if not isinstance(self.exceptions, tuple):
            object.__setattr__(self, "exceptions", tuple(self.exceptions))

    def reason(self, error: BaseException) -> str | None:
        """Why ``error`` is worth another attempt, or ``None`` if it is not retryable."""
        if not isinstance(error, Exception):
            return None  # cancellation, KeyboardInterrupt: never
        if self.exceptions and isinstance(error, self.exceptions):
            return type(error).__name__
        state = sqlstate_of(error)
        if state is not None and state in self.sqlstates:
            if state == SERIALIZATION_FAILURE:
                return f"serialization failure (SQLSTATE {state})"
            if state == DEADLOCK:
                return f"deadlock (SQLSTATE {state})"
            return f"SQLSTATE {state}"
        if self.disconnects:
            if is_disconnect(error):
                return "lost connection"
            if is_connect_failure(error):
                return f"connection that could not be opened ({type(error).__name__}; nothing was sent)"
        return None

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failed attempts (``failures >= 1``)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(max(failures - 1, 0), 64))
        if self.jitter:
            return random.uniform(0.0, ceiling)
        return ceiling
