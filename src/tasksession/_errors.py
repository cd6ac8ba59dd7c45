"""The tasksession error hierarchy (drawn, with each class's code, in ``docs/errors.md``).

Every error says what happened, why, and what to change, and links its stable code on
the installed version's errors page; it keeps the facts of its message as attributes.
Code in a message names the manager as the user does (:func:`manager_label`).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

__all__ = [
    "ERRORS_PAGE", "CommitOutcomeUnknownError", "ConcurrentSessionError", "CrossThreadError",
    "DetachedImplicitIOError", "ImplicitIOError", "NoScopeError", "NotConfiguredError",
    "PoolExhaustedError", "ReadOnlyScopeError", "ScopeClosedError", "StreamClosedError",
    "TaskSessionError", "UnsupportedBackendError", "UnsupportedDriverError", "manager_label"
]  # fmt: skip

try:  # the pages of the installed version describe its behaviour
    _VERSION = version("tasksession")
except PackageNotFoundError:  # a source tree that was never installed
    _VERSION = "latest"
_VERSION = "latest" if ".dev" in _VERSION or "+" in _VERSION else _VERSION  # no pages

#: Where the stable error codes are explained, for the installed version (``docs/errors.md``).
ERRORS_PAGE = f"https://tasksession.readthedocs.io/en/{_VERSION}/errors.html"


def manager_label(manager: str | None) -> str:
    """How code in a message names the manager: the user's name for it (``"db"`` for ``db =
    SessionManager()``), else ``manager``, never a made-up ``db``; also in an ``operation``."""
    return "manager" if manager is None else manager


class ConnectionHolder(Protocol):
    """What :class:`PoolExhaustedError` reads of a connection's holder (a ``ScopeInfo``)."""

    @property
    def name(self) -> str: ...
    @property
    def task_name(self) -> str: ...
    @property
    def age(self) -> float: ...
    @property
    def opened_at(self) -> str: ...


