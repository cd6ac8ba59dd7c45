"""Scopes: one unit of work, owned by the task that entered it.

``async with db.scope() as session`` enters a :class:`Scope`: with nothing open in
the task (or ``independent=True``) an **own** scope with a new, lazily built
session (:mod:`._session`); inside an open scope of the task a **joined** one that
shares it (the outermost commits) or, with ``savepoint=True``, a **savepoint** one.
Entering and the ContextVar are this module's; how a unit ends is
:mod:`._teardown`'s (a savepoint's, :mod:`._savepoint`'s): the exit only
dispatches, and ends an untouched unit itself (there is nothing to close).
Integrations that decide when a unit ends call :meth:`Scope.end`. A manager's
scopes share one :class:`~._home.ScopeHome`.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from types import CodeType, FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._compat import current_task_of
from ._errors import ReadOnlyScopeError
from ._guard import CLOSED, in_operation
from ._home import ScopeHome
from ._outcome import COMMITTED, ROLLED_BACK, Outcome
from ._retry import explain_lost_connection
from ._savepoint import end_savepoint
from ._session import is_materialized
from ._shortcuts import held_connections
from ._stats import Ledger, ScopeRegistry
from ._tasks import line_of, private_frame, running_task, visible_scope
from ._teardown import end_unit

if TYPE_CHECKING:
    from ._config import Binding

__all__ = ["Scope"]

_OWN, _JOINED, _SAVEPOINT = 0, 1, 2
_monotonic = time.monotonic
_getframe = sys._getframe
_get_ident = threading.get_ident
_current_task_of = current_task_of
_new = object.__new__
_ASYNC_GENERATOR = inspect.CO_ASYNC_GENERATOR


class _RolledBack(Exception):
    """Why an integration ended a scope with a rollback (:meth:`Scope.end` with a reason text)."""


class Scope:
    """One unit of work. Created by :meth:`SessionManager.scope`; use it with ``async with``."""

    # No __slots__: class attributes are the defaults, so creating a scope
    # sets only what the call passed (this is on every request's path). The
    # public attributes are read and written by the teardown, the guard and the
    # streams (through their Protocols), not by applications.
    closed = False
    session: Any = None
    owner: asyncio.Task[Any] | None = None
    binding: Binding | None = None
    #: How the unit ended: ``"committed"``, ``"rolled back"`` or ``"unknown"`` (its
    #: COMMIT got no answer: :class:`CommitOutcomeUnknownError`). ``None`` while the
    #: scope is open, and for joined scopes (their outer scope decides). A savepoint
    #: scope says whether its savepoint was released.
    outcome: Outcome | None = None
    opened = 0.0  # time.monotonic() at entry
    previous: Scope | None = None  # the ContextVar's value when this scope was entered
    private_frame: FrameType | None = None  # the async generator frame it is private to
    streams: list[Any] | None = None  # stream() results to close at exit (_streams)
    nested: Any = None  # a savepoint scope's begin_nested() transaction
    commit_abandoned = False  # commit_timeout ran out: the COMMIT's outcome is unknown
    teardown_task: asyncio.Task[Any] | None = None  # may still use the ended scope's session
    idle_waiter: anyio.Event | None = None  # the teardown, waiting for an operation to end
    _kind = _OWN
    _code: CodeType | None = None
    _lasti = -1  # the caller's last instruction (byte offset): its line, on demand
    _outer: Scope | None = None
    _token: Any = None
    _built = False  # True once the session was built (see session_built)

    def __init__(
        self, home: ScopeHome, name: str | None, readonly: bool, savepoint: bool, independent: bool
    ) -> None:
        self.home = home
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
        return f"{code.co_filename}:{line_of(code, self._lasti)} in {code.co_name}"

    @property
    def name(self) -> str:
        """The scope's label: ``name=`` if given, else the function and line that opened it."""
        if self._label is not None:
            return self._label
        code = self._code
        if code is None:
            return "<not entered>"
        where = code.co_filename.rsplit("/", 1)[-1]
        return f"{code.co_name} ({where}:{line_of(code, self._lasti)})"

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
            # A replica, unless this task wrote recently (read-your-writes).
            return binding.readonly_engine_for(self.home.wrote_at)
        return binding.write_engine

    @property
    def owner_name(self) -> str:
        owner = self.owner
        return owner.get_name() if owner is not None else "<not entered>"

    @property
    def age(self) -> float:
        """Seconds since the scope was entered."""
        return _monotonic() - self.opened

    @property
    def has_session(self) -> bool:
        """Whether the scope's session was built (first used)."""
        return self._built

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
        # is_materialized() inlined: the Tornado mixin asks on every request.
        if session is None or "sync_session" not in session.__dict__:
            return False
        sync = session.sync_session
        return bool(
            in_operation(session) or sync.in_transaction() or sync.new or sync.deleted or sync.dirty
        )

    @property
    def joined(self) -> bool:
        """Whether the scope was entered inside an open scope of its task (joined, or a savepoint).

        Its unit is the enclosing one: its exit commits nothing.
        """
        return self._kind != _OWN

    @property
    def label(self) -> str | None:
        """The manager's name in the user's code (``db`` for ``db = SessionManager()``)."""
        return self.home.label

    @property
    def ledger(self) -> Ledger:
        """The manager's counters."""
        return self.home  # the home is the manager's ledger

    @property
    def open_scopes(self) -> ScopeRegistry:
        """The manager's open scopes."""
        return self.home.open_scopes

    # -- entering ---------------------------------------------------------------

    async def __aenter__(self) -> AsyncSession:
        if self.owner is not None:
            raise RuntimeError("a scope object can be entered only once; call db.scope() again")
        home = self.home
        task = _current_task_of(home.loop) if _get_ident() == home.thread else None  # type: ignore[arg-type]
        if task is None:
            label = home.label or "manager"
            task = running_task(f"{label}.scope()")  # raises the explanatory error if there is none
            home.loop = task.get_loop()
            home.thread = _get_ident()
        caller = _getframe(1)  # the frame running `async with`: where the scope opens
        code = caller.f_code
        self._code = code
        self._lasti = caller.f_lasti
        binding = home.binding
        if binding is None:
            binding = home.require_binding()
        var = home.current
        current = var.get(None)
        if current is not None and (current.closed or current.private_frame is not None):
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
            self.private_frame = private_frame(caller)
        self.owner = task
        self.binding = binding
        if current is not None:
            self.previous = current
        # The session object now, SQLAlchemy's work on first use (see _session).
        session: Any = _new(binding.session_class)
        session._ts_scope = self
        # The guard's state (see _guard): this task's loop and thread, nobody inside.
        session._ts_loop = home.loop
        session._ts_thread = home.thread
        session._ts_busy_task = None
        session._ts_in_flight = 0
        self.session = session
        self.opened = _monotonic()
        self._token = var.set(self)
        home.untouched[self] = None
        home.scopes_entered += 1
        return session  # type: ignore[no-any-return]

    async def _enter_inside(self, current: Scope, task: asyncio.Task[Any]) -> AsyncSession:
        # The open scope of this task: join it, or open a savepoint in it.
        if current.readonly and not self.readonly:
            label = self.home.label
            raise ReadOnlyScopeError(
                current.name, f"{label or 'manager'}.scope()", nested=True, manager=label
            )
        self.owner = task
        self._outer = current
        self.binding = current.binding
        self.session = current.session
        self.opened = _monotonic()
        if self._savepoint:
            self._kind = _SAVEPOINT
            self.nested = await current.session.begin_nested()
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
        # The block's exit with the same arguments (one code path: __aexit__ is on
        # every unit's path, and a layer between would cost every unit a coroutine).
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
        clean = exc_type is None
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
            await end_savepoint(self, clean, exc)
            return
        self.closed = True
        if self.private_frame is not None:
            self.private_frame = None  # a frame keeps its locals alive
        home = self.home
        var = home.current
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
                home.open_scopes.discard_built(self)
            else:
                home.untouched.pop(self, None)
        session = self.session
        session._ts_thread = CLOSED  # the guard refuses the session from now on
        # Unlinking breaks the scope <-> session reference cycle: both are freed
        # by reference counting when the caller drops them, not by the cycle
        # collector (which costs more than the rest of an untouched scope, and
        # a few percent of a whole unit of work).
        self.session = None
        if not self._built:  # the session was never used: nothing to close
            self.outcome = ROLLED_BACK if not clean or self.readonly else COMMITTED
            return
        await end_unit(self, session, clean, exc)

    def session_built(self) -> None:
        """Called by the session when it is first used (built by SQLAlchemy)."""
        self._built = True
        if not self.closed:
            # It may hold a connection from now on: held weakly (see _stats).
            self.home.open_scopes.session_built(self)

    def note_write(self) -> None:
        """This task committed a write: its readonly scopes read from the primary for a while."""
        # Deliberately never reset: it marks this task (and tasks it starts
        # later) as having written (see Binding.readonly_engine_for).
        self.home.wrote_at.set(_monotonic())

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Scope {self.name!r} {state} task={self.owner_name!r}>"
