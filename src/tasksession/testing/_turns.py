"""Many scopes on one connection, in one outer transaction: each in SAVEPOINTs, taking turns.

Savepoint isolation binds the manager to the test's connection
(:meth:`SessionManager.bound_to`): every session a scope builds joins its
transaction with ``join_transaction_mode="create_savepoint"`` (SQLAlchemy's "join a
session into an external transaction" recipe), so its transaction is a SAVEPOINT,
its commit a RELEASE, its rollback a ROLLBACK TO. This module makes the sessions
take turns on the connection (the session class passed to ``bound_to``).

Savepoints on one connection nest; they cannot interleave. If scope A opens
``sa_savepoint_1`` and scope B, in another task, then opens ``sa_savepoint_2``,
A's RELEASE also releases B's, and B's own RELEASE fails with ``savepoint
"sa_savepoint_2" does not exist``. So sessions take turns (Rails' ``lock_thread``
answer to the same problem): a session *takes* the connection when its
transaction first asks for its bind (SQLAlchemy asks ``get_bind()`` before every
statement and flush, in the operation's greenlet, where waiting is possible),
and *gives it back* when that transaction ends. Meanwhile a session of another
scope waits, up to ``wait_timeout``, then fails with
:class:`SharedConnectionTimeoutError`.

Turns nest where savepoints do: a scope opened *inside* the holder's scope (an
``independent=True`` scope in the same task, a ``task_group()`` child, a scope in
a task the holder's scope started) may take the connection on top of it, and the
holder waits until it is given back before it runs another statement or ends.
Siblings never overlap. That is the whole concurrency this mode gives: at any
moment one transaction (one innermost savepoint) uses the connection.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Any

import anyio
from greenlet import getcurrent  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import await_only

from tasksession import TaskSessionError

__all__ = [
    "WAIT_TIMEOUT",
    "SavepointIsolationWarning",
    "SharedConnection",
    "SharedConnectionTimeoutError",
    "turn_taking_class",
]

#: Seconds a scope waits for its turn on the shared connection by default.
WAIT_TIMEOUT = 5.0

_BY_CONNECTION: weakref.WeakKeyDictionary[Connection, SharedConnection] = (
    weakref.WeakKeyDictionary()
)
_CLASSES: dict[type[AsyncSession], type[AsyncSession]] = {}


class SharedConnectionTimeoutError(TaskSessionError):
    """A scope waited too long for its turn on a shared connection (savepoint test isolation).

    ``waiter`` and ``holder`` describe the two scopes; ``operation`` is what the waiter
    was about to do; ``manager``: how the user's code names the manager.
    """

    error_code = "ts-shared-connection"

    def __init__(
        self, waiter: str, holder: str, operation: str, timeout: float, manager: str | None = None
    ) -> None:
        self.waiter, self.holder, self.operation, self.timeout = waiter, holder, operation, timeout
        self.manager = manager
        m = manager or "manager"
        super().__init__(
            f"{waiter} waited {timeout:g}s to {operation} on the test's one connection, "
            f"which {holder} still uses. In savepoint isolation every scope runs in a "
            "SAVEPOINT of one connection, so scopes take turns: one transaction at a time. "
            "This test needs two transactions at once (one waits for a row lock, an event "
            "or a result that the other gives only later). Run it on a database of its own, "
            "where transactions really run concurrently:\n\n"
            '    @pytest.mark.tasksession(mode="clone")\n'
            "    async def test_two_workers(tasksession_db): ...\n\n"
            f"or, outside pytest, `async with isolated({m}, mode='clone'):`, inside which "
            f"{m}.scope() units run concurrently."
        )


class SavepointIsolationWarning(UserWarning):
    """Savepoint isolation undid a commit that would stand in production.

    A scope opened inside another one (an ``independent=True`` scope, a
    ``task_group()`` child) runs in a SAVEPOINT nested in the enclosing scope's
    under savepoint isolation; when the enclosing scope then rolls back, the
    nested scope's commit goes with it. The test sees less than production would.
    """


def _scope_of(sync: Session) -> Any:
    return getattr(sync, "_ts_scope", None)


def _describe(sync: Session) -> str:
    scope = _scope_of(sync)
    if scope is None:
        return "a session opened outside tasksession's scopes"
    return f"scope {scope.name!r} (task {scope.owner_name!r}, opened at {scope.opened_at})"


def _encloses(outer: Session, inner: Session) -> bool:
    """Whether ``inner``'s scope was opened inside ``outer``'s (same task, or a task it started)."""
    target = _scope_of(outer)
    scope = _scope_of(inner)
    if target is None or scope is None:
        return False
    scope = scope.previous
    while scope is not None:
        if scope is target:
            return True
        scope = scope.previous
    return False


class SharedConnection:
    """One connection in a transaction that sessions take in turns (see the module's text)."""

    def __init__(self, connection: AsyncConnection, wait_timeout: float = WAIT_TIMEOUT) -> None:
        if not wait_timeout > 0:
            raise ValueError(f"wait_timeout={wait_timeout!r} must be a positive number of seconds")
        self.connection = connection
        self.wait_timeout = wait_timeout
        #: The sessions whose transactions use the connection, outermost first.
        self.holders: list[Session] = []
        # holder -> scopes that committed in SAVEPOINTs nested in its transaction
        self._committed_inside: dict[Session, list[str]] = {}
        self._committed: set[Session] = set()  # holders whose transaction committed
        self._changed = anyio.Event()
        _BY_CONNECTION[connection.sync_connection] = self  # type: ignore[index]

    def close(self) -> None:
        """Stop serving sessions (the connection's owner ends its transaction next)."""
        sync = self.connection.sync_connection
        if sync is not None:
            _BY_CONNECTION.pop(sync, None)

    # -- turns ---------------------------------------------------------------------

    def _may_run(self, session: Session) -> bool:
        holders = self.holders
        # A holder with no transaction asked for its bind and never began (its
        # transaction would have given the connection back when it ended).
        while holders and holders[-1] is not session and not holders[-1].in_transaction():
            holders.pop()
        if not holders or holders[-1] is session:
            return True
        return session not in holders and _encloses(holders[-1], session)

    def take(self, session: Session) -> None:
        """Wait for ``session``'s turn (in an operation's greenlet) and hold the connection."""
        if not self._may_run(session):
            await_only(self._wait_turn(session, "run a statement"))
        if session not in self.holders:
            self.holders.append(session)

    async def wait_until_innermost(self, session: Session, operation: str) -> None:
        """Before ``session`` ends its transaction: wait until no one's savepoint is inside it."""
        if session in self.holders and self.holders[-1] is not session:
            await self._wait_turn(session, operation)

    def committed(self, session: Session) -> None:
        """``session``'s transaction committed (a RELEASE): it now lives in the one below."""
        holders = self.holders
        self._committed.add(session)
        if session not in holders:
            return
        index = holders.index(session)
        inside = self._committed_inside.pop(session, [])
        if index > 0:
            self._committed_inside.setdefault(holders[index - 1], []).extend(
                [_describe(session), *inside]
            )

    def give_back(self, session: Session) -> None:
        """``session``'s transaction ended: the next session may take the connection."""
        try:
            self.holders.remove(session)
        except ValueError:
            return
        inside = self._committed_inside.pop(session, None)
        if session in self._committed:
            self._committed.discard(session)
        elif inside:
            warnings.warn(
                f"{_describe(session)} rolled back, and with it what {'; '.join(inside)} "
                "committed inside it. In production each of those commits stands on its "
                "own; under savepoint isolation they ran in SAVEPOINTs nested in this "
                "scope's and are undone with it. If the test relies on them, run it in "
                'clone mode: @pytest.mark.tasksession(mode="clone").',
                SavepointIsolationWarning,
                stacklevel=2,
            )
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def _wait_turn(self, session: Session, operation: str) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while not self._may_run(session):
            remaining = deadline - time.monotonic()
            with anyio.move_on_after(max(remaining, 0)):
                await self._changed.wait()
                continue
            if not self._may_run(session):
                holder = self.holders[-1]
                scope = _scope_of(session)
                raise SharedConnectionTimeoutError(
                    _describe(session),
                    _describe(holder),
                    operation,
                    self.wait_timeout,
                    None if scope is None else scope.label,
                )


def _shared_of(session: AsyncSession) -> SharedConnection | None:
    bind = session.sync_session.bind
    if not isinstance(bind, Connection):
        return None
    return _BY_CONNECTION.get(bind)


def turn_taking_class(base: type[AsyncSession]) -> type[AsyncSession]:
    """A subclass of ``base`` whose sessions take turns on their :class:`SharedConnection`."""
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls

    def __init__(self: AsyncSession, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        shared = _shared_of(self)
        if shared is None:
            return
        sync = self.sync_session
        class_get_bind = sync.get_bind

        def get_bind(*args: Any, **kwargs: Any) -> Any:
            bind = class_get_bind(*args, **kwargs)
            holders = shared.holders
            # Only inside an operation's greenlet: the only place I/O happens, and
            # where waiting is possible. (The session's transaction may begin only
            # after this: a first statement asks for its bind before autobegin.)
            if (not holders or holders[-1] is not sync) and getcurrent().parent is not None:
                shared.take(sync)
            return bind

        # An instance attribute: SQLAlchemy calls self.get_bind() before every
        # statement and flush; the user's class keeps its own get_bind underneath.
        sync.get_bind = get_bind  # type: ignore[method-assign]

        def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
            if transaction.parent is None:  # the session's own (outermost) transaction
                shared.give_back(session)

        event.listen(sync, "after_transaction_end", after_transaction_end)
        event.listen(sync, "after_commit", shared.committed)

    async def _before_end(self: AsyncSession, operation: str) -> None:
        shared = _shared_of(self)
        if shared is not None:
            await shared.wait_until_innermost(self.sync_session, operation)

    async def commit(self: AsyncSession) -> None:
        await _before_end(self, "commit")
        await base.commit(self)

    async def rollback(self: AsyncSession) -> None:
        await _before_end(self, "roll back")
        await base.rollback(self)

    async def close(self: AsyncSession) -> None:
        await _before_end(self, "close")
        await base.close(self)
        shared = _shared_of(self)
        if shared is not None:  # asked for its bind and never began: nothing to end
            shared.give_back(self.sync_session)

    cls = type(
        base.__name__,
        (base,),
        {
            "__init__": __init__,
            "commit": commit,
            "rollback": rollback,
            "close": close,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        },
    )
    _CLASSES[base] = cls
    return cls