class TaskSessionError(sa_exc.InvalidRequestError):
    """Base class of every error tasksession raises; :attr:`error_code` names its section."""

    error_code = "ts-base"  # (SQLAlchemy's own ``code`` would add a link to its pages)

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}\n(Explained at {ERRORS_PAGE}#{self.error_code})")


class NoScopeError(TaskSessionError):
    """``db.session`` was read outside of any scope (or of any scope that covers this code)."""

    error_code = "ts-noscope"

    def __init__(self, manager: str | None = None, reason: str | None = None) -> None:
        self.manager, self.reason = manager, reason
        m = manager_label(manager)
        where = "there is none open in this task (or in the task that started it)"
        super().__init__(
            f"{m}.session was used outside of a scope. A session belongs to a unit of work, "
            "and a unit of work is an `async with` block; "
            f"{where if reason is None else f'this code is not inside one: {reason}'}.\n"
            "Open one around the code that uses the database:\n\n"
            f"    async with {m}.scope():\n"
            f"        user = await {m}.session.get(User, 1)\n\n"
            f"or decorate the coroutine function with @{m}.transactional()."
        )


class ScopeClosedError(TaskSessionError):
    """A session was used after its scope ended (``operation``: ``"flush()"``, ``"db.session"``)."""

    error_code = "ts-closed"

    def __init__(self, scope_name: str, operation: str, *, manager: str | None = None) -> None:
        self.scope_name, self.operation, self.manager = scope_name, operation, manager
        super().__init__(
            f"{operation} was used in scope {scope_name!r} after that scope ended. The scope "
            "already committed or rolled back and returned its connection; using its session "
            "now would silently start a new transaction that nobody commits or closes. Most "
            "often a background task (asyncio.create_task, TaskGroup.start_soon) outlived "
            "the scope that started it. Give the background work a scope of its own:\n\n"
            "    async def background_job():\n"
            f"        async with {manager_label(manager)}.scope(independent=True) as session:\n"
            "            ...\n"
        )


class StreamClosedError(ScopeClosedError):
    """A ``stream()`` result was read after its scope ended (``operation`` is fixed)."""

    def __init__(self, scope_name: str, *, manager: str | None = None) -> None:
        self.scope_name, self.operation, self.manager = scope_name, "a stream() result", manager
        TaskSessionError.__init__(
            self,
            f"A stream() result of scope {scope_name!r} was read after that scope ended. The "
            "scope closed its server-side cursor and returned its connection to the pool, "
            "so the remaining rows are gone. Consume the stream inside the scope:\n\n"
            f"    async with {manager_label(manager)}.scope() as session:\n"
            "        result = await session.stream(select(User))\n"
            "        async for user in result.scalars():\n"
            "            ...\n\n"
            "or use `await session.execute(...)`, whose result is fully buffered and "
            "readable after the scope ends.",
        )


class ConcurrentSessionError(TaskSessionError):
    """Two tasks used one session at once: refused in the second (operations: method names)."""

    error_code = "ts-concurrent"

    def __init__(
        self,
        *,
        scope_name: str,
        holder_task: str,
        holder_operation: str,
        holder_location: str,
        caller_task: str,
        caller_operation: str,
        caller_location: str,
        strict: bool = False,
        manager: str | None = None,
    ) -> None:
        self.scope_name, self.strict, self.manager = scope_name, strict, manager
        self.holder_task, self.caller_task = holder_task, caller_task
        self.holder_operation, self.caller_operation = holder_operation, caller_operation
        self.holder_location, self.caller_location = holder_location, caller_location
        m = manager_label(manager)
        whose = f" while task {holder_task!r} is still inside {holder_operation}() on it"
        if strict:
            whose = f", which belongs to task {holder_task!r} (guard='strict': owner task only)"
        super().__init__(
            f"Task {caller_task!r} called {caller_operation}() on the session of scope "
            f"{scope_name!r}{whose}.\n"
            f"  {holder_task} is at: {holder_location}\n"
            f"  {caller_task} is at: {caller_location}\n"
            "An AsyncSession is one transaction on one connection: two tasks using it at "
            "once lose writes, skip autoflush, or fail later with 'another operation is in "
            f"progress'. {caller_operation}() was refused before it touched the database.\n"
            "Give each concurrent task its own scope:\n\n"
            "    await asyncio.gather(load(a), load(b))  # wrong: they share one session\n\n"
            f"    async with {m}.task_group() as tg:  # right: each child has its own\n"
            "        tg.start_soon(load, a)\n"
            "        tg.start_soon(load, b)\n\n"
            f"or open `async with {m}.scope(independent=True):` inside the child."
        )


class ImplicitIOError(TaskSessionError, sa_exc.MissingGreenlet):
    """An attribute access needed database I/O outside of an ``await``."""

    error_code = "ts-implicit-io"
    code = ""  # not MissingGreenlet's "xd2s": SQLAlchemy would add a link to its pages

    def __init__(
        self, *, class_name: str, attribute: str, instance: str, reason: str, fixes: Sequence[str]
    ) -> None:
        self.class_name, self.attribute, self.instance = class_name, attribute, instance
        self.reason, self.fixes = reason, tuple(fixes)
        fix_text = "\n".join(f"    {fix}" for fix in self.fixes)
        super().__init__(
            f"Reading {class_name}.{attribute} on {instance} needs a database query, but "
            f"{reason}.\nLoad it explicitly, one of these ways:\n{fix_text}"
        )


class DetachedImplicitIOError(ImplicitIOError, orm_exc.DetachedInstanceError):
    """An :class:`ImplicitIOError` on a detached object, also SQLAlchemy's
    :class:`~sqlalchemy.orm.exc.DetachedInstanceError` (its scope ended, or it was expunged)."""


class NotConfiguredError(TaskSessionError, sa_exc.UnboundExecutionError):
    """The manager was used before :meth:`SessionManager.configure` was called."""

    error_code = "ts-not-configured"

    def __init__(self, manager: str | None = None) -> None:
        self.manager = manager
        m = manager_label(manager)
        super().__init__(
            f"{'The manager' if manager is None else manager} has no database yet: it was "
            "created without a URL and configure() was never called. Creating the manager "
            "unbound at import time is fine; bind it in the application's start-up code, "
            f'before the first scope:\n\n    {m}.configure("postgresql+asyncpg://app@host/app")'
            f"\n    # or {m}.configure(engine=my_async_engine)\n"
        )


class UnsupportedDriverError(TaskSessionError, sa_exc.ArgumentError):
    """The URL names a synchronous driver."""

    error_code = "ts-driver"

    def __init__(self, url: str, driver: str, suggestion: str | None) -> None:
        self.url, self.driver, self.suggestion = url, driver, suggestion
        fix = "Name an asyncio driver in the URL (dialect+driver://...)."
        if suggestion is not None:
            fix = f"Use the asyncio driver instead:\n\n    {suggestion}\n"
        super().__init__(
            f"The URL {url!r} selects the synchronous driver {driver!r}, which would block "
            f"the event loop on every query. tasksession needs an asyncio driver. {fix}"
        )


class UnsupportedBackendError(TaskSessionError):
    """A scope was entered under an async library other than asyncio."""

    error_code = "ts-backend"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        super().__init__(
            f"A scope was entered under {backend}. SQLAlchemy's asyncio extension (and so "
            "tasksession) runs only on asyncio. Run this code on the asyncio backend:\n\n"
            '    anyio.run(main, backend="asyncio")\n'
        )


class CrossThreadError(TaskSessionError):
    """A scope or its session was used from another thread (``operation`` verbatim)."""

    error_code = "ts-thread"

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(
            f"{operation} was used from a thread other than the event loop's (inside "
            "anyio.to_thread.run_sync or run_in_executor?). AsyncSession is bound to its event "
            "loop and is not thread-safe. Do the database work in the event loop before or "
            "after the thread call, or use a synchronous Session inside the thread."
        )


class ReadOnlyScopeError(TaskSessionError):
    """A write was refused in a readonly scope, or (``nested``) a writable scope inside one.

    ``operation``: the write, or the call that asked for the scope (``"db.scope()"``);
    ``tornado_handler``: the handler class whose ``session_readonly`` made it readonly.
    """

    error_code = "ts-readonly"

    def __init__(
        self,
        scope_name: str,
        operation: str,
        *,
        nested: bool = False,
        manager: str | None = None,
        tornado_handler: str | None = None,
    ) -> None:
        self.scope_name, self.operation, self.nested = scope_name, operation, nested
        self.manager, self.tornado_handler = manager, tornado_handler
        m, cls = manager_label(manager), tornado_handler
        what = f"refused a write: {operation}"
        if nested:
            what = f"refused a writable scope inside it: {operation}"
        own = f"\n\n    async with {m}.scope(independent=True):\n        ..."
        fix = (
            f"Do the write in a unit of work of its own, which commits on its own:{own}\n\n"
            "or, when the whole unit is meant to write, open it without readonly=True."
        )
        if cls is not None:
            fix = (
                f"This request's scope is readonly because of {cls}.session_readonly (True, "
                "or HTTP methods that include this request's). To write in this request, "
                f"leave its method out:\n\n    class {cls}(SessionMixin, RequestHandler):\n"
                '        session_readonly = {"GET", "HEAD"}  # the methods that only read\n\n'
                f"or use a unit of work of its own, which commits whatever the response:{own}\n"
            )
        super().__init__(
            f"The readonly scope {scope_name!r} {what}. A readonly scope never commits (and "
            "may run on a replica), so a write in it would be lost; for the same reason a "
            f"writable scope cannot join it: a plain {m}.scope() inside it is refused too.\n"
            f"{fix}"
        )


class PoolExhaustedError(TaskSessionError, sa_exc.TimeoutError):
    """No connection could be checked out before the pool timeout."""

    error_code = "ts-pool"

    def __init__(self, pool_status: str, holders: Sequence[ConnectionHolder]) -> None:
        self.pool_status, self.holders = pool_status, tuple(holders)
        lines = "\n".join(
            f"  - scope {h.name!r} in task {h.task_name!r}, open {h.age:.1f}s, "
            f"opened at {h.opened_at}"
            for h in self.holders
        )
        who = (
            f"Scopes holding connections (oldest first):\n{lines}"
            if self.holders
            else "No open tasksession scope holds a connection: they are held by code using "
            "the engine directly, or by sessions that were never closed."
        )
        super().__init__(
            "Timed out waiting for a database connection: the pool is exhausted "
            f"({pool_status}).\n{who}\n"
            "A scope holds its connection from its first query until it ends. Keep scopes "
            "short (no slow network calls inside them), make sure background tasks open "
            "their own scopes and finish, or raise pool_size / max_overflow."
        )


class CommitOutcomeUnknownError(TaskSessionError):
    """A unit's COMMIT got no answer (a timeout, a lost connection): committed or not, unknown.

    Never retried, whatever the :class:`RetryPolicy` says; the failure is ``original``.
    """

    error_code = "ts-commit-unknown"

    def __init__(
        self,
        unit: str,
        original: BaseException,
        attempt: int | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        self.unit, self.original, self.attempt, self.reason = unit, original, attempt, reason
        what = reason if reason is not None else f"the COMMIT failed with {original!r}"
        on_attempt = f" (attempt {attempt})" if attempt is not None else ""
        super().__init__(
            f"The outcome of unit {unit!r}{on_attempt} is unknown: {what}, and no answer came "
            "from the server, so the database may or may not have committed it. tasksession "
            "does not retry it (running it again could apply it twice); its connection was "
            f"discarded. Cause: {original!r}\nCheck whether its effects are present before "
            "running it again, or make the unit safe to repeat, for example by keying its "
            "writes on a unique id:\n\n"
            "    INSERT INTO payments (request_id, ...) VALUES (...)\n"
            "    ON CONFLICT (request_id) DO NOTHING"
        )
