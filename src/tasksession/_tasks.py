"""Which task and which scope the running code belongs to.

:func:`running_task` finds the calling task, or the error that explains why
there is none (another thread, trio). :func:`visible_scope` finds the scope the
running code is inside, given the ContextVar's value (see below).

Scopes opened inside async generators: whose code they belong to.

A scope is kept in a :class:`~contextvars.ContextVar`, and an async generator
shares the context of the code iterating it. So a generator suspended at a
``yield`` inside ``async with db.scope():`` leaves its scope visible to the
consumer between iterations: the consumer's ``db.scope()`` would join it (and
commit or roll back with the generator, whenever that ends) and its
``db.session`` would return the generator's session. That scope is not the
consumer's: it must not leak out of the frames that opened it.

Two kinds of generators are told apart by who resumed the generator when it
opened the scope:

* **iterated by the application** (``async for``, ``anext()`` in the
  application's code): the scope is **private** to the generator's frame, and
  code outside that frame does not see it (:func:`private_frame` returns the
  generator's frame, :func:`is_running` says whether the generator is running);
* **driven by a library on the application's behalf**: ``contextlib``'s
  ``@asynccontextmanager``, or a test runner's async fixture. There the code
  that runs while the generator is suspended is the body the generator wraps,
  and the scope is meant to cover it: such a scope is an ordinary one.

Only the opening of a scope in an async generator pays for this (one flag test
on every scope entry otherwise).
"""

from __future__ import annotations

import asyncio
import dis
import sys
from types import CodeType, FrameType
from typing import Any, Protocol, TypeVar

from ._compat import current_task
from ._errors import CrossThreadError, UnsupportedBackendError

__all__ = [
    "TaskScope",
    "assigned_name",
    "is_running",
    "line_of",
    "private_frame",
    "running_task",
    "visible_scope",
]

_current_task = current_task

_getframe = sys._getframe

# Code that resumes a generator on behalf of the code it wraps (context
# managers, test fixtures): a scope it opens covers what runs while it is suspended.
_DRIVERS = (
    "/contextlib.py",
    "/anyio/",
    "/asyncio/",
    "/_pytest/",
    "/pytest_asyncio/",
    "/tasksession/",
)


def private_frame(opener: FrameType) -> FrameType | None:
    """The generator frame a scope opened in ``opener`` is private to, or None.

    :param opener: the frame running ``async with db.scope()``; the caller has
        checked that its code is an async generator's (``inspect.CO_ASYNC_GENERATOR``).
    """
    resumer = opener.f_back
    if resumer is None:
        return None
    filename = resumer.f_code.co_filename
    if any(part in filename for part in _DRIVERS):
        return None
    return opener


def is_running(frame: FrameType) -> bool:
    """Whether ``frame`` is on the calling code's stack (its generator is running it)."""
    current: FrameType | None = _getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def line_of(code: CodeType, lasti: int) -> int:
    """The line of the instruction at byte offset ``lasti`` of ``code``.

    Worked out only when a diagnostic asks: ``frame.f_lineno`` scans the line
    table, which costs more than the rest of entering a scope.
    """
    for start, end, line in code.co_lines():
        if start <= lasti < end and line is not None:
            return line
    return code.co_firstlineno


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


class TaskScope(Protocol):
    """What :func:`visible_scope` reads of a scope."""

    owner: asyncio.Task[Any] | None
    closed: bool
    private_frame: FrameType | None
    previous: Any  # a scope of the same kind, or None


S = TypeVar("S", bound=TaskScope)


def visible_scope(scope: S | None, task: asyncio.Task[Any] | None) -> S | None:
    """The scope the code running in ``task`` is inside, given the ContextVar's value ``scope``.

    Usually ``scope`` itself. Two things can leave the variable pointing at a
    scope that is not the running code's, and both only this task's own scopes:

    * scopes exited out of order (an outer one before an inner ``independent``
      one): the inner one's exit restores a scope that has already ended;
    * a scope opened in an async generator that is suspended at a ``yield``
      (above): it belongs to the generator, not to the code iterating it.

    Both are skipped, outwards, to the scope that was current when they were
    entered. A scope of another task (inherited by a child task) is returned
    as it is, open or closed: the caller decides what that means.
    """
    while scope is not None and scope.owner is task:
        frame = scope.private_frame
        if not scope.closed and (frame is None or is_running(frame)):
            return scope
        scope = scope.previous
    return scope


_STORES = frozenset({"STORE_NAME", "STORE_FAST", "STORE_GLOBAL", "STORE_DEREF"})
_LOADS = frozenset({"LOAD_FAST", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF"})
# Between the call and the store: `self` loaded for `self.db = ...`, or the
# awaiting of `async with SessionManager() as db`.
_PASSED = _LOADS | {
    "BEFORE_ASYNC_WITH",
    "GET_AWAITABLE",
    "LOAD_CONST",
    "SEND",
    "YIELD_VALUE",
    "RESUME",
    "JUMP_BACKWARD_NO_INTERRUPT",
    "NOP",
}


def assigned_name(frame: FrameType | None) -> str | None:
    """The name the code in ``frame`` stores the manager being created under, if it says.

    ``db = SessionManager()`` gives ``"db"``, ``self.db = ...`` ``"self.db"``,
    ``async with SessionManager() as db`` ``"db"``. Messages spell code with it;
    anything else (a call argument, a return value) gives ``None``. Read once, at
    construction, from the bytecode that follows the call.
    """
    if frame is None:
        return None
    previous = None
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset <= frame.f_lasti or instruction.opname == "CACHE":
            continue
        name = instruction.opname
        if name in _STORES:
            return str(instruction.argval)
        if name == "STORE_ATTR":
            if previous is not None and previous.opname in _LOADS:
                return f"{previous.argval}.{instruction.argval}"
            return None
        if name not in _PASSED:
            return None
        previous = instruction
    return None
