"""What makes a manager's state visible: the ledger of counters, the open scopes, snapshots.

* :class:`Ledger`: the counters (commits, rollbacks, guard violations, teardown
  failures, pool timeouts, scopes entered). One per manager; any layer that counts
  writes it directly (the guard, the teardown, the pool), never back through the
  manager.
* :class:`ScopeRegistry`: the open scopes. A strong reference to a scope that is
  never exited (its task ended or was abandoned) would keep it alive for the life
  of the process, with its session, its connection and an idle-in-transaction
  backend, and the garbage-collection report of such a scope could never fire. So
  a scope whose session was built (the only kind that can hold a connection) is
  held **weakly**: dropped unexited, it is collected, reported by its session's
  class, and its connection given back. A scope whose session was never touched
  holds nothing but memory; it is held strongly (a plain dict entry, the cheapest
  registration on every scope's path: a weak reference would cost a third of an
  untouched scope), and moved to the weak side when its session is built.
* :class:`ScopeInfo`, :class:`ManagerStatistics`: read-only snapshots.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DescribedScope",
    "Ledger",
    "ManagerStatistics",
    "NamedScope",
    "ScopeInfo",
    "ScopeRegistry",
    "scope_info",
]

_ref = weakref.ref
_MIN_PRUNE = 64


class Ledger:
    """A manager's counters, from its creation. Plain attributes: ``ledger.commits += 1``."""

    __slots__ = (
        "commits",
        "pool_timeouts",
        "rollbacks",
        "scopes_entered",
        "teardown_failures",
        "violations",
    )

    def __init__(self) -> None:
        self.scopes_entered = 0
        self.commits = 0
        self.rollbacks = 0
        self.violations = 0
        self.teardown_failures = 0
        self.pool_timeouts = 0


class ScopeRegistry:
    """The open scopes: :attr:`untouched` (strong) and those with a session (weak)."""

    __slots__ = ("_prune_at", "built", "untouched")

    def __init__(self) -> None:
        #: Scopes whose session was never used; scopes add and remove themselves.
        self.untouched: dict[Any, None] = {}
        #: id(scope) -> weak reference, for scopes whose session was built.
        self.built: dict[int, weakref.ref[Any]] = {}
        self._prune_at = _MIN_PRUNE

    def session_built(self, scope: Any) -> None:
        """Hold ``scope`` weakly from now on: its session may hold a connection."""
        self.untouched.pop(scope, None)
        built = self.built
        built[id(scope)] = _ref(scope)
        if len(built) > self._prune_at:
            self._prune()

    def discard_built(self, scope: Any) -> None:
        """Forget a scope whose session was built."""
        # While ``scope`` lives nothing else can have its id: an entry under it
        # is its own, or a dead one left by an object that lived at that address.
        self.built.pop(id(scope), None)

    def __iter__(self) -> Iterator[Any]:
        """The open scopes, oldest first."""
        live = list(self.untouched)
        dead = False
        for entry in list(self.built.values()):
            scope = entry()
            if scope is None:
                dead = True
            else:
                live.append(scope)
        if dead:
            self._prune()
        live.sort(key=lambda scope: scope.opened)
        return iter(live)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def _prune(self) -> None:
        built = self.built
        for key in [key for key, entry in built.items() if entry() is None]:
            del built[key]
        self._prune_at = max(_MIN_PRUNE, 2 * len(built))


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
    :param pool_timeouts: checkouts that timed out (:class:`PoolExhaustedError`), any pool.
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
    pool_timeouts: int = 0


class NamedScope(Protocol):
    """How every message names a scope: its name, its task, where it was opened, its age."""

    @property
    def name(self) -> str: ...
    @property
    def owner_name(self) -> str: ...
    @property
    def opened_at(self) -> str: ...
    @property
    def age(self) -> float: ...


class DescribedScope(NamedScope, Protocol):
    """What :func:`scope_info` reads of a scope."""

    readonly: bool

    @property
    def has_session(self) -> bool: ...
    @property
    def holds_connection(self) -> bool: ...


def scope_info(scope: DescribedScope) -> ScopeInfo:
    """The snapshot of ``scope`` that diagnostics hand out."""
    return ScopeInfo(
        name=scope.name,
        task_name=scope.owner_name,
        age=scope.age,
        opened_at=scope.opened_at,
        has_session=scope.has_session,
        holds_connection=scope.holds_connection,
        readonly=scope.readonly,
    )
