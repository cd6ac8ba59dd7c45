"""The guard: who may use a scope's session, and when.

A scope's session records which task is inside one of its operations. Every
guarded operation calls :func:`enter_*` before it does anything and
:func:`leave` when it is done, in the shape of trio's ``ConflictDetector``: a
couple of slot reads and writes, no locks, no allocation, no stack inspection
on the happy path. A same-task reentrant call (an operation that calls another)
passes through; the outermost call releases the session.

The session is tied to the loop and thread of the task that entered its scope
(``_ts_loop``, ``_ts_thread``, set by the scope). When the scope ends,
``_ts_thread`` becomes :data:`CLOSED`, so a single thread check on the hot
path catches both a closed scope and a call from another thread; the slow path
(:func:`blocked`) tells them apart.

Modes (``SessionManager(guard=...)``):

``"concurrent"`` (default)
    Any task that can see the session may use it, one at a time. A second task
    starting an operation while another task's is in flight raises
    :class:`ConcurrentSessionError` before it touches the database.
``"strict"``
    Only the task that opened the scope may use the session.
``"off"``
    No task checks; a closed scope and another thread are still refused.

The functions take the session as ``self`` because they become methods of the
session classes built in :mod:`tasksession._session`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._compat import current_task, current_task_of, get_running_loop_or_none
from ._errors import ConcurrentSessionError, CrossThreadError, ScopeClosedError

if TYPE_CHECKING:
    from ._scope import Scope

__all__ = [
    "BY_MODE",
    "CLOSED",
    "GUARD_MODES",
    "blocked",
    "check_sync_concurrent",
    "check_sync_off",
    "check_sync_strict",
    "enter_concurrent",
    "enter_off",
    "enter_strict",
    "calling_task",
    "conflict",
    "current_task_of",
    "get_ident",
    "leave",
    "leave_off",
    "in_operation",
    "refuse_closed",
    "wake_teardown",
]

GUARD_MODES = ("concurrent", "strict", "off")

logger = logging.getLogger("tasksession")

_current_task_of = current_task_of
_get_ident = get_ident = threading.get_ident
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


def blocked(self: Any, operation: str) -> asyncio.Task[Any]:
    """The slow path when the calling thread is not the session's.

    Either the scope has ended (refused, unless its own teardown task calls:
    then that task is returned), or the caller runs in another thread.
    """
    if self._ts_scope.closed:
        refuse_closed(self, operation)
        task = current_task()
        assert task is not None  # refuse_closed() let only the teardown task through
        return task
    raise CrossThreadError(f"{operation}()")


def calling_task(self: Any, operation: str) -> asyncio.Task[Any]:
    """The task calling ``operation``; raises if the scope ended or from another thread."""
    # Asking the loop we know for its running task avoids get_running_loop(),
    # which costs a getpid() system call on CPython 3.11; the thread check
    # makes that safe.
    if _get_ident() != self._ts_thread:
        return blocked(self, operation)
    task = _current_task_of(self._ts_loop)
    if task is None:  # pragma: no cover - a loop callback, not a task
        raise CrossThreadError(f"{operation}()")
    return task


def refuse_closed(self: Any, operation: str) -> None:
    """The scope has ended: refuse ``operation``, unless its own teardown calls it.

    The teardown calls the user's ``session_class`` commit()/close(), which may
    well call flush() or other operations of the session themselves.
    """
    scope = self._ts_scope
    teardown = scope._teardown_task
    if teardown is None or get_running_loop_or_none() is None or teardown is not current_task():
        raise ScopeClosedError(scope.name, operation)


# Entering an operation returns whether this call took the session (and so
# must release it in leave()); a same-task reentrant call does not. No depth
# counter: the flag lives in the caller's frame, which costs nothing.


def enter_off(self: Any, operation: str) -> bool:
    """Start ``operation`` with the guard off: refuse only a closed scope or another thread.

    Tasks may overlap, so the operations in flight are counted (the scope's
    teardown waits for them to end).
    """
    if _get_ident() != self._ts_thread:
        blocked(self, operation)
    self._ts_in_flight += 1
    return True


def leave_off(self: Any, owned: bool) -> None:
    """Finish an operation started by :func:`enter_off`."""
    count = self._ts_in_flight - 1
    self._ts_in_flight = count
    if count == 0 and self._ts_thread == CLOSED:
        wake_teardown(self)


def in_operation(session: Any) -> bool:
    """Whether a task is inside an operation on ``session`` (any guard mode)."""
    return session._ts_busy_task is not None or session._ts_in_flight != 0


def enter_concurrent(self: Any, operation: str) -> bool:
    """Start ``operation``; refuse it if another task is inside an operation."""
    task = calling_task(self, operation)
    busy = self._ts_busy_task
    if busy is None:
        self._ts_busy_task = task
        self._ts_busy_operation = operation
        return True
    if busy is not task:
        raise conflict(self, task, operation, strict=False)
    return False


def enter_strict(self: Any, operation: str) -> bool:
    """Start ``operation``; refuse it unless the scope's owner task calls."""
    task = calling_task(self, operation)
    scope = self._ts_scope
    if task is not scope.owner and task is not scope._teardown_task:
        raise conflict(self, task, operation, strict=True)
    if self._ts_busy_task is None:
        self._ts_busy_task = task
        self._ts_busy_operation = operation
        return True
    return False


