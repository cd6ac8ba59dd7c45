"""The tasksession error hierarchy.

Every error says what happened, why, and what to change, and ends with a link
to its stable code on the errors page (``docs/errors.md``)::

    TaskSessionError (sqlalchemy.exc.InvalidRequestError)
    ├── NoScopeError              db.session outside any scope
    ├── ScopeClosedError          a session or scope used after the scope ended
    │   └── StreamClosedError     a stream() result read after its scope ended
    ├── ConcurrentSessionError    one session used by two tasks at once
    ├── ImplicitIOError           (also MissingGreenlet) attribute load needing I/O
    │   └── DetachedImplicitIOError  (also DetachedInstanceError) ... on a detached object
    ├── NotConfiguredError        (also UnboundExecutionError) manager never configured
    ├── UnsupportedDriverError    (also ArgumentError) synchronous driver URL
    ├── UnsupportedBackendError   scope entered under trio
    ├── CrossThreadError          scope or session used from another thread
    ├── ReadOnlyScopeError        a write attempted in a readonly scope
    ├── PoolExhaustedError        (also sqlalchemy.exc.TimeoutError) pool checkout timed out
    └── CommitOutcomeUnknownError a COMMIT got no answer: committed or not, unknown

Each class keeps the facts its message is built from as attributes, so code
can inspect them without parsing text. The classes subclass what users of
SQLAlchemy already catch, so adopting tasksession breaks no ``except`` clause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

if TYPE_CHECKING:
    from ._stats import ScopeInfo

__all__ = [
    "ERRORS_PAGE",
    "CommitOutcomeUnknownError",
    "ConcurrentSessionError",
    "CrossThreadError",
    "DetachedImplicitIOError",
    "ImplicitIOError",
    "NoScopeError",
    "NotConfiguredError",
    "PoolExhaustedError",
    "ReadOnlyScopeError",
    "ScopeClosedError",
    "StreamClosedError",
    "TaskSessionError",
    "UnsupportedBackendError",
    "UnsupportedDriverError",
]

#: Where the stable error codes are explained (``docs/errors.md`` in the repository).
ERRORS_PAGE = "https://tasksession.readthedocs.io/en/latest/errors.html"


class TaskSessionError(sa_exc.InvalidRequestError):
    """Base class of every error tasksession raises.

    :attr:`error_code` names the section of the errors page that explains it.
    (SQLAlchemy's own ``code`` attribute is left unset on purpose: SQLAlchemy
    would turn it into a link to *its* error pages.)
    """

    error_code = "ts-base"

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}\n(Explained at {ERRORS_PAGE}#{self.error_code})")


class NoScopeError(TaskSessionError):
    """``db.session`` was read outside of any scope."""

    error_code = "ts-noscope"

    def __init__(self, manager: str, reason: str | None = None) -> None:
        self.manager = manager
        self.reason = reason
        where = (
            f"this code is not inside one: {reason}.\n"
            if reason is not None
            else "there is none open in this task (or in the task that started it).\n"
        )
        super().__init__(
            f"{manager}.session was used outside of a scope. A session belongs to a unit "
            f"of work, and a unit of work is an `async with` block; {where}"
            "Open one around the code that uses the database:\n\n"
            f"    async with {manager}.scope():\n"
            f"        user = await {manager}.session.get(User, 1)\n\n"
            f"or decorate the coroutine function with @{manager}.transactional()."
        )


class ScopeClosedError(TaskSessionError):
    """A session (or the scope itself) was used after its scope ended."""

    error_code = "ts-closed"

    def __init__(self, scope_name: str, operation: str) -> None:
        self.scope_name = scope_name
        self.operation = operation
        super().__init__(
            f"{operation}() was called on the session of scope {scope_name!r} after that "
            "scope ended. The scope already committed or rolled back and returned its "
            "connection; using the session now would silently start a new transaction "
            "that nobody commits or closes. This usually means a background task "
            "(asyncio.create_task, TaskGroup.start_soon) outlived the scope that "
            "started it and kept using that scope's session.\n"
            "Give the background work a scope of its own:\n\n"
            "    async def background_job():\n"
            "        async with db.scope(independent=True) as session:\n"
            "            ...\n"
        )


class StreamClosedError(ScopeClosedError):
    """A ``stream()`` result was read after its scope ended."""

    def __init__(self, scope_name: str) -> None:
        self.scope_name = scope_name
        self.operation = "reading a stream() result"
        TaskSessionError.__init__(
            self,
            f"A stream() result of scope {scope_name!r} was read after that scope ended. "
            "A stream reads its rows through a server-side cursor on the scope's "
            "connection; when the scope ended it closed the cursor and returned the "
            "connection to the pool, so the remaining rows are gone.\n"
            "Consume the stream inside the scope:\n\n"
            "    async with db.scope() as session:\n"
            "        result = await session.stream(select(User))\n"
            "        async for user in result.scalars():\n"
            "            ...\n\n"
            "or use `await session.execute(...)`, whose result is fully buffered and "
            "readable after the scope ends.",
        )


class ConcurrentSessionError(TaskSessionError):
    """Two tasks used one session at the same time.

    Raised in the task that arrived second, before it sends anything to the
    database; the task already using the session is not disturbed.
    """

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
    ) -> None:
        self.scope_name = scope_name
        self.holder_task = holder_task
        self.holder_operation = holder_operation
        self.holder_location = holder_location
        self.caller_task = caller_task
        self.caller_operation = caller_operation
        self.caller_location = caller_location
        self.strict = strict
        if strict:
            what = (
                f"Task {caller_task!r} called {caller_operation}() on the session of scope "
                f"{scope_name!r}, which belongs to task {holder_task!r} "
                f"(guard='strict' allows only the owner task to use it)."
            )
        else:
            what = (
                f"Task {caller_task!r} called {caller_operation}() on the session of scope "
                f"{scope_name!r} while task {holder_task!r} is still inside "
                f"{holder_operation}() on the same session."
            )
        super().__init__(
            f"{what}\n"
            f"  {holder_task} is at: {holder_location}\n"
            f"  {caller_task} is at: {caller_location}\n"
            "An AsyncSession is one transaction on one connection: two tasks using it at "
            "once lose writes, skip autoflush, or fail later with 'another operation is in "
            f"progress'. {caller_operation}() was refused before it touched the database.\n"
            "Give each concurrent task its own scope:\n\n"
            "    # wrong: children share the parent's session\n"
            "    await asyncio.gather(load(a), load(b))\n\n"
            "    # right: each child gets its own session and transaction\n"
            "    async with db.task_group() as tg:\n"
            "        tg.start_soon(load, a)\n"
            "        tg.start_soon(load, b)\n\n"
            "or open `async with db.scope(independent=True):` inside the child."
        )


class ImplicitIOError(TaskSessionError, sa_exc.MissingGreenlet):
    """An attribute access needed database I/O outside of an ``await``."""

    error_code = "ts-implicit-io"
    # Empty, not MissingGreenlet's "xd2s": that would append a second link, to
    # SQLAlchemy's pages (SQLAlchemy adds the link only for a non-empty code).
    code = ""

    def __init__(
        self,
        *,
        class_name: str,
        attribute: str,
        instance: str,
        reason: str,
        fixes: Sequence[str],
    ) -> None:
        self.class_name = class_name
        self.attribute = attribute
        self.instance = instance
        self.reason = reason
        self.fixes = tuple(fixes)
        fix_text = "\n".join(f"    {fix}" for fix in self.fixes)
        super().__init__(
            f"Reading {class_name}.{attribute} on {instance} needs a database query, "
            f"but {reason}.\n"
            f"Load it explicitly, one of these ways:\n{fix_text}"
        )


class DetachedImplicitIOError(ImplicitIOError, orm_exc.DetachedInstanceError):
    """An :class:`ImplicitIOError` on a detached object (its scope ended, or it was expunged).

    Also a :class:`~sqlalchemy.orm.exc.DetachedInstanceError`, the error SQLAlchemy
    raises there, so existing ``except`` clauses keep working.
    """


class NotConfiguredError(TaskSessionError, sa_exc.UnboundExecutionError):
    """The manager was used before :meth:`SessionManager.configure` was called."""

    error_code = "ts-not-configured"

    def __init__(self, manager: str) -> None:
        self.manager = manager
        super().__init__(
            f"{manager} has no database yet: it was created without a URL and "
            "configure() was never called. Creating the manager unbound at import time "
            "is fine; bind it once at start-up, before the first scope:\n\n"
            f'    {manager}.configure("postgresql+asyncpg://user@host/dbname")\n'
            f"    # or {manager}.configure(engine=my_async_engine)\n\n"
            "Did you forget to call configure() in your application's start-up code?"
        )


class UnsupportedDriverError(TaskSessionError, sa_exc.ArgumentError):
    """The URL names a synchronous driver."""

    error_code = "ts-driver"

    def __init__(self, url: str, driver: str, suggestion: str | None) -> None:
        self.url = url
        self.driver = driver
        self.suggestion = suggestion
        if suggestion is not None:
            fix = f"Use the asyncio driver instead:\n\n    {suggestion}\n"
        else:
            fix = "Name an asyncio driver in the URL (dialect+driver://...)."
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
            "tasksession) runs only on asyncio. Run this code on the asyncio backend, for "
            'example anyio.run(main, backend="asyncio").'
        )


class CrossThreadError(TaskSessionError):
    """A scope or its session was used from a thread other than the event loop's."""

    error_code = "ts-thread"

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(
            f"{operation} was called from a thread other than the event loop thread (for "
            "example inside anyio.to_thread.run_sync or run_in_executor). AsyncSession is "
            "bound to its event loop and is not thread-safe. Do the database work in the "
            "event loop before or after the thread call, or use a synchronous Session "
            "inside the thread."
        )


