"""The guard: who may use a scope's session, and when. One implementation per mode.

A scope's session records which task is inside one of its operations. Every
guarded operation is wrapped, once per session class, by the factory of its
guard mode (:data:`COROUTINE_GUARDS`, :data:`SYNC_GUARDS`), in the shape of
trio's ``ConflictDetector``: a couple of slot reads and writes, no locks, no
allocation, no stack inspection on the happy path. A same-task reentrant call
(an operation that calls another) passes through; the outermost call releases
the session. The wrappers are the guard's whole cost on every execute/get/flush,
so each mode's steps are written out in its wrapper rather than called.

The session is tied to the loop and thread of the task that entered its scope
(``_ts_loop``, ``_ts_thread``, set by the scope). When the scope ends,
``_ts_thread`` becomes :data:`CLOSED`, so a single thread check on the hot
path catches both a closed scope and a call from another thread; the slow path
(:func:`_blocked`) tells them apart.

Modes (``SessionManager(guard=...)``):

``"concurrent"`` (default)
    Any task that can see the session may use it, one at a time. A second task
    starting an operation while another task's is in flight raises
    :class:`ConcurrentSessionError` before it touches the database.
``"strict"``
    Only the task that opened the scope may use the session.
``"off"``
    No task checks; a closed scope and another thread are still refused.

The session's ``_ts_*`` slots are the seam with :mod:`._session` and the scope.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable
from types import FrameType
from typing import Any, Protocol

import anyio
from sqlalchemy import exc as sa_exc

from ._compat import current_task, current_task_of, get_running_loop_or_none
from ._errors import ConcurrentSessionError, CrossThreadError, ScopeClosedError
from ._stats import Ledger

__all__ = [
    "CLOSED",
    "COROUTINE_GUARDS",
    "GUARD_MODES",
    "SYNC_GUARDS",
    "GuardedScope",
    "in_operation",
    "task_location",
    "wake_teardown",
]

GUARD_MODES = ("concurrent", "strict", "off")

logger = logging.getLogger("tasksession")

_current_task_of = current_task_of
_get_ident = threading.get_ident
# Frames from these packages are plumbing; locations point at the user's code.
_PLUMBING = (
    "/tasksession/",
    "/sqlalchemy/",
    "/asyncio/",
    "/anyio/",
    "/greenlet/",
    "/asyncpg/",
    "/aiosqlite/",
)

#: ``session._ts_thread`` once the scope has ended: no thread has this ident, so
#: the hot path's thread check fails and the slow path says why.
CLOSED = 0

Coroutine_ = Callable[..., Coroutine[Any, Any, Any]]
#: Turns a pool checkout timeout into the error that names the holders (see _pool).
OnTimeout = Callable[[Any, sa_exc.TimeoutError], BaseException]


class GuardedScope(Protocol):
    """What the guard reads (and the teardown wakes) of the scope a session belongs to."""

    closed: bool
    owner: asyncio.Task[Any] | None
    teardown_task: asyncio.Task[Any] | None  # may still use the ended scope's session
    idle_waiter: anyio.Event | None  # the teardown, waiting for an operation to end

    @property
    def name(self) -> str: ...
    @property
    def owner_name(self) -> str: ...
    @property
    def label(self) -> str | None: ...
    @property
    def ledger(self) -> Ledger: ...


def _blocked(session: Any, operation: str) -> asyncio.Task[Any]:
    """The slow path when the calling thread is not the session's.

    Either the scope has ended (refused, unless its own teardown task calls:
    then that task is returned; the teardown calls the user's ``session_class``
    commit()/close(), which may well call other operations of the session), or
    the caller runs in another thread.
    """
    scope: GuardedScope = session._ts_scope
    if scope.closed:
        teardown = scope.teardown_task
        if teardown is None or get_running_loop_or_none() is None or teardown is not current_task():
            raise ScopeClosedError(scope.name, f"{operation}()", manager=scope.label)
        return teardown
    raise CrossThreadError(f"{operation}()")


def in_operation(session: Any) -> bool:
    """Whether a task is inside an operation on ``session`` (any guard mode)."""
    return session._ts_busy_task is not None or session._ts_in_flight != 0


def wake_teardown(session: Any) -> None:
    """Wake the scope teardown waiting for this session's operations to end, if one is."""
    scope: GuardedScope = session._ts_scope
    waiter = scope.idle_waiter
    if waiter is not None:
        scope.idle_waiter = None
        waiter.set()


# -- coroutine operations: one wrapper factory per mode ----------------------------


def _one_at_a_time(
    name: str, method: Coroutine_, on_timeout: OnTimeout, strict: bool
) -> Coroutine_:
    """``"concurrent"`` (and, with ``strict``, ``"strict"``): one task inside at a time."""

    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        # One check for both "scope ended" and "another thread". Asking the loop
        # we know for its running task avoids get_running_loop(), which costs a
        # getpid() system call on CPython 3.11; the thread check makes that safe.
        task: Any
        if _get_ident() == self._ts_thread:
            task = _current_task_of(self._ts_loop)
        else:
            task = _blocked(self, name)
        if strict:
            scope = self._ts_scope
            if task is not scope.owner and task is not scope.teardown_task:
                raise _conflict(self, task, name, strict=True)
        busy = self._ts_busy_task
        if busy is None:
            self._ts_busy_task = task
            self._ts_busy_operation = name
            try:
                return await method(self, *args, **kwargs)
            except sa_exc.TimeoutError as error:
                raise on_timeout(self, error) from error
            finally:
                self._ts_busy_task = None
                if self._ts_thread == CLOSED:
                    wake_teardown(self)
        if busy is not task and not strict:
            raise _conflict(self, task, name, strict=False)
        # Same-task reentrancy: the outer call releases the session.
        try:
            return await method(self, *args, **kwargs)
        except sa_exc.TimeoutError as error:
            raise on_timeout(self, error) from error

    return guarded


