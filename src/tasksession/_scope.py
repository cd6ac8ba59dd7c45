"""Scopes: one unit of work, owned by the task that entered it.

``async with db.scope() as session`` enters a :class:`Scope`. What the scope
does depends on what is already open in the same task:

* nothing (or only a scope inherited from a parent task), or ``independent=True``:
  an **own** scope with a new session (built lazily, see :mod:`._session`);
* an open scope of this task: a **joined** scope that shares it and whose exit
  does nothing (the outermost scope commits);
* an open scope of this task and ``savepoint=True``: a **savepoint** scope that
  runs the block in a SAVEPOINT of the open scope's transaction.

An own scope's exit commits when the block ended cleanly and anything
happened, and rolls back on an exception, on cancellation (never a commit) and
always when readonly; then it closes the session. The part that does I/O runs
shielded from anyio cancellation; a COMMIT also runs in a task of its own so that
even a native ``Task.cancel()`` cannot stop it half-way (a ROLLBACK cut short
just costs its connection). A failure there is logged and added as a note to the
original exception, never raised in its place.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import types
import warnings
from collections.abc import Coroutine, Generator
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from ._compat import current_task, current_task_of
from ._completion import run_to_completion
from ._errors import CrossThreadError, ReadOnlyScopeError, UnsupportedBackendError
from ._guard import CLOSED, in_operation
from ._interrupt import cancel_orphans, has_orphans
from ._session import is_materialized
from ._shortcuts import (
    closes_without_io,
    commit_connections_and_close,
    commit_through_the_driver,
    commits_like_its_connections,
    driver_commit,
)
from ._streams import close_streams

if TYPE_CHECKING:
    from ._config import Binding
    from ._manager import SessionManager

__all__ = ["Scope", "running_task"]

logger = logging.getLogger("tasksession")

_OWN, _JOINED, _SAVEPOINT = 0, 1, 2
_monotonic = time.monotonic
_current_task = current_task
_getframe = sys._getframe
_get_ident = threading.get_ident
_current_task_of = current_task_of
_new = object.__new__
_async_commit = AsyncSession.commit


@types.coroutine
def _yield() -> Generator[None, None, None]:
    """One pass through the event loop: ``asyncio.sleep(0)`` without its argument checks."""
    yield


def running_task(what: str) -> asyncio.Task[Any]:
    """The current asyncio task, or the error that explains why there is none."""
    try:
        task = _current_task()
    except RuntimeError:
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                trio.lowlevel.current_task()
            except RuntimeError:
                pass
            else:
                raise UnsupportedBackendError("trio") from None
        raise CrossThreadError(what) from None
    if task is None:  # pragma: no cover - a loop callback, not a task
        raise CrossThreadError(what)
    return task


def held_connections(sync_session: Session) -> list[Connection]:
    """The connections ``sync_session``'s transaction holds (without acquiring new ones)."""
    transaction = sync_session.get_transaction()
    if transaction is None:
        return []
    # SessionTransaction.connections is public only from SQLAlchemy 2.1.7; the
    # private mapping (bind -> (connection, ...)) exists in every 2.x.
    return [entry[0] for entry in getattr(transaction, "_connections", {}).values()]


def _discard(connections: list[Connection]) -> None:
    # Runs in the greenlet: invalidating may have to terminate the driver
    # connection. Each step may fail on a broken connection; none may stop the rest.
    for connection in connections:
        try:
            connection.invalidate()
        except Exception:
            logger.debug("tasksession: invalidating a connection failed", exc_info=True)
        try:
            connection.close()
        except Exception:
            logger.debug("tasksession: returning a connection failed", exc_info=True)