def leave(self: Any, owned: bool) -> None:
    """Finish an operation; if it took the session, release it (and wake a waiting teardown)."""
    if owned:
        self._ts_busy_task = None
        if self._ts_thread == CLOSED:
            wake_teardown(self)


def wake_teardown(self: Any) -> None:
    """Wake the scope teardown waiting for this session's operations to end, if one is."""
    scope = self._ts_scope
    waiter = scope._idle_waiter
    if waiter is not None:
        scope._idle_waiter = None
        waiter.set()


def check_sync_off(self: Any, operation: str) -> None:
    """Check a synchronous mutator with the guard off: closed scope and thread only."""
    if _get_ident() != self._ts_thread:
        blocked(self, operation)


def check_sync_concurrent(self: Any, operation: str) -> None:
    """Check a synchronous mutator (``add``, ``expire``, ...) under ``"concurrent"``.

    It does no I/O itself, so it only has to stay out of another task's
    in-flight operation.
    """
    if _get_ident() != self._ts_thread:
        task = blocked(self, operation)
    elif self._ts_busy_task is None:
        return
    else:
        task = calling_task(self, operation)
    busy = self._ts_busy_task
    if busy is not None and busy is not task:
        raise conflict(self, task, operation, strict=False)


def check_sync_strict(self: Any, operation: str) -> None:
    """Check a synchronous mutator under ``"strict"``: only the scope's owner may call it."""
    # calling_task() inlined: this runs on every add().
    task: Any
    if _get_ident() == self._ts_thread:
        task = _current_task_of(self._ts_loop)
    else:
        task = blocked(self, operation)
    scope = self._ts_scope
    if task is not scope.owner and task is not scope._teardown_task:
        raise conflict(self, task, operation, strict=True)


#: guard mode -> (enter a coroutine operation, leave it, check a synchronous mutator)
BY_MODE = {
    "concurrent": (enter_concurrent, leave, check_sync_concurrent),
    "strict": (enter_strict, leave, check_sync_strict),
    "off": (enter_off, leave_off, check_sync_off),
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


def conflict(
    self: Any, task: asyncio.Task[Any], operation: str, *, strict: bool
) -> ConcurrentSessionError:
    """Build (and count, and log once) the error for a refused operation."""
    scope: Scope = self._ts_scope
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
    )
    scope.manager._count_violation()
    # Logged here, once per violation, so that gather(..., return_exceptions=True)
    # cannot make it disappear.
    logger.warning("%s", error)
    return error
