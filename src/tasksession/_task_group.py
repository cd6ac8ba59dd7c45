"""``db.task_group()``: run database work in parallel, each child in a scope of its own.

One ``AsyncSession`` is one transaction on one connection; it cannot serve two
tasks at once (the guard refuses it). Parallel database work therefore needs
one session per child task, and :class:`SessionTaskGroup` gives each child
exactly that: an :func:`anyio.create_task_group` whose children run inside
``async with db.scope(independent=True)`` and reach their session through
``db.session``.

**The children's commits are independent, not atomic**: each child commits
when it returns, whatever happens to its siblings later. A child that raises
(or is cancelled because a sibling raised) rolls back only its own work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

__all__ = ["SessionTaskGroup"]


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else repr(fn)


class SessionTaskGroup:
    """An anyio task group whose children each run in an independent scope.

    Created by :meth:`SessionManager.task_group`; use it with ``async with``::

        async with db.task_group() as tg:
            for user_id in user_ids:
                tg.start_soon(load_profile, user_id)   # uses db.session inside

    Each child runs in ``db.scope(independent=True)``: its own session, its own
    transaction, its own pooled connection (checked out at its first query, so
    more children than connections simply wait for the pool). When a child
    returns, its scope commits; when it raises or is cancelled, its scope rolls
    back. Cancellation and error propagation follow anyio: the first failing
    child cancels its siblings, and the group raises an :class:`ExceptionGroup`
    when the block ends.

    **Commits are not atomic across children**: children that finished before
    a sibling failed stay committed. For all-or-nothing writes, do them in one
    scope, one after the other.
    """

    __slots__ = ("_check_configured", "_group", "_open_scope", "_readonly")

    def __init__(
        self,
        open_scope: Callable[..., AbstractAsyncContextManager[Any]],
        check_configured: Callable[[], object],
        readonly: bool = False,
    ) -> None:
        """:param open_scope: the manager's ``scope``; :param check_configured: raises if unbound."""
        self._open_scope = open_scope
        self._check_configured = check_configured
        self._readonly = readonly
        self._group: TaskGroup | None = None

    @property
    def cancel_scope(self) -> anyio.CancelScope:
        """The underlying task group's cancel scope (``tg.cancel_scope.cancel()`` stops all)."""
        return self._require_group().cancel_scope

    def start_soon(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None
    ) -> None:
        """Start ``fn(*args)`` in a new task, inside a scope of its own.

        :param fn: coroutine function; inside it ``db.session`` is the child's session.
        :param args: positional arguments for ``fn``.
        :param name: name of the task and of its scope (default: ``fn``'s qualified name).
        """
        label = name if name is not None else _callable_name(fn)
        self._require_group().start_soon(self._run_child, fn, args, label, name=label)

    async def start(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None
    ) -> Any:
        """Start ``fn(*args, task_status=...)`` in a scope of its own; wait until it reports started.

        Like :meth:`anyio.abc.TaskGroup.start`: ``fn`` calls ``task_status.started(value)``
        once it is ready, and ``value`` is returned here. The child's scope stays open
        until ``fn`` returns, and commits then.

        :raises RuntimeError: ``fn`` returned without calling ``task_status.started()``.
        """
        label = name if name is not None else _callable_name(fn)
        return await self._require_group().start(self._start_child, fn, args, label, name=label)

    async def _run_child(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], label: str
    ) -> None:
        async with self._open_scope(independent=True, name=label, readonly=self._readonly):
            await fn(*args)

    async def _start_child(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        label: str,
        *,
        task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with self._open_scope(independent=True, name=label, readonly=self._readonly):
            await fn(*args, task_status=task_status)

    def _require_group(self) -> TaskGroup:
        group = self._group
        if group is None:
            raise RuntimeError(
                "use the task group inside `async with db.task_group() as tg:` before "
                "starting tasks in it"
            )
        return group

    async def __aenter__(self) -> SessionTaskGroup:
        if self._group is not None:
            raise RuntimeError("a task group can be entered only once; call db.task_group() again")
        # Fail here, in the parent, rather than in every child.
        self._check_configured()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        group = self._require_group()
        return bool(await group.__aexit__(exc_type, exc, tb))
