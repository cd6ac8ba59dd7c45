"""Read-only snapshots that make a manager's state visible: scopes and counters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ManagerStatistics", "ScopeInfo"]


@dataclass(frozen=True, slots=True)
class ScopeInfo:
    """One open scope, as reported by :meth:`SessionManager.active_scopes`.

    :param name: the scope's label (``db.scope(name=...)``, or where it was opened).
    :param task_name: name of the task that owns the scope.
    :param age: seconds since the scope was entered.
    :param opened_at: ``file:line in function`` of the ``db.scope()`` call.
    :param has_session: whether the scope's session was created (first use of it).
    :param holds_connection: whether that session currently holds a pooled connection.
    :param readonly: whether the scope is ``readonly=True``.
    """

    name: str
    task_name: str
    age: float
    opened_at: str
    has_session: bool
    holds_connection: bool
    readonly: bool


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    """Counters and gauges of a :class:`SessionManager`, from :meth:`~SessionManager.statistics`.

    Counters run from the manager's creation; gauges describe the moment of the call.

    :param open_scopes: scopes entered and not yet exited (joined inner scopes not counted).
    :param open_sessions: open scopes whose session has been created.
    :param scopes_entered: scopes entered since the manager was created.
    :param commits: scopes that ended by committing.
    :param rollbacks: scopes that ended by rolling back (error, cancellation, readonly).
    :param concurrent_violations: :class:`ConcurrentSessionError` raised so far, including
        those swallowed by ``gather(..., return_exceptions=True)``.
    :param teardown_failures: commits/rollbacks/closes that failed while a scope ended.
    :param pool_checked_out: connections currently checked out of the primary pool
        (``None`` when the pool does not report it).
    :param pool_size: the primary pool's configured size (``None`` when unknown).
    """

    open_scopes: int
    open_sessions: int
    scopes_entered: int
    commits: int
    rollbacks: int
    concurrent_violations: int
    teardown_failures: int
    pool_checked_out: int | None
    pool_size: int | None