class ReadOnlyScopeError(TaskSessionError):
    """A write was attempted in a ``readonly=True`` scope."""

    error_code = "ts-readonly"

    def __init__(self, scope_name: str, operation: str) -> None:
        self.scope_name = scope_name
        self.operation = operation
        super().__init__(
            f"{operation} was attempted in the readonly scope {scope_name!r}. A readonly "
            "scope never commits (and may run on a replica), so the write would be lost. "
            "Open a writable scope for it:\n\n"
            "    async with db.scope():   # not readonly=True\n"
            "        ..."
        )


class PoolExhaustedError(TaskSessionError, sa_exc.TimeoutError):
    """No connection could be checked out before the pool timeout."""

    error_code = "ts-pool"

    def __init__(self, pool_status: str, holders: Sequence[ScopeInfo]) -> None:
        self.pool_status = pool_status
        self.holders = tuple(holders)
        if self.holders:
            lines = "\n".join(
                f"  - scope {h.name!r} in task {h.task_name!r}, open {h.age:.1f}s, "
                f"opened at {h.opened_at}"
                for h in self.holders
            )
            who = f"Scopes holding connections (oldest first):\n{lines}"
        else:
            who = (
                "No open tasksession scope holds a connection: they are held by code using "
                "the engine directly, or by sessions that were never closed."
            )
        super().__init__(
            f"Timed out waiting for a database connection: the pool is exhausted "
            f"({pool_status}).\n{who}\n"
            "A scope holds its connection from its first query until it ends. Keep scopes "
            "short (no slow network calls inside them), make sure background tasks open "
            "their own scopes and finish, or raise pool_size / max_overflow."
        )


