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
original exception, never raised in its place. A savepoint's RELEASE or
ROLLBACK TO SAVEPOINT runs in a task of its own too.

How the unit ended is recorded (:attr:`Scope.outcome`): a COMMIT that got no
answer raises :class:`CommitOutcomeUnknownError` (see :mod:`._outcome`), its wait
bounded by ``commit_timeout`` (see :mod:`._watchdog`); a native cancellation
re-raised by the exit carries the outcome. The ContextVar's value is not always
the running code's scope (scopes exited out of order, a suspended async
generator's scope): :func:`visible_scope` finds the one it is inside.
"""

from __future__ import annotations

import asyncio
import inspect
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
from ._errors import (
    CommitOutcomeUnknownError,
    CrossThreadError,
    ReadOnlyScopeError,
    UnsupportedBackendError,
)
from ._frames import is_running, private_frame
from ._guard import CLOSED, in_operation
from ._interrupt import cancel_orphans_soon, has_orphans
from ._outcome import (
    COMMITTED,
    ROLLED_BACK,
    UNKNOWN,
    Outcome,
    mark_cancellation,
    outcome_of_failed_commit,
)
from ._retry import explain_lost_connection
from ._session import is_materialized
from ._shortcuts import (
    closes_without_io,
    commit_connections_and_close,
    commit_through_the_driver,
    commits_like_its_connections,
    driver_commit,
    is_asyncpg,
    terminate_asyncpg,
)
from ._streams import close_streams

if TYPE_CHECKING:
    from ._config import Binding
    from ._manager import SessionManager

__all__ = ["Scope", "running_task", "visible_scope"]

logger = logging.getLogger("tasksession")

_OWN, _JOINED, _SAVEPOINT = 0, 1, 2
_monotonic = time.monotonic
_current_task = current_task
_getframe = sys._getframe
_get_ident = threading.get_ident
_current_task_of = current_task_of
_new = object.__new__
_async_commit = AsyncSession.commit
_ASYNC_GENERATOR = inspect.CO_ASYNC_GENERATOR


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


def visible_scope(scope: Scope | None, task: asyncio.Task[Any] | None) -> Scope | None:
    """The scope the code running in ``task`` is inside, given the ContextVar's value ``scope``.

    Usually ``scope`` itself. Two things can leave the variable pointing at a
    scope that is not the running code's, and both only this task's own scopes:

    * scopes exited out of order (an outer one before an inner ``independent``
      one): the inner one's exit restores a scope that has already ended;
    * a scope opened in an async generator that is suspended at a ``yield``
      (see :mod:`._frames`): it belongs to the generator, not to the code
      iterating it.

    Both are skipped, outwards, to the scope that was current when they were
    entered. A scope of another task (inherited by a child task) is returned
    as it is, open or closed: the caller decides what that means.
    """
    while scope is not None and scope.owner is task:
        frame = scope._private_frame
        if not scope.closed and (frame is None or is_running(frame)):
            return scope
        scope = scope._previous
    return scope


def _discard(connections: list[Connection]) -> None:
    """Invalidate ``connections`` and give them back to their pool (the server rolls back).

    Run it in a greenlet unless every connection is an asyncpg one: those are
    terminated at once, without the graceful close (up to 2 s over a stalled
    network) that SQLAlchemy would attempt inside a greenlet. Each step may
    fail on a broken connection; none may stop the rest.
    """
    for connection in connections:
        try:
            terminate_asyncpg(connection)
        except Exception:
            logger.debug("tasksession: terminating a connection failed", exc_info=True)
        try:
            connection.invalidate()
        except Exception:
            logger.debug("tasksession: invalidating a connection failed", exc_info=True)
        try:
            connection.close()
        except Exception:
            logger.debug("tasksession: returning a connection failed", exc_info=True)


async def _discard_soon(connections: list[Connection]) -> None:
    """:func:`_discard` ``connections``: at once for asyncpg ones, else in a greenlet."""
    if all(is_asyncpg(connection) for connection in connections):
        _discard(connections)
    else:
        await greenlet_spawn(_discard, connections)


class _RolledBack(Exception):
    """Why an integration ended a scope with a rollback (:meth:`Scope.end`)."""


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
    _previous: Scope | None = None  # the ContextVar's value when this scope was entered
    _private_frame: Any = None  # the async generator frame the scope is private to (_frames)
    _commit_abandoned = False  # commit_timeout ran out: the COMMIT's outcome is unknown
    _outcome: Outcome | None = None  # see the outcome property

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
    def outcome(self) -> Outcome | None:
        """How the unit ended: ``"committed"``, ``"rolled back"`` or ``"unknown"``.

        ``"unknown"``: its COMMIT got no answer (see :class:`CommitOutcomeUnknownError`).
        ``None`` while the scope is open, and for joined scopes (their outer scope
        decides). A savepoint scope says whether its savepoint was released.
        """
        outcome = self._outcome
        if outcome is None and self.closed and self._kind == _OWN and not self._built:
            # An untouched unit records only a rollback (its exit is kept minimal).
            return COMMITTED
        return outcome

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
        code = caller.f_code
        self._code = code
        self._lasti = caller.f_lasti
        binding = manager._binding
        if binding is None:
            binding = manager._require_binding()
        var = manager._current
        current = var.get(None)
        if current is not None and (current.closed or current._private_frame is not None):
            # Not necessarily this code's scope (exited out of order, or a suspended
            # async generator's): find the one it is really inside.
            current = visible_scope(current, task)
        if (
            current is not None
            and current.owner is task
            and not current.closed
            and not self._independent
        ):
            return await self._enter_inside(current, task)
        if code.co_flags & _ASYNC_GENERATOR:
            self._private_frame = private_frame(caller)
        self.owner = task
        self.binding = binding
        if current is not None:
            self._previous = current
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
        manager._untouched_scopes[self] = None
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

    async def end(self, commit: bool, reason: BaseException | str | None = None) -> None:
        """End the unit now, as the end of its ``async with`` block would: for integrations.

        A framework that decides when a unit ends (``tasksession.tornado`` commits
        before the response is sent, rolls back on an error status) calls this
        instead of the block's ``__aexit__``. Entering stays ``async with`` or
        ``await scope.__aenter__()``.

        :param commit: commit (if anything happened; a readonly scope never commits)
            or roll back.
        :param reason: why it rolls back: the exception being handled (notes about
            a failed rollback are added to it) or a few words for the logs.
        :raises Exception: the commit failed (the unit was rolled back, or its
            outcome is unknown: :class:`CommitOutcomeUnknownError`).
        """
        if commit:
            await self.__aexit__(None, None, None)
            return
        cause = (
            reason if isinstance(reason, BaseException) else _RolledBack(reason or "rolled back")
        )
        await self.__aexit__(type(cause), cause, cause.__traceback__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            # asyncpg's "another operation is in progress" after the server closed
            # the connection reads like session sharing: say what it is.
            explain_lost_connection(exc, self.guard_mode)
        kind = self._kind
        if kind == _JOINED:
            self.closed = True
            return
        if kind == _SAVEPOINT:
            self.closed = True
            await self._end_savepoint(exc_type is None, exc)
            return
        self.closed = True
        if self._private_frame is not None:
            self._private_frame = None  # a frame keeps its locals alive
        manager = self.manager
        var = manager._current
        try:
            # Only while this scope is the current one: after an out-of-order exit
            # the variable holds a scope entered later, which resets it itself.
            if var.get(None) is self:
                var.reset(self._token)
        except ValueError:
            # Exited in another context than it was entered in (a manual
            # __aexit__ from another task): unset it there instead.
            var.set(None)
        finally:
            if self._built:
                manager._open_scopes.discard_built(self)
            else:
                manager._untouched_scopes.pop(self, None)
        session = self.session
        session._ts_thread = CLOSED  # the guard refuses the session from now on
        # Unlinking breaks the scope <-> session reference cycle: both are freed
        # by reference counting when the caller drops them, not by the cycle
        # collector (which costs more than the rest of an untouched scope, and
        # a few percent of a whole unit of work).
        self.session = None
        if not self._built:  # the session was never used: nothing to close
            if exc_type is not None or self.readonly:
                self._outcome = ROLLED_BACK
            return
        commit = exc_type is None and not self.readonly
        sync = session.sync_session
        if self.readonly and exc_type is None and not sync._is_clean():
            # Objects added, changed or deleted and never flushed: a readonly scope
            # would drop them without a word. Refuse, as a flush would have.
            await self._refuse_unflushed_writes(session, sync)
        # Nobody inside an operation: the short ways (see _shortcuts) may apply.
        quiet = self._streams is None and not in_operation(session)
        if (
            quiet
            and not sync.in_transaction()
            and not (commit and (sync.new or sync.deleted or sync.dirty))
        ):
            # No transaction and nothing to flush: closing does no I/O.
            sync.close()
            self._outcome = COMMITTED if commit else ROLLED_BACK
            manager._count_end(self, None)
            return
        if quiet and not commit and exc_type is None and closes_without_io(sync):
            # A read-only unit on the AUTOCOMMIT pool: nothing to roll back.
            sync.close()
            self._outcome = ROLLED_BACK
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
            try:
                await run_to_completion(cleanup, session._ts_loop)
            except asyncio.CancelledError as cancelled:
                # A Task.cancel() arrived meanwhile; it is re-raised once the
                # COMMIT has ended: say how it ended.
                mark_cancellation(cancelled, self._outcome or UNKNOWN, self.name)
                raise
            if self.binding is not None and self.binding.replica_engines:
                manager._note_write()
        else:
            # A ROLLBACK needs no such care: if a Task.cancel() cuts it off, the
            # connection is invalidated and the server rolls back. Shielding it
            # from anyio is enough, and cheaper than a task of its own.
            try:
                with anyio.CancelScope(shield=True):
                    await self._teardown(session, False, exc)
            except asyncio.CancelledError as cancelled:
                mark_cancellation(cancelled, ROLLED_BACK, self.name)
                raise
            if isinstance(exc, asyncio.CancelledError):
                mark_cancellation(exc, ROLLED_BACK, self.name)

    async def _refuse_unflushed_writes(self, session: Any, sync: Session) -> None:
        """Roll back and close a readonly scope left with unflushed writes; raise the refusal."""
        kinds = sorted({type(obj).__name__ for obj in (*sync.new, *sync.dirty, *sync.deleted)})
        error = ReadOnlyScopeError(
            self.name,
            f"ending with {len(sync.new)} new, {len(sync.dirty)} changed and "
            f"{len(sync.deleted)} deleted object(s) never flushed ({', '.join(kinds)})",
        )
        with anyio.CancelScope(shield=True):
            await self._teardown(session, False, error)
        raise error

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
                self._outcome = ROLLED_BACK
                manager._count_end(self, "rollback")
            if exc is not None:
                await self._close_quietly(session, exc)
                if has_orphans(session.bind):
                    # A cancellation cut a statement off mid-flight: stop it on the
                    # server, in the background (the caller's deadline has passed).
                    cancel_orphans_soon(session.bind)
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
        await self._commit(session, commit, sent=True)

    async def _commit(
        self, session: Any, commit: Coroutine[Any, Any, None], *, sent: bool = False
    ) -> None:
        """Await ``commit``, bounded by ``commit_timeout``, and record the outcome.

        If it fails: a failure before the COMMIT or the server's rejection of it
        rolls back and closes, and raises the failure; a COMMIT that got no answer
        discards the connection and raises :class:`CommitOutcomeUnknownError`.

        :param sent: ``commit`` starts with the COMMIT (the short ways); otherwise
            SQLAlchemy's transaction state says whether it got that far.
        """
        binding: Binding = self.binding  # type: ignore[assignment]  # an entered scope's
        timeout = binding.options.commit_timeout
        if timeout is not None:
            binding.commit_watchdog.watch(session, timeout, session._ts_loop)
        try:
            await commit
        except BaseException as error:
            explain_lost_connection(error, self.guard_mode)
            sync = session.sync_session
            outcome = (
                UNKNOWN
                if self._commit_abandoned
                else outcome_of_failed_commit(sync, error, sent=sent)
            )
            self._outcome = outcome
            if outcome == UNKNOWN:
                self.manager._count_end(self, None)
                # The connection is in doubt (a reply may still arrive): never reuse it.
                await _discard_soon(held_connections(sync))
                if isinstance(error, Exception):
                    reason = (
                        f"no answer to its COMMIT within commit_timeout={timeout}s"
                        if self._commit_abandoned
                        else f"its COMMIT failed with {type(error).__name__}"
                    )
                    raise CommitOutcomeUnknownError(self.name, error, reason=reason) from error
                raise
            self.manager._count_end(self, "commit" if outcome == COMMITTED else "rollback")
            await self._close_quietly(session, error)
            if outcome == COMMITTED:
                error.add_note(
                    f"tasksession: scope {self.name!r} was COMMITTED before this error "
                    "(raised after the COMMIT, e.g. by an after_commit listener)"
                )
            raise
        finally:
            if timeout is not None:
                binding.commit_watchdog.done(session)
        self._outcome = COMMITTED
        self.manager._count_end(self, "commit")

    def abandon_commit(self, session: Any) -> None:
        """``commit_timeout`` ran out: cut the connection so that the waiting COMMIT ends.

        Called by the binding's :class:`~._watchdog.CommitWatchdog`.

        The server may have committed or not; its answer will never be read. A
        connection that cannot be cut at once (not asyncpg) is waited for.
        """
        connections = held_connections(session.sync_session)
        cut = [connection for connection in connections if terminate_asyncpg(connection)]
        if not cut:
            return
        self._commit_abandoned = True
        logger.error(
            "tasksession: the COMMIT of scope %r (task %r, opened at %s) got no answer "
            "within commit_timeout=%ss: its connection was cut and the outcome is unknown",
            self.name,
            self.owner_name,
            self.opened_at,
            self.binding.options.commit_timeout if self.binding is not None else None,
        )

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
            await _discard_soon(held)
            raise
        except BaseException as failure:
            self.manager._count_teardown_failure()
            await _discard_soon(held)
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
        """Release the block's savepoint on a clean exit, roll back to it on an exception.

        Each round trip runs to its end in a task of its own, as a COMMIT does (see
        :mod:`._completion`): a native ``Task.cancel()`` (``asyncio.timeout``) cutting
        RELEASE / ROLLBACK TO SAVEPOINT short costs the connection and leaves
        SQLAlchemy's savepoint stack out of step with it, so that every enclosing
        savepoint's rollback then warns "nested transaction already deassociated from
        connection". Such a cancellation is re-raised once the round trip is done,
        never swallowed.

        A savepoint already ended inside the block (``session.commit()`` there commits
        the whole enclosing transaction) is reported: logged, and noted on the
        exception; on an exception the block's work after that call is rolled back.
        """
        nested = self._nested
        self._nested = None
        session = self.session
        savepoint = nested.sync_transaction

        async def run(operation: str, step: Any) -> None:
            # The guard is entered here, in the task leaving the block: to the guard,
            # the helper task that runs the round trip would be a stranger.
            owned = session._ts_enter(operation)
            try:
                await run_to_completion(greenlet_spawn(step), session._ts_loop)
            finally:
                session._ts_leave(owned)

        if savepoint._rollback_can_be_called():
            if clean:
                try:
                    await run("commit", savepoint.commit)
                except asyncio.CancelledError as cancelled:
                    if not savepoint._rollback_can_be_called():  # released
                        cancelled.add_note(
                            f"tasksession: this cancellation arrived while the savepoint of "
                            f"scope {self.name!r} was being released; the release ran to its "
                            "end first: the block's work is in the enclosing transaction (its "
                            "scope rolls it back when this cancellation reaches it)"
                        )
                    raise
                self._outcome = COMMITTED  # released into the enclosing unit
                return
            self._outcome = ROLLED_BACK
            try:
                # A failed flush leaves the savepoint deactivated, not closed: it
                # still needs its ROLLBACK TO SAVEPOINT (is_active is False then).
                await run("rollback", savepoint.rollback)
            except Exception as failure:  # a cancellation is no failure: it goes on
                logger.error(
                    "tasksession: rolling back savepoint of scope %r failed",
                    self.name,
                    exc_info=failure,
                )
                if exc is not None:
                    exc.add_note(
                        f"tasksession: rolling back the savepoint also failed: {failure!r}"
                    )
            return
        # The savepoint was closed inside the block (COMMITTED is only transient).
        self._outcome = COMMITTED if exc is None else ROLLED_BACK
        root = savepoint
        while root.parent is not None:
            root = root.parent
        if root._rollback_can_be_called():
            # Its own transaction object's commit() / rollback() ended just the
            # savepoint: the later work went into the enclosing transaction, inseparably.
            what = (
                f"the savepoint of scope {self.name!r} (savepoint=True) was ended inside the "
                "block (commit() or rollback() of its transaction object); the block's later "
                "work went into the enclosing transaction and "
                + (
                    "is committed or rolled back with it."
                    if exc is None
                    else "could not be rolled back on its own: it stays there."
                )
            )
        else:
            # session.commit() / rollback() / close(): SQLAlchemy 2 ends the whole
            # transaction, savepoints included. What the session holds now was begun
            # after that call, by this block: on an exception, roll it back.
            sync = session.sync_session
            if exc is not None and sync.in_transaction():
                try:
                    await run("rollback", sync.rollback)
                except Exception as failure:
                    logger.error(
                        "tasksession: rolling back the later work of scope %r failed",
                        self.name,
                        exc_info=failure,
                    )
                    exc.add_note(
                        f"tasksession: rolling back the block's later work failed: {failure!r}"
                    )
            what = (
                f"session.commit() or rollback() was called inside scope {self.name!r} "
                "(savepoint=True): it ended the whole enclosing transaction, not the savepoint "
                "(commit() committed the enclosing unit's work up to that point, rollback() "
                "discarded it, work from before the block included; a savepoint cannot be "
                "committed on its own). "
                + (
                    "The block's later work is in a new transaction, which the enclosing "
                    "scope commits or rolls back."
                    if exc is None
                    else "The block's later work was rolled back, as the block raised "
                    "(what a commit() committed stays committed)."
                )
            )
        message = (
            f"tasksession: {what} Instead, let the block end (a clean exit releases the "
            "savepoint into the enclosing unit, an exception rolls it back), or use "
            "db.scope(independent=True) for work that must commit on its own."
        )
        logger.warning("%s", message)
        if exc is not None:
            exc.add_note(message)

    def _session_built(self) -> None:
        """Called when the scope's session is first used (built by SQLAlchemy)."""
        # Only scopes holding a real session need the garbage-collection check:
        # switching the class keeps __del__ off the path of untouched scopes.
        self.__class__ = _ScopeWithSession
        if not self.closed:
            # It may hold a connection from now on: held weakly (see _registry).
            self.manager._open_scopes.session_built(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Scope {self.name!r} {state} task={self.owner_name!r}>"


class _ScopeWithSession(Scope):
    """A scope whose session was built: reports it if it is garbage-collected unexited."""

    _built = True

    def __del__(self) -> None:
        if self.closed or self._kind != _OWN:
            return
        self.closed = True
        # Collected without being exited: its task ended or was abandoned. The
        # registry holds scopes weakly so that this can happen at all; by now
        # SQLAlchemy's pool has dropped the connection (the server rolls back)
        # and taken it off the checked-out count. Say where the scope was opened.
        self.manager._open_scopes.discard_built(self)
        message = (
            f"scope {self.name!r} (task {self.owner_name!r}, opened at {self.opened_at}) was "
            "garbage-collected without being exited: it never committed, and its connection "
            "was dropped (the server rolls its transaction back). Exit every scope you "
            "enter: `async with db.scope():`, never a bare __aenter__()."
        )
        logger.error("tasksession: %s", message)
        warnings.warn(message, ResourceWarning, stacklevel=1)
