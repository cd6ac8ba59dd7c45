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
  transaction back.

Errors are classified by exception class and SQLSTATE, looking through
SQLAlchemy's wrapper (``.orig``) to the driver's exception
(``driver_exception`` on 2.1, ``__cause__`` on 2.0), never by message text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = ["DEADLOCK", "SERIALIZATION_FAILURE", "RetryPolicy", "is_disconnect", "sqlstate_of"]

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
        the transaction back). A connection lost *during COMMIT* is never
        retried: see :class:`~tasksession.CommitOutcomeUnknownError`.
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
        if self.disconnects and is_disconnect(error):
            return "lost connection"
        return None

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failed attempts (``failures >= 1``)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(max(failures - 1, 0), 64))
        if self.jitter:
            return random.uniform(0.0, ceiling)
        return ceiling
