"""``SessionManager``: the one object an application creates."""

from __future__ import annotations

import itertools
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._compat import current_task, get_running_loop_or_none
from ._config import Binding, ManagerOptions, create_binding, split_options
from ._errors import CrossThreadError, NoScopeError, ScopeClosedError
from ._home import ScopeHome
from ._interrupt import finish_cancelling, watch_all
from ._pool import checked_out, size_of
from ._rebind import binding_for
from ._retry import RetryPolicy
from ._scope import Scope
from ._session import session_class_for
from ._stats import ManagerStatistics, ScopeInfo, scope_info
from ._task_group import SessionTaskGroup
from ._tasks import assigned_name, visible_scope
from ._transactional import transactional

__all__ = ["SessionManager"]

_get_ident = threading.get_ident

P = ParamSpec("P")
R = TypeVar("R")

_manager_ids = itertools.count(1)


class SessionManager:
    """Give every unit of work one :class:`~sqlalchemy.ext.asyncio.AsyncSession`, keyed to its task.

    Create it at import time (unbound) and :meth:`configure` it at start-up, or
    pass the URL right away::

        db = SessionManager()
        db.configure("postgresql+asyncpg://app@localhost/app", pool_size=20)

        async with db.scope() as session:
            session.add(User(name="ada"))   # committed when the block ends cleanly

    :param url: database URL with an asyncio driver (``postgresql+asyncpg://``,
        ``sqlite+aiosqlite://``); ``None`` leaves the manager unbound.
    :param options: see :meth:`configure`.
    :raises UnsupportedDriverError: the URL names a synchronous driver.
    """

    def __init__(self, url: str | URL | None = None, **options: Any) -> None:
        # What the scopes share (configuration, ContextVar, counters): see _home.
        self._home = home = ScopeHome(assigned_name(sys._getframe(1)), next(_manager_ids))
        self._label = home.label or "manager"  # how messages spell the manager in code
        self._current = home.current
        self._retired: list[Binding] = []
        if url is not None or "engine" in options:
            self.configure(url, **options)
        elif options:
            raise TypeError(
                f"options {sorted(options)} were given without a URL; pass them to configure()"
            )

    # -- configuration -------------------------------------------------------------

    def configure(
        self, url: str | URL | None = None, *, engine: AsyncEngine | None = None, **options: Any
    ) -> None:
        """Bind the manager to a database (again).

        Creates no connection: the first scope that uses its session connects.

        :param url: database URL with an asyncio driver.
        :param engine: an existing :class:`~sqlalchemy.ext.asyncio.AsyncEngine` instead of
            ``url``; the manager never disposes an engine it did not create.
        :param guard: ``"concurrent"`` (default), ``"strict"`` or ``"off"``; see :doc:`/concurrency`.
        :param expire_on_commit: passed to the sessions; ``False`` by default, so objects stay
            readable after commit without implicit I/O.
        :param session_class: an :class:`~sqlalchemy.ext.asyncio.AsyncSession` subclass to use.
        :param replicas: URLs of read replicas; ``readonly=True`` scopes read from them, except
            shortly after the same task committed (read-your-writes).
        :param pgbouncer: configure asyncpg for PgBouncer's transaction pooling mode.
        :param warn_after: log a warning when a scope stays open longer than this many seconds.
        :param readonly_autocommit: (PostgreSQL, asyncpg, READ COMMITTED) run ``readonly=True``
            scopes on a second pool of read-only autocommit connections: no BEGIN/ROLLBACK
            round trips, and PostgreSQL still refuses every write. ``stream()`` needs a
            transaction and is not available in those scopes.
        :param commit_timeout: seconds a scope waits for the answer to its COMMIT
            (default 10; ``None``: no bound). Past it, the connection is cut (asyncpg)
            and the scope raises :class:`CommitOutcomeUnknownError`: the server may or
            may not have committed. A COMMIT is never cut off earlier, whatever
            cancels the caller. Raise it if commits legitimately wait longer (a
            synchronous standby, say).
        :param engine_kwargs: anything else goes to
            :func:`~sqlalchemy.ext.asyncio.create_async_engine` (``pool_size=``, ``echo=``...).
        :raises UnsupportedDriverError: the URL names a synchronous driver.

        Reconfiguring while scopes are open is allowed: they keep their engine, new
        scopes get the new one, and a :class:`RuntimeWarning` says so.
        """
        manager_options, engine_kwargs = split_options(options)
        session_class = session_class_for(manager_options.session_class, manager_options.guard)
        binding = create_binding(url, engine, manager_options, engine_kwargs, session_class)
        watch_all(binding.engines)
        previous = self._home.binding
        if previous is not None:
            still_open = sum(1 for scope in self._home.open_scopes if scope.binding is previous)
            if still_open:
                warnings.warn(
                    f"{self._label}.configure() was called while {still_open} scope(s) are "
                    "open: they keep using the previous engine until they end; new scopes "
                    "use the new one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._retired.append(previous)
        self._home.binding = binding

    @property
    def configured(self) -> bool:
        """Whether :meth:`configure` (or a URL at construction) bound the manager."""
        return self._home.binding is not None

    @property
    def engine(self) -> AsyncEngine:
        """The primary :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.

        :raises NotConfiguredError: the manager is not configured.
        """
        return self._home.require_binding().engine

    @property
    def options(self) -> ManagerOptions:
        """The manager's current settings."""
        return self._home.require_binding().options

    async def dispose(self) -> None:
        """Dispose the engines the manager created (current and replaced ones).

        Open scopes are not interrupted; call this at shutdown, after they ended.
        An ``engine=`` passed in by the application is left to the application.
        """
        current = self._home.binding
        bindings = [*self._retired, *([current] if current else [])]
        self._retired.clear()
        # Statements orphaned by cancellations are being cancelled over these pools.
        await finish_cancelling([binding.engine for binding in bindings])
        for binding in bindings:
            await binding.dispose()

    @asynccontextmanager
    async def bound_to(
        self,
        target: AsyncConnection | AsyncEngine | str | URL,
        *,
        session_class: type[AsyncSession] | None = None,
    ) -> AsyncIterator[tuple[AsyncEngine, ...]]:
        """Point the scopes opened inside the block at ``target``: the hook under test isolation.

        ``async with db.bound_to(target):`` swaps the configuration for the block, for
        every task (scopes already open keep theirs), and restores it at the end.
        :mod:`tasksession.testing` is built on it; use that rather than this.

        :param target: an :class:`~sqlalchemy.ext.asyncio.AsyncConnection` inside a
            transaction: every scope's session joins that transaction in SAVEPOINTs
            (``join_transaction_mode="create_savepoint"``); readonly scopes and replicas
            use it too, and ``commit_timeout`` does not apply. Savepoints of one
            connection must nest, never interleave: concurrent scopes need a
            ``session_class`` that makes them take turns (``tasksession.testing``'s
            does). Or a database URL: an engine with the current settings (no
            replicas), disposed at the end. Or an
            :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, used as it is.
        :param session_class: an :class:`~sqlalchemy.ext.asyncio.AsyncSession` subclass
            to use inside the block instead of the configured one (guarded the same way).
        :returns: (as the ``as`` target) the engines with a pool of their own that the
            scopes now use: none for a connection.
        :raises NotConfiguredError: the manager is not configured.
        """
        home = self._home
        previous = home.require_binding()
        options = previous.options
        guarded = previous.session_class
        if session_class is not None:
            # Validated as configure(session_class=) is; guarded as the configured one.
            replace(options, session_class=session_class)
            guarded = session_class_for(session_class, options.guard)
        binding = binding_for(previous, target, guarded)
        watch_all(binding.engines)
        home.binding = binding
        try:
            yield () if isinstance(target, AsyncConnection) else binding.engines
        finally:
            home.binding = previous
            if binding.owns_engines:
                await finish_cancelling([binding.engine])
                await binding.dispose()

    async def __aenter__(self) -> SessionManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()

    # -- scopes --------------------------------------------------------------------

    def scope(
        self,
        *,
        name: str | None = None,
        readonly: bool = False,
        savepoint: bool = False,
        independent: bool = False,
    ) -> Scope:
        """Open a unit of work: ``async with db.scope() as session: ...``.

        The block's session is committed when the block ends cleanly (if anything
        happened), rolled back on an exception or cancellation, and closed either way.
        Inside an open scope of the same task, a plain ``db.scope()`` joins it (its
        exit commits nothing).

        :param name: label for diagnostics (logs, :meth:`active_scopes`, errors).
        :param readonly: never commit; read from a replica when configured. Writes
            through the ORM raise :class:`ReadOnlyScopeError` (and on PostgreSQL the
            transaction itself is ``READ ONLY``).
        :param savepoint: inside an open scope, run the block in a SAVEPOINT: an exception
            rolls back only the block's work. Without an open scope, a plain new scope.
        :param independent: always start a new session and transaction, even inside an
            open scope of the same task.
        """
        return Scope(self._home, name, readonly, savepoint, independent)

    def transactional(
        self,
        retry: RetryPolicy | None = None,
        *,
        name: str | None = None,
        readonly: bool = False,
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
        """Decorate a coroutine function to run each call as one unit of work.

        ::

            @db.transactional(retry=RetryPolicy(attempts=5))
            async def transfer(src: int, dst: int, amount: int) -> None:
                session = db.session        # this call's own session
                ...                         # committed when the function returns

        Each call runs in its own scope: committed when the function returns,
        rolled back when it raises. With ``retry``, a call that failed with a
        serialization failure, a deadlock or a lost connection runs again from
        the start in a new scope, after a jittered backoff; **the function must
        be safe to run again** (no effects outside the database). Called inside
        an open scope of the same task, it joins that scope and is not retried
        (the outer unit owns the transaction). See :doc:`/workers`.

        :param retry: when and how often to re-run the call; ``None`` never retries.
        :param name: label of the scopes (default: the function's qualified name).
        :param readonly: run in ``readonly=True`` scopes.
        :raises CommitOutcomeUnknownError: the connection was lost during COMMIT
            (never retried: the database may have committed).
        """
        return transactional(self.scope, self._label, retry, name, readonly)

    def task_group(self, *, readonly: bool = False) -> SessionTaskGroup:
        """Run database work in parallel: ``async with db.task_group() as tg: tg.start_soon(fn)``.

        An anyio task group whose children each run in their own independent scope
        (reached through :attr:`session`): committed when the child returns, rolled
        back when it raises or is cancelled. **The children's commits are independent,
        not atomic.** See :doc:`/concurrency`.

        :param readonly: run every child in a ``readonly=True`` scope (never commits;
            may read from a replica).
        """
        return SessionTaskGroup(self.scope, self._home.require_binding, readonly)

    @property
    def session(self) -> AsyncSession:
        """The current scope's session (the object ``async with db.scope() as session`` gave).

        Created on first use; no session and no connection exist before that.

        :raises NoScopeError: no scope is open in this task or the task that started it.
        :raises ScopeClosedError: the scope that started this task has already ended.
        """
        scope = self._current.get(None)
        if scope is None:
            raise NoScopeError(self._home.label)
        # Checking the loop costs a getpid() system call on CPython 3.11: do it
        # only off the thread scopes last ran on (a worker thread, usually).
        if _get_ident() != self._home.thread and get_running_loop_or_none() is None:
            raise CrossThreadError(f"{self._label}.session")
        if scope.closed or scope.private_frame is not None:
            return self._session_of_visible_scope(scope)
        return scope.session  # type: ignore[no-any-return]

    def _session_of_visible_scope(self, scope: Scope) -> AsyncSession:
        # The slow path of `session`: the variable's scope may not be this code's.
        visible = visible_scope(scope, current_task())
        if visible is None:
            raise NoScopeError(self._home.label, reason=_why_not_visible(scope))
        if visible.closed:
            # Inherited from the task that started this one, and ended since.
            raise ScopeClosedError(visible.name, f"{self._label}.session", manager=self._home.label)
        return visible.session  # type: ignore[no-any-return]

    # -- diagnostics -----------------------------------------------------------------

    def active_scopes(self) -> list[ScopeInfo]:
        """Describe the open scopes, oldest first."""
        return [scope_info(scope) for scope in self._home.open_scopes]

    def statistics(self) -> ManagerStatistics:
        """Counters and gauges: scopes, commits, rollbacks, guard violations, pool use."""
        home = self._home
        ledger = home.ledger
        binding = home.binding
        open_scopes = list(home.open_scopes)
        return ManagerStatistics(
            open_scopes=len(open_scopes),
            open_sessions=sum(1 for scope in open_scopes if scope.has_session),
            scopes_entered=ledger.scopes_entered,
            commits=ledger.commits,
            rollbacks=ledger.rollbacks,
            concurrent_violations=ledger.violations,
            teardown_failures=ledger.teardown_failures,
            # readonly_autocommit's own pool counts too: a leak there is a leak.
            pool_checked_out=(
                None if binding is None else checked_out((binding.engine, *binding.extra_engines))
            ),
            pool_size=None if binding is None else size_of(binding.engine),
            pool_timeouts=ledger.pool_timeouts,
        )

    def __repr__(self) -> str:
        binding = self._home.binding
        if binding is None:
            return "<SessionManager (not configured)>"
        url = binding.engine.url.render_as_string(hide_password=True)
        return f"<SessionManager {url} open_scopes={len(self._home.open_scopes)}>"


def _why_not_visible(scope: Scope) -> str:
    """Why ``scope``, the ContextVar's value, is not the running code's scope."""
    if scope.closed:
        return (
            f"the last scope this task entered, {scope.name!r}, has ended (scopes were "
            "exited out of order: an outer scope ended before an inner one)"
        )
    return (
        f"the innermost scope, {scope.name!r} (opened at {scope.opened_at}), belongs to an "
        "async generator that is suspended at a `yield`: a scope opened inside an async "
        "generator covers the generator's own code, not the code iterating it"
    )