class Scope:
    """One unit of work. Created by :meth:`SessionManager.scope`; use it with ``async with``."""

    # No __slots__: class attributes are the defaults, so creating a scope
    # sets only what the call passed (this is on every request's path).
    closed = False
    session: Any = None
    owner: asyncio.Task[Any] | None = None
    binding: Binding | None = None
    _kind = _OWN
    _code: CodeType | None = None
    _lasti = -1  # the caller's last instruction (byte offset): its line, on demand
    _outer: Scope | None = None
    _token: Any = None
    _opened = 0.0
    _nested: Any = None
    _built = False  # True once the session was built (see _session_built)
    _teardown_task: asyncio.Task[Any] | None = None  # may still use the ended scope's session
    _idle_waiter: anyio.Event | None = None  # the teardown, waiting for an operation to end
    _streams: list[Any] | None = None  # stream() results to close at exit (_streams.py)

    def __init__(
        self,
        manager: SessionManager,
        name: str | None,
        readonly: bool,
        savepoint: bool,
        independent: bool,
    ) -> None:
        self.manager = manager
        self._label = name
        self.readonly = readonly
        self._savepoint = savepoint
        self._independent = independent

    # -- diagnostics (computed only when asked) --------------------------------

    @property
    def opened_at(self) -> str:
        """``file:line in function`` of the ``async with db.scope()`` statement."""
        code = self._code
        if code is None:
            return "<not entered>"
        return f"{code.co_filename}:{self._lineno} in {code.co_name}"

    @property
    def _lineno(self) -> int | None:
        # Worked out only when a diagnostic asks: frame.f_lineno scans the
        # line table, which costs more than the rest of entering a scope.
        code = self._code
        if code is None:
            return None
        lasti = self._lasti
        for start, end, line in code.co_lines():
            if start <= lasti < end:
                return line
        return code.co_firstlineno

    @property
    def name(self) -> str:
        """The scope's label: ``name=`` if given, else the function and line that opened it."""
        if self._label is not None:
            return self._label
        code = self._code
        if code is None:
            return "<not entered>"
        return f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{self._lineno})"

    @property
    def guard_mode(self) -> str:
        """The guard mode of the configuration the scope was opened with."""
        binding = self.binding
        return binding.options.guard if binding is not None else "concurrent"

    @property
    def engine(self) -> AsyncEngine:
        """The engine the scope's session uses (a read-only view, maybe a replica, if readonly)."""
        binding = self.binding
        if binding is None:
            raise RuntimeError("the scope has not been entered")
        if self._outer is not None:
            return self._outer.engine
        if self.readonly:
            return self.manager._readonly_engine_for(binding)
        return binding.write_engine

    @property
    def owner_name(self) -> str:
        owner = self.owner
        return owner.get_name() if owner is not None else "<not entered>"

    @property
    def age(self) -> float:
        """Seconds since the scope was entered."""
        return _monotonic() - self._opened

    @property
    def holds_connection(self) -> bool:
        """Whether the scope's session currently holds a pooled connection."""
        session = self.session
        if session is None or not is_materialized(session):
            return False
        return bool(held_connections(session.sync_session))

    @property
    def operation_in_flight(self) -> bool:
        """Whether a task is inside an operation of the scope's session right now.

        Together with :attr:`holds_connection`: a statement may be running on the
        server, and cancelling the task now would cut that round trip off (SQLAlchemy
        then invalidates the connection rather than return it to the pool).
        """
        session = self.session
        return session is not None and in_operation(session)

    @property
    def pending(self) -> bool:
        """Whether a clean exit now would talk to the database.

        True when the session has a transaction open, objects waiting to be
        flushed, or an operation in flight; False for a session never used.
        Integrations use it to commit before answering only when there is
        something to commit (``tasksession.tornado``).
        """
        session = self.session
        if session is None or "sync_session" not in session.__dict__:
            return False
        sync = session.sync_session
        return bool(
            in_operation(session) or sync.in_transaction() or sync.new or sync.deleted or sync.dirty
        )

    # -- entering ---------------------------------------------------------------

    async def __aenter__(self) -> AsyncSession:
        if self.owner is not None:
            raise RuntimeError("a scope object can be entered only once; call db.scope() again")
        manager = self.manager
        # The manager remembers the loop it last ran on: asking that loop for its
        # task skips get_running_loop() (a getpid() system call on CPython 3.11).
        task = _current_task_of(manager._loop) if _get_ident() == manager._thread else None  # type: ignore[arg-type]
        if task is None:
            task = running_task("db.scope()")  # raises the explanatory error if there is none
            manager._loop = task.get_loop()
            manager._thread = _get_ident()
        caller = _getframe(1)  # the frame running `async with`: where the scope opens
        self._code = caller.f_code
        self._lasti = caller.f_lasti
        binding = manager._binding
        if binding is None:
            binding = manager._require_binding()
        var = manager._current
        current = var.get(None)
        if (
            current is not None
            and current.owner is task
            and not current.closed
            and not self._independent
        ):
            return await self._enter_inside(current, task)
        self.owner = task
        self.binding = binding
        # The session object now, SQLAlchemy's work on first use (see _session).
        session: Any = _new(binding.session_class)
        session._ts_scope = self
        # The guard's state (see _guard): this task's loop and thread, nobody inside.
        session._ts_loop = manager._loop
        session._ts_thread = manager._thread
        session._ts_busy_task = None
        session._ts_in_flight = 0
        self.session = session
        self._opened = _monotonic()
        self._token = var.set(self)
        manager._open_scopes[self] = None
        manager._scopes_entered += 1
        return session  # type: ignore[no-any-return]

    async def _enter_inside(self, current: Scope, task: asyncio.Task[Any]) -> AsyncSession:
        # The open scope of this task: join it, or open a savepoint in it.
        if current.readonly and not self.readonly:
            raise ReadOnlyScopeError(
                current.name, "opening a writable scope inside it (use independent=True)"
            )
        self.owner = task
        self._outer = current
        self.binding = current.binding
        self.session = current.session
        self._opened = _monotonic()
        if self._savepoint:
            self._kind = _SAVEPOINT
            self._nested = await current.session.begin_nested()
        else:
            self._kind = _JOINED
        return current.session  # type: ignore[no-any-return]

    # -- exiting ------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        kind = self._kind
        if kind == _JOINED:
            self.closed = True
            return
        if kind == _SAVEPOINT:
            self.closed = True
            await self._end_savepoint(exc_type is None, exc)
            return
        self.closed = True
        manager = self.manager
        try:
            manager._current.reset(self._token)
        except ValueError:
            # Exited in another context than it was entered in (a manual
            # __aexit__ from another task): unset it there instead.
            manager._current.set(None)
        finally:
            manager._open_scopes.pop(self, None)
        session = self.session
        session._ts_thread = CLOSED  # the guard refuses the session from now on
        # Unlinking breaks the scope <-> session reference cycle: both are freed
        # by reference counting when the caller drops them, not by the cycle
        # collector (which costs more than the rest of an untouched scope, and
        # a few percent of a whole unit of work).
        self.session = None
        if not self._built:  # the session was never used: nothing to close
            return
        commit = exc_type is None and not self.readonly
        sync = session.sync_session
        # Nobody inside an operation: the short ways (see _shortcuts) may apply.
        quiet = self._streams is None and not in_operation(session)
        if (
            quiet
            and not sync.in_transaction()
            and not (commit and (sync.new or sync.deleted or sync.dirty))
        ):
            # No transaction and nothing to flush: closing does no I/O.
            sync.close()
            manager._count_end(self, None)
            return
        if quiet and not commit and exc_type is None and closes_without_io(sync):
            # A read-only unit on the AUTOCOMMIT pool: nothing to roll back.
            sync.close()
            manager._count_end(self, "rollback")
            # The connection went back without a suspension, unlike every other
            # exit (a COMMIT or ROLLBACK awaits the server): yield once, so that
            # tasks waiting for a connection take it before this task goes on
            # (under pool contention, 50 clients on 10 connections, this cut the
            # requests that had to wait for a connection from 30-70% to ~1%, and
            # server CPU per request by ~9%: benchmarks/bench_tornado).
            await _yield()
            return
        if commit:
            short = (
                quiet
                and session._ts_base.commit is _async_commit
                and commits_like_its_connections(sync)
            )
            cleanup = (
                self._commit_short(session, sync) if short else self._teardown(session, True, exc)
            )
            # A COMMIT cut off after it was sent leaves the outcome unknown: run it
            # where no cancellation, anyio's or Task.cancel(), can reach it.
            await run_to_completion(cleanup, session._ts_loop)
            if self.binding is not None and self.binding.replica_engines:
                manager._note_write()
        else:
            # A ROLLBACK needs no such care: if a Task.cancel() cuts it off, the
            # connection is invalidated and the server rolls back. Shielding it
            # from anyio is enough, and cheaper than a task of its own.
            with anyio.CancelScope(shield=True):
                await self._teardown(session, False, exc)

    async def _teardown(self, session: Any, commit: bool, exc: BaseException | None) -> None:
        manager = self.manager
        # The user's commit()/close() overrides may use the session: the guard lets
        # this task do so while, and only while, the teardown runs.
        # (Asked of the session's loop, which this runs on: no getpid() system call.)
        self._teardown_task = _current_task_of(session._ts_loop)
        try:
            if in_operation(session):
                # Another task is inside an operation on this session (the scope is
                # already closed to new ones): let it finish before closing under it.
                waiter = anyio.Event()
                self._idle_waiter = waiter
                await waiter.wait()
            if self._streams is not None:
                # Before the commit or rollback returns the connection they read from.
                await close_streams(self)
            if commit:
                await self._commit(session, session._ts_base.commit(session))
            else:
                manager._count_end(self, "rollback")
            if exc is not None:
                await self._close_quietly(session, exc)
                if has_orphans(session.bind):
                    # A cancellation cut a statement off mid-flight: stop it on the server.
                    await cancel_orphans(session.bind)
            elif session.sync_session.in_transaction():
                await self._close_quietly(session, None)
            else:
                # Committed: the connection is back in the pool; closing does no I/O.
                session.sync_session.close()
        finally:
            self._teardown_task = None

    async def _commit_short(self, session: Any, sync: Session) -> None:
        """Commit the connections and close (nothing for the ORM to do: see _shortcuts)."""
        through_driver = driver_commit(sync)
        if through_driver is not None:
            commit = commit_through_the_driver(sync, *through_driver)
        else:
            commit = greenlet_spawn(commit_connections_and_close, sync)
        await self._commit(session, commit)

    async def _commit(self, session: Any, commit: Coroutine[Any, Any, None]) -> None:
        """Await ``commit`` and count the outcome; if it fails, roll back and close, and raise."""
        try:
            await commit
        except BaseException as error:
            self.manager._count_end(self, "rollback")
            await self._close_quietly(session, error)
            raise
        self.manager._count_end(self, "commit")

    async def _close_quietly(self, session: Any, original: BaseException | None) -> None:
        """Roll back and close; if that fails, discard the connections anyway.

        With an ``original`` exception the failure is logged and noted on it,
        never raised in its place; on a clean exit it is raised (after the
        connections were discarded, so nothing leaks either way).
        """
        held = held_connections(session.sync_session)
        try:
            await session._ts_base.close(session)
        except asyncio.CancelledError:
            # A Task.cancel() cut the ROLLBACK short (anyio's are shielded off):
            # discard the connections (the server rolls back when they close)
            # and let the cancellation go on; a cancellation is never swallowed.
            await greenlet_spawn(_discard, held)
            raise
        except BaseException as failure:
            self.manager._count_teardown_failure()
            await greenlet_spawn(_discard, held)
            if original is None:
                raise
            logger.error(
                "tasksession: closing the session of scope %r failed while handling %r",
                self.name,
                original,
                exc_info=failure,
            )
            original.add_note(
                f"tasksession: while this was being handled, closing the session of scope "
                f"{self.name!r} also failed: {failure!r}; its connection was invalidated"
            )

    async def _end_savepoint(self, clean: bool, exc: BaseException | None) -> None:
        nested = self._nested
        self._nested = None
        with anyio.CancelScope(shield=True):
            if clean:
                await nested.commit()
                return
            try:
                # A failed flush leaves the savepoint deactivated, not closed:
                # it still needs its ROLLBACK TO SAVEPOINT (is_active is False
                # then). Same test as SQLAlchemy's own `with begin_nested()`.
                if nested.sync_transaction._rollback_can_be_called():
                    await nested.rollback()
            except BaseException as failure:
                logger.error(
                    "tasksession: rolling back savepoint of scope %r failed",
                    self.name,
                    exc_info=failure,
                )
                if exc is not None:
                    exc.add_note(
                        f"tasksession: rolling back the savepoint also failed: {failure!r}"
                    )

    def _session_built(self) -> None:
        """Called when the scope's session is first used (built by SQLAlchemy)."""
        # Only scopes holding a real session need the garbage-collection check:
        # switching the class keeps __del__ off the path of untouched scopes.
        self.__class__ = _ScopeWithSession

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Scope {self.name!r} {state} task={self.owner_name!r}>"


class _ScopeWithSession(Scope):
    """A scope whose session was built: warns if it is garbage-collected unexited."""

    _built = True

    def __del__(self) -> None:
        if not self.closed and self._kind == _OWN:
            warnings.warn(
                f"scope {self.name!r} was garbage-collected without being exited; "
                "its session and connection were not closed. Use `async with db.scope():`.",
                ResourceWarning,
                stacklevel=1,
            )