def _concurrent(name: str, method: Coroutine_, on_timeout: OnTimeout) -> Coroutine_:
    return _one_at_a_time(name, method, on_timeout, False)


def _strict(name: str, method: Coroutine_, on_timeout: OnTimeout) -> Coroutine_:
    return _one_at_a_time(name, method, on_timeout, True)


def _off(name: str, method: Coroutine_, on_timeout: OnTimeout) -> Coroutine_:
    """``"off"``: tasks may overlap, so the operations in flight are counted.

    The scope's teardown waits for them to end.
    """

    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _get_ident() != self._ts_thread:
            _blocked(self, name)
        self._ts_in_flight += 1
        try:
            return await method(self, *args, **kwargs)
        except sa_exc.TimeoutError as error:
            raise on_timeout(self, error) from error
        finally:
            count = self._ts_in_flight - 1
            self._ts_in_flight = count
            if count == 0 and self._ts_thread == CLOSED:
                wake_teardown(self)

    return guarded


#: guard mode -> ``factory(name, method, on_timeout)``: the guarded coroutine method.
COROUTINE_GUARDS: dict[str, Callable[[str, Coroutine_, OnTimeout], Coroutine_]] = {
    "concurrent": _concurrent,
    "strict": _strict,
    "off": _off,
}


# -- synchronous mutators (add, expire, begin...): they do no I/O themselves ------


def _sync_concurrent(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Stay out of another task's in-flight operation."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        task: Any
        if _get_ident() != self._ts_thread:
            task = _blocked(self, name)
        elif self._ts_busy_task is None:
            return method(self, *args, **kwargs)
        else:
            task = _current_task_of(self._ts_loop)
        busy = self._ts_busy_task
        if busy is not None and busy is not task:
            raise _conflict(self, task, name, strict=False)
        return method(self, *args, **kwargs)

    return guarded


def _sync_strict(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Only the scope's owner (or its teardown) may call it."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        task: Any
        if _get_ident() == self._ts_thread:
            task = _current_task_of(self._ts_loop)
        else:
            task = _blocked(self, name)
        scope = self._ts_scope
        if task is not scope.owner and task is not scope.teardown_task:
            raise _conflict(self, task, name, strict=True)
        return method(self, *args, **kwargs)

    return guarded


def _sync_off(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """A closed scope and another thread only."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _get_ident() != self._ts_thread:
            _blocked(self, name)
        return method(self, *args, **kwargs)

    return guarded


#: guard mode -> ``factory(name, method)``: the guarded synchronous method.
SYNC_GUARDS: dict[str, Callable[[str, Callable[..., Any]], Callable[..., Any]]] = {
    "concurrent": _sync_concurrent,
    "strict": _sync_strict,
    "off": _sync_off,
}


# -- the error path: build the diagnosis -------------------------------------


def _is_user_frame(filename: str) -> bool:
    return not any(part in filename for part in _PLUMBING)


def _describe(frames: Iterable[FrameType]) -> str:
    last = None
    for frame in frames:
        last = frame
        if _is_user_frame(frame.f_code.co_filename):
            code = frame.f_code
            return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
    if last is not None:
        code = last.f_code
        return f"{code.co_filename}:{last.f_lineno} in {code.co_name}"
    return "<unknown location>"


def _caller_frames() -> Iterable[FrameType]:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def task_location(task: asyncio.Task[Any]) -> str:
    """Where ``task`` is suspended, innermost user frame first."""
    # get_stack() lists outermost first; the innermost user frame is the useful one.
    return _describe(reversed(task.get_stack()))


def _conflict(
    session: Any, task: asyncio.Task[Any], operation: str, *, strict: bool
) -> ConcurrentSessionError:
    """Build (and count, and log once) the error for a refused operation."""
    self = session
    scope: GuardedScope = self._ts_scope
    if strict:
        holder = scope.owner
        holder_operation = self._ts_busy_operation if self._ts_busy_task is holder else "-"
    else:
        holder = self._ts_busy_task
        holder_operation = self._ts_busy_operation
    if holder is None or holder.done():
        holder_location = "<finished>"
        holder_name = scope.owner_name if holder is None else holder.get_name()
    else:
        holder_location = task_location(holder)
        holder_name = holder.get_name()
    error = ConcurrentSessionError(
        scope_name=scope.name,
        holder_task=holder_name,
        holder_operation=holder_operation,
        holder_location=holder_location,
        caller_task=task.get_name(),
        caller_operation=operation,
        caller_location=_describe(_caller_frames()),
        strict=strict,
        manager=scope.label,
    )
    scope.ledger.violations += 1
    # Logged here, once per violation, so that gather(..., return_exceptions=True)
    # cannot make it disappear.
    logger.warning("%s", error)
    return error