class CommitOutcomeUnknownError(TaskSessionError):
    """A unit's COMMIT got no answer: the database may have committed it or not.

    Raised by the scope's exit when the COMMIT round trip failed without an
    answer from the server: a timeout (``commit_timeout=``, or the driver's
    ``command_timeout``), a lost or invalidated connection, an ``OSError``.
    Nothing on the client can tell whether the server committed, so the unit
    is never retried, whatever the :class:`RetryPolicy` says (it could be
    applied twice). The failure is the ``__cause__`` and the ``original``
    attribute; the connection was discarded.
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
        self.unit = unit
        self.original = original
        self.attempt = attempt
        self.reason = reason
        what = reason if reason is not None else f"the COMMIT failed with {original!r}"
        on_attempt = f" (attempt {attempt})" if attempt is not None else ""
        super().__init__(
            f"The outcome of unit {unit!r}{on_attempt} is unknown: {what}, and no answer "
            "came from the server, so the database may or may not have committed it. "
            "tasksession does not retry it, because running it again could apply it "
            f"twice; its connection was discarded. Cause: {original!r}\n"
            "Check whether its effects are present before running it again, or make the "
            "unit safe to repeat, for example by keying its writes on a unique id:\n\n"
            "    INSERT INTO payments (request_id, ...) VALUES (...)\n"
            "    ON CONFLICT (request_id) DO NOTHING"
        )
