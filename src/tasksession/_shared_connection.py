"""Many scopes on one connection, in one outer transaction: each in SAVEPOINTs, taking turns.

This is the machinery under savepoint test isolation (``tasksession.testing``),
exposed through :meth:`SessionManager.bound_to`. Every session a scope builds
is bound to the one connection with ``join_transaction_mode="create_savepoint"``
(SQLAlchemy's "join a session into an external transaction" recipe): its
transaction is a SAVEPOINT, its commit a RELEASE, its rollback a ROLLBACK TO.

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

import itertools
import time
import weakref
from dataclasses import replace
from typing import Any

import anyio
from greenlet import getcurrent  # type: ignore[import-untyped]  # ships no type hints
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import await_only

from ._commit import CommitWatchdog
from ._config import Binding
from ._errors import SharedConnectionTimeoutError
from ._session import session_class_for

__all__ = ["WAIT_TIMEOUT", "SharedConnection", "connection_binding", "shared_session_class"]

#: Seconds a scope waits for its turn on the shared connection by default.
WAIT_TIMEOUT = 5.0

_BY_CONNECTION: weakref.WeakKeyDictionary[Connection, SharedConnection] = (
    weakref.WeakKeyDictionary()
)
_CLASSES: dict[type[AsyncSession], type[AsyncSession]] = {}


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
        if not connection.in_transaction():
            raise ValueError(
                "bound_to(connection) needs a connection inside a transaction: "
                "`connection = await engine.connect(); await connection.begin()`"
            )
        if not wait_timeout > 0:
            raise ValueError(f"wait_timeout={wait_timeout!r} must be a positive number of seconds")
        self.connection = connection
        self.wait_timeout = wait_timeout
        #: The sessions whose transactions use the connection, outermost first.
        self.holders: list[Session] = []
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
        if not holders or holders[-1] is session:
            return True
        return session not in holders and _encloses(holders[-1], session)

    def take(self, session: Session) -> None:
        """Wait for ``session``'s turn (in an operation's greenlet) and hold the connection."""
        if self._may_run(session):
            if session not in self.holders:
                self.holders.append(session)
            return
        await_only(self._wait_turn(session, "run a statement"))
        if session not in self.holders:
            self.holders.append(session)

    async def wait_until_innermost(self, session: Session, operation: str) -> None:
        """Before ``session`` ends its transaction: wait until no one's savepoint is inside it."""
        if session in self.holders and self.holders[-1] is not session:
            await self._wait_turn(session, operation)

    def give_back(self, session: Session) -> None:
        """``session``'s transaction ended: the next session may take the connection."""
        try:
            self.holders.remove(session)
        except ValueError:
            return
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
                raise SharedConnectionTimeoutError(
                    _describe(session), _describe(holder), operation, self.wait_timeout
                )


def _shared_of(session: AsyncSession) -> SharedConnection | None:
    bind = session.sync_session.bind
    if not isinstance(bind, Connection):
        return None
    return _BY_CONNECTION.get(bind)


def shared_session_class(base: type[AsyncSession]) -> type[AsyncSession]:
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


def connection_binding(
    previous: Binding, connection: AsyncConnection, wait_timeout: float
) -> tuple[Binding, SharedConnection]:
    """``previous``'s configuration, with every session joining ``connection``'s transaction.

    Readonly scopes and replicas use the connection too (it is the test's whole
    database); ``commit_timeout`` is off, because a COMMIT here is a RELEASE that
    may first wait for its turn (bounded by ``wait_timeout`` instead).
    """
    shared = SharedConnection(connection, wait_timeout)
    options = previous.options
    join = {"join_transaction_mode": "create_savepoint"}
    bind: Any = connection  # sessions accept a connection wherever they take an engine
    binding = replace(
        previous,
        write_engine=bind,
        readonly_engine=bind,
        replica_engines=(),
        replica_readonly_engines=(),
        extra_engines=(),
        owns_engines=False,
        options=replace(options, commit_timeout=None, replicas=()),
        session_class=session_class_for(shared_session_class(options.session_class), options.guard),
        session_kwargs={**previous.session_kwargs, **join},
        write_session_kwargs={**previous.write_session_kwargs, **join},
        commit_watchdog=CommitWatchdog(),
        replica_turn=itertools.count(),
    )
    return binding, shared
